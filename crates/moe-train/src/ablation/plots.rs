//! The study's plots, as SVG: training loss, validation bpb, load imbalance, largest
//! router logit and z-loss over the steps (one line per run, one colour per variant), and each MoE layer's mean expert
//! load (a variants x experts heatmap).

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::grid::Grid;
use super::summary::{RunSummary, read_metrics};
use crate::logger::MetricRecord;

/// A run's curve: the index of its variant and its `(step, value)` points.
struct Curve {
    variant: usize,
    points: Vec<(f64, f64)>,
}

/// Writes `loss.svg`, `val_bpb.svg`, `load_cv.svg`, `router_logit.svg`, `z_loss.svg` and
/// `expert_load_layer<L>.svg` into `study`; returns the file names.
pub fn write(study: &Path, grid: &Grid, summaries: &[RunSummary]) -> Result<Vec<String>> {
    let variants = variant_names(grid);
    let mut loss = Vec::new();
    let mut bpb = Vec::new();
    let mut cv = Vec::new();
    let mut logit = Vec::new();
    let mut z_loss = Vec::new();
    for summary in summaries {
        let Some(run) = grid
            .runs
            .iter()
            .find(|r| r.variant == summary.variant && r.seed == summary.seed)
        else {
            continue;
        };
        let variant = variants.iter().position(|v| *v == run.variant).unwrap_or(0);
        let curves = run_curves(&read_metrics(&run.dir(study))?, variant);
        let [l, b, c, m, z] = curves;
        loss.push(l);
        bpb.push(b);
        cv.push(c);
        logit.push(m);
        z_loss.push(z);
    }
    let mut written = Vec::new();
    for (name, title, y, curves) in [
        ("loss.svg", "Training loss (nats per token)", "loss", &loss),
        ("val_bpb.svg", "Validation bits per byte", "bpb", &bpb),
        (
            "load_cv.svg",
            "Load imbalance (CV of expert load, mean over MoE layers)",
            "CV",
            &cv,
        ),
        (
            "router_logit.svg",
            "Largest absolute router logit (max over MoE layers)",
            "logit",
            &logit,
        ),
        (
            "z_loss.svg",
            "Router z-loss (unweighted, summed over MoE layers)",
            "z-loss",
            &z_loss,
        ),
    ] {
        if curves.iter().any(|c| !c.points.is_empty()) {
            line_chart(&study.join(name), title, y, curves, &variants)?;
            written.push(name.to_string());
        }
    }
    let layers = summaries.iter().map(|s| s.layers.len()).max().unwrap_or(0);
    for layer in 0..layers {
        let name = format!("expert_load_layer{layer}.svg");
        load_heatmap(&study.join(&name), layer, summaries, &variants)?;
        written.push(name);
    }
    Ok(written)
}

/// The study's variants, in the order of their first run.
fn variant_names(grid: &Grid) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for run in &grid.runs {
        if !names.contains(&run.variant.as_str()) {
            names.push(&run.variant);
        }
    }
    names
}

/// A run's five curves from its metrics: training loss, validation bpb, load CV, largest
/// router logit and z-loss.
fn run_curves(records: &[MetricRecord], variant: usize) -> [Curve; 5] {
    let mut curves = [(); 5].map(|()| Curve {
        variant,
        points: Vec::new(),
    });
    for record in records {
        match record {
            MetricRecord::Train(t) => {
                let step = t.step as f64;
                curves[0].points.push((step, t.loss));
                if !t.layers.is_empty() {
                    let mean = t.layers.iter().map(|l| l.cv).sum::<f64>() / t.layers.len() as f64;
                    curves[2].points.push((step, mean));
                    let max = t.layers.iter().map(|l| l.max_logit).fold(0.0, f64::max);
                    curves[3].points.push((step, max));
                    curves[4].points.push((step, t.z_loss));
                }
            }
            // The periodic evaluations' fixed windows make one comparable curve.
            MetricRecord::Eval { step, full, result } => {
                if !full {
                    curves[1].points.push((*step as f64, result.bpb));
                }
            }
            MetricRecord::Diverged { .. } => {}
        }
    }
    curves
}

fn color(variant: usize) -> RGBColor {
    let c = Palette99::pick(variant).to_rgba();
    RGBColor(c.0, c.1, c.2)
}

