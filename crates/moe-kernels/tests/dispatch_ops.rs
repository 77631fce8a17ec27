//! The dispatch operations (counting sort, permute, combine, grouped matmul, the experts'
//! SwiGLU FFN): each backend's implementation against the tensor-op reference, forward and
//! gradients. On wgpu these are the CubeCL kernels; elsewhere the reference itself, whose
//! hand-written backward is checked against autodiff through its forward.

mod common;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor, TensorMetadata, TensorPrimitive};
use common::{assert_close, backend_tests, host, host_int, leaf, tensor, values};
use moe_kernels::{self as ops, ExpertFfnWeights, MoeBackend, reference::dispatch as reference};

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// A routing case: `tokens` tokens each sent to `top_k` distinct experts out of
/// `n_experts`, rows of width `d`, with or without a capacity.
#[derive(Debug, Clone, Copy)]
struct Case {
    tokens: usize,
    top_k: usize,
    n_experts: usize,
    d: usize,
    capacity: Option<usize>,
    /// Route every token's first choice to expert 0.
    all_to_one: bool,
    /// Never route to this expert.
    empty_expert: Option<usize>,
}

const CASES: [Case; 8] = [
    // Rows of 64 floats: whole vectors of 4 in permute and combine, and every expert's
    // segment (64 or 128 wide) starts on a 256-byte boundary, so the CubeCL grouped
    // matmul writes its segments in place.
    Case {
        tokens: 300,
        top_k: 2,
        n_experts: 8,
        d: 64,
        capacity: None,
        all_to_one: false,
        empty_expert: Some(5),
    },
    // T not a multiple of any workgroup or sort block; d not a multiple of 4.
    Case {
        tokens: 300,
        top_k: 2,
        n_experts: 8,
        d: 13,
        capacity: None,
        all_to_one: false,
        empty_expert: Some(3),
    },
    Case {
        tokens: 300,
        top_k: 2,
        n_experts: 8,
        d: 13,
        capacity: Some(70),
        all_to_one: false,
        empty_expert: None,
    },
    Case {
        tokens: 257,
        top_k: 1,
        n_experts: 1,
        d: 7,
        capacity: Some(100),
        all_to_one: false,
        empty_expert: None,
    },
    Case {
        tokens: 257,
        top_k: 1,
        n_experts: 1,
        d: 7,
        capacity: None,
        all_to_one: false,
        empty_expert: None,
    },
    Case {
        tokens: 100,
        top_k: 4,
        n_experts: 64,
        d: 6,
        capacity: None,
        all_to_one: false,
        empty_expert: Some(63),
    },
    Case {
        tokens: 70,
        top_k: 1,
        n_experts: 8,
        d: 5,
        capacity: Some(11),
        all_to_one: true,
        empty_expert: None,
    },
    Case {
        tokens: 70,
        top_k: 2,
        n_experts: 8,
        d: 5,
        capacity: None,
        all_to_one: true,
        empty_expert: None,
    },
];

impl Case {
    /// Token-major expert choices, distinct within a token.
    fn experts(&self) -> Vec<i64> {
        let noise = values(self.tokens * self.top_k, 5);
        let allowed: Vec<usize> = (0..self.n_experts)
            .filter(|&e| Some(e) != self.empty_expert)
            .collect();
        let mut out = Vec::new();
        for t in 0..self.tokens {
            let mut chosen: Vec<usize> = Vec::new();
            for j in 0..self.top_k {
                let mut e = if j == 0 && self.all_to_one {
                    0
                } else {
                    let r = (noise[t * self.top_k + j] + 1.0) / 2.0;
                    allowed[((r * allowed.len() as f32) as usize).min(allowed.len() - 1)]
                };
                while chosen.contains(&e) {
                    e = allowed
                        [(allowed.iter().position(|&a| a == e).unwrap() + 1) % allowed.len()];
                }
                chosen.push(e);
            }
            out.extend(chosen.iter().map(|&e| e as i64));
        }
        out
    }

    fn rows(&self, counts: &[usize]) -> usize {
        match self.capacity {
            Some(c) => c * self.n_experts,
            None => counts.iter().sum(),
        }
    }
}

