//! The fused operations written as plain tensor ops: the reference every specialised
//! kernel is tested against, and the implementation on backends without one.

use crate::AdamWStep;
use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, Int, Shape, Tensor, TensorMetadata, TensorPrimitive, s};

pub mod dispatch;
pub mod router_losses;
pub mod routing;

/// A float primitive as a tensor of rank `D`.
pub(crate) fn float<B: Backend, const D: usize>(tensor: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(tensor))
}

pub(crate) fn int<B: Backend, const D: usize>(tensor: IntTensor<B>) -> Tensor<B, D, Int> {
    Tensor::from_primitive(tensor)
}

/// A tensor of any rank viewed as rank 1, for elementwise ops.
fn flat<B: Backend>(tensor: FloatTensor<B>) -> Tensor<B, 1> {
    let n = tensor.shape().num_elements();
    float(B::float_reshape(tensor, Shape::new([n])))
}

/// `buffer` (`[B, H, L, D]`) with positions `start..start + S` of its third dimension
/// replaced by `values` (`[B, H, S, D]`), by `slice_assign`.
pub fn write_positions<B: Backend>(
    buffer: FloatTensor<B>,
    values: FloatTensor<B>,
    start: usize,
) -> FloatTensor<B> {
    let values: Tensor<B, 4> = float(values);
    let end = start + values.dims()[2];
    float::<B, 4>(buffer)
        .slice_assign(s![.., .., start..end], values)
        .into_primitive()
        .tensor()
}

/// `x · w` for `x: [rows, d_in]` and `w: [d_in, d_out]` (a bias-free linear layer).
pub fn linear_forward<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>) -> FloatTensor<B> {
    B::float_matmul(x, w)
}

/// `(d_x, d_w) = (grad · w^T, x^T · grad)`, the gradients of [`linear_forward`].
pub fn linear_backward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (x, w, grad): (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) =
        (float(x), float(w), float(grad));
    let d_x = grad.clone().matmul(w.transpose());
    let d_w = x.transpose().matmul(grad);
    (d_x.into_primitive().tensor(), d_w.into_primitive().tensor())
}

/// `silu(gate) * up`.
pub fn swiglu_forward<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let shape = gate.shape();
    let out = silu(flat::<B>(gate)) * flat::<B>(up);
    B::float_reshape(out.into_primitive().tensor(), shape)
}

/// `(d_gate, d_up)` of `silu(gate) * up`: with `s = sigmoid(gate)`,
/// `d_up = grad * gate * s` and `d_gate = grad * up * s * (1 + gate * (1 - s))`.
pub fn swiglu_backward<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = gate.shape();
    let (gate, up, grad) = (flat::<B>(gate), flat::<B>(up), flat::<B>(grad));
    let s = sigmoid(gate.clone());
    let d_up = grad.clone() * gate.clone() * s.clone();
    let d_gate = grad * up * s.clone() * ((s.neg() + 1.0) * gate + 1.0);
    let unflat = |t: Tensor<B, 1>| B::float_reshape(t.into_primitive().tensor(), shape.clone());
    (unflat(d_gate), unflat(d_up))
}

/// A tensor of any rank viewed as `[rows, d]` rows of its last axis.
fn rows<B: Backend>(tensor: FloatTensor<B>) -> Tensor<B, 2> {
    let shape = tensor.shape();
    let d = shape[shape.num_dims() - 1];
    float(B::float_reshape(
        tensor,
        Shape::new([shape.num_elements() / d, d]),
    ))
}

/// `sqrt(mean(x^2) + epsilon)` of each row of `x: [N, d]`, `[N, 1]`.
fn root_mean_square<B: Backend>(x: Tensor<B, 2>, epsilon: f64) -> Tensor<B, 2> {
    (x.square().mean_dim(1) + epsilon).sqrt()
}

/// `x / sqrt(mean(x^2) + epsilon) * gamma` over the last axis of `x`, as burn's `RmsNorm`.
pub fn rms_norm_forward<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    epsilon: f64,
) -> FloatTensor<B> {
    let shape = x.shape();
    let x = rows::<B>(x);
    let out = x.clone() / root_mean_square(x, epsilon) * float::<B, 1>(gamma).unsqueeze();
    B::float_reshape(out.into_primitive().tensor(), shape)
}

