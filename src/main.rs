//! `moe`: train, evaluate, sample, export and import sparse Mixture-of-Experts language
//! models.

mod ablate;
mod allocator;
mod backend;
mod bench;
mod data;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::backend::Flex;
use clap::{Parser, Subcommand};
use moe_model::ops::run_compute;
use moe_model::{MoeAutodiffBackend, SamplingConfig, generate};
use moe_train::CONFIG_FILE;
use moe_train::RunData;
use moe_train::data_parallel::{Cluster, Nodes};
use moe_train::{
    ExportFormat, RunConfig, UpcycleOptions, evaluate, export, import, load_model,
    resolve_checkpoint, train, upcycle_checkpoint,
};

use crate::backend::{BackendJob, BackendKind, DeviceList, DevicesJob, run_on, run_on_devices};

#[derive(Parser, Debug)]
#[command(
    name = "moe",
    version,
    about = "Sparse Mixture-of-Experts transformers on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model from a TOML config.
    Train(TrainArgs),
    /// Prepare training data (tokenize once into memory-mapped shards) and inspect it.
    Data(data::DataArgs),
    /// Run a grid of training runs (an ablation study) and write its results and report.
    Ablate(ablate::AblateArgs),
    /// Validation loss, bits per byte, perplexity and expert load of a checkpoint.
    Eval(EvalArgs),
    /// Generate text from a checkpoint.
    Generate(GenerateArgs),
    /// Write a checkpoint as safetensors (our names) or as a Hugging Face Mixtral.
    Export(ExportArgs),
    /// Make a checkpoint from a Hugging Face Mixtral directory or a safetensors export.
    Import(ImportArgs),
    /// Turn a dense checkpoint into an MoE one whose experts start as copies of its FFNs.
    Upcycle(UpcycleArgs),
    /// Serve a checkpoint over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Run a Mixture-of-Agents pipeline over OpenAI-compatible endpoints.
    Moa(MoaArgs),
    /// Measure training or generation throughput of a config's shapes.
    Bench(bench::BenchArgs),
    /// Run the orchestrator that pairs the machines of a multi-machine `moe train`.
    Orchestrator(OrchestratorArgs),
}

