//! `tierlm bench` and `tierlm generate` on the GPU engine, when a GPU is
//! there and `--percent` puts any share on it (or asks for what only the
//! GPU engine runs).
//!
//! The benchmark reports FlexLLMGen's three figures, defined as the CPU
//! engine's bench does, beside the GPU memory held, and sets them against
//! the limits of the machine measured in the same run: a decode step must
//! read every weight and the KV cache so far, so its time is at least those
//! bytes over the device-to-device copy bandwidth; the prefill must do its
//! matrix products, so its time is at least their FLOPs over the rate of a
//! large f16 product through the same cuBLASLt.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use half::f16;
use serde::Serialize;

use crate::cli::bench::{bench_prompts, throughput, BenchArgs};
use crate::cli::generate::{read_inputs, GenerateArgs, Input, Outputs};
use engine_opt::config::OptConfig;
use engine_opt::dummy::DummyWeights;
use engine_opt::generation::validate_prompts;
use engine_opt::generation::GenerateOptions;
use engine_opt::gpu::blas::LinearOut;
use engine_opt::gpu::buffer::DevBuf;
use engine_opt::gpu::generation::generate;
use engine_opt::gpu::offload::{split_layers, LayerSplit, OffloadTiers};
use engine_opt::gpu::tiered_cache::{CachePlan, CacheTiers};
use engine_opt::gpu::view::{Mat, MatMut};
use engine_opt::gpu::{driver_err, Gpu, GpuModel, WeightOrigin};
use engine_opt::loading::ModelSpec;
use engine_opt::placement::{Capacity, Machine, Workload};
use engine_opt::policy::Policy;
use engine_opt::progress;
use engine_opt::sampling::{Sampler, SamplingConfig};
use engine_opt::tokenizer::{OptTokenizer, BOS_TOKEN_ID};
use engine_opt::{Error, Result};
use runtime::search::Choice;
use tier_api::Device as _;

/// Whether `policy` puts weights, cache and activations all on the GPU.
pub fn all_on_gpu(policy: &Policy) -> bool {
    policy.w_gpu_percent == 100.0 && policy.cache_gpu_percent == 100.0 && policy.act_gpu_percent == 100.0
}

/// Whether `policy` puts weights partly or wholly off the GPU: the GPU
/// engine streams those weights ([`engine_opt::gpu::offload`]).
pub fn streams_weights(policy: &Policy) -> bool {
    policy.w_gpu_percent < 100.0
}

/// Whether the GPU engine runs `policy` where a GPU is present: every
/// valid placement with anything on the GPU or on disk, `--cpu-cache-compute`
/// and the GPU's flags; placements entirely in host memory stay on the CPU
/// engine (the reference). Activations are kept on the GPU (a
/// batch's hidden states; the policy's activation shares are noted, not
/// honoured).
pub fn takes(policy: &Policy) -> bool {
    let on_disk = policy.disk_percents().iter().any(|&d| d > 0.0);
    policy.validate().is_ok() && (on_disk || policy.cpu_cache_compute || policy.check_cpu_engine().is_err())
}

/// Whether the cache goes through the tiered cache's GPU slots: any of it
/// off the GPU (or the CPU's attention over a host cache), or 4-bit
/// (`--compress-cache`, on whatever tier holds it, the GPU included: each
/// layer is unpacked into a slot before its attention and packed after).
pub fn tiers_cache(policy: &Policy) -> bool {
    policy.cache_gpu_percent < 100.0 || policy.compress_cache
}

/// The cache tiering's share of `CacheReport`: whether it is 4-bit.
fn cache_is_packed(policy: &Policy) -> bool {
    policy.compress_cache
}

/// The cache placement `policy` asks the GPU engine for.
pub fn cache_plan(policy: &Policy) -> CachePlan {
    CachePlan::of_policy(policy)
}

/// The GPU engine's answer to a policy: `None` where it does not take the
/// run (the placement is neither all-GPU nor weights-only offloading, or
/// there is no GPU: the caller keeps its own behaviour), else the run's
/// result.
pub fn try_bench(args: &BenchArgs, policy: &Policy, chosen: Option<&Choice>) -> Option<Result<()>> {
    if policy.validate().is_err() || !takes(policy) {
        return None;
    }
    if let Some(reason) = engine_opt::gpu::unavailable_reason() {
        eprintln!("note: the GPU engine cannot run here ({reason})");
        return None;
    }
    Some(run_bench(args, policy, chosen))
}

/// Refuses the flags this engine does not implement yet.
fn check_flags(policy: &Policy) -> Result<()> {
    cache_plan(policy).validate()?;
    if policy.cpu_cache_compute && policy.cache_cpu_percent < 100.0 {
        eprintln!("note: --cpu-cache-compute: the cache is not all in host memory, attention runs on the GPU");
    }
    Ok(())
}

/// The machine's limits, measured in the run.
#[derive(Debug, Clone, Serialize)]
pub struct Roofline {
    /// Device-to-device copy, bytes read plus bytes written per second.
    pub copy_bytes_per_s: f64,
    /// A `8192 × 8192 × 8192` f16 product (f32 accumulation), FLOP/s.
    pub gemm_flop_per_s: f64,
}

/// Bytes and FLOPs the run must move and do, and the times they bound.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Bytes every decode step reads whatever the cache (weights).
    pub decode_weight_bytes: u64,
    /// Cache bytes read by the first and the last decode step.
    pub decode_cache_bytes_first: u64,
    pub decode_cache_bytes_last: u64,
    /// All decode steps' bytes over the copy bandwidth.
    pub decode_min_s: f64,
    /// Prefill FLOPs (products and attention, as computed).
    pub prefill_flop: f64,
    /// Those over the measured product rate.
    pub prefill_min_s: f64,
    /// prompts × (gen_len − 1) / decode_min_s.
    pub decode_tokens_per_s_limit: Option<f64>,
    /// prompts × gen_len / (prefill_min_s + decode_min_s).
    pub total_tokens_per_s_limit: f64,
}

