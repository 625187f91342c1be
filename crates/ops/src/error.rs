//! The op layer's one error type.

/// Everything that can go wrong in an op.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The GPU cannot run ("no CUDA driver: ..."), its memory is exhausted,
    /// a CUDA call failed (named), or an op was given buffers that do not
    /// fit what it would touch.
    #[error("{0}")]
    Gpu(String),
}

/// The op layer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
