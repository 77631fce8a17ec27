//! RMS normalisation and its gradients as tensor ops over rows of the last axis.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, Tensor, TensorMetadata};

use super::float;

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
