//! Helpers shared by the GPU engine's tests: where the fixtures are, whether
//! a GPU is here, the expected answers, and the comparison rules (logit
//! tolerance, greedy tokens, near ties).
//!
//! Each test file uses a different subset, hence the allowance below.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use engine_opt::generation::{generate as cpu_generate, prefill_logits as cpu_prefill_logits};
use engine_opt::gpu::generation::generate;
use engine_opt::gpu::{self, GpuModel};
use engine_opt::loading::{load_model, LoadedModel};
use engine_opt::model::OptModel;
use engine_opt::sampling::{Sampler, SamplingConfig};
use serde::Deserialize;

/// What the engine must meet.
pub const LOGIT_TOLERANCE: f32 = 2e-2;
pub const MIN_EQUAL_TOKENS: usize = 16;

pub fn repo_root() -> PathBuf {
    match std::env::var_os("TIERLM_REPO_ROOT") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures/opt").join(name)
}

/// Whether the GPU engine can run here; prints the skip line if not.
pub fn gpu_here(test: &str) -> bool {
    match gpu::unavailable_reason() {
        None => true,
        Some(reason) => {
            println!("skipped: no CUDA driver ({test}: {reason})");
            false
        }
    }
}

#[derive(Deserialize)]
pub struct Expected {
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub name: String,
    pub input_ids: Vec<Vec<u32>>,
    pub last_logits: Vec<Vec<f32>>,
    pub greedy_new_tokens: Vec<Vec<u32>>,
    pub max_new_tokens: usize,
}

pub fn expected(dir: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(dir).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn cpu_model(name: &str) -> LoadedModel {
    load_model(fixture(name).to_str().unwrap(), false, 0).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_nan() || y.is_nan() { f32::INFINITY } else { (x - y).abs() })
        .fold(0.0, f32::max)
}

pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().map(|x| x.abs()).fold(0.0, f32::max)
}

pub fn gpu_greedy(model: &GpuModel, batches: &[Vec<Vec<u32>>], n: usize) -> Vec<Vec<u32>> {
    generate(model, batches, &engine_opt::generation::options(n), None, &indicatif::ProgressBar::hidden())
        .unwrap_or_else(|e| panic!("{e}"))
        .tokens
}

pub fn cpu_greedy(model: &OptModel, batches: &[Vec<Vec<u32>>], n: usize) -> Vec<Vec<u32>> {
    let mut sampler = Sampler::new(SamplingConfig::default());
    cpu_generate(model, batches, &engine_opt::generation::options(n), &mut sampler, &indicatif::ProgressBar::hidden())
        .unwrap()
        .tokens
}

/// A greedy step the CPU reference itself decides by less than this (its
/// two best logits this close) may go either way in f16: a tenth of the
/// logit tolerance, twice the largest first-step logit difference measured
/// on the fixtures.
pub const NEAR_TIE: f32 = 2e-3;

/// Tokens equal up to the end, or for at least the first MIN_EQUAL_TOKENS;
/// an earlier difference passes only where the CPU's own logits at that
/// step (teacher-forced on the common prefix) put its pick and the GPU's
/// within NEAR_TIE, the GPU's being the CPU's second best.
pub fn check_tokens(what: &str, cpu: &OptModel, prompts: &[Vec<u32>], got: &[Vec<u32>], want: &[Vec<u32>]) {
    assert_eq!(got.len(), want.len(), "{what}: sequences");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g == w {
            continue;
        }
        let same = g.iter().zip(w).take_while(|(a, b)| a == b).count();
        eprintln!("{what}: sequence {i} agrees for {same} tokens, then {:?} vs {:?}", &g[same..], &w[same..]);
        if same >= MIN_EQUAL_TOKENS.min(w.len()) {
            continue;
        }
        let mut seq = prompts[i].clone();
        seq.extend_from_slice(&w[..same]);
        let logits = cpu_prefill_logits(cpu, &[seq]).unwrap();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let (best, second) = (order[0], order[1]);
        let gap = logits[best] - logits[second];
        let gpu_pick = g.get(same).map(|&t| t as usize);
        eprintln!(
            "{what}: sequence {i}, step {same}: the CPU's best two are {best} and {second}, {gap:.2e} apart; the GPU picked {gpu_pick:?}"
        );
        assert!(
            gap <= NEAR_TIE && gpu_pick == Some(second),
            "{what}: sequence {i} differs after {same} tokens, and not at a near tie (gap {gap:.2e})"
        );
    }
}

pub fn tierlm() -> Option<PathBuf> {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_tierlm"));
    let bundled = repo_root().join(".gpu/tierlm");
    [built, bundled].into_iter().find(|p| p.is_file())
}

/// Asserts that `dir` (an offload directory after a run) holds nothing:
/// the disk tier's arena is unlinked as soon as it is opened.
pub fn assert_nothing_left(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
    assert!(left.is_empty(), "offload files left behind in {dir:?}: {left:?}");
}

/// Runs `exe` with `args` and `--offload-dir` a fresh temporary directory;
/// asserts it succeeded and left nothing there; returns (stdout, stderr).
pub fn tierlm_with_offload(exe: &Path, args: &[&str]) -> (String, String) {
    let offload = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(exe).args(args).arg("--offload-dir").arg(offload.path()).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into());
    assert!(out.status.success(), "{args:?}: {stdout}\n{stderr}");
    assert_nothing_left(offload.path());
    (stdout, stderr)
}

/// The plan's bytes are the allocated bytes: for the policy `--percent
/// W_GPU W_CPU 100 0 100 0` (with `compress` for `--compress-weight`), the
/// weights the plan puts on the GPU, in host memory and on disk, and the
/// streaming slots, equal what the model allocated.
pub fn assert_plan_matches(model: &GpuModel, percent: (f64, f64), compress: bool) {
    use engine_opt::placement::{footprint, weight_slots, Machine, Workload};
    let spec = engine_opt::spec::model_spec(&model.config, true).unwrap();
    let mut policy =
        engine_opt::policy::Policy::default().with_percent(&[percent.0, percent.1, 100.0, 0.0, 100.0, 0.0]).unwrap();
    policy.compress_weight = compress;
    let work = Workload { prompt_len: 8, gen_len: 8 };
    let fp = footprint(&spec, &policy, work, Machine { gpu_compute: true, can_pin: true }).unwrap();
    let label = format!("plan for {percent:?} compress {compress}");
    assert_eq!(fp.weights.gpu, model.weight_bytes(), "{label}: weights on the GPU");
    let (host, disk) = model.offload.as_ref().map_or((0, 0), |s| s.home_bytes());
    assert_eq!(fp.weights.host(), host, "{label}: weights in host memory");
    assert_eq!(fp.weights.disk, disk, "{label}: weights on disk");
    if let Some(s) = &model.offload {
        assert_eq!(s.slot_count(), weight_slots(s.split().offloaded()), "{label}: slots");
        assert_eq!(s.slot_bytes(), spec.layer_bytes(compress).unwrap(), "{label}: a slot's bytes");
    }
    eprintln!("{label}: GPU {} host {host} disk {disk} bytes, as planned", fp.weights.gpu);
}
