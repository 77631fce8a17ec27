//! The fused operations against naive host loops (forward) and against autodiff through
//! their tensor-op reference (gradients), on every CPU backend and wgpu; the linear op
//! against burn's `Linear`.

mod common;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorPrimitive};
use common::{assert_close, backend_tests, host, leaf, matmul_tol, tensor, values};
use moe_kernels::{
    MoeBackend, causal_attention, linear, linear_cross_entropy, reference, rms_norm, rotary,
    swiglu, write_positions,
};

fn float<B: Backend, const D: usize>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> burn::tensor::ops::FloatTensor<B> {
    t.into_primitive().tensor()
}

/// Row-major index into a 4-d shape.
fn at(shape: [usize; 4], i: [usize; 4]) -> usize {
    ((i[0] * shape[1] + i[1]) * shape[2] + i[2]) * shape[3] + i[3]
}

/// Rotary `(cos, sin)` tables, `[len, dim]` each, of positions `3..3 + len` (base 10^4,
/// the half-split layout: each half of a row repeats the angles).
fn angles<B: Backend>(len: usize, dim: usize, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = dim / 2;
    let angle = |i: usize| {
        let (position, j) = (3 + i / dim, i % dim % half);
        position as f32 * (1.0 / 10_000f64.powf(2.0 * j as f64 / dim as f64)) as f32
    };
    let table = |f: fn(f32) -> f32| {
        let values: Vec<f32> = (0..len * dim).map(|i| f(angle(i))).collect();
        Tensor::<B, 1>::from_floats(values.as_slice(), device).reshape([len, dim])
    };
    (table(f32::cos), table(f32::sin))
}

/// Naive attention on the host: query `i` sees keys `0..=keys - queries + i`.
fn naive_attention(q: &[f64], k: &[f64], v: &[f64], qs: [usize; 4], keys: usize) -> Vec<f64> {
    let [b, h, sq, d] = qs;
    let ks = [b, h, keys, d];
    let mut out = vec![0.0; q.len()];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..sq {
                let visible = keys - sq + i + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[at(qs, [bi, hi, i, c])] * k[at(ks, [bi, hi, j, c])])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for c in 0..d {
                    out[at(qs, [bi, hi, i, c])] = (0..visible)
                        .map(|j| exps[j] / total * v[at(ks, [bi, hi, j, c])])
                        .sum();
                }
            }
        }
    }
    out
}

/// Attention against the naive loops, on `B` and through autodiff on `B`.
fn attention_matches_naive<B: MoeBackend>(device: &B::Device) {
    attention_matches_naive_on::<B>(device);
    attention_matches_naive_on::<Autodiff<B>>(device);
}

fn attention_matches_naive_on<B: MoeBackend>(device: &B::Device) {
    // Full causal attention, and a shorter query block continuing a cache (Sq < Sk);
    // head_dim 5 is not a multiple of any vector width. The longer ones span several of
    // flex's query and key blocks (64), the last partial.
    let tol = matmul_tol::<B>(device, 1e-5);
    for (queries, keys) in [(7, 7), (3, 9), (1, 4), (130, 130), (70, 150)] {
        let (b, h, d) = (2, 3, 5);
        let q = tensor::<B, 4>([b, h, queries, d], 1, device);
        let k = tensor::<B, 4>([b, h, keys, d], 2, device);
        let v = tensor::<B, 4>([b, h, keys, d], 3, device);
        let expected = naive_attention(
            &host(q.clone()),
            &host(k.clone()),
            &host(v.clone()),
            [b, h, queries, d],
            keys,
        );
        let out = causal_attention(q, k, v);
        assert_close(&host(out), &expected, tol, "attention");
    }
}

