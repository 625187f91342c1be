//! Caller memory registered as io_uring fixed buffers
//! ([`tier_api::BlockIo::register_buffers`]).
//!
//! Every ring of a device has a sparse buffer table of [`TABLE_LEN`]
//! entries: the first [`MAX_STAGING_BUFFERS`] hold the ring's own staging
//! buffers, the next [`MAX_FIXED_BUFFERS`] hold caller memory. A registered
//! span is split into pieces of at most [`MAX_FIXED_BUFFER_BYTES`] (the
//! kernel's limit per buffer), each taking one caller entry, the same index
//! in every ring. The [`Registry`] knows every live ring (by its file
//! descriptor, listed from creation until just before it closes) and which
//! entries each holds, so registrations reach rings that are busy with a
//! request and rings created later; a ring's requests see a snapshot of its
//! entries taken when the ring is checked out.
//!
//! Table updates go one entry at a time through
//! `IORING_REGISTER_BUFFERS_UPDATE`, so that a refusal (the locked-memory
//! limit, memory the kernel cannot pin) is known per entry: the kernel
//! reports how many entries of a batch it replaced and hides the error of
//! the first one it did not.

use crate::config::{human, MAX_FIXED_BUFFERS, MAX_FIXED_BUFFER_BYTES, MAX_STAGING_BUFFERS};
use parking_lot::Mutex;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tier_api::{Error, FixedBuffers, HostSpan, Result};

/// The table index of caller entry 0.
pub(crate) const FIRST_CALLER_INDEX: usize = MAX_STAGING_BUFFERS;
/// Entries in each ring's buffer table.
pub(crate) const TABLE_LEN: usize = MAX_STAGING_BUFFERS + MAX_FIXED_BUFFERS;
// The kernel allows 16384 entries (IORING_MAX_REG_BUFFERS); indices travel as u16.
const _: () = assert!(TABLE_LEN <= 16384 && TABLE_LEN <= u16::MAX as usize);

/// `IORING_REGISTER_BUFFERS_UPDATE` from `<linux/io_uring.h>` (Linux 5.13).
const IORING_REGISTER_BUFFERS_UPDATE: libc::c_uint = 16;
/// Bounded retries of a table update interrupted by a signal.
const MAX_EINTR_RETRIES: u32 = 16;
/// Attempts to clear one entry on unregistration.
const CLEAR_ATTEMPTS: u32 = 4;

/// `struct io_uring_rsrc_update2` of the kernel ABI.
#[repr(C)]
struct RsrcUpdate2 {
    offset: u32,
    resv: u32,
    data: u64,
    tags: u64,
    nr: u32,
    resv2: u32,
}

const _: () = assert!(std::mem::size_of::<RsrcUpdate2>() == 32);

/// Replaces entries `offset..offset + iovecs.len()` of the buffer table of
/// ring `fd` with `iovecs` (a null base and zero length empties an entry);
/// returns how many the kernel replaced, from the first on.
///
/// # Safety
/// `fd` is an open io_uring whose table has these entries, and the memory of
/// every non-empty iovec stays valid until its entry is replaced again or
/// the ring is closed.
pub(crate) unsafe fn update_buffers(fd: RawFd, offset: usize, iovecs: &[libc::iovec]) -> io::Result<usize> {
    let (Ok(offset), Ok(nr)) = (u32::try_from(offset), u32::try_from(iovecs.len())) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let up = RsrcUpdate2 { offset, resv: 0, data: iovecs.as_ptr() as u64, tags: 0, nr, resv2: 0 };
    let mut attempts = 0;
    loop {
        // SAFETY: `up` is a valid rsrc_update2 of the size passed, pointing
        // at `nr` iovecs that live across the call; the rest is the
        // caller's contract.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                fd,
                IORING_REGISTER_BUFFERS_UPDATE,
                &up as *const RsrcUpdate2,
                std::mem::size_of::<RsrcUpdate2>() as libc::c_uint,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        attempts += 1;
        if e.raw_os_error() != Some(libc::EINTR) || attempts >= MAX_EINTR_RETRIES {
            return Err(e);
        }
    }
}

