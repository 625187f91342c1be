//! The one error type of the op layer.

/// What went wrong in an op: always a caller's mismatch of sizes or values,
/// named with the op and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Slice lengths or tensor shapes that do not agree.
    #[error("{op}: {what}")]
    Shape { op: &'static str, what: String },
    /// A size whose element or byte count overflows, or that cannot be
    /// allocated.
    #[error("{what}: the size overflows usize or cannot be allocated")]
    Overflow { what: String },
    /// A token id outside the embedding table.
    #[error("embedding: token id {id} is outside the vocabulary of {vocab} rows")]
    TokenOutOfRange { id: u32, vocab: usize },
    /// A parameter with a value the op cannot use.
    #[error("{op}: {what}")]
    Invalid { op: &'static str, what: String },
    /// The GPU cannot run ("no CUDA driver: ..."), its memory is exhausted,
    /// a CUDA call failed (named), or a GPU op was given buffers that do
    /// not fit what it would touch.
    #[error("{0}")]
    Gpu(String),
    /// A memory tier failed under a GPU op: out of memory, a refused
    /// allocation, or the I/O of a host or disk tier the op's data crossed.
    #[error("memory tier: {0}")]
    Tier(#[from] tier_api::Error),
}

/// The op layer's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn shape(op: &'static str, what: impl Into<String>) -> Error {
    Error::Shape { op, what: what.into() }
}

/// Fails with a shape error unless `got == want`.
pub(crate) fn check_len(op: &'static str, name: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(shape(op, format!("{name} has {got} values, expected {want}")))
    }
}

/// `a * b`, or an overflow error naming `what`.
pub(crate) fn mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::Overflow { what: what.into() })
}
