//! The server over real HTTP on 127.0.0.1: the official-format client `async-openai` calls
//! every endpoint, streaming and not; each bad input gets its status and error type; 32
//! concurrent clients send 500 requests and each gets its own answer; a full queue answers
//! 429 with Retry-After.

use std::net::SocketAddr;
use std::sync::Arc;

use common::{post, start, start_model};
use std::time::{Duration, Instant};

mod common;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::{
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequestArgs, CreateCompletionRequestArgs,
};
use futures_util::StreamExt;
use moe_serve::EngineOptions;
use serde_json::json;

const KEY: &str = "test-key";

fn openai_client(addr: SocketAddr, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{addr}/v1"))
            .with_api_key(key),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_client_uses_every_endpoint() {
    let addr = start(EngineOptions::default(), Some(KEY)).await;
    let client = openai_client(addr, KEY);

    let models = client.models().list().await.unwrap();
    assert_eq!(models.data.len(), 1);
    assert_eq!(models.data[0].id, "tiny-moe");

    // Chat, greedy: the streamed answer is the same text as the whole one.
    let chat = |stream: bool| {
        let mut args = CreateChatCompletionRequestArgs::default();
        args.model("anything")
            .messages([
                ChatCompletionRequestSystemMessage::from("1. a reference").into(),
                ChatCompletionRequestUserMessage::from("Hello").into(),
            ])
            .max_tokens(12u32)
            .temperature(0.0);
        if stream {
            args.stream(true)
                .stream_options(ChatCompletionStreamOptions {
                    include_usage: true,
                });
        }
        args.build().unwrap()
    };
    let whole = client.chat().create(chat(false)).await.unwrap();
    assert_eq!(whole.object, "chat.completion");
    assert_eq!(whole.model, "tiny-moe");
    assert!(whole.id.starts_with("chatcmpl-"));
    let usage = whole.usage.clone().unwrap();
    assert!(usage.completion_tokens <= 12 && usage.prompt_tokens > 0);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    let answer = whole.choices[0].message.content.clone().unwrap();
    assert!(whole.choices[0].finish_reason.is_some());

    let mut stream = client.chat().create_stream(chat(true)).await.unwrap();
    let (mut streamed, mut finish, mut streamed_usage) = (String::new(), None, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.object, "chat.completion.chunk");
        for choice in &chunk.choices {
            streamed.push_str(
                choice
                    .delta
                    .content
                    .as_deref()
                    .expect("content is a string"),
            );
            finish = finish.or(choice.finish_reason);
        }
        streamed_usage = streamed_usage.or(chunk.usage);
    }
    assert_eq!(streamed, answer);
    assert_eq!(finish, whole.choices[0].finish_reason);
    assert_eq!(
        streamed_usage.unwrap().completion_tokens,
        usage.completion_tokens
    );

    // Completions, with n = 2 and a seed: two choices, reproducible.
    let completion = |stream: bool| {
        let mut args = CreateCompletionRequestArgs::default();
        args.model("tiny-moe")
            .prompt("To be, or not")
            .max_tokens(6u32)
            .n(2u8)
            .seed(7)
            .temperature(1.0);
        if stream {
            args.stream(true);
        }
        args.build().unwrap()
    };
    let first = client
        .completions()
        .create(completion(false))
        .await
        .unwrap();
    let again = client
        .completions()
        .create(completion(false))
        .await
        .unwrap();
    assert_eq!(first.object, "text_completion");
    assert_eq!(first.choices.len(), 2);
    let texts = |r: &async_openai::types::CreateCompletionResponse| {
        let mut texts: Vec<(u32, String)> = r
            .choices
            .iter()
            .map(|c| (c.index, c.text.clone()))
            .collect();
        texts.sort();
        texts
    };
    assert_eq!(texts(&first), texts(&again), "same seed, same answers");
    let mut stream = client
        .completions()
        .create_stream(completion(true))
        .await
        .unwrap();
    let mut streamed = [String::new(), String::new()];
    while let Some(chunk) = stream.next().await {
        for choice in chunk.unwrap().choices {
            streamed[choice.index as usize].push_str(&choice.text);
        }
    }
    let expected: Vec<String> = texts(&first).into_iter().map(|(_, t)| t).collect();
    assert_eq!(streamed.to_vec(), expected);

    // A wrong key is refused in OpenAI's shape.
    let err = client_err(openai_client(addr, "wrong").models().list().await);
    assert_eq!(err.code.as_deref(), Some("invalid_api_key"));
}

