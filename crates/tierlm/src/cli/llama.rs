//! `tierlm generate` for the Llama family (`model_type` `llama`, `mistral`,
//! `qwen2`, `qwen3`) on the runtime's CPU engine: the weights and an f32 KV
//! cache in host memory (as OPT's CPU engine), or with `--percent 0 W 0 C 0
//! 100` the later layers and a share of each batch's cache on disk, driven
//! by the runtime's block schedule.
//!
//! [`family_of`] decides which family a `--model` argument names: a
//! directory by its config.json's `model_type`, a preset by its name.
//! What the family cannot do yet (its GPU engine, compression, `bench`) is
//! refused by name rather than ignored.

use std::path::{Path, PathBuf};

use engine_llama::device::generate_placed;
use engine_llama::{GenerationIds, LlamaConfig, LlamaModel};
use engine_opt::loading::check_fits;
use engine_opt::sampling::{Sampler, SamplingConfig};
use runtime::cpu::{CpuPlacement, DiskLayers, HostLayer};
use runtime::schedule::GenerateOptions;
use runtime::tokenizer::Tokenizer;

use super::generate::{output_file, read_inputs, GenerateArgs, Input, Outputs};
use crate::{Error, Result};

/// The families `tierlm` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Opt,
    /// Llama, Mistral, Qwen2, Qwen3.
    Llama,
}

/// Every `model_type` `tierlm` runs.
pub fn supported_model_types() -> Vec<&'static str> {
    let mut all = vec!["opt"];
    all.extend(engine_llama::error::SUPPORTED_MODEL_TYPES);
    all
}

fn unsupported(message: String) -> Error {
    Error::Opt(engine_opt::Error::InvalidArgument(message))
}

/// The family `--model` names: a directory's config.json `model_type`
/// (none, or one that does not parse: OPT's loader reports it), or a preset
/// of either family. Any other `model_type` is refused with the list.
pub fn family_of(model: &str) -> Result<Family> {
    let dir = Path::new(model);
    if dir.is_dir() {
        let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
            return Ok(Family::Opt);
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Ok(Family::Opt);
        };
        return match value.get("model_type").and_then(serde_json::Value::as_str) {
            None | Some("opt") => Ok(Family::Opt),
            Some(t) if engine_llama::error::SUPPORTED_MODEL_TYPES.contains(&t) => Ok(Family::Llama),
            Some(t) => Err(unsupported(format!(
                "{}: config.json's model_type \"{t}\" is not supported; supported: {}",
                dir.display(),
                supported_model_types().join(", ")
            ))),
        };
    }
    if LlamaConfig::preset_names().contains(&model) {
        return Ok(Family::Llama);
    }
    if engine_opt::OptConfig::preset(model).is_none() {
        let mut known: Vec<&str> = engine_opt::OptConfig::preset_names().to_vec();
        known.extend(LlamaConfig::preset_names());
        return Err(Error::Opt(engine_opt::Error::UnknownModel { name: model.to_string(), known: known.join(", ") }));
    }
    Ok(Family::Opt)
}

/// Whether `model` names a Llama-family directory or preset (commands
/// that do not run the family yet refuse it by name).
pub fn names_llama_family(model: &str) -> bool {
    matches!(family_of(model), Ok(Family::Llama))
}

