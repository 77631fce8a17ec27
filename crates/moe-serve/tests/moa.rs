//! Mixture-of-Agents pipelines over real `moe` servers on 127.0.0.1: two proposers and an
//! aggregator produce an answer; a dead proposer or one whose window is too small is
//! dropped and the pipeline still answers; too few references is an error naming them.

mod common;

use std::net::SocketAddr;

use common::{start, start_model};
use moe_serve::EngineOptions;
use moe_serve::moa::{self, Agent, Layer, MoaConfig};

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
    let outcome = moa::run(&config, "What is a king?", |text| streamed.push_str(text)).await;
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
    let outcome = moa::run(&config, "What is a king?", |_| {}).await;
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
    let outcome = moa::run(&config, "Hi", |_| {}).await;
    let err = outcome.answer.unwrap_err().to_string();
    assert!(err.contains("layer 1") && err.contains("dead"), "{err}");
    assert!(err.contains("refused"), "the cause is named: {err}");
    // The calls made are still on record; the aggregator was never called.
    let agents: Vec<&str> = outcome.calls.iter().map(|c| c.agent.as_str()).collect();
    assert_eq!(agents, ["small", "dead"]);
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
