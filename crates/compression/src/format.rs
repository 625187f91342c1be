//! The byte format: constants, header, and [`CompressedLayout`], which says
//! where every section and every group lives. The crate doc comment is the
//! specification; this module is its arithmetic.

use crate::config::{CompressionConfig, Mode};
use crate::error::{Error, Result};

/// First four bytes of every compressed tensor.
pub const MAGIC: [u8; 4] = *b"TLQZ";
/// Format version written at [`HDR_VERSION`].
pub const FORMAT_VERSION: u16 = 1;
/// Size of the fixed header at the start of the buffer.
pub const HEADER_BYTES: usize = 64;
/// Most dimensions a shape may have.
pub const MAX_DIMS: usize = 6;
/// Largest group size accepted.
pub const MAX_GROUP_SIZE: usize = 1 << 16;
/// The data section's length is rounded up to a multiple of this, so the
/// scale section starts 16-byte aligned (relative to the buffer start).
pub const SECTION_ALIGN: usize = 16;
/// Largest finite f16; dequantized values are clamped to `[-F16_MAX, F16_MAX]`.
pub const F16_MAX: f32 = 65504.0;

/// Header byte offset of the magic (`[u8; 4]`).
pub const HDR_MAGIC: usize = 0;
/// Header byte offset of the format version (`u16` LE).
pub const HDR_VERSION: usize = 4;
/// Header byte offset of bits per code (`u8`: 4 or 8).
pub const HDR_BITS: usize = 6;
/// Header byte offset of the mode (`u8`: 0 asymmetric, 1 symmetric).
pub const HDR_MODE: usize = 7;
/// Header byte offset of the source dtype (`u8`: 0 f16, 1 f32).
pub const HDR_DTYPE: usize = 8;
/// Header byte offset of the number of dims (`u8`, `1 ..= MAX_DIMS`).
pub const HDR_NDIM: usize = 9;
/// Header byte offset of the group dim index (`u8`, `< ndim`).
pub const HDR_GROUP_DIM: usize = 10;
/// Header byte offset of a reserved byte (must be 0).
pub const HDR_RESERVED: usize = 11;
/// Header byte offset of the group size (`u32` LE).
pub const HDR_GROUP_SIZE: usize = 12;
/// Header byte offset of the shape (`MAX_DIMS` x `u64` LE; unused dims 0).
pub const HDR_SHAPE: usize = 16;

/// Element type of the values that were quantized (recorded in the header;
/// any can be dequantized to f16, bf16 or f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceDtype {
    F16,
    F32,
    /// bfloat16, as most current checkpoints store their weights
    /// (values must lie in f16's range: the scales and mins are f16).
    BF16,
}

impl SourceDtype {
    /// The header's byte for this dtype.
    pub fn to_byte(self) -> u8 {
        match self {
            SourceDtype::F16 => 0,
            SourceDtype::F32 => 1,
            SourceDtype::BF16 => 2,
        }
    }

    /// The dtype a header byte names, if any.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(SourceDtype::F16),
            1 => Some(SourceDtype::F32),
            2 => Some(SourceDtype::BF16),
            _ => None,
        }
    }

    /// Bytes per element of the original tensor.
    pub fn size_in_bytes(self) -> usize {
        match self {
            SourceDtype::F16 | SourceDtype::BF16 => 2,
            SourceDtype::F32 => 4,
        }
    }
}

/// Where everything lives in the compressed buffer of one tensor.
///
/// The tensor is viewed as `[outer, dim_len, inner]` around the group dim,
/// `dim_len` is padded to `padded_len = groups_per_line * group_size`, and
/// group `k = (o * groups_per_line + g) * inner + i` holds the values
/// `[o, g * group_size + p, i]` for `p in 0..group_size`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompressedLayout {
    shape: Vec<usize>,
    dtype: SourceDtype,
    config: CompressionConfig,
    outer: usize,
    dim_len: usize,
    inner: usize,
    groups_per_line: usize,
    num_groups: usize,
    numel: usize,
    data_bytes: usize,
    scales_offset: usize,
    mins_offset: usize,
    mins_bytes: usize,
    total_bytes: usize,
}

