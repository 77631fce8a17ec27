//! Throughput benchmarks measured the way the PyTorch reference script measures them:
//! random token ids of the configured shapes, a few untimed warm-up steps, then the mean
//! over timed steps. Training steps are the trainer's own (forward, backward, clipping,
//! AdamW, bias balancing); generation is greedy decoding with a KV cache, of one answer
//! or of a batch decoded together as the server does.

use std::time::Instant;

use anyhow::{Result, ensure};
use burn::data::dataloader::batcher::Batcher;
use burn::module::Module;
use burn::optim::Optimizer;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Tensor};
use moe_data::{LmBatch, LmBatcher};
use moe_model::FeedForward;
use moe_model::{
    MoeAutodiffBackend, MoeBackend, SamplingConfig, Sequence, Transformer, decode_step, ops,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::config::RunConfig;
use crate::grad_clip::clip_global_norm;
use crate::learner::forward_backward;
use crate::optimizer::FusedAdamW;

/// Parameter counts that set a model's compute per token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParamCounts {
    /// Every parameter.
    pub total: usize,
    /// Parameters a token's matmuls use: all but the embedding table (a lookup) and the
    /// experts a token is not routed to (`(E - k) / E` of each MoE layer's experts).
    pub active: usize,
}

impl ParamCounts {
    /// Counts `model`'s parameters.
    pub fn of<B: Backend>(model: &Transformer<B>) -> Self {
        let total = model.num_params();
        let moe = model.moe_config();
        let idle_share = (moe.n_experts - moe.top_k) as f64 / moe.n_experts as f64;
        let idle: usize = model
            .blocks
            .iter()
            .map(|block| match &block.ffn {
                FeedForward::Moe(layer) => {
                    (layer.experts.num_params() as f64 * idle_share).round() as usize
                }
                FeedForward::Dense(_) => 0,
            })
            .sum();
        // A tied embedding is also the output projection: its matmul stays counted.
        let lookup = if model.model_config().tie_embeddings {
            0
        } else {
            model.embed.num_params()
        };
        Self {
            total,
            active: total - idle - lookup,
        }
    }
}

/// Training FLOPs per token: 6 per active parameter (forward 2, backward 4) plus
/// attention's scores and weighted sum, 12 * layers * d_model * sequence length (the
/// PaLM paper's estimate, which counts the causal half that is masked too).
pub fn train_flops_per_token(config: &RunConfig, params: ParamCounts) -> f64 {
    let model = &config.model;
    6.0 * params.active as f64
        + 12.0 * (model.n_layers * model.d_model * config.data.seq_len) as f64
}

/// Uniformly random token ids of a config's vocabulary, seeded by its `train.seed`: the
/// benchmarks' input (speed depends on the shapes, not on the text).
struct RandomTokens {
    rng: StdRng,
    vocab: u32,
}

impl RandomTokens {
    fn new(config: &RunConfig) -> Self {
        Self {
            rng: StdRng::seed_from_u64(config.train.seed),
            vocab: config.model.vocab_size as u32,
        }
    }

    /// The next `n` ids.
    fn take(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| self.rng.random_range(0..self.vocab))
            .collect()
    }
}

/// What `bench_train` measured.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Parameter counts.
    pub params: ParamCounts,
    /// Mean milliseconds per step.
    pub ms_per_step: f64,
    /// Training tokens per second.
    pub tokens_per_sec: f64,
    /// Achieved training FLOP/s (see [`train_flops_per_token`]), in GFLOP/s.
    pub gflops: f64,
}

impl TrainBench {
    /// Model FLOPs utilisation against a peak rate in GFLOP/s.
    pub fn mfu(&self, peak_gflops: f64) -> f64 {
        self.gflops / peak_gflops
    }
}