/// Registers one iovec at table index `index` of ring `fd`.
///
/// # Safety
/// As [`update_buffers`].
unsafe fn set_one(fd: RawFd, index: usize, iov: libc::iovec) -> io::Result<()> {
    // SAFETY: forwarded.
    match unsafe { update_buffers(fd, index, &[iov]) }? {
        1 => Ok(()),
        n => Err(io::Error::other(format!("the kernel replaced {n} buffer table entries of 1"))),
    }
}

/// A caller entry a ring holds, as its requests see it.
#[derive(Clone, Debug)]
pub(crate) struct Fixed {
    start: usize,
    end: usize,
    index: u16,
    ops: Arc<AtomicU64>,
}

/// The table index of the entry of `snapshot` that holds all of
/// `ptr..ptr + len`, counting the operation on its registration.
pub(crate) fn lookup(snapshot: &[Fixed], ptr: *const u8, len: usize) -> Option<u16> {
    let start = ptr as usize;
    let end = start.checked_add(len)?;
    let f = snapshot.iter().find(|f| f.start <= start && end <= f.end)?;
    f.ops.fetch_add(1, Ordering::Relaxed);
    Some(f.index)
}

#[derive(Clone)]
enum Entry {
    Free,
    Used { start: usize, len: usize, ops: Arc<AtomicU64> },
}

struct RingEntry {
    id: u64,
    fd: RawFd,
    /// Which caller entries this ring holds.
    has: Vec<bool>,
    snapshot: Arc<[Fixed]>,
}

struct State {
    entries: Vec<Entry>,
    rings: Vec<RingEntry>,
    next_ring: u64,
}

impl State {
    fn refresh(&mut self) {
        let entries = &self.entries;
        for r in &mut self.rings {
            r.snapshot = snapshot(entries, &r.has);
        }
    }
}

fn snapshot(entries: &[Entry], has: &[bool]) -> Arc<[Fixed]> {
    entries
        .iter()
        .zip(has)
        .enumerate()
        .filter_map(|(i, (e, &held))| match e {
            Entry::Used { start, len, ops } if held => Some(Fixed {
                start: *start,
                end: start + len,
                // Below TABLE_LEN, which fits in u16 (checked at compile time).
                index: (FIRST_CALLER_INDEX + i) as u16,
                ops: Arc::clone(ops),
            }),
            _ => None,
        })
        .collect()
}

/// The caller memory registered with a device's rings, and the rings.
pub(crate) struct Registry {
    state: Mutex<State>,
    /// Set when the backend goes away: handles left serve nothing.
    closed: AtomicBool,
}

