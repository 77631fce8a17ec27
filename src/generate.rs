//! `moe generate`: text from a checkpoint, printed as it is sampled.

use std::io::Write;

use anyhow::Result;
use moe_model::ops::run_compute;
use moe_model::{MoeAutodiffBackend, SamplingConfig, generate};

use crate::backend::{BackendJob, BackendKind, run_on};
use crate::checkpoint_arg::CheckpointArg;

#[derive(clap::Args, Debug)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    source: CheckpointArg,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens only (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    backend: BackendKind,
}

/// Runs `moe generate` on the backend its flags name.
pub(crate) fn run(args: GenerateArgs) -> Result<()> {
    run_on(args.backend, args)
}

impl BackendJob for GenerateArgs {
    type Output = ();

    fn run<B: MoeAutodiffBackend>(self, device: B::Device) -> Result<()> {
        anyhow::ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "--temperature must be >= 0"
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "--top-p must be in (0, 1]"
        );
        let loaded = self.source.load::<B::InnerBackend>(&device)?;
        let tokenizer = &loaded.tokenizer;
        let prompt = tokenizer.encode(&self.prompt)?;
        let stop: Vec<u32> = tokenizer.end_of_text().into_iter().collect();
        let sampling = SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            ..SamplingConfig::default()
        };
        let mut out = std::io::stdout();
        write!(out, "{}", self.prompt)?;
        let mut generated = Vec::new();
        let mut printed = 0;
        run_compute::<B::InnerBackend, _>(|| {
            generate(
                &loaded.model,
                &prompt,
                self.max_tokens,
                &stop,
                sampling,
                |token| {
                    generated.push(token);
                    // Print whole characters only: a byte-level token may end mid-character.
                    if let Ok(text) = tokenizer.decode(&generated) {
                        let text = text.trim_end_matches('\u{FFFD}');
                        if text.len() > printed {
                            let _ = write!(out, "{}", text.get(printed..).unwrap_or_default());
                            let _ = out.flush();
                            printed = text.len();
                        }
                    }
                    std::ops::ControlFlow::Continue(())
                },
                &device,
            )
        });
        if let Ok(text) = tokenizer.decode(&generated)
            && text.len() > printed
        {
            write!(out, "{}", text.get(printed..).unwrap_or_default())?;
        }
        writeln!(out)?;
        Ok(())
    }
}
