//! Token dispatch: rank each assignment inside its expert (a counting sort), apply the
//! capacity limit, permute tokens into an expert-major buffer and combine back.
//!
//! The steps are backend operations ([`MoeBackend`]): CubeCL kernels on wgpu and CUDA, the
//! tensor-op reference elsewhere. Assignments are flattened token-major (`a = t * k + j`),
//! so ranking by position is stable in token order.
//!
//! Two buffer layouts: with a capacity, `[E * C (+1 trash row), d]`, every expert padded to
//! `C` slots (one batched matmul); dropless, the `T * k` rows packed by expert with
//! per-expert offsets (a grouped matmul over the segments, empty experts cost nothing).

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::config::DropPolicy;
use moe_kernels::{self as ops, MoeBackend};

/// How the expert-major buffer is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BufferLayout {
    /// `C` slots per expert, `[E * C, d]`; empty slots hold zeros.
    Padded {
        /// Slots per expert `C`.
        capacity: usize,
    },
    /// Every assignment kept, packed by expert: expert `e` owns `counts[e]` consecutive
    /// rows starting at the sum of the earlier counts.
    Packed {
        /// Rows per expert (read back to the host once per forward).
        counts: Vec<usize>,
    },
}

impl BufferLayout {
    /// Rows of the buffer.
    pub fn rows(&self, n_experts: usize) -> usize {
        match self {
            BufferLayout::Padded { capacity } => n_experts * capacity,
            BufferLayout::Packed { counts } => counts.iter().sum(),
        }
    }

    /// The buffer rows of each of the `n_experts` experts.
    pub fn expert_rows(&self, n_experts: usize) -> Vec<Range<usize>> {
        match self {
            BufferLayout::Padded { capacity } => (0..n_experts)
                .map(|e| e * capacity..(e + 1) * capacity)
                .collect(),
            BufferLayout::Packed { counts } => counts
                .iter()
                .scan(0, |start, &count| {
                    let rows = *start..*start + count;
                    *start += count;
                    Some(rows)
                })
                .collect(),
        }
    }

    /// The layout of the buffer holding only the rows of `experts`, in that order.
    pub fn subset(&self, experts: &[usize]) -> BufferLayout {
        match self {
            BufferLayout::Padded { capacity } => BufferLayout::Padded {
                capacity: *capacity,
            },
            BufferLayout::Packed { counts } => BufferLayout::Packed {
                counts: experts.iter().map(|&e| counts[e]).collect(),
            },
        }
    }
}

/// Where each routed assignment goes, computed once per MoE forward.
#[derive(Debug, Clone)]
pub struct DispatchPlan<B: Backend> {
    /// For each of the `T * k` assignments, its row in the expert buffer; dropped
    /// assignments point at the row after the buffer, which always holds zeros.
    pub slot: Tensor<B, 1, Int>,
    /// Assignments per expert before dropping, `[E]`.
    pub counts: Tensor<B, 1, Int>,
    /// Number of dropped assignments, `[1]`.
    pub dropped: Tensor<B, 1, Int>,
    /// The buffer layout.
    pub layout: BufferLayout,
    /// Number of experts `E`.
    pub n_experts: usize,
}

/// Plans the dispatch of `experts` (`[T, k]`) with combine `weights` (`[T, k]`).
///
/// `capacity = None` is dropless: the packed layout (per-expert counts read back to the
/// host once). With a capacity, assignments past `C` in their expert are dropped, by
/// token position or, with [`DropPolicy::Probability`], lowest weight first.
pub fn plan<B: MoeBackend>(
    experts: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    n_experts: usize,
    capacity: Option<usize>,
    policy: DropPolicy,
) -> DispatchPlan<B> {
    let [tokens, k] = experts.dims();
    let assignments = tokens * k;
    let expert = experts.reshape([assignments]);
    let (slot, counts) = match (capacity, policy) {
        (Some(_), DropPolicy::Probability) => {
            // Rank in order of falling weight, then put the slots back in token order.
            let order = weights
                .detach()
                .reshape([assignments])
                .argsort_descending(0);
            let (slot, counts) =
                ops::expert_slots(expert.select(0, order.clone()), n_experts, capacity);
            (slot.select(0, order.argsort(0)), counts)
        }
        _ => ops::expert_slots(expert, n_experts, capacity),
    };
    let (layout, dropped) = match capacity {
        Some(capacity) => (
            BufferLayout::Padded { capacity },
            (counts.clone() - capacity as i64).clamp_min(0).sum(),
        ),
        None => {
            let counts = counts.to_data().iter::<i64>().map(|c| c as usize).collect();
            (
                BufferLayout::Packed { counts },
                Tensor::zeros([1], &slot.device()),
            )
        }
    };
    DispatchPlan {
        slot,
        counts,
        dropped,
        layout,
        n_experts,
    }
}

impl<B: MoeBackend> DispatchPlan<B> {
    /// Gathers token rows `x` (`[T, d]`) into the expert-major buffer `[rows, d]`
    /// (each token repeated for its k assignments; empty slots are zero).
    pub fn permute(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        ops::permute(x, self.slot.clone(), self.layout.rows(self.n_experts))
    }

    /// Weighted sum of each token's expert outputs (`[rows, d]`) back in token order,
    /// `[T, d]`. Dropped assignments contribute zero.
    pub fn combine(&self, expert_out: Tensor<B, 2>, weights: Tensor<B, 2>) -> Tensor<B, 2> {
        ops::combine(expert_out, self.slot.clone(), weights)
    }
}
