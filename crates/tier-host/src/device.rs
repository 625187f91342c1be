//! The host device and its storage.

use crate::cuda::{driver_error, host_context, require_driver};
use crate::page_size;
use cudarc::driver::{sys, CudaContext};
use memmap2::MmapMut;
use std::any::Any;
use std::ffi::c_void;
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
    /// The driver context pinned and registered memory is made in; `None`
    /// for pageable memory, which needs no driver.
    ctx: Option<Arc<CudaContext>>,
}

impl HostDevice {
    /// A host tier of `config.kind`. Pinned and registered kinds need a CUDA
    /// driver with a device; without one this fails with a message that says
    /// to use pageable memory.
    pub fn new(config: HostConfig) -> Result<Arc<Self>> {
        let page = page_size();
        if config.alignment == 0 || !config.alignment.is_power_of_two() || page & (config.alignment - 1) != 0 {
            return Err(Error::Config(format!(
                "host alignment {} must be a power of two dividing the page size {page}",
                config.alignment
            )));
        }
        let ctx = match config.kind {
            HostMemKind::Pageable => None,
            kind => {
                require_driver(&format!("{kind} host memory"))?;
                Some(host_context()?)
            }
        };
        let tier = DeviceKind::Host { mem: config.kind }.to_string();
        Ok(Arc::new(HostDevice {
            kind: config.kind,
            alignment: config.alignment,
            page,
            account: MemAccount::new(tier, config.budget),
            ctx,
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

    /// The driver context this device pins memory in, if it is a pinned or
    /// registered tier.
    pub fn context(&self) -> Option<&Arc<CudaContext>> {
        self.ctx.as_ref()
    }

    fn tier(&self) -> String {
        DeviceKind::Host { mem: self.kind }.to_string()
    }
}

impl Device for HostDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Host { mem: self.kind }
    }

    fn describe(&self) -> String {
        let how = match self.kind {
            HostMemKind::Pinned => "cuMemHostAlloc, exact size, portable",
            HostMemKind::Registered => "anonymous mapping + cuMemHostRegister",
            HostMemKind::Pageable => "anonymous mapping",
        };
        format!("host memory, {} ({how}, aligned to {} bytes)", self.kind, self.alignment)
    }

    fn allocate(&self, shape: &Shape, dtype: DType) -> Result<Tensor> {
        self.allocate_filled(shape, dtype, true)
    }

    fn account(&self) -> &Arc<MemAccount> {
        &self.account
    }
}

impl HostDevice {
    /// Like [`Device::allocate`], but the tensor's contents are
    /// **unspecified** (old bytes of the process's own memory, never another
    /// process's): for a tensor the caller overwrites whole before anything
    /// reads it, such as a layer's home that a copy fills. It saves zeroing:
    /// pinned memory from `cuMemHostAlloc` is otherwise written once by the
    /// CPU here (tens of gigabytes at start-up for a model's weights).
    /// Pageable and registered memory are fresh anonymous mappings, zero
    /// from the kernel at no cost, so they come back zeroed all the same.
    /// Accounted exactly as [`Device::allocate`].
    pub fn allocate_uninit(&self, shape: &Shape, dtype: DType) -> Result<Tensor> {
        self.allocate_filled(shape, dtype, false)
    }

    /// An allocation, zeroed where the memory does not come zeroed when `zero`.
    fn allocate_filled(&self, shape: &Shape, dtype: DType, zero: bool) -> Result<Tensor> {
        let len = shape.byte_size(dtype)?;
        // Every kind holds whole pages: the kernel maps, and the driver
        // locks, nothing smaller. Nothing is rounded further.
        let resident = len.div_ceil(self.page) * self.page;
        let reservation = self.account.reserve(len as u64, resident as u64)?;
        let storage = match (self.kind, &self.ctx) {
            (HostMemKind::Pageable, _) => HostStorage::pageable(len, reservation)?,
            (HostMemKind::Pinned, Some(ctx)) => HostStorage::pinned(ctx, len, self.alignment, reservation, zero)?,
            (HostMemKind::Registered, Some(ctx)) => HostStorage::registered(ctx, len, resident, reservation)?,
            (kind, None) => {
                return Err(Error::Unsupported {
                    what: format!("{kind} host memory without a driver context"),
                    hint: "use --host-memory pageable".into(),
                })
            }
        };
        debug_assert_eq!(storage.len, len, "{}", self.tier());
        Tensor::from_storage(Arc::new(storage), shape.clone(), dtype)
    }
}

/// What owns the bytes of a [`HostStorage`].
#[derive(Debug)]
enum Backing {
    /// An empty allocation owns nothing.
    Empty,
    Pageable {
        _map: MmapMut,
    },
    /// From `cuMemHostAlloc` (at `raw`, which `ptr` may lie a little past
    /// when the driver's pointer was not aligned); freed with `cuMemFreeHost`.
    Pinned {
        ctx: Arc<CudaContext>,
        raw: NonNull<u8>,
    },
    /// An anonymous mapping registered with `cuMemHostRegister`;
    /// unregistered before the mapping is unmapped.
    Registered {
        ctx: Arc<CudaContext>,
        _map: MmapMut,
    },
}

/// Bytes of host memory. Pageable and registered memory is an anonymous
/// mapping (page aligned, zeroed); pinned memory comes from `cuMemHostAlloc`
/// at exactly the size asked and is zeroed on allocation (not by
/// [`HostDevice::allocate_uninit`]).
#[derive(Debug)]
pub struct HostStorage {
    ptr: NonNull<u8>,
    len: usize,
    kind: HostMemKind,
    backing: Backing,
    _reservation: Reservation,
}

// SAFETY: the storage owns its memory; the raw pointer is only a cached
// address into it, and concurrent access goes through HostSpan's contract.
unsafe impl Send for HostStorage {}
// SAFETY: as above.
unsafe impl Sync for HostStorage {}

fn refused(kind: HostMemKind, asked: usize, reason: String) -> Error {
    Error::AllocationFailed { tier: DeviceKind::Host { mem: kind }.to_string(), asked: asked as u64, reason }
}

/// What to tell a user whose pinning the OS refused.
const PIN_ADVICE: &str = "the OS refused to lock the pages; free (unpin) other pinned tensors, \
                          use --host-memory pageable, or lower the host memory budget";

/// `len` bytes from `cuMemHostAlloc`, portable (usable from every context)
/// and not write-combined (the CPU reads it at full speed). A context must
/// be current.
fn alloc_pinned(len: usize) -> Result<NonNull<u8>> {
    let kind = HostMemKind::Pinned;
    injected_refusal(kind, len, "cuMemHostAlloc")?;
    // SAFETY: a context is current (caller); the driver returns memory valid
    // for `len` bytes or an error.
    let raw = unsafe { cudarc::driver::result::malloc_host(len, sys::CU_MEMHOSTALLOC_PORTABLE) }
        .map_err(|e| refused(kind, len, format!("cuMemHostAlloc: {}; {PIN_ADVICE}", crate::cuda::driver_reason(e))))?;
    NonNull::new(raw.cast::<u8>()).ok_or_else(|| refused(kind, len, "cuMemHostAlloc returned a null pointer".into()))
}

/// The refusal `TIERLM_ALLOC_FAULTS` asks for, if it asks for this
/// page-locked allocation (tests; see `tier_api::fault`).
fn injected_refusal(kind: HostMemKind, len: usize, call: &str) -> Result<()> {
    if tier_api::fault::alloc_fails(tier_api::fault::AllocSite::PageLocked)? {
        let reason = format!("{call}: out of memory ({}); {PIN_ADVICE}", tier_api::fault::INJECTED);
        return Err(refused(kind, len, reason));
    }
    Ok(())
}

/// Anonymous mappings at least this large are hinted for transparent huge pages.
const HUGE_PAGE_HINT_MIN: usize = 4 << 20;

fn anon_map(kind: HostMemKind, len: usize) -> Result<(MmapMut, NonNull<u8>)> {
    let mut map = MmapMut::map_anon(len).map_err(|e| refused(kind, len, e.to_string()))?;
    if len >= HUGE_PAGE_HINT_MIN {
        // Direct I/O into huge pages builds requests of few segments: reads
        // from the disk tier measured ~1.4 GB/s into 4 KiB pages and ~1.9
        // into huge pages. Only whole aligned 2 MiB ranges inside the mapping
        // become huge pages, so resident bytes never exceed the pages asked
        // for. The hint is advisory: a kernel without THP just ignores it.
        let _ = map.advise(memmap2::Advice::HugePage);
    }
    let ptr = NonNull::new(map.as_mut_ptr())
        .ok_or_else(|| refused(kind, len, "the kernel returned a null mapping".into()))?;
    Ok((map, ptr))
}

impl HostStorage {
    fn empty(kind: HostMemKind, reservation: Reservation) -> Self {
        HostStorage { ptr: NonNull::dangling(), len: 0, kind, backing: Backing::Empty, _reservation: reservation }
    }

    fn pageable(len: usize, reservation: Reservation) -> Result<Self> {
        if len == 0 {
            return Ok(Self::empty(HostMemKind::Pageable, reservation));
        }
        let (map, ptr) = anon_map(HostMemKind::Pageable, len)?;
        Ok(HostStorage {
            ptr,
            len,
            kind: HostMemKind::Pageable,
            backing: Backing::Pageable { _map: map },
            _reservation: reservation,
        })
    }

    /// `len` bytes from `cuMemHostAlloc`, zeroed when `zero` (else their
    /// contents are whatever the driver hands out).
    fn pinned(
        ctx: &Arc<CudaContext>,
        len: usize,
        alignment: usize,
        reservation: Reservation,
        zero: bool,
    ) -> Result<Self> {
        let kind = HostMemKind::Pinned;
        if len == 0 {
            return Ok(Self::empty(kind, reservation));
        }
        ctx.bind_to_thread().map_err(|e| driver_error("host:pinned", "cuCtxSetCurrent", e))?;
        // Exactly `len` bytes first. The driver hands out large allocations
        // page aligned but sub-allocates small ones (seen: 64 KiB not 4 KiB
        // aligned); only then ask again with room to align.
        let raw = alloc_pinned(len)?;
        let storage = if (raw.as_ptr() as usize) & (alignment - 1) == 0 {
            HostStorage {
                ptr: raw,
                len,
                kind,
                backing: Backing::Pinned { ctx: Arc::clone(ctx), raw },
                _reservation: reservation,
            }
        } else {
            // SAFETY: from cuMemHostAlloc just above, unused, freed once.
            let _ = unsafe { cudarc::driver::result::free_host(raw.as_ptr().cast()) };
            let padded = len.checked_add(alignment).ok_or_else(|| refused(kind, len, "size overflow".into()))?;
            let raw = alloc_pinned(padded)?;
            let offset = raw.as_ptr().align_offset(alignment);
            // SAFETY: offset < alignment, so `offset + len` lies inside the
            // `len + alignment` bytes allocated.
            let ptr = unsafe { NonNull::new_unchecked(raw.as_ptr().add(offset)) };
            HostStorage {
                ptr,
                len,
                kind,
                backing: Backing::Pinned { ctx: Arc::clone(ctx), raw },
                _reservation: reservation,
            }
        };
        if zero {
            // SAFETY: `len` bytes at `ptr` are ours and nobody else sees them yet.
            unsafe { std::ptr::write_bytes(storage.ptr.as_ptr(), 0, len) };
        }
        Ok(storage)
    }

    fn registered(ctx: &Arc<CudaContext>, len: usize, mapped: usize, reservation: Reservation) -> Result<Self> {
        let kind = HostMemKind::Registered;
        if len == 0 {
            return Ok(Self::empty(kind, reservation));
        }
        let (map, ptr) = anon_map(kind, len)?;
        // Fault every page in from this thread first (the kernel zeroes
        // them, huge pages where the hint took), so that the registration
        // only locks pages already there: the driver's own faulting is
        // slower and serialised across threads. Measured on the H100 machine
        // (OPT-30B's 59 GB of weight homes, 8 threads): 5.0 s against 10.3 s.
        let page = crate::page_size();
        let mut off = 0;
        while off < mapped {
            // SAFETY: `off < mapped`, inside the fresh writable mapping
            // nobody else sees yet.
            unsafe { std::ptr::write_volatile(ptr.as_ptr().add(off), 0) };
            off += page;
        }
        ctx.bind_to_thread().map_err(|e| driver_error("host:registered", "cuCtxSetCurrent", e))?;
        injected_refusal(kind, len, "cuMemHostRegister")?;
        // SAFETY: the anonymous mapping covers `mapped` bytes (whole pages)
        // and outlives the registration: Drop unregisters before unmapping.
        unsafe { sys::cuMemHostRegister_v2(ptr.as_ptr().cast::<c_void>(), mapped, sys::CU_MEMHOSTREGISTER_PORTABLE) }
            .result()
            .map_err(|e| {
                refused(kind, len, format!("cuMemHostRegister: {}; {PIN_ADVICE}", crate::cuda::driver_reason(e)))
            })?;
        Ok(HostStorage {
            ptr,
            len,
            kind,
            backing: Backing::Registered { ctx: Arc::clone(ctx), _map: map },
            _reservation: reservation,
        })
    }
}

impl Drop for HostStorage {
    fn drop(&mut self) {
        match &self.backing {
            Backing::Empty | Backing::Pageable { .. } => {}
            Backing::Pinned { ctx, raw } => {
                let _ = ctx.bind_to_thread();
                // SAFETY: the pointer came from cuMemHostAlloc and is freed
                // once; no copy uses it any more (copies hold the tensor).
                if let Err(e) = unsafe { cudarc::driver::result::free_host(raw.as_ptr().cast()) } {
                    tracing::warn!("cuMemFreeHost of {} bytes failed: {}", self.len, crate::cuda::driver_reason(e));
                }
            }
            Backing::Registered { ctx, .. } => {
                let _ = ctx.bind_to_thread();
                // SAFETY: registered in `registered`; the mapping is still
                // there (it drops after this body).
                if let Err(e) = unsafe { sys::cuMemHostUnregister(self.ptr.as_ptr().cast()) }.result() {
                    tracing::warn!(
                        "cuMemHostUnregister of {} bytes failed: {}",
                        self.len,
                        crate::cuda::driver_reason(e)
                    );
                }
            }
        }
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
        // SAFETY: the memory is valid for `len` bytes while self lives.
        Access::Host(unsafe { HostSpan::new(self.ptr, self.len) })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::driver;

    fn have_driver() -> bool {
        if driver().is_ready() {
            true
        } else {
            println!("skipped: no CUDA driver");
            false
        }
    }

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
    fn pinned_kinds_without_a_driver_say_what_to_do() {
        if driver().is_ready() {
            println!("skipped: a CUDA driver is present, so pinned memory works");
            return;
        }
        for kind in [HostMemKind::Pinned, HostMemKind::Registered] {
            let err = HostDevice::new(HostConfig { kind, ..HostConfig::default() }).unwrap_err();
            assert!(err.to_string().contains("--host-memory pageable"), "{err}");
            assert!(err.to_string().contains(kind.name()), "{err}");
        }
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

    #[test]
    fn pinned_and_registered_are_exact_zeroed_and_accounted() {
        if !have_driver() {
            return;
        }
        for kind in [HostMemKind::Pinned, HostMemKind::Registered] {
            let dev = HostDevice::new(HostConfig { kind, ..HostConfig::default() }).unwrap();
            let len = (10 << 20) + 1;
            let t = dev.allocate_bytes(len).unwrap();
            assert_eq!(t.byte_len(), len);
            let Access::Host(span) = t.storage().access() else { panic!("host access") };
            assert_eq!(span.as_ptr() as usize % 4096, 0, "{kind}");
            let s = dev.stats();
            assert_eq!(s.asked, len as u64);
            assert_eq!(
                s.resident,
                len.div_ceil(page_size()) as u64 * page_size() as u64,
                "{kind}: whole pages, no more"
            );
            let bytes = t.to_bytes().unwrap();
            assert!(bytes.iter().all(|&b| b == 0), "{kind} memory starts zeroed");
            t.write_bytes(len - 3, &[7, 8, 9]).unwrap();
            let mut back = [0u8; 3];
            t.read_bytes(len - 3, &mut back).unwrap();
            assert_eq!(back, [7, 8, 9]);
            drop(t);
            let s = dev.stats();
            assert_eq!((s.asked, s.resident, s.allocations), (0, 0, 0));
            let empty = dev.allocate_bytes(0).unwrap();
            assert_eq!(empty.byte_len(), 0);
        }
    }

    #[test]
    fn uninit_allocations_are_exact_accounted_and_hold_what_is_written() {
        let mut kinds = vec![HostMemKind::Pageable];
        if have_driver() {
            kinds.extend([HostMemKind::Pinned, HostMemKind::Registered]);
        }
        for kind in kinds {
            let dev = HostDevice::new(HostConfig { kind, ..HostConfig::default() }).unwrap();
            for len in [1usize, 4097, (10 << 20) + 1] {
                let t = dev.allocate_uninit(&Shape::new([len]), DType::U8).unwrap();
                assert_eq!(t.byte_len(), len, "{kind}");
                let Access::Host(span) = t.storage().access() else { panic!("host access") };
                assert_eq!(span.as_ptr() as usize % 4096, 0, "{kind}: {len} bytes aligned");
                let s = dev.stats();
                assert_eq!(s.asked, len as u64, "{kind}");
                assert_eq!(s.resident, len.div_ceil(page_size()) as u64 * page_size() as u64, "{kind}");
                assert_eq!(s.allocations, 1, "{kind}");
                let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                t.write_bytes(0, &data).unwrap();
                assert_eq!(t.to_bytes().unwrap(), data, "{kind}: {len} bytes read back");
                drop(t);
                let s = dev.stats();
                assert_eq!((s.asked, s.resident, s.allocations), (0, 0, 0), "{kind}");
            }
            assert_eq!(dev.allocate_uninit(&Shape::new([0]), DType::U8).unwrap().byte_len(), 0);
        }
    }

    #[test]
    fn uninit_budget_is_enforced() {
        let dev = HostDevice::new(HostConfig { budget: Some(1 << 20), ..HostConfig::default() }).unwrap();
        assert!(matches!(dev.allocate_uninit(&Shape::new([2 << 20]), DType::U8), Err(Error::OutOfMemory { .. })));
    }

    #[test]
    fn small_pinned_allocations_are_aligned_too() {
        if !have_driver() {
            return;
        }
        // The driver sub-allocates small pinned blocks without page alignment.
        let dev = HostDevice::new(HostConfig { kind: HostMemKind::Pinned, ..HostConfig::default() }).unwrap();
        let tensors: Vec<Tensor> =
            [1usize, 100, 4095, 4096, 4097, 65536, 100_000].iter().map(|&n| dev.allocate_bytes(n).unwrap()).collect();
        for t in &tensors {
            let Access::Host(span) = t.storage().access() else { panic!("host access") };
            assert_eq!(span.as_ptr() as usize % 4096, 0, "{} bytes", t.byte_len());
            assert!(t.to_bytes().unwrap().iter().all(|&b| b == 0));
            t.write_bytes(0, &vec![0xff; t.byte_len()]).unwrap();
        }
        drop(tensors);
        assert_eq!(dev.stats().resident, 0);
    }

    #[test]
    fn pinned_budget_is_enforced_before_the_driver_is_asked() {
        if !have_driver() {
            return;
        }
        let dev =
            HostDevice::new(HostConfig { kind: HostMemKind::Pinned, budget: Some(1 << 20), ..HostConfig::default() })
                .unwrap();
        assert!(matches!(dev.allocate_bytes(2 << 20), Err(Error::OutOfMemory { .. })));
    }
}