fn counts_of(counts: Tensor<impl Backend, 1, Int>) -> Vec<usize> {
    host_int(counts).into_iter().map(|c| c as usize).collect()
}

/// Every dispatch operation of `B` equals the reference on `B`, forward and backward.
fn kernels_match_reference<B: MoeBackend>(device: &B::Device) {
    for case in CASES {
        let what = format!("{case:?}");
        let assignments = case.tokens * case.top_k;
        let experts = Tensor::<B, 1, Int>::from_ints(case.experts().as_slice(), device);

        let (slot, counts) = B::expert_slots(
            experts.clone().into_primitive(),
            case.n_experts,
            case.capacity,
        );
        let (ref_slot, ref_counts) =
            reference::expert_slots::<B>(experts.into_primitive(), case.n_experts, case.capacity);
        let slot: Tensor<B, 1, Int> = Tensor::from_primitive(slot);
        let counts = counts_of(Tensor::<B, 1, Int>::from_primitive(counts));
        assert_eq!(
            host_int(slot.clone()),
            host_int(Tensor::<B, 1, Int>::from_primitive(ref_slot)),
            "slots {what}"
        );
        assert_eq!(
            counts,
            counts_of(Tensor::<B, 1, Int>::from_primitive(ref_counts)),
            "counts {what}"
        );
        let rows = case.rows(&counts);

        let x = tensor::<B, 2>([case.tokens, case.d], 1, device);
        let buffer = tensor::<B, 2>([rows, case.d], 2, device);
        let weights = tensor::<B, 2>([case.tokens, case.top_k], 3, device);
        let grad_out = tensor::<B, 2>([case.tokens, case.d], 4, device);
        let grad_buffer = tensor::<B, 2>([rows, case.d], 6, device);
        let p = || slot.clone().into_primitive();
        // Any rank, flattened.
        let within = |tol: f64, got: FloatTensor<B>, expected: FloatTensor<B>, op: &str| {
            let values = |t: FloatTensor<B>| {
                let n = t.shape().num_elements();
                host(float::<B, 1>(B::float_reshape(t, [n].into())))
            };
            let what = format!("{op} {what}");
            assert_close(&values(got), &values(expected), tol, &what);
        };
        let same = |got, expected, op: &str| within(1e-5, got, expected, op);
        // The FFN's pre-activations reach about 10 here, and its fused backward sums the
        // gate's and up's input gradients in another order: to 1e-4.
        let close = |got, expected, op: &str| within(1e-4, got, expected, op);

        same(
            B::permute_forward(prim(x.clone()), p(), rows),
            reference::permute_forward::<B>(prim(x.clone()), p(), rows),
            "permute",
        );
        same(
            B::permute_backward(prim(grad_buffer.clone()), p(), case.tokens),
            reference::permute_backward::<B>(prim(grad_buffer.clone()), p(), case.tokens),
            "permute backward",
        );
        same(
            B::combine_forward(prim(buffer.clone()), p(), prim(weights.clone())),
            reference::combine_forward::<B>(prim(buffer.clone()), p(), prim(weights.clone())),
            "combine",
        );
        let (d_buffer, d_weights) = B::combine_backward(
            prim(buffer.clone()),
            p(),
            prim(weights.clone()),
            prim(grad_out.clone()),
        );
        let (ref_d_buffer, ref_d_weights) = reference::combine_backward::<B>(
            prim(buffer.clone()),
            p(),
            prim(weights.clone()),
            prim(grad_out.clone()),
        );
        same(d_buffer, ref_d_buffer, "combine d_buffer");
        same(d_weights, ref_d_weights, "combine d_weights");
        assert_eq!(assignments, host_int(slot.clone()).len());

        if case.capacity.is_none() {
            let f = 2 * case.d;
            let w = tensor::<B, 3>([case.n_experts, case.d, f], 7, device);
            let grad = tensor::<B, 2>([rows, f], 8, device);
            let got = B::grouped_matmul_forward(prim(buffer.clone()), prim(w.clone()), &counts);
            let expected = reference::grouped_matmul_forward::<B>(
                prim(buffer.clone()),
                prim(w.clone()),
                &counts,
            );
            same(got, expected, "grouped matmul");
            let (d_x, d_w) = B::grouped_matmul_backward(
                prim(buffer.clone()),
                prim(w.clone()),
                &counts,
                prim(grad.clone()),
            );
            let (ref_d_x, ref_d_w) = reference::grouped_matmul_backward::<B>(
                prim(buffer.clone()),
                prim(w.clone()),
                &counts,
                prim(grad),
            );
            same(d_x, ref_d_x, "grouped matmul d_x");
            same(d_w, ref_d_w, "grouped matmul d_w");

            // The experts' SwiGLU FFN against its composition from the reference ops.
            let weights = || {
                ExpertFfnWeights {
                    gate: tensor::<B, 3>([case.n_experts, case.d, f], 7, device),
                    up: tensor::<B, 3>([case.n_experts, case.d, f], 9, device),
                    down: tensor::<B, 3>([case.n_experts, f, case.d], 10, device),
                }
                .map(prim)
            };
            let grad = prim(tensor::<B, 2>([rows, case.d], 11, device));
            let (x, c) = (|| prim(buffer.clone()), &counts);
            let (out, [gate, up]) = B::expert_ffn_forward(x(), weights(), c);
            let (ref_out, [ref_gate, ref_up]) =
                ops::with_reference_dispatch(|| B::expert_ffn_forward(x(), weights(), c));
            close(out, ref_out, "expert ffn");
            close(gate.clone(), ref_gate, "expert ffn gate");
            close(up.clone(), ref_up, "expert ffn up");
            let saved = || [gate.clone(), up.clone()];
            let (d_x, d_ws) = B::expert_ffn_backward(x(), weights(), c, saved(), grad.clone());
            let (ref_d_x, ref_d_ws) = ops::with_reference_dispatch(|| {
                B::expert_ffn_backward(x(), weights(), c, saved(), grad.clone())
            });
            close(d_x, ref_d_x, "expert ffn d_x");
            close(d_ws.gate, ref_d_ws.gate, "expert ffn d_gate");
            close(d_ws.up, ref_d_ws.up, "expert ffn d_up");
            close(d_ws.down, ref_d_ws.down, "expert ffn d_down");
        }
    }
}

