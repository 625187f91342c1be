//! 4-bit weights on the GPU engine (`--compress-weight`).
//!
//! Every compressible tensor of a decoder layer (the spec's
//! [`TensorSpec::compressible`]: its 2-D matrices) is quantized once at
//! load, on the CPU with [`compression::quantize_into`] (FlexGen's setting,
//! [`CompressionConfig::int4`] along dim 0: groups of 64 along the output
//! dimension, asymmetric), and held packed (one `u8` buffer per matrix, the
//! compression crate's byte format) wherever the layer lives: in GPU memory
//! for resident layers, in the tier tensors of host or disk layers (so only
//! packed bytes cross PCIe) and in the streaming slots. A tensor is packed
//! as the matrices the spec says ([`TensorSpec::parts`]): a stacked q/k/v
//! matrix as its three checkpoint tensors one by one, so their groups never
//! straddle two of them.
//!
//! The f16 buffers of a compressed [`GpuLayer`]'s compressible tensors are
//! handles on one shared [`LayerWorkspace`] (an f16 buffer per compressible
//! tensor of the spec, on the GPU once). Before a layer computes, [`unpack`]
//! enqueues the GPU dequantization of its packed matrices into the
//! workspace on the compute stream, so the existing kernels and cuBLAS
//! products read f16 as before; the next layer's dequantization is enqueued
//! after this layer's compute on the same stream, so it never overwrites
//! matrices still being read. The other tensors (biases, norms) and the
//! tensors outside the layers stay as they are.

use compression::gpu::{GpuDequantizer, Pending};
use compression::{quantize_into, CompressedLayout, CompressionConfig, SourceDtype};
use half::f16;
use ops::gpu::buffer::DevBuf;
use ops::gpu::Gpu;
use tier_api::DType;

use super::gpu_err;
use super::layer::{GpuLayer, HeldBuf};
use crate::error::{Error, Result};
use crate::spec::{ModelSpec, TensorSpec};

/// One quantized matrix (or one part of a tensor packed as several).
#[derive(Debug)]
pub struct PackedMatrix {
    /// The compressed bytes, header included.
    pub buf: DevBuf<u8>,
    pub layout: CompressedLayout,
    /// The layer tensor it decodes into (its index in the spec's layer).
    pub target: usize,
    /// First element of the target tensor it decodes into.
    pub offset: usize,
}

/// One layer's f16 matrices, shared by every compressed layer: a buffer
/// for each compressible tensor of the spec's layer.
#[derive(Debug)]
pub struct LayerWorkspace {
    /// `matrices[k]`: the buffer of the layer's tensor `k`, if compressible.
    matrices: Vec<Option<DevBuf<f16>>>,
}

