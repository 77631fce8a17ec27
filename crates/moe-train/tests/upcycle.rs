//! Sparse upcycling and `--init`: an upcycled model computes its dense parent's logits
//! before training (the experts are copies and each token's combine weights sum to one),
//! a run initialised from a checkpoint starts at exactly its weights, and the refusals
//! name the problem.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use common::max_abs_diff;
use moe_data::TextTokenizer;
use moe_model::{Gate, Transformer};
use moe_train::NonFinite;
use moe_train::data_parallel::Cluster;
use moe_train::model_tensors;
use moe_train::save_model_checkpoint;
use moe_train::{RunConfig, UpcycleOptions, load_weights, train, upcycle_checkpoint};

type B = Flex;

/// Training and upcycling seed the backend's process-wide generator: take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A config whose blocks are all dense (`n_dense_layers = n_layers`), with grouped-query
/// attention; `moe` is the text of its `[moe]` section.
fn dense_config(data: &Path, moe: &str) -> RunConfig {
    let text = format!(
        r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 32
dense_ffn_dim = 48
n_dense_layers = 2
# Large enough that two random models' first losses differ clearly (at the usual 0.02
# both sit at ln(256) to within 1e-3).
init_std = 0.3

[moe]
{moe}

[data]
dataset = "{}"
tokenizer = "byte"
validation_works = ["twelfth_night"]
seq_len = 32

[train]
batch_size = 4
steps = 1
lr = 1e-3
warmup_steps = 0
log_every = 1
eval_batches = 2
"#,
        data.display()
    );
    RunConfig::parse(&text, &[]).unwrap()
}

const MOE: &str = "n_experts = 2\ntop_k = 1\nexpert_ffn_dim = 16";

/// Slices of three shipped works (two to train on, one held out).
fn dataset(dir: &Path) -> PathBuf {
    common::dataset(
        dir,
        &[
            ("hamlet", 20_000),
            ("macbeth", 20_000),
            ("twelfth_night", 4_000),
        ],
    )
}

/// A randomly initialised dense checkpoint of `config` at `dir`, with the byte tokenizer.
fn dense_checkpoint(config: &RunConfig, dir: &Path) {
    let model = Transformer::<B>::new(&config.model, &config.moe, &Default::default()).unwrap();
    let tokenizer = TextTokenizer::bytes().unwrap();
    save_model_checkpoint(dir, &model, config, Some(&tokenizer)).unwrap();
}

fn logits(model: &Transformer<B>) -> Vec<f32> {
    let ids: Vec<i64> = (0..2 * 24).map(|i| (i * 37 + 11) % 256).collect();
    common::logits(model, &ids, [2, 24])
}

