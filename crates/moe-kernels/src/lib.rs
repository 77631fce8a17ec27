//! Fused operations the `moe` model calls through its backend.
//!
//! [`MoeBackend`] extends burn's `Backend` with the few operations whose plain tensor-op
//! form is slow: the SwiGLU activation, RMS normalisation, rotary embedding, causal
//! attention and the vocabulary cross-entropy. Every method has a
//! reference implementation built from tensor ops (used by ndarray and the CubeCL
//! backends); burn's CPU backend `flex` overrides the kernels with fused row-parallel
//! loops, and `Autodiff<B>` registers hand-written backward passes so training never
//! records the dozen intermediate tensors of the decomposed forms.

mod autodiff;
#[cfg(feature = "cubecl")]
mod cube;
#[cfg(feature = "flex")]
mod flex;
pub mod reference;

use burn::nn::Linear;
use burn::tensor::Device;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor};

use reference::float;
use serde::{Deserialize, Serialize};

/// How the router turns its logits into combine weights for the chosen experts.
///
/// One type for the config file, the model and the kernels. In TOML it is a table tagged
/// by `kind` holding only that gate's settings, e.g. `router = { kind = "sigmoid",
/// scale = 2.5 }`; a bare `router = "sigmoid"` takes the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Gate {
    /// Softmax over all experts, top-k by probability; the weights are the chosen
    /// probabilities, renormalised to sum to one if `renormalize` (Mixtral).
    SoftmaxTopk {
        /// Divide the chosen probabilities by their sum.
        #[serde(default = "yes")]
        renormalize: bool,
    },
    /// Top-k by logit, then a softmax over the chosen logits.
    TopkSoftmax,
    /// Sigmoid scores, top-k by score; the weights are the chosen scores over their sum,
    /// times `scale` (DeepSeek-V3).
    Sigmoid {
        /// Route scale multiplying the normalised weights.
        #[serde(default = "one")]
        scale: f64,
    },
}

impl Default for Gate {
    /// Mixtral's gate.
    fn default() -> Self {
        Gate::SoftmaxTopk { renormalize: true }
    }
}

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

/// One AdamW step's scalars: the hyper-parameters, the learning rate and the step number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// Added to the root of the second moment.
    pub epsilon: f32,
    /// Decoupled weight decay (multiplied by `lr`).
    pub weight_decay: f32,
    /// This step's number, from 1: the bias corrections depend on it.
    pub time: i32,
}

