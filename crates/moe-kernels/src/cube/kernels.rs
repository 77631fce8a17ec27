//! CubeCL kernels of the dispatch pipeline. One source compiles to WGSL/SPIR-V (wgpu) and
//! CUDA. Every tensor is contiguous and indexed linearly; slots at or past the buffer's
//! row count mark dropped assignments.

use cubecl::prelude::*;

/// Counting sort, pass 1: `block_counts[b * E + e]` = assignments among `experts[b * block
/// .. (b + 1) * block]` routed to expert `e`. One unit per (block, expert).
#[cube(launch)]
pub fn count_blocks_kernel<I: Numeric>(
    experts: &Tensor<I>,
    block_counts: &mut Tensor<I>,
    n_experts: u32,
    block: u32,
    #[define(I)] _dtype: StorageType,
) {
    let unit = ABSOLUTE_POS;
    if unit >= block_counts.len() {
        terminate!();
    }
    let expert = (unit % n_experts as usize) as u32;
    let start = (unit / n_experts as usize) * block as usize;
    let mut end = start + block as usize;
    if end > experts.len() {
        end = experts.len();
    }
    let mut count: u32 = 0;
    for a in start..end {
        if u32::cast_from(experts[a]) == expert {
            count += 1;
        }
    }
    block_counts[unit] = I::cast_from(count);
}

/// Counting sort, pass 2: turns `block_counts` into each block's first rank inside each
/// expert (an exclusive scan over blocks) and writes the totals to `counts[e]`. One unit
/// per expert.
#[cube(launch)]
pub fn scan_blocks_kernel<I: Numeric>(
    block_counts: &mut Tensor<I>,
    counts: &mut Tensor<I>,
    #[define(I)] _dtype: StorageType,
) {
    let expert = ABSOLUTE_POS;
    let n_experts = counts.len();
    if expert >= n_experts {
        terminate!();
    }
    let n_blocks = block_counts.len() / n_experts;
    let mut running: u32 = 0;
    for b in 0..n_blocks {
        let index = b * n_experts + expert;
        let count = u32::cast_from(block_counts[index]);
        block_counts[index] = I::cast_from(running);
        running += count;
    }
    counts[expert] = I::cast_from(running);
}

/// Counting sort, pass 3: each assignment's slot from its block's first rank and its
/// position inside the block, in token order. Padded: `e * C + rank`, or `E * C` past the
/// capacity; packed: the expert's offset (sum of the earlier counts) plus the rank. One
/// unit per (block, expert).
// `padded` is a comptime flag: its `if` is resolved when the kernel is compiled and
// cannot merge with the runtime capacity test.
#[allow(clippy::collapsible_if)]
#[cube(launch)]
pub fn assign_slots_kernel<I: Numeric>(
    experts: &Tensor<I>,
    block_starts: &Tensor<I>,
    counts: &Tensor<I>,
    slot: &mut Tensor<I>,
    block: u32,
    capacity: u32,
    #[comptime] padded: bool,
    #[define(I)] _dtype: StorageType,
) {
    let unit = ABSOLUTE_POS;
    if unit >= block_starts.len() {
        terminate!();
    }
    let n_experts = counts.len();
    let expert = unit % n_experts;
    let start = (unit / n_experts) * block as usize;
    let mut end = start + block as usize;
    if end > experts.len() {
        end = experts.len();
    }
    let mut first: u32 = 0;
    if padded {
        first = expert as u32 * capacity;
    } else {
        for e in 0..expert {
            first += u32::cast_from(counts[e]);
        }
    }
    let trash = n_experts as u32 * capacity;
    let mut rank = u32::cast_from(block_starts[unit]);
    for a in start..end {
        if u32::cast_from(experts[a]) == expert as u32 {
            let mut row = first + rank;
            if padded {
                if rank >= capacity {
                    row = trash;
                }
            }
            slot[a] = I::cast_from(row);
            rank += 1;
        }
    }
}

