//! The output head and its loss as tensor ops: the logits matmul, a log-sum-exp and the
//! `softmax - onehot` gradient of the logits.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use super::{float, int};

/// `(nll, dlogits)` of the logits `x weight` (see
/// [`crate::MoeBackend::linear_cross_entropy_forward`]), from `B`'s matmul and softmax.
pub fn linear_cross_entropy_forward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let logits = float::<B, 2>(x).matmul(float(weight));
    let targets: Tensor<B, 2, Int> = int::<B, 1>(targets).unsqueeze_dim(1);
    let max = logits.clone().max_dim(1);
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let nll = lse.clone() - logits.clone().gather(1, targets.clone());
    let probs = (logits - lse).exp();
    let ones = Tensor::ones(targets.dims(), &probs.device());
    let dlogits = probs.scatter(1, targets, ones.neg(), IndexingUpdateOp::Add);
    (
        nll.squeeze_dim::<1>(1).into_primitive().tensor(),
        dlogits.into_primitive().tensor(),
    )
}

/// `(d_x, d_weight)` of the per-row NLL given its gradient `grad: [N]`; see
/// [`crate::MoeBackend::linear_cross_entropy_backward`].
pub fn linear_cross_entropy_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    dlogits: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let grad = float::<B, 1>(grad).unsqueeze_dim::<2>(1);
    let dlogits = float::<B, 2>(dlogits) * grad;
    let d_x = dlogits.clone().matmul(float::<B, 2>(weight).transpose());
    let d_weight = float::<B, 2>(x).transpose().matmul(dlogits);
    (
        d_x.into_primitive().tensor(),
        d_weight.into_primitive().tensor(),
    )
}
