//! CPU kernels for burn's `flex` backend: each fused operation is one pass over contiguous
//! f32 rows, parallel over rows with rayon. Other dtypes take the reference path.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape, TensorData, TensorMetadata};
use rayon::prelude::*;
use std::borrow::Cow;

use super::{MoeBackend, reference};

/// Rows handed to one rayon task: enough work to amortise the task, small enough to
/// balance two to sixteen cores.
const ROWS_PER_TASK: usize = 16;

/// Elements per rayon task in elementwise kernels.
const ELEMENTWISE_CHUNK: usize = 4096;

impl MoeBackend for Flex {
    fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (Some(g), Some(u)) = (f32_rows(&gate), f32_rows(&up)) else {
            return reference::swiglu_forward::<Self>(gate, up);
        };
        let mut output = vec![0.0f32; g.len()];
        output
            .par_chunks_mut(ELEMENTWISE_CHUNK)
            .enumerate()
            .for_each(|(chunk, out)| {
                let start = chunk * ELEMENTWISE_CHUNK;
                for ((o, &g), &u) in out.iter_mut().zip(&g[start..]).zip(&u[start..]) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
        tensor(output, gate.shape())
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (Some(g), Some(u), Some(dy)) = (f32_rows(&gate), f32_rows(&up), f32_rows(&grad)) else {
            return reference::swiglu_backward::<Self>(gate, up, grad);
        };
        let (mut d_gate, mut d_up) = (vec![0.0f32; g.len()], vec![0.0f32; g.len()]);
        d_gate
            .par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(d_up.par_chunks_mut(ELEMENTWISE_CHUNK))
            .enumerate()
            .for_each(|(chunk, (d_gate, d_up))| {
                let start = chunk * ELEMENTWISE_CHUNK;
                let inputs = g[start..].iter().zip(&u[start..]).zip(&dy[start..]);
                for ((dg, du), ((&g, &u), &dy)) in d_gate.iter_mut().zip(d_up).zip(inputs) {
                    let s = 1.0 / (1.0 + (-g).exp());
                    *du = dy * g * s;
                    *dg = dy * u * s * (1.0 + g * (1.0 - s));
                }
            });
        (tensor(d_gate, gate.shape()), tensor(d_up, gate.shape()))
    }

    fn rotary_forward(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [batch, seq, heads, dim] = x.shape().dims::<4>();
        match rotate_rows(&x, &cos, &sin, 1.0, [batch, heads, seq, dim], |row| {
            // Output row (b, h, s) reads input row (b, s, h) at position s.
            let (b, h, s) = (row / (heads * seq), row / seq % heads, row % seq);
            ((b * seq + s) * heads + h, s)
        }) {
            Some(output) => output,
            None => reference::rotary_forward::<Self>(x, cos, sin),
        }
    }

    fn rotary_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [batch, heads, seq, dim] = grad.shape().dims::<4>();
        match rotate_rows(&grad, &cos, &sin, -1.0, [batch, seq, heads, dim], |row| {
            // Output row (b, s, h) reads gradient row (b, h, s) at position s.
            let (b, s, h) = (row / (seq * heads), row / heads % seq, row % heads);
            ((b * heads + h) * seq + s, s)
        }) {
            Some(output) => output,
            None => reference::rotary_backward::<Self>(grad, cos, sin),
        }
    }

