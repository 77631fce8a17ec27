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

use anyhow::{Context, Result, anyhow, bail, ensure};
use moe_model::{DropPolicy, Gate, ModelConfig, MoeConfig};
use serde::{Deserialize, Serialize};
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
pub fn config_json(model: &ModelConfig, moe: &MoeConfig, eos_token: Option<u32>) -> Result<Value> {
    let config = MixtralConfigOut {
        architectures: ["MixtralForCausalLM"],
        model_type: "mixtral",
        vocab_size: model.vocab_size,
        hidden_size: model.d_model,
        intermediate_size: moe.expert_ffn_dim,
        num_hidden_layers: model.n_layers,
        num_attention_heads: model.n_heads,
        num_key_value_heads: model.kv_heads(),
        head_dim: model.head_dim(),
        hidden_act: "silu",
        max_position_embeddings: model.max_seq_len,
        rms_norm_eps: model.norm_eps,
        rope_theta: model.rope_theta,
        rope_parameters: RopeParametersOut {
            rope_theta: model.rope_theta,
            rope_type: "default",
        },
        num_local_experts: moe.n_experts,
        num_experts_per_tok: moe.top_k,
        // Transformers' balancing loss is k times ours (see DESIGN.md).
        router_aux_loss_coef: moe.aux_loss_weight / moe.top_k as f64,
        router_jitter_noise: moe.jitter,
        output_router_logits: false,
        tie_word_embeddings: model.tie_embeddings,
        sliding_window: None,
        attention_dropout: 0.0,
        initializer_range: model.init_std,
        bos_token_id: None,
        eos_token_id: eos_token,
        pad_token_id: None,
        use_cache: true,
        dtype: "float32",
    };
    // A value, so the keys come out in the same order as any other JSON object's.
    Ok(serde_json::to_value(config)?)
}

/// What export writes to `config.json`, under transformers' `MixtralConfig` names.
#[derive(Serialize)]
struct MixtralConfigOut {
    architectures: [&'static str; 1],
    model_type: &'static str,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    hidden_act: &'static str,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    rope_parameters: RopeParametersOut,
    num_local_experts: usize,
    num_experts_per_tok: usize,
    router_aux_loss_coef: f64,
    router_jitter_noise: f64,
    output_router_logits: bool,
    tie_word_embeddings: bool,
    sliding_window: Option<usize>,
    attention_dropout: f64,
    initializer_range: f64,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    use_cache: bool,
    dtype: &'static str,
}

/// `rope_parameters` of the exported `config.json`.
#[derive(Serialize)]
struct RopeParametersOut {
    rope_theta: f64,
    rope_type: &'static str,
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

/// The settings of a Hugging Face Mixtral `config.json` that import reads, under
/// transformers' names. Those a file may leave out or set to null are options (absent is
/// `None`); the importer applies transformers' defaults (see [`configs_from_json`]).
#[derive(Debug, Clone, Deserialize)]
pub struct MixtralConfig {
    /// Must be `"mixtral"` if present.
    pub model_type: Option<String>,
    /// Must be `"silu"` if present.
    pub hidden_act: Option<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width (our `d_model`).
    pub hidden_size: usize,
    /// Each expert's hidden width.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Default: `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Must be `hidden_size / num_attention_heads` if present.
    pub head_dim: Option<usize>,
    /// Default: 131072.
    pub max_position_embeddings: Option<usize>,
    /// Must cover `max_position_embeddings` if present (no sliding-window attention).
    pub sliding_window: Option<usize>,
    /// transformers 5's RoPE settings; they take precedence over `rope_theta`.
    pub rope_parameters: Option<RopeParameters>,
    /// Older files' RoPE scaling: refused if present.
    pub rope_scaling: Option<Value>,
    /// Default: 1e6.
    pub rope_theta: Option<f64>,
    /// Default: 1e-5.
    pub rms_norm_eps: Option<f64>,
    /// Default: false.
    pub tie_word_embeddings: Option<bool>,
    /// Default: 0.02.
    pub initializer_range: Option<f64>,
    /// Experts per layer. Required: transformers' default (8) seldom matches a small
    /// model, and a wrong count would only show as a tensor-shape mismatch.
    pub num_local_experts: usize,
    /// Default: 2.
    pub num_experts_per_tok: Option<usize>,
    /// Default: 0.
    pub router_jitter_noise: Option<f64>,
    /// Transformers' balancing-loss weight (k times ours). Default: 0.001.
    pub router_aux_loss_coef: Option<f64>,
}

/// `rope_parameters` of a `config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RopeParameters {
    /// Must be `"default"` if present.
    pub rope_type: Option<String>,
    /// RoPE base. Default: the outer `rope_theta`.
    pub rope_theta: Option<f64>,
}

impl MixtralConfig {
    /// The settings of a parsed `config.json`; a missing setting or a value of the wrong
    /// type is an error that names its key.
    pub fn from_json(config: &Value) -> Result<Self> {
        serde_path_to_error::deserialize(config).map_err(|e| match e.path().iter().next() {
            // A missing key is reported at the top level, with its name.
            None => anyhow!("config.json: {}", e.inner()),
            Some(_) => anyhow!("config.json: `{}`: {}", e.path(), e.inner()),
        })
    }

