//! The family on one GPU, computing in the checkpoint's 16-bit type (`T`:
//! bf16 or f16) with f32 accumulation and an f32 residual stream, over the
//! op layer's GPU products and kernels (`ops::gpu`).
//!
//! The decoder layers' weights are the runtime's [`GpuLayer`]s, read from
//! the layer spec: the first `split.gpu_end` resident, the others streamed
//! from host memory or disk through GPU slots by the runtime's
//! [`WeightStreamer`]. Each batch's KV cache is in `T`,
//! `[batch][kv_head][position][head_dim]` per layer: resident on the GPU,
//! or placed by the runtime's tiered cache ([`CacheStreamer`],
//! [`LlamaGpu::place_cache`]) as the policy's cache shares say — split in
//! whole sequences over GPU, host memory and disk and loaded into two GPU
//! slots a layer at a time, 4-bit on one tier with `--compress-cache`, or
//! with `--cpu-cache-compute` in host memory, where decoding attends on the
//! CPU in place ([`crate::cpu_attention`]; FlexGen's CPU attention: the
//! step's q, k and v come to the host, the attention's output goes back).
//! The hidden states (the f32 residual stream) stay on the GPU, or with
//! the policy's activation shares `0 100` (host memory) or `0 0` (disk)
//! live there between layers ([`LlamaGpu::place_activations`]): each
//! batch's rows loaded into one of the block's two GPU buffers before each
//! use and stored back beside the next batch's compute by the runtime's
//! [`ActivationStreamer`]. [`LlamaGpuCompute`] is the GPU as the runtime's
//! [`ComputeDevice`], driven by its block schedule.
//!
//! A layer, as Hugging Face computes it: RMSNorm, the q/k/v products (Qwen2:
//! with biases), Qwen3's per-head q/k RMSNorm, the rotary embedding of q and
//! k at each row's position (counted from the sequence's first real token),
//! the keys and values into the cache, grouped-query attention over the
//! cache (a kernel for one new token; batched products and a causal masked
//! softmax for a prompt), the output product added to the residual; then
//! RMSNorm, SiLU(gate)·up and the down product added to the residual.

use std::any::Any;
use std::collections::BTreeMap;

use half::{bf16, f16};
use indicatif::ProgressBar;
use ops::gpu::blas::{HalfOut, Operand};
use ops::gpu::buffer::{DevBuf, Half};
use ops::gpu::llm::attn_decode_fits;
use ops::gpu::profile::Profiler;
use ops::gpu::view::{DecodeAttn, Gemm, KvShape, KvView, Mat, MatMut, Rotary, ScoreRows};
use ops::gpu::Gpu;
use runtime::gpu::activations::{ActPart, ActivationHome, ActivationStreamer, ActivationTier, Use};
use runtime::gpu::cache::{CachePlan, CacheShape, CacheStreamer, CacheTiers, HostLayer, LayerRun, TieredCache};
use runtime::gpu::layer::{GpuLayer, Init};
use runtime::gpu::packed::Unpacker;
use runtime::gpu::stream::{LayerSplit, OffloadTiers, WeightStreamer};
use runtime::sampling::Sampler;
use runtime::schedule::{BatchTokens, ComputeDevice, GenerateOptions, GenerationOutput};
use runtime::spec::{ModelSpec, TensorSpec};
use tier_api::DType;

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use checkpoint::Checkpoint;

fn gpu_err(message: String) -> Error {
    Error::Op(ops::Error::Gpu(message))
}

/// The value rule of seeded (`--dummy`) tensors: matrices uniform in
/// ±1/√(columns) (as the CPU's dummy model), norm weights 1, biases small.
pub fn dummy_init(t: &TensorSpec) -> Init {
    match t.shape[..] {
        [_, k] => Init::Uniform(1.0 / (k.max(1) as f32).sqrt()),
        _ if t.name.contains("norm") => Init::Constant(1.0),
        _ => Init::Uniform(0.02),
    }
}

/// Refuses a checkpoint tensor holding NaN or infinity (see
/// [`crate::finite`]), from its stored bytes.
fn check_finite(ck: &Checkpoint, name: &str) -> Result<()> {
    let dtype = match ck.dtype(name) {
        Some(checkpoint::Dtype::F16) => ops::DType::F16,
        Some(checkpoint::Dtype::BF16) => ops::DType::BF16,
        Some(checkpoint::Dtype::F32) => ops::DType::F32,
        // Other types were refused when the checkpoint was checked.
        _ => return Ok(()),
    };
    crate::finite::check_weights(&crate::model::file_of(ck, name), name, dtype, ck.bytes(name)?)
}

/// A checkpoint tensor's values as `T`.
fn values<T: Half>(ck: &Checkpoint, name: &str, shape: &[usize]) -> Result<Vec<T>> {
    check_finite(ck, name)?;
    let any: Box<dyn Any> = match T::DTYPE {
        DType::BF16 => Box::new(ck.to_bf16(name, shape)?),
        _ => Box::new(ck.to_f16(name, shape)?),
    };
    any.downcast::<Vec<T>>().map(|b| *b).map_err(|_| gpu_err(format!("{name}: no conversion to {}", T::SUFFIX)))
}

/// Layer `i` on the GPU: from the checkpoint, or seeded.
fn make_layer<T: Half>(gpu: &Gpu, spec: &ModelSpec, i: usize, ck: Option<&Checkpoint>, seed: u64) -> Result<GpuLayer> {
    runtime::interrupt::check()?;
    let Some(ck) = ck else {
        return Ok(GpuLayer::dummy(gpu, spec, i, seed, dummy_init)?);
    };
    let fail =
        |name: &str, e: &dyn std::fmt::Display| runtime::Error::Op(ops::Error::Gpu(format!("loading {name}: {e}")));
    let layer = match T::DTYPE {
        DType::BF16 => GpuLayer::load_bf16(gpu, spec, i, &mut |name, shape| {
            check_finite(ck, name).map_err(|e| fail(name, &e))?;
            ck.to_bf16(name, shape).map_err(|e| fail(name, &e))
        })?,
        _ => GpuLayer::load(gpu, spec, i, &mut |name, shape| {
            check_finite(ck, name).map_err(|e| fail(name, &e))?;
            ck.to_f16(name, shape).map_err(|e| fail(name, &e))
        })?,
    };
    Ok(layer)
}

/// A whole tensor outside the layers, on the GPU.
fn outside<T: Half>(gpu: &Gpu, t: &TensorSpec, ck: Option<&Checkpoint>, seed: u64) -> Result<DevBuf<T>> {
    let n = t
        .elements()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| gpu_err(format!("{}: shape {:?} overflows", t.name, t.shape)))?;
    match ck {
        Some(ck) => Ok(DevBuf::from_host(gpu, &values::<T>(ck, &t.name, &t.shape)?)?),
        None => {
            let buf = DevBuf::alloc(gpu, n)?;
            let llm = gpu.llm()?;
            match dummy_init(t) {
                Init::Constant(v) => llm.fill(gpu, &buf, v)?,
                Init::Uniform(s) => llm.fill_uniform(gpu, &buf, runtime::gpu::layer::name_seed(seed, &t.name), s)?,
            }
            Ok(buf)
        }
    }
}

