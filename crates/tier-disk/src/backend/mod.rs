//! I/O backends behind one trait: a [`Backend`] hands out [`Session`]s (an
//! io_uring ring, or a slot of the thread pool), each with its own staging
//! buffers, checked out for one request; a session takes submissions and
//! reports completions. The driver in `io.rs` runs the same loop over both.

pub(crate) mod fixed;
pub(crate) mod threads;
pub(crate) mod uring;

use crate::sys::{AlignedBuf, BufPiece};
use parking_lot::{Condvar, Mutex};
use std::io;
use tier_api::{FixedBuffers, HostSpan, IoOp};

/// One operation: move `len` bytes between file offset `offset` and memory
/// at `buf`. `fixed` names the registered buffer `buf` lies in, if any.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Submission {
    pub tag: u64,
    pub op: IoOp,
    pub offset: u64,
    pub buf: *mut u8,
    pub len: u32,
    pub fixed: Option<u16>,
}

// SAFETY: a submission is a description of memory that the driver keeps
// alive and untouched until the operation's completion is reaped; the
// thread pool needs to carry it to a worker.
unsafe impl Send for Submission {}

/// The outcome of a submission: bytes moved, or a negated errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub tag: u64,
    pub res: i32,
}

/// A staging buffer of a session.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Staging {
    pub ptr: *mut u8,
    pub len: usize,
    pub fixed: Option<u16>,
}

/// What every backend is built from.
#[derive(Clone)]
pub(crate) struct Params {
    pub file: std::sync::Arc<std::fs::File>,
    /// Submissions outstanding per session.
    pub depth: usize,
    /// Staging buffers per session.
    pub staging: usize,
    /// Bytes per staging buffer (the chunk size).
    pub chunk: usize,
    /// Sessions at most.
    pub sessions: usize,
    /// Whether the file is open with O_DIRECT (for `describe`).
    pub direct: bool,
    /// Host memory the sessions' staging buffers hold (their pages are
    /// touched, and pinned where registered with io_uring).
    pub host: std::sync::Arc<tier_api::MemAccount>,
}

/// A backend: where sessions come from.
pub(crate) trait Backend: Send + Sync {
    /// For users: "io_uring (O_DIRECT, depth 32, 1 MiB chunks, fixed buffers)".
    fn describe(&self) -> String;

    /// Checks out a session, waiting while all are busy.
    fn session(&self) -> io::Result<Box<dyn Session + '_>>;

    /// Registers caller memory for requests to use in place ([`Session::fixed`]);
    /// `Ok(None)` where the backend cannot (the default).
    ///
    /// # Safety
    /// As [`tier_api::BlockIo::register_buffers`].
    unsafe fn register_buffers(
        &self,
        tier: &str,
        spans: &[HostSpan],
    ) -> tier_api::Result<Option<Box<dyn FixedBuffers>>> {
        let _ = (tier, spans);
        Ok(None)
    }
}

/// One request's access to a backend.
///
/// Contract: every pushed submission's memory stays valid and is not touched
/// by anyone else until its completion has come out of `wait`; `wait` is
/// only called while at least one submission is outstanding; at most
/// `depth()` submissions are outstanding.
pub(crate) trait Session {
    fn depth(&self) -> usize;

    fn staging_count(&self) -> usize;

    fn staging(&self, index: usize) -> Staging;

    /// The registered buffer that holds all of the caller's memory
    /// `ptr..ptr + len`, if any (counted as one operation through it).
    fn fixed(&self, ptr: *const u8, len: usize) -> Option<u16> {
        let _ = (ptr, len);
        None
    }

    /// Queues a submission (it may be sent to the kernel or a worker at once
    /// or at the next `wait`).
    fn push(&mut self, sub: Submission) -> io::Result<()>;

    /// Sends what is queued and waits for at least one completion; appends
    /// all completions available to `out`.
    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()>;
}