impl Limits {
    /// The limits of a run of `prompts` prompts whose decode step `i`
    /// (1-based) reads `weight_bytes` and `cache_bytes(prompt_len + i)`, and
    /// whose prefill computes `prefill_flop`, over the rates of `roof`.
    pub fn of(
        weight_bytes: u64,
        cache_bytes: impl Fn(usize) -> u64,
        prefill_flop: f64,
        (prompts, prompt_len, gen_len): (usize, usize, usize),
        roof: &Roofline,
    ) -> Limits {
        let steps = gen_len.saturating_sub(1);
        let decode_bytes: f64 = (1..=steps).map(|i| (weight_bytes + cache_bytes(prompt_len + i)) as f64).sum();
        let decode_min_s = decode_bytes / roof.copy_bytes_per_s;
        let prefill_min_s = prefill_flop / roof.gemm_flop_per_s;
        let n = prompts as f64;
        Limits {
            decode_weight_bytes: weight_bytes,
            decode_cache_bytes_first: if steps > 0 { cache_bytes(prompt_len + 1) } else { 0 },
            decode_cache_bytes_last: if steps > 0 { cache_bytes(prompt_len + steps) } else { 0 },
            decode_min_s,
            prefill_flop,
            prefill_min_s,
            decode_tokens_per_s_limit: (steps > 0).then(|| n * steps as f64 / decode_min_s),
            total_tokens_per_s_limit: n * gen_len as f64 / (prefill_min_s + decode_min_s),
        }
    }
}

/// GPU memory of a run.
#[derive(Debug, Clone, Serialize)]
pub struct GpuMemory {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    /// Hidden states and scratch (products' outputs, scores, logits).
    pub activation_bytes: u64,
    /// The most the engine's buffers held at once (exact, the GPU tier's
    /// account).
    pub peak_held_bytes: u64,
    /// What the driver reported in use at the end beyond the engine's
    /// buffers (CUDA context, libraries' workspaces and kernels).
    pub other_in_use_bytes: u64,
}

/// Where the KV cache was (runs with it off the GPU).
#[derive(Debug, Clone, Serialize)]
pub struct CacheReport {
    /// Shares of each batch's sequences: GPU, host, disk (percent).
    pub percent: [f64; 3],
    /// Decode attention on the CPU over the host cache.
    pub cpu_compute: bool,
    pub attn_sparsity: f64,
    /// Peak bytes of the cache's host and disk tiers.
    pub host_bytes: u64,
    pub disk_bytes: u64,
    /// Bytes of the two GPU slots the cache is loaded into.
    pub slot_bytes: u64,
    /// Bytes moved between the slots and the cache's homes (the timed run
    /// and those before it).
    pub bytes_moved: u64,
}

/// The disk's activity over a window ([`tier_disk::IoWindow`]).
#[derive(Debug, Clone, Serialize)]
pub struct DiskActivityReport {
    pub wall_s: f64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Seconds with at least one operation in flight, and their share.
    pub busy_s: f64,
    pub busy_fraction: f64,
    /// Bytes over the window's wall time, and over its busy time.
    pub bytes_per_s: f64,
    pub busy_bytes_per_s: f64,
    /// Operations in flight: the mean while busy, the most at once.
    pub mean_depth: f64,
    pub peak_in_flight: usize,
}

impl DiskActivityReport {
    fn of(w: &tier_disk::IoWindow) -> Self {
        DiskActivityReport {
            wall_s: w.wall_s,
            bytes_read: w.bytes_read,
            bytes_written: w.bytes_written,
            busy_s: w.busy_s,
            busy_fraction: w.busy_fraction(),
            bytes_per_s: if w.wall_s > 0.0 { (w.bytes_read + w.bytes_written) as f64 / w.wall_s } else { 0.0 },
            busy_bytes_per_s: w.busy_rate(),
            mean_depth: w.mean_depth(),
            peak_in_flight: w.peak_in_flight,
        }
    }
}

/// Watches a run's progress bar and snapshots `disk`'s activity when its
/// first step (the prefill) is done; [`DecodeWatch::finish`] gives the
/// window from there to the end of the run.
struct DecodeWatch {
    disk: std::sync::Arc<tier_disk::DiskDevice>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<tier_disk::IoSnapshot>>,
}

impl DecodeWatch {
    /// `None` (no disk report, the run goes on) where the system gives no
    /// thread for the watch.
    fn start(disk: std::sync::Arc<tier_disk::DiskDevice>, pb: &indicatif::ProgressBar) -> Option<Self> {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, s, pb) = (disk.clone(), stop.clone(), pb.clone());
        let thread = std::thread::Builder::new()
            .name("tierlm-disk-watch".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if pb.position() >= 1 {
                        d.activity().take_peak();
                        return Some(d.activity().snapshot());
                    }
                    std::thread::sleep(std::time::Duration::from_micros(500));
                }
                None
            })
            .ok()?;
        Some(DecodeWatch { disk, stop, thread })
    }

    fn finish(self) -> Option<tier_disk::IoWindow> {
        let end = self.disk.activity().snapshot();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let start = self.thread.join().ok().flatten()?;
        Some(end.since(&start))
    }
}

/// Where the weights were and what streaming them cost (tiered runs).
#[derive(Debug, Clone, Serialize)]
pub struct TierReport {
    /// Decoder layers resident on the GPU (whole layers, the first ones;
    /// embeddings and logits weights stay on the GPU too) and streamed.
    pub layers_gpu: usize,
    pub layers_streamed: usize,
    /// Of each streamed layer's rows, the share in host memory (percent;
    /// the rest on disk).
    pub host_rows_percent: f64,
    /// `pinned`, `registered` or `pageable` for the host rows.
    pub host_memory: Option<String>,
    /// Bytes of weights copied to the GPU each step: in all, from host
    /// memory, from disk.
    pub streamed_bytes_per_step: u64,
    pub host_bytes_per_step: u64,
    pub disk_bytes_per_step: u64,
    /// Copy rates into a GPU slot, bytes per second, measured in the run
    /// through the engine's own routes: a layer's host rows alone, its disk
    /// rows alone, the whole layer (both links at once).
    pub host_copy_bytes_per_s: Option<f64>,
    pub disk_copy_bytes_per_s: Option<f64>,
    pub layer_copy_bytes_per_s: Option<f64>,
    /// The link that bounds a step: `pcie` (every streamed byte crosses it,
    /// at the host rows' rate) or `disk` (the disk rows at the disk's rate).
    pub bounding_link: Option<String>,
    /// prompts / (the bounding link's bytes per step over its rate).
    pub decode_tokens_per_s_stream_limit: Option<f64>,
    /// The disk under the timed run's decode steps (after its prefill):
    /// how long it had operations in flight, at what depth, at what rate
    /// (issue 14: a disk busy all along but slow, or one left idle).
    pub disk_decode: Option<DiskActivityReport>,
    /// The KV cache off the GPU, if it is.
    pub cache: Option<CacheReport>,
    /// Where the streamed weights' start-up went.
    pub weights_startup: Option<engine_opt::gpu::offload::StartupTimes>,
    /// Peak bytes held per tier (the tiers' `MemAccount`s): GPU (the
    /// engine's buffers), pinned host (weights if pinned, plus the GPU
    /// tier's staging ring), pageable host, disk.
    pub peak_gpu_bytes: u64,
    pub peak_pinned_host_bytes: u64,
    pub peak_pageable_host_bytes: u64,
    pub peak_disk_bytes: u64,
    /// Bytes of the two GPU slots.
    pub slot_bytes: u64,
    /// The process's peak resident set.
    pub peak_rss_bytes: Option<u64>,
}

