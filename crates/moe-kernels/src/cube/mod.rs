//! The dispatch pipeline as CubeCL kernels for every CubeCL backend (wgpu, CUDA): routing
//! (scores, top-k, weights), counting sort, permute and combine (rows moved in vectors),
//! forward and backward. The grouped matmul runs burn's own (autotuned) matmul once per
//! non-empty segment, each writing its rows of one shared output in place (faster than a
//! shared-memory tiled kernel of our own). The other fused operations
//! keep the tensor-op reference here, and so does dispatch inside
//! [`with_reference_dispatch`](crate::with_reference_dispatch).

mod kernels;

use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{DType, Device, Shape, Tensor, TensorMetadata, TensorPrimitive};
use std::ops::Range;

use burn_cubecl::kernel::matmul::{MatmulStrategy, matmul};
use burn_cubecl::kernel::{into_contiguous, slice};
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, ones, zeros_client};
use burn_cubecl::ops::reshape;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise, tensor_vector_size_parallel};

use crate::reference::dispatch::{self, segments};
use crate::reference::routing;
use crate::{Gate, MoeBackend, reference_dispatch};

/// Assignments per block of the counting sort (one unit per block and expert).
const SORT_BLOCK: usize = 128;

impl<R, F, I, BT> MoeBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    /// cubecl-wgpu 0.10 has no device-to-device copy (burn's `to_device` panics between
    /// two wgpu devices), so the tensor goes through the host: one read and one upload.
    fn transfer_forward(x: FloatTensor<Self>, device: &Device<Self>) -> FloatTensor<Self> {
        if &x.device == device {
            return x;
        }
        let shape = x.shape();
        let flat = Self::float_reshape(x, Shape::new([shape.num_elements()]));
        let data = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(flat)).into_data();
        Self::float_reshape(Self::float_from_data(data, device), shape)
    }

    fn route_forward(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        if reference_dispatch() {
            return routing::route_forward::<Self>(logits, bias, gate, top_k);
        }
        route::<R>(logits, bias, gate, top_k, I::dtype())
    }

    fn route_backward(
        logits: FloatTensor<Self>,
        experts: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        gate: Gate,
    ) -> FloatTensor<Self> {
        if reference_dispatch() {
            return routing::route_backward::<Self>(logits, experts, weights, grad, gate);
        }
        route_backward(logits, experts, weights, grad, gate)
    }

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
        if reference_dispatch() || !segments_in_place(&x, counts, weights.shape()[2]) {
            return dispatch::grouped_matmul_forward::<Self>(x, weights, counts);
        }
        let (x, weights) = (into_contiguous(x), into_contiguous(weights));
        let rows = x.shape()[0];
        let d_out = weights.shape()[2];
        let out = empty_like(&x, Shape::new([rows, d_out]), x.dtype);
        for (e, start, count) in segments(counts) {
            let x_e = rows_of(&x, start..start + count);
            segment_matmul(
                x_e,
                expert_matrix(&weights, e),
                rows_of(&out, start..start + count),
            );
        }
        out
    }

    fn grouped_matmul_backward(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [n_experts, d_in, d_out] = weights.shape().dims();
        if reference_dispatch()
            || !segments_in_place(&x, counts, d_in)
            || !aligned(&x, d_in * d_out)
        {
            return dispatch::grouped_matmul_backward::<Self>(x, weights, counts, grad);
        }
        let (x, weights, grad) = (
            into_contiguous(x),
            into_contiguous(weights),
            into_contiguous(grad),
        );
        let d_x = empty_like(&x, x.shape(), x.dtype);
        // Experts with no rows get a zero gradient.
        let d_weights = zeros_like(&x, Shape::new([n_experts, d_in, d_out]), x.dtype);
        for (e, start, count) in segments(counts) {
            let rows = start..start + count;
            let (x_e, grad_e) = (rows_of(&x, rows.clone()), rows_of(&grad, rows.clone()));
            let w_e = expert_matrix(&weights, e);
            segment_matmul(grad_e.clone(), transpose(w_e), rows_of(&d_x, rows));
            segment_matmul(transpose(x_e), grad_e, expert_matrix(&d_weights, e));
        }
        (d_x, d_weights)
    }
}

