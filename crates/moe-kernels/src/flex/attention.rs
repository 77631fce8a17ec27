//! Causal attention on flex. Per (batch, head), in parallel: each block of queries is
//! multiplied with only the keys its last query can see, the masked softmax runs on those
//! scores in place, and the products go through `gemm`. The reference multiplies the whole
//! square (the masked half included), then makes separate passes for the softmax.

use std::iter::repeat;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::Shape;
use burn::tensor::ops::FloatTensorOps;

use super::layout::{f32_rows, heads, tensor};
use super::matmul::{Matrix, scaled_matmul_into};
use super::output::{assume_init, write_row, written, written_pair};
use super::simd::{dot, exp, max_of, sum_of, vectorized};
use crate::reference;

/// [`crate::MoeBackend::causal_attention_forward`] on f32 tensors.
pub(super) fn causal_attention_forward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let (Some(q_heads), Some(k_heads), Some(v_heads)) = (heads(&q), heads(&k), heads(&v)) else {
        return reference::causal_attention_forward::<Flex>(q, k, v);
    };
    let dims = attention_dims(&q_heads, &k_heads);
    let (output, probs) = forward(q_heads, k_heads, v_heads, dims);
    let [b, h, queries, _] = q_heads.shape;
    (
        heads_interleaved(output, q_heads.shape),
        tensor(probs, Shape::new([b, h, queries, dims.keys])),
    )
}

/// [`crate::MoeBackend::causal_attention_backward`] on f32 tensors.
pub(super) fn causal_attention_backward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    probs: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let (Some(q_heads), Some(k_heads), Some(v_heads), Some(p_rows), Some(g_heads)) = (
        heads(&q),
        heads(&k),
        heads(&v),
        f32_rows(&probs),
        heads(&grad),
    ) else {
        return reference::causal_attention_backward::<Flex>(q, k, v, probs, grad);
    };
    let dims = attention_dims(&q_heads, &k_heads);
    let (dq, dk, dv) = backward(q_heads, k_heads, v_heads, &p_rows, g_heads, dims);
    (
        laid_out_like(dq, &q_heads),
        laid_out_like(dk, &k_heads),
        laid_out_like(dv, &v_heads),
    )
}

/// The attention sizes of `q: [B, H, Sq, D]` and `k: [B, H, Sk, D]`.
fn attention_dims(q: &Heads, k: &Heads) -> Dims {
    let [b, h, queries, head_dim] = q.shape;
    Dims {
        heads: b * h,
        queries,
        keys: k.shape[2],
        head_dim,
    }
}

/// Row-major `[B, H, S, D]` values as a `[B, H, S, D]` tensor whose memory is laid out
/// `[B, S, H, D]` (dims 1 and 2 of a contiguous tensor swapped): attention's output in the
/// layout the model reads it, heads side by side per position, so that its swap back and
/// reshape copy nothing. Our permutation is one parallel pass of row copies; flex's
/// strided copy of the same is much slower.
fn heads_interleaved(values: Vec<f32>, [b, h, s, d]: [usize; 4]) -> FlexTensor {
    // SAFETY: each sequence's `s * h` rows of `d` are all copied: position `p` of head
    // `head` to row `p * h + head`.
    let output = unsafe {
        written(values.len(), |output| {
            if output.is_empty() {
                return;
            }
            output
                .par_chunks_mut(s * h * d)
                .zip(values.par_chunks(h * s * d))
                .for_each(|(output, values)| {
                    for (head, rows) in values.chunks(s * d).enumerate() {
                        for (position, row) in rows.chunks(d).enumerate() {
                            write_row(
                                &mut output[(position * h + head) * d..][..d],
                                row.iter().copied(),
                            );
                        }
                    }
                });
        })
    };
    Flex::float_swap_dims(tensor(output, Shape::new([b, s, h, d])), 1, 2)
}

/// Row-major `[B, H, S, D]` gradient values as a tensor laid out like their input
/// `like`: heads interleaved ([`heads_interleaved`]) when the input is a view of that
/// layout (the model's values), so the gradient flows back through its swap and reshape
/// without a copy; contiguous otherwise.
fn laid_out_like(values: Vec<f32>, like: &Heads) -> FlexTensor {
    let [_, h, s, d] = like.shape;
    if like.strides == [s * h * d, d, h * d, 1] && h > 1 && s > 1 {
        heads_interleaved(values, like.shape)
    } else {
        tensor(values, Shape::new(like.shape))
    }
}

/// Queries per block: the scores of a block stay in cache between the products.
const QUERY_BLOCK: usize = 64;

/// Keys per block of the key-side gradients.
const KEY_BLOCK: usize = 64;

/// Sizes of an attention over `heads` (batch times heads) independent heads: query `i`
/// sits at key position `keys - queries + i` and sees the keys up to and including it.
#[derive(Clone, Copy)]
pub struct Dims {
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
}

