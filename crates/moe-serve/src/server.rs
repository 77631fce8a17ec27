//! The HTTP server: `POST /v1/chat/completions`, `POST /v1/completions` (both plain JSON
//! and Server-Sent Events), `GET /v1/models`, `GET /health` and `GET /metrics`
//! (Prometheus), with OpenAI's response and error shapes, an optional API key and graceful
//! shutdown. Answers come from a model (the engine) or from a whole Mixture-of-Agents
//! pipeline (chat only), behind the same API.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream, StreamExt};
use moe_data::{ChatTemplate, Message, ROLES, TextTokenizer};
use moe_model::{Penalties, SamplingConfig, TokenLogprob};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::engine::{Engine, Finish, GenerationEvent, GenerationRequest, SubmitError};
use crate::logprobs;
use crate::metrics::Metrics;
use crate::moa::{self, MoaConfig, Refused};
use crate::openai::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, PromptItem, SamplingParams, Usage,
    error_body,
};
use crate::request_fields;

/// What the server says about itself and how it reads chat requests.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The `model` field of responses and the one entry of `/v1/models`.
    pub model_id: String,
    /// If set, every `/v1` request needs `Authorization: Bearer <key>` (`/health` and
    /// `/metrics` stay open). Check it with [`check_api_key`] first.
    pub api_key: Option<String>,
    /// How chat messages become a prompt (the model's own template, normally); its stop
    /// strings end the answer.
    pub template: ChatTemplate,
}

/// Checks a key for [`ServerOptions::api_key`] before serving with it: an empty key, or
/// one that no `Authorization` header can carry (surrounding whitespace, control or
/// non-ASCII characters), would refuse every request.
pub fn check_api_key(key: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !key.trim().is_empty(),
        "the API key is empty, so every request would be refused; give a key, or none to \
         serve without one"
    );
    anyhow::ensure!(
        key.trim() == key && key.bytes().all(|b| b.is_ascii_graphic() || b == b' '),
        "the API key has whitespace at an end or characters other than visible ASCII and \
         spaces, which no `Authorization` header can carry, so every request would be refused"
    );
    Ok(())
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
    metrics: Metrics,
}

/// The largest request body read: 2 MiB (axum's default).
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// The application: every route, backed by `engine`.
pub fn router(engine: Engine, options: ServerOptions) -> Router {
    app(Answerer::Model(engine), options)
}

/// The application for a Mixture-of-Agents pipeline: each chat completion runs `pipeline`
/// on the request's messages and answers with the aggregator's text. The request's
/// `temperature` and `max_tokens` apply to the aggregator; `n` must be 1 and `logprobs` is
/// refused. `usage` and `finish_reason` report the aggregator's call. `options.template`
/// is not used.
pub fn pipeline_router(pipeline: MoaConfig, options: ServerOptions) -> Router {
    app(Answerer::Pipeline(Arc::new(pipeline)), options)
}

fn app(answerer: Answerer, options: ServerOptions) -> Router {
    let metrics = match &answerer {
        Answerer::Model(engine) => engine.metrics().clone(),
        Answerer::Pipeline(_) => Metrics::default(),
    };
    let state = AppState {
        answerer,
        options: Arc::new(options),
        created: unix_time(),
        metrics: metrics.clone(),
    };
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(metrics, count_requests))
        .with_state(state)
}

/// Every route and the method it answers (GET routes answer HEAD too).
const ROUTES: [(&str, &str); 5] = [
    ("/health", "GET"),
    ("/metrics", "GET"),
    ("/v1/models", "GET"),
    ("/v1/chat/completions", "POST"),
    ("/v1/completions", "POST"),
];

/// Counts every request by route and response status.
async fn count_requests(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let endpoint = ROUTES
        .into_iter()
        .map(|(route, _)| route)
        .find(|r| *r == path)
        .unwrap_or("other");
    let response = next.run(request).await;
    metrics.count_request(endpoint, response.status().as_u16());
    response
}

