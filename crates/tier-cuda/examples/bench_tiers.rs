//! Measures every GPU copy path and the pinned-memory residency check.
//!
//! `bench_tiers [--mib N] [--reps N] [--disk-dir DIR] [--slots N] [--slot-mib N]
//! [--helpers N] [--disk-reads N] [--rss-mib N] [--no-rss] [--sweep] [--disk-sweep]
//! [--disk-bench]`
//!
//! The disk paths run against tier-disk's `DiskDevice` in `--disk-dir`.

use std::sync::Arc;
use tier_api::{Device, HostMemKind};
use tier_cuda::bench::{self, BenchConfig};
use tier_cuda::StagingConfig;

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_tiers: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| -> Result<Option<usize>, String> {
        match args.iter().position(|a| a == name) {
            None => Ok(None),
            Some(i) => args
                .get(i + 1)
                .ok_or(format!("{name} needs a value"))?
                .parse()
                .map(Some)
                .map_err(|e| format!("{name}: {e}")),
        }
    };
    let text = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();

    println!("{}", tier_cuda::probe_message());
    if tier_cuda::probe().map_err(|e| e.to_string())?.is_none() {
        return Ok(());
    }
    let mut staging = StagingConfig::default();
    if let Some(v) = value("--slots")? {
        staging.slots = v;
    }
    if let Some(v) = value("--slot-mib")? {
        staging.slot_bytes = v << 20;
    }
    if let Some(v) = value("--helpers")? {
        staging.helpers = v;
    }
    if let Some(v) = value("--disk-reads")? {
        staging.disk_reads = v;
    }
    staging.disk_reads = staging.disk_reads.min(staging.slots);
    let mut config = BenchConfig { staging, ..BenchConfig::default() };
    if let Some(v) = value("--mib")? {
        config.bytes = v << 20;
    }
    if let Some(v) = value("--reps")? {
        config.reps = v;
    }
    if let Some(dir) = text("--disk-dir") {
        let disk = tier_disk::DiskDevice::new(tier_disk::DiskConfig::new(dir)).map_err(|e| e.to_string())?;
        println!("{}", disk.describe());
        config.disk = Some(disk as Arc<dyn Device>);
    }

    if !flag("--no-rss") {
        let mib = value("--rss-mib")?.unwrap_or(4097);
        for kind in [HostMemKind::Pinned, HostMemKind::Registered] {
            let check = bench::pinned_rss_check(kind, mib << 20).map_err(|e| e.to_string())?;
            println!("rss check {check} => {}", if check.passes() { "PASS" } else { "FAIL" });
        }
    }

    let report = bench::run(&config).map_err(|e| e.to_string())?;
    println!("{report}");
    let misses = report.misses();
    if misses.is_empty() {
        println!("all targets met");
    } else {
        println!("targets missed: {}", misses.join("; "));
    }

    if let (true, Some(disk)) = (flag("--disk-sweep"), &config.disk) {
        let rows = bench::disk_read_sweep(&config, disk.as_ref(), &[1, 2, 4, 8]).map_err(|e| e.to_string())?;
        let report = bench::BenchReport { rows, ..report.clone() };
        for r in &report.rows {
            let vs = report.ratio(r).map(|(x, _)| format!("{:.1}%", x * 100.0)).unwrap_or_default();
            println!(
                "{:<44} {:>7.2} GB/s (best {:.2}, worst {:.2}) {vs}",
                r.name,
                r.gbps(),
                r.best_gbps(),
                r.worst_gbps()
            );
        }
    }

    if let (true, Some(dir)) = (flag("--disk-bench"), text("--disk-dir")) {
        let rows = tier_disk::bench::run(&tier_disk::bench::BenchConfig::new(dir)).map_err(|e| e.to_string())?;
        println!("tier-disk's own bench, same run:\n{}", tier_disk::bench::table(&rows));
    }

    if flag("--sweep") {
        let shapes: Vec<StagingConfig> = [(16, 8, 12), (12, 8, 12), (16, 8, 8), (24, 4, 12), (8, 16, 8), (16, 8, 16)]
            .iter()
            .map(|&(slots, mib, helpers)| StagingConfig {
                slots,
                slot_bytes: mib << 20,
                helpers,
                disk_reads: slots.min(4),
                ..StagingConfig::default()
            })
            .collect();
        let rows = bench::relay_sweep(&config, &shapes).map_err(|e| e.to_string())?;
        for r in rows {
            println!("{:<60} {:>8.2} GB/s (best {:.2}, worst {:.2})", r.name, r.gbps(), r.best_gbps(), r.worst_gbps());
        }
    }
    Ok(())
}
