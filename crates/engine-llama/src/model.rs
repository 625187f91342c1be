//! The CPU model: the family's forward pass written over the op layer.
//!
//! Per layer: RMSNorm, q/k/v (with biases where the family has them),
//! Qwen3's per-head q/k RMSNorm, the rotary embedding at each row's
//! position, grouped-query attention over the layer's KV cache, o_proj and
//! the residual; then RMSNorm, `down(silu(gate) · up)` and the residual.
//! Then the final norm and the logits (lm_head, or the embedding matrix when
//! tied). Weights stay in the checkpoint's dtype; all arithmetic is f32; the
//! KV cache is kept in the checkpoint's dtype unless
//! [`LlamaModel::with_cache_dtype`] says otherwise.

use std::path::Path;

use ops::{AttentionShape, DType, KvCache, Rope, Tensor};
use runtime::cpu::{CpuModel, HostLayer, Step};
use runtime::spec::ModelSpec;

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::spec::{layer_prefix, outside_tensors};
use checkpoint::Checkpoint;

/// One decoder layer's weights, borrowed by name from its [`HostLayer`]
/// (the runtime holds the layers: in memory, or read back from disk).
struct Layer<'a> {
    input_norm: &'a Tensor,
    /// q, k and v stacked by rows.
    qkv: &'a Tensor,
    qkv_bias: Option<&'a Tensor>,
    q_norm: Option<&'a Tensor>,
    k_norm: Option<&'a Tensor>,
    o: &'a Tensor,
    o_bias: Option<&'a Tensor>,
    post_norm: &'a Tensor,
    /// gate and up stacked by rows.
    gate_up: &'a Tensor,
    gate_up_bias: Option<&'a Tensor>,
    down: &'a Tensor,
    down_bias: Option<&'a Tensor>,
}

impl<'a> Layer<'a> {
    fn of(t: &'a HostLayer) -> runtime::Result<Layer<'a>> {
        Ok(Layer {
            input_norm: t.get("input_layernorm.weight")?,
            qkv: t.get("self_attn.qkv_proj.weight")?,
            qkv_bias: t.find("self_attn.qkv_proj.bias"),
            q_norm: t.find("self_attn.q_norm.weight"),
            k_norm: t.find("self_attn.k_norm.weight"),
            o: t.get("self_attn.o_proj.weight")?,
            o_bias: t.find("self_attn.o_proj.bias"),
            post_norm: t.get("post_attention_layernorm.weight")?,
            gate_up: t.get("mlp.gate_up_proj.weight")?,
            gate_up_bias: t.find("mlp.gate_up_proj.bias"),
            down: t.get("mlp.down_proj.weight")?,
            down_bias: t.find("mlp.down_proj.bias"),
        })
    }
}

/// `rows` rows of `x`, each the given `widths` side by side, as one matrix
/// per width (`rows × width` each).
fn split_columns(x: &[f32], rows: usize, widths: &[usize]) -> Vec<Vec<f32>> {
    let row: usize = widths.iter().sum();
    let mut out: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(rows * w)).collect();
    for r in x.chunks(row.max(1)).take(rows) {
        let mut at = 0;
        for (o, w) in out.iter_mut().zip(widths) {
            o.extend_from_slice(&r[at..at + w]);
            at += w;
        }
    }
    out
}

/// A Llama-family model on the CPU: the weights outside the layers, the
/// layers kept in host memory (all of them, unless loaded for an engine
/// that streams the rest), and the rotary embedding.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    config: LlamaConfig,
    spec: ModelSpec,
    layers: Vec<HostLayer>,
    embed: Tensor,
    norm: Tensor,
    lm_head: Option<Tensor>,
    rope: Rope,
    cache_dtype: DType,
}

/// A small deterministic generator (splitmix64) for dummy weights.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [−1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

impl LlamaModel {
    #[cfg(test)]
    fn assemble(config: LlamaConfig, get: impl FnMut(&str, &[usize]) -> Result<Tensor>) -> Result<LlamaModel> {
        let layers = config.num_hidden_layers;
        LlamaModel::assemble_streaming(config, get, layers, &mut |_, _| Ok(()))
    }

