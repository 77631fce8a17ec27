//! The `moe` binary end to end: train, eval --json, generate, export/import, serve (and
//! its graceful shutdown), and its error messages.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run moe")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that a command failed (exit code 1) with an error naming `what`.
fn assert_fails_naming(out: &Output, what: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    assert!(
        stderr(out).contains(what),
        "expected `{what}` in: {}",
        stderr(out)
    );
}

/// A small config on slices of three shipped works.
fn small_run(dir: &Path) -> String {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/shakespeare");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (name, bytes) in [
        ("hamlet", 40_000),
        ("lear", 40_000),
        ("winters_tale", 6_000),
    ] {
        let text = std::fs::read_to_string(source.join(format!("{name}.txt"))).unwrap();
        std::fs::write(data.join(format!("{name}.txt")), &text[..bytes]).unwrap();
    }
    let config = dir.join("small.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[model]
vocab_size = 512
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 64
n_dense_layers = 1
dense_ffn_dim = 64

[moe]
n_experts = 4
top_k = 2
expert_ffn_dim = 32
n_shared_experts = 1
capacity_factor = 1.25
aux_loss_weight = 0.01
z_loss_weight = 0.001

[data]
dataset = "{}"
validation_works = ["winters_tale"]
seq_len = 32

[train]
batch_size = 4
steps = 12
lr = 3e-3
log_every = 4
eval_every = 6
checkpoint_every = 6
"#,
            data.display()
        ),
    )
    .unwrap();
    config.display().to_string()
}

#[test]
fn train_then_eval_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let run = dir.path().join("run");
    let run_str = run.display().to_string();
    let out = moe(&["train", "--config", &config, "--out", &run_str]);
    assert!(out.status.success(), "train failed: {}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("step     12/12"), "{log}");
    assert!(log.contains("bpb"), "{log}");

    let out = moe(&["eval", "--checkpoint", &run_str, "--json"]);
    assert!(out.status.success(), "eval failed: {}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["val_loss", "bpb", "perplexity", "expert_load"] {
        assert!(json.get(key).is_some(), "eval --json lacks {key}: {json}");
    }
    let loads = json["expert_load"].as_array().unwrap();
    assert_eq!(loads.len(), 1, "one MoE layer (the first is dense)");
    let total: f64 = loads[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-6, "loads sum to 1: {total}");

    let checkpoint = run.join("checkpoints/step-00000006").display().to_string();
    let out = moe(&[
        "generate",
        "--checkpoint",
        &checkpoint,
        "--prompt",
        "HAMLET:",
        "--max-tokens",
        "12",
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "generate failed: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HAMLET:") && text.trim_end().len() > "HAMLET:".len(),
        "{text}"
    );
    // Greedy generation is deterministic.
    let greedy = |_: ()| {
        moe(&[
            "generate",
            "--checkpoint",
            &run_str,
            "--prompt",
            "The",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ])
        .stdout
    };
    assert_eq!(greedy(()), greedy(()));

    let out = moe(&["train", "--config", &config, "--out", &run_str]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));
    // --resume without --config continues with the run's own config, from anywhere.
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["train", "--resume", "--out", &run_str, "--steps", "14"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "resume failed: {}", stderr(&out));
    assert!(stderr(&out).contains("step     14/14"), "{}", stderr(&out));

    // Export: Mixtral cannot hold the dense first layer; our safetensors format can, and
    // importing it back evaluates to the same loss.
    let hf = dir.path().join("hf").display().to_string();
    let out = moe(&[
        "export",
        "--checkpoint",
        &run_str,
        "--format",
        "hf",
        "--out",
        &hf,
    ]);
    assert_fails_naming(&out, "dense FFN layers");
    let exported = dir.path().join("exported").display().to_string();
    let out = moe(&[
        "export",
        "--checkpoint",
        &run_str,
        "--format",
        "safetensors",
        "--out",
        &exported,
    ]);
    assert!(out.status.success(), "export failed: {}", stderr(&out));
    let back = dir.path().join("back").display().to_string();
    let out = moe(&["import", "--from", &exported, "--out", &back]);
    assert!(out.status.success(), "import failed: {}", stderr(&out));
    let val_loss = |checkpoint: &str| {
        let out = moe(&[
            "eval",
            "--checkpoint",
            checkpoint,
            "--json",
            "--batches",
            "2",
        ]);
        assert!(out.status.success(), "eval failed: {}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["val_loss"].clone()
    };
    assert_eq!(val_loss(&run_str), val_loss(&back));
    let out = moe(&["import", "--from", &exported, "--out", &back]);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    serve_then_terminate(&run_str);
}

