//! Memory bandwidth of the GPU dequantize kernels, next to a device-to-device
//! copy measured in the same run.
//!
//! `cargo run --release -p compression --example gpu_dequant_bench`
//!
//! Each case dequantizes a tensor of `TLQ_BENCH_ELEMS` values (default 2^30:
//! 2 GiB of f16 output) from random packed data (random codes, finite random
//! scales and mins; never zeros). Bytes counted: the whole packed buffer read
//! plus the f16 output written. The baseline is `cuMemcpyDtoDAsync` of the
//! same 2 GiB, counted as bytes read plus bytes written. Every figure is the
//! median of `TLQ_BENCH_REPS` (default 30) launches timed with CUDA events
//! after 3 untimed ones; the copy is measured before and after the kernels.
//! Before timing, each case's output is poisoned, and after the first run
//! every value is checked written and a million sampled values are checked
//! against the CPU's decoding formula.
//!
//! For the weight layout (asymmetric) it also times other builds of the
//! columns kernel next to the default one ([`ColsTuning`]: the kernel with a
//! work item per 8 groups or per 16-byte chunk of them, items per lane, the
//! register cap), each checked like the rest; set `TLQ_BENCH_VARIANTS=0` to
//! skip them.
//!
//! Prints "skipped: no CUDA driver" and exits 0 without a GPU.

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;

use compression::gpu::{ColsTuning, GpuDequantOptions, GpuDequantizer, KernelPath};
use compression::{CompressedLayout, CompressionConfig, Mode, SourceDtype, F16_MAX, HEADER_BYTES};
use cudarc::driver::sys;
use half::f16;
use rayon::prelude::*;
use tier_api::{Access, CopyConfig, DType, Device, HostMemKind, Shape, Tensor};
use tier_cuda::kernels::{CudaEvent, CudaStream};
use tier_cuda::GpuDevice;
use tier_host::{HostConfig, HostDevice};

type Res<T> = Result<T, Box<dyn Error>>;

const POISON: u16 = 0xffff;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu_dequant_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Row {
    name: String,
    path: String,
    regs: i32,
    /// Local memory per thread (spills): 0 when all fits in registers.
    local: i32,
    bytes: u64,
    ms: Vec<f64>,
}

impl Row {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.ms.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        s
    }

    fn median_ms(&self) -> f64 {
        let s = self.sorted();
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn gbps(&self, ms: f64) -> f64 {
        self.bytes as f64 / (ms * 1e-3) / 1e9
    }
}

