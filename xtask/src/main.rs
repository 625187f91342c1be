//! # xtask: the project's own automation
//!
//! `cargo xtask ci` runs what CI runs: the formatting check, clippy with
//! warnings denied, and every test of the workspace (the input fuzzer for
//! its default minute among them). `cargo xtask fuzz [SECONDS]` runs the
//! fuzzer longer. `cargo xtask gpu-bundle`
//! builds the release binaries and the test executables into `.gpu/` with a
//! script that runs them all on the GPU machine (which has no Rust toolchain);
//! `--only NAME,...` keeps just those executables, unpacked, so that a
//! session's bundle stays well under what the device tool carries.
//!
//! It depends on no tierlm crate; it only drives cargo.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("gpu-bundle") => match only_arg(&args[1..]) {
            Ok(only) => gpu_bundle(only.as_deref()),
            Err(e) => Err(e),
        },
        Some("fuzz") => fuzz(args.get(1).map(String::as_str)),
        _ => {
            eprintln!("usage: cargo xtask <ci | gpu-bundle | fuzz [SECONDS]>");
            eprintln!("  ci          formatting check, clippy -D warnings, all tests");
            eprintln!("  gpu-bundle  release binaries and test executables into .gpu/ for the GPU machine");
            eprintln!("              (--only NAME,NAME: just those, e.g. ops--test--llm_gpu)");
            eprintln!("  fuzz        the input fuzzer for SECONDS in all (default 600; CI runs 60)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// The bundle honours the fault-injection variables (the GPU machine's
/// fault tests need them; unset, they cost one atomic add per GPU allocation).
const FAULTS: &str = "tierlm/fault-injection";

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(step: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: {step}: {cmd:?}");
    let status = cmd.status().map_err(|e| format!("{step}: cannot start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{step} failed ({status})"))
    }
}

fn ci() -> Result<(), String> {
    run("format check", cargo().args(["fmt", "--all", "--", "--check"]))?;
    run("clippy", cargo().args(["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]))?;
    run("tests", cargo().args(["test", "--workspace", "--locked"]))?;
    Ok(())
}

/// The fuzz targets of `crates/tierlm/tests/fuzz_inputs.rs` for longer
/// than CI's minute: `TIERLM_FUZZ_SECS` seconds shared among them.
fn fuzz(secs: Option<&str>) -> Result<(), String> {
    let secs = secs.unwrap_or("600");
    secs.parse::<f64>().map_err(|_| format!("fuzz: {secs:?} is not a number of seconds"))?;
    run(
        "fuzz",
        cargo().env("TIERLM_FUZZ_SECS", secs).args([
            "test",
            "-p",
            "tierlm",
            "--test",
            "fuzz_inputs",
            "--locked",
            "--",
            "--nocapture",
        ]),
    )
}

/// `--only NAME,NAME` of `gpu-bundle`, if given.
fn only_arg(args: &[String]) -> Result<Option<Vec<String>>, String> {
    match args {
        [] => Ok(None),
        [flag, list] if flag == "--only" => {
            let names: Vec<String> =
                list.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect();
            if names.is_empty() {
                return Err("gpu-bundle --only: no executable named".into());
            }
            Ok(Some(names))
        }
        _ => Err(format!("gpu-bundle: unexpected arguments {args:?} (usage: gpu-bundle [--only NAME,NAME])")),
    }
}

/// The executables `only` keeps of `names` (all when `None`); an unknown
/// name is an error that lists the known ones.
fn select(names: Vec<String>, only: Option<&[String]>) -> Result<Vec<String>, String> {
    let Some(only) = only else { return Ok(names) };
    let unknown: Vec<&String> = only.iter().filter(|n| !names.contains(n)).collect();
    if !unknown.is_empty() {
        return Err(format!("gpu-bundle --only: no test executable {unknown:?}; there are: {}", names.join(" ")));
    }
    Ok(names.into_iter().filter(|n| only.contains(n)).collect())
}

fn gpu_bundle(only: Option<&[String]>) -> Result<(), String> {
    let root = root();
    let out = root.join(".gpu");
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| format!("cannot clear {}: {e}", out.display()))?;
    }
    // The test executables (tens of MiB, each linking the engine) travel as
    // one gzipped tarball, a third of their size: the device tool carries
    // 64 MiB at most. run-tests.sh unpacks it on the GPU machine.
    let staging = root.join("target/gpu-bundle");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| format!("cannot clear {}: {e}", staging.display()))?;
    }
    let tests_dir = staging.join("tests");
    std::fs::create_dir_all(&tests_dir).map_err(|e| format!("cannot create {}: {e}", tests_dir.display()))?;
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    run(
        "release binaries",
        cargo().args(["build", "--release", "--workspace", "--bins", "--locked", "--features", FAULTS]),
    )?;
    let bin = root.join("target/release/tierlm");
    copy_stripped(&bin, &out.join("tierlm"))?;

    // Test executables: ask cargo where it put them.
    eprintln!("xtask: building release test executables");
    let output = cargo()
        .args([
            "test",
            "--release",
            "--workspace",
            "--locked",
            "--no-run",
            "--message-format=json",
            "--features",
            FAULTS,
        ])
        .output()
        .map_err(|e| format!("cannot run cargo test --no-run: {e}"))?;
    if !output.status.success() {
        return Err(format!("building tests failed:\n{}", String::from_utf8_lossy(&output.stderr)));
    }
    let mut names = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(target)) = (msg.get("executable").and_then(|v| v.as_str()), msg.get("target")) else {
            continue;
        };
        let name = target.get("name").and_then(|v| v.as_str()).unwrap_or("test");
        let kind = target
            .get("kind")
            .and_then(|v| v.as_array())
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .unwrap_or("test");
        // Only test harnesses: `--no-run` also reports the plain binaries
        // (tierlm itself), which take no test flags.
        let harness = msg.pointer("/profile/test").and_then(|v| v.as_bool()).unwrap_or(false);
        if kind == "example" || kind == "bench" || !harness {
            continue;
        }
        let package = msg.get("package_id").and_then(|v| v.as_str()).map(package_name).unwrap_or("pkg");
        let file = format!("{package}--{kind}--{name}").replace(['/', ' '], "_");
        copy_stripped(Path::new(exe), &tests_dir.join(&file))?;
        names.push(file);
    }
    names.sort();
    names.dedup();
    let names = select(names, only)?;
    let script = format!(
        r#"#!/usr/bin/env bash
# Runs the bundle's tierlm test executables on the GPU machine. Made by `cargo xtask gpu-bundle`.
# Usage (from the repository root): bash .gpu/run-tests.sh [LOGDIR]
set -u
logdir="${{1:-${{OUT:-/tmp}}}}"
mkdir -p "$logdir"
export TIERLM_REPO_ROOT="$(pwd)"
# The input fuzzer's minute runs in CI; a few seconds of it here suffice.
export TIERLM_FUZZ_SECS="${{TIERLM_FUZZ_SECS:-10}}"
[ -d .gpu/tests ] || tar -C .gpu -xzf .gpu/tests.tar.gz || {{ echo "cannot unpack .gpu/tests.tar.gz"; exit 1; }}
pass=0; fail=0; failed=""
for t in {tests}; do
  if ".gpu/tests/$t" --test-threads=1 >"$logdir/$t.log" 2>&1; then
    pass=$((pass+1)); echo "ok    $t ($(grep -h '^test result' "$logdir/$t.log" | tail -1))"
  else
    fail=$((fail+1)); failed="$failed $t"; echo "FAIL  $t"; tail -20 "$logdir/$t.log"
  fi
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
"#,
        tests = names.join(" ")
    );
    if only.is_some() {
        // A few executables: carried as they are, unpacked.
        let dir = out.join("tests");
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        for n in &names {
            std::fs::copy(tests_dir.join(n), dir.join(n)).map_err(|e| format!("cannot copy {n}: {e}"))?;
        }
    } else {
        let tarball = out.join("tests.tar.gz");
        run("test tarball", Command::new("tar").arg("-C").arg(&staging).arg("-czf").arg(&tarball).arg("tests"))?;
    }
    let script_path = out.join("run-tests.sh");
    std::fs::write(&script_path, script).map_err(|e| format!("cannot write {}: {e}", script_path.display()))?;
    let size: u64 = walk_size(&out);
    eprintln!("xtask: .gpu/ holds tierlm and {} test executables, {:.1} MiB", names.len(), size as f64 / 1048576.0);
    if size > 60 << 20 {
        eprintln!("xtask: warning: .gpu/ is over 60 MiB; the device tool carries at most 64 MiB in all");
    }
    Ok(())
}