/// `out[slot[a]] = weights[a] * x[a / k]` for every kept assignment `a` (`out` zeroed
/// beforehand; slots are distinct, so no two units write the same row). Rows move in
/// vectors of `N` elements: one unit per vector of `[A, d]`.
#[cube(launch)]
pub fn scatter_rows_kernel<F: Float, I: Numeric, N: Size>(
    x: &Tensor<Vector<F, N>>,
    slot: &Tensor<I>,
    weights: &Tensor<F>,
    out: &mut Tensor<Vector<F, N>>,
    top_k: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let vectors = out.shape(1) / out.vector_size();
    let pos = ABSOLUTE_POS;
    if pos >= slot.len() * vectors {
        terminate!();
    }
    let a = pos / vectors;
    let j = pos % vectors;
    let row = u32::cast_from(slot[a]) as usize;
    if row < out.shape(0) {
        out[row * vectors + j] = Vector::new(weights[a]) * x[(a / top_k as usize) * vectors + j];
    }
}

/// `out[t] = sum_i weights[t * k + i] * buffer[slot[t * k + i]]`, dropped slots skipped.
/// One unit per vector of `N` elements of `[T, d]`.
#[cube(launch)]
pub fn gather_rows_kernel<F: Float, I: Numeric, N: Size>(
    buffer: &Tensor<Vector<F, N>>,
    slot: &Tensor<I>,
    weights: &Tensor<F>,
    out: &mut Tensor<Vector<F, N>>,
    top_k: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let vectors = out.shape(1) / out.vector_size();
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let t = pos / vectors;
    let j = pos % vectors;
    let rows = buffer.shape(0);
    let mut sum = Vector::<F, N>::zeroed();
    for i in 0..top_k as usize {
        let a = t * top_k as usize + i;
        let row = u32::cast_from(slot[a]) as usize;
        if row < rows {
            sum += Vector::new(weights[a]) * buffer[row * vectors + j];
        }
    }
    out[pos] = sum;
}

/// `out[a] = <buffer[slot[a]], grad[a / k]>` (zero for dropped assignments): the gradient
/// of the combine weights. One unit per assignment.
#[cube(launch)]
pub fn slot_dot_kernel<F: Float, I: Numeric>(
    buffer: &Tensor<F>,
    slot: &Tensor<I>,
    grad: &Tensor<F>,
    out: &mut Tensor<F>,
    top_k: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let a = ABSOLUTE_POS;
    if a >= out.len() {
        terminate!();
    }
    let d = buffer.shape(1);
    let row = u32::cast_from(slot[a]) as usize;
    let t = a / top_k as usize;
    let mut sum = F::new(0.0);
    if row < buffer.shape(0) {
        for j in 0..d {
            sum += buffer[row * d + j] * grad[t * d + j];
        }
    }
    out[a] = sum;
}

/// How the route kernels score a row of logits (their `scoring` argument).
pub struct Scoring;

impl Scoring {
    /// Softmax probabilities; the weights are the chosen probabilities.
    pub const SOFTMAX: u32 = 0;
    /// The logits themselves; the weights are a softmax over the chosen logits.
    pub const LOGITS: u32 = 1;
    /// Sigmoid scores; the weights are the chosen scores.
    pub const SIGMOID: u32 = 2;
}

/// Routing of one token per unit: the `top_k` experts of row `t` of `logits: [T, E]` by
/// score plus `bias` (best first, ties to the lower index), and their combine weights.
/// `scoring` is a [`Scoring`] code; `normalize` divides the weights by their sum, then
/// `scale` multiplies them.
#[cube(launch)]
pub fn route_kernel<F: Float, I: Numeric>(
    logits: &Tensor<F>,
    bias: &Tensor<F>,
    weights: &mut Tensor<F>,
    experts: &mut Tensor<I>,
    scoring: u32,
    normalize: u32,
    scale: f32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = ABSOLUTE_POS;
    if t >= weights.shape(0) {
        terminate!();
    }
    let n_experts = logits.shape(1);
    let top_k = weights.shape(1);
    let row = t * n_experts;
    let out = t * top_k;
    // Softmax statistics of the row (used by `Scoring::SOFTMAX`).
    let max = row_max::<F>(logits, row, n_experts);
    let total = row_exp_sum::<F>(logits, row, n_experts, max);
    for j in 0..top_k {
        let mut best = F::new(0.0);
        let mut best_score = F::new(0.0);
        let mut best_expert = n_experts;
        for e in 0..n_experts {
            let mut taken = false;
            for i in 0..j {
                if u32::cast_from(experts[out + i]) as usize == e {
                    taken = true;
                }
            }
            let logit = logits[row + e];
            let mut score = logit;
            if scoring == Scoring::SOFTMAX {
                score = (logit - max).exp() / total;
            } else if scoring == Scoring::SIGMOID {
                score = sigmoid::<F>(logit);
            }
            let selection = score + bias[e];
            if !taken && (best_expert == n_experts || selection > best) {
                best = selection;
                best_score = score;
                best_expert = e;
            }
        }
        experts[out + j] = I::cast_from(best_expert as u32);
        weights[out + j] = best_score;
    }
    if scoring == Scoring::LOGITS {
        // A softmax over the chosen logits, shifted by the largest of them.
        let mut chosen_max = weights[out];
        for j in 1..top_k {
            chosen_max = F::max(chosen_max, weights[out + j]);
        }
        for j in 0..top_k {
            weights[out + j] = (weights[out + j] - chosen_max).exp();
        }
    }
    if normalize == 1 {
        let mut sum = F::new(0.0);
        for j in 0..top_k {
            sum += weights[out + j];
        }
        let factor = F::cast_from(scale) / sum;
        for j in 0..top_k {
            weights[out + j] = weights[out + j] * factor;
        }
    }
}

