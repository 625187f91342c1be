//! The cost model: what one generation run moves over every link and
//! computes, and from measured [`Rates`] how long it takes.
//!
//! It models the GPU engine as it runs (FlexGen's schedule, with this
//! engine's overlaps): for every decoder layer of a step, the layer's
//! streamed weights are copied while every GPU batch of the block computes
//! on the layer before (copies run ahead through the weight slots, a
//! layer's host rows by DMA or the pinned relay and its disk rows through
//! the staged disk path, both at once); each batch's KV cache off the GPU is
//! loaded into a slot (positions `0..past`) while the previous batch
//! computes, and the step's new positions stored back; hidden states off the
//! GPU are loaded and stored around each batch's layer; with
//! `--cpu-cache-compute` the decode attention reads the host cache on the
//! CPU and only a batch's q, k, v rows and the attention's output cross
//! PCIe. So a layer takes as long as its slowest *stage*: host→GPU
//! (PCIe), GPU→host, the disk (reads and writes share the device), the
//! GPU's work (the larger of its products at the product rate and its
//! memory traffic at the memory rate, per batch) and the CPU's attention —
//! FlexGen's `max(ctog, gtoc, dtoc, ctod, comp)` per layer. A step is the
//! sum over its layers (resident layers and streamed ones separately) plus
//! the output head; the prefill is one such step over the prompt's
//! positions, a decode step one over a new position attending over the
//! cache so far.
//!
//! Memory per tier is not counted here: [`Prediction::footprint`] is
//! [`crate::plan::footprint`] itself, the plan the placement check uses.
//! Every byte count is an `f64` (a time model, not an allocation): a count
//! past `u64` only makes a time infinite, never wraps.

use serde::{Deserialize, Serialize};
use tier_api::HostMemKind;

use crate::error::{Error, Result};
use crate::plan::{self, footprint, split_layers, Footprint, Machine, Workload};
use crate::policy::Policy;
use crate::spec::ModelSpec;

/// Measured rates of a machine, bytes (or FLOP) per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Host→GPU by DMA from page-locked memory (`cuMemHostAlloc`).
    pub h2d_pinned: f64,
    /// GPU→host by DMA into page-locked memory.
    pub d2h_pinned: f64,
    /// Host→GPU from pageable memory registered with the driver.
    pub h2d_registered: f64,
    /// Host→GPU from pageable memory through the pinned relay.
    pub h2d_pageable: f64,
    /// GPU→host into pageable memory through the pinned relay.
    pub d2h_pageable: f64,
    /// Disk reads and writes with direct I/O in the offload directory.
    pub disk_read: f64,
    pub disk_write: f64,
    /// Host memory copy (bytes copied per second).
    pub host_memcpy: f64,
    /// GPU memory read by the products (bytes per second).
    pub gpu_mem: f64,
    /// f16 products on the GPU (FLOP per second).
    pub gpu_flops: f64,
    /// KV-cache bytes the CPU's decode attention reads per second.
    pub cpu_attention: f64,
}

impl Rates {
    /// Nominal figures of the reference GPU machine (an H100 on PCIe 5,
    /// docs/policy.md), for the rates a machine without a GPU cannot
    /// measure; `tierlm calibrate` says which of its rates are these.
    pub const NOMINAL: Rates = Rates {
        h2d_pinned: 55.0e9,
        d2h_pinned: 55.0e9,
        h2d_registered: 54.8e9,
        h2d_pageable: 33.0e9,
        d2h_pageable: 33.0e9,
        disk_read: 2.0e9,
        disk_write: 1.8e9,
        host_memcpy: 10.0e9,
        gpu_mem: 2.5e12,
        gpu_flops: 600.0e12,
        cpu_attention: 20.0e9,
    };

