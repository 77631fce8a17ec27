//! Mixture-of-Agents (Wang et al. 2024): layers of proposers, then an aggregator, every
//! agent an OpenAI-compatible chat endpoint. Layer 1 answers the user's prompt; each later
//! layer, and the aggregator, sees the previous layer's answers as numbered references in
//! its system message and is asked to synthesise them. Proposers of a layer run
//! concurrently; a proposer that fails (after retries), times out or refuses the prompt
//! as too long is dropped, and the pipeline goes on while enough references remain.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use futures_util::StreamExt;
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::openai::ChatMessage;

/// The aggregate-and-synthesize instruction of Wang et al. 2024.
pub const AGGREGATE_PROMPT: &str = "You have been provided with a set of responses from \
various open-source models to the latest user query. Your task is to synthesize these \
responses into a single, high-quality response. It is crucial to critically evaluate the \
information provided in these responses, recognizing that some of it may be biased or \
incorrect. Your response should not simply replicate the given answers but should offer a \
refined, accurate, and comprehensive reply to the instruction. Ensure your response is \
well-structured, coherent, and adheres to the highest standards of accuracy and \
reliability.\n\nResponses from models:";

/// A pipeline: `configs/moa.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoaConfig {
    /// Proposer layers, run in order.
    pub layers: Vec<Layer>,
    /// The agent that writes the final answer from the last layer's references.
    pub aggregator: Agent,
    /// Fewest successful answers a layer must produce for the pipeline to go on.
    #[serde(default = "one")]
    pub min_references: usize,
    /// Seconds one call may take before it counts as failed.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// Further attempts after a 429, a 5xx or a connection error (backoff 0.5 s, doubling).
    #[serde(default = "two")]
    pub retries: usize,
    /// The instruction put before the references.
    #[serde(default = "default_aggregate_prompt")]
    pub aggregate_prompt: String,
}

/// One layer of proposers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// Its agents, called concurrently.
    pub proposers: Vec<Agent>,
}

/// One OpenAI-compatible chat endpoint and how to call it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// Name in records and errors [default: the model].
    #[serde(default)]
    pub name: Option<String>,
    /// Base URL, e.g. `http://127.0.0.1:8080/v1`.
    pub url: String,
    /// The `model` field of requests.
    pub model: String,
    /// Environment variable holding the API key, if the endpoint needs one.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Sampling temperature.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Most tokens of its answer.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Its own system prompt, put before any references.
    #[serde(default)]
    pub system_prompt: Option<String>,
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn default_timeout() -> f64 {
    60.0
}
fn default_aggregate_prompt() -> String {
    AGGREGATE_PROMPT.to_string()
}
fn default_temperature() -> f64 {
    0.7
}
fn default_max_tokens() -> usize {
    256
}

impl Agent {
    fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.model)
    }
}

impl MoaConfig {
    /// Reads and checks a TOML pipeline file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: Self =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        config
            .validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(config)
    }

    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.layers.is_empty(),
            "`layers`: at least one layer is needed"
        );
        for (i, layer) in self.layers.iter().enumerate() {
            ensure!(
                !layer.proposers.is_empty(),
                "`layers[{i}].proposers`: a layer needs at least one proposer"
            );
            ensure!(
                self.min_references <= layer.proposers.len(),
                "`min_references` = {} exceeds the {} proposers of layer {}",
                self.min_references,
                layer.proposers.len(),
                i + 1
            );
        }
        ensure!(
            self.min_references >= 1,
            "`min_references` must be at least 1"
        );
        ensure!(
            self.timeout_secs.is_finite() && self.timeout_secs > 0.0,
            "`timeout_secs` must be a positive number"
        );
        let agents = self.layers.iter().flat_map(|l| &l.proposers);
        for agent in agents.chain([&self.aggregator]) {
            ensure!(
                agent.url.starts_with("http://") || agent.url.starts_with("https://"),
                "agent `{}`: `url` must start with http:// or https://, got `{}`",
                agent.label(),
                agent.url
            );
            ensure!(
                (0.0..=2.0).contains(&agent.temperature),
                "agent `{}`: `temperature` must be in [0, 2]",
                agent.label()
            );
            ensure!(
                agent.max_tokens >= 1,
                "agent `{}`: `max_tokens` must be at least 1",
                agent.label()
            );
            if let Some(var) = &agent.api_key_env {
                ensure!(
                    std::env::var(var).is_ok(),
                    "agent `{}`: environment variable `{var}` (api_key_env) is not set",
                    agent.label()
                );
            }
        }
        Ok(())
    }
}

/// What one call did, for the run's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The agent's name.
    pub agent: String,
    /// 1-based layer; the aggregator's is `layers + 1`.
    pub layer: usize,
    /// Wall time of the call including retries, in milliseconds.
    pub latency_ms: f64,
    /// Prompt tokens, as the endpoint reported.
    pub prompt_tokens: Option<u64>,
    /// Answer tokens, as the endpoint reported.
    pub completion_tokens: Option<u64>,
    /// Why the answer ended (`stop`, `length`), as the endpoint reported.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Attempts made.
    pub attempts: usize,
    /// Why the call failed, if it did.
    pub error: Option<String>,
}

