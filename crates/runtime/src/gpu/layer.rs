//! One decoder layer's weights on the GPU, as the layer spec lists them.
//!
//! A [`GpuLayer`] holds one GPU buffer per tensor of the spec's layer
//! ([`ModelSpec::layer`]), in the spec's order, each in the type the spec
//! holds it in (f16, bf16 or f32): a tensor made of several checkpoint
//! tensors (a stacked q/k/v matrix) is their rows one after the other. A
//! family finds its tensors by name ([`GpuLayer::f16`], [`GpuLayer::f32`],
//! [`GpuLayer::half`]); nothing here knows what they are for.
//!
//! The buffers are filled from a checkpoint, a source tensor at a time
//! ([`GpuLayer::load`]: f16 values, converted to f32 for a tensor held in
//! f32; [`GpuLayer::load_bf16`]: bf16 values for bf16 tensors), or by
//! seeded kernels on the GPU ([`GpuLayer::dummy`]: each tensor
//! seeded by [`name_seed`] over the full name of its first source tensor,
//! with the value rule the family gives as an [`Init`]).
//!
//! [`GpuLayer`] is the unit the weight streamer moves between tiers: it
//! owns nothing but its buffers (and, compressed, its packed matrices; see
//! [`super::packed`]).

use std::sync::Arc;

use half::{bf16, f16};
use ops::gpu::buffer::{DevBuf, Half};
use ops::gpu::Gpu;
use tier_api::DType;

use super::gpu_err;
use super::packed::PackedMatrix;
use crate::error::Result;
use crate::spec::{Block, ModelSpec, TensorSpec};

/// A tensor's buffer, in the type the spec holds it in.
#[derive(Debug)]
pub enum HeldBuf {
    F16(DevBuf<f16>),
    BF16(DevBuf<bf16>),
    F32(DevBuf<f32>),
}

impl HeldBuf {
    /// Uninitialised room for `len` values of `dtype`.
    fn alloc(gpu: &Gpu, dtype: DType, len: usize, name: &str) -> Result<Self> {
        match dtype {
            DType::F16 => Ok(HeldBuf::F16(DevBuf::alloc(gpu, len)?)),
            DType::BF16 => Ok(HeldBuf::BF16(DevBuf::alloc(gpu, len)?)),
            DType::F32 => Ok(HeldBuf::F32(DevBuf::alloc(gpu, len)?)),
            other => {
                Err(gpu_err(format!("layer tensor {name}: the GPU holds weights as f16, bf16 or f32, not {other:?}")))
            }
        }
    }