/// One line per curve, coloured by variant, with a legend of the variants. The y range
/// ends at the 98th percentile of the values so one spike does not flatten the rest.
fn line_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    curves: &[Curve],
    variants: &[&str],
) -> Result<()> {
    let mut values: Vec<f64> = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .collect();
    values.sort_by(f64::total_cmp);
    let (low, high) = match (values.first(), values.get(values.len() * 98 / 100)) {
        (Some(&low), Some(&high)) if high > low => (low, high),
        (Some(&low), _) => (low - 0.5, low + 0.5),
        _ => (0.0, 1.0),
    };
    let pad = (high - low) * 0.05;
    let (y0, y1) = (low - pad, high + pad);
    let x1 = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .bold_line_style(RGBColor(215, 215, 215))
        .light_line_style(RGBColor(240, 240, 240))
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .draw()?;
    let mut labelled = vec![false; variants.len()];
    for curve in curves {
        let style = color(curve.variant).stroke_width(2);
        let points = curve
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| (x, y.clamp(y0, y1)));
        let series = chart.draw_series(LineSeries::new(points, style))?;
        if !std::mem::replace(&mut labelled[curve.variant], true) {
            let variant_color = color(curve.variant);
            series
                .label(variants[curve.variant])
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], variant_color));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Each variant's mean load of each expert of `layer`, over its seeds.
fn mean_loads(layer: usize, summaries: &[RunSummary], variants: &[&str]) -> Vec<Vec<f64>> {
    variants
        .iter()
        .map(|variant| {
            let loads: Vec<&Vec<f64>> = summaries
                .iter()
                .filter(|s| s.variant == *variant)
                .filter_map(|s| s.layers.get(layer).map(|l| &l.load))
                .collect();
            let experts = loads.iter().map(|l| l.len()).max().unwrap_or(0);
            (0..experts)
                .map(|e| {
                    loads.iter().filter_map(|l| l.get(e)).sum::<f64>() / loads.len().max(1) as f64
                })
                .collect()
        })
        .collect()
}

/// Mean load of each expert in `layer` (over the last logged intervals and the seeds),
/// one row per variant; darker is busier, and each cell shows its value.
fn load_heatmap(
    path: &Path,
    layer: usize,
    summaries: &[RunSummary],
    variants: &[&str],
) -> Result<()> {
    let rows = mean_loads(layer, summaries, variants);
    let experts = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let peak = rows.iter().flatten().copied().fold(1e-12, f64::max);
    let height = 120 + 40 * variants.len() as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let label_width = 12 + 8 * variants.iter().map(|v| v.len()).max().unwrap_or(8) as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Mean expert load, MoE layer {layer} (uniform = {:.3})",
                1.0 / experts as f64
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(label_width)
        .build_cartesian_2d(0.0..experts as f64, 0.0..variants.len() as f64)?;
    let row_name = |y: &f64| {
        let row = y.floor() as usize;
        let centred = (y - row as f64 - 0.5).abs() < 1e-6;
        match variants.get(row) {
            Some(name) if centred => name.to_string(),
            _ => String::new(),
        }
    };
    let column_name = |x: &f64| {
        let column = x.floor();
        if (x - column - 0.5).abs() < 1e-6 {
            format!("{column}")
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("expert")
        .x_labels(2 * experts + 1)
        .y_labels(2 * variants.len() + 1)
        .x_label_formatter(&column_name)
        .y_label_formatter(&row_name)
        .draw()?;
    for (v, row) in rows.iter().enumerate() {
        for (e, &load) in row.iter().enumerate() {
            let shade = (load / peak).clamp(0.0, 1.0);
            let fill = RGBColor(
                (255.0 * (1.0 - 0.8 * shade)) as u8,
                (255.0 * (1.0 - 0.6 * shade)) as u8,
                255,
            );
            let (x, y) = (e as f64, v as f64);
            chart.draw_series([Rectangle::new([(x, y), (x + 1.0, y + 1.0)], fill.filled())])?;
            chart.draw_series([Text::new(
                format!("{load:.3}"),
                (x + 0.3, y + 0.6),
                ("sans-serif", 14),
            )])?;
        }
    }
    root.present()?;
    Ok(())
}
