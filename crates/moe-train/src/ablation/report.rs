//! A study's outputs: `results.json` (every run, and mean and spread per variant),
//! `results.csv` (one row per run), the plots and `report.md` (the tables and the plots).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::grid::Grid;
use super::summary::RunSummary;

/// A run metric compared across variants: its name, its column in the report and how to
/// read it off a summary.
type Metric = (&'static str, &'static str, fn(&RunSummary) -> Option<f64>);

/// The compared metrics, in table order.
const METRICS: [Metric; 13] = [
    ("final_bpb", "final bpb", |r| r.final_bpb),
    ("best_bpb", "best bpb", |r| r.best_bpb),
    ("final_val_loss", "val loss", |r| r.final_val_loss),
    ("spikes", "spikes", |r| Some(r.spike_steps.len() as f64)),
    ("max_router_logit", "max logit", |r| {
        Some(r.max_router_logit)
    }),
    ("final_router_logit", "final max logit", |r| {
        Some(r.final_router_logit)
    }),
    ("final_z_loss", "final z-loss", |r| Some(r.final_z_loss)),
    ("load_cv", "load CV", |r| Some(r.layer_mean(|l| l.cv))),
    ("max_violation", "MaxVio", |r| {
        Some(r.layer_mean(|l| l.max_violation))
    }),
    ("dropped", "dropped", |r| Some(r.layer_mean(|l| l.dropped))),
    ("entropy", "entropy", |r| Some(r.layer_mean(|l| l.entropy))),
    ("dead_experts", "dead", |r| Some(r.dead_experts() as f64)),
    ("tokens_per_sec", "tokens/s", |r| Some(r.tokens_per_sec)),
];

/// Mean and sample standard deviation of a metric over a variant's seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Mean over the runs that have the metric.
    pub mean: f64,
    /// Sample standard deviation (0 for one run).
    pub std: f64,
    /// Runs that have it.
    pub runs: usize,
}

impl Spread {
    /// The spread of `values`, `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Some(Self {
            mean,
            std: var.sqrt(),
            runs: n,
        })
    }
}

/// One variant's results over its seeds.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    /// Its name.
    pub variant: String,
    /// Its settings (`section.key` -> value in TOML syntax).
    pub settings: Vec<(String, String)>,
    /// Runs summarised.
    pub runs: usize,
    /// Runs that diverged.
    pub diverged: usize,
    /// Mean and spread of each metric, in [`METRICS`] order.
    pub metrics: Vec<(String, Option<Spread>)>,
}

/// Per-variant results of `summaries`, in grid order.
pub fn variant_results(grid: &Grid, summaries: &[RunSummary]) -> Vec<VariantResult> {
    let mut results: Vec<VariantResult> = Vec::new();
    for run in &grid.runs {
        if results.iter().any(|v| v.variant == run.variant) {
            continue;
        }
        let runs: Vec<&RunSummary> = summaries
            .iter()
            .filter(|s| s.variant == run.variant)
            .collect();
        let metrics = METRICS
            .iter()
            .map(|(name, _, read)| {
                let values: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| read(r))
                    .filter(|v| v.is_finite())
                    .collect();
                (name.to_string(), Spread::of(&values))
            })
            .collect();
        results.push(VariantResult {
            variant: run.variant.clone(),
            settings: run.settings.clone(),
            runs: runs.len(),
            diverged: runs.iter().filter(|r| r.diverged_at.is_some()).count(),
            metrics,
        });
    }
    results
}

