//! The dispatch pipeline as CubeCL kernels for every CubeCL backend (wgpu, CUDA): counting
//! sort, permute, combine and the grouped matmul, forward and backward. The other fused
//! operations keep the tensor-op reference here, and so does dispatch inside
//! [`with_reference_dispatch`](crate::with_reference_dispatch).

mod kernels;

use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor, IntTensorOps};
use burn::tensor::{DType, Shape, TensorData, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_dtype, ones, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

use crate::reference::dispatch;
use crate::{MoeBackend, reference_dispatch};
use kernels::TILE;

/// Assignments per block of the counting sort (one unit per block and expert).
const SORT_BLOCK: usize = 128;

impl<R, F, I, BT> MoeBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn expert_slots(
        experts: IntTensor<Self>,
        n_experts: usize,
        capacity: Option<usize>,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        if reference_dispatch() {
            return dispatch::expert_slots::<Self>(experts, n_experts, capacity);
        }
        expert_slots(experts, n_experts, capacity)
    }

    fn permute_forward(
        x: FloatTensor<Self>,
        slot: IntTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self> {
        if reference_dispatch() {
            return dispatch::permute_forward::<Self>(x, slot, rows);
        }
        let weights = unit_weights(&x, &slot);
        scatter_rows(x, slot, weights, rows)
    }

    fn permute_backward(
        grad: FloatTensor<Self>,
        slot: IntTensor<Self>,
        tokens: usize,
    ) -> FloatTensor<Self> {
        if reference_dispatch() {
            return dispatch::permute_backward::<Self>(grad, slot, tokens);
        }
        let weights = unit_weights(&grad, &slot);
        gather_rows(grad, slot, weights, tokens)
    }

    fn combine_forward(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if reference_dispatch() {
            return dispatch::combine_forward::<Self>(buffer, slot, weights);
        }
        let tokens = weights.shape()[0];
        gather_rows(buffer, slot, weights, tokens)
    }

    fn combine_backward(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if reference_dispatch() {
            return dispatch::combine_backward::<Self>(buffer, slot, weights, grad);
        }
        let rows = buffer.shape()[0];
        let weights_shape = weights.shape();
        let d_weights = slot_dot(buffer, slot.clone(), grad.clone(), weights_shape);
        (scatter_rows(grad, slot, weights, rows), d_weights)
    }

    fn grouped_matmul_forward(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        if reference_dispatch() {
            return dispatch::grouped_matmul_forward::<Self>(x, weights, counts);
        }
        let tiles = Self::int_from_data(row_tiles::<I>(counts), &x.device);
        grouped_matmul(x, weights, tiles)
    }

    fn grouped_matmul_backward(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if reference_dispatch() {
            return dispatch::grouped_matmul_backward::<Self>(x, weights, counts, grad);
        }
        // d_x = grad w^T: the same kernel over the transposed (small) weights.
        let tiles = Self::int_from_data(row_tiles::<I>(counts), &x.device);
        let offsets = Self::int_from_data(segment_offsets::<I>(counts), &x.device);
        let weights_shape = weights.shape();
        let d_x = grouped_matmul(grad.clone(), Self::float_swap_dims(weights, 1, 2), tiles);
        let d_w = grouped_matmul_weight_grad(x, grad, offsets, weights_shape);
        (d_x, d_w)
    }
}

/// Launch geometry for one unit per element of `units`.
fn elementwise<R: CubeRuntime>(tensor: &CubeTensor<R>, units: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(&tensor.client, units);
    (
        calculate_cube_count_elemwise(&tensor.client, units, cube_dim),
        cube_dim,
    )
}

/// Ones shaped like the assignments of `slot`, in the float type of `like`.
fn unit_weights<R: CubeRuntime>(like: &CubeTensor<R>, slot: &CubeTensor<R>) -> CubeTensor<R> {
    ones(like.device.clone(), slot.shape(), like.dtype)
}

fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

fn expert_slots<R: CubeRuntime>(
    experts: CubeTensor<R>,
    n_experts: usize,
    capacity: Option<usize>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let experts = into_contiguous(experts);
    let assignments = experts.shape().num_elements();
    let dtype = experts.dtype;
    let n_blocks = assignments.div_ceil(SORT_BLOCK).max(1);
    let block_counts = empty_like(&experts, Shape::new([n_blocks * n_experts]), dtype);
    let counts = empty_like(&experts, Shape::new([n_experts]), dtype);
    let slot = empty_like(&experts, Shape::new([assignments]), dtype);

    let (count, dim) = elementwise(&experts, n_blocks * n_experts);
    kernels::count_blocks_kernel::launch::<R>(
        &experts.client,
        count,
        dim,
        experts.clone().into_tensor_arg(),
        block_counts.clone().into_tensor_arg(),
        n_experts as u32,
        SORT_BLOCK as u32,
        dtype.into(),
    );
    let (count, dim) = elementwise(&experts, n_experts);
    kernels::scan_blocks_kernel::launch::<R>(
        &experts.client,
        count,
        dim,
        block_counts.clone().into_tensor_arg(),
        counts.clone().into_tensor_arg(),
        dtype.into(),
    );
    let (count, dim) = elementwise(&experts, n_blocks * n_experts);
    kernels::assign_slots_kernel::launch::<R>(
        &experts.client,
        count,
        dim,
        experts.clone().into_tensor_arg(),
        block_counts.into_tensor_arg(),
        counts.clone().into_tensor_arg(),
        slot.clone().into_tensor_arg(),
        SORT_BLOCK as u32,
        capacity.unwrap_or(0) as u32,
        capacity.is_some(),
        dtype.into(),
    );
    (slot, counts)
}

/// `[rows, d]`: row `slot[a]` = `weights[a] * x[a / k]`, zero where no assignment lands.
fn scatter_rows<R: CubeRuntime>(
    x: CubeTensor<R>,
    slot: CubeTensor<R>,
    weights: CubeTensor<R>,
    rows: usize,
) -> CubeTensor<R> {
    let (x, slot, weights) = (
        into_contiguous(x),
        into_contiguous(slot),
        into_contiguous(weights),
    );
    let [tokens, d] = x.shape().dims();
    let assignments = slot.shape().num_elements();
    let out = zeros_client(
        x.client.clone(),
        x.device.clone(),
        Shape::new([rows, d]),
        x.dtype,
    );
    let (count, dim) = elementwise(&x, assignments * d);
    let dtypes = [x.dtype.into(), slot.dtype.into()];
    kernels::scatter_rows_kernel::launch::<R>(
        &x.client,
        count,
        dim,
        x.clone().into_tensor_arg(),
        slot.into_tensor_arg(),
        weights.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        (assignments / tokens) as u32,
        dtypes,
    );
    out
}

/// `[tokens, d]`: row `t` = `sum_i weights[t k + i] * buffer[slot[t k + i]]`.
fn gather_rows<R: CubeRuntime>(
    buffer: CubeTensor<R>,
    slot: CubeTensor<R>,
    weights: CubeTensor<R>,
    tokens: usize,
) -> CubeTensor<R> {
    let (buffer, slot, weights) = (
        into_contiguous(buffer),
        into_contiguous(slot),
        into_contiguous(weights),
    );
    let d = buffer.shape()[1];
    let assignments = slot.shape().num_elements();
    let out = empty_like(&buffer, Shape::new([tokens, d]), buffer.dtype);
    let (count, dim) = elementwise(&buffer, tokens * d);
    let dtypes = [buffer.dtype.into(), slot.dtype.into()];
    kernels::gather_rows_kernel::launch::<R>(
        &out.client,
        count,
        dim,
        buffer.into_tensor_arg(),
        slot.into_tensor_arg(),
        weights.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        (assignments / tokens) as u32,
        dtypes,
    );
    out
}

/// Gradient of the combine weights, shaped `weights_shape` (`[T, k]`).
fn slot_dot<R: CubeRuntime>(
    buffer: CubeTensor<R>,
    slot: CubeTensor<R>,
    grad: CubeTensor<R>,
    weights_shape: Shape,
) -> CubeTensor<R> {
    let (buffer, slot, grad) = (
        into_contiguous(buffer),
        into_contiguous(slot),
        into_contiguous(grad),
    );
    let top_k = weights_shape[1];
    let out = empty_like(&buffer, weights_shape, buffer.dtype);
    let (count, dim) = elementwise(&buffer, slot.shape().num_elements());
    let dtypes = [buffer.dtype.into(), slot.dtype.into()];
    kernels::slot_dot_kernel::launch::<R>(
        &out.client,
        count,
        dim,
        buffer.into_tensor_arg(),
        slot.into_tensor_arg(),
        grad.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        top_k as u32,
        dtypes,
    );
    out
}

/// Row tiles of the packed segments, `(expert, first row, end row)` flattened: no tile
/// crosses from one expert's rows into the next.
fn row_tiles<I: IntElement>(counts: &[usize]) -> TensorData {
    let mut tiles = Vec::new();
    let mut start = 0;
    for (expert, &count) in counts.iter().enumerate() {
        let end = start + count;
        for first in (start..end).step_by(TILE as usize) {
            let last = (first + TILE as usize).min(end);
            tiles.extend([expert, first, last].map(|v| I::from_elem(v as i64)));
        }
        start = end;
    }
    let len = tiles.len();
    TensorData::new::<I, _>(tiles, [len])
}

/// `[E + 1]` first row of each expert's segment, then the total.
fn segment_offsets<I: IntElement>(counts: &[usize]) -> TensorData {
    let offsets: Vec<I> = std::iter::once(0)
        .chain(counts.iter().scan(0, |end, &count| {
            *end += count;
            Some(*end)
        }))
        .map(|v| I::from_elem(v as i64))
        .collect();
    TensorData::new(offsets, [counts.len() + 1])
}

/// Grouped matmul over the row `tiles` of [`row_tiles`], `[rows, d_out]`.
fn grouped_matmul<R: CubeRuntime>(
    x: CubeTensor<R>,
    weights: CubeTensor<R>,
    tiles: CubeTensor<R>,
) -> CubeTensor<R> {
    let (x, weights) = (into_contiguous(x), into_contiguous(weights));
    let rows = x.shape()[0];
    let d_out = weights.shape()[2];
    let n_tiles = tiles.shape()[0] / 3;
    let out = empty_like(&x, Shape::new([rows, d_out]), x.dtype);
    if n_tiles == 0 {
        return out;
    }
    let dtypes = [x.dtype.into(), tiles.dtype.into()];
    kernels::grouped_matmul_kernel::launch::<R>(
        &x.client,
        CubeCount::Static((d_out as u32).div_ceil(TILE), n_tiles as u32, 1),
        CubeDim::new_2d(TILE, TILE),
        x.clone().into_tensor_arg(),
        weights.into_tensor_arg(),
        tiles.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtypes,
    );
    out
}

/// `[E, d_in, d_out]` weight gradient of the grouped matmul; segment `e` is rows
/// `offsets[e] .. offsets[e + 1]` (see [`segment_offsets`]).
fn grouped_matmul_weight_grad<R: CubeRuntime>(
    x: CubeTensor<R>,
    grad: CubeTensor<R>,
    offsets: CubeTensor<R>,
    weights_shape: Shape,
) -> CubeTensor<R> {
    let (x, grad) = (into_contiguous(x), into_contiguous(grad));
    let [n_experts, d_in, d_out] = weights_shape.dims();
    let out = empty_like(&x, weights_shape, x.dtype);
    let dtypes = [x.dtype.into(), offsets.dtype.into()];
    kernels::grouped_matmul_weight_grad_kernel::launch::<R>(
        &out.client,
        CubeCount::Static(
            (d_out as u32).div_ceil(TILE),
            (d_in as u32).div_ceil(TILE),
            n_experts as u32,
        ),
        CubeDim::new_2d(TILE, TILE),
        x.into_tensor_arg(),
        grad.into_tensor_arg(),
        offsets.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtypes,
    );
    out
}
