//! The copy-matrix routes that involve a GPU.
//!
//! - [`CopyPath::Dma`]: pinned or registered host memory and the GPU, one
//!   `cuMemcpyAsync` per contiguous piece (a `cuMemcpy2DAsync` per regular
//!   strided group) on a copy stream from the device's pool, finished with an
//!   event on that stream.
//! - [`CopyPath::PinnedRelay`]: pageable host memory and the GPU through the
//!   pinned staging ring; helper threads `memcpy` into (out of) some slots
//!   while the GPU moves others.
//! - [`CopyPath::StagedDisk`]: a disk and the GPU through the same ring,
//!   with `BlockIo` reads and writes in place of the `memcpy`. The first
//!   staged copy with a disk registers the slots with its `BlockIo`, so that
//!   io_uring moves bytes straight between the disk and the slots as fixed
//!   buffers; disks that cannot are served by plain reads and writes.
//! - [`CopyPath::DeviceToDevice`]: within one GPU or between two.
//!
//! Every route returns only when all it issued has completed, successfully
//! or not, so a copy handle's error means nothing is still writing.

use crate::device::{GpuShared, GpuStorage};
use crate::plan::{far_extents, group_rects, pack, Layout, Piece, Rect};
use crate::staging::{HelperTask, Slot, Staging};
use crossbeam_channel::bounded;
use cudarc::driver::result::DriverError;
use cudarc::driver::sys::{self, CUdeviceptr, CUstream};
use std::ffi::c_void;
use std::sync::Arc;
use tier_api::{Access, CopyJob, CopyMatrix, CopyPath, CopyRoute, DeviceKind, Error, Result, Run, Tensor};
use tier_host::cuda::driver_error;

/// The GPU routes, to add to a copy matrix.
pub fn routes() -> Vec<Arc<dyn CopyRoute>> {
    vec![Arc::new(DmaRoute), Arc::new(RelayRoute), Arc::new(StagedDiskRoute), Arc::new(DeviceToDeviceRoute)]
}

/// Adds the GPU routes to `matrix` (ahead of the built-in ones).
pub fn register_routes(matrix: &mut CopyMatrix) {
    for r in routes() {
        matrix.add_route(r);
    }
}

/// One side of a driver copy.
#[derive(Clone, Copy, Debug)]
pub(crate) enum End {
    Host(*mut u8),
    Dev(CUdeviceptr),
}

impl End {
    fn at(self, offset: u64) -> End {
        match self {
            // The pointer is only formed, not dereferenced, here; offsets
            // were checked against the storage before any copy is issued.
            End::Host(p) => End::Host(p.wrapping_add(offset as usize)),
            End::Dev(d) => End::Dev(d + offset),
        }
    }
}

/// Issues one rectangle on `stream`.
///
/// # Safety
/// Both ends must be valid for the rectangle's bytes until the stream's work
/// completes; host ends must stay mapped (and, for async behaviour, be
/// page-locked).
pub(crate) unsafe fn issue(src: End, dst: End, r: &Rect, stream: CUstream) -> std::result::Result<(), DriverError> {
    let (src, dst) = (src.at(r.src), dst.at(r.dst));
    let w = r.width as usize;
    // SAFETY (all calls below): forwarded from the caller's contract; the
    // pointers cover `width` bytes per row, `height` rows at the pitches.
    unsafe {
        if r.height == 1 {
            return match (src, dst) {
                (End::Host(s), End::Dev(d)) => sys::cuMemcpyHtoDAsync_v2(d, s as *const c_void, w, stream).result(),
                (End::Dev(s), End::Host(d)) => sys::cuMemcpyDtoHAsync_v2(d as *mut c_void, s, w, stream).result(),
                (End::Dev(s), End::Dev(d)) => sys::cuMemcpyDtoDAsync_v2(d, s, w, stream).result(),
                (End::Host(s), End::Host(d)) => {
                    sys::cuMemcpyAsync(d as CUdeviceptr, s as CUdeviceptr, w, stream).result()
                }
            };
        }
        let (src_type, src_host, src_dev) = match src {
            End::Host(s) => (sys::CUmemorytype::CU_MEMORYTYPE_HOST, s as *const c_void, 0),
            End::Dev(s) => (sys::CUmemorytype::CU_MEMORYTYPE_DEVICE, std::ptr::null(), s),
        };
        let (dst_type, dst_host, dst_dev) = match dst {
            End::Host(d) => (sys::CUmemorytype::CU_MEMORYTYPE_HOST, d as *mut c_void, 0),
            End::Dev(d) => (sys::CUmemorytype::CU_MEMORYTYPE_DEVICE, std::ptr::null_mut(), d),
        };
        let p = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: src_type,
            srcHost: src_host,
            srcDevice: src_dev,
            srcArray: std::ptr::null_mut(),
            srcPitch: r.src_pitch as usize,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: dst_type,
            dstHost: dst_host,
            dstDevice: dst_dev,
            dstArray: std::ptr::null_mut(),
            dstPitch: r.dst_pitch as usize,
            WidthInBytes: w,
            Height: r.height as usize,
        };
        sys::cuMemcpy2DAsync_v2(&p, stream).result()
    }
}

