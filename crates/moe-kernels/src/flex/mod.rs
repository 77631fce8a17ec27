//! CPU kernels for burn's `flex` backend: the elementwise and row-wise fused operations are
//! one pass over f32 rows, parallel over rows with rayon; attention and the dispatch
//! (`attention.rs`, `dispatch.rs`) split their products into `gemm` blocks. Other dtypes
//! take the reference path.

mod attention;
mod dispatch;
mod expert_ffn;
mod linear;
mod linear_cross_entropy;
mod matmul;
mod router_losses;
mod routing;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{DType, Shape, TensorData, TensorMetadata};
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use crate::{AdamWStep, Gate, MoeBackend, reference, reference_dispatch};

/// Rows handed to one rayon task: enough work to amortise the task, small enough to
/// balance two to sixteen cores.
const ROWS_PER_TASK: usize = 16;

/// Elements per rayon task in elementwise kernels.
const ELEMENTWISE_CHUNK: usize = 4096;

impl MoeBackend for Flex {
    /// On a thread of rayon's pool (the pool flex's kernels and matmuls run on).
    fn run_compute<R: Send>(work: impl FnOnce() -> R + Send) -> R {
        rayon::scope(|_| work())
    }

    /// In place when the buffer is contiguous f32 that nothing else holds.
    fn write_positions(
        mut buffer: FloatTensor<Self>,
        values: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
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
        reference::write_positions::<Self>(buffer, values, start)
    }