    /// Every rate with its name, in the order of the fields.
    pub fn named(&self) -> [(&'static str, f64); 11] {
        [
            ("h2d_pinned", self.h2d_pinned),
            ("d2h_pinned", self.d2h_pinned),
            ("h2d_registered", self.h2d_registered),
            ("h2d_pageable", self.h2d_pageable),
            ("d2h_pageable", self.d2h_pageable),
            ("disk_read", self.disk_read),
            ("disk_write", self.disk_write),
            ("host_memcpy", self.host_memcpy),
            ("gpu_mem", self.gpu_mem),
            ("gpu_flops", self.gpu_flops),
            ("cpu_attention", self.cpu_attention),
        ]
    }

    /// Refuses a rate that is not a positive finite number.
    pub fn validate(&self) -> Result<()> {
        match self.named().iter().find(|(_, r)| !(r.is_finite() && *r > 0.0)) {
            Some((name, r)) => Err(Error::InvalidArgument(format!("rate {name} = {r} is not a positive number"))),
            None => Ok(()),
        }
    }

    /// Host→GPU rate from host memory of `kind`.
    pub fn h2d(&self, kind: HostMemKind) -> f64 {
        match kind {
            HostMemKind::Pinned => self.h2d_pinned,
            HostMemKind::Registered => self.h2d_registered,
            HostMemKind::Pageable => self.h2d_pageable,
        }
    }
}

/// Bytes each link carries (in one stage, or summed over a step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LinkBytes {
    /// Host→GPU over PCIe: by DMA from page-locked memory, through the
    /// pinned relay from pageable memory, staged from disk.
    pub h2d_dma: f64,
    pub h2d_relay: f64,
    pub h2d_staged: f64,
    /// GPU→host over PCIe, the same three ways.
    pub d2h_dma: f64,
    pub d2h_relay: f64,
    pub d2h_staged: f64,
    pub disk_read: f64,
    pub disk_write: f64,
    /// GPU memory read and written by the compute and device copies.
    pub gpu_mem: f64,
    /// The part of `gpu_mem` moved by the kernels between the layer's
    /// weight products (norms, residuals, attention, the cache's copies,
    /// unpacking): they run one after another with the products, so their
    /// time adds to the products' rather than hiding under it.
    pub gpu_mem_serial: f64,
    /// Host memory the CPU's attention reads.
    pub host_mem: f64,
    /// Work on the GPU and the CPU, FLOP.
    pub gpu_flop: f64,
    /// The part of `gpu_flop` in the attention's batched products (serial
    /// with the weight products, like `gpu_mem_serial`).
    pub gpu_flop_serial: f64,
    pub cpu_flop: f64,
}

impl LinkBytes {
    pub fn h2d(&self) -> f64 {
        self.h2d_dma + self.h2d_relay + self.h2d_staged
    }

    pub fn d2h(&self) -> f64 {
        self.d2h_dma + self.d2h_relay + self.d2h_staged
    }

    /// GPU memory traffic of a kernel between the weight products.
    fn serial_mem(&mut self, bytes: f64) {
        self.gpu_mem += bytes;
        self.gpu_mem_serial += bytes;
    }

    /// Attention FLOP (batched products beside the weight products).
    fn serial_flop(&mut self, flop: f64) {
        self.gpu_flop += flop;
        self.gpu_flop_serial += flop;
    }

    fn scaled(&self, k: f64) -> LinkBytes {
        LinkBytes {
            h2d_dma: self.h2d_dma * k,
            h2d_relay: self.h2d_relay * k,
            h2d_staged: self.h2d_staged * k,
            d2h_dma: self.d2h_dma * k,
            d2h_relay: self.d2h_relay * k,
            d2h_staged: self.d2h_staged * k,
            disk_read: self.disk_read * k,
            disk_write: self.disk_write * k,
            gpu_mem: self.gpu_mem * k,
            gpu_mem_serial: self.gpu_mem_serial * k,
            host_mem: self.host_mem * k,
            gpu_flop: self.gpu_flop * k,
            gpu_flop_serial: self.gpu_flop_serial * k,
            cpu_flop: self.cpu_flop * k,
        }
    }

