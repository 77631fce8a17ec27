//! Token dispatch written as tensor ops: the counting sort of assignments by expert, the
//! permute into the expert-major buffer, the weighted combine back, and the grouped matmul
//! over packed expert segments, with their gradients.
//!
//! Assignments are flattened token-major (`a = t * k + j`), so ranking in assignment
//! order is stable in token order. A `slot` of `rows` or more marks a dropped assignment.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use super::{float, int};

/// `(slot, counts)` of the assignments `experts: [A]`: each one's row in the expert-major
/// buffer and the per-expert counts before dropping, `[E]`.
///
/// With `capacity = Some(C)`, expert `e` owns rows `e * C .. (e + 1) * C` and assignments
/// ranked `C` or later in their expert get slot `E * C` (dropped). Dropless, the rows are
/// packed: expert `e` starts at the sum of the earlier experts' counts.
pub fn expert_slots<B: Backend>(
    experts: IntTensor<B>,
    n_experts: usize,
    capacity: Option<usize>,
) -> (IntTensor<B>, IntTensor<B>) {
    let expert: Tensor<B, 1, Int> = int(experts);
    let [assignments] = expert.dims();
    let device = expert.device();
    let ids = Tensor::<B, 1, Int>::arange(0..n_experts as i64, &device);
    let one_hot = expert
        .clone()
        .unsqueeze_dim::<2>(1)
        .equal(ids.unsqueeze_dim(0))
        .int();
    let counts = one_hot.clone().sum_dim(0).reshape([n_experts]);
    let rank = one_hot
        .cumsum(0)
        .gather(1, expert.clone().unsqueeze_dim(1))
        .reshape([assignments])
        - 1;
    let slot = match capacity {
        Some(capacity) => {
            let dropped = rank.clone().greater_equal_elem(capacity as i64);
            let trash = Tensor::full([assignments], (n_experts * capacity) as i64, &device);
            (expert * capacity as i64 + rank).mask_where(dropped, trash)
        }
        None => {
            let offsets = counts.clone().cumsum(0) - counts.clone();
            offsets.select(0, expert) + rank
        }
    };
    (slot.into_primitive(), counts.into_primitive())
}

/// Token rows `x: [T, d]` gathered into the expert-major buffer `[rows, d]`, each token once
/// per assignment (`A = T * k` slots); rows no assignment fills are zero.
pub fn permute_forward<B: Backend>(
    x: FloatTensor<B>,
    slot: IntTensor<B>,
    rows: usize,
) -> FloatTensor<B> {
    let x: Tensor<B, 2> = float(x);
    let slot: Tensor<B, 1, Int> = int(slot);
    let [tokens, d] = x.dims();
    let top_k = slot.dims()[0] / tokens;
    let repeated = x
        .unsqueeze_dim::<3>(1)
        .expand([tokens, top_k, d])
        .reshape([tokens * top_k, d]);
    scatter_rows(repeated, slot, rows).into_primitive().tensor()
}

/// Gradient of [`permute_forward`]: each token sums its assignments' rows of `grad`,
/// `[T, d]`.
pub fn permute_backward<B: Backend>(
    grad: FloatTensor<B>,
    slot: IntTensor<B>,
    tokens: usize,
) -> FloatTensor<B> {
    let grad: Tensor<B, 2> = float(grad);
    let slot: Tensor<B, 1, Int> = int(slot);
    let d = grad.dims()[1];
    let top_k = slot.dims()[0] / tokens;
    gather_rows(grad, slot)
        .reshape([tokens, top_k, d])
        .sum_dim(1)
        .reshape([tokens, d])
        .into_primitive()
        .tensor()
}

/// Weighted sum of each token's expert outputs `buffer: [rows, d]` back in token order with
/// `weights: [T, k]`, `[T, d]`. Dropped assignments contribute zero.
pub fn combine_forward<B: Backend>(
    buffer: FloatTensor<B>,
    slot: IntTensor<B>,
    weights: FloatTensor<B>,
) -> FloatTensor<B> {
    let weights: Tensor<B, 2> = float(weights);
    let [tokens, k] = weights.dims();
    let buffer: Tensor<B, 2> = float(buffer);
    let d = buffer.dims()[1];
    let gathered = gather_rows(buffer, int(slot)).reshape([tokens, k, d]);
    (gathered * weights.unsqueeze_dim(2))
        .sum_dim(1)
        .reshape([tokens, d])
        .into_primitive()
        .tensor()
}

/// Gradients `(d_buffer, d_weights)` of [`combine_forward`] given the output's `grad: [T, d]`:
/// `d_buffer[slot(t, j)] = w[t, j] * grad[t]`, `d_weights[t, j] = <buffer[slot(t, j)], grad[t]>`.
pub fn combine_backward<B: Backend>(
    buffer: FloatTensor<B>,
    slot: IntTensor<B>,
    weights: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let buffer: Tensor<B, 2> = float(buffer);
    let slot: Tensor<B, 1, Int> = int(slot);
    let weights: Tensor<B, 2> = float(weights);
    let grad: Tensor<B, 2> = float(grad);
    let [rows, d] = buffer.dims();
    let [tokens, k] = weights.dims();
    let grad = grad
        .unsqueeze_dim::<3>(1)
        .expand([tokens, k, d])
        .reshape([tokens * k, d]);
    let d_weights = (gather_rows(buffer, slot.clone()) * grad.clone())
        .sum_dim(1)
        .reshape([tokens, k]);
    let d_buffer = scatter_rows(grad * weights.reshape([tokens * k, 1]), slot, rows);
    (
        d_buffer.into_primitive().tensor(),
        d_weights.into_primitive().tensor(),
    )
}