    /// In a pool of one thread (made on first use); on this thread if it cannot be made.
    fn run_serial<R: Send>(work: impl FnOnce() -> R + Send) -> R {
        static SERIAL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
        let pool = SERIAL.get_or_init(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(|_| "moe-serial".into())
                .build()
                .ok()
        });
        match pool {
            Some(pool) => pool.install(work),
            None => work(),
        }
    }

    fn route_forward(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let [tokens, n_experts] = logits.shape().dims::<2>();
        match (dispatch_rows(&logits), f32_rows(&bias)) {
            (Some(values), Some(bias)) if bias.len() == n_experts && top_k <= n_experts => {
                let (weights, experts) = routing::route(&values, &bias, gate, top_k);
                let shape = Shape::new([tokens, top_k]);
                let experts = TensorData::new(experts, shape.clone());
                (tensor(weights, shape), FlexTensor::from_data(experts))
            }
            _ => reference::routing::route_forward::<Self>(logits, bias, gate, top_k),
        }
    }

    fn router_losses_forward(
        logits: FloatTensor<Self>,
        counts: IntTensor<Self>,
        gate: Gate,
        top_k: usize,
    ) -> FloatTensor<Self> {
        match (dispatch_rows(&logits), indices(&counts)) {
            (Some(values), Some(counts)) if router_shape(&logits, &counts) => tensor(
                router_losses::forward(&values, &counts, gate, top_k).to_vec(),
                Shape::new([4]),
            ),
            _ => {
                reference::router_losses::router_losses_forward::<Self>(logits, counts, gate, top_k)
            }
        }
    }

    fn router_losses_backward(
        logits: FloatTensor<Self>,
        counts: IntTensor<Self>,
        gate: Gate,
        top_k: usize,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let shape = logits.shape();
        match (dispatch_rows(&logits), indices(&counts), f32_rows(&grad)) {
            (Some(values), Some(counts), Some(grad)) if router_shape(&logits, &counts) => {
                let grad = [grad[0], grad[1]];
                tensor(
                    router_losses::backward(&values, &counts, gate, top_k, grad),
                    shape,
                )
            }
            _ => reference::router_losses::router_losses_backward::<Self>(
                logits, counts, gate, top_k, grad,
            ),
        }
    }

    fn expert_slots(
        experts: IntTensor<Self>,
        n_experts: usize,
        capacity: Option<usize>,
    ) -> (IntTensor<Self>, IntTensor<Self>) {
        let dtype = experts.dtype();
        let slots = (!reference_dispatch())
            .then(|| indices(&experts))
            .flatten()
            .and_then(|assigned| dispatch::expert_slots(&assigned, n_experts, capacity));
        match slots {
            Some((slot, counts)) => (int_tensor(&slot, dtype), int_tensor(&counts, dtype)),
            None => reference::dispatch::expert_slots::<Self>(experts, n_experts, capacity),
        }
    }

    fn permute_forward(
        x: FloatTensor<Self>,
        slot: IntTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self> {
        let d = x.shape()[1];
        match (dispatch_rows(&x), indices(&slot)) {
            (Some(values), Some(slot)) => tensor(
                dispatch::scatter_rows(&values, d, &slot, None, rows),
                Shape::new([rows, d]),
            ),
            _ => reference::dispatch::permute_forward::<Self>(x, slot, rows),
        }
    }

    fn permute_backward(
        grad: FloatTensor<Self>,
        slot: IntTensor<Self>,
        tokens: usize,
    ) -> FloatTensor<Self> {
        let d = grad.shape()[1];
        match (dispatch_rows(&grad), indices(&slot)) {
            (Some(values), Some(slot)) => tensor(
                dispatch::gather_rows(&values, d, &slot, None, tokens),
                Shape::new([tokens, d]),
            ),
            _ => reference::dispatch::permute_backward::<Self>(grad, slot, tokens),
        }
    }

    fn combine_forward(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (d, tokens) = (buffer.shape()[1], weights.shape()[0]);
        match (dispatch_rows(&buffer), indices(&slot), f32_rows(&weights)) {
            (Some(values), Some(slot), Some(w)) => tensor(
                dispatch::gather_rows(&values, d, &slot, Some(&w), tokens),
                Shape::new([tokens, d]),
            ),
            _ => reference::dispatch::combine_forward::<Self>(buffer, slot, weights),
        }
    }

    fn combine_backward(
        buffer: FloatTensor<Self>,
        slot: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [rows, d] = buffer.shape().dims::<2>();
        let inputs = (
            dispatch_rows(&buffer),
            indices(&slot),
            f32_rows(&weights),
            f32_rows(&grad),
        );
        let (Some(values), Some(slot_host), Some(w), Some(g)) = inputs else {
            return reference::dispatch::combine_backward::<Self>(buffer, slot, weights, grad);
        };
        (
            tensor(
                dispatch::scatter_rows(&g, d, &slot_host, Some(&w), rows),
                Shape::new([rows, d]),
            ),
            tensor(
                dispatch::slot_dot(&values, &g, d, &slot_host),
                weights.shape(),
            ),
        )
    }

    fn linear_forward(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let [rows, d_in] = x.shape().dims::<2>();
        let [w_in, d_out] = w.shape().dims::<2>();
        match (f32_rows(&x), f32_rows(&w)) {
            (Some(x), Some(w)) if d_in == w_in => tensor(
                linear::forward(&x, &w, d_in, d_out),
                Shape::new([rows, d_out]),
            ),
            _ => reference::linear_forward::<Self>(x, w),
        }
    }

    fn linear_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [d_in, d_out] = w.shape().dims::<2>();
        let shapes_fit = x.shape()[1] == d_in && grad.shape().dims::<2>() == [x.shape()[0], d_out];
        match (f32_rows(&x), f32_rows(&w), f32_rows(&grad)) {
            (Some(x_rows), Some(w_rows), Some(g)) if shapes_fit => {
                let (d_x, d_w) = linear::backward(&x_rows, &w_rows, &g, d_in, d_out);
                (tensor(d_x, x.shape()), tensor(d_w, w.shape()))
            }
            _ => reference::linear_backward::<Self>(x, w, grad),
        }
    }

    fn grouped_matmul_forward(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        let [rows, d_in] = x.shape().dims::<2>();
        let d_out = weights.shape()[2];
        match (packed_rows(&x, counts), f32_rows(&weights)) {
            (Some(values), Some(w)) => tensor(
                dispatch::grouped_matmul(&values, &w, counts, d_in, d_out),
                Shape::new([rows, d_out]),
            ),
            _ => reference::dispatch::grouped_matmul_forward::<Self>(x, weights, counts),
        }
    }

    fn grouped_matmul_backward(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        counts: &[usize],
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [_, d_in, d_out] = weights.shape().dims::<3>();
        let inputs = (packed_rows(&x, counts), f32_rows(&weights), f32_rows(&grad));
        let (Some(values), Some(w), Some(g)) = inputs else {
            return reference::dispatch::grouped_matmul_backward::<Self>(x, weights, counts, grad);
        };
        let (d_x, d_w) = dispatch::grouped_matmul_backward(&values, &w, counts, &g, d_in, d_out);
        (tensor(d_x, x.shape()), tensor(d_w, weights.shape()))
    }

    fn expert_ffn_forward(
        x: FloatTensor<Self>,
        weights: [FloatTensor<Self>; 3],
        counts: &[usize],
    ) -> (FloatTensor<Self>, [FloatTensor<Self>; 2]) {
        let [rows, d] = x.shape().dims::<2>();
        let values = (packed_rows(&x, counts), expert_weights(&weights, d));
        let (Some(values), Some((w, f))) = values else {
            return reference::dispatch::expert_ffn_forward::<Self>(x, weights, counts);
        };
        let weights = expert_ffn::ExpertWeights::new(&w, d, f);
        let [out, gate, up] = expert_ffn::forward(&values, weights, counts);
        let hidden = || Shape::new([rows, f]);
        (
            tensor(out, x.shape()),
            [tensor(gate, hidden()), tensor(up, hidden())],
        )
    }

    fn expert_ffn_backward(
        x: FloatTensor<Self>,
        weights: [FloatTensor<Self>; 3],
        counts: &[usize],
        pre_activations: [FloatTensor<Self>; 2],
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, [FloatTensor<Self>; 3]) {
        let [rows, d] = x.shape().dims::<2>();
        let [gate, up] = &pre_activations;
        let shapes_agree = |&(_, f): &(_, usize)| {
            let shapes = [gate.shape(), up.shape(), grad.shape()];
            shapes == [[rows, f].into(), [rows, f].into(), [rows, d].into()]
        };
        let w = expert_weights(&weights, d).filter(shapes_agree);
        let inputs = (packed_rows(&x, counts), w, [gate, up, &grad].map(f32_rows));
        let (Some(values), Some((w, f)), [Some(gate), Some(up), Some(g)]) = inputs else {
            return reference::dispatch::expert_ffn_backward::<Self>(
                x,
                weights,
                counts,
                pre_activations,
                grad,
            );
        };
        let expert_weights = expert_ffn::ExpertWeights::new(&w, d, f);
        let [d_x, d_w1, d_w3, d_w2] =
            expert_ffn::backward(&values, expert_weights, counts, &gate, &up, &g);
        let [s1, s3, s2] = weights.each_ref().map(|w| w.shape());
        (
            tensor(d_x, x.shape()),
            [tensor(d_w1, s1), tensor(d_w3, s3), tensor(d_w2, s2)],
        )
    }

    /// One pass over the four arrays, updating the parameter and the moments in place
    /// when the optimiser holds the only reference to them (burn's `AdamW` makes about
    /// fifteen passes, each allocating its result).
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let n = param.shape().num_elements();
        let f32_of_one_size = [&param, &grad, &moment_1, &moment_2]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.shape().num_elements() == n);
        let Some(g) = f32_rows(&grad).filter(|_| f32_of_one_size) else {
            return reference::adamw_step::<Self>(param, grad, moment_1, moment_2, step);
        };
        let (mut param, mut m, mut v) = (writable(param), writable(moment_1), writable(moment_2));
        let (b1, b2, eps) = (step.beta_1, step.beta_2, step.epsilon);
        let (c1, c2) = (1.0 - b1.powi(step.time), 1.0 - b2.powi(step.time));
        let keep = (1.0 - step.lr * f64::from(step.weight_decay)) as f32;
        let lr = step.lr as f32;
        param
            .storage_mut::<f32>()
            .par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(m.storage_mut::<f32>().par_chunks_mut(ELEMENTWISE_CHUNK))
            .zip(v.storage_mut::<f32>().par_chunks_mut(ELEMENTWISE_CHUNK))
            .zip(g.par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|(((p, m), v), g)| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                            *m = *m * b1 + g * (1.0 - b1);
                            *v = *v * b2 + g * g * (1.0 - b2);
                            let delta = (*m / c1) / ((*v / c2).sqrt() + eps);
                            *p = *p * keep - delta * lr;
                        }
                    },
                )
            });
        (param, m, v)
    }

    fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let same_shape = gate.shape() == up.shape();
        let (true, Some(g), Some(u)) = (same_shape, f32_rows(&gate), f32_rows(&up)) else {
            return reference::swiglu_forward::<Self>(gate, up);
        };
        // SAFETY: each chunk's loop writes all its elements (`u` has `g`'s shape).
        let output = unsafe {
            written(g.len(), |output| {
                output
                    .par_chunks_mut(ELEMENTWISE_CHUNK)
                    .enumerate()
                    .for_each(|(chunk, out)| {
                        let start = chunk * ELEMENTWISE_CHUNK;
                        let inputs = g[start..].iter().zip(&u[start..]);
                        vectorized(
                            #[inline(always)]
                            || {
                                for (o, (&g, &u)) in out.iter_mut().zip(inputs) {
                                    o.write(swiglu(g, u));
                                }
                            },
                        )
                    })
            })
        };
        tensor(output, gate.shape())
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let same_shape = gate.shape() == up.shape() && gate.shape() == grad.shape();
        let inputs = (same_shape, f32_rows(&gate), f32_rows(&up), f32_rows(&grad));
        let (true, Some(g), Some(u), Some(dy)) = inputs else {
            return reference::swiglu_backward::<Self>(gate, up, grad);
        };
        // SAFETY: each chunk's loop writes all its elements of both outputs (`u` and `dy`
        // have `g`'s shape).
        let (d_gate, d_up) = unsafe {
            written_pair([g.len(); 2], |d_gate, d_up| {
                d_gate
                    .par_chunks_mut(ELEMENTWISE_CHUNK)
                    .zip(d_up.par_chunks_mut(ELEMENTWISE_CHUNK))
                    .enumerate()
                    .for_each(|(chunk, (d_gate, d_up))| {
                        let start = chunk * ELEMENTWISE_CHUNK;
                        let inputs = g[start..].iter().zip(&u[start..]).zip(&dy[start..]);
                        vectorized(
                            #[inline(always)]
                            || {
                                let outputs = d_gate.iter_mut().zip(d_up);
                                for ((dg, du), ((&g, &u), &dy)) in outputs.zip(inputs) {
                                    let (d_gate, d_up, _) = swiglu_backward(g, u, dy);
                                    dg.write(d_gate);
                                    du.write(d_up);
                                }
                            },
                        )
                    })
            })
        };
        (tensor(d_gate, gate.shape()), tensor(d_up, gate.shape()))
    }

    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let inputs = (gamma_fits_rows(&x, &gamma), f32_rows(&x), f32_rows(&gamma));
        let (true, Some(values), Some(gamma_values)) = inputs else {
            return reference::rms_norm_forward::<Self>(x, gamma, epsilon);
        };
        let d = gamma_values.len();
        // SAFETY: each row is written whole (`gamma` has one scale per element).
        let output = unsafe {
            par_rows(
                values.len() / d.max(1),
                d,
                #[inline(always)]
                |row, out| {
                    let x = &values[row * d..(row + 1) * d];
                    let inv_rms = inverse_rms(x, epsilon);
                    let normed = x.iter().zip(gamma_values.iter());
                    write_row(out, normed.map(|(&x, &g)| x * inv_rms * g));
                },
            )
        };
        tensor(output, x.shape())
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let inputs = (
            gamma_fits_rows(&x, &gamma),
            f32_rows(&x),
            f32_rows(&gamma),
            f32_rows(&grad),
        );
        let (true, Some(values), Some(gamma_values), Some(dy)) = inputs else {
            return reference::rms_norm_backward::<Self>(x, gamma, epsilon, grad);
        };
        let d = gamma_values.len();
        let mut shares = Vec::new();
        // Each task sums its rows' share of d_gamma; the shares are added in task order,
        // so the result does not depend on scheduling.
        // SAFETY: the chunks tile `d_x`, and each of their rows is written whole first.
        let d_x = unsafe {
            written(values.len(), |d_x| {
                shares = d_x
                    .par_chunks_mut((d * ROWS_PER_TASK).max(1))
                    .enumerate()
                    .map(|(chunk, d_x)| {
                        let mut d_gamma = vec![0.0f32; d];
                        vectorized(
                            #[inline(always)]
                            || {
                                for (i, d_x) in d_x.chunks_mut(d).enumerate() {
                                    let row = (chunk * ROWS_PER_TASK + i) * d;
                                    let (x, dy) = (&values[row..row + d], &dy[row..row + d]);
                                    let inv_rms = inverse_rms(x, epsilon);
                                    let scaled = dy.iter().zip(gamma_values.iter());
                                    let d_x = write_row(d_x, scaled.map(|(&dy, &g)| dy * g));
                                    for ((dg, &dy), &x) in d_gamma.iter_mut().zip(dy).zip(x) {
                                        *dg += dy * x * inv_rms;
                                    }
                                    // mean(d_xhat * xhat), with xhat = x * inv_rms.
                                    let mean = dot(d_x, x) * inv_rms / d as f32;
                                    for (dx, &x) in d_x.iter_mut().zip(x) {
                                        *dx = (*dx - x * inv_rms * mean) * inv_rms;
                                    }
                                }
                            },
                        );
                        d_gamma
                    })
                    .collect::<Vec<_>>();
            })
        };
        let mut d_gamma = vec![0.0f32; d];
        for share in shares {
            for (total, part) in d_gamma.iter_mut().zip(share) {
                *total += part;
            }
        }
        (tensor(d_x, x.shape()), tensor(d_gamma, gamma.shape()))
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

    fn causal_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (Some(q_heads), Some(k_heads), Some(v_heads)) = (heads(&q), heads(&k), heads(&v))
        else {
            return reference::causal_attention_forward::<Self>(q, k, v);
        };
        let dims = attention_dims(&q_heads, &k_heads);
        let (output, probs) = attention::forward(q_heads, k_heads, v_heads, dims);
        let [b, h, queries, _] = q_heads.shape;
        (
            heads_interleaved(output, q_heads.shape),
            tensor(probs, Shape::new([b, h, queries, dims.keys])),
        )
    }

    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (Some(q_heads), Some(k_heads), Some(v_heads), Some(p_rows), Some(g_heads)) = (
            heads(&q),
            heads(&k),
            heads(&v),
            f32_rows(&probs),
            heads(&grad),
        ) else {
            return reference::causal_attention_backward::<Self>(q, k, v, probs, grad);
        };
        let dims = attention_dims(&q_heads, &k_heads);
        let (dq, dk, dv) = attention::backward(q_heads, k_heads, v_heads, &p_rows, g_heads, dims);
        (
            laid_out_like(dq, &q_heads),
            laid_out_like(dk, &k_heads),
            laid_out_like(dv, &v_heads),
        )
    }

    fn linear_cross_entropy_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [rows, d] = x.shape().dims::<2>();
        let [_, vocab] = weight.shape().dims::<2>();
        let (Some(x_rows), Some(w), Some(targets_host)) =
            (f32_rows(&x), matrix(&weight), indices(&targets))
        else {
            return reference::linear_cross_entropy_forward::<Self>(x, weight, targets);
        };
        let fits = w.shape()[0] == d
            && targets_host.len() == rows
            && targets_host.iter().all(|&t| t < vocab);
        if !fits {
            return reference::linear_cross_entropy_forward::<Self>(x, weight, targets);
        }
        let x_rows = matmul::Matrix::rows_of(&x_rows, d, 0..rows);
        let (nll, dlogits) = linear_cross_entropy::forward(x_rows, w, &targets_host);
        (
            tensor(nll, Shape::new([rows])),
            tensor(dlogits, Shape::new([rows, vocab])),
        )
    }

    fn linear_cross_entropy_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        dlogits: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (weight_shape, x_shape) = (weight.shape(), x.shape());
        let (Some(x_rows), Some(w), Some(dl), Some(g)) = (
            f32_rows(&x),
            matrix(&weight),
            f32_rows(&dlogits),
            f32_rows(&grad),
        ) else {
            return reference::linear_cross_entropy_backward::<Self>(x, weight, dlogits, grad);
        };
        let ([rows, d], [_, vocab]) = (x_shape.dims::<2>(), w.shape());
        let fits = w.shape()[0] == d && g.len() == rows && dl.len() == rows * vocab;
        if !fits {
            return reference::linear_cross_entropy_backward::<Self>(x, weight, dlogits, grad);
        }
        let (d_x, d_weight) = linear_cross_entropy::backward(&x_rows, w, &dl, &g);
        (tensor(d_x, x_shape), tensor(d_weight, weight_shape))
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