/// The numbers a GPU dequantize kernel needs, as one `#[repr(C)]` struct
/// that can be passed by value as a kernel argument. See the crate doc for
/// the formulas.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelParams {
    /// Product of the dims before the group dim.
    pub outer: u64,
    /// Length of the group dim.
    pub dim_len: u64,
    /// Product of the dims after the group dim.
    pub inner: u64,
    /// Total number of groups.
    pub num_groups: u64,
    /// Byte offset of the packed codes (always [`HEADER_BYTES`]).
    pub data_offset: u64,
    /// Byte offset of the f16 scales.
    pub scales_offset: u64,
    /// Byte offset of the f16 mins (equal to the end of the buffer when
    /// symmetric: there are none).
    pub mins_offset: u64,
    /// `ceil(dim_len / group_size)`.
    pub groups_per_line: u32,
    /// Values per group.
    pub group_size: u32,
    /// 4 or 8.
    pub bits: u32,
    /// 0 asymmetric, 1 symmetric.
    pub symmetric: u32,
}

fn checked_product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn align_up(n: usize, a: usize) -> Option<usize> {
    Some(n.checked_add(a - 1)? / a * a)
}

impl CompressedLayout {
    /// The layout of a tensor of `shape` and `dtype` compressed with `config`.
    /// Fails if the group dim is not a dim of `shape`, if `shape` has more
    /// than [`MAX_DIMS`] dims, or if the sizes overflow `usize`.
    pub fn new(shape: &[usize], dtype: SourceDtype, config: CompressionConfig) -> Result<Self> {
        let ndim = shape.len();
        if ndim > MAX_DIMS {
            return Err(Error::TooManyDims(ndim));
        }
        let dim = config.group_dim();
        if dim >= ndim {
            return Err(Error::InvalidGroupDim { dim, ndim });
        }
        let overflow = || Error::ShapeOverflow(shape.to_vec());
        let outer = checked_product(&shape[..dim]).ok_or_else(overflow)?;
        let dim_len = shape[dim];
        let inner = checked_product(&shape[dim + 1..]).ok_or_else(overflow)?;
        let numel = checked_product(shape).ok_or_else(overflow)?;
        let gs = config.group_size();
        let groups_per_line = dim_len.div_ceil(gs);
        let padded_len = groups_per_line.checked_mul(gs).ok_or_else(overflow)?;
        let num_groups = checked_product(&[outer, groups_per_line, inner]).ok_or_else(overflow)?;
        // Everything below is bounded by a small multiple of the padded
        // element count, checked here once.
        checked_product(&[outer, padded_len, inner, 8]).ok_or_else(overflow)?;
        let data_bytes = align_up(num_groups * config.group_bytes(), SECTION_ALIGN).ok_or_else(overflow)?;
        let scales_offset = HEADER_BYTES.checked_add(data_bytes).ok_or_else(overflow)?;
        let mins_offset = scales_offset.checked_add(2 * num_groups).ok_or_else(overflow)?;
        let mins_bytes = match config.mode() {
            Mode::Asymmetric => 2 * num_groups,
            Mode::Symmetric => 0,
        };
        let total_bytes = mins_offset.checked_add(mins_bytes).ok_or_else(overflow)?;
        Ok(Self {
            shape: shape.to_vec(),
            dtype,
            config,
            outer,
            dim_len,
            inner,
            groups_per_line,
            num_groups,
            numel,
            data_bytes,
            scales_offset,
            mins_offset,
            mins_bytes,
            total_bytes,
        })
    }

