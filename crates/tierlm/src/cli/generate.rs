//! `tierlm generate`: text or token continuations from a checkpoint, on the
//! CPU engine (or OPT's GPU engine). The checkpoint's config.json picks the
//! family: `model_type` `opt` runs here, the Llama family in
//! [`super::llama`]; what both share (inputs, `--output` and `--resume`,
//! what is printed) is here.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use engine_opt::generation::{generate_with, validate_prompts, CpuPlacement, GenerateOptions};
use engine_opt::loading::{load_model_with, LoadedModel};
use engine_opt::progress;
use engine_opt::sampling::{Sampler, SamplingConfig};
use engine_opt::tokenizer::OptTokenizer;
use engine_opt::{Error, Result};
use indicatif::ProgressBar;
use runtime::tokenizer::Tokenizer;

/// Arguments of `tierlm generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer) of an OPT
    /// or Llama-family model (model_type opt, llama, mistral, qwen2,
    /// qwen3); with --dummy also a preset name such as opt-125m or
    /// llama-3.1-8b
    #[arg(long)]
    pub model: String,
    /// Use seeded random weights instead of the checkpoint's
    #[arg(long)]
    pub dummy: bool,
    /// A prompt (repeat for a batch)
    #[arg(long = "prompt", value_name = "TEXT", required_unless_present = "input")]
    pub prompts: Vec<String>,
    /// A JSONL file, one {"prompt": "..."} or {"input_ids": [...]} a line;
    /// input_ids are used as given (OPT's leading 2 included)
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "prompts")]
    pub input: Option<PathBuf>,
    /// Print JSONL (implied by --input): one line per input, in input order
    #[arg(long)]
    pub json: bool,
    /// Wrap each text prompt as one user message in the checkpoint's chat
    /// template (tokenizer_config.json's chat_template or
    /// chat_template.jinja), for instruct models; input_ids are used as given
    #[arg(long)]
    pub chat: bool,
    /// Append each result to this JSONL file instead of printing it, written
    /// and synced a batch at a time, each line with its input's line number;
    /// an existing non-empty file is refused unless --resume is given
    #[arg(long, value_name = "FILE.jsonl", requires = "input")]
    pub output: Option<PathBuf>,
    /// Continue an interrupted --output run: skip the inputs already in the
    /// file (after checking it holds this input's results) and append the rest
    #[arg(long, requires = "output")]
    pub resume: bool,
    /// New tokens per sequence at most (fewer if it ends with an
    /// end-of-sequence token: OPT's </s>, generation_config.json's eos ids)
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 0 decodes greedily; above 0, samples at this temperature
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the k most likely tokens only (0: all)
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample among the most likely tokens holding this much probability
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler (and of --dummy weights)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences run together in one batch
    #[arg(long, default_value_t = 8)]
    pub gpu_batch_size: usize,
    /// Split the model's layers into this many pipeline stages, each a CPU
    /// engine on a thread of its own holding its layers and their cache,
    /// STAGES batches of --gpu-batch-size flowing through them at once: a
    /// preview of the multi-GPU pipeline, with the tokens of one engine
    /// (every layer and the cache in host memory; a sampler draws for a
    /// block's batches step by step)
    #[arg(long, default_value_t = 1, value_name = "STAGES")]
    pub stages: usize,
    /// Weights GPU% CPU%, cache GPU% CPU%, activations GPU% CPU% (disk gets
    /// the rest of each pair); the default, everything in host memory on the
    /// CPU. Anything on the GPU or on disk runs on the GPU engine where
    /// there is a GPU; without one, weights may go partly to disk
    #[arg(
        long,
        num_args = 6,
        allow_negative_numbers = true,
        value_names = ["W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"]
    )]
    pub percent: Option<Vec<f64>>,
    /// Directory for weights and cache placed on disk (default: the
    /// system's temporary directory); nothing is left in it afterwards
    #[arg(long)]
    pub offload_dir: Option<PathBuf>,
    /// Pin host weights in page-locked memory (GPU engine; default true)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub pin_weight: Option<bool>,
    /// 4-bit weights (GPU engine)
    #[arg(long)]
    pub compress_weight: bool,
    /// 4-bit KV cache, off the GPU on one tier (GPU engine)
    #[arg(long)]
    pub compress_cache: bool,
    /// Decode attention on the CPU over a cache in host memory (GPU engine,
    /// cache shares 0 100)
    #[arg(long)]
    pub cpu_cache_compute: bool,
    /// Keep this fraction of the attention weights when decoding
    /// (`--cpu-cache-compute`; 1 = dense)
    #[arg(long, default_value_t = 1.0)]
    pub attn_sparsity: f64,
    /// GPU memory tierlm may use (e.g. 16G), to act as a smaller card
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::tiers::parse_size)]
    pub gpu_mem: Option<u64>,
    /// How the placement is chosen: auto (the cost model's search, for the
    /// GPU engine; the policy flags given pin their choice; see tierlm plan)
    /// or manual (the flags as given, everything in host memory on the CPU
    /// without --percent) [default: manual with --percent, else auto]
    #[arg(long, value_parser = ["manual", "auto"])]
    pub policy: Option<String>,
    /// With --policy auto: what to maximise, decode or total throughput
    #[arg(long, default_value = "total", value_parser = crate::cli::plan::parse_objective)]
    pub objective: runtime::search::Objective,
    /// With --policy auto: compression the search may use (none, weight,
    /// cache, both, auto); it changes the output
    #[arg(long, default_value = "none", value_parser = crate::cli::plan::parse_compress)]
    pub compress: runtime::search::CompressMode,
    /// With --policy auto: host memory to plan for (default: what is available)
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::tiers::parse_size)]
    pub host_mem: Option<u64>,
    /// With --policy auto: fixed rates instead of this machine's (also TIERLM_CALIBRATION)
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
}

