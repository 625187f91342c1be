//! The plan: where a policy puts every byte, worked out before any byte is
//! allocated, from the model's spec ([`crate::spec::ModelSpec`]).
//!
//! [`footprint`] counts, for a model, a policy and a workload, the bytes of
//! weights, KV cache, activations and the engine's own buffers on each tier
//! (GPU, pinned host, pageable host, disk). The weights are counted the way
//! the engine places them ([`split_layers`]: the first layers resident,
//! every other layer's tensors split by rows over host and disk with
//! [`LayerSplit::rows`]), tensor by tensor from the spec, so the bytes the
//! check refuses are the bytes the engine would allocate. [`check`]
//! compares them with what the machine has and, when the policy does not
//! fit, refuses it with the bytes each tier would need and FlexGen's advice
//! in its order (unpin the weights, compress them, move them to disk),
//! saying which of those would make it fit — computed with the same
//! accounting, not guessed.
//!
//! The KV cache is counted as the GPU engine allocates it
//! ([`crate::gpu::cache`], [`gpu_cache_bytes`]): each GPU batch's homes
//! split over the tiers in whole sequences by the rule the homes are split
//! with ([`cache_sequences`]: [`tier_api::split_points`] over
//! [`CachePlan::shares`]), a 4-bit cache by its real layout
//! ([`crate::gpu::cache::packed_layout`]: headers, padding, scales and mins
//! included), every batch's key mask on the GPU, the two GPU slots and the
//! 4-bit scratch.

use std::fmt;

use tier_api::DType;

use crate::error::{Error, Result};
use crate::gpu::cache::{packed_layout, CachePlan, CacheTier};
use crate::policy::Policy;
use crate::spec::{packed_bytes, KvLayout, ModelSpec};

/// FlexGen's nominal size of a 4-bit cache over f16's: a 4-bit value with
/// group size 64 and an f16 (min, scale) pair per group, over two bytes.
/// The plan and the cost model no longer use it (the engine's layout has
/// a header per tensor, section padding, and groups as narrow as the head
/// dimension: see [`cache_tensor_bytes`]); kept for reports that compare.
pub const COMPRESSED_PER_F16_BYTE: f64 = 0.5625 / 2.0;

/// Pinned staging the GPU tier keeps for pageable and disk paths (its
/// default ring: 16 slots of 8 MiB).
pub const STAGING_BYTES: u64 = 16 * (8 << 20);

/// GPU slots streamed layers pass through: four let copies run two layers
/// ahead of the compute; with four layers or fewer streaming, two, so that
/// every step still streams them.
pub fn weight_slots(streamed_layers: usize) -> usize {
    if streamed_layers > MAX_WEIGHT_SLOTS {
        MAX_WEIGHT_SLOTS
    } else {
        2
    }
}

/// The most GPU slots streamed weights use.
pub const MAX_WEIGHT_SLOTS: usize = 4;

/// Where the decoder layers live: `0..gpu_end` resident on the GPU; every
/// other layer streamed, each of its tensors split by rows: the first
/// `host_percent` in host memory, the rest on disk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerSplit {
    pub layers: usize,
    pub gpu_end: usize,
    /// Of each streamed layer's rows, the share in host memory (percent).
    pub host_percent: f64,
}

impl LayerSplit {
    /// Layers off the GPU.
    pub fn offloaded(&self) -> usize {
        self.layers - self.gpu_end
    }

    /// Whether any layer lives off the GPU.
    pub fn streams(&self) -> bool {
        self.gpu_end < self.layers
    }

    /// Whether streamed layers have rows in host memory.
    pub fn uses_host(&self) -> bool {
        self.streams() && self.host_percent > 0.0
    }

    /// Whether streamed layers have rows on disk.
    pub fn uses_disk(&self) -> bool {
        self.streams() && self.host_percent < 100.0
    }

    /// The row ranges of a tensor of `rows` rows in host memory and on disk.
    pub fn rows(&self, rows: usize) -> [std::ops::Range<usize>; 2] {
        let host = ((rows as f64) * self.host_percent / 100.0).round() as usize;
        let host = host.min(rows);
        [0..host, host..rows]
    }
}

/// Splits `layers` by the weight percentages: the GPU's share as whole
/// resident layers (rounded to the nearest layer), and each streamed layer's
/// rows between host and disk so that the host holds `w_cpu_percent` of the
/// whole model (the rest of the streamed bytes on disk). Splitting rows
/// rather than layers lets the disk and the PCIe link carry every layer's
/// bytes at the same time.
pub fn split_layers(layers: usize, w_gpu_percent: f64, w_cpu_percent: f64) -> LayerSplit {
    let gpu_end = (((layers as f64) * w_gpu_percent.clamp(0.0, 100.0) / 100.0).round() as usize).min(layers);
    let off = layers - gpu_end;
    let host_percent = if off == 0 {
        100.0
    } else {
        // The host's share of the model over the streamed layers' share.
        (w_cpu_percent.clamp(0.0, 100.0) * layers as f64 / off as f64).clamp(0.0, 100.0)
    };
    LayerSplit { layers, gpu_end, host_percent }
}

/// The layers the CPU engine keeps in memory for `w_cpu_percent` (whole
/// layers, rounded); the others live on disk and are read back a layer
/// ahead.
pub fn resident_layers(layers: usize, w_cpu_percent: f64) -> usize {
    (((layers as f64) * w_cpu_percent.clamp(0.0, 100.0) / 100.0).round() as usize).min(layers)
}

