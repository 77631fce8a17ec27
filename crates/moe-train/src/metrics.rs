//! Routing metrics computed on the host from per-expert counts.

use serde::{Deserialize, Deserializer, Serialize};

/// Reads a float of a metrics file. JSON has no NaN or infinity (serde_json writes them
/// as `null`): a `null` reads back as NaN, so the records of a diverging run still load.
pub fn float_or_nan<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// Load of one MoE layer over a logging interval or an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerLoad {
    /// Fraction of routed assignments per expert (sums to 1), before dropping.
    pub load: Vec<f64>,
    /// Coefficient of variation of `load`: std / mean.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub cv: f64,
    /// MaxVio: max_i (load_i - mean) / mean.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub max_violation: f64,
    /// Fraction of assignments dropped by the capacity limit.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub dropped: f64,
    /// Mean router entropy in nats.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub entropy: f64,
    /// Largest absolute router logit.
    #[serde(deserialize_with = "crate::metrics::float_or_nan")]
    pub max_logit: f64,
}

/// Fractions `c_i / sum c` (all zero if nothing was routed).
pub fn load_fractions(counts: &[f64]) -> Vec<f64> {
    let total: f64 = counts.iter().sum();
    counts
        .iter()
        .map(|&c| if total > 0.0 { c / total } else { 0.0 })
        .collect()
}

/// Coefficient of variation (population std / mean); 0 for an empty or all-zero load.
pub fn coefficient_of_variation(load: &[f64]) -> f64 {
    let n = load.len() as f64;
    let mean = load.iter().sum::<f64>() / n;
    if load.is_empty() || mean == 0.0 {
        return 0.0;
    }
    let var = load.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean
}

/// MaxVio = max_i (load_i - mean) / mean; 0 when perfectly balanced.
pub fn max_violation(load: &[f64]) -> f64 {
    let mean = load.iter().sum::<f64>() / load.len() as f64;
    if load.is_empty() || mean == 0.0 {
        return 0.0;
    }
    load.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(l)) / mean - 1.0
}

impl LayerLoad {
    /// Summarises per-expert `counts` and the other router statistics of one layer.
    pub fn new(
        counts: &[f64],
        dropped: f64,
        assignments: f64,
        entropy: f64,
        max_logit: f64,
    ) -> Self {
        let load = load_fractions(counts);
        Self {
            cv: coefficient_of_variation(&load),
            max_violation: max_violation(&load),
            load,
            dropped: if assignments > 0.0 {
                dropped / assignments
            } else {
                0.0
            },
            entropy,
            max_logit,
        }
    }
}
