//! `--policy auto`: the search over policies.
//!
//! For a model's spec, a workload and the machine's budgets ([`Capacity`]),
//! [`search`] tries every combination of the choices that change what a
//! run moves — the block's shape (`--gpu-batch-size` × `--num-gpu-batches`),
//! the KV cache's GPU/host/disk shares (a grid of quarters, with
//! `--cpu-cache-compute` where the cache is all in host memory), the
//! activations' tier, whether the streamed weights are page-locked, and
//! 4-bit compression when allowed — and for each places the weights as the
//! engine does: as many whole resident layers as the GPU budget leaves
//! room for, then as large a share of every streamed layer's rows in host
//! memory as the host budget allows, the rest on disk. Each candidate is
//! checked with the plan's own count ([`crate::plan::footprint`] against
//! [`crate::plan::overruns`]), predicted with [`crate::cost::predict`], and
//! the one with the highest predicted throughput (decode or total, as
//! asked) wins; ties go to the candidate with fewer bytes off the GPU.
//!
//! A choice the user makes ([`Pins`]) is kept as given; the search fills
//! the rest. So is the activations' tier of an engine that fixes it
//! ([`Pins::act`]): its cache shares, `--cpu-cache-compute` and 4-bit cache
//! are searched all the same. Compression changes the output, so it is
//! chosen only when allowed ([`CompressMode`]); when nothing fits without
//! it, the error says which compression would make it fit.

use std::fmt::Write as _;
use std::str::FromStr;

use tier_api::HostMemKind;

use crate::cost::{predict, Prediction, Rates, Run};
use crate::error::{Error, Result};
use crate::plan::{footprint, overruns, split_layers, Capacity, Workload};
use crate::policy::Policy;
use crate::spec::ModelSpec;

/// What the search maximises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Objective {
    /// prompts × (gen_len − 1) / decode time.
    Decode,
    /// prompts × gen_len / (prefill + decode time).
    #[default]
    Total,
}

impl FromStr for Objective {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "decode" => Ok(Objective::Decode),
            "total" => Ok(Objective::Total),
            _ => Err(Error::InvalidArgument(format!("--objective {s:?}: expected decode or total"))),
        }
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Objective::Decode => "decode",
            Objective::Total => "total",
        })
    }
}

/// Which compression the search may use (`--compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressMode {
    /// Never (the default: compression changes the output).
    #[default]
    None,
    /// 4-bit weights.
    Weight,
    /// 4-bit KV cache.
    Cache,
    /// Both.
    Both,
    /// Whichever predicts the most.
    Auto,
}

impl FromStr for CompressMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(CompressMode::None),
            "weight" => Ok(CompressMode::Weight),
            "cache" => Ok(CompressMode::Cache),
            "both" => Ok(CompressMode::Both),
            "auto" => Ok(CompressMode::Auto),
            _ => Err(Error::InvalidArgument(format!("--compress {s:?}: expected auto, none, weight, cache or both"))),
        }
    }
}

impl CompressMode {
    /// The (weights, cache) compression choices this mode lets the search try.
    fn options(self) -> &'static [(bool, bool)] {
        match self {
            CompressMode::None => &[(false, false)],
            CompressMode::Weight => &[(true, false)],
            CompressMode::Cache => &[(false, true)],
            CompressMode::Both => &[(true, true)],
            CompressMode::Auto => &[(false, false), (true, false), (false, true), (true, true)],
        }
    }

    /// The mode that asks for exactly the compression `policy` uses.
    pub fn of_policy(policy: &Policy) -> CompressMode {
        CompressMode::of(policy.compress_weight, policy.compress_cache)
    }

    /// The mode that asks for exactly this compression.
    pub fn of(weight: bool, cache: bool) -> CompressMode {
        match (weight, cache) {
            (false, false) => CompressMode::None,
            (true, false) => CompressMode::Weight,
            (false, true) => CompressMode::Cache,
            (true, true) => CompressMode::Both,
        }
    }

    /// The `--compress` value that asks for this mode.
    pub fn flag(self) -> &'static str {
        match self {
            CompressMode::None => "none",
            CompressMode::Weight => "weight",
            CompressMode::Cache => "cache",
            CompressMode::Both => "both",
            CompressMode::Auto => "auto",
        }
    }
}

/// Choices the user made: each is kept as given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pins {
    pub gpu_batch_size: Option<usize>,
    pub num_gpu_batches: Option<usize>,
    /// FlexGen's six percentages.
    pub percent: Option<[f64; 6]>,
    pub pin_weight: Option<bool>,
    pub cpu_cache_compute: Option<bool>,
    pub sep_layer: Option<bool>,
    /// The activations' shares (GPU, CPU), for an engine that keeps its
    /// hidden states on one tier only (the weights, the cache and its
    /// flags still searched; `percent`, where pinned too, must agree).
    pub act: Option<[f64; 2]>,
}

/// What to search for.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub spec: &'a ModelSpec,
    pub work: Workload,
    /// Prompts to generate for (run in blocks of the chosen size).
    pub prompts: usize,
    pub cap: Capacity,
    pub rates: Rates,
    pub objective: Objective,
    pub compress: CompressMode,
    /// The page-locked kind pinned weights get (registered by default;
    /// `Pageable` where nothing can be locked here).
    pub host: HostMemKind,
    pub pins: Pins,
}

/// A policy with its prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub policy: Policy,
    /// The host memory kind of the streamed weights.
    pub host: HostMemKind,
    pub prediction: Prediction,
}

