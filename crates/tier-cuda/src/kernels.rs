//! Kernels compiled at run time, and what it takes to launch them.
//!
//! CUDA C++ source is compiled by NVRTC to PTX for the GPU's own
//! architecture (the newest NVRTC supports, at most the GPU's), loaded into
//! the GPU's primary context, and kept: [`load`] caches one module per (GPU,
//! source, options) for the life of the process, so each kernel is compiled
//! once however many callers ask for it. The cache holds the context too,
//! so a cached [`Kernel`] stays valid while any caller keeps it.
//!
//! NVRTC is a separate library (`libnvrtc`); [`nvrtc_available`] looks for
//! it without calling into it, and every entry point here fails with a clear
//! [`Error::Unsupported`] ("no NVRTC: ...") where it is missing, never a
//! panic. Sources that include CUDA headers (`cuda_fp16.h`) set
//! [`CompileOptions::cuda_headers`]; the headers are found at run time in
//! `$CUDA_HOME/include`, `$CUDA_PATH/include` or `/usr/local/cuda/include`
//! ([`cuda_include_dir`]).
//!
//! The types a launcher needs (streams, events, the driver's error) are
//! re-exported so that crates using this module need no cudarc of their own.

use crate::device::GpuDevice;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{self, CompileError, Ptx};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use tier_api::{Error, Result};

pub use cudarc::driver::result::DriverError;
pub use cudarc::driver::{CudaEvent, CudaStream};
pub use tier_host::cuda::driver_error;

/// Whether NVRTC can be loaded. Calls nothing in it.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library; calls no NVRTC function.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The error for a missing NVRTC, naming the feature that needs it.
fn no_nvrtc(what: &str) -> Error {
    Error::Unsupported {
        what: what.into(),
        hint: "no NVRTC: libnvrtc (CUDA's run-time compiler) could not be loaded; install the CUDA toolkit's \
               NVRTC library or add its directory to LD_LIBRARY_PATH"
            .into(),
    }
}

/// Fails with a clear error unless NVRTC can be loaded.
pub fn require_nvrtc(what: &str) -> Result<()> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(no_nvrtc(what))
    }
}

/// The directory holding the CUDA headers (`cuda_fp16.h`): the first of
/// `$CUDA_HOME/include`, `$CUDA_PATH/include` and `/usr/local/cuda/include`
/// that has them.
pub fn cuda_include_dir() -> Option<PathBuf> {
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .chain(std::iter::once(PathBuf::from("/usr/local/cuda")));
    roots.map(|r| r.join("include")).find(|dir| dir.join("cuda_fp16.h").is_file())
}

/// How to compile a source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CompileOptions {
    /// Preprocessor definitions: `NAME` or `NAME=VALUE`.
    pub defines: Vec<String>,
    /// Add the CUDA include directory ([`cuda_include_dir`]) to the search path.
    pub cuda_headers: bool,
    /// Further NVRTC options, passed as they are (for example `--use_fast_math`).
    pub extra: Vec<String>,
}

/// The NVRTC options for `options`, targeting `arch` (`compute_90`).
fn nvrtc_options(options: &CompileOptions, arch: &str) -> Result<nvrtc::CompileOptions> {
    let mut out = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    out.extend(options.defines.iter().map(|d| format!("-D{d}")));
    let mut include_paths = Vec::new();
    if options.cuda_headers {
        let dir = cuda_include_dir().ok_or_else(|| Error::Unsupported {
            what: "compiling a kernel that includes CUDA headers".into(),
            hint: "cuda_fp16.h was found in none of $CUDA_HOME/include, $CUDA_PATH/include, \
                   /usr/local/cuda/include; set CUDA_HOME to the CUDA toolkit"
                .into(),
        })?;
        include_paths.push(dir.to_string_lossy().into_owned());
    }
    out.extend(options.extra.iter().cloned());
    Ok(nvrtc::CompileOptions { include_paths, options: out, ..Default::default() })
}

