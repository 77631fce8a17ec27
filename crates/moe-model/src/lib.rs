//! A sparse Mixture-of-Experts decoder-only transformer on Burn, generic over the backend.
//!
//! The MoE block follows the classic pipeline: router logits -> top-k gating -> dispatch
//! (counting sort by expert, capacity limit or dropless) -> experts as one batched matmul
//! -> weighted combine, with the Switch load-balancing loss and the ST-MoE router z-loss.

pub mod attention;
pub mod config;
pub mod dispatch;
pub mod experts;
pub mod generation;
pub mod losses;
pub mod moe;
pub mod rope;
pub mod router;
pub mod sampling;
pub mod transformer;

pub use config::{ConfigError, DropPolicy, ModelConfig, MoeConfig};
pub use generation::{FinishReason, Generation, Sequence, decode_step, generate};
pub use moe::{MoeLayer, MoeOutput, RouterStats};
pub use moe_kernels::{self as ops, Gate, MoeAutodiffBackend, MoeBackend};
pub use sampling::{Sampler, SamplingConfig};
pub use transformer::{KvCache, Transformer, TransformerOutput};
