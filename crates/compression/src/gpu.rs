//! Dequantization on the GPU: a compressed tensor that crossed PCIe packed
//! (a `u8` GPU tensor holding the whole buffer, header included) unpacked
//! into an f16 (or bf16) GPU tensor just before use.
//!
//! The kernels (`gpu/dequant.cu`) are compiled at run time by NVRTC for the
//! GPU they run on, through `tier_cuda::kernels` (once per process and GPU),
//! and launched on a stream the caller gives. The layout comes from the
//! host-side [`CompressedLayout`] as a [`KernelParams`] passed by value; the
//! device never reads the header, so the caller answers for the layout
//! matching the bytes (the layout's [`CompressedLayout::header`] is what
//! [`crate::quantize_into`] wrote at the front).
//!
//! Output equals [`crate::dequantize_into`] bit for bit for every buffer
//! [`crate::quantize_into`] can produce. For other bytes (a NaN or infinite
//! scale or min) the GPU writes NaN exactly where the CPU does, possibly
//! with another NaN payload, and every other value bit for bit.
//!
//! Three kernels; [`path_for`] says which one a call takes:
//! - [`KernelPath::Columns`]: groups along a dim that is not the last one,
//!   with `inner % 8 == 0` (weights, groups along the output dim). A thread
//!   decodes 8 neighbouring groups from 16-byte loads of each and writes
//!   rows of 8 values with 16-byte stores, contiguous across the warp.
//!   Two builds ([`ColsTuning`]): for 4-bit codes a thread takes all of its
//!   8 groups (two chunks of each at a time); for 8-bit codes, which are
//!   twice the bytes to read, a thread takes one 16-byte chunk of its 8
//!   groups, so that neighbouring lanes read neighbouring chunks and a warp
//!   load fills whole sectors (on an H100: 90% of a device-to-device copy's
//!   bandwidth, against 68% with the 4-bit build).
//! - [`KernelPath::Rows`]: groups along the last dim, `dim_len` a multiple
//!   of the group size (the KV cache). 16-byte loads, staged through shared
//!   memory so that each warp's 16-byte stores are contiguous.
//! - [`KernelPath::Generic`]: any other shape, or buffers not 16-byte
//!   aligned: one value per thread, correct everywhere but slower.
//!
//! The two fast kernels also need `group_size * bits / 8` to be a multiple
//! of 16 (group sizes that are multiples of 32 for 4 bits, of 16 for 8).

use std::ffi::c_void;
use std::sync::Arc;

use tier_api::{DType, Device as _, DeviceKind, Tensor, TensorView};
use tier_cuda::kernels::{self, CompileOptions, CudaEvent, CudaStream, Kernel, LaunchDims};
use tier_cuda::GpuDevice;

use crate::error::{Error, Result};
use crate::format::{CompressedLayout, KernelParams};

mod quant;
pub use quant::{quant_path_for, GpuQuantOptions, GpuQuantizer, QuantPath, QuantPending, QUANT_KERNEL_SOURCE};

/// The CUDA C++ source of the dequantize kernels.
pub const KERNEL_SOURCE: &str = include_str!("gpu/dequant.cu");

/// Threads per block of every kernel (the source's `TLQ_THREADS`).
const THREADS: u32 = 256;

// The kernel reads the struct with this exact layout (`static_assert` in
// the source checks the C++ side).
const _: () = assert!(std::mem::size_of::<KernelParams>() == 72);

/// Which kernel a call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Groups along a dim that is not innermost, `inner % 8 == 0`.
    Columns,
    /// Groups along the innermost dim, no padding.
    Rows,
    /// Anything else: one value per thread.
    Generic,
}

impl KernelPath {
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Columns => "columns",
            KernelPath::Rows => "rows",
            KernelPath::Generic => "generic",
        }
    }
}

/// The kernel for `layout` with the compressed buffer at device address
/// `packed` and the output at `out` (only their alignment matters).
pub fn path_for(layout: &CompressedLayout, packed: u64, out: u64) -> KernelPath {
    let aligned = packed.is_multiple_of(16) && out.is_multiple_of(16);
    let chunked = layout.group_bytes().is_multiple_of(16);
    if !aligned || !chunked {
        KernelPath::Generic
    } else if layout.inner().is_multiple_of(8) {
        KernelPath::Columns
    } else if layout.inner() == 1 && layout.dim_len().is_multiple_of(layout.config().group_size()) {
        KernelPath::Rows
    } else {
        KernelPath::Generic
    }
}

