//! OPT as the runtime sees it: its [`ModelSpec`].
//!
//! The layer's tensors are listed as the compute device holds them, so that
//! the plan's bytes are the allocated bytes: on the GPU the q, k and v
//! projections stacked into one `[3·hidden, hidden]` matrix (packed as its
//! three parts under `--compress-weight`) and the biases fused into an f32
//! output (`out_proj`, `fc2`) held in f32; on the CPU every tensor f16 as
//! loaded, and the KV cache f32. The names are the checkpoint's, relative to
//! `decoder.layers.{i}.` (the stacked matrix is named after its first part's
//! module, `self_attn.qkv_proj`).

use runtime::spec::{Block, KvLayout, ModelSpec, Source, TensorSpec, Widths};
use tier_api::DType;

use crate::config::OptConfig;
use crate::error::Result;

fn tensor(name: &str, shape: &[usize], dtype: DType, block: Block) -> TensorSpec {
    let compressible = shape.len() == 2;
    TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        dtype,
        block,
        compressible,
        packed_as: Vec::new(),
        sources: Vec::new(),
    }
}

/// The q, k and v projections' `part` (`weight` or `bias`), each of
/// `shape`, that a stacked tensor is made from.
fn qkv_sources(part: &str, shape: &[usize]) -> Vec<Source> {
    ["q_proj", "k_proj", "v_proj"]
        .iter()
        .map(|p| Source { name: format!("self_attn.{p}.{part}"), shape: shape.to_vec() })
        .collect()
}

