//! The io_uring backend: a pool of rings, one checked out per request, each
//! with the arena file registered as a fixed file and a sparse buffer table
//! holding its own staging buffers and the caller memory registered through
//! [`tier_api::BlockIo::register_buffers`] (see [`super::fixed`]); requests
//! use ReadFixed/WriteFixed for memory in either.

use super::fixed::{lookup, update_buffers, Fixed, Registry, FIRST_CALLER_INDEX, TABLE_LEN};
use super::{staging_buffers, Backend, Completion, Params, Pool, PoolGuard, Session, Staging, Submission};
use crate::config::human;
use crate::sys::BufPiece;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tier_api::{FixedBuffers, HostSpan, IoOp};

/// Bounded retries of `io_uring_enter` interrupted by a signal or refused
/// for lack of resources, before the error goes to the driver.
const MAX_ENTER_RETRIES: u32 = 1000;

struct Ring {
    // Field order matters: the ring is dropped (closed, which unregisters
    // the buffers) before the staging buffers it points into. `Drop` takes
    // it off the registry's list before either.
    ring: IoUring,
    staging: Vec<BufPiece>,
    _staging_held: tier_api::Reservation,
    fixed_buffers: bool,
    fixed_file: bool,
    /// The registry listing this ring for caller buffers, and its id there;
    /// `None` where the kernel has no sparse buffer tables.
    listed: Option<(Arc<Registry>, u64)>,
}

impl Ring {
    fn new(p: &Params, registry: &Arc<Registry>) -> io::Result<Ring> {
        let entries = u32::try_from(p.depth).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let ring = IoUring::builder().build(entries)?;
        let (staging, _staging_held) = staging_buffers(p.staging, p.chunk, &p.host)?;
        let iovecs: Vec<libc::iovec> =
            staging.iter().map(|b| libc::iovec { iov_base: b.raw().cast(), iov_len: b.len() }).collect();
        let fd = ring.as_raw_fd();
        // A sparse table with room for caller buffers after the staging
        // buffers (config keeps staging buffers within FIRST_CALLER_INDEX).
        // Kernels before 5.19 have none: then the staging buffers alone.
        let sparse =
            iovecs.len() <= FIRST_CALLER_INDEX && ring.submitter().register_buffers_sparse(TABLE_LEN as u32).is_ok();
        // SAFETY (both branches): the buffers are owned by the Ring next to
        // the ring and are dropped after it (field order), so they outlive
        // the registration. Each is at most 64 MiB, below the 1 GiB limit of
        // one fixed buffer. Registration can fail (RLIMIT_MEMLOCK); then
        // plain reads and writes are used for staging too.
        let fixed_buffers = if sparse {
            matches!(unsafe { update_buffers(fd, 0, &iovecs) }, Ok(n) if n == iovecs.len())
        } else {
            unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok()
        };
        let fixed_file = ring.submitter().register_files(&[p.file.as_raw_fd()]).is_ok();
        // SAFETY: the table has TABLE_LEN entries (registered above), and
        // the ring leaves the list in `Drop`, before it closes.
        let listed = sparse.then(|| (Arc::clone(registry), unsafe { registry.attach(fd) }));
        Ok(Ring { ring, staging, _staging_held, fixed_buffers, fixed_file, listed })
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if let Some((registry, id)) = &self.listed {
            registry.detach(*id);
        }
    }
}

pub(crate) struct UringBackend {
    params: Params,
    fd: RawFd,
    pool: Pool<Ring>,
    /// Whether every ring so far registered its staging buffers.
    fixed_buffers: AtomicBool,
    registry: Arc<Registry>,
    /// Whether rings have room for caller buffers (sparse buffer tables).
    caller_buffers: bool,
}

