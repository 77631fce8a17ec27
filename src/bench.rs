//! `moe bench train|generate`: training and generation throughput of a config's shapes,
//! measured like the PyTorch reference script so the two can be compared side by side.

use std::path::PathBuf;

use anyhow::Result;
use moe_model::MoeAutodiffBackend;
use moe_train::RunConfig;
use moe_train::bench::{GenerateShape, bench_generate, bench_train, peak_matmul_gflops};

use crate::backend::{BackendJob, BackendKind};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchKind,
}

#[derive(clap::Subcommand, Debug)]
enum BenchKind {
    /// Training tokens/s (forward, backward, clipping, AdamW), ms/step and MFU.
    Train(TrainBenchArgs),
    /// Greedy generation tokens/s with a KV cache (batch 1, or a batch decoded together).
    Generate(GenerateBenchArgs),
}

/// The config and backend a benchmark runs with.
#[derive(clap::Args, Debug)]
struct Shapes {
    /// Run config (TOML) whose model shapes are measured.
    #[arg(long, default_value = "configs/tiny.toml")]
    config: PathBuf,
    /// Override a config value: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendKind,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

impl Shapes {
    fn load(&self, more: &[String]) -> Result<RunConfig> {
        let overrides: Vec<String> = self.overrides.iter().chain(more).cloned().collect();
        RunConfig::load(&self.config, &overrides)
    }
}

#[derive(clap::Args, Debug)]
struct TrainBenchArgs {
    #[command(flatten)]
    shapes: Shapes,
    /// Sequences per step [default: 16, the reference script's batch].
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
}

#[derive(clap::Args, Debug)]
struct GenerateBenchArgs {
    #[command(flatten)]
    shapes: Shapes,
    /// Prompt tokens.
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// Tokens to generate for each answer.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Answers decoded together, one token each per step, as `moe serve` batches clients.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed rounds; the median is reported, with every round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

impl BenchArgs {
    /// The backend the benchmark runs on.
    pub fn backend(&self) -> BackendKind {
        match &self.what {
            BenchKind::Train(args) => args.shapes.backend,
            BenchKind::Generate(args) => args.shapes.backend,
        }
    }
}

impl BackendJob for BenchArgs {
    type Output = ();

    fn run<B: MoeAutodiffBackend>(self, device: B::Device) -> Result<()> {
        let backend = self.backend().name();
        match self.what {
            BenchKind::Train(args) => {
                anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
                let config = args
                    .shapes
                    .load(&[format!("train.batch_size={}", args.batch)])?;
                let result = bench_train::<B>(&config, args.warmup, args.steps, &device)?;
                let peak = peak_matmul_gflops::<B::InnerBackend>(&device);
                let mfu = result.mfu(peak);
                if args.shapes.json {
                    let json = serde_json::json!({
                        "bench": "train",
                        "backend": backend,
                        "result": result,
                        "peak_matmul_gflops": peak,
                        "mfu": mfu,
                    });
                    println!("{json}");
                } else {
                    println!(
                        "train {backend}: {:.0} tokens/s, {:.1} ms/step (batch {} x {} tokens, \
                         {} timed steps)",
                        result.tokens_per_sec,
                        result.ms_per_step,
                        result.batch_size,
                        result.seq_len,
                        result.steps
                    );
                    println!(
                        "params {:.2}M ({:.2}M active per token); {:.1} GFLOP/s of model \
                         FLOPs, MFU {:.1}% of the {peak:.0} GFLOP/s peak fp32 matmul measured \
                         on {backend}",
                        result.params.total as f64 / 1e6,
                        result.params.active as f64 / 1e6,
                        result.gflops,
                        100.0 * mfu
                    );
                }
            }
            BenchKind::Generate(args) => {
                let config = args.shapes.load(&[])?;
                let shape = GenerateShape {
                    prompt_len: args.prompt_len,
                    tokens: args.tokens,
                    batch: args.batch,
                    rounds: args.rounds,
                };
                let result = bench_generate::<B::InnerBackend>(&config, shape, &device)?;
                if args.shapes.json {
                    let json = serde_json::json!({
                        "bench": "generate",
                        "backend": backend,
                        "result": result,
                    });
                    println!("{json}");
                } else {
                    let rounds: Vec<String> = result
                        .rounds_tokens_per_sec
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect();
                    println!(
                        "generate {backend}: {:.1} tokens/s (batch {}: {} tokens each after a \
                         {}-token prompt, greedy; median of rounds {}); first step {:.1} ms, \
                         then {:.3} ms/step",
                        result.tokens_per_sec,
                        shape.batch,
                        shape.tokens,
                        shape.prompt_len,
                        rounds.join(", "),
                        result.first_token_ms,
                        result.ms_per_step
                    );
                }
            }
        }
        Ok(())
    }
}
