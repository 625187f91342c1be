//! The GPU device: memory with accounting and a budget, streams and events.

use crate::probe::{info, GpuInfo};
use crate::staging::{Staging, StagingConfig};
use crossbeam_channel::{bounded, Receiver, Sender};
use cudarc::driver::sys::{self, CUdevice_attribute as Attr, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use parking_lot::Mutex;
use std::any::Any;
use std::fmt;
use std::sync::Arc;
use tier_api::{
    Access, DType, Device, DeviceKind, Error, MemAccount, MemStats, Reservation, Result, Shape, Storage, Tensor,
};
use tier_host::cuda::{driver_error, driver_reason, require_driver};

/// Most copy streams one GPU keeps.
pub const MAX_STREAMS: usize = 64;

/// How to open a GPU.
#[derive(Clone, Debug)]
pub struct GpuConfig {
    pub ordinal: u32,
    /// Bytes of GPU memory the tier may hold (`--gpu-mem`); `None` for the
    /// whole card. A budget lets a small card be simulated on a large one.
    pub budget: Option<u64>,
    /// Copy streams in the pool (1..=[`MAX_STREAMS`]); copies beyond this
    /// many at once wait for a stream.
    pub streams: usize,
    /// The pinned staging ring for pageable memory and disks.
    pub staging: StagingConfig,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig { ordinal: 0, budget: None, streams: 8, staging: StagingConfig::default() }
    }
}

/// One GPU as a tier.
pub struct GpuDevice {
    pub(crate) shared: Arc<GpuShared>,
}

/// What a GPU's storages and routes share.
pub(crate) struct GpuShared {
    pub ordinal: u32,
    pub tier: String,
    pub ctx: Arc<CudaContext>,
    pub account: Arc<MemAccount>,
    pub info: GpuInfo,
    /// The largest pitch a 2D copy may use.
    pub max_pitch: u64,
    streams: StreamPool,
    staging_config: StagingConfig,
    staging: Mutex<Option<Arc<Staging>>>,
}

impl fmt::Debug for GpuShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuShared").field("tier", &self.tier).field("info", &self.info).finish_non_exhaustive()
    }
}

impl fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl GpuDevice {
    /// Opens GPU `config.ordinal`: retains its primary context and creates
    /// the copy streams. The staging ring is made on first use.
    pub fn new(config: GpuConfig) -> Result<Arc<Self>> {
        let version = require_driver("the GPU tier")?;
        let tier = DeviceKind::Gpu { ordinal: config.ordinal }.to_string();
        if config.streams == 0 || config.streams > MAX_STREAMS {
            return Err(Error::Config(format!(
                "{tier}: {} copy streams asked; 1..={MAX_STREAMS} allowed",
                config.streams
            )));
        }
        config.staging.validate()?;
        let count =
            cudarc::driver::result::device::get_count().map_err(|e| driver_error(&tier, "cuDeviceGetCount", e))?;
        if config.ordinal as i64 >= count as i64 {
            return Err(Error::Config(format!("{tier} does not exist: the driver sees {count} GPU(s)")));
        }
        let info = info(config.ordinal, version, count.max(0) as u32)?;
        let ctx = CudaContext::new(config.ordinal as usize)
            .map_err(|e| driver_error(&tier, "cuDevicePrimaryCtxRetain", e))?;
        let max_pitch = ctx
            .attribute(Attr::CU_DEVICE_ATTRIBUTE_MAX_PITCH)
            .map_err(|e| driver_error(&tier, "cuDeviceGetAttribute", e))?
            .max(0) as u64;
        let streams = StreamPool::new(&ctx, &tier, config.streams)?;
        let account = MemAccount::new(tier.clone(), config.budget);
        Ok(Arc::new(GpuDevice {
            shared: Arc::new(GpuShared {
                ordinal: config.ordinal,
                tier,
                ctx,
                account,
                info,
                max_pitch,
                streams,
                staging_config: config.staging,
                staging: Mutex::new(None),
            }),
        }))
    }

    pub fn ordinal(&self) -> u32 {
        self.shared.ordinal
    }

    pub fn info(&self) -> &GpuInfo {
        &self.shared.info
    }

