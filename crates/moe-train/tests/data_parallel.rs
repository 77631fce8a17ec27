//! Data-parallel training on one CPU: two replicas with batch B follow the trajectory of
//! one replica with batch 2B, and a replica that stops or never joins makes the others
//! fail with a clear error instead of waiting forever.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, Flex};
use burn::collective::ReduceOperation;
use burn::tensor::Tensor;
use moe_train::NonFinite;
use moe_train::data_parallel::{Cluster, Peer, reset};
use moe_train::model_tensors;
use moe_train::{RunConfig, load_model, train};

type B = Autodiff<Flex>;

/// The collective of a backend is process-wide: these tests take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tiny MoE run: dropless, bias balancing and z-loss on, no balancing loss (it is a
/// product of two batch means, so a mean over replicas of it differs from the loss of
/// the whole batch).
fn config(data: &Path, replicas: usize, batch_size: usize) -> RunConfig {
    let text = format!(
        r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 2
max_seq_len = 32

[moe]
n_experts = 4
top_k = 2
expert_ffn_dim = 32
aux_loss_weight = 0.0
z_loss_weight = 0.001
bias_update_rate = 0.001

[data]
dataset = "{}"
tokenizer = "byte"
validation_works = ["twelfth_night"]
seq_len = 32

[train]
batch_size = {batch_size}
replicas = {replicas}
steps = 6
lr = 3e-3
warmup_steps = 2
log_every = 1
eval_every = 6
eval_batches = 2
checkpoint_every = 6
"#,
        data.display()
    );
    RunConfig::parse(&text, &[]).unwrap()
}

#[test]
fn two_replicas_follow_the_trajectory_of_one_with_twice_the_batch() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(
        dir.path(),
        &[
            ("hamlet", 40_000),
            ("macbeth", 40_000),
            ("twelfth_night", 8_000),
        ],
    );
    let (single, parallel) = (dir.path().join("single"), dir.path().join("parallel"));
    let one = config(&data, 1, 8);
    let two = config(&data, 2, 4);
    assert_eq!(one.tokens_per_step(), two.tokens_per_step());
    let local = Cluster::default();
    train::<B>(&one, &single, false, None, &local, |_| {}).unwrap();
    let outcome = train::<B>(&two, &parallel, false, None, &local, |_| {}).unwrap();
    assert_eq!(outcome.steps, 6);

    let (a, b) = (
        common::train_losses(&single),
        common::train_losses(&parallel),
    );
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4, "step {step}: {x} vs {y}");
    }
    assert!(a[5].1 < a[0].1, "the loss falls: {a:?}");

    let load = |dir: &Path| {
        model_tensors(
            &load_model::<Flex>(dir, &Default::default(), NonFinite::Refuse)
                .unwrap()
                .model,
        )
        .unwrap()
    };
    let (x, y) = (load(&single), load(&parallel));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    for (name, tensor) in &x {
        let diff = common::max_abs_diff(&tensor.data, &y[name].data);
        assert!(diff < 1e-4, "{name} differs by {diff}");
    }
}

#[test]
fn a_replica_that_never_joins_is_an_error_after_the_timeout() {
    let _serial = serial();
    reset::<Flex>();
    let started = Instant::now();
    let err = Peer::<Flex>::join(0, 2, None, &Default::default(), Duration::from_millis(300))
        .err()
        .expect("one of two replicas cannot complete the collective");
    let message = format!("{err:#}");
    assert!(message.contains("never joined"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_replica_that_stops_makes_the_other_fail_instead_of_hanging() {
    let _serial = serial();
    reset::<Flex>();
    let timeout = Duration::from_millis(500);
    let device = Default::default();
    let other = std::thread::spawn(move || {
        // Joins, takes part in one all-reduce, then stops without a word.
        let peer = Peer::<Flex>::join(1, 2, None, &device, timeout).unwrap();
        let ones = Tensor::<Flex, 1>::ones([3], &device);
        peer.all_reduce(ones, ReduceOperation::Sum).unwrap()
    });
    let peer = Peer::<Flex>::join(0, 2, None, &device, timeout).unwrap();
    let twos = Tensor::<Flex, 1>::full([3], 2.0, &device);
    let sum = peer.all_reduce(twos, ReduceOperation::Sum).unwrap();
    assert_eq!(sum.to_data().to_vec::<f32>().unwrap(), vec![3.0; 3]);
    assert_eq!(
        other.join().unwrap().to_data().to_vec::<f32>().unwrap(),
        vec![3.0; 3]
    );

    let err = peer
        .all_reduce(Tensor::ones([3], &device), ReduceOperation::Sum)
        .unwrap_err();
    assert!(format!("{err:#}").contains("a replica stopped"), "{err:#}");
}
