//! A compressed buffer back to f16, bf16 or f32 values, in parallel over
//! slabs.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::config::CompressionConfig;
use crate::error::{Error, Result};
use crate::format::{CompressedLayout, HEADER_BYTES};
use crate::params::{decode, effective_min};
use crate::quantize::{slabs_per_task, TILE};
use crate::simd;

/// Output element types of dequantization: `f16`, `bf16` and `f32`.
pub(crate) trait Output: Copy + Default + Send + Sync {
    /// Narrows `src` into `dst` (same length), rounding to nearest even.
    fn from_f32_slice(src: &[f32], dst: &mut [Self]);

    /// Decodes `out.len()` 4-bit codes exactly like the portable path, with
    /// a faster one; false (and nothing written) where there is none.
    fn decode4_fast(_codes: &[u8], _min: f32, _scale: f32, _out: &mut [Self]) -> bool {
        false
    }
}

impl Output for f16 {
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }

    fn decode4_fast(codes: &[u8], min: f32, scale: f32, out: &mut [Self]) -> bool {
        if !simd::available() {
            return false;
        }
        // SAFETY: `simd::available()` just confirmed the CPU features the
        // function is compiled for.
        unsafe { simd::decode_group4_f16(codes, min, scale, out) };
        true
    }
}

impl Output for bf16 {
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

impl Output for f32 {
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

/// Dequantizes the whole compressed buffer `packed` (header included, of
/// exactly `layout.total_bytes()`) into `out` (of `layout.numel()` values).
///
/// Each value is `clamp(min + code * scale, -65504, 65504)` computed in f32,
/// then rounded to f16. It lies within `scale / 2` of the original before
/// that last rounding.
pub fn dequantize_into(packed: &[u8], layout: &CompressedLayout, out: &mut [f16]) -> Result<()> {
    dequantize_generic(packed, layout, out)
}

/// Like [`dequantize_into`], to bf16: `clamp(min + code * scale, -65504,
/// 65504)` in f32, then rounded to bf16 (to nearest even; NaN stays NaN).
pub fn dequantize_into_bf16(packed: &[u8], layout: &CompressedLayout, out: &mut [bf16]) -> Result<()> {
    dequantize_generic(packed, layout, out)
}

/// Like [`dequantize_into`], to f32: `clamp(min + code * scale, -65504,
/// 65504)` in f32, no further rounding.
pub fn dequantize_into_f32(packed: &[u8], layout: &CompressedLayout, out: &mut [f32]) -> Result<()> {
    dequantize_generic(packed, layout, out)
}

/// The parts of a buffer a reader needs, after checking it against a layout.
pub(crate) struct Sections<'a> {
    pub data: &'a [u8],
    pub scales: &'a [u8],
    pub mins: &'a [u8],
}

pub(crate) fn sections<'a>(packed: &'a [u8], layout: &CompressedLayout) -> Result<Sections<'a>> {
    if packed.len() != layout.total_bytes() {
        return Err(Error::BufferSize {
            what: "compressed buffer",
            expected: layout.total_bytes(),
            found: packed.len(),
        });
    }
    if packed[..HEADER_BYTES] != layout.header() {
        return Err(Error::LayoutMismatch);
    }
    let data_end = HEADER_BYTES + layout.num_groups() * layout.group_bytes();
    Ok(Sections {
        data: &packed[HEADER_BYTES..data_end],
        scales: &packed[layout.scales_offset()..layout.mins_offset()],
        mins: &packed[layout.mins_offset()..],
    })
}

/// Reads the f16 at index `k` of a section.
#[inline]
pub(crate) fn read_f16(section: &[u8], k: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([section[2 * k], section[2 * k + 1]]))
}

/// The effective (min, scale) of group `k`, as f32, for [`decode`].
#[inline]
pub(crate) fn group_params(s: &Sections<'_>, config: &CompressionConfig, k: usize) -> (f32, f32) {
    let scale = read_f16(s.scales, k).to_f32();
    let stored_min = if s.mins.is_empty() { f16::ZERO } else { read_f16(s.mins, k) };
    (effective_min(stored_min, scale, config), scale)
}

