//! The GPU dequantizer against the CPU reference, bit for bit: random
//! shapes, group sizes, group dims, bits, modes and buffer offsets, on fresh
//! random data, with the output poisoned first and guard zones around it
//! checked after. Every test prints "skipped: no CUDA driver" and passes
//! where there is no GPU.

#[macro_use]
mod common;

use common::{bits_of, f16_bytes, Rig, Rng};
use compression::gpu::{ColsTuning, GpuDequantOptions, GpuDequantizer, KernelPath};
use compression::{
    dequantize_into, dequantize_into_bf16, quantize_into, CompressedLayout, CompressionConfig, Error, Mode,
    SourceDtype, HEADER_BYTES,
};
use half::{bf16, f16};
use std::collections::BTreeSet;
use std::sync::Arc;
use tier_api::{DType, Device, Shape, Storage, Tensor};

/// A bit pattern no valid output has (a NaN): whatever still holds it was
/// not written.
const POISON: u16 = 0xffff;

#[derive(Clone, Debug)]
struct Case {
    shape: Vec<usize>,
    bits: u8,
    gs: usize,
    dim: usize,
    mode: Mode,
    f32_source: bool,
    /// Byte offset of the compressed buffer in its GPU tensor.
    packed_at: usize,
    /// Element offset of the output in its GPU tensor (guard before it).
    out_at: usize,
}

impl Case {
    fn layout(&self) -> CompressedLayout {
        let c = CompressionConfig::new(self.bits, self.gs, self.dim, self.mode).unwrap();
        let dtype = if self.f32_source { SourceDtype::F32 } else { SourceDtype::F16 };
        CompressedLayout::new(&self.shape, dtype, c).unwrap()
    }

    /// Quantizes fresh random values: the compressed bytes and the CPU's
    /// dequantized f16 bit patterns.
    fn data(&self, rng: &mut Rng) -> (Vec<u8>, Vec<u16>) {
        let layout = self.layout();
        let v = common::values(rng, layout.numel());
        let mut packed = vec![0u8; layout.total_bytes()];
        if self.f32_source {
            quantize_into(&v, &layout, &mut packed).unwrap();
        } else {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            quantize_into(&h, &layout, &mut packed).unwrap();
        }
        let mut out = vec![f16::ZERO; layout.numel()];
        dequantize_into(&packed, &layout, &mut out).unwrap();
        (packed, out.iter().map(|x| x.to_bits()).collect())
    }

    /// Like [`Case::data`], the CPU's output in bf16.
    fn data_bf16(&self, rng: &mut Rng) -> (Vec<u8>, Vec<u16>) {
        let layout = self.layout();
        let (packed, _) = self.data(rng);
        let mut out = vec![bf16::ZERO; layout.numel()];
        dequantize_into_bf16(&packed, &layout, &mut out).unwrap();
        (packed, out.iter().map(|x| x.to_bits()).collect())
    }
}

fn random_case(rng: &mut Rng) -> Case {
    let bits = rng.pick(&[4u8, 8]);
    let gs = rng.pick(&[2usize, 4, 6, 10, 16, 32, 32, 48, 64, 64, 64, 96, 128, 128, 256]);
    let ndim = 1 + rng.below(4);
    let dim = rng.below(ndim);
    let mut shape: Vec<usize> = (0..ndim).map(|_| 1 + rng.below([3000, 64, 12, 6][ndim - 1])).collect();
    // Make the fast paths likely: the group dim a multiple of the group size,
    // the dims after it a multiple of 8.
    if rng.below(2) == 0 {
        shape[dim] = gs * (1 + rng.below(4));
    }
    if dim + 1 < ndim && rng.below(3) != 0 {
        let last = ndim - 1;
        shape[last] = 8 * (1 + rng.below(12));
    }
    // Keep each case small enough to run hundreds.
    while shape.iter().product::<usize>() > 1 << 19 {
        let d = rng.below(ndim);
        shape[d] = shape[d].div_ceil(2);
    }
    let (odd_packed, odd_out) = (1 + rng.below(15), 1 + rng.below(7));
    Case {
        shape,
        bits,
        gs,
        dim,
        mode: rng.pick(&[Mode::Asymmetric, Mode::Symmetric]),
        f32_source: rng.below(4) == 0,
        packed_at: rng.pick(&[0, 0, 16, 256, odd_packed]),
        out_at: rng.pick(&[0, 0, 8, 64, odd_out]),
    }
}

