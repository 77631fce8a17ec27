//! The Hugging Face Mixtral layout: `config.json` and tensor names of
//! `MixtralForCausalLM`, to export a model transformers loads with no conversion and to
//! import Mixtral checkpoints.
//!
//! Export writes the per-expert layout that transformers' `save_pretrained` writes (and
//! loads in every version): `model.layers.{i}.block_sparse_moe.experts.{e}.w1|w2|w3.weight`
//! (w1 gate `[f, d]`, w3 up `[f, d]`, w2 down `[d, f]`) and
//! `model.layers.{i}.block_sparse_moe.gate.weight` `[E, d]`; linear weights are
//! `[out, in]`. Import also reads the fused layout of transformers 5 modules,
//! `...experts.gate_up_proj` `[E, 2f, d]` (gate rows first) and `...experts.down_proj`
//! `[E, d, f]`, under `block_sparse_moe` or `mlp`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use moe_model::{DropPolicy, Gate, ModelConfig, MoeConfig};
use serde_json::{Value, json};

use crate::model_tensors::take;
use crate::safetensors_file::{HostTensor, NamedTensors};

/// Why a model cannot be written as a Mixtral that computes what it computes, if it cannot.
pub fn unsupported_feature(model: &ModelConfig, moe: &MoeConfig) -> Option<String> {
    if (0..model.n_layers).any(|layer| !model.is_moe_layer(layer)) {
        return Some("dense FFN layers (Mixtral has an MoE block in every layer)".into());
    }
    match moe.router {
        Gate::Sigmoid { .. } => {
            return Some("sigmoid gating (`moe.router.kind = \"sigmoid\"`)".into());
        }
        Gate::SoftmaxTopk { renormalize: false } => {
            return Some("un-renormalised top-k weights (`moe.router.renormalize = false`)".into());
        }
        // Top-k of the logits then a softmax over them gives the same experts and weights
        // as Mixtral's softmax, top-k and renormalisation.
        Gate::SoftmaxTopk { renormalize: true } | Gate::TopkSoftmax => {}
    }
    if moe.n_shared_experts > 0 {
        return Some("shared experts (`moe.n_shared_experts`)".into());
    }
    if moe.bias_update_rate > 0.0 {
        return Some("expert bias balancing (`moe.bias_update_rate`)".into());
    }
    if moe.eval_capacity_factor.is_some() {
        return Some("a capacity limit at inference (`moe.eval_capacity_factor`)".into());
    }
    None
}

/// The `config.json` of the exported model.
pub fn config_json(model: &ModelConfig, moe: &MoeConfig, eos_token: Option<u32>) -> Value {
    json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": moe.expert_ffn_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads(),
        "head_dim": model.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_parameters": {"rope_theta": model.rope_theta, "rope_type": "default"},
        "num_local_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        // Transformers' balancing loss is k times ours (see DESIGN.md).
        "router_aux_loss_coef": moe.aux_loss_weight / moe.top_k as f64,
        "router_jitter_noise": moe.jitter,
        "output_router_logits": false,
        "tie_word_embeddings": model.tie_embeddings,
        "sliding_window": null,
        "attention_dropout": 0.0,
        "initializer_range": model.init_std,
        "bos_token_id": null,
        "eos_token_id": eos_token,
        "pad_token_id": null,
        "use_cache": true,
        "dtype": "float32",
    })
}

/// `(ours, theirs, transposed)` for every tensor but the experts' weights.
fn plain_tensors(model: &ModelConfig) -> Vec<(String, String, bool)> {
    let mut pairs = vec![(
        "embed.weight".to_string(),
        "model.embed_tokens.weight".to_string(),
        false,
    )];
    for i in 0..model.n_layers {
        let (ours, theirs) = (format!("blocks.{i}"), format!("model.layers.{i}"));
        pairs.push((
            format!("{ours}.attn_norm.gamma"),
            format!("{theirs}.input_layernorm.weight"),
            false,
        ));
        pairs.push((
            format!("{ours}.ffn_norm.gamma"),
            format!("{theirs}.post_attention_layernorm.weight"),
            false,
        ));
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            pairs.push((
                format!("{ours}.attn.{proj}.weight"),
                format!("{theirs}.self_attn.{proj}.weight"),
                true,
            ));
        }
        pairs.push((
            format!("{ours}.ffn.router.gate.weight"),
            format!("{theirs}.block_sparse_moe.gate.weight"),
            true,
        ));
    }
    pairs.push(("norm.gamma".into(), "model.norm.weight".into(), false));
    if !model.tie_embeddings {
        pairs.push(("lm_head.weight".into(), "lm_head.weight".into(), true));
    }
    pairs
}

