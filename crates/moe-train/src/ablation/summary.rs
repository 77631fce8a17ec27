//! One run's result for a study, computed from its `metrics.jsonl`: quality (final and
//! best validation loss and bpb), stability (loss spikes, divergence, router logits and
//! z-loss) and routing (imbalance, drops, entropy, dead experts), plus speed.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::grid::SummaryOptions;
use crate::logger::{MetricRecord, TrainRecord};

/// Indices `i` of `losses` where `losses[i]` exceeds `factor` times the mean of the
/// `window` values before it (only once `window` values precede it). Non-finite values
/// are spikes and stay out of later baselines.
pub fn loss_spikes(losses: &[f64], window: usize, factor: f64) -> Vec<usize> {
    let mut spikes = Vec::new();
    for i in window.max(1)..losses.len() {
        let baseline: Vec<f64> = losses[i - window.max(1)..i]
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .collect();
        if !losses[i].is_finite() {
            spikes.push(i);
        } else if !baseline.is_empty() {
            let mean = baseline.iter().sum::<f64>() / baseline.len() as f64;
            if losses[i] > factor * mean {
                spikes.push(i);
            }
        }
    }
    spikes
}

/// Experts whose load is under `threshold` in every one of `loads` (one load vector per
/// logged interval, all of the same length). Empty when `loads` is.
pub fn dead_experts(loads: &[&[f64]], threshold: f64) -> Vec<usize> {
    let Some(first) = loads.first() else {
        return Vec::new();
    };
    (0..first.len())
        .filter(|&e| loads.iter().all(|load| load[e] < threshold))
        .collect()
}

/// Entropy in nats of a probability vector (terms with p = 0 contribute 0).
pub fn entropy(probs: &[f64]) -> f64 {
    -probs
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|p| p * p.ln())
        .sum::<f64>()
}

/// Routing of one MoE layer over the last logged intervals of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSummary {
    /// Mean coefficient of variation of the load.
    pub cv: f64,
    /// Mean MaxVio.
    pub max_violation: f64,
    /// Mean dropped fraction.
    pub dropped: f64,
    /// Mean router entropy, nats.
    pub entropy: f64,
    /// Experts with load under the threshold in every interval.
    pub dead_experts: Vec<usize>,
    /// Mean load per expert.
    pub load: Vec<f64>,
}

/// One run's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The variant's name.
    pub variant: String,
    /// Its seed.
    pub seed: u64,
    /// The step whose loss became NaN or infinite, if the run diverged (it stopped there).
    pub diverged_at: Option<usize>,
    /// Last step logged.
    pub steps: usize,
    /// Last validation loss (nats per token).
    pub final_val_loss: Option<f64>,
    /// Last validation bits per byte.
    pub final_bpb: Option<f64>,
    /// Lowest validation loss of the run.
    pub best_val_loss: Option<f64>,
    /// Lowest validation bits per byte of the run.
    pub best_bpb: Option<f64>,
    /// Last logged training loss.
    pub final_train_loss: Option<f64>,
    /// Steps whose logged training loss was a spike (see [`loss_spikes`]).
    pub spike_steps: Vec<usize>,
    /// Largest absolute router logit seen in any layer, over the whole run.
    pub max_router_logit: f64,
    /// Largest absolute router logit over the layers, mean over the last `tail` intervals:
    /// where the logits settled (the maximum is often the first step's).
    pub final_router_logit: f64,
    /// Logged z-loss (unweighted, summed over layers), mean over the last `tail` intervals.
    pub final_z_loss: f64,
    /// Mean training tokens/s over the logged intervals.
    pub tokens_per_sec: f64,
    /// Per MoE layer, over the last `tail` intervals.
    pub layers: Vec<LayerSummary>,
}

impl RunSummary {
    /// Mean over layers of a layer metric (0 for a run without MoE layers).
    pub fn layer_mean(&self, metric: impl Fn(&LayerSummary) -> f64) -> f64 {
        if self.layers.is_empty() {
            return 0.0;
        }
        self.layers.iter().map(metric).sum::<f64>() / self.layers.len() as f64
    }

