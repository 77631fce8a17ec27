//! Autoregressive generation with a KV cache.

use std::ops::ControlFlow;

use burn::tensor::{Int, Tensor};

use crate::sampling::{Sampler, SamplingConfig};
use crate::transformer::{KvCache, Transformer};
use moe_kernels::MoeBackend;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_tokens` were produced or the context window is full.
    Length,
    /// The caller's `on_token` asked to stop (a stop string, a time limit, a client gone).
    Interrupted,
}

/// Generated token ids and why generation ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens, not including the prompt.
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
}

/// Generates up to `max_tokens` after `prompt`, stopping early at any of `stop_tokens` or
/// when prompt plus output fill the context window (`max_seq_len`). Prompts longer than the window keep
/// their last tokens. `on_token` sees each new token as it is produced and may end
/// generation by returning `ControlFlow::Break`.
pub fn generate<B: MoeBackend>(
    model: &Transformer<B>,
    prompt: &[u32],
    max_tokens: usize,
    stop_tokens: &[u32],
    sampling: SamplingConfig,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    device: &B::Device,
) -> Generation {
    let window = model.model_config().max_seq_len;
    let prompt = &prompt[prompt.len().saturating_sub(window.saturating_sub(1))..];
    let mut sampler = Sampler::new(sampling);
    let mut cache = KvCache::new(model.model_config().n_layers);
    let mut tokens = Vec::new();
    let mut input: Vec<u32> = if prompt.is_empty() {
        vec![0]
    } else {
        prompt.to_vec()
    };
    loop {
        if tokens.len() >= max_tokens || prompt.len() + tokens.len() >= window {
            return Generation {
                tokens,
                finish_reason: FinishReason::Length,
            };
        }
        let ids: Vec<i64> = input.iter().map(|&t| t as i64).collect();
        let len = ids.len();
        let x = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), device).reshape([1, len]);
        let logits = model.forward_cached(x, Some(&mut cache)).logits;
        let vocab = logits.dims()[2];
        let last = logits
            .slice([0..1, len - 1..len, 0..vocab])
            .reshape([vocab]);
        let row: Vec<f32> = last
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        let next = sampler.sample(&row) as u32;
        if stop_tokens.contains(&next) {
            return Generation {
                tokens,
                finish_reason: FinishReason::Stop,
            };
        }
        tokens.push(next);
        if on_token(next).is_break() {
            return Generation {
                tokens,
                finish_reason: FinishReason::Interrupted,
            };
        }
        input = vec![next];
    }
}
