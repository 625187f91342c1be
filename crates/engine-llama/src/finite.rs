//! Checkpoint tensors holding NaN or infinity are refused as they are read,
//! naming the tensor: a broken training run or a corrupt file would
//! otherwise make every output garbage without any other sign.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Values scanned per task.
const CHUNK: usize = 1 << 16;

/// The index of the first value of `bytes` (little-endian values of
/// `dtype`) that is NaN or infinite, and how many are.
fn non_finite(dtype: ops::DType, bytes: &[u8]) -> Option<(usize, usize)> {
    let (width, exponent): (usize, u32) = match dtype {
        ops::DType::F16 => (2, 0x7c00),
        ops::DType::BF16 => (2, 0x7f80),
        ops::DType::F32 => (4, 0x7f80_0000),
    };
    let bad = |v: &[u8]| {
        let bits = match *v {
            [a, b] => u32::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
            _ => 0,
        };
        bits & exponent == exponent
    };
    let counts: Vec<(usize, usize)> = bytes
        .par_chunks(width * CHUNK)
        .enumerate()
        .filter_map(|(i, chunk)| {
            let first = chunk.chunks_exact(width).position(bad)?;
            let count = chunk.chunks_exact(width).filter(|v| bad(v)).count();
            Some((i * CHUNK + first, count))
        })
        .collect();
    let first = counts.first()?.0;
    Some((first, counts.iter().map(|c| c.1).sum()))
}

/// Refuses the tensor `name` of `file` if any of its values (`bytes`, as
/// stored, of `dtype`) is NaN or infinite.
pub fn check_weights(file: &str, name: &str, dtype: ops::DType, bytes: &[u8]) -> Result<()> {
    let Some((first, count)) = non_finite(dtype, bytes) else {
        return Ok(());
    };
    Err(Error::Tensor {
        file: file.to_string(),
        tensor: name.to_string(),
        message: format!(
            "holds {count} value{} that {} NaN or infinite (the first at index {first}): is the file corrupt, or \
             did training diverge?",
            if count == 1 { "" } else { "s" },
            if count == 1 { "is" } else { "are" }
        ),
    })
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;

    fn bytes16(v: &[u16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn every_type_s_nan_and_infinity_are_found_and_counted() {
        let f = |x: f32| f16::from_f32(x).to_bits();
        let ok = bytes16(&[f(0.0), f(-1.5), f(65504.0), f(1e-8)]);
        check_weights("m", "w", ops::DType::F16, &ok).unwrap();
        let bad = bytes16(&[f(1.0), f16::NAN.to_bits(), f(2.0), f16::INFINITY.to_bits()]);
        let e = check_weights("m.safetensors", "model.layers.0.mlp.up_proj.weight", ops::DType::F16, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("2 values that are NaN"), "{e}");
        assert!(e.contains("index 1") && e.contains("m.safetensors"), "{e}");
        let b = |x: f32| bf16::from_f32(x).to_bits();
        check_weights("m", "w", ops::DType::BF16, &bytes16(&[b(1e38), b(-3e38)])).unwrap();
        let e = check_weights("m", "w", ops::DType::BF16, &bytes16(&[b(1.0), bf16::NEG_INFINITY.to_bits()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 value that is NaN or infinite (the first at index 1)"), "{e}");
        let f32s: Vec<u8> = [1.0f32, f32::MAX, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        let e = check_weights("m", "w", ops::DType::F32, &f32s).unwrap_err().to_string();
        assert!(e.contains("index 2"), "{e}");
        // The first across chunks, and every bad value counted.
        let mut many = vec![f(0.5); 3 * CHUNK + 7];
        many[2 * CHUNK + 3] = f16::NAN.to_bits();
        many[CHUNK + 1] = f16::INFINITY.to_bits();
        assert_eq!(non_finite(ops::DType::F16, &bytes16(&many)), Some((CHUNK + 1, 2)));
    }
}
