//! The experts' SwiGLU FFN on flex as one operation. Each block of an expert's rows runs
//! its gate, up and down products and the activation in one task, while the block's
//! `[rows, f]` intermediates are in cache: one parallel pass forward and three backward
//! per layer, where the grouped matmuls and the activation apart made four and eleven,
//! each writing and reading its whole output once more. The backward keeps the gate's
//! and up's gradients side by side, so that the input gradient is one product over `2f`
//! instead of two over `f` summed.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, TensorMetadata};
use rayon::prelude::*;

use super::dispatch::{MATMUL_BLOCK_ROWS, row_blocks, segment_rows};
use super::layout::{f32_rows, packed_rows, tensor};
use super::matmul::{Matrix, matmul_into, scaled_matmul_into};
use super::output::{assume_init, written, written_all};
use super::simd::vectorized;
use super::swiglu;
use crate::{ExpertFfnWeights, reference};

/// [`crate::MoeBackend::expert_ffn_forward`] on f32 packed rows.
pub(super) fn expert_ffn_forward(
    x: FlexTensor,
    weights: ExpertFfnWeights<FlexTensor>,
    counts: &[usize],
) -> (FlexTensor, [FlexTensor; 2]) {
    let [rows, d] = x.shape().dims::<2>();
    let values = (packed_rows(&x, counts), weight_values(&weights, d));
    let (Some(values), Some((w, f))) = values else {
        return reference::expert_ffn_forward::<burn::backend::Flex>(x, weights, counts);
    };
    let [out, gate, up] = forward(&values, Weights::new(&w, d, f), counts);
    let hidden = || Shape::new([rows, f]);
    (
        tensor(out, x.shape()),
        [tensor(gate, hidden()), tensor(up, hidden())],
    )
}

/// [`crate::MoeBackend::expert_ffn_backward`] on f32 packed rows.
pub(super) fn expert_ffn_backward(
    x: FlexTensor,
    weights: ExpertFfnWeights<FlexTensor>,
    counts: &[usize],
    pre_activations: [FlexTensor; 2],
    grad: FlexTensor,
) -> (FlexTensor, ExpertFfnWeights<FlexTensor>) {
    let [rows, d] = x.shape().dims::<2>();
    let [gate, up] = &pre_activations;
    let shapes_agree = |&(_, f): &(_, usize)| {
        let shapes = [gate.shape(), up.shape(), grad.shape()];
        shapes == [[rows, f].into(), [rows, f].into(), [rows, d].into()]
    };
    let w = weight_values(&weights, d).filter(shapes_agree);
    let inputs = (packed_rows(&x, counts), w, [gate, up, &grad].map(f32_rows));
    let (Some(values), Some((w, f)), [Some(gate), Some(up), Some(g)]) = inputs else {
        return reference::expert_ffn_backward::<burn::backend::Flex>(
            x,
            weights,
            counts,
            pre_activations,
            grad,
        );
    };
    let (d_x, d_weights) = backward(&values, Weights::new(&w, d, f), counts, &gate, &up, &g);
    let shapes = weights.each_ref().map(|w| w.shape());
    let d_weights = ExpertFfnWeights {
        gate: tensor(d_weights.gate, shapes.gate),
        up: tensor(d_weights.up, shapes.up),
        down: tensor(d_weights.down, shapes.down),
    };
    (tensor(d_x, x.shape()), d_weights)
}

/// The values of the experts' weights (gate and up `[E, d, f]`, down `[E, f, d]`) for
/// inputs of width `d`, and `f`, if the shapes agree, no width is zero and all hold f32.
fn weight_values(
    weights: &ExpertFfnWeights<FlexTensor>,
    d: usize,
) -> Option<(ExpertFfnWeights<Cow<'_, [f32]>>, usize)> {
    let ExpertFfnWeights { gate, up, down } = weights.each_ref().map(|w| w.shape());
    if gate.num_dims() != 3 || gate != up || down.num_dims() != 3 {
        return None;
    }
    let (n_experts, f) = (gate[0], gate[2]);
    let agree = d > 0 && f > 0 && gate[1] == d && [down[0], down[1], down[2]] == [n_experts, f, d];
    if !agree {
        return None;
    }
    let ExpertFfnWeights { gate, up, down } = weights.each_ref().map(f32_rows);
    Some((
        ExpertFfnWeights {
            gate: gate?,
            up: up?,
            down: down?,
        },
        f,
    ))
}