/// The shape and type of every tensor one streamed layer holds, as the GPU
/// engine holds it: each of the spec's tensors as one flat buffer of its
/// elements (so a home's host and disk parts split it by elements, not by
/// rows of its logical shape), and under `compress` each compressible one
/// as the packed bytes of each of its parts (one `u8` buffer a part).
pub fn held_layer_tensors(spec: &ModelSpec, compress: bool) -> Result<Vec<(Vec<usize>, tier_api::DType)>> {
    let mut out = Vec::with_capacity(spec.layer.len());
    for t in &spec.layer {
        if compress && t.compressible {
            for part in t.parts() {
                out.push((vec![packed_bytes(&part)? as usize], tier_api::DType::U8));
            }
        } else {
            let elements = t.elements().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                crate::Error::Spec(format!("{}: {:?} has more elements than this machine addresses", t.name, t.shape))
            })?;
            out.push((vec![elements], t.dtype));
        }
    }
    Ok(out)
}

/// Bytes of one streamed layer in host memory and on disk under `split`
/// (each tensor's rows split by [`LayerSplit::rows`]).
pub fn streamed_layer_bytes(spec: &ModelSpec, split: &LayerSplit, compress: bool) -> Result<(u64, u64)> {
    let mut out = (0u64, 0u64);
    for (shape, dtype) in held_layer_tensors(spec, compress)? {
        let rows = shape.first().copied().unwrap_or(1);
        let row_bytes = shape.iter().skip(1).fold(dtype.size() as u64, |b, &d| b.saturating_mul(d as u64));
        let [host, disk] = split.rows(rows);
        out.0 = out.0.saturating_add((host.len() as u64).saturating_mul(row_bytes));
        out.1 = out.1.saturating_add((disk.len() as u64).saturating_mul(row_bytes));
    }
    Ok(out)
}

/// Bytes on each tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierBytes {
    pub gpu: u64,
    pub pinned: u64,
    pub pageable: u64,
    pub disk: u64,
}

impl TierBytes {
    /// Host memory of both kinds.
    pub fn host(&self) -> u64 {
        self.pinned.saturating_add(self.pageable)
    }
}

impl std::ops::Add for TierBytes {
    type Output = TierBytes;

    fn add(self, o: TierBytes) -> TierBytes {
        TierBytes {
            gpu: self.gpu.saturating_add(o.gpu),
            pinned: self.pinned.saturating_add(o.pinned),
            pageable: self.pageable.saturating_add(o.pageable),
            disk: self.disk.saturating_add(o.disk),
        }
    }
}

/// What a generation needs, by kind of tensor and tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    pub weights: TierBytes,
    pub cache: TierBytes,
    pub activations: TierBytes,
    /// The engine's own: GPU weight slots and cache buffers, compute
    /// workspace, pinned staging.
    pub buffers: TierBytes,
}

impl Footprint {
    pub fn total(&self) -> TierBytes {
        self.weights + self.cache + self.activations + self.buffers
    }
}

/// The shape of the work: prompts of `prompt_len` tokens, `gen_len` new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub prompt_len: usize,
    pub gen_len: usize,
}

/// Whether the engine computes on a GPU, and whether host memory can be pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    pub gpu_compute: bool,
    pub can_pin: bool,
}

fn share(total: u64, percent: f64) -> u64 {
    (total as f64 * percent / 100.0).round() as u64
}

/// Splits `total` by GPU and CPU percentages (the rest to disk), host bytes
/// pinned or pageable.
fn split(total: u64, gpu: f64, cpu: f64, pinned: bool) -> TierBytes {
    let gpu = gpu.clamp(0.0, 100.0);
    let cpu = cpu.clamp(0.0, 100.0);
    let g = share(total, gpu).min(total);
    let c = share(total, cpu).min(total - g);
    let (pinned, pageable) = if pinned { (c, 0) } else { (0, c) };
    TierBytes { gpu: g, pinned, pageable, disk: total - g - c }
}

/// The index of a cache tier in `[GPU, host, disk]`.
fn tier_index(tier: CacheTier) -> usize {
    match tier {
        CacheTier::Gpu => 0,
        CacheTier::Host => 1,
        CacheTier::Disk => 2,
    }
}

/// Sequences of a GPU batch of `batch` whose cache the GPU engine keeps on
/// the GPU, in host memory and on disk: the policy's cache shares
/// ([`CachePlan::shares`], the tiers holding a share, the last taking the
/// rounding) split along the batch at [`tier_api::split_points`] with a
/// granularity of one sequence — the split `SegmentedTensor::allocate`
/// gives the homes (e.g. a batch of 4 at 30/40/30 is 1/2/1 sequences).
/// (A 4-bit cache lives on one tier, so all its sequences are there; a
/// 4-bit cache over several tiers, which the engine refuses, is counted
/// split as a plain one would be.)
pub fn cache_sequences(batch: usize, policy: &Policy) -> Result<[usize; 3]> {
    let shares = CachePlan::of_policy(policy).shares();
    let percents: Vec<f64> = shares.iter().map(|s| s.1).collect();
    let ranges = tier_api::split_points(batch, &percents, 1)?;
    let mut out = [0usize; 3];
    for ((tier, _), range) in shares.iter().zip(ranges) {
        let i = tier_index(*tier);
        out[i] = out[i].saturating_add(range.len());
    }
    Ok(out)
}