/// Gradient of the router logits for one token per unit (`d_logits: [T, E]`), given the
/// chosen `experts`, their `weights` and the weights' gradient `grad` (`[T, k]`): the
/// formulas of `reference::routing::route_backward`, same [`Scoring`] codes as
/// [`route_kernel`]; `normalize` tells the softmax gates apart.
#[cube(launch)]
pub fn route_backward_kernel<F: Float, I: Numeric>(
    logits: &Tensor<F>,
    experts: &Tensor<I>,
    weights: &Tensor<F>,
    grad: &Tensor<F>,
    d_logits: &mut Tensor<F>,
    scoring: u32,
    normalize: u32,
    scale: f32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let t = ABSOLUTE_POS;
    if t >= weights.shape(0) {
        terminate!();
    }
    let n_experts = logits.shape(1);
    let top_k = weights.shape(1);
    let row = t * n_experts;
    let out = t * top_k;
    let mut dot = F::new(0.0);
    for j in 0..top_k {
        dot += grad[out + j] * weights[out + j];
    }
    if scoring == Scoring::SOFTMAX && normalize == 0 {
        // Weights are probabilities: d_logits = p * (onehot(grad) - dot).
        let max = row_max::<F>(logits, row, n_experts);
        let total = row_exp_sum::<F>(logits, row, n_experts, max);
        for e in 0..n_experts {
            d_logits[row + e] = F::new(0.0) - (logits[row + e] - max).exp() / total * dot;
        }
        for j in 0..top_k {
            let e = u32::cast_from(experts[out + j]) as usize;
            d_logits[row + e] += weights[out + j] * grad[out + j];
        }
    } else {
        for e in 0..n_experts {
            d_logits[row + e] = F::new(0.0);
        }
        let mut total = F::new(0.0);
        if scoring == Scoring::SIGMOID {
            for j in 0..top_k {
                let e = u32::cast_from(experts[out + j]) as usize;
                total += sigmoid::<F>(logits[row + e]);
            }
        }
        let scale = F::cast_from(scale);
        for j in 0..top_k {
            let e = u32::cast_from(experts[out + j]) as usize;
            let mut d = weights[out + j] * (grad[out + j] - dot);
            if scoring == Scoring::SIGMOID {
                let s = sigmoid::<F>(logits[row + e]);
                d = scale / total * (grad[out + j] - dot / scale) * s * (F::new(1.0) - s);
            }
            d_logits[row + e] = d;
        }
    }
}

/// Largest of `values[row .. row + n]`.
#[cube]
fn row_max<F: Float>(values: &Tensor<F>, row: usize, n: usize) -> F {
    let mut max = values[row];
    for e in 1..n {
        max = F::max(max, values[row + e]);
    }
    max
}

/// `sum exp(values[row + e] - max)` over the row: a softmax denominator.
#[cube]
fn row_exp_sum<F: Float>(values: &Tensor<F>, row: usize, n: usize, max: F) -> F {
    let mut total = F::new(0.0);
    for e in 0..n {
        total += (values[row + e] - max).exp();
    }
    total
}

/// The logistic function.
#[cube]
fn sigmoid<F: Float>(x: F) -> F {
    F::new(1.0) / (F::new(1.0) + (F::new(0.0) - x).exp())
}
