//! The engine's NVRTC kernels (`kernels.cu`, compiled once per process and
//! GPU by `tier_cuda::kernels`) and their launchers. Each launcher checks
//! the sizes of the buffers it is given against what the kernel will touch,
//! so the one `unsafe` launch in each is sound whenever its arguments come
//! from [`DevBuf`]s of the engine. Matrices come as views ([`Mat`],
//! [`MatMut`], [`KvView`]: bounds checked when made); the launchers check
//! their shapes against each other and convert sizes to the kernels' 32-bit
//! ones with checked conversions.

use std::ffi::c_void;
use std::ops::Range;

use half::f16;
use tier_cuda::kernels::{self as tk, CompileOptions, Kernel, LaunchDims};
use tier_cuda::GpuDevice;

use super::buffer::{DevBuf, DevElem};
use super::view::{DecodeAttn, KvView, Mat, MatMut, ScoreRows};
use super::{tier_err, Gpu};
use crate::error::{Error, Result};

/// The CUDA C++ source of every kernel here.
pub const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("kernels.cu"));

/// The kernels' entry points, in the order [`Kernels`] loads them.
pub const ENTRIES: &[&str] = &[
    "embed",
    "gather_tokens",
    "layer_norm",
    "gather_last",
    "store_kv",
    "transpose_heads",
    "softmax_rows",
    "attn_decode",
    "argmax_rows",
    "bias_act_f16",
    "bias_act_f32",
    "fill_uniform_f16",
    "fill_uniform_f32",
    "fill_f16",
    "fill_f32",
];

/// A learned position embedding's lookup: a real token at position `p`
/// (counted from its sequence's first real token) reads row `p + offset`,
/// padding reads row `pad_row` (a table that keeps its first rows for
/// padding and other uses sets `offset` past them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnedPositions {
    pub offset: usize,
    pub pad_row: usize,
}

/// This step's tokens as [`Kernels::embed`] reads them: `batch × new_len`
/// token ids and their mask (1 for a real token, left padded), and the
/// real tokens each sequence had before the step.
#[derive(Debug, Clone, Copy)]
pub struct StepTokens<'a> {
    pub tokens: &'a DevBuf<u32>,
    pub step_mask: &'a DevBuf<u8>,
    pub past_real: &'a DevBuf<i32>,
    pub batch: usize,
    pub new_len: usize,
}

/// The tables [`Kernels::embed`] adds up: token embeddings (`vocab × h`;
/// `None` where the hidden states already hold the projected token
/// embeddings) and learned position embeddings (`positions × h`), looked
/// up as `lookup` says.
#[derive(Debug, Clone, Copy)]
pub struct EmbedTables<'a> {
    pub tokens: Option<Mat<'a, f16>>,
    pub positions: Mat<'a, f16>,
    pub lookup: LearnedPositions,
}

/// Threads per block of the decode attention kernel.
const ATTN_THREADS: u32 = 256;

/// The compile options: CUDA headers for `cuda_fp16.h`.
pub fn compile_options() -> CompileOptions {
    CompileOptions { cuda_headers: true, ..CompileOptions::default() }
}

/// Whether the decode attention kernel handles heads of `head_dim`: a
/// multiple of 8 whose eighth is a power of two up to 32 (16 to 256).
pub fn decode_kernel_fits(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8) && (head_dim / 8).is_power_of_two() && head_dim / 8 <= 32
}

/// The loaded kernels of one GPU.
#[derive(Debug)]
pub struct Kernels {
    embed: Kernel,
    gather_tokens: Kernel,
    layer_norm: Kernel,
    gather_last: Kernel,
    store_kv: Kernel,
    transpose_heads: Kernel,
    softmax_rows: Kernel,
    attn_decode: Kernel,
    argmax_rows: Kernel,
    bias_act_f16: Kernel,
    bias_act_f32: Kernel,
    fill_uniform_f16: Kernel,
    fill_uniform_f32: Kernel,
    fill_f16: Kernel,
    fill_f32: Kernel,
    multiprocessors: u32,
}

