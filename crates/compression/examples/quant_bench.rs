//! CPU throughput of 4-bit, group-64 quantize and dequantize on a 256 MiB
//! f16 tensor, in GB/s of f16 input bytes (10^9 bytes per second).
//!
//! `cargo run --release -p compression --example quant_bench`
//!
//! Set `RAYON_NUM_THREADS` to change the thread count. Besides wall-clock
//! GB/s it prints GB per CPU-second (the threads' time on a CPU, from
//! /proc/self/task/*/schedstat on Linux): a per-core figure that holds up
//! better than wall-clock on a machine shared with other work.

use std::time::{Duration, Instant};

use compression::{dequantize_into, quantize_into, CompressedLayout, CompressionConfig, SourceDtype};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

const ROUNDS: usize = 5;

fn main() -> Result<(), compression::Error> {
    let rows = 32_768;
    let cols = 4_096; // 32 Ki x 4 Ki f16 = 256 MiB
    let values = random_f16(rows * cols);
    let input_bytes = values.len() * 2;
    println!(
        "quant_bench: {} MiB f16 input, 4-bit, group 64, asymmetric, {} rayon threads",
        input_bytes >> 20,
        rayon::current_num_threads()
    );

    for (label, shape, dim) in [
        ("group dim last  [32768, 4096] dim 1", [rows, cols], 1),
        ("group dim first [32768, 4096] dim 0", [rows, cols], 0),
    ] {
        let layout = CompressedLayout::new(&shape, SourceDtype::F16, CompressionConfig::int4(dim))?;
        let mut packed = vec![0u8; layout.total_bytes()];
        let mut out = vec![f16::ZERO; values.len()];

        let q = measure(|| quantize_into(&values, &layout, &mut packed))?;
        let d = measure(|| dequantize_into(&packed, &layout, &mut out))?;

        let max_err =
            values.par_iter().zip(&out).map(|(a, b)| (a.to_f32() - b.to_f32()).abs()).reduce(|| 0.0, f32::max);
        println!("{label}:");
        println!(
            "  compressed {} bytes ({:.4} bytes/value), max |error| {max_err:.4}",
            layout.total_bytes(),
            layout.total_bytes() as f64 / values.len() as f64
        );
        for (name, m) in [("quantize  ", q), ("dequantize", d)] {
            println!(
                "  {name} {:6.2} GB/s wall (best of {ROUNDS}: {:.1} ms), {} GB per CPU-second",
                gbps(input_bytes, m.best),
                m.best.as_secs_f64() * 1e3,
                m.cpu_per_round.map_or("n/a".to_string(), |c| format!("{:.2}", gbps(input_bytes, c))),
            );
        }
    }
    Ok(())
}

struct Measured {
    /// Fastest wall-clock round.
    best: Duration,
    /// CPU time of all threads per round, averaged over the rounds.
    cpu_per_round: Option<Duration>,
}

/// Runs `f` once to warm up, then `ROUNDS` times.
fn measure<E>(mut f: impl FnMut() -> Result<(), E>) -> Result<Measured, E> {
    f()?;
    let cpu0 = cpu_time();
    let mut best = Duration::MAX;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    let cpu_per_round = match (cpu0, cpu_time()) {
        (Some(a), Some(b)) if b > a => Some((b - a) / ROUNDS as u32),
        _ => None,
    };
    Ok(Measured { best, cpu_per_round })
}

/// Time this process's threads have run on a CPU (Linux), summed from the
/// first field of each /proc/self/task/*/schedstat, in nanoseconds.
fn cpu_time() -> Option<Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).ok()?;
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(ns))
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// Roughly normal-looking values (sum of uniforms) with a few outliers, as
/// weights and activations have; deterministic.
fn random_f16(n: usize) -> Vec<f16> {
    let mut out = vec![f16::ZERO; n];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let wide: Vec<f32> = (0..chunk.len())
            .map(|k| {
                let v = next() + next() + next();
                if k % 997 == 0 {
                    v * 40.0
                } else {
                    v
                }
            })
            .collect();
        chunk.convert_from_f32_slice(&wide);
    });
    out
}
