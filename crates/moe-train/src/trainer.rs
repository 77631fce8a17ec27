//! The training loop: AdamW with warm-up + cosine LR, global-norm clipping, gradient
//! accumulation, aux-loss-free bias updates, logging, evaluation and resumable checkpoints.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use burn::data::dataloader::batcher::Batcher;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::Recorder;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use moe_data::{EvalWindows, LmBatch, LmBatcher, TrainWindows};
use moe_model::transformer::MoeOutputs;
use moe_model::{MoeAutodiffBackend, Transformer};

use crate::checkpoint::{
    self, CONFIG_FILE, OPTIMIZER_FILE, TOKENIZER_FILE, TrainingState, list_checkpoints, load_state,
    load_tokenizer, load_weights, recorder, resolve_checkpoint, save_checkpoint,
};
use crate::config::{RunConfig, TrainConfig};
use crate::data::{RunData, with_absolute_data_paths};
use crate::data_parallel;
use crate::data_parallel::{Cluster, Peer};
use crate::eval::{EvalResult, evaluate};
use crate::grad_clip::clip_global_norm;
use crate::logger::{MetricRecord, MetricsLogger, TrainRecord};
use crate::model_tensors::{load_model_tensors, model_tensors};
use crate::optimizer::FusedAdamW;
use crate::router_stats::RouterStatsAccumulator;
use crate::schedule::learning_rate;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Optimiser steps completed.
    pub steps: usize,
    /// The last validation result.
    pub final_eval: EvalResult,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
    /// Training seconds of this invocation (evaluation and checkpoints included).
    pub elapsed_secs: f64,
    /// Mean training tokens/s of this invocation (evaluation excluded).
    pub tokens_per_sec: f64,
}

/// Training stopped because the loss became NaN or infinite (the checkpoints before it
/// are intact).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diverged {
    /// The step whose loss was not finite.
    pub step: usize,
    /// That loss.
    pub loss: f64,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "training diverged at step {}: loss is {}",
            self.step, self.loss
        )
    }
}

impl std::error::Error for Diverged {}

