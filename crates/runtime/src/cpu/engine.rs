//! [`CpuEngine`]: the CPU as the block schedule's compute device.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;

use ops::cpu::KvCache;
use tier_api::{MemAccount, Reservation};
use tier_disk::DiskDevice;

use super::disk::DiskLayers;
use super::layer::HostLayer;
use super::{check_logits, CpuModel, Step};
use crate::error::{Error, Result};
use crate::sampling::{argmax, Sampler};
use crate::schedule::{BatchTokens, ComputeDevice};

/// Where the CPU engine keeps what it does not hold in host memory, and
/// where it accounts what it does.
#[derive(Clone, Default)]
pub struct CpuPlacement {
    /// The layers from `disk.first()` on, read back from disk a layer
    /// ahead.
    pub disk: Option<Arc<DiskLayers>>,
    /// A disk and the share (percent) of each batch's sequences kept in
    /// memory: the others' KV cache on disk.
    pub cache_disk: Option<(Arc<DiskDevice>, f64)>,
    /// The account the host memory the engine allocates is reserved
    /// against.
    pub host: Option<Arc<MemAccount>>,
}

/// A streamed layer and its host memory's reservations.
type Streamed = (HostLayer, Vec<Reservation>);

/// Host bytes reserved against the engine's account, while they live.
type Held = Option<Reservation>;

/// The CPU computing a [`CpuModel`]: its first layers resident (the
/// caller's), the others streamed from disk, the KV cache in host memory
/// or partly on disk. An engine computes every layer of the model
/// ([`CpuEngine::new`]) or a contiguous range of them
/// ([`CpuEngine::for_layers`]: a pipeline stage, holding the weights and
/// the cache of its layers only).
pub struct CpuEngine<'a, M: CpuModel> {
    model: &'a M,
    /// The model's layers this engine computes.
    layers: Range<usize>,
    /// Layers `layers.start..layers.start + resident.len()`.
    resident: &'a [HostLayer],
    disk: Option<Arc<DiskLayers>>,
    cache_disk: Option<(Arc<DiskDevice>, f64)>,
    /// One layer's cache of a whole batch, per batch shape, that the memory
    /// and disk sequences are gathered into around a layer.
    slots: HashMap<(usize, usize), (KvCache, Held)>,
    /// The streamed layer in use.
    current: Option<(usize, Streamed)>,
    /// The streamed layer being read.
    next: Option<(usize, JoinHandle<Result<Streamed>>)>,
    /// Bytes of KV cache allocated on the disk.
    disk_cache_bytes: u64,
    /// Where the host memory this engine allocates is accounted (caches,
    /// gather slots, hidden states, the scratch of a layer and of the
    /// logits; streamed layers through [`DiskLayers`]), if anywhere.
    host: Option<Arc<MemAccount>>,
}

impl<'a, M: CpuModel> CpuEngine<'a, M> {
    /// The engine computing `model` with layers `0..resident.len()` in
    /// `resident` and the rest where `placement` says.
    pub fn new(model: &'a M, resident: &'a [HostLayer], placement: CpuPlacement) -> Result<Self> {
        Self::for_layers(model, 0..model.spec().layers, resident, placement)
    }

    /// The engine computing layers `layers` of `model` (a pipeline stage):
    /// layers `layers.start..layers.start + resident.len()` in `resident`,
    /// the rest of the range where `placement` says (its disk layers from
    /// the first after the resident ones to the range's end at least). Its
    /// batches hold the cache of these layers only.
    pub fn for_layers(
        model: &'a M,
        layers: Range<usize>,
        resident: &'a [HostLayer],
        placement: CpuPlacement,
    ) -> Result<Self> {
        let total = model.spec().layers;
        if layers.start >= layers.end || layers.end > total {
            return Err(Error::InvalidArgument(format!(
                "layers {}..{} are not a non-empty range of the model's {total}",
                layers.start, layers.end
            )));
        }
        let CpuPlacement { disk, cache_disk, host } = placement;
        let after_resident = layers.start.checked_add(resident.len());
        let complete = match &disk {
            Some(d) => after_resident == Some(d.first()) && (d.first()..layers.end).all(|j| d.holds(j)),
            None => after_resident == Some(layers.end),
        };
        if !complete {
            let of = if layers == (0..total) {
                format!("the model's {total}")
            } else {
                format!("layers {}..{} of the model's {total}", layers.start, layers.end)
            };
            return Err(Error::InvalidArgument(format!(
                "{} resident layers{} do not make {of}",
                resident.len(),
                disk.as_ref().map_or(String::new(), |d| format!(" and layers from {} on disk", d.first()))
            )));
        }
        Ok(CpuEngine {
            model,
            layers,
            resident,
            disk,
            cache_disk: cache_disk.map(|(d, pct)| (d, pct.clamp(0.0, 100.0))),
            slots: HashMap::new(),
            current: None,
            next: None,
            disk_cache_bytes: 0,
            host,
        })
    }

