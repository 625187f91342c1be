//! Packing codes into bytes. 8-bit codes are one byte each. 4-bit codes go
//! two per byte: code `2k` in the low nibble (bits 0-3) of byte `k`, code
//! `2k + 1` in the high nibble (bits 4-7).

use crate::error::{Error, Result};

/// Bytes needed for `n` codes of `bits` bits (4 or 8).
pub fn packed_len(n: usize, bits: u8) -> usize {
    if bits == 4 {
        n.div_ceil(2)
    } else {
        n
    }
}

fn check(bits: u8, n: usize, packed: usize) -> Result<()> {
    if bits != 4 && bits != 8 {
        return Err(Error::UnsupportedBits(bits));
    }
    let expected = packed_len(n, bits);
    if packed != expected {
        return Err(Error::BufferSize { what: "packed code buffer", expected, found: packed });
    }
    Ok(())
}

/// Packs `codes` (each `< 2^bits`; higher bits are dropped) into `out`, which
/// must be exactly `packed_len(codes.len(), bits)` long. With an odd count
/// of 4-bit codes the last byte's high nibble is 0.
pub fn pack_codes(codes: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check(bits, codes.len(), out.len())?;
    if bits == 8 {
        out.copy_from_slice(codes);
        return Ok(());
    }
    pack4(codes, out);
    Ok(())
}

/// Unpacks `out.len()` codes of `bits` bits from `packed`, which must be
/// exactly `packed_len(out.len(), bits)` long.
pub fn unpack_codes(packed: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check(bits, out.len(), packed.len())?;
    if bits == 8 {
        out.copy_from_slice(packed);
        return Ok(());
    }
    let mut pairs = out.chunks_exact_mut(2);
    for (pair, &b) in (&mut pairs).zip(packed) {
        pair[0] = b & 0x0f;
        pair[1] = b >> 4;
    }
    if let ([last], Some(&b)) = (pairs.into_remainder(), packed.last()) {
        *last = b & 0x0f;
    }
    Ok(())
}

/// 4-bit packing without checks; `out.len() == codes.len().div_ceil(2)`.
#[inline]
pub(crate) fn pack4(codes: &[u8], out: &mut [u8]) {
    // Fixed-size pairs let the loop vectorize.
    let (pairs, rest) = codes.as_chunks::<2>();
    for (b, &[lo, hi]) in out.iter_mut().zip(pairs) {
        *b = (lo & 0x0f) | (hi << 4);
    }
    if let ([last], Some(b)) = (rest, out.last_mut()) {
        *b = last & 0x0f;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_nibble_first() {
        let mut out = [0u8; 2];
        pack_codes(&[0x1, 0xa, 0xf], 4, &mut out).unwrap();
        assert_eq!(out, [0xa1, 0x0f]);
        let mut back = [0u8; 3];
        unpack_codes(&out, 4, &mut back).unwrap();
        assert_eq!(back, [0x1, 0xa, 0xf]);
    }

    #[test]
    fn round_trips_every_4bit_pair() {
        let codes: Vec<u8> = (0..256u32).flat_map(|v| [(v & 15) as u8, (v >> 4) as u8]).collect();
        let mut packed = vec![0u8; 256];
        pack_codes(&codes, 4, &mut packed).unwrap();
        let expected: Vec<u8> = (0..=255u8).collect();
        assert_eq!(packed, expected);
        let mut back = vec![0u8; codes.len()];
        unpack_codes(&packed, 4, &mut back).unwrap();
        assert_eq!(back, codes);
    }

    #[test]
    fn eight_bit_is_identity() {
        let codes: Vec<u8> = (0..=255u8).rev().collect();
        let mut packed = vec![0u8; 256];
        pack_codes(&codes, 8, &mut packed).unwrap();
        assert_eq!(packed, codes);
    }

    #[test]
    fn wrong_sizes_and_bits_are_errors() {
        let mut out = [0u8; 3];
        assert_eq!(
            pack_codes(&[1, 2, 3], 4, &mut out),
            Err(Error::BufferSize { what: "packed code buffer", expected: 2, found: 3 })
        );
        assert_eq!(pack_codes(&[1, 2, 3], 6, &mut out), Err(Error::UnsupportedBits(6)));
        let mut codes = [0u8; 5];
        assert!(unpack_codes(&[0u8; 2], 4, &mut codes).is_err());
    }
}
