//! Serving `moe` models over an OpenAI-compatible HTTP API, so that Mixture-of-Agents tools
//! and the official OpenAI clients can use a trained checkpoint as a proposer, and running
//! Mixture-of-Agents pipelines over such endpoints.

pub mod chat_template;
pub mod detokenizer;
pub mod engine;
pub mod moa;
pub mod openai;
pub mod server;

pub use chat_template::ChatTemplate;
pub use engine::{Engine, EngineOptions};
pub use moa::{MoaConfig, MoaOutcome};
pub use server::{ServerOptions, pipeline_router, router, serve, shutdown_signal};
