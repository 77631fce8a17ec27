//! Causal attention on flex. Per (batch, head), in parallel: each block of queries is
//! multiplied with only the keys its last query can see, the masked softmax runs on those
//! scores in place, and the products go through `gemm`. The reference multiplies the whole
//! square (the masked half included), then makes separate passes for the softmax.

use std::ops::Range;

use rayon::prelude::*;

use super::matmul::{Matrix, scaled_matmul_into};
use super::{dot, exp, max_of, sum_of, vectorized};

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
    let mut output = vec![0.0f32; dims.heads * queries * d];
    let mut probs = vec![0.0f32; dims.heads * queries * keys];
    if output.is_empty() {
        return (output, probs);
    }
    output
        .par_chunks_mut(queries * d)
        .zip(probs.par_chunks_mut(queries * keys))
        .enumerate()
        .for_each(|(head, (output, probs))| {
            let (q, k, v) = (q.matrix(head), k.matrix(head), v.matrix(head));
            for (rows, seen) in dims.query_blocks() {
                let block = &mut probs[rows.start * keys..];
                let q_rows = q.rows(rows.clone());
                let k_seen = k.rows(0..seen).transpose();
                scaled_matmul_into(block, keys, q_rows, k_seen, dims.scale());
                for_visible_scores(
                    block,
                    rows.clone(),
                    seen,
                    dims,
                    #[inline(always)]
                    |_, visible| {
                        let max = max_of(visible);
                        visible.iter_mut().for_each(|s| *s = exp(*s - max));
                        let inv = 1.0 / sum_of(visible, |p| p);
                        visible.iter_mut().for_each(|p| *p *= inv);
                    },
                );
                let p_rows = Matrix::rows_of(probs, keys, rows.clone()).columns(0..seen);
                let out_rows = &mut output[rows.start * d..rows.end * d];
                scaled_matmul_into(out_rows, d, p_rows, v.rows(0..seen), 1.0);
            }
        });
    (output, probs)
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
    let mut dq = vec![0.0f32; dims.heads * queries * d];
    let mut dk = vec![0.0f32; dims.heads * keys * d];
    let mut dv = vec![0.0f32; dims.heads * keys * d];
    if dq.is_empty() || dk.is_empty() {
        return (dq, dk, dv);
    }
    dq.par_chunks_mut(queries * d)
        .zip(dk.par_chunks_mut(keys * d))
        .zip(dv.par_chunks_mut(keys * d))
        .enumerate()
        .for_each(|(head, ((dq, dk), dv))| {
            let (q, k, v) = (q.matrix(head), k.matrix(head), v.matrix(head));
            let grad = grad.matrix(head);
            let probs = &probs[head * queries * keys..(head + 1) * queries * keys];
            // Gradient of the scores, zero where masked: p * (dp - <p, dp>), dp = grad v^T.
            let mut d_scores = vec![0.0f32; queries * keys];
            for (rows, seen) in dims.query_blocks() {
                let block = &mut d_scores[rows.start * keys..];
                let v_seen = v.rows(0..seen).transpose();
                scaled_matmul_into(block, keys, grad.rows(rows.clone()), v_seen, 1.0);
                for_visible_scores(
                    block,
                    rows.clone(),
                    seen,
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
                let ds_rows = Matrix::rows_of(&d_scores, keys, rows.clone()).columns(0..seen);
                let dq_rows = &mut dq[rows.start * d..rows.end * d];
                scaled_matmul_into(dq_rows, d, ds_rows, k.rows(0..seen), dims.scale());
            }
            // Key block `j0..j1` is seen by the queries from `j0 - (keys - queries)` on.
            for first_key in (0..keys).step_by(KEY_BLOCK) {
                let columns = first_key..(first_key + KEY_BLOCK).min(keys);
                let seers = first_key.saturating_sub(keys - queries)..queries;
                let key_block =
                    |m| Matrix::rows_of(m, keys, seers.clone()).columns(columns.clone());
                let key_rows = columns.start * d..columns.end * d;
                let p_t = key_block(probs).transpose();
                let grad_rows = grad.rows(seers.clone());
                scaled_matmul_into(&mut dv[key_rows.clone()], d, p_t, grad_rows, 1.0);
                let ds_t = key_block(&d_scores).transpose();
                let q_rows = q.rows(seers.clone());
                scaled_matmul_into(&mut dk[key_rows], d, ds_t, q_rows, dims.scale());
            }
        });
    (dq, dk, dv)
}

/// Runs `row(query, visible)` on each score row of the query block `rows` (rows of
/// `dims.keys`, the first `seen` columns computed) after zeroing its masked columns,
/// [`vectorized`] (`row` must be `#[inline(always)]`).
#[inline(always)]
fn for_visible_scores(
    block: &mut [f32],
    rows: Range<usize>,
    seen: usize,
    dims: Dims,
    mut row: impl FnMut(usize, &mut [f32]),
) {
    vectorized(
        #[inline(always)]
        || {
            for (i, scores) in rows.zip(block.chunks_mut(dims.keys)) {
                let (visible, masked) = scores[..seen].split_at_mut(dims.visible(i));
                masked.fill(0.0);
                row(i, visible);
            }
        },
    )
}
