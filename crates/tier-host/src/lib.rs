//! # tier-host: host memory as a tier
//!
//! This room holds host DRAM in its three kinds ([`HostMemKind`]): pinned by
//! `cuMemHostAlloc`, registered by `cuMemHostRegister` over an anonymous
//! mapping, and pageable. Every allocation is exactly the size asked (rounded
//! only to whole pages by the kernel, and accounted so), aligned for direct
//! I/O so that disk reads can land in it without a bounce buffer.
//!
//! It also decides which kind to use by default ([`HostMemKindExt::auto`]):
//! pinned where a CUDA driver is present and the platform allows it, pageable
//! under WSL or without a driver, overridden by `--host-memory` or the
//! `TIERLM_HOST_MEMORY` environment variable.
//!
//! Read-only files (safetensors weights) can be mapped `MAP_SHARED` and
//! registered read-only for DMA ([`RegisteredFile`]).
//!
//! Pinned and registered memory is exact: the tier accounts `asked` as the
//! bytes asked and `resident` as the whole pages locked, and nothing rounds
//! to powers of two. Without a CUDA driver only pageable memory exists, and
//! asking for the others says so ([`cuda::require_driver`]).
//!
//! It may depend on `tier-api` and on cudarc's driver bindings (only to find
//! the driver and pin memory); it knows nothing of disks, models or the GPU
//! tier's streams.

pub mod cuda;
mod device;
mod file;
mod platform;

pub use device::{HostConfig, HostDevice, HostStorage};
pub use file::RegisteredFile;
pub use platform::{is_wsl, HostMemChoice, HostMemKindExt, HOST_MEMORY_ENV};
pub use tier_api::HostMemKind;

/// The page size the kernel maps memory in.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}
