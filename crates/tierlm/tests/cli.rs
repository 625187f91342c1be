//! The `tierlm generate` and `tierlm bench` commands, run as a user would:
//! what they print on success, and a clear message with a non-zero exit (no
//! panic) for each kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// The repository: `TIERLM_REPO_ROOT` where the tests run from a bundle on
/// another machine (`.gpu/run-tests.sh` sets it), else where they were built.
fn repo_root() -> PathBuf {
    std::env::var_os("TIERLM_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The binary cargo built beside this test, or the bundled one.
fn tierlm_exe() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_tierlm"));
    if built.is_file() {
        built
    } else {
        repo_root().join(".gpu/tierlm")
    }
}

fn tierlm(args: &[&str]) -> Output {
    Command::new(tierlm_exe()).args(args).output().expect("tierlm runs")
}

fn fixture(name: &str) -> String {
    repo_root().join("fixtures/opt").join(name).to_str().unwrap().to_string()
}

/// Runs tierlm, expects failure, and returns stderr.
fn fails(args: &[&str]) -> String {
    let out = tierlm(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.starts_with("error: ") || stderr.contains("error:"), "{args:?}: {stderr}");
    stderr
}

fn succeeds(args: &[&str]) -> String {
    let out = tierlm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

const CONFIG: &str = r#"{"model_type": "opt", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
    "ffn_dim": 16, "vocab_size": 16, "max_position_embeddings": 8}"#;

/// The tensors of the tiny model `CONFIG` describes: (name, shape).
fn tiny_tensors() -> Vec<(String, Vec<usize>)> {
    let mut t = vec![
        ("model.decoder.embed_tokens.weight".to_string(), vec![16, 8]),
        ("model.decoder.embed_positions.weight".to_string(), vec![10, 8]),
        ("model.decoder.final_layer_norm.weight".to_string(), vec![8]),
        ("model.decoder.final_layer_norm.bias".to_string(), vec![8]),
    ];
    let p = "model.decoder.layers.0";
    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        t.push((format!("{p}.self_attn.{proj}.weight"), vec![8, 8]));
        t.push((format!("{p}.self_attn.{proj}.bias"), vec![8]));
    }
    for ln in ["self_attn_layer_norm", "final_layer_norm"] {
        t.push((format!("{p}.{ln}.weight"), vec![8]));
        t.push((format!("{p}.{ln}.bias"), vec![8]));
    }
    t.push((format!("{p}.fc1.weight"), vec![16, 8]));
    t.push((format!("{p}.fc1.bias"), vec![16]));
    t.push((format!("{p}.fc2.weight"), vec![8, 16]));
    t.push((format!("{p}.fc2.bias"), vec![8]));
    t
}

/// Writes a checkpoint directory with `tensors` (f32, small values).
fn write_checkpoint(dir: &Path, config: &str, tensors: &[(String, Vec<usize>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, shape)| {
            let n: usize = shape.iter().product();
            (0..n).flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes()).collect()
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((name, shape), bytes)| (name.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
}

fn tiny_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("tiny");
    write_checkpoint(&dir, CONFIG, &tiny_tensors());
    dir
}

#[test]
fn generate_prints_text_and_json() {
    let text = succeeds(&["generate", "--model", &fixture("tiny-opt"), "--prompt", "Hello", "--max-new-tokens", "4"]);
    // tiny-opt was trained on "Hello, world! Hello again, dear world."
    assert!(text.starts_with("Hello, world!"), "{text}");

    let json = succeeds(&[
        "generate",
        "--model",
        &fixture("tiny-opt"),
        "--prompt",
        "Hello",
        "--prompt",
        "Weights move",
        "--json",
        "--max-new-tokens",
        "5",
        "--gpu-batch-size",
        "1",
    ]);
    let lines: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        assert_eq!(l["output_ids"].as_array().unwrap().len(), 5);
        assert!(l["text"].is_string());
    }
    // Greedy, batched or not, gives the same tokens.
    let together = succeeds(&[
        "generate",
        "--model",
        &fixture("tiny-opt"),
        "--prompt",
        "Hello",
        "--prompt",
        "Weights move",
        "--json",
        "--max-new-tokens",
        "5",
    ]);
    assert_eq!(json, together);
}

