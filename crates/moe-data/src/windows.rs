//! Which token windows a run trains and evaluates on.
//!
//! Training: sample `g` of the run (batch `i` holds samples `i * batch .. (i + 1) *
//! batch`) draws its source from the mixture weights with a hash of `(seed, g)`, then
//! reads window `perm(g mod W)` of that source, where `perm` is a seeded permutation of
//! its `W` windows that changes every epoch, as does the windows' offset. Every batch is
//! a function of `(seed, index)` and costs O(batch) to compute, so a resumed run sees
//! exactly the data of an uninterrupted one, whatever the corpus size.
//!
//! Evaluation: a fixed set of windows spread evenly over each validation split, the same
//! at every evaluation, or every window of the splits.

use std::sync::Arc;

use anyhow::{Result, ensure};

use crate::mix64;
use crate::prepared::TokenSplit;

/// A split and its mixture weight.
#[derive(Debug, Clone)]
pub struct WeightedSplit {
    /// The tokens.
    pub split: Arc<TokenSplit>,
    /// Relative weight (positive).
    pub weight: f64,
}

/// Deterministic training batches of windows of `seq_len + 1` tokens.
#[derive(Debug, Clone)]
pub struct TrainWindows {
    splits: Vec<Arc<TokenSplit>>,
    /// Cumulative normalised weights; the last is 1.
    cumulative: Vec<f64>,
    seq_len: usize,
    batch_size: usize,
    seed: u64,
}

impl TrainWindows {
    /// Batches of `batch_size` windows from `splits`. Each split must hold at least two
    /// windows' worth of tokens.
    pub fn new(
        splits: &[WeightedSplit],
        seq_len: usize,
        batch_size: usize,
        seed: u64,
    ) -> Result<Self> {
        ensure!(!splits.is_empty(), "no training data");
        ensure!(seq_len > 0 && batch_size > 0, "empty batches");
        let total: f64 = splits.iter().map(|s| s.weight).sum();
        let mut cumulative = Vec::with_capacity(splits.len());
        let mut sum = 0.0;
        for (i, s) in splits.iter().enumerate() {
            ensure!(
                s.weight.is_finite() && s.weight > 0.0,
                "source {i}: weight {} must be positive",
                s.weight
            );
            ensure!(
                windows_per_epoch(&s.split, seq_len) > 0,
                "source {i}: its {} training tokens are too few for windows of {} tokens",
                s.split.len(),
                seq_len + 1
            );
            sum += s.weight;
            cumulative.push(sum / total);
        }
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        Ok(Self {
            splits: splits.iter().map(|s| s.split.clone()).collect(),
            cumulative,
            seq_len,
            batch_size,
            seed,
        })
    }

    /// Windows per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The source sample `g` of the run is drawn from.
    pub fn source_of(&self, sample: u64) -> usize {
        if self.splits.len() == 1 {
            return 0;
        }
        let u = (mix64(self.seed ^ mix64(sample ^ 0xA5A5_5A5A)) >> 11) as f64 / (1u64 << 53) as f64;
        self.cumulative
            .partition_point(|&c| c <= u)
            .min(self.splits.len() - 1)
    }

    /// Where sample `g` reads: its source and the window's first token.
    pub fn locate(&self, sample: u64) -> (usize, u64) {
        let source = self.source_of(sample);
        let split = &self.splits[source];
        let windows = windows_per_epoch(split, self.seq_len);
        let epoch = sample / windows;
        let key = mix64(self.seed ^ mix64((source as u64) << 40 ^ epoch));
        let window = permute(sample % windows, windows, key);
        let offset = (epoch * 7919) % self.seq_len as u64;
        (source, offset + window * self.seq_len as u64)
    }

    /// The windows of batch `index`.
    pub fn batch(&self, index: usize) -> Vec<Vec<u32>> {
        let first = (index * self.batch_size) as u64;
        (first..first + self.batch_size as u64)
            .map(|g| {
                let (source, start) = self.locate(g);
                self.splits[source].tokens(start, self.seq_len + 1)
            })
            .collect()
    }

