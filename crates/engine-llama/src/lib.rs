//! The Llama family: `model_type` `llama`, `mistral`, `qwen2` and `qwen3`
//! (dense), written plainly over the op layer (`ops`).
//!
//! - [`config`]: the config.json of these models, validated, and presets
//!   with the published shapes;
//! - [`spec`]: the layer spec the runtime places and streams;
//! - [`model`]: the CPU forward pass over f16/bf16 weights in f32, its
//!   weights read with the `checkpoint` crate ([`model::open_checked`]
//!   checks a checkpoint against the spec before anything is read);
//! - [`device`]: the CPU model as the runtime's `ComputeDevice`, driven by
//!   the runtime's block schedule, sampling and progress;
//! - [`generate`]: greedy generation over a left-padded batch;
//! - [`gpu`]: the GPU engine (weights resident or streamed by the
//!   runtime, the cache on the GPU or placed over GPU, host memory and
//!   disk by the runtime's tiered cache) in the checkpoint's bf16 or f16;
//! - [`cpu_attention`]: its decode attention on the CPU over a host cache
//!   (`--cpu-cache-compute`, `--attn-sparsity`), grouped-query.

pub mod config;
pub mod cpu_attention;
pub mod device;
pub mod error;
pub mod finite;
pub mod generate;
pub mod gpu;
pub mod model;
pub mod spec;

pub use config::{Family, GenerationIds, LlamaConfig};
pub use error::{Error, Result};
pub use generate::{generate, prefill_logits, GenerateOptions};
pub use model::LlamaModel;
pub use spec::model_spec;
