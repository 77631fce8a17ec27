//! Data parallelism on burn's collective: every replica holds the same model, trains on
//! its share of the step's batch and takes part in an all-reduce that averages the
//! gradients before each optimiser step, so the replicas stay identical and the run
//! follows the trajectory of one replica training on the whole batch.

use anyhow::{Result, anyhow};
use burn::collective::{
    self, AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce,
};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorPrimitive};

/// One replica's membership of the collective. Every replica must make the same
/// collective calls in the same order.
#[derive(Debug)]
pub struct Peer {
    id: PeerId,
}

impl Peer {
    /// Joins the collective of `replicas` local peers as `rank` on backend `B` (the inner
    /// backend of an autodiff one); blocks until all of them have joined.
    pub fn join<B: Backend>(rank: usize, replicas: usize, device: &B::Device) -> Result<Self> {
        let config = CollectiveConfig::default()
            .with_num_devices(replicas)
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
        let id = PeerId::from(rank);
        collective::register::<B>(id, device.clone(), config)
            .map_err(|e| anyhow!("replica {rank} could not join the collective: {e:?}"))?;
        Ok(Self { id })
    }

    /// The mean over the replicas of each gradient of `module`. A parameter without a
    /// gradient here (an expert that got no tokens on this replica) takes part as zeros,
    /// so every replica reduces the same tensors in the same order.
    pub fn mean_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        mut grads: GradientsParams,
    ) -> Result<GradientsParams> {
        module.visit(&mut ZeroFill::<B> {
            grads: &mut grads,
            backend: std::marker::PhantomData,
        });
        grads
            .all_reduce::<B::InnerBackend>(self.id, ReduceOperation::Mean)
            .map_err(|e| anyhow!("all-reduce of the gradients failed: {e:?}"))
    }

    /// `tensor` reduced over the replicas with `op`.
    pub fn reduce<B: Backend, const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        op: ReduceOperation,
    ) -> Result<Tensor<B, D>> {
        let reduced = all_reduce::<B>(self.id, tensor.into_primitive().tensor(), op)
            .map_err(|e| anyhow!("all-reduce failed: {e:?}"))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(reduced)))
    }

    /// The sum over the replicas of integer counts.
    pub fn sum_counts<B: Backend>(&self, counts: Tensor<B, 1, Int>) -> Result<Tensor<B, 1, Int>> {
        Ok(self.reduce(counts.float(), ReduceOperation::Sum)?.int())
    }

    /// Leaves the collective.
    pub fn leave<B: Backend>(self) -> Result<()> {
        collective::finish_collective::<B>(self.id)
            .map_err(|e| anyhow!("leaving the collective failed: {e:?}"))
    }
}

/// Clears what a previous run in this process may have left in the collective of `B`
/// (peers of a run that failed before leaving).
pub fn reset<B: Backend>() {
    collective::reset_collective::<B>();
}

/// Registers a zero gradient for every trained float parameter that has none.
struct ZeroFill<'a, B> {
    grads: &'a mut GradientsParams,
    backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ZeroFill<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        // Parameters outside gradient training (the router's balancing bias) stay out.
        if value.is_require_grad() && self.grads.get::<B::InnerBackend, D>(param.id).is_none() {
            let zeros = value.inner().zeros_like();
            self.grads.register::<B::InnerBackend, D>(param.id, zeros);
        }
    }
}
