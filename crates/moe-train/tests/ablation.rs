//! Ablation studies: the metric functions against hand-computed values; grid files
//! (expansion into runs, and errors that name the key); a 2-variant x 2-seed study end to
//! end: every output written, finished runs skipped when it runs again, an interrupted run
//! resumed to the same result, and a diverging variant recorded without stopping the study.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use moe_train::ablation::report::Spread;
use moe_train::ablation::summary::{dead_experts, entropy, loss_spikes};
use moe_train::ablation::{self, Grid, SUMMARY_FILE};

type B = Autodiff<Flex>;

#[test]
fn metric_functions_match_hand_computed_values() {
    let nan = f64::NAN;
    // i = 4: 2 > 1.5 x mean(1, 1, 1, 1); i = 5: 1 < 1.5 x 1.25; i = 6: NaN; i = 7: the
    // baseline skips the NaN, 1 < 1.5 x 4/3.
    assert_eq!(
        loss_spikes(&[1.0, 1.0, 1.0, 1.0, 2.0, 1.0, nan, 1.0], 4, 1.5),
        [4, 6]
    );
    assert_eq!(
        loss_spikes(&[5.0, 4.0, 3.0], 4, 1.5),
        [0usize; 0],
        "no baseline yet"
    );
    let a = [0.5, 0.005, 0.495, 0.0];
    let b = [0.6, 0.009, 0.391, 0.0];
    let c = [0.5, 0.02, 0.48, 0.0];
    assert_eq!(dead_experts(&[&a, &b], 0.01), [1, 3]);
    assert_eq!(dead_experts(&[&a, &b, &c], 0.01), [3]);
    assert!((entropy(&[0.5, 0.5]) - 2f64.ln()).abs() < 1e-12);
    assert!((entropy(&[0.25; 4]) - 4f64.ln()).abs() < 1e-12);
    assert_eq!(entropy(&[1.0, 0.0]), 0.0);
    let spread = Spread::of(&[1.0, 2.0, 3.0]).unwrap();
    assert_eq!((spread.mean, spread.std, spread.runs), (2.0, 1.0, 3));
    assert_eq!(Spread::of(&[4.0]).unwrap().std, 0.0);
    assert!(Spread::of(&[]).is_none());
}

/// A base config for a small byte-level model on slices of three works.
fn base_config(dir: &Path) -> PathBuf {
    let data = common::dataset(
        dir,
        &[
            ("hamlet", 30_000),
            ("macbeth", 30_000),
            ("twelfth_night", 4_000),
        ],
    );
    let path = dir.join("base.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[model]
vocab_size = 256
d_model = 16
n_layers = 2
n_heads = 2
max_seq_len = 16

[moe]
n_experts = 4
top_k = 2
expert_ffn_dim = 16

[data]
dataset = "{}"
tokenizer = "byte"
validation_works = ["twelfth_night"]
seq_len = 16

[train]
batch_size = 4
steps = 6
lr = 3e-3
warmup_steps = 0
log_every = 1
eval_every = 3
eval_batches = 2
checkpoint_every = 3
"#,
            data.display()
        ),
    )
    .unwrap();
    path
}

fn parse(dir: &Path, text: &str) -> Result<Grid, String> {
    Grid::parse(text, dir).map_err(|e| format!("{e:#}"))
}

#[test]
fn grids_expand_into_runs_and_bad_grids_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    base_config(dir.path());
    let grid = parse(
        dir.path(),
        r#"
base = "base.toml"
seeds = [1, 2]
set = { train.steps = 4 }
[axes]
moe.aux_loss_weight = [0.0, 0.01]
[[variants]]
name = "softmax"
[[variants]]
name = "sigmoid"
set = { moe.router = "sigmoid", moe.bias_update_rate = 0.001 }
"#,
    )
    .unwrap();
    let names: Vec<(&str, u64)> = grid
        .runs
        .iter()
        .map(|r| (r.variant.as_str(), r.seed))
        .collect();
    assert_eq!(
        names,
        [
            ("softmax,aux_loss_weight=0", 1),
            ("softmax,aux_loss_weight=0", 2),
            ("softmax,aux_loss_weight=0.01", 1),
            ("softmax,aux_loss_weight=0.01", 2),
            ("sigmoid,aux_loss_weight=0", 1),
            ("sigmoid,aux_loss_weight=0", 2),
            ("sigmoid,aux_loss_weight=0.01", 1),
            ("sigmoid,aux_loss_weight=0.01", 2),
        ]
    );
    let run = &grid.runs[7];
    assert_eq!(run.config.train.seed, 2);
    assert_eq!(run.config.train.steps, 4);
    assert_eq!(run.config.moe.aux_loss_weight, 0.01);
    assert_eq!(run.config.moe.bias_update_rate, 0.001);
    assert_eq!(
        run.dir(Path::new("study")),
        Path::new("study/sigmoid,aux_loss_weight=0.01/seed-2")
    );

    for (text, named) in [
        ("base = \"base.toml\"\nsedes = [1]", "sedes"),
        (
            "base = \"base.toml\"\nseeds = [1]\n[axes]\nmoe.aux_los_weight = [0.1]",
            "aux_los_weight",
        ),
        (
            "base = \"base.toml\"\nseeds = [1]\n[axes]\nmoe.aux_loss_weight = []",
            "moe.aux_loss_weight",
        ),
        (
            "base = \"base.toml\"\nseeds = [1]\n[axes]\nmoe.top_k = 2",
            "moe.top_k",
        ),
        ("base = \"base.toml\"\nseeds = []", "seeds"),
        (
            "base = \"base.toml\"\nseeds = [1]\nset = { train.seed = 3 }",
            "train.seed",
        ),
        (
            "base = \"base.toml\"\nseeds = [1]\n[axes]\nmoe.top_k = [9]",
            "moe.top_k",
        ),
        ("base = \"missing.toml\"\nseeds = [1]", "missing.toml"),
    ] {
        let err = parse(dir.path(), text).unwrap_err();
        assert!(err.contains(named), "expected `{named}` in: {err}");
    }
}