#[test]
fn generate_from_jsonl_without_tokenizer_and_sampling_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"input_ids\": [2, 100, 200]}\n{\"input_ids\": [2, 7]}\n").unwrap();
    let args = ["generate", "--model", &fixture("tiny-opt-sharded"), "--input", input.to_str().unwrap()];
    let out = succeeds(&[&args[..], &["--max-new-tokens", "3"]].concat());
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].get("text").is_none(), "no tokenizer, no text");
    assert_eq!(lines[1]["output_ids"].as_array().unwrap().len(), 3);

    let sampled = [&args[..], &["--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "9"]].concat();
    assert_eq!(succeeds(&sampled), succeeds(&sampled));
}

#[test]
fn bench_reports_flexgen_throughput() {
    let out = succeeds(&[
        "bench",
        "--model",
        &fixture("tiny-opt"),
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--gpu-batch-size",
        "2",
        "--num-gpu-batches",
        "2",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["prompts"], 4);
    let f = |k: &str| r[k].as_f64().unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
    assert!(close(f("prefill_tokens_per_s"), 4.0 * 8.0 / f("prefill_s")));
    assert!(close(f("decode_tokens_per_s"), 4.0 * 3.0 / f("decode_s")));
    assert!(close(f("total_tokens_per_s"), 4.0 * 4.0 / (f("prefill_s") + f("decode_s"))));
    assert!(r["memory"]["weights_bytes"].as_u64().unwrap() > 0);
    assert!(r["memory"]["peak_rss_bytes"].as_u64().unwrap() > 0);

    let text = succeeds(&["bench", "--model", "facebook/opt-125m", "--dummy", "--prompt-len", "4", "--gen-len", "2"]);
    assert!(text.contains("prefill:") && text.contains("decode:") && text.contains("total:"), "{text}");
    assert!(text.contains("peak RSS (VmHWM)"), "{text}");
}

#[test]
fn bad_model_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(fails(&["generate", "--model", empty.to_str().unwrap(), "--prompt", "x"]).contains("no config.json"));

    let no_weights = tmp.path().join("no-weights");
    std::fs::create_dir(&no_weights).unwrap();
    std::fs::write(no_weights.join("config.json"), CONFIG).unwrap();
    let err = fails(&["generate", "--model", no_weights.to_str().unwrap(), "--prompt", "x"]);
    assert!(err.contains("no model.safetensors"), "{err}");

    let bad_heads = tmp.path().join("bad-heads");
    write_checkpoint(&bad_heads, &CONFIG.replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 3"), &[]);
    let err = fails(&["generate", "--model", bad_heads.to_str().unwrap(), "--prompt", "x"]);
    assert!(err.contains("hidden_size 8 is not divisible by num_attention_heads 3"), "{err}");

    let missing_field = tmp.path().join("missing-field");
    write_checkpoint(&missing_field, &CONFIG.replace("\"ffn_dim\": 16,", ""), &[]);
    let err = fails(&["generate", "--model", missing_field.to_str().unwrap(), "--prompt", "x"]);
    assert!(err.contains("missing field `ffn_dim`"), "{err}");

    // A tokenizer.json on which the tokenizers library panics (a fuzzing
    // find): one line naming the file, no panic message or backtrace.
    let bad_tokenizer = tmp.path().join("bad-tokenizer");
    std::fs::create_dir(&bad_tokenizer).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(Path::new(&fixture("tiny-opt")).join(f), bad_tokenizer.join(f)).unwrap();
    }
    let crasher =
        std::fs::read(repo_root().join("crates/tierlm/tests/corpus/tokenizer/bpe-prefix-longer-than-token")).unwrap();
    std::fs::write(bad_tokenizer.join("tokenizer.json"), &crasher[1..]).unwrap();
    let err = fails(&["generate", "--model", bad_tokenizer.to_str().unwrap(), "--prompt", "x"]);
    assert!(err.contains("tokenizer.json: malformed tokenizer"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let err = fails(&["bench", "--model", "opt-7b", "--dummy"]);
    assert!(err.contains("unknown model") && err.contains("opt-125m"), "{err}");
}

#[test]
fn bad_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tiny_dir(tmp.path());
    let ids = ["generate", "--model", good.to_str().unwrap(), "--input"];
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"input_ids\": [2, 3]}\n").unwrap();
    let good_out = succeeds(&[&ids[..], &[input.to_str().unwrap(), "--max-new-tokens", "2"]].concat());
    assert!(good_out.contains("output_ids"));

    let missing = tmp.path().join("missing");
    let mut tensors = tiny_tensors();
    tensors.retain(|(n, _)| n != "model.decoder.layers.0.fc2.weight");
    write_checkpoint(&missing, CONFIG, &tensors);
    let err = fails(&["bench", "--model", missing.to_str().unwrap(), "--prompt-len", "2", "--gen-len", "1"]);
    assert!(err.contains("tensor decoder.layers.0.fc2.weight is missing"), "{err}");

    let misshaped = tmp.path().join("misshaped");
    let mut tensors = tiny_tensors();
    tensors.iter_mut().filter(|(n, _)| n.ends_with("fc1.weight")).for_each(|(_, s)| *s = vec![8, 16]);
    write_checkpoint(&misshaped, CONFIG, &tensors);
    let err = fails(&["bench", "--model", misshaped.to_str().unwrap(), "--prompt-len", "2", "--gen-len", "1"]);
    assert!(err.contains("tensor model.decoder.layers.0.fc1.weight has shape [8, 16], expected [16, 8]"), "{err}");

    let truncated = tmp.path().join("truncated");
    write_checkpoint(&truncated, CONFIG, &tiny_tensors());
    let file = truncated.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 10).unwrap();
    let err = fails(&["bench", "--model", truncated.to_str().unwrap(), "--prompt-len", "2", "--gen-len", "1"]);
    assert!(err.contains("not a valid safetensors file"), "{err}");

    let corrupt = tmp.path().join("corrupt");
    write_checkpoint(&corrupt, CONFIG, &tiny_tensors());
    std::fs::write(corrupt.join("model.safetensors"), b"\xff\xff\xff\xff\x00\x00\x00\x00garbage").unwrap();
    let err = fails(&["bench", "--model", corrupt.to_str().unwrap(), "--prompt-len", "2", "--gen-len", "1"]);
    assert!(err.contains("not a valid safetensors file"), "{err}");

    // A sharded index that names a shard that is not there.
    let shard = tmp.path().join("shard");
    write_checkpoint(&shard, CONFIG, &tiny_tensors());
    std::fs::rename(shard.join("model.safetensors"), shard.join("part-1.safetensors")).unwrap();
    std::fs::write(
        shard.join("model.safetensors.index.json"),
        r#"{"weight_map": {"model.decoder.embed_tokens.weight": "part-1.safetensors", "lm_head.weight": "part-2.safetensors"}}"#,
    )
    .unwrap();
    let err = fails(&["bench", "--model", shard.to_str().unwrap(), "--prompt-len", "2", "--gen-len", "1"]);
    assert!(err.contains("part-2.safetensors"), "{err}");
}

