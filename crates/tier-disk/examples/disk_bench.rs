//! Host↔disk bandwidth of the disk tier against a memory-mapped baseline.
//!
//! `cargo run --release -p tier-disk --example disk_bench -- DIR [--bytes MIB] [--block KIB] [--depth N] [--runs N]`

use tier_disk::bench::{run, table, BenchConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: disk_bench DIR [--bytes MIB] [--block KIB] [--depth N] [--runs N]");
        std::process::exit(2);
    };
    let mut config = BenchConfig::new(dir);
    let mut runs = 1;
    while let Some(flag) = args.next() {
        let value: u64 = match args.next().and_then(|v| v.parse().ok()) {
            Some(v) => v,
            None => {
                eprintln!("{flag} needs a number");
                std::process::exit(2);
            }
        };
        match flag.as_str() {
            "--bytes" => config.bytes = value << 20,
            "--block" => config.block = (value << 10) as usize,
            "--depth" => config.queue_depth = value as usize,
            "--runs" => runs = value,
            other => {
                eprintln!("unknown flag {other}");
                std::process::exit(2);
            }
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
