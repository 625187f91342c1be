//! The GPU engine with the KV cache off the GPU, against the CPU reference
//! on the fixtures of `fixtures/opt/`: first-step logits within 2e-2,
//! greedy tokens equal for at least 16 new tokens (in one batch and in a
//! block of two), for the cache in host memory, on disk, split over GPU,
//! host and disk in whole sequences, and in host memory with the decode
//! attention on the CPU (`--cpu-cache-compute`), dense and sparse; and
//! with weights streamed at the same time.
//!
//! Every test that needs a GPU prints "skipped: no CUDA driver" and passes
//! where there is none.

mod common;
use common::*;

use engine_opt::checkpoint::Checkpoint;
use engine_opt::generation::prefill_logits as cpu_prefill_logits;
use engine_opt::gpu::generation::prefill_logits;
use engine_opt::gpu::offload::{split_layers, OffloadTiers};
use engine_opt::gpu::tiered_cache::{CachePlan, CacheTiers};
use engine_opt::gpu::{Gpu, GpuModel, WeightOrigin};
use engine_opt::OptConfig;
use tier_api::Device;

/// `name` on the GPU, weights split by `weights` (GPU, host percent; the
/// rest on disk), cache placed by `plan`.
fn model(name: &str, weights: (f64, f64), plan: CachePlan) -> (GpuModel, tempfile::TempDir) {
    let dir = fixture(name);
    let config = OptConfig::from_dir(&dir).unwrap();
    let src = Checkpoint::open(&dir).unwrap();
    let offload = tempfile::tempdir().unwrap();
    let split = split_layers(config.num_hidden_layers, weights.0, weights.1);
    let tiers = OffloadTiers::for_split(&runtime::Tiers::default(), &split, true, offload.path()).unwrap();
    let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("{e}"));
    let pb = indicatif::ProgressBar::hidden();
    let mut model = GpuModel::tiered_with(gpu, config, split, tiers, WeightOrigin::Checkpoint(&src), &pb, false)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let cache_tiers = CacheTiers::for_plan(&runtime::Tiers::default(), &plan, offload.path()).unwrap();
    model.place_cache(plan, cache_tiers).unwrap_or_else(|e| panic!("{name}: {e}"));
    (model, offload)
}

fn plan(gpu: f64, cpu: f64, cpu_compute: bool) -> CachePlan {
    CachePlan { gpu_percent: gpu, cpu_percent: cpu, cpu_compute, attn_sparsity: 1.0, compress: false }
}

