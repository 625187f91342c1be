//! The Llama family: `model_type` `llama`, `mistral`, `qwen2` and `qwen3`
//! (dense), written plainly over the op layer (`ops`).
//!
//! - [`config`]: the config.json of these models, validated, and presets
//!   with the published shapes;
//! - [`spec`]: the layer spec the runtime places and streams;
//! - [`weights`]: tensors of a safetensors checkpoint directory;
//! - [`model`]: the CPU forward pass over f16/bf16 weights in f32;
//! - [`generate`]: greedy generation over a left-padded batch.

pub mod config;
pub mod error;
pub mod generate;
pub mod model;
pub mod spec;
pub mod weights;

pub use config::{Family, LlamaConfig};
pub use error::{Error, Result};
pub use generate::{generate, prefill_logits, GenerateOptions};
pub use model::LlamaModel;
pub use spec::model_spec;