    /// [`LlamaModel::assemble`] keeping the first `resident` layers: each
    /// later one goes to `away` as soon as it is made (to be written to
    /// disk) and is dropped, so memory never holds more than the resident
    /// layers and one more.
    fn assemble_streaming(
        config: LlamaConfig,
        mut get: impl FnMut(&str, &[usize]) -> Result<Tensor>,
        resident: usize,
        away: &mut dyn FnMut(usize, HostLayer) -> Result<()>,
    ) -> Result<LlamaModel> {
        let dtype = config.weight_dtype();
        let rope = Rope::new(config.rope_theta, config.head_dim, config.rope_scaling)?;
        let spec = crate::spec::model_spec(&config)?;
        let mut layers = Vec::with_capacity(resident.min(config.num_hidden_layers));
        for i in 0..config.num_hidden_layers {
            // A stacked tensor (q/k/v, gate/up) is its sources' rows in turn.
            let mut failed = None;
            let layer = HostLayer::assemble(&spec, i, |name, shape| {
                get(name, shape).map_err(|e| {
                    let message = e.to_string();
                    failed = Some(e);
                    runtime::Error::Spec(message)
                })
            });
            let layer = match (layer, failed) {
                (Ok(layer), _) => layer,
                (Err(_), Some(e)) => return Err(e),
                (Err(e), None) => return Err(e.into()),
            };
            if i < resident {
                layers.push(layer);
            } else {
                away(i, layer)?;
            }
        }
        let mut outside = Vec::new();
        for t in outside_tensors(&config) {
            outside.push((t.name.clone(), get(&t.name, &t.shape)?));
        }
        let mut take = |name: &str| -> Result<Option<Tensor>> {
            Ok(outside.iter().position(|(n, _)| n == name).map(|i| outside.swap_remove(i).1))
        };
        let missing = |name: &str| Error::Tensor {
            file: "(the layer spec)".into(),
            tensor: name.into(),
            message: "was not provided".into(),
        };
        Ok(LlamaModel {
            embed: take("model.embed_tokens.weight")?.ok_or_else(|| missing("model.embed_tokens.weight"))?,
            norm: take("model.norm.weight")?.ok_or_else(|| missing("model.norm.weight"))?,
            lm_head: take("lm_head.weight")?,
            layers,
            rope,
            cache_dtype: dtype,
            spec,
            config,
        })
    }

