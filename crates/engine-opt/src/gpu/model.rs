//! OPT on the GPU, a part at a time: [`GpuModel::embed`], then
//! [`GpuModel::layer_forward`] for each layer with that layer's weights and
//! cache (itself [`GpuModel::attention_block`] then
//! [`GpuModel::mlp_block`]), then [`GpuModel::logits`] and
//! [`GpuModel::argmax`]. The maths is the CPU reference's
//! ([`crate::model`]); only the arithmetic's order and the rounding of
//! activations to f16 between products differ.

use half::f16;
use indicatif::ProgressBar;

use super::blas::{BatchedOut, LinearOut, Operand};
use super::buffer::DevBuf;
use super::cache::{GpuKvCache, GpuLayerCache, KeyMask};
use super::kernels::{decode_kernel_fits, EmbedTables, StepTokens};
use super::layer::GpuLayer;
use super::offload::{LayerSplit, OffloadTiers, WeightStreamer};
use super::packed::Unpacker;
use super::profile::Profiler;
use super::tiered_cache::{CachePlan, CacheStreamer, CacheTiers, TieredCache};
use super::view::{DecodeAttn, Gemm, KvShape, KvView, Mat, MatMut, ScoreRows};
use super::weights::{dummy_init, dummy_layer, load_layer, GpuEmbeddings, NormParams, OptLayer};
use super::Gpu;
use crate::config::OptConfig;
use crate::error::{Error, Result};
use crate::weights::WeightSource;

/// OPT's layer norms' epsilon (PyTorch's `LayerNorm` default, as the CPU
/// reference uses).
const LN_EPS: f32 = crate::model::LAYER_NORM_EPS;

/// OPT's learned positions: row `p + 2` for position `p`, padding row 1.
const OPT_POSITIONS: ops::gpu::kernels::LearnedPositions =
    ops::gpu::kernels::LearnedPositions { offset: crate::config::POSITION_OFFSET, pad_row: 1 };

/// Bytes of attention scores the prefill may hold at once (scores are f16,
/// `heads × new × total` per sequence); sequences are taken in chunks that
/// fit, one sequence at least.
pub const SCORE_BUDGET_BYTES: usize = 1 << 30;

/// Where a model's weights come from: a checkpoint, or seeded random
/// values made on the GPU (the dummy model).
#[derive(Clone, Copy)]
pub enum WeightOrigin<'a> {
    Checkpoint(&'a dyn WeightSource),
    Seeded(u64),
}

/// What a layer needs to know about the step besides the hidden states.
#[derive(Debug, Clone, Copy)]
pub struct GpuStep<'a> {
    /// Sequences in the batch.
    pub batch: usize,
    /// New tokens per sequence (prompt length at prefill, 1 when decoding).
    pub new_len: usize,
    /// Positions already in the cache before this step.
    pub past: usize,
    /// Which cache positions hold real tokens, per sequence.
    pub key_mask: &'a KeyMask,
}

impl<'a> GpuStep<'a> {
    fn rows(&self) -> usize {
        self.batch * self.new_len
    }

    /// The key mask of the step's sequences, a row of positions each.
    fn mask(&self) -> Result<Mat<'a, u8>> {
        Ok(Mat::new(&self.key_mask.mask, self.batch, self.key_mask.stride)?)
    }
}

/// The hidden states of one batch, kept between layers: f32 (the residual
/// stream), and for post-layer-norm models their f16 copy, which is each
/// block's input.
#[derive(Debug)]
pub struct GpuHidden {
    pub hidden: DevBuf<f32>,
    pub hidden16: Option<DevBuf<f16>>,
}

impl GpuHidden {
    /// Room for `rows` hidden states of `config`.
    pub fn new(gpu: &Gpu, config: &OptConfig, rows: usize) -> Result<Self> {
        let h = config.hidden_size;
        let n =
            rows.checked_mul(h).ok_or_else(|| Error::Gpu(format!("hidden states of {rows} rows × {h} overflow")))?;
        let hidden16 = if config.do_layer_norm_before { None } else { Some(DevBuf::alloc(gpu, n)?) };
        Ok(GpuHidden { hidden: DevBuf::alloc(gpu, n)?, hidden16 })
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.hidden.bytes() + self.hidden16.as_ref().map_or(0, DevBuf::bytes)
    }

    /// Another handle on the same GPU buffers (the batches of a block share
    /// one when their hidden states live in host memory).
    pub fn share(&self) -> Self {
        GpuHidden { hidden: self.hidden.share(), hidden16: self.hidden16.as_ref().map(DevBuf::share) }
    }
}

/// Activations off the GPU (`--percent _ _ _ _ A_GPU A_CPU`, `A_GPU` 0):
/// each batch's hidden states live in host memory (`A_CPU` 100) or on disk
/// (`A_CPU` 0) between layers, loaded into one of two GPU buffers the
/// block's batches share before each layer and stored back beside the next
/// batch's compute (the runtime's [`runtime::gpu::activations`]; OPT's glue
/// is its parts, [`activation_parts`], and [`GpuHidden`] as their buffer).
pub use runtime::gpu::activations::{ActivationHome, ActivationTier};