/// The metrics in the OpenMetrics text format Prometheus scrapes; open, like `/health`
/// (scrapers usually hold no API key).
async fn prometheus(State(state): State<AppState>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (
        [(header::CONTENT_TYPE, content_type)],
        state.metrics.encode(),
    )
        .into_response()
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
    param: Option<String>,
    code: Option<String>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
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

    /// An answer that failed: the model (or a pipeline) failed with `message`.
    fn generation_failed(message: &str) -> Self {
        Self::internal(format!("generation failed: {message}"))
    }

    /// The JSON body.
    fn body(&self) -> Value {
        error_body(
            &self.message,
            self.kind,
            self.param.as_deref(),
            self.code.as_deref(),
        )
    }
}

/// A pipeline's agents refused the request: a 400 with their words and code.
impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: refused.message,
            kind: "invalid_request_error",
            param: None,
            code: refused.code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
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

/// A request body of at most [`MAX_BODY_BYTES`]. A longer one gets 413, once the rest of
/// it has been read and dropped (up to [`MAX_DRAINED_BYTES`] in all): a client still
/// sending when the server answers and closes the connection sees a broken pipe, not
/// the answer.
struct RequestBody(Bytes);

/// The most bytes of an oversized body read (and dropped) before answering 413.
const MAX_DRAINED_BYTES: usize = 64 * 1024 * 1024;

impl<S: Send + Sync> FromRequest<S> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let mut chunks = request.into_body().into_data_stream();
        let (mut body, mut length) = (Vec::new(), 0usize);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::invalid(format!("reading the request body: {e}"), None))?;
            length = length.saturating_add(chunk.len());
            if length <= MAX_BODY_BYTES {
                body.extend_from_slice(&chunk);
            } else if length <= MAX_DRAINED_BYTES {
                body = Vec::new();
            } else {
                break;
            }
        }
        if length <= MAX_BODY_BYTES {
            return Ok(Self(body.into()));
        }
        Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the request body is larger than this server's limit of {} MiB ({MAX_BODY_BYTES} bytes)",
                MAX_BODY_BYTES >> 20
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large".into()),
        })
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "unknown route; this server has /v1/chat/completions, /v1/completions, \
                  /v1/models, /health and /metrics"
            .into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("unknown_url".into()),
    }
}

/// A route asked with a method it does not answer; axum adds the `Allow` header.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    let allowed = ROUTES
        .into_iter()
        .find(|(route, _)| *route == path)
        .map_or("other methods", |(_, method)| method);
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{path} does not answer {method}; it answers {allowed}"),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed".into()),
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
        .and_then(bearer_token);
    if given == Some(key.as_str()) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "incorrect or missing API key (send `Authorization: Bearer <key>`)".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key".into()),
    })
}

/// The token of an `Authorization: Bearer TOKEN` header value; the scheme is
/// case-insensitive (RFC 7235) and whitespace around either part is ignored.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(|c: char| c.is_ascii_whitespace())?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim_start())
}

/// Reads a request body: a JSON object with no field the endpoint refuses (it also reads
/// the `own` fields), as the endpoint's request `T` and the sampling fields.
fn parse_body<T: DeserializeOwned>(
    body: &Bytes,
    own: &[&str],
) -> Result<(T, SamplingParams), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    let Value::Object(fields) = &value else {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    };
    request_fields::check(fields, own)
        .map_err(|refusal| ApiError::invalid(refusal.message, Some(&refusal.param)))?;
    Ok((typed(&value)?, typed(&value)?))
}

/// `value` as a `T`; an error names the field at fault.
fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let field = error.path().to_string();
        let param = (field != ".").then_some(field.as_str());
        let message = match param {
            Some(field) => format!("invalid request body: `{field}`: {}", error.inner()),
            None => format!("invalid request body: {}", error.inner()),
        };
        ApiError::invalid(message, param)
    })
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

/// A validated request, ready for the engine: one generation request per prompt, each
/// answered `n` times.
struct Plan {
    prompts: Vec<GenerationRequest>,
    n: usize,
    stream: Streaming,
}