/// Trains per `config` in `run_dir`. With `resume`, continues from the run's newest
/// checkpoint (model, optimiser state, step; the LR schedule and data order are functions
/// of the step); without it, refuses a directory that already holds checkpoints. A new
/// run with `init` starts from that checkpoint's weights and tokenizer (fine-tuning,
/// training an imported or upcycled model) with a fresh optimiser and step count.
/// With `train.replicas` > 1 the run is data parallel over the devices (and machines)
/// of `cluster`: this machine's first replica trains on this thread and is the only one
/// here that logs, evaluates and writes checkpoints; its other replicas run on threads.
/// `progress` receives one human-readable line per log interval and evaluation.
pub fn train<B: MoeAutodiffBackend>(
    config: &RunConfig,
    run_dir: &Path,
    resume: bool,
    init: Option<&Path>,
    cluster: &Cluster<B::Device>,
    mut progress: impl FnMut(&str),
) -> Result<TrainOutcome> {
    // Saved configs name their data by absolute paths.
    let config = &with_absolute_data_paths(config)?;
    let Some(device) = cluster.devices.first() else {
        bail!("no device to train on");
    };
    let (replicas, nodes) = (config.train.replicas, cluster.node_count());
    if let Some(n) = &cluster.nodes {
        ensure!(
            n.rank < n.count,
            "node rank {} is not below the node count {}",
            n.rank,
            n.count
        );
    }
    ensure!(
        replicas.is_multiple_of(nodes),
        "train.replicas ({replicas}) must be a multiple of the node count ({nodes})"
    );
    let local = replicas / nodes;
    let expert_devices = config.train.expert_devices;
    ensure!(
        cluster.devices.len() <= local.max(expert_devices),
        "{} devices given for {local} replicas on this machine (train.replicas {replicas} over {nodes} nodes) and train.expert_devices {expert_devices}",
        cluster.devices.len(),
    );
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let existing = list_checkpoints(run_dir)?;
    let resume_from = match (resume, existing.last()) {
        (true, Some(last)) => Some(last.clone()),
        (true, None) => {
            progress(&format!(
                "no checkpoint in {} yet: starting a new run",
                run_dir.display()
            ));
            None
        }
        (false, Some(last)) => bail!(
            "{} already holds a run (latest checkpoint {}); pass --resume to continue it, or --out for a new run",
            run_dir.display(),
            last.display()
        ),
        (false, None) => None,
    };
    if let Some(ckpt) = &resume_from {
        check_resumable(config, &ckpt.join(CONFIG_FILE))?;
    }

    // A new run from `init` starts from its weights, so it keeps its tokenizer too.
    let init = match (&resume_from, init) {
        (None, Some(init)) => Some(resolve_checkpoint(init)?),
        _ => None,
    };
    let model_tokenizer = match resume_from.as_ref().or(init.as_ref()) {
        Some(ckpt) => Some(load_tokenizer(ckpt)?),
        None => None,
    };
    let data = RunData::open(config, model_tokenizer.as_ref(), &mut progress)?;
    let tokenizer = data.tokenizer().clone();
    std::fs::write(run_dir.join(CONFIG_FILE), config.to_toml()?)?;
    tokenizer.save(&run_dir.join(TOKENIZER_FILE))?;
    let (seq_len, batch_size) = (config.data.seq_len, config.train.batch_size);
    // One batch holds every replica's sequences of a micro-batch.
    let step_batch = batch_size * config.train.replicas;
    let batches = data.train_windows(config, step_batch)?;
    for line in data.describe() {
        progress(&line);
    }
    if data.sets.len() > 1 {
        let batches_in_run = config.train.steps * config.train.grad_accum;
        let shares: Vec<String> = batches
            .proportions(batches_in_run)
            .iter()
            .zip(&data.sets)
            .map(|(share, set)| format!("{} {:.3}", set.dir.display(), share))
            .collect();
        progress(&format!(
            "mixture: share of the run's {} training sequences: {}",
            batches_in_run * step_batch,
            shares.join(", ")
        ));
    }
    let eval_windows = data.eval_windows(config);

    B::seed(device, config.train.seed);
    let mut model = Transformer::<B>::new(&config.model, &config.moe, device)?;
    model.visit(&mut DrawWeights);
    if let Some(init) = &init {
        model = initial_weights(model, config, init, device)?;
        progress(&format!("initialised from {}", init.display()));
    }
    let train = &config.train;
    let mut optimizer = FusedAdamW::new(train).init::<B>();
    let mut state = TrainingState {
        step: 0,
        elapsed_secs: 0.0,
    };
    if let Some(ckpt) = &resume_from {
        model = model
            .load_file(ckpt.join(checkpoint::MODEL_FILE), &recorder(), device)
            .with_context(|| format!("loading model from {}", ckpt.display()))?;
        let record = recorder()
            .load(ckpt.join(OPTIMIZER_FILE), device)
            .with_context(|| format!("loading optimizer state from {}", ckpt.display()))?;
        optimizer = optimizer.load_record(record);
        state = load_state(ckpt)?;
        progress(&format!(
            "resumed from {} (step {})",
            ckpt.display(),
            state.step
        ));
    }
    if expert_devices > 1 {
        let placement: Vec<B::Device> = (0..expert_devices)
            .map(|s| cluster.device(s).clone())
            .collect();
        model = model.place_experts(&placement);
        progress(&format!(
            "experts placed over {expert_devices} devices (expert e on device e mod {expert_devices})"
        ));
    }
    let mut logger = MetricsLogger::open(run_dir, resume_from.as_ref().map(|_| state.step))?;
    let started = Instant::now();
    let elapsed_before = state.elapsed_secs;
    let mut interval = Interval::new();
    let mut train_secs = 0.0;
    let mut trained_tokens = 0usize;
    let mut last_eval = None;
    let mut last_checkpoint = resume_from.clone();
    // Periodic passes score the same fixed windows; the final one also the whole split.
    let run_eval = |model: &Transformer<B>, windows: &EvalWindows| {
        evaluate(&model.valid(), windows, batch_size, None, device)
    };
    let full_eval = |model: &Transformer<B>| run_eval(model, &data.full_eval_windows(seq_len));
    let write_checkpoint = |model: &Transformer<B>, record, state| {
        save_checkpoint::<B, _, _>(
            run_dir,
            model,
            record,
            config,
            &tokenizer,
            state,
            train.keep_checkpoints,
        )
    };

    // Every step's all-reduce keeps the replicas in step: the others wait there while
    // this one evaluates or saves.
    let replicas = if train.replicas > 1 {
        let start = ReplicaStart {
            model: &model,
            config,
            batches: &batches,
            step: state.step,
            resume_from: resume_from.as_deref(),
        };
        Some(Replicas::<B>::start(start, cluster, local)?)
    } else {
        None
    };
    let peer = replicas.as_ref().map(|r| &r.peer);

    for step in state.step..train.steps {
        let step_start = Instant::now();
        let lr = learning_rate(train, step);
        let shard = Shard {
            batches: &batches,
            rank: cluster.first_rank(local),
            replicas: train.replicas,
        };
        let grad_norm;
        (model, grad_norm) = match train_step(
            model,
            &mut optimizer,
            train,
            step,
            shard,
            peer,
            Some(&mut interval),
            device,
        ) {
            Ok(out) => out,
            Err(error) => {
                let error = match &replicas {
                    Some(replicas) => replicas.explain(error),
                    None => error,
                };
                if let Some(diverged) = error.downcast_ref::<Diverged>() {
                    logger.log(&MetricRecord::Diverged {
                        step: diverged.step,
                    })?;
                }
                return Err(error);
            }
        };
        state.step = step + 1;
        let step_secs = step_start.elapsed().as_secs_f64();
        train_secs += step_secs;
        trained_tokens += config.tokens_per_step();
        interval.secs += step_secs;
        interval.tokens += config.tokens_per_step();
        state.elapsed_secs = elapsed_before + started.elapsed().as_secs_f64();

        if state.step.is_multiple_of(train.log_every) || state.step == train.steps {
            let record = interval.finish(
                state.step,
                lr,
                grad_norm.into_scalar().elem::<f64>(),
                state.elapsed_secs,
            );
            progress(&train_line(&record, train.steps));
            logger.log(&MetricRecord::Train(record))?;
        }
        let last = state.step == train.steps;
        if state.step.is_multiple_of(train.eval_every) || last {
            let result = run_eval(&model, &eval_windows)?;
            progress(&eval_line(state.step, &result, false));
            logger.log(&MetricRecord::Eval {
                step: state.step,
                full: false,
                result: result.clone(),
            })?;
            last_eval = Some(result);
        }
        if last {
            let result = full_eval(&model)?;
            progress(&eval_line(state.step, &result, true));
            logger.log(&MetricRecord::Eval {
                step: state.step,
                full: true,
                result: result.clone(),
            })?;
            last_eval = Some(result);
        }
        if state.step.is_multiple_of(train.checkpoint_every) || last {
            state.elapsed_secs = elapsed_before + started.elapsed().as_secs_f64();
            last_checkpoint = Some(write_checkpoint(&model, optimizer.to_record(), state)?);
        }
    }

    if let Some(replicas) = replicas {
        replicas.finish()?;
    }
    // The loop ends with an evaluation and a checkpoint; these run only when it had
    // nothing left to do (resuming a finished run).
    let final_eval = match last_eval {
        Some(result) => result,
        None => full_eval(&model)?,
    };
    let checkpoint = match last_checkpoint {
        Some(dir) => dir,
        None => write_checkpoint(&model, optimizer.to_record(), state)?,
    };
    Ok(TrainOutcome {
        steps: state.step,
        final_eval,
        checkpoint,
        elapsed_secs: started.elapsed().as_secs_f64(),
        tokens_per_sec: trained_tokens as f64 / train_secs.max(1e-9),
    })
}

