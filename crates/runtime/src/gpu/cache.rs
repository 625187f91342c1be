//! The KV cache off the GPU, for any family: `--percent _ _ C_GPU C_CPU _
//! _` with `C_GPU < 100`, `--compress-cache` and `--cpu-cache-compute`.
//!
//! Each batch's cache ([`TieredCache`]) holds, per layer, keys and values
//! as [`SegmentedTensor`]s of shape `[batch, kv_heads, capacity,
//! head_dim]` in the family's 16-bit type `T` (f16 or bf16; the layout of
//! a resident GPU cache: one head of one sequence is a contiguous
//! `capacity × head_dim` block), split along the batch **in whole
//! sequences**: the first `C_GPU`% of the sequences in GPU memory, the next
//! `C_CPU`% in host memory, the rest on disk in `--offload-dir`. The number
//! of key/value heads and their width are the family's
//! ([`CacheShape`]; fewer heads than the queries under grouped-query
//! attention). Which positions hold real tokens stays on the GPU
//! ([`KeyMask`], a byte per position) with a host copy for the CPU's
//! attention.
//!
//! Computing a layer of a batch on the GPU ([`CacheStreamer::layer`]) goes
//! through one of two GPU slots, each one layer's cache for the largest
//! batch: the slot's previous contents are stored first (the positions the
//! previous compute appended, once its event says it has finished), then
//! the positions `0..past` of this batch's layer are loaded from every
//! segment, then the family computes the layer on the slot as on a
//! resident cache ([`SlotLayer`]) and appends the step's keys and values
//! there, to be stored when the slot is next used or at the step's end
//! ([`CacheStreamer::flush`]). The slots alternate, so the store of batch
//! `k − 1` and the load of batch `k + 1` run while batch `k` computes:
//! FlexGen's order. Copies go through the run's copy matrix (DMA, the
//! pinned relay, the staged disk path, or a device-to-device copy for the
//! GPU's own sequences).
//!
//! With `--compress-cache` each layer's keys and values are held 4-bit
//! (groups of up to 64 along the head dimension, asymmetric: FlexGen's) as
//! one packed `u8` tensor each, whole on the one tier the plan names (the
//! GPU's included): loaded, the packed bytes come to a GPU scratch and are
//! unpacked there ([`compression::gpu`], into `T`) before the positions
//! are copied into the slot; stored, the slot's positions are copied into
//! the scratch, the whole layer packed again and the bytes sent home. The
//! scratch holds one layer of one batch, keys and values apart.
//!
//! With `--cpu-cache-compute` (the cache all in host memory) decoding skips
//! the slots: the family computes the step's queries, keys and values on
//! the GPU, and on the CPU appends the keys and values to the host cache
//! and attends over it ([`HostLayer`], in place, on a thread pool that
//! leaves [`IO_CORES`] cores to the copy workers); only the step's rows
//! and the attention's output cross PCIe. The prefill still computes on
//! the GPU, through a slot.
//!
//! The runtime moves the bytes; the family computes: [`CacheStreamer::layer`]
//! hands the family's closure a [`LayerRun`], the slot or the host cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use compression::gpu::{GpuDequantOptions, GpuDequantizer, GpuQuantizer, Pending, QuantPending};
use compression::{CompressedLayout, CompressionConfig, Mode, SourceDtype};
use ops::gpu::buffer::{DevBuf, Half};
use ops::gpu::{Event, Gpu};
use tier_api::{CopyHandle, CopyMatrix, DType, Device, DeviceKind, SegmentedTensor, Shape, Tensor, TensorView};
use tier_disk::DiskDevice;
use tier_host::HostDevice;

use super::{gpu_err, tier_err};
use crate::error::{Error, Result};
use crate::policy::Policy;

/// Cores left to the copy workers when the CPU computes attention.
pub const IO_CORES: usize = 3;

/// Where the cache goes and how decoding reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CachePlan {
    /// Shares of each batch's sequences on the GPU and in host memory, in
    /// percent; the rest on disk.
    pub gpu_percent: f64,
    pub cpu_percent: f64,
    /// Decode attention on the CPU over the host cache.
    pub cpu_compute: bool,
    /// `--attn-sparsity` (1 = dense) for the CPU's attention.
    pub attn_sparsity: f64,
    /// `--compress-cache`: keys and values held 4-bit (groups along the
    /// head dimension) on their tier.
    pub compress: bool,
}

/// A tier of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheTier {
    Gpu,
    Host,
    Disk,
}

impl CachePlan {
    /// The placement `policy` asks a GPU engine for: its cache shares,
    /// `--compress-cache`, `--attn-sparsity`, and `--cpu-cache-compute`
    /// where the cache is all in host memory (elsewhere the attention stays
    /// on the GPU).
    pub fn of_policy(policy: &Policy) -> Self {
        CachePlan {
            gpu_percent: policy.cache_gpu_percent,
            cpu_percent: policy.cache_cpu_percent,
            cpu_compute: policy.cpu_cache_compute && policy.cache_cpu_percent >= 100.0,
            attn_sparsity: policy.attn_sparsity,
            compress: policy.compress_cache,
        }
    }

    /// The disk's share, percent.
    pub fn disk_percent(&self) -> f64 {
        (100.0 - self.gpu_percent - self.cpu_percent).max(0.0)
    }

    /// Whether caches go through the slots ([`CacheStreamer`]): any of
    /// them off the GPU, the CPU's attention, or 4-bit (unpacked into a
    /// slot wherever it lives). Otherwise a family keeps its resident
    /// cache.
    pub fn through_slots(&self) -> bool {
        self.gpu_percent < 100.0 || self.cpu_compute || self.compress
    }

    /// The tiers holding a share, in order (GPU, host, disk), the shares
    /// summing to exactly 100 (the last one takes the rounding).
    pub fn shares(&self) -> Vec<(CacheTier, f64)> {
        let mut out: Vec<(CacheTier, f64)> = [
            (CacheTier::Gpu, self.gpu_percent),
            (CacheTier::Host, self.cpu_percent),
            (CacheTier::Disk, self.disk_percent()),
        ]
        .into_iter()
        .filter(|&(_, share)| share > 0.0)
        .collect();
        let sum: f64 = out.iter().map(|s| s.1).sum();
        if let Some(last) = out.last_mut() {
            last.1 += 100.0 - sum;
        }
        out
    }