/// Allocates `count` staging buffers of `len` bytes, as pieces of one
/// mapping backed by huge pages where the kernel allows (fewer segments per
/// request, and fewer pages to pin when registered).
/// They are touched, and reserved whole against `host` for as long as the returned
/// reservation lives (the session's).
pub(crate) fn staging_buffers(
    count: usize,
    len: usize,
    host: &std::sync::Arc<tier_api::MemAccount>,
) -> io::Result<(Vec<BufPiece>, tier_api::Reservation)> {
    let total = count.checked_mul(len).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    let mut buf = AlignedBuf::new_huge(total)?;
    // Made resident now, as registering them with io_uring does anyway:
    // the reservation below is then what the process holds, whichever
    // backend and however much of them later transfers use.
    buf.as_mut_slice().fill(0);
    let held =
        host.reserve(total as u64, buf.map_len() as u64).map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    Ok((buf.split(len), held))
}

/// A bounded pool of session resources (rings, thread-pool slots), created
/// lazily up to `max` and handed out one caller at a time.
pub(crate) struct Pool<T> {
    state: Mutex<PoolState<T>>,
    returned: Condvar,
}

struct PoolState<T> {
    idle: Vec<T>,
    live: usize,
    max: usize,
}

impl<T> Pool<T> {
    pub(crate) fn new(max: usize, first: Option<T>) -> Self {
        assert!(max >= 1, "a pool holds at least one resource");
        let live = usize::from(first.is_some());
        Pool { state: Mutex::new(PoolState { idle: first.into_iter().collect(), live, max }), returned: Condvar::new() }
    }

    /// An idle resource, a new one made by `make` while fewer than `max`
    /// exist, or the next one returned. If making one fails while others
    /// exist, the pool stops growing and waits for those instead.
    pub(crate) fn get(&self, make: impl Fn() -> io::Result<T>) -> io::Result<PoolGuard<'_, T>> {
        let mut st = self.state.lock();
        loop {
            if let Some(item) = st.idle.pop() {
                return Ok(PoolGuard { pool: self, item: Some(item) });
            }
            if st.live < st.max {
                st.live += 1;
                drop(st);
                let made = make();
                st = self.state.lock();
                match made {
                    Ok(item) => return Ok(PoolGuard { pool: self, item: Some(item) }),
                    Err(e) => {
                        st.live -= 1;
                        if st.live == 0 {
                            return Err(e);
                        }
                        st.max = st.live;
                    }
                }
                continue;
            }
            self.returned.wait(&mut st);
        }
    }
}

/// A resource checked out of a [`Pool`]; goes back on drop.
pub(crate) struct PoolGuard<'a, T> {
    pool: &'a Pool<T>,
    item: Option<T>,
}

impl<T> PoolGuard<'_, T> {
    pub(crate) fn get(&self) -> &T {
        match &self.item {
            Some(item) => item,
            None => unreachable!("a guard holds its item until dropped"),
        }
    }

    pub(crate) fn get_mut(&mut self) -> &mut T {
        match &mut self.item {
            Some(item) => item,
            None => unreachable!("a guard holds its item until dropped"),
        }
    }
}

impl<T> Drop for PoolGuard<'_, T> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.pool.state.lock().idle.push(item);
            self.pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn pool_grows_to_max_then_waits() {
        let made = AtomicUsize::new(0);
        let pool = Pool::new(2, None);
        let make = || Ok(made.fetch_add(1, Ordering::SeqCst));
        let a = pool.get(make).unwrap();
        let b = pool.get(make).unwrap();
        assert_eq!((*a.get(), *b.get()), (0, 1));
        std::thread::scope(|s| {
            let h = s.spawn(|| *pool.get(make).unwrap().get());
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(a);
            assert_eq!(h.join().unwrap(), 0, "the waiter gets the returned resource");
        });
        assert_eq!(made.load(Ordering::SeqCst), 2);
        drop(b);
    }

    #[test]
    fn pool_stops_growing_when_making_fails() {
        let pool = Pool::new(4, Some(7));
        let a = pool.get(|| Ok(0)).unwrap();
        assert_eq!(*a.get(), 7);
        let fail = || Err(io::Error::from_raw_os_error(libc::ENOMEM));
        std::thread::scope(|s| {
            let h = s.spawn(|| *pool.get(fail).unwrap().get());
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(a);
            assert_eq!(h.join().unwrap(), 7);
        });
        let empty: Pool<u8> = Pool::new(1, None);
        assert!(empty.get(fail).is_err());
    }
}
