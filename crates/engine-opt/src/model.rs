//! The OPT decoder on the CPU, written out plainly.
//!
//! [`OptModel`] holds the weights (matrices f16, vectors f32). One step of
//! the model is three parts that a scheduler can call separately:
//! [`OptModel::embed`], then [`DecoderLayer::forward`] for each layer with
//! that layer's [`LayerCache`] (itself [`DecoderLayer::attention_block`]
//! then [`DecoderLayer::mlp_block`]), then [`OptModel::logits`]. The
//! generation loop in [`crate::generation`] runs them layer by layer over a
//! block of batches, the order a tiered engine uses.

use half::f16;
use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::config::{OptConfig, POSITION_OFFSET};
use crate::error::Result;
use crate::kv_cache::{KvCache, LayerCache};
use crate::ops::{self, MatMut, MatRef};
use crate::weights::WeightSource;

/// A weight as the model holds it, for inspection and comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamRef<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl ParamRef<'_> {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        match self {
            ParamRef::F16(v) => (v.len() * 2) as u64,
            ParamRef::F32(v) => (v.len() * 4) as u64,
        }
    }
}

/// Loads tensors by name, counting them on a progress bar.
struct Loader<'a> {
    src: &'a dyn WeightSource,
    progress: &'a ProgressBar,
}

impl Loader<'_> {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f16>> {
        let t = self.src.load(name, &[rows, cols])?;
        crate::finite::check_weights(name, &t)?;
        self.progress.inc(1);
        Ok(t)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.src.load(name, &[len])?;
        crate::finite::check_weights(name, &t)?;
        self.progress.inc(1);
        Ok(ops::to_f32(&t))
    }
}

/// A `torch.nn.Linear`: `y = x · Wᵀ + b`, `W` is `out × in`, f16.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Vec<f16>,
    pub bias: Option<Vec<f32>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    fn load(l: &Loader<'_>, prefix: &str, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: l.matrix(&format!("{prefix}.weight"), out_features, in_features)?,
            bias: if bias { Some(l.vector(&format!("{prefix}.bias"), out_features)?) } else { None },
            in_features,
            out_features,
        })
    }

    /// `x` is `rows × in_features`; returns `rows × out_features`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        ops::linear(x, rows, &self.weight, self.out_features, self.in_features, self.bias.as_deref())
    }

    fn params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, ParamRef<'a>)>) {
        out.push((format!("{prefix}.weight"), ParamRef::F16(&self.weight)));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), ParamRef::F32(b)));
        }
    }
}

/// Layer norm over the last dimension (eps 1e-5), with or without affine
/// parameters.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
    pub dim: usize,
}

impl LayerNorm {
    fn load(l: &Loader<'_>, prefix: &str, dim: usize, affine: bool) -> Result<Self> {
        let (weight, bias) = if affine {
            (Some(l.vector(&format!("{prefix}.weight"), dim)?), Some(l.vector(&format!("{prefix}.bias"), dim)?))
        } else {
            (None, None)
        };
        Ok(LayerNorm { weight, bias, dim })
    }

    /// Normalises each row of `x` in place.
    pub fn forward_inplace(&self, x: &mut [f32]) {
        ops::layer_norm_inplace(x, self.dim, self.weight.as_deref(), self.bias.as_deref());
    }

    /// Returns the normalised rows of `x`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        self.forward_inplace(&mut y);
        y
    }

    fn params<'a>(&'a self, prefix: &str, out: &mut Vec<(String, ParamRef<'a>)>) {
        if let (Some(w), Some(b)) = (&self.weight, &self.bias) {
            out.push((format!("{prefix}.weight"), ParamRef::F32(w)));
            out.push((format!("{prefix}.bias"), ParamRef::F32(b)));
        }
    }
}

/// What a layer needs to know about the step besides the hidden states.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    /// Sequences in the batch.
    pub batch: usize,
    /// New tokens per sequence in this step (prompt length at prefill, 1 when
    /// decoding).
    pub new_len: usize,
    /// For each sequence, whether each position so far (cached and new)
    /// holds a real token (`false` for left padding).
    pub key_mask: &'a [Vec<bool>],
}

