//! A bias-free linear layer on flex. burn-flex's matmul zero-fills every output, then
//! copies it once more to align it, and the weight gradient of a `[B, S, d]` input is
//! `B` products summed afterwards. Here the rows run in parallel blocks written once, and
//! the weight gradient is one product over all rows, split by `gemm` itself.

use super::dispatch::{grouped_matmul, grouped_matmul_input_grad};
use super::matmul::{Matrix, parallel_matmul_into};
use super::written;

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
