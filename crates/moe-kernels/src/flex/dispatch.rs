//! Token dispatch on flex: the counting sort of assignments by expert as one pass, and the
//! permute, combine and grouped matmul as loops over contiguous f32 rows, parallel with
//! rayon, each output row written once. The tensor-op reference expands, scatters and
//! concatenates, copying every row several times, and allocates every per-segment product
//! before joining them.

use std::iter::repeat;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, TensorMetadata};

use super::layout::{dispatch_rows, f32_rows, indices, int_tensor, packed_rows, tensor};
use super::matmul::{Matrix, matmul_into};
use super::output::{par_rows, write_row, written};
use super::simd::dot;
use crate::{reference, reference_dispatch};

/// [`crate::MoeBackend::expert_slots`] on f32 rows and integer slots.
pub(super) fn expert_slots(
    experts: FlexTensor,
    n_experts: usize,
    capacity: Option<usize>,
) -> (FlexTensor, FlexTensor) {
    let dtype = experts.dtype();
    let slots = (!reference_dispatch())
        .then(|| indices(&experts))
        .flatten()
        .and_then(|assigned| count_slots(&assigned, n_experts, capacity));
    match slots {
        Some((slot, counts)) => (int_tensor(&slot, dtype), int_tensor(&counts, dtype)),
        None => reference::dispatch::expert_slots::<Flex>(experts, n_experts, capacity),
    }
}

/// [`crate::MoeBackend::permute_forward`] on f32 rows and integer slots.
pub(super) fn permute_forward(x: FlexTensor, slot: FlexTensor, rows: usize) -> FlexTensor {
    let d = x.shape()[1];
    match (dispatch_rows(&x), indices(&slot)) {
        (Some(values), Some(slot)) => tensor(
            scatter_rows(&values, d, &slot, None, rows),
            Shape::new([rows, d]),
        ),
        _ => reference::dispatch::permute_forward::<Flex>(x, slot, rows),
    }
}

/// [`crate::MoeBackend::permute_backward`] on f32 rows and integer slots.
pub(super) fn permute_backward(grad: FlexTensor, slot: FlexTensor, tokens: usize) -> FlexTensor {
    let d = grad.shape()[1];
    match (dispatch_rows(&grad), indices(&slot)) {
        (Some(values), Some(slot)) => tensor(
            gather_rows(&values, d, &slot, None, tokens),
            Shape::new([tokens, d]),
        ),
        _ => reference::dispatch::permute_backward::<Flex>(grad, slot, tokens),
    }
}

/// [`crate::MoeBackend::combine_forward`] on f32 rows and integer slots.
pub(super) fn combine_forward(
    buffer: FlexTensor,
    slot: FlexTensor,
    weights: FlexTensor,
) -> FlexTensor {
    let (d, tokens) = (buffer.shape()[1], weights.shape()[0]);
    match (dispatch_rows(&buffer), indices(&slot), f32_rows(&weights)) {
        (Some(values), Some(slot), Some(w)) => tensor(
            gather_rows(&values, d, &slot, Some(&w), tokens),
            Shape::new([tokens, d]),
        ),
        _ => reference::dispatch::combine_forward::<Flex>(buffer, slot, weights),
    }
}

/// [`crate::MoeBackend::combine_backward`] on f32 rows and integer slots.
pub(super) fn combine_backward(
    buffer: FlexTensor,
    slot: FlexTensor,
    weights: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let [rows, d] = buffer.shape().dims::<2>();
    let inputs = (
        dispatch_rows(&buffer),
        indices(&slot),
        f32_rows(&weights),
        f32_rows(&grad),
    );
    let (Some(values), Some(slot_host), Some(w), Some(g)) = inputs else {
        return reference::dispatch::combine_backward::<Flex>(buffer, slot, weights, grad);
    };
    (
        tensor(
            scatter_rows(&g, d, &slot_host, Some(&w), rows),
            Shape::new([rows, d]),
        ),
        tensor(slot_dot(&values, &g, d, &slot_host), weights.shape()),
    )
}

/// [`crate::MoeBackend::grouped_matmul_forward`] on f32 rows and integer slots.
pub(super) fn grouped_matmul_forward(
    x: FlexTensor,
    weights: FlexTensor,
    counts: &[usize],
) -> FlexTensor {
    let [rows, d_in] = x.shape().dims::<2>();
    let d_out = weights.shape()[2];
    match (packed_rows(&x, counts), f32_rows(&weights)) {
        (Some(values), Some(w)) => tensor(
            grouped_matmul(&values, &w, counts, d_in, d_out),
            Shape::new([rows, d_out]),
        ),
        _ => reference::dispatch::grouped_matmul_forward::<Flex>(x, weights, counts),
    }
}