/// OPT's spec for `config`, as the GPU engine holds it (`gpu`) or the CPU
/// engine. The tensors are in the order the GPU engine moves them
/// (`GpuLayerWeights::tensors`).
pub fn model_spec(config: &OptConfig, gpu: bool) -> Result<ModelSpec> {
    let (h, f, e) = (config.hidden_size, config.ffn_dim, config.word_embed_proj_dim());
    let (bias, affine) = (config.enable_bias, config.layer_norm_elementwise_affine);
    let fused = if gpu { DType::F32 } else { DType::F16 };
    let (att, mlp, f16) = (Block::Attention, Block::Mlp, DType::F16);
    let mut layer = Vec::new();
    if affine {
        for (norm, block) in [("self_attn_layer_norm", att), ("final_layer_norm", mlp)] {
            layer.push(tensor(&format!("{norm}.weight"), &[h], f16, block));
            layer.push(tensor(&format!("{norm}.bias"), &[h], f16, block));
        }
    }
    let mut qkv = tensor("self_attn.qkv_proj.weight", &[3 * h, h], f16, att);
    qkv.packed_as = vec![vec![h, h]; 3];
    qkv.sources = qkv_sources("weight", &[h, h]);
    layer.push(qkv);
    if bias {
        let mut qkv_bias = tensor("self_attn.qkv_proj.bias", &[3 * h], f16, att);
        qkv_bias.sources = qkv_sources("bias", &[h]);
        layer.push(qkv_bias);
    }
    layer.push(tensor("self_attn.out_proj.weight", &[h, h], f16, att));
    if bias {
        layer.push(tensor("self_attn.out_proj.bias", &[h], fused, att));
    }
    layer.push(tensor("fc1.weight", &[f, h], f16, mlp));
    if bias {
        layer.push(tensor("fc1.bias", &[f], f16, mlp));
    }
    layer.push(tensor("fc2.weight", &[h, f], f16, mlp));
    if bias {
        layer.push(tensor("fc2.bias", &[h], fused, mlp));
    }
    let outside_tensor =
        |name: &str, shape: &[usize]| TensorSpec { compressible: false, ..tensor(name, shape, f16, att) };
    let mut outside = vec![
        outside_tensor("decoder.embed_tokens.weight", &[config.vocab_size, e]),
        outside_tensor("decoder.embed_positions.weight", &[config.position_rows(), h]),
    ];
    if config.has_projections() {
        outside.push(outside_tensor("decoder.project_in.weight", &[h, e]));
        outside.push(outside_tensor("decoder.project_out.weight", &[e, h]));
    }
    if config.has_final_layer_norm() && affine {
        outside.push(outside_tensor("decoder.final_layer_norm.weight", &[h]));
        outside.push(outside_tensor("decoder.final_layer_norm.bias", &[h]));
    }
    // The CPU engine keeps its cache in f32 (unrounded, the reference's).
    let kv_dtype = if gpu { f16 } else { DType::F32 };
    let kv = KvLayout { kv_heads: config.num_attention_heads, head_dim: config.head_dim(), dtype: kv_dtype };
    let hd = config.num_attention_heads * config.head_dim();
    let widths = Widths {
        hidden: h,
        heads: config.num_attention_heads,
        intermediate: f,
        dtype: f16,
        scratch_per_row: Widths::plain_scratch(hd, hd, f),
        // The GPU engine keeps the residual stream in f32 (and its homes
        // off the GPU hold it so); the CPU engine places none.
        residual: fused,
        // Post-LN models keep each block's f16 input beside the residual
        // (`gpu::activation_parts`).
        hidden_copy: gpu && !config.do_layer_norm_before,
        // The GPU engine's prefill takes every head's f32 scores at once.
        scores: runtime::spec::Scores::F32_ALL,
    };
    Ok(ModelSpec::new((config.num_hidden_layers, "decoder.layers.{}."), layer, outside, kv, widths)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_spec_counts_the_published_parameters() {
        for name in OptConfig::preset_names() {
            let c = OptConfig::preset(name).unwrap();
            let s = model_spec(&c, false).unwrap();
            assert_eq!(s.weight_bytes(false).unwrap(), c.weight_bytes(), "{name}");
            // FlexGen counts an f16 cache; the CPU engine keeps it in f32.
            assert_eq!(s.kv_cache_bytes(3, 7), 2 * c.kv_cache_bytes(3, 7), "{name}");
            assert_eq!(model_spec(&c, true).unwrap().kv_cache_bytes(3, 7), c.kv_cache_bytes(3, 7), "{name}");
        }
    }

    #[test]
    fn every_fixture_holds_what_its_spec_names() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/opt");
        for name in ["tiny-opt", "tiny-opt-350m-style", "tiny-opt-sharded"] {
            let dir = root.join(name);
            let config = OptConfig::from_dir(&dir).unwrap();
            let ckpt = checkpoint::Checkpoint::open(&dir).unwrap();
            model_spec(&config, true).unwrap().check_checkpoint(&ckpt).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn the_plan_splits_streamed_layers_as_the_gpu_engine_allocated_them() {
        // tiny-opt-sharded, --percent 30 30: one layer resident, two
        // streamed, 45% of each streamed buffer's elements in host memory.
        // The GPU engine's homes held 134,948 bytes in host memory on an
        // H100 (2026-12-07, gpu_tiered's 30/30/40 test); a split by rows of
        // the logical shapes would say 134,720.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/opt/tiny-opt-sharded");
        let spec = model_spec(&OptConfig::from_dir(&dir).unwrap(), true).unwrap();
        let policy = runtime::policy::Policy::default().with_percent(&[30.0, 30.0, 100.0, 0.0, 100.0, 0.0]).unwrap();
        let work = runtime::plan::Workload { prompt_len: 8, gen_len: 8 };
        let machine = runtime::plan::Machine { gpu_compute: true, can_pin: true };
        let fp = runtime::plan::footprint(&spec, &policy, work, machine).unwrap();
        assert_eq!(fp.weights.host(), 134_948);
        assert_eq!(fp.weights.host() + fp.weights.disk, 2 * spec.layer_bytes(false).unwrap());
    }

    #[test]
    fn hidden_states_off_the_gpu_count_the_post_ln_copy() {
        // The homes hold what `gpu::activation_parts` lists: the f32
        // residual, and for post-LN models its f16 copy; the GPU's two
        // buffers hold the same per value.
        let policy = runtime::policy::Policy::default().with_percent(&[100.0, 0.0, 100.0, 0.0, 0.0, 100.0]).unwrap();
        let work = runtime::plan::Workload { prompt_len: 16, gen_len: 4 };
        let machine = runtime::plan::Machine { gpu_compute: true, can_pin: true };
        for name in ["opt-125m", "opt-350m"] {
            let c = OptConfig::preset(name).unwrap();
            let spec = model_spec(&c, true).unwrap();
            let value: u64 = crate::gpu::model::activation_parts(&c).iter().map(|p| p.dtype.size() as u64).sum();
            assert_eq!(value, if c.do_layer_norm_before { 4 } else { 6 }, "{name}");
            let fp = runtime::plan::footprint(&spec, &policy, work, machine).unwrap();
            let values = (policy.gpu_batch_size * policy.num_gpu_batches * work.prompt_len * c.hidden_size) as u64;
            assert_eq!(fp.activations.pageable + fp.activations.pinned, values * value, "{name}: the homes");
        }
    }

    #[test]
    fn the_gpu_spec_holds_fused_biases_in_f32() {
        let c = OptConfig::preset("opt-125m").unwrap();
        let (cpu, gpu) = (model_spec(&c, false).unwrap(), model_spec(&c, true).unwrap());
        let h = c.hidden_size as u64;
        // out_proj's and fc2's biases: h values each, 2 more bytes a value.
        assert_eq!(gpu.layer_bytes(false).unwrap() - cpu.layer_bytes(false).unwrap(), 2 * h * 2);
        assert_eq!(gpu.layer_tensor("fc2.bias").unwrap().dtype, DType::F32);
    }
}
