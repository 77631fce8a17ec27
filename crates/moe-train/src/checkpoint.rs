//! Checkpoints: a directory per step holding the model, the optimiser state, the config
//! and the tokenizer, written to a temporary name and renamed into place.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::Backend;
use moe_data::TextTokenizer;
use moe_model::Transformer;
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::integrity::{NonFinite, check_finite, verify_checkpoint, write_manifest};
use crate::memory::MemoryEstimate;
use crate::model_tensors::model_tensors;

/// Files of a checkpoint directory.
pub const MODEL_FILE: &str = "model";
/// Optimiser state (AdamW moments), needed to resume.
pub const OPTIMIZER_FILE: &str = "optimizer";
/// The run config the model was built from.
pub const CONFIG_FILE: &str = "config.toml";
/// The tokenizer the model was trained with.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Training progress ([`TrainingState`]).
pub const STATE_FILE: &str = "state.json";
const CHECKPOINTS_DIR: &str = "checkpoints";

/// Where training stood when a checkpoint was written.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimiser steps completed.
    pub step: usize,
    /// Wall-clock seconds of training so far.
    pub elapsed_secs: f64,
}

/// The recorder used for model and optimiser records.
pub fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

/// The directory name of the checkpoint at `step`.
fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint of `model` (and the optimiser record) under `run_dir/checkpoints`,
/// atomically, then deletes all but the newest `keep`. Returns its directory.
pub fn save_checkpoint<B: Backend, M: Module<B>, R: burn::record::Record<B>>(
    run_dir: &Path,
    model: &M,
    optimizer: R,
    config: &RunConfig,
    tokenizer: &TextTokenizer,
    state: TrainingState,
    keep: usize,
) -> Result<PathBuf> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let dest = root.join(step_dir_name(state.step));
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    write_new_dir(&dest, |tmp| {
        let recorder = recorder();
        model
            .clone()
            .save_file(tmp.join(MODEL_FILE), &recorder)
            .context("writing the model record")?;
        recorder
            .record(optimizer, tmp.join(OPTIMIZER_FILE))
            .context("writing the optimizer record")?;
        std::fs::write(tmp.join(CONFIG_FILE), config.to_toml()?)?;
        tokenizer.save(&tmp.join(TOKENIZER_FILE))?;
        std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(&state)?)?;
        write_manifest(tmp)
    })?;
    let all = list_checkpoints(run_dir)?;
    for old in all.iter().take(all.len().saturating_sub(keep)) {
        prune(old)?;
    }
    Ok(dest)
}

/// Deletes the checkpoint `dir`: renamed out of the `step-*` names first, so a reader
/// listing the run's checkpoints never picks one that is half deleted.
fn prune(dir: &Path) -> Result<()> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let doomed = dir.with_file_name(format!(".pruned-{name}"));
    std::fs::rename(dir, &doomed)
        .and_then(|()| std::fs::remove_dir_all(&doomed))
        .with_context(|| format!("removing old checkpoint {}", dir.display()))
}

/// Complete checkpoints of a run directory, oldest first.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                && p.join(STATE_FILE).is_file()
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Resolves `path` to one checkpoint directory: itself if it is one, else the newest
/// checkpoint of the run directory it names.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).is_file() && path.join(CONFIG_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        bail!("checkpoint path `{}` does not exist", path.display());
    }
    list_checkpoints(path)?.pop().with_context(|| {
        format!(
            "`{}` is neither a checkpoint (no {STATE_FILE}) nor a run directory with checkpoints",
            path.display()
        )
    })
}