/// The runtime's streamer of OPT's hidden states.
pub type ActivationStreamer = runtime::gpu::activations::ActivationStreamer<GpuHidden>;

/// OPT's hidden states as the runtime keeps them off the GPU: the f32
/// residual stream, and for post-layer-norm models its f16 copy (each
/// block's input), `hidden` values a row each.
pub fn activation_parts(config: &OptConfig) -> Vec<runtime::gpu::activations::ActPart> {
    use runtime::gpu::activations::ActPart;
    let h = config.hidden_size;
    let mut parts = vec![ActPart { dtype: tier_api::DType::F32, width: h }];
    if !config.do_layer_norm_before {
        parts.push(ActPart { dtype: tier_api::DType::F16, width: h });
    }
    parts
}

impl runtime::gpu::activations::ActBuffers for GpuHidden {
    fn part_tensors(&self) -> Vec<&tier_api::Tensor> {
        let mut out = vec![self.hidden.tensor()];
        out.extend(self.hidden16.as_ref().map(DevBuf::tensor));
        out
    }
}

/// Scratch space shared by the batches of a block: the products' outputs,
/// the step's inputs and the logits. Sized for `rows` rows (sequences ×
/// new tokens) and `batch` sequences per step at most.
#[derive(Debug)]
pub struct Workspace {
    rows: usize,
    batch: usize,
    x16: DevBuf<f16>,
    qkv: DevBuf<f16>,
    attn: DevBuf<f16>,
    /// Queries, then the attention's output, by head: `[batch][head][new][hd]`.
    heads: DevBuf<f16>,
    ffn: DevBuf<f16>,
    scores: Option<DevBuf<f16>>,
    last32: DevBuf<f32>,
    last16: DevBuf<f16>,
    proj16: DevBuf<f16>,
    /// `[batch, vocab]` f32, after [`GpuModel::logits`].
    pub logits: DevBuf<f32>,
    tokens: DevBuf<u32>,
    step_mask: DevBuf<u8>,
    past_real: DevBuf<i32>,
    picked: DevBuf<u32>,
    score_budget: usize,
}

impl Workspace {
    /// Scratch for steps of at most `rows` rows over at most `batch`
    /// sequences.
    pub fn new(gpu: &Gpu, config: &OptConfig, rows: usize, batch: usize) -> Result<Self> {
        let (h, e, f, v) = (config.hidden_size, config.word_embed_proj_dim(), config.ffn_dim, config.vocab_size);
        let wide = h.max(e);
        Ok(Workspace {
            rows,
            batch,
            x16: DevBuf::alloc(gpu, rows * wide)?,
            qkv: DevBuf::alloc(gpu, rows * 3 * h)?,
            attn: DevBuf::alloc(gpu, rows * h)?,
            heads: DevBuf::alloc(gpu, rows * h)?,
            ffn: DevBuf::alloc(gpu, rows * f)?,
            scores: None,
            last32: DevBuf::alloc(gpu, batch * h)?,
            last16: DevBuf::alloc(gpu, batch * wide)?,
            proj16: DevBuf::alloc(gpu, batch * e)?,
            logits: DevBuf::alloc(gpu, batch * v)?,
            tokens: DevBuf::alloc(gpu, rows)?,
            step_mask: DevBuf::alloc(gpu, rows)?,
            past_real: DevBuf::alloc(gpu, batch)?,
            picked: DevBuf::alloc(gpu, batch)?,
            score_budget: SCORE_BUDGET_BYTES,
        })
    }

    /// Sets the bytes of attention scores a step may hold at once (default
    /// [`SCORE_BUDGET_BYTES`]); smaller budgets take fewer sequences at a
    /// time.
    pub fn set_score_budget(&mut self, bytes: usize) {
        self.score_budget = bytes;
    }

    fn check(&self, step: &GpuStep<'_>) -> Result<()> {
        if step.rows() > self.rows || step.batch > self.batch {
            return Err(Error::Gpu(format!(
                "GPU workspace holds {} rows of {} sequences; the step has {} of {}",
                self.rows,
                self.batch,
                step.rows(),
                step.batch
            )));
        }
        Ok(())
    }

    /// Makes the f16 score buffer at least `len` elements (grown on demand,
    /// the old one freed first).
    fn ensure_scores(&mut self, gpu: &Gpu, len: usize) -> Result<()> {
        if self.scores.as_ref().is_none_or(|s| s.len() < len) {
            self.scores = None;
            gpu.synchronize()?;
            self.scores = Some(DevBuf::alloc(gpu, len)?);
        }
        Ok(())
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        [
            self.x16.bytes(),
            self.qkv.bytes(),
            self.attn.bytes(),
            self.heads.bytes(),
            self.ffn.bytes(),
            self.scores.as_ref().map_or(0, DevBuf::bytes),
            self.last32.bytes(),
            self.last16.bytes(),
            self.proj16.bytes(),
            self.logits.bytes(),
            self.tokens.bytes(),
            self.step_mask.bytes(),
            self.past_real.bytes(),
            self.picked.bytes(),
        ]
        .iter()
        .sum()
    }
}

