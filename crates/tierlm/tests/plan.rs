//! `tierlm plan` and `tierlm calibrate` as a user runs them: the chosen
//! policy and its prediction from fixed rates, pinned flags kept, budgets
//! no policy fits, sizes near 2^64 refused, and the first use that
//! measures the rates and caches them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tierlm_exe() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_tierlm"));
    if built.is_file() {
        built
    } else {
        let root = std::env::var_os("TIERLM_REPO_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
        root.join(".gpu/tierlm")
    }
}

/// Fixed rates: the nominal figures with a slow disk, in the calibration
/// file format.
fn rates_file(dir: &Path) -> PathBuf {
    let path = dir.join("rates.json");
    let rates = serde_json::json!({
        "h2d_pinned": 25.0e9, "d2h_pinned": 25.0e9, "h2d_registered": 25.0e9,
        "h2d_pageable": 12.0e9, "d2h_pageable": 12.0e9, "disk_read": 2.0e9, "disk_write": 1.5e9,
        "host_memcpy": 10.0e9, "gpu_mem": 2.0e12, "gpu_flops": 300.0e12, "cpu_attention": 20.0e9
    });
    let file = serde_json::json!({
        "format": 1,
        "machine": {"gpu": "test", "cpu_model": "test", "host_memory": 1, "offload_fs": "test"},
        "rates": rates, "measured": [], "notes": [], "seconds": 0.0
    });
    std::fs::write(&path, file.to_string()).unwrap();
    path
}

fn plan(dir: &Path, args: &[&str]) -> Output {
    Command::new(tierlm_exe())
        .arg("plan")
        .args(args)
        .args(["--offload-dir", dir.to_str().unwrap()])
        .env("TIERLM_CALIBRATION", rates_file(dir))
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .output()
        .unwrap()
}

fn plan_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = plan(dir, &all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tierlm plan {args:?} failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = plan(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "tierlm plan {args:?} should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn plan_prints_the_flags_prediction_tiers_links_and_runners_up() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--model", "opt-1.3b", "--gpu-mem", "2G", "--host-mem", "16G", "--num-prompts", "8"];
    let out = plan(dir.path(), &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "chosen: tierlm bench --model opt-1.3b",
        "--percent",
        "predicted: prefill",
        "bytes per tier:",
        "per link, per step of one block:",
        "bound by",
        "next candidates:",
        "rates.json",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    let j = plan_json(dir.path(), &args);
    // 2.6 GB of weights on a 2 GiB GPU: some are streamed.
    let pct: Vec<f64> =
        j["flags"].as_str().unwrap().split_whitespace().skip(1).take(6).map(|w| w.parse().unwrap()).collect();
    assert!(pct[0] < 100.0, "{pct:?}");
    let total = &j["prediction"]["footprint"];
    let gpu: u64 =
        ["weights", "cache", "activations", "buffers"].iter().map(|k| total[k]["gpu"].as_u64().unwrap()).sum();
    assert!(gpu <= 2 << 30, "GPU bytes {gpu} within the budget");
    assert!(j["prediction"]["total_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(j["runners_up"].as_array().unwrap().len() <= 3);
}

#[test]
fn ample_budgets_put_everything_on_the_gpu_and_pins_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let j = plan_json(dir.path(), &["--model", "opt-125m", "--gpu-mem", "64G", "--num-prompts", "4", "--gen-len", "8"]);
    let flags = j["flags"].as_str().unwrap();
    assert!(flags.starts_with("--percent 100 0 100 0 100 0 --gpu-batch-size 4 --num-gpu-batches 1"), "{flags}");

    let j = plan_json(
        dir.path(),
        &[
            "--model",
            "opt-125m",
            "--gpu-mem",
            "64G",
            "--num-prompts",
            "4",
            "--gpu-batch-size",
            "2",
            "--sep-layer",
            "false",
        ],
    );
    let flags = j["flags"].as_str().unwrap();
    assert!(flags.contains("--gpu-batch-size 2 ") && flags.contains("--sep-layer false"), "{flags}");
    let j = plan_json(
        dir.path(),
        &["--model", "opt-125m", "--gpu-mem", "64G", "--percent", "0", "100", "100", "0", "100", "0"],
    );
    assert!(j["flags"].as_str().unwrap().starts_with("--percent 0 100 100 0 100 0 "), "{}", j["flags"]);
}

#[test]
fn budgets_no_policy_fits_and_sizes_near_2_64_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        fails(dir.path(), &["--model", "opt-6.7b", "--gpu-mem", "64M", "--host-mem", "64M", "--num-prompts", "1"]);
    for want in ["no policy fits", "GPU: needs", "host: needs", "disk: needs"] {
        assert!(err.contains(want), "{want:?} in {err}");
    }
    let err = fails(dir.path(), &["--model", "opt-125m", "--gpu-mem", "99999999999999999G"]);
    assert!(err.contains("too large"), "{err}");
    let err = fails(dir.path(), &["--model", "opt-125m", "--gpu-mem", "1G", "--num-prompts", "18446744073709551615"]);
    assert!(err.contains("too many"), "{err}");
    let err = fails(
        dir.path(),
        &[
            "--model",
            "opt-125m",
            "--gpu-mem",
            "1G",
            "--gpu-batch-size",
            "4294967296",
            "--num-gpu-batches",
            "4294967296",
        ],
    );
    assert!(err.contains("prompts in one block"), "{err}");
    let err = fails(dir.path(), &["--model", "opt-125m", "--gpu-mem", "1G", "--prompt-len", "18446744073709551615"]);
    assert!(err.contains("positions"), "{err}");
    let err = fails(dir.path(), &["--model", "opt-125m", "--gpu-mem", "1G", "--objective", "fastest"]);
    assert!(err.contains("decode or total"), "{err}");
}

#[test]
fn a_bad_calibration_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"format\": 1, \"rates\": ").unwrap();
    let out = Command::new(tierlm_exe())
        .args(["plan", "--model", "opt-125m", "--gpu-mem", "1G", "--calibration", bad.to_str().unwrap()])
        .env("XDG_CACHE_HOME", dir.path().join("cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.json: not a calibration file"), "{err}");
}

