//! The GPU quantizer against the CPU's `quantize_into`, byte for byte:
//! the KV cache's shapes, random shapes, group sizes, group dims, bits,
//! modes, dtypes and buffer offsets, with the output poisoned first and
//! guard zones around it checked after; the round trip through the GPU
//! dequantizer; bad values and bad arguments. Every test prints "skipped:
//! no CUDA driver" and passes where there is no GPU.

#[macro_use]
mod common;

use common::{bits_of, f16_bytes, Rig, Rng};
use compression::gpu::{GpuQuantOptions, GpuQuantizer, QuantPath};
use compression::{
    dequantize_into, quantize_into, CompressedLayout, CompressionConfig, Error, Mode, SourceDtype, HEADER_BYTES,
};
use half::f16;
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use tier_api::{DType, Device, Shape, Storage, Tensor};

/// The default quantizer and one that always takes the generic kernel.
struct Quants {
    fast: GpuQuantizer,
    generic: GpuQuantizer,
}

fn quants(rig: &Rig) -> &'static Quants {
    static Q: OnceLock<Quants> = OnceLock::new();
    Q.get_or_init(|| Quants {
        fast: GpuQuantizer::new(Arc::clone(&rig.gpu)).expect("quantizer"),
        generic: GpuQuantizer::with_options(Arc::clone(&rig.gpu), GpuQuantOptions { force_generic: true })
            .expect("generic quantizer"),
    })
}

/// A byte no header starts with: whatever still holds it around the output
/// was not written.
const POISON: u8 = 0xa5;
const GUARD: usize = 40;

#[derive(Clone, Debug)]
struct Case {
    shape: Vec<usize>,
    bits: u8,
    gs: usize,
    dim: usize,
    mode: Mode,
    f32_source: bool,
    /// bf16 input (where not f32), as most current checkpoints hold.
    bf16_source: bool,
    /// Element offset of the input in its GPU tensor.
    src_at: usize,
    /// Byte offset of the compressed buffer in its GPU tensor.
    out_at: usize,
}

impl Case {
    fn kv(rows: usize, head_dim: usize, bits: u8, mode: Mode) -> Case {
        Case {
            shape: vec![rows, head_dim],
            bits,
            gs: 64,
            dim: 1,
            mode,
            f32_source: false,
            bf16_source: false,
            src_at: 0,
            out_at: 0,
        }
    }

    fn layout(&self) -> CompressedLayout {
        let c = CompressionConfig::new(self.bits, self.gs, self.dim, self.mode).unwrap();
        let dtype = match self.dtype() {
            DType::F32 => SourceDtype::F32,
            DType::BF16 => SourceDtype::BF16,
            _ => SourceDtype::F16,
        };
        CompressedLayout::new(&self.shape, dtype, c).unwrap()
    }

    /// Input bytes (f16, bf16 or f32, little-endian) and the CPU's
    /// compressed bytes.
    fn cpu(&self, v: &[f32]) -> (Vec<u8>, Vec<u8>) {
        let layout = self.layout();
        let mut packed = vec![0u8; layout.total_bytes()];
        if self.f32_source {
            quantize_into(v, &layout, &mut packed).unwrap();
            (v.iter().flat_map(|x| x.to_le_bytes()).collect(), packed)
        } else if self.bf16_source {
            // Values past f16's range after rounding to bf16 are brought in.
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x.clamp(-65280.0, 65280.0))).collect();
            quantize_into(&h, &layout, &mut packed).unwrap();
            (h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(), packed)
        } else {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            quantize_into(&h, &layout, &mut packed).unwrap();
            (f16_bytes(&h), packed)
        }
    }

    fn dtype(&self) -> DType {
        if self.f32_source {
            DType::F32
        } else if self.bf16_source {
            DType::BF16
        } else {
            DType::F16
        }
    }
}

