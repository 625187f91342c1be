//! f16 / f32 values to a compressed buffer, in parallel over slabs of groups.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::config::{CompressionConfig, Mode};
use crate::error::{Error, Result};
use crate::format::{CompressedLayout, SourceDtype, F16_MAX, HEADER_BYTES};
use crate::pack::pack4;
use crate::params::GroupParams;
use crate::tensor::CompressedTensor;

/// Values per parallel task, roughly (a task is a whole number of slabs).
pub(crate) const TASK_VALUES: usize = 1 << 16;
/// Groups handled together when the group dim is not innermost, so that
/// reads of the original tensor go along rows.
pub(crate) const TILE: usize = 64;

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

/// Element types that can be quantized: `f16`, `bf16` and `f32`.
pub trait Element: Copy + Send + Sync + sealed::Sealed {
    /// The dtype recorded in the header.
    const DTYPE: SourceDtype;
    /// Widens `src` into `dst` (same length), exactly.
    fn to_f32_slice(src: &[Self], dst: &mut [f32]);
    /// Widens one value, exactly.
    fn to_f32(self) -> f32;
}

impl Element for f16 {
    const DTYPE: SourceDtype = SourceDtype::F16;
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Element for half::bf16 {
    const DTYPE: SourceDtype = SourceDtype::BF16;
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl Element for f32 {
    const DTYPE: SourceDtype = SourceDtype::F32;
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn to_f32(self) -> f32 {
        self
    }
}

/// Quantizes `values` (row-major, of `shape`) with `config` into a new
/// [`CompressedTensor`].
pub fn quantize<T: Element>(values: &[T], shape: &[usize], config: CompressionConfig) -> Result<CompressedTensor> {
    let layout = CompressedLayout::new(shape, T::DTYPE, config)?;
    check_values(values.len(), &layout)?;
    let mut bytes = vec![0u8; layout.total_bytes()];
    quantize_into(values, &layout, &mut bytes)?;
    CompressedTensor::from_parts(layout, bytes)
}

fn check_values(found: usize, layout: &CompressedLayout) -> Result<()> {
    if found != layout.numel() {
        return Err(Error::ShapeMismatch { shape: layout.shape().to_vec(), expected: layout.numel(), found });
    }
    Ok(())
}

/// Quantizes `values` into `out`, which must be exactly
/// `layout.total_bytes()` long; writes every byte of it (header, codes,
/// zero padding, scales, mins). `layout` must have been made for `T`'s dtype.
///
/// On error the contents of `out` are unspecified. For bad values the error
/// names the lowest flat index holding one.
pub fn quantize_into<T: Element>(values: &[T], layout: &CompressedLayout, out: &mut [u8]) -> Result<()> {
    if layout.dtype() != T::DTYPE {
        return Err(Error::DtypeMismatch { expected: layout.dtype(), found: T::DTYPE });
    }
    check_values(values.len(), layout)?;
    if out.len() != layout.total_bytes() {
        return Err(Error::BufferSize { what: "compressed buffer", expected: layout.total_bytes(), found: out.len() });
    }
    let (header, rest) = out.split_at_mut(HEADER_BYTES);
    header.copy_from_slice(&layout.header());
    let (data, rest) = rest.split_at_mut(layout.data_bytes());
    let (scales, mins) = rest.split_at_mut(layout.scales_bytes());
    let codes_len = layout.num_groups() * layout.group_bytes();
    let (data, data_pad) = data.split_at_mut(codes_len);
    data_pad.fill(0);
    if layout.num_groups() == 0 {
        return Ok(());
    }

    let all_valid = split_tasks(layout, data, scales, mins)
        .into_par_iter()
        .map(|task| run_task_dispatch(values, layout, task))
        .reduce(|| true, |a, b| a && b);
    if all_valid {
        Ok(())
    } else {
        Err(first_bad_value(values))
    }
}

/// The error for the first value that cannot be quantized. Only called
/// after a task found one, so the scan always finds it.
fn first_bad_value<T: Element>(values: &[T]) -> Error {
    for (index, v) in values.iter().enumerate() {
        let value = v.to_f32();
        if !value.is_finite() {
            return Error::NonFinite { index, value };
        }
        if value.abs() > F16_MAX {
            return Error::OutOfRange { index, value };
        }
    }
    // Unreachable in practice: a task only fails on such a value.
    Error::NonFinite { index: values.len(), value: f32::NAN }
}

/// A run of slabs `s0..s1` and the parts of the sections it writes.
struct Task<'a> {
    s0: usize,
    s1: usize,
    data: &'a mut [u8],
    scales: &'a mut [u8],
    mins: &'a mut [u8],
}

/// Slabs per task: about [`TASK_VALUES`] values, at least one slab.
pub(crate) fn slabs_per_task(layout: &CompressedLayout) -> usize {
    let per_slab = layout.config().group_size() * layout.inner();
    (TASK_VALUES / per_slab.max(1)).max(1)
}

fn split_tasks<'a>(
    layout: &CompressedLayout,
    mut data: &'a mut [u8],
    mut scales: &'a mut [u8],
    mut mins: &'a mut [u8],
) -> Vec<Task<'a>> {
    let step = slabs_per_task(layout);
    let inner = layout.inner();
    let gb = layout.group_bytes();
    let has_mins = !mins.is_empty();
    let mut tasks = Vec::with_capacity(layout.num_slabs().div_ceil(step));
    let mut s0 = 0;
    while s0 < layout.num_slabs() {
        let s1 = (s0 + step).min(layout.num_slabs());
        let groups = (s1 - s0) * inner;
        let (d, d_rest) = std::mem::take(&mut data).split_at_mut(groups * gb);
        let (s, s_rest) = std::mem::take(&mut scales).split_at_mut(groups * 2);
        let (m, m_rest) = std::mem::take(&mut mins).split_at_mut(if has_mins { groups * 2 } else { 0 });
        (data, scales, mins) = (d_rest, s_rest, m_rest);
        tasks.push(Task { s0, s1, data: d, scales: s, mins: m });
        s0 = s1;
    }
    tasks
}

