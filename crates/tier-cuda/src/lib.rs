//! # tier-cuda: the GPU tier
//!
//! This room holds the GPU as a memory tier and every copy path that touches
//! it:
//!
//! - [`probe`]: finds the driver and the GPUs without creating a context, and
//!   never panics where there is no driver ([`probe_message`] is the one line
//!   a tool prints: "no CUDA driver: running without a GPU").
//! - [`GpuDevice`]: device memory from `cuMemAlloc` with exact accounting and
//!   an optional budget (`--gpu-mem`), out-of-memory as
//!   [`tier_api::Error::OutOfMemory`], copy streams and events. Its storage is
//!   [`tier_api::Access::Opaque`]; routes reach it by downcasting.
//! - [`routes`] / [`register_routes`]: the copy-matrix routes: DMA between
//!   page-locked host memory and the GPU, a relay for pageable memory through
//!   a bounded ring of pinned staging buffers, staged disk paths through the
//!   same ring, and GPU to GPU. Completion is tracked with events on copy
//!   streams, never with whole-device synchronization.
//! - [`kernels`]: kernels compiled at run time by NVRTC for the GPU's
//!   architecture, cached per GPU by source, and launched on a stream; the
//!   engine's kernels and `compression`'s dequantizer use it.
//! - [`bench`]: bandwidth of every GPU path next to the raw driver figure,
//!   and the pinned-memory residency check.
//!
//! It may depend on `tier-api`, `tier-host` (pinned host memory and driver
//! discovery) and cudarc; nothing below the engine depends on it except
//! through the `tier-api` traits. Disks are reached only through
//! `tier_api::BlockIo`, so it does not depend on `tier-disk`.

pub mod bench;
mod device;
pub mod kernels;
mod plan;
mod probe;
mod routes;
mod staging;

pub use device::{GpuConfig, GpuDevice, GpuStorage, MAX_STREAMS};
pub use probe::{gpu_available, probe, probe_all, probe_message, GpuInfo};
pub use routes::{register_routes, routes};
pub use staging::{StagingConfig, MAX_HELPERS, MAX_SLOTS, MAX_SLOT_BYTES, MIN_SLOT_BYTES};

use std::sync::Arc;
use tier_api::{CopyConfig, CopyMatrix, Result};

/// A copy matrix with the built-in host and disk routes and the GPU routes.
pub fn copy_matrix(config: CopyConfig) -> Result<CopyMatrix> {
    let mut m = CopyMatrix::new(config)?;
    register_routes(&mut m);
    Ok(m)
}

/// Opens every GPU the driver sees with `config` (its ordinal ignored);
/// empty without a driver or a GPU.
pub fn open_all(config: &GpuConfig) -> Result<Vec<Arc<GpuDevice>>> {
    probe_all()?.iter().map(|g| GpuDevice::new(GpuConfig { ordinal: g.ordinal, ..config.clone() })).collect()
}
