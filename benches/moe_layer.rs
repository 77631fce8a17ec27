//! MoE layer against the dense SwiGLU with the same active FLOPs, forward + backward:
//! E = 8 experts, top-2, expert FFN f = 512 vs a dense FFN of width k * f = 1024,
//! T = 4096 tokens, d = 256.
//!
//! Groups: `ffn_fwd_bwd/<backend>` (dense vs MoE; on wgpu also the MoE with the tensor-op
//! reference dispatch instead of the CubeCL kernels) and `moe_stages/<backend>` (routing,
//! permute, experts, combine, each forward + backward, dropless). Run with
//! `cargo bench --bench moe_layer` (filter by name, e.g. `-- wgpu`).

use burn::backend::{Autodiff, Flex, NdArray, Wgpu};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use moe_model::SwiGlu;
use moe_model::dispatch;
use moe_model::ops::with_reference_dispatch;
use moe_model::{DropPolicy, Gate, MoeBackend, MoeConfig, MoeLayer};

const TOKENS: usize = 4096;
const D: usize = 256;
const FFN: usize = 512;
const EXPERTS: usize = 8;
const TOP_K: usize = 2;

fn config(capacity_factor: Option<f64>) -> MoeConfig {
    MoeConfig {
        n_experts: EXPERTS,
        top_k: TOP_K,
        expert_ffn_dim: FFN,
        router: Gate::SoftmaxTopk { renormalize: true },
        jitter: 0.0,
        n_shared_experts: 0,
        capacity_factor,
        eval_capacity_factor: capacity_factor,
        drop_policy: DropPolicy::Position,
        aux_loss_weight: 0.01,
        z_loss_weight: 0.001,
        bias_update_rate: 0.0,
    }
}

/// Backward of `y.sum()`, waiting for the device to finish (wgpu runs asynchronously).
fn backward<B: AutodiffBackend>(y: Tensor<B, 2>) {
    let device = y.device();
    let _grads = y.sum().backward();
    B::sync(&device).expect("device sync");
}

fn moe_step<B: AutodiffBackend + MoeBackend>(layer: &MoeLayer<B>, x: &Tensor<B, 2>) {
    let out = layer.forward(x.clone().require_grad());
    let device = x.device();
    let loss = out.output.sum() + out.balance_loss * 0.01 + out.z_loss * 0.001;
    let _grads = loss.backward();
    B::sync(&device).expect("device sync");
}

fn bench_layer<B: AutodiffBackend + MoeBackend>(c: &mut Criterion, name: &str, reference: bool) {
    let device = Default::default();
    let x = Tensor::<B, 2>::random([TOKENS, D], Distribution::Normal(0.0, 1.0), &device);
    let dense = SwiGlu::<B>::new(D, TOP_K * FFN, 0.02, 0.02, &device);
    let mut group = c.benchmark_group(format!("ffn_fwd_bwd/{name}"));
    group.sample_size(10);
    group.bench_function("dense_swiglu_1024", |b| {
        b.iter(|| backward(dense.forward(x.clone().require_grad())))
    });
    for (label, cf) in [
        ("moe_e8_k2_dropless", None),
        ("moe_e8_k2_cf1.25", Some(1.25)),
    ] {
        let layer = MoeLayer::<B>::new(D, &config(cf), 0.02, 0.02, &device);
        group.bench_function(label, |b| b.iter(|| moe_step(&layer, &x)));
        if reference {
            group.bench_function(format!("{label}_reference_dispatch"), |b| {
                b.iter(|| with_reference_dispatch(|| moe_step(&layer, &x)))
            });
        }
    }
    group.finish();
}

/// The dropless MoE layer's stages one at a time, each forward + backward.
fn bench_stages<B: AutodiffBackend + MoeBackend>(c: &mut Criterion, name: &str, reference: bool) {
    let device = Default::default();
    let config = config(None);
    let layer = MoeLayer::<B>::new(D, &config, 0.02, 0.02, &device);
    let x = Tensor::<B, 2>::random([TOKENS, D], Distribution::Normal(0.0, 1.0), &device);
    let routing = layer.router.forward(x.clone());
    let fixed_plan = dispatch::plan(
        routing.experts.clone(),
        routing.weights.clone(),
        EXPERTS,
        None,
        DropPolicy::Position,
    );
    let buffer = fixed_plan.permute(x.clone());
    let weights = routing.weights.clone().detach();

    let mut group = c.benchmark_group(format!("moe_stages/{name}"));
    group.sample_size(10);
    let route_and_sort = || {
        let routing = layer.router.forward(x.clone().require_grad());
        let _plan = dispatch::plan(
            routing.experts,
            routing.weights.clone(),
            EXPERTS,
            None,
            DropPolicy::Position,
        );
        backward(routing.weights)
    };
    group.bench_function("routing", |b| b.iter(route_and_sort));
    if reference {
        group.bench_function("routing_reference_dispatch", |b| {
            b.iter(|| with_reference_dispatch(route_and_sort))
        });
    }
    group.bench_function("permute", |b| {
        b.iter(|| backward(fixed_plan.permute(x.clone().require_grad())))
    });
    group.bench_function("experts", |b| {
        b.iter(|| {
            backward(
                layer
                    .experts
                    .forward(buffer.clone().require_grad(), &fixed_plan.layout),
            )
        })
    });
    group.bench_function("combine", |b| {
        b.iter(|| {
            backward(fixed_plan.combine(
                buffer.clone().require_grad(),
                weights.clone().require_grad(),
            ))
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_layer::<Autodiff<Flex>>(c, "flex", false);
    bench_stages::<Autodiff<Flex>>(c, "flex", false);
    bench_layer::<Autodiff<NdArray>>(c, "ndarray", false);
    bench_layer::<Autodiff<Wgpu>>(c, "wgpu", true);
    bench_stages::<Autodiff<Wgpu>>(c, "wgpu", true);
}

criterion_group!(moe_layer, benches);
criterion_main!(moe_layer);
