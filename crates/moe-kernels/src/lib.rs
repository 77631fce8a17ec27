//! Fused operations the `moe` model calls through its backend.
//!
//! [`MoeBackend`] extends burn's `Backend` with the few operations whose plain tensor-op
//! form is slow: the SwiGLU activation, rotary embedding, causal attention and the
//! vocabulary cross-entropy. Every method has a
//! reference implementation built from tensor ops (used by ndarray and the CubeCL
//! backends); burn's CPU backend `flex` overrides the kernels with fused row-parallel
//! loops, and `Autodiff<B>` registers hand-written backward passes so training never
//! records the dozen intermediate tensors of the decomposed forms.

mod autodiff;
#[cfg(feature = "flex")]
mod flex;
pub mod reference;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor};

use reference::float;

/// A backend with the model's fused operations.
///
/// The `*_forward`/`*_backward` methods are kernels on plain tensors; `causal_attention`
/// and `cross_entropy` are the differentiable entry points, which `Autodiff` overrides to
/// call the kernels of its inner backend.
pub trait MoeBackend: Backend {
    /// `softmax(scale * scores)` over the last axis of `scores: [B, H, Sq, Sk]` with a
    /// causal mask: query row `i` sits at key position `Sk - Sq + i` and sees keys up to
    /// and including it.
    fn causal_softmax(scores: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        reference::causal_softmax::<Self>(scores, scale)
    }

    /// Gradient through a softmax over the last axis: `p * (g - sum(p * g))`.
    fn softmax_backward(probs: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::softmax_backward::<Self>(probs, grad)
    }

    /// Per-row cross-entropy of `logits: [N, V]` against `targets: [N]`:
    /// `(nll, logsumexp)`, both `[N]`.
    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::cross_entropy_forward::<Self>(logits, targets)
    }

    /// Gradient of the per-row NLL given its output gradient `grad: [N]`:
    /// `(softmax(logits) - onehot(targets)) * grad`, `[N, V]`.
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        logsumexp: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::cross_entropy_backward::<Self>(logits, logsumexp, targets, grad)
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

    /// Causal scaled-dot-product attention of `q: [B, H, Sq, D]` over `k, v: [B, H, Sk, D]`
    /// (query `i` at key position `Sk - Sq + i`), `[B, H, Sq, D]`.
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::causal_attention_forward::<Self>(q, k, v).0
    }

    /// Per-row negative log-likelihood of `targets: [N]` under `logits: [N, V]`, `[N]`.
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        Self::cross_entropy_forward(logits, targets).0
    }
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

#[cfg(feature = "cubecl")]
impl<R, F, I, BT> MoeBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
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

/// Negative log-likelihood of each row's target, `[N]`; see [`MoeBackend::cross_entropy`].
pub fn cross_entropy<B: MoeBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    float(B::cross_entropy(
        logits.into_primitive().tensor(),
        targets.into_primitive(),
    ))
}
