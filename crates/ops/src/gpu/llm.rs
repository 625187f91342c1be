//! The kernels of decoders with RMSNorm, rotary embeddings, grouped-query
//! attention and a gated MLP, in f16 and bf16 (`llm.cu`), and their
//! launchers.
//!
//! The source is compiled and loaded on first use ([`Gpu::llm`]), so a run
//! that never asks for them pays nothing. Each kernel has an entry
//! point per 16-bit type, `<name>_f16` and `<name>_bf16` (the type's
//! [`Half::SUFFIX`]); the launchers are generic over [`Half`] and pick it.
//! Arithmetic is f32 with each result rounded once to the storage type, as
//! the CPU reference ([`crate::cpu`]) computes. Every launcher checks the
//! buffers it is given against what the kernel touches, so the one `unsafe`
//! launch is sound whenever its arguments are live [`DevBuf`]s. Matrices,
//! caches and the attention's parameters come as views ([`Mat`],
//! [`MatMut`], [`KvView`], [`Rotary`], [`DecodeAttn`]; see
//! [`super::view`]), whose bounds are checked when made; the launchers
//! check their shapes against each other.

use std::ffi::c_void;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use tier_api::DType;
use tier_cuda::kernels::{self as tk, Kernel, LaunchDims};
use tier_cuda::GpuDevice;

use super::buffer::{DevBuf, DevElem, Half};
use super::kernels::{arg, blocks, compile_options, grid_for, int, need};
use super::view::{DecodeAttn, KvShape, KvView, Mat, MatMut, Rotary, ScoreRows};
use super::{tier_err, Gpu};
use crate::error::{Error, Result};

/// The CUDA C++ source of the kernels here.
pub const LLM_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("llm.cu"));

/// The kernels with an entry point per 16-bit type (`<name>_f16`,
/// `<name>_bf16`).
pub const LLM_TYPED: &[&str] = &[
    "embed_rows",
    "rms_norm_f32",
    "rms_norm_inplace",
    "rope",
    "split_qkv",
    "silu_mul",
    "add_bias",
    "store_kv",
    "transpose_heads",
    "softmax_causal",
    "attn_split",
    "attn_combine",
    "fill_uniform",
    "fill",
];

/// Every entry point of `llm.cu`, in the order [`LlmKernels`] loads them.
pub const LLM_ENTRIES: &[&str] = &[
    "write_mask",
    "embed_rows_f16",
    "rms_norm_f32_f16",
    "rms_norm_inplace_f16",
    "rope_f16",
    "split_qkv_f16",
    "silu_mul_f16",
    "add_bias_f16",
    "store_kv_f16",
    "transpose_heads_f16",
    "softmax_causal_f16",
    "attn_split_f16",
    "attn_combine_f16",
    "fill_uniform_f16",
    "fill_f16",
    "embed_rows_bf16",
    "rms_norm_f32_bf16",
    "rms_norm_inplace_bf16",
    "rope_bf16",
    "split_qkv_bf16",
    "silu_mul_bf16",
    "add_bias_bf16",
    "store_kv_bf16",
    "transpose_heads_bf16",
    "softmax_causal_bf16",
    "attn_split_bf16",
    "attn_combine_bf16",
    "fill_uniform_bf16",
    "fill_bf16",
];

/// Threads per block of the decode attention kernel `attn_split` (8 warps;
/// the kernel's `ATTN_THREADS`).
const ATTN_THREADS: usize = 256;

/// Rows of the cache each group of lanes of `attn_split` loads at a time
/// (the kernel's `ATTN_ROWS`).
const ATTN_ROWS: usize = 2;

/// Threads per block of `attn_combine`, the kernel merging the chunks.
const COMBINE_THREADS: u32 = 128;

/// Fixed cost of a decode attention block besides its rows (loading q and
/// its first rows, merging its groups, writing its result), in steps of
/// its loop; the launcher weighs more chunks against it.
const ATTN_OVERHEAD_STEPS: usize = 2;

/// Cost of merging the chunks (`attn_combine`, and the pause between two
/// kernels), in steps of a decode attention block's loop: about 5 us on
/// an H100, measured.
const ATTN_COMBINE_STEPS: usize = 3;

/// Waves of decode attention blocks past which the launcher cuts the
/// positions no finer: more chunks would add only overhead.
const ATTN_MAX_WAVES: usize = 4;

/// Most chunks one (sequence, head) is cut into: `attn_combine` keeps a
/// weight per chunk in shared memory (16 KiB at most).
const ATTN_MAX_SPLITS: usize = 4096;

/// Most positions the decode attention kernel takes: its indices are 32-bit,
/// with room for the end of the last chunk (below twice the positions) and
/// a few steps past the end.
const ATTN_MAX_TOTAL: usize = 1 << 30;

/// Widest row (in values) the RMSNorm kernels give a warp rather than a
/// block.
const RMS_WARP_MAX: usize = 256;

/// Keys per row up to which the softmax kernel keeps a row in registers
/// (8 per thread of 1024); longer rows take three passes over memory.
const SOFTMAX_REGISTER_KEYS: usize = 8 * 1024;

/// Lanes sharing one key row in the decode attention kernel: `head_dim / 8`
/// rounded up to a power of two.
fn attn_group(head_dim: usize) -> usize {
    (head_dim / 8).max(1).next_power_of_two()
}

/// Query heads of one group a decode attention block takes together (each
/// key and value row read once for all of them; the group's last block
/// takes what is left): 4, the kernel's most, or fewer where the group is
/// smaller (its size rounded up to a power of two) or a row has fewer
/// lanes (the kernel sums the heads' dot products over the lanes of a row,
/// leaving each head on lanes of its own).
fn attn_heads_per_block(group: usize, head_dim: usize) -> usize {
    4.min(attn_group(head_dim)).min(group.max(1).next_power_of_two())
}

/// Positions a decode attention block takes in one step of its loop:
/// `ATTN_ROWS` for each group of lanes.
fn attn_step(head_dim: usize) -> usize {
    ATTN_THREADS / attn_group(head_dim) * ATTN_ROWS
}

/// Bytes of dynamic shared memory of a decode attention block taking
/// `heads` query heads: each warp's sums, `attn_group · 8` f32 per head.
fn attn_shared_bytes(head_dim: usize, heads: usize) -> usize {
    (ATTN_THREADS / 32) * heads * attn_group(head_dim) * 8 * 4
}

