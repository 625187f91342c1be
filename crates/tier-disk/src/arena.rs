//! The arena: one unlinked file per disk device, its extents, and positioned
//! I/O on it through the chosen backend.

use crate::alloc::FreeList;
use crate::backend::threads::ThreadBackend;
use crate::backend::uring::UringBackend;
use crate::backend::{Backend, Params};
use crate::config::{BackendChoice, DiskConfig};
use crate::fault::{FaultBackend, FaultPlan};
use crate::io::{io_error, Driver, Geometry, Stripes};
use crate::sys::{self, AlignedBuf, DioAlign};
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tier_api::{BlockIo, Error, FixedBuffers, HostSpan, IoOp, Result};

/// Names tried for the arena file before giving up.
const MAX_NAME_ATTEMPTS: u32 = 16;

/// The smallest extent alignment, whatever direct I/O needs.
pub(crate) const MIN_EXTENT_ALIGN: u64 = 4096;

/// Alignment of a disk device, and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alignment {
    /// Memory alignment of direct I/O (1 when buffered).
    pub mem: usize,
    /// File offset and length alignment of direct I/O (1 when buffered).
    pub offset: u64,
    /// Alignment of extents in the arena (at least 4096).
    pub extent: u64,
    /// How it was learned, for users.
    pub source: String,
}

pub(crate) struct Arena {
    id: u32,
    tier: String,
    dir: PathBuf,
    file: Arc<File>,
    backend: Box<dyn Backend>,
    geo: Geometry,
    alignment: Alignment,
    direct: bool,
    /// "O_DIRECT" or why not.
    io_mode: String,
    free: Mutex<FreeList>,
    /// The file's length, for bounds checks without the allocator lock.
    len: AtomicU64,
    stripes: Stripes,
    /// Bytes kept out of the free list because punching them out failed.
    leaked: AtomicU64,
    /// Host memory of the backend's staging buffers.
    host: Arc<tier_api::MemAccount>,
    /// Every request's operations, in flight and done.
    activity: crate::activity::IoActivity,
}

fn dir_error(dir: &Path, reason: impl Into<String>) -> Error {
    Error::OffloadDir { path: dir.to_path_buf(), reason: reason.into() }
}

/// Checks that the offload directory exists and is a directory.
fn check_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) => Err(crate::dir::not_a_directory(dir, &m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(dir_error(
            dir,
            format!(
                "does not exist; create it (mkdir -p {}) or pass an existing directory with --offload-dir",
                dir.display()
            ),
        )),
        Err(e) => Err(dir_error(dir, format!("cannot be inspected ({e}); check its permissions"))),
    }
}

fn create_error(dir: &Path, e: &io::Error) -> Error {
    let reason = match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => {
            "is not writable (permission denied); fix its permissions or choose a directory you can write to"
                .to_string()
        }
        Some(libc::EROFS) => "is on a read-only filesystem; choose a directory on a writable disk".to_string(),
        Some(libc::ENOSPC | libc::EDQUOT) => {
            "has no space (or quota) left to create the arena file; free space or choose another disk".to_string()
        }
        _ => format!("cannot create the arena file there ({e})"),
    };
    dir_error(dir, reason)
}

/// A name no one else uses: device id, process, time, and a counter.
fn unique_name(dir: &Path, id: u32, attempt: u32) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    dir.join(format!(".tierlm-disk{id}-{}-{nanos:x}-{n}-{attempt}.arena", std::process::id()))
}

fn open_new(path: &Path, direct: bool) -> io::Result<File> {
    // create_new is O_CREAT|O_EXCL; std adds O_CLOEXEC.
    let flags = if direct { libc::O_DIRECT | libc::O_CLOEXEC } else { libc::O_CLOEXEC };
    OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).custom_flags(flags).open(path)
}

