//! The f16/bf16 GPU ops (`ops::gpu::llm`, `Blas::linear_half`,
//! `Blas::gemm_batched_half`), over the views of `ops::gpu::view`, in f16
//! and bf16 against the CPU reference (`ops::cpu`). Every test passes, saying "skipped: no GPU", where the GPU
//! cannot run.
//!
//! Inputs are rounded to the 16-bit type first and the CPU computes in f32
//! on the rounded values, so the GPU's outputs differ from the reference by
//! their own rounding (and f32 summation order): tolerances are relative
//! (2e-3 for f16, 1e-2 for bf16) plus a small absolute part proportional to
//! the largest expected value. Copies and fills are compared bit for bit.

use half::{bf16, f16};
use ops::gpu::blas::{HalfOut, Operand};
use ops::gpu::buffer::{DevBuf, DevElem, Half};
use ops::gpu::llm::{attn_decode_fits, LlmKernels};
use ops::gpu::view::{DecodeAttn, Gemm, KvShape, KvView, Mat, MatMut, Rotary, ScoreRows};
use ops::gpu::Gpu;
use ops::{attention, softmax_masked, Activation, AttentionShape, DType, KvCache, Rope, RopeScaling, Tensor};

fn gpu() -> Option<Gpu> {
    if let Some(reason) = ops::gpu::unavailable_reason() {
        println!("skipped: no GPU ({reason})");
        return None;
    }
    Some(Gpu::new(0).unwrap_or_else(|e| panic!("{e}")))
}

/// A 16-bit type under test, with its CPU storage type and tolerance.
trait Ty: Half + std::fmt::Debug + PartialEq {
    const CPU: DType;
    const RTOL: f32;
}

impl Ty for f16 {
    const CPU: DType = DType::F16;
    const RTOL: f32 = 2e-3;
}

impl Ty for bf16 {
    const CPU: DType = DType::BF16;
    const RTOL: f32 = 1e-2;
}

/// Uniform in [-0.5, 0.5), from a hash of (seed, i).
fn rnd(seed: u64, i: usize) -> f32 {
    let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / 16_777_216.0 - 0.5
}

/// `n` values `offset + scale · rnd`, rounded to T, and the same as f32.
fn vals<T: Half>(n: usize, seed: u64, scale: f32, offset: f32) -> (Vec<T>, Vec<f32>) {
    let t: Vec<T> = (0..n).map(|i| T::from_f32(offset + scale * rnd(seed, i))).collect();
    let f = t.iter().map(|v| v.to_f32()).collect();
    (t, f)
}

fn up<E: DevElem>(gpu: &Gpu, host: &[E]) -> DevBuf<E> {
    DevBuf::from_host(gpu, host).unwrap_or_else(|e| panic!("upload: {e}"))
}

/// `buf` as dense `rows × cols` (which must fit).
fn m<E: DevElem>(buf: &DevBuf<E>, rows: usize, cols: usize) -> Mat<'_, E> {
    Mat::new(buf, rows, cols).unwrap_or_else(|e| panic!("view: {e}"))
}

/// `buf` as dense `rows × cols` to write (which must fit).
fn mm<E: DevElem>(buf: &DevBuf<E>, rows: usize, cols: usize) -> MatMut<'_, E> {
    MatMut::new(buf, rows, cols).unwrap_or_else(|e| panic!("view: {e}"))
}

fn raw<E: DevElem>(gpu: &Gpu, buf: &DevBuf<E>) -> Vec<E> {
    buf.download(gpu.stream()).unwrap_or_else(|e| panic!("download: {e}"))
}

fn down<T: Half>(gpu: &Gpu, buf: &DevBuf<T>) -> Vec<f32> {
    raw(gpu, buf).into_iter().map(Half::to_f32).collect()
}

fn tensor(shape: Vec<usize>, v: &[f32]) -> Tensor {
    Tensor::from_f32(DType::F32, shape, v).unwrap_or_else(|e| panic!("{e}"))
}

/// Every `got[i]` within `rtol · (|want[i]| + frac · max|want|)`.
fn check_with(what: &str, got: &[f32], want: &[f32], rtol: f32, frac: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let max = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut worst = (0.0f32, 0usize);
    for (i, (g, e)) in got.iter().zip(want).enumerate() {
        let tol = rtol * (e.abs() + frac * max) + 1e-30;
        let r = (g - e).abs() / tol;
        assert!(r.is_finite() && r <= 1.0, "{what}: element {i} is {g}, expected {e} (tolerance {tol}, max {max})");
        if r > worst.0 {
            worst = (r, i);
        }
    }
    println!("{what}: {} values, worst error {:.3} of the tolerance (element {})", got.len(), worst.0, worst.1);
}

/// T's tolerance, with an absolute part of a tenth of the largest value's.
fn check<T: Ty>(what: &str, got: &[f32], want: &[f32]) {
    check_frac::<T>(what, got, want, 0.1);
}

/// T's tolerance with an absolute part of `frac` of the largest value's:
/// larger where a result is rounded to T twice (a product's partial sums,
/// attention's scores and probabilities) and may cancel to near zero.
fn check_frac<T: Ty>(what: &str, got: &[f32], want: &[f32], frac: f32) {
    check_with(&format!("{what} ({})", T::SUFFIX), got, want, T::RTOL, frac);
}

fn llm(gpu: &Gpu) -> &LlmKernels {
    gpu.llm().unwrap_or_else(|e| panic!("loading the f16/bf16 kernels: {e}"))
}

// ---------------------------------------------------------------------------

#[test]
fn the_kernels_load_once() {
    let Some(gpu) = gpu() else { return };
    let a: *const LlmKernels = llm(&gpu);
    let b: *const LlmKernels = llm(&gpu);
    assert_eq!(a, b);
}

fn embed_and_mask<T: Ty>(gpu: &Gpu) {
    let k = llm(gpu);
    let (vocab, h) = (50, 72);
    let (table, table_f) = vals::<T>(vocab * h, 1, 2.0, 0.0);
    let ids: Vec<u32> = vec![3, 0, 49, 50, 17, 3];
    let rows = ids.len();
    let (tok, tab, out) = (up(gpu, &ids), up(gpu, &table), up(gpu, &vec![7.0f32; rows * h]));
    k.embed_rows(gpu, &tok, rows, &tab, (vocab, h), &out).unwrap();
    let got = raw(gpu, &out);
    for (r, &id) in ids.iter().enumerate() {
        let want: Vec<f32> =
            if (id as usize) < vocab { table_f[id as usize * h..(id as usize + 1) * h].to_vec() } else { vec![0.0; h] };
        assert_eq!(&got[r * h..(r + 1) * h], &want[..], "embed row {r} ({})", T::SUFFIX);
    }
    // Too small an output is refused.
    let small = up(gpu, &vec![0.0f32; rows * h - 1]);
    assert!(k.embed_rows(gpu, &tok, rows, &tab, (vocab, h), &small).is_err());

    let (batch, new_len, stride, past) = (3, 4, 10, 5);
    let step: Vec<u8> = (0..batch * new_len).map(|i| u8::from(i % 3 != 0)).collect();
    let key_mask = up(gpu, &vec![7u8; batch * stride]);
    k.write_mask(gpu, &up(gpu, &step), (batch, new_len), &key_mask, stride, past).unwrap();
    let got = raw(gpu, &key_mask);
    for b in 0..batch {
        for j in 0..stride {
            let want = if (past..past + new_len).contains(&j) { step[b * new_len + j - past] } else { 7 };
            assert_eq!(got[b * stride + j], want, "mask of sequence {b} at {j}");
        }
    }
    assert!(k.write_mask(gpu, &up(gpu, &step), (batch, new_len), &key_mask, stride, 7).is_err());
}

