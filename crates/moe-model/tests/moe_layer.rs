//! MoE layer semantics on every CPU backend and on wgpu: dropless output against a naive
//! per-token loop, router weight rules, capacity dropping, losses and gradients.

mod common;

use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use common::*;
use moe_model::dispatch;
use moe_model::losses::{load_balancing_loss, router_probs, router_z_loss};
use moe_model::{DropPolicy, Gate, MoeBackend, MoeConfig, MoeLayer};

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// The MoE output computed token by token on the host from the layer's own routing.
fn naive_output<B: MoeBackend>(layer: &MoeLayer<B>, x: Tensor<B, 2>) -> Vec<f64> {
    let [tokens, d] = x.dims();
    let routing = layer.router.forward(x.clone());
    let k = routing.weights.dims()[1];
    let weights = host(routing.weights);
    let experts = host_int(routing.experts);
    let [_, _, f] = layer.experts.shards[0].w1.val().dims();
    let (w1, w2, w3) = (
        host(layer.experts.shards[0].w1.val()),
        host(layer.experts.shards[0].w2.val()),
        host(layer.experts.shards[0].w3.val()),
    );
    let xs = host(x);
    let mut out = vec![0.0; tokens * d];
    for t in 0..tokens {
        for j in 0..k {
            let e = experts[t * k + j] as usize;
            let w = weights[t * k + j];
            let mut h = vec![0.0; f];
            for (i, hi) in h.iter_mut().enumerate() {
                let (mut a, mut b) = (0.0, 0.0);
                for c in 0..d {
                    a += xs[t * d + c] * w1[(e * d + c) * f + i];
                    b += xs[t * d + c] * w3[(e * d + c) * f + i];
                }
                *hi = silu(a) * b;
            }
            for c in 0..d {
                let y: f64 = (0..f).map(|i| h[i] * w2[(e * f + i) * d + c]).sum();
                out[t * d + c] += w * y;
            }
        }
    }
    out
}