#[test]
fn a_study_runs_resumes_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    base_config(dir.path());
    // Two variants x two seeds, plus a learning rate that makes the loss overflow.
    let mut grid = parse(
        dir.path(),
        r#"
base = "base.toml"
seeds = [1, 2]
[axes]
train.lr = [3e-3, 1e30]
[metrics]
tail = 2
"#,
    )
    .unwrap();
    let study = dir.path().join("study");
    let device = Default::default();
    let trainer = ablation::train_in_process::<B>(&device);
    let log = std::sync::Mutex::new(Vec::<String>::new());
    let progress = |line: &str| log.lock().unwrap().push(line.to_string());
    let summaries = ablation::run_study(&grid, &study, 1, &trainer, &progress).unwrap();
    assert_eq!(summaries.len(), 4);
    for name in ["results.json", "results.csv", "report.md"] {
        assert!(study.join(name).is_file(), "{name}");
    }
    for plot in [
        "loss.svg",
        "val_bpb.svg",
        "load_cv.svg",
        "router_logit.svg",
        "z_loss.svg",
        "expert_load_layer0.svg",
        "expert_load_layer1.svg",
    ] {
        let svg = std::fs::read_to_string(study.join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("lr=0.003"),
            "{plot}:\n{svg}"
        );
    }
    for run in &grid.runs {
        let run_dir = run.dir(&study);
        for name in [SUMMARY_FILE, "metrics.jsonl", "config.toml"] {
            assert!(
                run_dir.join(name).is_file(),
                "{}: {name}",
                run_dir.display()
            );
        }
        assert!(run_dir.join("tensorboard").is_dir());
    }
    let (stable, diverging) = summaries.split_at(2);
    for s in stable {
        assert_eq!((s.steps, s.diverged_at), (6, None), "{s:?}");
        assert!(s.final_bpb.unwrap() > 0.0 && s.best_bpb <= s.final_bpb);
        assert_eq!(s.layers.len(), 2);
        let load: f64 = s.layers[0].load.iter().sum();
        assert!((load - 1.0).abs() < 1e-9, "{load}");
    }
    assert_ne!(stable[0].final_bpb, stable[1].final_bpb, "the seeds differ");
    for s in diverging {
        assert!(s.diverged_at.is_some_and(|step| step <= 6), "{s:?}");
    }
    let csv = std::fs::read_to_string(study.join("results.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        5,
        "a header and one row per run:\n{csv}"
    );
    let report = std::fs::read_to_string(study.join("report.md")).unwrap();
    assert!(report.contains("| lr=0.003 | 2 | 0 |"), "{report}");
    assert!(report.contains("| lr=1e30 | 2 | 2 |"), "{report}");
    assert!(report.contains("![loss.svg](loss.svg)"), "{report}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(study.join("results.json")).unwrap())
            .unwrap();
    let bpb = &json["variants"][0]["metrics"][0];
    assert_eq!(bpb[0], "final_bpb");
    let mean = (stable[0].final_bpb.unwrap() + stable[1].final_bpb.unwrap()) / 2.0;
    assert!((bpb[1]["mean"].as_f64().unwrap() - mean).abs() < 1e-12);

    // Interrupt one run: its summary and last checkpoint gone, as if killed after step 3.
    let interrupted = grid.runs[1].dir(&study);
    std::fs::remove_file(interrupted.join(SUMMARY_FILE)).unwrap();
    std::fs::remove_dir_all(interrupted.join("checkpoints/step-00000006")).unwrap();
    log.lock().unwrap().clear();
    let again = ablation::run_study(&grid, &study, 1, &trainer, &progress).unwrap();
    {
        let log = log.lock().unwrap();
        let skipped = log.iter().filter(|l| l.ends_with("skipped")).count();
        assert_eq!(skipped, 3, "the finished runs are skipped: {log:?}");
        assert!(
            log.iter()
                .any(|l| l.contains("lr=0.003 seed 2") && l.contains("resum")),
            "the interrupted run resumes: {log:?}"
        );
    }
    let (before, after) = (&summaries[1], &again[1]);
    assert_eq!(after.steps, 6);
    assert!(
        (before.final_bpb.unwrap() - after.final_bpb.unwrap()).abs() < 1e-4,
        "{before:?} vs {after:?}"
    );

    // A changed [metrics] section re-reports the finished study without training: with a
    // dead-load threshold above 100% every expert of every layer counts as dead.
    grid.metrics.dead_load = 1.01;
    log.lock().unwrap().clear();
    let reported = ablation::run_study(&grid, &study, 1, &trainer, &progress).unwrap();
    let log = log.lock().unwrap();
    assert!(log.iter().all(|l| l.ends_with("skipped")), "{log:?}");
    assert_eq!(log.len(), 4, "{log:?}");
    for s in &reported[..2] {
        assert_eq!(s.dead_experts(), 2 * s.layers[0].load.len(), "{s:?}");
        assert_eq!(s.final_bpb, again[s.seed as usize - 1].final_bpb);
    }
}
