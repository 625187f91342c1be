//! Matrix products through cuBLAS and cuBLASLt: f16 (or, through the
//! `_half` products, bf16) operands, f32 accumulation, output in the
//! operands' type or f32.
//!
//! [`Blas::linear`] is a PyTorch `Linear` on row-major activations,
//! `out = act(x · Wᵀ + bias) (+ out)`, with the bias, the ReLU and the
//! residual add (`accumulate`) fused into cuBLASLt's epilogue. Its operands
//! are matrix views ([`Mat`], [`MatMut`]): the input's rows may be `ld`
//! apart (the gate half of stacked gate/up rows), the weight and the output
//! are dense. Each shape (the input's row stride included) gets a plan
//! (descriptors and the heuristic's algorithm) once; later calls only set
//! the bias pointer. Where cuBLASLt offers no algorithm, the plan
//! remembers that and the product runs through `cublasGemmEx` with a small
//! bias/ReLU kernel after it.
//!
//! [`Blas::gemm_batched`] is cuBLAS's strided batched product ([`Gemm`]),
//! for the attention of prefill; every operand's extent is checked against
//! its buffer first.
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
use super::view::{Gemm, Mat, MatMut};
use super::{tier_err, Gpu};
use crate::error::{Error, Result};

/// cuBLASLt's workspace (NVIDIA's recommendation for Hopper).
const LT_WORKSPACE: usize = 32 << 20;

/// The output of a linear layer (`rows × n`, dense), with a bias of the
/// same type.
#[derive(Debug, Clone, Copy)]
pub enum LinearOut<'a> {
    F16 { out: MatMut<'a, f16>, bias: Option<&'a DevBuf<f16>> },
    F32 { out: MatMut<'a, f32>, bias: Option<&'a DevBuf<f32>> },
}

