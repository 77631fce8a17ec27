//! Routing written as tensor ops: expert scores, top-k selection and combine weights from
//! the router logits, and the gradient of the weights with respect to the logits.

use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use super::{float, int};
use crate::Gate;

/// `(weights, experts)`, both `[T, k]`: the `top_k` experts of each row of `logits: [T, E]`
/// by score plus the selection-only `bias: [E]` (best first), and their combine
/// weights under `gate`.
pub fn route_forward<B: Backend>(
    logits: FloatTensor<B>,
    bias: FloatTensor<B>,
    gate: Gate,
    top_k: usize,
) -> (FloatTensor<B>, IntTensor<B>) {
    let logits: Tensor<B, 2> = float(logits);
    let bias: Tensor<B, 1> = float(bias);
    let scores = match gate {
        Gate::SoftmaxTopk { .. } => softmax(logits, 1),
        Gate::TopkSoftmax => logits,
        Gate::Sigmoid { .. } => sigmoid(logits),
    };
    let selection = scores.clone() + bias.unsqueeze_dim(0);
    let (_, experts) = selection.topk_with_indices(top_k, 1);
    let chosen = scores.gather(1, experts.clone());
    let weights = match gate {
        Gate::SoftmaxTopk { renormalize: true } => chosen.clone() / chosen.sum_dim(1),
        Gate::SoftmaxTopk { renormalize: false } => chosen,
        Gate::TopkSoftmax => softmax(chosen, 1),
        Gate::Sigmoid { scale } => chosen.clone() / chosen.sum_dim(1) * scale,
    };
    (weights.into_primitive().tensor(), experts.into_primitive())
}

/// Gradient of the router logits `[T, E]` given the gradient of the weights `grad: [T, k]`
/// of [`route_forward`]. With `dot = sum_j grad_j * w_j` per row:
/// - weights `softmax(chosen logits)` (renormalised softmax, top-k-then-softmax):
///   `w_j * (grad_j - dot)` at the chosen experts, zero elsewhere;
/// - weights `p_chosen` (softmax, not renormalised): `p * (onehot(grad) - dot)`;
/// - sigmoid weights `scale * s_j / S`: `scale / S * (grad_j - dot / scale) * s_j (1 - s_j)`
///   at the chosen experts.
pub fn route_backward<B: Backend>(
    logits: FloatTensor<B>,
    experts: IntTensor<B>,
    weights: FloatTensor<B>,
    grad: FloatTensor<B>,
    gate: Gate,
) -> FloatTensor<B> {
    let logits: Tensor<B, 2> = float(logits);
    let experts: Tensor<B, 2, Int> = int(experts);
    let weights: Tensor<B, 2> = float(weights);
    let grad: Tensor<B, 2> = float(grad);
    let dot = (grad.clone() * weights.clone()).sum_dim(1);
    let zeros = logits.zeros_like();
    let d_logits = match gate {
        Gate::SoftmaxTopk { renormalize: true } | Gate::TopkSoftmax => {
            zeros.scatter(1, experts, weights * (grad - dot), IndexingUpdateOp::Add)
        }
        Gate::SoftmaxTopk { renormalize: false } => {
            let onehot_grad = zeros.scatter(1, experts, grad, IndexingUpdateOp::Add);
            softmax(logits, 1) * (onehot_grad - dot)
        }
        Gate::Sigmoid { scale } => {
            let chosen = sigmoid(logits.gather(1, experts.clone()));
            let total = chosen.clone().sum_dim(1);
            let d_chosen = (grad - dot / scale) * scale / total;
            let d_logits = d_chosen * chosen.clone() * (chosen.neg() + 1.0);
            zeros.scatter(1, experts, d_logits, IndexingUpdateOp::Add)
        }
    };
    d_logits.into_primitive().tensor()
}
