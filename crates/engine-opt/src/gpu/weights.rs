//! OPT's weights on the GPU.
//!
//! A decoder layer is a [`GpuLayer`] made from OPT's spec
//! ([`crate::spec::model_spec`] with `gpu`): matrices f16 as stored, the
//! q, k and v projections stacked into one `[3·hidden, hidden]` matrix (and
//! their biases into one vector), so that one product makes all three.
//! Biases are held in the type of the product they are fused into: f16 for
//! q/k/v and fc1 (f16 outputs), f32 for out_proj and fc2 (which add into the
//! f32 residual stream); both are exact copies of the f16 values a
//! checkpoint holds. Layer norms are f16. [`OptLayer`] finds OPT's tensors
//! in a [`GpuLayer`] by name; [`load_layer`] and [`dummy_layer`] make one.
//!
//! The embeddings, the final norm and the projections ([`GpuEmbeddings`])
//! stay on the GPU.

use half::f16;
use indicatif::ProgressBar;

use runtime::spec::{ModelSpec, TensorSpec};

use super::buffer::DevBuf;
use super::layer::{name_seed, GpuLayer, Init};
use super::Gpu;
use crate::config::OptConfig;
use crate::dummy::DummyWeights;
use crate::error::{Error, Result};
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

/// OPT's rule for seeded tensors (the CPU generator's, [`DummyWeights`]):
/// matrices uniform in ±[`DummyWeights::SCALE`], biases in ±half that,
/// layer norms 1 and 0.
pub fn dummy_init(t: &TensorSpec) -> Init {
    let is_norm = t.name.contains("layer_norm");
    if is_norm && t.name.ends_with(".weight") {
        Init::Constant(1.0)
    } else if is_norm && t.name.ends_with(".bias") {
        Init::Constant(0.0)
    } else if t.shape.len() == 1 {
        Init::Uniform(DummyWeights::SCALE / 2.0)
    } else {
        Init::Uniform(DummyWeights::SCALE)
    }
}

/// Layer `i` of `spec` from `src` (checked shapes and finite values, as the
/// CPU loader; the progress bar counts each checkpoint tensor). A failure
/// of `src` is returned as it was.
pub fn load_layer(gpu: &Gpu, spec: &ModelSpec, i: usize, src: &dyn WeightSource, pb: &ProgressBar) -> Result<GpuLayer> {
    let mut failure = None;
    let layer = GpuLayer::load(gpu, spec, i, &mut |name, shape| {
        let tensor = || -> Result<Vec<f16>> {
            let t = src.load(name, shape)?;
            crate::finite::check_weights(name, &t)?;
            pb.inc(1);
            Ok(t)
        };
        tensor().map_err(|e| {
            let message = e.to_string();
            failure = Some(e);
            runtime::Error::Checkpoint(message)
        })
    });
    match (layer, failure) {
        (Ok(layer), _) => Ok(layer),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e.into()),
    }
}

/// Layer `i`'s seeded random weights, made on the GPU by [`dummy_init`]
/// (the CPU generator's distribution; not its values).
pub fn dummy_layer(gpu: &Gpu, spec: &ModelSpec, i: usize, seed: u64) -> Result<GpuLayer> {
    Ok(GpuLayer::dummy(gpu, spec, i, seed, dummy_init)?)
}

/// A layer norm's weight and bias as the layer norm kernel takes them.
pub type NormParams<'a> = Option<(&'a DevBuf<f16>, &'a DevBuf<f16>)>;

/// OPT's tensors of one [`GpuLayer`], found by their spec names.
#[derive(Debug, Clone, Copy)]
pub struct OptLayer<'a> {
    pub self_attn_layer_norm: NormParams<'a>,
    /// q, k, v projections stacked: `[3·hidden, hidden]`.
    pub qkv: &'a DevBuf<f16>,
    /// `[3·hidden]`.
    pub qkv_bias: Option<&'a DevBuf<f16>>,
    /// `[hidden, hidden]`.
    pub out_proj: &'a DevBuf<f16>,
    pub out_proj_bias: Option<&'a DevBuf<f32>>,
    pub final_layer_norm: NormParams<'a>,
    /// `[ffn, hidden]`.
    pub fc1: &'a DevBuf<f16>,
    pub fc1_bias: Option<&'a DevBuf<f16>>,
    /// `[hidden, ffn]`.
    pub fc2: &'a DevBuf<f16>,
    pub fc2_bias: Option<&'a DevBuf<f32>>,
}

/// `found`, checked to be there exactly when `want`.
fn present<T>(found: Option<T>, want: bool, name: &str) -> Result<Option<T>> {
    match (found, want) {
        (Some(t), true) => Ok(Some(t)),
        (None, false) => Ok(None),
        (Some(_), false) => Err(Error::Gpu(format!("layer tensor {name} is held, but the configuration has none"))),
        (None, true) => Err(Error::Gpu(format!("layer tensor {name} is missing from the GPU layer"))),
    }
}

fn required<T>(found: Option<T>, name: &str) -> Result<T> {
    found.ok_or_else(|| Error::Gpu(format!("layer tensor {name} is missing from the GPU layer")))
}