const GUARD: usize = 40;

/// Runs one case on `deq`; returns the path it took.
fn run(rig: &Rig, deq: &GpuDequantizer, case: &Case, rng: &mut Rng) -> KernelPath {
    let (packed, want) = case.data(rng);
    run_on(rig, deq, case, &packed, &want, rng)
}

/// Runs one case on `deq` with its bytes and the CPU's output given.
fn run_on(rig: &Rig, deq: &GpuDequantizer, case: &Case, packed: &[u8], want: &[u16], rng: &mut Rng) -> KernelPath {
    let layout = case.layout();
    // The compressed buffer inside a larger u8 tensor, random bytes around it.
    let mut holder = vec![0u8; case.packed_at + packed.len() + 13];
    rng.fill_bytes(&mut holder);
    holder[case.packed_at..case.packed_at + packed.len()].copy_from_slice(packed);
    let packed_t = rig.upload(&holder, DType::U8);
    let packed_v = packed_t.narrow(0, case.packed_at, packed.len()).unwrap();
    // The output inside a larger tensor of the dequantizer's output type
    // (2 bytes, f16 or bf16), all poisoned.
    let total = case.out_at + layout.numel() + GUARD;
    let out_t = rig.upload(&f16_bytes(&vec![f16::from_bits(POISON); total]), deq.options().output);
    let out_v = out_t.narrow(0, case.out_at, layout.numel()).unwrap();
    let path = deq.dequantize(&packed_v, &layout, &out_v).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let got = bits_of(&rig.download(&out_t.view()));
    assert!(got[..case.out_at].iter().all(|&b| b == POISON), "{case:?}: wrote before the output");
    assert!(got[case.out_at + layout.numel()..].iter().all(|&b| b == POISON), "{case:?}: wrote past the output");
    let got = &got[case.out_at..case.out_at + layout.numel()];
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        let unwritten = got.iter().filter(|&&b| b == POISON).count();
        panic!(
            "{case:?} ({path:?}): element {i} is {:#06x}, the CPU gives {:#06x}; {unwritten} elements unwritten",
            got[i], want[i]
        );
    }
    path
}

#[test]
fn random_cases_match_the_cpu_bit_for_bit() {
    let rig = rig_or_skip!();
    let mut rng = Rng::seeded("random_cases");
    let mut seen = BTreeSet::new();
    for _ in 0..400 {
        let case = random_case(&mut rng);
        let path = run(rig, &rig.deq, &case, &mut rng);
        seen.insert((path.name(), case.bits, case.mode == Mode::Symmetric));
    }
    println!("paths seen (path, bits, symmetric): {seen:?}");
    // The designed cases below cover every combination; random ones most.
    assert!(seen.len() >= 8, "{seen:?}");
}

/// Shapes chosen to hit every kernel, bit width and mode, and the edges of
/// each fast path (padding rows, one line, many small lines).
fn designed_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let shapes: &[(&[usize], usize, usize)] = &[
        (&[512, 256], 0, 64),    // weights, groups along the output dim
        (&[200, 72], 0, 64),     // padding in the last group of the line
        (&[3, 96, 40], 1, 32),   // outer > 1, inner 40
        (&[64, 8], 0, 64),       // inner 8: one column block
        (&[4, 16, 128], 2, 64),  // KV cache, groups along head_dim
        (&[7, 64], 1, 64),       // one group per line
        (&[1, 4096], 1, 128),    // one long line
        (&[2, 2, 33], 2, 64),    // padding along the last dim: generic
        (&[5, 3, 7], 1, 2),      // tiny groups: generic
        (&[1000], 0, 256),       // 1-D with padding
        (&[100, 3], 0, 64),      // inner 3: generic
        (&[32 * 33, 16], 0, 32), // many lines
    ];
    for &(shape, dim, gs) in shapes {
        for bits in [4u8, 8] {
            for mode in [Mode::Asymmetric, Mode::Symmetric] {
                cases.push(Case {
                    shape: shape.to_vec(),
                    bits,
                    gs,
                    dim,
                    mode,
                    f32_source: false,
                    packed_at: 0,
                    out_at: 0,
                });
            }
        }
    }
    cases
}

