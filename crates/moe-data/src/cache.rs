//! A directory of `.txt` works (the `[data] dataset` of a run config) prepared once into a
//! cache, keyed by the files' content and the tokenizer and split settings, so every run,
//! resume and ablation run on it shares one tokenizer and one set of shards.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::meta::FORMAT;
use crate::prepare::{PrepareOptions, Progress, TokenizerChoice, ValidationSplit, prepare};
use crate::sources::expand_inputs;
use crate::{PreparedSet, TextTokenizer};

/// The cache's default place: `$MOE_DATA_CACHE`, else `$XDG_CACHE_HOME/moe/data`, else
/// `~/.cache/moe/data`, else `.moe-cache` in the current directory.
pub fn default_cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("MOE_DATA_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("moe").join("data");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("moe").join("data"),
        None => PathBuf::from(".moe-cache"),
    }
}

/// How a directory is prepared.
#[derive(Debug, Clone)]
pub struct DirectorySettings {
    /// The directory of documents.
    pub dir: PathBuf,
    /// The tokenizer: trained BPE, bytes, or a given one (a checkpoint's).
    pub tokenizer: TokenizerChoice,
    /// The validation split.
    pub validation: ValidationSplit,
    /// Seed of the split and of the tokenizer's sample.
    pub seed: u64,
}

/// The prepared set of `settings.dir` in `cache_root`, preparing it first if the cache
/// has none for these files and settings. `progress` hears of the preparation only.
pub fn cached_directory(
    settings: &DirectorySettings,
    cache_root: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<PreparedSet> {
    open_or_prepare(settings, &cache_dir(settings, cache_root)?, progress)
}

/// The prepared set of `settings.dir` in `dir`, its cache directory (from [`cache_dir`],
/// which hashes every input file: a caller that has it need not hash them again),
/// preparing it there first if it is not yet.
pub fn open_or_prepare(
    settings: &DirectorySettings,
    dir: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<PreparedSet> {
    if dir.is_dir() {
        return PreparedSet::open(dir);
    }
    let mut options = PrepareOptions::new(vec![settings.dir.clone()], dir.to_path_buf());
    options.tokenizer = settings.tokenizer.clone();
    options.validation = settings.validation.clone();
    options.seed = settings.seed;
    options.command = format!("cache of {}", settings.dir.display());
    if let Err(error) = prepare(&options, progress) {
        // Another process may have prepared the same set meanwhile.
        if !dir.is_dir() {
            return Err(error);
        }
    }
    PreparedSet::open(dir)
}

/// Where the cache keeps (or would keep) the prepared set of `settings`.
pub fn cache_dir(settings: &DirectorySettings, cache_root: &Path) -> Result<PathBuf> {
    Ok(cache_root.join(&cache_key(settings)?[..24]))
}

/// SHA-256 over the layout version, every input file's path and content, the tokenizer
/// and the split.
fn cache_key(settings: &DirectorySettings) -> Result<String> {
    let mut hash = Sha256::new();
    hash.update(format!("moe prepared format {FORMAT}\n"));
    for file in expand_inputs(std::slice::from_ref(&settings.dir))? {
        let relative = file.path.strip_prefix(&settings.dir).unwrap_or(&file.path);
        hash.update(format!("file {}\n", relative.display()));
        let mut reader = std::fs::File::open(&file.path)
            .with_context(|| format!("opening {}", file.path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let read = reader
                .read(&mut buf)
                .with_context(|| format!("reading {}", file.path.display()))?;
            if read == 0 {
                break;
            }
            hash.update(&buf[..read]);
        }
    }
    let tokenizer = match &settings.tokenizer {
        // "chat": BPEs trained since they hold ChatML's markers get new entries.
        TokenizerChoice::TrainBpe { vocab_size } => format!("bpe chat {vocab_size}"),
        TokenizerChoice::Bytes => "bytes".into(),
        TokenizerChoice::Given(tokenizer) => format!("given {}", tokenizer.fingerprint()?),
        TokenizerChoice::File(path) => {
            format!("given {}", TextTokenizer::load(path)?.fingerprint()?)
        }
    };
    hash.update(format!(
        "tokenizer {tokenizer}\nvalidation {:?}\nseed {}\n",
        settings.validation, settings.seed
    ));
    Ok(format!("{:x}", hash.finalize()))
}