    /// Dead experts summed over layers.
    pub fn dead_experts(&self) -> usize {
        self.layers.iter().map(|l| l.dead_experts.len()).sum()
    }
}

/// Reads a run directory's `metrics.jsonl`.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<MetricRecord>> {
    let path = run_dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

/// Summarises a run from its metric records (a divergence is one of them).
pub fn summarize(
    variant: &str,
    seed: u64,
    records: &[MetricRecord],
    options: &SummaryOptions,
) -> RunSummary {
    let train: Vec<&TrainRecord> = records
        .iter()
        .filter_map(|r| match r {
            MetricRecord::Train(t) => Some(t),
            _ => None,
        })
        .collect();
    let evals: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| match r {
            MetricRecord::Eval { result, .. } => Some((result.val_loss, result.bpb)),
            _ => None,
        })
        .collect();
    let diverged_at = records.iter().find_map(|r| match r {
        MetricRecord::Diverged { step } => Some(*step),
        _ => None,
    });
    let losses: Vec<f64> = train.iter().map(|t| t.loss).collect();
    let spike_steps = loss_spikes(&losses, options.spike_window, options.spike_factor)
        .into_iter()
        .map(|i| train[i].step)
        .collect();
    let best = |pick: fn(&(f64, f64)) -> f64| {
        evals
            .iter()
            .map(pick)
            .filter(|v| v.is_finite())
            .reduce(f64::min)
    };
    let tail = &train[train.len().saturating_sub(options.tail.max(1))..];
    let n_layers = train.iter().map(|t| t.layers.len()).max().unwrap_or(0);
    let layers = layer_summaries(tail, n_layers, options.dead_load);
    RunSummary {
        variant: variant.to_string(),
        seed,
        diverged_at,
        steps: records.iter().map(MetricRecord::step).max().unwrap_or(0),
        final_val_loss: evals.last().map(|e| e.0),
        final_bpb: evals.last().map(|e| e.1),
        best_val_loss: best(|e| e.0),
        best_bpb: best(|e| e.1),
        final_train_loss: losses.last().copied(),
        spike_steps,
        max_router_logit: train
            .iter()
            .flat_map(|t| t.layers.iter().map(|l| l.max_logit))
            .fold(0.0, f64::max),
        final_router_logit: tail_mean(tail, |t| {
            t.layers.iter().map(|l| l.max_logit).fold(0.0, f64::max)
        }),
        final_z_loss: tail_mean(tail, |t| t.z_loss),
        tokens_per_sec: train.iter().map(|t| t.tokens_per_sec).sum::<f64>()
            / train.len().max(1) as f64,
        layers,
    }
}

/// Each of `n_layers` MoE layers' routing over the last logged intervals `tail`; experts
/// under `dead_load` in every one of them count as dead.
fn layer_summaries(tail: &[&TrainRecord], n_layers: usize, dead_load: f64) -> Vec<LayerSummary> {
    (0..n_layers)
        .map(|layer| {
            let stats: Vec<_> = tail.iter().filter_map(|t| t.layers.get(layer)).collect();
            let mean = |f: fn(&crate::metrics::LayerLoad) -> f64| {
                stats.iter().map(|s| f(s)).sum::<f64>() / stats.len().max(1) as f64
            };
            let loads: Vec<&[f64]> = stats.iter().map(|s| s.load.as_slice()).collect();
            let experts = loads.first().map_or(0, |l| l.len());
            LayerSummary {
                cv: mean(|s| s.cv),
                max_violation: mean(|s| s.max_violation),
                dropped: mean(|s| s.dropped),
                entropy: mean(|s| s.entropy),
                dead_experts: dead_experts(&loads, dead_load),
                load: (0..experts)
                    .map(|e| loads.iter().map(|l| l[e]).sum::<f64>() / loads.len() as f64)
                    .collect(),
            }
        })
        .collect()
}

/// Mean of `metric` over the records of `tail` (0 when there are none).
fn tail_mean(tail: &[&TrainRecord], metric: impl Fn(&TrainRecord) -> f64) -> f64 {
    tail.iter().map(|t| metric(t)).sum::<f64>() / tail.len().max(1) as f64
}
