//! `tierlm bench`: FlexGen's benchmark (`flex_opt.py`) with its knobs, run on
//! the CPU engine, or on the GPU engine when everything is placed on a GPU. Throughput is defined exactly
//! as FlexLLMGen reports it: prefill = prompts × prompt_len / prefill time,
//! decode = prompts × (gen_len − 1) / decode time, total = prompts × gen_len
//! / (prefill + decode time); one warm-up generation runs first, untimed.

use std::io::Write;
use std::path::PathBuf;

use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use engine_opt::generation::{generate_with, CpuPlacement, GenerateOptions, GenerationOutput};
use engine_opt::loading::{check_fits, load_model_with, ModelSpec};
use engine_opt::memory;
use engine_opt::model::OptModel;
use engine_opt::policy::Policy;
use engine_opt::progress;
use engine_opt::sampling::{Sampler, SamplingConfig};
use engine_opt::tokenizer::BOS_TOKEN_ID;
use engine_opt::OptConfig;
use engine_opt::{Error, Result};

/// Arguments of `tierlm bench` (FlexGen's names and defaults where they
/// apply; `--percent` defaults to everything on the CPU).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A preset (opt-125m … opt-175b, facebook/ prefix allowed) or a
    /// checkpoint directory
    #[arg(long, default_value = "opt-125m")]
    pub model: String,
    /// Seeded random weights instead of a checkpoint (FlexGen's _DUMMY_)
    #[arg(long)]
    pub dummy: bool,
    /// Tokens per prompt
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Tokens generated per prompt
    #[arg(long, default_value_t = 32)]
    pub gen_len: usize,
    /// Sequences per batch [default: 4; with --policy auto, chosen unless given]
    #[arg(long)]
    pub gpu_batch_size: Option<usize>,
    /// Batches per block (prompts = gpu batch size × this) [default: 1;
    /// with --policy auto, chosen unless given]
    #[arg(long)]
    pub num_gpu_batches: Option<usize>,
    /// How the placement is chosen: auto (the cost model's search on the GPU
    /// engine; any policy flag given pins that choice; see tierlm plan) or
    /// manual (the flags as given, everything in host memory on the CPU
    /// without --percent) [default: manual with --percent, else auto]
    #[arg(long, value_parser = ["manual", "auto"])]
    pub policy: Option<String>,
    /// With --policy auto: the prompts of the one block benchmarked
    /// [default: --gpu-batch-size × --num-gpu-batches]
    #[arg(long)]
    pub num_prompts: Option<usize>,
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
    /// Weights GPU% CPU%, cache GPU% CPU%, activations GPU% CPU% (the rest
    /// on disk); the CPU engine takes 0 W_CPU 0 C_CPU 0 100 (weights and
    /// cache partly on disk)
    #[arg(
        long,
        num_args = 6,
        allow_negative_numbers = true,
        value_names = ["W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"]
    )]
    pub percent: Option<Vec<f64>>,
    /// Pin weights in page-locked host memory (no effect without a GPU)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub pin_weight: Option<bool>,
    /// Compute attention on the CPU where the cache is (what the CPU engine
    /// always does)
    #[arg(long)]
    pub cpu_cache_compute: bool,
    /// Fraction of attention kept (GPU engine)
    #[arg(long, default_value_t = 1.0)]
    pub attn_sparsity: f64,
    /// 4-bit weights (GPU engine)
    #[arg(long)]
    pub compress_weight: bool,
    /// 4-bit KV cache (GPU engine)
    #[arg(long)]
    pub compress_cache: bool,
    /// Overlap copies with compute: what both engines always do (FlexGen's
    /// flag; `--overlap false`, a sequential mode, is refused)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub overlap: Option<bool>,
    /// Wait for a streamed layer's attention and MLP weights separately, so
    /// the attention computes while the MLP's weights arrive (GPU engine;
    /// default true, as FlexGen)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub sep_layer: Option<bool>,
    /// Directory for tensors placed on disk (default: the system's
    /// temporary directory); nothing is left in it afterwards
    #[arg(long)]
    pub offload_dir: Option<PathBuf>,
    /// GPU memory the engine may use, e.g. 16G to act as a 16 GB card
    /// (GPU engine; default: what is free)
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::tiers::parse_size)]
    pub gpu_mem: Option<u64>,
    /// Seed of the dummy weights and of the prompts' token ids
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    /// The policy these flags ask for.
    pub fn policy(&self) -> Result<Policy> {
        let (gbs, nb) = (self.gpu_batch_size.unwrap_or(4), self.num_gpu_batches.unwrap_or(1));
        check_block(gbs, nb)?;
        let policy = Policy {
            gpu_batch_size: gbs,
            num_gpu_batches: nb,
            overlap: true,
            sep_layer: self.sep_layer.unwrap_or(true),
            pin_weight: self.pin_weight.unwrap_or(true),
            cpu_cache_compute: self.cpu_cache_compute,
            attn_sparsity: self.attn_sparsity,
            compress_weight: self.compress_weight,
            compress_cache: self.compress_cache,
            ..Policy::default()
        };
        match &self.percent {
            Some(p) => Ok(policy.with_percent(p)?),
            None => Ok(policy),
        }
    }
}

