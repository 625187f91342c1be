//! The traits a tier backend implements so that tensors and the copy matrix
//! can reach its bytes.

use crate::device::DeviceKind;
use crate::error::Result;
use std::any::Any;
use std::fmt;
use std::ptr::NonNull;

/// The bytes behind one allocation. Dropping the storage frees them and
/// releases their accounting.
pub trait Storage: Send + Sync + fmt::Debug + 'static {
    fn device(&self) -> DeviceKind;

    /// Bytes asked for (the tensor's dense size).
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How the copy matrix reaches the bytes.
    fn access(&self) -> Access<'_>;

    /// For routes that need their backend's own type (the GPU routes).
    fn as_any(&self) -> &dyn Any;

    /// Whether the bytes may only be read (a file mapped read-only). Copies
    /// into such a storage and synchronous writes are refused.
    fn read_only(&self) -> bool {
        false
    }
}

/// How a storage's bytes are reached.
pub enum Access<'a> {
    /// Addressable by the CPU.
    Host(HostSpan),
    /// Reached by positioned reads and writes, starting at `base`.
    Block { io: &'a dyn BlockIo, base: u64 },
    /// Reached only by routes that know the backend (GPU memory).
    Opaque,
}

/// A span of host memory owned by a storage. It carries a raw pointer so
/// that copies of disjoint views of one tensor can run at the same time;
/// whoever writes through it must keep to the view it was given.
#[derive(Clone, Copy, Debug)]
pub struct HostSpan {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a HostSpan is an address range owned by a Storage that is Send and
// Sync; the span itself grants nothing beyond what its unsafe accessors check.
unsafe impl Send for HostSpan {}
// SAFETY: as above; shared access alone never dereferences the pointer.
unsafe impl Sync for HostSpan {}

impl HostSpan {
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as
    /// the storage that hands out this span is alive.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        HostSpan { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes `offset..offset + len`, or `None` when out of range.
    ///
    /// # Safety
    /// No one may write these bytes while the slice lives.
    pub unsafe fn slice(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in range (checked above) of memory valid for `self.len`
        // bytes (constructor contract); no writer (caller contract).
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) })
    }

    /// The bytes `offset..offset + len` for writing, or `None` when out of range.
    ///
    /// # Safety
    /// No one else may read or write these bytes while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> Option<&mut [u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in range (checked above); exclusive (caller contract).
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) })
    }
}

/// Positioned I/O on a tier that the CPU cannot address (a disk arena).
/// Implementations handle alignment themselves: callers pass any offset,
/// length and buffer, and get all the bytes or an error.
pub trait BlockIo: Send + Sync {
    /// The tier, as users see it (for example `disk:0`).
    fn tier(&self) -> String;

    /// The backend serving requests (for example `io_uring` or `pread pool`).
    fn backend(&self) -> String;

    /// Reads exactly `dst.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()>;

    /// Writes all of `src` at `offset`.
    fn write_at(&self, offset: u64, src: &[u8]) -> Result<()>;

    /// Registers host memory that later requests will use as their buffers,
    /// so that the backend can move bytes into and out of it without mapping
    /// it anew for every request (io_uring fixed buffers). Requests whose
    /// buffer lies inside a registered span take the faster path; all other
    /// requests are served as before, and alignment rules do not change.
    ///
    /// `Ok(None)`: this backend cannot register memory (the default); plain
    /// `read_at`/`write_at` serve every buffer. `Err`: it could, but the
    /// kernel or a bound refused (locked-memory limit, memory it cannot pin,
    /// too many spans); callers may carry on without registration.
    /// `Ok(Some(handle))`: the spans stay registered until the handle is
    /// dropped; dropping it unregisters them.
    ///
    /// # Safety
    /// Every span's memory must stay allocated and mapped at the same
    /// address, and must not be freed or remapped, until the returned handle
    /// has been dropped: the kernel may keep the pages and move bytes into
    /// them directly. The handle must be dropped before the memory is freed.
    unsafe fn register_buffers(&self, spans: &[HostSpan]) -> Result<Option<Box<dyn FixedBuffers>>> {
        let _ = spans;
        Ok(None)
    }
}

/// Host memory registered with a [`BlockIo`] by
/// [`BlockIo::register_buffers`]. Dropping it unregisters the memory; only
/// after that may the memory be freed.
pub trait FixedBuffers: Send + Sync {
    /// For users: what is registered and where ("2 spans (16.0 MiB) with 4
    /// of 4 rings").
    fn describe(&self) -> String;

    /// I/O operations so far whose buffer lay in these spans and that took
    /// the registered path (for reports and tests).
    fn ops(&self) -> u64;

    /// Whether the [`BlockIo`] it was registered with still exists. Once
    /// false, the handle serves nothing and may be dropped; a new `BlockIo`
    /// at the same address is another one.
    fn active(&self) -> bool {
        true
    }
}

impl fmt::Debug for dyn FixedBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedBuffers")
            .field("describe", &self.describe())
            .field("ops", &self.ops())
            .field("active", &self.active())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain;

    impl BlockIo for Plain {
        fn tier(&self) -> String {
            "disk:0".into()
        }

        fn backend(&self) -> String {
            "test".into()
        }

        fn read_at(&self, _offset: u64, _dst: &mut [u8]) -> Result<()> {
            Ok(())
        }

        fn write_at(&self, _offset: u64, _src: &[u8]) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn backends_register_nothing_unless_they_can() {
        let mut mem = [0u8; 64];
        // SAFETY: `mem` outlives the span, which is never dereferenced here.
        let span = unsafe { HostSpan::new(NonNull::from(&mut mem).cast(), mem.len()) };
        // SAFETY: nothing is registered.
        assert!(unsafe { Plain.register_buffers(&[span]) }.unwrap().is_none());
    }
}
