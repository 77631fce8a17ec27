//! The batcher that turns token windows into input/target tensors.

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

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