/// A Llama-family model on one GPU (see the module's documentation).
pub struct LlamaGpu<T: Half> {
    config: LlamaConfig,
    spec: ModelSpec,
    embed: DevBuf<T>,
    norm: DevBuf<T>,
    /// `None`: tied to the embeddings.
    lm_head: Option<DevBuf<T>>,
    /// The rotary embedding's frequencies, `head_dim / 2` of them.
    inv_freq: DevBuf<f32>,
    /// Layers `0..layers.len()`, resident.
    layers: Vec<GpuLayer>,
    /// The other layers, off the GPU.
    offload: Option<WeightStreamer>,
    /// The KV cache off the GPU, 4-bit, or attended on the CPU (see
    /// [`LlamaGpu::place_cache`]); `None`: each batch's cache resident on
    /// the GPU.
    cache: Option<CacheStreamer<T>>,
    /// `--compress-weight`: the workspace the 4-bit layers unpack into.
    unpacker: Option<Unpacker>,
    /// The hidden states off the GPU (see [`LlamaGpu::place_activations`]);
    /// `None`: each batch's on the GPU.
    activations: Option<ActivationTier>,
    /// `TIERLM_GPU_PROFILE`: an event after every part of a step.
    profiler: Option<Profiler>,
    /// Last, so that the buffers above go before its stream and handles.
    gpu: Gpu,
}

impl<T: Half> std::fmt::Debug for LlamaGpu<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaGpu")
            .field("dtype", &T::SUFFIX)
            .field("resident", &self.layers.len())
            .field("layers", &self.config.num_hidden_layers)
            .finish_non_exhaustive()
    }
}

/// A tiered cache's figures ([`LlamaGpu::cache_stats`]).
#[derive(Debug, Clone)]
pub struct CacheStats {
    pub plan: CachePlan,
    pub tiers: CacheTiers,
    /// Bytes of the two GPU slots.
    pub slot_bytes: u64,
    /// Bytes of the 4-bit cache's GPU scratch.
    pub scratch_bytes: u64,
    /// Bytes loaded into and stored from the slots so far.
    pub bytes_moved: u64,
}

/// What the GPU engine does not do yet, said before anything is allocated.
pub fn check_supported(config: &LlamaConfig) -> Result<()> {
    let mut missing = Vec::new();
    if config.o_bias {
        missing.push("an o_proj bias (attention_bias on the output projection)");
    }
    if config.mlp_bias {
        missing.push("MLP biases (mlp_bias)");
    }
    if !missing.is_empty() {
        return Err(gpu_err(format!(
            "the GPU engine does not compute {} yet; run this model on the CPU engine (--percent 0 100 0 100 0 100)",
            missing.join(" or ")
        )));
    }
    Ok(())
}

impl<T: Half> LlamaGpu<T> {
    /// The model on `gpu`: weights from `ck` (checked against the spec
    /// beforehand) or seeded (`ck` `None`); layers `split.gpu_end..` made on
    /// the GPU one at a time and parked on `tiers`.
    pub fn new(
        gpu: Gpu,
        mut config: LlamaConfig,
        split: LayerSplit,
        tiers: Option<OffloadTiers>,
        (ck, seed): (Option<&Checkpoint>, u64),
        compress_weight: bool,
    ) -> Result<Self> {
        check_supported(&config)?;
        config.dtype = Some(match T::DTYPE {
            DType::BF16 => ops::DType::BF16,
            _ => ops::DType::F16,
        });
        if split.layers != config.num_hidden_layers || split.gpu_end > split.layers {
            return Err(gpu_err(format!("a layer split {split:?} for {} layers", config.num_hidden_layers)));
        }
        let spec = crate::spec::model_spec(&config)?;
        let rope = ops::Rope::new(config.rope_theta, config.head_dim, config.rope_scaling)?;
        let inv_freq = DevBuf::from_host(&gpu, rope.inv_freq())?;
        let find = |name: &str| spec.outside.iter().find(|t| t.name == name);
        let need = |name: &str| find(name).ok_or_else(|| gpu_err(format!("the spec has no {name}")));
        let embed = outside::<T>(&gpu, need("model.embed_tokens.weight")?, ck, seed)?;
        let norm = outside::<T>(&gpu, need("model.norm.weight")?, ck, seed)?;
        let lm_head = find("lm_head.weight").map(|t| outside::<T>(&gpu, t, ck, seed)).transpose()?;
        // --compress-weight: every layer's matrices held 4-bit (resident,
        // parked and in the streaming slots), unpacked before it computes.
        let unpacker = compress_weight.then(|| Unpacker::new(&gpu, &spec)).transpose()?;
        let ws = unpacker.as_ref().map(Unpacker::workspace);
        let make = |i: usize| -> Result<GpuLayer> {
            let w = make_layer::<T>(&gpu, &spec, i, ck, seed)?;
            match ws {
                Some(ws) => Ok(w.compress(&gpu, ws)?),
                None => Ok(w),
            }
        };
        let layers = (0..split.gpu_end).map(make).collect::<Result<Vec<_>>>()?;
        let offload = if split.streams() {
            let tiers = tiers.ok_or_else(|| gpu_err("layers off the GPU, but no tiers for them".into()))?;
            let mut streamer = WeightStreamer::new(&gpu, (&spec, dummy_init), split, tiers, ws)?;
            let threads = std::thread::available_parallelism().map_or(4, |n| n.get().min(8));
            streamer.allocate_homes(threads)?;
            for i in split.gpu_end..split.layers {
                streamer.park(&gpu, i, make(i)?)?;
            }
            Some(streamer)
        } else {
            None
        };
        gpu.synchronize()?;
        Ok(LlamaGpu {
            config,
            spec,
            embed,
            norm,
            lm_head,
            inv_freq,
            layers,
            offload,
            cache: None,
            unpacker,
            activations: None,
            profiler: None,
            gpu,
        })
    }

    /// With `sep`, a streamed layer's MLP weights are waited for only
    /// before its MLP block (FlexGen's `--sep-layer`).
    pub fn set_sep_layer(&mut self, sep: bool) {
        if let Some(s) = &mut self.offload {
            s.set_sep_layer(sep);
        }
    }

    /// With `on`, every part of a step records an event on the stream (the
    /// profile [`LlamaGpu::take_profile`] reads); off, none.
    pub fn set_profile(&mut self, on: bool) {
        self.profiler = on.then(Profiler::default);
    }

