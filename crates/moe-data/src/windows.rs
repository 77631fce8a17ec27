//! Which token windows a run trains and evaluates on.
//!
//! Training: sample `g` of the run (batch `i` holds samples `i * batch .. (i + 1) *
//! batch`) draws its source from the mixture weights with a hash of `(seed, g)`, then
//! reads window `perm(g mod W)` of that source, where `perm` is a seeded permutation of
//! its `W` windows that changes every epoch, as does the windows' offset. Every batch is
//! a function of `(seed, index)` and costs O(batch) to compute, so a resumed run sees
//! exactly the data of an uninterrupted one, whatever the corpus size.
//!
//! Prose is read as a stream, in windows at any offset. Conversations (chat data) are
//! packed instead: consecutive conversations fill a window without being cut (one longer
//! than a window is truncated), the rest of the window is padding, and each window
//! carries a loss mask: the answers' tokens only, or every token but the padding.
//!
//! Evaluation: a fixed set of windows spread evenly over each validation split, the same
//! at every evaluation, or every window of the splits.

use std::sync::Arc;

use anyhow::{Result, ensure};

use crate::mix64;
use crate::prepared::TokenSplit;

/// The token of a packed window's padding (masked out of the loss; causal attention
/// keeps the tokens before it from seeing it).
const PADDING: u32 = 0;

/// A split and its mixture weight.
#[derive(Debug, Clone)]
pub struct WeightedSplit {
    /// The tokens.
    pub split: Arc<TokenSplit>,
    /// Relative weight (positive).
    pub weight: f64,
}

/// One sequence of `seq_len + 1` tokens to train or evaluate on.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The tokens: inputs are `0..seq_len`, targets `1..=seq_len`.
    pub tokens: Vec<u32>,
    /// Whether each token counts in the loss as a target (1) or not (0); `None`: all do.
    pub mask: Option<Vec<u32>>,
}

/// Which tokens the loss is on (`[train] loss_on`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    /// Every token (of chat data: every token but padding).
    #[default]
    All,
    /// The answers only (assistant tokens and their end-of-turn marker); needs chat data.
    Assistant,
}

/// A split's windows: fixed-offset windows of a prose stream, or packed conversations.
#[derive(Debug, Clone)]
enum Layout {
    Stream,
    /// `(first token, tokens)` of each window of packed conversations.
    Packed(Vec<(u64, usize)>),
}

impl Layout {
    /// Packs a chat split's conversations into windows of `len` tokens; prose is a stream.
    fn of(split: &TokenSplit, len: usize) -> Self {
        if split.chat().is_none() {
            return Self::Stream;
        }
        let mut bins: Vec<(u64, usize)> = Vec::new();
        let mut open: Option<(u64, usize)> = None;
        for doc in 0..split.documents() {
            let range = split.document(doc);
            let tokens = (range.end - range.start) as usize;
            match &mut open {
                Some((_, used)) if *used + tokens <= len => *used += tokens,
                _ => {
                    bins.extend(open.take());
                    open = Some((range.start, tokens.min(len)));
                }
            }
        }
        bins.extend(open);
        Self::Packed(bins)
    }

    /// Windows in an epoch of training (prose: non-overlapping windows that fit at every
    /// offset below `seq_len`).
    fn train_windows(&self, split: &TokenSplit, seq_len: usize) -> u64 {
        match self {
            Self::Stream => split.len().saturating_sub(seq_len as u64) / seq_len as u64,
            Self::Packed(bins) => bins.len() as u64,
        }
    }

    /// Windows from the split's start, for evaluation.
    fn eval_windows(&self, split: &TokenSplit, seq_len: usize) -> u64 {
        match self {
            Self::Stream => split.len().saturating_sub(1) / seq_len as u64,
            Self::Packed(bins) => bins.len() as u64,
        }
    }

    /// `(first token, tokens)` of window `index` (prose: from `offset`).
    fn span(&self, index: u64, offset: u64, seq_len: usize) -> (u64, usize) {
        match self {
            Self::Stream => (offset + index * seq_len as u64, seq_len + 1),
            Self::Packed(bins) => bins[index as usize],
        }
    }
}

/// Reads a window of `split` at `(start, len)`, padded to `seq_len + 1` tokens, with the
/// mask `loss_on` asks for (none for prose read whole).
fn read_window(
    split: &TokenSplit,
    (start, len): (u64, usize),
    seq_len: usize,
    loss_on: LossOn,
) -> Window {
    let mut tokens = split.tokens(start, len);
    let full = seq_len + 1;
    let mask = match (split.chat(), loss_on) {
        (None, _) => None,
        (Some(_), LossOn::Assistant) => split.mask(start, len),
        (Some(_), LossOn::All) => Some(vec![1; len]),
    };
    let mask = mask.map(|mut mask| {
        mask.resize(full, 0);
        mask
    });
    tokens.resize(full, PADDING);
    Window { tokens, mask }
}

/// Deterministic training batches of windows of `seq_len + 1` tokens.
#[derive(Debug, Clone)]
pub struct TrainWindows {
    splits: Vec<Arc<TokenSplit>>,
    layouts: Vec<Layout>,
    /// Cumulative normalised weights; the last is 1.
    cumulative: Vec<f64>,
    seq_len: usize,
    batch_size: usize,
    seed: u64,
    loss_on: LossOn,
}

impl TrainWindows {
    /// Batches of `batch_size` windows from `splits`, the loss on every token. Each prose
    /// split must hold at least two windows' worth of tokens.
    pub fn new(
        splits: &[WeightedSplit],
        seq_len: usize,
        batch_size: usize,
        seed: u64,
    ) -> Result<Self> {
        Self::with_loss_on(splits, seq_len, batch_size, seed, LossOn::All)
    }