    /// The GPU tier's tensor behind the buffer.
    pub fn tensor(&self) -> &tier_api::Tensor {
        match self {
            HeldBuf::F16(b) => b.tensor(),
            HeldBuf::BF16(b) => b.tensor(),
            HeldBuf::F32(b) => b.tensor(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        match self {
            HeldBuf::F16(b) => b.bytes(),
            HeldBuf::BF16(b) => b.bytes(),
            HeldBuf::F32(b) => b.bytes(),
        }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            HeldBuf::F16(b) => b.len(),
            HeldBuf::BF16(b) => b.len(),
            HeldBuf::F32(b) => b.len(),
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer as one of 16-bit type `T`, if it is one.
    pub fn as_half<T: Half>(&self) -> Option<&DevBuf<T>> {
        let any: &dyn std::any::Any = match self {
            HeldBuf::F16(b) => b,
            HeldBuf::BF16(b) => b,
            HeldBuf::F32(b) => b,
        };
        any.downcast_ref::<DevBuf<T>>()
    }

    /// The f16 buffer, if it is one.
    pub fn as_f16(&self) -> Option<&DevBuf<f16>> {
        match self {
            HeldBuf::F16(b) => Some(b),
            HeldBuf::BF16(_) | HeldBuf::F32(_) => None,
        }
    }

    /// The f32 buffer, if it is one.
    pub fn as_f32(&self) -> Option<&DevBuf<f32>> {
        match self {
            HeldBuf::F32(b) => Some(b),
            HeldBuf::F16(_) | HeldBuf::BF16(_) => None,
        }
    }
}

/// How a seeded (`--dummy`) tensor's values are made; a family says it for
/// each tensor of its spec.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Every value this one.
    Constant(f32),
    /// Seeded uniform values in ±the scale.
    Uniform(f32),
}

/// A family's rule for seeded tensors.
pub type InitRule = fn(&TensorSpec) -> Init;

/// A tensor's seed: FNV-1a over its name mixed with the run's seed (the
/// CPU generator's rule, so names map to seeds the same way).
pub fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A checkpoint's tensor by full name and shape, as f16.
pub type GetTensor<'a> = dyn FnMut(&str, &[usize]) -> Result<Vec<f16>> + 'a;

/// A checkpoint's tensor by full name and shape, as bf16.
pub type GetBf16<'a> = dyn FnMut(&str, &[usize]) -> Result<Vec<bf16>> + 'a;

/// Where a layer's values come from.
enum Fill<'a, 'b> {
    /// A checkpoint's tensors.
    Source(&'a mut GetTensor<'b>),
    /// A checkpoint's tensors, for a layer held in bf16.
    SourceBf16(&'a mut GetBf16<'b>),
    /// Seeded kernels: the run's seed and the family's rule.
    Dummy(u64, InitRule),
}

/// Elements of a spec tensor, checked.
fn elements(t: &TensorSpec) -> Result<usize> {
    t.elements()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| gpu_err(format!("layer tensor {}: {:?} overflows", t.name, t.shape)))
}

/// One decoder layer's weights on the GPU (see the module's documentation).
#[derive(Debug)]
pub struct GpuLayer {
    /// The spec's layer tensors, `bufs[k]` holding `specs[k]`.
    specs: Arc<[TensorSpec]>,
    pub(super) bufs: Vec<HeldBuf>,
    /// With `--compress-weight`: the compressible tensors quantized and
    /// packed (see [`super::packed`]); their buffers in `bufs` are then
    /// handles on the shared f16 workspace they are dequantized into.
    pub(super) packed: Option<Vec<PackedMatrix>>,
}

impl GpuLayer {
    fn make(gpu: &Gpu, spec: &ModelSpec, i: usize, fill: &mut Fill<'_, '_>) -> Result<Self> {
        let mut bufs = Vec::with_capacity(spec.layer.len());
        for t in &spec.layer {
            let len = elements(t)?;
            let buf = HeldBuf::alloc(gpu, t.dtype, len, &t.name)?;
            let sources = t.sources();
            match fill {
                Fill::Source(_) | Fill::SourceBf16(_) => {
                    let mut at = 0usize;
                    for s in &sources {
                        let name = spec.layer_name(i, &s.name);
                        let n = match (&mut *fill, &buf) {
                            (Fill::Source(get), HeldBuf::F16(b)) => {
                                let values = get(&name, &s.shape)?;
                                b.upload(gpu.stream(), at, &values)?;
                                values.len()
                            }
                            (Fill::Source(get), HeldBuf::F32(b)) => {
                                let wide: Vec<f32> = get(&name, &s.shape)?.iter().map(|v| v.to_f32()).collect();
                                b.upload(gpu.stream(), at, &wide)?;
                                wide.len()
                            }
                            (Fill::SourceBf16(get), HeldBuf::BF16(b)) => {
                                let values = get(&name, &s.shape)?;
                                b.upload(gpu.stream(), at, &values)?;
                                values.len()
                            }
                            (Fill::SourceBf16(get), HeldBuf::F32(b)) => {
                                let wide: Vec<f32> = get(&name, &s.shape)?.iter().map(|v| v.to_f32()).collect();
                                b.upload(gpu.stream(), at, &wide)?;
                                wide.len()
                            }
                            _ => {
                                return Err(gpu_err(format!(
                                    "layer tensor {}: held as {:?}, loaded from values of another 16-bit type",
                                    t.name, t.dtype
                                )))
                            }
                        };
                        // The host vectors are gone: the driver staged them.
                        at = at
                            .checked_add(n)
                            .ok_or_else(|| gpu_err(format!("layer tensor {}: size overflows", t.name)))?;
                    }
                    if at != len {
                        return Err(gpu_err(format!(
                            "layer tensor {}: its sources hold {at} values, the spec {len}",
                            t.name
                        )));
                    }
                }
                Fill::Dummy(seed, rule) => {
                    let first = sources.first().map_or(t.name.as_str(), |s| s.name.as_str());
                    let seed_n = name_seed(*seed, &spec.layer_name(i, first));
                    let k = &gpu.kernels;
                    match (rule(t), &buf) {
                        (Init::Constant(v), HeldBuf::F16(b)) => k.fill_f16(gpu, b, v)?,
                        (Init::Constant(v), HeldBuf::F32(b)) => k.fill_f32(gpu, b, v)?,
                        (Init::Uniform(s), HeldBuf::F16(b)) => k.fill_uniform_f16(gpu, b, seed_n, s)?,
                        (Init::Uniform(s), HeldBuf::F32(b)) => k.fill_uniform_f32(gpu, b, seed_n, s)?,
                        (Init::Constant(v), HeldBuf::BF16(b)) => gpu.llm()?.fill(gpu, b, v)?,
                        (Init::Uniform(s), HeldBuf::BF16(b)) => gpu.llm()?.fill_uniform(gpu, b, seed_n, s)?,
                    }
                }
            }
            bufs.push(buf);
        }
        Ok(GpuLayer { specs: spec.layer.clone().into(), bufs, packed: None })
    }

