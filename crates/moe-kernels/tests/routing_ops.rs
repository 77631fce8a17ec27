//! The routing operation (scores, top-k, combine weights) and the router's losses: each
//! backend's implementation against the tensor-op reference, forward and gradient.
//! Routing on wgpu is the CubeCL kernel, routing and the losses on flex loops over
//! tokens; elsewhere the reference itself. Every backend's values and gradients are also
//! checked against values and finite differences computed on the host in f64.

mod common;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorPrimitive};
use common::{assert_close, backend_tests, gates, host, host_int, tensor};
use moe_kernels::{
    self as ops, Gate, MoeBackend, reference::router_losses as losses_reference,
    reference::routing as reference,
};

/// `(tokens, n_experts, top_k)`: T not a multiple of a workgroup, k = 1, 2, 4, E = 1, 8, 64.
const SHAPES: [(usize, usize, usize); 4] = [(300, 8, 2), (257, 1, 1), (100, 64, 4), (70, 8, 1)];

/// Logits with a visible spread; with `one_expert`, expert 0 wins every token by far.
fn logits<B: Backend>(
    tokens: usize,
    n_experts: usize,
    one_expert: bool,
    device: &B::Device,
) -> Tensor<B, 2> {
    let logits = tensor::<B, 2>([tokens, n_experts], 11, device) * 3.0;
    if one_expert {
        let boost = Tensor::<B, 2>::zeros([tokens, n_experts], device)
            .slice_assign([0..tokens, 0..1], Tensor::ones([tokens, 1], device) * 20.0);
        logits + boost
    } else {
        logits
    }
}

fn float<B: Backend, const D: usize>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Flex's one-pass routing against the reference on flex.
#[test]
fn flex_routing_kernels_match_reference() {
    routing_kernels_match_reference::<burn::backend::Flex>(&Default::default());
}

/// The CubeCL routing kernel against the reference on the same backend.
#[test]
fn wgpu_routing_kernels_match_reference() {
    routing_kernels_match_reference::<burn::backend::Wgpu>(&Default::default());
}

/// The same on CUDA (needs `--features cuda` and an NVIDIA GPU).
#[cfg(feature = "cuda")]
#[test]
fn cuda_routing_kernels_match_reference() {
    routing_kernels_match_reference::<burn::backend::Cuda>(&Default::default());
}

fn routing_kernels_match_reference<B: MoeBackend>(device: &B::Device) {
    for (tokens, n_experts, top_k) in SHAPES {
        for gate in gates() {
            for (one_expert, with_bias) in [(false, false), (false, true), (true, false)] {
                let what = format!(
                    "T={tokens} E={n_experts} k={top_k} {gate:?} one_expert={one_expert} bias={with_bias}"
                );
                let logits = logits::<B>(tokens, n_experts, one_expert, device);
                let bias = if with_bias {
                    tensor::<B, 1>([n_experts], 12, device) * 0.5
                } else {
                    Tensor::zeros([n_experts], device)
                };
                let grad = tensor::<B, 2>([tokens, top_k], 13, device);
                let p = |t: &Tensor<B, 2>| t.clone().into_primitive().tensor();

                let (weights, experts) = B::route_forward(
                    p(&logits),
                    bias.clone().into_primitive().tensor(),
                    gate,
                    top_k,
                );
                let (ref_weights, ref_experts) = reference::route_forward::<B>(
                    p(&logits),
                    bias.into_primitive().tensor(),
                    gate,
                    top_k,
                );
                let experts: Tensor<B, 2, Int> = Tensor::from_primitive(experts);
                let ref_experts: Tensor<B, 2, Int> = Tensor::from_primitive(ref_experts);
                assert_eq!(
                    host_int(experts.clone()),
                    host_int(ref_experts),
                    "experts {what}"
                );
                let weights: Tensor<B, 2> = float(weights);
                let ref_weights: Tensor<B, 2> = float(ref_weights);
                assert_close(
                    &host(weights.clone()),
                    &host(ref_weights),
                    1e-5,
                    &format!("weights {what}"),
                );

                let d_logits = B::route_backward(
                    p(&logits),
                    experts.clone().into_primitive(),
                    p(&weights),
                    p(&grad),
                    gate,
                );
                let ref_d_logits = reference::route_backward::<B>(
                    p(&logits),
                    experts.into_primitive(),
                    p(&weights),
                    p(&grad),
                    gate,
                );
                assert_close(
                    &host(float::<B, 2>(d_logits)),
                    &host(float::<B, 2>(ref_d_logits)),
                    1e-5,
                    &format!("d_logits {what}"),
                );
            }
        }
    }
}

