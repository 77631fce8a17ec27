//! The router setting in config files: its table form, its shorthand, the flat form of
//! configs saved before it was one table, and a checkpoint saved in that form.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use common::max_abs_diff;
use moe_model::Gate;
use moe_train::NonFinite;
use moe_train::RunConfig;
use moe_train::load_model;

/// A valid run config with `router_lines` in its `[moe]` section.
fn config_text(router_lines: &str) -> String {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/shakespeare");
    format!(
        "[model]\nvocab_size = 256\nd_model = 16\nn_layers = 1\nn_heads = 2\nmax_seq_len = 32\n\
         [moe]\nn_experts = 4\ntop_k = 2\nexpert_ffn_dim = 8\n{router_lines}\n\
         [data]\ndataset = \"{}\"\ntokenizer = \"byte\"\nseq_len = 32\n\
         [train]\nbatch_size = 2\nsteps = 1\nlr = 1e-3\n",
        data.display()
    )
}

fn gate_of(router_lines: &str, overrides: &[&str]) -> anyhow::Result<Gate> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Ok(RunConfig::parse(&config_text(router_lines), &overrides)?
        .moe
        .router)
}

#[test]
fn every_router_form_reads_as_one_gate() {
    let softmax = |renormalize| Gate::SoftmaxTopk { renormalize };
    let cases: [(&str, &[&str], Gate); 10] = [
        ("", &[], softmax(true)),
        (r#"router = { kind = "softmax_topk" }"#, &[], softmax(true)),
        (
            r#"router = { kind = "softmax_topk", renormalize = false }"#,
            &[],
            softmax(false),
        ),
        (r#"router = "topk_softmax""#, &[], Gate::TopkSoftmax),
        (
            r#"router = { kind = "sigmoid" }"#,
            &[],
            Gate::Sigmoid { scale: 1.0 },
        ),
        (
            r#"router = { kind = "sigmoid", scale = 2.5 }"#,
            &[],
            Gate::Sigmoid { scale: 2.5 },
        ),
        // Overrides: a bare kind, a kind and a setting of the table.
        ("", &["moe.router=sigmoid"], Gate::Sigmoid { scale: 1.0 }),
        (
            r#"router = "sigmoid""#,
            &["moe.router.scale=0.5"],
            Gate::Sigmoid { scale: 0.5 },
        ),
        (
            "",
            &[
                "moe.router.kind=\"softmax_topk\"",
                "moe.router.renormalize=false",
            ],
            softmax(false),
        ),
        // The flat form of older configs: each field moves into the kind it applied to.
        (
            "router = \"sigmoid\"\nrenormalize = false\nroute_scale = 2.5",
            &[],
            Gate::Sigmoid { scale: 2.5 },
        ),
    ];
    for (lines, overrides, expected) in cases {
        let gate = gate_of(lines, overrides).unwrap_or_else(|e| panic!("{lines:?}: {e:#}"));
        assert_eq!(gate, expected, "{lines:?} {overrides:?}");
    }
    assert_eq!(gate_of("renormalize = false", &[]).unwrap(), softmax(false));
}

#[test]
fn misplaced_router_settings_are_refused_by_name() {
    let cases: [(&str, &[&str], &str); 6] = [
        // A flat field beside the table: the error says where it lives now.
        (
            r#"router = { kind = "sigmoid" }"#,
            &["moe.route_scale=2.5"],
            "moe.router.scale",
        ),
        (
            r#"router = { kind = "softmax_topk" }"#,
            &["moe.renormalize=false"],
            "moe.router.renormalize",
        ),
        // A setting of another kind.
        (
            r#"router = { kind = "sigmoid", renormalize = false }"#,
            &[],
            "renormalize",
        ),
        (r#"router = { scale = 2.5 }"#, &[], "kind"),
        (r#"router = "softmax""#, &[], "softmax"),
        (
            r#"router = { kind = "sigmoid", scale = 0.0 }"#,
            &[],
            "moe.router.scale",
        ),
    ];
    for (lines, overrides, named) in cases {
        let err = format!("{:#}", gate_of(lines, overrides).unwrap_err());
        assert!(
            err.contains(named),
            "{lines:?}: `{err}` should name `{named}`"
        );
    }
}

#[test]
fn saved_configs_write_the_router_table_and_read_it_back() {
    let config = RunConfig::parse(
        &config_text(r#"router = { kind = "sigmoid", scale = 2.5 }"#),
        &[],
    )
    .unwrap();
    let text = config.to_toml().unwrap();
    assert!(text.contains("kind = \"sigmoid\""), "{text}");
    assert!(!text.contains("route_scale"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), &text).unwrap();
    let read = RunConfig::parse_saved(&dir.path().join("config.toml")).unwrap();
    assert_eq!(read.moe, config.moe);
}

fn legacy_checkpoint() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/legacy-checkpoint")
}

/// The logits of the last two positions of the fixture's prompt.
fn last_logits(checkpoint: &Path) -> (Gate, Vec<f32>) {
    let loaded = load_model::<Flex>(checkpoint, &Default::default(), NonFinite::Refuse).unwrap();
    let ids: Vec<i64> = "To be, or not to be, that is the"
        .bytes()
        .map(i64::from)
        .collect();
    let n = ids.len();
    let tokens =
        Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
    let logits = loaded.model.forward(tokens).logits.into_data();
    let logits = logits.to_vec::<f32>().unwrap();
    (loaded.config.moe.router, logits[(n - 2) * 256..].to_vec())
}

#[test]
fn checkpoint_saved_with_the_flat_router_computes_what_it_computed() {
    let expected: Vec<f32> = serde_json::from_str(
        &std::fs::read_to_string(legacy_checkpoint().join("expected_logits.json")).unwrap(),
    )
    .unwrap();
    let (gate, logits) = last_logits(&legacy_checkpoint());
    assert_eq!(gate, Gate::Sigmoid { scale: 2.5 });
    let diff = max_abs_diff(&logits, &expected);
    assert!(diff <= 1e-5, "logits differ from the saved ones by {diff}");

    // The route scale matters to these logits: read as 1.0, they differ.
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.toml", "model.mpk", "tokenizer.json", "state.json"] {
        std::fs::copy(legacy_checkpoint().join(file), dir.path().join(file)).unwrap();
    }
    let config = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    let config = config.replace("route_scale = 2.5", "route_scale = 1.0");
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    let (gate, unscaled) = last_logits(dir.path());
    assert_eq!(gate, Gate::Sigmoid { scale: 1.0 });
    assert!(max_abs_diff(&unscaled, &expected) > 1e-3);
}