/// Runs [`run_task`] compiled for AVX2 when the CPU has it: the same code,
/// with the f64 encoding loop four lanes wide instead of two.
fn run_task_dispatch<T: Element>(values: &[T], layout: &CompressedLayout, task: Task<'_>) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { run_task_avx2(values, layout, task) };
    }
    run_task(values, layout, task)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn run_task_avx2<T: Element>(values: &[T], layout: &CompressedLayout, task: Task<'_>) -> bool {
    run_task(values, layout, task)
}

/// Quantizes the slabs of one task; false if a value was NaN, infinite or
/// outside the f16 range.
#[inline(always)]
fn run_task<T: Element>(values: &[T], layout: &CompressedLayout, task: Task<'_>) -> bool {
    let config = layout.config();
    let gs = config.group_size();
    let gb = layout.group_bytes();
    let inner = layout.inner();
    let tile = TILE.min(inner);
    let mut wide = vec![0f32; tile * gs];
    let mut row = vec![0f32; tile];
    let mut codes = vec![0u8; gs];
    let mut out = GroupWriter { config, data: task.data, scales: task.scales, mins: task.mins, codes: &mut codes };
    let mut group = 0;
    for s in task.s0..task.s1 {
        let slab = &values[layout.slab_values(s, s + 1)];
        let len = layout.slab_len(s);
        if inner == 1 {
            T::to_f32_slice(slab, &mut wide[..len]);
            if !out.write(group, &wide[..len]) {
                return false;
            }
            group += 1;
            continue;
        }
        // Gather `tile` columns of the [len, inner] slab, one group per
        // column, reading the original tensor row by row.
        for c0 in (0..inner).step_by(tile) {
            let tw = tile.min(inner - c0);
            for j in 0..len {
                let src = &slab[j * inner + c0..j * inner + c0 + tw];
                T::to_f32_slice(src, &mut row[..tw]);
                for (t, &v) in row[..tw].iter().enumerate() {
                    wide[t * gs + j] = v;
                }
            }
            for t in 0..tw {
                if !out.write(group + c0 + t, &wide[t * gs..t * gs + len]) {
                    return false;
                }
            }
        }
        group += inner;
    }
    debug_assert_eq!(group * gb, out.data.len());
    true
}

