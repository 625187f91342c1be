//! Property tests: random shapes (1-D to 4-D), group sizes, group dims, bits,
//! modes and input dtypes. The buffer is read here straight from the byte
//! format documented in the crate doc, not through the crate's accessors,
//! so a layout bug cannot hide behind a matching reader.

use compression::pack::{pack_codes, packed_len, unpack_codes};
use compression::{
    dequantize_into, dequantize_into_bf16, dequantize_into_f32, quantize, quantize_into, CompressedLayout,
    CompressedTensor, CompressionConfig, Error, Mode, SourceDtype, HEADER_BYTES,
};
use half::{bf16, f16};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    shape: Vec<usize>,
    dim: usize,
    gs: usize,
    bits: u8,
    mode: Mode,
    f16_input: bool,
    values: Vec<f32>,
}

impl Case {
    fn config(&self) -> CompressionConfig {
        CompressionConfig::new(self.bits, self.gs, self.dim, self.mode).unwrap()
    }

    fn quantize(&self) -> CompressedTensor {
        if self.f16_input {
            let x: Vec<f16> = self.values.iter().map(|&v| f16::from_f32(v)).collect();
            quantize(&x, &self.shape, self.config()).unwrap()
        } else {
            quantize(&self.values, &self.shape, self.config()).unwrap()
        }
    }
}

fn shape() -> impl Strategy<Value = Vec<usize>> {
    (1usize..=4).prop_flat_map(|nd| {
        let max = [300, 40, 12, 7][nd - 1];
        prop::collection::vec(1usize..=max, nd)
    })
}

/// Values of one of several kinds: any finite f16; uniform at one random
/// magnitude (2^-24 to 2^15); a few special values (constants, extremes,
/// subnormals); a large offset plus small noise.
fn values(kind: u8, exp: i32, n: usize) -> BoxedStrategy<Vec<f32>> {
    let elem: BoxedStrategy<f32> = match kind {
        0 => any::<u16>()
            .prop_map(|b| {
                let h = f16::from_bits(b);
                if h.is_finite() {
                    h.to_f32()
                } else {
                    0.0
                }
            })
            .boxed(),
        1 => (-1.0f32..1.0).prop_map(move |u| u * 2f32.powi(exp)).boxed(),
        2 => prop::sample::select(vec![0.0f32, -0.0, 1.0, -2.5, 65504.0, -65504.0, f16::from_bits(1).to_f32(), 1000.0])
            .boxed(),
        _ => (-1.0f32..1.0).prop_map(|u| 1000.0 + u * 0.01).boxed(),
    };
    prop::collection::vec(elem, n).boxed()
}

fn case() -> impl Strategy<Value = Case> {
    (
        shape(),
        prop::sample::select(vec![2usize, 4, 6, 8, 10, 16, 64]),
        prop::sample::select(vec![4u8, 8]),
        any::<bool>(),
        any::<bool>(),
        0u8..4,
        -24i32..=15,
    )
        .prop_flat_map(|(shape, gs, bits, sym, f16_input, kind, exp)| {
            let n = shape.iter().product();
            let ndim = shape.len();
            (Just(shape), 0..ndim, Just(gs), Just(bits), Just(sym), Just(f16_input), values(kind, exp, n))
        })
        .prop_map(|(shape, dim, gs, bits, sym, f16_input, values)| {
            let values = if f16_input { values.iter().map(|&v| f16::from_f32(v).to_f32()).collect() } else { values };
            Case { shape, dim, gs, bits, mode: if sym { Mode::Symmetric } else { Mode::Asymmetric }, f16_input, values }
        })
}

/// Reads the buffer as the crate doc specifies.
struct Reader<'a> {
    bytes: &'a [u8],
    gs: usize,
    bits: u8,
    mode: Mode,
    num_groups: usize,
    data_bytes: usize,
}

impl Reader<'_> {
    fn code(&self, group: usize, pos: usize) -> u8 {
        let gb = self.gs * self.bits as usize / 8;
        if self.bits == 8 {
            self.bytes[HEADER_BYTES + group * gb + pos]
        } else {
            let b = self.bytes[HEADER_BYTES + group * gb + pos / 2];
            if pos.is_multiple_of(2) {
                b & 0x0f
            } else {
                b >> 4
            }
        }
    }

    fn f16_at(&self, offset: usize) -> f16 {
        f16::from_bits(u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]]))
    }

    fn scale(&self, group: usize) -> f16 {
        self.f16_at(HEADER_BYTES + self.data_bytes + 2 * group)
    }

    fn stored_min(&self, group: usize) -> f16 {
        self.f16_at(HEADER_BYTES + self.data_bytes + 2 * self.num_groups + 2 * group)
    }

    /// (min, scale) as decoding uses them, in f64.
    fn params(&self, group: usize) -> (f64, f64) {
        let s = f64::from(self.scale(group));
        match self.mode {
            Mode::Asymmetric => (f64::from(self.stored_min(group)), s),
            Mode::Symmetric => (-f64::from(1u32 << (self.bits - 1)) * s, s),
        }
    }
}