    /// The model's layers this engine computes.
    pub fn layer_range(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Layer `j`'s index among this engine's layers (its batches' caches).
    fn local(&self, j: usize) -> Result<usize> {
        if self.layers.contains(&j) {
            Ok(j - self.layers.start)
        } else {
            Err(Error::InvalidArgument(format!(
                "layer {j} is not one of this engine's layers {}..{}",
                self.layers.start, self.layers.end
            )))
        }
    }

    /// Bytes of KV cache the engine put on disk so far.
    pub fn disk_cache_bytes(&self) -> u64 {
        self.disk_cache_bytes
    }

    /// Bytes of the gather slots (host memory, beside the batches' caches).
    pub fn slot_bytes(&self) -> u64 {
        self.slots.values().map(|(s, _)| s.bytes()).sum()
    }

    /// The step's hidden states of a batch from the stage before (in place
    /// of [`ComputeDevice::embed`], on every stage but the first):
    /// `tokens.rows() × hidden` f32.
    pub fn receive_hidden(&mut self, tokens: &BatchTokens, b: &mut CpuBatch, hidden: Vec<f32>) -> Result<()> {
        let want = tokens.rows().checked_mul(self.model.spec().widths.hidden);
        if want != Some(hidden.len()) {
            return Err(Error::InvalidArgument(format!(
                "{} hidden values received for {} rows of {}",
                hidden.len(),
                tokens.rows(),
                self.model.spec().widths.hidden
            )));
        }
        open_step(tokens, b);
        b.hidden = hidden;
        b.hidden_held = self.reserve(std::mem::size_of_val(b.hidden.as_slice()) as u64)?;
        Ok(())
    }

    /// A batch's hidden states after this engine's last layer, handed over
    /// to the next stage (the batch holds none until its next step).
    pub fn take_hidden(&mut self, b: &mut CpuBatch) -> Vec<f32> {
        b.hidden_held = None;
        std::mem::take(&mut b.hidden)
    }

    fn reserve(&self, bytes: u64) -> Result<Held> {
        self.host.as_ref().map(|h| h.reserve(bytes, bytes)).transpose().map_err(Into::into)
    }

    /// Starts reading streamed layer `j` on a thread.
    fn read_ahead(&mut self, j: usize) {
        if let Some(disk) = &self.disk {
            let disk = Arc::clone(disk);
            self.next = Some((j, std::thread::spawn(move || disk.load_held(j))));
        }
    }

    fn layer_weights(&self, j: usize) -> Result<&HostLayer> {
        if let Some(l) = self.resident.get(self.local(j)?) {
            return Ok(l);
        }
        match &self.current {
            Some((i, (l, _))) if *i == j => Ok(l),
            _ => Err(Error::InvalidArgument(format!("layer {j} was not brought in (begin_layer)"))),
        }
    }

    /// A cache of `batch` sequences of up to `capacity` positions.
    fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let kv = &self.model.spec().kv;
        Ok(KvCache::new(super::cpu_dtype(kv.dtype)?, batch, kv.kv_heads, kv.head_dim, capacity)?)
    }

    /// Host bytes of a batch whose `in_memory` sequences' caches (every
    /// layer) are in memory, and of the key masks of all `batch`.
    fn batch_host_bytes(&self, in_memory: usize, batch: usize, capacity: usize) -> u64 {
        let kv = &self.model.spec().kv;
        let per_seq = (kv.kv_heads as u64)
            .saturating_mul(kv.head_dim as u64)
            .saturating_mul(capacity as u64)
            .saturating_mul(2 * kv.dtype.size() as u64);
        (self.layers.len() as u64)
            .saturating_mul(in_memory as u64)
            .saturating_mul(per_seq)
            .saturating_add((batch as u64).saturating_mul(capacity as u64))
    }

    /// Layer `j` of a batch whose last sequences' cache is on disk: memory
    /// and disk sequences gathered into one slot, the layer run, the slot
    /// scattered back (the disk part written whole).
    fn layer_with_disk_cache(&mut self, j: usize, b: &mut CpuBatch) -> Result<()> {
        let (first, batch) = match &b.on_disk {
            Some(dc) => (dc.first, dc.batch),
            None => return Err(Error::InvalidArgument("no disk cache".into())),
        };
        let capacity = b.caches.get(self.local(j)?).map(KvCache::capacity).ok_or_else(|| no_cache(j))?;
        let (mut slot, slot_held) = match self.slots.remove(&(batch, capacity)) {
            Some(s) => s,
            None => {
                let slot = self.new_cache(batch, capacity)?;
                let held = self.reserve(slot.bytes())?;
                (slot, held)
            }
        };
        let scratch = self.model.layer_scratch_bytes(batch, b.new_len, b.keys());
        let _scratch = self.reserve(scratch)?;
        let result = self.gather_run_scatter(j, b, &mut slot, first);
        self.slots.insert((batch, capacity), (slot, slot_held));
        result
    }

    fn gather_run_scatter(&self, j: usize, b: &mut CpuBatch, slot: &mut KvCache, first: usize) -> Result<()> {
        let i = self.local(j)?;
        let host = b.caches.get_mut(i).ok_or_else(|| no_cache(j))?;
        let dc = b.on_disk.as_mut().ok_or_else(|| Error::InvalidArgument("no disk cache".into()))?;
        let split = first * slot.seq_bytes();
        let past = *dc.len.get(i).ok_or_else(|| no_cache(j))?;
        let [dk, dv] = dc.layers.get(i).ok_or_else(|| no_cache(j))?;
        {
            let (sk, sv) = slot.bytes_mut();
            let (hk, hv) = host.as_bytes();
            sk[..split].copy_from_slice(hk);
            sv[..split].copy_from_slice(hv);
            dk.read_bytes(0, &mut sk[split..])?;
            dv.read_bytes(0, &mut sv[split..])?;
        }
        slot.set_len(past)?;
        let layer = self.layer_weights(j)?;
        let step =
            Step { batch: b.key_mask.len(), new_len: b.new_len, key_mask: &b.flat_mask, positions: &b.positions };
        self.model.layer_forward(layer, &mut b.hidden, &step, slot)?;
        {
            let (sk, sv) = slot.bytes_mut();
            let (hk, hv) = host.bytes_mut();
            hk.copy_from_slice(&sk[..split]);
            hv.copy_from_slice(&sv[..split]);
            dk.write_bytes(0, &sk[split..])?;
            dv.write_bytes(0, &sv[split..])?;
        }
        host.set_len(past + b.new_len)?;
        dc.len[i] = past + b.new_len;
        Ok(())
    }
}

impl<M: CpuModel> Drop for CpuEngine<'_, M> {
    /// A layer still being read ahead is waited for: no thread of the
    /// engine outlives it (a pipeline stage that stops joins everything it
    /// started).
    fn drop(&mut self) {
        if let Some((_, handle)) = self.next.take() {
            let _ = handle.join();
        }
    }
}