fn random_case(rng: &mut Rng) -> Case {
    let bits = rng.pick(&[4u8, 8]);
    let gs = rng.pick(&[2usize, 4, 6, 8, 10, 16, 32, 48, 64, 64, 64, 96, 128, 128, 256, 512]);
    let ndim = 1 + rng.below(4);
    let dim = rng.below(ndim);
    let mut shape: Vec<usize> = (0..ndim).map(|_| 1 + rng.below([3000, 64, 12, 6][ndim - 1])).collect();
    // Make the rows kernel likely: group dim last, a multiple of the group size.
    if rng.below(2) == 0 {
        shape[dim] = gs * (1 + rng.below(4));
    }
    let dim = if rng.below(3) == 0 { ndim - 1 } else { dim };
    if rng.below(2) == 0 {
        shape[dim] = gs * (1 + rng.below(4));
    }
    while shape.iter().product::<usize>() > 1 << 18 {
        let d = rng.below(ndim);
        shape[d] = shape[d].div_ceil(2);
    }
    let (odd_src, odd_out) = (1 + rng.below(7), 1 + rng.below(15));
    Case {
        shape,
        bits,
        gs,
        dim,
        mode: rng.pick(&[Mode::Asymmetric, Mode::Symmetric]),
        f32_source: rng.below(4) == 0,
        bf16_source: rng.below(3) == 0,
        src_at: rng.pick(&[0, 0, 8, 64, odd_src]),
        out_at: rng.pick(&[0, 0, 16, 256, odd_out]),
    }
}

/// Quantizes `v` on the GPU with `q` and checks the bytes against the
/// CPU's; returns the path taken.
fn run_values(rig: &Rig, q: &GpuQuantizer, case: &Case, v: &[f32]) -> QuantPath {
    let layout = case.layout();
    let (input, want) = case.cpu(v);
    let size = case.dtype().size();
    // The input inside a larger tensor, random bytes around it (always
    // finite: a bad value outside the view must not be seen).
    let mut holder = vec![0u8; (case.src_at + layout.numel() + 5) * size];
    for c in holder.chunks_mut(size) {
        c.copy_from_slice(&[0x11u8, 0x3c, 0x00, 0x3f][..size]);
    }
    holder[case.src_at * size..case.src_at * size + input.len()].copy_from_slice(&input);
    let src_t = rig.upload(&holder, case.dtype());
    let src_v = src_t.narrow(0, case.src_at, layout.numel()).unwrap();
    let total = case.out_at + want.len() + GUARD;
    let out_t = rig.upload(&vec![POISON; total], DType::U8);
    let out_v = out_t.narrow(0, case.out_at, want.len()).unwrap();
    let path = q.quantize(&src_v, &layout, &out_v).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let got = rig.download(&out_t.view());
    assert!(got[..case.out_at].iter().all(|&b| b == POISON), "{case:?}: wrote before the output");
    assert!(got[case.out_at + want.len()..].iter().all(|&b| b == POISON), "{case:?}: wrote past the output");
    let got = &got[case.out_at..case.out_at + want.len()];
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        let section = if i < HEADER_BYTES {
            "header".to_string()
        } else if i < layout.scales_offset() {
            format!("codes of group {}", (i - HEADER_BYTES) / layout.group_bytes())
        } else if i < layout.mins_offset() {
            format!("scale of group {}", (i - layout.scales_offset()) / 2)
        } else {
            format!("min of group {}", (i - layout.mins_offset()) / 2)
        };
        panic!("{case:?} ({path:?}): byte {i} ({section}) is {:#04x}, the CPU writes {:#04x}", got[i], want[i]);
    }
    path
}

fn run(rig: &Rig, q: &GpuQuantizer, case: &Case, rng: &mut Rng) -> QuantPath {
    let v = common::values(rng, case.layout().numel());
    run_values(rig, q, case, &v)
}

#[test]
fn kv_cache_shapes_match_the_cpu_byte_for_byte() {
    let rig = rig_or_skip!();
    let q = quants(rig);
    let mut rng = Rng::seeded("kv_cache");
    // [batch * heads * positions, head_dim], groups of 64 along head_dim.
    for rows in [1, 7, 4 * 12 * 33, 8 * 32 * 256] {
        for head_dim in [64, 128] {
            for bits in [4u8, 8] {
                for mode in [Mode::Asymmetric, Mode::Symmetric] {
                    let case = Case::kv(rows, head_dim, bits, mode);
                    assert_eq!(run(rig, &q.fast, &case, &mut rng), QuantPath::Rows, "{case:?}");
                    assert_eq!(run(rig, &q.generic, &case, &mut rng), QuantPath::Generic, "{case:?}");
                }
            }
        }
    }
    // The cache's 3-D view too.
    let case = Case { shape: vec![4 * 12, 40, 64], dim: 2, ..Case::kv(1, 64, 4, Mode::Asymmetric) };
    assert_eq!(run(rig, &q.fast, &case, &mut rng), QuantPath::Rows);
}