impl Registry {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Registry {
            state: Mutex::new(State { entries: vec![Entry::Free; MAX_FIXED_BUFFERS], rings: Vec::new(), next_ring: 0 }),
            closed: AtomicBool::new(false),
        })
    }

    /// Marks the backend gone (its rings detach as they close).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Gives a new ring every registration made so far and tracks it until
    /// [`detach`](Self::detach); returns its id. A ring the kernel refuses
    /// an entry keeps the entries before it and serves the rest plainly.
    ///
    /// # Safety
    /// `fd` is an open io_uring with a sparse table of [`TABLE_LEN`] entries
    /// that stays open until `detach` of the returned id has returned.
    pub(crate) unsafe fn attach(&self, fd: RawFd) -> u64 {
        let mut st = self.state.lock();
        let id = st.next_ring;
        st.next_ring += 1;
        let mut has = vec![false; MAX_FIXED_BUFFERS];
        for (i, e) in st.entries.iter().enumerate() {
            let Entry::Used { start, len, .. } = e else { continue };
            let iov = libc::iovec { iov_base: *start as *mut libc::c_void, iov_len: *len };
            // SAFETY: the ring is open (caller contract); the entry's memory
            // stays valid until its registration is dropped, which first
            // empties the entry in every listed ring (this one included).
            if unsafe { set_one(fd, FIRST_CALLER_INDEX + i, iov) }.is_err() {
                break;
            }
            has[i] = true;
        }
        let snap = snapshot(&st.entries, &has);
        st.rings.push(RingEntry { id, fd, has, snapshot: snap });
        id
    }

    /// Stops tracking a ring about to close.
    pub(crate) fn detach(&self, id: u64) {
        self.state.lock().rings.retain(|r| r.id != id);
    }

    /// The caller entries ring `id` holds now.
    pub(crate) fn snapshot(&self, id: u64) -> Arc<[Fixed]> {
        let st = self.state.lock();
        st.rings.iter().find(|r| r.id == id).map_or_else(|| Arc::from(Vec::new()), |r| Arc::clone(&r.snapshot))
    }

    /// Registers `spans` with every ring (and later ones).
    ///
    /// # Safety
    /// As [`tier_api::BlockIo::register_buffers`]: the spans' memory stays
    /// valid and in place until the returned handle is dropped.
    pub(crate) unsafe fn register(self: &Arc<Self>, tier: &str, spans: &[HostSpan]) -> Result<Box<dyn FixedBuffers>> {
        let pieces = pieces(tier, spans)?;
        let mut st = self.state.lock();
        let free: Vec<usize> =
            st.entries.iter().enumerate().filter(|(_, e)| matches!(e, Entry::Free)).map(|(i, _)| i).collect();
        if free.len() < pieces.len() {
            return Err(Error::Config(format!(
                "{tier}: registering {} fixed buffers, but only {} of {MAX_FIXED_BUFFERS} are free; drop other \
                 registrations first",
                pieces.len(),
                free.len()
            )));
        }
        let slots = &free[..pieces.len()];
        let mut refused: Option<io::Error> = None;
        let mut held = 0usize;
        for ring in &mut st.rings {
            for (&i, &(start, len)) in slots.iter().zip(&pieces) {
                let iov = libc::iovec { iov_base: start as *mut libc::c_void, iov_len: len };
                // SAFETY: listed rings are open (they leave the list before
                // closing, under this lock); the memory stays valid until the
                // handle below is dropped (caller contract), whose drop empties
                // the entry in every ring first.
                match unsafe { set_one(ring.fd, FIRST_CALLER_INDEX + i, iov) } {
                    Ok(()) => {
                        ring.has[i] = true;
                        held += 1;
                    }
                    Err(e) => {
                        refused.get_or_insert(e);
                        break;
                    }
                }
            }
        }
        if held == 0 {
            if let Some(e) = refused {
                return Err(refusal(tier, &pieces, &e));
            }
        }
        let ops = Arc::new(AtomicU64::new(0));
        for (&i, &(start, len)) in slots.iter().zip(&pieces) {
            st.entries[i] = Entry::Used { start, len, ops: Arc::clone(&ops) };
        }
        st.refresh();
        let bytes = pieces.iter().map(|p| p.1).sum();
        Ok(Box::new(Registration {
            registry: Arc::clone(self),
            entries: slots.to_vec(),
            spans: spans.len(),
            bytes,
            ops,
            refused: refused.map(|e| e.to_string()),
        }))
    }

    /// Empties caller entries in every ring and frees them.
    fn release(&self, entries: &[usize]) {
        let mut st = self.state.lock();
        let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        for &i in entries {
            for ring in &mut st.rings {
                if !std::mem::replace(&mut ring.has[i], false) {
                    continue;
                }
                for _ in 0..CLEAR_ATTEMPTS {
                    // SAFETY: the ring is open (listed); an empty entry points
                    // at no memory. If every attempt fails, the ring keeps the
                    // old pages pinned until the entry is reused or the ring
                    // closes, but no request uses it (`has` is false).
                    if unsafe { set_one(ring.fd, FIRST_CALLER_INDEX + i, empty) }.is_ok() {
                        break;
                    }
                }
            }
            st.entries[i] = Entry::Free;
        }
        st.refresh();
    }
}

/// The spans as pieces of at most [`MAX_FIXED_BUFFER_BYTES`]: (address, length).
fn pieces(tier: &str, spans: &[HostSpan]) -> Result<Vec<(usize, usize)>> {
    if spans.is_empty() {
        return Err(Error::Config(format!("{tier}: no memory given to register")));
    }
    let mut count = 0usize;
    for s in spans {
        if s.is_empty() || (s.as_ptr() as usize).checked_add(s.len()).is_none() {
            return Err(Error::Config(format!("{tier}: cannot register an empty or wrapping span of memory")));
        }
        count = count.saturating_add(s.len().div_ceil(MAX_FIXED_BUFFER_BYTES));
    }
    if count > MAX_FIXED_BUFFERS {
        return Err(Error::Config(format!(
            "{tier}: {count} fixed buffers of at most {} asked; a device holds at most {MAX_FIXED_BUFFERS}",
            human(MAX_FIXED_BUFFER_BYTES)
        )));
    }
    let mut out = Vec::with_capacity(count);
    for s in spans {
        let base = s.as_ptr() as usize;
        let mut at = 0;
        while at < s.len() {
            let len = (s.len() - at).min(MAX_FIXED_BUFFER_BYTES);
            out.push((base + at, len));
            at += len;
        }
    }
    Ok(out)
}