/// `moe serve` on an ephemeral port streams a completion; SIGTERM lets the answer in
/// flight finish, then the server exits cleanly and stops listening.
fn serve_then_terminate(checkpoint: &str) {
    let mut server = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["serve", "--checkpoint", checkpoint, "--port", "0"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("run moe serve");
    let mut log = BufReader::new(server.stderr.take().unwrap()).lines();
    let addr = log
        .by_ref()
        .map(|line| line.unwrap())
        .find_map(|line| {
            Some(
                line.split("http://")
                    .nth(1)?
                    .trim_end_matches("/v1")
                    .to_string(),
            )
        })
        .expect("the server announces its address");
    let mut stream = TcpStream::connect(&addr).unwrap();
    let body = r#"{"model":"m","prompt":"The","max_tokens":40,"temperature":0,"stream":true}"#;
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read up to the first event: the answer is being generated.
    let mut response = BufReader::new(stream);
    let mut head = String::new();
    while !head.contains("data: ") {
        let read = response.read_line(&mut head).unwrap();
        assert!(read > 0, "the connection closed early: {head}");
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let pid = server.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    response.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("data: [DONE]"),
        "the answer in flight finishes: {rest}"
    );
    let status = server.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let log: Vec<String> = log.map(|line| line.unwrap()).collect();
    assert!(log.iter().any(|line| line == "shut down"), "{log:?}");
    assert!(
        TcpStream::connect(&addr).is_err(),
        "nothing listens any more"
    );
}

#[test]
fn imports_a_transformers_mixtral_without_a_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("mixtral").display().to_string();
    let fixture = "crates/moe-train/tests/fixtures/hf-tiny-mixtral";
    let out = moe(&["import", "--from", fixture, "--out", &checkpoint]);
    assert!(out.status.success(), "import failed: {}", stderr(&out));
    assert!(
        stderr(&out).contains("no tokenizer.json"),
        "{}",
        stderr(&out)
    );
    let out = moe(&["eval", "--checkpoint", &checkpoint]);
    assert_fails_naming(&out, "has no tokenizer.json");
}

#[test]
fn ablate_runs_a_grid_in_parallel_processes_and_skips_finished_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let grid = dir.path().join("grid.toml");
    std::fs::write(
        &grid,
        format!(
            "base = \"{config}\"\nseeds = [7]\nset = {{ train.steps = 4, train.eval_every = 2 }}\n\
             [axes]\nmoe.z_loss_weight = [0.0, 0.001]\n"
        ),
    )
    .unwrap();
    let study = dir.path().join("study").display().to_string();
    let grid = grid.display().to_string();
    let args = ["ablate", "--grid", &grid, "--out", &study, "--jobs", "2"];
    let out = moe(&args);
    assert!(out.status.success(), "ablate failed: {}", stderr(&out));
    let report = std::fs::read_to_string(Path::new(&study).join("report.md")).unwrap();
    for variant in ["z_loss_weight=0", "z_loss_weight=0.001"] {
        assert!(
            report.contains(&format!("| {variant} | 1 | 0 |")),
            "{report}"
        );
        let summary = Path::new(&study).join(variant).join("seed-7/summary.json");
        assert!(summary.is_file(), "{}", summary.display());
    }
    let out = moe(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).matches("skipped").count(),
        2,
        "{}",
        stderr(&out)
    );

    std::fs::write(
        &grid,
        format!("base = \"{config}\"\nseeds = [1]\n[axes]\nmoe.topk = [1]\n"),
    )
    .unwrap();
    let out = moe(&args);
    assert_fails_naming(&out, "topk");
}

