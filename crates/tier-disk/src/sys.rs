//! Thin wrappers over the system calls the disk tier needs: `statx` with
//! STATX_DIOALIGN, `fallocate`, `fstat`, `posix_fadvise`, and page-aligned
//! anonymous buffers.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;

/// Bounded retries of a system call interrupted by a signal.
const MAX_EINTR_RETRIES: u32 = 64;

/// Runs `f` until it does not fail with EINTR, at most [`MAX_EINTR_RETRIES`] times.
fn retry_eintr(mut f: impl FnMut() -> libc::c_int) -> io::Result<libc::c_int> {
    let mut attempts = 0;
    loop {
        let r = f();
        if r >= 0 {
            return Ok(r);
        }
        let err = io::Error::last_os_error();
        attempts += 1;
        if err.raw_os_error() != Some(libc::EINTR) || attempts >= MAX_EINTR_RETRIES {
            return Err(err);
        }
    }
}

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

/// `struct statx_timestamp` of the kernel ABI.
#[repr(C)]
#[derive(Default)]
struct StatxTimestamp {
    _sec: i64,
    _nsec: u32,
    _reserved: i32,
}

/// `struct statx` of the kernel ABI (256 bytes). glibc's libc bindings lack
/// the direct-I/O fields, so the layout is spelled out here.
#[repr(C)]
#[derive(Default)]
struct Statx {
    mask: u32,
    _blksize: u32,
    _attributes: u64,
    _nlink: u32,
    _uid: u32,
    _gid: u32,
    _mode: u16,
    _spare0: u16,
    _ino: u64,
    _size: u64,
    _blocks: u64,
    _attributes_mask: u64,
    _atime: StatxTimestamp,
    _btime: StatxTimestamp,
    _ctime: StatxTimestamp,
    _mtime: StatxTimestamp,
    _rdev_major: u32,
    _rdev_minor: u32,
    _dev_major: u32,
    _dev_minor: u32,
    _mnt_id: u64,
    dio_mem_align: u32,
    dio_offset_align: u32,
    _spare: [u64; 12],
}

const _: () = assert!(std::mem::size_of::<Statx>() == 256);
const _: () = assert!(std::mem::offset_of!(Statx, dio_mem_align) == 152);

/// `STATX_DIOALIGN` from `<linux/stat.h>` (Linux 6.1).
const STATX_DIOALIGN: u32 = 0x2000;

/// What `statx` says about direct I/O on an open file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DioAlign {
    /// The kernel or filesystem does not report it.
    Unknown,
    /// Reported as unsupported (both alignments zero).
    Unsupported,
    /// Memory and file-offset alignment in bytes.
    Aligned { mem: u32, offset: u32 },
}

/// Asks `statx(STATX_DIOALIGN)` for the direct-I/O alignment of `fd`.
pub fn dio_align(fd: &impl AsRawFd) -> DioAlign {
    let mut buf = Statx::default();
    let empty = c"";
    // SAFETY: `buf` is a writable statx structure of the kernel's size, the
    // path is a valid NUL-terminated string, and AT_EMPTY_PATH makes the call
    // describe `fd` itself.
    let r = unsafe {
        libc::syscall(
            libc::SYS_statx,
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut buf as *mut Statx,
        )
    };
    if r != 0 || buf.mask & STATX_DIOALIGN == 0 {
        return DioAlign::Unknown;
    }
    match (buf.dio_mem_align, buf.dio_offset_align) {
        (0, _) | (_, 0) => DioAlign::Unsupported,
        (mem, offset) => DioAlign::Aligned { mem, offset },
    }
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)?, to_off(len)?);
    // SAFETY: fallocate takes plain integers; an invalid fd is an error, not UB.
    retry_eintr(|| unsafe { libc::fallocate(fd, mode, off, len) }).map(drop)
}

/// Frees the disk blocks of `offset..offset + len` without changing the size.
pub fn punch_hole(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
}

/// `ftruncate(fd, len)`.
pub fn truncate(fd: RawFd, len: u64) -> io::Result<()> {
    let len = to_off(len)?;
    // SAFETY: plain integers.
    retry_eintr(|| unsafe { libc::ftruncate(fd, len) }).map(drop)
}

