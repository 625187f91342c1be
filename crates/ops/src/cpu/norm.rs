//! Normalisations over the last dimension of row-major activations.

use rayon::prelude::*;

use super::tensor::Tensor;
use crate::error::{shape, Error, Result};

fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::Invalid { op, what: format!("eps {eps} is not a finite non-negative number") })
    }
}

fn rows_of(op: &'static str, x: &[f32], dim: usize) -> Result<()> {
    if dim == 0 || !x.len().is_multiple_of(dim) {
        return Err(shape(op, format!("{} values are not whole rows of {dim}", x.len())));
    }
    Ok(())
}

/// RMSNorm of each row of `x` (rows of `dim`, the length of `weight`), in
/// place: `x / sqrt(mean(x²) + eps) · weight`, in f32.
///
/// Rows of a head's width with a weight of that width make the per-head
/// norm some models apply to queries and keys.
pub fn rms_norm(x: &mut [f32], weight: &Tensor, eps: f32) -> Result<()> {
    check_eps("rms_norm", eps)?;
    let dim = weight.len();
    let w = weight.vector("rms_norm", "the weight", dim)?;
    rows_of("rms_norm", x, dim)?;
    let norm = |row: &mut [f32]| {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for (v, w) in row.iter_mut().zip(&w) {
            *v = w * (*v * inv);
        }
    };
    if x.len() >= 64 * dim {
        x.par_chunks_mut(dim).for_each(norm);
    } else {
        x.chunks_mut(dim).for_each(norm);
    }
    Ok(())
}

/// LayerNorm of each row of `x` (rows of `dim`, the length of `weight`), in
/// place: `(x − mean) / sqrt(var + eps) · weight + bias`, in f32.
pub fn layer_norm(x: &mut [f32], weight: &Tensor, bias: &Tensor, eps: f32) -> Result<()> {
    check_eps("layer_norm", eps)?;
    let dim = weight.len();
    let w = weight.vector("layer_norm", "the weight", dim)?;
    let b = bias.vector("layer_norm", "the bias", dim)?;
    rows_of("layer_norm", x, dim)?;
    let norm = |row: &mut [f32]| {
        let n = dim as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&w).zip(&b) {
            *v = (*v - mean) * inv * w + b;
        }
    };
    if x.len() >= 64 * dim {
        x.par_chunks_mut(dim).for_each(norm);
    } else {
        x.chunks_mut(dim).for_each(norm);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tensor::DType;

    #[test]
    fn rms_norm_by_hand() {
        // Row [1, 2, 3, 4]: mean of squares 7.5.
        let w = Tensor::from_f32(DType::BF16, vec![4], &[1.0, 2.0, 0.5, 1.0]).unwrap();
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 2.0];
        rms_norm(&mut x, &w, 1e-5).unwrap();
        let inv = 1.0 / (7.5f32 + 1e-5).sqrt();
        let want = [inv, 4.0 * inv, 1.5 * inv, 4.0 * inv];
        for (g, e) in x[..4].iter().zip(want) {
            assert!((g - e).abs() < 1e-6, "{g} vs {e}");
        }
        // Second row [0, 0, 0, 2]: mean of squares 1.
        let inv = 1.0 / (1.0f32 + 1e-5).sqrt();
        assert!((x[7] - 2.0 * inv).abs() < 1e-6);
        assert_eq!(&x[4..7], &[0.0, 0.0, 0.0]);
        let err = rms_norm(&mut [0.0; 6], &w, 1e-5).unwrap_err();
        assert!(err.to_string().contains("rows of 4"), "{err}");
        let err = rms_norm(&mut [0.0; 4], &w, f32::NAN).unwrap_err();
        assert!(err.to_string().contains("eps"), "{err}");
    }

    #[test]
    fn layer_norm_by_hand() {
        let w = Tensor::from_f32(DType::F16, vec![4], &[1.0, 1.0, 2.0, 1.0]).unwrap();
        let b = Tensor::from_f32(DType::F16, vec![4], &[0.0, 0.0, 0.0, 1.0]).unwrap();
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        layer_norm(&mut x, &w, &b, 1e-5).unwrap();
        let inv = 1.0 / (1.25f32 + 1e-5).sqrt();
        let want = [-1.5 * inv, -0.5 * inv, 2.0 * 0.5 * inv, 1.5 * inv + 1.0];
        for (g, e) in x.iter().zip(want) {
            assert!((g - e).abs() < 1e-6, "{g} vs {e}");
        }
    }
}
