//! A group's (min, scale): choosing them so that the f16 values actually
//! stored still give the half-step error bound, and mapping values to codes
//! and codes back to values with them.

use half::f16;

use crate::config::{CompressionConfig, Mode};
use crate::format::F16_MAX;

/// The two f16 numbers around `v` (finite, `|v| <= 65504`): the largest
/// `<= v` and the smallest `>= v` (equal when `v` is an f16).
///
/// Plain arithmetic, no conversion calls: f16 numbers with exponent `e`
/// (at least -14, the subnormals sharing -14's step) are the multiples `k`
/// of `2^(e - 10)`, and their bits are `((e + 15) << 10) + k - 1024`, a
/// formula that also carries `k = 2048` into the next exponent and gives
/// the subnormals (`e = -14`, `k < 1024`) their bits `k`.
#[inline]
fn f16_bracket(v: f64) -> (f16, f16) {
    let a = v.abs();
    let exp = ((a.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    let e = exp.max(-14);
    // 2^(10 - e), exact; e is in -14..=15.
    let to_units = f64::from_bits(((1023 + 10 - e) as u64) << 52);
    let k = a * to_units; // exact: scaling by a power of two
    let k_floor = k as u32; // k < 2048 and >= 0: truncation is floor
    let k_ceil = k_floor + u32::from(f64::from(k_floor) < k);
    let bits = |k: u32| (((e + 15) as u32) << 10) + k - 1024;
    let (mag_lo, mag_hi) = (bits(k_floor) as u16, bits(k_ceil) as u16);
    if v.is_sign_negative() {
        (f16::from_bits(0x8000 | mag_hi), f16::from_bits(0x8000 | mag_lo))
    } else {
        (f16::from_bits(mag_lo), f16::from_bits(mag_hi))
    }
}

/// Smallest f16 `>= v`, for finite `v` with `|v| <= 65504`.
#[inline]
pub(crate) fn f16_round_up(v: f64) -> f16 {
    f16_bracket(v).1
}

/// Largest f16 `<= v`, for finite `v` with `|v| <= 65504`.
#[inline]
pub(crate) fn f16_round_down(v: f64) -> f16 {
    f16_bracket(v).0
}

/// What is stored for one group, and how to encode values with it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GroupParams {
    /// Stored scale (the step between adjacent codes).
    pub scale: f16,
    /// Stored min (asymmetric); zero and not stored when symmetric.
    pub min: f16,
    /// `x -> code = round(clamp((x - origin) * inv + bias, lo, hi))`.
    origin: f64,
    inv: f64,
    bias: f64,
    lo: f64,
    hi: f64,
}

impl GroupParams {
    /// Parameters for a group whose real values lie in `[lo, hi]` (finite,
    /// within the f16 range, `lo <= hi`).
    ///
    /// Asymmetric: `min` is `lo` rounded *down* to f16, so every value is
    /// `>= min`; `scale` is `(hi - min) / max_code` rounded *up* to f16, so
    /// `min + max_code * scale >= hi`. Every value is then within half a step
    /// of some code, computed with the stored f16 numbers. A constant group
    /// of f16 values gets `min = value`, `scale = 0`: exact.
    ///
    /// Symmetric: `scale` is `max|x| / (2^(bits-1) - 1)` rounded up, or
    /// `|value|` rounded up for a constant group (code `half ± 1`, exact for
    /// f16 values; code `half` for zeros).
    #[inline(always)]
    pub fn new(lo: f32, hi: f32, config: &CompressionConfig) -> Self {
        let max_code = config.max_code();
        match config.mode() {
            Mode::Asymmetric => {
                // A zero `lo` is taken as +0: which zero a group's min
                // reduction returns (rayon lanes, `f32::min`) is not
                // specified, and the stored min must not depend on it (the
                // GPU quantizer makes the same choice). Decoding is the same
                // either way.
                let lo = if lo == 0.0 { 0.0 } else { lo };
                let min = f16_round_down(f64::from(lo));
                let origin = min.to_f64_const();
                let range = f64::from(hi) - origin;
                let scale = if range > 0.0 { f16_round_up(range / f64::from(max_code)) } else { f16::ZERO };
                Self::with(scale, min, origin, 0.0, 0, max_code)
            }
            Mode::Symmetric => {
                let half = 1u32 << (config.bits() - 1);
                let amax = f64::from(lo.abs().max(hi.abs()));
                let scale = if lo == hi { f16_round_up(amax) } else { f16_round_up(amax / f64::from(half - 1)) };
                Self::with(scale, f16::ZERO, 0.0, f64::from(half), 1, max_code)
            }
        }
    }

    fn with(scale: f16, min: f16, origin: f64, bias: f64, lo: u32, hi: u32) -> Self {
        let s = scale.to_f64_const();
        // A zero scale means every value equals the origin: all codes are
        // `bias`, and no division by zero happens.
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        Self { scale, min, origin, inv, bias, lo: f64::from(lo), hi: f64::from(hi) }
    }

    /// The code for `x`: the nearest step, ties to even.
    ///
    /// For f16 inputs `(x - origin) * inv` is within a relative 2^-52 of the
    /// exact quotient, and an exact quotient that is not a tie lies at least
    /// a relative 2^-42 from one, so the code is the true nearest.
    #[inline(always)]
    pub fn encode(&self, x: f32) -> u8 {
        let t = (f64::from(x) - self.origin) * self.inv + self.bias;
        // Written as comparisons (no NaN can reach here) so it vectorizes.
        let t = if t < self.lo { self.lo } else { t };
        let t = if t > self.hi { self.hi } else { t };
        // Adding 1.5 * 2^52 rounds `t` (in 0..=255) to an integer, ties to
        // even, and leaves it in the low bits of the f64.
        (t + ROUND_MAGIC).to_bits() as u8
    }

    /// Encodes every value of `x` into `codes` (same length).
    #[inline(always)]
    pub fn encode_slice(&self, x: &[f32], codes: &mut [u8]) {
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = self.encode(v);
        }
    }
}