/// [`crate::MoeBackend::grouped_matmul_backward`] on f32 rows and integer slots.
pub(super) fn grouped_matmul_backward(
    x: FlexTensor,
    weights: FlexTensor,
    counts: &[usize],
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let [_, d_in, d_out] = weights.shape().dims::<3>();
    let inputs = (packed_rows(&x, counts), f32_rows(&weights), f32_rows(&grad));
    let (Some(values), Some(w), Some(g)) = inputs else {
        return reference::dispatch::grouped_matmul_backward::<Flex>(x, weights, counts, grad);
    };
    let (d_x, d_w) = grouped_matmul_grads(&values, &w, counts, &g, d_in, d_out);
    (tensor(d_x, x.shape()), tensor(d_w, weights.shape()))
}

/// Output rows per rayon task of a grouped matmul: enough that `gemm` packs each expert's
/// weight few times and runs few edge blocks, few enough to spread one expert's segment
/// over the cores.
pub(super) const MATMUL_BLOCK_ROWS: usize = 256;

/// `(slot, counts)` of the assignments `experts` (token-major): the reference's
/// `expert_slots` as one counting pass instead of a one-hot matrix and its cumulative
/// sums. With a capacity, expert `e`'s `r`-th assignment takes row `e * capacity + r`,
/// or the trash row `n_experts * capacity` once `r` reaches the capacity; dropless, row
/// `offset[e] + r` of the packed buffer. `None` if an assignment names no expert.
pub fn count_slots(
    experts: &[usize],
    n_experts: usize,
    capacity: Option<usize>,
) -> Option<(Vec<usize>, Vec<usize>)> {
    let mut counts = vec![0; n_experts];
    let mut ranks = Vec::with_capacity(experts.len());
    for &e in experts {
        ranks.push(*counts.get(e)?);
        counts[e] += 1;
    }
    let offsets = starts(&counts);
    let slot = experts
        .iter()
        .zip(ranks)
        .map(|(&e, rank)| match capacity {
            Some(capacity) if rank < capacity => e * capacity + rank,
            Some(capacity) => n_experts * capacity,
            None => offsets[e] + rank,
        })
        .collect();
    Some((slot, counts))
}

/// The expert-major buffer `[rows, d]`: row `slot[a]` holds `weight(a) * x[a / k]`
/// (`k = slot.len() / tokens`), rows no kept assignment fills are zero; slots of `rows` or
/// more (dropped) are skipped. `weights: None` means weight 1 (the permute).
pub fn scatter_rows(
    x: &[f32],
    d: usize,
    slot: &[usize],
    weights: Option<&[f32]>,
    rows: usize,
) -> Vec<f32> {
    let top_k = top_k(x.len(), d, slot.len());
    // Which assignment fills each row: a slot is held by at most one assignment.
    let mut source = vec![None; rows];
    for (a, &row) in slot.iter().enumerate() {
        if row < rows {
            source[row] = Some(a);
        }
    }
    // SAFETY: every row is written whole, from its token or with zeros.
    unsafe {
        par_rows(
            rows,
            d,
            #[inline(always)]
            |row, out| match source[row] {
                Some(a) => {
                    let weight = weights.map_or(1.0, |w| w[a]);
                    let token = &x[a / top_k * d..(a / top_k + 1) * d];
                    write_row(out, token.iter().map(|&v| weight * v));
                }
                None => {
                    write_row(out, repeat(0.0));
                }
            },
        )
    }
}

/// Token rows `[T, d]`: `out[t] = sum_j weight(t k + j) * buffer[slot[t k + j]]` over the
/// kept assignments of token `t`. `weights: None` means weight 1 (the permute's gradient).
pub fn gather_rows(
    buffer: &[f32],
    d: usize,
    slot: &[usize],
    weights: Option<&[f32]>,
    tokens: usize,
) -> Vec<f32> {
    let rows = buffer.len() / d.max(1);
    let top_k = slot.len() / tokens.max(1);
    // SAFETY: every row is zeroed whole first.
    unsafe {
        par_rows(
            tokens,
            d,
            #[inline(always)]
            |t, out| {
                let out = write_row(out, repeat(0.0));
                for a in t * top_k..(t + 1) * top_k {
                    if slot[a] < rows {
                        let weight = weights.map_or(1.0, |w| w[a]);
                        let row = &buffer[slot[a] * d..(slot[a] + 1) * d];
                        for (o, &v) in out.iter_mut().zip(row) {
                            *o += weight * v;
                        }
                    }
                }
            },
        )
    }
}

