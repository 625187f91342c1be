//! The OPT decoder on the CPU, written plainly over the op layer's CPU
//! reference (`ops::cpu`).
//!
//! [`OptModel`] holds the weights outside the layers and the layers kept in
//! host memory, each a [`HostLayer`]: the tensors OPT's spec lists
//! ([`crate::spec::model_spec`], q/k/v stacked into one projection), in f16.
//! It is a [`CpuModel`]: the runtime's CPU engine
//! ([`runtime::cpu::CpuEngine`]) runs [`CpuModel::embed`], then
//! [`CpuModel::layer_forward`] for each layer over a block of batches (the
//! order a tiered engine uses), then [`CpuModel::logits`].

use indicatif::ProgressBar;
use ops::cpu::{self as op, Activation, AttentionShape, DType, KvCache, Tensor};
use runtime::cpu::{CpuModel, HostLayer, Step};
use runtime::spec::ModelSpec;

use crate::config::{OptConfig, POSITION_OFFSET};
use crate::error::Result;
use crate::weights::WeightSource;

/// LayerNorm's epsilon in every OPT model.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// A LayerNorm's weight and bias (ones and zeros for models without
/// element-wise affine parameters).
#[derive(Debug, Clone, PartialEq)]
pub struct Norm {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Norm {
    fn apply(&self, x: &mut [f32]) -> runtime::Result<()> {
        Ok(op::layer_norm(x, &self.weight, &self.bias, LAYER_NORM_EPS)?)
    }
}

/// Reads checkpoint tensors by name as f16, checking that they are finite
/// and counting them on a progress bar.
struct Loader<'a> {
    src: &'a dyn WeightSource,
    progress: &'a ProgressBar,
}

