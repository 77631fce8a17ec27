//! Training, evaluation, metrics and checkpoints for `moe` models.

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod grad_clip;
pub mod logger;
pub mod metrics;
pub mod router_stats;
pub mod schedule;
pub mod trainer;

pub use checkpoint::{LoadedModel, load_model, resolve_checkpoint};
pub use config::RunConfig;
pub use eval::{EvalResult, evaluate};
pub use trainer::{TrainOutcome, train};
