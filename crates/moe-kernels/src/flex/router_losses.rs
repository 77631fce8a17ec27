//! The router's loss terms and statistics on flex: one pass over the logits' rows, parallel
//! over blocks of tokens, for the forward and one for the gradient. The reference makes a
//! tensor op of every step (two softmaxes, sums, logs, squares, means; each a pass over
//! all tokens on one thread), and autodiff records each of them for the backward.

use rayon::prelude::*;

use super::routing::{Row, TOKENS_PER_TASK};
use crate::Gate;
use crate::reference::router_losses::balance_scale;

/// The router distribution over the experts under `gate` of one token's `row`, into
/// `probs`; for sigmoid gates also the scores into `scores` and their sum returned, else 0.
fn distribution(row: &Row, gate: Gate, probs: &mut [f32], scores: &mut [f32]) -> f32 {
    match gate {
        Gate::SoftmaxTopk { .. } | Gate::TopkSoftmax => {
            for (j, p) in probs.iter_mut().enumerate() {
                *p = row.softmax(j);
            }
            0.0
        }
        Gate::Sigmoid { .. } => {
            for (j, s) in scores.iter_mut().enumerate() {
                *s = row.sigmoid(j);
            }
            let sum: f32 = scores.iter().sum();
            for (p, &s) in probs.iter_mut().zip(scores.iter()) {
                *p = s / sum;
            }
            sum
        }
    }
}

/// What a block of tokens adds to the forward's sums.
struct Partial {
    prob_mass: Vec<f64>,
    z: f64,
    entropy: f64,
    max_abs: f32,
}

impl Partial {
    fn zero(n_experts: usize) -> Self {
        Self {
            prob_mass: vec![0.0; n_experts],
            z: 0.0,
            entropy: 0.0,
            max_abs: 0.0,
        }
    }

    fn add(mut self, other: Partial) -> Self {
        for (a, b) in self.prob_mass.iter_mut().zip(other.prob_mass) {
            *a += b;
        }
        self.z += other.z;
        self.entropy += other.entropy;
        self.max_abs = self.max_abs.max(other.max_abs);
        self
    }
}

/// `[balance, z, entropy, max |logit|]` of `logits: [T, E]` (row-major) with `counts: [E]`:
/// the reference's `router_losses_forward`, for at least one token and one expert.
pub fn forward(logits: &[f32], counts: &[usize], gate: Gate, top_k: usize) -> [f32; 4] {
    let n_experts = counts.len();
    let tokens = logits.len() / n_experts;
    let sums = logits
        .par_chunks(n_experts * TOKENS_PER_TASK)
        .map(|block| {
            let mut partial = Partial::zero(n_experts);
            let (mut probs, mut scores) = (vec![0.0; n_experts], vec![0.0; n_experts]);
            for logits in block.chunks(n_experts) {
                let row = Row::new(logits);
                distribution(&row, gate, &mut probs, &mut scores);
                for (mass, &p) in partial.prob_mass.iter_mut().zip(&probs) {
                    *mass += p as f64;
                }
                partial.z += (row.log_sum_exp() as f64).powi(2);
                partial.entropy -= probs
                    .iter()
                    .map(|&p| (p * p.max(1e-12).ln()) as f64)
                    .sum::<f64>();
                let max_abs = logits.iter().fold(0.0f32, |m, &l| m.max(l.abs()));
                partial.max_abs = partial.max_abs.max(max_abs);
            }
            partial
        })
        .reduce(|| Partial::zero(n_experts), Partial::add);
    let balance: f64 = sums
        .prob_mass
        .iter()
        .zip(counts)
        .map(|(&mass, &count)| mass * count as f64)
        .sum::<f64>()
        * balance_scale(tokens, n_experts, top_k);
    [
        balance as f32,
        (sums.z / tokens as f64) as f32,
        (sums.entropy / tokens as f64) as f32,
        sums.max_abs,
    ]
}

/// Gradient of the logits `[T, E]` given `[grad_balance, grad_z]`: the reference's
/// `router_losses_backward`.
pub fn backward(
    logits: &[f32],
    counts: &[usize],
    gate: Gate,
    top_k: usize,
    [grad_balance, grad_z]: [f32; 2],
) -> Vec<f32> {
    let n_experts = counts.len();
    let tokens = logits.len() / n_experts.max(1);
    let scale = balance_scale(tokens, n_experts, top_k) as f32;
    let d_probs: Vec<f32> = counts.iter().map(|&c| c as f32 * scale).collect();
    let z_scale = 2.0 / tokens as f32;
    let mut out = vec![0.0; logits.len()];
    out.par_chunks_mut(n_experts * TOKENS_PER_TASK)
        .zip(logits.par_chunks(n_experts * TOKENS_PER_TASK))
        .for_each(|(out, block)| {
            let (mut probs, mut scores) = (vec![0.0; n_experts], vec![0.0; n_experts]);
            for (out, logits) in out.chunks_mut(n_experts).zip(block.chunks(n_experts)) {
                let row = Row::new(logits);
                let sum = distribution(&row, gate, &mut probs, &mut scores);
                let dot: f32 = probs.iter().zip(&d_probs).map(|(p, d)| p * d).sum();
                let lse = row.log_sum_exp();
                for (j, out) in out.iter_mut().enumerate() {
                    let centred = d_probs[j] - dot;
                    let d_balance = match gate {
                        Gate::SoftmaxTopk { .. } | Gate::TopkSoftmax => probs[j] * centred,
                        Gate::Sigmoid { .. } => scores[j] * (1.0 - scores[j]) / sum * centred,
                    };
                    let d_z = z_scale * lse * row.softmax(j);
                    *out = grad_balance * d_balance + grad_z * d_z;
                }
            }
        });
    out
}
