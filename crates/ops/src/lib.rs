//! # ops: the operations a model family computes with
//!
//! This room holds the op layer every model family is written over, and
//! nothing that names a family:
//!
//! - [`cpu`]: the CPU reference (f16/bf16/f32 weights, f32 arithmetic):
//!   linear with bias and activation, RMSNorm, LayerNorm, rotary embeddings
//!   with `llama3` and `linear` scaling, SiLU·up, ReLU, embedding lookup,
//!   and attention over a KV cache with grouped-query heads; its names are
//!   also exported at the crate's root.
//! - [`gpu`]: one GPU as the families use it ([`gpu::Gpu`]: the `tier-cuda`
//!   device, a compute stream, the cuBLAS and cuBLASLt handles and the
//!   NVRTC kernels), typed device buffers ([`gpu::buffer::DevBuf`], counted
//!   against the GPU tier's account), matrix products with fused bias,
//!   activation and residual epilogues ([`gpu::blas`]), the kernels
//!   ([`gpu::kernels`]: embeddings with a family's position offset, layer
//!   norm with its epsilon, the KV cache's store, prefill and decode
//!   attention, sampling), the f16/bf16 kernels of rotary, grouped-query
//!   decoders ([`gpu::llm`], compiled on first use) and a profiler.
//!
//! It may use `tier-api`, `tier-host` and `tier-cuda`, and it is one of the
//! two places (with `tier-cuda`) that call `cudarc`. Families and the
//! runtime use the types here; nothing here uses them.
//!
//! Every failure is an [`Error`].

pub mod cpu;
mod error;
pub mod gpu;

pub use cpu::*;
pub use error::{Error, Result};