/// A kernel argument as the launch wants it: a pointer to the value.
pub(super) fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

fn too_small(what: &str, need: usize, have: usize) -> Error {
    Error::Gpu(format!("GPU kernel {what}: needs {need} elements, the buffer has {have}"))
}

pub(super) fn need<T: DevElem>(what: &str, buf: &DevBuf<T>, n: usize) -> Result<()> {
    if buf.len() < n {
        Err(too_small(what, n, buf.len()))
    } else {
        Ok(())
    }
}

pub(super) fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Gpu(format!("GPU kernel {what}: {v} does not fit a 32-bit index")))
}

pub(super) fn blocks(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Gpu(format!("GPU kernel {what}: {v} blocks are too many")))
}

/// Rows (or any count) of at least one block.
pub(super) fn grid_for(n: u64, threads: u32, cap: u32) -> u32 {
    n.div_ceil(u64::from(threads)).clamp(1, u64::from(cap)) as u32
}

impl Kernels {
    /// Compiles (once per process) and loads every entry point.
    pub fn load(device: &GpuDevice) -> Result<Self> {
        let opts = compile_options();
        let k = |entry: &str| tk::load(device, SOURCE, entry, &opts).map_err(tier_err);
        Ok(Kernels {
            embed: k("embed")?,
            gather_tokens: k("gather_tokens")?,
            layer_norm: k("layer_norm")?,
            gather_last: k("gather_last")?,
            store_kv: k("store_kv")?,
            transpose_heads: k("transpose_heads")?,
            softmax_rows: k("softmax_rows")?,
            attn_decode: k("attn_decode")?,
            argmax_rows: k("argmax_rows")?,
            bias_act_f16: k("bias_act_f16")?,
            bias_act_f32: k("bias_act_f32")?,
            fill_uniform_f16: k("fill_uniform_f16")?,
            fill_uniform_f32: k("fill_uniform_f32")?,
            fill_f16: k("fill_f16")?,
            fill_f32: k("fill_f32")?,
            multiprocessors: tk::multiprocessors(device).map_err(tier_err)?,
        })
    }

    fn launch(gpu: &Gpu, k: &Kernel, dims: LaunchDims, args: &mut [*mut c_void]) -> Result<()> {
        // SAFETY: every caller passes one pointer per kernel parameter, to a
        // local of the parameter's C type (u64 for pointers, i32 for int,
        // u64 for u64, f32 for float), built from buffers whose sizes it has
        // checked against what the kernel touches; the buffers are owned by
        // the engine and outlive the stream's work (nothing is freed before
        // the stream is synchronized or the owning struct is dropped, which
        // happens after the engine's last synchronization); the stream is
        // this GPU's.
        unsafe { k.launch(gpu.stream(), dims, args) }.map_err(tier_err)
    }

