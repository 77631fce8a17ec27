//! Training, evaluation, metrics and checkpoints for `moe` models.

pub mod ablation;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod data_parallel;
pub mod eval;
pub mod export;
pub mod grad_clip;
pub mod hf_mixtral;
pub mod import;
pub mod learner;
pub mod logger;
pub mod metrics;
pub mod model_tensors;
pub mod optimizer;
pub mod router_stats;
pub mod safetensors_file;
pub mod schedule;
pub mod trainer;
pub mod upcycle;

pub use checkpoint::{LoadedModel, load_model, load_weights, resolve_checkpoint};
pub use config::RunConfig;
pub use eval::{EvalResult, evaluate};
pub use export::{ExportFormat, export};
pub use import::{Imported, import, read_model};
pub use trainer::{Diverged, TrainOutcome, train};
pub use upcycle::{UpcycleOptions, upcycle, upcycle_checkpoint};