#[test]
fn shipped_ablation_grids_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["aux_loss", "z_loss", "capacity", "gating", "top_k"] {
        let path = root.join(format!("configs/ablations/{name}.toml"));
        let grid = moe_train::ablation::Grid::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
        let seeds: std::collections::BTreeSet<u64> = grid.runs.iter().map(|r| r.seed).collect();
        assert!(seeds.len() >= 2, "{name}: at least two seeds");
        assert!(grid.runs.len() >= 4, "{name}: at least two variants");
    }
}

#[test]
fn trains_data_parallel_on_two_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let run = dir.path().join("run");
    let run_str = run.to_str().unwrap();
    let out = moe(&[
        "train",
        "--config",
        &config,
        "--devices",
        "2",
        "--steps",
        "4",
        "--out",
        run_str,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("done: 4 steps"), "{}", stderr(&out));
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(saved.contains("replicas = 2"), "{saved}");
}

#[test]
fn trains_with_experts_on_two_devices() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let run = dir.path().join("run");
    let run_str = run.to_str().unwrap();
    let args = [
        "train", "--config", &config, "--steps", "2", "--out", run_str,
    ];
    let out = moe(&[&args[..], &["--expert-devices", "2"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("experts placed over 2 devices"),
        "{}",
        stderr(&out)
    );
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(saved.contains("expert_devices = 2"), "{saved}");
    // The checkpoint holds the stacked experts: it evaluates on one device.
    let out = moe(&["eval", "--checkpoint", run_str, "--batches", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));

    for (extra, expected) in [
        (&["--expert-devices", "99"][..], "train.expert_devices"),
        (
            &["--expert-devices", "2", "--devices", "2"][..],
            "cannot be used with",
        ),
    ] {
        let out = moe(&[&args[..], extra].concat());
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(expected),
            "{extra:?}: {}",
            stderr(&out)
        );
    }
}

/// A child process killed when dropped (also when a test fails).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The training losses a run logged.
fn logged_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter_map(|record| record.get("loss")?.as_f64())
        .collect()
}

