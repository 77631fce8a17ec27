//! A model's parameters as named host tensors, keyed by module path with burn's layouts:
//! `embed.weight` `[V, d]`, `blocks.{i}.attn_norm.gamma`, `blocks.{i}.attn.q_proj.weight`
//! `[d_in, d_out]`, `blocks.{i}.ffn.router.gate.weight` `[d, E]`,
//! `blocks.{i}.ffn.experts.w1` `[E, d, f]`, `norm.gamma`, `lm_head.weight` `[d, V]`, ...
//! These are the names of `moe export --format safetensors`.

use anyhow::{Context, Result, bail};
use burn::module::ParamId;
use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use burn_store::{ModuleSnapshot, TensorSnapshot};
use moe_model::Transformer;

use crate::safetensors_file::{HostTensor, NamedTensors};

/// Every parameter of `model` by module path, as f32.
pub fn model_tensors<B: Backend>(model: &Transformer<B>) -> Result<NamedTensors> {
    model
        .collect(None, None, true)
        .into_iter()
        .map(|snapshot| {
            let name = snapshot.full_path();
            let data = snapshot
                .to_data()
                .map_err(|e| anyhow::anyhow!("reading parameter `{name}`: {e:?}"))?
                .convert::<f32>();
            let shape = data.shape.to_vec();
            let values = data
                .to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("reading parameter `{name}`: {e:?}"))?;
            Ok((name, HostTensor::new(shape, values)))
        })
        .collect()
}

/// `model` with every parameter replaced by the tensor of the same path in `tensors`.
/// Every parameter must be given, with its exact shape, and no tensor may be left over.
pub fn load_model_tensors<B: Backend>(
    mut model: Transformer<B>,
    tensors: NamedTensors,
) -> Result<Transformer<B>> {
    let snapshots = tensors
        .into_iter()
        .map(|(name, tensor)| {
            let path = name.split('.').map(str::to_string).collect();
            let data = TensorData::new(tensor.data, tensor.shape);
            TensorSnapshot::from_data(data, path, Vec::new(), ParamId::new())
        })
        .collect();
    let result = model.apply(snapshots, None, None, true);
    if let Some(error) = result.errors.first() {
        bail!("{error}");
    }
    if !result.missing.is_empty() {
        let names: Vec<&str> = result
            .missing
            .iter()
            .map(|(path, _)| path.as_str())
            .collect();
        bail!("missing tensors: {}", names.join(", "));
    }
    if !result.unused.is_empty() {
        bail!("unexpected tensors: {}", result.unused.join(", "));
    }
    Ok(model)
}

/// The tensor `name` of `tensors`, removed, checked to have `shape`.
pub fn take(tensors: &mut NamedTensors, name: &str, shape: &[usize]) -> Result<HostTensor> {
    let tensor = tensors
        .remove(name)
        .with_context(|| format!("tensor `{name}` is missing"))?;
    if tensor.shape != shape {
        bail!(
            "tensor `{name}` has shape {:?}, expected {shape:?}",
            tensor.shape
        );
    }
    Ok(tensor)
}
