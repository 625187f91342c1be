//! `tierlm plan`: the policy `--policy auto` would run, without loading the
//! model: the flags that reproduce it, the predicted throughput, the bytes
//! per tier and per link, the bounding link, and the next candidates with
//! why they lost (the cost model and the search are `runtime::cost` and
//! `runtime::search`; docs/policy.md).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use engine_opt::loading::ModelSpec as ModelArg;
use engine_opt::{Error, OptConfig, Result};
use runtime::cost::{LinkBytes, Prediction, StepCost};
use runtime::plan::{Capacity, Footprint, TierBytes, Workload};
use runtime::search::{search, Choice, CompressMode, Objective, Outcome, Pins, Request};
use tier_api::HostMemKind;

use super::calibrate;
use super::tiers::parse_size;

/// Arguments of `tierlm plan`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlanArgs {
    /// A preset (opt-125m … opt-175b) or a checkpoint directory (only its
    /// config.json is read)
    #[arg(long, default_value = "opt-125m")]
    pub model: String,
    /// Accepted for symmetry with bench; plan never loads weights
    #[arg(long)]
    pub dummy: bool,
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub gen_len: usize,
    /// Prompts to generate for (run in blocks of the chosen size)
    #[arg(long, default_value_t = 32)]
    pub num_prompts: usize,
    /// What to maximise: decode or total throughput
    #[arg(long, default_value = "total", value_parser = parse_objective)]
    pub objective: Objective,
    /// Compression the search may use: none (default; it changes the
    /// output), weight, cache, both, or auto
    #[arg(long, default_value = "none", value_parser = parse_compress)]
    pub compress: CompressMode,
    /// GPU memory to plan for (default: the GPU's, less 1 GiB for the CUDA
    /// context and libraries); needed where there is no GPU
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub gpu_mem: Option<u64>,
    /// Host memory to plan for, to act as a smaller machine (default: what
    /// is available, within the cgroup's limit if any)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub host_mem: Option<u64>,
    /// Directory for what goes on disk (its free space is the disk budget)
    #[arg(long)]
    pub offload_dir: Option<PathBuf>,
    /// Pins the six percentages (the search fills the rest)
    #[arg(long, num_args = 6, allow_negative_numbers = true, value_names = ["W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"])]
    pub percent: Option<Vec<f64>>,
    /// Pins the GPU batch size
    #[arg(long)]
    pub gpu_batch_size: Option<usize>,
    /// Pins the number of GPU batches in a block
    #[arg(long)]
    pub num_gpu_batches: Option<usize>,
    /// Pins whether streamed weights are page-locked
    #[arg(long, value_name = "BOOL")]
    pub pin_weight: Option<bool>,
    /// Pins the decode attention on the CPU (or, with false, on the GPU)
    #[arg(long, value_name = "BOOL")]
    pub cpu_cache_compute: Option<bool>,
    /// Pins --sep-layer
    #[arg(long, value_name = "BOOL")]
    pub sep_layer: Option<bool>,
    /// The page-locked kind pinned weights use: pinned or registered
    /// (default registered, the engine's), or pageable
    #[arg(long, value_name = "KIND")]
    pub host_memory: Option<String>,
    /// Fixed rates instead of this machine's (also TIERLM_CALIBRATION)
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

pub fn parse_objective(s: &str) -> std::result::Result<Objective, String> {
    s.parse().map_err(|e: runtime::Error| e.to_string())
}

pub fn parse_compress(s: &str) -> std::result::Result<CompressMode, String> {
    s.parse().map_err(|e: runtime::Error| e.to_string())
}

/// The configuration `model` names (a preset, or a directory's config.json).
pub fn model_config(model: &str) -> Result<OptConfig> {
    Ok(match ModelArg::parse(model)? {
        ModelArg::Dir(dir) => OptConfig::from_dir(&dir)?,
        ModelArg::Preset(_, config) => config,
    })
}

/// A model as the search sees it, of either family: its layer spec (in the
/// type its GPU engine computes in), the positions it takes, and the
/// shares its GPU engine fixes.
pub struct Planned {
    pub spec: runtime::spec::ModelSpec,
    pub max_positions: usize,
    /// The activations' shares (GPU, CPU) the family's GPU engine fixes
    /// (the Llama family's keeps its hidden states on the GPU); `None`:
    /// searched. The cache and the weights are searched for every family.
    pub act: Option<[f64; 2]>,
    /// The family's name in messages, where its engine lacks a flag.
    pub family: &'static str,
}