    /// Milliseconds per (phase, part) since profiling began or the last
    /// call, after waiting for the stream; empty when not profiling.
    pub fn take_profile(&self) -> Result<BTreeMap<(&'static str, &'static str), f64>> {
        match &self.profiler {
            Some(p) => Ok(p.take(&self.gpu)?),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Marks the end of `part` on the stream when profiling.
    fn mark(&self, part: &'static str) -> Result<()> {
        match &self.profiler {
            Some(p) => Ok(p.mark(&self.gpu, part)?),
            None => Ok(()),
        }
    }

    /// Starts a profile phase when profiling.
    fn phase(&self, phase: &'static str) -> Result<()> {
        match &self.profiler {
            Some(p) => Ok(p.phase(&self.gpu, phase)?),
            None => Ok(()),
        }
    }

    /// Places every batch's KV cache made from now on as `plan` says, on
    /// `tiers` (the run's, [`CacheTiers::for_plan`]): split in whole
    /// sequences over GPU, host memory and disk and streamed through two
    /// GPU slots, 4-bit on one tier (`--compress-cache`), or in host memory
    /// with the decode attention on the CPU (`--cpu-cache-compute`, with
    /// `--attn-sparsity`). A plan with the whole plain cache on the GPU
    /// keeps the resident cache. Refused, saying what would run, where the
    /// plan cannot run (see [`CachePlan::validate`]).
    pub fn place_cache(&mut self, plan: CachePlan, tiers: CacheTiers) -> Result<()> {
        plan.validate()?;
        self.cache = if plan.through_slots() {
            Some(CacheStreamer::new(&self.gpu, plan, tiers, cache_shape(&self.config))?)
        } else {
            None
        };
        Ok(())
    }

    /// Keeps every batch's hidden states made from now on on `tier` (host
    /// memory or disk, [`ActivationTier::of_policy`]) between layers,
    /// loaded into the block's two GPU buffers for each use; `None` keeps
    /// them on the GPU.
    pub fn place_activations(&mut self, tier: Option<ActivationTier>) {
        self.activations = tier;
    }

    /// Where the hidden states live off the GPU, if they do.
    pub fn activations(&self) -> Option<&ActivationTier> {
        self.activations.as_ref()
    }

    /// The tiered cache's streamer, when the cache is placed off the GPU
    /// (or 4-bit, or attended on the CPU).
    pub fn cache_streamer(&self) -> Option<&CacheStreamer<T>> {
        self.cache.as_ref()
    }

    /// What the tiered cache holds and moved, when there is one.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(|c| CacheStats {
            plan: c.plan(),
            tiers: c.tiers().clone(),
            slot_bytes: c.slot_bytes(),
            scratch_bytes: c.scratch_bytes(),
            bytes_moved: c.bytes_moved(),
        })
    }

    /// Stores what the tiered cache's GPU slots hold (after a step's
    /// layers).
    fn flush_cache(&self) -> Result<()> {
        match &self.cache {
            Some(c) => Ok(c.flush()?),
            None => Ok(()),
        }
    }

    /// The configuration (its dtype the one computed in).
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The layer spec the weights were placed by.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The GPU.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The weight streamer, when layers live off the GPU.
    pub fn offload(&self) -> Option<&WeightStreamer> {
        self.offload.as_ref()
    }

    /// Bytes of weights resident on the GPU (the streaming slots apart).
    pub fn weight_bytes(&self) -> u64 {
        let outside = self.embed.bytes() + self.norm.bytes() + self.lm_head.as_ref().map_or(0, DevBuf::bytes);
        outside + self.layers.iter().map(GpuLayer::bytes).sum::<u64>()
    }

    fn weights(&self, j: usize) -> Result<&GpuLayer> {
        if let Some(w) = self.layers.get(j) {
            return Ok(w);
        }
        match &self.offload {
            Some(s) if j < self.config.num_hidden_layers => Ok(s.weights(j)?),
            _ => Err(gpu_err(format!("layer {j} does not exist"))),
        }
    }

    fn tensor<'a>(&self, w: &'a GpuLayer, name: &str) -> Result<&'a DevBuf<T>> {
        w.half::<T>(name)?.ok_or_else(|| gpu_err(format!("layer tensor {name} is missing")))
    }

    fn optional<'a>(&self, w: &'a GpuLayer, name: &str) -> Result<Option<&'a DevBuf<T>>> {
        Ok(w.half::<T>(name)?)
    }

    /// The step's token embeddings into `hidden`, its positions and mask
    /// into the workspace and the batch's key mask.
    fn embed(&self, tokens: &BatchTokens, b: &mut BatchKv<T>, hidden: &DevBuf<f32>, ws: &Workspace<T>) -> Result<()> {
        let (rows, h, vocab) = (tokens.rows(), self.config.hidden_size, self.config.vocab_size);
        ws.fits(rows, tokens.batch())?;
        if let Some(&bad) = tokens.tokens().iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Generate(format!("token {bad} is outside the vocabulary of {vocab}")));
        }
        let past = b.len;
        let end = past.checked_add(tokens.new_len()).filter(|&e| e <= b.capacity).ok_or_else(|| {
            gpu_err(format!("{past} + {} positions exceed the cache's {}", tokens.new_len(), b.capacity))
        })?;
        let positions: Vec<i32> = tokens
            .positions()
            .iter()
            .map(|p| i32::try_from(p.unwrap_or(0)).map_err(|_| gpu_err("a position past 2^31".into())))
            .collect::<Result<_>>()?;
        self.phase(if tokens.new_len() > 1 { "prefill" } else { "decode" })?;
        let stream = self.gpu.stream();
        ws.tokens.upload(stream, 0, tokens.tokens())?;
        ws.step_mask.upload(stream, 0, tokens.mask())?;
        ws.positions.upload(stream, 0, &positions)?;
        let llm = self.gpu.llm()?;
        llm.embed_rows(&self.gpu, &ws.tokens, rows, &self.embed, (vocab, h), hidden)?;
        let step = (tokens.batch(), tokens.new_len());
        match &mut b.cache {
            BatchCache::Gpu { mask, .. } => llm.write_mask(&self.gpu, &ws.step_mask, step, mask, b.capacity, past)?,
            BatchCache::Tiered(tc) => {
                // The GPU's mask for the kernels, the host's for the CPU's
                // attention.
                tc.record_mask(tokens.mask(), tokens.new_len(), past)?;
                llm.write_mask(&self.gpu, &ws.step_mask, step, &tc.key_mask.mask, tc.key_mask.stride, past)?
            }
        }
        b.len = end;
        self.mark("embed")
    }

    /// Layer `j` of one batch's step, in place on its hidden states and
    /// cache: the attention block over the resident cache, a tiered cache's
    /// GPU slot or (decoding with `--cpu-cache-compute`) its host cache,
    /// then the MLP block.
    fn layer(
        &self,
        j: usize,
        tokens: &BatchTokens,
        b: &mut BatchKv<T>,
        hidden: &DevBuf<f32>,
        ws: &mut Workspace<T>,
    ) -> Result<()> {
        let (batch, s) = (tokens.batch(), tokens.new_len());
        let rows = tokens.rows();
        ws.fits(rows, batch)?;
        let past = b.cache.layer_len(j)?;
        if past.checked_add(s) != Some(b.len) {
            return Err(gpu_err(format!(
                "layer {j}: the cache holds {past} positions, the step adds {s}, the batch is at {}",
                b.len
            )));
        }
        let BatchKv { cache, capacity, .. } = b;
        match cache {
            BatchCache::Gpu { layers, mask } => {
                let cache = layers.get_mut(j).ok_or_else(|| gpu_err(format!("no cache for layer {j}")))?;
                let kv = KvOnGpu {
                    keys: &cache.keys,
                    values: &cache.values,
                    capacity: *capacity,
                    mask,
                    mask_stride: *capacity,
                    past,
                };
                self.attention_block(j, tokens, hidden, ws, &kv)?;
                cache.len = past + s;
            }
            BatchCache::Tiered(tc) => {
                let streamer =
                    self.cache.as_ref().ok_or_else(|| gpu_err("a tiered cache without its streamer".into()))?;
                streamer.layer(&self.gpu, j, tc, s, |run: LayerRun<'_, T>| match run {
                    LayerRun::Slot(slot) => {
                        // The host waited for the slot's store and load:
                        // profiled as its own part.
                        self.mark("wait for cache")?;
                        let kv = KvOnGpu {
                            keys: slot.keys,
                            values: slot.values,
                            capacity: slot.capacity,
                            mask: &slot.key_mask.mask,
                            mask_stride: slot.key_mask.stride,
                            past: slot.past,
                        };
                        self.attention_block(j, tokens, hidden, ws, &kv)
                    }
                    LayerRun::Host(host) => self.host_attention_block(j, tokens, hidden, ws, host),
                })?;
            }
        }
        self.mlp_block(j, rows, hidden, ws)
    }

    /// The attention block's input: RMSNorm, the q/k/v products (with
    /// biases), Qwen3's per-head q/k norms, the rotary embedding of q and k,
    /// into `ws.q`, `ws.k`, `ws.v`.
    fn qkv(&self, w: &GpuLayer, rows: usize, hidden: &DevBuf<f32>, ws: &Workspace<T>) -> Result<()> {
        let c = &self.config;
        let (h, heads, kv_heads, d) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (q_w, kv_w) = (heads * d, kv_heads * d);
        let eps = c.rms_norm_eps;
        let gpu = &self.gpu;
        let llm = gpu.llm()?;
        let x = MatMut::new(&ws.x, rows, h)?;
        llm.rms_norm_f32(gpu, Mat::new(hidden, rows, h)?, self.tensor(w, "input_layernorm.weight")?, eps, x)?;
        self.mark("rms norm")?;
        // One product for q, k and v (their weights stacked by rows).
        let stack = q_w + 2 * kv_w;
        let qkv = Mat::new(self.tensor(w, "self_attn.qkv_proj.weight")?, stack, h)?;
        let bias = self.optional(w, "self_attn.qkv_proj.bias")?;
        let stacked = MatMut::new(&ws.stacked, rows, stack)?;
        gpu.blas.linear_half(gpu, x.as_mat(), qkv, HalfOut::Half { out: stacked, bias }, false)?;
        self.mark("q k v products")?;
        let shape = KvShape { heads, kv_heads, head_dim: d };
        let rope = Rotary { positions: &ws.positions, inv_freq: &self.inv_freq };
        let (q, k) = (MatMut::new(&ws.q, rows, q_w)?, MatMut::new(&ws.k, rows, kv_w)?);
        let v = MatMut::new(&ws.v, rows, kv_w)?;
        if let (Some(qn), Some(kn)) =
            (self.optional(w, "self_attn.q_norm.weight")?, self.optional(w, "self_attn.k_norm.weight")?)
        {
            // Qwen3 normalises each head before the rotation.
            llm.split_qkv(gpu, stacked.as_mat(), shape, None, (q, k, v))?;
            llm.rms_norm_inplace(gpu, &ws.q, rows * heads, d, qn, eps)?;
            llm.rms_norm_inplace(gpu, &ws.k, rows * kv_heads, d, kn, eps)?;
            llm.rope(gpu, q, (heads, d), rope)?;
            llm.rope(gpu, k, (kv_heads, d), rope)?;
        } else {
            llm.split_qkv(gpu, stacked.as_mat(), shape, Some(rope), (q, k, v))?;
        }
        self.mark("q/k norm, rope")
    }

    /// The attention's output (`ws.attn`) through the output product, added
    /// to the residual stream.
    fn attention_output(&self, w: &GpuLayer, rows: usize, hidden: &DevBuf<f32>, ws: &Workspace<T>) -> Result<()> {
        let c = &self.config;
        let (h, q_w) = (c.hidden_size, c.num_attention_heads * c.head_dim);
        let gpu = &self.gpu;
        let o = Mat::new(self.tensor(w, "self_attn.o_proj.weight")?, h, q_w)?;
        let out = HalfOut::F32 { out: MatMut::new(hidden, rows, h)? };
        gpu.blas.linear_half(gpu, Mat::new(&ws.attn, rows, q_w)?, o, out, true)?;
        self.mark("o product")
    }

    /// Layer `j`'s attention block over a cache on the GPU: the step's keys
    /// and values stored at `kv.past`, the attention over positions
    /// `0..kv.past + new`, the output product into the residual stream.
    fn attention_block(
        &self,
        j: usize,
        tokens: &BatchTokens,
        hidden: &DevBuf<f32>,
        ws: &mut Workspace<T>,
        kv: &KvOnGpu<'_, T>,
    ) -> Result<()> {
        let c = &self.config;
        let (batch, s, rows) = (tokens.batch(), tokens.new_len(), tokens.rows());
        let kv_w = c.num_key_value_heads * c.head_dim;
        let gpu = &self.gpu;
        let w = self.weights(j)?;
        self.qkv(w, rows, hidden, ws)?;
        let (k, v) = (Mat::new(&ws.k, rows, kv_w)?, Mat::new(&ws.v, rows, kv_w)?);
        gpu.llm()?.store_kv(gpu, (k, v), &kv.view(batch, c)?, kv.past..kv.past + s)?;
        self.mark("store kv")?;
        self.attention(kv, (batch, s), ws)?;
        self.mark("attention")?;
        self.attention_output(w, rows, hidden, ws)
    }

    /// Layer `j`'s attention block of a decoding step with the attention on
    /// the CPU over the host cache (`--cpu-cache-compute`): the step's q, k
    /// and v come to the host, k and v are appended to the cache at
    /// `past`, the attention's output goes back for the output product.
    fn host_attention_block(
        &self,
        j: usize,
        tokens: &BatchTokens,
        hidden: &DevBuf<f32>,
        ws: &mut Workspace<T>,
        host: HostLayer<'_, T>,
    ) -> Result<()> {
        let c = &self.config;
        let (batch, rows) = (tokens.batch(), tokens.rows());
        let heads = c.num_attention_heads;
        let HostLayer {
            keys,
            values,
            host_mask,
            batch: cached,
            kv_heads,
            head_dim: d,
            capacity,
            past,
            sparsity,
            threads,
            ..
        } = host;
        if rows != batch || cached != batch || (kv_heads, d) != (c.num_key_value_heads, c.head_dim) {
            return Err(gpu_err(format!(
                "layer {j}: CPU attention over {cached} sequences of {kv_heads} heads of {d} for a step of {rows} \
                 rows of {batch}"
            )));
        }
        let w = self.weights(j)?;
        self.qkv(w, rows, hidden, ws)?;
        let stream = self.gpu.stream();
        let q: Vec<f32> = ws.q.download_range(stream, 0, rows * heads * d)?.into_iter().map(Half::to_f32).collect();
        let k = ws.k.download_range(stream, 0, rows * kv_heads * d)?;
        let v = ws.v.download_range(stream, 0, rows * kv_heads * d)?;
        let out = threads.run(|| -> Result<Vec<T>> {
            crate::cpu_attention::append(&k, &v, past, (&mut *keys, &mut *values), [batch, kv_heads, d, capacity])?;
            let cache = crate::cpu_attention::HostKv {
                keys,
                values,
                mask: host_mask,
                batch,
                kv_heads,
                head_dim: d,
                capacity,
                total: past + 1,
            };
            let out = crate::cpu_attention::decode(&q, cache, heads, sparsity)?;
            Ok(out.into_iter().map(T::from_f32).collect())
        })?;
        ws.attn.upload(stream, 0, &out)?;
        self.mark("attention")?;
        self.attention_output(w, rows, hidden, ws)
    }

    /// Layer `j`'s MLP block: RMSNorm, SiLU(gate)·up, the down product
    /// added to the residual stream.
    fn mlp_block(&self, j: usize, rows: usize, hidden: &DevBuf<f32>, ws: &Workspace<T>) -> Result<()> {
        let c = &self.config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let gpu = &self.gpu;
        let llm = gpu.llm()?;
        if let Some(st) = &self.offload {
            st.begin_mlp(j)?;
            self.mark("wait for weights")?;
        }
        let w = self.weights(j)?;
        let post = self.tensor(w, "post_attention_layernorm.weight")?;
        let x = MatMut::new(&ws.x, rows, h)?;
        llm.rms_norm_f32(gpu, Mat::new(hidden, rows, h)?, post, c.rms_norm_eps, x)?;
        self.mark("rms norm")?;
        // One product for gate and up (their weights stacked by rows): row
        // r of `ws.stacked` is r's gate, then its up.
        let gate_up = Mat::new(self.tensor(w, "mlp.gate_up_proj.weight")?, 2 * inter, h)?;
        let bias = self.optional(w, "mlp.gate_up_proj.bias")?;
        let down = Mat::new(self.tensor(w, "mlp.down_proj.weight")?, h, inter)?;
        let stacked = MatMut::new(&ws.stacked, rows, 2 * inter)?;
        gpu.blas.linear_half(gpu, x.as_mat(), gate_up, HalfOut::Half { out: stacked, bias }, false)?;
        self.mark("gate up products")?;
        llm.silu_mul(gpu, &ws.stacked, rows, inter)?;
        self.mark("silu mul")?;
        // The down product's input: each row's gate half, rows 2·inter
        // apart. (`check_supported` refuses MLP biases on the GPU.)
        let input = stacked.as_mat().cols_range(0, inter)?;
        let out = HalfOut::F32 { out: MatMut::new(hidden, rows, h)? };
        gpu.blas.linear_half(gpu, input, down, out, true)?;
        self.mark("down product")
    }

    /// Attention of the step's queries (`ws.q`, rotated) over the layer's
    /// cache `kv` (this step's keys included) into `ws.attn`.
    fn attention(&self, kv: &KvOnGpu<'_, T>, (batch, s): (usize, usize), ws: &mut Workspace<T>) -> Result<()> {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (past, cap) = (kv.past, kv.capacity);
        let total = past + s;
        if total > cap || total > kv.mask_stride {
            return Err(gpu_err(format!("attention over {total} positions of a cache of {cap}")));
        }
        let cache = kv.view(batch, c)?;
        let mask = kv.mask(batch)?;
        let scale = (d as f32).powf(-0.5);
        let gpu = &self.gpu;
        let llm = gpu.llm()?;
        let q_w = heads * d;
        if s == 1 && attn_decode_fits(d, total) {
            let (q, out) = (Mat::new(&ws.q, batch, q_w)?, MatMut::new(&ws.attn, batch, q_w)?);
            return Ok(llm.attn_decode(gpu, q, &cache, &DecodeAttn { mask, total, scale }, out)?);
        }
        // A prompt (or a long decode): the queries by head, `[b][kv_head]
        // [group · s][d]` (a group's query heads are consecutive), so that
        // one batched product per (sequence, kv head) takes its whole
        // group: scores = Q·Kᵀ (f32 accumulation, stored in T as
        // transformers does), the causal masked softmax in f32, P·V.
        let group = heads / kv_heads;
        let per_seq = heads
            .checked_mul(s)
            .and_then(|n| n.checked_mul(total))
            .ok_or_else(|| gpu_err(format!("attention scores of {heads} heads × {s} × {total} overflow")))?;
        let chunk = crate::spec::scores(std::mem::size_of::<T>()).chunk(per_seq as u64, batch as u64) as usize;
        ws.ensure_scores(gpu, chunk * per_seq)?;
        let ws = &*ws;
        let scores = ws.scores.as_ref().ok_or_else(|| gpu_err("the GPU score buffer is missing".into()))?;
        llm.transpose_heads(gpu, &ws.q, &ws.qh, (batch, s, heads, d), true)?;
        let head_block = cap * d;
        let rows_g = group * s;
        for b0 in (0..batch).step_by(chunk) {
            let nb = chunk.min(batch - b0);
            let n = nb * kv_heads;
            let keys = Operand::new(kv.keys, b0 * kv_heads * head_block, d, head_block);
            let queries = Operand::new(&ws.qh, b0 * heads * s * d, d, rows_g * d);
            let out = Operand::new(scores, 0, total, rows_g * total);
            gpu.blas.gemm_batched_half(
                Gemm::new((total, rows_g, d), n).transpose_a().scaled(scale),
                keys,
                queries,
                out,
            )?;
            let at = ScoreRows { seqs: nb, heads, new_len: s, past, first: b0 };
            llm.softmax_causal(gpu, MatMut::new(scores, nb * heads * s, total)?, at, mask)?;
            let values = Operand::new(kv.values, b0 * kv_heads * head_block, d, head_block);
            let probs = Operand::new(scores, 0, total, rows_g * total);
            let out = Operand::new(&ws.qh, b0 * heads * s * d, d, rows_g * d);
            gpu.blas.gemm_batched_half(Gemm::new((d, rows_g, total), n), values, probs, out)?;
        }
        Ok(llm.transpose_heads(gpu, &ws.qh, &ws.attn, (batch, s, heads, d), false)?)
    }

    /// The logits of each sequence's last position into `ws.logits`.
    fn logits(&self, tokens: &BatchTokens, hidden: &DevBuf<f32>, ws: &Workspace<T>) -> Result<()> {
        let c = &self.config;
        let (batch, s, h, v) = (tokens.batch(), tokens.new_len(), c.hidden_size, c.vocab_size);
        ws.fits(tokens.rows(), batch)?;
        let gpu = &self.gpu;
        // Each sequence's last row: rows s·h apart from row s - 1.
        let last_rows = Mat::strided(hidden, s.saturating_sub(1) * h, batch, h, s * h)?;
        let last = MatMut::new(&ws.last, batch, h)?;
        gpu.llm()?.rms_norm_f32(gpu, last_rows, &self.norm, c.rms_norm_eps, last)?;
        let head = Mat::new(self.lm_head.as_ref().unwrap_or(&self.embed), v, h)?;
        let out = HalfOut::F32 { out: MatMut::new(&ws.logits, batch, v)? };
        gpu.blas.linear_half(gpu, last.as_mat(), head, out, false)?;
        self.mark("logits")
    }
}