impl UringBackend {
    /// Sets up the first ring and checks that the kernel has the operations
    /// used; an error says why io_uring cannot be used.
    pub(crate) fn new(p: &Params) -> io::Result<Self> {
        let registry = Registry::new();
        let first = Ring::new(p, &registry)?;
        let mut probe = Probe::new();
        first.ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::ReadFixed::CODE, "READ_FIXED"),
            (opcode::WriteFixed::CODE, "WRITE_FIXED"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::other(format!("the kernel's io_uring lacks IORING_OP_{name}")));
            }
        }
        let fixed = first.fixed_buffers;
        let caller_buffers = first.listed.is_some();
        Ok(UringBackend {
            params: p.clone(),
            fd: p.file.as_raw_fd(),
            pool: Pool::new(p.sessions, Some(first)),
            fixed_buffers: AtomicBool::new(fixed),
            registry,
            caller_buffers,
        })
    }
}

impl Backend for UringBackend {
    fn describe(&self) -> String {
        format!(
            "io_uring ({}, depth {}, {} chunks, {})",
            if self.params.direct { "O_DIRECT" } else { "buffered" },
            self.params.depth,
            human(self.params.chunk),
            if self.fixed_buffers.load(Ordering::Relaxed) {
                "fixed buffers"
            } else {
                "fixed buffers refused: staging through plain reads and writes"
            }
        )
    }

    fn session(&self) -> io::Result<Box<dyn Session + '_>> {
        let ring = self.pool.get(|| {
            let r = Ring::new(&self.params, &self.registry)?;
            if !r.fixed_buffers {
                self.fixed_buffers.store(false, Ordering::Relaxed);
            }
            Ok(r)
        })?;
        let caller = match &ring.get().listed {
            Some((registry, id)) => registry.snapshot(*id),
            None => Arc::from(Vec::new()),
        };
        Ok(Box::new(UringSession { ring, fd: self.fd, depth: self.params.depth, caller }))
    }

    unsafe fn register_buffers(
        &self,
        tier: &str,
        spans: &[HostSpan],
    ) -> tier_api::Result<Option<Box<dyn FixedBuffers>>> {
        if !self.caller_buffers {
            return Ok(None);
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.registry.register(tier, spans) }.map(Some)
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        self.registry.close();
    }
}

struct UringSession<'a> {
    ring: PoolGuard<'a, Ring>,
    fd: RawFd,
    depth: usize,
    /// The caller buffers the ring held at checkout.
    caller: Arc<[Fixed]>,
}

impl UringSession<'_> {
    fn entry(&self, sub: &Submission) -> squeue::Entry {
        let r = self.ring.get();
        // Staging buffers carry an index only where registered; caller
        // memory only where the ring holds it.
        let fixed = sub.fixed;
        // The arena file is fixed file 0 of the ring where registration worked.
        macro_rules! build {
            ($fd:expr) => {
                match (sub.op, fixed) {
                    (IoOp::Read, Some(i)) => {
                        opcode::ReadFixed::new($fd, sub.buf, sub.len, i).offset(sub.offset).build()
                    }
                    (IoOp::Read, None) => opcode::Read::new($fd, sub.buf, sub.len).offset(sub.offset).build(),
                    (IoOp::Write, Some(i)) => {
                        opcode::WriteFixed::new($fd, sub.buf.cast_const(), sub.len, i).offset(sub.offset).build()
                    }
                    (IoOp::Write, None) => {
                        opcode::Write::new($fd, sub.buf.cast_const(), sub.len).offset(sub.offset).build()
                    }
                }
            };
        }
        let e = if r.fixed_file { build!(types::Fixed(0)) } else { build!(types::Fd(self.fd)) };
        e.user_data(sub.tag)
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY))
}

