//! Host↔disk bandwidth of the disk tier against a memory-mapped baseline.
//!
//! `cargo run --release -p tier-disk --example disk_bench -- DIR [--bytes MIB] [--block KIB] [--depth N] [--runs N]
//! [--backend io_uring|threads] [--pages small|huge] [--no-baseline]`

use tier_disk::bench::{run, table, BenchConfig, HostPages};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else { usage("a directory is needed") };
    let mut config = BenchConfig::new(dir);
    let mut runs = 1;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--no-baseline" => {
                config.baseline = false;
                continue;
            }
            "--backend" => {
                match args.next().map(|b| b.parse()) {
                    Some(Ok(b)) => config.backends = vec![b],
                    _ => usage("--backend needs io_uring or threads"),
                }
                continue;
            }
            "--pages" => {
                config.host_pages = match args.next().as_deref() {
                    Some("small") => vec![HostPages::Small],
                    Some("huge") => vec![HostPages::Huge],
                    _ => usage("--pages needs small or huge"),
                };
                continue;
            }
            _ => {}
        }
        let value: u64 = match args.next().and_then(|v| v.parse().ok()) {
            Some(v) => v,
            None => usage(&format!("{flag} needs a number")),
        };
        match flag.as_str() {
            "--bytes" => config.bytes = value << 20,
            "--block" => config.block = (value << 10) as usize,
            "--depth" => config.queue_depth = value as usize,
            "--runs" => runs = value,
            other => usage(&format!("unknown flag {other}")),
        }
    }
    for i in 1..=runs {
        match run(&config) {
            Ok(rows) => println!("run {i}:\n{}", table(&rows)),
            Err(e) => {
                eprintln!("disk_bench: {e}");
                std::process::exit(1);
            }
        }
    }
}

fn usage(why: &str) -> ! {
    eprintln!("disk_bench: {why}");
    eprintln!(
        "usage: disk_bench DIR [--bytes MIB] [--block KIB] [--depth N] [--runs N] [--backend io_uring|threads] \
         [--pages small|huge] [--no-baseline]"
    );
    std::process::exit(2);
}