/// `model` with the weights of the checkpoint `init`, whose `[model]` section must equal
/// the run's (`[moe]` may differ where the parameter shapes allow, e.g. the losses).
fn initial_weights<B: Backend>(
    model: Transformer<B>,
    config: &RunConfig,
    init: &Path,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let (source, source_config, _) = load_weights::<B>(init, device)?;
    ensure!(
        source_config.model == config.model,
        "cannot initialise from {}: its [model] section differs from the run's; leave out \
         --config to train with the checkpoint's own config, and change [moe], [data] or \
         [train] with --set",
        init.display()
    );
    load_model_tensors(model, model_tensors(&source)?)
        .with_context(|| format!("initialising from {}", init.display()))
}

/// Draws every lazily initialised parameter of a module now, in module order, so a new
/// model's weights depend on the seed alone and clones of it (the replicas) share them
/// (burn draws a lazy parameter at its first use, separately in each clone).
struct DrawWeights;

impl<B: Backend> ModuleVisitor<B> for DrawWeights {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        param.val();
    }
}

/// The micro-batches of one replica: its share of every micro-batch of the step.
#[derive(Clone, Copy)]
struct Shard<'a> {
    batches: &'a TrainWindows,
    rank: usize,
    replicas: usize,
}

impl Shard<'_> {
    /// This replica's sequences of micro-batch `micro` of `step`.
    fn micro_batch(&self, step: usize, grad_accum: usize, micro: usize) -> Vec<Vec<u32>> {
        let mut items = self.batches.batch(step * grad_accum + micro);
        let per_replica = items.len() / self.replicas;
        items.truncate((self.rank + 1) * per_replica);
        items.split_off(self.rank * per_replica)
    }
}

