//! Training end to end on a small slice of the corpus: the loss falls, a resumed run
//! matches an uninterrupted one, checkpoints load, and bad configs are rejected by name.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use moe_data::{PrepareOptions, TokenizerChoice, ValidationSplit, prepare};
use moe_train::MetricRecord;
use moe_train::NonFinite;
use moe_train::SourceConfig;
use moe_train::data_parallel::Cluster;
use moe_train::model_tensors;
use moe_train::{LayerLoad, coefficient_of_variation, max_violation};
use moe_train::{MemoryEstimate, RunConfig, RunLock, load_model, train, verify_checkpoint};

type B = Autodiff<Flex>;

/// The backend's random generator is process-wide: tests that train take turns so each
/// run's initialisation and jitter draw from its own seed only.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small dataset: slices of three shipped works (two to train on, one held out).
fn dataset(dir: &Path) -> PathBuf {
    common::dataset(
        dir,
        &[
            ("hamlet", 60_000),
            ("macbeth", 60_000),
            ("twelfth_night", 8_000),
        ],
    )
}

fn config_text(data: &Path) -> String {
    format!(
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
aux_loss_weight = 0.01
z_loss_weight = 0.001

[data]
dataset = "{}"
tokenizer = "byte"
validation_works = ["twelfth_night"]
seq_len = 32

[train]
batch_size = 8
steps = 40
lr = 3e-3
warmup_steps = 5
log_every = 5
eval_every = 20
eval_batches = 4
checkpoint_every = 20
"#,
        data.display()
    )
}

#[test]
fn training_lowers_the_loss_and_writes_a_loadable_checkpoint() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = RunConfig::parse(&config_text(&dataset(dir.path())), &[]).unwrap();
    let run = dir.path().join("run");
    let outcome = train::<B>(&config, &run, false, None, &Cluster::default(), |_| {}).unwrap();
    assert_eq!(outcome.steps, 40);
    let losses = common::train_losses(&run);
    assert_eq!(losses.len(), 8);
    let (first, last) = (losses[0].1, losses[losses.len() - 1].1);
    assert!(last < first - 1.0, "loss should fall: {first} -> {last}");
    assert!(outcome.final_eval.bpb.is_finite() && outcome.final_eval.bpb < 8.0);
    for file in ["config.toml", "tokenizer.json", "metrics.jsonl"] {
        assert!(run.join(file).is_file(), "{file} in the run directory");
    }
    let events = std::fs::read_dir(run.join("tensorboard")).unwrap().count();
    assert!(events > 0, "TensorBoard event file written");

    // Periodic evaluations score fixed windows; the last step also the whole split.
    let evals: Vec<(usize, bool, usize)> = common::records(&run)
        .into_iter()
        .filter_map(|r| match r {
            MetricRecord::Eval { step, full, result } => Some((step, full, result.tokens)),
            _ => None,
        })
        .collect();
    let fixed = evals[0].2;
    assert_eq!(
        fixed,
        4 * 8 * 32,
        "eval_batches x batch_size x seq_len tokens"
    );
    let steps: Vec<(usize, bool)> = evals.iter().map(|e| (e.0, e.1)).collect();
    assert_eq!(steps, [(20, false), (40, false), (40, true)]);
    assert!(evals[2].2 > fixed, "the whole split is larger");
    assert_eq!(outcome.final_eval.tokens, evals[2].2);

    let loaded = load_model::<Flex>(&run, &Default::default(), NonFinite::Refuse).unwrap();
    assert!(loaded.checkpoint.ends_with("step-00000040"));
    assert_eq!(loaded.config, config);

    // A truncated model file is an error that names the checkpoint, not a panic.
    let model_file = loaded.checkpoint.join("model.mpk");
    let bytes = std::fs::read(&model_file).unwrap();
    std::fs::write(&model_file, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!(
        "{:#}",
        load_model::<Flex>(&loaded.checkpoint, &Default::default(), NonFinite::Refuse)
            .err()
            .unwrap()
    );
    assert!(err.contains("step-00000040"), "{err}");

    // Refuses to overwrite without --resume.
    let err = train::<B>(&config, &run, false, None, &Cluster::default(), |_| {}).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
}