/// Our tensors (see [`crate::model_tensors`]) renamed and laid out as Mixtral's.
pub fn to_mixtral(
    mut ours: NamedTensors,
    model: &ModelConfig,
    moe: &MoeConfig,
) -> Result<NamedTensors> {
    let mut theirs = NamedTensors::new();
    for (our_name, their_name, transposed) in plain_tensors(model) {
        let tensor = ours
            .remove(&our_name)
            .with_context(|| format!("the model has no `{our_name}`"))?;
        theirs.insert(
            their_name,
            if transposed {
                tensor.transpose()
            } else {
                tensor
            },
        );
    }
    for i in 0..model.n_layers {
        let bias_name = format!("blocks.{i}.ffn.router.expert_bias");
        if let Some(bias) = ours.remove(&bias_name) {
            ensure!(
                bias.data.iter().all(|&b| b == 0.0),
                "`{bias_name}` is not zero: Mixtral has no expert bias"
            );
        }
        for w in ["w1", "w2", "w3"] {
            let stacked = ours
                .remove(&format!("blocks.{i}.ffn.experts.{w}"))
                .with_context(|| format!("the model has no experts in layer {i}"))?;
            for e in 0..moe.n_experts {
                theirs.insert(
                    format!("model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"),
                    stacked.slice(e).transpose(),
                );
            }
        }
    }
    if let Some(name) = ours.keys().next() {
        bail!("`{name}` has no Mixtral counterpart");
    }
    Ok(theirs)
}

/// Mixtral's tensors renamed and laid out as ours, every name and shape checked against
/// the config. Unknown tensors are an error (RoPE frequency buffers are skipped).
pub fn from_mixtral(
    theirs: NamedTensors,
    model: &ModelConfig,
    moe: &MoeConfig,
) -> Result<NamedTensors> {
    // One naming for the MoE block (`mlp` in transformers 5 modules); no RoPE buffers.
    let mut theirs: NamedTensors = theirs
        .into_iter()
        .filter(|(name, _)| !name.ends_with("rotary_emb.inv_freq"))
        .map(|(name, t)| (name.replace(".mlp.", ".block_sparse_moe."), t))
        .collect();
    let (d, v, f, n_experts) = (
        model.d_model,
        model.vocab_size,
        moe.expert_ffn_dim,
        moe.n_experts,
    );
    let kv = model.kv_heads() * model.head_dim();
    let mut ours = NamedTensors::new();
    for (our_name, their_name, transposed) in plain_tensors(model) {
        let (name, shape) = (
            their_name.as_str(),
            their_shape(&their_name, d, v, kv, n_experts),
        );
        let tensor = take(&mut theirs, name, &shape)?;
        ours.insert(
            our_name,
            if transposed {
                tensor.transpose()
            } else {
                tensor
            },
        );
    }
    for i in 0..model.n_layers {
        let [w1, w2, w3] = experts_of_layer(&mut theirs, i, n_experts, d, f)?;
        let stack = |parts: Vec<HostTensor>| HostTensor::stack(&parts);
        ours.insert(format!("blocks.{i}.ffn.experts.w1"), stack(w1));
        ours.insert(format!("blocks.{i}.ffn.experts.w2"), stack(w2));
        ours.insert(format!("blocks.{i}.ffn.experts.w3"), stack(w3));
        ours.insert(
            format!("blocks.{i}.ffn.router.expert_bias"),
            HostTensor::new(vec![n_experts], vec![0.0; n_experts]),
        );
    }
    if !theirs.is_empty() {
        let names: Vec<&str> = theirs.keys().map(String::as_str).collect();
        bail!("unexpected tensors for this config: {}", names.join(", "));
    }
    Ok(ours)
}

/// The HF shape of a non-expert tensor.
fn their_shape(name: &str, d: usize, v: usize, kv: usize, n_experts: usize) -> Vec<usize> {
    if name.ends_with("embed_tokens.weight") || name == "lm_head.weight" {
        vec![v, d]
    } else if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
        vec![kv, d]
    } else if name.ends_with("q_proj.weight") || name.ends_with("o_proj.weight") {
        vec![d, d]
    } else if name.ends_with("gate.weight") {
        vec![n_experts, d]
    } else {
        vec![d]
    }
}

/// Layer `i`'s experts as ours per expert: `[w1 [d, f], w2 [f, d], w3 [d, f]]`, from the
/// per-expert or the fused layout.
fn experts_of_layer(
    theirs: &mut NamedTensors,
    i: usize,
    n_experts: usize,
    d: usize,
    f: usize,
) -> Result<[Vec<HostTensor>; 3]> {
    let classic = format!("model.layers.{i}.block_sparse_moe.experts");
    if theirs.contains_key(&format!("{classic}.0.w1.weight")) {
        let mut out = [Vec::new(), Vec::new(), Vec::new()];
        for e in 0..n_experts {
            out[0].push(take(theirs, &format!("{classic}.{e}.w1.weight"), &[f, d])?.transpose());
            out[1].push(take(theirs, &format!("{classic}.{e}.w2.weight"), &[d, f])?.transpose());
            out[2].push(take(theirs, &format!("{classic}.{e}.w3.weight"), &[f, d])?.transpose());
        }
        return Ok(out);
    }
    ensure!(
        theirs.contains_key(&format!("{classic}.gate_up_proj")),
        "layer {i} has no experts (neither `{classic}.0.w1.weight` nor `{classic}.gate_up_proj`)"
    );
    let gate_up = take(
        theirs,
        &format!("{classic}.gate_up_proj"),
        &[n_experts, 2 * f, d],
    )?;
    let down = take(theirs, &format!("{classic}.down_proj"), &[n_experts, d, f])?;
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for e in 0..n_experts {
        let fused = gate_up.slice(e);
        out[0].push(fused.rows(0..f).transpose());
        out[1].push(down.slice(e).transpose());
        out[2].push(fused.rows(f..2 * f).transpose());
    }
    Ok(out)
}

