//! A KV cache's write on flex: the new positions copied straight into the buffer when
//! nothing else holds it.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, TensorMetadata};

use super::layout::strided;
use crate::reference;

/// In place when the buffer is contiguous f32 that nothing else holds.
pub(super) fn write_positions(
    mut buffer: FlexTensor,
    values: FlexTensor,
    start: usize,
) -> FlexTensor {
    let [b, h, len, d] = buffer.shape().dims::<4>();
    let dense = buffer.dtype() == DType::F32
        && buffer.is_contiguous()
        && buffer.layout().start_offset() == 0;
    if let Some((data, offset, [vb, vh, s, vd], strides)) = strided::<4>(&values)
        && dense
        && [vb, vh, vd] == [b, h, d]
        && start + s <= len
        && let Some(out) = buffer.try_storage_mut::<f32>()
    {
        for (i, j) in (0..b).flat_map(|i| (0..h).map(move |j| (i, j))) {
            for position in 0..s {
                let row = &mut out[((i * h + j) * len + start + position) * d..][..d];
                let first = offset + i * strides[0] + j * strides[1] + position * strides[2];
                for (k, o) in row.iter_mut().enumerate() {
                    *o = data[first + k * strides[3]];
                }
            }
        }
        return buffer;
    }
    reference::write_positions::<Flex>(buffer, values, start)
}