/// The final answer, or why there is none, and the record of every call made (kept
/// either way, to see what went wrong).
#[derive(Debug)]
pub struct MoaOutcome {
    /// The aggregator's answer; a [`Refused`] error when agents refused the request.
    pub answer: Result<String>,
    /// Every call in order of layer.
    pub calls: Vec<CallRecord>,
}

/// Why a pipeline failed when the agents at fault refused the request itself with HTTP
/// 400 (a prompt longer than their context window, say): the same request would fail
/// again, so a server passes the refusal on as a 400. [`MoaOutcome::answer`]'s error is
/// one of these (see `anyhow::Error::downcast_ref`) when every failure that stopped the
/// pipeline was such a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Which agents refused, and what they said.
    pub message: String,
    /// The refusing agents' error `code` (`context_length_exceeded`, say), if they gave
    /// one and agree on it.
    pub code: Option<String>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

/// The system message that carries `references` (previous-layer answers).
pub fn with_references(
    instruction: &str,
    own_prompt: Option<&str>,
    references: &[String],
) -> String {
    let mut system = String::new();
    if let Some(own) = own_prompt {
        system.push_str(own);
        system.push_str("\n\n");
    }
    system.push_str(instruction);
    for (i, reference) in references.iter().enumerate() {
        system.push_str(&format!("\n{}. {}", i + 1, reference));
    }
    system
}

/// Runs the pipeline on `conversation` (the user's messages; a one-shot prompt is one user
/// message); `on_text` receives the final answer as it streams in.
pub async fn run(
    config: &MoaConfig,
    conversation: &[ChatMessage],
    on_text: impl FnMut(&str) + Send,
) -> MoaOutcome {
    let mut calls = Vec::new();
    let answer = run_layers(config, conversation, on_text, &mut calls).await;
    MoaOutcome { answer, calls }
}

async fn run_layers(
    config: &MoaConfig,
    conversation: &[ChatMessage],
    mut on_text: impl FnMut(&str) + Send,
    calls: &mut Vec<CallRecord>,
) -> Result<String> {
    let http = reqwest::Client::new();
    let mut references: Vec<String> = Vec::new();
    for (index, layer) in config.layers.iter().enumerate() {
        let layer_number = index + 1;
        let refs = &references;
        let results = join_all(layer.proposers.iter().map(|agent| {
            let messages = messages(config, agent, refs, conversation);
            call(&http, config, agent, layer_number, messages, None)
        }))
        .await;
        let mut answers = Vec::new();
        let mut failures = Vec::new();
        for (answer, record) in results {
            match answer {
                Ok(answer) => answers.push(answer),
                Err(failure) => failures.push((record.agent.clone(), failure)),
            }
            calls.push(record);
        }
        if answers.len() < config.min_references {
            let named: Vec<String> = failures
                .iter()
                .map(|(agent, failure)| failure.blame(&format!("proposer `{agent}`")))
                .collect();
            let message = format!(
                "layer {layer_number}: {} of {} proposers answered, fewer than min_references = {} ({})",
                answers.len(),
                layer.proposers.len(),
                config.min_references,
                named.join("; ")
            );
            return Err(failed(message, failures.iter().map(|(_, f)| f)));
        }
        references = answers;
    }
    let agent = &config.aggregator;
    let messages = messages(config, agent, &references, conversation);
    let aggregator_layer = config.layers.len() + 1;
    let (answer, record) = call(
        &http,
        config,
        agent,
        aggregator_layer,
        messages,
        Some(&mut on_text),
    )
    .await;
    calls.push(record);
    answer.map_err(|failure| {
        let message = failure.blame(&format!("the aggregator `{}`", agent.label()));
        failed(message, [&failure])
    })
}

/// The pipeline's error for `failures`: [`Refused`] when every one is a refusal.
fn failed<'a>(message: String, failures: impl IntoIterator<Item = &'a Failure>) -> anyhow::Error {
    let failures: Vec<&Failure> = failures.into_iter().collect();
    if failures.is_empty() || !failures.iter().all(|f| f.refused) {
        return anyhow!(message);
    }
    let code = failures[0]
        .code
        .clone()
        .filter(|code| failures.iter().all(|f| f.code.as_ref() == Some(code)));
    Refused { message, code }.into()
}

/// What `agent` is sent: a system message with its own prompt and the references (if any),
/// then the conversation.
fn messages(
    config: &MoaConfig,
    agent: &Agent,
    references: &[String],
    conversation: &[ChatMessage],
) -> Vec<Value> {
    let system = if references.is_empty() {
        agent.system_prompt.clone()
    } else {
        Some(with_references(
            &config.aggregate_prompt,
            agent.system_prompt.as_deref(),
            references,
        ))
    };
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.extend(
        conversation
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content.text()})),
    );
    messages
}