#[test]
fn resume_matches_the_uninterrupted_run() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    // Constant LR so the schedule does not depend on the step budget of the first leg.
    let overrides = |steps: usize| {
        vec![
            format!("train.steps={steps}"),
            "train.log_every=1".into(),
            "train.checkpoint_every=3".into(),
            "train.warmup_steps=0".into(),
            "train.min_lr=3e-3".into(),
            "moe.bias_update_rate=1e-3".into(),
            "moe.jitter=0.01".into(),
        ]
    };
    let text = config_text(&data);
    let full = RunConfig::parse(&text, &overrides(6)).unwrap();
    let straight = dir.path().join("straight");
    train::<B>(&full, &straight, false, None, &Cluster::default(), |_| {}).unwrap();

    // The later runs reuse the data the first one prepared into the cache.
    let mut lines = Vec::new();
    let mut log = |line: &str| lines.push(line.to_string());
    let interrupted = dir.path().join("interrupted");
    let first_leg = RunConfig::parse(&text, &overrides(3)).unwrap();
    train::<B>(
        &first_leg,
        &interrupted,
        false,
        None,
        &Cluster::default(),
        &mut log,
    )
    .unwrap();
    train::<B>(
        &full,
        &interrupted,
        true,
        None,
        &Cluster::default(),
        &mut log,
    )
    .unwrap();
    assert!(!lines.iter().any(|l| l.contains("preparing")), "{lines:?}");

    let (a, b) = (
        common::train_losses(&straight),
        common::train_losses(&interrupted),
    );
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6, "metrics.jsonl holds each step once");
    for ((step_a, loss_a), (step_b, loss_b)) in a.iter().zip(&b) {
        assert_eq!(step_a, step_b);
        assert!(
            (loss_a - loss_b).abs() < 1e-4,
            "step {step_a}: {loss_a} vs {loss_b}"
        );
    }

    // A different model cannot resume this run.
    let other =
        RunConfig::parse(&text, &[overrides(6), vec!["moe.top_k=1".into()]].concat()).unwrap();
    let err = train::<B>(
        &other,
        &interrupted,
        true,
        None,
        &Cluster::default(),
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("[moe]"), "{err}");
}

/// A run directory is held by one process; a damaged newest checkpoint is refused by
/// readers and skipped by --resume, which falls back to the newest intact one.
#[test]
fn runs_are_locked_and_resume_past_a_damaged_checkpoint() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&dataset(dir.path()));
    let config = |steps: usize| {
        let overrides = [
            format!("train.steps={steps}"),
            "train.checkpoint_every=4".into(),
        ];
        RunConfig::parse(&text, &overrides).unwrap()
    };
    let run = dir.path().join("run");
    train::<B>(&config(8), &run, false, None, &Cluster::default(), |_| {}).unwrap();

    // Another process's lock (another handle here) refuses a second run at once.
    let lock = RunLock::acquire(&run).unwrap();
    let err = train::<B>(&config(12), &run, true, None, &Cluster::default(), |_| {});
    let err = format!("{:#}", err.unwrap_err());
    let pid = std::process::id().to_string();
    assert!(err.contains("in use") && err.contains(&pid), "{err}");
    drop(lock);

    // One flipped byte in the newest checkpoint: named by readers.
    let newest = run.join("checkpoints/step-00000008");
    let model_file = newest.join("model.mpk");
    let mut bytes = std::fs::read(&model_file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&model_file, &bytes).unwrap();
    let err = load_model::<Flex>(&run, &Default::default(), NonFinite::Refuse).err();
    let err = format!("{:#}", err.unwrap());
    assert!(
        err.contains("damaged") && err.contains("model.mpk"),
        "{err}"
    );

    // --resume skips it, says so, and trains on from step 4.
    let mut lines = Vec::new();
    let outcome = train::<B>(&config(12), &run, true, None, &Cluster::default(), |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert_eq!(outcome.steps, 12);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("step-00000008") && l.contains("skipping")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("resumed from") && l.contains("step-00000004")),
        "{lines:?}"
    );
    let steps: Vec<usize> = common::train_losses(&run).iter().map(|r| r.0).collect();
    assert_eq!(steps, [5, 10, 12], "metrics.jsonl went back to step 4 too");
    load_model::<Flex>(&run, &Default::default(), NonFinite::Refuse).unwrap();

    // A truncated file is named with its size.
    let newest = run.join("checkpoints/step-00000012");
    let optimizer_file = newest.join("optimizer.mpk");
    let bytes = std::fs::read(&optimizer_file).unwrap();
    std::fs::write(&optimizer_file, &bytes[..bytes.len() / 3]).unwrap();
    let err = format!("{:#}", verify_checkpoint(&newest).unwrap_err());
    assert!(
        err.contains("optimizer.mpk") && err.contains("truncated"),
        "{err}"
    );
}

