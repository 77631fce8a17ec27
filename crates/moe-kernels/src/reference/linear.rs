//! The bias-free linear layer as tensor ops: one matmul forward, two backward.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use super::float;

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
