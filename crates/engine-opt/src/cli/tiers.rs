//! The tiers present on this machine, built from the flags every
//! tier-facing subcommand shares.

use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use tier_api::{Device, HostMemKind};
use tier_disk::{BackendChoice, DiskConfig, DiskDevice};
use tier_host::{HostConfig, HostDevice, HostMemChoice, HostMemKindExt};

/// Flags that choose and size the memory tiers.
#[derive(Args, Debug, Clone)]
pub struct TierArgs {
    /// Directory for the disk tier's arena files (created and unlinked at
    /// once, so nothing is left behind). Default: the system's temporary directory.
    #[arg(long, value_name = "DIR")]
    pub offload_dir: Option<PathBuf>,

    /// Host memory kind: pinned, registered or pageable. Default: pinned where
    /// a CUDA driver is present and the platform allows it (also set by TIERLM_HOST_MEMORY).
    #[arg(long, value_name = "KIND", value_parser = parse_host_kind)]
    pub host_memory: Option<HostMemKind>,

    /// Disk I/O backend: auto (io_uring where it works, else threads), io_uring, threads.
    #[arg(long, value_name = "BACKEND", default_value = "auto", value_parser = parse_backend)]
    pub disk_backend: BackendChoice,

    /// I/O operations kept in flight per disk request.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub queue_depth: usize,
}

fn parse_host_kind(s: &str) -> Result<HostMemKind, String> {
    s.parse().map_err(|e: tier_api::Error| e.to_string())
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    s.parse().map_err(|e: tier_api::Error| e.to_string())
}

impl TierArgs {
    pub fn offload_dir(&self) -> PathBuf {
        self.offload_dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    pub fn disk_config(&self, id: u32, backend: BackendChoice) -> DiskConfig {
        DiskConfig { id, backend, queue_depth: self.queue_depth, ..DiskConfig::new(self.offload_dir()) }
    }
}

/// One tier with a user-facing note on how it was chosen.
pub struct Tier {
    pub device: Arc<dyn Device>,
    pub note: String,
}

/// Every tier this machine offers under `args`: the chosen host kind (and
/// pageable host memory beside it when that differs), and one disk device per
/// backend that works here (io_uring and the thread pool, or the one asked for).
pub fn present_tiers(args: &TierArgs) -> tier_api::Result<(HostMemChoice, Vec<Tier>)> {
    let choice = HostMemKind::choose(args.host_memory)?;
    let mut tiers = Vec::new();
    let mut kinds = vec![choice.kind];
    if choice.kind != HostMemKind::Pageable {
        kinds.push(HostMemKind::Pageable);
    }
    for kind in kinds {
        match HostDevice::new(HostConfig { kind, ..HostConfig::default() }) {
            Ok(d) => tiers.push(Tier { device: d, note: String::new() }),
            Err(e) if kind != HostMemKind::Pageable => {
                tiers.push(Tier { device: HostDevice::new(HostConfig::default())?, note: format!("{kind}: {e}") });
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let backends = match args.disk_backend {
        BackendChoice::Auto => vec![BackendChoice::IoUring, BackendChoice::Threads],
        one => vec![one],
    };
    let mut id = 0;
    for backend in backends {
        match DiskDevice::new(args.disk_config(id, backend)) {
            Ok(d) => {
                tiers.push(Tier { device: d, note: String::new() });
                id += 1;
            }
            Err(tier_api::Error::Unsupported { what, hint }) if args.disk_backend == BackendChoice::Auto => {
                eprintln!("note: {what} is not available ({hint}); using the thread-pool disk backend");
            }
            Err(e) => return Err(e),
        }
    }
    Ok((choice, tiers))
}