fn refusal(tier: &str, pieces: &[(usize, usize)], e: &io::Error) -> Error {
    let bytes: usize = pieces.iter().map(|p| p.1).sum();
    let why = match e.raw_os_error() {
        Some(libc::ENOMEM) => "the locked-memory limit is too low: raise `ulimit -l` (RLIMIT_MEMLOCK)",
        Some(libc::EOPNOTSUPP) => "the memory is file-backed, which this kernel does not register",
        Some(libc::EFAULT) => "the kernel cannot pin this memory",
        Some(libc::EINVAL) => "the kernel refused the buffer table update",
        _ => "",
    };
    Error::Unsupported {
        what: format!("io_uring fixed buffers of {bytes} bytes on {tier}"),
        hint: format!(
            "registration failed ({e}){}{why}; requests use plain reads and writes",
            if why.is_empty() { "" } else { ": " }
        ),
    }
}

/// The handle of one registration.
struct Registration {
    registry: Arc<Registry>,
    entries: Vec<usize>,
    spans: usize,
    bytes: usize,
    ops: Arc<AtomicU64>,
    /// Why some ring did not take every piece.
    refused: Option<String>,
}

impl FixedBuffers for Registration {
    fn describe(&self) -> String {
        let st = self.registry.state.lock();
        let full = st.rings.iter().filter(|r| self.entries.iter().all(|&i| r.has[i])).count();
        let refused = self.refused.as_ref().map(|e| format!("; some refused: {e}")).unwrap_or_default();
        format!(
            "{} span{} ({}) as {} fixed buffer{}, held by {full} of {} io_uring rings{refused}",
            self.spans,
            if self.spans == 1 { "" } else { "s" },
            human(self.bytes),
            self.entries.len(),
            if self.entries.len() == 1 { "" } else { "s" },
            st.rings.len(),
        )
    }

    fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    fn active(&self) -> bool {
        !self.registry.closed.load(Ordering::Relaxed)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.release(&self.entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::NonNull;

    fn span(addr: usize, len: usize) -> HostSpan {
        // SAFETY: never dereferenced; `pieces` only reads the address and length.
        unsafe { HostSpan::new(NonNull::new(addr as *mut u8).unwrap(), len) }
    }

    #[test]
    fn spans_split_at_the_kernel_limit_and_are_bounded() {
        let g = MAX_FIXED_BUFFER_BYTES;
        let p = pieces("disk:0", &[span(4096, 4096), span(1 << 40, 2 * g + 5)]).unwrap();
        assert_eq!(p, vec![(4096, 4096), (1 << 40, g), ((1 << 40) + g, g), ((1 << 40) + 2 * g, 5)]);
        assert!(matches!(pieces("disk:0", &[]), Err(Error::Config(_))));
        assert!(matches!(pieces("disk:0", &[span(4096, 0)]), Err(Error::Config(_))));
        assert!(matches!(pieces("disk:0", &[span(usize::MAX - 10, 100)]), Err(Error::Config(_))));
        let too_many = span(4096, (MAX_FIXED_BUFFERS + 1) * g);
        assert!(matches!(pieces("disk:0", &[too_many]), Err(Error::Config(_))));
    }

    #[test]
    fn lookup_finds_the_entry_holding_the_whole_range() {
        let ops = Arc::new(AtomicU64::new(0));
        let snap = [
            Fixed { start: 1000, end: 2000, index: 64, ops: Arc::clone(&ops) },
            Fixed { start: 2000, end: 3000, index: 65, ops: Arc::clone(&ops) },
        ];
        assert_eq!(lookup(&snap, 1000 as *const u8, 1000), Some(64));
        assert_eq!(lookup(&snap, 2500 as *const u8, 500), Some(65));
        assert_eq!(lookup(&snap, 1500 as *const u8, 1000), None, "straddles two pieces");
        assert_eq!(lookup(&snap, 999 as *const u8, 10), None);
        assert_eq!(lookup(&snap, usize::MAX as *const u8, 10), None);
        assert_eq!(ops.load(Ordering::Relaxed), 2);
    }
}
