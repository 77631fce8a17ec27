//! Grid files: a base config, the settings to vary and the seeds, expanded into runs.
//!
//! ```toml
//! base = "../tiny.toml"          # relative to the grid file
//! seeds = [1, 2]
//! set = { train.steps = 300 }    # applied to every run
//!
//! [axes]                         # the cross product of these values...
//! moe.aux_loss_weight = [0.0, 1e-3, 1e-2, 1e-1]
//!
//! [[variants]]                   # ...times these named settings, if any
//! name = "sigmoid-bias"
//! set = { moe.router = "sigmoid", moe.bias_update_rate = 1e-3 }
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

use crate::config::RunConfig;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    base: PathBuf,
    seeds: Vec<u64>,
    #[serde(default)]
    set: toml::Table,
    #[serde(default)]
    axes: toml::Table,
    #[serde(default)]
    variants: Vec<VariantFile>,
    #[serde(default)]
    metrics: SummaryOptions,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantFile {
    name: String,
    #[serde(default)]
    set: toml::Table,
}

/// How the per-run stability metrics are computed (`[metrics]` of the grid file).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SummaryOptions {
    /// A loss spike: a logged training loss above `spike_factor` times the mean of the
    /// `spike_window` logged losses before it.
    pub spike_factor: f64,
    /// Logged intervals in the spike baseline.
    pub spike_window: usize,
    /// An expert is dead when its load stays under `dead_load` in each of the last
    /// `tail` logged intervals.
    pub dead_load: f64,
    /// Logged intervals at the end of a run over which imbalance, drops, entropy and dead
    /// experts are measured.
    pub tail: usize,
}

impl Default for SummaryOptions {
    fn default() -> Self {
        Self {
            spike_factor: 1.2,
            spike_window: 10,
            dead_load: 0.01,
            tail: 5,
        }
    }
}

/// One setting of a variant: a config key and its value in TOML syntax.
pub type Setting = (String, String);

/// One training run of the study.
#[derive(Debug, Clone)]
pub struct GridRun {
    /// The variant's name (its explicit name and axis values).
    pub variant: String,
    /// The variant's settings, without the seed.
    pub settings: Vec<Setting>,
    /// `train.seed` of this run.
    pub seed: u64,
    /// The complete, validated run config.
    pub config: RunConfig,
}

impl GridRun {
    /// The run's directory under the study directory: `<variant>/seed-<seed>`.
    pub fn dir(&self, study: &Path) -> PathBuf {
        study
            .join(dir_name(&self.variant))
            .join(format!("seed-{}", self.seed))
    }
}

/// A parsed grid: every run, in order (variants, then seeds), and the metric options.
#[derive(Debug, Clone)]
pub struct Grid {
    /// Variant by variant, each with every seed.
    pub runs: Vec<GridRun>,
    /// How run summaries are computed.
    pub metrics: SummaryOptions,
}

impl Grid {
    /// Reads a grid file and builds (and validates) the config of every run, so that a
    /// mistake anywhere is reported before the first run starts.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("in grid {}", path.display()))
    }

    /// Parses grid text whose `base` is relative to `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<Self> {
        let file: GridFile = toml::from_str(text)?;
        ensure!(
            !file.seeds.is_empty(),
            "`seeds` is empty: give at least one seed"
        );
        let mut seeds = file.seeds.clone();
        seeds.sort_unstable();
        seeds.dedup();
        ensure!(seeds.len() == file.seeds.len(), "`seeds` repeats a seed");
        let fixed = settings(&file.set, "set")?;
        let mut variants: Vec<(String, Vec<Setting>)> = if file.variants.is_empty() {
            vec![(String::new(), Vec::new())]
        } else {
            file.variants
                .iter()
                .map(|v| {
                    ensure!(!v.name.trim().is_empty(), "a variant has an empty `name`");
                    Ok((
                        v.name.clone(),
                        settings(&v.set, &format!("variants.{}", v.name))?,
                    ))
                })
                .collect::<Result<_>>()?
        };
        for (key, values) in axes(&file.axes)? {
            let short = key.rsplit('.').next().unwrap_or(&key);
            let mut expanded = Vec::with_capacity(variants.len() * values.len());
            for (name, set) in &variants {
                for (label, value) in &values {
                    let part = format!("{short}={label}");
                    let name = if name.is_empty() {
                        part
                    } else {
                        format!("{name},{part}")
                    };
                    let mut set = set.clone();
                    set.push((key.clone(), value.clone()));
                    expanded.push((name, set));
                }
            }
            variants = expanded;
        }
        let mut names: Vec<&str> = variants.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| dir_name(w[0]) == dir_name(w[1])) {
            bail!("two variants are both named `{}`", pair[0]);
        }
        let base = dir.join(&file.base);
        let mut runs = Vec::new();
        for (name, set) in variants {
            let variant = if name.is_empty() { "base".into() } else { name };
            for &seed in &file.seeds {
                let overrides: Vec<String> = fixed
                    .iter()
                    .chain(&set)
                    .map(|(k, v)| format!("{k}={v}"))
                    .chain([format!("train.seed={seed}")])
                    .collect();
                let config = RunConfig::load(&base, &overrides)
                    .with_context(|| format!("variant `{variant}`"))?;
                runs.push(GridRun {
                    variant: variant.clone(),
                    settings: set.clone(),
                    seed,
                    config,
                });
            }
        }
        Ok(Self {
            runs,
            metrics: file.metrics,
        })
    }
}

/// `section.key = value` pairs of a settings table (`{ moe.top_k = 2 }`), values in TOML
/// syntax.
fn settings(table: &toml::Table, what: &str) -> Result<Vec<Setting>> {
    Ok(flatten(table, what)?
        .into_iter()
        .map(|(key, value)| (key, value.to_string()))
        .collect())
}

/// An axis: its `section.key` and its values, each as a label for variant names and in
/// TOML syntax.
type Axis = (String, Vec<(String, String)>);

/// The axes: `section.key = [values]`, each non-empty.
fn axes(table: &toml::Table) -> Result<Vec<Axis>> {
    let mut out = Vec::new();
    for (key, values) in flatten(table, "axes")? {
        let Some(values) = values.as_array() else {
            bail!("`axes.{key}`: expected a list of values, e.g. [0.0, 0.01]");
        };
        ensure!(
            !values.is_empty(),
            "`axes.{key}` is empty: give at least one value"
        );
        out.push((
            key,
            values.iter().map(|v| (label(v), v.to_string())).collect(),
        ));
    }
    Ok(out)
}

/// The `(section.key, value)` entries of a two-level table.
fn flatten(table: &toml::Table, what: &str) -> Result<Vec<(String, toml::Value)>> {
    let mut out = Vec::new();
    for (section, keys) in table {
        let Some(keys) = keys.as_table() else {
            bail!("`{what}.{section}`: expected section.key = value, e.g. train.steps = 300");
        };
        for (key, value) in keys {
            if section == "train" && key == "seed" {
                bail!("`{what}.train.seed`: seeds come from `seeds`");
            }
            out.push((format!("{section}.{key}"), value.clone()));
        }
    }
    Ok(out)
}

/// A short readable form of a value: strings unquoted, floats as `0.003`, `0` or `1e30`.
fn label(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => text.clone(),
        toml::Value::Float(x) if *x != 0.0 && (x.abs() >= 1e5 || x.abs() < 1e-4) => {
            format!("{x:e}")
        }
        toml::Value::Float(x) => format!("{x}"),
        other => other.to_string(),
    }
}

/// A directory name for a variant: its characters, with anything unsafe as `_`.
fn dir_name(variant: &str) -> String {
    variant
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "=.,-_+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
