//! Token windows as a burn dataset, shuffled per epoch with a seed, and the batcher that
//! turns them into input/target tensors.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::data::dataset::transform::ShuffledDataset;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Non-overlapping windows of `seq_len + 1` tokens starting at `offset`.
#[derive(Debug, Clone)]
pub struct TokenWindows {
    tokens: Arc<Vec<u32>>,
    seq_len: usize,
    offset: usize,
    len: usize,
}

impl TokenWindows {
    /// Windows over `tokens`; the first starts at `offset`.
    pub fn new(tokens: Arc<Vec<u32>>, seq_len: usize, offset: usize) -> Self {
        let len = tokens.len().saturating_sub(offset + 1) / seq_len;
        Self {
            tokens,
            seq_len,
            offset,
            len,
        }
    }
}

impl Dataset<Vec<u32>> for TokenWindows {
    fn get(&self, index: usize) -> Option<Vec<u32>> {
        (index < self.len).then(|| {
            let start = self.offset + index * self.seq_len;
            self.tokens[start..start + self.seq_len + 1].to_vec()
        })
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// Deterministic training batches: epoch `e` shuffles windows (shifted by an epoch-dependent
/// offset) with seed `seed + e`. Batch `i` depends only on `i`, so a resumed run sees the
/// same data as an uninterrupted one.
#[derive(Debug, Clone)]
pub struct EpochBatches {
    tokens: Arc<Vec<u32>>,
    seq_len: usize,
    batch_size: usize,
    seed: u64,
}

impl EpochBatches {
    /// Batches of `batch_size` windows of `seq_len + 1` tokens.
    pub fn new(tokens: Arc<Vec<u32>>, seq_len: usize, batch_size: usize, seed: u64) -> Self {
        Self {
            tokens,
            seq_len,
            batch_size,
            seed,
        }
    }

    /// Full batches in every epoch (windows at the largest offset bound it).
    pub fn batches_per_epoch(&self) -> usize {
        TokenWindows::new(self.tokens.clone(), self.seq_len, self.seq_len - 1).len()
            / self.batch_size
    }

    /// The windows of global batch `index`.
    pub fn batch(&self, index: usize) -> Vec<Vec<u32>> {
        let per_epoch = self.batches_per_epoch().max(1);
        let (epoch, within) = (index / per_epoch, index % per_epoch);
        let offset = (epoch * 7919) % self.seq_len;
        let windows = TokenWindows::new(self.tokens.clone(), self.seq_len, offset);
        let shuffled = ShuffledDataset::new(windows, self.seed.wrapping_add(epoch as u64));
        (within * self.batch_size..(within + 1) * self.batch_size)
            .filter_map(|i| shuffled.get(i))
            .collect()
    }
}

/// Inputs and next-token targets, `[N, S]` each.
#[derive(Debug, Clone)]
pub struct LmBatch<B: Backend> {
    /// Tokens `0..S` of each window.
    pub inputs: Tensor<B, 2, Int>,
    /// Tokens `1..=S` of each window.
    pub targets: Tensor<B, 2, Int>,
}

/// Stacks windows of `S + 1` tokens into an [`LmBatch`].
#[derive(Debug, Clone, Default)]
pub struct LmBatcher;

impl<B: Backend> Batcher<B, Vec<u32>, LmBatch<B>> for LmBatcher {
    fn batch(&self, items: Vec<Vec<u32>>, device: &B::Device) -> LmBatch<B> {
        let n = items.len();
        let s = items.first().map_or(0, |w| w.len() - 1);
        let mut inputs = Vec::with_capacity(n * s);
        let mut targets = Vec::with_capacity(n * s);
        for window in &items {
            inputs.extend(window[..s].iter().map(|&t| t as i64));
            targets.extend(window[1..].iter().map(|&t| t as i64));
        }
        LmBatch {
            inputs: Tensor::<B, 1, Int>::from_ints(inputs.as_slice(), device).reshape([n, s]),
            targets: Tensor::<B, 1, Int>::from_ints(targets.as_slice(), device).reshape([n, s]),
        }
    }
}