/// The most prompts one block may hold (`--gpu-batch-size` ×
/// `--num-gpu-batches`): far above what any machine runs at once, low enough
/// that every count derived from it fits.
pub const MAX_BLOCK: usize = 1 << 20;

/// Refuses a block of prompts whose size overflows or passes [`MAX_BLOCK`].
pub fn check_block(batch_size: usize, batches: usize) -> Result<()> {
    match batch_size.checked_mul(batches) {
        Some(n) if n <= MAX_BLOCK => Ok(()),
        n => Err(Error::InvalidArgument(format!(
            "--gpu-batch-size {batch_size} × --num-gpu-batches {batches} = {} prompts in one block; at most \
             {MAX_BLOCK} are supported (lower either)",
            n.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string())
        ))),
    }
}

/// Byte counts of a run.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Host bytes the CPU engine held: weights (f16 matrices, f32 vectors).
    pub weights_bytes: u64,
    /// Bytes of weights on disk (f16), streamed back a layer at a time.
    pub disk_weights_bytes: u64,
    /// Host bytes of the KV caches (f32).
    pub kv_cache_bytes: u64,
    /// Bytes of the KV caches on disk (f32), with a cache disk share.
    pub disk_kv_cache_bytes: u64,
    /// Host bytes of the hidden states held between layers (f32).
    pub activation_bytes: u64,
    /// Their sum.
    pub total_held_bytes: u64,
    /// FlexGen's f16 accounting of the same run: weights, cache, hidden.
    pub flexgen_weight_bytes: u64,
    pub flexgen_cache_bytes: u64,
    pub flexgen_hidden_bytes: u64,
    /// The process's peak resident set (VmHWM), where known.
    pub peak_rss_bytes: Option<u64>,
    /// The process's resident set before the model is loaded (VmRSS): the
    /// binary, its libraries, the runtime; outside the tiers' accounts.
    pub baseline_rss_bytes: Option<u64>,
    /// The most host memory the CPU engine held at once, from its pageable
    /// host account: the model's resident weights, the layers read back
    /// from disk (in use and read ahead, and the one being written while
    /// loading), the KV caches in memory and their gather slots, the hidden
    /// states, a layer's and the logits' scratch.
    pub host_peak_bytes: u64,
    /// Host memory of the disk tier's staging (bounce) buffers, at most.
    pub disk_staging_bytes: u64,
    /// `baseline_rss_bytes + host_peak_bytes + disk_staging_bytes`: what
    /// the process should have held at its peak; compare `peak_rss_bytes`.
    pub accounted_peak_bytes: u64,
}