    /// As [`TrainWindows::new`], with the loss on the tokens `loss_on` names; the answers
    /// only need every split to be chat data.
    pub fn with_loss_on(
        splits: &[WeightedSplit],
        seq_len: usize,
        batch_size: usize,
        seed: u64,
        loss_on: LossOn,
    ) -> Result<Self> {
        ensure!(!splits.is_empty(), "no training data");
        ensure!(seq_len > 0 && batch_size > 0, "empty batches");
        let total: f64 = splits.iter().map(|s| s.weight).sum();
        let mut cumulative = Vec::with_capacity(splits.len());
        let mut layouts = Vec::with_capacity(splits.len());
        let mut sum = 0.0;
        for (i, s) in splits.iter().enumerate() {
            ensure!(
                s.weight.is_finite() && s.weight > 0.0,
                "source {i}: weight {} must be positive",
                s.weight
            );
            ensure!(
                loss_on == LossOn::All || s.split.chat().is_some(),
                "source {i} is prose, with no answers to train on: the loss on answers needs chat data (`moe data prepare --format chat`)"
            );
            let layout = Layout::of(&s.split, seq_len + 1);
            ensure!(
                layout.train_windows(&s.split, seq_len) > 0,
                "source {i}: its {} training tokens are too few for windows of {} tokens",
                s.split.len(),
                seq_len + 1
            );
            layouts.push(layout);
            sum += s.weight;
            cumulative.push(sum / total);
        }
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        Ok(Self {
            splits: splits.iter().map(|s| s.split.clone()).collect(),
            layouts,
            cumulative,
            seq_len,
            batch_size,
            seed,
            loss_on,
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

    /// Where sample `g` reads: its source, and the first token and length of its window.
    fn place(&self, sample: u64) -> (usize, (u64, usize)) {
        let source = self.source_of(sample);
        let (split, layout) = (&self.splits[source], &self.layouts[source]);
        let windows = layout.train_windows(split, self.seq_len);
        let epoch = sample / windows;
        let key = mix64(self.seed ^ mix64((source as u64) << 40 ^ epoch));
        let window = permute(sample % windows, windows, key);
        let offset = (epoch * 7919) % self.seq_len as u64;
        (source, layout.span(window, offset, self.seq_len))
    }

    /// Where sample `g` reads: its source and the window's first token.
    pub fn locate(&self, sample: u64) -> (usize, u64) {
        let (source, (start, _)) = self.place(sample);
        (source, start)
    }

    /// The windows of batch `index`.
    pub fn batch(&self, index: usize) -> Vec<Window> {
        let first = (index * self.batch_size) as u64;
        (first..first + self.batch_size as u64)
            .map(|g| {
                let (source, span) = self.place(g);
                read_window(&self.splits[source], span, self.seq_len, self.loss_on)
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

/// Validation windows over one or more splits.
#[derive(Debug, Clone)]
pub struct EvalWindows {
    splits: Vec<Arc<TokenSplit>>,
    /// `(split, first token, tokens)` of each window.
    windows: Vec<(usize, u64, usize)>,
    seq_len: usize,
    loss_on: LossOn,
}

impl EvalWindows {
    /// Every window of every split (prose: non-overlapping), the loss on `loss_on`.
    pub fn full(splits: &[Arc<TokenSplit>], seq_len: usize, loss_on: LossOn) -> Self {
        let windows = splits
            .iter()
            .enumerate()
            .flat_map(|(s, split)| {
                let layout = Layout::of(split, seq_len + 1);
                let count = layout.eval_windows(split, seq_len);
                (0..count).map(move |w| {
                    let (start, len) = layout.span(w, 0, seq_len);
                    (s, start, len)
                })
            })
            .collect();
        Self {
            splits: splits.to_vec(),
            windows,
            seq_len,
            loss_on,
        }
    }

    /// About `tokens` tokens of windows, shared among the splits by weight (at least one
    /// window each), spread evenly over each split: the same windows every time.
    pub fn fixed(splits: &[WeightedSplit], seq_len: usize, tokens: usize, loss_on: LossOn) -> Self {
        let total: f64 = splits.iter().map(|s| s.weight).sum();
        let wanted = tokens.div_ceil(seq_len) as f64;
        let mut windows = Vec::new();
        for (s, weighted) in splits.iter().enumerate() {
            let layout = Layout::of(&weighted.split, seq_len + 1);
            let available = layout.eval_windows(&weighted.split, seq_len);
            let n = ((wanted * weighted.weight / total).round() as u64).clamp(1, available.max(1));
            windows.extend((0..n.min(available)).map(|i| {
                let (start, len) = layout.span(i * available / n, 0, seq_len);
                (s, start, len)
            }));
        }
        Self {
            splits: splits.iter().map(|s| s.split.clone()).collect(),
            windows,
            seq_len,
            loss_on,
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

    /// Windows `range` and the bytes of text their scored tokens stand for (answers use
    /// their split's bytes per answer token).
    pub fn batch(&self, range: std::ops::Range<usize>) -> (Vec<Window>, f64) {
        let mut bytes = 0.0;
        let windows = self.windows[range]
            .iter()
            .map(|&(s, start, len)| {
                let split = &self.splits[s];
                let window = read_window(split, (start, len), self.seq_len, self.loss_on);
                let scored = match &window.mask {
                    Some(mask) => mask[1..].iter().sum::<u32>() as f64,
                    None => self.seq_len as f64,
                };
                let per_token = match (split.chat(), self.loss_on) {
                    (Some(chat), LossOn::Assistant) => {
                        chat.trained_bytes as f64 / chat.trained_tokens.max(1) as f64
                    }
                    _ => split.bytes_per_token(),
                };
                bytes += per_token * scored;
                window
            })
            .collect();
        (windows, bytes)
    }
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