/// The smallest and largest of `x` (non-empty), or `None` if a value is
/// NaN, infinite, or above 65504 in magnitude.
#[inline(always)]
fn range_of(x: &[f32]) -> Option<(f32, f32)> {
    // Eight independent lanes of plain comparisons, so the loop vectorizes
    // (a single float min/max chain does not).
    const LANES: usize = 8;
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    // Largest |v| as bits: NaN and infinities have larger bits than 65504.
    let mut mag = [0u32; LANES];
    let (chunks, rest) = x.as_chunks::<LANES>();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l];
            mag[l] = mag[l].max(v.to_bits() & 0x7fff_ffff);
            lo[l] = if v < lo[l] { v } else { lo[l] };
            hi[l] = if v > hi[l] { v } else { hi[l] };
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        mag[l] = mag[l].max(v.to_bits() & 0x7fff_ffff);
        lo[l] = if v < lo[l] { v } else { lo[l] };
        hi[l] = if v > hi[l] { v } else { hi[l] };
    }
    if mag.iter().any(|&m| m > F16_MAX.to_bits()) {
        return None;
    }
    let lo = lo.iter().fold(f32::INFINITY, |a, &b| a.min(b));
    let hi = hi.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    Some((lo, hi))
}

/// Writes groups' codes and params into one task's parts of the sections.
struct GroupWriter<'a, 'b> {
    config: &'a CompressionConfig,
    data: &'b mut [u8],
    scales: &'b mut [u8],
    mins: &'b mut [u8],
    codes: &'b mut [u8],
}