/// Reading a run directory while its run writes a checkpoint every step and keeps only
/// the newest: every read gets a whole checkpoint, never a half-pruned one.
#[test]
fn a_run_directory_reads_whole_checkpoints_while_it_prunes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&dataset(dir.path()));
    let overrides = [
        "train.steps=60",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=1",
        "train.eval_every=1000",
    ]
    .map(String::from);
    let config = RunConfig::parse(&text, &overrides).unwrap();
    let run = dir.path().join("run");
    let first = RunConfig::parse(&text, &["train.steps=1".into()]).unwrap();
    train::<B>(&first, &run, false, None, &Cluster::default(), |_| {}).unwrap();
    std::thread::scope(|scope| {
        let writer = scope
            .spawn(|| train::<B>(&config, &run, true, None, &Cluster::default(), |_| {}).unwrap());
        let mut reads = 0;
        while !writer.is_finished() || reads == 0 {
            let loaded = load_model::<Flex>(&run, &Default::default(), NonFinite::Refuse);
            let loaded = loaded.unwrap_or_else(|e| panic!("read {reads}: {e:#}"));
            assert!(loaded.checkpoint.starts_with(run.join("checkpoints")));
            reads += 1;
        }
        assert_eq!(writer.join().unwrap().steps, 60);
    });
}

/// A run that cannot start (here: a binary file among the texts) leaves no run
/// directory behind, and names the file.
#[test]
fn a_run_that_fails_to_start_leaves_no_directory() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    std::fs::write(data.join("image.txt"), b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
    let config = RunConfig::parse(&config_text(&data), &[]).unwrap();
    let run = dir.path().join("run");
    let err = train::<B>(&config, &run, false, None, &Cluster::default(), |_| {});
    let err = format!("{:#}", err.unwrap_err());
    assert!(
        err.contains("image.txt") && err.contains("NUL byte at offset 8"),
        "{err}"
    );
    assert!(!run.exists(), "the failed run's directory was removed");
}

/// The memory estimate of a config counts every parameter four times (weights,
/// gradients, AdamW's moments) plus activations, and refuses a limit it exceeds.
#[test]
fn a_config_larger_than_the_memory_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = RunConfig::parse(&config_text(&dataset(dir.path())), &[]).unwrap();
    let estimate = MemoryEstimate::training(&config).unwrap();
    let model =
        moe_model::Transformer::<Flex>::new(&config.model, &config.moe, &Default::default())
            .unwrap();
    assert_eq!(estimate.parameters, model.num_params() as u64);
    assert!(estimate.bytes > 16 * estimate.parameters);
    estimate.ensure_within(estimate.bytes, "the limit").unwrap();
    let err = estimate
        .ensure_within(estimate.bytes - 1, "the limit")
        .unwrap_err();
    assert!(err.to_string().contains("training needs about"), "{err}");

    // A billion-token vocabulary is refused by the estimate, before any allocation.
    let mut huge = config.clone();
    huge.model.vocab_size = 1_000_000_000;
    let estimate = MemoryEstimate::training(&huge).unwrap();
    assert!(estimate.ensure_within(1 << 40, "1 TiB").is_err());
    // Shapes whose sizes overflow are named, not a panic.
    huge.model.d_model = 1 << 62;
    let err = MemoryEstimate::training(&huge).unwrap_err();
    assert!(err.to_string().contains("model.d_model"), "{err}");
}