/// The spec and limits of `model` (a preset or a directory of either
/// family), without loading any weights.
pub fn planned_model(model: &str) -> Result<Planned> {
    use super::llama::Family;
    let family = super::llama::family_of(model).map_err(|e| match e {
        crate::Error::Opt(e) => e,
        other => Error::InvalidArgument(other.to_string()),
    })?;
    let llama_err = |e: engine_llama::Error| Error::InvalidArgument(e.to_string());
    match family {
        Family::Opt => {
            let config = model_config(model)?;
            Ok(Planned {
                spec: engine_opt::spec::model_spec(&config, true)?,
                max_positions: config.max_sequence_len(),
                act: None,
                family: "OPT",
            })
        }
        Family::Llama => {
            let dir = Path::new(model);
            let mut config = if dir.is_dir() {
                engine_llama::LlamaConfig::from_file(&dir.join("config.json")).map_err(llama_err)?
            } else {
                engine_llama::LlamaConfig::preset(model).map_err(llama_err)?
            };
            config.dtype = Some(match engine_llama::gpu::compute_dtype(&config) {
                tier_api::DType::F16 => ops::DType::F16,
                _ => ops::DType::BF16,
            });
            Ok(Planned {
                spec: engine_llama::model_spec(&config).map_err(llama_err)?,
                max_positions: config.max_position_embeddings,
                // Its GPU engine runs activations off the GPU when placed by
                // hand (`runtime::gpu::activations`); the search keeps them on
                // the GPU until that path has been measured there.
                act: Some([100.0, 0.0]),
                family: "Llama",
            })
        }
    }
}

/// Refuses a pinned `--percent` that places what `planned`'s family's GPU
/// engine fixes elsewhere (the Llama family's keeps the activations on the
/// GPU; its KV cache, `--compress-cache` and `--cpu-cache-compute` are
/// searched or pinned as for OPT).
pub fn check_family_pins(planned: &Planned, percent: Option<[f64; 6]>) -> Result<()> {
    let Some(fixed) = planned.act else {
        return Ok(());
    };
    match percent.filter(|p| p[4..] != fixed) {
        None => Ok(()),
        Some(p) => Err(Error::InvalidArgument(format!(
            "--percent with the activations off the GPU ({} {}): the policy search keeps the {} family's \
             activations on the GPU (their off-GPU path is not measured yet) and places the weights and the KV \
             cache anywhere: pin --percent W_GPU W_CPU C_GPU C_CPU {} {}, or give the --percent by hand without \
             --policy auto to run it as placed",
            p[4], p[5], planned.family, fixed[0], fixed[1]
        ))),
    }
}

/// GPU memory kept for the CUDA context and libraries when planning from
/// the GPU's size.
pub const CONTEXT_RESERVE: u64 = 1 << 30;

/// The machine's budgets: GPU memory (`gpu_mem`, else the first GPU's less
/// [`CONTEXT_RESERVE`]), host memory (`host_mem`, else available within the
/// cgroup), the locked-memory limit, the offload directory's free space.
pub fn budgets(gpu_mem: Option<u64>, host_mem: Option<u64>, offload_dir: &Path) -> Result<Capacity> {
    let here = tier_cuda::probe().ok().flatten();
    // Without a GPU here the plan is for another machine: this one's
    // locked-memory limit says nothing of it.
    let pinnable = if here.is_some() { runtime::plan::memlock_limit() } else { u64::MAX };
    let gpu = match (gpu_mem, here) {
        (Some(g), Some(info)) => g.min(info.total_mem.saturating_sub(CONTEXT_RESERVE)),
        (Some(g), None) => g,
        (None, Some(info)) => info.total_mem.saturating_sub(CONTEXT_RESERVE),
        (None, None) => {
            return Err(Error::InvalidArgument(format!(
                "no GPU here ({}): give --gpu-mem SIZE to plan for a GPU of that size",
                tier_cuda::probe_message()
            )))
        }
    };
    let avail = runtime::memory::host_budget_bytes().unwrap_or(0);
    let host = host_mem.unwrap_or(avail);
    Ok(Capacity { gpu, host, pinnable, disk: runtime::plan::disk_free(offload_dir).unwrap_or(0) })
}