/// The stacked weights of `E` experts as row-major f32: gate and up projections
/// `[E, d, f]`, down projection `[E, f, d]`.
#[derive(Clone, Copy)]
struct Weights<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    down: &'a [f32],
    d: usize,
    f: usize,
}

impl<'a> Weights<'a> {
    /// The weights' values, for inputs of width `d` and hidden width `f`.
    fn new(weights: &'a ExpertFfnWeights<impl AsRef<[f32]>>, d: usize, f: usize) -> Self {
        let ExpertFfnWeights { gate, up, down } = weights.each_ref().map(AsRef::as_ref);
        Self {
            gate,
            up,
            down,
            d,
            f,
        }
    }

    /// Expert `e`'s gate projection, `[d, f]`.
    fn gate_matrix(&self, e: usize) -> Matrix<'a> {
        Matrix::expert(self.gate, e, self.d, self.f)
    }

    /// Expert `e`'s up projection, `[d, f]`.
    fn up_matrix(&self, e: usize) -> Matrix<'a> {
        Matrix::expert(self.up, e, self.d, self.f)
    }

    /// Expert `e`'s down projection, `[f, d]`.
    fn down_matrix(&self, e: usize) -> Matrix<'a> {
        Matrix::expert(self.down, e, self.f, self.d)
    }

    /// `[gate_up^T, down^T]`: each expert's `gate^T` above its `up^T` (`[E, 2f, d]`), so
    /// that its two input gradients are one product over `2f`, and each expert's `down^T`
    /// (`[E, d, f]`), in one parallel pass. Every block of rows of the backward multiplies
    /// by them, and `gemm` gathering a transposed view again for each costs more.
    fn transposed(&self) -> [Vec<f32>; 2] {
        /// Rows copied at a time: the lines of a transposed view stay in L1.
        const TILE: usize = 64;
        let Self { d, f, .. } = *self;
        let n_experts = self.gate.len() / (d * f).max(1);
        // SAFETY: the tasks cover every expert's three matrices, each copied whole.
        unsafe {
            written_all(
                [n_experts * 2 * f * d, n_experts * d * f],
                |[gate_up_t, down_t]| {
                    let matrix = (d * f).max(1);
                    let gate_up = gate_up_t.chunks_mut(matrix).enumerate().map(|(i, out)| {
                        let e = i / 2;
                        let view = if i % 2 == 0 {
                            self.gate_matrix(e)
                        } else {
                            self.up_matrix(e)
                        };
                        (view.transpose(), out)
                    });
                    let down = down_t.chunks_mut(matrix).enumerate();
                    let down = down.map(|(e, out)| (self.down_matrix(e).transpose(), out));
                    let tasks: Vec<_> = gate_up.chain(down).collect();
                    tasks.into_par_iter().for_each(|(matrix, out)| {
                        let width = matrix.shape()[1];
                        for (tile, out) in out.chunks_mut(TILE * width).enumerate() {
                            matrix.copy_rows_into(tile * TILE, out);
                        }
                    });
                },
            )
        }
    }
}

/// `[out, gate, up]` for the packed rows `x: [rows, d]` (segment `e` has `counts[e]` rows):
/// `out = swiglu(gate, up) down[e]` (`[rows, d]`) with the pre-activations
/// `gate = x gate[e]` and `up = x up[e]` (`[rows, f]`), which the backward reads.
fn forward(x: &[f32], weights: Weights, counts: &[usize]) -> [Vec<f32>; 3] {
    let Weights { d, f, .. } = weights;
    let (starts, rows) = segment_rows(x, counts, d);
    // SAFETY: the blocks tile all rows of the three outputs, and each block's products
    // write its rows whole.
    unsafe {
        written_all([rows * d, rows * f, rows * f], |outputs| {
            let blocks = aligned_blocks(outputs, [d, f, f], counts, MATMUL_BLOCK_ROWS);
            blocks
                .into_par_iter()
                .for_each(|(e, rows, [out, gate, up])| {
                    let x = Matrix::rows_of(x, d, starts[e] + rows.start..starts[e] + rows.end);
                    let gate = matmul_into(gate, x, weights.gate_matrix(e));
                    let up = matmul_into(up, x, weights.up_matrix(e));
                    let hidden = swiglu_rows(gate, up);
                    let hidden = Matrix::rows_of(&hidden, f, 0..rows.len());
                    matmul_into(out, hidden, weights.down_matrix(e));
                });
        })
    }
}