/// Reads a checkpoint's training state.
pub fn load_state(checkpoint: &Path) -> Result<TrainingState> {
    let path = checkpoint.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A model loaded from a checkpoint, with its config and tokenizer.
pub struct LoadedModel<B: Backend> {
    /// The model.
    pub model: Transformer<B>,
    /// The config it was trained with.
    pub config: RunConfig,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// The checkpoint directory it came from.
    pub checkpoint: PathBuf,
}

/// Loads the model of `path` (a checkpoint or a run directory) onto `device`.
pub fn load_model<B: Backend>(
    path: &Path,
    device: &B::Device,
    nonfinite: NonFinite,
) -> Result<LoadedModel<B>> {
    let loaded = read_checkpoint(path, device, nonfinite)?;
    let tokenizer = loaded
        .tokenizer
        .with_context(|| no_tokenizer(&loaded.checkpoint))?;
    Ok(LoadedModel {
        model: loaded.model,
        config: loaded.config,
        tokenizer,
        checkpoint: loaded.checkpoint,
    })
}

/// The model, config and tokenizer (if it has one) of `path`, for a command that writes
/// the new directory `out` from them: an existing `out` is refused before anything loads.
pub fn load_source<B: Backend>(
    path: &Path,
    out: &Path,
    device: &B::Device,
    nonfinite: NonFinite,
) -> Result<(Transformer<B>, RunConfig, Option<TextTokenizer>)> {
    ensure!(
        !out.exists(),
        "{} already exists; choose another --out (nothing was overwritten)",
        out.display()
    );
    let loaded = read_checkpoint::<B>(path, device, nonfinite)?;
    Ok((loaded.model, loaded.config, loaded.tokenizer))
}

/// The tokenizer of the checkpoint directory `checkpoint`; an error says what to do if it
/// has none.
pub fn load_tokenizer(checkpoint: &Path) -> Result<TextTokenizer> {
    read_tokenizer(checkpoint)?.with_context(|| no_tokenizer(checkpoint))
}

/// The error for a checkpoint without a tokenizer, saying what to do.
fn no_tokenizer(checkpoint: &Path) -> String {
    format!(
        "checkpoint {} has no {TOKENIZER_FILE} (imported from a directory without one?): copy \
         the model's tokenizer.json into it",
        checkpoint.display()
    )
}

/// The `tokenizer.json` of `dir`, if it has one.
pub fn read_tokenizer(dir: &Path) -> Result<Option<TextTokenizer>> {
    let path = dir.join(TOKENIZER_FILE);
    path.is_file()
        .then(|| TextTokenizer::load(&path))
        .transpose()
}

/// The model and config of `path` (a checkpoint or a run directory), and the checkpoint
/// directory it resolved to; no tokenizer needed.
pub fn load_weights<B: Backend>(
    path: &Path,
    device: &B::Device,
    nonfinite: NonFinite,
) -> Result<(Transformer<B>, RunConfig, PathBuf)> {
    let loaded = read_checkpoint::<B>(path, device, nonfinite)?;
    Ok((loaded.model, loaded.config, loaded.checkpoint))
}

/// Everything read from one checkpoint.
struct ReadCheckpoint<B: Backend> {
    model: Transformer<B>,
    config: RunConfig,
    tokenizer: Option<TextTokenizer>,
    checkpoint: PathBuf,
}

/// Reads the checkpoint `path` names (itself, or a run directory's newest). A run that
/// is training there may prune the checkpoint while it is read, so a read may miss an
/// optional file (the tokenizer) without failing: whenever the checkpoint is gone after
/// the read, the newest is resolved and read again.
fn read_checkpoint<B: Backend>(
    path: &Path,
    device: &B::Device,
    nonfinite: NonFinite,
) -> Result<ReadCheckpoint<B>> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let checkpoint = resolve_checkpoint(path)?;
        let read = read_resolved(&checkpoint, device, nonfinite);
        let pruned = checkpoint != path && !checkpoint.exists();
        if !pruned {
            return read.map(|(model, config, tokenizer)| ReadCheckpoint {
                model,
                config,
                tokenizer,
                checkpoint,
            });
        }
        if attempt == ATTEMPTS {
            bail!(
                "checkpoint {} was removed while it was read ({ATTEMPTS} times in a row: the \
                 run training in {} prunes its checkpoints faster than they load); read a \
                 checkpoint that stays, or raise train.keep_checkpoints",
                checkpoint.display(),
                path.display()
            );
        }
        attempt += 1;
    }
}

/// The verified model, config and tokenizer of the checkpoint directory `checkpoint`.
fn read_resolved<B: Backend>(
    checkpoint: &Path,
    device: &B::Device,
    nonfinite: NonFinite,
) -> Result<(Transformer<B>, RunConfig, Option<TextTokenizer>)> {
    verify_checkpoint(checkpoint)?;
    let config = RunConfig::parse_saved(&checkpoint.join(CONFIG_FILE))?;
    // The new model, the record read into it, and the finite check's host copy.
    MemoryEstimate::weights(&config, 3)?.ensure_fits()?;
    let model = Transformer::new(&config.model, &config.moe, device)?
        .load_file(checkpoint.join(MODEL_FILE), &recorder(), device)
        .with_context(|| format!("loading model weights from {}", checkpoint.display()))?;
    if nonfinite == NonFinite::Refuse {
        check_finite(&model_tensors(&model)?, nonfinite, checkpoint)?;
    }
    let tokenizer = read_tokenizer(checkpoint)?;
    Ok((model, config, tokenizer))
}

/// Writes `model` as a fresh checkpoint directory `dir` (step 0, no optimiser state), for
/// imported and converted models: built under a temporary name and renamed into place.
/// An existing `dir` is never overwritten.
pub fn save_model_checkpoint<B: Backend>(
    dir: &Path,
    model: &Transformer<B>,
    config: &RunConfig,
    tokenizer: Option<&TextTokenizer>,
) -> Result<()> {
    write_new_dir(dir, |tmp| {
        model
            .clone()
            .save_file(tmp.join(MODEL_FILE), &recorder())
            .context("writing the model record")?;
        std::fs::write(tmp.join(CONFIG_FILE), config.to_toml()?)?;
        if let Some(tokenizer) = tokenizer {
            tokenizer.save(&tmp.join(TOKENIZER_FILE))?;
        }
        let state = TrainingState {
            step: 0,
            elapsed_secs: 0.0,
        };
        std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(&state)?)?;
        write_manifest(tmp)
    })
}

/// Creates the directory `dir`, which must not exist, all or nothing: `fill` writes its
/// files into a temporary sibling that is then renamed to `dir`; on failure the
/// temporary directory is removed and `dir` does not appear.
pub fn write_new_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    ensure!(
        !dir.exists(),
        "{} already exists; choose another output path (nothing was overwritten)",
        dir.display()
    );
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?;
    let tmp = dir.with_file_name(format!(".tmp-{}", name.to_string_lossy()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let filled = fill(&tmp).and_then(|()| {
        std::fs::rename(&tmp, dir).with_context(|| format!("moving into {}", dir.display()))
    });
    if filled.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    filled
}