/// Writes `results.json`, `results.csv` and `report.md` into `study`.
pub fn write(study: &Path, grid: &Grid, summaries: &[RunSummary]) -> Result<()> {
    let variants = variant_results(grid, summaries);
    let json = serde_json::json!({ "runs": summaries, "variants": variants });
    let put = |name: &str, text: String| {
        let path = study.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    put("results.json", serde_json::to_string_pretty(&json)?)?;
    put("results.csv", csv(summaries))?;
    let plots = super::plots::write(study, grid, summaries)?;
    put(
        "report.md",
        markdown(study, grid, &variants, summaries, &plots),
    )
}

/// One row per run: variant, seed, steps, divergence step, then every metric.
fn csv(summaries: &[RunSummary]) -> String {
    let mut out = String::from("variant,seed,steps,diverged_at");
    for (name, _, _) in METRICS {
        out.push(',');
        out.push_str(name);
    }
    out.push('\n');
    for run in summaries {
        let diverged = run.diverged_at.map(|s| s.to_string()).unwrap_or_default();
        let _ = write!(
            out,
            "\"{}\",{},{},{diverged}",
            run.variant.replace('"', "\"\""),
            run.seed,
            run.steps
        );
        for (_, _, read) in METRICS {
            out.push(',');
            if let Some(value) = read(run) {
                let _ = write!(out, "{value}");
            }
        }
        out.push('\n');
    }
    out
}

/// The study's Markdown report: what was run, the variants' table, the plots and the runs.
fn markdown(
    study: &Path,
    grid: &Grid,
    variants: &[VariantResult],
    summaries: &[RunSummary],
    plots: &[String],
) -> String {
    let mut out = String::new();
    write_intro(&mut out, study, grid, variants.len(), summaries.len());
    write_variant_table(&mut out, variants);
    if !plots.is_empty() {
        let _ = writeln!(out, "\n## Plots\n");
        for plot in plots {
            let _ = writeln!(out, "![{plot}]({plot})\n");
        }
    }
    write_run_table(&mut out, summaries);
    out
}

/// The report's title and the paragraph that says what the runs were and what each
/// column means.
fn write_intro(out: &mut String, study: &Path, grid: &Grid, variants: usize, summarised: usize) {
    let name = study.file_name().map_or_else(
        || study.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let seeds: Vec<String> = {
        let mut seeds: Vec<u64> = grid.runs.iter().map(|r| r.seed).collect();
        seeds.sort_unstable();
        seeds.dedup();
        seeds.iter().map(u64::to_string).collect()
    };
    let options = &grid.metrics;
    let _ = writeln!(out, "# Ablation study `{name}`\n");
    let _ = writeln!(
        out,
        "{} runs: {} variants x seeds {}; {} of them summarised. Values are the mean ± \
         sample standard deviation over seeds. bpb: validation bits per byte (last and \
         best evaluation). Spikes: logged training losses above {} x the mean of the {} \
         before. Max logit: the largest absolute router logit of any layer in the run. \
         Over the last {tail} logged intervals: final max logit (largest over layers) and \
         final z-loss (unweighted, summed over layers); load CV, MaxVio, dropped fraction \
         and router entropy (nats), averaged over the MoE layers; dead: experts under {}% \
         load in each of those intervals, summed over layers.\n",
        grid.runs.len(),
        variants,
        seeds.join(", "),
        summarised,
        options.spike_factor,
        options.spike_window,
        options.dead_load * 100.0,
        tail = options.tail,
    );
}

/// One row per variant: its runs, divergences and every metric's mean ± std.
fn write_variant_table(out: &mut String, variants: &[VariantResult]) {
    let header: Vec<&str> = METRICS.iter().map(|m| m.1).collect();
    let _ = writeln!(
        out,
        "| variant | runs | diverged | {} |",
        header.join(" | ")
    );
    let _ = writeln!(out, "|---|---|---|{}", "---|".repeat(header.len()));
    for v in variants {
        let cells: Vec<String> = v
            .metrics
            .iter()
            .map(|(name, spread)| match spread {
                Some(s) => format!("{} ± {}", number(name, s.mean), number(name, s.std)),
                None => "–".into(),
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            v.variant,
            v.runs,
            v.diverged,
            cells.join(" | ")
        );
    }
}

/// The `## Runs` section: one row per run.
fn write_run_table(out: &mut String, summaries: &[RunSummary]) {
    let _ = writeln!(out, "\n## Runs\n");
    let _ = writeln!(
        out,
        "| variant | seed | steps | diverged at | final bpb | spikes at steps | dead experts per layer |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for run in summaries {
        let dead: Vec<String> = run
            .layers
            .iter()
            .map(|l| format!("{:?}", l.dead_experts))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:?} | {} |",
            run.variant,
            run.seed,
            run.steps,
            run.diverged_at.map_or("–".into(), |s| s.to_string()),
            run.final_bpb.map_or("–".into(), |b| format!("{b:.4}")),
            run.spike_steps,
            dead.join(" ")
        );
    }
}

/// A metric value with the precision that makes sense for it.
fn number(metric: &str, value: f64) -> String {
    match metric {
        "spikes" | "dead_experts" | "tokens_per_sec" => format!("{value:.0}"),
        "dropped" => format!("{:.2}%", value * 100.0),
        "final_bpb" | "best_bpb" | "final_val_loss" => format!("{value:.4}"),
        _ => format!("{value:.3}"),
    }
}