    /// The model of a Hugging Face checkpoint directory (config.json and
    /// safetensors, one file or shards with their index). Every tensor's
    /// presence, shape and dtype is checked before any is read.
    pub fn load(dir: &Path) -> Result<LlamaModel> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let (config, checkpoint) = open_checked(dir, config)?;
        LlamaModel::from_checkpoint(config, &checkpoint)
    }

    /// The model of `config` with the weights of `checkpoint`, which
    /// [`open_checked`] has checked against it.
    pub fn from_checkpoint(config: LlamaConfig, checkpoint: &Checkpoint) -> Result<LlamaModel> {
        let layers = config.num_hidden_layers;
        LlamaModel::from_checkpoint_streaming(config, checkpoint, layers, &mut |_, _| Ok(()))
    }

    /// [`LlamaModel::from_checkpoint`] keeping only the first `resident`
    /// layers in memory; the others are handed to `away` as they are read
    /// (for the runtime's `DiskLayers`), so a model larger than host memory
    /// loads.
    pub fn from_checkpoint_streaming(
        config: LlamaConfig,
        checkpoint: &Checkpoint,
        resident: usize,
        away: &mut dyn FnMut(usize, HostLayer) -> Result<()>,
    ) -> Result<LlamaModel> {
        let dtype = config.weight_dtype();
        LlamaModel::assemble_streaming(
            config,
            |name, shape| {
                let bytes = checkpoint.bytes(name)?;
                crate::finite::check_weights(&file_of(checkpoint, name), name, dtype, bytes)?;
                Ok(Tensor::from_le_bytes(dtype, shape.to_vec(), bytes)?)
            },
            resident,
            away,
        )
    }

    /// The model of `config` with deterministic small uniform weights from
    /// `seed` (for benchmarks and tests): matrices uniform in ±1/√(input
    /// width), biases in ±0.02, norm weights in 1 ± 0.1.
    pub fn dummy(config: LlamaConfig, seed: u64) -> Result<LlamaModel> {
        let layers = config.num_hidden_layers;
        LlamaModel::dummy_streaming(config, seed, layers, &mut |_, _| Ok(()))
    }

    /// [`LlamaModel::dummy`] keeping only the first `resident` layers (see
    /// [`LlamaModel::from_checkpoint_streaming`]).
    pub fn dummy_streaming(
        config: LlamaConfig,
        seed: u64,
        resident: usize,
        away: &mut dyn FnMut(usize, HostLayer) -> Result<()>,
    ) -> Result<LlamaModel> {
        let dtype = config.weight_dtype();
        let mut rng = SplitMix(seed);
        LlamaModel::assemble_streaming(
            config,
            |name, shape| {
                let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| Error::Tensor {
                    file: "(dummy)".into(),
                    tensor: name.into(),
                    message: format!("shape {shape:?} is too large"),
                })?;
                let (scale, offset) = match shape[..] {
                    [_, k] => (1.0 / (k as f32).sqrt(), 0.0),
                    _ if name.contains("norm") => (0.1, 1.0),
                    _ => (0.02, 0.0),
                };
                let values: Vec<f32> = (0..n).map(|_| offset + scale * rng.uniform()).collect();
                Ok(Tensor::from_f32(dtype, shape.to_vec(), &values)?)
            },
            resident,
            away,
        )
    }

    /// The same model keeping its KV cache in `dtype` (the checkpoint's by
    /// default; f32 to match a float32 reference exactly).
    pub fn with_cache_dtype(mut self, dtype: DType) -> LlamaModel {
        self.cache_dtype = dtype;
        // The spec says how the engine holds the cache (and the plan counts it).
        self.spec.kv.dtype = crate::spec::runtime_dtype(dtype);
        self
    }

    pub fn cache_dtype(&self) -> DType {
        self.cache_dtype
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Every weight under its checkpoint name (layers first, in order).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = layer_prefix(i);
            out.extend(l.tensors().iter().map(|(n, t)| (format!("{p}{n}"), t)));
        }
        out.push(("model.embed_tokens.weight".into(), &self.embed));
        out.push(("model.norm.weight".into(), &self.norm));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".into(), head));
        }
        out
    }

    /// Every weight as the checkpoint holds it: a stacked tensor (q/k/v,
    /// gate/up) split back into its sources' rows under their names (to
    /// write the model as a Hugging Face checkpoint).
    pub fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = layer_prefix(i);
            for ((_, t), ts) in l.tensors().iter().zip(&self.spec.layer) {
                let bytes = t.as_bytes();
                let mut at = 0usize;
                for src in ts.sources() {
                    let n: usize = src.shape.iter().product::<usize>() * t.dtype().size();
                    let part = bytes.get(at..at + n).ok_or_else(|| Error::Tensor {
                        file: "(the model)".into(),
                        tensor: format!("{p}{}", src.name),
                        message: format!("lies past the end of the stacked {}", ts.name),
                    })?;
                    out.push((format!("{p}{}", src.name), Tensor::from_le_bytes(t.dtype(), src.shape.clone(), part)?));
                    at += n;
                }
            }
        }
        out.push(("model.embed_tokens.weight".into(), self.embed.clone()));
        out.push(("model.norm.weight".into(), self.norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".into(), head.clone()));
        }
        Ok(out)
    }

    /// An empty KV cache of one layer for `batch` sequences of up to
    /// `capacity` positions, in the model's cache dtype.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let c = &self.config;
        Ok(KvCache::new(self.cache_dtype, batch, c.num_key_value_heads, c.head_dim, capacity)?)
    }

    /// The layers held in memory.
    pub fn layers(&self) -> &[HostLayer] {
        &self.layers
    }

    fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            heads: self.config.num_attention_heads,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Empty caches for `batch` sequences of up to `capacity` positions,
    /// `pads[b]` of them left padding in sequence `b`.
    pub fn start(&self, pads: Vec<usize>, capacity: usize) -> Result<State> {
        let c = &self.config;
        let caches = (0..c.num_hidden_layers)
            .map(|_| KvCache::new(self.cache_dtype, pads.len(), c.num_key_value_heads, c.head_dim, capacity))
            .collect::<ops::Result<Vec<_>>>()?;
        Ok(State { caches, pads })
    }

    /// Runs `rows` new positions of every sequence (`ids`: `[batch][rows]`)
    /// through the model, appending to `state`'s caches; returns the logits
    /// of each sequence's last new position (`[batch][vocab]`).
    pub fn forward(&self, state: &mut State, ids: &[u32], rows: usize) -> Result<Vec<f32>> {
        let c = &self.config;
        let batch = state.pads.len();
        let n = batch
            .checked_mul(rows)
            .filter(|&n| n == ids.len() && rows > 0)
            .ok_or_else(|| Error::Generate(format!("{} token ids are not {batch} sequences of {rows}", ids.len())))?;
        let start = state.caches.first().map_or(0, |k| k.len());
        let len = start + rows;
        // Positions count from each sequence's first real token.
        let positions: Vec<usize> = (0..n).map(|i| (start + i % rows).saturating_sub(state.pads[i / rows])).collect();
        let mask: Vec<bool> = (0..batch * len).map(|i| i % len >= state.pads[i / len]).collect();
        let h = c.hidden_size;
        let step = Step { batch, new_len: rows, key_mask: &mask, positions: &[] };
        let mut x = ops::embedding(&self.embed, ids)?;
        for (layer, cache) in self.layers.iter().zip(&mut state.caches) {
            self.layer(&Layer::of(layer)?, &mut x, &step, &positions, cache)?;
        }
        let mut last: Vec<f32> = Vec::with_capacity(batch * h);
        for b in 0..batch {
            let row = (b * rows + rows - 1) * h;
            last.extend_from_slice(&x[row..row + h]);
        }
        Ok(self.logits(&last, batch)?)
    }

    /// One decoder layer in place on `x`: RMSNorm, q/k/v (Qwen3's per-head
    /// norms), the rotary embedding at `positions`, grouped-query attention
    /// over `cache`, o_proj and the residual; RMSNorm, SwiGLU and the
    /// residual.
    fn layer(
        &self,
        layer: &Layer<'_>,
        x: &mut [f32],
        step: &Step<'_>,
        positions: &[usize],
        cache: &mut KvCache,
    ) -> runtime::Result<()> {
        let c = &self.config;
        let (n, rows) = (step.rows(), step.new_len);
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let eps = c.rms_norm_eps;
        let none = ops::Activation::None;
        let mut y = x.to_vec();
        ops::rms_norm(&mut y, layer.input_norm, eps)?;
        let (q_w, kv_w) = (heads * c.head_dim, kv_heads * c.head_dim);
        let qkv = ops::linear(&y, n, layer.qkv, layer.qkv_bias, none)?;
        let [mut q, mut k, v]: [Vec<f32>; 3] = split_columns(&qkv, n, &[q_w, kv_w, kv_w])
            .try_into()
            .map_err(|_| runtime::Error::Spec("the q/k/v split gave other than three parts".into()))?;
        if let (Some(qn), Some(kn)) = (layer.q_norm, layer.k_norm) {
            // Rows of head_dim: one shared weight for every head.
            ops::rms_norm(&mut q, qn, eps)?;
            ops::rms_norm(&mut k, kn, eps)?;
        }
        self.rope.apply(&mut q, heads, positions)?;
        self.rope.apply(&mut k, kv_heads, positions)?;
        cache.append(&k, &v, rows)?;
        let a = ops::attention(&q, rows, cache, step.key_mask, self.attention_shape())?;
        let o = ops::linear(&a, n, layer.o, layer.o_bias, none)?;
        ops::add_inplace(x, &o)?;

        y.copy_from_slice(x);
        ops::rms_norm(&mut y, layer.post_norm, eps)?;
        let inter = c.intermediate_size;
        let gate_up = ops::linear(&y, n, layer.gate_up, layer.gate_up_bias, none)?;
        let [mut gate, up]: [Vec<f32>; 2] = split_columns(&gate_up, n, &[inter, inter])
            .try_into()
            .map_err(|_| runtime::Error::Spec("the gate/up split gave other than two parts".into()))?;
        ops::silu_mul_inplace(&mut gate, &up)?;
        let down = ops::linear(&gate, n, layer.down, layer.down_bias, none)?;
        ops::add_inplace(x, &down)?;
        Ok(())
    }
}

