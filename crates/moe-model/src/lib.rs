//! A sparse Mixture-of-Experts decoder-only transformer on Burn, generic over the backend.
//!
//! The MoE block follows the classic pipeline: router logits -> top-k gating -> dispatch
//! (counting sort by expert, capacity limit or dropless) -> experts as one batched matmul
//! -> weighted combine, with the Switch load-balancing loss and the ST-MoE router z-loss.

mod attention;
mod config;
pub mod dispatch;
mod experts;
mod generation;
mod logprobs;
pub mod losses;
mod moe;
mod penalties;
mod rope;
mod router;
mod sampling;
mod transformer;

pub use attention::{Attention, LayerCache};
pub use config::{ConfigError, DropPolicy, ModelConfig, MoeConfig};
pub use dispatch::{BufferLayout, DispatchPlan};
pub use experts::{ExpertWeights, Experts, SwiGlu};
pub use generation::{FinishReason, Generation, Sequence, decode_step, generate};
pub use logprobs::{TokenLogprob, prompt_logprobs, token_logprob};
pub use moe::{MoeLayer, MoeOutput, RouterStats};
pub use moe_kernels::{self as ops, Gate, MoeAutodiffBackend, MoeBackend};
pub use penalties::Penalties;
pub use rope::RopeAngles;
pub use router::{Router, Routing};
pub use sampling::{Sampler, SamplingConfig};
pub use transformer::{
    Block, FeedForward, KvCache, LOSS_BLOCK_LOGITS, MoeOutputs, Transformer, TransformerOutput,
};