/// Experts spread over two devices (two handles of the CPU here) train exactly as on one,
/// and a placed run resumes where it stopped (its optimiser state is found again).
#[test]
fn expert_placement_trains_like_one_device_and_resumes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let overrides = |steps: usize, expert_devices: usize| {
        vec![
            format!("train.steps={steps}"),
            format!("train.expert_devices={expert_devices}"),
            "train.log_every=1".into(),
            "train.checkpoint_every=3".into(),
            "train.warmup_steps=0".into(),
            "train.min_lr=3e-3".into(),
            "train.grad_clip=0.5".into(),
            "moe.bias_update_rate=1e-3".into(),
        ]
    };
    let text = config_text(&data);
    let run = |name: &str, steps: usize, expert_devices: usize, resume: bool| {
        let config = RunConfig::parse(&text, &overrides(steps, expert_devices)).unwrap();
        let dir = dir.path().join(name);
        let mut lines = Vec::new();
        train::<B>(&config, &dir, resume, None, &Cluster::default(), |line| {
            lines.push(line.to_string())
        })
        .unwrap();
        (dir, lines)
    };
    let (one_device, _) = run("one", 6, 1, false);
    let (placed, lines) = run("placed", 6, 2, false);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("experts placed over 2 devices")),
        "{lines:?}"
    );
    run("interrupted", 3, 2, false);
    let (interrupted, _) = run("interrupted", 6, 2, true);

    let reference = common::train_losses(&one_device);
    assert_eq!(reference.len(), 6);
    for other in [&placed, &interrupted] {
        let losses = common::train_losses(other);
        assert_eq!(losses.len(), 6);
        for ((step, x), (_, y)) in reference.iter().zip(&losses) {
            assert!(
                (x - y).abs() < 1e-5,
                "{}: step {step}: {x} vs {y}",
                other.display()
            );
        }
    }
    // Checkpoints hold the stacked weights: they load on one device like any other.
    let load = |dir: &Path| {
        model_tensors(
            &load_model::<Flex>(dir, &Default::default(), NonFinite::Refuse)
                .unwrap()
                .model,
        )
        .unwrap()
    };
    let expected = load(&one_device);
    for other in [&placed, &interrupted] {
        let got = load(other);
        assert_eq!(
            expected.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        for (name, tensor) in &expected {
            let diff = common::max_abs_diff(&tensor.data, &got[name].data);
            assert!(diff < 1e-5, "{}: {name} differs by {diff}", other.display());
        }
    }
}

#[test]
fn bad_configs_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&dataset(dir.path()));
    for (overrides, field) in [
        (vec!["moe.top_k=5"], "moe.top_k"),
        (vec!["moe.capacity_factor=0"], "moe.capacity_factor"),
        (vec!["moe.capacity_factor=-1.5"], "moe.capacity_factor"),
        (vec!["model.d_model=33"], "model.d_model"),
        (vec!["model.n_kv_heads=3"], "model.n_kv_heads"),
        (vec!["data.dataset=\"/no/such/dir\""], "data.dataset"),
        (vec!["data.seq_len=64"], "data.seq_len"),
        (vec!["model.vocab_size=4096"], "model.vocab_size"),
        (vec!["train.lr=0"], "train.lr"),
        (vec!["train.batch_size=0"], "train.batch_size"),
        (vec!["train.expert_devices=5"], "train.expert_devices"),
        (
            vec!["train.expert_devices=2", "train.replicas=2"],
            "train.expert_devices",
        ),
        (vec!["moe.typo_key=1"], "typo_key"),
        (vec!["moe.router=\"softmax\""], "softmax"),
        (vec!["nosection"], "section.key=value"),
    ] {
        let overrides: Vec<String> = overrides.into_iter().map(String::from).collect();
        let err = format!("{:#}", RunConfig::parse(&text, &overrides).unwrap_err());
        assert!(
            err.contains(field),
            "{overrides:?}: error `{err}` should name `{field}`"
        );
    }
    let err = format!(
        "{:#}",
        RunConfig::parse(&format!("{text}\n[extra]\nx = 1\n"), &[]).unwrap_err()
    );
    assert!(err.contains("extra"), "{err}");
}

