//! The training loop: setup (resume or init, data, model, optimiser, replicas), one
//! [`crate::learner`] step after another with warm-up + cosine LR, and after each step the
//! logging, evaluation and resumable checkpoints that are due.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::Optimizer;
use burn::record::Recorder;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use moe_data::{EvalWindows, TrainWindows};
use moe_model::{MoeAutodiffBackend, Transformer};

use crate::checkpoint::{
    self, CONFIG_FILE, OPTIMIZER_FILE, TOKENIZER_FILE, TrainingState, list_checkpoints, load_state,
    load_tokenizer, load_weights, recorder, resolve_checkpoint, save_checkpoint,
};
use crate::config::RunConfig;
use crate::data::{RunData, with_absolute_data_paths};
use crate::data_parallel::{Cluster, ReplicaStart, Replicas};
use crate::eval::{EvalResult, evaluate};
use crate::integrity::{NonFinite, check_finite, verify_checkpoint};
use crate::learner::{AdamW, Interval, Learner, Shard};
use crate::logger::{MetricRecord, MetricsLogger, TrainRecord};
use crate::model_tensors::{grow_vocabulary, load_model_tensors, model_tensors};
use crate::optimizer::FusedAdamW;
use crate::run_lock::RunLock;
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
    let start = RunStart {
        // Saved configs name their data by absolute paths.
        config: with_absolute_data_paths(config)?,
        run_dir,
        resume,
        init,
        cluster,
    };
    let lock = RunLock::acquire(run_dir)?;
    let mut run = match Run::<B>::start(start, &mut progress) {
        Ok(run) => run,
        Err(error) => {
            lock.remove_if_created();
            return Err(error);
        }
    };
    while !run.is_done() {
        run = run.step()?;
    }
    run.finish()
}

/// What [`train`] was asked to do, before anything is opened.
struct RunStart<'a, D> {
    config: RunConfig,
    run_dir: &'a Path,
    resume: bool,
    init: Option<&'a Path>,
    cluster: &'a Cluster<D>,
}

/// A run in progress on this machine's first replica: its data, model and optimiser,
/// the other replicas, and what it has logged, evaluated and saved so far.
struct Run<'a, B: MoeAutodiffBackend> {
    config: RunConfig,
    run_dir: &'a Path,
    data: RunData,
    eval_windows: EvalWindows,
    learner: Learner<B>,
    /// This machine's other replicas (data-parallel runs only).
    replicas: Option<Replicas<B>>,
    state: TrainingState,
    logger: MetricsLogger,
    interval: Interval,
    clock: RunClock,
    last_eval: Option<EvalResult>,
    last_checkpoint: Option<PathBuf>,
    progress: &'a mut dyn FnMut(&str),
}

/// Time and tokens of this invocation of [`train`].
struct RunClock {
    started: Instant,
    /// Training seconds of the run before this invocation (resuming).
    elapsed_before: f64,
    train_secs: f64,
    trained_tokens: usize,
}

impl RunClock {
    fn new(elapsed_before: f64) -> Self {
        Self {
            started: Instant::now(),
            elapsed_before,
            train_secs: 0.0,
            trained_tokens: 0,
        }
    }

    /// Training seconds of the whole run so far.
    fn run_secs(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }
}

impl<'a, B: MoeAutodiffBackend> Run<'a, B> {
    /// Checks the cluster, finds the checkpoint to resume or start from, opens the data,
    /// builds (or restores) the model and optimiser and starts the other replicas.
    fn start(start: RunStart<'a, B::Device>, progress: &'a mut dyn FnMut(&str)) -> Result<Self> {
        let RunStart {
            config,
            run_dir,
            resume,
            init,
            cluster,
        } = start;
        let Some(device) = cluster.devices.first() else {
            bail!("no device to train on");
        };
        let local = local_replicas(&config, cluster)?;
        let from = StartingPoint::find(&config, run_dir, resume, init, progress)?;
        let mut config = config;
        let data = open_data(&mut config, run_dir, from.model_checkpoint(), progress)?;
        let batches = training_batches(&config, &data, progress)?;
        let eval_windows = data.eval_windows(&config);
        let (model, optimizer, state) = initial_model::<B>(&config, &from, cluster, progress)?;
        let logger = MetricsLogger::open(run_dir, from.resume.as_ref().map(|_| state.step))?;
        let clock = RunClock::new(state.elapsed_secs);
        // Every step's all-reduce keeps the replicas in step: the others wait there while
        // this one evaluates or saves.
        let replicas = match config.train.replicas {
            1 => None,
            _ => {
                let start = ReplicaStart {
                    model: &model,
                    config: &config,
                    batches: &batches,
                    step: state.step,
                    resume_from: from.resume.as_deref(),
                };
                Some(Replicas::<B>::start(start, cluster, local)?)
            }
        };
        let shard = Shard {
            batches,
            rank: cluster.first_rank(local),
            replicas: config.train.replicas,
        };
        let learner = Learner {
            model,
            optimizer,
            shard,
            train: config.train.clone(),
            device: device.clone(),
        };
        Ok(Self {
            eval_windows,
            learner,
            replicas,
            state,
            logger,
            interval: Interval::new(),
            clock,
            last_eval: None,
            last_checkpoint: from.resume,
            progress,
            config,
            run_dir,
            data,
        })
    }