/// One optimiser step of a replica: forward and backward over its micro-batches, the
/// gradients averaged over the replicas (with `peer`), clipping, AdamW and bias
/// balancing (on the replicas' summed expert counts). Adds the step's losses (averaged
/// over the replicas) and this replica's routing statistics to `interval`, if it logs
/// (the other replicas read none of them back). Returns the updated model and the
/// gradient norm before clipping; a loss that is not finite on any replica is a
/// [`Diverged`] error on all of them.
#[allow(clippy::too_many_arguments)]
fn train_step<B: MoeAutodiffBackend, O: Optimizer<Transformer<B>, B>>(
    model: Transformer<B>,
    optimizer: &mut O,
    train: &TrainConfig,
    step: usize,
    shard: Shard,
    peer: Option<&Peer<B::InnerBackend>>,
    mut interval: Option<&mut Interval>,
    device: &B::Device,
) -> Result<(Transformer<B>, Tensor<B::InnerBackend, 1>)> {
    B::seed(device, train.seed.wrapping_add(step as u64 + 1));
    let mut accumulator = GradientsAccumulator::<Transformer<B>>::new();
    let mut step_counts: Vec<Tensor<B::InnerBackend, 1>> = Vec::new();
    let mut losses = Tensor::<B::InnerBackend, 1>::zeros([2], device);
    for micro in 0..train.grad_accum {
        let items = shard.micro_batch(step, train.grad_accum, micro);
        let batch: LmBatch<B> = LmBatcher.batch(items, device);
        let out = forward_backward(&model, batch, 1.0 / train.grad_accum as f64, device);
        accumulator.accumulate(&model, out.grads);
        losses = losses + Tensor::cat(vec![out.ce.inner(), out.router.inner()], 0);
        for (i, layer) in out.moe.iter().enumerate() {
            let counts = layer.stats.counts.clone().inner().float();
            match step_counts.get_mut(i) {
                Some(c) => *c = c.clone() + counts,
                None => step_counts.push(counts),
            }
        }
        if let Some(interval) = interval.as_deref_mut() {
            for layer in &out.moe {
                interval.balance += layer.balance_loss.clone().into_scalar().elem::<f64>();
                interval.z += layer.z_loss.clone().into_scalar().elem::<f64>();
            }
            interval.stats.add(&out.moe);
            interval.micro_batches += 1;
        }
    }
    let mut grads = accumulator.grads();
    if let Some(peer) = peer {
        // One all-reduce per step: gradients, losses and expert counts together.
        let layers = step_counts.len();
        let mut values = vec![losses];
        values.extend(step_counts);
        let values = Tensor::cat(values, 0);
        let (mean_grads, mean_values) = peer.mean(&model, grads, values)?;
        grads = mean_grads;
        losses = mean_values.clone().slice(0..2);
        let sums = mean_values
            .slice(2..)
            .mul_scalar(shard.replicas as f64)
            .round();
        step_counts = match layers {
            0 => Vec::new(),
            _ => sums.chunk(layers, 0),
        };
    }
    let losses = losses.into_data().to_vec::<f32>().unwrap_or_default();
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
    let grad_norm = clip_global_norm(&model, &mut grads, train.grad_clip, device);
    let lr = learning_rate(train, step);
    let model = optimizer.step(lr, model, grads);
    let step_counts = step_counts
        .into_iter()
        .map(|counts| Tensor::from_inner(counts.int()))
        .collect();
    Ok((model.update_expert_bias(step_counts), grad_norm))
}