/// The result of a benchmark, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub engine: String,
    pub threads: usize,
    pub prompts: usize,
    pub gpu_batch_size: usize,
    pub num_gpu_batches: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub percent: [f64; 6],
    pub prefill_s: f64,
    pub decode_s: f64,
    pub total_s: f64,
    /// prompts × prompt_len / prefill_s.
    pub prefill_tokens_per_s: f64,
    /// prompts × (gen_len − 1) / decode_s; absent when gen_len is 1.
    pub decode_tokens_per_s: Option<f64>,
    /// prompts × gen_len / (prefill_s + decode_s).
    pub total_tokens_per_s: f64,
    pub memory: MemoryReport,
    /// The directory that held what this run put on disk (none if nothing).
    pub offload_dir: Option<PathBuf>,
    /// The most each memory tier held (GPU, page-locked host, pageable host, disk).
    pub peak_per_tier: memory::TierPeaks,
}

/// Deterministic prompts: `</s>` then ids drawn from the vocabulary (past
/// the special tokens), `batches × batch` of them.
pub(crate) fn bench_prompts(
    config: &OptConfig,
    batches: usize,
    batch: usize,
    len: usize,
    seed: u64,
) -> Vec<Vec<Vec<u32>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let low = 4.min(config.vocab_size as u32 - 1);
    (0..batches)
        .map(|_| {
            (0..batch)
                .map(|_| {
                    let mut p = vec![BOS_TOKEN_ID.min(config.vocab_size as u32 - 1)];
                    p.extend((1..len).map(|_| rng.random_range(low..config.vocab_size as u32)));
                    p
                })
                .collect()
        })
        .collect()
}

/// Throughput figures from a timed generation, FlexLLMGen's definitions.
pub fn throughput(
    prompts: usize,
    prompt_len: usize,
    gen_len: usize,
    out: &GenerationOutput,
) -> (f64, Option<f64>, f64) {
    let prefill = out.prefill_time.as_secs_f64();
    let decode = out.decode_time.as_secs_f64();
    let n = prompts as f64;
    let prefill_tput = n * prompt_len as f64 / prefill;
    let decode_tput = (gen_len > 1).then(|| n * (gen_len - 1) as f64 / decode);
    let total_tput = n * gen_len as f64 / (prefill + decode);
    (prefill_tput, decode_tput, total_tput)
}

/// Whether the CPU engine puts anything of this policy on disk (weights or
/// KV cache; it refuses activations on disk).
fn cpu_uses_disk(policy: &Policy) -> bool {
    policy.w_cpu_percent < 100.0 || policy.cache_cpu_percent < 100.0
}

/// The directory the CPU engine's disk tiers use.
fn offload_dir_of(args: &BenchArgs) -> PathBuf {
    args.offload_dir.clone().unwrap_or_else(std::env::temp_dir)
}

fn notes(args: &BenchArgs, policy: &Policy) {
    if args.offload_dir.is_some() && !cpu_uses_disk(policy) {
        eprintln!("note: --offload-dir is unused: this placement puts nothing on disk");
    }
    if args.gpu_mem.is_some() {
        eprintln!("note: --gpu-mem is unused: the CPU engine uses no GPU");
    }
    if policy.cpu_cache_compute {
        eprintln!("note: --cpu-cache-compute: the CPU engine computes attention on the CPU anyway");
    }
}