    /// Whether every step of the run is done.
    fn is_done(&self) -> bool {
        self.state.step >= self.config.train.steps
    }

    /// Trains one step, then logs, evaluates and saves as the step's number calls for.
    fn step(mut self) -> Result<Self> {
        let step = self.state.step;
        let step_start = Instant::now();
        let lr = learning_rate(&self.config.train, step);
        let peer = self.replicas.as_ref().map(|r| &r.peer);
        let (learner, grad_norm) = match self.learner.step(step, peer, Some(&mut self.interval)) {
            Ok(out) => out,
            Err(error) => {
                return Err(explain_failure(
                    self.replicas.as_ref(),
                    &mut self.logger,
                    error,
                ));
            }
        };
        self.learner = learner;
        self.state.step = step + 1;
        let step_secs = step_start.elapsed().as_secs_f64();
        let tokens = self.config.tokens_per_step();
        self.clock.train_secs += step_secs;
        self.clock.trained_tokens += tokens;
        self.interval.add_step_time(step_secs, tokens);
        self.state.elapsed_secs = self.clock.run_secs();
        self.after_step(lr, grad_norm)?;
        Ok(self)
    }

    /// The duties after a step: the training log line, the periodic evaluation (and the
    /// whole split's after the last step) and the checkpoint, each when due.
    fn after_step(&mut self, lr: f64, grad_norm: Tensor<B::InnerBackend, 1>) -> Result<()> {
        let train = &self.config.train;
        let (step, last) = (self.state.step, self.state.step == train.steps);
        if step.is_multiple_of(train.log_every) || last {
            let grad_norm = grad_norm.into_scalar().elem::<f64>();
            let record = self
                .interval
                .finish(step, lr, grad_norm, self.state.elapsed_secs);
            (self.progress)(&train_line(&record, train.steps));
            self.logger.log(&MetricRecord::Train(record))?;
        }
        let periodic = step.is_multiple_of(train.eval_every) || last;
        let checkpoint = step.is_multiple_of(train.checkpoint_every) || last;
        // Periodic passes score the same fixed windows; the final one also the whole split.
        for (full, due) in [(false, periodic), (true, last)] {
            if due {
                self.evaluate_and_log(full)?;
            }
        }
        if checkpoint {
            self.state.elapsed_secs = self.clock.run_secs();
            self.last_checkpoint = Some(self.save()?);
        }
        Ok(())
    }

    /// Evaluates on the fixed windows or (`full`) the whole validation split, and reports
    /// and logs the result.
    fn evaluate_and_log(&mut self, full: bool) -> Result<()> {
        let result = self.evaluate(full)?;
        let step = self.state.step;
        (self.progress)(&eval_line(step, &result, full));
        self.logger.log(&MetricRecord::Eval {
            step,
            full,
            result: result.clone(),
        })?;
        self.last_eval = Some(result);
        Ok(())
    }

    /// The model's loss on the fixed evaluation windows or (`full`) the whole split.
    fn evaluate(&self, full: bool) -> Result<EvalResult> {
        let full_windows;
        let windows = match full {
            false => &self.eval_windows,
            true => {
                full_windows = self
                    .data
                    .full_eval_windows(self.config.data.seq_len, self.config.train.loss_on)?;
                &full_windows
            }
        };
        let (model, device) = (&self.learner.model, &self.learner.device);
        evaluate(
            &model.valid(),
            windows,
            self.config.train.batch_size,
            None,
            device,
        )
    }

    /// Writes a checkpoint of the current model, optimiser and step.
    fn save(&self) -> Result<PathBuf> {
        save_checkpoint::<B, _, _>(
            self.run_dir,
            &self.learner.model,
            self.learner.optimizer.to_record(),
            &self.config,
            self.data.tokenizer(),
            self.state,
            self.config.train.keep_checkpoints,
        )
    }