    /// Reads the header at the start of `bytes` and rebuilds the layout.
    /// Checks the header only, not that `bytes` is `total_bytes()` long.
    pub fn from_header(bytes: &[u8]) -> Result<Self> {
        let h = bytes.get(..HEADER_BYTES).ok_or(Error::InvalidHeader("shorter than the header"))?;
        if h[HDR_MAGIC..HDR_MAGIC + 4] != MAGIC {
            return Err(Error::InvalidHeader("bad magic"));
        }
        if u16::from_le_bytes([h[HDR_VERSION], h[HDR_VERSION + 1]]) != FORMAT_VERSION {
            return Err(Error::InvalidHeader("unknown format version"));
        }
        let mode = Mode::from_byte(h[HDR_MODE]).ok_or(Error::InvalidHeader("bad mode"))?;
        let dtype = SourceDtype::from_byte(h[HDR_DTYPE]).ok_or(Error::InvalidHeader("bad source dtype"))?;
        let ndim = usize::from(h[HDR_NDIM]);
        if ndim == 0 || ndim > MAX_DIMS {
            return Err(Error::InvalidHeader("bad number of dims"));
        }
        if h[HDR_RESERVED] != 0 {
            return Err(Error::InvalidHeader("reserved byte is not zero"));
        }
        let mut gs = [0u8; 4];
        gs.copy_from_slice(&h[HDR_GROUP_SIZE..HDR_GROUP_SIZE + 4]);
        let group_size = usize::try_from(u32::from_le_bytes(gs))
            .map_err(|_| Error::InvalidHeader("group size does not fit usize"))?;
        let mut shape = Vec::with_capacity(ndim);
        for d in 0..MAX_DIMS {
            let at = HDR_SHAPE + 8 * d;
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            let v = u64::from_le_bytes(b);
            if d < ndim {
                shape.push(usize::try_from(v).map_err(|_| Error::InvalidHeader("dim does not fit usize"))?);
            } else if v != 0 {
                return Err(Error::InvalidHeader("unused dim is not zero"));
            }
        }
        let config = CompressionConfig::new(h[HDR_BITS], group_size, usize::from(h[HDR_GROUP_DIM]), mode)?;
        Self::new(&shape, dtype, config)
    }

    /// The 64-byte header for this layout (see the crate doc for its fields).
    pub fn header(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[HDR_MAGIC..HDR_MAGIC + 4].copy_from_slice(&MAGIC);
        h[HDR_VERSION..HDR_VERSION + 2].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[HDR_BITS] = self.config.bits();
        h[HDR_MODE] = self.config.mode().to_byte();
        h[HDR_DTYPE] = self.dtype.to_byte();
        // ndim <= MAX_DIMS, group_dim < ndim and group_size <= MAX_GROUP_SIZE
        // were checked in `new`, so these narrowings are lossless.
        h[HDR_NDIM] = self.shape.len() as u8;
        h[HDR_GROUP_DIM] = self.config.group_dim() as u8;
        h[HDR_GROUP_SIZE..HDR_GROUP_SIZE + 4].copy_from_slice(&(self.config.group_size() as u32).to_le_bytes());
        for (d, &len) in self.shape.iter().enumerate() {
            let at = HDR_SHAPE + 8 * d;
            h[at..at + 8].copy_from_slice(&(len as u64).to_le_bytes());
        }
        h
    }

    /// Shape of the original tensor.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element type of the original tensor.
    pub fn dtype(&self) -> SourceDtype {
        self.dtype
    }

    /// The compression setting.
    pub fn config(&self) -> &CompressionConfig {
        &self.config
    }

    /// Number of values in the original tensor.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Product of the dims before the group dim.
    pub fn outer(&self) -> usize {
        self.outer
    }

    /// Length of the group dim.
    pub fn dim_len(&self) -> usize {
        self.dim_len
    }

    /// Product of the dims after the group dim.
    pub fn inner(&self) -> usize {
        self.inner
    }

    /// Groups along one line of the group dim: `ceil(dim_len / group_size)`.
    pub fn groups_per_line(&self) -> usize {
        self.groups_per_line
    }

    /// Length of the group dim after padding: `groups_per_line * group_size`.
    pub fn padded_len(&self) -> usize {
        self.groups_per_line * self.config.group_size()
    }

    /// Total number of groups: `outer * groups_per_line * inner`.
    pub fn num_groups(&self) -> usize {
        self.num_groups
    }

    /// Bytes of packed codes per group.
    pub fn group_bytes(&self) -> usize {
        self.config.group_bytes()
    }

