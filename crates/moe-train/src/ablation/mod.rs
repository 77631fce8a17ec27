//! Ablation studies: a grid of training runs that differ in chosen config keys (and
//! seeds), run with the same data, budget and seeds, then compared in one report.
//!
//! Every run trains in its own directory `<study>/<variant>/seed-<seed>` (config,
//! checkpoints, `metrics.jsonl`, TensorBoard) and ends with a `summary.json`. Running a
//! study again skips runs that have one and resumes the others from their last
//! checkpoint. Summaries are always computed again from the runs' `metrics.jsonl`, so a
//! changed `[metrics]` section re-reports a finished study without training. A run that
//! diverges is recorded as such; it does not stop the study.

pub mod grid;
pub mod plots;
pub mod report;
pub mod summary;

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use moe_model::MoeAutodiffBackend;

pub use grid::{Grid, GridRun, SummaryOptions};
pub use summary::RunSummary;

use crate::data_parallel::Cluster;
use crate::run_lock::RunLock;
use crate::trainer::{Diverged, train};

/// The file that marks a run as done.
pub const SUMMARY_FILE: &str = "summary.json";

/// Trains one run in its directory, resuming what is there, reporting progress lines.
/// A run that diverges has ended: `Ok` (its `metrics.jsonl` records the divergence).
pub type RunTrainer<'a> = dyn Fn(&GridRun, &Path, &dyn Fn(&str)) -> Result<()> + Sync + 'a;

/// Trains runs in this process, on `device`. Use it with `jobs = 1`: burn's random
/// generator is process-wide, so runs trained side by side in one process would draw
/// from each other's seeds.
pub fn train_in_process<B: MoeAutodiffBackend>(device: &B::Device) -> Box<RunTrainer<'_>> {
    Box::new(move |run, dir, progress| {
        match train::<B>(
            &run.config,
            dir,
            true,
            None,
            &Cluster::local(vec![device.clone()]),
            progress,
        ) {
            Ok(_) => Ok(()),
            Err(error) if error.downcast_ref::<Diverged>().is_some() => Ok(()),
            Err(error) => Err(error),
        }
    })
}

/// Runs every unfinished run of `grid` under `study` with `trainer`, `jobs` at a time,
/// then writes the study's results and report there. Returns the runs' summaries in grid
/// order. Runs that fail for another reason than divergence (a full disk, say) are
/// reported at the end, after the others have run; the report then covers the rest.
pub fn run_study(
    grid: &Grid,
    study: &Path,
    jobs: usize,
    trainer: &RunTrainer,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Vec<RunSummary>> {
    // One study process per directory (each run also locks its own).
    let _lock = RunLock::acquire(study)?;
    let results: Vec<Mutex<Option<Result<RunSummary>>>> =
        grid.runs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, grid.runs.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(run) = grid.runs.get(index) else {
                        break;
                    };
                    let result = run_one(run, study, &grid.metrics, trainer, progress);
                    *results[index].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                }
            });
        }
    });
    let mut summaries = Vec::new();
    let mut failures = Vec::new();
    for (run, result) in grid.runs.iter().zip(results) {
        match result.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(summary)) => summaries.push(summary),
            Some(Err(error)) => {
                failures.push(format!("{} seed {}: {error:#}", run.variant, run.seed))
            }
            None => failures.push(format!("{} seed {}: not run", run.variant, run.seed)),
        }
    }
    report::write(study, grid, &summaries)?;
    if !failures.is_empty() {
        bail!(
            "{} of {} runs failed (the report covers the others):\n  {}",
            failures.len(),
            grid.runs.len(),
            failures.join("\n  ")
        );
    }
    Ok(summaries)
}

/// Trains one run (or resumes it, or skips training if it is done) and summarises it from
/// its `metrics.jsonl`.
fn run_one(
    run: &GridRun,
    study: &Path,
    options: &SummaryOptions,
    trainer: &RunTrainer,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<RunSummary> {
    let dir = run.dir(study);
    let label = format!("[{} seed {}]", run.variant, run.seed);
    let summary_path = dir.join(SUMMARY_FILE);
    let finished = summary_path.exists();
    if finished {
        progress(&format!("{label} finished earlier: skipped"));
    } else {
        trainer(run, &dir, &|line| progress(&format!("{label} {line}")))?;
    }
    let records = summary::read_metrics(&dir)?;
    let summary = summary::summarize(&run.variant, run.seed, &records, options);
    if let (Some(step), false) = (summary.diverged_at, finished) {
        progress(&format!("{label} diverged at step {step}"));
    }
    let temp = dir.join(format!(".{SUMMARY_FILE}.tmp"));
    std::fs::write(&temp, serde_json::to_string_pretty(&summary)?)
        .and_then(|()| std::fs::rename(&temp, &summary_path))
        .with_context(|| format!("writing {}", summary_path.display()))?;
    Ok(summary)
}
