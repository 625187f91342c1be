//! Fault injection for tests: a backend wrapper that makes chosen operations
//! go short, fail with EIO or fail with ENOSPC, and passes everything else
//! to the real backend.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tier_api::{FixedBuffers, HostSpan, IoOp};
//! use tier_disk::fault::{Fault, FaultKind, FaultPlan};
//! use tier_disk::{DiskConfig, DiskDevice};
//!
//! # fn main() -> tier_api::Result<()> {
//! // The third write operation (index 2) fails as if the disk were full.
//! let plan = Arc::new(FaultPlan::new().with(Fault::nth(IoOp::Write, 2, FaultKind::NoSpace)));
//! let disk = DiskDevice::with_faults(DiskConfig::new("/var/tmp/offload"), Arc::clone(&plan))?;
//! # Ok(())
//! # }
//! ```
//!
//! Operations are the chunks the driver submits (resubmissions count as new
//! operations), counted per direction from 0 from the device's creation.
//! A short read really reads the whole chunk, then overwrites the bytes past
//! the reported count with garbage, so a driver that took a short read for a
//! whole one would return wrong data. A short write writes the reported
//! count rounded down to the direct-I/O alignment and reports the count.

use crate::backend::{Backend, Completion, Session, Staging, Submission};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use tier_api::{FixedBuffers, HostSpan, IoOp};

/// The environment variable that injects faults into every disk device a
/// debug build of tierlm makes, or a build with tier-api's
/// `fault-injection` feature (other release builds ignore it): comma-separated
/// `OP:INDEX:KIND[:TIMES]`, OP `read` or `write`, INDEX the operation's
/// index in its direction (from 0, per device; resubmissions count) or a
/// range `FIRST-LAST` of them, KIND `eio`, `enospc` or
/// `short=BYTES`, TIMES a count or `always` (default 1). Example:
/// `TIERLM_DISK_FAULTS=write:3:enospc,read:10:short=512:always`.
pub const FAULTS_ENV: &str = "TIERLM_DISK_FAULTS";

/// Parses a [`FAULTS_ENV`] value.
pub fn parse_plan(spec: &str) -> tier_api::Result<FaultPlan> {
    let bad = |part: &str, why: &str| {
        tier_api::Error::Config(format!(
            "{FAULTS_ENV}: {part:?}: {why} (expected OP:INDEX:KIND[:TIMES], e.g. read:3:eio, write:0:enospc, \
             read:5:short=512:always)"
        ))
    };
    let plan = FaultPlan::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let fields: Vec<&str> = part.split(':').collect();
        if !(3..=4).contains(&fields.len()) {
            return Err(bad(part, "wrong number of fields"));
        }
        let op = match fields[0] {
            "read" => IoOp::Read,
            "write" => IoOp::Write,
            _ => return Err(bad(part, "OP is read or write")),
        };
        // INDEX or FIRST-LAST (every operation of the range, at most 4096).
        let (first, last) = match fields[1].split_once('-') {
            Some((a, b)) => (a.parse::<u64>(), b.parse::<u64>()),
            None => (fields[1].parse(), fields[1].parse()),
        };
        let (Ok(first), Ok(last)) = (first, last) else {
            return Err(bad(part, "INDEX is a number or a range FIRST-LAST"));
        };
        if last < first || last - first >= 4096 {
            return Err(bad(part, "a range runs from FIRST to LAST, at most 4096 operations"));
        }
        let kind = match fields[2] {
            "eio" => FaultKind::Eio,
            "enospc" => FaultKind::NoSpace,
            k => match k.strip_prefix("short=").map(str::parse::<u32>) {
                Some(Ok(n)) => FaultKind::Short(n),
                _ => return Err(bad(part, "KIND is eio, enospc or short=BYTES")),
            },
        };
        let times = match fields.get(3) {
            None => 1,
            Some(&"always") => u32::MAX,
            Some(t) => t.parse().map_err(|_| bad(part, "TIMES is a number or always"))?,
        };
        for index in first..=last {
            plan.add(Fault::nth(op, index, kind).times(times));
        }
    }
    Ok(plan)
}

/// The faults [`FAULTS_ENV`] asks for where faults are honoured
/// ([`tier_api::fault::ENABLED`]); `None` elsewhere or without the variable.
pub fn plan_from_env() -> tier_api::Result<Option<std::sync::Arc<FaultPlan>>> {
    if !tier_api::fault::ENABLED {
        return Ok(None);
    }
    match std::env::var(FAULTS_ENV) {
        Ok(spec) if !spec.trim().is_empty() => Ok(Some(std::sync::Arc::new(parse_plan(&spec)?))),
        _ => Ok(None),
    }
}