#[test]
fn bad_prompts_and_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let long = "word ".repeat(200);
    let err = fails(&["generate", "--model", &fixture("tiny-opt"), "--prompt", &long]);
    assert!(err.contains("exceed the model's 128 positions"), "{err}");

    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"fine\"}\n{\"prompt\": \"unterminated}\n").unwrap();
    let err = fails(&["generate", "--model", &fixture("tiny-opt"), "--input", input.to_str().unwrap()]);
    assert!(err.contains("in.jsonl:2: invalid JSON"), "{err}");

    std::fs::write(&input, "{\"prompt\": \"text needs a tokenizer\"}\n").unwrap();
    let err = fails(&["generate", "--model", &fixture("tiny-opt-sharded"), "--input", input.to_str().unwrap()]);
    assert!(err.contains("no tokenizer.json"), "{err}");

    std::fs::write(&input, "{\"input_ids\": [2, 99999]}\n").unwrap();
    let err = fails(&["generate", "--model", &fixture("tiny-opt-sharded"), "--input", input.to_str().unwrap()]);
    assert!(err.contains("token id 99999 is outside the vocabulary"), "{err}");

    let missing = tmp.path().join("nope.jsonl");
    let err = fails(&["generate", "--model", &fixture("tiny-opt"), "--input", missing.to_str().unwrap()]);
    assert!(err.contains("nope.jsonl"), "{err}");

    let err = fails(&["generate", "--model", &fixture("tiny-opt"), "--prompt", "x", "--gpu-batch-size", "0"]);
    assert!(err.contains("--gpu-batch-size must be at least 1"), "{err}");
    let err = fails(&["generate", "--model", &fixture("tiny-opt"), "--prompt", "x", "--top-k", "5"]);
    assert!(err.contains("give a temperature"), "{err}");
}

