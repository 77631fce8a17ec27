//! Mixture-of-Agents pipelines over real `moe` servers on 127.0.0.1: two proposers and an
//! aggregator produce an answer; a dead proposer, one killed mid-answer or one whose
//! window is too small is dropped and the pipeline still answers; too few references is
//! an error naming them. The pipeline served as an OpenAI endpoint answers an OpenAI
//! client with what the pipeline computes.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::{ChatCompletionRequestUserMessage, CreateChatCompletionRequestArgs};
use common::{start, start_app, start_killable, start_model};
use futures_util::StreamExt;
use moe_serve::moa::{self, Agent, Layer, MoaConfig};
use moe_serve::openai::ChatMessage;
use moe_serve::{ChatTemplate, EngineOptions, ServerOptions, pipeline_router};
use serde_json::{Value, json};

fn agent(name: &str, addr: SocketAddr) -> Agent {
    Agent {
        name: Some(name.into()),
        url: format!("http://{addr}/v1"),
        model: "tiny".into(),
        api_key_env: None,
        temperature: 0.0,
        max_tokens: 8,
        system_prompt: None,
    }
}

fn pipeline(layers: Vec<Vec<Agent>>, aggregator: Agent, min_references: usize) -> MoaConfig {
    MoaConfig {
        layers: layers
            .into_iter()
            .map(|proposers| Layer { proposers })
            .collect(),
        aggregator,
        min_references,
        timeout_secs: 20.0,
        retries: 1,
        // Short, so references fit the test models' windows.
        aggregate_prompt: "Synthesize:".into(),
    }
}

/// A one-question conversation.
fn ask(question: &str) -> [ChatMessage; 1] {
    [ChatMessage::new("user", question)]
}

