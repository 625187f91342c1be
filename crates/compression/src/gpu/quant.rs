//! Quantization on the GPU: an f16 (or f32) GPU tensor packed into a
//! compressed buffer in GPU memory, byte for byte what
//! [`crate::quantize_into`] writes on the CPU (header included), so
//! [`GpuDequantizer`](super::GpuDequantizer) and the CPU decoders read it
//! unchanged and a tier can store it as plain bytes.
//!
//! The kernels (`gpu/quant.cu`) are compiled at run time by NVRTC through
//! `tier_cuda::kernels` like the dequantizer's, and launched on a stream the
//! caller gives. Two kernels; [`quant_path_for`] says which one a call takes:
//! - [`QuantPath::Rows`]: f16 input, groups along the last dim with no
//!   padding (the KV cache: `[batch * heads * positions, head_dim]`, groups
//!   of 64 along `head_dim`), group size 8 to 256 with `group_size / 8` a
//!   power of two, both buffers 16-byte aligned. A lane per 8 values, the
//!   lanes of a group reducing min and max by shuffles.
//! - [`QuantPath::Generic`]: everything else (groups along any dim, padding,
//!   f32 input, any alignment): a thread per group.
//!
//! ## Bit-identity with the CPU
//!
//! The kernels repeat `params.rs` operation for operation: min and max in
//! f32 (exact, so the order of the reduction does not matter; a zero min is
//! taken as +0 on both sides, the one place where a reduction's result
//! could differ), the f16 bracketing by the same integer arithmetic on the
//! f64's bits, the range, the quotient by `max_code` and the reciprocal
//! `1 / scale` as f64 divisions (IEEE, correctly rounded on the GPU), and
//! each code as `((x - origin) * inv + bias)` in f64 with a separate
//! multiply and add, clamped, then rounded to nearest even by adding
//! 1.5 * 2^52. The f64 steps use the `__dsub_rn` / `__dmul_rn` /
//! `__dadd_rn` / `__ddiv_rn` intrinsics, which NVRTC never contracts into a
//! fused multiply-add (it would contract `a * b + c` otherwise, by default,
//! and round once where the CPU rounds twice). The CPU multiplies by the
//! reciprocal rather than dividing by the scale; so does the GPU.
//!
//! ## Errors
//!
//! Shapes, dtypes, sizes, devices, contiguity and overlap are checked before
//! anything is enqueued. Values that cannot be quantized (NaN, infinities,
//! f32 beyond ±65504) are found by the kernel, which keeps the lowest flat
//! index holding one in a status word; [`QuantPending::wait`] reads it back
//! and returns the CPU's error ([`Error::NonFinite`] or
//! [`Error::OutOfRange`], same index, same value). The output is then
//! unspecified, as on the CPU.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use tier_api::{DType, Device as _, Shape, Tensor, TensorView};
use tier_cuda::kernels::{self, CompileOptions, CudaEvent, CudaStream, Kernel, LaunchDims};
use tier_cuda::GpuDevice;

use super::{device_range, open_gpu, THREADS};
use crate::config::CompressionConfig;
use crate::error::{Error, Result};
use crate::format::{CompressedLayout, KernelParams, SourceDtype, F16_MAX, HEADER_BYTES};

/// The CUDA C++ source of the quantize kernels.
pub const QUANT_KERNEL_SOURCE: &str = include_str!("quant.cu");

/// The header as the kernels take it: 64 bytes by value, as 8 words.
#[repr(C)]
#[derive(Clone, Copy)]
struct HeaderArg([u64; 8]);

const _: () = assert!(std::mem::size_of::<HeaderArg>() == HEADER_BYTES);

impl HeaderArg {
    fn of(layout: &CompressedLayout) -> Self {
        let h = layout.header();
        let mut w = [0u64; 8];
        for (word, bytes) in w.iter_mut().zip(h.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            *word = u64::from_le_bytes(b);
        }
        HeaderArg(w)
    }
}

/// Which quantize kernel a call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantPath {
    /// f16, groups along the innermost dim, no padding, aligned buffers.
    Rows,
    /// Anything else: a thread per group.
    Generic,
}

