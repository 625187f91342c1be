//! Matrix products through cuBLAS and cuBLASLt: f16 (or, through the
//! `_half` products, bf16) operands, f32 accumulation, output in the
//! operands' type or f32.
//!
//! [`Blas::linear`] is a PyTorch `Linear` on row-major activations,
//! `out = act(x · Wᵀ + bias) (+ out)`, with the bias, the ReLU and the
//! residual add (`accumulate`) fused into cuBLASLt's epilogue. Each shape
//! gets a plan (descriptors and the heuristic's algorithm) once; later calls
//! only set the bias pointer. Where cuBLASLt offers no algorithm, the plan
//! remembers that and the product runs through `cublasGemmEx` with a small
//! bias/ReLU kernel after it.
//!
//! [`Blas::gemm_batched`] is cuBLAS's strided batched product, for the
//! attention of prefill; every operand's extent is checked against its
//! buffer first.
//!
//! [`Blas::linear_half`] and [`Blas::gemm_batched_half`] are the same
//! products over either 16-bit type ([`Half`]: f16 or bf16); plans are
//! kept apart by input type.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::{self, CudaBlas};
use cudarc::cublaslt::{result as lt, sys as lts};
use half::f16;
use tier_api::{DType, Device, Shape, Tensor};
use tier_cuda::kernels::CudaStream;
use tier_cuda::GpuDevice;

use super::buffer::{DevBuf, Half};
pub use super::view::Operand;
use super::{tier_err, Gpu};
use crate::error::{Error, Result};

/// cuBLASLt's workspace (NVIDIA's recommendation for Hopper).
const LT_WORKSPACE: usize = 32 << 20;

/// The output of a linear layer, with a bias of the same type.
#[derive(Debug, Clone, Copy)]
pub enum LinearOut<'a> {
    F16 { out: &'a DevBuf<f16>, bias: Option<&'a DevBuf<f16>> },
    F32 { out: &'a DevBuf<f32>, bias: Option<&'a DevBuf<f32>> },
}

impl LinearOut<'_> {
    fn ptr(&self) -> u64 {
        match self {
            LinearOut::F16 { out, .. } => out.ptr(),
            LinearOut::F32 { out, .. } => out.ptr(),
        }
    }
    fn len(&self) -> usize {
        match self {
            LinearOut::F16 { out, .. } => out.len(),
            LinearOut::F32 { out, .. } => out.len(),
        }
    }
    fn bias(&self) -> Option<(u64, usize)> {
        match self {
            LinearOut::F16 { bias, .. } => bias.map(|b| (b.ptr(), b.len())),
            LinearOut::F32 { bias, .. } => bias.map(|b| (b.ptr(), b.len())),
        }
    }
    fn is_f32(&self) -> bool {
        matches!(self, LinearOut::F32 { .. })
    }
}

/// The output of [`Blas::linear_half`]: the operands' type with an
/// optional bias of that type, or f32 (no bias).
#[derive(Debug, Clone, Copy)]
pub enum HalfOut<'a, T: Half> {
    Half { out: &'a DevBuf<T>, bias: Option<&'a DevBuf<T>> },
    F32 { out: &'a DevBuf<f32> },
}

impl<T: Half> HalfOut<'_, T> {
    fn ptr(&self) -> u64 {
        match self {
            HalfOut::Half { out, .. } => out.ptr(),
            HalfOut::F32 { out } => out.ptr(),
        }
    }
    fn len(&self) -> usize {
        match self {
            HalfOut::Half { out, .. } => out.len(),
            HalfOut::F32 { out } => out.len(),
        }
    }
    fn bias(&self) -> Option<&DevBuf<T>> {
        match self {
            HalfOut::Half { bias, .. } => *bias,
            HalfOut::F32 { .. } => None,
        }
    }
    fn is_f32(&self) -> bool {
        matches!(self, HalfOut::F32 { .. })
    }
}

/// The 16-bit input types of the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum InType {
    F16,
    Bf16,
}