fn dropless_matches_naive<B: MoeBackend>(device: &B::Device) {
    let tol = matmul_tol::<B>(device, 1e-5);
    for (tokens, d, experts, k) in [(13, 6, 4, 2), (7, 5, 1, 1), (33, 8, 8, 4), (5, 4, 64, 2)] {
        for router in gates() {
            let config = MoeConfig {
                router,
                ..moe_config(experts, k, 12)
            };
            let layer = moe_layer::<B>(d, &config, 0.8, 100 + tokens as u64, device);
            let x = tensor::<B, 2>([tokens, d], 7 + tokens as u64, device);
            let out = layer.forward(x.clone());
            let expected = naive_output(&layer, x);
            assert_close(
                &host(out.output),
                &expected,
                tol,
                &format!("{router:?} T={tokens} E={experts} k={k}"),
            );
            assert_eq!(
                host_int(out.stats.dropped),
                vec![0],
                "dropless drops nothing"
            );
            assert_eq!(
                host_int(out.stats.counts).iter().sum::<i64>() as usize,
                tokens * k
            );
        }
    }
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn top_k(row: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    idx.truncate(k);
    idx
}

fn router_weights_follow_their_rule<B: MoeBackend>(device: &B::Device) {
    let (tokens, d, experts, k) = (9, 6, 5, 2);
    for router in gates() {
        let config = MoeConfig {
            router,
            ..moe_config(experts, k, 4)
        };
        let layer = moe_layer::<B>(d, &config, 1.0, 200, device);
        let routing = layer.router.forward(tensor::<B, 2>([tokens, d], 3, device));
        let logits = host(routing.logits);
        let (weights, chosen) = (host(routing.weights), host_int(routing.experts));
        for t in 0..tokens {
            let row = &logits[t * experts..(t + 1) * experts];
            let (idx, w): (Vec<usize>, Vec<f64>) = match router {
                Gate::SoftmaxTopk { renormalize } => {
                    let p = softmax(row);
                    let idx = top_k(&p, k);
                    let sum: f64 = idx.iter().map(|&i| p[i]).sum();
                    let w = idx
                        .iter()
                        .map(|&i| if renormalize { p[i] / sum } else { p[i] })
                        .collect();
                    (idx, w)
                }
                Gate::TopkSoftmax => {
                    let idx = top_k(row, k);
                    let w = softmax(&idx.iter().map(|&i| row[i]).collect::<Vec<_>>());
                    (idx, w)
                }
                Gate::Sigmoid { scale } => {
                    let s: Vec<f64> = row.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
                    let idx = top_k(&s, k);
                    let sum: f64 = idx.iter().map(|&i| s[i]).sum();
                    (
                        idx.clone(),
                        idx.iter().map(|&i| s[i] / sum * scale).collect(),
                    )
                }
            };
            let got: Vec<usize> = chosen[t * k..(t + 1) * k]
                .iter()
                .map(|&e| e as usize)
                .collect();
            assert_eq!(got, idx, "{router:?} token {t} experts");
            assert_close(
                &weights[t * k..(t + 1) * k],
                &w,
                1e-5,
                &format!("{router:?} token {t} weights"),
            );
        }
    }
}

fn ints<B: Backend>(values: &[i64], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::from_ints(values, device).reshape(shape)
}

fn floats<B: Backend>(values: &[f32], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::<B, 1>::from_floats(values, device).reshape(shape)
}

fn capacity_drops_by_position_and_probability<B: MoeBackend>(device: &B::Device) {
    // 4 tokens, k = 2, 4 experts; expert 0 gets four assignments, expert 2 none... no: expert 2 one.
    // Assignment a = t * 2 + j.
    let experts = [0, 1, 0, 3, 0, 1, 3, 0];
    let weights = [0.6, 0.4, 0.7, 0.3, 0.9, 0.1, 0.8, 0.2];
    let plan = dispatch::plan(
        ints::<B>(&experts, [4, 2], device),
        floats::<B>(&weights, [4, 2], device),
        4,
        Some(2),
        DropPolicy::Position,
    );
    assert_eq!(host_int(plan.counts.clone()), vec![4, 2, 0, 2]);
    assert_eq!(host_int(plan.dropped.clone()), vec![2]);
    // Expert 0 keeps tokens 0 and 1 (slots 0, 1); tokens 2 and 3 go to the trash row 8.
    assert_eq!(host_int(plan.slot.clone()), vec![0, 2, 1, 6, 8, 3, 7, 8]);

    let plan = dispatch::plan(
        ints::<B>(&experts, [4, 2], device),
        floats::<B>(&weights, [4, 2], device),
        4,
        Some(2),
        DropPolicy::Probability,
    );
    assert_eq!(host_int(plan.dropped.clone()), vec![2]);
    // Expert 0's weights are 0.6, 0.7, 0.9, 0.2: tokens 2 (rank 0) and 1 (rank 1) stay.
    // Expert 1: 0.4 (t0) and 0.1 (t2); expert 3: 0.3 (t1) and 0.8 (t3).
    assert_eq!(host_int(plan.slot.clone()), vec![8, 2, 1, 7, 0, 3, 6, 8]);

    // Dropless: assignments packed by expert (offsets 0, 4, 6, 6; expert 2 owns no rows).
    let plan = dispatch::plan(
        ints::<B>(&experts, [4, 2], device),
        floats::<B>(&weights, [4, 2], device),
        4,
        None,
        DropPolicy::Position,
    );
    assert_eq!(host_int(plan.dropped.clone()), vec![0]);
    assert_eq!(
        plan.layout,
        dispatch::BufferLayout::Packed {
            counts: vec![4, 2, 0, 2]
        }
    );
    assert_eq!(host_int(plan.slot.clone()), vec![0, 4, 1, 6, 2, 5, 7, 3]);

    // Combine: a token whose assignments were all dropped gets exactly zero.
    let plan = dispatch::plan(
        ints::<B>(&[0, 0, 0], [3, 1], device),
        floats::<B>(&[1.0, 1.0, 1.0], [3, 1], device),
        2,
        Some(1),
        DropPolicy::Position,
    );
    let x = floats::<B>(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [3, 2], device);
    let buffer = plan.permute(x);
    assert_eq!(buffer.dims(), [2, 2]);
    assert_eq!(
        host(buffer.clone()),
        vec![1.0, 2.0, 0.0, 0.0],
        "expert 1 slot stays empty"
    );
    let y = plan.combine(buffer * 10.0, floats::<B>(&[1.0, 1.0, 1.0], [3, 1], device));
    assert_eq!(host(y), vec![10.0, 20.0, 0.0, 0.0, 0.0, 0.0]);
}

fn all_tokens_to_one_expert<B: MoeBackend>(device: &B::Device) {
    // A router whose gate sends every token to expert 2 (zero weights, biased by input sign).
    let (tokens, d, experts) = (10, 4, 4);
    let config = MoeConfig {
        capacity_factor: Some(1.0),
        eval_capacity_factor: Some(1.0),
        ..moe_config(experts, 1, 8)
    };
    let build = |config: &MoeConfig| {
        let mut layer = moe_layer::<B>(d, config, 0.5, 300, device);
        let mut gate = vec![0.0f32; d * experts];
        gate[2] = 5.0; // column 2 of row 0: logit_2 = 5 * x_0
        layer.router.gate.weight =
            layer.router.gate.weight.map(|_| {
                Tensor::<B, 1>::from_floats(gate.as_slice(), device).reshape([d, experts])
            });
        layer
    };
    let layer = build(&config);
    let x = Tensor::<B, 2>::ones([tokens, d], device);
    let out = layer.forward(x);
    assert_eq!(host_int(out.stats.counts), vec![0, 0, 10, 0]);
    // C = ceil(1.0 * 10 * 1 / 4) = 3: three tokens kept, seven dropped.
    assert_eq!(host_int(out.stats.dropped), vec![7]);
    let y = host(out.output);
    for t in 0..tokens {
        let row = &y[t * d..(t + 1) * d];
        let nonzero = row.iter().any(|v| v.abs() > 0.0);
        assert_eq!(
            nonzero,
            t < 3,
            "token {t}: only the first 3 tokens are processed"
        );
    }
    // Dropless, the same routing processes every token through expert 2 alone.
    let dropless = build(&MoeConfig {
        capacity_factor: None,
        eval_capacity_factor: None,
        ..config.clone()
    });
    let all = dropless.forward(Tensor::<B, 2>::ones([tokens, d], device));
    assert_eq!(host_int(all.stats.dropped), vec![0]);
    let y_all = host(all.output);
    assert_close(&y_all[..d], &y[..d], 1e-6, "same expert output");
    assert_close(
        &y_all[(tokens - 1) * d..],
        &y[..d],
        1e-6,
        "last token processed too",
    );
    // Balance loss when everything goes to one expert with probability p:
    // E / (k T^2) * (T p) * T = E p.
    let logits = layer
        .router
        .forward(Tensor::ones([tokens, d], device))
        .logits;
    let p = host(router_probs(logits, layer.router.gate_kind()))[2];
    assert_close(
        &host(out.balance_loss),
        &[experts as f64 * p],
        1e-5,
        "collapsed balance loss",
    );
}

fn losses_match_hand_computed<B: Backend>(device: &B::Device) {
    // Balanced: uniform probabilities and equal counts give exactly 1.
    let probs = Tensor::<B, 2>::full([8, 4], 0.25, device);
    let counts = Tensor::<B, 1, Int>::from_ints([4, 4, 4, 4], device);
    assert_close(
        &host(load_balancing_loss(probs, counts, 2)),
        &[1.0],
        1e-6,
        "balanced",
    );
    // Hand-computed: T = 2, E = 2, k = 1; p = [[0.9, 0.1], [0.6, 0.4]], counts [2, 0]:
    // 2 / (1 * 4) * (1.5 * 2 + 0.5 * 0) = 1.5.
    let probs = floats::<B>(&[0.9, 0.1, 0.6, 0.4], [2, 2], device);
    let counts = Tensor::<B, 1, Int>::from_ints([2, 0], device);
    assert_close(
        &host(load_balancing_loss(probs, counts, 1)),
        &[1.5],
        1e-6,
        "skewed",
    );
    // z-loss: zero logits over E experts give (ln E)^2; [ln 3, ln 1] rows -> lse = ln 4, ln 2.
    let zeros = Tensor::<B, 2>::zeros([3, 4], device);
    assert_close(
        &host(router_z_loss(zeros)),
        &[4f64.ln().powi(2)],
        1e-6,
        "z uniform",
    );
    let logits = floats::<B>(&[3f32.ln(), 0.0, 0.0, 0.0], [2, 2], device);
    let expected = (4f64.ln().powi(2) + 2f64.ln().powi(2)) / 2.0;
    assert_close(&host(router_z_loss(logits)), &[expected], 1e-6, "z hand");
}

/// Loss used by the gradient tests: a fixed projection of the MoE output plus both
/// router losses, so every parameter gets a gradient.
fn probe_loss<B: MoeBackend>(
    layer: &MoeLayer<B>,
    x: Tensor<B, 2>,
    probe: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let out = layer.forward(x);
    (out.output * probe).sum() + out.balance_loss * 0.1 + out.z_loss * 0.1
}

/// Gradients reach the router, every expert weight and the gates, through autodiff on `B`.
fn gradients_reach_router_experts_and_gates<B: MoeBackend>(device: &B::Device) {
    gradients_reach_router_experts_and_gates_on::<burn::backend::Autodiff<B>>(device);
}

fn gradients_reach_router_experts_and_gates_on<B: AutodiffBackend + MoeBackend>(
    device: &B::Device,
) {
    let (tokens, d) = (6, 4);
    let layer = moe_layer::<B>(d, &moe_config(3, 2, 5), 0.5, 400, device);
    let x = tensor::<B, 2>([tokens, d], 11, device).require_grad();
    let probe = tensor::<B, 2>([tokens, d], 12, device);
    let grads = probe_loss(&layer, x.clone(), probe).backward();
    for (name, grad) in [
        ("router", layer.router.gate.weight.grad(&grads).map(host)),
        ("w1", layer.experts.shards[0].w1.grad(&grads).map(host)),
        ("w2", layer.experts.shards[0].w2.grad(&grads).map(host)),
        ("w3", layer.experts.shards[0].w3.grad(&grads).map(host)),
        ("input", x.grad(&grads).map(host)),
    ] {
        let grad = grad.unwrap_or_else(|| panic!("{name} has no gradient"));
        assert!(grad.iter().all(|g| g.is_finite()), "{name} gradient finite");
        assert!(
            grad.iter().any(|g| g.abs() > 1e-8),
            "{name} gradient non-zero"
        );
    }
    assert!(
        layer.router.expert_bias.grad(&grads).is_none(),
        "the selection bias gets no gradient"
    );
}

backend_tests!(
    dropless_matches_naive,
    router_weights_follow_their_rule,
    capacity_drops_by_position_and_probability,
    all_tokens_to_one_expert,
    losses_match_hand_computed,
    gradients_reach_router_experts_and_gates,
);

/// Central finite differences against autodiff for entries of the router and expert weights
/// (step 1e-3: some burn ops evaluate in f32 precision even on an f64 backend).
#[test]
fn gradients_match_finite_differences() {
    type B = burn::backend::Autodiff<burn::backend::NdArray<f64>>;
    let device = Default::default();
    let (tokens, d) = (5, 3);
    let layer = moe_layer::<B>(d, &moe_config(3, 2, 4), 0.8, 500, &device);
    let x = tensor::<B, 2>([tokens, d], 21, &device);
    let probe = tensor::<B, 2>([tokens, d], 22, &device);
    let grads = probe_loss(&layer, x.clone(), probe.clone()).backward();
    let loss_with = |layer: &MoeLayer<B>| host(probe_loss(layer, x.clone(), probe.clone()))[0];
    let eps = 1e-3;

    type Setter = fn(&mut MoeLayer<B>, usize, f64);
    type Grad = Option<Tensor<burn::backend::NdArray<f64>, 3>>;
    let params: [(&str, Grad, Setter); 4] = [
        (
            "router",
            layer.router.gate.weight.grad(&grads).map(|g| g.unsqueeze()),
            |l, i, delta| {
                l.router.gate.weight = l.router.gate.weight.clone().map(|w| bump(w, i, delta))
            },
        ),
        (
            "w1",
            layer.experts.shards[0].w1.grad(&grads),
            |l, i, delta| {
                l.experts.shards[0].w1 = l.experts.shards[0].w1.clone().map(|w| bump(w, i, delta))
            },
        ),
        (
            "w2",
            layer.experts.shards[0].w2.grad(&grads),
            |l, i, delta| {
                l.experts.shards[0].w2 = l.experts.shards[0].w2.clone().map(|w| bump(w, i, delta))
            },
        ),
        (
            "w3",
            layer.experts.shards[0].w3.grad(&grads),
            |l, i, delta| {
                l.experts.shards[0].w3 = l.experts.shards[0].w3.clone().map(|w| bump(w, i, delta))
            },
        ),
    ];
    for (name, grad, set) in params {
        let grad = host(grad.unwrap_or_else(|| panic!("{name} has no gradient")));
        for index in [0, 4, 8] {
            let loss_at = |delta: f64| {
                let mut l = layer.clone();
                set(&mut l, index, delta);
                loss_with(&l)
            };
            let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
            assert_close(
                &[grad[index]],
                &[numeric],
                1e-4,
                &format!("{name}[{index}] finite difference"),
            );
        }
    }
}

fn bump<B: Backend, const D: usize>(w: Tensor<B, D>, index: usize, delta: f64) -> Tensor<B, D> {
    let shape = w.shape();
    let n = shape.num_elements();
    let mut one_hot = vec![0.0f64; n];
    one_hot[index] = delta;
    let device = w.device();
    w + Tensor::<B, 1>::from_floats(one_hot.as_slice(), &device).reshape(shape)
}

#[test]
fn expert_bias_moves_toward_underloaded_experts() {
    type B = burn::backend::Flex;
    let device = Default::default();
    let config = MoeConfig {
        bias_update_rate: 0.01,
        router: Gate::Sigmoid { scale: 1.0 },
        ..moe_config(4, 1, 4)
    };
    let layer = moe_layer::<B>(3, &config, 0.5, 600, &device);
    let layer = layer.update_bias(Tensor::<B, 1, Int>::from_ints([5, 1, 1, 1], &device));
    assert_close(
        &host(layer.router.expert_bias.val()),
        &[-0.01, 0.01, 0.01, 0.01],
        1e-9,
        "bias",
    );
    let params_before = layer.num_params();
    assert!(params_before > 0);
}
