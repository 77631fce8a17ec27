//! One AdamW step as burn's `AdamW` takes it, op by op.

use burn::tensor::Tensor;
use burn::tensor::TensorMetadata;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use super::flat;
use crate::AdamWStep;

/// One AdamW step as burn's `AdamW` takes it, op by op; see
/// [`crate::MoeBackend::adamw_step`].
pub fn adamw_step<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    moment_1: FloatTensor<B>,
    moment_2: FloatTensor<B>,
    step: AdamWStep,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let shape = param.shape();
    let (b1, b2) = (step.beta_1, step.beta_2);
    let grad = flat::<B>(grad);
    let m = flat::<B>(moment_1).mul_scalar(b1) + grad.clone().mul_scalar(1.0 - b1);
    let v = flat::<B>(moment_2).mul_scalar(b2) + grad.square().mul_scalar(1.0 - b2);
    let m_hat = m.clone().div_scalar(1.0 - b1.powi(step.time));
    let v_hat = v.clone().div_scalar(1.0 - b2.powi(step.time));
    let delta = m_hat / (v_hat.sqrt().add_scalar(step.epsilon));
    let decay = step.lr * f64::from(step.weight_decay);
    let param = flat::<B>(param).mul_scalar(1.0 - decay) - delta.mul_scalar(step.lr);
    let shaped = |t: Tensor<B, 1>| B::float_reshape(t.into_primitive().tensor(), shape.clone());
    (shaped(param), shaped(m), shaped(v))
}
