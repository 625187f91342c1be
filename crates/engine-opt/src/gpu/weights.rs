//! The model's weights as GPU buffers, a layer at a time.
//!
//! Matrices are f16 as stored. The q, k and v projections are stacked into
//! one `[3·hidden, hidden]` matrix (and their biases into one vector), so
//! that one product makes all three. Biases are held in the type of the
//! product they are fused into: f16 for q/k/v and fc1 (f16 outputs), f32 for
//! out_proj and fc2 (which add into the f32 residual stream); both are exact
//! copies of the f16 values a checkpoint holds. Layer norms are f16.
//!
//! [`GpuLayerWeights`] is the unit a later block schedule moves between
//! tiers: it owns nothing but its buffers.

use half::f16;
use indicatif::ProgressBar;

use super::buffer::{DevBuf, DevElem};
use super::Gpu;
use crate::config::OptConfig;
use crate::dummy::DummyWeights;
use crate::error::Result;
use crate::weights::WeightSource;

/// A layer norm's affine parameters (absent for a norm without them).
#[derive(Debug)]
pub struct GpuLayerNorm {
    pub weight: DevBuf<f16>,
    pub bias: DevBuf<f16>,
}

impl GpuLayerNorm {
    /// The pair as the layer norm kernel takes it.
    pub fn params(norm: &Option<GpuLayerNorm>) -> Option<(&DevBuf<f16>, &DevBuf<f16>)> {
        norm.as_ref().map(|n| (&n.weight, &n.bias))
    }
}

/// One decoder layer's weights on the GPU.
#[derive(Debug)]
pub struct GpuLayerWeights {
    pub self_attn_layer_norm: Option<GpuLayerNorm>,
    /// q, k, v projections stacked: `[3·hidden, hidden]`.
    pub qkv: DevBuf<f16>,
    /// `[3·hidden]`.
    pub qkv_bias: Option<DevBuf<f16>>,
    /// `[hidden, hidden]`.
    pub out_proj: DevBuf<f16>,
    pub out_proj_bias: Option<DevBuf<f32>>,
    pub final_layer_norm: Option<GpuLayerNorm>,
    /// `[ffn, hidden]`.
    pub fc1: DevBuf<f16>,
    pub fc1_bias: Option<DevBuf<f16>>,
    /// `[hidden, ffn]`.
    pub fc2: DevBuf<f16>,
    pub fc2_bias: Option<DevBuf<f32>>,
    /// With `--compress-weight`: the matrices quantized and packed (see
    /// [`super::packed`]); `qkv`, `out_proj`, `fc1` and `fc2` are then
    /// handles on the shared f16 workspace they are dequantized into.
    pub packed: Option<Vec<super::packed::PackedMatrix>>,
}

/// The weights outside the layers.
#[derive(Debug)]
pub struct GpuEmbeddings {
    /// `[vocab, word_embed_proj_dim]`, also the output projection.
    pub embed_tokens: DevBuf<f16>,
    /// `[max_position_embeddings + 2, hidden]`.
    pub embed_positions: DevBuf<f16>,
    /// `[hidden, word_embed_proj_dim]` (opt-350m).
    pub project_in: Option<DevBuf<f16>>,
    /// `[word_embed_proj_dim, hidden]` (opt-350m).
    pub project_out: Option<DevBuf<f16>>,
    pub final_layer_norm: Option<GpuLayerNorm>,
}

/// Where weights come from: named tensors from a source, or seeded random
/// numbers made on the GPU.
enum Fill<'a> {
    Source(&'a dyn WeightSource, &'a ProgressBar),
    Dummy(u64),
}

