//! Decode attention on the CPU over a host-resident KV cache: FlexGen's
//! `--cpu-cache-compute`, with its `--attn-sparsity`.
//!
//! When the KV cache lives in host memory, moving it to the GPU for every
//! decoding step would cost the whole cache over PCIe per layer and token.
//! Computing decode attention where the cache lives instead moves only the
//! step's queries, new keys and values (one `3 × hidden` row per sequence)
//! and the attention outputs (one `hidden` row per sequence). This module is
//! that computation: [`append_kv`] stores the step's keys and values into the
//! host cache, and [`decode_attention`] attends one new query per sequence
//! over the cached positions. Prefill attention stays on the GPU.
//!
//! # Layouts (those of the GPU engine)
//!
//! - `qkv`, the qkv product of one step: `batch × new_len` rows of
//!   `3 × hidden` f16 values, `[q | k | v]`, each third `hidden` long with head
//!   `hh` at `hh × head_dim .. (hh + 1) × head_dim`. Queries are not
//!   pre-scaled.
//! - The cache of one layer: `keys` and `values`, each
//!   `[batch][heads][capacity][head_dim]` f16, so one head of one sequence is
//!   a contiguous `capacity × head_dim` block; positions `0..total` hold data.
//! - `key_mask`: `[batch][capacity]` u8, nonzero where the position holds a
//!   real token (left padding leaves zeros at the start of short prompts).
//! - The output: `[batch][hidden]` f16, head `hh` at `hh × head_dim`.
//!
//! # Numerics
//!
//! Dot products, the softmax and the weighted sum of values accumulate in
//! f32, and the result is rounded to f16 once. On x86-64 with AVX2, FMA and
//! F16C (checked at run time) keys and values go from f16 to f32 in registers,
//! eight at a time, into fused multiply-adds; elsewhere a chunk of rows is
//! converted to an f32 buffer and the loops are written to auto-vectorise. Scores are `head_dim^-0.5 · (q · k_p)`; masked
//! positions are left out of the softmax (FlexGen gives them a score of
//! `-1e4`, whose weight is 0 in f32 all the same). A sequence with no
//! unmasked position gets a zero output. Each key and value row is read once:
//! one pass over the keys for the scores, one over the values for the sum.
//!
//! Work is spread over (sequence, head) pairs on the current rayon pool; to
//! use another pool, call from inside `pool.install(..)`.

use half::f16;
use rayon::prelude::*;

use crate::{Error, Result};
use ops::cpu::f16_to_f32 as convert_f16;

/// f32 values converted per chunk of key or value rows (16 KiB, well inside
/// the L1 cache next to the query and the accumulator).
const CHUNK_ELEMS: usize = 4096;

/// f32 lanes of the dot-product and axpy loops: 16 independent sums, enough
/// to keep the adders busy with 4-wide or 8-wide vectors.
const LANES: usize = 16;

/// The shape of one layer's attention over a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Sequences in the batch.
    pub batch: usize,
    /// Attention heads.
    pub heads: usize,
    /// Values per head (`hidden / heads`).
    pub head_dim: usize,
    /// Positions the cache holds per sequence.
    pub capacity: usize,
}

impl AttnDims {
    /// `heads × head_dim`.
    pub fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// f16 values in `keys` (and in `values`): `batch × heads × capacity × head_dim`.
    pub fn cache_elems(&self) -> usize {
        self.batch * self.heads * self.capacity * self.head_dim
    }

    /// Checks that no size is zero and that every size this module computes
    /// from the dimensions fits in `usize`.
    fn validate(&self) -> Result<()> {
        let AttnDims { batch, heads, head_dim, capacity } = *self;
        if batch == 0 || heads == 0 || head_dim == 0 || capacity == 0 {
            return Err(invalid(format!("every dimension must be positive, got {self:?}")));
        }
        let fits = [batch, heads, capacity, head_dim].iter().try_fold(3usize, |acc, &d| acc.checked_mul(d));
        if fits.is_none() {
            return Err(invalid(format!("dimensions {self:?} overflow usize")));
        }
        Ok(())
    }
}