/// `--policy auto`: the flags of the chosen policy written into `args`, so
/// the run goes on as if the user had given them.
fn apply_auto(args: &mut GenerateArgs) -> Result<()> {
    let mode = super::auto::mode(args.policy.as_deref(), args.percent.is_some());
    super::auto::check_auto_only(
        mode,
        &[(args.host_mem.is_some(), "--host-mem"), (args.calibration.is_some(), "--calibration")],
    )?;
    if mode == super::auto::Mode::Manual {
        return Ok(());
    }
    let inputs = match &args.input {
        Some(path) => read_inputs(path)?,
        None => args.prompts.iter().cloned().map(Input::Text).collect(),
    };
    match super::auto::for_generate(args, &inputs)? {
        Some(c) => {
            let p = &c.policy;
            args.percent = Some(p.percent().to_vec());
            args.pin_weight = Some(p.pin_weight);
            args.compress_weight = p.compress_weight;
            args.compress_cache = p.compress_cache;
            args.cpu_cache_compute = p.cpu_cache_compute;
        }
        None => super::auto::no_gpu_note(mode),
    }
    Ok(())
}

/// One input: text to tokenize, or token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Deserialize)]
struct InputLine {
    prompt: Option<String>,
    input_ids: Option<Vec<u32>>,
}

/// Reads a JSONL input file: one object per line with `prompt` or
/// `input_ids`; blank lines are skipped. Errors name the line.
pub fn read_inputs(path: &Path) -> Result<Vec<Input>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut inputs = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::InputLine { path: path.to_path_buf(), line: i + 1, reason };
        if line.trim().is_empty() {
            continue;
        }
        let parsed: InputLine = serde_json::from_str(&line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        inputs.push(match (parsed.prompt, parsed.input_ids) {
            (Some(text), None) => Input::Text(text),
            (None, Some(ids)) if ids.is_empty() => return Err(bad("input_ids is empty".to_string())),
            (None, Some(ids)) => Input::Ids(ids),
            (Some(_), Some(_)) => return Err(bad("give either \"prompt\" or \"input_ids\", not both".to_string())),
            (None, None) => return Err(bad("expected an object with \"prompt\" or \"input_ids\"".to_string())),
        });
    }
    if inputs.is_empty() {
        return Err(Error::InvalidArgument(format!("{}: no inputs", path.display())));
    }
    Ok(inputs)
}

/// One output line of `--json` / `--input`.
#[derive(Serialize)]
struct OutputLine<'a> {
    /// The input's line number in `--input` (1-based), with `--output`.
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    /// A hash of that input line's text, with `--output`: `--resume`
    /// checks it to refuse a file written for another input.
    #[serde(skip_serializing_if = "Option::is_none")]
    input_hash: Option<String>,
    index: usize,
    output_ids: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