/// A failed attempt, and whether trying again may help.
#[derive(Default)]
struct Failure {
    message: String,
    retryable: bool,
    /// The agent refused the request with HTTP 400: the request, not the agent, is at
    /// fault.
    refused: bool,
    /// The agent's error `code`, if it gave one.
    code: Option<String>,
}

impl Failure {
    /// That `who` refused the request or failed, and why.
    fn blame(&self, who: &str) -> String {
        let what = match self.refused {
            true => "refused the request",
            false => "failed",
        };
        format!("{who} {what}: {}", self.message)
    }
}

/// Calls `agent` with retries; streams the answer into `on_text` when given.
async fn call<'f>(
    http: &reqwest::Client,
    config: &MoaConfig,
    agent: &Agent,
    layer: usize,
    messages: Vec<Value>,
    mut on_text: Option<&mut (dyn FnMut(&str) + Send + 'f)>,
) -> (Result<String, Failure>, CallRecord) {
    let started = Instant::now();
    let mut record = CallRecord {
        agent: agent.label().to_string(),
        layer,
        latency_ms: 0.0,
        prompt_tokens: None,
        completion_tokens: None,
        finish_reason: None,
        attempts: 0,
        error: None,
    };
    let mut backoff = Duration::from_millis(500);
    let answer = loop {
        record.attempts += 1;
        let attempt = attempt(http, agent, &messages, on_text.as_deref_mut(), &mut record);
        let timeout = Duration::from_secs_f64(config.timeout_secs);
        let failure = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(answer)) => break Ok(answer),
            Ok(Err(failure)) => failure,
            Err(_) => Failure {
                message: format!("no answer within {} s", config.timeout_secs),
                ..Failure::default()
            },
        };
        if !failure.retryable || record.attempts > config.retries {
            record.error = Some(failure.message.clone());
            break Err(failure);
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    };
    record.latency_ms = started.elapsed().as_secs_f64() * 1e3;
    (answer, record)
}

/// One request. Streams when `on_text` is given (the final answer), else one JSON body.
async fn attempt<'f>(
    http: &reqwest::Client,
    agent: &Agent,
    messages: &[Value],
    on_text: Option<&mut (dyn FnMut(&str) + Send + 'f)>,
    record: &mut CallRecord,
) -> Result<String, Failure> {
    let url = format!("{}/chat/completions", agent.url.trim_end_matches('/'));
    let stream = on_text.is_some();
    let mut body = json!({
        "model": agent.model,
        "messages": messages,
        "temperature": agent.temperature,
        "max_tokens": agent.max_tokens,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let mut request = http.post(&url).json(&body);
    if let Some(key) = agent
        .api_key_env
        .as_ref()
        .and_then(|v| std::env::var(v).ok())
    {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.map_err(|e| Failure {
        message: format!("{url}: {}", with_causes(&e)),
        retryable: true,
        ..Failure::default()
    })?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let error = serde_json::from_str::<Value>(&text)
            .map(|body| body["error"].clone())
            .unwrap_or_default();
        let message = error["message"].as_str().unwrap_or(&text);
        return Err(Failure {
            message: format!("HTTP {status}: {message}"),
            retryable: status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error(),
            refused: status == StatusCode::BAD_REQUEST,
            code: error["code"].as_str().map(str::to_string),
        });
    }
    let bad = |e: String| Failure {
        message: format!("{url}: {e}"),
        ..Failure::default()
    };
    let Some(on_text) = on_text else {
        let value: Value = response.json().await.map_err(|e| bad(e.to_string()))?;
        record_report(record, &value);
        return value["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| bad("the response has no choices[0].message.content".into()));
    };
    let mut answer = String::new();
    let mut pending = String::new();
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(|e| Failure {
            message: format!("{url}: the stream broke: {}", with_causes(&e)),
            retryable: answer.is_empty(),
            ..Failure::default()
        })?;
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                return Ok(answer);
            }
            let value: Value = serde_json::from_str(data).map_err(|e| bad(e.to_string()))?;
            if let Some(message) = value["error"]["message"].as_str() {
                return Err(bad(message.to_string()));
            }
            record_report(record, &value);
            if let Some(text) = value["choices"][0]["delta"]["content"].as_str() {
                answer.push_str(text);
                on_text(text);
            }
        }
    }
    Ok(answer)
}

/// An error and its sources, `outer: inner: ...` (reqwest hides the cause, such as a
/// refused connection, in the source chain).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Records the token counts and finish reason a response body or stream chunk reports.
fn record_report(record: &mut CallRecord, body: &Value) {
    if let Some(finish) = body["choices"][0]["finish_reason"].as_str() {
        record.finish_reason = Some(finish.to_string());
    }
    let usage = &body["usage"];
    if let Some(tokens) = usage["prompt_tokens"].as_u64() {
        record.prompt_tokens = Some(tokens);
    }
    if let Some(tokens) = usage["completion_tokens"].as_u64() {
        record.completion_tokens = Some(tokens);
    }
}