    /// Refuses the settings our model cannot compute as transformers does.
    fn check_supported(&self, d_model: usize, n_heads: usize, max_seq_len: usize) -> Result<()> {
        if let Some(kind) = &self.model_type {
            ensure!(
                kind == "mixtral",
                "config.json: `model_type` is {kind:?}, this importer reads \"mixtral\""
            );
        }
        if let Some(act) = &self.hidden_act {
            ensure!(
                act == "silu",
                "config.json: `hidden_act` {act:?} is not supported (only \"silu\")"
            );
        }
        ensure!(
            n_heads > 0 && d_model.is_multiple_of(n_heads),
            "config.json: `hidden_size` must be a multiple of `num_attention_heads`"
        );
        if let Some(head_dim) = self.head_dim {
            ensure!(
                head_dim == d_model / n_heads,
                "config.json: `head_dim` other than hidden_size / num_attention_heads is not supported"
            );
        }
        if let Some(window) = self.sliding_window {
            ensure!(
                window >= max_seq_len,
                "config.json: `sliding_window` attention is not supported"
            );
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_ref());
        if let Some(kind) = rope_type {
            ensure!(
                kind == "default",
                "config.json: `rope_parameters.rope_type` {kind:?} is not supported (only \"default\")"
            );
        }
        ensure!(
            self.rope_scaling.is_none(),
            "config.json: `rope_scaling` is not supported"
        );
        Ok(())
    }

    /// Our model config of these settings.
    fn model_config(&self) -> Result<ModelConfig> {
        let (d_model, n_heads) = (self.hidden_size, self.num_attention_heads);
        let max_seq_len = self.max_position_embeddings.unwrap_or(4096 * 32);
        self.check_supported(d_model, n_heads, max_seq_len)?;
        let rope_theta = self.rope_parameters.as_ref().and_then(|r| r.rope_theta);
        Ok(ModelConfig {
            vocab_size: self.vocab_size,
            d_model,
            n_layers: self.num_hidden_layers,
            n_heads,
            n_kv_heads: Some(self.num_key_value_heads.unwrap_or(n_heads)),
            max_seq_len,
            rope_theta: rope_theta.or(self.rope_theta).unwrap_or(1e6),
            norm_eps: self.rms_norm_eps.unwrap_or(1e-5),
            tie_embeddings: self.tie_word_embeddings.unwrap_or(false),
            dense_ffn_dim: 0,
            n_dense_layers: 0,
            moe_layer_interval: 1,
            init_std: self.initializer_range.unwrap_or(0.02),
        })
    }

    /// Our MoE config of these settings: Mixtral's softmax, top-k and renormalisation.
    fn moe_config(&self) -> MoeConfig {
        let top_k = self.num_experts_per_tok.unwrap_or(2);
        MoeConfig {
            n_experts: self.num_local_experts,
            top_k,
            expert_ffn_dim: self.intermediate_size,
            router: Gate::SoftmaxTopk { renormalize: true },
            jitter: self.router_jitter_noise.unwrap_or(0.0),
            n_shared_experts: 0,
            capacity_factor: None,
            eval_capacity_factor: None,
            drop_policy: DropPolicy::Position,
            aux_loss_weight: self.router_aux_loss_coef.unwrap_or(0.001) * top_k as f64,
            z_loss_weight: 0.0,
            bias_update_rate: 0.0,
        }
    }
}

/// The model and MoE configs of a Mixtral `config.json`, each unsupported setting refused
/// with its key named.
pub fn configs_from_json(config: &Value) -> Result<(ModelConfig, MoeConfig)> {
    let config = MixtralConfig::from_json(config)?;
    let model = config.model_config()?;
    let moe = config.moe_config();
    model.validate().context("config.json")?;
    moe.validate().context("config.json")?;
    Ok((model, moe))
}

/// `generation_config.json` of the exported model.
pub fn generation_config_json(eos_tokens: &[u32]) -> Value {
    let eos = match eos_tokens {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    json!({"_from_model_config": true, "eos_token_id": eos})
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
