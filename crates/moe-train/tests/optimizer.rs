//! The fused AdamW against burn's `AdamW`: the same parameters step by step, and optimiser
//! records that load into either (checkpoints written before it resume unchanged).

use burn::backend::{Autodiff, Flex, Wgpu};
use burn::nn::{Linear, LinearConfig};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::record::Recorder;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use moe_model::MoeBackend;
use moe_train::FusedAdamW;
use moe_train::recorder;

const HYPER: FusedAdamW = FusedAdamW {
    beta_1: 0.8,
    beta_2: 0.95,
    epsilon: 1e-6,
    weight_decay: 0.1,
};

fn burn_adamw() -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(HYPER.beta_1)
        .with_beta_2(HYPER.beta_2)
        .with_epsilon(HYPER.epsilon)
        .with_weight_decay(HYPER.weight_decay)
}

/// Gradients of a loss of `model` that changes with `step`.
fn grads<B: AutodiffBackend>(model: &Linear<B>, step: usize) -> GradientsParams {
    let device = model.weight.device();
    let x = Tensor::<B, 2>::from_floats([[1.0, -2.0, 0.5], [0.3, 0.7, -1.5]], &device)
        .mul_scalar(step as f64 + 1.0);
    let loss = model.forward(x).powi_scalar(2).sum();
    GradientsParams::from_grads(loss.backward(), model)
}

fn weights<B: AutodiffBackend>(model: &Linear<B>) -> Vec<f32> {
    let mut values: Vec<f32> = model.weight.val().into_data().to_vec().unwrap();
    values.extend(
        model
            .bias
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap(),
    );
    values
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Steps `model` with `optimizer` at `lrs`, from step `first`.
fn run<B: AutodiffBackend, O: Optimizer<Linear<B>, B>>(
    mut model: Linear<B>,
    optimizer: &mut O,
    first: usize,
    lrs: &[f64],
) -> Linear<B> {
    for (i, &lr) in lrs.iter().enumerate() {
        let grads = grads(&model, first + i);
        model = optimizer.step(lr, model, grads);
    }
    model
}

fn matches_burn_adamw<B: AutodiffBackend<InnerBackend: MoeBackend>>() {
    let device = Default::default();
    let model: Linear<B> = LinearConfig::new(3, 4).init(&device);
    // Draw the lazily initialised weights now, so the clones below share them.
    let initial = weights(&model);
    let mut fused = OptimizerAdaptor::<FusedAdamW, Linear<B>, B>::from(HYPER);
    let mut reference = burn_adamw().init::<B, Linear<B>>();
    let lrs = [1e-2, 3e-2, 2e-2, 5e-3];
    let a = run(model.clone(), &mut fused, 0, &lrs);
    let b = run(model.clone(), &mut reference, 0, &lrs);
    assert_close(&weights(&a), &weights(&b), "weights after 4 steps");
    assert!(weights(&a) != initial, "the steps changed the weights");

    // Burn's record, saved and loaded into the fused optimiser, continues the same way.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer");
    let mut reference = burn_adamw().init::<B, Linear<B>>();
    let half = run(model.clone(), &mut reference, 0, &lrs[..2]);
    recorder()
        .record(reference.to_record(), path.clone())
        .unwrap();
    let record = recorder().load(path, &device).unwrap();
    let mut fused = OptimizerAdaptor::<FusedAdamW, Linear<B>, B>::from(HYPER).load_record(record);
    let resumed = run(half.clone(), &mut fused, 2, &lrs[2..]);
    let continued = run(half, &mut reference, 2, &lrs[2..]);
    assert_close(&weights(&resumed), &weights(&continued), "resumed weights");
}

#[test]
fn fused_adamw_matches_burn_adamw_on_flex() {
    matches_burn_adamw::<Autodiff<Flex>>();
}

/// Wgpu takes the tensor-op reference of the fused step.
#[test]
fn fused_adamw_matches_burn_adamw_on_wgpu() {
    matches_burn_adamw::<Autodiff<Wgpu>>();
}
