//! Helpers shared by the integration tests: a small random generator,
//! random tensors to quantize, and the GPU rig (or `None` without a driver).

#![allow(dead_code)]

use compression::gpu::{GpuDequantOptions, GpuDequantizer};
use half::f16;
use std::sync::{Arc, OnceLock};
use tier_api::{Access, CopyConfig, CopyMatrix, DType, Device, HostMemKind, Shape, Tensor, TensorView};
use tier_cuda::{GpuConfig, GpuDevice};
use tier_host::{HostConfig, HostDevice};

/// SplitMix64: enough randomness for test data, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A seed from the clock, or `TLQ_SEED` to replay one.
    pub fn seeded(name: &str) -> Self {
        let seed = std::env::var("TLQ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        println!("{name}: seed {seed} (replay with TLQ_SEED={seed})");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    pub fn fill_bytes(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `n` finite values of one of several kinds, drawn fresh: a random centre
/// and spread; tiny subnormal-range values; values near the f16 limits;
/// runs of constants mixed with noise.
pub fn values(rng: &mut Rng, n: usize) -> Vec<f32> {
    let kind = rng.below(5);
    let centre = (rng.unit() - 0.5) * 2f64.powi(rng.below(12) as i32 - 4);
    let spread = 2f64.powi(rng.below(20) as i32 - 14);
    (0..n)
        .map(|i| {
            let v = match kind {
                0 => centre + spread * (rng.unit() - 0.5),
                1 => (rng.unit() - 0.5) * 2f64.powi(-16),
                2 => {
                    if rng.below(4) == 0 {
                        if rng.below(2) == 0 {
                            65504.0
                        } else {
                            -65504.0
                        }
                    } else {
                        (rng.unit() - 0.5) * 131000.0
                    }
                }
                3 => {
                    if (i / 7) % 3 == 0 {
                        centre
                    } else {
                        centre + spread * (rng.unit() - 0.5)
                    }
                }
                _ => f64::from(f16::from_bits(rng.next_u64() as u16 & 0x7bff | (rng.next_u64() as u16 & 0x8000))),
            };
            (v as f32).clamp(-65504.0, 65504.0)
        })
        .collect()
}

/// The bytes of a host tensor, for writing in place.
///
/// # Safety
/// No one else may touch the tensor's bytes while the slice lives.
#[allow(clippy::mut_from_ref)]
pub unsafe fn host_bytes_mut(t: &Tensor) -> &mut [u8] {
    match t.storage().access() {
        // SAFETY: the span is valid for its length while the tensor lives
        // (the storage's contract); exclusive by the caller's contract.
        Access::Host(span) => unsafe { std::slice::from_raw_parts_mut(span.as_ptr(), span.len()) },
        _ => panic!("not a host tensor"),
    }
}

/// Everything the GPU tests need, made once per test binary.
pub struct Rig {
    pub gpu: Arc<GpuDevice>,
    pub deq: GpuDequantizer,
    pub portable: GpuDequantizer,
    pub generic: GpuDequantizer,
    pub pinned: Arc<HostDevice>,
    pub matrix: CopyMatrix,
}

pub fn rig() -> Option<&'static Rig> {
    static RIG: OnceLock<Option<Rig>> = OnceLock::new();
    RIG.get_or_init(|| {
        match tier_cuda::probe() {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(e) => panic!("a CUDA driver is present but unusable: {e}"),
        }
        let gpu = GpuDevice::new(GpuConfig::default()).expect("gpu");
        let deq = GpuDequantizer::new(Arc::clone(&gpu)).expect("dequantizer");
        let opts = |portable_convert, force_generic| GpuDequantOptions {
            portable_convert,
            force_generic,
            ..Default::default()
        };
        let portable = GpuDequantizer::with_options(Arc::clone(&gpu), opts(true, false)).expect("portable");
        let generic = GpuDequantizer::with_options(Arc::clone(&gpu), opts(false, true)).expect("generic");
        let pinned =
            HostDevice::new(HostConfig { kind: HostMemKind::Pinned, ..HostConfig::default() }).expect("pinned host");
        let matrix = tier_cuda::copy_matrix(CopyConfig::default()).expect("matrix");
        Some(Rig { gpu, deq, portable, generic, pinned, matrix })
    })
    .as_ref()
}

/// The rig, or print "skipped: no CUDA driver" and return from the test.
macro_rules! rig_or_skip {
    () => {
        match common::rig() {
            Some(r) => r,
            None => {
                println!("skipped: no CUDA driver");
                return;
            }
        }
    };
}

impl Rig {
    /// A GPU tensor holding `bytes` (of `dtype`, `bytes.len()` a multiple of
    /// its size), copied up through pinned memory.
    pub fn upload(&self, bytes: &[u8], dtype: DType) -> Tensor {
        let n = bytes.len() / dtype.size();
        let host = self.pinned.allocate(&Shape::new([n]), dtype).unwrap();
        host.write_bytes(0, bytes).unwrap();
        let dev = self.gpu.allocate(&Shape::new([n]), dtype).unwrap();
        let report = self.matrix.copy(&host.view(), &dev.view()).unwrap();
        assert_eq!(report.bytes as usize, bytes.len());
        dev
    }

    /// The bytes of a GPU view, copied down.
    pub fn download(&self, view: &TensorView) -> Vec<u8> {
        let host = self.pinned.allocate(&view.shape(), view.dtype()).unwrap();
        self.matrix.copy(view, &host.view()).unwrap();
        host.to_bytes().unwrap()
    }
}

/// f16 values as little-endian bytes.
pub fn f16_bytes(xs: &[f16]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
}

/// Little-endian bytes as f16 bit patterns.
pub fn bits_of(bytes: &[u8]) -> Vec<u16> {
    bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}
