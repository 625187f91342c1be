//! The host device and its storage.

use crate::page_size;
use memmap2::MmapMut;
use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;
use tier_api::{
    Access, DType, Device, DeviceKind, Error, HostMemKind, HostSpan, MemAccount, Reservation, Result, Shape, Storage,
    Tensor,
};

/// How to build a host device.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub kind: HostMemKind,
    /// Resident bytes the tier may hold; `None` for no limit.
    pub budget: Option<u64>,
    /// Alignment every allocation must have (the disk's direct-I/O memory
    /// alignment). Must divide the page size.
    pub alignment: usize,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig { kind: HostMemKind::Pageable, budget: None, alignment: 4096 }
    }
}

/// Host memory of one kind.
#[derive(Debug)]
pub struct HostDevice {
    kind: HostMemKind,
    alignment: usize,
    page: usize,
    account: Arc<MemAccount>,
}

impl HostDevice {
    pub fn new(config: HostConfig) -> Result<Arc<Self>> {
        if config.kind != HostMemKind::Pageable {
            return Err(Error::Unsupported {
                what: format!("{} host memory", config.kind),
                hint: "pinned and registered memory come with the CUDA tier; use --host-memory pageable".into(),
            });
        }
        let page = page_size();
        if config.alignment == 0 || !config.alignment.is_power_of_two() || page % config.alignment != 0 {
            return Err(Error::Config(format!(
                "host alignment {} must be a power of two dividing the page size {page}",
                config.alignment
            )));
        }
        let tier = DeviceKind::Host { mem: config.kind }.to_string();
        Ok(Arc::new(HostDevice {
            kind: config.kind,
            alignment: config.alignment,
            page,
            account: MemAccount::new(tier, config.budget),
        }))
    }

    pub fn mem_kind(&self) -> HostMemKind {
        self.kind
    }

    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Allocates `len` bytes as a `u8` tensor.
    pub fn allocate_bytes(&self, len: usize) -> Result<Tensor> {
        self.allocate(&Shape::new([len]), DType::U8)
    }
}

impl Device for HostDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Host { mem: self.kind }
    }

    fn describe(&self) -> String {
        format!("host memory, {} (aligned to {} bytes)", self.kind, self.alignment)
    }

    fn allocate(&self, shape: &Shape, dtype: DType) -> Result<Tensor> {
        let len = shape.byte_size(dtype)?;
        let resident = len.div_ceil(self.page) * self.page;
        let reservation = self.account.reserve(len as u64, resident as u64)?;
        let storage = HostStorage::pageable(len, reservation)?;
        Tensor::from_storage(Arc::new(storage), shape.clone(), dtype)
    }

    fn account(&self) -> &Arc<MemAccount> {
        &self.account
    }
}

/// Bytes of host memory. Pageable memory is an anonymous mapping: page
/// aligned, zeroed, exactly `len` bytes rounded up to a page.
#[derive(Debug)]
pub struct HostStorage {
    ptr: NonNull<u8>,
    len: usize,
    kind: HostMemKind,
    /// Owns the pages; `None` for an empty allocation.
    _map: Option<MmapMut>,
    _reservation: Reservation,
}

// SAFETY: the storage owns its mapping; the raw pointer is only a cached
// address into it, and concurrent access goes through HostSpan's contract.
unsafe impl Send for HostStorage {}
// SAFETY: as above.
unsafe impl Sync for HostStorage {}

impl HostStorage {
    fn pageable(len: usize, reservation: Reservation) -> Result<Self> {
        if len == 0 {
            return Ok(HostStorage {
                ptr: NonNull::dangling(),
                len,
                kind: HostMemKind::Pageable,
                _map: None,
                _reservation: reservation,
            });
        }
        let mut map = MmapMut::map_anon(len).map_err(|e| Error::AllocationFailed {
            tier: "host:pageable".into(),
            asked: len as u64,
            reason: e.to_string(),
        })?;
        let ptr = NonNull::new(map.as_mut_ptr()).ok_or_else(|| Error::AllocationFailed {
            tier: "host:pageable".into(),
            asked: len as u64,
            reason: "the kernel returned a null mapping".into(),
        })?;
        Ok(HostStorage { ptr, len, kind: HostMemKind::Pageable, _map: Some(map), _reservation: reservation })
    }
}

impl Storage for HostStorage {
    fn device(&self) -> DeviceKind {
        DeviceKind::Host { mem: self.kind }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn access(&self) -> Access<'_> {
        // SAFETY: the mapping is valid for `len` bytes while self lives.
        Access::Host(unsafe { HostSpan::new(self.ptr, self.len) })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pageable_allocations_are_exact_and_aligned() {
        let dev = HostDevice::new(HostConfig::default()).unwrap();
        let t = dev.allocate(&Shape::new([1000, 3]), DType::F16).unwrap();
        assert_eq!(t.byte_len(), 6000);
        let Access::Host(span) = t.storage().access() else { panic!("host access") };
        assert_eq!(span.as_ptr() as usize % 4096, 0);
        let s = dev.stats();
        assert_eq!(s.asked, 6000);
        assert_eq!(s.resident, 6000usize.div_ceil(page_size()) as u64 * page_size() as u64);
        assert!(t.to_bytes().unwrap().iter().all(|&b| b == 0));
        drop(t);
        assert_eq!(dev.stats().resident, 0);
    }

    #[test]
    fn budget_refuses_with_a_typed_error() {
        let dev = HostDevice::new(HostConfig { budget: Some(1 << 20), ..HostConfig::default() }).unwrap();
        let _a = dev.allocate_bytes(600 << 10).unwrap();
        match dev.allocate_bytes(600 << 10) {
            Err(Error::OutOfMemory { tier, asked, .. }) => {
                assert_eq!(tier, "host:pageable");
                assert_eq!(asked, 600 << 10);
            }
            other => panic!("expected out of memory, got {other:?}"),
        }
    }

    #[test]
    fn pinned_kinds_say_what_to_do_until_the_cuda_tier() {
        let err = HostDevice::new(HostConfig { kind: HostMemKind::Pinned, ..HostConfig::default() }).unwrap_err();
        assert!(err.to_string().contains("--host-memory pageable"), "{err}");
    }

    #[test]
    fn empty_tensors_work() {
        let dev = HostDevice::new(HostConfig::default()).unwrap();
        let t = dev.allocate(&Shape::new([0, 4]), DType::F32).unwrap();
        assert_eq!(t.byte_len(), 0);
        assert!(t.to_bytes().unwrap().is_empty());
    }

    #[test]
    fn bad_alignment_is_refused() {
        assert!(HostDevice::new(HostConfig { alignment: 3, ..HostConfig::default() }).is_err());
        assert!(HostDevice::new(HostConfig { alignment: 1 << 20, ..HostConfig::default() }).is_err());
    }
}