/// Whether `gamma` has one scale per element of `x`'s rows (the kernels' row length);
/// otherwise the reference reports the shape mismatch.
fn gamma_fits_rows(x: &FlexTensor, gamma: &FlexTensor) -> bool {
    x.shape().as_slice().last() == Some(&gamma.shape().num_elements())
}

/// `1 / sqrt(mean(x^2) + epsilon)` of one row.
#[inline(always)]
fn inverse_rms(x: &[f32], epsilon: f64) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + epsilon as f32).sqrt()
}

/// Runs `work` compiled for the widest vectors the CPU has (AVX-512 or AVX2), else as
/// built. Release builds target baseline x86-64 (SSE2) so the binary runs anywhere; the
/// row kernels' loops (softmax, cross-entropy, SwiGLU, RMSNorm, rotary) would then use
/// four lanes, where AVX2 offers eight and AVX-512 sixteen. `work` and the closures it
/// calls must be `#[inline(always)]`: code only takes on the wider instructions once
/// inlined into the function compiled for them.
#[inline(always)]
fn vectorized<R>(work: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            fn avx512<R>(work: impl FnOnce() -> R) -> R {
                work()
            }
            // SAFETY: the CPU was just found to support AVX-512.
            return unsafe { avx512(work) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn avx2<R>(work: impl FnOnce() -> R) -> R {
                work()
            }
            // SAFETY: the CPU was just found to support AVX2.
            return unsafe { avx2(work) };
        }
    }
    work()
}