fn attention_accepts_strided_inputs<B: MoeBackend>(device: &B::Device) {
    let x = tensor::<B, 4>([2, 6, 3, 4], 4, device);
    let strided = x.clone().swap_dims(1, 2);
    let contiguous = Tensor::<B, 4>::from_data(strided.clone().into_data(), device);
    let a = causal_attention(strided.clone(), strided.clone(), strided);
    let b = causal_attention(contiguous.clone(), contiguous.clone(), contiguous);
    assert_close(&host(a), &host(b), 1e-6, "strided attention");
}

/// `write_positions` replaces exactly positions `start..start + S` (from a strided view),
/// leaves a buffer that another tensor still holds untouched, and writes twice in a row.
fn write_positions_replaces_only_its_positions<B: MoeBackend>(device: &B::Device) {
    let shape = [2, 3, 6, 4];
    let buffer = tensor::<B, 4>(shape, 5, device);
    let before = host(buffer.clone());
    // `[2, 3, S, 4]` views of `[2, S, 3, 4]` tensors, as the model's values are.
    let step = |len, seed| tensor::<B, 4>([2, len, 3, 4], seed, device).swap_dims(1, 2);
    let (first, second) = (step(2, 6), step(1, 7));
    let expected = |mut buffer: Vec<f64>, values: &[f64], start: usize, len: usize| {
        for (i, value) in values.iter().enumerate() {
            let [b, h, p, c] = [i / (3 * len * 4), i / (len * 4) % 3, i / 4 % len, i % 4];
            buffer[at(shape, [b, h, start + p, c])] = *value;
        }
        buffer
    };
    let held = buffer.clone();
    let written = write_positions(buffer, first.clone(), 1);
    let after_first = expected(before.clone(), &host(first), 1, 2);
    assert_eq!(host(written.clone()), after_first, "positions 1..3");
    assert_eq!(
        host(held),
        before,
        "a buffer held elsewhere must not change"
    );
    let written = write_positions(written, second.clone(), 3);
    let after_second = expected(after_first, &host(second), 3, 1);
    assert_eq!(host(written), after_second, "position 3");
}

/// Naive cross-entropy of the logits `x w` on the host: `(nll, d_x, d_w)` for the output
/// gradient `grad`.
fn naive_linear_cross_entropy(
    x: &[f64],
    w: &[f64],
    targets: &[usize],
    grad: &[f64],
    [rows, d, vocab]: [usize; 3],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut nll, mut d_x, mut d_w) = (vec![0.0; rows], vec![0.0; rows * d], vec![0.0; d * vocab]);
    for r in 0..rows {
        let logits: Vec<f64> = (0..vocab)
            .map(|v| (0..d).map(|c| x[r * d + c] * w[c * vocab + v]).sum())
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        nll[r] = max + sum.ln() - logits[targets[r]];
        for v in 0..vocab {
            let onehot = if v == targets[r] { 1.0 } else { 0.0 };
            let dlogit = ((logits[v] - max).exp() / sum - onehot) * grad[r];
            for c in 0..d {
                d_x[r * d + c] += dlogit * w[c * vocab + v];
                d_w[c * vocab + v] += dlogit * x[r * d + c];
            }
        }
    }
    (nll, d_x, d_w)
}