/// One layer's keys and values for a batch, `[batch][kv_head][cap][d]`.
struct LayerCache<T: Half> {
    keys: DevBuf<T>,
    values: DevBuf<T>,
    len: usize,
}

/// The keys and values a layer's attention reads and appends to on the
/// GPU: a batch's resident cache, or a tiered cache's GPU slot (whose
/// stride may be larger than the batch's capacity, the key mask's).
struct KvOnGpu<'a, T: Half> {
    /// `[batch][kv_head][capacity][d]`.
    keys: &'a DevBuf<T>,
    values: &'a DevBuf<T>,
    capacity: usize,
    /// `[batch][mask_stride]`, nonzero for real tokens.
    mask: &'a DevBuf<u8>,
    mask_stride: usize,
    /// Positions cached before the step.
    past: usize,
}

impl<'a, T: Half> KvOnGpu<'a, T> {
    /// The keys and values of `batch` sequences as the ops read them.
    fn view(&self, batch: usize, c: &LlamaConfig) -> Result<KvView<'a, T>> {
        let shape = KvShape { heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim };
        Ok(KvView::new((self.keys, self.values), batch, self.capacity, shape)?)
    }

    /// The key mask of `batch` sequences, a row of `mask_stride` positions
    /// each.
    fn mask(&self, batch: usize) -> Result<Mat<'a, u8>> {
        Ok(Mat::new(self.mask, batch, self.mask_stride)?)
    }
}