/// The first use measures the rates (saying so) and caches them; a second
/// use reads the cache; a corrupt cache is measured again.
#[test]
fn first_use_calibrates_and_caches() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let run = || {
        Command::new(tierlm_exe())
            .args(["plan", "--model", "opt-125m", "--gpu-mem", "4G", "--num-prompts", "2", "--gen-len", "4"])
            .args(["--offload-dir", dir.path().to_str().unwrap()])
            .env("XDG_CACHE_HOME", &cache)
            .env_remove("TIERLM_CALIBRATION")
            .output()
            .unwrap()
    };
    let first = run();
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    assert!(err.contains("measuring this machine's rates") && err.contains("first use"), "{err}");
    let files: Vec<PathBuf> = std::fs::read_dir(cache.join("tierlm")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let second = run();
    assert!(!String::from_utf8_lossy(&second.stderr).contains("measuring"), "cached");
    std::fs::write(&files[0], "{ truncated").unwrap();
    let third = run();
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(third.status.success() && err.contains("unreadable"), "{err}");
}

/// `--policy auto` on a machine without a GPU: the CPU engine runs as
/// without it (everything in host memory), and says so when it was asked
/// for; the options of the search alone are refused with a hand placement.
#[test]
fn policy_auto_without_a_gpu_keeps_the_cpu_default() {
    let Ok(None) = tier_cuda_probe() else {
        println!("skipped: a GPU is here");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bench = |extra: &[&str]| {
        Command::new(tierlm_exe())
            .args(["bench", "--model", "opt-125m", "--dummy", "--prompt-len", "4", "--gen-len", "2", "--json"])
            .args(extra)
            .env("TIERLM_CALIBRATION", rates_file(dir.path()))
            .output()
            .unwrap()
    };
    let out = bench(&["--policy", "auto"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("--policy auto: no GPU here"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["engine"], "cpu");
    assert_eq!(r["percent"], serde_json::json!([0.0, 100.0, 0.0, 100.0, 0.0, 100.0]));
    // The search is the default: without --policy the run is the same,
    // quietly (nothing was asked that the machine cannot do).
    let out = bench(&["--num-prompts", "8"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("no GPU here"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["engine"], "cpu");
    // A hand placement (--percent or --policy manual) refuses the search's options.
    for extra in [
        &["--policy", "manual", "--num-prompts", "8"][..],
        &["--percent", "0", "100", "0", "100", "0", "100", "--host-mem", "1G"],
    ] {
        let out = bench(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("is read by the policy search only"), "{extra:?}: {err}");
    }
}

fn tier_cuda_probe() -> Result<Option<()>, ()> {
    // The binary's own probe: `copy-matrix` names the GPU or says there is none.
    let out = Command::new(tierlm_exe()).arg("copy-matrix").output().map_err(|_| ())?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(if text.to_lowercase().contains("no cuda driver") { None } else { Some(()) })
}

/// The six percentages of a policy's flags.
fn percents(flags: &str) -> Vec<f64> {
    let words: Vec<&str> = flags.split_whitespace().collect();
    assert_eq!(words[0], "--percent", "{flags}");
    words[1..7].iter().map(|w| w.parse().unwrap_or_else(|_| panic!("{w} in {flags}"))).collect()
}

/// The best policy's flags and every runner-up's.
fn every_flags(v: &serde_json::Value) -> Vec<String> {
    let mut all = vec![v["flags"].as_str().unwrap().to_string()];
    all.extend(v["runners_up"].as_array().unwrap().iter().map(|r| r["flags"].as_str().unwrap().to_string()));
    all
}

/// Asserts what the Llama family's GPU engine keeps fixed in every
/// candidate: the activations on the GPU (none of their bytes elsewhere in
/// the chosen one), and a 4-bit cache on one tier.
fn llama_engine_runs(v: &serde_json::Value) {
    for flags in every_flags(v) {
        let p = percents(&flags);
        assert_eq!(p[4..], [100.0, 0.0], "activations on the GPU: {flags}");
        if flags.contains("--compress-cache") {
            let on = [p[2], p[3], 100.0 - p[2] - p[3]].iter().filter(|&&x| x > 0.0).count();
            assert_eq!(on, 1, "a 4-bit cache on one tier: {flags}");
        }
        if flags.contains("--cpu-cache-compute") {
            assert_eq!(p[2..4], [0.0, 100.0], "CPU attention over a cache in host memory: {flags}");
        }
    }
    let act = &v["prediction"]["footprint"]["activations"];
    for tier in ["pinned", "pageable", "disk"] {
        assert_eq!(act[tier].as_u64(), Some(0), "activations' {tier} bytes: {v}");
    }
}

/// The KV cache's bytes of the chosen policy: (on the GPU, in all).
fn cache_bytes(v: &serde_json::Value) -> (u64, u64) {
    let c = &v["prediction"]["footprint"]["cache"];
    let all = ["gpu", "pinned", "pageable", "disk"].iter().map(|t| c[t].as_u64().unwrap()).sum();
    (c["gpu"].as_u64().unwrap(), all)
}

/// The Llama family's presets are planned from their spec (grouped-query
/// cache counted by its KV heads), within what its GPU engine runs: the
/// activations on the GPU; the weights, the cache (its shares, CPU
/// attention, 4-bit on one tier) searched as for OPT; activations placed
/// off the GPU by hand refused by name.
#[test]
fn llama_presets_are_planned_within_their_gpu_engine() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common =
        ["--prompt-len", "512", "--gen-len", "32", "--num-prompts", "64", "--gpu-mem", "78G", "--host-mem", "120G"];
    let mut args = vec!["--model", "llama-3.1-70b"];
    args.extend(common);
    let v = plan_json(d, &args);
    llama_engine_runs(&v);
    let w_gpu = percents(v["flags"].as_str().unwrap())[0];
    assert!(w_gpu > 0.0 && w_gpu < 100.0, "141 GB of bf16 weights do not fit 78 GB: {v}");
    // Everything fits an 8B model's GPU.
    let mut args = vec!["--model", "llama-3.1-8b"];
    args.extend(common);
    let v = plan_json(d, &args);
    assert!(v["flags"].as_str().unwrap().starts_with("--percent 100 0 100 0 100 0"), "{v}");
    // 4-bit weights: the 70B model's 40 GB of packed weights all fit,
    // asked for or chosen by auto (whatever it does with the cache).
    for mode in ["weight", "auto"] {
        let mut args = vec!["--model", "llama-3.1-70b", "--compress", mode];
        args.extend(common);
        let v = plan_json(d, &args);
        llama_engine_runs(&v);
        let flags = v["flags"].as_str().unwrap();
        assert!(flags.starts_with("--percent 100 0 ") && flags.contains("--compress-weight"), "{mode}: {v}");
        if mode == "weight" {
            assert!(!flags.contains("--compress-cache"), "{flags}");
        }
    }
    // The activations off the GPU, pinned in a search, are refused naming
    // the flag (the search keeps this family's on the GPU until their path
    // is measured); OPT's are searched.
    for act in [["0", "100"], ["0", "0"], ["50", "50"]] {
        let mut args = vec!["--model", "llama-3.1-70b", "--percent", "40", "60", "100", "0", act[0], act[1]];
        args.extend(common);
        let e = fails(d, &args);
        assert!(
            e.contains("--percent with the activations off the GPU")
                && e.contains("Llama family's activations on the GPU")
                && e.contains("C_GPU C_CPU 100 0"),
            "{e}"
        );
    }
    let v = plan_json(d, &["--model", "opt-125m", "--gpu-mem", "8G", "--percent", "100", "0", "100", "0", "0", "100"]);
    assert!(v["flags"].as_str().unwrap().starts_with("--percent 100 0 100 0 0 100 "), "{v}");
}

/// A Llama block whose KV cache does not fit the GPU beside the weights:
/// the search moves the cache off the GPU (host memory, disk, or CPU
/// attention over host memory), 4-bit where allowed, and keeps the
/// activations on the GPU; pinned cache flags are kept.
#[test]
fn llama_cache_moves_off_the_gpu_and_activations_stay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 256 prompts of 1056 positions: an 82.5 GiB bf16 cache, a 40 GiB GPU;
    // host memory for all of it beside the weights (whatever disk is free).
    let common = [
        "--model",
        "llama-3.1-70b",
        "--prompt-len",
        "1024",
        "--gen-len",
        "32",
        "--num-prompts",
        "256",
        "--gpu-mem",
        "40G",
        "--host-mem",
        "400G",
    ];
    let with = |extra: &[&str]| {
        let mut args = common.to_vec();
        args.extend_from_slice(extra);
        let v = plan_json(d, &args);
        llama_engine_runs(&v);
        v
    };
    let v = with(&[]);
    let flags = v["flags"].as_str().unwrap();
    assert!(percents(flags)[2] < 100.0, "the cache moves: {flags}");
    let (gpu, all) = cache_bytes(&v);
    assert!(gpu < all, "cache bytes off the GPU: {v}");
    // A pinned block of all the prompts: the cache of a block that large
    // cannot be on the GPU at all.
    let block = ["--gpu-batch-size", "64", "--num-gpu-batches", "4"];
    let v = with(&block);
    let (gpu, all) = cache_bytes(&v);
    assert!(all > 80 << 30 && gpu < 40 << 30, "{v}");
    // CPU attention pinned: the cache all in host memory.
    let v = with(&["--cpu-cache-compute", "true"]);
    let flags = v["flags"].as_str().unwrap();
    assert!(flags.contains("--cpu-cache-compute") && percents(flags)[2..4] == [0.0, 100.0], "{flags}");
    // ... or pinned off: the search keeps it off.
    let v = with(&["--cpu-cache-compute", "false"]);
    assert!(every_flags(&v).iter().all(|f| !f.contains("--cpu-cache-compute")), "{v}");
    // A 4-bit cache asked for: on one tier (checked above), every
    // candidate; the same block's cache in under a third of the bytes.
    let v = with(&["--compress", "cache"]);
    assert!(every_flags(&v).iter().all(|f| f.contains("--compress-cache") && !f.contains("--compress-weight")), "{v}");
    let v = with(&[&block[..], &["--compress", "cache"]].concat());
    let (_, packed) = cache_bytes(&v);
    assert!(packed < all / 3, "4-bit: {packed} of {all}");
}

/// `--compress auto` for a Llama model may choose the 4-bit cache: 64
/// prompts of 2080 positions (a 40.6 GiB bf16 cache) on a 78 GiB GPU, where
/// 4-bit weights and cache together keep everything on the GPU.
#[test]
fn llama_compress_auto_may_choose_a_4bit_cache() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--model",
        "llama-3.1-70b",
        "--prompt-len",
        "2048",
        "--gen-len",
        "32",
        "--num-prompts",
        "64",
        "--gpu-mem",
        "78G",
        "--host-mem",
        "200G",
        "--compress",
        "auto",
    ];
    let v = plan_json(dir.path(), &args);
    llama_engine_runs(&v);
    let flags = v["flags"].as_str().unwrap();
    assert!(flags.contains("--compress-cache"), "{v}");
    assert!(v["note"].as_str().is_some_and(|n| n.contains("4-bit")), "{v}");
    // Without --compress, the same run is planned 16-bit.
    let v = plan_json(dir.path(), &args[..args.len() - 2]);
    llama_engine_runs(&v);
    assert!(every_flags(&v).iter().all(|f| !f.contains("--compress")), "{v}");
}