/// `e^x` in a branch-free form the compiler vectorises (a loop of `f32::exp` is a
/// scalar libm call per element, which dominated the softmax and cross-entropy passes):
/// Cephes' `expf`, range reduction to `x = n ln 2 + r` with `|r| <= ln 2 / 2` and a
/// degree-6 polynomial, within 2 ulp. Underflows to 0 below -87.3 and saturates at
/// `e^88` above 88 (the kernels only exponentiate shifted logits and `-x` for sigmoids).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const MIN: f32 = -87.3;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(MIN, 88.0);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n as an integer, read from the rounded sum's low mantissa bits: `n as i32` would be
    // a saturating conversion, and a branch on `x < MIN` a jump, each keeping the loop
    // scalar (five times slower).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    // All ones, or zero below MIN (NaN keeps its bits).
    let keep = u32::from(x < MIN).wrapping_sub(1);
    f32::from_bits((e_r * two_n).to_bits() & keep)
}

/// `silu(gate) * up`.
#[inline(always)]
fn swiglu(gate: f32, up: f32) -> f32 {
    gate / (1.0 + exp(-gate)) * up
}

/// `(d_gate, d_up, silu(gate) * up)` given the gradient `dy` of `silu(gate) * up`: with
/// `s = sigmoid(gate)`, `d_gate = dy * up * s * (1 + gate * (1 - s))` and
/// `d_up = dy * gate * s`.
#[inline(always)]
fn swiglu_backward(gate: f32, up: f32, dy: f32) -> (f32, f32, f32) {
    let s = 1.0 / (1.0 + exp(-gate));
    let silu = gate * s;
    (dy * up * s * (1.0 + gate * (1.0 - s)), dy * silu, silu * up)
}