#[test]
fn random_cases_match_the_cpu_byte_for_byte() {
    let rig = rig_or_skip!();
    let q = quants(rig);
    let mut rng = Rng::seeded("random_quant_cases");
    let mut seen = BTreeSet::new();
    for n in 0..400 {
        let case = random_case(&mut rng);
        let quantizer = if n % 5 == 4 { &q.generic } else { &q.fast };
        let path = run(rig, quantizer, &case, &mut rng);
        seen.insert((path.name(), case.bits, case.mode == Mode::Symmetric));
    }
    println!("paths seen (path, bits, symmetric): {seen:?}");
    assert_eq!(seen.len(), 8, "{seen:?}");
}

/// Groups whose values are special: constants, zeros of both signs (the
/// min's sign of zero), the f16 extremes, subnormals.
#[test]
fn special_groups_match_the_cpu() {
    let rig = rig_or_skip!();
    let q = quants(rig);
    let tiny = f16::from_bits(1).to_f32();
    let groups: Vec<Vec<f32>> = vec![
        vec![0.0; 64],
        vec![-0.0; 64],
        (0..64).map(|k| if k % 3 == 0 { -0.0 } else { 0.0 }).collect(),
        (0..64).map(|k| if k % 2 == 0 { -0.0 } else { k as f32 }).collect(),
        (0..64).map(|k| if k == 63 { -0.0 } else { 0.5 * k as f32 }).collect(),
        vec![3.25; 64],
        vec![-65504.0; 64],
        (0..64).map(|k| if k % 2 == 0 { 65504.0 } else { -65504.0 }).collect(),
        (0..64).map(|k| (k as f32 - 20.0) * tiny).collect(),
        (0..64).map(|k| f16::from_bits(0x8000 | k as u16).to_f32()).collect(),
    ];
    let v: Vec<f32> = groups.concat();
    for bits in [4u8, 8] {
        for mode in [Mode::Asymmetric, Mode::Symmetric] {
            for f32_source in [false, true] {
                let case = Case { f32_source, ..Case::kv(groups.len(), 64, bits, mode) };
                run_values(rig, &q.fast, &case, &v);
                run_values(rig, &q.generic, &case, &v);
                // Groups along dim 0 of the transpose: the generic kernel's
                // column layout.
                let mut t = vec![0f32; v.len()];
                for (r, g) in groups.iter().enumerate() {
                    for (k, &x) in g.iter().enumerate() {
                        t[k * groups.len() + r] = x;
                    }
                }
                let case = Case { shape: vec![64, groups.len()], dim: 0, ..case };
                run_values(rig, &q.fast, &case, &t);
            }
        }
    }
}