/// The byte written past the reported count of a short read.
pub const GARBAGE: u8 = 0xEE;

/// What happens to a chosen operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Completes with only this many bytes transferred.
    Short(u32),
    /// Fails with EIO.
    Eio,
    /// Fails with ENOSPC.
    NoSpace,
}

/// Which operations a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// The operation with this index (0-based, counted per direction).
    Nth(u64),
    /// Operations whose file range contains this arena offset.
    Offset(u64),
}

/// One fault: which operations, what happens, how many times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub op: IoOp,
    pub when: When,
    pub kind: FaultKind,
    /// How many matching operations it hits before it stops (`u32::MAX`: always).
    pub times: u32,
}

impl Fault {
    /// Hits operation `index` of direction `op`, once.
    pub fn nth(op: IoOp, index: u64, kind: FaultKind) -> Self {
        Fault { op, when: When::Nth(index), kind, times: 1 }
    }

    /// Hits the next operation of direction `op` that covers arena offset `offset`, once.
    pub fn at_offset(op: IoOp, offset: u64, kind: FaultKind) -> Self {
        Fault { op, when: When::Offset(offset), kind, times: 1 }
    }

    /// Hits this many matching operations.
    pub fn times(self, times: u32) -> Self {
        Fault { times, ..self }
    }

    /// Hits every matching operation.
    pub fn always(self) -> Self {
        self.times(u32::MAX)
    }
}

/// A record of a fault that fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fired {
    pub op: IoOp,
    /// The operation's index in its direction.
    pub index: u64,
    pub offset: u64,
    pub len: u32,
    pub kind: FaultKind,
}

/// The faults to inject, and what happened. Share it (`Arc`) with the device
/// to inspect it after the requests.
#[derive(Debug, Default)]
pub struct FaultPlan {
    faults: Mutex<Vec<Fault>>,
    reads: AtomicU64,
    writes: AtomicU64,
    fired: Mutex<Vec<Fired>>,
}

impl FaultPlan {
    pub fn new() -> Self {
        FaultPlan::default()
    }

    pub fn with(self, fault: Fault) -> Self {
        self.faults.lock().push(fault);
        self
    }

    /// Adds a fault to a plan already in use.
    pub fn add(&self, fault: Fault) {
        self.faults.lock().push(fault);
    }

    /// Operations of direction `op` seen so far.
    pub fn ops(&self, op: IoOp) -> u64 {
        match op {
            IoOp::Read => self.reads.load(Ordering::Relaxed),
            IoOp::Write => self.writes.load(Ordering::Relaxed),
        }
    }

    /// The faults that fired, in order.
    pub fn fired(&self) -> Vec<Fired> {
        self.fired.lock().clone()
    }

    /// Counts an operation and picks the fault for it, if any.
    fn decide(&self, op: IoOp, offset: u64, len: u32) -> Option<FaultKind> {
        let index = match op {
            IoOp::Read => self.reads.fetch_add(1, Ordering::Relaxed),
            IoOp::Write => self.writes.fetch_add(1, Ordering::Relaxed),
        };
        let mut faults = self.faults.lock();
        let hit = faults.iter_mut().find(|f| {
            f.op == op
                && f.times > 0
                && match f.when {
                    When::Nth(n) => n == index,
                    When::Offset(o) => (offset..offset + len as u64).contains(&o),
                }
        })?;
        if hit.times != u32::MAX {
            hit.times -= 1;
        }
        let kind = hit.kind;
        drop(faults);
        self.fired.lock().push(Fired { op, index, offset, len, kind });
        Some(kind)
    }
}

/// The wrapper backend.
pub(crate) struct FaultBackend {
    inner: Box<dyn Backend>,
    plan: std::sync::Arc<FaultPlan>,
    io_align: u64,
}

impl FaultBackend {
    pub(crate) fn new(inner: Box<dyn Backend>, plan: std::sync::Arc<FaultPlan>, io_align: u64) -> Self {
        FaultBackend { inner, plan, io_align }
    }
}

impl Backend for FaultBackend {
    fn describe(&self) -> String {
        format!("{} with injected faults", self.inner.describe())
    }