impl QuantPath {
    pub fn name(self) -> &'static str {
        match self {
            QuantPath::Rows => "rows",
            QuantPath::Generic => "generic",
        }
    }
}

/// The kernel for `layout` with the input at device address `src` and the
/// compressed buffer at `dst` (only their alignment matters).
pub fn quant_path_for(layout: &CompressedLayout, src: u64, dst: u64) -> QuantPath {
    let gs = layout.config().group_size();
    let lanes = gs / 8;
    let rows = layout.dtype() == SourceDtype::F16
        && src.is_multiple_of(16)
        && dst.is_multiple_of(16)
        && gs.is_multiple_of(8)
        && lanes.is_power_of_two()
        && lanes <= 32
        && layout.inner() == 1
        && layout.dim_len().is_multiple_of(gs);
    if rows {
        QuantPath::Rows
    } else {
        QuantPath::Generic
    }
}

/// Choices for tests and measurements; the default is what to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuQuantOptions {
    /// Always run the generic kernel.
    pub force_generic: bool,
}

/// The quantize kernels, loaded for one GPU.
///
/// A type of its own rather than methods on the dequantizer: the two load
/// different kernels (a process that only decodes weights never compiles
/// these), and a quantizer owns the status words its calls report bad
/// values through.
pub struct GpuQuantizer {
    gpu: Arc<GpuDevice>,
    /// `tlq_quant_rows4`, `tlq_quant_rows8`.
    rows: [Kernel; 2],
    /// `tlq_quant_any_f16`, `tlq_quant_any_f32`, `tlq_quant_any_bf16`.
    any: [Kernel; 3],
    max_blocks: u32,
    options: GpuQuantOptions,
    /// For [`GpuQuantizer::quantize`] and for reading status words back.
    stream: Arc<CudaStream>,
    /// Status words (8-byte GPU tensors) not in use by a call in flight.
    slots: Arc<Mutex<Vec<Tensor>>>,
}

impl std::fmt::Debug for GpuQuantizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuQuantizer").field("gpu", &self.gpu.kind()).field("options", &self.options).finish()
    }
}

impl GpuQuantizer {
    /// Opens GPU `ordinal` and loads the kernels: "no CUDA driver" where
    /// there is no driver or no GPU, "no NVRTC" where the compiler is
    /// missing.
    pub fn open(ordinal: u32) -> Result<Self> {
        Self::new(open_gpu(ordinal, "quantize on the CPU with quantize_into")?)
    }

    /// Loads the kernels for `gpu` (compiling them on the first call in
    /// this process).
    pub fn new(gpu: Arc<GpuDevice>) -> Result<Self> {
        Self::with_options(gpu, GpuQuantOptions::default())
    }

    pub fn with_options(gpu: Arc<GpuDevice>, options: GpuQuantOptions) -> Result<Self> {
        super::require_nvrtc("quantize on the CPU with quantize_into")?;
        let o = CompileOptions::default();
        let load = |entry: &str| kernels::load(&gpu, QUANT_KERNEL_SOURCE, entry, &o);
        let rows = [load("tlq_quant_rows4")?, load("tlq_quant_rows8")?];
        let any = [load("tlq_quant_any_f16")?, load("tlq_quant_any_f32")?, load("tlq_quant_any_bf16")?];
        let max_blocks = kernels::multiprocessors(&gpu)?.saturating_mul(64);
        let stream = gpu.new_stream()?;
        Ok(GpuQuantizer { gpu, rows, any, max_blocks, options, stream, slots: Arc::new(Mutex::new(Vec::new())) })
    }

    /// The GPU the kernels are loaded on.
    pub fn gpu(&self) -> &Arc<GpuDevice> {
        &self.gpu
    }

    /// The options the quantizer was made with.
    pub fn options(&self) -> &GpuQuantOptions {
        &self.options
    }

    /// The kernel for a path and a layout's bits and dtype (registers and
    /// occupancy for tools).
    pub fn kernel(&self, path: QuantPath, layout: &CompressedLayout) -> &Kernel {
        match path {
            QuantPath::Rows => &self.rows[usize::from(layout.config().bits() == 8)],
            QuantPath::Generic => {
                &self.any[match layout.dtype() {
                    SourceDtype::F16 => 0,
                    SourceDtype::F32 => 1,
                    SourceDtype::BF16 => 2,
                }]
            }
        }
    }

