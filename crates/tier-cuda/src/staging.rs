//! The pinned staging ring and the helper threads that fill and drain it.
//!
//! Pageable memory and disks cannot be the target of DMA, so their copies
//! to and from the GPU pass through a fixed set of pinned slots. A copy
//! borrows up to all of them: while the GPU moves one slot, helper threads
//! fill (or drain) the others with `memcpy` or disk I/O. Each slot has an
//! event that marks the end of the DMA that last used it. The slots are
//! registered with each disk they serve (io_uring fixed buffers where the
//! disk's backend can), and the registrations go before the slots do.
//! Everything here is bounded: the number and size of slots, the helper
//! threads and their queue, the disks registered with.

use crossbeam_channel::{bounded, Receiver, Sender};
use cudarc::driver::{sys, CudaContext, CudaEvent};
use parking_lot::{Condvar, Mutex};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use tier_api::{
    Access, BlockIo, CopyPath, Device, Error, FixedBuffers, HostMemKind, HostSpan, MemStats, Result, Tensor,
};
use tier_host::cuda::driver_error;
use tier_host::{HostConfig, HostDevice};

/// Limits on the ring.
pub const MAX_SLOTS: usize = 64;
pub const MIN_SLOT_BYTES: usize = 4096;
pub const MAX_SLOT_BYTES: usize = 256 << 20;
pub const MAX_HELPERS: usize = 64;
/// Disks one ring remembers registering its slots with (or not).
pub const MAX_FIXED_DISKS: usize = 8;

/// The shape of the staging ring of one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagingConfig {
    /// Pinned buffers (1..=[`MAX_SLOTS`]).
    pub slots: usize,
    /// Bytes per buffer, a multiple of 4096 ([`MIN_SLOT_BYTES`]..=[`MAX_SLOT_BYTES`]).
    pub slot_bytes: usize,
    /// Threads that fill and drain slots (1..=[`MAX_HELPERS`]): how many
    /// `memcpy`s or disk requests run at once.
    pub helpers: usize,
    /// For reads from disk: gaps between wanted ranges up to this many bytes
    /// are read too, so that one request serves many pieces.
    pub max_read_gap: u64,
    /// Disk reads (one slot each) one copy keeps in flight (1..=`slots`).
    /// The disk tier already splits each read into chunks kept in flight at
    /// its queue depth; more reads at once interleave several streams, which
    /// measured slower on the H100 host's virtio disk (1: 100-103% of the
    /// disk's own read rate, 4: 89-92%). Raise it for a disk that needs more
    /// depth than one slot's worth of chunks.
    pub disk_reads: usize,
}

impl Default for StagingConfig {
    /// 16 slots of 8 MiB (128 MiB pinned) and up to 12 helpers, three
    /// quarters of the cores: measured on an H100 host with 16 cores as the
    /// best of the shapes tried for the pageable relay, both ways; one disk
    /// read in flight (see `disk_reads`).
    ///
    /// `TIERLM_DISK_READS` sets `disk_reads` (for measuring; a value that
    /// is not a number in 1..=16 is refused by [`StagingConfig::validate`]).
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4);
        StagingConfig {
            slots: 16,
            slot_bytes: 8 << 20,
            helpers: (cores * 3 / 4).clamp(2, 12),
            max_read_gap: 64 << 10,
            disk_reads: disk_reads_from_env(std::env::var(DISK_READS_ENV).ok().as_deref()),
        }
    }
}

/// Environment variable that sets [`StagingConfig::disk_reads`] for
/// measurements (scripts/case-c-probe.sh).
pub const DISK_READS_ENV: &str = "TIERLM_DISK_READS";

/// `disk_reads` from the variable's value: 1 when unset or empty, 0 (which
/// `validate` refuses, naming the variable) when it is not a number.
fn disk_reads_from_env(value: Option<&str>) -> usize {
    match value.map(str::trim) {
        None | Some("") => 1,
        Some(v) => v.parse().unwrap_or(0),
    }
}

impl StagingConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("staging ring: {what}")));
        if self.slots == 0 || self.slots > MAX_SLOTS {
            return bad(format!("{} slots; 1..={MAX_SLOTS} allowed", self.slots));
        }
        if self.slot_bytes < MIN_SLOT_BYTES || self.slot_bytes > MAX_SLOT_BYTES || self.slot_bytes & 4095 != 0 {
            return bad(format!(
                "slots of {} bytes; a multiple of 4096 in {MIN_SLOT_BYTES}..={MAX_SLOT_BYTES} allowed",
                self.slot_bytes
            ));
        }
        if self.disk_reads == 0 || self.disk_reads > self.slots {
            return bad(format!(
                "{} disk reads in flight; 1..={} (the slots) allowed (check {DISK_READS_ENV} if it is set)",
                self.disk_reads, self.slots
            ));
        }
        if self.helpers == 0 || self.helpers > MAX_HELPERS {
            return bad(format!("{} helper threads; 1..={MAX_HELPERS} allowed", self.helpers));
        }
        Ok(())
    }

    /// Pinned bytes the ring holds.
    pub fn pinned_bytes(&self) -> u64 {
        (self.slots * self.slot_bytes) as u64
    }
}

