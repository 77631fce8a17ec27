//! Run-time backend selection: each command is written once, generic over the backend,
//! and instantiated for every backend compiled in.

use anyhow::{Result, bail};
use burn::backend::{Autodiff, Flex, NdArray};
use clap::ValueEnum;
use moe_model::MoeAutodiffBackend;

/// Backends `--backend` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// burn's SIMD CPU backend (default: fastest measured on CPU).
    Flex,
    /// ndarray CPU backend.
    Ndarray,
    /// wgpu: Vulkan, Metal or DX12 (also CPU Vulkan drivers such as lavapipe).
    Wgpu,
    /// NVIDIA CUDA (needs a build with `--features cuda`).
    Cuda,
}

impl BackendKind {
    /// The name `--backend` takes.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// A command that runs on any autodiff backend.
pub trait BackendJob {
    /// What the command returns.
    type Output;
    /// Runs the command on backend `B` and its default device.
    fn run<B: MoeAutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the backend `kind`.
pub fn run_on<J: BackendJob>(kind: BackendKind, job: J) -> Result<J::Output> {
    match kind {
        BackendKind::Flex => job.run::<Autodiff<Flex>>(Default::default()),
        BackendKind::Ndarray => job.run::<Autodiff<NdArray>>(Default::default()),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => job.run::<Autodiff<burn::backend::Wgpu>>(Default::default()),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => job.run::<Autodiff<burn::backend::Cuda>>(Default::default()),
        #[allow(unreachable_patterns)]
        other => bail!(
            "backend `{0}` is not compiled into this binary; rebuild with `--features {0}`",
            other.name()
        ),
    }
}