/// The virtual architectures NVRTC can compile for, as numbers (`90` for
/// `compute_90`), or an empty list where it cannot say.
fn supported_archs() -> Vec<i32> {
    use cudarc::nvrtc::sys;
    if !nvrtc_available() {
        return Vec::new();
    }
    let mut n = 0;
    // SAFETY: NVRTC can be loaded (checked above); the out-pointer is valid.
    if unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) } != sys::nvrtcResult::NVRTC_SUCCESS || n <= 0 {
        return Vec::new();
    }
    let mut archs = vec![0i32; n as usize];
    // SAFETY: `archs` has room for the `n` entries NVRTC just reported.
    if unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) } != sys::nvrtcResult::NVRTC_SUCCESS {
        return Vec::new();
    }
    archs
}

/// The architecture to compile for on a GPU of compute capability
/// `(major, minor)`: its own, or the newest NVRTC knows below it (the driver
/// compiles that PTX for the GPU).
pub fn target_arch(compute_capability: (i32, i32)) -> String {
    let own = compute_capability.0 * 10 + compute_capability.1;
    let archs = supported_archs();
    let pick = archs.iter().copied().filter(|&a| a <= own).max().unwrap_or(own);
    format!("compute_{pick}")
}

/// NVRTC's message for a failed compile: its log when there is one.
fn compile_error(entry: &str, e: CompileError) -> Error {
    let reason = match e {
        CompileError::CompileError { nvrtc, log, .. } => {
            format!("{nvrtc:?}: {}", log.to_string_lossy().trim())
        }
        other => format!("{other:?}"),
    };
    Error::Driver { tier: "nvrtc".into(), call: format!("nvrtcCompileProgram ({entry})"), reason }
}

/// Compiles `source` to PTX text for `arch` (`compute_90`). Needs NVRTC but
/// no driver or GPU: tools and tests use it to check a source builds.
pub fn compile_ptx(source: &str, options: &CompileOptions, arch: &str) -> Result<String> {
    compile(source, "ptx", options, arch).map(|ptx| ptx.to_src())
}

fn compile(source: &str, what: &str, options: &CompileOptions, arch: &str) -> Result<Ptx> {
    require_nvrtc("run-time kernel compilation")?;
    if source.contains('\0') {
        return Err(Error::Config(format!("kernel source for {what} contains a NUL byte")));
    }
    let opts = nvrtc_options(options, arch)?;
    nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| compile_error(what, e))
}

/// A loaded kernel: an entry point of a module compiled for one GPU.
#[derive(Clone, Debug)]
pub struct Kernel {
    func: CudaFunction,
    ctx: Arc<CudaContext>,
    tier: String,
    entry: String,
}

/// Grid and block sizes and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchDims {
    /// A one-dimensional launch of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        LaunchDims { grid: (blocks, 1, 1), block: (threads, 1, 1), shared_bytes: 0 }
    }
}

impl Kernel {
    /// The entry point's name.
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// Registers per thread, as the driver reports them for the loaded code.
    pub fn registers(&self) -> Result<i32> {
        self.func.num_regs().map_err(|e| driver_error(&self.tier, "cuFuncGetAttribute", e))
    }

    /// Bytes of local memory per thread (spilled registers, arrays indexed
    /// at run time): 0 in a kernel that keeps everything in registers.
    pub fn local_bytes(&self) -> Result<i32> {
        use cudarc::driver::sys::CUfunction_attribute as A;
        self.func
            .get_attribute(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)
            .map_err(|e| driver_error(&self.tier, "cuFuncGetAttribute", e))
    }

    /// Blocks of `threads` threads (with `shared_bytes` of dynamic shared
    /// memory) that fit on one multiprocessor at once.
    pub fn blocks_per_sm(&self, threads: u32, shared_bytes: usize) -> Result<u32> {
        self.func
            .occupancy_max_active_blocks_per_multiprocessor(threads, shared_bytes, None)
            .map_err(|e| driver_error(&self.tier, "cuOccupancyMaxActiveBlocksPerMultiprocessor", e))
    }

