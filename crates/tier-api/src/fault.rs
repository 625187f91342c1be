//! Allocation faults for tests: make the n-th GPU allocation or the n-th
//! page-locked host allocation of the process fail as the driver would
//! refuse it, so that a test can prove a run that loses an allocation in
//! the middle stops with a clear error and leaves nothing behind.
//!
//! `TIERLM_ALLOC_FAULTS=gpu:40,pinned:2-3` fails the GPU allocation of index
//! 40 and the page-locked (pinned or registered) allocations of index 2 and
//! 3, counted from 0 per site over the whole process. Honoured only where
//! [`ENABLED`]: debug builds, or builds with the `fault-injection` feature
//! (the GPU machine's test bundle); release builds ignore the variable, so a
//! user's environment cannot inject faults. The disk tier's
//! `TIERLM_DISK_FAULTS` follows the same rule.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Whether this build honours fault-injection variables.
pub const ENABLED: bool = cfg!(any(debug_assertions, feature = "fault-injection"));

/// The variable naming the allocations to fail.
pub const ALLOC_FAULTS_ENV: &str = "TIERLM_ALLOC_FAULTS";

/// Where an allocation is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocSite {
    /// Device memory (`cuMemAlloc`).
    Gpu,
    /// Page-locked host memory (`cuMemHostAlloc` or `cuMemHostRegister`).
    PageLocked,
}

impl AllocSite {
    fn index(self) -> usize {
        match self {
            AllocSite::Gpu => 0,
            AllocSite::PageLocked => 1,
        }
    }
}

/// The parsed variable: per site, inclusive index ranges to fail.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AllocFaults {
    ranges: [Vec<(u64, u64)>; 2],
}

impl AllocFaults {
    /// Parses `SITE:INDEX[-LAST],...` with SITE `gpu` or `pinned`.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |part: &str, why: &str| {
            Error::Config(format!(
                "{ALLOC_FAULTS_ENV}: {part:?}: {why} (expected SITE:INDEX or SITE:FIRST-LAST, SITE gpu or pinned, \
                 e.g. gpu:40,pinned:2-3)"
            ))
        };
        let mut faults = AllocFaults::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (site, range) = part.split_once(':').ok_or_else(|| bad(part, "no ':'"))?;
            let site = match site {
                "gpu" => AllocSite::Gpu,
                "pinned" => AllocSite::PageLocked,
                _ => return Err(bad(part, "SITE is gpu or pinned")),
            };
            let number = |s: &str| s.parse::<u64>().map_err(|_| bad(part, "INDEX is a whole number"));
            let (first, last) = match range.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => {
                    let n = number(range)?;
                    (n, n)
                }
            };
            if first > last {
                return Err(bad(part, "FIRST is past LAST"));
            }
            faults.ranges[site.index()].push((first, last));
        }
        Ok(faults)
    }

    fn hits(&self, site: AllocSite, index: u64) -> bool {
        self.ranges[site.index()].iter().any(|&(a, b)| (a..=b).contains(&index))
    }
}

static PLAN: OnceLock<std::result::Result<AllocFaults, String>> = OnceLock::new();
static COUNTS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Called by a tier before each allocation at `site`: `Ok(true)` when
/// [`ALLOC_FAULTS_ENV`] asks this one to fail (the tier then refuses it as
/// the driver would, saying it was injected), an error when the variable
/// does not parse. Costs one atomic increment where enabled, nothing
/// otherwise.
pub fn alloc_fails(site: AllocSite) -> Result<bool> {
    if !ENABLED {
        return Ok(false);
    }
    let plan = PLAN.get_or_init(|| match std::env::var(ALLOC_FAULTS_ENV) {
        Ok(spec) => AllocFaults::parse(&spec).map_err(|e| e.to_string()),
        Err(_) => Ok(AllocFaults::default()),
    });
    let plan = plan.as_ref().map_err(|e| Error::Config(e.clone()))?;
    let index = COUNTS[site.index()].fetch_add(1, Ordering::Relaxed);
    Ok(plan.hits(site, index))
}

/// The words a refused allocation carries when [`alloc_fails`] refused it.
pub const INJECTED: &str = "injected by TIERLM_ALLOC_FAULTS";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sites_and_ranges() {
        let f = AllocFaults::parse("gpu:40, pinned:2-3").unwrap();
        assert!(f.hits(AllocSite::Gpu, 40));
        assert!(!f.hits(AllocSite::Gpu, 41));
        assert!(!f.hits(AllocSite::PageLocked, 1));
        assert!(f.hits(AllocSite::PageLocked, 2) && f.hits(AllocSite::PageLocked, 3));
        assert_eq!(AllocFaults::parse("").unwrap(), AllocFaults::default());
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in ["gpu", "disk:1", "gpu:x", "gpu:5-2", "pinned:-1", "gpu:18446744073709551616"] {
            let e = AllocFaults::parse(bad).unwrap_err().to_string();
            assert!(e.contains(ALLOC_FAULTS_ENV) && e.contains(bad), "{bad}: {e}");
        }
    }
}