/// Whether `elements` elements of `like`'s type span a whole number of the client's buffer
/// alignment, so that a view starting there can be bound as a kernel output.
fn aligned<R: CubeRuntime>(like: &CubeTensor<R>, elements: usize) -> bool {
    let bytes = (elements * like.dtype.size()) as u64;
    bytes.is_multiple_of(like.client.properties().memory.alignment)
}

/// Whether the packed buffer `x` holds exactly the segments of `counts` and every segment of
/// a buffer with rows of `width` elements starts and ends on the buffer alignment: then each
/// segment's output is a view the matmul writes into (otherwise the reference path
/// concatenates per-segment products).
fn segments_in_place<R: CubeRuntime>(x: &CubeTensor<R>, counts: &[usize], width: usize) -> bool {
    x.shape()[0] == counts.iter().sum::<usize>()
        && counts.iter().all(|&count| aligned(x, count * width))
}

/// Rows `rows` of the contiguous matrix `tensor`: a view sharing its memory when aligned.
fn rows_of<R: CubeRuntime>(tensor: &CubeTensor<R>, rows: Range<usize>) -> CubeTensor<R> {
    let width = tensor.shape()[1];
    slice(tensor.clone(), &[rows, 0..width])
}

/// Matrix `e` (`[d_in, d_out]`) of the contiguous stack `weights: [E, d_in, d_out]`.
fn expert_matrix<R: CubeRuntime>(weights: &CubeTensor<R>, e: usize) -> CubeTensor<R> {
    let [_, d_in, d_out] = weights.shape().dims();
    let matrix = slice(weights.clone(), &[e..e + 1, 0..d_in, 0..d_out]);
    reshape(matrix, Shape::new([d_in, d_out]))
}

/// The transposed view of a float matrix (strides swapped, no copy).
fn transpose<R: CubeRuntime>(mut matrix: CubeTensor<R>) -> CubeTensor<R> {
    matrix.meta.swap(0, 1);
    matrix
}

/// `out = lhs rhs` with burn's (autotuned) matmul, written into the view `out`.
fn segment_matmul<R: CubeRuntime>(lhs: CubeTensor<R>, rhs: CubeTensor<R>, out: CubeTensor<R>) {
    let dtype = out.dtype;
    matmul(lhs, rhs, Some(out), MatmulStrategy::default(), dtype)
        .expect("matmul of a segment of well-formed matrices");
}

/// Launch geometry for one unit per element of `units`.
fn elementwise<R: CubeRuntime>(tensor: &CubeTensor<R>, units: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(&tensor.client, units);
    (
        calculate_cube_count_elemwise(&tensor.client, units, cube_dim),
        cube_dim,
    )
}

/// The widest vector the client reads fast that divides the rows of the contiguous
/// matrix `tensor` (1 when none does).
fn row_vector_size<R: CubeRuntime>(tensor: &CubeTensor<R>) -> usize {
    tensor_vector_size_parallel(
        tensor.client.io_optimized_vector_sizes(tensor.dtype.size()),
        tensor.meta.shape(),
        tensor.meta.strides(),
        1,
    )
}

/// Ones shaped like the assignments of `slot`, in the float type of `like`.
fn unit_weights<R: CubeRuntime>(like: &CubeTensor<R>, slot: &CubeTensor<R>) -> CubeTensor<R> {
    ones(like.device.clone(), slot.shape(), like.dtype)
}

