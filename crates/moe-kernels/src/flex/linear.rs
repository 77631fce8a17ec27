//! A bias-free linear layer on flex. burn-flex's matmul zero-fills every output, then
//! copies it once more to align it, and the weight gradient of a `[B, S, d]` input is
//! `B` products summed afterwards. Here the rows run in parallel blocks written once, and
//! the weight gradient is one product over all rows, split by `gemm` itself.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, TensorMetadata};

use super::dispatch::{grouped_matmul, grouped_matmul_input_grad};
use super::layout::{f32_rows, tensor};
use super::matmul::{Matrix, parallel_matmul_into};
use super::output::written;
use crate::reference;

/// [`crate::MoeBackend::linear_forward`] on f32 matrices.
pub(super) fn linear_forward(x: FlexTensor, w: FlexTensor) -> FlexTensor {
    let [rows, d_in] = x.shape().dims::<2>();
    let [w_in, d_out] = w.shape().dims::<2>();
    match (f32_rows(&x), f32_rows(&w)) {
        (Some(x), Some(w)) if d_in == w_in => {
            tensor(forward(&x, &w, d_in, d_out), Shape::new([rows, d_out]))
        }
        _ => reference::linear_forward::<Flex>(x, w),
    }
}

/// [`crate::MoeBackend::linear_backward`] on f32 matrices.
pub(super) fn linear_backward(
    x: FlexTensor,
    w: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let [d_in, d_out] = w.shape().dims::<2>();
    let shapes_fit = x.shape()[1] == d_in && grad.shape().dims::<2>() == [x.shape()[0], d_out];
    match (f32_rows(&x), f32_rows(&w), f32_rows(&grad)) {
        (Some(x_rows), Some(w_rows), Some(g)) if shapes_fit => {
            let (d_x, d_w) = backward(&x_rows, &w_rows, &g, d_in, d_out);
            (tensor(d_x, x.shape()), tensor(d_w, w.shape()))
        }
        _ => reference::linear_backward::<Flex>(x, w, grad),
    }
}

/// `x w` for `x: [rows, d_in]` and `w: [d_in, d_out]`, row-major: `[rows, d_out]`.
pub fn forward(x: &[f32], w: &[f32], d_in: usize, d_out: usize) -> Vec<f32> {
    let rows = x.len() / d_in.max(1);
    grouped_matmul(x, w, &[rows], d_in, d_out)
}

/// Gradients `(d_x, d_w) = (grad w^T, x^T grad)` of [`forward`] given the output's
/// `grad: [rows, d_out]`.
pub fn backward(
    x: &[f32],
    w: &[f32],
    grad: &[f32],
    d_in: usize,
    d_out: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rows = grad.len() / d_out.max(1);
    let d_x = grouped_matmul_input_grad(w, &[rows], grad, d_in, d_out);
    if rows == 0 {
        return (d_x, vec![0.0; d_in * d_out]);
    }
    let x_t = Matrix::rows_of(x, d_in, 0..rows).transpose();
    // SAFETY: the product writes its output whole.
    let d_w = unsafe {
        written(d_in * d_out, |d_w| {
            parallel_matmul_into(d_w, x_t, Matrix::rows_of(grad, d_out, 0..rows));
        })
    };
    (d_x, d_w)
}
