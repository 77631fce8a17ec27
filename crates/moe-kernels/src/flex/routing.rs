//! Routing on flex: each token's scores, top-k and combine weights in one pass over its
//! row of logits, parallel over tokens. The reference makes a tensor op of every step
//! (softmax, bias, a sort for the top-k, gather, normalisation), each a pass over all
//! tokens on one thread.

use rayon::prelude::*;

use crate::Gate;

/// Tokens per rayon task.
const TOKENS_PER_TASK: usize = 256;

/// `(weights, experts)`, both `[T, top_k]` row-major, of `logits: [T, n_experts]`: the
/// reference's `route_forward` (best first; among equal scores the lower expert index).
pub fn route(logits: &[f32], bias: &[f32], gate: Gate, top_k: usize) -> (Vec<f32>, Vec<i32>) {
    let n_experts = bias.len();
    let tokens = logits.len() / n_experts.max(1);
    let mut weights = vec![0.0; tokens * top_k];
    let mut experts = vec![0; tokens * top_k];
    if top_k == 0 || n_experts == 0 {
        return (weights, experts);
    }
    weights
        .par_chunks_mut(top_k * TOKENS_PER_TASK)
        .zip(experts.par_chunks_mut(top_k * TOKENS_PER_TASK))
        .zip(logits.par_chunks(n_experts * TOKENS_PER_TASK))
        .for_each(|((weights, experts), logits)| {
            let mut scores = vec![0.0; n_experts];
            for ((weights, experts), logits) in weights
                .chunks_mut(top_k)
                .zip(experts.chunks_mut(top_k))
                .zip(logits.chunks(n_experts))
            {
                route_token(logits, bias, gate, &mut scores, weights, experts);
            }
        });
    (weights, experts)
}

/// [`route`] of one token's `logits`, using `scores` (`n_experts` long) as scratch.
fn route_token(
    logits: &[f32],
    bias: &[f32],
    gate: Gate,
    scores: &mut [f32],
    weights: &mut [f32],
    experts: &mut [i32],
) {
    match gate {
        Gate::Softmax { .. } => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            scores
                .iter_mut()
                .zip(logits)
                .for_each(|(s, &l)| *s = (l - max).exp());
            let inv = 1.0 / scores.iter().sum::<f32>();
            scores.iter_mut().for_each(|s| *s *= inv);
        }
        Gate::TopkSoftmax => scores.copy_from_slice(logits),
        Gate::Sigmoid { .. } => scores
            .iter_mut()
            .zip(logits)
            .for_each(|(s, &l)| *s = 1.0 / (1.0 + (-l).exp())),
    }
    for j in 0..experts.len() {
        let chosen = &experts[..j];
        let mut best: Option<usize> = None;
        for e in 0..scores.len() {
            if chosen.contains(&(e as i32)) {
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => scores[e] + bias[e] > scores[b] + bias[b],
            };
            if better {
                best = Some(e);
            }
        }
        let best = best.expect("top_k <= n_experts");
        experts[j] = best as i32;
        weights[j] = scores[best];
    }
    match gate {
        Gate::Softmax { renormalize: true } => normalise(weights, 1.0),
        Gate::Softmax { renormalize: false } => {}
        Gate::TopkSoftmax => {
            let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            weights.iter_mut().for_each(|w| *w = (*w - max).exp());
            normalise(weights, 1.0);
        }
        Gate::Sigmoid { scale } => normalise(weights, scale),
    }
}

/// Scales `weights` to sum to `total`.
fn normalise(weights: &mut [f32], total: f32) {
    let sum = weights.iter().sum::<f32>();
    weights.iter_mut().for_each(|w| *w = *w / sum * total);
}