/// What a replica thread starts from: replica 0's state before its first step.
struct ReplicaStart<'a, B: MoeAutodiffBackend> {
    model: &'a Transformer<B>,
    config: &'a RunConfig,
    batches: &'a TrainWindows,
    step: usize,
    resume_from: Option<&'a Path>,
}

/// This machine's replicas after the first, each training on its own thread, and the
/// first one's membership of the collective. Dropping it before [`Replicas::finish`] (the
/// first replica failed) wakes the others out of their all-reduce so they stop too.
struct Replicas<B: MoeAutodiffBackend> {
    peer: Peer<B::InnerBackend>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
    /// The first error of each replica that stopped, sent before it resets the collective.
    failures: mpsc::Receiver<String>,
}

impl<B: MoeAutodiffBackend> Replicas<B> {
    /// Starts this machine's `local` replicas but the first (local replica `r` on
    /// [`Cluster::device`]`(r)`) and joins the first on `devices[0]`.
    fn start(from: ReplicaStart<B>, cluster: &Cluster<B::Device>, local: usize) -> Result<Self> {
        let replicas = from.config.train.replicas;
        let timeout = Duration::from_secs_f64(from.config.train.peer_timeout_secs);
        let (devices, nodes, first) = (&cluster.devices, &cluster.nodes, cluster.first_rank(local));
        data_parallel::reset::<B::InnerBackend>();
        let (failed, failures) = mpsc::channel();
        let threads = (1..local)
            .map(|r| {
                let rank = first + r;
                let device = cluster.device(r).clone();
                let nodes = nodes.clone();
                let model = from.model.clone().fork(&device);
                let (config, batches) = (from.config.clone(), from.batches.clone());
                let (start, resume_from) = (from.step, from.resume_from.map(Path::to_path_buf));
                let failed = failed.clone();
                std::thread::spawn(move || {
                    let run = || -> Result<()> {
                        let train = &config.train;
                        let mut optimizer = FusedAdamW::new(train).init::<B>();
                        if let Some(ckpt) = &resume_from {
                            let record = recorder().load(ckpt.join(OPTIMIZER_FILE), &device)?;
                            optimizer = optimizer.load_record(record);
                        }
                        let peer = Peer::join(rank, local, nodes.as_ref(), &device, timeout)?;
                        let shard = Shard {
                            batches: &batches,
                            rank,
                            replicas,
                        };
                        let mut model = model;
                        for step in start..train.steps {
                            // Only the main replica logs: this one reads no statistics.
                            let stepped = train_step(
                                model,
                                &mut optimizer,
                                train,
                                step,
                                shard,
                                Some(&peer),
                                None,
                                &device,
                            )?;
                            model = stepped.0;
                        }
                        peer.leave()
                    };
                    let result = run();
                    if let Err(error) = &result {
                        failed
                            .send(format!("replica {rank} stopped: {error:#}"))
                            .ok();
                        data_parallel::reset::<B::InnerBackend>();
                    }
                    result
                })
            })
            .collect();
        let peer = Peer::join(first, local, nodes.as_ref(), &devices[0], timeout)?;
        Ok(Self {
            peer,
            threads,
            failures,
        })
    }

    /// `error` of replica 0, under the error of a replica that stopped before (replica
    /// 0's is then only its consequence).
    fn explain(&self, error: anyhow::Error) -> anyhow::Error {
        match self.failures.try_recv() {
            Ok(failure) => error.context(failure),
            Err(_) => error,
        }
    }

