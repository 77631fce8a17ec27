//! SwiGLU feed-forward networks: a dense one, and E experts stored as stacked weights so
//! they run as one batched matmul.

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::dispatch::BufferLayout;
use moe_kernels::{MoeBackend, grouped_matmul, swiglu};

/// Dense SwiGLU: `w2(silu(w1 x) * w3 x)`, no biases.
#[derive(Module, Debug)]
pub struct SwiGlu<B: Backend> {
    /// Gate projection `d -> f`.
    pub w1: Linear<B>,
    /// Down projection `f -> d`.
    pub w2: Linear<B>,
    /// Up projection `d -> f`.
    pub w3: Linear<B>,
}

fn linear<B: Backend>(d_in: usize, d_out: usize, std: f64, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

impl<B: Backend> SwiGlu<B> {
    /// A SwiGLU of width `ffn_dim`; `out_std` initialises the down projection.
    pub fn new(d_model: usize, ffn_dim: usize, std: f64, out_std: f64, device: &B::Device) -> Self {
        Self {
            w1: linear(d_model, ffn_dim, std, device),
            w2: linear(ffn_dim, d_model, out_std, device),
            w3: linear(d_model, ffn_dim, std, device),
        }
    }

    /// Applies the FFN over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>
    where
        B: MoeBackend,
    {
        self.w2
            .forward(swiglu(self.w1.forward(x.clone()), self.w3.forward(x)))
    }
}

/// `E` SwiGLU experts with weights `w1, w3: [E, d, f]` and `w2: [E, f, d]`.
#[derive(Module, Debug)]
pub struct Experts<B: Backend> {
    /// Gate projections, `[E, d, f]`.
    pub w1: Param<Tensor<B, 3>>,
    /// Down projections, `[E, f, d]`.
    pub w2: Param<Tensor<B, 3>>,
    /// Up projections, `[E, d, f]`.
    pub w3: Param<Tensor<B, 3>>,
}

impl<B: Backend> Experts<B> {
    /// `n_experts` experts of width `ffn_dim`, normal-initialised.
    pub fn new(
        n_experts: usize,
        d_model: usize,
        ffn_dim: usize,
        std: f64,
        out_std: f64,
        device: &B::Device,
    ) -> Self {
        let init = |shape: [usize; 3], std: f64| {
            Initializer::Normal { mean: 0.0, std }.init(shape, device)
        };
        Self {
            w1: init([n_experts, d_model, ffn_dim], std),
            w2: init([n_experts, ffn_dim, d_model], out_std),
            w3: init([n_experts, d_model, ffn_dim], std),
        }
    }

    /// Runs every expert on its own rows of the expert-major buffer `[rows, d]`: one
    /// batched matmul over the padded layout, a grouped matmul over the segments of the
    /// packed layout.
    pub fn forward(&self, x: Tensor<B, 2>, layout: &BufferLayout) -> Tensor<B, 2>
    where
        B: MoeBackend,
    {
        let [rows, d] = x.dims();
        match layout {
            BufferLayout::Padded { capacity } => {
                let [n_experts, ..] = self.w1.dims();
                let x = x.reshape([n_experts, *capacity, d]);
                swiglu_ffn(x, self.w1.val(), self.w3.val(), self.w2.val()).reshape([rows, d])
            }
            BufferLayout::Packed { counts } => {
                let gate = grouped_matmul(x.clone(), self.w1.val(), counts);
                let up = grouped_matmul(x, self.w3.val(), counts);
                grouped_matmul(swiglu(gate, up), self.w2.val(), counts)
            }
        }
    }
}

/// `swiglu(x w1, x w3) w2`, batched over the leading axis.
fn swiglu_ffn<B: MoeBackend>(
    x: Tensor<B, 3>,
    w1: Tensor<B, 3>,
    w3: Tensor<B, 3>,
    w2: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let gate = x.clone().matmul(w1);
    let up = x.matmul(w3);
    swiglu(gate, up).matmul(w2)
}