    fn add(&mut self, o: &LinkBytes) {
        self.h2d_dma += o.h2d_dma;
        self.h2d_relay += o.h2d_relay;
        self.h2d_staged += o.h2d_staged;
        self.d2h_dma += o.d2h_dma;
        self.d2h_relay += o.d2h_relay;
        self.d2h_staged += o.d2h_staged;
        self.disk_read += o.disk_read;
        self.disk_write += o.disk_write;
        self.gpu_mem += o.gpu_mem;
        self.gpu_mem_serial += o.gpu_mem_serial;
        self.host_mem += o.host_mem;
        self.gpu_flop += o.gpu_flop;
        self.gpu_flop_serial += o.gpu_flop_serial;
        self.cpu_flop += o.cpu_flop;
    }
}

/// Seconds each stage takes (in one layer, or summed over a step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageTimes {
    pub h2d: f64,
    pub d2h: f64,
    pub disk: f64,
    pub gpu: f64,
    pub cpu: f64,
}

impl StageTimes {
    /// The stages by name.
    pub fn named(&self) -> [(&'static str, f64); 5] {
        [
            ("PCIe host→GPU", self.h2d),
            ("PCIe GPU→host", self.d2h),
            ("disk", self.disk),
            ("GPU compute", self.gpu),
            ("CPU attention", self.cpu),
        ]
    }

    /// The slowest stage and its time: the stages overlap, so a layer
    /// takes this long.
    pub fn bound(&self) -> (&'static str, f64) {
        self.named().into_iter().fold(("GPU compute", 0.0), |b, s| if s.1 > b.1 { s } else { b })
    }

    fn add(&mut self, o: &StageTimes) {
        self.h2d += o.h2d;
        self.d2h += o.d2h;
        self.disk += o.disk;
        self.gpu += o.gpu;
        self.cpu += o.cpu;
    }
}

/// One step (the prefill, or one decode step) of one block.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepCost {
    /// Bytes and work of the whole step, every layer and the head.
    pub bytes: LinkBytes,
    /// Each stage's time summed over the step's layers.
    pub stages: StageTimes,
    /// The step's time: the sum over layers of each layer's slowest stage,
    /// and the output head.
    pub seconds: f64,
    /// The stage that bounds most of the step's time.
    pub bound: String,
}

/// What the model predicts for one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// Blocks of `gpu_batch_size × num_gpu_batches` prompts the run takes.
    pub blocks: usize,
    /// The prefill of one block, and the decode step in the middle of the
    /// generation (attending over `prompt_len + gen_len / 2` positions).
    pub prefill: StepCost,
    pub decode_step: StepCost,
    /// Seconds of the whole run: every block's prefill and decode steps.
    pub prefill_s: f64,
    pub decode_s: f64,
    /// FlexLLMGen's definitions: prompts × prompt_len / prefill,
    /// prompts × (gen_len − 1) / decode (none for gen_len 1),
    /// prompts × gen_len / (prefill + decode).
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: Option<f64>,
    pub total_tokens_per_s: f64,
    /// The plan's bytes per tier ([`crate::plan::footprint`]).
    pub footprint: Footprint,
}

/// What a run is: the model, the work, how many prompts, and how the host
/// memory for streamed weights is allocated.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub spec: &'a ModelSpec,
    pub work: Workload,
    pub prompts: usize,
    /// The host memory kind of the streamed weights when `pin_weight`
    /// (pinned or registered); pageable otherwise.
    pub host: HostMemKind,
}

