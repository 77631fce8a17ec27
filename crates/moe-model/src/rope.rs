//! Rotary position embedding in the half-split ("rotate_half") layout used by Llama,
//! Mistral and Mixtral, so imported Hugging Face weights need no permutation.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use moe_kernels::{MoeBackend, rotary};

/// Cosine and sine tables for a run of positions, `[S, head_dim]` each.
#[derive(Debug, Clone)]
pub struct RopeAngles<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

impl<B: Backend> RopeAngles<B> {
    /// Angles for positions `start..start + len` with base `theta`.
    pub fn new(start: usize, len: usize, head_dim: usize, theta: f64, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let positions: Vec<f32> = (start..start + len).map(|p| p as f32).collect();
        let inv_freq = Tensor::<B, 1>::from_floats(inv_freq.as_slice(), device).reshape([1, half]);
        let positions = Tensor::<B, 1>::from_floats(positions.as_slice(), device).reshape([len, 1]);
        let angles = positions.matmul(inv_freq);
        let angles = Tensor::cat(vec![angles.clone(), angles], 1);
        Self {
            cos: angles.clone().cos(),
            sin: angles.sin(),
        }
    }

    /// The `(cos, sin)` tables, `[S, head_dim]` each.
    pub fn tables(&self) -> (Tensor<B, 2>, Tensor<B, 2>) {
        (self.cos.clone(), self.sin.clone())
    }

    /// Rotates `x: [B, S, H, head_dim]` (`x * cos + rotate_half(x) * sin`) and returns it
    /// head-major, `[B, H, S, head_dim]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4>
    where
        B: MoeBackend,
    {
        rotary(x, self.cos.clone(), self.sin.clone())
    }
}
