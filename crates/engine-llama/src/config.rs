//! The Llama family's config, parsed from a Hugging Face config.json, and the
//! presets with the published shapes.
//!
//! Everything is validated when parsed, before anything is allocated:
//! unknown `model_type`s, rope scaling types and activations are refused by
//! name with the supported values, sizes must be positive, the query heads a
//! multiple of the key/value heads, and every byte count of the weights must
//! fit in `u64`.

use std::path::Path;

use ops::{DType, RopeScaling};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{config, Error, Result};

/// The architectures sharing Llama's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    /// q/k/v projections with biases.
    Qwen2,
    /// Per-head RMSNorm of queries and keys before the rotary embedding.
    Qwen3,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
}

/// A validated Llama-family config.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// `head_dim` when the config gives one, else hidden / heads.
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    /// Biases on gate, up and down.
    pub mlp_bias: bool,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    /// Stop on any of these (may be empty).
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The attention window, where one is in force (Mistral's
    /// `sliding_window`; Qwen's when `use_sliding_window`). The engine
    /// refuses generations longer than it.
    pub sliding_window: Option<usize>,
    /// The checkpoint's dtype (`torch_dtype` / `dtype`), if the config says.
    pub dtype: Option<DType>,
}

/// config.json as written, every field optional (checked afterwards).
#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    hidden_size: Option<u64>,
    intermediate_size: Option<u64>,
    num_hidden_layers: Option<u64>,
    num_attention_heads: Option<u64>,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<u64>,
    vocab_size: Option<u64>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
    sliding_window: Option<u64>,
    use_sliding_window: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// Rope types accepted in `rope_scaling` / `rope_parameters`.
pub const SUPPORTED_ROPE_TYPES: [&str; 3] = ["default", "linear", "llama3"];

/// The largest size a config field (or a head-width product) may give:
/// far beyond any published model, small enough that every width derived
/// from a few of them is computed without overflow.
pub const MAX_SIZE: u64 = 1 << 32;

fn size(field: &str, v: Option<u64>) -> Result<usize> {
    let v = v.ok_or_else(|| config(field, "is missing"))?;
    if v == 0 {
        return Err(config(field, "is 0; it must be positive"));
    }
    if v > MAX_SIZE {
        return Err(config(field, format!("{v} is too large (at most 2^32)")));
    }
    usize::try_from(v).map_err(|_| config(field, format!("{v} does not fit this machine's usize")))
}

fn token_ids(field: &str, v: Option<&Value>) -> Result<Vec<u32>> {
    let one = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| config(field, format!("holds {x}; expected token ids (integers below 2^32)")))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

fn single_id(field: &str, v: Option<&Value>) -> Result<Option<u32>> {
    let ids = token_ids(field, v)?;
    match ids[..] {
        [] => Ok(None),
        [id] => Ok(Some(id)),
        _ => Err(config(field, "is a list; expected one token id")),
    }
}

fn parse_dtype(field: &str, name: &str) -> Result<DType> {
    match name {
        "bfloat16" => Ok(DType::BF16),
        "float16" => Ok(DType::F16),
        "float32" => Ok(DType::F32),
        other => Err(config(field, format!("\"{other}\" is not supported; supported: bfloat16, float16, float32"))),
    }
}

fn rope_number(field: &str, obj: &serde_json::Map<String, Value>, key: &str) -> Result<f64> {
    let v = obj.get(key).ok_or_else(|| config(field, format!("has no `{key}`")))?;
    v.as_f64().ok_or_else(|| config(field, format!("`{key}` is {v}; expected a number")))
}

