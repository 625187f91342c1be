//! Weights off the GPU, streamed into GPU slots a layer at a time.
//!
//! The placement of `--percent W_GPU W_CPU ...` ([`split_layers`]): the
//! first `a = round(n · W_GPU / 100)` decoder layers stay resident on the
//! GPU; every other layer is streamed, and each of its tensors is a
//! [`SegmentedTensor`] split by rows: the first rows in host memory, the
//! rest on a [`DiskDevice`] in `--offload-dir`, with the host's share chosen
//! so that the host holds `W_CPU`% of the model's layer bytes. Host memory
//! is page-locked when `--pin-weight` and the platform allow (registered
//! memory by default, see [`OffloadTiers::for_split`]), else pageable. The
//! embeddings, the final norm and the projections stay on the GPU. Each
//! segment is copied into the matching rows of a slot's buffer with
//! `CopyMatrix::submit`: DMA for page-locked memory, the pinned relay for
//! pageable memory, the staged disk path for the disk, on the copy matrix's
//! workers, so a layer's host rows and disk rows travel at the same time
//! and both links stay busy every layer (whole layers on disk would leave
//! the disk idle while host layers stream).
//!
//! Streaming ([`WeightStreamer`]): four GPU slots ([`MAX_SLOTS`]; two when
//! four layers or fewer stream), each a whole layer's buffers.
//! [`WeightStreamer::begin_layer`] makes sure layer `j` is in a slot
//! (waiting on its [`CopyHandle`], or copying it now when nothing fetched it
//! ahead) and at once starts copying the streamed layers after it (two
//! ahead, cyclically, so the last layers fetch the first of the next step)
//! into the slots computed on least recently, which held layers `j − 2`
//! and before, whose computes have ended; the engine enqueues every batch's
//! compute of layer `j` on the compute stream; [`WeightStreamer::end_layer`]
//! records an event after it. So the copies run during all of layer `j`'s
//! work, the host's part of it (the CPU's attention) included, a copy is
//! always queued behind the one finishing (a disk read's queue never
//! drains), and memory stays four layers' worth whatever the model's size.
//!
//! With `--sep-layer` (FlexGen's default) a layer's attention-block tensors
//! are copied before its MLP block's and waited for alone
//! ([`WeightStreamer::begin_layer`]); the MLP block's are waited for just
//! before the MLP computes ([`WeightStreamer::begin_mlp`]), so the attention
//! of every batch overlaps the rest of the layer's copy.
//!
//! Start-up: every home tensor is allocated first, on several threads
//! ([`WeightStreamer::allocate_homes`]), then each layer is made on the GPU
//! and copied to its home ([`WeightStreamer::park`]). Host homes are not
//! zeroed first (the copy writes every byte), which saved the CPU a pass
//! over tens of gigabytes of pinned memory.
//!

use std::sync::{Arc, Mutex, MutexGuard};

use tier_api::{CopyHandle, CopyMatrix, Device, SegmentedTensor, Tensor};
use tier_disk::DiskDevice;
use tier_host::HostDevice;

use ops::gpu::{Event, Gpu};

use super::layer::{GpuLayer, InitRule};
use super::packed::LayerWorkspace;
use super::{gpu_err, tier_err};
use crate::error::{Error, Result};
use crate::spec::ModelSpec;

pub use crate::plan::{split_layers, LayerSplit, MAX_WEIGHT_SLOTS as MAX_SLOTS};

/// The tiers the off-GPU layers live on, taken from the run's
/// [`crate::Tiers`].
#[derive(Clone)]
pub struct OffloadTiers {
    /// Host memory for the streamed layers' first rows (page-locked or pageable).
    pub host: Option<Arc<HostDevice>>,
    /// The disk for the streamed layers' other rows.
    pub disk: Option<Arc<DiskDevice>>,
    /// The run's copy matrix.
    pub matrix: Arc<CopyMatrix>,
}