/// Most chunks the launcher cuts the positions into where `blocks` blocks
/// take each chunk (one per sequence, kv head and heads a block) and
/// `slots` blocks run at once on the GPU: as many as make
/// `ATTN_MAX_WAVES` waves.
fn attn_max_splits(blocks: usize, slots: usize) -> usize {
    slots.max(1).saturating_mul(ATTN_MAX_WAVES).div_ceil(blocks.max(1)).clamp(1, ATTN_MAX_SPLITS)
}

/// Positions per block the launcher picks: of the cuts of `total` into n
/// chunks of whole steps ([`attn_step`]), n up to [`attn_max_splits`], the
/// one whose waves of blocks (`blocks · n` over `slots` at once, rounded
/// up) times each block's work (its steps plus `ATTN_OVERHEAD_STEPS`),
/// plus `ATTN_COMBINE_STEPS` where there are chunks to merge, is least, the
/// fewest chunks on a tie. One chunk where the sequences and
/// heads alone fill the GPU evenly; more where they leave it idle or end
/// in a ragged last wave.
fn attn_chunk(blocks: usize, total: usize, head_dim: usize, slots: usize) -> usize {
    let step = attn_step(head_dim);
    let steps = total.div_ceil(step).max(1);
    let (blocks, slots) = (blocks.max(1), slots.max(1));
    let mut best = (usize::MAX, steps);
    for n in 1..=attn_max_splits(blocks, slots).min(steps) {
        let per_chunk = steps.div_ceil(n);
        let chunks = steps.div_ceil(per_chunk);
        let waves = blocks.saturating_mul(chunks).div_ceil(slots);
        let merge = if chunks > 1 { ATTN_COMBINE_STEPS } else { 0 };
        let cost = waves.saturating_mul(per_chunk + ATTN_OVERHEAD_STEPS).saturating_add(merge);
        if cost < best.0 {
            best = (cost, per_chunk);
        }
    }
    best.1.saturating_mul(step)
}

/// Whether [`LlmKernels::attn_decode`] handles heads of `head_dim` over
/// `total` positions: `head_dim` a multiple of 8 from 8 to 256, and at most
/// 2^30 positions. Otherwise the caller takes the batched-product path
/// ([`super::blas::Blas::gemm_batched_half`] and
/// [`LlmKernels::softmax_causal`]).
pub fn attn_decode_fits(head_dim: usize, total: usize) -> bool {
    head_dim.is_multiple_of(8) && (8..=256).contains(&head_dim) && total <= ATTN_MAX_TOTAL
}

/// The entry points of one 16-bit type.
#[derive(Debug)]
struct Typed {
    embed_rows: Kernel,
    rms_norm_f32: Kernel,
    rms_norm_inplace: Kernel,
    rope: Kernel,
    split_qkv: Kernel,
    silu_mul: Kernel,
    add_bias: Kernel,
    store_kv: Kernel,
    transpose_heads: Kernel,
    softmax_causal: Kernel,
    attn_split: Kernel,
    attn_combine: Kernel,
    fill_uniform: Kernel,
    fill: Kernel,
}

impl Typed {
    fn load(device: &GpuDevice, suffix: &str) -> Result<Self> {
        let opts = compile_options();
        let k = |name: &str| tk::load(device, LLM_SOURCE, &format!("{name}_{suffix}"), &opts).map_err(tier_err);
        Ok(Typed {
            embed_rows: k("embed_rows")?,
            rms_norm_f32: k("rms_norm_f32")?,
            rms_norm_inplace: k("rms_norm_inplace")?,
            rope: k("rope")?,
            split_qkv: k("split_qkv")?,
            silu_mul: k("silu_mul")?,
            add_bias: k("add_bias")?,
            store_kv: k("store_kv")?,
            transpose_heads: k("transpose_heads")?,
            softmax_causal: k("softmax_causal")?,
            attn_split: k("attn_split")?,
            attn_combine: k("attn_combine")?,
            fill_uniform: k("fill_uniform")?,
            fill: k("fill")?,
        })
    }
}

/// The loaded f16/bf16 kernels of one GPU (both 16-bit types).
#[derive(Debug)]
pub struct LlmKernels {
    write_mask: Kernel,
    f16: Typed,
    bf16: Typed,
    multiprocessors: u32,
    /// Decode attention blocks that run at once on the GPU: its
    /// multiprocessors times the blocks each holds.
    attn_slots: usize,
    /// The decode attention's partial results per chunk of positions
    /// (f32), grown on demand; locked from its sizing to the launches that
    /// use it (all on the compute stream, in order).
    attn_scratch: Mutex<Option<DevBuf<f32>>>,
}

/// `a * b * ...`, or an error naming `what` where it overflows.
fn count(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Gpu(format!("GPU kernel {what}: the element count of {dims:?} overflows")))
}

/// `a + b`, or an error naming `what`.
fn add(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_add(b).ok_or_else(|| Error::Gpu(format!("GPU kernel {what}: {a} + {b} overflows")))
}

fn u64_of(v: usize) -> u64 {
    // usize is at most 64 bits on every target CUDA runs on.
    v as u64
}

fn aligned16<T: DevElem>(bufs: &[&DevBuf<T>]) -> bool {
    bufs.iter().all(|b| b.ptr().is_multiple_of(16))
}