/// Bytes of one layer's keys (or values) of `seqs` sequences of `capacity`
/// positions as the GPU engine holds them: `[seqs, kv_heads, capacity,
/// head_dim]` of the cache's type, or with `packed` the bytes of the 4-bit
/// layout the engine packs them in ([`packed_layout`] of `seqs · kv_heads ·
/// capacity` rows: groups of up to 64 along the head dimension, codes, f16
/// scales and mins, a 64-byte header). No sequences take nothing.
/// Saturates at `u64::MAX`; a 4-bit cache of a type the engine does not
/// pack (not f16 or bf16) is an error.
pub fn cache_tensor_bytes(kv: &KvLayout, seqs: usize, capacity: usize, packed: bool) -> Result<u64> {
    if !packed {
        return Ok([seqs, kv.kv_heads, capacity, kv.head_dim, kv.dtype.size()]
            .iter()
            .fold(1u64, |b, &d| b.saturating_mul(d as u64)));
    }
    if !matches!(kv.dtype, DType::F16 | DType::BF16) {
        return Err(Error::Spec(format!("a 4-bit KV cache of {:?}: the GPU engine packs f16 or bf16 only", kv.dtype)));
    }
    let Some(rows) = [seqs, kv.kv_heads, capacity].iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
        return Ok(u64::MAX);
    };
    if rows == 0 || kv.head_dim == 0 {
        return Ok(0);
    }
    // With a 16-bit type the layout fails only when its sizes overflow.
    Ok(packed_layout(rows, kv.head_dim, kv.dtype).map_or(u64::MAX, |l| l.total_bytes() as u64))
}

/// Bytes one position of one sequence's keys and values of one layer
/// takes in the cache's homes: the spec's token bytes, or 4-bit, a GPU
/// batch's packed keys and values of a layer ([`cache_tensor_bytes`])
/// over its `gpu_batch_size · capacity` positions (headers, padding,
/// scales and mins shared out). For the cost model's bytes moved.
pub fn cache_token_bytes(spec: &ModelSpec, policy: &Policy, capacity: usize) -> Result<f64> {
    if !policy.compress_cache {
        return Ok(spec.kv.token_bytes() as f64);
    }
    let gbs = policy.gpu_batch_size;
    let positions = gbs as f64 * capacity as f64;
    if positions == 0.0 {
        return Ok(0.0);
    }
    Ok(2.0 * cache_tensor_bytes(&spec.kv, gbs, capacity, true)? as f64 / positions)
}

/// The KV cache of one block as the GPU engine allocates it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuCacheBytes {
    /// Every batch's homes (keys and values of every layer) per tier; never
    /// pinned.
    pub homes: TierBytes,
    /// Every batch's key mask on the GPU: a byte per position per sequence.
    pub masks: u64,
    /// The two GPU slots of one GPU batch's layer (keys and values), when
    /// the cache goes through them ([`CachePlan::through_slots`]).
    pub slots: u64,
    /// The 4-bit cache's GPU scratch: one GPU batch's layer, keys and
    /// values each unpacked and packed.
    pub scratch: u64,
}

/// The KV cache of a block of `num_gpu_batches` batches of
/// `gpu_batch_size` sequences of `capacity` positions, as the GPU engine
/// allocates it (`runtime::gpu::cache::CacheStreamer::new_cache`, or a
/// resident cache when it does not go through the slots):
///
/// - homes: per batch and layer, keys and values split along the batch in
///   whole sequences ([`cache_sequences`]), each tier's part
///   `[sequences, kv_heads, capacity, head_dim]`; 4-bit, one packed tensor
///   each of the batch's layout ([`cache_tensor_bytes`]) on its tier;
/// - a key mask per batch on the GPU, `gpu_batch_size × capacity` bytes;
/// - through the slots: two slots of one batch's layer (the slots grow to
///   the largest batch, which for equal batches is any of them), and 4-bit,
///   with homes off the GPU, one scratch for the batches' one shape
///   (`pack_scratch` makes one per distinct `(batch, capacity)`): keys and
///   values each unpacked and packed (homes on the GPU are unpacked in
///   place into the slots).
///
/// Counts saturate.
pub fn gpu_cache_bytes(spec: &ModelSpec, policy: &Policy, capacity: usize) -> Result<GpuCacheBytes> {
    let kv = &spec.kv;
    let gbs = policy.gpu_batch_size;
    let nb = policy.num_gpu_batches as u64;
    let packed = policy.compress_cache;
    let per_layer = (spec.layers as u64).saturating_mul(2);
    let [g, c, d] = cache_sequences(gbs, policy)?;
    let home = |seqs: usize| -> Result<u64> {
        Ok(nb.saturating_mul(per_layer).saturating_mul(cache_tensor_bytes(kv, seqs, capacity, packed)?))
    };
    let homes = TierBytes { gpu: home(g)?, pinned: 0, pageable: home(c)?, disk: home(d)? };
    let masks = nb.saturating_mul(gbs as u64).saturating_mul(capacity as u64);
    let mut out = GpuCacheBytes { homes, masks, slots: 0, scratch: 0 };
    if CachePlan::of_policy(policy).through_slots() && nb > 0 && gbs > 0 && capacity > 0 {
        // One layer's keys (or values) of one batch, in the cache's type.
        let plain = cache_tensor_bytes(kv, gbs, capacity, false)?;
        out.slots = plain.saturating_mul(4);
        // The scratch, for 4-bit homes off the GPU (those on it are unpacked
        // in place into the slots).
        if packed && policy.cache_gpu_percent < 100.0 {
            out.scratch = plain.saturating_add(cache_tensor_bytes(kv, gbs, capacity, true)?).saturating_mul(2);
        }
    }
    Ok(out)
}