/// The differentiable entry points give autodiff through the reference forward's gradients.
fn gradients_match_autodiff_through_reference<B: MoeBackend>(device: &B::Device) {
    type A<B> = Autodiff<B>;
    for case in [CASES[0], CASES[1], CASES[5]] {
        let what = format!("{case:?}");
        let experts = Tensor::<A<B>, 1, Int>::from_ints(case.experts().as_slice(), device);
        let (slot, counts) = ops::expert_slots(experts, case.n_experts, case.capacity);
        let counts = counts_of(counts);
        let rows = case.rows(&counts);
        let f = 6;
        let x = leaf::<A<B>, 2>([case.tokens, case.d], 1, 1.0, device);
        let w = leaf::<A<B>, 3>([case.n_experts, case.d, f], 2, 1.0, device);
        let weights = leaf::<A<B>, 2>([case.tokens, case.top_k], 3, 1.0, device);
        let probe = Tensor::<A<B>, 1>::from_floats(values(case.tokens * f, 9).as_slice(), device)
            .reshape([case.tokens, f]);
        let s = || slot.clone().into_primitive();

        // permute -> expert matmul (grouped when dropless) -> combine, weighted sum.
        let grads_of = |fused: bool| {
            let (x, w, weights) = (x.clone(), w.clone(), weights.clone());
            let buffer: Tensor<A<B>, 2> = if fused {
                ops::permute(x.clone(), slot.clone(), rows)
            } else {
                float(reference::permute_forward::<A<B>>(
                    prim(x.clone()),
                    s(),
                    rows,
                ))
            };
            let hidden: Tensor<A<B>, 2> = match (case.capacity, fused) {
                (Some(c), _) => buffer
                    .reshape([case.n_experts, c, case.d])
                    .matmul(w.clone())
                    .reshape([rows, f]),
                (None, true) => ops::grouped_matmul(buffer, w.clone(), &counts),
                (None, false) => float(reference::grouped_matmul_forward::<A<B>>(
                    prim(buffer),
                    prim(w.clone()),
                    &counts,
                )),
            };
            let out: Tensor<A<B>, 2> = if fused {
                ops::combine(hidden, slot.clone(), weights.clone())
            } else {
                float(reference::combine_forward::<A<B>>(
                    prim(hidden),
                    s(),
                    prim(weights.clone()),
                ))
            };
            let grads = (out * probe.clone()).sum().backward();
            [
                host(x.grad(&grads).expect("x has a gradient")),
                host(w.grad(&grads).expect("w has a gradient")),
                host(weights.grad(&grads).expect("weights have a gradient")),
            ]
        };
        let got = grads_of(true);
        let expected = grads_of(false);
        for (name, (g, e)) in ["x", "w", "weights"].iter().zip(got.iter().zip(&expected)) {
            assert_close(g, e, 1e-5, &format!("d_{name} {what}"));
        }
    }
}