/// The page-locked kind pinned weights get: `--host-memory`, else the
/// platform's choice (registered where a driver can lock memory).
pub fn host_kind(arg: Option<&str>) -> Result<HostMemKind> {
    match arg {
        Some(s) => s.parse::<HostMemKind>().map_err(|e| Error::InvalidArgument(e.to_string())),
        None => match <HostMemKind as tier_host::HostMemKindExt>::choose(None) {
            Ok(c) if c.kind == HostMemKind::Pageable && tier_cuda::probe().ok().flatten().is_none() => {
                // No driver here: plan as the GPU machine would run, registered.
                Ok(HostMemKind::Registered)
            }
            Ok(c) => Ok(c.kind),
            Err(e) => Err(Error::Tier(e)),
        },
    }
}

fn percent_pin(p: &Option<Vec<f64>>) -> Result<Option<[f64; 6]>> {
    match p {
        None => Ok(None),
        Some(v) => match <[f64; 6]>::try_from(v.as_slice()) {
            Ok(a) => Ok(Some(a)),
            Err(_) => Err(Error::InvalidArgument(format!("--percent takes six numbers, got {}", v.len()))),
        },
    }
}

/// The report `--json` prints.
#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub model: String,
    pub prompts: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub objective: String,
    pub budgets: Budgets,
    pub rates_from: String,
    pub flags: String,
    pub host_memory: String,
    pub prediction: Prediction,
    pub runners_up: Vec<RunnerUp>,
    pub candidates_evaluated: usize,
    pub search_ms: f64,
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Budgets {
    pub gpu: u64,
    pub host: u64,
    pub pinnable: u64,
    pub disk: u64,
}

#[derive(Debug, Serialize)]
pub struct RunnerUp {
    pub flags: String,
    pub total_tokens_per_s: f64,
    pub decode_tokens_per_s: Option<f64>,
    pub why_lost: String,
}

