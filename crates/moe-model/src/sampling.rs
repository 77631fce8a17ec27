//! Next-token sampling on the host: greedy, temperature, top-k and top-p.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick the next token from logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1 = all).
    pub top_p: f64,
    /// Seed of the sampler's random generator.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A seeded sampler.
#[derive(Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler with its own random generator seeded from `config.seed`.
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    /// Picks a token id from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> usize {
        if self.config.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(usize, f64)> = logits
            .iter()
            .map(|&l| l as f64 / self.config.temperature)
            .enumerate()
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.config.top_k > 0 {
            candidates.truncate(self.config.top_k);
        }
        let max = candidates[0].1;
        let mut total = 0.0;
        for c in candidates.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1;
        }
        let mut kept = 0;
        let mut mass = 0.0;
        for c in candidates.iter() {
            kept += 1;
            mass += c.1 / total;
            if mass >= self.config.top_p {
                break;
            }
        }
        candidates.truncate(kept);
        let kept_total: f64 = candidates.iter().map(|c| c.1).sum();
        let mut u = self.rng.random::<f64>() * kept_total;
        for (id, p) in &candidates {
            if u < *p {
                return *id;
            }
            u -= p;
        }
        candidates[candidates.len() - 1].0
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}
