//! The run configuration file (TOML): model, MoE, data and training sections, with
//! `--set section.key=value` overrides and validation that names the field.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use moe_data::{LossOn, TokenizerKind};
use moe_model::{ConfigError, ModelConfig, MoeConfig};
use serde::{Deserialize, Serialize};

/// Everything a training run needs, as read from `configs/*.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Transformer shape.
    pub model: ModelConfig,
    /// MoE layers.
    pub moe: MoeConfig,
    /// Corpus and tokenizer.
    pub data: DataConfig,
    /// Optimisation, logging and checkpoints.
    pub train: TrainConfig,
}

/// Where a run's tokens come from, and its sequence length. Set one of `prepared`
/// (a directory of `moe data prepare`), `sources` (a mixture of such directories) or
/// `dataset` (a directory of documents, prepared once into a cache); with none,
/// `dataset = "datasets/shakespeare"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A directory of documents (`.txt` works, JSON lines, parquet), prepared once into
    /// the data cache with the tokenizer and split below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<PathBuf>,
    /// A directory written by `moe data prepare`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<PathBuf>,
    /// A mixture of prepared directories (`[[data.sources]]` with `path` and `weight`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceConfig>,
    /// Tokenizer of `dataset` (default `bpe`, with `model.vocab_size` tokens; `byte`
    /// needs `model.vocab_size = 256`). A prepared set brings its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerKind>,
    /// `dataset` works held out for validation (file stems); absent, 1% of the
    /// documents (at least one), drawn with a fixed seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_works: Option<Vec<String>>,
    /// Training sequence length (at most `model.max_seq_len`).
    pub seq_len: usize,
}

/// One prepared directory of a mixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A directory written by `moe data prepare`.
    pub path: PathBuf,
    /// Its share of the training samples, relative to the others' (default 1).
    #[serde(default = "one_f64")]
    pub weight: f64,
}

/// The data a [`DataConfig`] names.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// A directory of documents, prepared into the cache.
    Directory(PathBuf),
    /// Prepared directories and their weights.
    Prepared(Vec<(PathBuf, f64)>),
}

impl DataConfig {
    /// Where the tokens come from.
    pub fn source(&self) -> DataSource {
        match (&self.dataset, &self.prepared) {
            (_, Some(dir)) => DataSource::Prepared(vec![(dir.clone(), 1.0)]),
            _ if !self.sources.is_empty() => DataSource::Prepared(
                self.sources
                    .iter()
                    .map(|s| (s.path.clone(), s.weight))
                    .collect(),
            ),
            (Some(dir), None) => DataSource::Directory(dir.clone()),
            (None, None) => DataSource::Directory(PathBuf::from("datasets/shakespeare")),
        }
    }

    /// The config with relative data paths made relative to `base` (absolute stay).
    pub fn resolved_against(&self, base: &Path) -> Self {
        let resolve = |p: &PathBuf| match p.is_absolute() {
            true => p.clone(),
            false => base.join(p),
        };
        let mut data = self.clone();
        data.dataset = self.dataset.as_ref().map(resolve);
        data.prepared = self.prepared.as_ref().map(resolve);
        for source in &mut data.sources {
            source.path = resolve(&source.path);
        }
        data
    }