    /// Token (unless `tables.tokens` is `None`: `hidden` already holds the
    /// projected token embeddings) plus position embeddings of the step's
    /// `batch × new_len` tokens into `hidden` (f32) and `hidden16` (both
    /// `batch·new_len × h`, dense), and the step's mask into the key mask
    /// (`batch` rows of positions) at column `past`.
    pub fn embed(
        &self,
        gpu: &Gpu,
        step: &StepTokens<'_>,
        tables: &EmbedTables<'_>,
        (hidden, hidden16): (MatMut<'_, f32>, MatMut<'_, f16>),
        (key_mask, past): (MatMut<'_, u8>, usize),
    ) -> Result<()> {
        let (batch, new_len, h) = (step.batch, step.new_len, hidden.cols());
        let rows = batch.checked_mul(new_len).ok_or_else(|| Error::Gpu("embed: the step's rows overflow".into()))?;
        need("embed tokens", step.tokens, rows)?;
        need("embed step mask", step.step_mask, rows)?;
        need("embed past", step.past_real, batch)?;
        hidden.check_shape("embed hidden", rows, h)?;
        hidden.check_dense("embed hidden")?;
        hidden16.check_shape("embed hidden16", rows, h)?;
        hidden16.check_dense("embed hidden16")?;
        tables.positions.check_dense("embed position table")?;
        if tables.positions.cols() != h {
            return Err(Error::Gpu("embed: position table width differs from hidden".into()));
        }
        if past.checked_add(new_len).is_none_or(|end| end > key_mask.cols()) {
            return Err(Error::Gpu(format!(
                "embed: {past} + {new_len} positions overflow the cache's {}",
                key_mask.cols()
            )));
        }
        if key_mask.rows() < batch {
            return Err(Error::Gpu(format!("embed: a key mask of {} rows for {batch} sequences", key_mask.rows())));
        }
        if let Some(t) = &tables.tokens {
            t.check_dense("embed token table")?;
            if t.cols() != h {
                return Err(Error::Gpu("embed: token table width differs from hidden".into()));
            }
        }
        if rows == 0 {
            return Ok(());
        }
        let (mut a0, mut a1, mut a2) = (step.tokens.ptr(), step.step_mask.ptr(), step.past_real.ptr());
        let (mut a3, mut add) = match &tables.tokens {
            Some(t) => (t.ptr(), 1i32),
            // Not read where the tokens are not added.
            None => (0u64, 0i32),
        };
        let mut a4 = tables.positions.ptr();
        let (mut h_i, mut nl) = (int("embed", h)?, int("embed", new_len)?);
        let (mut hid, mut hid16, mut km) = (hidden.ptr(), hidden16.ptr(), key_mask.ptr());
        let (mut ms, mut past_i) = (int("embed", key_mask.ld())?, int("embed", past)?);
        let positions = tables.lookup;
        let (mut pos_offset, mut pad_row) = (int("embed", positions.offset)?, int("embed", positions.pad_row)?);
        if positions.pad_row >= tables.positions.rows() {
            return Err(Error::Gpu(format!("embed: padding row {} is outside the position table", positions.pad_row)));
        }
        Self::launch(
            gpu,
            &self.embed,
            LaunchDims::linear(blocks("embed", rows)?, 256),
            &mut [
                arg(&mut a0),
                arg(&mut a1),
                arg(&mut a2),
                arg(&mut a3),
                arg(&mut a4),
                arg(&mut h_i),
                arg(&mut nl),
                arg(&mut add),
                arg(&mut hid),
                arg(&mut hid16),
                arg(&mut km),
                arg(&mut ms),
                arg(&mut past_i),
                arg(&mut pos_offset),
                arg(&mut pad_row),
            ],
        )
    }

    /// Rows of `table` (`[vocab, e]`) picked by `tokens` into `out`.
    pub fn gather_tokens(
        &self,
        gpu: &Gpu,
        tokens: &DevBuf<u32>,
        rows: usize,
        table: &DevBuf<f16>,
        e: usize,
        out: &DevBuf<f16>,
    ) -> Result<()> {
        need("gather tokens", tokens, rows)?;
        need("gather out", out, rows * e)?;
        if rows == 0 {
            return Ok(());
        }
        let (mut t, mut tab, mut e_i, mut o) = (tokens.ptr(), table.ptr(), int("gather", e)?, out.ptr());
        Self::launch(
            gpu,
            &self.gather_tokens,
            LaunchDims::linear(blocks("gather", rows)?, 256),
            &mut [arg(&mut t), arg(&mut tab), arg(&mut e_i), arg(&mut o)],
        )
    }

    /// Layer norm of the rows of `x` (dense, epsilon `eps`, with the
    /// weight and bias of `affine`) into `y16`, and into `y32` too where
    /// given (`x` itself: the post-LN norm in place); the outputs dense, of
    /// `x`'s shape.
    pub fn layer_norm(
        &self,
        gpu: &Gpu,
        x: Mat<'_, f32>,
        eps: f32,
        affine: Option<(&DevBuf<f16>, &DevBuf<f16>)>,
        y16: MatMut<'_, f16>,
        y32: Option<MatMut<'_, f32>>,
    ) -> Result<()> {
        let (rows, dim) = (x.rows(), x.cols());
        x.check_dense("layer norm x")?;
        y16.check_shape("layer norm y", rows, dim)?;
        y16.check_dense("layer norm y")?;
        if let Some(y32) = &y32 {
            y32.check_shape("layer norm y32", rows, dim)?;
            y32.check_dense("layer norm y32")?;
        }
        if let Some((w, b)) = affine {
            need("layer norm weight", w, dim)?;
            need("layer norm bias", b, dim)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let (mut xp, mut d, mut eps) = (x.ptr(), int("layer norm", dim)?, eps);
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::Gpu(format!("layer norm: epsilon {eps} is not a finite non-negative number")));
        }
        let (mut w, mut b) = affine.map_or((0, 0), |(w, b)| (w.ptr(), b.ptr()));
        let (mut y32, mut y) = (y32.map_or(0, |y| y.ptr()), y16.ptr());
        if dim > 16 * 1024 {
            return Err(Error::Gpu(format!("layer norm: width {dim} is more than the kernel's {}", 16 * 1024)));
        }
        // Many rows (prefill): 16 values a thread, blocks of 256 for 4096
        // wide rows; few rows (decoding): 4 a thread, for more threads in
        // flight per row.
        let per_thread = if rows >= 1024 { 16 } else { 4 };
        let threads = dim.div_ceil(per_thread).next_multiple_of(32).clamp(32, 1024) as u32;
        Self::launch(
            gpu,
            &self.layer_norm,
            LaunchDims::linear(blocks("layer norm", rows)?, threads),
            &mut [arg(&mut xp), arg(&mut d), arg(&mut eps), arg(&mut w), arg(&mut b), arg(&mut y32), arg(&mut y)],
        )
    }