#[test]
fn embeddings_and_masks() {
    let Some(gpu) = gpu() else { return };
    embed_and_mask::<f16>(&gpu);
    embed_and_mask::<bf16>(&gpu);
}

fn rms_norms<T: Ty>(gpu: &Gpu) {
    let k = llm(gpu);
    let eps = 1e-6;
    // Warp-per-row (200) and block-per-row widths.
    for h in [200, 896, 5120] {
        let (batch, s) = (3, 5);
        let rows = batch * s;
        let hidden: Vec<f32> = (0..rows * h).map(|i| 3.0 * rnd(10 + h as u64, i) + 0.2).collect();
        let (w, w_f) = vals::<T>(h, 11, 1.0, 1.0);
        let (x, wb) = (up(gpu, &hidden), up(gpu, &w));
        let out = up(gpu, &vec![T::from_f32(0.0); rows * h]);
        // Every row.
        k.rms_norm_f32(gpu, m(&x, rows, h), &wb, eps, mm(&out, rows, h)).unwrap();
        let mut want = hidden.clone();
        ops::rms_norm(&mut want, &tensor(vec![h], &w_f), eps).unwrap();
        check::<T>(&format!("rms_norm_f32 h {h}"), &down(gpu, &out), &want);
        // Each sequence's last row.
        let last = up(gpu, &vec![T::from_f32(0.0); batch * h]);
        let last_rows = Mat::strided(&x, (s - 1) * h, batch, h, s * h).unwrap();
        k.rms_norm_f32(gpu, last_rows, &wb, eps, mm(&last, batch, h)).unwrap();
        let mut want: Vec<f32> =
            (0..batch).flat_map(|b| hidden[(b * s + s - 1) * h..(b * s + s) * h].to_vec()).collect();
        ops::rms_norm(&mut want, &tensor(vec![h], &w_f), eps).unwrap();
        check::<T>(&format!("rms_norm_f32 last rows h {h}"), &down(gpu, &last), &want);
        // Reading past the input is refused (by the view).
        let past_end = Mat::strided(&x, s * h, batch, h, s * h);
        assert!(past_end.and_then(|x| k.rms_norm_f32(gpu, x, &wb, eps, mm(&last, batch, h))).is_err());
        // An output of another shape is refused (by the op).
        assert!(k.rms_norm_f32(gpu, m(&x, batch, h), &wb, eps, mm(&last, batch - 1, h)).is_err());
    }
    // Per-head norms of T rows.
    for dim in [64, 128, 512] {
        let rows = 7 * 4;
        let (x, x_f) = vals::<T>(rows * dim, 12 + dim as u64, 4.0, 0.0);
        let (w, w_f) = vals::<T>(dim, 13, 0.5, 1.0);
        let xb = up(gpu, &x);
        k.rms_norm_inplace(gpu, &xb, rows, dim, &up(gpu, &w), 1e-6).unwrap();
        let mut want = x_f;
        ops::rms_norm(&mut want, &tensor(vec![dim], &w_f), 1e-6).unwrap();
        check::<T>(&format!("rms_norm_inplace dim {dim}"), &down(gpu, &xb), &want);
    }
}

#[test]
fn rms_norm_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    rms_norms::<f16>(&gpu);
    rms_norms::<bf16>(&gpu);
}

fn ropes<T: Ty>(gpu: &Gpu) {
    let k = llm(gpu);
    let positions: Vec<usize> = vec![0, 1, 7, 100, 4095, 70_000, 131_071];
    let rows = positions.len();
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    for (head_dim, heads, theta, scaling) in
        [(64, 4, 10_000.0, RopeScaling::None), (128, 3, 500_000.0, llama3), (128, 2, 1_000_000.0, RopeScaling::None)]
    {
        let rope = Rope::new(theta, head_dim, scaling).unwrap();
        let (x, x_f) = vals::<T>(rows * heads * head_dim, 20 + head_dim as u64, 2.0, 0.0);
        let xb = up(gpu, &x);
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let (pb, fb) = (up(gpu, &pos), up(gpu, rope.inv_freq()));
        let rot = Rotary { positions: &pb, inv_freq: &fb };
        k.rope(gpu, mm(&xb, rows, heads * head_dim), (heads, head_dim), rot).unwrap();
        let mut want = x_f;
        rope.apply(&mut want, heads, &positions).unwrap();
        check::<T>(&format!("rope head_dim {head_dim} theta {theta}"), &down(gpu, &xb), &want);
    }
}

fn splits<T: Ty>(gpu: &Gpu) {
    let k = llm(gpu);
    let positions: Vec<usize> = vec![0, 3, 511, 8191, 100_000];
    let rows = positions.len();
    let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
    for (head_dim, heads, kv_heads) in [(64, 4, 2), (128, 3, 1), (16, 2, 2)] {
        let rope = Rope::new(500_000.0, head_dim, RopeScaling::None).unwrap();
        let (qw, kvw) = (heads * head_dim, kv_heads * head_dim);
        let stack = qw + 2 * kvw;
        let (x, x_f) = vals::<T>(rows * stack, 90 + head_dim as u64, 2.0, 0.0);
        let xb = up(gpu, &x);
        let (qb, kb, vb) = (
            DevBuf::<T>::alloc(gpu, rows * qw).unwrap(),
            DevBuf::<T>::alloc(gpu, rows * kvw).unwrap(),
            DevBuf::<T>::alloc(gpu, rows * kvw).unwrap(),
        );
        let part = |at: usize, w: usize| -> Vec<f32> {
            (0..rows).flat_map(|r| x_f[r * stack + at..r * stack + at + w].to_vec()).collect()
        };
        let (q_f, k_f, v_f) = (part(0, qw), part(qw, kvw), part(qw + kvw, kvw));
        let shape = KvShape { heads, kv_heads, head_dim };
        let outs = |rows: usize| (mm(&qb, rows, qw), mm(&kb, rows, kvw), mm(&vb, rows, kvw));
        // Unrotated: the parts exactly.
        k.split_qkv(gpu, m(&xb, rows, stack), shape, None, outs(rows)).unwrap();
        let what = |s: &str| format!("split_qkv {s} head_dim {head_dim} ({})", T::SUFFIX);
        assert_eq!(down(gpu, &qb), q_f, "{}", what("q"));
        assert_eq!(down(gpu, &kb), k_f, "{}", what("k"));
        assert_eq!(down(gpu, &vb), v_f, "{}", what("v"));
        // Rotated: q and k as the CPU's rope gives them, v as it was.
        let (pb, fb) = (up(gpu, &pos), up(gpu, rope.inv_freq()));
        let rot = Rotary { positions: &pb, inv_freq: &fb };
        k.split_qkv(gpu, m(&xb, rows, stack), shape, Some(rot), outs(rows)).unwrap();
        let (mut q_want, mut k_want) = (q_f, k_f);
        rope.apply(&mut q_want, heads, &positions).unwrap();
        rope.apply(&mut k_want, kv_heads, &positions).unwrap();
        check::<T>(&what("rotated q"), &down(gpu, &qb), &q_want);
        check::<T>(&what("rotated k"), &down(gpu, &kb), &k_want);
        assert_eq!(down(gpu, &vb), v_f, "{}", what("v beside the rotation"));
        // The same values as the split then rope (one kernel for two).
        let q2 = up(gpu, &raw(gpu, &qb));
        k.split_qkv(gpu, m(&xb, rows, stack), shape, None, outs(rows)).unwrap();
        k.rope(gpu, mm(&qb, rows, qw), (heads, head_dim), rot).unwrap();
        assert_eq!(raw(gpu, &qb), raw(gpu, &q2), "{}", what("against rope"));
        // More rows than the input holds are refused (by the view), and
        // outputs of other rows than the input's (by the op).
        assert!(Mat::new(&xb, rows + 1, stack).is_err());
        assert!(k.split_qkv(gpu, m(&xb, rows - 1, stack), shape, None, outs(rows)).is_err());
    }
}