fn tokenize(loaded: &LoadedModel, inputs: &[Input]) -> Result<Vec<Vec<u32>>> {
    inputs
        .iter()
        .map(|input| match input {
            Input::Ids(ids) => Ok(ids.clone()),
            Input::Text(text) => match &loaded.tokenizer {
                Some(tok) => tok.encode(text),
                None => Err(Error::NoTokenizer {
                    dir: loaded.dir.clone().unwrap_or_else(|| PathBuf::from(&loaded.description)),
                }),
            },
        })
        .collect()
}

/// The smallest sampling temperature above 0: logits up to about 1e32
/// stay finite once divided by it.
pub const MIN_TEMPERATURE: f32 = 1e-6;

/// Runs `tierlm generate`: the flags every family shares are checked, then
/// config.json's `model_type` (or the preset's family) picks the engine.
pub fn run(args: GenerateArgs) -> crate::Result<()> {
    check_common(&args)?;
    match super::llama::family_of(&args.model)? {
        super::llama::Family::Opt => Ok(run_opt(args)?),
        super::llama::Family::Llama => super::llama::generate(&args),
    }
}

/// The checks of `args` that do not depend on the family.
fn check_common(args: &GenerateArgs) -> Result<()> {
    if args.gpu_batch_size > crate::cli::bench::MAX_BLOCK {
        return Err(Error::InvalidArgument(format!(
            "--gpu-batch-size {} is above the {} sequences a batch may hold",
            args.gpu_batch_size,
            crate::cli::bench::MAX_BLOCK
        )));
    }
    // Logits divided by a temperature this small overflow f32 to infinity
    // and sampling would pick tokens at random.
    if args.temperature > 0.0 && args.temperature < MIN_TEMPERATURE {
        return Err(Error::InvalidArgument(format!(
            "--temperature {} is too small to sample with (at least {MIN_TEMPERATURE}); give 0 to decode greedily",
            args.temperature
        )));
    }
    engine_opt::cpu_offload::check_offload_dir_arg(args.offload_dir.as_deref())?;
    check_stages(args)?;
    // Refuse an --output that would be overwritten, or does not match, before loading.
    output_file(args)?;
    Ok(())
}

impl GenerateArgs {
    /// The flags given that only the GPU engine or the policy search reads
    /// (compression, CPU attention, sparsity, GPU memory, pinning, the
    /// search's own), by name: what an engine without them refuses.
    pub fn engine_flags_given(&self) -> Vec<&'static str> {
        [
            (self.compress_weight, "--compress-weight"),
            (self.compress_cache, "--compress-cache"),
            (self.cpu_cache_compute, "--cpu-cache-compute"),
            (self.attn_sparsity != 1.0, "--attn-sparsity"),
            (self.gpu_mem.is_some(), "--gpu-mem"),
            (self.pin_weight.is_some(), "--pin-weight"),
            (self.policy.as_deref() == Some("auto"), "--policy auto"),
            (self.host_mem.is_some(), "--host-mem"),
            (self.calibration.is_some(), "--calibration"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect()
    }
}

/// `--stages`: at least one; above one, the pipeline's preview runs on the
/// CPU engine with everything in host memory, so the flags that place
/// anything elsewhere are refused by name.
fn check_stages(args: &GenerateArgs) -> Result<()> {
    if args.stages == 0 {
        return Err(Error::InvalidArgument("--stages must be at least 1".into()));
    }
    if args.stages == 1 {
        return Ok(());
    }
    let in_memory = |p: &[f64]| p == [0.0, 100.0, 0.0, 100.0, 0.0, 100.0];
    let mut refused: Vec<String> = Vec::new();
    if let Some(p) = args.percent.as_deref().filter(|p| !in_memory(p)) {
        let p: Vec<String> = p.iter().map(f64::to_string).collect();
        refused.push(format!("--percent {}", p.join(" ")));
    }
    if args.offload_dir.is_some() {
        refused.push("--offload-dir".into());
    }
    refused.extend(args.engine_flags_given().iter().map(|f| f.to_string()));
    if refused.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "--stages {} runs the pipeline on the CPU engine, every stage's layers and cache in host memory; it takes \
         no {}",
        args.stages,
        refused.join(", ")
    )))
}

