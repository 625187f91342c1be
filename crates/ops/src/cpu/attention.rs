//! Attention over a key/value cache, with grouped-query heads.

use rayon::prelude::*;

use super::linear::{matmul_nn, matmul_nt};
use super::tensor::{DType, Storage};
use crate::error::{check_len, mul, shape, Error, Result};

/// The heads of an attention: `heads` query heads over `kv_heads` key/value
/// heads (query head `h` reads key/value head `h / (heads / kv_heads)`),
/// each `head_dim` wide. Scores are scaled by `1 / sqrt(head_dim)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn check(&self) -> Result<()> {
        if self.heads == 0 || self.kv_heads == 0 || self.head_dim == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::Invalid {
                op: "attention",
                what: format!(
                    "{} query heads over {} key/value heads of {}: every count must be positive and the query heads a multiple of the key/value heads",
                    self.heads, self.kv_heads, self.head_dim
                ),
            });
        }
        Ok(())
    }
}

/// The keys and values of one layer for a batch of sequences, stored in
/// `dtype` (values are rounded to it as they are appended), laid out
/// `[batch][kv_head][position][head_dim]`. Every sequence has the same
/// number of positions (`len`); padding is masked, not skipped.
#[derive(Debug, Clone)]
pub struct KvCache {
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    k: Storage,
    v: Storage,
}

impl KvCache {
    /// Room for `capacity` positions of `batch` sequences.
    pub fn new(dtype: DType, batch: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Result<KvCache> {
        let what = "a KV cache";
        let n = mul(mul(mul(batch, kv_heads, what)?, head_dim, what)?, capacity, what)?;
        mul(n, 2 * dtype.size(), what)?;
        Ok(KvCache {
            batch,
            kv_heads,
            head_dim,
            capacity,
            len: 0,
            k: Storage::try_zeros(dtype, n, "the keys of a KV cache")?,
            v: Storage::try_zeros(dtype, n, "the values of a KV cache")?,
        })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn dtype(&self) -> DType {
        self.k.dtype()
    }

    /// Positions each sequence has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Key/value heads and their width.
    pub fn heads(&self) -> (usize, usize) {
        (self.kv_heads, self.head_dim)
    }

    /// Bytes of keys and values held (the whole capacity).
    pub fn bytes(&self) -> u64 {
        (self.k.as_bytes().len() as u64).saturating_add(self.v.as_bytes().len() as u64)
    }

    /// Bytes one sequence's keys (or values) take: sequences are contiguous,
    /// so sequences `a..b` are bytes `a · seq_bytes .. b · seq_bytes` of
    /// [`KvCache::bytes_mut`]'s halves.
    pub fn seq_bytes(&self) -> usize {
        self.kv_heads * self.capacity * self.head_dim * self.dtype().size()
    }

    /// The keys' and the values' memory, to gather a batch's sequences from
    /// several tiers into one cache and back.
    pub fn bytes_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        (self.k.as_bytes_mut(), self.v.as_bytes_mut())
    }

    /// The keys' and the values' memory.
    pub fn as_bytes(&self) -> (&[u8], &[u8]) {
        (self.k.as_bytes(), self.v.as_bytes())
    }

    /// Declares that `len` positions are held (after filling the memory
    /// through [`KvCache::bytes_mut`]).
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.capacity {
            return Err(shape("kv_cache", format!("{len} positions exceed the capacity of {}", self.capacity)));
        }
        self.len = len;
        Ok(())
    }

    /// Appends `rows` positions for every sequence: `k` and `v` are
    /// `[batch][rows][kv_heads · head_dim]` f32.
    pub fn append(&mut self, k: &[f32], v: &[f32], rows: usize) -> Result<()> {
        let width = self.kv_heads * self.head_dim;
        let want = mul(mul(self.batch, rows, "KV append")?, width, "KV append")?;
        check_len("kv_cache", "the keys", k.len(), want)?;
        check_len("kv_cache", "the values", v.len(), want)?;
        let end = self.len.checked_add(rows).filter(|&e| e <= self.capacity).ok_or_else(|| {
            shape("kv_cache", format!("{} + {rows} positions exceed the capacity of {}", self.len, self.capacity))
        })?;
        let d = self.head_dim;
        for b in 0..self.batch {
            for r in 0..rows {
                let src = (b * rows + r) * width;
                for g in 0..self.kv_heads {
                    let dst = ((b * self.kv_heads + g) * self.capacity + self.len + r) * d;
                    self.k.write_f32(dst, &k[src + g * d..src + (g + 1) * d]);
                    self.v.write_f32(dst, &v[src + g * d..src + (g + 1) * d]);
                }
            }
        }
        self.len = end;
        Ok(())
    }
}

