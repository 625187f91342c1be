//! # compression: group-wise quantization of weights and KV cache
//!
//! This room holds FlexGen-style group quantization on the CPU: a byte
//! format for a compressed tensor, [`quantize`] / [`quantize_into`] from f16,
//! bf16 or f32, and [`dequantize_into`] / [`dequantize_into_bf16`] /
//! [`dequantize_into_f32`] back, all
//! parallel over groups with rayon. A compressed tensor is one contiguous
//! byte buffer (header, codes, scales, mins), so any memory tier can store
//! and copy it as plain bytes: a `u8` tensor of `total_bytes()`. On the GPU,
//! [`gpu::GpuDequantizer`] unpacks such a tensor into an f16 (or bf16) tensor with a
//! kernel compiled at run time, bit for bit like the CPU, so compressed
//! weights cross PCIe packed. [`layout_of`] (or [`CompressedLayout::new`])
//! gives every offset and size for a shape, and
//! [`CompressedLayout::kernel_params`] packs them into the `#[repr(C)]`
//! [`KernelParams`] the kernel takes by value; the header field offsets are
//! the `HDR_*` constants.
//!
//! It depends on `half`, `thiserror` and `rayon` (and may use `bytemuck`),
//! and, for the GPU half, on `tier-api` (tensors, views, the tiers' error)
//! and `tier-cuda` (GPU memory, streams, NVRTC kernels); on no other tierlm
//! crate. Without a CUDA driver or NVRTC everything but [`gpu`] works as
//! before, and [`gpu`] says why it cannot ("no CUDA driver: ...").
//!
//! Modules: `config` ([`CompressionConfig`], [`Mode`]), `format` (constants,
//! header, [`CompressedLayout`]), `pack` (nibble packing), `params` (a
//! group's min and scale), `quantize`, `dequantize`, `simd` (the x86-64
//! fast path for 4-bit to f16, SSSE3 + F16C, picked at run time, with
//! bit-identical results), `tensor` ([`CompressedTensor`]), [`gpu`] (the
//! GPU dequantizer and its kernels), `error` ([`Error`]).
//!
//! ```
//! use compression::{dequantize_into, quantize_into, CompressedLayout, CompressionConfig, SourceDtype};
//! use half::f16;
//!
//! let x: Vec<f16> = (0..4 * 128).map(|k| f16::from_f32((k as f32 / 9.0).sin())).collect();
//! let config = CompressionConfig::int4(1); // 4 bits, groups of 64 along dim 1
//! let layout = CompressedLayout::new(&[4, 128], SourceDtype::F16, config)?;
//! let mut bytes = vec![0u8; layout.total_bytes()]; // what a tier stores
//! quantize_into(&x, &layout, &mut bytes)?;
//! let mut y = vec![f16::ZERO; x.len()];
//! dequantize_into(&bytes, &layout, &mut y)?;
//! assert_eq!(bytes.len(), 64 + 512 * 9 / 16);
//! assert!(x.iter().zip(&y).all(|(a, b)| (a.to_f32() - b.to_f32()).abs() < 0.07));
//! # Ok::<(), compression::Error>(())
//! ```
//!
//! ## Groups
//!
//! A tensor of shape `[s_0, .., s_{n-1}]` (row-major, 1 to [`MAX_DIMS`]
//! dims) is cut into groups of `gs` = group size values running along dim
//! `d` = group dim. Write `outer = s_0 * .. * s_{d-1}`, `L = s_d`,
//! `inner = s_{d+1} * .. * s_{n-1}` and `G = ceil(L / gs)` (groups per line).
//! The value at flat index `(o * L + j) * inner + i` is in group
//!
//! ```text
//! k = (o * G + j / gs) * inner + i,   at position p = j % gs.
//! ```
//!
//! That is: view the tensor as `[outer, L, inner]`, pad `L` to `G * gs`,
//! reshape to `[outer, G, gs, inner]` and move `gs` innermost to get
//! `[outer, G, inner, gs]`; the codes are that array in row-major order, so
//! every group is a contiguous run. When the group dim is the last one
//! (`inner = 1`, the KV cache along head_dim) this is the original order
//! with each line padded to a multiple of `gs`. Conversely, position `p` of
//! group `k = (o * G + g) * inner + i` holds the value at `j = g * gs + p`;
//! positions with `j >= L` (only in the last group of a line) are padding:
//! their code is 0, they take no part in choosing the group's min and
//! scale, and they are never decoded.
//! [`CompressedLayout::group_of`] and [`CompressedLayout::element_index`]
//! compute this mapping.
//!
//! ## Byte format (version 1)
//!
//! All integers and f16 values are little-endian; offsets count from the
//! start of the buffer. With `num_groups = outer * G * inner` and
//! `gb = gs * bits / 8` bytes of codes per group:
//!
//! | offset | bytes | section |
//! |---|---|---|
//! | 0 | 64 ([`HEADER_BYTES`]) | header |
//! | 64 | `data_bytes = align16(num_groups * gb)` | packed codes, group `k` at `64 + k * gb`; zero-filled tail |
//! | `64 + data_bytes` | `2 * num_groups` | scales: f16, one per group, in group order |
//! | after the scales | `2 * num_groups` (asymmetric), 0 (symmetric) | mins: f16, one per group |
//!
//! `align16(n)` rounds up to a multiple of [`SECTION_ALIGN`] (16), so the
//! scales start 16-byte aligned; the mins follow the scales directly (2-byte
//! aligned). [`CompressedLayout`] gives every offset and size.
//!
//! **Packing.** 8 bits: code `p` of a group is byte `p` of its run. 4 bits:
//! two codes per byte, code `p` in byte `p / 2`, in the **low nibble**
//! (bits 0-3) when `p` is even and the high nibble (bits 4-7) when odd;
//! the first value of each pair is the low nibble. `gs` is even, so groups
//! start on byte boundaries.
//!
//! **Header** (64 bytes; field offsets are the `HDR_*` constants):
//!
//! | offset | type | field |
//! |---|---|---|
//! | 0 | `[u8; 4]` | magic `b"TLQZ"` ([`MAGIC`]) |
//! | 4 | `u16` | format version, 1 ([`FORMAT_VERSION`]) |
//! | 6 | `u8` | bits per code: 4 or 8 |
//! | 7 | `u8` | mode: 0 asymmetric, 1 symmetric |
//! | 8 | `u8` | dtype of the original: 0 f16, 1 f32 |
//! | 9 | `u8` | ndim, 1 to 6 |
//! | 10 | `u8` | group dim, `< ndim` |
//! | 11 | `u8` | reserved, 0 |
//! | 12 | `u32` | group size (even, 2 to 65536) |
//! | 16 | `[u64; 6]` | shape; dims past ndim are 0 |
//!
//! ## Decoding
//!
//! Code `q` of group `k` decodes, in f32 arithmetic, to
//!
//! ```text
//! x' = clamp(min_k + q * scale_k, -65504, 65504)
//! ```
//!
//! with `scale_k` the stored f16 scale and `min_k` the stored f16 min
//! (asymmetric) or `-2^(bits-1) * scale_k` (symmetric, i.e.
//! `x' = (q - 2^(bits-1)) * scale_k`). `q * scale_k` is exact in f32, so a
//! fused multiply-add gives the same bits. f16 output then rounds `x'` to
//! nearest even. The clamp keeps outputs finite: with the scale rounded up,
//! the top code can land a little past 65504.
//!
//! ## Encoding and the error bound
//!
//! Asymmetric: `min` = the largest f16 `<=` the group's smallest value;
//! `scale` = the smallest f16 `>= (max - min) / (2^bits - 1)`; then with
//! those *stored* numbers `q = clamp(round((x - min) / scale), 0,
//! 2^bits - 1)`. Symmetric: `scale` = the smallest f16 `>= max|x| /
//! (2^(bits-1) - 1)`, `q = clamp(round(x / scale) + 2^(bits-1), 1,
//! 2^bits - 1)`. `round` is to nearest, ties to even (a tie is half a step
//! either way). The arithmetic is done in f64 (a zero scale gives code 0,
//! resp. `2^(bits-1)`, with no division), which for f16 inputs picks
//! the true nearest code (for f32 inputs it can miss only by about 2^-50
//! of the value). Because the min is rounded down and the scale up,
//! every value lies within `[min, min + (2^bits - 1) * scale]`, so
//!
//! ```text
//! |min + q * scale - x| <= scale / 2       (exact arithmetic, stored min and scale)
//! ```
//!
//! and the clamp only moves `x'` closer to `x`. The f32 addition adds at
//! most half an f32 ulp of `x'`; f16 output adds at most half an f16 ulp
//! of the result (a strict `scale / 2` after rounding to f16 cannot hold in
//! general: `x'` may fall on a tie between two f16 neighbours of `x`).
//!
//! Special groups: a group whose values are all equal gets `scale = 0`
//! (asymmetric; every code 0) or `scale = |value|` rounded up with code
//! `2^(bits-1) ± 1` (symmetric; zeros get code `2^(bits-1)`), so it comes
//! back exactly when the value is an f16 (always, for f16 input); nothing is
//! divided by zero. Subnormal ranges get at least the smallest subnormal
//! scale; the largest range (`-65504 ..= 65504`) gives a finite scale.
//!
//! Inputs must be finite ([`Error::NonFinite`]) and, for f32 and bf16, within
//! `[-65504, 65504]` ([`Error::OutOfRange`]), since min and scale are f16.
//! Dequantizing checks the buffer's length and header against the layout;
//! it does not check the scales themselves, so bytes that did not come from
//! [`quantize_into`] may decode to anything (NaN included), but nothing in
//! this crate panics on them.
//!
//! ## Memory
//!
//! ```text
//! total_bytes = 64 + align16(outer * G * inner * gs * bits / 8)
//!                  + 2 * outer * G * inner * (2 if asymmetric, 1 if symmetric)
//! ```
//!
//! For 4 bits, groups of 64, asymmetric, and `L` a multiple of 64 this is
//! exactly `64 + 0.5625 * numel` bytes (0.5 byte of code, 4 bytes of min and
//! scale per 64 values). Otherwise each line of `L` values is padded to
//! `G * gs`: codes cost `G * gs / L` times more and there are `G` instead of
//! `L / gs` groups per line (e.g. `L = 80`: 72 bytes per 80 values, 0.9
//! bytes per value, instead of 45), and the data section may carry up to 15
//! bytes of alignment padding.
//!
//! ## Parallelism
//!
//! Work is split into slabs: the `inner` groups sharing `(o, j / gs)`,
//! whose values are one contiguous range of the original tensor and whose
//! codes are one contiguous range of the data. Runs of slabs of about 64 Ki
//! values are rayon tasks. When `inner > 1` groups are gathered and
//! scattered 64 columns at a time so the original tensor is read and
//! written along rows.

mod config;
mod dequantize;
mod error;
mod format;
pub mod gpu;
pub mod pack;
mod params;
mod quantize;
mod simd;
mod tensor;

pub use config::{CompressionConfig, Mode, DEFAULT_GROUP_SIZE};
pub use dequantize::{dequantize_into, dequantize_into_bf16, dequantize_into_f32};
pub use error::{Error, Result, TierError};
pub use format::{
    layout_of, CompressedLayout, KernelParams, SourceDtype, F16_MAX, FORMAT_VERSION, HDR_BITS, HDR_DTYPE,
    HDR_GROUP_DIM, HDR_GROUP_SIZE, HDR_MAGIC, HDR_MODE, HDR_NDIM, HDR_RESERVED, HDR_SHAPE, HDR_VERSION, HEADER_BYTES,
    MAGIC, MAX_DIMS, MAX_GROUP_SIZE, SECTION_ALIGN,
};
pub use quantize::{quantize, quantize_into, Element};
pub use tensor::CompressedTensor;