/// The scaling a `rope_scaling` / `rope_parameters` object asks for.
fn parse_rope(field: &str, v: Option<&Value>) -> Result<RopeScaling> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(RopeScaling::None),
        Some(Value::Object(obj)) => obj,
        Some(other) => return Err(config(field, format!("is {other}; expected an object"))),
    };
    let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str).unwrap_or("default");
    let positive = |key: &str| -> Result<f32> {
        let x = rope_number(field, obj, key)?;
        if x.is_finite() && x > 0.0 && x <= f32::MAX as f64 {
            Ok(x as f32)
        } else {
            Err(config(field, format!("`{key}` is {x}; it must be a positive number")))
        }
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: positive("factor")? }),
        "llama3" => {
            let (low, high) = (positive("low_freq_factor")?, positive("high_freq_factor")?);
            if high <= low {
                return Err(config(field, format!("high_freq_factor {high} must exceed low_freq_factor {low}")));
            }
            let original = rope_number(field, obj, "original_max_position_embeddings")?;
            if !(original >= 1.0 && original.fract() == 0.0 && original <= u32::MAX as f64) {
                return Err(config(
                    field,
                    format!("`original_max_position_embeddings` is {original}; expected a positive integer"),
                ));
            }
            Ok(RopeScaling::Llama3 {
                factor: positive("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original as usize,
            })
        }
        other => Err(config(
            field,
            format!("type \"{other}\" is not supported; supported: {}", SUPPORTED_ROPE_TYPES.join(", ")),
        )),
    }
}

impl LlamaConfig {
    /// Parses and validates a config.json text.
    pub fn from_json(text: &str) -> Result<LlamaConfig> {
        let raw: Raw =
            serde_json::from_str(text).map_err(|source| Error::Json { what: "config.json".into(), source })?;
        LlamaConfig::from_raw(raw)
    }

    /// Reads and validates `path` (a config.json).
    pub fn from_file(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
        let raw: Raw =
            serde_json::from_str(&text).map_err(|source| Error::Json { what: path.display().to_string(), source })?;
        LlamaConfig::from_raw(raw)
    }

