//! A plain host tensor: a shape, a dtype and the values, row-major.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{check_len, mul, shape, Error, Result};

// Byte views ([`Storage::as_bytes`]) are the little-endian format tiers store.
const _: () = assert!(cfg!(target_endian = "little"), "tensor byte views assume a little-endian target");

/// The types a tensor's values are stored in. Arithmetic is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
}

impl DType {
    /// Bytes per value.
    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The values of a tensor in their stored type.
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            Storage::F32(_) => DType::F32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `len` zeros of `dtype`.
    pub fn zeros(dtype: DType, len: usize) -> Storage {
        match dtype {
            DType::F16 => Storage::F16(vec![f16::ZERO; len]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; len]),
            DType::F32 => Storage::F32(vec![0.0; len]),
        }
    }

    /// `len` zeros of `dtype`, or an error naming `what` if the memory
    /// cannot be had (rather than aborting the process).
    pub fn try_zeros(dtype: DType, len: usize, what: &str) -> Result<Storage> {
        fn alloc<T: Clone>(len: usize, zero: T, what: &str) -> Result<Vec<T>> {
            let mut v = Vec::new();
            v.try_reserve_exact(len).map_err(|e| Error::Overflow { what: format!("{what} ({len} values: {e})") })?;
            v.resize(len, zero);
            Ok(v)
        }
        Ok(match dtype {
            DType::F16 => Storage::F16(alloc(len, f16::ZERO, what)?),
            DType::BF16 => Storage::BF16(alloc(len, bf16::ZERO, what)?),
            DType::F32 => Storage::F32(alloc(len, 0.0, what)?),
        })
    }

    /// The values' memory as bytes: little-endian, the order the disk
    /// tier stores them in (every target tierlm builds for is
    /// little-endian).
    pub fn as_bytes(&self) -> &[u8] {
        fn view<T>(v: &[T]) -> &[u8] {
            // SAFETY: f16, bf16 and f32 are plain values with no padding;
            // u8 has alignment 1; the byte slice covers exactly the
            // slice's memory and borrows it for its lifetime.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        }
        match self {
            Storage::F16(v) => view(v),
            Storage::BF16(v) => view(v),
            Storage::F32(v) => view(v),
        }
    }

    /// [`Storage::as_bytes`], writable: a tier reads straight into it.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        fn view<T>(v: &mut [T]) -> &mut [u8] {
            // SAFETY: as in `as_bytes`, and every bit pattern is a valid
            // f16, bf16 or f32.
            unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        }
        match self {
            Storage::F16(v) => view(v),
            Storage::BF16(v) => view(v),
            Storage::F32(v) => view(v),
        }
    }

    /// Values `start..start + dst.len()` converted to f32 into `dst`.
    ///
    /// # Panics
    /// If the range is outside the storage (callers check their ranges).
    pub fn read_f32(&self, start: usize, dst: &mut [f32]) {
        let end = start + dst.len();
        match self {
            Storage::F16(v) => f16_to_f32(&v[start..end], dst),
            Storage::BF16(v) => {
                // bf16 is the top half of an f32: a shift, exact.
                for (d, s) in dst.iter_mut().zip(&v[start..end]) {
                    *d = f32::from_bits((s.to_bits() as u32) << 16);
                }
            }
            Storage::F32(v) => dst.copy_from_slice(&v[start..end]),
        }
    }

    /// `src` rounded to the stored type (round to nearest even, as PyTorch
    /// casts) into values `start..start + src.len()`.
    ///
    /// # Panics
    /// If the range is outside the storage (callers check their ranges).
    pub fn write_f32(&mut self, start: usize, src: &[f32]) {
        let end = start + src.len();
        match self {
            Storage::F16(v) => {
                for (d, s) in v[start..end].iter_mut().zip(src) {
                    *d = f16::from_f32(*s);
                }
            }
            Storage::BF16(v) => {
                for (d, s) in v[start..end].iter_mut().zip(src) {
                    *d = bf16::from_f32(*s);
                }
            }
            Storage::F32(v) => v[start..end].copy_from_slice(src),
        }
    }
}

/// A host tensor: row-major values of `shape` in one stored type.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Storage,
}

/// Elements of `shape`, checked.
pub(crate) fn elements(shape_: &[usize]) -> Result<usize> {
    shape_.iter().try_fold(1usize, |n, &d| mul(n, d, &format!("a tensor of shape {shape_:?}")))
}

impl Tensor {
    /// A tensor of `shape` holding `data` (as many values as the shape has).
    pub fn new(shape_: Vec<usize>, data: Storage) -> Result<Tensor> {
        let n = elements(&shape_)?;
        check_len("tensor", &format!("data for shape {shape_:?}"), data.len(), n)?;
        Ok(Tensor { shape: shape_, data })
    }

