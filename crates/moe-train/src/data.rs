//! A run's data: its prepared sets (or the cached preparation of its `dataset`
//! directory), checked against the model and tokenizer, and the windows it trains and
//! evaluates on.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use moe_data::{
    DirectorySettings, EvalWindows, LossOn, PreparedSet, Progress, TextTokenizer, TokenSplit,
    TokenizerChoice, TokenizerKind, TrainWindows, ValidationSplit, WeightedSplit, cache_dir,
    default_cache_root, open_or_prepare,
};

use crate::config::{DataSource, RunConfig};

/// Seed of a `dataset` directory's validation split and tokenizer sample: fixed, so runs
/// with other seeds share one cached preparation.
const DIRECTORY_SPLIT_SEED: u64 = 0;
/// Share of a `dataset` directory's documents held out when no works are named.
const DIRECTORY_VALIDATION_FRACTION: f64 = 0.01;

/// The prepared sets a run reads, with their mixture weights.
#[derive(Debug, Clone)]
pub struct RunData {
    /// The sets, in config order.
    pub sets: Vec<PreparedSet>,
    /// Their weights.
    pub weights: Vec<f64>,
    /// Special tokens the data's tokenizer added to the model's (chat data prepared with
    /// a checkpoint's tokenizer that lacked its template's markers): a model trained on it
    /// must grow its vocabulary to the data's.
    pub added_tokens: Vec<String>,
}

impl RunData {
    /// Opens the data `config` names. A `dataset` directory is prepared into the data
    /// cache the first time. `tokenizer` is the model's own (resuming, or starting from
    /// a checkpoint): the data must have been tokenized with it.
    pub fn open(
        config: &RunConfig,
        tokenizer: Option<&TextTokenizer>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let (sets, weights) = match config.data.source() {
            DataSource::Prepared(dirs) => {
                let mut sets = Vec::new();
                let mut weights = Vec::new();
                for (dir, weight) in dirs {
                    sets.push(PreparedSet::open(&dir)?);
                    weights.push(weight);
                }
                (sets, weights)
            }
            DataSource::Directory(dir) => {
                let set = cached_dataset(config, &dir, tokenizer, progress)?;
                (vec![set], vec![1.0])
            }
        };
        let mut data = Self {
            sets,
            weights,
            added_tokens: Vec::new(),
        };
        data.check(config, tokenizer)?;
        Ok(data)
    }

    /// The tokenizer every set was made with.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.sets[0].tokenizer
    }

    /// The data's vocabulary (every set shares one tokenizer).
    pub fn vocab_size(&self) -> usize {
        self.sets[0].meta.vocab_size
    }

    fn check(&mut self, config: &RunConfig, tokenizer: Option<&TextTokenizer>) -> Result<()> {
        let first = &self.sets[0];
        if let Some(tokenizer) = tokenizer {
            let model = tokenizer.fingerprint()?;
            let chat = first.meta.chat.as_ref();
            if first.meta.tokenizer_sha256 != model {
                ensure!(
                    chat.and_then(|c| c.base_tokenizer_sha256.as_deref()) == Some(&model),
                    "`{}` was tokenized with another tokenizer than the model's; prepare the data with --tokenizer set to the checkpoint's tokenizer.json",
                    first.dir.display()
                );
                self.added_tokens = chat.map(|c| c.added_tokens.clone()).unwrap_or_default();
            }
        }
        for set in &self.sets {
            ensure!(
                set.meta.tokenizer_sha256 == first.meta.tokenizer_sha256,
                "`{}` and `{}` were prepared with different tokenizers; a mixture needs one (prepare with --tokenizer {}/tokenizer.json)",
                first.dir.display(),
                set.dir.display(),
                first.dir.display()
            );
            ensure!(
                !self.added_tokens.is_empty() || set.meta.vocab_size <= config.model.vocab_size,
                "prepared set `{}` has a vocabulary of {} tokens but model.vocab_size is {}",
                set.dir.display(),
                set.meta.vocab_size,
                config.model.vocab_size
            );
            ensure!(
                !set.val.is_empty(),
                "prepared set `{}` has no validation tokens",
                set.dir.display()
            );
        }
        Ok(())
    }

    fn splits(&self, split: impl Fn(&PreparedSet) -> Arc<TokenSplit>) -> Vec<WeightedSplit> {
        self.sets
            .iter()
            .zip(&self.weights)
            .map(|(set, &weight)| WeightedSplit {
                split: split(set),
                weight,
            })
            .collect()
    }

    /// The run's training batches (`batch_size` windows each).
    pub fn train_windows(&self, config: &RunConfig, batch_size: usize) -> Result<TrainWindows> {
        let splits = self.splits(|s| s.train.clone());
        let (seq_len, seed) = (config.data.seq_len, config.train.seed);
        TrainWindows::with_loss_on(&splits, seq_len, batch_size, seed, config.train.loss_on)
            .context("reading the training split")
    }

    /// The fixed windows of every periodic evaluation.
    pub fn eval_windows(&self, config: &RunConfig) -> EvalWindows {
        let splits = self.splits(|s| s.val.clone());
        let tokens = config.eval_tokens();
        EvalWindows::fixed(&splits, config.data.seq_len, tokens, config.train.loss_on)
    }

    /// Every window of the validation splits, scored on `loss_on` (answers need chat
    /// data).
    pub fn full_eval_windows(&self, seq_len: usize, loss_on: LossOn) -> Result<EvalWindows> {
        if loss_on == LossOn::Assistant
            && let Some(set) = self.sets.iter().find(|s| s.val.chat().is_none())
        {
            bail!(
                "`{}` is prose, with no answers to score: scoring the answers needs chat data (`moe data prepare --format chat`)",
                set.dir.display()
            );
        }
        let splits: Vec<_> = self.sets.iter().map(|s| s.val.clone()).collect();
        Ok(EvalWindows::full(&splits, seq_len, loss_on))
    }

    /// One line per set: its place, tokens and documents.
    pub fn describe(&self) -> Vec<String> {
        self.sets
            .iter()
            .zip(&self.weights)
            .map(|(s, w)| {
                format!(
                    "data: {} (weight {w}): {} train tokens in {} documents, {} validation tokens in {}",
                    s.dir.display(),
                    s.meta.train.tokens,
                    s.meta.train.documents,
                    s.meta.val.tokens,
                    s.meta.val.documents
                )
            })
            .collect()
    }
}

