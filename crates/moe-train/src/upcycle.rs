//! `moe upcycle`: sparse upcycling (Komatsuzaki et al. 2022). Every dense feed-forward of
//! a checkpoint becomes an MoE layer whose experts all start as copies of it, behind a
//! freshly initialised router with small weights, so training continues from the dense
//! model instead of from scratch.
//!
//! The identity this relies on: when all experts of a layer are equal and the combine
//! weights of a token's k experts sum to one, the layer computes the dense FFN whatever
//! the router chooses. So upcycling keeps the router's normalisation on (softmax
//! renormalised over the k chosen, or sigmoid with route scale 1), and the upcycled model
//! reproduces the dense model's logits, up to rounding, wherever no token is dropped.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::backend::Backend;
use moe_model::{Gate, Transformer};

use crate::checkpoint::{load_source, save_model_checkpoint};
use crate::config::RunConfig;
use crate::integrity::NonFinite;
use crate::memory::MemoryEstimate;
use crate::model_tensors::{load_model_tensors, model_tensors, take};
use crate::safetensors_file::HostTensor;

/// What `moe upcycle` builds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpcycleOptions {
    /// Experts per MoE layer.
    pub n_experts: usize,
    /// Experts each token is sent to.
    pub top_k: usize,
    /// Standard deviation of the new router weights [default: `model.init_std / 10`]:
    /// small, so routing starts near uniform but ties between the identical experts are
    /// broken.
    pub router_std: Option<f64>,
}

/// The config of the upcycled model: `dense`'s with every block MoE, experts as wide as
/// the dense FFN, no shared experts, and normalised combine weights (see the module doc).
pub fn upcycled_config(dense: &RunConfig, options: &UpcycleOptions) -> Result<RunConfig> {
    let model = &dense.model;
    if let Some(layer) = (0..model.n_layers).find(|&l| model.is_moe_layer(l)) {
        bail!(
            "block {layer} of the checkpoint is already an MoE layer: upcycle takes a model whose \
             blocks are all dense (model.n_dense_layers = model.n_layers)"
        );
    }
    ensure!(
        options.n_experts >= 1 && (1..=options.n_experts).contains(&options.top_k),
        "--experts must be at least 1 and --top-k in 1..=--experts (got {} and {})",
        options.n_experts,
        options.top_k
    );
    if let Some(std) = options.router_std {
        ensure!(
            std.is_finite() && std > 0.0,
            "--router-std must be a positive number, got {std}"
        );
    }
    let mut config = dense.clone();
    config.model.n_dense_layers = 0;
    config.model.moe_layer_interval = 1;
    let moe = &mut config.moe;
    moe.n_experts = options.n_experts;
    moe.top_k = options.top_k;
    moe.expert_ffn_dim = model.dense_ffn_dim;
    moe.n_shared_experts = 0;
    moe.router = match moe.router {
        Gate::SoftmaxTopk { .. } => Gate::SoftmaxTopk { renormalize: true },
        Gate::Sigmoid { .. } => Gate::Sigmoid { scale: 1.0 },
        Gate::TopkSoftmax => Gate::TopkSoftmax,
    };
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(config)
}

/// The upcycled model of `dense` (built from `dense_config`) and its config. The router
/// weights are burn's normal initialisation rescaled to `options.router_std`, seeded by
/// `train.seed`.
pub fn upcycle<B: Backend>(
    dense: &Transformer<B>,
    dense_config: &RunConfig,
    options: &UpcycleOptions,
    device: &B::Device,
) -> Result<(Transformer<B>, RunConfig)> {
    let config = upcycled_config(dense_config, options)?;
    // The new model, its host copy and the stacked dense weights.
    MemoryEstimate::weights(&config, 3)?.ensure_fits()?;
    let (d, f, e) = (
        config.model.d_model,
        config.model.dense_ffn_dim,
        options.n_experts,
    );
    B::seed(device, config.train.seed);
    let fresh = Transformer::<B>::new(&config.model, &config.moe, device)?;
    let mut fresh_tensors = model_tensors(&fresh)?;
    let mut tensors = model_tensors(dense)?;
    let init_std = config.model.init_std;
    let router_scale = (options.router_std.unwrap_or(init_std / 10.0) / init_std) as f32;
    for layer in 0..config.model.n_layers {
        let ffn = format!("blocks.{layer}.ffn");
        for (name, shape) in [("w1", [d, f]), ("w2", [f, d]), ("w3", [d, f])] {
            let dense_weight = take(&mut tensors, &format!("{ffn}.{name}.weight"), &shape)?;
            let copies = vec![dense_weight; e];
            tensors.insert(format!("{ffn}.experts.{name}"), HostTensor::stack(&copies));
        }
        for name in ["router.gate.weight", "router.expert_bias"] {
            let name = format!("{ffn}.{name}");
            let mut tensor = fresh_tensors
                .remove(&name)
                .with_context(|| format!("the upcycled model has no `{name}`"))?;
            if name.ends_with("gate.weight") {
                tensor.data.iter_mut().for_each(|w| *w *= router_scale);
            }
            tensors.insert(name, tensor);
        }
    }
    let model = load_model_tensors(fresh, tensors).context("building the upcycled model")?;
    Ok((model, config))
}

/// Upcycles the dense checkpoint `from` (or a run directory's latest) into the new
/// checkpoint directory `out`, with the dense checkpoint's tokenizer.
pub fn upcycle_checkpoint<B: Backend>(
    from: &Path,
    out: &Path,
    options: &UpcycleOptions,
    device: &B::Device,
) -> Result<()> {
    let (dense, dense_config, tokenizer) = load_source::<B>(from, out, device, NonFinite::Refuse)?;
    let (model, config) = upcycle(&dense, &dense_config, options, device)?;
    save_model_checkpoint(out, &model, &config, tokenizer.as_ref())
}