    /// A tensor from little-endian bytes (a safetensors payload).
    pub fn from_le_bytes(dtype: DType, shape_: Vec<usize>, bytes: &[u8]) -> Result<Tensor> {
        let n = elements(&shape_)?;
        let want = mul(n, dtype.size(), &format!("the bytes of a tensor of shape {shape_:?}"))?;
        if bytes.len() != want {
            return Err(shape(
                "tensor",
                format!("{} bytes for {dtype} shape {shape_:?}, expected {want}", bytes.len()),
            ));
        }
        let data = match dtype {
            DType::F16 => {
                Storage::F16(bytes.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect())
            }
            DType::BF16 => Storage::BF16(
                bytes.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
            ),
            DType::F32 => Storage::F32(
                bytes.chunks_exact(4).map(|b| f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect(),
            ),
        };
        Ok(Tensor { shape: shape_, data })
    }

    /// f32 values rounded to `dtype`.
    pub fn from_f32(dtype: DType, shape_: Vec<usize>, values: &[f32]) -> Result<Tensor> {
        let n = elements(&shape_)?;
        check_len("tensor", &format!("values for shape {shape_:?}"), values.len(), n)?;
        let mut data = Storage::zeros(dtype, n);
        data.write_f32(0, values);
        Ok(Tensor { shape: shape_, data })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Zeros of `dtype` and `shape`, or an error naming `what` if the
    /// memory cannot be had.
    pub fn try_zeros(dtype: DType, shape_: Vec<usize>, what: &str) -> Result<Tensor> {
        let n = elements(&shape_)?;
        mul(n, dtype.size(), what)?;
        Ok(Tensor { shape: shape_, data: Storage::try_zeros(dtype, n, what)? })
    }

    /// The values' memory, little-endian ([`Storage::as_bytes`]).
    pub fn as_bytes(&self) -> &[u8] {
        self.data.as_bytes()
    }

    /// [`Tensor::as_bytes`], writable: a tier reads straight into it.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        self.data.as_bytes_mut()
    }

    /// The values, giving up the tensor (to reshape it without a copy).
    pub fn into_storage(self) -> Storage {
        self.data
    }

    pub fn storage(&self) -> &Storage {
        &self.data
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The values as little-endian bytes (a safetensors payload).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.data {
            Storage::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Every value as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        if out.len() >= 1 << 16 {
            out.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| self.data.read_f32(i << 16, c));
        } else {
            self.data.read_f32(0, &mut out);
        }
        out
    }

    /// The tensor as a `rows × cols` matrix: its shape must be `[rows, cols]`
    /// exactly, or `[cols]` for `rows == 1`.
    pub(crate) fn matrix(&self, op: &'static str, what: &str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(Error::Shape { op, what: format!("{what} has shape {:?}, expected a matrix", self.shape) }),
        }
    }

    /// The tensor as a vector of `n` values.
    pub(crate) fn vector(&self, op: &'static str, what: &str, n: usize) -> Result<Vec<f32>> {
        if self.shape[..] != [n] {
            return Err(Error::Shape { op, what: format!("{what} has shape {:?}, expected [{n}]", self.shape) });
        }
        Ok(self.to_f32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_sizes_are_checked() {
        let vals = [1.0f32, -2.5, 0.15625, 65504.0];
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let t = Tensor::from_f32(dtype, vec![2, 2], &vals).unwrap();
            let bytes = t.to_le_bytes();
            assert_eq!(bytes.len(), 4 * dtype.size());
            let back = Tensor::from_le_bytes(dtype, vec![2, 2], &bytes).unwrap();
            assert_eq!(back, t);
            // These values are exact in every type but bf16's 65504 (→ 65536).
            let want: Vec<f32> = if dtype == DType::BF16 { vec![1.0, -2.5, 0.15625, 65536.0] } else { vals.to_vec() };
            assert_eq!(back.to_f32(), want, "{dtype}");
            let err = Tensor::from_le_bytes(dtype, vec![3, 2], &bytes).unwrap_err();
            assert!(err.to_string().contains("expected"), "{err}");
        }
        let err = Tensor::new(vec![usize::MAX, 3], Storage::F32(vec![])).unwrap_err();
        assert!(matches!(err, Error::Overflow { .. }), "{err}");
    }

    #[test]
    fn the_fast_f16_conversion_is_exact() {
        // Every f16 bit pattern but NaNs (whose payloads may differ), at an
        // odd length so that the tail after the 8-wide loop runs too.
        let src: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).filter(|v| !v.is_nan()).take(63_491).collect();
        let mut fast = vec![0.0f32; src.len()];
        f16_to_f32(&src, &mut fast);
        for (s, f) in src.iter().zip(&fast) {
            assert_eq!(f.to_bits(), s.to_f32().to_bits(), "{s}");
        }
    }

    #[test]
    fn byte_views_are_the_le_bytes() {
        let mut t = Tensor::from_f32(DType::BF16, vec![3], &[1.0, -2.0, 0.5]).unwrap();
        assert_eq!(t.as_bytes(), t.to_le_bytes().as_slice());
        t.as_bytes_mut()[..2].copy_from_slice(&bf16::from_f32(4.0).to_bits().to_le_bytes());
        assert_eq!(t.to_f32(), vec![4.0, -2.0, 0.5]);
    }
}

/// f16 → f32 on one thread. On x86-64 with F16C this converts eight values
/// an instruction in a loop the compiler keeps inline; `half`'s slice
/// conversion does the same through a call per eight values, which measured
/// about three times slower, and this conversion is most of the cost of a
/// decoding step's linear layers on the CPU.
///
/// Converts `min(src.len(), dst.len())` values.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
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
        let n = src.len().min(dst.len());
        let (src8, src_rest) = src[..n].split_at(n / 8 * 8);
        let (dst8, dst_rest) = dst[..n].split_at_mut(src8.len());
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
