//! The `--checkpoint` of the commands that read a model, with `--allow-nonfinite`.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::Backend;
use moe_train::{LoadedModel, NonFinite, load_model};

/// A checkpoint to read, and whether weights that are not finite may load.
#[derive(clap::Args, Debug)]
pub(crate) struct CheckpointArg {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// Load weights holding NaN or infinite values (refused by default, naming the
    /// tensor), e.g. to inspect a run that diverged.
    #[arg(long)]
    pub(crate) allow_nonfinite: bool,
}

impl CheckpointArg {
    /// The weight check `--allow-nonfinite` asks for.
    pub(crate) fn nonfinite(&self) -> NonFinite {
        nonfinite(self.allow_nonfinite)
    }

    /// The checkpoint's model, config and tokenizer, on `device`.
    pub(crate) fn load<B: Backend>(&self, device: &B::Device) -> Result<LoadedModel<B>> {
        load_model(&self.checkpoint, device, self.nonfinite())
    }
}

/// The weight check of an `--allow-nonfinite` flag.
pub(crate) fn nonfinite(allow: bool) -> NonFinite {
    if allow {
        NonFinite::Allow
    } else {
        NonFinite::Refuse
    }
}