/// Lanes of the reductions below: independent partial results the compiler keeps in
/// vector registers, one with AVX-512 (a single running sum is a serial chain it may not
/// reorder).
const LANES: usize = 16;

/// `sum(f(v))` over `values`.
#[inline(always)]
fn sum_of(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The largest of `values` (`-inf` when empty).
#[inline(always)]
fn max_of(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// `sum(a * b)` over equal-length slices.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (chunks_a, chunks_b) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in chunks_a.zip(chunks_b) {
        for ((lane, &a), &b) in lanes.iter_mut().zip(a).zip(b) {
            *lane += a * b;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The attention sizes of `q: [B, H, Sq, D]` and `k: [B, H, Sk, D]`.
fn attention_dims(q: &attention::Heads, k: &attention::Heads) -> attention::Dims {
    let [b, h, queries, head_dim] = q.shape;
    attention::Dims {
        heads: b * h,
        queries,
        keys: k.shape[2],
        head_dim,
    }
}

/// A vector of `len` f32 that `write` initialises through the uninitialised slice it gets,
/// for outputs that products and row loops write whole: zero-filling those first took
/// about 6% of a training step.
///
/// # Safety
/// `write` must initialise every one of the `len` elements.
unsafe fn written(len: usize, write: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    // SAFETY: the caller's `write` initialises the one vector.
    let [values] = unsafe { written_all([len], |[values]| write(values)) };
    values
}

/// Two vectors of `lens` f32 that `write` initialises together, as [`written`] does one.
///
/// # Safety
/// `write` must initialise every element of both.
unsafe fn written_pair(
    lens: [usize; 2],
    write: impl FnOnce(&mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]),
) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: the caller's `write` initialises both.
    let [first, second] = unsafe { written_all(lens, |[first, second]| write(first, second)) };
    (first, second)
}

/// `N` vectors of `lens` f32 that `write` initialises together, as [`written`] does one.
///
/// # Safety
/// `write` must initialise every element of each.
unsafe fn written_all<const N: usize>(
    lens: [usize; N],
    write: impl FnOnce([&mut [MaybeUninit<f32>]; N]),
) -> [Vec<f32>; N] {
    let mut values = lens.map(Vec::with_capacity);
    let mut index = 0;
    let slices = values.each_mut().map(|v| {
        let slice = &mut v.spare_capacity_mut()[..lens[index]];
        index += 1;
        slice
    });
    write(slices);
    for (v, len) in values.iter_mut().zip(lens) {
        // SAFETY: the caller's `write` initialised the first `len` elements.
        unsafe { v.set_len(len) };
    }
    values
}

/// Row-major `[B, H, S, D]` values as a `[B, H, S, D]` tensor whose memory is laid out
/// `[B, S, H, D]` (dims 1 and 2 of a contiguous tensor swapped): attention's output in the
/// layout the model reads it, heads side by side per position, so that its swap back and
/// reshape copy nothing. Our permutation is one parallel pass of row copies; flex's
/// strided copy of the same took about eight times longer (`perf` samples).
fn heads_interleaved(values: Vec<f32>, [b, h, s, d]: [usize; 4]) -> FlexTensor {
    // SAFETY: each sequence's `s * h` rows of `d` are all copied: position `p` of head
    // `head` to row `p * h + head`.
    let output = unsafe {
        written(values.len(), |output| {
            if output.is_empty() {
                return;
            }
            output
                .par_chunks_mut(s * h * d)
                .zip(values.par_chunks(h * s * d))
                .for_each(|(output, values)| {
                    for (head, rows) in values.chunks(s * d).enumerate() {
                        for (position, row) in rows.chunks(d).enumerate() {
                            write_row(
                                &mut output[(position * h + head) * d..][..d],
                                row.iter().copied(),
                            );
                        }
                    }
                });
        })
    };
    Flex::float_swap_dims(tensor(output, Shape::new([b, s, h, d])), 1, 2)
}

/// Row-major `[B, H, S, D]` gradient values as a tensor laid out like their input
/// `like`: heads interleaved ([`heads_interleaved`]) when the input is a view of that
/// layout (the model's values), so the gradient flows back through its swap and reshape
/// without a copy; contiguous otherwise.
fn laid_out_like(values: Vec<f32>, like: &attention::Heads) -> FlexTensor {
    let [_, h, s, d] = like.shape;
    if like.strides == [s * h * d, d, h * d, 1] && h > 1 && s > 1 {
        heads_interleaved(values, like.shape)
    } else {
        tensor(values, Shape::new(like.shape))
    }
}

/// A rank-4 f32 tensor as per-head matrices read through its strides; `None` for other
/// dtypes or ranks and for negative strides.
fn heads(tensor: &FlexTensor) -> Option<attention::Heads<'_>> {
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
fn matrix(tensor: &FlexTensor) -> Option<matmul::Matrix<'_>> {
    let (data, offset, shape, strides) = strided(tensor)?;
    Some(matmul::Matrix::strided(data, offset, shape, strides))
}