/// Choices for tests and measurements; the defaults are what to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuDequantOptions {
    /// Clamp and convert to f16 in two steps instead of one saturating
    /// conversion (what GPUs older than sm_80 run): same results.
    pub portable_convert: bool,
    /// Always run the generic kernel.
    pub force_generic: bool,
    /// How the columns kernel is built for 4-bit and for 8-bit codes (any
    /// choice gives the same output; the defaults are the fastest measured).
    pub cols: [ColsTuning; 2],
    /// The output's type: `F16` (the default) or `BF16` (the kernels built
    /// with `TLQ_OUT_BF16`; the values of [`crate::dequantize_into_bf16`]).
    pub output: DType,
}

impl Default for GpuDequantOptions {
    fn default() -> Self {
        GpuDequantOptions {
            portable_convert: false,
            force_generic: false,
            cols: ColsTuning::DEFAULT,
            output: DType::F16,
        }
    }
}

/// How a columns kernel is compiled and launched: the source's `TLQ_COLS_*`
/// and `TLQ_SPLIT_MIN_BLOCKS` macros, and the grid that goes with them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ColsTuning {
    /// A work item per 16-byte chunk of 8 neighbouring groups
    /// (`cols_split`: the lanes sharing 8 groups read them side by side)
    /// instead of one per 8 groups (`cols`: each lane reads 16 bytes from a
    /// line of its own). The fields below apply only to the split kernel.
    pub split: bool,
    /// Work items each lane loads before it stores (1 to 4).
    pub items: u32,
    /// Blocks per multiprocessor the compiler must make room for, which
    /// caps registers per thread (1 to 8).
    pub min_blocks: u32,
}

impl ColsTuning {
    /// The defaults for 4-bit and 8-bit codes, measured with
    /// `examples/gpu_dequant_bench.rs` on an H100.
    pub const DEFAULT: [ColsTuning; 2] =
        [ColsTuning { split: false, items: 1, min_blocks: 2 }, ColsTuning { split: true, items: 2, min_blocks: 2 }];

    /// Within the supported ranges.
    fn clamped(self) -> Self {
        ColsTuning { items: self.items.clamp(1, 4), min_blocks: self.min_blocks.clamp(1, 8), ..self }
    }

    /// The macros that select this tuning in the source.
    pub fn defines(self) -> Vec<String> {
        let t = self.clamped();
        vec![
            format!("TLQ_COLS_SPLIT={}", u32::from(t.split)),
            format!("TLQ_COLS_ITEMS={}", t.items),
            format!("TLQ_SPLIT_MIN_BLOCKS={}", t.min_blocks),
        ]
    }

    /// Threads worth launching for `layout` (the kernel loops over the
    /// rest of the work when there are fewer).
    pub fn threads(self, layout: &CompressedLayout) -> u64 {
        let t = self.clamped();
        let units = (layout.num_groups() / 8) as u64;
        if !t.split {
            return units;
        }
        let items = units * (layout.group_bytes() as u64 / 16);
        items.div_ceil(32 * u64::from(t.items)) * 32
    }
}

/// The dequantize kernels, loaded for one GPU.
pub struct GpuDequantizer {
    gpu: Arc<GpuDevice>,
    cols: [Kernel; 2],
    rows: [Kernel; 2],
    any: Kernel,
    /// Largest grid launched; the kernels loop over the rest.
    max_blocks: u32,
    options: GpuDequantOptions,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for GpuDequantizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDequantizer").field("gpu", &self.gpu.kind()).field("options", &self.options).finish()
    }
}

impl GpuDequantizer {
    /// Opens GPU `ordinal` and loads the kernels: "no CUDA driver" where
    /// there is no driver or no GPU, "no NVRTC" where the compiler is
    /// missing.
    pub fn open(ordinal: u32) -> Result<Self> {
        Self::new(open_gpu(ordinal, "dequantize on the CPU with dequantize_into")?)
    }

