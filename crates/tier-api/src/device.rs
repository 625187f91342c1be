//! Devices: the tiers that hold tensors.

use crate::account::{MemAccount, MemStats};
use crate::dtype::{DType, Shape};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// How host memory is obtained. The kind decides which copy path a host↔GPU
/// copy can take: pinned and registered memory can be the target of DMA,
/// pageable memory needs a relay through pinned staging buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostMemKind {
    /// Page-locked memory from `cuMemHostAlloc`, exactly the size asked.
    Pinned,
    /// An anonymous mapping page-locked afterwards with `cuMemHostRegister`.
    Registered,
    /// Ordinary memory, aligned for direct I/O.
    Pageable,
}

impl HostMemKind {
    pub const ALL: [HostMemKind; 3] = [HostMemKind::Pinned, HostMemKind::Registered, HostMemKind::Pageable];

    pub const fn name(self) -> &'static str {
        match self {
            HostMemKind::Pinned => "pinned",
            HostMemKind::Registered => "registered",
            HostMemKind::Pageable => "pageable",
        }
    }

    /// Whether the GPU can read and write this memory directly by DMA.
    pub const fn is_page_locked(self) -> bool {
        !matches!(self, HostMemKind::Pageable)
    }
}

impl fmt::Display for HostMemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HostMemKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pinned" => Ok(HostMemKind::Pinned),
            "registered" => Ok(HostMemKind::Registered),
            "pageable" => Ok(HostMemKind::Pageable),
            other => Err(Error::Config(format!(
                "unknown host memory kind {other:?}; expected one of pinned, registered, pageable"
            ))),
        }
    }
}

/// Which tier a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Gpu { ordinal: u32 },
    Host { mem: HostMemKind },
    Disk { id: u32 },
}

impl DeviceKind {
    pub const fn is_host(&self) -> bool {
        matches!(self, DeviceKind::Host { .. })
    }

    pub const fn is_disk(&self) -> bool {
        matches!(self, DeviceKind::Disk { .. })
    }

    pub const fn is_gpu(&self) -> bool {
        matches!(self, DeviceKind::Gpu { .. })
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Gpu { ordinal } => write!(f, "gpu:{ordinal}"),
            DeviceKind::Host { mem } => write!(f, "host:{mem}"),
            DeviceKind::Disk { id } => write!(f, "disk:{id}"),
        }
    }
}

/// A memory tier. Devices are shared (`Arc<dyn Device>`); tensors they
/// allocate keep what they need of the device alive, and release their bytes
/// and their accounting when the last handle and the last copy using them are
/// gone.
pub trait Device: Send + Sync {
    fn kind(&self) -> DeviceKind;

    /// A one-line description for users: the tier, its backend, where it lives.
    fn describe(&self) -> String;

    /// Allocates a dense, row-major tensor. Contents are zero on host and disk
    /// tiers; on the GPU they are unspecified.
    fn allocate(&self, shape: &Shape, dtype: DType) -> Result<Tensor>;

    /// The tier's accounting.
    fn account(&self) -> &Arc<MemAccount>;

    fn stats(&self) -> MemStats {
        self.account().stats()
    }

    fn set_budget(&self, budget: Option<u64>) {
        self.account().set_budget(budget)
    }

    /// Gives a tensor back. Its bytes are released once no other handle and
    /// no in-flight copy uses them; a tensor of another device is refused.
    fn free(&self, tensor: Tensor) -> Result<()> {
        if tensor.device() != self.kind() {
            return Err(Error::WrongDevice { expected: self.kind(), found: tensor.device() });
        }
        drop(tensor);
        Ok(())
    }
}
