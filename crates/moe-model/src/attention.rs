//! Causal multi-head self-attention with RoPE, grouped-query heads and a KV cache.

use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::rope::RopeAngles;
use moe_kernels::{MoeBackend, causal_attention, linear, write_positions};

/// Keys and values seen so far by one attention layer: the first `len` positions of
/// buffers `[B, kv_heads, capacity, head_dim]` that double when full. A step writes only
/// its own positions ([`write_positions`]: in place on flex), where concatenating would
/// copy the whole cache and allocate a buffer one token longer every token.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    len: usize,
}

impl<B: MoeBackend> LayerCache<B> {
    /// Positions a new cache holds before it first grows.
    const MIN_CAPACITY: usize = 64;

    /// `cache` extended by `keys` and `values` (`[B, kv_heads, S, head_dim]`), and views of
    /// all its positions.
    fn extend(
        cache: Option<Self>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> (Self, Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, heads, new, head_dim] = keys.dims();
        let start = cache.as_ref().map_or(0, |cache| cache.len);
        let end = start + new;
        let (past_keys, past_values) = match cache {
            Some(cache) if end <= cache.keys.dims()[2] => (cache.keys, cache.values),
            cache => {
                let capacity = cache.as_ref().map_or(0, |cache| cache.keys.dims()[2]);
                let capacity = end.max(2 * capacity).max(Self::MIN_CAPACITY);
                let larger = |past: Option<Tensor<B, 4>>| {
                    let buffer = Tensor::zeros([batch, heads, capacity, head_dim], &keys.device());
                    match past {
                        Some(past) if start > 0 => {
                            write_positions(buffer, past.narrow(2, 0, start), 0)
                        }
                        _ => buffer,
                    }
                };
                let (keys, values) = cache.map(|c| (c.keys, c.values)).unzip();
                (larger(keys), larger(values))
            }
        };
        let cache = Self {
            keys: write_positions(past_keys, keys, start),
            values: write_positions(past_values, values, start),
            len: end,
        };
        let keys = cache.keys.clone().narrow(2, 0, end);
        let values = cache.values.clone().narrow(2, 0, end);
        (cache, keys, values)
    }
}

/// Self-attention with separate q/k/v/o projections (no biases), as in Mixtral.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection `d -> heads * head_dim`.
    pub q_proj: Linear<B>,
    /// Key projection `d -> kv_heads * head_dim`.
    pub k_proj: Linear<B>,
    /// Value projection `d -> kv_heads * head_dim`.
    pub v_proj: Linear<B>,
    /// Output projection `heads * head_dim -> d`.
    pub o_proj: Linear<B>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// Attention over width `d_model`; `out_std` initialises the output projection.
    pub fn new(
        d_model: usize,
        n_heads: usize,
        n_kv_heads: usize,
        std: f64,
        out_std: f64,
        device: &B::Device,
    ) -> Self {
        let head_dim = d_model / n_heads;
        let linear = |d_in, d_out, std| {
            LinearConfig::new(d_in, d_out)
                .with_bias(false)
                .with_initializer(Initializer::Normal { mean: 0.0, std })
                .init(device)
        };
        Self {
            q_proj: linear(d_model, n_heads * head_dim, std),
            k_proj: linear(d_model, n_kv_heads * head_dim, std),
            v_proj: linear(d_model, n_kv_heads * head_dim, std),
            o_proj: linear(n_heads * head_dim, d_model, out_std),
            n_heads,
            n_kv_heads,
            head_dim,
        }
    }
}

impl<B: MoeBackend> Attention<B> {
    /// Attends `x: [B, S, d]` causally over the cached positions and itself.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeAngles<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let [q, k, v] = self.project(x);
        linear(self.attend(q, k, v, rope, cache), &self.o_proj)
    }

    /// Attends several independent sequences packed one after another in `x: [1, T, d]`:
    /// sequence i owns the next `lens[i]` positions, continues its own cache `caches[i]`
    /// at the positions of `ropes[i]`, and sees nothing of the others. The projections run
    /// once over all T positions; only the attention itself is per sequence.
    pub fn forward_packed(
        &self,
        x: Tensor<B, 3>,
        lens: &[usize],
        ropes: &[RopeAngles<B>],
        caches: &mut [&mut Option<LayerCache<B>>],
    ) -> Tensor<B, 3> {
        let [q, k, v] = self.project(x);
        let mut start = 0;
        let mut outputs = Vec::with_capacity(lens.len());
        for ((&len, rope), cache) in lens.iter().zip(ropes).zip(caches.iter_mut()) {
            let part = |t: &Tensor<B, 3>| t.clone().narrow(1, start, len);
            outputs.push(self.attend(part(&q), part(&k), part(&v), rope, Some(&mut **cache)));
            start += len;
        }
        linear(Tensor::cat(outputs, 1), &self.o_proj)
    }

    /// Query, key and value projections of `x: [B, S, d]`.
    fn project(&self, x: Tensor<B, 3>) -> [Tensor<B, 3>; 3] {
        [
            linear(x.clone(), &self.q_proj),
            linear(x.clone(), &self.k_proj),
            linear(x, &self.v_proj),
        ]
    }

    /// Causal attention of projected `q, k, v: [B, S, heads * head_dim]` at the positions of
    /// `rope`, after the cached ones (which it extends); returns `[B, S, heads * head_dim]`.
    fn attend(
        &self,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        rope: &RopeAngles<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = q.dims();
        let split = |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, self.head_dim]);
        let q = rope.apply(split(q, self.n_heads));
        let mut k = rope.apply(split(k, self.n_kv_heads));
        let mut v = split(v, self.n_kv_heads).swap_dims(1, 2);
        if let Some(cache) = cache {
            let extended;
            (extended, k, v) = LayerCache::extend(cache.take(), k, v);
            *cache = Some(extended);
        }
        let out = causal_attention(q, self.repeat_kv(k), self.repeat_kv(v));
        out.swap_dims(1, 2)
            .reshape([batch, seq, self.n_heads * self.head_dim])
    }

    /// Repeats each key/value head for the query heads that share it.
    fn repeat_kv(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let groups = self.n_heads / self.n_kv_heads;
        if groups == 1 {
            return x;
        }
        let [b, kv, len, d] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv, groups, len, d])
            .reshape([b, kv * groups, len, d])
    }
}
