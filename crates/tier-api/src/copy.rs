//! The copy matrix: a path for every (source tier, destination tier) pair,
//! and a bounded pool of workers that runs copies asynchronously.
//!
//! Planning happens on the caller's thread: it checks dtypes, shapes and
//! overlap, pairs the source's byte runs with the destination's, and picks
//! the first registered [`CopyRoute`] that accepts the two tiers. Execution
//! happens on a worker; the caller gets a [`CopyHandle`] to wait on. The
//! queue between them has a fixed capacity, so a caller that outruns the
//! workers blocks instead of growing memory. A route that fails or panics
//! becomes an error for whoever waits on its copy.

use crate::device::DeviceKind;
use crate::error::{Error, Result};
use crate::segment::SegmentedTensor;
use crate::storage::Access;
use crate::tensor::TensorView;
use crossbeam_channel::{bounded, Receiver, Sender};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How bytes move between two tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyPath {
    /// CPU copy between two host buffers.
    HostMemcpy,
    /// Disk to host memory (direct I/O where alignment allows).
    DiskRead,
    /// Host memory to disk.
    DiskWrite,
    /// Disk to disk through a bounded host bounce buffer.
    DiskToDisk,
    /// DMA between page-locked host memory and the GPU.
    Dma,
    /// Pageable host memory and the GPU through a ring of pinned staging buffers.
    PinnedRelay,
    /// Disk and the GPU through pinned buffers that are also I/O buffers.
    StagedDisk,
    /// GPU to GPU.
    DeviceToDevice,
}

impl CopyPath {
    pub const fn name(self) -> &'static str {
        match self {
            CopyPath::HostMemcpy => "host memcpy",
            CopyPath::DiskRead => "disk read",
            CopyPath::DiskWrite => "disk write",
            CopyPath::DiskToDisk => "disk to disk",
            CopyPath::Dma => "DMA",
            CopyPath::PinnedRelay => "relay through pinned staging",
            CopyPath::StagedDisk => "staged disk",
            CopyPath::DeviceToDevice => "device to device",
        }
    }
}

impl fmt::Display for CopyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One contiguous piece of a copy: `len` bytes from byte `src` of the source
/// tensor to byte `dst` of the destination tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// A planned copy, handed to its route on a worker.
#[derive(Debug)]
pub struct CopyJob {
    pub src: TensorView,
    pub dst: TensorView,
    pub runs: Vec<Run>,
}

impl CopyJob {
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }
}

/// A way of moving bytes between tiers. Backends register theirs with
/// [`CopyMatrix::add_route`]; the built-in ones cover host and disk.
pub trait CopyRoute: Send + Sync {
    fn path(&self) -> CopyPath;

    /// Whether this route moves bytes from `src` to `dst`.
    fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool;

    /// Runs a planned copy to completion on the calling worker.
    fn run(&self, job: &CopyJob) -> Result<()>;
}

/// What `plan` decided, for users and tests to inspect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyPlan {
    pub path: CopyPath,
    pub src: DeviceKind,
    pub dst: DeviceKind,
    pub bytes: u64,
    /// Contiguous pieces the copy is made of.
    pub runs: usize,
}

impl fmt::Display for CopyPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}: {} ({} bytes in {} runs)", self.src, self.dst, self.path, self.bytes, self.runs)
    }
}

/// What a finished copy did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyReport {
    pub paths: Vec<CopyPath>,
    pub bytes: u64,
    /// Time from submission to completion of the slowest part.
    pub elapsed: Duration,
}

/// Sizes of the worker pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyConfig {
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Copies that may wait in the queue before `submit` blocks (at least 1).
    pub queue_capacity: usize,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig { workers: 4, queue_capacity: 64 }
    }
}

struct Task {
    route: Arc<dyn CopyRoute>,
    job: CopyJob,
    submitted: Instant,
    done: Sender<Result<CopyReport>>,
}

/// A copy in flight. Waiting consumes the handle; dropping it without waiting
/// lets the copy finish on its own.
#[must_use = "a copy handle should be waited on to learn whether the copy succeeded"]
pub struct CopyHandle {
    parts: Vec<(CopyPath, Receiver<Result<CopyReport>>)>,
}

