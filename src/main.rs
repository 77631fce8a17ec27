//! `moe`: train, evaluate, sample, export and import sparse Mixture-of-Experts language
//! models, serve them and run Mixture-of-Agents pipelines. One module per command.

mod ablate;
mod allocator;
mod backend;
mod bench;
mod checkpoint_arg;
mod convert;
mod data;
mod eval;
mod generate;
mod serve;
mod train;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::backend::run_on;

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
    Train(train::TrainArgs),
    /// Prepare training data (tokenize once into memory-mapped shards) and inspect it.
    Data(data::DataArgs),
    /// Run a grid of training runs (an ablation study) and write its results and report.
    Ablate(ablate::AblateArgs),
    /// Validation loss, bits per byte, perplexity and expert load of a checkpoint.
    Eval(eval::EvalArgs),
    /// Generate text from a checkpoint.
    Generate(generate::GenerateArgs),
    /// Write a checkpoint as safetensors (our names) or as a Hugging Face Mixtral.
    Export(convert::ExportArgs),
    /// Make a checkpoint from a Hugging Face Mixtral directory or a safetensors export.
    Import(convert::ImportArgs),
    /// Turn a dense checkpoint into an MoE one whose experts start as copies of its FFNs.
    Upcycle(convert::UpcycleArgs),
    /// Serve a checkpoint over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Run a Mixture-of-Agents pipeline over OpenAI-compatible endpoints.
    Moa(serve::MoaArgs),
    /// Measure training or generation throughput of a config's shapes.
    Bench(bench::BenchArgs),
    /// Run the orchestrator that pairs the machines of a multi-machine `moe train`.
    Orchestrator(train::OrchestratorArgs),
}

/// The file name of `path` without its extension, for default run directory names.
pub(crate) fn file_name(path: &std::path::Path) -> Result<String> {
    let stem = path
        .file_stem()
        .with_context(|| format!("{} has no file name", path.display()))?;
    Ok(stem.to_string_lossy().into_owned())
}

fn main() {
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train::run(args),
        Command::Data(args) => data::run(args),
        Command::Ablate(args) => run_on(args.backend, args),
        Command::Bench(args) => run_on(args.backend(), args),
        Command::Orchestrator(args) => train::run_orchestrator(args),
        Command::Eval(args) => eval::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Export(args) => convert::export_checkpoint(args),
        Command::Import(args) => convert::import_checkpoint(args),
        Command::Upcycle(args) => convert::upcycle_dense(args),
        Command::Moa(args) => serve::run_moa(args),
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