/// The prompts a call of an [`Outputs`] generator gets: one batch, or with
/// `--stages` one batch per stage (the block that fills the pipeline).
pub fn block_size(args: &GenerateArgs) -> usize {
    args.gpu_batch_size.saturating_mul(args.stages.max(1))
}

/// `prompts` as the block's batches of `--gpu-batch-size`.
pub fn micro_batches(prompts: &[Vec<u32>], gpu_batch_size: usize) -> Vec<Vec<Vec<u32>>> {
    prompts.chunks(gpu_batch_size.max(1)).map(<[Vec<u32>]>::to_vec).collect()
}

/// `tierlm generate` for an OPT model.
fn run_opt(mut args: GenerateArgs) -> Result<()> {
    let pipelined = args.stages > 1;
    if !pipelined {
        apply_auto(&mut args)?;
    }
    if args.chat {
        return Err(Error::InvalidArgument(
            "--chat needs a chat template, and OPT checkpoints have none; give the prompt without --chat".into(),
        ));
    }
    if !pipelined {
        if let Some(result) = super::gpu::try_generate(&args) {
            return result;
        }
    }
    let sampling =
        SamplingConfig { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    sampling.validate()?;
    if args.gpu_batch_size == 0 {
        return Err(Error::InvalidArgument("--gpu-batch-size must be at least 1".to_string()));
    }
    let inputs = match &args.input {
        Some(path) => read_inputs(path)?,
        None => args.prompts.iter().cloned().map(Input::Text).collect(),
    };
    let json = args.json || args.input.is_some();

    // Weights with a disk share stream back a layer at a time (the CPU
    // engine's only tier beside host memory).
    let policy = super::gpu::generate_policy(&args)?;
    let model_config = match engine_opt::loading::ModelSpec::parse(&args.model)? {
        engine_opt::loading::ModelSpec::Dir(dir) => engine_opt::OptConfig::from_dir(&dir)?,
        engine_opt::loading::ModelSpec::Preset(_, config) => config,
    };
    let offload_dir = args.offload_dir.as_deref();
    let weights_on_disk = engine_opt::cpu_offload::weights_disk_bytes(&model_config, &policy);
    engine_opt::cpu_offload::check_disk_space(offload_dir, weights_on_disk, "the weights placed on disk")?;
    // One disk arena for the weights and the cache (the run's tiers); the
    // engine's host memory is reserved against the pageable host tier's
    // account, as in `bench`.
    let run_tiers = runtime::Tiers::default();
    let host = std::sync::Arc::clone(tier_api::Device::account(&*run_tiers.host(tier_api::HostMemKind::Pageable)?));
    let mut on_disk = engine_opt::cpu_offload::for_policy(&run_tiers, &model_config, &policy, offload_dir)?
        .map(|d| d.with_host_account(std::sync::Arc::clone(&host)));
    let loaded = load_model_with(&args.model, args.dummy, args.seed, on_disk.as_mut().map(|d| (d.first(), d)))?;
    let _weights_held = host.reserve(loaded.model.held_bytes(), loaded.model.held_bytes())?;
    let on_disk = on_disk.map(std::sync::Arc::new);
    let cache_disk = engine_opt::cpu_offload::cache_disk_for_policy(&run_tiers, &policy, args.offload_dir.as_deref())?;
    let prompts = tokenize(&loaded, &inputs)?;
    validate_prompts(&loaded.model.config, &prompts, args.max_new_tokens, 0)?;
    let config = &loaded.model.config;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        stop_on_eos: true,
        eos_token_ids: vec![config.eos_token_id.unwrap_or(engine_opt::tokenizer::EOS_TOKEN_ID)],
        pad_token_id: config.pad_token_id.unwrap_or(engine_opt::tokenizer::PAD_TOKEN_ID),
    };

    let mut sampler = Sampler::new(sampling);
    let tokenizer = loaded.tokenizer.as_ref().map(OptTokenizer::tokenizer);
    let out = Outputs {
        prompts: &prompts,
        inputs: &inputs,
        tokenizer,
        batch_size: block_size(&args),
        json,
        file: output_file(&args)?,
    };
    // Refuse a batch's (a block's, pipelined) f32 KV cache that cannot fit.
    let c = &loaded.model.config;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0).saturating_add(args.max_new_tokens);
    let cache = c.kv_cache_bytes(block_size(&args).min(prompts.len()), longest).saturating_mul(2);
    engine_opt::loading::check_fits("the f32 KV cache of a batch", cache)?;
    // The weights are on disk by now: the cache's disk share must fit what is left.
    let batch = args.gpu_batch_size.min(prompts.len());
    let cache_on_disk = engine_opt::cpu_offload::cache_disk_bytes(c, &policy, 1, batch, longest);
    engine_opt::cpu_offload::check_disk_space(offload_dir, cache_on_disk, "the KV cache placed on disk")?;
    // The most KV cache a batch put on disk.
    let disk_cache = std::cell::Cell::new(0u64);
    // The CPU engine's memory is pageable: the host account's peak and the
    // disk tier's staging buffers.
    let peaks = || engine_opt::memory::TierPeaks {
        pageable: host.stats().peak_resident
            + run_tiers.disks().iter().map(|d| d.host_account().stats().peak_resident).sum::<u64>(),
        disk: on_disk.as_ref().map_or(0, |d| d.bytes()) + disk_cache.get(),
        ..Default::default()
    };
    out.write(
        args.max_new_tokens,
        &mut |batch, pb| {
            if pipelined {
                let block = micro_batches(batch, args.gpu_batch_size);
                let mut stages = runtime::pipeline::resident_stages(&loaded.model.layers, args.stages)?;
                for stage in &mut stages {
                    stage.placement.host = Some(host.clone());
                }
                let out =
                    runtime::pipeline::generate_staged(&loaded.model, &stages, &block, &opts, Some(&mut sampler), pb)?;
                return Ok(out.tokens);
            }
            let out = generate_with(
                &loaded.model,
                CpuPlacement { disk: on_disk.clone(), cache_disk: cache_disk.clone(), host: Some(host.clone()) },
                &[batch.to_vec()],
                &opts,
                &mut sampler,
                pb,
            )?;
            disk_cache.set(disk_cache.get().max(out.disk_cache_bytes));
            Ok(out.tokens)
        },
        &peaks,
    )
}

