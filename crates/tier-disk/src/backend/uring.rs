//! The io_uring backend: a pool of rings, one checked out per request, each
//! with its own staging buffers registered as fixed buffers (used with
//! ReadFixed/WriteFixed) and the arena file registered as a fixed file.

use super::{staging_buffers, Backend, Completion, Params, Pool, PoolGuard, Session, Staging, Submission};
use crate::config::human;
use crate::sys::BufPiece;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use tier_api::IoOp;

/// Bounded retries of `io_uring_enter` interrupted by a signal or refused
/// for lack of resources, before the error goes to the driver.
const MAX_ENTER_RETRIES: u32 = 1000;

struct Ring {
    // Field order matters: the ring is dropped (closed, which unregisters
    // the buffers) before the staging buffers it points into.
    ring: IoUring,
    staging: Vec<BufPiece>,
    fixed_buffers: bool,
    fixed_file: bool,
}

impl Ring {
    fn new(p: &Params) -> io::Result<Ring> {
        let entries = u32::try_from(p.depth).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let ring = IoUring::builder().build(entries)?;
        let staging = staging_buffers(p.staging, p.chunk)?;
        let iovecs: Vec<libc::iovec> =
            staging.iter().map(|b| libc::iovec { iov_base: b.raw().cast(), iov_len: b.len() }).collect();
        // SAFETY: the buffers are owned by the Ring next to the ring and are
        // dropped after it (field order), so they outlive the registration.
        // Each is at most 64 MiB, below the 1 GiB limit of one fixed buffer.
        // Registration can fail (RLIMIT_MEMLOCK); then plain reads and
        // writes are used for staging too.
        let fixed_buffers = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        let fixed_file = ring.submitter().register_files(&[p.file.as_raw_fd()]).is_ok();
        Ok(Ring { ring, staging, fixed_buffers, fixed_file })
    }
}

pub(crate) struct UringBackend {
    params: Params,
    fd: RawFd,
    pool: Pool<Ring>,
    /// Whether every ring so far registered its staging buffers.
    fixed_buffers: AtomicBool,
}

impl UringBackend {
    /// Sets up the first ring and checks that the kernel has the operations
    /// used; an error says why io_uring cannot be used.
    pub(crate) fn new(p: &Params) -> io::Result<Self> {
        let first = Ring::new(p)?;
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
        Ok(UringBackend {
            params: p.clone(),
            fd: p.file.as_raw_fd(),
            pool: Pool::new(p.sessions, Some(first)),
            fixed_buffers: AtomicBool::new(fixed),
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
            let r = Ring::new(&self.params)?;
            if !r.fixed_buffers {
                self.fixed_buffers.store(false, Ordering::Relaxed);
            }
            Ok(r)
        })?;
        Ok(Box::new(UringSession { ring, fd: self.fd, depth: self.params.depth }))
    }
}

struct UringSession<'a> {
    ring: PoolGuard<'a, Ring>,
    fd: RawFd,
    depth: usize,
}

impl UringSession<'_> {
    fn entry(&self, sub: &Submission) -> squeue::Entry {
        let r = self.ring.get();
        let fixed = if r.fixed_buffers { sub.fixed } else { None };
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
        Staging { ptr: b.raw(), len: b.len(), fixed: u16::try_from(index).ok() }
    }

    fn push(&mut self, sub: Submission) -> io::Result<()> {
        let entry = self.entry(&sub);
        let ring = &mut self.ring.get_mut().ring;
        for _ in 0..2 {
            // SAFETY: the entry's buffer stays valid and untouched until its
            // completion is reaped (the Session contract the driver keeps);
            // for fixed buffers it lies inside registered buffer `fixed`.
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
