//! The OpenAI wire format: the request bodies we accept and the response bodies we send,
//! field for field as the OpenAI API defines them. Request fields we do not use (user,
//! penalties, logit bias, ...) are accepted and ignored, as other compatible servers do.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// Any name: a single-model server answers with its own model.
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Sampling and streaming settings.
    #[serde(flatten)]
    pub sampling: SamplingParams,
    /// Newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Any name: a single-model server answers with its own model.
    pub model: String,
    /// The text to continue: a string, or an array holding one string.
    pub prompt: Prompt,
    /// Sampling and streaming settings.
    #[serde(flatten)]
    pub sampling: SamplingParams,
}

/// Sampling and streaming fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy; at most 2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus threshold in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sample among the k most likely tokens (an extension several servers accept).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Up to 4 strings that end the answer.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Seed for reproducible sampling.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Number of answers.
    #[serde(default)]
    pub n: Option<usize>,
    /// Server-Sent Events instead of one JSON body.
    #[serde(default)]
    pub stream: Option<bool>,
    /// `{"include_usage": true}` adds a final chunk with the token counts.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a usage chunk before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `prompt` of `/v1/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One prompt.
    Text(String),
    /// A batch of prompts (we accept exactly one).
    Batch(Vec<String>),
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text, as a string or as content parts.
    pub content: MessageContent,
}

impl ChatMessage {
    /// A message of plain text.
    pub fn new(role: &str, text: &str) -> Self {
        Self {
            role: role.to_string(),
            content: MessageContent::Text(text.to_string()),
        }
    }
}

/// Message content: a string or an array of parts (only text parts carry text).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": ...}, ...]`.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text`, `image_url`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    #[serde(default)]
    pub text: Option<String>,
}

impl MessageContent {
    /// The message's text (text parts joined).
    pub fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
        }
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (all choices).
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage of `prompt_tokens` in and `completion_tokens` out.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }

    /// Usage of two answers to one prompt: the prompt counted once, the answers summed.
    pub fn and(self, other: Usage) -> Self {
        Self::new(
            self.prompt_tokens.max(other.prompt_tokens),
            self.completion_tokens + other.completion_tokens,
        )
    }
}

/// The error body: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    serde_json::json!({
        "error": {"message": message, "type": kind, "param": param, "code": code}
    })
}