#[test]
fn split_qkv_matches_the_cpu_rope() {
    let Some(gpu) = gpu() else { return };
    splits::<f16>(&gpu);
    splits::<bf16>(&gpu);
}

#[test]
fn rope_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    ropes::<f16>(&gpu);
    ropes::<bf16>(&gpu);
}

fn elementwise<T: Ty>(gpu: &Gpu) {
    let k = llm(gpu);
    // Rows of gate then up, side by side: the gate half takes the result,
    // the up half is left as it was.
    let (rows, n) = (7, 715);
    let (gu, gu_f) = vals::<T>(rows * 2 * n, 30, 16.0, 0.0);
    let gb = up(gpu, &gu);
    k.silu_mul(gpu, &gb, rows, n).unwrap();
    let got = down(gpu, &gb);
    for r in 0..rows {
        let row = &gu_f[r * 2 * n..(r + 1) * 2 * n];
        let mut want = row[..n].to_vec();
        ops::silu_mul_inplace(&mut want, &row[n..]).unwrap();
        check::<T>("silu_mul", &got[r * 2 * n..r * 2 * n + n], &want);
        assert_eq!(&got[r * 2 * n + n..(r + 1) * 2 * n], &row[n..], "silu_mul kept the up half ({})", T::SUFFIX);
    }
    assert!(k.silu_mul(gpu, &gb, rows + 1, n).is_err(), "a buffer too small is refused");

    let (rows, cols) = (5, 37);
    let (o, o_f) = vals::<T>(rows * cols, 32, 2.0, 0.0);
    let (b, b_f) = vals::<T>(cols, 33, 2.0, 0.0);
    let ob = up(gpu, &o);
    k.add_bias(gpu, mm(&ob, rows, cols), &up(gpu, &b)).unwrap();
    let want: Vec<f32> = o_f.iter().enumerate().map(|(i, v)| v + b_f[i % cols]).collect();
    check::<T>("add_bias", &down(gpu, &ob), &want);
    // Rounded once from the f32 sum: exactly what the host rounds.
    let exact: Vec<T> = want.iter().map(|&v| T::from_f32(v)).collect();
    assert_eq!(raw(gpu, &ob), exact, "add_bias rounding ({})", T::SUFFIX);
}

#[test]
fn silu_mul_and_bias_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    elementwise::<f16>(&gpu);
    elementwise::<bf16>(&gpu);
}

fn copies<T: Ty>(gpu: &Gpu) {
    let k = llm(gpu);
    let sentinel = T::from_f32(-7.0);
    // head_dim 64: 16-byte copies; 6: one value at a time.
    for hd in [64, 6] {
        let (batch, new_len, kv_heads, past, cap) = (2, 3, 2, 4, 9);
        let width = kv_heads * hd;
        let (kx, _) = vals::<T>(batch * new_len * width, 40, 1.0, 0.0);
        let (vx, _) = vals::<T>(batch * new_len * width, 41, 1.0, 0.0);
        let n = batch * kv_heads * cap * hd;
        let (keys, values) = (DevBuf::<T>::alloc(gpu, n).unwrap(), DevBuf::<T>::alloc(gpu, n).unwrap());
        k.fill(gpu, &keys, -7.0).unwrap();
        k.fill(gpu, &values, -7.0).unwrap();
        let kv =
            KvView::new((&keys, &values), batch, cap, KvShape { heads: kv_heads, kv_heads, head_dim: hd }).unwrap();
        let (kb, vb) = (up(gpu, &kx), up(gpu, &vx));
        let step = || (m(&kb, batch * new_len, width), m(&vb, batch * new_len, width));
        k.store_kv(gpu, step(), &kv, past..past + new_len).unwrap();
        let mut want_k = vec![sentinel; n];
        let mut want_v = vec![sentinel; n];
        for b in 0..batch {
            for i in 0..new_len {
                for g in 0..kv_heads {
                    for d in 0..hd {
                        let src = (b * new_len + i) * width + g * hd + d;
                        let dst = ((b * kv_heads + g) * cap + past + i) * hd + d;
                        want_k[dst] = kx[src];
                        want_v[dst] = vx[src];
                    }
                }
            }
        }
        assert_eq!(raw(gpu, &keys), want_k, "store_kv keys, head_dim {hd} ({})", T::SUFFIX);
        assert_eq!(raw(gpu, &values), want_v, "store_kv values, head_dim {hd} ({})", T::SUFFIX);
        assert!(k.store_kv(gpu, step(), &kv, cap - 2..cap - 2 + new_len).is_err(), "past the capacity");

        // Rows to heads and back.
        let (batch, s, heads) = (2, 3, 4);
        let (rows, _) = vals::<T>(batch * s * heads * hd, 42, 1.0, 0.0);
        let src = up(gpu, &rows);
        let mid = DevBuf::<T>::alloc(gpu, rows.len()).unwrap();
        let back = DevBuf::<T>::alloc(gpu, rows.len()).unwrap();
        k.transpose_heads(gpu, &src, &mid, (batch, s, heads, hd), true).unwrap();
        k.transpose_heads(gpu, &mid, &back, (batch, s, heads, hd), false).unwrap();
        let mut want = vec![sentinel; rows.len()];
        for b in 0..batch {
            for i in 0..s {
                for h in 0..heads {
                    for d in 0..hd {
                        want[((b * heads + h) * s + i) * hd + d] = rows[(b * s + i) * heads * hd + h * hd + d];
                    }
                }
            }
        }
        assert_eq!(raw(gpu, &mid), want, "transpose to heads, head_dim {hd} ({})", T::SUFFIX);
        assert_eq!(raw(gpu, &back), rows, "transpose back, head_dim {hd} ({})", T::SUFFIX);
    }
}

#[test]
fn kv_store_and_transposes_copy_exactly() {
    let Some(gpu) = gpu() else { return };
    copies::<f16>(&gpu);
    copies::<bf16>(&gpu);
}

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The fills' generator on the host (kernels.cu's `uniform_half` before
/// rounding).
fn uniform(seed: u64, i: u64, scale: f32) -> f32 {
    let z = mix64(seed ^ mix64(i));
    let x = (z >> 40) as f32 * (1.0 / 16_777_216.0);
    (2.0 * x - 1.0) * scale
}

