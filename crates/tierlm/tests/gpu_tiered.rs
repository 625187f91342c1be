//! The GPU engine with its decoder layers off the GPU (`--percent W_GPU
//! W_CPU 100 0 100 0`), streamed into two GPU slots a layer at a time,
//! against the CPU reference on the fixtures of `fixtures/opt/`: first-step
//! logits within 2e-2, greedy tokens equal for at least 16 new tokens (in
//! one batch and in a block of two), for weights in pinned host memory, in
//! pageable host memory, on disk, and split 30/30/40 (whole layers).
//!
//! Every test that needs a GPU prints "skipped: no CUDA driver" and passes
//! where there is none.

mod common;
use common::*;

use engine_opt::checkpoint::Checkpoint;
use engine_opt::generation::prefill_logits as cpu_prefill_logits;
use engine_opt::gpu::generation::prefill_logits;
use engine_opt::gpu::offload::{split_layers, OffloadTiers};
use engine_opt::gpu::{Gpu, GpuModel, WeightOrigin};
use engine_opt::OptConfig;
use tier_api::HostMemKind;
use tier_host::{HostConfig, HostDevice};

/// `name` with its layers split by `percent` (GPU, host; the rest on disk),
/// host layers in `host` memory, disk layers in a temporary directory.
fn tiered_model(name: &str, percent: (f64, f64), host: HostMemKind) -> (GpuModel, tempfile::TempDir) {
    let dir = fixture(name);
    let config = OptConfig::from_dir(&dir).unwrap();
    let src = Checkpoint::open(&dir).unwrap();
    let split = split_layers(config.num_hidden_layers, percent.0, percent.1);
    let offload = tempfile::tempdir().unwrap();
    let run_tiers = runtime::Tiers::default();
    let tiers = OffloadTiers {
        host: split.uses_host().then(|| run_tiers.host(host).unwrap()),
        disk: split.uses_disk().then(|| run_tiers.disk(offload.path()).unwrap()),
        matrix: run_tiers.matrix().unwrap(),
    };
    let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("{e}"));
    let pb = indicatif::ProgressBar::hidden();
    let model = GpuModel::tiered(gpu, config, split, tiers, WeightOrigin::Checkpoint(&src), &pb)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (model, offload)
}

fn check_tiered(model_dir: &str, percent: (f64, f64), host: HostMemKind) {
    let cpu = cpu_model(model_dir);
    let (gpu, _offload) = tiered_model(model_dir, percent, host);
    let streamer = gpu.offload.as_ref().expect("layers off the GPU");
    let split = streamer.split();
    let tiers = streamer.tiers();
    if split.uses_host() {
        let kind = tiers.host.as_ref().map(|h| h.mem_kind());
        assert_eq!(kind, Some(host), "{model_dir}: host layers in {host} memory");
    }
    let label = format!("{model_dir} split {split:?} host {host}");
    eprintln!("{label}");
    let vocab = gpu.config.vocab_size;
    let streamed_before = streamer.bytes_streamed();
    for case in &expected(model_dir).cases {
        let what = format!("{label}/{}", case.name);
        let got = prefill_logits(&gpu, &case.input_ids).unwrap_or_else(|e| panic!("{what}: {e}"));
        let cpu_logits = cpu_prefill_logits(&cpu.model, &case.input_ids).unwrap();
        assert_eq!(got.len(), case.input_ids.len() * vocab);
        let d_cpu = max_abs_diff(&got, &cpu_logits);
        eprintln!(
            "{what}: first-step logits differ from the CPU's by {d_cpu:.2e} (max |logit| {:.2})",
            max_abs(&cpu_logits)
        );
        assert!(d_cpu <= LOGIT_TOLERANCE, "{what}: logits differ from the CPU's by {d_cpu}");

        let n = case.max_new_tokens.max(MIN_EQUAL_TOKENS);
        let want = cpu_greedy(&cpu.model, std::slice::from_ref(&case.input_ids), n);
        let got = gpu_greedy(&gpu, std::slice::from_ref(&case.input_ids), n);
        check_tokens(&format!("{what} (one batch)"), &cpu.model, &case.input_ids, &got, &want);
        if case.input_ids.len() > 1 {
            let (a, b) = case.input_ids.split_at(case.input_ids.len() / 2);
            let got = gpu_greedy(&gpu, &[a.to_vec(), b.to_vec()], n);
            check_tokens(&format!("{what} (block of two batches)"), &cpu.model, &case.input_ids, &got, &want);
        }
    }
    // More than two layers off the GPU cycle through the two slots: every
    // step copies each of them again.
    let streamed = streamer.bytes_streamed() - streamed_before;
    let off = split.offloaded();
    // Every streamed layer's rows are on the tiers the split names, and
    // nowhere else.
    let (host_bytes, disk_bytes) = streamer.home_bytes();
    assert_eq!(host_bytes + disk_bytes, off as u64 * streamer.slot_bytes(), "{label}: home bytes");
    assert_eq!(host_bytes > 0, split.uses_host(), "{label}: host rows");
    assert_eq!(disk_bytes > 0, split.uses_disk(), "{label}: disk rows");
    assert_plan_matches(&gpu, percent, false);
    eprintln!("{label}: {streamed} bytes streamed, {off} layers off the GPU");
    assert!(streamed >= streamer.slot_bytes(), "{label}: nothing streamed");
    if off > 2 {
        assert!(streamed >= (MIN_EQUAL_TOKENS * off) as u64 * streamer.slot_bytes(), "{label}: layers not re-streamed");
    }
}

