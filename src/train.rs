//! `moe train` and `moe orchestrator`: a training run on one device, on several, or on
//! several machines paired by the orchestrator.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use moe_model::MoeAutodiffBackend;
use moe_model::ops::run_compute;
use moe_train::data_parallel::{Cluster, Nodes};
use moe_train::{CONFIG_FILE, MemoryEstimate, RunConfig, resolve_checkpoint, train};

use crate::backend::{BackendKind, DeviceList, DevicesJob, run_on_devices};
use crate::file_name;

#[derive(clap::Args, Debug)]
pub(crate) struct OrchestratorArgs {
    /// Port to listen on (every node's --orchestrator points here).
    #[arg(long, default_value_t = 3000)]
    port: u16,
}

#[derive(clap::Args, Debug)]
pub(crate) struct TrainArgs {
    /// Run config (TOML) [default: configs/tiny.toml, or the --init checkpoint's config].
    /// With --init, its sections replace the checkpoint's config's, so a fine-tuning
    /// config may hold only [data] and [train].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start a new run from this checkpoint's weights and tokenizer (fine-tuning; imported
    /// or upcycled models). Its [model] section must match the run config's, except for
    /// the vocabulary, which grows when the data's tokenizer added special tokens.
    #[arg(long, value_name = "CKPT")]
    init: Option<PathBuf>,
    /// Run directory [default: checkpoints/<config name>, or checkpoints/<init name>-finetune].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override train.steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendKind,
    /// Data-parallel training: N replicas (`--devices 2`; on the CPU for flex and
    /// ndarray), or the devices to use (`--devices wgpu:0,wgpu:1`). Sets train.replicas;
    /// each replica trains on train.batch_size sequences.
    #[arg(long, value_name = "N|BACKEND:I,...")]
    devices: Option<DeviceList>,
    /// Spread every MoE layer's experts over N devices (`--expert-devices 2`) or the
    /// devices named (`--expert-devices wgpu:0,wgpu:1`): expert e on device e mod N.
    /// Sets train.expert_devices.
    #[arg(long, value_name = "N|BACKEND:I,...", conflicts_with_all = ["devices", "nodes"])]
    expert_devices: Option<DeviceList>,
    /// Machines in a multi-machine run (each runs `moe train` with its own --node-rank;
    /// train.replicas = nodes x devices per node).
    #[arg(long, requires_all = ["node_rank", "orchestrator", "node_address"])]
    nodes: Option<usize>,
    /// This machine's rank, 0..nodes.
    #[arg(long, requires = "nodes")]
    node_rank: Option<usize>,
    /// host:port of `moe orchestrator`.
    #[arg(long, value_name = "HOST:PORT", requires = "nodes")]
    orchestrator: Option<String>,
    /// host:port where the other machines reach this one (the port is bound here).
    #[arg(long, value_name = "HOST:PORT", requires = "nodes")]
    node_address: Option<String>,
    /// Continue from the run directory's newest intact checkpoint (with the run's own
    /// config.toml when --config is left out).
    #[arg(long)]
    resume: bool,
    /// Train even when the memory estimate exceeds this machine's available memory
    /// (the run is then refused with the estimate named).
    #[arg(long)]
    force: bool,
    /// Override a config value: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
}

impl TrainArgs {
    /// The machines of a multi-machine run, if this is one.
    fn nodes(&self) -> Option<Nodes> {
        Some(Nodes {
            count: self.nodes?,
            rank: self.node_rank?,
            orchestrator: self.orchestrator.clone()?,
            address: self.node_address.clone()?,
        })
    }
}

/// Runs `moe train` on the devices its flags and config name.
pub(crate) fn run(args: TrainArgs) -> Result<()> {
    let job = TrainJob::new(args)?;
    run_on_devices(job.args.backend, &job.device_list(), job)
}

/// `moe train` with its run config loaded (once: it also decides the devices).
struct TrainJob {
    args: TrainArgs,
    config: RunConfig,
    default_name: String,
}

impl TrainJob {
    fn new(args: TrainArgs) -> Result<Self> {
        let (config, default_name) = args.run_config()?;
        Ok(Self {
            args,
            config,
            default_name,
        })
    }

    /// The devices to train on: those --devices or --expert-devices name, else as many as
    /// the config's train.expert_devices asks for.
    fn device_list(&self) -> DeviceList {
        let args = &self.args;
        match args.devices.as_ref().or(args.expert_devices.as_ref()) {
            Some(list) => list.clone(),
            None => DeviceList::Count(self.config.train.expert_devices),
        }
    }
}

impl DevicesJob for TrainJob {
    type Output = ();

