//! Global gradient-norm clipping (burn's own clipping is per parameter). Parameters may
//! sit on several devices (expert placement): the norm is summed on the main device.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use moe_model::MoeAutodiffBackend;
use moe_model::ops::transfer;

struct SquaredNorm<'a, B: MoeAutodiffBackend> {
    grads: &'a GradientsParams,
    device: &'a B::Device,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: MoeAutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let squares = transfer(grad.square().sum(), self.device);
            self.total = Some(match self.total.take() {
                Some(total) => total + squares,
                None => squares,
            });
        }
    }
}

struct Scale<'a, B: MoeAutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: Tensor<B::InnerBackend, 1>,
}

impl<B: MoeAutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let factor = transfer(self.factor.clone(), &grad.device()).reshape([1; D]);
            self.grads.register(param.id, grad * factor);
        }
    }
}

/// Scales all gradients of `module` so their global L2 norm is at most `max_norm`
/// (0 disables clipping). Returns the norm before clipping, kept on the device.
pub fn clip_global_norm<B: MoeAutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
    device: &B::Device,
) -> Tensor<B::InnerBackend, 1> {
    let mut norm = SquaredNorm::<B> {
        grads,
        device,
        total: None,
    };
    module.visit(&mut norm);
    let norm = match norm.total {
        Some(total) => total.sqrt(),
        None => Tensor::zeros([1], device),
    };
    if max_norm > 0.0 {
        let factor = (norm.clone() + 1e-6)
            .recip()
            .mul_scalar(max_norm)
            .clamp_max(1.0);
        module.visit(&mut Scale::<B> { grads, factor });
    }
    norm
}
