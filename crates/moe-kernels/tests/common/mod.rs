//! Helpers shared by the kernel tests and the model tests (which include this file): host
//! copies of tensors, deterministic inputs, tolerances, the gate list and the
//! `backend_tests!` macro that runs a test on every backend.

#![allow(dead_code, unused_imports, unused_macros)]

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use moe_kernels::Gate;

/// One gate of each kind, with settings away from their defaults where they have any:
/// every test that holds for all gates loops over these.
pub fn gates() -> Vec<Gate> {
    vec![
        Gate::SoftmaxTopk { renormalize: true },
        Gate::SoftmaxTopk { renormalize: false },
        Gate::TopkSoftmax,
        Gate::Sigmoid { scale: 2.5 },
    ]
}

/// A module per backend (`flex`, `ndarray`, `wgpu`, and `cuda` under the `cuda` feature)
/// with one `#[test]` per name, each calling the generic function of that name in the
/// enclosing module, `fn name<B: MoeBackend>(device: &B::Device)`, on the backend's
/// default device.
macro_rules! backend_tests {
    ($($test:ident),+ $(,)?) => {
        backend_tests!(@backend flex, burn::backend::Flex, $($test),+);
        backend_tests!(@backend ndarray, burn::backend::NdArray, $($test),+);
        backend_tests!(@backend wgpu, burn::backend::Wgpu, $($test),+);
        #[cfg(feature = "cuda")]
        backend_tests!(@backend cuda, burn::backend::Cuda, $($test),+);
    };
    (@backend $name:ident, $backend:ty, $($test:ident),+) => {
        mod $name {
            type B = $backend;
            $(#[test]
            fn $test() {
                super::$test::<B>(&Default::default());
            })+
        }
    };
}
pub(crate) use backend_tests;

pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

pub fn host_int<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

/// Deterministic pseudo-random values in [-1, 1) (no dependence on backend RNGs).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

pub fn tensor<B: Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::<B, 1>::from_floats(values(n, seed).as_slice(), device).reshape(shape)
}

/// `tol` for a result computed through a float matmul on `B`: widened to 5e-3 on CUDA,
/// whose f32 matmul runs in TF32 on tensor cores (inputs rounded to a 10-bit mantissa, a
/// relative error of about 5e-4 each), so it cannot match an f32 reference to 1e-5.
pub fn matmul_tol<B: Backend>(device: &B::Device, tol: f64) -> f64 {
    if B::name(device).contains("cuda") {
        tol.max(5e-3)
    } else {
        tol
    }
}

pub fn assert_close(actual: &[f64], expected: &[f64], tol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tol * (1.0 + e.abs()),
            "{what}[{i}]: got {a}, expected {e} (tol {tol})"
        );
    }
}

/// A parameter tensor (an autodiff leaf) filled from `seed`, scaled by `scale`.
pub fn leaf<B: Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    scale: f32,
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    let data: Vec<f32> = values(n, seed).into_iter().map(|v| v * scale).collect();
    Tensor::<B, D>::from_data(burn::tensor::TensorData::new(data, shape), device).require_grad()
}
