//! The engine's NVRTC kernels (`kernels.cu`, compiled once per process and
//! GPU by `tier_cuda::kernels`) and their launchers. Each launcher checks
//! the sizes of the buffers it is given against what the kernel will touch,
//! so the one `unsafe` launch in each is sound whenever its arguments come
//! from [`DevBuf`]s of the engine.

use std::ffi::c_void;

use half::f16;
use tier_cuda::kernels::{self as tk, CompileOptions, Kernel, LaunchDims};
use tier_cuda::GpuDevice;

use super::buffer::{DevBuf, DevElem};
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

    /// Token (unless `add_tokens` is false: `hidden` already holds the
    /// projected token embeddings) plus position embeddings of `batch ×
    /// new_len` tokens into `hidden` (f32) and `hidden16`, and this step's
    /// mask into the key mask at column `past`.
    #[allow(clippy::too_many_arguments)]
    pub fn embed(
        &self,
        gpu: &Gpu,
        tokens: &DevBuf<u32>,
        step_mask: &DevBuf<u8>,
        past_real: &DevBuf<i32>,
        tok_table: &DevBuf<f16>,
        pos_table: &DevBuf<f16>,
        dims: (usize, usize, usize),
        add_tokens: bool,
        hidden: &DevBuf<f32>,
        hidden16: &DevBuf<f16>,
        key_mask: (&DevBuf<u8>, usize, usize),
        positions: LearnedPositions,
    ) -> Result<()> {
        let (batch, new_len, h) = dims;
        let (mask, mask_stride, past) = key_mask;
        let rows = batch * new_len;
        need("embed tokens", tokens, rows)?;
        need("embed step mask", step_mask, rows)?;
        need("embed past", past_real, batch)?;
        need("embed hidden", hidden, rows * h)?;
        need("embed hidden16", hidden16, rows * h)?;
        if past + new_len > mask_stride {
            return Err(Error::Gpu(format!("embed: {past} + {new_len} positions overflow the cache's {mask_stride}")));
        }
        need("embed key mask", mask, batch * mask_stride)?;
        if add_tokens && !tok_table.len().is_multiple_of(h) {
            return Err(Error::Gpu("embed: token table width differs from hidden".into()));
        }
        if rows == 0 {
            return Ok(());
        }
        let (mut a0, mut a1, mut a2, mut a3, mut a4) =
            (tokens.ptr(), step_mask.ptr(), past_real.ptr(), tok_table.ptr(), pos_table.ptr());
        let (mut h_i, mut nl, mut add) = (int("embed", h)?, int("embed", new_len)?, i32::from(add_tokens));
        let (mut hid, mut hid16, mut km) = (hidden.ptr(), hidden16.ptr(), mask.ptr());
        let (mut ms, mut past_i) = (int("embed", mask_stride)?, int("embed", past)?);
        let (mut pos_offset, mut pad_row) = (int("embed", positions.offset)?, int("embed", positions.pad_row)?);
        if positions.pad_row.saturating_mul(h) >= pos_table.len() {
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

    /// Layer norm of `rows` rows of `x` (`dim` wide, epsilon `eps`) into
    /// `y16`, and with `write_back` into `x` too.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        gpu: &Gpu,
        x: &DevBuf<f32>,
        rows: usize,
        (dim, eps): (usize, f32),
        affine: Option<(&DevBuf<f16>, &DevBuf<f16>)>,
        write_back: bool,
        y16: &DevBuf<f16>,
    ) -> Result<()> {
        need("layer norm x", x, rows * dim)?;
        need("layer norm y", y16, rows * dim)?;
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
        let (mut y32, mut y) = (if write_back { x.ptr() } else { 0 }, y16.ptr());
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

    /// This step's keys and values (from the fused qkv rows) into the cache
    /// at positions `past..past + new_len`.
    #[allow(clippy::too_many_arguments)]
    pub fn store_kv(
        &self,
        gpu: &Gpu,
        qkv: &DevBuf<f16>,
        batch: usize,
        new_len: usize,
        heads: usize,
        hd: usize,
        past: usize,
        cap: usize,
        kc: &DevBuf<f16>,
        vc: &DevBuf<f16>,
    ) -> Result<()> {
        let hidden = heads * hd;
        let rows = batch * new_len;
        need("store kv qkv", qkv, rows * 3 * hidden)?;
        if past + new_len > cap {
            return Err(Error::Gpu(format!("store kv: {past} + {new_len} positions overflow the cache's {cap}")));
        }
        need("store kv keys", kc, batch * heads * cap * hd)?;
        need("store kv values", vc, batch * heads * cap * hd)?;
        if rows == 0 {
            return Ok(());
        }
        let vec8 = hd.is_multiple_of(8);
        let (mut q, mut hid, mut he, mut hd_i) =
            (qkv.ptr(), int("store kv", hidden)?, int("kv", heads)?, int("kv", hd)?);
        let (mut nl, mut p, mut c) = (int("kv", new_len)?, int("kv", past)?, int("kv", cap)?);
        let (mut k, mut v, mut v8) = (kc.ptr(), vc.ptr(), i32::from(vec8));
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

    /// `batch × new_len` rows of `heads × hd` values (row pitch `ld`) to
    /// `[batch][heads][new_len][hd]` (`to_heads`), or back.
    #[allow(clippy::too_many_arguments)]
    pub fn transpose_heads(
        &self,
        gpu: &Gpu,
        src: &DevBuf<f16>,
        dst: &DevBuf<f16>,
        ld: usize,
        (batch, new_len, heads, hd): (usize, usize, usize, usize),
        to_heads: bool,
    ) -> Result<()> {
        let hidden = heads * hd;
        let rows = batch * new_len;
        if ld < hidden {
            return Err(Error::Gpu(format!("transpose heads: row pitch {ld} below width {hidden}")));
        }
        let (row_buf, head_buf) = if to_heads { (src, dst) } else { (dst, src) };
        if rows > 0 {
            need("transpose rows", row_buf, (rows - 1) * ld + hidden)?;
        }
        need("transpose heads", head_buf, rows * hidden)?;
        if rows == 0 {
            return Ok(());
        }
        let vec8 = hd.is_multiple_of(8) && ld.is_multiple_of(8);
        let (mut sp, mut dp, mut ld_i) = (src.ptr(), dst.ptr(), int("transpose", ld)?);
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

    /// Masked softmax of `rows` f16 score rows of `total` keys, in place
    /// (see `kernels.cu`). `b0` is the first sequence of the chunk.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_rows(
        &self,
        gpu: &Gpu,
        scores: &DevBuf<f16>,
        rows: usize,
        total: usize,
        new_len: usize,
        heads: usize,
        past: usize,
        key_mask: (&DevBuf<u8>, usize),
        b0: usize,
    ) -> Result<()> {
        let (mask, stride) = key_mask;
        need("softmax scores", scores, rows * total)?;
        if total > 8 * 1024 {
            return Err(Error::Gpu(format!("softmax: {total} keys are more than the kernel's 8192")));
        }
        if rows == 0 || total == 0 {
            return Ok(());
        }
        need("softmax key mask", mask, (b0 + rows / (new_len * heads)) * stride)?;
        let threads = (total.div_ceil(8)).next_multiple_of(32).clamp(32, 1024) as u32;
        let (mut s, mut t, mut nl, mut he, mut p) =
            (scores.ptr(), int("softmax", total)?, int("softmax", new_len)?, int("softmax", heads)?, int("sm", past)?);
        let (mut m, mut st, mut b) = (mask.ptr(), int("softmax", stride)?, int("softmax", b0)?);
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

    /// Attention of one new token per sequence over `total` cached positions
    /// (this step's included), into `out` (`[batch, hidden]`).
    #[allow(clippy::too_many_arguments)]
    pub fn attn_decode(
        &self,
        gpu: &Gpu,
        qkv: &DevBuf<f16>,
        (kc, vc): (&DevBuf<f16>, &DevBuf<f16>),
        key_mask: (&DevBuf<u8>, usize),
        (batch, heads, hd, cap, total): (usize, usize, usize, usize, usize),
        scale: f32,
        out: &DevBuf<f16>,
    ) -> Result<()> {
        let hidden = heads * hd;
        if !decode_kernel_fits(hd) {
            return Err(Error::Gpu(format!("attn_decode: head size {hd} is not supported by the kernel")));
        }
        need("attn qkv", qkv, batch * 3 * hidden)?;
        need("attn keys", kc, batch * heads * cap * hd)?;
        need("attn values", vc, batch * heads * cap * hd)?;
        need("attn mask", key_mask.0, batch * key_mask.1)?;
        need("attn out", out, batch * hidden)?;
        if total > cap || total > key_mask.1 {
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
        let (mut q, mut hid, mut k, mut v) = (qkv.ptr(), int("attn", hidden)?, kc.ptr(), vc.ptr());
        let (mut m, mut ms, mut c, mut t) =
            (key_mask.0.ptr(), int("attn", key_mask.1)?, int("attn", cap)?, int("attn", total)?);
        let (mut he, mut hd_i, mut sc, mut o) = (int("attn", heads)?, int("attn", hd)?, scale, out.ptr());
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

    /// `y = act(y + bias)` over `rows × n` f16 values.
    pub fn bias_act_f16(
        &self,
        gpu: &Gpu,
        y: &DevBuf<f16>,
        bias: Option<&DevBuf<f16>>,
        rows: usize,
        n: usize,
        relu: bool,
    ) -> Result<()> {
        need("bias y", y, rows * n)?;
        if let Some(b) = bias {
            need("bias", b, n)?;
        }
        if rows * n == 0 {
            return Ok(());
        }
        let (mut yp, mut bp, mut r, mut n_i, mut act) =
            (y.ptr(), bias.map_or(0, DevBuf::ptr), rows as u64, int("bias", n)?, i32::from(relu));
        Self::launch(
            gpu,
            &self.bias_act_f16,
            LaunchDims::linear(self.grid_stride((rows * n) as u64), 256),
            &mut [arg(&mut yp), arg(&mut bp), arg(&mut r), arg(&mut n_i), arg(&mut act)],
        )
    }

    /// `y = act(y + bias)` over `rows × n` f32 values.
    pub fn bias_act_f32(
        &self,
        gpu: &Gpu,
        y: &DevBuf<f32>,
        bias: Option<&DevBuf<f32>>,
        rows: usize,
        n: usize,
        relu: bool,
    ) -> Result<()> {
        need("bias y", y, rows * n)?;
        if let Some(b) = bias {
            need("bias", b, n)?;
        }
        if rows * n == 0 {
            return Ok(());
        }
        let (mut yp, mut bp, mut r, mut n_i, mut act) =
            (y.ptr(), bias.map_or(0, DevBuf::ptr), rows as u64, int("bias", n)?, i32::from(relu));
        Self::launch(
            gpu,
            &self.bias_act_f32,
            LaunchDims::linear(self.grid_stride((rows * n) as u64), 256),
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