    fn causal_softmax(scores: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let Some(input) = f32_rows(&scores) else {
            return reference::causal_softmax::<Self>(scores, scale);
        };
        let shape = scores.shape();
        let dims = shape.dims::<4>();
        let (queries, keys) = (dims[2], dims[3]);
        let mut output = vec![0.0f32; input.len()];
        par_rows(&mut output, keys, |row, out| {
            let visible = keys - queries + row % queries + 1;
            let x = &input[row * keys..row * keys + visible];
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
            let mut sum = 0.0;
            for (o, &v) in out[..visible].iter_mut().zip(x) {
                *o = (v * scale - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            out[..visible].iter_mut().for_each(|o| *o *= inv);
        });
        tensor(output, shape)
    }

    fn softmax_backward(probs: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let (Some(p), Some(g)) = (f32_rows(&probs), f32_rows(&grad)) else {
            return reference::softmax_backward::<Self>(probs, grad);
        };
        let shape = probs.shape();
        let len = *shape.as_slice().last().expect("softmax_backward: rank 0");
        let mut output = vec![0.0f32; p.len()];
        par_rows(&mut output, len, |row, out| {
            let p = &p[row * len..(row + 1) * len];
            let g = &g[row * len..(row + 1) * len];
            let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
            for ((o, p), g) in out.iter_mut().zip(p).zip(g) {
                *o = p * (g - dot);
            }
        });
        tensor(output, shape)
    }

    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (Some(x), Some(targets_host)) = (f32_rows(&logits), indices(&targets)) else {
            return reference::cross_entropy_forward::<Self>(logits, targets);
        };
        let [rows, vocab] = logits.shape().dims::<2>();
        let mut out = vec![[0.0f32; 2]; rows];
        out.par_iter_mut().enumerate().for_each(|(row, out)| {
            let x = &x[row * vocab..(row + 1) * vocab];
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f32 = x.iter().map(|&v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            *out = [lse - x[targets_host[row]], lse];
        });
        let (nll, lse) = out.into_iter().map(|[n, l]| (n, l)).unzip();
        (
            tensor(nll, Shape::new([rows])),
            tensor(lse, Shape::new([rows])),
        )
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        logsumexp: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (Some(x), Some(lse), Some(g), Some(targets_host)) = (
            f32_rows(&logits),
            f32_rows(&logsumexp),
            f32_rows(&grad),
            indices(&targets),
        ) else {
            return reference::cross_entropy_backward::<Self>(logits, logsumexp, targets, grad);
        };
        let shape = logits.shape();
        let vocab = shape.dims::<2>()[1];
        let mut output = vec![0.0f32; x.len()];
        par_rows(&mut output, vocab, |row, out| {
            let x = &x[row * vocab..(row + 1) * vocab];
            let (lse, g) = (lse[row], g[row]);
            for (o, &v) in out.iter_mut().zip(x) {
                *o = (v - lse).exp() * g;
            }
            out[targets_host[row]] -= g;
        });
        tensor(output, shape)
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
    let half = dim / 2;
    let mut output = vec![0.0f32; x.len()];
    par_rows(&mut output, dim, |row, out| {
        let (input_row, position) = source(row);
        let x = &x[input_row * dim..(input_row + 1) * dim];
        let cos = &cos[position * dim..(position + 1) * dim];
        let sin = &sin[position * dim..(position + 1) * dim];
        for i in 0..half {
            let (a, b) = (x[i], x[i + half]);
            out[i] = a * cos[i] - sign * b * sin[i];
            out[i + half] = b * cos[i + half] + sign * a * sin[i + half];
        }
    });
    Some(tensor(output, Shape::new(out_shape)))
}

/// Runs `kernel(row, output_row)` over rows of length `len`, in parallel.
fn par_rows(output: &mut [f32], len: usize, kernel: impl Fn(usize, &mut [f32]) + Sync) {
    if len == 0 {
        return;
    }
    output
        .par_chunks_mut(len * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(chunk, rows)| {
            for (i, out) in rows.chunks_mut(len).enumerate() {
                kernel(chunk * ROWS_PER_TASK + i, out);
            }
        });
}

/// The tensor's values in row-major order when it holds f32 (copied only if strided).
fn f32_rows(tensor: &FlexTensor) -> Option<Cow<'_, [f32]>> {
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

/// Integer indices as `usize`, for the integer dtypes flex uses.
fn indices(tensor: &FlexTensor) -> Option<Vec<usize>> {
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

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}
