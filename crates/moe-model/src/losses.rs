//! Router losses, unweighted (the MoE layer applies the config weights).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Switch/GShard load-balancing term with Megatron's normalisation:
/// `E / (k T^2) * sum_i (sum_t p_ti) * c_i`, where `p` is the full router distribution
/// `[T, E]` and `c` the assignments per expert over all k slots, before dropping.
/// Equals 1 when routing is perfectly balanced.
pub fn load_balancing_loss<B: Backend>(
    probs: Tensor<B, 2>,
    counts: Tensor<B, 1, Int>,
    top_k: usize,
) -> Tensor<B, 1> {
    let [tokens, experts] = probs.dims();
    let scale = experts as f64 / (top_k as f64 * (tokens * tokens) as f64);
    let prob_mass = probs.sum_dim(0).reshape([experts]);
    (prob_mass * counts.float()).sum() * scale
}

/// ST-MoE router z-loss: `mean_t (logsumexp_j logits_tj)^2`.
pub fn router_z_loss<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1> {
    log_sum_exp(logits).square().mean()
}

/// Row-wise `log(sum(exp(x)))`, `[T, E] -> [T, 1]`, computed stably.
pub fn log_sum_exp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = x.clone().max_dim(1).detach();
    (x - max.clone()).exp().sum_dim(1).log() + max
}

/// Mean entropy of the router distribution in nats, `[1]` (max `ln E`).
pub fn router_entropy<B: Backend>(probs: Tensor<B, 2>) -> Tensor<B, 1> {
    let logp = probs.clone().clamp_min(1e-12).log();
    (probs * logp).sum_dim(1).neg().mean()
}