/// What an endpoint asks of the engine beyond the shared sampling fields.
struct Ask {
    /// Token ids of each prompt.
    prompts: Vec<Vec<u32>>,
    /// `max_tokens` when the request has none; `None` means "the rest of the window".
    default_max_tokens: Option<usize>,
    /// Stop strings of the chat template.
    stop: Vec<String>,
    /// Alternatives per token, when log-probabilities are asked for.
    logprobs: Option<usize>,
    /// Put the prompt before the answer.
    echo: bool,
}

/// Prompts one completions request may hold.
const MAX_PROMPTS: usize = 16;

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
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let (request, mut sampling): (ChatCompletionRequest, _) =
        parse_body(&body, request_fields::CHAT)?;
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must hold at least one message",
            Some("messages"),
        ));
    }
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
    sampling.max_tokens = sampling.max_tokens.or(request.max_completion_tokens);
    let logprobs = chat_logprobs(&request)?;
    let engine = match &state.answerer {
        Answerer::Model(engine) => engine,
        Answerer::Pipeline(pipeline) => {
            if logprobs.is_some() {
                return Err(ApiError::invalid(
                    "a Mixture-of-Agents pipeline gives no log-probabilities",
                    Some("logprobs"),
                ));
            }
            let stream = Streaming::of(&sampling);
            let receiver = run_pipeline(pipeline, request.messages, &sampling)?;
            let head = ResponseHead::new(&state, Endpoint::Chat, false, 1);
            return reply(head, vec![receiver], stream).await;
        }
    };
    let template = &state.options.template;
    let messages: Vec<Message> = request
        .messages
        .iter()
        .map(|m| Message::new(&m.role, &m.content.text()))
        .collect();
    let prompt = template
        .render(&messages, true)
        .map_err(|e| ApiError::invalid(format!("{e:#}"), Some("messages")))?;
    let ask = Ask {
        prompts: vec![encode(engine, &prompt, sampling.max_tokens)?],
        default_max_tokens: None,
        stop: template.stop_strings(),
        logprobs,
        echo: false,
    };
    let plan = plan(engine, ask, sampling)?;
    respond(&state, engine, Endpoint::Chat, plan).await
}

/// Chat's `logprobs` and `top_logprobs`: the alternatives per token, when log-probabilities
/// are asked for.
fn chat_logprobs(request: &ChatCompletionRequest) -> Result<Option<usize>, ApiError> {
    let top = request.top_logprobs;
    if let Some(top) = top.filter(|&top| top > 20) {
        return Err(ApiError::invalid(
            format!("`top_logprobs` must be in 0..=20, got {top}"),
            Some("top_logprobs"),
        ));
    }
    match (request.logprobs.unwrap_or(false), top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(_)) => Err(ApiError::invalid(
            "`top_logprobs` needs `logprobs: true`",
            Some("top_logprobs"),
        )),
        (false, None) => Ok(None),
    }
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
            let _ = text_events.send(GenerationEvent::Text {
                text: text.to_string(),
                logprobs: Vec::new(),
            });
        });
        let outcome = tokio::select! {
            outcome = run => outcome,
            () = events.closed() => return,
        };
        let aggregator = outcome.calls.last();
        let tokens = |count: Option<Option<u64>>| count.flatten().unwrap_or(0) as usize;
        let finish = match aggregator.and_then(|c| c.finish_reason.as_deref()) {
            Some("length") => Finish::Length,
            _ => Finish::Stop,
        };
        let _ = events.send(match outcome.answer {
            Ok(_) => GenerationEvent::Done {
                finish,
                prompt_tokens: tokens(aggregator.map(|c| c.prompt_tokens)),
                completion_tokens: tokens(aggregator.map(|c| c.completion_tokens)),
            },
            Err(error) => match error.downcast::<Refused>() {
                Ok(refused) => GenerationEvent::Refused(refused),
                Err(error) => GenerationEvent::Failed(format!("{error:#}")),
            },
        });
    });
    Ok(receiver)
}