/// The cache's shape as the runtime's tiered cache holds it.
pub fn cache_shape(config: &LlamaConfig) -> CacheShape {
    CacheShape { layers: config.num_hidden_layers, kv_heads: config.num_key_value_heads, head_dim: config.head_dim }
}

/// A batch's KV cache, every layer's, and its key mask (`[batch][cap]`,
/// set for real tokens).
enum BatchCache<T: Half> {
    /// On the GPU.
    Gpu { layers: Vec<LayerCache<T>>, mask: DevBuf<u8> },
    /// Placed by the runtime's tiered cache (off the GPU, 4-bit, or for the
    /// CPU's attention).
    Tiered(Box<TieredCache<T>>),
}

impl<T: Half> BatchCache<T> {
    /// Positions layer `j` holds.
    fn layer_len(&self, j: usize) -> Result<usize> {
        let len = match self {
            BatchCache::Gpu { layers, .. } => layers.get(j).map(|c| c.len),
            BatchCache::Tiered(tc) => tc.homes(j).map(|_| tc.len(j)),
        };
        len.ok_or_else(|| gpu_err(format!("no cache for layer {j}")))
    }
}

/// A batch's KV cache, its capacity and the positions it holds.
struct BatchKv<T: Half> {
    cache: BatchCache<T>,
    capacity: usize,
    /// Positions held (every layer's after the step's layers).
    len: usize,
}

