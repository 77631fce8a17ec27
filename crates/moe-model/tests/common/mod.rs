//! Helpers shared by the model tests: configs and host copies of tensors.

#![allow(dead_code)]

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use moe_model::{DropPolicy, Gate, ModelConfig, MoeConfig};

/// One gate of each kind, with settings away from their defaults where they have any:
/// every test that holds for all gates loops over these.
pub const GATES: [Gate; 4] = [
    Gate::SoftmaxTopk { renormalize: true },
    Gate::SoftmaxTopk { renormalize: false },
    Gate::TopkSoftmax,
    Gate::Sigmoid { scale: 2.5 },
];

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

pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

pub fn host_int<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

/// Deterministic pseudo-random values in [-1, 1) (no dependence on backend RNGs).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

pub fn tensor<B: Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::<B, 1>::from_floats(values(n, seed).as_slice(), device).reshape(shape)
}

/// `tol` for a result computed through a float matmul on `B`: widened to 5e-3 on CUDA,
/// whose f32 matmul runs in TF32 on tensor cores (inputs rounded to a 10-bit mantissa, a
/// relative error of about 5e-4 each), so it cannot match an f32 reference to 1e-5.
pub fn matmul_tol<B: Backend>(device: &B::Device, tol: f64) -> f64 {
    if B::name(device).contains("cuda") {
        tol.max(5e-3)
    } else {
        tol
    }
}

pub fn assert_close(actual: &[f64], expected: &[f64], tol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tol * (1.0 + e.abs()),
            "{what}[{i}]: got {a}, expected {e} (tol {tol})"
        );
    }
}

/// A parameter tensor (an autodiff leaf) filled from `seed`, scaled by `scale`.
pub fn leaf<B: Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    scale: f32,
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    let data: Vec<f32> = values(n, seed).into_iter().map(|v| v * scale).collect();
    Tensor::<B, D>::from_data(burn::tensor::TensorData::new(data, shape), device).require_grad()
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