/// The model and MoE configs of a Mixtral `config.json`, each unsupported setting refused
/// with its key named.
pub fn configs_from_json(config: &Value) -> Result<(ModelConfig, MoeConfig)> {
    let get = |key: &str| config.get(key).filter(|v| !v.is_null());
    let size = |key: &str| -> Result<usize> {
        let value = get(key).with_context(|| format!("config.json has no `{key}`"))?;
        value.as_u64().map(|v| v as usize).with_context(|| {
            format!("config.json: `{key}` must be a non-negative integer, got {value}")
        })
    };
    let float = |key: &str, default: f64| -> Result<f64> {
        match get(key) {
            None => Ok(default),
            Some(value) => value
                .as_f64()
                .with_context(|| format!("config.json: `{key}` must be a number, got {value}")),
        }
    };
    if let Some(kind) = get("model_type") {
        ensure!(
            kind == "mixtral",
            "config.json: `model_type` is {kind}, this importer reads \"mixtral\""
        );
    }
    if let Some(act) = get("hidden_act") {
        ensure!(
            act == "silu",
            "config.json: `hidden_act` {act} is not supported (only \"silu\")"
        );
    }
    let d_model = size("hidden_size")?;
    let n_heads = size("num_attention_heads")?;
    ensure!(
        n_heads > 0 && d_model % n_heads == 0,
        "config.json: `hidden_size` must be a multiple of `num_attention_heads`"
    );
    if get("head_dim").is_some() {
        ensure!(
            size("head_dim")? == d_model / n_heads,
            "config.json: `head_dim` other than hidden_size / num_attention_heads is not supported"
        );
    }
    let max_seq_len = if get("max_position_embeddings").is_some() {
        size("max_position_embeddings")?
    } else {
        4096 * 32
    };
    if get("sliding_window").is_some() {
        ensure!(
            size("sliding_window")? >= max_seq_len,
            "config.json: `sliding_window` attention is not supported"
        );
    }
    let rope = get("rope_parameters");
    if let Some(kind) = rope.and_then(|r| r.get("rope_type")) {
        ensure!(
            kind == "default",
            "config.json: `rope_parameters.rope_type` {kind} is not supported (only \"default\")"
        );
    }
    ensure!(
        get("rope_scaling").is_none(),
        "config.json: `rope_scaling` is not supported"
    );
    let rope_theta = match rope.and_then(|r| r.get("rope_theta")) {
        Some(theta) => theta
            .as_f64()
            .context("config.json: `rope_parameters.rope_theta` must be a number")?,
        None => float("rope_theta", 1e6)?,
    };
    let top_k = if get("num_experts_per_tok").is_some() {
        size("num_experts_per_tok")?
    } else {
        2
    };
    let model = ModelConfig {
        vocab_size: size("vocab_size")?,
        d_model,
        n_layers: size("num_hidden_layers")?,
        n_heads,
        n_kv_heads: Some(if get("num_key_value_heads").is_some() {
            size("num_key_value_heads")?
        } else {
            n_heads
        }),
        max_seq_len,
        rope_theta,
        norm_eps: float("rms_norm_eps", 1e-5)?,
        tie_embeddings: get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        dense_ffn_dim: 0,
        n_dense_layers: 0,
        moe_layer_interval: 1,
        init_std: float("initializer_range", 0.02)?,
    };
    let moe = MoeConfig {
        n_experts: if get("num_local_experts").is_some() {
            size("num_local_experts")?
        } else {
            8
        },
        top_k,
        expert_ffn_dim: size("intermediate_size")?,
        router: Gate::SoftmaxTopk { renormalize: true },
        jitter: float("router_jitter_noise", 0.0)?,
        n_shared_experts: 0,
        capacity_factor: None,
        eval_capacity_factor: None,
        drop_policy: DropPolicy::Position,
        aux_loss_weight: float("router_aux_loss_coef", 0.001)? * top_k as f64,
        z_loss_weight: 0.0,
        bias_update_rate: 0.0,
    };
    model.validate().context("config.json")?;
    moe.validate().context("config.json")?;
    Ok((model, moe))
}

/// `generation_config.json` of the exported model.
pub fn generation_config_json(eos_token: Option<u32>) -> Value {
    json!({"_from_model_config": true, "eos_token_id": eos_token})
}

/// Metadata of the exported `model.safetensors` (transformers expects `format: pt`).
pub fn safetensors_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Reads and parses `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<Value> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}
