//! Training, evaluation, metrics and checkpoints for `moe` models.

pub mod ablation;
pub mod bench;
mod checkpoint;
mod config;
mod data;
pub mod data_parallel;
mod eval;
mod export;
mod grad_clip;
pub mod hf_mixtral;
mod import;
mod integrity;
mod learner;
mod logger;
mod memory;
mod metrics;
mod model_tensors;
mod optimizer;
mod router_stats;
mod run_lock;
pub mod safetensors_file;
mod schedule;
mod trainer;
mod upcycle;

pub use checkpoint::{
    CONFIG_FILE, LoadedModel, TrainingState, load_model, load_weights, recorder,
    resolve_checkpoint, save_model_checkpoint,
};
pub use config::{DataConfig, DataSource, RunConfig, SourceConfig, TrainConfig};
pub use data::RunData;
pub use eval::{EvalResult, evaluate};
pub use export::{ExportFormat, export};
pub use import::{Imported, import, read_model};
pub use integrity::{MANIFEST_FILE, NonFinite, verify_checkpoint};
pub use learner::{MicroStep, forward_backward};
pub use logger::{MetricRecord, TrainRecord};
pub use memory::{MemoryEstimate, available_memory};
pub use metrics::{LayerLoad, coefficient_of_variation, max_violation};
pub use model_tensors::{grow_vocabulary, model_tensors};
pub use optimizer::FusedAdamW;
pub use run_lock::{LOCK_FILE, RunLock};
pub use trainer::{Diverged, TrainOutcome, train};
pub use upcycle::{UpcycleOptions, upcycle, upcycle_checkpoint, upcycled_config};
