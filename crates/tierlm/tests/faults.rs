//! Faults end to end: `tierlm generate` and `bench` with weights and KV
//! cache partly on disk, and EIO, ENOSPC and short transfers injected into
//! the disk tier (`TIERLM_DISK_FAULTS`) — on the CPU engine in CI, on the
//! GPU engine on the GPU machine (the same placement runs there) — and, on
//! the GPU machine, GPU and page-locked host allocations refused mid-run
//! (`TIERLM_ALLOC_FAULTS`). Both variables are honoured by debug builds and
//! by the GPU bundle's `fault-injection` build only. Each run either
//! recovers (a short transfer retried) with the fault-free output, or stops
//! with a clear error and exit status 1; none panics or hangs, and the
//! offload directory is left empty.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

fn repo_root() -> PathBuf {
    std::env::var_os("TIERLM_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn tierlm_exe() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_tierlm"));
    if built.is_file() {
        built
    } else {
        repo_root().join(".gpu/tierlm")
    }
}

/// Runs tierlm with disk `faults`; fails the test past `limit` (a hang).
fn run(args: &[String], faults: &str) -> Output {
    run_with(args, "TIERLM_DISK_FAULTS", faults)
}

/// Runs tierlm with `var` set to `faults`; fails the test past a minute (a hang).
fn run_with(args: &[String], var: &str, faults: &str) -> Output {
    let mut child = Command::new(tierlm_exe())
        .args(args)
        .env(var, faults)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let limit = Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{faults}: tierlm still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Whether this binary honours TIERLM_DISK_FAULTS (debug builds do).
fn faults_honoured(offload: &Path) -> bool {
    let out = run(&generate_args(offload), "bogus");
    String::from_utf8_lossy(&out.stderr).contains("TIERLM_DISK_FAULTS")
}

fn generate_args(offload: &Path) -> Vec<String> {
    let model = repo_root().join("fixtures/opt/tiny-opt");
    [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--prompt",
        "Bye",
        "--prompt",
        "Again",
        "--max-new-tokens",
        "8",
        "--gpu-batch-size",
        "3",
        "--percent",
        "0",
        "50",
        "0",
        "50",
        "0",
        "100",
        "--offload-dir",
        offload.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// What every faulty run must do: succeed with `reference`'s output, or
/// fail with a clear error; no panic, nothing left behind. Returns whether
/// it failed.
fn check(out: &Output, reference: &[u8], offload: &Path, faults: &str) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{faults}: {stderr}");
    let left: Vec<_> = std::fs::read_dir(offload).unwrap().collect();
    assert!(left.is_empty(), "{faults}: left in the offload directory: {left:?}");
    if out.status.success() {
        assert_eq!(out.stdout, reference, "{faults}: a recovered run gives the fault-free output");
        false
    } else {
        assert_eq!(out.status.code(), Some(1), "{faults}: {stderr}");
        assert!(stderr.contains("error: memory tier: "), "{faults}: {stderr}");
        true
    }
}

#[test]
fn disk_faults_stop_generate_cleanly_or_are_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let offload = tmp.path().join("offload");
    std::fs::create_dir(&offload).unwrap();
    if !faults_honoured(&offload) {
        eprintln!("skipped: this tierlm ignores TIERLM_DISK_FAULTS (a release build)");
        return;
    }
    let args = generate_args(&offload);
    let reference = run(&args, "");
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let reference = reference.stdout;

    // (faults, must fail, what the error says)
    let cases = [
        ("write:0:enospc", true, "is full: no space left"),
        ("write:5:enospc", true, "is full: no space left"),
        ("write:3:eio", true, "Input/output error"),
        ("read:0:eio", true, "Input/output error"),
        ("read:7:eio", true, "Input/output error"),
        ("read:3-40:short=100", true, "stayed short after 17 attempts"),
        ("write:2-100:short=512", true, "stayed short after 17 attempts"),
        ("read:3:short=100", false, ""),
        ("write:2:short=512", false, ""),
    ];
    for (faults, fails, says) in cases {
        let out = run(&args, faults);
        assert_eq!(check(&out, &reference, &offload, faults), fails, "{faults}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{faults}: {stderr}");
    }

    // Faults at seeded random points of the run.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut failed = 0;
    for _ in 0..12 {
        let op = if rng.random_bool(0.5) { "read" } else { "write" };
        let index = rng.random_range(0..60);
        let kind = ["eio", "enospc", "short=64", "short=256:always"][rng.random_range(0..4)];
        let faults = format!("{op}:{index}:{kind}");
        failed += usize::from(check(&run(&args, &faults), &reference, &offload, &faults));
    }
    assert!(failed > 0, "no random fault stopped a run");
}

#[test]
fn disk_faults_stop_bench_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let offload = tmp.path().join("offload");
    std::fs::create_dir(&offload).unwrap();
    if !faults_honoured(&offload) {
        eprintln!("skipped: this tierlm ignores TIERLM_DISK_FAULTS (a release build)");
        return;
    }
    let model = repo_root().join("fixtures/opt/tiny-opt");
    let args: Vec<String> = [
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--gpu-batch-size",
        "2",
        "--num-gpu-batches",
        "2",
        "--percent",
        "0",
        "50",
        "0",
        "50",
        "0",
        "100",
        "--offload-dir",
        offload.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    for faults in ["write:1:enospc", "read:9:eio", "read:4-60:short=100", "write:40:eio"] {
        let out = run(&args, faults);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{faults}: {stderr}");
        assert!(stderr.contains("error: memory tier: ") && !stderr.contains("panicked"), "{faults}: {stderr}");
        assert_eq!(std::fs::read_dir(&offload).unwrap().count(), 0, "{faults}: files left");
    }
}

/// GPU and page-locked host allocations refused at points through a
/// `generate` run on the GPU engine (weights and cache on host and disk):
/// the run stops with the tier's out-of-memory error, or succeeds with the
/// fault-free output where the index lies past its last allocation.
#[test]
fn allocation_faults_stop_the_gpu_engine_cleanly() {
    if let Some(reason) = engine_opt::gpu::unavailable_reason() {
        println!("skipped: no CUDA driver ({reason})");
        return;
    }
    const VAR: &str = "TIERLM_ALLOC_FAULTS";
    let tmp = tempfile::tempdir().unwrap();
    let offload = tmp.path().join("offload");
    std::fs::create_dir(&offload).unwrap();
    let args = generate_args(&offload);
    let bogus = run_with(&args, VAR, "bogus");
    if !String::from_utf8_lossy(&bogus.stderr).contains(VAR) {
        println!("skipped: this tierlm ignores {VAR} (a release build without fault-injection)");
        return;
    }
    assert_eq!(bogus.status.code(), Some(1), "an unreadable {VAR} is an error");
    let reference = run_with(&args, VAR, "");
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));

    let mut failed = [0usize; 2];
    for (s, (site, says)) in
        [("gpu", "out of memory on gpu"), ("pinned", "injected by TIERLM_ALLOC_FAULTS")].into_iter().enumerate()
    {
        for index in [0u32, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377] {
            let faults = format!("{site}:{index}");
            let start = Instant::now();
            let out = run_with(&args, VAR, &faults);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!stderr.contains("panicked"), "{faults}: {stderr}");
            let left: Vec<_> = std::fs::read_dir(&offload).unwrap().collect();
            assert!(left.is_empty(), "{faults}: left in the offload directory: {left:?}");
            if out.status.success() {
                assert_eq!(out.stdout, reference.stdout, "{faults}: a run past the fault gives the same output");
            } else {
                assert_eq!(out.status.code(), Some(1), "{faults}: {stderr}");
                assert!(stderr.contains(says), "{faults}: {stderr}");
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{faults}: stopped only after {:?}",
                    start.elapsed()
                );
                failed[s] += 1;
            }
            println!("{faults}: {}", if out.status.success() { "ran past it" } else { "stopped" });
        }
    }
    assert!(failed[0] >= 3 && failed[1] >= 1, "too few refusals reached: {failed:?}");
}