async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let Answerer::Model(engine) = &state.answerer else {
        return Err(ApiError::invalid(
            "this server runs a Mixture-of-Agents pipeline, which answers chat only: \
             use /v1/chat/completions",
            None,
        ));
    };
    let (request, sampling): (CompletionRequest, _) =
        parse_body(&body, request_fields::COMPLETION)?;
    if let Some(logprobs) = request.logprobs.filter(|&n| n > 5) {
        return Err(ApiError::invalid(
            format!("`logprobs` must be in 0..=5, got {logprobs}"),
            Some("logprobs"),
        ));
    }
    let items = request.prompt.into_items();
    if !(1..=MAX_PROMPTS).contains(&items.len()) {
        return Err(ApiError::invalid(
            format!(
                "`prompt` must hold 1 to {MAX_PROMPTS} prompts, got {}",
                items.len()
            ),
            Some("prompt"),
        ));
    }
    let prompts = items
        .into_iter()
        .map(|item| prompt_ids(engine, item, sampling.max_tokens))
        .collect::<Result<_, _>>()?;
    let ask = Ask {
        prompts,
        // OpenAI's default for this endpoint.
        default_max_tokens: Some(16),
        stop: Vec::new(),
        logprobs: request.logprobs,
        echo: request.echo.unwrap_or(false),
    };
    let plan = plan(engine, ask, sampling)?;
    respond(&state, engine, Endpoint::Completion, plan).await
}

/// Tokenizes a prompt to be answered with `max_tokens` (at least 1 when unset). A prompt
/// too long for the context window whatever it tokenizes to is refused without
/// tokenizing it: tokenizing megabytes takes memory the allocator keeps.
fn encode(engine: &Engine, text: &str, max_tokens: Option<usize>) -> Result<Vec<u32>, ApiError> {
    let window = engine.context_window();
    let (at_least, max_tokens) = (engine.min_tokens(text), max_tokens.unwrap_or(1));
    if at_least.saturating_add(max_tokens) > window {
        return Err(context_length_exceeded(window, at_least, max_tokens, true));
    }
    engine
        .tokenizer()
        .encode(text)
        .map_err(|e| ApiError::internal(format!("tokenizing the prompt: {e}")))
}

/// Token ids of one prompt (see [`encode`]); ids given as such must be in the vocabulary.
fn prompt_ids(
    engine: &Engine,
    prompt: PromptItem,
    max_tokens: Option<usize>,
) -> Result<Vec<u32>, ApiError> {
    let ids = match prompt {
        PromptItem::Text(text) => return encode(engine, &text, max_tokens),
        PromptItem::Tokens(ids) => ids,
    };
    let vocab = engine.tokenizer().vocab_size();
    if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("`prompt` holds token id {id}, outside the vocabulary (0..{vocab})"),
            Some("prompt"),
        ));
    }
    Ok(ids)
}

/// Validates the sampling fields and the context window of each prompt.
fn plan(engine: &Engine, ask: Ask, params: SamplingParams) -> Result<Plan, ApiError> {
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
    let user_stops = params
        .stop
        .clone()
        .map(|s| s.into_vec())
        .unwrap_or_default();
    if user_stops.len() > 4 {
        return Err(ApiError::invalid(
            format!("`stop` holds at most 4 strings, got {}", user_stops.len()),
            Some("stop"),
        ));
    }
    let mut stop = ask.stop;
    stop.extend(user_stops);
    let tokenizer = engine.tokenizer();
    let stop_tokens: Vec<u32> = stop
        .iter()
        .filter_map(|s| tokenizer.special_token_id(s))
        .collect();
    // Scoring an echoed prompt needs no new token.
    if let Some(max_tokens) = params.max_tokens.filter(|&m| !(ask.echo && m == 0)) {
        check_max_tokens(max_tokens)?;
    }
    let sampling = SamplingConfig {
        temperature,
        top_k: params.top_k.unwrap_or(0),
        top_p,
        seed: params.seed.unwrap_or_else(fresh_seed),
        penalties: penalties(&params, engine.tokenizer().vocab_size())?,
    };
    let window = engine.context_window();
    let mut prompts = Vec::with_capacity(ask.prompts.len());
    for ids in ask.prompts {
        let room = window.saturating_sub(ids.len());
        // An answer needs at least one token: a prompt that fills the window is too long.
        let max_tokens = params
            .max_tokens
            .unwrap_or(ask.default_max_tokens.unwrap_or(room).min(room).max(1));
        if ids.len().saturating_add(max_tokens) > window {
            return Err(context_length_exceeded(
                window,
                ids.len(),
                max_tokens,
                false,
            ));
        }
        prompts.push(GenerationRequest {
            prompt: ids,
            max_tokens,
            sampling: sampling.clone(),
            stop: stop.clone(),
            stop_tokens: stop_tokens.clone(),
            logprobs: ask.logprobs,
            echo: ask.echo,
        });
    }
    Ok(Plan { prompts, n, stream })
}

