//! MoE layer against the dense SwiGLU with the same active FLOPs, forward + backward, on
//! the CPU backends: E = 8 experts, top-2, expert FFN f = 512 vs a dense FFN of width
//! k * f = 1024, T = 4096 tokens, d = 256. Run with `cargo bench --bench moe_layer`.

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use moe_model::experts::SwiGlu;
use moe_model::{DropPolicy, MoeBackend, MoeConfig, MoeLayer, RouterKind};

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
        router: RouterKind::SoftmaxTopk,
        renormalize: true,
        route_scale: 1.0,
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

fn bench_backend<B: AutodiffBackend + MoeBackend>(c: &mut Criterion, name: &str) {
    let device = Default::default();
    let x = Tensor::<B, 2>::random([TOKENS, D], Distribution::Normal(0.0, 1.0), &device);
    let dense = SwiGlu::<B>::new(D, TOP_K * FFN, 0.02, 0.02, &device);
    let mut group = c.benchmark_group(format!("ffn_fwd_bwd/{name}"));
    group.sample_size(10);
    group.bench_function("dense_swiglu_1024", |b| {
        b.iter(|| {
            let y = dense.forward(x.clone().require_grad());
            y.sum().backward()
        })
    });
    for (label, cf) in [
        ("moe_e8_k2_dropless", None),
        ("moe_e8_k2_cf1.25", Some(1.25)),
    ] {
        let layer = MoeLayer::<B>::new(D, &config(cf), 0.02, 0.02, &device);
        group.bench_function(label, |b| {
            b.iter(|| {
                let out = layer.forward(x.clone().require_grad());
                (out.output.sum() + out.balance_loss * 0.01 + out.z_loss * 0.001).backward()
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_backend::<Autodiff<Flex>>(c, "flex");
    bench_backend::<Autodiff<NdArray>>(c, "ndarray");
}

criterion_group!(moe_layer, benches);
criterion_main!(moe_layer);