/// Multi-head self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub num_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `x` is `[batch × new_len, hidden]`. Appends this step's keys and
    /// values to `cache`, attends over everything cached (causal and
    /// padding masks) and returns `[batch × new_len, hidden]`.
    pub fn forward(&self, x: &[f32], ctx: &StepContext<'_>, cache: &mut LayerCache) -> Vec<f32> {
        let (b_n, s_n) = (ctx.batch, ctx.new_len);
        let rows = b_n * s_n;
        let (heads, hd) = (self.num_heads, self.head_dim);
        let hidden = heads * hd;
        let scaling = (hd as f32).powf(-0.5);

        let mut q = self.q_proj.forward(x, rows);
        q.par_iter_mut().for_each(|v| *v *= scaling);
        let k = self.k_proj.forward(x, rows);
        let v = self.v_proj.forward(x, rows);

        let past = cache.len();
        cache.append(&k, &v, s_n);
        let total = cache.len();
        let cache = &*cache;

        // One task per (sequence, head): scores, masked softmax, weighted sum.
        let per_head: Vec<Vec<f32>> = (0..b_n * heads)
            .into_par_iter()
            .map(|task| {
                let (b, h) = (task / heads, task % heads);
                let mask = &ctx.key_mask[b];
                assert_eq!(mask.len(), total, "key mask length");
                let q_bh = MatRef::new(&q[b * s_n * hidden + h * hd..], s_n, hd, hidden);
                let keys = MatRef::new(cache.keys(b, h), total, hd, hd);
                let values = MatRef::new(cache.values(b, h), total, hd, hd);
                let mut scores = vec![0.0f32; s_n * total];
                ops::matmul(
                    MatMut::new(&mut scores, s_n, total, total),
                    q_bh,
                    keys.t(),
                    false,
                    gemm::Parallelism::None,
                );
                for (s, row) in scores.chunks_mut(total).enumerate() {
                    let query_pos = past + s;
                    ops::masked_softmax_inplace(row, |j| j <= query_pos && mask[j]);
                }
                let mut out = vec![0.0f32; s_n * hd];
                ops::matmul(
                    MatMut::new(&mut out, s_n, hd, hd),
                    MatRef::new(&scores, s_n, total, total),
                    values,
                    false,
                    gemm::Parallelism::None,
                );
                out
            })
            .collect();

        let mut attn = vec![0.0f32; rows * hidden];
        for (task, out) in per_head.iter().enumerate() {
            let (b, h) = (task / heads, task % heads);
            for s in 0..s_n {
                let dst = (b * s_n + s) * hidden + h * hd;
                attn[dst..dst + hd].copy_from_slice(&out[s * hd..(s + 1) * hd]);
            }
        }
        self.out_proj.forward(&attn, rows)
    }
}

/// The feed-forward block: `fc2(relu(fc1(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    /// `x` is `rows × hidden`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut h = self.fc1.forward(x, rows);
        ops::relu_inplace(&mut h);
        self.fc2.forward(&h, rows)
    }
}

/// One decoder layer: attention block then MLP block, each with its
/// residual connection and layer norm (before the block for pre-LN models,
/// after the residual for opt-350m's post-LN).
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub self_attn_layer_norm: LayerNorm,
    pub self_attn: Attention,
    pub final_layer_norm: LayerNorm,
    pub mlp: Mlp,
    pub pre_layer_norm: bool,
}

impl DecoderLayer {
    /// Layer `i` of a model of configuration `c`, from `src`.
    pub fn load_from(src: &dyn WeightSource, c: &OptConfig, i: usize) -> Result<Self> {
        Self::load(&Loader { src, progress: &ProgressBar::hidden() }, c, i)
    }

    /// Every weight with its name (`decoder.layers.{i}.…`).
    pub fn parameters(&self, i: usize) -> Vec<(String, ParamRef<'_>)> {
        let mut out = Vec::new();
        self.params(&format!("decoder.layers.{i}"), &mut out);
        out
    }

    fn load(l: &Loader<'_>, c: &OptConfig, i: usize) -> Result<Self> {
        let p = format!("decoder.layers.{i}");
        let (h, f, bias, affine) = (c.hidden_size, c.ffn_dim, c.enable_bias, c.layer_norm_elementwise_affine);
        let proj = |name: &str| Linear::load(l, &format!("{p}.self_attn.{name}"), h, h, bias);
        Ok(DecoderLayer {
            self_attn_layer_norm: LayerNorm::load(l, &format!("{p}.self_attn_layer_norm"), h, affine)?,
            self_attn: Attention {
                q_proj: proj("q_proj")?,
                k_proj: proj("k_proj")?,
                v_proj: proj("v_proj")?,
                out_proj: proj("out_proj")?,
                num_heads: c.num_attention_heads,
                head_dim: c.head_dim(),
            },
            final_layer_norm: LayerNorm::load(l, &format!("{p}.final_layer_norm"), h, affine)?,
            mlp: Mlp {
                fc1: Linear::load(l, &format!("{p}.fc1"), h, f, bias)?,
                fc2: Linear::load(l, &format!("{p}.fc2"), f, h, bias)?,
            },
            pre_layer_norm: c.do_layer_norm_before,
        })
    }