#[test]
fn designed_cases_cover_every_kernel() {
    let rig = rig_or_skip!();
    let mut rng = Rng::seeded("designed_cases");
    let mut seen = BTreeSet::new();
    for case in designed_cases() {
        let path = run(rig, &rig.deq, &case, &mut rng);
        seen.insert((path.name(), case.bits, case.mode == Mode::Symmetric));
    }
    assert_eq!(seen.len(), 3 * 2 * 2, "{seen:?}");
}

/// The bf16 build of every kernel gives the CPU's bf16 output bit for bit
/// (4-bit weights from bf16 checkpoints unpack into bf16).
#[test]
fn the_bf16_output_matches_the_cpu_bit_for_bit() {
    let rig = rig_or_skip!();
    let options = GpuDequantOptions { output: DType::BF16, ..Default::default() };
    let deq = GpuDequantizer::with_options(Arc::clone(&rig.gpu), options).expect("bf16 dequantizer");
    let generic =
        GpuDequantizer::with_options(Arc::clone(&rig.gpu), GpuDequantOptions { force_generic: true, ..options })
            .expect("bf16 generic dequantizer");
    let mut rng = Rng::seeded("bf16_output");
    let mut seen = BTreeSet::new();
    let cases: Vec<Case> = designed_cases().into_iter().chain((0..100).map(|_| random_case(&mut rng))).collect();
    for case in &cases {
        for d in [&deq, &generic] {
            let (packed, want) = case.data_bf16(&mut rng);
            seen.insert(run_on(rig, d, case, &packed, &want, &mut rng).name());
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    // An f16 output tensor is refused by the bf16 build, by name.
    let case = &designed_cases()[0];
    let layout = case.layout();
    let (packed, _) = case.data(&mut rng);
    let p = rig.upload(&packed, DType::U8);
    let out = rig.upload(&vec![0u8; 2 * layout.numel()], DType::F16);
    let e = deq.dequantize(&p.view(), &layout, &out.view()).unwrap_err().to_string();
    assert!(e.contains("bf16") || e.contains("BF16"), "{e}");
}

#[test]
fn the_portable_conversion_and_the_generic_kernel_agree() {
    let rig = rig_or_skip!();
    let mut rng = Rng::seeded("portable_and_generic");
    for case in designed_cases() {
        run(rig, &rig.portable, &case, &mut rng);
        assert_eq!(run(rig, &rig.generic, &case, &mut rng), KernelPath::Generic);
    }
    for _ in 0..60 {
        let case = random_case(&mut rng);
        run(rig, &rig.portable, &case, &mut rng);
        run(rig, &rig.generic, &case, &mut rng);
    }
}

/// Every build of the columns kernel (the ones the bench compares, the
/// default among them) gives the CPU's output, on the designed cases, random
/// ones, and a tensor large enough that every warp takes several tiles.
#[test]
fn every_columns_build_matches_the_cpu() {
    let rig = rig_or_skip!();
    let mut rng = Rng::seeded("columns_builds");
    let t = |split, items, min_blocks| ColsTuning { split, items, min_blocks };
    let builds = [t(false, 1, 2), t(true, 1, 3), t(true, 1, 4), t(true, 2, 2), t(true, 3, 1), t(true, 4, 1)];
    let deqs: Vec<GpuDequantizer> = builds
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let options = GpuDequantOptions { portable_convert: i % 4 == 3, cols: [b, b], ..Default::default() };
            GpuDequantizer::with_options(Arc::clone(&rig.gpu), options).unwrap()
        })
        .collect();
    let mut cases = designed_cases();
    cases.extend((0..80).map(|_| random_case(&mut rng)));
    for bits in [4u8, 8] {
        let shape = vec![4 * 1024, 8 * 1024];
        cases.push(Case {
            shape,
            bits,
            gs: 64,
            dim: 0,
            mode: Mode::Asymmetric,
            f32_source: false,
            packed_at: 0,
            out_at: 0,
        });
    }
    let mut columns = 0;
    for case in &cases {
        let (packed, want) = case.data(&mut rng);
        for deq in &deqs {
            if run_on(rig, deq, case, &packed, &want, &mut rng) == KernelPath::Columns {
                columns += 1;
            }
        }
    }
    assert!(columns >= 20 * deqs.len(), "{columns} runs took the columns kernel");
}