impl<T: Half> BatchKv<T> {
    fn new(model: &LlamaGpu<T>, batch: usize, capacity: usize) -> Result<Self> {
        let c = &model.config;
        let gpu = &model.gpu;
        let cache = match &model.cache {
            Some(streamer) => BatchCache::Tiered(Box::new(streamer.new_cache(gpu, batch, capacity)?)),
            None => {
                let per_layer = size("a layer's cache", &[batch, c.num_key_value_heads, capacity, c.head_dim])?;
                let mask_len = size("the key mask", &[batch, capacity])?;
                let layers = (0..c.num_hidden_layers)
                    .map(|_| {
                        let (keys, values) = (DevBuf::alloc(gpu, per_layer)?, DevBuf::alloc(gpu, per_layer)?);
                        Ok(LayerCache { keys, values, len: 0 })
                    })
                    .collect::<Result<Vec<_>>>()?;
                BatchCache::Gpu { layers, mask: DevBuf::from_host(gpu, &vec![0u8; mask_len])? }
            }
        };
        Ok(BatchKv { cache, capacity, len: 0 })
    }

    /// Bytes of the batch's cache on the GPU (keys, values and the key
    /// mask; of a tiered cache, its GPU share).
    fn bytes(&self) -> u64 {
        match &self.cache {
            BatchCache::Gpu { layers, mask } => {
                layers.iter().map(|c| c.keys.bytes() + c.values.bytes()).sum::<u64>() + mask.bytes()
            }
            BatchCache::Tiered(tc) => tc.bytes().0,
        }
    }
}

/// The product of `parts`, checked.
fn size(what: &str, parts: &[usize]) -> Result<usize> {
    parts
        .iter()
        .try_fold(1usize, |n, &p| n.checked_mul(p))
        .ok_or_else(|| gpu_err(format!("{what} of {parts:?} overflows")))
}

/// The family's hidden states as the runtime keeps them off the GPU: the
/// f32 residual stream, `hidden_size` values a row.
pub fn activation_parts(config: &LlamaConfig) -> [ActPart; 1] {
    [ActPart { dtype: DType::F32, width: config.hidden_size }]
}

/// Room for `rows` rows of the residual stream on the GPU.
fn hidden_buffer(gpu: &Gpu, config: &LlamaConfig, rows: usize) -> Result<DevBuf<f32>> {
    Ok(DevBuf::alloc(gpu, size("the hidden states", &[rows.max(1), config.hidden_size])?)?)
}

/// Where a batch's hidden states live between layers.
enum BatchHidden {
    /// On the GPU (f32, the residual stream).
    Gpu(DevBuf<f32>),
    /// In host memory or on disk, loaded into the block's GPU buffers for
    /// each use.
    Home(ActivationHome),
}

/// One batch on the GPU: its hidden states (f32, the residual stream, or
/// their home off the GPU) and its KV cache.
pub struct GpuBatch<T: Half> {
    hidden: BatchHidden,
    kv: BatchKv<T>,
}

impl<T: Half> GpuBatch<T> {
    /// Bytes of the batch's cache on the GPU.
    fn cache_bytes(&self) -> u64 {
        self.kv.bytes()
    }

    /// Bytes of the batch's own hidden states on the GPU.
    fn hidden_bytes(&self) -> u64 {
        match &self.hidden {
            BatchHidden::Gpu(h) => h.bytes(),
            BatchHidden::Home(_) => 0,
        }
    }
}

/// Scratch space shared by a block's batches, sized for the largest step.
struct Workspace<T: Half> {
    rows: usize,
    batch: usize,
    tokens: DevBuf<u32>,
    step_mask: DevBuf<u8>,
    positions: DevBuf<i32>,
    x: DevBuf<T>,
    q: DevBuf<T>,
    k: DevBuf<T>,
    v: DevBuf<T>,
    qh: DevBuf<T>,
    attn: DevBuf<T>,
    /// The stacked products' output: gate and up side by side in each row
    /// (then, in place, the down product's input), or q, k and v before
    /// their split (`spec::stacked_width` values a row).
    stacked: DevBuf<T>,
    last: DevBuf<T>,
    logits: DevBuf<f32>,
    picked: DevBuf<u32>,
    scores: Option<DevBuf<T>>,
}

impl<T: Half> Workspace<T> {
    fn new(gpu: &Gpu, c: &LlamaConfig, rows: usize, batch: usize) -> Result<Self> {
        let n = |a: usize, b: usize| a.checked_mul(b).ok_or_else(|| gpu_err(format!("a workspace of {a} x {b}")));
        let (q_w, kv_w) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        Ok(Workspace {
            rows,
            batch,
            tokens: DevBuf::alloc(gpu, rows)?,
            step_mask: DevBuf::alloc(gpu, rows)?,
            positions: DevBuf::alloc(gpu, rows)?,
            x: DevBuf::alloc(gpu, n(rows, c.hidden_size)?)?,
            q: DevBuf::alloc(gpu, n(rows, q_w)?)?,
            k: DevBuf::alloc(gpu, n(rows, kv_w)?)?,
            v: DevBuf::alloc(gpu, n(rows, kv_w)?)?,
            qh: DevBuf::alloc(gpu, n(rows, q_w)?)?,
            attn: DevBuf::alloc(gpu, n(rows, q_w)?)?,
            stacked: DevBuf::alloc(gpu, n(rows, crate::spec::stacked_width(c))?)?,
            last: DevBuf::alloc(gpu, n(batch, c.hidden_size)?)?,
            logits: DevBuf::alloc(gpu, n(batch, c.vocab_size)?)?,
            picked: DevBuf::alloc(gpu, batch)?,
            scores: None,
        })
    }

    fn fits(&self, rows: usize, batch: usize) -> Result<()> {
        if rows > self.rows || batch > self.batch {
            return Err(gpu_err(format!(
                "a step of {rows} rows of {batch} sequences; the workspace holds {} of {}",
                self.rows, self.batch
            )));
        }
        Ok(())
    }

    fn ensure_scores(&mut self, gpu: &Gpu, len: usize) -> Result<()> {
        if self.scores.as_ref().is_none_or(|s| s.len() < len) {
            self.scores = None;
            self.scores = Some(DevBuf::alloc(gpu, len)?);
        }
        Ok(())
    }

    fn bytes(&self) -> u64 {
        let halves = [&self.x, &self.q, &self.k, &self.v, &self.qh, &self.attn, &self.stacked, &self.last];
        halves.iter().map(|b| b.bytes()).sum::<u64>()
            + self.tokens.bytes()
            + self.step_mask.bytes()
            + self.positions.bytes()
            + self.logits.bytes()
            + self.picked.bytes()
            + self.scores.as_ref().map_or(0, DevBuf::bytes)
    }
}

/// The GPU as the runtime's [`ComputeDevice`] for `model`.
pub struct LlamaGpuCompute<'a, T: Half> {
    model: &'a LlamaGpu<T>,
    ws: Option<Workspace<T>>,
    /// With the hidden states off the GPU: the block's two GPU buffers and
    /// the loads and stores around each use.
    activations: Option<ActivationStreamer<DevBuf<f32>>>,
}

impl<'a, T: Half> LlamaGpuCompute<'a, T> {
    pub fn new(model: &'a LlamaGpu<T>) -> Self {
        LlamaGpuCompute { model, ws: None, activations: None }
    }

    /// Bytes loaded and stored between the hidden states' homes and the
    /// GPU so far (0 with them on the GPU).
    pub fn activation_bytes_moved(&self) -> u64 {
        self.activations.as_ref().map_or(0, ActivationStreamer::bytes_moved)
    }

    fn ws(&mut self) -> Result<&mut Workspace<T>> {
        self.ws.as_mut().ok_or_else(|| gpu_err("the GPU workspace was not prepared".into()))
    }