    /// The last of each sequence's `new_len` rows of `hidden`, as f32 and
    /// f16.
    pub fn gather_last(
        &self,
        gpu: &Gpu,
        hidden: &DevBuf<f32>,
        dims: (usize, usize, usize),
        out32: &DevBuf<f32>,
        out16: &DevBuf<f16>,
    ) -> Result<()> {
        let (batch, new_len, h) = dims;
        need("gather last hidden", hidden, batch * new_len * h)?;
        need("gather last out", out32, batch * h)?;
        need("gather last out16", out16, batch * h)?;
        if batch == 0 || new_len == 0 {
            return Ok(());
        }
        let (mut hp, mut nl, mut h_i, mut o32, mut o16) =
            (hidden.ptr(), int("gather last", new_len)?, int("gather last", h)?, out32.ptr(), out16.ptr());
        Self::launch(
            gpu,
            &self.gather_last,
            LaunchDims::linear(blocks("gather last", batch)?, 256),
            &mut [arg(&mut hp), arg(&mut nl), arg(&mut h_i), arg(&mut o32), arg(&mut o16)],
        )
    }

    /// This step's keys and values (from the fused qkv rows, `batch ·
    /// new_len × 3·hidden`, dense) into the cache at positions `at`
    /// (`new_len` of them); the fused rows hold as many kv heads as query heads.
    pub fn store_kv(&self, gpu: &Gpu, qkv: Mat<'_, f16>, cache: &KvView<'_, f16>, at: Range<usize>) -> Result<()> {
        let shape = cache.shape();
        let (batch, heads, hd, cap) = (cache.batch(), shape.heads, shape.head_dim, cache.capacity());
        if shape.kv_heads != heads {
            return Err(Error::Gpu(format!("store kv: {heads} query heads over {} kv heads", shape.kv_heads)));
        }
        let (past, new_len) = (at.start, at.len());
        if at.start > at.end || at.end > cap {
            return Err(Error::Gpu(format!("store kv: positions {at:?} overflow the cache's {cap}")));
        }
        let hidden = shape.q_width()?;
        let rows = batch.checked_mul(new_len).ok_or_else(|| Error::Gpu("store kv: the step's rows overflow".into()))?;
        let width = hidden.checked_mul(3).ok_or_else(|| Error::Gpu("store kv: the qkv width overflows".into()))?;
        qkv.check_shape("store kv qkv", rows, width)?;
        qkv.check_dense("store kv qkv")?;
        if rows == 0 {
            return Ok(());
        }
        let vec8 = hd.is_multiple_of(8);
        let (mut q, mut hid, mut he, mut hd_i) =
            (qkv.ptr(), int("store kv", hidden)?, int("kv", heads)?, int("kv", hd)?);
        let (mut nl, mut p, mut c) = (int("kv", new_len)?, int("kv", past)?, int("kv", cap)?);
        let (mut k, mut v, mut v8) = (cache.keys().ptr(), cache.values().ptr(), i32::from(vec8));
        let per_thread = if vec8 { 8 } else { 1 };
        let threads = (hidden / per_thread).clamp(32, 256).next_multiple_of(32) as u32;
        Self::launch(
            gpu,
            &self.store_kv,
            LaunchDims::linear(blocks("store kv", rows)?, threads),
            &mut [
                arg(&mut q),
                arg(&mut hid),
                arg(&mut he),
                arg(&mut hd_i),
                arg(&mut nl),
                arg(&mut p),
                arg(&mut c),
                arg(&mut k),
                arg(&mut v),
                arg(&mut v8),
            ],
        )
    }

