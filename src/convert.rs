//! `moe export`, `moe import` and `moe upcycle`: checkpoints to and from other layouts.

use std::path::PathBuf;

use anyhow::Result;
use burn::backend::Flex;
use moe_train::{ExportFormat, UpcycleOptions, export, import, upcycle_checkpoint};

use crate::checkpoint_arg::{CheckpointArg, nonfinite};

#[derive(clap::Args, Debug)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    source: CheckpointArg,
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
pub(crate) enum FormatArg {
    /// model.safetensors with our parameter names, config.toml, tokenizer.json.
    Safetensors,
    /// Hugging Face Mixtral: config.json, model.safetensors, tokenizer.json,
    /// generation_config.json.
    Hf,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ImportArgs {
    /// A Hugging Face Mixtral directory (config.json + safetensors) or a
    /// `moe export --format safetensors` directory.
    #[arg(long)]
    from: PathBuf,
    /// The checkpoint directory to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Import weights holding NaN or infinite values (refused by default, naming the
    /// tensor).
    #[arg(long)]
    allow_nonfinite: bool,
}

#[derive(clap::Args, Debug)]
pub(crate) struct UpcycleArgs {
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

pub(crate) fn export_checkpoint(args: ExportArgs) -> Result<()> {
    let format = match args.format {
        FormatArg::Safetensors => ExportFormat::Safetensors,
        FormatArg::Hf => ExportFormat::Hf,
    };
    let source = &args.source;
    export::<Flex>(
        &source.checkpoint,
        format,
        &args.out,
        &Default::default(),
        source.nonfinite(),
    )?;
    eprintln!(
        "exported {} to {}",
        source.checkpoint.display(),
        args.out.display()
    );
    Ok(())
}

pub(crate) fn import_checkpoint(args: ImportArgs) -> Result<()> {
    let has_tokenizer = import::<Flex>(
        &args.from,
        &args.out,
        &Default::default(),
        nonfinite(args.allow_nonfinite),
    )?;
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

pub(crate) fn upcycle_dense(args: UpcycleArgs) -> Result<()> {
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
