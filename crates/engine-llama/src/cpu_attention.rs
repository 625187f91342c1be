//! Decode attention on the CPU over a host-resident KV cache in the
//! checkpoint's 16-bit type: FlexGen's `--cpu-cache-compute` (with its
//! `--attn-sparsity`) for the GPU engine, where the runtime's tiered cache
//! hands the family its host cache in place
//! ([`runtime::gpu::cache::HostLayer`]).
//!
//! Layouts (the GPU engine's):
//! - the cache of one layer: `keys` and `values`, each `[batch][kv_head]
//!   [capacity][head_dim]` of `T`, so one head of one sequence is a
//!   contiguous `capacity × head_dim` block; positions `0..total` hold data;
//! - `mask`: `[batch][capacity]` u8, nonzero where the position holds a
//!   real token;
//! - a step's keys and values (one row a sequence): `[batch][kv_heads ·
//!   head_dim]` of `T`; its queries `[batch][heads · head_dim]` f32 (rotated,
//!   not scaled), and the output in the same layout.
//!
//! The arithmetic is the CPU reference's ([`ops::attention`] for one query
//! row): f32 dot products scaled by `head_dim^-0.5`, a softmax over the
//! visible positions ([`ops::softmax_masked`]), with a sparsity below 1 only
//! the largest past weights kept with the newest ([`ops::sparse_top_k`],
//! not renormalised), and the weighted sum of the values. Query head `h`
//! reads key/value head `h / (heads / kv_heads)`; each key and value row is
//! converted once per (sequence, key/value head) and read by every query
//! head of its group. Work is spread over (sequence, key/value head) pairs
//! on the current rayon pool.

use ops::gpu::buffer::Half;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// One layer's host cache, as [`decode`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct HostKv<'a, T> {
    pub keys: &'a [T],
    pub values: &'a [T],
    pub mask: &'a [u8],
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Positions filled, the step's own included (at `total - 1`).
    pub total: usize,
}

fn invalid(what: String) -> Error {
    Error::Op(ops::Error::Invalid { op: "cpu attention", what })
}

fn product(parts: &[usize], what: &str) -> Result<usize> {
    parts
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| invalid(format!("{what} {parts:?} overflows")))
}

fn check_len(what: &str, len: usize, want: usize) -> Result<()> {
    if len == want {
        Ok(())
    } else {
        Err(invalid(format!("{what} holds {len} values, expected {want}")))
    }
}

/// Writes a step's keys and values (`[batch][kv_heads · head_dim]`, one
/// position a sequence) at position `past` of every sequence of the cache.
/// Fails, writing nothing, if a length disagrees or `past` is past the
/// capacity.
pub fn append<T: Copy>(k: &[T], v: &[T], past: usize, cache: (&mut [T], &mut [T]), dims: [usize; 4]) -> Result<()> {
    let [batch, kv_heads, head_dim, capacity] = dims;
    let (keys, values) = cache;
    check_len("the step's keys", k.len(), product(&[batch, kv_heads, head_dim], "the step's keys")?)?;
    check_len("the step's values", v.len(), k.len())?;
    let n = product(&[batch, kv_heads, capacity, head_dim], "the cache")?;
    check_len("the keys", keys.len(), n)?;
    check_len("the values", values.len(), n)?;
    if past >= capacity {
        return Err(invalid(format!("a position at {past} passes the cache's {capacity}")));
    }
    let d = head_dim;
    for (i, (kr, vr)) in k.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
        // Row i is sequence i / kv_heads, head i % kv_heads: block i.
        let at = (i * capacity + past) * d;
        keys[at..at + d].copy_from_slice(kr);
        values[at..at + d].copy_from_slice(vr);
    }
    Ok(())
}