/// A backend with the model's fused operations.
///
/// The `*_forward`/`*_backward` methods are kernels on plain tensors; `causal_attention`,
/// `linear_cross_entropy` and the other methods without a suffix are the differentiable
/// entry points, which `Autodiff` overrides to call the kernels of its inner backend.
pub trait MoeBackend: Backend {
    /// The output head and its loss in one: per-row cross-entropy of the logits
    /// `x weight` (`x: [N, d]`, `weight: [d, V]`) against `targets: [N]`. Returns
    /// `(nll, dlogits)`: the negative log-likelihoods `[N]` and
    /// `softmax(x weight) - onehot(targets)`, `[N, V]`, the gradient of their sum with
    /// respect to the logits, which is all the backward needs of them (so the logits
    /// themselves are never kept).
    fn linear_cross_entropy_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::linear_cross_entropy_forward::<Self>(x, weight, targets)
    }

    /// `(d_x, d_weight)` of the per-row NLL given its output gradient `grad: [N]`:
    /// `d_x = diag(grad) dlogits weight^T`, `d_weight = (diag(grad) x)^T dlogits`.
    fn linear_cross_entropy_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        dlogits: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::linear_cross_entropy_backward::<Self>(x, weight, dlogits, grad)
    }

    /// SwiGLU activation `silu(gate) * up`, elementwise over equal shapes.
    fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::swiglu_forward::<Self>(gate, up)
    }

    /// Gradients `(d_gate, d_up)` of [`MoeBackend::swiglu_forward`] given the output's.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::swiglu_backward::<Self>(gate, up, grad)
    }

    /// Differentiable SwiGLU activation; see [`MoeBackend::swiglu_forward`].
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::swiglu_forward(gate, up)
    }

    /// RMS normalisation of the rows of `x` (its last axis, `d`) scaled by `gamma: [d]`:
    /// `x / sqrt(mean(x^2) + epsilon) * gamma`, burn's `RmsNorm` in one pass.
    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        reference::rms_norm_forward::<Self>(x, gamma, epsilon)
    }

    /// Gradients `(d_x, d_gamma)` of [`MoeBackend::rms_norm_forward`] given the output's.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::rms_norm_backward::<Self>(x, gamma, epsilon, grad)
    }

    /// Differentiable RMS normalisation; see [`MoeBackend::rms_norm_forward`].
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        Self::rms_norm_forward(x, gamma, epsilon)
    }

    /// Rotary embedding of `x: [B, S, H, D]` (half-split layout) with `cos, sin: [S, D]`,
    /// returned head-major as `[B, H, S, D]`, ready for attention.
    fn rotary_forward(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::rotary_forward::<Self>(x, cos, sin)
    }

    /// Gradient of [`MoeBackend::rotary_forward`]: rotates `grad: [B, H, S, D]` back by
    /// the same angles, `[B, S, H, D]`.
    fn rotary_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::rotary_backward::<Self>(grad, cos, sin)
    }

    /// Differentiable rotary embedding; see [`MoeBackend::rotary_forward`]. The angle
    /// tables are constants.
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::rotary_forward(x, cos, sin)
    }

    /// Causal attention's forward kernel: `(output, probs)`, the attention output
    /// `[B, H, Sq, D]` and the probabilities `[B, H, Sq, Sk]` its backward needs.
    fn causal_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::causal_attention_forward::<Self>(q, k, v)
    }

    /// Causal attention's backward kernel: `(dq, dk, dv)` from the inputs, the forward's
    /// probabilities and the output's gradient.
    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::causal_attention_backward::<Self>(q, k, v, probs, grad)
    }

    /// Causal scaled-dot-product attention of `q: [B, H, Sq, D]` over `k, v: [B, H, Sk, D]`
    /// (query `i` at key position `Sk - Sq + i`), `[B, H, Sq, D]`.
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::causal_attention_forward(q, k, v).0
    }

    /// Per-row negative log-likelihood of `targets: [N]` under the logits `x weight`
    /// (`x: [N, d]`, `weight: [d, V]`), `[N]`.
    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::linear_cross_entropy_forward(x, weight, targets).0
    }

    /// Routing of `logits: [T, E]`: `(weights, experts)`, both `[T, k]`, the `top_k`
    /// experts of each token by score plus the selection-only `bias: [E]` (best first) and
    /// their combine weights under `gate`; see [`reference::routing::route_forward`].
    fn route_forward(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        reference::routing::route_forward::<Self>(logits, bias, gate, top_k)
    }

    /// Gradient of the logits `[T, E]` given the weights' gradient `grad: [T, k]`.
    fn route_backward(
        logits: FloatTensor<Self>,
        experts: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        gate: Gate,
    ) -> FloatTensor<Self> {
        reference::routing::route_backward::<Self>(logits, experts, weights, grad, gate)
    }

    /// Differentiable routing; see [`MoeBackend::route_forward`]. The bias and the chosen
    /// experts carry no gradient.
    fn route(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        Self::route_forward(logits, bias, gate, top_k)
    }

    /// The router's loss terms and statistics in one: `[balance, z, entropy, max |logit|]`,
    /// `[4]`, of `logits: [T, E]` whose routing put `counts: [E]` assignments on each
    /// expert, with the distribution `gate` implies; see
    /// [`reference::router_losses::router_losses_forward`].
    fn router_losses_forward(
        logits: FloatTensor<Self>,
        counts: IntTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> FloatTensor<Self> {
        reference::router_losses::router_losses_forward::<Self>(logits, counts, gate, top_k)
    }

    /// Gradient of the logits `[T, E]` given the gradient `grad: [4]` of the losses; the
    /// two statistics pass none.
    fn router_losses_backward(
        logits: FloatTensor<Self>,
        counts: IntTensor<Self>,
        gate: Gate,
        top_k: usize,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::router_losses::router_losses_backward::<Self>(logits, counts, gate, top_k, grad)
    }

    /// Differentiable router losses; see [`MoeBackend::router_losses_forward`]. The
    /// counts carry no gradient.
    fn router_losses(
        logits: FloatTensor<Self>,
        counts: IntTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> FloatTensor<Self> {
        Self::router_losses_forward(logits, counts, gate, top_k)
    }

    /// Counting sort of the routed assignments `experts: [A]` (token-major, so stable in
    /// token order): `(slot, counts)`, each assignment's row in the expert-major buffer and
    /// the per-expert counts before dropping. See [`reference::dispatch::expert_slots`] for
    /// the two layouts (capacity-padded or packed).
    fn expert_slots(
        experts: IntTensor<Self>,
        n_experts: usize,
        capacity: Option<usize>,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        reference::dispatch::expert_slots::<Self>(experts, n_experts, capacity)
    }

    /// Gathers token rows `x: [T, d]` into the expert-major buffer `[rows, d]` (each token
    /// at the slots of its `A / T` assignments; unfilled rows zero).
    fn permute_forward(
        x: FloatTensor<Self>,
        slot: IntTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self> {
        reference::dispatch::permute_forward::<Self>(x, slot, rows)
    }

    /// Gradient of [`MoeBackend::permute_forward`]: `[T, d]`, each token's rows summed.
    fn permute_backward(
        grad: FloatTensor<Self>,
        slot: IntTensor<Self>,
        tokens: usize,
    ) -> FloatTensor<Self> {
        reference::dispatch::permute_backward::<Self>(grad, slot, tokens)
    }

    /// Weighted sum of each token's rows of `buffer: [rows, d]` with `weights: [T, k]`,
    /// back in token order, `[T, d]`; dropped assignments contribute zero.
    fn combine_forward(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::dispatch::combine_forward::<Self>(buffer, slot, weights)
    }

    /// Gradients `(d_buffer, d_weights)` of [`MoeBackend::combine_forward`].
    fn combine_backward(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::dispatch::combine_backward::<Self>(buffer, slot, weights, grad)
    }

    /// A bias-free linear layer, `x: [rows, d_in]` times `w: [d_in, d_out]`.
    fn linear_forward(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::linear_forward::<Self>(x, w)
    }

    /// Gradients `(d_x, d_w)` of [`MoeBackend::linear_forward`].
    fn linear_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::linear_backward::<Self>(x, w, grad)
    }

    /// Grouped matmul: segment `e` of the packed rows `x: [rows, d_in]` (`counts[e]` rows)
    /// times `weights[e]` of `weights: [E, d_in, d_out]`, `[rows, d_out]`.
    fn grouped_matmul_forward(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        reference::dispatch::grouped_matmul_forward::<Self>(x, weights, counts)
    }

    /// Gradients `(d_x, d_weights)` of [`MoeBackend::grouped_matmul_forward`].
    fn grouped_matmul_backward(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::dispatch::grouped_matmul_backward::<Self>(x, weights, counts, grad)
    }

    /// The experts' SwiGLU FFN over packed segments: segment `e` of `x: [rows, d]`
    /// (`counts[e]` rows) through expert `e`, `swiglu(x w1[e], x w3[e]) w2[e]`, with
    /// `weights = [w1, w3, w2]`: gate and up projections `[E, d, f]`, down projection
    /// `[E, f, d]`. Returns the output `[rows, d]` and `[gate, up]`, the pre-activations
    /// `x w1[e]` and `x w3[e]` (`[rows, f]`) that the backward reads. By default the
    /// backend's grouped matmuls and SwiGLU one after another.
    fn expert_ffn_forward(
        x: FloatTensor<Self>,
        weights: [FloatTensor<Self>; 3],
        counts: &[usize],
    ) -> (FloatTensor<Self>, [FloatTensor<Self>; 2]) {
        reference::dispatch::expert_ffn_forward::<Self>(x, weights, counts)
    }

    /// Gradients `(d_x, [d_w1, d_w3, d_w2])` of [`MoeBackend::expert_ffn_forward`] given
    /// its `[gate, up]` and the output's gradient.
    fn expert_ffn_backward(
        x: FloatTensor<Self>,
        weights: [FloatTensor<Self>; 3],
        counts: &[usize],
        pre_activations: [FloatTensor<Self>; 2],
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, [FloatTensor<Self>; 3]) {
        reference::dispatch::expert_ffn_backward::<Self>(x, weights, counts, pre_activations, grad)
    }

    /// Differentiable experts' FFN; see [`MoeBackend::expert_ffn_forward`].
    fn expert_ffn(
        x: FloatTensor<Self>,
        weights: [FloatTensor<Self>; 3],
        counts: &[usize],
    ) -> FloatTensor<Self> {
        Self::expert_ffn_forward(x, weights, counts).0
    }

    /// Differentiable permute; see [`MoeBackend::permute_forward`]. Slots carry no gradient.
    fn permute(x: FloatTensor<Self>, slot: IntTensor<Self>, rows: usize) -> FloatTensor<Self> {
        Self::permute_forward(x, slot, rows)
    }

    /// Differentiable combine; see [`MoeBackend::combine_forward`].
    fn combine(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::combine_forward(buffer, slot, weights)
    }

    /// One AdamW step of `param` given its gradient and moments (zeros before the first
    /// step): the new `(param, moment_1, moment_2)`, each shaped like `param`. With
    /// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`, `m^ = m / (1 - b1^t)` and
    /// `v^ = v / (1 - b2^t)`: `param (1 - lr wd) - lr m^ / (sqrt(v^) + eps)`, the f32
    /// operations of burn's `AdamW` in the same order.
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::adamw_step::<Self>(param, grad, moment_1, moment_2, step)
    }

    /// Copies `x` to `device` (expert placement sends tokens to their expert's device and
    /// back). The backend's own `float_to_device`, except where that cannot cross devices.
    fn transfer_forward(x: FloatTensor<Self>, device: &Device<Self>) -> FloatTensor<Self> {
        Self::float_to_device(x, device)
    }

    /// Differentiable [`MoeBackend::transfer_forward`]: the gradient travels back.
    fn transfer(x: FloatTensor<Self>, device: &Device<Self>) -> FloatTensor<Self> {
        Self::transfer_forward(x, device)
    }

    /// `buffer` (`[B, H, L, D]`) with positions `start..start + S` of its third dimension
    /// replaced by `values` (`[B, H, S, D]`): a KV cache storing a step's keys or values.
    /// By default burn's `slice_assign`, which on flex copies the whole buffer; flex
    /// writes in place when nothing else holds the buffer. Not differentiable.
    fn write_positions(
        buffer: FloatTensor<Self>,
        values: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
        reference::write_positions::<Self>(buffer, values, start)
    }

    /// Runs `work` (a whole training loop or generation) where the backend's CPU threads
    /// serve it best; see [`run_compute`]. By default, on this thread.
    fn run_compute<R: Send>(work: impl FnOnce() -> R + Send) -> R {
        work()
    }

    /// Runs `work`, tensor operations too small to split over threads, on one thread;
    /// see [`run_serial`]. By default, on this thread.
    fn run_serial<R: Send>(work: impl FnOnce() -> R + Send) -> R {
        work()
    }

    /// Differentiable linear layer; see [`MoeBackend::linear_forward`].
    fn linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::linear_forward(x, w)
    }

    /// Differentiable grouped matmul; see [`MoeBackend::grouped_matmul_forward`].
    fn grouped_matmul(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        Self::grouped_matmul_forward(x, weights, counts)
    }
}

