//! One GPU as model families use it.
//!
//! - [`Gpu`]: the device (through `tier-cuda`, so every buffer is counted
//!   against the GPU tier's account), one compute stream, the cuBLAS and
//!   cuBLASLt handles ([`blas`]) and the NVRTC kernels ([`kernels`]; the
//!   f16/bf16 ones of rotary, grouped-query decoders, [`llm`], compiled on
//!   first use).
//! - [`buffer::DevBuf`]: a typed GPU buffer.
//! - [`view`]: borrowed views of buffers, the ops' arguments: [`Mat`] and
//!   [`MatMut`] (a matrix at an offset with a row stride, checked once
//!   when made), [`KvView`], [`Rotary`], [`DecodeAttn`], [`Gemm`].
//! - [`profile`]: where the parts of a step spend their time.
//!
//! Nothing here panics where CUDA is missing: [`unavailable_reason`] says
//! why the GPU cannot run ("no CUDA driver: ..."), and [`Gpu::new`] returns
//! that as an [`Error::Gpu`].

pub mod blas;
pub mod buffer;
pub mod kernels;
pub mod llm;
pub mod profile;
pub mod view;

pub use view::{DecodeAttn, Gemm, KvShape, KvView, Mat, MatMut, Operand, Rotary, ScoreRows};

use std::sync::{Arc, OnceLock};

use tier_api::Device;
use tier_cuda::kernels::CudaStream;
use tier_cuda::{GpuConfig, GpuDevice};

use crate::error::{Error, Result};

/// Why the GPU cannot run on this machine, or `None` when the driver, a
/// GPU, NVRTC, cuBLAS and cuBLASLt are all there. Loads no library function
/// beyond the driver's version and device count.
pub fn unavailable_reason() -> Option<String> {
    use tier_host::cuda::{driver, DriverState};
    match driver() {
        DriverState::Missing => return Some("no CUDA driver: libcuda could not be loaded".into()),
        DriverState::Ready { devices: 0, .. } => {
            return Some("no CUDA driver: the CUDA driver sees no GPU".into());
        }
        DriverState::Ready { .. } => {}
        other => return Some(format!("no CUDA driver: {}", other.describe())),
    }
    if !tier_cuda::kernels::nvrtc_available() {
        return Some("no CUDA driver: libnvrtc (CUDA's run-time compiler) could not be loaded".into());
    }
    // SAFETY: only tries to dlopen the libraries; calls no function in them.
    let (blas, lt) = unsafe { (cudarc::cublas::sys::is_culib_present(), cudarc::cublaslt::sys::is_culib_present()) };
    if !blas {
        return Some("no CUDA driver: libcublas could not be loaded".into());
    }
    if !lt {
        return Some("no CUDA driver: libcublasLt could not be loaded".into());
    }
    None
}

/// Whether the GPU can run here.
pub fn available() -> bool {
    unavailable_reason().is_none()
}

/// A `tier-api` error (allocation, driver call) as the op layer's.
pub fn tier_err(e: tier_api::Error) -> Error {
    Error::Tier(e)
}

/// A driver call's failure as the op layer's error, naming the call.
pub fn driver_err(call: &str, e: tier_cuda::kernels::DriverError) -> Error {
    // A kernel or stream call, not a tier's memory: said as the GPU's.
    Error::Gpu(format!("GPU: {}", tier_cuda::kernels::driver_error("gpu", call, e)))
}

/// One GPU as a family uses it: the device, a compute stream, the BLAS
/// handles and the compiled kernels. Everything enqueued goes on the one
/// stream, in order.
pub struct Gpu {
    device: Arc<GpuDevice>,
    stream: Arc<CudaStream>,
    pub blas: blas::Blas,
    pub kernels: kernels::Kernels,
    /// The f16/bf16 kernels ([`llm`]), compiled and loaded by the first
    /// [`Gpu::llm`].
    llm: OnceLock<llm::LlmKernels>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("device", &self.device).finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens GPU `ordinal`, compiles the kernels (once per process) and makes
    /// the BLAS handles. Fails with "no CUDA driver: ..." where the driver,
    /// a GPU or a library is missing.
    pub fn new(ordinal: u32) -> Result<Self> {
        if let Some(reason) = unavailable_reason() {
            return Err(Error::Gpu(reason));
        }
        let device = GpuDevice::new(GpuConfig { ordinal, streams: 4, ..GpuConfig::default() }).map_err(tier_err)?;
        let stream = device.new_stream().map_err(tier_err)?;
        let kernels = kernels::Kernels::load(&device)?;
        let blas = blas::Blas::new(&device, &stream)?;
        Ok(Gpu { device, stream, blas, kernels, llm: OnceLock::new() })
    }

    /// The f16/bf16 kernels ([`llm`]): compiled and loaded on the first
    /// call (a run that never asks pays nothing); a
    /// failure to compile or load is returned, and the next call tries
    /// again.
    pub fn llm(&self) -> Result<&llm::LlmKernels> {
        if let Some(k) = self.llm.get() {
            return Ok(k);
        }
        let loaded = llm::LlmKernels::load(&self.device)?;
        // Two threads racing here both load (the module is compiled once,
        // under tier-cuda's cache lock); the first to set wins.
        Ok(self.llm.get_or_init(|| loaded))
    }

    /// Limits the GPU tier to `budget` bytes held by the engine's buffers
    /// (`--gpu-mem`; `None`: no limit), what is held already included. Set
    /// after [`Gpu::new`], whose own buffers (the BLAS workspace) a tiny
    /// budget would refuse before placement could say why.
    pub fn set_budget(&self, budget: Option<u64>) {
        self.device.account().set_budget(budget);
    }

    /// The `tier-cuda` device (its account counts every buffer here).
    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.device
    }

    /// The compute stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for everything enqueued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_err("cuStreamSynchronize", e))
    }

    /// Bytes held now and at most so far by this engine's buffers on the
    /// GPU (the tier's exact account; libraries' own workspaces excluded).
    pub fn held_bytes(&self) -> (u64, u64) {
        let s = self.device.account().stats();
        (s.resident, s.peak_resident)
    }

    /// Free and total device memory as the driver reports them (every
    /// process and library included).
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        self.device.mem_info().map_err(tier_err)
    }
}

/// A CUDA event of the GPU: recorded on the compute stream after work
/// enqueued there, waited on by the host (what a weight slot's last reader
/// leaves behind).
pub struct Event(tier_cuda::kernels::CudaEvent);

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event").finish_non_exhaustive()
    }
}

impl Event {
    /// A new event (without timing) on `gpu`'s device.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Ok(Event(gpu.device().new_event(false).map_err(tier_err)?))
    }

    /// Records the event on `gpu`'s compute stream, after everything
    /// enqueued there so far.
    pub fn record(&self, gpu: &Gpu) -> Result<()> {
        self.0.record(gpu.stream()).map_err(|e| driver_err("cuEventRecord", e))
    }

    /// Waits until the work before the last record has run.
    pub fn synchronize(&self) -> Result<()> {
        self.0.synchronize().map_err(|e| driver_err("cuEventSynchronize", e))
    }
}
