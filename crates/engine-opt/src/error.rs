//! The one error type of the library: every failure that input can cause
//! (files, configurations, checkpoints, prompts, command-line values) ends
//! here, with a message that names what was wrong.

use std::path::PathBuf;

/// Everything that can go wrong in `engine-opt`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The model directory has no `config.json`.
    #[error("{dir}: no config.json in this directory (is it an OPT checkpoint directory?)")]
    MissingConfig { dir: PathBuf },

    /// A JSON file could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The configuration has a missing, out-of-range or inconsistent field.
    #[error("invalid OPT configuration: {0}")]
    Config(String),

    /// The model name is neither a known preset nor a directory.
    #[error("unknown model {name:?}: not a directory, and not a preset (known: {known})")]
    UnknownModel { name: String, known: String },

    /// The directory holds no checkpoint in a layout the reader takes.
    #[error("{dir}: no {} in this directory (is it a Hugging Face checkpoint directory?)", checkpoint::LOOKED_FOR)]
    MissingWeights { dir: PathBuf },

    /// A safetensors file is truncated or corrupt.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },

    /// A checkpoint could not be read: a corrupt or refused file (a PyTorch
    /// pickle naming a forbidden global), a tensor missing, misshaped or of
    /// an unconvertible type; the message names the file and the tensor.
    #[error(transparent)]
    Checkpoint(checkpoint::Error),

    /// A tensor the model needs is in no file of the checkpoint.
    #[error("tensor {name} is missing from the checkpoint")]
    MissingTensor { name: String },

    /// A tensor has the wrong shape for the configuration.
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, found: Vec<usize> },

    /// A tensor is stored in a type that is not f16, bf16 or f32.
    #[error("tensor {name} is stored as {dtype}; only F16, BF16 and F32 are supported")]
    UnsupportedDtype { name: String, dtype: String },

    /// The tokenizer files could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Text was given but the model directory has no tokenizer.
    #[error("{dir}: no tokenizer.json (nor vocab.json + merges.txt); give input_ids instead of text")]
    NoTokenizer { dir: PathBuf },

    /// A prompt is empty, or does not fit in the model's positions.
    #[error("prompt {index}: {reason}")]
    Prompt { index: usize, reason: String },

    /// A token id is outside the vocabulary.
    #[error("prompt {index}: token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { index: usize, id: u32, vocab: usize },

    /// A line of a JSONL input file is not what was expected.
    #[error("{path}:{line}: {reason}")]
    InputLine { path: PathBuf, line: usize, reason: String },

    /// A checkpoint does not hold a tensor the configuration says it must,
    /// in its shape and a type the engine reads (message names the tensor,
    /// the file and what was expected).
    #[error("{0}")]
    CheckpointMismatch(String),
    /// A weight or a logit is infinite or NaN (see `finite`).
    #[error("{0}")]
    NonFinite(String),

    /// A command-line or API argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// What the runtime refuses: a policy that does not fit the machine
    /// (with the bytes each tier would need and what would help), or a
    /// request that needs the GPU engine or parts of the tiered engine not
    /// built yet (see `runtime::Error`).
    #[error(transparent)]
    Runtime(runtime::Error),

    /// The GPU engine cannot run or failed: no usable driver or library
    /// ("no CUDA driver: ..."), GPU memory exhausted, or a CUDA call that
    /// failed, with the call named.
    #[error("{0}")]
    Gpu(String),

    /// A thread the engine started to work beside it panicked.
    #[error("a worker thread failed: {0}")]
    Worker(String),

    /// A memory tier (host memory, disk) failed: allocation, I/O, a full disk.
    #[error("memory tier: {0}")]
    Tier(#[from] tier_api::Error),

    /// The run would not fit in this machine's memory.
    #[error("not enough host memory: {what} needs {need_gib:.1} GiB, {avail_gib:.1} GiB available")]
    OutOfMemory { what: String, need_gib: f64, avail_gib: f64 },

    /// SIGINT (Ctrl-C) or SIGTERM arrived (see `interrupt`); by the time
    /// `tierlm` prints this, the unwind has dropped every tier's memory.
    #[error("interrupted (Ctrl-C or SIGTERM): generation stopped; pinned memory freed and offload files removed")]
    Interrupted,
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<ops::Error> for Error {
    fn from(e: ops::Error) -> Self {
        match e {
            ops::Error::Gpu(m) => Error::Gpu(m),
            ops::Error::Tier(e) => Error::Tier(e),
            other => Error::InvalidArgument(other.to_string()),
        }
    }
}

impl From<runtime::Error> for Error {
    fn from(e: runtime::Error) -> Self {
        match e {
            runtime::Error::Io { path, source } => Error::Io { path, source },
            runtime::Error::Tier(e) => Error::Tier(e),
            runtime::Error::Interrupted => Error::Interrupted,
            runtime::Error::Spec(m) => Error::Config(m),
            runtime::Error::Checkpoint(m) => Error::CheckpointMismatch(m),
            runtime::Error::Prompt { index, reason } => Error::Prompt { index, reason },
            runtime::Error::TokenOutOfRange { index, id, vocab } => Error::TokenOutOfRange { index, id, vocab },
            runtime::Error::InvalidArgument(m) => Error::InvalidArgument(m),
            runtime::Error::Op(e) => Error::from(e),
            runtime::Error::NonFinite(m) => Error::NonFinite(m),
            runtime::Error::Tokenizer(m) => Error::Tokenizer(m),
            other @ (runtime::Error::NeedsGpuEngine(_)
            | runtime::Error::NeedsTieredEngine(_)
            | runtime::Error::PolicyDoesNotFit(_)
            | runtime::Error::ChatTemplate(_)
            | runtime::Error::NoPolicyFits(_)
            | runtime::Error::Pipeline(_)
            | runtime::Error::StageStopped { .. }
            | runtime::Error::Stage { .. }) => Error::Runtime(other),
        }
    }
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
