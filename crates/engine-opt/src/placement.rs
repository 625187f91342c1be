//! Where a policy puts every byte, worked out before any byte is allocated.
//!
//! [`footprint`] counts, for a model, a policy and a workload, the bytes of
//! weights, KV cache, activations and the engine's own buffers on each tier
//! (GPU, pinned host, pageable host, disk). [`check`] compares them with what
//! the machine has and, when the policy does not fit, refuses it with the
//! bytes each tier would need and FlexGen's advice in its order (unpin the
//! weights, compress them, move them to disk), saying which of those would
//! make it fit — computed with the same exact accounting, not guessed.

use std::fmt;

use crate::config::{OptConfig, F16_BYTES};
use crate::error::{Error, Result};
use crate::policy::Policy;

/// Bytes a 4-bit value takes with group size 64 and an f16 (min, scale)
/// pair per group: the `compression` crate's format, over f16's two bytes.
const COMPRESSED_PER_F16_BYTE: f64 = 0.5625 / 2.0;

/// Pinned staging the GPU tier keeps for pageable and disk paths (its
/// default ring: 16 slots of 8 MiB).
const STAGING_BYTES: u64 = 16 * (8 << 20);

/// Bytes on each tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierBytes {
    pub gpu: u64,
    pub pinned: u64,
    pub pageable: u64,
    pub disk: u64,
}

impl TierBytes {
    /// Host memory of both kinds.
    pub fn host(&self) -> u64 {
        self.pinned + self.pageable
    }
}

impl std::ops::Add for TierBytes {
    type Output = TierBytes;

    fn add(self, o: TierBytes) -> TierBytes {
        TierBytes {
            gpu: self.gpu + o.gpu,
            pinned: self.pinned + o.pinned,
            pageable: self.pageable + o.pageable,
            disk: self.disk + o.disk,
        }
    }
}

/// What a generation needs, by kind of tensor and tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub weights: TierBytes,
    pub cache: TierBytes,
    pub activations: TierBytes,
    /// The engine's own: GPU weight slots and cache buffers, compute
    /// workspace, pinned staging.
    pub buffers: TierBytes,
}

impl Footprint {
    pub fn total(&self) -> TierBytes {
        self.weights + self.cache + self.activations + self.buffers
    }
}

/// The shape of the work: prompts of `prompt_len` tokens, `gen_len` new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub prompt_len: usize,
    pub gen_len: usize,
}

/// Whether the engine computes on a GPU, and whether host memory can be pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    pub gpu_compute: bool,
    pub can_pin: bool,
}

fn share(total: u64, percent: f64) -> u64 {
    (total as f64 * percent / 100.0).round() as u64
}

/// Splits `total` by GPU and CPU percentages (the rest to disk), host bytes
/// pinned or pageable.
fn split(total: u64, gpu: f64, cpu: f64, pinned: bool) -> TierBytes {
    let g = share(total, gpu);
    let c = share(total, cpu).min(total - g);
    let (pinned, pageable) = if pinned { (c, 0) } else { (0, c) };
    TierBytes { gpu: g, pinned, pageable, disk: total - g - c }
}