fn linear_cross_entropy_matches_naive<B: MoeBackend>(device: &B::Device) {
    type A<B> = Autodiff<B>;
    // 150 rows: flex's blocks of 64 rows, the last partial; a vocabulary and width that
    // are not multiples of any vector width.
    let (rows, d, vocab) = (150, 7, 37);
    let targets_host: Vec<usize> = (0..rows).map(|r| r * 11 % vocab).collect();
    let ids: Vec<i64> = targets_host.iter().map(|&t| t as i64).collect();
    let targets = Tensor::<A<B>, 1, Int>::from_ints(ids.as_slice(), device);
    let grad = Tensor::<A<B>, 1>::from_floats(values(rows, 12).as_slice(), device);
    let grad_host = host(grad.clone());
    let tol = matmul_tol::<B>(device, 1e-5);
    // The weight as a plain [d, V] tensor and as the transposed view of a [V, d] one (a
    // head tied to the embedding).
    for transposed in [false, true] {
        let x = leaf::<A<B>, 2>([rows, d], 13, 2.0, device);
        let (w_leaf, w) = if transposed {
            let leaf = leaf::<A<B>, 2>([vocab, d], 14, 2.0, device);
            (leaf.clone(), leaf.transpose())
        } else {
            let leaf = leaf::<A<B>, 2>([d, vocab], 14, 2.0, device);
            (leaf.clone(), leaf)
        };
        let (nll_e, d_x_e, d_w_e) = naive_linear_cross_entropy(
            &host(x.clone()),
            &host(w.clone()),
            &targets_host,
            &grad_host,
            [rows, d, vocab],
        );
        let nll = linear_cross_entropy(x.clone(), w.clone(), targets.clone());
        let plain = linear_cross_entropy(x.clone().inner(), w.inner(), targets.clone().inner());
        assert_close(&host(plain), &nll_e, tol, "nll");
        assert_close(&host(nll.clone()), &nll_e, tol, "nll (autodiff)");
        let grads = (nll * grad.clone()).sum().backward();
        assert_close(&host(x.grad(&grads).unwrap()), &d_x_e, tol, "d_x");
        let d_w = w_leaf.grad(&grads).unwrap();
        let d_w = if transposed { d_w.transpose() } else { d_w };
        assert_close(&host(d_w), &d_w_e, tol, "d_weight");
    }
}

fn rotary_matches_naive<B: MoeBackend>(device: &B::Device) {
    let (b, s, h, d) = (2, 5, 3, 6);
    let x = tensor::<B, 4>([b, s, h, d], 6, device);
    let (cos, sin) = angles::<B>(s, d, device);
    let (xh, c, sn) = (host(x.clone()), host(cos.clone()), host(sin.clone()));
    let half = d / 2;
    let mut expected = vec![0.0; xh.len()];
    for bi in 0..b {
        for si in 0..s {
            for hi in 0..h {
                for i in 0..d {
                    let xi = |c: usize| xh[at([b, s, h, d], [bi, si, hi, c])];
                    let rotated = if i < half {
                        -xi(i + half)
                    } else {
                        xi(i - half)
                    };
                    expected[at([b, h, s, d], [bi, hi, si, i])] =
                        xi(i) * c[si * d + i] + rotated * sn[si * d + i];
                }
            }
        }
    }
    assert_close(&host(rotary(x, cos, sin)), &expected, 1e-6, "rotary");
}

fn swiglu_matches_naive<B: MoeBackend>(device: &B::Device) {
    // 9000 elements: more than one parallel chunk, and not a multiple of one.
    let gate = tensor::<B, 3>([3, 40, 75], 12, device) * 6.0;
    let up = tensor::<B, 3>([3, 40, 75], 13, device);
    let expected: Vec<f64> = host(gate.clone())
        .iter()
        .zip(host(up.clone()))
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    assert_close(&host(swiglu(gate, up)), &expected, 1e-5, "swiglu");
}

