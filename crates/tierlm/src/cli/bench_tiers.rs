//! `tierlm bench-tiers`: bandwidth of every copy path between the tiers
//! present on this machine, beside the baselines they must beat.
//!
//! Disk rows (both backends) come with a buffered, page-cache-evicted read of
//! the same amount of data through a memory map (what FlexGen's disk tier
//! does). GPU rows, where there is a GPU, come with a raw `cuMemcpy` between
//! `cuMemHostAlloc` memory and the GPU measured in the same run, and the
//! pinned-memory residency check.

use super::tiers::{parse_size, TierArgs};
use clap::Args;
use std::sync::Arc;
use tier_api::{Device, Error, HostMemKind};
use tier_cuda::bench as gpu_bench;

#[derive(Args, Debug)]
pub struct BenchTiersArgs {
    #[command(flatten)]
    pub tiers: TierArgs,

    /// Bytes moved per measurement (suffixes K, M, G for KiB, MiB, GiB).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub bytes: u64,

    /// Bytes per disk I/O operation.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    pub block: u64,

    /// Timed transfers per GPU path (the median is reported).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub reps: usize,

    /// Size of the pinned-memory residency check (0 to skip it).
    #[arg(long, value_name = "SIZE", default_value = "4097M", value_parser = parse_size)]
    pub rss_check: u64,

    /// Also sweep the staging ring's shapes and the disk reads in flight (for tuning).
    #[arg(long)]
    pub sweep: bool,

    /// Print the disk rows as JSON.
    #[arg(long)]
    pub json: bool,
}

fn to_usize(v: u64, what: &str) -> tier_api::Result<usize> {
    usize::try_from(v).map_err(|_| Error::Config(format!("{what} {v} is too large for this machine")))
}

pub fn run(args: BenchTiersArgs) -> tier_api::Result<()> {
    let dir = args.tiers.offload_dir();
    // The run holds --bytes in host memory and on disk at once: refuse up
    // front what the machine cannot hold, rather than fail (or swap) midway.
    tier_disk::check_offload_dir(&dir)?;
    if let Some(avail) = engine_opt::memory::available_bytes() {
        // On tmpfs the "disk" copy lives in host memory too.
        let tmpfs = tier_disk::in_memory_fs(&dir);
        let need = if tmpfs { args.bytes.saturating_mul(2) } else { args.bytes };
        if need > avail {
            return Err(Error::Config(format!(
                "--bytes {} needs {need} bytes of host memory{}, and {avail} bytes are available; give a smaller \
                 --bytes{}",
                args.bytes,
                if tmpfs { " (the offload directory is on tmpfs, in memory too)" } else { "" },
                if tmpfs { " or an --offload-dir on a disk" } else { "" },
            )));
        }
    }
    tier_disk::check_free(&dir, args.bytes, "bench-tiers' test data (--bytes)")?;
    let config = tier_disk::bench::BenchConfig {
        bytes: args.bytes,
        block: to_usize(args.block, "block size")?,
        queue_depth: args.tiers.queue_depth,
        ..tier_disk::bench::BenchConfig::new(&dir)
    };
    let rows = tier_disk::bench::run(&config)?;
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "path": r.name, "detail": r.detail, "direction": r.direction.to_string(),
                    "host_pages": r.host_pages.to_string(),
                    "bytes": r.bytes, "seconds": r.seconds, "gbps": r.gbps,
                })
            })
            .collect();
        println!("{:#}", serde_json::Value::Array(rows));
    } else {
        println!("disk tier, {}:", dir.display());
        print!("{}", tier_disk::bench::table(&rows));
    }

    // With --json, stdout holds the JSON alone: everything else goes to stderr.
    let json = args.json;
    macro_rules! say {
        ($($t:tt)*) => {
            if json { eprintln!($($t)*) } else { println!($($t)*) }
        };
    }
    macro_rules! say_part {
        ($($t:tt)*) => {
            if json { eprint!($($t)*) } else { print!($($t)*) }
        };
    }
    say!("\ngpu: {}", tier_cuda::probe_message());
    if tier_cuda::probe()?.is_none() {
        return Ok(());
    }
    if args.rss_check > 0 {
        for kind in [HostMemKind::Pinned, HostMemKind::Registered] {
            let check = gpu_bench::pinned_rss_check(kind, to_usize(args.rss_check, "residency check size")?)?;
            say!("residency {check} => {}", if check.passes() { "ok" } else { "MISS" });
        }
    }
    let disk = tier_disk::DiskDevice::new(args.tiers.disk_config(0, args.tiers.disk_backend))?;
    let gpu_config = gpu_bench::BenchConfig {
        bytes: to_usize(args.bytes, "transfer size")?,
        reps: args.reps,
        disk: Some(disk.clone() as Arc<dyn Device>),
        ..gpu_bench::BenchConfig::default()
    };
    let report = gpu_bench::run(&gpu_config)?;
    say_part!("{report}");
    let misses = report.misses();
    if misses.is_empty() {
        say!("all GPU path targets met");
    } else {
        say!("targets missed: {}", misses.join("; "));
    }
    if args.sweep {
        let rows = gpu_bench::disk_read_sweep(&gpu_config, disk.as_ref(), &[1, 2, 4, 8])?;
        let shapes: Vec<tier_cuda::StagingConfig> =
            [(16, 8, 12), (12, 8, 12), (16, 8, 8), (24, 4, 12), (8, 16, 8), (16, 8, 16)]
                .iter()
                .map(|&(slots, mib, helpers)| tier_cuda::StagingConfig {
                    slots,
                    slot_bytes: mib << 20,
                    helpers,
                    disk_reads: slots.min(4),
                    ..tier_cuda::StagingConfig::default()
                })
                .collect();
        let rows = rows.into_iter().chain(gpu_bench::relay_sweep(&gpu_config, &shapes)?);
        for r in rows {
            say!("{:<60} {:>8.2} GB/s (best {:.2}, worst {:.2})", r.name, r.gbps(), r.best_gbps(), r.worst_gbps());
        }
    }
    Ok(())
}