fn out_of_span(job: &CopyJob) -> Error {
    Error::Config(format!(
        "a copy run from {} to {} lies outside its storage; this is a bug in view planning",
        job.src.device(),
        job.dst.device()
    ))
}

/// Checks every run against both storages' lengths.
fn check_runs(job: &CopyJob) -> Result<()> {
    let (sl, dl) = (job.src.tensor().byte_len() as u64, job.dst.tensor().byte_len() as u64);
    let fits = |off: u64, len: u64, total: u64| off.checked_add(len).is_some_and(|end| end <= total);
    if job.runs.iter().all(|r| fits(r.src, r.len, sl) && fits(r.dst, r.len, dl)) {
        Ok(())
    } else {
        Err(out_of_span(job))
    }
}

fn bad_access(job: &CopyJob) -> Error {
    Error::NoRoute {
        src: job.src.device(),
        dst: job.dst.device(),
        why: "a storage did not offer the access its tier promises".into(),
    }
}

fn host_ptr(t: &Tensor, job: &CopyJob) -> Result<*mut u8> {
    match t.storage().access() {
        Access::Host(span) => Ok(span.as_ptr()),
        _ => Err(bad_access(job)),
    }
}

/// Issues `rects` on a pooled stream of `shared` and waits for them.
fn run_rects(shared: &GpuShared, src: End, dst: End, rects: &[Rect]) -> Result<()> {
    shared.bind()?;
    let lease = shared.stream()?;
    let stream = lease.stream().cu_stream();
    let mut first = None;
    for r in rects {
        // SAFETY: runs were checked against both storages, which the job
        // holds until this returns, after the stream's work has finished.
        if let Err(e) = unsafe { issue(src, dst, r, stream) } {
            first = Some(driver_error(&shared.tier, "cuMemcpyAsync", e));
            break;
        }
    }
    let finished = lease.finish(&shared.tier);
    match first {
        Some(e) => Err(e),
        None => finished,
    }
}

fn triples(runs: &[Run]) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    runs.iter().map(|r| (r.src, r.dst, r.len))
}

/// Page-locked host memory and the GPU, by DMA.
struct DmaRoute;

impl CopyRoute for DmaRoute {
    fn path(&self) -> CopyPath {
        CopyPath::Dma
    }

    fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool {
        let locked = |k: DeviceKind| matches!(k, DeviceKind::Host { mem } if mem.is_page_locked());
        (locked(src) && dst.is_gpu()) || (src.is_gpu() && locked(dst))
    }

    fn run(&self, job: &CopyJob) -> Result<()> {
        check_runs(job)?;
        let (src, dst) = (job.src.tensor(), job.dst.tensor());
        if src.device().is_gpu() {
            let gpu = GpuStorage::of(src.storage().as_ref())?;
            let rects = group_rects(triples(&job.runs), gpu.shared.max_pitch);
            run_rects(&gpu.shared, End::Dev(gpu.ptr), End::Host(host_ptr(dst, job)?), &rects)
        } else {
            let gpu = GpuStorage::of(dst.storage().as_ref())?;
            let rects = group_rects(triples(&job.runs), gpu.shared.max_pitch);
            run_rects(&gpu.shared, End::Host(host_ptr(src, job)?), End::Dev(gpu.ptr), &rects)
        }
    }
}

/// GPU to GPU.
struct DeviceToDeviceRoute;

impl CopyRoute for DeviceToDeviceRoute {
    fn path(&self) -> CopyPath {
        CopyPath::DeviceToDevice
    }

    fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool {
        src.is_gpu() && dst.is_gpu()
    }