fn run() -> Res<()> {
    if !tier_cuda::gpu_available() {
        println!("skipped: no CUDA driver");
        return Ok(());
    }
    let elems = env_usize("TLQ_BENCH_ELEMS", 1 << 30);
    let reps = env_usize("TLQ_BENCH_REPS", 30).max(1);
    let variants = env_usize("TLQ_BENCH_VARIANTS", 1) != 0;
    let warmup = 3;
    let deq = GpuDequantizer::open(0)?;
    let generic = GpuDequantizer::with_options(
        Arc::clone(deq.gpu()),
        GpuDequantOptions { force_generic: true, ..Default::default() },
    )?;
    let gpu = Arc::clone(deq.gpu());
    println!("{}", gpu.describe());
    let stream = gpu.new_stream()?;
    let matrix = tier_cuda::copy_matrix(CopyConfig::default())?;
    let pinned = HostDevice::new(HostConfig { kind: HostMemKind::Pinned, ..HostConfig::default() })?;

    // One output and one packed buffer, reused by every case.
    let side = 1usize << (elems.trailing_zeros() / 2);
    let shape = [elems / side, side];
    let out = gpu.allocate(&Shape::new([elems]), DType::F16)?;
    let max_packed = [4u8, 8]
        .iter()
        .map(|&b| {
            let c = CompressionConfig::new(b, 64, 0, Mode::Asymmetric)?;
            Ok(CompressedLayout::new(&shape, SourceDtype::F16, c)?.total_bytes())
        })
        .collect::<Result<Vec<_>, compression::Error>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let packed_dev = gpu.allocate(&Shape::new([max_packed]), DType::U8)?;
    let packed_host = pinned.allocate(&Shape::new([max_packed]), DType::U8)?;
    let check_host = pinned.allocate(&Shape::new([elems]), DType::F16)?;
    let copy_dst = gpu.allocate(&Shape::new([elems]), DType::F16)?;
    println!("output {} MiB f16 of shape {:?}; {reps} timed reps after {warmup} warm-up", (elems * 2) >> 20, shape);

    let bench = Bench { gpu: &gpu, stream: &stream, matrix: &matrix, out: &out, check_host: &check_host, elems };
    let mut rows = Vec::new();
    rows.push(copy_row(&gpu, &stream, &out, &copy_dst, reps, warmup, "D2D copy (before)")?);
    let cases: [(&str, usize, u8, Mode, bool); 6] = [
        ("groups along dim 0, 4-bit asym", 0, 4, Mode::Asymmetric, false),
        ("groups along dim 0, 4-bit sym", 0, 4, Mode::Symmetric, false),
        ("groups along dim 0, 8-bit asym", 0, 8, Mode::Asymmetric, false),
        ("groups along last dim, 4-bit asym", 1, 4, Mode::Asymmetric, false),
        ("groups along last dim, 8-bit asym", 1, 8, Mode::Asymmetric, false),
        ("groups along dim 0, 4-bit, generic", 0, 4, Mode::Asymmetric, true),
    ];
    for (i, &(name, dim, bits, mode, force_generic)) in cases.iter().enumerate() {
        let config = CompressionConfig::new(bits, 64, dim, mode)?;
        let layout = CompressedLayout::new(&shape, SourceDtype::F16, config)?;
        let total = layout.total_bytes();
        {
            // SAFETY: nothing else touches the pinned buffer while it is filled.
            let bytes = unsafe { host_slice::<u8>(&packed_host) }?;
            fill_random(&mut bytes[..total], &layout, 0x5eed + i as u64);
        }
        let src = packed_host.narrow(0, 0, total)?;
        let dst = packed_dev.narrow(0, 0, total)?;
        matrix.copy(&src, &dst)?;
        let d = if force_generic { &generic } else { &deq };
        let path = d.path(&dst, &layout, &out.view())?;
        let label = if path == KernelPath::Columns { cols_label(&deq, bits) } else { path.name().to_string() };
        let case = Case { layout: &layout, packed: &dst, packed_host: &packed_host, seed: i as u64 };
        rows.push(measure(&bench, d, &case, name.to_string(), label, reps, warmup)?);

        // Other builds of the columns kernel, measured beside the default.
        if variants && path == KernelPath::Columns && mode == Mode::Asymmetric {
            let b = usize::from(bits == 8);
            for (k, tuning) in cols_variants().into_iter().enumerate() {
                if tuning == ColsTuning::DEFAULT[b] {
                    continue;
                }
                let mut options = GpuDequantOptions::default();
                options.cols[b] = tuning;
                let v = GpuDequantizer::with_options(Arc::clone(&gpu), options)?;
                let label = cols_label(&v, bits);
                let case = Case { seed: case.seed + 0x100 * (k as u64 + 1), ..case };
                rows.push(measure(&bench, &v, &case, format!("  {name}, variant"), label, reps, warmup)?);
            }
        }
    }
    rows.push(copy_row(&gpu, &stream, &out, &copy_dst, reps, warmup, "D2D copy (after)")?);

    let d2d = rows.iter().filter(|r| r.path == "copy").map(|r| r.gbps(r.median_ms())).fold(0.0, f64::max);
    println!();
    println!(
        "{:<44} {:<16} {:>5} {:>8} {:>9} {:>8} {:>8} {:>8}",
        "case", "kernel", "regs", "GB/rep", "median ms", "GB/s", "best", "of D2D"
    );
    for r in &rows {
        let s = r.sorted();
        let med = r.median_ms();
        let regs = match (r.regs, r.local) {
            (0, _) => "-".to_string(),
            (n, 0) => n.to_string(),
            (n, l) => format!("{n}+{l}B"),
        };
        println!(
            "{:<44} {:<16} {:>5} {:>8.3} {:>9.3} {:>8.1} {:>8.1} {:>7.1}%",
            r.name,
            r.path,
            regs,
            r.bytes as f64 / 1e9,
            med,
            r.gbps(med),
            s.first().map(|&b| r.gbps(b)).unwrap_or(0.0),
            100.0 * r.gbps(med) / d2d
        );
    }
    println!("D2D reference: {d2d:.1} GB/s (read + write), the better of the two copy medians; target >= 70%");
    println!(
        "kernel: cols = one work item per 8 groups, split/uN/mbN = per 16-byte chunk of 8 groups, N items \
         per lane, N blocks/SM register cap; regs+NB = N bytes of spills"
    );
    Ok(())
}