impl CpuModel for LlamaModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn embed(&self, tokens: &[u32], _positions: &[Option<usize>]) -> runtime::Result<Vec<f32>> {
        Ok(ops::embedding(&self.embed, tokens)?)
    }

    /// Padding rows (no position) are rotated as position 0: no real token
    /// attends to them.
    fn layer_forward(
        &self,
        layer: &HostLayer,
        hidden: &mut [f32],
        step: &Step<'_>,
        cache: &mut KvCache,
    ) -> runtime::Result<()> {
        let positions: Vec<usize> = step.positions.iter().map(|p| p.unwrap_or(0)).collect();
        self.layer(&Layer::of(layer)?, hidden, step, &positions, cache)
    }

    /// The final RMSNorm, then lm_head (or the tied embedding).
    fn logits(&self, hidden: &[f32], rows: usize) -> runtime::Result<Vec<f32>> {
        let mut x = hidden.to_vec();
        ops::rms_norm(&mut x, &self.norm, self.config.rms_norm_eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(ops::linear(&x, rows, head, None, ops::Activation::None)?)
    }
}

/// The checkpoint in `dir`, opened with the `checkpoint` crate
/// (safetensors, one file or shards with their index) and checked against
/// `config`'s layer spec before anything is read: every tensor present, of
/// its shape and of the checkpoint's one dtype (config.json's
/// `torch_dtype`, or the embedding's where the config names none, which
/// `config` then takes). An untied head needs `lm_head.weight`.
/// The file of a checkpoint that holds `name`, for messages.
pub fn file_of(checkpoint: &Checkpoint, name: &str) -> String {
    checkpoint.info(name).map_or_else(|| checkpoint.dir().display().to_string(), |i| i.file.display().to_string())
}

