//! Log-probabilities of tokens under the model, for OpenAI's `logprobs`: the log-softmax
//! of the raw logits (before temperature, penalties or biases), with the most likely
//! alternatives.

use burn::tensor::{Int, Tensor};

use crate::transformer::Transformer;
use moe_kernels::MoeBackend;

/// A token's log-probability at its position and the most likely tokens there.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `token` under one row of `logits`, and the `top` most likely
/// tokens (ties in id order). The normaliser is summed in f64.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_norm = max as f64 + total.ln();
    let logprob = |id: usize| (f64::from(logits[id]) - log_norm) as f32;
    let mut ids: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(ids.len());
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if top > 0 && top < ids.len() {
        ids.select_nth_unstable_by(top - 1, by_logit);
    }
    ids.truncate(top);
    ids.sort_by(by_logit);
    TokenLogprob {
        token,
        logprob: logprob(token as usize),
        top: ids.into_iter().map(|id| (id as u32, logprob(id))).collect(),
    }
}

/// The log-probability of each token of `prompt` after the ones before it, from one full
/// forward pass: entries for `prompt[1..]` (the first token has no context). `prompt` must
/// fit the context window.
pub fn prompt_logprobs<B: MoeBackend>(
    model: &Transformer<B>,
    prompt: &[u32],
    top: usize,
    device: &B::Device,
) -> Vec<TokenLogprob> {
    if prompt.len() < 2 {
        return Vec::new();
    }
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let tokens = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), device).reshape([1, ids.len()]);
    let logits = model.forward(tokens).logits;
    let [_, seq, vocab] = logits.dims();
    // The last position predicts past the prompt: not needed.
    let rows: Vec<f32> = logits
        .narrow(1, 0, seq - 1)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    rows.chunks(vocab)
        .zip(&prompt[1..])
        .map(|(row, &token)| token_logprob(row, token, top))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_the_top_tokens() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let norm = (1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp()).ln();
        let got = token_logprob(&logits, 2, 3);
        assert!((got.logprob as f64 - (2.0 - norm)).abs() < 1e-6);
        let top: Vec<u32> = got.top.iter().map(|t| t.0).collect();
        assert_eq!(top, [1, 3, 2], "ties in id order");
        assert_eq!(got.top[0].1, got.top[1].1);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprob(&logits, 0, 9).top.len(), 4);
    }
}