/// The weights of one token's chosen `experts` computed on the host in f64.
fn host_weights(logits: &[f64], experts: &[usize], gate: Gate) -> Vec<f64> {
    let normalise = |v: Vec<f64>, scale: f64| {
        let sum: f64 = v.iter().sum();
        v.iter().map(|x| x / sum * scale).collect()
    };
    match gate {
        Gate::SoftmaxTopk { renormalize } => {
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            let chosen = experts
                .iter()
                .map(|&e| (logits[e] - max).exp() / total)
                .collect();
            if renormalize {
                normalise(chosen, 1.0)
            } else {
                chosen
            }
        }
        Gate::TopkSoftmax => normalise(experts.iter().map(|&e| logits[e].exp()).collect(), 1.0),
        Gate::Sigmoid { scale } => normalise(
            experts
                .iter()
                .map(|&e| 1.0 / (1.0 + (-logits[e]).exp()))
                .collect(),
            scale,
        ),
    }
}

/// `ops::route`'s weights and logit gradient (of `sum(weights * probe)`) against f64
/// host values and central finite differences, for every gate.
fn route_gradient_matches_finite_differences<B: MoeBackend>(device: &B::Device) {
    type A<B> = Autodiff<B>;
    for (tokens, n_experts, top_k) in SHAPES {
        for gate in gates() {
            let what = format!("T={tokens} E={n_experts} k={top_k} {gate:?}");
            let init = logits::<B>(tokens, n_experts, false, device);
            let logits = Tensor::<A<B>, 2>::from_inner(init.clone()).require_grad();
            let probe = tensor::<A<B>, 2>([tokens, top_k], 14, device);
            let bias = Tensor::<A<B>, 1>::zeros([n_experts], device);

            let (weights, experts) = ops::route(logits.clone(), bias, gate, top_k);
            let grads = (weights.clone() * probe.clone()).sum().backward();
            let fused = host(logits.grad(&grads).expect("gradient"));
            let (weights, experts) = (host(weights), host_int(experts));
            let (values, probe) = (host(init), host(probe));

            let (mut expected_weights, mut expected_grad) = (Vec::new(), Vec::new());
            for t in 0..tokens {
                let row = &values[t * n_experts..(t + 1) * n_experts];
                let chosen: Vec<usize> = experts[t * top_k..(t + 1) * top_k]
                    .iter()
                    .map(|&e| e as usize)
                    .collect();
                let g = &probe[t * top_k..(t + 1) * top_k];
                let objective = |row: &[f64]| -> f64 {
                    host_weights(row, &chosen, gate)
                        .iter()
                        .zip(g)
                        .map(|(w, g)| w * g)
                        .sum()
                };
                expected_weights.extend(host_weights(row, &chosen, gate));
                for e in 0..n_experts {
                    let h = 1e-5;
                    let (mut up, mut down) = (row.to_vec(), row.to_vec());
                    up[e] += h;
                    down[e] -= h;
                    expected_grad.push((objective(&up) - objective(&down)) / (2.0 * h));
                }
            }
            assert_close(
                &weights,
                &expected_weights,
                1e-5,
                &format!("weights {what}"),
            );
            assert_close(&fused, &expected_grad, 1e-5, &format!("d_logits {what}"));
        }
    }
}

/// Assignments per expert for the losses' tests: uneven, some experts empty.
fn counts(tokens: usize, n_experts: usize, top_k: usize) -> Vec<i64> {
    let mut counts: Vec<i64> = (0..n_experts).map(|e| (e % 3) as i64).collect();
    counts[0] += (tokens * top_k) as i64 - counts.iter().sum::<i64>();
    counts
}

/// One row of logits' router distribution under `gate` and its log-sum-exp, in f64.
fn host_row(row: &[f64], gate: Gate) -> (Vec<f64>, f64) {
    let lse = row.iter().map(|l| l.exp()).sum::<f64>().ln();
    let probs = match gate {
        Gate::Sigmoid { .. } => {
            let scores: Vec<f64> = row.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect();
            let sum: f64 = scores.iter().sum();
            scores.iter().map(|s| s / sum).collect()
        }
        _ => row.iter().map(|l| (l - lse).exp()).collect(),
    };
    (probs, lse)
}

