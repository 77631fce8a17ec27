//! AdamW taking each parameter's step as the backend's fused operation
//! ([`MoeBackend::adamw_step`]: one pass on flex where burn's `AdamW` makes about fifteen).
//! Its state is burn's `AdamWState`, so optimiser records written by either load into
//! the other and checkpoints from before it resume unchanged.

use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::{Device, Tensor, TensorPrimitive};
use moe_model::ops::AdamWStep;
use moe_model::{MoeAutodiffBackend, MoeBackend, Transformer};

use crate::config::TrainConfig;

/// AdamW's hyper-parameters (the learning rate comes with each step).
#[derive(Debug, Clone, Copy)]
pub struct FusedAdamW {
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// Added to the root of the second moment.
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

impl FusedAdamW {
    /// The run's AdamW.
    pub fn new(train: &TrainConfig) -> Self {
        Self {
            beta_1: train.beta1 as f32,
            beta_2: train.beta2 as f32,
            epsilon: train.eps as f32,
            weight_decay: train.weight_decay as f32,
        }
    }

    /// The optimiser of a model's parameters.
    pub fn init<B: MoeAutodiffBackend>(self) -> OptimizerAdaptor<Self, Transformer<B>, B> {
        OptimizerAdaptor::from(self)
    }
}

impl<B: MoeBackend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let (time, moment_1, moment_2) = match state {
            Some(AdamWState { momentum: m }) => (m.time + 1, m.moment_1, m.moment_2),
            None => (1, grad.zeros_like(), grad.zeros_like()),
        };
        let step = AdamWStep {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            time: i32::try_from(time).unwrap_or(i32::MAX),
        };
        let primitive = |t: Tensor<B, D>| t.into_primitive().tensor();
        let (param, moment_1, moment_2) = B::adamw_step(
            primitive(tensor),
            primitive(grad),
            primitive(moment_1),
            primitive(moment_2),
            step,
        );
        let tensor = |t| Tensor::from_primitive(TensorPrimitive::Float(t));
        let momentum = AdaptiveMomentumState::new(time, tensor(moment_1), tensor(moment_2));
        (tensor(param), Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device<B>) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}