fn dequantize_generic<O: Output>(packed: &[u8], layout: &CompressedLayout, out: &mut [O]) -> Result<()> {
    let sec = sections(packed, layout)?;
    if out.len() != layout.numel() {
        return Err(Error::BufferSize { what: "output", expected: layout.numel(), found: out.len() });
    }
    if layout.num_groups() == 0 {
        return Ok(());
    }
    let step = slabs_per_task(layout);
    let mut tasks = Vec::with_capacity(layout.num_slabs().div_ceil(step));
    let mut rest = out;
    let mut s0 = 0;
    while s0 < layout.num_slabs() {
        let s1 = (s0 + step).min(layout.num_slabs());
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(layout.slab_values(s0, s1).len());
        rest = tail;
        tasks.push((s0, s1, part));
        s0 = s1;
    }
    tasks.into_par_iter().for_each(|(s0, s1, part)| run_task(&sec, layout, s0, s1, part));
    Ok(())
}

fn run_task<O: Output>(sec: &Sections<'_>, layout: &CompressedLayout, s0: usize, s1: usize, out: &mut [O]) {
    let config = layout.config();
    let gs = config.group_size();
    let inner = layout.inner();
    let tile = TILE.min(inner);
    let mut dec = Decoder { sec, config, wide: vec![0f32; gs] };
    let mut narrow = vec![O::default(); tile * gs];
    let mut rest = out;
    for s in s0..s1 {
        let len = layout.slab_len(s);
        let (slab, tail) = std::mem::take(&mut rest).split_at_mut(len * inner);
        rest = tail;
        let first = s * inner;
        if inner == 1 {
            dec.group(first, slab);
            continue;
        }
        // Decode `tile` groups (columns of the [len, inner] slab), then
        // write them out row by row.
        for c0 in (0..inner).step_by(tile) {
            let tw = tile.min(inner - c0);
            for t in 0..tw {
                dec.group(first + c0 + t, &mut narrow[t * gs..t * gs + len]);
            }
            for j in 0..len {
                let dst = &mut slab[j * inner + c0..j * inner + c0 + tw];
                for (t, d) in dst.iter_mut().enumerate() {
                    *d = narrow[t * gs + j];
                }
            }
        }
    }
}

struct Decoder<'a, 'b> {
    sec: &'a Sections<'b>,
    config: &'a CompressionConfig,
    wide: Vec<f32>,
}

impl Decoder<'_, '_> {
    /// Decodes the first `out.len()` values of group `k`.
    #[inline]
    fn group<O: Output>(&mut self, k: usize, out: &mut [O]) {
        let (min, scale) = group_params(self.sec, self.config, k);
        let gb = self.config.group_bytes();
        let codes = &self.sec.data[k * gb..(k + 1) * gb];
        if self.config.bits() == 4 {
            if !O::decode4_fast(codes, min, scale, out) {
                decode4_table(codes, min, scale, out);
            }
        } else {
            let wide = &mut self.wide[..out.len()];
            for (w, &c) in wide.iter_mut().zip(codes) {
                *w = decode(min, scale, c);
            }
            O::from_f32_slice(wide, out);
        }
    }
}

/// Portable 4-bit decoding: the 16 possible values once, then a lookup per
/// code. `codes` holds at least `out.len().div_ceil(2)` bytes.
fn decode4_table<O: Output>(codes: &[u8], min: f32, scale: f32, out: &mut [O]) {
    let mut wide = [0f32; 16];
    for (q, w) in wide.iter_mut().enumerate() {
        *w = decode(min, scale, q as u8);
    }
    let mut table = [O::default(); 16];
    O::from_f32_slice(&wide, &mut table);
    let mut pairs = out.chunks_exact_mut(2);
    let mut bytes = codes.iter();
    for (pair, &b) in (&mut pairs).zip(&mut bytes) {
        pair[0] = table[usize::from(b & 0x0f)];
        pair[1] = table[usize::from(b >> 4)];
    }
    if let ([last], Some(&b)) = (pairs.into_remainder(), bytes.next()) {
        *last = table[usize::from(b & 0x0f)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_4bit_table_matches_decode_for_both_outputs() {
        // Exercised here directly: on CPUs with the fast path, f16 output
        // never reaches it otherwise.
        let codes: Vec<u8> = (0..=255u8).collect();
        for &(min, scale) in &[(-2.0f32, 0.3f32), (65504.0, 8736.0), (0.0, 0.0)] {
            for len in [0, 1, 7, 64, 511, 512] {
                let mut h = vec![f16::ZERO; len];
                decode4_table(&codes, min, scale, &mut h);
                let mut w = vec![0f32; len];
                decode4_table(&codes, min, scale, &mut w);
                for p in 0..len {
                    let b = codes[p / 2];
                    let q = if p % 2 == 0 { b & 15 } else { b >> 4 };
                    let want = decode(min, scale, q);
                    assert_eq!(w[p], want, "p {p}");
                    assert_eq!(h[p], f16::from_f32(want), "p {p}");
                }
            }
        }
    }
}
