//! `moe eval`: a checkpoint's validation loss, bits per byte, perplexity and expert load.

use std::path::PathBuf;

use anyhow::Result;
use moe_data::LossOn;
use moe_model::MoeAutodiffBackend;
use moe_train::{RunData, evaluate};

use crate::backend::{BackendJob, BackendKind, run_on};
use crate::checkpoint_arg::CheckpointArg;

#[derive(clap::Args, Debug)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    source: CheckpointArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// A prepared set (`moe data prepare`) whose validation split to score, instead of
    /// the run config's data. It must use the checkpoint's tokenizer.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Evaluate only this many validation batches.
    #[arg(long)]
    batches: Option<usize>,
    /// Which tokens are scored: `all`, or `assistant` (the answers of chat data)
    /// [default: assistant when every set is chat data, else all].
    #[arg(long, value_parser = parse_loss_on)]
    loss_on: Option<LossOn>,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendKind,
}

fn parse_loss_on(name: &str) -> Result<LossOn, String> {
    match name {
        "all" => Ok(LossOn::All),
        "assistant" => Ok(LossOn::Assistant),
        other => Err(format!("`{other}`: expected all or assistant")),
    }
}

/// Runs `moe eval` on the backend its flags name.
pub(crate) fn run(args: EvalArgs) -> Result<()> {
    run_on(args.backend, args)
}

impl BackendJob for EvalArgs {
    type Output = ();

    fn run<B: MoeAutodiffBackend>(self, device: B::Device) -> Result<()> {
        anyhow::ensure!(
            self.batches != Some(0),
            "--batches must be at least 1 (leave it out to score the whole split)"
        );
        let loaded = self.source.load::<B::InnerBackend>(&device)?;
        let mut config = loaded.config.clone();
        if let Some(dir) = &self.data {
            config.data.prepared = Some(dir.clone());
            config.data.dataset = None;
            config.data.sources.clear();
            config.data.tokenizer = None;
            config.data.validation_works = None;
        }
        let data = RunData::open(&config, Some(&loaded.tokenizer), &mut |line| {
            eprintln!("{line}")
        })?;
        anyhow::ensure!(
            data.added_tokens.is_empty(),
            "the data's tokenizer adds {} to this model's, which cannot score them: \
             evaluate a model fine-tuned on such data (`moe train --init`)",
            data.added_tokens.join(", ")
        );
        let chat = data.sets.iter().all(|set| set.val.chat().is_some());
        let loss_on = self.loss_on.unwrap_or(match chat {
            true => LossOn::Assistant,
            false => LossOn::All,
        });
        let windows = data.full_eval_windows(config.data.seq_len, loss_on)?;
        let result = evaluate(
            &loaded.model,
            &windows,
            config.train.batch_size,
            self.batches,
            &device,
        )?;
        if self.json {
            let json = serde_json::json!({
                "checkpoint": loaded.checkpoint,
                "loss_on": loss_on,
                "val_loss": result.val_loss,
                "bpb": result.bpb,
                "perplexity": result.perplexity,
                "tokens": result.tokens,
                "expert_load": result.expert_load.iter().map(|l| l.load.clone()).collect::<Vec<_>>(),
                "layers": result.expert_load,
            });
            println!("{json}");
        } else {
            println!("checkpoint  {}", loaded.checkpoint.display());
            if loss_on == LossOn::Assistant {
                println!("scored      the answers ({} tokens)", result.tokens);
            }
            println!("val_loss    {:.4}", result.val_loss);
            println!("bpb         {:.4}", result.bpb);
            println!("perplexity  {:.2}", result.perplexity);
            for (i, layer) in result.expert_load.iter().enumerate() {
                let load: Vec<String> = layer.load.iter().map(|l| format!("{l:.3}")).collect();
                println!(
                    "moe layer {i}: load [{}] cv {:.3} dropped {:.2}% entropy {:.3}",
                    load.join(" "),
                    layer.cv,
                    100.0 * layer.dropped,
                    layer.entropy
                );
            }
        }
        Ok(())
    }
}