#[derive(clap::Args, Debug)]
struct OrchestratorArgs {
    /// Port to listen on (every node's --orchestrator points here).
    #[arg(long, default_value_t = 3000)]
    port: u16,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Run config (TOML) [default: configs/tiny.toml, or the --init checkpoint's config].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start a new run from this checkpoint's weights and tokenizer (fine-tuning; imported
    /// or upcycled models). Its [model] section must match the run config's.
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
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    resume: bool,
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

/// The file name of `path` without its extension, for default run directory names.
fn file_name(path: &std::path::Path) -> Result<String> {
    let stem = path
        .file_stem()
        .with_context(|| format!("{} has no file name", path.display()))?;
    Ok(stem.to_string_lossy().into_owned())
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// A prepared set (`moe data prepare`) whose validation split to score, instead of
    /// the run config's data. It must use the checkpoint's tokenizer.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Evaluate only this many validation batches.
    #[arg(long)]
    batches: Option<usize>,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendKind,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens only (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendKind,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// `safetensors`: our parameter names; `hf`: a directory transformers loads as
    /// MixtralForCausalLM.
    #[arg(long, value_enum)]
    format: FormatArg,
    /// Output directory (must not exist).
    #[arg(long)]
    out: PathBuf,
}

/// `--format` of `moe export`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    /// model.safetensors with our parameter names, config.toml, tokenizer.json.
    Safetensors,
    /// Hugging Face Mixtral: config.json, model.safetensors, tokenizer.json,
    /// generation_config.json.
    Hf,
}

#[derive(clap::Args, Debug)]
struct ImportArgs {
    /// A Hugging Face Mixtral directory (config.json + safetensors) or a
    /// `moe export --format safetensors` directory.
    #[arg(long)]
    from: PathBuf,
    /// The checkpoint directory to create (must not exist).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct UpcycleArgs {
    /// A dense checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    from: PathBuf,
    /// Experts per MoE layer.
    #[arg(long)]
    experts: usize,
    /// Experts each token is sent to.
    #[arg(long)]
    top_k: usize,
    /// Standard deviation of the new router weights [default: model.init_std / 10].
    #[arg(long)]
    router_std: Option<f64>,
    /// The checkpoint directory to create (must not exist).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    http: HttpArgs,
    /// Chat prompt format: chatml or plain.
    #[arg(long, default_value = "chatml")]
    template: moe_serve::ChatTemplate,
    /// Requests that may wait for a free slot; more get 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Answers generated together (one forward pass gives each its next token).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Longest time one answer may take, in seconds (it then ends with "length").
    #[arg(long, default_value_t = 60.0)]
    max_time_secs: f64,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendKind,
}

/// Where and how an OpenAI-compatible server listens.
#[derive(clap::Args, Debug)]
struct HttpArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Model name in responses and /v1/models [default: the checkpoint's directory name,
    /// or "moa" for a pipeline].
    #[arg(long)]
    model_id: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1 requests.
    #[arg(long)]
    api_key: Option<String>,
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct MoaArgs {
    #[command(subcommand)]
    command: Option<MoaCommand>,
    /// The pipeline (TOML): layers of proposers and an aggregator.
    #[arg(long, default_value = "configs/moa.toml")]
    config: PathBuf,
    /// The user's prompt.
    #[arg(long, required = true)]
    prompt: Option<String>,
    /// Write the per-call records (agent, layer, latency, tokens, error) as JSON here
    /// instead of printing them to stderr.
    #[arg(long)]
    records: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
enum MoaCommand {
    /// Serve the pipeline itself as an OpenAI-compatible chat endpoint.
    Serve(MoaServeArgs),
}

#[derive(clap::Args, Debug)]
struct MoaServeArgs {
    /// The pipeline (TOML): layers of proposers and an aggregator.
    #[arg(long, default_value = "configs/moa.toml")]
    config: PathBuf,
    #[command(flatten)]
    http: HttpArgs,
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
        let nodes = args.nodes();
        let run_dir = args
            .out
            .unwrap_or_else(|| PathBuf::from("checkpoints").join(default_name));
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
            (Some(path), _) => (path.clone(), file_name(path)?),
            (None, Some(init)) => {
                let checkpoint = resolve_checkpoint(init)?;
                let name = format!("{}-finetune", file_name(init)?);
                (checkpoint.join(CONFIG_FILE), name)
            }
            (None, None) => {
                let path = PathBuf::from("configs/tiny.toml");
                let name = file_name(&path)?;
                (path, name)
            }
        };
        Ok((RunConfig::load(&config_path, &overrides)?, default_name))
    }
}

impl BackendJob for EvalArgs {
    type Output = ();

    fn run<B: MoeAutodiffBackend>(self, device: B::Device) -> Result<()> {
        let loaded = load_model::<B::InnerBackend>(&self.checkpoint, &device)?;
        let mut config = loaded.config.clone();
        if let Some(dir) = &self.data {
            config.data.prepared = Some(dir.clone());
            config.data.dataset = None;
            config.data.sources.clear();
            config.data.tokenizer = None;
            config.data.validation_works = None;
        }
        let data = RunData::open(&config, Some(&loaded.tokenizer), &mut |line| {
            eprintln!("{line}")
        })?;
        let windows = data.full_eval_windows(config.data.seq_len);
        let result = evaluate(
            &loaded.model,
            &windows,
            config.train.batch_size,
            self.batches,
            &device,
        )?;
        if self.json {
            let json = serde_json::json!({
                "checkpoint": loaded.checkpoint,
                "val_loss": result.val_loss,
                "bpb": result.bpb,
                "perplexity": result.perplexity,
                "tokens": result.tokens,
                "expert_load": result.expert_load.iter().map(|l| l.load.clone()).collect::<Vec<_>>(),
                "layers": result.expert_load,
            });
            println!("{json}");
        } else {
            println!("checkpoint  {}", loaded.checkpoint.display());
            println!("val_loss    {:.4}", result.val_loss);
            println!("bpb         {:.4}", result.bpb);
            println!("perplexity  {:.2}", result.perplexity);
            for (i, layer) in result.expert_load.iter().enumerate() {
                let load: Vec<String> = layer.load.iter().map(|l| format!("{l:.3}")).collect();
                println!(
                    "moe layer {i}: load [{}] cv {:.3} dropped {:.2}% entropy {:.3}",
                    load.join(" "),
                    layer.cv,
                    100.0 * layer.dropped,
                    layer.entropy
                );
            }
        }
        Ok(())
    }
}

impl BackendJob for GenerateArgs {
    type Output = ();

    fn run<B: MoeAutodiffBackend>(self, device: B::Device) -> Result<()> {
        anyhow::ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "--temperature must be >= 0"
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "--top-p must be in (0, 1]"
        );
        let loaded = load_model::<B::InnerBackend>(&self.checkpoint, &device)?;
        let tokenizer = &loaded.tokenizer;
        let prompt = tokenizer.encode(&self.prompt)?;
        let stop: Vec<u32> = tokenizer.end_of_text().into_iter().collect();
        let sampling = SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        };
        let mut out = std::io::stdout();
        write!(out, "{}", self.prompt)?;
        let mut generated = Vec::new();
        let mut printed = 0;
        run_compute::<B::InnerBackend, _>(|| {
            generate(
                &loaded.model,
                &prompt,
                self.max_tokens,
                &stop,
                sampling,
                |token| {
                    generated.push(token);
                    // Print whole characters only: a byte-level token may end mid-character.
                    if let Ok(text) = tokenizer.decode(&generated) {
                        let text = text.trim_end_matches('\u{FFFD}');
                        if text.len() > printed {
                            let _ = write!(out, "{}", text.get(printed..).unwrap_or_default());
                            let _ = out.flush();
                            printed = text.len();
                        }
                    }
                    std::ops::ControlFlow::Continue(())
                },
                &device,
            )
        });
        if let Ok(text) = tokenizer.decode(&generated)
            && text.len() > printed
        {
            write!(out, "{}", text.get(printed..).unwrap_or_default())?;
        }
        writeln!(out)?;
        Ok(())
    }
}

impl BackendJob for ServeArgs {
    type Output = ();