fn fills<T: Ty>(gpu: &Gpu) {
    let k = llm(gpu);
    let n = 10_007;
    let (seed, scale) = (0x1234_5678_9abc, 0.02);
    let buf = DevBuf::<T>::alloc(gpu, n).unwrap();
    k.fill_uniform(gpu, &buf, seed, scale).unwrap();
    let want: Vec<T> = (0..n as u64).map(|i| T::from_f32(uniform(seed, i, scale))).collect();
    assert_eq!(raw(gpu, &buf), want, "fill_uniform ({})", T::SUFFIX);
    k.fill(gpu, &buf, 0.3).unwrap();
    assert!(raw(gpu, &buf).iter().all(|&v| v == T::from_f32(0.3)), "fill ({})", T::SUFFIX);
}

#[test]
fn fills_follow_the_f16_generator() {
    let Some(gpu) = gpu() else { return };
    fills::<f16>(&gpu);
    fills::<bf16>(&gpu);
    // The f16 entry point gives exactly the f16-only kernels' values (kernels.cu).
    let n = 4099;
    let (a, b) = (DevBuf::<f16>::alloc(&gpu, n).unwrap(), DevBuf::<f16>::alloc(&gpu, n).unwrap());
    llm(&gpu).fill_uniform(&gpu, &a, 99, 0.5).unwrap();
    gpu.kernels.fill_uniform_f16(&gpu, &b, 99, 0.5).unwrap();
    assert_eq!(raw(&gpu, &a), raw(&gpu, &b));
}

fn softmaxes<T: Ty>(gpu: &Gpu) {
    let k = llm(gpu);
    // Sequences 1 and 2 of a mask of 3 (b0 = 1): two pads, then seven.
    let (nb, heads, s, past, stride, b0) = (2, 3, 4, 5, 12, 1);
    let total = past + s;
    let mut mask = vec![0u8; 3 * stride];
    for (b, pads) in [(0, 0), (1, 2), (2, 7)] {
        for j in pads..total {
            mask[b * stride + j] = 1;
        }
    }
    let rows = nb * heads * s;
    let (sc, sc_f) = vals::<T>(rows * total, 50, 6.0, 0.0);
    let sb = up(gpu, &sc);
    let mask_b = up(gpu, &mask);
    let at = ScoreRows { seqs: nb, heads, new_len: s, past, first: b0 };
    k.softmax_causal(gpu, mm(&sb, rows, total), at, m(&mask_b, 3, stride)).unwrap();
    // More sequences than the mask has rows are refused.
    assert!(k.softmax_causal(gpu, mm(&sb, rows, total), at, m(&mask_b, 2, stride)).is_err());
    let mut want = sc_f;
    for (r, row) in want.chunks_mut(total).enumerate() {
        let (b, i) = (b0 + r / (heads * s), r % s);
        softmax_masked(row, 1.0, |j| j <= past + i && mask[b * stride + j] != 0);
    }
    // Rows of sequence 2 whose queries see only padding are zeros.
    assert!(want[(heads * s) * total..(heads * s + 1) * total].iter().all(|&v| v == 0.0));
    check::<T>("softmax_causal", &down(gpu, &sb), &want);

    // A row too long for registers: three passes.
    let (total, past, s) = (9000, 8998, 2);
    let mask: Vec<u8> = (0..total).map(|j| u8::from(j >= 3000)).collect();
    let (sc, sc_f) = vals::<T>(2 * s * total, 51, 8.0, 0.0);
    let sb = up(gpu, &sc);
    let at = ScoreRows { seqs: 1, heads: 2, new_len: s, past, first: 0 };
    k.softmax_causal(gpu, mm(&sb, 2 * s, total), at, m(&up(gpu, &mask), 1, total)).unwrap();
    let mut want = sc_f;
    for (r, row) in want.chunks_mut(total).enumerate() {
        let i = r % s;
        softmax_masked(row, 1.0, |j| j <= past + i && mask[j] != 0);
    }
    check::<T>("softmax_causal long rows", &down(gpu, &sb), &want);
}

#[test]
fn softmax_causal_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    softmaxes::<f16>(&gpu);
    softmaxes::<bf16>(&gpu);
}

fn linears<T: Ty>(gpu: &Gpu) {
    for lt in [true, false] {
        gpu.blas.set_lt_enabled(lt);
        for (case, &(rows, n, kk)) in [(1, 96, 128), (7, 200, 64), (33, 256, 320), (5, 130, 72)].iter().enumerate() {
            let seed = 60 + 10 * case as u64;
            let (x, x_f) = vals::<T>(rows * kk, seed, 1.0, 0.0);
            let (w, w_f) = vals::<T>(n * kk, seed + 1, 1.0, 0.0);
            let (bias, bias_f) = vals::<T>(n, seed + 2, 2.0, 0.0);
            let (old, old_f) = vals::<T>(rows * n, seed + 3, 2.0, 0.0);
            let (xb, wb, bb) = (up(gpu, &x), up(gpu, &w), up(gpu, &bias));
            let wt = tensor(vec![n, kk], &w_f);
            let plain = ops::linear(&x_f, rows, &wt, None, Activation::None).unwrap();
            let biased = ops::linear(&x_f, rows, &wt, Some(&tensor(vec![n], &bias_f)), Activation::None).unwrap();
            let what = |s: &str| format!("linear_half {rows}x{kk}·({n}x{kk})ᵀ {s}, cuBLASLt {lt}");

            let (xm, wm) = (m(&xb, rows, kk), m(&wb, n, kk));
            let out = up(gpu, &vec![T::from_f32(9.0); rows * n]);
            gpu.blas.linear_half(gpu, xm, wm, HalfOut::Half { out: mm(&out, rows, n), bias: None }, false).unwrap();
            check::<T>(&what("to T"), &down(gpu, &out), &plain);

            let out = up(gpu, &old);
            let o = HalfOut::Half { out: mm(&out, rows, n), bias: Some(&bb) };
            gpu.blas.linear_half(gpu, xm, wm, o, true).unwrap();
            let want: Vec<f32> = biased.iter().zip(&old_f).map(|(a, b)| a + b).collect();
            // Without cuBLASLt the product is rounded to T before the bias.
            check_frac::<T>(&what("to T with bias, accumulated"), &down(gpu, &out), &want, 0.25);

            let out = up(gpu, &vec![9.0f32; rows * n]);
            gpu.blas.linear_half(gpu, xm, wm, HalfOut::F32 { out: mm(&out, rows, n) }, false).unwrap();
            check_with(&format!("{} ({})", what("to f32"), T::SUFFIX), &raw(gpu, &out), &plain, 1e-4, 1.0);

            let residual: Vec<f32> = old_f.iter().map(|v| 3.0 * v).collect();
            let out = up(gpu, &residual);
            gpu.blas.linear_half(gpu, xm, wm, HalfOut::F32 { out: mm(&out, rows, n) }, true).unwrap();
            let want: Vec<f32> = plain.iter().zip(&residual).map(|(a, b)| a + b).collect();
            check_with(&format!("{} ({})", what("to f32, accumulated"), T::SUFFIX), &raw(gpu, &out), &want, 1e-4, 1.0);

            // Too small a weight is refused (by the view), and an output
            // of another width (by the product).
            assert!(Mat::new(&wb, n + 1, kk).is_err());
            let o = HalfOut::F32 { out: mm(&out, rows, n - 1) };
            assert!(gpu
                .blas
                .linear_half(gpu, xm, m(&wb, n - 1, kk), HalfOut::F32 { out: mm(&out, rows, n) }, false)
                .is_err());
            assert!(gpu.blas.linear_half(gpu, xm, wm, o, false).is_err());

            // Rows `kk + 24` apart (the gate half of wider rows): the same
            // product as the packed rows.
            let ld = kk + 24;
            let mut wide = vec![T::from_f32(1e4); rows * ld];
            for r in 0..rows {
                wide[r * ld..r * ld + kk].copy_from_slice(&x[r * kk..(r + 1) * kk]);
            }
            let wb2 = up(gpu, &wide);
            let out = up(gpu, &vec![9.0f32; rows * n]);
            let gate = Mat::new(&wb2, rows, ld).and_then(|x| x.cols_range(0, kk)).unwrap();
            gpu.blas.linear_half(gpu, gate, wm, HalfOut::F32 { out: mm(&out, rows, n) }, false).unwrap();
            check_with(&format!("{} ({})", what("strided, to f32"), T::SUFFIX), &raw(gpu, &out), &plain, 1e-4, 1.0);
            // A stride shorter than a row is refused (by the view).
            assert!(Mat::strided(&wb2, 0, rows, kk, kk - 1).is_err());
        }
    }
    gpu.blas.set_lt_enabled(true);
}