/// Attention computed on the host: the step's `[rows, 3·hidden]` products
/// in, `[rows, hidden]` outputs written.
pub type HostAttention<'a> = dyn FnMut(&[f16], &mut [f16]) -> Result<()> + 'a;

/// One batch's KV cache: all on the GPU, or placed over the tiers.
#[derive(Debug)]
pub enum BatchCache {
    Gpu(GpuKvCache),
    Tiered(Box<TieredCache>),
}

impl BatchCache {
    /// Which positions hold real tokens (on the GPU).
    pub fn key_mask(&self) -> &KeyMask {
        match self {
            BatchCache::Gpu(c) => &c.key_mask,
            BatchCache::Tiered(c) => &c.key_mask,
        }
    }

    /// Positions stored in layer 0 (every layer, between steps).
    pub fn len(&self) -> usize {
        match self {
            BatchCache::Gpu(c) => c.layers.first().map_or(0, GpuLayerCache::len),
            BatchCache::Tiered(c) => c.len(0),
        }
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held per tier: GPU, host, disk.
    pub fn bytes(&self) -> (u64, u64, u64) {
        match self {
            BatchCache::Gpu(c) => (c.bytes(), 0, 0),
            BatchCache::Tiered(c) => c.bytes(),
        }
    }
}

/// An OPT model on one GPU: embeddings and the first layers resident, the
/// other layers (if any) streamed from host memory or disk through two GPU
/// slots ([`WeightStreamer`]).
#[derive(Debug)]
pub struct GpuModel {
    pub config: OptConfig,
    pub embeddings: GpuEmbeddings,
    /// The resident layers, `0..layers.len()` (all of them unless tiered).
    pub layers: Vec<GpuLayer>,
    /// Where parts of steps are timed, when profiling is on.
    pub profiler: Option<Profiler>,
    /// The layers past `layers.len()`, off the GPU.
    pub offload: Option<WeightStreamer>,
    /// With `--compress-weight`: the dequantizer, the shared f16 layer
    /// workspace and the dequantizations in flight (see [`super::packed`]).
    pub compressed: Option<Unpacker>,
    /// With the KV cache off the GPU: its tiers and GPU slots (see
    /// [`super::tiered_cache`]); `None`: every cache on the GPU.
    pub cache_streamer: Option<CacheStreamer>,
    /// With the activations in host memory or on disk ([`ActivationTier`]).
    pub activations: Option<ActivationTier>,
    /// Last, so that the buffers above are freed before its stream and
    /// handles go.
    pub gpu: Gpu,
}

impl GpuModel {
    /// Uploads the model's weights from `src` (every tensor's shape
    /// checked, as the CPU loader does).
    pub fn load(gpu: Gpu, config: OptConfig, src: &dyn WeightSource, pb: &ProgressBar) -> Result<Self> {
        config.validate()?;
        let spec = crate::spec::model_spec(&config, true)?;
        let embeddings = GpuEmbeddings::load(&gpu, &config, src, pb)?;
        let layers =
            (0..config.num_hidden_layers).map(|i| load_layer(&gpu, &spec, i, src, pb)).collect::<Result<Vec<_>>>()?;
        gpu.synchronize()?;
        Ok(GpuModel {
            gpu,
            config,
            embeddings,
            layers,
            profiler: None,
            offload: None,
            compressed: None,
            cache_streamer: None,
            activations: None,
        })
    }

    /// Seeded random weights made on the GPU (`--dummy`): seconds for
    /// billions of parameters, nothing through host memory.
    pub fn dummy(gpu: Gpu, config: OptConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let spec = crate::spec::model_spec(&config, true)?;
        let embeddings = GpuEmbeddings::dummy(&gpu, &config, seed)?;
        let layers =
            (0..config.num_hidden_layers).map(|i| dummy_layer(&gpu, &spec, i, seed)).collect::<Result<Vec<_>>>()?;
        gpu.synchronize()?;
        Ok(GpuModel {
            gpu,
            config,
            embeddings,
            layers,
            profiler: None,
            offload: None,
            compressed: None,
            cache_streamer: None,
            activations: None,
        })
    }

    /// A model whose layers `split.gpu_end..` live on `tiers` (host memory,
    /// then disk; see [`super::offload`]), each made on the GPU from
    /// `weights` (a checkpoint, or seeded) and moved to its tier one at a
    /// time, so the GPU never holds more than the resident part, the slots
    /// and one layer in passing.
    pub fn tiered(
        gpu: Gpu,
        config: OptConfig,
        split: LayerSplit,
        tiers: OffloadTiers,
        weights: WeightOrigin<'_>,
        pb: &ProgressBar,
    ) -> Result<Self> {
        Self::tiered_with(gpu, config, split, tiers, weights, pb, false)
    }