/// `(d_x, d_gamma)` of RMS normalisation: with `r` the root mean square of a row and
/// `xhat = x / r`, `d_gamma = sum_rows(grad * xhat)` and
/// `d_x = (grad * gamma - xhat * mean(grad * gamma * xhat)) / r`.
pub fn rms_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    epsilon: f64,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (shape, gamma_shape) = (x.shape(), gamma.shape());
    let (x, grad) = (rows::<B>(x), rows::<B>(grad));
    let r = root_mean_square(x.clone(), epsilon);
    let x_hat = x / r.clone();
    let d_gamma = (grad.clone() * x_hat.clone()).sum_dim(0);
    let d_x_hat = grad * float::<B, 1>(gamma).unsqueeze();
    let mean = (d_x_hat.clone() * x_hat.clone()).mean_dim(1);
    let d_x = (d_x_hat - x_hat * mean) / r;
    (
        B::float_reshape(d_x.into_primitive().tensor(), shape),
        B::float_reshape(d_gamma.into_primitive().tensor(), gamma_shape),
    )
}

/// `x * cos + rotate_half(x) * sin` on `x: [B, H, S, D]`, `rotate_half([a, b]) = [-b, a]`.
fn rotate<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 2>, sin: Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, h, s, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.unsqueeze::<4>() + rotated * sin.unsqueeze::<4>()
}

/// Rotary embedding of `x: [B, S, H, D]`, returned as `[B, H, S, D]`.
pub fn rotary_forward<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let x: Tensor<B, 4> = float(x);
    rotate(x.swap_dims(1, 2), float(cos), float(sin))
        .into_primitive()
        .tensor()
}

/// Rotates `grad: [B, H, S, D]` back (the inverse rotation uses `-sin`), `[B, S, H, D]`.
pub fn rotary_backward<B: Backend>(
    grad: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let sin: Tensor<B, 2> = float(sin);
    rotate(float(grad), float(cos), sin.neg())
        .swap_dims(1, 2)
        .into_primitive()
        .tensor()
}

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

/// `(nll, dlogits)` of the logits `x weight` (see
/// [`crate::MoeBackend::linear_cross_entropy_forward`]), from `B`'s matmul and softmax.
pub fn linear_cross_entropy_forward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let logits = float::<B, 2>(x).matmul(float(weight));
    let targets: Tensor<B, 2, Int> = int::<B, 1>(targets).unsqueeze_dim(1);
    let max = logits.clone().max_dim(1);
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let nll = lse.clone() - logits.clone().gather(1, targets.clone());
    let probs = (logits - lse).exp();
    let ones = Tensor::ones(targets.dims(), &probs.device());
    let dlogits = probs.scatter(1, targets, ones.neg(), IndexingUpdateOp::Add);
    (
        nll.squeeze_dim::<1>(1).into_primitive().tensor(),
        dlogits.into_primitive().tensor(),
    )
}

/// `(d_x, d_weight)` of the per-row NLL given its gradient `grad: [N]`; see
/// [`crate::MoeBackend::linear_cross_entropy_backward`].
pub fn linear_cross_entropy_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    dlogits: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let grad = float::<B, 1>(grad).unsqueeze_dim::<2>(1);
    let dlogits = float::<B, 2>(dlogits) * grad;
    let d_x = dlogits.clone().matmul(float::<B, 2>(weight).transpose());
    let d_weight = float::<B, 2>(x).transpose().matmul(dlogits);
    (
        d_x.into_primitive().tensor(),
        d_weight.into_primitive().tensor(),
    )
}

/// One AdamW step as burn's `AdamW` takes it, op by op; see
/// [`crate::MoeBackend::adamw_step`].
pub fn adamw_step<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    moment_1: FloatTensor<B>,
    moment_2: FloatTensor<B>,
    step: AdamWStep,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let shape = param.shape();
    let (b1, b2) = (step.beta_1, step.beta_2);
    let grad = flat::<B>(grad);
    let m = flat::<B>(moment_1).mul_scalar(b1) + grad.clone().mul_scalar(1.0 - b1);
    let v = flat::<B>(moment_2).mul_scalar(b2) + grad.square().mul_scalar(1.0 - b2);
    let m_hat = m.clone().div_scalar(1.0 - b1.powi(step.time));
    let v_hat = v.clone().div_scalar(1.0 - b2.powi(step.time));
    let delta = m_hat / (v_hat.sqrt().add_scalar(step.epsilon));
    let decay = step.lr * f64::from(step.weight_decay);
    let param = flat::<B>(param).mul_scalar(1.0 - decay) - delta.mul_scalar(step.lr);
    let shaped = |t: Tensor<B, 1>| B::float_reshape(t.into_primitive().tensor(), shape.clone());
    (shaped(param), shaped(m), shaped(v))
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