/// An f32 tensor's `(storage, offset, shape, strides)`.
type Strided<'a, const R: usize> = (&'a [f32], usize, [usize; R], [usize; R]);

/// An f32 tensor of rank `R` as [`Strided`]; `None` for other dtypes or ranks and for
/// negative strides.
fn strided<const R: usize>(tensor: &FlexTensor) -> Option<Strided<'_, R>> {
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

/// A vector of `rows * len` f32 whose rows `kernel(row, output_row)` writes, in parallel
/// and [`vectorized`] (`kernel` must be `#[inline(always)]`).
///
/// # Safety
/// `kernel` must initialise every element of each row it is given (see [`write_row`]).
unsafe fn par_rows(
    rows: usize,
    len: usize,
    kernel: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    // SAFETY: the chunks tile the output, and the caller's `kernel` writes each row whole.
    unsafe {
        written(rows * len, |output| {
            if len == 0 {
                return;
            }
            output
                .par_chunks_mut(len * ROWS_PER_TASK)
                .enumerate()
                .for_each(|(chunk, rows)| {
                    vectorized(
                        #[inline(always)]
                        || {
                            for (i, out) in rows.chunks_mut(len).enumerate() {
                                kernel(chunk * ROWS_PER_TASK + i, out);
                            }
                        },
                    )
                });
        })
    }
}

