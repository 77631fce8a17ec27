//! Test servers: a small random byte-level model behind the real router (each test crate
//! uses a subset of these helpers).
#![allow(dead_code)]

use std::net::SocketAddr;

use serde_json::Value;

use burn::backend::Flex;
use moe_data::TextTokenizer;
use moe_model::{Gate, ModelConfig, MoeConfig, Transformer};
use moe_serve::{ChatTemplate, Engine, EngineOptions, ServerOptions, router, serve};

/// A small random model over bytes, `d_model` wide, attending over `window` tokens,
/// served by an engine.
pub fn engine(options: EngineOptions, d_model: usize, window: usize) -> Engine {
    let device = Default::default();
    let model = model(d_model, window);
    Engine::start(model, TextTokenizer::bytes().unwrap(), device, options).unwrap()
}

/// A small random model over bytes, `d_model` wide, attending over `window` tokens.
pub fn model(d_model: usize, window: usize) -> Transformer<Flex> {
    model_over(256, d_model, window)
}

/// A small random model over `vocab` ids, `d_model` wide, attending over `window` tokens.
pub fn model_over(vocab: usize, d_model: usize, window: usize) -> Transformer<Flex> {
    let model = ModelConfig {
        vocab_size: vocab,
        d_model,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        max_seq_len: window,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        dense_ffn_dim: 0,
        n_dense_layers: 0,
        moe_layer_interval: 1,
        init_std: 0.3,
    };
    let moe = MoeConfig {
        n_experts: 4,
        top_k: 2,
        expert_ffn_dim: 32,
        router: Gate::default(),
        jitter: 0.0,
        n_shared_experts: 0,
        capacity_factor: None,
        eval_capacity_factor: None,
        drop_policy: moe_model::DropPolicy::Position,
        aux_loss_weight: 0.0,
        z_loss_weight: 0.0,
        bias_update_rate: 0.0,
    };
    Transformer::<Flex>::new(&model, &moe, &Default::default()).unwrap()
}

/// Serves a fresh engine on an ephemeral port; the server stops with the runtime.
pub async fn start(options: EngineOptions, api_key: Option<&str>) -> SocketAddr {
    start_model(options, api_key, 32, 256).await
}

/// Serves `engine` on an ephemeral port.
pub async fn start_engine(engine: Engine, api_key: Option<&str>) -> SocketAddr {
    let server = ServerOptions {
        model_id: "tiny-moe".into(),
        api_key: api_key.map(str::to_string),
        template: ChatTemplate::chatml(),
    };
    start_app(router(engine, server)).await
}

/// Serves a fresh `engine(options, d_model, window)` on an ephemeral port.
pub async fn start_model(
    options: EngineOptions,
    api_key: Option<&str>,
    d_model: usize,
    window: usize,
) -> SocketAddr {
    start_engine(engine(options, d_model, window), api_key).await
}

/// Serves `app` on an ephemeral port; the server stops with the runtime.
pub async fn start_app(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, app, std::future::pending()));
    addr
}

/// A server on its own runtime and thread, like a separate process: sending on (or
/// dropping) the returned handle kills it, dropping its listener and every open
/// connection at once, mid-answer or not.
pub fn start_killable(
    options: EngineOptions,
    d_model: usize,
    window: usize,
) -> (SocketAddr, std::sync::mpsc::Sender<()>) {
    let (address, address_rx) = std::sync::mpsc::channel();
    let (kill, killed) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let addr = runtime.block_on(start_model(options, None, d_model, window));
        address.send(addr).unwrap();
        let _ = killed.recv();
        // Dropping the runtime cancels the server's tasks and closes their sockets.
        drop(runtime);
    });
    (address_rx.recv().unwrap(), kill)
}

/// `POST`s `body` (JSON text) with `Authorization: Bearer key`: the status, the
/// Retry-After header and the JSON answer (null if it is not JSON).
pub async fn post(
    addr: SocketAddr,
    path: &str,
    key: &str,
    body: &str,
) -> (u16, Option<String>, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, retry, body)
}