/// Creates the arena file with O_DIRECT (or buffered where the filesystem
/// refuses it) under a unique name, and unlinks it at once.
fn create_file(dir: &Path, id: u32, direct: bool) -> Result<(File, Option<String>)> {
    check_dir(dir)?;
    for attempt in 0..MAX_NAME_ATTEMPTS {
        let path = unique_name(dir, id, attempt);
        let (file, buffered_why) = match open_new(&path, direct) {
            Ok(f) if direct => (f, None),
            Ok(f) => (f, Some("buffered I/O: O_DIRECT turned off by configuration".to_string())),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // The filesystem refused O_DIRECT (tmpfs); the name may have
                // been created before the refusal. It is unique, so it is ours.
                let _ = std::fs::remove_file(&path);
                match open_new(&path, false) {
                    Ok(f) => (f, Some("buffered I/O: the filesystem refused O_DIRECT (EINVAL)".to_string())),
                    Err(e) => return Err(create_error(dir, &e)),
                }
            }
            Err(e) => return Err(create_error(dir, &e)),
        };
        if let Err(e) = std::fs::remove_file(&path) {
            return Err(dir_error(dir, format!("the arena file could not be unlinked after creation ({e})")));
        }
        return Ok((file, buffered_why));
    }
    Err(dir_error(dir, format!("no unique arena file name was free after {MAX_NAME_ATTEMPTS} attempts")))
}