/// The 400 for a prompt of `prompt` tokens (at least that many, when `bounded`) to be
/// answered with `max_tokens` more, beyond the context `window`: OpenAI's words.
fn context_length_exceeded(
    window: usize,
    prompt: usize,
    max_tokens: usize,
    bounded: bool,
) -> ApiError {
    let at_least = if bounded { "at least " } else { "" };
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!(
            "This model's maximum context length is {window} tokens. However, you requested \
             {at_least}{} tokens ({at_least}{prompt} in the messages, {max_tokens} in the \
             completion). Please reduce the length of the messages or completion.",
            prompt.saturating_add(max_tokens),
        ),
        kind: "invalid_request_error",
        param: Some("messages".into()),
        code: Some("context_length_exceeded".into()),
    }
}

/// The penalty and bias fields, checked against their ranges and the vocabulary of
/// `vocab` ids.
fn penalties(params: &SamplingParams, vocab: usize) -> Result<Penalties, ApiError> {
    let within_two = |field: &str, value: Option<f64>| {
        let value = value.unwrap_or(0.0);
        if (-2.0..=2.0).contains(&value) {
            return Ok(value as f32);
        }
        Err(ApiError::invalid(
            format!("`{field}` must be in [-2, 2], got {value}"),
            Some(field),
        ))
    };
    let repetition = params.repetition_penalty.unwrap_or(1.0);
    if !(repetition > 0.0 && repetition.is_finite()) {
        return Err(ApiError::invalid(
            format!("`repetition_penalty` must be above 0 (1 = off), got {repetition}"),
            Some("repetition_penalty"),
        ));
    }
    let mut logit_bias = Vec::new();
    for (key, &bias) in params.logit_bias.iter().flatten() {
        let Some(id) = key.parse::<u32>().ok().filter(|&id| (id as usize) < vocab) else {
            return Err(ApiError::invalid(
                format!("`logit_bias` key `{key}` is not a token id of this model (0..{vocab})"),
                Some("logit_bias"),
            ));
        };
        if !(-100.0..=100.0).contains(&bias) {
            return Err(ApiError::invalid(
                format!("`logit_bias` of token {id} must be in [-100, 100], got {bias}"),
                Some("logit_bias"),
            ));
        }
        logit_bias.push((id, bias as f32));
    }
    Ok(Penalties {
        presence: within_two("presence_penalty", params.presence_penalty)?,
        frequency: within_two("frequency_penalty", params.frequency_penalty)?,
        repetition: repetition as f32,
        logit_bias,
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
        "`max_tokens` must be at least 1 (0 only with `echo`, to score the prompt)",
        Some("max_tokens"),
    ))
}

