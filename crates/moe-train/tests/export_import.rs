//! Export and import against real files: a Mixtral checkpoint written by Hugging Face
//! transformers (with the logits transformers computed), round trips through both export
//! formats, and the errors for models Mixtral cannot express and for broken files.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use common::{logits, max_abs_diff};
use moe_model::{Gate, ModelConfig, MoeConfig, Transformer};
use moe_train::NonFinite;
use moe_train::hf_mixtral;
use moe_train::model_tensors;
use moe_train::safetensors_file::{HostTensor, NamedTensors, read_file, write_file};
use moe_train::save_model_checkpoint;
use moe_train::{ExportFormat, RunConfig, export, import, load_weights, read_model};
use safetensors::SafeTensors;

type B = Flex;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny-mixtral")
}

/// The token ids and logits transformers computed for the fixture.
fn expected() -> (Vec<i64>, [usize; 2], Vec<f32>) {
    let bytes = std::fs::read(fixture().join("expected.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let ids = file.tensor("input_ids").unwrap();
    let shape = [ids.shape()[0], ids.shape()[1]];
    let ids = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let logits = file
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (ids, shape, logits)
}

#[test]
fn import_of_a_transformers_checkpoint_reproduces_its_logits() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("imported");
    let had_tokenizer = import::<B>(
        &fixture(),
        &checkpoint,
        &Default::default(),
        NonFinite::Refuse,
    )
    .unwrap();
    assert!(!had_tokenizer, "the fixture has no tokenizer");
    let (model, config, _) =
        load_weights::<B>(&checkpoint, &Default::default(), NonFinite::Refuse).unwrap();
    assert_eq!(config.model.kv_heads(), 2);
    assert_eq!((config.moe.n_experts, config.moe.top_k), (4, 2));

    let (ids, shape, expected) = expected();
    let diff = max_abs_diff(&logits(&model, &ids, shape), &expected);
    assert!(diff <= 1e-4, "max abs diff to transformers' logits: {diff}");
}

#[test]
fn hf_export_writes_back_the_transformers_tensors_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("imported");
    let exported = dir.path().join("hf");
    import::<B>(
        &fixture(),
        &checkpoint,
        &Default::default(),
        NonFinite::Refuse,
    )
    .unwrap();
    export::<B>(
        &checkpoint,
        ExportFormat::Hf,
        &exported,
        &Default::default(),
        NonFinite::Refuse,
    )
    .unwrap();

    let original = read_file(&fixture().join("model.safetensors")).unwrap();
    let written = read_file(&exported.join("model.safetensors")).unwrap();
    assert_eq!(
        written.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>()
    );
    for (name, tensor) in &original {
        assert_eq!(&written[name], tensor, "{name}");
    }
    // The exported config describes the same model.
    let reimported = read_model::<B>(&exported, &Default::default(), NonFinite::Refuse).unwrap();
    let source = read_model::<B>(&fixture(), &Default::default(), NonFinite::Refuse).unwrap();
    assert_eq!(reimported.config.model, source.config.model);
    assert_eq!(reimported.config.moe, source.config.moe);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "MixtralForCausalLM");
    assert_eq!(config["num_key_value_heads"], 2);
    assert!(exported.join("generation_config.json").is_file());
}