/// Bytes of disk actually allocated to `fd` (`st_blocks` × 512).
pub fn allocated_bytes(fd: RawFd) -> io::Result<u64> {
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable and of the right type.
    retry_eintr(|| unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st.st_blocks as u64 * 512)
}

/// Drops the page-cache pages of `fd` (after an fsync, so they are clean).
pub fn evict_page_cache(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain integers.
    retry_eintr(|| unsafe { libc::fsync(fd) })?;
    // SAFETY: plain integers; posix_fadvise returns the error number.
    let r = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Clears O_DIRECT on an open file (when the filesystem says it cannot do it).
pub fn clear_o_direct(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument.
    let flags = retry_eintr(|| unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: F_SETFL takes an int of flags.
    retry_eintr(|| unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) }).map(drop)
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// Whether io_uring is switched off by the administrator, and how
/// (`/proc/sys/kernel/io_uring_disabled`: 1 = only for a privileged group, 2 = for all).
pub fn io_uring_disabled() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?.trim().parse().ok()
}

/// A page-aligned, zeroed anonymous mapping: staging buffers for direct I/O,
/// and host buffers for benchmarks and tests.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    map_len: usize,
}

// SAFETY: the buffer exclusively owns its mapping; sharing follows Rust's
// borrow rules through the safe accessors.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` only hands out shared slices.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Maps `len` zeroed bytes (rounded up to whole pages in memory).
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Ok(AlignedBuf { ptr: NonNull::dangling(), len: 0, map_len: 0 });
        }
        let page = page_size();
        let map_len = len.div_ceil(page).checked_mul(page).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(AlignedBuf { ptr, len, map_len })
    }

    /// Like [`new`](Self::new), asking the kernel to back the buffer with
    /// transparent huge pages. Direct I/O into few large pages builds
    /// requests of few segments, which virtio disks serve much faster than
    /// requests of many 4 KiB pages. A hint: the kernel may decline.
    pub fn new_huge(len: usize) -> io::Result<Self> {
        let buf = AlignedBuf::new(len)?;
        if buf.map_len > 0 {
            // SAFETY: advises the kernel about our own mapping; it changes
            // no contents and fails harmlessly where THP is off.
            unsafe { libc::madvise(buf.ptr.as_ptr().cast(), buf.map_len, libc::MADV_HUGEPAGE) };
        }
        Ok(buf)
    }

    /// Splits into consecutive pieces of `piece` bytes (the last may be
    /// shorter); the mapping stays alive while any piece does.
    pub(crate) fn split(self, piece: usize) -> Vec<BufPiece> {
        assert!(piece > 0);
        let whole = std::sync::Arc::new(self);
        (0..whole.len)
            .step_by(piece)
            .map(|at| BufPiece { whole: whole.clone(), at, len: piece.min(whole.len - at) })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes mapped (`len` rounded up to whole pages).
    pub fn map_len(&self) -> usize {
        self.map_len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The address, for staging buffers whose bytes are reached by I/O that
    /// the owner sequences itself.
    pub(crate) fn raw(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// A piece of a shared [`AlignedBuf`] (a staging buffer).
pub(crate) struct BufPiece {
    whole: std::sync::Arc<AlignedBuf>,
    at: usize,
    len: usize,
}

impl BufPiece {
    pub(crate) fn raw(&self) -> *mut u8 {
        self.whole.raw().wrapping_add(self.at)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.map_len > 0 {
            // SAFETY: unmaps exactly the mapping made in `new`, which no
            // borrow outlives.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_page_aligned_and_zeroed() {
        let mut b = AlignedBuf::new(10_000).unwrap();
        assert_eq!(b.as_ptr() as usize % page_size(), 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[9_999] = 7;
        assert_eq!(b.as_slice()[9_999], 7);
        assert!(AlignedBuf::new(0).unwrap().is_empty());
    }

    #[test]
    fn statx_answers_for_a_real_file() {
        let dir = crate::test_dir();
        let f = std::fs::File::create(dir.path().join("x")).unwrap();
        match dio_align(&f) {
            DioAlign::Aligned { mem, offset } => {
                assert!(mem.is_power_of_two() && offset.is_power_of_two(), "{mem} {offset}");
            }
            other => eprintln!("statx DIOALIGN not reported here: {other:?}"),
        }
    }
}