#[test]
fn linear_half_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    linears::<f16>(&gpu);
    linears::<bf16>(&gpu);
}

fn batched<T: Ty>(gpu: &Gpu) {
    // Scores = alpha · Q·Kᵀ per batch: keys [batch][cap][d] (cap > total),
    // queries [batch][m][d], scores [batch][m][total].
    let (batch, cap, total, m, d, alpha) = (3, 13, 11, 6, 64, 0.125f32);
    let (kx, k_f) = vals::<T>(batch * cap * d, 70, 1.0, 0.0);
    let (qx, q_f) = vals::<T>(batch * m * d, 71, 1.0, 0.0);
    let (kb, qb) = (up(gpu, &kx), up(gpu, &qx));
    let sb = up(gpu, &vec![T::from_f32(5.0); batch * m * total]);
    let a = Operand::new(&kb, 0, d, cap * d);
    let b = Operand::new(&qb, 0, d, m * d);
    let c = Operand::new(&sb, 0, total, m * total);
    gpu.blas.gemm_batched_half(Gemm::new((total, m, d), batch).transpose_a().scaled(alpha), a, b, c).unwrap();
    let mut want = vec![0.0f32; batch * m * total];
    for bi in 0..batch {
        for r in 0..m {
            for j in 0..total {
                let dot: f32 = (0..d).map(|e| q_f[(bi * m + r) * d + e] * k_f[(bi * cap + j) * d + e]).sum();
                want[(bi * m + r) * total + j] = alpha * dot;
            }
        }
    }
    check::<T>("gemm_batched_half Q·Kᵀ", &down(gpu, &sb), &want);

    // out = P·V + out: values [batch][cap][d], probabilities [batch][m][total].
    let (vx, v_f) = vals::<T>(batch * cap * d, 72, 1.0, 0.0);
    let (px, p_f) = vals::<T>(batch * m * total, 73, 0.2, 0.1);
    let (ox, o_f) = vals::<T>(batch * m * d, 74, 1.0, 0.0);
    let (vb, pb, ob) = (up(gpu, &vx), up(gpu, &px), up(gpu, &ox));
    let a = Operand::new(&vb, 0, d, cap * d);
    let b = Operand::new(&pb, 0, total, m * total);
    let c = Operand::new(&ob, 0, d, m * d);
    gpu.blas.gemm_batched_half(Gemm::new((d, m, total), batch).plus(1.0), a, b, c).unwrap();
    let mut want = o_f;
    for bi in 0..batch {
        for r in 0..m {
            for e in 0..d {
                let s: f32 = (0..total).map(|j| p_f[(bi * m + r) * total + j] * v_f[(bi * cap + j) * d + e]).sum();
                want[(bi * m + r) * d + e] += s;
            }
        }
    }
    check::<T>("gemm_batched_half P·V + C", &down(gpu, &ob), &want);

    // An operand reaching past its buffer is refused.
    let a = Operand::new(&vb, d, d, cap * d);
    let b = Operand::new(&pb, 0, total, m * total);
    let c = Operand::new(&ob, 0, d, m * d);
    assert!(gpu.blas.gemm_batched_half(Gemm::new((d, m, cap), batch), a, b, c).is_err());
}

#[test]
fn gemm_batched_half_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    batched::<f16>(&gpu);
    batched::<bf16>(&gpu);
}

/// The GPU attention of a step through the batched products (the path a
/// prompt takes): queries `q` rows `[batch·s][heads·d]`, the cache `kv`
/// already holding this step's keys (`past` before them), `mask` a row per
/// sequence; in chunks of `chunk` sequences.
fn attention_batched<T: Ty>(
    gpu: &Gpu,
    q: &DevBuf<T>,
    (kv, mask): (&KvView<'_, T>, Mat<'_, u8>),
    (s, past): (usize, usize),
    chunk: usize,
) -> DevBuf<T> {
    let k = llm(gpu);
    let (batch, cap, KvShape { heads, kv_heads, head_dim: d }) = (kv.batch(), kv.capacity(), kv.shape());
    let total = past + s;
    let scale = 1.0 / (d as f32).sqrt();
    let group = heads / kv_heads;
    let rows_g = group * s;
    let head_block = cap * d;
    let qh = DevBuf::<T>::alloc(gpu, batch * s * heads * d).unwrap();
    let attn = DevBuf::<T>::alloc(gpu, batch * s * heads * d).unwrap();
    let scores = DevBuf::<T>::alloc(gpu, chunk * heads * s * total).unwrap();
    k.transpose_heads(gpu, q, &qh, (batch, s, heads, d), true).unwrap();
    for b0 in (0..batch).step_by(chunk) {
        let nb = chunk.min(batch - b0);
        let n = nb * kv_heads;
        let kk = Operand::new(kv.keys(), b0 * kv_heads * head_block, d, head_block);
        let qq = Operand::new(&qh, b0 * heads * s * d, d, rows_g * d);
        let out = Operand::new(&scores, 0, total, rows_g * total);
        gpu.blas.gemm_batched_half(Gemm::new((total, rows_g, d), n).transpose_a().scaled(scale), kk, qq, out).unwrap();
        let at = ScoreRows { seqs: nb, heads, new_len: s, past, first: b0 };
        k.softmax_causal(gpu, mm(&scores, nb * heads * s, total), at, mask).unwrap();
        let vv = Operand::new(kv.values(), b0 * kv_heads * head_block, d, head_block);
        let probs = Operand::new(&scores, 0, total, rows_g * total);
        let out = Operand::new(&qh, b0 * heads * s * d, d, rows_g * d);
        gpu.blas.gemm_batched_half(Gemm::new((d, rows_g, total), n), vv, probs, out).unwrap();
    }
    k.transpose_heads(gpu, &qh, &attn, (batch, s, heads, d), false).unwrap();
    attn
}