impl Choice {
    /// The throughput `objective` names.
    pub fn score(&self, objective: Objective) -> f64 {
        let p = &self.prediction;
        match objective {
            Objective::Decode => p.decode_tokens_per_s.unwrap_or(p.total_tokens_per_s),
            Objective::Total => p.total_tokens_per_s,
        }
    }

    /// Bytes off the GPU, the tie-break.
    fn off_gpu(&self) -> u64 {
        let t = self.prediction.footprint.total();
        t.host().saturating_add(t.disk)
    }

    /// Resident layers of `layers`.
    pub fn resident_layers(&self, layers: usize) -> usize {
        split_layers(layers, self.policy.w_gpu_percent, self.policy.w_cpu_percent).gpu_end
    }

    /// The flags of `tierlm bench` that run this policy.
    pub fn flags(&self) -> String {
        policy_flags(&self.policy)
    }
}

/// The flags of `tierlm bench` that run `p` (the defaults left out).
pub fn policy_flags(p: &Policy) -> String {
    let pct = p.percent().iter().map(|v| fmt_percent(*v)).collect::<Vec<_>>().join(" ");
    let mut s =
        format!("--percent {pct} --gpu-batch-size {} --num-gpu-batches {}", p.gpu_batch_size, p.num_gpu_batches);
    if !p.pin_weight {
        s += " --pin-weight false";
    }
    if p.cpu_cache_compute {
        s += " --cpu-cache-compute";
    }
    if !p.sep_layer {
        s += " --sep-layer false";
    }
    if p.compress_weight {
        s += " --compress-weight";
    }
    if p.compress_cache {
        s += " --compress-cache";
    }
    s
}

/// A percentage as `--percent` takes it: at most three decimals, no
/// trailing zeros.
pub fn fmt_percent(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// Rounds a percentage to what [`fmt_percent`] prints, so the flags
/// reproduce the policy the search evaluated.
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// What the search found.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub best: Choice,
    /// The next best candidates (up to three), each with why it lost.
    pub runners_up: Vec<(Choice, String)>,
    /// Candidates evaluated.
    pub evaluated: usize,
    /// A note for the user (compression chosen under `--compress auto`).
    pub note: Option<String>,
}

/// Divisors of `n` up to `max`, thinned to a geometric grid (each at
/// least 1.4 times the one before; `n` itself kept).
fn divisors(n: usize, max: usize) -> Vec<usize> {
    let mut all = Vec::new();
    let mut d = 1usize;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            all.push(d);
            all.push(n / d);
        }
        d += 1;
    }
    all.sort_unstable();
    all.dedup();
    let mut out: Vec<usize> = Vec::new();
    for d in all.into_iter().filter(|&d| d <= max) {
        match out.last() {
            Some(&last) if (d as f64) < last as f64 * 1.4 && d != n.min(max) => {}
            _ => out.push(d),
        }
    }
    out
}

/// The (gpu batch size, GPU batches) pairs tried: blocks that divide the
/// prompts into whole blocks (so that `bench` with the printed flags runs
/// one of them), unless the user pinned either.
fn batch_shapes(prompts: usize, pins: &Pins) -> Vec<(usize, usize)> {
    let n = prompts.clamp(1, MAX_BLOCK);
    let mut out = Vec::new();
    match (pins.gpu_batch_size, pins.num_gpu_batches) {
        (Some(g), Some(k)) => out.push((g, k)),
        (Some(g), None) => {
            let ks: Vec<usize> = if n.is_multiple_of(g) { divisors(n / g, 1024) } else { vec![1] };
            out.extend(ks.into_iter().map(|k| (g, k)));
        }
        (None, Some(k)) => {
            let gs: Vec<usize> = if n.is_multiple_of(k) { divisors(n / k, MAX_BLOCK) } else { vec![1] };
            out.extend(gs.into_iter().map(|g| (g, k)));
        }
        (None, None) => {
            for block in divisors(n, MAX_BLOCK) {
                for k in divisors(block, 64) {
                    out.push((block / k, k));
                }
            }
        }
    }
    out.retain(|&(g, k)| g.checked_mul(k).is_some_and(|b| b <= MAX_BLOCK));
    out
}

/// The most prompts one block may hold.
pub const MAX_BLOCK: usize = 1 << 20;

/// KV cache shares (GPU, CPU) tried, percent.
const CACHE_GRID: &[(f64, f64)] = &[
    (100.0, 0.0),
    (75.0, 25.0),
    (75.0, 0.0),
    (50.0, 50.0),
    (50.0, 25.0),
    (50.0, 0.0),
    (25.0, 75.0),
    (25.0, 50.0),
    (25.0, 25.0),
    (25.0, 0.0),
    (0.0, 100.0),
    (0.0, 75.0),
    (0.0, 50.0),
    (0.0, 25.0),
    (0.0, 0.0),
];

/// Activation shares (GPU, CPU) tried: on one tier.
const ACT_GRID: &[(f64, f64)] = &[(100.0, 0.0), (0.0, 100.0), (0.0, 0.0)];

/// Whether the GPU engine runs a policy's cache flags (see its cache plan):
/// CPU attention over a cache all in host memory; a 4-bit cache on one
/// tier (the GPU's included), without CPU attention.
fn engine_runs(p: &Policy) -> bool {
    if p.cpu_cache_compute && p.cache_cpu_percent < 100.0 {
        return false;
    }
    if p.compress_cache {
        let [_, disk, _] = p.disk_percents();
        let tiers = [p.cache_gpu_percent, p.cache_cpu_percent, disk].iter().filter(|&&v| v > 0.0).count();
        if tiers > 1 || p.cpu_cache_compute {
            return false;
        }
    }
    p.validate().is_ok()
}