/// Forward values and the gradients of `sum(rms_norm(x) * w)` against f64 host loops.
/// (Against f64 rather than autodiff through burn's `RmsNorm`, whose chain rule through
/// `x / rms` is off by up to 4e-5 relative here.)
fn rms_norm_matches_naive<B: MoeBackend>(device: &B::Device) {
    // 300 rows of 27: several parallel tasks, the last partial, rows not a multiple of
    // the lane width.
    let (d, epsilon) = (27, 1e-5);
    let x = leaf::<Autodiff<B>, 3>([3, 100, d], 16, 3.0, device);
    let gamma = leaf::<Autodiff<B>, 1>([d], 17, 1.0, device);
    let w = tensor::<Autodiff<B>, 3>([3, 100, d], 99, device);
    let out = rms_norm(x.clone(), gamma.clone(), epsilon);
    let grads = (out.clone() * w.clone()).sum().backward();

    let (x_host, gamma_host, w_host) = (host(x.clone()), host(gamma.clone()), host(w));
    let (mut expected, mut d_x) = (Vec::new(), Vec::new());
    let mut d_gamma = vec![0.0; d];
    for (x, w) in x_host.chunks(d).zip(w_host.chunks(d)) {
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / d as f64 + epsilon).sqrt();
        let x_hat: Vec<f64> = x.iter().map(|v| v / rms).collect();
        let d_x_hat: Vec<f64> = w.iter().zip(&gamma_host).map(|(w, g)| w * g).collect();
        let mean = d_x_hat.iter().zip(&x_hat).map(|(a, b)| a * b).sum::<f64>() / d as f64;
        for j in 0..d {
            expected.push(x_hat[j] * gamma_host[j]);
            d_x.push((d_x_hat[j] - x_hat[j] * mean) / rms);
            d_gamma[j] += w[j] * x_hat[j];
        }
    }
    assert_close(&host(out), &expected, 1e-5, "rms norm");
    let grad = |t: Tensor<Autodiff<B>, 3>| host(t.grad(&grads).expect("x has a gradient"));
    assert_close(&grad(x), &d_x, 1e-5, "rms norm d_x");
    let d_gamma_got = host(gamma.grad(&grads).expect("gamma has a gradient"));
    assert_close(&d_gamma_got, &d_gamma, 1e-5, "rms norm d_gamma");
}

/// Gradients of `sum(op(inputs) * w)` through the fused op and through autodiff of the
/// reference composition agree.
fn assert_same_grads<B: MoeBackend, const D: usize, const N: usize>(
    inputs: [Tensor<Autodiff<B>, 4>; N],
    fused: impl Fn([Tensor<Autodiff<B>, 4>; N]) -> Tensor<Autodiff<B>, D>,
    reference: impl Fn([Tensor<Autodiff<B>, 4>; N]) -> Tensor<Autodiff<B>, D>,
    what: &str,
) {
    let grads_of = |op: &dyn Fn([Tensor<Autodiff<B>, 4>; N]) -> Tensor<Autodiff<B>, D>| {
        let leaves = inputs.clone().map(|t| t.detach().require_grad());
        let out = op(leaves.clone());
        let n = out.shape().num_elements();
        let w = Tensor::<Autodiff<B>, 1>::from_floats(values(n, 99).as_slice(), &out.device())
            .reshape(out.shape());
        let grads = (out * w).sum().backward();
        leaves.map(|leaf| host(leaf.grad(&grads).expect("input has a gradient")))
    };
    let got = grads_of(&fused);
    let expected = grads_of(&reference);
    let tol = matmul_tol::<B>(&inputs[0].device(), 1e-5);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_close(g, e, tol, &format!("{what} grad {i}"));
    }
}