impl Dims {
    /// Keys query `i` sees.
    fn visible(&self, i: usize) -> usize {
        self.keys - self.queries + i + 1
    }

    /// Blocks of at most `block` queries, each with the keys its last query sees.
    fn query_blocks(&self) -> impl Iterator<Item = (Range<usize>, usize)> {
        (0..self.queries).step_by(QUERY_BLOCK).map(move |first| {
            let rows = first..(first + QUERY_BLOCK).min(self.queries);
            let seen = self.visible(rows.end - 1);
            (rows, seen)
        })
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// A `[B, H, S, D]` tensor's storage seen as `B * H` matrices `[S, D]`, read through its
/// strides (the attention's inputs are often transposed views: no copy needed).
#[derive(Clone, Copy)]
pub struct Heads<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    /// `[B, H, S, D]`.
    pub shape: [usize; 4],
    pub strides: [usize; 4],
}

impl Heads<'_> {
    /// Matrix `[S, D]` of head `head` (counted over batch and heads).
    fn matrix(&self, head: usize) -> Matrix<'_> {
        let [_, heads, rows, columns] = self.shape;
        let [batch_stride, head_stride, row_stride, column_stride] = self.strides;
        let offset = self.offset + head / heads * batch_stride + head % heads * head_stride;
        Matrix::strided(
            self.data,
            offset,
            [rows, columns],
            [row_stride, column_stride],
        )
    }
}

/// `(output, probs)`: `softmax(q k^T / sqrt(d), causal) v`, `[heads, queries, head_dim]`,
/// and the probabilities `[heads, queries, keys]` (zero where masked) for the backward,
/// both row-major. `q` holds `queries` rows per head, `k` and `v` `keys` rows.
pub fn forward(q: Heads, k: Heads, v: Heads, dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let Dims {
        queries,
        keys,
        head_dim: d,
        ..
    } = dims;
    let lens = [dims.heads * queries * d, dims.heads * queries * keys];
    // SAFETY: per head, the query blocks tile the output and the probabilities, and each
    // block's rows are written whole (see `softmax_rows`).
    unsafe {
        written_pair(lens, |output, probs| {
            if output.is_empty() || probs.is_empty() {
                for values in [output, probs] {
                    write_row(values, repeat(0.0));
                }
                return;
            }
            output
                .par_chunks_mut(queries * d)
                .zip(probs.par_chunks_mut(queries * keys))
                .enumerate()
                .for_each(|(head, (output, probs))| {
                    head_forward(head, [q, k, v], dims, [output, probs]);
                });
        })
    }
}

/// [`forward`] of one head into its blocks of the output and the probabilities, which it
/// writes whole.
fn head_forward(
    head: usize,
    [q, k, v]: [Heads; 3],
    dims: Dims,
    [output, probs]: [&mut [MaybeUninit<f32>]; 2],
) {
    let (q, k, v) = (q.matrix(head), k.matrix(head), v.matrix(head));
    score_blocks(
        [probs, output],
        [q, k, v],
        [dims.scale(), 1.0],
        dims,
        #[inline(always)]
        |_, visible| {
            let max = max_of(visible);
            visible.iter_mut().for_each(|s| *s = exp(*s - max));
            let inv = 1.0 / sum_of(visible, |p| p);
            visible.iter_mut().for_each(|p| *p *= inv);
        },
    );
}

/// Gradients `(dq, dk, dv)` of [`forward`], row-major, from its inputs, its probabilities
/// (row-major) and the output's gradient `grad` (`queries` rows per head).
pub fn backward(
    q: Heads,
    k: Heads,
    v: Heads,
    probs: &[f32],
    grad: Heads,
    dims: Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims {
        queries,
        keys,
        head_dim: d,
        ..
    } = dims;
    let (mut dk, mut dv) = (Vec::new(), Vec::new());
    // SAFETY: per head, the query blocks tile `dq` and the key blocks `dk` and `dv`, and
    // each block is written whole by its product.
    let dq = unsafe {
        written(dims.heads * queries * d, |dq| {
            (dk, dv) = written_pair([dims.heads * keys * d; 2], |dk, dv| {
                if dq.is_empty() || dk.is_empty() {
                    for values in [&mut *dq, dk, dv] {
                        write_row(values, repeat(0.0));
                    }
                    return;
                }
                dq.par_chunks_mut(queries * d)
                    .zip(dk.par_chunks_mut(keys * d))
                    .zip(dv.par_chunks_mut(keys * d))
                    .enumerate()
                    .for_each(|(head, ((dq, dk), dv))| {
                        let probs = &probs[head * queries * keys..(head + 1) * queries * keys];
                        head_backward(head, [q, k, v, grad], probs, dims, [dq, dk, dv]);
                    });
            });
        })
    };
    (dq, dk, dv)
}

