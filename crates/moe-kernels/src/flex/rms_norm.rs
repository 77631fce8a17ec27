//! RMS normalisation on flex: one pass per row, parallel over rows, forward and backward;
//! each task sums its rows' share of the scale's gradient.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::TensorMetadata;
use rayon::prelude::*;

use super::layout::{f32_rows, tensor};
use super::output::{ROWS_PER_TASK, par_rows, write_row, written};
use super::simd::{dot, vectorized};
use crate::reference;

/// [`crate::MoeBackend::rms_norm_forward`] on f32 rows.
pub(super) fn rms_norm_forward(x: FlexTensor, gamma: FlexTensor, epsilon: f64) -> FlexTensor {
    let inputs = (gamma_fits_rows(&x, &gamma), f32_rows(&x), f32_rows(&gamma));
    let (true, Some(values), Some(gamma_values)) = inputs else {
        return reference::rms_norm_forward::<Flex>(x, gamma, epsilon);
    };
    let d = gamma_values.len();
    // SAFETY: each row is written whole (`gamma` has one scale per element).
    let output = unsafe {
        par_rows(
            values.len() / d.max(1),
            d,
            #[inline(always)]
            |row, out| {
                let x = &values[row * d..(row + 1) * d];
                let inv_rms = inverse_rms(x, epsilon);
                let normed = x.iter().zip(gamma_values.iter());
                write_row(out, normed.map(|(&x, &g)| x * inv_rms * g));
            },
        )
    };
    tensor(output, x.shape())
}

/// [`crate::MoeBackend::rms_norm_backward`] on f32 rows.
pub(super) fn rms_norm_backward(
    x: FlexTensor,
    gamma: FlexTensor,
    epsilon: f64,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let inputs = (
        gamma_fits_rows(&x, &gamma),
        f32_rows(&x),
        f32_rows(&gamma),
        f32_rows(&grad),
    );
    let (true, Some(values), Some(gamma_values), Some(dy)) = inputs else {
        return reference::rms_norm_backward::<Flex>(x, gamma, epsilon, grad);
    };
    let d = gamma_values.len();
    let mut shares = Vec::new();
    // Each task sums its rows' share of d_gamma; the shares are added in task order,
    // so the result does not depend on scheduling.
    // SAFETY: the chunks tile `d_x`, and each of their rows is written whole first.
    let d_x = unsafe {
        written(values.len(), |d_x| {
            shares = d_x
                .par_chunks_mut((d * ROWS_PER_TASK).max(1))
                .enumerate()
                .map(|(chunk, d_x)| {
                    let mut d_gamma = vec![0.0f32; d];
                    vectorized(
                        #[inline(always)]
                        || {
                            for (i, d_x) in d_x.chunks_mut(d).enumerate() {
                                let row = (chunk * ROWS_PER_TASK + i) * d;
                                let (x, dy) = (&values[row..row + d], &dy[row..row + d]);
                                let inv_rms = inverse_rms(x, epsilon);
                                let scaled = dy.iter().zip(gamma_values.iter());
                                let d_x = write_row(d_x, scaled.map(|(&dy, &g)| dy * g));
                                for ((dg, &dy), &x) in d_gamma.iter_mut().zip(dy).zip(x) {
                                    *dg += dy * x * inv_rms;
                                }
                                // mean(d_xhat * xhat), with xhat = x * inv_rms.
                                let mean = dot(d_x, x) * inv_rms / d as f32;
                                for (dx, &x) in d_x.iter_mut().zip(x) {
                                    *dx = (*dx - x * inv_rms * mean) * inv_rms;
                                }
                            }
                        },
                    );
                    d_gamma
                })
                .collect::<Vec<_>>();
        })
    };
    let mut d_gamma = vec![0.0f32; d];
    for share in shares {
        for (total, part) in d_gamma.iter_mut().zip(share) {
            *total += part;
        }
    }
    (tensor(d_x, x.shape()), tensor(d_gamma, gamma.shape()))
}

/// Whether `gamma` has one scale per element of `x`'s rows (the kernels' row length);
/// otherwise the reference reports the shape mismatch.
fn gamma_fits_rows(x: &FlexTensor, gamma: &FlexTensor) -> bool {
    x.shape().as_slice().last() == Some(&gamma.shape().num_elements())
}

/// `1 / sqrt(mean(x^2) + epsilon)` of one row.
#[inline(always)]
fn inverse_rms(x: &[f32], epsilon: f64) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + epsilon as f32).sqrt()
}
