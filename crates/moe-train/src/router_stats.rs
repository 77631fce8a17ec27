//! Reads per-layer router statistics from the device and accumulates them on the host.

use burn::tensor::ElementConversion;
use burn::tensor::backend::Backend;
use moe_model::MoeOutput;

use crate::metrics::LayerLoad;

/// Host sums of one layer's router statistics over several forward passes.
#[derive(Debug, Clone, Default)]
struct LayerTotals {
    counts: Vec<f64>,
    dropped: f64,
    assignments: f64,
    entropy_sum: f64,
    max_logit: f64,
    passes: usize,
}

/// Accumulates router statistics of every MoE layer over a logging interval or an evaluation.
#[derive(Debug, Clone, Default)]
pub struct RouterStatsAccumulator {
    layers: Vec<LayerTotals>,
}

fn scalar<B: Backend>(t: burn::tensor::Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

impl RouterStatsAccumulator {
    /// Adds the statistics of one forward pass (one entry per MoE layer).
    pub fn add<B: Backend>(&mut self, outputs: &[MoeOutput<B>]) {
        if self.layers.len() < outputs.len() {
            self.layers.resize(outputs.len(), LayerTotals::default());
        }
        for (totals, out) in self.layers.iter_mut().zip(outputs) {
            let stats = &out.stats;
            let counts: Vec<f64> = stats
                .counts
                .clone()
                .into_data()
                .iter::<i64>()
                .map(|c| c as f64)
                .collect();
            if totals.counts.len() < counts.len() {
                totals.counts.resize(counts.len(), 0.0);
            }
            for (t, c) in totals.counts.iter_mut().zip(counts) {
                *t += c;
            }
            totals.dropped += stats.dropped.clone().into_scalar().elem::<i64>() as f64;
            totals.assignments += stats.assignments as f64;
            totals.entropy_sum += scalar(stats.entropy.clone());
            totals.max_logit = totals.max_logit.max(scalar(stats.max_logit.clone()));
            totals.passes += 1;
        }
    }

    /// Per-layer summaries; the accumulator is emptied.
    pub fn take(&mut self) -> Vec<LayerLoad> {
        std::mem::take(&mut self.layers)
            .into_iter()
            .map(|t| {
                LayerLoad::new(
                    &t.counts,
                    t.dropped,
                    t.assignments,
                    t.entropy_sum / t.passes.max(1) as f64,
                    t.max_logit,
                )
            })
            .collect()
    }
}