/// Decode attention of one query row per sequence (`q`, `[batch][heads ·
/// head_dim]` f32) over positions `0..cache.total` of the cache, keeping
/// `sparsity` of the past positions (1: all). Returns `[batch][heads ·
/// head_dim]` f32; a sequence with no visible position gets zeros.
pub fn decode<T: Half>(q: &[f32], cache: HostKv<'_, T>, heads: usize, sparsity: f64) -> Result<Vec<f32>> {
    let HostKv { keys, values, mask, batch, kv_heads, head_dim: d, capacity, total } = cache;
    if heads == 0 || kv_heads == 0 || d == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(invalid(format!("{heads} query heads over {kv_heads} key/value heads of {d}")));
    }
    if !(sparsity > 0.0 && sparsity <= 1.0) {
        return Err(invalid(format!("sparsity {sparsity} is outside (0, 1]")));
    }
    if total == 0 || total > capacity {
        return Err(invalid(format!("{total} positions in a cache of {capacity}")));
    }
    let width = product(&[heads, d], "the queries")?;
    check_len("the queries", q.len(), product(&[batch, width], "the queries")?)?;
    let n = product(&[batch, kv_heads, capacity, d], "the cache")?;
    check_len("the keys", keys.len(), n)?;
    check_len("the values", values.len(), n)?;
    check_len("the mask", mask.len(), product(&[batch, capacity], "the mask")?)?;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let top_k = ops::sparse_top_k(sparsity, total);
    let parts: Vec<Vec<f32>> = (0..batch * kv_heads)
        .into_par_iter()
        .map(|t| {
            let (b, g) = (t / kv_heads, t % kv_heads);
            let block = t * capacity * d;
            let seq_mask = &mask[b * capacity..b * capacity + total];
            let query = |j: usize| &q[b * width + (g * group + j) * d..][..d];
            let mut row = vec![0.0f32; d];
            let mut scores = vec![0.0f32; group * total];
            for p in 0..total {
                for (r, x) in row.iter_mut().zip(&keys[block + p * d..block + (p + 1) * d]) {
                    *r = x.to_f32();
                }
                for j in 0..group {
                    scores[j * total + p] = query(j).iter().zip(&row).map(|(a, b)| a * b).sum();
                }
            }
            for s in scores.chunks_exact_mut(total) {
                ops::softmax_masked(s, scale, |p| seq_mask[p] != 0);
                if let Some(k) = top_k {
                    ops::cpu::keep_top_past(s, k);
                }
            }
            let mut out = vec![0.0f32; group * d];
            for p in 0..total {
                for (r, x) in row.iter_mut().zip(&values[block + p * d..block + (p + 1) * d]) {
                    *r = x.to_f32();
                }
                for (j, acc) in out.chunks_exact_mut(d).enumerate() {
                    let w = scores[j * total + p];
                    if w != 0.0 {
                        for (a, v) in acc.iter_mut().zip(&row) {
                            *a += w * v;
                        }
                    }
                }
            }
            out
        })
        .collect();
    let mut result = vec![0.0f32; batch * width];
    for (t, out) in parts.into_iter().enumerate() {
        let (b, g) = (t / kv_heads, t % kv_heads);
        let at = b * width + g * group * d;
        result[at..at + group * d].copy_from_slice(&out);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use rand::{Rng, SeedableRng};

    /// The CPU reference's attention over an `ops::KvCache` holding the
    /// same values (bf16), one query row: the same numbers up to the order
    /// of f32 sums.
    #[test]
    fn matches_the_reference_over_the_same_cache() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (batch, heads, kv_heads, d, capacity) = (3, 8, 2, 16, 12);
        for (total, sparsity) in [(1, 1.0), (7, 1.0), (12, 1.0), (12, 0.5), (9, 0.2)] {
            let mut reference = ops::KvCache::new(ops::DType::BF16, batch, kv_heads, d, capacity).unwrap();
            let n = batch * kv_heads * capacity * d;
            let (mut keys, mut values) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
            for p in 0..total {
                let k: Vec<bf16> =
                    (0..batch * kv_heads * d).map(|_| bf16::from_f32(rng.random_range(-1.0..1.0))).collect();
                let v: Vec<bf16> =
                    (0..batch * kv_heads * d).map(|_| bf16::from_f32(rng.random_range(-1.0..1.0))).collect();
                append(&k, &v, p, (&mut keys, &mut values), [batch, kv_heads, d, capacity]).unwrap();
                let f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
                reference.append(&f(&k), &f(&v), 1).unwrap();
            }
            // Sequence 1 is left padded by 2; sequence 2 sees nothing past 0.
            let mut mask = vec![1u8; batch * capacity];
            mask[capacity..capacity + 2].fill(0);
            let q: Vec<f32> = (0..batch * heads * d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let cache =
                HostKv { keys: &keys, values: &values, mask: &mask, batch, kv_heads, head_dim: d, capacity, total };
            let got = decode(&q, cache, heads, sparsity).unwrap();
            let bools: Vec<bool> =
                (0..batch).flat_map(|b| mask[b * capacity..b * capacity + total].iter().map(|&m| m != 0)).collect();
            let shape = ops::AttentionShape { heads, kv_heads, head_dim: d };
            let want = ops::attention_sparse(&q, &reference, &bools, shape, sparsity).unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "total {total} sparsity {sparsity} [{i}]: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let (keys, values) = (vec![bf16::ZERO; 2 * 4 * 8], vec![bf16::ZERO; 2 * 4 * 8]);
        let mask = vec![1u8; 2 * 4];
        let cache = |total| HostKv {
            keys: &keys,
            values: &values,
            mask: &mask,
            batch: 2,
            kv_heads: 1,
            head_dim: 8,
            capacity: 4,
            total,
        };
        let q = vec![0.0f32; 2 * 2 * 8];
        assert!(decode(&q, cache(4), 2, 1.0).is_ok());
        assert!(decode(&q, cache(5), 2, 1.0).is_err(), "past the capacity");
        assert!(decode(&q, cache(0), 2, 1.0).is_err());
        assert!(decode(&q, cache(2), 3, 1.0).is_err(), "heads not a multiple");
        assert!(decode(&q[1..], cache(2), 2, 1.0).is_err());
        assert!(decode(&q, cache(2), 2, 0.0).is_err());
        let (mut k, mut v) = (keys.clone(), values.clone());
        let row = vec![bf16::ONE; 2 * 8];
        assert!(append(&row, &row, 3, (&mut k, &mut v), [2, 1, 8, 4]).is_ok());
        assert!(append(&row, &row, 4, (&mut k, &mut v), [2, 1, 8, 4]).is_err());
        assert!(append(&row[1..], &row, 0, (&mut k, &mut v), [2, 1, 8, 4]).is_err());
        assert!(append(&row, &row, 0, (&mut k, &mut v), [usize::MAX, 2, 8, 4]).is_err());
    }
}
