//! The KV cache off the GPU: `--percent _ _ C_GPU C_CPU _ _` with
//! `C_GPU < 100`, and `--cpu-cache-compute`.
//!
//! Each batch's cache ([`TieredCache`]) holds, per layer, keys and values
//! as [`SegmentedTensor`]s of shape `[batch, heads, capacity, head_dim]`
//! (the GPU cache's layout) split along the batch **in whole sequences**:
//! the first `C_GPU`% of the sequences in GPU memory, the next `C_CPU`% in
//! host memory, the rest on disk in `--offload-dir`. Which positions hold
//! real tokens stays on the GPU ([`KeyMask`], a byte per position) with a
//! host copy for the CPU's attention.
//!
//! Computing a layer of a batch on the GPU ([`CacheStreamer::layer`]) goes
//! through one of two GPU slots, each one layer's cache for the largest
//! batch: the slot's previous contents are stored first (the positions the
//! previous compute appended, once its event says it has finished), then
//! the positions `0..past` of this batch's layer are loaded from every
//! segment, then the layer computes on the slot as on a resident cache and
//! appends the step's keys and values there, to be stored when the slot is
//! next used or at the step's end ([`CacheStreamer::flush`]). The slots
//! alternate, so the store of batch `k − 1` and the load of batch `k + 1`
//! run while batch `k` computes: FlexGen's order. Copies go through the
//! copy matrix (DMA, the pinned relay, the staged disk path, or a
//! device-to-device copy for the GPU's own sequences).
//!
//! With `--cpu-cache-compute` (the cache all in host memory) decoding skips
//! the slots: the GPU computes the queries, keys and values, the CPU
//! appends the keys and values to the host cache and computes the attention
//! over it ([`crate::cpu_attention`], with `--attn-sparsity`), and only the
//! `[batch, 3·hidden]` products and the `[batch, hidden]` outputs cross
//! PCIe. The prefill still computes on the GPU, through a slot.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::CudaEvent;
use half::f16;
use tier_api::{CopyHandle, CopyMatrix, DType, Device, SegmentedTensor, Shape, Tensor, TensorView};
use tier_disk::DiskDevice;
use tier_host::HostDevice;

use super::buffer::DevBuf;
use super::cache::{GpuLayerCache, KeyMask};
use super::{driver_err, tier_err, Gpu};
use crate::config::OptConfig;
use crate::cpu_attention::{append_kv, decode_attention, AttnDims, HostCache};
use crate::error::{Error, Result};

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

