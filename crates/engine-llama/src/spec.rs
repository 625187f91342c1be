//! The Llama family as the runtime sees it: its [`ModelSpec`].
//!
//! The layer's tensors carry their Hugging Face names relative to
//! `model.layers.{i}.`, in the checkpoint's dtype; the 2-D matrices may be
//! stored 4-bit. Outside the layers: the embedding, the final norm and,
//! unless the embeddings are tied, `lm_head.weight`.

use runtime::spec::{Block, KvLayout, ModelSpec, Scores, Source, TensorSpec, Widths};
use tier_api::DType;

use crate::config::{Family, LlamaConfig};
use crate::error::Result;

/// The runtime's name for an op-layer dtype.
pub fn runtime_dtype(dtype: ops::DType) -> DType {
    match dtype {
        ops::DType::F16 => DType::F16,
        ops::DType::BF16 => DType::BF16,
        ops::DType::F32 => DType::F32,
    }
}

fn tensor(name: &str, shape: &[usize], dtype: DType, block: Block) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        dtype,
        block,
        compressible: shape.len() == 2,
        packed_as: Vec::new(),
        sources: Vec::new(),
    }
}

/// A tensor stacked by rows from the layer's checkpoint tensors `parts`
/// (`(name, rows)`, each `[rows, cols]`, or `[rows]` for biases when
/// `cols` is `None`): one product for all of them, packed part by part
/// when compressed.
fn stacked(name: &str, parts: &[(String, usize)], cols: Option<usize>, dtype: DType, block: Block) -> TensorSpec {
    let rows: usize = parts.iter().map(|p| p.1).sum();
    let shape = |r: usize| match cols {
        Some(c) => vec![r, c],
        None => vec![r],
    };
    let mut t = tensor(name, &shape(rows), dtype, block);
    if cols.is_some() {
        t.packed_as = parts.iter().map(|p| shape(p.1)).collect();
    }
    t.sources = parts.iter().map(|(n, r)| Source { name: n.clone(), shape: shape(*r) }).collect();
    t
}

/// The tensors of one decoder layer, in the order the layer reads them.
/// The q, k and v projections are held stacked as `self_attn.qkv_proj`
/// and the gate and up projections as `mlp.gate_up_proj` (rows one part
/// after the other), so that each pair or triple is one product.
pub fn layer_tensors(config: &LlamaConfig) -> Vec<TensorSpec> {
    let dtype = runtime_dtype(config.weight_dtype());
    let (h, i, d) = (config.hidden_size, config.intermediate_size, config.head_dim);
    let (q, kv) = (config.num_attention_heads * d, config.num_key_value_heads * d);
    let (att, mlp) = (Block::Attention, Block::Mlp);
    let mut layer = vec![tensor("input_layernorm.weight", &[h], dtype, att)];
    let qkv =
        |part: &str| [("q_proj", q), ("k_proj", kv), ("v_proj", kv)].map(|(p, r)| (format!("self_attn.{p}.{part}"), r));
    layer.push(stacked("self_attn.qkv_proj.weight", &qkv("weight"), Some(h), dtype, att));
    if config.qkv_bias {
        layer.push(stacked("self_attn.qkv_proj.bias", &qkv("bias"), None, dtype, att));
    }
    if config.family == Family::Qwen3 {
        layer.push(tensor("self_attn.q_norm.weight", &[d], dtype, att));
        layer.push(tensor("self_attn.k_norm.weight", &[d], dtype, att));
    }
    layer.push(tensor("self_attn.o_proj.weight", &[h, q], dtype, att));
    if config.o_bias {
        layer.push(tensor("self_attn.o_proj.bias", &[h], dtype, att));
    }
    layer.push(tensor("post_attention_layernorm.weight", &[h], dtype, mlp));
    let gate_up = |part: &str| [("gate_proj", i), ("up_proj", i)].map(|(p, r)| (format!("mlp.{p}.{part}"), r));
    layer.push(stacked("mlp.gate_up_proj.weight", &gate_up("weight"), Some(h), dtype, mlp));
    if config.mlp_bias {
        layer.push(stacked("mlp.gate_up_proj.bias", &gate_up("bias"), None, dtype, mlp));
    }
    layer.push(tensor("mlp.down_proj.weight", &[h, i], dtype, mlp));
    if config.mlp_bias {
        layer.push(tensor("mlp.down_proj.bias", &[h], dtype, mlp));
    }
    layer
}

/// The tensors outside the layers.
pub fn outside_tensors(config: &LlamaConfig) -> Vec<TensorSpec> {
    let dtype = runtime_dtype(config.weight_dtype());
    let (h, v) = (config.hidden_size, config.vocab_size);
    let whole = |name: &str, shape: &[usize]| TensorSpec {
        compressible: false,
        ..tensor(name, shape, dtype, Block::Attention)
    };
    let mut outside = vec![whole("model.embed_tokens.weight", &[v, h]), whole("model.norm.weight", &[h])];
    if !config.tie_word_embeddings {
        outside.push(whole("lm_head.weight", &[v, h]));
    }
    outside
}

/// The prefix of layer `i`'s tensor names in a checkpoint.
pub fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}.")
}

/// Bytes the GPU engine's prefill attention scores may take at once: a
/// GPU batch's sequences are taken in chunks under it.
pub const SCORES_BUDGET: u64 = 1 << 30;

