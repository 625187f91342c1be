//! The tiers present on this machine, built from the flags every
//! tier-facing subcommand shares.

use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use tier_api::{CopyConfig, CopyMatrix, Device, HostMemKind};
use tier_cuda::{GpuConfig, GpuDevice};
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

    /// GPU memory the GPU tier may use (e.g. 16G to act as a 16 GB card). Default: all of it.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub gpu_mem: Option<u64>,
}

fn parse_host_kind(s: &str) -> Result<HostMemKind, String> {
    s.parse().map_err(|e: tier_api::Error| e.to_string())
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    s.parse().map_err(|e: tier_api::Error| e.to_string())
}

/// Parses `123`, `64K`, `1M`, `2G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size like 4096, 64K, 1M or 2G"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{s:?} is too large"))
}

impl TierArgs {
    pub fn offload_dir(&self) -> PathBuf {
        self.offload_dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    pub fn disk_config(&self, id: u32, backend: BackendChoice) -> DiskConfig {
        DiskConfig { id, backend, queue_depth: self.queue_depth, ..DiskConfig::new(self.offload_dir()) }
    }

    pub fn gpu_config(&self) -> GpuConfig {
        // A stream for each copy worker and one more for the copies the
        // engine's own thread runs ahead of the queue (hidden states between
        // layers), so those never wait for a worker's stream.
        GpuConfig { budget: self.gpu_mem, streams: runtime::tiers::COPY_WORKERS + 1, ..GpuConfig::default() }
    }
}

/// A tier, or a tier that could not be set up and why.
pub enum Tier {
    Present(Arc<dyn Device>),
    Missing { name: String, why: String },
}

/// What this machine offers under `args`.
pub struct Tiers {
    /// The host memory kind the engine would use, and why.
    pub host_choice: HostMemChoice,
    /// One line on the GPU: which one, or why there is none.
    pub gpu_message: String,
    pub tiers: Vec<Tier>,
}

impl Tiers {
    pub fn devices(&self) -> impl Iterator<Item = &Arc<dyn Device>> {
        self.tiers.iter().filter_map(|t| match t {
            Tier::Present(d) => Some(d),
            Tier::Missing { .. } => None,
        })
    }
}

/// A copy matrix with every route this build has (the GPU routes accept
/// nothing where there is no GPU).
pub fn copy_matrix() -> tier_api::Result<CopyMatrix> {
    tier_cuda::copy_matrix(CopyConfig::default())
}

/// Every tier this machine offers: each host memory kind, one disk device
/// per backend that works here (or the one asked for), and every GPU.
pub fn present_tiers(args: &TierArgs) -> tier_api::Result<Tiers> {
    let host_choice = HostMemKind::choose(args.host_memory)?;
    let mut tiers = Vec::new();
    for kind in HostMemKind::ALL {
        match HostDevice::new(HostConfig { kind, ..HostConfig::default() }) {
            Ok(d) => tiers.push(Tier::Present(d)),
            Err(e) if kind != HostMemKind::Pageable => {
                tiers.push(Tier::Missing { name: format!("host:{kind}"), why: e.to_string() })
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
                tiers.push(Tier::Present(d));
                id += 1;
            }
            Err(e @ tier_api::Error::Unsupported { .. }) if args.disk_backend == BackendChoice::Auto => {
                tiers.push(Tier::Missing { name: format!("disk ({backend})"), why: e.to_string() })
            }
            Err(e) => return Err(e),
        }
    }
    let gpu_message = tier_cuda::probe_message();
    for gpu in tier_cuda::open_all(&args.gpu_config())? {
        tiers.push(Tier::Present(gpu as Arc<dyn Device>));
    }
    // A kind asked for (--host-memory, TIERLM_HOST_MEMORY) that this machine
    // lacks: say that the engine falls back to pageable memory, rather than
    // claim the kind listed as unavailable.
    let wanted = format!("host:{}", host_choice.kind);
    let host_choice = match tiers.iter().find_map(|t| match t {
        Tier::Missing { name, why } if *name == wanted => Some(why.clone()),
        _ => None,
    }) {
        Some(why) => HostMemChoice {
            kind: HostMemKind::Pageable,
            reason: format!(
                "fell back from {}, {}, which is unavailable here: {why}",
                host_choice.kind, host_choice.reason
            ),
        },
        None => host_choice,
    };
    Ok(Tiers { host_choice, gpu_message, tiers })
}

/// The first GPU, if any, under `args`.
pub fn first_gpu(args: &TierArgs) -> tier_api::Result<Option<Arc<GpuDevice>>> {
    Ok(tier_cuda::open_all(&args.gpu_config())?.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999999999G").is_err());
    }
}
