//! Data for `moe`: tokenizers, the corpus split by work, and deterministic token batches.

pub mod batches;
pub mod corpus;
pub mod tokenizer;

pub use batches::{EpochBatches, LmBatch, LmBatcher, TokenWindows};
pub use corpus::{Corpus, Work, load_corpus};
pub use tokenizer::{END_OF_TEXT, TextTokenizer, TokenizerKind};

use anyhow::Result;

/// Tokenizes works into one stream, separated by the end-of-text token when there is one.
pub fn tokenize_works(tokenizer: &TextTokenizer, works: &[Work]) -> Result<Vec<u32>> {
    let mut tokens = Vec::new();
    for work in works {
        if let (Some(eot), false) = (tokenizer.end_of_text(), tokens.is_empty()) {
            tokens.push(eot);
        }
        tokens.extend(tokenizer.encode(&work.text)?);
    }
    Ok(tokens)
}