    /// `batch × new_len` rows of `heads × hd` values (`src`, rows `ld`
    /// apart) to `[batch][heads][new_len][hd]` in `dst`.
    pub fn to_heads(
        &self,
        gpu: &Gpu,
        src: Mat<'_, f16>,
        dst: &DevBuf<f16>,
        dims: (usize, usize, usize, usize),
    ) -> Result<()> {
        self.transpose_heads(gpu, src, dst, dims, true)
    }

    /// The inverse of [`Kernels::to_heads`]: `[batch][heads][new_len][hd]`
    /// in `src` to `batch × new_len` rows of `heads × hd` values (`dst`,
    /// rows `ld` apart).
    pub fn from_heads(
        &self,
        gpu: &Gpu,
        src: &DevBuf<f16>,
        dst: MatMut<'_, f16>,
        dims: (usize, usize, usize, usize),
    ) -> Result<()> {
        self.transpose_heads(gpu, dst.as_mat(), src, dims, false)
    }

    /// Rows (`rows`, the row side) to heads (`heads`) where `to_heads`,
    /// else back.
    fn transpose_heads(
        &self,
        gpu: &Gpu,
        rows_side: Mat<'_, f16>,
        head_buf: &DevBuf<f16>,
        (batch, new_len, heads, hd): (usize, usize, usize, usize),
        to_heads: bool,
    ) -> Result<()> {
        let overflow = || Error::Gpu("transpose heads: the sizes overflow".into());
        let hidden = heads.checked_mul(hd).ok_or_else(overflow)?;
        let rows = batch.checked_mul(new_len).ok_or_else(overflow)?;
        rows_side.check_shape("transpose rows", rows, hidden)?;
        need("transpose heads", head_buf, rows.checked_mul(hidden).ok_or_else(overflow)?)?;
        if rows == 0 {
            return Ok(());
        }
        let ld = rows_side.ld();
        let vec8 = hd.is_multiple_of(8) && ld.is_multiple_of(8);
        let (src, dst) = if to_heads { (rows_side.ptr(), head_buf.ptr()) } else { (head_buf.ptr(), rows_side.ptr()) };
        let (mut sp, mut dp, mut ld_i) = (src, dst, int("transpose", ld)?);
        let (mut nl, mut he, mut hd_i) = (int("transpose", new_len)?, int("transpose", heads)?, int("transpose", hd)?);
        let (mut th, mut v8) = (i32::from(to_heads), i32::from(vec8));
        let per_thread = if vec8 { 8 } else { 1 };
        let threads = (hidden / per_thread).clamp(32, 256).next_multiple_of(32) as u32;
        Self::launch(
            gpu,
            &self.transpose_heads,
            LaunchDims::linear(blocks("transpose", rows)?, threads),
            &mut [
                arg(&mut sp),
                arg(&mut dp),
                arg(&mut ld_i),
                arg(&mut nl),
                arg(&mut he),
                arg(&mut hd_i),
                arg(&mut th),
                arg(&mut v8),
            ],
        )
    }

