//! A KV cache's write as a tensor op: `slice_assign` of the new positions.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, s};

use super::float;

/// `buffer` (`[B, H, L, D]`) with positions `start..start + S` of its third dimension
/// replaced by `values` (`[B, H, S, D]`), by `slice_assign`.
pub fn write_positions<B: Backend>(
    buffer: FloatTensor<B>,
    values: FloatTensor<B>,
    start: usize,
) -> FloatTensor<B> {
    let values: Tensor<B, 4> = float(values);
    let end = start + values.dims()[2];
    float::<B, 4>(buffer)
        .slice_assign(s![.., .., start..end], values)
        .into_primitive()
        .tensor()
}