/// Refuses the flags the Llama family's CPU engine cannot honour yet,
/// naming them: it computes on the CPU, with the weights and the KV cache in
/// host memory or partly on disk (`--percent 0 W 0 C 0 100`).
fn refuse_unsupported(args: &GenerateArgs) -> Result<()> {
    // Nothing on the GPU, activations in host memory: the CPU engine's.
    let on_cpu = |p: &[f64]| p.len() == 6 && p[0] == 0.0 && p[2] == 0.0 && p[4] == 0.0 && p[5] == 100.0;
    let mut refused: Vec<String> = Vec::new();
    if let Some(p) = args.percent.as_deref().filter(|p| !on_cpu(p)) {
        let p: Vec<String> = p.iter().map(f64::to_string).collect();
        refused.push(format!("--percent {} (placements on the GPU)", p.join(" ")));
    }
    for (given, flag) in [
        (args.compress_weight, "--compress-weight"),
        (args.compress_cache, "--compress-cache"),
        (args.cpu_cache_compute, "--cpu-cache-compute"),
        (args.attn_sparsity != 1.0, "--attn-sparsity"),
        (args.gpu_mem.is_some(), "--gpu-mem"),
        (args.pin_weight.is_some(), "--pin-weight"),
        (args.policy.as_deref() == Some("auto"), "--policy auto"),
        (args.host_mem.is_some(), "--host-mem"),
        (args.calibration.is_some(), "--calibration"),
    ] {
        if given {
            refused.push(flag.to_string());
        }
    }
    if refused.is_empty() {
        return Ok(());
    }
    Err(unsupported(format!(
        "{} not supported for the Llama family yet: it runs on the CPU engine with the weights and the KV cache \
         in host memory or partly on disk (--percent 0 W_CPU 0 C_CPU 0 100 --offload-dir DIR); its GPU engine \
         and compression are not built yet",
        refused.join(", ") + if refused.len() == 1 { " is" } else { " are" }
    )))
}

/// A Llama-family model ready to run, with what its directory holds.
struct Loaded {
    model: LlamaModel,
    ids: GenerationIds,
    tokenizer: Option<Tokenizer>,
    /// Where it came from, for messages.
    source: PathBuf,
    /// The layers `--percent` put on disk.
    on_disk: Option<std::sync::Arc<DiskLayers>>,
}

/// Loads `model` (a directory, or a preset with `dummy`): config.json
/// validated, the checkpoint checked against the spec and the memory it
/// needs before anything is allocated.
fn load(model: &str, dummy: bool, seed: u64, offload: Option<&Offload>) -> Result<Loaded> {
    let dir = Path::new(model);
    let (config, dir) = if dir.is_dir() {
        (LlamaConfig::from_file(&dir.join("config.json"))?, Some(dir))
    } else {
        if !dummy {
            return Err(unsupported(format!(
                "{model} is a preset: give a checkpoint directory, or --dummy for random weights"
            )));
        }
        (LlamaConfig::preset(model)?, None)
    };
    let checkpoint = match (dir, dummy) {
        (Some(d), false) => Some(engine_llama::model::open_checked(d, config)?),
        _ => None,
    };
    let config = match &checkpoint {
        Some((c, _)) => c.clone(),
        None => match dir {
            Some(d) => LlamaConfig::from_file(&d.join("config.json"))?,
            None => LlamaConfig::preset(model)?,
        },
    };
    let spec = engine_llama::model_spec(&config)?;
    let resident = offload.map_or(spec.layers, |o| runtime::plan::resident_layers(spec.layers, o.policy.w_cpu_percent));
    let in_memory = spec.outside_bytes()?.saturating_add((resident as u64).saturating_mul(spec.layer_bytes(false)?));
    check_fits(&format!("{model}'s weights in memory"), in_memory)?;
    let mut on_disk = match offload {
        Some(o) if resident < spec.layers => {
            let need = (spec.layers - resident) as u64 * spec.layer_bytes(false)?;
            tier_disk::check_free(&o.dir, need, "the weights placed on disk").map_err(engine_opt::Error::from)?;
            let disk = o.tiers.disk(&o.dir)?;
            Some(DiskLayers::new(disk, spec.clone(), resident).with_host_account(std::sync::Arc::clone(&o.host)))
        }
        _ => None,
    };
    let mut away = |j: usize, layer: HostLayer| -> engine_llama::Result<()> {
        match on_disk.as_mut() {
            Some(d) => Ok(d.put(j, &layer)?),
            None => Ok(()),
        }
    };
    let ids = match dir {
        Some(d) => GenerationIds::from_dir(d, &config)?,
        None => GenerationIds::of_config(&config),
    };
    let tokenizer = match dir {
        Some(d) => Tokenizer::from_dir(d)?,
        None => None,
    };
    let model_weights = match checkpoint {
        Some((c, ckpt)) => LlamaModel::from_checkpoint_streaming(c, &ckpt, resident, &mut away)?,
        None => LlamaModel::dummy_streaming(config, seed, resident, &mut away)?,
    };
    // The cache in f32, as OPT's CPU engine keeps it: the reference's
    // numbers (Hugging Face computing in float32 over the stored weights).
    let source = dir.map_or_else(|| PathBuf::from(model), Path::to_path_buf);
    Ok(Loaded {
        model: model_weights.with_cache_dtype(ops::DType::F32),
        ids,
        tokenizer,
        source,
        on_disk: on_disk.map(std::sync::Arc::new),
    })
}