/// The columns kernel builds the bench compares (the default among them).
fn cols_variants() -> Vec<ColsTuning> {
    let t = |split, items, min_blocks| ColsTuning { split, items, min_blocks };
    vec![t(false, 1, 2), t(true, 1, 3), t(true, 1, 4), t(true, 2, 2)]
}

/// The columns build a dequantizer runs for `bits`, in short.
fn cols_label(d: &GpuDequantizer, bits: u8) -> String {
    let t = d.options().cols[usize::from(bits == 8)];
    if t.split {
        format!("split/u{}/mb{}", t.items, t.min_blocks)
    } else {
        "cols".to_string()
    }
}

/// What every measurement shares.
struct Bench<'a> {
    gpu: &'a Arc<GpuDevice>,
    stream: &'a Arc<CudaStream>,
    matrix: &'a tier_api::CopyMatrix,
    out: &'a Tensor,
    check_host: &'a Tensor,
    elems: usize,
}

/// One case's input: the packed buffer on the GPU and its host copy.
#[derive(Clone, Copy)]
struct Case<'a> {
    layout: &'a CompressedLayout,
    packed: &'a tier_api::TensorView,
    packed_host: &'a Tensor,
    seed: u64,
}

/// Poisons the output, runs `d` once and checks the output, then times it.
fn measure(
    b: &Bench,
    d: &GpuDequantizer,
    case: &Case,
    name: String,
    label: String,
    reps: usize,
    warmup: usize,
) -> Res<Row> {
    let (layout, dst) = (case.layout, case.packed);
    let out = b.out.view();
    let path = d.path(dst, layout, &out)?;
    poison(b.gpu, b.stream, b.out, b.elems)?;
    d.enqueue(b.stream, dst, layout, &out)?.wait()?;
    b.matrix.copy(&out, &b.check_host.view())?;
    {
        // SAFETY: the copies have finished; nothing writes either buffer now.
        let (bytes, got) = unsafe { (host_slice::<u8>(case.packed_host)?, host_slice::<u16>(b.check_host)?) };
        verify(&bytes[..layout.total_bytes()], layout, got, 0xc4ec + case.seed)?;
    }
    // The handles are kept until all launches are queued: dropping one
    // waits for its kernel, which would time the launch gap too.
    let mut pending = Vec::new();
    let ms = time_reps(b.gpu, b.stream, reps, warmup, || {
        pending.push(d.enqueue(b.stream, dst, layout, &out)?);
        Ok(())
    })?;
    for p in pending {
        p.wait()?;
    }
    let kernel = d.kernel(path, layout.config().bits());
    Ok(Row {
        name,
        path: label,
        regs: kernel.registers()?,
        local: kernel.local_bytes()?,
        bytes: (layout.total_bytes() + b.elems * 2) as u64,
        ms,
    })
}