    unsafe fn register_buffers(
        &self,
        tier: &str,
        spans: &[HostSpan],
    ) -> tier_api::Result<Option<Box<dyn FixedBuffers>>> {
        // SAFETY: forwarded contract.
        unsafe { self.inner.register_buffers(tier, spans) }
    }

    fn session(&self) -> io::Result<Box<dyn Session + '_>> {
        Ok(Box::new(FaultSession {
            inner: self.inner.session()?,
            plan: &self.plan,
            io_align: self.io_align,
            made_up: VecDeque::new(),
            shortened: HashMap::new(),
        }))
    }
}

struct FaultSession<'a> {
    inner: Box<dyn Session + 'a>,
    plan: &'a FaultPlan,
    io_align: u64,
    /// Completions invented without reaching the real backend.
    made_up: VecDeque<Completion>,
    /// Operations passed on whose result is to be reported short, by tag.
    shortened: HashMap<u64, Shortened>,
}

struct Shortened {
    op: IoOp,
    /// Bytes to report.
    n: u32,
    buf: *mut u8,
    /// Bytes really asked of the backend.
    real: u32,
}

impl Session for FaultSession<'_> {
    fn depth(&self) -> usize {
        self.inner.depth()
    }

    fn staging_count(&self) -> usize {
        self.inner.staging_count()
    }

    fn staging(&self, index: usize) -> Staging {
        self.inner.staging(index)
    }

    fn fixed(&self, ptr: *const u8, len: usize) -> Option<u16> {
        self.inner.fixed(ptr, len)
    }

    fn push(&mut self, sub: Submission) -> io::Result<()> {
        let fail = |res| Completion { tag: sub.tag, res };
        match self.plan.decide(sub.op, sub.offset, sub.len) {
            None => self.inner.push(sub),
            Some(FaultKind::Eio) => {
                self.made_up.push_back(fail(-libc::EIO));
                Ok(())
            }
            Some(FaultKind::NoSpace) => {
                self.made_up.push_back(fail(-libc::ENOSPC));
                Ok(())
            }
            Some(FaultKind::Short(n)) => {
                let n = n.min(sub.len);
                let real = match sub.op {
                    IoOp::Read => sub.len,
                    // Really write the aligned part of the reported count.
                    IoOp::Write => (n as u64 - n as u64 % self.io_align) as u32,
                };
                if n == 0 || real == 0 {
                    self.made_up.push_back(fail(n as i32));
                    return Ok(());
                }
                self.shortened.insert(sub.tag, Shortened { op: sub.op, n, buf: sub.buf, real });
                self.inner.push(Submission { len: real, ..sub })
            }
        }
    }

    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        if !self.made_up.is_empty() {
            out.extend(self.made_up.drain(..));
            return Ok(());
        }
        let start = out.len();
        self.inner.wait(out)?;
        for c in &mut out[start..] {
            let Some(short) = self.shortened.remove(&c.tag) else { continue };
            if c.res < 0 || c.res as u32 != short.real {
                // The real backend failed or went short by itself: report that.
                continue;
            }
            if short.op == IoOp::Read {
                // Spoil what the read pretends not to have read.
                // SAFETY: the read of `real` bytes into `buf` has completed
                // and the driver does not look at the buffer until it sees
                // this completion; `n <= real`.
                unsafe {
                    std::ptr::write_bytes(short.buf.add(short.n as usize), GARBAGE, (short.real - short.n) as usize)
                };
            }
            c.res = short.n as i32;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_from_the_environment_syntax() {
        let plan = parse_plan("write:3:enospc, read:10:short=512:always,read:0:eio:2,write:7-8:eio").unwrap();
        let faults = plan.faults.lock().clone();
        assert_eq!(
            faults,
            vec![
                Fault::nth(IoOp::Write, 3, FaultKind::NoSpace),
                Fault::nth(IoOp::Read, 10, FaultKind::Short(512)).always(),
                Fault::nth(IoOp::Read, 0, FaultKind::Eio).times(2),
                Fault::nth(IoOp::Write, 7, FaultKind::Eio),
                Fault::nth(IoOp::Write, 8, FaultKind::Eio),
            ]
        );
        for bad in
            ["read:1", "seek:1:eio", "read:x:eio", "read:1:boom", "read:1:short=x", "read:1:eio:never", "read:5-2:eio"]
        {
            let err = parse_plan(bad).unwrap_err().to_string();
            assert!(err.contains("TIERLM_DISK_FAULTS") && err.contains(bad), "{bad}: {err}");
        }
        assert!(parse_plan("").unwrap().faults.lock().is_empty());
    }
}
