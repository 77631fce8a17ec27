//! Router losses, unweighted (the MoE layer applies the config weights). The formulas
//! live with the fused operation that computes them in one pass
//! ([`moe_kernels::router_losses`]); the tensor-op forms are re-exported here.

pub use moe_kernels::reference::router_losses::{
    load_balancing_loss, log_sum_exp, router_entropy, router_probs, router_z_loss,
};
