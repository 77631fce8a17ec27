//! Data parallelism on burn's collective: every replica holds the same model, trains on
//! its share of the step's batch and takes part in one all-reduce per step that averages
//! the gradients (and the step's losses and expert counts) before the optimiser step, so
//! the replicas stay identical and the run follows the trajectory of one replica
//! training on the whole batch.
//!
//! Replicas on one machine are threads of one process (the first trains on the caller's
//! thread, the others are started by `Replicas`); several machines (nodes) each run
//! `moe train` with their local replicas and meet through burn-collective's global
//! orchestrator (`moe orchestrator`), which pairs the nodes for a ring all-reduce.
//!
//! burn-collective has no timeouts: a replica that dies leaves the others waiting
//! forever. Every collective call here runs on a helper thread and is given up after a
//! deadline, with an error that says so.

use std::marker::PhantomData;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use burn::collective::{
    self, AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation,
};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, Optimizer};
use burn::record::Recorder;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};
use burn_communication::Address;
use moe_data::TrainWindows;
use moe_model::{MoeAutodiffBackend, Transformer};

use crate::checkpoint::{OPTIMIZER_FILE, recorder};
use crate::config::RunConfig;
use crate::learner::{Learner, Shard};
use crate::optimizer::FusedAdamW;

/// Where the replicas of a run train: devices of this machine and, for a run over
/// several machines, this machine's place among them.
#[derive(Debug, Clone)]
pub struct Cluster<D> {
    /// Devices of this machine: replica `r` of this machine trains on (or expert shard
    /// `r` lives on) [`Cluster::device`]`(r)`.
    pub devices: Vec<D>,
    /// The machines of a multi-machine run.
    pub nodes: Option<Nodes>,
}

impl<D: Default> Default for Cluster<D> {
    /// One machine, its default device.
    fn default() -> Self {
        Self::local(vec![D::default()])
    }
}

impl<D> Cluster<D> {
    /// Replicas on these devices of this machine only.
    pub fn local(devices: Vec<D>) -> Self {
        Self {
            devices,
            nodes: None,
        }
    }

    /// Device `index` of this machine: `devices[index]`, or `devices[0]` where the list is
    /// shorter (the CPU backends have one device, which then runs everything).
    pub fn device(&self, index: usize) -> &D {
        self.devices.get(index).unwrap_or(&self.devices[0])
    }

    /// The number of machines (1 without `nodes`).
    pub fn node_count(&self) -> usize {
        self.nodes.as_ref().map_or(1, |n| n.count)
    }

    /// The global rank of this machine's first replica, given `local` replicas per machine.
    pub fn first_rank(&self, local: usize) -> usize {
        self.nodes.as_ref().map_or(0, |n| n.rank * local)
    }
}

/// This machine's place in a run over several machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// Machines in the run.
    pub count: usize,
    /// This machine's rank, `0..count`.
    pub rank: usize,
    /// `host:port` of the global orchestrator (`moe orchestrator --port`).
    pub orchestrator: String,
    /// `host:port` where the other machines reach this one; the port is bound here for
    /// the exchange of tensors.
    pub address: String,
}

impl Nodes {
    /// The collective's settings for this machine.
    fn configure(&self, config: CollectiveConfig) -> Result<CollectiveConfig> {
        let port = self
            .address
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("node address `{}` is not host:port", self.address))?;
        ensure!(
            self.orchestrator
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok()),
            "orchestrator address `{}` is not host:port",
            self.orchestrator
        );
        let websocket = |address: &str| -> Result<Address> {
            format!("ws://{address}")
                .parse()
                .map_err(|e| anyhow!("bad address `{address}`: {e}"))
        };
        Ok(config
            .with_num_nodes(self.count as u32)
            .with_global_address(websocket(&self.orchestrator)?)
            .with_node_address(websocket(&self.address)?)
            .with_data_service_port(port))
    }
}

/// One replica's membership of the collective of backend `B` (the inner backend of the
/// autodiff one: gradients live there). Every replica makes the same calls in the same
/// order.
pub struct Peer<B: Backend> {
    id: PeerId,
    timeout: Duration,
    backend: PhantomData<B>,
}

impl<B: Backend> Peer<B> {
    /// Joins the collective as replica `rank` (global: unique over all machines), one of
    /// `local` replicas on this machine, on the machines of `nodes`; returns once all of
    /// them have joined, or fails after `timeout`.
    pub fn join(
        rank: usize,
        local: usize,
        nodes: Option<&Nodes>,
        device: &B::Device,
        timeout: Duration,
    ) -> Result<Self> {
        let mut config = CollectiveConfig::default()
            .with_num_devices(local)
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
        if let Some(nodes) = nodes {
            config = nodes.configure(config)?;
        }
        let id = PeerId::from(rank);
        let device = device.clone();
        within(timeout, "waiting for every replica to join", move || {
            collective::register::<B>(id, device, config)
        })?;
        Ok(Self {
            id,
            timeout,
            backend: PhantomData,
        })
    }

