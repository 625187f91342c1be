//! The one error type of the crate. Every message names the file (or the
//! directory) and, where there is one, the tensor, and says what to do.

use std::path::PathBuf;

/// The four checkpoint layouts [`crate::Checkpoint::open`] accepts, as the
/// error of a directory with none of them lists them.
pub const LOOKED_FOR: &str =
    "model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json";

/// Everything that can go wrong reading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The directory holds no checkpoint in any layout this crate reads.
    #[error(
        "{dir}: no {LOOKED_FOR} in this directory; give a directory that holds a Hugging Face checkpoint in \
         safetensors or PyTorch format"
    )]
    NotFound { dir: PathBuf },

    /// An index file is not valid JSON or not the `{"weight_map": {...}}`
    /// shape Hugging Face writes.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// An index names a shard that is not a plain file name, or places a
    /// tensor in a shard that does not hold it.
    #[error("{path}: {reason}; the checkpoint is incomplete or its index does not belong to it (re-download it)")]
    Index { path: PathBuf, reason: String },

    /// A safetensors file is truncated or corrupt.
    #[error("{path}: not a valid safetensors file: {reason} (re-download or re-convert it)")]
    Safetensors { path: PathBuf, reason: String },

    /// A PyTorch file is truncated or corrupt: a broken zip, a pickle this
    /// reader does not understand, a storage shorter than its tensor.
    #[error("{path}: not a valid PyTorch checkpoint: {reason} (re-download it, or convert it to safetensors)")]
    PyTorch { path: PathBuf, reason: String },

    /// A PyTorch file in the legacy (pre-1.6, not zip) format.
    #[error(
        "{path}: not a zip archive, so not torch.save's format since torch 1.6 (it is PyTorch's legacy format, or \
         not a PyTorch file at all); re-save it with a newer torch (torch.save(torch.load(f), f)) or convert it to \
         safetensors"
    )]
    LegacyPyTorch { path: PathBuf },

    /// The pickle of a PyTorch file names a Python global outside the
    /// allowlist (anything but tensors, storages and `OrderedDict`). Nothing
    /// after it is read, and nothing is ever run.
    #[error(
        "{path}: the pickle refers to {global}, which a checkpoint of tensors has no use for; refused without \
         running anything (only OrderedDict, torch._utils._rebuild_tensor*/_rebuild_parameter and torch storage \
         types are read). If the file is a genuine checkpoint, convert it to safetensors with a trusted tool"
    )]
    ForbiddenGlobal { path: PathBuf, global: String },

    /// A tensor cannot be read as stored (non-contiguous, outside its
    /// storage, a size that overflows).
    #[error("{path}: tensor {name}: {reason}")]
    Tensor { path: PathBuf, name: String, reason: String },

    /// A tensor the caller asked for is in no file of the checkpoint.
    #[error("tensor {name} is missing from the checkpoint in {dir} (is it a checkpoint of this model?)")]
    MissingTensor { name: String, dir: PathBuf },

    /// A tensor has another shape than the caller expects.
    #[error(
        "{path}: tensor {name} has shape {found:?}, expected {expected:?} (is the config.json this checkpoint's?)"
    )]
    TensorShape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },

    /// A tensor is stored in a type that does not convert to the one asked.
    #[error("{path}: tensor {name} is stored as {dtype}; only F16, BF16 and F32 convert to {target}")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String, target: &'static str },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