    fn run<B: MoeAutodiffBackend>(self, devices: Vec<B::Device>) -> Result<()> {
        let Self {
            args,
            config,
            default_name,
        } = self;
        let several_wgpu = args.backend == BackendKind::Wgpu && devices.len() > 1;
        if several_wgpu && config.train.replicas > 1 {
            bail!(
                "data parallelism over several wgpu devices needs a device-to-device copy, which burn 0.21's wgpu backend lacks; use --backend cuda, or --expert-devices"
            );
        }
        if several_wgpu && args.resume && config.train.expert_devices > 1 {
            bail!(
                "resuming a run whose experts are placed over several wgpu devices moves optimiser state between devices, which burn 0.21's wgpu backend cannot; resume with --expert-devices 1 and a new --out, or on cuda"
            );
        }
        if let Err(error) = MemoryEstimate::training(&config)?.ensure_fits() {
            if !args.force {
                bail!("{error}; pass --force to train anyway");
            }
            eprintln!("warning: {error} (training anyway: --force)");
        }
        let nodes = args.nodes();
        let run_dir = args.out.unwrap_or_else(|| default_run_dir(&default_name));
        eprintln!("run directory: {}", run_dir.display());
        let init = args.init.as_deref();
        let cluster = Cluster { devices, nodes };
        let run = || {
            train::<B>(&config, &run_dir, args.resume, init, &cluster, |line| {
                eprintln!("{line}")
            })
        };
        // A single replica trains on the backend's compute thread; replicas wait on each
        // other at every step, so they keep their own threads.
        let outcome = if config.train.replicas == 1 {
            run_compute::<B, _>(run)?
        } else {
            run()?
        };
        eprintln!(
            "done: {} steps, val_loss {:.4}, bpb {:.4}, {:.0} train tokens/s, {:.0}s; checkpoint {}",
            outcome.steps,
            outcome.final_eval.val_loss,
            outcome.final_eval.bpb,
            outcome.tokens_per_sec,
            outcome.elapsed_secs,
            outcome.checkpoint.display()
        );
        Ok(())
    }
}

impl TrainArgs {
    /// The run config with the command line's overrides, and the default run name.
    fn run_config(&self) -> Result<(RunConfig, String)> {
        let mut overrides = self.overrides.clone();
        if let Some(steps) = self.steps {
            overrides.push(format!("train.steps={steps}"));
        }
        let nodes = self.nodes();
        if self.devices.is_some() || nodes.is_some() {
            let local = self.devices.as_ref().map_or(1, DeviceList::replicas);
            let machines = nodes.as_ref().map_or(1, |n| n.count);
            overrides.push(format!("train.replicas={}", local * machines));
        }
        if let Some(list) = &self.expert_devices {
            overrides.push(format!("train.expert_devices={}", list.replicas()));
        }
        let (config_path, default_name) = match (&self.config, &self.init) {
            (Some(path), Some(init)) => {
                let base = resolve_checkpoint(init)?.join(CONFIG_FILE);
                let config = RunConfig::load_over(&base, path, &overrides)?;
                return Ok((config, file_name(path)?));
            }
            (Some(path), None) => (path.clone(), file_name(path)?),
            (None, Some(init)) => {
                let checkpoint = resolve_checkpoint(init)?;
                let name = format!("{}-finetune", file_name(init)?);
                (checkpoint.join(CONFIG_FILE), name)
            }
            (None, None) => {
                let path = PathBuf::from("configs/tiny.toml");
                let name = file_name(&path)?;
                // Resuming: the run's own config, as saved when it started.
                let run_dir = self.out.clone().unwrap_or_else(|| default_run_dir(&name));
                match run_dir.join(CONFIG_FILE) {
                    saved if self.resume && saved.is_file() => (saved, name),
                    _ => (path, name),
                }
            }
        };
        Ok((RunConfig::load(&config_path, &overrides)?, default_name))
    }
}

/// The run directory of a run named `name` when --out is left out.
fn default_run_dir(name: &str) -> PathBuf {
    PathBuf::from("checkpoints").join(name)
}

pub(crate) fn run_orchestrator(args: OrchestratorArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        // The orchestrator only logs a failure to listen: check the port first.
        let probe = tokio::net::TcpListener::bind(("0.0.0.0", args.port))
            .await
            .with_context(|| format!("listening on port {}", args.port))?;
        drop(probe);
        eprintln!(
            "orchestrator listening on port {} (Ctrl-C stops it)",
            args.port
        );
        burn_collective::start_global_orchestrator(args.port).await;
        eprintln!("orchestrator stopped");
        Ok(())
    })
}
