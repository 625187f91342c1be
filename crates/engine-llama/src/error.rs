//! The one error type of the Llama family's crate.

use std::path::PathBuf;

/// What went wrong, naming the field, tensor or file and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not valid JSON of the expected form: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// A config.json field with a value this crate does not support.
    #[error("config.json: `{field}` {message}")]
    Config { field: String, message: String },
    #[error("config.json: `model_type` \"{got}\" is not supported; supported: {}", SUPPORTED_MODEL_TYPES.join(", "))]
    UnsupportedModelType { got: String },
    /// A checkpoint tensor that is missing or not as the config says.
    #[error("checkpoint {file}: tensor `{tensor}`: {message}")]
    Tensor { file: String, tensor: String, message: String },
    /// A checkpoint directory or file that cannot be used.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A generation request the model cannot serve.
    #[error("generation: {0}")]
    Generate(String),
    #[error(transparent)]
    Op(#[from] ops::Error),
    /// The runtime's refusals: a checkpoint that does not match the layer
    /// spec, a prompt it refuses, a tokenizer or chat template that fails,
    /// an interrupt.
    #[error(transparent)]
    Runtime(#[from] runtime::Error),
    /// A checkpoint's files cannot be opened or read.
    #[error(transparent)]
    Read(#[from] checkpoint::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The `model_type`s this crate runs.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

pub(crate) fn config(field: &str, message: impl Into<String>) -> Error {
    Error::Config { field: field.into(), message: message.into() }
}
