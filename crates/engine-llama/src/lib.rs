//! The Llama family: `model_type` `llama`, `mistral`, `qwen2` and `qwen3`
//! (dense), written plainly over the op layer (`ops`).
//!
//! - [`config`]: the config.json of these models, validated, and presets
//!   with the published shapes;
//! - [`spec`]: the layer spec the runtime places and streams.

pub mod config;
pub mod error;
pub mod spec;

pub use config::{Family, LlamaConfig};
pub use error::{Error, Result};
pub use spec::model_spec;
