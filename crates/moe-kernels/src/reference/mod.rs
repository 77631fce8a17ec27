//! The fused operations written as plain tensor ops: the reference every specialised
//! kernel is tested against, and the implementation on backends without one. One file per
//! operation, named as its kernels are under `flex/`.

mod adamw;
mod attention;
pub mod dispatch;
mod expert_ffn;
mod linear;
mod linear_cross_entropy;
mod rms_norm;
mod rotary;
pub mod router_losses;
pub mod routing;
mod swiglu;
mod write_positions;

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Shape, Tensor, TensorMetadata, TensorPrimitive};

pub use adamw::adamw_step;
pub use attention::{
    causal_attention_backward, causal_attention_forward, causal_softmax, softmax_backward,
};
pub use expert_ffn::{expert_ffn_backward, expert_ffn_forward};
pub use linear::{linear_backward, linear_forward};
pub use linear_cross_entropy::{linear_cross_entropy_backward, linear_cross_entropy_forward};
pub use rms_norm::{rms_norm_backward, rms_norm_forward};
pub use rotary::{rotary_backward, rotary_forward};
pub use swiglu::{swiglu_backward, swiglu_forward};
pub use write_positions::write_positions;

/// A float primitive as a tensor of rank `D`.
pub(crate) fn float<B: Backend, const D: usize>(tensor: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(tensor))
}

/// An int primitive as a tensor of rank `D`.
pub(crate) fn int<B: Backend, const D: usize>(tensor: IntTensor<B>) -> Tensor<B, D, Int> {
    Tensor::from_primitive(tensor)
}

/// A tensor of any rank viewed as rank 1, for elementwise ops.
fn flat<B: Backend>(tensor: FloatTensor<B>) -> Tensor<B, 1> {
    let n = tensor.shape().num_elements();
    float(B::float_reshape(tensor, Shape::new([n])))
}