    /// Enqueues the kernel on `stream` and returns once the launch is
    /// accepted (the kernel runs asynchronously; errors it meets while
    /// running surface at the next synchronization on the stream).
    ///
    /// # Safety
    /// `args` must point at one value per kernel parameter, of the
    /// parameter's type and layout, in order; every device address among them
    /// must stay valid, and unused by anything that races with the kernel,
    /// until the stream's work up to here has finished. `stream` must belong
    /// to this kernel's GPU.
    pub unsafe fn launch(&self, stream: &CudaStream, dims: LaunchDims, args: &mut [*mut c_void]) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_error(&self.tier, "cuCtxSetCurrent", e))?;
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            cudarc::driver::result::launch_kernel(
                self.func.cu_function(),
                dims.grid,
                dims.block,
                dims.shared_bytes,
                stream.cu_stream(),
                args,
            )
        }
        .map_err(|e| driver_error(&self.tier, &format!("cuLaunchKernel ({})", self.entry), e))
    }
}

type CacheKey = (u32, String, CompileOptions);

/// Loaded modules of this process, by (GPU, source, options).
fn cache() -> &'static Mutex<HashMap<CacheKey, Arc<CudaModule>>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Arc<CudaModule>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The kernel `entry` (declared `extern "C"`) of `source` on `gpu`: compiled
/// and loaded on first use, from the cache after that. Compilation happens
/// under the cache's lock, so two threads asking at once compile once.
pub fn load(gpu: &GpuDevice, source: &str, entry: &str, options: &CompileOptions) -> Result<Kernel> {
    let shared = &gpu.shared;
    require_nvrtc(&format!("run-time compilation of kernel {entry} for {}", shared.tier))?;
    let key = (shared.ordinal, source.to_string(), options.clone());
    let module = {
        let mut map = cache().lock();
        match map.get(&key) {
            Some(m) => Arc::clone(m),
            None => {
                let arch = target_arch(shared.info.compute_capability);
                let ptx = compile(source, entry, options, &arch)?;
                let m = shared.ctx.load_module(ptx).map_err(|e| driver_error(&shared.tier, "cuModuleLoadData", e))?;
                map.insert(key, Arc::clone(&m));
                m
            }
        }
    };
    let func = module
        .load_function(entry)
        .map_err(|e| driver_error(&shared.tier, &format!("cuModuleGetFunction ({entry})"), e))?;
    Ok(Kernel { func, ctx: Arc::clone(&shared.ctx), tier: shared.tier.clone(), entry: entry.to_string() })
}

/// The number of multiprocessors of `gpu`.
pub fn multiprocessors(gpu: &GpuDevice) -> Result<u32> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let n = gpu
        .shared
        .ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| driver_error(&gpu.shared.tier, "cuDeviceGetAttribute", e))?;
    Ok(n.max(1) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"extern "C" __global__ void add_one(float* x, unsigned long long n) {
        unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
        if (i < n) x[i] += 1.0f;
    }"#;

    #[test]
    fn compiles_without_a_gpu_or_says_why() {
        match compile_ptx(SRC, &CompileOptions::default(), "compute_80") {
            Ok(ptx) => assert!(ptx.contains(".entry add_one"), "{ptx}"),
            Err(e) => {
                assert!(!nvrtc_available(), "NVRTC is there but compiling failed: {e}");
                assert!(e.to_string().contains("no NVRTC"), "{e}");
            }
        }
    }

    #[test]
    fn compile_errors_carry_the_log() {
        if !nvrtc_available() {
            println!("skipped: no NVRTC");
            return;
        }
        let e = compile_ptx("this is not C++", &CompileOptions::default(), "compute_80").unwrap_err();
        assert!(e.to_string().contains("error"), "{e}");
        let nul = compile_ptx("a\0b", &CompileOptions::default(), "compute_80").unwrap_err();
        assert!(nul.to_string().contains("NUL"), "{nul}");
    }

    #[test]
    fn defines_reach_the_source() {
        if !nvrtc_available() {
            println!("skipped: no NVRTC");
            return;
        }
        let src = "#ifndef WANTED\n#error WANTED missing\n#endif\nextern \"C\" __global__ void k() {}";
        assert!(compile_ptx(src, &CompileOptions::default(), "compute_80").is_err());
        let opts = CompileOptions { defines: vec!["WANTED=1".into()], ..Default::default() };
        assert!(compile_ptx(src, &opts, "compute_80").is_ok());
    }

    #[test]
    fn target_arch_never_passes_the_gpu() {
        let a = target_arch((9, 0));
        let n: i32 = a.trim_start_matches("compute_").parse().unwrap();
        assert!(n <= 90, "{a}");
    }
}
