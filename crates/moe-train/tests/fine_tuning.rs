//! Chat fine-tuning: the loss on the answers is the mean of their token losses; a base
//! model whose tokenizer lacks the chat template's markers grows its vocabulary, learns
//! the answers, and the grown checkpoint exports and imports with its chat template.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::data::dataloader::batcher::Batcher;
use burn::tensor::activation::log_softmax;
use burn::tensor::{ElementConversion, Int, Tensor};
use moe_data::{
    IM_END, IM_START, LmBatch, LmBatcher, PrepareOptions, TokenizerChoice, ValidationSplit, Window,
    prepare,
};
use moe_model::{ModelConfig, MoeConfig, Transformer};
use moe_train::NonFinite;
use moe_train::data_parallel::Cluster;
use moe_train::{
    ExportFormat, MetricRecord, RunConfig, export, forward_backward, import, load_model, train,
};

type B = Autodiff<Flex>;

const BASE_CONFIG: &str = r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 2
max_seq_len = 64

[moe]
n_experts = 4
top_k = 2
expert_ffn_dim = 32

[data]
tokenizer = "byte"
seq_len = 64

[train]
batch_size = 4
steps = 2
lr = 1e-3
log_every = 1
eval_every = 1000
eval_tokens = 256
checkpoint_every = 1000
"#;

/// Fine-tuning over the base: only [data] and [train], the model's shape from `--init`.
const SFT_CONFIG: &str = r#"
[data]
prepared = "chat"
seq_len = 64

[train]
batch_size = 8
steps = 60
lr = 1e-2
warmup_steps = 5
log_every = 10
eval_every = 1000
eval_tokens = 512
checkpoint_every = 1000
loss_on = "assistant"
"#;

