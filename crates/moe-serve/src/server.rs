//! The HTTP server: `POST /v1/chat/completions`, `POST /v1/completions` (both plain JSON
//! and Server-Sent Events), `GET /v1/models` and `GET /health`, with OpenAI's response
//! and error shapes, an optional API key and graceful shutdown. Answers come from a model
//! (the engine) or from a whole Mixture-of-Agents pipeline (chat only), behind the same
//! API.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream, StreamExt};
use moe_model::SamplingConfig;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::chat_template::ChatTemplate;
use crate::engine::{Engine, Finish, GenerationEvent, GenerationRequest, SubmitError};
use crate::moa::{self, MoaConfig};
use crate::openai::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, Prompt, SamplingParams, Usage,
    error_body,
};

/// What the server says about itself and how it reads chat requests.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The `model` field of responses and the one entry of `/v1/models`.
    pub model_id: String,
    /// If set, every `/v1` request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// How chat messages become a prompt.
    pub template: ChatTemplate,
}

/// Where answers come from.
#[derive(Clone)]
enum Answerer {
    /// A model served by the generation engine.
    Model(Engine),
    /// A Mixture-of-Agents pipeline over other endpoints.
    Pipeline(Arc<MoaConfig>),
}

#[derive(Clone)]
struct AppState {
    answerer: Answerer,
    options: Arc<ServerOptions>,
    created: u64,
}

/// The application: every route, backed by `engine`.
pub fn router(engine: Engine, options: ServerOptions) -> Router {
    app(Answerer::Model(engine), options)
}

/// The application for a Mixture-of-Agents pipeline: each chat completion runs `pipeline`
/// on the request's messages and answers with the aggregator's text. The request's
/// `temperature` and `max_tokens` apply to the aggregator; `n` must be 1. `usage` reports
/// the aggregator's call. `options.template` is not used.
pub fn pipeline_router(pipeline: MoaConfig, options: ServerOptions) -> Router {
    app(Answerer::Pipeline(Arc::new(pipeline)), options)
}

