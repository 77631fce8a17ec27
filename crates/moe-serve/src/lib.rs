//! Serving `moe` models over an OpenAI-compatible HTTP API, so that Mixture-of-Agents tools
//! and the official OpenAI clients can use a trained checkpoint as a proposer, and running
//! Mixture-of-Agents pipelines over such endpoints.

mod chat_template;
mod detokenizer;
mod engine;
pub mod moa;
pub mod openai;
mod server;

pub use chat_template::ChatTemplate;
pub use engine::{Engine, EngineOptions};
pub use moa::{MoaConfig, MoaOutcome};
pub use server::{ServerOptions, pipeline_router, router, serve, shutdown_signal};
