//! The decoder-only transformer: embedding, blocks of attention + (dense or MoE) FFN, head.

use burn::module::Module;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::attention::{Attention, LayerCache};
use crate::config::{ConfigError, ModelConfig, MoeConfig};
use crate::experts::SwiGlu;
use crate::moe::{MoeLayer, MoeOutput};
use crate::rope::RopeAngles;
use moe_kernels::MoeBackend;

/// The feed-forward half of a block.
// Variants stay unboxed: burn's Module derive handles plain module fields.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    /// A dense SwiGLU.
    Dense(SwiGlu<B>),
    /// A mixture of experts.
    Moe(MoeLayer<B>),
}

/// Pre-norm block: `x + attn(norm(x))`, then `x + ffn(norm(x))`.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Norm before attention.
    pub attn_norm: RmsNorm<B>,
    /// Causal self-attention.
    pub attn: Attention<B>,
    /// Norm before the feed-forward.
    pub ffn_norm: RmsNorm<B>,
    /// Dense or MoE feed-forward.
    pub ffn: FeedForward<B>,
}

/// Per-layer router outputs of one forward pass, for losses and metrics.
pub type MoeOutputs<B> = Vec<MoeOutput<B>>;

/// Logits and the router outputs of every MoE layer.
#[derive(Debug, Clone)]
pub struct TransformerOutput<B: Backend> {
    /// `[B, S, vocab]`.
    pub logits: Tensor<B, 3>,
    /// One entry per MoE layer, in layer order.
    pub moe: MoeOutputs<B>,
}

/// Keys and values of every layer, for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerCache<B>>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A sparse MoE language model.
#[derive(Module, Debug)]
pub struct Transformer<B: Backend> {
    /// Token embedding `[vocab, d]`.
    pub embed: Embedding<B>,
    /// The blocks, in order.
    pub blocks: Vec<Block<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Output projection; `None` when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    model: ModelConfig,
    #[module(skip)]
    moe: MoeConfig,
}

impl<B: Backend> Transformer<B> {
    /// Builds a freshly initialised model after validating both configs.
    pub fn new(
        model: &ModelConfig,
        moe: &MoeConfig,
        device: &B::Device,
    ) -> Result<Self, ConfigError> {
        model.validate()?;
        moe.validate()?;
        let d = model.d_model;
        let std = model.init_std;
        // GPT-2 style: projections writing into the residual stream start smaller.
        let out_std = std / (2.0 * model.n_layers as f64).sqrt();
        let norm = || {
            RmsNormConfig::new(d)
                .with_epsilon(model.norm_eps)
                .init(device)
        };
        let blocks = (0..model.n_layers)
            .map(|layer| Block {
                attn_norm: norm(),
                attn: Attention::new(d, model.n_heads, model.kv_heads(), std, out_std, device),
                ffn_norm: norm(),
                ffn: if model.is_moe_layer(layer) {
                    FeedForward::Moe(MoeLayer::new(d, moe, std, out_std, device))
                } else {
                    FeedForward::Dense(SwiGlu::new(d, model.dense_ffn_dim, std, out_std, device))
                },
            })
            .collect();
        let init = Initializer::Normal { mean: 0.0, std };
        let lm_head = (!model.tie_embeddings).then(|| {
            LinearConfig::new(d, model.vocab_size)
                .with_bias(false)
                .with_initializer(init.clone())
                .init(device)
        });
        Ok(Self {
            embed: EmbeddingConfig::new(model.vocab_size, d)
                .with_initializer(init)
                .init(device),
            blocks,
            norm: norm(),
            lm_head,
            model: model.clone(),
            moe: moe.clone(),
        })
    }

    /// The model shape it was built with.
    pub fn model_config(&self) -> &ModelConfig {
        &self.model
    }

    /// The MoE settings it was built with.
    pub fn moe_config(&self) -> &MoeConfig {
        &self.moe
    }
}

impl<B: MoeBackend> Transformer<B> {
    /// Full forward over `tokens: [B, S]` starting at position 0.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> TransformerOutput<B> {
        self.forward_cached(tokens, None)
    }

    /// Forward that continues from (and extends) a KV cache when one is given.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> TransformerOutput<B> {
        let [batch, seq] = tokens.dims();
        let device = tokens.device();
        let start = cache.as_ref().map_or(0, |c| c.len);
        let rope = RopeAngles::new(
            start,
            seq,
            self.model.head_dim(),
            self.model.rope_theta,
            &device,
        );
        let mut x = self.embed.forward(tokens);
        let mut moe = Vec::new();
        for (layer, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[layer]);
            x = x.clone()
                + block
                    .attn
                    .forward(block.attn_norm.forward(x), &rope, layer_cache);
            let h = block.ffn_norm.forward(x.clone());
            let y = match &block.ffn {
                FeedForward::Dense(ffn) => ffn.forward(h),
                FeedForward::Moe(layer) => {
                    let d = self.model.d_model;
                    let out = layer.forward(h.reshape([batch * seq, d]));
                    let y = out.output.clone().reshape([batch, seq, d]);
                    moe.push(out);
                    y
                }
            };
            x = x + y;
        }
        if let Some(cache) = cache {
            cache.len += seq;
        }
        let x = self.norm.forward(x);
        let logits = match &self.lm_head {
            Some(head) => head.forward(x),
            None => x.matmul(self.embed.weight.val().transpose().unsqueeze()),
        };
        TransformerOutput { logits, moe }
    }
}

impl<B: Backend> Transformer<B> {
    /// Weighted router losses summed over MoE layers:
    /// `sum_l aux_loss_weight * balance_l + z_loss_weight * z_l`, `[1]`.
    pub fn router_loss(&self, moe: &MoeOutputs<B>, device: &B::Device) -> Tensor<B, 1> {
        moe.iter().fold(Tensor::zeros([1], device), |acc, out| {
            acc + out.balance_loss.clone() * self.moe.aux_loss_weight
                + out.z_loss.clone() * self.moe.z_loss_weight
        })
    }

    /// Applies the aux-loss-free bias update to every MoE layer, given each layer's expert
    /// counts for the step (in MoE-layer order).
    pub fn update_expert_bias(mut self, counts: Vec<Tensor<B, 1, Int>>) -> Self {
        if self.moe.bias_update_rate <= 0.0 {
            return self;
        }
        let mut counts = counts.into_iter();
        self.blocks = self
            .blocks
            .into_iter()
            .map(|mut block| {
                block.ffn = match block.ffn {
                    FeedForward::Moe(layer) => match counts.next() {
                        Some(c) => FeedForward::Moe(layer.update_bias(c)),
                        None => FeedForward::Moe(layer),
                    },
                    dense => dense,
                };
                block
            })
            .collect();
        self
    }
}
