//! Reading and making flex tensors: f32 values as row-major slices or strided views, integer
//! indices as `usize`, and tensors from the vectors the kernels write. Every reader returns
//! `None` where a kernel does not apply (another dtype, rank or layout), and the caller then
//! takes the reference path.

use std::borrow::Cow;

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Shape, TensorData, TensorMetadata};

use super::{attention, matmul};
use crate::reference_dispatch;

/// A rank-4 f32 tensor as per-head matrices read through its strides; `None` for other
/// dtypes or ranks and for negative strides.
pub(super) fn heads(tensor: &FlexTensor) -> Option<attention::Heads<'_>> {
    let (data, offset, shape, strides) = strided(tensor)?;
    Some(attention::Heads {
        data,
        offset,
        shape,
        strides,
    })
}

/// A rank-2 f32 tensor as a matrix read through its strides (a transposed weight is
/// not copied); `None` for other dtypes or ranks and for negative strides.
pub(super) fn matrix(tensor: &FlexTensor) -> Option<matmul::Matrix<'_>> {
    let (data, offset, shape, strides) = strided(tensor)?;
    Some(matmul::Matrix::strided(data, offset, shape, strides))
}

/// An f32 tensor's `(storage, offset, shape, strides)`.
pub(super) type Strided<'a, const R: usize> = (&'a [f32], usize, [usize; R], [usize; R]);

/// An f32 tensor of rank `R` as [`Strided`]; `None` for other dtypes or ranks and for
/// negative strides.
pub(super) fn strided<const R: usize>(tensor: &FlexTensor) -> Option<Strided<'_, R>> {
    let layout = tensor.layout();
    let shape = layout.shape().as_slice().try_into().ok()?;
    let strides: Vec<usize> = layout
        .strides()
        .iter()
        .map(|&s| usize::try_from(s).ok())
        .collect::<Option<_>>()?;
    let strides = strides.try_into().ok()?;
    (tensor.dtype() == DType::F32).then(|| {
        (
            tensor.storage::<f32>(),
            layout.start_offset(),
            shape,
            strides,
        )
    })
}

/// The tensor's values in row-major order when it holds f32 (copied only if strided).
pub(super) fn f32_rows(tensor: &FlexTensor) -> Option<Cow<'_, [f32]>> {
    if tensor.dtype() != DType::F32 {
        return None;
    }
    match tensor.as_slice::<f32>() {
        Some(values) => Some(Cow::Borrowed(values)),
        None => Some(Cow::Owned(
            tensor.to_contiguous().as_slice::<f32>()?.to_vec(),
        )),
    }
}

/// An f32 tensor as one a kernel may overwrite: itself when it is contiguous from the
/// start of its storage and holds the only reference to it, else a contiguous copy.
pub(super) fn writable(tensor: FlexTensor) -> FlexTensor {
    let n = tensor.shape().num_elements();
    let in_place = tensor.is_unique()
        && tensor.is_contiguous()
        && tensor.layout().start_offset() == 0
        && tensor.storage::<f32>().len() == n;
    if in_place {
        return tensor;
    }
    let contiguous = tensor.to_contiguous();
    let start = contiguous.layout().start_offset();
    let values = contiguous.storage::<f32>()[start..start + n].to_vec();
    self::tensor(values, tensor.shape())
}

/// The rows of a dispatch operand, unless the reference path is asked for
/// ([`crate::with_reference_dispatch`]) or the tensor is not f32.
pub(super) fn dispatch_rows(tensor: &FlexTensor) -> Option<Cow<'_, [f32]>> {
    if reference_dispatch() {
        return None;
    }
    f32_rows(tensor)
}

/// [`dispatch_rows`] of a packed expert buffer holding exactly the segments of `counts`.
pub(super) fn packed_rows<'a>(tensor: &'a FlexTensor, counts: &[usize]) -> Option<Cow<'a, [f32]>> {
    (tensor.shape()[0] == counts.iter().sum::<usize>())
        .then(|| dispatch_rows(tensor))
        .flatten()
}

/// Integer indices as `usize`, for the integer dtypes flex uses.
pub(super) fn indices(tensor: &FlexTensor) -> Option<Vec<usize>> {
    let tensor = tensor.to_contiguous();
    match tensor.dtype() {
        DType::I32 => Some(
            tensor
                .as_slice::<i32>()?
                .iter()
                .map(|&i| i as usize)
                .collect(),
        ),
        DType::I64 => Some(
            tensor
                .as_slice::<i64>()?
                .iter()
                .map(|&i| i as usize)
                .collect(),
        ),
        _ => None,
    }
}

/// A 1-d integer tensor of `values` in `dtype` (I32 or I64, as [`indices`] reads).
pub(super) fn int_tensor(values: &[usize], dtype: DType) -> FlexTensor {
    let shape = Shape::new([values.len()]);
    let data = match dtype {
        DType::I32 => TensorData::new(values.iter().map(|&v| v as i32).collect(), shape),
        _ => TensorData::new(values.iter().map(|&v| v as i64).collect(), shape),
    };
    FlexTensor::from_data(data)
}

/// An f32 tensor of `values` (row-major) shaped `shape`.
pub(super) fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}
