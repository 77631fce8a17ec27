//! The output head and its loss in one pass over blocks of rows: each block's logits are
//! computed into the buffer that then holds their gradient, and turned into
//! `softmax - onehot` while still in cache. The backward is two products with that
//! gradient. No logits tensor is allocated, kept or copied, and the softmax makes one
//! pass of `exp` over the vocabulary (the forward and backward of a separate
//! cross-entropy took one each).

use rayon::prelude::*;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, TensorMetadata};

use super::layout::{f32_rows, indices, matrix, tensor};
use super::matmul::{Matrix, matmul_into, parallel_matmul_into};
use super::output::written;
use super::simd::{exp, max_of, sum_of, vectorized};
use crate::reference;

/// [`crate::MoeBackend::linear_cross_entropy_forward`] on f32 rows and weight.
pub(super) fn linear_cross_entropy_forward(
    x: FlexTensor,
    weight: FlexTensor,
    targets: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let [rows, d] = x.shape().dims::<2>();
    let [_, vocab] = weight.shape().dims::<2>();
    let (Some(x_rows), Some(w), Some(targets_host)) =
        (f32_rows(&x), matrix(&weight), indices(&targets))
    else {
        return reference::linear_cross_entropy_forward::<Flex>(x, weight, targets);
    };
    let fits =
        w.shape()[0] == d && targets_host.len() == rows && targets_host.iter().all(|&t| t < vocab);
    if !fits {
        return reference::linear_cross_entropy_forward::<Flex>(x, weight, targets);
    }
    let x_rows = Matrix::rows_of(&x_rows, d, 0..rows);
    let (nll, dlogits) = forward(x_rows, w, &targets_host);
    (
        tensor(nll, Shape::new([rows])),
        tensor(dlogits, Shape::new([rows, vocab])),
    )
}

/// [`crate::MoeBackend::linear_cross_entropy_backward`] on f32 rows and weight.
pub(super) fn linear_cross_entropy_backward(
    x: FlexTensor,
    weight: FlexTensor,
    dlogits: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let (weight_shape, x_shape) = (weight.shape(), x.shape());
    let (Some(x_rows), Some(w), Some(dl), Some(g)) = (
        f32_rows(&x),
        matrix(&weight),
        f32_rows(&dlogits),
        f32_rows(&grad),
    ) else {
        return reference::linear_cross_entropy_backward::<Flex>(x, weight, dlogits, grad);
    };
    let ([rows, d], [_, vocab]) = (x_shape.dims::<2>(), w.shape());
    let fits = w.shape()[0] == d && g.len() == rows && dl.len() == rows * vocab;
    if !fits {
        return reference::linear_cross_entropy_backward::<Flex>(x, weight, dlogits, grad);
    }
    let (d_x, d_weight) = backward(&x_rows, w, &dl, &g);
    (tensor(d_x, x_shape), tensor(d_weight, weight_shape))
}

/// Rows of logits per rayon task: a 64 x 4096 block (1 MiB) stays in a core's cache
/// between its product and its softmax.
const ROWS_PER_BLOCK: usize = 64;

/// `(nll, dlogits)` of the logits `x weight` against `targets` (one per row of `x`):
/// `[rows]` and `softmax - onehot`, `[rows, vocab]` row-major.
pub fn forward(x: Matrix, weight: Matrix, targets: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let ([rows, _], [_, vocab]) = (x.shape(), weight.shape());
    let mut nll = vec![0.0f32; rows];
    if rows == 0 || vocab == 0 {
        return (nll, Vec::new());
    }
    // SAFETY: the blocks tile all `rows` rows; each product writes its block whole.
    let dlogits = unsafe {
        written(rows * vocab, |dlogits| {
            dlogits
                .par_chunks_mut(ROWS_PER_BLOCK * vocab)
                .zip(nll.par_chunks_mut(ROWS_PER_BLOCK))
                .enumerate()
                .for_each(|(block, (dlogits, nll))| {
                    let first = block * ROWS_PER_BLOCK;
                    let logits = matmul_into(dlogits, x.rows(first..first + nll.len()), weight);
                    vectorized(
                        #[inline(always)]
                        || {
                            let rows = logits.chunks_mut(vocab).zip(nll.iter_mut());
                            for ((logits, nll), &target) in rows.zip(&targets[first..]) {
                                *nll = softmax_minus_onehot(logits, target);
                            }
                        },
                    );
                });
        })
    };
    (nll, dlogits)
}

/// Turns a row of logits into `softmax(logits) - onehot(target)` in place; returns the
/// target's negative log-likelihood, `logsumexp(logits) - logits[target]`.
#[inline(always)]
fn softmax_minus_onehot(logits: &mut [f32], target: usize) -> f32 {
    let (max, picked) = (max_of(logits), logits[target]);
    logits.iter_mut().for_each(|v| *v = exp(*v - max));
    let sum = sum_of(logits, |p| p);
    let inv = 1.0 / sum;
    logits.iter_mut().for_each(|p| *p *= inv);
    logits[target] -= 1.0;
    max + sum.ln() - picked
}

/// `(d_x, d_weight)`, row-major `[rows, d]` and `[d, vocab]`, given the row-major `x`
/// (`[rows, d]`), the `weight` view, [`forward`]'s `dlogits` and the NLL's gradient
/// `grad: [rows]`: `d_x = diag(grad) dlogits weight^T`, `d_weight = (diag(grad) x)^T dlogits`.
pub fn backward(x: &[f32], weight: Matrix, dlogits: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let [d, vocab] = weight.shape();
    let rows = grad.len();
    if rows == 0 || d == 0 || vocab == 0 {
        return (vec![0.0; rows * d], vec![0.0; d * vocab]);
    }
    // One product over all rows, blocked and split by gemm itself: with blocks of 64 rows
    // of our own the training step ran slower.
    let dlogits = Matrix::rows_of(dlogits, vocab, 0..rows);
    // SAFETY: the product writes its output whole.
    let mut d_x = unsafe {
        written(rows * d, |d_x| {
            parallel_matmul_into(d_x, dlogits, weight.transpose());
        })
    };
    d_x.par_chunks_mut(d).zip(grad).for_each(|(row, &g)| {
        row.iter_mut().for_each(|v| *v *= g);
    });
    let scaled_x: Vec<f32> = x
        .chunks(d)
        .zip(grad)
        .flat_map(|(row, &g)| row.iter().map(move |v| v * g))
        .collect();
    let scaled_x = Matrix::rows_of(&scaled_x, d, 0..rows).transpose();
    // SAFETY: the product writes its output whole.
    let d_weight = unsafe {
        written(d * vocab, |d_weight| {
            parallel_matmul_into(d_weight, scaled_x, dlogits);
        })
    };
    (d_x, d_weight)
}
