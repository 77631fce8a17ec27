//! SwiGLU on flex: one parallel pass over the f32 elements, forward and backward, with the
//! vectorised `exp` of the sigmoid. The reference makes a tensor op of every step.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::TensorMetadata;
use rayon::prelude::*;

use super::layout::{f32_rows, tensor};
use super::output::{ELEMENTWISE_CHUNK, written, written_pair};
use super::simd::{exp, vectorized};
use crate::reference;

/// [`crate::MoeBackend::swiglu_forward`] on f32 tensors of one shape.
pub(super) fn swiglu_forward(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
    let same_shape = gate.shape() == up.shape();
    let (true, Some(g), Some(u)) = (same_shape, f32_rows(&gate), f32_rows(&up)) else {
        return reference::swiglu_forward::<Flex>(gate, up);
    };
    // SAFETY: each chunk's loop writes all its elements (`u` has `g`'s shape).
    let output = unsafe {
        written(g.len(), |output| {
            output
                .par_chunks_mut(ELEMENTWISE_CHUNK)
                .enumerate()
                .for_each(|(chunk, out)| {
                    let start = chunk * ELEMENTWISE_CHUNK;
                    let inputs = g[start..].iter().zip(&u[start..]);
                    vectorized(
                        #[inline(always)]
                        || {
                            for (o, (&g, &u)) in out.iter_mut().zip(inputs) {
                                o.write(element(g, u));
                            }
                        },
                    )
                })
        })
    };
    tensor(output, gate.shape())
}

/// [`crate::MoeBackend::swiglu_backward`] on f32 tensors of one shape.
pub(super) fn swiglu_backward(
    gate: FlexTensor,
    up: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let same_shape = gate.shape() == up.shape() && gate.shape() == grad.shape();
    let inputs = (same_shape, f32_rows(&gate), f32_rows(&up), f32_rows(&grad));
    let (true, Some(g), Some(u), Some(dy)) = inputs else {
        return reference::swiglu_backward::<Flex>(gate, up, grad);
    };
    // SAFETY: each chunk's loop writes all its elements of both outputs (`u` and `dy`
    // have `g`'s shape).
    let (d_gate, d_up) = unsafe {
        written_pair([g.len(); 2], |d_gate, d_up| {
            d_gate
                .par_chunks_mut(ELEMENTWISE_CHUNK)
                .zip(d_up.par_chunks_mut(ELEMENTWISE_CHUNK))
                .enumerate()
                .for_each(|(chunk, (d_gate, d_up))| {
                    let start = chunk * ELEMENTWISE_CHUNK;
                    let inputs = g[start..].iter().zip(&u[start..]).zip(&dy[start..]);
                    vectorized(
                        #[inline(always)]
                        || {
                            let outputs = d_gate.iter_mut().zip(d_up);
                            for ((dg, du), ((&g, &u), &dy)) in outputs.zip(inputs) {
                                let (d_gate, d_up, _) = element_backward(g, u, dy);
                                dg.write(d_gate);
                                du.write(d_up);
                            }
                        },
                    )
                })
        })
    };
    (tensor(d_gate, gate.shape()), tensor(d_up, gate.shape()))
}

/// `silu(gate) * up` of one element.
#[inline(always)]
pub(super) fn element(gate: f32, up: f32) -> f32 {
    gate / (1.0 + exp(-gate)) * up
}

/// `(d_gate, d_up, silu(gate) * up)` given the gradient `dy` of `silu(gate) * up`: with
/// `s = sigmoid(gate)`, `d_gate = dy * up * s * (1 + gate * (1 - s))` and
/// `d_up = dy * gate * s`.
#[inline(always)]
pub(super) fn element_backward(gate: f32, up: f32, dy: f32) -> (f32, f32, f32) {
    let s = 1.0 / (1.0 + exp(-gate));
    let silu = gate * s;
    (dy * up * s * (1.0 + gate * (1.0 - s)), dy * silu, silu * up)
}