fn host_kind_here(kind: HostMemKind) -> bool {
    match HostDevice::new(HostConfig { kind, ..HostConfig::default() }) {
        Ok(_) => true,
        Err(e) => {
            println!("skipped: {kind} host memory is not available here ({e})");
            false
        }
    }
}

#[test]
fn weights_on_pinned_host_match_cpu() {
    if gpu_here("pinned host weights") && host_kind_here(HostMemKind::Pinned) {
        check_tiered("tiny-opt-sharded", (0.0, 100.0), HostMemKind::Pinned);
        check_tiered("tiny-opt-350m-style", (0.0, 100.0), HostMemKind::Pinned);
    }
}

#[test]
fn weights_on_pageable_host_match_cpu() {
    if gpu_here("pageable host weights") {
        check_tiered("tiny-opt-sharded", (0.0, 100.0), HostMemKind::Pageable);
        check_tiered("tiny-opt", (0.0, 100.0), HostMemKind::Pageable);
    }
}

#[test]
fn weights_on_disk_match_cpu() {
    if gpu_here("disk weights") {
        check_tiered("tiny-opt-sharded", (0.0, 0.0), HostMemKind::Pageable);
        check_tiered("tiny-opt-350m-style", (0.0, 0.0), HostMemKind::Pageable);
    }
}

#[test]
fn weights_split_30_30_40_match_cpu() {
    if gpu_here("30/30/40 split") {
        let kind = if host_kind_here(HostMemKind::Pinned) { HostMemKind::Pinned } else { HostMemKind::Pageable };
        // 3 layers: one on the GPU; the other two's rows 45% on the host
        // (30% of the model), 55% on disk.
        let split = split_layers(3, 30.0, 30.0);
        assert_eq!((split.gpu_end, split.host_percent), (1, 45.0));
        check_tiered("tiny-opt-sharded", (30.0, 30.0), kind);
    }
}

#[test]
fn layer_split_gpu_by_layers_host_and_disk_by_rows() {
    let s = split_layers(32, 0.0, 100.0);
    assert_eq!((s.gpu_end, s.host_percent, s.layers), (0, 100.0, 32));
    assert!(s.uses_host() && !s.uses_disk());
    let s = split_layers(40, 0.0, 75.0);
    assert_eq!(s.rows(5120), [0..3840, 3840..5120], "case C: a quarter of every layer's rows on disk");
    let s = split_layers(48, 20.0, 50.0);
    assert_eq!(s.gpu_end, 10);
    // 50% of 48 layers over the 38 streamed ones.
    assert!((s.host_percent - 50.0 * 48.0 / 38.0).abs() < 1e-9);
    let s = split_layers(2, 100.0, 0.0);
    assert!(!s.streams() && !s.uses_host() && !s.uses_disk());
    let s = split_layers(4, 60.0, 60.0);
    assert_eq!((s.gpu_end, s.host_percent), (2, 100.0), "shares past 100% are cut");
    let s = split_layers(4, 0.0, 0.0);
    assert_eq!(s.rows(7), [0..0, 0..7]);
    assert!(s.uses_disk() && !s.uses_host());
}

#[test]
fn tierlm_bench_streams_weights_from_the_host() {
    if !gpu_here("tierlm bench, weights on the host") {
        return;
    }
    let Some(exe) = tierlm() else {
        println!("skipped: no tierlm executable");
        return;
    };
    let model = fixture("tiny-opt-sharded");
    let (stdout, _) = tierlm_with_offload(
        &exe,
        &["bench", "--model", model.to_str().unwrap(), "--percent", "30", "30", "100", "0", "100", "0"]
            .into_iter()
            .chain(["--gpu-batch-size", "2", "--num-gpu-batches", "2", "--prompt-len", "16", "--gen-len", "4"])
            .collect::<Vec<_>>(),
    );
    println!("{stdout}");
    assert!(stdout.contains("weights: 1 of 3 layers resident on the GPU, 2 streamed (45.0% of their rows"), "{stdout}");
    assert!(stdout.contains("bound by"), "{stdout}");
    assert!(stdout.contains("peak per tier: GPU"), "{stdout}");
}

