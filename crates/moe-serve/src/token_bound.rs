//! The fewest tokens a text can tokenize to, from its length alone: a text of `n` bytes
//! holds at least `ceil(n / longest)` tokens when no token stands for more than `longest`
//! bytes. The server refuses a prompt that cannot fit the context window this way,
//! before tokenizing it: tokenizing megabytes takes memory the allocator keeps.

use std::collections::HashMap;

use moe_data::{END_OF_TEXT, IM_END, IM_START, TextTokenizer};
use serde_json::Value;

/// The most bytes of text one token of `tokenizer` stands for, or `None` when that cannot
/// be bounded: a special token whose text the tokenizer does not say.
///
/// A token's share of a text is taken as the largest of its decoded length alone, what it
/// adds when decoded after itself (decoders such as SentencePiece's drop a leading space
/// from the first token only), and its vocabulary string's length in characters (bytes
/// for byte-level BPE, whose strings map one character to one byte, as `Ġ` for a space).
/// A token that decodes to a partial UTF-8 character counts the replacement character's 3
/// bytes: never less than it stands for. Special tokens decode to nothing; their text is
/// looked up among the known markers and the strings of the tokenizer's configuration.
/// The bound assumes that normalisation does not shorten text (`moe`'s tokenizers have no
/// normaliser).
pub(crate) fn longest_token_bytes(tokenizer: &TextTokenizer) -> Option<usize> {
    let special = special_token_bytes(tokenizer);
    let chars = tokenizer.token_bytes();
    let mut longest = 0;
    for (id, &chars) in (0u32..).zip(chars) {
        let alone = tokenizer.decode(&[id]).ok()?.len();
        let twice = tokenizer.decode(&[id, id]).ok()?.len();
        let bytes = alone.max(twice.saturating_sub(alone)).max(chars as usize);
        let bytes = match bytes {
            0 => *special.get(&id)?,
            bytes => bytes,
        };
        longest = longest.max(bytes);
    }
    (longest > 0).then_some(longest)
}

/// The fewest tokens `text` can be when no token stands for more than `longest` bytes
/// (0 when unbounded).
pub(crate) fn min_tokens(text: &str, longest: Option<usize>) -> usize {
    longest.map_or(0, |longest| text.len().div_ceil(longest))
}

/// The length in bytes of each special token whose text is known: the end-of-text and
/// ChatML markers, and any string of the tokenizer's configuration (its `bos_token`,
/// `unk_token`, `added_tokens_decoder` entries...) that is a token of its own.
fn special_token_bytes(tokenizer: &TextTokenizer) -> HashMap<u32, usize> {
    let config = serde_json::to_value(tokenizer.hugging_face_config()).unwrap_or_default();
    let mut texts = vec![END_OF_TEXT, IM_START, IM_END];
    strings(&config, &mut texts);
    texts
        .into_iter()
        .filter_map(|text| Some((tokenizer.special_token_id(text)?, text.len())))
        .collect()
}

/// Every string in `value`, at any depth.
fn strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(text) => out.push(text),
        Value::Array(items) => items.iter().for_each(|item| strings(item, out)),
        Value::Object(fields) => fields.values().for_each(|field| strings(field, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound never exceeds the real count, and refuses a long text without
    /// tokenizing it.
    fn check(tokenizer: &TextTokenizer, texts: &[&str]) -> usize {
        let longest = longest_token_bytes(tokenizer).expect("every token's text is known");
        for text in texts {
            let tokens = tokenizer.encode(text).unwrap().len();
            let bound = min_tokens(text, Some(longest));
            assert!(bound <= tokens, "{bound} > {tokens} tokens of {text:?}");
        }
        longest
    }

    #[test]
    fn the_byte_tokenizer_counts_a_partial_character_as_its_replacement() {
        let tokenizer = TextTokenizer::bytes().unwrap();
        // Bytes 0x80..=0xFF alone decode to U+FFFD, 3 bytes.
        assert_eq!(check(&tokenizer, &["plain", "καλημέρα", "日本語 ü"]), 3);
    }

    #[test]
    fn a_bpe_bound_covers_its_longest_word_and_its_special_tokens() {
        let corpus = "the king and the queen; the kingdom of the king ".repeat(50);
        let tokenizer = TextTokenizer::train_bpe(&[&corpus], 300).unwrap();
        let texts = [
            corpus.as_str(),
            " the kingdom",
            "<|endoftext|><|endoftext|><|endoftext|>",
            "<|im_start|>user\nthe king<|im_end|>\n",
            "ÿĠĠ ünïcödé 日本",
        ];
        let longest = check(&tokenizer, &texts);
        // `<|endoftext|>` is one token of 13 bytes.
        assert!(longest >= END_OF_TEXT.len(), "{longest}");
        // A text of 10 MB needs at least 10 MB / 13 tokens whatever it holds.
        let huge = "the king ".repeat(1 << 20);
        assert!(min_tokens(&huge, Some(longest)) >= huge.len() / longest);
        assert_eq!(min_tokens(&huge, None), 0);
    }
}
