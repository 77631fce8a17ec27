//! Learning-rate schedule: linear warm-up, then cosine decay to `min_lr`.

use crate::config::TrainConfig;

/// Learning rate of optimiser step `step` (0-based). A pure function of the step, so a
/// resumed run follows the same schedule.
pub fn learning_rate(config: &TrainConfig, step: usize) -> f64 {
    let warmup = config.warmup_steps;
    if step < warmup {
        return config.lr * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = config.steps.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    config.min_lr + (config.lr - config.min_lr) * cosine
}
