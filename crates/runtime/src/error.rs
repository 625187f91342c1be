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
