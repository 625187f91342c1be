//! 4-bit weights on the GPU engine (`--compress-weight`).
//!
//! Every compressible tensor of a decoder layer (the spec's
//! [`TensorSpec::compressible`]: its 2-D matrices) is quantized once at
//! load, on the GPU where its values were made or uploaded, by
//! [`compression::gpu::GpuQuantizer`] (byte for byte the CPU's
//! [`compression::quantize_into`]; so no layer crosses PCIe twice) (FlexGen's setting,
//! [`CompressionConfig::int4`] along dim 0: groups of 64 along the output
//! dimension, asymmetric), and held packed (one `u8` buffer per matrix, the
//! compression crate's byte format) wherever the layer lives: in GPU memory
//! for resident layers, in the tier tensors of host or disk layers (so only
//! packed bytes cross PCIe) and in the streaming slots. A tensor is packed
//! as the matrices the spec says ([`TensorSpec::parts`]): a stacked q/k/v
//! matrix as its three checkpoint tensors one by one, so their groups never
//! straddle two of them.
//!
//! The 16-bit buffers (f16 or bf16, the checkpoint's type) of a compressed
//! [`GpuLayer`]'s compressible tensors are handles on one shared
//! [`LayerWorkspace`] (a buffer per compressible tensor of the spec, on the
//! GPU once). Before a layer computes, [`unpack`] enqueues the GPU
//! dequantization of its packed matrices into the workspace on the compute
//! stream, so the existing kernels and cuBLAS products read 16-bit values
//! as before; the next layer's dequantization is enqueued after this
//! layer's compute on the same stream, so it never overwrites matrices
//! still being read. The other tensors (biases, norms) and the tensors
//! outside the layers stay as they are. [`Unpacker`] holds the three
//! pieces a family's engine needs (dequantizer, workspace, the
//! dequantizations in flight).

use std::sync::Mutex;

use compression::gpu::{GpuDequantOptions, GpuDequantizer, GpuQuantizer, Pending};
use compression::{CompressedLayout, CompressionConfig, SourceDtype};
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

/// One layer's 16-bit matrices, shared by every compressed layer: a buffer
/// for each compressible tensor of the spec's layer, in its type.
#[derive(Debug)]
pub struct LayerWorkspace {
    /// `matrices[k]`: the buffer of the layer's tensor `k`, if compressible.
    matrices: Vec<Option<HeldBuf>>,
    /// The matrices' type (every compressible tensor has it).
    dtype: DType,
    /// Quantizes the layers' matrices where they lie, on the GPU.
    quantizer: GpuQuantizer,
}

