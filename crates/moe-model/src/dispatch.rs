//! Token dispatch with tensor ops: rank each assignment inside its expert (a counting sort),
//! apply the capacity limit, permute tokens into an expert-major buffer and combine back.
//!
//! This is the reference path every backend runs. Assignments are flattened token-major
//! (`a = t * k + j`), so ranking by position is stable in token order.

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, IndexingUpdateOp, Int, Tensor};

use crate::config::DropPolicy;

/// Where each routed assignment goes, computed once per MoE forward.
#[derive(Debug, Clone)]
pub struct DispatchPlan<B: Backend> {
    /// For each of the `T * k` assignments, its row in the flat `[E * C]` expert buffer;
    /// dropped assignments point at the extra row `E * C`, which always holds zeros.
    pub slot: Tensor<B, 1, Int>,
    /// Assignments per expert before dropping, `[E]`.
    pub counts: Tensor<B, 1, Int>,
    /// Number of dropped assignments, `[1]`.
    pub dropped: Tensor<B, 1, Int>,
    /// Slots per expert `C`.
    pub capacity: usize,
    /// Number of experts `E`.
    pub n_experts: usize,
}

/// Plans the dispatch of `experts` (`[T, k]`) with combine `weights` (`[T, k]`).
///
/// `capacity = None` is dropless: the buffer is sized to the busiest expert (read back to
/// the host once). With a capacity, assignments past `C` in their expert are dropped, by
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
    let capacity = capacity
        .unwrap_or_else(|| (counts.clone().max().into_scalar().elem::<i64>().max(1)) as usize);
    let kept = rank.clone().lower_elem(capacity as i64);
    let trash = (n_experts * capacity) as i64;
    let slot = (expert * capacity as i64 + rank).mask_where(
        kept.clone().bool_not(),
        Tensor::full([assignments], trash, &counts.device()),
    );
    let dropped = kept.bool_not().int().sum();
    DispatchPlan {
        slot,
        counts,
        dropped,
        capacity,
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
    /// Gathers token rows `x` (`[T, d]`) into the expert-major buffer `[E, C, d]`
    /// (each token repeated for its k assignments; empty slots are zero).
    pub fn permute(&self, x: Tensor<B, 2>, top_k: usize) -> Tensor<B, 3> {
        let [tokens, d] = x.dims();
        let rows = self.n_experts * self.capacity;
        let repeated = x
            .unsqueeze_dim::<3>(1)
            .expand([tokens, top_k, d])
            .reshape([tokens * top_k, d]);
        Tensor::zeros([rows + 1, d], &repeated.device())
            .select_assign(0, self.slot.clone(), repeated, IndexingUpdateOp::Add)
            .narrow(0, 0, rows)
            .reshape([self.n_experts, self.capacity, d])
    }

    /// Weighted sum of each token's expert outputs (`[E, C, d]`) back in token order, `[T, d]`.
    /// Dropped assignments contribute zero.
    pub fn combine(&self, expert_out: Tensor<B, 3>, weights: Tensor<B, 2>) -> Tensor<B, 2> {
        let [tokens, k] = weights.dims();
        let d = expert_out.dims()[2];
        let rows = self.n_experts * self.capacity;
        let flat = Tensor::cat(
            vec![
                expert_out.reshape([rows, d]),
                Tensor::zeros([1, d], &weights.device()),
            ],
            0,
        );
        let gathered = flat.select(0, self.slot.clone()).reshape([tokens, k, d]);
        (gathered * weights.unsqueeze_dim(2))
            .sum_dim(1)
            .reshape([tokens, d])
    }
}