fn std_dev(values: &[f32]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    (values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt()
}

#[test]
fn upcycled_model_computes_the_dense_models_logits() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    // Every gate; the sigmoid parent asks for unnormalised weights and a route scale,
    // which upcycling must reset to keep the dense function.
    let cases = [
        (
            r#"{ kind = "softmax_topk", renormalize = false }"#,
            Some(1.0),
        ),
        (r#""topk_softmax""#, None),
        (r#"{ kind = "sigmoid", scale = 2.5 }"#, Some(0.5)),
    ];
    for (i, (router, router_std)) in cases.into_iter().enumerate() {
        let dense_dir = dir.path().join(format!("dense-{i}"));
        let config = dense_config(&data, &format!("{MOE}\nrouter = {router}"));
        dense_checkpoint(&config, &dense_dir);
        let options = UpcycleOptions {
            n_experts: 4,
            top_k: 2,
            router_std,
        };
        let up_dir = dir.path().join(format!("up-{i}"));
        upcycle_checkpoint::<B>(&dense_dir, &up_dir, &options, &Default::default()).unwrap();

        let (dense, _, _) =
            load_weights::<B>(&dense_dir, &Default::default(), NonFinite::Refuse).unwrap();
        let (up, up_config, _) =
            load_weights::<B>(&up_dir, &Default::default(), NonFinite::Refuse).unwrap();
        assert_eq!(
            up_config.model.n_moe_layers(),
            2,
            "{router}: every block MoE"
        );
        assert_eq!(
            (up_config.moe.n_experts, up_config.moe.top_k),
            (4, 2),
            "{router}"
        );
        assert_eq!(up_config.moe.expert_ffn_dim, 48, "{router}");
        let diff = max_abs_diff(&logits(&dense), &logits(&up));
        assert!(diff <= 1e-5, "{router}: logits differ by {diff}");

        // Each expert is the dense FFN; the router is new and as small as asked.
        let dense_tensors = model_tensors(&dense).unwrap();
        let up_tensors = model_tensors(&up).unwrap();
        for layer in 0..2 {
            for w in ["w1", "w2", "w3"] {
                let parent = &dense_tensors[&format!("blocks.{layer}.ffn.{w}.weight")];
                let experts = &up_tensors[&format!("blocks.{layer}.ffn.experts.{w}")];
                for e in 0..4 {
                    assert_eq!(
                        experts.slice(e),
                        *parent,
                        "{router}: layer {layer} {w}[{e}]"
                    );
                }
            }
            let gate = &up_tensors[&format!("blocks.{layer}.ffn.router.gate.weight")];
            let expected = router_std.unwrap_or(up_config.model.init_std / 10.0);
            let measured = std_dev(&gate.data);
            assert!(
                (measured / expected - 1.0).abs() < 0.3,
                "{router}: router std {measured}, asked {expected}"
            );
        }
    }
}

#[test]
fn runs_initialised_from_a_checkpoint_start_at_its_weights() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let config = dense_config(&data, MOE);
    let dense_dir = dir.path().join("dense");
    dense_checkpoint(&config, &dense_dir);
    let options = UpcycleOptions {
        n_experts: 4,
        top_k: 2,
        router_std: Some(0.5),
    };
    let up_dir = dir.path().join("up");
    upcycle_checkpoint::<B>(&dense_dir, &up_dir, &options, &Default::default()).unwrap();
    let up_config = RunConfig::parse_saved(&up_dir.join("config.toml")).unwrap();

    // The first step's loss is computed before any update, on the same batch: the dense
    // parent, its upcycled child and a fresh model of the child's shape.
    let device = Cluster::default();
    let run = |name: &str, config: &RunConfig, init: Option<&Path>| {
        let run_dir = dir.path().join(name);
        train::<Autodiff<B>>(config, &run_dir, false, init, &device, |_| {}).unwrap();
        common::train_losses(&run_dir)[0].1
    };
    let dense = run("dense-run", &config, Some(&dense_dir));
    let upcycled = run("up-run", &up_config, Some(&up_dir));
    let fresh = run("fresh-run", &up_config, None);
    assert!(
        (dense - upcycled).abs() < 1e-5,
        "dense {dense} vs upcycled {upcycled}"
    );
    assert!(
        (dense - fresh).abs() > 1e-3,
        "fresh {fresh} vs dense {dense}"
    );

    // The [model] section must match the checkpoint's.
    let mut wider = up_config.clone();
    wider.model.d_model = 64;
    let err = train::<Autodiff<B>>(
        &wider,
        &dir.path().join("wider"),
        false,
        Some(&up_dir),
        &device,
        |_| {},
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("[model] section differs"),
        "{err:#}"
    );
    // [moe] may change where the shapes allow; a different expert count does not.
    let mut more_experts = up_config.clone();
    more_experts.moe.n_experts = 8;
    let err = train::<Autodiff<B>>(
        &more_experts,
        &dir.path().join("more"),
        false,
        Some(&up_dir),
        &device,
        |_| {},
    )
    .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("blocks.0.ffn.router.gate.weight"), "{err}");
}

#[test]
fn upcycling_refusals_name_the_problem() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let options = |n_experts, top_k| UpcycleOptions {
        n_experts,
        top_k,
        router_std: None,
    };
    let device = Default::default();
    let upcycle = |from: &Path, out: &str, options: UpcycleOptions| {
        let out = dir.path().join(out);
        format!(
            "{:#}",
            upcycle_checkpoint::<B>(from, &out, &options, &device).unwrap_err()
        )
    };

    let mut sparse = dense_config(&data, MOE);
    sparse.model.n_dense_layers = 1;
    let sparse_dir = dir.path().join("sparse");
    dense_checkpoint(&sparse, &sparse_dir);
    let err = upcycle(&sparse_dir, "a", options(4, 2));
    assert!(
        err.contains("block 1") && err.contains("already an MoE layer"),
        "{err}"
    );

    let dense_dir = dir.path().join("dense");
    dense_checkpoint(&dense_config(&data, MOE), &dense_dir);
    let err = upcycle(&dense_dir, "b", options(4, 5));
    assert!(err.contains("--top-k"), "{err}");
    let err = upcycle(&dense_dir, "c", options(0, 1));
    assert!(err.contains("--experts"), "{err}");
    let err = upcycle(&dense_dir, "dense", options(4, 2));
    assert!(err.contains("already exists"), "{err}");
    let err = upcycle(&dir.path().join("missing"), "d", options(4, 2));
    assert!(err.contains("missing"), "{err}");
    for out in ["a", "b", "c", "d"] {
        assert!(!dir.path().join(out).exists(), "{out} left behind");
    }
}

#[test]
fn upcycled_config_keeps_the_rest_of_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dense_config(
        &dataset(dir.path()),
        &format!(
            "{MOE}\nrouter = {{ kind = \"sigmoid\", scale = 2.5 }}\naux_loss_weight = 0.02\nn_shared_experts = 1"
        ),
    );
    let options = UpcycleOptions {
        n_experts: 8,
        top_k: 2,
        router_std: None,
    };
    let child = moe_train::upcycled_config(&parent, &options).unwrap();
    assert_eq!(child.moe.router, Gate::Sigmoid { scale: 1.0 });
    assert_eq!(child.moe.aux_loss_weight, 0.02);
    assert_eq!(child.moe.n_shared_experts, 0);
    assert_eq!(
        (child.model.n_dense_layers, child.model.moe_layer_interval),
        (0, 1)
    );
    assert_eq!(child.data, parent.data);
    assert_eq!(child.train, parent.train);
}