/// The `--output` file of a run: where results go, whether to resume, and
/// for each input (in order) its line number and text hash.
#[derive(Debug)]
pub struct OutputFile {
    path: PathBuf,
    resume: bool,
    sources: Vec<(usize, String)>,
}

/// FNV-1a of a line's text, as 16 hex digits: stable across runs and builds.
fn line_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.trim().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The `--output` file `args` ask for (`None` without `--output`), checked:
/// without `--resume` it must be missing or empty.
pub fn output_file(args: &GenerateArgs) -> Result<Option<OutputFile>> {
    let (Some(path), Some(input)) = (&args.output, &args.input) else {
        return Ok(None);
    };
    if !args.resume {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => {
                return Err(Error::InvalidArgument(format!("--output {}: is a directory", path.display())))
            }
            Ok(m) if m.len() > 0 => {
                return Err(Error::InvalidArgument(format!(
                    "--output {} already holds results; pass --resume to continue that run, or choose another \
                     file (tierlm never overwrites results)",
                    path.display()
                )))
            }
            _ => {}
        }
    }
    let text = std::fs::read_to_string(input).map_err(|e| Error::io(input, e))?;
    let sources =
        text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, line_hash(l))).collect();
    let file = OutputFile { path: path.clone(), resume: args.resume, sources };
    if args.resume {
        file.done()?;
    }
    Ok(Some(file))
}