#[test]
fn bench_policies_the_cpu_engine_cannot_run() {
    let base = ["bench", "--model", "opt-125m", "--dummy", "--prompt-len", "4", "--gen-len", "2"];
    let with = |extra: &[&str]| fails(&[&base[..], extra].concat());

    let err = with(&["--percent", "0", "120", "0", "100", "0", "100"]);
    assert!(err.contains("outside 0..=100"), "{err}");
    let err = with(&["--percent", "50", "60", "0", "100", "0", "100"]);
    assert!(err.contains("over 100"), "{err}");
    let err = with(&["--percent", "-5", "100", "0", "100", "0", "100"]);
    assert!(err.contains("outside 0..=100"), "{err}");
    if !engine_opt::gpu::available() {
        // With a GPU this placement runs on the GPU engine.
        let err = with(&["--percent", "100", "0", "100", "0", "100", "0"]);
        assert!(err.contains("needs the GPU engine"), "{err}");
    }
    if !engine_opt::gpu::available() {
        // With a GPU this runs on the GPU engine (tests/gpu_cache.rs); the
        // CPU engine streams weights from disk (tests/cpu_tiers.rs) but
        // keeps its cache in memory.
        let err = with(&["--percent", "0", "100", "0", "100", "0", "0"]);
        assert!(err.contains("100% of the activations on disk") && err.contains("needs the tiered engine"), "{err}");
    }
    if !engine_opt::gpu::available() {
        // With a GPU this placement runs on the GPU engine, weights streamed
        // (tests/gpu_tiered.rs).
        let err = with(&["--percent", "50", "50", "100", "0", "100", "0"]);
        assert!(err.contains("50% of the weights on the GPU") && err.contains("needs the GPU engine"), "{err}");
    }
    let err = with(&["--gpu-batch-size", "0"]);
    assert!(err.contains("--gpu-batch-size must be at least 1"), "{err}");
    if !engine_opt::gpu::available() {
        // With a GPU, 4-bit weights run on the GPU engine (tests/gpu_compressed.rs).
        let err = with(&["--compress-weight"]);
        assert!(err.contains("needs the GPU engine"), "--compress-weight: {err}");
    }
    // FlexGen's default; the CPU engine reads its layers whole either way.
    succeeds(&[&base[..], &["--sep-layer", "true"]].concat());
    if !engine_opt::gpu::available() {
        for flag in [&["--attn-sparsity", "0.5"][..], &["--compress-cache"]] {
            let err = with(flag);
            assert!(err.contains("needs the GPU engine"), "{flag:?}: {err}");
        }
    } else {
        // The CPU's sparse attention runs over a host cache only.
        let err = with(&["--attn-sparsity", "0.5"]);
        assert!(err.contains("--cpu-cache-compute"), "{err}");
    }
    let err = fails(&["bench", "--model", "opt-125m", "--dummy", "--prompt-len", "2040", "--gen-len", "32"]);
    assert!(err.contains("exceed the model's 2048 positions"), "{err}");
    // Flags that say what the engine does are accepted.
    succeeds(&[&base[..], &["--overlap", "--sep-layer", "false", "--pin-weight", "true"]].concat());
    // A sequential mode it does not have is refused, not ignored.
    let err = with(&["--overlap", "false"]);
    assert!(err.contains("--overlap false") && err.contains("drop the flag"), "{err}");
    // A model too large for this machine's memory: a clear refusal (where
    // it is too large: a machine with 400 GB free would start loading it).
    let need = engine_opt::OptConfig::preset("opt-175b").unwrap().weight_bytes();
    if engine_opt::memory::available_bytes().is_some_and(|avail| avail < need) {
        let err = fails(&["bench", "--model", "opt-175b", "--dummy"]);
        assert!(err.contains("not enough host memory"), "{err}");
    }
}

/// The interrupt tests, one at a time: each runs a benchmark for seconds on
/// every core, and in parallel they would slow each other's loading past
/// their limits.
static INTERRUPT_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    INTERRUPT_TESTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A `tierlm` started by [`spawn_tierlm`], its stderr read as it comes.
struct Running {
    child: std::process::Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Starts `tierlm args` with piped output and SIGINT and SIGTERM at their
/// default disposition: a test runner started as a background job of a
/// non-interactive shell ignores SIGINT, its children inherit that, and
/// `tierlm` keeps ignoring a signal ignored on entry (as it should).
fn spawn_tierlm(args: &[&str]) -> Running {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(tierlm_exe());
    cmd.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    // SAFETY: runs in the forked child before exec; `signal` is
    // async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("tierlm starts");
    let mut pipe = child.stderr.take().unwrap();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = std::sync::Arc::clone(&stderr);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Running { child, stderr, reader: Some(reader) }
}

impl Running {
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits at most `limit` for `cond`; fails (killing tierlm) past it or
    /// if tierlm ends first.
    fn wait_for(&mut self, what: &str, limit: std::time::Duration, cond: impl Fn(&Running) -> bool) {
        let start = std::time::Instant::now();
        while !cond(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tierlm ended ({status:?}) before {what}; stderr: {}", self.stderr());
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("no {what} after {limit:?}; stderr: {}", self.stderr());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Whether tierlm catches SIGINT now (`SigCgt` in /proc): the handler
    /// is installed.
    fn catches_sigint(&self) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (libc::SIGINT - 1)) != 0)
    }

    fn send(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped
        // (only `wait_at_most` reaps it, after this).
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0, "kill {sig}");
    }

    /// Waits for tierlm to end, at most `limit`; past it, kills it
    /// (SIGKILL) and fails. Returns the status and all of stderr.
    fn wait_at_most(mut self, limit: std::time::Duration, what: &str) -> (std::process::ExitStatus, String) {
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{what}: tierlm still ran {limit:?} after the signal; killed. stderr: {}", self.stderr());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        (status, self.stderr())
    }
}

/// A benchmark that runs for minutes on the CPU engine (each layer a few
/// milliseconds, loading a few seconds in a debug build): opt-125m, 4
/// prompts of 64 tokens, 1984 new tokens.
fn long_bench(offload_dir: &Path) -> Vec<String> {
    ["bench", "--model", "opt-125m", "--dummy", "--prompt-len", "64", "--gen-len", "1984", "--offload-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([offload_dir.to_str().unwrap().to_string()])
        .collect()
}

/// How long a run may take to stop after one signal: the flag is looked at
/// once per layer of the generation, not while the model loads, which can
/// take tens of seconds on a busy 2-core machine in a debug build.
const STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);
const START_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