    /// Loads the kernels for `gpu` (compiling them on the first call in
    /// this process).
    pub fn new(gpu: Arc<GpuDevice>) -> Result<Self> {
        Self::with_options(gpu, GpuDequantOptions::default())
    }

    pub fn with_options(gpu: Arc<GpuDevice>, options: GpuDequantOptions) -> Result<Self> {
        require_nvrtc("dequantize on the CPU with dequantize_into")?;
        let mut compile = CompileOptions::default();
        if options.portable_convert {
            compile.defines.push("TLQ_PORTABLE_CVT".into());
        }
        match options.output {
            DType::F16 => {}
            DType::BF16 => compile.defines.push("TLQ_OUT_BF16".into()),
            found => return Err(Error::TensorDtype { what: "the dequantizer's output", expected: DType::F16, found }),
        }
        // Each columns kernel from a module built with its own tuning (the
        // macros touch nothing else): one compilation, or two where the
        // tunings differ.
        let load = |entry: &str, tuning: ColsTuning| {
            let mut o = compile.clone();
            o.defines.extend(tuning.defines());
            kernels::load(&gpu, KERNEL_SOURCE, entry, &o)
        };
        let first = options.cols[0];
        let cols = [load("tlq_dequant_cols4", first)?, load("tlq_dequant_cols8", options.cols[1])?];
        let rows = [load("tlq_dequant_rows4", first)?, load("tlq_dequant_rows8", first)?];
        let any = load("tlq_dequant_any", first)?;
        // A few waves of resident blocks: enough to fill the GPU, few enough
        // that each block loops over several tiles.
        let max_blocks = kernels::multiprocessors(&gpu)?.saturating_mul(64);
        let stream = gpu.new_stream()?;
        Ok(GpuDequantizer { gpu, cols, rows, any, max_blocks, options, stream })
    }

    /// The GPU the kernels are loaded on.
    pub fn gpu(&self) -> &Arc<GpuDevice> {
        &self.gpu
    }

    /// The options the kernels were built with.
    pub fn options(&self) -> &GpuDequantOptions {
        &self.options
    }

    /// The kernel for a path and bit width (registers and occupancy for tools).
    pub fn kernel(&self, path: KernelPath, bits: u8) -> &Kernel {
        let b = usize::from(bits == 8);
        match path {
            KernelPath::Columns => &self.cols[b],
            KernelPath::Rows => &self.rows[b],
            KernelPath::Generic => &self.any,
        }
    }

    /// The path a call with these tensors would take.
    pub fn path(&self, packed: &TensorView, layout: &CompressedLayout, out: &TensorView) -> Result<KernelPath> {
        let args = self.check(packed, layout, out)?;
        Ok(self.pick(layout, &args))
    }

    fn pick(&self, layout: &CompressedLayout, args: &Args) -> KernelPath {
        if self.options.force_generic {
            KernelPath::Generic
        } else {
            path_for(layout, args.packed, args.out)
        }
    }

    /// Dequantizes and waits, on the dequantizer's own stream.
    pub fn dequantize(&self, packed: &TensorView, layout: &CompressedLayout, out: &TensorView) -> Result<KernelPath> {
        let pending = self.enqueue(&self.stream, packed, layout, out)?;
        let path = pending.path();
        pending.wait()?;
        Ok(path)
    }

    /// Enqueues the dequantization of `packed` (a contiguous `u8` view on
    /// this GPU of exactly `layout.total_bytes()`) into `out` (a contiguous
    /// view on this GPU of `layout.numel()` values of the options' output
    /// type (f16 unless built for bf16), the original shape
    /// in row-major order) on `stream`, which must belong to this GPU.
    ///
    /// Returns at once; the [`Pending`] keeps both tensors alive until the
    /// kernel has finished, and says when it has. Work enqueued on `stream`
    /// afterwards sees the output.
    pub fn enqueue(
        &self,
        stream: &CudaStream,
        packed: &TensorView,
        layout: &CompressedLayout,
        out: &TensorView,
    ) -> Result<Pending> {
        let args = self.check(packed, layout, out)?;
        if **stream.context() != **self.gpu.context() {
            return Err(Error::ForeignStream);
        }
        let path = self.pick(layout, &args);
        let tier = self.gpu.kind().to_string();
        if layout.numel() > 0 {
            self.launch(stream, path, layout, &args)?;
        }
        let event = self.gpu.new_event(false)?;
        event.record(stream).map_err(|e| kernels::driver_error(&tier, "cuEventRecord", e))?;
        Ok(Pending { event, tier, path, _keep: [packed.tensor().clone(), out.tensor().clone()], waited: false })
    }