/// A contiguous uninitialised tensor on `like`'s device. The kernels index their outputs
/// linearly, so the layout must be plain row-major: burn's default allocation on CUDA pads
/// rows to an aligned pitch (a `[T, 2]` i32 tensor got rows of 4), which made the routing
/// kernel's results land at the wrong tokens.
fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// Contiguous zeros on `like`'s device (see [`empty_like`]): burn's zeros, copied to a
/// row-major layout where the runtime pitched their rows.
fn zeros_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    into_contiguous(zeros_client(
        like.client.clone(),
        like.device.clone(),
        shape,
        dtype,
    ))
}

/// The route kernels' encoding of a gate: its scoring code (see [`kernels::Scoring`]),
/// whether the chosen weights are divided by their sum, and the factor applied after.
/// The one table from [`Gate`] to the kernels' arguments.
fn gate_codes(gate: Gate) -> (u32, u32, f32) {
    use kernels::Scoring;
    match gate {
        Gate::SoftmaxTopk { renormalize } => (Scoring::SOFTMAX, renormalize as u32, 1.0),
        Gate::TopkSoftmax => (Scoring::LOGITS, 1, 1.0),
        Gate::Sigmoid { scale } => (Scoring::SIGMOID, 1, scale as f32),
    }
}

fn route<R: CubeRuntime>(
    logits: CubeTensor<R>,
    bias: CubeTensor<R>,
    gate: Gate,
    top_k: usize,
    int_dtype: DType,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (logits, bias) = (into_contiguous(logits), into_contiguous(bias));
    let tokens = logits.shape()[0];
    let weights = empty_like(&logits, Shape::new([tokens, top_k]), logits.dtype);
    let experts = empty_like(&logits, Shape::new([tokens, top_k]), int_dtype);
    let (scoring, normalize, scale) = gate_codes(gate);
    let (count, dim) = elementwise(&logits, tokens);
    let dtypes = [logits.dtype.into(), int_dtype.into()];
    kernels::route_kernel::launch::<R>(
        &logits.client,
        count,
        dim,
        logits.clone().into_tensor_arg(),
        bias.into_tensor_arg(),
        weights.clone().into_tensor_arg(),
        experts.clone().into_tensor_arg(),
        scoring,
        normalize,
        scale,
        dtypes,
    );
    (weights, experts)
}

fn route_backward<R: CubeRuntime>(
    logits: CubeTensor<R>,
    experts: CubeTensor<R>,
    weights: CubeTensor<R>,
    grad: CubeTensor<R>,
    gate: Gate,
) -> CubeTensor<R> {
    let (logits, experts, weights, grad) = (
        into_contiguous(logits),
        into_contiguous(experts),
        into_contiguous(weights),
        into_contiguous(grad),
    );
    let d_logits = empty_like(&logits, logits.shape(), logits.dtype);
    let (scoring, normalize, scale) = gate_codes(gate);
    let (count, dim) = elementwise(&logits, logits.shape()[0]);
    let dtypes = [logits.dtype.into(), experts.dtype.into()];
    kernels::route_backward_kernel::launch::<R>(
        &d_logits.client,
        count,
        dim,
        logits.into_tensor_arg(),
        experts.into_tensor_arg(),
        weights.into_tensor_arg(),
        grad.into_tensor_arg(),
        d_logits.clone().into_tensor_arg(),
        scoring,
        normalize,
        scale,
        dtypes,
    );
    d_logits
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
    let out = zeros_like(&x, Shape::new([rows, d]), x.dtype);
    let vector_size = row_vector_size(&x);
    let (count, dim) = elementwise(&x, assignments * d / vector_size);
    let dtypes = [x.dtype.into(), slot.dtype.into()];
    kernels::scatter_rows_kernel::launch::<R>(
        &x.client,
        count,
        dim,
        vector_size,
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
    let vector_size = row_vector_size(&buffer);
    let (count, dim) = elementwise(&buffer, tokens * d / vector_size);
    let dtypes = [buffer.dtype.into(), slot.dtype.into()];
    kernels::gather_rows_kernel::launch::<R>(
        &out.client,
        count,
        dim,
        vector_size,
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