fn attention_steps<T: Ty>(gpu: &Gpu, d: usize) {
    let k = llm(gpu);
    let (batch, heads, kv_heads, s, cap) = (3, 8, 2, 9, 16);
    let shape = AttentionShape { heads, kv_heads, head_dim: d };
    let scale = 1.0 / (d as f32).sqrt();
    let pads = [0usize, 3, 6];
    let (qw, kvw) = (heads * d, kv_heads * d);
    let seed = 100 * d as u64;
    let n_cache = batch * kv_heads * cap * d;
    let keys = up(gpu, &vec![T::from_f32(0.0); n_cache]);
    let values = up(gpu, &vec![T::from_f32(0.0); n_cache]);
    let mask = up(gpu, &vec![0u8; batch * cap]);
    let kv = KvView::new((&keys, &values), batch, cap, KvShape { heads, kv_heads, head_dim: d }).unwrap();
    let mut cpu_cache = KvCache::new(T::CPU, batch, kv_heads, d, cap).unwrap();
    let mut cpu_mask: Vec<Vec<bool>> = vec![Vec::new(); batch];

    // The prompt: left-padded, past 0.
    let step: Vec<u8> = (0..batch * s).map(|r| u8::from(r % s >= pads[r / s])).collect();
    let (q, q_f) = vals::<T>(batch * s * qw, seed, 4.0, 0.0);
    let (kx, k_f) = vals::<T>(batch * s * kvw, seed + 1, 1.0, 0.0);
    let (vx, v_f) = vals::<T>(batch * s * kvw, seed + 2, 1.0, 0.0);
    k.write_mask(gpu, &up(gpu, &step), (batch, s), &mask, cap, 0).unwrap();
    let (kb, vb) = (up(gpu, &kx), up(gpu, &vx));
    k.store_kv(gpu, (m(&kb, batch * s, kvw), m(&vb, batch * s, kvw)), &kv, 0..s).unwrap();
    let got = attention_batched(gpu, &up(gpu, &q), (&kv, m(&mask, batch, cap)), (s, 0), 2);
    cpu_cache.append(&k_f, &v_f, s).unwrap();
    for (b, m) in cpu_mask.iter_mut().enumerate() {
        m.extend((0..s).map(|i| step[b * s + i] != 0));
    }
    let flat: Vec<bool> = cpu_mask.concat();
    let want = attention(&q_f, s, &cpu_cache, &flat, shape).unwrap();
    // The padding queries that see no key are zeros on both sides.
    assert!(want[..qw].iter().any(|&v| v != 0.0) && want[s * qw..(s + 1) * qw].iter().all(|&v| v == 0.0));
    // Scores and probabilities are held in T between the products.
    check_frac::<T>(&format!("prefill attention head_dim {d}"), &down(gpu, &got), &want, 0.5);

    // Decoding steps: one token per sequence.
    for t in 0..3 {
        let past = s + t;
        let total = past + 1;
        let (q, q_f) = vals::<T>(batch * qw, seed + 10 + t as u64, 4.0, 0.0);
        let (kx, k_f) = vals::<T>(batch * kvw, seed + 20 + t as u64, 1.0, 0.0);
        let (vx, v_f) = vals::<T>(batch * kvw, seed + 30 + t as u64, 1.0, 0.0);
        k.write_mask(gpu, &up(gpu, &vec![1u8; batch]), (batch, 1), &mask, cap, past).unwrap();
        let (kb, vb) = (up(gpu, &kx), up(gpu, &vx));
        k.store_kv(gpu, (m(&kb, batch, kvw), m(&vb, batch, kvw)), &kv, past..past + 1).unwrap();
        cpu_cache.append(&k_f, &v_f, 1).unwrap();
        for m in cpu_mask.iter_mut() {
            m.push(true);
        }
        let flat: Vec<bool> = cpu_mask.concat();
        let want = attention(&q_f, 1, &cpu_cache, &flat, shape).unwrap();

        assert!(attn_decode_fits(d, total));
        let qb = up(gpu, &q);
        let out = up(gpu, &vec![T::from_f32(9.0); batch * qw]);
        let attn = DecodeAttn { mask: m(&mask, batch, cap), total, scale };
        k.attn_decode(gpu, m(&qb, batch, qw), &kv, &attn, mm(&out, batch, qw)).unwrap();
        check::<T>(&format!("decode attention kernel head_dim {d} step {t}"), &down(gpu, &out), &want);

        let got = attention_batched(gpu, &qb, (&kv, m(&mask, batch, cap)), (1, past), 3);
        let what = format!("decode attention by products head_dim {d} step {t}");
        check_frac::<T>(&what, &down(gpu, &got), &want, 0.5);
    }

    // A sequence that sees nothing gets zeros.
    let total = s + 3;
    let (q, _) = vals::<T>(batch * qw, seed + 40, 4.0, 0.0);
    let none = up(gpu, &vec![0u8; batch * cap]);
    let out = up(gpu, &vec![T::from_f32(9.0); batch * qw]);
    let qb = up(gpu, &q);
    let attn = DecodeAttn { mask: m(&none, batch, cap), total, scale };
    k.attn_decode(gpu, m(&qb, batch, qw), &kv, &attn, mm(&out, batch, qw)).unwrap();
    assert!(down(gpu, &out).iter().all(|&v| v == 0.0), "fully masked decode ({})", T::SUFFIX);
    // More positions than the cache holds are refused.
    let attn = DecodeAttn { total: cap + 1, ..attn };
    assert!(k.attn_decode(gpu, m(&qb, batch, qw), &kv, &attn, mm(&out, batch, qw)).is_err());
    // So is a mask of fewer rows than sequences.
    let attn = DecodeAttn { mask: m(&none, batch - 1, cap), total, scale };
    assert!(k.attn_decode(gpu, m(&qb, batch, qw), &kv, &attn, mm(&out, batch, qw)).is_err());
}

#[test]
fn grouped_attention_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    for d in [64, 128, 80] {
        attention_steps::<f16>(&gpu, d);
        attention_steps::<bf16>(&gpu, d);
    }
}

fn long_decode<T: Ty>(gpu: &Gpu, (heads, kv_heads, d): (usize, usize, usize)) {
    let k = llm(gpu);
    // Long caches: multi-query, 3000 positions, the second sequence with
    // 100 pads; the cache holds more than it uses.
    let (batch, len, cap) = (2, 3000, 3010);
    let shape = AttentionShape { heads, kv_heads, head_dim: d };
    let scale = 1.0 / (d as f32).sqrt();
    let kvw = kv_heads * d;
    let seed = 7 * d as u64 + heads as u64;
    let (kx, k_f) = vals::<T>(batch * len * kvw, seed, 1.0, 0.0);
    let (vx, v_f) = vals::<T>(batch * len * kvw, seed + 1, 1.0, 0.0);
    let (q, q_f) = vals::<T>(batch * heads * d, seed + 2, 8.0, 0.0);
    let n_cache = batch * kv_heads * cap * d;
    let (keys, values) = (DevBuf::<T>::alloc(gpu, n_cache).unwrap(), DevBuf::<T>::alloc(gpu, n_cache).unwrap());
    k.fill(gpu, &keys, 0.0).unwrap();
    k.fill(gpu, &values, 0.0).unwrap();
    let kv = KvView::new((&keys, &values), batch, cap, KvShape { heads, kv_heads, head_dim: d }).unwrap();
    let (kb, vb) = (up(gpu, &kx), up(gpu, &vx));
    k.store_kv(gpu, (m(&kb, batch * len, kvw), m(&vb, batch * len, kvw)), &kv, 0..len).unwrap();
    let flat: Vec<bool> = (0..batch * len).map(|r| r / len == 0 || r % len >= 100).collect();
    let mut mask = vec![0u8; batch * cap];
    for b in 0..batch {
        for j in 0..len {
            mask[b * cap + j] = u8::from(flat[b * len + j]);
        }
    }
    let mut cache = KvCache::new(T::CPU, batch, kv_heads, d, len).unwrap();
    cache.append(&k_f, &v_f, len).unwrap();
    let want = attention(&q_f, 1, &cache, &flat, shape).unwrap();
    assert!(attn_decode_fits(d, len));
    let out = DevBuf::<T>::alloc(gpu, batch * heads * d).unwrap();
    let (qb, mask_b) = (up(gpu, &q), up(gpu, &mask));
    let attn = DecodeAttn { mask: m(&mask_b, batch, cap), total: len, scale };
    k.attn_decode(gpu, m(&qb, batch, heads * d), &kv, &attn, mm(&out, batch, heads * d)).unwrap();
    check::<T>(
        &format!("decode attention over {len} positions, {heads}/{kv_heads} heads of {d}"),
        &down(gpu, &out),
        &want,
    );
}