    /// Checks the data fields against the model's vocabulary.
    fn validate(&self, model: &ModelConfig) -> Result<(), ConfigError> {
        let named = [
            self.dataset.is_some(),
            self.prepared.is_some(),
            !self.sources.is_empty(),
        ];
        if named.iter().filter(|&&n| n).count() > 1 {
            return Err(ConfigError::new(
                "data",
                "set only one of dataset, prepared and sources",
            ));
        }
        let dirs = match self.source() {
            DataSource::Directory(dir) => {
                self.validate_directory_settings(model)?;
                vec![("data.dataset", dir, 1.0)]
            }
            DataSource::Prepared(dirs) => {
                for (field, set) in [
                    ("data.tokenizer", self.tokenizer.is_some()),
                    ("data.validation_works", self.validation_works.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::new(
                            field,
                            "applies to data.dataset only: a prepared set brings its own tokenizer and split",
                        ));
                    }
                }
                let field = match self.prepared {
                    Some(_) => "data.prepared",
                    None => "data.sources",
                };
                dirs.into_iter().map(|(d, w)| (field, d, w)).collect()
            }
        };
        for (field, dir, weight) in dirs {
            if !dir.is_dir() {
                return Err(ConfigError::new(
                    field,
                    format!("directory `{}` does not exist", dir.display()),
                ));
            }
            if !weight.is_finite() || weight <= 0.0 {
                return Err(ConfigError::new(
                    "data.sources",
                    format!(
                        "weight {weight} of `{}` must be finite and > 0",
                        dir.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_directory_settings(&self, model: &ModelConfig) -> Result<(), ConfigError> {
        if self.validation_works.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::new(
                "data.validation_works",
                "name at least one work (or leave it out for a seeded 1% split)",
            ));
        }
        match self.tokenizer.unwrap_or(TokenizerKind::Bpe) {
            TokenizerKind::Byte if model.vocab_size != 256 => Err(ConfigError::new(
                "model.vocab_size",
                format!(
                    "{} must be 256 with data.tokenizer = \"byte\"",
                    model.vocab_size
                ),
            )),
            TokenizerKind::Bpe if model.vocab_size <= 257 => Err(ConfigError::new(
                "model.vocab_size",
                format!(
                    "{} must exceed 257 with data.tokenizer = \"bpe\"",
                    model.vocab_size
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Optimiser, schedule, logging and checkpointing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of initialisation, data order and jitter.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Sequences per micro-batch, on each replica.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Data-parallel replicas (`moe train --devices`): each trains on its own
    /// `batch_size` sequences of every micro-batch and the gradients are averaged, so a
    /// step sees `replicas * batch_size * grad_accum` sequences, the same trajectory as
    /// one replica with `replicas` times the batch (the LR schedule is per step).
    #[serde(default = "one")]
    pub replicas: usize,
    /// Devices each MoE layer's experts are spread over (`moe train --expert-devices`):
    /// expert `e` lives on device `e mod expert_devices` with its optimiser state, and the
    /// tokens routed to it travel there and back. At most `moe.n_experts`; not combined
    /// with `replicas` > 1 yet. Checkpoints hold the same stacked weights either way.
    #[serde(default = "one")]
    pub expert_devices: usize,
    /// Seconds a replica waits for the others (to join, or at a step's gradient
    /// exchange, which includes replica 0's evaluation and checkpoint time) before it
    /// stops with an error: a replica that died must not leave the others hanging.
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout_secs: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    #[serde(default)]
    pub min_lr: f64,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// AdamW beta 1.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// AdamW beta 2.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// AdamW epsilon.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this value (0 = no clipping).
    #[serde(default = "one_f64")]
    pub grad_clip: f64,
    /// Steps between training log lines.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Steps between validation passes (also run at the end).
    #[serde(default = "default_eval_every")]
    pub eval_every: usize,
    /// Validation tokens scored by each periodic evaluation: the same windows every
    /// time, spread over the whole validation split (default 32768). The final
    /// evaluation also scores the whole split, logged as `val_full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_tokens: Option<usize>,
    /// The older way to size periodic evaluations: this many batches of
    /// `batch_size` x `data.seq_len` tokens (used when `eval_tokens` is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_batches: Option<usize>,
    /// Steps between checkpoints (also written at the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// Checkpoints kept in the run directory (older ones are deleted).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Which tokens the loss is on: `all` (default) or `assistant`, the answers of chat
    /// data (`moe data prepare --format chat`) only, averaged over those tokens.
    #[serde(default, skip_serializing_if = "is_all")]
    pub loss_on: LossOn,
}

fn is_all(loss_on: &LossOn) -> bool {
    *loss_on == LossOn::All
}

impl TrainConfig {
    /// Checks every field; `n_experts` bounds the expert placement.
    fn validate(&self, n_experts: usize) -> Result<(), ConfigError> {
        self.validate_counts()?;
        self.validate_optimizer()?;
        self.validate_parallelism(n_experts)?;
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(ConfigError::new(
                "train.eps",
                format!("{} must be finite and > 0", self.eps),
            ));
        }
        Ok(())
    }

    /// Batch sizes, step counts and intervals must be positive.
    fn validate_counts(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("train.batch_size", self.batch_size),
            ("train.grad_accum", self.grad_accum),
            ("train.replicas", self.replicas),
            ("train.expert_devices", self.expert_devices),
            ("train.steps", self.steps),
            ("train.log_every", self.log_every),
            ("train.eval_every", self.eval_every),
            ("train.checkpoint_every", self.checkpoint_every),
            ("train.keep_checkpoints", self.keep_checkpoints),
        ] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be positive"));
            }
        }
        for (field, value) in [
            ("train.eval_tokens", self.eval_tokens),
            ("train.eval_batches", self.eval_batches),
        ] {
            if value == Some(0) {
                return Err(ConfigError::new(field, "must be positive"));
            }
        }
        Ok(())
    }

    /// The learning rates, AdamW's betas, weight decay and clipping.
    fn validate_optimizer(&self) -> Result<(), ConfigError> {
        if !self.lr.is_finite() || self.lr <= 0.0 {
            return Err(ConfigError::new(
                "train.lr",
                format!("{} must be finite and > 0", self.lr),
            ));
        }
        if !self.min_lr.is_finite() || self.min_lr < 0.0 || self.min_lr > self.lr {
            return Err(ConfigError::new(
                "train.min_lr",
                format!("{} must be in [0, lr]", self.min_lr),
            ));
        }
        for (field, value) in [("train.beta1", self.beta1), ("train.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(ConfigError::new(
                    field,
                    format!("{value} must be in [0, 1)"),
                ));
            }
        }
        for (field, value) in [
            ("train.weight_decay", self.weight_decay),
            ("train.grad_clip", self.grad_clip),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(ConfigError::new(
                    field,
                    format!("{value} must be finite and >= 0"),
                ));
            }
        }
        Ok(())
    }

    /// Expert placement and the replicas' timeout.
    fn validate_parallelism(&self, n_experts: usize) -> Result<(), ConfigError> {
        if self.expert_devices > 1 {
            if self.expert_devices > n_experts {
                return Err(ConfigError::new(
                    "train.expert_devices",
                    format!(
                        "{} devices for {} experts: at most one device per expert",
                        self.expert_devices, n_experts
                    ),
                ));
            }
            if self.replicas > 1 {
                return Err(ConfigError::new(
                    "train.expert_devices",
                    "expert placement cannot be combined with data parallelism (train.replicas > 1) yet",
                ));
            }
        }
        if !self.peer_timeout_secs.is_finite() || self.peer_timeout_secs <= 0.0 {
            return Err(ConfigError::new(
                "train.peer_timeout_secs",
                format!("{} must be finite and > 0", self.peer_timeout_secs),
            ));
        }
        Ok(())
    }
}

fn default_seed() -> u64 {
    42
}
fn one() -> usize {
    1
}
fn default_peer_timeout() -> f64 {
    600.0
}
fn one_f64() -> f64 {
    1.0
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_log_every() -> usize {
    10
}
fn default_eval_every() -> usize {
    200
}
fn default_checkpoint_every() -> usize {
    200
}
fn default_keep() -> usize {
    2
}

impl RunConfig {
    /// Reads `path`, applies `overrides` (`section.key=value`, value in TOML syntax or a bare
    /// string) and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text, overrides).with_context(|| format!("in config {}", path.display()))
    }

    /// Reads the config at `path` laid over `base` (a checkpoint's saved config, for a
    /// fine-tuning run): each section `path` has replaces `base`'s, the others are kept;
    /// then applies overrides and validates. A fine-tuning config can so hold only its
    /// `[data]` and `[train]`, the model's shape coming from the checkpoint.
    pub fn load_over(base: &Path, path: &Path, overrides: &[String]) -> Result<Self> {
        let read = |path: &Path| -> Result<toml::Table> {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            let mut table: toml::Table =
                toml::from_str(&text).with_context(|| format!("in config {}", path.display()))?;
            router_as_table(&mut table).with_context(|| format!("in config {}", path.display()))?;
            Ok(table)
        };
        let mut table = read(base)?;
        table.extend(read(path)?);
        Self::from_table(table, overrides)
            .with_context(|| format!("in config {} (over {})", path.display(), base.display()))
    }

    /// Parses TOML text, applies overrides and validates.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        Self::from_table(toml::from_str(text)?, overrides)
    }

