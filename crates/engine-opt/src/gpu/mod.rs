//! # The GPU engine: OPT with everything on one GPU
//!
//! The first piece of the offloading engine. Weights, KV cache and
//! activations all live in GPU memory; the code is written layer by layer,
//! with the same split as the CPU reference in [`crate::model`], so that a
//! later block schedule can stream a layer's weights and a batch's cache
//! from host or disk into GPU slots and call the same functions:
//!
//! - [`Gpu`]: the device (through `tier-cuda`, so every buffer is counted
//!   against the GPU tier's account), one compute stream, the cuBLAS and
//!   cuBLASLt handles ([`blas`]) and the NVRTC kernels ([`kernels`]).
//! - [`buffer::DevBuf`]: a typed GPU buffer.
//! - [`weights`]: per-layer weights as GPU buffers (matrices f16; q, k and v
//!   stacked into one `[3·hidden, hidden]` matrix), loaded from any
//!   [`crate::weights::WeightSource`] or made on the GPU by a seeded kernel
//!   (`--dummy`).
//! - [`cache`]: the KV cache of one layer, `[batch][head][position][head_dim]`
//!   f16, so that one head of one sequence is contiguous for decoding.
//! - [`model`]: [`model::GpuModel::embed`], [`model::GpuModel::layer_forward`]
//!   (the attention block, then the MLP block), [`model::GpuModel::logits`]
//!   and greedy argmax, all on the GPU.
//! - [`generation`]: prefill and decode over a block of batches in
//!   FlexGen's order (for each step, for each layer, for each batch), with the
//!   CPU engine's stopping rules and timing split.
//! - [`offload`]: weights off the GPU (`--percent W_GPU W_CPU ...`): the
//!   first decoder layers resident, the others' rows split over host memory
//!   (page-locked or pageable) and disk in `--offload-dir`, streamed through
//!   GPU slots with the copy matrix, the next layer copying while the
//!   current one computes; embeddings and logits weights stay on the GPU.
//! - [`packed`]: `--compress-weight`: decoder matrices quantized to 4 bits
//!   at load and held packed on their tier (GPU, host, disk, slots);
//!   dequantized on the GPU into one shared f16 layer workspace just before
//!   each layer computes.
//! - [`tiered_cache`]: the KV cache off the GPU (`--percent _ _ C_GPU C_CPU
//!   _ _`): each batch's cache split in whole sequences over GPU, host and
//!   disk, loaded into two GPU slots a layer at a time; with
//!   `--cpu-cache-compute`, decode attention on the CPU over the host cache.
//! - [`bench`]: `tierlm bench` and `tierlm generate` on this engine.
//!
//! Numerics: f16 storage, f32 accumulation everywhere. Matrix products go
//! through cuBLASLt (bias, ReLU and the residual add fused into the product's
//! epilogue) with cuBLAS as the fallback; the residual stream stays f32 between
//! blocks (the CPU reference is f32 throughout; this keeps the two within
//! rounding of f16 activations).
//!
//! Nothing here panics where CUDA is missing: [`unavailable_reason`] says why
//! the engine cannot run ("no CUDA driver: ..."), and [`Gpu::new`] returns
//! that as an [`Error::Gpu`].

pub mod bench;
pub mod blas;
pub mod buffer;
pub mod cache;
pub mod generation;
pub mod kernels;
pub mod model;
pub mod offload;
pub mod packed;
pub mod profile;
pub mod tiered_cache;
pub mod weights;

use std::sync::Arc;

use tier_api::Device;
use tier_cuda::kernels::CudaStream;
use tier_cuda::{GpuConfig, GpuDevice};

use crate::error::{Error, Result};

pub use model::GpuModel;

/// Why the GPU engine cannot run on this machine, or `None` when the
/// driver, a GPU, NVRTC, cuBLAS and cuBLASLt are all there. Loads no
/// library function beyond the driver's version and device count.
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

/// Whether the GPU engine can run here.
pub fn available() -> bool {
    unavailable_reason().is_none()
}

/// A `tier-api` error (allocation, driver call) as the engine's.
pub(crate) fn tier_err(e: tier_api::Error) -> Error {
    Error::Gpu(format!("GPU: {e}"))
}

/// A driver call's failure as the engine's error, naming the call.
pub(crate) fn driver_err(call: &str, e: tier_cuda::kernels::DriverError) -> Error {
    tier_err(tier_cuda::kernels::driver_error("gpu", call, e))
}

/// One GPU as the engine uses it: the device, a compute stream, the BLAS
/// handles and the compiled kernels. Everything the engine enqueues goes on
/// the one stream, in order.
pub struct Gpu {
    device: Arc<GpuDevice>,
    stream: Arc<CudaStream>,
    pub(crate) blas: blas::Blas,
    pub(crate) kernels: kernels::Kernels,
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
        Ok(Gpu { device, stream, blas, kernels })
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
