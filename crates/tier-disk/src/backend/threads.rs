//! The fallback backend: positioned reads and writes on a bounded pool of
//! threads. Each session has its own completion channel and staging buffers;
//! the workers are shared.

use super::{staging_buffers, Backend, Completion, Params, Pool, PoolGuard, Session, Staging, Submission};
use crate::config::human;
use crate::sys::BufPiece;
use crossbeam_channel::{bounded, Receiver, Sender};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use tier_api::IoOp;

struct Job {
    sub: Submission,
    reply: Sender<Completion>,
}

struct Slot {
    staging: Vec<BufPiece>,
    _staging_held: tier_api::Reservation,
    tx: Sender<Completion>,
    rx: Receiver<Completion>,
}

pub(crate) struct ThreadBackend {
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    pool: Pool<Slot>,
    depth: usize,
    staging_count: usize,
    chunk: usize,
    direct: bool,
    host: Arc<tier_api::MemAccount>,
    why: String,
}

impl ThreadBackend {
    /// Starts `threads` workers on `file`. `why` says why this backend was
    /// chosen ("io_uring unavailable: ...").
    pub(crate) fn new(p: &Params, threads: usize, why: String) -> io::Result<Self> {
        let Params { file, depth, staging: staging_count, chunk, sessions, direct, host } = p.clone();
        assert!(threads >= 1 && depth >= 1 && staging_count >= 1 && sessions >= 1);
        // Every session keeps at most `depth` jobs outstanding, so this
        // queue never holds more than its capacity and `send` never blocks
        // for long.
        let (tx, rx) = bounded::<Job>(depth * sessions);
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = rx.clone();
            let file = Arc::clone(&file);
            let w = std::thread::Builder::new().name(format!("tierlm-disk-io-{i}")).spawn(move || {
                for job in rx {
                    let res = positioned(&file, &job.sub);
                    // The session may be gone only if its request was
                    // abandoned, which the driver never does.
                    let _ = job.reply.send(Completion { tag: job.sub.tag, res });
                }
            });
            match w {
                Ok(w) => workers.push(w),
                Err(e) => {
                    drop(tx);
                    for w in workers {
                        let _ = w.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(ThreadBackend {
            jobs: Some(tx),
            workers,
            pool: Pool::new(sessions, None),
            depth,
            staging_count,
            chunk,
            direct,
            host,
            why,
        })
    }
}

/// One pread or pwrite: bytes moved, or a negated errno.
fn positioned(file: &File, sub: &Submission) -> i32 {
    let fd = file.as_raw_fd();
    let Ok(off) = libc::off_t::try_from(sub.offset) else {
        return -libc::EFBIG;
    };
    // SAFETY: the driver keeps `buf` valid for `len` bytes, and untouched by
    // anyone else, until this operation's completion is reaped.
    let r = unsafe {
        match sub.op {
            IoOp::Read => libc::pread(fd, sub.buf.cast(), sub.len as usize, off),
            IoOp::Write => libc::pwrite(fd, sub.buf.cast_const().cast(), sub.len as usize, off),
        }
    };
    if r < 0 {
        -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    } else {
        // At most `len`, which fits in u32; a completion result is an i32 by
        // the io_uring convention, and chunks are at most 64 MiB.
        i32::try_from(r).unwrap_or(i32::MAX)
    }
}

impl Backend for ThreadBackend {
    fn describe(&self) -> String {
        format!(
            "pread/pwrite threads ({}, {} threads, depth {}, {} chunks; {})",
            if self.direct { "O_DIRECT" } else { "buffered" },
            self.workers.len(),
            self.depth,
            human(self.chunk),
            self.why
        )
    }

    fn session(&self) -> io::Result<Box<dyn Session + '_>> {
        let jobs = self.jobs.as_ref().ok_or_else(|| io::Error::other("the disk I/O threads are shut down"))?;
        let slot = self.pool.get(|| {
            let (tx, rx) = bounded(self.depth);
            let (staging, _staging_held) = staging_buffers(self.staging_count, self.chunk, &self.host)?;
            Ok(Slot { staging, _staging_held, tx, rx })
        })?;
        Ok(Box::new(ThreadSession { slot, jobs, depth: self.depth }))
    }
}

impl Drop for ThreadBackend {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

struct ThreadSession<'a> {
    slot: PoolGuard<'a, Slot>,
    jobs: &'a Sender<Job>,
    depth: usize,
}

impl Session for ThreadSession<'_> {
    fn depth(&self) -> usize {
        self.depth
    }

    fn staging_count(&self) -> usize {
        self.slot.get().staging.len()
    }

    fn staging(&self, index: usize) -> Staging {
        let b = &self.slot.get().staging[index];
        Staging { ptr: b.raw(), len: b.len(), fixed: None }
    }

    fn push(&mut self, sub: Submission) -> io::Result<()> {
        let reply = self.slot.get().tx.clone();
        self.jobs.send(Job { sub, reply }).map_err(|_| io::Error::other("the disk I/O threads are gone"))
    }

    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        let rx = &self.slot.get_mut().rx;
        // The slot holds a sender, so this only returns with a completion.
        let first = rx.recv().map_err(|_| io::Error::other("the disk I/O completion channel closed"))?;
        out.push(first);
        out.extend(rx.try_iter());
        Ok(())
    }
}
