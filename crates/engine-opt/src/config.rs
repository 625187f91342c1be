//! OPT model configurations: Hugging Face's `config.json`, the published
//! sizes as presets, and the byte counts that FlexGen's cost accounting uses.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Bytes of one f16 value, the storage type of weights, cache and activations
/// in the accounting below.
pub const F16_BYTES: u64 = 2;

/// The offset OPT adds to every position before looking it up in
/// `embed_positions` (a leftover of fairseq's padding handling).
pub const POSITION_OFFSET: usize = 2;

/// Largest `vocab_size` accepted (2^24; published models have under 2^18).
pub const MAX_VOCAB: usize = 1 << 24;
/// Largest `hidden_size` and `word_embed_proj_dim` accepted (2^17).
pub const MAX_WIDTH: usize = 1 << 17;
/// Largest `ffn_dim` accepted (2^20).
pub const MAX_FFN: usize = 1 << 20;
/// Largest `num_hidden_layers` accepted (2^12).
pub const MAX_LAYERS: usize = 1 << 12;
/// Largest `max_position_embeddings` accepted (2^24).
pub const MAX_POSITIONS: usize = 1 << 24;

/// An OPT configuration as Hugging Face's `config.json` spells it.
///
/// The four size fields (`hidden_size`, `num_attention_heads`,
/// `num_hidden_layers`, `ffn_dim`) are required: every published checkpoint
/// has them, and defaulting them would only turn a broken file into a
/// confusing shape error later. Every other field defaults as in
/// transformers' `OPTConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub ffn_dim: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::yes")]
    pub do_layer_norm_before: bool,
    /// Defaults to `hidden_size` (see [`OptConfig::word_embed_proj_dim`]).
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "defaults::activation_function")]
    pub activation_function: String,
    #[serde(default = "defaults::yes")]
    pub enable_bias: bool,
    #[serde(default = "defaults::yes")]
    pub layer_norm_elementwise_affine: bool,
    /// Set on a few converted checkpoints: pre-layer-norm without the final
    /// layer norm.
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    #[serde(default = "defaults::bos")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "defaults::eos")]
    pub eos_token_id: Option<u32>,
    #[serde(default = "defaults::pad")]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
    /// The stored type as transformers 4 names the field.
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// The stored type as transformers 5 names the field.
    #[serde(default)]
    pub dtype: Option<String>,
}

mod defaults {
    pub fn vocab_size() -> usize {
        50272
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn yes() -> bool {
        true
    }
    pub fn activation_function() -> String {
        "relu".to_string()
    }
    pub fn bos() -> Option<u32> {
        Some(2)
    }
    pub fn eos() -> Option<u32> {
        Some(2)
    }
    pub fn pad() -> Option<u32> {
        Some(1)
    }
}

/// The published OPT sizes: (name, hidden, heads, layers, ffn).
const PRESETS: &[(&str, usize, usize, usize, usize)] = &[
    ("opt-125m", 768, 12, 12, 3072),
    ("opt-350m", 1024, 16, 24, 4096),
    ("opt-1.3b", 2048, 32, 24, 8192),
    ("opt-2.7b", 2560, 32, 32, 10240),
    ("opt-6.7b", 4096, 32, 32, 16384),
    ("opt-13b", 5120, 40, 40, 20480),
    ("opt-30b", 7168, 56, 48, 28672),
    ("opt-66b", 9216, 72, 64, 36864),
    ("opt-175b", 12288, 96, 96, 49152),
];

impl OptConfig {
    /// Reads and validates `config.json` from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::MissingConfig { dir: dir.to_path_buf() });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses and validates a `config.json` text.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let config: OptConfig = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The names [`OptConfig::preset`] knows, e.g. `opt-125m`.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.0).collect()
    }

    /// A published size by name: `opt-125m`, `facebook/opt-125m` or `125m`.
    pub fn preset(name: &str) -> Option<Self> {
        let short = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
        let short = short.strip_prefix("opt-").unwrap_or(&short);
        let &(_, hidden, heads, layers, ffn) = PRESETS.iter().find(|p| p.0.strip_prefix("opt-") == Some(short))?;
        let is_350m = short == "350m";
        Some(OptConfig {
            vocab_size: defaults::vocab_size(),
            hidden_size: hidden,
            num_attention_heads: heads,
            num_hidden_layers: layers,
            ffn_dim: ffn,
            max_position_embeddings: defaults::max_position_embeddings(),
            do_layer_norm_before: !is_350m,
            word_embed_proj_dim: Some(if is_350m { 512 } else { hidden }),
            activation_function: defaults::activation_function(),
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            remove_final_layer_norm: false,
            bos_token_id: Some(2),
            eos_token_id: Some(2),
            pad_token_id: Some(1),
            model_type: Some("opt".to_string()),
            torch_dtype: None,
            dtype: Some("float16".to_string()),
        })
    }

