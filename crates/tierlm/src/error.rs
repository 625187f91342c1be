//! The command's one error type: a family's error, whichever family ran.

/// What `tierlm` reports: the OPT family's errors (which also carry the
/// command's own: files, flags, input lines) or the Llama family's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Opt(#[from] engine_opt::Error),
    #[error(transparent)]
    Llama(#[from] engine_llama::Error),
}

/// The command's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<runtime::Error> for Error {
    fn from(e: runtime::Error) -> Self {
        Error::Opt(e.into())
    }
}

impl Error {
    /// Whether the run was stopped by Ctrl-C or SIGTERM.
    pub fn is_interrupted(&self) -> bool {
        matches!(
            self,
            Error::Opt(engine_opt::Error::Interrupted)
                | Error::Llama(engine_llama::Error::Runtime(runtime::Error::Interrupted))
        )
    }
}