impl CopyHandle {
    /// Waits for every part. If any failed, returns the first error, after
    /// all parts have stopped, so nothing is still writing when it returns.
    pub fn wait(self) -> Result<CopyReport> {
        let mut report = CopyReport { paths: Vec::new(), bytes: 0, elapsed: Duration::ZERO };
        let mut first_error = None;
        for (path, rx) in self.parts {
            match rx.recv() {
                Ok(Ok(part)) => {
                    report.bytes += part.bytes;
                    report.elapsed = report.elapsed.max(part.elapsed);
                    for p in part.paths {
                        if !report.paths.contains(&p) {
                            report.paths.push(p);
                        }
                    }
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(Error::WorkerLost { path });
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Whether every part has reported its result (success or failure), so
    /// that `wait` returns without blocking.
    pub fn is_done(&self) -> bool {
        self.parts.iter().all(|(_, rx)| !rx.is_empty())
    }

    /// Joins two handles into one that waits for both.
    pub fn join(mut self, other: CopyHandle) -> CopyHandle {
        self.parts.extend(other.parts);
        self
    }

    /// A handle with nothing to wait for.
    pub fn empty() -> CopyHandle {
        CopyHandle { parts: Vec::new() }
    }
}

/// Routes plus the workers that run them.
pub struct CopyMatrix {
    routes: Vec<Arc<dyn CopyRoute>>,
    queue: Option<Sender<Task>>,
    workers: Vec<JoinHandle<()>>,
    config: CopyConfig,
}

impl CopyMatrix {
    /// A matrix with the built-in host and disk routes.
    pub fn new(config: CopyConfig) -> Result<Self> {
        Self::with_routes(config, builtin_routes())
    }

    /// A matrix with exactly these routes, tried in order.
    pub fn with_routes(config: CopyConfig, routes: Vec<Arc<dyn CopyRoute>>) -> Result<Self> {
        if config.workers == 0 || config.queue_capacity == 0 {
            return Err(Error::Config(format!(
                "the copy matrix needs at least one worker and a queue of at least one (got {} and {})",
                config.workers, config.queue_capacity
            )));
        }
        let (tx, rx) = bounded::<Task>(config.queue_capacity);
        let mut workers = Vec::with_capacity(config.workers);
        for i in 0..config.workers {
            let rx = rx.clone();
            let worker = std::thread::Builder::new()
                .name(format!("tierlm-copy-{i}"))
                .spawn(move || worker_loop(rx))
                .map_err(|e| Error::Config(format!("cannot start copy worker {i}: {e}")))?;
            workers.push(worker);
        }
        Ok(CopyMatrix { routes, queue: Some(tx), workers, config })
    }

    pub fn config(&self) -> CopyConfig {
        self.config
    }

    /// Adds a route ahead of the existing ones, so that a backend can take
    /// over pairs it handles better.
    pub fn add_route(&mut self, route: Arc<dyn CopyRoute>) {
        self.routes.insert(0, route);
    }

    /// The route for a pair of tiers.
    pub fn route(&self, src: DeviceKind, dst: DeviceKind) -> Result<&Arc<dyn CopyRoute>> {
        self.routes.iter().find(|r| r.accepts(src, dst)).ok_or_else(|| Error::NoRoute {
            src,
            dst,
            why: if src.is_gpu() || dst.is_gpu() {
                "GPU copies need the CUDA tier, which is not available in this build or on this machine".into()
            } else {
                "no registered route accepts this pair".into()
            },
        })
    }

    /// Plans a copy without running it.
    pub fn plan(&self, src: &TensorView, dst: &TensorView) -> Result<CopyPlan> {
        let (path, runs) = self.prepare(src, dst)?;
        Ok(CopyPlan {
            path,
            src: src.device(),
            dst: dst.device(),
            bytes: runs.iter().map(|r| r.len).sum(),
            runs: runs.len(),
        })
    }

    fn prepare(&self, src: &TensorView, dst: &TensorView) -> Result<(CopyPath, Vec<Run>)> {
        if src.dtype() != dst.dtype() {
            return Err(Error::DTypeMismatch { src: src.dtype(), dst: dst.dtype() });
        }
        if src.shape() != dst.shape() {
            return Err(Error::ShapeMismatch { src: src.shape(), dst: dst.shape() });
        }
        if dst.tensor().storage().read_only() {
            return Err(crate::tensor::read_only_error(dst.device()));
        }
        let route = self.route(src.device(), dst.device())?;
        let src_runs = src.byte_runs();
        let dst_runs = dst.byte_runs();
        if src.tensor().same_storage(dst.tensor()) && runs_overlap(&src_runs, &dst_runs) {
            return Err(Error::OverlappingCopy);
        }
        Ok((route.path(), pair_runs(&src_runs, &dst_runs)))
    }

    /// Starts copying `src` into `dst`. Blocks while the queue is full.
    pub fn submit(&self, src: TensorView, dst: TensorView) -> Result<CopyHandle> {
        let (path, runs) = self.prepare(&src, &dst)?;
        let route = Arc::clone(self.route(src.device(), dst.device())?);
        let queue = self.queue.as_ref().ok_or(Error::ShutDown)?;
        let (done, rx) = bounded(1);
        let task = Task { route, job: CopyJob { src, dst, runs }, submitted: Instant::now(), done };
        queue.send(task).map_err(|_| Error::ShutDown)?;
        Ok(CopyHandle { parts: vec![(path, rx)] })
    }

    /// Copies and waits.
    pub fn copy(&self, src: &TensorView, dst: &TensorView) -> Result<CopyReport> {
        self.submit(src.clone(), dst.clone())?.wait()
    }

    /// Copies on the calling thread, ahead of the queue: for a small copy
    /// that its caller waits for at once (hidden states between layers),
    /// which behind a layer's queued weight copies would wait for all of
    /// them. The route is the one `submit` would take, so the bytes move
    /// the same way; a panic in it comes back as an error, as from a worker.
    pub fn copy_here(&self, src: &TensorView, dst: &TensorView) -> Result<CopyReport> {
        let (path, runs) = self.prepare(src, dst)?;
        let route = self.route(src.device(), dst.device())?;
        let job = CopyJob { src: src.clone(), dst: dst.clone(), runs };
        run_job(route.as_ref(), path, &job, Instant::now())
    }

    /// Starts copying between two segmented tensors of the same logical shape
    /// split along the same dimension, piece by piece where their segments
    /// intersect. A plain view takes part as [`SegmentedTensor::single`].
    pub fn submit_segmented(&self, src: &SegmentedTensor, dst: &SegmentedTensor) -> Result<CopyHandle> {
        if src.dtype() != dst.dtype() {
            return Err(Error::DTypeMismatch { src: src.dtype(), dst: dst.dtype() });
        }
        if src.shape() != dst.shape() {
            return Err(Error::ShapeMismatch { src: src.shape().clone(), dst: dst.shape().clone() });
        }
        if src.dim() != dst.dim() {
            return Err(Error::BadSplit(format!(
                "source is split along dimension {} and destination along {}; copy through a plain view",
                src.dim(),
                dst.dim()
            )));
        }
        let dim = src.dim();
        // Plan every piece before submitting any, so a bad pair submits nothing.
        let mut pieces = Vec::new();
        for s in src.segments() {
            for d in dst.segments() {
                let lo = s.range.start.max(d.range.start);
                let hi = s.range.end.min(d.range.end);
                if lo >= hi {
                    continue;
                }
                let sv = s.view.narrow(dim, lo - s.range.start, hi - lo)?;
                let dv = d.view.narrow(dim, lo - d.range.start, hi - lo)?;
                self.prepare(&sv, &dv)?;
                pieces.push((sv, dv));
            }
        }
        let mut handle = CopyHandle::empty();
        for (sv, dv) in pieces {
            handle = handle.join(self.submit(sv, dv)?);
        }
        Ok(handle)
    }
}

impl Drop for CopyMatrix {
    fn drop(&mut self) {
        // Closing the queue lets workers drain what was submitted, then exit.
        self.queue = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker_loop(rx: Receiver<Task>) {
    for task in rx {
        let result = run_job(task.route.as_ref(), task.route.path(), &task.job, task.submitted);
        // The waiter may have dropped its handle; the copy is finished either way.
        let _ = task.done.send(result);
    }
}

/// Runs `job` on `route` on this thread: its report (the time since
/// `since`), its error, or a panic in the route as an error.
fn run_job(route: &dyn CopyRoute, path: CopyPath, job: &CopyJob, since: Instant) -> Result<CopyReport> {
    match catch_unwind(AssertUnwindSafe(|| route.run(job))) {
        Ok(Ok(())) => Ok(CopyReport { paths: vec![path], bytes: job.bytes(), elapsed: since.elapsed() }),
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(Error::WorkerPanicked { path, message: panic_message(&panic) }),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Pairs two run lists that cover the same number of bytes in the same
/// logical order into pieces contiguous on both sides.
fn pair_runs(src: &[(u64, u64)], dst: &[(u64, u64)]) -> Vec<Run> {
    let mut out = Vec::with_capacity(src.len().max(dst.len()));
    let (mut i, mut j) = (0, 0);
    let (mut si, mut di) = (0u64, 0u64); // bytes consumed within src[i], dst[j]
    while i < src.len() && j < dst.len() {
        let (so, sl) = src[i];
        let (d_o, dl) = dst[j];
        let len = (sl - si).min(dl - di);
        out.push(Run { src: so + si, dst: d_o + di, len });
        si += len;
        di += len;
        if si == sl {
            i += 1;
            si = 0;
        }
        if di == dl {
            j += 1;
            di = 0;
        }
    }
    debug_assert!(i == src.len() && j == dst.len(), "both sides cover the same bytes");
    out
}

/// Whether any run of `a` intersects any run of `b`.
fn runs_overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    let mut all: Vec<(u64, u64, bool)> = a.iter().map(|&(o, l)| (o, o + l, true)).collect();
    all.extend(b.iter().map(|&(o, l)| (o, o + l, false)));
    all.sort_unstable_by_key(|r| r.0);
    // Runs within one list never overlap each other, so any overlap in the
    // sorted sweep is between the two lists.
    let mut end = 0u64;
    for (start, stop, _) in all {
        if start < end {
            return true;
        }
        end = end.max(stop);
    }
    false
}

/// The routes that need no GPU: host memcpy, disk read, disk write, disk to disk.
pub fn builtin_routes() -> Vec<Arc<dyn CopyRoute>> {
    vec![Arc::new(HostMemcpy), Arc::new(DiskRead), Arc::new(DiskWrite), Arc::new(DiskToDisk)]
}

fn bad_access(job: &CopyJob) -> Error {
    Error::NoRoute {
        src: job.src.device(),
        dst: job.dst.device(),
        why: "a storage did not offer the access its tier promises".into(),
    }
}

fn out_of_span() -> Error {
    Error::Config("a copy run lies outside its storage; this is a bug in view planning".into())
}

struct HostMemcpy;

impl CopyRoute for HostMemcpy {
    fn path(&self) -> CopyPath {
        CopyPath::HostMemcpy
    }

    fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool {
        src.is_host() && dst.is_host()
    }

    fn run(&self, job: &CopyJob) -> Result<()> {
        let (Access::Host(s), Access::Host(d)) =
            (job.src.tensor().storage().access(), job.dst.tensor().storage().access())
        else {
            return Err(bad_access(job));
        };
        for r in &job.runs {
            // SAFETY: runs come from the views, which lie inside their tensors;
            // planning refused overlap within one storage, and the copy matrix's
            // contract is that no other copy writes these bytes meanwhile.
            let (from, to) =
                unsafe { (s.slice(r.src as usize, r.len as usize), d.slice_mut(r.dst as usize, r.len as usize)) };
            to.ok_or_else(out_of_span)?.copy_from_slice(from.ok_or_else(out_of_span)?);
        }
        Ok(())
    }
}

struct DiskRead;

impl CopyRoute for DiskRead {
    fn path(&self) -> CopyPath {
        CopyPath::DiskRead
    }

    fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool {
        src.is_disk() && dst.is_host()
    }

    fn run(&self, job: &CopyJob) -> Result<()> {
        let (Access::Block { io, base }, Access::Host(d)) =
            (job.src.tensor().storage().access(), job.dst.tensor().storage().access())
        else {
            return Err(bad_access(job));
        };
        for r in &job.runs {
            // SAFETY: as for the host memcpy: in range, and no other writer.
            let to = unsafe { d.slice_mut(r.dst as usize, r.len as usize) }.ok_or_else(out_of_span)?;
            io.read_at(base + r.src, to)?;
        }
        Ok(())
    }
}

struct DiskWrite;

impl CopyRoute for DiskWrite {
    fn path(&self) -> CopyPath {
        CopyPath::DiskWrite
    }

    fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool {
        src.is_host() && dst.is_disk()
    }

    fn run(&self, job: &CopyJob) -> Result<()> {
        let (Access::Host(s), Access::Block { io, base }) =
            (job.src.tensor().storage().access(), job.dst.tensor().storage().access())
        else {
            return Err(bad_access(job));
        };
        for r in &job.runs {
            // SAFETY: in range, and no one writes the source meanwhile.
            let from = unsafe { s.slice(r.src as usize, r.len as usize) }.ok_or_else(out_of_span)?;
            io.write_at(base + r.dst, from)?;
        }
        Ok(())
    }
}

struct DiskToDisk;

/// Bounce buffer size for disk-to-disk copies.
const DISK_BOUNCE: u64 = 8 << 20;

impl CopyRoute for DiskToDisk {
    fn path(&self) -> CopyPath {
        CopyPath::DiskToDisk
    }

    fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool {
        src.is_disk() && dst.is_disk()
    }

    fn run(&self, job: &CopyJob) -> Result<()> {
        let (Access::Block { io: si, base: sb }, Access::Block { io: di, base: db }) =
            (job.src.tensor().storage().access(), job.dst.tensor().storage().access())
        else {
            return Err(bad_access(job));
        };
        let largest = job.runs.iter().map(|r| r.len).max().unwrap_or(0).min(DISK_BOUNCE);
        let mut bounce = vec![0u8; largest as usize];
        for r in &job.runs {
            let mut done = 0;
            while done < r.len {
                let n = (r.len - done).min(DISK_BOUNCE) as usize;
                si.read_at(sb + r.src + done, &mut bounce[..n])?;
                di.write_at(db + r.dst + done, &bounce[..n])?;
                done += n as u64;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn pairing_splits_at_both_sides_boundaries() {
        let src = [(0, 10), (20, 10)];
        let dst = [(100, 4), (110, 16)];
        let runs = pair_runs(&src, &dst);
        assert_eq!(
            runs,
            vec![
                Run { src: 0, dst: 100, len: 4 },
                Run { src: 4, dst: 110, len: 6 },
                Run { src: 20, dst: 116, len: 10 },
            ]
        );
    }

    /// A host-to-host route that holds its worker until told to go on.
    struct Gate {
        go: Receiver<()>,
        inner: Arc<dyn CopyRoute>,
    }

    impl CopyRoute for Gate {
        fn path(&self) -> CopyPath {
            self.inner.path()
        }
        fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool {
            self.inner.accepts(src, dst)
        }
        fn run(&self, job: &CopyJob) -> Result<()> {
            if std::thread::current().name().is_some_and(|n| n.starts_with("tierlm-copy-")) {
                let _ = self.go.recv();
            }
            self.inner.run(job)
        }
    }

    #[test]
    fn copy_here_does_not_wait_for_the_queue() {
        use crate::tensor::test_support::tensor;
        let host = builtin_routes()
            .into_iter()
            .find(|r| r.accepts(tensor(&[1], DType::U8).device(), tensor(&[1], DType::U8).device()))
            .expect("a host route");
        let (open, go) = bounded(0);
        let gate: Arc<dyn CopyRoute> = Arc::new(Gate { go, inner: host });
        let m = CopyMatrix::with_routes(CopyConfig { workers: 1, queue_capacity: 4 }, vec![gate]).unwrap();
        let (a, b) = (tensor(&[1 << 16], DType::U8), tensor(&[1 << 16], DType::U8));
        // The only worker is held, with a second copy queued behind it.
        let held = [m.submit(a.view(), b.view()).unwrap(), m.submit(a.view(), b.view()).unwrap()];
        assert!(held.iter().all(|h| !h.is_done()));
        let (src, dst) = (tensor(&[3, 5], DType::F32), tensor(&[3, 5], DType::F32));
        let here = std::thread::scope(|s| {
            let (tx, rx) = bounded(1);
            let (m, src, dst) = (&m, &src, &dst);
            s.spawn(move || {
                let _ = tx.send(m.copy_here(&src.view(), &dst.view()));
            });
            let got = rx.recv_timeout(Duration::from_secs(20));
            // Let the held copies go either way, so the scope can end.
            for _ in 0..2 {
                open.send(()).unwrap();
            }
            got
        });
        let report = here.expect("copy_here waited behind the queue").unwrap();
        assert_eq!(report.bytes, 60);
        for h in held {
            h.wait().unwrap();
        }
    }

    #[test]
    fn overlap_detection() {
        assert!(!runs_overlap(&[(0, 10)], &[(10, 10)]));
        assert!(runs_overlap(&[(0, 11)], &[(10, 10)]));
        assert!(runs_overlap(&[(0, 2), (8, 4)], &[(3, 6)]));
        assert!(!runs_overlap(&[(0, 2), (8, 4)], &[(2, 6)]));
    }
}