/// Runs `tierlm bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    engine_opt::cpu_offload::check_offload_dir_arg(args.offload_dir.as_deref())?;
    if args.overlap == Some(false) {
        return Err(Error::InvalidArgument(
            "--overlap false: tierlm has no sequential mode to compare against; both engines always overlap their \
             copies with compute (the GPU engine streams two layers ahead, the CPU engine reads its next disk layer \
             ahead); drop the flag"
                .into(),
        ));
    }
    let mode = super::auto::mode(args.policy.as_deref(), args.percent.is_some());
    super::auto::check_auto_only(
        mode,
        &[
            (args.num_prompts.is_some(), "--num-prompts"),
            (args.host_mem.is_some(), "--host-mem"),
            (args.calibration.is_some(), "--calibration"),
        ],
    )?;
    let mut policy = args.policy()?;
    let mut chosen = None;
    if mode != super::auto::Mode::Manual {
        match super::auto::for_bench(&args)? {
            Some(c) => {
                policy = c.policy.clone();
                chosen = Some(c);
            }
            None => super::auto::no_gpu_note(mode),
        }
    }
    if super::llama::names_llama_family(&args.model) {
        return super::llama::bench(&args, &policy, chosen.as_ref()).map_err(|e| match e {
            crate::Error::Opt(e) => e,
            other => Error::InvalidArgument(other.to_string()),
        });
    }
    // Everything on the GPU, and a GPU here: the GPU engine runs it.
    if let Some(result) = super::gpu::try_bench(&args, &policy, chosen.as_ref()) {
        return result;
    }
    policy.check_cpu_engine()?;
    if args.prompt_len == 0 || args.gen_len == 0 {
        return Err(Error::InvalidArgument("--prompt-len and --gen-len must be at least 1".to_string()));
    }
    notes(&args, &policy);

    // Refuse early what cannot fit, before minutes of loading.
    let config = match ModelSpec::parse(&args.model)? {
        ModelSpec::Dir(dir) => OptConfig::from_dir(&dir)?,
        ModelSpec::Preset(_, config) => config,
    };
    let prompts_n = policy.block_size();
    let seq = args.prompt_len.saturating_add(args.gen_len);
    if seq > config.max_sequence_len() {
        return Err(Error::InvalidArgument(format!(
            "--prompt-len {} + --gen-len {} exceed the model's {} positions",
            args.prompt_len,
            args.gen_len,
            config.max_sequence_len()
        )));
    }
    let f32_cache = config.kv_cache_bytes(prompts_n, seq).saturating_mul(2);
    let on_disk_bytes = engine_opt::cpu_offload::weights_disk_bytes(&config, &policy).saturating_add(
        engine_opt::cpu_offload::cache_disk_bytes(&config, &policy, policy.num_gpu_batches, policy.gpu_batch_size, seq),
    );
    engine_opt::cpu_offload::check_disk_space(
        args.offload_dir.as_deref(),
        on_disk_bytes,
        "the weights and KV cache placed on disk",
    )?;
    // One disk arena for the weights and the cache (the run's tiers); the
    // engine's host memory is reserved against the pageable host tier's
    // account.
    let baseline_rss = memory::rss_bytes();
    let run_tiers = runtime::Tiers::default();
    let host = std::sync::Arc::clone(tier_api::Device::account(&*run_tiers.host(tier_api::HostMemKind::Pageable)?));
    let mut on_disk = engine_opt::cpu_offload::for_policy(&run_tiers, &config, &policy, args.offload_dir.as_deref())?
        .map(|d| d.with_host_account(std::sync::Arc::clone(&host)));
    let streamed = (config.num_hidden_layers - on_disk.as_ref().map_or(config.num_hidden_layers, |d| d.first())) as u64;
    let in_memory = config.weight_bytes() - streamed * config.layer_param_count() * 2;
    check_fits("the weights in memory and the f32 KV cache", in_memory.saturating_add(f32_cache))?;

    let loaded = load_model_with(&args.model, args.dummy, args.seed, on_disk.as_mut().map(|d| (d.first(), d)))?;
    let _weights_held = host.reserve(loaded.model.held_bytes(), loaded.model.held_bytes())?;
    let on_disk = on_disk.map(std::sync::Arc::new);
    let cache_disk = engine_opt::cpu_offload::cache_disk_for_policy(&run_tiers, &policy, args.offload_dir.as_deref())?;
    let disk_bytes = on_disk.as_ref().map_or(0, |d| d.bytes());
    let model = &loaded.model;
    let generate = |prompts: &[Vec<Vec<u32>>], opts: &GenerateOptions, sampler: &mut Sampler, pb: &ProgressBar| {
        let placement =
            CpuPlacement { disk: on_disk.clone(), cache_disk: cache_disk.clone(), host: Some(host.clone()) };
        generate_with(model, placement, prompts, opts, sampler, pb)
    };
    let opts = GenerateOptions { stop_on_eos: false, ..engine_opt::generation::options(args.gen_len) };
    let mut sampler = Sampler::new(SamplingConfig::default());

    // Warm-up as FlexLLMGen: the same prompts count, 32-token prompts, one
    // new token.
    let warm = bench_prompts(&model.config, policy.num_gpu_batches, policy.gpu_batch_size, args.prompt_len.min(32), 1);
    let hidden = indicatif::ProgressBar::hidden();
    generate(&warm, &GenerateOptions { max_new_tokens: 1, ..opts.clone() }, &mut sampler, &hidden)?;

    let prompts =
        bench_prompts(&model.config, policy.num_gpu_batches, policy.gpu_batch_size, args.prompt_len, args.seed);
    let pb = progress::bar(args.gen_len as u64, "generating");
    let out = generate(&prompts, &opts, &mut sampler, &pb)?;
    pb.finish_and_clear();

    let mut report = make_report(&args, &policy, &loaded.description, model, &out);
    report.memory.disk_weights_bytes = disk_bytes;
    report.offload_dir = cpu_uses_disk(&policy).then(|| offload_dir_of(&args));
    // The CPU engine's memory is pageable (plain allocations, the disk
    // tier's staging buffers); disk holds the streamed layers and the
    // cache's disk share.
    let m = &mut report.memory;
    m.host_peak_bytes = host.stats().peak_resident;
    m.disk_staging_bytes = run_tiers.disks().iter().map(|d| d.host_account().stats().peak_resident).sum();
    m.baseline_rss_bytes = baseline_rss;
    m.accounted_peak_bytes = baseline_rss.unwrap_or(0) + m.host_peak_bytes + m.disk_staging_bytes;
    report.peak_per_tier = memory::TierPeaks {
        pageable: m.host_peak_bytes + m.disk_staging_bytes,
        disk: disk_bytes + m.disk_kv_cache_bytes,
        ..Default::default()
    };
    print_report(&report, args.json)
}

