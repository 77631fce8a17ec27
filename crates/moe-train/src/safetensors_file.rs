//! Named tensors on the host and their safetensors files: reading (f32, f16, bf16 and f64,
//! converted to f32; a sharded checkpoint through its index) and writing (f32, atomically).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// A dense row-major f32 tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values in row-major order.
    pub data: Vec<f32>,
}

/// Tensors by name, in name order (so files are written deterministically).
pub type NamedTensors = BTreeMap<String, HostTensor>;

impl HostTensor {
    /// A tensor of `shape` holding `data`; the lengths must agree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape and data length"
        );
        Self { shape, data }
    }

    /// The transpose of a matrix.
    pub fn transpose(&self) -> Self {
        let [rows, cols] = self.shape[..] else {
            panic!("transpose of a tensor of rank {}", self.shape.len());
        };
        let mut data = vec![0.0; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = self.data[r * cols + c];
            }
        }
        Self::new(vec![cols, rows], data)
    }

    /// Slice `index` of the outermost dimension.
    pub fn slice(&self, index: usize) -> Self {
        let inner: usize = self.shape[1..].iter().product();
        let data = self.data[index * inner..(index + 1) * inner].to_vec();
        Self::new(self.shape[1..].to_vec(), data)
    }

    /// Rows `rows` of a matrix.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Self {
        let cols = self.shape[1];
        let data = self.data[rows.start * cols..rows.end * cols].to_vec();
        Self::new(vec![rows.len(), cols], data)
    }

    /// Equal-shaped tensors stacked along a new outermost dimension.
    pub fn stack(parts: &[Self]) -> Self {
        let mut shape = vec![parts.len()];
        shape.extend_from_slice(&parts[0].shape);
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Self::new(shape, data)
    }
}

/// Reads every tensor of the safetensors file at `path`, converted to f32.
pub fn read_file(path: &Path) -> Result<NamedTensors> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    let mut tensors = NamedTensors::new();
    for (name, view) in file.tensors() {
        let data =
            to_f32(&view).with_context(|| format!("tensor `{name}` of {}", path.display()))?;
        tensors.insert(name, HostTensor::new(view.shape().to_vec(), data));
    }
    Ok(tensors)
}

/// Reads the weights of a model directory: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn read_model_dir(dir: &Path) -> Result<NamedTensors> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return read_file(&single);
    }
    let index_path = dir.join("model.safetensors.index.json");
    ensure!(
        index_path.is_file(),
        "{} has neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    );
    let text = std::fs::read_to_string(&index_path)
        .with_context(|| format!("reading {}", index_path.display()))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index_path.display()))?;
    let weight_map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no `weight_map` object", index_path.display()))?;
    let mut shards: Vec<&str> = weight_map.values().filter_map(|v| v.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    let mut tensors = NamedTensors::new();
    for shard in shards {
        ensure!(
            !shard.contains('/') && !shard.contains('\\'),
            "{}: shard name `{shard}` is not a file name",
            index_path.display()
        );
        tensors.extend(read_file(&dir.join(shard))?);
    }
    Ok(tensors)
}

/// Writes `tensors` as f32 to `path` (through a temporary file renamed into place), with
/// `metadata` in the header.
pub fn write_file(
    path: &Path,
    tensors: &NamedTensors,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<(&String, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| (name, t.data.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .zip(tensors.values())
        .map(|((name, data), t)| {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), data)
                .map_err(|e| anyhow::anyhow!("tensor `{name}`: {e}"))?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("moving {} into place", path.display()))
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>> {
    let bytes = view.data();
    let values = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            bail!("dtype {other:?} is not a float type this importer reads (f32, f16, bf16, f64)")
        }
    };
    Ok(values)
}