/// An address nothing listens on.
async fn dead_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposers_and_an_aggregator_answer_and_failures_are_dropped() {
    let wide = || start_model(EngineOptions::default(), None, 32, 1024);
    let (a, b, aggregator) = (wide().await, wide().await, wide().await);
    let config = pipeline(
        vec![
            vec![agent("a", a), agent("b", b)],
            vec![agent("a2", a), agent("b2", b)],
        ],
        agent("aggregator", aggregator),
        1,
    );
    config.validate().unwrap();
    let mut streamed = String::new();
    let outcome = moa::run(&config, &ask("What is a king?"), |text| {
        streamed.push_str(text)
    })
    .await;
    let answer = outcome.answer.unwrap();
    assert_eq!(streamed, answer);
    assert!(!answer.is_empty());
    let layers: Vec<usize> = outcome.calls.iter().map(|c| c.layer).collect();
    assert_eq!(layers, [1, 1, 2, 2, 3]);
    for call in &outcome.calls {
        assert!(call.error.is_none(), "{call:?}");
        assert!(call.completion_tokens.unwrap() <= 8, "{call:?}");
        assert!(call.prompt_tokens.unwrap() > 0, "{call:?}");
    }
    // Later layers see the references: their prompts are longer than layer 1's.
    assert!(outcome.calls[2].prompt_tokens > outcome.calls[0].prompt_tokens);

    // One proposer is gone, another's window is too small for the prompt: both dropped,
    // neither fatal; the window refusal is not retried.
    let dead = dead_address().await;
    let narrow = start_model(EngineOptions::default(), None, 32, 16).await;
    let config = pipeline(
        vec![vec![
            agent("a", a),
            agent("dead", dead),
            agent("narrow", narrow),
        ]],
        agent("aggregator", aggregator),
        1,
    );
    let outcome = moa::run(&config, &ask("What is a king?"), |_| {}).await;
    assert!(!outcome.answer.unwrap().is_empty());
    let call = |name: &str| outcome.calls.iter().find(|c| c.agent == name).unwrap();
    assert!(call("a").error.is_none());
    assert_eq!(call("dead").attempts, 2, "connection errors are retried");
    assert!(call("dead").error.is_some());
    assert_eq!(call("narrow").attempts, 1);
    assert!(
        call("narrow")
            .error
            .as_deref()
            .unwrap()
            .contains("maximum context length"),
        "{:?}",
        call("narrow")
    );

    // Requiring two references when only one proposer can answer fails, naming why.
    let small = start(EngineOptions::default(), None).await;
    let config = pipeline(
        vec![vec![agent("small", small), agent("dead", dead)]],
        agent("aggregator", aggregator),
        2,
    );
    let outcome = moa::run(&config, &ask("Hi"), |_| {}).await;
    let err = outcome.answer.unwrap_err().to_string();
    assert!(err.contains("layer 1") && err.contains("dead"), "{err}");
    assert!(err.contains("refused"), "the cause is named: {err}");
    // The calls made are still on record; the aggregator was never called.
    let agents: Vec<&str> = outcome.calls.iter().map(|c| c.agent.as_str()).collect();
    assert_eq!(agents, ["small", "dead"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposer_killed_mid_run_is_dropped() {
    let wide = || start_model(EngineOptions::default(), None, 32, 1024);
    let (a, aggregator) = (wide().await, wide().await);
    // A wide model asked for 900 tokens: still answering when it is killed.
    let (victim, kill) = start_killable(EngineOptions::default(), 256, 1024);
    let mut slow = agent("victim", victim);
    slow.max_tokens = 900;
    let config = pipeline(
        vec![vec![agent("a", a), slow]],
        agent("aggregator", aggregator),
        1,
    );
    let started = Instant::now();
    let run = tokio::spawn(async move { moa::run(&config, &ask("What is a king?"), |_| {}).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill.send(()).unwrap();
    let outcome = run.await.unwrap();
    assert!(!outcome.answer.unwrap().is_empty());
    let victim = outcome.calls.iter().find(|c| c.agent == "victim").unwrap();
    assert!(
        victim.error.is_some(),
        "the victim was killed before it answered: {victim:?}"
    );
    assert_eq!(
        victim.attempts, 2,
        "the broken connection is retried: {victim:?}"
    );
    let agents: Vec<&str> = outcome.calls.iter().map(|c| c.agent.as_str()).collect();
    assert_eq!(agents, ["a", "victim", "aggregator"]);
    eprintln!(
        "killed at 300 ms; the pipeline answered at {:?}",
        started.elapsed()
    );
}

/// `POST`s a JSON body: the status and the JSON answer.
async fn post(addr: SocketAddr, path: &str, key: &str, body: Value) -> (u16, Value) {
    let (status, _, body) = common::post(addr, path, key, &body.to_string()).await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_serves_openai_chat_completions() {
    let wide = || start_model(EngineOptions::default(), None, 32, 1024);
    let (a, b, aggregator) = (wide().await, wide().await, wide().await);
    let config = pipeline(
        vec![vec![agent("a", a), agent("b", b)]],
        agent("aggregator", aggregator),
        1,
    );
    let question = "What is a king?";
    let direct = moa::run(&config, &ask(question), |_| {})
        .await
        .answer
        .unwrap();
    assert!(!direct.is_empty());
    let options = ServerOptions {
        model_id: "moa".into(),
        api_key: Some("key".into()),
        template: ChatTemplate::chatml(),
    };
    let addr = start_app(pipeline_router(config, options)).await;
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{addr}/v1"))
            .with_api_key("key"),
    );
    let request = CreateChatCompletionRequestArgs::default()
        .model("anything")
        .messages([ChatCompletionRequestUserMessage::from(question).into()])
        .build()
        .unwrap();
    // Every agent decodes greedily, so the served answer is the pipeline's.
    let response = client.chat().create(request.clone()).await.unwrap();
    assert_eq!(response.model, "moa");
    let answer = response.choices[0].message.content.clone().unwrap();
    assert_eq!(answer, direct);
    let usage = response.usage.unwrap();
    assert!(
        usage.completion_tokens > 0 && usage.completion_tokens <= 8,
        "{usage:?}"
    );
    let mut stream = client.chat().create_stream(request).await.unwrap();
    let mut streamed = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if let Some(text) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
            streamed.push_str(&text);
        }
    }
    assert_eq!(streamed, direct);

    // The request's max_tokens bounds the aggregator's answer; its finish reason is the
    // aggregator's.
    let ask_json = |extra: Value| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": question}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, body) = post(
        addr,
        "/v1/chat/completions",
        "key",
        ask_json(json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Two bytes cannot hold the template's stop string: the aggregator stops at max_tokens,
    // and the pipeline says so.
    assert_eq!(body["usage"]["completion_tokens"], 2, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    // Bad requests get their errors.
    let (status, body) = post(
        addr,
        "/v1/chat/completions",
        "key",
        ask_json(json!({"n": 2})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("n")),
        "{body}"
    );
    let (status, body) = post(
        addr,
        "/v1/chat/completions",
        "key",
        ask_json(json!({"logprobs": true})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("logprobs")),
        "{body}"
    );
    let (status, body) = post(
        addr,
        "/v1/chat/completions",
        "key",
        ask_json(json!({"temperature": 5})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("temperature")),
        "{body}"
    );
    let (status, body) = post(
        addr,
        "/v1/completions",
        "key",
        json!({"model": "m", "prompt": "hi"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/chat/completions")
    );
    let (status, body) = post(addr, "/v1/chat/completions", "wrong", ask_json(json!({}))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );

    // A pipeline that cannot answer says why.
    let dead = dead_address().await;
    let config = pipeline(
        vec![vec![agent("dead", dead)]],
        agent("aggregator", aggregator),
        1,
    );
    let options = ServerOptions {
        model_id: "moa".into(),
        api_key: None,
        template: ChatTemplate::chatml(),
    };
    let addr = start_app(pipeline_router(config, options)).await;
    let (status, body) = post(addr, "/v1/chat/completions", "", ask_json(json!({}))).await;
    assert_eq!(status, 500, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("layer 1") && message.contains("dead"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_400_is_passed_on_as_a_400_naming_the_agent() {
    let wide = start_model(EngineOptions::default(), None, 32, 1024).await;
    // A 16-token window: too small for any prompt of this pipeline.
    let narrow = start_model(EngineOptions::default(), None, 32, 16).await;
    let dead = dead_address().await;
    let serve = |layers: Vec<Vec<Agent>>, aggregator: Agent| {
        let options = ServerOptions {
            model_id: "moa".into(),
            api_key: None,
            template: ChatTemplate::chatml(),
        };
        start_app(pipeline_router(pipeline(layers, aggregator, 1), options))
    };
    let question =
        json!({"model": "m", "messages": [{"role": "user", "content": "What is a king?"}]});
    let cases = [
        // The aggregator refuses the references the proposers wrote.
        (
            serve(vec![vec![agent("a", wide)]], agent("judge", narrow)).await,
            "the aggregator `judge` refused the request",
        ),
        // Every proposer refuses the question.
        (
            serve(vec![vec![agent("small", narrow)]], agent("judge", wide)).await,
            "proposer `small` refused the request",
        ),
    ];
    for (addr, blamed) in cases {
        let (status, body) = post(addr, "/v1/chat/completions", "", question.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(blamed) && message.contains("maximum context length is 16"),
            "{message}"
        );
        // Streamed, the refusal is the stream's error event.
        let mut streamed = question.clone();
        streamed["stream"] = json!(true);
        let text = reqwest::Client::new()
            .post(format!("http://{addr}/v1/chat/completions"))
            .json(&streamed)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            text.contains("context_length_exceeded") && text.contains(blamed),
            "{text}"
        );
    }
    // A refusal beside an agent that is down is the pipeline's failure, not the request's.
    let addr = serve(
        vec![vec![agent("small", narrow), agent("dead", dead)]],
        agent("judge", wide),
    )
    .await;
    let (status, body) = post(addr, "/v1/chat/completions", "", question).await;
    assert_eq!(status, 500, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("proposer `small` refused") && message.contains("proposer `dead` failed"),
        "{message}"
    );
}

#[test]
fn pipeline_files_are_checked_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moa.toml");
    let write_and_load = |text: &str| {
        std::fs::write(&path, text).unwrap();
        MoaConfig::load(&path).map_err(|e| format!("{e:#}"))
    };
    let good = r#"
min_references = 1
[[layers]]
proposers = [{ url = "http://127.0.0.1:8081/v1", model = "a" }, { url = "http://127.0.0.1:8082/v1", model = "b" }]
[aggregator]
url = "http://127.0.0.1:8083/v1"
model = "c"
"#;
    let config = write_and_load(good).unwrap();
    assert_eq!(config.layers[0].proposers.len(), 2);
    assert_eq!(config.aggregate_prompt, moa::AGGREGATE_PROMPT);
    for (bad, expected) in [
        (
            good.replace("min_references = 1", "min_references = 3"),
            "min_references",
        ),
        (good.replace("http://127.0.0.1:8083/v1", "ftp://x"), "`url`"),
        (
            good.replace("min_references = 1", "min_reference = 1"),
            "min_reference",
        ),
        (
            good.replace(
                "model = \"c\"",
                "model = \"c\"\napi_key_env = \"MOE_TEST_UNSET_KEY\"",
            ),
            "MOE_TEST_UNSET_KEY",
        ),
    ] {
        let err = write_and_load(&bad).unwrap_err();
        assert!(err.contains(expected), "{expected}: {err}");
    }
}
