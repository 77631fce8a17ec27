//! Helpers shared by the test crates of moe-train (each uses a subset of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use moe_model::Transformer;
use moe_train::MetricRecord;

/// A dataset directory under `dir` holding the first `bytes` of each named shipped work.
pub fn dataset(dir: &Path, works: &[(&str, usize)]) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/shakespeare");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for &(name, bytes) in works {
        let text = std::fs::read_to_string(source.join(format!("{name}.txt"))).unwrap();
        std::fs::write(data.join(format!("{name}.txt")), &text[..bytes]).unwrap();
    }
    data
}

/// The logits of `model` for the token ids `ids` of shape `shape`.
pub fn logits(model: &Transformer<Flex>, ids: &[i64], shape: [usize; 2]) -> Vec<f32> {
    let tokens = Tensor::<Flex, 2, Int>::from_data(
        TensorData::new(ids.to_vec(), shape),
        &Default::default(),
    );
    model
        .forward(tokens)
        .logits
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

/// The largest element-wise difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The records of a run's `metrics.jsonl`.
pub fn records(run_dir: &Path) -> Vec<MetricRecord> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The (step, loss) of every training record of a run.
pub fn train_losses(run_dir: &Path) -> Vec<(usize, f64)> {
    records(run_dir)
        .into_iter()
        .filter_map(|r| match r {
            MetricRecord::Train(t) => Some((t.step, t.loss)),
            _ => None,
        })
        .collect()
}