/// The bytes of a host tensor.
///
/// # Safety
/// No one else may touch the tensor's bytes while the slice lives.
#[allow(clippy::mut_from_ref)]
unsafe fn host_slice<T>(t: &Tensor) -> Res<&mut [T]> {
    match t.storage().access() {
        Access::Host(span) => {
            let n = span.len() / std::mem::size_of::<T>();
            if !(span.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
                return Err("misaligned host buffer".into());
            }
            // SAFETY: the span is valid for its length while the tensor lives
            // and is aligned for T (checked); exclusive by the caller's contract.
            Ok(unsafe { std::slice::from_raw_parts_mut(span.as_ptr().cast::<T>(), n) })
        }
        _ => Err("not a host tensor".into()),
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A valid buffer for `layout` with random codes, scales in [2^-10, 2^-4)
/// and mins in [-1, 0).
fn fill_random(buf: &mut [u8], layout: &CompressedLayout, seed: u64) {
    buf[..HEADER_BYTES].copy_from_slice(&layout.header());
    let data_end = layout.scales_offset();
    buf[HEADER_BYTES..data_end].par_chunks_mut(1 << 20).enumerate().for_each(|(i, c)| {
        let mut s = seed ^ (i as u64).wrapping_mul(0x1000_0000_01b3);
        for w in c.chunks_mut(8) {
            let v = splitmix(&mut s).to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
    });
    let f16_section = |section: &mut [u8], lo: f32, hi: f32, salt: u64| {
        section.par_chunks_mut(1 << 20).enumerate().for_each(|(i, c)| {
            let mut s = seed ^ salt ^ (i as u64).wrapping_mul(0x9E37_79B9);
            for h in c.chunks_exact_mut(2) {
                let u = (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32;
                h.copy_from_slice(&f16::from_f32(lo + (hi - lo) * u).to_bits().to_le_bytes());
            }
        });
    };
    let (scales, mins) = buf[layout.scales_offset()..].split_at_mut(layout.scales_bytes());
    f16_section(scales, 1.0 / 1024.0, 1.0 / 16.0, 1);
    f16_section(mins, -1.0, 0.0, 2);
}

/// Every value written, and a million random values equal to the CPU's
/// decoding of the format (the crate doc's formula, read from the bytes).
fn verify(packed: &[u8], layout: &CompressedLayout, got: &[u16], seed: u64) -> Res<()> {
    let numel = layout.numel();
    let unwritten = got[..numel].par_iter().filter(|&&b| b == POISON).count();
    if unwritten > 0 {
        return Err(format!("{unwritten} output values were not written").into());
    }
    let c = layout.config();
    let gb = layout.group_bytes();
    let f16_at = |off: usize| f16::from_bits(u16::from_le_bytes([packed[off], packed[off + 1]])).to_f32();
    let mut s = seed;
    for _ in 0..1_000_000 {
        let e = (splitmix(&mut s) % numel as u64) as usize;
        let (k, pos) = layout.group_of(e).ok_or("index out of range")?;
        let at = HEADER_BYTES + k * gb;
        let q = if c.bits() == 4 { (packed[at + pos / 2] >> (4 * (pos % 2))) & 15 } else { packed[at + pos] };
        let scale = f16_at(layout.scales_offset() + 2 * k);
        let min = match c.mode() {
            Mode::Asymmetric => f16_at(layout.mins_offset() + 2 * k),
            Mode::Symmetric => -((1u32 << (c.bits() - 1)) as f32) * scale,
        };
        let want = f16::from_f32((min + f32::from(q) * scale).clamp(-F16_MAX, F16_MAX)).to_bits();
        if got[e] != want {
            return Err(format!("value {e}: GPU {:#06x}, CPU {want:#06x}", got[e]).into());
        }
    }
    Ok(())
}

fn driver(call: &str, r: sys::CUresult) -> Res<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{call} failed: {r:?}").into())
    }
}

fn poison(gpu: &GpuDevice, stream: &CudaStream, out: &Tensor, n: usize) -> Res<()> {
    let ptr = gpu.device_ptr(out)?;
    gpu.context().bind_to_thread()?;
    // SAFETY: `out` holds n f16 values on this GPU and outlives the
    // synchronization below.
    driver("cuMemsetD16Async", unsafe { sys::cuMemsetD16Async(ptr, POISON, n, stream.cu_stream()) })?;
    stream.synchronize()?;
    Ok(())
}

/// Times `reps` calls of `launch` (each enqueueing one piece of work on
/// `stream`) with an event pair around each, after `warmup` untimed ones.
/// Launches are queued ahead of the GPU, so no launch gap is timed.
fn time_reps(
    gpu: &GpuDevice,
    stream: &Arc<CudaStream>,
    reps: usize,
    warmup: usize,
    mut launch: impl FnMut() -> Res<()>,
) -> Res<Vec<f64>> {
    for _ in 0..warmup {
        launch()?;
    }
    let events: Vec<(CudaEvent, CudaEvent)> =
        (0..reps).map(|_| Ok((gpu.new_event(true)?, gpu.new_event(true)?))).collect::<Res<_>>()?;
    for (start, stop) in &events {
        start.record(stream)?;
        launch()?;
        stop.record(stream)?;
    }
    stream.synchronize()?;
    events.iter().map(|(a, b)| Ok(f64::from(a.elapsed_ms(b)?))).collect()
}

fn copy_row(
    gpu: &GpuDevice,
    stream: &Arc<CudaStream>,
    src: &Tensor,
    dst: &Tensor,
    reps: usize,
    warmup: usize,
    name: &str,
) -> Res<Row> {
    let (s, d) = (gpu.device_ptr(src)?, gpu.device_ptr(dst)?);
    let len = src.byte_len();
    let ms = time_reps(gpu, stream, reps, warmup, || {
        gpu.context().bind_to_thread()?;
        // SAFETY: both tensors are live allocations of `len` bytes on this
        // GPU and outlive the synchronization in `time_reps`.
        driver("cuMemcpyDtoDAsync", unsafe { sys::cuMemcpyDtoDAsync_v2(d, s, len, stream.cu_stream()) })
    })?;
    Ok(Row { name: name.to_string(), path: "copy".into(), regs: 0, local: 0, bytes: 2 * len as u64, ms })
}
