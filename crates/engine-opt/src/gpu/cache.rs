//! The KV cache on the GPU.
//!
//! One layer's keys and values for a batch, f16, laid out
//! `[batch][head][position][head_dim]`: one head of one sequence is a
//! contiguous `capacity × head_dim` block, which decoding reads once, front
//! to back, with 16-byte loads. Which positions hold real tokens (left
//! padding does not) is one byte per position per sequence, shared by every
//! layer of the batch ([`KeyMask`]).

use half::f16;

use super::buffer::DevBuf;
use super::Gpu;
use crate::config::OptConfig;
use crate::error::{Error, Result};

/// Keys and values of one layer for a batch of sequences.
#[derive(Debug)]
pub struct GpuLayerCache {
    pub keys: DevBuf<f16>,
    pub values: DevBuf<f16>,
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    len: usize,
}

impl GpuLayerCache {
    /// An empty cache with room for `capacity` positions per sequence.
    pub fn new(gpu: &Gpu, batch: usize, heads: usize, head_dim: usize, capacity: usize) -> Result<Self> {
        let size = batch * heads * capacity * head_dim;
        Ok(GpuLayerCache {
            keys: DevBuf::alloc(gpu, size)?,
            values: DevBuf::alloc(gpu, size)?,
            batch,
            heads,
            head_dim,
            capacity,
            len: 0,
        })
    }

    /// A cache over existing buffers (a slot the tiered cache loads into),
    /// `(batch, heads, head_dim, capacity)`, holding `len` positions.
    pub(crate) fn over(
        keys: DevBuf<f16>,
        values: DevBuf<f16>,
        (batch, heads, head_dim, capacity): (usize, usize, usize, usize),
        len: usize,
    ) -> Self {
        GpuLayerCache { keys, values, batch, heads, head_dim, capacity, len }
    }

    /// Positions stored so far (the same for every sequence: padding counts).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records that `n` more positions were written (by the attention
    /// block), refusing to pass the capacity.
    pub(crate) fn advance(&mut self, n: usize) -> Result<()> {
        if self.len + n > self.capacity {
            return Err(Error::Gpu(format!(
                "GPU KV cache overflow: {} + {n} positions, room for {}",
                self.len, self.capacity
            )));
        }
        self.len += n;
        Ok(())
    }

    /// Bytes held (keys and values, whole capacity).
    pub fn bytes(&self) -> u64 {
        self.keys.bytes() + self.values.bytes()
    }
}

/// Which positions hold real tokens, a byte per position per sequence
/// (the runtime's, shared with the tiered cache).
pub use runtime::gpu::cache::KeyMask;

/// The caches of every layer for one batch, and its key mask.
#[derive(Debug)]
pub struct GpuKvCache {
    pub layers: Vec<GpuLayerCache>,
    pub key_mask: KeyMask,
}

impl GpuKvCache {
    /// Empty caches for every layer of `config`.
    pub fn new(gpu: &Gpu, config: &OptConfig, batch: usize, capacity: usize) -> Result<Self> {
        let layers = (0..config.num_hidden_layers)
            .map(|_| GpuLayerCache::new(gpu, batch, config.num_attention_heads, config.head_dim(), capacity))
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuKvCache { layers, key_mask: KeyMask::new(gpu, batch, capacity)? })
    }

    /// Bytes held by all layers and the mask.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(GpuLayerCache::bytes).sum::<u64>() + self.key_mask.mask.bytes()
    }
}