/// Queues the plan's answers (`n` per prompt, in prompt order) and responds with JSON or
/// an event stream.
async fn respond(
    state: &AppState,
    engine: &Engine,
    endpoint: Endpoint,
    plan: Plan,
) -> Result<Response, ApiError> {
    let logprobs = plan.prompts.iter().any(|p| p.logprobs.is_some());
    let mut receivers = Vec::with_capacity(plan.prompts.len() * plan.n);
    for prompt in &plan.prompts {
        for i in 0..plan.n {
            let mut request = prompt.clone();
            request.sampling.seed = request.sampling.seed.wrapping_add(i as u64);
            let receiver = engine.submit(request).map_err(|error| match error {
                SubmitError::QueueFull => ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: "the server is busy: its request queue is full; retry shortly".into(),
                    kind: "rate_limit_error",
                    param: None,
                    code: Some("rate_limit_exceeded".into()),
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
    }
    let head = ResponseHead::new(state, endpoint, logprobs, plan.n);
    reply(head, receivers, plan.stream).await
}

/// Responds with the answers arriving on `receivers`, as JSON once all are complete or
/// as an event stream.
async fn reply(
    head: ResponseHead,
    receivers: Vec<UnboundedReceiver<GenerationEvent>>,
    streaming: Streaming,
) -> Result<Response, ApiError> {
    if streaming.stream {
        let events = event_stream(head, receivers, streaming.include_usage);
        return Ok(Sse::new(events).into_response());
    }
    let mut choices = Vec::with_capacity(receivers.len());
    let mut usages = Vec::with_capacity(receivers.len());
    for (index, receiver) in receivers.into_iter().enumerate() {
        let (text, logprobs, finish, usage) = collect(&head, receiver).await?;
        usages.push(usage);
        choices.push(head.choice(index, &text, logprobs, Some(finish)));
    }
    let usage = Usage::of_answers(&usages, head.n);
    Ok(Json(head.body(choices, Some(usage), false)).into_response())
}

/// Waits for a whole answer: its text, `logprobs`, finish reason and usage.
async fn collect(
    head: &ResponseHead,
    mut receiver: UnboundedReceiver<GenerationEvent>,
) -> Result<(String, Value, Finish, Usage), ApiError> {
    let (mut text, mut offset) = (String::new(), 0);
    let mut logprobs = head.logprobs(None, &[], &mut offset);
    while let Some(event) = receiver.recv().await {
        let (more, more_logprobs) = match event {
            GenerationEvent::Echo {
                prompt,
                logprobs: scored,
            } => head.echo(&prompt, &scored, &mut offset),
            GenerationEvent::Text {
                text,
                logprobs: scored,
            } => {
                let more_logprobs = head.logprobs(None, &scored, &mut offset);
                (text, more_logprobs)
            }
            GenerationEvent::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                let usage = Usage::new(prompt_tokens, completion_tokens);
                return Ok((text, logprobs, finish, usage));
            }
            GenerationEvent::Failed(message) => return Err(ApiError::generation_failed(&message)),
            GenerationEvent::Refused(refused) => return Err(refused.into()),
        };
        text.push_str(&more);
        logprobs::extend(&mut logprobs, more_logprobs);
    }
    Err(ApiError::internal("the generation engine stopped"))
}

/// The fields every response and chunk of one request share, and how to render its
/// choices.
struct ResponseHead {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    /// The served model's tokenizer (none for a pipeline).
    tokenizer: Option<Arc<TextTokenizer>>,
    /// Whether choices carry `logprobs`.
    logprobs: bool,
    /// Answers per prompt.
    n: usize,
}

impl ResponseHead {
    fn new(state: &AppState, endpoint: Endpoint, logprobs: bool, n: usize) -> Self {
        let tokenizer = match &state.answerer {
            Answerer::Model(engine) => Some(engine.tokenizer().clone()),
            Answerer::Pipeline(_) => None,
        };
        Self {
            endpoint,
            id: response_id(endpoint),
            created: unix_time(),
            model: state.options.model_id.clone(),
            tokenizer,
            logprobs,
            n,
        }
    }

    /// The `logprobs` of `tokens` (null when not asked for), which start `offset`
    /// characters into the choice's text; `unscored`, an echoed prompt's first token,
    /// comes before them.
    fn logprobs(
        &self,
        unscored: Option<u32>,
        tokens: &[TokenLogprob],
        offset: &mut usize,
    ) -> Value {
        let Some(tokenizer) = self.tokenizer.as_deref().filter(|_| self.logprobs) else {
            return Value::Null;
        };
        match self.endpoint {
            Endpoint::Chat => logprobs::chat(tokenizer, tokens),
            Endpoint::Completion => {
                let (value, end) = logprobs::completion(tokenizer, unscored, tokens, *offset);
                *offset = end;
                value
            }
        }
    }

    /// The text and `logprobs` of an echoed prompt.
    fn echo(&self, prompt: &[u32], scored: &[TokenLogprob], offset: &mut usize) -> (String, Value) {
        let text = self
            .tokenizer
            .as_ref()
            .and_then(|t| t.decode(prompt).ok())
            .unwrap_or_default();
        (text, self.logprobs(prompt.first().copied(), scored, offset))
    }

    /// A whole choice (or a completions stream chunk's choice).
    fn choice(&self, index: usize, text: &str, logprobs: Value, finish: Option<Finish>) -> Value {
        let finish_reason = finish.map(Finish::as_str);
        match self.endpoint {
            Endpoint::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
            Endpoint::Completion => json!({
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        }
    }

    /// A stream chunk's choice; chat deltas always carry a string `content`.
    fn delta(
        &self,
        index: usize,
        text: &str,
        logprobs: Value,
        finish: Option<Finish>,
        first: bool,
    ) -> Value {
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
                    "logprobs": logprobs,
                    "finish_reason": finish.map(Finish::as_str),
                })
            }
            Endpoint::Completion => self.choice(index, text, logprobs, finish),
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

/// Per choice of a stream: its usage once done, and its text's length so far in
/// characters (for `text_offset`).
struct StreamProgress {
    usage: Vec<Usage>,
    offsets: Vec<usize>,
}

/// The Server-Sent Events of a streamed request: for chat, an opening chunk per choice
/// with the assistant role; text chunks (with their `logprobs`) as they are generated
/// (choices interleaved); a closing chunk per choice with its finish reason; with
/// `include_usage`, a chunk with empty `choices` and the token counts; then `[DONE]`.
fn event_stream(
    head: ResponseHead,
    receivers: Vec<UnboundedReceiver<GenerationEvent>>,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let head = Arc::new(head);
    let count = receivers.len();
    let progress = Arc::new(Mutex::new(StreamProgress {
        usage: vec![Usage::new(0, 0); count],
        offsets: vec![0; count],
    }));
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
        Endpoint::Chat => (0..count)
            .map(|i| chunk(head.delta(i, "", Value::Null, None, true)))
            .collect(),
        Endpoint::Completion => Vec::new(),
    };
    let answers = stream::select_all(receivers.into_iter().enumerate().map(|(index, rx)| {
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
            .map(move |event| (index, event))
            .boxed()
    }));
    let body = {
        let (head, progress, chunk) = (head.clone(), progress.clone(), chunk.clone());
        answers.map(move |(index, event)| {
            let mut progress = progress.lock().unwrap_or_else(|e| e.into_inner());
            let offset = &mut progress.offsets[index];
            let (text, logprobs) = match event {
                GenerationEvent::Echo { prompt, logprobs } => head.echo(&prompt, &logprobs, offset),
                GenerationEvent::Text { text, logprobs } => {
                    (text, head.logprobs(None, &logprobs, offset))
                }
                GenerationEvent::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    progress.usage[index] = Usage::new(prompt_tokens, completion_tokens);
                    return chunk(head.delta(index, "", Value::Null, Some(finish), false));
                }
                GenerationEvent::Failed(message) => {
                    let error = ApiError::generation_failed(&message);
                    return Event::default().data(error.body().to_string());
                }
                GenerationEvent::Refused(refused) => {
                    return Event::default().data(ApiError::from(refused).body().to_string());
                }
            };
            chunk(head.delta(index, &text, logprobs, None, false))
        })
    };
    let closing = stream::once(async move {
        let mut events = Vec::new();
        if include_usage {
            let progress = progress.lock().unwrap_or_else(|e| e.into_inner());
            let usage = Usage::of_answers(&progress.usage, head.n);
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