    /// Refuses plans the engine cannot run, saying what would.
    pub fn validate(&self) -> Result<()> {
        let ok = |p: f64| (0.0..=100.0).contains(&p);
        if !ok(self.gpu_percent) || !ok(self.cpu_percent) || self.gpu_percent + self.cpu_percent > 100.0 + 1e-9 {
            return Err(Error::InvalidArgument(format!(
                "cache shares {}% GPU and {}% CPU do not fit in 100%",
                self.gpu_percent, self.cpu_percent
            )));
        }
        if self.cpu_compute && self.cpu_percent < 100.0 {
            return Err(Error::InvalidArgument(format!(
                "--cpu-cache-compute computes attention over a cache held in host memory, but the policy puts \
                 {}% of it on the GPU and {}% on disk; give the cache shares 0 100 (--percent W W 0 100 A A) \
                 or drop --cpu-cache-compute",
                self.gpu_percent,
                self.disk_percent()
            )));
        }
        if !(self.attn_sparsity > 0.0 && self.attn_sparsity <= 1.0) {
            return Err(Error::InvalidArgument(format!("--attn-sparsity {} is outside (0, 1]", self.attn_sparsity)));
        }
        if self.compress && (self.cpu_compute || self.shares().len() > 1) {
            return Err(Error::NeedsTieredEngine(
                "--compress-cache with --cpu-cache-compute or with the cache split over tiers (the GPU engine \
                 keeps a 4-bit cache whole on one tier, unpacked on the GPU)"
                    .into(),
            ));
        }
        if self.attn_sparsity < 1.0 && !self.cpu_compute {
            return Err(Error::InvalidArgument(
                "--attn-sparsity below 1 runs in the CPU's decode attention: add --cpu-cache-compute \
                 (with the cache in host memory)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A model's cache, as the runtime needs to know it: decoder layers,
/// key/value heads (fewer than the query heads under grouped-query
/// attention) and their width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl CacheShape {
    /// Elements of one layer's keys (or values) for `batch` sequences of
    /// `capacity` positions, checked.
    pub fn layer_elems(&self, batch: usize, capacity: usize) -> Result<usize> {
        [batch, self.kv_heads, capacity, self.head_dim].iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(
            || {
                gpu_err(format!(
                    "a KV cache of {batch} sequences × {} heads × {capacity} positions × {} overflows",
                    self.kv_heads, self.head_dim
                ))
            },
        )
    }

    fn validate(&self) -> Result<()> {
        if self.layers == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err(gpu_err(format!("a KV cache of {self:?}: every size must be positive")));
        }
        Ok(())
    }
}

/// The 4-bit layout of one layer's keys (or values) of `rows` rows
/// (`batch · kv_heads · capacity`) of `head_dim` values of `dtype` (f16 or
/// bf16): FlexGen's groups of up to 64 along the head dimension (even),
/// asymmetric.
pub fn packed_layout(rows: usize, head_dim: usize, dtype: DType) -> Result<CompressedLayout> {
    let err = |e: compression::Error| gpu_err(format!("the 4-bit cache layout: {e}"));
    let group = (head_dim.min(compression::DEFAULT_GROUP_SIZE) & !1).max(2);
    let config = CompressionConfig::new(4, group, 1, Mode::Asymmetric).map_err(err)?;
    let source = match dtype {
        DType::F16 => SourceDtype::F16,
        DType::BF16 => SourceDtype::BF16,
        other => return Err(gpu_err(format!("a 4-bit KV cache of {other:?}: f16 or bf16 only"))),
    };
    CompressedLayout::new(&[rows, head_dim], source, config).map_err(err)
}

/// The tiers a tiered cache lives on, taken from the run's
/// [`crate::Tiers`].
#[derive(Clone)]
pub struct CacheTiers {
    pub host: Option<Arc<HostDevice>>,
    pub disk: Option<Arc<DiskDevice>>,
    /// The run's copy matrix.
    pub matrix: Arc<CopyMatrix>,
}

impl std::fmt::Debug for CacheTiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheTiers")
            .field("host", &self.host.is_some())
            .field("disk", &self.disk.is_some())
            .finish_non_exhaustive()
    }
}

impl CacheTiers {
    /// The tiers `plan` needs: pageable host memory (FlexGen's choice, and
    /// the placement check's: a page-locked cache would lock tens of
    /// gigabytes; the GPU's copies go through the pinned relay, and the
    /// CPU's attention reads it in place), a disk in `offload_dir`.
    pub fn for_plan(tiers: &crate::Tiers, plan: &CachePlan, offload_dir: &std::path::Path) -> Result<Self> {
        let host = if plan.cpu_percent > 0.0 { Some(tiers.host(tier_api::HostMemKind::Pageable)?) } else { None };
        let disk = if plan.disk_percent() > 0.0 { Some(tiers.disk(offload_dir)?) } else { None };
        Ok(CacheTiers { host, disk, matrix: tiers.matrix()? })
    }
}

/// For each sequence of a batch, one byte per cache position: 1 where the
/// position holds a real token (left padding does not). Written by the
/// family's embedding step; shared by every layer of the batch.
#[derive(Debug)]
pub struct KeyMask {
    /// `[batch][stride]`.
    pub mask: DevBuf<u8>,
    /// Positions per sequence (the cache's capacity).
    pub stride: usize,
}

impl KeyMask {
    /// Room for `batch` sequences of `capacity` positions (written before
    /// it is read: each step writes its own positions).
    pub fn new(gpu: &Gpu, batch: usize, capacity: usize) -> Result<Self> {
        let n = batch
            .checked_mul(capacity)
            .ok_or_else(|| gpu_err(format!("a key mask of {batch} × {capacity} positions overflows")))?;
        Ok(KeyMask { mask: DevBuf::alloc(gpu, n)?, stride: capacity })
    }
}

/// One batch's cache off the GPU (or split over tiers, or 4-bit).
pub struct TieredCache<T: Half> {
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Per layer: keys, values (`[batch, kv_heads, capacity, head_dim]` of
    /// `T`, or with `packed` one `u8` tensor each in that layout).
    layers: Vec<[SegmentedTensor; 2]>,
    /// The 4-bit layout of one layer's keys (and values), with
    /// `--compress-cache`.
    packed: Option<CompressedLayout>,
    /// Per layer: positions stored.
    len: Vec<usize>,
    /// Which positions hold real tokens, on the GPU (read by its kernels).
    pub key_mask: KeyMask,
    /// The same on the host, `[batch][capacity]` (read by the CPU's attention).
    host_mask: Vec<u8>,
    _elem: std::marker::PhantomData<T>,
}

impl<T: Half> std::fmt::Debug for TieredCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredCache")
            .field("batch", &self.batch)
            .field("capacity", &self.capacity)
            .field("len", &self.len.first())
            .finish_non_exhaustive()
    }
}

impl<T: Half> TieredCache<T> {
    /// Positions stored in layer `j`.
    pub fn len(&self, j: usize) -> usize {
        self.len.get(j).copied().unwrap_or(0)
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len(0) == 0
    }

    /// Layer `j`'s keys and values where they live (`T` `[batch, kv_heads,
    /// capacity, head_dim]`, or packed bytes with [`TieredCache::packed_layout`]).
    pub fn homes(&self, j: usize) -> Option<&[SegmentedTensor; 2]> {
        self.layers.get(j)
    }

    /// The 4-bit layout of a layer's keys, with `--compress-cache`.
    pub fn packed_layout(&self) -> Option<&CompressedLayout> {
        self.packed.as_ref()
    }