impl LayerWorkspace {
    /// Room for one layer's compressible tensors, in the spec's order
    /// (contents written by [`unpack`]).
    pub fn new(gpu: &Gpu, spec: &ModelSpec) -> Result<Self> {
        let matrices = spec
            .layer
            .iter()
            .map(|t| {
                if !t.compressible {
                    return Ok(None);
                }
                if t.dtype != DType::F16 {
                    return Err(gpu_err(format!("layer tensor {}: only f16 tensors are compressed", t.name)));
                }
                Ok(Some(DevBuf::alloc(gpu, elements(t)?)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LayerWorkspace { matrices })
    }

    /// The workspace buffer of the layer's tensor `k` (for tests: what
    /// [`unpack`] wrote), `None` unless that tensor is compressible.
    pub fn matrix(&self, k: usize) -> Option<&DevBuf<f16>> {
        self.matrices.get(k).and_then(Option::as_ref)
    }

    /// Bytes held on the GPU.
    pub fn bytes(&self) -> u64 {
        self.matrices.iter().flatten().map(DevBuf::bytes).sum()
    }
}

/// Elements of a spec tensor, checked.
fn elements(t: &TensorSpec) -> Result<usize> {
    t.elements()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| gpu_err(format!("layer tensor {}: {:?} overflows", t.name, t.shape)))
}

/// The weight format: FlexGen's 4-bit groups of 64 along the output dim.
pub fn weight_config() -> CompressionConfig {
    crate::spec::weight_format()
}

fn comp_err(what: &str, e: compression::Error) -> Error {
    gpu_err(format!("{what}: {e}"))
}

/// The layout of an f16 matrix of `shape` compressed for the GPU engine.
pub fn layout(shape: &[usize]) -> Result<CompressedLayout> {
    CompressedLayout::new(shape, SourceDtype::F16, weight_config()).map_err(|e| comp_err("weight layout", e))
}

/// The layout of a `[rows, cols]` f16 matrix compressed for the GPU engine.
pub fn matrix_layout(rows: usize, cols: usize) -> Result<CompressedLayout> {
    layout(&[rows, cols])
}

/// Quantizes `values` (of `shape`, row-major) on the CPU into a packed GPU
/// buffer.
fn pack(gpu: &Gpu, values: &[f16], shape: &[usize], target: usize, offset: usize) -> Result<PackedMatrix> {
    let layout = layout(shape)?;
    let mut bytes = vec![0u8; layout.total_bytes()];
    quantize_into(values, &layout, &mut bytes).map_err(|e| comp_err("quantizing a weight matrix", e))?;
    let buf = DevBuf::from_host(gpu, &bytes)?;
    // `from_host` returns once the driver has staged the bytes.
    Ok(PackedMatrix { buf, layout, target, offset })
}

impl GpuLayer {
    /// This layer with its compressible tensors quantized and packed on the
    /// GPU (each as the parts the spec packs it as, in order), the f16
    /// buffers freed and replaced by handles on `ws`.
    pub fn compress(mut self, gpu: &Gpu, ws: &LayerWorkspace) -> Result<Self> {
        if self.packed.is_some() {
            return Ok(self);
        }
        let stream = gpu.stream();
        let mut parts = Vec::new();
        for (k, t) in self.specs().iter().enumerate() {
            if !t.compressible {
                continue;
            }
            let buf = self.bufs[k]
                .as_f16()
                .ok_or_else(|| gpu_err(format!("layer tensor {}: only f16 tensors are compressed", t.name)))?;
            let values = buf.download(stream)?;
            let mut at = 0usize;
            for shape in t.parts() {
                let n = shape
                    .iter()
                    .try_fold(1usize, |n, &d| n.checked_mul(d))
                    .ok_or_else(|| gpu_err(format!("layer tensor {}: a part {shape:?} overflows", t.name)))?;
                let part = at
                    .checked_add(n)
                    .and_then(|end| values.get(at..end))
                    .ok_or_else(|| gpu_err(format!("layer tensor {}: its parts overrun its values", t.name)))?;
                parts.push(pack(gpu, part, &shape, k, at)?);
                at += n;
            }
            if at != values.len() {
                return Err(gpu_err(format!(
                    "layer tensor {}: parts of {at} values for {} values",
                    t.name,
                    values.len()
                )));
            }
        }
        let targets: Vec<usize> = (0..self.bufs.len()).filter(|&k| self.specs()[k].compressible).collect();
        for k in targets {
            let shared = ws.matrix(k).ok_or_else(|| gpu_err(format!("layer tensor {k}: no workspace matrix")))?.share();
            self.bufs[k] = HeldBuf::F16(shared);
        }
        self.packed = Some(parts);
        Ok(self)
    }
}

/// Enqueues on the compute stream the dequantization of `layer`'s packed
/// matrices into its f16 matrices (the shared workspace); nothing for an
/// uncompressed layer. The returned kernels must be kept (or waited on)
/// for as long as they may run: dropping one waits for it.
pub fn unpack(gpu: &Gpu, dequant: &GpuDequantizer, layer: &GpuLayer) -> Result<Vec<Pending>> {
    let Some(parts) = &layer.packed else { return Ok(Vec::new()) };
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let dst = layer
            .bufs
            .get(p.target)
            .ok_or_else(|| gpu_err(format!("a packed matrix for layer tensor {}, past the layer", p.target)))?
            .tensor()
            .narrow(0, p.offset, p.layout.numel())
            .map_err(|e| gpu_err(format!("GPU: {e}")))?;
        let pending = dequant
            .enqueue(gpu.stream(), &p.buf.tensor().view(), &p.layout, &dst)
            .map_err(|e| comp_err("dequantizing a weight matrix on the GPU", e))?;
        out.push(pending);
    }
    Ok(out)
}