/// Times `steps` training steps of `config`'s model after `warmup` untimed ones, on
/// random token ids (`train.batch_size` sequences of `data.seq_len`, one micro-batch per
/// step). The learning rate is the config's peak rate.
pub fn bench_train<B: MoeAutodiffBackend>(
    config: &RunConfig,
    warmup: usize,
    steps: usize,
    device: &B::Device,
) -> Result<TrainBench> {
    ensure!(steps > 0, "the benchmark needs at least one timed step");
    ops::run_compute::<B, _>(|| time_train_steps::<B>(config, warmup, steps, device))
}

/// [`bench_train`] after its checks, on the backend's compute thread.
fn time_train_steps<B: MoeAutodiffBackend>(
    config: &RunConfig,
    warmup: usize,
    steps: usize,
    device: &B::Device,
) -> Result<TrainBench> {
    let train = &config.train;
    let (batch_size, seq_len) = (train.batch_size, config.data.seq_len);
    B::seed(device, train.seed);
    let mut model = Transformer::<B>::new(&config.model, &config.moe, device)?;
    let params = ParamCounts::of(&model);
    let mut optimizer = FusedAdamW::new(train).init::<B>();
    let mut tokens = RandomTokens::new(config);
    let mut timed = 0.0;
    for step in 0..warmup + steps {
        let windows: Vec<Vec<u32>> = (0..batch_size).map(|_| tokens.take(seq_len + 1)).collect();
        let batch: LmBatch<B> = LmBatcher.batch(windows, device);
        let start = Instant::now();
        let out = forward_backward(&model, batch, 1.0, device);
        let mut grads = out.grads;
        clip_global_norm(&model, &mut grads, train.grad_clip, device);
        model = optimizer.step(train.lr, model, grads);
        let counts = out.moe.iter().map(|l| l.stats.counts.clone()).collect();
        model = model.update_expert_bias(counts);
        // Reading the loss waits for the step's work, as the trainer's logging does.
        let loss = out.ce.into_scalar().elem::<f64>();
        ensure!(loss.is_finite(), "the loss became {loss} at step {step}");
        if step >= warmup {
            timed += start.elapsed().as_secs_f64();
        }
    }
    let ms_per_step = 1e3 * timed / steps as f64;
    let tokens_per_sec = (batch_size * seq_len * steps) as f64 / timed;
    Ok(TrainBench {
        batch_size,
        seq_len,
        steps,
        params,
        ms_per_step,
        tokens_per_sec,
        gflops: train_flops_per_token(config, params) * tokens_per_sec / 1e9,
    })
}

/// The shape of a generation benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GenerateShape {
    /// Prompt tokens of each answer.
    pub prompt_len: usize,
    /// Tokens generated for each answer.
    pub tokens: usize,
    /// Answers decoded together, one token each per step (1: plain batch-1 generation).
    pub batch: usize,
    /// Timed rounds; the figures are their medians.
    pub rounds: usize,
}

/// What `bench_generate` measured (medians over the rounds).
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBench {
    /// What was measured.
    pub shape: GenerateShape,
    /// Generated tokens per second over all answers, prompt processing included (the
    /// reference's figure): the median round.
    pub tokens_per_sec: f64,
    /// Every round's tokens/s, in order.
    pub rounds_tokens_per_sec: Vec<f64>,
    /// Milliseconds from the start to the first generated tokens (reading the prompts).
    pub first_token_ms: f64,
    /// Milliseconds per decoding step after the first (one new token for each answer).
    pub ms_per_step: f64,
}