impl GroupWriter<'_, '_> {
    /// Quantizes group number `k` of the task (real values `x`, the rest of
    /// the group is padding); false if a value is not quantizable.
    #[inline(always)]
    fn write(&mut self, k: usize, x: &[f32]) -> bool {
        let Some((lo, hi)) = range_of(x) else {
            return false;
        };
        let p = GroupParams::new(lo, hi, self.config);
        let gb = self.config.group_bytes();
        let out = &mut self.data[k * gb..(k + 1) * gb];
        let len = x.len();
        if self.config.bits() == 8 {
            p.encode_slice(x, &mut out[..len]);
            out[len..].fill(0);
        } else {
            p.encode_slice(x, &mut self.codes[..len]);
            self.codes[len..].fill(0);
            pack4(self.codes, out);
        }
        self.scales[2 * k..2 * k + 2].copy_from_slice(&p.scale.to_bits().to_le_bytes());
        if self.config.mode() == Mode::Asymmetric {
            self.mins[2 * k..2 * k + 2].copy_from_slice(&p.min.to_bits().to_le_bytes());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequantize::{dequantize_into, dequantize_into_f32};

    fn h(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    fn cfg(bits: u8, gs: usize, dim: usize, mode: Mode) -> CompressionConfig {
        CompressionConfig::new(bits, gs, dim, mode).unwrap()
    }

    #[test]
    fn known_bytes_for_a_small_group() {
        let t = quantize(&h(&[1.0, 2.0, 3.0, 4.0]), &[4], cfg(4, 4, 0, Mode::Asymmetric)).unwrap();
        let b = t.as_bytes();
        assert_eq!(b.len(), 64 + 16 + 2 + 2);
        // scale: 3/15 = 0.2 rounded up to f16 is 0.2000732421875 (0x3267)
        assert_eq!(t.scale(0).unwrap().to_bits(), 0x3267);
        assert_eq!(t.stored_min(0).unwrap(), Some(f16::ONE));
        // codes 0, 5, 10, 15: low nibble first
        assert_eq!(&b[64..66], &[0x50, 0xfa]);
        assert!(b[66..80].iter().all(|&x| x == 0));
        assert_eq!(&b[80..82], &0x3267u16.to_le_bytes());
        assert_eq!(&b[82..84], &f16::ONE.to_bits().to_le_bytes());
        assert_eq!(t.to_f16(), h(&[1.0, 2.0, 3.0, 4.0]));
    }

    #[test]
    fn near_ties_pick_the_nearest_code() {
        // min -26624, scale 61440 / 15 = 4096: 2^-10 sits at 6.5 steps plus
        // 2^-22, so its code must be 7. In f32, -26624 + 2^-10 rounds to
        // exactly 6.5 steps, a tie that goes to 6: an error just over half a
        // step. The encoder works in f64 to get this right.
        let tiny = 2f32.powi(-10);
        let x = h(&[-26624.0, 34816.0, tiny, 0.0]);
        let t = quantize(&x, &[4], cfg(4, 4, 0, Mode::Asymmetric)).unwrap();
        assert_eq!(t.scale(0).unwrap().to_f32(), 4096.0);
        assert_eq!(t.stored_min(0).unwrap(), Some(f16::from_f32(-26624.0)));
        assert_eq!(t.code(0, 2).unwrap(), 7);
        let y = t.to_f32();
        assert!((f64::from(y[2]) - f64::from(tiny)).abs() <= 2048.0);
    }

    #[test]
    fn constant_groups_come_back_exactly() {
        let specials = [
            0.0,
            -0.0,
            1.0,
            -3.5,
            65504.0,
            -65504.0,
            f16::from_bits(1).to_f32(),
            -f16::from_bits(0x03ff).to_f32(),
            f16::MIN_POSITIVE.to_f32(),
            0.1,
        ];
        for bits in [4, 8] {
            for mode in [Mode::Asymmetric, Mode::Symmetric] {
                for &c in &specials {
                    let x = h(&[c; 130]);
                    let t = quantize(&x, &[2, 65], cfg(bits, 64, 1, mode)).unwrap();
                    let y = t.to_f16();
                    for (a, b) in x.iter().zip(&y) {
                        assert_eq!(a.to_f32(), b.to_f32(), "{bits} {mode:?} {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn padding_does_not_leak_into_params() {
        // 70 = 64 + 6: the second group of each line has 6 real values, all
        // 100. Were padding zeros counted, min would be 0 and 100 inexact.
        let mut x = vec![0f32; 140];
        for line in x.chunks_mut(70) {
            for (j, v) in line.iter_mut().enumerate() {
                *v = if j < 64 { j as f32 } else { 100.0 };
            }
        }
        let t = quantize(&h(&x), &[2, 70], CompressionConfig::int4(1)).unwrap();
        assert_eq!(t.layout().num_groups(), 4);
        assert_eq!(t.scale(1).unwrap(), f16::ZERO);
        assert_eq!(t.stored_min(1).unwrap(), Some(f16::from_f32(100.0)));
        let y = t.to_f32();
        assert_eq!(&y[64..70], &[100.0; 6]);
        // padding codes are zero
        for p in 6..64 {
            assert_eq!(t.code(1, p).unwrap(), 0);
        }
    }

    #[test]
    fn extremes_stay_finite_and_within_half_a_step() {
        let x = h(&[-65504.0, 65504.0, 0.0, 65504.0, -1.0, 65000.0]);
        for bits in [4, 8] {
            for mode in [Mode::Asymmetric, Mode::Symmetric] {
                let t = quantize(&x, &[6], cfg(bits, 6, 0, mode)).unwrap();
                let s = t.scale(0).unwrap().to_f32();
                assert!(s.is_finite() && s > 0.0);
                let y = t.to_f16();
                for (a, b) in x.iter().zip(&y) {
                    assert!(b.is_finite());
                    let ulp = 16.0; // half an f16 ulp near 65504
                    assert!((a.to_f32() - b.to_f32()).abs() <= s / 2.0 + ulp);
                }
                assert_eq!(y[1].to_f32(), 65504.0);
            }
        }
    }

    #[test]
    fn subnormal_groups_are_resolved() {
        let x: Vec<f16> = (0..16u16).map(f16::from_bits).collect();
        let t = quantize(&x, &[16], cfg(4, 16, 0, Mode::Asymmetric)).unwrap();
        // range 15 * 2^-24 over 15 steps: scale is the smallest subnormal
        assert_eq!(t.scale(0).unwrap().to_bits(), 1);
        assert_eq!(t.to_f16(), x);
        let neg: Vec<f16> = (0..16u16).map(|b| f16::from_bits(0x8000 | b)).collect();
        let t = quantize(&neg, &[16], cfg(8, 16, 0, Mode::Symmetric)).unwrap();
        assert_eq!(t.to_f32(), neg.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
    }

    #[test]
    fn group_dim_in_the_middle_matches_the_transposed_tensor() {
        // [L, inner] grouped along dim 0 must give the same groups as its
        // transpose [inner, L] grouped along dim 1.
        let (l, inner) = (150, 37);
        let x: Vec<f32> = (0..l * inner).map(|k| ((k * 7919) % 1000) as f32 / 7.0 - 50.0).collect();
        let mut xt = vec![0f32; l * inner];
        for j in 0..l {
            for i in 0..inner {
                xt[i * l + j] = x[j * inner + i];
            }
        }
        for bits in [4, 8] {
            let a = quantize(&x, &[l, inner], cfg(bits, 64, 0, Mode::Asymmetric)).unwrap();
            let b = quantize(&xt, &[inner, l], cfg(bits, 64, 1, Mode::Asymmetric)).unwrap();
            let g = a.layout().groups_per_line();
            for gi in 0..g {
                for i in 0..inner {
                    let (ka, kb) = (gi * inner + i, i * g + gi);
                    assert_eq!(a.scale(ka).unwrap(), b.scale(kb).unwrap());
                    assert_eq!(a.stored_min(ka).unwrap(), b.stored_min(kb).unwrap());
                    for p in 0..64 {
                        assert_eq!(a.code(ka, p).unwrap(), b.code(kb, p).unwrap());
                    }
                }
            }
            let (ya, yb) = (a.to_f16(), b.to_f16());
            for j in 0..l {
                for i in 0..inner {
                    assert_eq!(ya[j * inner + i], yb[i * l + j]);
                }
            }
        }
    }

    #[test]
    fn many_tasks_agree_with_the_bound() {
        // Large enough for many rayon tasks, with partial last groups; the
        // second shape also has partial tiles (70 = 64 + 6 columns).
        let cases: &[(&[usize], usize)] = &[(&[3, 100_003], 1), (&[5, 1000, 70], 1), (&[1000, 700], 0)];
        for &(shape, dim) in cases {
            let n: usize = shape.iter().product();
            let x: Vec<f16> = (0..n).map(|k| f16::from_f32(((k as f32) * 0.37).sin() * 300.0)).collect();
            let t = quantize(&x, shape, CompressionConfig::int4(dim)).unwrap();
            assert!(t.layout().num_slabs().div_ceil(slabs_per_task(t.layout())) > 2, "{shape:?}");
            let y = t.to_f32();
            for (k, (a, b)) in x.iter().zip(&y).enumerate() {
                let (g, _) = t.layout().group_of(k).unwrap();
                let s = t.scale(g).unwrap().to_f32();
                let tol = s / 2.0 + b.abs() * f32::EPSILON;
                assert!((a.to_f32() - b).abs() <= tol, "{shape:?} index {k}");
            }
            let y16 = t.to_f16();
            assert!(y.iter().zip(&y16).all(|(a, b)| f16::from_f32(*a) == *b));
        }
    }

    #[test]
    fn quantize_into_matches_quantize() {
        let x: Vec<f32> = (0..5 * 9 * 4).map(|k| (k as f32).sqrt()).collect();
        let c = cfg(8, 4, 1, Mode::Symmetric);
        let t = quantize(&x, &[5, 9, 4], c).unwrap();
        let layout = CompressedLayout::new(&[5, 9, 4], SourceDtype::F32, c).unwrap();
        let mut buf = vec![0xaau8; layout.total_bytes()];
        quantize_into(&x, &layout, &mut buf).unwrap();
        assert_eq!(buf, t.as_bytes());
        assert_eq!(CompressedTensor::from_bytes(buf).unwrap(), t);
    }

    #[test]
    fn bad_values_are_reported_at_their_first_index() {
        let c = CompressionConfig::int4(0);
        let mut x = vec![f16::ONE; 300];
        x[250] = f16::NAN;
        x[77] = f16::INFINITY;
        match quantize(&x, &[300], c) {
            Err(Error::NonFinite { index: 77, value }) => assert!(value.is_infinite()),
            other => panic!("{other:?}"),
        }
        x[77] = f16::ONE;
        match quantize(&x, &[300], c) {
            Err(Error::NonFinite { index: 250, value }) => assert!(value.is_nan()),
            other => panic!("{other:?}"),
        }
        // same along a middle group dim
        match quantize(&x, &[10, 30], c) {
            Err(Error::NonFinite { index: 250, .. }) => {}
            other => panic!("{other:?}"),
        }
        let mut y = vec![1f32; 20];
        y[3] = 65505.0;
        y[9] = f32::NEG_INFINITY;
        assert_eq!(quantize(&y, &[20], c), Err(Error::OutOfRange { index: 3, value: 65505.0 }));
    }

    #[test]
    fn bad_shapes_and_buffers_are_errors() {
        let c = CompressionConfig::int4(0);
        let x = vec![f16::ONE; 12];
        assert_eq!(quantize(&x, &[5, 2], c), Err(Error::ShapeMismatch { shape: vec![5, 2], expected: 10, found: 12 }));
        let layout = CompressedLayout::new(&[12], SourceDtype::F16, c).unwrap();
        let mut small = vec![0u8; layout.total_bytes() - 1];
        assert_eq!(
            quantize_into(&x, &layout, &mut small),
            Err(Error::BufferSize {
                what: "compressed buffer",
                expected: layout.total_bytes(),
                found: layout.total_bytes() - 1
            })
        );
        let mut buf = vec![0u8; layout.total_bytes()];
        let xf = vec![1f32; 12];
        assert_eq!(
            quantize_into(&xf, &layout, &mut buf),
            Err(Error::DtypeMismatch { expected: SourceDtype::F16, found: SourceDtype::F32 })
        );
        quantize_into(&x, &layout, &mut buf).unwrap();
        let mut out = vec![f16::ZERO; 11];
        assert_eq!(
            dequantize_into(&buf, &layout, &mut out),
            Err(Error::BufferSize { what: "output", expected: 12, found: 11 })
        );
        let mut out = vec![0f32; 12];
        assert!(matches!(dequantize_into_f32(&buf[..buf.len() - 2], &layout, &mut out), Err(Error::BufferSize { .. })));
        let other = CompressedLayout::new(&[12, 1], SourceDtype::F16, c).unwrap();
        assert_eq!(other.total_bytes(), layout.total_bytes());
        assert_eq!(dequantize_into_f32(&buf, &other, &mut out), Err(Error::LayoutMismatch));
        dequantize_into_f32(&buf, &layout, &mut out).unwrap();
        assert_eq!(out, vec![1f32; 12]);
    }

    #[test]
    fn empty_tensors_quantize_to_a_header() {
        let t = quantize::<f16>(&[], &[4, 0], CompressionConfig::int4(1)).unwrap();
        assert_eq!(t.as_bytes().len(), HEADER_BYTES);
        assert!(t.to_f16().is_empty());
        let t = quantize::<f32>(&[], &[0, 3], CompressionConfig::int4(1)).unwrap();
        assert_eq!(t.layout().num_groups(), 0);
    }
}