    /// Byte offset of the packed codes: right after the header.
    pub fn data_offset(&self) -> usize {
        HEADER_BYTES
    }

    /// Length of the data section: `num_groups * group_bytes` rounded up to
    /// [`SECTION_ALIGN`] (the tail bytes are zero).
    pub fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    /// Byte offset of the scales: `num_groups` f16, little-endian.
    pub fn scales_offset(&self) -> usize {
        self.scales_offset
    }

    /// Length of the scale section: `2 * num_groups`.
    pub fn scales_bytes(&self) -> usize {
        2 * self.num_groups
    }

    /// Byte offset of the mins: `num_groups` f16 (asymmetric only).
    pub fn mins_offset(&self) -> usize {
        self.mins_offset
    }

    /// Length of the min section: `2 * num_groups`, or 0 when symmetric.
    pub fn mins_bytes(&self) -> usize {
        self.mins_bytes
    }

    /// Length of the whole compressed buffer.
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Bytes of the original tensor (`numel * dtype size`).
    pub fn source_bytes(&self) -> usize {
        self.numel * self.dtype.size_in_bytes()
    }

    /// The group and the position inside it of the value at `index` (a flat,
    /// row-major index into the original tensor), or `None` out of range.
    pub fn group_of(&self, index: usize) -> Option<(usize, usize)> {
        if index >= self.numel {
            return None;
        }
        let line = self.dim_len * self.inner;
        let (o, rest) = (index / line, index % line);
        let (j, i) = (rest / self.inner, rest % self.inner);
        let gs = self.config.group_size();
        let group = (o * self.groups_per_line + j / gs) * self.inner + i;
        Some((group, j % gs))
    }

    /// The flat index of the value at position `pos` of `group`, or `None`
    /// for a padding position or out of range. Inverse of [`Self::group_of`].
    pub fn element_index(&self, group: usize, pos: usize) -> Option<usize> {
        let gs = self.config.group_size();
        if group >= self.num_groups || pos >= gs {
            return None;
        }
        let i = group % self.inner;
        let line_group = group / self.inner;
        let (o, g) = (line_group / self.groups_per_line, line_group % self.groups_per_line);
        let j = g * gs + pos;
        if j >= self.dim_len {
            return None;
        }
        Some((o * self.dim_len + j) * self.inner + i)
    }

    /// Number of slabs: `outer * groups_per_line`. Slab `s` is the
    /// `inner` groups sharing `(o, g)`; its values are one contiguous range
    /// of the original tensor and its codes one contiguous range of the data.
    pub(crate) fn num_slabs(&self) -> usize {
        self.outer * self.groups_per_line
    }

    /// Range of flat value indices covered by slabs `s0..s1`.
    pub(crate) fn slab_values(&self, s0: usize, s1: usize) -> std::ops::Range<usize> {
        self.slab_start(s0)..self.slab_start(s1)
    }

    fn slab_start(&self, s: usize) -> usize {
        if self.groups_per_line == 0 {
            return 0;
        }
        let (o, g) = (s / self.groups_per_line, s % self.groups_per_line);
        (o * self.dim_len + g * self.config.group_size()) * self.inner
    }

    /// Number of real (not padding) values in each group of slab `s`.
    pub(crate) fn slab_len(&self, s: usize) -> usize {
        let g = s % self.groups_per_line.max(1);
        let gs = self.config.group_size();
        gs.min(self.dim_len - g * gs)
    }

    /// Numbers for a GPU kernel (see [`KernelParams`]).
    pub fn kernel_params(&self) -> KernelParams {
        KernelParams {
            outer: self.outer as u64,
            dim_len: self.dim_len as u64,
            inner: self.inner as u64,
            num_groups: self.num_groups as u64,
            data_offset: HEADER_BYTES as u64,
            scales_offset: self.scales_offset as u64,
            mins_offset: self.mins_offset as u64,
            groups_per_line: self.groups_per_line as u32,
            group_size: self.config.group_size() as u32,
            bits: u32::from(self.config.bits()),
            symmetric: u32::from(self.config.mode() == Mode::Symmetric),
        }
    }
}

