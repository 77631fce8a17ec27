//! `meta.json`: what a prepared dataset holds and how it was made.

use serde::{Deserialize, Serialize};

use crate::array_file::Dtype;
use crate::prepare::Overlong;

/// The prepared-dataset layout this code writes and reads.
pub const FORMAT: u32 = 1;
/// The description of a prepared set.
pub const META_FILE: &str = "meta.json";
/// The tokenizer that produced the shards.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Each split's document start offsets (u64 token positions).
pub const DOCUMENTS_FILE: &str = "documents.bin";

/// The loss mask beside token shard `shard` (`00000.bin` -> `00000.mask`): one byte per
/// token, 1 where the token is trained on.
pub fn mask_file(shard: &str) -> String {
    let stem = shard.strip_suffix(".bin").unwrap_or(shard);
    format!("{stem}.mask")
}

/// The contents of `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Layout version ([`FORMAT`]).
    pub format: u32,
    /// Token ids in the tokenizer, special tokens included.
    pub vocab_size: usize,
    /// How token ids are stored.
    pub dtype: Dtype,
    /// The token appended after every document, if the tokenizer has one.
    pub end_of_text: Option<u32>,
    /// SHA-256 of the tokenizer's compact JSON (see `TextTokenizer::fingerprint`).
    pub tokenizer_sha256: String,
    /// Seed of the validation split and the tokenizer's sample.
    pub seed: u64,
    /// The JSON field or parquet column read.
    pub text_field: String,
    /// The command that made the set.
    pub command: String,
    /// Invalid UTF-8 sequences replaced by U+FFFD, in all inputs.
    pub invalid_utf8: u64,
    /// Conversations (`--format chat`): how they were prepared. Absent for prose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatMeta>,
    /// The training split.
    pub train: SplitMeta,
    /// The validation split.
    pub val: SplitMeta,
    /// What each input held.
    pub sources: Vec<SourceMeta>,
}

/// How conversations were prepared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMeta {
    /// The longest conversation kept whole, in tokens (`None`: no limit).
    pub max_tokens: Option<usize>,
    /// What happened to longer ones.
    pub overlong: Overlong,
    /// Special tokens the chat template needed that the given tokenizer lacked, added
    /// after its last id.
    pub added_tokens: Vec<String>,
    /// Fingerprint of the tokenizer before they were added: a model trained with it can
    /// train on this set once its embeddings grow by `added_tokens`.
    pub base_tokenizer_sha256: Option<String>,
}

/// A chat split's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSplitMeta {
    /// Tokens trained on (the answers and their end-of-turn markers).
    pub trained_tokens: u64,
    /// Their UTF-8 bytes.
    pub trained_bytes: u64,
    /// Conversations cut to `max_tokens`.
    pub truncated: u64,
    /// Conversations left out for being longer than `max_tokens`.
    pub dropped: u64,
}

/// One split: its shards and counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitMeta {
    /// Tokens, end-of-text tokens included.
    pub tokens: u64,
    /// Documents.
    pub documents: u64,
    /// UTF-8 bytes of the documents' text.
    pub bytes: u64,
    /// The shard files in order, relative to the split's directory.
    pub shards: Vec<ShardMeta>,
    /// The split's share of each input.
    pub sources: Vec<SplitSource>,
    /// Chat data: the loss mask's counts (each shard has a mask file beside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatSplitMeta>,
}

impl SplitMeta {
    /// Bytes of text per token: turns a loss per token into bits per byte.
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes as f64 / self.tokens.max(1) as f64
    }
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardMeta {
    /// File name within the split's directory.
    pub file: String,
    /// Tokens it holds.
    pub tokens: u64,
}

/// An input's share of a split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSource {
    /// The input as given on the command line.
    pub input: String,
    /// Its documents in this split.
    pub documents: u64,
    /// Their tokens.
    pub tokens: u64,
    /// Their UTF-8 bytes.
    pub bytes: u64,
}

/// What one input held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceMeta {
    /// The input as given on the command line.
    pub input: String,
    /// Non-empty documents.
    pub documents: u64,
    /// Empty documents and null values, skipped.
    pub empty: u64,
    /// Invalid UTF-8 sequences replaced by U+FFFD.
    pub invalid_utf8: u64,
}
