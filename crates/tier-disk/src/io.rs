//! The driver loop shared by every backend, and the planning that turns a
//! read or write of any offset, length and buffer into aligned chunks.
//!
//! A request becomes a sequence of [`Chunk`]s: aligned file ranges of at
//! most `chunk` bytes, each moved either straight into or out of the
//! caller's buffer (when the buffer address lines up) or through a staging
//! buffer. The driver keeps up to the session's depth of chunks in flight,
//! retries short transfers and interrupted operations a bounded number of
//! times, and on the first error stops submitting and waits for every chunk
//! still in flight before returning, so that no memory is released while
//! the kernel may still write it and nothing half-done is reported as done.
//! Writes that cover part of an aligned block read the block, merge and
//! write it back under a lock striped by block.

use crate::activity::IoActivity;
use crate::backend::{Completion, Session, Submission};
use parking_lot::{Mutex, MutexGuard};
use std::io;
use tier_api::{Error, IoOp, Result};

/// Resubmissions of one chunk after short transfers.
pub const MAX_SHORT_RETRIES: u32 = 16;
/// Resubmissions of one chunk after EINTR or EAGAIN.
pub const MAX_AGAIN_RETRIES: u32 = 64;
/// Failed waits for completions tolerated while chunks are in flight.
const MAX_WAIT_FAILURES: u32 = 100;
/// Locks serialising read-modify-write of partial blocks.
const STRIPES: usize = 64;

/// The shape of I/O on one arena file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// File offsets and lengths of direct I/O are multiples of this (1 when buffered).
    pub io_align: u64,
    /// Memory addresses of direct I/O are multiples of this (1 when buffered).
    pub mem_align: usize,
    /// Largest bytes per operation (the staging buffer size).
    pub chunk: usize,
}

/// Where a chunk's bytes live in memory.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mem {
    /// The caller's memory, aligned for direct I/O.
    Direct(*mut u8),
    /// A staging buffer taken for the chunk; the caller's memory holds bytes
    /// `skip..skip + len` of it (copied in before a write, out after a read).
    Bounce { user: *mut u8, skip: usize, len: usize },
    /// A staging buffer the request manages itself (read-modify-write).
    Staging(usize),
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub offset: u64,
    pub len: usize,
    pub mem: Mem,
}

/// A chunk in flight.
struct Flight {
    chunk: Chunk,
    buf: *mut u8,
    fixed: Option<u16>,
    /// The staging buffer taken for a `Mem::Bounce` chunk.
    bounce: Option<usize>,
    /// Bytes of the chunk transferred.
    done: usize,
    /// The most bytes ever transferred (for error reports).
    progress: usize,
    short: u32,
    again: u32,
}

enum Outcome {
    Resubmitted,
    /// The chunk's bytes all moved.
    Done(usize),
    Failed(Error),
}

/// Striped locks for read-modify-write of partial blocks.
pub(crate) struct Stripes(Box<[Mutex<()>]>);

impl Stripes {
    pub(crate) fn new() -> Self {
        Stripes((0..STRIPES).map(|_| Mutex::new(())).collect())
    }

    fn lock(&self, block: u64) -> MutexGuard<'_, ()> {
        self.0[(block % STRIPES as u64) as usize].lock()
    }
}

/// Why an errno matters, for users reading the error.
#[derive(Debug)]
pub struct IoFailure {
    /// The errno the kernel returned.
    pub errno: i32,
    pub hint: &'static str,
}

impl std::fmt::Display for IoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.errno))?;
        if !self.hint.is_empty() {
            write!(f, "; {}", self.hint)?;
        }
        Ok(())
    }
}

impl std::error::Error for IoFailure {}

