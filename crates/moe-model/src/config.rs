//! Model and MoE-layer configuration, with validation that names the offending field.

use moe_kernels::Gate;
use serde::{Deserialize, Serialize};

/// A configuration value that cannot work, with the dotted name of its field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid config `{field}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `moe.top_k`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// An error for `field` saying `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Shape of the decoder-only transformer around the feed-forward blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size; must match the tokenizer (256 for the byte tokenizer).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Attention (query) heads.
    pub n_heads: usize,
    /// Key/value heads; fewer than `n_heads` gives grouped-query attention.
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// Longest sequence the model attends over (RoPE table size, generation context).
    pub max_seq_len: usize,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Share the token embedding with the LM head.
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Hidden width of the dense SwiGLU feed-forward used by non-MoE layers.
    #[serde(default)]
    pub dense_ffn_dim: usize,
    /// The first this many blocks use a dense feed-forward instead of an MoE layer.
    #[serde(default)]
    pub n_dense_layers: usize,
    /// After the dense prefix, every `moe_layer_interval`-th block is MoE (1 = all, 2 = every other).
    #[serde(default = "one")]
    pub moe_layer_interval: usize,
    /// Standard deviation of the normal initialisation of weight matrices.
    #[serde(default = "default_init_std")]
    pub init_std: f64,
}

/// Which assignments an expert keeps when more arrive than its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Keep the first `C` assignments in token order (Switch, GShard).
    Position,
    /// Keep the `C` assignments with the highest router weight.
    Probability,
}

/// The mixture-of-experts feed-forward layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Routed experts per MoE layer.
    pub n_experts: usize,
    /// Experts each token is sent to.
    pub top_k: usize,
    /// Hidden width of each expert's SwiGLU.
    pub expert_ffn_dim: usize,
    /// How the router scores experts and weights the chosen ones, with that gate's
    /// settings (`router = { kind = "sigmoid", scale = 2.5 }`).
    #[serde(default)]
    pub router: Gate,
    /// Multiplicative jitter on the router input during training: x * U(1 - eps, 1 + eps).
    #[serde(default)]
    pub jitter: f64,
    /// Always-on shared experts (each of width `expert_ffn_dim`) added to the routed output.
    #[serde(default)]
    pub n_shared_experts: usize,
    /// Capacity factor during training; absent = dropless.
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// Capacity factor during evaluation and generation; absent = dropless.
    #[serde(default)]
    pub eval_capacity_factor: Option<f64>,
    /// Which assignments are dropped on overflow.
    #[serde(default = "default_drop_policy")]
    pub drop_policy: DropPolicy,
    /// Weight of the Switch load-balancing loss (balanced optimum equals this weight).
    #[serde(default)]
    pub aux_loss_weight: f64,
    /// Weight of the ST-MoE router z-loss.
    #[serde(default)]
    pub z_loss_weight: f64,
    /// Aux-loss-free balancing: after each step, bias_i += rate * sign(mean load - load_i).
    /// 0 disables the bias.
    #[serde(default)]
    pub bias_update_rate: f64,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_init_std() -> f64 {
    0.02
}
fn one() -> usize {
    1
}
fn default_drop_policy() -> DropPolicy {
    DropPolicy::Position
}