#[test]
fn trains_on_two_machines_through_the_orchestrator() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let port = free_port().to_string();
    let mut orchestrator = Killed(
        Command::new(env!("CARGO_BIN_EXE_moe"))
            .args(["orchestrator", "--port", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run moe orchestrator"),
    );
    let mut log = BufReader::new(orchestrator.0.stderr.take().unwrap()).lines();
    let ready = log.next().unwrap().unwrap();
    assert!(ready.contains("listening"), "{ready}");
    let orchestrator_address = format!("127.0.0.1:{port}");

    // Two nodes of one replica each, as two processes, and the same run on one machine.
    let node = |rank: usize| {
        let out = dir.path().join(format!("node{rank}"));
        let address = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_moe"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["train", "--config", &config, "--steps", "4", "--out"])
            .arg(&out)
            .args(["--nodes", "2", "--node-rank", &rank.to_string()])
            .args([
                "--orchestrator",
                &orchestrator_address,
                "--node-address",
                &address,
            ])
            .args(["--set", "train.peer_timeout_secs=120"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("run moe train");
        (out, child)
    };
    let nodes = [node(0), node(1)];
    let local = dir.path().join("local");
    let out = moe(&[
        "train",
        "--config",
        &config,
        "--steps",
        "4",
        "--devices",
        "2",
        "--out",
        local.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut runs = Vec::new();
    for (run, child) in nodes {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        runs.push(run);
    }
    drop(orchestrator);

    let expected = logged_losses(&local);
    assert_eq!(expected.len(), 1, "steps 4, logged every 4");
    for run in &runs {
        let losses = logged_losses(run);
        assert_eq!(losses.len(), expected.len());
        assert!(
            (losses[0] - expected[0]).abs() < 1e-4,
            "{losses:?} vs {expected:?}"
        );
    }
    let weights = |run: &Path| {
        let loaded = moe_train::load_model::<burn::backend::Flex>(
            run,
            &Default::default(),
            moe_train::NonFinite::Refuse,
        )
        .unwrap();
        moe_train::model_tensors(&loaded.model).unwrap()
    };
    let (a, b) = (weights(&runs[0]), weights(&runs[1]));
    for (name, tensor) in &a {
        assert_eq!(
            tensor.data, b[name].data,
            "{name} differs between the nodes"
        );
    }
}

#[test]
fn errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let out = moe(&[
        "train",
        "--config",
        &config,
        "--set",
        "moe.top_k=9",
        "--out",
        "/tmp/never-written",
    ]);
    assert_fails_naming(&out, "moe.top_k");
    assert!(
        !Path::new("/tmp/never-written").exists(),
        "no work starts on a bad config"
    );

    let out = moe(&["train", "--config", "configs/no-such.toml"]);
    assert!(stderr(&out).contains("no-such.toml"), "{}", stderr(&out));

    let out = moe(&["eval", "--checkpoint", dir.path().to_str().unwrap()]);
    assert_fails_naming(&out, "neither a checkpoint");
    let out = moe(&["eval", "--checkpoint", "x", "--batches", "0"]);
    assert_fails_naming(&out, "--batches must be at least 1");

    // Sizes beyond the machine, or beyond 64 bits, are refused before anything is
    // allocated or created.
    let huge = dir.path().join("huge");
    for (set, expected) in [
        ("model.vocab_size=1000000000", "training needs about"),
        ("model.d_model=4611686018427387904", "model.d_model"),
    ] {
        let out = moe(&[
            "train",
            "--config",
            &config,
            "--set",
            set,
            "--out",
            huge.to_str().unwrap(),
        ]);
        assert_fails_naming(&out, expected);
        assert!(!huge.exists(), "{set}: no run directory left");
    }

    let out = moe(&["train", "--backend", "tpu"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("tpu"), "{}", stderr(&out));

    for (devices, expected) in [
        ("0", "at least 1"),
        ("gpu7", "backend:index"),
        ("tpu:0", "unknown backend `tpu`"),
        ("wgpu:0,wgpu:0", "named twice"),
        ("wgpu:0", "add --backend wgpu"),
        ("flex:0,flex:1", "one device, the CPU"),
    ] {
        let out = moe(&["train", "--config", &config, "--devices", devices]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(expected),
            "{devices}: {}",
            stderr(&out)
        );
    }

    let out = moe(&["generate", "--checkpoint", "x", "--top-p", "0"]);
    assert!(stderr(&out).contains("--top-p"), "{}", stderr(&out));

    let out = moe(&["moa"]);
    assert!(stderr(&out).contains("--prompt"), "{}", stderr(&out));
    let out = moe(&["moa", "serve", "--config", "configs/no-such-moa.toml"]);
    assert_fails_naming(&out, "no-such-moa.toml");
}

/// A second `moe train` on a run directory another one holds is refused at once, naming
/// the holder; a holder killed with SIGKILL leaves no stale lock.
#[test]
fn a_run_directory_has_one_trainer_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let run = dir.path().join("run");
    let run_str = run.display().to_string();
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--config", &config, "--out", &run_str];
        args.extend_from_slice(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let mut first = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(train(&["--steps", "100000"]))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = run.join(".lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::read_to_string(&lock).is_ok_and(|pid| pid.trim() == first.id().to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the first run never locked"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = moe(&train(&["--resume"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_fails_naming(&second, &format!("in use by process {}", first.id()));
    first.kill().unwrap();
    first.wait().unwrap();
    let third = moe(&train(&["--resume", "--steps", "2"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(third.status.success(), "after SIGKILL: {}", stderr(&third));
}

#[test]
fn upcycle_a_dense_run_then_fine_tune_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    let (dense, up, tuned) = (path("dense"), path("up"), path("tuned"));
    let out = moe(&[
        "train",
        "--config",
        &config,
        "--set",
        "model.n_dense_layers=2",
        "--steps",
        "2",
        "--out",
        &dense,
    ]);
    assert!(out.status.success(), "dense train failed: {}", stderr(&out));

    let out = moe(&[
        "upcycle",
        "--from",
        &dense,
        "--experts",
        "4",
        "--top-k",
        "2",
        "--out",
        &up,
    ]);
    assert!(out.status.success(), "upcycle failed: {}", stderr(&out));
    assert!(
        stderr(&out).contains("moe train --init"),
        "{}",
        stderr(&out)
    );
    let huge = path("huge");
    let out = moe(&[
        "upcycle",
        "--from",
        &dense,
        "--experts",
        "100000000",
        "--top-k",
        "2",
        "--out",
        &huge,
    ]);
    assert_fails_naming(&out, "the model needs about");
    assert!(!Path::new(&huge).exists());

    // The checkpoint's own config; --set changes the rest.
    let out = moe(&[
        "train",
        "--init",
        &up,
        "--steps",
        "2",
        "--set",
        "train.lr=1e-3",
        "--out",
        &tuned,
    ]);
    assert!(
        out.status.success(),
        "train --init failed: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("initialised from"),
        "{}",
        stderr(&out)
    );
    let out = moe(&["eval", "--checkpoint", &tuned, "--json", "--batches", "1"]);
    assert!(out.status.success(), "eval failed: {}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["expert_load"].as_array().unwrap().len(), 2, "{json}");

    // A config of another shape, and upcycling a model that is already sparse.
    let out = moe(&[
        "train",
        "--init",
        &up,
        "--config",
        &config,
        "--out",
        &path("x"),
    ]);
    assert_fails_naming(&out, "[model] section differs");
    let out = moe(&[
        "upcycle",
        "--from",
        &tuned,
        "--experts",
        "4",
        "--top-k",
        "2",
        "--out",
        &path("y"),
    ]);
    assert_fails_naming(&out, "already an MoE layer");
}

#[test]
fn bench_reports_training_and_generation_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_run(dir.path());
    let train = moe(&[
        "bench", "train", "--config", &config, "--batch", "2", "--steps", "2", "--warmup", "1",
        "--json",
    ]);
    assert!(train.status.success(), "{}", stderr(&train));
    let json: serde_json::Value = serde_json::from_slice(&train.stdout).unwrap();
    assert_eq!(json["bench"], "train");
    assert_eq!(json["result"]["batch_size"], 2);
    assert_eq!(json["result"]["seq_len"], 32);
    assert!(
        json["result"]["tokens_per_sec"].as_f64().unwrap() > 0.0,
        "{json}"
    );
    assert!(json["peak_matmul_gflops"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["mfu"].as_f64().unwrap() > 0.0, "{json}");

    let generate = moe(&[
        "bench",
        "generate",
        "--config",
        &config,
        "--prompt-len",
        "4",
        "--tokens",
        "8",
        "--batch",
        "3",
        "--rounds",
        "2",
    ]);
    assert!(generate.status.success(), "{}", stderr(&generate));
    let text = String::from_utf8_lossy(&generate.stdout);
    assert!(
        text.starts_with("generate flex: ")
            && text.contains("batch 3: 8 tokens each after a 4-token prompt")
            && text.contains("ms/step"),
        "{text}"
    );

    let too_long = moe(&["bench", "generate", "--config", &config, "--tokens", "100"]);
    assert!(!too_long.status.success());
    assert!(
        stderr(&too_long).contains("model.max_seq_len = 64"),
        "{}",
        stderr(&too_long)
    );
}

#[test]
fn data_prepare_from_stdin_and_files_then_inspect_train_and_eval_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/shakespeare");
    let hamlet = std::fs::read_to_string(source.join("hamlet.txt")).unwrap();
    // Scenes as JSON lines on standard input, and two works as text files.
    let lines: String = hamlet[..60_000]
        .split("\n\n")
        .filter(|s| !s.trim().is_empty())
        .map(|s| serde_json::json!({ "content": s }).to_string() + "\n")
        .collect();
    let works = dir.path().join("works");
    std::fs::create_dir(&works).unwrap();
    for name in ["lear", "macbeth"] {
        let text = std::fs::read_to_string(source.join(format!("{name}.txt"))).unwrap();
        std::fs::write(works.join(format!("{name}.txt")), &text[..20_000]).unwrap();
    }
    let prepared = dir.path().join("prepared");
    let mut child = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["data", "prepare", "--input", "-", "--input"])
        .arg(&works)
        .args([
            "--stdin-jsonl",
            "--text-field",
            "content",
            "--vocab-size",
            "300",
        ])
        .args(["--val-fraction", "0.1", "--out"])
        .arg(&prepared)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "prepare failed: {}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(summary.contains("source        -:"), "{summary}");
    assert!(
        !prepared.join("stdin.jsonl").exists(),
        "the spooled input is removed"
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(prepared.join("meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["vocab_size"], 300);
    assert_eq!(meta["sources"][1]["documents"], 2, "two works");

    let prepared_str = prepared.display().to_string();
    let out = moe(&["data", "inspect", &prepared_str]);
    assert!(out.status.success(), "inspect failed: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("300 tokens") && text.contains("val"),
        "{text}"
    );

    let config = small_run(dir.path());
    let run = dir.path().join("run");
    let run_str = run.display().to_string();
    let prepared_setting = format!("data.prepared=\"{prepared_str}\"");
    let out = moe(&[
        "train",
        "--config",
        &config,
        "--out",
        &run_str,
        "--steps",
        "4",
        "--set",
        "data.dataset=\"\"",
        "--set",
        &prepared_setting,
    ]);
    assert!(
        !out.status.success(),
        "dataset and prepared together are refused"
    );
    assert!(stderr(&out).contains("set only one of"), "{}", stderr(&out));
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .lines()
        .filter(|l| !l.starts_with("dataset") && !l.starts_with("validation_works"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&config, text).unwrap();
    let out = moe(&[
        "train",
        "--config",
        &config,
        "--out",
        &run_str,
        "--steps",
        "4",
        "--set",
        &prepared_setting,
    ]);
    assert!(out.status.success(), "train failed: {}", stderr(&out));
    assert!(stderr(&out).contains("(whole split)"), "{}", stderr(&out));

    // Scored on the prepared set named on the command line, and refused on a set made
    // with another tokenizer.
    let out = moe(&[
        "eval",
        "--checkpoint",
        &run_str,
        "--data",
        &prepared_str,
        "--json",
    ]);
    assert!(out.status.success(), "eval failed: {}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["bpb"].as_f64().unwrap() > 0.0, "{json}");
    let other = dir.path().join("bytes");
    let out = moe(&[
        "data",
        "prepare",
        "--input",
        &works.display().to_string(),
        "--byte-tokenizer",
        "--val-docs",
        "1",
        "--out",
        &other.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = moe(&[
        "eval",
        "--checkpoint",
        &run_str,
        "--data",
        &other.display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("another tokenizer"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn data_prepare_chat_names_bad_records_and_misplaced_flags() {
    let dir = tempfile::tempdir().unwrap();
    let good = serde_json::json!({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]});
    let bad = serde_json::json!({"messages": [{"role": "narrator", "content": "..."}]});
    let input = dir.path().join("chats.jsonl");
    std::fs::write(&input, format!("{good}\n{good}\n{bad}\n")).unwrap();
    let input = input.display().to_string();
    let out_dir = dir.path().join("out").display().to_string();
    let prepare = |extra: &[&str]| {
        let mut args = vec!["data", "prepare", "--byte-tokenizer", "--input", &input];
        args.extend_from_slice(&["--out", &out_dir]);
        args.extend_from_slice(extra);
        moe(&args)
    };
    let out = prepare(&["--format", "chat"]);
    assert_fails_naming(&out, "chats.jsonl:3");
    assert_fails_naming(&out, "unknown role `narrator`");
    assert_fails_naming(&prepare(&["--max-tokens", "10"]), "--max-tokens");
    assert!(!dir.path().join("out").exists(), "nothing is left behind");
}