impl Session for UringSession<'_> {
    fn depth(&self) -> usize {
        self.depth
    }

    fn staging_count(&self) -> usize {
        self.ring.get().staging.len()
    }

    fn staging(&self, index: usize) -> Staging {
        let r = self.ring.get();
        let b = &r.staging[index];
        // Fewer than MAX_STAGING_BUFFERS (64) buffers, so the index fits.
        let fixed = if r.fixed_buffers { u16::try_from(index).ok() } else { None };
        Staging { ptr: b.raw(), len: b.len(), fixed }
    }

    fn fixed(&self, ptr: *const u8, len: usize) -> Option<u16> {
        lookup(&self.caller, ptr, len)
    }

    fn push(&mut self, sub: Submission) -> io::Result<()> {
        let entry = self.entry(&sub);
        let ring = &mut self.ring.get_mut().ring;
        for _ in 0..2 {
            // SAFETY: the entry's buffer stays valid and untouched until its
            // completion is reaped (the Session contract the driver keeps);
            // for fixed buffers it lies inside registered buffer `fixed`
            // (a staging buffer, or caller memory this ring holds, which
            // stays registered while the caller may use it).
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // The submission queue is full of queued entries: hand them to
            // the kernel and try once more.
            ring.submit()?;
        }
        Err(io::Error::other("the io_uring submission queue stayed full"))
    }

    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        let ring = &mut self.ring.get_mut().ring;
        let mut attempts = 0;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if retryable(&e) && attempts < MAX_ENTER_RETRIES => {
                    attempts += 1;
                    if !ring.completion().is_empty() {
                        break;
                    }
                    if e.raw_os_error() != Some(libc::EINTR) {
                        std::thread::sleep(std::time::Duration::from_micros(100));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        out.extend(ring.completion().map(|c| Completion { tag: c.user_data(), res: c.result() }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Driver, Geometry, Stripes};
    use crate::sys::AlignedBuf;
    use std::ptr::NonNull;

    #[test]
    fn rings_made_after_registration_hold_it_too() {
        let dir = crate::test_dir();
        let file = tempfile::tempfile_in(dir.path()).unwrap();
        let chunk = 16 << 10;
        let host = tier_api::MemAccount::new("host", None);
        let p = Params { file: Arc::new(file), depth: 4, staging: 2, chunk, sessions: 3, direct: false, host };
        let b = UringBackend::new(&p).unwrap();
        let mut mem = AlignedBuf::new(256 << 10).unwrap();
        // SAFETY: `mem` is valid for its length while it lives, and outlives `reg`.
        let span = unsafe { HostSpan::new(NonNull::new(mem.as_mut_ptr()).unwrap(), mem.len()) };
        // A ring busy with a request when the registration comes.
        let busy = b.session().unwrap();
        // SAFETY: as above.
        let reg = unsafe { b.register_buffers("disk:9", &[span]) }.unwrap().unwrap();
        assert!(reg.describe().contains("held by 1 of 1 io_uring rings"), "{}", reg.describe());
        assert_eq!(busy.fixed(mem.as_ptr(), 4096), None, "a request keeps what its ring held at checkout");
        drop(busy);
        // Two more rings: the pool grows past the one there was.
        let s1 = b.session().unwrap();
        let s2 = b.session().unwrap();
        let mut s3 = b.session().unwrap();
        assert!(reg.describe().contains("held by 3 of 3 io_uring rings"), "{}", reg.describe());
        for s in [&s1, &s2] {
            assert!(s.fixed(mem.as_ptr(), 4096).is_some());
        }
        assert_eq!(reg.ops(), 2);
        // Real I/O on the newest ring, in place through the fixed buffer.
        let (src, dst) = mem.as_mut_slice().split_at_mut(128 << 10);
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        let geo = Geometry { io_align: 1, mem_align: 1, chunk };
        let mut driver = Driver::new(&mut *s3, "disk:9", geo);
        driver.write(0, src, &Stripes::new()).unwrap();
        driver.read(0, dst).unwrap();
        assert!(src == dst);
        assert_eq!(reg.ops(), 2 + 16, "8 chunks each way");
        drop((s1, s2, s3));
        // Unregistered: new requests no longer see it.
        drop(reg);
        let s = b.session().unwrap();
        assert_eq!(s.fixed(mem.as_ptr(), 4096), None);
        drop(s);
        // A registration outliving its backend says so, and drops cleanly.
        // SAFETY: as above.
        let late = unsafe { b.register_buffers("disk:9", &[span]) }.unwrap().unwrap();
        assert!(late.active());
        drop(b);
        assert!(!late.active());
        assert!(late.describe().contains("held by 0 of 0 io_uring rings"), "{}", late.describe());
        drop(late);
    }
}
