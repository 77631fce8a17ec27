//! Validation: loss, bits per byte, perplexity and expert load over held-out tokens.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::ElementConversion;
use moe_data::{LmBatch, LmBatcher, TokenWindows};
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

/// Scores `tokens` in consecutive windows of `seq_len` (batches of `batch_size`, at most
/// `max_batches`). `token_bytes[id]` is the byte length of token `id`, for bpb.
pub fn evaluate<B: MoeBackend>(
    model: &Transformer<B>,
    tokens: Arc<Vec<u32>>,
    token_bytes: &[u32],
    seq_len: usize,
    batch_size: usize,
    max_batches: Option<usize>,
    device: &B::Device,
) -> anyhow::Result<EvalResult> {
    let windows = TokenWindows::new(tokens, seq_len, 0);
    if windows.is_empty() {
        anyhow::bail!("validation set has fewer than {} tokens", seq_len + 1);
    }
    let n_batches = windows
        .len()
        .div_ceil(batch_size)
        .min(max_batches.unwrap_or(usize::MAX));
    let mut stats = RouterStatsAccumulator::default();
    let (mut nll, mut scored, mut bytes) = (0.0, 0usize, 0u64);
    for b in 0..n_batches {
        let items: Vec<Vec<u32>> = (b * batch_size..((b + 1) * batch_size).min(windows.len()))
            .filter_map(|i| windows.get(i))
            .collect();
        bytes += items
            .iter()
            .flat_map(|w| w[1..].iter())
            .map(|&t| token_bytes.get(t as usize).copied().unwrap_or(0) as u64)
            .sum::<u64>();
        let batch: LmBatch<B> = LmBatcher.batch(items, device);
        let (loss, moe) = model.token_nll(batch.inputs, batch.targets);
        scored += loss.dims()[0];
        nll += loss.sum().into_scalar().elem::<f64>();
        stats.add(&moe);
    }
    let val_loss = nll / scored as f64;
    Ok(EvalResult {
        val_loss,
        bpb: nll / (std::f64::consts::LN_2 * bytes.max(1) as f64),
        perplexity: val_loss.exp(),
        tokens: scored,
        expert_load: stats.take(),
    })
}