    /// `compute` over batch `b`'s hidden states (its own GPU buffer, or one
    /// of the block's loaded from its home as `how` says), with the
    /// workspace and the batch's cache.
    fn on_hidden<R>(
        &mut self,
        b: &mut GpuBatch<T>,
        rows: usize,
        how: Use,
        compute: impl FnOnce(&LlamaGpu<T>, &mut Workspace<T>, &mut BatchKv<T>, &DevBuf<f32>) -> Result<R>,
    ) -> Result<R> {
        let LlamaGpuCompute { model, ws, activations } = self;
        let model: &LlamaGpu<T> = model;
        let ws = ws.as_mut().ok_or_else(|| gpu_err("the GPU workspace was not prepared".into()))?;
        let GpuBatch { hidden, kv } = b;
        match hidden {
            BatchHidden::Gpu(h) => compute(model, ws, kv, h),
            BatchHidden::Home(home) => {
                let s = activations
                    .as_mut()
                    .ok_or_else(|| gpu_err("hidden states off the GPU without their GPU buffers".into()))?;
                s.run(&model.gpu, home, rows, how, |h| {
                    // The host stored and loaded the hidden states: profiled
                    // as its own part.
                    model.mark("wait for activations")?;
                    compute(model, ws, kv, h)
                })
            }
        }
    }

    /// The logits of the step's last positions into the workspace's.
    fn logits(&mut self, tokens: &BatchTokens, b: &mut GpuBatch<T>) -> Result<()> {
        self.on_hidden(b, tokens.rows(), Use::Read, |model, ws, _, h| model.logits(tokens, h, ws))
    }
}

impl<T: Half> Drop for LlamaGpuCompute<'_, T> {
    fn drop(&mut self) {
        // Work still on the stream may read the workspace: let it finish.
        let _ = self.model.gpu.synchronize();
    }
}

impl<T: Half> ComputeDevice for LlamaGpuCompute<'_, T> {
    type Batch = GpuBatch<T>;
    type Error = Error;

    fn num_layers(&self) -> usize {
        self.model.config.num_hidden_layers
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    fn begin_block(&mut self, tokens: &[BatchTokens]) -> Result<()> {
        self.activations = None;
        if let Some(tier) = &self.model.activations {
            let (gpu, c) = (&self.model.gpu, &self.model.config);
            let rows = tokens.iter().map(BatchTokens::rows).max().unwrap_or(0).max(1);
            let bufs = [hidden_buffer(gpu, c, rows)?, hidden_buffer(gpu, c, rows)?];
            self.activations = Some(ActivationStreamer::new(gpu, tier, &activation_parts(c), rows, bufs)?);
        }
        Ok(())
    }

    fn new_batch(&mut self, tokens: &BatchTokens, capacity: usize) -> Result<GpuBatch<T>> {
        let model = self.model;
        let hidden = match &self.activations {
            Some(s) => BatchHidden::Home(s.home(tokens.rows().max(1))?),
            None => BatchHidden::Gpu(hidden_buffer(&model.gpu, &model.config, tokens.rows())?),
        };
        Ok(GpuBatch { hidden, kv: BatchKv::new(model, tokens.batch(), capacity)? })
    }

    fn prepare(&mut self, batches: &[(BatchTokens, GpuBatch<T>)]) -> Result<()> {
        let rows = batches.iter().map(|(t, _)| t.rows()).max().unwrap_or(0).max(1);
        let batch = batches.iter().map(|(t, _)| t.batch()).max().unwrap_or(0).max(1);
        self.ws = None;
        self.ws = Some(Workspace::new(&self.model.gpu, &self.model.config, rows, batch)?);
        Ok(self.model.gpu.synchronize()?)
    }

    fn embed(&mut self, tokens: &BatchTokens, b: &mut GpuBatch<T>) -> Result<()> {
        self.on_hidden(b, tokens.rows(), Use::Write, |model, ws, kv, h| model.embed(tokens, kv, h, ws))
    }

    fn begin_layer(&mut self, j: usize) -> Result<()> {
        let model = self.model;
        if let Some(s) = &model.offload {
            // A packed layer is copied whole (no --sep-layer split), so
            // every matrix the unpacking reads is in its slot now.
            s.begin_layer(j)?;
            model.mark("wait for weights")?;
        }
        if let Some(u) = &model.unpacker {
            u.before(&model.gpu, model.weights(j)?)?;
            model.mark("unpack weights")?;
        }
        Ok(())
    }

    fn layer(&mut self, j: usize, tokens: &BatchTokens, b: &mut GpuBatch<T>) -> Result<()> {
        self.on_hidden(b, tokens.rows(), Use::Update, |model, ws, kv, h| model.layer(j, tokens, kv, h, ws))
    }

    fn end_layer(&mut self, j: usize) -> Result<()> {
        match &self.model.offload {
            Some(s) => Ok(s.end_layer(&self.model.gpu, j)?),
            None => Ok(()),
        }
    }

    fn end_step(&mut self) -> Result<()> {
        // Keys and values left in the tiered cache's GPU slots go home.
        self.model.flush_cache()
    }

    fn pick(&mut self, tokens: &BatchTokens, b: &mut GpuBatch<T>, sampler: Option<&mut Sampler>) -> Result<Vec<u32>> {
        let model = self.model;
        let (batch, vocab) = (tokens.batch(), model.config.vocab_size);
        self.logits(tokens, b)?;
        let ws = self.ws.as_ref().ok_or_else(|| gpu_err("the GPU workspace was not prepared".into()))?;
        let gpu = &model.gpu;
        let first = tokens.generated.iter().all(Vec::is_empty);
        match sampler {
            None => {
                if first {
                    check_logits(&ws.logits.download_range(gpu.stream(), 0, batch * vocab)?)?;
                }
                gpu.kernels.argmax_rows(gpu, &ws.logits, batch, vocab, &ws.picked)?;
                model.mark("pick")?;
                Ok(ws.picked.download_range(gpu.stream(), 0, batch)?)
            }
            Some(sampler) => {
                let logits = ws.logits.download_range(gpu.stream(), 0, batch * vocab)?;
                check_logits(&logits)?;
                Ok(logits.chunks(vocab).map(|row| sampler.sample(row)).collect())
            }
        }
    }

    fn finish(&mut self) -> Result<()> {
        self.model.flush_cache()?;
        Ok(self.model.gpu.synchronize()?)
    }

    fn cache_bytes(&self, b: &GpuBatch<T>) -> u64 {
        b.cache_bytes()
    }

    fn activation_bytes(&self, batches: &[&GpuBatch<T>]) -> u64 {
        // Off the GPU, the block's two buffers (loaded beside the compute).
        let hidden = match &self.activations {
            Some(s) => s.gpu_bytes(),
            None => batches.iter().map(|b| b.hidden_bytes()).sum::<u64>(),
        };
        hidden + self.ws.as_ref().map_or(0, Workspace::bytes)
    }
}

/// Non-finite logits mean the weights or the activations left the compute
/// type's range: said, not turned into tokens.
fn check_logits(logits: &[f32]) -> Result<()> {
    match logits.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Generate(format!(
            "the first step's logits hold {} at index {i}: the weights or the activations are out of the GPU \
             compute type's range (a checkpoint with NaN or very large values?)",
            logits[i]
        ))),
    }
}

/// Generates for `batches` (each a batch of prompts, unpadded) on the GPU
/// with the runtime's schedule: greedy without a sampler.
pub fn generate<T: Half>(
    model: &LlamaGpu<T>,
    batches: &[Vec<Vec<u32>>],
    options: &GenerateOptions,
    sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    crate::device::check_block_config(&model.config, batches, options)?;
    let mut device = LlamaGpuCompute::new(model);
    let mut out = runtime::schedule::generate(&mut device, batches, options, sampler, progress)?;
    // A tiered cache's GPU slots and 4-bit scratch are its share on the GPU.
    out.cache_bytes += model.cache.as_ref().map_or(0, |c| c.slot_bytes() + c.scratch_bytes());
    Ok(out)
}

