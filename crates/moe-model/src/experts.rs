//! SwiGLU feed-forward networks: a dense one, and E experts stored as stacked weights so
//! they run as one batched matmul, optionally spread over several devices.

use burn::module::{
    AutodiffModule, Content, Devices, HasAutodiffModule, Module, ModuleDisplay,
    ModuleDisplayDefault, ModuleMapper, ModuleVisitor, Param, ParamId,
};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use crate::dispatch::BufferLayout;
use moe_kernels::{ExpertFfnWeights, MoeBackend, expert_ffn, linear, swiglu, transfer};

/// Dense SwiGLU: `w2(silu(w1 x) * w3 x)`, no biases.
#[derive(Module, Debug)]
pub struct SwiGlu<B: Backend> {
    /// Gate projection `d -> f`.
    pub w1: Linear<B>,
    /// Down projection `f -> d`.
    pub w2: Linear<B>,
    /// Up projection `d -> f`.
    pub w3: Linear<B>,
}

fn init_linear<B: Backend>(d_in: usize, d_out: usize, std: f64, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

impl<B: Backend> SwiGlu<B> {
    /// A SwiGLU of width `ffn_dim`; `out_std` initialises the down projection.
    pub fn new(d_model: usize, ffn_dim: usize, std: f64, out_std: f64, device: &B::Device) -> Self {
        Self {
            w1: init_linear(d_model, ffn_dim, std, device),
            w2: init_linear(ffn_dim, d_model, out_std, device),
            w3: init_linear(d_model, ffn_dim, std, device),
        }
    }

    /// Applies the FFN over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>
    where
        B: MoeBackend,
    {
        let hidden = swiglu(linear(x.clone(), &self.w1), linear(x, &self.w3));
        linear(hidden, &self.w2)
    }
}

/// The stacked weights of a group of SwiGLU experts on one device: `w1, w3: [n, d, f]` and
/// `w2: [n, f, d]`.
#[derive(Module, Debug)]
pub struct ExpertWeights<B: Backend> {
    /// Gate projections, `[n, d, f]`.
    pub w1: Param<Tensor<B, 3>>,
    /// Down projections, `[n, f, d]`.
    pub w2: Param<Tensor<B, 3>>,
    /// Up projections, `[n, d, f]`.
    pub w3: Param<Tensor<B, 3>>,
}

impl<B: Backend> ExpertWeights<B> {
    /// Runs every expert of the group on its own rows of the expert-major buffer
    /// `[rows, d]`: batched matmuls over the padded layout, the fused experts' FFN
    /// ([`moe_kernels::expert_ffn`]) over the segments of the packed layout.
    pub fn forward(&self, x: Tensor<B, 2>, layout: &BufferLayout) -> Tensor<B, 2>
    where
        B: MoeBackend,
    {
        let [rows, d] = x.dims();
        match layout {
            BufferLayout::Padded { capacity } => {
                let [n_experts, ..] = self.w1.dims();
                let x = x.reshape([n_experts, *capacity, d]);
                swiglu_ffn(x, self.w1.val(), self.w3.val(), self.w2.val()).reshape([rows, d])
            }
            BufferLayout::Packed { counts } => {
                let weights = ExpertFfnWeights {
                    gate: self.w1.val(),
                    up: self.w3.val(),
                    down: self.w2.val(),
                };
                expert_ffn(x, weights, counts)
            }
        }
    }

    /// The number of experts in the group.
    pub fn n_experts(&self) -> usize {
        self.w1.dims()[0]
    }

    /// The device the group's weights live on.
    pub fn device(&self) -> B::Device {
        self.w1.device()
    }

    /// The three weights, in field order.
    fn params(&self) -> [&Param<Tensor<B, 3>>; 3] {
        [&self.w1, &self.w2, &self.w3]
    }

    /// A group from three weights given in field order.
    fn from_params([w1, w2, w3]: [Param<Tensor<B, 3>>; 3]) -> Self {
        Self { w1, w2, w3 }
    }
}

/// `E` SwiGLU experts, stored as stacked weights so they run as one batched matmul.
///
/// By default one [`ExpertWeights`] on one device holds them all. [`Experts::place`]
/// spreads them over `D` devices, expert `e` on device `e mod D` (the first step of
/// expert parallelism): [`Experts::forward`] then sends each device the buffer rows of its
/// experts and brings their outputs back. Either way the module's record is the stacked
/// `[E, ...]` weights, so checkpoints do not depend on the placement.
#[derive(Debug, Clone)]
pub struct Experts<B: Backend> {
    /// Shard `s` holds experts `s, s + D, s + 2D, ...`, in that order, on device `s`.
    pub shards: Vec<ExpertWeights<B>>,
    /// When placed, the parameter ids of the stacked weights (a checkpoint records them;
    /// each shard's ids derive from them, so a resumed run finds its optimiser state).
    stacked_ids: Option<[ParamId; 3]>,
}

impl<B: Backend> Experts<B> {
    /// `n_experts` experts of width `ffn_dim`, normal-initialised, on one device.
    pub fn new(
        n_experts: usize,
        d_model: usize,
        ffn_dim: usize,
        std: f64,
        out_std: f64,
        device: &B::Device,
    ) -> Self {
        let init = |shape: [usize; 3], std: f64| {
            Initializer::Normal { mean: 0.0, std }.init(shape, device)
        };
        Self::from(ExpertWeights {
            w1: init([n_experts, d_model, ffn_dim], std),
            w2: init([n_experts, ffn_dim, d_model], out_std),
            w3: init([n_experts, d_model, ffn_dim], std),
        })
    }

    /// The number of experts `E`.
    pub fn n_experts(&self) -> usize {
        self.shards.iter().map(ExpertWeights::n_experts).sum()
    }

    /// The same experts with expert `e` on `devices[e mod D]` (`D = devices.len()`, at
    /// most `E`); one device gathers them back into one stacked group there.
    pub fn place(self, devices: &[B::Device]) -> Self {
        let count = devices.len();
        assert!(
            (1..=self.n_experts()).contains(&count),
            "{count} devices for {} experts",
            self.n_experts()
        );
        let ids = self.stacked_ids();
        let stacked = self.stacked();
        if count == 1 {
            return Self::from(move_weights(stacked, &devices[0]));
        }
        let home = stacked.device();
        let n_experts = stacked.n_experts();
        let shards = devices
            .iter()
            .enumerate()
            .map(|(s, device)| {
                let experts: Vec<usize> = (s..n_experts).step_by(count).collect();
                let index = index_tensor::<B>(&experts, &home);
                let params = stacked.params().map(|param| param.val());
                let params = std::array::from_fn(|i| {
                    let shard = params[i].clone().select(0, index.clone());
                    Param::initialized(shard_id(ids[i], s, count), leaf(shard, device))
                });
                ExpertWeights::from_params(params)
            })
            .collect();
        Self {
            shards,
            stacked_ids: Some(ids),
        }
    }

    /// The devices of the shards, in shard order.
    pub fn placement(&self) -> Vec<B::Device> {
        self.shards.iter().map(ExpertWeights::device).collect()
    }

    /// All experts as one stacked group on the first shard's device, in expert order,
    /// with the stacked parameter ids.
    fn stacked(self) -> ExpertWeights<B> {
        let ids = self.stacked_ids();
        let mut shards = self.shards;
        if shards.len() == 1 {
            return shards.remove(0);
        }
        let home = shards[0].device();
        // Concatenated shard by shard, expert e sits at its shard's offset plus e / D.
        let count = shards.len();
        let offsets: Vec<usize> = shards
            .iter()
            .scan(0, |offset, shard| {
                let start = *offset;
                *offset += shard.n_experts();
                Some(start)
            })
            .collect();
        let n_experts: usize = shards.iter().map(ExpertWeights::n_experts).sum();
        let rows: Vec<usize> = (0..n_experts)
            .map(|e| offsets[e % count] + e / count)
            .collect();
        let index = index_tensor::<B>(&rows, &home);
        let params = std::array::from_fn(|i| {
            let parts = shards
                .iter()
                .map(|shard| leaf(shard.params()[i].val(), &home))
                .collect();
            let stacked = Tensor::cat(parts, 0).select(0, index.clone());
            Param::initialized(ids[i], leaf(stacked, &home))
        });
        ExpertWeights::from_params(params)
    }

    /// The ids a checkpoint records for the stacked weights.
    fn stacked_ids(&self) -> [ParamId; 3] {
        self.stacked_ids
            .unwrap_or_else(|| self.shards[0].params().map(|param| param.id))
    }

    /// Runs every expert on its own rows of the expert-major buffer `[rows, d]`; see
    /// [`ExpertWeights::forward`]. When placed, each device receives the rows of its
    /// experts and returns their outputs, which are put back in buffer order here.
    pub fn forward(&self, x: Tensor<B, 2>, layout: &BufferLayout) -> Tensor<B, 2>
    where
        B: MoeBackend,
    {
        let [shard] = self.shards.as_slice() else {
            return self.forward_placed(x, layout);
        };
        shard.forward(x, layout)
    }

    fn forward_placed(&self, x: Tensor<B, 2>, layout: &BufferLayout) -> Tensor<B, 2>
    where
        B: MoeBackend,
    {
        let home = x.device();
        let count = self.shards.len();
        let rows_of = layout.expert_rows(self.n_experts());
        // `order[i]`: the buffer row of the i-th row of the concatenated shard outputs.
        let mut order = Vec::new();
        let mut outputs = Vec::new();
        for (s, shard) in self.shards.iter().enumerate() {
            let experts: Vec<usize> = (s..rows_of.len()).step_by(count).collect();
            let rows: Vec<usize> = experts.iter().flat_map(|&e| rows_of[e].clone()).collect();
            if rows.is_empty() {
                continue;
            }
            let device = shard.device();
            let input = x.clone().select(0, index_tensor::<B>(&rows, &home));
            let output = shard.forward(transfer(input, &device), &layout.subset(&experts));
            outputs.push(transfer(output, &home));
            order.extend(rows);
        }
        let mut position = vec![0; order.len()];
        for (i, row) in order.into_iter().enumerate() {
            position[row] = i;
        }
        Tensor::cat(outputs, 0).select(0, index_tensor::<B>(&position, &home))
    }
}

impl<B: Backend> From<ExpertWeights<B>> for Experts<B> {
    /// All experts in one group, on its device.
    fn from(weights: ExpertWeights<B>) -> Self {
        Self {
            shards: vec![weights],
            stacked_ids: None,
        }
    }
}

/// `indices` as an index tensor on `device`.
fn index_tensor<B: Backend>(indices: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let values: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(values, [indices.len()]), device)
}