    /// [`GpuModel::tiered`], with every decoder layer's matrices quantized
    /// to 4 bits and held packed on its tier when `compress_weight` (see
    /// [`super::packed`]); a split with every layer on the GPU is the
    /// all-on-GPU model.
    pub fn tiered_with(
        gpu: Gpu,
        config: OptConfig,
        split: LayerSplit,
        tiers: OffloadTiers,
        weights: WeightOrigin<'_>,
        pb: &ProgressBar,
        compress_weight: bool,
    ) -> Result<Self> {
        let (src, seed) = match weights {
            WeightOrigin::Checkpoint(src) => (Some(src), 0),
            WeightOrigin::Seeded(seed) => (None, seed),
        };
        config.validate()?;
        if split.layers != config.num_hidden_layers
            || split.gpu_end > split.layers
            || !(0.0..=100.0).contains(&split.host_percent)
        {
            return Err(Error::Gpu(format!("a layer split {split:?} for {} layers", config.num_hidden_layers)));
        }
        let spec = crate::spec::model_spec(&config, true)?;
        let compressed = compress_weight.then(|| Unpacker::new(&gpu, &spec)).transpose()?;
        let ws = compressed.as_ref().map(Unpacker::workspace);
        let make = |gpu: &Gpu, i: usize| {
            crate::interrupt::check()?;
            let w = match src {
                Some(src) => load_layer(gpu, &spec, i, src, pb),
                None => dummy_layer(gpu, &spec, i, seed),
            }?;
            match ws {
                Some(ws) => Ok(w.compress(gpu, ws)?),
                None => Ok(w),
            }
        };
        let embeddings = match src {
            Some(src) => GpuEmbeddings::load(&gpu, &config, src, pb)?,
            None => GpuEmbeddings::dummy(&gpu, &config, seed)?,
        };
        let layers = (0..split.gpu_end).map(|i| make(&gpu, i)).collect::<Result<Vec<_>>>()?;
        let offload = if split.streams() {
            let mut streamer = WeightStreamer::new(&gpu, (&spec, dummy_init), split, tiers, ws)?;
            let threads = std::thread::available_parallelism().map_or(4, |n| n.get().min(8));
            let t = std::time::Instant::now();
            streamer.allocate_homes(threads)?;
            streamer.startup.homes_s = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            for i in split.gpu_end..split.layers {
                let layer = make(&gpu, i)?;
                streamer.park(&gpu, i, layer)?;
            }
            streamer.startup.park_s = t.elapsed().as_secs_f64();
            Some(streamer)
        } else {
            None
        };
        gpu.synchronize()?;
        Ok(GpuModel {
            gpu,
            config,
            embeddings,
            layers,
            profiler: None,
            offload,
            compressed,
            cache_streamer: None,
            activations: None,
        })
    }

    /// Decoder layers (resident and streamed).
    pub fn num_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    /// Before layer `j`'s compute is enqueued: its weights in a GPU slot.
    /// Compressed: its packed matrices dequantized into the f16 workspace
    /// (enqueued on the compute stream, after the previous layer's compute).
    pub fn begin_layer(&self, j: usize) -> Result<()> {
        if let Some(s) = &self.offload {
            s.begin_layer(j)?;
            // The host waited for the layer's copies; the stream idled
            // meanwhile: profiled as its own part, not the next kernel's.
            self.mark("wait for weights")?;
        }
        if let Some(c) = &self.compressed {
            // The previous layer's dequantizations are waited for (the host
            // stays at most a layer ahead), this one's enqueued.
            c.before(&self.gpu, self.weights(j)?)?;
        }
        Ok(())
    }

    /// After layer `j`'s compute is enqueued for every batch: the next
    /// streamed layer starts copying.
    pub fn end_layer(&self, j: usize) -> Result<()> {
        match &self.offload {
            Some(s) => Ok(s.end_layer(&self.gpu, j)?),
            None => Ok(()),
        }
    }

    /// The most each tier held so far: the GPU (the engine's buffers), page-
    /// locked host memory (weights or cache homes, and the GPU tier's
    /// staging ring), pageable host memory, disk; over every tier the
    /// weights and the cache use.
    pub fn tier_peaks(&self) -> crate::memory::TierPeaks {
        use std::sync::Arc;
        use tier_api::Device;
        let w = self.offload.as_ref().map(|s| s.tiers().clone());
        let c = self.cache_streamer.as_ref().map(|c| c.tiers().clone());
        let mut hosts: Vec<Arc<tier_host::HostDevice>> = Vec::new();
        let mut disks: Vec<Arc<tier_disk::DiskDevice>> = Vec::new();
        // The weights, the cache and the activations share the run's tiers:
        // each device counted once.
        let host_candidates = [
            w.as_ref().and_then(|t| t.host.clone()),
            c.as_ref().and_then(|t| t.host.clone()),
            self.activations.as_ref().and_then(|a| a.host.clone()),
        ];
        for h in host_candidates.into_iter().flatten() {
            if !hosts.iter().any(|x| Arc::ptr_eq(x, &h)) {
                hosts.push(h);
            }
        }
        let disk_candidates = [
            w.as_ref().and_then(|t| t.disk.clone()),
            c.as_ref().and_then(|t| t.disk.clone()),
            self.activations.as_ref().and_then(|a| a.disk.clone()),
        ];
        for d in disk_candidates.into_iter().flatten() {
            if !disks.iter().any(|x| Arc::ptr_eq(x, &d)) {
                disks.push(d);
            }
        }
        let mut peaks = crate::memory::TierPeaks {
            gpu: self.gpu.held_bytes().1,
            pinned: self.gpu.device().staging_stats().map_or(0, |s| s.peak_resident),
            ..Default::default()
        };
        for h in &hosts {
            let bytes = h.stats().peak_resident;
            if h.mem_kind().is_page_locked() {
                peaks.pinned += bytes;
            } else {
                peaks.pageable += bytes;
            }
        }
        peaks.disk = disks.iter().map(|d| d.stats().peak_resident).sum();
        peaks
    }