fn no_cache(j: usize) -> Error {
    Error::InvalidArgument(format!("no cache for layer {j}"))
}

/// One batch on the CPU: its cache, which positions hold real tokens, and
/// the step's hidden states.
pub struct CpuBatch {
    /// Per layer, the cache of the sequences kept in memory (all of them
    /// without a disk share).
    caches: Vec<KvCache>,
    /// The others', on disk.
    on_disk: Option<DiskCache>,
    /// Per sequence, whether each position so far is a real token.
    key_mask: Vec<Vec<bool>>,
    /// `key_mask` flattened, `[batch][keys]`, for this step.
    flat_mask: Vec<bool>,
    /// The step's positions, `[batch][new_len]`.
    positions: Vec<Option<usize>>,
    hidden: Vec<f32>,
    new_len: usize,
    /// The caches' and the masks' host memory, reserved.
    _cache_held: Held,
    /// The hidden states', reserved.
    hidden_held: Held,
}

impl CpuBatch {
    fn keys(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }
}

/// The KV cache of a batch's last sequences on disk: per layer, keys and
/// values of sequences `first..` (in the cache's memory layout), and the
/// positions stored.
struct DiskCache {
    first: usize,
    batch: usize,
    layers: Vec<[tier_api::Tensor; 2]>,
    len: Vec<usize>,
}

