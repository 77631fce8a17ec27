//! Data for `moe`: tokenizers, `moe data prepare` (documents tokenized once into
//! memory-mapped shards), prepared sets and the token windows runs train and evaluate on.

mod array_file;
mod batches;
mod cache;
mod chat;
mod meta;
mod prepare;
mod prepared;
mod sources;
mod tokenizer;
mod windows;

pub use batches::{LmBatch, LmBatcher};
pub use cache::{
    DirectorySettings, cache_dir, cached_directory, default_cache_root, open_or_prepare,
};
pub use chat::{
    CHATML_TEMPLATE, ChatTemplate, IM_END, IM_START, Message, PLAIN_TEMPLATE, ROLES,
    TokenizerConfig, parse_conversation,
};
pub use meta::{ChatMeta, ChatSplitMeta, Meta};
pub use prepare::{Overlong, PrepareOptions, Progress, TokenizerChoice, ValidationSplit, prepare};
pub use prepared::{PreparedSet, TokenSplit};
pub use tokenizer::{END_OF_TEXT, TOKENIZER_CONFIG_FILE, TextTokenizer, TokenizerKind};
pub use windows::{EvalWindows, LossOn, TrainWindows, WeightedSplit, Window};

/// SplitMix64's finaliser: a fast, well-mixed 64-bit hash, for seeded data order.
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Lower-case hex SHA-256 of `bytes`.
pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}
