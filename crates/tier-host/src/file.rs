//! Read-only files mapped and page-locked for DMA (safetensors weights).
//!
//! A file is mapped `MAP_SHARED` and read-only, then registered with
//! `CU_MEMHOSTREGISTER_READ_ONLY`: the GPU can read it by DMA straight from
//! the page cache. Two other mappings are avoided on purpose: a `MAP_SHARED`
//! read-write mapping, which the driver refuses, and a `MAP_PRIVATE`
//! read-only mapping, whose registration has been seen to hang for minutes.
//! memmap2's `Mmap::map` is the `MAP_SHARED`, `PROT_READ` kind; nothing here
//! builds a private read-only mapping.
//!
//! The file must not shrink while it is mapped (the kernel would raise
//! SIGBUS on access); tierlm only registers files it treats as immutable.

use crate::cuda::{driver_reason, host_context, require_driver};
use crate::page_size;
use cudarc::driver::{sys, CudaContext};
use memmap2::Mmap;
use std::any::Any;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use tier_api::{
    Access, DType, DeviceKind, Error, HostMemKind, HostSpan, MemAccount, Reservation, Result, Shape, Storage, Tensor,
};

/// A whole file, mapped read-only and registered with the driver.
#[derive(Debug)]
pub struct RegisteredFile {
    path: PathBuf,
    ptr: NonNull<u8>,
    len: usize,
    ctx: Arc<CudaContext>,
    map: Mmap,
    _reservation: Reservation,
}

// SAFETY: the mapping is read-only and owned; the pointer is an address into it.
unsafe impl Send for RegisteredFile {}
// SAFETY: as above; nothing writes through it.
unsafe impl Sync for RegisteredFile {}

impl RegisteredFile {
    /// Maps `path` read-only and page-locks it. Its pages (the file's length
    /// rounded up to a page) count as resident on `account` (a host tier's),
    /// which may refuse them under its budget.
    pub fn open(path: &Path, account: &Arc<MemAccount>) -> Result<Arc<Self>> {
        require_driver("registering a file for DMA")?;
        let ctx = host_context()?;
        let refused = |reason: String| Error::AllocationFailed {
            tier: format!("{} ({})", DeviceKind::Host { mem: HostMemKind::Registered }, path.display()),
            asked: 0,
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| refused(format!("cannot open: {e}")))?;
        let len = file.metadata().map_err(|e| refused(format!("cannot stat: {e}")))?.len();
        let len = usize::try_from(len).map_err(|_| refused("the file is larger than the address space".into()))?;
        if len == 0 {
            return Err(refused("the file is empty; there is nothing to register".into()));
        }
        let page = page_size();
        let resident = len.div_ceil(page) * page;
        let reservation = account.reserve(len as u64, resident as u64)?;
        // SAFETY: a MAP_SHARED, PROT_READ mapping of a file tierlm does not
        // modify or truncate while it is mapped (module documentation).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| refused(format!("cannot map: {e}")))?;
        let ptr = NonNull::new(map.as_ptr() as *mut u8)
            .ok_or_else(|| refused("the kernel returned a null mapping".into()))?;
        ctx.bind_to_thread().map_err(|e| refused(format!("cannot bind the driver context: {}", driver_reason(e))))?;
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_READ_ONLY;
        // SAFETY: the mapping covers `resident` bytes (whole pages) and lives
        // until Drop, which unregisters first. It is MAP_SHARED read-only,
        // the kind the driver accepts with READ_ONLY.
        unsafe { sys::cuMemHostRegister_v2(ptr.as_ptr().cast::<c_void>(), resident, flags) }.result().map_err(|e| {
            refused(format!(
                "cuMemHostRegister (read-only) refused: {}; the OS may refuse to lock the pages: unpin other memory, \
                 use --host-memory pageable, or lower the host memory budget",
                driver_reason(e)
            ))
        })?;
        Ok(Arc::new(RegisteredFile { path: path.to_path_buf(), ptr, len, ctx, map, _reservation: reservation }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// A read-only tensor over `offset..offset + size` of the file, where
    /// `size` is the dense size of `shape` and `dtype`. It keeps the file
    /// mapped and registered while it (or a copy reading it) lives.
    pub fn tensor(self: &Arc<Self>, offset: usize, shape: &Shape, dtype: DType) -> Result<Tensor> {
        let len = shape.byte_size(dtype)?;
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => return Err(Error::LengthMismatch { len: offset.saturating_add(len), expected: self.len }),
        }
        let storage = FileSlice { file: Arc::clone(self), offset, len };
        Tensor::from_storage(Arc::new(storage), shape.clone(), dtype)
    }
}

impl Drop for RegisteredFile {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: registered in `open`; the mapping drops after this body.
        if let Err(e) = unsafe { sys::cuMemHostUnregister(self.ptr.as_ptr().cast()) }.result() {
            tracing::warn!("cuMemHostUnregister of {} failed: {}", self.path.display(), driver_reason(e));
        }
    }
}

/// A range of a registered file, as a tensor's storage. Read-only: the copy
/// matrix refuses it as a destination.
#[derive(Debug)]
struct FileSlice {
    file: Arc<RegisteredFile>,
    offset: usize,
    len: usize,
}

impl Storage for FileSlice {
    fn device(&self) -> DeviceKind {
        DeviceKind::Host { mem: HostMemKind::Registered }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn access(&self) -> Access<'_> {
        if self.len == 0 {
            // SAFETY: an empty span is never dereferenced.
            return Access::Host(unsafe { HostSpan::new(NonNull::dangling(), 0) });
        }
        // SAFETY: offset + len lies inside the mapping (checked in `tensor`),
        // which lives as long as `self.file`. The storage reports itself read-only,
        // so the copy matrix and `write_bytes` never write through the span.
        let ptr = unsafe { NonNull::new_unchecked(self.file.ptr.as_ptr().add(self.offset)) };
        // SAFETY: as above.
        Access::Host(unsafe { HostSpan::new(ptr, self.len) })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn read_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::driver;
    use std::io::Write;

    #[test]
    fn registered_files_read_and_refuse_writes() {
        if !driver().is_ready() {
            println!("skipped: no CUDA driver");
            return;
        }
        let dir = std::env::temp_dir().join(format!("tier-host-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weights.bin");
        let data: Vec<u8> = (0..100_003u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        let account = MemAccount::new("host:registered", None);
        let file = RegisteredFile::open(&path, &account).unwrap();
        assert_eq!(file.bytes(), &data[..]);
        assert_eq!(account.stats().asked, data.len() as u64);
        let t = file.tensor(8, &Shape::new([1000]), DType::F32).unwrap();
        assert_eq!(t.to_bytes().unwrap(), &data[8..4008]);
        assert!(t.write_bytes(0, &[1]).is_err(), "read-only");
        assert!(file.tensor(100_000, &Shape::new([4]), DType::U8).is_err());
        drop(t);
        drop(file);
        assert_eq!(account.stats().resident, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
