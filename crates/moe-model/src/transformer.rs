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
use moe_kernels::{MoeBackend, linear_cross_entropy, project, rms_norm};

/// The most logits [`Transformer::token_nll`] holds at once: 8 MiB of f32.
pub const LOSS_BLOCK_LOGITS: usize = 1 << 21;

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
        // Refuses shapes whose sizes overflow before anything is allocated.
        model.parameter_count(moe)?;
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
        cache: Option<&mut KvCache<B>>,
    ) -> TransformerOutput<B> {
        let (x, moe) = self.hidden(tokens, cache);
        TransformerOutput {
            logits: self.head(x),
            moe,
        }
    }

    /// The last block's output `[B, S, d]` for `tokens: [B, S]` (before the final norm and
    /// head) and the router outputs, continuing and extending `cache` when one is given.
    fn hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> (Tensor<B, 3>, MoeOutputs<B>) {
        let seq = tokens.dims()[1];
        let start = cache.as_ref().map_or(0, |c| c.len);
        let rope = self.rope(start, seq, &tokens.device());
        let out = self.run_blocks(self.embed.forward(tokens), |layer, attn, h| {
            attn.forward(h, &rope, cache.as_deref_mut().map(|c| &mut c.layers[layer]))
        });
        if let Some(cache) = cache {
            cache.len += seq;
        }
        out
    }

    /// Negative log-likelihood of each of `targets: [B, S]` after `tokens: [B, S]` (from
    /// position 0), `[B * S]` in row-major order, with the router outputs.
    ///
    /// The final norm, output projection and cross-entropy run over blocks of at most
    /// [`LOSS_BLOCK_LOGITS`] logits rather than the whole `[B * S, vocab]` at once: the
    /// gradient of a training batch's full logits (64 MiB for 16 x 256 tokens and 4096
    /// ids) is too large for the CPU allocator to reuse, so each step took it fresh from
    /// the OS, and the page faults cost about a tenth of a flex training step.
    pub fn token_nll(
        &self,
        tokens: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 1>, MoeOutputs<B>) {
        let (hidden, moe) = self.hidden(tokens, None);
        let [batch, seq, d] = hidden.dims();
        let rows = batch * seq;
        let (hidden, targets) = (hidden.reshape([1, rows, d]), targets.reshape([rows]));
        let block = (LOSS_BLOCK_LOGITS / self.model.vocab_size).max(1);
        let nll = (0..rows)
            .step_by(block)
            .map(|start| {
                let len = block.min(rows - start);
                let x = normalize(&self.norm, hidden.clone().narrow(1, start, len));
                let targets = targets.clone().narrow(0, start, len);
                linear_cross_entropy(x.reshape([len, d]), self.head_weight(), targets)
            })
            .collect();
        (Tensor::cat(nll, 0), moe)
    }

    /// Next-token logits of several sequences from one pass through the model, `[N, vocab]`:
    /// sequence i feeds its (non-empty) `inputs[i]` after the positions already in
    /// `caches[i]`, which it extends. Every layer runs once over all the new tokens (the
    /// MoE layers route them together); attention is per sequence over its own cache. This
    /// is the serving engine's batched step: prompts being read and answers being written
    /// share it.
    pub fn forward_packed(
        &self,
        inputs: &[&[u32]],
        caches: &mut [&mut KvCache<B>],
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let lens: Vec<usize> = inputs.iter().map(|input| input.len()).collect();
        let ids: Vec<i64> = inputs
            .iter()
            .flat_map(|i| i.iter().map(|&t| t as i64))
            .collect();
        let total = ids.len();
        let tokens = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), device).reshape([1, total]);
        let ropes: Vec<RopeAngles<B>> = caches
            .iter()
            .zip(&lens)
            .map(|(cache, &len)| self.rope(cache.len, len, device))
            .collect();
        let (x, _) = self.run_blocks(self.embed.forward(tokens), |layer, attn, h| {
            let mut layer_caches: Vec<_> =
                caches.iter_mut().map(|c| &mut c.layers[layer]).collect();
            attn.forward_packed(h, &lens, &ropes, &mut layer_caches)
        });
        for (cache, len) in caches.iter_mut().zip(&lens) {
            cache.len += len;
        }
        let last: Vec<i64> = lens
            .iter()
            .scan(0, |end, &len| {
                *end += len;
                Some(*end as i64 - 1)
            })
            .collect();
        let last = Tensor::<B, 1, Int>::from_ints(last.as_slice(), device);
        let logits = self.head(x.select(1, last));
        let [_, n, vocab] = logits.dims();
        logits.reshape([n, vocab])
    }

    /// Rotary angles for positions `start..start + len`.
    fn rope(&self, start: usize, len: usize, device: &B::Device) -> RopeAngles<B> {
        RopeAngles::new(
            start,
            len,
            self.model.head_dim(),
            self.model.rope_theta,
            device,
        )
    }

    /// Runs the blocks over embedded `x: [B, S, d]`; `attend(layer, attention, normed x)`
    /// performs each layer's attention (plain, cached or packed).
    fn run_blocks(
        &self,
        mut x: Tensor<B, 3>,
        mut attend: impl FnMut(usize, &Attention<B>, Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> (Tensor<B, 3>, MoeOutputs<B>) {
        let [batch, seq, d] = x.dims();
        let mut moe = Vec::new();
        for (layer, block) in self.blocks.iter().enumerate() {
            x = x.clone() + attend(layer, &block.attn, normalize(&block.attn_norm, x));
            let h = normalize(&block.ffn_norm, x.clone());
            let y = match &block.ffn {
                FeedForward::Dense(ffn) => ffn.forward(h),
                FeedForward::Moe(layer) => {
                    let out = layer.forward(h.reshape([batch * seq, d]));
                    let y = out.output.clone().reshape([batch, seq, d]);
                    moe.push(out);
                    y
                }
            };
            x = x + y;
        }
        (x, moe)
    }

    /// Final norm and output projection, `[B, S, d] -> [B, S, vocab]`.
    fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        project(normalize(&self.norm, x), self.head_weight())
    }

    /// The output projection, `[d, vocab]`: the head's weight, or the embedding's
    /// transposed when they are tied.
    fn head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.embed.weight.val().transpose(),
        }
    }
}

/// `norm` applied to `x` as one fused operation (the values of `RmsNorm::forward`).
fn normalize<B: MoeBackend>(norm: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    rms_norm(x, norm.gamma.val(), norm.epsilon)
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

    /// The same model with every MoE layer's experts spread over `devices` (expert `e` on
    /// `devices[e mod D]`, at most one device per expert); see [`crate::experts::Experts::place`].
    pub fn place_experts(mut self, devices: &[B::Device]) -> Self {
        self.blocks = self
            .blocks
            .into_iter()
            .map(|mut block| {
                block.ffn = match block.ffn {
                    FeedForward::Moe(mut layer) => {
                        layer.experts = layer.experts.place(devices);
                        FeedForward::Moe(layer)
                    }
                    dense => dense,
                };
                block
            })
            .collect();
        self
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