fn client_err<T: std::fmt::Debug>(result: Result<T, OpenAIError>) -> async_openai::error::ApiError {
    match result {
        Err(OpenAIError::ApiError(error)) => error,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Posts raw bytes; returns the status, the Retry-After header and the JSON body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_and_error_type() {
    let addr = start(EngineOptions::default(), Some(KEY)).await;
    let chat = "/v1/chat/completions";
    let long_prompt = "word ".repeat(100);
    let cases: Vec<(&str, String, u16, &str, Option<&str>)> = vec![
        (chat, "{not json".into(), 400, "invalid_request_error", None),
        (chat, json!({"model": "m"}).to_string(), 400, "invalid_request_error", None),
        (chat, json!({"model": "m", "messages": []}).to_string(), 400, "invalid_request_error", None),
        (
            chat,
            json!({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}).to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            chat,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 5})
                .to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            chat,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0})
                .to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            chat,
            json!({"model": "m", "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 10})
                .to_string(),
            400,
            "invalid_request_error",
            Some("context_length_exceeded"),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": ["a", "b"]}).to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        ("/v1/nothing", "{}".into(), 404, "invalid_request_error", Some("unknown_url")),
    ];
    for (path, body, status, kind, code) in cases {
        let (got, _, error) = post(addr, path, KEY, &body).await;
        assert_eq!(got, status, "{body}: {error}");
        assert_eq!(error["error"]["type"], kind, "{body}: {error}");
        assert!(
            error["error"]["message"].as_str().unwrap().len() > 10,
            "{error}"
        );
        if let Some(code) = code {
            assert_eq!(error["error"]["code"], code, "{body}: {error}");
        }
    }
    let valid =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (status, _, error) = post(addr, chat, "wrong", &valid.to_string()).await;
    assert_eq!(status, 401, "{error}");
    assert_eq!(error["error"]["code"], "invalid_api_key");
    let (status, _, body) = post(addr, chat, KEY, &valid.to_string()).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let options = EngineOptions {
        queue_capacity: 1,
        max_batch: 1,
        ..Default::default()
    };
    // Wide enough that a 240-token answer keeps the model busy for a while.
    let addr = start_model(options, None, 256, 256).await;
    let mut busy = start_long_answer(addr).await;
    let short = json!({"model": "m", "prompt": "quick", "max_tokens": 1}).to_string();
    let queued = tokio::spawn({
        let short = short.clone();
        async move { post(addr, "/v1/completions", "", &short).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, retry, body) = post(addr, "/v1/completions", "", &short).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    while busy.chunk().await.unwrap().is_some() {}
    let (status, _, body) = queued.await.unwrap();
    assert_eq!(status, 200, "the queued request is served: {body}");
}

/// Streams a long completion and returns its response once the first text has arrived:
/// from then on the model is working on it.
async fn start_long_answer(addr: std::net::SocketAddr) -> reqwest::Response {
    let long = json!({"model": "m", "prompt": "slow", "max_tokens": 240, "temperature": 0, "stream": true});
    let mut busy = reqwest::Client::new()
        .post(format!("http://{addr}/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    busy.chunk().await.unwrap().unwrap();
    busy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_request_is_answered_while_a_long_one_is_generating() {
    let options = EngineOptions {
        max_batch: 2,
        ..Default::default()
    };
    let addr = start_model(options, None, 256, 256).await;
    let mut long = start_long_answer(addr).await;
    let short = json!({"model": "m", "prompt": "quick", "max_tokens": 2}).to_string();
    let (status, _, body) = post(addr, "/v1/completions", "", &short).await;
    assert_eq!(status, 200, "{body}");
    // The long answer is still streaming: the short one joined its batch, not its queue.
    let mut rest = String::new();
    while let Some(chunk) = long.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    let chunks = rest.matches("data: {").count();
    assert!(
        chunks > 20,
        "only {chunks} chunks of the long answer came after the short answer"
    );
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_limit_ends_an_answer_with_length() {
    // A limit far below what any machine takes for 240 tokens (this one once did them in
    // 213 ms): the limit is checked after each token, so the answer holds at least one.
    let options = EngineOptions {
        time_limit: Duration::from_millis(5),
        ..Default::default()
    };
    let addr = start_model(options, None, 256, 256).await;
    let long = json!({"model": "m", "prompt": "slow", "max_tokens": 240, "temperature": 0});
    let started = Instant::now();
    let (status, _, body) = post(addr, "/v1/completions", "", &long.to_string()).await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(tokens > 0 && tokens < 240, "{tokens} tokens in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_each_get_their_own_answer() {
    let options = EngineOptions {
        queue_capacity: 64,
        ..Default::default()
    };
    let addr = start(options, None).await;
    let prompts: Vec<String> = (0..16).map(|i| format!("prompt {i}: ")).collect();
    let request =
        |prompt: &str| json!({"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0});
    // Greedy answers, one request at a time.
    let mut expected = Vec::new();
    for prompt in &prompts {
        let (status, _, body) =
            post(addr, "/v1/completions", "", &request(prompt).to_string()).await;
        assert_eq!(status, 200);
        expected.push(body["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert!(
        expected
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1,
        "prompts must get different answers for the check to mean anything"
    );
    let (prompts, expected) = (Arc::new(prompts), Arc::new(expected));
    let started = Instant::now();
    // Every client is spawned before any is awaited.
    let clients: Vec<_> = (0..32).map(|client| {
        let (prompts, expected) = (prompts.clone(), expected.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            for i in (client..500).step_by(32) {
                let which = i % prompts.len();
                let body = json!({"model": "m", "prompt": prompts[which], "max_tokens": 4, "temperature": 0});
                let sent = Instant::now();
                let (status, _, body) = post(addr, "/v1/completions", "", &body.to_string()).await;
                latencies.push(sent.elapsed());
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["choices"][0]["text"], expected[which], "request {i}");
            }
            latencies
        })
    }).collect();
    let mut latencies: Vec<Duration> = Vec::new();
    for client in clients {
        latencies.extend(client.await.unwrap());
    }
    assert_eq!(latencies.len(), 500);
    latencies.sort();
    eprintln!(
        "500 requests from 32 clients in {:.2?}: p50 {:.2?}, p99 {:.2?}",
        started.elapsed(),
        latencies[250],
        latencies[494]
    );
}