    /// The path a call with these tensors would take.
    pub fn path(&self, src: &TensorView, layout: &CompressedLayout, out: &TensorView) -> Result<QuantPath> {
        let args = self.check(src, layout, out)?;
        Ok(self.pick(layout, &args))
    }

    fn pick(&self, layout: &CompressedLayout, args: &Args) -> QuantPath {
        if self.options.force_generic {
            QuantPath::Generic
        } else {
            quant_path_for(layout, args.src, args.out)
        }
    }

    /// Quantizes and waits, on the quantizer's own stream.
    pub fn quantize(&self, src: &TensorView, layout: &CompressedLayout, out: &TensorView) -> Result<QuantPath> {
        let pending = self.enqueue(&self.stream, src, layout, out)?;
        let path = pending.path();
        pending.wait()?;
        Ok(path)
    }

    /// Quantizes `src` (contiguous, f16, bf16 or f32, on this GPU; its shape is
    /// the tensor's) with `config` into a new `u8` GPU tensor of
    /// `layout.total_bytes()`, and waits. Returns the layout and the tensor.
    pub fn quantize_new(&self, src: &TensorView, config: CompressionConfig) -> Result<(CompressedLayout, Tensor)> {
        let dtype = match src.dtype() {
            DType::F16 => SourceDtype::F16,
            DType::BF16 => SourceDtype::BF16,
            DType::F32 => SourceDtype::F32,
            found => return Err(Error::TensorDtype { what: "input", expected: DType::F16, found }),
        };
        let layout = CompressedLayout::new(src.shape().dims(), dtype, config)?;
        let out = self.gpu.allocate(&Shape::new([layout.total_bytes()]), DType::U8)?;
        self.quantize(src, &layout, &out.view())?;
        Ok((layout, out))
    }

    /// Enqueues the quantization of `src` (a contiguous f16 view on this GPU
    /// of `layout.numel()` values, the original shape in row-major order; f32
    /// or bf16 when the layout was made for that type) into `out` (a contiguous `u8` view
    /// on this GPU of exactly `layout.total_bytes()`, every byte of which is
    /// written: header, codes, padding, scales, mins) on `stream`, which must
    /// belong to this GPU.
    ///
    /// Returns at once; the [`QuantPending`] keeps both tensors alive until
    /// the kernel has finished, says when it has, and reports values that
    /// could not be quantized. Work enqueued on `stream` afterwards sees the
    /// output.
    pub fn enqueue(
        &self,
        stream: &CudaStream,
        src: &TensorView,
        layout: &CompressedLayout,
        out: &TensorView,
    ) -> Result<QuantPending> {
        let args = self.check(src, layout, out)?;
        if **stream.context() != **self.gpu.context() {
            return Err(Error::ForeignStream);
        }
        let path = self.pick(layout, &args);
        let tier = self.gpu.kind().to_string();
        let slot = self.take_slot()?;
        let status = self.gpu.device_ptr(&slot)?;
        let pending = QuantPending {
            event: self.gpu.new_event(false)?,
            tier,
            path,
            _keep: [src.tensor().clone(), out.tensor().clone()],
            slot: Some(slot),
            slots: Arc::clone(&self.slots),
            status,
            reader: Arc::clone(&self.stream),
            src: args.src,
            dtype: layout.dtype(),
            waited: false,
        };
        // From here on the pending handle owns the slot and the tensors: if
        // a step fails, dropping it waits for whatever was enqueued.
        self.gpu.context().bind_to_thread().map_err(|e| kernels::driver_error(&pending.tier, "cuCtxSetCurrent", e))?;
        // SAFETY: `status` is the 8-byte GPU allocation of `slot`, held by
        // `pending` until the stream has passed this call; no other call
        // uses the slot meanwhile (it left the pool).
        unsafe { cudarc::driver::result::memset_d8_async(status, 0xff, 8, stream.cu_stream()) }
            .map_err(|e| kernels::driver_error(&pending.tier, "cuMemsetD8Async", e))?;
        self.launch(stream, path, layout, &args, status)?;
        pending.event.record(stream).map_err(|e| kernels::driver_error(&pending.tier, "cuEventRecord", e))?;
        Ok(pending)
    }

