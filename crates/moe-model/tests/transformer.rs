//! The whole decoder: causality, KV-cache decoding equal to a full forward pass, grouped
//! query attention, tied embeddings, dense layers and generation.

mod common;

use std::ops::ControlFlow;

use burn::backend::Flex;
use burn::module::Module;
use burn::tensor::{Int, Tensor};
use common::*;

use moe_model::LOSS_BLOCK_LOGITS;
use moe_model::{
    FinishReason, Generation, KvCache, ModelConfig, SamplingConfig, Sequence, Transformer,
    decode_step, generate,
};

type B = Flex;

fn tokens(ids: &[i64]) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::from_ints(ids, &Default::default()).reshape([1, ids.len()])
}

fn config() -> ModelConfig {
    ModelConfig {
        n_kv_heads: Some(2),
        n_dense_layers: 1,
        dense_ffn_dim: 24,
        ..model_config(50, 16, 3, 4)
    }
}

#[test]
fn later_tokens_do_not_change_earlier_logits() {
    let device = Default::default();
    let model = Transformer::<B>::new(&config(), &moe_config(4, 2, 8), &device).unwrap();
    let a = host(
        model
            .forward(tokens(&[1, 2, 3, 4, 5]))
            .logits
            .slice([0..1, 0..3, 0..50]),
    );
    let b = host(
        model
            .forward(tokens(&[1, 2, 3, 9, 7]))
            .logits
            .slice([0..1, 0..3, 0..50]),
    );
    assert_close(&a, &b, 1e-5, "prefix logits");
    let c = host(
        model
            .forward(tokens(&[1, 2, 8, 4, 5]))
            .logits
            .slice([0..1, 0..3, 0..50]),
    );
    assert!(
        a.iter().zip(&c).any(|(x, y)| (x - y).abs() > 1e-4),
        "the changed token matters"
    );
}

#[test]
fn blockwise_token_nll_equals_cross_entropy_of_the_full_logits() {
    // 10 x 60 rows of 8192 ids: blocks of 256 rows, the last one partial; with a head of
    // its own and one tied to the embedding.
    let vocab = 8192;
    assert_eq!(LOSS_BLOCK_LOGITS / vocab, 256);
    let device = Default::default();
    for tie in [false, true] {
        let model_config = ModelConfig {
            tie_embeddings: tie,
            ..model_config(vocab, 16, 1, 2)
        };
        let model = Transformer::<B>::new(&model_config, &moe_config(4, 2, 8), &device).unwrap();
        let ids: Vec<i64> = (0..601).map(|i| (i * 37 % vocab) as i64).collect();
        let inputs = Tensor::<B, 1, Int>::from_ints(&ids[..600], &device).reshape([10, 60]);
        let targets = Tensor::<B, 1, Int>::from_ints(&ids[1..], &device)
            .narrow(0, 0, 600)
            .reshape([600, 1]);
        let (nll, moe) = model.token_nll(inputs.clone(), targets.clone().reshape([10, 60]));
        let logits = model.forward(inputs).logits.reshape([600, vocab]);
        let expected = burn::tensor::activation::log_softmax(logits, 1)
            .gather(1, targets)
            .neg();
        assert_eq!(moe.len(), 1);
        assert_close(&host(nll), &host(expected), 1e-5, "token nll");
    }
}

#[test]
fn cached_decoding_matches_the_full_forward() {
    let device = Default::default();
    for tie in [false, true] {
        let model_config = ModelConfig {
            tie_embeddings: tie,
            max_seq_len: 128,
            ..config()
        };
        let model = Transformer::<B>::new(&model_config, &moe_config(4, 2, 8), &device).unwrap();
        // Past the cache's first capacity (64 positions), so that it grows once.
        let ids: Vec<i64> = (0..70).map(|i| (i * 7 + 3) % 50).collect();
        let full = host(model.forward(tokens(&ids)).logits);
        let mut cache = KvCache::new(3);
        let mut stepwise = host(
            model
                .forward_cached(tokens(&ids[..3]), Some(&mut cache))
                .logits,
        );
        for &id in &ids[3..] {
            stepwise.extend(host(
                model.forward_cached(tokens(&[id]), Some(&mut cache)).logits,
            ));
        }
        assert_eq!(cache.len(), ids.len());
        assert_close(&stepwise, &full, 1e-4, "cached vs full logits");
    }
}