    fn run(&self, job: &CopyJob) -> Result<()> {
        check_runs(job)?;
        let s = GpuStorage::of(job.src.tensor().storage().as_ref())?;
        let d = GpuStorage::of(job.dst.tensor().storage().as_ref())?;
        if s.shared.ordinal == d.shared.ordinal {
            let rects = group_rects(triples(&job.runs), d.shared.max_pitch);
            return run_rects(&d.shared, End::Dev(s.ptr), End::Dev(d.ptr), &rects);
        }
        // Between two GPUs: peer copies on the destination's stream (the
        // driver goes through the host when peer access is off).
        d.shared.bind()?;
        let lease = d.shared.stream()?;
        let stream = lease.stream().cu_stream();
        let mut first = None;
        for r in &job.runs {
            // SAFETY: runs checked against both storages, held by the job
            // until the stream's work has finished below.
            let res = unsafe {
                sys::cuMemcpyPeerAsync(
                    d.ptr + r.dst,
                    d.shared.ctx.cu_ctx(),
                    s.ptr + r.src,
                    s.shared.ctx.cu_ctx(),
                    r.len as usize,
                    stream,
                )
            }
            .result();
            if let Err(e) = res {
                first = Some(driver_error(&d.shared.tier, "cuMemcpyPeerAsync", e));
                break;
            }
        }
        let finished = lease.finish(&d.shared.tier);
        match first {
            Some(e) => Err(e),
            None => finished,
        }
    }
}

/// Pageable host memory and the GPU, through pinned staging.
struct RelayRoute;

impl CopyRoute for RelayRoute {
    fn path(&self) -> CopyPath {
        CopyPath::PinnedRelay
    }

    fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool {
        let pageable = |k: DeviceKind| matches!(k, DeviceKind::Host { mem } if !mem.is_page_locked());
        (pageable(src) && dst.is_gpu()) || (src.is_gpu() && pageable(dst))
    }

    fn run(&self, job: &CopyJob) -> Result<()> {
        staged(job, CopyPath::PinnedRelay)
    }
}

/// A disk and the GPU, through pinned staging.
struct StagedDiskRoute;

impl CopyRoute for StagedDiskRoute {
    fn path(&self) -> CopyPath {
        CopyPath::StagedDisk
    }

    fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool {
        (src.is_disk() && dst.is_gpu()) || (src.is_gpu() && dst.is_disk())
    }

    fn run(&self, job: &CopyJob) -> Result<()> {
        staged(job, CopyPath::StagedDisk)
    }
}

/// Which way a staged copy goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToGpu,
    FromGpu,
}

/// A copy through the staging ring.
fn staged(job: &CopyJob, path: CopyPath) -> Result<()> {
    check_runs(job)?;
    let (src, dst) = (job.src.tensor(), job.dst.tensor());
    let (dir, gpu, far) = if dst.device().is_gpu() {
        (Dir::ToGpu, GpuStorage::of(dst.storage().as_ref())?, src)
    } else {
        (Dir::FromGpu, GpuStorage::of(src.storage().as_ref())?, dst)
    };
    // (far, gpu, len) triples.
    let runs: Vec<(u64, u64, u64)> = match dir {
        Dir::ToGpu => job.runs.iter().map(|r| (r.src, r.dst, r.len)).collect(),
        Dir::FromGpu => job.runs.iter().map(|r| (r.dst, r.src, r.len)).collect(),
    };
    if runs.is_empty() {
        return Ok(());
    }
    let shared = &gpu.shared;
    shared.bind()?;
    let staging = shared.staging()?;
    // Making the ring may have bound the host context; copies run in this GPU's.
    shared.bind()?;
    if let Access::Block { io, .. } = far.storage().access() {
        // The slots become the disk's fixed buffers on first use.
        staging.use_disk(io);
    }
    let layout = if dir == Dir::ToGpu && far.device().is_disk() {
        Layout::Spans { max_gap: staging.max_read_gap }
    } else {
        Layout::Tight
    };
    let (pieces, loads) = pack(runs, staging.slot_bytes as u64, layout);
    let pieces = Arc::new(pieces);
    // Disk reads stay at the disk's depth; a slot or two more lets the DMA of
    // finished reads overlap the next ones.
    let in_flight = if matches!(layout, Layout::Spans { .. }) { staging.disk_reads } else { usize::MAX };
    let lease = shared.stream()?;
    let slots = staging.acquire(loads.len().min(in_flight.saturating_add(2)));
    let mut pipe = Pipe {
        shared,
        staging: &staging,
        gpu: End::Dev(gpu.ptr),
        stream: lease.stream().cu_stream(),
        path,
        far,
        pieces: &pieces,
        error: None,
    };
    if loads.len() == 1 {
        // One slot's worth: no hand-off to a helper.
        let slot = &slots.slots[0];
        let load = &loads[0];
        let ps = &pieces[load.pieces.clone()];
        match dir {
            Dir::ToGpu => {
                let filled = fill(far, slot, ps, load.span);
                if pipe.note(filled) {
                    pipe.dma(Dir::ToGpu, slot, ps);
                }
            }
            Dir::FromGpu => {
                pipe.dma(Dir::FromGpu, slot, ps);
                if pipe.error.is_none() {
                    // The DMA is the stream's last work: wait on the stream's
                    // event, polled before it sleeps, quicker for small
                    // copies than the slot's (which sleeps at once).
                    let waited = lease.finish(&shared.tier);
                    if pipe.note(waited) {
                        let drained = drain(far, slot, ps);
                        pipe.note(drained);
                    }
                }
            }
        }
    } else {
        pipe.pipeline(dir, &slots.slots, &loads, in_flight);
    }
    // Everything issued on the stream completes before the slots go back.
    let finished = lease.finish(&shared.tier);
    drop(slots);
    match pipe.error {
        Some(e) => Err(e),
        None => finished,
    }
}