/// Where `--percent` puts what is not in host memory: the run's tiers, the
/// offload directory, the host account the engine reserves against.
struct Offload {
    policy: runtime::policy::Policy,
    tiers: runtime::Tiers,
    dir: PathBuf,
    host: std::sync::Arc<tier_api::MemAccount>,
}

/// Token ids of each input: ids as given; text through the tokenizer, or
/// with `chat` in the chat template as one user message.
fn tokenize(loaded: &Loaded, inputs: &[Input], chat: bool) -> Result<Vec<Vec<u32>>> {
    inputs
        .iter()
        .map(|input| match input {
            Input::Ids(ids) => Ok(ids.clone()),
            Input::Text(text) => {
                let tok = loaded
                    .tokenizer
                    .as_ref()
                    .ok_or_else(|| engine_opt::Error::NoTokenizer { dir: loaded.source.clone() })?;
                let ids = if chat { tok.encode_chat(text) } else { tok.encode(text) };
                Ok(ids.map_err(engine_llama::Error::from)?)
            }
        })
        .collect()
}

/// The stop and padding ids: generation_config.json's (else config.json's,
/// else the tokenizer's). Padding is masked, so any id of the vocabulary
/// serves where the checkpoint names none.
fn options(loaded: &Loaded, max_new_tokens: usize) -> GenerateOptions {
    let tok = loaded.tokenizer.as_ref();
    let mut eos = loaded.ids.eos_token_ids.clone();
    if eos.is_empty() {
        eos.extend(tok.and_then(Tokenizer::eos_id));
    }
    let vocab = loaded.model.config().vocab_size;
    let pad = loaded
        .ids
        .pad_token_id
        .or_else(|| tok.and_then(Tokenizer::pad_id))
        .or_else(|| eos.first().copied())
        .filter(|&id| (id as usize) < vocab)
        .unwrap_or(0);
    GenerateOptions { max_new_tokens, stop_on_eos: true, eos_token_ids: eos, pad_token_id: pad }
}