impl LayerWorkspace {
    /// Room for one layer's compressible tensors, in the spec's order
    /// (contents written by [`unpack`]).
    pub fn new(gpu: &Gpu, spec: &ModelSpec) -> Result<Self> {
        let mut dtype = None;
        let matrices = spec
            .layer
            .iter()
            .map(|t| {
                if !t.compressible {
                    return Ok(None);
                }
                if !matches!(t.dtype, DType::F16 | DType::BF16) || dtype.is_some_and(|d| d != t.dtype) {
                    return Err(gpu_err(format!(
                        "layer tensor {}: compressed tensors are f16 or bf16, all of one type; this one is {:?}",
                        t.name, t.dtype
                    )));
                }
                dtype = Some(t.dtype);
                let n = elements(t)?;
                Ok(Some(match t.dtype {
                    DType::BF16 => HeldBuf::BF16(DevBuf::alloc(gpu, n)?),
                    _ => HeldBuf::F16(DevBuf::alloc(gpu, n)?),
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        let quantizer = GpuQuantizer::new(gpu.device().clone()).map_err(|e| comp_err("the GPU quantizer", e))?;
        Ok(LayerWorkspace { matrices, dtype: dtype.unwrap_or(DType::F16), quantizer })
    }

    /// The workspace buffer of the layer's tensor `k` (for tests: what
    /// [`unpack`] wrote), `None` unless that tensor is compressible.
    pub fn matrix(&self, k: usize) -> Option<&HeldBuf> {
        self.matrices.get(k).and_then(Option::as_ref)
    }

    /// The matrices' type: what the dequantizer must write.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes held on the GPU.
    pub fn bytes(&self) -> u64 {
        self.matrices.iter().flatten().map(HeldBuf::bytes).sum()
    }
}

/// What a family's engine holds to run compressed layers: the dequantizer
/// (built for the workspace's type), the shared workspace, and the
/// dequantizations enqueued for the layer about to compute.
pub struct Unpacker {
    dequant: GpuDequantizer,
    workspace: LayerWorkspace,
    in_flight: Mutex<Vec<Pending>>,
}

impl std::fmt::Debug for Unpacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unpacker").field("dequant", &self.dequant).field("workspace", &self.workspace).finish()
    }
}

impl Unpacker {
    /// The workspace for `spec`'s layers and a dequantizer writing its type.
    pub fn new(gpu: &Gpu, spec: &ModelSpec) -> Result<Self> {
        let workspace = LayerWorkspace::new(gpu, spec)?;
        let options = GpuDequantOptions { output: workspace.dtype(), ..Default::default() };
        let dequant = GpuDequantizer::with_options(gpu.device().clone(), options)
            .map_err(|e| comp_err("the GPU dequantizer", e))?;
        Ok(Unpacker { dequant, workspace, in_flight: Mutex::new(Vec::new()) })
    }

    /// The shared workspace (for [`GpuLayer::compress`] and the streamer's
    /// slots).
    pub fn workspace(&self) -> &LayerWorkspace {
        &self.workspace
    }

    /// Before `layer` computes (all of its packed matrices on the GPU):
    /// waits for the previous layer's dequantizations, which ran before
    /// its compute, so that the host stays at most a layer ahead, and
    /// enqueues this layer's on the compute stream.
    pub fn before(&self, gpu: &Gpu, layer: &GpuLayer) -> Result<()> {
        let mut in_flight =
            self.in_flight.lock().map_err(|_| gpu_err("the dequantizations' list was poisoned".into()))?;
        for p in in_flight.drain(..) {
            p.wait().map_err(|e| comp_err("dequantizing weights on the GPU", e))?;
        }
        in_flight.extend(unpack(gpu, &self.dequant, layer)?);
        Ok(())
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

/// The layout of an f16 matrix of `shape` compressed for the GPU engine
/// (a bf16 one's has the same sizes; only its header's dtype differs).
pub fn layout(shape: &[usize]) -> Result<CompressedLayout> {
    layout_of(shape, SourceDtype::F16)
}

fn layout_of(shape: &[usize], dtype: SourceDtype) -> Result<CompressedLayout> {
    CompressedLayout::new(shape, dtype, weight_config()).map_err(|e| comp_err("weight layout", e))
}

/// The layout of a `[rows, cols]` f16 matrix compressed for the GPU engine.
pub fn matrix_layout(rows: usize, cols: usize) -> Result<CompressedLayout> {
    layout(&[rows, cols])
}

/// Quantizes the values `offset..` of `held` (a part of `shape`,
/// row-major) on the GPU into a new packed buffer, after the work already
/// on the compute stream (which made them); waits, so that a value that
/// cannot be quantized is named here.
fn pack(
    gpu: &Gpu,
    quantizer: &GpuQuantizer,
    held: &HeldBuf,
    shape: &[usize],
    (target, offset): (usize, usize),
) -> Result<PackedMatrix> {
    let dtype = match held {
        HeldBuf::F16(_) => SourceDtype::F16,
        HeldBuf::BF16(_) => SourceDtype::BF16,
        HeldBuf::F32(_) => return Err(gpu_err(format!("layer tensor {target}: f32 tensors are not compressed"))),
    };
    let layout = layout_of(shape, dtype)?;
    let buf = DevBuf::<u8>::alloc(gpu, layout.total_bytes())?;
    let src = held.tensor().narrow(0, offset, layout.numel()).map_err(|e| gpu_err(format!("GPU: {e}")))?;
    quantizer.enqueue(gpu.stream(), &src, &layout, &buf.tensor().view()).and_then(|pending| pending.wait()).map_err(
        |e| match e {
            compression::Error::OutOfRange { .. } | compression::Error::NonFinite { .. } => gpu_err(format!(
                "{e}: 4-bit weights keep f16 scales, so values past f16's range cannot be compressed; run \
                 without --compress-weight"
            )),
            e => comp_err("quantizing a weight matrix on the GPU", e),
        },
    )?;
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
        let mut parts = Vec::new();
        for (k, t) in self.specs().iter().enumerate() {
            if t.compressible {
                pack_parts(gpu, &ws.quantizer, t, (k, &self.bufs[k]), &mut parts)?;
            }
        }
        let targets: Vec<usize> = (0..self.bufs.len()).filter(|&k| self.specs()[k].compressible).collect();
        for k in targets {
            let shared = ws.matrix(k).ok_or_else(|| gpu_err(format!("layer tensor {k}: no workspace matrix")))?;
            self.bufs[k] = match (shared, &self.bufs[k]) {
                (HeldBuf::F16(w), HeldBuf::F16(_)) => HeldBuf::F16(w.share()),
                (HeldBuf::BF16(w), HeldBuf::BF16(_)) => HeldBuf::BF16(w.share()),
                _ => return Err(gpu_err(format!("layer tensor {k}: the workspace holds another type"))),
            };
        }
        self.packed = Some(parts);
        Ok(self)
    }
}

/// Packs tensor `k` (`t`, held in `held`) as the parts the spec says, in
/// order.
fn pack_parts(
    gpu: &Gpu,
    quantizer: &GpuQuantizer,
    t: &TensorSpec,
    (k, held): (usize, &HeldBuf),
    parts: &mut Vec<PackedMatrix>,
) -> Result<()> {
    let mut at = 0usize;
    for shape in t.parts() {
        let n = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| gpu_err(format!("layer tensor {}: a part {shape:?} overflows", t.name)))?;
        let end = at
            .checked_add(n)
            .filter(|&end| end <= held.len())
            .ok_or_else(|| gpu_err(format!("layer tensor {}: its parts overrun its values", t.name)))?;
        let packed = pack(gpu, quantizer, held, &shape, (k, at))
            .map_err(|e| gpu_err(format!("layer tensor {}: {e}", t.name)))?;
        parts.push(packed);
        at = end;
    }
    if at != held.len() {
        return Err(gpu_err(format!("layer tensor {}: parts of {at} values for {} values", t.name, held.len())));
    }
    Ok(())
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
