//! OPT's KV cache off the GPU: `--percent _ _ C_GPU C_CPU _ _` with
//! `C_GPU < 100`, `--compress-cache` and `--cpu-cache-compute`.
//!
//! The placement, the slots, the loads and stores and the 4-bit packing are
//! the runtime's ([`runtime::gpu::cache`]: each batch's cache split in whole
//! sequences over GPU, host and disk, streamed through two GPU slots in
//! FlexGen's order). What is OPT's is the glue: the cache's shape (a
//! key/value head per attention head, `hidden / heads` wide, f16), and the
//! layer the runtime's streamer runs on a slot ([`GpuModel::layer_forward`]
//! over the slot as a [`GpuLayerCache`]) or, decoding with
//! `--cpu-cache-compute`, on the host cache: the GPU computes the queries,
//! keys and values, the CPU appends the keys and values to the host cache
//! and computes the attention over it ([`crate::cpu_attention`], with
//! `--attn-sparsity`), and only the `[batch, 3·hidden]` products and the
//! `[batch, hidden]` outputs cross PCIe.

use half::f16;
use runtime::gpu::cache::{CacheShape, HostLayer, LayerRun};

use super::cache::GpuLayerCache;
use super::model::{GpuHidden, GpuModel, GpuStep, Workspace};
use super::Gpu;
use crate::config::OptConfig;
use crate::cpu_attention::{append_kv, decode_attention, AttnDims, HostCache};
use crate::error::{Error, Result};

pub use runtime::gpu::cache::{CachePlan, CacheTiers, IO_CORES};

/// One batch's cache off the GPU (or split over tiers, or 4-bit), f16.
pub type TieredCache = runtime::gpu::cache::TieredCache<f16>;

/// The cache's shape for `config`: every head keeps its keys and values.
pub fn cache_shape(config: &OptConfig) -> CacheShape {
    CacheShape { layers: config.num_hidden_layers, kv_heads: config.num_attention_heads, head_dim: config.head_dim() }
}

/// The runtime's streamer of f16 caches, for one OPT configuration.
pub struct CacheStreamer {
    inner: runtime::gpu::cache::CacheStreamer<f16>,
}

impl std::fmt::Debug for CacheStreamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl CacheStreamer {
    /// A streamer for `plan` over `tiers` (the slots are made with the first
    /// cache).
    pub fn new(gpu: &Gpu, plan: CachePlan, tiers: CacheTiers, config: &OptConfig) -> Result<Self> {
        Ok(CacheStreamer { inner: runtime::gpu::cache::CacheStreamer::new(gpu, plan, tiers, cache_shape(config))? })
    }

    /// The runtime's streamer.
    pub fn inner(&self) -> &runtime::gpu::cache::CacheStreamer<f16> {
        &self.inner
    }

    /// The plan.
    pub fn plan(&self) -> CachePlan {
        self.inner.plan()
    }

    /// The tiers.
    pub fn tiers(&self) -> &CacheTiers {
        self.inner.tiers()
    }

    /// Bytes of the two GPU slots.
    pub fn slot_bytes(&self) -> u64 {
        self.inner.slot_bytes()
    }

    /// Bytes copied between the slots and the cache's homes so far.
    pub fn bytes_moved(&self) -> u64 {
        self.inner.bytes_moved()
    }

    /// Stores everything the slots hold unstored.
    pub fn flush(&self) -> Result<()> {
        Ok(self.inner.flush()?)
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions
    /// (see [`runtime::gpu::cache::CacheStreamer::new_cache`]).
    pub fn new_cache(&self, gpu: &Gpu, config: &OptConfig, batch: usize, capacity: usize) -> Result<TieredCache> {
        if cache_shape(config) != self.inner.shape() {
            return Err(Error::Gpu("a cache for another configuration than the streamer's".into()));
        }
        Ok(self.inner.new_cache(gpu, batch, capacity)?)
    }

    /// Layer `j` of a batch whose cache is `tc` (a step of `new_len` new
    /// tokens per sequence), in place on `act`: on the CPU's attention when
    /// decoding with `--cpu-cache-compute`, else on the GPU through a slot.
    pub fn layer(
        &self,
        model: &GpuModel,
        j: usize,
        tc: &mut TieredCache,
        act: &GpuHidden,
        ws: &mut Workspace,
        new_len: usize,
    ) -> Result<()> {
        let heads = model.config.num_attention_heads;
        self.inner.layer(&model.gpu, j, tc, new_len, |run: LayerRun<'_, f16>| match run {
            LayerRun::Slot(slot) => {
                let mut cache = GpuLayerCache::over(
                    slot.keys.share(),
                    slot.values.share(),
                    (slot.batch, heads, model.config.head_dim(), slot.capacity),
                    slot.past,
                );
                // The host waited for the slot's store and load: profiled as
                // its own part.
                model.mark("wait for cache")?;
                let step = GpuStep { batch: slot.batch, new_len, past: slot.past, key_mask: slot.key_mask };
                model.layer_forward(j, &mut cache, act, ws, &step)
            }
            LayerRun::Host(host) => cpu_layer(model, j, act, ws, host),
        })
    }
}

/// A decoding step's layer `j` with the attention on the CPU over the host
/// cache: the step's keys and values appended at `past`, one query per
/// sequence attending over `0..=past`.
fn cpu_layer(model: &GpuModel, j: usize, act: &GpuHidden, ws: &mut Workspace, host: HostLayer<'_, f16>) -> Result<()> {
    let HostLayer { keys, values, host_mask, key_mask, batch, kv_heads, head_dim, capacity, past, sparsity, threads } =
        host;
    let dims = AttnDims { batch, heads: kv_heads, head_dim, capacity };
    let step = GpuStep { batch, new_len: 1, past, key_mask };
    model.attention_block_with(j, act, ws, &step, &mut |qkv: &[f16], out: &mut [f16]| {
        append_kv(qkv, 1, dims, past, keys, values)?;
        let cache = HostCache { keys, values, key_mask: host_mask, total: past + 1 };
        threads.run(|| decode_attention(qkv, cache, dims, sparsity, out))
    })?;
    model.mlp_block(j, act, ws, &step)
}
