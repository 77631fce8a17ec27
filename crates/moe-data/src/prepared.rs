//! A prepared dataset opened for reading: its description, tokenizer and memory-mapped
//! splits, every file checked against `meta.json` on open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, ensure};

use crate::TextTokenizer;
use crate::array_file::{ArrayFile, Dtype};
use crate::meta::{
    ChatSplitMeta, DOCUMENTS_FILE, FORMAT, META_FILE, Meta, SplitMeta, TOKENIZER_FILE, mask_file,
};

/// A directory written by `moe data prepare`.
#[derive(Debug, Clone)]
pub struct PreparedSet {
    /// Where it lives.
    pub dir: PathBuf,
    /// Its `meta.json`.
    pub meta: Meta,
    /// The tokenizer of its shards.
    pub tokenizer: TextTokenizer,
    /// The training split.
    pub train: Arc<TokenSplit>,
    /// The validation split.
    pub val: Arc<TokenSplit>,
}

impl PreparedSet {
    /// Opens `dir`, checking the format, the tokenizer's fingerprint and every shard's
    /// header and size.
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(META_FILE);
        ensure!(
            dir.is_dir(),
            "prepared dataset `{}` does not exist (make one with `moe data prepare`)",
            dir.display()
        );
        let text = std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "reading {} (is `{}` a prepared dataset?)",
                meta_path.display(),
                dir.display()
            )
        })?;
        let meta: Meta = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", meta_path.display()))?;
        ensure!(
            meta.format == FORMAT,
            "{} has format {}; this moe reads format {FORMAT}: prepare the data again",
            meta_path.display(),
            meta.format
        );
        let tokenizer = TextTokenizer::load(&dir.join(TOKENIZER_FILE))?;
        ensure!(
            tokenizer.fingerprint()? == meta.tokenizer_sha256,
            "{} does not match the tokenizer recorded in {} (was it replaced?)",
            dir.join(TOKENIZER_FILE).display(),
            meta_path.display()
        );
        ensure!(
            tokenizer.vocab_size() == meta.vocab_size,
            "{}: vocab_size {} but the tokenizer has {} tokens",
            meta_path.display(),
            meta.vocab_size,
            tokenizer.vocab_size()
        );
        // Training reads scattered windows; validation reads its split in order.
        let train = TokenSplit::open(&dir.join("train"), &meta.train, meta.dtype, true)?;
        let val = TokenSplit::open(&dir.join("val"), &meta.val, meta.dtype, false)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            tokenizer,
            train: Arc::new(train),
            val: Arc::new(val),
        })
    }
}

/// One split's tokens: its shards read as one stream.
#[derive(Debug)]
pub struct TokenSplit {
    shards: Vec<ArrayFile>,
    /// Chat data: each shard's loss mask.
    masks: Option<Vec<ArrayFile>>,
    chat: Option<ChatSplitMeta>,
    /// Position of each shard's first token in the stream.
    starts: Vec<u64>,
    tokens: u64,
    documents: ArrayFile,
    bytes_per_token: f64,
    /// Reads are scattered windows: no read-around, and their pages are unmapped after
    /// each read, so the run's resident memory does not grow with what it has read.
    scattered: bool,
}

impl TokenSplit {
    fn open(dir: &Path, meta: &SplitMeta, dtype: Dtype, scattered: bool) -> Result<Self> {
        let (mut shards, mut starts, mut tokens) = (Vec::new(), Vec::new(), 0u64);
        let mut masks = meta.chat.map(|_| Vec::new());
        for shard in &meta.shards {
            let path = dir.join(&shard.file);
            let file = ArrayFile::open(&path, dtype)?;
            ensure!(
                file.len() == shard.tokens,
                "{} holds {} tokens where meta.json says {}",
                path.display(),
                file.len(),
                shard.tokens
            );
            if let Some(masks) = &mut masks {
                let path = dir.join(mask_file(&shard.file));
                let mask = ArrayFile::open(&path, Dtype::U8)?;
                ensure!(
                    mask.len() == shard.tokens,
                    "{} holds {} values for the {} tokens of its shard",
                    path.display(),
                    mask.len(),
                    shard.tokens
                );
                masks.push(mask);
            }
            if scattered {
                file.advise_random_reads();
            }
            starts.push(tokens);
            tokens += file.len();
            shards.push(file);
        }
        ensure!(
            tokens == meta.tokens,
            "{}: the shards hold {tokens} tokens where meta.json says {}",
            dir.display(),
            meta.tokens
        );
        let documents = ArrayFile::open(&dir.join(DOCUMENTS_FILE), Dtype::U64)?;
        ensure!(
            documents.len() == meta.documents,
            "{}: {} document offsets where meta.json says {} documents",
            dir.join(DOCUMENTS_FILE).display(),
            documents.len(),
            meta.documents
        );
        Ok(Self {
            shards,
            masks,
            chat: meta.chat,
            starts,
            tokens,
            documents,
            bytes_per_token: meta.bytes_per_token(),
            scattered,
        })
    }

    /// Tokens in the split.
    pub fn len(&self) -> u64 {
        self.tokens
    }

    /// Whether the split holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Bytes of text per token (from `meta.json`), for bits per byte.
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes_per_token
    }

    /// Number of documents.
    pub fn documents(&self) -> u64 {
        self.documents.len()
    }

    /// The token range of document `index`.
    pub fn document(&self, index: u64) -> std::ops::Range<u64> {
        let start = self.documents.get(index);
        let end = match index + 1 < self.documents.len() {
            true => self.documents.get(index + 1),
            false => self.tokens,
        };
        start..end
    }

    /// Chat data: its trained tokens' counts; `None` for prose.
    pub fn chat(&self) -> Option<&ChatSplitMeta> {
        self.chat.as_ref()
    }

    /// Tokens `start..start + len` (within the split), across shard boundaries.
    pub fn tokens(&self, start: u64, len: usize) -> Vec<u32> {
        self.read(&self.shards, start, len)
    }

    /// The loss mask of tokens `start..start + len` (1 = trained on); `None` for prose.
    pub fn mask(&self, start: u64, len: usize) -> Option<Vec<u32>> {
        Some(self.read(self.masks.as_ref()?, start, len))
    }

    /// Values `start..start + len` of `files`, one per shard.
    fn read(&self, files: &[ArrayFile], start: u64, len: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(len);
        let mut at = start;
        let end = start + len as u64;
        let mut shard = self.starts.partition_point(|&s| s <= at).saturating_sub(1);
        while at < end {
            let file = &files[shard];
            let offset = at - self.starts[shard];
            let take = (file.len() - offset).min(end - at);
            file.read_into(offset, take as usize, &mut out);
            if self.scattered {
                file.unmap_pages(offset, take as usize);
            }
            at += take;
            shard += 1;
        }
        out
    }
}