fn fused_gradients_match_reference<B: MoeBackend>(device: &B::Device) {
    type A<B> = Autodiff<B>;
    let q = leaf::<A<B>, 4>([2, 3, 4, 5], 7, 1.0, device);
    let k = leaf::<A<B>, 4>([2, 3, 6, 5], 8, 1.0, device);
    let v = leaf::<A<B>, 4>([2, 3, 6, 5], 9, 1.0, device);
    assert_same_grads::<B, 4, 3>(
        [q, k, v],
        |[q, k, v]| causal_attention(q, k, v),
        |[q, k, v]| {
            let scores = q.matmul(k.swap_dims(2, 3));
            float(reference::causal_softmax::<A<B>>(
                prim(scores),
                1.0 / 5f32.sqrt(),
            ))
            .matmul(v)
        },
        "attention",
    );
    // Several query and key blocks of flex's kernels, the last partial, Sq < Sk; inputs
    // and the output's gradient are transposed views, as in the model ([B, S, H, D]).
    let q = leaf::<A<B>, 4>([1, 130, 2, 8], 7, 1.0, device);
    let k = leaf::<A<B>, 4>([1, 140, 2, 8], 8, 1.0, device);
    let v = leaf::<A<B>, 4>([1, 140, 2, 8], 9, 1.0, device);
    let heads_first = |[q, k, v]: [Tensor<A<B>, 4>; 3]| [q, k, v].map(|t| t.swap_dims(1, 2));
    assert_same_grads::<B, 4, 3>(
        [q, k, v],
        |inputs| {
            let [q, k, v] = heads_first(inputs);
            causal_attention(q, k, v).swap_dims(1, 2)
        },
        |inputs| {
            let [q, k, v] = heads_first(inputs);
            let scores = q.matmul(k.swap_dims(2, 3));
            float::<A<B>, 4>(reference::causal_softmax::<A<B>>(
                prim(scores),
                1.0 / 8f32.sqrt(),
            ))
            .matmul(v)
            .swap_dims(1, 2)
        },
        "attention (blocks, strided)",
    );

    let gate = leaf::<A<B>, 4>([2, 3, 50, 31], 14, 5.0, device);
    let up = leaf::<A<B>, 4>([2, 3, 50, 31], 15, 1.0, device);
    assert_same_grads::<B, 4, 2>(
        [gate, up],
        |[g, u]| swiglu(g, u),
        |[g, u]| burn::tensor::activation::silu(g) * u,
        "swiglu",
    );

    let x = leaf::<A<B>, 4>([2, 4, 3, 6], 10, 1.0, device);
    let (cos, sin) = angles::<A<B>>(4, 6, device);
    assert_same_grads::<B, 4, 1>(
        [x],
        |[x]| rotary(x, cos.clone(), sin.clone()),
        |[x]| {
            float(reference::rotary_forward::<A<B>>(
                prim(x),
                prim(cos.clone()),
                prim(sin.clone()),
            ))
        },
        "rotary",
    );
}

/// The linear op against burn's `Linear::forward`, values and gradients (input, weight and
/// bias): 600 rows are several of flex's row blocks, the last one partial.
fn linear_matches_burn_linear<B: MoeBackend>(device: &B::Device) {
    type A<B> = Autodiff<B>;
    for bias in [false, true] {
        let layer = burn::nn::LinearConfig::new(20, 7)
            .with_bias(bias)
            .init::<A<B>>(device);
        let x = leaf::<A<B>, 3>([2, 300, 20], 16, 1.0, device);
        let run = |forward: &dyn Fn(Tensor<A<B>, 3>) -> Tensor<A<B>, 3>| {
            let x = x.clone().detach().require_grad();
            let out = forward(x.clone());
            let w = tensor::<A<B>, 3>([2, 300, 7], 17, device);
            let grads = (out.clone() * w).sum().backward();
            let weight_grad = layer.weight.val().grad(&grads).expect("weight gradient");
            let mut all = vec![host(out), host(x.grad(&grads).unwrap()), host(weight_grad)];
            if let Some(b) = &layer.bias {
                all.push(host(b.val().grad(&grads).expect("bias gradient")));
            }
            all
        };
        let got = run(&|x| linear(x, &layer));
        let expected = run(&|x| layer.forward(x));
        for (what, (g, e)) in ["output", "d_x", "d_w", "d_bias"]
            .iter()
            .zip(got.iter().zip(&expected))
        {
            assert_close(
                g,
                e,
                matmul_tol::<B>(device, 1e-5),
                &format!("linear (bias {bias}) {what}"),
            );
        }
    }
}

backend_tests!(
    attention_matches_naive,
    attention_accepts_strided_inputs,
    write_positions_replaces_only_its_positions,
    linear_cross_entropy_matches_naive,
    swiglu_matches_naive,
    rms_norm_matches_naive,
    rotary_matches_naive,
    linear_matches_burn_linear,
    fused_gradients_match_reference,
);