fn check(model_dir: &str, weights: (f64, f64), plan: CachePlan) {
    let cpu = cpu_model(model_dir);
    let (gpu, _offload) = model(model_dir, weights, plan);
    let label = format!("{model_dir} weights {weights:?} cache {plan:?}");
    eprintln!("{label}");
    let vocab = gpu.config.vocab_size;
    for case in &expected(model_dir).cases {
        let what = format!("{label}/{}", case.name);
        let got = prefill_logits(&gpu, &case.input_ids).unwrap_or_else(|e| panic!("{what}: {e}"));
        let cpu_logits = cpu_prefill_logits(&cpu.model, &case.input_ids).unwrap();
        assert_eq!(got.len(), case.input_ids.len() * vocab);
        let d = max_abs_diff(&got, &cpu_logits);
        eprintln!("{what}: first-step logits differ from the CPU's by {d:.2e}");
        assert!(d <= LOGIT_TOLERANCE, "{what}: logits differ from the CPU's by {d}");

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
    let streamer = gpu.cache_streamer.as_ref().expect("the cache is tiered");
    if !plan.cpu_compute {
        // Every step went through the slots: something was loaded and stored.
        assert!(streamer.bytes_moved() > 0, "{label}: nothing moved through the cache slots");
    }
    let t = streamer.tiers();
    if let Some(h) = &t.host {
        assert!(h.stats().peak_resident > 0, "{label}: nothing held in host memory");
    }
    if let Some(d) = &t.disk {
        assert!(d.stats().peak_resident > 0, "{label}: nothing held on disk");
    }
}

#[test]
fn cache_on_host_matches_cpu() {
    if gpu_here("cache on host") {
        check("tiny-opt", (100.0, 0.0), plan(0.0, 100.0, false));
        check("tiny-opt-350m-style", (100.0, 0.0), plan(0.0, 100.0, false));
    }
}

#[test]
fn cache_on_disk_matches_cpu() {
    if gpu_here("cache on disk") {
        check("tiny-opt-sharded", (100.0, 0.0), plan(0.0, 0.0, false));
    }
}

#[test]
fn cache_split_in_sequences_matches_cpu() {
    if gpu_here("cache split 30/30/40") {
        // Batches of 4 (and 2) sequences: some on each tier.
        check("tiny-opt", (100.0, 0.0), plan(30.0, 30.0, false));
        check("tiny-opt-350m-style", (100.0, 0.0), plan(30.0, 30.0, false));
    }
}

#[test]
fn cpu_cache_compute_matches_cpu() {
    if gpu_here("--cpu-cache-compute") {
        check("tiny-opt", (100.0, 0.0), plan(0.0, 100.0, true));
        check("tiny-opt-350m-style", (100.0, 0.0), plan(0.0, 100.0, true));
        check("tiny-opt-sharded", (100.0, 0.0), plan(0.0, 100.0, true));
    }
}

#[test]
fn cpu_cache_compute_with_streamed_weights_matches_cpu() {
    if gpu_here("--cpu-cache-compute, weights ¾ host ¼ disk") {
        // Case C's placement on a tiny model.
        check("tiny-opt-sharded", (0.0, 75.0), plan(0.0, 100.0, true));
    }
}

#[test]
fn sparse_attention_keeping_everything_is_dense() {
    if gpu_here("--attn-sparsity") {
        // Sparsity 1 keeps every position; the tokens must not move.
        check("tiny-opt", (100.0, 0.0), CachePlan { attn_sparsity: 1.0, ..plan(0.0, 100.0, true) });
        // A sparse run generates (the values it keeps are FlexGen's top-k);
        // its first step is the GPU's dense prefill.
        let (gpu, _offload) =
            model("tiny-opt", (100.0, 0.0), CachePlan { attn_sparsity: 0.5, ..plan(0.0, 100.0, true) });
        let case = &expected("tiny-opt").cases[0];
        let cpu = cpu_model("tiny-opt");
        let got = prefill_logits(&gpu, &case.input_ids).unwrap();
        let want = cpu_prefill_logits(&cpu.model, &case.input_ids).unwrap();
        assert!(max_abs_diff(&got, &want) <= LOGIT_TOLERANCE);
        let out = gpu_greedy(&gpu, std::slice::from_ref(&case.input_ids), 8);
        assert!(out.iter().all(|s| s.len() == 8), "sparse decoding stopped early: {out:?}");
    }
}

#[test]
fn cache_plans_the_engine_cannot_run_are_refused() {
    let bad =
        CachePlan { gpu_percent: 50.0, cpu_percent: 50.0, cpu_compute: true, attn_sparsity: 1.0, compress: false };
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("--cpu-cache-compute") && err.contains("50% of it on the GPU"), "{err}");
    let sparse = CachePlan { attn_sparsity: 0.5, ..plan(0.0, 100.0, false) };
    assert!(sparse.validate().unwrap_err().to_string().contains("--cpu-cache-compute"));
    let over = plan(60.0, 60.0, false);
    assert!(over.validate().unwrap_err().to_string().contains("do not fit"));
    assert!(plan(0.0, 100.0, true).validate().is_ok());
    let packed_split = CachePlan { compress: true, ..plan(30.0, 30.0, false) };
    assert!(packed_split.validate().unwrap_err().to_string().contains("--compress-cache"));
    let packed_cpu = CachePlan { compress: true, ..plan(0.0, 100.0, true) };
    assert!(packed_cpu.validate().unwrap_err().to_string().contains("--compress-cache"));
    assert!(CachePlan { compress: true, ..plan(0.0, 100.0, false) }.validate().is_ok());
    assert!(plan(30.0, 30.0, false).validate().is_ok());
}

#[test]
fn tierlm_bench_runs_case_c_placement() {
    if !gpu_here("tierlm bench, case C's placement") {
        return;
    }
    let Some(exe) = tierlm() else {
        println!("skipped: no tierlm executable");
        return;
    };
    let model = fixture("tiny-opt-sharded");
    let (stdout, stderr) = tierlm_with_offload(
        &exe,
        &["bench", "--model", model.to_str().unwrap(), "--percent", "0", "75", "0", "100", "0", "100"]
            .into_iter()
            .chain(["--cpu-cache-compute", "--gpu-batch-size", "2", "--num-gpu-batches", "2"])
            .chain(["--prompt-len", "16", "--gen-len", "4"])
            .collect::<Vec<_>>(),
    );
    println!("{stdout}");
    assert!(stdout.contains("75.0% of their rows in"), "{stdout}");
    assert!(stdout.contains("decode attention on the CPU"), "{stdout}");
    assert!(!stderr.contains("error"), "{stderr}");
}