#[test]
fn fused_expert_layout_imports_to_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let fused_dir = dir.path().join("fused");
    std::fs::create_dir_all(&fused_dir).unwrap();
    std::fs::copy(fixture().join("config.json"), fused_dir.join("config.json")).unwrap();
    let mut tensors = read_file(&fixture().join("model.safetensors")).unwrap();
    let mut fused = NamedTensors::new();
    for layer in 0..2 {
        let classic = format!("model.layers.{layer}.block_sparse_moe");
        let take = |t: &mut NamedTensors, e: usize, w: &str| {
            t.remove(&format!("{classic}.experts.{e}.{w}.weight"))
                .unwrap()
        };
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..4 {
            let (w1, w3) = (take(&mut tensors, e, "w1"), take(&mut tensors, e, "w3"));
            let rows = w1.shape[0] + w3.shape[0];
            let data = w1.data.iter().chain(&w3.data).copied().collect();
            gate_up.push(HostTensor::new(vec![rows, w1.shape[1]], data));
            down.push(take(&mut tensors, e, "w2"));
        }
        let mlp = format!("model.layers.{layer}.mlp");
        fused.insert(
            format!("{mlp}.experts.gate_up_proj"),
            HostTensor::stack(&gate_up),
        );
        fused.insert(format!("{mlp}.experts.down_proj"), HostTensor::stack(&down));
        let gate = tensors.remove(&format!("{classic}.gate.weight")).unwrap();
        fused.insert(format!("{mlp}.gate.weight"), gate);
    }
    fused.extend(tensors);
    write_file(
        &fused_dir.join("model.safetensors"),
        &fused,
        Default::default(),
    )
    .unwrap();

    let model = read_model::<B>(&fused_dir, &Default::default(), NonFinite::Refuse)
        .unwrap()
        .model;
    let (ids, shape, expected) = expected();
    let diff = max_abs_diff(&logits(&model, &ids, shape), &expected);
    assert!(diff <= 1e-4, "max abs diff to transformers' logits: {diff}");
}

fn small_config(router: Gate, shared: usize, tied: bool) -> RunConfig {
    let model = ModelConfig {
        vocab_size: 50,
        d_model: 16,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        max_seq_len: 32,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: tied,
        dense_ffn_dim: 0,
        n_dense_layers: 0,
        moe_layer_interval: 1,
        init_std: 0.2,
    };
    let moe = MoeConfig {
        n_experts: 4,
        top_k: 2,
        expert_ffn_dim: 8,
        router,
        jitter: 0.0,
        n_shared_experts: shared,
        capacity_factor: None,
        eval_capacity_factor: None,
        drop_policy: moe_model::DropPolicy::Position,
        aux_loss_weight: 0.01,
        z_loss_weight: 0.001,
        bias_update_rate: 0.0,
    };
    RunConfig::for_model(model, moe)
}

/// A fresh model saved as a checkpoint, and the model as read back from it (burn
/// initialises parameters lazily, so the saved values are those of the read-back copy).
fn saved_model(dir: &Path, config: &RunConfig) -> (PathBuf, Transformer<B>) {
    let model = Transformer::<B>::new(&config.model, &config.moe, &Default::default()).unwrap();
    let checkpoint = dir.join("checkpoint");
    save_model_checkpoint(&checkpoint, &model, config, None).unwrap();
    let (model, _, _) =
        load_weights::<B>(&checkpoint, &Default::default(), NonFinite::Refuse).unwrap();
    (checkpoint, model)
}

#[test]
fn both_formats_round_trip_bit_identical_parameters_and_logits() {
    let ids: Vec<i64> = (0..20).map(|i| (i * 7 % 50) as i64).collect();
    let cases = [
        (small_config(Gate::default(), 0, false), ExportFormat::Hf),
        (small_config(Gate::default(), 0, true), ExportFormat::Hf),
        (
            small_config(Gate::Sigmoid { scale: 1.0 }, 1, false),
            ExportFormat::Safetensors,
        ),
    ];
    for (config, format) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (checkpoint, model) = saved_model(dir.path(), &config);
        let exported = dir.path().join("export");
        export::<B>(
            &checkpoint,
            format,
            &exported,
            &Default::default(),
            NonFinite::Refuse,
        )
        .unwrap();
        let back = dir.path().join("back");
        import::<B>(&exported, &back, &Default::default(), NonFinite::Refuse).unwrap();
        let (restored, restored_config, _) =
            load_weights::<B>(&back, &Default::default(), NonFinite::Refuse).unwrap();
        assert_eq!(restored_config.model, config.model, "{format:?}");
        assert_eq!(
            model_tensors(&restored).unwrap(),
            model_tensors(&model).unwrap(),
            "{format:?}"
        );
        assert_eq!(
            logits(&restored, &ids, [2, 10]),
            logits(&model, &ids, [2, 10]),
            "{format:?}"
        );
    }
}