/// Questions with one-letter answers the model can learn in a few dozen steps.
fn chat_lines() -> String {
    (0..200)
        .map(|i| {
            let letter = (b'a' + (i % 4) as u8) as char;
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("{letter}?")},
                {"role": "assistant", "content": letter.to_uppercase().to_string()},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

#[test]
fn masked_loss_is_the_mean_over_the_scored_tokens() {
    let device = Default::default();
    #[derive(serde::Deserialize)]
    struct Shape {
        model: ModelConfig,
        moe: MoeConfig,
    }
    let shape: Shape = toml::from_str(BASE_CONFIG.split("[data]").next().unwrap()).unwrap();
    let model = Transformer::<B>::new(&shape.model, &shape.moe, &device).unwrap();
    let tokens: Vec<u32> = (0..17).map(|i| (i * 37 % 256) as u32).collect();
    let mut mask = vec![0u32; 17];
    for i in [3, 4, 9, 16] {
        mask[i] = 1;
    }
    let window = Window {
        tokens: tokens.clone(),
        mask: Some(mask.clone()),
    };
    let mut batch: LmBatch<B> = LmBatcher.batch(vec![window], &device);
    // One micro-batch scoring 4 tokens: its weights are the mask over 4.
    batch.mask = batch.mask.map(|m| m.div_scalar(4.0));
    let inputs = batch.inputs.clone();
    let step = forward_backward(&model, batch, 1.0, &device);
    let ce = step.ce.into_scalar().elem::<f64>();

    let logits = model.forward(inputs).logits;
    let log_probs = log_softmax(logits, 2);
    let ids: Vec<i64> = tokens[1..].iter().map(|&t| t as i64).collect();
    let targets = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device).reshape([1, 16, 1]);
    let picked: Vec<f32> = log_probs.gather(2, targets).into_data().to_vec().unwrap();
    let by_hand = -[3, 4, 9, 16]
        .iter()
        .map(|&i| f64::from(picked[i - 1]))
        .sum::<f64>()
        / 4.0;
    assert!((ce - by_hand).abs() < 1e-4, "{ce} vs {by_hand}");
}

fn base_checkpoint(dir: &Path) -> PathBuf {
    let data = common::dataset(dir, &[("hamlet", 20_000), ("macbeth", 4_000)]);
    let text = BASE_CONFIG.replace(
        "[data]\n",
        &format!(
            "[data]\ndataset = \"{}\"\nvalidation_works = [\"macbeth\"]\n",
            data.display()
        ),
    );
    let config = RunConfig::parse(&text, &[]).unwrap();
    let run = dir.join("base");
    train::<B>(&config, &run, false, None, &Cluster::default(), |_| {}).unwrap();
    run
}

#[test]
fn fine_tuning_grows_the_vocabulary_and_learns_the_answers() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_checkpoint(dir.path());
    let base_model = load_model::<Flex>(&base, &Default::default(), NonFinite::Refuse).unwrap();
    assert!(base_model.tokenizer.token_id(IM_START).is_none());

    let input = dir.path().join("chat.jsonl");
    std::fs::write(&input, chat_lines()).unwrap();
    let mut options = PrepareOptions::new(vec![input], dir.path().join("chat"));
    options.chat = true;
    options.tokenizer = TokenizerChoice::File(base.join("tokenizer.json"));
    options.validation = ValidationSplit::Fraction(0.1);
    let meta = prepare(&options, &mut |_| {}).unwrap();
    assert_eq!(meta.chat.unwrap().added_tokens, [IM_START, IM_END]);

    let sft = dir.path().join("sft.toml");
    let text = SFT_CONFIG.replace("\"chat\"", &format!("{:?}", dir.path().join("chat")));
    std::fs::write(&sft, text).unwrap();
    let config =
        RunConfig::load_over(&base.join("config.toml"), &sft, &[]).expect("sft over the base");
    assert_eq!(
        config.model, base_model.config.model,
        "[model] from the base"
    );
    let run = dir.path().join("sft");
    let mut lines = Vec::new();
    train::<B>(
        &config,
        &run,
        false,
        Some(&base),
        &Cluster::default(),
        |line| lines.push(line.to_string()),
    )
    .unwrap();
    assert!(
        lines.iter().any(|l| l.contains("grown from 256 to 258")),
        "{lines:#?}"
    );

    let tuned = load_model::<Flex>(&run, &Default::default(), NonFinite::Refuse).unwrap();
    assert_eq!(tuned.config.model.vocab_size, 258);
    assert_eq!(tuned.tokenizer.token_id(IM_END), Some(257));
    assert!(run.join("tokenizer_config.json").is_file());
    // The answer-only loss falls far below its start (one of four letters: ln 4 at best
    // without reading the question; reading it, near 0).
    let losses: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| match serde_json::from_str(l).unwrap() {
            MetricRecord::Train(t) => Some(t.loss),
            _ => None,
        })
        .collect();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.5 * first && last < 1.0, "{losses:?}");

    // The grown model leaves with its template and comes back identical.
    let hf = dir.path().join("hf");
    export::<Flex>(
        &run,
        ExportFormat::Hf,
        &hf,
        &Default::default(),
        NonFinite::Refuse,
    )
    .unwrap();
    let hf_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(
        hf_config["chat_template"]
            .as_str()
            .unwrap()
            .contains(IM_START)
    );
    assert_eq!(hf_config["eos_token"], IM_END);
    let generation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        generation["eos_token_id"], 257,
        "generation ends at the end of a turn (bytes have no end-of-text)"
    );
    let back = dir.path().join("back");
    import::<Flex>(&hf, &back, &Default::default(), NonFinite::Refuse).unwrap();
    let imported = load_model::<Flex>(&back, &Default::default(), NonFinite::Refuse).unwrap();
    assert_eq!(imported.config.model.vocab_size, 258);
    assert!(imported.tokenizer.has_chat_template());
    let ids =
        Tensor::<Flex, 1, Int>::from_ints([1, 256, 65, 257], &Default::default()).reshape([1, 4]);
    let a: Vec<f32> = tuned
        .model
        .forward(ids.clone())
        .logits
        .into_data()
        .to_vec()
        .unwrap();
    let b: Vec<f32> = imported
        .model
        .forward(ids)
        .logits
        .into_data()
        .to_vec()
        .unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "logits differ by {diff}");
}