/// Writes `values` into `row`, which they must fill exactly, and returns it initialised.
#[inline(always)]
fn write_row(row: &mut [MaybeUninit<f32>], values: impl IntoIterator<Item = f32>) -> &mut [f32] {
    let mut count = 0;
    for (slot, value) in row.iter_mut().zip(values) {
        slot.write(value);
        count += 1;
    }
    assert_eq!(count, row.len(), "a row written in part");
    // SAFETY: every element was written above.
    unsafe { assume_init(row) }
}

/// `slice` as initialised f32.
///
/// # Safety
/// Every element of `slice` must have been written.
#[inline(always)]
unsafe fn assume_init(slice: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: same layout; the caller guarantees initialisation.
    unsafe { &mut *(slice as *mut [MaybeUninit<f32>] as *mut [f32]) }
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

/// An f32 tensor as one a kernel may overwrite: itself when it is contiguous from the
/// start of its storage and holds the only reference to it, else a contiguous copy.
fn writable(tensor: FlexTensor) -> FlexTensor {
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
fn dispatch_rows(tensor: &FlexTensor) -> Option<Cow<'_, [f32]>> {
    if reference_dispatch() {
        return None;
    }
    f32_rows(tensor)
}

/// [`dispatch_rows`] of a packed expert buffer holding exactly the segments of `counts`.
fn packed_rows<'a>(tensor: &'a FlexTensor, counts: &[usize]) -> Option<Cow<'a, [f32]>> {
    (tensor.shape()[0] == counts.iter().sum::<usize>())
        .then(|| dispatch_rows(tensor))
        .flatten()
}

