//! Fused operations the `moe` model calls through its backend.
//!
//! [`MoeBackend`] extends burn's `Backend` with the few operations whose plain tensor-op
//! form is slow: the SwiGLU activation, RMS normalisation, rotary embedding, causal
//! attention and the vocabulary cross-entropy. Every method has a
//! reference implementation built from tensor ops (used by ndarray and the CubeCL
//! backends); burn's CPU backend `flex` overrides the kernels with fused row-parallel
//! loops, and `Autodiff<B>` registers hand-written backward passes so training never
//! records the dozen intermediate tensors of the decomposed forms. The routing and token
//! dispatch of the MoE layer are operations of the same kind.
//!
//! An operation `op` lives in: its group of [`MoeBackend`] methods, its function on
//! tensors (crate root), `reference/op.rs`, `flex/op.rs` where flex has kernels for it,
//! `cube/` (routing and dispatch), and its backward node in `autodiff.rs`.

mod autodiff;
#[cfg(feature = "cubecl")]
mod cube;
#[cfg(feature = "flex")]
mod flex;
pub mod reference;
mod tensor_ops;

use burn::tensor::Device;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};

use serde::{Deserialize, Serialize};

pub use tensor_ops::*;

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

/// The stacked weights of the experts' SwiGLU FFN, by role (Mixtral's names in brackets):
/// expert `e` computes `(silu(x gate[e]) * (x up[e])) down[e]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertFfnWeights<T> {
    /// Gate projection `[E, d, f]` (Mixtral's `w1`), the input of the SiLU.
    pub gate: T,
    /// Up projection `[E, d, f]` (Mixtral's `w3`), multiplied by the activated gate.
    pub up: T,
    /// Down projection `[E, f, d]` (Mixtral's `w2`), back to the model width.
    pub down: T,
}

impl<T> ExpertFfnWeights<T> {
    /// The three weights, each through `f`.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> ExpertFfnWeights<U> {
        ExpertFfnWeights {
            gate: f(self.gate),
            up: f(self.up),
            down: f(self.down),
        }
    }

    /// The three weights by reference.
    pub fn each_ref(&self) -> ExpertFfnWeights<&T> {
        ExpertFfnWeights {
            gate: &self.gate,
            up: &self.up,
            down: &self.down,
        }
    }
}

/// A backend with the model's fused operations.
///
/// The methods come in groups, one per operation: the `*_forward`/`*_backward` kernels on
/// plain tensors, then the differentiable entry point without a suffix (`swiglu`,
/// `causal_attention`, ...), which `Autodiff` overrides to call the kernels of its inner
/// backend. Every method has a tensor-op default (see [`reference`]): a backend overrides
/// only the kernels it specialises.
pub trait MoeBackend: Backend {
    // RMS normalisation.

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

    // Linear layer.

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

    /// Differentiable linear layer; see [`MoeBackend::linear_forward`].
    fn linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::linear_forward(x, w)
    }

    // Rotary embedding.

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

    // Causal attention.

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

    // SwiGLU activation.

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

    // Routing.

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

    // Router losses.

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

    // Dispatch: the counting sort, the permute into the expert-major buffer and the combine back.

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

    /// Differentiable permute; see [`MoeBackend::permute_forward`]. Slots carry no gradient.
    fn permute(x: FloatTensor<Self>, slot: IntTensor<Self>, rows: usize) -> FloatTensor<Self> {
        Self::permute_forward(x, slot, rows)
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

    /// Differentiable combine; see [`MoeBackend::combine_forward`].
    fn combine(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::combine_forward(buffer, slot, weights)
    }

    // Grouped matmul.

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

    /// Differentiable grouped matmul; see [`MoeBackend::grouped_matmul_forward`].
    fn grouped_matmul(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        Self::grouped_matmul_forward(x, weights, counts)
    }

    // The experts' SwiGLU FFN.

    /// The experts' SwiGLU FFN over packed segments: segment `e` of `x: [rows, d]`
    /// (`counts[e]` rows) through expert `e`, `swiglu(x gate[e], x up[e]) down[e]` (see
    /// [`ExpertFfnWeights`]). Returns the output `[rows, d]` and `[gate, up]`, the
    /// pre-activations `x gate[e]` and `x up[e]` (`[rows, f]`) that the backward reads. By
    /// default the backend's grouped matmuls and SwiGLU one after another.
    fn expert_ffn_forward(
        x: FloatTensor<Self>,
        weights: ExpertFfnWeights<FloatTensor<Self>>,
        counts: &[usize],
    ) -> (FloatTensor<Self>, [FloatTensor<Self>; 2]) {
        reference::expert_ffn_forward::<Self>(x, weights, counts)
    }

    /// Gradients `(d_x, d_weights)` of [`MoeBackend::expert_ffn_forward`] given its
    /// `[gate, up]` and the output's gradient.
    fn expert_ffn_backward(
        x: FloatTensor<Self>,
        weights: ExpertFfnWeights<FloatTensor<Self>>,
        counts: &[usize],
        pre_activations: [FloatTensor<Self>; 2],
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, ExpertFfnWeights<FloatTensor<Self>>) {
        reference::expert_ffn_backward::<Self>(x, weights, counts, pre_activations, grad)
    }

    /// Differentiable experts' FFN; see [`MoeBackend::expert_ffn_forward`].
    fn expert_ffn(
        x: FloatTensor<Self>,
        weights: ExpertFfnWeights<FloatTensor<Self>>,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        Self::expert_ffn_forward(x, weights, counts).0
    }

    // Output head and loss.

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

    /// Per-row negative log-likelihood of `targets: [N]` under the logits `x weight`
    /// (`x: [N, d]`, `weight: [d, V]`), `[N]`.
    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::linear_cross_entropy_forward(x, weight, targets).0
    }

    // Optimiser.

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

    // Devices, KV cache and threads (not differentiable except `transfer`).

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
