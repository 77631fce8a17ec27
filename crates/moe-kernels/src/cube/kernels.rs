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
/// beforehand; slots are distinct, so no two units write the same row). One unit per
/// element of `[A, d]`.
#[cube(launch)]
pub fn scatter_rows_kernel<F: Float, I: Numeric>(
    x: &Tensor<F>,
    slot: &Tensor<I>,
    weights: &Tensor<F>,
    out: &mut Tensor<F>,
    top_k: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let d = out.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= slot.len() * d {
        terminate!();
    }
    let a = pos / d;
    let j = pos % d;
    let row = u32::cast_from(slot[a]) as usize;
    if row < out.shape(0) {
        out[row * d + j] = weights[a] * x[(a / top_k as usize) * d + j];
    }
}

/// `out[t] = sum_i weights[t * k + i] * buffer[slot[t * k + i]]`, dropped slots skipped.
/// One unit per element of `[T, d]`.
#[cube(launch)]
pub fn gather_rows_kernel<F: Float, I: Numeric>(
    buffer: &Tensor<F>,
    slot: &Tensor<I>,
    weights: &Tensor<F>,
    out: &mut Tensor<F>,
    top_k: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let d = out.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let t = pos / d;
    let j = pos % d;
    let rows = buffer.shape(0);
    let mut sum = F::new(0.0);
    for i in 0..top_k as usize {
        let a = t * top_k as usize + i;
        let row = u32::cast_from(slot[a]) as usize;
        if row < rows {
            sum += weights[a] * buffer[row * d + j];
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