    /// The driver context (the device's primary context).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.shared.ctx
    }

    /// Free and total device memory as the driver sees it (all processes).
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        self.shared.mem_info()
    }

    /// A new non-blocking stream of this GPU's context.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.shared.ctx.new_stream().map_err(|e| driver_error(&self.shared.tier, "cuStreamCreate", e))
    }

    /// A new event (timing disabled unless `timing`).
    pub fn new_event(&self, timing: bool) -> Result<CudaEvent> {
        let flags =
            if timing { sys::CUevent_flags::CU_EVENT_DEFAULT } else { sys::CUevent_flags::CU_EVENT_DISABLE_TIMING };
        self.shared.ctx.new_event(Some(flags)).map_err(|e| driver_error(&self.shared.tier, "cuEventCreate", e))
    }

    /// Accounting of the pinned staging ring, once it exists.
    pub fn staging_stats(&self) -> Option<MemStats> {
        self.shared.staging.lock().as_ref().map(|s| s.stats())
    }

    /// How staged copies reach each disk they have used: one line per
    /// disk, saying whether the pinned slots are that disk's io_uring fixed
    /// buffers (and how many operations went through them) or why plain
    /// reads and writes serve it. Empty before the first staged disk copy.
    pub fn staged_disk_io(&self) -> Vec<String> {
        self.shared.staging.lock().as_ref().map(|s| s.disk_io()).unwrap_or_default()
    }

    /// The staging configuration this device was opened with.
    pub fn staging_config(&self) -> &StagingConfig {
        &self.shared.staging_config
    }

    /// The device address of a GPU tensor's first byte (for kernels and
    /// libraries); an error for tensors of other tiers or GPUs.
    pub fn device_ptr(&self, tensor: &Tensor) -> Result<CUdeviceptr> {
        let storage = GpuStorage::of(tensor.storage().as_ref())?;
        if storage.shared.ordinal != self.shared.ordinal {
            return Err(Error::WrongDevice { expected: self.kind(), found: tensor.device() });
        }
        Ok(storage.ptr)
    }
}

impl GpuShared {
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        self.ctx.bind_to_thread().map_err(|e| driver_error(&self.tier, "cuCtxSetCurrent", e))?;
        let (free, total) =
            cudarc::driver::result::mem_get_info().map_err(|e| driver_error(&self.tier, "cuMemGetInfo", e))?;
        Ok((free as u64, total as u64))
    }

    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_error(&self.tier, "cuCtxSetCurrent", e))
    }

    pub fn stream(&self) -> Result<StreamLease<'_>> {
        self.streams.acquire(&self.tier)
    }

    /// The staging ring, made on first use.
    pub fn staging(&self) -> Result<Arc<Staging>> {
        let mut slot = self.staging.lock();
        if let Some(s) = slot.as_ref() {
            return Ok(Arc::clone(s));
        }
        let s = Arc::new(Staging::new(&self.ctx, &self.tier, &self.staging_config)?);
        *slot = Some(Arc::clone(&s));
        Ok(s)
    }
}

/// Device memory granularity the accounting assumes: the driver backs
/// allocations of 2 MiB and more with 2 MiB pages and sub-allocates smaller
/// ones in 512-byte steps.
pub(crate) fn gpu_resident(len: u64) -> u64 {
    const LARGE: u64 = 2 << 20;
    let granule = if len >= LARGE { LARGE } else { 512 };
    len.div_ceil(granule) * granule
}

impl Device for GpuDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Gpu { ordinal: self.shared.ordinal }
    }

    fn describe(&self) -> String {
        let budget = match self.shared.account.budget() {
            Some(b) => format!("budget {:.2} GiB", b as f64 / (1u64 << 30) as f64),
            None => "no budget".into(),
        };
        let disks = self.staged_disk_io();
        if disks.is_empty() {
            format!("{} ({budget})", self.shared.info)
        } else {
            format!("{} ({budget}; staged disk I/O: {})", self.shared.info, disks.join("; "))
        }
    }

    fn allocate(&self, shape: &Shape, dtype: DType) -> Result<Tensor> {
        let len = shape.byte_size(dtype)? as u64;
        let reservation = self.shared.account.reserve(len, gpu_resident(len))?;
        let storage = GpuStorage::allocate(&self.shared, len, reservation)?;
        Tensor::from_storage(Arc::new(storage), shape.clone(), dtype)
    }

    fn account(&self) -> &Arc<MemAccount> {
        &self.shared.account
    }
}

/// Bytes of GPU memory from `cuMemAlloc`. Freed when the last tensor handle
/// and the last copy using it are gone.
pub struct GpuStorage {
    pub(crate) ptr: CUdeviceptr,
    len: u64,
    pub(crate) shared: Arc<GpuShared>,
    _reservation: Reservation,
}

impl fmt::Debug for GpuStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuStorage({}, {:#x}, {} bytes)", self.shared.tier, self.ptr, self.len)
    }
}

