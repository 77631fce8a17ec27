//! Helpers shared by the model tests: configs and layers, plus the kernel tests' helpers
//! (host copies, inputs, tolerances, `backend_tests!`), included from moe-kernels.

#![allow(dead_code, unused_imports)]

#[path = "../../../moe-kernels/tests/common/mod.rs"]
mod kernels;

use burn::tensor::backend::Backend;
pub(crate) use kernels::backend_tests;
pub use kernels::*;
use moe_model::{DropPolicy, Gate, ModelConfig, MoeConfig};

pub fn moe_config(n_experts: usize, top_k: usize, ffn: usize) -> MoeConfig {
    MoeConfig {
        n_experts,
        top_k,
        expert_ffn_dim: ffn,
        router: Gate::default(),
        jitter: 0.0,
        n_shared_experts: 0,
        capacity_factor: None,
        eval_capacity_factor: None,
        drop_policy: DropPolicy::Position,
        aux_loss_weight: 0.01,
        z_loss_weight: 0.001,
        bias_update_rate: 0.0,
    }
}

pub fn model_config(vocab: usize, d: usize, layers: usize, heads: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        d_model: d,
        n_layers: layers,
        n_heads: heads,
        n_kv_heads: None,
        max_seq_len: 64,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        dense_ffn_dim: 0,
        n_dense_layers: 0,
        moe_layer_interval: 1,
        init_std: 0.2,
    }
}

/// An MoE layer whose router and expert weights come from `seed` alone (not the backend's
/// process-wide random generator, which tests running in parallel share), scaled by `scale`.
pub fn moe_layer<B: Backend>(
    d_model: usize,
    config: &moe_model::MoeConfig,
    scale: f32,
    seed: u64,
    device: &B::Device,
) -> moe_model::MoeLayer<B> {
    let mut layer = moe_model::MoeLayer::<B>::new(d_model, config, 0.5, 0.5, device);
    let (e, f) = (config.n_experts, config.expert_ffn_dim);
    layer.router.gate.weight = layer
        .router
        .gate
        .weight
        .map(|_| leaf([d_model, e], seed, scale, device));
    let experts = &mut layer.experts.shards[0];
    experts.w1 = experts
        .w1
        .clone()
        .map(|_| leaf([e, d_model, f], seed + 1, scale, device));
    experts.w2 = experts
        .w2
        .clone()
        .map(|_| leaf([e, f, d_model], seed + 2, scale, device));
    experts.w3 = experts
        .w3
        .clone()
        .map(|_| leaf([e, d_model, f], seed + 3, scale, device));
    layer
}