/// `tensor` on `device` as a new leaf of the autodiff graph (a parameter, not a result).
/// Between devices the values go through the host: burn's `to_device` cannot cross two
/// wgpu devices.
fn leaf<const D: usize, B: Backend>(tensor: Tensor<B, D>, device: &B::Device) -> Tensor<B, D> {
    let tensor = if tensor.device() == *device {
        tensor.detach()
    } else {
        Tensor::from_data(tensor.into_data(), device)
    };
    tensor.require_grad()
}

/// `weights` on `device`, with their ids.
fn move_weights<B: Backend>(weights: ExpertWeights<B>, device: &B::Device) -> ExpertWeights<B> {
    if weights.device() == *device {
        return weights;
    }
    ExpertWeights::from_params(
        weights
            .params()
            .map(|param| Param::initialized(param.id, leaf(param.val(), device))),
    )
}

/// The id of shard `shard` of `count` of a stacked weight: a fixed mix of the three, so
/// the same placement of the same checkpoint gives the same ids.
fn shard_id(stacked: ParamId, shard: usize, count: usize) -> ParamId {
    // splitmix64's finaliser.
    let mut z = stacked.val() ^ ((shard as u64) << 32 | count as u64);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ParamId::from(z ^ (z >> 31))
}

/// A module by hand (not derived) so its record is the stacked weights whatever the
/// placement: the visitors and mappers of training see every shard's parameters.
impl<B: Backend> Module<B> for Experts<B> {
    type Record = ExpertWeightsRecord<B>;

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        self.shards
            .iter()
            .fold(devices, |devices, shard| shard.collect_devices(devices))
    }

    fn fork(self, device: &B::Device) -> Self {
        self.map_shards(|_, shard| shard.fork(device))
    }

    fn to_device(self, device: &B::Device) -> Self {
        self.map_shards(|_, shard| shard.to_device(device))
    }

    fn visit<V: ModuleVisitor<B>>(&self, visitor: &mut V) {
        if let [shard] = self.shards.as_slice() {
            return shard.visit(visitor);
        }
        for (s, shard) in self.shards.iter().enumerate() {
            visitor.enter_module(&s.to_string(), "Vec");
            shard.visit(visitor);
            visitor.exit_module(&s.to_string(), "Vec");
        }
    }

    fn map<M: ModuleMapper<B>>(self, mapper: &mut M) -> Self {
        if self.shards.len() == 1 {
            return self.map_shards(|_, shard| shard.map(mapper));
        }
        self.map_shards(|s, shard| {
            mapper.enter_module(&s.to_string(), "Vec");
            let shard = shard.map(mapper);
            mapper.exit_module(&s.to_string(), "Vec");
            shard
        })
    }

    fn load_record(self, record: Self::Record) -> Self {
        let devices = self.placement();
        Self::from(self.stacked().load_record(record)).place(&devices)
    }

    fn into_record(self) -> Self::Record {
        self.stacked().into_record()
    }
}