/// `(d_x, d_weights)` of [`forward`] given its saved `gate` and `up` and the output's
/// gradient `grad: [rows, d]`. First, per block of rows: `d_hidden = grad down^T`, the
/// activation's gradients side by side, `[d_gate, d_up]` (`[rows, 2f]`), and
/// `d_x = [d_gate, d_up] [gate^T; up^T]`. Then, per block of each weight:
/// `d_gate_w = x^T d_gate`, `d_up_w = x^T d_up` and `d_down_w = hidden^T grad` over the
/// expert's rows (zero for an expert without rows).
fn backward(
    x: &[f32],
    weights: Weights,
    counts: &[usize],
    gate: &[f32],
    up: &[f32],
    grad: &[f32],
) -> (Vec<f32>, ExpertFfnWeights<Vec<f32>>) {
    let Weights { d, f, .. } = weights;
    let (starts, rows) = segment_rows(x, counts, d);
    let [gate_up_t, down_t] = weights.transposed();
    // SAFETY: the blocks tile all rows of the three outputs. In each block the first
    // product writes the `d_hidden` half of every `[d_gate, d_up]` row, which
    // `swiglu_rows_backward` reads and then writes both halves of and `hidden`; the second
    // product writes the block's `d_x` rows whole.
    let [d_x, d_gate_up, hidden] = unsafe {
        written_all([rows * d, rows * 2 * f, rows * f], |outputs| {
            let blocks = aligned_blocks(outputs, [d, 2 * f, f], counts, MATMUL_BLOCK_ROWS);
            blocks
                .into_par_iter()
                .for_each(|(e, rows, [d_x, d_gate_up, hidden])| {
                    let block = 0..rows.len();
                    let rows = starts[e] + rows.start..starts[e] + rows.end;
                    let grad = Matrix::rows_of(grad, d, rows.clone());
                    let down_t = Matrix::expert(&down_t, e, d, f);
                    scaled_matmul_into(d_gate_up, 2 * f, grad, down_t, 1.0);
                    let span = rows.start * f..rows.end * f;
                    let (gate, up) = (&gate[span.clone()], &up[span]);
                    // SAFETY: the product above wrote the first half of every row.
                    let d_gate_up = swiglu_rows_backward(gate, up, d_gate_up, hidden, f);
                    let d_gate_up = Matrix::rows_of(d_gate_up, 2 * f, block);
                    matmul_into(d_x, d_gate_up, Matrix::expert(&gate_up_t, e, 2 * f, d));
                });
        })
    };
    let n_experts = counts.len();
    // SAFETY: the blocks tile every expert's rows of the three gradients; each is written
    // whole, by its product or with zeros for an expert without rows.
    let [d_gate_w, d_up_w, d_down_w] = unsafe {
        written_all(
            [n_experts * d * f, n_experts * d * f, n_experts * f * d],
            |[d_gate_w, d_up_w, d_down_w]| {
                // (gradient, input and its width, output gradient, its width and columns)
                let tasks = [
                    (d_gate_w, x, d, &d_gate_up[..], 2 * f, 0..f),
                    (d_up_w, x, d, &d_gate_up[..], 2 * f, f..2 * f),
                    (d_down_w, &hidden[..], f, grad, d, 0..d),
                ];
                let starts = &starts;
                let blocks: Vec<_> = tasks
                    .into_iter()
                    .flat_map(|(out, input, d_in, output_grad, width, columns)| {
                        let rows = vec![d_in; n_experts];
                        let blocks = row_blocks(out, columns.len(), &rows, MATMUL_BLOCK_ROWS);
                        blocks.into_iter().map(move |(e, block, out)| {
                            let rows = starts[e]..starts[e] + counts[e];
                            let input_t = Matrix::rows_of(input, d_in, rows.clone()).transpose();
                            let output_grad = Matrix::rows_of(output_grad, width, rows);
                            (
                                out,
                                input_t.rows(block),
                                output_grad.columns(columns.clone()),
                            )
                        })
                    })
                    .collect();
                blocks
                    .into_par_iter()
                    .for_each(|(out, input_t, output_grad)| {
                        if input_t.shape()[1] == 0 {
                            out.fill(MaybeUninit::new(0.0));
                        } else {
                            matmul_into(out, input_t, output_grad);
                        }
                    });
            },
        )
    };
    let d_weights = ExpertFfnWeights {
        gate: d_gate_w,
        up: d_up_w,
        down: d_down_w,
    };
    (d_x, d_weights)
}