    /// A status word from the pool, or a new one.
    fn take_slot(&self) -> Result<Tensor> {
        let reused = self.slots.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match reused {
            Some(t) => Ok(t),
            None => Ok(self.gpu.allocate(&Shape::new([8]), DType::U8)?),
        }
    }

    fn launch(
        &self,
        stream: &CudaStream,
        path: QuantPath,
        layout: &CompressedLayout,
        args: &Args,
        status: u64,
    ) -> Result<()> {
        let threads: u64 = match path {
            // A lane per 8 values.
            QuantPath::Rows => (layout.numel() as u64 / 8).div_ceil(32) * 32,
            QuantPath::Generic => layout.num_groups() as u64,
        };
        // At least one block: block 0 writes the header, even with no groups.
        let blocks = threads.div_ceil(u64::from(THREADS)).clamp(1, u64::from(self.max_blocks.max(1))) as u32;
        let mut params = layout.kernel_params();
        let mut header = HeaderArg::of(layout);
        let mut src = args.src;
        let mut out = args.out;
        let mut status = status;
        let mut argv: [*mut c_void; 5] = [
            (&mut params as *mut KernelParams).cast(),
            (&mut header as *mut HeaderArg).cast(),
            (&mut src as *mut u64).cast(),
            (&mut out as *mut u64).cast(),
            (&mut status as *mut u64).cast(),
        ];
        let kernel = self.kernel(path, layout);
        // SAFETY: the arguments match the kernel's (KernelParams and the
        // 64-byte header by value, three device addresses). `check`
        // confirmed both views lie inside live allocations of this GPU with
        // the sizes the layout needs (and the dtype the kernel reads) and do
        // not overlap; the status word is an 8-byte allocation of this GPU.
        // The pending handle holds all three until the stream has passed
        // the kernel. The stream is this GPU's (checked in `enqueue`).
        unsafe { kernel.launch(stream, LaunchDims::linear(blocks, THREADS), &mut argv) }?;
        Ok(())
    }

    /// Checks both views and returns their device addresses.
    fn check(&self, src: &TensorView, layout: &CompressedLayout, out: &TensorView) -> Result<Args> {
        let gpu = self.gpu.kind();
        let dtype = match layout.dtype() {
            SourceDtype::F16 => DType::F16,
            SourceDtype::F32 => DType::F32,
            SourceDtype::BF16 => DType::BF16,
        };
        let src_at = device_range(&self.gpu, src, gpu, dtype, "input")?;
        let out_at = device_range(&self.gpu, out, gpu, DType::U8, "compressed buffer")?;
        let values = src_at.1 as usize / dtype.size();
        if values != layout.numel() {
            return Err(Error::BufferSize { what: "input", expected: layout.numel(), found: values });
        }
        if out_at.1 != layout.total_bytes() as u64 {
            return Err(Error::BufferSize {
                what: "compressed buffer",
                expected: layout.total_bytes(),
                found: out_at.1 as usize,
            });
        }
        if u32::try_from(layout.groups_per_line()).is_err() {
            return Err(Error::ShapeOverflow(layout.shape().to_vec()));
        }
        let disjoint = src_at.0 + src_at.1 <= out_at.0 || out_at.0 + out_at.1 <= src_at.0;
        if !disjoint && src_at.1 > 0 && out_at.1 > 0 {
            return Err(Error::OverlappingBuffers);
        }
        Ok(Args { src: src_at.0, out: out_at.0 })
    }
}

/// Device addresses of the two buffers of a call.
struct Args {
    src: u64,
    out: u64,
}