impl GpuStorage {
    fn allocate(shared: &Arc<GpuShared>, len: u64, reservation: Reservation) -> Result<Self> {
        let mut ptr = 0;
        if len > 0 {
            shared.bind()?;
            if tier_api::fault::alloc_fails(tier_api::fault::AllocSite::Gpu)? {
                // Refused as the driver refuses: the same error a real
                // out-of-memory gives, so the same paths handle it.
                let (free, total) = shared.mem_info().unwrap_or((0, 0));
                return Err(Error::OutOfMemory { tier: shared.tier.clone(), asked: len, free, budget: total });
            }
            // SAFETY: a context is current; the out-pointer is valid.
            let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, len as usize) }.result();
            if let Err(e) = r {
                if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                    let (free, total) = shared.mem_info().unwrap_or((0, 0));
                    return Err(Error::OutOfMemory { tier: shared.tier.clone(), asked: len, free, budget: total });
                }
                return Err(Error::AllocationFailed {
                    tier: shared.tier.clone(),
                    asked: len,
                    reason: format!("cuMemAlloc: {}", driver_reason(e)),
                });
            }
        }
        Ok(GpuStorage { ptr, len, shared: Arc::clone(shared), _reservation: reservation })
    }

    /// The GPU storage behind a storage, or an error naming what it is.
    pub(crate) fn of(storage: &dyn Storage) -> Result<&GpuStorage> {
        storage.as_any().downcast_ref::<GpuStorage>().ok_or_else(|| Error::Unsupported {
            what: format!("{} storage that is not tier-cuda's", storage.device()),
            hint: "allocate GPU tensors with tier_cuda::GpuDevice".into(),
        })
    }

    /// The device address of the first byte.
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    pub fn ordinal(&self) -> u32 {
        self.shared.ordinal
    }
}

impl Drop for GpuStorage {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        let _ = self.shared.bind();
        // SAFETY: allocated by cuMemAlloc in `allocate`, freed once; every
        // copy using it held the tensor and has finished.
        if let Err(e) = unsafe { sys::cuMemFree_v2(self.ptr) }.result() {
            tracing::warn!("cuMemFree of {} bytes on {} failed: {}", self.len, self.shared.tier, driver_reason(e));
        }
    }
}

impl Storage for GpuStorage {
    fn device(&self) -> DeviceKind {
        DeviceKind::Gpu { ordinal: self.shared.ordinal }
    }

    fn len(&self) -> usize {
        self.len as usize
    }

    fn access(&self) -> Access<'_> {
        Access::Opaque
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// How long [`StreamLease::finish`] polls a copy's event before it sleeps
/// on it.
pub(crate) const FINISH_POLL: std::time::Duration = std::time::Duration::from_micros(200);

/// A copy stream and the event that marks its work done.
pub(crate) struct PooledStream {
    pub stream: Arc<CudaStream>,
    pub done: CudaEvent,
}

/// A bounded set of copy streams handed out one per copy in flight.
struct StreamPool {
    free: Receiver<PooledStream>,
    back: Sender<PooledStream>,
}

impl StreamPool {
    fn new(ctx: &Arc<CudaContext>, tier: &str, n: usize) -> Result<Self> {
        let (back, free) = bounded(n);
        for _ in 0..n {
            let stream = ctx.new_stream().map_err(|e| driver_error(tier, "cuStreamCreate", e))?;
            // Blocking sync: a copy that outlasts the short poll in
            // `finish` sleeps instead of spinning a core (the context's
            // default with fewer contexts than cores).
            let done = ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                .map_err(|e| driver_error(tier, "cuEventCreate", e))?;
            back.send(PooledStream { stream, done }).map_err(|_| Error::Config("stream pool closed".into()))?;
        }
        Ok(StreamPool { free, back })
    }

    fn acquire(&self, tier: &str) -> Result<StreamLease<'_>> {
        let s = self.free.recv().map_err(|_| Error::Config(format!("{tier}: the stream pool is gone")))?;
        Ok(StreamLease { pool: self, stream: Some(s) })
    }
}

/// A stream borrowed from the pool; given back on drop. Whoever holds it
/// must have waited for its work before dropping it.
pub(crate) struct StreamLease<'a> {
    pool: &'a StreamPool,
    stream: Option<PooledStream>,
}

impl StreamLease<'_> {
    pub fn stream(&self) -> &Arc<CudaStream> {
        // The option is only emptied in Drop.
        match &self.stream {
            Some(s) => &s.stream,
            None => unreachable!("a stream lease holds its stream until dropped"),
        }
    }

    /// Records the done event after everything issued so far and waits for
    /// it: this stream's work only, never the whole device.
    ///
    /// The wait polls the event for [`FINISH_POLL`] (a small copy's DMA
    /// lands within it, and a sleeping thread would add a wake-up to its
    /// latency), then sleeps on it: a copy of megabytes (a layer's host
    /// rows, a staged disk copy's last slot) would otherwise spin a core
    /// for milliseconds, and eight copy workers spinning took cores that
    /// the CPU attention's pool and the staging helpers keeping the disk
    /// busy needed (issue 14).
    pub fn finish(&self, tier: &str) -> Result<()> {
        let Some(s) = &self.stream else { unreachable!("a stream lease holds its stream until dropped") };
        s.done.record(&s.stream).map_err(|e| driver_error(tier, "cuEventRecord", e))?;
        let failed = |e| driver_error(tier, "cuEventSynchronize (a copy on the stream failed)", e);
        let start = std::time::Instant::now();
        while start.elapsed() < FINISH_POLL {
            if s.done.try_is_complete().map_err(failed)? {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        s.done.synchronize().map_err(failed)
    }
}

impl Drop for StreamLease<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = self.pool.back.send(s);
        }
    }
}
