//! Chat templates: how a conversation becomes the text a model reads, the same for
//! training data, `moe serve`'s prompts and Hugging Face exports.
//!
//! A template is a Jinja template as Hugging Face stores it (`chat_template` in
//! `tokenizer_config.json`), rendered with minijinja and Python's string methods. It sees
//! `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, as
//! `apply_chat_template` passes them, with its whitespace rules (`trim_blocks`,
//! `lstrip_blocks`). The default is ChatML, whose `<|im_start|>` and
//! `<|im_end|>` markers are special tokens of the tokenizers `moe` trains.

use std::ops::Range;

use anyhow::{Context, Result, anyhow, bail, ensure};
use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

/// ChatML's start-of-turn marker.
pub const IM_START: &str = "<|im_start|>";
/// ChatML's end-of-turn marker: the end-of-sequence token of a chat model.
pub const IM_END: &str = "<|im_end|>";

/// ChatML, written as Hugging Face's chat models (Qwen, SmolLM) ship it.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Plain text, `role: content` per message, for models trained on prose only.
pub const PLAIN_TEMPLATE: &str = "{% for message in messages %}\
{{ message['role'] + ': ' + message['content'] + '\\n\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}";

/// The roles a conversation may hold.
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// One of [`ROLES`].
    pub role: String,
    /// The text.
    pub content: String,
    /// Whether an assistant message is trained on (default true); `"train": false` keeps
    /// it as context only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<bool>,
}

impl Message {
    /// A message of `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            train: None,
        }
    }

    /// Whether the answer is trained on: an assistant message not marked `"train": false`.
    pub fn is_trained(&self) -> bool {
        self.role == "assistant" && self.train != Some(false)
    }
}

/// Reads a JSON record `{"messages": [{"role", "content", "train"?}, ...]}`; the error
/// names what is wrong with it (a missing list, an unknown role, content that is not a
/// string, an empty conversation).
pub fn parse_conversation(record: &serde_json::Value) -> Result<Vec<Message>> {
    let messages = record
        .get("messages")
        .context("no `messages` field")?
        .as_array()
        .context("`messages` is not a list")?;
    ensure!(
        !messages.is_empty(),
        "empty conversation (`messages` is [])"
    );
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let field = |name: &str| message.get(name).filter(|v| !v.is_null());
            let role = field("role")
                .and_then(|r| r.as_str())
                .with_context(|| format!("message {i} has no string `role`"))?;
            ensure!(
                ROLES.contains(&role),
                "message {i}: unknown role `{role}` (expected one of {})",
                ROLES.join(", ")
            );
            let content = match field("content") {
                Some(serde_json::Value::String(text)) => text.clone(),
                Some(other) => bail!(
                    "message {i}: `content` must be a string, got {}",
                    json_kind(other)
                ),
                None => bail!("message {i} has no `content`"),
            };
            let train = match field("train") {
                None => None,
                Some(serde_json::Value::Bool(b)) => Some(*b),
                Some(other) => bail!(
                    "message {i}: `train` must be true or false, got {}",
                    json_kind(other)
                ),
            };
            Ok(Message {
                role: role.into(),
                content,
                train,
            })
        })
        .collect()
}

/// What kind of JSON value `value` is, for error messages.
pub(crate) fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A chat template with the special tokens it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// ChatML, ending each turn with `<|im_end|>`.
    pub fn chatml() -> Self {
        Self::new(CHATML_TEMPLATE, None, Some(IM_END.into()))
    }

    /// `role: content` paragraphs.
    pub fn plain() -> Self {
        Self::new(PLAIN_TEMPLATE, None, None)
    }

    /// A Jinja template and the values of `bos_token` and `eos_token` it sees.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Self {
        Self {
            source: source.into(),
            bos_token,
            eos_token,
        }
    }

    /// The special tokens it writes that a tokenizer must hold as single tokens (ChatML's
    /// markers, where it uses them).
    pub fn special_tokens(&self) -> Vec<&'static str> {
        [IM_START, IM_END]
            .into_iter()
            .filter(|t| self.source.contains(t))
            .collect()
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The token that starts a sequence, if the template uses one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The token that ends an answer.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Strings that end an assistant's turn in generated text: the end-of-sequence token
    /// and, for ChatML, the start of a new turn.
    pub fn stop_strings(&self) -> Vec<String> {
        let mut stops: Vec<String> = self.eos_token.iter().cloned().collect();
        if self.source.contains(IM_START) {
            stops.push(IM_START.into());
        }
        if self.source == PLAIN_TEMPLATE {
            stops.extend(["\nuser:".into(), "\nsystem:".into()]);
        }
        stops
    }

    /// The text of `messages`; with `add_generation_prompt`, followed by the opening of
    /// the assistant's answer.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        // As transformers compiles chat templates.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template("chat", &self.source)
            .map_err(|e| anyhow!("invalid chat template: {e:#}"))?;
        let template = env.get_template("chat").map_err(|e| anyhow!("{e:#}"))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_deref().unwrap_or(""),
                eos_token => self.eos_token.as_deref().unwrap_or(""),
            })
            .map_err(|e| anyhow!("rendering the chat template: {e:#}"))
    }

    /// The text of a whole conversation for training, and the byte ranges of it that are
    /// trained on: each trained assistant message's answer and its end-of-turn marker (up to
    /// the last `eos_token` in it), found by rendering the conversation up to that answer
    /// with and without it.
    pub fn render_for_training(&self, messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
        let text = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if !message.is_trained() {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            ensure!(
                through.starts_with(&before) && text.starts_with(&through),
                "the chat template renders message {i} differently depending on what follows it, \
                 so its answer cannot be located for training"
            );
            let mut end = through.len();
            if let Some(eos) = self.eos_token.as_deref().filter(|e| !e.is_empty())
                && let Some(at) = through[before.len()..].rfind(eos)
            {
                end = before.len() + at + eos.len();
            }
            if end > before.len() {
                spans.push(before.len()..end);
            }
        }
        Ok((text, spans))
    }
}

fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// The parts of Hugging Face's `tokenizer_config.json` that `moe` reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizerConfig {
    /// The chat template (Jinja).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "template_source"
    )]
    pub chat_template: Option<String>,
    /// The beginning-of-sequence token.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "token_text"
    )]
    pub bos_token: Option<String>,
    /// The end-of-sequence token.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "token_text"
    )]
    pub eos_token: Option<String>,
    /// The padding token.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "token_text"
    )]
    pub pad_token: Option<String>,
    /// Every other field, kept as read.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// A token written as a string or as `{"content": ...}` (older transformers).
fn token_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match value {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Object(o)) => {
            o.get("content").and_then(|c| c.as_str()).map(String::from)
        }
        _ => None,
    })
}

/// A template written as a string, or as a list of named templates (the `default` one
/// is used).
fn template_source<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match value {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(String::from),
        _ => None,
    })
}

impl TokenizerConfig {
    /// The chat template it holds, with its special tokens.
    pub fn template(&self) -> Option<ChatTemplate> {
        let source = self.chat_template.as_deref()?;
        Some(ChatTemplate::new(
            source,
            self.bos_token.clone(),
            self.eos_token.clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<Message> {
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Who wrote Hamlet?"),
            Message::new("assistant", "Shakespeare."),
            Message::new("user", "When?"),
            Message::new("assistant", "About 1600."),
        ]
    }

    #[test]
    fn chatml_renders_every_message_then_opens_the_answer() {
        let messages = &conversation()[..2];
        assert_eq!(
            ChatTemplate::chatml().render(messages, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            ChatTemplate::plain().render(&messages[1..], true).unwrap(),
            "user: Who wrote Hamlet?\n\nassistant:"
        );
    }

    #[test]
    fn training_spans_cover_answers_and_their_end_of_turn_only() {
        let mut messages = conversation();
        let (text, spans) = ChatTemplate::chatml()
            .render_for_training(&messages)
            .unwrap();
        let trained: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(trained, ["Shakespeare.<|im_end|>", "About 1600.<|im_end|>"]);

        messages[2].train = Some(false);
        let (_, spans) = ChatTemplate::chatml()
            .render_for_training(&messages)
            .unwrap();
        assert_eq!(spans.len(), 1, "a `train: false` answer is context only");
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let template = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}\
             {% for m in messages %}{{ bos_token + m['content'].strip() }}{% endfor %}",
            Some("<s>".into()),
            None,
        );
        let user = [Message::new("user", "  hi ")];
        assert_eq!(template.render(&user, false).unwrap(), "<s>hi");
        let error = template
            .render(&[Message::new("system", "x")], false)
            .unwrap_err();
        assert!(format!("{error:#}").contains("user first"), "{error:#}");
    }

    #[test]
    fn bad_records_are_named() {
        let cases = [
            (r#"{"messages": []}"#, "empty conversation"),
            (
                r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
                "unknown role `robot`",
            ),
            (
                r#"{"messages": [{"role": "user", "content": 3}]}"#,
                "`content` must be a string, got a number",
            ),
            (r#"{"text": "x"}"#, "no `messages` field"),
        ];
        for (record, expected) in cases {
            let value: serde_json::Value = serde_json::from_str(record).unwrap();
            let error = parse_conversation(&value).unwrap_err().to_string();
            assert!(error.contains(expected), "{record}: {error}");
        }
    }

    #[test]
    fn tokenizer_config_reads_hugging_face_forms() {
        let config: TokenizerConfig = serde_json::from_str(
            r#"{"chat_template": [{"name": "tool_use", "template": "t"},
                                  {"name": "default", "template": "d"}],
                "eos_token": {"content": "</s>", "lstrip": false},
                "model_max_length": 2048}"#,
        )
        .unwrap();
        assert_eq!(config.chat_template.as_deref(), Some("d"));
        assert_eq!(config.eos_token.as_deref(), Some("</s>"));
        assert_eq!(config.other["model_max_length"], 2048);
    }
}
