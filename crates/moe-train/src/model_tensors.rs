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

/// Grows the vocabulary of a model's tensors to `vocab_size` ids: the embedding gets new
/// rows and the output projection (when not tied) new columns, each the mean of the
/// existing ones, so a new token (a chat template's marker added to the tokenizer) starts
/// as an average token rather than as noise. A smaller `vocab_size` is refused.
pub fn grow_vocabulary(tensors: &mut NamedTensors, vocab_size: usize) -> Result<()> {
    let embed = tensors
        .get_mut("embed.weight")
        .context("tensor `embed.weight` is missing")?;
    let [old, d] = embed.shape[..] else {
        bail!(
            "`embed.weight` has shape {:?}, expected [V, d]",
            embed.shape
        );
    };
    if vocab_size < old {
        bail!("cannot shrink the vocabulary from {old} to {vocab_size} tokens");
    }
    let mean: Vec<f32> = (0..d)
        .map(|j| (0..old).map(|i| embed.data[i * d + j]).sum::<f32>() / old as f32)
        .collect();
    for _ in old..vocab_size {
        embed.data.extend_from_slice(&mean);
    }
    embed.shape = vec![vocab_size, d];
    if let Some(head) = tensors.get_mut("lm_head.weight") {
        let [rows, columns] = head.shape[..] else {
            bail!(
                "`lm_head.weight` has shape {:?}, expected [d, V]",
                head.shape
            );
        };
        if columns != old {
            bail!("`lm_head.weight` has {columns} columns for {old} embeddings");
        }
        let mut data = Vec::with_capacity(rows * vocab_size);
        for row in head.data.chunks_exact(columns) {
            let mean = row.iter().sum::<f32>() / columns as f32;
            data.extend_from_slice(row);
            data.resize(data.len() + vocab_size - columns, mean);
        }
        *head = HostTensor::new(vec![rows, vocab_size], data);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_appends_mean_rows_and_columns() {
        let mut tensors = NamedTensors::new();
        tensors.insert(
            "embed.weight".into(),
            HostTensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 6.0]),
        );
        tensors.insert(
            "lm_head.weight".into(),
            HostTensor::new(vec![2, 2], vec![1.0, 3.0, 0.0, -4.0]),
        );
        grow_vocabulary(&mut tensors, 3).unwrap();
        assert_eq!(tensors["embed.weight"].shape, [3, 2]);
        assert_eq!(tensors["embed.weight"].data, [1.0, 2.0, 3.0, 6.0, 2.0, 4.0]);
        assert_eq!(tensors["lm_head.weight"].shape, [2, 3]);
        assert_eq!(
            tensors["lm_head.weight"].data,
            [1.0, 3.0, 2.0, 0.0, -4.0, -2.0]
        );
        assert!(grow_vocabulary(&mut tensors, 2).is_err(), "never shrinks");
    }
}