    fn launch(&self, stream: &CudaStream, path: KernelPath, layout: &CompressedLayout, args: &Args) -> Result<()> {
        let bits = layout.config().bits();
        let gb = layout.group_bytes() as u64;
        let b = usize::from(bits == 8);
        // Work items of each kernel: threads (columns: see `ColsTuning`;
        // generic: one value), or warps (rows: 2 spans of 32 chunks).
        let threads: u64 = match path {
            KernelPath::Columns => self.options.cols[b].threads(layout),
            KernelPath::Rows => {
                let chunks = layout.num_groups() as u64 * (gb / 16);
                chunks.div_ceil(64) * 32
            }
            KernelPath::Generic => layout.numel() as u64,
        };
        let blocks = threads.div_ceil(u64::from(THREADS)).clamp(1, u64::from(self.max_blocks.max(1))) as u32;
        let mut params = layout.kernel_params();
        let mut packed = args.packed;
        let mut out = args.out;
        let mut argv: [*mut c_void; 3] = [
            (&mut params as *mut KernelParams).cast(),
            (&mut packed as *mut u64).cast(),
            (&mut out as *mut u64).cast(),
        ];
        let kernel = self.kernel(path, bits);
        // SAFETY: the arguments match the kernel's (KernelParams by value,
        // two device addresses). `check` confirmed both views lie inside
        // live allocations of this GPU with the sizes the layout needs and
        // do not overlap; the returned `Pending` holds both tensors until
        // the stream has passed the kernel. The stream is the caller's and
        // must be this GPU's (documented on `enqueue`).
        unsafe { kernel.launch(stream, LaunchDims::linear(blocks, THREADS), &mut argv) }?;
        Ok(())
    }

    /// Checks both views and returns their device addresses.
    fn check(&self, packed: &TensorView, layout: &CompressedLayout, out: &TensorView) -> Result<Args> {
        let gpu = self.gpu.kind();
        let packed_at = device_range(&self.gpu, packed, gpu, DType::U8, "compressed buffer")?;
        let out_at = device_range(&self.gpu, out, gpu, self.options.output, "output")?;
        if packed_at.1 != layout.total_bytes() as u64 {
            return Err(Error::BufferSize {
                what: "compressed buffer",
                expected: layout.total_bytes(),
                found: packed_at.1 as usize,
            });
        }
        let values = out.byte_len() / 2;
        if values != layout.numel() {
            return Err(Error::BufferSize { what: "output", expected: layout.numel(), found: values });
        }
        // The kernels take the groups per line and the group size as u32.
        if u32::try_from(layout.groups_per_line()).is_err() {
            return Err(Error::ShapeOverflow(layout.shape().to_vec()));
        }
        let disjoint = packed_at.0 + packed_at.1 <= out_at.0 || out_at.0 + out_at.1 <= packed_at.0;
        if !disjoint && packed_at.1 > 0 && out_at.1 > 0 {
            return Err(Error::OverlappingBuffers);
        }
        Ok(Args { packed: packed_at.0, out: out_at.0 })
    }
}

/// Device addresses of the two buffers of a call.
struct Args {
    packed: u64,
    out: u64,
}

/// Opens GPU `ordinal`, or says why not ("no CUDA driver: ..."), naming
/// "no NVRTC", naming `fallback`, where CUDA's run-time compiler is missing.
pub(crate) fn require_nvrtc(fallback: &str) -> Result<()> {
    if kernels::nvrtc_available() {
        return Ok(());
    }
    Err(Error::NoNvrtc(format!(
        "libnvrtc (CUDA's run-time compiler) could not be loaded; install CUDA's NVRTC library or add its \
         directory to LD_LIBRARY_PATH, or {fallback}"
    )))
}

