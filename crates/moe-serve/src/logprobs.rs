//! OpenAI's `logprobs` objects from the engine's token log-probabilities: the chat shape
//! (`content: [{token, logprob, bytes, top_logprobs}]`) and the legacy completions shape
//! (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`). A token's text is its own
//! decoding: U+FFFD for a token holding part of a multi-byte character, empty for a
//! special token such as end-of-text.

use moe_data::TextTokenizer;
use moe_model::TokenLogprob;
use serde_json::{Map, Value, json};

fn token_text(tokenizer: &TextTokenizer, id: u32) -> String {
    tokenizer.decode(&[id]).unwrap_or_default()
}

/// The chat `logprobs` of `tokens`.
pub(crate) fn chat(tokenizer: &TextTokenizer, tokens: &[TokenLogprob]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(tokenizer, id);
        json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut value = entry(t.token, t.logprob);
            value["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            value
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The legacy completions `logprobs` of `tokens`, whose text starts `offset` characters
/// into the choice's text; `unscored` is an echoed prompt's first token, put before them
/// with no log-probability. Returns the value and the offset after the tokens.
pub(crate) fn completion(
    tokenizer: &TextTokenizer,
    unscored: Option<u32>,
    tokens: &[TokenLogprob],
    mut offset: usize,
) -> (Value, usize) {
    let mut value = json!({
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [],
    });
    let mut push = |id: u32, logprob: Option<f32>, top: Option<&[(u32, f32)]>| {
        let text = token_text(tokenizer, id);
        // Tokens that share a text (bytes of multi-byte characters) keep the likeliest.
        let top = top.map(|top| {
            let mut by_text = Map::new();
            for &(id, lp) in top {
                by_text
                    .entry(token_text(tokenizer, id))
                    .or_insert(json!(lp));
            }
            by_text
        });
        for (key, item) in [
            ("token_logprobs", json!(logprob)),
            ("top_logprobs", json!(top)),
            ("text_offset", json!(offset)),
            ("tokens", json!(text)),
        ] {
            if let Some(list) = value[key].as_array_mut() {
                list.push(item);
            }
        }
        offset += text.chars().count();
    };
    if let Some(id) = unscored {
        push(id, None, None);
    }
    for t in tokens {
        push(t.token, Some(t.logprob), Some(&t.top));
    }
    (value, offset)
}

/// `more` appended to `logprobs` (either shape): every list grows.
pub(crate) fn extend(logprobs: &mut Value, more: Value) {
    let Value::Object(more) = more else { return };
    for (key, item) in more {
        match (logprobs.get_mut(&key).and_then(Value::as_array_mut), item) {
            (Some(list), Value::Array(items)) => list.extend(items),
            (None, item) => logprobs[key.as_str()] = item,
            _ => {}
        }
    }
}