/// With `--compress-cache`: the prefill's logits are the f16 run's (the
/// prefill attends over the step's own keys before they are packed); each
/// later step reads keys and values back from 4 bits, so its logits stay
/// within the quantization's error of the CPU's, and the tier holds the
/// packed bytes only.
fn check_compressed(model_dir: &str, gpu_share: f64, cpu_share: f64) {
    use engine_opt::gpu::generation::GpuBatch;
    use engine_opt::gpu::model::{BatchCache, Workspace};
    let cpu = cpu_model(model_dir);
    let plan = CachePlan { compress: true, ..plan(gpu_share, cpu_share, false) };
    let (gpu, _offload) = model(model_dir, (100.0, 0.0), plan);
    let label = format!("{model_dir} 4-bit cache, {gpu_share}% GPU, {cpu_share}% host");
    let prompts = expected(model_dir).cases[0].input_ids.clone();
    let n = prompts.len();
    let steps = 6;
    let mut st = GpuBatch::new(&gpu, &prompts, steps, 1).unwrap();
    let mut ws = Workspace::new(&gpu.gpu, &gpu.config, st.rows(), n).unwrap();
    let opts = engine_opt::generation::GenerateOptions { stop_on_eos: false, ..engine_opt::generation::options(steps) };
    let mut seqs = prompts.clone();
    let mut worst = 0.0f32;
    for step in 0..steps {
        st.step(&gpu, &mut ws).unwrap_or_else(|e| panic!("{label} step {step}: {e}"));
        let got = gpu.logits_to_host(&ws, n).unwrap();
        let want = cpu_prefill_logits(&cpu.model, &seqs).unwrap();
        let d = max_abs_diff(&got, &want);
        let scale = max_abs(&want).max(1.0);
        eprintln!("{label} step {step}: logits differ from the CPU's by {d:.3e} (max |logit| {scale:.2})");
        if step == 0 {
            assert!(d <= LOGIT_TOLERANCE, "{label}: prefill logits differ by {d}");
        }
        worst = worst.max(d / scale);
        let forced: Vec<u32> = (0..n).map(|b| (5 + step * 3 + b) as u32).collect();
        for (s, t) in seqs.iter_mut().zip(&forced) {
            s.push(*t);
        }
        st.advance(&forced, &opts);
    }
    // 4-bit keys and values (groups of up to 64 along the head dimension,
    // 16 on these models' 16-value heads): measured at most 8% of the
    // logits' range on these random tiny models; that the bytes are the
    // right ones is checked exactly by `packed_cache_is_the_quantized_cache`.
    assert!(worst <= 0.15, "{label}: decode logits differ from the CPU's by {worst} of their range");
    let c = &gpu.config;
    let f16_bytes = (2
        * c.num_hidden_layers
        * n
        * c.num_attention_heads
        * (prompts.iter().map(Vec::len).max().unwrap() + steps)
        * c.head_dim()
        * 2) as u64;
    // Where the packed homes live, whichever tier that is (the GPU's share
    // includes the key mask, a byte per position).
    let BatchCache::Tiered(tc) = &st.state.cache else { panic!("{label}: the cache is not tiered") };
    let (on_gpu, on_host, on_disk) = tc.bytes();
    let held = on_gpu + on_host + on_disk;
    eprintln!("{label}: {held} bytes packed ({on_gpu} GPU, {on_host} host, {on_disk} disk) for {f16_bytes} f16 bytes");
    assert!(gpu_share < 100.0 || on_host + on_disk == 0, "{label}: a GPU-resident cache left the GPU");
    assert!(held > 0 && held * 2 < f16_bytes, "{label}: {held} bytes held for {f16_bytes} f16 bytes");
}

#[test]
fn compressed_cache_stays_within_the_quantization_error() {
    if gpu_here("--compress-cache") {
        check_compressed("tiny-opt", 0.0, 100.0);
        check_compressed("tiny-opt-350m-style", 0.0, 100.0);
        check_compressed("tiny-opt-sharded", 0.0, 0.0);
        // Resident on the GPU, 4-bit (case G's cache).
        check_compressed("tiny-opt", 100.0, 0.0);
    }
}