impl LinearOut<'_> {
    fn ptr(&self) -> u64 {
        match self {
            LinearOut::F16 { out, .. } => out.ptr(),
            LinearOut::F32 { out, .. } => out.ptr(),
        }
    }
    fn check(&self, rows: usize, n: usize) -> Result<()> {
        let (shape, dense) = match self {
            LinearOut::F16 { out, .. } => {
                (out.check_shape("GPU linear output", rows, n), out.check_dense("GPU linear"))
            }
            LinearOut::F32 { out, .. } => {
                (out.check_shape("GPU linear output", rows, n), out.check_dense("GPU linear"))
            }
        };
        shape.and(dense)
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

/// The output of [`Blas::linear_half`] (`rows × n`, dense): the operands'
/// type with an optional bias of that type, or f32 (no bias).
#[derive(Debug, Clone, Copy)]
pub enum HalfOut<'a, T: Half> {
    Half { out: MatMut<'a, T>, bias: Option<&'a DevBuf<T>> },
    F32 { out: MatMut<'a, f32> },
}

impl<T: Half> HalfOut<'_, T> {
    fn ptr(&self) -> u64 {
        match self {
            HalfOut::Half { out, .. } => out.ptr(),
            HalfOut::F32 { out } => out.ptr(),
        }
    }
    fn check(&self, rows: usize, n: usize) -> Result<()> {
        let (shape, dense) = match self {
            HalfOut::Half { out, .. } => (out.check_shape("GPU linear output", rows, n), out.check_dense("GPU linear")),
            HalfOut::F32 { out } => (out.check_shape("GPU linear output", rows, n), out.check_dense("GPU linear")),
        };
        shape.and(dense)
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

/// One linear product as it runs: its plan's key and the device addresses
/// of its operands (checked against their views by the caller).
struct LinearOp {
    key: PlanKey,
    x: u64,
    w: u64,
    out: u64,
    bias: Option<u64>,
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

fn c_stride(what: &str, s: usize) -> Result<i64> {
    i64::try_from(s).map_err(|_| Error::Gpu(format!("GPU batched product: {what} stride {s} is too large")))
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
    /// row-major f16 (rows `x.ld()` apart), `w` is `n × k` (a PyTorch
    /// `Linear` weight, dense), `out` `rows × n` (dense).
    pub fn linear(
        &self,
        gpu: &Gpu,
        x: Mat<'_, f16>,
        w: Mat<'_, f16>,
        out: LinearOut<'_>,
        relu: bool,
        accumulate: bool,
    ) -> Result<()> {
        let (rows, k, n) = (x.rows(), x.cols(), w.rows());
        w.check_shape("GPU linear weight", n, k)?;
        w.check_dense("GPU linear weight")?;
        out.check(rows, n)?;
        if let Some((_, len)) = out.bias() {
            if len < n {
                return Err(Error::Gpu(format!("GPU linear: bias of {len} elements for {n} outputs")));
            }
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let bias = out.bias().map(|b| b.0);
        let op = LinearOp {
            key: PlanKey {
                input: InType::F16,
                rows,
                n,
                k,
                ldx: x.ld(),
                out_f32: out.is_f32(),
                bias: bias.is_some(),
                relu,
                accumulate,
            },
            x: x.ptr(),
            w: w.ptr(),
            out: out.ptr(),
            bias,
        };
        let row_bytes = x.ld().saturating_mul(size_of::<f16>());
        let lt = [op.x, op.w, op.out, bias.unwrap_or(0)].iter().all(|p| p % 256 == 0)
            && (x.is_dense() || row_bytes.is_multiple_of(16));
        if self.run_linear(&op, lt)? {
            return Ok(());
        }
        // Through cublasGemmEx: then the bias and the ReLU.
        if bias.is_some() || relu {
            match out {
                LinearOut::F16 { out, bias } => gpu.kernels.bias_act_f16(gpu, out, bias, relu)?,
                LinearOut::F32 { out, bias } => gpu.kernels.bias_act_f32(gpu, out, bias, relu)?,
            }
        }
        Ok(())
    }

    /// Runs `op` through its cuBLASLt plan where `lt` (its pointers and row
    /// stride are aligned for cuBLASLt) and cuBLASLt has a plan for its
    /// shape: true. Otherwise through cublasGemmEx, without the bias and
    /// the ReLU: false, and the caller adds them.
    fn run_linear(&self, op: &LinearOp, lt: bool) -> Result<bool> {
        let key = op.key;
        if lt && key.k > 0 && self.lt_enabled.load(Ordering::Relaxed) {
            let mut plans = self.plans();
            let plan = plans.entry(key).or_insert_with(|| match self.make_plan(&key) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::debug!("cuBLASLt has no plan for {key:?} ({e}); using cublasGemmEx");
                    None
                }
            });
            if let Some(plan) = plan {
                self.run_plan(plan, op)?;
                return Ok(true);
            }
        }
        self.gemm_ex(op)?;
        Ok(false)
    }

    fn make_plan(&self, key: &PlanKey) -> Result<LtPlan> {
        let to_u64 = |v: usize| v as u64;
        let ld = |v: usize| {
            i64::try_from(v)
                .map_err(|_| Error::Gpu(format!("GPU linear: leading dimension {v} does not fit cuBLASLt's")))
        };
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
        plan.a = layout(key.input.lt(), to_u64(key.k), to_u64(key.n), ld(key.k)?)?;
        plan.b = layout(key.input.lt(), to_u64(key.k), to_u64(key.rows), ld(key.ldx)?)?;
        plan.c = layout(key.input.lt_out(key.out_f32), to_u64(key.n), to_u64(key.rows), ld(key.n)?)?;
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

    fn run_plan(&self, plan: &LtPlan, op: &LinearOp) -> Result<()> {
        let (x, w, d) = (op.x, op.w, op.out);
        if let Some(bias) = op.bias {
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
        let beta = if op.key.accumulate { 1.0f32 } else { 0.0 };
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

    /// `out = x · wᵀ (+ out)` through cublasGemmEx: inputs of the key's
    /// input type, the output f32 or of that type.
    fn gemm_ex(&self, op: &LinearOp) -> Result<()> {
        use cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
        let PlanKey { input, rows, n, k, ldx, out_f32, accumulate, .. } = op.key;
        let (x, w, out, c_type) = (op.x, op.w, op.out, input.blas_out(out_f32));
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

    /// The product `g` (`C[i] = alpha · op(A[i]) · op(B[i]) + beta · C[i]`
    /// for `batch` column-major matrices, cuBLAS's convention: op(A) is
    /// `m × k`, op(B) `k × n`, C `m × n`), f16 operands, f32 compute.
    pub fn gemm_batched(&self, g: Gemm, a: Operand<'_, f16>, b: Operand<'_, f16>, c: BatchedOut<'_>) -> Result<()> {
        use cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
        let Gemm { trans_a, trans_b, m, n, k, batch, alpha, beta } = g;
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
        let (sa, sb, sc) = (c_stride("A", a.stride)?, c_stride("B", b.stride)?, c_stride("C", stride_c)?);
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
                sa,
                b_ptr as *const c_void,
                blas_type(false),
                c_int("ldb", b.ld)?,
                sb,
                (&beta as *const f32).cast(),
                c_ptr as *mut c_void,
                blas_type(f32_out),
                c_int("ldc", ldc)?,
                sc,
                c_int("batch", batch)?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_err("cublasGemmStridedBatchedEx", e))
    }

    /// `out = x · wᵀ (+ bias) (+ out when accumulate)` over either 16-bit
    /// type: `x` is `rows × k` row-major T (rows `x.ld()` apart: the first
    /// `k` values of wider rows, such as the gate half of a stacked gate/up
    /// product, are a [`Mat::cols_range`]), `w` is `n × k` (a PyTorch
    /// `Linear` weight, dense), `out` `rows × n` (dense) of T (with an
    /// optional bias of T, fused into cuBLASLt's epilogue) or f32; f32
    /// accumulation. Where cuBLASLt has no plan for the shape, or a pointer
    /// is not 256-byte aligned, or the input's rows are not 16 bytes apart,
    /// the product runs through `cublasGemmEx` and the bias is added after
    /// it ([`super::llm::LlmKernels::add_bias`]: the product is then rounded
    /// to T before the bias is added).
    pub fn linear_half<T: Half>(
        &self,
        gpu: &Gpu,
        x: Mat<'_, T>,
        w: Mat<'_, T>,
        out: HalfOut<'_, T>,
        accumulate: bool,
    ) -> Result<()> {
        let input = InType::of::<T>()?;
        let (rows, k, n) = (x.rows(), x.cols(), w.rows());
        w.check_shape("GPU linear weight", n, k)?;
        w.check_dense("GPU linear weight")?;
        out.check(rows, n)?;
        if let Some(b) = out.bias() {
            if b.len() < n {
                return Err(Error::Gpu(format!("GPU linear: bias of {} elements for {n} outputs", b.len())));
            }
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let bias = out.bias().map(DevBuf::ptr);
        let ldx = x.ld();
        let op = LinearOp {
            key: PlanKey {
                input,
                rows,
                n,
                k,
                ldx,
                out_f32: out.is_f32(),
                bias: bias.is_some(),
                relu: false,
                accumulate,
            },
            x: x.ptr(),
            w: w.ptr(),
            out: out.ptr(),
            bias,
        };
        let row_bytes = ldx.saturating_mul(size_of::<T>());
        let lt = [op.x, op.w, op.out, bias.unwrap_or(0)].iter().all(|p| p % 256 == 0) && row_bytes.is_multiple_of(16);
        if self.run_linear(&op, lt)? {
            return Ok(());
        }
        // Through cublasGemmEx: then the bias.
        if let HalfOut::Half { out, bias: Some(bias) } = out {
            gpu.llm()?.add_bias(gpu, out, bias)?;
        }
        Ok(())
    }

    /// [`Blas::gemm_batched`] over either 16-bit type: the product `g`
    /// (`C[i] = alpha · op(A[i]) · op(B[i]) + beta · C[i]` for `batch`
    /// column-major matrices, op(A) `m × k`, op(B) `k × n`, C `m × n`), T
    /// operands and output, f32 compute.
    pub fn gemm_batched_half<T: Half>(
        &self,
        g: Gemm,
        a: Operand<'_, T>,
        b: Operand<'_, T>,
        c: Operand<'_, T>,
    ) -> Result<()> {
        use cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
        let Gemm { trans_a, trans_b, m, n, k, batch, alpha, beta } = g;
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
        let (sa, sb, sc) = (c_stride("A", a.stride)?, c_stride("B", b.stride)?, c_stride("C", c.stride)?);
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