/// `out[a] = <buffer[slot[a]], grad[a / k]>`, 0 for dropped assignments, `[A]`: the combine
/// weights' gradient.
pub fn slot_dot(buffer: &[f32], grad: &[f32], d: usize, slot: &[usize]) -> Vec<f32> {
    let rows = buffer.len() / d.max(1);
    let top_k = top_k(grad.len(), d, slot.len());
    slot.par_iter()
        .enumerate()
        .map(|(a, &row)| {
            if row >= rows {
                return 0.0;
            }
            let token = a / top_k;
            dot(
                &buffer[row * d..(row + 1) * d],
                &grad[token * d..(token + 1) * d],
            )
        })
        .collect()
}

/// Segment `e` of the packed rows `x: [rows, d_in]` times `w[e]` of `w: [E, d_in, d_out]`,
/// `[rows, d_out]`.
pub fn grouped_matmul(
    x: &[f32],
    w: &[f32],
    counts: &[usize],
    d_in: usize,
    d_out: usize,
) -> Vec<f32> {
    let experts: Vec<_> = (0..counts.len())
        .map(|e| Matrix::expert(w, e, d_in, d_out))
        .collect();
    segment_products(x, counts, &experts, [d_in, d_out])
}

/// Gradients `(d_x, d_w)` of [`grouped_matmul`] given the output's `grad: [rows, d_out]`:
/// `d_x = grad w[e]^T` per segment and `d_w[e] = x_e^T grad_e` (zero for empty experts).
pub fn grouped_matmul_grads(
    x: &[f32],
    w: &[f32],
    counts: &[usize],
    grad: &[f32],
    d_in: usize,
    d_out: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (starts, _) = segment_rows(x, counts, d_in);
    let d_x = grouped_matmul_input_grad(w, counts, grad, d_in, d_out);
    // d_w[e] rows i0..i1 = (x_e columns i0..i1)^T grad_e: blocks of every expert's matrix.
    // SAFETY: the blocks tile every expert's `d_in` rows; each is written whole, by its
    // product or with zeros for an expert without rows.
    let d_w = unsafe {
        written(counts.len() * d_in * d_out, |d_w| {
            let blocks = row_blocks(d_w, d_out, &vec![d_in; counts.len()], MATMUL_BLOCK_ROWS);
            blocks.into_par_iter().for_each(|(e, columns, out)| {
                if counts[e] == 0 {
                    out.fill(MaybeUninit::new(0.0));
                    return;
                }
                let segment = starts[e]..starts[e] + counts[e];
                let x_t = Matrix::rows_of(x, d_in, segment.clone()).transpose();
                matmul_into(
                    out,
                    x_t.rows(columns),
                    Matrix::rows_of(grad, d_out, segment),
                );
            });
        })
    };
    (d_x, d_w)
}

/// The input gradient of [`grouped_matmul`], `[rows, d_in]`: `grad w[e]^T` per segment.
pub fn grouped_matmul_input_grad(
    w: &[f32],
    counts: &[usize],
    grad: &[f32],
    d_in: usize,
    d_out: usize,
) -> Vec<f32> {
    // Each expert's `w^T` made contiguous once, not gathered again for every block.
    let transposed: Vec<_> = counts
        .iter()
        .enumerate()
        .map(|(e, &count)| match count {
            0 => Default::default(),
            _ => Matrix::expert(w, e, d_in, d_out).transpose().row_major(),
        })
        .collect();
    let experts: Vec<_> = transposed
        .iter()
        .map(|w_t| Matrix::rows_of(w_t, d_in, 0..w_t.len() / d_in.max(1)))
        .collect();
    segment_products(grad, counts, &experts, [d_out, d_in])
}

/// Segment `e` of the packed rows `x: [rows, d_in]` times `matrices[e]` (`[d_in, d_out]`),
/// `[rows, d_out]`: blocks of rows in parallel, each written once by its product.
fn segment_products(
    x: &[f32],
    counts: &[usize],
    matrices: &[Matrix],
    [d_in, d_out]: [usize; 2],
) -> Vec<f32> {
    let (starts, rows) = segment_rows(x, counts, d_in);
    // SAFETY: the blocks tile all `rows` rows, and each product writes its block whole.
    unsafe {
        written(rows * d_out, |out| {
            let blocks = row_blocks(out, d_out, counts, MATMUL_BLOCK_ROWS);
            blocks.into_par_iter().for_each(|(e, rows, out)| {
                let rows = starts[e] + rows.start..starts[e] + rows.end;
                matmul_into(out, Matrix::rows_of(x, d_in, rows), matrices[e]);
            });
        })
    }
}