fn app(answerer: Answerer, options: ServerOptions) -> Router {
    let state = AppState {
        answerer,
        options: Arc::new(options),
        created: unix_time(),
    };
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` completes, then lets requests in flight
/// finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

/// An error response in OpenAI's shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = error_body(&self.message, self.kind, self.param, self.code);
        let mut response = (self.status, Json(body)).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "unknown route; this server has /v1/chat/completions, /v1/completions, \
                  /v1/models and /health"
            .into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url"),
    }
}

async fn models(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": state.options.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "moe",
        }],
    })))
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.options.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "incorrect or missing API key (send `Authorization: Bearer <key>`)".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    })
}

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    serde_json::from_value(value)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

/// A validated request, ready for the engine.
struct Plan {
    request: GenerationRequest,
    n: usize,
    stream: Streaming,
}

/// Whether to answer with Server-Sent Events, and with a usage chunk.
#[derive(Debug, Clone, Copy)]
struct Streaming {
    stream: bool,
    include_usage: bool,
}

impl Streaming {
    fn of(params: &SamplingParams) -> Self {
        Self {
            stream: params.stream.unwrap_or(false),
            include_usage: params
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        }
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let request: ChatCompletionRequest = parse_body(&body)?;
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must hold at least one message",
            Some("messages"),
        ));
    }
    const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
    if let Some(message) = request
        .messages
        .iter()
        .find(|m| !ROLES.contains(&m.role.as_str()))
    {
        return Err(ApiError::invalid(
            format!(
                "unknown message role `{}` (expected one of {})",
                message.role,
                ROLES.join(", ")
            ),
            Some("messages"),
        ));
    }
    let mut sampling = request.sampling;
    sampling.max_tokens = sampling.max_tokens.or(request.max_completion_tokens);
    let engine = match &state.answerer {
        Answerer::Model(engine) => engine,
        Answerer::Pipeline(pipeline) => {
            let stream = Streaming::of(&sampling);
            let receiver = run_pipeline(pipeline, request.messages, &sampling)?;
            return reply(&state, Endpoint::Chat, vec![receiver], stream).await;
        }
    };
    let template = state.options.template;
    let prompt = template.render(&request.messages);
    let template_stops = template.stop_strings().iter().map(|s| s.to_string());
    let plan = plan(engine, &prompt, sampling, None, template_stops.collect())?;
    respond(&state, engine, Endpoint::Chat, plan).await
}

/// Starts the pipeline on `conversation`; its answer arrives as generation events. A
/// client that leaves cancels the pipeline's calls.
fn run_pipeline(
    pipeline: &MoaConfig,
    conversation: Vec<ChatMessage>,
    params: &SamplingParams,
) -> Result<UnboundedReceiver<GenerationEvent>, ApiError> {
    if params.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "a Mixture-of-Agents pipeline gives one answer: `n` must be 1",
            Some("n"),
        ));
    }
    let mut pipeline = pipeline.clone();
    if let Some(temperature) = params.temperature {
        pipeline.aggregator.temperature = check_temperature(temperature)?;
    }
    if let Some(max_tokens) = params.max_tokens {
        pipeline.aggregator.max_tokens = check_max_tokens(max_tokens)?;
    }
    let (events, receiver) = unbounded_channel();
    tokio::spawn(async move {
        let text_events = events.clone();
        let run = moa::run(&pipeline, &conversation, |text| {
            let _ = text_events.send(GenerationEvent::Text(text.to_string()));
        });
        let outcome = tokio::select! {
            outcome = run => outcome,
            () = events.closed() => return,
        };
        let aggregator = outcome.calls.last();
        let tokens = |count: Option<Option<u64>>| count.flatten().unwrap_or(0) as usize;
        let _ = events.send(match outcome.answer {
            Ok(_) => GenerationEvent::Done {
                finish: Finish::Stop,
                prompt_tokens: tokens(aggregator.map(|c| c.prompt_tokens)),
                completion_tokens: tokens(aggregator.map(|c| c.completion_tokens)),
            },
            Err(error) => GenerationEvent::Failed(format!("{error:#}")),
        });
    });
    Ok(receiver)
}

async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let Answerer::Model(engine) = &state.answerer else {
        return Err(ApiError::invalid(
            "this server runs a Mixture-of-Agents pipeline, which answers chat only: \
             use /v1/chat/completions",
            None,
        ));
    };
    let request: CompletionRequest = parse_body(&body)?;
    let prompt = match request.prompt {
        Prompt::Text(text) => text,
        Prompt::Batch(mut texts) if texts.len() == 1 => texts.remove(0),
        Prompt::Batch(_) => {
            return Err(ApiError::invalid(
                "`prompt` must be a string or an array of exactly one string",
                Some("prompt"),
            ));
        }
    };
    // OpenAI's default for this endpoint.
    let plan = plan(engine, &prompt, request.sampling, Some(16), Vec::new())?;
    respond(&state, engine, Endpoint::Completion, plan).await
}

/// Validates the sampling fields and the context window; `default_max_tokens` of `None`
/// means "the rest of the window".
fn plan(
    engine: &Engine,
    prompt: &str,
    params: SamplingParams,
    default_max_tokens: Option<usize>,
    mut stop: Vec<String>,
) -> Result<Plan, ApiError> {
    let stream = Streaming::of(&params);
    let temperature = check_temperature(params.temperature.unwrap_or(1.0))?;
    let top_p = params.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("`top_p` must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    let n = params.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::invalid(
            format!("`n` must be in 1..=16, got {n}"),
            Some("n"),
        ));
    }
    let user_stops = params.stop.map(|s| s.into_vec()).unwrap_or_default();
    if user_stops.len() > 4 {
        return Err(ApiError::invalid(
            format!("`stop` holds at most 4 strings, got {}", user_stops.len()),
            Some("stop"),
        ));
    }
    stop.extend(user_stops);
    if let Some(max_tokens) = params.max_tokens {
        check_max_tokens(max_tokens)?;
    }
    let ids = engine
        .tokenizer()
        .encode(prompt)
        .map_err(|e| ApiError::internal(format!("tokenizing the prompt: {e}")))?;
    let window = engine.context_window();
    let room = window.saturating_sub(ids.len());
    // An answer needs at least one token: a prompt that fills the window is too long.
    let max_tokens = params
        .max_tokens
        .unwrap_or(default_max_tokens.unwrap_or(room).min(room).max(1));
    if ids.len() + max_tokens > window {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {window} tokens. However, you \
                 requested {} tokens ({} in the messages, {max_tokens} in the completion). \
                 Please reduce the length of the messages or completion.",
                ids.len() + max_tokens,
                ids.len()
            ),
            kind: "invalid_request_error",
            param: Some("messages"),
            code: Some("context_length_exceeded"),
        });
    }
    let sampling = SamplingConfig {
        temperature,
        top_k: params.top_k.unwrap_or(0),
        top_p,
        seed: params.seed.unwrap_or_else(fresh_seed),
    };
    Ok(Plan {
        stream,
        request: GenerationRequest {
            prompt: ids,
            max_tokens,
            sampling,
            stop,
        },
        n,
    })
}

fn check_temperature(temperature: f64) -> Result<f64, ApiError> {
    if (0.0..=2.0).contains(&temperature) {
        return Ok(temperature);
    }
    Err(ApiError::invalid(
        format!("`temperature` must be in [0, 2], got {temperature}"),
        Some("temperature"),
    ))
}

fn check_max_tokens(max_tokens: usize) -> Result<usize, ApiError> {
    if max_tokens > 0 {
        return Ok(max_tokens);
    }
    Err(ApiError::invalid(
        "`max_tokens` must be at least 1",
        Some("max_tokens"),
    ))
}

/// Queues the plan's `n` answers and responds with JSON or an event stream.
async fn respond(
    state: &AppState,
    engine: &Engine,
    endpoint: Endpoint,
    plan: Plan,
) -> Result<Response, ApiError> {
    let mut receivers = Vec::with_capacity(plan.n);
    for i in 0..plan.n {
        let mut request = plan.request.clone();
        request.sampling.seed = request.sampling.seed.wrapping_add(i as u64);
        let receiver = engine.submit(request).map_err(|error| match error {
            SubmitError::QueueFull => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "the server is busy: its request queue is full; retry shortly".into(),
                kind: "rate_limit_error",
                param: None,
                code: Some("rate_limit_exceeded"),
            },
            SubmitError::Stopped => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the generation engine has stopped".into(),
                kind: "server_error",
                param: None,
                code: None,
            },
        })?;
        receivers.push(receiver);
    }
    reply(state, endpoint, receivers, plan.stream).await
}

/// Responds with the answers arriving on `receivers`, as JSON once all are complete or
/// as an event stream.
async fn reply(
    state: &AppState,
    endpoint: Endpoint,
    receivers: Vec<UnboundedReceiver<GenerationEvent>>,
    streaming: Streaming,
) -> Result<Response, ApiError> {
    let head = ResponseHead {
        endpoint,
        id: response_id(endpoint),
        created: unix_time(),
        model: state.options.model_id.clone(),
    };
    if streaming.stream {
        let events = event_stream(head, receivers, streaming.include_usage);
        return Ok(Sse::new(events).into_response());
    }
    let mut choices = Vec::with_capacity(receivers.len());
    let mut usage = Usage::new(0, 0);
    for (index, receiver) in receivers.into_iter().enumerate() {
        let (text, finish, answer_usage) = collect(receiver).await?;
        usage = usage.and(answer_usage);
        choices.push(head.choice(index, &text, Some(finish)));
    }
    Ok(Json(head.body(choices, Some(usage), false)).into_response())
}

/// Waits for a whole answer.
async fn collect(
    mut receiver: UnboundedReceiver<GenerationEvent>,
) -> Result<(String, Finish, Usage), ApiError> {
    let mut text = String::new();
    while let Some(event) = receiver.recv().await {
        match event {
            GenerationEvent::Text(delta) => text.push_str(&delta),
            GenerationEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => return Ok((text, finish, Usage::new(prompt_tokens, completion_tokens))),
            GenerationEvent::Failed(message) => {
                return Err(ApiError::internal(format!("generation failed: {message}")));
            }
        }
    }
    Err(ApiError::internal("the generation engine stopped"))
}

/// The fields every response and chunk of one request share.
struct ResponseHead {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
}

impl ResponseHead {
    /// A choice: a whole answer (`chunk = false`) or a stream delta.
    fn choice(&self, index: usize, text: &str, finish: Option<Finish>) -> Value {
        let finish_reason = finish.map(Finish::as_str);
        match self.endpoint {
            Endpoint::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
            Endpoint::Completion => json!({
                "index": index,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        }
    }

    /// A stream chunk's choice; chat deltas always carry a string `content`.
    fn delta(&self, index: usize, text: &str, finish: Option<Finish>, first: bool) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({
                    "index": index,
                    "delta": delta,
                    "logprobs": null,
                    "finish_reason": finish.map(Finish::as_str),
                })
            }
            Endpoint::Completion => self.choice(index, text, finish),
        }
    }

    /// A response body (or chunk) holding `choices`.
    fn body(&self, choices: Vec<Value>, usage: Option<Usage>, chunk: bool) -> Value {
        let object = match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        };
        let mut body = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if !chunk || usage.is_some() {
            body["usage"] = json!(usage);
        }
        body
    }
}

/// The Server-Sent Events of a streamed request: for chat, an opening chunk per choice
/// with the assistant role; text chunks as they are generated (choices interleaved);
/// a closing chunk per choice with its finish reason; with `include_usage`, a chunk
/// with empty `choices` and the token counts; then `[DONE]`.
fn event_stream(
    head: ResponseHead,
    receivers: Vec<UnboundedReceiver<GenerationEvent>>,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let head = Arc::new(head);
    let usage = Arc::new(Mutex::new(Usage::new(0, 0)));
    let n = receivers.len();
    let chunk = {
        let head = head.clone();
        move |choice: Value| {
            let mut body = head.body(vec![choice], None, true);
            if include_usage {
                body["usage"] = Value::Null;
            }
            Event::default().data(body.to_string())
        }
    };
    let opening: Vec<Event> = match head.endpoint {
        Endpoint::Chat => (0..n)
            .map(|i| chunk(head.delta(i, "", None, true)))
            .collect(),
        Endpoint::Completion => Vec::new(),
    };
    let answers = stream::select_all(receivers.into_iter().enumerate().map(|(index, rx)| {
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
            .map(move |event| (index, event))
            .boxed()
    }));
    let body = {
        let (head, total, chunk) = (head.clone(), usage.clone(), chunk.clone());
        answers.map(move |(index, event)| match event {
            GenerationEvent::Text(text) => chunk(head.delta(index, &text, None, false)),
            GenerationEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut total = total.lock().unwrap_or_else(|e| e.into_inner());
                *total = total.and(Usage::new(prompt_tokens, completion_tokens));
                chunk(head.delta(index, "", Some(finish), false))
            }
            GenerationEvent::Failed(message) => {
                let error = error_body(
                    &format!("generation failed: {message}"),
                    "server_error",
                    None,
                    None,
                );
                Event::default().data(error.to_string())
            }
        })
    };
    let closing = stream::once(async move {
        let mut events = Vec::new();
        if include_usage {
            let usage = *usage.lock().unwrap_or_else(|e| e.into_inner());
            events
                .push(Event::default().data(head.body(Vec::new(), Some(usage), true).to_string()));
        }
        events.push(Event::default().data("[DONE]"));
        stream::iter(events)
    })
    .flatten();
    stream::iter(opening).chain(body).chain(closing).map(Ok)
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn response_id(endpoint: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    let count = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{count:06x}", unix_time())
}

/// A seed for requests that bring none: different for every request.
fn fresh_seed() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ NEXT.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}
