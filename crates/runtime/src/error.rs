//! The runtime's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be made or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A memory tier (host memory, disk, GPU) could not be set up or failed.
    #[error("memory tier: {0}")]
    Tier(#[from] tier_api::Error),

    /// An operation of the op layer failed (shapes that disagree, memory
    /// that cannot be had).
    #[error("{0}")]
    Op(#[from] ops::Error),

    /// Values that are not finite where the output depends on them.
    #[error("{0}")]
    NonFinite(String),

    /// A model's spec is inconsistent or its sizes overflow.
    #[error("model spec: {0}")]
    Spec(String),

    /// A checkpoint does not hold what the model's spec says it must.
    #[error("{0}")]
    Checkpoint(String),

    /// A command-line or API argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The request needs the GPU engine, and this run is on the CPU engine.
    #[error("{0} needs the GPU engine; the CPU engine holds everything in host memory")]
    NeedsGpuEngine(String),

    /// The request needs parts of the tiered engine not built yet.
    #[error(
        "{0} needs the tiered engine, which does not do this yet; today tierlm runs on the CPU with the weights \
         and KV cache in host memory or partly on disk (--percent 0 W_CPU 0 C_CPU 0 100), or on a GPU with \
         weights, KV cache and activations on any tiers, --cpu-cache-compute, --attn-sparsity, --sep-layer, \
         --compress-weight and --compress-cache (a cache on one tier)"
    )]
    NeedsTieredEngine(String),

    /// A placement policy that the machine cannot hold, with the bytes each
    /// tier would need and what would help (see [`crate::plan`]).
    #[error("{0}")]
    PolicyDoesNotFit(String),

    /// No policy the search may choose fits the machine's budgets, with the
    /// bytes needed and available per tier (see [`crate::search`]).
    #[error("{0}")]
    NoPolicyFits(String),

    /// A prompt is empty, or does not fit in the model's positions.
    #[error("prompt {index}: {reason}")]
    Prompt { index: usize, reason: String },

    /// A token id is outside the vocabulary.
    #[error("prompt {index}: token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { index: usize, id: u32, vocab: usize },

    /// The tokenizer files could not be loaded or used (the message names
    /// the file).
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template is missing, ambiguous or failed to render.
    #[error("{0}")]
    ChatTemplate(String),

    /// The stages of a pipeline could not talk, or one sent what the
    /// schedule did not expect (see [`crate::pipeline`]).
    #[error("pipeline: {0}")]
    Pipeline(String),

    /// A peer stage of a pipeline failed or went away, so this one stopped
    /// rather than wait for it.
    #[error("pipeline stage {stage} stopped: {reason}")]
    StageStopped { stage: usize, reason: String },

    /// A stage of a pipeline failed: which one, its layers, and why.
    #[error("pipeline stage {stage} of {stages} (layers {first}..{last}) failed: {source}")]
    Stage {
        stage: usize,
        stages: usize,
        first: usize,
        last: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// SIGINT (Ctrl-C) or SIGTERM arrived (see [`crate::interrupt`]); by the
    /// time `tierlm` prints this, the unwind has dropped every tier's memory.
    #[error("interrupted (Ctrl-C or SIGTERM): generation stopped; pinned memory freed and offload files removed")]
    Interrupted,
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