/// One pinned staging buffer and the event after its last DMA.
pub(crate) struct Slot {
    /// Owns the pinned bytes `ptr` points into.
    _buffer: Tensor,
    ptr: *mut u8,
    pub len: usize,
    pub event: CudaEvent,
}

// SAFETY: the pointer is into `buffer`, owned by the slot; whoever holds the
// slot (a lease, then one task at a time) is the only one touching it.
unsafe impl Send for Slot {}
// SAFETY: as above.
unsafe impl Sync for Slot {}

impl Slot {
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The slot's bytes `offset..offset + len`.
    ///
    /// # Safety
    /// The caller holds the slot, no DMA into or out of these bytes is
    /// pending, and nobody else uses the slot meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: usize, len: usize) -> Result<&mut [u8]> {
        match offset.checked_add(len) {
            // SAFETY: in range of the pinned buffer; exclusive (caller contract).
            Some(end) if end <= self.len => Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }),
            _ => Err(Error::Config("a staging piece lies outside its slot; this is a bug in copy planning".into())),
        }
    }
}

/// A unit of helper work: runs once, its result goes back tagged.
pub(crate) struct HelperTask {
    pub tag: usize,
    pub path: CopyPath,
    pub work: Box<dyn FnOnce() -> Result<()> + Send>,
    pub reply: Sender<(usize, Result<()>)>,
}

/// What became of registering the slots with one disk's `BlockIo`.
enum FixedState {
    /// The slots are the disk's fixed buffers until this is dropped.
    Registered(Box<dyn FixedBuffers>),
    /// Plain reads and writes, and why.
    Plain(String),
}

struct FixedDisk {
    /// The `BlockIo`'s address and tier: which disk this is. An address can
    /// come back for another disk once the first is gone; a registration
    /// says when its disk went (`active`).
    key: usize,
    tier: String,
    state: FixedState,
}

impl FixedDisk {
    fn describe(&self) -> String {
        match &self.state {
            FixedState::Registered(r) => {
                format!("{}: slots are io_uring fixed buffers ({}; {} ops)", self.tier, r.describe(), r.ops())
            }
            FixedState::Plain(why) => format!("{}: plain reads and writes ({why})", self.tier),
        }
    }
}

/// The ring of one GPU.
pub(crate) struct Staging {
    host: Arc<HostDevice>,
    /// The slots' memory, for registration with disks.
    spans: Vec<HostSpan>,
    /// Registrations with disks, at most [`MAX_FIXED_DISKS`]. Declared
    /// before the slots, and emptied first in `Drop`: every registration
    /// goes before the pinned memory it covers is freed.
    fixed: Mutex<Vec<FixedDisk>>,
    free: Mutex<Vec<Arc<Slot>>>,
    returned: Condvar,
    tasks: Sender<HelperTask>,
    pub slot_bytes: usize,
    pub max_read_gap: u64,
    pub disk_reads: usize,
}

impl Staging {
    pub fn new(ctx: &Arc<CudaContext>, tier: &str, config: &StagingConfig) -> Result<Self> {
        config.validate()?;
        let host = HostDevice::new(HostConfig { kind: HostMemKind::Pinned, budget: None, alignment: 4096 })?;
        let mut slots = Vec::with_capacity(config.slots);
        let mut spans = Vec::with_capacity(config.slots);
        for _ in 0..config.slots {
            let buffer = host.allocate_bytes(config.slot_bytes)?;
            let Access::Host(span) = buffer.storage().access() else {
                return Err(Error::Config("pinned staging memory is not host-addressable".into()));
            };
            // Blocking sync: a helper waiting for a slot's DMA sleeps instead
            // of spinning on a core that other helpers need for memcpy.
            let event = ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                .map_err(|e| driver_error(tier, "cuEventCreate", e))?;
            spans.push(span);
            slots.push(Arc::new(Slot { ptr: span.as_ptr(), len: config.slot_bytes, _buffer: buffer, event }));
        }
        // Each copy keeps at most as many tasks queued as it holds slots, so
        // a queue as long as the ring never blocks a copy for long.
        let (tasks, queue) = bounded::<HelperTask>(config.slots.max(1));
        for i in 0..config.helpers {
            let queue = queue.clone();
            let ctx = Arc::clone(ctx);
            std::thread::Builder::new()
                .name(format!("tierlm-{tier}-staging-{i}"))
                .spawn(move || helper_loop(queue, ctx))
                .map_err(|e| Error::Config(format!("cannot start staging helper {i}: {e}")))?;
        }
        Ok(Staging {
            host,
            spans,
            fixed: Mutex::new(Vec::new()),
            free: Mutex::new(slots),
            returned: Condvar::new(),
            tasks,
            slot_bytes: config.slot_bytes,
            max_read_gap: config.max_read_gap,
            disk_reads: config.disk_reads,
        })
    }

    pub fn stats(&self) -> MemStats {
        self.host.stats()
    }