impl OutputFile {
    /// The inputs (indices) the file already holds, after cutting off a
    /// last line left partial by a crash. Refuses a file whose lines do not
    /// belong to this input.
    fn done(&self) -> Result<std::collections::BTreeSet<usize>> {
        let path = &self.path;
        let mut bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(Error::io(path, e)),
        };
        // A crash mid-write leaves a last line without its newline: drop it.
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole < bytes.len() {
            let f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| Error::io(path, e))?;
            f.set_len(whole as u64).map_err(|e| Error::io(path, e))?;
            f.sync_all().map_err(|e| Error::io(path, e))?;
            eprintln!("note: {}: dropped a partly written last line ({} bytes)", path.display(), bytes.len() - whole);
            bytes.truncate(whole);
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::InvalidArgument(format!("--output {}: not UTF-8 text", path.display())))?;
        let mut done = std::collections::BTreeSet::new();
        #[derive(Deserialize)]
        struct Written {
            line: usize,
            index: usize,
            input_hash: String,
        }
        for (i, l) in text.lines().enumerate() {
            let bad = |reason: String| Error::InputLine { path: path.clone(), line: i + 1, reason };
            let w: Written = serde_json::from_str(l)
                .map_err(|e| bad(format!("not a result line of tierlm generate --output ({e}); refusing to resume")))?;
            match self.sources.get(w.index) {
                Some((line, hash)) if *line == w.line && *hash == w.input_hash => {}
                _ => {
                    return Err(bad(format!(
                        "written for another input (input {} at line {} does not match this --input); refusing to \
                         resume: choose another --output",
                        w.index, w.line
                    )))
                }
            }
            if !done.insert(w.index) {
                return Err(bad(format!("input {} is in the file twice; refusing to resume", w.index)));
            }
        }
        Ok(done)
    }
}

impl Outputs<'_> {
    /// [`Outputs::write`] to an `--output` file: skips the batches whose
    /// inputs are all there already (`--resume`), runs the others whole (so
    /// that a batch holds the same prompts as in an uninterrupted run), and
    /// appends the missing lines of each, synced before the next batch.
    fn write_file<E: From<Error>>(
        &self,
        file: &OutputFile,
        max_new_tokens: usize,
        generate: &mut BatchGenerator<'_, E>,
        peaks: &dyn Fn() -> engine_opt::memory::TierPeaks,
    ) -> Result<(), E> {
        let path = &file.path;
        if file.sources.len() != self.prompts.len() {
            return Err(Error::InvalidArgument(format!(
                "--output: the input has {} lines but {} prompts were read",
                file.sources.len(),
                self.prompts.len()
            ))
            .into());
        }
        let done = if file.resume { file.done()? } else { Default::default() };
        let size = self.batch_size.max(1);
        let todo: Vec<usize> = (0..self.prompts.len().div_ceil(size))
            .filter(|&b| (b * size..((b + 1) * size).min(self.prompts.len())).any(|i| !done.contains(&i)))
            .collect();
        if file.resume {
            eprintln!(
                "resuming {}: {} of {} inputs done, {} batches to run",
                path.display(),
                done.len(),
                self.prompts.len(),
                todo.len()
            );
        }
        let mut out =
            std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        let start = std::time::Instant::now();
        let mut new_tokens = 0usize;
        let pb = progress::bar((todo.len() as u64).saturating_mul(max_new_tokens as u64), "generating");
        for b in todo {
            let first = b * size;
            let batch = &self.prompts[first..(first + size).min(self.prompts.len())];
            let generated = generate(batch, &pb)?;
            new_tokens += generated.iter().map(Vec::len).sum::<usize>();
            let mut lines = String::new();
            for (k, new_ids) in generated.iter().enumerate() {
                let index = first + k;
                if done.contains(&index) {
                    continue;
                }
                let text = match self.tokenizer {
                    Some(tok) => Some(tok.decode(new_ids).map_err(Error::from)?),
                    None => None,
                };
                let (line, hash) = &file.sources[index];
                let line =
                    OutputLine { line: Some(*line), input_hash: Some(hash.clone()), index, output_ids: new_ids, text };
                let line = serde_json::to_string(&line).map_err(|source| Error::Json { path: path.clone(), source })?;
                lines.push_str(&line);
                lines.push('\n');
            }
            // One write and a sync per batch: a crash loses at most the
            // batch in flight (a partial last line is cut off on resume).
            out.write_all(lines.as_bytes()).map_err(|e| Error::io(path, e))?;
            out.sync_data().map_err(|e| Error::io(path, e))?;
        }
        pb.finish_and_clear();
        let s = start.elapsed().as_secs_f64();
        eprintln!(
            "generated {new_tokens} new tokens for {} prompts in {s:.2} s ({:.1} token/s), results in {}; peak per \
             tier: {}",
            self.prompts.len() - done.len(),
            new_tokens as f64 / s.max(1e-9),
            path.display(),
            peaks()
        );
        Ok(())
    }
}

/// Generates one batch's new tokens, ticking the progress bar.
pub type BatchGenerator<'a, E = Error> = dyn FnMut(&[Vec<u32>], &ProgressBar) -> Result<Vec<Vec<u32>>, E> + 'a;

