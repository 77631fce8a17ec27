//! The router's loss terms and statistics written as tensor ops: the load-balancing loss,
//! the z-loss, the entropy of the router distribution and the largest logit, and the
//! gradient of the two losses with respect to the logits.

use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor};

use super::{float, int};
use crate::Gate;

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
    let prob_mass = probs.sum_dim(0).reshape([experts]);
    (prob_mass * counts.float()).sum() * balance_scale(tokens, experts, top_k)
}

/// The load-balancing term's factor `E / (k T^2)`.
pub fn balance_scale(tokens: usize, experts: usize, top_k: usize) -> f64 {
    experts as f64 / (top_k as f64 * (tokens * tokens) as f64)
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

/// The router's full distribution over the experts, `[T, E]`, that the balancing loss and
/// the entropy measure: the softmax of the logits, or for sigmoid gates the scores
/// normalised to sum to one.
pub fn router_probs<B: Backend>(logits: Tensor<B, 2>, gate: Gate) -> Tensor<B, 2> {
    match gate {
        Gate::SoftmaxTopk { .. } | Gate::TopkSoftmax => softmax(logits, 1),
        Gate::Sigmoid { .. } => {
            let scores = sigmoid(logits);
            scores.clone() / scores.sum_dim(1)
        }
    }
}

/// `[balance, z, entropy, max |logit|]`, `[4]`, of the router `logits: [T, E]` whose
/// routing put `counts: [E]` assignments on each expert (see the functions above).
pub fn router_losses_forward<B: Backend>(
    logits: FloatTensor<B>,
    counts: IntTensor<B>,
    gate: Gate,
    top_k: usize,
) -> FloatTensor<B> {
    let logits: Tensor<B, 2> = float(logits);
    let probs = router_probs(logits.clone(), gate);
    Tensor::cat(
        vec![
            load_balancing_loss(probs.clone(), int(counts), top_k),
            router_z_loss(logits.clone()),
            router_entropy(probs),
            logits.abs().max(),
        ],
        0,
    )
    .into_primitive()
    .tensor()
}

/// Gradient of the logits `[T, E]` given `grad: [4]`, the gradient of
/// [`router_losses_forward`]'s output. The entropy and the largest logit are statistics:
/// their gradients are ignored.
pub fn router_losses_backward<B: Backend>(
    logits: FloatTensor<B>,
    counts: IntTensor<B>,
    gate: Gate,
    top_k: usize,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let logits: Tensor<B, 2> = float(logits);
    let grad: Tensor<B, 1> = float(grad);
    let [tokens, experts] = logits.dims();
    let grad_balance = grad.clone().slice(0..1).unsqueeze::<2>();
    let grad_z = grad.slice(1..2).unsqueeze::<2>();
    // The balance term is linear in the distribution: `d/dp_tj = scale * c_j`.
    let d_probs =
        int::<B, 1>(counts).float().unsqueeze::<2>() * balance_scale(tokens, experts, top_k);
    let probs = router_probs(logits.clone(), gate);
    let centred = d_probs.clone() - (probs.clone() * d_probs).sum_dim(1);
    let d_balance = match gate {
        Gate::SoftmaxTopk { .. } | Gate::TopkSoftmax => probs * centred,
        // p_j = s_j / S with s = sigmoid(l): d p_i / d l_j = s_j (1 - s_j) / S (δ_ij - p_i).
        Gate::Sigmoid { .. } => {
            let scores = sigmoid(logits.clone());
            let sum = scores.clone().sum_dim(1);
            scores.clone() * (scores.neg() + 1.0) / sum * centred
        }
    };
    // d/dl_tj of mean_t lse_t^2 is 2 lse_t softmax_tj / T.
    let d_z = softmax(logits.clone(), 1) * log_sum_exp(logits) * (2.0 / tokens as f64);
    (d_balance * grad_balance + d_z * grad_z)
        .into_primitive()
        .tensor()
}
