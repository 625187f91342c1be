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

/// The Llama family's presets are planned from their spec (grouped-query
/// cache counted by its KV heads), within what its GPU engine runs: the
/// cache and activations on the GPU, the weights searched, 4-bit or not; a
/// 4-bit cache and CPU attention refused by name.
#[test]
fn llama_presets_are_planned_within_their_gpu_engine() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common =
        ["--prompt-len", "512", "--gen-len", "32", "--num-prompts", "64", "--gpu-mem", "78G", "--host-mem", "120G"];
    let mut args = vec!["--model", "llama-3.1-70b"];
    args.extend(common);
    let v = plan_json(d, &args);
    let flags = v["flags"].as_str().unwrap().to_string();
    let words: Vec<&str> = flags.split_whitespace().collect();
    assert_eq!(words[0], "--percent", "{flags}");
    assert_eq!(words[3..7], ["100", "0", "100", "0"], "{flags}");
    let w_gpu: f64 = words[1].parse().unwrap();
    assert!(w_gpu > 0.0 && w_gpu < 100.0, "141 GB of bf16 weights do not fit 78 GB: {flags}");
    for r in v["runners_up"].as_array().unwrap() {
        let f = r["flags"].as_str().unwrap();
        let w: Vec<&str> = f.split_whitespace().collect();
        assert_eq!(w[3..7], ["100", "0", "100", "0"], "{f}");
    }
    // Everything fits an 8B model's GPU.
    let mut args = vec!["--model", "llama-3.1-8b"];
    args.extend(common);
    let v = plan_json(d, &args);
    assert!(v["flags"].as_str().unwrap().starts_with("--percent 100 0 100 0 100 0"), "{v}");
    // 4-bit weights (its engine has them; its cache stays 16-bit): the 70B
    // model's 40 GB of packed weights all fit, asked for or chosen by auto.
    for mode in ["weight", "auto"] {
        let mut args = vec!["--model", "llama-3.1-70b", "--compress", mode];
        args.extend(common);
        let v = plan_json(d, &args);
        let flags = v["flags"].as_str().unwrap();
        assert!(
            flags.starts_with("--percent 100 0 100 0 100 0") && flags.ends_with("--compress-weight"),
            "{mode}: {v}"
        );
        assert!(!flags.contains("--compress-cache"), "{mode}: {flags}");
    }
    for (extra, name) in [
        (&["--compress", "cache"][..], "--compress cache"),
        (&["--compress", "both"][..], "--compress cache"),
        (&["--cpu-cache-compute", "true"][..], "--cpu-cache-compute"),
    ] {
        let mut args = vec!["--model", "llama-3.1-70b"];
        args.extend(common);
        args.extend_from_slice(extra);
        let e = fails(d, &args);
        assert!(e.contains(name) && e.contains("Llama family's GPU engine"), "{e}");
    }
}