struct Searcher<'a> {
    req: &'a Request<'a>,
    /// Per weight compression: the GPU bytes of `a` resident layers (and
    /// the slots the rest stream through) less those of all layers, as the
    /// plan counts them, for `a` in `0..=layers`.
    gpu_delta: [Option<Vec<i128>>; 2],
    evaluated: usize,
}

impl<'a> Searcher<'a> {
    fn run(&self, policy: &Policy) -> Run<'a> {
        let host = if policy.pin_weight { self.req.host } else { HostMemKind::Pageable };
        Run { spec: self.req.spec, work: self.req.work, prompts: self.req.prompts, host }
    }

    fn fits(&self, policy: &Policy) -> Result<bool> {
        let fp = footprint(self.req.spec, policy, self.req.work, self.run(policy).machine(policy))?;
        Ok(overruns(&fp.total(), &self.req.cap).is_empty())
    }

    fn gpu_bytes(&self, policy: &Policy) -> Result<u64> {
        Ok(footprint(self.req.spec, policy, self.req.work, self.run(policy).machine(policy))?.total().gpu)
    }

    fn deltas(&mut self, compress: bool) -> Result<&[i128]> {
        let k = usize::from(compress);
        if self.gpu_delta[k].is_none() {
            let layers = self.req.spec.layers;
            let base = Policy { compress_weight: compress, ..Policy::default() };
            let at = |a: usize| -> Result<u64> {
                let p = Policy { w_gpu_percent: gpu_percent(a, layers), w_cpu_percent: 0.0, ..base.clone() };
                self.gpu_bytes(&p)
            };
            let all = at(layers)? as i128;
            let v = (0..=layers).map(|a| Ok(at(a)? as i128 - all)).collect::<Result<Vec<_>>>()?;
            self.gpu_delta[k] = Some(v);
        }
        Ok(self.gpu_delta[k].as_deref().unwrap_or(&[]))
    }

    /// Places the weights of `template` (its other shares fixed): the most
    /// resident layers the GPU holds, then the largest host share of the
    /// streamed rows that fits. `None` when nothing fits.
    fn place_weights(&mut self, template: &Policy) -> Result<Option<Policy>> {
        let layers = self.req.spec.layers;
        let top = Policy { w_gpu_percent: 100.0, w_cpu_percent: 0.0, ..template.clone() };
        let top_gpu = self.gpu_bytes(&top)? as i128;
        let cap = self.req.cap.gpu as i128;
        let deltas = self.deltas(template.compress_weight)?.to_vec();
        let Some(a) = (0..=layers).rev().find(|&a| top_gpu + deltas[a] <= cap) else {
            return Ok(None);
        };
        let off = layers - a;
        let with = |host_rows: f64| Policy {
            w_gpu_percent: round3(gpu_percent(a, layers)),
            w_cpu_percent: if off == 0 { 0.0 } else { round3(host_rows * off as f64 / layers as f64) },
            ..template.clone()
        };
        if off == 0 || self.fits(&with(100.0))? {
            let p = with(100.0);
            return Ok(self.fits(&p)?.then_some(p));
        }
        // The host's share of the streamed rows: the largest whole percent
        // that fits (the host's bytes grow with it).
        let (mut lo, mut hi) = (0i64, 99i64);
        if !self.fits(&with(0.0))? {
            return Ok(None);
        }
        while lo < hi {
            let mid = (lo + hi + 1) / 2;
            if self.fits(&with(mid as f64))? {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Ok(Some(with(lo as f64)))
    }

    fn consider(&mut self, policy: Policy, out: &mut Vec<Choice>) -> Result<()> {
        if !engine_runs(&policy) {
            return Ok(());
        }
        let policy = match self.req.pins.percent {
            Some(_) => {
                if !self.fits(&policy)? {
                    return Ok(());
                }
                policy
            }
            None => match self.place_weights(&policy)? {
                Some(p) => p,
                None => return Ok(()),
            },
        };
        // Unpinned weights differ from pinned ones only where the host
        // holds streamed rows: elsewhere the candidate is the pinned one.
        let host_rows = split_layers(self.req.spec.layers, policy.w_gpu_percent, policy.w_cpu_percent).uses_host();
        if !policy.pin_weight && self.req.pins.pin_weight.is_none() && !host_rows {
            return Ok(());
        }
        self.evaluated += 1;
        let run = self.run(&policy);
        let prediction = predict(&run, &policy, &self.req.rates)?;
        out.push(Choice { host: run.weight_host(&policy), policy, prediction });
        Ok(())
    }

    /// Every candidate for the compression `(cw, cc)` that fits.
    fn candidates(&mut self, (cw, cc): (bool, bool)) -> Result<Vec<Choice>> {
        let req = self.req;
        let pins = &req.pins;
        let mut out = Vec::new();
        let pinned_act = pins.act.map(|[ag, ac]| (ag, ac));
        let pins_kind: Vec<bool> = match pins.pin_weight {
            Some(p) => vec![p],
            None if req.host.is_page_locked() => vec![true, false],
            None => vec![false],
        };
        for (gbs, nb) in batch_shapes(req.prompts, pins) {
            let base = Policy {
                gpu_batch_size: gbs,
                num_gpu_batches: nb,
                sep_layer: pins.sep_layer.unwrap_or(true),
                compress_weight: cw,
                compress_cache: cc,
                ..Policy::default()
            };
            let shares: Vec<[f64; 6]> = match pins.percent {
                Some(p) => vec![p],
                None => {
                    let acts: &[(f64, f64)] = match &pinned_act {
                        Some(a) => std::slice::from_ref(a),
                        None => ACT_GRID,
                    };
                    CACHE_GRID
                        .iter()
                        .flat_map(|&(cg, ccpu)| acts.iter().map(move |&(ag, ac)| [100.0, 0.0, cg, ccpu, ag, ac]))
                        .collect()
                }
            };
            for pct in shares {
                let Ok(p) = base.clone().with_percent(&pct) else { continue };
                let ccc: Vec<bool> = match pins.cpu_cache_compute {
                    Some(c) => vec![c],
                    None if p.cache_cpu_percent >= 100.0 && !cc => vec![false, true],
                    None => vec![false],
                };
                for &c in &ccc {
                    for &pin in &pins_kind {
                        self.consider(Policy { cpu_cache_compute: c, pin_weight: pin, ..p.clone() }, &mut out)?;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The percent of `layers` that `a` resident layers are.
fn gpu_percent(a: usize, layers: usize) -> f64 {
    if layers == 0 {
        100.0
    } else {
        100.0 * a as f64 / layers as f64
    }
}

fn better(objective: Objective) -> impl Fn(&Choice, &Choice) -> std::cmp::Ordering {
    move |a: &Choice, b: &Choice| {
        let (x, y) = (a.score(objective), b.score(objective));
        if (x - y).abs() <= 1e-9 * x.abs().max(y.abs()) {
            a.off_gpu().cmp(&b.off_gpu())
        } else {
            y.total_cmp(&x)
        }
    }
}

/// Why `other` lost to `best`.
pub fn why_lost(best: &Choice, other: &Choice, objective: Objective, layers: usize) -> String {
    let (b, o) = (best.score(objective), other.score(objective));
    let mut s = if (b - o).abs() <= 1e-9 * b.abs().max(o.abs()) {
        format!("as fast ({o:.2} token/s {objective}) but keeps more bytes off the GPU")
    } else {
        format!("{o:.2} token/s {objective}, {:.1}% below", 100.0 * (b - o) / b)
    };
    let (bd, od) = (&best.prediction.decode_step, &other.prediction.decode_step);
    let _ = write!(s, "; a decode step {:.3} s (bound by {}) against {:.3} s", od.seconds, od.bound, bd.seconds);
    let mut diffs = Vec::new();
    let (bp, op) = (&best.policy, &other.policy);
    if (bp.gpu_batch_size, bp.num_gpu_batches) != (op.gpu_batch_size, op.num_gpu_batches) {
        diffs.push(format!(
            "block {}×{} instead of {}×{}",
            op.gpu_batch_size, op.num_gpu_batches, bp.gpu_batch_size, bp.num_gpu_batches
        ));
    }
    let (br, or) = (best.resident_layers(layers), other.resident_layers(layers));
    if br != or {
        diffs.push(format!("{or} resident layers instead of {br}"));
    }
    if (bp.w_cpu_percent - op.w_cpu_percent).abs() > 1e-9 && br == or {
        diffs.push(format!(
            "weights {}% in host memory instead of {}%",
            fmt_percent(op.w_cpu_percent),
            fmt_percent(bp.w_cpu_percent)
        ));
    }
    if (bp.cache_gpu_percent, bp.cache_cpu_percent) != (op.cache_gpu_percent, op.cache_cpu_percent) {
        diffs.push(format!(
            "cache {}/{} GPU/host instead of {}/{}",
            fmt_percent(op.cache_gpu_percent),
            fmt_percent(op.cache_cpu_percent),
            fmt_percent(bp.cache_gpu_percent),
            fmt_percent(bp.cache_cpu_percent)
        ));
    }
    if (bp.act_gpu_percent, bp.act_cpu_percent) != (op.act_gpu_percent, op.act_cpu_percent) {
        diffs.push(format!("activations {} instead of {}", act_tier(op), act_tier(bp)));
    }
    if bp.cpu_cache_compute != op.cpu_cache_compute {
        diffs.push(format!("CPU attention {}", if op.cpu_cache_compute { "on" } else { "off" }));
    }
    if best.host != other.host {
        diffs.push(format!("{} host memory instead of {}", other.host, best.host));
    }
    if (bp.compress_weight, bp.compress_cache) != (op.compress_weight, op.compress_cache) {
        diffs.push(format!(
            "compression {} instead of {}",
            CompressMode::of(op.compress_weight, op.compress_cache).flag(),
            CompressMode::of(bp.compress_weight, bp.compress_cache).flag()
        ));
    }
    if !diffs.is_empty() {
        let _ = write!(s, "; {}", diffs.join(", "));
    }
    s
}

fn act_tier(p: &Policy) -> &'static str {
    if p.act_gpu_percent >= 100.0 {
        "on the GPU"
    } else if p.act_cpu_percent >= 100.0 {
        "in host memory"
    } else {
        "on disk"
    }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// The error for budgets no policy fits: what the least demanding policy
/// within the pins (the pinned block, or one prompt; the pinned
/// percentages, or every share off the GPU that may be; the most
/// compression allowed) needs per tier; with a pinned GPU batch size, the
/// largest that would fit with everything else as asked.
fn nothing_fits(req: &Request<'_>, nearest: bool) -> Error {
    let (cw, cc) = req.compress.options().iter().fold((false, false), |(a, b), &(w, c)| (a || w, b || c));
    let mut p = Policy {
        gpu_batch_size: req.pins.gpu_batch_size.unwrap_or(1),
        num_gpu_batches: req.pins.num_gpu_batches.unwrap_or(1),
        pin_weight: false,
        compress_weight: cw,
        compress_cache: cc,
        ..Policy::default()
    };
    let [ag, ac] = req.pins.act.unwrap_or([100.0, 0.0]);
    p = match p.clone().with_percent(&req.pins.percent.unwrap_or([0.0, 0.0, 0.0, 0.0, ag, ac])) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let placement = match req.pins.percent {
        Some(_) => format!("--percent {}", p.percent().iter().map(|&v| fmt_percent(v)).collect::<Vec<_>>().join(" ")),
        None => "weights and cache on disk".to_string(),
    };
    let packed = match (cw, cc) {
        (true, true) => ", 4-bit weights and cache",
        (true, false) => ", 4-bit weights",
        (false, true) => ", 4-bit cache",
        (false, false) => "",
    };
    let mut s = String::from("no policy fits this machine's budgets");
    let machine = crate::plan::Machine { gpu_compute: true, can_pin: false };
    match footprint(req.spec, &p, req.work, machine) {
        Ok(fp) => {
            let t = fp.total();
            let cap = &req.cap;
            let _ = write!(
                s,
                ": the least any placement needs ({} prompt{} a block, {placement}{packed}, pageable host memory) \
                 against what is available:\n  GPU: needs {}, has {}\n  host: needs {}, has {}\n  disk: needs {}, \
                 has {}\n  in all: needs {}, has {}",
                p.block_size(),
                if p.block_size() == 1 { "" } else { "s" },
                gib(t.gpu),
                gib(cap.gpu),
                gib(t.host()),
                gib(cap.host),
                gib(t.disk),
                gib(cap.disk),
                gib(t.gpu.saturating_add(t.host()).saturating_add(t.disk)),
                gib(cap.gpu.saturating_add(cap.host).saturating_add(cap.disk)),
            );
            let weights = req.spec.weight_bytes(false).unwrap_or(u64::MAX);
            let _ = write!(s, "\n  (the weights alone are {}; free disk in the offload directory, a larger --host-mem or --gpu-mem, or fewer prompts would help)", gib(weights));
        }
        Err(e) => {
            let _ = write!(s, ": {e}");
        }
    }
    if let Some(pinned) = req.pins.gpu_batch_size.filter(|&b| nearest && b > 1) {
        // The largest smaller GPU batch the search places with every other
        // pin kept (fits are monotone in the batch: bisect).
        let fits = |b: usize| {
            let pins = Pins { gpu_batch_size: Some(b), ..req.pins.clone() };
            let prompts = b.saturating_mul(req.pins.num_gpu_batches.unwrap_or(1));
            search_with(&Request { pins, prompts, ..req.clone() }, false).ok()
        };
        let (mut lo, mut hi) = (0usize, pinned);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid).is_some() {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        match (lo > 0).then(|| fits(lo)).flatten() {
            Some(out) => {
                let _ = write!(s, "\n  nearest that fits: --gpu-batch-size {lo} ({})", out.best.flags());
            }
            None => {
                let _ = write!(s, "\n  no GPU batch size fits with the other flags as given");
            }
        }
    }
    Error::NoPolicyFits(s)
}

/// Chooses the policy (see the module's documentation).
pub fn search(req: &Request<'_>) -> Result<Outcome> {
    search_with(req, true)
}

/// [`search`]; `nearest`: whether a refusal looks for the nearest GPU batch
/// size that fits (not when already looking).
fn search_with(req: &Request<'_>, nearest: bool) -> Result<Outcome> {
    if req.prompts == 0 || req.work.prompt_len == 0 || req.work.gen_len == 0 {
        return Err(Error::InvalidArgument("prompts, prompt length and generation length must be at least 1".into()));
    }
    req.rates.validate()?;
    if let Some(p) = req.pins.percent {
        Policy::default().with_percent(&p)?.validate()?;
        if let Some([ag, ac]) = req.pins.act.filter(|a| a[..] != p[4..]) {
            return Err(Error::InvalidArgument(format!(
                "--percent puts the activations at {} {} (GPU, CPU), but this engine keeps them at {} {}",
                fmt_percent(p[4]),
                fmt_percent(p[5]),
                fmt_percent(ag),
                fmt_percent(ac)
            )));
        }
    }
    let mut s = Searcher { req, gpu_delta: [None, None], evaluated: 0 };
    let mut all = Vec::new();
    for &choice in req.compress.options() {
        all.extend(s.candidates(choice)?);
    }
    if all.is_empty() {
        if req.compress == CompressMode::None {
            // Would compression make it fit? Say so, but never choose it unasked.
            for &choice in &CompressMode::Auto.options()[1..] {
                if !s.candidates(choice)?.is_empty() {
                    let mode = CompressMode::of(choice.0, choice.1);
                    return Err(Error::NoPolicyFits(format!(
                        "no policy fits this machine's budgets without compression; 4-bit {}, but it changes \
                         the output: pass --compress {} (or --compress auto) to allow it",
                        match mode {
                            CompressMode::Weight => "weights fit",
                            CompressMode::Cache => "KV cache fits",
                            _ => "weights and KV cache fit",
                        },
                        mode.flag()
                    )));
                }
            }
        }
        return Err(nothing_fits(req, nearest));
    }
    all.sort_by(better(req.objective));
    let mut seen: Vec<String> = Vec::new();
    let mut unique = Vec::new();
    for c in all {
        let f = c.flags();
        if !seen.contains(&f) {
            seen.push(f);
            unique.push(c);
        }
        if unique.len() == 4 {
            break;
        }
    }
    let mut it = unique.into_iter();
    let Some(best) = it.next() else {
        return Err(nothing_fits(req, nearest));
    };
    let layers = req.spec.layers;
    let runners_up = it.map(|c| (why_lost(&best, &c, req.objective, layers), c)).map(|(w, c)| (c, w)).collect();
    let auto = req.compress == CompressMode::Auto;
    let note = (auto && (best.policy.compress_weight || best.policy.compress_cache)).then(|| {
        "--compress auto chose 4-bit compression: its output differs from the uncompressed model's".to_string()
    });
    Ok(Outcome { best, runners_up, evaluated: s.evaluated, note })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn spec(layers: usize, h: usize) -> ModelSpec {
        crate::spec::testing::spec(layers, h, 64, true)
    }

    fn request(spec: &ModelSpec, prompts: usize, cap: Capacity) -> Request<'_> {
        Request {
            spec,
            work: Workload { prompt_len: 64, gen_len: 8 },
            prompts,
            cap,
            rates: Rates::NOMINAL,
            objective: Objective::Total,
            compress: CompressMode::None,
            host: HostMemKind::Registered,
            pins: Pins::default(),
        }
    }

    fn cap(gpu: u64, host: u64, disk: u64) -> Capacity {
        Capacity { gpu, host, pinnable: u64::MAX, disk }
    }

    fn fits(req: &Request<'_>, c: &Choice) -> bool {
        let run = Run { spec: req.spec, work: req.work, prompts: req.prompts, host: c.host };
        crate::plan::check(req.spec, &c.policy, req.work, run.machine(&c.policy), &req.cap).is_ok()
    }

    #[test]
    fn ample_budgets_keep_everything_on_the_gpu() {
        let s = spec(8, 1024);
        let req = request(&s, 16, cap(1000 * GIB, 1000 * GIB, 1000 * GIB));
        let out = search(&req).unwrap();
        assert_eq!(out.best.policy.percent(), [100.0, 0.0, 100.0, 0.0, 100.0, 0.0], "{}", out.best.flags());
        assert_eq!(out.best.policy.block_size(), 16, "one block holds every prompt");
        assert!(fits(&req, &out.best));
    }

    #[test]
    fn a_small_gpu_streams_weights_and_flags_reproduce_the_policy() {
        let s = spec(24, 2048);
        let layer = s.layer_bytes(false).unwrap();
        // Room for the embeddings, a few layers and the rest of the run.
        let gpu = s.outside_bytes().unwrap() + 8 * layer;
        let req = request(&s, 32, cap(gpu, 100 * GIB, 100 * GIB));
        let out = search(&req).unwrap();
        let b = &out.best;
        assert!(fits(&req, b), "{}", b.flags());
        let resident = b.resident_layers(24);
        assert!(resident > 0 && resident < 24, "{}", b.flags());
        // The printed flags parse back to the policy evaluated.
        let flags = b.flags();
        let words: Vec<&str> = flags.split_whitespace().collect();
        let pct: Vec<f64> = words[1..7].iter().map(|w| w.parse().unwrap()).collect();
        assert_eq!(pct, b.policy.percent().to_vec());
        assert!(out.runners_up.len() <= 3 && !out.runners_up.is_empty());
        for (c, why) in &out.runners_up {
            assert!(c.score(Objective::Total) <= b.score(Objective::Total));
            assert!(why.contains("token/s"), "{why}");
        }
    }

    /// Every candidate of `out`, the best first.
    fn all_of(out: &Outcome) -> impl Iterator<Item = &Choice> {
        std::iter::once(&out.best).chain(out.runners_up.iter().map(|(c, _)| c))
    }

    /// The GPU bytes of `percent` for a block of 64 prompts of `work`.
    fn gpu_of(s: &ModelSpec, work: Workload, percent: [f64; 6], compress_cache: bool) -> u64 {
        let p = Policy { gpu_batch_size: 64, num_gpu_batches: 1, compress_cache, ..Policy::default() };
        let p = p.with_percent(&percent).unwrap();
        let run = Run { spec: s, work, prompts: 64, host: HostMemKind::Registered };
        footprint(s, &p, work, run.machine(&p)).unwrap().total().gpu
    }

    /// One block of 64 prompts whose 16-bit cache does not fit the GPU
    /// even with every layer streamed: the cache must move.
    fn cache_bound(s: &ModelSpec) -> Request<'_> {
        let work = Workload { prompt_len: 128, gen_len: 32 };
        let kv = s.kv_cache_bytes(64, 160);
        let gpu = gpu_of(s, work, [0.0, 100.0, 100.0, 0.0, 100.0, 0.0], false) - kv * 3 / 8;
        let mut req = request(s, 64, cap(gpu, 100 * GIB, 100 * GIB));
        req.work = work;
        req.pins.gpu_batch_size = Some(64);
        req.pins.num_gpu_batches = Some(1);
        req
    }

    #[test]
    fn a_pinned_activation_tier_holds_while_the_cache_moves() {
        let s = spec(24, 1024);
        let mut req = cache_bound(&s);
        req.pins.act = Some([100.0, 0.0]);
        let out = search(&req).unwrap();
        for c in all_of(&out) {
            let p = &c.policy;
            assert_eq!((p.act_gpu_percent, p.act_cpu_percent), (100.0, 0.0), "{}", c.flags());
            assert!(engine_runs(p) && fits(&req, c), "{}", c.flags());
        }
        assert!(out.best.policy.cache_gpu_percent < 100.0, "the cache moves: {}", out.best.flags());
        // Unpinned, the same budgets are searched over the activations' tiers too.
        req.pins.act = None;
        let free = search(&req).unwrap();
        assert!(free.evaluated > out.evaluated, "{} against {}", free.evaluated, out.evaluated);
        // CPU attention over the cache in host memory, the activations kept.
        req.pins.act = Some([100.0, 0.0]);
        req.pins.cpu_cache_compute = Some(true);
        let out = search(&req).unwrap();
        for c in all_of(&out) {
            let p = &c.policy;
            assert!(p.cpu_cache_compute && p.cache_cpu_percent == 100.0, "{}", c.flags());
            assert_eq!((p.act_gpu_percent, p.act_cpu_percent), (100.0, 0.0), "{}", c.flags());
        }
    }

    #[test]
    fn a_pinned_activation_tier_leaves_the_4bit_cache_to_choose() {
        let s = spec(24, 1024);
        // Everything on the GPU (no host, no disk): the block's 16-bit cache
        // does not fit beside the weights, a 4-bit one does.
        let mut req = cache_bound(&s);
        let all = [100.0, 0.0, 100.0, 0.0, 100.0, 0.0];
        let (packed, plain) = (gpu_of(&s, req.work, all, true), gpu_of(&s, req.work, all, false));
        assert!(packed < plain);
        req.cap = cap(packed + (plain - packed) / 4, 0, 0);
        req.pins.act = Some([100.0, 0.0]);
        let err = search(&req).unwrap_err().to_string();
        assert!(err.contains("--compress cache"), "{err}");
        for mode in [CompressMode::Cache, CompressMode::Auto] {
            let out = search(&Request { compress: mode, ..req.clone() }).unwrap();
            let p = &out.best.policy;
            assert!(p.compress_cache && p.cache_gpu_percent == 100.0, "{mode:?}: {}", out.best.flags());
            assert_eq!((p.act_gpu_percent, p.act_cpu_percent), (100.0, 0.0), "{}", out.best.flags());
            for c in all_of(&out) {
                assert!(engine_runs(&c.policy) && fits(&req, c), "{}", c.flags());
            }
            assert_eq!(out.note.is_some(), mode == CompressMode::Auto);
        }
    }

    #[test]
    fn the_engine_runs_a_4bit_cache_on_one_tier_only() {
        let with = |pct: [f64; 6], cc: bool, cpu: bool| {
            let p = Policy { compress_cache: cc, cpu_cache_compute: cpu, ..Policy::default() };
            engine_runs(&p.with_percent(&pct).unwrap())
        };
        for one in [[100.0, 0.0], [0.0, 100.0], [0.0, 0.0]] {
            // The activations' tier is not the cache's.
            for act in [[100.0, 0.0], [0.0, 100.0], [0.0, 0.0]] {
                assert!(with([100.0, 0.0, one[0], one[1], act[0], act[1]], true, false), "{one:?} {act:?}");
            }
        }
        for split in [[75.0, 25.0], [75.0, 0.0], [0.0, 50.0]] {
            assert!(!with([100.0, 0.0, split[0], split[1], 100.0, 0.0], true, false), "{split:?}");
            assert!(with([100.0, 0.0, split[0], split[1], 100.0, 0.0], false, false), "{split:?}");
        }
        assert!(with([100.0, 0.0, 0.0, 100.0, 100.0, 0.0], false, true));
        assert!(!with([100.0, 0.0, 0.0, 100.0, 100.0, 0.0], true, true));
        assert!(!with([100.0, 0.0, 50.0, 50.0, 100.0, 0.0], false, true));
    }

    #[test]
    fn pinned_percentages_must_agree_with_a_pinned_activation_tier() {
        let s = spec(8, 1024);
        let mut req = request(&s, 4, cap(1000 * GIB, 1000 * GIB, 1000 * GIB));
        req.pins.act = Some([100.0, 0.0]);
        req.pins.percent = Some([100.0, 0.0, 50.0, 50.0, 100.0, 0.0]);
        let out = search(&req).unwrap();
        assert_eq!(out.best.policy.percent(), [100.0, 0.0, 50.0, 50.0, 100.0, 0.0]);
        req.pins.percent = Some([100.0, 0.0, 100.0, 0.0, 0.0, 100.0]);
        let err = search(&req).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("activations at 0 100"), "{err}");
    }

    #[test]
    fn nothing_fits_names_every_tier() {
        let s = spec(8, 1024);
        let req = request(&s, 4, cap(GIB / 1024, GIB / 1024, GIB / 1024));
        let err = search(&req).unwrap_err().to_string();
        for want in ["no policy fits", "GPU: needs", "host: needs", "disk: needs", "in all"] {
            assert!(err.contains(want), "{want} in {err}");
        }
    }

    #[test]
    fn a_pinned_batch_too_large_is_refused_with_the_largest_that_fits() {
        let s = spec(8, 1024);
        let pins = Pins {
            percent: Some([100.0, 0.0, 100.0, 0.0, 100.0, 0.0]),
            gpu_batch_size: Some(4096),
            num_gpu_batches: Some(1),
            ..Pins::default()
        };
        let gpu = 4 * GIB;
        let req = Request { pins: pins.clone(), ..request(&s, 4096, cap(gpu, 1000 * GIB, 0)) };
        let err = search(&req).unwrap_err().to_string();
        assert!(err.contains("--percent 100 0 100 0 100 0"), "{err}");
        let b: usize = err
            .split("nearest that fits: --gpu-batch-size ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no nearest batch in {err}"));
        // It fits, and one more does not.
        let at =
            |b: usize| Request { pins: Pins { gpu_batch_size: Some(b), ..pins.clone() }, prompts: b, ..req.clone() };
        let out = search(&at(b)).unwrap();
        assert!(fits(&at(b), &out.best), "{}", out.best.flags());
        assert!(search(&at(b + 1)).is_err(), "{} + 1 fits too", b);
    }

    #[test]
    fn compression_is_only_chosen_when_allowed() {
        let s = spec(8, 2048);
        let w = s.weight_bytes(false).unwrap();
        // The weights fit the machine only packed: GPU and host together
        // hold less than them, no disk.
        let gpu = s.outside_bytes().unwrap() + 6 * s.layer_bytes(false).unwrap();
        let req = request(&s, 2, cap(gpu, w / 3, 0));
        let err = search(&req).unwrap_err().to_string();
        assert!(err.contains("--compress"), "{err}");
        let allowed = Request { compress: CompressMode::Auto, ..req.clone() };
        let out = search(&allowed).unwrap();
        assert!(out.best.policy.compress_weight, "{}", out.best.flags());
        assert!(out.note.is_some());
        assert!(fits(&allowed, &out.best));
    }

    #[test]
    fn blocks_divide_the_prompts() {
        assert_eq!(divisors(64, 1024), vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(divisors(12, 1024), vec![1, 2, 3, 6, 12]);
        assert_eq!(divisors(7, 4), vec![1]);
        let shapes = batch_shapes(24, &Pins::default());
        assert!(shapes.iter().all(|&(g, k)| 24 % (g * k) == 0), "{shapes:?}");
        assert!(shapes.contains(&(24, 1)) && shapes.contains(&(12, 2)));
        let pinned = Pins { gpu_batch_size: Some(5), ..Pins::default() };
        assert_eq!(batch_shapes(24, &pinned), vec![(5, 1)]);
    }

    #[test]
    fn objective_and_mode_parse() {
        assert_eq!("decode".parse::<Objective>().unwrap(), Objective::Decode);
        assert!("fast".parse::<Objective>().is_err());
        assert_eq!("both".parse::<CompressMode>().unwrap(), CompressMode::Both);
        assert!("all".parse::<CompressMode>().is_err());
        assert_eq!(fmt_percent(12.5), "12.5");
        assert_eq!(fmt_percent(100.0), "100");
        assert_eq!(fmt_percent(1.0 / 3.0), "0.333");
    }

    fn pins_strategy() -> impl Strategy<Value = Pins> {
        (
            proptest::option::of(prop::sample::select(vec![1usize, 2, 4, 8])),
            proptest::option::of(1usize..=3),
            proptest::option::of(prop::sample::select(vec![
                [100.0, 0.0, 100.0, 0.0, 100.0, 0.0],
                [0.0, 100.0, 100.0, 0.0, 100.0, 0.0],
                [50.0, 25.0, 0.0, 100.0, 100.0, 0.0],
            ])),
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
            proptest::option::of(Just([100.0, 0.0])),
        )
            .prop_map(|(g, n, pct, pin, sep, act)| Pins {
                gpu_batch_size: g,
                num_gpu_batches: n,
                percent: pct,
                pin_weight: pin,
                cpu_cache_compute: None,
                sep_layer: sep,
                act,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Every choice passes the plan's placement check within the
        /// budgets, and keeps every pinned flag.
        #[test]
        fn chosen_policies_fit_and_keep_pins(
            layers in 2usize..10,
            gpu_mib in 64u64..4096,
            host_mib in 0u64..8192,
            disk_mib in 0u64..8192,
            prompts in 1usize..24,
            pins in pins_strategy(),
        ) {
            let s = spec(layers, 1024);
            let mut req = request(&s, prompts, cap(gpu_mib << 20, host_mib << 20, disk_mib << 20));
            req.pins = pins.clone();
            match search(&req) {
                Ok(out) => {
                    let p = &out.best.policy;
                    for c in all_of(&out) {
                        prop_assert!(fits(&req, c) && engine_runs(&c.policy), "{}", c.flags());
                    }
                    if let Some(g) = pins.gpu_batch_size { prop_assert_eq!(p.gpu_batch_size, g); }
                    if let Some(n) = pins.num_gpu_batches { prop_assert_eq!(p.num_gpu_batches, n); }
                    if let Some(pct) = pins.percent { prop_assert_eq!(p.percent(), pct); }
                    if let Some(pin) = pins.pin_weight { prop_assert_eq!(p.pin_weight, pin); }
                    if let Some(sep) = pins.sep_layer { prop_assert_eq!(p.sep_layer, sep); }
                    if let Some([ag, ac]) = pins.act {
                        prop_assert_eq!((p.act_gpu_percent, p.act_cpu_percent), (ag, ac));
                    }
                    prop_assert!(!p.compress_weight && !p.compress_cache);
                    if pins.gpu_batch_size.is_none() && pins.num_gpu_batches.is_none() {
                        prop_assert!(prompts % p.block_size() == 0, "{} prompts in blocks of {}", prompts, p.block_size());
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(matches!(e, Error::NoPolicyFits(_)), "{msg}");
                }
            }
        }

        /// More GPU memory never predicts a lower throughput for the best
        /// choice.
        #[test]
        fn more_gpu_memory_never_predicts_less(
            layers in 2usize..8,
            gpu_mib in 32u64..1024,
            more_mib in 1u64..2048,
            host_mib in 256u64..4096,
            prompts in 1usize..12,
        ) {
            let s = spec(layers, 1024);
            let small = request(&s, prompts, cap(gpu_mib << 20, host_mib << 20, 8 * GIB));
            let big = request(&s, prompts, cap((gpu_mib + more_mib) << 20, host_mib << 20, 8 * GIB));
            if let Ok(a) = search(&small) {
                let b = search(&big);
                prop_assert!(b.is_ok(), "fits in less GPU memory but not in more");
                if let Ok(b) = b {
                    let (x, y) = (a.best.score(Objective::Total), b.best.score(Objective::Total));
                    prop_assert!(y >= x * (1.0 - 1e-12), "{} ({}) then {} ({})", x, a.best.flags(), y, b.best.flags());
                }
            }
        }
    }
}