/// One layer's host cache as [`decode_attention`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct HostCache<'a> {
    /// `[batch][heads][capacity][head_dim]` f16.
    pub keys: &'a [f16],
    /// `[batch][heads][capacity][head_dim]` f16.
    pub values: &'a [f16],
    /// `[batch][capacity]`, nonzero where the position holds a real token.
    pub key_mask: &'a [u8],
    /// Positions filled, the step's own key and value included (at `total - 1`).
    pub total: usize,
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(format!("cpu attention: {msg}"))
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(invalid(format!("{what} holds {len} values, expected {expected}")))
    }
}

/// Writes the step's keys and values, the middle and last thirds of each
/// `qkv` row, into the cache at positions `past .. past + new_len` of every
/// sequence.
///
/// `qkv` holds `batch × new_len` rows (sequence-major). Fails, writing
/// nothing, if a slice has the wrong length or `past + new_len` passes the
/// capacity.
pub fn append_kv(
    qkv: &[f16],
    new_len: usize,
    dims: AttnDims,
    past: usize,
    keys: &mut [f16],
    values: &mut [f16],
) -> Result<()> {
    dims.validate()?;
    let (hidden, hd) = (dims.hidden(), dims.head_dim);
    let rows = dims.batch.checked_mul(new_len).ok_or_else(|| invalid(format!("new_len {new_len} overflows")))?;
    let qkv_len = rows.checked_mul(3 * hidden).ok_or_else(|| invalid(format!("new_len {new_len} overflows")))?;
    check_len("qkv", qkv.len(), qkv_len)?;
    check_len("keys", keys.len(), dims.cache_elems())?;
    check_len("values", values.len(), dims.cache_elems())?;
    match past.checked_add(new_len) {
        Some(end) if end <= dims.capacity => {}
        _ => {
            return Err(invalid(format!(
                "appending {new_len} positions after {past} passes the cache capacity {}",
                dims.capacity
            )))
        }
    }
    if new_len == 0 {
        return Ok(());
    }
    let block = dims.capacity * hd;
    keys.par_chunks_mut(block).zip(values.par_chunks_mut(block)).enumerate().for_each(|(i, (kb, vb))| {
        let (b, h) = (i / dims.heads, i % dims.heads);
        let dst_k = &mut kb[past * hd..(past + new_len) * hd];
        let dst_v = &mut vb[past * hd..(past + new_len) * hd];
        let src = &qkv[b * new_len * 3 * hidden..(b + 1) * new_len * 3 * hidden];
        for ((row, k), v) in
            src.chunks_exact(3 * hidden).zip(dst_k.chunks_exact_mut(hd)).zip(dst_v.chunks_exact_mut(hd))
        {
            k.copy_from_slice(&row[hidden + h * hd..hidden + (h + 1) * hd]);
            v.copy_from_slice(&row[2 * hidden + h * hd..2 * hidden + (h + 1) * hd]);
        }
    });
    Ok(())
}

/// Past positions FlexGen keeps under `--attn-sparsity s` (the op layer's
/// count, which the Llama family's CPU attention uses too).
pub use ops::cpu::sparse_top_k;

/// Decode attention: one query per sequence (`qkv` holds `batch` rows, the
/// step's key and value already appended at position `cache.total - 1`),
/// over positions `0..cache.total` where the key mask is nonzero. Writes
/// `[batch][hidden]` f16 into `out`.
///
/// `sparsity` is FlexGen's `--attn-sparsity`, in `(0, 1]`:
///
/// - `1`: dense attention, `Σ_p softmax_p · v_p`.
/// - below 1, FlexGen's `_sparse_attention_value`: the softmax is taken over
///   all positions as for dense attention; of the past positions
///   `0..total - 1` only the `k = int(sparsity × (total - 1))` with the
///   largest weights are kept, and the newest position (`total - 1`) is
///   always kept in addition; only those value rows are read, and the output
///   is their weighted sum with the dense softmax weights, *not*
///   renormalised (the kept weights sum to less than 1), as FlexGen does.
///   FlexGen's top-k may pick masked positions when fewer than `k` past
///   positions are real; their weight is 0, so keeping only the real ones is
///   the same. Ties at the k-th weight go to the earlier position (torch
///   leaves them unspecified).
///
/// Fails, writing nothing, if a slice has the wrong length, `total` is 0 or
/// passes the capacity, or `sparsity` is outside `(0, 1]`.
pub fn decode_attention(
    qkv: &[f16],
    cache: HostCache<'_>,
    dims: AttnDims,
    sparsity: f64,
    out: &mut [f16],
) -> Result<()> {
    if !(sparsity > 0.0 && sparsity <= 1.0) {
        return Err(invalid(format!("attention sparsity must be in (0, 1], got {sparsity}")));
    }
    check_decode(qkv, &cache, dims, out)?;
    attend(qkv, cache, dims, sparse_top_k(sparsity, cache.total), simd_available(), out);
    Ok(())
}