/// 1.5 * 2^52: in `[2^52, 2^53)` the f64 step is 1.
const ROUND_MAGIC: f64 = 6_755_399_441_055_744.0;

/// The value a code decodes to, given the group's effective min (the stored
/// min, or `-2^(bits-1) * scale` when symmetric) and scale, both as f32:
/// `clamp(min + code * scale, -65504, 65504)` in f32 arithmetic. `code *
/// scale` is exact in f32 (11 + 8 significant bits), so a fused multiply-add
/// gives the same result; one rounding happens, in the addition.
#[inline(always)]
pub(crate) fn decode(min: f32, scale: f32, code: u8) -> f32 {
    (min + f32::from(code) * scale).clamp(-F16_MAX, F16_MAX)
}

/// Effective min used by [`decode`] for a group.
#[inline]
pub(crate) fn effective_min(stored_min: f16, scale: f32, config: &CompressionConfig) -> f32 {
    match config.mode() {
        Mode::Asymmetric => stored_min.to_f32(),
        Mode::Symmetric => -((1u32 << (config.bits() - 1)) as f32) * scale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next_up(h: f16) -> f16 {
        let b = h.to_bits();
        if b & 0x7fff == 0 {
            f16::from_bits(0x0001)
        } else if b & 0x8000 == 0 {
            f16::from_bits(b + 1)
        } else {
            f16::from_bits(b - 1)
        }
    }

    fn next_down(h: f16) -> f16 {
        let b = h.to_bits();
        if b & 0x7fff == 0 {
            f16::from_bits(0x8001)
        } else if b & 0x8000 == 0 {
            f16::from_bits(b - 1)
        } else {
            f16::from_bits(b + 1)
        }
    }

    #[test]
    fn every_f16_and_every_midpoint_brackets_correctly() {
        let finite: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).filter(|h| h.is_finite()).collect();
        for &h in &finite {
            let v = f64::from(h);
            // an f16 is its own bracket (up to the sign of zero)
            assert_eq!(f64::from(f16_round_up(v)), v);
            assert_eq!(f64::from(f16_round_down(v)), v);
            // halfway to the next f16 above
            let n = next_up(h);
            if n.is_finite() {
                let mid = (v + f64::from(n)) / 2.0;
                assert_eq!(f64::from(f16_round_up(mid)), f64::from(n), "{h} mid {mid}");
                assert_eq!(f64::from(f16_round_down(mid)), v, "{h} mid {mid}");
            }
        }
    }

    fn all_finite_f16() -> impl Iterator<Item = f16> {
        (0..=u16::MAX).map(f16::from_bits).filter(|h| h.is_finite())
    }

    #[test]
    fn rounding_directions_are_tight() {
        // Values between, at and around f16 numbers of every binade.
        let mut probes = vec![0.0, -0.0, 1e-9, -1e-9, 65504.0, -65504.0, 65503.9];
        for h in all_finite_f16().step_by(37) {
            let v = f64::from(h);
            probes.extend([v, v * (1.0 + 1e-6), v * (1.0 - 1e-6), v + 1e-12, v - 1e-12]);
        }
        for v in probes {
            if v.abs() > 65504.0 {
                continue;
            }
            let up = f64::from(f16_round_up(v));
            let down = f64::from(f16_round_down(v));
            assert!(up >= v && down <= v, "{v}: {down} {up}");
            // nothing representable strictly between
            let up_prev = f64::from(next_down(f16_round_up(v)));
            let down_next = f64::from(next_up(f16_round_down(v)));
            assert!(up_prev < v, "{v}: up {up} not tight");
            assert!(down_next > v, "{v}: down {down} not tight");
        }
    }

    #[test]
    fn next_steps_cross_zero() {
        assert_eq!(next_up(f16::ZERO).to_bits(), 1);
        assert_eq!(next_up(f16::NEG_ZERO).to_bits(), 1);
        assert_eq!(next_down(f16::ZERO).to_bits(), 0x8001);
        assert_eq!(next_up(f16::from_bits(0x8001)).to_bits(), 0x8000);
        assert_eq!(next_down(f16::ONE), f16::from_bits(0x3bff));
    }

    #[test]
    fn asymmetric_params_cover_the_range() {
        let c = CompressionConfig::int4(0);
        let p = GroupParams::new(-1.3, 2.7, &c);
        let (m, s) = (f64::from(p.min), f64::from(p.scale));
        assert!(m <= f64::from(-1.3f32));
        assert!(m + 15.0 * s >= f64::from(2.7f32));
        assert_eq!(p.encode(-1.3), 0);
        assert_eq!(p.encode(2.7), 15);
    }

    #[test]
    fn a_zero_min_is_stored_as_positive_zero() {
        let c = CompressionConfig::int4(0);
        for (lo, hi) in [(-0.0, 0.0), (-0.0, 1.5), (0.0, 1.5), (-0.0, -0.0)] {
            let p = GroupParams::new(lo, hi, &c);
            assert_eq!(p.min.to_bits(), 0, "{lo} {hi}");
        }
    }

    #[test]
    fn constant_groups_get_zero_scale() {
        let c = CompressionConfig::int4(0);
        let p = GroupParams::new(3.25, 3.25, &c);
        assert_eq!(p.scale, f16::ZERO);
        assert_eq!(p.min.to_f32(), 3.25);
        assert_eq!(p.encode(3.25), 0);
    }

    #[test]
    fn tiny_ranges_get_a_nonzero_subnormal_scale() {
        let c = CompressionConfig::int4(0);
        let a = f16::from_bits(1).to_f32();
        let b = f16::from_bits(3).to_f32();
        let p = GroupParams::new(a, b, &c);
        assert_eq!(p.scale.to_bits(), 1);
        assert_eq!(p.encode(b), 2);
    }

    #[test]
    fn symmetric_zero_and_constant() {
        let c = CompressionConfig::new(4, 64, 0, Mode::Symmetric).unwrap();
        let z = GroupParams::new(0.0, 0.0, &c);
        assert_eq!(z.scale, f16::ZERO);
        assert_eq!(z.encode(0.0), 8);
        let k = GroupParams::new(-3.0, -3.0, &c);
        assert_eq!(k.scale.to_f32(), 3.0);
        assert_eq!(k.encode(-3.0), 7);
        let min = effective_min(k.min, 3.0, &c);
        assert_eq!(decode(min, 3.0, 7), -3.0);
    }

    #[test]
    fn decode_clamps_to_f16_range() {
        assert_eq!(decode(65504.0, 8736.0, 15), 65504.0);
        assert_eq!(decode(-70000.0, 1.0, 0), -65504.0);
    }
}
