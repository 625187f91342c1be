//! Weights off the GPU, streamed into two GPU slots a layer at a time.
//!
//! The first tiered placement (`--percent W_GPU W_CPU 100 0 100 0`): the
//! decoder layers are split **by whole layers, in order**: layers `0..a`
//! stay resident on the GPU, `a..b` live in host memory (pinned when
//! `--pin-weight` and the platform allow, else pageable), `b..n` on a
//! [`DiskDevice`] in `--offload-dir`, where `a = round(n · W_GPU / 100)` and
//! `b = a + round(n · W_CPU / 100)` (at most `n`). The embeddings, the final
//! norm and the projections stay on the GPU. Every off-GPU layer is a set
//! of tier tensors, one per GPU buffer of [`GpuLayerWeights`] (same dtype,
//! same length), so that a copy is a plain `CopyMatrix::submit` of each
//! tensor into the matching buffer of a slot: the copy matrix picks DMA for
//! pinned memory, the pinned relay for pageable memory and the staged disk
//! path for the disk, and runs them on its workers and the GPU's copy
//! streams.
//!
//! Streaming ([`WeightStreamer`]): two GPU slots, each a whole layer's
//! buffers. [`WeightStreamer::begin_layer`] makes sure layer `j` is in a
//! slot (waiting on its [`CopyHandle`], or copying it now when nothing
//! fetched it ahead); the engine enqueues every batch's compute of layer `j`
//! on the compute stream; [`WeightStreamer::end_layer`] records an event
//! after it and starts copying the next off-GPU layer (cyclically, so the
//! last layer fetches the first of the next step) into the other slot, once
//! the compute that last read that slot (layer `j − 1`) has finished. So
//! layer `j + 1`'s copy runs while layer `j` computes, and memory stays two
//! layers' worth whatever the model's size.
//!
//! Start-up: every home tensor is allocated first, on several threads
//! ([`WeightStreamer::allocate_homes`]), then each layer is made on the GPU
//! and copied to its home ([`WeightStreamer::park`]). Host homes are not
//! zeroed first (the copy writes every byte), which saved the CPU a pass
//! over tens of gigabytes of pinned memory.
//!
//! Splitting each tensor's rows by the percentages (`SegmentedTensor`) is
//! the follow-up: by whole layers, small models cannot hit the asked
//! percentages exactly (`split_layers` rounds).

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::CudaEvent;
use tier_api::{CopyConfig, CopyHandle, CopyMatrix, Device, Tensor};
use tier_disk::DiskDevice;
use tier_host::HostDevice;

use super::packed::LayerWorkspace;
use super::weights::GpuLayerWeights;
use super::{driver_err, tier_err, Gpu};
use crate::config::OptConfig;
use crate::error::{Error, Result};

/// Where the decoder layers live: `0..gpu_end` on the GPU, `gpu_end..host_end`
/// in host memory, `host_end..layers` on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSplit {
    pub layers: usize,
    pub gpu_end: usize,
    pub host_end: usize,
}

impl LayerSplit {
    /// Layers on the host.
    pub fn host_layers(&self) -> usize {
        self.host_end - self.gpu_end
    }

    /// Layers on disk.
    pub fn disk_layers(&self) -> usize {
        self.layers - self.host_end
    }

    /// Whether any layer lives off the GPU.
    pub fn streams(&self) -> bool {
        self.gpu_end < self.layers
    }
}

/// Splits `layers` by whole layers: the GPU's share first, then the host's,
/// the rest on disk (each share rounded to the nearest layer).
pub fn split_layers(layers: usize, w_gpu_percent: f64, w_cpu_percent: f64) -> LayerSplit {
    let share = |p: f64| ((layers as f64) * p.clamp(0.0, 100.0) / 100.0).round() as usize;
    let gpu_end = share(w_gpu_percent).min(layers);
    let host_end = (gpu_end + share(w_cpu_percent)).min(layers);
    LayerSplit { layers, gpu_end, host_end }
}

/// The tiers the off-GPU layers live on.
#[derive(Clone)]
pub struct OffloadTiers {
    /// Host memory for `gpu_end..host_end` (pinned or pageable).
    pub host: Option<Arc<HostDevice>>,
    /// The disk for `host_end..layers`.
    pub disk: Option<Arc<DiskDevice>>,
}

