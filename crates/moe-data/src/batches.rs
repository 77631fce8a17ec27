//! The batcher that turns token windows into input/target tensors.

use burn::data::dataloader::batcher::Batcher;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::windows::Window;

/// Inputs and next-token targets, `[N, S]` each, and which targets count in the loss.
#[derive(Debug, Clone)]
pub struct LmBatch<B: Backend> {
    /// Tokens `0..S` of each window.
    pub inputs: Tensor<B, 2, Int>,
    /// Tokens `1..=S` of each window.
    pub targets: Tensor<B, 2, Int>,
    /// 1.0 for the targets the loss is on, 0.0 for the others (chat data); `None` when
    /// every target counts.
    pub mask: Option<Tensor<B, 2>>,
}

/// Stacks windows of `S + 1` tokens into an [`LmBatch`].
#[derive(Debug, Clone, Default)]
pub struct LmBatcher;

impl<B: Backend> Batcher<B, Window, LmBatch<B>> for LmBatcher {
    fn batch(&self, items: Vec<Window>, device: &B::Device) -> LmBatch<B> {
        let n = items.len();
        let s = items.first().map_or(0, |w| w.tokens.len() - 1);
        let mut inputs = Vec::with_capacity(n * s);
        let mut targets = Vec::with_capacity(n * s);
        for window in &items {
            inputs.extend(window.tokens[..s].iter().map(|&t| t as i64));
            targets.extend(window.tokens[1..].iter().map(|&t| t as i64));
        }
        let mask = items.iter().any(|w| w.mask.is_some()).then(|| {
            let weights: Vec<f32> = items
                .iter()
                .flat_map(|w| match &w.mask {
                    Some(mask) => mask[1..].iter().map(|&m| m as f32).collect(),
                    None => vec![1.0; s],
                })
                .collect();
            Tensor::<B, 1>::from_floats(weights.as_slice(), device).reshape([n, s])
        });
        LmBatch {
            inputs: Tensor::<B, 1, Int>::from_ints(inputs.as_slice(), device).reshape([n, s]),
            targets: Tensor::<B, 1, Int>::from_ints(targets.as_slice(), device).reshape([n, s]),
            mask,
        }
    }
}

impl<B: Backend> Batcher<B, Vec<u32>, LmBatch<B>> for LmBatcher {
    /// Windows of prose: every target counts.
    fn batch(&self, items: Vec<Vec<u32>>, device: &B::Device) -> LmBatch<B> {
        let windows = items
            .into_iter()
            .map(|tokens| Window { tokens, mask: None })
            .collect();
        self.batch(windows, device)
    }
}