/// How the GPU engine holds the prefill's scores: in the compute type
/// (`bytes` each, as transformers stores them), chunked under
/// [`SCORES_BUDGET`]. The plan counts the buffer from this, and the engine
/// sizes it from it.
pub fn scores(bytes: usize) -> Scores {
    Scores { bytes, budget: Some(SCORES_BUDGET) }
}

/// Values a row of the GPU engine's buffer for the stacked products takes:
/// the gate/up product's `2 · intermediate`, or the q/k/v product's if
/// wider.
pub fn stacked_width(config: &LlamaConfig) -> usize {
    let d = config.head_dim;
    (2 * config.intermediate_size).max((config.num_attention_heads + 2 * config.num_key_value_heads) * d)
}

/// The family's spec for `config`.
pub fn model_spec(config: &LlamaConfig) -> Result<ModelSpec> {
    let dtype = runtime_dtype(config.weight_dtype());
    let kv = KvLayout { kv_heads: config.num_key_value_heads, head_dim: config.head_dim, dtype };
    let (h, inter) = (config.hidden_size, config.intermediate_size);
    let (q, kv_w) = (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim);
    let widths = Widths {
        hidden: h,
        heads: config.num_attention_heads,
        intermediate: inter,
        dtype,
        // The GPU engine's rows (`gpu::Workspace`): the normed input, q, k,
        // v, q by head, the attention's output, and the stacked products'
        // outputs (gate and up, or q, k and v before their split).
        scratch_per_row: h + 3 * q + 2 * kv_w + stacked_width(config),
        // Hidden states stay f32 between layers.
        residual: DType::F32,
        hidden_copy: false,
        scores: scores(dtype.size()),
    };
    Ok(ModelSpec::new(
        (config.num_hidden_layers, "model.layers.{}."),
        layer_tensors(config),
        outside_tensors(config),
        kv,
        widths,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published parameter counts (model cards / safetensors metadata).
    const PUBLISHED: [(&str, f64); 9] = [
        ("llama-2-7b", 6.74e9),
        ("llama-2-70b", 68.98e9),
        ("llama-3.1-8b", 8.03e9),
        ("llama-3.1-70b", 70.55e9),
        ("mistral-7b", 7.24e9),
        ("qwen2.5-7b", 7.61e9),
        ("qwen2.5-72b", 72.7e9),
        ("qwen3-8b", 8.19e9),
        ("qwen3-32b", 32.8e9),
    ];

    #[test]
    fn every_preset_has_its_published_size() {
        assert_eq!(PUBLISHED.len(), LlamaConfig::preset_names().len());
        for (name, published) in PUBLISHED {
            let c = LlamaConfig::preset(name).unwrap();
            let s = model_spec(&c).unwrap();
            let params = s.weight_bytes(false).unwrap() / c.weight_dtype().size() as u64;
            assert_eq!(params, c.parameters().unwrap(), "{name}: the spec and the config count alike");
            let ratio = params as f64 / published;
            assert!((ratio - 1.0).abs() < 0.02, "{name}: {params} parameters vs {published:e} published");
        }
    }

    #[test]
    fn the_spec_names_hf_tensors_and_counts_the_grouped_cache() {
        let c = LlamaConfig::preset("llama-3.1-8b").unwrap();
        let s = model_spec(&c).unwrap();
        assert_eq!(s.layers, 32);
        let qkv = s.layer_tensor("self_attn.qkv_proj.weight").unwrap();
        assert_eq!(qkv.shape, vec![4096 + 2 * 1024, 4096]);
        assert_eq!(qkv.parts(), vec![vec![4096, 4096], vec![1024, 4096], vec![1024, 4096]]);
        let names: Vec<String> = qkv.sources().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]);
        assert_eq!(s.layer_tensor("mlp.gate_up_proj.weight").unwrap().shape, vec![2 * 14336, 4096]);
        assert_eq!(s.layer_tensor("mlp.down_proj.weight").unwrap().block, Block::Mlp);
        assert!(s.layer_tensor("input_layernorm.weight").is_some_and(|t| !t.compressible));
        assert!(s.layer_tensor("self_attn.qkv_proj.bias").is_none());
        assert_eq!(s.kv, KvLayout { kv_heads: 8, head_dim: 128, dtype: DType::BF16 });
        // 8 kv heads of 128 in bf16: 4 KiB a token a layer for k and v.
        assert_eq!(s.kv.token_bytes(), 4096);
        assert!(s.outside.iter().any(|t| t.name == "lm_head.weight"));

        let q2 = model_spec(&LlamaConfig::preset("qwen2.5-7b").unwrap()).unwrap();
        let bias = q2.layer_tensor("self_attn.qkv_proj.bias").unwrap();
        assert_eq!(bias.shape, vec![3584 + 2 * 512]);
        assert_eq!(bias.sources()[2].shape, vec![512]);
        assert!(q2.layer_tensor("self_attn.o_proj.bias").is_none());
        let q3 = model_spec(&LlamaConfig::preset("qwen3-32b").unwrap()).unwrap();
        // Qwen3-32B: 64 heads of 128 = 8192 wide over a 5120 hidden state.
        assert_eq!(q3.layer_tensor("self_attn.o_proj.weight").unwrap().shape, vec![5120, 8192]);
        assert_eq!(q3.layer_tensor("self_attn.q_norm.weight").unwrap().shape, vec![128]);
    }
}