fn make_report(
    args: &BenchArgs,
    policy: &Policy,
    description: &str,
    model: &OptModel,
    out: &GenerationOutput,
) -> BenchReport {
    let prompts = policy.block_size();
    let (prefill_tput, decode_tput, total_tput) = throughput(prompts, args.prompt_len, args.gen_len, out);
    let weights = model.held_bytes();
    let c = &model.config;
    BenchReport {
        model: description.to_string(),
        engine: "cpu".to_string(),
        threads: rayon::current_num_threads(),
        prompts,
        gpu_batch_size: policy.gpu_batch_size,
        num_gpu_batches: policy.num_gpu_batches,
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
        percent: policy.percent(),
        prefill_s: out.prefill_time.as_secs_f64(),
        decode_s: out.decode_time.as_secs_f64(),
        total_s: (out.prefill_time + out.decode_time).as_secs_f64(),
        prefill_tokens_per_s: prefill_tput,
        decode_tokens_per_s: decode_tput,
        total_tokens_per_s: total_tput,
        peak_per_tier: memory::TierPeaks::default(),
        offload_dir: None,
        memory: MemoryReport {
            weights_bytes: weights,
            disk_weights_bytes: 0,
            kv_cache_bytes: out.cache_bytes,
            disk_kv_cache_bytes: out.disk_cache_bytes,
            activation_bytes: out.activation_bytes,
            total_held_bytes: weights + out.cache_bytes + out.activation_bytes,
            flexgen_weight_bytes: c.weight_bytes(),
            flexgen_cache_bytes: c.kv_cache_bytes(prompts, args.prompt_len + args.gen_len),
            flexgen_hidden_bytes: c.activation_bytes(prompts, args.prompt_len),
            peak_rss_bytes: memory::peak_rss_bytes(),
            baseline_rss_bytes: None,
            host_peak_bytes: 0,
            disk_staging_bytes: 0,
            accounted_peak_bytes: 0,
        },
    }
}

/// Bytes in MiB, or in KiB or bytes where MiB would read 0.0.
fn mib(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..0x1_9999 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64),
    }
}

