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

/// A command that runs on several devices of one backend (data-parallel training).
pub trait DevicesJob {
    /// What the command returns.
    type Output;
    /// Runs the command on backend `B` and `devices` (at least one; the first is the
    /// main device).
    fn run<B: MoeAutodiffBackend>(self, devices: Vec<B::Device>) -> Result<Self::Output>;
}

/// The devices `--devices` names: `N` replicas (on the CPU for CPU backends, on devices
/// 0..N otherwise), or a list of `backend:index` entries (`wgpu:0,wgpu:1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceList {
    /// This many replicas.
    Count(usize),
    /// These device indices of one backend.
    Indices(BackendKind, Vec<usize>),
}

impl Default for DeviceList {
    fn default() -> Self {
        Self::Count(1)
    }
}

impl std::str::FromStr for DeviceList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(count) = text.parse::<usize>() {
            return match count {
                0 => Err("the device count must be at least 1".into()),
                n => Ok(Self::Count(n)),
            };
        }
        let mut backend = None;
        let mut indices = Vec::new();
        for entry in text.split(',') {
            let (name, index) = entry.split_once(':').ok_or_else(|| {
                format!("`{entry}`: expected a count (2) or backend:index entries (wgpu:0,wgpu:1)")
            })?;
            let kind = BackendKind::from_str(name, true)
                .map_err(|_| format!("`{entry}`: unknown backend `{name}`"))?;
            if backend.is_some_and(|b| b != kind) {
                return Err(format!("`{text}`: all devices must be of one backend"));
            }
            backend = Some(kind);
            let index: usize = index
                .parse()
                .map_err(|_| format!("`{entry}`: `{index}` is not a device index"))?;
            if indices.contains(&index) {
                return Err(format!("`{text}`: device {name}:{index} is named twice"));
            }
            indices.push(index);
        }
        Ok(Self::Indices(
            backend.expect("split yields an entry"),
            indices,
        ))
    }
}

impl DeviceList {
    /// The number of replicas the list asks for.
    pub fn replicas(&self) -> usize {
        match self {
            Self::Count(n) => *n,
            Self::Indices(_, indices) => indices.len(),
        }
    }

    /// The device indices on `kind`.
    fn indices(&self, kind: BackendKind) -> Result<Vec<usize>> {
        match self {
            Self::Count(n) => Ok((0..*n).collect()),
            Self::Indices(backend, indices) if *backend == kind => Ok(indices.clone()),
            Self::Indices(backend, _) => bail!(
                "the device list names {0} devices but the backend is {1}; add --backend {0}",
                backend.name(),
                kind.name()
            ),
        }
    }

    /// The one device of a CPU backend, which runs every replica.
    fn cpu<D: Default>(&self, kind: BackendKind) -> Result<Vec<D>> {
        let indices = self.indices(kind)?;
        if matches!(self, Self::Indices(..)) && indices != [0] {
            bail!(
                "{0} has one device, the CPU: give a count (2) to use it several times",
                kind.name()
            );
        }
        Ok(vec![D::default()])
    }
}

/// Runs `job` on the backend `kind` and its default device.
pub fn run_on<J: BackendJob>(kind: BackendKind, job: J) -> Result<J::Output> {
    run_on_devices(kind, &DeviceList::default(), OnMainDevice(job))
}

/// Runs `job` on the backend `kind` and the devices `devices` names.
pub fn run_on_devices<J: DevicesJob>(
    kind: BackendKind,
    devices: &DeviceList,
    job: J,
) -> Result<J::Output> {
    match kind {
        BackendKind::Flex => job.run::<Autodiff<Flex>>(devices.cpu(kind)?),
        BackendKind::Ndarray => job.run::<Autodiff<NdArray>>(devices.cpu(kind)?),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            use burn::backend::wgpu::WgpuDevice;
            let devices = match devices {
                DeviceList::Count(1) => vec![WgpuDevice::DefaultDevice],
                list => list
                    .indices(kind)?
                    .into_iter()
                    .map(WgpuDevice::DiscreteGpu)
                    .collect(),
            };
            job.run::<Autodiff<burn::backend::Wgpu>>(devices)
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            use burn::backend::cuda::CudaDevice;
            let devices = devices
                .indices(kind)?
                .into_iter()
                .map(CudaDevice::new)
                .collect();
            job.run::<Autodiff<burn::backend::Cuda>>(devices)
        }
        #[allow(unreachable_patterns)]
        other => bail!(
            "backend `{0}` is not compiled into this binary; rebuild with `--features {0}`",
            other.name()
        ),
    }
}

/// A single-device command run through [`run_on_devices`].
struct OnMainDevice<J>(J);

impl<J: BackendJob> DevicesJob for OnMainDevice<J> {
    type Output = J::Output;

    fn run<B: MoeAutodiffBackend>(self, devices: Vec<B::Device>) -> Result<J::Output> {
        let device = devices.into_iter().next().unwrap_or_default();
        self.0.run::<B>(device)
    }
}