/// `[balance, z, entropy, max |logit|]` of one batch of logits computed on the host in f64.
fn host_losses(logits: &[f64], counts: &[i64], gate: Gate, top_k: usize) -> [f64; 4] {
    let n_experts = counts.len();
    let tokens = logits.len() / n_experts;
    let (mut balance, mut z, mut entropy) = (0.0, 0.0, 0.0);
    for row in logits.chunks(n_experts) {
        let (probs, lse) = host_row(row, gate);
        balance += probs
            .iter()
            .zip(counts)
            .map(|(p, &c)| p * c as f64)
            .sum::<f64>();
        z += lse * lse;
        entropy -= probs.iter().map(|p| p * p.max(1e-12).ln()).sum::<f64>();
    }
    let scale = n_experts as f64 / (top_k * tokens * tokens) as f64;
    let max_abs = logits.iter().fold(0.0f64, |m, l| m.max(l.abs()));
    [
        scale * balance,
        z / tokens as f64,
        entropy / tokens as f64,
        max_abs,
    ]
}

/// `ops::router_losses`' four values and its logit gradient (of `losses . probe`) against
/// f64 host values and central finite differences of the two losses: the entropy and the
/// largest logit are statistics and pass no gradient.
fn router_losses_match_host<B: MoeBackend>(device: &B::Device) {
    type A<B> = Autodiff<B>;
    let probe = [0.7, -1.3, 2.0, 5.0];
    for (tokens, n_experts, top_k) in SHAPES {
        for gate in gates() {
            let what = format!("T={tokens} E={n_experts} k={top_k} {gate:?}");
            let init = logits::<B>(tokens, n_experts, false, device);
            let logits = Tensor::<A<B>, 2>::from_inner(init.clone()).require_grad();
            let counts = counts(tokens, n_experts, top_k);
            let counts_tensor = Tensor::<A<B>, 1, Int>::from_ints(counts.as_slice(), device);

            let losses = ops::router_losses(logits.clone(), counts_tensor, gate, top_k);
            let probe_tensor = Tensor::<A<B>, 1>::from_floats(probe, device);
            let grads = (losses.clone() * probe_tensor).sum().backward();
            let fused = host(logits.grad(&grads).expect("gradient"));
            let values = host(init);

            let expected = host_losses(&values, &counts, gate, top_k);
            assert_close(&host(losses), &expected, 1e-5, &format!("losses {what}"));
            // Each row's share of `probe[0] * balance + probe[1] * z`: a logit moves only
            // its own row's.
            let scale = n_experts as f64 / (top_k * tokens * tokens) as f64;
            let objective = |row: &[f64]| {
                let (probs, lse) = host_row(row, gate);
                let balance: f64 = probs.iter().zip(&counts).map(|(p, &c)| p * c as f64).sum();
                probe[0] * scale * balance + probe[1] * lse * lse / tokens as f64
            };
            let h = 1e-5;
            let mut expected_grad = Vec::with_capacity(values.len());
            for row in values.chunks(n_experts) {
                for e in 0..n_experts {
                    let (mut up, mut down) = (row.to_vec(), row.to_vec());
                    up[e] += h;
                    down[e] -= h;
                    expected_grad.push((objective(&up) - objective(&down)) / (2.0 * h));
                }
            }
            assert_close(&fused, &expected_grad, 1e-5, &format!("d_logits {what}"));
        }
    }
}

/// Flex's one-pass router losses against the reference on flex, forward and gradient.
#[test]
fn flex_router_losses_match_reference() {
    type B = burn::backend::Flex;
    let device = Default::default();
    for (tokens, n_experts, top_k) in SHAPES {
        for gate in gates() {
            let what = format!("T={tokens} E={n_experts} k={top_k} {gate:?}");
            let logits = logits::<B>(tokens, n_experts, false, &device);
            let counts = counts(tokens, n_experts, top_k);
            let counts = Tensor::<B, 1, Int>::from_ints(counts.as_slice(), &device);
            let grad = Tensor::<B, 1>::from_floats([0.7, -1.3, 2.0, 5.0], &device);
            let p = || logits.clone().into_primitive().tensor();
            let c = || counts.clone().into_primitive();
            let g = || grad.clone().into_primitive().tensor();
            let losses = B::router_losses_forward(p(), c(), gate, top_k);
            let ref_losses = losses_reference::router_losses_forward::<B>(p(), c(), gate, top_k);
            assert_close(
                &host(float::<B, 1>(losses)),
                &host(float::<B, 1>(ref_losses)),
                1e-5,
                &format!("losses {what}"),
            );
            let d_logits = B::router_losses_backward(p(), c(), gate, top_k, g());
            let ref_d_logits =
                losses_reference::router_losses_backward::<B>(p(), c(), gate, top_k, g());
            assert_close(
                &host(float::<B, 2>(d_logits)),
                &host(float::<B, 2>(ref_d_logits)),
                1e-5,
                &format!("d_logits {what}"),
            );
        }
    }
}

backend_tests!(
    route_gradient_matches_finite_differences,
    router_losses_match_host,
);
