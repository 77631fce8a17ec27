//! `moe import`: a checkpoint from a Hugging Face Mixtral directory (per-expert or fused
//! expert tensors, one file or shards; f32, f16 or bf16), or from our own `safetensors`
//! export, so it can be evaluated, fine-tuned and served.

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use moe_data::TextTokenizer;
use moe_model::Transformer;

use crate::checkpoint::{CONFIG_FILE, read_tokenizer, save_model_checkpoint};
use crate::config::RunConfig;
use crate::hf_mixtral;
use crate::integrity::{NonFinite, check_finite};
use crate::memory::MemoryEstimate;
use crate::model_tensors::load_model_tensors;
use crate::safetensors_file::read_model_dir;

/// A model read from an exported or Hugging Face directory, with its config and tokenizer.
pub struct Imported<B: Backend> {
    /// The model.
    pub model: Transformer<B>,
    /// Its shapes and fine-tuning defaults (see [`RunConfig::for_model`]), or the exported
    /// config for our own format.
    pub config: RunConfig,
    /// The directory's `tokenizer.json`, if it has one.
    pub tokenizer: Option<TextTokenizer>,
}

/// Reads the model of `dir`: our `safetensors` export if it holds a `config.toml`, else a
/// Hugging Face Mixtral (`config.json`). Its size is checked against the machine's memory
/// before the weights are read, and non-finite weights are refused unless `nonfinite`
/// allows them.
pub fn read_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
    nonfinite: NonFinite,
) -> Result<Imported<B>> {
    let ours = dir.join(CONFIG_FILE).is_file();
    let config = if ours {
        RunConfig::parse_saved(&dir.join(CONFIG_FILE))?
    } else {
        let (model, moe) = hf_mixtral::configs_from_json(&hf_mixtral::read_config(dir)?)?;
        RunConfig::for_model(model, moe)
    };
    // The file's bytes, their f32 tensors and the model.
    MemoryEstimate::weights(&config, 3)?.ensure_fits()?;
    let tensors = read_model_dir(dir)?;
    check_finite(&tensors, nonfinite, dir)?;
    let tensors = match ours {
        true => tensors,
        false => hf_mixtral::from_mixtral(tensors, &config.model, &config.moe)
            .with_context(|| format!("reading the Mixtral weights of {}", dir.display()))?,
    };
    let model = Transformer::new(&config.model, &config.moe, device)?;
    let model = load_model_tensors(model, tensors)
        .with_context(|| format!("loading the weights of {}", dir.display()))?;
    let tokenizer = read_tokenizer(dir)?;
    Ok(Imported {
        model,
        config,
        tokenizer,
    })
}

/// Imports `from` as the new checkpoint directory `out`; returns whether it had a
/// tokenizer (a checkpoint without one can be scored from token ids but not on text).
pub fn import<B: Backend>(
    from: &Path,
    out: &Path,
    device: &B::Device,
    nonfinite: NonFinite,
) -> Result<bool> {
    let imported = read_model::<B>(from, device, nonfinite)?;
    save_model_checkpoint(
        out,
        &imported.model,
        &imported.config,
        imported.tokenizer.as_ref(),
    )?;
    Ok(imported.tokenizer.is_some())
}