/// `tierlm generate` for a Llama-family model.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    refuse_unsupported(args)?;
    let sampling =
        SamplingConfig { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    sampling.validate()?;
    if args.gpu_batch_size == 0 {
        return Err(unsupported("--gpu-batch-size must be at least 1".to_string()));
    }
    let inputs = match &args.input {
        Some(path) => read_inputs(path)?,
        None => args.prompts.iter().cloned().map(Input::Text).collect(),
    };
    let json = args.json || args.input.is_some();
    let policy = super::gpu::generate_policy(args)?;
    let dir = args.offload_dir.clone().unwrap_or_else(std::env::temp_dir);
    let tiers = runtime::Tiers::default();
    let host = std::sync::Arc::clone(tier_api::Device::account(&*tiers.host(tier_api::HostMemKind::Pageable)?));
    let offload = Offload { policy, tiers, dir, host };
    let loaded = load(&args.model, args.dummy, args.seed, Some(&offload))?;
    let cache_disk = if offload.policy.cache_cpu_percent < 100.0 {
        Some((offload.tiers.disk(&offload.dir)?, offload.policy.cache_cpu_percent))
    } else {
        None
    };
    let prompts = tokenize(&loaded, &inputs, args.chat)?;
    let config = loaded.model.config();
    runtime::schedule::validate_prompts(
        config.vocab_size,
        config.max_position_embeddings,
        &prompts,
        args.max_new_tokens,
        0,
    )?;
    engine_llama::device::check_window(&loaded.model, &prompts, args.max_new_tokens)?;
    // Refuse a batch's f32 KV cache that cannot fit.
    let batch = super::generate::block_size(args).min(prompts.len()) as u64;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0).saturating_add(args.max_new_tokens) as u64;
    let per_position = (config.num_hidden_layers as u64)
        .saturating_mul(config.num_key_value_heads as u64)
        .saturating_mul(config.head_dim as u64)
        .saturating_mul(2 * 4);
    check_fits("the f32 KV cache of a batch", per_position.saturating_mul(batch).saturating_mul(longest))?;
    let opts = options(&loaded, args.max_new_tokens);
    let mut sampler = Sampler::new(sampling);
    let out = Outputs {
        prompts: &prompts,
        inputs: &inputs,
        tokenizer: loaded.tokenizer.as_ref(),
        batch_size: super::generate::block_size(args),
        json,
        file: output_file(args)?,
    };
    // The weights in memory, reserved beside what the engine reserves
    // (caches, hidden states, scratch, the streamed layer): the host
    // tier's peak is what the run held.
    let resident: u64 = loaded.model.named_tensors().iter().map(|(_, t)| t.as_bytes().len() as u64).sum();
    let _weights_held = offload.host.reserve(resident, resident).map_err(engine_opt::Error::from)?;
    out.write::<Error>(
        args.max_new_tokens,
        &mut |batch, pb| {
            let placement = CpuPlacement {
                disk: loaded.on_disk.clone(),
                cache_disk: cache_disk.clone(),
                host: Some(std::sync::Arc::clone(&offload.host)),
            };
            let resident = loaded.model.layers();
            if args.stages > 1 {
                let block = super::generate::micro_batches(batch, args.gpu_batch_size);
                let mut stages = runtime::pipeline::resident_stages(resident, args.stages)?;
                for stage in &mut stages {
                    stage.placement.host = Some(std::sync::Arc::clone(&offload.host));
                }
                let out = engine_llama::device::generate_pipelined(
                    &loaded.model,
                    &stages,
                    &block,
                    &opts,
                    Some(&mut sampler),
                    pb,
                )?;
                return Ok(out.tokens);
            }
            let out =
                generate_placed(&loaded.model, resident, placement, &[batch.to_vec()], &opts, Some(&mut sampler), pb)?;
            Ok(out.tokens)
        },
        // Pageable: the host account's peak and the disk tier's staging
        // buffers; disk: the arena's peak (layers and cache).
        &|| runtime::TierPeaks {
            pageable: offload.host.stats().peak_resident
                + offload.tiers.disks().iter().map(|d| d.host_account().stats().peak_resident).sum::<u64>(),
            disk: offload.tiers.disks().iter().map(|d| tier_api::Device::account(&**d).stats().peak_resident).sum(),
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_dispatched_by_its_model_type() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        assert_eq!(family_of(d).unwrap(), Family::Opt, "no config.json: OPT's loader reports it");
        for (model_type, family) in [("opt", Family::Opt), ("llama", Family::Llama), ("qwen3", Family::Llama)] {
            std::fs::write(dir.path().join("config.json"), format!(r#"{{"model_type": "{model_type}"}}"#)).unwrap();
            assert_eq!(family_of(d).unwrap(), family, "{model_type}");
        }
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gemma3"}"#).unwrap();
        let e = family_of(d).unwrap_err().to_string();
        assert!(e.contains("gemma3") && e.contains("opt, llama, mistral, qwen2, qwen3"), "{e}");
        assert_eq!(family_of("llama-3.1-8b").unwrap(), Family::Llama);
        assert_eq!(family_of("opt-125m").unwrap(), Family::Opt);
        let e = family_of("no-such-model").unwrap_err().to_string();
        assert!(e.contains("opt-125m") && e.contains("qwen3-8b"), "{e}");
        assert!(names_llama_family("mistral-7b") && !names_llama_family("opt-1.3b"));
    }
}