impl Run<'_> {
    /// The kind the streamed weights' host rows live in under `policy`.
    pub fn weight_host(&self, policy: &Policy) -> HostMemKind {
        if policy.pin_weight && self.host.is_page_locked() {
            self.host
        } else {
            HostMemKind::Pageable
        }
    }

    /// The machine the plan counts for: the GPU computes; host memory is
    /// pinned when the weights' kind is page-locked.
    pub fn machine(&self, policy: &Policy) -> Machine {
        Machine { gpu_compute: true, can_pin: self.weight_host(policy).is_page_locked() }
    }
}

/// Sums the elements of a layer's matrices: each multiplies every row of
/// a batch once (two FLOP an element a row).
fn layer_matrix_elements(spec: &ModelSpec) -> f64 {
    spec.layer.iter().filter(|t| t.shape.len() == 2).map(|t| t.elements().unwrap_or(u64::MAX) as f64).sum()
}

/// The largest matrix outside the layers: the output head's product over
/// the vocabulary, once a sequence a step.
fn head_elements(spec: &ModelSpec) -> f64 {
    spec.outside
        .iter()
        .filter(|t| t.shape.len() == 2)
        .map(|t| t.elements().unwrap_or(u64::MAX) as f64)
        .fold(0.0, f64::max)
}

/// A batch's sequences on the GPU, in host memory and on disk, in whole
/// sequences as the cache places them ([`plan::cache_sequences`]).
fn sequence_shares(gbs: usize, policy: &Policy) -> Result<[f64; 3]> {
    Ok(plan::cache_sequences(gbs, policy)?.map(|n| n as f64))
}

/// Which part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The prompt's positions at once.
    Prefill,
    /// One new position over `past` cached ones.
    Decode { past: usize },
}

