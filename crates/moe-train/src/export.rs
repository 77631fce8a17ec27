//! `moe export`: a checkpoint as a directory of portable files, either every parameter
//! under our own module paths (`safetensors`) or a Hugging Face `MixtralForCausalLM`
//! (`hf`).

use std::path::Path;

use anyhow::{Result, bail};
use burn::tensor::backend::Backend;

use crate::checkpoint::{CONFIG_FILE, TOKENIZER_FILE, load_source, write_new_dir};
use crate::hf_mixtral;
use crate::integrity::NonFinite;
use crate::model_tensors::model_tensors;
use crate::safetensors_file::write_file;

/// The weights file of an exported directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// What `moe export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// `model.safetensors` with our parameter names and layouts (see
    /// [`crate::model_tensors`]), `config.toml` and `tokenizer.json`.
    Safetensors,
    /// A Hugging Face Mixtral directory (see [`crate::hf_mixtral`]): `config.json`,
    /// `model.safetensors`, `generation_config.json` and `tokenizer.json`.
    Hf,
}

/// Exports the checkpoint `checkpoint` (or a run directory's latest) to the new directory
/// `out`, built under a temporary name and renamed into place; an existing `out` is never
/// touched. Non-finite weights are refused unless `nonfinite` allows them.
pub fn export<B: Backend>(
    checkpoint: &Path,
    format: ExportFormat,
    out: &Path,
    device: &B::Device,
    nonfinite: NonFinite,
) -> Result<()> {
    let (model, config, tokenizer) = load_source::<B>(checkpoint, out, device, nonfinite)?;
    if format == ExportFormat::Hf
        && let Some(feature) = hf_mixtral::unsupported_feature(&config.model, &config.moe)
    {
        bail!(
            "cannot export as Hugging Face Mixtral: the model uses {feature}, which Mixtral lacks"
        );
    }
    let tensors = model_tensors(&model)?;
    write_new_dir(out, |tmp| {
        match format {
            ExportFormat::Safetensors => {
                let metadata = [("format", "moe"), ("layout", "burn module paths")]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into();
                write_file(&tmp.join(WEIGHTS_FILE), &tensors, metadata)?;
                std::fs::write(tmp.join(CONFIG_FILE), config.to_toml()?)?;
            }
            ExportFormat::Hf => {
                let eos = tokenizer.as_ref().and_then(|t| t.end_of_text());
                let tensors = hf_mixtral::to_mixtral(tensors, &config.model, &config.moe)?;
                write_file(
                    &tmp.join(WEIGHTS_FILE),
                    &tensors,
                    hf_mixtral::safetensors_metadata(),
                )?;
                let json = |value: serde_json::Value| serde_json::to_string_pretty(&value);
                std::fs::write(
                    tmp.join("config.json"),
                    json(hf_mixtral::config_json(&config.model, &config.moe, eos)?)?,
                )?;
                // Generation also ends at the chat template's end of turn.
                let mut eos_tokens: Vec<u32> = eos.into_iter().collect();
                if let Some(tokenizer) = &tokenizer {
                    let template = tokenizer.chat_template();
                    let end_of_turn = template.eos_token().and_then(|t| tokenizer.token_id(t));
                    eos_tokens.extend(end_of_turn.filter(|id| !eos_tokens.contains(id)));
                }
                std::fs::write(
                    tmp.join("generation_config.json"),
                    json(hf_mixtral::generation_config_json(&eos_tokens))?,
                )?;
            }
        }
        if let Some(tokenizer) = &tokenizer {
            tokenizer.save(&tmp.join(TOKENIZER_FILE))?;
        }
        Ok(())
    })
}