impl<B: Backend> Experts<B> {
    /// The same placement with `f(s, shard)` for each shard.
    fn map_shards(self, mut f: impl FnMut(usize, ExpertWeights<B>) -> ExpertWeights<B>) -> Self {
        Self {
            shards: self
                .shards
                .into_iter()
                .enumerate()
                .map(|(s, shard)| f(s, shard))
                .collect(),
            stacked_ids: self.stacked_ids,
        }
    }
}

impl<B: AutodiffBackend> AutodiffModule<B> for Experts<B> {
    type InnerModule = Experts<B::InnerBackend>;

    fn valid(&self) -> Self::InnerModule {
        Experts {
            shards: self.shards.iter().map(AutodiffModule::valid).collect(),
            stacked_ids: self.stacked_ids,
        }
    }

    fn from_inner(module: Self::InnerModule) -> Self {
        Self {
            shards: module
                .shards
                .into_iter()
                .map(ExpertWeights::from_inner)
                .collect(),
            stacked_ids: module.stacked_ids,
        }
    }
}

impl<B: AutodiffBackend> HasAutodiffModule<B> for Experts<B::InnerBackend> {
    type TrainModule = Experts<B>;
}

impl<B: Backend> ModuleDisplayDefault for Experts<B> {
    fn content(&self, content: Content) -> Option<Content> {
        match self.shards.as_slice() {
            [shard] => shard.content(content),
            _ => content.add("shards", &self.shards).optional(),
        }
    }
}

impl<B: Backend> ModuleDisplay for Experts<B> {}

/// `swiglu(x w1, x w3) w2`, batched over the leading axis.
fn swiglu_ffn<B: MoeBackend>(
    x: Tensor<B, 3>,
    w1: Tensor<B, 3>,
    w3: Tensor<B, 3>,
    w2: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let gate = x.clone().matmul(w1);
    let up = x.matmul(w3);
    swiglu(gate, up).matmul(w2)
}