/// A tensor's seed: FNV-1a over its name mixed with the run's seed (the CPU
/// generator's rule, so names map to seeds the same way).
fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl Fill<'_> {
    fn matrix(&self, gpu: &Gpu, name: &str, rows: usize, cols: usize) -> Result<DevBuf<f16>> {
        match self {
            Fill::Source(src, pb) => {
                let t = src.load(name, &[rows, cols])?;
                crate::finite::check_weights(name, &t)?;
                pb.inc(1);
                Ok(DevBuf::from_host(gpu, &t)?)
            }
            Fill::Dummy(seed) => {
                let buf = DevBuf::alloc(gpu, rows * cols)?;
                gpu.kernels.fill_uniform_f16(gpu, &buf, name_seed(*seed, name), DummyWeights::SCALE)?;
                Ok(buf)
            }
        }
    }

    /// Several matrices of the same width stacked by rows into one buffer.
    fn stacked(&self, gpu: &Gpu, names: &[String], rows: usize, cols: usize) -> Result<DevBuf<f16>> {
        let buf = DevBuf::alloc(gpu, names.len() * rows * cols)?;
        match self {
            Fill::Source(src, pb) => {
                for (i, name) in names.iter().enumerate() {
                    let t = src.load(name, &[rows, cols])?;
                    crate::finite::check_weights(name, &t)?;
                    crate::finite::check_weights(name, &t)?;
                    pb.inc(1);
                    buf.upload(gpu.stream(), i * rows * cols, &t)?;
                }
                // The host vectors are gone: the driver staged them.
            }
            Fill::Dummy(seed) => {
                let seed_n = names.first().map_or(0, |n| name_seed(*seed, n));
                gpu.kernels.fill_uniform_f16(gpu, &buf, seed_n, DummyWeights::SCALE)?;
            }
        }
        Ok(buf)
    }

    /// A bias vector (f16 or f32 on the GPU, f16 values either way).
    fn bias<T: BiasElem>(&self, gpu: &Gpu, names: &[String], len: usize) -> Result<DevBuf<T>> {
        let buf = DevBuf::alloc(gpu, names.len() * len)?;
        match self {
            Fill::Source(src, pb) => {
                for (i, name) in names.iter().enumerate() {
                    let t = src.load(name, &[len])?;
                    crate::finite::check_weights(name, &t)?;
                    pb.inc(1);
                    let v: Vec<T> = t.iter().map(|&x| T::from_f16(x)).collect();
                    buf.upload(gpu.stream(), i * len, &v)?;
                }
            }
            Fill::Dummy(seed) => {
                let seed_n = names.first().map_or(0, |n| name_seed(*seed, n));
                T::fill_uniform(gpu, &buf, seed_n, DummyWeights::SCALE / 2.0)?;
            }
        }
        Ok(buf)
    }

    fn layer_norm(&self, gpu: &Gpu, prefix: &str, dim: usize, affine: bool) -> Result<Option<GpuLayerNorm>> {
        if !affine {
            return Ok(None);
        }
        let (wn, bn) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        match self {
            Fill::Source(src, pb) => {
                let w = src.load(&wn, &[dim])?;
                crate::finite::check_weights(&wn, &w)?;
                let b = src.load(&bn, &[dim])?;
                crate::finite::check_weights(&bn, &b)?;
                pb.inc(2);
                Ok(Some(GpuLayerNorm { weight: DevBuf::from_host(gpu, &w)?, bias: DevBuf::from_host(gpu, &b)? }))
            }
            Fill::Dummy(_) => {
                let (weight, bias) = (DevBuf::alloc(gpu, dim)?, DevBuf::alloc(gpu, dim)?);
                gpu.kernels.fill_f16(gpu, &weight, 1.0)?;
                gpu.kernels.fill_f16(gpu, &bias, 0.0)?;
                Ok(Some(GpuLayerNorm { weight, bias }))
            }
        }
    }
}

/// A bias element type: f16 values held as themselves or as f32.
trait BiasElem: DevElem {
    fn from_f16(v: f16) -> Self;
    fn fill_uniform(gpu: &Gpu, buf: &DevBuf<Self>, seed: u64, scale: f32) -> Result<()>;
}

impl BiasElem for f16 {
    fn from_f16(v: f16) -> Self {
        v
    }
    fn fill_uniform(gpu: &Gpu, buf: &DevBuf<Self>, seed: u64, scale: f32) -> Result<()> {
        Ok(gpu.kernels.fill_uniform_f16(gpu, buf, seed, scale)?)
    }
}

impl BiasElem for f32 {
    fn from_f16(v: f16) -> Self {
        v.to_f32()
    }
    fn fill_uniform(gpu: &Gpu, buf: &DevBuf<Self>, seed: u64, scale: f32) -> Result<()> {
        Ok(gpu.kernels.fill_uniform_f32(gpu, buf, seed, scale)?)
    }
}