    /// Masked softmax in place of the score rows `at` (`scores`: `[seqs]
    /// [heads][new_len]` rows of `total` keys, dense; see `kernels.cu`),
    /// the key mask's row `at.first + b` masking sequence `b`'s keys.
    pub fn softmax_rows(&self, gpu: &Gpu, scores: MatMut<'_, f16>, at: ScoreRows, mask: Mat<'_, u8>) -> Result<()> {
        let (rows, total) = (at.rows()?, scores.cols());
        scores.check_shape("softmax scores", rows, total)?;
        scores.check_dense("softmax scores")?;
        if total > 8 * 1024 {
            return Err(Error::Gpu(format!("softmax: {total} keys are more than the kernel's 8192")));
        }
        if rows == 0 || total == 0 {
            return Ok(());
        }
        if at.first.checked_add(at.seqs).is_none_or(|end| end > mask.rows()) || total > mask.cols() {
            return Err(Error::Gpu(format!(
                "softmax: sequences {}..+{} over {total} keys, a key mask of {}x{}",
                at.first,
                at.seqs,
                mask.rows(),
                mask.cols()
            )));
        }
        let threads = (total.div_ceil(8)).next_multiple_of(32).clamp(32, 1024) as u32;
        let (mut s, mut t, mut nl, mut he, mut p) = (
            scores.ptr(),
            int("softmax", total)?,
            int("softmax", at.new_len)?,
            int("softmax", at.heads)?,
            int("sm", at.past)?,
        );
        let (mut m, mut st, mut b) = (mask.ptr(), int("softmax", mask.ld())?, int("softmax", at.first)?);
        Self::launch(
            gpu,
            &self.softmax_rows,
            LaunchDims::linear(blocks("softmax", rows)?, threads),
            &mut [
                arg(&mut s),
                arg(&mut t),
                arg(&mut nl),
                arg(&mut he),
                arg(&mut p),
                arg(&mut m),
                arg(&mut st),
                arg(&mut b),
            ],
        )
    }

