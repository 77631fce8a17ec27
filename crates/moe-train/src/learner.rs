//! One replica's optimiser step: forward and backward over its share of each
//! micro-batch, gradient accumulation, the all-reduce with the other replicas, global-norm
//! clipping, AdamW and aux-loss-free bias updates; and the sums a logging interval keeps.

use anyhow::{Result, anyhow};
use burn::data::dataloader::batcher::Batcher;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use moe_data::{LmBatch, LmBatcher, TrainWindows, Window};
use moe_model::MoeOutputs;
use moe_model::{MoeAutodiffBackend, Transformer};

use crate::config::TrainConfig;
use crate::data_parallel::Peer;
use crate::grad_clip::clip_global_norm;
use crate::logger::TrainRecord;
use crate::optimizer::FusedAdamW;
use crate::router_stats::RouterStatsAccumulator;
use crate::schedule::learning_rate;
use crate::trainer::Diverged;

/// The optimiser every replica trains with.
pub(crate) type AdamW<B> = OptimizerAdaptor<FusedAdamW, Transformer<B>, B>;

/// The micro-batches of one replica: its share of every micro-batch of the step.
#[derive(Clone)]
pub(crate) struct Shard {
    /// The batches of the whole run, every replica's sequences together.
    pub batches: TrainWindows,
    /// This replica's global rank.
    pub rank: usize,
    /// Replicas in the run.
    pub replicas: usize,
}

impl Shard {
    /// This replica's sequences of micro-batch `micro` of `step`.
    fn micro_batch(&self, step: usize, grad_accum: usize, micro: usize) -> Vec<Window> {
        let mut items = self.batches.batch(step * grad_accum + micro);
        let per_replica = items.len() / self.replicas;
        items.truncate((self.rank + 1) * per_replica);
        items.split_off(self.rank * per_replica)
    }
}

/// One replica's training state: its model and optimiser, the share of each step's batch
/// it trains on, and the device it trains on.
pub(crate) struct Learner<B: MoeAutodiffBackend> {
    /// The model, passed through each step (burn's optimiser consumes and returns it).
    pub model: Transformer<B>,
    /// AdamW's state.
    pub optimizer: AdamW<B>,
    /// Which sequences of each micro-batch this replica trains on.
    pub shard: Shard,
    /// The run's `[train]` settings: seed, accumulation, clipping, schedule.
    pub train: TrainConfig,
    /// Where the model lives and the step computes.
    pub device: B::Device,
}

/// A step's sums over its micro-batches: gradients, losses (cross-entropy and router) and
/// each MoE layer's expert counts.
struct StepSums<B: Backend> {
    grads: GradientsParams,
    losses: Tensor<B, 1>,
    counts: Vec<Tensor<B, 1>>,
}

impl<B: MoeAutodiffBackend> Learner<B> {
    /// One optimiser step: forward and backward over the replica's micro-batches, the
    /// gradients averaged over the replicas (with `peer`), clipping, AdamW and bias
    /// balancing (on the replicas' summed expert counts). Adds the step's losses
    /// (averaged over the replicas) and this replica's routing statistics to `interval`,
    /// if it logs (the other replicas read none of them back). Returns the stepped
    /// learner and the gradient norm before clipping; a loss that is not finite on any
    /// replica is a [`Diverged`] error on all of them.
    pub(crate) fn step(
        mut self,
        step: usize,
        peer: Option<&Peer<B::InnerBackend>>,
        mut interval: Option<&mut Interval>,
    ) -> Result<(Self, Tensor<B::InnerBackend, 1>)> {
        B::seed(&self.device, self.train.seed.wrapping_add(step as u64 + 1));
        let mut sums = self.accumulate(step, interval.as_deref_mut());
        if let Some(peer) = peer {
            sums = self.mean_over_replicas(sums, peer)?;
        }
        let losses = (sums.losses.into_data().to_vec::<f32>())
            .map_err(|e| anyhow!("reading the step's losses: {e:?}"))?;
        let (ce, router) = (f64::from(losses[0]), f64::from(losses[1]));
        if !ce.is_finite() {
            return Err(Diverged {
                step: step + 1,
                loss: ce,
            }
            .into());
        }
        if let Some(interval) = interval {
            interval.loss += ce;
            interval.aux += router;
        }
        let mut grads = sums.grads;
        let grad_norm =
            clip_global_norm(&self.model, &mut grads, self.train.grad_clip, &self.device);
        let lr = learning_rate(&self.train, step);
        let model = self.optimizer.step(lr, self.model, grads);
        let counts = sums
            .counts
            .into_iter()
            .map(|counts| Tensor::from_inner(counts.int()))
            .collect();
        self.model = model.update_expert_bias(counts);
        Ok((self, grad_norm))
    }