impl InType {
    fn of<T: Half>() -> Result<Self> {
        match T::DTYPE {
            DType::F16 => Ok(InType::F16),
            DType::BF16 => Ok(InType::Bf16),
            other => Err(Error::Gpu(format!("GPU matrix product: {other:?} is not a 16-bit float type"))),
        }
    }
    fn lt(self) -> lts::cudaDataType {
        match self {
            InType::F16 => lts::cudaDataType::CUDA_R_16F,
            InType::Bf16 => lts::cudaDataType::CUDA_R_16BF,
        }
    }
    fn blas(self) -> cublas::sys::cudaDataType {
        match self {
            InType::F16 => cublas::sys::cudaDataType::CUDA_R_16F,
            InType::Bf16 => cublas::sys::cudaDataType::CUDA_R_16BF,
        }
    }
    /// cuBLASLt's type of an output (and its bias): f32, or the inputs'.
    fn lt_out(self, f32_out: bool) -> lts::cudaDataType {
        if f32_out {
            lts::cudaDataType::CUDA_R_32F
        } else {
            self.lt()
        }
    }
    fn blas_out(self, f32_out: bool) -> cublas::sys::cudaDataType {
        if f32_out {
            cublas::sys::cudaDataType::CUDA_R_32F
        } else {
            self.blas()
        }
    }
}

/// What a plan is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    input: InType,
    rows: usize,
    n: usize,
    k: usize,
    /// The input's row stride (`k` unless the rows are a slice of wider ones).
    ldx: usize,
    out_f32: bool,
    bias: bool,
    relu: bool,
    accumulate: bool,
}

/// cuBLASLt descriptors and the chosen algorithm for one shape.
struct LtPlan {
    desc: lts::cublasLtMatmulDesc_t,
    a: lts::cublasLtMatrixLayout_t,
    b: lts::cublasLtMatrixLayout_t,
    c: lts::cublasLtMatrixLayout_t,
    algo: lts::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are plain host objects of cuBLASLt that any
// thread may use; the plans sit behind a mutex and are used by one call at
// a time.
unsafe impl Send for LtPlan {}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: each handle was created once by this plan and is
        // destroyed once here; errors on the way out are ignored.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle, destroyed on drop.
struct LtHandle(lts::cublasLtHandle_t);

// SAFETY: a cuBLASLt handle may be used from any thread, one call at a
// time; the engine issues all calls from the thread that holds the `Gpu`.
unsafe impl Send for LtHandle {}
// SAFETY: as above; nothing mutates the handle itself after creation.
unsafe impl Sync for LtHandle {}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: created once in `Blas::new`, destroyed once here.
        let _ = unsafe { lt::destroy_handle(self.0) };
    }
}

/// The BLAS handles of the engine's stream.
pub struct Blas {
    blas: CudaBlas,
    lt: LtHandle,
    workspace: Tensor,
    workspace_ptr: u64,
    stream: Arc<CudaStream>,
    plans: Mutex<HashMap<PlanKey, Option<LtPlan>>>,
    /// Whether the linear products may use cuBLASLt (tests turn it off to
    /// check the cublasGemmEx fallback).
    lt_enabled: AtomicBool,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").field("plans", &self.plans().len()).finish_non_exhaustive()
    }
}

fn blas_err(call: &str, e: impl std::fmt::Debug) -> Error {
    Error::Gpu(format!("GPU: {call} failed: {e:?}"))
}

fn c_int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Gpu(format!("GPU matrix product: {what} {v} does not fit cuBLAS's int")))
}

fn blas_type(f32_out: bool) -> cublas::sys::cudaDataType {
    InType::F16.blas_out(f32_out)
}