/// Errors writing to standard output.
fn stdout_err(e: std::io::Error) -> Error {
    Error::io("<stdout>", e)
}

/// What `tierlm generate` prints, whichever engine generates.
pub struct Outputs<'a> {
    pub prompts: &'a [Vec<u32>],
    pub inputs: &'a [Input],
    pub tokenizer: Option<&'a Tokenizer>,
    pub batch_size: usize,
    /// JSON lines (`--json`, `--input`), else each prompt and its continuation.
    pub json: bool,
    /// `--output`: results appended to a file, durably, a batch at a time.
    pub file: Option<OutputFile>,
}

impl Outputs<'_> {
    /// Runs `generate` on each batch of `batch_size` prompts (with a
    /// progress bar of `max_new_tokens` a batch) and writes its outputs as
    /// soon as the batch is done.
    /// At the end, a summary on stderr: new tokens, time, throughput and
    /// `peaks()`, the most each memory tier held.
    pub fn write<E: From<Error>>(
        &self,
        max_new_tokens: usize,
        generate: &mut BatchGenerator<'_, E>,
        peaks: &dyn Fn() -> engine_opt::memory::TierPeaks,
    ) -> Result<(), E> {
        if let Some(file) = &self.file {
            return self.write_file(file, max_new_tokens, generate, peaks);
        }
        let start = std::time::Instant::now();
        let mut new_tokens = 0usize;
        let batches: Vec<&[Vec<u32>]> = self.prompts.chunks(self.batch_size.max(1)).collect();
        let pb = progress::bar((batches.len() as u64).saturating_mul(max_new_tokens as u64), "generating");
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut index = 0;
        for batch in batches {
            let generated = generate(batch, &pb)?;
            new_tokens += generated.iter().map(Vec::len).sum::<usize>();
            for new_ids in &generated {
                let text = match self.tokenizer {
                    Some(tok) => Some(tok.decode(new_ids).map_err(Error::from)?),
                    None => None,
                };
                if self.json {
                    let line = OutputLine { line: None, input_hash: None, index, output_ids: new_ids, text };
                    let line = serde_json::to_string(&line)
                        .map_err(|source| Error::Json { path: PathBuf::from("<stdout>"), source })?;
                    pb.suspend(|| writeln!(out, "{line}")).map_err(stdout_err)?;
                } else {
                    let prompt = match self.inputs.get(index) {
                        Some(Input::Text(t)) => t.clone(),
                        _ => String::new(),
                    };
                    let sep = if index > 0 { "\n" } else { "" };
                    pb.suspend(|| writeln!(out, "{sep}{prompt}{}", text.unwrap_or_default())).map_err(stdout_err)?;
                }
                index += 1;
            }
            out.flush().map_err(stdout_err)?;
        }
        pb.finish_and_clear();
        let s = start.elapsed().as_secs_f64();
        eprintln!(
            "generated {new_tokens} new tokens for {} prompts in {s:.2} s ({:.1} token/s); peak per tier: {}",
            self.prompts.len(),
            new_tokens as f64 / s.max(1e-9),
            peaks()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_jsonl_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        std::fs::write(&path, "{\"prompt\": \"Hi\"}\n\n{\"input_ids\": [2, 5, 9]}\n").unwrap();
        assert_eq!(read_inputs(&path).unwrap(), vec![Input::Text("Hi".into()), Input::Ids(vec![2, 5, 9])]);

        std::fs::write(&path, "{\"prompt\": \"Hi\"}\n{\"prompt\": oops}\n").unwrap();
        let err = read_inputs(&path).unwrap_err().to_string();
        assert!(err.contains("in.jsonl:2: invalid JSON"), "{err}");

        std::fs::write(&path, "{\"prompt\": \"a\", \"input_ids\": [2]}\n").unwrap();
        assert!(read_inputs(&path).unwrap_err().to_string().contains(":1: give either"));

        std::fs::write(&path, "{\"input_ids\": [2, -1]}\n").unwrap();
        assert!(read_inputs(&path).unwrap_err().to_string().contains(":1: invalid JSON"));

        std::fs::write(&path, "{}\n").unwrap();
        assert!(read_inputs(&path).unwrap_err().to_string().contains(":1: expected an object"));
    }
}
