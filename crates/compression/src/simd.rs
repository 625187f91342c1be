//! x86-64 fast path: 4-bit codes to f16 with SSSE3 byte shuffles and F16C,
//! chosen at run time. It gives the same bits as the portable path: the
//! table is `clamp(min + q * scale)` in f32, rounded to nearest even.

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    use crate::format::F16_MAX;

    /// Whether [`decode_group4_f16`] may be called on this CPU.
    pub fn available() -> bool {
        is_x86_feature_detected!("ssse3") && is_x86_feature_detected!("f16c")
    }

    /// Decodes the first `out.len()` 4-bit codes of `codes` (packed low
    /// nibble first) with the group's effective `min` and `scale`.
    /// `codes` must hold at least `out.len().div_ceil(2)` bytes; fewer codes
    /// are decoded otherwise (never read or written out of bounds).
    #[target_feature(enable = "ssse3,f16c")]
    pub fn decode_group4_f16(codes: &[u8], min: f32, scale: f32, out: &mut [f16]) {
        // The 16 possible values, f32 then f16, four at a time.
        let vm = _mm_set1_ps(min);
        let vs = _mm_set1_ps(scale);
        let (lo_lim, hi_lim) = (_mm_set1_ps(-F16_MAX), _mm_set1_ps(F16_MAX));
        let quarter = |q0: f32| {
            let q = _mm_setr_ps(q0, q0 + 1.0, q0 + 2.0, q0 + 3.0);
            let v = _mm_add_ps(vm, _mm_mul_ps(q, vs));
            // minps/maxps return their second operand when either is NaN:
            // with `v` second, NaN stays NaN, as in `f32::clamp`.
            let v = _mm_min_ps(hi_lim, _mm_max_ps(lo_lim, v));
            _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)
        };
        let e0 = _mm_unpacklo_epi64(quarter(0.0), quarter(4.0)); // entries 0..8
        let e1 = _mm_unpacklo_epi64(quarter(8.0), quarter(12.0)); // entries 8..16
                                                                  // Split entries into a table of low bytes and one of high bytes.
        let split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        let a = _mm_shuffle_epi8(e0, split);
        let b = _mm_shuffle_epi8(e1, split);
        let t_lo = _mm_unpacklo_epi64(a, b);
        let t_hi = _mm_unpackhi_epi64(a, b);
        let nibble = _mm_set1_epi8(0x0f);

        // 16 code bytes -> 32 values per step.
        let mut done = 0;
        for (src, dst) in codes.chunks_exact(16).zip(out.chunks_exact_mut(32)) {
            // SAFETY: `src` is 16 bytes long; loadu has no alignment need.
            let v = unsafe { _mm_loadu_si128(src.as_ptr().cast()) };
            let lo = _mm_and_si128(v, nibble);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), nibble);
            // Codes in value order: lo0, hi0, lo1, hi1, ...
            let idx = [_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)];
            for (half_dst, idx) in dst.chunks_exact_mut(16).zip(idx) {
                let l = _mm_shuffle_epi8(t_lo, idx);
                let h = _mm_shuffle_epi8(t_hi, idx);
                let (first, second) = half_dst.split_at_mut(8);
                // SAFETY: `first` and `second` are 8 f16 = 16 bytes each;
                // storeu has no alignment need.
                unsafe {
                    _mm_storeu_si128(first.as_mut_ptr().cast(), _mm_unpacklo_epi8(l, h));
                    _mm_storeu_si128(second.as_mut_ptr().cast(), _mm_unpackhi_epi8(l, h));
                }
            }
            done += 32;
        }
        if done == out.len() {
            return;
        }
        // The tail, from the same table.
        let mut lo_bytes = [0u8; 16];
        let mut hi_bytes = [0u8; 16];
        // SAFETY: each array is 16 bytes; storeu has no alignment need.
        unsafe {
            _mm_storeu_si128(lo_bytes.as_mut_ptr().cast(), t_lo);
            _mm_storeu_si128(hi_bytes.as_mut_ptr().cast(), t_hi);
        }
        let entry = |q: u8| {
            let q = usize::from(q & 0x0f);
            f16::from_bits(u16::from_le_bytes([lo_bytes[q], hi_bytes[q]]))
        };
        for (p, o) in out.iter_mut().enumerate().skip(done) {
            if let Some(&b) = codes.get(p / 2) {
                *o = entry(if p % 2 == 0 { b } else { b >> 4 });
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{available, decode_group4_f16};

/// No fast path off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn available() -> bool {
    false
}

/// Never called off x86-64 ([`available`] is false there).
///
/// # Safety
/// None needed; `unsafe` only to match the x86-64 signature.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn decode_group4_f16(_codes: &[u8], _min: f32, _scale: f32, _out: &mut [half::f16]) {}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::params::decode;
    use half::f16;

    #[test]
    fn matches_the_portable_decoding() {
        if !available() {
            return;
        }
        let codes: Vec<u8> = (0..=255u8).chain((0..40u8).map(|k| k.wrapping_mul(37))).collect();
        let params =
            [(1.5f32, 0.25f32), (-65504.0, 8736.0), (-3.0, 0.0), (0.0, f16::from_bits(1).to_f32()), (-8.0 * 0.1, 0.1)];
        for &(min, scale) in &params {
            for len in [0, 1, 2, 31, 32, 33, 64, 95, 590] {
                let mut out = vec![f16::ZERO; len];
                // SAFETY: features checked by `available` above.
                unsafe { decode_group4_f16(&codes, min, scale, &mut out) };
                for (p, o) in out.iter().enumerate() {
                    let b = codes[p / 2];
                    let q = if p % 2 == 0 { b & 15 } else { b >> 4 };
                    let want = f16::from_f32(decode(min, scale, q));
                    assert_eq!(o.to_bits(), want.to_bits(), "min {min} scale {scale} p {p}");
                }
            }
        }
    }

    /// Bytes that did not come from quantizing (NaN or infinite min and
    /// scale) decode by the same formula: NaN where it gives NaN (payloads
    /// aside), infinities clamped.
    #[test]
    fn non_finite_parameters_follow_the_formula() {
        if !available() {
            return;
        }
        let codes: Vec<u8> = (0..=255u8).collect();
        let (inf, nan) = (f32::INFINITY, f32::NAN);
        let params = [(nan, 1.0f32), (1.0, nan), (-inf, 1.0), (inf, 1.0), (0.0, inf), (-inf, inf), (0.0, -inf)];
        for &(min, scale) in &params {
            let mut out = vec![f16::ZERO; 512];
            // SAFETY: features checked by `available` above.
            unsafe { decode_group4_f16(&codes, min, scale, &mut out) };
            for (p, o) in out.iter().enumerate() {
                let b = codes[p / 2];
                let q = if p % 2 == 0 { b & 15 } else { b >> 4 };
                let want = f16::from_f32(decode(min, scale, q));
                let same = o.to_bits() == want.to_bits() || (o.is_nan() && want.is_nan());
                assert!(same, "min {min} scale {scale} q {q}: {o} vs {want}");
            }
        }
    }
}
