//! The SwiGLU activation `silu(gate) * up` and its gradients as elementwise tensor ops.

use burn::tensor::Tensor;
use burn::tensor::TensorMetadata;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use super::flat;

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