/// A layer's bytes and work for one block under `policy`, `streamed` or
/// resident.
fn layer_bytes(run: &Run<'_>, policy: &Policy, phase: Phase, streamed: bool) -> Result<LinkBytes> {
    let spec = run.spec;
    let mut b = LinkBytes::default();
    let compress = policy.compress_weight;
    let nb = policy.num_gpu_batches as f64;
    let gbs = policy.gpu_batch_size;
    let w = spec.widths;
    let act = w.dtype.size() as f64;
    let hidden = w.hidden as f64;
    let p = run.work.prompt_len as f64;
    let rows = match phase {
        Phase::Prefill => gbs as f64 * p,
        Phase::Decode { .. } => gbs as f64,
    };

    // Weights: a streamed layer's rows cross to a GPU slot once a step.
    let plain = spec.layer_bytes(false)? as f64;
    if streamed {
        let split = split_layers(spec.layers, policy.w_gpu_percent, policy.w_cpu_percent);
        let (host, disk) = plan::streamed_layer_bytes(spec, &split, compress)?;
        if run.weight_host(policy).is_page_locked() {
            b.h2d_dma += host as f64;
        } else {
            b.h2d_relay += host as f64;
        }
        b.h2d_staged += disk as f64;
        b.disk_read += disk as f64;
    }
    if compress {
        // Unpacked on the GPU once a step: the packed bytes read, the plain
        // layer written.
        b.serial_mem(spec.layer_bytes(true)? as f64 + plain);
    }
    // Every batch's products read the layer's weights from GPU memory.
    b.gpu_mem += nb * plain;
    b.gpu_flop += nb * 2.0 * rows * layer_matrix_elements(spec);
    // Hidden states, q/k/v and the MLP's inner rows written and read.
    b.serial_mem(nb * rows * act * (4.0 * hidden + 2.0 * w.intermediate as f64));

    // The KV cache.
    let tb = spec.kv.token_bytes() as f64;
    // A position's keys and values as stored (4-bit: the engine's layout,
    // its headers, scales and mins shared out over the positions).
    let capacity = run.work.prompt_len.saturating_add(run.work.gen_len);
    let stored_tb = plan::cache_token_bytes(spec, policy, capacity)?;
    let q_width = (w.heads * spec.kv.head_dim) as f64;
    let [g, c, d] = sequence_shares(gbs, policy)?;
    // q, k and v rearranged into heads for the attention and its output
    // back (each read and written).
    b.serial_mem(nb * rows * 2.0 * (2.0 * q_width * act + tb));
    let off_gpu = c + d > 0.0;
    let cpu_compute = policy.cpu_cache_compute && policy.cache_cpu_percent >= 100.0;
    match phase {
        Phase::Prefill => {
            // Attention over every key, as computed: QKᵀ and PV, and the
            // scores between them (f16: written, read and written by the
            // softmax, read).
            b.serial_flop(nb * 4.0 * gbs as f64 * p * p * q_width);
            b.serial_mem(nb * gbs as f64 * w.heads as f64 * p * p * 4.0 * act);
            b.serial_mem(nb * gbs as f64 * p * tb);
            // The prompt's keys and values go to their homes.
            let new = p;
            b.d2h_relay += nb * c * new * stored_tb;
            b.d2h_staged += nb * d * new * stored_tb;
            b.disk_write += nb * d * new * stored_tb;
            if policy.compress_cache {
                // Packed from the slot: a GPU home straight from it, one off
                // the GPU through the scratch (copied out, quantized).
                b.serial_mem(nb * new * ((c + d) * (3.0 * tb + stored_tb) + g * (tb + stored_tb)));
            } else if off_gpu {
                // Through a slot: the GPU's sequences copied device to device.
                b.serial_mem(nb * 2.0 * g * new * tb);
            }
        }
        Phase::Decode { past } => {
            let past = past as f64;
            if cpu_compute {
                // Only q, k, v go down and the attention's output comes back;
                // the CPU reads the whole cache (values as kept by the
                // sparsity) and appends the new position.
                let kept = 0.5 + 0.5 * policy.attn_sparsity.clamp(0.0, 1.0);
                b.d2h_dma += nb * gbs as f64 * (q_width * act + tb);
                b.h2d_dma += nb * gbs as f64 * q_width * act;
                b.host_mem += nb * gbs as f64 * past * tb * kept;
                b.cpu_flop += nb * 4.0 * gbs as f64 * past * q_width * kept;
            } else {
                b.serial_flop(nb * 4.0 * gbs as f64 * past * q_width);
                b.serial_mem(nb * gbs as f64 * past * tb);
                if policy.compress_cache {
                    // Every sequence's layer through a slot. A GPU home is
                    // unpacked straight into it and packed straight back
                    // (the whole layer); one off the GPU goes through the
                    // scratch: unpacked there, copied into the slot, copied
                    // out after the compute, packed.
                    b.serial_mem(
                        nb * past * ((c + d) * (6.0 * tb + 2.0 * stored_tb) + g * (2.0 * tb + 2.0 * stored_tb)),
                    );
                }
                if off_gpu {
                    // Loaded into a slot: positions 0..past of every sequence,
                    // the GPU's own by a device copy (4-bit: counted above).
                    if !policy.compress_cache {
                        b.serial_mem(nb * 2.0 * g * past * tb);
                    }
                    b.h2d_relay += nb * c * past * stored_tb;
                    b.h2d_staged += nb * d * past * stored_tb;
                    b.disk_read += nb * d * past * stored_tb;
                    // The new position stored back.
                    b.d2h_relay += nb * c * stored_tb;
                    b.d2h_staged += nb * d * stored_tb;
                    b.disk_write += nb * d * stored_tb;
                }
            }
        }
    }

    // Hidden states off the GPU: loaded before and stored after each
    // batch's layer.
    if policy.act_gpu_percent < 100.0 {
        let bytes = nb * rows * hidden * w.hidden_value_bytes() as f64;
        if policy.act_cpu_percent >= 100.0 {
            b.h2d_relay += bytes;
            b.d2h_relay += bytes;
        } else {
            b.h2d_staged += bytes;
            b.d2h_staged += bytes;
            b.disk_read += bytes;
            b.disk_write += bytes;
        }
    }
    Ok(b)
}