/// The output of a batched product.
#[derive(Debug, Clone, Copy)]
pub enum BatchedOut<'a> {
    F16(Operand<'a, f16>),
    F32(Operand<'a, f32>),
}

impl Blas {
    /// Handles on `stream` and cuBLASLt's workspace on `device`.
    pub fn new(device: &GpuDevice, stream: &Arc<CudaStream>) -> Result<Self> {
        let blas = CudaBlas::new(Arc::clone(stream)).map_err(|e| blas_err("cublasCreate", e))?;
        let handle = lt::create_handle().map_err(|e| blas_err("cublasLtCreate", e))?;
        let workspace = device.allocate(&Shape::new([LT_WORKSPACE]), DType::U8).map_err(tier_err)?;
        let workspace_ptr = device.device_ptr(&workspace).map_err(tier_err)?;
        Ok(Blas {
            blas,
            lt: LtHandle(handle),
            workspace,
            workspace_ptr,
            stream: Arc::clone(stream),
            plans: Mutex::new(HashMap::new()),
            lt_enabled: AtomicBool::new(true),
        })
    }

    /// `out = act(x · wᵀ + bias) (+ out when accumulate)`: `x` is `rows × k`
    /// row-major f16, `w` is `n × k` (a PyTorch `Linear` weight), `out`
    /// `rows × n`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        gpu: &Gpu,
        x: &DevBuf<f16>,
        rows: usize,
        w: &DevBuf<f16>,
        (n, k): (usize, usize),
        out: LinearOut<'_>,
        relu: bool,
        accumulate: bool,
    ) -> Result<()> {
        if x.len() < rows * k || w.len() < n * k || out.len() < rows * n {
            return Err(Error::Gpu(format!(
                "GPU linear {rows}x{k} · ({n}x{k})ᵀ: buffers of {}, {} and {} elements are too small",
                x.len(),
                w.len(),
                out.len()
            )));
        }
        if let Some((_, len)) = out.bias() {
            if len < n {
                return Err(Error::Gpu(format!("GPU linear: bias of {len} elements for {n} outputs")));
            }
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let key = PlanKey {
            input: InType::F16,
            rows,
            n,
            k,
            ldx: k,
            out_f32: out.is_f32(),
            bias: out.bias().is_some(),
            relu,
            accumulate,
        };
        let aligned = [x.ptr(), w.ptr(), out.ptr(), out.bias().map_or(0, |b| b.0)].iter().all(|p| p % 256 == 0);
        if aligned && k > 0 && self.lt_enabled.load(Ordering::Relaxed) {
            let mut plans = self.plans();
            let plan = plans.entry(key).or_insert_with(|| match self.make_plan(&key) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::debug!("cuBLASLt has no plan for {key:?} ({e}); using cublasGemmEx");
                    None
                }
            });
            if let Some(plan) = plan {
                return self.run_plan(plan, (x.ptr(), w.ptr()), out.ptr(), out.bias().map(|b| b.0), accumulate);
            }
        }
        // Fallback: the product through cublasGemmEx, then bias and ReLU.
        let c_type = blas_type(out.is_f32());
        self.gemm_ex(InType::F16, (x.ptr(), k), w.ptr(), (out.ptr(), c_type), (rows, n, k), accumulate)?;
        if out.bias().is_some() || relu {
            match out {
                LinearOut::F16 { out, bias } => gpu.kernels.bias_act_f16(gpu, out, bias, rows, n, relu)?,
                LinearOut::F32 { out, bias } => gpu.kernels.bias_act_f32(gpu, out, bias, rows, n, relu)?,
            }
        }
        Ok(())
    }

    fn make_plan(&self, key: &PlanKey) -> Result<LtPlan> {
        let to_u64 = |v: usize| v as u64;
        let ld = |v: usize| v as i64;
        let desc = lt::create_matmul_desc(lts::cublasComputeType_t::CUBLAS_COMPUTE_32F, lts::cudaDataType::CUDA_R_32F)
            .map_err(|e| blas_err("cublasLtMatmulDescCreate", e))?;
        // The layouts are made one by one so that each is destroyed by the
        // plan, or here on the way out of a failure.
        let mut plan = LtPlan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: lts::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let set = |attr: lts::cublasLtMatmulDescAttributes_t, v: &i32| {
            // SAFETY: `desc` is live; the attribute takes a 32-bit value
            // (cublasOperation_t / cublasLtEpilogue_t) and `v` points at one.
            unsafe { lt::set_matmul_desc_attribute(desc, attr, (v as *const i32).cast(), size_of::<i32>()) }
                .map_err(|e| blas_err("cublasLtMatmulDescSetAttribute", e))
        };
        set(lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &1)?;
        set(lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &0)?;
        let epilogue = match (key.bias, key.relu) {
            (true, true) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
            (true, false) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            (false, true) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU,
            (false, false) => lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
        };
        set(lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as i32))?;
        if key.bias {
            // The bias is held in the output's type (f16, bf16 or f32).
            set(
                lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &(key.input.lt_out(key.out_f32) as i32),
            )?;
        }
        let layout =
            |t, r, c, l| lt::create_matrix_layout(t, r, c, l).map_err(|e| blas_err("cublasLtMatrixLayoutCreate", e));
        // Column-major: A = W (k × n, ld k, transposed), B = x (k × rows,
        // ld k), C = D = out (n × rows, ld n).
        plan.a = layout(key.input.lt(), to_u64(key.k), to_u64(key.n), ld(key.k))?;
        plan.b = layout(key.input.lt(), to_u64(key.k), to_u64(key.rows), ld(key.ldx))?;
        plan.c = layout(key.input.lt_out(key.out_f32), to_u64(key.n), to_u64(key.rows), ld(key.n))?;
        let pref = lt::create_matmul_pref().map_err(|e| blas_err("cublasLtMatmulPreferenceCreate", e))?;
        let ws = LT_WORKSPACE;
        // SAFETY: `pref` is live; the attribute takes a u64 (size_t) and
        // `ws` is one.
        let r = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const usize).cast(),
                size_of::<usize>(),
            )
        };
        // SAFETY: every handle is live (made above, destroyed later).
        let heuristic = r.and_then(|()| unsafe {
            lt::get_matmul_algo_heuristic(self.lt.0, plan.desc, plan.a, plan.b, plan.c, plan.c, pref)
        });
        // SAFETY: made above, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        let heuristic = heuristic.map_err(|e| blas_err("cublasLtMatmulAlgoGetHeuristic", e))?;
        if heuristic.workspaceSize > LT_WORKSPACE {
            return Err(Error::Gpu("cuBLASLt asked for more workspace than it was given".into()));
        }
        plan.algo = heuristic.algo;
        Ok(plan)
    }

    fn run_plan(&self, plan: &LtPlan, (x, w): (u64, u64), d: u64, bias: Option<u64>, accumulate: bool) -> Result<()> {
        if let Some(bias) = bias {
            // SAFETY: `plan.desc` is live; the attribute takes a device
            // pointer and `bias` is one (checked to hold n elements).
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&bias as *const u64).cast(),
                    size_of::<u64>(),
                )
            }
            .map_err(|e| blas_err("cublasLtMatmulDescSetAttribute", e))?;
        }
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        // SAFETY: the plan's layouts describe the shapes and types the
        // caller checked against the buffers (`linear`, `linear_half`); C
        // and D are the same buffer with the same layout, which cuBLASLt
        // allows; alpha and beta are f32 as the scale type says; the workspace holds LT_WORKSPACE bytes and
        // lives as long as `self`; all on the engine's stream.
        unsafe {
            lt::matmul(
                self.lt.0,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w as *const c_void,
                plan.a,
                x as *const c_void,
                plan.b,
                d as *const c_void,
                plan.c,
                d as *mut c_void,
                plan.c,
                &plan.algo,
                self.workspace_ptr as *mut c_void,
                LT_WORKSPACE,
                self.stream.cu_stream() as _,
            )
        }
        .map_err(|e| blas_err("cublasLtMatmul", e))
    }

    /// `out = x · wᵀ (+ out)` through cublasGemmEx: inputs of `input`'s
    /// type, the output of `c_type`.
    fn gemm_ex(
        &self,
        input: InType,
        (x, ldx): (u64, usize),
        w: u64,
        (out, c_type): (u64, cublas::sys::cudaDataType),
        (rows, n, k): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        use cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        let (m_i, n_i, k_i) = (c_int("n", n)?, c_int("rows", rows)?, c_int("k", k)?);
        let ldx_i = c_int("the input's row stride", ldx)?;
        // SAFETY: shapes checked against the buffers by `linear` or
        // `linear_half`; alpha and beta are f32 for the f32 compute type; on
        // the handle's stream.
        unsafe {
            cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m_i,
                n_i,
                k_i,
                (&alpha as *const f32).cast(),
                w as *const c_void,
                input.blas(),
                k_i.max(1),
                x as *const c_void,
                input.blas(),
                ldx_i.max(1),
                (&beta as *const f32).cast(),
                out as *mut c_void,
                c_type,
                m_i,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_err("cublasGemmEx", e))
    }

    /// `C[i] = alpha · op(A[i]) · op(B[i]) + beta · C[i]` for `batch`
    /// column-major matrices (cuBLAS's convention: op(A) is `m × k`, op(B)
    /// `k × n`, C `m × n`), f16 operands, f32 compute.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_batched(
        &self,
        (trans_a, trans_b): (bool, bool),
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: Operand<'_, f16>,
        b: Operand<'_, f16>,
        beta: f32,
        c: BatchedOut<'_>,
        batch: usize,
    ) -> Result<()> {
        use cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
        let (br, bc) = if trans_b { (n, k) } else { (k, n) };
        let a_ptr = a.checked("A", ar, ac, batch)?;
        let b_ptr = b.checked("B", br, bc, batch)?;
        let (c_ptr, ldc, stride_c, f32_out) = match c {
            BatchedOut::F16(o) => (o.checked("C", m, n, batch)?, o.ld, o.stride, false),
            BatchedOut::F32(o) => (o.checked("C", m, n, batch)?, o.ld, o.stride, true),
        };
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let stride = |s: usize| s as i64;
        // SAFETY: every operand's extent was checked against its buffer just
        // above; alpha and beta are f32 for the f32 compute type; on the
        // handle's stream.
        unsafe {
            cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(trans_a),
                op(trans_b),
                c_int("m", m)?,
                c_int("n", n)?,
                c_int("k", k)?,
                (&alpha as *const f32).cast(),
                a_ptr as *const c_void,
                blas_type(false),
                c_int("lda", a.ld)?,
                stride(a.stride),
                b_ptr as *const c_void,
                blas_type(false),
                c_int("ldb", b.ld)?,
                stride(b.stride),
                (&beta as *const f32).cast(),
                c_ptr as *mut c_void,
                blas_type(f32_out),
                c_int("ldc", ldc)?,
                stride(stride_c),
                c_int("batch", batch)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_err("cublasGemmStridedBatchedEx", e))
    }

    /// `out = x · wᵀ (+ bias) (+ out when accumulate)` over either 16-bit
    /// type: `x` is `rows × k` row-major T, `w` is `n × k` (a PyTorch
    /// `Linear` weight), `out` `rows × n` of T (with an optional bias of
    /// T, fused into cuBLASLt's epilogue) or f32; f32 accumulation. Where
    /// cuBLASLt has no plan for the shape, or a pointer is not 256-byte
    /// aligned, the product runs through `cublasGemmEx` and the bias is
    /// added after it ([`super::llm::LlmKernels::add_bias`]: the
    /// product is then rounded to T before the bias is added).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_half<T: Half>(
        &self,
        gpu: &Gpu,
        x: &DevBuf<T>,
        rows: usize,
        w: &DevBuf<T>,
        (n, k): (usize, usize),
        out: HalfOut<'_, T>,
        accumulate: bool,
    ) -> Result<()> {
        self.linear_half_ld(gpu, (x, k), rows, w, (n, k), out, accumulate)
    }

    /// [`Blas::linear_half`] over rows of `x` that are `ldx` values apart
    /// (`ldx ≥ k`: the first `k` values of wider rows, such as the gate half
    /// of a stacked gate/up product).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_half_ld<T: Half>(
        &self,
        gpu: &Gpu,
        (x, ldx): (&DevBuf<T>, usize),
        rows: usize,
        w: &DevBuf<T>,
        (n, k): (usize, usize),
        out: HalfOut<'_, T>,
        accumulate: bool,
    ) -> Result<()> {
        let input = InType::of::<T>()?;
        let size = usize::saturating_mul;
        // The input's last row ends at (rows - 1)·ldx + k.
        let x_need = if rows == 0 { 0 } else { size(rows - 1, ldx).saturating_add(k) };
        if ldx < k || x.len() < x_need || w.len() < size(n, k) || out.len() < size(rows, n) {
            return Err(Error::Gpu(format!(
                "GPU linear {rows}x{k} (row stride {ldx}) · ({n}x{k})ᵀ: buffers of {}, {} and {} elements are too \
                 small, or the stride is shorter than a row",
                x.len(),
                w.len(),
                out.len()
            )));
        }
        if let Some(b) = out.bias() {
            if b.len() < n {
                return Err(Error::Gpu(format!("GPU linear: bias of {} elements for {n} outputs", b.len())));
            }
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let bias = out.bias().map(DevBuf::ptr);
        let key =
            PlanKey { input, rows, n, k, ldx, out_f32: out.is_f32(), bias: bias.is_some(), relu: false, accumulate };
        let row_bytes = ldx.saturating_mul(std::mem::size_of::<T>());
        let aligned = [x.ptr(), w.ptr(), out.ptr(), bias.unwrap_or(0)].iter().all(|p| p % 256 == 0)
            && row_bytes.is_multiple_of(16);
        if aligned && k > 0 && self.lt_enabled.load(Ordering::Relaxed) {
            let mut plans = self.plans();
            let plan = plans.entry(key).or_insert_with(|| match self.make_plan(&key) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::debug!("cuBLASLt has no plan for {key:?} ({e}); using cublasGemmEx");
                    None
                }
            });
            if let Some(plan) = plan {
                return self.run_plan(plan, (x.ptr(), w.ptr()), out.ptr(), bias, accumulate);
            }
        }
        // Fallback: the product through cublasGemmEx, then the bias.
        let c_type = input.blas_out(out.is_f32());
        self.gemm_ex(input, (x.ptr(), ldx), w.ptr(), (out.ptr(), c_type), (rows, n, k), accumulate)?;
        if let HalfOut::Half { out, bias: Some(bias) } = out {
            gpu.llm()?.add_bias(gpu, out, rows, n, bias)?;
        }
        Ok(())
    }

    /// [`Blas::gemm_batched`] over either 16-bit type:
    /// `C[i] = alpha · op(A[i]) · op(B[i]) + beta · C[i]` for `batch`
    /// column-major matrices (op(A) `m × k`, op(B) `k × n`, C `m × n`), T
    /// operands and output, f32 compute.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_batched_half<T: Half>(
        &self,
        (trans_a, trans_b): (bool, bool),
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: Operand<'_, T>,
        b: Operand<'_, T>,
        beta: f32,
        c: Operand<'_, T>,
        batch: usize,
    ) -> Result<()> {
        use cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
        let input = InType::of::<T>()?;
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
        let (br, bc) = if trans_b { (n, k) } else { (k, n) };
        let a_ptr = a.checked("A", ar, ac, batch)?;
        let b_ptr = b.checked("B", br, bc, batch)?;
        let c_ptr = c.checked("C", m, n, batch)?;
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let stride = |what: &str, s: usize| {
            i64::try_from(s).map_err(|_| Error::Gpu(format!("GPU batched product: {what} stride {s} is too large")))
        };
        let (sa, sb, sc) = (stride("A", a.stride)?, stride("B", b.stride)?, stride("C", c.stride)?);
        // cuBLAS reads leading dimensions of at least 1 even where k is 0.
        let ld = |what: &str, v: usize| c_int(what, v.max(1));
        // SAFETY: every operand's extent was checked against its buffer just
        // above; alpha and beta are f32 for the f32 compute type; A, B and C
        // are all of `input`'s type as the buffers' element type says; on the
        // handle's stream.
        unsafe {
            cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(trans_a),
                op(trans_b),
                c_int("m", m)?,
                c_int("n", n)?,
                c_int("k", k)?,
                (&alpha as *const f32).cast(),
                a_ptr as *const c_void,
                input.blas(),
                ld("lda", a.ld)?,
                sa,
                b_ptr as *const c_void,
                input.blas(),
                ld("ldb", b.ld)?,
                sb,
                (&beta as *const f32).cast(),
                c_ptr as *mut c_void,
                input.blas(),
                ld("ldc", c.ld)?,
                sc,
                c_int("batch", batch)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_err("cublasGemmStridedBatchedEx", e))
    }

    /// The plan cache (a panic elsewhere while it was held leaves nothing
    /// half-made in it: plans are inserted whole).
    fn plans(&self) -> MutexGuard<'_, HashMap<PlanKey, Option<LtPlan>>> {
        self.plans.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lets the linear products use cuBLASLt (the default), or sends them
    /// all through the cublasGemmEx fallback (and the bias kernels after
    /// it): for tests of the fallback, which otherwise runs only for shapes
    /// cuBLASLt refuses or unaligned buffers.
    #[doc(hidden)]
    pub fn set_lt_enabled(&self, on: bool) {
        self.lt_enabled.store(on, Ordering::Relaxed);
    }

    /// Bytes of cuBLASLt's workspace (held on the GPU tier's account).
    pub fn workspace_bytes(&self) -> u64 {
        self.workspace.byte_len() as u64
    }
}