/// Counts the bytes `policy` places on each tier for `config` and `work`.
///
/// Weights split by the percentages exactly (tierlm splits tensors rather
/// than placing whole ones); 2-D weights shrink to 0.5625 bytes a value when
/// compressed, 1-D ones never do. The KV cache holds `block × (prompt + gen)`
/// positions, split in whole sequences; it is never pinned on the host
/// (FlexGen's choice: pinned cache would lock tens of gigabytes). When the
/// GPU computes on weights that live elsewhere, it needs four layers' slots
/// ([`crate::gpu::offload::MAX_SLOTS`]), for a cache that lives elsewhere
/// two slots of one GPU batch's layer, and a pinned staging ring.
pub fn footprint(config: &OptConfig, policy: &Policy, work: Workload, machine: Machine) -> Footprint {
    let h = config.hidden_size as u64;
    let f = config.ffn_dim as u64;
    let layers = config.num_hidden_layers.max(1) as u64;
    let block = policy.block_size();
    let seq = work.prompt_len + work.gen_len;

    // Weights: 2-D matrices (embeddings, projections, MLP) and 1-D vectors.
    let all = config.param_count() * F16_BYTES;
    let layer_matrices = (4 * h * h + 2 * h * f) * F16_BYTES;
    let layer_all = config.layer_param_count() * F16_BYTES;
    let embed = all.saturating_sub(layers * layer_all);
    let matrices = layers * layer_matrices + embed;
    let vectors = all - matrices;
    let weight_total =
        if policy.compress_weight { (matrices as f64 * COMPRESSED_PER_F16_BYTE).ceil() as u64 + vectors } else { all };
    let pin = policy.pin_weight && machine.can_pin;
    let weights = split(weight_total, policy.w_gpu_percent, policy.w_cpu_percent, pin);

    // KV cache.
    let cache_f16 = config.kv_cache_bytes(block, seq);
    let cache_total =
        if policy.compress_cache { (cache_f16 as f64 * COMPRESSED_PER_F16_BYTE).ceil() as u64 } else { cache_f16 };
    let cache = split(cache_total, policy.cache_gpu_percent, policy.cache_cpu_percent, false);

    // Hidden states between layers: the largest is the prefill's.
    let hidden = config.activation_bytes(block, work.prompt_len);
    let activations = split(hidden, policy.act_gpu_percent, policy.act_cpu_percent, false);

    // The engine's buffers.
    let mut buffers = TierBytes::default();
    let gbs = policy.gpu_batch_size as u64;
    let heads = config.num_attention_heads as u64;
    let p = work.prompt_len as u64;
    // Workspace for one GPU batch of one layer at prefill: q, k, v, attention
    // output (f16), the f32 scores of every head, and the MLP's inner activations.
    let workspace = gbs * p * h * F16_BYTES * 4 + gbs * heads * p * p * 4 + gbs * p * f * F16_BYTES;
    if machine.gpu_compute {
        buffers.gpu += workspace;
        let off_gpu_weights = weight_total - weights.gpu;
        if off_gpu_weights > 0 {
            // Whole layers stream through four slots (packed when
            // compressed, with one f16 layer to unpack into).
            let slot = if policy.compress_weight {
                (layer_matrices as f64 * COMPRESSED_PER_F16_BYTE).ceil() as u64 + (layer_all - layer_matrices)
            } else {
                layer_all
            };
            buffers.gpu += crate::gpu::offload::MAX_SLOTS as u64 * slot;
            if policy.compress_weight {
                buffers.gpu += layer_all;
            }
        }
        let cache_off_gpu = cache_total - cache.gpu;
        if cache_off_gpu > 0 {
            // Two slots of one GPU batch's cache of one layer, loading beside
            // computing (the prefill goes through them with
            // --cpu-cache-compute too).
            let one = 2 * gbs * seq as u64 * h * F16_BYTES;
            buffers.gpu += 2 * one;
            if policy.compress_cache {
                // The 4-bit cache's GPU scratch: one layer-batch unpacked
                // (f16) and packed.
                buffers.gpu += one + (one as f64 * COMPRESSED_PER_F16_BYTE).ceil() as u64;
            }
        }
        if policy.act_gpu_percent < 100.0 {
            // Hidden states off the GPU are loaded into one buffer the
            // block's batches share (f32 and an f16 copy).
            buffers.gpu += gbs * work.prompt_len as u64 * h * (4 + F16_BYTES);
        }
        let relay = weights.pageable + weights.disk + cache.pageable + cache.disk + activations.disk;
        if relay > 0 {
            buffers.pinned += STAGING_BYTES;
        }
    } else {
        buffers.pageable += workspace;
    }
    Footprint { weights, cache, activations, buffers }
}