    /// Records this step's mask (`[batch][new_len]`) at `past` in the host
    /// copy (the family's embedding kernel writes the GPU's).
    pub fn record_mask(&mut self, step_mask: &[u8], new_len: usize, past: usize) -> Result<()> {
        let fits = past.checked_add(new_len).is_some_and(|end| end <= self.capacity);
        if !fits || Some(step_mask.len()) != self.batch.checked_mul(new_len) {
            return Err(gpu_err(format!(
                "KV cache mask: {new_len} positions at {past} for {} sequences, room for {}",
                self.batch, self.capacity
            )));
        }
        if new_len == 0 {
            return Ok(());
        }
        for (row, step) in self.host_mask.chunks_exact_mut(self.capacity).zip(step_mask.chunks_exact(new_len)) {
            row[past..past + new_len].copy_from_slice(step);
        }
        Ok(())
    }

    /// Bytes per tier: GPU (segments and mask), host, disk.
    pub fn bytes(&self) -> (u64, u64, u64) {
        let mut out = (self.key_mask.mask.bytes(), 0, 0);
        for seg in self.layers.iter().flatten().flat_map(SegmentedTensor::segments) {
            let b = seg.view.byte_len() as u64;
            match seg.view.device() {
                DeviceKind::Gpu { .. } => out.0 += b,
                DeviceKind::Host { .. } => out.1 += b,
                DeviceKind::Disk { .. } => out.2 += b,
            }
        }
        out
    }
}

/// Allocates `layers` layers' keys and values for `shape` (`[batch,
/// kv_heads, capacity, head_dim]` of `dtype`) on `placements` (each
/// device's share in percent, summing to 100), split along the batch in
/// whole sequences; with `packed`, one `u8` tensor of the layout each,
/// whole on the first device.
pub(crate) fn allocate_homes(
    placements: &[(&dyn Device, f64)],
    shape: &Shape,
    dtype: DType,
    layers: usize,
    packed: Option<&CompressedLayout>,
) -> Result<Vec<[SegmentedTensor; 2]>> {
    (0..layers)
        .map(|_| match packed {
            // 4-bit: one packed tensor each, whole on its one tier.
            Some(layout) => {
                let (dev, _) = placements.first().ok_or_else(|| gpu_err("no tier for the cache".into()))?;
                let one = || -> Result<SegmentedTensor> {
                    let t = dev.allocate(&Shape::new([layout.total_bytes()]), DType::U8).map_err(tier_err)?;
                    SegmentedTensor::single(t.view(), 0).map_err(tier_err)
                };
                Ok([one()?, one()?])
            }
            None => {
                let k = SegmentedTensor::allocate(shape, dtype, 0, placements, 1).map_err(tier_err)?;
                let v = SegmentedTensor::allocate(shape, dtype, 0, placements, 1).map_err(tier_err)?;
                Ok([k, v])
            }
        })
        .collect()
}

/// A layer computed on a GPU slot: the cache as a resident one.
pub struct SlotLayer<'a, T: Half> {
    /// The slot's keys and values: sequence `b`'s head `g` position `p` at
    /// `((b · kv_heads + g) · capacity + p) · head_dim`, positions
    /// `0..past` loaded; the step's go at `past..` (the family writes them).
    pub keys: &'a DevBuf<T>,
    pub values: &'a DevBuf<T>,
    /// The slot's positions per sequence (its stride; the cache's own
    /// capacity may be smaller: the key mask's stride is the cache's).
    pub capacity: usize,
    /// The batch's sequences (the slot may have room for more).
    pub batch: usize,
    /// Positions already cached.
    pub past: usize,
    /// The batch's key mask on the GPU (stride: the cache's capacity).
    pub key_mask: &'a KeyMask,
}

/// The CPU's threads for attention over the host cache.
#[derive(Clone, Copy)]
pub struct Threads<'a>(Option<&'a rayon::ThreadPool>);

impl Threads<'_> {
    /// Runs `f` on the attention's thread pool (rayon's parallel
    /// iterators inside it use that pool).
    pub fn run<R: Send>(self, f: impl FnOnce() -> R + Send) -> R {
        match self.0 {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }
}

/// A decoding step's layer attended on the CPU over the host cache
/// (`--cpu-cache-compute`): the family appends the step's keys and values
/// at `past` and attends over positions `0..=past`, in place.
pub struct HostLayer<'a, T: Half> {
    /// `[batch, kv_heads, capacity, head_dim]`.
    pub keys: &'a mut [T],
    pub values: &'a mut [T],
    /// `[batch][capacity]`, nonzero where the position holds a real token
    /// (this step's position included).
    pub host_mask: &'a [u8],
    /// The batch's key mask on the GPU.
    pub key_mask: &'a KeyMask,
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Positions already cached; the step's token goes at `past`.
    pub past: usize,
    /// `--attn-sparsity` (1: dense).
    pub sparsity: f64,
    /// Where to run the attention.
    pub threads: Threads<'a>,
}

/// Where a family computes a layer of a tiered batch.
pub enum LayerRun<'a, T: Half> {
    Slot(SlotLayer<'a, T>),
    Host(HostLayer<'a, T>),
}

/// Positions of a slot appended by a compute and not yet stored.
struct Dirty {
    keys: SegmentedTensor,
    values: SegmentedTensor,
    from: usize,
    n: usize,
    /// A 4-bit cache: its `(batch, capacity)`.
    packed: Option<(usize, usize)>,
}

/// GPU scratch for one 4-bit cache shape: its layout, and for keys and
/// values each the packed bytes and the `T` cache they unpack to (zeroed
/// once, so that every value the quantizer reads is finite).
struct PackScratch<T: Half> {
    layout: CompressedLayout,
    packed: [Tensor; 2],
    _dense_bufs: [DevBuf<T>; 2],
    dense4: [Tensor; 2],
}

/// The 4-bit scratch of each cache shape.
type ScratchMap<T> = HashMap<(usize, usize), Arc<PackScratch<T>>>;

/// The GPU's 4-bit kernels and scratch, with `--compress-cache`.
struct Packer<T: Half> {
    quant: GpuQuantizer,
    dequant: GpuDequantizer,
    /// By the cache's `(batch, capacity)`.
    scratch: Mutex<ScratchMap<T>>,
}

/// One GPU slot: a layer's cache for the largest batch, as 4-D tensors
/// over the same memory for the copy matrix.
struct Slot<T: Half> {
    keys: DevBuf<T>,
    values: DevBuf<T>,
    keys4: Tensor,
    values4: Tensor,
    batch: usize,
    capacity: usize,
}

/// A 4-bit kernel enqueued on the compute stream, holding its tensors
/// until it has run (dropping it waits for it).
enum InFlight {
    Unpack(Pending),
    Pack(QuantPending),
}

struct State<T: Half> {
    slots: Vec<Slot<T>>,
    /// Per slot: the 4-bit kernels of its last use, packed in place
    /// ([`CacheStreamer::layer`]'s GPU-home path), let go when the slot is
    /// next used (waiting for them, so the host keeps at most a slot's use
    /// ahead of the GPU) or at a flush.
    in_flight: [Vec<InFlight>; 2],
    /// What each slot holds that is not stored yet.
    dirty: [Option<Dirty>; 2],
    /// Whether each slot's event was recorded after its last compute.
    recorded: [bool; 2],
    /// The slot the next layer uses.
    next: usize,
    /// Bytes loaded into and stored from the slots.
    bytes_moved: u64,
}

/// Runs layers over tiered caches: the plan, the tiers, two GPU slots (and
/// the 4-bit kernels and scratch, the CPU attention's threads).
pub struct CacheStreamer<T: Half> {
    plan: CachePlan,
    shape: CacheShape,
    tiers: CacheTiers,
    done: [Event; 2],
    state: Mutex<State<T>>,
    packer: Option<Packer<T>>,
    /// The CPU's attention threads, with `--cpu-cache-compute`: all cores
    /// but [`IO_CORES`], so that the copy workers and io_uring completions
    /// that keep the disk and PCIe busy are never queued behind them.
    cpu_pool: Option<rayon::ThreadPool>,
    /// The run's copy matrix (copies still queued hold their tensors).
    matrix: Arc<CopyMatrix>,
}

impl<T: Half> std::fmt::Debug for CacheStreamer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheStreamer").field("plan", &self.plan).field("shape", &self.shape).finish_non_exhaustive()
    }
}