fn check_decode(qkv: &[f16], cache: &HostCache<'_>, dims: AttnDims, out: &[f16]) -> Result<()> {
    dims.validate()?;
    check_len("qkv (one row per sequence)", qkv.len(), dims.batch * 3 * dims.hidden())?;
    check_len("keys", cache.keys.len(), dims.cache_elems())?;
    check_len("values", cache.values.len(), dims.cache_elems())?;
    check_len("key_mask", cache.key_mask.len(), dims.batch * dims.capacity)?;
    check_len("out", out.len(), dims.batch * dims.hidden())?;
    if cache.total == 0 || cache.total > dims.capacity {
        return Err(invalid(format!("{} positions filled, the cache holds 1 to {}", cache.total, dims.capacity)));
    }
    Ok(())
}

/// Per-thread buffers of [`attend`].
struct Scratch {
    q: Vec<f32>,
    scores: Vec<f32>,
    rows: Vec<f32>,
    acc: Vec<f32>,
    picks: Vec<usize>,
}

/// Whether the fused x86-64 kernels (AVX2, FMA, F16C) can run here.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The parallel driver, lengths checked. `top_k`: `None` for dense
/// attention, else the past positions kept (see [`decode_attention`]).
/// `simd`: use the fused x86-64 kernels (only if [`simd_available`]).
fn attend(qkv: &[f16], cache: HostCache<'_>, dims: AttnDims, top_k: Option<usize>, simd: bool, out: &mut [f16]) {
    let (hidden, hd, total) = (dims.hidden(), dims.head_dim, cache.total);
    let chunk_rows = (CHUNK_ELEMS / hd).max(1);
    let block = dims.capacity * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each_init(
        || Scratch {
            q: vec![0.0; hd],
            scores: vec![0.0; total],
            rows: vec![0.0; chunk_rows * hd],
            acc: vec![0.0; hd],
            picks: Vec::new(),
        },
        |s, (i, out_head)| {
            let (b, h) = (i / dims.heads, i % dims.heads);
            let head = Head {
                q: &qkv[b * 3 * hidden + h * hd..][..hd],
                keys: &cache.keys[i * block..][..total * hd],
                values: &cache.values[i * block..][..total * hd],
                mask: &cache.key_mask[b * dims.capacity..][..total],
            };
            head.attend(scale, top_k, chunk_rows, simd, s);
            for (o, a) in out_head.iter_mut().zip(&s.acc) {
                *o = f16::from_f32(*a);
            }
        },
    );
}

/// One head of one sequence: its query and its `total × head_dim` keys and
/// values.
struct Head<'a> {
    q: &'a [f16],
    keys: &'a [f16],
    values: &'a [f16],
    mask: &'a [u8],
}

