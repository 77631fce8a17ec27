//! Serving `moe` models over an OpenAI-compatible HTTP API, so that Mixture-of-Agents tools
//! and the official OpenAI clients can use a trained checkpoint as a proposer, and running
//! Mixture-of-Agents pipelines over such endpoints.

mod detokenizer;
mod engine;
mod logprobs;
mod metrics;
pub mod moa;
pub mod openai;
mod request_fields;
mod server;

pub use engine::{Engine, EngineOptions};
pub use metrics::Metrics;
pub use moa::{MoaConfig, MoaOutcome};
/// The chat template of [`ServerOptions`] (the model's own, from its tokenizer).
pub use moe_data::ChatTemplate;
pub use server::{ServerOptions, check_api_key, pipeline_router, router, serve, shutdown_signal};