#[test]
fn packed_forward_equals_each_sequence_alone() {
    let device = Default::default();
    let model = Transformer::<B>::new(&config(), &moe_config(4, 2, 8), &device).unwrap();
    let (a, b) = ([3u32, 14, 15, 9], [2u32, 6]);
    let (mut cache_a, mut cache_b) = (KvCache::new(3), KvCache::new(3));
    // b already has two positions cached; a starts empty.
    model.forward_cached(tokens(&[7, 7]), Some(&mut cache_b));
    let packed = host(model.forward_packed(&[&a, &b], &mut [&mut cache_a, &mut cache_b], &device));
    assert_eq!((cache_a.len(), cache_b.len()), (4, 4));
    let last = |ids: &[i64]| {
        let logits = model.forward(tokens(ids)).logits;
        host(logits.slice([0..1, ids.len() - 1..ids.len(), 0..50]))
    };
    let mut alone = last(&[3, 14, 15, 9]);
    alone.extend(last(&[7, 7, 2, 6]));
    assert_close(&packed, &alone, 1e-5, "packed vs alone");
}

#[test]
fn batched_decoding_equals_generating_each_answer_alone() {
    let device = Default::default();
    let model_config = ModelConfig {
        max_seq_len: 16,
        ..config()
    };
    let model = Transformer::<B>::new(&model_config, &moe_config(4, 2, 8), &device).unwrap();
    let prompts: [&[u32]; 4] = [&[1, 2, 3], &[7], &[4, 5, 6, 7, 8, 9, 10, 11, 12, 13], &[]];
    let sampling = |i: usize| SamplingConfig {
        temperature: if i == 0 { 0.0 } else { 0.9 },
        seed: i as u64,
        ..Default::default()
    };
    let max_tokens = |i: usize| 3 + 2 * i;
    let alone: Vec<Generation> = (0..prompts.len())
        .map(|i| {
            let go_on = |_| ControlFlow::Continue(());
            generate(
                &model,
                prompts[i],
                max_tokens(i),
                &[],
                sampling(i),
                go_on,
                &device,
            )
        })
        .collect();
    // One sequence joins per step while the others are mid-answer; finished ones stay in
    // the batch and are skipped.
    let mut sequences: Vec<Sequence<B>> = Vec::new();
    let mut produced = vec![Vec::new(); prompts.len()];
    while sequences.len() < prompts.len() || sequences.iter().any(|s| !s.is_finished()) {
        if let Some(&prompt) = prompts.get(sequences.len()) {
            let i = sequences.len();
            sequences.push(Sequence::new(
                &model,
                prompt,
                max_tokens(i),
                &[],
                sampling(i),
            ));
        }
        let mut batch: Vec<&mut Sequence<B>> = sequences.iter_mut().collect();
        for (i, token) in decode_step(&model, &mut batch, &device)
            .into_iter()
            .enumerate()
        {
            produced[i].extend(token);
        }
    }
    assert_eq!(
        alone[2].finish_reason,
        FinishReason::Length,
        "the long prompt fills the window"
    );
    for (i, (sequence, alone)) in sequences.into_iter().zip(alone).enumerate() {
        assert_eq!(produced[i], alone.tokens, "streamed tokens of sequence {i}");
        assert_eq!(sequence.into_generation(), alone, "sequence {i}");
    }
}

