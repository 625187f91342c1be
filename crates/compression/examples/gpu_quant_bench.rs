//! Throughput of the GPU quantizer: f16 read plus compressed bytes written,
//! per second, for the KV cache's layout and a weight layout.
//!
//! `cargo run --release -p compression --example gpu_quant_bench`
//!
//! Each line is the median of `TLQ_BENCH_REPS` (default 20) blocking calls
//! (`GpuQuantizer::quantize`: launch, wait, status read back) after 3
//! untimed ones, on `TLQ_BENCH_ELEMS` values (default 2^28). Prints
//! "skipped: no CUDA driver" and exits 0 without a GPU.

use std::error::Error;
use std::time::Instant;

use compression::gpu::{GpuQuantOptions, GpuQuantizer};
use compression::{CompressedLayout, CompressionConfig, Mode, SourceDtype};
use tier_api::{DType, Device, Shape};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> Result<(), Box<dyn Error>> {
    let q = match GpuQuantizer::open(0) {
        Ok(q) => q,
        Err(compression::Error::NoCudaDriver(_)) | Err(compression::Error::NoNvrtc(_)) => {
            println!("skipped: no CUDA driver");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let generic = GpuQuantizer::with_options(q.gpu().clone(), GpuQuantOptions { force_generic: true })?;
    let n = env_usize("TLQ_BENCH_ELEMS", 1 << 28);
    let reps = env_usize("TLQ_BENCH_REPS", 20).max(1);
    let cases = [
        ("kv cache [n/128, 128] dim 1", vec![n / 128, 128], 1usize),
        ("weights [4096, n/4096] dim 0", vec![4096, n / 4096], 0),
    ];
    for (name, shape, dim) in cases {
        for bits in [4u8, 8] {
            let config = CompressionConfig::new(bits, 64, dim, Mode::Asymmetric)?;
            let layout = CompressedLayout::new(&shape, SourceDtype::F16, config)?;
            // Every value 0x3a3a (0.7): the kernels' work does not depend
            // on the values.
            let src = q.gpu().allocate(&Shape::new(shape.clone()), DType::F16)?;
            let at = q.gpu().device_ptr(&src)?;
            q.gpu().context().bind_to_thread()?;
            // SAFETY: `at` is the start of `src`'s allocation, which is
            // `layout.source_bytes()` long and in use by nothing else.
            unsafe { cudarc::driver::result::memset_d8_sync(at, 0x3a, layout.source_bytes()) }?;
            let out = q.gpu().allocate(&Shape::new([layout.total_bytes()]), DType::U8)?;
            for (label, quantizer) in [("default", &q), ("generic", &generic)] {
                let mut ms = Vec::with_capacity(reps);
                let mut path = None;
                for r in 0..reps + 3 {
                    let t = Instant::now();
                    path = Some(quantizer.quantize(&src.view(), &layout, &out.view())?);
                    if r >= 3 {
                        ms.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                ms.sort_by(|a, b| a.total_cmp(b));
                let med = ms[ms.len() / 2];
                let bytes = (layout.source_bytes() + layout.total_bytes()) as f64;
                println!(
                    "{name}, {bits} bits, {label} ({}): {med:.3} ms, {:.1} GB/s",
                    path.map(|p| p.name()).unwrap_or("?"),
                    bytes / (med * 1e-3) / 1e9
                );
            }
        }
    }
    Ok(())
}