/// GPU quantize, then GPU dequantize: the CPU's decoding of the CPU's
/// bytes, so within the format's bound (half a step, plus half an f16 ulp).
#[test]
fn round_trip_through_the_gpu_dequantizer() {
    let rig = rig_or_skip!();
    let q = quants(rig);
    let mut rng = Rng::seeded("gpu_round_trip");
    let mut cases: Vec<Case> = (0..40).map(|_| random_case(&mut rng)).collect();
    cases.push(Case::kv(4 * 32 * 128, 128, 4, Mode::Asymmetric));
    cases.push(Case { shape: vec![1024, 512], dim: 0, ..Case::kv(1, 64, 4, Mode::Asymmetric) });
    for case in cases {
        let case = Case { src_at: 0, out_at: 0, f32_source: false, bf16_source: false, ..case };
        let layout = case.layout();
        let v: Vec<f16> = common::values(&mut rng, layout.numel()).iter().map(|&x| f16::from_f32(x)).collect();
        let flat = rig.upload(&f16_bytes(&v), DType::F16);
        // The same bytes with the case's shape, which quantize_new reads.
        let src = Tensor::from_storage(Arc::clone(flat.storage()), Shape::new(case.shape.clone()), DType::F16).unwrap();
        let (l2, packed) = q.fast.quantize_new(&src.view(), *layout.config()).unwrap();
        assert_eq!(l2, layout);
        let out = rig.gpu.allocate(&Shape::new([layout.numel()]), DType::F16).unwrap();
        rig.deq.dequantize(&packed.view(), &layout, &out.view()).unwrap();
        let got = bits_of(&rig.download(&out.view()));
        let bytes = rig.download(&packed.view());
        let mut want = vec![f16::ZERO; layout.numel()];
        dequantize_into(&bytes, &layout, &mut want).unwrap();
        for (k, (&g, (w, x))) in got.iter().zip(want.iter().zip(&v)).enumerate() {
            assert_eq!(g, w.to_bits(), "{case:?}: element {k}");
            let (grp, _) = layout.group_of(k).unwrap();
            let s = f16::from_le_bytes([
                bytes[layout.scales_offset() + 2 * grp],
                bytes[layout.scales_offset() + 2 * grp + 1],
            ])
            .to_f32();
            let y = f16::from_bits(g).to_f32();
            let half_ulp = y.abs().max(6.1e-5) * 2f32.powi(-11);
            assert!((y - x.to_f32()).abs() <= s / 2.0 + half_ulp, "{case:?}: element {k}: {x} -> {y}, scale {s}");
        }
    }
}

#[test]
fn bad_values_are_reported_at_their_first_index() {
    let rig = rig_or_skip!();
    let q = quants(rig);
    for quantizer in [&q.fast, &q.generic] {
        let layout = Case::kv(64, 128, 4, Mode::Asymmetric).layout();
        let mut v = vec![f16::ONE; layout.numel()];
        v[5000] = f16::NAN;
        v[777] = f16::NEG_INFINITY;
        v[778] = f16::NAN;
        let src = rig.upload(&f16_bytes(&v), DType::F16);
        let out = rig.gpu.allocate(&Shape::new([layout.total_bytes()]), DType::U8).unwrap();
        match quantizer.quantize(&src.view(), &layout, &out.view()) {
            Err(Error::NonFinite { index: 777, value }) => assert_eq!(value, f32::NEG_INFINITY),
            other => panic!("{other:?}"),
        }
        // The same call on clean data succeeds: the status word is reset.
        let src = rig.upload(&f16_bytes(&vec![f16::ONE; layout.numel()]), DType::F16);
        quantizer.quantize(&src.view(), &layout, &out.view()).unwrap();

        // f32 beyond the f16 range, and a NaN after it, along dim 0.
        let c = CompressionConfig::int4(0);
        let layout = CompressedLayout::new(&[100, 30], SourceDtype::F32, c).unwrap();
        let mut v = vec![1f32; 3000];
        v[2999] = f32::NAN;
        v[1234] = -65505.0;
        let src = rig.upload(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>(), DType::F32);
        let out = rig.gpu.allocate(&Shape::new([layout.total_bytes()]), DType::U8).unwrap();
        let e = quantizer.quantize(&src.view(), &layout, &out.view()).unwrap_err();
        assert_eq!(e, Error::OutOfRange { index: 1234, value: -65505.0 });
    }
}