/// The layout of a tensor of `shape` and `dtype` compressed with `config`:
/// the same as [`CompressedLayout::new`], under the name a GPU backend looks
/// for. Offsets and sizes follow the crate doc comment exactly.
pub fn layout_of(shape: &[usize], dtype: SourceDtype, config: CompressionConfig) -> Result<CompressedLayout> {
    CompressedLayout::new(shape, dtype, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn int4(dim: usize) -> CompressionConfig {
        CompressionConfig::int4(dim)
    }

    #[test]
    fn four_bit_group64_fits_the_memory_budget() {
        // 0.5 byte of data + 2 f16 per 64 values = 0.5625 byte per value,
        // plus the fixed header, whenever the group dim is a multiple of 64.
        let shapes: &[(&[usize], usize)] = &[
            (&[64], 0),
            (&[4096], 0),
            (&[3, 128], 1),
            (&[128, 5], 0),
            (&[2, 192, 7], 1),
            (&[7, 9, 64], 2),
            (&[1024, 1024], 0),
            (&[2, 3, 5, 320], 3),
            (&[64, 3, 2, 1], 0),
        ];
        for &(shape, dim) in shapes {
            let l = CompressedLayout::new(shape, SourceDtype::F16, int4(dim)).unwrap();
            let n = l.numel() as f64;
            let budget = 0.5625 * n + HEADER_BYTES as f64;
            assert!(l.total_bytes() as f64 <= budget, "{shape:?} dim {dim}: {} bytes > {budget}", l.total_bytes());
            // and it is not smaller than the data itself could be
            assert_eq!(l.total_bytes(), HEADER_BYTES + l.numel() * 9 / 16);
        }
    }

    #[test]
    fn padding_overhead_when_not_a_multiple() {
        // head_dim 80 with groups of 64: each line pads to 128 values.
        let l = CompressedLayout::new(&[10, 80], SourceDtype::F16, int4(1)).unwrap();
        assert_eq!(l.groups_per_line(), 2);
        assert_eq!(l.padded_len(), 128);
        assert_eq!(l.num_groups(), 20);
        assert_eq!(l.data_bytes(), 20 * 32);
        assert_eq!(l.total_bytes(), HEADER_BYTES + 20 * 32 + 20 * 4);
    }

    #[test]
    fn sections_follow_each_other() {
        let c = CompressionConfig::new(4, 6, 0, Mode::Asymmetric).unwrap();
        let l = CompressedLayout::new(&[7, 3], SourceDtype::F32, c).unwrap();
        // 2 groups per line (6 + 1 padded to 12), 3 lines across inner.
        assert_eq!(l.num_groups(), 6);
        assert_eq!(l.group_bytes(), 3);
        assert_eq!(l.data_offset(), 64);
        assert_eq!(l.data_bytes(), 32); // 18 rounded up to 16
        assert_eq!(l.scales_offset(), 96);
        assert_eq!(l.mins_offset(), 108);
        assert_eq!(l.total_bytes(), 120);
        let s = CompressionConfig::new(8, 6, 0, Mode::Symmetric).unwrap();
        let l = CompressedLayout::new(&[7, 3], SourceDtype::F32, s).unwrap();
        assert_eq!(l.data_bytes(), 48); // 36 rounded up
        assert_eq!(l.mins_bytes(), 0);
        assert_eq!(l.total_bytes(), 64 + 48 + 12);
    }

    #[test]
    fn header_round_trips() {
        let c = CompressionConfig::new(8, 10, 2, Mode::Symmetric).unwrap();
        let l = CompressedLayout::new(&[2, 3, 25, 4], SourceDtype::F32, c).unwrap();
        let h = l.header();
        assert_eq!(&h[..4], b"TLQZ");
        assert_eq!(CompressedLayout::from_header(&h).unwrap(), l);
    }

    #[test]
    fn bad_headers_are_rejected() {
        let l = CompressedLayout::new(&[4, 64], SourceDtype::F16, int4(1)).unwrap();
        let good = l.header();
        let cases: &[(usize, u8)] = &[
            (HDR_MAGIC, b'X'),
            (HDR_VERSION, 9),
            (HDR_BITS, 5),
            (HDR_MODE, 7),
            (HDR_DTYPE, 3),
            (HDR_NDIM, 0),
            (HDR_NDIM, 7),
            (HDR_GROUP_DIM, 2),
            (HDR_RESERVED, 1),
            (HDR_GROUP_SIZE, 63),
            (HDR_SHAPE + 8 * 5, 1),
        ];
        for &(at, v) in cases {
            let mut h = good;
            h[at] = v;
            assert!(CompressedLayout::from_header(&h).is_err(), "byte {at} = {v}");
        }
        assert_eq!(CompressedLayout::from_header(&good[..10]), Err(Error::InvalidHeader("shorter than the header")));
    }

    #[test]
    fn bad_shapes_are_rejected() {
        assert_eq!(
            CompressedLayout::new(&[4, 4], SourceDtype::F16, int4(2)),
            Err(Error::InvalidGroupDim { dim: 2, ndim: 2 })
        );
        assert_eq!(
            CompressedLayout::new(&[], SourceDtype::F16, int4(0)),
            Err(Error::InvalidGroupDim { dim: 0, ndim: 0 })
        );
        assert_eq!(CompressedLayout::new(&[1; 7], SourceDtype::F16, int4(0)), Err(Error::TooManyDims(7)));
        let huge = [usize::MAX / 2, 4];
        assert_eq!(CompressedLayout::new(&huge, SourceDtype::F16, int4(0)), Err(Error::ShapeOverflow(huge.to_vec())));
    }

    #[test]
    fn group_of_and_element_index_are_inverse() {
        let c = CompressionConfig::new(4, 4, 1, Mode::Asymmetric).unwrap();
        let l = CompressedLayout::new(&[2, 9, 3], SourceDtype::F16, c).unwrap();
        assert_eq!(l.groups_per_line(), 3);
        assert_eq!(l.num_groups(), 2 * 3 * 3);
        // [o=1, j=5, i=2]: g = 1, pos = 1, group = (1*3 + 1)*3 + 2 = 14.
        assert_eq!(l.group_of((9 + 5) * 3 + 2), Some((14, 1)));
        let mut seen = vec![false; l.numel()];
        for g in 0..l.num_groups() {
            for p in 0..4 {
                if let Some(idx) = l.element_index(g, p) {
                    assert_eq!(l.group_of(idx), Some((g, p)));
                    assert!(!seen[idx]);
                    seen[idx] = true;
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(l.group_of(l.numel()), None);
        assert_eq!(l.element_index(l.num_groups(), 0), None);
        // j = 2*4 + 1 = 9 is padding
        assert_eq!(l.element_index(2 * 3, 1), None);
    }

    #[test]
    fn empty_tensors_have_no_groups() {
        let l = CompressedLayout::new(&[3, 0, 5], SourceDtype::F16, int4(1)).unwrap();
        assert_eq!((l.numel(), l.num_groups()), (0, 0));
        assert_eq!(l.total_bytes(), HEADER_BYTES);
        let l = CompressedLayout::new(&[0, 64], SourceDtype::F16, int4(1)).unwrap();
        assert_eq!(l.num_groups(), 0);
        assert_eq!(l.element_index(0, 0), None);
    }

    #[test]
    fn kernel_params_match_layout() {
        let l = CompressedLayout::new(&[5, 100, 3], SourceDtype::F16, int4(1)).unwrap();
        let k = l.kernel_params();
        assert_eq!(k.groups_per_line, 2);
        assert_eq!(k.num_groups, 30);
        assert_eq!(k.scales_offset as usize, l.scales_offset());
        assert_eq!(k.mins_offset as usize, l.mins_offset());
        assert_eq!((k.bits, k.symmetric, k.group_size), (4, 0, 64));
        assert_eq!(layout_of(&[5, 100, 3], SourceDtype::F16, int4(1)).unwrap(), l);
    }
}