thread_local! {
    static REFERENCE_DISPATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the dispatch operations on their tensor-op reference even where a backend
/// has kernels (on this thread): to compare the two paths, in tests and benchmarks.
pub fn with_reference_dispatch<T>(f: impl FnOnce() -> T) -> T {
    /// Restores the previous setting when dropped, also if `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            REFERENCE_DISPATCH.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(REFERENCE_DISPATCH.with(|flag| flag.replace(true)));
    f()
}

/// Whether [`with_reference_dispatch`] is in force on this thread.
pub fn reference_dispatch() -> bool {
    REFERENCE_DISPATCH.with(|flag| flag.get())
}

/// An autodiff backend whose inner backend also has the fused operations, as training
/// (autodiff forward, plain evaluation) needs.
pub trait MoeAutodiffBackend: AutodiffBackend<InnerBackend: MoeBackend> + MoeBackend {}

impl<B> MoeAutodiffBackend for B where B: AutodiffBackend<InnerBackend: MoeBackend> + MoeBackend {}

#[cfg(feature = "ndarray")]
impl<E, I, Q> MoeBackend for burn::backend::NdArray<E, I, Q>
where
    E: burn::backend::ndarray::FloatNdArrayElement,
    I: burn::backend::ndarray::IntNdArrayElement,
    Q: burn::backend::ndarray::QuantElement,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<E>>,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<I>>,
{
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

/// `layer` applied to the last dimension of `x`; see [`MoeBackend::linear_forward`]. The
/// same result as `layer.forward(x)`, through the backend's own kernel where it has one.
pub fn linear<B: MoeBackend, const D: usize>(x: Tensor<B, D>, layer: &Linear<B>) -> Tensor<B, D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    let weight = layer.weight.val();
    let d_out = weight.dims()[1];
    let out: Tensor<B, 2> = float(<B as MoeBackend>::linear(
        x.reshape([rows, d_in]).into_primitive().tensor(),
        weight.into_primitive().tensor(),
    ));
    let mut out_dims = dims;
    out_dims[D - 1] = d_out;
    let out = out.reshape(out_dims);
    match &layer.bias {
        Some(bias) => out + bias.val().unsqueeze(),
        None => out,
    }
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

/// The experts' SwiGLU FFN over the packed rows `x` with `weights = [w1, w3, w2]`; see
/// [`MoeBackend::expert_ffn_forward`].
pub fn expert_ffn<B: MoeBackend>(
    x: Tensor<B, 2>,
    [w1, w3, w2]: [Tensor<B, 3>; 3],
    counts: &[usize],
) -> Tensor<B, 2> {
    let weights = [w1, w3, w2].map(|w| w.into_primitive().tensor());
    float(B::expert_ffn(x.into_primitive().tensor(), weights, counts))
}

/// Runs `work`, a long run of tensor operations on one thread (a training loop, a
/// generation), where backend `B` executes them fastest. On flex that is a thread of
/// rayon's pool: each parallel kernel then splits its work with the calling thread instead
/// of handing it to the pool and sleeping until it is done, and idle pool threads do not
/// spin beside the caller on a machine with few cores (a training step measured 3349 ->
/// 3871 tokens/s on 2 cores). `work` must not block waiting on other threads' tensor
/// work: it holds one of the pool's threads while it runs.
pub fn run_compute<B: MoeBackend, R: Send>(work: impl FnOnce() -> R + Send) -> R {
    B::run_compute(work)
}

/// Runs `work`, tensor operations each too small to be worth splitting over threads (a
/// decoding step of a few tokens), on one thread of backend `B`. On flex, a pool of one
/// thread: every kernel and matmul inside then runs serially, where handing half of
/// each to a sleeping thread costs more than it saves.
pub fn run_serial<B: MoeBackend, R: Send>(work: impl FnOnce() -> R + Send) -> R {
    B::run_serial(work)
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

/// `x` copied to `device`, differentiably; see [`MoeBackend::transfer_forward`].
pub fn transfer<B: MoeBackend, const D: usize>(
    x: Tensor<B, D>,
    device: &Device<B>,
) -> Tensor<B, D> {
    float(B::transfer(x.into_primitive().tensor(), device))
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