pub fn open_checked(dir: &Path, mut config: LlamaConfig) -> Result<(LlamaConfig, Checkpoint)> {
    let checkpoint = Checkpoint::open(dir)?;
    let stored = |name: &str| -> Result<Option<DType>> {
        Ok(match checkpoint.dtype(name) {
            None => None,
            Some(checkpoint::Dtype::F16) => Some(DType::F16),
            Some(checkpoint::Dtype::BF16) => Some(DType::BF16),
            Some(checkpoint::Dtype::F32) => Some(DType::F32),
            Some(other) => {
                return Err(Error::Tensor {
                    file: checkpoint
                        .info(name)
                        .map_or_else(|| dir.display().to_string(), |i| i.file.display().to_string()),
                    tensor: name.into(),
                    message: format!("is stored as {other}; supported: F16, BF16, F32"),
                })
            }
        })
    };
    if config.dtype.is_none() {
        // No dtype in config.json: the embedding's is the checkpoint's.
        config.dtype = stored("model.embed_tokens.weight")?;
    }
    if !config.tie_word_embeddings && !checkpoint.contains("lm_head.weight") {
        return Err(Error::Tensor {
            file: dir.display().to_string(),
            tensor: "lm_head.weight".into(),
            message: "is missing from the checkpoint, and config.json's tie_word_embeddings is false (untied \
                      embeddings need it; supported: an lm_head.weight tensor, or tie_word_embeddings true)"
                .into(),
        });
    }
    let spec = crate::spec::model_spec(&config)?;
    spec.check_checkpoint(&checkpoint)?;
    let dtype = config.weight_dtype();
    let mut names: Vec<String> = spec.outside.iter().map(|t| t.name.clone()).collect();
    for i in 0..spec.layers {
        names.extend(spec.layer.iter().map(|t| spec.layer_name(i, &t.name)));
    }
    for name in &names {
        if let Some(got) = stored(name)? {
            if got != dtype {
                let file =
                    checkpoint.info(name).map_or_else(|| dir.display().to_string(), |i| i.file.display().to_string());
                return Err(Error::Tensor {
                    file,
                    tensor: name.clone(),
                    message: format!("is {got}; the checkpoint's dtype (config.json torch_dtype) is {dtype}"),
                });
            }
        }
    }
    Ok((config, checkpoint))
}

