//! The throughput benchmarks: parameter and FLOP counts against hand-computed values, and
//! the benchmarks themselves on a small model (their figures are not asserted, only that
//! they are measured and consistent).

use burn::backend::{Autodiff, Flex};
use moe_model::Transformer;
use moe_train::RunConfig;
use moe_train::bench::{
    GenerateShape, ParamCounts, bench_generate, bench_train, peak_matmul_gflops,
    train_flops_per_token,
};

type B = Autodiff<Flex>;

/// One dense layer, then one MoE layer of 4 experts (top-1, FFN 8) and a shared expert.
fn config(tied: bool) -> RunConfig {
    let dataset = concat!(env!("CARGO_MANIFEST_DIR"), "/../../datasets/shakespeare");
    let text = format!(
        r#"
[model]
vocab_size = 256
d_model = 16
n_layers = 2
n_heads = 2
max_seq_len = 24
n_dense_layers = 1
dense_ffn_dim = 32
tie_embeddings = {tied}

[moe]
n_experts = 4
top_k = 1
expert_ffn_dim = 8
n_shared_experts = 1

[data]
dataset = "{dataset}"
tokenizer = "byte"
seq_len = 16

[train]
batch_size = 2
steps = 10
lr = 3e-3
warmup_steps = 0
"#
    );
    RunConfig::parse(&text, &[]).unwrap()
}

#[test]
fn active_parameters_leave_out_idle_experts_and_the_lookup_table() {
    for tied in [false, true] {
        let config = config(tied);
        let model = Transformer::<B>::new(&config.model, &config.moe, &Default::default()).unwrap();
        let params = ParamCounts::of(&model);
        // The MoE layer's experts: gate, up and down projections of 16 x 8 each; a token
        // uses 1 of the 4.
        let idle = 4 * 3 * 16 * 8 * 3 / 4;
        let lookup = if tied { 0 } else { 256 * 16 };
        assert_eq!(params.active, params.total - idle - lookup, "tied {tied}");
        let flops = train_flops_per_token(&config, params);
        assert_eq!(
            flops,
            6.0 * params.active as f64 + 12.0 * (2 * 16 * 16) as f64
        );
    }
}

#[test]
fn training_benchmark_times_real_steps() {
    let config = config(false);
    let device = Default::default();
    let result = bench_train::<B>(&config, 1, 3, &device).unwrap();
    assert_eq!(
        (result.batch_size, result.seq_len, result.steps),
        (2, 16, 3)
    );
    assert!(
        result.tokens_per_sec > 0.0 && result.ms_per_step > 0.0,
        "{result:?}"
    );
    let tokens_per_sec = 2.0 * 16.0 * 1e3 / result.ms_per_step;
    assert!((result.tokens_per_sec / tokens_per_sec - 1.0).abs() < 1e-9);
    let flops = train_flops_per_token(&config, result.params) * result.tokens_per_sec;
    assert!((result.gflops * 1e9 / flops - 1.0).abs() < 1e-9);
    assert!((result.mfu(2.0 * result.gflops) - 0.5).abs() < 1e-12);

    // A learning rate that blows the weights up is reported, not timed.
    let mut diverging = config.clone();
    diverging.train.lr = 1e30;
    diverging.train.grad_clip = 0.0;
    let err = bench_train::<B>(&diverging, 0, 3, &device).unwrap_err();
    assert!(err.to_string().contains("the loss became"), "{err}");
    assert!(bench_train::<B>(&config, 0, 0, &device).is_err());
}

#[test]
fn generation_benchmark_generates_every_token() {
    let config = config(false);
    let device = Default::default();
    let shape = |prompt_len, batch| GenerateShape {
        prompt_len,
        tokens: 12,
        batch,
        rounds: 3,
    };
    for batch in [1, 3] {
        let result = bench_generate::<Flex>(&config, shape(4, batch), &device).unwrap();
        assert_eq!(result.shape, shape(4, batch));
        assert_eq!(result.rounds_tokens_per_sec.len(), 3);
        assert!(
            result
                .rounds_tokens_per_sec
                .contains(&result.tokens_per_sec)
                && result.first_token_ms > 0.0
                && result.ms_per_step > 0.0,
            "{result:?}"
        );
    }
    let err = bench_generate::<Flex>(&config, shape(16, 1), &device).unwrap_err();
    assert!(err.to_string().contains("model.max_seq_len = 24"), "{err}");
    assert!(peak_matmul_gflops::<Flex>(&device) > 0.0);
}