    /// The attention block with its residual (and layer norm), in place on
    /// `hidden` (`[batch × new_len, hidden]`).
    pub fn attention_block(&self, hidden: &mut [f32], ctx: &StepContext<'_>, cache: &mut LayerCache) {
        if self.pre_layer_norm {
            let normed = self.self_attn_layer_norm.forward(hidden);
            let a = self.self_attn.forward(&normed, ctx, cache);
            ops::add_inplace(hidden, &a);
        } else {
            let a = self.self_attn.forward(hidden, ctx, cache);
            ops::add_inplace(hidden, &a);
            self.self_attn_layer_norm.forward_inplace(hidden);
        }
    }

    /// The MLP block with its residual (and layer norm), in place.
    pub fn mlp_block(&self, hidden: &mut [f32], rows: usize) {
        if self.pre_layer_norm {
            let normed = self.final_layer_norm.forward(hidden);
            let m = self.mlp.forward(&normed, rows);
            ops::add_inplace(hidden, &m);
        } else {
            let m = self.mlp.forward(hidden, rows);
            ops::add_inplace(hidden, &m);
            self.final_layer_norm.forward_inplace(hidden);
        }
    }

    /// The whole layer, in place on `hidden`.
    pub fn forward(&self, hidden: &mut [f32], ctx: &StepContext<'_>, cache: &mut LayerCache) {
        self.attention_block(hidden, ctx, cache);
        self.mlp_block(hidden, ctx.batch * ctx.new_len);
    }

    fn params<'a>(&'a self, p: &str, out: &mut Vec<(String, ParamRef<'a>)>) {
        self.self_attn_layer_norm.params(&format!("{p}.self_attn_layer_norm"), out);
        let a = &self.self_attn;
        for (name, lin) in
            [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("out_proj", &a.out_proj)]
        {
            lin.params(&format!("{p}.self_attn.{name}"), out);
        }
        self.final_layer_norm.params(&format!("{p}.final_layer_norm"), out);
        self.mlp.fc1.params(&format!("{p}.fc1"), out);
        self.mlp.fc2.params(&format!("{p}.fc2"), out);
    }
}

/// An OPT causal language model (`OPTForCausalLM`), with the output
/// projection tied to the token embeddings.
#[derive(Debug, Clone)]
pub struct OptModel {
    pub config: OptConfig,
    /// `[vocab, word_embed_proj_dim]`, also the output projection.
    pub embed_tokens: Vec<f16>,
    /// `[max_position_embeddings + 2, hidden]`.
    pub embed_positions: Vec<f16>,
    pub project_in: Option<Linear>,
    pub project_out: Option<Linear>,
    pub layers: Vec<DecoderLayer>,
    pub final_layer_norm: Option<LayerNorm>,
}

impl OptModel {
    /// Tensors [`OptModel::load`] reads for `config`.
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

