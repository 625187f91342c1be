//! `tierlm generate --stages N`: the model's layers in N pipeline stages
//! (CPU engines on threads of one process, the preview of the multi-GPU
//! pipeline) print exactly what one engine prints, for OPT and every
//! Llama-family fixture, greedy and sampled; what the preview cannot honour
//! is refused by name. (The runtime's own tests check sampled tokens over
//! blocks of several batches against one engine over the same block.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    std::env::var_os("TIERLM_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn tierlm(args: &[&str]) -> Output {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_tierlm"));
    let exe = if built.is_file() { built } else { repo_root().join(".gpu/tierlm") };
    Command::new(exe).args(args).output().expect("tierlm runs")
}

fn succeeds(args: &[&str]) -> String {
    let out = tierlm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = tierlm(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    stderr
}

/// Five prompts of token ids (OPT's `</s>` first; any vocabulary of 64 or
/// more takes them), left padded into batches of two.
fn input(dir: &Path) -> PathBuf {
    let path = dir.join("in.jsonl");
    let prompts: [&[u32]; 5] =
        [&[2, 31, 7, 9, 40], &[2, 12], &[2, 50, 51, 52, 53, 54, 55], &[2, 8, 8], &[2, 33, 17, 21]];
    let lines: Vec<String> = prompts.iter().map(|p| format!(r#"{{"input_ids": {p:?}}}"#)).collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn stages_print_what_one_engine_prints() {
    let scratch = tempfile::tempdir().unwrap();
    let input = input(scratch.path());
    let input = input.to_str().unwrap();
    let mut models = vec![repo_root().join("fixtures/opt/tiny-opt")];
    let llama = repo_root().join("fixtures/llama");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&llama).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.retain(|d| d.join("config.json").is_file());
    dirs.sort();
    models.extend(dirs);
    for model in &models {
        let model = model.to_str().unwrap();
        // Greedy: batches of two, blocks of two batches in the stages. A
        // sampler draws for a block's batches step by step, so sampled runs
        // compare with one batch a block (all five prompts in one).
        for (batch, sampling) in [("2", &["--temperature", "0"][..]), ("5", &["--temperature", "0.8", "--seed", "4"])] {
            let run = |stages: &str| {
                let mut args = vec!["generate", "--model", model, "--input", input, "--max-new-tokens", "5"];
                args.extend(["--gpu-batch-size", batch, "--stages", stages]);
                args.extend(sampling);
                succeeds(&args)
            };
            let one = run("1");
            assert_eq!(one.lines().count(), 5, "{model}: {one}");
            assert_eq!(run("2"), one, "{model} {sampling:?}");
        }
    }
}

#[test]
fn what_the_stages_cannot_honour_is_refused() {
    let opt = repo_root().join("fixtures/opt/tiny-opt");
    let opt = opt.to_str().unwrap();
    let base = ["generate", "--model", opt, "--prompt", "Hello"];
    let run = |extra: &[&str]| fails(&[&base[..], extra].concat());
    let e = run(&["--stages", "0"]);
    assert!(e.contains("--stages must be at least 1"), "{e}");
    let e = run(&["--stages", "3"]);
    assert!(e.contains("3 pipeline stages for a model of 2 layers"), "{e}");
    let e = run(&["--stages", "2", "--percent", "0", "100", "0", "50", "0", "100", "--compress-weight"]);
    assert!(e.contains("--percent 0 100 0 50 0 100, --compress-weight"), "{e}");
    let llama = repo_root().join("fixtures/llama/tiny-mistral-bf16");
    let e = fails(&["generate", "--model", llama.to_str().unwrap(), "--prompt", "Hi", "--stages", "4"]);
    assert!(e.contains("4 pipeline stages for a model of 2 layers"), "{e}");
}
