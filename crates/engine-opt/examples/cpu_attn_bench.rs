//! Times `cpu_attention::decode_attention` over host caches larger than the
//! last-level cache, as GB/s of cache read, against a plain parallel read of a
//! buffer of the same size measured in the same run.
//!
//! ```text
//! cargo run --release -p engine-opt --example cpu_attn_bench [-- REPS]
//! ```
//!
//! Threads: rayon's global pool (`RAYON_NUM_THREADS` to change it).

use std::hint::black_box;
use std::time::Instant;

use engine_opt::cpu_attention::{decode_attention, sparse_top_k, AttnDims, HostCache};
use half::f16;
use rayon::prelude::*;

struct Bench {
    name: &'static str,
    dims: AttnDims,
    sparsity: f64,
}

/// Deterministic pseudo-random fill, every page written (a zero-filled
/// allocation may map every page to the one zero page and read
/// unrealistically fast).
fn fill<T: Send + Default + Clone>(n: usize, seed: u64, make: impl Fn(u64) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::default(); n];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let mut x = (seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        for v in chunk {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = make(x);
        }
    });
    out
}

/// An f16 in [-0.5, 0.5) from random bits.
fn half(x: u64) -> f16 {
    f16::from_f32((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
}

/// Median of `reps` timed runs of `f`, after one untimed run.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Sums a buffer in parallel: the memory-read baseline.
fn read_all(buf: &[u64]) -> u64 {
    buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x))).reduce(|| 0, u64::wrapping_add)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reps: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(5).max(1);
    let benches = [
        Bench {
            name: "1.3b-like h32x64",
            dims: AttnDims { batch: 64, heads: 32, head_dim: 64, capacity: 2048 },
            sparsity: 1.0,
        },
        Bench {
            name: "30b-like h56x128",
            dims: AttnDims { batch: 16, heads: 56, head_dim: 128, capacity: 2048 },
            sparsity: 1.0,
        },
        Bench {
            name: "30b-like h56x128",
            dims: AttnDims { batch: 16, heads: 56, head_dim: 128, capacity: 2048 },
            sparsity: 0.25,
        },
        Bench {
            name: "1.3b-like h32x64",
            dims: AttnDims { batch: 64, heads: 32, head_dim: 64, capacity: 2048 },
            sparsity: 0.25,
        },
    ];
    println!("threads: {}, reps: {reps} (median)", rayon::current_num_threads());
    println!(
        "{:<18} {:>5} {:>5} {:>8} {:>9} {:>9} {:>9} {:>10} {:>8}",
        "case", "batch", "len", "sparsity", "read MiB", "attn ms", "attn GB/s", "read GB/s", "of read"
    );
    for bench in &benches {
        let d = bench.dims;
        let total = d.capacity;
        let keys = fill(d.cache_elems(), 1, half);
        let values = fill(d.cache_elems(), 2, half);
        let qkv = fill(d.batch * 3 * d.hidden(), 3, half);
        let mask = vec![1u8; d.batch * d.capacity];
        let mut out = vec![f16::ZERO; d.batch * d.hidden()];
        let cache = HostCache { keys: &keys, values: &values, key_mask: &mask, total };

        // Bytes of cache read: every key row, and the value rows kept.
        let kv_row_bytes = (d.head_dim * 2) as f64;
        let heads = (d.batch * d.heads) as f64;
        let value_rows = sparse_top_k(bench.sparsity, total).map_or(total, |k| k + 1) as f64;
        let bytes = heads * kv_row_bytes * (total as f64 + value_rows);

        decode_attention(&qkv, cache, d, bench.sparsity, &mut out)?;
        let attn_s = time(reps, || {
            let r = decode_attention(&qkv, cache, d, bench.sparsity, &mut out);
            black_box(r.is_ok());
        });
        drop(keys);
        drop(values);

        let baseline: Vec<u64> = fill(bytes as usize / 8, 4, |x| x);
        let read_s = time(reps, || {
            black_box(read_all(black_box(&baseline)));
        });
        let attn_gbs = bytes / attn_s / 1e9;
        let read_gbs = (baseline.len() * 8) as f64 / read_s / 1e9;
        println!(
            "{:<18} {:>5} {:>5} {:>8} {:>9.0} {:>9.2} {:>9.2} {:>10.2} {:>7.0}%",
            bench.name,
            d.batch,
            total,
            bench.sparsity,
            bytes / (1 << 20) as f64,
            attn_s * 1e3,
            attn_gbs,
            read_gbs,
            100.0 * attn_gbs / read_gbs
        );
    }
    Ok(())
}