    /// Bytes of weights on the GPU (resident ones; the streaming slots are
    /// counted by [`GpuModel::slot_bytes`]).
    pub fn weight_bytes(&self) -> u64 {
        self.embeddings.bytes() + self.layers.iter().map(GpuLayer::bytes).sum::<u64>()
    }

    /// Bytes of the streaming slots on the GPU (0 when nothing streams).
    pub fn slot_bytes(&self) -> u64 {
        self.offload.as_ref().map_or(0, |s| s.slot_count() as u64 * s.slot_bytes())
    }

    /// Bytes of the f16 layer workspace compressed weights are dequantized
    /// into (0 unless `--compress-weight`).
    pub fn workspace_bytes(&self) -> u64 {
        self.compressed.as_ref().map_or(0, |c| c.workspace().bytes())
    }

    /// Puts every batch's KV cache made from now on where `plan` says
    /// (GPU, host, disk; see [`super::tiered_cache`]). A plan with the whole
    /// cache on the GPU keeps the resident cache.
    pub fn place_cache(&mut self, plan: CachePlan, tiers: CacheTiers) -> Result<()> {
        plan.validate()?;
        // A 4-bit cache goes through the slots wherever it lives.
        self.cache_streamer = if plan.gpu_percent >= 100.0 && !plan.cpu_compute && !plan.compress {
            None
        } else {
            Some(CacheStreamer::new(&self.gpu, plan, tiers, &self.config)?)
        };
        Ok(())
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions,
    /// on the GPU or where [`GpuModel::place_cache`] said.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<BatchCache> {
        Ok(match &self.cache_streamer {
            None => BatchCache::Gpu(GpuKvCache::new(&self.gpu, &self.config, batch, capacity)?),
            Some(s) => BatchCache::Tiered(Box::new(s.new_cache(&self.gpu, &self.config, batch, capacity)?)),
        })
    }

    /// After a step's layers: the tiered cache's slots stored.
    pub fn end_step(&self) -> Result<()> {
        match &self.cache_streamer {
            Some(s) => s.flush(),
            None => Ok(()),
        }
    }

    /// Marks the end of `part` on the stream when profiling.
    pub fn mark(&self, part: &'static str) -> Result<()> {
        match &self.profiler {
            Some(p) => Ok(p.mark(&self.gpu, part)?),
            None => Ok(()),
        }
    }