/// A quantization in flight. Waiting consumes it and reports bad input
/// values; dropping it without waiting blocks until the kernel is done (the
/// tensors it holds must outlive the kernel) and loses that report.
#[must_use = "a pending quantization should be waited on to learn whether it succeeded"]
pub struct QuantPending {
    event: CudaEvent,
    tier: String,
    path: QuantPath,
    _keep: [Tensor; 2],
    /// The status word, given back to `slots` on drop.
    slot: Option<Tensor>,
    slots: Arc<Mutex<Vec<Tensor>>>,
    /// Its device address.
    status: u64,
    /// The quantizer's stream, to read the status word back on.
    reader: Arc<CudaStream>,
    /// Device address and dtype of the input, to read a bad value back.
    src: u64,
    dtype: SourceDtype,
    waited: bool,
}

impl QuantPending {
    /// The kernel that runs.
    pub fn path(&self) -> QuantPath {
        self.path
    }

    /// An event recorded after the kernel: another stream can wait on it.
    /// (It says the output is written, not that the input was valid: only
    /// [`QuantPending::wait`] says that.)
    pub fn event(&self) -> &CudaEvent {
        &self.event
    }

    /// Whether the kernel has finished (a failure counts as finished:
    /// `wait` reports it).
    pub fn is_done(&self) -> bool {
        self.event.try_is_complete().unwrap_or(true)
    }

    /// Waits for the kernel; an error means it (or earlier work on the
    /// stream) failed, or that the input held a value that cannot be
    /// quantized: then the CPU's error for it, naming the lowest flat index.
    pub fn wait(mut self) -> Result<()> {
        self.waited = true;
        self.event
            .synchronize()
            .map_err(|e| kernels::driver_error(&self.tier, "cuEventSynchronize (the quantize kernel failed)", e))?;
        let mut word = [0u64; 1];
        self.read(&mut word, self.status)?;
        if word[0] == u64::MAX {
            return Ok(());
        }
        let index = word[0];
        let value = match self.dtype {
            SourceDtype::F16 => {
                let mut h = [0u16; 1];
                self.read(&mut h, self.src + 2 * index)?;
                half::f16::from_bits(h[0]).to_f32()
            }
            SourceDtype::F32 => {
                let mut f = [0f32; 1];
                self.read(&mut f, self.src + 4 * index)?;
                f[0]
            }
            SourceDtype::BF16 => {
                let mut h = [0u16; 1];
                self.read(&mut h, self.src + 2 * index)?;
                half::bf16::from_bits(h[0]).to_f32()
            }
        };
        let index = index as usize;
        if value.is_finite() && value.abs() > F16_MAX {
            Err(Error::OutOfRange { index, value })
        } else {
            Err(Error::NonFinite { index, value })
        }
    }

    /// Copies `dst.len()` values from device address `at` (inside a buffer
    /// this handle keeps alive) and waits for them.
    fn read<T: Copy>(&self, dst: &mut [T], at: u64) -> Result<()> {
        let ctx = self.reader.context();
        ctx.bind_to_thread().map_err(|e| kernels::driver_error(&self.tier, "cuCtxSetCurrent", e))?;
        // SAFETY: `at` points into the status word or the input tensor, both
        // held by this handle, with at least `size_of_val(dst)` bytes there
        // (the status word is 8 bytes; an input index comes from the kernel,
        // below `numel`); the kernel that wrote them has finished (the event
        // was synchronized). `dst` is plain memory the copy may overwrite,
        // and the stream is synchronized below before it is read.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, at, self.reader.cu_stream()) }
            .map_err(|e| kernels::driver_error(&self.tier, "cuMemcpyDtoHAsync", e))?;
        self.reader.synchronize().map_err(|e| kernels::driver_error(&self.tier, "cuStreamSynchronize", e))?;
        Ok(())
    }
}