/// Seconds of each stage of a layer carrying `b`: one batch's GPU work is
/// its weight products (bound by their FLOP or their weight reads) plus
/// the kernels between them.
fn stage_times(b: &LinkBytes, rates: &Rates, run: &Run<'_>, policy: &Policy) -> StageTimes {
    let relay_h2d = rates.h2d_pageable;
    let dma_h2d = rates.h2d(run.weight_host(policy)).max(rates.h2d_pageable);
    StageTimes {
        h2d: b.h2d_dma / dma_h2d + b.h2d_relay / relay_h2d + b.h2d_staged / rates.h2d_pinned,
        d2h: b.d2h_dma / rates.d2h_pinned + b.d2h_relay / rates.d2h_pageable + b.d2h_staged / rates.d2h_pinned,
        disk: b.disk_read / rates.disk_read + b.disk_write / rates.disk_write,
        // The weight products are bound by their FLOP or their weight
        // reads; the kernels between them add their own time.
        gpu: ((b.gpu_flop - b.gpu_flop_serial) / rates.gpu_flops).max((b.gpu_mem - b.gpu_mem_serial) / rates.gpu_mem)
            + b.gpu_flop_serial / rates.gpu_flops
            + b.gpu_mem_serial / rates.gpu_mem,
        cpu: b.host_mem / rates.cpu_attention,
    }
}

/// The GPU's fixed cost of one batch's layer beyond its bytes and FLOP:
/// about twenty kernel launches and the cache slot's events. It keeps the
/// search from splitting a block into many tiny batches that the bytes
/// alone would call free.
pub const BATCH_LAYER_OVERHEAD_S: f64 = 100e-6;