    fn from_table(mut table: toml::Table, overrides: &[String]) -> Result<Self> {
        router_as_table(&mut table)?;
        for item in overrides {
            apply_override(&mut table, item)?;
        }
        // Again for an override that sets a bare kind (`moe.router=sigmoid`).
        router_as_table(&mut table)?;
        let config: RunConfig = table.try_into()?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a config saved beside a model (a checkpoint's or an export's), without the
    /// checks that concern training on this machine (such as the dataset being present).
    /// Relative data paths resolve against the file's directory, never the current one.
    pub fn parse_saved(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut table: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        router_as_table(&mut table).with_context(|| format!("in {}", path.display()))?;
        let mut config: RunConfig = table
            .try_into()
            .with_context(|| format!("parsing {}", path.display()))?;
        if let Some(dir) = path.parent() {
            config.data = config.data.resolved_against(dir);
        }
        config
            .model
            .validate()
            .with_context(|| format!("in {}", path.display()))?;
        config
            .moe
            .validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(config)
    }

    /// A run config around an imported or converted model: its shapes, the shipped corpus
    /// and fine-tuning defaults (batch 8, 1000 steps, lr 3e-4, 100 warm-up steps, sequences
    /// of min(256, model.max_seq_len) tokens). Edit the checkpoint's config.toml or pass
    /// `--set` to change them.
    pub fn for_model(model: ModelConfig, moe: MoeConfig) -> Self {
        #[derive(Deserialize)]
        struct Rest {
            data: DataConfig,
            train: TrainConfig,
        }
        let seq_len = model.max_seq_len.min(256);
        let text = format!(
            "[data]\nseq_len = {seq_len}\n[train]\nbatch_size = 8\nsteps = 1000\nlr = 3e-4\nwarmup_steps = 100\n"
        );
        let rest: Rest = toml::from_str(&text).expect("the fine-tuning defaults parse");
        Self {
            model,
            moe,
            data: rest.data,
            train: rest.train,
        }
    }

    /// The config as TOML, as saved in run directories and checkpoints.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Checks every field and the relations between sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.moe.validate()?;
        let (data, train) = (&self.data, &self.train);
        if data.seq_len == 0 || data.seq_len > self.model.max_seq_len {
            return Err(ConfigError::new(
                "data.seq_len",
                format!(
                    "{} must be in 1..={} (model.max_seq_len)",
                    data.seq_len, self.model.max_seq_len
                ),
            ));
        }
        data.validate(&self.model)?;
        train.validate(self.moe.n_experts)
    }