    /// Averages over the replicas, in one all-reduce, the gradients of `module` and
    /// `values` (per-replica figures such as losses or counts). A parameter no replica
    /// has a gradient for stays without one (the optimiser skips it, as it would on one
    /// replica); one that only some replicas have (an expert that got no tokens on the
    /// others) is averaged with zeros.
    pub fn mean<AB, M>(
        &self,
        module: &M,
        mut grads: GradientsParams,
        values: Tensor<B, 1>,
    ) -> Result<(GradientsParams, Tensor<B, 1>)>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut flatten = Flatten::<AB> {
            grads: &mut grads,
            parts: Vec::new(),
            present: Vec::new(),
        };
        module.visit(&mut flatten);
        let Flatten { parts, present, .. } = flatten;
        let device = values.device();
        let lengths: Vec<usize> = parts.iter().map(|p| p.dims()[0]).collect();
        let present = Tensor::<B, 1>::from_floats(present.as_slice(), &device);
        let n_values = values.dims()[0];
        let mut all = parts;
        all.extend([present, values]);
        let flat = self.all_reduce(Tensor::cat(all, 0), ReduceOperation::Mean)?;

        let n_grads: usize = lengths.iter().sum();
        let n_params = lengths.len();
        let present = flat
            .clone()
            .slice(n_grads..n_grads + n_params)
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| anyhow!("reading the reduced gradients: {e:?}"))?;
        let values = flat
            .clone()
            .slice(n_grads + n_params..n_grads + n_params + n_values);
        let mut offsets = Vec::with_capacity(n_params);
        let mut offset = 0;
        for length in &lengths {
            offsets.push(offset..offset + length);
            offset += length;
        }
        module.visit(&mut Unflatten::<AB> {
            grads: &mut grads,
            flat,
            offsets: offsets.into_iter(),
            present: present.into_iter(),
        });
        Ok((grads, values))
    }

    /// `tensor` reduced element-wise over the replicas with `op`.
    pub fn all_reduce(&self, tensor: Tensor<B, 1>, op: ReduceOperation) -> Result<Tensor<B, 1>> {
        let (id, primitive) = (self.id, tensor.into_primitive().tensor());
        let reduced = within(self.timeout, "exchanging gradients", move || {
            collective::all_reduce::<B>(id, primitive, op)
        })?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(reduced)))
    }

    /// Leaves the collective.
    pub fn leave(&self) -> Result<()> {
        let id = self.id;
        within(self.timeout, "leaving the collective", move || {
            collective::finish_collective::<B>(id)
        })
    }
}

/// Forgets every peer and pending operation of the collective of `B`: peers waiting in
/// an all-reduce get an error. Called when a replica fails (so the others stop at once)
/// and before a new run in the same process.
pub fn reset<B: Backend>() {
    collective::reset_collective::<B>();
}

/// Runs the blocking collective call `call` on a helper thread and waits for it at most
/// `timeout`. A call still blocked then is abandoned: the peers it waits for are gone.
fn within<T: Send + 'static>(
    timeout: Duration,
    what: &str,
    call: impl FnOnce() -> Result<T, CollectiveError> + Send + 'static,
) -> Result<T> {
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || send.send(call()));
    match receive.recv_timeout(timeout) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => bail!("collective operation failed while {what}: {error:?}"),
        Err(_) => bail!(
            "no answer from the other replicas after {} s while {what}: a replica stopped or \
             never joined (checkpoints written so far are intact)",
            timeout.as_secs_f64()
        ),
    }
}

/// What a replica thread starts from: replica 0's state before its first step.
pub(crate) struct ReplicaStart<'a, B: MoeAutodiffBackend> {
    /// Replica 0's model (new, initialised or restored).
    pub model: &'a Transformer<B>,
    /// The run's config.
    pub config: &'a RunConfig,
    /// The run's training batches (every replica's sequences together).
    pub batches: &'a TrainWindows,
    /// The first step to train.
    pub step: usize,
    /// The checkpoint resumed, whose optimiser state every replica loads.
    pub resume_from: Option<&'a Path>,
}

/// This machine's replicas after the first, each training on its own thread, and the
/// first one's membership of the collective. Dropping it before [`Replicas::finish`] (the
/// first replica failed) wakes the others out of their all-reduce so they stop too.
pub(crate) struct Replicas<B: MoeAutodiffBackend> {
    /// The first replica's membership of the collective.
    pub peer: Peer<B::InnerBackend>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
    /// The first error of each replica that stopped, sent before it resets the collective.
    failures: mpsc::Receiver<String>,
}