#[test]
fn large_tensors_match() {
    let rig = rig_or_skip!();
    let mut rng = Rng::seeded("large");
    for (shape, dim) in [(vec![4096usize, 1024], 0usize), (vec![1024, 4096], 1)] {
        for bits in [4u8, 8] {
            let case = Case {
                shape: shape.clone(),
                bits,
                gs: 64,
                dim,
                mode: Mode::Asymmetric,
                f32_source: false,
                packed_at: 0,
                out_at: 0,
            };
            let path = run(rig, &rig.deq, &case, &mut rng);
            assert_ne!(path, KernelPath::Generic);
        }
    }
}

/// Bytes that did not come from `quantize_into` (random scales and mins,
/// NaN and infinities among them) decode like on the CPU, up to the NaN
/// payload.
#[test]
fn arbitrary_bytes_decode_like_the_cpu() {
    let rig = rig_or_skip!();
    let mut rng = Rng::seeded("arbitrary_bytes");
    for (i, case) in designed_cases().into_iter().enumerate() {
        let layout = case.layout();
        let mut packed = vec![0u8; layout.total_bytes()];
        rng.fill_bytes(&mut packed);
        packed[..HEADER_BYTES].copy_from_slice(&layout.header());
        let mut want = vec![f16::ZERO; layout.numel()];
        dequantize_into(&packed, &layout, &mut want).unwrap();
        let deq = [&rig.deq, &rig.portable, &rig.generic][i % 3];
        let packed_t = rig.upload(&packed, DType::U8);
        let out = rig.gpu.allocate(&Shape::new([layout.numel()]), DType::F16).unwrap();
        deq.dequantize(&packed_t.view(), &layout, &out.view()).unwrap();
        let got = bits_of(&rig.download(&out.view()));
        for (k, (&g, w)) in got.iter().zip(&want).enumerate() {
            let g = f16::from_bits(g);
            assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{case:?}: element {k}: {g} vs {w}");
        }
    }
}