/// `silu(gate) * up`, elementwise.
fn swiglu_rows(gate: &[f32], up: &[f32]) -> Vec<f32> {
    // SAFETY: the loop writes every element (`up` has `gate`'s length).
    unsafe {
        written(gate.len(), |hidden| {
            vectorized(
                #[inline(always)]
                || {
                    for (h, (&g, &u)) in hidden.iter_mut().zip(gate.iter().zip(up)) {
                        h.write(swiglu::element(g, u));
                    }
                },
            )
        })
    }
}

/// Given rows `[d_hidden, _]` of width `2f` whose first halves hold the gradient of
/// `hidden = silu(gate) * up`, writes `[d_gate, d_up]` over them and `hidden` itself (the
/// down projection's weight gradient reads it); returns the rows, now initialised.
///
/// # Safety
/// The first `f` elements of each row of `d_gate_up` must be initialised.
unsafe fn swiglu_rows_backward<'a>(
    gate: &[f32],
    up: &[f32],
    d_gate_up: &'a mut [MaybeUninit<f32>],
    hidden: &mut [MaybeUninit<f32>],
    f: usize,
) -> &'a mut [f32] {
    let n = gate.len();
    assert!(f > 0 && up.len() == n && hidden.len() == n && d_gate_up.len() == 2 * n);
    vectorized(
        #[inline(always)]
        || {
            let outputs = d_gate_up
                .chunks_exact_mut(2 * f)
                .zip(hidden.chunks_exact_mut(f));
            let inputs = gate.chunks_exact(f).zip(up.chunks_exact(f));
            for ((d_gate_up, hidden), (gate, up)) in outputs.zip(inputs) {
                let (d_gate, d_up) = d_gate_up.split_at_mut(f);
                // SAFETY: the caller initialised the first half of the row.
                let d_gate = unsafe { assume_init(d_gate) };
                // Indexed, over slices of one length: the zipped iterators kept this loop
                // scalar.
                for i in 0..f {
                    let (d_g, d_u, h) = swiglu::element_backward(gate[i], up[i], d_gate[i]);
                    d_gate[i] = d_g;
                    d_up[i].write(d_u);
                    hidden[i].write(h);
                }
            }
        },
    );
    // SAFETY: the loop wrote both halves of every row (the lengths are asserted above).
    unsafe { assume_init(d_gate_up) }
}

/// `(segment, rows within it, the block of each of N outputs)`.
type AlignedBlock<'a, const N: usize> = (usize, Range<usize>, [&'a mut [MaybeUninit<f32>]; N]);

/// Splits `N` outputs of `widths` columns (consecutive segments of `counts` rows) into
/// the same blocks of at most `block_rows` rows inside one segment.
fn aligned_blocks<'a, const N: usize>(
    outputs: [&'a mut [MaybeUninit<f32>]; N],
    widths: [usize; N],
    counts: &[usize],
    block_rows: usize,
) -> Vec<AlignedBlock<'a, N>> {
    let mut index = 0;
    let mut blocks = outputs.map(|output| {
        let width = widths[index];
        index += 1;
        row_blocks(output, width, counts, block_rows).into_iter()
    });
    let mut aligned = Vec::new();
    loop {
        let next = blocks.each_mut().map(Iterator::next);
        let Some((segment, rows, _)) = &next[0] else {
            return aligned;
        };
        let (segment, rows) = (*segment, rows.clone());
        aligned.push((
            segment,
            rows,
            next.map(|block| block.expect("equal blocks").2),
        ));
    }
}
