//! 4-bit weights on the GPU engine (`--compress-weight`).
//!
//! Every 2-D matrix of a decoder layer is quantized once at load, on the
//! CPU with [`compression::quantize_into`] (FlexGen's setting,
//! [`CompressionConfig::int4`] along dim 0: groups of 64 along the output
//! dimension, asymmetric), and held packed (one `u8` buffer per matrix, the
//! compression crate's byte format) wherever the layer lives: in GPU memory
//! for resident layers, in the tier tensors of host or disk layers (so only
//! packed bytes cross PCIe) and in the two streaming slots. The q, k and v
//! projections are quantized one by one, as a checkpoint holds them, so
//! their groups never straddle two of them.
//!
//! The f16 matrices of a compressed [`GpuLayerWeights`] are handles on one
//! shared [`LayerWorkspace`] (one layer's f16 matrices, on the GPU once).
//! Before a layer computes, [`unpack`] enqueues the GPU dequantization of
//! its packed matrices into the workspace on the compute stream, so the
//! existing kernels and cuBLAS products read f16 as before; the next
//! layer's dequantization is enqueued after this layer's compute on the
//! same stream, so it never overwrites matrices still being read.
//! 1-D tensors (biases, layer norms) and the embeddings stay f16.

use compression::gpu::{GpuDequantizer, Pending};
use compression::{quantize_into, CompressedLayout, CompressionConfig, SourceDtype};
use half::f16;

use super::buffer::DevBuf;
use super::weights::GpuLayerWeights;
use super::Gpu;
use crate::config::OptConfig;
use crate::error::{Error, Result};

/// Which f16 matrix of the workspace a packed part decodes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Qkv,
    OutProj,
    Fc1,
    Fc2,
}

/// One quantized matrix (or the q, k or v third of the stacked one).
#[derive(Debug)]
pub struct PackedMatrix {
    /// The compressed bytes, header included.
    pub buf: DevBuf<u8>,
    pub layout: CompressedLayout,
    pub target: Target,
    /// First element of the target matrix it decodes into.
    pub offset: usize,
}

/// One layer's f16 matrices, shared by every compressed layer.
#[derive(Debug)]
pub struct LayerWorkspace {
    pub qkv: DevBuf<f16>,
    pub out_proj: DevBuf<f16>,
    pub fc1: DevBuf<f16>,
    pub fc2: DevBuf<f16>,
}

impl LayerWorkspace {
    /// Room for one layer's matrices (contents written by [`unpack`]).
    pub fn new(gpu: &Gpu, c: &OptConfig) -> Result<Self> {
        let (h, f) = (c.hidden_size, c.ffn_dim);
        Ok(LayerWorkspace {
            qkv: DevBuf::alloc(gpu, 3 * h * h)?,
            out_proj: DevBuf::alloc(gpu, h * h)?,
            fc1: DevBuf::alloc(gpu, f * h)?,
            fc2: DevBuf::alloc(gpu, h * f)?,
        })
    }

    fn target(&self, t: Target) -> &DevBuf<f16> {
        match t {
            Target::Qkv => &self.qkv,
            Target::OutProj => &self.out_proj,
            Target::Fc1 => &self.fc1,
            Target::Fc2 => &self.fc2,
        }
    }

    /// Bytes held on the GPU.
    pub fn bytes(&self) -> u64 {
        self.qkv.bytes() + self.out_proj.bytes() + self.fc1.bytes() + self.fc2.bytes()
    }
}

/// The weight format: FlexGen's 4-bit groups of 64 along the output dim.
pub fn weight_config() -> CompressionConfig {
    runtime::spec::weight_format()
}

fn comp_err(what: &str, e: compression::Error) -> Error {
    Error::Gpu(format!("{what}: {e}"))
}

/// The layout of a `[rows, cols]` f16 matrix compressed for the GPU engine.
pub fn matrix_layout(rows: usize, cols: usize) -> Result<CompressedLayout> {
    CompressedLayout::new(&[rows, cols], SourceDtype::F16, weight_config()).map_err(|e| comp_err("weight layout", e))
}

/// Quantizes `values` (`[rows, cols]`, row-major) on the CPU into a packed
/// GPU buffer.
fn pack(gpu: &Gpu, values: &[f16], rows: usize, cols: usize, target: Target, offset: usize) -> Result<PackedMatrix> {
    let layout = matrix_layout(rows, cols)?;
    let mut bytes = vec![0u8; layout.total_bytes()];
    quantize_into(values, &layout, &mut bytes).map_err(|e| comp_err("quantizing a weight matrix", e))?;
    let buf = DevBuf::from_host(gpu, &bytes)?;
    // `from_host` returns once the driver has staged the bytes.
    Ok(PackedMatrix { buf, layout, target, offset })
}

impl GpuLayerWeights {
    /// This layer with its matrices quantized and packed on the GPU, the
    /// f16 matrices freed and replaced by handles on `ws`.
    pub fn compress(mut self, gpu: &Gpu, c: &OptConfig, ws: &LayerWorkspace) -> Result<Self> {
        if self.packed.is_some() {
            return Ok(self);
        }
        let (h, f) = (c.hidden_size, c.ffn_dim);
        let stream = gpu.stream();
        let mut parts = Vec::with_capacity(6);
        let qkv = self.qkv.download(stream)?;
        for (k, third) in qkv.chunks_exact(h * h).enumerate() {
            parts.push(pack(gpu, third, h, h, Target::Qkv, k * h * h)?);
        }
        drop(qkv);
        parts.push(pack(gpu, &self.out_proj.download(stream)?, h, h, Target::OutProj, 0)?);
        parts.push(pack(gpu, &self.fc1.download(stream)?, f, h, Target::Fc1, 0)?);
        parts.push(pack(gpu, &self.fc2.download(stream)?, h, f, Target::Fc2, 0)?);
        if parts.len() != 6 {
            return Err(Error::Gpu(format!("a stacked q/k/v matrix of {} values for hidden {h}", self.qkv.len())));
        }
        self.qkv = ws.qkv.share();
        self.out_proj = ws.out_proj.share();
        self.fc1 = ws.fc1.share();
        self.fc2 = ws.fc2.share();
        self.packed = Some(parts);
        Ok(self)
    }
}

/// Enqueues on the compute stream the dequantization of `layer`'s packed
/// matrices into its f16 matrices (the shared workspace); nothing for an
/// uncompressed layer. The returned kernels must be kept (or waited on)
/// for as long as they may run: dropping one waits for it.
pub fn unpack(gpu: &Gpu, dequant: &GpuDequantizer, layer: &GpuLayerWeights) -> Result<Vec<Pending>> {
    let Some(parts) = &layer.packed else { return Ok(Vec::new()) };
    let targets = |t: Target| match t {
        Target::Qkv => &layer.qkv,
        Target::OutProj => &layer.out_proj,
        Target::Fc1 => &layer.fc1,
        Target::Fc2 => &layer.fc2,
    };
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let dst = targets(p.target)
            .tensor()
            .narrow(0, p.offset, p.layout.numel())
            .map_err(|e| Error::Gpu(format!("GPU: {e}")))?;
        let pending = dequant
            .enqueue(gpu.stream(), &p.buf.tensor().view(), &p.layout, &dst)
            .map_err(|e| comp_err("dequantizing a weight matrix on the GPU", e))?;
        out.push(pending);
    }
    Ok(out)
}

impl LayerWorkspace {
    /// The workspace matrix a target names (for tests).
    pub fn matrix(&self, t: Target) -> &DevBuf<f16> {
        self.target(t)
    }
}