impl OffloadTiers {
    /// The tiers `split` needs: host memory if streamed rows live there
    /// (page-locked when `pin` and the platform allow it: registered unless
    /// `TIERLM_HOST_MEMORY` names a kind; else pageable), a disk in
    /// `offload_dir` if rows live on disk.
    pub fn for_split(
        tiers: &crate::Tiers,
        split: &LayerSplit,
        pin: bool,
        offload_dir: &std::path::Path,
    ) -> Result<Self> {
        use tier_api::HostMemKind;
        use tier_host::HostMemKindExt;
        let host = if split.uses_host() {
            let explicit = std::env::var_os(tier_host::HOST_MEMORY_ENV).is_some_and(|v| !v.is_empty());
            let kind = match HostMemKind::choose(None).map_err(tier_err)?.kind {
                HostMemKind::Pageable => HostMemKind::Pageable,
                _ if !pin => HostMemKind::Pageable,
                // Page-locked weight homes are tens of gigabytes allocated
                // once: an anonymous mapping locked with cuMemHostRegister
                // locks 3.6x faster than cuMemHostAlloc (bench-tiers, H100:
                // 4 GiB in 0.58 s against 2.11 s) and copies at the same
                // rate. TIERLM_HOST_MEMORY=pinned still asks for the other.
                kind if explicit => kind,
                _ => HostMemKind::Registered,
            };
            Some(tiers.host(kind)?)
        } else {
            None
        };
        let disk = if split.uses_disk() { Some(tiers.disk(offload_dir)?) } else { None };
        Ok(OffloadTiers { host, disk, matrix: tiers.matrix()? })
    }
}

/// Copy rates into a GPU slot, bytes per second ([`WeightStreamer::copy_rates`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkRates {
    /// A layer's host rows alone (DMA or the pinned relay).
    pub host: Option<f64>,
    /// A layer's disk rows alone (the staged disk path).
    pub disk: Option<f64>,
    /// A whole layer, both links at once.
    pub layer: Option<f64>,
}

/// One off-GPU layer: a tensor per GPU buffer of the layer, in
/// [`GpuLayer::tensors`]' order, split by rows over host and disk.
struct HomeLayer {
    tensors: Vec<SegmentedTensor>,
}

/// A copy in flight into a slot.
struct Pending {
    slot: usize,
    layer: usize,
    /// The attention block's tensors (all of them without `--sep-layer`).
    handle: CopyHandle,
    /// The MLP block's, with `--sep-layer`.
    mlp: CopyHandle,
}

// GPU slots when more than this many layers stream ([`MAX_SLOTS`], the
// plan's): the layer computing, the one computed before it (its compute may
// still run), and two being copied, so that the links always have a copy
// queued behind the one finishing (a disk read's queue drains and refills at
// every copy's end otherwise).

/// Copies in flight at most: every slot but the two in use.
const PREFETCH: usize = MAX_SLOTS - 2;

struct State {
    /// Which layer each slot holds (None while empty or being written).
    holds: Vec<Option<usize>>,
    /// Whether the slot's event was recorded after the last compute that
    /// read it.
    recorded: Vec<bool>,
    /// When each slot was last computed on (a tick per layer).
    used_at: Vec<u64>,
    tick: u64,
    /// The layer computed last.
    last: Option<usize>,
    /// Copies in flight, oldest first.
    pending: std::collections::VecDeque<Pending>,
    /// With `--sep-layer`: the MLP block's tensors of the layer in use,
    /// still arriving.
    mlp_pending: Option<(usize, CopyHandle)>,
    /// Bytes copied into the slots so far.
    bytes_streamed: u64,
}

/// Where a tiered model's start-up went, seconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StartupTimes {
    /// Allocating (and page-locking) every home tensor.
    pub homes_s: f64,
    /// Making each streamed layer on the GPU and copying it to its home.
    pub park_s: f64,
}