/// The experts' FFN as one operation gives the output and gradients of autodiff through
/// its grouped matmuls and SwiGLU.
fn expert_ffn_matches_autodiff_through_its_parts<B: MoeBackend>(device: &B::Device) {
    type A<B> = Autodiff<B>;
    for case in [CASES[0], CASES[1], CASES[4], CASES[5]] {
        let what = format!("{case:?}");
        let experts = Tensor::<A<B>, 1, Int>::from_ints(case.experts().as_slice(), device);
        let counts = counts_of(ops::expert_slots(experts, case.n_experts, None).1);
        let (rows, d, f) = (counts.iter().sum(), case.d, 10);
        let x = leaf::<A<B>, 2>([rows, d], 1, 1.0, device);
        let w1 = leaf::<A<B>, 3>([case.n_experts, d, f], 2, 0.5, device);
        let w3 = leaf::<A<B>, 3>([case.n_experts, d, f], 3, 0.5, device);
        let w2 = leaf::<A<B>, 3>([case.n_experts, f, d], 4, 0.5, device);
        let probe = tensor::<A<B>, 2>([rows, d], 9, device);
        let run = |fused: bool| {
            let out = if fused {
                let weights = ExpertFfnWeights {
                    gate: w1.clone(),
                    up: w3.clone(),
                    down: w2.clone(),
                };
                ops::expert_ffn(x.clone(), weights, &counts)
            } else {
                let gate = ops::grouped_matmul(x.clone(), w1.clone(), &counts);
                let up = ops::grouped_matmul(x.clone(), w3.clone(), &counts);
                ops::grouped_matmul(ops::swiglu(gate, up), w2.clone(), &counts)
            };
            let grads = (out.clone() * probe.clone()).sum().backward();
            let grad = |t: &Tensor<A<B>, 3>| host(t.grad(&grads).expect("a weight gradient"));
            [
                host(out),
                host(x.grad(&grads).expect("x has a gradient")),
                grad(&w1),
                grad(&w3),
                grad(&w2),
            ]
        };
        let (got, expected) = (run(true), run(false));
        for (name, (g, e)) in ["out", "d_x", "d_w1", "d_w3", "d_w2"]
            .iter()
            .zip(got.iter().zip(&expected))
        {
            assert_close(g, e, 1e-5, &format!("expert ffn {name} {what}"));
        }
    }
}

backend_tests!(
    gradients_match_autodiff_through_reference,
    expert_ffn_matches_autodiff_through_its_parts,
);

/// flex's row-loop kernels and direct grouped matmul against the reference on flex.
#[test]
fn flex_kernels_match_reference() {
    kernels_match_reference::<burn::backend::Flex>(&Default::default());
}

/// The CubeCL kernels (wgpu) against the reference on the same backend.
#[test]
fn wgpu_kernels_match_reference() {
    kernels_match_reference::<burn::backend::Wgpu>(&Default::default());
}

/// The same kernels on CUDA (needs `--features cuda` and an NVIDIA GPU).
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_match_reference() {
    kernels_match_reference::<burn::backend::Cuda>(&Default::default());
}