fn aligned16_ptrs(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// An error naming `what` unless `m` is `rows × cols` and dense.
fn dense<T: DevElem>(what: &str, m: &Mat<'_, T>, rows: usize, cols: usize) -> Result<()> {
    m.check_shape(what, rows, cols)?;
    m.check_dense(what)
}

impl LlmKernels {
    /// Compiles `llm.cu` (once per process) and loads every entry point.
    pub fn load(device: &GpuDevice) -> Result<Self> {
        let opts = compile_options();
        let (f16, bf16) = (Typed::load(device, "f16")?, Typed::load(device, "bf16")?);
        let multiprocessors = tk::multiprocessors(device).map_err(tier_err)?;
        // The most shared memory a block takes (4 heads of 256).
        let shared = attn_shared_bytes(256, 4);
        let per_sm = [&f16, &bf16]
            .into_iter()
            .map(|t| t.attn_split.blocks_per_sm(ATTN_THREADS as u32, shared).map_err(tier_err))
            .try_fold(u32::MAX, |m, b| b.map(|b| m.min(b)))?;
        let slots = usize::try_from(multiprocessors.saturating_mul(per_sm.max(1))).unwrap_or(usize::MAX);
        Ok(LlmKernels {
            write_mask: tk::load(device, LLM_SOURCE, "write_mask", &opts).map_err(tier_err)?,
            f16,
            bf16,
            multiprocessors,
            attn_slots: slots,
            attn_scratch: Mutex::new(None),
        })
    }

    /// The entry points of `T`.
    fn typed<T: Half>(&self) -> Result<&Typed> {
        match T::DTYPE {
            DType::F16 => Ok(&self.f16),
            DType::BF16 => Ok(&self.bf16),
            other => Err(Error::Gpu(format!("GPU kernels: no entry points for {other:?} values"))),
        }
    }

    fn launch(gpu: &Gpu, k: &Kernel, dims: LaunchDims, args: &mut [*mut c_void]) -> Result<()> {
        // SAFETY: every caller passes one pointer per kernel parameter, in
        // order, to a local of the parameter's C type (u64 for pointers and
        // u64, i32 for int, f32 for float), built from buffers whose sizes
        // (and, where the kernel loads 16 bytes at a time, alignment) it
        // has checked against what the kernel touches with those arguments;
        // the buffers belong to the caller, who keeps them alive until the
        // stream's work is done (the engine drops buffers only after
        // synchronizing); the stream is this GPU's compute stream, on whose
        // device the kernel was loaded.
        unsafe { k.launch(gpu.stream(), dims, args) }.map_err(tier_err)
    }

    /// Blocks for a grid-stride loop over `n` elements.
    fn grid_stride(&self, n: usize) -> u32 {
        grid_for(u64_of(n), 256, self.multiprocessors.saturating_mul(16).max(1))
    }

    /// `out[r, :] = f32(table[tokens[r], :])` for `rows` tokens of a
    /// `vocab × h` table; a token outside the table writes zeros (the host
    /// checks ids first).
    pub fn embed_rows<T: Half>(
        &self,
        gpu: &Gpu,
        tokens: &DevBuf<u32>,
        rows: usize,
        table: &DevBuf<T>,
        (vocab, h): (usize, usize),
        out: &DevBuf<f32>,
    ) -> Result<()> {
        need("embed_rows tokens", tokens, rows)?;
        need("embed_rows table", table, count("embed_rows", &[vocab, h])?)?;
        need("embed_rows out", out, count("embed_rows", &[rows, h])?)?;
        if rows == 0 || h == 0 {
            return Ok(());
        }
        let k = &self.typed::<T>()?.embed_rows;
        let (mut t, mut tab, mut v, mut h_i, mut o) =
            (tokens.ptr(), table.ptr(), int("embed_rows", vocab)?, int("embed_rows", h)?, out.ptr());
        let threads = h.next_multiple_of(32).clamp(32, 256) as u32;
        Self::launch(
            gpu,
            k,
            LaunchDims::linear(blocks("embed_rows", rows)?, threads),
            &mut [arg(&mut t), arg(&mut tab), arg(&mut v), arg(&mut h_i), arg(&mut o)],
        )
    }

    /// This step's mask (`batch × new_len`) into the key mask:
    /// `key_mask[b·stride + past + i] = step_mask[b·new_len + i]`.
    pub fn write_mask(
        &self,
        gpu: &Gpu,
        step_mask: &DevBuf<u8>,
        (batch, new_len): (usize, usize),
        key_mask: &DevBuf<u8>,
        stride: usize,
        past: usize,
    ) -> Result<()> {
        if add("write_mask", past, new_len)? > stride {
            return Err(Error::Gpu(format!("write_mask: {past} + {new_len} positions overflow the mask's {stride}")));
        }
        let n = count("write_mask", &[batch, new_len])?;
        need("write_mask step mask", step_mask, n)?;
        need("write_mask key mask", key_mask, count("write_mask", &[batch, stride])?)?;
        if n == 0 {
            return Ok(());
        }
        let (mut s, mut b, mut nl) = (step_mask.ptr(), int("write_mask", batch)?, int("write_mask", new_len)?);
        let (mut km, mut st, mut p) = (key_mask.ptr(), int("write_mask", stride)?, int("write_mask", past)?);
        Self::launch(
            gpu,
            &self.write_mask,
            LaunchDims::linear(self.grid_stride(n), 256),
            &mut [arg(&mut s), arg(&mut b), arg(&mut nl), arg(&mut km), arg(&mut st), arg(&mut p)],
        )
    }

    /// Launch shape of the RMSNorm kernels: a warp per row for narrow rows
    /// (8 rows a block), else a block per row.
    fn rms_dims(rows: usize, dim: usize) -> Result<(LaunchDims, i32)> {
        if dim <= RMS_WARP_MAX {
            Ok((LaunchDims::linear(blocks("rms_norm", rows.div_ceil(8))?, 256), 1))
        } else {
            let threads = dim.div_ceil(8).next_multiple_of(32).clamp(64, 1024) as u32;
            Ok((LaunchDims::linear(blocks("rms_norm", rows)?, threads), 0))
        }
    }

    fn check_eps(eps: f32) -> Result<()> {
        if eps.is_finite() && eps >= 0.0 {
            Ok(())
        } else {
            Err(Error::Gpu(format!("rms_norm: epsilon {eps} is not a finite non-negative number")))
        }
    }

    /// RMSNorm of the f32 rows of `x` (`rows × dim`, rows `x.ld()` apart)
    /// into `out` (`rows × dim` of T, dense): `out = T(w · (x · inv))`,
    /// `inv = 1 / sqrt(mean(x²) + eps)`, in f32 as [`crate::cpu::rms_norm`].
    pub fn rms_norm_f32<T: Half>(
        &self,
        gpu: &Gpu,
        x: Mat<'_, f32>,
        weight: &DevBuf<T>,
        eps: f32,
        out: MatMut<'_, T>,
    ) -> Result<()> {
        Self::check_eps(eps)?;
        let (rows, dim) = (x.rows(), x.cols());
        dense("rms_norm_f32 out", &out, rows, dim)?;
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        need("rms_norm_f32 weight", weight, dim)?;
        let k = &self.typed::<T>()?.rms_norm_f32;
        let (dims, warp_rows) = Self::rms_dims(rows, dim)?;
        // The kernel takes the buffer, the view's offset and its row stride.
        let (mut xp, mut off, mut ld_u, mut r, mut d) =
            (x.buf().ptr(), u64_of(x.offset()), u64_of(x.ld()), int("rms_norm_f32", rows)?, int("rms_norm_f32", dim)?);
        let (mut w, mut e, mut o, mut wr) = (weight.ptr(), eps, out.ptr(), warp_rows);
        Self::launch(
            gpu,
            k,
            dims,
            &mut [
                arg(&mut xp),
                arg(&mut off),
                arg(&mut ld_u),
                arg(&mut r),
                arg(&mut d),
                arg(&mut w),
                arg(&mut e),
                arg(&mut o),
                arg(&mut wr),
            ],
        )
    }

    /// RMSNorm of `rows` T rows of `dim` of `x`, in place (a per-head q/k
    /// norm: rows = tokens · heads, dim = head_dim).
    pub fn rms_norm_inplace<T: Half>(
        &self,
        gpu: &Gpu,
        x: &DevBuf<T>,
        rows: usize,
        dim: usize,
        weight: &DevBuf<T>,
        eps: f32,
    ) -> Result<()> {
        Self::check_eps(eps)?;
        need("rms_norm_inplace x", x, count("rms_norm_inplace", &[rows, dim])?)?;
        need("rms_norm_inplace weight", weight, dim)?;
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let k = &self.typed::<T>()?.rms_norm_inplace;
        let (dims, warp_rows) = Self::rms_dims(rows, dim)?;
        let (mut xp, mut r, mut d) = (x.ptr(), int("rms_norm_inplace", rows)?, int("rms_norm_inplace", dim)?);
        let (mut w, mut e, mut wr) = (weight.ptr(), eps, warp_rows);
        Self::launch(
            gpu,
            k,
            dims,
            &mut [arg(&mut xp), arg(&mut r), arg(&mut d), arg(&mut w), arg(&mut e), arg(&mut wr)],
        )
    }

    /// Rotary embeddings in place (Hugging Face's rotate-half, as
    /// [`crate::cpu::Rope::apply`]): the rows of `x` (dense), each `heads`
    /// heads of `head_dim`, row `r` at `rot.positions[r]`, with
    /// `head_dim / 2` frequencies.
    pub fn rope<T: Half>(
        &self,
        gpu: &Gpu,
        x: MatMut<'_, T>,
        (heads, head_dim): (usize, usize),
        rot: Rotary<'_>,
    ) -> Result<()> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::Gpu(format!("rope: head_dim {head_dim} must be even and positive")));
        }
        let rows = x.rows();
        dense("rope x", &x, rows, count("rope", &[heads, head_dim])?)?;
        need("rope positions", rot.positions, rows)?;
        need("rope frequencies", rot.inv_freq, head_dim / 2)?;
        let n = count("rope", &[rows, heads, head_dim / 2])?;
        if n == 0 {
            return Ok(());
        }
        let k = &self.typed::<T>()?.rope;
        let (mut xp, mut r, mut he, mut hd) =
            (x.ptr(), int("rope", rows)?, int("rope", heads)?, int("rope", head_dim)?);
        let (mut p, mut f) = (rot.positions.ptr(), rot.inv_freq.ptr());
        Self::launch(
            gpu,
            k,
            LaunchDims::linear(self.grid_stride(n), 256),
            &mut [arg(&mut xp), arg(&mut r), arg(&mut he), arg(&mut hd), arg(&mut p), arg(&mut f)],
        )
    }

    /// The stacked q/k/v product's rows (`qkv`, dense; row `r`: `heads ×
    /// head_dim` values of q, then `kv_heads × head_dim` of k, then of v)
    /// into `q` (`rows × heads·head_dim`), `k` and `v` (`rows ×
    /// kv_heads·head_dim`), all dense; with `rotate`, q and k take the
    /// rotary embedding as [`LlmKernels::rope`] gives it (row `r` at
    /// `positions[r]`), in the same kernel.
    pub fn split_qkv<T: Half>(
        &self,
        gpu: &Gpu,
        qkv: Mat<'_, T>,
        shape: KvShape,
        rotate: Option<Rotary<'_>>,
        (q, k, v): (MatMut<'_, T>, MatMut<'_, T>, MatMut<'_, T>),
    ) -> Result<()> {
        let KvShape { heads, kv_heads, head_dim } = shape;
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::Gpu(format!("split_qkv: head_dim {head_dim} must be even and positive")));
        }
        let rows = qkv.rows();
        let stack = add("split_qkv", heads, count("split_qkv", &[2, kv_heads])?)?;
        dense("split_qkv qkv", &qkv, rows, count("split_qkv", &[stack, head_dim])?)?;
        dense("split_qkv q", &q, rows, count("split_qkv", &[heads, head_dim])?)?;
        dense("split_qkv k", &k, rows, count("split_qkv", &[kv_heads, head_dim])?)?;
        dense("split_qkv v", &v, rows, count("split_qkv", &[kv_heads, head_dim])?)?;
        if let Some(rot) = &rotate {
            need("split_qkv positions", rot.positions, rows)?;
            need("split_qkv frequencies", rot.inv_freq, head_dim / 2)?;
        }
        let n = count("split_qkv", &[rows, stack, head_dim / 2])?;
        if n == 0 {
            return Ok(());
        }
        let kern = &self.typed::<T>()?.split_qkv;
        let (mut src, mut r, mut he, mut kh, mut hd) = (
            qkv.ptr(),
            int("split_qkv", rows)?,
            int("split_qkv", heads)?,
            int("split_qkv", kv_heads)?,
            int("split_qkv", head_dim)?,
        );
        let (mut p, mut f, mut rot) = match rotate {
            Some(r) => (r.positions.ptr(), r.inv_freq.ptr(), 1i32),
            None => (0u64, 0u64, 0i32),
        };
        let (mut qp, mut kp, mut vp) = (q.ptr(), k.ptr(), v.ptr());
        Self::launch(
            gpu,
            kern,
            LaunchDims::linear(self.grid_stride(n), 256),
            &mut [
                arg(&mut src),
                arg(&mut r),
                arg(&mut he),
                arg(&mut kh),
                arg(&mut hd),
                arg(&mut p),
                arg(&mut f),
                arg(&mut rot),
                arg(&mut qp),
                arg(&mut kp),
                arg(&mut vp),
            ],
        )
    }

    /// The stacked gate/up product's `rows` rows (row `r`: `n` gate values,
    /// then `n` up values) in place: `gate = T(silu(gate) · up)` in f32, so
    /// that each row's first `n` values (row stride `2n`) are the down
    /// product's input.
    pub fn silu_mul<T: Half>(&self, gpu: &Gpu, gate_up: &DevBuf<T>, rows: usize, n: usize) -> Result<()> {
        need("silu_mul gate_up", gate_up, count("silu_mul", &[rows, 2, n])?)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let k = &self.typed::<T>()?.silu_mul;
        let (mut g, mut r, mut n_i) = (gate_up.ptr(), u64_of(rows), int("silu_mul", n)?);
        Self::launch(
            gpu,
            k,
            LaunchDims::linear(self.grid_stride(count("silu_mul", &[rows, n])?), 256),
            &mut [arg(&mut g), arg(&mut r), arg(&mut n_i)],
        )
    }

    /// `out[r, c] += bias[c]` over the rows of `out` (dense), in f32,
    /// rounded once.
    pub fn add_bias<T: Half>(&self, gpu: &Gpu, out: MatMut<'_, T>, bias: &DevBuf<T>) -> Result<()> {
        let (rows, n) = (out.rows(), out.cols());
        out.check_dense("add_bias out")?;
        let total = count("add_bias", &[rows, n])?;
        need("add_bias bias", bias, n)?;
        if total == 0 {
            return Ok(());
        }
        let k = &self.typed::<T>()?.add_bias;
        let (mut o, mut r, mut n_i, mut b) = (out.ptr(), u64_of(rows), int("add_bias", n)?, bias.ptr());
        Self::launch(
            gpu,
            k,
            LaunchDims::linear(self.grid_stride(total), 256),
            &mut [arg(&mut o), arg(&mut r), arg(&mut n_i), arg(&mut b)],
        )
    }

    /// This step's keys and values (`k`, `v`: rows `b·new_len + i` of
    /// `kv_heads × head_dim`, dense) into the cache at positions `at`
    /// (`new_len` of them, `past + i` for row `i`).
    pub fn store_kv<T: Half>(
        &self,
        gpu: &Gpu,
        (k, v): (Mat<'_, T>, Mat<'_, T>),
        cache: &KvView<'_, T>,
        at: Range<usize>,
    ) -> Result<()> {
        let (batch, cap, shape) = (cache.batch(), cache.capacity(), cache.shape());
        let (kv_heads, head_dim) = (shape.kv_heads, shape.head_dim);
        if at.start > at.end || at.end > cap {
            return Err(Error::Gpu(format!("store_kv: positions {at:?} overflow the cache's {cap}")));
        }
        let (past, new_len) = (at.start, at.len());
        let rows = count("store_kv", &[batch, new_len])?;
        let width = shape.kv_width()?;
        dense("store_kv k", &k, rows, width)?;
        dense("store_kv v", &v, rows, width)?;
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let kern = &self.typed::<T>()?.store_kv;
        let (keys, values) = (cache.keys(), cache.values());
        let vec8 = head_dim.is_multiple_of(8) && aligned16_ptrs(&[k.ptr(), v.ptr(), keys.ptr(), values.ptr()]);
        let (mut kp, mut vp, mut nl, mut kh) =
            (k.ptr(), v.ptr(), int("store_kv", new_len)?, int("store_kv", kv_heads)?);
        let (mut hd, mut p, mut c) = (int("store_kv", head_dim)?, int("store_kv", past)?, int("store_kv", cap)?);
        let (mut kc, mut vc, mut v8) = (keys.ptr(), values.ptr(), i32::from(vec8));
        let per_thread = if vec8 { 8 } else { 1 };
        let threads = (width / per_thread).next_multiple_of(32).clamp(32, 256) as u32;
        Self::launch(
            gpu,
            kern,
            LaunchDims::linear(blocks("store_kv", rows)?, threads),
            &mut [
                arg(&mut kp),
                arg(&mut vp),
                arg(&mut nl),
                arg(&mut kh),
                arg(&mut hd),
                arg(&mut p),
                arg(&mut c),
                arg(&mut kc),
                arg(&mut vc),
                arg(&mut v8),
            ],
        )
    }

    /// Rows `[batch·s][heads·d]` of `src` to `[batch][heads][s][d]` in `dst`
    /// (`to_heads`), or the inverse.
    pub fn transpose_heads<T: Half>(
        &self,
        gpu: &Gpu,
        src: &DevBuf<T>,
        dst: &DevBuf<T>,
        (batch, s, heads, d): (usize, usize, usize, usize),
        to_heads: bool,
    ) -> Result<()> {
        let rows = count("transpose_heads", &[batch, s])?;
        let width = count("transpose_heads", &[heads, d])?;
        let n = count("transpose_heads", &[rows, width])?;
        need("transpose_heads src", src, n)?;
        need("transpose_heads dst", dst, n)?;
        if n == 0 {
            return Ok(());
        }
        let k = &self.typed::<T>()?.transpose_heads;
        let vec8 = d.is_multiple_of(8) && aligned16(&[src, dst]);
        let (mut sp, mut dp, mut s_i) = (src.ptr(), dst.ptr(), int("transpose_heads", s)?);
        let (mut he, mut d_i) = (int("transpose_heads", heads)?, int("transpose_heads", d)?);
        let (mut th, mut v8) = (i32::from(to_heads), i32::from(vec8));
        let per_thread = if vec8 { 8 } else { 1 };
        let threads = (width / per_thread).next_multiple_of(32).clamp(32, 256) as u32;
        Self::launch(
            gpu,
            k,
            LaunchDims::linear(blocks("transpose_heads", rows)?, threads),
            &mut [arg(&mut sp), arg(&mut dp), arg(&mut s_i), arg(&mut he), arg(&mut d_i), arg(&mut th), arg(&mut v8)],
        )
    }

    /// Causal masked softmax in place over the score rows `at` (`scores`:
    /// `[seqs][heads][new_len]` rows of `total` keys, dense): row `R`
    /// (local sequence `R / (heads·new_len)`, query `i = R % new_len`)
    /// sees key `j` iff `j <= past + i` and mask row `first + R /
    /// (heads·new_len)` is non-zero at `j`; f32 softmax over the visible
    /// keys, the others 0, a row with none visible all zeros.
    pub fn softmax_causal<T: Half>(
        &self,
        gpu: &Gpu,
        scores: MatMut<'_, T>,
        at: ScoreRows,
        mask: Mat<'_, u8>,
    ) -> Result<()> {
        let ScoreRows { seqs, heads, new_len: s, past, first: b0 } = at;
        let (rows, total) = (at.rows()?, scores.cols());
        dense("softmax_causal scores", &scores, rows, total)?;
        if total > mask.cols() {
            return Err(Error::Gpu(format!("softmax_causal: {total} keys but mask rows of {}", mask.cols())));
        }
        if add("softmax_causal", b0, seqs)? > mask.rows() {
            return Err(Error::Gpu(format!(
                "softmax_causal: sequences {b0}..+{seqs} of a mask of {} rows",
                mask.rows()
            )));
        }
        if rows == 0 || total == 0 {
            return Ok(());
        }
        int("softmax_causal", add("softmax_causal", past, s)?)?;
        let k = &self.typed::<T>()?.softmax_causal;
        let threads = if total <= SOFTMAX_REGISTER_KEYS {
            total.div_ceil(8).next_multiple_of(32).clamp(32, 1024) as u32
        } else {
            1024
        };
        let (mut sp, mut t, mut s_i, mut he) =
            (scores.ptr(), int("softmax_causal", total)?, int("softmax_causal", s)?, int("softmax_causal", heads)?);
        let (mut p, mut m, mut st, mut b) =
            (int("softmax_causal", past)?, mask.ptr(), int("softmax_causal", mask.ld())?, int("softmax_causal", b0)?);
        Self::launch(
            gpu,
            k,
            LaunchDims::linear(blocks("softmax_causal", rows)?, threads),
            &mut [
                arg(&mut sp),
                arg(&mut t),
                arg(&mut s_i),
                arg(&mut he),
                arg(&mut p),
                arg(&mut m),
                arg(&mut st),
                arg(&mut b),
            ],
        )
    }

    /// Attention of one new query per sequence over the cache `kv`: `q`
    /// rows `[batch][heads·head_dim]` (dense), query head `h` reads kv head
    /// `h / (heads / kv_heads)` of the keys and values
    /// (`[batch][kv_heads][capacity][head_dim]`), positions
    /// `0..attn.total` visible where the mask's row `b` is non-zero;
    /// `out[b, h·d..]` = softmax(scale · q·k_j) · v_j in f32, rounded to T
    /// (fully masked: zeros). Shapes that [`attn_decode_fits`] refuses are
    /// an error.
    ///
    /// Flash-decoding: the positions are cut into chunks of
    /// [`LlmKernels::attn_decode_chunk`] positions, one block per (sequence,
    /// kv head, up to four query heads of its group, chunk), so that the
    /// grid keeps the whole GPU busy; where there is more than one
    /// chunk, each block leaves its chunk's max score, sum of exponentials
    /// and unnormalised weighted values (f32) in a scratch buffer kept here
    /// (a [`DevBuf`], counted like every other, grown on demand) and a
    /// second kernel merges them. Where the scratch cannot be allocated the
    /// positions are taken as one chunk.
    pub fn attn_decode<T: Half>(
        &self,
        gpu: &Gpu,
        q: Mat<'_, T>,
        kv: &KvView<'_, T>,
        attn: &DecodeAttn<'_>,
        out: MatMut<'_, T>,
    ) -> Result<()> {
        let (batch, shape) = (kv.batch(), kv.shape());
        let (heads, kv_heads, head_dim) = (shape.heads, shape.kv_heads, shape.head_dim);
        let chunk = self.attn_decode_chunk((batch, heads, kv_heads, head_dim, attn.total));
        // Room for the most chunks this batch shape is ever cut into, so
        // that the scratch does not grow again as `total` does.
        let reserve = attn_max_splits(self.attn_blocks(batch, heads, kv_heads, head_dim), self.attn_slots);
        self.attn_decode_split(gpu, q, kv, attn, (chunk, reserve), out)
    }

    /// Positions per block that [`LlmKernels::attn_decode`] takes for
    /// `(batch, heads, kv_heads, head_dim, total)`: a whole number of the
    /// kernel's steps (`2 · 256 / lanes a row` positions: 32 for head_dim
    /// 128), as few chunks as keep every multiprocessor busy to the end (see
    /// `attn_chunk`): one where the sequences and heads alone do.
    pub fn attn_decode_chunk(
        &self,
        (batch, heads, kv_heads, head_dim, total): (usize, usize, usize, usize, usize),
    ) -> usize {
        attn_chunk(self.attn_blocks(batch, heads, kv_heads, head_dim), total, head_dim, self.attn_slots)
    }

    /// [`LlmKernels::attn_decode`] with `chunk` positions per block (at
    /// least 1; `total.div_ceil(chunk)` chunks, at most 4096), for tests and
    /// measurements.
    pub fn attn_decode_chunked<T: Half>(
        &self,
        gpu: &Gpu,
        q: Mat<'_, T>,
        kv: &KvView<'_, T>,
        attn: &DecodeAttn<'_>,
        chunk: usize,
        out: MatMut<'_, T>,
    ) -> Result<()> {
        self.attn_decode_split(gpu, q, kv, attn, (chunk, 0), out)
    }

    /// Blocks of the decode attention kernel per chunk of positions: one per
    /// sequence, kv head and [`attn_heads_per_block`] query heads.
    fn attn_blocks(&self, batch: usize, heads: usize, kv_heads: usize, head_dim: usize) -> usize {
        let group = heads / kv_heads.max(1);
        let per_kv = group.div_ceil(attn_heads_per_block(group, head_dim));
        batch.saturating_mul(kv_heads).saturating_mul(per_kv)
    }

    /// The decode attention with `chunk` positions per block, the scratch
    /// sized for at least `reserve` chunks.
    fn attn_decode_split<T: Half>(
        &self,
        gpu: &Gpu,
        q: Mat<'_, T>,
        kv: &KvView<'_, T>,
        attn: &DecodeAttn<'_>,
        (chunk, reserve): (usize, usize),
        out: MatMut<'_, T>,
    ) -> Result<()> {
        let (batch, cap, shape) = (kv.batch(), kv.capacity(), kv.shape());
        let KvShape { heads, kv_heads, head_dim } = shape;
        let (mask, total, scale) = (attn.mask, attn.total, attn.scale);
        let stride = mask.ld();
        if !attn_decode_fits(head_dim, total) {
            return Err(Error::Gpu(format!(
                "attn_decode: heads of {head_dim} over {total} positions do not fit the kernel (see attn_decode_fits)"
            )));
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(Error::Gpu(format!(
                "attn_decode: {heads} query heads are not a multiple of {kv_heads} key/value heads"
            )));
        }
        if total > cap || total > mask.cols() {
            return Err(Error::Gpu(format!(
                "attn_decode: {total} positions overflow the cache's {cap} or the mask's {}",
                mask.cols()
            )));
        }
        if mask.rows() < batch {
            return Err(Error::Gpu(format!("attn_decode: a mask of {} rows for {batch} sequences", mask.rows())));
        }
        if chunk == 0 {
            return Err(Error::Gpu("attn_decode: chunks of 0 positions".into()));
        }
        // One chunk of at least `total` is one chunk of `total`.
        let chunk = chunk.min(total.max(1));
        let mut splits = total.div_ceil(chunk).max(1);
        if splits > ATTN_MAX_SPLITS {
            return Err(Error::Gpu(format!(
                "attn_decode: {total} positions in chunks of {chunk} make more than {ATTN_MAX_SPLITS} chunks"
            )));
        }
        let q_width = shape.q_width()?;
        dense("attn_decode q", &q, batch, q_width)?;
        dense("attn_decode out", &out, batch, q_width)?;
        let (keys, values) = (kv.keys(), kv.values());
        if batch == 0 || heads == 0 {
            return Ok(());
        }
        if !aligned16_ptrs(&[q.ptr(), keys.ptr(), values.ptr()]) {
            return Err(Error::Gpu("attn_decode: q, keys and values must be 16-byte aligned".into()));
        }
        // The kernel's 32-bit positions reach the end of the last chunk and
        // three steps past `total`.
        int("attn_decode", count("attn_decode", &[splits, chunk])?)?;
        int("attn_decode", add("attn_decode", total, 3 * attn_step(head_dim))?)?;
        let typed = self.typed::<T>()?;
        let group = heads / kv_heads;
        let per_block = attn_heads_per_block(group, head_dim);
        let per_chunk = count("attn_decode", &[batch, kv_heads, group.div_ceil(per_block)])?;

        // The chunks' partial results: `batch · heads · splits` rows of
        // `head_dim` sums, then as many (max, sum) pairs. Held locked until
        // both kernels are enqueued.
        let mut scratch = self.attn_scratch.lock().unwrap_or_else(PoisonError::into_inner);
        let mut parts = (0u64, 0u64);
        if splits > 1 {
            let rows = count("attn_decode", &[batch, heads, splits])?;
            let need_len = count("attn_decode", &[rows, add("attn_decode", head_dim, 2)?])?;
            let want_len =
                count("attn_decode", &[batch, heads, splits.max(reserve), add("attn_decode", head_dim, 2)?])?;
            if Self::ensure_scratch(gpu, &mut scratch, need_len, want_len)? {
                if let Some(buf) = scratch.as_ref() {
                    parts = (buf.ptr(), buf.ptr_at(count("attn_decode", &[rows, head_dim])?)?);
                }
            }
            if parts.0 == 0 {
                splits = 1;
            }
        }
        let chunk = if splits == 1 { total.max(1) } else { chunk };

        let (mut qp, mut kp, mut vp, mut m) = (q.ptr(), keys.ptr(), values.ptr(), mask.ptr());
        let (mut st, mut he, mut kh) =
            (int("attn_decode", stride)?, int("attn_decode", heads)?, int("attn_decode", kv_heads)?);
        let (mut hd, mut c, mut t) =
            (int("attn_decode", head_dim)?, int("attn_decode", cap)?, int("attn_decode", total)?);
        let (mut sc, mut gc, mut ch, mut ns) =
            (scale, int("attn_decode", per_block)?, int("attn_decode", chunk)?, int("attn_decode", splits)?);
        let (mut pa, mut pm, mut o) = (parts.0, parts.1, out.ptr());
        let dims = LaunchDims {
            grid: (blocks("attn_decode", count("attn_decode", &[per_chunk, splits])?)?, 1, 1),
            block: (ATTN_THREADS as u32, 1, 1),
            shared_bytes: attn_shared_bytes(head_dim, per_block) as u32,
        };
        Self::launch(
            gpu,
            &typed.attn_split,
            dims,
            &mut [
                arg(&mut qp),
                arg(&mut kp),
                arg(&mut vp),
                arg(&mut m),
                arg(&mut st),
                arg(&mut he),
                arg(&mut kh),
                arg(&mut hd),
                arg(&mut c),
                arg(&mut t),
                arg(&mut sc),
                arg(&mut gc),
                arg(&mut ch),
                arg(&mut ns),
                arg(&mut pa),
                arg(&mut pm),
                arg(&mut o),
            ],
        )?;
        if splits == 1 {
            return Ok(());
        }
        let dims = LaunchDims {
            grid: (blocks("attn_decode", count("attn_decode", &[batch, heads])?)?, 1, 1),
            block: (COMBINE_THREADS, 1, 1),
            shared_bytes: (splits * 4) as u32,
        };
        Self::launch(
            gpu,
            &typed.attn_combine,
            dims,
            &mut [arg(&mut pa), arg(&mut pm), arg(&mut ns), arg(&mut hd), arg(&mut o)],
        )
    }

    /// Makes `scratch` hold at least `need` f32, allocating `want` (at
    /// least `need`) where it is missing or smaller: false where that
    /// allocation fails.
    fn ensure_scratch(gpu: &Gpu, scratch: &mut Option<DevBuf<f32>>, need: usize, want: usize) -> Result<bool> {
        if scratch.as_ref().is_some_and(|b| b.len() >= need) {
            return Ok(true);
        }
        if scratch.is_some() {
            // Kernels enqueued before may still read the old buffer.
            gpu.synchronize()?;
            *scratch = None;
        }
        match DevBuf::alloc(gpu, want.max(need)) {
            Ok(buf) => {
                *scratch = Some(buf);
                Ok(true)
            }
            Err(e) => {
                tracing::debug!("attn_decode: no scratch for its chunks ({e}); one chunk per block");
                Ok(false)
            }
        }
    }

    /// Seeded uniform values in ±`scale` over all of `out`: the generator
    /// of [`super::kernels::Kernels::fill_uniform_f16`], rounded to T.
    pub fn fill_uniform<T: Half>(&self, gpu: &Gpu, out: &DevBuf<T>, seed: u64, scale: f32) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let k = &self.typed::<T>()?.fill_uniform;
        let (mut o, mut n, mut s, mut sc) = (out.ptr(), u64_of(out.len()), seed, scale);
        Self::launch(
            gpu,
            k,
            LaunchDims::linear(self.grid_stride(out.len()), 256),
            &mut [arg(&mut o), arg(&mut n), arg(&mut s), arg(&mut sc)],
        )
    }

    /// Every element of `out` set to `value` (rounded to T).
    pub fn fill<T: Half>(&self, gpu: &Gpu, out: &DevBuf<T>, value: f32) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let k = &self.typed::<T>()?.fill;
        let (mut o, mut n, mut v) = (out.ptr(), u64_of(out.len()), value);
        Self::launch(
            gpu,
            k,
            LaunchDims::linear(self.grid_stride(out.len()), 256),
            &mut [arg(&mut o), arg(&mut n), arg(&mut v)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn llm_source_compiles_or_nvrtc_is_missing() {
        if !tk::nvrtc_available() {
            println!("skipped: no NVRTC");
            return;
        }
        if tk::cuda_include_dir().is_none() {
            println!("skipped: no CUDA headers");
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            let ptx = tk::compile_ptx(LLM_SOURCE, &compile_options(), arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
            for entry in LLM_ENTRIES {
                assert!(ptx.contains(&format!(".entry {entry}(")), "{entry} missing from the {arch} PTX");
            }
            // No kernel keeps an array in local memory, but the rotations'
            // precise sinf/cosf (their reduction of large angles).
            for part in ptx.split(".entry ").skip(1) {
                let name = part.split('(').next().unwrap_or_default();
                let rotates = name.starts_with("rope_") || name.starts_with("split_qkv_");
                assert!(rotates || !part.contains(".local"), "{arch}: {name} uses local memory");
            }
        }
        println!("compiled llm.cu for compute_80 and compute_90: {} entry points", LLM_ENTRIES.len());
    }

    #[test]
    fn every_typed_kernel_has_both_entry_points() {
        let mut want = vec!["write_mask".to_string()];
        for sfx in [<f16 as Half>::SUFFIX, <bf16 as Half>::SUFFIX] {
            want.extend(LLM_TYPED.iter().map(|n| format!("{n}_{sfx}")));
        }
        let mut have: Vec<String> = LLM_ENTRIES.iter().map(|s| s.to_string()).collect();
        want.sort();
        have.sort();
        assert_eq!(want, have);
    }

    #[test]
    fn decode_attention_shapes() {
        for hd in [8, 64, 80, 96, 128, 256] {
            assert!(attn_decode_fits(hd, 0), "{hd}");
            assert!(attn_decode_fits(hd, 1), "{hd}");
            assert!(attn_decode_fits(hd, 12_400), "{hd}");
            assert!(attn_decode_fits(hd, 1 << 30), "{hd}");
            assert!(!attn_decode_fits(hd, (1 << 30) + 1), "{hd}");
        }
        for hd in [0, 4, 12, 260, 264, 512] {
            assert!(!attn_decode_fits(hd, 16), "{hd}");
        }
        assert_eq!(attn_group(8), 1);
        assert_eq!(attn_group(16), 2);
        assert_eq!(attn_group(64), 8);
        assert_eq!(attn_group(80), 16);
        assert_eq!(attn_group(128), 16);
        assert_eq!(attn_group(256), 32);
        // Positions a block takes per step: 2 per group of lanes.
        assert_eq!(attn_step(128), 32);
        assert_eq!(attn_step(64), 64);
        assert_eq!(attn_step(256), 16);
        assert_eq!(attn_step(8), 512);
        // Each warp's sums of every head.
        assert_eq!(attn_shared_bytes(128, 4), 8 * 4 * 128 * 4);
        assert_eq!(attn_shared_bytes(80, 1), 8 * 128 * 4);
        assert_eq!(attn_shared_bytes(256, 2), 8 * 2 * 256 * 4);
        // Heads a block takes: 4, or the group rounded up to a power of two,
        // or the lanes of a row, whichever is least.
        assert_eq!(attn_heads_per_block(4, 128), 4);
        assert_eq!(attn_heads_per_block(8, 128), 4);
        assert_eq!(attn_heads_per_block(7, 128), 4);
        assert_eq!(attn_heads_per_block(6, 64), 4);
        assert_eq!(attn_heads_per_block(3, 64), 4);
        assert_eq!(attn_heads_per_block(2, 64), 2);
        assert_eq!(attn_heads_per_block(1, 64), 1);
        assert_eq!(attn_heads_per_block(32, 64), 4);
        assert_eq!(attn_heads_per_block(8, 16), 2);
        assert_eq!(attn_heads_per_block(8, 8), 1);
    }

    #[test]
    fn decode_attention_chunks() {
        // 132 multiprocessors holding 2 blocks each.
        let slots = 264;
        // Case E: 64 sequences × 8 kv heads × one block of 4 heads = 512
        // blocks a chunk: two even waves in one chunk of all 544 positions
        // beat 4 waves of 2 chunks and the merge.
        assert_eq!(attn_max_splits(512, slots), 3);
        assert_eq!(attn_chunk(512, 544, 128, slots), 544);
        assert_eq!(attn_chunk(512, 1056, 128, slots), 1056);
        // 16 sequences (128 blocks) of 2048: two chunks of 1024, one wave.
        assert_eq!(attn_chunk(128, 2048, 128, slots), 1024);
        // One sequence (8 blocks) of 8192: 32 chunks of 256, one wave.
        assert_eq!(attn_max_splits(8, slots), 132);
        assert_eq!(attn_chunk(8, 8192, 128, slots), 256);
        // 8 sequences (64 blocks) of 11,000: 4 chunks of 2752.
        assert_eq!(attn_chunk(64, 11_000, 128, slots), 2752);
        // Enough blocks without splitting: one chunk of all the positions,
        // in whole steps.
        assert_eq!(attn_max_splits(4096, slots), 1);
        assert_eq!(attn_chunk(4096, 3000, 128, slots), 3008);
        // Few positions: one step.
        assert_eq!(attn_chunk(8, 10, 128, slots), 32);
        assert_eq!(attn_chunk(8, 0, 128, slots), 32);
        // Never more chunks than the combine kernel takes.
        assert_eq!(attn_max_splits(1, 100_000), ATTN_MAX_SPLITS);
        assert_eq!(attn_max_splits(0, 0), ATTN_MAX_WAVES);
        let chunk = attn_chunk(1, 1 << 30, 8, 100_000);
        assert!((1usize << 30).div_ceil(chunk) <= ATTN_MAX_SPLITS);
    }
}