    /// Borrows between 1 and `want` slots, waiting until at least one is free.
    pub fn acquire(&self, want: usize) -> SlotLease<'_> {
        let mut free = self.free.lock();
        while free.is_empty() {
            self.returned.wait(&mut free);
        }
        let n = want.clamp(1, free.len());
        let at = free.len() - n;
        let slots = free.split_off(at);
        SlotLease { staging: self, slots }
    }

    /// Queues helper work; blocks while the queue is full.
    pub fn submit(&self, task: HelperTask) -> Result<()> {
        let path = task.path;
        self.tasks.send(task).map_err(|_| Error::WorkerLost { path })
    }

    /// Registers the slots with `io` the first time a staged copy uses that
    /// disk, so that its reads and writes into the slots go through io_uring
    /// fixed buffers; where the backend cannot (or the kernel refuses),
    /// remembers that and copies use plain reads and writes.
    pub fn use_disk(&self, io: &dyn BlockIo) {
        let key = (io as *const dyn BlockIo).cast::<()>() as usize;
        let tier = io.tier();
        let mut fixed = self.fixed.lock();
        // A registration whose disk is gone is of no use, and its address
        // may now be another disk's. One whose disk lives is never dropped
        // here: copies may be moving bytes through it.
        fixed.retain(|d| !matches!(&d.state, FixedState::Registered(r) if !r.active()));
        if fixed.iter().any(|d| d.key == key && d.tier == tier) {
            return;
        }
        // A disk not registered that sat at this address is gone.
        fixed.retain(|d| d.key != key || matches!(d.state, FixedState::Registered(_)));
        if fixed.len() >= MAX_FIXED_DISKS {
            // Forget the oldest disk that was not registered (it would be
            // asked again); registrations stay.
            match fixed.iter().position(|d| matches!(d.state, FixedState::Plain(_))) {
                Some(i) => drop(fixed.remove(i)),
                None => return,
            }
        }
        // SAFETY: the spans are the slots' pinned buffers, which stay
        // allocated and in place while the ring lives; the registration is
        // kept in `self.fixed`, which is emptied before the slots are freed
        // (`Drop`, and field order), or dropped earlier.
        let state = match unsafe { io.register_buffers(&self.spans) } {
            Ok(Some(r)) => FixedState::Registered(r),
            Ok(None) => FixedState::Plain("the disk backend cannot register memory".into()),
            Err(e) => {
                tracing::info!("{tier}: staging slots not registered as fixed buffers, using plain I/O: {e}");
                FixedState::Plain(format!("registration refused: {e}"))
            }
        };
        fixed.push(FixedDisk { key, tier, state });
    }

    /// One line per disk the slots met: fixed buffers or plain I/O, and why.
    pub fn disk_io(&self) -> Vec<String> {
        self.fixed.lock().iter().map(FixedDisk::describe).collect()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Registrations go before the slots' pinned memory.
        self.fixed.get_mut().clear();
    }
}

/// Slots borrowed by one copy; returned on drop. The copy must have waited
/// for every DMA and task using them before dropping the lease.
pub(crate) struct SlotLease<'a> {
    staging: &'a Staging,
    pub slots: Vec<Arc<Slot>>,
}

impl Drop for SlotLease<'_> {
    fn drop(&mut self) {
        let mut free = self.staging.free.lock();
        free.append(&mut self.slots);
        drop(free);
        self.staging.returned.notify_all();
    }
}

fn helper_loop(queue: Receiver<HelperTask>, ctx: Arc<CudaContext>) {
    // Slot events belong to this context; bind once.
    if let Err(e) = ctx.bind_to_thread() {
        tracing::warn!("staging helper cannot bind the GPU context: {e:?}");
    }
    for task in queue {
        let HelperTask { tag, path, work, reply } = task;
        let result = match catch_unwind(AssertUnwindSafe(work)) {
            Ok(r) => r,
            Err(panic) => Err(Error::WorkerPanicked { path, message: panic_text(&panic) }),
        };
        // The copy waits for every tag it queued; if it is gone, so is the need.
        let _ = reply.send((tag, result));
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_reads_from_the_environment() {
        assert_eq!(disk_reads_from_env(None), 1);
        assert_eq!(disk_reads_from_env(Some(" ")), 1);
        assert_eq!(disk_reads_from_env(Some("2")), 2);
        assert_eq!(disk_reads_from_env(Some("two")), 0);
        let refused = StagingConfig { disk_reads: disk_reads_from_env(Some("x")), ..StagingConfig::default() };
        assert!(refused.validate().unwrap_err().to_string().contains(DISK_READS_ENV));
    }

    #[test]
    fn config_limits() {
        assert!(StagingConfig::default().validate().is_ok());
        assert_eq!(StagingConfig::default().pinned_bytes(), 128 << 20);
        assert!(StagingConfig { disk_reads: 17, ..StagingConfig::default() }.validate().is_err());
        for bad in [
            StagingConfig { slots: 0, ..StagingConfig::default() },
            StagingConfig { slots: MAX_SLOTS + 1, ..StagingConfig::default() },
            StagingConfig { slot_bytes: 1000, ..StagingConfig::default() },
            StagingConfig { slot_bytes: 4097, ..StagingConfig::default() },
            StagingConfig { helpers: 0, ..StagingConfig::default() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