    fn run<B: MoeAutodiffBackend>(self, device: B::Device) -> Result<()> {
        anyhow::ensure!(
            self.max_time_secs.is_finite() && self.max_time_secs > 0.0,
            "--max-time-secs must be a positive number of seconds"
        );
        anyhow::ensure!(self.queue > 0, "--queue must be at least 1");
        anyhow::ensure!(self.max_batch > 0, "--max-batch must be at least 1");
        let loaded = load_model::<B::InnerBackend>(&self.checkpoint, &device)?;
        let model_id = match self.http.model_id.clone() {
            Some(id) => id,
            None => file_name(&self.checkpoint)?,
        };
        let options = moe_serve::EngineOptions {
            queue_capacity: self.queue,
            max_batch: self.max_batch,
            time_limit: std::time::Duration::from_secs_f64(self.max_time_secs),
        };
        let engine = moe_serve::Engine::start(loaded.model, loaded.tokenizer, device, options)
            .context("starting the generation thread")?;
        let app = moe_serve::router(
            engine,
            moe_serve::ServerOptions {
                model_id: model_id.clone(),
                api_key: self.http.api_key.clone(),
                template: self.template,
            },
        );
        let what = format!("{model_id} ({})", loaded.checkpoint.display());
        serve_http(app, &self.http, &what)
    }
}

/// Serves `app` where `http` says until SIGINT/SIGTERM, then lets requests in flight end.
fn serve_http(app: axum::Router, http: &HttpArgs, what: &str) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let address = format!("{}:{}", http.host, http.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("listening on {address}"))?;
        eprintln!("serving {what} on http://{}/v1", listener.local_addr()?);
        moe_serve::serve(listener, app, moe_serve::shutdown_signal()).await?;
        eprintln!("shut down");
        Ok(())
    })
}