/// the CPU function to use instead (`instead`).
fn open_gpu(ordinal: u32, instead: &str) -> Result<Arc<GpuDevice>> {
    match tier_cuda::probe_all() {
        Ok(gpus) if gpus.iter().any(|g| g.ordinal == ordinal) => {}
        Ok(gpus) if gpus.is_empty() => {
            return Err(Error::NoCudaDriver(format!("libcuda could not be loaded or sees no GPU; {instead}")))
        }
        Ok(gpus) => {
            return Err(Error::NoCudaDriver(format!("there is no gpu:{ordinal}; the driver sees {}", gpus.len())))
        }
        Err(e) => return Err(Error::NoCudaDriver(e.to_string())),
    }
    Ok(GpuDevice::new(tier_cuda::GpuConfig { ordinal, ..Default::default() })?)
}

/// `(address, bytes)` of a contiguous view on `gpu` of `dtype`.
fn device_range(
    dev: &GpuDevice,
    view: &TensorView,
    gpu: DeviceKind,
    dtype: DType,
    what: &'static str,
) -> Result<(u64, u64)> {
    if view.device() != gpu {
        return Err(Error::TensorDevice { what, expected: gpu, found: view.device() });
    }
    check_dtype(view, dtype, what)?;
    let offset = contiguous_offset(view, what)?;
    Ok((dev.device_ptr(view.tensor())? + offset, view.byte_len() as u64))
}

/// The dtype check, alone (shared with the tests).
fn check_dtype(view: &TensorView, dtype: DType, what: &'static str) -> Result<()> {
    if view.dtype() != dtype {
        return Err(Error::TensorDtype { what, expected: dtype, found: view.dtype() });
    }
    Ok(())
}

/// Byte offset of a contiguous view in its tensor (0 for an empty view).
fn contiguous_offset(view: &TensorView, what: &'static str) -> Result<u64> {
    match view.byte_runs().as_slice() {
        [] => Ok(0),
        [(offset, _)] => Ok(*offset),
        _ => Err(Error::NotContiguous(what)),
    }
}

/// A dequantization in flight. Waiting consumes it; dropping it without
/// waiting blocks until the kernel is done (the tensors it holds must
/// outlive the kernel), so hold it for as long as the work should overlap.
#[must_use = "a pending dequantization should be waited on to learn whether it succeeded"]
pub struct Pending {
    event: CudaEvent,
    tier: String,
    path: KernelPath,
    _keep: [Tensor; 2],
    waited: bool,
}

impl Pending {
    /// The kernel that runs.
    pub fn path(&self) -> KernelPath {
        self.path
    }

    /// An event recorded after the kernel: another stream can wait on it.
    pub fn event(&self) -> &CudaEvent {
        &self.event
    }

    /// Whether the kernel has finished (a failure counts as finished:
    /// `wait` reports it).
    pub fn is_done(&self) -> bool {
        self.event.try_is_complete().unwrap_or(true)
    }