impl<B: MoeAutodiffBackend> Replicas<B> {
    /// Starts this machine's `local` replicas but the first (local replica `r` on
    /// [`Cluster::device`]`(r)`) and joins the first on `devices[0]`.
    pub fn start(
        from: ReplicaStart<B>,
        cluster: &Cluster<B::Device>,
        local: usize,
    ) -> Result<Self> {
        let timeout = Duration::from_secs_f64(from.config.train.peer_timeout_secs);
        let first = cluster.first_rank(local);
        reset::<B::InnerBackend>();
        let (failed, failures) = mpsc::channel();
        let threads = (1..local)
            .map(|r| {
                let device = cluster.device(r).clone();
                let thread = ReplicaThread {
                    rank: first + r,
                    local,
                    nodes: cluster.nodes.clone(),
                    model: from.model.clone().fork(&device),
                    device,
                    config: from.config.clone(),
                    batches: from.batches.clone(),
                    start: from.step,
                    resume_from: from.resume_from.map(Path::to_path_buf),
                    timeout,
                };
                let failed = failed.clone();
                std::thread::spawn(move || thread.run_reporting(failed))
            })
            .collect();
        let peer = Peer::join(
            first,
            local,
            cluster.nodes.as_ref(),
            &cluster.devices[0],
            timeout,
        )?;
        Ok(Self {
            peer,
            threads,
            failures,
        })
    }

    /// `error` of replica 0, under the error of a replica that stopped before (replica
    /// 0's is then only its consequence).
    pub fn explain(&self, error: anyhow::Error) -> anyhow::Error {
        match self.failures.try_recv() {
            Ok(failure) => error.context(failure),
            Err(_) => error,
        }
    }

    /// Leaves the collective after the last step and waits for the other replicas.
    pub fn finish(mut self) -> Result<()> {
        let threads = std::mem::take(&mut self.threads);
        self.peer.leave()?;
        for (i, thread) in threads.into_iter().enumerate() {
            match thread.join() {
                Ok(result) => result.with_context(|| format!("replica {}", i + 1))?,
                Err(_) => bail!("replica {} panicked", i + 1),
            }
        }
        Ok(())
    }
}

impl<B: MoeAutodiffBackend> Drop for Replicas<B> {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            reset::<B::InnerBackend>();
        }
    }
}

/// One replica after the first of this machine, trained on its own thread.
struct ReplicaThread<B: MoeAutodiffBackend> {
    rank: usize,
    local: usize,
    nodes: Option<Nodes>,
    model: Transformer<B>,
    device: B::Device,
    config: RunConfig,
    batches: TrainWindows,
    start: usize,
    resume_from: Option<PathBuf>,
    timeout: Duration,
}

impl<B: MoeAutodiffBackend> ReplicaThread<B> {
    /// Runs the replica; if it fails, sends its error to `failed` and resets the
    /// collective so the other replicas stop too.
    fn run_reporting(self, failed: mpsc::Sender<String>) -> Result<()> {
        let rank = self.rank;
        let result = self.run();
        if let Err(error) = &result {
            failed
                .send(format!("replica {rank} stopped: {error:#}"))
                .ok();
            reset::<B::InnerBackend>();
        }
        result
    }

    /// Joins the collective and trains every step left, then leaves.
    fn run(self) -> Result<()> {
        let train = self.config.train;
        let mut optimizer = FusedAdamW::new(&train).init::<B>();
        if let Some(ckpt) = &self.resume_from {
            let record = recorder().load(ckpt.join(OPTIMIZER_FILE), &self.device)?;
            optimizer = optimizer.load_record(record);
        }
        let peer = Peer::join(
            self.rank,
            self.local,
            self.nodes.as_ref(),
            &self.device,
            self.timeout,
        )?;
        let shard = Shard {
            batches: self.batches,
            rank: self.rank,
            replicas: train.replicas,
        };
        let steps = self.start..train.steps;
        let mut learner = Learner {
            model: self.model,
            optimizer,
            shard,
            train,
            device: self.device,
        };
        for step in steps {
            // Only the main replica logs: this one reads no statistics.
            learner = learner.step(step, Some(&peer), None)?.0;
        }
        peer.leave()
    }
}

/// Takes every gradient of a module out of `grads` as a flat tensor, in the module's
/// order (the same on every replica), with zeros and a 0 in `present` where a trained
/// parameter has none. Parameters outside gradient training (the router's balancing
/// bias) are left out.
struct Flatten<'a, AB: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    parts: Vec<Tensor<AB::InnerBackend, 1>>,
    present: Vec<f32>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Flatten<'_, AB> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let grad = self.grads.remove::<AB::InnerBackend, D>(param.id);
        self.present.push(if grad.is_some() { 1.0 } else { 0.0 });
        let grad = grad.unwrap_or_else(|| value.inner().zeros_like());
        self.parts.push(grad.flatten(0, D - 1));
    }
}

/// Puts the reduced flat gradients back, in the order [`Flatten`] took them.
struct Unflatten<'a, AB: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: Tensor<AB::InnerBackend, 1>,
    offsets: std::vec::IntoIter<Range<usize>>,
    present: std::vec::IntoIter<f32>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Unflatten<'_, AB> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let (Some(range), Some(present)) = (self.offsets.next(), self.present.next()) else {
            return;
        };
        if present > 0.0 {
            let grad = self.flat.clone().slice(range).reshape(value.shape());
            self.grads.register::<AB::InnerBackend, D>(param.id, grad);
        }
    }
}