    /// [`OptModel::load`] keeping only the first `resident` decoder layers:
    /// each later one is handed to `away` as soon as it is loaded (to be
    /// written elsewhere) and dropped, so host memory never holds more than
    /// the resident layers and one more. Such a model computes only through
    /// a device that brings the other layers back
    /// ([`crate::generation::CpuDevice::with_disk`]).
    pub fn load_streaming(
        config: OptConfig,
        src: &dyn WeightSource,
        progress: &ProgressBar,
        resident: usize,
        away: &mut dyn FnMut(usize, DecoderLayer) -> Result<()>,
    ) -> Result<Self> {
        config.validate()?;
        let l = Loader { src, progress };
        let (h, e) = (config.hidden_size, config.word_embed_proj_dim());
        let embed_tokens = l.matrix("decoder.embed_tokens.weight", config.vocab_size, e)?;
        let embed_positions = l.matrix("decoder.embed_positions.weight", config.position_rows(), h)?;
        let (project_in, project_out) = if config.has_projections() {
            (
                Some(Linear::load(&l, "decoder.project_in", e, h, false)?),
                Some(Linear::load(&l, "decoder.project_out", h, e, false)?),
            )
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(resident.min(config.num_hidden_layers));
        for i in 0..config.num_hidden_layers {
            crate::interrupt::check()?;
            let layer = DecoderLayer::load(&l, &config, i)?;
            if i < resident {
                layers.push(layer);
            } else {
                away(i, layer)?;
            }
        }
        let final_layer_norm = if config.has_final_layer_norm() {
            Some(LayerNorm::load(&l, "decoder.final_layer_norm", h, config.layer_norm_elementwise_affine)?)
        } else {
            None
        };
        Ok(OptModel { config, embed_tokens, embed_positions, project_in, project_out, layers, final_layer_norm })
    }

    /// Every weight with its canonical name, in load order.
    pub fn parameters(&self) -> Vec<(String, ParamRef<'_>)> {
        let mut out = vec![
            ("decoder.embed_tokens.weight".to_string(), ParamRef::F16(&self.embed_tokens)),
            ("decoder.embed_positions.weight".to_string(), ParamRef::F16(&self.embed_positions)),
        ];
        if let (Some(pi), Some(po)) = (&self.project_in, &self.project_out) {
            pi.params("decoder.project_in", &mut out);
            po.params("decoder.project_out", &mut out);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            layer.params(&format!("decoder.layers.{i}"), &mut out);
        }
        if let Some(n) = &self.final_layer_norm {
            n.params("decoder.final_layer_norm", &mut out);
        }
        out
    }

    /// Bytes the weights take in memory.
    pub fn held_bytes(&self) -> u64 {
        self.parameters().iter().map(|(_, p)| p.bytes()).sum()
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let c = &self.config;
        KvCache::new(c.num_hidden_layers, batch, c.num_attention_heads, c.head_dim(), capacity)
    }

    /// Hidden states for `tokens` at `positions` (0-based, before OPT's
    /// offset; `None` for padding, which looks up row 1 as OPT does):
    /// token embedding (through `project_in`) plus position embedding.
    ///
    /// # Panics
    /// If a token or position is out of range; callers validate prompts.
    pub fn embed(&self, tokens: &[u32], positions: &[Option<usize>]) -> Vec<f32> {
        assert_eq!(tokens.len(), positions.len(), "embed: tokens and positions differ");
        let (h, e) = (self.config.hidden_size, self.config.word_embed_proj_dim());
        let rows = tokens.len();
        let mut x = vec![0.0f32; rows * e];
        for (row, &t) in x.chunks_mut(e).zip(tokens) {
            let t = t as usize;
            ops::convert_f16(&self.embed_tokens[t * e..(t + 1) * e], row);
        }
        if let Some(p) = &self.project_in {
            x = p.forward(&x, rows);
        }
        let mut pos_row = vec![0.0f32; h];
        for (row, &p) in x.chunks_mut(h).zip(positions) {
            // Padding: cumsum(mask) * mask - 1 = -1, plus the offset 2.
            let idx = p.map_or(POSITION_OFFSET - 1, |p| p + POSITION_OFFSET);
            ops::convert_f16(&self.embed_positions[idx * h..(idx + 1) * h], &mut pos_row);
            for (a, b) in row.iter_mut().zip(&pos_row) {
                *a += b;
            }
        }
        x
    }

    /// Logits over the vocabulary for `rows` hidden states (`rows × hidden`):
    /// final layer norm (pre-LN models), `project_out`, then the tied
    /// embedding.
    pub fn logits(&self, hidden: &[f32], rows: usize) -> Vec<f32> {
        let mut x = hidden.to_vec();
        if let Some(n) = &self.final_layer_norm {
            n.forward_inplace(&mut x);
        }
        if let Some(p) = &self.project_out {
            x = p.forward(&x, rows);
        }
        let e = self.config.word_embed_proj_dim();
        ops::linear(&x, rows, &self.embed_tokens, self.config.vocab_size, e, None)
    }

    /// Runs all layers on one batch for one step and returns the hidden
    /// states (`[batch × new_len, hidden]`) after the last layer.
    pub fn forward_hidden(
        &self,
        tokens: &[u32],
        positions: &[Option<usize>],
        ctx: &StepContext<'_>,
        cache: &mut KvCache,
    ) -> Vec<f32> {
        let mut hidden = self.embed(tokens, positions);
        debug_assert_eq!(self.layers.len(), self.config.num_hidden_layers, "forward_hidden on a partial model");
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            layer.forward(&mut hidden, ctx, layer_cache);
        }
        hidden
    }
}