#[test]
fn dense_layers_and_router_losses_are_wired() {
    let device = Default::default();
    let model = Transformer::<B>::new(&config(), &moe_config(4, 2, 8), &device).unwrap();
    let out = model.forward(tokens(&[1, 2, 3, 4]));
    assert_eq!(out.logits.dims(), [1, 4, 50]);
    assert_eq!(out.moe.len(), 2, "layer 0 is dense, layers 1 and 2 are MoE");
    let expected: f64 = out
        .moe
        .iter()
        .map(|o| 0.01 * host(o.balance_loss.clone())[0] + 0.001 * host(o.z_loss.clone())[0])
        .sum();
    let got = host(model.router_loss(&out.moe, &device))[0];
    assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
}

#[test]
fn invalid_configs_are_rejected_by_name() {
    let device: burn::tensor::Device<B> = Default::default();
    let bad = ModelConfig {
        d_model: 18,
        ..config()
    };
    let err = Transformer::<B>::new(&bad, &moe_config(4, 2, 8), &device).unwrap_err();
    assert_eq!(err.field, "model.d_model");
    let err = Transformer::<B>::new(&config(), &moe_config(4, 5, 8), &device).unwrap_err();
    assert_eq!(err.field, "moe.top_k");
    // Sizes that overflow 64 bits are refused by field before any allocation.
    let huge = ModelConfig {
        d_model: 1 << 62,
        n_heads: 2,
        n_kv_heads: None,
        ..config()
    };
    let err = Transformer::<B>::new(&huge, &moe_config(4, 2, 8), &device).unwrap_err();
    assert_eq!(err.field, "model.d_model");
}

#[test]
fn parameter_count_matches_the_built_model() {
    let device: burn::tensor::Device<B> = Default::default();
    for (model, shared) in [
        (config(), 0),
        (
            ModelConfig {
                tie_embeddings: true,
                moe_layer_interval: 2,
                n_dense_layers: 0,
                ..config()
            },
            1,
        ),
    ] {
        let moe = moe_model::MoeConfig {
            n_shared_experts: shared,
            ..moe_config(4, 2, 8)
        };
        let built = Transformer::<B>::new(&model, &moe, &device).unwrap();
        assert_eq!(
            model.parameter_count(&moe).unwrap(),
            built.num_params() as u64
        );
    }
}

#[test]
fn generation_stops_at_the_window_or_a_stop_token() {
    let device = Default::default();
    let model_config = ModelConfig {
        max_seq_len: 12,
        ..config()
    };
    let model = Transformer::<B>::new(&model_config, &moe_config(4, 2, 8), &device).unwrap();
    let greedy = SamplingConfig {
        temperature: 0.0,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let out = generate(
        &model,
        &[1, 2, 3],
        100,
        &[],
        greedy.clone(),
        |t| {
            seen.push(t);
            ControlFlow::Continue(())
        },
        &device,
    );
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(
        out.tokens.len(),
        12 - 3,
        "stops when the context window is full"
    );
    assert_eq!(seen, out.tokens);
    let again = generate(
        &model,
        &[1, 2, 3],
        100,
        &[],
        greedy.clone(),
        |_| ControlFlow::Continue(()),
        &device,
    );
    assert_eq!(again, out, "greedy decoding is deterministic");
    let mut count = 0;
    let interrupted = generate(
        &model,
        &[1, 2, 3],
        100,
        &[],
        greedy.clone(),
        |_| {
            count += 1;
            if count == 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
        &device,
    );
    assert_eq!(interrupted.finish_reason, FinishReason::Interrupted);
    assert_eq!(interrupted.tokens, out.tokens[..4]);
    let stop = out.tokens[2];
    let stopped = generate(
        &model,
        &[1, 2, 3],
        100,
        &[stop],
        greedy,
        |_| ControlFlow::Continue(()),
        &device,
    );
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(
        stopped.tokens,
        out.tokens[..out.tokens.iter().position(|&t| t == stop).unwrap()]
    );
}
