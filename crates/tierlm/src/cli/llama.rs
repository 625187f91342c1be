//! `tierlm generate` for the Llama family (`model_type` `llama`, `mistral`,
//! `qwen2`, `qwen3`): on the runtime's CPU engine, the weights and an f32
//! KV cache in host memory (as OPT's CPU engine), or with `--percent 0 W 0
//! C 0 100` the later layers and a share of each batch's cache on disk; on
//! the GPU engine (`engine_llama::gpu`) when `--percent` places anything on
//! the GPU (or the activations on disk): the weights resident or streamed
//! from host memory or disk, the KV cache where the policy's cache shares
//! say (GPU, host memory, disk, in whole sequences; 4-bit on one tier with
//! `--compress-cache`; in host memory with the CPU's attention with
//! `--cpu-cache-compute`), the activations on one tier (GPU, host memory or
//! disk): `--percent W_GPU W_CPU C_GPU C_CPU A_GPU A_CPU`.
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
use runtime::gpu::cache::{CachePlan, CacheTiers};
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
    // Asked for and without a GPU, the search's own flags go unused (said
    // in a note), as for OPT.
    let search_only = ["--policy auto", "--host-mem", "--calibration"];
    let auto = args.policy.as_deref() == Some("auto");
    refused
        .extend(args.engine_flags_given().into_iter().filter(|f| !(auto && search_only.contains(f))).map(String::from));
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
    tokenize_with(loaded.tokenizer.as_ref(), &loaded.source, inputs, chat)
}