/// [`backward`] of one head into its blocks of `dq`, `dk` and `dv`, which it writes whole.
fn head_backward(
    head: usize,
    [q, k, v, grad]: [Heads; 4],
    probs: &[f32],
    dims: Dims,
    [dq, dk, dv]: [&mut [MaybeUninit<f32>]; 3],
) {
    let (Dims { queries, keys, .. }, d) = (dims, dims.head_dim);
    let (q, k, v, grad) = (
        q.matrix(head),
        k.matrix(head),
        v.matrix(head),
        grad.matrix(head),
    );
    // Gradient of the scores, zero where masked: p * (dp - <p, dp>), dp = grad v^T.
    // SAFETY: the query blocks tile the scores, each block's rows written whole.
    let d_scores = unsafe {
        written(queries * keys, |d_scores| {
            score_blocks(
                [d_scores, dq],
                [grad, v, k],
                [1.0, dims.scale()],
                dims,
                #[inline(always)]
                |i, visible| {
                    let p = &probs[i * keys..i * keys + visible.len()];
                    let p_dot_dp = dot(p, visible);
                    for (ds, &p) in visible.iter_mut().zip(p) {
                        *ds = p * (*ds - p_dot_dp);
                    }
                },
            );
        })
    };
    // Key block `j0..j1` is seen by the queries from `j0 - (keys - queries)` on.
    for first_key in (0..keys).step_by(KEY_BLOCK) {
        let columns = first_key..(first_key + KEY_BLOCK).min(keys);
        let seers = first_key.saturating_sub(keys - queries)..queries;
        let key_block = |m| Matrix::rows_of(m, keys, seers.clone()).columns(columns.clone());
        let key_rows = columns.start * d..columns.end * d;
        let p_t = key_block(probs).transpose();
        let grad_rows = grad.rows(seers.clone());
        scaled_matmul_into(&mut dv[key_rows.clone()], d, p_t, grad_rows, 1.0);
        let ds_t = key_block(&d_scores).transpose();
        let q_rows = q.rows(seers.clone());
        scaled_matmul_into(&mut dk[key_rows], d, ds_t, q_rows, dims.scale());
    }
}

/// The query-block loop of both passes: per block of rows, `scores = a b^T * scale`
/// over the keys its last query sees, `row(query, visible)` on each score row (see
/// [`softmax_rows`]; `Copy`, so each block takes it by value and inlines it), then
/// `out = scores c * out_scale`. Writes `scores` (`[queries, keys]`) and `out`
/// (`[queries, head_dim]`) whole.
#[inline(always)]
fn score_blocks(
    [scores, out]: [&mut [MaybeUninit<f32>]; 2],
    [a, b, c]: [Matrix; 3],
    [scale, out_scale]: [f32; 2],
    dims: Dims,
    row: impl FnMut(usize, &mut [f32]) + Copy,
) {
    let (keys, d) = (dims.keys, dims.head_dim);
    for (rows, seen) in dims.query_blocks() {
        let block = &mut scores[rows.start * keys..rows.end * keys];
        let (a_rows, b_seen) = (a.rows(rows.clone()), b.rows(0..seen).transpose());
        scaled_matmul_into(block, keys, a_rows, b_seen, scale);
        let block = softmax_rows(block, rows.clone(), seen, dims, row);
        let block_rows = Matrix::rows_of(block, keys, 0..rows.len()).columns(0..seen);
        let out_rows = &mut out[rows.start * d..rows.end * d];
        scaled_matmul_into(out_rows, d, block_rows, c.rows(0..seen), out_scale);
    }
}

/// Finishes the score rows `rows` of a query block (rows of `dims.keys`; the product
/// wrote their first `seen` columns): zeroes each row's masked and unseen columns, runs
/// `row(query, visible)` on the rest, [`vectorized`] (`row` must be `#[inline(always)]`),
/// and returns the block, now written whole.
#[inline(always)]
fn softmax_rows(
    block: &mut [MaybeUninit<f32>],
    rows: Range<usize>,
    seen: usize,
    dims: Dims,
    mut row: impl FnMut(usize, &mut [f32]),
) -> &mut [f32] {
    vectorized(
        #[inline(always)]
        || {
            for (i, scores) in rows.zip(block.chunks_mut(dims.keys)) {
                let (computed, unseen) = scores.split_at_mut(seen);
                write_row(unseen, repeat(0.0));
                // SAFETY: the product wrote the first `seen` columns.
                let computed = unsafe { assume_init(computed) };
                let (visible, masked) = computed.split_at_mut(dims.visible(i));
                masked.fill(0.0);
                row(i, visible);
            }
        },
    );
    // SAFETY: every row was written whole above.
    unsafe { assume_init(block) }
}
