//! Metric records written to `metrics.jsonl` and TensorBoard event files.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tensorboard_rs::summary_writer::SummaryWriter;

use crate::eval::EvalResult;
use crate::metrics::LayerLoad;

/// One training log interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Optimiser steps completed.
    pub step: usize,
    /// Mean cross-entropy over the interval.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub loss: f64,
    /// Mean weighted router loss added to the objective (balance + z terms).
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub aux_loss: f64,
    /// Mean unweighted load-balancing term, summed over MoE layers (1 per layer if balanced).
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub balance_loss: f64,
    /// Mean unweighted router z-loss, summed over MoE layers.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub z_loss: f64,
    /// Learning rate of the last step.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub lr: f64,
    /// Global gradient norm of the last step, before clipping.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub grad_norm: f64,
    /// Training tokens per second over the interval.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub tokens_per_sec: f64,
    /// Seconds since the run started (resumes included).
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub elapsed_secs: f64,
    /// Router statistics per MoE layer over the interval.
    pub layers: Vec<LayerLoad>,
}

/// A line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricRecord {
    /// Training interval.
    Train(TrainRecord),
    /// Validation pass.
    Eval {
        /// Optimiser steps completed.
        step: usize,
        /// Whether it scored the whole validation split (logged as `val_full/...`) rather
        /// than the fixed windows of the periodic evaluations (`val/...`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        full: bool,
        /// The validation result.
        #[serde(flatten)]
        result: EvalResult,
    },
    /// The training loss became NaN or infinite at `step`; the run stopped there.
    Diverged {
        /// The step whose loss was not finite.
        step: usize,
    },
}

impl MetricRecord {
    /// Optimiser steps completed when the record was written.
    pub fn step(&self) -> usize {
        match self {
            MetricRecord::Train(r) => r.step,
            MetricRecord::Eval { step, .. } | MetricRecord::Diverged { step, .. } => *step,
        }
    }
}

/// Appends records to `metrics.jsonl` and TensorBoard files in the run directory.
pub struct MetricsLogger {
    jsonl: File,
    tensorboard: SummaryWriter,
}

impl MetricsLogger {
    /// Opens the run's logs. Records after `resume_step` (written after the checkpoint a
    /// resumed run restarts from) are dropped from `metrics.jsonl`.
    pub fn open(run_dir: &Path, resume_step: Option<usize>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let kept: Vec<String> = match (resume_step, File::open(&path)) {
            (Some(step), Ok(file)) => BufReader::new(file)
                .lines()
                .map_while(|l| l.ok())
                .filter(|line| {
                    serde_json::from_str::<MetricRecord>(line).is_ok_and(|r| r.step() <= step)
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut jsonl = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        for line in kept {
            writeln!(jsonl, "{line}")?;
        }
        let tb_dir = run_dir.join("tensorboard");
        std::fs::create_dir_all(&tb_dir)?;
        Ok(Self {
            jsonl,
            tensorboard: SummaryWriter::new(&tb_dir),
        })
    }

    /// Writes one record to both sinks.
    pub fn log(&mut self, record: &MetricRecord) -> Result<()> {
        writeln!(self.jsonl, "{}", serde_json::to_string(record)?)?;
        self.jsonl.flush()?;
        let tb = &mut self.tensorboard;
        match record {
            MetricRecord::Train(r) => {
                let s = r.step;
                for (tag, v) in [
                    ("train/loss", r.loss),
                    ("train/aux_loss", r.aux_loss),
                    ("train/balance_loss", r.balance_loss),
                    ("train/z_loss", r.z_loss),
                    ("train/lr", r.lr),
                    ("train/grad_norm", r.grad_norm),
                    ("train/tokens_per_sec", r.tokens_per_sec),
                ] {
                    tb.add_scalar(tag, v as f32, s);
                }
                log_layers(tb, "train", &r.layers, s);
            }
            MetricRecord::Eval { step, full, result } => {
                let prefix = if *full { "val_full" } else { "val" };
                tb.add_scalar(&format!("{prefix}/loss"), result.val_loss as f32, *step);
                tb.add_scalar(&format!("{prefix}/bpb"), result.bpb as f32, *step);
                let perplexity = result.perplexity as f32;
                tb.add_scalar(&format!("{prefix}/perplexity"), perplexity, *step);
                log_layers(tb, prefix, &result.expert_load, *step);
            }
            MetricRecord::Diverged { .. } => {}
        }
        tb.flush();
        Ok(())
    }
}

fn log_layers(tb: &mut SummaryWriter, prefix: &str, layers: &[LayerLoad], step: usize) {
    for (i, layer) in layers.iter().enumerate() {
        let base = format!("{prefix}/moe{i}");
        tb.add_scalar(&format!("{base}/load_cv"), layer.cv as f32, step);
        tb.add_scalar(
            &format!("{base}/max_violation"),
            layer.max_violation as f32,
            step,
        );
        tb.add_scalar(&format!("{base}/dropped"), layer.dropped as f32, step);
        tb.add_scalar(&format!("{base}/entropy"), layer.entropy as f32, step);
        tb.add_scalar(&format!("{base}/max_logit"), layer.max_logit as f32, step);
        for (e, load) in layer.load.iter().enumerate() {
            tb.add_scalar(&format!("{base}/load/expert{e}"), *load as f32, step);
        }
    }
}