/// [`tokenize`] with a tokenizer (if the source has one).
fn tokenize_with(tokenizer: Option<&Tokenizer>, source: &Path, inputs: &[Input], chat: bool) -> Result<Vec<Vec<u32>>> {
    inputs
        .iter()
        .map(|input| match input {
            Input::Ids(ids) => Ok(ids.clone()),
            Input::Text(text) => {
                let tok = tokenizer.ok_or_else(|| engine_opt::Error::NoTokenizer { dir: source.to_path_buf() })?;
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
    options_for(&loaded.ids, loaded.tokenizer.as_ref(), loaded.model.config().vocab_size, max_new_tokens)
}

/// [`options`] from the ids, the tokenizer and the vocabulary's size.
fn options_for(ids: &GenerationIds, tok: Option<&Tokenizer>, vocab: usize, max_new_tokens: usize) -> GenerateOptions {
    let mut eos = ids.eos_token_ids.clone();
    if eos.is_empty() {
        eos.extend(tok.and_then(Tokenizer::eos_id));
    }
    let pad = ids
        .pad_token_id
        .or_else(|| tok.and_then(Tokenizer::pad_id))
        .or_else(|| eos.first().copied())
        .filter(|&id| (id as usize) < vocab)
        .unwrap_or(0);
    GenerateOptions { max_new_tokens, stop_on_eos: true, eos_token_ids: eos, pad_token_id: pad }
}

/// Whether `policy` is the GPU engine's run: anything on the GPU, or the
/// activations on disk (which the CPU engine does not place).
fn places_on_gpu(policy: &runtime::policy::Policy) -> bool {
    let act_on_disk = policy.disk_percents()[2] > 0.0;
    policy.w_gpu_percent > 0.0 || policy.cache_gpu_percent > 0.0 || policy.act_gpu_percent > 0.0 || act_on_disk
}

/// The cache placement `policy` asks the family's GPU engine for, refused
/// (saying what would run) where the tiered cache cannot run it; with
/// `--cpu-cache-compute` over a cache not all in host memory, a note: the
/// attention stays on the GPU (as for OPT).
fn cache_plan(policy: &runtime::policy::Policy) -> Result<CachePlan> {
    let plan = CachePlan::of_policy(policy);
    plan.validate().map_err(engine_llama::Error::from)?;
    if policy.cpu_cache_compute && !plan.cpu_compute {
        eprintln!("note: --cpu-cache-compute: the cache is not all in host memory, attention runs on the GPU");
    }
    Ok(plan)
}

/// Refuses what the family's GPU engine does not do yet, naming it: it
/// places the weights anywhere (resident, streamed from host memory or
/// disk), 4-bit or not, the KV cache as the runtime's tiered cache does,
/// and the hidden states whole on one tier (GPU, host memory or disk; a
/// split is refused by [`activation_tier`]).
fn refuse_unsupported_on_gpu(args: &GenerateArgs) -> Result<()> {
    let mut refused: Vec<String> = Vec::new();
    // The GPU engine honours every engine flag (the cache's as its plan
    // allows, checked next), and the search its own.
    let honoured = [
        "--gpu-mem",
        "--pin-weight",
        "--policy auto",
        "--host-mem",
        "--calibration",
        "--compress-weight",
        "--compress-cache",
        "--cpu-cache-compute",
        "--attn-sparsity",
    ];
    refused.extend(args.engine_flags_given().into_iter().filter(|f| !honoured.contains(f)).map(String::from));
    if args.stages > 1 {
        refused.push("--stages above 1".into());
    }
    if refused.is_empty() {
        return Ok(());
    }
    Err(unsupported(format!(
        "{} not supported for the Llama family on the GPU yet: its GPU engine places the weights, 4-bit with \
         --compress-weight or not, the KV cache and the activations (on one tier) anywhere (--percent W_GPU W_CPU \
         C_GPU C_CPU A_GPU A_CPU; --compress-cache, --cpu-cache-compute; the rest on disk in --offload-dir); the \
         CPU engine keeps everything off the GPU (--percent 0 W_CPU 0 C_CPU 0 100)",
        refused.join(", ") + if refused.len() == 1 { " is" } else { " are" }
    )))
}

/// `tierlm generate` for a Llama-family model on the GPU engine.
fn generate_gpu(args: &GenerateArgs, policy: &runtime::policy::Policy, inputs: Vec<Input>) -> Result<()> {
    refuse_unsupported_on_gpu(args)?;
    let plan = cache_plan(policy)?;
    check_activation_shares(policy)?;
    let offload_dir = args.offload_dir.clone().unwrap_or_else(std::env::temp_dir);
    // The longest input bounds the prompt: its ids, or its text's bytes.
    let longest = inputs
        .iter()
        .map(|i| match i {
            Input::Ids(ids) => ids.len(),
            Input::Text(t) => t.len().saturating_add(1),
        })
        .max()
        .unwrap_or(1);
    let gen_policy =
        runtime::policy::Policy { gpu_batch_size: args.gpu_batch_size.min(inputs.len().max(1)), ..policy.clone() };
    let work = runtime::plan::Workload { prompt_len: longest, gen_len: args.max_new_tokens.max(1) };
    check_gpu_placement(&args.model, &gen_policy, work, args.gpu_mem, &offload_dir)?;
    if let Some(reason) = ops::gpu::unavailable_reason() {
        return Err(unsupported(format!(
            "--percent {} places the model on the GPU, and there is none ({reason}); without a GPU, run on the CPU \
             engine: --percent 0 100 0 100 0 100",
            args.percent.as_deref().unwrap_or(&[]).iter().map(f64::to_string).collect::<Vec<_>>().join(" ")
        )));
    }
    let sampling =
        SamplingConfig { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    sampling.validate()?;
    if args.gpu_batch_size == 0 {
        return Err(unsupported("--gpu-batch-size must be at least 1".to_string()));
    }
    let json = args.json || args.input.is_some();
    let opened = open(&args.model, args.dummy)?;
    engine_llama::gpu::check_supported(&opened.config)?;
    let gpu = ops::gpu::Gpu::new(0).map_err(engine_llama::Error::from)?;
    gpu.set_budget(args.gpu_mem);
    let (model, run_tiers) = place_on_gpu(gpu, &opened, policy, plan, &offload_dir, args.seed)?;
    let prompts = tokenize_with(opened.tokenizer.as_ref(), &opened.source, &inputs, args.chat)?;
    let config = model.config();
    check_prompts(config, &prompts, args.max_new_tokens)?;
    let opts = options_for(&opened.ids, opened.tokenizer.as_ref(), config.vocab_size, args.max_new_tokens);
    let greedy = sampling.is_greedy();
    let mut sampler = Sampler::new(sampling);
    let out = Outputs {
        prompts: &prompts,
        inputs: &inputs,
        tokenizer: opened.tokenizer.as_ref(),
        batch_size: super::generate::block_size(args),
        json,
        file: output_file(args)?,
    };
    out.write::<Error>(
        args.max_new_tokens,
        &mut |batch, pb| {
            let s = if greedy { None } else { Some(&mut sampler) };
            Ok(model.generate(&[batch.to_vec()], &opts, s, pb)?.tokens)
        },
        &|| gpu_peaks(&model, &run_tiers),
    )
}

/// The placement check of the family's GPU engine, before anything is
/// allocated: `policy`'s bytes per tier (the plan the search uses, from
/// the family's spec) against this GPU (or `--gpu-mem`, which also plans
/// for a GPU that is not here), host memory and the offload directory's
/// free space; a refusal says what each tier lacks, FlexGen's advice, and
/// the nearest policy that fits.
fn check_gpu_placement(
    model: &str,
    policy: &runtime::policy::Policy,
    work: runtime::plan::Workload,
    gpu_mem: Option<u64>,
    offload_dir: &Path,
) -> Result<()> {
    let here = ops::gpu::unavailable_reason().is_none();
    if !here && gpu_mem.is_none() {
        // The missing GPU is said next, plainly.
        return Ok(());
    }
    let planned = super::plan::planned_model(model)?;
    let cap = super::plan::budgets(gpu_mem, None, offload_dir)?;
    let can_pin =
        policy.pin_weight && (!here || super::plan::host_kind(None).map(|k| k.is_page_locked()).unwrap_or(false));
    let machine = runtime::plan::Machine { gpu_compute: true, can_pin };
    // The family's GPU engine has no compression yet: not advised.
    match runtime::plan::check_with(&planned.spec, policy, work, machine, &cap, false) {
        Ok(_) => Ok(()),
        Err(runtime::Error::PolicyDoesNotFit(msg)) => {
            let fixed =
                [policy.cache_gpu_percent, policy.cache_cpu_percent, policy.act_gpu_percent, policy.act_cpu_percent];
            let nearest = super::plan::nearest_fit(&planned.spec, policy, work, cap, offload_dir, Some(fixed));
            let msg = match nearest {
                Some(n) => format!("{msg}\n{n}"),
                None => msg,
            };
            Err(engine_llama::Error::from(runtime::Error::PolicyDoesNotFit(msg)).into())
        }
        Err(e) => Err(engine_llama::Error::from(e).into()),
    }
}

/// A Llama-family directory or preset opened for the GPU engine: its
/// configuration, its checkpoint checked against the spec, its ids and
/// tokenizer; nothing read into memory yet.
/// Prompts the model can take: ids inside its vocabulary, prompt plus
/// `new_tokens` within its positions and (Mistral) its sliding window.
fn check_prompts(config: &LlamaConfig, prompts: &[Vec<u32>], new_tokens: usize) -> Result<()> {
    runtime::schedule::validate_prompts(config.vocab_size, config.max_position_embeddings, prompts, new_tokens, 0)?;
    Ok(engine_llama::device::check_window_config(config, prompts, new_tokens)?)
}

/// The activations' shares the family's GPU engine runs: all on one tier
/// (GPU, host memory or disk); a split is refused, saying what runs.
fn check_activation_shares(policy: &runtime::policy::Policy) -> Result<()> {
    let (gpu, cpu) = (policy.act_gpu_percent, policy.act_cpu_percent);
    if gpu >= 100.0 || cpu >= 100.0 || policy.disk_percents()[2] >= 100.0 {
        return Ok(());
    }
    Err(unsupported(format!(
        "the activations split over tiers (--percent's activation shares {gpu} {cpu}) are not supported for the \
         Llama family: its GPU engine keeps each batch's hidden states whole on one tier: 100 0 (GPU), 0 100 (host \
         memory) or 0 0 (disk, in --offload-dir)"
    )))
}

/// Where `policy` puts the hidden states between layers: on the GPU
/// (`None`), or on the run's pageable host memory or disk in
/// `offload_dir`.
fn activation_tier(
    policy: &runtime::policy::Policy,
    run_tiers: &runtime::Tiers,
    offload_dir: &Path,
) -> Result<Option<runtime::gpu::activations::ActivationTier>> {
    check_activation_shares(policy)?;
    Ok(runtime::gpu::activations::ActivationTier::of_policy(run_tiers, policy, offload_dir)
        .map_err(engine_llama::Error::from)?)
}

/// The family's GPU engine on `gpu`, placed as `policy` says: the
/// split's first layers resident and the rest streamed from the run's host
/// and disk tiers (`offload_dir`), `--sep-layer`, 4-bit weights with
/// `--compress-weight`, each batch's KV cache placed by `plan` (on the
/// GPU, or by the runtime's tiered cache over the run's tiers: pageable
/// host memory, the disk in `offload_dir`), and its hidden states on the
/// GPU or, between layers, in the run's pageable host memory or on disk.
/// Returns the run's tiers too, whose peaks the reports read.
fn place_on_gpu(
    gpu: ops::gpu::Gpu,
    opened: &Opened,
    policy: &runtime::policy::Policy,
    plan: CachePlan,
    offload_dir: &Path,
    seed: u64,
) -> Result<(engine_llama::gpu::AnyLlamaGpu, runtime::Tiers)> {
    use runtime::gpu::stream::{split_layers, OffloadTiers};
    let split = split_layers(opened.config.num_hidden_layers, policy.w_gpu_percent, policy.w_cpu_percent);
    let run_tiers = runtime::Tiers::default();
    let tiers = if split.streams() {
        Some(OffloadTiers::for_split(&run_tiers, &split, policy.pin_weight, offload_dir)?)
    } else {
        None
    };
    let ck = opened.checkpoint.as_ref();
    let mut model = engine_llama::gpu::AnyLlamaGpu::new(
        gpu,
        opened.config.clone(),
        split,
        tiers,
        ck,
        seed,
        policy.compress_weight,
    )?;
    model.set_sep_layer(policy.sep_layer);
    if plan.through_slots() {
        let tiers = CacheTiers::for_plan(&run_tiers, &plan, offload_dir).map_err(engine_llama::Error::from)?;
        model.place_cache(plan, tiers)?;
    }
    model.place_activations(activation_tier(policy, &run_tiers, offload_dir)?);
    Ok((model, run_tiers))
}

struct Opened {
    config: LlamaConfig,
    checkpoint: Option<checkpoint::Checkpoint>,
    ids: GenerationIds,
    tokenizer: Option<Tokenizer>,
    source: PathBuf,
}

fn open(model: &str, dummy: bool) -> Result<Opened> {
    let dir = Path::new(model);
    if !dir.is_dir() && !dummy {
        return Err(unsupported(format!(
            "{model} is a preset: give a checkpoint directory, or --dummy for random weights"
        )));
    }
    let (config, dir) = if dir.is_dir() {
        (LlamaConfig::from_file(&dir.join("config.json"))?, Some(dir))
    } else {
        (LlamaConfig::preset(model)?, None)
    };
    let (config, checkpoint) = match (dir, dummy) {
        (Some(d), false) => {
            let (c, ck) = engine_llama::model::open_checked(d, config)?;
            (c, Some(ck))
        }
        _ => (config, None),
    };
    let ids = match dir {
        Some(d) => GenerationIds::from_dir(d, &config)?,
        None => GenerationIds::of_config(&config),
    };
    let tokenizer = match dir {
        Some(d) => Tokenizer::from_dir(d)?,
        None => None,
    };
    let source = dir.map_or_else(|| PathBuf::from(model), Path::to_path_buf);
    Ok(Opened { config, checkpoint, ids, tokenizer, source })
}

/// `tierlm generate` for a Llama-family model.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    let mut policy = super::gpu::generate_policy(args)?;
    let inputs = match &args.input {
        Some(path) => read_inputs(path)?,
        None => args.prompts.iter().cloned().map(Input::Text).collect(),
    };
    if args.policy.as_deref() == Some("auto") {
        // The search places the weights and the cache (the activations'
        // shares as its pins for the family say).
        match super::auto::for_generate(args, &inputs)? {
            Some(choice) => policy = choice.policy,
            None => super::auto::no_gpu_note(super::auto::Mode::Auto { asked: true }),
        }
    }
    if places_on_gpu(&policy) {
        return generate_gpu(args, &policy, inputs);
    }
    refuse_unsupported(args)?;
    let sampling =
        SamplingConfig { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    sampling.validate()?;
    if args.gpu_batch_size == 0 {
        return Err(unsupported("--gpu-batch-size must be at least 1".to_string()));
    }
    let json = args.json || args.input.is_some();
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
    check_prompts(config, &prompts, args.max_new_tokens)?;
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

/// The most each tier held in a GPU run: the GPU (the engine's buffers)
/// and its staging ring, and every host device and disk arena of the run
/// (the streamed weights' and the cache's, each counted once).
fn gpu_peaks(model: &engine_llama::gpu::AnyLlamaGpu, run_tiers: &runtime::Tiers) -> runtime::TierPeaks {
    run_tiers.peaks(Some(model.gpu().device()))
}

/// What `tierlm bench` prints for the Llama family (`--json`: one object).
#[derive(Debug, serde::Serialize)]
pub struct LlamaBenchReport {
    pub model: String,
    pub engine: &'static str,
    pub dtype: &'static str,
    pub device: String,
    pub prompts: usize,
    pub gpu_batch_size: usize,
    pub num_gpu_batches: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub percent: [f64; 6],
    pub load_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub total_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: Option<f64>,
    pub total_tokens_per_s: f64,
    /// Bytes of weights resident on the GPU and streamed per step.
    pub gpu_weight_bytes: u64,
    pub streamed_weight_bytes: u64,
    /// The KV caches of the block on the GPU (with a tiered cache, its GPU
    /// share, slots and 4-bit scratch).
    pub kv_cache_bytes: u64,
    /// Hidden states and scratch on the GPU at their most: each batch's
    /// residual stream, or with the activations in host memory or on disk
    /// the block's two GPU buffers they are loaded into, plus the
    /// workspace (products' outputs, scores, logits).
    pub activation_bytes: u64,
    /// With the cache placed off the GPU, 4-bit or attended on the CPU: the
    /// tiered cache's figures.
    pub cache: Option<LlamaCacheReport>,
    pub peak_per_tier: runtime::TierPeaks,
    /// The flags of the policy run (as `--policy auto` chose it, or given).
    pub policy: String,
    /// With `--policy auto`: the cost model's prediction for this run.
    pub predicted_decode_tokens_per_s: Option<f64>,
    pub predicted_total_tokens_per_s: Option<f64>,
    /// The GPU's copy and product rates, measured in this run before the
    /// model was loaded.
    pub roofline: super::gpu::Roofline,
    /// What the run must move and compute over those rates.
    pub limits: super::gpu::Limits,
    /// With streamed weights: the streamer's copy rates measured in this
    /// run, and the decode limit they set.
    pub stream: Option<StreamLimit>,
}

/// The tiered KV cache of a Llama-family bench run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LlamaCacheReport {
    /// Each batch's sequences on the GPU, in host memory and on disk, percent.
    pub percent: [f64; 3],
    pub cpu_compute: bool,
    pub attn_sparsity: f64,
    pub compress: bool,
    /// The two GPU slots a layer's cache passes through.
    pub slot_bytes: u64,
    /// Bytes loaded into and stored from the slots during the run.
    pub bytes_moved: u64,
}

/// The weight-streaming limit of a run whose layers live off the GPU.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamLimit {
    /// Bytes of the streamed layers' host and disk rows, crossing PCIe (and
    /// the disk's) once a step.
    pub host_bytes_per_step: u64,
    pub disk_bytes_per_step: u64,
    /// The streamer's measured rates into a GPU slot.
    pub host_copy_bytes_per_s: Option<f64>,
    pub disk_copy_bytes_per_s: Option<f64>,
    /// "pcie" or "disk": the link that bounds a step.
    pub bounding_link: String,
    /// prompts / the bounding link's time per step.
    pub decode_tokens_per_s_stream_limit: Option<f64>,
}

/// What a Llama-family run must move and compute (FlexGen's limits, as
/// [`super::gpu::limits`] gives OPT's), over `roof`: a decode step reads
/// every weight but the embedding table (a row a sequence; with tied
/// embeddings the table is the head and is read) and the cache up to its
/// position; the prefill computes the products, the attention over every
/// key (as the engine computes it) and the last positions' logits.
pub fn llama_limits(
    c: &LlamaConfig,
    prompts: usize,
    prompt_len: usize,
    gen_len: usize,
    roof: &super::gpu::Roofline,
) -> Result<super::gpu::Limits> {
    let spec = engine_llama::spec::model_spec(c)?;
    let elem = engine_llama::gpu::compute_dtype(c).size() as u64;
    let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
    let table = if c.tie_word_embeddings { 0 } else { v.saturating_mul(h).saturating_mul(elem) };
    // Weights as the GPU holds them (f32 checkpoints run in bf16).
    let params = spec.weight_bytes(false)? / spec.widths.dtype.size().max(1) as u64;
    let weight_bytes = params.saturating_mul(elem).saturating_sub(table);
    let token_bytes = 2 * c.num_key_value_heads as u64 * c.head_dim as u64 * elem * c.num_hidden_layers as u64;
    let cache_bytes = |pos: usize| (prompts as u64).saturating_mul(pos as u64).saturating_mul(token_bytes);
    let (n, s) = (prompts as f64, prompt_len as f64);
    let (hf, i) = (h as f64, c.intermediate_size as f64);
    let (q_w, kv_w) = ((c.num_attention_heads * c.head_dim) as f64, (c.num_key_value_heads * c.head_dim) as f64);
    let layers = c.num_hidden_layers as f64;
    let mut flop = 2.0 * n * s * layers * (2.0 * hf * q_w + 2.0 * hf * kv_w + 3.0 * hf * i);
    flop += layers * 4.0 * n * s * s * q_w;
    flop += 2.0 * n * v as f64 * hf;
    Ok(super::gpu::Limits::of(weight_bytes, cache_bytes, flop, (prompts, prompt_len, gen_len), roof))
}

/// `tierlm bench` for a Llama-family model: its GPU engine (weights, KV
/// cache and activations where `--percent` says), FlexGen's throughput
/// definitions, one untimed warm-up generation first.
pub fn bench(
    args: &super::bench::BenchArgs,
    policy: &runtime::policy::Policy,
    chosen: Option<&runtime::search::Choice>,
) -> Result<()> {
    use engine_llama::gpu::compute_dtype;
    use rand::{Rng, SeedableRng};
    let policy = policy.clone();
    if !places_on_gpu(&policy) {
        let why = match ops::gpu::unavailable_reason() {
            Some(reason) => format!("there is no GPU here ({reason})"),
            None => "give --percent W_GPU W_CPU 100 0 100 0 (e.g. 100 0 100 0 100 0 for everything on the GPU), or \
                     no --percent for the policy search"
                .to_string(),
        };
        return Err(unsupported(format!(
            "{}: bench runs the Llama family on its GPU engine: {why}; `tierlm generate --model {} --dummy --input \
             FILE` runs it on the CPU engine",
            args.model, args.model
        )));
    }
    let plan = cache_plan(&policy)?;
    check_activation_shares(&policy)?;
    if args.prompt_len == 0 || args.gen_len == 0 {
        return Err(unsupported("--prompt-len and --gen-len must be at least 1".into()));
    }
    // What the model and the flags say first, then the machine.
    let opened = open(&args.model, args.dummy)?;
    engine_llama::gpu::check_supported(&opened.config)?;
    let config = opened.config.clone();
    if args.prompt_len.checked_add(args.gen_len).is_none_or(|n| n > config.max_position_embeddings) {
        return Err(unsupported(format!(
            "--prompt-len {} + --gen-len {} exceed the model's {} positions",
            args.prompt_len, args.gen_len, config.max_position_embeddings
        )));
    }
    let batches = policy.num_gpu_batches;
    let batch = policy.gpu_batch_size;
    super::bench::check_block(batch, batches).map_err(Error::Opt)?;
    engine_llama::device::check_window_len(&config, args.prompt_len, args.gen_len)?;
    let offload_dir = args.offload_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = runtime::plan::Workload { prompt_len: args.prompt_len, gen_len: args.gen_len };
    check_gpu_placement(&args.model, &policy, work, args.gpu_mem, &offload_dir)?;
    if let Some(reason) = ops::gpu::unavailable_reason() {
        return Err(unsupported(format!("bench runs the Llama family on the GPU, and there is none ({reason})")));
    }
    let gpu = ops::gpu::Gpu::new(0).map_err(engine_llama::Error::from)?;
    let device = gpu.device().info().to_string();
    // The GPU's rates, before the model takes its memory.
    let roofline = super::gpu::measure_roofline(&gpu)?;
    gpu.set_budget(args.gpu_mem);
    let t = std::time::Instant::now();
    let (mut model, run_tiers) = place_on_gpu(gpu, &opened, &policy, plan, &offload_dir, args.seed)?;
    let load_s = t.elapsed().as_secs_f64();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
    let vocab = config.vocab_size as u32;
    let block: Vec<Vec<Vec<u32>>> = (0..batches)
        .map(|_| (0..batch).map(|_| (0..args.prompt_len).map(|_| rng.random_range(0..vocab)).collect()).collect())
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: args.gen_len,
        stop_on_eos: false,
        eos_token_ids: Vec::new(),
        pad_token_id: 0,
    };
    let hidden = indicatif::ProgressBar::hidden();
    // Warm-up: kernels compiled, products planned, the streamer's slots
    // touched; two tokens are enough.
    let warm = GenerateOptions { max_new_tokens: args.gen_len.min(2), ..opts.clone() };
    model.generate(&block, &warm, None, &hidden)?;
    let out = model.generate(&block, &opts, None, &hidden)?;
    let prompts = batch * batches;
    let (prefill, decode) = (out.prefill_time.as_secs_f64(), out.decode_time.as_secs_f64());
    let (prefill_tput, decode_tput, total_tput) =
        super::bench::throughput(prompts, args.prompt_len, args.gen_len, &out);
    let streamed = model.offload().map_or(0, |s| s.bytes_streamed());
    let peaks = gpu_peaks(&model, &run_tiers);
    let limits = llama_limits(&config, prompts, args.prompt_len, args.gen_len, &roofline)?;
    let stream = match model.offload() {
        Some(s) => {
            let rates = s.copy_rates()?;
            let (host_bytes, disk_bytes) = s.home_bytes();
            // Every streamed byte crosses PCIe (disk rows through pinned
            // staging); the disk rows also cross the disk.
            let pcie_s = rates.host.or(rates.layer).map_or(0.0, |r| (host_bytes + disk_bytes) as f64 / r);
            let disk_s = rates.disk.map_or(0.0, |r| disk_bytes as f64 / r);
            let (step_s, link) = if disk_s > pcie_s { (disk_s, "disk") } else { (pcie_s, "pcie") };
            Some(StreamLimit {
                host_bytes_per_step: host_bytes,
                disk_bytes_per_step: disk_bytes,
                host_copy_bytes_per_s: rates.host,
                disk_copy_bytes_per_s: rates.disk,
                bounding_link: link.into(),
                decode_tokens_per_s_stream_limit: (args.gen_len > 1 && step_s > 0.0).then(|| prompts as f64 / step_s),
            })
        }
        None => None,
    };
    let report = LlamaBenchReport {
        model: args.model.clone(),
        engine: "gpu",
        dtype: if compute_dtype(&config) == tier_api::DType::F16 { "f16" } else { "bf16" },
        device,
        prompts,
        gpu_batch_size: batch,
        num_gpu_batches: batches,
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
        percent: [
            policy.w_gpu_percent,
            policy.w_cpu_percent,
            policy.cache_gpu_percent,
            policy.cache_cpu_percent,
            policy.act_gpu_percent,
            policy.act_cpu_percent,
        ],
        load_s,
        prefill_s: prefill,
        decode_s: decode,
        total_s: prefill + decode,
        prefill_tokens_per_s: prefill_tput,
        decode_tokens_per_s: decode_tput,
        total_tokens_per_s: total_tput,
        gpu_weight_bytes: model.weight_bytes(),
        streamed_weight_bytes: streamed,
        kv_cache_bytes: out.cache_bytes,
        activation_bytes: out.activation_bytes,
        cache: model.cache_stats().map(|c| LlamaCacheReport {
            percent: [c.plan.gpu_percent, c.plan.cpu_percent, c.plan.disk_percent()],
            cpu_compute: c.plan.cpu_compute,
            attn_sparsity: c.plan.attn_sparsity,
            compress: c.plan.compress,
            slot_bytes: c.slot_bytes,
            bytes_moved: c.bytes_moved,
        }),
        peak_per_tier: peaks,
        policy: runtime::search::policy_flags(&policy),
        predicted_decode_tokens_per_s: chosen.and_then(|c| c.prediction.decode_tokens_per_s),
        predicted_total_tokens_per_s: chosen.map(|c| c.prediction.total_tokens_per_s),
        roofline,
        limits,
        stream,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).map_err(|e| unsupported(format!("the report as JSON: {e}")))?);
    } else {
        println!(
            "{} ({}, {}) on {}: {} prompts of {} tokens, {} new; load {:.1} s\n  prefill {:.1} tok/s, decode {}, \
             total {:.1} tok/s",
            report.model,
            report.dtype,
            report.engine,
            report.device,
            report.prompts,
            report.prompt_len,
            report.gen_len,
            report.load_s,
            report.prefill_tokens_per_s,
            report.decode_tokens_per_s.map_or("-".into(), |d| format!("{d:.1} tok/s")),
            report.total_tokens_per_s
        );
        let pct = |a: f64, b: f64| 100.0 * a / b;
        match (report.decode_tokens_per_s, &report.stream, report.limits.decode_tokens_per_s_limit) {
            (Some(d), Some(StreamLimit { decode_tokens_per_s_stream_limit: Some(sl), bounding_link, .. }), _) => {
                println!(
                    "  decode at {:.0}% of the weight-streaming limit ({sl:.1} tok/s, bound by {bounding_link})",
                    pct(d, *sl)
                )
            }
            (Some(d), _, Some(l)) => {
                println!("  decode at {:.0}% of the GPU memory limit ({l:.1} tok/s)", pct(d, l))
            }
            _ => {}
        }
        println!(
            "  prefill at {:.0}% of the product-rate limit ({:.2} s)",
            pct(report.limits.prefill_min_s, prefill.max(f64::MIN_POSITIVE)),
            report.limits.prefill_min_s
        );
        println!("  policy: {}", report.policy);
        if let Some(c) = chosen {
            println!("  predicted: {}", super::plan::prediction_line(&c.prediction));
        }
    }
    // TIERLM_GPU_PROFILE=1: one more run with every part timed by events
    // (on stderr, so that --json's stdout stays one object).
    if std::env::var_os("TIERLM_GPU_PROFILE").is_some_and(|v| v != "0") {
        model.set_profile(true);
        model.generate(&block, &opts, None, &hidden)?;
        let parts = model.take_profile()?;
        model.set_profile(false);
        let mut text = String::from("profile (a separate run, events after every part):\n");
        for ((phase, part), ms) in &parts {
            text.push_str(&format!("  {phase:>8} {part:<18} {ms:>10.2} ms\n"));
        }
        eprint!("{text}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_count_what_a_step_reads_and_the_prefill_computes() {
        let c = LlamaConfig::preset("llama-3.1-8b").unwrap();
        let roof = super::super::gpu::Roofline { copy_bytes_per_s: 3.0e12, gemm_flop_per_s: 7.5e14 };
        let l = llama_limits(&c, 64, 512, 32, &roof).unwrap();
        // The weights the H100 held for this preset (bench, 2026-12-07),
        // less the embedding table (128,256 x 4,096 bf16).
        assert_eq!(l.decode_weight_bytes, 16_060_522_496 - 128_256 * 4096 * 2);
        // 32 layers x 8 kv heads x 128 x (k, v) x 2 bytes a position.
        assert_eq!(l.decode_cache_bytes_first, 64 * 513 * 131_072);
        assert_eq!(l.decode_cache_bytes_last, 64 * 543 * 131_072);
        let bytes: f64 = (513..=543).map(|p| (l.decode_weight_bytes + 64 * p * 131_072) as f64).sum();
        assert!((l.decode_min_s - bytes / 3.0e12).abs() < 1e-12);
        assert!((l.decode_tokens_per_s_limit.unwrap() - 64.0 * 31.0 / l.decode_min_s).abs() < 1e-6);
        // 2 x tokens x the layers' 6.98e9 product weights, + attention + logits.
        let products = 2.0 * 32768.0 * 32.0 * (2.0 * 4096.0 * 4096.0 + 2.0 * 4096.0 * 1024.0 + 3.0 * 4096.0 * 14336.0);
        let attention = 32.0 * 4.0 * 64.0 * 512.0 * 512.0 * 4096.0;
        let logits = 2.0 * 64.0 * 128_256.0 * 4096.0;
        assert!((l.prefill_flop - (products + attention + logits)).abs() < 1.0);
        // A single new token has no decode step.
        assert_eq!(llama_limits(&c, 64, 512, 1, &roof).unwrap().decode_tokens_per_s_limit, None);
    }

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