/// `[rows, d]` with row `slot[a]` set to `values[a]` (slots past the end dropped), zeros
/// elsewhere.
fn scatter_rows<B: Backend>(
    values: Tensor<B, 2>,
    slot: Tensor<B, 1, Int>,
    rows: usize,
) -> Tensor<B, 2> {
    let d = values.dims()[1];
    let slot = slot.clamp_max(rows as i64);
    Tensor::zeros([rows + 1, d], &values.device())
        .select_assign(0, slot, values, IndexingUpdateOp::Add)
        .narrow(0, 0, rows)
}

/// `[A, d]` rows `buffer[slot[a]]`, zero for slots past the end.
fn gather_rows<B: Backend>(buffer: Tensor<B, 2>, slot: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    let [rows, d] = buffer.dims();
    let padded = Tensor::cat(vec![buffer, Tensor::zeros([1, d], &slot.device())], 0);
    padded.select(0, slot.clamp_max(rows as i64))
}

/// Grouped matmul over packed segments: rows `x: [rows, d_in]` of expert `e` (the `e`-th
/// segment, `counts[e]` rows) times `weights[e]: [d_in, d_out]`, `[rows, d_out]`. Empty
/// experts cost nothing.
pub fn grouped_matmul_forward<B: Backend>(
    x: FloatTensor<B>,
    weights: FloatTensor<B>,
    counts: &[usize],
) -> FloatTensor<B> {
    let x: Tensor<B, 2> = float(x);
    let weights: Tensor<B, 3> = float(weights);
    let d_out = weights.dims()[2];
    let weights = expert_rows(weights);
    let outputs = segments(counts)
        .map(|(e, start, count)| x.clone().narrow(0, start, count).matmul(weights(e)))
        .collect::<Vec<_>>();
    concat_rows(outputs, d_out, &x.device())
        .into_primitive()
        .tensor()
}

/// Gradients `(d_x, d_weights)` of [`grouped_matmul_forward`]: per segment
/// `d_x = grad w[e]^T` and `d_w[e] = x^T grad` (zero for experts with no rows).
pub fn grouped_matmul_backward<B: Backend>(
    x: FloatTensor<B>,
    weights: FloatTensor<B>,
    counts: &[usize],
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x: Tensor<B, 2> = float(x);
    let weights = expert_rows(float(weights));
    let grad: Tensor<B, 2> = float(grad);
    let (n_experts, [_, d_in], [_, d_out]) = (counts.len(), x.dims(), grad.dims());
    let device = x.device();
    let mut d_x = Vec::new();
    let mut d_w = vec![None; n_experts];
    for (e, start, count) in segments(counts) {
        let w = weights(e);
        let x_e = x.clone().narrow(0, start, count);
        let grad_e = grad.clone().narrow(0, start, count);
        d_x.push(grad_e.clone().matmul(w.transpose()));
        d_w[e] = Some(x_e.transpose().matmul(grad_e).unsqueeze::<3>());
    }
    let d_w = d_w
        .into_iter()
        .map(|w| w.unwrap_or_else(|| Tensor::zeros([1, d_in, d_out], &device)))
        .collect();
    (
        concat_rows(d_x, d_in, &device).into_primitive().tensor(),
        Tensor::cat(d_w, 0).into_primitive().tensor(),
    )
}

/// Expert `e`'s matrix `[d_in, d_out]` of the stacked `weights: [E, d_in, d_out]`, as a
/// row range of one `[E * d_in, d_out]` matrix: a view on every backend (reshaping a slice
/// of the stack copies it on some, e.g. flex, for every matmul).
fn expert_rows<B: Backend>(weights: Tensor<B, 3>) -> impl Fn(usize) -> Tensor<B, 2> {
    let [n_experts, d_in, d_out] = weights.dims();
    let rows = weights.reshape([n_experts * d_in, d_out]);
    move |e| rows.clone().narrow(0, e * d_in, d_in)
}

/// `(expert, first row, rows)` of every non-empty segment of a packed buffer.
pub(crate) fn segments(counts: &[usize]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    counts
        .iter()
        .enumerate()
        .scan(0, |start, (e, &count)| {
            let segment = (e, *start, count);
            *start += count;
            Some(segment)
        })
        .filter(|&(_, _, count)| count > 0)
}

/// Row-wise concatenation; an empty list gives `[0, width]`.
fn concat_rows<B: Backend>(
    parts: Vec<Tensor<B, 2>>,
    width: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    if parts.is_empty() {
        Tensor::zeros([0, width], device)
    } else {
        Tensor::cat(parts, 0)
    }
}