/// The result of a GPU benchmark, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuBenchReport {
    pub model: String,
    pub engine: String,
    pub device: String,
    pub prompts: usize,
    pub gpu_batch_size: usize,
    pub num_gpu_batches: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub percent: [f64; 6],
    pub load_s: f64,
    /// Process start to the first prefill, less the benchmark's own
    /// measurements (roofline, copy rates).
    pub startup_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub total_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: Option<f64>,
    pub total_tokens_per_s: f64,
    pub memory: GpuMemory,
    pub roofline: Roofline,
    pub limits: Limits,
    /// Tiered runs only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiers: Option<TierReport>,
    /// The most each tier held (GPU, page-locked host, pageable host, disk).
    pub peak_per_tier: engine_opt::memory::TierPeaks,
    /// With `--policy auto`: the policy chosen and what the cost model
    /// predicted for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto: Option<AutoReport>,
}

/// The auto policy of a run and its prediction, beside the measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct AutoReport {
    /// The flags that run the policy (`tierlm bench ...`).
    pub flags: String,
    pub predicted_prefill_tokens_per_s: f64,
    pub predicted_decode_tokens_per_s: Option<f64>,
    pub predicted_total_tokens_per_s: f64,
    /// The stage the model says bounds a decode step.
    pub predicted_decode_bound: String,
}

impl AutoReport {
    pub fn of(c: &Choice) -> Self {
        let p = &c.prediction;
        AutoReport {
            flags: c.flags(),
            predicted_prefill_tokens_per_s: p.prefill_tokens_per_s,
            predicted_decode_tokens_per_s: p.decode_tokens_per_s,
            predicted_total_tokens_per_s: p.total_tokens_per_s,
            predicted_decode_bound: p.decode_step.bound.clone(),
        }
    }
}

/// Copy bandwidth and product rate of `gpu`, measured with events: the
/// median of several timed repetitions after a warm-up.
pub fn measure_roofline(gpu: &Gpu) -> Result<Roofline> {
    let ev = |timing| gpu.device().new_event(timing).map_err(engine_opt::gpu::tier_err);
    let time_ms = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        f()?;
        let mut times = Vec::new();
        for _ in 0..7 {
            let (a, b) = (ev(true)?, ev(true)?);
            a.record(gpu.stream()).map_err(|e| driver_err("cuEventRecord", e))?;
            f()?;
            b.record(gpu.stream()).map_err(|e| driver_err("cuEventRecord", e))?;
            b.synchronize().map_err(|e| driver_err("cuEventSynchronize", e))?;
            times.push(f64::from(a.elapsed_ms(&b).map_err(|e| driver_err("cuEventElapsedTime", e))?));
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };

    // 1 GiB copied device to device, random contents.
    const COPY: usize = 1 << 29;
    let (src, dst) = (DevBuf::<f16>::alloc(gpu, COPY)?, DevBuf::<f16>::alloc(gpu, COPY)?);
    gpu.kernels.fill_uniform_f16(gpu, &src, 1, 1.0)?;
    // Both buffers live until the timing has synchronized the stream.
    let copy = || -> Result<()> { Ok(dst.copy_from(gpu.stream(), &src)?) };
    let copy_ms = time_ms(&copy)?;
    drop((src, dst));

    const N: usize = 8192;
    let (a, b, c) =
        (DevBuf::<f16>::alloc(gpu, N * N)?, DevBuf::<f16>::alloc(gpu, N * N)?, DevBuf::<f16>::alloc(gpu, N * N)?);
    gpu.kernels.fill_uniform_f16(gpu, &a, 2, 1.0)?;
    gpu.kernels.fill_uniform_f16(gpu, &b, 3, 1.0)?;
    let gemm = || -> Result<()> {
        let out = LinearOut::F16 { out: MatMut::new(&c, N, N)?, bias: None };
        Ok(gpu.blas.linear(gpu, Mat::new(&a, N, N)?, Mat::new(&b, N, N)?, out, false, false)?)
    };
    let gemm_ms = time_ms(&gemm)?;
    Ok(Roofline {
        copy_bytes_per_s: 2.0 * 2.0 * COPY as f64 / (copy_ms / 1e3),
        gemm_flop_per_s: 2.0 * (N as f64).powi(3) / (gemm_ms / 1e3),
    })
}

/// What the run must move and compute, against the measured limits.
pub fn limits(
    config: &OptConfig,
    model_weight_bytes: u64,
    prompts: usize,
    prompt_len: usize,
    gen_len: usize,
    roof: &Roofline,
) -> Limits {
    let c = config;
    let (h, e, f, v) = (c.hidden_size as f64, c.word_embed_proj_dim() as f64, c.ffn_dim as f64, c.vocab_size as f64);
    let (layers, n) = (c.num_hidden_layers as f64, prompts as f64);
    // Decode reads every weight but the position table (a row a sequence).
    let positions = (c.position_rows() * c.hidden_size * 2) as u64;
    let weight_bytes = model_weight_bytes.saturating_sub(positions);
    // Decode step i (1-based) attends over prompt_len + i cached positions.
    let cache_bytes = |pos: usize| config.kv_cache_bytes(prompts, pos);
    let rows = n * prompt_len as f64;
    let s = prompt_len as f64;
    let mut flop = 2.0 * rows * layers * (4.0 * h * h + 2.0 * h * f);
    flop += layers * 4.0 * n * s * s * h; // QKᵀ and PV over every key, as computed
    flop += 2.0 * n * v * e; // logits of the last positions
    if c.has_projections() {
        flop += 2.0 * rows * h * e;
    }
    Limits::of(weight_bytes, cache_bytes, flop, (prompts, prompt_len, gen_len), roof)
}

