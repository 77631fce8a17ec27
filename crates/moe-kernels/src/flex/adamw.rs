//! The AdamW step on flex: one parallel pass over the parameter, its gradient and the two
//! moments.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, TensorMetadata};
use rayon::prelude::*;

use super::layout::{f32_rows, writable};
use super::output::ELEMENTWISE_CHUNK;
use super::simd::vectorized;
use crate::{AdamWStep, reference};

/// One pass over the four arrays, updating the parameter and the moments in place
/// when the optimiser holds the only reference to them (burn's `AdamW` makes about
/// fifteen passes, each allocating its result).
pub(super) fn adamw_step(
    param: FlexTensor,
    grad: FlexTensor,
    moment_1: FlexTensor,
    moment_2: FlexTensor,
    step: AdamWStep,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let n = param.shape().num_elements();
    let f32_of_one_size = [&param, &grad, &moment_1, &moment_2]
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.shape().num_elements() == n);
    let Some(g) = f32_rows(&grad).filter(|_| f32_of_one_size) else {
        return reference::adamw_step::<Flex>(param, grad, moment_1, moment_2, step);
    };
    let (mut param, mut m, mut v) = (writable(param), writable(moment_1), writable(moment_2));
    let (b1, b2, eps) = (step.beta_1, step.beta_2, step.epsilon);
    let (c1, c2) = (1.0 - b1.powi(step.time), 1.0 - b2.powi(step.time));
    let keep = (1.0 - step.lr * f64::from(step.weight_decay)) as f32;
    let lr = step.lr as f32;
    param
        .storage_mut::<f32>()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(m.storage_mut::<f32>().par_chunks_mut(ELEMENTWISE_CHUNK))
        .zip(v.storage_mut::<f32>().par_chunks_mut(ELEMENTWISE_CHUNK))
        .zip(g.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(((p, m), v), g)| {
            vectorized(
                #[inline(always)]
                || {
                    for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                        *m = *m * b1 + g * (1.0 - b1);
                        *v = *v * b2 + g * g * (1.0 - b2);
                        let delta = (*m / c1) / ((*v / c2).sqrt() + eps);
                        *p = *p * keep - delta * lr;
                    }
                },
            )
        });
    (param, m, v)
}