/// Counts the bytes `policy` places on each tier for `spec` and `work`.
///
/// Weights as the engine places them (see the module's documentation); the
/// tensors outside the layers stay with the compute device. The KV cache
/// holds `block × (prompt + gen)` positions; on a GPU engine as it
/// allocates them ([`gpu_cache_bytes`]: homes split in whole sequences of
/// each batch, 4-bit by its real layout, the batches' key masks counted in
/// the cache's GPU bytes); it is never pinned on the host (FlexGen's
/// choice: pinned cache would lock tens of gigabytes). When the GPU
/// computes on weights that live elsewhere, it needs [`weight_slots`]
/// layers' slots, for a cache through the slots two slots of one GPU
/// batch's layer (and 4-bit, its scratch), and a pinned staging ring.
/// Counts saturate: a workload too large for `u64` never fits.
pub fn footprint(spec: &ModelSpec, policy: &Policy, work: Workload, machine: Machine) -> Result<Footprint> {
    let layers = spec.layers as u64;
    let block = policy.block_size();
    let seq = work.prompt_len.saturating_add(work.gen_len);
    let compress = policy.compress_weight && machine.gpu_compute;
    let outside = spec.outside_bytes()?;
    let layer_held = spec.layer_bytes(compress)?;
    let pin = policy.pin_weight && machine.can_pin;

    // Weights.
    let mut weights = TierBytes::default();
    let mut streamed = 0u64;
    if machine.gpu_compute {
        let split = split_layers(spec.layers, policy.w_gpu_percent, policy.w_cpu_percent);
        weights.gpu = outside.saturating_add((split.gpu_end as u64).saturating_mul(layer_held));
        let (host, disk) = streamed_layer_bytes(spec, &split, compress)?;
        let off = split.offloaded() as u64;
        let host = off.saturating_mul(host);
        if pin {
            weights.pinned = host;
        } else {
            weights.pageable = host;
        }
        weights.disk = off.saturating_mul(disk);
        streamed = split.offloaded() as u64;
    } else {
        let resident = resident_layers(spec.layers, policy.w_cpu_percent) as u64;
        weights.pageable = outside.saturating_add(resident.saturating_mul(layer_held));
        weights.disk = (layers - resident).saturating_mul(layer_held);
    }

    // KV cache: on a GPU engine as it allocates it; the CPU engine's by
    // the policy's shares of the plain bytes.
    let (cache, cache_buffers) = if machine.gpu_compute {
        let c = gpu_cache_bytes(spec, policy, seq)?;
        (TierBytes { gpu: c.homes.gpu.saturating_add(c.masks), ..c.homes }, c.slots.saturating_add(c.scratch))
    } else {
        let cache_plain = spec.kv_cache_bytes(block, seq);
        let cache_total = if policy.compress_cache {
            (cache_plain as f64 * COMPRESSED_PER_F16_BYTE).ceil() as u64
        } else {
            cache_plain
        };
        (split(cache_total, policy.cache_gpu_percent, policy.cache_cpu_percent, false), 0)
    };

    // Hidden states between layers: the largest is the prefill's.
    let w = spec.widths;
    let act = w.dtype.size() as u64;
    let value = w.hidden_value_bytes();
    let hidden =
        (block as u64).saturating_mul(work.prompt_len as u64).saturating_mul((w.hidden as u64).saturating_mul(value));
    let activations = split(hidden, policy.act_gpu_percent, policy.act_cpu_percent, false);

    // The engine's buffers.
    let mut buffers = TierBytes::default();
    let gbs = policy.gpu_batch_size as u64;
    let p = work.prompt_len as u64;
    let rows = gbs.saturating_mul(p);
    // Workspace for one GPU batch of one layer at prefill: the rows'
    // scratch as the family's engine holds it (q, k, v, the attention's
    // output, the MLP's inner activations, ...) and the prefill's attention
    // scores (every head's, of all the batch's sequences or of a chunk).
    let workspace = rows.saturating_mul(w.scratch_per_row as u64 * act).saturating_add(w.scores.buffer_bytes(
        gbs,
        w.heads as u64,
        p,
        p,
    ));
    if machine.gpu_compute {
        buffers.gpu = buffers.gpu.saturating_add(workspace);
        if streamed > 0 {
            // Streamed layers pass through slots (packed when compressed,
            // with one plain layer to unpack into).
            let slots = weight_slots(streamed as usize) as u64;
            buffers.gpu = buffers.gpu.saturating_add(slots.saturating_mul(layer_held));
        }
        if compress {
            buffers.gpu = buffers.gpu.saturating_add(spec.layer_bytes(false)?);
        }
        // Two slots of one GPU batch's cache of one layer, loading beside
        // computing (the prefill goes through them with --cpu-cache-compute
        // too; a 4-bit cache, the GPU's own included, is unpacked into
        // them), and the 4-bit cache's scratch.
        buffers.gpu = buffers.gpu.saturating_add(cache_buffers);
        if policy.act_gpu_percent < 100.0 {
            // Hidden states off the GPU pass through two buffers the block's
            // batches take in turn (one stored while the next computes), each
            // the residual and its copy where the family keeps one
            // (`gpu::activations`).
            buffers.gpu = buffers.gpu.saturating_add(rows.saturating_mul((w.hidden as u64).saturating_mul(2 * value)));
        }
        let relay = [weights.pageable, weights.disk, cache.pageable, cache.disk, activations.disk]
            .iter()
            .fold(0u64, |a, &b| a.saturating_add(b));
        if relay > 0 {
            buffers.pinned += STAGING_BYTES;
        }
    } else {
        buffers.pageable = workspace;
    }
    Ok(Footprint { weights, cache, activations, buffers })
}

/// What the machine has for the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// GPU memory the engine may use (`--gpu-mem`, else what is free).
    pub gpu: u64,
    /// Host memory available (MemAvailable).
    pub host: u64,
    /// Host memory that may be page-locked (RLIMIT_MEMLOCK; `u64::MAX` when unlimited).
    pub pinnable: u64,
    /// Free space in the offload directory.
    pub disk: u64,
}