impl GpuLayerWeights {
    fn make(gpu: &Gpu, c: &OptConfig, i: usize, fill: &Fill<'_>) -> Result<Self> {
        let p = format!("decoder.layers.{i}");
        let (h, f, bias, affine) = (c.hidden_size, c.ffn_dim, c.enable_bias, c.layer_norm_elementwise_affine);
        let qkv_names: Vec<String> =
            ["q_proj", "k_proj", "v_proj"].iter().map(|n| format!("{p}.self_attn.{n}")).collect();
        let weight_names: Vec<String> = qkv_names.iter().map(|n| format!("{n}.weight")).collect();
        let bias_names: Vec<String> = qkv_names.iter().map(|n| format!("{n}.bias")).collect();
        let one = |n: String| vec![n];
        Ok(GpuLayerWeights {
            self_attn_layer_norm: fill.layer_norm(gpu, &format!("{p}.self_attn_layer_norm"), h, affine)?,
            qkv: fill.stacked(gpu, &weight_names, h, h)?,
            qkv_bias: if bias { Some(fill.bias(gpu, &bias_names, h)?) } else { None },
            out_proj: fill.matrix(gpu, &format!("{p}.self_attn.out_proj.weight"), h, h)?,
            out_proj_bias: if bias {
                Some(fill.bias(gpu, &one(format!("{p}.self_attn.out_proj.bias")), h)?)
            } else {
                None
            },
            final_layer_norm: fill.layer_norm(gpu, &format!("{p}.final_layer_norm"), h, affine)?,
            fc1: fill.matrix(gpu, &format!("{p}.fc1.weight"), f, h)?,
            fc1_bias: if bias { Some(fill.bias(gpu, &one(format!("{p}.fc1.bias")), f)?) } else { None },
            fc2: fill.matrix(gpu, &format!("{p}.fc2.weight"), h, f)?,
            fc2_bias: if bias { Some(fill.bias(gpu, &one(format!("{p}.fc2.bias")), h)?) } else { None },
            packed: None,
        })
    }

    /// Layer `i`'s weights from `src` (checked shapes, as the CPU loader).
    pub fn load(gpu: &Gpu, config: &OptConfig, i: usize, src: &dyn WeightSource, pb: &ProgressBar) -> Result<Self> {
        Self::make(gpu, config, i, &Fill::Source(src, pb))
    }

    /// Layer `i`'s seeded random weights, made on the GPU: matrices uniform
    /// in ±[`DummyWeights::SCALE`], biases in ±half that, layer norms 1 and
    /// 0 (the CPU generator's distribution; not its values).
    pub fn dummy(gpu: &Gpu, config: &OptConfig, i: usize, seed: u64) -> Result<Self> {
        Self::make(gpu, config, i, &Fill::Dummy(seed))
    }

    /// The GPU tier's tensors behind every buffer, in a fixed order (the
    /// same for every layer of a model): what moves between tiers.
    pub fn tensors(&self) -> Vec<&tier_api::Tensor> {
        let mut out = Vec::with_capacity(14);
        for n in [&self.self_attn_layer_norm, &self.final_layer_norm].into_iter().flatten() {
            out.push(n.weight.tensor());
            out.push(n.bias.tensor());
        }
        if let Some(parts) = &self.packed {
            // Compressed: the vectors, then the packed matrices (the f16
            // matrices are the shared workspace, not this layer's).
            out.extend(self.qkv_bias.as_ref().map(DevBuf::tensor));
            out.extend(self.out_proj_bias.as_ref().map(DevBuf::tensor));
            out.extend(self.fc1_bias.as_ref().map(DevBuf::tensor));
            out.extend(self.fc2_bias.as_ref().map(DevBuf::tensor));
            out.extend(parts.iter().map(|p| p.buf.tensor()));
            return out;
        }
        out.push(self.qkv.tensor());
        out.extend(self.qkv_bias.as_ref().map(DevBuf::tensor));
        out.push(self.out_proj.tensor());
        out.extend(self.out_proj_bias.as_ref().map(DevBuf::tensor));
        out.push(self.fc1.tensor());
        out.extend(self.fc1_bias.as_ref().map(DevBuf::tensor));
        out.push(self.fc2.tensor());
        out.extend(self.fc2_bias.as_ref().map(DevBuf::tensor));
        out
    }

