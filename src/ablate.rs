//! `moe ablate`: runs a study's grid in this process, or, with `--jobs N > 1`, as N
//! `moe train` processes at a time (burn's random generator is process-wide, so runs that
//! share a process would share it and lose their seeds' reproducibility).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use moe_model::MoeAutodiffBackend;
use moe_train::MemoryEstimate;
use moe_train::ablation::{self, Grid, GridRun};

use crate::backend::{BackendJob, BackendKind};

/// Exit status of `moe train` when the loss became NaN or infinite.
pub const DIVERGED_EXIT_CODE: i32 = 3;

#[derive(clap::Args, Debug)]
pub struct AblateArgs {
    /// The grid (TOML): a base config, the settings to vary and the seeds.
    #[arg(long)]
    grid: PathBuf,
    /// Study directory [default: checkpoints/ablations/<grid file name>]. Running the same
    /// study again skips finished runs and resumes interrupted ones.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Runs trained at the same time, each in its own `moe train` process.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "flex")]
    pub backend: BackendKind,
}

impl BackendJob for AblateArgs {
    type Output = ();

    fn run<B: MoeAutodiffBackend>(self, device: B::Device) -> Result<()> {
        anyhow::ensure!(self.jobs > 0, "--jobs must be at least 1");
        let grid = Grid::load(&self.grid)?;
        // The largest run, `jobs` of them at a time, must fit before any starts.
        for run in &grid.runs {
            let mut estimate = MemoryEstimate::training(&run.config)?;
            estimate.bytes = estimate.bytes.saturating_mul(self.jobs as u64);
            estimate
                .ensure_fits()
                .with_context(|| format!("run `{}` of the grid", run.variant))?;
        }
        let study = match &self.out {
            Some(out) => out.clone(),
            None => PathBuf::from("checkpoints/ablations")
                .join(self.grid.file_stem().context("--grid has no file name")?),
        };
        eprintln!(
            "{} runs; study directory {}",
            grid.runs.len(),
            study.display()
        );
        let progress = |line: &str| eprintln!("{line}");
        let summaries = if self.jobs == 1 {
            let trainer = ablation::train_in_process::<B>(&device);
            ablation::run_study(&grid, &study, 1, &trainer, &progress)?
        } else {
            let trainer = |run: &GridRun, dir: &Path, progress: &dyn Fn(&str)| {
                train_in_child(run, dir, self.backend, progress)
            };
            ablation::run_study(&grid, &study, self.jobs, &trainer, &progress)?
        };
        eprintln!(
            "{} runs summarised: {}",
            summaries.len(),
            study.join("report.md").display()
        );
        Ok(())
    }
}

/// Trains `run` in `dir` with a `moe train --resume` process, passing its log lines on.
fn train_in_child(
    run: &GridRun,
    dir: &Path,
    backend: BackendKind,
    progress: &dyn Fn(&str),
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join("ablation-config.toml");
    std::fs::write(&config, run.config.to_toml()?)
        .with_context(|| format!("writing {}", config.display()))?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("train")
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(dir)
        .args(["--resume", "--backend", &backend.name()])
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `moe train`")?;
    let mut last = String::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            progress(&line);
            last = line;
        }
    }
    let status = child.wait()?;
    match status.code() {
        Some(0) | Some(DIVERGED_EXIT_CODE) => Ok(()),
        _ => bail!("`moe train` failed ({status}): {last}"),
    }
}