    /// Waits for the kernel; an error means it (or earlier work on the
    /// stream) failed.
    pub fn wait(mut self) -> Result<()> {
        self.waited = true;
        self.event
            .synchronize()
            .map_err(|e| kernels::driver_error(&self.tier, "cuEventSynchronize (the dequantize kernel failed)", e))?;
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.waited {
            // The tensors held here must outlive the kernel; an error was
            // already lost with the handle.
            let _ = self.event.synchronize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CompressionConfig, Mode};
    use crate::format::SourceDtype;

    fn layout(shape: &[usize], bits: u8, gs: usize, dim: usize) -> CompressedLayout {
        let c = CompressionConfig::new(bits, gs, dim, Mode::Asymmetric).unwrap();
        CompressedLayout::new(shape, SourceDtype::F16, c).unwrap()
    }

    #[test]
    fn paths_follow_the_layout() {
        // weights: groups along dim 0 of [out, in]
        assert_eq!(path_for(&layout(&[256, 64], 4, 64, 0), 0, 0), KernelPath::Columns);
        assert_eq!(path_for(&layout(&[256, 64], 8, 16, 0), 0, 0), KernelPath::Columns);
        // KV cache: groups along head_dim
        assert_eq!(path_for(&layout(&[3, 7, 128], 4, 64, 2), 0, 0), KernelPath::Rows);
        // padding along the last dim, odd inner, small groups, misalignment
        assert_eq!(path_for(&layout(&[3, 80], 4, 64, 1), 0, 0), KernelPath::Generic);
        assert_eq!(path_for(&layout(&[64, 12], 4, 64, 0), 0, 0), KernelPath::Generic);
        assert_eq!(path_for(&layout(&[64, 16], 4, 16, 0), 0, 0), KernelPath::Generic);
        assert_eq!(path_for(&layout(&[64, 16], 4, 64, 0), 8, 0), KernelPath::Generic);
        assert_eq!(path_for(&layout(&[64, 16], 4, 64, 0), 0, 2), KernelPath::Generic);
    }

    #[test]
    fn columns_grids_cover_the_work() {
        // [512, 256] along dim 0, groups of 64: 2048 groups, 256 blocks of 8.
        let l4 = layout(&[512, 256], 4, 64, 0);
        let l8 = layout(&[512, 256], 8, 64, 0);
        let t = |split, items| ColsTuning { split, items, min_blocks: 2 };
        assert_eq!(t(false, 1).threads(&l8), 256);
        // 8 bits: 4 chunks per group, so 1024 items.
        assert_eq!(t(true, 1).threads(&l8), 1024);
        assert_eq!(t(true, 2).threads(&l8), 512);
        assert_eq!(t(true, 3).threads(&l8), 352); // 11 warps of 96 items
        assert_eq!(t(true, 9).threads(&l4), 128); // items clamped to 4: 512 items
        let d = ColsTuning::DEFAULT[1].defines();
        assert!(d.iter().any(|s| s.starts_with("TLQ_COLS_SPLIT=")), "{d:?}");
        for name in ["TLQ_COLS_SPLIT", "TLQ_COLS_ITEMS", "TLQ_SPLIT_MIN_BLOCKS"] {
            assert!(KERNEL_SOURCE.contains(&format!("#ifndef {name}")), "{name}");
        }
    }

    #[test]
    fn kernel_params_are_what_the_source_declares() {
        // Field order and sizes of the C++ struct, by name.
        let src = KERNEL_SOURCE;
        let fields = [
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
        ];
        let mut at = src.find("struct KernelParams").unwrap();
        for f in fields {
            let next = src[at..].find(f).unwrap_or_else(|| panic!("{f} missing or out of order"));
            at += next;
        }
    }

    #[test]
    fn source_compiles_where_nvrtc_is() {
        if !kernels::nvrtc_available() {
            println!("skipped: no NVRTC");
            return;
        }
        let split = ColsTuning { split: true, items: 1, min_blocks: 3 };
        for (arch, portable, tuning) in [
            ("compute_90", false, ColsTuning::DEFAULT[0]),
            ("compute_90", true, ColsTuning::DEFAULT[1]),
            ("compute_90", false, split),
            ("compute_75", false, split),
        ] {
            let mut o = CompileOptions::default();
            if portable {
                o.defines.push("TLQ_PORTABLE_CVT".into());
            }
            o.defines.extend(tuning.defines());
            let ptx = kernels::compile_ptx(KERNEL_SOURCE, &o, arch).unwrap();
            for entry in ["tlq_dequant_cols4", "tlq_dequant_cols8", "tlq_dequant_rows4", "tlq_dequant_rows8"] {
                assert!(ptx.contains(&format!(".entry {entry}")), "{arch}: {entry}");
            }
            let paired = ptx.contains("min.NaN.f16x2");
            assert_eq!(paired, arch == "compute_90" && !portable, "{arch} portable {portable}");
            // The bf16 build: same entry points, no f16 conversion of the output.
            o.defines.push("TLQ_OUT_BF16".into());
            let ptx = kernels::compile_ptx(KERNEL_SOURCE, &o, arch).unwrap();
            for entry in ["tlq_dequant_cols4", "tlq_dequant_cols8", "tlq_dequant_rows4", "tlq_dequant_any"] {
                assert!(ptx.contains(&format!(".entry {entry}")), "bf16 {arch}: {entry}");
            }
            assert!(!ptx.contains("cvt.rn.f16.f32") && !ptx.contains("cvt.rn.f16x2.f32"), "bf16 {arch}");
        }
    }
}