    fn from_raw(raw: Raw) -> Result<LlamaConfig> {
        let model_type = raw.model_type.ok_or_else(|| config("model_type", "is missing"))?;
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            _ => return Err(Error::UnsupportedModelType { got: model_type }),
        };
        let act = raw.hidden_act.unwrap_or_else(|| "silu".into());
        if act != "silu" {
            return Err(config("hidden_act", format!("\"{act}\" is not supported; supported: silu")));
        }
        let hidden_size = size("hidden_size", raw.hidden_size)?;
        let intermediate_size = size("intermediate_size", raw.intermediate_size)?;
        let num_hidden_layers = size("num_hidden_layers", raw.num_hidden_layers)?;
        let heads = size("num_attention_heads", raw.num_attention_heads)?;
        let kv_heads = match raw.num_key_value_heads {
            None => heads,
            v => size("num_key_value_heads", v)?,
        };
        if !heads.is_multiple_of(kv_heads) {
            return Err(config(
                "num_attention_heads",
                format!("{heads} is not a multiple of num_key_value_heads {kv_heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(_) => size("head_dim", raw.head_dim)?,
            None => {
                if !hidden_size.is_multiple_of(heads) {
                    return Err(config(
                        "hidden_size",
                        format!(
                            "{hidden_size} is not a multiple of num_attention_heads {heads}, and no head_dim is given"
                        ),
                    ));
                }
                hidden_size / heads
            }
        };
        if (heads as u64).saturating_mul(head_dim as u64) > MAX_SIZE {
            return Err(config(
                "head_dim",
                format!("{head_dim} × num_attention_heads {heads} is too large a query width (at most 2^32)"),
            ));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(config("head_dim", format!("{head_dim} is odd; the rotary embedding needs an even width")));
        }
        let vocab_size = size("vocab_size", raw.vocab_size)?;
        let max_position_embeddings = match raw.max_position_embeddings {
            None => 2048,
            v => size("max_position_embeddings", v)?,
        };
        let eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return Err(config("rms_norm_eps", format!("{eps} must be a positive number below 1")));
        }
        // Newer configs put the rope's theta and type in `rope_parameters`.
        let (rope_field, rope_value) = match (&raw.rope_parameters, &raw.rope_scaling) {
            (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
            _ => ("rope_scaling", raw.rope_scaling.as_ref()),
        };
        let rope_scaling = parse_rope(rope_field, rope_value)?;
        let theta_in_params = raw.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(Value::as_f64);
        let rope_theta = theta_in_params.or(raw.rope_theta).unwrap_or(10000.0);
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(config("rope_theta", format!("{rope_theta} must be a number above 1")));
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Llama | Family::Qwen3 => (attention_bias, attention_bias),
            Family::Mistral => (false, false),
            Family::Qwen2 => (true, false),
        };
        let mlp_bias = raw.mlp_bias.unwrap_or(false);
        if mlp_bias && family != Family::Llama {
            return Err(config("mlp_bias", format!("is true, which {model_type} does not have; supported: false")));
        }
        let sliding_window = match family {
            Family::Llama => None,
            Family::Mistral => raw.sliding_window,
            Family::Qwen2 | Family::Qwen3 => raw.sliding_window.filter(|_| raw.use_sliding_window == Some(true)),
        };
        let sliding_window = match sliding_window {
            None => None,
            v => Some(size("sliding_window", v)?),
        };
        let dtype = match (&raw.dtype, &raw.torch_dtype) {
            (Some(d), _) => Some(parse_dtype("dtype", d)?),
            (None, Some(d)) => Some(parse_dtype("torch_dtype", d)?),
            (None, None) => None,
        };
        let config = LlamaConfig {
            family,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: eps as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            max_position_embeddings,
            vocab_size,
            bos_token_id: single_id("bos_token_id", raw.bos_token_id.as_ref())?,
            eos_token_id: token_ids("eos_token_id", raw.eos_token_id.as_ref())?,
            pad_token_id: single_id("pad_token_id", raw.pad_token_id.as_ref())?,
            sliding_window,
            dtype,
        };
        config.weight_bytes()?;
        Ok(config)
    }

    /// The dtype the weights are stored in: the config's, else bf16 (what
    /// released checkpoints of this family use).
    pub fn weight_dtype(&self) -> DType {
        self.dtype.unwrap_or(DType::BF16)
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameters of the whole model, checked.
    pub fn parameters(&self) -> Result<u64> {
        let (h, i, v) = (self.hidden_size as u64, self.intermediate_size as u64, self.vocab_size as u64);
        let (q, kv) = (
            self.num_attention_heads as u64 * self.head_dim as u64,
            self.num_key_value_heads as u64 * self.head_dim as u64,
        );
        let over = || config("hidden_size", "and the other sizes give a parameter count that overflows u64");
        let m = |a: u64, b: u64| a.checked_mul(b).ok_or_else(over);
        let add = |parts: &[u64]| parts.iter().try_fold(0u64, |s, &p| s.checked_add(p)).ok_or_else(over);
        let attention = add(&[
            m(h, q)?,
            m(m(h, kv)?, 2)?,
            m(q, h)?,
            if self.qkv_bias { q + 2 * kv } else { 0 },
            if self.o_bias { h } else { 0 },
            if self.family == Family::Qwen3 { 2 * self.head_dim as u64 } else { 0 },
        ])?;
        let mlp = add(&[m(m(h, i)?, 3)?, if self.mlp_bias { 2 * i + h } else { 0 }])?;
        let layer = add(&[attention, mlp, m(h, 2)?])?;
        let embeddings = m(v, h)?;
        let head = if self.tie_word_embeddings { 0 } else { embeddings };
        add(&[m(layer, self.num_hidden_layers as u64)?, embeddings, head, h])
    }

    /// Bytes of the weights in their dtype, checked.
    pub fn weight_bytes(&self) -> Result<u64> {
        self.parameters()?
            .checked_mul(self.weight_dtype().size() as u64)
            .ok_or_else(|| config("hidden_size", "and the other sizes give a weight byte count that overflows u64"))
    }

    /// The names of the presets.
    pub fn preset_names() -> &'static [&'static str] {
        &[
            "llama-2-7b",
            "llama-2-70b",
            "llama-3.1-8b",
            "llama-3.1-70b",
            "mistral-7b",
            "qwen2.5-7b",
            "qwen2.5-72b",
            "qwen3-8b",
            "qwen3-32b",
        ]
    }

    /// A preset: the published config.json of that model (the base model's
    /// repository: meta-llama/Llama-2-7b-hf, meta-llama/Llama-3.1-8B,
    /// mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-7B, Qwen/Qwen3-8B, …),
    /// parsed as any config.json is.
    pub fn preset(name: &str) -> Result<LlamaConfig> {
        let text = preset_json(name).ok_or_else(|| {
            config("preset", format!("\"{name}\" is not a preset; presets: {}", Self::preset_names().join(", ")))
        })?;
        LlamaConfig::from_json(&text.to_string())
    }
}

/// (hidden, intermediate, layers, heads, kv heads, vocab, max positions).
type Shape = (u64, u64, u64, u64, u64, u64, u64);

fn preset_json(name: &str) -> Option<Value> {
    use serde_json::json;
    let base = |model_type: &str, (h, i, l, a, kv, v, maxpos): Shape, eps: f64, theta: f64, dtype: &str| {
        json!({
            "model_type": model_type, "hidden_size": h, "intermediate_size": i, "num_hidden_layers": l,
            "num_attention_heads": a, "num_key_value_heads": kv, "vocab_size": v,
            "max_position_embeddings": maxpos, "rms_norm_eps": eps, "rope_theta": theta, "torch_dtype": dtype,
            "hidden_act": "silu", "tie_word_embeddings": false,
        })
    };
    let with = |mut v: Value, extra: Value| {
        if let (Some(a), Value::Object(b)) = (v.as_object_mut(), extra) {
            a.extend(b);
        }
        v
    };
    let llama3_rope = json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": 128001});
    let llama2 = json!({"bos_token_id": 1, "eos_token_id": 2});
    let qwen25 = json!({"bos_token_id": 151643, "eos_token_id": 151643, "use_sliding_window": false,
        "sliding_window": 131072});
    let qwen3 = json!({"head_dim": 128, "bos_token_id": 151643, "eos_token_id": 151645, "attention_bias": false,
        "use_sliding_window": false});
    Some(match name {
        "llama-2-7b" => with(base("llama", (4096, 11008, 32, 32, 32, 32000, 4096), 1e-5, 1e4, "float16"), llama2),
        "llama-2-70b" => with(base("llama", (8192, 28672, 80, 64, 8, 32000, 4096), 1e-5, 1e4, "float16"), llama2),
        "llama-3.1-8b" => {
            with(base("llama", (4096, 14336, 32, 32, 8, 128256, 131072), 1e-5, 5e5, "bfloat16"), llama3_rope)
        }
        "llama-3.1-70b" => {
            with(base("llama", (8192, 28672, 80, 64, 8, 128256, 131072), 1e-5, 5e5, "bfloat16"), llama3_rope)
        }
        "mistral-7b" => with(
            base("mistral", (4096, 14336, 32, 32, 8, 32000, 32768), 1e-5, 1e4, "bfloat16"),
            json!({"sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2}),
        ),
        "qwen2.5-7b" => with(base("qwen2", (3584, 18944, 28, 28, 4, 152064, 131072), 1e-6, 1e6, "bfloat16"), qwen25),
        "qwen2.5-72b" => with(base("qwen2", (8192, 29568, 80, 64, 8, 152064, 131072), 1e-5, 1e6, "bfloat16"), qwen25),
        "qwen3-8b" => with(base("qwen3", (4096, 12288, 36, 32, 8, 151936, 40960), 1e-6, 1e6, "bfloat16"), qwen3),
        "qwen3-32b" => with(base("qwen3", (5120, 25600, 64, 64, 8, 151936, 40960), 1e-6, 1e6, "bfloat16"), qwen3),
        _ => return None,
    })
}

/// The token ids a generation uses: `generation_config.json`'s where that
/// file gives them, else config.json's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerationIds {
    /// Stop on any of these (an id or a list in either file).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
}

impl GenerationIds {
    /// config.json's ids alone.
    pub fn of_config(config: &LlamaConfig) -> GenerationIds {
        GenerationIds {
            eos_token_ids: config.eos_token_id.clone(),
            pad_token_id: config.pad_token_id,
            bos_token_id: config.bos_token_id,
        }
    }

    /// The ids of checkpoint directory `dir` whose config.json is `config`.
    pub fn from_dir(dir: &Path, config: &LlamaConfig) -> Result<GenerationIds> {
        let mut ids = GenerationIds::of_config(config);
        let path = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
            Err(source) => return Err(Error::Io { path, source }),
        };
        let v: Value =
            serde_json::from_str(&text).map_err(|source| Error::Json { what: path.display().to_string(), source })?;
        if !v.is_object() {
            return Err(Error::Checkpoint { path, message: "is not a JSON object".into() });
        }
        let given = |key: &str| v.get(key).filter(|x| !x.is_null());
        if let Some(eos) = given("eos_token_id") {
            ids.eos_token_ids = token_ids("generation_config.json eos_token_id", Some(eos))?;
        }
        if let Some(pad) = given("pad_token_id") {
            ids.pad_token_id = single_id("generation_config.json pad_token_id", Some(pad))?;
        }
        if let Some(bos) = given("bos_token_id") {
            ids.bos_token_id = single_id("generation_config.json bos_token_id", Some(bos))?;
        }
        Ok(ids)
    }
}

/// The stop tokens of a checkpoint directory: generation_config.json's
/// `eos_token_id` (an id or a list) where that file gives one, else the
/// config's.
pub fn generation_eos(dir: &Path, config: &LlamaConfig) -> Result<Vec<u32>> {
    Ok(GenerationIds::from_dir(dir, config)?.eos_token_ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1 8B's config.json as published (transformers 4.43 era).
    const LLAMA31: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
      "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
      "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
      "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256
    }"#;

    const QWEN2: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
      "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
      "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
      "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
      "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": false,
      "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": true,
      "use_sliding_window": false, "vocab_size": 152064
    }"#;