/// Attention of the last `rows` positions of `cache` (their keys and values
/// already appended) over every position up to their own.
///
/// `q` is `[batch][rows][heads · head_dim]` f32; the result has the same
/// layout. Query row `r` sits at cache position `cache.len() − rows + r` and
/// sees the keys at positions up to it (causal) for which `key_mask` (`[batch]
/// [cache.len()]`, true where a real token is) holds. A prefill passes every
/// position as rows; a decoding step one. A query with no visible key (a
/// padding row) gets zeros.
pub fn attention(
    q: &[f32],
    rows: usize,
    cache: &KvCache,
    key_mask: &[bool],
    shape_: AttentionShape,
) -> Result<Vec<f32>> {
    attend(q, rows, cache, key_mask, shape_, None)
}

/// Past positions FlexGen keeps under `--attn-sparsity s`:
/// `int(s × (total - 1))`, `None` for dense attention (`s >= 1`).
pub fn sparse_top_k(sparsity: f64, total: usize) -> Option<usize> {
    if sparsity >= 1.0 {
        None
    } else {
        // Python's int() of a float64 product truncates toward zero, as `as` does.
        Some((sparsity * total.saturating_sub(1) as f64) as usize)
    }
}

/// A decoding step's [`attention`] (one query row per sequence) with
/// FlexGen's `--attn-sparsity`: after the softmax over every visible
/// position, only the `sparse_top_k(sparsity, len)` largest weights of the
/// past positions (ties to the earlier one) and the newest position's
/// weight are kept, not renormalised, and the values are summed with them.
/// `sparsity` 1 is [`attention`].
pub fn attention_sparse(
    q: &[f32],
    cache: &KvCache,
    key_mask: &[bool],
    shape_: AttentionShape,
    sparsity: f64,
) -> Result<Vec<f32>> {
    if !(sparsity > 0.0 && sparsity <= 1.0) {
        return Err(Error::Invalid { op: "attention", what: format!("sparsity {sparsity} is outside (0, 1]") });
    }
    attend(q, 1, cache, key_mask, shape_, sparse_top_k(sparsity, cache.len))
}

/// [`attention`], keeping only the `top_k` largest past weights of each
/// row (with the newest position) where given.
fn attend(
    q: &[f32],
    rows: usize,
    cache: &KvCache,
    key_mask: &[bool],
    shape_: AttentionShape,
    top_k: Option<usize>,
) -> Result<Vec<f32>> {
    shape_.check()?;
    let AttentionShape { heads, kv_heads, head_dim: d } = shape_;
    if (kv_heads, d) != (cache.kv_heads, cache.head_dim) {
        return Err(shape(
            "attention",
            format!(
                "the cache holds {} key/value heads of {}, the shape says {kv_heads} of {d}",
                cache.kv_heads, cache.head_dim
            ),
        ));
    }
    let (batch, len) = (cache.batch, cache.len);
    if rows > len {
        return Err(shape("attention", format!("{rows} query rows but only {len} cached positions")));
    }
    let width = mul(heads, d, "attention")?;
    check_len("attention", "the queries", q.len(), mul(mul(batch, rows, "attention")?, width, "attention")?)?;
    check_len("attention", "the key mask", key_mask.len(), mul(batch, len, "attention")?)?;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let first = len - rows;

    // One task per (sequence, key/value head): its keys and values converted
    // once, then every query head of its group.
    let parts: Vec<(usize, usize, Vec<f32>)> = (0..batch * kv_heads)
        .into_par_iter()
        .map(|t| {
            let (b, g) = (t / kv_heads, t % kv_heads);
            let base = (b * kv_heads + g) * cache.capacity * d;
            let mut kf = vec![0.0f32; len * d];
            let mut vf = vec![0.0f32; len * d];
            cache.k.read_f32(base, &mut kf);
            cache.v.read_f32(base, &mut vf);
            let mask = &key_mask[b * len..(b + 1) * len];
            let mut out = vec![0.0f32; group * rows * d];
            let mut qh = vec![0.0f32; rows * d];
            let mut scores = vec![0.0f32; rows * len];
            for j in 0..group {
                let h = g * group + j;
                for r in 0..rows {
                    let src = (b * rows + r) * width + h * d;
                    qh[r * d..(r + 1) * d].copy_from_slice(&q[src..src + d]);
                }
                matmul_nt(&mut scores, &qh, &kf, rows, len, d);
                for (r, row) in scores.chunks_mut(len).enumerate() {
                    let visible = first + r + 1;
                    softmax_masked(row, scale, |p| p < visible && mask[p]);
                    if let Some(k) = top_k {
                        keep_top_past(&mut row[..visible], k);
                    }
                }
                matmul_nn(&mut out[j * rows * d..(j + 1) * rows * d], &scores, &vf, rows, d, len);
            }
            (b, g, out)
        })
        .collect();
    let mut result = vec![0.0f32; batch * rows * width];
    for (b, g, out) in parts {
        for j in 0..group {
            let h = g * group + j;
            for r in 0..rows {
                let dst = (b * rows + r) * width + h * d;
                result[dst..dst + d].copy_from_slice(&out[(j * rows + r) * d..(j * rows + r + 1) * d]);
            }
        }
    }
    Ok(result)
}