/// The state of one staged copy.
struct Pipe<'a> {
    shared: &'a GpuShared,
    staging: &'a Staging,
    gpu: End,
    stream: CUstream,
    path: CopyPath,
    far: &'a Tensor,
    pieces: &'a Arc<Vec<Piece>>,
    /// The first failure; once set, nothing new starts.
    error: Option<Error>,
}

impl Pipe<'_> {
    /// Records a failure; whether `r` was a success.
    fn note(&mut self, r: Result<()>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                self.error.get_or_insert(e);
                false
            }
        }
    }

    /// Issues the DMA of one load between its slot and the GPU, then records
    /// the slot's event after it.
    fn dma(&mut self, dir: Dir, slot: &Slot, pieces: &[Piece]) {
        let max_pitch = self.shared.max_pitch;
        let (src, dst, rects) = match dir {
            Dir::ToGpu => {
                (End::Host(slot.ptr()), self.gpu, group_rects(pieces.iter().map(|p| (p.slot, p.gpu, p.len)), max_pitch))
            }
            Dir::FromGpu => {
                (self.gpu, End::Host(slot.ptr()), group_rects(pieces.iter().map(|p| (p.gpu, p.slot, p.len)), max_pitch))
            }
        };
        for r in &rects {
            // SAFETY: pieces lie inside the slot (planning) and inside the GPU
            // storage (runs checked); the slot is held by this copy until the
            // stream has finished, and the GPU storage by the job.
            if let Err(e) = unsafe { issue(src, dst, r, self.stream) } {
                self.error.get_or_insert(driver_error(&self.shared.tier, "cuMemcpyAsync (staged)", e));
                return;
            }
        }
        // SAFETY: the event and the stream belong to this GPU's context.
        let recorded = unsafe { cudarc::driver::result::event::record(slot.event.cu_event(), self.stream) };
        if let Err(e) = recorded {
            self.error.get_or_insert(driver_error(&self.shared.tier, "cuEventRecord", e));
        }
    }

    /// Keeps every borrowed slot busy: helpers fill (drain) slots while the
    /// GPU moves others, until every load has gone through or one failed.
    /// At most `in_flight` helper tasks run for this copy at once.
    fn pipeline(&mut self, dir: Dir, slots: &[Arc<Slot>], loads: &[crate::plan::Load], in_flight: usize) {
        let all: &Vec<Piece> = self.pieces;
        let (reply, replies) = bounded::<(usize, Result<()>)>(slots.len());
        let mut free: Vec<usize> = (0..slots.len()).rev().collect();
        let mut slot_of = vec![0usize; loads.len()];
        let mut next = 0;
        let mut outstanding = 0usize;
        loop {
            while self.error.is_none() && next < loads.len() && outstanding < in_flight {
                let Some(si) = free.pop() else { break };
                let slot = Arc::clone(&slots[si]);
                let load = &loads[next];
                if dir == Dir::FromGpu {
                    self.dma(dir, &slot, &all[load.pieces.clone()]);
                    if self.error.is_some() {
                        free.push(si);
                        break;
                    }
                }
                let far = self.far.clone();
                let pieces = Arc::clone(self.pieces);
                let (range, span) = (load.pieces.clone(), load.span);
                let tier = self.shared.tier.clone();
                let work: Box<dyn FnOnce() -> Result<()> + Send> = Box::new(move || {
                    // Filling: wait until the slot's last DMA has read it.
                    // Draining: wait until the DMA into it has landed.
                    slot.event.synchronize().map_err(|e| driver_error(&tier, "cuEventSynchronize (staged copy)", e))?;
                    match dir {
                        Dir::ToGpu => fill(&far, &slot, &pieces[range], span),
                        Dir::FromGpu => drain(&far, &slot, &pieces[range]),
                    }
                });
                slot_of[next] = si;
                let task = HelperTask { tag: next, path: self.path, work, reply: reply.clone() };
                if let Err(e) = self.staging.submit(task) {
                    // A FromGpu slot has a DMA in flight; it stays out of the
                    // free list, and the stream is finished before return.
                    self.error.get_or_insert(e);
                    break;
                }
                next += 1;
                outstanding += 1;
            }
            if outstanding == 0 {
                break;
            }
            let Ok((li, result)) = replies.recv() else {
                self.error.get_or_insert(Error::WorkerLost { path: self.path });
                break;
            };
            outstanding -= 1;
            let si = slot_of[li];
            if self.note(result) && dir == Dir::ToGpu && self.error.is_none() {
                let load = &loads[li];
                let slot = Arc::clone(&slots[si]);
                self.dma(dir, &slot, &all[load.pieces.clone()]);
            }
            free.push(si);
        }
    }
}