impl OffloadTiers {
    /// The tiers `split` needs: host memory (pinned when `pin` and the
    /// platform allow it, else pageable) if any layer is on the host, a disk
    /// in `offload_dir` if any is on disk.
    pub fn for_split(split: &LayerSplit, pin: bool, offload_dir: &std::path::Path) -> Result<Self> {
        use tier_api::HostMemKind;
        use tier_host::{HostConfig, HostMemKindExt};
        let host = if split.host_layers() > 0 {
            let kind = match HostMemKind::choose(None).map_err(tier_err)?.kind {
                HostMemKind::Pageable => HostMemKind::Pageable,
                _ if !pin => HostMemKind::Pageable,
                _ => HostMemKind::Pinned,
            };
            Some(HostDevice::new(HostConfig { kind, ..HostConfig::default() }).map_err(tier_err)?)
        } else {
            None
        };
        let disk = if split.disk_layers() > 0 {
            std::fs::create_dir_all(offload_dir).map_err(|e| Error::io(offload_dir, e))?;
            Some(DiskDevice::new(tier_disk::DiskConfig::new(offload_dir)).map_err(tier_err)?)
        } else {
            None
        };
        Ok(OffloadTiers { host, disk })
    }
}

/// One off-GPU layer: a tier tensor per GPU buffer of the layer, in
/// [`GpuLayerWeights::tensors`]' order.
struct HomeLayer {
    tensors: Vec<Tensor>,
}

/// A copy in flight into a slot.
struct Pending {
    slot: usize,
    layer: usize,
    handle: CopyHandle,
}

struct State {
    /// Which layer each slot holds (None while empty or being written).
    holds: [Option<usize>; 2],
    /// Whether the slot's event was recorded after the last compute that
    /// read it.
    recorded: [bool; 2],
    pending: Option<Pending>,
    /// Bytes copied into the slots so far.
    bytes_streamed: u64,
}

/// Off-GPU layers and the two GPU slots they stream through.
pub struct WeightStreamer {
    split: LayerSplit,
    /// `homes[i]` is layer `split.gpu_end + i`.
    homes: Vec<HomeLayer>,
    slots: [GpuLayerWeights; 2],
    /// Recorded on the compute stream after the last compute reading each slot.
    done: [CudaEvent; 2],
    state: Mutex<State>,
    tiers: OffloadTiers,
    /// Last, so that copies still queued drain before the tensors go.
    matrix: CopyMatrix,
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
            if let Some(p) = st.pending.take() {
                let _ = p.handle.wait();
            }
        }
    }
}

