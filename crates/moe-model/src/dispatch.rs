//! Token dispatch with tensor ops: rank each assignment inside its expert (a counting sort),
//! apply the capacity limit, permute tokens into an expert-major buffer and combine back.
//!
//! This is the reference path every backend runs. Assignments are flattened token-major
//! (`a = t * k + j`), so ranking by position is stable in token order.
//!
//! Two buffer layouts: with a capacity, `[E * C (+1 trash row), d]`, every expert padded to
//! `C` slots (one batched matmul); dropless, the `T * k` rows packed by expert with
//! per-expert offsets (a grouped matmul over the segments, empty experts cost nothing).

use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use crate::config::DropPolicy;

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
pub fn plan<B: Backend>(
    experts: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
    n_experts: usize,
    capacity: Option<usize>,
    policy: DropPolicy,
) -> DispatchPlan<B> {
    let [tokens, k] = experts.dims();
    let assignments = tokens * k;
    let expert = experts.reshape([assignments]);
    let one_hot = one_hot(expert.clone(), n_experts);
    let counts = one_hot.clone().sum_dim(0).reshape([n_experts]);
    let rank = match (capacity, policy) {
        (Some(_), DropPolicy::Probability) => {
            let order = weights
                .detach()
                .reshape([assignments])
                .argsort_descending(0);
            let rank_in_order = rank_in_expert(
                one_hot.select(0, order.clone()),
                expert.clone().select(0, order.clone()),
            );
            rank_in_order.select(0, order.argsort(0))
        }
        _ => rank_in_expert(one_hot, expert.clone()),
    };
    let device = counts.device();
    let Some(capacity) = capacity else {
        let host: Vec<usize> = counts.to_data().iter::<i64>().map(|c| c as usize).collect();
        let offsets: Vec<i64> = host
            .iter()
            .scan(0i64, |start, &c| {
                let offset = *start;
                *start += c as i64;
                Some(offset)
            })
            .collect();
        let offsets = Tensor::<B, 1, Int>::from_ints(offsets.as_slice(), &device);
        return DispatchPlan {
            slot: offsets.select(0, expert) + rank,
            counts,
            dropped: Tensor::zeros([1], &device),
            layout: BufferLayout::Packed { counts: host },
            n_experts,
        };
    };
    let kept = rank.clone().lower_elem(capacity as i64);
    let trash = (n_experts * capacity) as i64;
    let slot = (expert * capacity as i64 + rank).mask_where(
        kept.clone().bool_not(),
        Tensor::full([assignments], trash, &device),
    );
    let dropped = kept.bool_not().int().sum();
    DispatchPlan {
        slot,
        counts,
        dropped,
        layout: BufferLayout::Padded { capacity },
        n_experts,
    }
}

/// `[A, E]` 0/1 matrix of which expert each assignment goes to.
fn one_hot<B: Backend>(expert: Tensor<B, 1, Int>, n_experts: usize) -> Tensor<B, 2, Int> {
    let ids = Tensor::<B, 1, Int>::arange(0..n_experts as i64, &expert.device());
    expert
        .unsqueeze_dim::<2>(1)
        .equal(ids.unsqueeze_dim(0))
        .int()
}

/// Rank of each assignment among the earlier assignments (in the given order) to its expert.
fn rank_in_expert<B: Backend>(
    one_hot: Tensor<B, 2, Int>,
    expert: Tensor<B, 1, Int>,
) -> Tensor<B, 1, Int> {
    let [assignments, _] = one_hot.dims();
    one_hot
        .cumsum(0)
        .gather(1, expert.unsqueeze_dim(1))
        .reshape([assignments])
        - 1
}

impl<B: Backend> DispatchPlan<B> {
    /// Gathers token rows `x` (`[T, d]`) into the expert-major buffer `[rows, d]`
    /// (each token repeated for its k assignments; empty slots are zero).
    pub fn permute(&self, x: Tensor<B, 2>, top_k: usize) -> Tensor<B, 2> {
        let [tokens, d] = x.dims();
        let rows = self.layout.rows(self.n_experts);
        let repeated = x
            .unsqueeze_dim::<3>(1)
            .expand([tokens, top_k, d])
            .reshape([tokens * top_k, d]);
        Tensor::zeros([rows + 1, d], &repeated.device())
            .select_assign(0, self.slot.clone(), repeated, IndexingUpdateOp::Add)
            .narrow(0, 0, rows)
    }

    /// Weighted sum of each token's expert outputs (`[rows, d]`) back in token order,
    /// `[T, d]`. Dropped assignments contribute zero.
    pub fn combine(&self, expert_out: Tensor<B, 2>, weights: Tensor<B, 2>) -> Tensor<B, 2> {
        let [tokens, k] = weights.dims();
        let d = expert_out.dims()[1];
        let flat = Tensor::cat(
            vec![expert_out, Tensor::zeros([1, d], &weights.device())],
            0,
        );
        let gathered = flat.select(0, self.slot.clone()).reshape([tokens, k, d]);
        (gathered * weights.unsqueeze_dim(2))
            .sum_dim(1)
            .reshape([tokens, d])
    }
}