impl<T: Half> CacheStreamer<T> {
    /// A streamer for `plan` over `tiers`, for caches of `shape` in `T`
    /// (the slots are made with the first cache).
    pub fn new(gpu: &Gpu, plan: CachePlan, tiers: CacheTiers, shape: CacheShape) -> Result<Self> {
        plan.validate()?;
        shape.validate()?;
        if plan.cpu_percent > 0.0 && tiers.host.is_none() {
            return Err(gpu_err("a cache share in host memory, but no host tier".into()));
        }
        if plan.disk_percent() > 0.0 && tiers.disk.is_none() {
            return Err(gpu_err("a cache share on disk, but no disk tier".into()));
        }
        let done = [Event::new(gpu)?, Event::new(gpu)?];
        let matrix = tiers.matrix.clone();
        let state = State {
            slots: Vec::new(),
            in_flight: [Vec::new(), Vec::new()],
            dirty: [None, None],
            recorded: [false; 2],
            next: 0,
            bytes_moved: 0,
        };
        let packer = if plan.compress {
            let err = |e: compression::Error| gpu_err(format!("the GPU's 4-bit cache kernels: {e}"));
            let options = GpuDequantOptions { output: T::DTYPE, ..Default::default() };
            Some(Packer {
                quant: GpuQuantizer::new(gpu.device().clone()).map_err(err)?,
                dequant: GpuDequantizer::with_options(gpu.device().clone(), options).map_err(err)?,
                scratch: Mutex::new(HashMap::new()),
            })
        } else {
            None
        };
        let cpu_pool = if plan.cpu_compute {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads = cores.saturating_sub(IO_CORES).max(1);
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("tierlm-attn-{i}"))
                .build()
                .ok()
        } else {
            None
        };
        Ok(CacheStreamer { plan, shape, tiers, done, state: Mutex::new(state), packer, cpu_pool, matrix })
    }

    /// The plan.
    pub fn plan(&self) -> CachePlan {
        self.plan
    }

    /// The caches' shape.
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// The tiers.
    pub fn tiers(&self) -> &CacheTiers {
        &self.tiers
    }

    /// Bytes of the two GPU slots.
    pub fn slot_bytes(&self) -> u64 {
        self.lock().map(|s| s.slots.iter().map(|s| s.keys.bytes() + s.values.bytes()).sum()).unwrap_or(0)
    }

    /// Bytes of the 4-bit cache's GPU scratch (packed and unpacked, keys
    /// and values, every batch shape seen).
    pub fn scratch_bytes(&self) -> u64 {
        let Some(packer) = &self.packer else { return 0 };
        packer
            .scratch
            .lock()
            .map_or(0, |m| m.values().flat_map(|s| s.packed.iter().chain(&s.dense4)).map(|t| t.byte_len() as u64).sum())
    }

    /// Bytes copied between the slots and the cache's homes so far.
    pub fn bytes_moved(&self) -> u64 {
        self.lock().map(|s| s.bytes_moved).unwrap_or(0)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State<T>>> {
        self.state.lock().map_err(|_| gpu_err("the cache streamer's state was poisoned by a panic".into()))
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions,
    /// its sequences split over the tiers by the plan; the GPU slots grow
    /// to hold it.
    pub fn new_cache(&self, gpu: &Gpu, batch: usize, capacity: usize) -> Result<TieredCache<T>> {
        let CacheShape { layers, kv_heads, head_dim } = self.shape;
        let per_layer = self.shape.layer_elems(batch, capacity)?;
        let mask_len = batch
            .checked_mul(capacity)
            .ok_or_else(|| gpu_err(format!("a key mask of {batch} × {capacity} positions overflows")))?;
        if per_layer == 0 {
            return Err(gpu_err(format!("a KV cache of {batch} sequences of {capacity} positions")));
        }
        let shape = Shape::new([batch, kv_heads, capacity, head_dim]);
        let gpu_dev: Arc<dyn Device> = gpu.device().clone();
        let host_dev: Option<Arc<dyn Device>> = self.tiers.host.clone().map(|h| h as Arc<dyn Device>);
        let disk_dev: Option<Arc<dyn Device>> = self.tiers.disk.clone().map(|d| d as Arc<dyn Device>);
        let mut placements: Vec<(&dyn Device, f64)> = Vec::new();
        for (tier, share) in self.plan.shares() {
            let dev = match tier {
                CacheTier::Gpu => Some(&gpu_dev),
                CacheTier::Host => host_dev.as_ref(),
                CacheTier::Disk => disk_dev.as_ref(),
            };
            let dev = dev.ok_or_else(|| gpu_err("a cache share on a tier that was not opened".into()))?;
            placements.push((dev.as_ref(), share));
        }
        // The scratch is made here for homes off the GPU; homes on it are
        // unpacked in place ([`CacheStreamer::layer`]), into the slots' first
        // rows for a batch of fewer sequences; a scratch is made there only
        // for a batch whose positions per sequence are not the slots'.
        let packed = match &self.packer {
            Some(packer) if self.plan.gpu_percent < 100.0 => {
                Some(self.pack_scratch(gpu, packer, batch, capacity)?.layout.clone())
            }
            Some(_) => Some(packed_layout(per_layer / head_dim, head_dim, T::DTYPE)?),
            None => None,
        };
        let homes = allocate_homes(&placements, &shape, T::DTYPE, layers, packed.as_ref())?;
        self.ensure_slots(gpu, batch, capacity)?;
        Ok(TieredCache {
            batch,
            kv_heads,
            head_dim,
            capacity,
            layers: homes,
            len: vec![0; layers],
            packed,
            key_mask: KeyMask::new(gpu, batch, capacity)?,
            host_mask: vec![0; mask_len],
            _elem: std::marker::PhantomData,
        })
    }

    /// The GPU scratch of a 4-bit cache of `batch × capacity` positions,
    /// made on first use: the layout (`[batch·kv_heads·capacity,
    /// head_dim]`, see [`packed_layout`]), and for keys and values the
    /// packed bytes and the zeroed `T` cache.
    fn pack_scratch(
        &self,
        gpu: &Gpu,
        packer: &Packer<T>,
        batch: usize,
        capacity: usize,
    ) -> Result<Arc<PackScratch<T>>> {
        let mut scratch = packer.scratch.lock().map_err(|_| gpu_err("the 4-bit scratch was poisoned".into()))?;
        if let Some(s) = scratch.get(&(batch, capacity)) {
            return Ok(Arc::clone(s));
        }
        let CacheShape { kv_heads, head_dim, .. } = self.shape;
        let elems = self.shape.layer_elems(batch, capacity)?;
        let layout = packed_layout(elems / head_dim, head_dim, T::DTYPE)?;
        let shape = Shape::new([batch, kv_heads, capacity, head_dim]);
        let zeros = vec![T::default(); elems];
        let mut packed = Vec::with_capacity(2);
        let mut bufs = Vec::with_capacity(2);
        let mut dense4 = Vec::with_capacity(2);
        for _ in 0..2 {
            packed.push(gpu.device().allocate(&Shape::new([layout.total_bytes()]), DType::U8).map_err(tier_err)?);
            let dense = DevBuf::<T>::from_host(gpu, &zeros)?;
            dense4.push(
                Tensor::from_storage(dense.tensor().storage().clone(), shape.clone(), T::DTYPE).map_err(tier_err)?,
            );
            bufs.push(dense);
        }
        gpu.synchronize()?;
        let pair = |v: Vec<Tensor>| -> Result<[Tensor; 2]> {
            <[Tensor; 2]>::try_from(v).map_err(|_| gpu_err("the 4-bit scratch".into()))
        };
        let _dense_bufs = <[DevBuf<T>; 2]>::try_from(bufs).map_err(|_| gpu_err("the 4-bit scratch".into()))?;
        let s = Arc::new(PackScratch { layout, packed: pair(packed)?, _dense_bufs, dense4: pair(dense4)? });
        scratch.insert((batch, capacity), Arc::clone(&s));
        Ok(s)
    }

    fn scratch(&self, batch: usize, capacity: usize) -> Result<(&Packer<T>, Arc<PackScratch<T>>)> {
        let packer = self.packer.as_ref().ok_or_else(|| gpu_err("a 4-bit cache without its kernels".into()))?;
        let map = packer.scratch.lock().map_err(|_| gpu_err("the 4-bit scratch was poisoned".into()))?;
        let s = map.get(&(batch, capacity)).ok_or_else(|| gpu_err("no 4-bit scratch for this cache".into()))?;
        Ok((packer, Arc::clone(s)))
    }

    /// 4-bit homes' (keys, values) positions `0..past` unpacked into the
    /// slot tensors: the packed bytes to the GPU, unpacked there, the
    /// positions copied into the slot's layout. Returns the bytes moved.
    fn load_packed(
        &self,
        homes: [&SegmentedTensor; 2],
        slot4: [&Tensor; 2],
        dims: (usize, usize),
        past: usize,
    ) -> Result<u64> {
        let (packer, s) = self.scratch(dims.0, dims.1)?;
        let mut handle = CopyHandle::empty();
        for (home, packed) in homes.iter().zip(&s.packed) {
            let seg = home.segments().first().ok_or_else(|| gpu_err("an empty 4-bit home".into()))?;
            handle = handle.join(self.matrix.submit(seg.view.clone(), packed.view()).map_err(tier_err)?);
        }
        let mut bytes = handle.wait().map_err(tier_err)?.bytes;
        for (packed, dense4) in s.packed.iter().zip(&s.dense4) {
            packer
                .dequant
                .dequantize(&packed.view(), &s.layout, &dense4.view())
                .map_err(|e| gpu_err(format!("unpacking the 4-bit cache: {e}")))?;
        }
        let mut handle = CopyHandle::empty();
        for (dense4, slot) in s.dense4.iter().zip(slot4) {
            let src = dense4.narrow(2, 0, past).map_err(tier_err)?;
            let dst = slot.narrow(0, 0, dims.0).and_then(|v| v.narrow(2, 0, past)).map_err(tier_err)?;
            handle = handle.join(self.matrix.submit(src, dst).map_err(tier_err)?);
        }
        bytes += handle.wait().map_err(tier_err)?.bytes;
        Ok(bytes)
    }

    /// The slot's positions `0..len` (keys, values) packed into 4-bit
    /// homes (the whole layer is quantized again: positions past `len`
    /// hold earlier, finite values nobody reads). Returns the bytes moved.
    fn store_packed(
        &self,
        slot4: [&Tensor; 2],
        homes: [&SegmentedTensor; 2],
        dims: (usize, usize),
        len: usize,
    ) -> Result<u64> {
        let (packer, s) = self.scratch(dims.0, dims.1)?;
        let mut handle = CopyHandle::empty();
        for (slot, dense4) in slot4.iter().zip(&s.dense4) {
            let src = slot.narrow(0, 0, dims.0).and_then(|v| v.narrow(2, 0, len)).map_err(tier_err)?;
            let dst = dense4.narrow(2, 0, len).map_err(tier_err)?;
            handle = handle.join(self.matrix.submit(src, dst).map_err(tier_err)?);
        }
        let mut bytes = handle.wait().map_err(tier_err)?.bytes;
        for (dense4, packed) in s.dense4.iter().zip(&s.packed) {
            packer
                .quant
                .quantize(&dense4.view(), &s.layout, &packed.view())
                .map_err(|e| gpu_err(format!("packing the 4-bit cache: {e}")))?;
        }
        let mut handle = CopyHandle::empty();
        for (packed, home) in s.packed.iter().zip(homes) {
            let seg = home.segments().first().ok_or_else(|| gpu_err("an empty 4-bit home".into()))?;
            handle = handle.join(self.matrix.submit(packed.view(), seg.view.clone()).map_err(tier_err)?);
        }
        bytes += handle.wait().map_err(tier_err)?.bytes;
        Ok(bytes)
    }

    /// Makes both slots hold at least `batch × capacity` positions.
    fn ensure_slots(&self, gpu: &Gpu, batch: usize, capacity: usize) -> Result<()> {
        let mut st = self.lock()?;
        if st.slots.len() == 2 && st.slots.iter().all(|s| s.batch >= batch && s.capacity >= capacity) {
            return Ok(());
        }
        self.flush_locked(&mut st)?;
        let (b, c) = st.slots.iter().fold((batch, capacity), |(b, c), s| (b.max(s.batch), c.max(s.capacity)));
        let elems = self.shape.layer_elems(b, c)?;
        let CacheShape { kv_heads, head_dim, .. } = self.shape;
        st.slots.clear();
        // A 4-bit cache quantizes whole slots, positions past the stored
        // ones included: zeroed once, every value it reads is finite.
        let zeros = if self.packer.is_some() { vec![T::default(); elems] } else { Vec::new() };
        let make =
            || if self.packer.is_some() { DevBuf::<T>::from_host(gpu, &zeros) } else { DevBuf::<T>::alloc(gpu, elems) };
        for _ in 0..2 {
            let keys = make()?;
            let values = make()?;
            let shape = Shape::new([b, kv_heads, c, head_dim]);
            let four = |buf: &DevBuf<T>| {
                Tensor::from_storage(buf.tensor().storage().clone(), shape.clone(), T::DTYPE).map_err(tier_err)
            };
            let (keys4, values4) = (four(&keys)?, four(&values)?);
            st.slots.push(Slot { keys, values, keys4, values4, batch: b, capacity: c });
        }
        st.recorded = [false; 2];
        Ok(())
    }

    /// Submits copies of positions `from..from + n` of every segment of
    /// `home` to (`load`) or from the slot tensor `slot4`.
    fn copy_positions(
        &self,
        home: &SegmentedTensor,
        slot4: &Tensor,
        from: usize,
        n: usize,
        load: bool,
    ) -> Result<CopyHandle> {
        let mut handle = CopyHandle::empty();
        if n == 0 {
            return Ok(handle);
        }
        for seg in home.segments() {
            let h: TensorView = seg.view.narrow(2, from, n).map_err(tier_err)?;
            let s = slot4
                .narrow(0, seg.range.start, seg.range.len())
                .and_then(|v| v.narrow(2, from, n))
                .map_err(tier_err)?;
            let (src, dst) = if load { (h, s) } else { (s, h) };
            handle = handle.join(self.matrix.submit(src, dst).map_err(tier_err)?);
        }
        Ok(handle)
    }

    /// Stores what slot `i` holds unstored, once the compute that wrote it
    /// has finished.
    fn store_slot(&self, st: &mut State<T>, i: usize) -> Result<()> {
        if st.recorded[i] {
            self.done[i].synchronize()?;
            st.recorded[i] = false;
        }
        if let Some(d) = st.dirty[i].take() {
            let slot = st.slots.get(i).ok_or_else(|| gpu_err("the cache slots were not made".into()))?;
            if let Some(dims) = d.packed {
                let len = d.from + d.n;
                st.bytes_moved += self.store_packed([&slot.keys4, &slot.values4], [&d.keys, &d.values], dims, len)?;
                return Ok(());
            }
            let h = self.copy_positions(&d.keys, &slot.keys4, d.from, d.n, false)?.join(self.copy_positions(
                &d.values,
                &slot.values4,
                d.from,
                d.n,
                false,
            )?);
            st.bytes_moved += h.wait().map_err(tier_err)?.bytes;
        }
        Ok(())
    }

    fn flush_locked(&self, st: &mut State<T>) -> Result<()> {
        for i in 0..st.slots.len().min(2) {
            self.store_slot(st, i)?;
        }
        for f in &mut st.in_flight {
            Self::settle(f)?;
        }
        Ok(())
    }

    /// Waits for the 4-bit kernels of slot `i`'s last use and lets them go.
    fn settle(in_flight: &mut Vec<InFlight>) -> Result<()> {
        for k in in_flight.drain(..) {
            let waited = match k {
                InFlight::Unpack(p) => p.wait(),
                InFlight::Pack(p) => p.wait(),
            };
            waited.map_err(|e| gpu_err(format!("the 4-bit cache's kernels: {e}")))?;
        }
        Ok(())
    }

    /// Whether a 4-bit cache's layer is unpacked straight into the slot and
    /// packed straight back, on the compute stream: its homes are whole GPU
    /// tensors and the slot has the cache's own shape (so the slot's
    /// `[batch, kv_heads, capacity, head_dim]` is the packed layout's order).
    fn packs_in_place(homes: [&SegmentedTensor; 2], slot: &Slot<T>, dims: (usize, usize)) -> bool {
        let on_gpu =
            |h: &SegmentedTensor| matches!(h.segments(), [seg] if matches!(seg.view.device(), DeviceKind::Gpu { .. }));
        // A batch of fewer sequences (a block's last) takes the slot's first
        // rows: the same layout, as long as the positions per sequence match.
        homes.iter().all(|h| on_gpu(h)) && slot.capacity == dims.1 && slot.batch >= dims.0
    }

    /// A slot's first `batch` sequences, where a 4-bit GPU home of that
    /// many is unpacked in place.
    fn slot_rows(slot4: &Tensor, batch: usize) -> Result<tier_api::TensorView> {
        slot4.narrow(0, 0, batch).map_err(tier_err)
    }

    /// Stores everything the slots hold unstored (at the end of a step,
    /// before the CPU reads the host cache, before the caches go).
    pub fn flush(&self) -> Result<()> {
        let mut st = self.lock()?;
        self.flush_locked(&mut st)
    }

    /// Layer `j` of a batch whose cache is `tc` (a step of `new_len` new
    /// tokens per sequence): `compute` is the family's layer, given the
    /// host cache when decoding with `--cpu-cache-compute` (after a
    /// decoding step's first, with the cache all in host memory), else a
    /// GPU slot loaded with the batch's positions `0..past`. The compute is
    /// enqueued with the slot held: its event is recorded on `gpu`'s
    /// stream after `compute` returns, and the step's positions are stored
    /// when the slot is next used (or at [`CacheStreamer::flush`]).
    pub fn layer<E, F>(&self, gpu: &Gpu, j: usize, tc: &mut TieredCache<T>, new_len: usize, compute: F) -> Result<(), E>
    where
        E: From<Error>,
        F: FnOnce(LayerRun<'_, T>) -> Result<(), E>,
    {
        let TieredCache { batch, kv_heads, head_dim, capacity, layers, len, packed, key_mask, host_mask, .. } = tc;
        let [keys, values] = layers.get_mut(j).ok_or_else(|| gpu_err(format!("no cache for layer {j}")))?;
        let past = len.get(j).copied().ok_or_else(|| gpu_err(format!("no cache for layer {j}")))?;
        let end = past
            .checked_add(new_len)
            .filter(|&e| e <= *capacity)
            .ok_or_else(|| gpu_err(format!("layer {j}: {past} + {new_len} positions exceed the cache's {capacity}")))?;
        if self.plan.cpu_compute && new_len == 1 && past > 0 {
            // Decode attention on the CPU over the host cache.
            let (keys, values) = (host_slice_mut::<T>(keys)?, host_slice_mut::<T>(values)?);
            compute(LayerRun::Host(HostLayer {
                keys,
                values,
                host_mask: host_mask.as_slice(),
                key_mask,
                batch: *batch,
                kv_heads: *kv_heads,
                head_dim: *head_dim,
                capacity: *capacity,
                past,
                sparsity: self.plan.attn_sparsity,
                threads: Threads(self.cpu_pool.as_ref()),
            }))?;
            len[j] = end;
            return Ok(());
        }
        let (keys, values) = (keys.clone(), values.clone());
        let mut st = self.lock()?;
        let i = st.next;
        st.next = 1 - i;
        self.store_slot(&mut st, i)?;
        let dims = (*batch, *capacity);
        let packed = packed.clone().map(|layout| (dims, layout));
        let State { slots, in_flight, dirty, recorded, bytes_moved, .. } = &mut *st;
        let in_flight = &mut in_flight[i];
        let slot = slots.get(i).ok_or_else(|| gpu_err("the cache slots were not made".into()))?;
        if slot.batch < *batch || slot.capacity < *capacity {
            return Err(gpu_err("a cache larger than the GPU slots".into()).into());
        }
        let in_place = packed.is_some() && Self::packs_in_place([&keys, &values], slot, dims);
        let mut loaded = 0u64;
        if in_place {
            // Unpacked straight from the GPU homes into the slot on the
            // compute stream: nothing waits on the host.
            Self::settle(in_flight)?;
            if let (Some((_, layout)), Some(packer)) = (&packed, &self.packer) {
                if past > 0 {
                    for (home, slot4) in [(&keys, &slot.keys4), (&values, &slot.values4)] {
                        let seg = home.segments().first().ok_or_else(|| gpu_err("an empty 4-bit home".into()))?;
                        let rows = Self::slot_rows(slot4, dims.0)?;
                        let k = packer
                            .dequant
                            .enqueue(gpu.stream(), &seg.view, layout, &rows)
                            .map_err(|e| gpu_err(format!("unpacking the 4-bit cache: {e}")))?;
                        in_flight.push(InFlight::Unpack(k));
                        loaded += (layout.total_bytes() + rows.byte_len()) as u64;
                    }
                }
            }
        } else {
            if let (Some(_), Some(packer)) = (&packed, &self.packer) {
                // A GPU home whose positions per sequence are not the
                // slots': through a scratch, made on first use.
                self.pack_scratch(gpu, packer, dims.0, dims.1)?;
            }
            loaded = match &packed {
                Some((dims, _)) if past > 0 => {
                    self.load_packed([&keys, &values], [&slot.keys4, &slot.values4], *dims, past)?
                }
                Some(_) => 0,
                None => {
                    let h = self.copy_positions(&keys, &slot.keys4, 0, past, true)?.join(self.copy_positions(
                        &values,
                        &slot.values4,
                        0,
                        past,
                        true,
                    )?);
                    h.wait().map_err(tier_err)?.bytes
                }
            };
        }
        let run = SlotLayer {
            keys: &slot.keys,
            values: &slot.values,
            capacity: slot.capacity,
            batch: *batch,
            past,
            key_mask,
        };
        // The compute is enqueued with the lock held: the slot is this
        // layer's until its event is recorded.
        let result = compute(LayerRun::Slot(run));
        *bytes_moved += loaded;
        result?;
        if in_place {
            // Packed straight back after the compute, on the same stream
            // (the whole layer: positions past the stored ones hold earlier,
            // finite values nobody reads).
            if let (Some((_, layout)), Some(packer)) = (&packed, &self.packer) {
                for (home, slot4) in [(&keys, &slot.keys4), (&values, &slot.values4)] {
                    let seg = home.segments().first().ok_or_else(|| gpu_err("an empty 4-bit home".into()))?;
                    let rows = Self::slot_rows(slot4, dims.0)?;
                    let k = packer
                        .quant
                        .enqueue(gpu.stream(), &rows, layout, &seg.view)
                        .map_err(|e| gpu_err(format!("packing the 4-bit cache: {e}")))?;
                    in_flight.push(InFlight::Pack(k));
                    *bytes_moved += (layout.total_bytes() + rows.byte_len()) as u64;
                }
            }
        }
        self.done[i].record(gpu).map_err(Error::from)?;
        recorded[i] = true;
        dirty[i] =
            (!in_place).then_some(Dirty { keys, values, from: past, n: new_len, packed: packed.map(|(d, _)| d) });
        len[j] = end;
        Ok(())
    }
}

/// The `T` elements of a segmented tensor held whole in host memory.
fn host_slice_mut<T: Half>(t: &mut SegmentedTensor) -> Result<&mut [T]> {
    let [seg] = t.segments() else {
        return Err(gpu_err("CPU attention over a cache not held whole in host memory".into()));
    };
    if seg.view.dtype() != T::DTYPE {
        return Err(gpu_err(format!("a host cache of {:?} read as {:?}", seg.view.dtype(), T::DTYPE)));
    }
    let tier_api::Access::Host(span) = seg.view.tensor().storage().access() else {
        return Err(gpu_err("CPU attention over a cache not in host memory".into()));
    };
    let size = std::mem::size_of::<T>();
    let elems = span.len() / size;
    if !(span.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) || elems * size != seg.view.byte_len() {
        return Err(gpu_err("a host cache tensor is misaligned or a partial view".into()));
    }
    // SAFETY: the span is the tensor's whole host allocation (checked: the
    // view covers all of it), aligned for `T` (checked), and `T` is a
    // 16-bit float every bit pattern of which is valid; it is alive as long
    // as the segmented tensor mutably borrowed here (its cache owns the only
    // handle); no copy touches a host cache while the CPU computes over it
    // (the slots are flushed at every step's end, and CPU decoding uses no
    // slot), so this is the only access for the borrow's duration.
    Ok(unsafe { std::slice::from_raw_parts_mut(span.as_ptr().cast::<T>(), elems) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(gpu: f64, cpu: f64, cpu_compute: bool) -> CachePlan {
        CachePlan { gpu_percent: gpu, cpu_percent: cpu, cpu_compute, attn_sparsity: 1.0, compress: false }
    }

    #[test]
    fn plans_the_engine_cannot_run_are_refused_saying_what_would() {
        let e = plan(50.0, 50.0, true).validate().unwrap_err().to_string();
        assert!(e.contains("--cpu-cache-compute") && e.contains("50% of it on the GPU"), "{e}");
        let e = CachePlan { attn_sparsity: 0.5, ..plan(0.0, 100.0, false) }.validate().unwrap_err().to_string();
        assert!(e.contains("--cpu-cache-compute"), "{e}");
        for s in [0.0, -1.0, 1.5, f64::NAN] {
            assert!(CachePlan { attn_sparsity: s, ..plan(0.0, 100.0, true) }.validate().is_err(), "sparsity {s}");
        }
        assert!(plan(60.0, 60.0, false).validate().unwrap_err().to_string().contains("do not fit"));
        assert!(plan(-1.0, 50.0, false).validate().is_err());
        let e = CachePlan { compress: true, ..plan(30.0, 30.0, false) }.validate().unwrap_err().to_string();
        assert!(e.contains("--compress-cache"), "{e}");
        assert!(CachePlan { compress: true, ..plan(0.0, 100.0, true) }.validate().is_err());
        for (g, c) in [(100.0, 0.0), (0.0, 100.0), (0.0, 0.0)] {
            assert!(CachePlan { compress: true, ..plan(g, c, false) }.validate().is_ok(), "4-bit on one tier {g} {c}");
        }
        assert!(plan(30.0, 40.0, false).validate().is_ok());
        assert!(CachePlan { attn_sparsity: 0.25, ..plan(0.0, 100.0, true) }.validate().is_ok());
    }

    #[test]
    fn shares_name_the_tiers_that_hold_some_and_sum_to_exactly_100() {
        assert_eq!(plan(100.0, 0.0, false).shares(), vec![(CacheTier::Gpu, 100.0)]);
        assert_eq!(plan(0.0, 0.0, false).shares(), vec![(CacheTier::Disk, 100.0)]);
        let s = plan(30.0, 40.0, false).shares();
        assert_eq!(s.iter().map(|t| t.0).collect::<Vec<_>>(), [CacheTier::Gpu, CacheTier::Host, CacheTier::Disk]);
        assert_eq!(s.iter().map(|t| t.1).sum::<f64>(), 100.0);
        let s = plan(100.0 / 3.0, 100.0 / 3.0, false).shares();
        assert_eq!(s.len(), 3);
        assert_eq!(s.iter().map(|t| t.1).sum::<f64>(), 100.0);
        assert_eq!(plan(0.0, 100.0, true).shares(), vec![(CacheTier::Host, 100.0)]);
    }

    #[test]
    fn only_a_resident_plain_cache_skips_the_slots() {
        assert!(!plan(100.0, 0.0, false).through_slots());
        assert!(plan(99.0, 1.0, false).through_slots());
        assert!(plan(0.0, 100.0, true).through_slots());
        assert!(CachePlan { compress: true, ..plan(100.0, 0.0, false) }.through_slots());
    }

    #[test]
    fn the_plan_of_a_policy_keeps_the_cpu_attention_only_over_a_host_cache() {
        let p = Policy {
            cache_gpu_percent: 0.0,
            cache_cpu_percent: 100.0,
            cpu_cache_compute: true,
            attn_sparsity: 0.5,
            ..Policy::default()
        };
        let c = CachePlan::of_policy(&p);
        assert!(c.cpu_compute && c.attn_sparsity == 0.5 && !c.compress);
        let c = CachePlan::of_policy(&Policy { cache_cpu_percent: 50.0, compress_cache: true, ..p });
        assert!(!c.cpu_compute && c.compress && c.disk_percent() == 50.0);
    }

    #[test]
    fn the_packed_layout_groups_along_the_head_dimension() {
        let l = packed_layout(2 * 8 * 10, 128, DType::BF16).unwrap();
        assert_eq!(l.numel(), 2 * 8 * 10 * 128);
        // 64 values a group: 32 bytes of codes and an f16 (min, scale).
        assert!(l.total_bytes() >= 160 * 128 / 2 + 160 * 2 * 4);
        let small = packed_layout(4, 16, DType::F16).unwrap();
        assert_eq!(small.numel(), 64);
        assert!(packed_layout(4, 16, DType::F32).is_err());
        let shape = CacheShape { layers: 2, kv_heads: 8, head_dim: 128 };
        assert_eq!(shape.layer_elems(2, 10).unwrap(), 2 * 8 * 10 * 128);
        assert!(shape.layer_elems(usize::MAX, 2).is_err());
    }

    /// Homes split in whole sequences over host memory and disk, in that
    /// order, and host homes read as `T` slices in place.
    #[test]
    fn homes_split_in_whole_sequences_and_host_homes_read_in_place() {
        let tiers = crate::Tiers::default();
        let dir = tempfile::tempdir().unwrap();
        let host = tiers.host(tier_api::HostMemKind::Pageable).unwrap();
        let disk = tiers.disk(dir.path()).unwrap();
        let p = plan(0.0, 50.0, false);
        let devices: Vec<(&dyn Device, f64)> = p
            .shares()
            .into_iter()
            .map(|(t, s)| match t {
                CacheTier::Host => (host.as_ref() as &dyn Device, s),
                _ => (disk.as_ref() as &dyn Device, s),
            })
            .collect();
        let shape = Shape::new([5, 2, 6, 4]);
        let homes = allocate_homes(&devices, &shape, DType::BF16, 3, None).unwrap();
        assert_eq!(homes.len(), 3);
        for [k, v] in &homes {
            for t in [k, v] {
                let segs = t.segments();
                assert_eq!(segs.len(), 2);
                assert_eq!(segs[0].range.start, 0);
                assert_eq!(segs[0].range.end, segs[1].range.start);
                assert_eq!(segs[1].range.end, 5);
                assert!(matches!(segs[0].view.device(), DeviceKind::Host { .. }));
                assert!(matches!(segs[1].view.device(), DeviceKind::Disk { .. }));
                assert_eq!(segs[0].view.byte_len(), segs[0].range.len() * 2 * 6 * 4 * 2);
            }
        }
        // Split homes are not read in place.
        let mut split = homes[0][0].clone();
        assert!(host_slice_mut::<half::bf16>(&mut split).is_err());
        // A whole host home is, as its own type only.
        let whole = [(host.as_ref() as &dyn Device, 100.0)];
        let mut homes = allocate_homes(&whole, &shape, DType::BF16, 1, None).unwrap();
        let [k, _] = &mut homes[0];
        assert!(host_slice_mut::<half::f16>(k).is_err(), "bf16 read as f16");
        let s = host_slice_mut::<half::bf16>(k).unwrap();
        assert_eq!(s.len(), 5 * 2 * 6 * 4);
        s[7] = half::bf16::from_f32(3.0);
        let mut bytes = vec![0u8; 2];
        k.segments()[0].view.tensor().read_bytes(14, &mut bytes).unwrap();
        assert_eq!(half::bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(), 3.0);
        // 4-bit: one packed tensor each, whole on the plan's one tier.
        let layout = packed_layout(5 * 2 * 6, 4, DType::BF16).unwrap();
        let packed = allocate_homes(&whole, &shape, DType::BF16, 2, Some(&layout)).unwrap();
        for t in packed.iter().flatten() {
            assert_eq!(t.segments().len(), 1);
            assert_eq!(t.segments()[0].view.byte_len(), layout.total_bytes());
            assert_eq!(t.dtype(), DType::U8);
        }
    }
}