/// The cached preparation of the `dataset` directory `dir`. With the model's
/// `tokenizer`, the entry made with the config's own tokenizer settings is used when it
/// is there and matches; else the directory is prepared with `tokenizer` itself. Each
/// entry's content key is computed once.
fn cached_dataset(
    config: &RunConfig,
    dir: &Path,
    tokenizer: Option<&TextTokenizer>,
    progress: &mut dyn FnMut(&str),
) -> Result<PreparedSet> {
    let data = &config.data;
    let validation = match &data.validation_works {
        Some(works) => ValidationSplit::Named(works.clone()),
        None => ValidationSplit::Fraction(DIRECTORY_VALIDATION_FRACTION),
    };
    let own = match data.tokenizer.unwrap_or(TokenizerKind::Bpe) {
        TokenizerKind::Bpe => TokenizerChoice::TrainBpe {
            vocab_size: config.model.vocab_size,
        },
        TokenizerKind::Byte => TokenizerChoice::Bytes,
    };
    let settings = |tokenizer| DirectorySettings {
        dir: dir.to_path_buf(),
        tokenizer,
        validation: validation.clone(),
        seed: DIRECTORY_SPLIT_SEED,
    };
    let root = default_cache_root();
    let own = settings(own);
    let own_dir = cache_dir(&own, &root)?;
    let (chosen, target) = match tokenizer {
        None => (own, own_dir),
        Some(tokenizer) => {
            if let Some(set) = open_if_tokenized_with(&own_dir, tokenizer) {
                return Ok(set);
            }
            let given = settings(TokenizerChoice::Given(Box::new(tokenizer.clone())));
            let given_dir = cache_dir(&given, &root)?;
            (given, given_dir)
        }
    };
    if target.is_dir() {
        return PreparedSet::open(&target);
    }
    progress(&format!(
        "preparing {} into the data cache {} (once; later runs reuse it)",
        dir.display(),
        target.display()
    ));
    let mut report = |p: Progress| {
        if let Progress::TrainingTokenizer { bytes } = p {
            progress(&format!("training a tokenizer on {bytes} bytes of text"));
        }
    };
    open_or_prepare(&chosen, &target, &mut report)
}

/// The prepared set in `dir`, if there is one and it was tokenized with `tokenizer`.
fn open_if_tokenized_with(dir: &Path, tokenizer: &TextTokenizer) -> Option<PreparedSet> {
    if !dir.is_dir() {
        return None;
    }
    let set = PreparedSet::open(dir).ok()?;
    let fingerprint = tokenizer.fingerprint().ok()?;
    (set.meta.tokenizer_sha256 == fingerprint).then_some(set)
}

/// The config with its data paths absolute (resolved against the current directory)
/// and the default dataset written out, as a run saves it.
pub fn with_absolute_data_paths(config: &RunConfig) -> Result<RunConfig> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let mut config = config.clone();
    if let DataSource::Directory(dir) = config.data.source() {
        config.data.dataset = Some(dir);
    }
    config.data = config.data.resolved_against(&cwd);
    Ok(config)
}
