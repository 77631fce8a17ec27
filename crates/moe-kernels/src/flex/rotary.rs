//! Rotary embedding on flex: each output row rotated from its input row in one parallel
//! pass, the layout change (`[B, S, H, D]` to head-major and back) folded into the row
//! order instead of a separate copy.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Shape, TensorMetadata};

use super::layout::{f32_rows, tensor};
use super::output::{par_rows, write_row};
use crate::reference;

/// [`crate::MoeBackend::rotary_forward`] on f32 tensors.
pub(super) fn rotary_forward(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
    let [batch, seq, heads, dim] = x.shape().dims::<4>();
    match rotate_rows(&x, &cos, &sin, 1.0, [batch, heads, seq, dim], |row| {
        // Output row (b, h, s) reads input row (b, s, h) at position s.
        let (b, h, s) = (row / (heads * seq), row / seq % heads, row % seq);
        ((b * seq + s) * heads + h, s)
    }) {
        Some(output) => output,
        None => reference::rotary_forward::<Flex>(x, cos, sin),
    }
}

/// [`crate::MoeBackend::rotary_backward`] on f32 tensors.
pub(super) fn rotary_backward(grad: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
    let [batch, heads, seq, dim] = grad.shape().dims::<4>();
    match rotate_rows(&grad, &cos, &sin, -1.0, [batch, seq, heads, dim], |row| {
        // Output row (b, s, h) reads gradient row (b, h, s) at position s.
        let (b, s, h) = (row / (seq * heads), row / heads % seq, row % heads);
        ((b * heads + h) * seq + s, s)
    }) {
        Some(output) => output,
        None => reference::rotary_backward::<Flex>(grad, cos, sin),
    }
}

/// Rotates rows of `input` by the angles of their position (`sign = -1` rotates back)
/// into a tensor of `out_shape`; `source(row)` gives the input row and position of each
/// output row. `None` when a tensor is not f32.
fn rotate_rows(
    input: &FlexTensor,
    cos: &FlexTensor,
    sin: &FlexTensor,
    sign: f32,
    out_shape: [usize; 4],
    source: impl Fn(usize) -> (usize, usize) + Sync,
) -> Option<FlexTensor> {
    let (x, cos, sin) = (f32_rows(input)?, f32_rows(cos)?, f32_rows(sin)?);
    let dim = out_shape[3];
    if !dim.is_multiple_of(2) {
        return None;
    }
    let half = dim / 2;
    /// The two halves of row `row` (of `2 * half`) of `values`.
    fn halves(values: &[f32], row: usize, half: usize) -> (&[f32], &[f32]) {
        values[row * 2 * half..(row + 1) * 2 * half].split_at(half)
    }
    // SAFETY: each row is written whole, as its two halves.
    let output = unsafe {
        par_rows(
            x.len() / dim.max(1),
            dim,
            #[inline(always)]
            |row, out| {
                let (input_row, position) = source(row);
                let (first, second) = halves(&x, input_row, half);
                let ((cos_first, cos_second), (sin_first, sin_second)) =
                    (halves(&cos, position, half), halves(&sin, position, half));
                let (out_first, out_second) = out.split_at_mut(half);
                let pairs = first.iter().zip(second);
                let angles = cos_first.iter().zip(sin_first);
                let rotated = pairs.clone().zip(angles);
                write_row(
                    out_first,
                    rotated.map(|((&a, &b), (&c, &s))| a * c - sign * b * s),
                );
                let angles = cos_second.iter().zip(sin_second);
                let rotated = pairs.zip(angles);
                write_row(
                    out_second,
                    rotated.map(|((&a, &b), (&c, &s))| b * c + sign * a * s),
                );
            },
        )
    };
    Some(tensor(output, Shape::new(out_shape)))
}