impl WeightStreamer {
    /// Sets up the slots (two layers' buffers on the GPU) and the copy
    /// matrix (the GPU routes added) for `split`; the homes are added with
    /// [`WeightStreamer::park`], in layer order. With `compressed` (the
    /// shared f16 workspace of `--compress-weight`) the slots, and so the
    /// homes, hold packed matrices.
    pub fn new(
        gpu: &Gpu,
        config: &OptConfig,
        split: LayerSplit,
        tiers: OffloadTiers,
        compressed: Option<&LayerWorkspace>,
    ) -> Result<Self> {
        if split.host_layers() > 0 && tiers.host.is_none() {
            return Err(Error::Gpu("layers on the host, but no host tier".into()));
        }
        if split.disk_layers() > 0 && tiers.disk.is_none() {
            return Err(Error::Gpu("layers on disk, but no disk tier".into()));
        }
        // The slots' contents are overwritten before any use; seeded values
        // are only the cheapest way to allocate a layer's buffers.
        let slot = || -> Result<GpuLayerWeights> {
            let w = GpuLayerWeights::dummy(gpu, config, 0, 0)?;
            match compressed {
                Some(ws) => w.compress(gpu, config, ws),
                None => Ok(w),
            }
        };
        let slots = [slot()?, slot()?];
        // The fills run on the compute stream; copies into the slots run on
        // copy streams.
        gpu.synchronize()?;
        let ev = || gpu.device().new_event(false).map_err(tier_err);
        let done = [ev()?, ev()?];
        let matrix = tier_cuda::copy_matrix(CopyConfig { workers: 4, queue_capacity: 64 }).map_err(tier_err)?;
        Ok(WeightStreamer {
            split,
            homes: Vec::with_capacity(split.layers - split.gpu_end),
            slots,
            done,
            state: Mutex::new(State { holds: [None; 2], recorded: [false; 2], pending: None, bytes_streamed: 0 }),
            tiers,
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

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::Gpu("the weight streamer's state was poisoned by a panic".into()))
    }

    /// The tier layer `layer` lives on.
    fn device_for(&self, layer: usize) -> Result<Arc<dyn Device>> {
        let device: Option<Arc<dyn Device>> = if layer < self.split.host_end {
            self.tiers.host.clone().map(|h| h as Arc<dyn Device>)
        } else {
            self.tiers.disk.clone().map(|d| d as Arc<dyn Device>)
        };
        device.ok_or_else(|| Error::Gpu(format!("no tier for layer {layer}")))
    }

    /// Allocates every off-GPU layer's tensors on their tiers, on up to
    /// `threads` threads at once (largest first): pinned memory is locked
    /// by the allocating thread, which dominates start-up for tens of
    /// gigabytes. Host homes are allocated with
    /// [`HostDevice::allocate_uninit`] (not zeroed first): [`Self::park`]
    /// overwrites every byte of every home tensor before anything reads it.
    pub fn allocate_homes(&mut self, threads: usize) -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let specs: Vec<(tier_api::Shape, tier_api::DType, usize)> =
            self.slots[0].tensors().iter().map(|t| (t.shape().clone(), t.dtype(), t.byte_len())).collect();
        let off = self.split.layers - self.split.gpu_end;
        let devices = (0..off).map(|i| self.device_for(self.split.gpu_end + i)).collect::<Result<Vec<_>>>()?;
        let host = self.tiers.host.clone();
        let split = self.split;
        let on_host = move |i: usize| split.gpu_end + i < split.host_end;
        let mut items: Vec<(usize, usize)> = (0..off).flat_map(|i| (0..specs.len()).map(move |k| (i, k))).collect();
        items.sort_by_key(|&(_, k)| std::cmp::Reverse(specs[k].2));
        let made: Mutex<Vec<Vec<Option<Tensor>>>> = Mutex::new(vec![vec![None; specs.len()]; off]);
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads.clamp(1, 16) {
                scope.spawn(|| loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, k)) = items.get(n) else { break };
                    let (shape, dtype, _) = &specs[k];
                    let allocated = match (&host, on_host(i)) {
                        (Some(h), true) => h.allocate_uninit(shape, *dtype),
                        _ => devices[i].allocate(shape, *dtype),
                    };
                    match allocated {
                        Ok(t) => {
                            if let Ok(mut m) = made.lock() {
                                m[i][k] = Some(t);
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
        let made = made.into_inner().map_err(|_| Error::Gpu("home allocation panicked".into()))?;
        self.homes = made
            .into_iter()
            .map(|tensors| {
                let tensors = tensors.into_iter().collect::<Option<Vec<_>>>();
                tensors.map(|tensors| HomeLayer { tensors })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::Gpu("a home tensor was not allocated".into()))?;
        Ok(())
    }

    /// Copies layer `index` (off the GPU), made on the GPU in `layer`
    /// (everything enqueued on `gpu`'s stream), into its home tensors
    /// (from [`WeightStreamer::allocate_homes`]); `layer` is freed after.
    pub fn park(&mut self, gpu: &Gpu, index: usize, layer: GpuLayerWeights) -> Result<()> {
        let home = self
            .homes
            .get(index.wrapping_sub(self.split.gpu_end))
            .ok_or_else(|| Error::Gpu(format!("layer {index} has no home allocated")))?;
        // The layer's values must be on the GPU before a copy stream reads them.
        gpu.synchronize()?;
        let src = layer.tensors();
        if src.len() != home.tensors.len() {
            return Err(Error::Gpu(format!(
                "layer {index}: {} buffers for {} home tensors",
                src.len(),
                home.tensors.len()
            )));
        }
        let mut handle = CopyHandle::empty();
        for (t, h) in src.into_iter().zip(&home.tensors) {
            handle = handle.join(self.matrix.submit(t.view(), h.view()).map_err(tier_err)?);
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
        let home = self
            .homes
            .get(layer.wrapping_sub(self.split.gpu_end))
            .ok_or_else(|| Error::Gpu(format!("layer {layer} has no off-GPU home")))?;
        if st.recorded[slot] {
            self.done[slot].synchronize().map_err(|e| driver_err("cuEventSynchronize", e))?;
            st.recorded[slot] = false;
        }
        st.holds[slot] = None;
        let dst = self.slots[slot].tensors();
        if dst.len() != home.tensors.len() {
            return Err(Error::Gpu(format!(
                "layer {layer}: {} home tensors for {} slot buffers",
                home.tensors.len(),
                dst.len()
            )));
        }
        let mut handle = CopyHandle::empty();
        for (src, d) in home.tensors.iter().zip(dst) {
            handle = handle.join(self.matrix.submit(src.view(), d.view()).map_err(tier_err)?);
        }
        st.pending = Some(Pending { slot, layer, handle });
        Ok(())
    }

    /// Waits for the copy in flight, if any, and records where it went.
    fn finish_pending(&self, st: &mut State) -> Result<()> {
        if let Some(p) = st.pending.take() {
            let report = p.handle.wait().map_err(tier_err)?;
            st.bytes_streamed += report.bytes;
            st.holds[p.slot] = Some(p.layer);
        }
        Ok(())
    }

    /// Makes sure layer `j` (off the GPU) is in a slot before its compute is
    /// enqueued: waits for its prefetch, or copies it now.
    pub fn begin_layer(&self, j: usize) -> Result<()> {
        if j < self.split.gpu_end {
            return Ok(());
        }
        let mut st = self.lock()?;
        if st.holds.contains(&Some(j)) {
            return Ok(());
        }
        let prefetched = st.pending.as_ref().is_some_and(|p| p.layer == j);
        self.finish_pending(&mut st)?;
        if !prefetched {
            // Nothing fetched it ahead (the first layer of a run, or a
            // different order): copy it into a slot not holding the other
            // layer in use, and wait.
            let slot = if st.holds[0].is_none() { 0 } else { 1 };
            self.submit(&mut st, slot, j)?;
            self.finish_pending(&mut st)?;
        }
        Ok(())
    }

    /// After every batch's compute of layer `j` is enqueued: marks its slot
    /// busy until that compute ends, and starts copying the next off-GPU
    /// layer into the other slot.
    pub fn end_layer(&self, gpu: &Gpu, j: usize) -> Result<()> {
        let mut st = self.lock()?;
        if let Some(s) = st.holds.iter().position(|&h| h == Some(j)) {
            self.done[s].record(gpu.stream()).map_err(|e| driver_err("cuEventRecord", e))?;
            st.recorded[s] = true;
        }
        let Some(next) = self.next_offloaded(j) else { return Ok(()) };
        if st.holds.contains(&Some(next)) || st.pending.as_ref().is_some_and(|p| p.layer == next) {
            return Ok(());
        }
        self.finish_pending(&mut st)?;
        // The slot not holding layer j (or the first, when j is resident).
        let slot = match st.holds.iter().position(|&h| h == Some(j)) {
            Some(s) => 1 - s,
            None => st.holds.iter().position(Option::is_none).unwrap_or(0),
        };
        self.submit(&mut st, slot, next)
    }

    /// The rate at which layer `layer` (off the GPU) copies into a slot
    /// through its route, bytes per second: the best of three, timed on the
    /// host around submit and wait (what the engine itself waits on).
    pub fn copy_rate(&self, layer: usize) -> Result<f64> {
        let mut st = self.lock()?;
        self.finish_pending(&mut st)?;
        let mut best = f64::INFINITY;
        let mut bytes = 0;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            self.submit(&mut st, 0, layer)?;
            let before = st.bytes_streamed;
            self.finish_pending(&mut st)?;
            bytes = st.bytes_streamed - before;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(bytes as f64 / best.max(1e-9))
    }

    /// Layer `j`'s weights in its slot, once [`WeightStreamer::begin_layer`]
    /// has run for it.
    pub fn weights(&self, j: usize) -> Result<&GpuLayerWeights> {
        let st = self.lock()?;
        match st.holds.iter().position(|&h| h == Some(j)) {
            Some(s) => Ok(&self.slots[s]),
            None => Err(Error::Gpu(format!("layer {j}'s weights are not in a GPU slot (begin_layer was not called)"))),
        }
    }
}
