//! # tier-disk: NVMe/SSD as a memory tier
//!
//! This room holds the disk tier of tierlm:
//!
//! - [`DiskDevice`]: a [`tier_api::Device`] (`disk:{id}`) whose tensors are
//!   extents of ONE arena file in the offload directory. The file is created
//!   with `O_CREAT|O_EXCL|O_RDWR|O_DIRECT|O_CLOEXEC` under a unique name and
//!   unlinked at once, so nothing is left behind even after a crash; where
//!   the filesystem refuses O_DIRECT (tmpfs) it is opened buffered and
//!   [`DiskDevice::describe`](tier_api::Device::describe) says so.
//! - The arena: extents aligned to the direct-I/O offset alignment (from
//!   `statx` STATX_DIOALIGN, at least 4096), allocated first fit from a free
//!   list that coalesces on free; the file grows with `fallocate` (so a full
//!   disk is [`Error::DiskFull`](tier_api::Error::DiskFull) at allocation
//!   time) and freed extents are punched out so the space really returns.
//!   Accounting goes through a [`tier_api::MemAccount`]: asked = tensor
//!   bytes, resident = extent bytes.
//! - Positioned I/O ([`tier_api::BlockIo`]) of any offset, length and
//!   buffer: aligned parts move straight into or out of the caller's memory,
//!   unaligned heads, tails and buffers through aligned staging buffers, and
//!   partial-block writes are read-modify-write under striped locks.
//! - Two backends behind one internal trait and one driver loop: io_uring
//!   (a pool of rings, chunks of `chunk_size` kept in flight up to the queue
//!   depth, staging buffers registered as fixed buffers, and caller memory
//!   registered through [`tier_api::BlockIo::register_buffers`] used in
//!   place as fixed buffers too) and a fallback of
//!   `pread`/`pwrite` on a bounded thread pool, chosen automatically when
//!   io_uring cannot be set up. Short transfers and EINTR/EAGAIN are retried
//!   a bounded number of times; errors are typed and name the operation,
//!   tier, offset and length.
//! - [`prepare_offload_dir`], [`free_bytes`], [`check_free`]: the offload
//!   directory made or refused clearly, and its free space (statvfs) checked
//!   before a placement puts bytes on disk.
//! - [`fault`]: a backend wrapper that injects short transfers, EIO and
//!   ENOSPC, for tests.
//! - [`bench`]: host↔disk bandwidth of each backend against a buffered,
//!   memory-mapped baseline (what FlexGen's numpy-memmap disk tier does).
//!
//! It may depend only on `tier-api` (and `io-uring`, `libc`, `parking_lot`,
//! `crossbeam`); it knows nothing of host memory kinds, GPUs or models.

mod activity;
mod alloc;
mod arena;
mod backend;
pub mod bench;
mod config;
mod device;
mod dir;
pub mod fault;
mod io;
mod sys;

pub use activity::{IoActivity, IoSnapshot, IoWindow};
pub use arena::Alignment;
pub use config::{
    BackendChoice, DiskConfig, MAX_CHUNK_SIZE, MAX_FIXED_BUFFERS, MAX_FIXED_BUFFER_BYTES, MAX_QUEUE_DEPTH,
    MAX_SESSIONS, MAX_STAGING_BUFFERS, MAX_THREADS, MIN_CHUNK_SIZE,
};
pub use device::{DiskDevice, DiskStorage};
pub use dir::{check_free, check_offload_dir, free_bytes, in_memory_fs, prepare_offload_dir};
pub use io::{IoFailure, MAX_AGAIN_RETRIES, MAX_SHORT_RETRIES};
pub use sys::{page_size, AlignedBuf};

/// A directory for unit tests on the real disk (under the workspace's
/// `target/`), not /tmp, which may be tmpfs and refuse O_DIRECT.
#[cfg(test)]
pub(crate) fn test_dir() -> tempfile::TempDir {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tier-disk-tests");
    let _ = std::fs::create_dir_all(&base);
    tempfile::tempdir_in(&base).unwrap_or_else(|_| tempfile::tempdir().expect("a temporary directory"))
}
