//! `moe serve` and `moe moa`: a checkpoint behind an OpenAI-compatible HTTP API, and
//! Mixture-of-Agents pipelines over such endpoints, run once or served as one.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use moe_data::ChatTemplate;
use moe_model::MoeAutodiffBackend;

use crate::backend::{BackendJob, BackendKind, run_on};
use crate::checkpoint_arg::CheckpointArg;
use crate::file_name;

#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    source: CheckpointArg,
    #[command(flatten)]
    http: HttpArgs,
    /// Chat template: `chatml`, `plain` (`role: text` paragraphs, for a model trained on
    /// prose only) or a Jinja file [default: the checkpoint's own, from its
    /// tokenizer_config.json; ChatML for a checkpoint without one].
    #[arg(long, value_name = "NAME|FILE")]
    template: Option<String>,
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
pub(crate) struct HttpArgs {
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
    #[arg(long, value_parser = api_key)]
    api_key: Option<String>,
}

/// Reads `--api-key`, refusing a key that would refuse every request (an empty one).
fn api_key(key: &str) -> Result<String> {
    moe_serve::check_api_key(key)?;
    Ok(key.to_string())
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct MoaArgs {
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
pub(crate) enum MoaCommand {
    /// Serve the pipeline itself as an OpenAI-compatible chat endpoint.
    Serve(MoaServeArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct MoaServeArgs {
    /// The pipeline (TOML): layers of proposers and an aggregator.
    #[arg(long, default_value = "configs/moa.toml")]
    config: PathBuf,
    #[command(flatten)]
    http: HttpArgs,
}

/// Runs `moe serve` on the backend its flags name.
pub(crate) fn run(args: ServeArgs) -> Result<()> {
    run_on(args.backend, args)
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
        let loaded = self.source.load::<B::InnerBackend>(&device)?;
        let model_id = match self.http.model_id.clone() {
            Some(id) => id,
            None => file_name(&self.source.checkpoint)?,
        };
        let options = moe_serve::EngineOptions {
            queue_capacity: self.queue,
            max_batch: self.max_batch,
            time_limit: std::time::Duration::from_secs_f64(self.max_time_secs),
        };
        let template = match self.template.as_deref() {
            None => loaded.tokenizer.chat_template(),
            Some("chatml") => ChatTemplate::chatml(),
            Some("plain") => ChatTemplate::plain(),
            Some(path) => {
                let source = std::fs::read_to_string(path)
                    .with_context(|| format!("--template: reading the Jinja file `{path}`"))?;
                let own = loaded.tokenizer.chat_template();
                let tokens = |t: Option<&str>| t.map(String::from);
                ChatTemplate::new(&source, tokens(own.bos_token()), tokens(own.eos_token()))
            }
        };
        // A template that cannot render a conversation is refused now, not per request.
        template
            .render(&[moe_data::Message::new("user", "hi")], true)
            .context("--template")?;
        let engine = moe_serve::Engine::start(loaded.model, loaded.tokenizer, device, options)
            .context("starting the generation thread")?;
        let app = moe_serve::router(
            engine,
            moe_serve::ServerOptions {
                model_id: model_id.clone(),
                api_key: self.http.api_key.clone(),
                template,
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

fn serve_moa(args: MoaServeArgs) -> Result<()> {
    let config = moe_serve::MoaConfig::load(&args.config)?;
    let model_id = args.http.model_id.clone().unwrap_or_else(|| "moa".into());
    let what = format!("the pipeline {} as {model_id}", args.config.display());
    let options = moe_serve::ServerOptions {
        model_id,
        api_key: args.http.api_key.clone(),
        template: ChatTemplate::chatml(),
    };
    serve_http(
        moe_serve::pipeline_router(config, options),
        &args.http,
        &what,
    )
}

pub(crate) fn run_moa(args: MoaArgs) -> Result<()> {
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