/// The values of the experts' weights `[w1, w3, w2]` (`[E, d, f]`, `[E, d, f]`,
/// `[E, f, d]`) for inputs of width `d`, and `f`, if the shapes agree, no width is zero
/// and all hold f32.
fn expert_weights(weights: &[FlexTensor; 3], d: usize) -> Option<([Cow<'_, [f32]>; 3], usize)> {
    let [w1, w3, w2] = weights.each_ref().map(|w| w.shape());
    if w1.num_dims() != 3 || w1 != w3 || w2.num_dims() != 3 {
        return None;
    }
    let (n_experts, f) = (w1[0], w1[2]);
    let agree = d > 0 && f > 0 && w1[1] == d && [w2[0], w2[1], w2[2]] == [n_experts, f, d];
    if !agree {
        return None;
    }
    let [w1, w3, w2] = weights.each_ref().map(f32_rows);
    Some(([w1?, w3?, w2?], f))
}

/// Whether router `logits` have at least one token and one column per expert of `counts`.
fn router_shape(logits: &FlexTensor, counts: &[usize]) -> bool {
    let [tokens, n_experts] = logits.shape().dims::<2>();
    tokens > 0 && n_experts > 0 && n_experts == counts.len()
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

/// A 1-d integer tensor of `values` in `dtype` (I32 or I64, as [`indices`] reads).
fn int_tensor(values: &[usize], dtype: DType) -> FlexTensor {
    let shape = Shape::new([values.len()]);
    let data = match dtype {
        DType::I32 => TensorData::new(values.iter().map(|&v| v as i32).collect(), shape),
        _ => TensorData::new(values.iter().map(|&v| v as i64).collect(), shape),
    };
    FlexTensor::from_data(data)
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        // Every 1/1024 from -87 to 88: the whole range softmax and sigmoid use.
        for i in -87 * 1024..=88 * 1024 {
            let x = i as f32 / 1024.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            let ulp = (want as f32).to_bits().abs_diff((got as f32).to_bits());
            assert!(ulp <= 2, "exp({x}) = {got}, expected {want} ({ulp} ulp)");
        }
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn vectorized_code_computes_the_same_bits() {
        let x: Vec<f32> = (-2000..2000).map(|i| i as f32 / 16.0).collect();
        let plain: Vec<f32> = x.iter().map(|&v| exp(v)).collect();
        let wide = vectorized(
            #[inline(always)]
            || x.iter().map(|&v| exp(v)).collect::<Vec<f32>>(),
        );
        assert_eq!(plain, wide);
        let sums = vectorized(
            #[inline(always)]
            || (sum_of(&x, exp), max_of(&x), dot(&x, &plain)),
        );
        assert_eq!(sums, (sum_of(&x, exp), max_of(&x), dot(&x, &plain)));
    }

    #[test]
    fn reductions_match_serial_loops() {
        // Lengths around the lane width, with a remainder or without.
        for len in [0, 1, 7, 8, 9, 37] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 1.3).cos()).collect();
            let sum: f32 = a.iter().map(|v| v * 2.0).sum();
            let max = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let serial_dot: f32 = a.iter().zip(&b).map(|(a, b)| a * b).sum();
            assert!((sum_of(&a, |v| v * 2.0) - sum).abs() < 1e-5, "sum of {len}");
            assert_eq!(max_of(&a), max, "max of {len}");
            assert!((dot(&a, &b) - serial_dot).abs() < 1e-5, "dot of {len}");
        }
    }
}