    /// Checks that the fields describe a model that can be built.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if let Some(t) = &self.model_type {
            if t != "opt" {
                return bad(format!("model_type is {t:?}, expected \"opt\""));
            }
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_hidden_layers", self.num_hidden_layers),
            ("ffn_dim", self.ffn_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("word_embed_proj_dim", self.word_embed_proj_dim()),
        ] {
            if value == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        // Bounds far above any published model, low enough that every byte
        // count derived from the configuration (weights, a sequence's cache)
        // fits in u64 and in usize on 64-bit hosts.
        for (name, value, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("word_embed_proj_dim", self.word_embed_proj_dim(), MAX_WIDTH),
            ("ffn_dim", self.ffn_dim, MAX_FFN),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS),
        ] {
            if value > max {
                return bad(format!(
                    "{name} {value} is larger than tierlm supports ({max}); is this config.json corrupt?"
                ));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.activation_function != "relu" {
            return bad(format!(
                "activation_function {:?} is not supported (OPT uses \"relu\")",
                self.activation_function
            ));
        }
        for (name, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= self.vocab_size {
                    return bad(format!("{name} {id} is outside the vocabulary (size {})", self.vocab_size));
                }
            }
        }
        Ok(())
    }

    /// Width of the token embeddings (512 for opt-350m, else `hidden_size`).
    pub fn word_embed_proj_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }

    /// Whether the model has `project_in` / `project_out`.
    pub fn has_projections(&self) -> bool {
        self.word_embed_proj_dim() != self.hidden_size
    }

    /// Whether the decoder ends with `final_layer_norm`.
    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rows of `embed_positions`: the positions plus OPT's offset of 2.
    pub fn position_rows(&self) -> usize {
        self.max_position_embeddings + POSITION_OFFSET
    }

    /// The longest sequence (prompt plus generated tokens) the model can see.
    pub fn max_sequence_len(&self) -> usize {
        self.max_position_embeddings
    }

    /// Parameters of one decoder layer.
    pub fn layer_param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let f = self.ffn_dim as u64;
        let bias = u64::from(self.enable_bias);
        let ln = if self.layer_norm_elementwise_affine { 2 * h } else { 0 };
        let attention = 4 * h * h + 4 * h * bias;
        let mlp = 2 * h * f + (f + h) * bias;
        attention + mlp + 2 * ln
    }

    /// Every parameter of the model, counting the tied `lm_head` once.
    pub fn param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let e = self.word_embed_proj_dim() as u64;
        let mut n = self.vocab_size as u64 * e + self.position_rows() as u64 * h;
        if self.has_projections() {
            n += 2 * h * e;
        }
        if self.has_final_layer_norm() && self.layer_norm_elementwise_affine {
            n += 2 * h;
        }
        n + self.num_hidden_layers as u64 * self.layer_param_count()
    }

    /// Bytes of all weights held as f16 (FlexGen's `model_bytes`, counted
    /// exactly rather than with its rounded formula).
    pub fn weight_bytes(&self) -> u64 {
        self.param_count() * F16_BYTES
    }

    /// Bytes of the key and value cache of every layer for `batch` sequences
    /// of `seq_len` tokens, f16 (FlexGen's `cache_bytes`).
    ///
    /// Saturates at `u64::MAX` (which no memory holds, so a fit check
    /// refuses it) where `batch` and `seq_len` from the command line would
    /// overflow.
    pub fn kv_cache_bytes(&self, batch: usize, seq_len: usize) -> u64 {
        [self.num_hidden_layers as u64, batch as u64, seq_len as u64, self.hidden_size as u64, F16_BYTES]
            .into_iter()
            .fold(2u64, u64::saturating_mul)
    }

    /// Bytes of the hidden states passed between layers for `batch`
    /// sequences of `seq_len` tokens, f16 (FlexGen's `hidden_bytes`).
    /// Saturates at `u64::MAX` as [`OptConfig::kv_cache_bytes`].
    pub fn activation_bytes(&self, batch: usize, seq_len: usize) -> u64 {
        [seq_len as u64, self.hidden_size as u64, F16_BYTES].into_iter().fold(batch as u64, u64::saturating_mul)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_published_sizes() {
        // Parameter counts as published, within rounding of the name.
        let expect = [
            ("opt-125m", 125e6),
            ("opt-350m", 331e6),
            ("opt-1.3b", 1.3e9),
            ("opt-2.7b", 2.7e9),
            ("opt-6.7b", 6.7e9),
            ("opt-13b", 13e9),
            ("opt-30b", 30e9),
            ("opt-66b", 66e9),
            ("opt-175b", 175e9),
        ];
        for (name, params) in expect {
            let c = OptConfig::preset(name).unwrap();
            c.validate().unwrap();
            let n = c.param_count() as f64;
            assert!((n / params - 1.0).abs() < 0.06, "{name}: {n}");
        }
        assert_eq!(OptConfig::preset("facebook/opt-30b").unwrap().hidden_size, 7168);
        assert_eq!(OptConfig::preset("13B").unwrap().num_hidden_layers, 40);
        assert!(OptConfig::preset("opt-7b").is_none());
        let c350 = OptConfig::preset("opt-350m").unwrap();
        assert!(!c350.do_layer_norm_before && c350.has_projections());
        assert!(!c350.has_final_layer_norm());
    }

    #[test]
    fn opt_125m_param_count_is_exact() {
        // The number transformers reports for facebook/opt-125m.
        assert_eq!(OptConfig::preset("opt-125m").unwrap().param_count(), 125_239_296);
    }

    #[test]
    fn byte_accounting() {
        let c = OptConfig::preset("opt-6.7b").unwrap();
        // 2 (k, v) * 32 layers * 4 seqs * 544 tokens * 4096 * 2 bytes
        assert_eq!(c.kv_cache_bytes(4, 544), 2 * 32 * 4 * 544 * 4096 * 2);
        assert_eq!(c.activation_bytes(4, 512), 4 * 512 * 4096 * 2);
        assert_eq!(c.weight_bytes(), c.param_count() * 2);
    }

    #[test]
    fn hf_defaults_and_errors() {
        let c = OptConfig::from_json_str(
            r#"{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "ffn_dim": 256}"#,
        )
        .unwrap();
        assert_eq!(c.vocab_size, 50272);
        assert_eq!(c.max_position_embeddings, 2048);
        assert!(c.do_layer_norm_before && c.enable_bias);
        assert_eq!(c.word_embed_proj_dim(), 64);
        assert_eq!((c.bos_token_id, c.eos_token_id, c.pad_token_id), (Some(2), Some(2), Some(1)));

        let err = OptConfig::from_json_str(
            r#"{"hidden_size": 64, "num_attention_heads": 5, "num_hidden_layers": 2, "ffn_dim": 256}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not divisible"), "{err}");

        let err =
            OptConfig::from_json_str(r#"{"hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 256}"#).unwrap_err();
        assert!(err.to_string().contains("num_attention_heads"), "{err}");

        let err = OptConfig::from_json_str(
            r#"{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 0, "ffn_dim": 256}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("num_hidden_layers must be positive"), "{err}");
    }

    #[test]
    fn sizes_are_bounded_so_byte_counts_fit() {
        for field in ["ffn_dim", "max_position_embeddings", "vocab_size", "hidden_size", "num_hidden_layers"] {
            let mut v: serde_json::Value = serde_json::from_str(
                r#"{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "ffn_dim": 256}"#,
            )
            .unwrap();
            v[field] = serde_json::json!(1u64 << 62);
            let err = OptConfig::from_json_str(&v.to_string()).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("larger than tierlm supports"), "{field}: {err}");
        }
        // The largest configuration accepted: its byte counts, computed in
        // u128, fit in u64.
        let mut c = OptConfig::preset("opt-125m").unwrap();
        (c.vocab_size, c.hidden_size, c.ffn_dim, c.num_attention_heads) = (MAX_VOCAB, MAX_WIDTH, MAX_FFN, 16);
        (c.num_hidden_layers, c.max_position_embeddings, c.word_embed_proj_dim) =
            (MAX_LAYERS, MAX_POSITIONS, Some(MAX_WIDTH / 2));
        c.validate().unwrap();
        let (h, e, f) = (MAX_WIDTH as u128, (MAX_WIDTH / 2) as u128, MAX_FFN as u128);
        let layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h;
        let params =
            MAX_VOCAB as u128 * e + (MAX_POSITIONS as u128 + 2) * h + 2 * h * e + 2 * h + MAX_LAYERS as u128 * layer;
        assert_eq!(u128::from(c.weight_bytes()), params * 2);
        let seq_cache = 2 * MAX_LAYERS as u128 * MAX_POSITIONS as u128 * h * 2;
        assert_eq!(u128::from(c.kv_cache_bytes(1, MAX_POSITIONS)), seq_cache);
        // Batch sizes from the command line saturate instead of wrapping.
        assert_eq!(c.kv_cache_bytes(usize::MAX, MAX_POSITIONS), u64::MAX);
        assert_eq!(c.activation_bytes(usize::MAX, 2), u64::MAX);
    }
}
