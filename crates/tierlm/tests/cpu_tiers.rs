//! The CPU engine with weights on disk (`--percent 0 W_CPU 0 100 0 100`,
//! `W_CPU < 100`, no GPU): the block schedule on the CPU compute device,
//! later layers written to the disk tier as they load and read back a layer
//! ahead. Tokens must equal the all-in-memory run's exactly (the same
//! weights, the same f32 arithmetic), through the library and through
//! `tierlm bench` and `tierlm generate`; nothing may be left in the
//! offload directory. Runs everywhere (CI has no GPU).

mod common;
use common::*;

use std::process::Command;

use engine_opt::cpu_offload::{for_policy, DiskLayers};
use engine_opt::generation::{generate, generate_with, CpuPlacement, GenerateOptions};
use engine_opt::loading::{load_model, load_model_with};
use engine_opt::policy::Policy;
use engine_opt::sampling::{Sampler, SamplingConfig};
use indicatif::ProgressBar;

fn greedy_tokens(model_dir: &str, w_cpu: f64, offload: &std::path::Path) -> (Vec<Vec<u32>>, u64) {
    greedy_tokens_with_cache(model_dir, w_cpu, 100.0, offload)
}

fn greedy_tokens_with_cache(
    model_dir: &str,
    w_cpu: f64,
    c_cpu: f64,
    offload: &std::path::Path,
) -> (Vec<Vec<u32>>, u64) {
    let dir = fixture(model_dir);
    let arg = dir.to_str().unwrap();
    let config = engine_opt::OptConfig::from_dir(&dir).unwrap();
    let policy = Policy::default().with_percent(&[0.0, w_cpu, 0.0, c_cpu, 0.0, 100.0]).unwrap();
    let tiers = runtime::Tiers::default();
    let mut on_disk: Option<DiskLayers> = for_policy(&tiers, &config, &policy, Some(offload)).unwrap();
    let loaded = load_model_with(arg, false, 0, on_disk.as_mut().map(|d| (d.first(), d))).unwrap();
    let on_disk = on_disk.map(std::sync::Arc::new);
    let bytes = on_disk.as_ref().map_or(0, |d| d.bytes());
    // The plan's disk bytes are the bytes the layers took on disk.
    let spec = engine_opt::spec::model_spec(&config, false).unwrap();
    let work = engine_opt::placement::Workload { prompt_len: 8, gen_len: 8 };
    let machine = engine_opt::placement::Machine { gpu_compute: false, can_pin: false };
    let planned = engine_opt::placement::footprint(&spec, &policy, work, machine).unwrap();
    assert_eq!(planned.weights.disk, bytes, "{model_dir}: planned and written disk bytes");
    let case = &expected(model_dir).cases[0];
    let (a, b) = case.input_ids.split_at(case.input_ids.len() / 2);
    let batches = vec![a.to_vec(), b.to_vec()];
    let mut sampler = Sampler::new(SamplingConfig::default());
    let opts = GenerateOptions { stop_on_eos: false, ..engine_opt::generation::options(MIN_EQUAL_TOKENS) };
    // Accounted, so that debug builds check each streamed layer's
    // reservations against its bytes.
    let host = tier_api::MemAccount::new("host:pageable", None);
    let placement = CpuPlacement { disk: on_disk, host: Some(host), ..Default::default() };
    let out = generate_with(&loaded.model, placement, &batches, &opts, &mut sampler, &ProgressBar::hidden()).unwrap();
    (out.tokens, bytes)
}

#[test]
fn weights_on_disk_give_the_same_tokens() {
    for model_dir in ["tiny-opt", "tiny-opt-sharded", "tiny-opt-350m-style"] {
        let dir = fixture(model_dir);
        let loaded = load_model(dir.to_str().unwrap(), false, 0).unwrap();
        let case = &expected(model_dir).cases[0];
        let (a, b) = case.input_ids.split_at(case.input_ids.len() / 2);
        let mut sampler = Sampler::new(SamplingConfig::default());
        let opts = GenerateOptions { stop_on_eos: false, ..engine_opt::generation::options(MIN_EQUAL_TOKENS) };
        let batches = vec![a.to_vec(), b.to_vec()];
        let want = generate(&loaded.model, &batches, &opts, &mut sampler, &ProgressBar::hidden()).unwrap().tokens;
        for w_cpu in [0.0, 50.0] {
            let offload = tempfile::tempdir().unwrap();
            let (got, bytes) = greedy_tokens(model_dir, w_cpu, offload.path());
            assert!(bytes > 0, "{model_dir} {w_cpu}% in memory: nothing on disk");
            assert_eq!(got, want, "{model_dir}, {w_cpu}% of the weights in memory, the rest on disk");
            assert_nothing_left(offload.path());
        }
        // The KV cache on disk, whole or for half of each batch's sequences
        // (in whole sequences), with half the weights on disk too.
        for c_cpu in [0.0, 50.0] {
            let offload = tempfile::tempdir().unwrap();
            let (got, _) = greedy_tokens_with_cache(model_dir, 50.0, c_cpu, offload.path());
            assert_eq!(got, want, "{model_dir}, {c_cpu}% of the cache in memory, the rest on disk");
            assert_nothing_left(offload.path());
        }
    }
}

fn tierlm_exe() -> std::path::PathBuf {
    tierlm().unwrap_or_else(|| repo_root().join(".gpu/tierlm"))
}

#[test]
fn tierlm_streams_weights_from_disk_on_the_cpu() {
    if engine_opt::gpu::available() {
        // With a GPU these placements run on the GPU engine (gpu_tiered.rs).
        println!("skipped: a GPU is here, the GPU engine takes weights on disk");
        return;
    }
    let model = fixture("tiny-opt");
    let model = model.to_str().unwrap();
    let offload = tempfile::tempdir().unwrap();
    let off = offload.path().to_str().unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(tierlm_exe())
            .args(["generate", "--model", model, "--prompt", "Hello there", "--max-new-tokens", "8"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("new tokens for 1 prompts") && stderr.contains("peak per tier:"), "{stderr}");
        String::from_utf8(out.stdout).unwrap()
    };
    let in_memory = run(&[]);
    let from_disk = run(&["--percent", "0", "50", "0", "100", "0", "100", "--offload-dir", off]);
    assert_eq!(from_disk, in_memory, "generate with half the layers on disk");

    let out = Command::new(tierlm_exe())
        .args(["bench", "--model", model, "--percent", "0", "0", "0", "100", "0", "100", "--offload-dir", off])
        .args(["--prompt-len", "8", "--gen-len", "4", "--gpu-batch-size", "2", "--num-gpu-batches", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("on disk: weights ") && !stdout.contains("on disk: weights 0 B"), "{stdout}");
    assert!(stdout.contains("peak per tier: GPU 0.00 GB, pinned host 0.00 GB"), "{stdout}");
    assert_nothing_left(offload.path());
}
