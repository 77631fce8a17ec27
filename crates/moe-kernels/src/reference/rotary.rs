//! Rotary embedding (half-split layout) and its inverse rotation as tensor ops.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use super::float;

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