/// What the machine has for the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// GPU memory the engine may use (`--gpu-mem`, else what is free).
    pub gpu: u64,
    /// Host memory available (MemAvailable).
    pub host: u64,
    /// Host memory that may be page-locked (RLIMIT_MEMLOCK; `u64::MAX` when unlimited).
    pub pinnable: u64,
    /// Free space in the offload directory.
    pub disk: u64,
}

/// The locked-memory limit (RLIMIT_MEMLOCK) from `/proc/self/limits`, in
/// bytes; `u64::MAX` when unlimited or unreadable (the allocation itself
/// then says so).
pub fn memlock_limit() -> u64 {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<u64>().ok())
        .unwrap_or(u64::MAX)
}

/// Free bytes (for an unprivileged user) of the file system holding `dir`,
/// by statvfs; `None` where it cannot be asked.
pub fn disk_free(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    // A directory the run will create: ask the file system of its nearest
    // existing ancestor (`offload` in the current directory: `.`).
    let existing = dir.ancestors().find(|a| !a.as_os_str().is_empty() && a.exists());
    let dir = existing.unwrap_or(std::path::Path::new("."));
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call and
    // `st` has room for one `statvfs`, which the call fills on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // c_ulong is not u64 on every target
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl Capacity {
    /// What this machine has: `gpu` bytes for the engine (the driver's free
    /// memory or `--gpu-mem`), MemAvailable, RLIMIT_MEMLOCK and the offload
    /// directory's free space (0 where the directory cannot be asked).
    pub fn of_machine(gpu: u64, offload_dir: &std::path::Path) -> Capacity {
        Capacity {
            gpu,
            host: crate::memory::available_bytes().unwrap_or(0),
            pinnable: memlock_limit(),
            disk: disk_free(offload_dir).unwrap_or(0),
        }
    }
}

/// Which tiers a footprint overruns, as (tier, needed, available).
pub fn overruns(total: &TierBytes, cap: &Capacity) -> Vec<(&'static str, u64, u64)> {
    let mut out = Vec::new();
    if total.gpu > cap.gpu {
        out.push(("GPU", total.gpu, cap.gpu));
    }
    if total.host() > cap.host {
        out.push(("host", total.host(), cap.host));
    }
    if total.pinned > cap.pinnable {
        out.push(("pinned host (locked-memory limit)", total.pinned, cap.pinnable));
    }
    if total.disk > cap.disk {
        out.push(("disk", total.disk, cap.disk));
    }
    out
}

/// One of FlexGen's remedies, and what it would need.
#[derive(Debug, Clone, PartialEq)]
pub struct Remedy {
    pub flag: &'static str,
    pub total: TierBytes,
    pub fits: bool,
}

/// A change to a policy.
type Adjust = fn(&mut Policy);

/// The remedies in FlexGen's order, each applied on top of the ones before
/// it (as its README advises: unpin, then compress, then weights to disk).
pub fn remedies(config: &OptConfig, policy: &Policy, work: Workload, machine: Machine, cap: &Capacity) -> Vec<Remedy> {
    let mut p = policy.clone();
    let mut out = Vec::new();
    let steps: [(&'static str, Adjust); 3] = [
        ("--pin-weight 0", |p| p.pin_weight = false),
        ("--compress-weight", |p| p.compress_weight = true),
        ("weights on disk (--percent 0 0 with the cache and activation shares kept)", |p| {
            p.w_gpu_percent = 0.0;
            p.w_cpu_percent = 0.0;
        }),
    ];
    for (flag, apply) in steps {
        apply(&mut p);
        let total = footprint(config, &p, work, machine).total();
        out.push(Remedy { flag, fits: overruns(&total, cap).is_empty(), total });
    }
    out
}

/// A refused policy's report: what each tier would need and what would help.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub footprint: Footprint,
    pub overruns: Vec<(&'static str, u64, u64)>,
    pub remedies: Vec<Remedy>,
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the policy does not fit this machine:")?;
        for (tier, need, have) in &self.overruns {
            writeln!(f, "  {tier}: needs {}, has {}", gib(*need), gib(*have))?;
        }
        let fp = &self.footprint;
        for (what, t) in
            [("weights", fp.weights), ("KV cache", fp.cache), ("activations", fp.activations), ("buffers", fp.buffers)]
        {
            writeln!(
                f,
                "  {what:<12} GPU {:>11}  pinned {:>11}  pageable {:>11}  disk {:>11}",
                gib(t.gpu),
                gib(t.pinned),
                gib(t.pageable),
                gib(t.disk)
            )?;
        }
        writeln!(f, "what would help, in FlexGen's order (each on top of the ones before):")?;
        for (i, r) in self.remedies.iter().enumerate() {
            writeln!(
                f,
                "  {}. {}: {} (GPU {}, host {}, disk {})",
                i + 1,
                r.flag,
                if r.fits { "fits" } else { "still does not fit" },
                gib(r.total.gpu),
                gib(r.total.host()),
                gib(r.total.disk)
            )?;
        }
        if !self.remedies.iter().any(|r| r.fits) {
            write!(
                f,
                "none of them is enough: lower --gpu-batch-size or --num-gpu-batches, or move the KV cache to disk"
            )?;
        }
        Ok(())
    }
}

/// Refuses a policy that does not fit `cap`, before anything is allocated.
pub fn check(
    config: &OptConfig,
    policy: &Policy,
    work: Workload,
    machine: Machine,
    cap: &Capacity,
) -> Result<Footprint> {
    let fp = footprint(config, policy, work, machine);
    let over = overruns(&fp.total(), cap);
    if over.is_empty() {
        return Ok(fp);
    }
    let refusal = Refusal { footprint: fp, overruns: over, remedies: remedies(config, policy, work, machine, cap) };
    Err(Error::PolicyDoesNotFit(refusal.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str) -> OptConfig {
        match OptConfig::preset(name) {
            Some(c) => c,
            None => panic!("preset {name}"),
        }
    }

    const GPU: Machine = Machine { gpu_compute: true, can_pin: true };
    const WORK: Workload = Workload { prompt_len: 512, gen_len: 32 };
    const GIB: u64 = 1 << 30;

    fn policy(percent: [f64; 6], gbs: usize, nb: usize) -> Policy {
        match (Policy { gpu_batch_size: gbs, num_gpu_batches: nb, ..Policy::default() }).with_percent(&percent) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn every_byte_is_placed_once() {
        let c = preset("opt-30b");
        let p = policy([20.0, 50.0, 30.0, 30.0, 100.0, 0.0], 32, 2);
        let fp = footprint(&c, &p, WORK, GPU);
        let w = fp.weights;
        assert_eq!(w.gpu + w.pinned + w.pageable + w.disk, c.weight_bytes());
        assert_eq!(w.pageable, 0, "weights pinned by default");
        let k = fp.cache;
        assert_eq!(k.gpu + k.pageable + k.disk, c.kv_cache_bytes(64, 544));
        assert_eq!(k.pinned, 0, "the cache is never pinned");
        // 20% of 55.8 GB on the GPU, within a byte of rounding.
        assert!((w.gpu as f64 / c.weight_bytes() as f64 - 0.2).abs() < 1e-9);
        assert!(fp.buffers.pinned > 0, "disk and pageable paths need the staging ring");
    }

    #[test]
    fn compression_shrinks_matrices_not_vectors() {
        let c = preset("opt-6.7b");
        let plain = footprint(&c, &policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 32, 1), WORK, GPU);
        let mut p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 32, 1);
        p.compress_weight = true;
        p.compress_cache = true;
        let packed = footprint(&c, &p, WORK, GPU);
        let ratio = packed.weights.gpu as f64 / plain.weights.gpu as f64;
        assert!(ratio > 0.28125 && ratio < 0.2815, "ratio {ratio}");
        assert_eq!(packed.cache.gpu, (plain.cache.gpu as f64 * 0.28125).ceil() as u64);
    }

    #[test]
    fn all_on_gpu_needs_no_staging() {
        let c = preset("opt-6.7b");
        let fp = footprint(&c, &policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 32, 1), WORK, GPU);
        assert_eq!(fp.total().host(), 0);
        assert_eq!(fp.total().disk, 0);
        // FlexLLMGen's peak for this case was 23.0 GB; the count is of that order.
        let gpu = fp.total().gpu as f64 / 1e9;
        assert!((15.0..30.0).contains(&gpu), "{gpu} GB");
    }

    #[test]
    fn a_policy_that_does_not_fit_is_refused_with_advice() {
        // OPT-30B weights on the host of a machine with 40 GiB: the weights
        // alone (55.8 GB) do not fit; compressing them (≈ 15.7 GB) does.
        let c = preset("opt-30b");
        let p = policy([0.0, 100.0, 100.0, 0.0, 100.0, 0.0], 32, 2);
        let cap = Capacity { gpu: 78 * GIB, host: 40 * GIB, pinnable: u64::MAX, disk: 500 * GIB };
        let err = match check(&c, &p, WORK, GPU, &cap) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("should not fit"),
        };
        assert!(err.contains("host: needs"), "{err}");
        assert!(err.contains("1. --pin-weight 0: still does not fit"), "{err}");
        assert!(err.contains("2. --compress-weight: fits"), "{err}");
        // With enough host memory it passes and says what it placed.
        let roomy = Capacity { host: 100 * GIB, ..cap };
        assert!(check(&c, &p, WORK, GPU, &roomy).is_ok());
    }

    #[test]
    fn unpinning_helps_only_against_the_locked_memory_limit() {
        let c = preset("opt-6.7b");
        let p = policy([0.0, 100.0, 100.0, 0.0, 100.0, 0.0], 32, 1);
        let cap = Capacity { gpu: 78 * GIB, host: 100 * GIB, pinnable: 4 * GIB, disk: 500 * GIB };
        let r = remedies(&c, &p, WORK, GPU, &cap);
        assert_eq!(r[0].flag, "--pin-weight 0");
        assert!(r[0].fits, "pageable weights avoid the locked-memory limit");
        let err = match check(&c, &p, WORK, GPU, &cap) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("the locked-memory limit is exceeded"),
        };
        assert!(err.contains("locked-memory limit"), "{err}");
    }

    #[test]
    fn this_machine_has_some_of_everything() {
        let cap = Capacity::of_machine(GIB, &std::env::temp_dir());
        assert!(cap.host > 0, "MemAvailable");
        assert!(cap.disk > 0, "statvfs of the temporary directory");
        assert!(cap.pinnable > 0);
        // A directory the run will make counts its parent's file system
        // (the offload directory is created after the placement check).
        let later = std::env::temp_dir().join("tierlm-not-made-yet/offload");
        assert!(!later.exists());
        assert!(disk_free(&later).is_some_and(|b| b > 0), "the nearest existing ancestor is asked");
        assert!(disk_free(std::path::Path::new("not-made-yet-relative")).is_some_and(|b| b > 0));
    }

    #[test]
    fn nothing_helps_when_the_cache_is_too_big() {
        let c = preset("opt-175b");
        let p = policy([0.0, 0.0, 100.0, 0.0, 100.0, 0.0], 64, 8);
        let cap = Capacity { gpu: 16 * GIB, host: 200 * GIB, pinnable: u64::MAX, disk: 1500 * GIB };
        let err = match check(&c, &p, WORK, GPU, &cap) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a 512-prompt block of 512 sequences does not fit 16 GiB"),
        };
        assert!(err.contains("none of them is enough"), "{err}");
    }
}
