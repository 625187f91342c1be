//! Rotary position embeddings in Hugging Face's rotate-half convention.
//!
//! A head's first half of dimensions pairs with its second half: dimension
//! `i < d/2` and `i + d/2` rotate together by the angle
//! `position · inv_freq[i]`, so `x' = x·cos + rotate_half(x)·sin` with
//! `rotate_half([a, b]) = [−b, a]` and cos/sin repeated over both halves.

use crate::error::{check_len, mul, shape, Error, Result};

/// How the frequencies are adjusted for contexts longer than training's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (every frequency divided by it).
    Linear {
        factor: f32,
    },
    /// Llama 3.1's rule: long wavelengths (beyond
    /// `original_max_position_embeddings / low_freq_factor`) divided by
    /// `factor`, short ones (below `… / high_freq_factor`) kept, those
    /// between interpolated.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// The rotary embedding of heads of `head_dim`, its frequencies computed
/// once.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    head_dim: usize,
    inv_freq: Vec<f32>,
}

fn invalid(what: String) -> Error {
    Error::Invalid { op: "rope", what }
}

impl Rope {
    /// `inv_freq[i] = theta^(−2i / head_dim)` for `i < head_dim / 2`, then
    /// scaled.
    pub fn new(theta: f64, head_dim: usize, scaling: RopeScaling) -> Result<Rope> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(invalid(format!("head_dim {head_dim} must be even and positive")));
        }
        if !(theta.is_finite() && theta > 0.0) {
            return Err(invalid(format!("rope_theta {theta} must be positive")));
        }
        let base: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        let positive = |name: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(v as f64)
            } else {
                Err(invalid(format!("{name} {v} must be positive")))
            }
        };
        let inv_freq: Vec<f64> = match scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => {
                let factor = positive("factor", factor)?;
                base.iter().map(|f| f / factor).collect()
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let factor = positive("factor", factor)?;
                let low = positive("low_freq_factor", low_freq_factor)?;
                let high = positive("high_freq_factor", high_freq_factor)?;
                if high <= low {
                    return Err(invalid(format!(
                        "high_freq_factor {high} must exceed low_freq_factor {low} (their difference divides)"
                    )));
                }
                if original_max_position_embeddings == 0 {
                    return Err(invalid("original_max_position_embeddings must be positive".into()));
                }
                let original = original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (original / low, original / high);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (original / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Ok(Rope { head_dim, inv_freq: inv_freq.into_iter().map(|f| f as f32).collect() })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The frequencies, `head_dim / 2` of them.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rotates, in place, each row of `x` (`positions.len()` rows of `heads`
    /// heads of `head_dim`) by its row's position.
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[usize]) -> Result<()> {
        let d = self.head_dim;
        let width = mul(heads, d, "rope row")?;
        check_len("rope", "the input", x.len(), mul(positions.len(), width, "rope input")?)?;
        if width == 0 {
            return Err(shape("rope", "zero heads"));
        }
        let half = d / 2;
        let (mut cos, mut sin) = (vec![0.0f32; half], vec![0.0f32; half]);
        for (row, &pos) in x.chunks_mut(width).zip(positions) {
            // As Hugging Face computes them: the angle in f32, then cos/sin.
            for i in 0..half {
                let angle = pos as f32 * self.inv_freq[i];
                (cos[i], sin[i]) = (angle.cos(), angle.sin());
            }
            for head in row.chunks_mut(d) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_frequencies() {
        let r = Rope::new(10000.0, 8, RopeScaling::None).unwrap();
        let want = [1.0, 0.1, 0.01, 0.001];
        for (g, e) in r.inv_freq().iter().zip(want) {
            assert!((g - e).abs() <= e * 1e-6, "{g} vs {e}");
        }
        let lin = Rope::new(10000.0, 8, RopeScaling::Linear { factor: 4.0 }).unwrap();
        assert_eq!(lin.inv_freq()[1], r.inv_freq()[1] / 4.0);
    }

    #[test]
    fn llama3_frequencies_worked_by_hand() {
        // theta 10000, head_dim 8: base frequencies 1, 0.1, 0.01, 0.001,
        // wavelengths 2π/f: 6.28, 62.8, 628, 6283.
        // original 1000, low 1, high 4: low_wavelen 1000, high_wavelen 250.
        let r = Rope::new(
            10000.0,
            8,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 1000,
            },
        )
        .unwrap();
        let f = r.inv_freq();
        // i = 0, 1: wavelength below 250, kept.
        assert!((f[0] - 1.0).abs() < 1e-7);
        assert!((f[1] - 0.1).abs() < 1e-8);
        // i = 2: wavelength 628.3 between: smooth = (1000/628.3 − 1) / 3 =
        // 0.197183; f = (1 − s)·0.01/8 + s·0.01 = 0.0029754.
        let wavelen = 2.0 * std::f64::consts::PI / 0.01;
        let s = (1000.0 / wavelen - 1.0) / 3.0;
        assert!((s - 0.197_183).abs() < 1e-6, "{s}");
        let want = (1.0 - s) * 0.01 / 8.0 + s * 0.01;
        assert!((f[2] as f64 - want).abs() < 1e-9, "{} vs {want}", f[2]);
        assert!((f[2] - 0.002_975_4).abs() < 1e-7, "{}", f[2]);
        // i = 3: wavelength 6283 above 1000: divided by 8.
        assert!((f[3] - 0.001 / 8.0).abs() < 1e-10);
    }

    #[test]
    fn rotate_half_on_a_known_vector() {
        // head_dim 4, inv_freq [1, 0.01]; position 2: angles 2 and 0.02.
        let r = Rope::new(10000.0, 4, RopeScaling::None).unwrap();
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        r.apply(&mut x, 1, &[2]).unwrap();
        let (c0, s0, c1, s1) = (2f32.cos(), 2f32.sin(), 0.02f32.cos(), 0.02f32.sin());
        // [a0, a1 | b0, b1] = [1, 2 | 3, 4]: a' = a·cos − b·sin, b' = b·cos + a·sin.
        let want = [1.0 * c0 - 3.0 * s0, 2.0 * c1 - 4.0 * s1, 3.0 * c0 + 1.0 * s0, 4.0 * c1 + 2.0 * s1];
        for (g, e) in x.iter().zip(want) {
            assert!((g - e).abs() < 1e-6, "{g} vs {e}");
        }
        // Position 0 is the identity; each row takes its own position.
        let mut two = vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        r.apply(&mut two, 1, &[0, 2]).unwrap();
        assert_eq!(&two[..4], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(&two[4..], &x[..]);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(Rope::new(10000.0, 7, RopeScaling::None).unwrap_err().to_string().contains("even"));
        let bad = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 4.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        assert!(Rope::new(1e4, 8, bad).unwrap_err().to_string().contains("high_freq_factor"));
        let err = Rope::new(1e4, 8, RopeScaling::Linear { factor: 0.0 }).unwrap_err();
        assert!(err.to_string().contains("factor 0"), "{err}");
    }
}