/// Moves one load's bytes from the far side into its slot.
fn fill(far: &Tensor, slot: &Slot, pieces: &[Piece], span: Option<(u64, u64)>) -> Result<()> {
    match far.storage().access() {
        Access::Host(s) => {
            for (f, at, len) in far_extents(pieces) {
                // SAFETY: the slot is this copy's and no DMA uses it (its event
                // was waited for); the source range lies in the storage (runs
                // checked) and nobody writes it during the copy (matrix contract).
                let (from, to) =
                    unsafe { (s.slice(f as usize, len as usize), slot.bytes_mut(at as usize, len as usize)?) };
                to.copy_from_slice(from.ok_or_else(|| Error::Config("relay source out of range".into()))?);
            }
            Ok(())
        }
        Access::Block { io, base } => match span {
            Some((start, len)) => {
                // SAFETY: as above, for the slot.
                let to = unsafe { slot.bytes_mut(0, len as usize)? };
                io.read_at(base + start, to)
            }
            None => {
                for (f, at, len) in far_extents(pieces) {
                    // SAFETY: as above, for the slot.
                    let to = unsafe { slot.bytes_mut(at as usize, len as usize)? };
                    io.read_at(base + f, to)?;
                }
                Ok(())
            }
        },
        Access::Opaque => Err(Error::Unsupported {
            what: format!("staging from {} memory", far.device()),
            hint: "only host and disk tiers stage through pinned buffers".into(),
        }),
    }
}

/// Moves one load's bytes from its slot to the far side.
fn drain(far: &Tensor, slot: &Slot, pieces: &[Piece]) -> Result<()> {
    match far.storage().access() {
        Access::Host(d) => {
            for (f, at, len) in far_extents(pieces) {
                // SAFETY: the DMA into the slot has completed (event waited);
                // the destination range lies in the storage and is written only
                // by this copy (matrix contract).
                let (from, to) =
                    unsafe { (slot.bytes_mut(at as usize, len as usize)?, d.slice_mut(f as usize, len as usize)) };
                to.ok_or_else(|| Error::Config("relay destination out of range".into()))?.copy_from_slice(from);
            }
            Ok(())
        }
        Access::Block { io, base } => {
            for (f, at, len) in far_extents(pieces) {
                // SAFETY: as above, for the slot.
                let from = unsafe { slot.bytes_mut(at as usize, len as usize)? };
                io.write_at(base + f, from)?;
            }
            Ok(())
        }
        Access::Opaque => Err(Error::Unsupported {
            what: format!("staging into {} memory", far.device()),
            hint: "only host and disk tiers stage through pinned buffers".into(),
        }),
    }
}