fn print_report(r: &BenchReport, json: bool) -> Result<()> {
    let stdout_err = |e: std::io::Error| Error::io("<stdout>", e);
    let mut out = std::io::stdout().lock();
    if json {
        let line =
            serde_json::to_string(r).map_err(|source| Error::Json { path: PathBuf::from("<stdout>"), source })?;
        return writeln!(out, "{line}").map_err(stdout_err);
    }
    let m = &r.memory;
    let p = r.percent;
    let decode = r.decode_tokens_per_s.map_or("n/a (gen-len 1)".to_string(), |t| format!("{t:.2} token/s"));
    let text = format!(
        "model: {}\n\
         engine: CPU, {} threads\n\
         prompts: {} ({} × {}), prompt_len {}, gen_len {}, percent {} {} {} {} {} {}\n\
         prefill: {:.3} s, {:.2} token/s\n\
         decode:  {:.3} s, {}\n\
         total:   {:.3} s, {:.2} token/s\n\
         host memory held: weights {} + KV cache {} + activations {} = {}\n\
         on disk: weights {} + KV cache {}{}\n\
         FlexGen accounting (f16): weights {}, KV cache {}, hidden {}\n\
         peak host memory accounted: {} (engine {} + disk staging {} + before loading {})\n\
         peak RSS (VmHWM): {}\n\
         peak per tier: {}\n",
        r.model,
        r.threads,
        r.prompts,
        r.gpu_batch_size,
        r.num_gpu_batches,
        r.prompt_len,
        r.gen_len,
        p[0],
        p[1],
        p[2],
        p[3],
        p[4],
        p[5],
        r.prefill_s,
        r.prefill_tokens_per_s,
        r.decode_s,
        decode,
        r.total_s,
        r.total_tokens_per_s,
        mib(m.weights_bytes),
        mib(m.kv_cache_bytes),
        mib(m.activation_bytes),
        mib(m.total_held_bytes),
        mib(m.disk_weights_bytes),
        mib(m.disk_kv_cache_bytes),
        r.offload_dir.as_ref().map_or(String::new(), |d| format!(" in {}", d.display())),
        mib(m.flexgen_weight_bytes),
        mib(m.flexgen_cache_bytes),
        mib(m.flexgen_hidden_bytes),
        mib(m.accounted_peak_bytes),
        mib(m.host_peak_bytes),
        mib(m.disk_staging_bytes),
        m.baseline_rss_bytes.map_or("unknown".to_string(), mib),
        m.peak_rss_bytes.map_or("unknown".to_string(), mib),
        r.peak_per_tier,
    );
    out.write_all(text.as_bytes()).map_err(stdout_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn throughput_definitions() {
        let out = GenerationOutput {
            prefill_time: Duration::from_secs(2),
            decode_time: Duration::from_secs(31),
            ..Default::default()
        };
        let (p, d, t) = throughput(4, 512, 32, &out);
        assert_eq!(p, 4.0 * 512.0 / 2.0);
        assert_eq!(d, Some(4.0 * 31.0 / 31.0));
        assert_eq!(t, 4.0 * 32.0 / 33.0);
        let (_, d, _) = throughput(4, 512, 1, &out);
        assert_eq!(d, None);
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn gpu_mem_parses_sizes() {
        use clap::Parser;
        let args = Cli::try_parse_from(["x", "--gpu-mem", "16G"]).unwrap().bench;
        assert_eq!(args.gpu_mem, Some(16 << 30));
        assert_eq!(Cli::try_parse_from(["x"]).unwrap().bench.gpu_mem, None);
        assert!(Cli::try_parse_from(["x", "--gpu-mem", "lots"]).is_err());
    }

    #[test]
    fn prompts_are_deterministic_and_in_range() {
        let c = OptConfig::preset("opt-125m").unwrap();
        let a = bench_prompts(&c, 2, 3, 10, 7);
        assert_eq!(a, bench_prompts(&c, 2, 3, 10, 7));
        assert_eq!((a.len(), a[0].len(), a[0][0].len()), (2, 3, 10));
        assert!(a.iter().flatten().all(|p| p[0] == 2 && p[1..].iter().all(|&t| (4..50272).contains(&t))));
    }
}
