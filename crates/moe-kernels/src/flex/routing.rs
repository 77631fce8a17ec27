//! Routing on flex: each token's scores, top-k and combine weights in one pass over its
//! row of logits, parallel over tokens. The reference makes a tensor op of every step
//! (softmax, bias, a sort for the top-k, gather, normalisation), each a pass over all
//! tokens on one thread.

use rayon::prelude::*;

use crate::Gate;

/// Tokens per rayon task of the router's loops over tokens.
pub(super) const TOKENS_PER_TASK: usize = 256;

/// One token's row of router logits, with its softmax statistics.
pub(super) struct Row<'a> {
    logits: &'a [f32],
    /// `max_j logits_j`.
    max: f32,
    /// `sum_j exp(logits_j - max)`.
    sum_exp: f32,
}

impl<'a> Row<'a> {
    pub(super) fn new(logits: &'a [f32]) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum_exp = logits.iter().map(|&l| (l - max).exp()).sum();
        Self {
            logits,
            max,
            sum_exp,
        }
    }

    /// `log sum_j exp(logits_j)`.
    pub(super) fn log_sum_exp(&self) -> f32 {
        self.sum_exp.ln() + self.max
    }

    /// Softmax probability of expert `j`.
    pub(super) fn softmax(&self, j: usize) -> f32 {
        (self.logits[j] - self.max).exp() / self.sum_exp
    }

    /// Sigmoid score of expert `j`.
    pub(super) fn sigmoid(&self, j: usize) -> f32 {
        1.0 / (1.0 + (-self.logits[j]).exp())
    }
}

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
    let row = Row::new(logits);
    for (j, score) in scores.iter_mut().enumerate() {
        *score = match gate {
            Gate::SoftmaxTopk { .. } => row.softmax(j),
            Gate::TopkSoftmax => logits[j],
            Gate::Sigmoid { .. } => row.sigmoid(j),
        };
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
        Gate::SoftmaxTopk { renormalize: true } => normalise(weights, 1.0),
        Gate::SoftmaxTopk { renormalize: false } => {}
        Gate::TopkSoftmax => {
            let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            weights.iter_mut().for_each(|w| *w = (*w - max).exp());
            normalise(weights, 1.0);
        }
        Gate::Sigmoid { scale } => normalise(weights, scale as f32),
    }
}

/// Scales `weights` to sum to `total`.
fn normalise(weights: &mut [f32], total: f32) {
    let sum = weights.iter().sum::<f32>();
    weights.iter_mut().for_each(|w| *w = *w / sum * total);
}