fn load_for_bench(args: &BenchArgs, gpu: Gpu) -> Result<(GpuModel, String)> {
    match ModelSpec::parse(&args.model)? {
        ModelSpec::Preset(name, config) => {
            if !args.dummy {
                return Err(Error::InvalidArgument(format!(
                    "{name} is a preset: give a checkpoint directory, or --dummy for random weights"
                )));
            }
            let desc = format!("{name} (dummy weights made on the GPU, seed {})", args.seed);
            Ok((GpuModel::dummy(gpu, config, args.seed)?, desc))
        }
        ModelSpec::Dir(dir) => {
            let config = OptConfig::from_dir(&dir)?;
            let name = dir.display().to_string();
            if args.dummy {
                let desc = format!("{name} (dummy weights made on the GPU, seed {})", args.seed);
                return Ok((GpuModel::dummy(gpu, config, args.seed)?, desc));
            }
            let src = engine_opt::loading::open_checked(&dir, &config)?;
            let pb = progress::bar(engine_opt::model::OptModel::tensor_count(&config), "loading");
            let model = GpuModel::load(gpu, config, &src, &pb)?;
            pb.finish_and_clear();
            Ok((model, name))
        }
    }
}

/// Loads the model for a tiered run: layers split by `policy`'s weight
/// percentages, the off-GPU ones moved to `tiers` as they are made.
fn load_tiered(
    args: &BenchArgs,
    gpu: Gpu,
    config: OptConfig,
    split: LayerSplit,
    tiers: OffloadTiers,
    compress: bool,
) -> Result<(GpuModel, String)> {
    let hidden = indicatif::ProgressBar::hidden();
    match ModelSpec::parse(&args.model)? {
        ModelSpec::Preset(name, _) if !args.dummy => Err(Error::InvalidArgument(format!(
            "{name} is a preset: give a checkpoint directory, or --dummy for random weights"
        ))),
        ModelSpec::Dir(dir) if !args.dummy => {
            let src = engine_opt::loading::open_checked(&dir, &config)?;
            let pb = progress::bar(engine_opt::model::OptModel::tensor_count(&config), "loading");
            let model =
                GpuModel::tiered_with(gpu, config, split, tiers, WeightOrigin::Checkpoint(&src), &pb, compress)?;
            pb.finish_and_clear();
            Ok((model, dir.display().to_string()))
        }
        spec => {
            let name = match spec {
                ModelSpec::Preset(name, _) => name.to_string(),
                ModelSpec::Dir(dir) => dir.display().to_string(),
            };
            let desc = format!("{name} (dummy weights made on the GPU, seed {})", args.seed);
            Ok((
                GpuModel::tiered_with(gpu, config, split, tiers, WeightOrigin::Seeded(args.seed), &hidden, compress)?,
                desc,
            ))
        }
    }
}