#[test]
fn bad_arguments_are_clear_errors() {
    let rig = rig_or_skip!();
    let layout = CompressedLayout::new(&[64, 16], SourceDtype::F16, CompressionConfig::int4(0)).unwrap();
    let n = layout.numel();
    let packed = rig.gpu.allocate(&Shape::new([layout.total_bytes()]), DType::U8).unwrap();
    let out = rig.gpu.allocate(&Shape::new([64, 16]), DType::F16).unwrap();
    let deq = &rig.deq;

    let wrong_dtype = rig.gpu.allocate(&Shape::new([n]), DType::F32).unwrap();
    let e = deq.dequantize(&packed.view(), &layout, &wrong_dtype.view()).unwrap_err();
    assert!(matches!(e, Error::TensorDtype { what: "output", expected: DType::F16, found: DType::F32 }), "{e}");
    let e = deq.dequantize(&out.view(), &layout, &out.view()).unwrap_err();
    assert!(matches!(e, Error::TensorDtype { what: "compressed buffer", .. }), "{e}");

    let short = packed.narrow(0, 0, layout.total_bytes() - 1).unwrap();
    let e = deq.dequantize(&short, &layout, &out.view()).unwrap_err();
    assert_eq!(
        e,
        Error::BufferSize {
            what: "compressed buffer",
            expected: layout.total_bytes(),
            found: layout.total_bytes() - 1
        }
    );
    let small = out.narrow(0, 0, 63).unwrap();
    let e = deq.dequantize(&packed.view(), &layout, &small).unwrap_err();
    assert_eq!(e, Error::BufferSize { what: "output", expected: n, found: n - 16 });

    let wide = rig.gpu.allocate(&Shape::new([64, 32]), DType::F16).unwrap();
    let strided = wide.narrow(1, 0, 16).unwrap();
    let e = deq.dequantize(&packed.view(), &layout, &strided).unwrap_err();
    assert_eq!(e, Error::NotContiguous("output"));

    let host = rig.pinned.allocate(&Shape::new([layout.total_bytes()]), DType::U8).unwrap();
    let e = deq.dequantize(&host.view(), &layout, &out.view()).unwrap_err();
    assert!(matches!(e, Error::TensorDevice { what: "compressed buffer", .. }), "{e}");
    assert!(e.to_string().contains("gpu:0"), "{e}");

    // Two tensors over one allocation: the output may not overlap the input.
    let bytes = rig.gpu.allocate(&Shape::new([4 * layout.total_bytes()]), DType::U8).unwrap();
    let storage: Arc<dyn Storage> = Arc::clone(bytes.storage());
    let halves = Tensor::from_storage(storage, Shape::new([2 * layout.total_bytes()]), DType::F16).unwrap();
    let e =
        deq.dequantize(&bytes.narrow(0, 0, layout.total_bytes()).unwrap(), &layout, &halves.narrow(0, 0, n).unwrap());
    assert_eq!(e.unwrap_err(), Error::OverlappingBuffers);
}

#[test]
fn pending_work_finishes_in_order_on_the_callers_stream() {
    let rig = rig_or_skip!();
    let mut rng = Rng::seeded("pending");
    let case = Case {
        shape: vec![2048, 512],
        bits: 4,
        gs: 64,
        dim: 0,
        mode: Mode::Asymmetric,
        f32_source: false,
        packed_at: 0,
        out_at: 0,
    };
    let layout = case.layout();
    let (packed, want) = case.data(&mut rng);
    let packed_t = rig.upload(&packed, DType::U8);
    let stream = rig.gpu.new_stream().unwrap();
    // Several launches queued at once on one stream, each into its own
    // output, the handles dropped or waited in any order.
    let outs: Vec<Tensor> =
        (0..4).map(|_| rig.gpu.allocate(&Shape::new([layout.numel()]), DType::F16).unwrap()).collect();
    let pending: Vec<_> =
        outs.iter().map(|o| rig.deq.enqueue(&stream, &packed_t.view(), &layout, &o.view()).unwrap()).collect();
    let mut pending = pending.into_iter();
    let last = pending.next_back().unwrap();
    assert_eq!(last.path(), KernelPath::Columns);
    last.wait().unwrap();
    for p in pending {
        assert!(p.is_done());
        drop(p);
    }
    for o in &outs {
        assert_eq!(bits_of(&rig.download(&o.view())), want);
    }
}

#[test]
fn empty_tensors_launch_nothing() {
    let rig = rig_or_skip!();
    let layout = CompressedLayout::new(&[0, 64], SourceDtype::F16, CompressionConfig::int4(1)).unwrap();
    let packed = rig.upload(&layout.header(), DType::U8);
    let out = rig.gpu.allocate(&Shape::new([0]), DType::F16).unwrap();
    rig.deq.dequantize(&packed.view(), &layout, &out.view()).unwrap();
}