/// A step begins for a batch: its tokens' mask appended to the keys', their
/// positions, the hidden states of the step before let go.
fn open_step(tokens: &BatchTokens, b: &mut CpuBatch) {
    let n = tokens.new_len();
    for (seq, mask) in b.key_mask.iter_mut().enumerate() {
        mask.extend(tokens.mask()[seq * n..(seq + 1) * n].iter().map(|&m| m != 0));
    }
    b.flat_mask = b.key_mask.iter().flatten().copied().collect();
    b.positions = tokens.positions();
    b.hidden_held = None;
    b.hidden = Vec::new();
    b.new_len = n;
}

/// Hidden states of the last position of each of `batch` sequences.
fn last_rows(hidden: &[f32], batch: usize, new_len: usize, dim: usize) -> Vec<f32> {
    (0..batch)
        .flat_map(|b| {
            let row = b * new_len + new_len - 1;
            hidden[row * dim..(row + 1) * dim].iter().copied()
        })
        .collect()
}

impl<M: CpuModel> ComputeDevice for CpuEngine<'_, M> {
    type Batch = CpuBatch;
    type Error = Error;

    fn num_layers(&self) -> usize {
        self.model.spec().layers
    }

    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    fn max_positions(&self) -> usize {
        self.model.max_positions()
    }

    fn begin_layer(&mut self, j: usize) -> Result<()> {
        let Some(disk) = self.disk.clone() else { return Ok(()) };
        if !disk.holds(j) || self.current.as_ref().is_some_and(|(i, _)| *i == j) {
            return Ok(());
        }
        self.current = None;
        let layer = match self.next.take() {
            Some((i, handle)) if i == j => {
                handle.join().map_err(|_| Error::InvalidArgument(format!("reading layer {j} from disk panicked")))??
            }
            other => {
                if let Some((_, handle)) = other {
                    // Read ahead for another order: let it finish, unused.
                    let _ = handle.join();
                }
                disk.load_held(j)?
            }
        };
        self.current = Some((j, layer));
        // The next streamed layer of this engine (its first again after
        // its last).
        let next = if j + 1 < self.layers.end && disk.holds(j + 1) { j + 1 } else { disk.first() };
        if next != j {
            self.read_ahead(next);
        }
        Ok(())
    }

    fn new_batch(&mut self, tokens: &BatchTokens, capacity: usize) -> Result<CpuBatch> {
        let batch = tokens.batch();
        let layers = self.layers.len();
        let mut on_disk = None;
        let mut in_memory = batch;
        if let Some((disk, cpu_percent)) = self.cache_disk.clone() {
            let first = (((batch as f64) * cpu_percent / 100.0).round() as usize).min(batch);
            if first < batch {
                // One sequence's keys (or values) of one layer, as the
                // cache lays them out.
                let kv = &self.model.spec().kv;
                let len = [kv.kv_heads, kv.head_dim, capacity, kv.dtype.size(), batch - first]
                    .into_iter()
                    .try_fold(1usize, usize::checked_mul)
                    .ok_or_else(|| Error::InvalidArgument("a KV cache too large for this machine".into()))?;
                let mut tensors = Vec::with_capacity(layers);
                for _ in 0..layers {
                    let t =
                        || tier_api::Device::allocate(disk.as_ref(), &tier_api::Shape::new([len]), tier_api::DType::U8);
                    tensors.push([t()?, t()?]);
                }
                let bytes: u64 = tensors.iter().flatten().map(|t| t.byte_len() as u64).sum();
                self.disk_cache_bytes = self.disk_cache_bytes.saturating_add(bytes);
                on_disk = Some(DiskCache { first, batch, layers: tensors, len: vec![0; layers] });
                in_memory = first;
            }
        }
        let held = self.reserve(self.batch_host_bytes(in_memory, batch, capacity))?;
        let caches = (0..layers).map(|_| self.new_cache(in_memory, capacity)).collect::<Result<Vec<_>>>()?;
        Ok(CpuBatch {
            caches,
            on_disk,
            key_mask: vec![Vec::with_capacity(capacity); batch],
            flat_mask: Vec::new(),
            positions: Vec::new(),
            hidden: Vec::new(),
            new_len: 0,
            _cache_held: held,
            hidden_held: None,
        })
    }

    fn embed(&mut self, tokens: &BatchTokens, b: &mut CpuBatch) -> Result<()> {
        open_step(tokens, b);
        b.hidden = self.model.embed(tokens.tokens(), &b.positions)?;
        b.hidden_held = self.reserve(std::mem::size_of_val(b.hidden.as_slice()) as u64)?;
        Ok(())
    }

    fn layer(&mut self, j: usize, _tokens: &BatchTokens, b: &mut CpuBatch) -> Result<()> {
        if b.on_disk.is_some() {
            return self.layer_with_disk_cache(j, b);
        }
        let _scratch = self.reserve(self.model.layer_scratch_bytes(b.key_mask.len(), b.new_len, b.keys()))?;
        let layer = self.layer_weights(j)?;
        let step =
            Step { batch: b.key_mask.len(), new_len: b.new_len, key_mask: &b.flat_mask, positions: &b.positions };
        let cache = b.caches.get_mut(self.local(j)?).ok_or_else(|| no_cache(j))?;
        self.model.layer_forward(layer, &mut b.hidden, &step, cache)
    }

    fn pick(&mut self, tokens: &BatchTokens, b: &mut CpuBatch, sampler: Option<&mut Sampler>) -> Result<Vec<u32>> {
        let (hidden, vocab) = (self.model.spec().widths.hidden, self.model.vocab_size());
        // The last rows and the logits (f32).
        let _scratch = self.reserve((tokens.batch() * (hidden + vocab) * 4) as u64)?;
        let last = last_rows(&b.hidden, tokens.batch(), b.new_len, hidden);
        let logits = self.model.logits(&last, tokens.batch())?;
        check_logits(&logits, vocab)?;
        Ok(match sampler {
            Some(s) => logits.chunks(vocab).map(|row| s.sample(row)).collect(),
            None => logits.chunks(vocab).map(argmax).collect(),
        })
    }

    fn cache_bytes(&self, b: &CpuBatch) -> u64 {
        b.caches.iter().map(KvCache::bytes).sum()
    }

    fn activation_bytes(&self, batches: &[&CpuBatch]) -> u64 {
        batches.iter().map(|b| (b.hidden.len() * std::mem::size_of::<f32>()) as u64).sum()
    }
}

/// Logits at the last position of each prompt after the prompts (left
/// padded with `pad` into one batch) go through every layer: `[batch,
/// vocab]`. The prompts are checked first.
pub fn prefill_logits<M: CpuModel>(
    model: &M,
    layers: &[HostLayer],
    prompts: &[Vec<u32>],
    pad: u32,
) -> Result<Vec<f32>> {
    crate::schedule::validate_prompts(model.vocab_size(), model.max_positions(), prompts, 0, 0)?;
    let tokens = BatchTokens::new(prompts, pad);
    let mut engine = CpuEngine::new(model, layers, CpuPlacement::default())?;
    let mut b = engine.new_batch(&tokens, tokens.new_len())?;
    engine.embed(&tokens, &mut b)?;
    for j in 0..model.spec().layers {
        engine.layer(j, &tokens, &mut b)?;
    }
    let hidden = model.spec().widths.hidden;
    let last = last_rows(&b.hidden, tokens.batch(), b.new_len, hidden);
    model.logits(&last, tokens.batch())
}