/// One step of one block.
fn step(run: &Run<'_>, policy: &Policy, rates: &Rates, phase: Phase) -> Result<StepCost> {
    let split = split_layers(run.spec.layers, policy.w_gpu_percent, policy.w_cpu_percent);
    let mut cost = StepCost::default();
    let mut bound_time: Vec<(&'static str, f64)> = Vec::new();
    for (count, streamed) in [(split.gpu_end, false), (split.offloaded(), true)] {
        if count == 0 {
            continue;
        }
        let b = layer_bytes(run, policy, phase, streamed)?;
        let mut t = stage_times(&b, rates, run, policy);
        t.gpu += policy.num_gpu_batches as f64 * BATCH_LAYER_OVERHEAD_S;
        let (name, layer_s) = t.bound();
        let n = count as f64;
        cost.bytes.add(&b.scaled(n));
        cost.stages.add(&StageTimes {
            h2d: t.h2d * n,
            d2h: t.d2h * n,
            disk: t.disk * n,
            gpu: t.gpu * n,
            cpu: t.cpu * n,
        });
        cost.seconds += layer_s * n;
        bound_time.push((name, layer_s * n));
    }
    // The output head: every sequence's last position (all of them at
    // prefill, as the engine computes only the last) times the head matrix.
    let head = head_elements(run.spec);
    let seqs = policy.block_size() as f64;
    let head_bytes = LinkBytes {
        gpu_flop: 2.0 * seqs * head,
        gpu_mem: policy.num_gpu_batches as f64 * head * run.spec.widths.dtype.size() as f64,
        ..LinkBytes::default()
    };
    let t = stage_times(&head_bytes, rates, run, policy);
    cost.bytes.add(&head_bytes);
    cost.stages.gpu += t.gpu;
    cost.seconds += t.gpu;
    bound_time.push(("GPU compute", t.gpu));
    // The stage that bounds the most seconds.
    let mut by_stage: Vec<(&'static str, f64)> = Vec::new();
    for (name, s) in bound_time {
        match by_stage.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 += s,
            None => by_stage.push((name, s)),
        }
    }
    cost.bound = by_stage.into_iter().fold(("GPU compute", -1.0), |b, s| if s.1 > b.1 { s } else { b }).0.to_string();
    Ok(cost)
}

/// Decode steps sampled at most, evenly over the generation (each standing
/// for the steps around it): the cost of a step is linear in the past
/// positions within a stage, so a few points integrate it closely.
const DECODE_SAMPLES: usize = 8;

/// Predicts a run of `policy` (see the module's documentation).
pub fn predict(run: &Run<'_>, policy: &Policy, rates: &Rates) -> Result<Prediction> {
    policy.validate()?;
    rates.validate()?;
    let block = policy.block_size();
    if block == 0 || run.prompts == 0 || run.work.prompt_len == 0 || run.work.gen_len == 0 {
        return Err(Error::InvalidArgument("prompts, prompt length and generation length must be at least 1".into()));
    }
    let fp = footprint(run.spec, policy, run.work, run.machine(policy))?;
    let blocks = run.prompts.div_ceil(block);
    let prefill = step(run, policy, rates, Phase::Prefill)?;
    let p = run.work.prompt_len;
    let steps = run.work.gen_len - 1;
    let mid = step(run, policy, rates, Phase::Decode { past: p.saturating_add(run.work.gen_len / 2) })?;
    // Sum the decode steps: step i (1-based) attends over p + i positions.
    let mut decode_block = 0.0;
    if steps > 0 {
        let samples = steps.min(DECODE_SAMPLES);
        for k in 0..samples {
            // The k-th of `samples` equal runs of steps, at its middle.
            let first = 1 + steps * k / samples;
            let end = 1 + steps * (k + 1) / samples;
            let at = (first + end - 1) / 2;
            let s = step(run, policy, rates, Phase::Decode { past: p.saturating_add(at) })?;
            decode_block += s.seconds * (end - first) as f64;
        }
    }
    let prefill_s = prefill.seconds * blocks as f64;
    let decode_s = decode_block * blocks as f64;
    let n = run.prompts as f64;
    Ok(Prediction {
        blocks,
        prefill_tokens_per_s: n * p as f64 / prefill_s,
        decode_tokens_per_s: (steps > 0).then(|| n * steps as f64 / decode_s),
        total_tokens_per_s: n * run.work.gen_len as f64 / (prefill_s + decode_s),
        prefill,
        decode_step: mid,
        prefill_s,
        decode_s,
        footprint: fp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(layers: usize, h: usize) -> ModelSpec {
        crate::spec::testing::spec(layers, h, 128, false)
    }

    fn policy(percent: [f64; 6], gbs: usize, nb: usize) -> Policy {
        Policy { gpu_batch_size: gbs, num_gpu_batches: nb, ..Policy::default() }.with_percent(&percent).unwrap()
    }

    fn run(spec: &ModelSpec, prompts: usize) -> Run<'_> {
        Run { spec, work: Workload { prompt_len: 512, gen_len: 32 }, prompts, host: HostMemKind::Registered }
    }

    #[test]
    fn weights_on_the_host_cross_pcie_once_a_step() {
        let s = spec(48, 7168);
        let p = policy([0.0, 100.0, 100.0, 0.0, 100.0, 0.0], 32, 2);
        let pred = predict(&run(&s, 64), &p, &Rates::NOMINAL).unwrap();
        let layers = 48.0 * s.layer_bytes(false).unwrap() as f64;
        assert_eq!(pred.decode_step.bytes.h2d_dma, layers);
        assert_eq!(pred.decode_step.bytes.disk_read, 0.0);
        assert_eq!(pred.decode_step.bound, "PCIe host→GPU");
        // The bound: every weight over the registered rate.
        let floor = layers / Rates::NOMINAL.h2d_registered;
        assert!(pred.decode_step.seconds >= floor && pred.decode_step.seconds < floor * 1.05, "{pred:?}");
        assert_eq!(pred.footprint, footprint(&s, &p, run(&s, 64).work, run(&s, 64).machine(&p)).unwrap());
    }

    #[test]
    fn all_on_the_gpu_moves_nothing_over_pcie() {
        let s = spec(32, 4096);
        let p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 32, 1);
        let pred = predict(&run(&s, 32), &p, &Rates::NOMINAL).unwrap();
        for st in [&pred.prefill, &pred.decode_step] {
            assert_eq!((st.bytes.h2d(), st.bytes.d2h(), st.bytes.disk_read), (0.0, 0.0, 0.0));
            assert_eq!(st.bound, "GPU compute");
        }
        // Decode reads every layer's weights once a batch: memory-bound.
        assert!(pred.decode_step.bytes.gpu_mem > 32.0 * s.layer_bytes(false).unwrap() as f64);
        assert!(pred.total_tokens_per_s > 0.0 && pred.decode_tokens_per_s.unwrap() > pred.total_tokens_per_s);
    }

    #[test]
    fn disk_rows_and_a_disk_cache_load_the_disk() {
        let s = spec(16, 2048);
        let p = policy([0.0, 50.0, 0.0, 0.0, 100.0, 0.0], 8, 1);
        let pred = predict(&run(&s, 8), &p, &Rates::NOMINAL).unwrap();
        let d = &pred.decode_step.bytes;
        assert!(d.disk_read > 0.0 && d.disk_write > 0.0, "{d:?}");
        assert_eq!(pred.decode_step.bound, "disk");
        // Halving the disk's rate slows the step.
        let slow = Rates { disk_read: Rates::NOMINAL.disk_read / 2.0, ..Rates::NOMINAL };
        let slower = predict(&run(&s, 8), &p, &slow).unwrap();
        assert!(slower.decode_s > pred.decode_s * 1.5);
    }

    #[test]
    fn cpu_attention_moves_q_k_v_not_the_cache() {
        let s = spec(8, 1024);
        let mut p = policy([100.0, 0.0, 0.0, 100.0, 100.0, 0.0], 16, 1);
        let gpu_attn = predict(&run(&s, 16), &p, &Rates::NOMINAL).unwrap();
        p.cpu_cache_compute = true;
        let cpu_attn = predict(&run(&s, 16), &p, &Rates::NOMINAL).unwrap();
        assert!(cpu_attn.decode_step.bytes.h2d() < gpu_attn.decode_step.bytes.h2d() / 10.0);
        assert!(cpu_attn.decode_step.bytes.host_mem > 0.0);
        assert_eq!(gpu_attn.decode_step.bytes.host_mem, 0.0);
    }

    #[test]
    fn more_blocks_take_longer_and_bad_rates_are_refused() {
        let s = spec(8, 1024);
        let p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 4, 1);
        let one = predict(&run(&s, 4), &p, &Rates::NOMINAL).unwrap();
        let three = predict(&run(&s, 12), &p, &Rates::NOMINAL).unwrap();
        assert_eq!(three.blocks, 3);
        assert!((three.decode_s / one.decode_s - 3.0).abs() < 1e-9);
        let bad = Rates { disk_read: f64::NAN, ..Rates::NOMINAL };
        assert!(predict(&run(&s, 4), &p, &bad).unwrap_err().to_string().contains("disk_read"));
        let zero = Rates { gpu_flops: 0.0, ..Rates::NOMINAL };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn huge_workloads_give_infinite_times_not_panics() {
        let s = spec(4, 1024);
        let p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 1 << 20, 1 << 10);
        let r = Run { work: Workload { prompt_len: usize::MAX / 4, gen_len: 2 }, ..run(&s, usize::MAX) };
        let pred = predict(&r, &p, &Rates::NOMINAL).unwrap();
        assert_eq!(pred.footprint.total().gpu, u64::MAX, "the plan saturates");
        assert!(pred.prefill.seconds > 1e6, "{}", pred.prefill.seconds);
    }
}