    /// Forward and backward over the step's micro-batches: the accumulated gradients and
    /// the summed losses and expert counts; routing statistics go to `interval`.
    fn accumulate(
        &self,
        step: usize,
        mut interval: Option<&mut Interval>,
    ) -> StepSums<B::InnerBackend> {
        let (grad_accum, device) = (self.train.grad_accum, &self.device);
        let mut accumulator = GradientsAccumulator::<Transformer<B>>::new();
        let mut counts: Vec<Tensor<B::InnerBackend, 1>> = Vec::new();
        let mut losses = Tensor::<B::InnerBackend, 1>::zeros([2], device);
        let micro_batches: Vec<Vec<Window>> = (0..grad_accum)
            .map(|micro| self.shard.micro_batch(step, grad_accum, micro))
            .collect();
        // Masked (chat) data: the loss is the mean over the step's scored tokens, so each
        // micro-batch's weights are divided by the mean scored tokens per micro-batch.
        let scored: u64 = micro_batches
            .iter()
            .flatten()
            .filter_map(|w| w.mask.as_ref())
            .map(|mask| u64::from(mask[1..].iter().sum::<u32>()))
            .sum();
        let per_micro = (scored as f64 / grad_accum as f64).max(1.0);
        for items in micro_batches {
            let mut batch: LmBatch<B> = LmBatcher.batch(items, device);
            batch.mask = batch.mask.map(|mask| mask.div_scalar(per_micro));
            let out = forward_backward(&self.model, batch, 1.0 / grad_accum as f64, device);
            accumulator.accumulate(&self.model, out.grads);
            losses = losses + Tensor::cat(vec![out.ce.inner(), out.router.inner()], 0);
            for (i, layer) in out.moe.iter().enumerate() {
                let layer_counts = layer.stats.counts.clone().inner().float();
                match counts.get_mut(i) {
                    Some(c) => *c = c.clone() + layer_counts,
                    None => counts.push(layer_counts),
                }
            }
            if let Some(interval) = interval.as_deref_mut() {
                interval.add(&out.moe);
            }
        }
        StepSums {
            grads: accumulator.grads(),
            losses,
            counts,
        }
    }

    /// `sums` averaged over the replicas in one all-reduce (gradients, losses and expert
    /// counts together); the counts come back as the replicas' sums.
    fn mean_over_replicas(
        &self,
        sums: StepSums<B::InnerBackend>,
        peer: &Peer<B::InnerBackend>,
    ) -> Result<StepSums<B::InnerBackend>> {
        let layers = sums.counts.len();
        let mut values = vec![sums.losses];
        values.extend(sums.counts);
        let values = Tensor::cat(values, 0);
        let (grads, mean_values) = peer.mean(&self.model, sums.grads, values)?;
        let losses = mean_values.clone().slice(0..2);
        let count_sums = mean_values
            .slice(2..)
            .mul_scalar(self.shard.replicas as f64)
            .round();
        let counts = match layers {
            0 => Vec::new(),
            _ => count_sums.chunk(layers, 0),
        };
        Ok(StepSums {
            grads,
            losses,
            counts,
        })
    }
}

/// One micro-batch's forward pass and gradients.
pub struct MicroStep<B: MoeAutodiffBackend> {
    /// Gradients of `scale * (cross-entropy + router losses)`.
    pub grads: GradientsParams,
    /// Cross-entropy, unscaled: the mean over the tokens, or with a mask the weighted sum.
    pub ce: Tensor<B, 1>,
    /// The weighted router losses (balancing and z-loss), unscaled.
    pub router: Tensor<B, 1>,
    /// Each MoE layer's routing outputs (losses, statistics).
    pub moe: MoeOutputs<B>,
}

/// Runs `batch` forward and backward; `scale` weighs its loss (1 / micro-batches per
/// step, so accumulated gradients are those of the whole step's mean loss). A batch with
/// a mask has the weighted sum of its token losses as cross-entropy: its weights are the
/// mask already divided by the tokens a micro-batch scores on average.
pub fn forward_backward<B: MoeAutodiffBackend>(
    model: &Transformer<B>,
    batch: LmBatch<B>,
    scale: f64,
    device: &B::Device,
) -> MicroStep<B> {
    let (nll, moe) = model.token_nll(batch.inputs, batch.targets);
    let ce = match batch.mask {
        None => nll.mean(),
        Some(weights) => (nll * weights.flatten(0, 1)).sum(),
    };
    let router = model.router_loss(&moe, device);
    let loss = (ce.clone() + router.clone()) * scale;
    MicroStep {
        grads: GradientsParams::from_grads(loss.backward(), model),
        ce,
        router,
        moe,
    }
}

/// Sums over the current logging interval.
pub(crate) struct Interval {
    loss: f64,
    aux: f64,
    balance: f64,
    z: f64,
    micro_batches: usize,
    tokens: usize,
    secs: f64,
    stats: RouterStatsAccumulator,
}

impl Interval {
    pub(crate) fn new() -> Self {
        Self {
            loss: 0.0,
            aux: 0.0,
            balance: 0.0,
            z: 0.0,
            micro_batches: 0,
            tokens: 0,
            secs: 0.0,
            stats: RouterStatsAccumulator::default(),
        }
    }

    /// Adds a step's training seconds and tokens.
    pub(crate) fn add_step_time(&mut self, secs: f64, tokens: usize) {
        self.secs += secs;
        self.tokens += tokens;
    }

    /// Adds one micro-batch's router losses and routing statistics.
    fn add<B: Backend>(&mut self, moe: &MoeOutputs<B>) {
        for layer in moe {
            self.balance += layer.balance_loss.clone().into_scalar().elem::<f64>();
            self.z += layer.z_loss.clone().into_scalar().elem::<f64>();
        }
        self.stats.add(moe);
        self.micro_batches += 1;
    }

    /// The record of the interval ending at `step`; starts the next interval.
    pub(crate) fn finish(
        &mut self,
        step: usize,
        lr: f64,
        grad_norm: f64,
        elapsed_secs: f64,
    ) -> TrainRecord {
        let n = self.micro_batches.max(1) as f64;
        let record = TrainRecord {
            step,
            loss: self.loss / n,
            aux_loss: self.aux / n,
            balance_loss: self.balance / n,
            z_loss: self.z / n,
            lr,
            grad_norm,
            tokens_per_sec: self.tokens as f64 / self.secs.max(1e-9),
            elapsed_secs,
            layers: self.stats.take(),
        };
        *self = Self::new();
        record
    }
}