/// First row of each segment of the packed rows `x` (width `width`), and their number,
/// which the counts must add up to.
pub(super) fn segment_rows(x: &[f32], counts: &[usize], width: usize) -> (Vec<usize>, usize) {
    let rows = counts.iter().sum::<usize>();
    assert_eq!(
        rows * width,
        x.len(),
        "grouped matmul: counts and rows differ"
    );
    (starts(counts), rows)
}

/// Assignments per token.
fn top_k(token_values: usize, d: usize, assignments: usize) -> usize {
    assignments / (token_values / d.max(1)).max(1)
}

/// First row of each segment.
fn starts(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |start, &count| {
            let first = *start;
            *start += count;
            Some(first)
        })
        .collect()
}

/// Splits `out` (rows of `width`, consecutive segments of `counts` rows) into blocks of at
/// most `block_rows` rows inside one segment: `(segment, rows within it, block)`.
pub(super) fn row_blocks<'a, T>(
    mut out: &'a mut [T],
    width: usize,
    counts: &[usize],
    block_rows: usize,
) -> Vec<(usize, Range<usize>, &'a mut [T])> {
    let mut blocks = Vec::new();
    for (e, &count) in counts.iter().enumerate() {
        for first in (0..count).step_by(block_rows) {
            let rows = first..(first + block_rows).min(count);
            let (block, rest) = std::mem::take(&mut out).split_at_mut(rows.len() * width);
            blocks.push((e, rows, block));
            out = rest;
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// `a: [m, k]` times `b: [k, n]`, row-major, in f64.
    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|l| a[i * k + l] as f64 * b[l * n + j] as f64)
                    .sum();
            }
        }
        out
    }

    fn transpose(a: &[f32], rows: usize, columns: usize) -> Vec<f32> {
        (0..columns * rows)
            .map(|i| a[(i % rows) * columns + i / rows])
            .collect()
    }

    fn assert_close(got: &[f32], expected: &[f64], what: &str) {
        assert_eq!(got.len(), expected.len(), "{what}: length");
        for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
            assert!(
                (g as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                "{what}[{i}]: {g} vs {e}"
            );
        }
    }

    #[test]
    fn grouped_matmul_matches_naive_per_segment() {
        // Segments empty, of one row, and longer than a block (one full block plus one row);
        // d_in longer than a block, so the weight gradient is split into column blocks.
        let counts = [0, 1, MATMUL_BLOCK_ROWS + 1, 5];
        let (d_in, d_out) = (MATMUL_BLOCK_ROWS + 44, 9);
        let rows: usize = counts.iter().sum();
        let x = values(rows * d_in, 1);
        let w = values(counts.len() * d_in * d_out, 2);
        let grad = values(rows * d_out, 3);
        let out = grouped_matmul(&x, &w, &counts, d_in, d_out);
        let (d_x, d_w) = grouped_matmul_grads(&x, &w, &counts, &grad, d_in, d_out);
        let starts = starts(&counts);
        for (e, &count) in counts.iter().enumerate() {
            let (x_e, grad_e) = (
                &x[starts[e] * d_in..(starts[e] + count) * d_in],
                &grad[starts[e] * d_out..(starts[e] + count) * d_out],
            );
            let w_e = &w[e * d_in * d_out..(e + 1) * d_in * d_out];
            let out_e = &out[starts[e] * d_out..(starts[e] + count) * d_out];
            assert_close(out_e, &naive(x_e, w_e, count, d_in, d_out), "out");
            let d_x_e = &d_x[starts[e] * d_in..(starts[e] + count) * d_in];
            let w_t = transpose(w_e, d_in, d_out);
            assert_close(d_x_e, &naive(grad_e, &w_t, count, d_out, d_in), "d_x");
            let x_t = transpose(x_e, count, d_in);
            let d_w_e = &d_w[e * d_in * d_out..(e + 1) * d_in * d_out];
            assert_close(d_w_e, &naive(&x_t, grad_e, d_in, count, d_out), "d_w");
        }
    }
}
