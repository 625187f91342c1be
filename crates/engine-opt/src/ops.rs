//! The numerical building blocks of the CPU forward pass: matrix products
//! through the `gemm` crate, linear layers over f16 weights with f32
//! accumulation, layer norm, ReLU and masked softmax.
//!
//! Weights stay f16 in memory. A linear layer converts them to f32 a tile at
//! a time, just before the product, so the arithmetic is f32 throughout and
//! no f32 copy of the model is ever held.

use gemm::Parallelism;
use half::f16;
use rayon::prelude::*;

/// The layer norm epsilon of every OPT checkpoint.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// A read-only strided view of an f32 matrix.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// A writable strided view of an f32 matrix.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

/// Largest index a strided `rows × cols` view touches, plus one.
fn extent(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    }
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix whose rows are `row_stride` apart.
    ///
    /// # Panics
    /// If `data` is too short for the view.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self::strided(data, rows, cols, row_stride, 1)
    }

    /// A view with arbitrary (non-negative) strides.
    ///
    /// # Panics
    /// If `data` is too short for the view.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Self {
        assert!(
            extent(rows, cols, row_stride, col_stride) <= data.len(),
            "matrix view {rows}x{cols} (strides {row_stride}, {col_stride}) exceeds {} elements",
            data.len()
        );
        MatRef { data, rows, cols, row_stride, col_stride }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