impl Drop for QuantPending {
    fn drop(&mut self) {
        if !self.waited {
            // The tensors held here must outlive the kernel; an error was
            // already lost with the handle.
            let _ = self.event.synchronize();
        }
        if let Some(slot) = self.slot.take() {
            // Only reused once the kernel is done (synchronized above or in
            // `wait`, or never launched).
            self.slots.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn layout(shape: &[usize], bits: u8, gs: usize, dim: usize, dtype: SourceDtype) -> CompressedLayout {
        let c = CompressionConfig::new(bits, gs, dim, Mode::Asymmetric).unwrap();
        CompressedLayout::new(shape, dtype, c).unwrap()
    }

    #[test]
    fn paths_follow_the_layout() {
        let f16 = SourceDtype::F16;
        // KV cache: [batch * heads * positions, head_dim], groups of 64
        assert_eq!(quant_path_for(&layout(&[96, 64], 4, 64, 1, f16), 0, 0), QuantPath::Rows);
        assert_eq!(quant_path_for(&layout(&[3, 7, 128], 8, 64, 2, f16), 0, 0), QuantPath::Rows);
        assert_eq!(quant_path_for(&layout(&[3, 256], 4, 256, 1, f16), 0, 0), QuantPath::Rows);
        assert_eq!(quant_path_for(&layout(&[3, 16], 4, 8, 1, f16), 16, 32), QuantPath::Rows);
        // f32, padding, groups along another dim, group sizes, alignment
        assert_eq!(quant_path_for(&layout(&[96, 64], 4, 64, 1, SourceDtype::F32), 0, 0), QuantPath::Generic);
        assert_eq!(quant_path_for(&layout(&[3, 80], 4, 64, 1, f16), 0, 0), QuantPath::Generic);
        assert_eq!(quant_path_for(&layout(&[64, 16], 4, 64, 0, f16), 0, 0), QuantPath::Generic);
        assert_eq!(quant_path_for(&layout(&[4, 96], 4, 48, 1, f16), 0, 0), QuantPath::Generic);
        assert_eq!(quant_path_for(&layout(&[4, 512], 4, 512, 1, f16), 0, 0), QuantPath::Generic);
        assert_eq!(quant_path_for(&layout(&[4, 64], 4, 6, 1, f16), 0, 0), QuantPath::Generic);
        assert_eq!(quant_path_for(&layout(&[4, 64], 4, 64, 1, f16), 8, 0), QuantPath::Generic);
        assert_eq!(quant_path_for(&layout(&[4, 64], 4, 64, 1, f16), 0, 4), QuantPath::Generic);
    }

    #[test]
    fn the_header_argument_is_the_header() {
        let l = layout(&[5, 100, 3], 8, 64, 1, SourceDtype::F32);
        let arg = HeaderArg::of(&l);
        let bytes: Vec<u8> = arg.0.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(bytes, l.header());
    }

    #[test]
    fn the_source_declares_what_rust_passes() {
        let src = QUANT_KERNEL_SOURCE;
        let mut at = src.find("struct KernelParams").unwrap();
        for f in [
            "u64 outer;",
            "u64 dim_len;",
            "u64 inner;",
            "u64 num_groups;",
            "u64 data_offset;",
            "u64 scales_offset;",
            "u64 mins_offset;",
            "u32 groups_per_line;",
            "u32 group_size;",
            "u32 bits;",
            "u32 symmetric;",
        ] {
            at += src[at..].find(f).unwrap_or_else(|| panic!("{f} missing or out of order"));
        }
        for entry in
            ["tlq_quant_rows4", "tlq_quant_rows8", "tlq_quant_any_f16", "tlq_quant_any_f32", "tlq_quant_any_bf16"]
        {
            assert!(src.contains(&format!("void __launch_bounds__(TLQ_THREADS)\n    {entry}(")), "{entry}");
        }
    }

    #[test]
    fn source_compiles_where_nvrtc_is() {
        if !kernels::nvrtc_available() {
            println!("skipped: no NVRTC");
            return;
        }
        for arch in ["compute_90", "compute_75"] {
            let ptx = kernels::compile_ptx(QUANT_KERNEL_SOURCE, &CompileOptions::default(), arch).unwrap();
            for entry in
                ["tlq_quant_rows4", "tlq_quant_rows8", "tlq_quant_any_f16", "tlq_quant_any_f32", "tlq_quant_any_bf16"]
            {
                assert!(ptx.contains(&format!(".entry {entry}")), "{arch}: {entry}");
            }
            // No f64 fused multiply-add: the CPU rounds the product and the
            // sum separately.
            assert!(!ptx.contains("fma.rn.f64"), "{arch}: an f64 FMA was contracted");
        }
    }
}