#[test]
fn ctrl_c_stops_generation_cleanly_with_status_130() {
    use std::os::unix::process::ExitStatusExt;
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let offload = tmp.path().join("offload");
    std::fs::create_dir(&offload).unwrap();
    let args = long_bench(&offload);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut run = spawn_tierlm(&args);
    run.wait_for("the SIGINT handler", START_LIMIT, Running::catches_sigint);
    // Loading or generating by then: the flag stays set, and is honoured at
    // the next layer of the generation.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    run.send(libc::SIGINT);
    let (status, stderr) = run.wait_at_most(STOP_LIMIT, "one SIGINT");
    assert_eq!(status.code(), Some(130), "status {status:?} (signal {:?}); stderr: {stderr}", status.signal());
    assert!(stderr.contains("stopping cleanly"), "{stderr}");
    assert!(stderr.contains("error: interrupted"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // All in host memory: nothing was placed in the offload directory, and
    // nothing is there now.
    let left: Vec<_> = std::fs::read_dir(&offload).unwrap().collect();
    assert!(left.is_empty(), "left in the offload directory: {left:?}");

    // SIGTERM is honoured the same way, with 128 + 15.
    let mut run = spawn_tierlm(&args);
    run.wait_for("the SIGINT handler", START_LIMIT, Running::catches_sigint);
    run.send(libc::SIGTERM);
    let (status, stderr) = run.wait_at_most(STOP_LIMIT, "one SIGTERM");
    assert_eq!(status.code(), Some(143), "status {status:?}; stderr: {stderr}");
    assert!(stderr.contains("error: interrupted"), "{stderr}");
}

#[test]
fn a_second_ctrl_c_quits_at_once() {
    use std::os::unix::process::ExitStatusExt;
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let args = long_bench(tmp.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut run = spawn_tierlm(&args);
    run.wait_for("the SIGINT handler", START_LIMIT, Running::catches_sigint);
    // While the model loads (seconds; loading does not look at the flag),
    // the first Ctrl-C is acknowledged...
    run.send(libc::SIGINT);
    run.wait_for("the first SIGINT's notice", START_LIMIT, |r| r.stderr().contains("stopping cleanly"));
    // ...and the second, a separate signal now that the first was handled,
    // ends the process at once: a death by SIGINT, as a shell expects from
    // Ctrl-C. (Were the first already honoured at a layer in between, the
    // clean exit is fine too.)
    run.send(libc::SIGINT);
    let (status, stderr) = run.wait_at_most(std::time::Duration::from_secs(10), "two SIGINTs");
    assert!(status.signal() == Some(libc::SIGINT) || status.code() == Some(130), "status {status:?}; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The descriptors of process `pid` open on files that were in `dir` and
/// have no name any more.
fn unlinked_files_in(pid: u32, dir: &Path) -> Vec<String> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    let dir = dir.to_str().unwrap();
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().to_string())
        .filter(|t| t.starts_with(dir) && t.ends_with(" (deleted)"))
        .collect()
}

#[test]
fn ctrl_c_with_weights_on_disk_leaves_nothing_in_the_offload_dir() {
    use std::os::unix::process::ExitStatusExt;
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let offload = tmp.path().join("offload");
    std::fs::create_dir(&offload).unwrap();
    let mut args = long_bench(&offload);
    // Half the weights on disk (the CPU engine's disk tier, or the GPU
    // engine's where there is a GPU): an arena file in the offload directory.
    args.extend(["--percent", "0", "50", "0", "100", "0", "100"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut run = spawn_tierlm(&args);
    let pid = run.child.id();
    run.wait_for("unlinked arena in the offload directory", START_LIMIT, |_| {
        !unlinked_files_in(pid, &offload).is_empty()
    });
    // Open, and already nameless.
    let named: Vec<_> = std::fs::read_dir(&offload).unwrap().collect();
    assert!(named.is_empty(), "an arena is open, yet the directory holds {named:?}");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    run.send(libc::SIGINT);
    let (status, stderr) = run.wait_at_most(STOP_LIMIT, "one SIGINT");
    assert_eq!(status.code(), Some(130), "status {status:?} (signal {:?}); stderr: {stderr}", status.signal());
    assert!(stderr.contains("error: interrupted"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&offload).unwrap().collect();
    assert!(left.is_empty(), "left in the offload directory: {left:?}");
}

#[test]
fn huge_sizes_from_flags_are_clear_errors() {
    let tiny = fixture("tiny-opt");
    let max = u64::MAX.to_string();
    let err = fails(&["generate", "--model", &tiny, "--prompt", "hi", "--max-new-tokens", &max]);
    assert!(err.contains(&format!("{max} new tokens exceed the model's 128 positions")), "{err}");
    let err = fails(&["bench", "--model", &tiny, "--gen-len", &max]);
    assert!(err.contains(&format!("--gen-len {max} exceed the model's 128 positions")), "{err}");
    let err = fails(&["bench", "--model", &tiny, "--prompt-len", &max]);
    assert!(err.contains(&format!("--prompt-len {max} + --gen-len 32 exceed")), "{err}");
    let err = fails(&["bench", "--model", &tiny, "--prompt-len", "8", "--gen-len", "8", "--gpu-batch-size", &max]);
    assert!(err.contains("prompts in one block; at most 1048576"), "{err}");
    let big = (1u64 << 32).to_string();
    let err = fails(&["bench", "--model", &tiny, "--gpu-batch-size", &big, "--num-gpu-batches", &big]);
    assert!(err.contains("more than 2^64 prompts in one block"), "{err}");
    let err = fails(&["generate", "--model", &tiny, "--prompt", "hi", "--temperature", "1e-45"]);
    assert!(err.contains("too small to sample with"), "{err}");
    for flags in [["--temperature", "NaN"], ["--temperature", "inf"], ["--top-p", "NaN"]] {
        let err = fails(&[&["generate", "--model", &tiny, "--prompt", "hi"][..], &flags].concat());
        assert!(err.contains("must be"), "{flags:?}: {err}");
    }
    let err = fails(&["generate", "--model", &tiny, "--prompt", "hi", "--gpu-batch-size", &max]);
    assert!(err.contains("--gpu-batch-size 18446744073709551615 is above"), "{err}");
    // A block that fits the count but not the memory: refused before loading.
    let err =
        fails(&["bench", "--model", "opt-125m", "--dummy", "--prompt-len", "1024", "--gpu-batch-size", "1048576"]);
    assert!(err.contains("not enough host memory"), "{err}");
}

#[test]
fn huge_sizes_in_config_json_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for field in ["ffn_dim", "max_position_embeddings", "vocab_size", "hidden_size", "num_hidden_layers"] {
        let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
        config[field] = serde_json::json!(1u64 << 62);
        let dir = tmp.path().join(field);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        for cmd in [&["generate", "--prompt", "hi"][..], &["bench"][..]] {
            let mut args = cmd.to_vec();
            args.extend(["--model", dir.to_str().unwrap(), "--dummy"]);
            let err = fails(&args);
            assert!(err.contains(&format!("{field} 4611686018427387904 is larger than tierlm supports")), "{err}");
        }
    }
    // The largest sizes accepted still overflow no count: too big for
    // memory, said before anything is allocated.
    let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    config["ffn_dim"] = serde_json::json!(1 << 20);
    config["hidden_size"] = serde_json::json!(1 << 17);
    config["num_hidden_layers"] = serde_json::json!(1 << 12);
    config["max_position_embeddings"] = serde_json::json!(1 << 24);
    let dir = tmp.path().join("largest");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = fails(&["generate", "--model", dir.to_str().unwrap(), "--dummy", "--prompt", "hi"]);
    assert!(err.contains("not enough host memory"), "{err}");
}

/// `tiny_dir`'s checkpoint with value `index` of tensor `name` set to `value`.
fn tiny_dir_with(tmp: &Path, name: &str, index: usize, value: f32) -> PathBuf {
    let dir = tmp.join(format!("tiny-{name}-{value}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    let tensors = tiny_tensors();
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(n, shape)| {
            let len: usize = shape.iter().product();
            (0..len)
                .flat_map(|i| if n == name && i == index { value } else { (i % 7) as f32 * 0.01 }.to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((n, shape), bytes)| (n.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn weights_that_are_not_finite_in_f16_are_named_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"input_ids\": [2, 5]}\n").unwrap();
    let cases = [
        ("model.decoder.layers.0.fc1.weight", 1e6, "is inf after conversion to f16"),
        ("model.decoder.layers.0.fc2.bias", f32::NAN, "is NaN"),
        ("model.decoder.embed_tokens.weight", -7e4, "is -inf after conversion to f16"),
    ];
    for (name, value, what) in cases {
        let dir = tiny_dir_with(tmp.path(), name, 3, value);
        let short = name.strip_prefix("model.").unwrap();
        let expect = format!("tensor {short} has 1 value that is not finite; the first, at index 3, {what}");
        let model = dir.to_str().unwrap();
        let err = fails(&["generate", "--model", model, "--input", input.to_str().unwrap()]);
        assert!(err.contains(&expect), "{name}: {err}");
        let err = fails(&["bench", "--model", model, "--prompt-len", "2", "--gen-len", "2"]);
        assert!(err.contains(&expect), "{name}: {err}");
        // With the layers on disk too, where the CPU engine reads them back.
        let err = fails(&[
            "bench",
            "--model",
            model,
            "--prompt-len",
            "2",
            "--gen-len",
            "2",
            "--percent",
            "0",
            "0",
            "0",
            "100",
            "0",
            "100",
            "--offload-dir",
            tmp.path().to_str().unwrap(),
        ]);
        assert!(err.contains(&expect), "{name} on disk: {err}");
    }
    // The largest f16 value is fine.
    let dir = tiny_dir_with(tmp.path(), "model.decoder.layers.0.fc1.weight", 3, 65504.0);
    let out = succeeds(&["bench", "--model", dir.to_str().unwrap(), "--prompt-len", "2", "--gen-len", "2", "--json"]);
    assert!(out.contains("\"engine\":\"cpu\""), "{out}");
}

#[test]
fn bench_reports_the_cache_it_puts_on_disk_and_where() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("offload");
    let d = dir.to_str().unwrap();
    let args = ["bench", "--model", &fixture("tiny-opt"), "--prompt-len", "8", "--gen-len", "4", "--offload-dir", d];
    let out = tierlm(&[&args[..], &["--percent", "0", "100", "0", "50", "0", "100", "--json"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("unused"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 4 prompts, half of them on disk: 2 × 2 layers × (k, v) × 12 positions × 64 × f32.
    let on_disk = 2 * 2 * 2 * 12 * 64 * 4;
    assert_eq!(report["memory"]["disk_kv_cache_bytes"], on_disk, "{report}");
    assert_eq!(report["memory"]["disk_weights_bytes"], 0, "{report}");
    assert_eq!(report["peak_per_tier"]["disk"], on_disk, "{report}");
    assert_eq!(report["offload_dir"], d, "{report}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the offload directory is left empty");

    let text = succeeds(&[&args[..], &["--percent", "0", "100", "0", "50", "0", "100"]].concat());
    assert!(text.contains(&format!("on disk: weights 0 B + KV cache 24.0 KiB in {d}")), "{text}");
    // Everything in memory: no directory, and the note says so.
    let out = tierlm(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("--offload-dir is unused"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("on disk: weights 0 B + KV cache 0 B\n"));
}

#[test]
fn ctrl_c_during_bench_tiers_leaves_no_baseline_file() {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("offload");
    std::fs::create_dir(&dir).unwrap();
    let args = ["bench-tiers", "--bytes", "256M", "--rss-check", "0", "--offload-dir", dir.to_str().unwrap()];
    let mut named = Vec::new();
    // Until the baseline file is open: it must never have a name there. A
    // loaded machine may let a run finish between two looks: try again.
    let mut attempts = 0;
    let run = loop {
        attempts += 1;
        let mut run = spawn_tierlm(&args);
        let pid = run.child.id();
        let start = std::time::Instant::now();
        let seen = loop {
            named.extend(
                std::fs::read_dir(&dir)
                    .unwrap()
                    .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().to_string()))
                    .filter(|n| n.starts_with("tierlm-bench-baseline")),
            );
            // The baseline file has no name (O_TMPFILE: the kernel shows it
            // as `#inode`), or, where the file system cannot do that, its
            // name for as long as it takes to unlink it.
            let is_baseline = |f: &String| {
                let name = f.trim_end_matches(" (deleted)").rsplit('/').next().unwrap_or_default().to_string();
                name.starts_with('#') || name.starts_with("tierlm-bench-baseline")
            };
            if unlinked_files_in(pid, &dir).iter().any(is_baseline) {
                break true;
            }
            if let Some(status) = run.child.try_wait().unwrap() {
                assert!(status.success() && attempts < 3, "bench-tiers ended ({status:?}); stderr: {}", run.stderr());
                break false;
            }
            assert!(start.elapsed() < STOP_LIMIT, "no baseline after {STOP_LIMIT:?}; stderr: {}", run.stderr());
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        if seen {
            break run;
        }
    };
    run.send(libc::SIGINT);
    let (status, stderr) = run.wait_at_most(STOP_LIMIT, "SIGINT during the baseline");
    assert!(!status.success() && !stderr.contains("panicked"), "{status:?}: {stderr}");
    // O_TMPFILE: the file never has a name. (A file system without it gets
    // a name that lives for one unlink; no test machine here is one.)
    assert!(named.is_empty(), "the baseline file had a name in the offload directory: {named:?}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "left in the offload directory: {left:?}");
}

#[test]
fn bench_tiers_json_prints_only_json() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tierlm(&[
        "bench-tiers",
        "--json",
        "--bytes",
        "1M",
        "--rss-check",
        "0",
        "--reps",
        "1",
        "--offload-dir",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Without a GPU, the disk rows are all of stdout; the GPU note is on stderr.
    let stdout = String::from_utf8(out.stdout).unwrap();
    if !String::from_utf8_lossy(&out.stderr).contains("gpu: no CUDA") {
        return; // A GPU here: its table follows on stderr, checked the same way below.
    }
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(rows.as_array().is_some_and(|r| !r.is_empty()), "{stdout}");
}

#[test]
fn bench_tiers_refuses_more_bytes_than_memory_or_disk_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(&["bench-tiers", "--bytes", "1048576G", "--offload-dir", tmp.path().to_str().unwrap()]);
    assert!(err.contains("--bytes 1125899906842624 needs 1125899906842624") && err.contains("host memory"), "{err}");
    // On tmpfs the disk copy is in memory too: half of what is available is too much.
    let shm = Path::new("/dev/shm");
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find_map(|l| l.strip_prefix("MemAvailable:")?.trim().strip_suffix(" kB")?.parse::<u64>().ok())
    });
    if let (true, Some(kib)) = (shm.is_dir(), avail) {
        let bytes = format!("{}K", kib * 3 / 4);
        let err = fails(&["bench-tiers", "--bytes", &bytes, "--offload-dir", "/dev/shm"]);
        assert!(err.contains("on tmpfs") || err.contains("free; free space"), "{err}");
    }
}

#[test]
fn a_host_memory_kind_that_is_missing_is_not_claimed() {
    let out = Command::new(tierlm_exe())
        .args(["copy-matrix", "--json"])
        .env("TIERLM_HOST_MEMORY", "pinned")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let missing = doc["unavailable"].as_array().unwrap().iter().any(|t| t["name"] == "host:pinned");
    let listed = doc["tiers"].as_array().unwrap().iter().any(|t| t["name"] == "host:pinned");
    assert_ne!(missing, listed, "{doc}");
    if missing {
        assert_eq!(doc["host_memory"]["kind"], "pageable", "{doc}");
        let reason = doc["host_memory"]["reason"].as_str().unwrap();
        assert!(reason.starts_with("fell back from pinned, chosen with TIERLM_HOST_MEMORY"), "{reason}");
    } else {
        assert_eq!(doc["host_memory"]["kind"], "pinned", "{doc}");
    }
}

#[test]
fn an_offload_dir_that_is_a_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let f = file.to_str().unwrap();
    let tiny = fixture("tiny-opt");
    let disk = ["--percent", "0", "50", "0", "100", "0", "100"];
    for args in [
        vec!["generate", "--model", &tiny, "--prompt", "hi", "--offload-dir", f],
        [&["generate", "--model", &tiny, "--prompt", "hi", "--offload-dir", f][..], &disk].concat(),
        vec!["bench", "--model", &tiny, "--prompt-len", "4", "--gen-len", "2", "--offload-dir", f],
        [&["bench", "--model", &tiny, "--prompt-len", "4", "--gen-len", "2", "--offload-dir", f][..], &disk].concat(),
        vec!["bench-tiers", "--bytes", "1M", "--offload-dir", f],
        vec!["copy-matrix", "--offload-dir", f],
    ] {
        let err = fails(&args);
        assert!(err.contains(&format!("{f}: is a file, not a directory")), "{args:?}: {err}");
    }
    let under = format!("{f}/sub");
    let err = fails(&[&["generate", "--model", &tiny, "--prompt", "hi", "--offload-dir", &under][..], &disk].concat());
    assert!(err.contains(&format!("{under}: cannot be made: {f} is a file, not a directory")), "{err}");
}

#[test]
fn a_disk_too_small_is_found_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    // 4096 layers of 12 × 131072² parameters: 1.7 PB, more than any disk.
    let dir = tmp.path().join("big");
    std::fs::create_dir(&dir).unwrap();
    let config = r#"{"model_type": "opt", "hidden_size": 131072, "num_attention_heads": 64, "num_hidden_layers": 4096,
        "ffn_dim": 32768, "vocab_size": 16, "max_position_embeddings": 64}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    let offload = tmp.path().join("offload");
    let (m, o) = (dir.to_str().unwrap(), offload.to_str().unwrap());
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"input_ids\": [2, 5]}\n").unwrap();
    let disk = ["--percent", "0", "0", "0", "100", "0", "100", "--offload-dir", o, "--dummy", "--model", m];
    for args in [
        [&["bench", "--prompt-len", "8", "--gen-len", "8"][..], &disk].concat(),
        [&["generate", "--input", input.to_str().unwrap()][..], &disk].concat(),
    ] {
        let err = fails(&args);
        assert!(err.contains("placed on disk need "), "{args:?}: {err}");
        assert!(
            err.contains("GiB) on disk, and its file system has ") && err.contains("GiB) free;"),
            "{args:?}: {err}"
        );
        assert!(!offload.exists(), "nothing made before the check");
    }
    // The KV cache's disk share counts too: 2^20 sequences of 64 positions
    // of opt-125m, 4.9 TB.
    let err = fails(&[
        "bench",
        "--model",
        "opt-125m",
        "--dummy",
        "--prompt-len",
        "60",
        "--gen-len",
        "4",
        "--gpu-batch-size",
        "1048576",
        "--percent",
        "0",
        "100",
        "0",
        "0",
        "0",
        "100",
        "--offload-dir",
        o,
    ]);
    assert!(err.contains("the weights and KV cache placed on disk need 4"), "{err}");
    assert!(!offload.exists(), "nothing made before the check");
}