fn run_orchestrator(args: OrchestratorArgs) -> Result<()> {
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

fn serve_moa(args: MoaServeArgs) -> Result<()> {
    let config = moe_serve::MoaConfig::load(&args.config)?;
    let model_id = args.http.model_id.clone().unwrap_or_else(|| "moa".into());
    let what = format!("the pipeline {} as {model_id}", args.config.display());
    let options = moe_serve::ServerOptions {
        model_id,
        api_key: args.http.api_key.clone(),
        template: moe_serve::ChatTemplate::ChatMl,
    };
    serve_http(
        moe_serve::pipeline_router(config, options),
        &args.http,
        &what,
    )
}

fn run_moa(args: MoaArgs) -> Result<()> {
    let prompt = match args.command {
        Some(MoaCommand::Serve(serve)) => return serve_moa(serve),
        None => args.prompt.unwrap_or_default(),
    };
    let config = moe_serve::MoaConfig::load(&args.config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let mut out = std::io::stdout();
    let conversation = [moe_serve::openai::ChatMessage::new("user", &prompt)];
    let outcome = runtime.block_on(moe_serve::moa::run(&config, &conversation, |text| {
        let _ = write!(out, "{text}");
        let _ = out.flush();
    }));
    writeln!(out)?;
    let records = serde_json::to_string_pretty(&outcome.calls)?;
    match &args.records {
        Some(path) => {
            std::fs::write(path, records).with_context(|| format!("writing {}", path.display()))?
        }
        None => eprintln!("{records}"),
    }
    outcome.answer.map(|_| ())
}

fn export_checkpoint(args: ExportArgs) -> Result<()> {
    let format = match args.format {
        FormatArg::Safetensors => ExportFormat::Safetensors,
        FormatArg::Hf => ExportFormat::Hf,
    };
    export::<Flex>(&args.checkpoint, format, &args.out, &Default::default())?;
    eprintln!(
        "exported {} to {}",
        args.checkpoint.display(),
        args.out.display()
    );
    Ok(())
}

fn import_checkpoint(args: ImportArgs) -> Result<()> {
    let has_tokenizer = import::<Flex>(&args.from, &args.out, &Default::default())?;
    eprintln!(
        "imported {} as checkpoint {}",
        args.from.display(),
        args.out.display()
    );
    if !has_tokenizer {
        eprintln!(
            "note: {} has no tokenizer.json; copy one into {} to evaluate or generate text",
            args.from.display(),
            args.out.display()
        );
    }
    Ok(())
}

fn upcycle_dense(args: UpcycleArgs) -> Result<()> {
    let options = UpcycleOptions {
        n_experts: args.experts,
        top_k: args.top_k,
        router_std: args.router_std,
    };
    upcycle_checkpoint::<Flex>(&args.from, &args.out, &options, &Default::default())?;
    eprintln!(
        "upcycled {} into {} ({} experts, top-{}); train it with: moe train --init {}",
        args.from.display(),
        args.out.display(),
        args.experts,
        args.top_k,
        args.out.display()
    );
    Ok(())
}

fn main() {
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => TrainJob::new(args)
            .and_then(|job| run_on_devices(job.args.backend, &job.device_list(), job)),
        Command::Data(args) => data::run(args),
        Command::Ablate(args) => run_on(args.backend, args),
        Command::Bench(args) => run_on(args.backend(), args),
        Command::Orchestrator(args) => run_orchestrator(args),
        Command::Eval(args) => run_on(args.backend, args),
        Command::Serve(args) => run_on(args.backend, args),
        Command::Generate(args) => run_on(args.backend, args),
        Command::Export(args) => export_checkpoint(args),
        Command::Import(args) => import_checkpoint(args),
        Command::Upcycle(args) => upcycle_dense(args),
        Command::Moa(args) => run_moa(args),
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        let diverged = error.downcast_ref::<moe_train::Diverged>().is_some();
        std::process::exit(if diverged {
            ablate::DIVERGED_EXIT_CODE
        } else {
            1
        });
    }
}
