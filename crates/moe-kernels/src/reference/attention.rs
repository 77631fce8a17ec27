//! Causal attention as tensor ops: the score matmul, a masked softmax and the value
//! matmul, with the gradients of each.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor};

use super::float;

/// `softmax(scale * scores)` with keys after each query's position masked out.
pub fn causal_softmax<B: Backend>(scores: FloatTensor<B>, scale: f32) -> FloatTensor<B> {
    let scores: Tensor<B, 4> = float(scores);
    let [_, _, queries, keys] = scores.dims();
    let device = scores.device();
    let offset = (keys - queries) as i64;
    let rows =
        Tensor::<B, 1, Int>::arange(offset..offset + queries as i64, &device).reshape([queries, 1]);
    let cols = Tensor::<B, 1, Int>::arange(0..keys as i64, &device).reshape([1, keys]);
    let future = cols.greater(rows).unsqueeze::<4>();
    let masked = (scores * scale).mask_fill(future, f32::NEG_INFINITY);
    softmax(masked, 3).into_primitive().tensor()
}

/// `p * (g - sum(p * g))` over the last axis.
pub fn softmax_backward<B: Backend>(probs: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let probs: Tensor<B, 4> = float(probs);
    let grad: Tensor<B, 4> = float(grad);
    let dot = (probs.clone() * grad.clone()).sum_dim(3);
    (probs * (grad - dot)).into_primitive().tensor()
}

/// Causal attention of `q: [B, H, Sq, D]` over `k, v: [B, H, Sk, D]` (query `i` at key
/// position `Sk - Sq + i`) built from `B`'s matmul: `(output, probabilities)`.
pub fn causal_attention_forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let q: Tensor<B, 4> = float(q);
    let k: Tensor<B, 4> = float(k);
    let v: Tensor<B, 4> = float(v);
    let [.., head_dim] = q.dims();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let scores = q.matmul(k.swap_dims(2, 3)).into_primitive().tensor();
    let probs: Tensor<B, 4> = float(causal_softmax::<B>(scores, scale));
    let output = probs.clone().matmul(v);
    (
        output.into_primitive().tensor(),
        probs.into_primitive().tensor(),
    )
}

/// Gradients `(dq, dk, dv)` of causal attention from its saved inputs and probabilities.
pub fn causal_attention_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    probs: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let q: Tensor<B, 4> = float(q);
    let k: Tensor<B, 4> = float(k);
    let v: Tensor<B, 4> = float(v);
    let probs: Tensor<B, 4> = float(probs);
    let grad: Tensor<B, 4> = float(grad);
    let [.., head_dim] = q.dims();
    let scale = 1.0 / (head_dim as f64).sqrt();
    let dv = probs.clone().swap_dims(2, 3).matmul(grad.clone());
    let dprobs = grad.matmul(v.swap_dims(2, 3));
    let dscores: Tensor<B, 4> = float(softmax_backward::<B>(
        probs.into_primitive().tensor(),
        dprobs.into_primitive().tensor(),
    ));
    let dq = dscores.clone().matmul(k) * scale;
    let dk = dscores.swap_dims(2, 3).matmul(q) * scale;
    (
        dq.into_primitive().tensor(),
        dk.into_primitive().tensor(),
        dv.into_primitive().tensor(),
    )
}