impl Arena {
    pub(crate) fn create(config: &DiskConfig, faults: Option<Arc<FaultPlan>>) -> Result<Arena> {
        config.validate()?;
        let tier = tier_api::DeviceKind::Disk { id: config.id }.to_string();
        let dir = config.dir.clone();
        let (file, buffered_why) = create_file(&dir, config.id, config.direct_io)?;
        let fd = file.as_raw_fd();
        let (mut direct, mut io_mode) = match buffered_why {
            None => (true, "O_DIRECT".to_string()),
            Some(why) => (false, why),
        };
        let (mem, offset, mut source) = match sys::dio_align(&file) {
            DioAlign::Aligned { mem, offset } => (
                mem as usize,
                offset as u64,
                format!("{mem}-byte memory and {offset}-byte offset alignment from statx"),
            ),
            DioAlign::Unknown => {
                (4096, 4096, "the kernel did not report STATX_DIOALIGN; assuming 4096-byte alignment".to_string())
            }
            DioAlign::Unsupported => {
                if direct {
                    sys::clear_o_direct(fd).map_err(|e| io_error(&tier, IoOp::Write, 0, 0, e))?;
                    direct = false;
                    io_mode = "buffered I/O: statx says the filesystem cannot do direct I/O here".to_string();
                }
                (1, 1, String::new())
            }
        };
        let (mem, offset) = if direct { (mem, offset) } else { (1, 1) };
        if !direct {
            source = "no alignment needed for buffered I/O".to_string();
        }
        if !offset.is_power_of_two() || !mem.is_power_of_two() || offset > config.chunk_size as u64 {
            return Err(Error::Config(format!(
                "{tier}: direct-I/O alignment {mem}/{offset} does not fit chunks of {} bytes; raise the chunk size",
                config.chunk_size
            )));
        }
        let extent = offset.max(MIN_EXTENT_ALIGN);
        let geo = Geometry { io_align: offset, mem_align: mem, chunk: config.chunk_size };
        // fallocate must work: it is how ENOSPC shows at allocation time and
        // how freed extents give their space back.
        if let Err(e) = sys::fallocate(fd, 0, 0, extent).and_then(|()| sys::punch_hole(fd, 0, extent)) {
            return Err(match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => Error::Unsupported {
                    what: format!("fallocate in {}", dir.display()),
                    hint: "put the offload directory on ext4, xfs, btrfs or tmpfs".into(),
                },
                _ => io_error(&tier, IoOp::Write, 0, extent, e),
            });
        }
        let file = Arc::new(file);
        let params = Params {
            file: Arc::clone(&file),
            depth: config.queue_depth,
            staging: config.staging_buffers,
            chunk: config.chunk_size,
            sessions: config.max_sessions,
            direct,
            host: tier_api::MemAccount::new(format!("{tier} staging (host memory)"), None),
        };
        let stripes = Stripes::new();
        let check = |b: &dyn Backend| self_test(b, &tier, geo, extent, &stripes);
        let threads = |why: String| -> Result<Box<dyn Backend>> {
            let b = ThreadBackend::new(&params, config.thread_count(), why)
                .map_err(|e| io_error(&tier, IoOp::Read, 0, 0, e))?;
            check(&b)?;
            Ok(Box::new(b))
        };
        let uring = || -> std::result::Result<Box<dyn Backend>, String> {
            let b = setup_uring(&params).map_err(|e| match sys::io_uring_disabled() {
                Some(n @ 1..) => format!("cannot set up a ring ({e}); /proc/sys/kernel/io_uring_disabled is {n}"),
                _ => format!("cannot set up a ring ({e})"),
            })?;
            check(&b).map_err(|e| format!("self-test failed ({e})"))?;
            Ok(Box::new(b))
        };
        let backend = match config.backend {
            BackendChoice::Threads => threads("chosen by configuration".into())?,
            BackendChoice::IoUring => uring().map_err(|why| Error::Unsupported {
                what: "io_uring".into(),
                hint: format!("{why}; choose the auto or threads disk backend"),
            })?,
            BackendChoice::Auto => match uring() {
                Ok(b) => b,
                Err(why) => threads(format!("io_uring unavailable: {why}"))?,
            },
        };
        // The self-test wrote block 0; start empty.
        sys::truncate(fd, 0).map_err(|e| io_error(&tier, IoOp::Write, 0, 0, e))?;
        let backend: Box<dyn Backend> = match faults {
            Some(plan) => Box::new(FaultBackend::new(backend, plan, offset)),
            None => backend,
        };
        let host = Arc::clone(&params.host);
        Ok(Arena {
            host,
            id: config.id,
            tier,
            dir,
            file,
            backend,
            geo,
            alignment: Alignment { mem, offset, extent, source },
            direct,
            io_mode,
            free: Mutex::new(FreeList::new(extent)),
            len: AtomicU64::new(0),
            stripes,
            leaked: AtomicU64::new(0),
            activity: crate::activity::IoActivity::default(),
        })
    }

    /// Every request's operations (see [`crate::IoActivity`]).
    pub(crate) fn activity(&self) -> &crate::activity::IoActivity {
        &self.activity
    }

    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub(crate) fn tier_name(&self) -> &str {
        &self.tier
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn direct(&self) -> bool {
        self.direct
    }

    pub(crate) fn io_mode(&self) -> &str {
        &self.io_mode
    }

    pub(crate) fn alignment(&self) -> &Alignment {
        &self.alignment
    }

    pub(crate) fn file_len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// Bytes of disk the file really occupies.
    pub(crate) fn disk_usage(&self) -> Result<u64> {
        sys::allocated_bytes(self.fd()).map_err(|e| io_error(&self.tier, IoOp::Read, 0, 0, e))
    }

    /// The host memory the backend's staging buffers hold.
    pub(crate) fn host_account(&self) -> &Arc<tier_api::MemAccount> {
        &self.host
    }

    pub(crate) fn leaked(&self) -> u64 {
        self.leaked.load(Ordering::Relaxed)
    }

    /// Free extents and their bytes, for tests and diagnostics.
    pub(crate) fn free_extents(&self) -> (usize, u64) {
        let f = self.free.lock();
        (f.extents(), f.free_bytes())
    }

    /// Allocates an extent of `len` bytes (aligned, non-zero) with its disk
    /// space reserved, first fit, growing the file when nothing fits.
    pub(crate) fn allocate(&self, len: u64) -> Result<u64> {
        assert!(len > 0 && len.is_multiple_of(self.alignment.extent), "extents are aligned and non-empty");
        let mut free = self.free.lock();
        if let Some(start) = free.take_first_fit(len) {
            // The extent was punched out when freed: reserve its blocks again.
            if let Err(e) = sys::fallocate(self.fd(), 0, start, len) {
                let _ = sys::punch_hole(self.fd(), start, len);
                free.release(start, len);
                return Err(self.alloc_error(start, len, e));
            }
            return Ok(start);
        }
        let too_big = || Error::Config(format!("{}: an extent of {len} bytes overflows the arena", self.tier));
        let (start, new_end) = free.plan_growth(len).ok_or_else(too_big)?;
        let old_end = free.end();
        if let Err(e) = sys::fallocate(self.fd(), 0, start, len) {
            // Undo whatever part of the growth happened.
            let _ = sys::truncate(self.fd(), old_end);
            if start < old_end {
                let _ = sys::punch_hole(self.fd(), start, old_end - start);
            }
            return Err(self.alloc_error(start, len, e));
        }
        free.grow(start, new_end);
        self.len.store(new_end, Ordering::Relaxed);
        if cfg!(debug_assertions) {
            free.check();
        }
        Ok(start)
    }

    fn alloc_error(&self, start: u64, len: u64, e: io::Error) -> Error {
        io_error(&self.tier, IoOp::Write, start, len, e)
    }

    /// Gives an extent back: its blocks are punched out (so the disk space
    /// returns), it joins the free list, and a free tail shrinks the file.
    pub(crate) fn release(&self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        if sys::punch_hole(self.fd(), start, len).is_err() {
            // Its blocks still hold old bytes, and new tensors must read as
            // zeros: keep it out of the free list rather than reuse it dirty.
            self.leaked.fetch_add(len, Ordering::Relaxed);
            return;
        }
        let mut free = self.free.lock();
        let (merged, _) = free.release(start, len);
        if free.is_tail(merged) && sys::truncate(self.fd(), merged).is_ok() {
            free.shrink_tail();
            self.len.store(free.end(), Ordering::Relaxed);
        }
        if cfg!(debug_assertions) {
            free.check();
        }
    }

    fn check_range(&self, op: IoOp, offset: u64, len: usize) -> Result<()> {
        let file_len = self.file_len();
        match offset.checked_add(len as u64) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(Error::Io {
                op,
                tier: self.tier.clone(),
                offset,
                len: len as u64,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("beyond the end of the arena ({file_len} bytes): no extent is there"),
                ),
            }),
        }
    }

    fn session_error(&self, op: IoOp, offset: u64, len: usize, e: io::Error) -> Error {
        io_error(&self.tier, op, offset, len as u64, e)
    }
}