/// The locked-memory limit (RLIMIT_MEMLOCK) from `/proc/self/limits`, in
/// bytes; `u64::MAX` when unlimited or unreadable (the allocation itself
/// then says so).
pub fn memlock_limit() -> u64 {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<u64>().ok())
        .unwrap_or(u64::MAX)
}

/// Free bytes (for an unprivileged user) of the file system holding `dir`
/// (or of its nearest existing ancestor, for a directory the run will make);
/// `None` where it cannot be asked.
pub fn disk_free(dir: &std::path::Path) -> Option<u64> {
    tier_disk::free_bytes(dir).ok()
}

impl Capacity {
    /// What this machine has: `gpu` bytes for the engine (the driver's free
    /// memory or `--gpu-mem`), MemAvailable, RLIMIT_MEMLOCK and the offload
    /// directory's free space (0 where the directory cannot be asked).
    pub fn of_machine(gpu: u64, offload_dir: &std::path::Path) -> Capacity {
        Capacity {
            gpu,
            host: crate::available_bytes().unwrap_or(0),
            pinnable: memlock_limit(),
            disk: disk_free(offload_dir).unwrap_or(0),
        }
    }
}

/// Which tiers a footprint overruns, as (tier, needed, available).
pub fn overruns(total: &TierBytes, cap: &Capacity) -> Vec<(&'static str, u64, u64)> {
    let mut out = Vec::new();
    if total.gpu > cap.gpu {
        out.push(("GPU", total.gpu, cap.gpu));
    }
    if total.host() > cap.host {
        out.push(("host", total.host(), cap.host));
    }
    if total.pinned > cap.pinnable {
        out.push(("pinned host (locked-memory limit)", total.pinned, cap.pinnable));
    }
    if total.disk > cap.disk {
        out.push(("disk", total.disk, cap.disk));
    }
    out
}

/// One of FlexGen's remedies, and what it would need.
#[derive(Debug, Clone, PartialEq)]
pub struct Remedy {
    pub flag: &'static str,
    pub total: TierBytes,
    pub fits: bool,
}

/// A change to a policy.
type Adjust = fn(&mut Policy);

/// The remedies in FlexGen's order, each applied on top of the ones before
/// it (as its README advises: unpin, then compress, then weights to disk).
pub fn remedies(
    spec: &ModelSpec,
    policy: &Policy,
    work: Workload,
    machine: Machine,
    cap: &Capacity,
) -> Result<Vec<Remedy>> {
    remedies_with(spec, policy, work, machine, cap, true)
}

/// [`remedies`], leaving out compression for an engine without it.
pub fn remedies_with(
    spec: &ModelSpec,
    policy: &Policy,
    work: Workload,
    machine: Machine,
    cap: &Capacity,
    compression: bool,
) -> Result<Vec<Remedy>> {
    let mut p = policy.clone();
    let mut out = Vec::new();
    let steps: [(&'static str, Adjust); 3] = [
        ("--pin-weight 0", |p| p.pin_weight = false),
        ("--compress-weight", |p| p.compress_weight = true),
        ("weights on disk (--percent 0 0 with the cache and activation shares kept)", |p| {
            p.w_gpu_percent = 0.0;
            p.w_cpu_percent = 0.0;
        }),
    ];
    for (flag, apply) in steps {
        if flag == "--compress-weight" && !compression {
            continue;
        }
        apply(&mut p);
        let total = footprint(spec, &p, work, machine)?.total();
        out.push(Remedy { flag, fits: overruns(&total, cap).is_empty(), total });
    }
    Ok(out)
}

/// A refused policy's report: what each tier would need and what would help.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub footprint: Footprint,
    pub overruns: Vec<(&'static str, u64, u64)>,
    pub remedies: Vec<Remedy>,
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the policy does not fit this machine:")?;
        for (tier, need, have) in &self.overruns {
            writeln!(f, "  {tier}: needs {}, has {}", gib(*need), gib(*have))?;
        }
        let fp = &self.footprint;
        for (what, t) in
            [("weights", fp.weights), ("KV cache", fp.cache), ("activations", fp.activations), ("buffers", fp.buffers)]
        {
            writeln!(
                f,
                "  {what:<12} GPU {:>11}  pinned {:>11}  pageable {:>11}  disk {:>11}",
                gib(t.gpu),
                gib(t.pinned),
                gib(t.pageable),
                gib(t.disk)
            )?;
        }
        writeln!(f, "what would help, in FlexGen's order (each on top of the ones before):")?;
        for (i, r) in self.remedies.iter().enumerate() {
            writeln!(
                f,
                "  {}. {}: {} (GPU {}, host {}, disk {})",
                i + 1,
                r.flag,
                if r.fits { "fits" } else { "still does not fit" },
                gib(r.total.gpu),
                gib(r.total.host()),
                gib(r.total.disk)
            )?;
        }
        if !self.remedies.iter().any(|r| r.fits) {
            write!(
                f,
                "none of them is enough: lower --gpu-batch-size or --num-gpu-batches, or move the KV cache to disk"
            )?;
        }
        Ok(())
    }
}

/// Refuses a policy that does not fit `cap`, before anything is allocated.
pub fn check(spec: &ModelSpec, policy: &Policy, work: Workload, machine: Machine, cap: &Capacity) -> Result<Footprint> {
    check_with(spec, policy, work, machine, cap, true)
}

