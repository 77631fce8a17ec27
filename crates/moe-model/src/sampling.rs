//! Next-token sampling on the host: penalties and biases, then greedy, temperature, top-k
//! and top-p.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::penalties::{Penalties, PenaltyState};

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
    /// Adjustments to the logits, applied before everything else.
    pub penalties: Penalties,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            penalties: Penalties::default(),
        }
    }
}

/// A seeded sampler for one sequence: it remembers the tokens it picked, for the
/// penalties.
#[derive(Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
    penalties: PenaltyState,
}

impl Sampler {
    /// A sampler for a sequence that starts with `prompt`, with its own random generator
    /// seeded from `config.seed`.
    pub fn new(config: SamplingConfig, prompt: &[u32]) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        let penalties = PenaltyState::new(config.penalties.clone(), prompt);
        Self {
            config,
            rng,
            penalties,
        }
    }

    /// Picks a token id from one row of logits (and counts it as generated).
    pub fn sample(&mut self, logits: &[f32]) -> usize {
        let logits = self.penalties.apply(logits);
        let token = self.pick(&logits);
        self.penalties.record(token as u32);
        token
    }

    fn pick(&mut self, logits: &[f32]) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_follow_the_penalties() {
        let greedy = |penalties: Penalties| SamplingConfig {
            temperature: 0.0,
            penalties,
            ..Default::default()
        };
        let logits = [1.0f32, 3.0, 2.0];
        // Without penalties greedy repeats itself; a frequency penalty moves it on.
        let mut plain = Sampler::new(greedy(Penalties::default()), &[]);
        assert_eq!([plain.sample(&logits), plain.sample(&logits)], [1, 1]);
        let frequency = Penalties {
            frequency: 1.5,
            ..Default::default()
        };
        let mut penalised = Sampler::new(greedy(frequency), &[]);
        assert_eq!(
            [penalised.sample(&logits), penalised.sample(&logits)],
            [1, 2]
        );
        // A repetition penalty counts the prompt.
        let repetition = Penalties {
            repetition: 2.0,
            ..Default::default()
        };
        assert_eq!(Sampler::new(greedy(repetition), &[1]).sample(&logits), 2);
        // A bias of +100 forces its token.
        let bias = Penalties {
            logit_bias: vec![(0, 100.0)],
            ..Default::default()
        };
        assert_eq!(Sampler::new(greedy(bias), &[]).sample(&logits), 0);
    }
}