/// The caches of a batch being generated, and its left padding.
pub struct State {
    caches: Vec<KvCache>,
    pads: Vec<usize>,
}

impl State {
    /// Positions held (padding included).
    pub fn len(&self) -> usize {
        self.caches.first().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{generate, prefill_logits, GenerateOptions};

    /// A tiny config of `model_type` with grouped-query attention (4 query
    /// heads over 2), 3 layers.
    pub(crate) fn tiny(model_type: &str, extra: &str) -> LlamaConfig {
        let mut v: serde_json::Value = serde_json::from_str(&format!(
            r#"{{"model_type": "{model_type}", "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "torch_dtype": "bfloat16"}}"#
        ))
        .unwrap();
        let extra: serde_json::Value = serde_json::from_str(&format!("{{{}}}", extra.trim_start_matches(','))).unwrap();
        if let (Some(a), serde_json::Value::Object(b)) = (v.as_object_mut(), extra) {
            a.extend(b);
        }
        LlamaConfig::from_json(&v.to_string()).unwrap()
    }

    const PROMPTS: [&[u32]; 3] = [&[5, 17, 40, 2, 90, 33, 8], &[11, 3], &[60, 61, 62, 63, 64]];

    fn left_padded_batch_equals_each_alone(model: &LlamaModel, what: &str) {
        let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
        let options = GenerateOptions::new(10);
        let batch = generate(model, &prompts, &options).unwrap();
        for (p, got) in prompts.iter().zip(&batch) {
            let alone = generate(model, std::slice::from_ref(p), &options).unwrap();
            assert_eq!(got, &alone[0], "{what}: prompt {p:?}");
            assert_eq!(got.len(), 10);
        }
        // Not a model that says one thing whatever it is given.
        assert!(batch[0] != batch[1] || batch[1] != batch[2], "{what}: {batch:?}");
        // The first step's logits agree closely too.
        let mut state = model.start(vec![0, 5, 2], 7).unwrap();
        let mut ids = Vec::new();
        for p in PROMPTS {
            ids.extend(std::iter::repeat_n(0u32, 7 - p.len()));
            ids.extend_from_slice(p);
        }
        let logits = model.forward(&mut state, &ids, 7).unwrap();
        let vocab = model.config().vocab_size;
        for (b, p) in PROMPTS.iter().enumerate() {
            let alone = prefill_logits(model, p).unwrap();
            let diff = alone.iter().zip(&logits[b * vocab..]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            // Not bit-equal: the products' summation order depends on the
            // batch, and a value that rounds the other way in the bf16 cache
            // moves the logits by about 1e-4.
            assert!(diff < 1e-3, "{what}: prompt {b} logits differ by {diff}");
        }
    }

    #[test]
    fn left_padding_gives_each_prompt_its_own_tokens() {
        let llama = tiny(
            "llama",
            r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}"#,
        );
        left_padded_batch_equals_each_alone(&LlamaModel::dummy(llama, 1).unwrap(), "llama");
        let qwen2 = tiny("qwen2", r#", "tie_word_embeddings": true"#);
        left_padded_batch_equals_each_alone(&LlamaModel::dummy(qwen2, 2).unwrap(), "qwen2");
        let qwen3 = tiny("qwen3", r#", "head_dim": 16"#);
        left_padded_batch_equals_each_alone(&LlamaModel::dummy(qwen3, 3).unwrap(), "qwen3");
        let mqa = tiny("mistral", r#", "num_key_value_heads": 1, "torch_dtype": "float16""#);
        left_padded_batch_equals_each_alone(&LlamaModel::dummy(mqa, 4).unwrap(), "mistral mqa f16");
    }

    #[test]
    fn the_model_holds_exactly_the_spec_tensors() {
        for (model_type, extra) in [
            ("llama", r#", "attention_bias": true, "mlp_bias": true"#),
            ("qwen2", r#", "tie_word_embeddings": true"#),
            ("qwen3", r#", "head_dim": 16"#),
            ("mistral", ""),
        ] {
            let config = tiny(model_type, extra);
            let spec = crate::spec::model_spec(&config).unwrap();
            let model = LlamaModel::dummy(config, 5).unwrap();
            let held: Vec<(String, Vec<usize>)> =
                model.named_tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
            let mut want: Vec<(String, Vec<usize>)> = Vec::new();
            for i in 0..spec.layers {
                want.extend(spec.layer.iter().map(|t| (format!("model.layers.{i}.{}", t.name), t.shape.clone())));
            }
            want.extend(spec.outside.iter().map(|t| (t.name.clone(), t.shape.clone())));
            let (mut a, mut b) = (held.clone(), want);
            a.sort();
            b.sort();
            assert_eq!(a, b, "{model_type}");
            let bytes: u64 = model.named_tensors().iter().map(|(_, t)| (t.len() * 2) as u64).sum();
            assert_eq!(bytes, spec.weight_bytes(false).unwrap(), "{model_type}");
            prefill_logits(&model, PROMPTS[0]).unwrap();
        }
    }

    #[test]
    fn grouped_heads_equal_repeated_heads() {
        // The same model written with 2 kv heads and with 4 (each kv head
        // repeated for its 2 query heads) gives the same logits.
        let gqa = LlamaModel::dummy(tiny("llama", ""), 7).unwrap();
        let mha_config = tiny("llama", r#", "num_key_value_heads": 4"#);
        let mha = LlamaModel::assemble(mha_config, |name, shape| {
            let src = gqa.checkpoint_tensors().unwrap().into_iter().find(|(n, _)| n == name).map(|(_, t)| t).unwrap();
            if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
                // Rows of head_dim 8: kv head g becomes heads 2g and 2g+1.
                let v = src.to_f32();
                let row = 8 * 32;
                let mut out = Vec::new();
                for g in 0..2 {
                    out.extend_from_slice(&v[g * row..(g + 1) * row]);
                    out.extend_from_slice(&v[g * row..(g + 1) * row]);
                }
                return Ok(Tensor::from_f32(DType::BF16, shape.to_vec(), &out).unwrap());
            }
            Ok(src)
        })
        .unwrap();
        let a = prefill_logits(&gqa, PROMPTS[0]).unwrap();
        let b = prefill_logits(&mha, PROMPTS[0]).unwrap();
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn eos_stops_each_sequence_and_sliding_window_is_refused() {
        let model = LlamaModel::dummy(tiny("llama", ""), 1).unwrap();
        let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
        let free = generate(&model, &prompts, &GenerateOptions::new(6)).unwrap();
        // Stop sequence 0 at its third token.
        let eos = free[0][2];
        let stopped =
            generate(&model, &prompts, &GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![500, eos] }).unwrap();
        for (f, s) in free.iter().zip(&stopped) {
            let cut = f.iter().position(|&t| t == eos).map_or(f.len(), |i| i + 1);
            assert_eq!(s, &f[..cut].to_vec());
        }
        assert_eq!(stopped[0].len(), 3);

        let windowed = LlamaModel::dummy(tiny("mistral", r#", "sliding_window": 12"#), 1).unwrap();
        let e = generate(&windowed, &prompts, &GenerateOptions::new(6)).unwrap_err().to_string();
        assert!(e.contains("sliding_window of 12") && e.contains("13 positions"), "{e}");
        generate(&windowed, &prompts, &GenerateOptions::new(5)).unwrap();
        let e = generate(&model, &[vec![1, 97]], &GenerateOptions::new(1)).unwrap_err().to_string();
        assert!(e.contains("token 97") && e.contains("97"), "{e}");
        assert!(generate(&model, &[vec![]], &GenerateOptions::new(1)).is_err());
    }

    /// Writes `tensors` as a checkpoint in `dir`: one file, or `shards`
    /// files with an index.
    fn save(dir: &Path, config_json: &str, tensors: &[(String, Tensor)], shards: usize) {
        use safetensors::{tensor::TensorView, Dtype};
        std::fs::write(dir.join("config.json"), config_json).unwrap();
        let dtype = |t: &Tensor| match t.dtype() {
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::F32 => Dtype::F32,
        };
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, t)| t.to_le_bytes()).collect();
        let mut weight_map = serde_json::Map::new();
        let per = tensors.len().div_ceil(shards);
        for s in 0..shards {
            let file = if shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{shards:05}.safetensors", s + 1)
            };
            let views: Vec<(String, TensorView)> = (s * per..((s + 1) * per).min(tensors.len()))
                .map(|i| {
                    let (name, t) = &tensors[i];
                    weight_map.insert(name.clone(), file.clone().into());
                    (name.clone(), TensorView::new(dtype(t), t.shape().to_vec(), &bytes[i]).unwrap())
                })
                .collect();
            safetensors::serialize_to_file(views, &None, &dir.join(&file)).unwrap();
        }
        if shards > 1 {
            let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
    }

    const CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": false}"#;

    fn owned(model: &LlamaModel) -> Vec<(String, Tensor)> {
        model.checkpoint_tensors().unwrap()
    }

    #[test]
    fn a_checkpoint_loads_whole_or_sharded_to_the_same_model() {
        let model = LlamaModel::dummy(LlamaConfig::from_json(CONFIG).unwrap(), 9).unwrap();
        let want = prefill_logits(&model, PROMPTS[0]).unwrap();
        for shards in [1, 3] {
            let dir = tempfile::tempdir().unwrap();
            save(dir.path(), CONFIG, &owned(&model), shards);
            let loaded = LlamaModel::load(dir.path()).unwrap();
            assert_eq!(prefill_logits(&loaded, PROMPTS[0]).unwrap(), want, "{shards} shard(s)");
        }
        // No dtype in config.json: the checkpoint's is taken.
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &CONFIG.replace(r#", "torch_dtype": "bfloat16""#, ""), &owned(&model), 1);
        assert_eq!(LlamaModel::load(dir.path()).unwrap().config().dtype, Some(DType::BF16));
    }

    #[test]
    fn a_checkpoint_that_does_not_match_is_refused_naming_the_tensor_and_file() {
        let model = LlamaModel::dummy(LlamaConfig::from_json(CONFIG).unwrap(), 9).unwrap();
        let load_err = |tensors: Vec<(String, Tensor)>, config: &str| {
            let dir = tempfile::tempdir().unwrap();
            save(dir.path(), config, &tensors, 2);
            LlamaModel::load(dir.path()).unwrap_err().to_string()
        };
        let without = |name: &str| owned(&model).into_iter().filter(|(n, _)| n != name).collect::<Vec<_>>();
        let e = load_err(without("model.layers.1.mlp.up_proj.weight"), CONFIG);
        assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing from the checkpoint"), "{e}");
        let e = load_err(without("lm_head.weight"), CONFIG);
        assert!(e.contains("lm_head.weight") && e.contains("tie_word_embeddings is false"), "{e}");
        // Tied: lm_head is not needed.
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path(),
            &CONFIG.replace("\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true"),
            &without("lm_head.weight"),
            1,
        );
        LlamaModel::load(dir.path()).unwrap();

        let mut bad_shape = owned(&model);
        let k = bad_shape.iter().position(|(n, _)| n == "model.layers.0.self_attn.k_proj.weight").unwrap();
        bad_shape[k].1 = Tensor::from_f32(DType::BF16, vec![32, 32], &[0.0; 1024]).unwrap();
        let e = load_err(bad_shape, CONFIG);
        assert!(
            e.contains("k_proj.weight")
                && e.contains("[32, 32]")
                && e.contains("[16, 32]")
                && e.contains(".safetensors"),
            "{e}"
        );
        let mut bad_dtype = owned(&model);
        bad_dtype[0].1 = Tensor::from_f32(DType::F16, vec![32], &[1.0; 32]).unwrap();
        let e = load_err(bad_dtype, CONFIG);
        assert!(e.contains("input_layernorm.weight") && e.contains("is f16") && e.contains("bf16"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
        let e = LlamaModel::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("index"), "{e}");
    }
}