    /// The f16 input of a block: the layer-normed states (pre-LN, into the
    /// workspace) or the states themselves (post-LN).
    fn block_input<'a>(
        &self,
        act: &'a GpuHidden,
        ws: &'a Workspace,
        rows: usize,
        norm: NormParams<'_>,
    ) -> Result<&'a DevBuf<f16>> {
        let h = self.config.hidden_size;
        if self.config.do_layer_norm_before {
            let x = Mat::new(&act.hidden, rows, h)?;
            self.gpu.kernels.layer_norm(&self.gpu, x, LN_EPS, norm, MatMut::new(&ws.x16, rows, h)?, None)?;
            Ok(&ws.x16)
        } else {
            act.hidden16.as_ref().ok_or_else(|| Error::Gpu("post-LN hidden states without their f16 copy".into()))
        }
    }

    /// After a post-LN block: the norm in place on the f32 states, and
    /// their f16 copy for the next block.
    fn post_norm(&self, act: &GpuHidden, rows: usize, norm: NormParams<'_>) -> Result<()> {
        if self.config.do_layer_norm_before {
            return Ok(());
        }
        let out = act.hidden16.as_ref().ok_or_else(|| Error::Gpu("post-LN hidden states without f16 copy".into()))?;
        let h = self.config.hidden_size;
        // In place on the f32 states, and into their f16 copy.
        let (x, x32) = (Mat::new(&act.hidden, rows, h)?, MatMut::new(&act.hidden, rows, h)?);
        Ok(self.gpu.kernels.layer_norm(&self.gpu, x, LN_EPS, norm, MatMut::new(out, rows, h)?, Some(x32))?)
    }

    /// Hidden states of this step's tokens (`[batch × new_len]`, left
    /// padded, `step_mask` 1 for real tokens): token embedding (through
    /// `project_in`) plus position embedding, the positions counted from
    /// the mask (`past_real[b]` real tokens came before in sequence `b`).
    /// Also records the mask in the key mask at `step.past`.
    pub fn embed(
        &self,
        act: &GpuHidden,
        ws: &mut Workspace,
        tokens: &[u32],
        step_mask: &[u8],
        past_real: &[i32],
        step: &GpuStep<'_>,
    ) -> Result<()> {
        ws.check(step)?;
        let (rows, h, e) = (step.rows(), self.config.hidden_size, self.config.word_embed_proj_dim());
        if tokens.len() != rows || step_mask.len() != rows || past_real.len() != step.batch {
            return Err(Error::Gpu("embed: tokens, mask and positions disagree with the step".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(Error::TokenOutOfRange { index: 0, id: bad, vocab: self.config.vocab_size });
        }
        let max_pos = past_real.iter().map(|&p| p.max(0) as usize).max().unwrap_or(0) + step.new_len;
        if max_pos > self.config.max_position_embeddings {
            return Err(Error::Gpu(format!("embed: position {max_pos} is past the model's positions")));
        }
        let stream = self.gpu.stream();
        ws.tokens.upload(stream, 0, tokens)?;
        ws.step_mask.upload(stream, 0, step_mask)?;
        ws.past_real.upload(stream, 0, past_real)?;
        let emb = &self.embeddings;
        let add_tokens = match &emb.project_in {
            Some(project_in) => {
                self.gpu.kernels.gather_tokens(&self.gpu, &ws.tokens, rows, &emb.embed_tokens, e, &ws.x16)?;
                let out = LinearOut::F32 { out: MatMut::new(&act.hidden, rows, h)?, bias: None };
                let (x, w) = (Mat::new(&ws.x16, rows, e)?, Mat::new(project_in, h, e)?);
                self.gpu.blas.linear(&self.gpu, x, w, out, false, false)?;
                false
            }
            None => true,
        };
        let hidden16 = act.hidden16.as_ref().unwrap_or(&ws.x16);
        let tokens = StepTokens {
            tokens: &ws.tokens,
            step_mask: &ws.step_mask,
            past_real: &ws.past_real,
            batch: step.batch,
            new_len: step.new_len,
        };
        let tables = EmbedTables {
            tokens: if add_tokens { Some(Mat::by_rows(&emb.embed_tokens, h)?) } else { None },
            positions: Mat::by_rows(&emb.embed_positions, h)?,
            lookup: OPT_POSITIONS,
        };
        let out = (MatMut::new(&act.hidden, rows, h)?, MatMut::new(hidden16, rows, h)?);
        let key_mask = MatMut::new(&step.key_mask.mask, step.batch, step.key_mask.stride)?;
        self.gpu.kernels.embed(&self.gpu, &tokens, &tables, out, (key_mask, step.past))?;
        self.mark("embed")
    }

    /// The attention block of layer `layer` with its residual (and layer
    /// norm), in place on `act`. Appends this step's keys and values to
    /// `cache`.
    pub fn attention_block(
        &self,
        layer: usize,
        cache: &mut GpuLayerCache,
        act: &GpuHidden,
        ws: &mut Workspace,
        step: &GpuStep<'_>,
    ) -> Result<()> {
        ws.check(step)?;
        let w = self.opt_layer(layer)?;
        let c = &self.config;
        let (rows, heads, hd) = (step.rows(), c.num_attention_heads, c.head_dim());
        if cache.len() != step.past || cache.batch != step.batch {
            return Err(Error::Gpu(format!(
                "layer {layer}: the cache holds {} positions of {} sequences, the step expects {} of {}",
                cache.len(),
                cache.batch,
                step.past,
                step.batch
            )));
        }
        self.qkv_product(&w, act, ws, rows)?;
        let gpu = &self.gpu;
        let qkv = Mat::new(&ws.qkv, rows, 3 * c.hidden_size)?;
        let shape = KvShape { heads, kv_heads: heads, head_dim: hd };
        let kv = KvView::new((&cache.keys, &cache.values), step.batch, cache.capacity, shape)?;
        gpu.kernels.store_kv(gpu, qkv, &kv, step.past..step.past + step.new_len)?;
        cache.advance(step.new_len)?;
        self.mark("store kv")?;
        self.attention(cache, ws, step)?;
        self.mark("attention")?;
        self.attention_output(&w, act, ws, rows)
    }

    /// The block's input (layer-normed for pre-LN models) through the
    /// stacked q, k, v product into `ws.qkv`.
    fn qkv_product(&self, w: &OptLayer<'_>, act: &GpuHidden, ws: &Workspace, rows: usize) -> Result<()> {
        let h = self.config.hidden_size;
        let input = self.block_input(act, ws, rows, w.self_attn_layer_norm)?;
        self.mark("layer norm")?;
        let qkv = LinearOut::F16 { out: MatMut::new(&ws.qkv, rows, 3 * h)?, bias: w.qkv_bias };
        let (x, weight) = (Mat::new(input, rows, h)?, Mat::new(w.qkv, 3 * h, h)?);
        self.gpu.blas.linear(&self.gpu, x, weight, qkv, false, false)?;
        self.mark("qkv product")
    }

    /// The attention's output (`ws.attn`) through the output product, added
    /// to the residual stream, then the norm of post-LN models.
    fn attention_output(&self, w: &OptLayer<'_>, act: &GpuHidden, ws: &Workspace, rows: usize) -> Result<()> {
        let h = self.config.hidden_size;
        let out = LinearOut::F32 { out: MatMut::new(&act.hidden, rows, h)?, bias: w.out_proj_bias };
        let (x, weight) = (Mat::new(&ws.attn, rows, h)?, Mat::new(w.out_proj, h, h)?);
        self.gpu.blas.linear(&self.gpu, x, weight, out, false, true)?;
        self.mark("out product")?;
        self.post_norm(act, rows, w.self_attn_layer_norm)?;
        self.mark("layer norm")
    }

    /// The attention block of layer `layer` with the attention computed by
    /// `attend` on the host: the step's `[rows, 3·hidden]` products come to
    /// the host, `attend` writes `[rows, hidden]` outputs (and keeps the
    /// keys and values itself), which go back for the output product, the
    /// residual and the norm.
    pub fn attention_block_with(
        &self,
        layer: usize,
        act: &GpuHidden,
        ws: &mut Workspace,
        step: &GpuStep<'_>,
        attend: &mut HostAttention<'_>,
    ) -> Result<()> {
        ws.check(step)?;
        let w = self.opt_layer(layer)?;
        let (rows, h) = (step.rows(), self.config.hidden_size);
        self.qkv_product(&w, act, ws, rows)?;
        let host_qkv = ws.qkv.download_range(self.gpu.stream(), 0, rows * 3 * h)?;
        let mut out = vec![f16::ZERO; rows * h];
        attend(&host_qkv, &mut out)?;
        ws.attn.upload(self.gpu.stream(), 0, &out)?;
        self.mark("attention (host)")?;
        self.attention_output(&w, act, ws, rows)
    }

    /// Attention of this step's queries (in `ws.qkv`) over the cache
    /// (this step's keys included) into `ws.attn`.
    fn attention(&self, cache: &GpuLayerCache, ws: &mut Workspace, step: &GpuStep<'_>) -> Result<()> {
        let c = &self.config;
        let (h, heads, hd) = (c.hidden_size, c.num_attention_heads, c.head_dim());
        let (s_n, total, cap) = (step.new_len, cache.len(), cache.capacity);
        let scale = (hd as f32).powf(-0.5);
        let gpu = &self.gpu;
        let mask = step.mask()?;
        let shape = KvShape { heads, kv_heads: heads, head_dim: hd };
        let kv = KvView::new((&cache.keys, &cache.values), step.batch, cap, shape)?;
        if s_n == 1 && decode_kernel_fits(hd) && (total + (256 / (hd / 8)) * hd) * 4 <= 48 * 1024 {
            let (qkv, out) = (Mat::new(&ws.qkv, step.batch, 3 * h)?, MatMut::new(&ws.attn, step.batch, h)?);
            return Ok(gpu.kernels.attn_decode(gpu, qkv, &kv, &DecodeAttn { mask, total, scale }, out)?);
        }
        // Prefill (or any step), a chunk of sequences at a time: the queries
        // by head; scores = Q·Kᵀ by cuBLAS (f32 accumulation, stored f16 as
        // transformers does in f16); masked softmax in place (in f32); P·V
        // by cuBLAS over the chunk's queries (no longer needed); the output
        // back to rows. One batched product each for all sequences × heads
        // of a chunk.
        let per_seq = heads * s_n * total;
        let chunk = (ws.score_budget / (2 * per_seq.max(1))).clamp(1, step.batch.max(1));
        ws.ensure_scores(gpu, chunk * per_seq)?;
        let ws = &*ws;
        let scores = ws.scores.as_ref().ok_or_else(|| Error::Gpu("GPU score buffer missing".into()))?;
        let dims = (step.batch, s_n, heads, hd);
        let rows = step.rows();
        // The queries: the first `h` values of each qkv row.
        gpu.kernels.to_heads(gpu, Mat::strided(&ws.qkv, 0, rows, h, 3 * h)?, &ws.heads, dims)?;
        let head_block = cap * hd;
        for b0 in (0..step.batch).step_by(chunk) {
            let nb = chunk.min(step.batch - b0);
            let n = nb * heads;
            let keys = Operand::new(&cache.keys, b0 * heads * head_block, hd, head_block);
            let queries = Operand::new(&ws.heads, b0 * heads * s_n * hd, hd, s_n * hd);
            let out = BatchedOut::F16(Operand::new(scores, 0, total, s_n * total));
            gpu.blas.gemm_batched(Gemm::new((total, s_n, hd), n).transpose_a().scaled(scale), keys, queries, out)?;
            let at = ScoreRows { seqs: nb, heads, new_len: s_n, past: step.past, first: b0 };
            gpu.kernels.softmax_rows(gpu, MatMut::new(scores, n * s_n, total)?, at, mask)?;
            let values = Operand::new(&cache.values, b0 * heads * head_block, hd, head_block);
            let probs = Operand::new(scores, 0, total, s_n * total);
            let out = BatchedOut::F16(Operand::new(&ws.heads, b0 * heads * s_n * hd, hd, s_n * hd));
            gpu.blas.gemm_batched(Gemm::new((hd, s_n, total), n), values, probs, out)?;
        }
        Ok(gpu.kernels.from_heads(gpu, &ws.heads, MatMut::new(&ws.attn, rows, h)?, dims)?)
    }

    /// The MLP block of layer `layer` with its residual (and layer norm),
    /// in place on `act`.
    pub fn mlp_block(&self, layer: usize, act: &GpuHidden, ws: &mut Workspace, step: &GpuStep<'_>) -> Result<()> {
        ws.check(step)?;
        if let Some(s) = &self.offload {
            s.begin_mlp(layer)?;
            self.mark("wait for weights")?;
        }
        let w = self.opt_layer(layer)?;
        let (rows, h, f) = (step.rows(), self.config.hidden_size, self.config.ffn_dim);
        let input = self.block_input(act, ws, rows, w.final_layer_norm)?;
        self.mark("layer norm")?;
        let gpu = &self.gpu;
        let fc1 = LinearOut::F16 { out: MatMut::new(&ws.ffn, rows, f)?, bias: w.fc1_bias };
        gpu.blas.linear(gpu, Mat::new(input, rows, h)?, Mat::new(w.fc1, f, h)?, fc1, true, false)?;
        self.mark("fc1 product")?;
        let fc2 = LinearOut::F32 { out: MatMut::new(&act.hidden, rows, h)?, bias: w.fc2_bias };
        gpu.blas.linear(gpu, Mat::new(&ws.ffn, rows, f)?, Mat::new(w.fc2, h, f)?, fc2, false, true)?;
        self.mark("fc2 product")?;
        self.post_norm(act, rows, w.final_layer_norm)?;
        self.mark("layer norm")
    }

    /// Layer `layer`: the attention block, then the MLP block.
    pub fn layer_forward(
        &self,
        layer: usize,
        cache: &mut GpuLayerCache,
        act: &GpuHidden,
        ws: &mut Workspace,
        step: &GpuStep<'_>,
    ) -> Result<()> {
        self.attention_block(layer, cache, act, ws, step)?;
        self.mlp_block(layer, act, ws, step)
    }

    /// Layer `layer`'s OPT tensors, looked up in its [`GpuLayer`].
    fn opt_layer(&self, layer: usize) -> Result<OptLayer<'_>> {
        OptLayer::of(self.weights(layer)?, &self.config)
    }

    fn weights(&self, layer: usize) -> Result<&GpuLayer> {
        if let Some(w) = self.layers.get(layer) {
            return Ok(w);
        }
        match &self.offload {
            Some(s) if layer < self.config.num_hidden_layers => Ok(s.weights(layer)?),
            _ => Err(Error::Gpu(format!("layer {layer} does not exist"))),
        }
    }

    /// Logits of the last position of each sequence into `ws.logits`
    /// (`[batch, vocab]`, f32): final layer norm (pre-LN models),
    /// `project_out`, then the tied embedding.
    pub fn logits(&self, act: &GpuHidden, ws: &mut Workspace, batch: usize, new_len: usize) -> Result<()> {
        let c = &self.config;
        let (h, e, v) = (c.hidden_size, c.word_embed_proj_dim(), c.vocab_size);
        if batch > ws.batch {
            return Err(Error::Gpu(format!("logits: {batch} sequences, the workspace holds {}", ws.batch)));
        }
        let gpu = &self.gpu;
        gpu.kernels.gather_last(gpu, &act.hidden, (batch, new_len, h), &ws.last32, &ws.last16)?;
        let (last32, last16) = (Mat::new(&ws.last32, batch, h)?, MatMut::new(&ws.last16, batch, h)?);
        if let Some(norm) = &self.embeddings.final_layer_norm {
            gpu.kernels.layer_norm(gpu, last32, LN_EPS, Some((&norm.weight, &norm.bias)), last16, None)?;
        } else if self.config.has_final_layer_norm() {
            // A final norm without affine parameters.
            gpu.kernels.layer_norm(gpu, last32, LN_EPS, None, last16, None)?;
        }
        let x = match &self.embeddings.project_out {
            Some(p) => {
                let out = LinearOut::F16 { out: MatMut::new(&ws.proj16, batch, e)?, bias: None };
                gpu.blas.linear(gpu, last16.as_mat(), Mat::new(p, e, h)?, out, false, false)?;
                &ws.proj16
            }
            None => &ws.last16,
        };
        let out = LinearOut::F32 { out: MatMut::new(&ws.logits, batch, v)?, bias: None };
        let table = Mat::new(&self.embeddings.embed_tokens, v, e)?;
        gpu.blas.linear(gpu, Mat::new(x, batch, e)?, table, out, false, false)?;
        self.mark("logits")
    }

    /// The greedy pick of each row of `ws.logits` (the first maximum, as the
    /// CPU sampler), copied to the host.
    pub fn argmax(&self, ws: &Workspace, batch: usize) -> Result<Vec<u32>> {
        let v = self.config.vocab_size;
        self.gpu.kernels.argmax_rows(&self.gpu, &ws.logits, batch, v, &ws.picked)?;
        self.mark("argmax")?;
        Ok(ws.picked.download_range(self.gpu.stream(), 0, batch)?)
    }

    /// `ws.logits`' first `batch` rows copied to the host.
    pub fn logits_to_host(&self, ws: &Workspace, batch: usize) -> Result<Vec<f32>> {
        Ok(ws.logits.download_range(self.gpu.stream(), 0, batch * self.config.vocab_size)?)
    }
}