/// Refuses a placement that does not fit this machine (the GPU's `free`
/// bytes or `gpu_mem` where less, host memory, the locked-memory limit,
/// the offload directory's disk) before anything is allocated, with
/// FlexGen's advice.
fn check_placement(
    config: &OptConfig,
    policy: &Policy,
    work: Workload,
    free: u64,
    gpu_mem: Option<u64>,
    offload_dir: &std::path::Path,
) -> Result<()> {
    let can_pin = policy.pin_weight
        && <tier_api::HostMemKind as tier_host::HostMemKindExt>::choose(None).map_err(engine_opt::gpu::tier_err)?.kind
            != tier_api::HostMemKind::Pageable;
    let cap = Capacity::of_machine(gpu_capacity(free, gpu_mem), offload_dir);
    let spec = engine_opt::spec::model_spec(config, true)?;
    match engine_opt::placement::check(&spec, policy, work, Machine { gpu_compute: true, can_pin }, &cap) {
        Ok(_) => Ok(()),
        Err(runtime::Error::PolicyDoesNotFit(msg)) => {
            // FlexGen's advice, and the search's: the nearest policy that fits.
            let nearest = crate::cli::plan::nearest_fit(&spec, policy, work, cap, offload_dir, None);
            let msg = match nearest {
                Some(n) => format!("{msg}\n{n}"),
                None => msg,
            };
            Err(runtime::Error::PolicyDoesNotFit(msg).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The GPU memory the engine may plan for: what the driver reports free,
/// or `--gpu-mem` where that is less (the GPU tier's budget is the same
/// figure, so nothing placement admitted is refused later for it).
pub fn gpu_capacity(free: u64, gpu_mem: Option<u64>) -> u64 {
    gpu_mem.map_or(free, |budget| budget.min(free))
}

/// Runs `tierlm bench` on the GPU engine.
pub fn run_bench(args: &BenchArgs, policy: &Policy, chosen: Option<&Choice>) -> Result<()> {
    check_flags(policy)?;
    if args.prompt_len == 0 || args.gen_len == 0 {
        return Err(Error::InvalidArgument("--prompt-len and --gen-len must be at least 1".to_string()));
    }
    let config = match ModelSpec::parse(&args.model)? {
        ModelSpec::Dir(dir) => OptConfig::from_dir(&dir)?,
        ModelSpec::Preset(_, config) => config,
    };
    if args.prompt_len + args.gen_len > config.max_sequence_len() {
        return Err(Error::InvalidArgument(format!(
            "--prompt-len {} + --gen-len {} exceed the model's {} positions",
            args.prompt_len,
            args.gen_len,
            config.max_sequence_len()
        )));
    }
    let gpu = Gpu::new(0)?;
    let device = gpu.device().info().to_string();
    let prompts_n = policy.block_size();
    let need = config.weight_bytes() + config.kv_cache_bytes(prompts_n, args.prompt_len + args.gen_len);
    let (free_mem, total_mem) = gpu.mem_info()?;
    let tiered = streams_weights(policy) || tiers_cache(policy);
    let offload_dir = args.offload_dir.clone().unwrap_or_else(std::env::temp_dir);
    if tiered || args.gpu_mem.is_some() || policy.compress_weight {
        // Refuse what does not fit before anything is allocated (4-bit
        // weights counted packed).
        let work = Workload { prompt_len: args.prompt_len, gen_len: args.gen_len };
        check_placement(&config, policy, work, free_mem, args.gpu_mem, &offload_dir)?;
        gpu.set_budget(args.gpu_mem);
    } else if need > total_mem {
        return Err(Error::Gpu(format!(
            "out of GPU memory: weights and KV cache need {:.1} GiB, the GPU has {:.1} GiB; \
             move weights off the GPU (--percent 0 100 100 0 100 0, or a share of them), compress them \
             (--compress-weight), or use fewer prompts",
            engine_opt::memory::gib(need),
            engine_opt::memory::gib(total_mem)
        )));
    }
    let measuring = Instant::now();
    let roof = measure_roofline(&gpu)?;
    let mut measure_s = measuring.elapsed().as_secs_f64();

    let t = Instant::now();
    let split = split_layers(config.num_hidden_layers, policy.w_gpu_percent, policy.w_cpu_percent);
    // One set of tiers for the run: weights, cache and activations share
    // the host devices, the disk arena and the copy matrix.
    let run_tiers = runtime::Tiers::default();
    let (mut model, description) = if streams_weights(policy) || policy.compress_weight {
        // With every layer on the GPU the split makes no tiers.
        let tiers = OffloadTiers::for_split(&run_tiers, &split, policy.pin_weight, &offload_dir)?;
        load_tiered(args, gpu, config, split, tiers, policy.compress_weight)?
    } else {
        load_for_bench(args, gpu)?
    };
    if tiers_cache(policy) {
        let plan = cache_plan(policy);
        model.place_cache(plan, CacheTiers::for_plan(&run_tiers, &plan, &offload_dir)?)?;
    }
    if let Some(s) = model.offload.as_mut() {
        s.set_sep_layer(policy.sep_layer);
    }
    if policy.act_gpu_percent < 100.0 {
        // Hidden states between layers in host memory or on disk (FlexGen's
        // activation placement: on one tier).
        let on_disk = (policy.act_cpu_percent < 100.0).then_some(offload_dir.as_path());
        model.activations = Some(engine_opt::gpu::model::ActivationTier::new(&run_tiers, on_disk)?);
    }
    let load_s = t.elapsed().as_secs_f64();
    // The copy rates of the engine's routes, measured once loaded.
    let measuring = Instant::now();
    let rates = model.offload.as_ref().map(|s| s.copy_rates()).transpose()?.unwrap_or_default();
    measure_s += measuring.elapsed().as_secs_f64();
    let opts = GenerateOptions { stop_on_eos: false, ..engine_opt::generation::options(args.gen_len) };
    let hidden = indicatif::ProgressBar::hidden();

    // Warm-up, untimed: the timed run's shapes (so that cuBLAS's kernels
    // are loaded and cuBLASLt's plans made), two new tokens.
    let warm =
        bench_prompts(&model.config, policy.num_gpu_batches, policy.gpu_batch_size, args.prompt_len, args.seed ^ 1);
    // Start-up: process start to the first prefill, less the benchmark's
    // own measurements (roofline, copy rates), which a run does not need.
    let startup_s = engine_opt::progress::process_start().elapsed().as_secs_f64() - measure_s;
    generate(&model, &warm, &GenerateOptions { max_new_tokens: args.gen_len.min(2), ..opts.clone() }, None, &hidden)?;

    let prompts =
        bench_prompts(&model.config, policy.num_gpu_batches, policy.gpu_batch_size, args.prompt_len, args.seed);
    let pb = progress::bar(args.gen_len as u64, "generating");
    let disk = model.offload.as_ref().and_then(|s| s.tiers().disk.clone());
    let watch = disk.clone().and_then(|d| DecodeWatch::start(d, &pb));
    let out = generate(&model, &prompts, &opts, None, &pb);
    let disk_decode = watch.and_then(DecodeWatch::finish);
    let out = out?;
    pb.finish_and_clear();

    let tier_report = (model.offload.is_some() || model.cache_streamer.is_some()).then(|| {
        let (host_bytes, disk_bytes) = model.offload.as_ref().map_or((0, 0), |s| s.home_bytes());
        // Every streamed byte crosses PCIe (disk rows through pinned
        // staging), at best at the host rows' DMA rate; the disk rows also
        // cross the disk at its rate. The slower of the two bounds a step.
        let pcie_s = rates.host.or(rates.layer).map_or(0.0, |r| (host_bytes + disk_bytes) as f64 / r);
        let disk_s = rates.disk.map_or(0.0, |r| disk_bytes as f64 / r);
        let (step_s, link) = if disk_s > pcie_s { (disk_s, "disk") } else { (pcie_s, "pcie") };
        let steps = args.gen_len.saturating_sub(1);
        let peaks = model.tier_peaks();
        let w_tiers = model.offload.as_ref().map(|s| s.tiers().clone());
        let split = model.offload.as_ref().map(|s| s.split());
        TierReport {
            layers_gpu: split.map_or(model.config.num_hidden_layers, |s| s.gpu_end),
            layers_streamed: split.map_or(0, |s| s.offloaded()),
            host_rows_percent: split.map_or(0.0, |s| s.host_percent),
            host_memory: w_tiers.as_ref().and_then(|t| t.host.as_ref()).map(|h| h.mem_kind().to_string()),
            streamed_bytes_per_step: host_bytes + disk_bytes,
            host_bytes_per_step: host_bytes,
            disk_bytes_per_step: disk_bytes,
            host_copy_bytes_per_s: rates.host,
            disk_copy_bytes_per_s: rates.disk,
            layer_copy_bytes_per_s: rates.layer,
            bounding_link: (step_s > 0.0).then(|| link.to_string()),
            decode_tokens_per_s_stream_limit: (steps > 0 && step_s > 0.0).then(|| prompts_n as f64 / step_s),
            weights_startup: model.offload.as_ref().map(|s| s.startup),
            disk_decode: disk_decode.as_ref().map(DiskActivityReport::of),
            cache: model.cache_streamer.as_ref().map(|c| {
                let p = c.plan();
                let per_tier = |d: Option<tier_api::MemStats>| d.map_or(0, |s| s.peak_resident);
                CacheReport {
                    percent: [p.gpu_percent, p.cpu_percent, p.disk_percent()],
                    cpu_compute: p.cpu_compute,
                    attn_sparsity: p.attn_sparsity,
                    host_bytes: per_tier(c.tiers().host.as_ref().map(|h| h.stats())),
                    disk_bytes: per_tier(c.tiers().disk.as_ref().map(|d| d.stats())),
                    slot_bytes: c.slot_bytes(),
                    bytes_moved: c.bytes_moved(),
                }
            }),
            peak_gpu_bytes: peaks.gpu,
            peak_pinned_host_bytes: peaks.pinned,
            peak_pageable_host_bytes: peaks.pageable,
            peak_disk_bytes: peaks.disk,
            slot_bytes: model.slot_bytes(),
            peak_rss_bytes: engine_opt::memory::peak_rss_bytes(),
        }
    });
    let (held_now, peak_held) = model.gpu.held_bytes();
    let (free, total) = model.gpu.mem_info()?;
    let other = (total - free).saturating_sub(held_now);
    let (prefill_tput, decode_tput, total_tput) = throughput(prompts_n, args.prompt_len, args.gen_len, &out);
    let weights = model.weight_bytes();
    let report = GpuBenchReport {
        model: description,
        engine: format!(
            "gpu{}{}{}",
            if streams_weights(policy) { ", weights streamed" } else { "" },
            if cache_is_packed(policy) {
                ", cache tiered 4-bit"
            } else if tiers_cache(policy) {
                ", cache tiered"
            } else {
                ""
            },
            if policy.compress_weight { ", 4-bit weights" } else { "" }
        ),
        device,
        prompts: prompts_n,
        gpu_batch_size: policy.gpu_batch_size,
        num_gpu_batches: policy.num_gpu_batches,
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
        percent: policy.percent(),
        load_s,
        startup_s,
        prefill_s: out.prefill_time.as_secs_f64(),
        decode_s: out.decode_time.as_secs_f64(),
        total_s: (out.prefill_time + out.decode_time).as_secs_f64(),
        prefill_tokens_per_s: prefill_tput,
        decode_tokens_per_s: decode_tput,
        total_tokens_per_s: total_tput,
        memory: GpuMemory {
            weights_bytes: weights,
            kv_cache_bytes: out.cache_bytes,
            activation_bytes: out.activation_bytes,
            peak_held_bytes: peak_held,
            other_in_use_bytes: other,
        },
        limits: limits(
            &model.config,
            weights + tier_report.as_ref().map_or(0, |t| t.streamed_bytes_per_step),
            prompts_n,
            args.prompt_len,
            args.gen_len,
            &roof,
        ),
        roofline: roof,
        tiers: tier_report,
        peak_per_tier: model.tier_peaks(),
        auto: chosen.map(AutoReport::of),
    };
    print_report(&report, args.json)?;

    // TIERLM_GPU_PROFILE=1: one more run with every part timed by events.
    if std::env::var_os("TIERLM_GPU_PROFILE").is_some_and(|v| v != "0") {
        model.profiler = Some(engine_opt::gpu::profile::Profiler::default());
        let counted = indicatif::ProgressBar::hidden();
        let watch = disk.clone().and_then(|d| DecodeWatch::start(d, &counted));
        let run = generate(&model, &prompts, &opts, None, &counted);
        let window = watch.and_then(DecodeWatch::finish);
        run?;
        if let Some(w) = window {
            println!("profile run's disk during decode: {w}");
        }
        if let Some(p) = &model.profiler {
            let parts = p.take(&model.gpu)?;
            let mut text = String::from("profile (a separate run, events after every part):\n");
            for ((phase, part), ms) in &parts {
                text.push_str(&format!("  {phase:>8} {part:<18} {ms:>10.2} ms\n"));
            }
            std::io::stdout().write_all(text.as_bytes()).map_err(|e| Error::io("<stdout>", e))?;
        }
    }
    Ok(())
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

fn print_report(r: &GpuBenchReport, json: bool) -> Result<()> {
    let stdout_err = |e: std::io::Error| Error::io("<stdout>", e);
    let mut out = std::io::stdout().lock();
    if json {
        let line =
            serde_json::to_string(r).map_err(|source| Error::Json { path: PathBuf::from("<stdout>"), source })?;
        return writeln!(out, "{line}").map_err(stdout_err);
    }
    let (m, l, roof, p) = (&r.memory, &r.limits, &r.roofline, r.percent);
    let pct = |a: f64, b: f64| 100.0 * a / b;
    let stream_limit = r.tiers.as_ref().and_then(|t| t.decode_tokens_per_s_stream_limit);
    let decode = match (r.decode_tokens_per_s, stream_limit, l.decode_tokens_per_s_limit) {
        // Weights streamed: the copies, not the GPU's memory, bound decode.
        (Some(t), Some(sl), _) => {
            format!("{t:.1} token/s ({:.0}% of the weight-streaming limit, {sl:.1} token/s)", pct(t, sl))
        }
        (Some(t), None, Some(lim)) => {
            format!("{t:.1} token/s ({:.0}% of the bytes limit, {lim:.0} token/s)", pct(t, lim))
        }
        _ => "n/a (gen-len 1)".to_string(),
    };
    let text = format!(
        "model: {}\n\
         engine: GPU{}, {}\n\
         prompts: {} ({} × {}), prompt_len {}, gen_len {}, percent {} {} {} {} {} {}\n\
         load: {:.2} s; start-up (process start to first prefill, benchmark's own measurements excluded) {:.2} s\n\
         prefill: {:.3} s, {:.1} token/s ({:.0}% of the product-rate limit, {:.3} s)\n\
         decode:  {:.3} s, {}\n\
         total:   {:.3} s, {:.1} token/s ({:.0}% of the limit, {:.1} token/s)\n\
         peak GPU memory: {} held by the engine (weights {}, KV cache {}, activations {}), \
         + {} for the CUDA context and libraries\n\
         measured here: device copy {:.0} GB/s (read + write), f16 product 8192³ {:.0} TFLOP/s\n\
         bytes a decode step reads: weights {} + KV cache {} to {}; prefill {:.1} TFLOP\n",
        r.model,
        if r.engine.contains("4-bit") { ", 4-bit weights (dequantized on the GPU a layer at a time)" } else { "" },
        r.device,
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
        r.load_s,
        r.startup_s,
        r.prefill_s,
        r.prefill_tokens_per_s,
        pct(l.prefill_min_s, r.prefill_s),
        l.prefill_min_s,
        r.decode_s,
        decode,
        r.total_s,
        r.total_tokens_per_s,
        pct(r.total_tokens_per_s, l.total_tokens_per_s_limit),
        l.total_tokens_per_s_limit,
        gb(m.peak_held_bytes),
        gb(m.weights_bytes),
        gb(m.kv_cache_bytes),
        gb(m.activation_bytes),
        gb(m.other_in_use_bytes),
        roof.copy_bytes_per_s / 1e9,
        roof.gemm_flop_per_s / 1e12,
        gb(l.decode_weight_bytes),
        gb(l.decode_cache_bytes_first),
        gb(l.decode_cache_bytes_last),
        l.prefill_flop / 1e12,
    );
    out.write_all(text.as_bytes()).map_err(stdout_err)?;
    if let Some(a) = &r.auto {
        let vs = |measured: f64, predicted: f64| format!("{:+.0}%", 100.0 * (measured - predicted) / predicted);
        writeln!(
            out,
            "policy (auto): {}
             predicted by the cost model: prefill {:.1}, decode {}, total {:.1} token/s (decode bound by {});              measured against it: prefill {}, decode {}, total {}",
            a.flags,
            a.predicted_prefill_tokens_per_s,
            a.predicted_decode_tokens_per_s.map_or("n/a".to_string(), |d| format!("{d:.1}")),
            a.predicted_total_tokens_per_s,
            a.predicted_decode_bound,
            vs(r.prefill_tokens_per_s, a.predicted_prefill_tokens_per_s),
            match (r.decode_tokens_per_s, a.predicted_decode_tokens_per_s) {
                (Some(m), Some(p)) => vs(m, p),
                _ => "n/a".to_string(),
            },
            vs(r.total_tokens_per_s, a.predicted_total_tokens_per_s),
        )
        .map_err(stdout_err)?;
    }
    if r.tiers.is_none() {
        writeln!(out, "peak per tier: {}", r.peak_per_tier).map_err(stdout_err)?;
    }
    if let Some(t) = &r.tiers {
        let rate = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.1} GB/s", v / 1e9));
        let limit = match (r.decode_tokens_per_s, t.decode_tokens_per_s_stream_limit) {
            (Some(d), Some(l)) => format!("{l:.1} token/s (decode reaches {:.0}%)", 100.0 * d / l),
            _ => "-".to_string(),
        };
        let text = format!(
            "weights: {} of {} layers resident on the GPU, {} streamed ({:.1}% of their rows in {} host memory, \
             the rest on disk); embeddings and logits weights on the GPU\n\
             streamed per step: {} ({} from host, {} from disk); copy into a GPU slot: host rows {}, \
             disk rows {}, whole layer {}; decode limit from those: {} (bound by {})\n\
             peak per tier: GPU {} (slots {}), pinned host {}, pageable host {}, disk {}; peak RSS {}\n\
             start-up of the streamed weights: homes allocated in {:.2} s, layers made and parked in {:.2} s\n",
            t.layers_gpu,
            t.layers_gpu + t.layers_streamed,
            t.layers_streamed,
            t.host_rows_percent,
            t.host_memory.as_deref().unwrap_or("-"),
            gb(t.streamed_bytes_per_step),
            gb(t.host_bytes_per_step),
            gb(t.disk_bytes_per_step),
            rate(t.host_copy_bytes_per_s),
            rate(t.disk_copy_bytes_per_s),
            rate(t.layer_copy_bytes_per_s),
            limit,
            t.bounding_link.as_deref().unwrap_or("-"),
            gb(t.peak_gpu_bytes),
            gb(t.slot_bytes),
            gb(t.peak_pinned_host_bytes),
            gb(t.peak_pageable_host_bytes),
            gb(t.peak_disk_bytes),
            t.peak_rss_bytes.map_or("-".to_string(), gb),
            t.weights_startup.map_or(0.0, |s| s.homes_s),
            t.weights_startup.map_or(0.0, |s| s.park_s),
        );
        out.write_all(text.as_bytes()).map_err(stdout_err)?;
        if let Some(d) = &t.disk_decode {
            writeln!(
                out,
                "disk during decode: {:.2} GB read in {:.2} s ({:.2} GB/s); busy {:.2} s ({:.0}%), {:.2} GB/s \
                 while busy; operations in flight {:.1} on average while busy, {} at most",
                d.bytes_read as f64 / 1e9,
                d.wall_s,
                d.bytes_per_s / 1e9,
                d.busy_s,
                100.0 * d.busy_fraction,
                d.busy_bytes_per_s / 1e9,
                d.mean_depth,
                d.peak_in_flight,
            )
            .map_err(stdout_err)?;
        }
        if let Some(c) = &t.cache {
            let text = format!(
                "KV cache: sequences {:.0}% GPU, {:.0}% host, {:.0}% disk{}; host {}, disk {}, GPU slots {}; \
                 {} moved between slots and homes\n",
                c.percent[0],
                c.percent[1],
                c.percent[2],
                if c.cpu_compute {
                    format!(", decode attention on the CPU (sparsity {})", c.attn_sparsity)
                } else {
                    String::new()
                },
                gb(c.host_bytes),
                gb(c.disk_bytes),
                gb(c.slot_bytes),
                gb(c.bytes_moved),
            );
            out.write_all(text.as_bytes()).map_err(stdout_err)?;
        }
    }
    Ok(())
}

/// Runs `tierlm generate` on the GPU engine (`--percent 100 0 100 0 100 0`
/// on a machine with a GPU). `--dummy` uploads the CPU generator's weights,
/// so that a seed gives the same model on both engines.
pub fn run_generate(args: &GenerateArgs) -> Result<()> {
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
    let (config, dir) = match ModelSpec::parse(&args.model)? {
        ModelSpec::Dir(dir) => (OptConfig::from_dir(&dir)?, Some(dir)),
        ModelSpec::Preset(name, config) => {
            if !args.dummy {
                return Err(Error::InvalidArgument(format!(
                    "{name} is a preset: give a checkpoint directory, or --dummy for random weights"
                )));
            }
            (config, None)
        }
    };
    let tokenizer = match &dir {
        Some(d) => OptTokenizer::from_dir(d, config.bos_token_id.unwrap_or(BOS_TOKEN_ID))?,
        None => None,
    };
    let prompts: Vec<Vec<u32>> = inputs
        .iter()
        .map(|input| match input {
            Input::Ids(ids) => Ok(ids.clone()),
            Input::Text(text) => match &tokenizer {
                Some(tok) => tok.encode(text),
                None => Err(Error::NoTokenizer { dir: dir.clone().unwrap_or_else(|| PathBuf::from(&args.model)) }),
            },
        })
        .collect::<Result<_>>()?;

    let policy = generate_policy(args)?;
    let gpu = Gpu::new(0)?;
    let pb = progress::bar(engine_opt::model::OptModel::tensor_count(&config), "loading");
    let checkpoint = match (&dir, args.dummy) {
        (Some(d), false) => Some(engine_opt::loading::open_checked(d, &config)?),
        _ => None,
    };
    let dummy = DummyWeights::new(args.seed);
    let src: &dyn engine_opt::weights::WeightSource = match &checkpoint {
        Some(c) => c,
        None => &dummy,
    };
    check_flags(&policy)?;
    let offload_dir = args.offload_dir.clone().unwrap_or_else(std::env::temp_dir);
    // Refuse what does not fit before anything is allocated: the longest
    // prompt and every new token, a batch at a time.
    let (free, _) = gpu.mem_info()?;
    let work = Workload { prompt_len: prompts.iter().map(Vec::len).max().unwrap_or(0), gen_len: args.max_new_tokens };
    check_placement(&config, &policy, work, free, args.gpu_mem, &offload_dir)?;
    gpu.set_budget(args.gpu_mem);
    // One set of tiers for the run (see `bench`).
    let run_tiers = runtime::Tiers::default();
    let mut model = if streams_weights(&policy) || policy.compress_weight {
        // Weights off the GPU (or packed): the same loading as `bench`.
        let split = split_layers(config.num_hidden_layers, policy.w_gpu_percent, policy.w_cpu_percent);
        let tiers = OffloadTiers::for_split(&run_tiers, &split, policy.pin_weight, &offload_dir)?;
        GpuModel::tiered_with(gpu, config, split, tiers, WeightOrigin::Checkpoint(src), &pb, policy.compress_weight)?
    } else {
        GpuModel::load(gpu, config, src, &pb)?
    };
    if tiers_cache(&policy) {
        let plan = cache_plan(&policy);
        model.place_cache(plan, CacheTiers::for_plan(&run_tiers, &plan, &offload_dir)?)?;
    }
    if let Some(s) = model.offload.as_mut() {
        s.set_sep_layer(policy.sep_layer);
    }
    if policy.act_gpu_percent < 100.0 {
        // Hidden states between layers in host memory or on disk (FlexGen's
        // activation placement: on one tier).
        let on_disk = (policy.act_cpu_percent < 100.0).then_some(offload_dir.as_path());
        model.activations = Some(engine_opt::gpu::model::ActivationTier::new(&run_tiers, on_disk)?);
    }
    pb.finish_and_clear();
    validate_prompts(&model.config, &prompts, args.max_new_tokens, 0)?;
    let c = &model.config;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        stop_on_eos: true,
        eos_token_ids: vec![c.eos_token_id.unwrap_or(engine_opt::tokenizer::EOS_TOKEN_ID)],
        pad_token_id: c.pad_token_id.unwrap_or(engine_opt::tokenizer::PAD_TOKEN_ID),
    };
    let mut sampler = Sampler::new(sampling);
    let greedy = sampling.is_greedy();
    let out = Outputs {
        prompts: &prompts,
        inputs: &inputs,
        tokenizer: tokenizer.as_ref().map(OptTokenizer::tokenizer),
        batch_size: args.gpu_batch_size,
        json,
        file: crate::cli::generate::output_file(args)?,
    };
    out.write(
        args.max_new_tokens,
        &mut |batch, pb| {
            let s = if greedy { None } else { Some(&mut sampler) };
            Ok(generate(&model, &[batch.to_vec()], &opts, s, pb)?.tokens)
        },
        &|| model.tier_peaks(),
    )
}

/// The policy `tierlm generate`'s flags ask for (`--percent`, default all
/// on the CPU; `--pin-weight`, default true; `--compress-weight`).
pub fn generate_policy(args: &GenerateArgs) -> Result<Policy> {
    let policy = Policy {
        gpu_batch_size: args.gpu_batch_size,
        num_gpu_batches: 1,
        pin_weight: args.pin_weight.unwrap_or(true),
        compress_weight: args.compress_weight,
        compress_cache: args.compress_cache,
        cpu_cache_compute: args.cpu_cache_compute,
        attn_sparsity: args.attn_sparsity,
        ..Policy::default()
    };
    let policy = match &args.percent {
        Some(p) => policy.with_percent(p)?,
        None => policy,
    };
    policy.validate()?;
    Ok(policy)
}

/// The GPU engine's answer to `tierlm generate --percent ...`: `None` to
/// run on the CPU engine (no `--percent`, or everything on the CPU), the
/// GPU run for `100 0 100 0 100 0` and for weights streamed (`W_GPU W_CPU
/// 100 0 100 0`, the rest of the weights on disk in `--offload-dir`), or
/// the error for a placement neither engine runs.
pub fn try_generate(args: &GenerateArgs) -> Option<Result<()>> {
    let policy = match generate_policy(args) {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    if takes(&policy) && engine_opt::gpu::available() {
        return Some(run_generate(args));
    }
    match policy.check_cpu_engine() {
        Ok(()) => None,
        Err(e) => Some(Err(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_mem_becomes_the_capacity() {
        const GIB: u64 = 1 << 30;
        assert_eq!(gpu_capacity(78 * GIB, None), 78 * GIB);
        assert_eq!(gpu_capacity(78 * GIB, Some(16 * GIB)), 16 * GIB);
        assert_eq!(gpu_capacity(10 * GIB, Some(16 * GIB)), 10 * GIB, "never more than is free");
        // A policy that fits 78 GiB but not 16 is refused with placement's message.
        let config = engine_opt::spec::model_spec(&OptConfig::preset("opt-30b").unwrap(), true).unwrap();
        let policy = Policy::default().with_percent(&[100.0, 0.0, 100.0, 0.0, 100.0, 0.0]).unwrap();
        let work = Workload { prompt_len: 512, gen_len: 32 };
        let machine = Machine { gpu_compute: true, can_pin: true };
        let cap = |gpu| Capacity { gpu, host: 200 * GIB, pinnable: u64::MAX, disk: 1000 * GIB };
        let small =
            engine_opt::placement::check(&config, &policy, work, machine, &cap(gpu_capacity(78 * GIB, Some(GIB))));
        let err = small.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("the policy does not fit this machine"), "{err}");
        let policy = Policy::default().with_percent(&[0.0, 100.0, 100.0, 0.0, 100.0, 0.0]).unwrap();
        let big = engine_opt::placement::check(&config, &policy, work, machine, &cap(gpu_capacity(78 * GIB, None)));
        assert!(big.is_ok(), "{big:?}");
    }
}