/// Zeroes every weight of `row` but the `k` largest of its past positions
/// (all but the last; ties to the earlier) and the last: FlexGen's sparse
/// decode attention's rule, for every CPU attention that keeps a top-k.
pub fn keep_top_past(row: &mut [f32], k: usize) {
    let past = row.len().saturating_sub(1);
    if k >= past {
        return;
    }
    let mut order: Vec<usize> = (0..past).collect();
    order.select_nth_unstable_by(k, |&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    for &p in &order[k..] {
        row[p] = 0.0;
    }
}

/// Softmax of `row · scale` over the entries where `keep` holds; the others
/// become 0, and a row with none kept becomes all zeros.
pub fn softmax_masked(row: &mut [f32], scale: f32, keep: impl Fn(usize) -> bool) {
    let mut max = f32::NEG_INFINITY;
    for (p, v) in row.iter_mut().enumerate() {
        *v *= scale;
        if keep(p) && *v > max {
            max = *v;
        }
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0.0f32;
    for (p, v) in row.iter_mut().enumerate() {
        *v = if keep(p) { (*v - max).exp() } else { 0.0 };
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(i: usize) -> f32 {
        (((i * 7919 + 13) % 1013) as f32 / 1013.0) - 0.5
    }

    /// Straightforward attention in f64 for one sequence: `q` [rows][heads·d],
    /// `k`, `v` [len][kv_heads·d].
    fn naive(q: &[f32], k: &[f32], v: &[f32], rows: usize, len: usize, s: AttentionShape, mask: &[bool]) -> Vec<f32> {
        let (h_n, g_n, d) = (s.heads, s.kv_heads, s.head_dim);
        let mut out = vec![0.0f32; rows * h_n * d];
        for h in 0..h_n {
            let g = h / (h_n / g_n);
            for r in 0..rows {
                let pos = len - rows + r;
                let mut w: Vec<f64> = (0..len)
                    .map(|p| {
                        if p <= pos && mask[p] {
                            let dot: f64 =
                                (0..d).map(|i| q[(r * h_n + h) * d + i] as f64 * k[(p * g_n + g) * d + i] as f64).sum();
                            dot / (d as f64).sqrt()
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let max = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                w.iter_mut().for_each(|x| *x = (*x - max).exp());
                let z: f64 = w.iter().sum();
                for i in 0..d {
                    let s: f64 = (0..len).map(|p| w[p] / z * v[(p * g_n + g) * d + i] as f64).sum();
                    out[(r * h_n + h) * d + i] = s as f32;
                }
            }
        }
        out
    }

    fn run(
        s: AttentionShape,
        len: usize,
        rows: usize,
        mask: &[bool],
        seed: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let kv_w = s.kv_heads * s.head_dim;
        let k: Vec<f32> = (0..len * kv_w).map(|i| pseudo(i + seed)).collect();
        let v: Vec<f32> = (0..len * kv_w).map(|i| pseudo(3 * i + seed + 1)).collect();
        let q: Vec<f32> = (0..rows * s.heads * s.head_dim).map(|i| 2.0 * pseudo(5 * i + seed + 2)).collect();
        let mut cache = KvCache::new(DType::F32, 1, s.kv_heads, s.head_dim, len + 2).unwrap();
        // Prefill what precedes the queries, then the query rows themselves.
        cache.append(&k[..(len - rows) * kv_w], &v[..(len - rows) * kv_w], len - rows).unwrap();
        cache.append(&k[(len - rows) * kv_w..], &v[(len - rows) * kv_w..], rows).unwrap();
        let got = attention(&q, rows, &cache, mask, s).unwrap();
        (got, q, k, v)
    }

    #[test]
    fn prefill_and_decode_match_naive_attention_with_masks() {
        let s = AttentionShape { heads: 4, kv_heads: 2, head_dim: 8 };
        let len = 7;
        // Two left pads.
        let mask: Vec<bool> = (0..len).map(|p| p >= 2).collect();
        for rows in [len, 1, 3] {
            let (got, q, k, v) = run(s, len, rows, &mask, rows);
            let want = naive(&q, &k, &v, rows, len, s, &mask);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-5, "rows {rows}: {g} vs {e}");
            }
        }
    }

    /// FlexGen's sparse decode attention, written out: softmax weights over
    /// the visible positions; the `k` largest past ones and the newest kept
    /// (ties to the earlier), not renormalised.
    fn naive_sparse(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        len: usize,
        s: AttentionShape,
        mask: &[bool],
        keep: usize,
    ) -> Vec<f32> {
        let (h_n, g_n, d) = (s.heads, s.kv_heads, s.head_dim);
        let mut out = vec![0.0f32; h_n * d];
        for h in 0..h_n {
            let g = h / (h_n / g_n);
            let scores: Vec<f64> = (0..len)
                .map(|p| {
                    let dot: f64 = (0..d).map(|i| q[h * d + i] as f64 * k[(p * g_n + g) * d + i] as f64).sum();
                    if mask[p] {
                        dot / (d as f64).sqrt()
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            let mut past: Vec<usize> = (0..len - 1).collect();
            past.sort_by(|&a, &b| e[b].total_cmp(&e[a]).then(a.cmp(&b)));
            let kept: Vec<usize> = past.into_iter().take(keep).chain([len - 1]).collect();
            for i in 0..d {
                let sum: f64 = kept.iter().map(|&p| e[p] / z * v[(p * g_n + g) * d + i] as f64).sum();
                out[h * d + i] = sum as f32;
            }
        }
        out
    }

    #[test]
    fn sparse_decode_keeps_the_top_past_weights_and_the_newest() {
        let s = AttentionShape { heads: 4, kv_heads: 2, head_dim: 8 };
        let len = 11;
        let mask: Vec<bool> = (0..len).map(|p| p >= 1).collect();
        let (dense, q, k, v) = run(s, len, 1, &mask, 5);
        let mut cache = KvCache::new(DType::F32, 1, s.kv_heads, s.head_dim, len).unwrap();
        cache.append(&k, &v, len).unwrap();
        for sparsity in [0.05, 0.3, 0.5, 0.99, 1.0] {
            let keep = sparse_top_k(sparsity, len).unwrap_or(len - 1);
            assert_eq!(keep, if sparsity < 1.0 { (sparsity * 10.0) as usize } else { 10 });
            let got = attention_sparse(&q, &cache, &mask, s, sparsity).unwrap();
            let want = naive_sparse(&q, &k, &v, len, s, &mask, keep);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-5, "sparsity {sparsity}: {g} vs {e}");
            }
            if sparsity == 1.0 {
                assert_eq!(got, dense, "sparsity 1 is dense attention");
            }
        }
        for bad in [0.0, -1.0, 1.5, f64::NAN] {
            assert!(attention_sparse(&q, &cache, &mask, s, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_padded_key_never_gets_weight() {
        // The padded keys' values are huge: any weight on them would show.
        let s = AttentionShape { heads: 2, kv_heads: 1, head_dim: 4 };
        let (len, w) = (5, 4);
        let mut k: Vec<f32> = (0..len * w).map(pseudo).collect();
        let mut v: Vec<f32> = (0..len * w).map(|i| pseudo(i + 7)).collect();
        for i in 0..2 * w {
            k[i] = 50.0;
            v[i] = 1e6;
        }
        let mask = [false, false, true, true, true];
        let q: Vec<f32> = (0..len * 2 * w).map(|i| pseudo(i + 3)).collect();
        let mut cache = KvCache::new(DType::BF16, 1, 1, 4, len).unwrap();
        cache.append(&k, &v, len).unwrap();
        let out = attention(&q, len, &cache, &mask, s).unwrap();
        // Rows 0 and 1 see only padding: zeros.
        assert!(out[..2 * 2 * w].iter().all(|&x| x == 0.0));
        // The others stay within the real values' range.
        assert!(out[2 * 2 * w..].iter().all(|&x| x.abs() <= 0.5), "{out:?}");
        // Position 2 sees only itself: its value exactly (bf16-rounded).
        let v2: Vec<f32> = v[2 * w..3 * w].iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        for h in 0..2 {
            let row = &out[(2 * 2 + h) * w..(2 * 2 + h + 1) * w];
            for (g, e) in row.iter().zip(&v2) {
                assert!((g - e).abs() < 1e-6, "{g} vs {e}");
            }
        }
    }

    #[test]
    fn grouped_query_attention_equals_mha_with_kv_heads_repeated() {
        let gqa = AttentionShape { heads: 6, kv_heads: 2, head_dim: 4 };
        let mha = AttentionShape { heads: 6, kv_heads: 6, head_dim: 4 };
        let (len, rows) = (6, 6);
        let mask = vec![true; len];
        let (got, q, k, v) = run(gqa, len, rows, &mask, 1);
        // Repeat each kv head for its 3 query heads, consecutive.
        let repeat = |x: &[f32]| -> Vec<f32> {
            let mut out = Vec::new();
            for p in 0..len {
                for h in 0..6 {
                    let g = h / 3;
                    out.extend_from_slice(&x[(p * 2 + g) * 4..(p * 2 + g + 1) * 4]);
                }
            }
            out
        };
        let (kr, vr) = (repeat(&k), repeat(&v));
        let mut cache = KvCache::new(DType::F32, 1, 6, 4, len).unwrap();
        cache.append(&kr, &vr, len).unwrap();
        let want = attention(&q, rows, &cache, &mask, mha).unwrap();
        for (g, e) in got.iter().zip(&want) {
            assert!((g - e).abs() < 1e-6, "{g} vs {e}");
        }
    }

    #[test]
    fn batched_sequences_are_independent_and_sizes_are_checked() {
        let s = AttentionShape { heads: 2, kv_heads: 2, head_dim: 2 };
        let mut cache = KvCache::new(DType::F16, 2, 2, 2, 3).unwrap();
        let kv: Vec<f32> = (0..2 * 3 * 4).map(pseudo).collect();
        cache.append(&kv, &kv, 3).unwrap();
        assert!(cache.append(&kv[..8], &kv[..8], 1).unwrap_err().to_string().contains("capacity"));
        // A cache too large to allocate is an error, not an abort.
        let e = KvCache::new(DType::F32, 1 << 20, 1 << 20, 1 << 10, 1 << 8).unwrap_err();
        assert!(e.to_string().contains("KV cache"), "{e}");
        let q: Vec<f32> = (0..2 * 4).map(|i| pseudo(i + 1)).collect();
        // Sequence 0 sees everything, sequence 1 one pad.
        let mask = [true, true, true, false, true, true];
        let both = attention(&q, 1, &cache, &mask, s).unwrap();
        let mut one = KvCache::new(DType::F16, 1, 2, 2, 3).unwrap();
        one.append(&kv[12..], &kv[12..], 3).unwrap();
        let alone = attention(&q[4..], 1, &one, &mask[3..], s).unwrap();
        assert_eq!(&both[4..], &alone[..]);
        let bad = AttentionShape { heads: 3, kv_heads: 2, head_dim: 2 };
        assert!(attention(&q, 1, &cache, &mask, bad).unwrap_err().to_string().contains("multiple"));
        assert!(attention(&q, 1, &cache, &mask[..5], s).unwrap_err().to_string().contains("key mask"));
    }
}
