//! [`CompressedTensor`]: one compressed buffer and its layout.

use half::f16;

use crate::dequantize::{dequantize_into, dequantize_into_f32, group_params, read_f16, sections};
use crate::error::{Error, Result};
use crate::format::CompressedLayout;

/// A compressed tensor: the bytes of the format (header, codes, scales,
/// mins) in one `Vec<u8>`, and the layout read from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressedTensor {
    layout: CompressedLayout,
    bytes: Vec<u8>,
}

impl CompressedTensor {
    /// Wraps bytes produced by [`crate::quantize_into`] (or copied from
    /// anywhere): reads the layout from the header and checks the length.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let layout = CompressedLayout::from_header(&bytes)?;
        Self::from_parts(layout, bytes)
    }

    pub(crate) fn from_parts(layout: CompressedLayout, bytes: Vec<u8>) -> Result<Self> {
        sections(&bytes, &layout)?;
        Ok(Self { layout, bytes })
    }

    /// Where everything is.
    pub fn layout(&self) -> &CompressedLayout {
        &self.layout
    }

    /// The whole buffer, `layout().total_bytes()` long.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Gives the buffer back.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Dequantizes into a new f16 vector.
    pub fn to_f16(&self) -> Vec<f16> {
        let mut out = vec![f16::ZERO; self.layout.numel()];
        // The buffer was checked against the layout in `from_parts`, and
        // `out` has the right length, so this cannot fail.
        let _ = dequantize_into(&self.bytes, &self.layout, &mut out);
        out
    }

    /// Dequantizes into a new f32 vector.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.layout.numel()];
        let _ = dequantize_into_f32(&self.bytes, &self.layout, &mut out);
        out
    }

    /// Dequantizes into `out` (f16, `numel` long).
    pub fn dequantize_into(&self, out: &mut [f16]) -> Result<()> {
        dequantize_into(&self.bytes, &self.layout, out)
    }

    /// Dequantizes into `out` (f32, `numel` long).
    pub fn dequantize_into_f32(&self, out: &mut [f32]) -> Result<()> {
        dequantize_into_f32(&self.bytes, &self.layout, out)
    }

    fn check_group(&self, group: usize) -> Result<()> {
        if group >= self.layout.num_groups() {
            return Err(Error::IndexOutOfRange { what: "group", index: group, len: self.layout.num_groups() });
        }
        Ok(())
    }

    /// The stored f16 scale of `group`.
    pub fn scale(&self, group: usize) -> Result<f16> {
        self.check_group(group)?;
        let s = sections(&self.bytes, &self.layout)?;
        Ok(read_f16(s.scales, group))
    }

    /// The stored f16 min of `group`, or `None` in symmetric mode.
    pub fn stored_min(&self, group: usize) -> Result<Option<f16>> {
        self.check_group(group)?;
        let s = sections(&self.bytes, &self.layout)?;
        Ok((!s.mins.is_empty()).then(|| read_f16(s.mins, group)))
    }

    /// The min and scale that decoding of `group` uses, as f32: a value with
    /// code `q` decodes to `clamp(min + q * scale, -65504, 65504)`. In
    /// symmetric mode `min = -2^(bits-1) * scale`.
    pub fn decode_params(&self, group: usize) -> Result<(f32, f32)> {
        self.check_group(group)?;
        let s = sections(&self.bytes, &self.layout)?;
        Ok(group_params(&s, self.layout.config(), group))
    }

    /// The code stored at position `pos` of `group` (padding included).
    pub fn code(&self, group: usize, pos: usize) -> Result<u8> {
        self.check_group(group)?;
        let gs = self.layout.config().group_size();
        if pos >= gs {
            return Err(Error::IndexOutOfRange { what: "position in group", index: pos, len: gs });
        }
        let s = sections(&self.bytes, &self.layout)?;
        let first = group * self.layout.group_bytes();
        Ok(if self.layout.config().bits() == 8 {
            s.data[first + pos]
        } else {
            let b = s.data[first + pos / 2];
            if pos.is_multiple_of(2) {
                b & 0x0f
            } else {
                b >> 4
            }
        })
    }
}