#[test]
fn long_decode_attention_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    // Groups of 4, 4, 1 and 2 query heads, then 6 (blocks of 4 and 2), 3
    // (a block of 4, one idle) and 32 (multi-query, 4 at a time).
    for shape in [(4, 1, 128), (8, 2, 64), (2, 2, 256), (4, 2, 96), (12, 2, 64), (6, 2, 128), (32, 1, 64)] {
        long_decode::<f16>(&gpu, shape);
        long_decode::<bf16>(&gpu, shape);
    }
}

/// One decode attention problem: `batch` sequences of `total` positions in a
/// cache of `cap` (mask rows of `stride`), sequence 0 seeing everything,
/// sequence 1 missing its first third and every fifth position, sequence 2
/// (and any after) nothing. The GPU's cache holds NaN at every position it
/// must not read (masked or past `total`), the CPU's zeros.
struct DecodeCase<T: Ty> {
    dims: (usize, usize, usize, usize, usize, usize),
    stride: usize,
    q: DevBuf<T>,
    keys: DevBuf<T>,
    values: DevBuf<T>,
    mask: DevBuf<u8>,
    want: Vec<f32>,
}

impl<T: Ty> DecodeCase<T> {
    fn new(gpu: &Gpu, (batch, heads, kv_heads, d): (usize, usize, usize, usize), total: usize, seed: u64) -> Self {
        let (cap, stride) = (total + 5, total + 7);
        let visible = |b: usize, j: usize| match b {
            0 => true,
            1 => j >= total / 3 && !j.is_multiple_of(5),
            _ => false,
        };
        let kvw = kv_heads * d;
        let (kx, k_f) = vals::<T>(batch * total * kvw, seed, 1.0, 0.0);
        let (vx, v_f) = vals::<T>(batch * total * kvw, seed + 1, 1.0, 0.0);
        let (q, q_f) = vals::<T>(batch * heads * d, seed + 2, 8.0, 0.0);
        // The CPU's cache: [batch][total][kv_heads · d], zeros where masked.
        let flat: Vec<bool> = (0..batch * total).map(|r| visible(r / total, r % total)).collect();
        let hide = |x: &[f32]| -> Vec<f32> {
            x.iter().enumerate().map(|(i, &v)| if flat[i / kvw] { v } else { 0.0 }).collect()
        };
        let mut cache = KvCache::new(T::CPU, batch, kv_heads, d, total.max(1)).unwrap();
        cache.append(&hide(&k_f), &hide(&v_f), total).unwrap();
        let shape = AttentionShape { heads, kv_heads, head_dim: d };
        let want =
            if total == 0 { vec![0.0; batch * heads * d] } else { attention(&q_f, 1, &cache, &flat, shape).unwrap() };
        // The GPU's: [batch][kv_head][cap][d], NaN where it must not look.
        let nan = T::from_f32(f32::NAN);
        let mut kg = vec![nan; batch * kv_heads * cap * d];
        let mut vg = kg.clone();
        for b in 0..batch {
            for j in (0..total).filter(|&j| visible(b, j)) {
                for g in 0..kv_heads {
                    let src = (b * total + j) * kvw + g * d;
                    let dst = ((b * kv_heads + g) * cap + j) * d;
                    kg[dst..dst + d].copy_from_slice(&kx[src..src + d]);
                    vg[dst..dst + d].copy_from_slice(&vx[src..src + d]);
                }
            }
        }
        let mut mask = vec![1u8; batch * stride];
        for b in 0..batch {
            for j in 0..total {
                mask[b * stride + j] = u8::from(visible(b, j));
            }
        }
        DecodeCase {
            dims: (batch, heads, kv_heads, d, cap, total),
            stride,
            q: up(gpu, &q),
            keys: up(gpu, &kg),
            values: up(gpu, &vg),
            mask: up(gpu, &mask),
            want,
        }
    }

    /// The cache as the kernel reads it.
    fn kv(&self) -> KvView<'_, T> {
        let (batch, heads, kv_heads, d, cap, _) = self.dims;
        KvView::new((&self.keys, &self.values), batch, cap, KvShape { heads, kv_heads, head_dim: d }).unwrap()
    }

    /// The queries, a row per sequence.
    fn q(&self) -> Mat<'_, T> {
        let (batch, heads, _, d, _, _) = self.dims;
        m(&self.q, batch, heads * d)
    }

    /// The mask and the positions, with the scores scaled by `scale`.
    fn attn(&self, scale: f32) -> DecodeAttn<'_> {
        let (batch, _, _, _, _, total) = self.dims;
        DecodeAttn { mask: m(&self.mask, batch, self.stride), total, scale }
    }

    /// The kernel's output in chunks of `chunk` positions (`None`: the
    /// launcher's), checked against the CPU.
    fn check(&self, gpu: &Gpu, chunk: Option<usize>) {
        let k = llm(gpu);
        let (batch, heads, kv_heads, d, _, total) = self.dims;
        let out = up(gpu, &vec![T::from_f32(9.0); batch * heads * d]);
        let scale = 1.0 / (d as f32).sqrt();
        let chunk = chunk.unwrap_or_else(|| k.attn_decode_chunk((batch, heads, kv_heads, d, total)));
        let attn = self.attn(scale);
        k.attn_decode_chunked(gpu, self.q(), &self.kv(), &attn, chunk, mm(&out, batch, heads * d)).unwrap();
        let got = down(gpu, &out);
        let what = format!(
            "split decode attention, {heads}/{kv_heads} heads of {d}, {total} positions in {} chunks of {chunk}",
            total.div_ceil(chunk).max(1)
        );
        check::<T>(&what, &got, &self.want);
        // A sequence that sees nothing gets zeros.
        let seq = heads * d;
        assert!(got[2 * seq..].iter().all(|&v| v == 0.0), "{what}: fully masked ({})", T::SUFFIX);
    }
}