impl CachePlan {
    /// The disk's share, percent.
    pub fn disk_percent(&self) -> f64 {
        (100.0 - self.gpu_percent - self.cpu_percent).max(0.0)
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
        let tiers = [self.gpu_percent, self.cpu_percent, self.disk_percent()].iter().filter(|&&p| p > 0.0).count();
        if self.compress && (self.cpu_compute || tiers > 1) {
            return Err(Error::Runtime(runtime::Error::NeedsTieredEngine(
                "--compress-cache with --cpu-cache-compute or with the cache split over tiers (the GPU engine \
                 keeps a 4-bit cache whole on one tier, unpacked on the GPU)"
                    .into(),
            )));
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

/// The tiers a tiered cache lives on, taken from the run's
/// [`runtime::Tiers`].
#[derive(Clone)]
pub struct CacheTiers {
    pub host: Option<Arc<HostDevice>>,
    pub disk: Option<Arc<DiskDevice>>,
    /// The run's copy matrix.
    pub matrix: Arc<CopyMatrix>,
}

impl CacheTiers {
    /// The tiers `plan` needs: pageable host memory (FlexGen's choice, and
    /// the placement check's: a page-locked cache would lock tens of
    /// gigabytes; the GPU's copies go through the pinned relay, and the
    /// CPU's attention reads it in place), a disk in `offload_dir`.
    pub fn for_plan(tiers: &runtime::Tiers, plan: &CachePlan, offload_dir: &std::path::Path) -> Result<Self> {
        let host = if plan.cpu_percent > 0.0 { Some(tiers.host(tier_api::HostMemKind::Pageable)?) } else { None };
        let disk = if plan.disk_percent() > 0.0 { Some(tiers.disk(offload_dir)?) } else { None };
        Ok(CacheTiers { host, disk, matrix: tiers.matrix()? })
    }
}

/// One batch's cache off the GPU (or split over tiers).
pub struct TieredCache {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Per layer: keys, values (`[batch, heads, capacity, head_dim]` f16,
    /// or with `packed` one `u8` tensor each in that layout).
    layers: Vec<[SegmentedTensor; 2]>,
    /// The 4-bit layout of one layer's keys (and values), with
    /// `--compress-cache`.
    packed: Option<compression::CompressedLayout>,
    /// Per layer: positions stored.
    len: Vec<usize>,
    /// Which positions hold real tokens, on the GPU (read by its kernels).
    pub key_mask: KeyMask,
    /// The same on the host, `[batch][capacity]` (read by the CPU's attention).
    host_mask: Vec<u8>,
}

impl std::fmt::Debug for TieredCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredCache")
            .field("batch", &self.batch)
            .field("capacity", &self.capacity)
            .field("len", &self.len.first())
            .finish_non_exhaustive()
    }
}

impl TieredCache {
    /// Positions stored in layer `j`.
    pub fn len(&self, j: usize) -> usize {
        self.len.get(j).copied().unwrap_or(0)
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len(0) == 0
    }

    /// Layer `j`'s keys and values where they live (f16 `[batch, heads,
    /// capacity, head_dim]`, or packed bytes with [`TieredCache::packed_layout`]).
    pub fn homes(&self, j: usize) -> Option<&[SegmentedTensor; 2]> {
        self.layers.get(j)
    }

    /// The 4-bit layout of a layer's keys, with `--compress-cache`.
    pub fn packed_layout(&self) -> Option<&compression::CompressedLayout> {
        self.packed.as_ref()
    }

    /// Records this step's mask (`[batch][new_len]`) at `past` in the host
    /// copy (the embedding kernel writes the GPU's).
    pub fn record_mask(&mut self, step_mask: &[u8], new_len: usize, past: usize) -> Result<()> {
        if past + new_len > self.capacity || step_mask.len() != self.batch * new_len {
            return Err(Error::Gpu(format!(
                "KV cache mask: {new_len} positions at {past} for {} sequences, room for {}",
                self.batch, self.capacity
            )));
        }
        for b in 0..self.batch {
            let dst = &mut self.host_mask[b * self.capacity + past..b * self.capacity + past + new_len];
            dst.copy_from_slice(&step_mask[b * new_len..(b + 1) * new_len]);
        }
        Ok(())
    }

    /// Bytes per tier: GPU (segments and mask), host, disk.
    pub fn bytes(&self) -> (u64, u64, u64) {
        let mut out = (self.key_mask.mask.bytes(), 0, 0);
        for seg in self.layers.iter().flatten().flat_map(SegmentedTensor::segments) {
            let b = seg.view.byte_len() as u64;
            match seg.view.device() {
                tier_api::DeviceKind::Gpu { .. } => out.0 += b,
                tier_api::DeviceKind::Host { .. } => out.1 += b,
                tier_api::DeviceKind::Disk { .. } => out.2 += b,
            }
        }
        out
    }
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

/// GPU scratch for one 4-bit cache shape: its layout, the packed bytes and
/// the f16 cache they unpack to (zeroed once, so that every value the
/// quantizer reads is finite).
struct PackScratch {
    layout: compression::CompressedLayout,
    packed: Tensor,
    _dense_buf: DevBuf<f16>,
    dense4: Tensor,
}

/// The GPU's 4-bit kernels and scratch, with `--compress-cache`.
struct Packer {
    quant: compression::gpu::GpuQuantizer,
    dequant: compression::gpu::GpuDequantizer,
    scratch: Mutex<std::collections::HashMap<(usize, usize), Arc<PackScratch>>>,
}

/// One GPU slot: a layer's cache for the largest batch, as 4-D tensors
/// over the same memory for the copy matrix.
struct Slot {
    keys: DevBuf<f16>,
    values: DevBuf<f16>,
    keys4: Tensor,
    values4: Tensor,
    batch: usize,
    capacity: usize,
}

struct State {
    slots: Vec<Slot>,
    /// What each slot holds that is not stored yet.
    dirty: [Option<Dirty>; 2],
    /// Whether each slot's event was recorded after its last compute.
    recorded: [bool; 2],
    /// The slot the next layer uses.
    next: usize,
    /// Bytes loaded into and stored from the slots.
    bytes_moved: u64,
}

/// Runs layers over tiered caches: the plan, the tiers, two GPU slots.
pub struct CacheStreamer {
    plan: CachePlan,
    tiers: CacheTiers,
    done: [CudaEvent; 2],
    state: Mutex<State>,
    packer: Option<Packer>,
    /// The CPU's attention threads, with `--cpu-cache-compute`: all cores
    /// but [`IO_CORES`], so that the copy workers and io_uring completions
    /// that keep the disk and PCIe busy are never queued behind them.
    cpu_pool: Option<rayon::ThreadPool>,
    /// The run's copy matrix (copies still queued hold their tensors).
    matrix: Arc<CopyMatrix>,
}

impl std::fmt::Debug for CacheStreamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheStreamer").field("plan", &self.plan).finish_non_exhaustive()
    }
}

impl CacheStreamer {
    /// A streamer for `plan` over `tiers` (the slots are made with the first
    /// cache).
    pub fn new(gpu: &Gpu, plan: CachePlan, tiers: CacheTiers) -> Result<Self> {
        plan.validate()?;
        if plan.cpu_percent > 0.0 && tiers.host.is_none() {
            return Err(Error::Gpu("a cache share in host memory, but no host tier".into()));
        }
        if plan.disk_percent() > 0.0 && tiers.disk.is_none() {
            return Err(Error::Gpu("a cache share on disk, but no disk tier".into()));
        }
        let ev = || gpu.device().new_event(false).map_err(tier_err);
        let done = [ev()?, ev()?];
        let matrix = tiers.matrix.clone();
        let state = State { slots: Vec::new(), dirty: [None, None], recorded: [false; 2], next: 0, bytes_moved: 0 };
        let packer = if plan.compress {
            let err = |e: compression::Error| Error::Gpu(format!("the GPU's 4-bit cache kernels: {e}"));
            Some(Packer {
                quant: compression::gpu::GpuQuantizer::new(gpu.device().clone()).map_err(err)?,
                dequant: compression::gpu::GpuDequantizer::new(gpu.device().clone()).map_err(err)?,
                scratch: Mutex::new(std::collections::HashMap::new()),
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
        Ok(CacheStreamer { plan, tiers, done, state: Mutex::new(state), packer, cpu_pool, matrix })
    }

    /// The plan.
    pub fn plan(&self) -> CachePlan {
        self.plan
    }

    /// The tiers.
    pub fn tiers(&self) -> &CacheTiers {
        &self.tiers
    }

    /// Bytes of the two GPU slots.
    pub fn slot_bytes(&self) -> u64 {
        self.lock().map(|s| s.slots.iter().map(|s| s.keys.bytes() + s.values.bytes()).sum()).unwrap_or(0)
    }

    /// Bytes copied between the slots and the cache's homes so far.
    pub fn bytes_moved(&self) -> u64 {
        self.lock().map(|s| s.bytes_moved).unwrap_or(0)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::Gpu("the cache streamer's state was poisoned by a panic".into()))
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions,
    /// its sequences split over the tiers by the plan; the GPU slots grow
    /// to hold it.
    pub fn new_cache(&self, gpu: &Gpu, config: &OptConfig, batch: usize, capacity: usize) -> Result<TieredCache> {
        let (heads, hd) = (config.num_attention_heads, config.head_dim());
        let shape = Shape::new([batch, heads, capacity, hd]);
        let gpu_dev: Arc<dyn Device> = gpu.device().clone();
        let host_dev: Option<Arc<dyn Device>> = self.tiers.host.clone().map(|h| h as Arc<dyn Device>);
        let disk_dev: Option<Arc<dyn Device>> = self.tiers.disk.clone().map(|d| d as Arc<dyn Device>);
        let p = self.plan;
        let mut placements: Vec<(&dyn Device, f64)> = Vec::new();
        for (dev, share) in [(Some(&gpu_dev), p.gpu_percent), (host_dev.as_ref(), p.cpu_percent)]
            .into_iter()
            .chain([(disk_dev.as_ref(), p.disk_percent())])
        {
            if share > 0.0 {
                let dev = dev.ok_or_else(|| Error::Gpu("a cache share on a tier that was not opened".into()))?;
                placements.push((dev.as_ref(), share));
            }
        }
        // Shares as given sum to 100 up to rounding; make the last exact.
        let sum: f64 = placements.iter().map(|p| p.1).sum();
        if let Some(last) = placements.last_mut() {
            last.1 += 100.0 - sum;
        }
        let packed = match &self.packer {
            Some(packer) => Some(self.pack_scratch(gpu, packer, batch, heads, hd, capacity)?.layout.clone()),
            None => None,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| match &packed {
                // 4-bit: one packed tensor each, whole on its one tier.
                Some(layout) => {
                    let (dev, _) = placements.first().ok_or_else(|| Error::Gpu("no tier for the cache".into()))?;
                    let one = || -> Result<SegmentedTensor> {
                        let t = dev.allocate(&Shape::new([layout.total_bytes()]), DType::U8).map_err(tier_err)?;
                        SegmentedTensor::single(t.view(), 0).map_err(tier_err)
                    };
                    Ok([one()?, one()?])
                }
                None => {
                    let k = SegmentedTensor::allocate(&shape, DType::F16, 0, &placements, 1).map_err(tier_err)?;
                    let v = SegmentedTensor::allocate(&shape, DType::F16, 0, &placements, 1).map_err(tier_err)?;
                    Ok([k, v])
                }
            })
            .collect::<Result<Vec<_>>>()?;
        self.ensure_slots(gpu, batch, heads, hd, capacity)?;
        Ok(TieredCache {
            batch,
            heads,
            head_dim: hd,
            capacity,
            layers,
            len: vec![0; config.num_hidden_layers],
            packed,
            key_mask: KeyMask::new(gpu, batch, capacity)?,
            host_mask: vec![0; batch * capacity],
        })
    }

    /// The GPU scratch of a 4-bit cache of `batch × capacity` positions,
    /// made on first use: the layout (`[batch·heads·capacity, head_dim]`,
    /// groups of up to 64 along the head dimension, FlexGen's), the packed
    /// bytes, the zeroed f16 cache.
    fn pack_scratch(
        &self,
        gpu: &Gpu,
        packer: &Packer,
        batch: usize,
        heads: usize,
        hd: usize,
        capacity: usize,
    ) -> Result<Arc<PackScratch>> {
        let mut scratch = packer.scratch.lock().map_err(|_| Error::Gpu("the 4-bit scratch was poisoned".into()))?;
        if let Some(s) = scratch.get(&(batch, capacity)) {
            return Ok(Arc::clone(s));
        }
        let err = |e: compression::Error| Error::Gpu(format!("the 4-bit cache layout: {e}"));
        let group = (hd.min(compression::DEFAULT_GROUP_SIZE) & !1).max(2);
        let config = compression::CompressionConfig::new(4, group, 1, compression::Mode::Asymmetric).map_err(err)?;
        let rows = batch * heads * capacity;
        let layout =
            compression::CompressedLayout::new(&[rows, hd], compression::SourceDtype::F16, config).map_err(err)?;
        let packed = gpu.device().allocate(&Shape::new([layout.total_bytes()]), DType::U8).map_err(tier_err)?;
        let dense = DevBuf::<f16>::from_host(gpu, &vec![f16::ZERO; rows * hd])?;
        let shape = Shape::new([batch, heads, capacity, hd]);
        let dense4 = Tensor::from_storage(dense.tensor().storage().clone(), shape, DType::F16).map_err(tier_err)?;
        gpu.synchronize()?;
        let s = Arc::new(PackScratch { layout, packed, _dense_buf: dense, dense4 });
        scratch.insert((batch, capacity), Arc::clone(&s));
        Ok(s)
    }

    fn scratch(&self, batch: usize, capacity: usize) -> Result<(&Packer, Arc<PackScratch>)> {
        let packer = self.packer.as_ref().ok_or_else(|| Error::Gpu("a 4-bit cache without its kernels".into()))?;
        let map = packer.scratch.lock().map_err(|_| Error::Gpu("the 4-bit scratch was poisoned".into()))?;
        let s = map.get(&(batch, capacity)).ok_or_else(|| Error::Gpu("no 4-bit scratch for this cache".into()))?;
        Ok((packer, Arc::clone(s)))
    }

    /// A 4-bit home's positions `0..past` unpacked into the slot tensor
    /// `slot4`: the packed bytes to the GPU, unpacked there, the positions
    /// copied into the slot's layout. Returns the bytes moved.
    fn load_packed(&self, home: &SegmentedTensor, slot4: &Tensor, dims: (usize, usize), past: usize) -> Result<u64> {
        let (packer, s) = self.scratch(dims.0, dims.1)?;
        let seg = home.segments().first().ok_or_else(|| Error::Gpu("an empty 4-bit home".into()))?;
        let mut bytes = self.matrix.copy(&seg.view, &s.packed.view()).map_err(tier_err)?.bytes;
        packer
            .dequant
            .dequantize(&s.packed.view(), &s.layout, &s.dense4.view())
            .map_err(|e| Error::Gpu(format!("unpacking the 4-bit cache: {e}")))?;
        let src = s.dense4.narrow(2, 0, past).map_err(tier_err)?;
        let dst = slot4.narrow(0, 0, dims.0).and_then(|v| v.narrow(2, 0, past)).map_err(tier_err)?;
        bytes += self.matrix.copy(&src, &dst).map_err(tier_err)?.bytes;
        Ok(bytes)
    }

    /// The slot's positions `0..len` packed into a 4-bit home (the whole
    /// layer is quantized again: positions past `len` hold earlier, finite
    /// values nobody reads). Returns the bytes moved.
    fn store_packed(&self, slot4: &Tensor, home: &SegmentedTensor, dims: (usize, usize), len: usize) -> Result<u64> {
        let (packer, s) = self.scratch(dims.0, dims.1)?;
        let src = slot4.narrow(0, 0, dims.0).and_then(|v| v.narrow(2, 0, len)).map_err(tier_err)?;
        let dst = s.dense4.narrow(2, 0, len).map_err(tier_err)?;
        let mut bytes = self.matrix.copy(&src, &dst).map_err(tier_err)?.bytes;
        packer
            .quant
            .quantize(&s.dense4.view(), &s.layout, &s.packed.view())
            .map_err(|e| Error::Gpu(format!("packing the 4-bit cache: {e}")))?;
        let seg = home.segments().first().ok_or_else(|| Error::Gpu("an empty 4-bit home".into()))?;
        bytes += self.matrix.copy(&s.packed.view(), &seg.view).map_err(tier_err)?.bytes;
        Ok(bytes)
    }

    /// Makes both slots hold at least `batch × capacity` positions.
    fn ensure_slots(&self, gpu: &Gpu, batch: usize, heads: usize, hd: usize, capacity: usize) -> Result<()> {
        let mut st = self.lock()?;
        if st.slots.iter().all(|s| s.batch >= batch && s.capacity >= capacity) && st.slots.len() == 2 {
            return Ok(());
        }
        self.flush_locked(&mut st)?;
        let (b, c) = st.slots.iter().fold((batch, capacity), |(b, c), s| (b.max(s.batch), c.max(s.capacity)));
        st.slots.clear();
        for _ in 0..2 {
            let keys = DevBuf::alloc(gpu, b * heads * c * hd)?;
            let values = DevBuf::alloc(gpu, b * heads * c * hd)?;
            let shape = Shape::new([b, heads, c, hd]);
            let four = |buf: &DevBuf<f16>| {
                Tensor::from_storage(buf.tensor().storage().clone(), shape.clone(), DType::F16).map_err(tier_err)
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
    fn store_slot(&self, st: &mut State, i: usize) -> Result<()> {
        if st.recorded[i] {
            self.done[i].synchronize().map_err(|e| driver_err("cuEventSynchronize", e))?;
            st.recorded[i] = false;
        }
        if let Some(d) = st.dirty[i].take() {
            let slot = &st.slots[i];
            if let Some(dims) = d.packed {
                let len = d.from + d.n;
                st.bytes_moved += self.store_packed(&slot.keys4, &d.keys, dims, len)?
                    + self.store_packed(&slot.values4, &d.values, dims, len)?;
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

    fn flush_locked(&self, st: &mut State) -> Result<()> {
        for i in 0..st.slots.len().min(2) {
            self.store_slot(st, i)?;
        }
        Ok(())
    }

    /// Stores everything the slots hold unstored (at the end of a step,
    /// before the CPU reads the host cache, before the caches go).
    pub fn flush(&self) -> Result<()> {
        let mut st = self.lock()?;
        self.flush_locked(&mut st)
    }

    /// Layer `j` of a batch whose cache is `tc` (a step of `new_len` new
    /// tokens per sequence), in place on `act`: on the CPU's attention when
    /// decoding with `--cpu-cache-compute`, else on the GPU through a slot.
    pub fn layer(
        &self,
        model: &super::GpuModel,
        j: usize,
        tc: &mut TieredCache,
        act: &super::model::GpuHidden,
        ws: &mut super::model::Workspace,
        new_len: usize,
    ) -> Result<()> {
        let TieredCache { batch, heads, head_dim, capacity, layers, len, packed, key_mask, host_mask } = tc;
        let [keys, values] = layers.get_mut(j).ok_or_else(|| Error::Gpu(format!("no cache for layer {j}")))?;
        let past = len[j];
        let step = super::model::GpuStep { batch: *batch, new_len, past, key_mask };
        if self.plan.cpu_compute && new_len == 1 && past > 0 {
            // Decode attention on the CPU over the host cache.
            let (k, v) = (host_slice_mut(keys)?, host_slice_mut(values)?);
            let dims = AttnDims { batch: *batch, heads: *heads, head_dim: *head_dim, capacity: *capacity };
            let sparsity = self.plan.attn_sparsity;
            let mask: &[u8] = host_mask;
            model.attention_block_with(j, act, ws, &step, &mut |qkv: &[f16], out: &mut [f16]| {
                append_kv(qkv, 1, dims, past, k, v)?;
                let cache = HostCache { keys: k, values: v, key_mask: mask, total: past + 1 };
                match &self.cpu_pool {
                    Some(pool) => pool.install(|| decode_attention(qkv, cache, dims, sparsity, out)),
                    None => decode_attention(qkv, cache, dims, sparsity, out),
                }
            })?;
            len[j] = past + 1;
            return model.mlp_block(j, act, ws, &step);
        }
        let (keys, values) = (keys.clone(), values.clone());
        let mut st = self.lock()?;
        let i = st.next;
        st.next = 1 - i;
        self.store_slot(&mut st, i)?;
        let slot = st.slots.get(i).ok_or_else(|| Error::Gpu("the cache slots were not made".into()))?;
        if slot.batch < *batch || slot.capacity < *capacity {
            return Err(Error::Gpu("a cache larger than the GPU slots".into()));
        }
        let packed = packed.as_ref().map(|_| (*batch, *capacity));
        let loaded = match packed {
            Some(dims) if past > 0 => {
                self.load_packed(&keys, &slot.keys4, dims, past)?
                    + self.load_packed(&values, &slot.values4, dims, past)?
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
        let mut cache = GpuLayerCache::over(
            slot.keys.share(),
            slot.values.share(),
            (*batch, *heads, *head_dim, slot.capacity),
            past,
        );
        st.bytes_moved += loaded;
        // The host waited for the slot's store and load: profiled as its own
        // part.
        model.mark("wait for cache")?;
        // The compute is enqueued with the lock held: the slot is this
        // layer's until its event is recorded.
        model.layer_forward(j, &mut cache, act, ws, &step)?;
        self.done[i].record(model.gpu.stream()).map_err(|e| driver_err("cuEventRecord", e))?;
        st.recorded[i] = true;
        st.dirty[i] = Some(Dirty { keys, values, from: past, n: new_len, packed });
        len[j] = past + new_len;
        Ok(())
    }
}

/// The f16 elements of a segmented tensor held whole in host memory.
fn host_slice_mut(t: &mut SegmentedTensor) -> Result<&mut [f16]> {
    let [seg] = t.segments() else {
        return Err(Error::Gpu("CPU attention over a cache not held whole in host memory".into()));
    };
    let tier_api::Access::Host(span) = seg.view.tensor().storage().access() else {
        return Err(Error::Gpu("CPU attention over a cache not in host memory".into()));
    };
    let elems = span.len() / 2;
    if !(span.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f16>()) || elems * 2 != seg.view.byte_len() {
        return Err(Error::Gpu("a host cache tensor is misaligned or a partial view".into()));
    }
    // SAFETY: the span is the tensor's whole host allocation, aligned for
    // f16 (checked), alive as long as the segmented tensor mutably borrowed
    // here (its cache owns the only handle); no copy touches a host cache
    // while the CPU computes over it (the slots are flushed at every step's
    // end, and CPU decoding uses no slot), so this is the only access for
    // the borrow's duration.
    Ok(unsafe { std::slice::from_raw_parts_mut(span.as_ptr().cast::<f16>(), elems) })
}