#[cfg(test)]
thread_local! {
    /// Makes io_uring setup fail on this thread, to test the fallback.
    pub(crate) static FAIL_URING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn setup_uring(params: &Params) -> io::Result<UringBackend> {
    #[cfg(test)]
    if FAIL_URING.with(|f| f.get()) {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    UringBackend::new(params)
}

/// Writes a pattern to block 0 and reads it back through `backend`.
fn self_test(backend: &dyn Backend, tier: &str, geo: Geometry, block: u64, stripes: &Stripes) -> Result<()> {
    let len = block as usize;
    let mut out = AlignedBuf::new(len).map_err(|e| io_error(tier, IoOp::Write, 0, block, e))?;
    for (i, b) in out.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    let mut back = AlignedBuf::new(len).map_err(|e| io_error(tier, IoOp::Read, 0, block, e))?;
    let mut session = backend.session().map_err(|e| io_error(tier, IoOp::Write, 0, block, e))?;
    let mut driver = Driver::new(&mut *session, tier, geo);
    driver.write(0, out.as_slice(), stripes)?;
    driver.read(0, back.as_mut_slice())?;
    if out.as_slice() != back.as_slice() {
        return Err(Error::Io {
            op: IoOp::Read,
            tier: tier.to_string(),
            offset: 0,
            len: block,
            source: io::Error::other("data read back differs from data written"),
        });
    }
    Ok(())
}

impl BlockIo for Arena {
    fn tier(&self) -> String {
        self.tier.clone()
    }

    fn backend(&self) -> String {
        self.backend.describe()
    }

    fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.check_range(IoOp::Read, offset, dst.len())?;
        let mut session = self.backend.session().map_err(|e| self.session_error(IoOp::Read, offset, dst.len(), e))?;
        Driver::new(&mut *session, &self.tier, self.geo).counted(&self.activity).read(offset, dst)
    }

    fn write_at(&self, offset: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.check_range(IoOp::Write, offset, src.len())?;
        let mut session = self.backend.session().map_err(|e| self.session_error(IoOp::Write, offset, src.len(), e))?;
        Driver::new(&mut *session, &self.tier, self.geo).counted(&self.activity).write(offset, src, &self.stripes)
    }

    unsafe fn register_buffers(&self, spans: &[HostSpan]) -> Result<Option<Box<dyn FixedBuffers>>> {
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.backend.register_buffers(&self.tier, spans) }
    }
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("tier", &self.tier)
            .field("dir", &self.dir)
            .field("direct", &self.direct)
            .field("len", &self.file_len())
            .finish_non_exhaustive()
    }
}