fn gb(b: f64) -> String {
    format!("{:.2} GB", b / 1e9)
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn tier_line(what: &str, t: &TierBytes) -> String {
    format!(
        "  {what:<12} GPU {:>11}  pinned {:>11}  pageable {:>11}  disk {:>11}\n",
        gib(t.gpu),
        gib(t.pinned),
        gib(t.pageable),
        gib(t.disk)
    )
}

fn footprint_text(fp: &Footprint) -> String {
    let mut s = String::new();
    for (what, t) in [
        ("weights", fp.weights),
        ("KV cache", fp.cache),
        ("activations", fp.activations),
        ("buffers", fp.buffers),
        ("total", fp.total()),
    ] {
        s += &tier_line(what, &t);
    }
    s
}

fn links_text(what: &str, c: &StepCost) -> String {
    let b: &LinkBytes = &c.bytes;
    let t = &c.stages;
    format!(
        "  {what}: {:.4} s, bound by {}\n    PCIe host→GPU {} ({:.4} s; DMA {}, relay {}, from disk {}), GPU→host {} ({:.4} s)\n    \
         disk read {} + write {} ({:.4} s); GPU {:.2} TFLOP and {} of memory traffic ({:.4} s); CPU attention reads {} ({:.4} s)\n",
        c.seconds,
        c.bound,
        gb(b.h2d()),
        t.h2d,
        gb(b.h2d_dma),
        gb(b.h2d_relay),
        gb(b.h2d_staged),
        gb(b.d2h()),
        t.d2h,
        gb(b.disk_read),
        gb(b.disk_write),
        t.disk,
        b.gpu_flop / 1e12,
        gb(b.gpu_mem),
        t.gpu,
        gb(b.host_mem),
        t.cpu,
    )
}

/// The chosen policy's prediction in one line, for `bench` and `generate`.
pub fn prediction_line(p: &Prediction) -> String {
    format!(
        "prefill {:.1} token/s, decode {}, total {:.1} token/s (decode bound by {})",
        p.prefill_tokens_per_s,
        p.decode_tokens_per_s.map_or("n/a".to_string(), |d| format!("{d:.1} token/s")),
        p.total_tokens_per_s,
        p.decode_step.bound
    )
}

/// Runs the search for `args` and returns its outcome, the budgets and where
/// the rates came from.
pub fn choose(args: &PlanArgs) -> Result<(Outcome, Capacity, String, f64)> {
    if args.num_prompts == 0 || args.prompt_len == 0 || args.gen_len == 0 {
        return Err(Error::InvalidArgument("--num-prompts, --prompt-len and --gen-len must be at least 1".into()));
    }
    let planned = planned_model(&args.model)?;
    let seq = args.prompt_len.saturating_add(args.gen_len);
    if seq > planned.max_positions {
        return Err(Error::InvalidArgument(format!(
            "--prompt-len {} + --gen-len {} exceed the model's {} positions",
            args.prompt_len, args.gen_len, planned.max_positions
        )));
    }
    let percent = percent_pin(&args.percent)?;
    check_family_pins(&planned, percent)?;
    for (flag, v) in [("--gpu-batch-size", args.gpu_batch_size), ("--num-gpu-batches", args.num_gpu_batches)] {
        if v == Some(0) {
            return Err(Error::InvalidArgument(format!("{flag} must be at least 1")));
        }
    }
    super::bench::check_block(args.gpu_batch_size.unwrap_or(1), args.num_gpu_batches.unwrap_or(1))?;
    if args.num_prompts > runtime::search::MAX_BLOCK.saturating_mul(1024) {
        return Err(Error::InvalidArgument(format!("--num-prompts {} is too many", args.num_prompts)));
    }
    let spec = planned.spec;
    let offload_dir = args.offload_dir.clone().unwrap_or_else(std::env::temp_dir);
    let cap = budgets(args.gpu_mem, args.host_mem, &offload_dir)?;
    let loaded = calibrate::load(&offload_dir, args.calibration.as_deref(), false)?;
    let from = match &loaded.path {
        Some(p) if loaded.fresh => format!("measured now, cached in {}", p.display()),
        Some(p) => p.display().to_string(),
        None => "measured now".to_string(),
    };
    let req = Request {
        spec: &spec,
        work: Workload { prompt_len: args.prompt_len, gen_len: args.gen_len },
        prompts: args.num_prompts,
        cap,
        rates: loaded.calibration.rates,
        objective: args.objective,
        compress: args.compress,
        host: host_kind(args.host_memory.as_deref())?,
        pins: Pins {
            gpu_batch_size: args.gpu_batch_size,
            num_gpu_batches: args.num_gpu_batches,
            percent,
            pin_weight: args.pin_weight,
            cpu_cache_compute: args.cpu_cache_compute,
            sep_layer: args.sep_layer,
            act: planned.act,
        },
    };
    let t = Instant::now();
    let out = search(&req)?;
    Ok((out, cap, from, t.elapsed().as_secs_f64() * 1e3))
}

/// Runs `tierlm plan`.
pub fn run(args: PlanArgs) -> Result<()> {
    let (out, cap, from, ms) = choose(&args)?;
    let best: &Choice = &out.best;
    let report = PlanReport {
        model: args.model.clone(),
        prompts: args.num_prompts,
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
        objective: args.objective.to_string(),
        budgets: Budgets { gpu: cap.gpu, host: cap.host, pinnable: cap.pinnable, disk: cap.disk },
        rates_from: from,
        flags: best.flags(),
        host_memory: best.host.to_string(),
        prediction: best.prediction.clone(),
        runners_up: out
            .runners_up
            .iter()
            .map(|(c, why)| RunnerUp {
                flags: c.flags(),
                total_tokens_per_s: c.prediction.total_tokens_per_s,
                decode_tokens_per_s: c.prediction.decode_tokens_per_s,
                why_lost: why.clone(),
            })
            .collect(),
        candidates_evaluated: out.evaluated,
        search_ms: ms,
        note: out.note.clone(),
    };
    let mut stdout = std::io::stdout().lock();
    let stdout_err = |e: std::io::Error| Error::io("<stdout>", e);
    if args.json {
        let line =
            serde_json::to_string(&report).map_err(|source| Error::Json { path: PathBuf::from("<stdout>"), source })?;
        return writeln!(stdout, "{line}").map_err(stdout_err);
    }
    let p = &best.prediction;
    let mut s = format!(
        "model: {}; {} prompts, prompt_len {}, gen_len {}; objective {}\n\
         budgets: GPU {}, host {}, disk {} (locked-memory limit {})\n\
         rates: {}\n\
         chosen: tierlm bench --model {} --prompt-len {} --gen-len {} {}\n\
         (streamed weights in {} host memory; {} block{} of {} prompts)\n\
         predicted: {}\n\
         predicted time: prefill {:.3} s, decode {:.3} s\n\
         bytes per tier:\n{}\
         per link, per step of one block:\n{}{}",
        report.model,
        report.prompts,
        report.prompt_len,
        report.gen_len,
        report.objective,
        gib(cap.gpu),
        gib(cap.host),
        gib(cap.disk),
        if cap.pinnable == u64::MAX { "unlimited".to_string() } else { gib(cap.pinnable) },
        report.rates_from,
        report.model,
        report.prompt_len,
        report.gen_len,
        report.flags,
        report.host_memory,
        p.blocks,
        if p.blocks == 1 { "" } else { "s" },
        best.policy.block_size(),
        prediction_line(p),
        p.prefill_s,
        p.decode_s,
        footprint_text(&p.footprint),
        links_text("prefill", &p.prefill),
        links_text("decode (mid-generation)", &p.decode_step),
    );
    if let Some(n) = &out.note {
        s += &format!("note: {n}\n");
    }
    if report.runners_up.is_empty() {
        s += "no other candidate fits\n";
    } else {
        s += "next candidates:\n";
        for (i, r) in report.runners_up.iter().enumerate() {
            s += &format!("  {}. {}\n     {}\n", i + 2, r.flags, r.why_lost);
        }
    }
    s += &format!("searched {} candidates in {:.1} ms\n", out.evaluated, ms);
    stdout.write_all(s.as_bytes()).map_err(stdout_err)
}

/// For a refusal of the placement check: the nearest policy that fits
/// (the same block and flags, the percentages searched; else anything),
/// with its prediction, from cached or nominal rates (never measured here).
/// `fixed`: for a family whose GPU engine fixes the activations' tier, the
/// refused policy's cache and activation shares (GPU, CPU, GPU, CPU), of
/// which only the activations' are kept (the cache is searched).
pub fn nearest_fit(
    spec: &runtime::spec::ModelSpec,
    policy: &runtime::policy::Policy,
    work: Workload,
    cap: Capacity,
    offload_dir: &Path,
    fixed: Option<[f64; 4]>,
) -> Option<String> {
    let act = fixed.map(|[_, _, ag, ac]| [ag, ac]);
    let rates = cached_rates(offload_dir);
    let host = host_kind(None).ok()?;
    let mut req = Request {
        spec,
        work,
        prompts: policy.block_size(),
        cap,
        rates,
        objective: Objective::Total,
        compress: CompressMode::of_policy(policy),
        host,
        pins: Pins {
            gpu_batch_size: Some(policy.gpu_batch_size),
            num_gpu_batches: Some(policy.num_gpu_batches),
            pin_weight: Some(policy.pin_weight),
            cpu_cache_compute: Some(policy.cpu_cache_compute),
            sep_layer: Some(policy.sep_layer),
            percent: None,
            act,
        },
    };
    let found = search(&req).or_else(|_| {
        req.pins = Pins { act, ..Pins::default() };
        search(&req)
    });
    let c = found.ok()?.best;
    Some(format!(
        "the nearest policy that fits (from the cost model): {} — predicted {}",
        c.flags(),
        prediction_line(&c.prediction)
    ))
}

/// This machine's cached rates (or `TIERLM_CALIBRATION`'s), else the
/// nominal ones; never measures.
pub fn cached_rates(offload_dir: &Path) -> runtime::cost::Rates {
    if let Some(p) = std::env::var_os(calibrate::CALIBRATION_ENV).filter(|v| !v.is_empty()) {
        if let Ok(c) = calibrate::read_fixed(Path::new(&p)) {
            return c.rates;
        }
    }
    let id = calibrate::machine_id(offload_dir);
    calibrate::cache_file(&id)
        .and_then(|p| calibrate::read_cached(&p, &id).ok())
        .map_or(runtime::cost::Rates::NOMINAL, |c| c.rates)
}
