//! Memory estimates checked before anything is allocated: a config that cannot fit is
//! refused with its size named, instead of growing until the kernel kills the machine's
//! processes or an allocation aborts.

use anyhow::{Result, bail};

use crate::config::RunConfig;

/// Bytes of one f32.
const F32: u64 = 4;

/// What a command is about to hold in memory for a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The model's parameters.
    pub parameters: u64,
    /// Estimated peak bytes.
    pub bytes: u64,
    /// What the estimate covers, for messages ("training", "the model").
    pub what: &'static str,
}

impl MemoryEstimate {
    /// Holding `copies` copies of the model's weights (loading, importing, upcycling:
    /// a record or host tensors beside the model).
    pub fn weights(config: &RunConfig, copies: u64) -> Result<Self> {
        let parameters = config.model.parameter_count(&config.moe)?;
        Ok(Self {
            parameters,
            bytes: parameters.saturating_mul(F32).saturating_mul(copies),
            what: "the model",
        })
    }

    /// Training: weights, gradients and AdamW's two moments (4 copies of the
    /// parameters), plus the activations autodiff keeps for a micro-batch of every
    /// replica in this process (per token and layer: the attention's projections and
    /// scores, the routed experts' hidden states; per token: the logits, their softmax
    /// and gradient).
    pub fn training(config: &RunConfig) -> Result<Self> {
        let weights = Self::weights(config, 4)?;
        let (model, moe, train) = (&config.model, &config.moe, &config.train);
        let tokens = [train.batch_size, config.data.seq_len, train.replicas]
            .iter()
            .fold(1u64, |acc, &n| acc.saturating_mul(n as u64));
        let (d, seq) = (model.d_model as u64, config.data.seq_len as u64);
        let per_layer = (12 * d)
            .saturating_add(
                2u64.saturating_mul(model.n_heads as u64)
                    .saturating_mul(seq),
            )
            .saturating_add(
                (moe.top_k as u64 + moe.n_shared_experts as u64)
                    .saturating_mul(2 * d + 3 * moe.expert_ffn_dim as u64),
            )
            .saturating_add(3 * model.dense_ffn_dim as u64);
        let per_token = per_layer
            .saturating_mul(model.n_layers as u64)
            .saturating_add(3u64.saturating_mul(model.vocab_size as u64));
        let activations = tokens.saturating_mul(per_token).saturating_mul(F32);
        Ok(Self {
            bytes: weights.bytes.saturating_add(activations),
            what: "training",
            ..weights
        })
    }

    /// Refuses the estimate when it exceeds `limit` bytes.
    pub fn ensure_within(&self, limit: u64, limit_name: &str) -> Result<()> {
        if self.bytes > limit {
            bail!(
                "{} needs about {} ({} parameters), more than {limit_name} ({}); make the \
                 model or batch smaller",
                self.what,
                human_bytes(self.bytes),
                self.parameters,
                human_bytes(limit),
            );
        }
        Ok(())
    }

    /// Refuses the estimate when it exceeds this machine's available memory. Where that
    /// is unknown (no `/proc/meminfo`), nothing is checked.
    pub fn ensure_fits(&self) -> Result<()> {
        match available_memory() {
            Some(available) => self.ensure_within(available, "this machine's available memory"),
            None => Ok(()),
        }
    }
}

/// Bytes of memory available to new allocations (Linux's `MemAvailable`), if known.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// `bytes` in the largest binary unit that keeps a number >= 1 ("3.2 GiB").
fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_the_largest_unit() {
        assert_eq!(human_bytes(512), "512.0 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
