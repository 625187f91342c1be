//! Choosing the host memory kind for this platform.

use std::fmt;
use tier_api::{Error, HostMemKind, Result};

/// The environment variable that overrides the automatic choice.
pub const HOST_MEMORY_ENV: &str = "TIERLM_HOST_MEMORY";

/// A host memory kind and why it was chosen, for users to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostMemChoice {
    pub kind: HostMemKind,
    pub reason: String,
}

impl fmt::Display for HostMemChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.reason)
    }
}

/// `HostMemKind::auto()` and friends, which need platform knowledge that
/// `tier-api` does not have.
pub trait HostMemKindExt {
    /// The kind for this machine: the `TIERLM_HOST_MEMORY` override if set,
    /// else pageable under WSL (it cannot pin) or without a CUDA driver, else
    /// pinned.
    fn auto() -> Result<HostMemChoice>;

    /// Like [`auto`](Self::auto), but an explicit choice (a command-line flag)
    /// wins over the environment.
    fn choose(flag: Option<HostMemKind>) -> Result<HostMemChoice>;
}

impl HostMemKindExt for HostMemKind {
    fn auto() -> Result<HostMemChoice> {
        Self::choose(None)
    }

    fn choose(flag: Option<HostMemKind>) -> Result<HostMemChoice> {
        let env = std::env::var(HOST_MEMORY_ENV).ok();
        decide(flag, env.as_deref(), is_wsl(), cuda_driver_present())
    }
}

/// The decision itself, separated from probing the machine so it can be tested.
fn decide(flag: Option<HostMemKind>, env: Option<&str>, wsl: bool, driver: bool) -> Result<HostMemChoice> {
    if let Some(kind) = flag {
        return Ok(HostMemChoice { kind, reason: "chosen with --host-memory".into() });
    }
    if let Some(value) = env.filter(|v| !v.trim().is_empty()) {
        let kind = value.parse::<HostMemKind>().map_err(|_| {
            Error::Config(format!("{HOST_MEMORY_ENV}={value:?} is not one of pinned, registered, pageable"))
        })?;
        return Ok(HostMemChoice { kind, reason: format!("chosen with {HOST_MEMORY_ENV}") });
    }
    if wsl {
        return Ok(HostMemChoice {
            kind: HostMemKind::Pageable,
            reason: "WSL cannot pin host memory; GPU copies relay through pinned staging".into(),
        });
    }
    if !driver {
        return Ok(HostMemChoice {
            kind: HostMemKind::Pageable,
            reason: "no usable CUDA driver or GPU on this machine".into(),
        });
    }
    Ok(HostMemChoice { kind: HostMemKind::Pinned, reason: "CUDA driver present".into() })
}

/// Whether this is Windows Subsystem for Linux, where pinning is not supported.
pub fn is_wsl() -> bool {
    if std::env::var_os("WSL_DISTRO_NAME").is_some() || std::env::var_os("WSL_INTEROP").is_some() {
        return true;
    }
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| {
            let s = s.to_ascii_lowercase();
            s.contains("microsoft") || s.contains("wsl")
        })
        .unwrap_or(false)
}

/// Whether a usable CUDA driver with at least one device is present. Loads
/// libcuda only after checking that it exists, and creates no context.
pub(crate) fn cuda_driver_present() -> bool {
    crate::cuda::driver().is_ready()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_env_beats_platform() {
        let c = decide(Some(HostMemKind::Registered), Some("pageable"), true, false).unwrap();
        assert_eq!(c.kind, HostMemKind::Registered);
        let c = decide(None, Some("Pinned"), true, false).unwrap();
        assert_eq!(c.kind, HostMemKind::Pinned);
        assert!(c.reason.contains(HOST_MEMORY_ENV));
    }

    #[test]
    fn platform_defaults() {
        assert_eq!(decide(None, None, true, true).unwrap().kind, HostMemKind::Pageable);
        assert_eq!(decide(None, None, false, false).unwrap().kind, HostMemKind::Pageable);
        assert_eq!(decide(None, None, false, true).unwrap().kind, HostMemKind::Pinned);
        assert_eq!(decide(None, Some("  "), false, true).unwrap().kind, HostMemKind::Pinned);
    }

    #[test]
    fn bad_env_value_is_an_error() {
        let err = decide(None, Some("locked"), false, true).unwrap_err();
        assert!(err.to_string().contains("TIERLM_HOST_MEMORY"), "{err}");
    }
}
