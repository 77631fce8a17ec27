//! The MoE feed-forward block: route, dispatch, run the experts together, combine.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::config::MoeConfig;
use crate::dispatch;
use crate::experts::{Experts, SwiGlu};
use crate::router::{Router, Routing};
use moe_kernels::{MoeBackend, router_losses};

/// Routing statistics of one MoE layer for one forward pass, kept on the device until read.
#[derive(Debug, Clone)]
pub struct RouterStats<B: Backend> {
    /// Assignments per expert before dropping, `[E]`.
    pub counts: Tensor<B, 1, Int>,
    /// Dropped assignments, `[1]`.
    pub dropped: Tensor<B, 1, Int>,
    /// Routed assignments in this pass (`T * k`).
    pub assignments: usize,
    /// Mean router entropy in nats, `[1]`.
    pub entropy: Tensor<B, 1>,
    /// Largest absolute router logit, `[1]`.
    pub max_logit: Tensor<B, 1>,
}

/// Output of an MoE layer: the mixed expert output and the router's loss terms.
#[derive(Debug, Clone)]
pub struct MoeOutput<B: Backend> {
    /// `[T, d]`, zero for tokens whose assignments were all dropped (the residual carries them).
    pub output: Tensor<B, 2>,
    /// Unweighted load-balancing term (1 when balanced), `[1]`.
    pub balance_loss: Tensor<B, 1>,
    /// Unweighted router z-loss, `[1]`.
    pub z_loss: Tensor<B, 1>,
    /// Routing statistics.
    pub stats: RouterStats<B>,
}

/// Router + E SwiGLU experts (+ optional shared experts).
#[derive(Module, Debug)]
pub struct MoeLayer<B: Backend> {
    /// Chooses experts and weights per token.
    pub router: Router<B>,
    /// The routed experts.
    pub experts: Experts<B>,
    /// Shared experts, fused into one SwiGLU of width `n_shared * expert_ffn_dim`.
    pub shared: Option<SwiGlu<B>>,
    #[module(skip)]
    config: MoeConfig,
}

impl<B: Backend> MoeLayer<B> {
    /// A layer for `config` on width `d_model`; `out_std` initialises the down projections.
    pub fn new(
        d_model: usize,
        config: &MoeConfig,
        std: f64,
        out_std: f64,
        device: &B::Device,
    ) -> Self {
        let shared = (config.n_shared_experts > 0).then(|| {
            SwiGlu::new(
                d_model,
                config.n_shared_experts * config.expert_ffn_dim,
                std,
                out_std,
                device,
            )
        });
        Self {
            router: Router::new(d_model, config, std, device),
            experts: Experts::new(
                config.n_experts,
                d_model,
                config.expert_ffn_dim,
                std,
                out_std,
                device,
            ),
            shared,
            config: config.clone(),
        }
    }

    /// The layer's configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// Mixes experts over flat tokens `x: [T, d]`. The capacity factor is the training one
    /// when autodiff is on, the evaluation one otherwise.
    pub fn forward(&self, x: Tensor<B, 2>) -> MoeOutput<B>
    where
        B: MoeBackend,
    {
        let [tokens, _] = x.dims();
        let training = B::ad_enabled(&x.device());
        let Routing {
            logits,
            weights,
            experts,
        } = self.router.forward(x.clone());
        let plan = dispatch::plan(
            experts,
            weights.clone(),
            self.config.n_experts,
            self.config.capacity(tokens, training),
            self.config.drop_policy,
        );
        let expert_in = plan.permute(x.clone());
        let expert_out = self.experts.forward(expert_in, &plan.layout);
        let mut output = plan.combine(expert_out, weights);
        if let Some(shared) = &self.shared {
            output = output + shared.forward(x);
        }
        // [balance, z, entropy, max |logit|] in one pass over the logits.
        let losses = router_losses(
            logits,
            plan.counts.clone(),
            self.router.gate_kind(),
            self.config.top_k,
        );
        let stats = RouterStats {
            counts: plan.counts,
            dropped: plan.dropped,
            assignments: tokens * self.config.top_k,
            entropy: losses.clone().slice(2..3).detach(),
            max_logit: losses.clone().slice(3..4).detach(),
        };
        let balance_loss = losses.clone().slice(0..1);
        let z_loss = losses.slice(1..2);
        MoeOutput {
            output,
            balance_loss,
            z_loss,
            stats,
        }
    }

    /// Applies the aux-loss-free bias update from this step's expert counts.
    pub fn update_bias(mut self, counts: Tensor<B, 1, Int>) -> Self {
        self.router = self.router.update_bias(counts.float());
        self
    }
}
