//! The memory `tierlm bench` reports on the CPU engine is the memory the
//! process holds: with weights and KV cache partly on disk, the accounted
//! peak (the pageable host account, the disk tier's staging buffers and the
//! resident set before loading) is within 5% of the process's peak resident
//! set (VmHWM). Issue 13; figures in docs/reliability.md, "Memory".

use std::path::{Path, PathBuf};
use std::process::Command;

/// The binary cargo built beside this test, or the bundled one.
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

/// An OPT of about 150 MB of f16 weights (6 layers of 25 MB, a 16 MB
/// embedding): large enough that the binary's own few MB do not decide the
/// ratio, small enough for a debug build on 2 cores in seconds.
const CONFIG: &str = r#"{"model_type": "opt", "hidden_size": 1024, "num_attention_heads": 16,
    "num_hidden_layers": 6, "ffn_dim": 4096, "vocab_size": 8192, "max_position_embeddings": 64}"#;

fn bench(model: &Path, offload: &Path, percent: &[&str]) -> serde_json::Value {
    let out = Command::new(tierlm_exe())
        .args(["bench", "--model", model.to_str().unwrap(), "--dummy", "--offload-dir", offload.to_str().unwrap()])
        .args(["--prompt-len", "4", "--gen-len", "2", "--gpu-batch-size", "2", "--json", "--percent"])
        .args(percent)
        .output()
        .expect("tierlm runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
#[cfg(target_os = "linux")]
fn the_accounted_peak_is_the_resident_peak_within_5_percent() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("config.json"), CONFIG).unwrap();
    let offload = tmp.path().join("offload");
    // Half the layers and half of each batch's cache on disk.
    let percent = ["0", "50", "0", "50", "0", "100"];
    let r = bench(&model, &offload, &percent);
    let m = &r["memory"];
    let get = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("no {k} in {r}"));
    let (rss, accounted) = (get("peak_rss_bytes"), get("accounted_peak_bytes"));
    assert!(get("disk_weights_bytes") > 50_000_000 && get("disk_kv_cache_bytes") > 0, "{r}");
    assert!(accounted > 5 * get("baseline_rss_bytes"), "the model dominates the baseline: {r}");
    assert_eq!(
        get("accounted_peak_bytes"),
        get("baseline_rss_bytes") + get("host_peak_bytes") + get("disk_staging_bytes")
    );
    assert_eq!(
        r["peak_per_tier"]["pageable"].as_u64(),
        Some(get("host_peak_bytes") + get("disk_staging_bytes")),
        "{r}"
    );
    let ratio = rss as f64 / accounted as f64;
    eprintln!("VmHWM {rss} B, accounted {accounted} B, ratio {ratio:.3}");
    assert!((0.95..=1.05).contains(&ratio), "VmHWM {rss} B vs accounted {accounted} B (ratio {ratio:.3}): {r}");
}