    const QWEN3: &str = r#"{
      "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
      "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 25600,
      "max_position_embeddings": 40960, "max_window_layers": 64, "model_type": "qwen3",
      "num_attention_heads": 64, "num_hidden_layers": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
      "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": false,
      "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
      "use_sliding_window": false, "vocab_size": 151936
    }"#;

    const MISTRAL: &str = r#"{
      "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
      "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
      "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
      "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
      "sliding_window": 4096, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000
    }"#;

    /// `text` with `field` set to `value` (JSON), or removed for `None`.
    fn edit(text: &str, field: &str, value: Option<&str>) -> String {
        let mut v: Value = serde_json::from_str(text).unwrap();
        let obj = v.as_object_mut().unwrap();
        match value {
            Some(x) => obj.insert(field.into(), serde_json::from_str(x).unwrap()),
            None => obj.remove(field),
        };
        v.to_string()
    }

    fn err(text: &str) -> String {
        LlamaConfig::from_json(text).unwrap_err().to_string()
    }

    #[test]
    fn llama_3_1_with_llama3_rope_scaling() {
        let c = LlamaConfig::from_json(LLAMA31).unwrap();
        assert_eq!(c.family, Family::Llama);
        assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.group()), (32, 8, 128, 4));
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
        assert_eq!((c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_word_embeddings), (false, false, false, false));
        assert_eq!((c.bos_token_id, c.eos_token_id.clone()), (Some(128000), vec![128001]));
        assert_eq!(c.dtype, Some(DType::BF16));
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.sliding_window, None);
        // Instruct's list of stop tokens; transformers 5's rope_parameters.
        let instruct = edit(LLAMA31, "eos_token_id", Some("[128001, 128008, 128009]"));
        assert_eq!(LlamaConfig::from_json(&instruct).unwrap().eos_token_id, vec![128001, 128008, 128009]);
        let v5 = edit(
            &edit(LLAMA31, "rope_scaling", None),
            "rope_parameters",
            Some(
                r#"{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
            ),
        );
        let v5 = edit(&v5, "rope_theta", None);
        let c5 = LlamaConfig::from_json(&v5).unwrap();
        assert_eq!((c5.rope_theta, c5.rope_scaling), (c.rope_theta, c.rope_scaling));
        let default = edit(LLAMA31, "rope_scaling", Some(r#"{"rope_type": "default"}"#));
        assert_eq!(LlamaConfig::from_json(&default).unwrap().rope_scaling, RopeScaling::None);
        let linear = edit(LLAMA31, "rope_scaling", Some(r#"{"type": "linear", "factor": 2.0}"#));
        assert_eq!(LlamaConfig::from_json(&linear).unwrap().rope_scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn qwen2_has_qkv_biases_and_no_window_in_force() {
        let c = LlamaConfig::from_json(QWEN2).unwrap();
        assert_eq!(c.family, Family::Qwen2);
        assert_eq!((c.qkv_bias, c.o_bias), (true, false));
        assert_eq!((c.head_dim, c.num_key_value_heads, c.rms_norm_eps), (128, 4, 1e-6));
        assert_eq!(c.sliding_window, None, "use_sliding_window is false");
        assert_eq!(c.rope_theta, 1e6);
        let on = edit(QWEN2, "use_sliding_window", Some("true"));
        assert_eq!(LlamaConfig::from_json(&on).unwrap().sliding_window, Some(131072));
    }

    #[test]
    fn qwen3_with_an_explicit_head_dim() {
        let c = LlamaConfig::from_json(QWEN3).unwrap();
        assert_eq!(c.family, Family::Qwen3);
        // 64 heads of 128: wider than the 5120 hidden state.
        assert_eq!((c.head_dim, c.num_attention_heads * c.head_dim, c.hidden_size), (128, 8192, 5120));
        assert_eq!((c.rope_scaling, c.sliding_window, c.qkv_bias), (RopeScaling::None, None, false));
        let null_dim = edit(QWEN3, "head_dim", Some("null"));
        assert_eq!(LlamaConfig::from_json(&null_dim).unwrap().head_dim, 80);
    }

    #[test]
    fn mistral_records_its_sliding_window() {
        let c = LlamaConfig::from_json(MISTRAL).unwrap();
        assert_eq!((c.family, c.sliding_window, c.rope_theta), (Family::Mistral, Some(4096), 1e4));
        assert_eq!((c.qkv_bias, c.o_bias), (false, false));
        let defaults = edit(&edit(MISTRAL, "num_key_value_heads", None), "rope_theta", None);
        let d = LlamaConfig::from_json(&defaults).unwrap();
        assert_eq!((d.num_key_value_heads, d.rope_theta), (32, 10000.0), "kv heads default to heads");
    }

    #[test]
    fn bad_configs_name_the_field_and_the_supported_values() {
        let e = err(&edit(LLAMA31, "model_type", Some("\"gemma2\"")));
        assert!(e.contains("gemma2") && e.contains("llama, mistral, qwen2, qwen3"), "{e}");
        let e = err(&edit(LLAMA31, "hidden_act", Some("\"gelu\"")));
        assert!(e.contains("hidden_act") && e.contains("gelu") && e.contains("silu"), "{e}");
        let e = err(&edit(LLAMA31, "num_key_value_heads", Some("5")));
        assert!(e.contains("num_attention_heads") && e.contains("32") && e.contains("5"), "{e}");
        for field in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"] {
            let e = err(&edit(LLAMA31, field, Some("0")));
            assert!(e.contains(field) && e.contains("positive"), "{field}: {e}");
        }
        let e = err(&edit(LLAMA31, "vocab_size", None));
        assert!(e.contains("vocab_size") && e.contains("missing"), "{e}");
        let e = err(&edit(LLAMA31, "rope_scaling", Some(r#"{"rope_type": "yarn", "factor": 4.0}"#)));
        assert!(e.contains("rope_scaling") && e.contains("yarn") && e.contains("default, linear, llama3"), "{e}");
        let e = err(&edit(LLAMA31, "rope_scaling", Some(r#"{"rope_type": "llama3", "factor": 8.0}"#)));
        assert!(e.contains("low_freq_factor"), "{e}");
        let e = err(&edit(LLAMA31, "torch_dtype", Some("\"float8_e4m3fn\"")));
        assert!(e.contains("torch_dtype") && e.contains("bfloat16"), "{e}");
        let e = err(&edit(LLAMA31, "head_dim", Some("127")));
        assert!(e.contains("head_dim") && e.contains("odd"), "{e}");
        let e = err(&edit(MISTRAL, "mlp_bias", Some("true")));
        assert!(e.contains("mlp_bias"), "{e}");
        let e = err(&edit(LLAMA31, "eos_token_id", Some("[1, -2]")));
        assert!(e.contains("eos_token_id"), "{e}");
        // Sizes whose byte counts do not fit in u64.
        let huge = edit(&edit(LLAMA31, "hidden_size", Some("4294967296")), "vocab_size", Some("4294967296"));
        let e = err(&edit(&edit(&huge, "num_attention_heads", Some("1")), "num_key_value_heads", Some("1")));
        assert!(e.contains("overflows u64"), "{e}");
        let e = err(&edit(LLAMA31, "num_hidden_layers", Some("18446744073709551615")));
        assert!(e.contains("num_hidden_layers") && e.contains("too large"), "{e}");
        // Heads × head_dim past 2^32 (a fuzzer's find: the widths derived
        // from them overflowed).
        let e = err(&edit(LLAMA31, "head_dim", Some("4611686018427387904")));
        assert!(e.contains("head_dim") && e.contains("too large"), "{e}");
        let wide = edit(&edit(LLAMA31, "head_dim", Some("65536")), "num_attention_heads", Some("131072"));
        let e = err(&edit(&wide, "num_key_value_heads", Some("8")));
        assert!(e.contains("query width"), "{e}");
    }

    #[test]
    fn unknown_presets_are_listed() {
        let e = LlamaConfig::preset("llama-4").unwrap_err().to_string();
        assert!(e.contains("llama-3.1-70b") && e.contains("qwen3-32b"), "{e}");
        for name in LlamaConfig::preset_names() {
            LlamaConfig::preset(name).unwrap();
        }
    }

    #[test]
    fn generation_config_eos_may_be_a_list_and_overrides_the_config() {
        let c = LlamaConfig::from_json(LLAMA31).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(generation_eos(dir.path(), &c).unwrap(), vec![128001], "no file: the config's");
        let file = dir.path().join("generation_config.json");
        std::fs::write(&file, r#"{"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}"#).unwrap();
        assert_eq!(generation_eos(dir.path(), &c).unwrap(), vec![128001, 128008, 128009]);
        std::fs::write(&file, r#"{"eos_token_id": 7}"#).unwrap();
        assert_eq!(generation_eos(dir.path(), &c).unwrap(), vec![7]);
        std::fs::write(&file, r#"{"eos_token_id": "x"}"#).unwrap();
        let e = generation_eos(dir.path(), &c).unwrap_err().to_string();
        assert!(e.contains("generation_config.json eos_token_id"), "{e}");
        // pad and bos: the file's, else the config's.
        std::fs::write(&file, r#"{"pad_token_id": 128004, "eos_token_id": null}"#).unwrap();
        let ids = GenerationIds::from_dir(dir.path(), &c).unwrap();
        assert_eq!(
            ids,
            GenerationIds { eos_token_ids: vec![128001], pad_token_id: Some(128004), bos_token_id: Some(128000) }
        );
        std::fs::write(&file, r#"{"bos_token_id": [1, 2]}"#).unwrap();
        let e = GenerationIds::from_dir(dir.path(), &c).unwrap_err().to_string();
        assert!(e.contains("generation_config.json bos_token_id") && e.contains("list"), "{e}");
        std::fs::write(&file, "[]").unwrap();
        assert!(GenerationIds::from_dir(dir.path(), &c).is_err());
    }
}
