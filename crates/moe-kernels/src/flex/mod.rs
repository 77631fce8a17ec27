//! CPU kernels for burn's `flex` backend. The elementwise and row-wise operations (SwiGLU,
//! RMS normalisation, rotary embedding, AdamW) are one pass over f32 rows, parallel over
//! rows with rayon; attention, the output head's loss, the linear layer and the dispatch
//! split their products into `gemm` blocks. Each operation's kernels live in the file of
//! its name, which falls back to the tensor-op reference for other dtypes and layouts;
//! `simd`, `output`, `layout` and `matmul` are the helpers they share.

mod adamw;
mod attention;
mod dispatch;
mod expert_ffn;
mod layout;
mod linear;
mod linear_cross_entropy;
mod matmul;
mod output;
mod rms_norm;
mod rotary;
mod router_losses;
mod routing;
mod simd;
mod swiglu;
mod write_positions;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Shape, TensorData, TensorMetadata};

use crate::{AdamWStep, ExpertFfnWeights, Gate, MoeBackend, reference};
use layout::{dispatch_rows, f32_rows, indices, tensor};

impl MoeBackend for Flex {
    // RMS normalisation.

    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        rms_norm::rms_norm_forward(x, gamma, epsilon)
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        rms_norm::rms_norm_backward(x, gamma, epsilon, grad)
    }

    // Linear layer.

    fn linear_forward(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        linear::linear_forward(x, w)
    }

    fn linear_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        linear::linear_backward(x, w, grad)
    }

    // Rotary embedding.

    fn rotary_forward(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        rotary::rotary_forward(x, cos, sin)
    }

    fn rotary_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        rotary::rotary_backward(grad, cos, sin)
    }

    // Causal attention.

    fn causal_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        attention::causal_attention_forward(q, k, v)
    }

    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        attention::causal_attention_backward(q, k, v, probs, grad)
    }

    // SwiGLU.

    fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        swiglu::swiglu_forward(gate, up)
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        swiglu::swiglu_backward(gate, up, grad)
    }

    // Routing and the router's losses (the kernels in `routing.rs`, `router_losses.rs`).

    fn route_forward(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let [tokens, n_experts] = logits.shape().dims::<2>();
        match (dispatch_rows(&logits), f32_rows(&bias)) {
            (Some(values), Some(bias)) if bias.len() == n_experts && top_k <= n_experts => {
                let (weights, experts) = routing::route(&values, &bias, gate, top_k);
                let shape = Shape::new([tokens, top_k]);
                let experts = TensorData::new(experts, shape.clone());
                (tensor(weights, shape), FlexTensor::from_data(experts))
            }
            _ => reference::routing::route_forward::<Self>(logits, bias, gate, top_k),
        }
    }

    fn router_losses_forward(
        logits: FloatTensor<Self>,
        counts: IntTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> FloatTensor<Self> {
        match (dispatch_rows(&logits), indices(&counts)) {
            (Some(values), Some(counts)) if router_shape(&logits, &counts) => tensor(
                router_losses::forward(&values, &counts, gate, top_k).to_vec(),
                Shape::new([4]),
            ),
            _ => {
                reference::router_losses::router_losses_forward::<Self>(logits, counts, gate, top_k)
            }
        }
    }

    fn router_losses_backward(
        logits: FloatTensor<Self>,
        counts: IntTensor<Self>,
        gate: Gate,
        top_k: usize,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let shape = logits.shape();
        match (dispatch_rows(&logits), indices(&counts), f32_rows(&grad)) {
            (Some(values), Some(counts), Some(grad)) if router_shape(&logits, &counts) => {
                let grad = [grad[0], grad[1]];
                tensor(
                    router_losses::backward(&values, &counts, gate, top_k, grad),
                    shape,
                )
            }
            _ => reference::router_losses::router_losses_backward::<Self>(
                logits, counts, gate, top_k, grad,
            ),
        }
    }

    // Dispatch.

    fn expert_slots(
        experts: IntTensor<Self>,
        n_experts: usize,
        capacity: Option<usize>,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        dispatch::expert_slots(experts, n_experts, capacity)
    }

    fn permute_forward(
        x: FloatTensor<Self>,
        slot: IntTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self> {
        dispatch::permute_forward(x, slot, rows)
    }

    fn permute_backward(
        grad: FloatTensor<Self>,
        slot: IntTensor<Self>,
        tokens: usize,
    ) -> FloatTensor<Self> {
        dispatch::permute_backward(grad, slot, tokens)
    }

    fn combine_forward(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        dispatch::combine_forward(buffer, slot, weights)
    }

    fn combine_backward(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        dispatch::combine_backward(buffer, slot, weights, grad)
    }

    // Grouped matmul.

    fn grouped_matmul_forward(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        dispatch::grouped_matmul_forward(x, weights, counts)
    }

    fn grouped_matmul_backward(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        dispatch::grouped_matmul_backward(x, weights, counts, grad)
    }

    // The experts' FFN.

    fn expert_ffn_forward(
        x: FloatTensor<Self>,
        weights: ExpertFfnWeights<FloatTensor<Self>>,
        counts: &[usize],
    ) -> (FloatTensor<Self>, [FloatTensor<Self>; 2]) {
        expert_ffn::expert_ffn_forward(x, weights, counts)
    }

    fn expert_ffn_backward(
        x: FloatTensor<Self>,
        weights: ExpertFfnWeights<FloatTensor<Self>>,
        counts: &[usize],
        pre_activations: [FloatTensor<Self>; 2],
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, ExpertFfnWeights<FloatTensor<Self>>) {
        expert_ffn::expert_ffn_backward(x, weights, counts, pre_activations, grad)
    }

    // Output head and loss.

    fn linear_cross_entropy_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        linear_cross_entropy::linear_cross_entropy_forward(x, weight, targets)
    }

    fn linear_cross_entropy_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        dlogits: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        linear_cross_entropy::linear_cross_entropy_backward(x, weight, dlogits, grad)
    }

    // Optimiser.

    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        adamw::adamw_step(param, grad, moment_1, moment_2, step)
    }

    // KV cache, devices and threads.

    fn write_positions(
        buffer: FloatTensor<Self>,
        values: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
        write_positions::write_positions(buffer, values, start)
    }

    /// On a thread of rayon's pool (the pool flex's kernels and matmuls run on).
    fn run_compute<R: Send>(work: impl FnOnce() -> R + Send) -> R {
        rayon::scope(|_| work())
    }
}

/// Whether router `logits` have at least one token and one column per expert of `counts`.
fn router_shape(logits: &FlexTensor, counts: &[usize]) -> bool {
    let [tokens, n_experts] = logits.shape().dims::<2>();
    tokens > 0 && n_experts > 0 && n_experts == counts.len()
}
