//! Little-endian F16, BF16 and F32 bytes to f16, bf16 or f32, in parallel
//! chunks with rayon. The bytes come from a mapping, so nothing is assumed
//! of their alignment.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::Dtype;

/// A type tensors convert to.
pub trait Element: Copy + Send + Sync + Default {
    /// Its name, for messages.
    const NAME: &'static str;
    fn from_f16(v: f16) -> Self;
    fn from_bf16(v: bf16) -> Self;
    fn from_f32(v: f32) -> Self;
}

impl Element for f16 {
    const NAME: &'static str = "f16";
    fn from_f16(v: f16) -> Self {
        v
    }
    fn from_bf16(v: bf16) -> Self {
        f16::from_f32(v.to_f32())
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bf16";
    fn from_f16(v: f16) -> Self {
        bf16::from_f32(v.to_f32())
    }
    fn from_bf16(v: bf16) -> Self {
        v
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    fn from_f16(v: f16) -> Self {
        v.to_f32()
    }
    fn from_bf16(v: bf16) -> Self {
        v.to_f32()
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

/// `bytes` of type `dtype` as `T`; `None` for types other than F16, BF16
/// and F32. A trailing partial element (which a checked tensor never has)
/// is ignored.
pub fn convert<T: Element>(bytes: &[u8], dtype: &Dtype) -> Option<Vec<T>> {
    const CHUNK: usize = 1 << 16;
    let (size, one): (usize, fn(&[u8]) -> T) = match dtype {
        Dtype::F16 => (2, |b| T::from_f16(f16::from_le_bytes([b[0], b[1]]))),
        Dtype::BF16 => (2, |b| T::from_bf16(bf16::from_le_bytes([b[0], b[1]]))),
        Dtype::F32 => (4, |b| T::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        _ => return None,
    };
    let mut out = vec![T::default(); bytes.len() / size];
    out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * size)).for_each(|(dst, src)| {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(size)) {
            *d = one(s);
        }
    });
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_each_stored_type() {
        let vals = [0.5f32, -1.25, 3.0e-3];
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = vals.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let want: Vec<f16> = vals.iter().map(|v| f16::from_f32(*v)).collect();
        assert_eq!(convert::<f16>(&f32_bytes, &Dtype::F32).unwrap(), want);
        assert_eq!(convert::<f16>(&f16_bytes, &Dtype::F16).unwrap(), want);
        let from_bf16: Vec<f16> = vals.iter().map(|v| f16::from_f32(bf16::from_f32(*v).to_f32())).collect();
        assert_eq!(convert::<f16>(&bf16_bytes, &Dtype::BF16).unwrap(), from_bf16);
        assert!(convert::<f16>(&f32_bytes, &Dtype::I32).is_none());
        assert!(convert::<f32>(&f32_bytes, &Dtype::Other("F8_E4M3".into())).is_none());

        assert_eq!(convert::<f32>(&f32_bytes, &Dtype::F32).unwrap(), vals);
        let f16_as_f32: Vec<f32> = want.iter().map(|v| v.to_f32()).collect();
        assert_eq!(convert::<f32>(&f16_bytes, &Dtype::F16).unwrap(), f16_as_f32);
        let bf: Vec<bf16> = vals.iter().map(|v| bf16::from_f32(*v)).collect();
        assert_eq!(convert::<bf16>(&bf16_bytes, &Dtype::BF16).unwrap(), bf);
        assert_eq!(convert::<bf16>(&f32_bytes, &Dtype::F32).unwrap(), bf);
    }

    #[test]
    fn converts_across_parallel_chunks() {
        let n = (1 << 16) * 3 + 5;
        let vals: Vec<f32> = (0..n).map(|i| i as f32 * 0.25).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(convert::<f32>(&bytes, &Dtype::F32).unwrap(), vals);
    }
}