/// Off-GPU layers and the GPU slots they stream through.
pub struct WeightStreamer {
    /// Filled in by the loader.
    pub startup: StartupTimes,
    split: LayerSplit,
    /// `homes[i]` is layer `split.gpu_end + i`.
    homes: Vec<HomeLayer>,
    slots: Vec<GpuLayer>,
    /// Recorded on the compute stream after the last compute reading each slot.
    done: Vec<Event>,
    state: Mutex<State>,
    tiers: OffloadTiers,
    /// `--sep-layer`: see [`WeightStreamer::set_sep_layer`].
    sep_layer: bool,
    /// The run's copy matrix (copies still queued hold their tensors).
    matrix: Arc<CopyMatrix>,
}

impl std::fmt::Debug for WeightStreamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStreamer").field("split", &self.split).finish_non_exhaustive()
    }
}

impl Drop for WeightStreamer {
    fn drop(&mut self) {
        // A prefetch may still be writing into a slot: let it finish (the
        // views it holds keep the memory alive either way).
        if let Ok(mut st) = self.state.lock() {
            while let Some(p) = st.pending.pop_front() {
                let _ = p.handle.wait();
                let _ = p.mlp.wait();
            }
            if let Some((_, h)) = st.mlp_pending.take() {
                let _ = h.wait();
            }
        }
    }
}

impl WeightStreamer {
    /// Sets up the slots (layers of `spec` on the GPU, their buffers
    /// allocated by seeding them with `rule`) and the copy matrix (the GPU
    /// routes added) for `split`; the homes are added with
    /// [`WeightStreamer::park`], in layer order. With `compressed` (the
    /// shared f16 workspace of `--compress-weight`) the slots, and so the
    /// homes, hold packed matrices.
    pub fn new(
        gpu: &Gpu,
        (spec, rule): (&ModelSpec, InitRule),
        split: LayerSplit,
        tiers: OffloadTiers,
        compressed: Option<&LayerWorkspace>,
    ) -> Result<Self> {
        if split.uses_host() && tiers.host.is_none() {
            return Err(gpu_err("layers on the host, but no host tier".into()));
        }
        if split.uses_disk() && tiers.disk.is_none() {
            return Err(gpu_err("layers on disk, but no disk tier".into()));
        }
        // The slots' contents are overwritten before any use; seeded values
        // are only the cheapest way to allocate a layer's buffers.
        let slot = || -> Result<GpuLayer> {
            let w = GpuLayer::dummy(gpu, spec, 0, 0, rule)?;
            match compressed {
                Some(ws) => w.compress(gpu, ws),
                None => Ok(w),
            }
        };
        // Four slots let copies run two layers ahead of the compute; with
        // four layers or fewer streaming, two, so that every step still
        // streams them (and nothing stays on the GPU that a larger model's
        // run would not keep).
        let n = crate::plan::weight_slots(split.offloaded());
        let slots = (0..n).map(|_| slot()).collect::<Result<Vec<_>>>()?;
        // The fills run on the compute stream; copies into the slots run on
        // copy streams.
        gpu.synchronize()?;
        let done = (0..n).map(|_| Ok(Event::new(gpu)?)).collect::<Result<Vec<_>>>()?;
        let state = State {
            holds: vec![None; n],
            recorded: vec![false; n],
            used_at: vec![0; n],
            tick: 0,
            last: None,
            pending: std::collections::VecDeque::with_capacity(PREFETCH),
            mlp_pending: None,
            bytes_streamed: 0,
        };
        let matrix = tiers.matrix.clone();
        Ok(WeightStreamer {
            startup: StartupTimes::default(),
            split,
            homes: Vec::with_capacity(split.layers - split.gpu_end),
            slots,
            done,
            state: Mutex::new(state),
            tiers,
            sep_layer: false,
            matrix,
        })
    }

    /// The split.
    pub fn split(&self) -> LayerSplit {
        self.split
    }

    /// The tiers the layers live on.
    pub fn tiers(&self) -> &OffloadTiers {
        &self.tiers
    }

    /// Bytes copied into the GPU slots so far.
    pub fn bytes_streamed(&self) -> u64 {
        self.lock().map(|s| s.bytes_streamed).unwrap_or(0)
    }

    /// Bytes of one layer's slot on the GPU.
    pub fn slot_bytes(&self) -> u64 {
        self.slots[0].bytes()
    }

