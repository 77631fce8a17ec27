//! Validation: loss, bits per byte, perplexity and expert load over held-out tokens.

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::ElementConversion;
use moe_data::{EvalWindows, LmBatch, LmBatcher};
use moe_model::{MoeBackend, Transformer};
use serde::{Deserialize, Serialize};

use crate::metrics::LayerLoad;
use crate::router_stats::RouterStatsAccumulator;

/// Result of one validation pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean next-token cross-entropy in nats.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub val_loss: f64,
    /// Bits per UTF-8 byte of the predicted tokens.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub bpb: f64,
    /// exp(val_loss).
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub perplexity: f64,
    /// Tokens scored.
    pub tokens: usize,
    /// Router statistics per MoE layer.
    pub expert_load: Vec<LayerLoad>,
}

/// Scores `windows` in batches of `batch_size` (at most `max_batches`). Bits per byte
/// use each split's bytes per token from its `meta.json`.
pub fn evaluate<B: MoeBackend>(
    model: &Transformer<B>,
    windows: &EvalWindows,
    batch_size: usize,
    max_batches: Option<usize>,
    device: &B::Device,
) -> anyhow::Result<EvalResult> {
    if windows.is_empty() {
        anyhow::bail!("the validation split is too short for one window");
    }
    anyhow::ensure!(
        max_batches != Some(0) && batch_size > 0,
        "an evaluation needs at least one batch of at least one window"
    );
    let n_batches = windows
        .len()
        .div_ceil(batch_size)
        .min(max_batches.unwrap_or(usize::MAX));
    let mut stats = RouterStatsAccumulator::default();
    let (mut nll, mut scored, mut bytes) = (0.0, 0usize, 0.0);
    for b in 0..n_batches {
        let range = b * batch_size..((b + 1) * batch_size).min(windows.len());
        let (items, batch_bytes) = windows.batch(range);
        bytes += batch_bytes;
        let batch: LmBatch<B> = LmBatcher.batch(items, device);
        let (loss, moe) = model.token_nll(batch.inputs, batch.targets);
        let (batch_nll, batch_scored) = match batch.mask {
            None => (loss.clone().sum(), loss.dims()[0]),
            Some(mask) => {
                let mask = mask.flatten(0, 1);
                let count = mask.clone().sum().into_scalar().elem::<f64>() as usize;
                ((loss * mask).sum(), count)
            }
        };
        scored += batch_scored;
        nll += batch_nll.into_scalar().elem::<f64>();
        stats.add(&moe);
    }
    anyhow::ensure!(
        scored > 0,
        "the validation windows hold no token to score (chat data without answers?)"
    );
    let val_loss = nll / scored as f64;
    Ok(EvalResult {
        val_loss,
        bpb: nll / (std::f64::consts::LN_2 * bytes.max(1.0)),
        perplexity: val_loss.exp(),
        tokens: scored,
        expert_load: stats.take(),
    })
}