    /// Attention of one new token per sequence over `attn.total` cached
    /// positions of `kv` (this step's included): queries from the fused
    /// qkv rows (`batch × 3·hidden`, dense), into `out` (`batch × hidden`,
    /// dense); the fused rows hold as many kv heads as query heads.
    pub fn attn_decode(
        &self,
        gpu: &Gpu,
        qkv: Mat<'_, f16>,
        kv: &KvView<'_, f16>,
        attn: &DecodeAttn<'_>,
        out: MatMut<'_, f16>,
    ) -> Result<()> {
        let shape = kv.shape();
        let (batch, heads, hd, cap, total) = (kv.batch(), shape.heads, shape.head_dim, kv.capacity(), attn.total);
        if shape.kv_heads != heads {
            return Err(Error::Gpu(format!("attn_decode: {heads} query heads over {} kv heads", shape.kv_heads)));
        }
        let hidden = shape.q_width()?;
        if !decode_kernel_fits(hd) {
            return Err(Error::Gpu(format!("attn_decode: head size {hd} is not supported by the kernel")));
        }
        let width = hidden.checked_mul(3).ok_or_else(|| Error::Gpu("attn_decode: the qkv width overflows".into()))?;
        qkv.check_shape("attn qkv", batch, width)?;
        qkv.check_dense("attn qkv")?;
        out.check_shape("attn out", batch, hidden)?;
        out.check_dense("attn out")?;
        let mask = attn.mask;
        if mask.rows() < batch {
            return Err(Error::Gpu(format!("attn_decode: a key mask of {} rows for {batch} sequences", mask.rows())));
        }
        if total > cap || total > mask.cols() {
            return Err(Error::Gpu(format!("attn_decode: {total} positions overflow the cache's {cap}")));
        }
        if batch == 0 || heads == 0 {
            return Ok(());
        }
        let groups = ATTN_THREADS as usize / (hd / 8);
        let shared = (total + groups * hd) * 4;
        if shared > 48 * 1024 {
            return Err(Error::Gpu(format!("attn_decode: {total} positions need more shared memory than 48 KiB")));
        }
        let (mut q, mut hid, mut k, mut v) = (qkv.ptr(), int("attn", hidden)?, kv.keys().ptr(), kv.values().ptr());
        let (mut m, mut ms, mut c, mut t) =
            (mask.ptr(), int("attn", mask.ld())?, int("attn", cap)?, int("attn", total)?);
        let (mut he, mut hd_i, mut sc, mut o) = (int("attn", heads)?, int("attn", hd)?, attn.scale, out.ptr());
        let dims = LaunchDims {
            grid: (blocks("attn", heads)?, blocks("attn", batch)?, 1),
            block: (ATTN_THREADS, 1, 1),
            shared_bytes: shared as u32,
        };
        Self::launch(
            gpu,
            &self.attn_decode,
            dims,
            &mut [
                arg(&mut q),
                arg(&mut hid),
                arg(&mut k),
                arg(&mut v),
                arg(&mut m),
                arg(&mut ms),
                arg(&mut c),
                arg(&mut t),
                arg(&mut he),
                arg(&mut hd_i),
                arg(&mut sc),
                arg(&mut o),
            ],
        )
    }