/// Two prepared sets of JSON lines (byte tokenizer) under `dir`, and a third made with
/// a BPE.
fn prepared_sets(dir: &Path) -> [PathBuf; 3] {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/shakespeare");
    let make = |name: &str, work: &str, tokenizer: TokenizerChoice| {
        let text = std::fs::read_to_string(source.join(format!("{work}.txt"))).unwrap();
        let lines: String = text[..50_000]
            .split("\n\n")
            .map(|s| serde_json::json!({ "text": s }).to_string() + "\n")
            .collect();
        let input = dir.join(format!("{name}.jsonl"));
        std::fs::write(&input, lines).unwrap();
        let mut options = PrepareOptions::new(vec![input], dir.join(name));
        options.tokenizer = tokenizer;
        options.validation = ValidationSplit::Fraction(0.1);
        prepare(&options, &mut |_| {}).unwrap();
        dir.join(name)
    };
    [
        make("hamlet", "hamlet", TokenizerChoice::Bytes),
        make("lear", "lear", TokenizerChoice::Bytes),
        make("bpe", "lear", TokenizerChoice::TrainBpe { vocab_size: 300 }),
    ]
}

#[test]
fn trains_on_a_mixture_of_prepared_sets_and_checks_them_against_the_model() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let [hamlet, lear, bpe] = prepared_sets(dir.path());
    let base = config_text(Path::new("unused"));
    let base: String = base
        .lines()
        .filter(|l| {
            !["dataset", "tokenizer", "validation_works"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let mixture = base.replace(
        "[train]",
        &format!(
            "[[data.sources]]\npath = \"{}\"\nweight = 3\n\n[[data.sources]]\npath = \"{}\"\n\n[train]",
            hamlet.display(),
            lear.display()
        ),
    );
    let config = RunConfig::parse(&mixture, &["train.steps=4".into()]).unwrap();
    let mut lines = Vec::new();
    let run = dir.path().join("run");
    let outcome = train::<B>(&config, &run, false, None, &Cluster::default(), |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert!(outcome.final_eval.bpb.is_finite());
    let mixture_line = lines.iter().find(|l| l.starts_with("mixture:")).unwrap();
    assert!(
        mixture_line.contains("hamlet 0.") && mixture_line.contains("lear 0."),
        "{mixture_line}"
    );
    let saved = RunConfig::parse_saved(&run.join("config.toml")).unwrap();
    assert_eq!(saved.data.sources.len(), 2);
    assert_eq!(saved.data.sources[0].weight, 3.0);

    let with = |overrides: &[&str]| {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        RunConfig::parse(&base, &overrides)
    };
    let err = format!(
        "{:#}",
        with(&[&format!(
            "data.prepared=\"{}\"",
            dir.path().join("absent").display()
        )])
        .unwrap_err()
    );
    assert!(err.contains("data.prepared"), "{err}");
    let err = format!(
        "{:#}",
        with(&[
            &format!("data.prepared=\"{}\"", hamlet.display()),
            "data.tokenizer=\"byte\""
        ])
        .unwrap_err()
    );
    assert!(err.contains("data.tokenizer"), "{err}");
    // A vocabulary larger than the model's is refused before training.
    let config = with(&[&format!("data.prepared=\"{}\"", bpe.display())]).unwrap();
    let err = format!(
        "{:#}",
        train::<B>(
            &config,
            &dir.path().join("bpe-run"),
            false,
            None,
            &Cluster::default(),
            |_| {}
        )
        .unwrap_err()
    );
    assert!(
        err.contains("vocabulary of 300 tokens but model.vocab_size is 256"),
        "{err}"
    );
    // So is a mixture of two tokenizers.
    let prepared = format!("data.prepared=\"{}\"", hamlet.display());
    let mut config = with(&[&prepared, "model.vocab_size=300"]).unwrap();
    config.data.prepared = None;
    config.data.sources = [&hamlet, &bpe]
        .map(|path| SourceConfig {
            path: path.clone(),
            weight: 1.0,
        })
        .to_vec();
    let err = format!(
        "{:#}",
        train::<B>(
            &config,
            &dir.path().join("mixed"),
            false,
            None,
            &Cluster::default(),
            |_| {}
        )
        .unwrap_err()
    );
    assert!(err.contains("different tokenizers"), "{err}");
}

#[test]
fn shipped_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for name in ["tiny", "tiny-dense", "small"] {
        let path = root.join(format!("configs/{name}.toml"));
        let data = root.join("datasets/shakespeare");
        let config = RunConfig::load(&path, &[format!("data.dataset=\"{}\"", data.display())])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(config.train.steps > 0);
    }
}

#[test]
fn load_metrics_match_hand_computed_values() {
    let balanced = [0.25, 0.25, 0.25, 0.25];
    assert_eq!(coefficient_of_variation(&balanced), 0.0);
    assert_eq!(max_violation(&balanced), 0.0);
    // load [0.5, 0.25, 0.25, 0]: mean 0.25, std = sqrt((0.0625 + 0 + 0 + 0.0625) / 4) = 0.1768.
    let skewed = [0.5, 0.25, 0.25, 0.0];
    assert!((coefficient_of_variation(&skewed) - 0.03125f64.sqrt() / 0.25).abs() < 1e-12);
    assert!((max_violation(&skewed) - 1.0).abs() < 1e-12);
    let layer = LayerLoad::new(&[6.0, 2.0], 1.0, 8.0, 0.5, 3.0);
    assert_eq!(layer.load, vec![0.75, 0.25]);
    assert!((layer.dropped - 0.125).abs() < 1e-12);
}

#[test]
fn wgpu_kernels_train_like_the_reference_path() {
    // Five steps on wgpu with the CubeCL dispatch kernels and with the tensor-op reference
    // path, dropless (packed, grouped matmul) and with a capacity (padded, dropping).
    type W = Autodiff<burn::backend::Wgpu>;
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&dataset(dir.path()));
    for capacity in [None, Some("1.0")] {
        let mut overrides = vec![
            "train.steps=5".to_string(),
            "train.log_every=1".into(),
            "train.eval_every=5".into(),
            "train.checkpoint_every=5".into(),
        ];
        overrides.extend(capacity.map(|cf| format!("moe.capacity_factor={cf}")));
        let config = RunConfig::parse(&text, &overrides).unwrap();
        let run = |name: &str| {
            let run_dir = dir.path().join(format!("{name}-{capacity:?}"));
            train::<W>(&config, &run_dir, false, None, &Cluster::default(), |_| {}).unwrap();
            common::train_losses(&run_dir)
        };
        let kernels = run("kernels");
        let reference = moe_model::ops::with_reference_dispatch(|| run("reference"));
        assert_eq!(kernels.len(), 5);
        assert_eq!(kernels.len(), reference.len());
        for ((step, a), (_, b)) in kernels.iter().zip(&reference) {
            assert!(
                (a - b).abs() < 1e-4,
                "step {step}: kernels {a}, reference {b}"
            );
        }
    }
}