impl<'a> MatMut<'a> {
    /// A row-major `rows × cols` matrix whose rows are `row_stride` apart.
    ///
    /// # Panics
    /// If `data` is too short for the view.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(
            extent(rows, cols, row_stride, 1) <= data.len(),
            "matrix view {rows}x{cols} (row stride {row_stride}) exceeds {} elements",
            data.len()
        );
        MatMut { data, rows, cols, row_stride }
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` with `accumulate`), in f32.
///
/// # Panics
/// If the shapes do not agree.
pub fn matmul(dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool, par: Parallelism) {
    assert_eq!(lhs.cols, rhs.rows, "matmul: inner dimensions differ");
    assert_eq!((dst.rows, dst.cols), (lhs.rows, rhs.cols), "matmul: output shape");
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst.data[r * dst.row_stride..r * dst.row_stride + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the three views were bounds-checked when they were made (every
    // index `(r, c)` they can reach, `r*rs + c*cs`, is inside their slice),
    // `dst` is borrowed mutably so it cannot alias `lhs` or `rhs`, and the
    // shapes were checked above, so gemm reads and writes only inside them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Weight rows converted and multiplied together: a tile stays in the L2
/// cache between its conversion and its use. Narrow tiles suit the skinny
/// products of decoding (gemm measured fastest there with 16 rows on 768-
/// and 3072-wide layers, 1 to 16 rows of activations); wider ones the
/// prefill, where each tile's product is large.
const SMALL_TILE_ROWS: usize = 16;
const LARGE_TILE_ROWS: usize = 128;

/// Activation rows from which the wider tiles are used.
const LARGE_M: usize = 32;

/// Activation rows multiplied per pass over the weights, which bounds the
/// per-tile results held at once to `ROW_BLOCK × out_features` values.
const ROW_BLOCK: usize = 512;

/// `x · wᵀ (+ bias)`: `x` is `rows × k` f32, `w` is `n × k` f16 (a PyTorch
/// `Linear` weight), the result is `rows × n` f32.
///
/// Each thread converts a tile of weight rows to f32 and multiplies the
/// activations with it (gemm, one thread per tile), so weights stay f16 in
/// memory and the arithmetic is f32.
///
/// # Panics
/// If the slice lengths do not match the dimensions.
pub fn linear(x: &[f32], rows: usize, w: &[f16], n: usize, k: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "linear: input size");
    assert_eq!(w.len(), n * k, "linear: weight size");
    let mut out = vec![0.0f32; rows * n];
    if rows == 0 || n == 0 {
        return out;
    }
    let tile = if rows >= LARGE_M { LARGE_TILE_ROWS } else { SMALL_TILE_ROWS }.min(n);
    for (xb, ob) in x.chunks(ROW_BLOCK * k).zip(out.chunks_mut(ROW_BLOCK * n)) {
        linear_block(xb, xb.len() / k, w, n, k, tile, ob);
    }
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "linear: bias size");
        out.par_chunks_mut(n).for_each(|row| {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        });
    }
    out
}

/// One block of activation rows through every tile of weight rows.
fn linear_block(x: &[f32], rows: usize, w: &[f16], n: usize, k: usize, tile: usize, out: &mut [f32]) {
    let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(tile))
        .into_par_iter()
        .map_init(Vec::new, |wbuf: &mut Vec<f32>, t| {
            let n0 = t * tile;
            let nt = tile.min(n - n0);
            wbuf.resize(nt * k, 0.0);
            convert_f16(&w[n0 * k..(n0 + nt) * k], wbuf);
            let mut part = vec![0.0f32; rows * nt];
            matmul(
                MatMut::new(&mut part, rows, nt, nt),
                MatRef::new(x, rows, k, k),
                MatRef::new(wbuf, nt, k, k).t(),
                false,
                Parallelism::None,
            );
            (n0, part)
        })
        .collect();
    for (n0, part) in parts {
        let nt = part.len() / rows;
        for (dst, src) in out.chunks_mut(n).zip(part.chunks(nt)) {
            dst[n0..n0 + nt].copy_from_slice(src);
        }
    }
}

/// f16 → f32, in parallel for large slices.
///
/// # Panics
/// If the slices differ in length.
pub fn convert_f16(src: &[f16], dst: &mut [f32]) {
    const CHUNK: usize = 1 << 16;
    assert_eq!(src.len(), dst.len(), "convert_f16: lengths differ");
    if src.len() <= CHUNK {
        convert_f16_serial(src, dst);
    } else {
        src.par_chunks(CHUNK).zip(dst.par_chunks_mut(CHUNK)).for_each(|(s, d)| convert_f16_serial(s, d));
    }
}

/// f16 → f32 on one thread. On x86-64 with F16C this converts eight values
/// an instruction in a loop the compiler keeps inline; `half`'s slice
/// conversion does the same through a call per eight values, which measured
/// about three times slower here, and this conversion is most of the cost of
/// a decoding step's linear layers.
fn convert_f16_serial(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU supports F16C and AVX (checked just above),
            // the only requirement of the target features the function
            // enables.
            unsafe { x86::f16_to_f32_f16c(src, dst) };
            return;
        }
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};

    /// # Safety
    /// The CPU must support F16C and AVX.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_to_f32_f16c(src: &[f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        let (src8, src_rest) = src.split_at(src.len() / 8 * 8);
        let (dst8, dst_rest) = dst.split_at_mut(src8.len());
        for (s, d) in src8.chunks_exact(8).zip(dst8.chunks_exact_mut(8)) {
            // SAFETY: `s` holds 8 f16 (16 bytes) and `d` room for 8 f32 (32
            // bytes); both intrinsics are unaligned loads/stores, and the
            // features they need are enabled on this function.
            unsafe {
                let h = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
                _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        for (s, d) in src_rest.iter().zip(dst_rest) {
            *d = s.to_f32();
        }
    }
}

/// f16 → a new f32 vector.
pub fn to_f32(src: &[f16]) -> Vec<f32> {
    let mut out = vec![0.0; src.len()];
    convert_f16(src, &mut out);
    out
}

/// Layer norm over each row of `x` (rows of `dim`), in place, f32.
/// `weight` and `bias` are absent for a norm without affine parameters.
pub fn layer_norm_inplace(x: &mut [f32], dim: usize, weight: Option<&[f32]>, bias: Option<&[f32]>) {
    let norm_row = |row: &mut [f32]| {
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + LAYER_NORM_EPS).sqrt();
        for (i, v) in row.iter_mut().enumerate() {
            let mut y = (*v - mean) * inv;
            if let Some(w) = weight {
                y *= w[i];
            }
            if let Some(b) = bias {
                y += b[i];
            }
            *v = y;
        }
    };
    if x.len() >= 64 * dim {
        x.par_chunks_mut(dim).for_each(norm_row);
    } else {
        x.chunks_mut(dim).for_each(norm_row);
    }
}

/// `max(x, 0)` in place.
pub fn relu_inplace(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(|c| {
        for v in c {
            *v = v.max(0.0);
        }
    });
}

/// `acc += x`, elementwise.
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add: sizes differ");
    acc.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(a, b)| {
        for (a, b) in a.iter_mut().zip(b) {
            *a += b;
        }
    });
}

/// Softmax over the entries of `row` where `keep(j)` holds; the others
/// become 0. A row with no kept entry becomes all zeros.
pub fn masked_softmax_inplace(row: &mut [f32], keep: impl Fn(usize) -> bool) {
    let mut max = f32::NEG_INFINITY;
    for (j, v) in row.iter().enumerate() {
        if keep(j) && *v > max {
            max = *v;
        }
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0.0f32;
    for (j, v) in row.iter_mut().enumerate() {
        if keep(j) {
            *v = (*v - max).exp();
            sum += *v;
        } else {
            *v = 0.0;
        }
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_linear(x: &[f32], rows: usize, w: &[f16], n: usize, k: usize, b: Option<&[f32]>) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let mut s = 0.0f64;
                for i in 0..k {
                    s += x[r * k + i] as f64 * w[c * k + i].to_f64();
                }
                out[r * n + c] = s as f32 + b.map_or(0.0, |b| b[c]);
            }
        }
        out
    }

    fn pseudo(i: usize) -> f32 {
        ((i * 7919 % 1013) as f32 / 1013.0) - 0.5
    }

    #[test]
    fn linear_matches_naive_small_and_large() {
        for &(rows, n, k) in &[(1, 5, 3), (3, 300, 70), (4, 1000, 33), (40, 130, 64), (33, 7, 900), (600, 150, 8)] {
            let x: Vec<f32> = (0..rows * k).map(pseudo).collect();
            let w: Vec<f16> = (0..n * k).map(|i| f16::from_f32(pseudo(i + 11))).collect();
            let b: Vec<f32> = (0..n).map(|i| pseudo(i + 5)).collect();
            let got = linear(&x, rows, &w, n, k, Some(&b));
            let want = naive_linear(&x, rows, &w, n, k, Some(&b));
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "{rows}x{n}x{k}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn f16_conversion_is_exact_for_every_value() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut got = vec![0.0f32; all.len()];
        convert_f16(&all, &mut got);
        for (h, g) in all.iter().zip(&got) {
            let want = h.to_f32();
            assert!(want.to_bits() == g.to_bits() || (want.is_nan() && g.is_nan()), "{h:?}: {g} vs {want}");
        }
        // Lengths that are not multiples of 8 take the tail loop.
        let mut short = vec![0.0f32; 13];
        convert_f16(&all[1000..1013], &mut short);
        assert_eq!(short[12], all[1012].to_f32());
    }

    #[test]
    fn matmul_strided_and_accumulate() {
        // lhs 2x3, rhs given transposed (3x2 view of a 2x3 buffer).
        let lhs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let rhs_t = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let mut dst = [1.0f32; 4];
        matmul(
            MatMut::new(&mut dst, 2, 2, 2),
            MatRef::new(&lhs, 2, 3, 3),
            MatRef::new(&rhs_t, 2, 3, 3).t(),
            true,
            Parallelism::None,
        );
        assert_eq!(dst, [5.0, 3.0, 11.0, 6.0]);
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn views_are_bounds_checked() {
        let data = [0.0f32; 5];
        let _ = MatRef::new(&data, 2, 3, 3);
    }

    #[test]
    fn layer_norm_and_softmax() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        layer_norm_inplace(&mut x, 4, Some(&[1.0, 1.0, 2.0, 1.0]), Some(&[0.0, 0.0, 0.0, 1.0]));
        let inv = 1.0 / (1.25f32 + 1e-5).sqrt();
        let want = [-1.5 * inv, -0.5 * inv, 2.0 * 0.5 * inv, 1.5 * inv + 1.0];
        for (g, e) in x.iter().zip(want) {
            assert!((g - e).abs() < 1e-6);
        }
        let mut row = vec![1.0, 2.0, 100.0, 3.0];
        masked_softmax_inplace(&mut row, |j| j != 2);
        let z: f32 = [1.0f32, 2.0, 3.0].iter().map(|v| (v - 3.0).exp()).sum();
        assert!((row[0] - (-2.0f32).exp() / z).abs() < 1e-6);
        assert_eq!(row[2], 0.0);
        let mut none = vec![1.0, 2.0];
        masked_softmax_inplace(&mut none, |_| false);
        assert_eq!(none, [0.0, 0.0]);
    }
}
