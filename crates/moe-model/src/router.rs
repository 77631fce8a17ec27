//! Router: logits in f32, expert scores, top-k selection and combine weights.

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};

use moe_kernels::{Gate, MoeBackend, linear};

use crate::config::MoeConfig;

/// The routing decision for a flat batch of `T` tokens.
#[derive(Debug, Clone)]
pub struct Routing<B: Backend> {
    /// Raw router logits, `[T, E]`; the balancing loss and the entropy measure the
    /// distribution they imply ([`moe_kernels::reference::router_losses::router_probs`]).
    pub logits: Tensor<B, 2>,
    /// Combine weight of each chosen expert, `[T, k]`.
    pub weights: Tensor<B, 2>,
    /// Chosen experts, best first, `[T, k]`.
    pub experts: Tensor<B, 2, Int>,
}

/// Linear router with an optional selection-only bias (aux-loss-free balancing).
#[derive(Module, Debug)]
pub struct Router<B: Backend> {
    /// Gate projection `d_model -> n_experts`, no bias.
    pub gate: Linear<B>,
    /// Per-expert bias added to the scores for selection only; never trained by gradient.
    pub expert_bias: Param<Tensor<B, 1>>,
    #[module(skip)]
    config: MoeConfig,
}

impl<B: Backend> Router<B> {
    /// A router for `config` over inputs of width `d_model`.
    pub fn new(d_model: usize, config: &MoeConfig, init_std: f64, device: &B::Device) -> Self {
        let gate = LinearConfig::new(d_model, config.n_experts)
            .with_bias(false)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: init_std,
            })
            .init(device);
        let expert_bias =
            Param::from_tensor(Tensor::zeros([config.n_experts], device)).set_require_grad(false);
        Self {
            gate,
            expert_bias,
            config: config.clone(),
        }
    }

    /// How the chosen experts' weights come from the logits.
    pub fn gate_kind(&self) -> Gate {
        self.config.router
    }

    /// Routes `x` (`[T, d]`). Jitter applies only when autodiff is on (training).
    pub fn forward(&self, x: Tensor<B, 2>) -> Routing<B>
    where
        B: MoeBackend,
    {
        let device = x.device();
        let x = if self.config.jitter > 0.0 && B::ad_enabled(&device) {
            let eps = self.config.jitter;
            let noise = Tensor::random(
                x.shape(),
                Distribution::Uniform(1.0 - eps, 1.0 + eps),
                &device,
            );
            x * noise
        } else {
            x
        };
        let logits = linear(x, &self.gate);
        let (weights, experts) = moe_kernels::route(
            logits.clone(),
            self.expert_bias.val().detach(),
            self.gate_kind(),
            self.config.top_k,
        );
        Routing {
            logits,
            weights,
            experts,
        }
    }

    /// Aux-loss-free balancing step: `b_i += rate * sign(mean_j c_j - c_i)` from this step's
    /// per-expert assignment counts `c`.
    pub fn update_bias(mut self, counts: Tensor<B, 1>) -> Self {
        let rate = self.config.bias_update_rate;
        if rate > 0.0 {
            let counts = counts.detach();
            let delta = (counts.clone().mean().expand(counts.shape()) - counts).sign() * rate;
            self.expert_bias = self
                .expert_bias
                .map(|bias| (bias.detach() + delta).set_require_grad(false));
        }
        self
    }
}