impl ModelConfig {
    /// Key/value heads actually used.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Whether block `layer` (0-based) uses the MoE feed-forward.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.n_dense_layers
            && (layer - self.n_dense_layers).is_multiple_of(self.moe_layer_interval)
    }

    /// Number of MoE blocks.
    pub fn n_moe_layers(&self) -> usize {
        (0..self.n_layers).filter(|&l| self.is_moe_layer(l)).count()
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("model.vocab_size", self.vocab_size)?;
        positive("model.d_model", self.d_model)?;
        positive("model.n_layers", self.n_layers)?;
        positive("model.n_heads", self.n_heads)?;
        positive("model.max_seq_len", self.max_seq_len)?;
        positive("model.moe_layer_interval", self.moe_layer_interval)?;
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ConfigError::new(
                "model.d_model",
                format!(
                    "{} is not divisible by n_heads = {}",
                    self.d_model, self.n_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ConfigError::new(
                "model.n_heads",
                format!("head dimension {} must be even for RoPE", self.head_dim()),
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.n_heads.is_multiple_of(kv) {
            return Err(ConfigError::new(
                "model.n_kv_heads",
                format!(
                    "{kv} must be positive and divide n_heads = {}",
                    self.n_heads
                ),
            ));
        }
        finite_positive("model.rope_theta", self.rope_theta)?;
        finite_positive("model.norm_eps", self.norm_eps)?;
        finite_positive("model.init_std", self.init_std)?;
        if self.n_dense_layers > self.n_layers {
            return Err(ConfigError::new(
                "model.n_dense_layers",
                format!(
                    "{} exceeds n_layers = {}",
                    self.n_dense_layers, self.n_layers
                ),
            ));
        }
        let has_dense = (0..self.n_layers).any(|l| !self.is_moe_layer(l));
        if has_dense && self.dense_ffn_dim == 0 {
            return Err(ConfigError::new(
                "model.dense_ffn_dim",
                "must be positive when some layers are dense",
            ));
        }
        Ok(())
    }

    /// The number of parameters of a model of this shape with the MoE layers of `moe`
    /// (embedding, LM head unless tied, attention, norms, routers with their bias,
    /// experts, shared experts, dense feed-forwards), computed without overflow: a shape
    /// whose product does not fit in 64 bits is an error naming its field, so absurd
    /// configs are refused before anything is allocated.
    pub fn parameter_count(&self, moe: &MoeConfig) -> Result<u64, ConfigError> {
        let (d, f) = (self.d_model, moe.expert_ffn_dim);
        let width = ("model.d_model", d);
        let embedding = product(&[("model.vocab_size", self.vocab_size), width])?;
        let head_dim = d.checked_div(self.n_heads).unwrap_or(0);
        let kv_width = product(&[
            ("model.n_kv_heads", self.kv_heads()),
            ("model.d_model", head_dim),
        ])?;
        let block = sum(
            "model.d_model",
            &[
                product(&[width, width, ("model.d_model", 2)])?,
                product(&[width, ("model.n_kv_heads", 2)])?
                    .checked_mul(kv_width)
                    .ok_or_else(|| overflow("model.n_kv_heads"))?,
                product(&[width, ("model.d_model", 2)])?,
            ],
        )?;
        let experts = ("moe.n_experts", moe.n_experts);
        let expert = [width, ("moe.expert_ffn_dim", f), ("moe.expert_ffn_dim", 3)];
        let moe_ffn = sum(
            "moe.n_experts",
            &[
                product(&[width, experts])?,
                moe.n_experts as u64,
                product(&[&expert[..], &[experts]].concat())?,
                product(
                    &[
                        &expert[..],
                        &[("moe.n_shared_experts", moe.n_shared_experts)],
                    ]
                    .concat(),
                )?,
            ],
        )?;
        let dense_ffn = product(&[
            width,
            ("model.dense_ffn_dim", self.dense_ffn_dim),
            ("model.dense_ffn_dim", 3),
        ])?;
        let n_moe = (self.n_layers.saturating_sub(self.n_dense_layers))
            .div_ceil(self.moe_layer_interval.max(1));
        let layers = |count: usize, size: u64| {
            size.checked_mul(count as u64)
                .ok_or_else(|| overflow("model.n_layers"))
        };
        sum(
            "model.n_layers",
            &[
                embedding,
                if self.tie_embeddings { 0 } else { embedding },
                d as u64,
                layers(self.n_layers, block)?,
                layers(n_moe, moe_ffn)?,
                layers(self.n_layers - n_moe, dense_ffn)?,
            ],
        )
    }
}

/// The product of `factors` (field, value); an overflow names the largest factor's field.
fn product(factors: &[(&str, usize)]) -> Result<u64, ConfigError> {
    factors
        .iter()
        .try_fold(1u64, |acc, &(_, value)| acc.checked_mul(value as u64))
        .ok_or_else(|| {
            let largest = factors.iter().max_by_key(|(_, value)| *value);
            overflow(largest.map_or("model", |(field, _)| field))
        })
}

/// The error of a size that does not fit in 64 bits, naming `field`.
fn overflow(field: &str) -> ConfigError {
    ConfigError::new(field, "is too large: the model's size overflows 64 bits")
}

/// `terms` added without overflow; an overflow names `field`.
fn sum(field: &str, terms: &[u64]) -> Result<u64, ConfigError> {
    terms
        .iter()
        .try_fold(0u64, |acc, &t| acc.checked_add(t))
        .ok_or_else(|| overflow(field))
}

impl MoeConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("moe.n_experts", self.n_experts)?;
        positive("moe.top_k", self.top_k)?;
        positive("moe.expert_ffn_dim", self.expert_ffn_dim)?;
        if self.top_k > self.n_experts {
            return Err(ConfigError::new(
                "moe.top_k",
                format!("{} exceeds n_experts = {}", self.top_k, self.n_experts),
            ));
        }
        for (field, cf) in [
            ("moe.capacity_factor", self.capacity_factor),
            ("moe.eval_capacity_factor", self.eval_capacity_factor),
        ] {
            if let Some(cf) = cf {
                finite_positive(field, cf)?;
            }
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(ConfigError::new(
                "moe.jitter",
                format!("{} must be in [0, 1)", self.jitter),
            ));
        }
        if let Gate::Sigmoid { scale } = self.router {
            finite_positive("moe.router.scale", scale)?;
        }
        for (field, v) in [
            ("moe.aux_loss_weight", self.aux_loss_weight),
            ("moe.z_loss_weight", self.z_loss_weight),
            ("moe.bias_update_rate", self.bias_update_rate),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(ConfigError::new(
                    field,
                    format!("{v} must be finite and >= 0"),
                ));
            }
        }
        Ok(())
    }

    /// Slots per expert for `tokens` tokens, or `None` for dropless routing.
    /// C = ceil(cf * T * k / E), at least 1.
    pub fn capacity(&self, tokens: usize, training: bool) -> Option<usize> {
        let cf = if training {
            self.capacity_factor
        } else {
            self.eval_capacity_factor
        }?;
        let slots = (cf * (tokens * self.top_k) as f64 / self.n_experts as f64).ceil();
        Some((slots as usize).max(1))
    }
}

fn positive(field: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(field, "must be positive"));
    }
    Ok(())
}

fn finite_positive(field: &str, value: f64) -> Result<(), ConfigError> {
    if !value.is_finite() || value <= 0.0 {
        return Err(ConfigError::new(
            field,
            format!("{value} must be a finite number > 0"),
        ));
    }
    Ok(())
}