    /// Leaves the collective after the last step and waits for the other replicas.
    fn finish(mut self) -> Result<()> {
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
            data_parallel::reset::<B::InnerBackend>();
        }
    }
}

/// One micro-batch's forward pass and gradients.
pub struct MicroStep<B: MoeAutodiffBackend> {
    /// Gradients of `scale * (cross-entropy + router losses)`.
    pub grads: GradientsParams,
    /// Mean cross-entropy (nats per token), unscaled.
    pub ce: Tensor<B, 1>,
    /// The weighted router losses (balancing and z-loss), unscaled.
    pub router: Tensor<B, 1>,
    /// Each MoE layer's routing outputs (losses, statistics).
    pub moe: MoeOutputs<B>,
}

/// Runs `batch` forward and backward; `scale` weighs its loss (1 / micro-batches per
/// step, so accumulated gradients are those of the whole step's mean loss).
pub fn forward_backward<B: MoeAutodiffBackend>(
    model: &Transformer<B>,
    batch: LmBatch<B>,
    scale: f64,
    device: &B::Device,
) -> MicroStep<B> {
    let (nll, moe) = model.token_nll(batch.inputs, batch.targets);
    let ce = nll.mean();
    let router = model.router_loss(&moe, device);
    let loss = (ce.clone() + router.clone()) * scale;
    MicroStep {
        grads: GradientsParams::from_grads(loss.backward(), model),
        ce,
        router,
        moe,
    }
}

/// A resumed run must use the checkpoint's model, MoE, data and optimiser settings; only
/// the step budget and the logging/eval/checkpoint intervals may change.
fn check_resumable(config: &RunConfig, saved: &Path) -> Result<()> {
    let saved = RunConfig::parse_saved(saved)?;
    let comparable = |c: &RunConfig| {
        let mut c = c.clone();
        c.train.steps = 0;
        c.train.log_every = 0;
        c.train.eval_every = 0;
        c.train.eval_batches = None;
        c.train.eval_tokens = None;
        c.train.checkpoint_every = 0;
        c.train.keep_checkpoints = 0;
        c.train.peer_timeout_secs = 0.0;
        c
    };
    let (a, b) = (comparable(config), comparable(&saved));
    for (section, differs) in [
        ("model", a.model != b.model),
        ("moe", a.moe != b.moe),
        ("data", a.data != b.data),
        ("train", a.train != b.train),
    ] {
        if differs {
            bail!(
                "cannot resume: [{section}] differs from the run's saved config; use the same config (only train.steps and the log/eval/checkpoint intervals may change) or a new --out"
            );
        }
    }
    Ok(())
}

/// Sums over the current logging interval.
struct Interval {
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
    fn new() -> Self {
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

    /// The record of the interval ending at `step`; starts the next interval.
    fn finish(&mut self, step: usize, lr: f64, grad_norm: f64, elapsed_secs: f64) -> TrainRecord {
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

fn eval_line(step: usize, result: &EvalResult, full: bool) -> String {
    format!(
        "eval step {step:>6}{} | val_loss {:.4} | bpb {:.4} | ppl {:.2}",
        if full { " (whole split)" } else { "" },
        result.val_loss,
        result.bpb,
        result.perplexity
    )
}

fn train_line(r: &TrainRecord, total_steps: usize) -> String {
    let mut line = format!(
        "step {:>6}/{total_steps} | loss {:.4} | aux {:.4} | lr {:.2e} | gnorm {:.2} | {:.0} tok/s",
        r.step, r.loss, r.aux_loss, r.lr, r.grad_norm, r.tokens_per_sec
    );
    if !r.layers.is_empty() {
        let n = r.layers.len() as f64;
        let mean =
            |f: fn(&crate::metrics::LayerLoad) -> f64| r.layers.iter().map(f).sum::<f64>() / n;
        line += &format!(
            " | load cv {:.3} | drop {:.2}% | entropy {:.3}",
            mean(|l| l.cv),
            100.0 * mean(|l| l.dropped),
            mean(|l| l.entropy)
        );
    }
    line + &format!(" | {:.0}s", r.elapsed_secs)
}
