//! The experts' SwiGLU FFN composed of a backend's grouped matmuls and SwiGLU: the
//! reference of the fused kernels, and the implementation on backends without them.

use burn::tensor::ops::FloatTensor;

use crate::{ExpertFfnWeights, MoeBackend};

/// `(out, [gate, up])` of the experts' SwiGLU FFN over packed segments (see
/// [`MoeBackend::expert_ffn_forward`]), from `B`'s grouped matmul and SwiGLU operations.
pub fn expert_ffn_forward<B: MoeBackend>(
    x: FloatTensor<B>,
    weights: ExpertFfnWeights<FloatTensor<B>>,
    counts: &[usize],
) -> (FloatTensor<B>, [FloatTensor<B>; 2]) {
    let gate = B::grouped_matmul_forward(x.clone(), weights.gate, counts);
    let up = B::grouped_matmul_forward(x, weights.up, counts);
    let hidden = B::swiglu_forward(gate.clone(), up.clone());
    (
        B::grouped_matmul_forward(hidden, weights.down, counts),
        [gate, up],
    )
}

/// `(d_x, d_weights)` of [`expert_ffn_forward`] given its `gate` and `up` and the output's
/// gradient, from `B`'s grouped matmul and SwiGLU operations.
pub fn expert_ffn_backward<B: MoeBackend>(
    x: FloatTensor<B>,
    weights: ExpertFfnWeights<FloatTensor<B>>,
    counts: &[usize],
    [gate, up]: [FloatTensor<B>; 2],
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, ExpertFfnWeights<FloatTensor<B>>) {
    let hidden = B::swiglu_forward(gate.clone(), up.clone());
    let (d_hidden, d_down) = B::grouped_matmul_backward(hidden, weights.down, counts, grad);
    let (d_gate, d_up) = B::swiglu_backward(gate, up, d_hidden);
    let (d_x_gate, d_gate) = B::grouped_matmul_backward(x.clone(), weights.gate, counts, d_gate);
    let (d_x_up, d_up) = B::grouped_matmul_backward(x, weights.up, counts, d_up);
    let d_weights = ExpertFfnWeights {
        gate: d_gate,
        up: d_up,
        down: d_down,
    };
    (B::float_add(d_x_gate, d_x_up), d_weights)
}