/// The package name in a cargo package id: `path+file:///a/b/tier-api#0.1.0`
/// (the directory names it) or `path+file:///a/b/xtask#name@0.1.0`.
fn package_name(id: &str) -> &str {
    let (path, fragment) = id.rsplit_once('#').unwrap_or((id, ""));
    match fragment.split_once('@') {
        Some((name, _)) => name,
        None => path.rsplit('/').next().unwrap_or(path),
    }
}

fn copy_stripped(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to).map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))?;
    // Debug info is most of a test executable's size; the device tool carries 64 MiB at most.
    let stripped = Command::new("strip").arg("--strip-all").arg(to).status();
    if !matches!(stripped, Ok(s) if s.success()) {
        eprintln!("xtask: note: could not strip {}; carrying it whole", to.display());
    }
    Ok(())
}

fn walk_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk_size(&p)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_keeps_the_named_executables_and_names_the_unknown() {
        let all = strings(&["a--test--x", "b--lib--b", "c--test--y"]);
        assert_eq!(select(all.clone(), None).unwrap(), all);
        assert_eq!(
            select(all.clone(), Some(&strings(&["c--test--y", "a--test--x"]))).unwrap(),
            strings(&["a--test--x", "c--test--y"])
        );
        let e = select(all, Some(&strings(&["nope"]))).unwrap_err();
        assert!(e.contains("nope") && e.contains("b--lib--b"), "{e}");
    }

    #[test]
    fn the_only_flag_is_parsed_strictly() {
        assert_eq!(only_arg(&[]).unwrap(), None);
        assert_eq!(only_arg(&strings(&["--only", "a, b,"])).unwrap(), Some(strings(&["a", "b"])));
        assert!(only_arg(&strings(&["--only", " , "])).is_err());
        assert!(only_arg(&strings(&["--only"])).is_err());
        assert!(only_arg(&strings(&["--bogus", "a"])).is_err());
    }
}