/// [`check`] for an engine with or without compression (its refusal then
/// advises only what the engine can do).
pub fn check_with(
    spec: &ModelSpec,
    policy: &Policy,
    work: Workload,
    machine: Machine,
    cap: &Capacity,
    compression: bool,
) -> Result<Footprint> {
    let fp = footprint(spec, policy, work, machine)?;
    let over = overruns(&fp.total(), cap);
    if over.is_empty() {
        return Ok(fp);
    }
    let remedies = remedies_with(spec, policy, work, machine, cap, compression)?;
    let refusal = Refusal { footprint: fp, overruns: over, remedies };
    Err(Error::PolicyDoesNotFit(refusal.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: Machine = Machine { gpu_compute: true, can_pin: true };
    const WORK: Workload = Workload { prompt_len: 512, gen_len: 32 };
    const GIB: u64 = 1 << 30;

    fn spec(layers: usize, h: usize) -> ModelSpec {
        crate::spec::testing::spec(layers, h, 128, true)
    }

    fn policy(percent: [f64; 6], gbs: usize, nb: usize) -> Policy {
        match (Policy { gpu_batch_size: gbs, num_gpu_batches: nb, ..Policy::default() }).with_percent(&percent) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn every_weight_byte_is_placed_once_as_the_engine_places_it() {
        let s = spec(48, 7168);
        let p = policy([20.0, 50.0, 30.0, 30.0, 100.0, 0.0], 32, 2);
        let fp = footprint(&s, &p, WORK, GPU).unwrap();
        let w = fp.weights;
        assert_eq!(w.gpu + w.pinned + w.pageable + w.disk, s.weight_bytes(false).unwrap());
        assert_eq!(w.pageable, 0, "weights pinned by default");
        // 20% of 48 layers: 10 whole layers resident, with the embeddings.
        assert_eq!(w.gpu, s.outside_bytes().unwrap() + 10 * s.layer_bytes(false).unwrap());
        let k = fp.cache;
        // Keys and values of every position, and the batches' key masks (a
        // byte per position) on the GPU.
        assert_eq!(k.gpu + k.pageable + k.disk, s.kv_cache_bytes(64, 544) + 64 * 544);
        // 32 sequences at 30/30/40 split at round(9.6) and round(19.2): 10,
        // 9 and 13 sequences a batch.
        let seq = s.kv_cache_bytes(1, 544);
        assert_eq!((k.gpu, k.pageable, k.disk), (2 * 10 * seq + 64 * 544, 2 * 9 * seq, 2 * 13 * seq));
        assert_eq!(k.pinned, 0, "the cache is never pinned");
        assert!(fp.buffers.pinned > 0, "disk and pageable paths need the staging ring");
    }

    #[test]
    fn compression_packs_layer_matrices_exactly() {
        let s = spec(4, 1024);
        let mut p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 8, 1);
        let plain = footprint(&s, &p, WORK, GPU).unwrap();
        p.compress_weight = true;
        let packed = footprint(&s, &p, WORK, GPU).unwrap();
        let per_layer = s.layer_bytes(true).unwrap();
        assert_eq!(packed.weights.gpu, s.outside_bytes().unwrap() + 4 * per_layer);
        assert!(packed.weights.gpu < plain.weights.gpu);
        // The plain layer the packed ones are unpacked into.
        assert_eq!(packed.buffers.gpu - plain.buffers.gpu, s.layer_bytes(false).unwrap());
    }

    #[test]
    fn streamed_rows_split_as_the_engine_rounds_them() {
        let s = spec(10, 256);
        let split = split_layers(10, 0.0, 30.0);
        let (host, disk) = streamed_layer_bytes(&s, &split, false).unwrap();
        assert_eq!(host + disk, s.layer_bytes(false).unwrap());
        let by_hand: u64 = held_layer_tensors(&s, false)
            .unwrap()
            .iter()
            .map(|(shape, dt)| {
                let rows = shape[0];
                let host_rows = ((rows as f64) * 0.3).round() as u64;
                host_rows * (shape.iter().skip(1).product::<usize>() * dt.size()) as u64
            })
            .sum();
        assert_eq!(host, by_hand);
    }

    #[test]
    fn all_on_gpu_needs_no_staging() {
        let s = spec(32, 4096);
        let fp = footprint(&s, &policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 32, 1), WORK, GPU).unwrap();
        assert_eq!(fp.total().host(), 0);
        assert_eq!(fp.total().disk, 0);
    }

    #[test]
    fn a_policy_that_does_not_fit_is_refused_with_advice() {
        // 55 GB of weights on the host of a machine with 40 GiB; packed
        // (about 15.5 GB) they fit.
        let s = spec(48, 7168);
        let p = policy([0.0, 100.0, 100.0, 0.0, 100.0, 0.0], 32, 2);
        let cap = Capacity { gpu: 78 * GIB, host: 40 * GIB, pinnable: u64::MAX, disk: 500 * GIB };
        let err = match check(&s, &p, WORK, GPU, &cap) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("should not fit"),
        };
        assert!(err.contains("host: needs"), "{err}");
        assert!(err.contains("1. --pin-weight 0: still does not fit"), "{err}");
        assert!(err.contains("2. --compress-weight: fits"), "{err}");
        let roomy = Capacity { host: 100 * GIB, ..cap };
        assert!(check(&s, &p, WORK, GPU, &roomy).is_ok());
    }

    #[test]
    fn unpinning_helps_only_against_the_locked_memory_limit() {
        let s = spec(32, 4096);
        let p = policy([0.0, 100.0, 100.0, 0.0, 100.0, 0.0], 32, 1);
        let cap = Capacity { gpu: 78 * GIB, host: 100 * GIB, pinnable: 4 * GIB, disk: 500 * GIB };
        let r = remedies(&s, &p, WORK, GPU, &cap).unwrap();
        assert_eq!(r[0].flag, "--pin-weight 0");
        assert!(r[0].fits, "pageable weights avoid the locked-memory limit");
        let err = check(&s, &p, WORK, GPU, &cap).unwrap_err().to_string();
        assert!(err.contains("locked-memory limit"), "{err}");
    }

    #[test]
    fn this_machine_has_some_of_everything() {
        let cap = Capacity::of_machine(GIB, &std::env::temp_dir());
        assert!(cap.host > 0, "MemAvailable");
        assert!(cap.disk > 0, "statvfs of the temporary directory");
        assert!(cap.pinnable > 0);
        let later = std::env::temp_dir().join("tierlm-not-made-yet/offload");
        assert!(!later.exists());
        assert!(disk_free(&later).is_some_and(|b| b > 0), "the nearest existing ancestor is asked");
        assert!(disk_free(std::path::Path::new("not-made-yet-relative")).is_some_and(|b| b > 0));
    }

    #[test]
    fn nothing_helps_when_the_cache_is_too_big() {
        let s = spec(96, 12288);
        let p = policy([0.0, 0.0, 100.0, 0.0, 100.0, 0.0], 64, 8);
        let cap = Capacity { gpu: 16 * GIB, host: 200 * GIB, pinnable: u64::MAX, disk: 1500 * GIB };
        let err = check(&s, &p, WORK, GPU, &cap).unwrap_err().to_string();
        assert!(err.contains("none of them is enough"), "{err}");
    }

    /// What the GPU engine allocates for a block of `policy`'s batches of
    /// `capacity` positions, from its own functions and without a GPU:
    /// the homes by `allocate_homes` (with the placements `new_cache`
    /// makes from the plan's shares, on three pageable host devices
    /// standing in for GPU, host and disk, whose accounts say what each
    /// holds; 4-bit with the layout `pack_scratch` makes), the key masks
    /// as `KeyMask::new`, the slots as `ensure_slots` and the scratch as
    /// `pack_scratch` size them.
    fn engine_block(spec: &ModelSpec, policy: &Policy, capacity: usize) -> GpuCacheBytes {
        use crate::gpu::cache::{allocate_homes, CacheShape};
        use tier_api::{Device, HostMemKind, Shape};
        use tier_host::{HostConfig, HostDevice};
        let devices: Vec<std::sync::Arc<HostDevice>> = (0..3)
            .map(|_| HostDevice::new(HostConfig { kind: HostMemKind::Pageable, ..HostConfig::default() }).unwrap())
            .collect();
        let plan = CachePlan::of_policy(policy);
        let placements: Vec<(&dyn Device, f64)> =
            plan.shares().into_iter().map(|(t, s)| (devices[tier_index(t)].as_ref() as &dyn Device, s)).collect();
        let kv = spec.kv;
        let shape = CacheShape { layers: spec.layers, kv_heads: kv.kv_heads, head_dim: kv.head_dim };
        let batch = policy.gpu_batch_size;
        let elems = shape.layer_elems(batch, capacity).unwrap();
        let layout = plan.compress.then(|| packed_layout(elems / kv.head_dim, kv.head_dim, kv.dtype).unwrap());
        let dims = Shape::new([batch, kv.kv_heads, capacity, kv.head_dim]);
        let _homes: Vec<_> = (0..policy.num_gpu_batches)
            .map(|_| allocate_homes(&placements, &dims, kv.dtype, spec.layers, layout.as_ref()).unwrap())
            .collect();
        let held = |i: usize| devices[i].account().stats().asked;
        let size = kv.dtype.size();
        let through = plan.through_slots();
        GpuCacheBytes {
            homes: TierBytes { gpu: held(0), pinned: 0, pageable: held(1), disk: held(2) },
            masks: (policy.num_gpu_batches * batch * capacity) as u64,
            slots: if through { (2 * 2 * elems * size) as u64 } else { 0 },
            scratch: layout
                .filter(|_| policy.cache_gpu_percent < 100.0)
                .map_or(0, |l| (2 * (l.total_bytes() + elems * size)) as u64),
        }
    }

    fn with_kv(layers: usize, kv_heads: usize, head_dim: usize, dtype: DType) -> ModelSpec {
        let mut s = crate::spec::testing::spec(layers, 256, 64, false);
        s.kv = KvLayout { kv_heads, head_dim, dtype };
        s
    }

    #[test]
    fn the_cache_is_counted_as_the_gpu_engine_allocates_it() {
        let work = Workload { prompt_len: 7, gen_len: 5 };
        let capacity = 12;
        let plain: &[(f64, f64)] = &[(30.0, 40.0), (0.0, 100.0), (100.0, 0.0), (0.0, 0.0), (25.0, 50.0), (14.0, 12.0)];
        let mut cases = 0;
        for head_dim in [16, 64, 80, 128] {
            for (kv_heads, dtype) in [(2, DType::F16), (3, DType::BF16)] {
                let s = with_kv(2, kv_heads, head_dim, dtype);
                for gbs in [1, 3, 4, 64] {
                    for nb in [1, 3] {
                        let shares = plain.iter().map(|&sh| (sh, false));
                        let packed = [(100.0, 0.0), (0.0, 100.0), (0.0, 0.0)].into_iter().map(|sh| (sh, true));
                        for ((g, c), compress) in shares.chain(packed) {
                            let mut p = policy([100.0, 0.0, g, c, 100.0, 0.0], gbs, nb);
                            p.compress_cache = compress;
                            let label =
                                format!("head_dim {head_dim} {dtype:?} batch {gbs}×{nb} at {g}/{c} 4-bit {compress}");
                            let engine = engine_block(&s, &p, capacity);
                            let plan = gpu_cache_bytes(&s, &p, capacity).unwrap();
                            assert_eq!(plan, engine, "{label}");
                            let fp = footprint(&s, &p, work, GPU).unwrap();
                            let want = TierBytes { gpu: engine.homes.gpu + engine.masks, ..engine.homes };
                            assert_eq!(fp.cache, want, "{label}: the footprint's cache");
                            // The buffers beyond a resident plain cache's: the
                            // slots and the scratch.
                            let resident = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], gbs, nb);
                            let base = footprint(&s, &resident, work, GPU).unwrap().buffers.gpu;
                            assert_eq!(fp.buffers.gpu, base + engine.slots + engine.scratch, "{label}: buffers");
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 4 * 2 * 4 * 2 * 9);
    }

    #[test]
    fn homes_split_in_whole_sequences_by_the_allocation_s_rounding() {
        let seqs = |gbs, g, c| cache_sequences(gbs, &policy([100.0, 0.0, g, c, 100.0, 0.0], gbs, 1)).unwrap();
        assert_eq!(seqs(4, 30.0, 40.0), [1, 2, 1]);
        assert_eq!(seqs(4, 0.0, 100.0), [0, 4, 0]);
        assert_eq!(seqs(4, 100.0, 0.0), [4, 0, 0]);
        assert_eq!(seqs(3, 0.0, 0.0), [0, 0, 3]);
        assert_eq!(seqs(1, 30.0, 40.0), [0, 1, 0]);
        // Cumulative split points, not each share rounded on its own (which
        // would say 1/1/8).
        assert_eq!(seqs(10, 14.0, 12.0), [1, 2, 7]);
        for gbs in [1, 3, 4, 7, 64] {
            for (g, c) in [(30.0, 40.0), (33.0, 33.0), (50.0, 50.0), (10.0, 0.0)] {
                let p = policy([100.0, 0.0, g, c, 100.0, 0.0], gbs, 1);
                let plan = CachePlan::of_policy(&p);
                let percents: Vec<f64> = plan.shares().iter().map(|s| s.1).collect();
                let ranges = tier_api::split_points(gbs, &percents, 1).unwrap();
                let mut want = [0; 3];
                for ((t, _), r) in plan.shares().iter().zip(ranges) {
                    want[tier_index(*t)] += r.len();
                }
                assert_eq!(cache_sequences(gbs, &p).unwrap(), want, "{gbs} at {g}/{c}");
            }
        }
    }

    #[test]
    fn a_4_bit_cache_is_its_layout_not_a_ratio() {
        let capacity = 544;
        for (head_dim, wider) in [(16, true), (64, false), (128, false)] {
            let s = with_kv(4, 8, head_dim, DType::F16);
            let mut p = policy([100.0, 0.0, 0.0, 100.0, 100.0, 0.0], 4, 2);
            p.compress_cache = true;
            let rows = 4 * 8 * capacity;
            let layout = packed_layout(rows, head_dim, DType::F16).unwrap();
            let fp = footprint(&s, &p, Workload { prompt_len: 512, gen_len: 32 }, GPU).unwrap();
            // Every layer's keys and values of both batches, a packed tensor each.
            assert_eq!(fp.cache.pageable, 2 * 4 * 2 * layout.total_bytes() as u64);
            assert_eq!(fp.cache.gpu, 2 * 4 * capacity as u64, "the key masks");
            let ratio = (s.kv_cache_bytes(8, capacity) as f64 * COMPRESSED_PER_F16_BYTE).ceil() as u64;
            // Narrow heads take narrower groups: a scale and a min per 16
            // values, not per 64 (0.75 bytes a value, not 0.5625); wide
            // ones add only the headers and the sections' padding.
            assert_eq!(fp.cache.pageable > ratio + ratio / 4, wider, "head_dim {head_dim}");
            assert!(fp.cache.pageable >= ratio, "head_dim {head_dim}");
            let per_token = cache_token_bytes(&s, &p, capacity).unwrap();
            let whole = 2.0 * layout.total_bytes() as f64;
            assert!((per_token * (4 * capacity) as f64 - whole).abs() < whole * 1e-12, "head_dim {head_dim}");
        }
        // A cache of f32 is not packed by the GPU engine.
        let mut p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 4, 1);
        p.compress_cache = true;
        let f32_cache = with_kv(2, 2, 64, DType::F32);
        assert!(footprint(&f32_cache, &p, WORK, GPU).is_err());
        assert!(cache_tensor_bytes(&f32_cache.kv, 4, 8, false).is_ok());
        // Sizes past usize saturate.
        let kv = KvLayout { kv_heads: 8, head_dim: 128, dtype: DType::F16 };
        assert_eq!(cache_tensor_bytes(&kv, usize::MAX, 2, true).unwrap(), u64::MAX);
        assert_eq!(cache_tensor_bytes(&kv, usize::MAX / 16, 1, true).unwrap(), u64::MAX);
        assert_eq!(cache_tensor_bytes(&kv, usize::MAX, 2, false).unwrap(), u64::MAX);
        assert_eq!(cache_tensor_bytes(&kv, 0, 2, true).unwrap(), 0);
    }

    #[test]
    fn sizes_near_u64_max_saturate_and_are_refused() {
        let s = spec(4, 1024);
        let p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], usize::MAX / 2, 2);
        let work = Workload { prompt_len: usize::MAX, gen_len: usize::MAX };
        let cap = Capacity { gpu: 78 * GIB, host: 100 * GIB, pinnable: u64::MAX, disk: 500 * GIB };
        let err = check(&s, &p, work, GPU, &cap).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }
}