#[test]
fn hf_export_refuses_what_mixtral_cannot_compute() {
    let mut no_renorm = small_config(Gate::default(), 0, false);
    no_renorm.moe.router = Gate::SoftmaxTopk { renormalize: false };
    let mut dense_layer = small_config(Gate::default(), 0, false);
    dense_layer.model.n_dense_layers = 1;
    dense_layer.model.dense_ffn_dim = 16;
    let mut biased = small_config(Gate::default(), 0, false);
    biased.moe.bias_update_rate = 1e-3;
    let cases = [
        (
            small_config(Gate::Sigmoid { scale: 1.0 }, 0, false),
            "sigmoid gating",
        ),
        (small_config(Gate::default(), 1, false), "shared experts"),
        (no_renorm, "renormalise"),
        (dense_layer, "dense FFN layers"),
        (biased, "expert bias"),
    ];
    for (config, feature) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (checkpoint, _) = saved_model(dir.path(), &config);
        let out = dir.path().join("hf");
        let error = export::<B>(
            &checkpoint,
            ExportFormat::Hf,
            &out,
            &Default::default(),
            NonFinite::Refuse,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains(feature), "{error}");
        assert!(!out.exists(), "nothing written for {feature}");
    }
}

#[test]
fn broken_checkpoints_give_errors_that_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let target = dir.path().join(name);
        std::fs::create_dir_all(&target).unwrap();
        std::fs::copy(fixture().join("config.json"), target.join("config.json")).unwrap();
        target
    };
    let error_of = |from: &Path| {
        let out = from.with_extension("out");
        let error = format!(
            "{:#}",
            import::<B>(from, &out, &Default::default(), NonFinite::Refuse).unwrap_err()
        );
        assert!(!out.exists());
        error
    };

    // Truncated file.
    let truncated = copy("truncated");
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    std::fs::write(
        truncated.join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    assert!(error_of(&truncated).contains("not a valid safetensors file"));

    // A missing tensor and a wrongly shaped one.
    let mut tensors = read_file(&fixture().join("model.safetensors")).unwrap();
    let missing = copy("missing");
    let mut without = tensors.clone();
    without.remove("model.layers.1.self_attn.k_proj.weight");
    write_file(
        &missing.join("model.safetensors"),
        &without,
        Default::default(),
    )
    .unwrap();
    assert!(error_of(&missing).contains("`model.layers.1.self_attn.k_proj.weight` is missing"));

    let misshapen = copy("misshapen");
    tensors.insert(
        "model.norm.weight".into(),
        HostTensor::new(vec![63], vec![1.0; 63]),
    );
    write_file(
        &misshapen.join("model.safetensors"),
        &tensors,
        Default::default(),
    )
    .unwrap();
    let error = error_of(&misshapen);
    assert!(
        error.contains("`model.norm.weight` has shape [63], expected [64]"),
        "{error}"
    );

    // An unsupported setting in config.json, and an existing output directory.
    let windowed = copy("windowed");
    std::fs::write(
        windowed.join("config.json"),
        std::fs::read_to_string(fixture().join("config.json"))
            .unwrap()
            .replace("\"sliding_window\": null", "\"sliding_window\": 16"),
    )
    .unwrap();
    assert!(error_of(&windowed).contains("sliding_window"));
    let taken = dir.path().join("taken");
    std::fs::create_dir_all(&taken).unwrap();
    let error = import::<B>(&fixture(), &taken, &Default::default(), NonFinite::Refuse)
        .unwrap_err()
        .to_string();
    assert!(error.contains("already exists"), "{error}");

    // A NaN weight: refused by name unless allowed.
    let mut tensors = read_file(&fixture().join("model.safetensors")).unwrap();
    tensors.get_mut("model.norm.weight").unwrap().data[3] = f32::NAN;
    let nan = copy("nan");
    write_file(&nan.join("model.safetensors"), &tensors, Default::default()).unwrap();
    let error = error_of(&nan);
    assert!(
        error.contains("`model.norm.weight`") && error.contains("--allow-nonfinite"),
        "{error}"
    );
    let out = dir.path().join("nan.allowed");
    import::<B>(&nan, &out, &Default::default(), NonFinite::Allow).unwrap();
    // The imported checkpoint holds it too (under our name): refused on load.
    let error = format!(
        "{:#}",
        load_weights::<B>(&out, &Default::default(), NonFinite::Refuse).unwrap_err()
    );
    assert!(error.contains("`norm.gamma`"), "{error}");
    load_weights::<B>(&out, &Default::default(), NonFinite::Allow).unwrap();
}