    /// For each of [`GpuLayerWeights::tensors`], whether the MLP block alone
    /// reads it (its norm, `fc1`, `fc2`): with `--sep-layer` those copy
    /// after the attention block's and are waited for only before the MLP.
    /// Compressed layers are unpacked whole, so none is set apart.
    pub fn mlp_tensors(&self) -> Vec<bool> {
        let tensors = self.tensors();
        if self.packed.is_some() {
            return vec![false; tensors.len()];
        }
        let mut mlp: Vec<&tier_api::Tensor> = vec![self.fc1.tensor(), self.fc2.tensor()];
        mlp.extend(self.fc1_bias.as_ref().map(DevBuf::tensor));
        mlp.extend(self.fc2_bias.as_ref().map(DevBuf::tensor));
        if let Some(n) = &self.final_layer_norm {
            mlp.extend([n.weight.tensor(), n.bias.tensor()]);
        }
        tensors.iter().map(|t| mlp.iter().any(|m| m.same_storage(t))).collect()
    }

    /// Bytes held on the GPU (packed matrices when compressed; the shared
    /// workspace is not this layer's).
    pub fn bytes(&self) -> u64 {
        self.tensors().iter().map(|t| t.byte_len() as u64).sum()
    }

    /// Bytes of the f16 form (what [`GpuLayerWeights::bytes`] is when not
    /// compressed).
    pub fn f16_bytes(&self) -> u64 {
        let norm = |n: &Option<GpuLayerNorm>| n.as_ref().map_or(0, |n| n.weight.bytes() + n.bias.bytes());
        norm(&self.self_attn_layer_norm)
            + norm(&self.final_layer_norm)
            + self.qkv.bytes()
            + self.qkv_bias.as_ref().map_or(0, DevBuf::bytes)
            + self.out_proj.bytes()
            + self.out_proj_bias.as_ref().map_or(0, DevBuf::bytes)
            + self.fc1.bytes()
            + self.fc1_bias.as_ref().map_or(0, DevBuf::bytes)
            + self.fc2.bytes()
            + self.fc2_bias.as_ref().map_or(0, DevBuf::bytes)
    }
}

impl GpuEmbeddings {
    fn make(gpu: &Gpu, c: &OptConfig, fill: &Fill<'_>) -> Result<Self> {
        let (h, e) = (c.hidden_size, c.word_embed_proj_dim());
        let embed_tokens = fill.matrix(gpu, "decoder.embed_tokens.weight", c.vocab_size, e)?;
        let embed_positions = fill.matrix(gpu, "decoder.embed_positions.weight", c.position_rows(), h)?;
        let (project_in, project_out) = if c.has_projections() {
            (
                Some(fill.matrix(gpu, "decoder.project_in.weight", h, e)?),
                Some(fill.matrix(gpu, "decoder.project_out.weight", e, h)?),
            )
        } else {
            (None, None)
        };
        let final_layer_norm = if c.has_final_layer_norm() {
            fill.layer_norm(gpu, "decoder.final_layer_norm", h, c.layer_norm_elementwise_affine)?
        } else {
            None
        };
        Ok(GpuEmbeddings { embed_tokens, embed_positions, project_in, project_out, final_layer_norm })
    }

    /// The embeddings (and final norm, projections) from `src`.
    pub fn load(gpu: &Gpu, config: &OptConfig, src: &dyn WeightSource, pb: &ProgressBar) -> Result<Self> {
        Self::make(gpu, config, &Fill::Source(src, pb))
    }

    /// Seeded random embeddings made on the GPU (see
    /// [`GpuLayerWeights::dummy`]).
    pub fn dummy(gpu: &Gpu, config: &OptConfig, seed: u64) -> Result<Self> {
        Self::make(gpu, config, &Fill::Dummy(seed))
    }

    /// Bytes held on the GPU.
    pub fn bytes(&self) -> u64 {
        self.embed_tokens.bytes()
            + self.embed_positions.bytes()
            + self.project_in.as_ref().map_or(0, DevBuf::bytes)
            + self.project_out.as_ref().map_or(0, DevBuf::bytes)
            + self.final_layer_norm.as_ref().map_or(0, |n| n.weight.bytes() + n.bias.bytes())
    }
}