    /// Waits for the other replicas and reports the run. The last step ends with an
    /// evaluation and a checkpoint; they run here only when no step was left (resuming a
    /// finished run).
    fn finish(mut self) -> Result<TrainOutcome> {
        if let Some(replicas) = self.replicas.take() {
            replicas.finish()?;
        }
        let final_eval = match self.last_eval.take() {
            Some(result) => result,
            None => self.evaluate(true)?,
        };
        let checkpoint = match self.last_checkpoint.take() {
            Some(dir) => dir,
            None => self.save()?,
        };
        Ok(TrainOutcome {
            steps: self.state.step,
            final_eval,
            checkpoint,
            elapsed_secs: self.clock.started.elapsed().as_secs_f64(),
            tokens_per_sec: self.clock.trained_tokens as f64 / self.clock.train_secs.max(1e-9),
        })
    }
}

/// `error` of a step, explained by the replica that stopped first if one did; a
/// divergence is logged.
fn explain_failure<B: MoeAutodiffBackend>(
    replicas: Option<&Replicas<B>>,
    logger: &mut MetricsLogger,
    error: anyhow::Error,
) -> anyhow::Error {
    let error = match replicas {
        Some(replicas) => replicas.explain(error),
        None => error,
    };
    if let Some(diverged) = error.downcast_ref::<Diverged>() {
        let record = MetricRecord::Diverged {
            step: diverged.step,
        };
        if let Err(log_error) = logger.log(&record) {
            return log_error;
        }
    }
    error
}

/// This machine's share of `train.replicas`, after checking the cluster can hold them.
fn local_replicas<D>(config: &RunConfig, cluster: &Cluster<D>) -> Result<usize> {
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
    Ok(local)
}

/// The checkpoints a run's first step starts from.
struct StartingPoint {
    /// The checkpoint resumed: weights, optimiser state and step.
    resume: Option<PathBuf>,
    /// A new run's starting weights and tokenizer.
    init: Option<PathBuf>,
}

impl StartingPoint {
    /// Finds the checkpoint to resume (the newest intact one in `run_dir`, with
    /// `resume`, if its config allows) or to start from (`init`, for a new run).
    fn find(
        config: &RunConfig,
        run_dir: &Path,
        resume: bool,
        init: Option<&Path>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let resume = checkpoint_to_resume(run_dir, resume, progress)?;
        if let Some(ckpt) = &resume {
            check_resumable(config, &ckpt.join(CONFIG_FILE))?;
        }
        let init = match (&resume, init) {
            (None, Some(init)) => Some(resolve_checkpoint(init)?),
            _ => None,
        };
        Ok(Self { resume, init })
    }

    /// The checkpoint whose tokenizer the model keeps: the one resumed, or (a new run
    /// from `init` starts from its weights) `init`.
    fn model_checkpoint(&self) -> Option<&PathBuf> {
        self.resume.as_ref().or(self.init.as_ref())
    }
}