#[test]
fn config_json_errors_name_the_missing_or_bad_key() {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    let error_of = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut config = fixture.clone();
        edit(config.as_object_mut().unwrap());
        format!("{:#}", hf_mixtral::configs_from_json(&config).unwrap_err())
    };
    assert!(hf_mixtral::configs_from_json(&fixture).is_ok());

    for key in ["hidden_size", "num_local_experts"] {
        let missing = error_of(&|c| {
            c.remove(key);
        });
        assert!(missing.contains(&format!("`{key}`")), "{missing}");
    }
    let negative = error_of(&|c| {
        c.insert("num_local_experts".into(), (-4).into());
    });
    assert!(negative.contains("`num_local_experts`"), "{negative}");
    let text = error_of(&|c| {
        c.insert("rms_norm_eps".into(), "small".into());
    });
    assert!(text.contains("`rms_norm_eps`"), "{text}");
    let nested = error_of(&|c| {
        c["rope_parameters"]["rope_theta"] = "large".into();
    });
    assert!(nested.contains("`rope_parameters.rope_theta`"), "{nested}");
    let scaled = error_of(&|c| {
        c["rope_parameters"]["rope_type"] = "yarn".into();
    });
    assert!(scaled.contains("`rope_parameters.rope_type`"), "{scaled}");
    let gelu = error_of(&|c| {
        c.insert("hidden_act".into(), "gelu".into());
    });
    assert!(gelu.contains("`hidden_act`"), "{gelu}");
}

/// Last-position logits of candle-transformers' Mixtral fed `ids` (one sequence) token by
/// token through its KV cache: one row per position.
fn candle_mixtral_logits(dir: &Path, ids: &[i64]) -> Vec<f32> {
    use candle_core::{DType, Device, Tensor as CandleTensor};
    use candle_transformers::models::mixtral;

    let device = Device::Cpu;
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    // candle's config has no optional window and a flash-attention switch of its own.
    config["sliding_window"] = serde_json::json!(ids.len() + 1);
    config["use_flash_attn"] = serde_json::json!(false);
    let config: mixtral::Config = serde_json::from_value(config).unwrap();
    // SAFETY: the file is not modified while the map is alive.
    let weights = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &device,
        )
        .unwrap()
    };
    let mut model = mixtral::Model::new(&config, weights).unwrap();
    let mut rows = Vec::new();
    for (position, &id) in ids.iter().enumerate() {
        let input = CandleTensor::new(&[[id as u32]], &device).unwrap();
        let logits = model.forward(&input, position).unwrap();
        rows.extend(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    rows
}

#[test]
fn candle_transformers_mixtral_computes_our_logits_from_the_hf_export() {
    // Both Mixtral-compatible gates; grouped-query attention; weights large enough that
    // routing is decisive and the logits far from zero.
    for router in [Gate::default(), Gate::TopkSoftmax] {
        let mut config = small_config(router, 0, false);
        config.model.vocab_size = 64;
        config.model.d_model = 32;
        config.moe.expert_ffn_dim = 24;
        config.model.init_std = 0.15;
        let dir = tempfile::tempdir().unwrap();
        let (checkpoint, model) = saved_model(dir.path(), &config);
        let exported = dir.path().join("hf");
        export::<B>(
            &checkpoint,
            ExportFormat::Hf,
            &exported,
            &Default::default(),
            NonFinite::Refuse,
        )
        .unwrap();

        let ids: Vec<i64> = (0..24).map(|i| (i * 29 + 5) % 64).collect();
        let ours = logits(&model, &ids, [1, ids.len()]);
        let theirs = candle_mixtral_logits(&exported, &ids);
        let largest = ours.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            largest > 0.5,
            "{router:?}: logits too small to compare ({largest})"
        );
        let diff = max_abs_diff(&ours, &theirs);
        eprintln!("{router:?}: max abs diff {diff:e}, largest |logit| {largest}");
        assert!(
            diff <= 1e-4,
            "{router:?}: max abs diff to candle-transformers' Mixtral: {diff}"
        );
    }
}
