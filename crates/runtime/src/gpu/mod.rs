//! A decoder layer's weights on one GPU, for any family: storage,
//! 4-bit packing and streaming through GPU slots, all read from the layer
//! spec ([`crate::spec::ModelSpec`]), none naming a tensor; the KV
//! cache placed over the tiers and streamed through GPU slots; and the
//! hidden states between layers off the GPU.
//!
//! - [`layer`]: [`layer::GpuLayer`], one GPU buffer per tensor of the
//!   spec's layer, in its order and held type, filled from a checkpoint or
//!   by seeded kernels (`--dummy`, with the family's [`layer::InitRule`]);
//!   a family looks its tensors up by name and computes.
//! - [`packed`]: `--compress-weight`: the spec's compressible tensors
//!   quantized to 4 bits as the parts the spec packs them as, dequantized
//!   on the GPU into a shared [`packed::LayerWorkspace`] before each layer.
//! - [`stream`]: [`stream::WeightStreamer`], the layers past the resident
//!   ones split by rows over host memory and disk
//!   ([`crate::plan::LayerSplit`]) and copied into GPU slots ahead of the
//!   compute.
//! - [`cache`]: the KV cache off the GPU ([`cache::CacheStreamer`]): each
//!   batch's keys and values in the family's 16-bit type, `[batch,
//!   kv_heads, capacity, head_dim]` per layer, split in whole sequences
//!   over GPU, host memory and disk (or 4-bit on one tier), loaded into two
//!   GPU slots a layer at a time for the family's compute; with
//!   `--cpu-cache-compute`, handed to the family's CPU attention in place.
//! - [`activations`]: the hidden states off the GPU
//!   ([`activations::ActivationStreamer`]): each batch's parts (the f32
//!   residual stream, a family's 16-bit copy) in host memory or on disk
//!   between layers, loaded into one of two GPU buffers the block's
//!   batches share before each use and stored back when that buffer is
//!   next used, beside the compute.
//!
//! The GPU itself, its buffers and kernels are the op layer's
//! ([`ops::gpu`]). Failures are the runtime's [`crate::Error`]: GPU and tier
//! failures as [`crate::Error::Op`] with the op layer's GPU message.

pub mod activations;
pub mod cache;
pub mod layer;
pub mod packed;
pub mod stream;

use crate::error::Error;

/// A GPU failure as the runtime's error (the op layer's GPU error, so a
/// family's crate maps it as it maps its own GPU calls' failures).
pub(crate) fn gpu_err(message: String) -> Error {
    Error::Op(ops::Error::Gpu(message))
}

/// A `tier-api` error (allocation, copy) on the GPU's side, as the op layer
/// says it.
pub(crate) fn tier_err(e: tier_api::Error) -> Error {
    Error::Op(ops::gpu::tier_err(e))
}
