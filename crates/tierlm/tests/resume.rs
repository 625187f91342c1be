//! `tierlm generate --input … --output …` survives being killed: each batch's
//! results are appended and synced, and `--resume` continues where the file
//! ends, so that the final file equals an uninterrupted run's line for line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

fn model() -> String {
    repo_root().join("fixtures/opt/tiny-opt").to_str().unwrap().to_string()
}

/// `tierlm generate` over `input` into `output`, greedy, 3 prompts a batch.
fn generate(input: &Path, output: &Path, resume: bool) -> Command {
    let mut cmd = Command::new(tierlm_exe());
    cmd.args(["generate", "--model", &model(), "--max-new-tokens", "12", "--gpu-batch-size", "3", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

fn lines(path: &Path) -> usize {
    std::fs::read(path).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
}

fn write_input(dir: &Path, n: usize) -> PathBuf {
    let input = dir.join("prompts.jsonl");
    // Blank lines are skipped, and the line numbers count them.
    let text: String = (0..n)
        .map(|i| {
            if i % 50 == 7 {
                format!("\n{{\"prompt\": \"Prompt {i}:\"}}\n")
            } else {
                format!("{{\"prompt\": \"Hello {i}\"}}\n")
            }
        })
        .collect();
    std::fs::write(&input, text).unwrap();
    input
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_output() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 240;
    let input = write_input(tmp.path(), n);
    let reference = tmp.path().join("reference.jsonl");
    let out = generate(&input, &reference, false).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines(&reference), n);

    let output = tmp.path().join("results.jsonl");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let mut kills = 0;
    for trial in 0..4 {
        let before = lines(&output);
        // SIGKILL once a random number of new lines are in the file.
        let target = before + rng.random_range(1..=40);
        let mut child = generate(&input, &output, trial > 0).spawn().unwrap();
        let start = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if lines(&output) >= target {
                child.kill().unwrap();
                kills += 1;
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "trial {trial}: no progress in 120 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        child.wait().unwrap();
        assert!(lines(&output) >= before, "a resumed run never loses lines");
    }
    assert!(kills >= 2, "only {kills} runs were killed mid-way");
    // Never overwritten without --resume.
    let out = generate(&input, &output, false).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("already holds results; pass --resume"), "{stderr}");
    // The last resume finishes the file.
    let out = generate(&input, &output, true).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("resuming"), "{stderr}");
    let (got, want) = (std::fs::read_to_string(&output).unwrap(), std::fs::read_to_string(&reference).unwrap());
    for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
        assert_eq!(g, w, "line {}", i + 1);
    }
    assert_eq!(got.lines().count(), want.lines().count());
    assert_eq!(got, want);
    // Each line names its input's line (blank lines counted).
    let line: serde_json::Value = serde_json::from_str(got.lines().nth(8).unwrap()).unwrap();
    assert_eq!((line["index"].as_u64(), line["line"].as_u64()), (Some(8), Some(10)), "{line}");
}

#[test]
fn a_partial_last_line_is_cut_and_another_inputs_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path(), 12);
    let reference = tmp.path().join("reference.jsonl");
    assert!(generate(&input, &reference, false).status().unwrap().success());
    let want = std::fs::read_to_string(&reference).unwrap();

    // A crash mid-write: five whole lines and part of the sixth.
    let output = tmp.path().join("results.jsonl");
    let cut: usize = want.lines().take(5).map(|l| l.len() + 1).sum::<usize>() + 17;
    std::fs::write(&output, &want[..cut]).unwrap();
    let out = generate(&input, &output, true).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("dropped a partly written last line (17 bytes)"), "{stderr}");
    assert!(stderr.contains("5 of 12 inputs done"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), want);

    // Everything done: nothing runs, nothing changes.
    let out = generate(&input, &output, true).output().unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&output).unwrap(), want);

    // The same file against another input (a prompt changed) is refused.
    let text = std::fs::read_to_string(&input).unwrap().replacen("Hello 3", "Hello 3!", 1);
    std::fs::write(&input, text).unwrap();
    let out = generate(&input, &output, true).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("results.jsonl:4: written for another input"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), want, "a refused resume changes nothing");

    // Not a results file at all.
    std::fs::write(&output, "{\"prompt\": \"x\"}\n").unwrap();
    let out = generate(&input, &output, true).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("results.jsonl:1: not a result line of tierlm generate --output"), "{stderr}");
}