/// `tierlm` with `args`: (success, stdout, stderr).
fn run_tierlm(exe: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(exe).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn tierlm_generate_streams_weights_like_all_gpu() {
    if !gpu_here("tierlm generate, weights streamed") {
        return;
    }
    let Some(exe) = tierlm() else {
        println!("skipped: no tierlm executable");
        return;
    };
    let offload = tempfile::tempdir().unwrap();
    let model = fixture("tiny-opt-sharded");
    let input = offload.path().join("input.jsonl");
    std::fs::write(&input, "{\"input_ids\": [2, 100, 200, 300, 42]}\n{\"input_ids\": [2, 7, 9]}\n").unwrap();
    let gen = ["generate", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()];
    let gen = [&gen[..], &["--max-new-tokens", "12"]].concat();
    let all_gpu = ["--percent", "100", "0", "100", "0", "100", "0"];
    let (ok, want, err) = run_tierlm(&exe, &[&gen[..], &all_gpu].concat());
    assert!(ok, "all on the GPU: {err}");
    assert!(want.contains("output_ids"), "{want}");
    let streamed = ["--percent", "30", "30", "100", "0", "100", "0", "--offload-dir", offload.path().to_str().unwrap()];
    for extra in [&[][..], &["--pin-weight", "false"][..]] {
        let (ok, got, err) = run_tierlm(&exe, &[&gen[..], &streamed, extra].concat());
        assert!(ok, "streamed {extra:?}: {err}");
        assert_eq!(got, want, "streamed {extra:?}: output ids differ from the all-GPU run's");
    }
}

#[test]
fn tierlm_bench_gpu_mem_refuses_what_does_not_fit() {
    if !gpu_here("tierlm bench --gpu-mem") {
        return;
    }
    let Some(exe) = tierlm() else {
        println!("skipped: no tierlm executable");
        return;
    };
    let offload = tempfile::tempdir().unwrap();
    let bench = ["bench", "--model", "opt-1.3b", "--dummy", "--prompt-len", "512", "--gen-len", "32"];
    let bench = [&bench[..], &["--gpu-batch-size", "32", "--num-gpu-batches", "2", "--gpu-mem", "1M"]].concat();
    let dir = ["--offload-dir", offload.path().to_str().unwrap()];
    for percent in [["0", "100", "100", "0", "100", "0"], ["100", "0", "100", "0", "100", "0"]] {
        let (ok, stdout, stderr) = run_tierlm(&exe, &[&bench[..], &["--percent"], &percent, &dir].concat());
        assert!(!ok, "{percent:?} fits 1 MiB? {stdout}");
        assert!(stderr.contains("the policy does not fit this machine"), "{percent:?}: {stderr}");
        assert!(stderr.contains("needs"), "{percent:?}: {stderr}");
        assert!(!stdout.contains("prefill:"), "{percent:?}: refused before running: {stdout}");
    }
}

#[test]
fn many_streamed_layers_equal_the_resident_model() {
    if !gpu_here("ten streamed layers") {
        return;
    }
    // Ten layers of tiny-opt's shape, seeded: enough streamed layers for the
    // four slots and two copies in flight, rows split 60/40 over host and
    // disk. The same seed makes the same weights on both models, and both
    // compute with the same kernels, so the results must agree exactly.
    let mut config = OptConfig::from_dir(&fixture("tiny-opt")).unwrap();
    config.num_hidden_layers = 10;
    let pb = indicatif::ProgressBar::hidden();
    let resident = GpuModel::dummy(Gpu::new(0).unwrap(), config.clone(), 7).unwrap();
    let offload = tempfile::tempdir().unwrap();
    let split = split_layers(10, 20.0, 48.0);
    assert_eq!((split.gpu_end, split.host_percent), (2, 60.0));
    let tiers = OffloadTiers::for_split(&runtime::Tiers::default(), &split, true, offload.path()).unwrap();
    let mut streamed =
        GpuModel::tiered(Gpu::new(0).unwrap(), config, split, tiers, WeightOrigin::Seeded(7), &pb).unwrap();
    // --sep-layer: each layer's attention computes while its MLP weights
    // may still be arriving.
    streamed.offload.as_mut().unwrap().set_sep_layer(true);
    let s = streamed.offload.as_ref().unwrap();
    assert_eq!(s.slot_count(), engine_opt::gpu::offload::MAX_SLOTS);
    let prompts: Vec<Vec<u32>> = vec![vec![2, 11, 12, 13, 14, 15, 16], vec![2, 300, 301, 302], vec![2, 5]];
    let a = prefill_logits(&resident, &prompts).unwrap();
    let b = prefill_logits(&streamed, &prompts).unwrap();
    assert_eq!(a, b, "prefill logits of the streamed model");
    let want = gpu_greedy(&resident, &[prompts[..2].to_vec(), prompts[2..].to_vec()], 12);
    let before = s.bytes_streamed();
    let got = gpu_greedy(&streamed, &[prompts[..2].to_vec(), prompts[2..].to_vec()], 12);
    assert_eq!(got, want, "greedy tokens of the streamed model");
    // Eight streamed layers through four slots: every step copies each again.
    assert!(s.bytes_streamed() - before >= 11 * 8 * s.slot_bytes(), "layers not re-streamed every step");
}