    /// GPU slots.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| gpu_err("the weight streamer's state was poisoned by a panic".into()))
    }

    /// Bytes of the streamed layers in host memory and on disk.
    pub fn home_bytes(&self) -> (u64, u64) {
        let mut out = (0, 0);
        for seg in self.homes.iter().flat_map(|h| &h.tensors).flat_map(|t| t.segments()) {
            let bytes = seg.view.byte_len() as u64;
            match seg.view.tensor().device() {
                tier_api::DeviceKind::Disk { .. } => out.1 += bytes,
                _ => out.0 += bytes,
            }
        }
        out
    }

    /// Allocates every off-GPU layer's tensors on their tiers (each
    /// tensor's rows split by [`LayerSplit::rows`]), on up to `threads`
    /// threads at once (largest first): page-locking host memory is done by
    /// the allocating thread and dominates start-up for tens of gigabytes.
    /// Host homes are allocated with [`HostDevice::allocate_uninit`] (not
    /// zeroed first): [`Self::park`] overwrites every byte of every home
    /// tensor before anything reads it.
    pub fn allocate_homes(&mut self, threads: usize) -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let specs: Vec<(tier_api::Shape, tier_api::DType)> =
            self.slots[0].tensors().iter().map(|t| (t.shape().clone(), t.dtype())).collect();
        // Every piece to allocate: (layer, tensor, part 0 = host / 1 = disk, shape, bytes).
        let off = self.split.offloaded();
        let mut items = Vec::new();
        for (k, (shape, dtype)) in specs.iter().enumerate() {
            let rows = shape.dims().first().copied().unwrap_or(1);
            for (part, range) in self.split.rows(rows).into_iter().enumerate() {
                if range.is_empty() {
                    continue;
                }
                let mut dims = shape.dims().to_vec();
                if let Some(d) = dims.first_mut() {
                    *d = range.len();
                }
                let piece = tier_api::Shape::new(dims);
                let bytes = piece.byte_size(*dtype).map_err(tier_err)?;
                items.extend((0..off).map(|i| (i, k, part, piece.clone(), bytes)));
            }
        }
        items.sort_by_key(|it| std::cmp::Reverse(it.4));
        let (host, disk) = (self.tiers.host.clone(), self.tiers.disk.clone());
        if items.iter().any(|it| it.2 == 0) && host.is_none() || items.iter().any(|it| it.2 == 1) && disk.is_none() {
            return Err(gpu_err(format!("the split {:?} needs a tier that was not opened", self.split)));
        }
        type Made = Vec<Vec<[Option<Tensor>; 2]>>;
        let made: Mutex<Made> = Mutex::new(vec![vec![[None, None]; specs.len()]; off]);
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads.clamp(1, 16) {
                scope.spawn(|| loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some((i, k, part, shape, _)) = items.get(n) else { break };
                    if crate::interrupt::requested() {
                        if let Ok(mut f) = first_error.lock() {
                            f.get_or_insert(Error::Interrupted);
                        }
                        next.store(items.len(), Ordering::Relaxed);
                        break;
                    }
                    let dtype = specs[*k].1;
                    let allocated = match (&host, &disk, part) {
                        (Some(h), _, 0) => h.allocate_uninit(shape, dtype),
                        (_, Some(d), _) => d.allocate(shape, dtype),
                        _ => Err(tier_api::Error::Config("no tier for a home tensor".into())),
                    };
                    match allocated {
                        Ok(t) => {
                            if let Ok(mut m) = made.lock() {
                                m[*i][*k][*part] = Some(t);
                            }
                        }
                        Err(e) => {
                            if let Ok(mut f) = first_error.lock() {
                                f.get_or_insert(tier_err(e));
                            }
                            // Stop every thread: the run cannot go on.
                            next.store(items.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().ok().flatten() {
            return Err(e);
        }
        let made = made.into_inner().map_err(|_| gpu_err("home allocation panicked".into()))?;
        let split = self.split;
        self.homes = made
            .into_iter()
            .map(|layer| {
                let tensors = layer
                    .into_iter()
                    .zip(&specs)
                    .map(|(parts, (shape, dtype))| {
                        let rows = shape.dims().first().copied().unwrap_or(1);
                        let segments = split
                            .rows(rows)
                            .into_iter()
                            .zip(parts)
                            .filter_map(|(range, t)| t.map(|t| tier_api::Segment { range, view: t.view() }))
                            .collect();
                        SegmentedTensor::from_segments(shape, *dtype, 0, segments).map_err(tier_err)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(HomeLayer { tensors })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(())
    }

    fn home(&self, layer: usize) -> Result<&HomeLayer> {
        self.homes
            .get(layer.wrapping_sub(self.split.gpu_end))
            .ok_or_else(|| gpu_err(format!("layer {layer} has no off-GPU home")))
    }

    /// Copies layer `index` (off the GPU), made on the GPU in `layer`
    /// (everything enqueued on `gpu`'s stream), into its home tensors
    /// (from [`WeightStreamer::allocate_homes`]); `layer` is freed after.
    pub fn park(&mut self, gpu: &Gpu, index: usize, layer: GpuLayer) -> Result<()> {
        let home = self.home(index)?;
        // The layer's values must be on the GPU before a copy stream reads them.
        gpu.synchronize()?;
        let src = layer.tensors();
        if src.len() != home.tensors.len() {
            return Err(gpu_err(format!(
                "layer {index}: {} buffers for {} home tensors",
                src.len(),
                home.tensors.len()
            )));
        }
        let mut handle = CopyHandle::empty();
        for (t, h) in src.into_iter().zip(&home.tensors) {
            let t = SegmentedTensor::single(t.view(), 0).map_err(tier_err)?;
            handle = handle.join(self.matrix.submit_segmented(&t, h).map_err(tier_err)?);
        }
        handle.wait().map_err(tier_err)?;
        drop(layer);
        Ok(())
    }

    /// The next off-GPU layer after `j`, cyclically (`None` if `j` is the
    /// only one).
    fn next_offloaded(&self, j: usize) -> Option<usize> {
        let (first, n) = (self.split.gpu_end, self.split.layers);
        let next = if j + 1 < n && j + 1 >= first { j + 1 } else { first };
        (next != j && next < n).then_some(next)
    }

    /// Starts copying layer `layer` into slot `slot`, after the compute that
    /// last read the slot has finished.
    fn submit(&self, st: &mut State, slot: usize, layer: usize) -> Result<()> {
        let home = self.home(layer)?;
        if st.recorded[slot] {
            self.done[slot].synchronize()?;
            st.recorded[slot] = false;
        }
        st.holds[slot] = None;
        let dst = self.slots[slot].tensors();
        if dst.len() != home.tensors.len() {
            return Err(gpu_err(format!(
                "layer {layer}: {} home tensors for {} slot buffers",
                home.tensors.len(),
                dst.len()
            )));
        }
        // The attention block's tensors first: with --sep-layer the layer
        // starts computing once they are in, the MLP's still arriving.
        let mlp = if self.sep_layer { self.slots[slot].mlp_tensors() } else { vec![false; dst.len()] };
        let (mut handle, mut mlp_handle) = (CopyHandle::empty(), CopyHandle::empty());
        for want_mlp in [false, true] {
            for ((src, d), &is_mlp) in home.tensors.iter().zip(&dst).zip(&mlp) {
                if is_mlp != want_mlp {
                    continue;
                }
                let d = SegmentedTensor::single(d.view(), 0).map_err(tier_err)?;
                let h = self.matrix.submit_segmented(src, &d).map_err(tier_err)?;
                if is_mlp {
                    mlp_handle = mlp_handle.join(h);
                } else {
                    handle = handle.join(h);
                }
            }
        }
        st.pending.push_back(Pending { slot, layer, handle, mlp: mlp_handle });
        Ok(())
    }

    /// Waits for the copies in flight, oldest first, until the one bringing
    /// `layer` has arrived (all of them for `None`), and records where they
    /// went.
    fn finish_until(&self, st: &mut State, layer: Option<usize>) -> Result<()> {
        if layer.is_none() {
            self.finish_mlp(st)?;
        }
        while let Some(p) = st.pending.pop_front() {
            let report = p.handle.wait().map_err(tier_err)?;
            st.bytes_streamed += report.bytes;
            st.holds[p.slot] = Some(p.layer);
            if layer == Some(p.layer) && self.sep_layer {
                // The MLP block's tensors may land while the attention
                // computes ([`WeightStreamer::begin_mlp`] waits for them).
                self.finish_mlp(st)?;
                st.mlp_pending = Some((p.layer, p.mlp));
                break;
            }
            st.bytes_streamed += p.mlp.wait().map_err(tier_err)?.bytes;
            if layer == Some(p.layer) {
                break;
            }
        }
        Ok(())
    }

    /// Waits for the MLP block's tensors still arriving, if any.
    fn finish_mlp(&self, st: &mut State) -> Result<()> {
        if let Some((_, h)) = st.mlp_pending.take() {
            st.bytes_streamed += h.wait().map_err(tier_err)?.bytes;
        }
        Ok(())
    }

    /// Before layer `j`'s MLP block is enqueued: its tensors are in the
    /// slot (with `--sep-layer` they may still have been arriving while the
    /// attention block computed).
    pub fn begin_mlp(&self, j: usize) -> Result<()> {
        let mut st = self.lock()?;
        if st.mlp_pending.as_ref().is_some_and(|(l, _)| *l == j) {
            self.finish_mlp(&mut st)?;
        }
        Ok(())
    }

    /// With `sep` (`--sep-layer`, FlexGen's default), a layer's attention
    /// block computes as soon as its own tensors are in a slot, the MLP
    /// block's still copying; without, a layer waits for all of it.
    pub fn set_sep_layer(&mut self, sep: bool) {
        self.sep_layer = sep;
    }

    fn finish_pending(&self, st: &mut State) -> Result<()> {
        self.finish_until(st, None)
    }

    /// The least recently computed-on slot holding none of `avoid` and not
    /// being written, if any.
    fn pick_slot(st: &State, avoid: &[Option<usize>]) -> Option<usize> {
        (0..st.holds.len())
            .filter(|&s| !st.pending.iter().any(|p| p.slot == s))
            .filter(|&s| st.holds[s].is_none() || !avoid.contains(&st.holds[s]))
            .min_by_key(|&s| (st.holds[s].is_some(), st.used_at[s]))
    }

    /// Starts copying the streamed layers after `j` (as many as there are
    /// slots free of `j`, of the layer computed before it, and of the
    /// layers already on their way) that are not in a slot or on their way.
    fn prefetch_after(&self, st: &mut State, j: usize) -> Result<()> {
        let depth = st.holds.len().saturating_sub(2).max(1);
        let mut ahead = Vec::with_capacity(depth);
        let mut at = j;
        for _ in 0..depth {
            match self.next_offloaded(at) {
                Some(n) if n != j && !ahead.contains(&Some(n)) => {
                    ahead.push(Some(n));
                    at = n;
                }
                _ => break,
            }
        }
        for (d, &next) in ahead.iter().enumerate() {
            let Some(layer) = next else { continue };
            if st.holds.contains(&next) || st.pending.iter().any(|p| p.layer == layer) {
                continue;
            }
            if st.pending.len() >= depth {
                break;
            }
            let mut avoid = vec![Some(j), st.last];
            avoid.extend_from_slice(&ahead[..d]);
            match Self::pick_slot(st, &avoid) {
                Some(slot) => self.submit(st, slot, layer)?,
                None => break,
            }
        }
        Ok(())
    }

    /// Makes sure layer `j` (off the GPU) is in a slot before its compute is
    /// enqueued: waits for its prefetch, or copies it now; then starts
    /// copying the next streamed layers, so that they arrive while `j`
    /// computes.
    pub fn begin_layer(&self, j: usize) -> Result<()> {
        if j < self.split.gpu_end {
            return Ok(());
        }
        let mut st = self.lock()?;
        if !st.holds.contains(&Some(j)) {
            if st.pending.iter().any(|p| p.layer == j) {
                self.finish_until(&mut st, Some(j))?;
            } else {
                // Nothing fetched it ahead (the first layer of a run, or a
                // different order): copy it into a slot not holding the
                // layer computed last, and wait.
                self.finish_pending(&mut st)?;
                let last = st.last;
                let slot = Self::pick_slot(&st, &[last]).unwrap_or(0);
                self.submit(&mut st, slot, j)?;
                self.finish_pending(&mut st)?;
            }
        }
        self.prefetch_after(&mut st, j)
    }

    /// After every batch's compute of layer `j` is enqueued: marks its slot
    /// busy until that compute ends, and (if [`Self::begin_layer`] could
    /// not) starts copying the next streamed layer.
    pub fn end_layer(&self, gpu: &Gpu, j: usize) -> Result<()> {
        let mut st = self.lock()?;
        if let Some(s) = st.holds.iter().position(|&h| h == Some(j)) {
            self.done[s].record(gpu)?;
            st.recorded[s] = true;
            st.tick += 1;
            st.used_at[s] = st.tick;
        }
        let Some(next) = self.next_offloaded(j) else { return Ok(()) };
        if st.holds.contains(&Some(next)) || st.pending.iter().any(|p| p.layer == next) {
            st.last = Some(j);
            return Ok(());
        }
        self.finish_pending(&mut st)?;
        let slot = Self::pick_slot(&st, &[Some(j)]).unwrap_or(0);
        st.last = Some(j);
        self.submit(&mut st, slot, next)
    }

    /// The rates at which the first streamed layer's host rows, its disk
    /// rows, and the whole layer copy into a slot through their routes,
    /// bytes per second: after one untimed copy of the whole layer, the best
    /// of five each, timed on the host around submit and wait (what the
    /// engine itself waits on). `None` for a part the split does not have;
    /// with no disk rows the host rows are the whole layer, and the better
    /// of the two figures is the host's.
    pub fn copy_rates(&self) -> Result<LinkRates> {
        let layer = self.split.gpu_end;
        let mut st = self.lock()?;
        self.finish_pending(&mut st)?;
        st.holds[0] = None;
        let home = self.home(layer)?;
        let dst = self.slots[0].tensors();
        let time = |part: Option<bool>| -> Result<Option<f64>> {
            let mut best = f64::INFINITY;
            let mut bytes = 0;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                let mut handle = CopyHandle::empty();
                for (src, d) in home.tensors.iter().zip(&dst) {
                    for seg in src.segments() {
                        let on_disk = matches!(seg.view.device(), tier_api::DeviceKind::Disk { .. });
                        if part.is_some_and(|disk| disk != on_disk) {
                            continue;
                        }
                        let d = d.narrow(0, seg.range.start, seg.range.len()).map_err(tier_err)?;
                        handle = handle.join(self.matrix.submit(seg.view.clone(), d).map_err(tier_err)?);
                    }
                }
                bytes = handle.wait().map_err(tier_err)?.bytes;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok((bytes > 0).then(|| bytes as f64 / best.max(1e-9)))
        };
        time(None)?; // warm-up: the first copies after loading ran slower (37 against 53 GB/s)
        let host = if self.split.uses_host() { time(Some(false))? } else { None };
        let disk = if self.split.uses_disk() { time(Some(true))? } else { None };
        let layer = time(None)?;
        let host = match (disk, host, layer) {
            (None, Some(h), Some(l)) => Some(h.max(l)),
            _ => host,
        };
        Ok(LinkRates { host, disk, layer })
    }

    /// Layer `j`'s weights in its slot, once [`WeightStreamer::begin_layer`]
    /// has run for it.
    pub fn weights(&self, j: usize) -> Result<&GpuLayer> {
        let st = self.lock()?;
        match st.holds.iter().position(|&h| h == Some(j)) {
            Some(s) => Ok(&self.slots[s]),
            None => Err(gpu_err(format!("layer {j}'s weights are not in a GPU slot (begin_layer was not called)"))),
        }
    }
}