impl Head<'_> {
    /// Leaves the attention output in `s.acc`.
    fn attend(&self, scale: f32, top_k: Option<usize>, chunk_rows: usize, simd: bool, s: &mut Scratch) {
        let total = self.mask.len();
        convert_f16(self.q, &mut s.q);
        let scores = &mut s.scores[..total];
        self.scores(scale, chunk_rows, simd, &s.q, &mut s.rows, scores);
        let mask = self.mask;
        ops::cpu::softmax_masked(scores, 1.0, |p| mask[p] != 0);

        s.acc.fill(0.0);
        match top_k {
            None => self.dense_values(chunk_rows, simd, scores, &mut s.rows, &mut s.acc),
            Some(k) => {
                let picks = &mut s.picks;
                picks.clear();
                picks.extend((0..total - 1).filter(|&p| mask[p] != 0));
                if k < picks.len() {
                    // Largest weights first; ties to the earlier position.
                    picks.select_nth_unstable_by(k, |&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                    picks.truncate(k);
                    // Ascending positions: the sum's order matches the dense path.
                    picks.sort_unstable();
                }
                if mask[total - 1] != 0 {
                    picks.push(total - 1);
                }
                self.sparse_values(simd, scores, picks, &mut s.rows, &mut s.acc);
            }
        }
    }

    /// `scores[p] = scale · (q · k_p)`: one pass over the keys.
    fn scores(&self, scale: f32, chunk_rows: usize, simd: bool, q: &[f32], rows: &mut [f32], scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only set where `x86::available()` said the
            // CPU has AVX2, FMA and F16C, all the function requires.
            unsafe { x86::scores(q, self.keys, scale, scores) };
            return;
        }
        let _ = simd;
        let hd = q.len();
        // A chunk of rows converted at a time.
        for (kc, sc) in self.keys.chunks(chunk_rows * hd).zip(scores.chunks_mut(chunk_rows)) {
            let rows = &mut rows[..kc.len()];
            convert_f16(kc, rows);
            for (row, score) in rows.chunks_exact(hd).zip(sc.iter_mut()) {
                *score = scale * dot(q, row);
            }
        }
    }

    /// `acc = Σ_p w_p · v_p` over the unmasked positions.
    fn dense_values(&self, chunk_rows: usize, simd: bool, weights: &[f32], rows: &mut [f32], acc: &mut [f32]) {
        let mask = self.mask;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: as in `scores`: the CPU has AVX2, FMA and F16C.
            unsafe { x86::accumulate(self.values, (0..mask.len()).filter(|&p| mask[p] != 0), weights, acc) };
            return;
        }
        let _ = simd;
        let hd = acc.len();
        for (c, vc) in self.values.chunks(chunk_rows * hd).enumerate() {
            let rows = &mut rows[..vc.len()];
            convert_f16(vc, rows);
            let p0 = c * chunk_rows;
            let chunk_mask = &mask[p0..p0 + vc.len() / hd];
            for ((row, &w), &m) in rows.chunks_exact(hd).zip(&weights[p0..]).zip(chunk_mask) {
                if m != 0 {
                    axpy(acc, w, row);
                }
            }
        }
    }

    /// `acc = Σ_p w_p · v_p` over the positions picked (each below `total`).
    fn sparse_values(&self, simd: bool, weights: &[f32], picks: &[usize], rows: &mut [f32], acc: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: as in `scores`: the CPU has AVX2, FMA and F16C.
            unsafe { x86::accumulate(self.values, picks.iter().copied(), weights, acc) };
            return;
        }
        let _ = simd;
        let hd = acc.len();
        let row = &mut rows[..hd];
        for &p in picks {
            convert_f16(&self.values[p * hd..(p + 1) * hd], row);
            axpy(acc, weights[p], row);
        }
    }
}

/// `a · b` in f32 with `LANES` independent partial sums, so that the loop
/// vectorises (the lanes are summed at the end).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a16, a_rest) = a.as_chunks::<LANES>();
    let (b16, b_rest) = b.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (x, y) in a16.iter().zip(b16) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in a_rest.iter().zip(b_rest) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// `acc += w · x`, vectorised in `LANES`-wide chunks.
#[inline(always)]
fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    let (a16, a_rest) = acc.as_chunks_mut::<LANES>();
    let (x16, x_rest) = x.as_chunks::<LANES>();
    for (a, x) in a16.iter_mut().zip(x16) {
        for l in 0..LANES {
            a[l] += w * x[l];
        }
    }
    for (a, x) in a_rest.iter_mut().zip(x_rest) {
        *a += w * x;
    }
}

