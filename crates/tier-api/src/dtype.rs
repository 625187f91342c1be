//! Element types and shapes.

use crate::error::{Error, Result};
use std::fmt;

/// The element type of a tensor. Compressed tensors are stored as `U8`
/// buffers whose layout the `compression` crate describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    U8,
    I32,
}

impl DType {
    pub const ALL: [DType; 5] = [DType::F16, DType::BF16, DType::F32, DType::U8, DType::I32];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::U8 => 1,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::U8 => "u8",
            DType::I32 => "i32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A row-major shape. A shape with no dimensions is a scalar (one element).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements, or an error when it overflows `usize`.
    pub fn elem_count(&self) -> Result<usize> {
        self.0
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::SizeOverflow { shape: self.clone(), dtype: None })
    }

    /// Bytes of a dense tensor of this shape and `dtype`.
    pub fn byte_size(&self, dtype: DType) -> Result<usize> {
        self.elem_count()?
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::SizeOverflow { shape: self.clone(), dtype: Some(dtype) })
    }

    /// Row-major strides, in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut strides = vec![1usize; self.0.len()];
        for i in (0..self.0.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1].saturating_mul(self.0[i + 1]);
        }
        strides
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}

impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_strides() {
        let s = Shape::new([2, 3, 4]);
        assert_eq!(s.elem_count().ok(), Some(24));
        assert_eq!(s.byte_size(DType::F16).ok(), Some(48));
        assert_eq!(s.byte_size(DType::F32).ok(), Some(96));
        assert_eq!(s.strides(), vec![12, 4, 1]);
        assert_eq!(Shape::new([]).elem_count().ok(), Some(1));
        assert_eq!(s.to_string(), "[2, 3, 4]");
    }

    #[test]
    fn overflow_is_an_error() {
        let s = Shape::new([usize::MAX, 2]);
        assert!(matches!(s.elem_count(), Err(Error::SizeOverflow { .. })));
        let s = Shape::new([usize::MAX / 2 + 1]);
        assert!(s.byte_size(DType::F32).is_err());
    }
}