    /// The first index of each row's largest value.
    pub fn argmax_rows(&self, gpu: &Gpu, logits: &DevBuf<f32>, rows: usize, n: usize, out: &DevBuf<u32>) -> Result<()> {
        need("argmax logits", logits, rows * n)?;
        need("argmax out", out, rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (mut l, mut n_i, mut o) = (logits.ptr(), int("argmax", n)?, out.ptr());
        Self::launch(
            gpu,
            &self.argmax_rows,
            LaunchDims::linear(blocks("argmax", rows)?, 1024),
            &mut [arg(&mut l), arg(&mut n_i), arg(&mut o)],
        )
    }

    fn grid_stride(&self, n: u64) -> u32 {
        grid_for(n, 256, self.multiprocessors * 16)
    }

    /// `y = act(y + bias)` over the f16 rows of `y` (dense; `bias` one value
    /// per column).
    pub fn bias_act_f16(&self, gpu: &Gpu, y: MatMut<'_, f16>, bias: Option<&DevBuf<f16>>, relu: bool) -> Result<()> {
        self.bias_act(gpu, &self.bias_act_f16, (y.as_mat(), bias), relu)
    }

    /// `y = act(y + bias)` over the f32 rows of `y` (dense; `bias` one value
    /// per column).
    pub fn bias_act_f32(&self, gpu: &Gpu, y: MatMut<'_, f32>, bias: Option<&DevBuf<f32>>, relu: bool) -> Result<()> {
        self.bias_act(gpu, &self.bias_act_f32, (y.as_mat(), bias), relu)
    }

    fn bias_act<E: DevElem>(
        &self,
        gpu: &Gpu,
        kernel: &Kernel,
        (y, bias): (Mat<'_, E>, Option<&DevBuf<E>>),
        relu: bool,
    ) -> Result<()> {
        let (rows, n) = (y.rows(), y.cols());
        y.check_dense("bias y")?;
        if let Some(b) = bias {
            need("bias", b, n)?;
        }
        // Inside the buffer (the view is), so no overflow.
        let total = rows * n;
        if total == 0 {
            return Ok(());
        }
        let (mut yp, mut bp, mut r, mut n_i, mut act) =
            (y.ptr(), bias.map_or(0, DevBuf::ptr), rows as u64, int("bias", n)?, i32::from(relu));
        Self::launch(
            gpu,
            kernel,
            LaunchDims::linear(self.grid_stride(total as u64), 256),
            &mut [arg(&mut yp), arg(&mut bp), arg(&mut r), arg(&mut n_i), arg(&mut act)],
        )
    }

    /// Seeded uniform values in ±`scale` (f16-rounded) over all of `out`.
    pub fn fill_uniform_f16(&self, gpu: &Gpu, out: &DevBuf<f16>, seed: u64, scale: f32) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let (mut o, mut n, mut s, mut sc) = (out.ptr(), out.len() as u64, seed, scale);
        Self::launch(
            gpu,
            &self.fill_uniform_f16,
            LaunchDims::linear(self.grid_stride(out.len() as u64), 256),
            &mut [arg(&mut o), arg(&mut n), arg(&mut s), arg(&mut sc)],
        )
    }

    /// As [`Kernels::fill_uniform_f16`], stored as f32.
    pub fn fill_uniform_f32(&self, gpu: &Gpu, out: &DevBuf<f32>, seed: u64, scale: f32) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let (mut o, mut n, mut s, mut sc) = (out.ptr(), out.len() as u64, seed, scale);
        Self::launch(
            gpu,
            &self.fill_uniform_f32,
            LaunchDims::linear(self.grid_stride(out.len() as u64), 256),
            &mut [arg(&mut o), arg(&mut n), arg(&mut s), arg(&mut sc)],
        )
    }

    /// Every element of `out` set to `value`.
    pub fn fill_f16(&self, gpu: &Gpu, out: &DevBuf<f16>, value: f32) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let (mut o, mut n, mut v) = (out.ptr(), out.len() as u64, value);
        Self::launch(
            gpu,
            &self.fill_f16,
            LaunchDims::linear(self.grid_stride(out.len() as u64), 256),
            &mut [arg(&mut o), arg(&mut n), arg(&mut v)],
        )
    }

    /// Every element of `out` set to `value`.
    pub fn fill_f32(&self, gpu: &Gpu, out: &DevBuf<f32>, value: f32) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let (mut o, mut n, mut v) = (out.ptr(), out.len() as u64, value);
        Self::launch(
            gpu,
            &self.fill_f32,
            LaunchDims::linear(self.grid_stride(out.len() as u64), 256),
            &mut [arg(&mut o), arg(&mut n), arg(&mut v)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_compiles_or_nvrtc_is_missing() {
        if !tk::nvrtc_available() {
            println!("skipped: no NVRTC");
            return;
        }
        if tk::cuda_include_dir().is_none() {
            println!("skipped: no CUDA headers");
            return;
        }
        let ptx = tk::compile_ptx(SOURCE, &compile_options(), "compute_80").unwrap_or_else(|e| panic!("{e}"));
        for entry in ENTRIES {
            assert!(ptx.contains(&format!(".entry {entry}(")), "{entry} missing from the PTX");
        }
    }

    #[test]
    fn decode_kernel_head_sizes() {
        for hd in [8, 16, 32, 64, 128, 256] {
            assert!(decode_kernel_fits(hd), "{hd}");
        }
        for hd in [4, 12, 24, 80, 96, 512] {
            assert!(!decode_kernel_fits(hd), "{hd}");
        }
    }
}