    /// Layer `i` of `spec` from a checkpoint: `get(name, shape)` gives the
    /// tensor of that full name (the layer's prefix included) as f16, in
    /// the order the spec lists its tensors and their sources.
    pub fn load(gpu: &Gpu, spec: &ModelSpec, i: usize, get: &mut GetTensor<'_>) -> Result<Self> {
        Self::make(gpu, spec, i, &mut Fill::Source(get))
    }

    /// Layer `i` of `spec` (held in bf16) from a checkpoint: as
    /// [`GpuLayer::load`], the values as bf16.
    pub fn load_bf16(gpu: &Gpu, spec: &ModelSpec, i: usize, get: &mut GetBf16<'_>) -> Result<Self> {
        Self::make(gpu, spec, i, &mut Fill::SourceBf16(get))
    }

    /// Layer `i`'s seeded values, made on the GPU by `rule` (each tensor's
    /// seed from the run's `seed` and its first source's full name).
    pub fn dummy(gpu: &Gpu, spec: &ModelSpec, i: usize, seed: u64, rule: InitRule) -> Result<Self> {
        Self::make(gpu, spec, i, &mut Fill::Dummy(seed, rule))
    }

    /// The spec's tensors, in the order of the buffers.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// The buffers, in the spec's order (compressed: a compressible
    /// tensor's is the shared workspace's).
    pub fn bufs(&self) -> &[HeldBuf] {
        &self.bufs
    }

    /// Where the spec lists `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|t| t.name == name)
    }

    /// The tensor `name` as f16; `None` if the spec has no such tensor, an
    /// error if it holds it in another type.
    pub fn f16(&self, name: &str) -> Result<Option<&DevBuf<f16>>> {
        match self.index(name) {
            None => Ok(None),
            Some(k) => self.bufs[k]
                .as_f16()
                .map(Some)
                .ok_or_else(|| gpu_err(format!("layer tensor {name} is held as {:?}, not f16", self.specs[k].dtype))),
        }
    }

    /// The tensor `name` as 16-bit type `T`; `None` if the spec has no such
    /// tensor, an error if it holds it in another type.
    pub fn half<T: Half>(&self, name: &str) -> Result<Option<&DevBuf<T>>> {
        match self.index(name) {
            None => Ok(None),
            Some(k) => self.bufs[k].as_half::<T>().map(Some).ok_or_else(|| {
                gpu_err(format!("layer tensor {name} is held as {:?}, not {}", self.specs[k].dtype, T::SUFFIX))
            }),
        }
    }

    /// The tensor `name` as f32; `None` if the spec has no such tensor, an
    /// error if it holds it in another type.
    pub fn f32(&self, name: &str) -> Result<Option<&DevBuf<f32>>> {
        match self.index(name) {
            None => Ok(None),
            Some(k) => self.bufs[k]
                .as_f32()
                .map(Some)
                .ok_or_else(|| gpu_err(format!("layer tensor {name} is held as {:?}, not f32", self.specs[k].dtype))),
        }
    }

    /// Whether the compressible tensors are held packed.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The GPU tier's tensors behind every buffer, in a fixed order (the
    /// same for every layer of a model): what moves between tiers. Whole:
    /// every buffer in the spec's order. Compressed: the tensors that stay
    /// whole in the spec's order, then the packed matrices in the spec's
    /// order (the f16 matrices are the shared workspace, not this layer's).
    pub fn tensors(&self) -> Vec<&tier_api::Tensor> {
        match &self.packed {
            None => self.bufs.iter().map(HeldBuf::tensor).collect(),
            Some(parts) => self
                .bufs
                .iter()
                .zip(self.specs.iter())
                .filter(|(_, t)| !t.compressible)
                .map(|(b, _)| b.tensor())
                .chain(parts.iter().map(|p| p.buf.tensor()))
                .collect(),
        }
    }

    /// For each of [`GpuLayer::tensors`], whether the MLP block alone reads
    /// it (the spec's [`Block::Mlp`]): with `--sep-layer` those copy after
    /// the attention block's and are waited for only before the MLP.
    /// Compressed layers are unpacked whole, so none is set apart.
    pub fn mlp_tensors(&self) -> Vec<bool> {
        match &self.packed {
            Some(_) => vec![false; self.tensors().len()],
            None => self.specs.iter().map(|t| t.block == Block::Mlp).collect(),
        }
    }

    /// Bytes held on the GPU (packed matrices when compressed; the shared
    /// workspace is not this layer's).
    pub fn bytes(&self) -> u64 {
        self.tensors().iter().map(|t| t.byte_len() as u64).sum()
    }

    /// Bytes of the whole form (what [`GpuLayer::bytes`] is when not
    /// compressed).
    pub fn f16_bytes(&self) -> u64 {
        self.bufs.iter().map(HeldBuf::bytes).sum()
    }
}
