//! What to compress with: bits, group size, group dimension, mode.

use crate::error::{Error, Result};
use crate::format::MAX_GROUP_SIZE;

/// Group size FlexGen uses for weights and KV cache.
pub const DEFAULT_GROUP_SIZE: usize = 64;

/// How a group's values map to codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `value = min + code * scale`, codes `0 ..= 2^bits - 1`. Stores a min
    /// and a scale per group.
    Asymmetric,
    /// `value = (code - 2^(bits-1)) * scale`, codes `1 ..= 2^bits - 1`
    /// (zero-centred, so `-7 ..= 7` steps for 4 bits). Stores only a scale.
    Symmetric,
}

impl Mode {
    /// The header's byte for this mode.
    pub fn to_byte(self) -> u8 {
        match self {
            Mode::Asymmetric => 0,
            Mode::Symmetric => 1,
        }
    }

    /// The mode a header byte names, if any.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Mode::Asymmetric),
            1 => Some(Mode::Symmetric),
            _ => None,
        }
    }
}

/// A validated compression setting. Build it with [`CompressionConfig::new`]
/// or [`CompressionConfig::int4`]; the fields cannot hold invalid values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressionConfig {
    bits: u8,
    group_size: usize,
    group_dim: usize,
    mode: Mode,
}

impl CompressionConfig {
    /// Checks `bits` is 4 or 8 and `group_size` is even, non-zero and at most
    /// [`MAX_GROUP_SIZE`]. `group_dim` is checked against a shape later, by
    /// [`crate::CompressedLayout::new`].
    pub fn new(bits: u8, group_size: usize, group_dim: usize, mode: Mode) -> Result<Self> {
        if bits != 4 && bits != 8 {
            return Err(Error::UnsupportedBits(bits));
        }
        if group_size == 0 || !group_size.is_multiple_of(2) || group_size > MAX_GROUP_SIZE {
            return Err(Error::InvalidGroupSize(group_size));
        }
        Ok(Self { bits, group_size, group_dim, mode })
    }

    /// FlexGen's setting: 4 bits, groups of 64, asymmetric, along `group_dim`.
    pub fn int4(group_dim: usize) -> Self {
        Self { bits: 4, group_size: DEFAULT_GROUP_SIZE, group_dim, mode: Mode::Asymmetric }
    }

    /// Bits per stored code: 4 or 8.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Values per group (even, non-zero).
    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// The dimension of the shape along which groups run.
    pub fn group_dim(&self) -> usize {
        self.group_dim
    }

    /// Asymmetric (min and scale) or symmetric (scale only).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Largest code: `2^bits - 1`.
    pub fn max_code(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Bytes of packed codes per group: `group_size * bits / 8`.
    pub fn group_bytes(&self) -> usize {
        self.group_size * usize::from(self.bits) / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_settings() {
        for bits in [4, 8] {
            for gs in [2, 4, 64, 126, MAX_GROUP_SIZE] {
                let c = CompressionConfig::new(bits, gs, 3, Mode::Symmetric).unwrap();
                assert_eq!(c.bits(), bits);
                assert_eq!(c.group_size(), gs);
                assert_eq!(c.group_dim(), 3);
                assert_eq!(c.group_bytes(), gs * bits as usize / 8);
            }
        }
        let d = CompressionConfig::int4(1);
        assert_eq!((d.bits(), d.group_size(), d.mode()), (4, 64, Mode::Asymmetric));
        assert_eq!(d.max_code(), 15);
    }

    #[test]
    fn rejects_bad_group_sizes() {
        for gs in [0, 1, 3, 63, MAX_GROUP_SIZE + 2] {
            assert_eq!(CompressionConfig::new(4, gs, 0, Mode::Asymmetric), Err(Error::InvalidGroupSize(gs)));
        }
    }

    #[test]
    fn rejects_bad_bits() {
        for bits in [0, 1, 2, 3, 5, 7, 16, 255] {
            assert_eq!(CompressionConfig::new(bits, 64, 0, Mode::Asymmetric), Err(Error::UnsupportedBits(bits)));
        }
    }

    #[test]
    fn mode_bytes_round_trip() {
        for m in [Mode::Asymmetric, Mode::Symmetric] {
            assert_eq!(Mode::from_byte(m.to_byte()), Some(m));
        }
        assert_eq!(Mode::from_byte(2), None);
    }
}