#[test]
fn bad_arguments_are_clear_errors() {
    let rig = rig_or_skip!();
    let q = &quants(rig).fast;
    let layout = CompressedLayout::new(&[16, 64], SourceDtype::F16, CompressionConfig::int4(1)).unwrap();
    let n = layout.numel();
    let src = rig.gpu.allocate(&Shape::new([16, 64]), DType::F16).unwrap();
    let out = rig.gpu.allocate(&Shape::new([layout.total_bytes()]), DType::U8).unwrap();

    let short = out.narrow(0, 0, layout.total_bytes() - 1).unwrap();
    assert_eq!(
        q.quantize(&src.view(), &layout, &short).unwrap_err(),
        Error::BufferSize {
            what: "compressed buffer",
            expected: layout.total_bytes(),
            found: layout.total_bytes() - 1
        }
    );
    let small = src.narrow(0, 0, 15).unwrap();
    assert_eq!(
        q.quantize(&small, &layout, &out.view()).unwrap_err(),
        Error::BufferSize { what: "input", expected: n, found: n - 64 }
    );
    let f32_src = rig.gpu.allocate(&Shape::new([n]), DType::F32).unwrap();
    let e = q.quantize(&f32_src.view(), &layout, &out.view()).unwrap_err();
    assert!(matches!(e, Error::TensorDtype { what: "input", expected: DType::F16, found: DType::F32 }), "{e}");
    let e = q.quantize(&src.view(), &layout, &src.view()).unwrap_err();
    assert!(matches!(e, Error::TensorDtype { what: "compressed buffer", .. }), "{e}");

    let wide = rig.gpu.allocate(&Shape::new([16, 128]), DType::F16).unwrap();
    let strided = wide.narrow(1, 0, 64).unwrap();
    assert_eq!(q.quantize(&strided, &layout, &out.view()).unwrap_err(), Error::NotContiguous("input"));

    let host = rig.pinned.allocate(&Shape::new([16, 64]), DType::F16).unwrap();
    let e = q.quantize(&host.view(), &layout, &out.view()).unwrap_err();
    assert!(matches!(e, Error::TensorDevice { what: "input", .. }), "{e}");

    // Input and output over one allocation.
    let bytes = rig.gpu.allocate(&Shape::new([4 * layout.total_bytes()]), DType::U8).unwrap();
    let storage: Arc<dyn Storage> = Arc::clone(bytes.storage());
    let halves = Tensor::from_storage(storage, Shape::new([2 * layout.total_bytes()]), DType::F16).unwrap();
    let e = q.quantize(&halves.narrow(0, 0, n).unwrap(), &layout, &bytes.narrow(0, 0, layout.total_bytes()).unwrap());
    assert_eq!(e.unwrap_err(), Error::OverlappingBuffers);

    // quantize_new on a tensor it cannot quantize.
    let ints = rig.gpu.allocate(&Shape::new([64]), DType::I32).unwrap();
    assert!(matches!(
        q.quantize_new(&ints.view(), CompressionConfig::int4(0)),
        Err(Error::TensorDtype { what: "input", .. })
    ));
    assert!(matches!(
        q.quantize_new(&src.view(), CompressionConfig::int4(2)),
        Err(Error::InvalidGroupDim { dim: 2, ndim: 2 })
    ));
}

#[test]
fn pending_work_finishes_in_order_on_the_callers_stream() {
    let rig = rig_or_skip!();
    let q = &quants(rig).fast;
    let mut rng = Rng::seeded("quant_pending");
    let case = Case::kv(4096, 128, 4, Mode::Asymmetric);
    let layout = case.layout();
    let v = common::values(&mut rng, layout.numel());
    let (input, want) = case.cpu(&v);
    let src = rig.upload(&input, DType::F16);
    let stream = rig.gpu.new_stream().unwrap();
    let outs: Vec<Tensor> =
        (0..4).map(|_| rig.gpu.allocate(&Shape::new([layout.total_bytes()]), DType::U8).unwrap()).collect();
    let pending: Vec<_> = outs.iter().map(|o| q.enqueue(&stream, &src.view(), &layout, &o.view()).unwrap()).collect();
    let mut pending = pending.into_iter();
    let last = pending.next_back().unwrap();
    assert_eq!(last.path(), QuantPath::Rows);
    last.wait().unwrap();
    for p in pending {
        assert!(p.is_done());
        drop(p);
    }
    for o in &outs {
        assert!(rig.download(&o.view()) == want);
    }
}

#[test]
fn empty_tensors_get_their_header() {
    let rig = rig_or_skip!();
    let q = quants(rig);
    for quantizer in [&q.fast, &q.generic] {
        let layout = CompressedLayout::new(&[0, 64], SourceDtype::F16, CompressionConfig::int4(1)).unwrap();
        let src = rig.gpu.allocate(&Shape::new([0]), DType::F16).unwrap();
        let out = rig.upload(&[0u8; HEADER_BYTES], DType::U8);
        quantizer.quantize(&src.view(), &layout, &out.view()).unwrap();
        assert_eq!(rig.download(&out.view()), layout.header());
    }
}