fn split_decodes<T: Ty>(gpu: &Gpu) {
    // Groups of 1, 4 and 8 query heads (4 a block), head_dim 64, 80 (lanes
    // left idle) and 128; one chunk, chunks of 64 (whole steps or not) and
    // of 37, the launcher's; 1 (one chunk) to 2000 positions.
    for (heads, kv_heads) in [(4, 4), (8, 2), (16, 2)] {
        for d in [64, 80, 128] {
            for total in [1, 63, 64, 65, 300, 2000] {
                let seed = (1000 * heads + 10 * d + total) as u64;
                let case = DecodeCase::<T>::new(gpu, (3, heads, kv_heads, d), total, seed);
                for chunk in [None, Some(total.max(1)), Some(64), Some(37)] {
                    case.check(gpu, chunk);
                }
            }
        }
    }
    // Every position a chunk of its own; multi-query (a group of 32, 4
    // heads a block); head_dim 256 (a warp a row) and 16 (2 heads a block,
    // 2 lanes a row); 6 heads a group (blocks of 4 and 2).
    DecodeCase::<T>::new(gpu, (3, 8, 2, 128), 65, 1).check(gpu, Some(1));
    let case = DecodeCase::<T>::new(gpu, (3, 32, 1, 64), 300, 2);
    case.check(gpu, None);
    case.check(gpu, Some(50));
    let case = DecodeCase::<T>::new(gpu, (3, 8, 2, 256), 700, 3);
    case.check(gpu, None);
    case.check(gpu, Some(100));
    let case = DecodeCase::<T>::new(gpu, (3, 8, 1, 16), 500, 4);
    case.check(gpu, None);
    case.check(gpu, Some(33));
    let case = DecodeCase::<T>::new(gpu, (3, 12, 2, 64), 129, 5);
    case.check(gpu, None);
    case.check(gpu, Some(64));
    // Groups that 4 does not divide: 7 heads (blocks of 4 and 3), 3 heads
    // (one block of 4 with a head idle).
    let case = DecodeCase::<T>::new(gpu, (3, 14, 2, 128), 545, 9);
    case.check(gpu, None);
    case.check(gpu, Some(100));
    let case = DecodeCase::<T>::new(gpu, (3, 6, 2, 64), 200, 10);
    case.check(gpu, None);
    case.check(gpu, Some(64));
}

#[test]
fn split_decode_attention_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    split_decodes::<f16>(&gpu);
    split_decodes::<bf16>(&gpu);
}

#[test]
fn decode_attention_chunks_are_checked_and_their_scratch_counted() {
    let Some(gpu) = gpu() else { return };
    let k = llm(&gpu);
    let case = DecodeCase::<bf16>::new(&gpu, (3, 8, 2, 64), 300, 6);
    let (batch, heads, _, d, _, total) = case.dims;
    let out = DevBuf::<bf16>::alloc(&gpu, batch * heads * d).unwrap();
    let (kv, attn, out_m) = (case.kv(), case.attn(0.125), mm(&out, batch, heads * d));
    // The scratch of 300 one-position chunks is a GPU buffer like any other.
    let before = gpu.held_bytes().0;
    k.attn_decode_chunked(&gpu, case.q(), &kv, &attn, 1, out_m).unwrap();
    let scratch = (batch * heads * total * (d + 2) * 4) as u64;
    assert!(gpu.held_bytes().0 >= before + scratch, "{} < {before} + {scratch}", gpu.held_bytes().0);
    // No chunks of 0, nor more than 4096 chunks.
    assert!(k.attn_decode_chunked(&gpu, case.q(), &kv, &attn, 0, out_m).is_err());
    let long = DecodeCase::<bf16>::new(&gpu, (3, 2, 2, 8), 5000, 7);
    let long_out = DevBuf::<bf16>::alloc(&gpu, 3 * 2 * 8).unwrap();
    assert!(k.attn_decode_chunked(&gpu, long.q(), &long.kv(), &long.attn(0.35), 1, mm(&long_out, 3, 2 * 8)).is_err());
    long.check(&gpu, Some(2));

    case.check(&gpu, Some(1));
}

#[test]
fn decode_attention_without_room_for_its_scratch_takes_one_chunk() {
    let Some(gpu) = gpu() else { return };
    // A budget of little more than what is held now: the scratch cannot be
    // had, the answer is the same.
    let case = DecodeCase::<f16>::new(&gpu, (3, 16, 2, 128), 2000, 8);
    llm(&gpu);
    // Room for the output (12 KiB), not for the scratch (800 KiB).
    gpu.set_budget(Some(gpu.held_bytes().0 + (64 << 10)));
    case.check(&gpu, Some(64));
    case.check(&gpu, None);
    gpu.set_budget(None);
}

/// Times the decode attention kernel on `(batch, heads, kv_heads, head_dim,
/// total)` with every position visible: microseconds a call and the rate at
/// which it reads the keys and values.
fn time_decode<T: Ty>(gpu: &Gpu, (batch, heads, kv_heads, d, total): (usize, usize, usize, usize, usize)) {
    let k = llm(gpu);
    let cap = total + 32;
    let n_cache = batch * kv_heads * cap * d;
    let (keys, values) = (DevBuf::<T>::alloc(gpu, n_cache).unwrap(), DevBuf::<T>::alloc(gpu, n_cache).unwrap());
    k.fill_uniform(gpu, &keys, 1, 1.0).unwrap();
    k.fill_uniform(gpu, &values, 2, 1.0).unwrap();
    let q = DevBuf::<T>::alloc(gpu, batch * heads * d).unwrap();
    k.fill_uniform(gpu, &q, 3, 2.0).unwrap();
    let mask = up(gpu, &vec![1u8; batch * cap]);
    let out = DevBuf::<T>::alloc(gpu, batch * heads * d).unwrap();
    let kv = KvView::new((&keys, &values), batch, cap, KvShape { heads, kv_heads, head_dim: d }).unwrap();
    let attn = DecodeAttn { mask: m(&mask, batch, cap), total, scale: 1.0 / (d as f32).sqrt() };
    let run = |n: usize| {
        for _ in 0..n {
            k.attn_decode(gpu, m(&q, batch, heads * d), &kv, &attn, mm(&out, batch, heads * d)).unwrap();
        }
        gpu.synchronize().unwrap();
    };
    run(20);
    let iters = 200;
    let t0 = std::time::Instant::now();
    run(iters);
    let us = t0.elapsed().as_secs_f64() * 1e6 / iters as f64;
    let bytes = (2 * batch * kv_heads * total * d * std::mem::size_of::<T>()) as f64;
    let chunk = k.attn_decode_chunk((batch, heads, kv_heads, d, total));
    println!(
        "decode attention {} batch {batch} heads {heads}/{kv_heads} head_dim {d} over {total} in chunks of {chunk}: \
         {us:.1} µs, {:.2} TB/s",
        T::SUFFIX,
        bytes / us * 1e-6
    );
}

/// Decode attention's speed (not a check; run with `--ignored --nocapture`
/// on a GPU): case E's shape (llama-3.1-8b, 64 sequences, ~544 positions)
/// and a few others.
#[test]
#[ignore]
fn decode_attention_speed() {
    let Some(gpu) = gpu() else { return };
    for shape in [
        (64, 32, 8, 128, 544),
        (64, 32, 8, 128, 1056),
        (16, 32, 8, 128, 2048),
        (1, 32, 8, 128, 8192),
        (8, 32, 8, 128, 11000),
        (64, 28, 4, 128, 544),
        (64, 32, 8, 128, 4096),
        (32, 32, 32, 128, 512),
        (64, 16, 8, 64, 544),
    ] {
        time_decode::<bf16>(&gpu, shape);
    }
    time_decode::<f16>(&gpu, (64, 32, 8, 128, 544));
}