/// After the prefill (identical keys and values in both runs, computed by
/// the same kernels), a 4-bit cache holds byte for byte what the CPU
/// quantizer makes of the f16 cache of a run without `--compress-cache`.
#[test]
fn packed_cache_is_the_quantized_cache() {
    use engine_opt::gpu::generation::GpuBatch;
    use engine_opt::gpu::model::{BatchCache, Workspace};
    if !gpu_here("--compress-cache bytes") {
        return;
    }
    for model_dir in ["tiny-opt", "tiny-opt-350m-style"] {
        let prompts = expected(model_dir).cases[0].input_ids.clone();
        let prefill = |compress: bool| {
            let (gpu, offload) = model(model_dir, (100.0, 0.0), CachePlan { compress, ..plan(0.0, 100.0, false) });
            let mut st = GpuBatch::new(&gpu, &prompts, 4, 1).unwrap();
            let mut ws = Workspace::new(&gpu.gpu, &gpu.config, st.rows(), prompts.len()).unwrap();
            st.step(&gpu, &mut ws).unwrap();
            (gpu, offload, st)
        };
        let (plain_model, _o1, plain) = prefill(false);
        let (_packed_model, _o2, packed) = prefill(true);
        let (BatchCache::Tiered(plain), BatchCache::Tiered(packed)) = (&plain.state.cache, &packed.state.cache) else {
            panic!("{model_dir}: the caches are not tiered");
        };
        let layout = packed.packed_layout().expect("a 4-bit layout").clone();
        for j in 0..plain_model.config.num_hidden_layers {
            for (kv, (p, q)) in plain.homes(j).unwrap().iter().zip(packed.homes(j).unwrap()).enumerate() {
                let read = |t: &tier_api::SegmentedTensor| {
                    let seg = &t.segments()[0];
                    let mut bytes = vec![0u8; seg.view.byte_len()];
                    seg.view.tensor().read_bytes(0, &mut bytes).unwrap();
                    bytes
                };
                let f16s: Vec<half::f16> =
                    read(p).chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect();
                let mut want = vec![0u8; layout.total_bytes()];
                compression::quantize_into(&f16s, &layout, &mut want).unwrap();
                assert!(read(q) == want, "{model_dir}: layer {j} {}: packed bytes differ", ["keys", "values"][kv]);
            }
        }
    }
}

#[test]
fn tierlm_generate_takes_the_cache_flags() {
    if !gpu_here("tierlm generate, cache flags") {
        return;
    }
    let Some(exe) = tierlm() else {
        println!("skipped: no tierlm executable");
        return;
    };
    let offload = tempfile::tempdir().unwrap();
    let model = fixture("tiny-opt");
    let run = |extra: &[&str]| {
        std::process::Command::new(&exe)
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "Hello there", "--max-new-tokens", "8"])
            .args(extra)
            .arg("--offload-dir")
            .arg(offload.path())
            .output()
            .unwrap()
    };
    for flags in [
        &["--percent", "100", "0", "0", "100", "100", "0", "--cpu-cache-compute"][..],
        &["--percent", "100", "0", "0", "100", "100", "0", "--cpu-cache-compute", "--attn-sparsity", "0.5"],
        &["--percent", "100", "0", "0", "0", "100", "0", "--compress-cache"],
        &["--percent", "100", "0", "100", "0", "100", "0", "--compress-cache"],
    ] {
        let out = run(flags);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{flags:?}: {stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("Hello there"), "{flags:?}");
    }
    // A GPU budget nothing fits in: refused before loading, with advice.
    let out = run(&["--percent", "100", "0", "100", "0", "100", "0", "--gpu-mem", "4K"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("does not fit"), "{stderr}");
    assert_nothing_left(offload.path());
}

#[test]
fn activations_in_host_memory_or_on_disk_change_nothing() {
    if !gpu_here("activations in host memory") {
        return;
    }
    use tier_api::Device;
    // Hidden states stored to host memory after every layer and loaded back
    // before the next are the same bytes: the tokens must not move, with the
    // cache on the GPU and with the CPU's attention over a host cache.
    for cache in [plan(100.0, 0.0, false), plan(0.0, 100.0, true)] {
        let (mut gpu, _offload) = model("tiny-opt-350m-style", (100.0, 0.0), cache);
        let case = &expected("tiny-opt-350m-style").cases[0];
        let (a, b) = case.input_ids.split_at(case.input_ids.len() / 2);
        let batches = [a.to_vec(), b.to_vec()];
        let want = gpu_greedy(&gpu, &batches, MIN_EQUAL_TOKENS);
        gpu.activations = Some(engine_opt::gpu::model::ActivationTier::new(&runtime::Tiers::default(), None).unwrap());
        let got = gpu_greedy(&gpu, &batches, MIN_EQUAL_TOKENS);
        assert_eq!(got, want, "cache {cache:?}: tokens with the activations in host memory");
        let held = gpu.activations.as_ref().unwrap().host.as_ref().unwrap().stats().peak_resident;
        assert!(held > 0, "nothing was stored in host memory");
        // On disk: the same bytes through the staged disk path.
        let dir = tempfile::tempdir().unwrap();
        gpu.activations =
            Some(engine_opt::gpu::model::ActivationTier::new(&runtime::Tiers::default(), Some(dir.path())).unwrap());
        let got = gpu_greedy(&gpu, &batches, MIN_EQUAL_TOKENS);
        assert_eq!(got, want, "cache {cache:?}: tokens with the activations on disk");
        let held = gpu.activations.as_ref().unwrap().disk.as_ref().unwrap().stats().peak_resident;
        assert!(held > 0, "nothing was stored on disk");
        gpu.activations = None;
        assert_nothing_left(dir.path());
    }
}