    /// The share of each source among the samples of batches `0..batches`.
    pub fn proportions(&self, batches: usize) -> Vec<f64> {
        let mut counts = vec![0u64; self.splits.len()];
        let samples = (batches * self.batch_size) as u64;
        for g in 0..samples {
            counts[self.source_of(g)] += 1;
        }
        counts
            .iter()
            .map(|&c| c as f64 / samples.max(1) as f64)
            .collect()
    }
}

/// Non-overlapping windows of `seq_len + 1` tokens that fit at every offset below
/// `seq_len`.
fn windows_per_epoch(split: &TokenSplit, seq_len: usize) -> u64 {
    split.len().saturating_sub(seq_len as u64) / seq_len as u64
}

/// A seeded bijection of `0..n` (a four-round Feistel network on the smallest
/// even-bit power of two at least `n`, walking the cycle until it lands below `n`).
fn permute(index: u64, n: u64, key: u64) -> u64 {
    if n <= 1 {
        return 0;
    }
    let bits = (64 - (n - 1).leading_zeros()).max(2).next_multiple_of(2);
    let half = bits / 2;
    let mask = (1u64 << half) - 1;
    let mut x = index;
    loop {
        let (mut left, mut right) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f =
                mix64(right ^ key.wrapping_add(round.wrapping_mul(0x9E37_79B9_7F4A_7C15))) & mask;
            (left, right) = (right, left ^ f);
        }
        x = (left << half) | right;
        if x < n {
            return x;
        }
    }
}

/// Validation windows: `(split, first token)` pairs over one or more splits.
#[derive(Debug, Clone)]
pub struct EvalWindows {
    splits: Vec<Arc<TokenSplit>>,
    windows: Vec<(usize, u64)>,
    seq_len: usize,
}

impl EvalWindows {
    /// Every non-overlapping window of every split.
    pub fn full(splits: &[Arc<TokenSplit>], seq_len: usize) -> Self {
        let windows = splits
            .iter()
            .enumerate()
            .flat_map(|(s, split)| {
                (0..all_windows(split, seq_len)).map(move |w| (s, w * seq_len as u64))
            })
            .collect();
        Self {
            splits: splits.to_vec(),
            windows,
            seq_len,
        }
    }

    /// About `tokens` tokens of windows, shared among the splits by weight (at least one
    /// window each), spread evenly over each split: the same windows every time.
    pub fn fixed(splits: &[WeightedSplit], seq_len: usize, tokens: usize) -> Self {
        let total: f64 = splits.iter().map(|s| s.weight).sum();
        let wanted = tokens.div_ceil(seq_len) as f64;
        let mut windows = Vec::new();
        for (s, weighted) in splits.iter().enumerate() {
            let available = all_windows(&weighted.split, seq_len);
            let n = ((wanted * weighted.weight / total).round() as u64).clamp(1, available.max(1));
            windows
                .extend((0..n.min(available)).map(|i| (s, (i * available / n) * seq_len as u64)));
        }
        Self {
            splits: splits.iter().map(|s| s.split.clone()).collect(),
            windows,
            seq_len,
        }
    }

    /// Number of windows.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether there is no window.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Windows `range` and the bytes of text their predicted tokens stand for.
    pub fn batch(&self, range: std::ops::Range<usize>) -> (Vec<Vec<u32>>, f64) {
        let mut bytes = 0.0;
        let windows = self.windows[range]
            .iter()
            .map(|&(s, start)| {
                let split = &self.splits[s];
                bytes += split.bytes_per_token() * self.seq_len as f64;
                split.tokens(start, self.seq_len + 1)
            })
            .collect();
        (windows, bytes)
    }
}

/// Non-overlapping windows of `seq_len + 1` tokens from the split's start.
fn all_windows(split: &TokenSplit, seq_len: usize) -> u64 {
    split.len().saturating_sub(1) / seq_len as u64
}

#[cfg(test)]
mod tests {
    use super::permute;

    #[test]
    fn permute_is_a_bijection_for_every_size() {
        for n in [1u64, 2, 3, 5, 16, 17, 100, 1000] {
            let mut seen: Vec<u64> = (0..n).map(|i| permute(i, n, 42)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
        let a: Vec<u64> = (0..100).map(|i| permute(i, 100, 1)).collect();
        let b: Vec<u64> = (0..100).map(|i| permute(i, 100, 2)).collect();
        assert_ne!(a, b, "keys give different orders");
    }
}
