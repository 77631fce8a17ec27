//! Which request fields the server reads, which it ignores and which it refuses. A field
//! that asks for something the server cannot do (tools, structured output, audio, ...) is
//! refused by name unless its value asks for nothing (`null`, no tools, `"none"`, plain
//! text, ...); a field OpenAI does not define is refused as OpenAI refuses it. Metadata
//! that changes no answer (`user`, `metadata`, `store`, ...) is accepted and ignored.

use serde_json::{Map, Value, json};

/// Fields both endpoints read (the `SamplingParams` and `model`).
const SHARED: [&str; 15] = [
    "model",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
];

/// Fields only `/v1/chat/completions` reads.
pub(crate) const CHAT: &[&str] = &["messages", "max_completion_tokens", "top_logprobs"];

/// Fields only `/v1/completions` reads.
pub(crate) const COMPLETION: &[&str] = &["prompt", "echo"];

/// Accepted and ignored: they change no answer.
const METADATA: [&str; 6] = [
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

/// Features the server does not have, each with whether a value asks for nothing.
fn unsupported(field: &str) -> Option<fn(&Value) -> bool> {
    let neutral: fn(&Value) -> bool = match field {
        "tools" | "functions" => |v| v.is_null() || v.as_array().is_some_and(Vec::is_empty),
        "tool_choice" | "function_call" => |v| v.is_null() || v.as_str() == Some("none"),
        "response_format" => |v| v.is_null() || *v == json!({"type": "text"}),
        "suffix" => |v| v.is_null() || v.as_str() == Some(""),
        "best_of" => |v| v.is_null() || v.as_u64() == Some(1),
        "modalities" => |v| v.is_null() || *v == json!(["text"]),
        "parallel_tool_calls"
        | "audio"
        | "prediction"
        | "web_search_options"
        | "reasoning_effort"
        | "verbosity" => Value::is_null,
        _ => return None,
    };
    Some(neutral)
}

/// A refused field: what to say and the field's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The error message.
    pub message: String,
    /// The field.
    pub param: String,
}

/// Checks every field of a request body for an endpoint that also reads `own` fields.
pub(crate) fn check(body: &Map<String, Value>, own: &[&str]) -> Result<(), Refusal> {
    for (field, value) in body {
        let field = field.as_str();
        if SHARED.contains(&field) || own.contains(&field) || METADATA.contains(&field) {
            continue;
        }
        let message = match unsupported(field) {
            Some(neutral) if neutral(value) => continue,
            Some(_) => format!("`{field}` is not supported by this server (got {value})"),
            None => format!("Unrecognized request argument supplied: {field}"),
        };
        return Err(Refusal {
            message,
            param: field.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_chat(body: Value) -> Result<(), Refusal> {
        check(body.as_object().unwrap(), CHAT)
    }

    #[test]
    fn neutral_values_pass_and_others_are_refused_by_name() {
        let neutral = json!({
            "model": "m", "messages": [], "user": "u", "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "best_of": 1, "suffix": null,
            "modalities": ["text"], "audio": null,
        });
        assert_eq!(check_chat(neutral), Ok(()));
        let refused = check_chat(json!({"model": "m", "tool_choice": "auto"})).unwrap_err();
        assert_eq!(refused.param, "tool_choice");
        assert!(
            refused.message.contains("not supported"),
            "{}",
            refused.message
        );
        let unknown = check_chat(json!({"model": "m", "min_q": 1})).unwrap_err();
        assert_eq!(
            unknown.message,
            "Unrecognized request argument supplied: min_q"
        );
        // Each endpoint's own fields belong to it alone.
        assert_eq!(check_chat(json!({"echo": true})).unwrap_err().param, "echo");
        assert_eq!(check(&Map::new(), COMPLETION), Ok(()));
    }
}
