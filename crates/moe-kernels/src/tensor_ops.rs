//! The fused operations on burn `Tensor`s: each function unwraps its tensors, calls the
//! backend's differentiable entry point and wraps the result (re-exported at the crate root).

use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor};

use crate::reference::float;
use crate::{ExpertFfnWeights, Gate, MoeBackend};

/// RMS normalisation of the last axis of `x`, scaled by `gamma`; see
/// [`MoeBackend::rms_norm_forward`].
pub fn rms_norm<B: MoeBackend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, D> {
    float(B::rms_norm(
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        epsilon,
    ))
}

/// `layer` applied to the last dimension of `x`; see [`MoeBackend::linear_forward`]. The
/// same result as `layer.forward(x)`, through the backend's own kernel where it has one.
pub fn linear<B: MoeBackend, const D: usize>(x: Tensor<B, D>, layer: &Linear<B>) -> Tensor<B, D> {
    let out = project(x, layer.weight.val());
    match &layer.bias {
        Some(bias) => out + bias.val().unsqueeze(),
        None => out,
    }
}

/// `x` times `weight: [d_in, d_out]` over its last axis (a bias-free linear layer by its
/// weight); see [`MoeBackend::linear_forward`].
pub fn project<B: MoeBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    let d_out = weight.dims()[1];
    let out: Tensor<B, 2> = float(<B as MoeBackend>::linear(
        x.reshape([rows, d_in]).into_primitive().tensor(),
        weight.into_primitive().tensor(),
    ));
    let mut out_dims = dims;
    out_dims[D - 1] = d_out;
    out.reshape(out_dims)
}

/// Rotary embedding of `x: [B, S, H, D]`, returned as `[B, H, S, D]`; see
/// [`MoeBackend::rotary_forward`].
pub fn rotary<B: MoeBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    float(B::rotary(
        x.into_primitive().tensor(),
        cos.into_primitive().tensor(),
        sin.into_primitive().tensor(),
    ))
}

/// Causal attention of `q: [B, H, Sq, D]` over `k, v: [B, H, Sk, D]`; see
/// [`MoeBackend::causal_attention`].
pub fn causal_attention<B: MoeBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    float(B::causal_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    ))
}

/// `silu(gate) * up`; see [`MoeBackend::swiglu_forward`].
pub fn swiglu<B: MoeBackend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    float(B::swiglu(
        gate.into_primitive().tensor(),
        up.into_primitive().tensor(),
    ))
}

/// `(weights, experts)`, both `[T, k]`, of the router `logits: [T, E]`; see
/// [`MoeBackend::route_forward`].
pub fn route<B: MoeBackend>(
    logits: Tensor<B, 2>,
    bias: Tensor<B, 1>,
    gate: Gate,
    top_k: usize,
) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let (weights, experts) = B::route(
        logits.into_primitive().tensor(),
        bias.into_primitive().tensor(),
        gate,
        top_k,
    );
    (float(weights), Tensor::from_primitive(experts))
}

/// The router's `[balance, z, entropy, max |logit|]` from its `logits: [T, E]` and the
/// per-expert assignment `counts: [E]`; see [`MoeBackend::router_losses_forward`].
pub fn router_losses<B: MoeBackend>(
    logits: Tensor<B, 2>,
    counts: Tensor<B, 1, Int>,
    gate: Gate,
    top_k: usize,
) -> Tensor<B, 1> {
    float(B::router_losses(
        logits.into_primitive().tensor(),
        counts.into_primitive(),
        gate,
        top_k,
    ))
}

/// `(slot, counts)` of the routed assignments `experts: [A]`; see
/// [`MoeBackend::expert_slots`].
pub fn expert_slots<B: MoeBackend>(
    experts: Tensor<B, 1, Int>,
    n_experts: usize,
    capacity: Option<usize>,
) -> (Tensor<B, 1, Int>, Tensor<B, 1, Int>) {
    let (slot, counts) = B::expert_slots(experts.into_primitive(), n_experts, capacity);
    (Tensor::from_primitive(slot), Tensor::from_primitive(counts))
}

/// Token rows `x: [T, d]` gathered into the expert-major buffer `[rows, d]`; see
/// [`MoeBackend::permute_forward`].
pub fn permute<B: MoeBackend>(
    x: Tensor<B, 2>,
    slot: Tensor<B, 1, Int>,
    rows: usize,
) -> Tensor<B, 2> {
    float(B::permute(
        x.into_primitive().tensor(),
        slot.into_primitive(),
        rows,
    ))
}

/// Weighted sum of each token's expert outputs back in token order, `[T, d]`; see
/// [`MoeBackend::combine_forward`].
pub fn combine<B: MoeBackend>(
    buffer: Tensor<B, 2>,
    slot: Tensor<B, 1, Int>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 2> {
    float(B::combine(
        buffer.into_primitive().tensor(),
        slot.into_primitive(),
        weights.into_primitive().tensor(),
    ))
}

/// Segment `e` of the packed rows `x` times `weights[e]`; see
/// [`MoeBackend::grouped_matmul_forward`].
pub fn grouped_matmul<B: MoeBackend>(
    x: Tensor<B, 2>,
    weights: Tensor<B, 3>,
    counts: &[usize],
) -> Tensor<B, 2> {
    float(B::grouped_matmul(
        x.into_primitive().tensor(),
        weights.into_primitive().tensor(),
        counts,
    ))
}

/// The experts' SwiGLU FFN over the packed rows `x`; see [`MoeBackend::expert_ffn_forward`].
pub fn expert_ffn<B: MoeBackend>(
    x: Tensor<B, 2>,
    weights: ExpertFfnWeights<Tensor<B, 3>>,
    counts: &[usize],
) -> Tensor<B, 2> {
    let weights = weights.map(|w| w.into_primitive().tensor());
    float(B::expert_ffn(x.into_primitive().tensor(), weights, counts))
}

/// Negative log-likelihood of each row's target under the logits `x weight`, `[N]`; see
/// [`MoeBackend::linear_cross_entropy_forward`].
pub fn linear_cross_entropy<B: MoeBackend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    float(B::linear_cross_entropy(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        targets.into_primitive(),
    ))
}

/// `x` copied to `device`, differentiably; see [`MoeBackend::transfer_forward`].
pub fn transfer<B: MoeBackend, const D: usize>(
    x: Tensor<B, D>,
    device: &Device<B>,
) -> Tensor<B, D> {
    float(B::transfer(x.into_primitive().tensor(), device))
}

/// `buffer` (`[B, H, L, D]`) with positions `start..start + S` of its third dimension
/// replaced by `values` (`[B, H, S, D]`), in place where the backend can; see
/// [`MoeBackend::write_positions`].
pub fn write_positions<B: MoeBackend>(
    buffer: Tensor<B, 4>,
    values: Tensor<B, 4>,
    start: usize,
) -> Tensor<B, 4> {
    let [buffer, values] = [buffer, values].map(|t| t.into_primitive().tensor());
    float(B::write_positions(buffer, values, start))
}

/// Runs `work`, a long run of tensor operations on one thread (a training loop, a
/// generation), where backend `B` executes them fastest. On flex that is a thread of
/// rayon's pool: each parallel kernel then splits its work with the calling thread instead
/// of handing it to the pool and sleeping until it is done, and idle pool threads do not
/// spin beside the caller on a machine with few cores. `work` must not block waiting on
/// other threads' tensor work: it holds one of the pool's threads while it runs.
pub fn run_compute<B: MoeBackend, R: Send>(work: impl FnOnce() -> R + Send) -> R {
    B::run_compute(work)
}