/// The spec names [`OptLayer`] looks up (see [`crate::spec::model_spec`]),
/// and whether each is there for a configuration: `(name, needs bias,
/// needs affine norms)`.
const NAMES: [(&str, bool, bool); 12] = [
    ("self_attn_layer_norm.weight", false, true),
    ("self_attn_layer_norm.bias", false, true),
    ("self_attn.qkv_proj.weight", false, false),
    ("self_attn.qkv_proj.bias", true, false),
    ("self_attn.out_proj.weight", false, false),
    ("self_attn.out_proj.bias", true, false),
    ("final_layer_norm.weight", false, true),
    ("final_layer_norm.bias", false, true),
    ("fc1.weight", false, false),
    ("fc1.bias", true, false),
    ("fc2.weight", false, false),
    ("fc2.bias", true, false),
];

impl<'a> OptLayer<'a> {
    /// `layer`'s tensors by their names in [`crate::spec::model_spec`],
    /// the optional ones (biases, affine norms) there exactly when `config`
    /// has them.
    pub fn of(layer: &'a GpuLayer, config: &OptConfig) -> Result<Self> {
        let (bias, affine) = (config.enable_bias, config.layer_norm_elementwise_affine);
        let wanted = |k: usize| -> (&'static str, bool) {
            let (name, needs_bias, needs_affine) = NAMES[k];
            (name, (!needs_bias || bias) && (!needs_affine || affine))
        };
        let f16 = |k: usize| -> Result<Option<&'a DevBuf<f16>>> {
            let (name, want) = wanted(k);
            present(layer.f16(name)?, want, name)
        };
        let f32 = |k: usize| -> Result<Option<&'a DevBuf<f32>>> {
            let (name, want) = wanted(k);
            present(layer.f32(name)?, want, name)
        };
        let matrix = |k: usize| -> Result<&'a DevBuf<f16>> { required(f16(k)?, NAMES[k].0) };
        Ok(OptLayer {
            self_attn_layer_norm: f16(0)?.zip(f16(1)?),
            qkv: matrix(2)?,
            qkv_bias: f16(3)?,
            out_proj: matrix(4)?,
            out_proj_bias: f32(5)?,
            final_layer_norm: f16(6)?.zip(f16(7)?),
            fc1: matrix(8)?,
            fc1_bias: f16(9)?,
            fc2: matrix(10)?,
            fc2_bias: f32(11)?,
        })
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
    /// [`dummy_layer`]).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> Vec<OptConfig> {
        let mut out = Vec::new();
        for (bias, affine) in [(true, true), (false, true), (true, false), (false, false)] {
            let mut c = OptConfig::preset("opt-125m").unwrap();
            c.enable_bias = bias;
            c.layer_norm_elementwise_affine = affine;
            out.push(c);
        }
        out
    }

    #[test]
    fn the_names_looked_up_are_the_gpu_spec_s_layer() {
        for c in configs() {
            let spec = crate::spec::model_spec(&c, true).unwrap();
            let mut wanted: Vec<&str> = NAMES
                .iter()
                .filter(|(_, b, a)| (!b || c.enable_bias) && (!a || c.layer_norm_elementwise_affine))
                .map(|(n, _, _)| *n)
                .collect();
            let mut held: Vec<&str> = spec.layer.iter().map(|t| t.name.as_str()).collect();
            wanted.sort_unstable();
            held.sort_unstable();
            assert_eq!(wanted, held, "bias {} affine {}", c.enable_bias, c.layer_norm_elementwise_affine);
            // The types OptLayer asks for: f32 for the biases fused into an f32 output.
            for t in &spec.layer {
                let f32 = t.name == "self_attn.out_proj.bias" || t.name == "fc2.bias";
                assert_eq!(t.dtype == tier_api::DType::F32, f32, "{}", t.name);
            }
        }
    }

    #[test]
    fn the_gpu_spec_is_in_the_order_the_engine_moved_its_tensors() {
        // The order GpuLayerWeights::tensors gave before the layer was the
        // spec's: norms, then each matrix followed by its bias.
        let c = OptConfig::preset("opt-125m").unwrap();
        let names: Vec<String> = crate::spec::model_spec(&c, true).unwrap().layer.into_iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            [
                "self_attn_layer_norm.weight",
                "self_attn_layer_norm.bias",
                "final_layer_norm.weight",
                "final_layer_norm.bias",
                "self_attn.qkv_proj.weight",
                "self_attn.qkv_proj.bias",
                "self_attn.out_proj.weight",
                "self_attn.out_proj.bias",
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias",
            ]
        );
    }

    #[test]
    fn seeded_tensors_follow_the_cpu_generator_s_rule() {
        let c =
            OptConfig::from_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/opt/tiny-opt"))
                .unwrap();
        let spec = crate::spec::model_spec(&c, true).unwrap();
        let cpu = DummyWeights::new(3);
        for t in &spec.layer {
            let s = t.sources().remove(0);
            let values = cpu.load(&spec.layer_name(0, &s.name), &s.shape).unwrap();
            match dummy_init(t) {
                Init::Constant(v) => assert!(values.iter().all(|x| x.to_f32() == v), "{}", t.name),
                Init::Uniform(scale) => {
                    // f16 rounding may pass the bound by a rounding step.
                    assert!(values.iter().all(|x| x.to_f32().abs() <= scale * 1.001), "{}", t.name);
                    assert!(values.iter().any(|x| x.to_f32().abs() > scale / 4.0), "{}: scale {scale}", t.name);
                }
            }
        }
    }
}