/// The fused kernels: keys and values are read as f16 straight into
/// registers, converted 8 at a time (F16C) and used at once (FMA), so the
/// loads of the next rows overlap the arithmetic of this one, and no f32
/// copy passes through the L1 cache.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::{
        __m128i, __m256, _mm256_add_ps, _mm256_castps256_ps128, _mm256_cvtph_ps, _mm256_extractf128_ps,
        _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps, _mm_add_ps, _mm_add_ss,
        _mm_cvtss_f32, _mm_loadu_si128, _mm_movehl_ps, _mm_shuffle_ps,
    };

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    /// Eight f16 at `src[i..i + 8]` as f32.
    ///
    /// # Safety
    /// The CPU supports F16C and AVX; `i + 8 <= src.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(src: &[f16], i: usize) -> __m256 {
        debug_assert!(i + 8 <= src.len());
        // SAFETY: the caller guarantees 8 values (16 bytes) at `i`; the load
        // is unaligned.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i).cast::<__m128i>())) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps::<1>(x, x)))
    }

    /// `scores[p] = scale · (q · keys[p])`, each key row `q.len()` long.
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C. (A `keys` too short panics.)
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scores(q: &[f32], keys: &[f16], scale: f32, scores: &mut [f32]) {
        let hd = q.len();
        let n8 = hd / 8 * 8;
        for (p, score) in scores.iter_mut().enumerate() {
            let row = &keys[p * hd..(p + 1) * hd];
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= n8 {
                // SAFETY: `i + 16 <= hd`, the length of `q` and of `row`;
                // the features are enabled on this function.
                unsafe {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), load8(row, i), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i + 8)), load8(row, i + 8), a1);
                }
                i += 16;
            }
            if i < n8 {
                // SAFETY: `i + 8 <= n8 <= hd`, as above.
                unsafe { a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), load8(row, i), a0) };
            }
            let mut sum = hsum(_mm256_add_ps(a0, a1));
            for (x, y) in q[n8..].iter().zip(&row[n8..]) {
                sum += x * y.to_f32();
            }
            *score = scale * sum;
        }
    }

    /// `acc += weights[p] · values[p]` for each position `p` of `positions`,
    /// each value row `acc.len()` long.
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C. (A position whose row or weight
    /// is out of range panics.)
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn accumulate(
        values: &[f16],
        positions: impl Iterator<Item = usize>,
        weights: &[f32],
        acc: &mut [f32],
    ) {
        let hd = acc.len();
        let n8 = hd / 8 * 8;
        for p in positions {
            let row = &values[p * hd..(p + 1) * hd];
            let w = weights[p];
            let wv = _mm256_set1_ps(w);
            let mut i = 0;
            while i < n8 {
                // SAFETY: `i + 8 <= hd`, the length of `acc` and of `row`;
                // the features are enabled on this function.
                unsafe {
                    let a = acc.as_mut_ptr().add(i);
                    _mm256_storeu_ps(a, _mm256_fmadd_ps(wv, load8(row, i), _mm256_loadu_ps(a)));
                }
                i += 8;
            }
            for (a, v) in acc[n8..].iter_mut().zip(&row[n8..]) {
                *a += w * v.to_f32();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_f16(rng: &mut ChaCha8Rng, n: usize, amp: f32) -> Vec<f16> {
        (0..n).map(|_| f16::from_f32(rng.random_range(-amp..amp))).collect()
    }

    /// A filled cache, its qkv row and mask. `pad[b]` masks the first
    /// positions of sequence `b` (left padding); `holes` also masks every
    /// 7th position past the padding, except the newest.
    struct Case {
        dims: AttnDims,
        total: usize,
        qkv: Vec<f16>,
        keys: Vec<f16>,
        values: Vec<f16>,
        mask: Vec<u8>,
    }

    fn case(dims: AttnDims, total: usize, pad: &[usize], holes: bool, seed: u64) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = dims.cache_elems();
        // Garbage beyond `total` must not be read: fill the whole capacity.
        let keys = random_f16(&mut rng, n, 1.0);
        let values = random_f16(&mut rng, n, 1.0);
        // Large queries make the softmax peaked, so top-k choices matter.
        let qkv = random_f16(&mut rng, dims.batch * 3 * dims.hidden(), 3.0);
        let mut mask = vec![0u8; dims.batch * dims.capacity];
        for b in 0..dims.batch {
            for p in 0..total {
                let hole = holes && p % 7 == 3 && p + 1 < total;
                mask[b * dims.capacity + p] = u8::from(p >= pad[b] && !hole);
            }
            // Garbage mask beyond `total`.
            for p in total..dims.capacity {
                mask[b * dims.capacity + p] = 1;
            }
        }
        Case { dims, total, qkv, keys, values, mask }
    }

    impl Case {
        fn cache(&self) -> HostCache<'_> {
            HostCache { keys: &self.keys, values: &self.values, key_mask: &self.mask, total: self.total }
        }

        /// Through the public function, and through the portable kernels;
        /// asserts they agree and returns the first.
        fn run(&self, sparsity: f64) -> Vec<f16> {
            let mut out = vec![f16::ZERO; self.dims.batch * self.dims.hidden()];
            decode_attention(&self.qkv, self.cache(), self.dims, sparsity, &mut out).unwrap();
            let portable = self.run_path(sparse_top_k(sparsity, self.total), false);
            for (a, b) in out.iter().zip(&portable) {
                assert!((a.to_f32() - b.to_f32()).abs() <= 1e-3 * b.to_f32().abs() + 1e-4, "{a} vs {b}");
            }
            out
        }

        fn run_path(&self, top_k: Option<usize>, simd: bool) -> Vec<f16> {
            let mut out = vec![f16::ZERO; self.dims.batch * self.dims.hidden()];
            attend(&self.qkv, self.cache(), self.dims, top_k, simd, &mut out);
            out
        }

        /// Naive f64 attention, straight from the layouts; `top_k` as in
        /// [`attend`].
        fn reference(&self, top_k: Option<usize>) -> Vec<f64> {
            let AttnDims { batch, heads, head_dim: hd, capacity } = self.dims;
            let hidden = heads * hd;
            let mut out = vec![0.0f64; batch * hidden];
            for b in 0..batch {
                for h in 0..heads {
                    let q: Vec<f64> = (0..hd).map(|d| self.qkv[b * 3 * hidden + h * hd + d].to_f64()).collect();
                    let at = |p: usize, d: usize| ((b * heads + h) * capacity + p) * hd + d;
                    let real: Vec<usize> = (0..self.total).filter(|&p| self.mask[b * capacity + p] != 0).collect();
                    let scores: Vec<f64> = real
                        .iter()
                        .map(|&p| {
                            (0..hd).map(|d| q[d] * self.keys[at(p, d)].to_f64()).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = exps.iter().sum();
                    let mut weighted: Vec<(usize, f64)> = real.iter().zip(&exps).map(|(&p, e)| (p, e / sum)).collect();
                    if let Some(k) = top_k {
                        let newest = weighted.iter().find(|(p, _)| *p == self.total - 1).copied();
                        let mut past: Vec<(usize, f64)> =
                            weighted.iter().filter(|(p, _)| *p < self.total - 1).copied().collect();
                        past.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
                        past.truncate(k);
                        weighted = past.into_iter().chain(newest).collect();
                    }
                    for (p, w) in weighted {
                        for d in 0..hd {
                            out[b * hidden + h * hd + d] += w * self.values[at(p, d)].to_f64();
                        }
                    }
                }
            }
            out
        }
    }

    fn assert_close(got: &[f16], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let g = g.to_f64();
            assert!((g - w).abs() <= 1e-3 * w.abs() + 2e-4, "element {i}: got {g}, want {w}");
        }
    }

    fn dims(batch: usize, heads: usize, head_dim: usize, capacity: usize) -> AttnDims {
        AttnDims { batch, heads, head_dim, capacity }
    }

    #[test]
    fn dense_matches_reference() {
        for (d, total, pad, holes) in [
            (dims(3, 4, 64, 40), 33, vec![0, 5, 17], true),
            (dims(3, 2, 128, 300), 257, vec![2, 0, 100], false),
            (dims(1, 3, 12, 20), 11, vec![4], true),
            (dims(1, 2, 24, 9), 9, vec![0], false),
            (dims(2, 2, 12, 2), 1, vec![0, 0], false),
        ] {
            let c = case(d, total, &pad, holes, 7 + total as u64);
            assert_close(&c.run(1.0), &c.reference(None));
        }
    }

    #[test]
    fn sparsity_one_is_dense() {
        let c = case(dims(3, 4, 64, 50), 41, &[0, 6, 13], true, 11);
        let dense = c.run(1.0);
        assert_eq!(sparse_top_k(1.0, 41), None);
        // The sparse path keeping every past position gives the dense result.
        for simd in [false, simd_available()] {
            let out = c.run_path(Some(40), simd);
            for (a, b) in out.iter().zip(&dense) {
                assert!((a.to_f32() - b.to_f32()).abs() <= 1e-3 * b.to_f32().abs() + 1e-4, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn sparse_matches_top_k_reference() {
        for (d, total, pad, holes, s) in [
            (dims(3, 4, 64, 40), 33, vec![0, 5, 17], true, 0.25),
            (dims(1, 2, 128, 70), 65, vec![9], false, 0.25),
            (dims(3, 3, 12, 30), 29, vec![0, 3, 20], true, 0.25),
            (dims(2, 2, 64, 33), 33, vec![0, 0], false, 0.5),
            // k = int(0.01 × 32) = 0: only the newest position.
            (dims(2, 2, 64, 33), 33, vec![0, 4], false, 0.01),
            // More kept than real past positions: all of them.
            (dims(1, 2, 64, 40), 40, vec![35], false, 0.25),
        ] {
            let c = case(d, total, &pad, holes, 100 + total as u64);
            let k = (s * (total - 1) as f64) as usize;
            assert_eq!(sparse_top_k(s, total), Some(k));
            assert_close(&c.run(s), &c.reference(Some(k)));
        }
        assert_eq!(sparse_top_k(0.25, 33), Some(8));
        assert_eq!(sparse_top_k(0.25, 1), Some(0));
    }

    #[test]
    fn sparse_sum_is_not_renormalised() {
        // All values 1: the dense output is 1, a sparse one the kept weight.
        let mut c = case(dims(1, 1, 16, 64), 64, &[0], false, 3);
        c.values.fill(f16::ONE);
        let dense = c.run(1.0);
        let sparse = c.run(0.1);
        assert!(dense.iter().all(|v| (v.to_f32() - 1.0).abs() < 1e-3));
        assert!(sparse.iter().all(|v| v.to_f32() < 0.999 && v.to_f32() > 0.0));
    }

    #[test]
    fn append_then_attend() {
        let d = dims(3, 4, 12, 16);
        let hidden = d.hidden();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut keys = vec![f16::ZERO; d.cache_elems()];
        let mut values = vec![f16::ZERO; d.cache_elems()];
        // Prefill of 5, then two decode steps of 1.
        let prefill = random_f16(&mut rng, d.batch * 5 * 3 * hidden, 1.0);
        append_kv(&prefill, 5, d, 0, &mut keys, &mut values).unwrap();
        let mut steps = Vec::new();
        for past in [5, 6] {
            let step = random_f16(&mut rng, d.batch * 3 * hidden, 1.0);
            append_kv(&step, 1, d, past, &mut keys, &mut values).unwrap();
            steps.push(step);
        }
        // Every position holds the row it came from; the rest stays zero.
        for b in 0..d.batch {
            for h in 0..d.heads {
                for p in 0..d.capacity {
                    for e in 0..d.head_dim {
                        let at = ((b * d.heads + h) * d.capacity + p) * d.head_dim + e;
                        let row: Option<&[f16]> = match p {
                            0..5 => Some(&prefill[(b * 5 + p) * 3 * hidden..][..3 * hidden]),
                            5 | 6 => Some(&steps[p - 5][b * 3 * hidden..][..3 * hidden]),
                            _ => None,
                        };
                        let (k, v) = row.map_or((f16::ZERO, f16::ZERO), |r| {
                            (r[hidden + h * d.head_dim + e], r[2 * hidden + h * d.head_dim + e])
                        });
                        assert_eq!((keys[at], values[at]), (k, v), "b {b} h {h} p {p} e {e}");
                    }
                }
            }
        }
        // Attention over the appended cache, query from the last step.
        let mask = vec![1u8; d.batch * d.capacity];
        let c = Case { dims: d, total: 7, qkv: steps[1].clone(), keys, values, mask };
        assert_close(&c.run(1.0), &c.reference(None));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let d = dims(2, 2, 8, 10);
        let hidden = d.hidden();
        let n = d.cache_elems();
        let (mut k, mut v) = (vec![f16::ZERO; n], vec![f16::ZERO; n]);
        let qkv = vec![f16::ZERO; 2 * 3 * hidden];
        let mask = vec![1u8; 2 * 10];
        let mut out = vec![f16::ZERO; 2 * hidden];

        // append_kv
        assert!(append_kv(&qkv, 1, d, 9, &mut k, &mut v).is_ok());
        assert!(append_kv(&qkv, 1, d, 10, &mut k, &mut v).is_err(), "capacity overflow");
        assert!(append_kv(&qkv, 1, d, usize::MAX, &mut k, &mut v).is_err(), "past overflows");
        assert!(append_kv(&qkv, 2, d, 0, &mut k, &mut v).is_err(), "qkv too short");
        assert!(append_kv(&qkv[1..], 1, d, 0, &mut k, &mut v).is_err());
        assert!(append_kv(&qkv, 1, d, 0, &mut k[1..], &mut v).is_err());
        assert!(append_kv(&qkv, 1, d, 0, &mut k, &mut v[..n - 1]).is_err());
        assert!(append_kv(&qkv, 1, dims(2, 0, 8, 10), 0, &mut k, &mut v).is_err());
        assert!(append_kv(&qkv, 1, dims(usize::MAX, 2, 8, 10), 0, &mut k, &mut v).is_err());

        // decode_attention
        let cache = |total| HostCache { keys: &k, values: &v, key_mask: &mask, total };
        assert!(decode_attention(&qkv, cache(10), d, 1.0, &mut out).is_ok());
        assert!(decode_attention(&qkv, cache(11), d, 1.0, &mut out).is_err(), "total > capacity");
        assert!(decode_attention(&qkv, cache(0), d, 1.0, &mut out).is_err(), "total 0");
        for s in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(decode_attention(&qkv, cache(5), d, s, &mut out).is_err(), "sparsity {s}");
        }
        assert!(decode_attention(&qkv[1..], cache(5), d, 1.0, &mut out).is_err());
        assert!(decode_attention(&qkv, cache(5), d, 1.0, &mut out[1..]).is_err());
        let short = HostCache { keys: &k[1..], values: &v, key_mask: &mask, total: 5 };
        assert!(decode_attention(&qkv, short, d, 1.0, &mut out).is_err());
        let short = HostCache { keys: &k, values: &v[1..], key_mask: &mask, total: 5 };
        assert!(decode_attention(&qkv, short, d, 1.0, &mut out).is_err());
        let short = HostCache { keys: &k, values: &v, key_mask: &mask[1..], total: 5 };
        assert!(decode_attention(&qkv, short, d, 1.0, &mut out).is_err());
        assert!(decode_attention(&qkv, cache(5), dims(2, 2, 0, 10), 1.0, &mut out).is_err());
    }

    #[test]
    fn fully_masked_sequence_gives_zeros() {
        let mut c = case(dims(2, 2, 16, 8), 8, &[0, 0], false, 9);
        c.mask[8..16].fill(0);
        let out = c.run(1.0);
        assert!(out[32..].iter().all(|v| *v == f16::ZERO));
        assert_close(&out[..32], &c.reference(None)[..32]);
    }
}