/// Group and position of every flat index, by walking multi-indices.
fn expected_groups(shape: &[usize], dim: usize, gs: usize) -> Vec<(usize, usize)> {
    let n: usize = shape.iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let per_line = shape[dim].div_ceil(gs);
    let mut idx = vec![0usize; shape.len()];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let o = idx[..dim].iter().zip(&shape[..dim]).fold(0, |acc, (&i, &s)| acc * s + i);
        let i = idx[dim + 1..].iter().zip(&shape[dim + 1..]).fold(0, |acc, (&i, &s)| acc * s + i);
        let j = idx[dim];
        out.push(((o * per_line + j / gs) * inner + i, j % gs));
        // odometer, last dim fastest (row-major)
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Smallest f16 >= v, by stepping through f16 bit patterns (independent of
/// the crate's own rounding).
fn f16_ceil(v: f64) -> f64 {
    let mut h = f16::from_f64(v);
    while f64::from(h) < v {
        let b = h.to_bits();
        h = f16::from_bits(if b == 0x8000 {
            1
        } else if b & 0x8000 != 0 {
            b - 1
        } else {
            b + 1
        });
    }
    loop {
        let b = h.to_bits();
        let prev = f16::from_bits(if b & 0x7fff == 0 {
            0x8001
        } else if b & 0x8000 != 0 {
            b + 1
        } else {
            b - 1
        });
        if f64::from(prev) >= v {
            h = prev;
        } else {
            return f64::from(h);
        }
    }
}

fn f16_floor(v: f64) -> f64 {
    -f16_ceil(-v)
}

fn check(case: &Case) -> Result<(), TestCaseError> {
    let t = case.quantize();
    let layout = t.layout();
    let bytes = t.as_bytes();
    let r = Reader {
        bytes,
        gs: case.gs,
        bits: case.bits,
        mode: case.mode,
        num_groups: layout.num_groups(),
        data_bytes: layout.data_bytes(),
    };
    prop_assert_eq!(bytes.len(), layout.total_bytes());
    let groups = expected_groups(&case.shape, case.dim, case.gs);

    // Which values each group holds, by the documented formula.
    let mut members: Vec<Vec<f64>> = vec![Vec::new(); layout.num_groups()];
    let mut used = vec![vec![false; case.gs]; layout.num_groups()];
    for (k, &(g, p)) in groups.iter().enumerate() {
        prop_assert_eq!(layout.group_of(k), Some((g, p)));
        members[g].push(f64::from(case.values[k]));
        used[g][p] = true;
    }

    // Stored parameters are the tight f16 roundings of the group's range.
    let max_code = f64::from((1u32 << case.bits) - 1);
    for (g, m) in members.iter().enumerate() {
        prop_assert!(!m.is_empty(), "group {} is empty", g);
        let lo = m.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = m.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s = f64::from(r.scale(g));
        match case.mode {
            Mode::Asymmetric => {
                let min = f64::from(r.stored_min(g));
                prop_assert_eq!(min, f16_floor(lo), "group {} min", g);
                let want = if hi > min { f16_ceil((hi - min) / max_code) } else { 0.0 };
                prop_assert_eq!(s, want, "group {} scale", g);
            }
            Mode::Symmetric => {
                let amax = lo.abs().max(hi.abs());
                let want = if lo == hi { f16_ceil(amax) } else { f16_ceil(amax / (max_code / 2.0).floor()) };
                prop_assert_eq!(s, want, "group {} scale", g);
            }
        }
        // padding positions hold code 0
        for (p, &real) in used[g].iter().enumerate() {
            if !real {
                prop_assert_eq!(r.code(g, p), 0, "padding code, group {} pos {}", g, p);
            }
        }
    }

    // The half-step bound with the stored numbers, in exact arithmetic.
    let mut out32 = vec![0f32; layout.numel()];
    dequantize_into_f32(bytes, layout, &mut out32).unwrap();
    let mut out16 = vec![f16::ZERO; layout.numel()];
    dequantize_into(bytes, layout, &mut out16).unwrap();
    for (k, &(g, p)) in groups.iter().enumerate() {
        let x = f64::from(case.values[k]);
        let (min, s) = r.params(g);
        let q = r.code(g, p);
        let y = (min + f64::from(q) * s).clamp(-65504.0, 65504.0);
        // f16 inputs: exact. f32 inputs: f64 rounding of the quotient.
        let slack = if case.f16_input { 0.0 } else { x.abs() * 1e-12 };
        prop_assert!((y - x).abs() <= s / 2.0 + slack, "index {}: x {} y {} step {}", k, x, y, s);
        // f32 output: y with one f32 rounding.
        let o = f64::from(out32[k]);
        prop_assert!((o - y).abs() <= y.abs() * f64::from(f32::EPSILON) / 2.0, "index {}: out {} y {}", k, o, y);
        // f16 output: the f32 output rounded to f16.
        prop_assert_eq!(out16[k], f16::from_f32(out32[k]), "index {}", k);
        prop_assert!(out16[k].is_finite());
    }

    // Constant groups of f16 values come back exactly.
    if case.f16_input {
        for (k, &(g, _)) in groups.iter().enumerate() {
            let m = &members[g];
            if m.iter().all(|&v| v == m[0]) {
                prop_assert_eq!(f64::from(out16[k]), f64::from(case.values[k]), "constant group {}", g);
            }
        }
    }

    // quantize_into into a dirty buffer writes the same bytes; the bytes
    // alone rebuild the tensor.
    let dtype = if case.f16_input { SourceDtype::F16 } else { SourceDtype::F32 };
    let l2 = CompressedLayout::new(&case.shape, dtype, case.config()).unwrap();
    prop_assert_eq!(&l2, layout);
    let mut buf = vec![0xa5u8; l2.total_bytes()];
    if case.f16_input {
        let x: Vec<f16> = case.values.iter().map(|&v| f16::from_f32(v)).collect();
        quantize_into(&x, &l2, &mut buf).unwrap();
    } else {
        quantize_into(&case.values, &l2, &mut buf).unwrap();
    }
    prop_assert_eq!(&buf[..], bytes);
    prop_assert_eq!(CompressedTensor::from_bytes(buf).unwrap(), t);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn quantize_round_trip_properties(case in case()) {
        check(&case)?;
    }

    /// Values constant along the group dim: every group is constant.
    #[test]
    fn constant_groups_are_exact(
        shape in shape(),
        dim_pick in 0usize..4,
        gs in prop::sample::select(vec![2usize, 6, 64]),
        bits in prop::sample::select(vec![4u8, 8]),
        sym in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let dim = dim_pick % shape.len();
        let inner: usize = shape[dim + 1..].iter().product();
        let len = shape[dim];
        let n: usize = shape.iter().product();
        let x: Vec<f16> = (0..n)
            .map(|k| {
                let (o, i) = (k / (len * inner), k % inner);
                let j = (k / inner) % len;
                let h = (seed ^ ((o * 7919 + i) as u64 * 0x9e37_79b9) ^ (j / gs) as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let b = (h >> 48) as u16;
                let v = f16::from_bits(b);
                if v.is_finite() { v } else { f16::from_bits(b & 0x3fff) }
            })
            .collect();
        let mode = if sym { Mode::Symmetric } else { Mode::Asymmetric };
        let c = CompressionConfig::new(bits, gs, dim, mode).unwrap();
        let t = quantize(&x, &shape, c).unwrap();
        let y = t.to_f16();
        for (k, (a, b)) in x.iter().zip(&y).enumerate() {
            prop_assert_eq!(a.to_f32(), b.to_f32(), "index {}", k);
        }
    }

    #[test]
    fn packing_round_trips_low_nibble_first(
        codes in prop::collection::vec(0u8..16, 0..200),
        bits in prop::sample::select(vec![4u8, 8]),
    ) {
        let mut packed = vec![0u8; packed_len(codes.len(), bits)];
        pack_codes(&codes, bits, &mut packed).unwrap();
        if bits == 4 {
            for (k, &c) in codes.iter().enumerate() {
                let b = packed[k / 2];
                prop_assert_eq!(if k % 2 == 0 { b & 15 } else { b >> 4 }, c);
            }
        }
        let mut back = vec![0xffu8; codes.len()];
        unpack_codes(&packed, bits, &mut back).unwrap();
        prop_assert_eq!(back, codes);
    }

    #[test]
    fn bad_values_name_the_first_index(
        shape in shape(),
        dim_pick in 0usize..4,
        picks in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4), 1..4),
    ) {
        let n: usize = shape.iter().product();
        let mut x = vec![0.5f32; n];
        let mut first = usize::MAX;
        for (at, kind) in &picks {
            let k = at.index(n);
            x[k] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -70000.0][*kind as usize];
            first = first.min(k);
        }
        let c = CompressionConfig::int4(dim_pick % shape.len());
        let err = quantize(&x, &shape, c).unwrap_err();
        let v = x[first];
        match err {
            Error::NonFinite { index, .. } => prop_assert!(index == first && !v.is_finite()),
            Error::OutOfRange { index, value } => prop_assert!(index == first && value == v),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
        // the f16 path reports non-finite values the same way
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let err = quantize(&xh, &shape, c).unwrap_err();
        let first16 = xh.iter().position(|h| !h.is_finite());
        match err {
            Error::NonFinite { index, .. } => prop_assert_eq!(Some(index), first16),
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    /// bf16 input quantizes exactly as its (exact) f32 values do, the
    /// header's dtype byte apart, and dequantizes to bf16 as the f32 output
    /// rounded to bf16; a bf16 value past f16's range is named.
    #[test]
    fn bf16_input_quantizes_as_its_f32_values(case in case(), out_at in any::<prop::sample::Index>()) {
        let x: Vec<bf16> = case.values.iter().map(|&v| bf16::from_f32(v.clamp(-65280.0, 65280.0))).collect();
        let wide: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let from_bf16 = quantize(&x, &case.shape, case.config()).unwrap();
        let from_f32 = quantize(&wide, &case.shape, case.config()).unwrap();
        let (a, b) = (from_bf16.as_bytes(), from_f32.as_bytes());
        prop_assert_eq!(a.len(), b.len());
        let dtype_byte = compression::HDR_DTYPE;
        prop_assert_eq!(a[dtype_byte], SourceDtype::BF16.to_byte());
        prop_assert_eq!(&a[..dtype_byte], &b[..dtype_byte]);
        prop_assert_eq!(&a[dtype_byte + 1..], &b[dtype_byte + 1..]);
        let layout = from_bf16.layout();
        let mut f = vec![0f32; wide.len()];
        dequantize_into_f32(a, layout, &mut f).unwrap();
        let mut h = vec![bf16::ZERO; wide.len()];
        dequantize_into_bf16(a, layout, &mut h).unwrap();
        for (k, (&hv, &fv)) in h.iter().zip(&f).enumerate() {
            prop_assert_eq!(hv.to_bits(), bf16::from_f32(fv).to_bits(), "value {}", k);
        }
        if !x.is_empty() {
            let mut bad = x.clone();
            let k = out_at.index(bad.len());
            bad[k] = bf16::from_f32(1.0e5);
            match quantize(&bad, &case.shape, case.config()) {
                Err(Error::OutOfRange { index, .. }) => prop_assert!(index <= k),
                other => prop_assert!(false, "unexpected {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn wrong_sizes_are_rejected(shape in shape(), extra in 1usize..5) {
        let n: usize = shape.iter().product();
        let c = CompressionConfig::int4(shape.len() - 1);
        let x = vec![f16::ONE; n + extra];
        prop_assert_eq!(
            quantize(&x, &shape, c).unwrap_err(),
            Error::ShapeMismatch { shape: shape.clone(), expected: n, found: n + extra }
        );
        let layout = CompressedLayout::new(&shape, SourceDtype::F16, c).unwrap();
        let total = layout.total_bytes();
        let mut buf = vec![0u8; total + extra];
        prop_assert_eq!(
            quantize_into(&x[..n], &layout, &mut buf).unwrap_err(),
            Error::BufferSize { what: "compressed buffer", expected: total, found: total + extra }
        );
        quantize_into(&x[..n], &layout, &mut buf[..total]).unwrap();
        let mut out = vec![f16::ZERO; n + extra];
        prop_assert_eq!(
            dequantize_into(&buf[..total], &layout, &mut out).unwrap_err(),
            Error::BufferSize { what: "output", expected: n, found: n + extra }
        );
        let long_buffer = dequantize_into(&buf, &layout, &mut out[..n]);
        prop_assert!(
            matches!(long_buffer, Err(Error::BufferSize { what: "compressed buffer", .. })),
            "got {:?}",
            long_buffer
        );
    }
}