    /// Validation tokens each periodic evaluation scores.
    pub fn eval_tokens(&self) -> usize {
        match (self.train.eval_tokens, self.train.eval_batches) {
            (Some(tokens), _) => tokens,
            (None, Some(batches)) => batches * self.train.batch_size * self.data.seq_len,
            (None, None) => 32768,
        }
    }

    /// Tokens per optimiser step.
    pub fn tokens_per_step(&self) -> usize {
        self.train.replicas * self.train.batch_size * self.train.grad_accum * self.data.seq_len
    }
}

/// Applies one `section.key=value` override (or `section.table.key=value`) to the parsed
/// TOML table, creating the tables on the way.
fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let Some((key, raw)) = item.split_once('=') else {
        bail!("--set `{item}`: expected section.key=value");
    };
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
        bail!("--set `{item}`: the key must be section.key, e.g. train.steps");
    }
    let (last, parents) = path.split_last().expect("at least two parts");
    let mut current = table;
    for (depth, part) in parents.iter().enumerate() {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(next) = entry else {
            bail!(
                "--set `{item}`: `{}` is not a table",
                path[..=depth].join(".")
            );
        };
        current = next;
    }
    current.insert(last.to_string(), parse_value(raw.trim()));
    Ok(())
}

/// The flat `[moe]` fields of configs saved before the router was one table: each moved
/// into the router table of one kind, under a new name.
const FLAT_ROUTER_FIELDS: [(&str, &str, &str); 2] = [
    ("renormalize", "softmax_topk", "renormalize"),
    ("route_scale", "sigmoid", "scale"),
];

/// Brings `moe.router` to its table form: a bare kind (`router = "sigmoid"`) becomes
/// `{ kind = "sigmoid" }`, and the flat fields of older configs (`renormalize`,
/// `route_scale`) move into it where they applied to the kind (they were ignored
/// otherwise). Beside a router table, a flat field is an error naming its new place.
fn router_as_table(table: &mut toml::Table) -> Result<()> {
    let Some(toml::Value::Table(moe)) = table.get_mut("moe") else {
        return Ok(());
    };
    let flat: Vec<_> = FLAT_ROUTER_FIELDS
        .iter()
        .filter_map(|&(field, kind, name)| Some((field, kind, name, moe.remove(field)?)))
        .collect();
    let kind = match moe.get("router") {
        None if flat.is_empty() => return Ok(()),
        None => "softmax_topk".to_string(),
        Some(toml::Value::String(kind)) => kind.clone(),
        Some(toml::Value::Table(router)) => {
            if let Some((field, _, name, _)) = flat.first() {
                bail!(
                    "invalid config `moe.{field}`: set it in the router table, as `moe.router.{name}`"
                );
            }
            if !router.contains_key("kind") {
                bail!(
                    "invalid config `moe.router`: give its `kind` (softmax_topk, topk_softmax or sigmoid)"
                );
            }
            return Ok(());
        }
        Some(other) => bail!(
            "invalid config `moe.router`: expected a table such as {{ kind = \"sigmoid\", scale = 2.5 }} or a kind, got {other}"
        ),
    };
    let mut router = toml::Table::new();
    for (_, field_kind, name, value) in flat {
        if field_kind == kind {
            router.insert(name.to_string(), value);
        }
    }
    router.insert("kind".to_string(), toml::Value::String(kind));
    moe.insert("router".to_string(), toml::Value::Table(router));
    Ok(())
}

/// A TOML value (`3`, `1e-3`, `true`, `"x"`, `[1, 2]`), or the raw text as a string.
fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}