/// The last position's logits of each prompt (left padded into one batch),
/// `[batch, vocab]`, from one prefill on the GPU.
pub fn prefill_logits<T: Half>(model: &LlamaGpu<T>, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
    let c = &model.config;
    runtime::schedule::validate_prompts(c.vocab_size, c.max_position_embeddings, prompts, 0, 0)?;
    let tokens = BatchTokens::new(prompts, 0);
    let mut device = LlamaGpuCompute::new(model);
    device.begin_block(std::slice::from_ref(&tokens))?;
    let mut b = device.new_batch(&tokens, tokens.new_len())?;
    device.ws = Some(Workspace::new(&model.gpu, c, tokens.rows().max(1), tokens.batch().max(1))?);
    device.embed(&tokens, &mut b)?;
    for j in 0..c.num_hidden_layers {
        device.begin_layer(j)?;
        device.layer(j, &tokens, &mut b)?;
        device.end_layer(j)?;
    }
    model.flush_cache()?;
    device.logits(&tokens, &mut b)?;
    let ws = device.ws()?;
    Ok(ws.logits.download_range(model.gpu.stream(), 0, tokens.batch() * c.vocab_size)?)
}

/// The 16-bit type a checkpoint of `config` computes in on the GPU: its
/// own (bf16 or f16); f32 checkpoints run in bf16.
pub fn compute_dtype(config: &LlamaConfig) -> DType {
    match config.weight_dtype() {
        ops::DType::F16 => DType::F16,
        _ => DType::BF16,
    }
}

/// A model of either compute type, for callers that pick at run time.
pub enum AnyLlamaGpu {
    Bf16(LlamaGpu<bf16>),
    F16(LlamaGpu<f16>),
}

impl AnyLlamaGpu {
    /// [`LlamaGpu::new`] in the config's compute type ([`compute_dtype`]).
    pub fn new(
        gpu: Gpu,
        config: LlamaConfig,
        split: LayerSplit,
        tiers: Option<OffloadTiers>,
        ck: Option<&Checkpoint>,
        seed: u64,
        compress_weight: bool,
    ) -> Result<Self> {
        Ok(match compute_dtype(&config) {
            DType::F16 => AnyLlamaGpu::F16(LlamaGpu::new(gpu, config, split, tiers, (ck, seed), compress_weight)?),
            _ => AnyLlamaGpu::Bf16(LlamaGpu::new(gpu, config, split, tiers, (ck, seed), compress_weight)?),
        })
    }

    /// [`LlamaGpu::place_cache`].
    pub fn place_cache(&mut self, plan: CachePlan, tiers: CacheTiers) -> Result<()> {
        match self {
            AnyLlamaGpu::Bf16(m) => m.place_cache(plan, tiers),
            AnyLlamaGpu::F16(m) => m.place_cache(plan, tiers),
        }
    }

    /// [`LlamaGpu::place_activations`].
    pub fn place_activations(&mut self, tier: Option<ActivationTier>) {
        match self {
            AnyLlamaGpu::Bf16(m) => m.place_activations(tier),
            AnyLlamaGpu::F16(m) => m.place_activations(tier),
        }
    }

    /// [`LlamaGpu::activations`].
    pub fn activations(&self) -> Option<&ActivationTier> {
        match self {
            AnyLlamaGpu::Bf16(m) => m.activations(),
            AnyLlamaGpu::F16(m) => m.activations(),
        }
    }

    /// [`LlamaGpu::cache_stats`].
    pub fn cache_stats(&self) -> Option<CacheStats> {
        match self {
            AnyLlamaGpu::Bf16(m) => m.cache_stats(),
            AnyLlamaGpu::F16(m) => m.cache_stats(),
        }
    }

    /// [`LlamaGpu::set_sep_layer`].
    pub fn set_sep_layer(&mut self, sep: bool) {
        match self {
            AnyLlamaGpu::Bf16(m) => m.set_sep_layer(sep),
            AnyLlamaGpu::F16(m) => m.set_sep_layer(sep),
        }
    }

    /// [`LlamaGpu::set_profile`].
    pub fn set_profile(&mut self, on: bool) {
        match self {
            AnyLlamaGpu::Bf16(m) => m.set_profile(on),
            AnyLlamaGpu::F16(m) => m.set_profile(on),
        }
    }

    /// [`LlamaGpu::take_profile`].
    pub fn take_profile(&self) -> Result<BTreeMap<(&'static str, &'static str), f64>> {
        match self {
            AnyLlamaGpu::Bf16(m) => m.take_profile(),
            AnyLlamaGpu::F16(m) => m.take_profile(),
        }
    }

    /// [`generate`].
    pub fn generate(
        &self,
        batches: &[Vec<Vec<u32>>],
        options: &GenerateOptions,
        sampler: Option<&mut Sampler>,
        progress: &ProgressBar,
    ) -> Result<GenerationOutput> {
        match self {
            AnyLlamaGpu::Bf16(m) => generate(m, batches, options, sampler, progress),
            AnyLlamaGpu::F16(m) => generate(m, batches, options, sampler, progress),
        }
    }

    /// [`prefill_logits`].
    pub fn prefill_logits(&self, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
        match self {
            AnyLlamaGpu::Bf16(m) => prefill_logits(m, prompts),
            AnyLlamaGpu::F16(m) => prefill_logits(m, prompts),
        }
    }

    /// The GPU.
    pub fn gpu(&self) -> &Gpu {
        match self {
            AnyLlamaGpu::Bf16(m) => m.gpu(),
            AnyLlamaGpu::F16(m) => m.gpu(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        match self {
            AnyLlamaGpu::Bf16(m) => m.config(),
            AnyLlamaGpu::F16(m) => m.config(),
        }
    }

    /// The weight streamer, when layers live off the GPU.
    pub fn offload(&self) -> Option<&WeightStreamer> {
        match self {
            AnyLlamaGpu::Bf16(m) => m.offload(),
            AnyLlamaGpu::F16(m) => m.offload(),
        }
    }

    /// Bytes of weights resident on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        match self {
            AnyLlamaGpu::Bf16(m) => m.weight_bytes(),
            AnyLlamaGpu::F16(m) => m.weight_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_values_follow_the_cpu_dummy_s_scales() {
        let c = LlamaConfig::preset("qwen2.5-7b").unwrap();
        let spec = crate::spec::model_spec(&c).unwrap();
        let rule = |name: &str| dummy_init(spec.layer_tensor(name).unwrap());
        assert_eq!(rule("input_layernorm.weight"), Init::Constant(1.0));
        assert_eq!(rule("self_attn.qkv_proj.bias"), Init::Uniform(0.02));
        assert_eq!(rule("mlp.down_proj.weight"), Init::Uniform(1.0 / (c.intermediate_size as f32).sqrt()));
    }

    #[test]
    fn the_compute_type_is_the_checkpoint_s_16_bit_one() {
        let mut c = LlamaConfig::preset("llama-3.1-8b").unwrap();
        assert_eq!(compute_dtype(&c), DType::BF16);
        c.dtype = Some(ops::DType::F16);
        assert_eq!(compute_dtype(&c), DType::F16);
        c.dtype = Some(ops::DType::F32);
        assert_eq!(compute_dtype(&c), DType::BF16);
    }

    #[test]
    fn biases_the_gpu_engine_lacks_are_refused_by_name() {
        let mut c = LlamaConfig::preset("llama-3.1-8b").unwrap();
        assert!(check_supported(&c).is_ok());
        c.mlp_bias = true;
        let e = check_supported(&c).unwrap_err().to_string();
        assert!(e.contains("mlp_bias") && e.contains("CPU engine"), "{e}");
    }
}
