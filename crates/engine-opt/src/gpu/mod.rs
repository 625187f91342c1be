//! # The GPU engine: OPT with everything on one GPU
//!
//! The first piece of the offloading engine. Weights, KV cache and
//! activations all live in GPU memory; the code is written layer by layer,
//! with the same split as the CPU reference in [`crate::model`], so that a
//! later block schedule can stream a layer's weights and a batch's cache
//! from host or disk into GPU slots and call the same functions:
//!
//! - [`Gpu`]: the device (through `tier-cuda`, so every buffer is counted
//!   against the GPU tier's account), one compute stream, the cuBLAS and
//!   cuBLASLt handles ([`blas`]) and the NVRTC kernels ([`kernels`]).
//! - [`buffer::DevBuf`]: a typed GPU buffer.
//! - [`layer`]: a decoder layer as GPU buffers, one per tensor of the layer
//!   spec ([`crate::spec::model_spec`]), loaded from a checkpoint or made on
//!   the GPU by seeded kernels (`--dummy`); [`weights`]: OPT's tensors
//!   looked up in it by name (matrices f16; q, k and v stacked into one
//!   `[3·hidden, hidden]` matrix), and the embeddings.
//! - [`cache`]: the KV cache of one layer, `[batch][head][position][head_dim]`
//!   f16, so that one head of one sequence is contiguous for decoding.
//! - [`model`]: [`model::GpuModel::embed`], [`model::GpuModel::layer_forward`]
//!   (the attention block, then the MLP block), [`model::GpuModel::logits`]
//!   and greedy argmax, all on the GPU.
//! - [`generation`]: prefill and decode over a block of batches in
//!   FlexGen's order (for each step, for each layer, for each batch), with the
//!   CPU engine's stopping rules and timing split.
//! - [`offload`]: weights off the GPU (`--percent W_GPU W_CPU ...`): the
//!   first decoder layers resident, the others' rows split over host memory
//!   (page-locked or pageable) and disk in `--offload-dir`, streamed through
//!   GPU slots with the copy matrix, the next layer copying while the
//!   current one computes; embeddings and logits weights stay on the GPU.
//! - [`packed`]: `--compress-weight`: the spec's compressible tensors
//!   quantized to 4 bits at load and held packed on their tier (GPU, host,
//!   disk, slots); dequantized on the GPU into one shared f16 layer
//!   workspace just before each layer computes.
//! - [`tiered_cache`]: the KV cache off the GPU (`--percent _ _ C_GPU C_CPU
//!   _ _`), OPT's glue over the runtime's [`runtime::gpu::cache`]: each
//!   batch's cache split in whole sequences over GPU, host and disk (or
//!   4-bit on one tier), loaded into two GPU slots a layer at a time; with
//!   `--cpu-cache-compute`, decode attention on the CPU over the host cache.
//! - Activations off the GPU (`--percent _ _ _ _ 0 A_CPU`): the runtime's
//!   [`runtime::gpu::activations`], OPT's glue in [`model`]
//!   ([`model::activation_parts`], [`model::GpuHidden`] as the buffer):
//!   each batch's hidden states in host memory or on disk, loaded into one
//!   of the block's two GPU buffers before each use and stored back beside
//!   the next batch's compute.
//!
//! Numerics: f16 storage, f32 accumulation everywhere. Matrix products go
//! through cuBLASLt (bias, ReLU and the residual add fused into the product's
//! epilogue) with cuBLAS as the fallback; the residual stream stays f32 between
//! blocks (the CPU reference is f32 throughout; this keeps the two within
//! rounding of f16 activations).
//!
//! Nothing here panics where CUDA is missing: [`unavailable_reason`] says why
//! the engine cannot run ("no CUDA driver: ..."), and [`Gpu::new`] returns
//! that as an [`Error::Gpu`].

pub mod cache;
pub mod generation;
pub mod model;
pub mod tiered_cache;
pub mod weights;

/// The family-neutral weight machinery, the runtime's (see [`runtime::gpu`]).
pub use runtime::gpu::{layer, packed, stream as offload};

use crate::error::Error;

pub use model::{GpuModel, WeightOrigin};
pub use ops::gpu::{available, blas, buffer, kernels, profile, unavailable_reason, view, Gpu};

/// A `tier-api` error (allocation, driver call) as the engine's.
pub fn tier_err(e: tier_api::Error) -> Error {
    Error::Tier(e)
}

/// A driver call's failure as the engine's error, naming the call.
pub fn driver_err(call: &str, e: tier_cuda::kernels::DriverError) -> Error {
    // A kernel or stream call, not a tier's memory: said as the GPU's.
    Error::Gpu(format!("GPU: {}", tier_cuda::kernels::driver_error("gpu", call, e)))
}