/// The checkpoint a run continues from: with `resume`, the newest in `run_dir` whose
/// files match their manifest (damaged newer ones are skipped, saying why). Without
/// `resume`, a directory that already holds checkpoints is refused.
fn checkpoint_to_resume(
    run_dir: &Path,
    resume: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<PathBuf>> {
    let existing = list_checkpoints(run_dir)?;
    match (resume, existing.last()) {
        (true, Some(_)) => {
            for checkpoint in existing.iter().rev() {
                match verify_checkpoint(checkpoint) {
                    Ok(()) => return Ok(Some(checkpoint.clone())),
                    Err(error) => progress(&format!("{error:#}; skipping it")),
                }
            }
            bail!(
                "no intact checkpoint in {} to resume (each is named above with what is \
                 damaged); start a new run with another --out",
                run_dir.display()
            )
        }
        (true, None) => {
            progress(&format!(
                "no checkpoint in {} yet: starting a new run",
                run_dir.display()
            ));
            Ok(None)
        }
        (false, Some(last)) => bail!(
            "{} already holds a run (latest checkpoint {}); pass --resume to continue it, or --out for a new run",
            run_dir.display(),
            last.display()
        ),
        (false, None) => Ok(None),
    }
}

/// Opens the run's data (tokenized with the tokenizer of `model_checkpoint`, the one
/// resumed or started from, if any) and saves the config and tokenizer in `run_dir`.
/// Data whose tokenizer added special tokens to the checkpoint's grows the run's
/// vocabulary to match.
fn open_data(
    config: &mut RunConfig,
    run_dir: &Path,
    model_checkpoint: Option<&PathBuf>,
    progress: &mut dyn FnMut(&str),
) -> Result<RunData> {
    let model_tokenizer = match model_checkpoint {
        Some(ckpt) => Some(load_tokenizer(ckpt)?),
        None => None,
    };
    let data = RunData::open(config, model_tokenizer.as_ref(), progress)?;
    if !data.added_tokens.is_empty() {
        progress(&format!(
            "the data's tokenizer adds {} to the model's",
            data.added_tokens.join(", ")
        ));
        config.model.vocab_size = config.model.vocab_size.max(data.vocab_size());
    }
    std::fs::write(run_dir.join(CONFIG_FILE), config.to_toml()?)?;
    data.tokenizer().save(&run_dir.join(TOKENIZER_FILE))?;
    Ok(data)
}

/// The run's training batches, each holding every replica's sequences of a micro-batch;
/// reports the data sets and, for a mixture, each set's share of the run.
fn training_batches(
    config: &RunConfig,
    data: &RunData,
    progress: &mut dyn FnMut(&str),
) -> Result<TrainWindows> {
    let step_batch = config.train.batch_size * config.train.replicas;
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
    Ok(batches)
}

/// The model, optimiser and training state the run's first step starts from: seeded new
/// weights, else `init`'s, else those of the checkpoint resumed; experts placed over
/// `train.expert_devices` devices.
fn initial_model<B: MoeAutodiffBackend>(
    config: &RunConfig,
    from: &StartingPoint,
    cluster: &Cluster<B::Device>,
    progress: &mut dyn FnMut(&str),
) -> Result<(Transformer<B>, AdamW<B>, TrainingState)> {
    let device = cluster.device(0);
    B::seed(device, config.train.seed);
    let mut model = Transformer::<B>::new(&config.model, &config.moe, device)?;
    model.visit(&mut DrawWeights);
    if let Some(init) = &from.init {
        model = initial_weights(model, config, init, device, progress)?;
        progress(&format!("initialised from {}", init.display()));
    }
    let mut optimizer = FusedAdamW::new(&config.train).init::<B>();
    let mut state = TrainingState {
        step: 0,
        elapsed_secs: 0.0,
    };
    if let Some(ckpt) = &from.resume {
        (model, optimizer, state) = restore(model, optimizer, ckpt, device)?;
        progress(&format!(
            "resumed from {} (step {})",
            ckpt.display(),
            state.step
        ));
    }
    let expert_devices = config.train.expert_devices;
    if expert_devices > 1 {
        let placement: Vec<B::Device> = (0..expert_devices)
            .map(|s| cluster.device(s).clone())
            .collect();
        model = model.place_experts(&placement);
        progress(&format!(
            "experts placed over {expert_devices} devices (expert e on device e mod {expert_devices})"
        ));
    }
    Ok((model, optimizer, state))
}

/// The model, optimiser and state saved in checkpoint `ckpt`.
fn restore<B: MoeAutodiffBackend>(
    model: Transformer<B>,
    optimizer: AdamW<B>,
    ckpt: &Path,
    device: &B::Device,
) -> Result<(Transformer<B>, AdamW<B>, TrainingState)> {
    let model = model
        .load_file(ckpt.join(checkpoint::MODEL_FILE), &recorder(), device)
        .with_context(|| format!("loading model from {}", ckpt.display()))?;
    check_finite(&model_tensors(&model)?, NonFinite::Refuse, ckpt)?;
    let record = recorder()
        .load(ckpt.join(OPTIMIZER_FILE), device)
        .with_context(|| format!("loading optimizer state from {}", ckpt.display()))?;
    Ok((model, optimizer.load_record(record), load_state(ckpt)?))
}

/// `model` with the weights of the checkpoint `init`, whose `[model]` section must equal
/// the run's (`[moe]` may differ where the parameter shapes allow, e.g. the losses),
/// except for a larger vocabulary (the data's tokenizer added special tokens): the
/// checkpoint's embeddings then grow to it.
fn initial_weights<B: Backend>(
    model: Transformer<B>,
    config: &RunConfig,
    init: &Path,
    device: &B::Device,
    progress: &mut dyn FnMut(&str),
) -> Result<Transformer<B>> {
    let (source, mut source_config, _) = load_weights::<B>(init, device, NonFinite::Refuse)?;
    let mut tensors = model_tensors(&source)?;
    let (from, to) = (source_config.model.vocab_size, config.model.vocab_size);
    if to > from {
        grow_vocabulary(&mut tensors, to)?;
        source_config.model.vocab_size = to;
        progress(&format!(
            "vocabulary grown from {from} to {to} tokens (new embeddings: the mean of the others)"
        ));
    }
    ensure!(
        source_config.model == config.model,
        "cannot initialise from {}: its [model] section differs from the run's; leave out \
         --config to train with the checkpoint's own config, and change [moe], [data] or \
         [train] with --set",
        init.display()
    );
    load_model_tensors(model, tensors)
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