fn hint(errno: i32) -> &'static str {
    match errno {
        libc::EIO => "the disk reported an I/O error: check `dmesg` and the drive's health, or point --offload-dir at another disk",
        libc::EINVAL => "the kernel refused the request (often a direct-I/O alignment the filesystem does not accept): try --disk-backend threads or another filesystem, and report it",
        libc::EFBIG => "the arena outgrew the filesystem's largest file: place less on disk or use another filesystem",
        libc::EROFS => "the filesystem became read-only (often after disk errors): check `dmesg`",
        libc::EDQUOT => "the disk quota is exhausted: free space or raise the quota",
        libc::ENOMEM => "the kernel is out of memory for I/O: lower --disk-queue-depth or the batch size",
        _ => "",
    }
}

/// The error for an errno from an operation on `tier`.
pub(crate) fn errno_error(tier: &str, op: IoOp, offset: u64, len: u64, errno: i32) -> Error {
    if errno == libc::ENOSPC || errno == libc::EDQUOT {
        return Error::DiskFull { tier: tier.to_string(), offset, len };
    }
    let kind = io::Error::from_raw_os_error(errno).kind();
    Error::Io {
        op,
        tier: tier.to_string(),
        offset,
        len,
        source: io::Error::new(kind, IoFailure { errno, hint: hint(errno) }),
    }
}

/// The error for an `io::Error` (a failed setup or submission call).
pub(crate) fn io_error(tier: &str, op: IoOp, offset: u64, len: u64, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(errno) => errno_error(tier, op, offset, len, errno),
        None => Error::Io { op, tier: tier.to_string(), offset, len, source: e },
    }
}

const fn down(x: u64, a: u64) -> u64 {
    x - x % a
}

const fn up(x: u64, a: u64) -> u64 {
    down(x + a - 1, a)
}

/// Runs requests on one checked-out session.
pub(crate) struct Driver<'a> {
    sess: &'a mut dyn Session,
    tier: &'a str,
    geo: Geometry,
    free_staging: Vec<usize>,
    slots: Vec<Option<Flight>>,
    free_slots: Vec<usize>,
    completions: Vec<Completion>,
    /// Where operations are counted from submission to completion.
    activity: Option<&'a IoActivity>,
}

impl<'a> Driver<'a> {
    pub(crate) fn new(sess: &'a mut dyn Session, tier: &'a str, geo: Geometry) -> Self {
        let depth = sess.depth();
        assert!(depth >= 1, "a session keeps at least one operation in flight");
        assert!(sess.staging_count() >= 2, "a session has a staging buffer for edges and one for bodies");
        assert!(geo.io_align.is_power_of_two() && geo.mem_align.is_power_of_two());
        assert!((geo.chunk as u64).is_multiple_of(geo.io_align) && geo.chunk <= u32::MAX as usize);
        for i in 0..sess.staging_count() {
            let s = sess.staging(i);
            assert!(
                s.len >= geo.chunk && (s.ptr as usize).is_multiple_of(geo.mem_align),
                "staging buffers fit a chunk"
            );
        }
        Driver {
            free_staging: (0..sess.staging_count()).rev().collect(),
            slots: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            completions: Vec::with_capacity(depth),
            sess,
            tier,
            geo,
            activity: None,
        }
    }

    /// Counts this driver's operations in `activity` too.
    pub(crate) fn counted(mut self, activity: &'a IoActivity) -> Self {
        self.activity = Some(activity);
        self
    }

    /// Reads `dst.len()` bytes at file offset `off`.
    pub(crate) fn read(&mut self, off: u64, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let (a, m, chunk) = (self.geo.io_align, self.geo.mem_align, self.geo.chunk);
        let end = off + dst.len() as u64;
        let (lo, hi, ds, de) = (down(off, a), up(end, a), up(off, a), down(end, a));
        let base = dst.as_mut_ptr();
        // The aligned middle goes straight into the caller's buffer when the
        // address of its first byte is aligned too; the rest is staged.
        let direct = ds < de && (base as usize).wrapping_add((ds - off) as usize).is_multiple_of(m);
        let segments = if direct { [(lo, ds, false), (ds, de, true), (de, hi, false)] } else { [(lo, hi, false); 3] };
        let count = if direct { 3 } else { 1 };
        let mut chunks = segments[..count].iter().copied().filter(|s| s.0 < s.1).flat_map(move |(from, to, d)| {
            (from..to).step_by(chunk).map(move |co| {
                let cl = (to - co).min(chunk as u64) as usize;
                let mem = if d {
                    Mem::Direct(base.wrapping_add((co - off) as usize))
                } else {
                    let (s, e) = (co.max(off), (co + cl as u64).min(end));
                    Mem::Bounce {
                        user: base.wrapping_add((s - off) as usize),
                        skip: (s - co) as usize,
                        len: (e - s) as usize,
                    }
                };
                Chunk { offset: co, len: cl, mem }
            })
        });
        self.run(IoOp::Read, &mut chunks)
    }