impl Loader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let values = self.src.load(name, shape)?;
        crate::finite::check_weights(name, &values)?;
        self.progress.inc(1);
        Ok(Tensor::new(shape.to_vec(), op::Storage::F16(values)).map_err(runtime::Error::from)?)
    }

    /// Layer `i` as the spec holds it.
    fn layer(&self, spec: &ModelSpec, i: usize) -> Result<HostLayer> {
        let mut failure = None;
        let layer = HostLayer::assemble(spec, i, |name, shape| {
            self.tensor(name, shape).map_err(|e| {
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
}

/// An OPT causal language model (`OPTForCausalLM`), the output projection
/// tied to the token embeddings.
#[derive(Debug, Clone)]
pub struct OptModel {
    pub config: OptConfig,
    /// The CPU engine's spec of this configuration.
    spec: ModelSpec,
    /// `[vocab, word_embed_proj_dim]`, also the output projection.
    pub embed_tokens: Tensor,
    /// `[max_position_embeddings + 2, hidden]`.
    pub embed_positions: Tensor,
    /// `[hidden, word_embed_proj_dim]` and back, where the widths differ.
    pub project_in: Option<Tensor>,
    pub project_out: Option<Tensor>,
    /// The final layer norm of pre-LN models.
    pub final_layer_norm: Option<Norm>,
    /// The layer norm of models without affine parameters (ones, zeros).
    unit_norm: Norm,
    /// The layers kept in host memory: `0..layers.len()`.
    pub layers: Vec<HostLayer>,
}

impl OptModel {
    /// Checkpoint tensors [`OptModel::load`] reads for `config`.
    pub fn tensor_count(config: &OptConfig) -> u64 {
        let per_norm = if config.layer_norm_elementwise_affine { 2 } else { 0 };
        let per_linear = if config.enable_bias { 2 } else { 1 };
        let per_layer = 2 * per_norm + 6 * per_linear;
        2 + 2 * u64::from(config.has_projections())
            + u64::from(config.has_final_layer_norm()) * per_norm
            + config.num_hidden_layers as u64 * per_layer
    }

    /// Builds the model from `src`, checking every tensor's shape.
    /// `lm_head.weight`, where present, is ignored: OPT ties it to
    /// `embed_tokens`.
    pub fn load(config: OptConfig, src: &dyn WeightSource, progress: &ProgressBar) -> Result<Self> {
        let layers = config.num_hidden_layers;
        Self::load_streaming(config, src, progress, layers, &mut |_, _| Ok(()))
    }

    /// [`OptModel::load`] keeping only the first `resident` layers: each
    /// later one is handed to `away` as soon as it is loaded (to be written
    /// elsewhere) and dropped, so host memory never holds more than the
    /// resident layers and one more. Such a model computes only through an
    /// engine that brings the other layers back
    /// ([`runtime::cpu::CpuPlacement::disk`]).
    pub fn load_streaming(
        config: OptConfig,
        src: &dyn WeightSource,
        progress: &ProgressBar,
        resident: usize,
        away: &mut dyn FnMut(usize, HostLayer) -> Result<()>,
    ) -> Result<Self> {
        config.validate()?;
        let spec = crate::spec::model_spec(&config, false)?;
        let l = Loader { src, progress };
        let (h, e) = (config.hidden_size, config.word_embed_proj_dim());
        let embed_tokens = l.tensor("decoder.embed_tokens.weight", &[config.vocab_size, e])?;
        let embed_positions = l.tensor("decoder.embed_positions.weight", &[config.position_rows(), h])?;
        let (project_in, project_out) = if config.has_projections() {
            (
                Some(l.tensor("decoder.project_in.weight", &[h, e])?),
                Some(l.tensor("decoder.project_out.weight", &[e, h])?),
            )
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(resident.min(config.num_hidden_layers));
        for i in 0..config.num_hidden_layers {
            crate::interrupt::check()?;
            let layer = l.layer(&spec, i)?;
            if i < resident {
                layers.push(layer);
            } else {
                away(i, layer)?;
            }
        }
        let final_layer_norm = if config.has_final_layer_norm() && config.layer_norm_elementwise_affine {
            Some(Norm {
                weight: l.tensor("decoder.final_layer_norm.weight", &[h])?,
                bias: l.tensor("decoder.final_layer_norm.bias", &[h])?,
            })
        } else {
            None
        };
        let unit_norm = Norm {
            weight: Tensor::from_f32(DType::F32, vec![h], &vec![1.0; h]).map_err(runtime::Error::from)?,
            bias: Tensor::from_f32(DType::F32, vec![h], &vec![0.0; h]).map_err(runtime::Error::from)?,
        };
        Ok(OptModel {
            config,
            spec,
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            final_layer_norm,
            unit_norm,
            layers,
        })
    }

    /// Every weight held in host memory with its checkpoint name (stacked
    /// q/k/v under the spec's name), in load order.
    pub fn parameters(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![
            ("decoder.embed_tokens.weight".to_string(), &self.embed_tokens),
            ("decoder.embed_positions.weight".to_string(), &self.embed_positions),
        ];
        if let (Some(pi), Some(po)) = (&self.project_in, &self.project_out) {
            out.push(("decoder.project_in.weight".to_string(), pi));
            out.push(("decoder.project_out.weight".to_string(), po));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            out.extend(layer.tensors().iter().map(|(n, t)| (self.spec.layer_name(i, n), t)));
        }
        if let Some(n) = &self.final_layer_norm {
            out.push(("decoder.final_layer_norm.weight".to_string(), &n.weight));
            out.push(("decoder.final_layer_norm.bias".to_string(), &n.bias));
        }
        out
    }

    /// Bytes the weights take in memory.
    pub fn held_bytes(&self) -> u64 {
        self.parameters().iter().map(|(_, t)| t.as_bytes().len() as u64).sum()
    }

    /// An empty cache of one layer for `batch` sequences of up to
    /// `capacity` positions.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let c = &self.config;
        let dtype = runtime::cpu::cpu_dtype(self.spec.kv.dtype)?;
        Ok(KvCache::new(dtype, batch, c.num_attention_heads, c.head_dim(), capacity).map_err(runtime::Error::from)?)
    }

    /// Applies the norm `name` of `layer` to `x`, in place.
    fn layer_norm(&self, layer: &HostLayer, name: &str, x: &mut [f32]) -> runtime::Result<()> {
        match (layer.find(&format!("{name}.weight")), layer.find(&format!("{name}.bias"))) {
            (Some(w), Some(b)) => Ok(op::layer_norm(x, w, b, LAYER_NORM_EPS)?),
            _ => self.unit_norm.apply(x),
        }
    }

    /// Multi-head self-attention over `x` (`[rows, hidden]`), appending the
    /// step's keys and values to `cache`.
    fn attention(
        &self,
        layer: &HostLayer,
        x: &[f32],
        step: &Step<'_>,
        cache: &mut KvCache,
    ) -> runtime::Result<Vec<f32>> {
        let (h, heads) = (self.config.hidden_size, self.config.num_attention_heads);
        let rows = step.rows();
        let qkv = op::linear(
            x,
            rows,
            layer.get("self_attn.qkv_proj.weight")?,
            layer.find("self_attn.qkv_proj.bias"),
            Activation::None,
        )?;
        let (mut q, mut k, mut v) =
            (Vec::with_capacity(rows * h), Vec::with_capacity(rows * h), Vec::with_capacity(rows * h));
        for row in qkv.chunks_exact(3 * h) {
            q.extend_from_slice(&row[..h]);
            k.extend_from_slice(&row[h..2 * h]);
            v.extend_from_slice(&row[2 * h..]);
        }
        drop(qkv);
        cache.append(&k, &v, step.new_len)?;
        let shape = AttentionShape { heads, kv_heads: heads, head_dim: self.config.head_dim() };
        let attn = op::attention(&q, step.new_len, cache, step.key_mask, shape)?;
        Ok(op::linear(
            &attn,
            rows,
            layer.get("self_attn.out_proj.weight")?,
            layer.find("self_attn.out_proj.bias"),
            Activation::None,
        )?)
    }

    /// `fc2(relu(fc1(x)))`.
    fn mlp(&self, layer: &HostLayer, x: &[f32], rows: usize) -> runtime::Result<Vec<f32>> {
        let up = op::linear(x, rows, layer.get("fc1.weight")?, layer.find("fc1.bias"), Activation::Relu)?;
        Ok(op::linear(&up, rows, layer.get("fc2.weight")?, layer.find("fc2.bias"), Activation::None)?)
    }
}

impl CpuModel for OptModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_sequence_len()
    }

    /// Token embedding (through `project_in`) plus the learned position
    /// embedding at OPT's offset; padding looks up row 1, as OPT does
    /// (`cumsum(mask) · mask − 1 = −1`, plus the offset 2).
    fn embed(&self, tokens: &[u32], positions: &[Option<usize>]) -> runtime::Result<Vec<f32>> {
        if tokens.len() != positions.len() {
            return Err(runtime::Error::InvalidArgument(format!(
                "{} tokens but {} positions",
                tokens.len(),
                positions.len()
            )));
        }
        let rows = tokens.len();
        let mut x = op::embedding(&self.embed_tokens, tokens)?;
        if let Some(p) = &self.project_in {
            x = op::linear(&x, rows, p, None, Activation::None)?;
        }
        let rows_of_positions = positions
            .iter()
            .map(|p| {
                let row = p.map_or(Some(POSITION_OFFSET - 1), |p| p.checked_add(POSITION_OFFSET));
                row.and_then(|r| u32::try_from(r).ok()).ok_or_else(|| {
                    runtime::Error::InvalidArgument(format!("position {p:?} is beyond the model's positions"))
                })
            })
            .collect::<runtime::Result<Vec<u32>>>()?;
        let pos = op::embedding(&self.embed_positions, &rows_of_positions)?;
        op::add_inplace(&mut x, &pos)?;
        Ok(x)
    }

    /// Attention block then MLP block, each with its residual and layer
    /// norm (before the block for pre-LN models, after the residual for
    /// opt-350m's post-LN).
    fn layer_forward(
        &self,
        layer: &HostLayer,
        hidden: &mut [f32],
        step: &Step<'_>,
        cache: &mut KvCache,
    ) -> runtime::Result<()> {
        let pre = self.config.do_layer_norm_before;
        let rows = step.rows();
        let mut normed = hidden.to_vec();
        if pre {
            self.layer_norm(layer, "self_attn_layer_norm", &mut normed)?;
        }
        let a = self.attention(layer, &normed, step, cache)?;
        op::add_inplace(hidden, &a)?;
        if !pre {
            self.layer_norm(layer, "self_attn_layer_norm", hidden)?;
        }
        normed.copy_from_slice(hidden);
        if pre {
            self.layer_norm(layer, "final_layer_norm", &mut normed)?;
        }
        let m = self.mlp(layer, &normed, rows)?;
        op::add_inplace(hidden, &m)?;
        if !pre {
            self.layer_norm(layer, "final_layer_norm", hidden)?;
        }
        Ok(())
    }

    /// Final layer norm (pre-LN models), `project_out`, then the tied
    /// embedding.
    fn logits(&self, hidden: &[f32], rows: usize) -> runtime::Result<Vec<f32>> {
        let mut x = hidden.to_vec();
        if let Some(n) = &self.final_layer_norm {
            n.apply(&mut x)?;
        } else if self.config.has_final_layer_norm() {
            self.unit_norm.apply(&mut x)?;
        }
        if let Some(p) = &self.project_out {
            x = op::linear(&x, rows, p, None, Activation::None)?;
        }
        Ok(op::linear(&x, rows, &self.embed_tokens, None, Activation::None)?)
    }

    /// Six `rows × hidden` buffers, the three-wide q/k/v product, every
    /// head's scores and the MLP's `rows × ffn` activation, f32.
    fn layer_scratch_bytes(&self, batch: usize, new_len: usize, keys: usize) -> u64 {
        let c = &self.config;
        let rows = (batch as u64).saturating_mul(new_len as u64);
        let f32s = rows
            .saturating_mul(c.hidden_size as u64)
            .saturating_mul(9)
            .saturating_add(
                (batch as u64).saturating_mul((c.num_attention_heads * new_len) as u64).saturating_mul(keys as u64),
            )
            .saturating_add(rows.saturating_mul(c.ffn_dim as u64));
        f32s.saturating_mul(4)
    }
}