/// Times greedy generation of `shape.tokens` tokens after random prompts of
/// `shape.prompt_len` tokens, `shape.batch` answers decoded together, with `config`'s
/// model at its random initialisation (the speed depends on the shapes, not the
/// weights), after one short untimed generation.
pub fn bench_generate<B: MoeBackend>(
    config: &RunConfig,
    shape: GenerateShape,
    device: &B::Device,
) -> Result<GenerateBench> {
    ensure!(
        shape.tokens > 1,
        "the benchmark needs at least 2 generated tokens"
    );
    ensure!(shape.batch > 0, "the benchmark needs a batch of at least 1");
    ensure!(shape.rounds > 0, "the benchmark needs at least 1 round");
    ensure!(
        shape.prompt_len + shape.tokens <= config.model.max_seq_len,
        "prompt ({}) plus generated tokens ({}) exceed the model's window \
         (model.max_seq_len = {})",
        shape.prompt_len,
        shape.tokens,
        config.model.max_seq_len
    );
    ops::run_compute::<B, _>(|| time_generation::<B>(config, shape, device))
}

/// [`bench_generate`] after its checks, on the backend's compute thread.
fn time_generation<B: MoeBackend>(
    config: &RunConfig,
    shape: GenerateShape,
    device: &B::Device,
) -> Result<GenerateBench> {
    B::seed(device, config.train.seed);
    let model = Transformer::<B>::new(&config.model, &config.moe, device)?;
    let mut random = RandomTokens::new(config);
    let prompts: Vec<Vec<u32>> = (0..shape.batch)
        .map(|_| random.take(shape.prompt_len))
        .collect();
    let greedy = SamplingConfig {
        temperature: 0.0,
        ..SamplingConfig::default()
    };
    // Seconds to the first step's end and to the last's, and the tokens generated.
    let run = |max_tokens: usize| {
        let mut answers: Vec<Sequence<B>> = prompts
            .iter()
            .map(|prompt| Sequence::new(&model, prompt, max_tokens, &[], greedy.clone()))
            .collect();
        let start = Instant::now();
        let mut first = None;
        while answers.iter().any(|answer| !answer.is_finished()) {
            let mut step: Vec<&mut Sequence<B>> = answers.iter_mut().collect();
            decode_step(&model, &mut step, device);
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
        }
        let generated: usize = answers.iter().map(|answer| answer.tokens().len()).sum();
        (
            first.unwrap_or(0.0),
            start.elapsed().as_secs_f64(),
            generated,
        )
    };
    run(8.min(shape.tokens));
    let mut rounds = Vec::with_capacity(shape.rounds);
    for _ in 0..shape.rounds {
        let (first, total, generated) = run(shape.tokens);
        ensure!(
            generated == shape.batch * shape.tokens,
            "generation stopped after {generated} of {} tokens",
            shape.batch * shape.tokens
        );
        rounds.push((first, total));
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let generated = (shape.batch * shape.tokens) as f64;
    let rounds_tokens_per_sec: Vec<f64> = rounds.iter().map(|(_, t)| generated / t).collect();
    Ok(GenerateBench {
        shape,
        tokens_per_sec: median(rounds_tokens_per_sec.clone()),
        rounds_tokens_per_sec,
        first_token_ms: 1e3 * median(rounds.iter().map(|(f, _)| *f).collect()),
        ms_per_step: 1e3
            * median(
                rounds
                    .iter()
                    .map(|(f, t)| (t - f) / (shape.tokens - 1) as f64)
                    .collect(),
            ),
    })
}

/// The best fp32 matmul rate of backend `B` over square sizes 256 to 1024, in GFLOP/s:
/// the peak that MFU is measured against, on the same machine and backend.
pub fn peak_matmul_gflops<B: Backend>(device: &B::Device) -> f64 {
    [256, 512, 1024]
        .into_iter()
        .map(|n| {
            let a = Tensor::<B, 2>::random([n, n], Distribution::Default, device);
            let b = Tensor::<B, 2>::random([n, n], Distribution::Default, device);
            let sync = |t: Tensor<B, 2>| t.sum().into_scalar().elem::<f64>();
            sync(a.clone().matmul(b.clone()));
            let reps = (2usize << 30) / (n * n * n) + 1;
            let start = Instant::now();
            for _ in 0..reps {
                sync(a.clone().matmul(b.clone()));
            }
            2.0 * (n * n * n * reps) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}