    /// Writes all of `src` at file offset `off`.
    pub(crate) fn write(&mut self, off: u64, src: &[u8], stripes: &Stripes) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let (a, m, chunk) = (self.geo.io_align, self.geo.mem_align, self.geo.chunk);
        let end = off + src.len() as u64;
        let (lo, ds, de) = (down(off, a), up(off, a), down(end, a));
        // Blocks the request covers only in part: read, merge, write back.
        let head_partial = off != lo || end < lo + a;
        // The tail block needs its own pass unless it is the head block.
        let tail_partial = !(end.is_multiple_of(a) || (head_partial && de == lo));
        if head_partial {
            self.read_modify_write(lo, off, src, stripes)?;
        }
        if tail_partial {
            self.read_modify_write(de, off, src, stripes)?;
        }
        if ds >= de {
            return Ok(());
        }
        // The whole blocks in between. Writes only read through the pointer.
        let base = src.as_ptr().cast_mut();
        let direct = (base as usize).wrapping_add((ds - off) as usize).is_multiple_of(m);
        let mut chunks = (ds..de).step_by(chunk).map(move |co| {
            let cl = (de - co).min(chunk as u64) as usize;
            let user = base.wrapping_add((co - off) as usize);
            let mem = if direct { Mem::Direct(user) } else { Mem::Bounce { user, skip: 0, len: cl } };
            Chunk { offset: co, len: cl, mem }
        });
        self.run(IoOp::Write, &mut chunks)
    }

    /// Writes the part of `src` (which starts at file offset `off`) that
    /// falls in the aligned block at `block`, keeping the block's other bytes.
    fn read_modify_write(&mut self, block: u64, off: u64, src: &[u8], stripes: &Stripes) -> Result<()> {
        let a = self.geo.io_align;
        let Some(idx) = self.free_staging.pop() else {
            unreachable!("an idle driver holds all its staging buffers");
        };
        let result = (|| {
            let _guard = stripes.lock(block / a);
            let c = Chunk { offset: block, len: a as usize, mem: Mem::Staging(idx) };
            self.run(IoOp::Read, &mut std::iter::once(c))?;
            let from = block.max(off);
            let to = (block + a).min(off + src.len() as u64);
            let part = &src[(from - off) as usize..(to - off) as usize];
            let s = self.sess.staging(idx);
            assert!((to - block) as usize <= s.len);
            // SAFETY: the staging buffer holds at least one block (checked in
            // `new`), no operation uses it now, and `part` is caller memory
            // that cannot overlap a staging buffer.
            unsafe { std::ptr::copy_nonoverlapping(part.as_ptr(), s.ptr.add((from - block) as usize), part.len()) };
            self.run(IoOp::Write, &mut std::iter::once(c))
        })();
        self.free_staging.push(idx);
        result
    }

    /// Moves `chunks`, keeping up to `depth` in flight. On error, stops
    /// submitting and waits for the rest before returning the first error.
    fn run(&mut self, op: IoOp, chunks: &mut dyn Iterator<Item = Chunk>) -> Result<()> {
        let mut error: Option<Error> = None;
        let mut in_flight = 0usize;
        let mut waiting: Option<Chunk> = None;
        loop {
            while error.is_none() && !self.free_slots.is_empty() {
                let Some(chunk) = waiting.take().or_else(|| chunks.next()) else { break };
                assert!(chunk.len > 0 && chunk.len <= self.geo.chunk, "chunks are non-empty and at most a chunk");
                let (buf, fixed, bounce) = match chunk.mem {
                    // The caller's memory: in place, through a registered
                    // buffer where it lies in one.
                    Mem::Direct(p) => (p, self.sess.fixed(p, chunk.len), None),
                    Mem::Staging(i) => {
                        let s = self.sess.staging(i);
                        (s.ptr, s.fixed, None)
                    }
                    Mem::Bounce { .. } => match self.free_staging.pop() {
                        Some(i) => {
                            let s = self.sess.staging(i);
                            (s.ptr, s.fixed, Some(i))
                        }
                        None => {
                            waiting = Some(chunk);
                            break;
                        }
                    },
                };
                if let (IoOp::Write, Mem::Bounce { user, skip, len }) = (op, chunk.mem) {
                    assert!(skip + len <= chunk.len);
                    // SAFETY: `user` is `len` readable bytes of the caller's
                    // buffer (planning keeps it in range); `buf` is a staging
                    // buffer of at least `chunk.len` bytes that no operation
                    // uses (it was just taken from the free list).
                    unsafe { std::ptr::copy_nonoverlapping(user.cast_const(), buf.add(skip), len) };
                }
                let Some(slot) = self.free_slots.pop() else { unreachable!("checked non-empty above") };
                self.slots[slot] = Some(Flight { chunk, buf, fixed, bounce, done: 0, progress: 0, short: 0, again: 0 });
                match self.submit(op, slot) {
                    Ok(()) => {
                        in_flight += 1;
                        if let Some(a) = self.activity {
                            a.begin();
                        }
                    }
                    Err(e) => {
                        self.finish(slot);
                        error = Some(e);
                    }
                }
            }
            if in_flight == 0 {
                assert!(waiting.is_none() || error.is_some(), "a chunk waits for staging only while others fly");
                break;
            }
            self.completions.clear();
            let mut failures = 0;
            while let Err(e) = self.sess.wait(&mut self.completions) {
                failures += 1;
                if failures >= MAX_WAIT_FAILURES {
                    // Returning would hand memory back to the caller while
                    // the kernel may still write into it.
                    eprintln!(
                        "tier-disk: cannot reap {in_flight} in-flight operations on {} ({e}); aborting to avoid memory corruption",
                        self.tier
                    );
                    std::process::abort();
                }
                error.get_or_insert_with(|| io_error(self.tier, op, 0, 0, e));
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            for i in 0..self.completions.len() {
                let c = self.completions[i];
                match self.complete(op, c, error.is_some()) {
                    Outcome::Resubmitted => {}
                    Outcome::Done(len) => {
                        in_flight -= 1;
                        if let Some(a) = self.activity {
                            a.end(op, len as u64);
                        }
                    }
                    Outcome::Failed(e) => {
                        in_flight -= 1;
                        if let Some(a) = self.activity {
                            a.end(op, 0);
                        }
                        error.get_or_insert(e);
                    }
                }
            }
        }
        debug_assert_eq!(self.free_slots.len(), self.slots.len(), "every slot is back");
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn submit(&mut self, op: IoOp, slot: usize) -> Result<()> {
        let Some(f) = self.slots[slot].as_ref() else { unreachable!("submitting an empty slot") };
        let len = f.chunk.len - f.done;
        let offset = f.chunk.offset + f.done as u64;
        let sub = Submission {
            tag: slot as u64,
            op,
            offset,
            buf: f.buf.wrapping_add(f.done),
            // Chunks are at most `geo.chunk`, checked to fit in u32.
            len: len as u32,
            fixed: f.fixed,
        };
        self.sess.push(sub).map_err(|e| io_error(self.tier, op, offset, len as u64, e))
    }

    /// Releases a slot and the staging buffer it took.
    fn finish(&mut self, slot: usize) {
        if let Some(f) = self.slots[slot].take() {
            if let Some(i) = f.bounce {
                self.free_staging.push(i);
            }
            self.free_slots.push(slot);
        }
    }

    fn complete(&mut self, op: IoOp, c: Completion, stopping: bool) -> Outcome {
        let slot = c.tag as usize;
        let tier = self.tier;
        let geo = self.geo;
        let Some(f) = self.slots.get_mut(slot).and_then(|s| s.as_mut()) else {
            panic!("{tier}: completion for unknown operation {}", c.tag);
        };
        let offset = f.chunk.offset + f.done as u64;
        let remaining = f.chunk.len - f.done;
        if c.res < 0 {
            let errno = -c.res;
            if matches!(errno, libc::EINTR | libc::EAGAIN) && !stopping && f.again < MAX_AGAIN_RETRIES {
                f.again += 1;
                return self.resubmit(op, slot);
            }
            let e = errno_error(tier, op, offset, remaining as u64, errno);
            self.finish(slot);
            return Outcome::Failed(e);
        }
        let n = c.res as usize;
        if n > remaining {
            let e = Error::Io {
                op,
                tier: tier.to_string(),
                offset,
                len: remaining as u64,
                source: io::Error::other(format!("the backend reported {n} bytes moved of {remaining} asked")),
            };
            self.finish(slot);
            return Outcome::Failed(e);
        }
        f.done += n;
        f.progress = f.progress.max(f.done);
        if f.done == f.chunk.len {
            if let (IoOp::Read, Mem::Bounce { user, skip, len }) = (op, f.chunk.mem) {
                // SAFETY: the read into the staging buffer has completed, so
                // no operation uses it; `user` is `len` writable bytes of the
                // caller's buffer, which nothing else writes during the request.
                unsafe { std::ptr::copy_nonoverlapping(f.buf.add(skip).cast_const(), user, len) };
            }
            let len = f.chunk.len;
            self.finish(slot);
            return Outcome::Done(len);
        }
        // A short transfer (a read of 0 bytes before the end is one too).
        f.short += 1;
        if stopping || f.short > MAX_SHORT_RETRIES {
            let e = Error::ShortTransfer {
                op,
                tier: tier.to_string(),
                offset: f.chunk.offset,
                len: f.chunk.len as u64,
                done: f.progress as u64,
                attempts: f.short,
            };
            self.finish(slot);
            return Outcome::Failed(e);
        }
        let next = f.chunk.offset + f.done as u64;
        if !next.is_multiple_of(geo.io_align) || (f.buf as usize).wrapping_add(f.done) % geo.mem_align != 0 {
            // The remainder would be misaligned for direct I/O: redo the chunk.
            f.done = 0;
        }
        self.resubmit(op, slot)
    }

    fn resubmit(&mut self, op: IoOp, slot: usize) -> Outcome {
        match self.submit(op, slot) {
            Ok(()) => Outcome::Resubmitted,
            Err(e) => {
                self.finish(slot);
                Outcome::Failed(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!((down(4097, 4096), up(4097, 4096), up(4096, 4096), down(5, 1), up(5, 1)), (4096, 8192, 4096, 5, 5));
    }

    #[test]
    fn errnos_become_typed_errors() {
        assert!(matches!(
            errno_error("disk:0", IoOp::Write, 8, 9, libc::ENOSPC),
            Error::DiskFull { offset: 8, len: 9, .. }
        ));
        let e = errno_error("disk:3", IoOp::Read, 4096, 512, libc::EIO);
        let msg = e.to_string();
        assert!(msg.contains("read of 512 bytes at offset 4096 on disk:3"), "{msg}");
        assert!(msg.contains("dmesg"), "{msg}");
        let Error::Io { source, .. } = e else { panic!("an I/O error") };
        let failure = source.get_ref().and_then(|s| s.downcast_ref::<IoFailure>()).expect("carries the errno");
        assert_eq!(failure.errno, libc::EIO);
    }
}
