//! Bounded fuzzing on stable Rust: structured and byte-level mutations of
//! every kind of file and command line a user hands tierlm, run against the
//! loaders and the CLI, asserting no panic, no abort and no hang.
//!
//! - Budget: `TIERLM_FUZZ_SECS` seconds in all (default 60, what CI runs),
//!   shared among the targets below by fixed weights; `cargo xtask fuzz
//!   [SECS]` runs longer. `TIERLM_FUZZ_SEED` picks the seed (default: from
//!   the clock, printed, so that a failure can be replayed; under CI a
//!   fixed seed, so that CI's verdict depends on the commit alone and a
//!   new crasher is found by `cargo xtask fuzz`, not by an unrelated
//!   change's CI run).
//! - Every case runs under `catch_unwind`; a panic saves the input under
//!   `target/fuzz-crashers/<target>/` and fails the test. Before each case
//!   its input is written to `target/fuzz-crashers/<target>/current`, so
//!   that an abort (which no unwinding catches) leaves it behind too; a
//!   watchdog aborts a case that runs longer than [`HANG`].
//! - `tests/corpus/<target>/` holds the crashers found so far, replayed
//!   first as regression tests.
//! - The binary is run for a bounded number of mutated command lines; the
//!   others are parsed in process.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use engine_opt::sampling::{Sampler, SamplingConfig};
use engine_opt::OptConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tierlm::cli::bench::BenchArgs;
use tierlm::cli::generate::GenerateArgs;

/// A case running longer than this is a hang.
const HANG: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    std::env::var_os("TIERLM_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures/opt").join(name)
}

/// Total seconds of fuzzing for this run.
fn total_secs() -> f64 {
    std::env::var("TIERLM_FUZZ_SECS").ok().and_then(|s| s.parse::<f64>().ok()).filter(|s| *s >= 0.0).unwrap_or(60.0)
}

/// The seed CI explores from (any fixed value; changing it explores anew).
const CI_SEED: u64 = 0x7469_6572_6c6d;

fn seed() -> u64 {
    if let Some(seed) = std::env::var("TIERLM_FUZZ_SEED").ok().and_then(|s| s.parse().ok()) {
        return seed;
    }
    if std::env::var_os("CI").is_some() {
        return CI_SEED;
    }
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// One target's run: its random source, deadline and counts.
struct Fuzz {
    target: &'static str,
    rng: ChaCha8Rng,
    deadline: Instant,
    started: Instant,
    cases: u64,
    crashers: Vec<PathBuf>,
    dir: PathBuf,
    /// Milliseconds since `started` when the running case began (0: none).
    case_began: Arc<AtomicU64>,
}

impl Fuzz {
    /// A target given `weight` of the total budget (the weights sum to 1).
    fn new(target: &'static str, weight: f64) -> Fuzz {
        let seed = seed();
        eprintln!("fuzz {target}: seed {seed} (TIERLM_FUZZ_SEED={seed} replays it)");
        let mut dir = repo_root().join("target/fuzz-crashers").join(target);
        if std::fs::create_dir_all(&dir).is_err() {
            dir = std::env::temp_dir().join("tierlm-fuzz-crashers").join(target);
            std::fs::create_dir_all(&dir).expect("a crashers directory");
        }
        let started = Instant::now();
        let case_began = Arc::new(AtomicU64::new(0));
        // The watchdog: abort on a case running past HANG (the input is in `current`).
        let watched = Arc::clone(&case_began);
        let current = dir.join("current");
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let began = watched.load(Ordering::Relaxed);
            let now = started.elapsed().as_millis() as u64;
            if began > 0 && now.saturating_sub(began) > HANG.as_millis() as u64 {
                eprintln!("fuzz {target}: a case ran past {HANG:?}: a hang; its input is {}", current.display());
                std::process::abort();
            }
        });
        Fuzz {
            target,
            rng: ChaCha8Rng::seed_from_u64(seed ^ hash(target.as_bytes())),
            deadline: started + Duration::from_secs_f64(total_secs() * weight),
            started,
            cases: 0,
            crashers: Vec::new(),
            dir,
            case_began,
        }
    }

    fn more(&self) -> bool {
        Instant::now() < self.deadline
    }

    /// Runs `f` on `input` (the bytes that reproduce the case), catching a panic.
    fn case(&mut self, input: &[u8], f: impl FnOnce()) {
        let _ = std::fs::write(self.dir.join("current"), input);
        self.case_began.store(self.started.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        let result = catch_unwind(AssertUnwindSafe(f));
        self.case_began.store(0, Ordering::Relaxed);
        self.cases += 1;
        if let Err(e) = result {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            let path = self.dir.join(format!("{:016x}", hash(input)));
            let _ = std::fs::write(&path, input);
            eprintln!("fuzz {}: PANIC {msg:?}; input saved as {}", self.target, path.display());
            self.crashers.push(path);
        }
    }

    /// The corpus of crashers found before: `tests/corpus/<target>/*`.
    fn corpus(&self) -> Vec<Vec<u8>> {
        let dir = repo_root().join("crates/tierlm/tests/corpus").join(self.target);
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(dir).map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect()).unwrap_or_default();
        files.sort();
        files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
    }

    /// The corpus, then `mutate`'s inputs until the budget is spent, each
    /// run by `run` as one case; then the verdict ([`Fuzz::finish`]).
    fn drive(mut self, mut mutate: impl FnMut(&mut ChaCha8Rng) -> Vec<u8>, mut run: impl FnMut(&[u8])) {
        for input in self.corpus() {
            self.case(&input, || run(&input));
        }
        while self.more() {
            let input = mutate(&mut self.rng);
            self.case(&input, || run(&input));
        }
        self.finish();
    }

    fn finish(self) {
        let _ = std::fs::remove_file(self.dir.join("current"));
        eprintln!(
            "fuzz {}: {} cases in {:.1} s, {} crashers",
            self.target,
            self.cases,
            self.started.elapsed().as_secs_f64(),
            self.crashers.len()
        );
        assert!(self.crashers.is_empty(), "{}: crashers {:?}", self.target, self.crashers);
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Values that break size arithmetic and parsers.
const INTERESTING: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "7",
    "255",
    "256",
    "65504",
    "65536",
    "2147483648",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "4611686018427387904",
    "1e308",
    "-1e308",
    "1e-45",
    "0.5",
    "NaN",
    "inf",
    "-inf",
    "\"\"",
    "\"x\"",
    "null",
    "[]",
    "{}",
    "true",
    "[1,2,3]",
    "[18446744073709551615]",
];

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// One to four byte-level mutations of `data`.
fn mutate_bytes(rng: &mut ChaCha8Rng, data: &mut Vec<u8>, within: std::ops::Range<usize>) {
    for _ in 0..rng.random_range(1..=4) {
        let end = within.end.min(data.len());
        let start = within.start.min(end);
        let at = if end > start { rng.random_range(start..end) } else { start };
        match rng.random_range(0..9) {
            0 if at < data.len() => data[at] ^= 1 << rng.random_range(0..8),
            1 if at < data.len() => data[at] = rng.random(),
            2 => {
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                data.splice(at..at, bytes);
            }
            3 if at < data.len() => {
                let n = rng.random_range(1..=(data.len() - at).min(64));
                data.drain(at..at + n);
            }
            4 if at < data.len() => {
                let n = rng.random_range(1..=(data.len() - at).min(64));
                let copy = data[at..at + n].to_vec();
                let to = rng.random_range(start..=end.min(data.len()));
                data.splice(to..to, copy);
            }
            5 => data.truncate(at),
            6 => {
                let s = pick(rng, INTERESTING).as_bytes().to_vec();
                data.splice(at..at, s);
            }
            7 => {
                // Replace a run of digits with an interesting number.
                if let Some(i) = (at..end).find(|&i| data[i].is_ascii_digit()) {
                    let j = (i..data.len()).find(|&j| !data[j].is_ascii_digit()).unwrap_or(data.len());
                    let s = pick(rng, &INTERESTING[..20]).as_bytes().to_vec();
                    data.splice(i..j, s);
                }
            }
            _ => {
                // Special bytes: NUL, high bit, a quote, a brace, a newline.
                let b = *pick(rng, &[0u8, 0xff, 0x80, b'"', b'{', b'}', b'\n', b'\\', b',', b':']);
                if at < data.len() {
                    data[at] = b;
                } else {
                    data.push(b);
                }
            }
        }
    }
}

/// JSON pointers of every node of `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                pointers(c, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                pointers(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn interesting_value(rng: &mut ChaCha8Rng) -> Value {
    let text = *pick(rng, INTERESTING);
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// One to three structured mutations of a JSON document.
fn mutate_json(rng: &mut ChaCha8Rng, v: &mut Value) {
    for _ in 0..rng.random_range(1..=3) {
        let mut all = Vec::new();
        pointers(v, String::new(), &mut all);
        // Prefer leaves and small containers: pick uniformly among nodes.
        let at = pick(rng, &all).clone();
        let Some(node) = v.pointer_mut(&at) else { continue };
        match rng.random_range(0..7) {
            0 | 1 => *node = interesting_value(rng),
            2 => match node {
                Value::Object(m) if !m.is_empty() => {
                    let k = m.keys().nth(rng.random_range(0..m.len())).cloned().unwrap_or_default();
                    m.remove(&k);
                }
                Value::Array(a) if !a.is_empty() => {
                    a.remove(rng.random_range(0..a.len()));
                }
                _ => *node = Value::Null,
            },
            3 => match node {
                Value::Object(m) => {
                    let key = pick(
                        rng,
                        &["hidden_size", "ffn_dim", "shape", "dtype", "data_offsets", "weight_map", "vocab", "x"],
                    );
                    m.insert(key.to_string(), interesting_value(rng));
                }
                Value::Array(a) => a.push(interesting_value(rng)),
                other => *other = Value::Array(vec![other.clone()]),
            },
            4 => {
                if let Value::Number(n) = node {
                    // Off by one, doubled, negated.
                    let x = n.as_f64().unwrap_or(0.0);
                    let y = *pick(rng, &[x + 1.0, x - 1.0, x * 2.0, -x, x * 1e6]);
                    *node = serde_json::Number::from_f64(y).map_or(Value::Null, Value::Number);
                }
            }
            5 => *node = Value::String(node.to_string()),
            _ => {
                if let Value::String(s) = node {
                    let mut b = s.clone().into_bytes();
                    let len = b.len();
                    mutate_bytes(rng, &mut b, 0..len);
                    *s = String::from_utf8_lossy(&b).to_string();
                }
            }
        }
    }
}

/// A mutated JSON text: structured (parsed, mutated, printed) or bytes.
fn mutated_json_text(rng: &mut ChaCha8Rng, base: &[u8]) -> Vec<u8> {
    if rng.random_bool(0.6) {
        if let Ok(mut v) = serde_json::from_slice::<Value>(base) {
            mutate_json(rng, &mut v);
            return serde_json::to_vec(&v).unwrap_or_default();
        }
    }
    let mut b = base.to_vec();
    let len = b.len();
    mutate_bytes(rng, &mut b, 0..len);
    b
}

/// A mutated safetensors file: its header's JSON, its length field, its
/// body's values, or any bytes.
fn mutated_safetensors(rng: &mut ChaCha8Rng, base: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let (header, body) = (&base[8..8 + n], &base[8 + n..]);
    match rng.random_range(0..5) {
        0 | 1 => {
            let h = mutated_json_text(rng, header);
            let len = if rng.random_bool(0.9) { h.len() as u64 } else { rng.random() };
            let mut out = len.to_le_bytes().to_vec();
            out.extend(h);
            out.extend(body);
            out
        }
        2 => {
            let mut out = base.to_vec();
            let v = *pick(rng, &[u64::MAX, 0, 1, n as u64 + 1, n as u64 - 1, 1 << 40, base.len() as u64]);
            out[..8].copy_from_slice(&v.to_le_bytes());
            out
        }
        3 => {
            // Values that are not finite in f16 (f32 bodies: 1e6, NaN, inf).
            let mut out = base.to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = 8 + n + 4 * rng.random_range(0..body.len() / 4);
                let v = *pick(rng, &[1e6f32, f32::NAN, f32::INFINITY, -7e4, 65504.0, 1e-30]);
                out[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            out
        }
        _ => {
            let mut out = base.to_vec();
            let region = if rng.random_bool(0.7) { 0..8 + n } else { 0..out.len() };
            mutate_bytes(rng, &mut out, region);
            out
        }
    }
}

/// A scratch directory for one target's cases.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "expected.json" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Loads the checkpoint in `dir` and, if it loads, generates two tokens:
/// any error is fine, a panic is not.
fn load_and_run(dir: &Path) {
    let Ok(loaded) = engine_opt::loading::load_model(dir.to_str().unwrap(), false, 0) else { return };
    let vocab = loaded.model.config.vocab_size as u32;
    let prompt = vec![2u32.min(vocab - 1), 5u32.min(vocab - 1)];
    let mut sampler = Sampler::new(SamplingConfig::default());
    let hidden = indicatif::ProgressBar::hidden();
    let _ = engine_opt::generation::generate(
        &loaded.model,
        &[vec![prompt]],
        &engine_opt::generation::options(2),
        &mut sampler,
        &hidden,
    );
    if let Some(tok) = &loaded.tokenizer {
        let _ = tok.encode("Hello, world!");
    }
}

/// What a parsed configuration derives: sizes that must not overflow.
fn use_config(c: &OptConfig) {
    let _ = (c.param_count(), c.weight_bytes(), c.head_dim(), c.position_rows(), c.layer_param_count());
    let _ = c.kv_cache_bytes(usize::MAX, c.max_sequence_len());
    let _ = c.activation_bytes(1 << 20, c.max_sequence_len());
}

#[test]
fn fuzz_config_json() {
    let f = Fuzz::new("config_json", 0.1);
    let base = std::fs::read(fixture("tiny-opt/config.json")).unwrap();
    let tmp = scratch();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let run = |text: &[u8]| {
        let Ok(s) = std::str::from_utf8(text) else { return };
        if let Ok(c) = OptConfig::from_json_str(s) {
            use_config(&c);
            // Small enough to build: random weights through the whole model.
            if c.weight_bytes() < 8 << 20 && c.max_sequence_len() >= 4 {
                std::fs::write(dir.join("config.json"), s).unwrap();
                let _ = engine_opt::loading::load_model(dir.to_str().unwrap(), true, 0).map(|l| {
                    let mut sampler = Sampler::new(SamplingConfig::default());
                    let p = vec![vec![vec![0u32, 1.min(l.model.config.vocab_size as u32 - 1)]]];
                    let hidden = indicatif::ProgressBar::hidden();
                    let _ = engine_opt::generation::generate(
                        &l.model,
                        &p,
                        &engine_opt::generation::options(2),
                        &mut sampler,
                        &hidden,
                    );
                });
            }
        }
    };
    f.drive(|rng| mutated_json_text(rng, &base), run);
}

/// A Llama-family checkpoint directory through the family's loader (the
/// config validated, the checkpoint checked against the spec) and, when it
/// loads, a short greedy generation on the CPU.
fn llama_load_and_run(dir: &Path) {
    let Ok(model) = engine_llama::LlamaModel::load(dir) else { return };
    let vocab = model.config().vocab_size as u32;
    let prompt = vec![1u32.min(vocab.saturating_sub(1)), 5u32.min(vocab.saturating_sub(1))];
    let _ = engine_llama::generate(&model, &[prompt], &engine_llama::GenerateOptions::new(2));
}

fn llama_fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures/llama").join(name)
}

#[test]
fn fuzz_llama_config_json() {
    let f = Fuzz::new("llama_config_json", 0.08);
    let base = std::fs::read(llama_fixture("tiny-qwen3-qknorm-bf16/config.json")).unwrap();
    let run = |text: &[u8]| {
        let Ok(s) = std::str::from_utf8(text) else { return };
        let Ok(c) = engine_llama::LlamaConfig::from_json(s) else { return };
        // What a parsed configuration derives: sizes that must not overflow.
        let _ = (c.parameters(), c.weight_bytes(), c.group());
        let Ok(spec) = engine_llama::model_spec(&c) else { return };
        let _ = (spec.weight_bytes(false), spec.weight_bytes(true), spec.kv.token_bytes());
        // Small enough to build: seeded weights through the whole model.
        if c.weight_bytes().is_ok_and(|b| b < 8 << 20) && c.max_position_embeddings >= 4 {
            if let Ok(model) = engine_llama::LlamaModel::dummy(c, 0) {
                let vocab = model.config().vocab_size as u32;
                let prompt = vec![0u32, 1u32.min(vocab.saturating_sub(1))];
                let _ = engine_llama::generate(&model, &[prompt], &engine_llama::GenerateOptions::new(2));
            }
        }
    };
    f.drive(|rng| mutated_json_text(rng, &base), run);
}

#[test]
fn fuzz_llama_checkpoint() {
    fuzz_safetensors_of("llama_checkpoint", 0.1, &llama_fixture("tiny-qwen2-bias-bf16"), llama_load_and_run);
}

#[test]
fn fuzz_safetensors_checkpoint() {
    fuzz_safetensors_of("safetensors", 0.15, &fixture("tiny-opt"), load_and_run);
}

/// Mutations of `fixture`'s model.safetensors (header, length field,
/// body), each loaded and run by `load` from a copy of the directory.
fn fuzz_safetensors_of(target: &'static str, weight: f64, fixture: &Path, load: fn(&Path)) {
    let f = Fuzz::new(target, weight);
    let tmp = scratch();
    let dir = tmp.path().join("m");
    copy_dir(fixture, &dir);
    let base = std::fs::read(dir.join("model.safetensors")).unwrap();
    let run = |bytes: &[u8]| {
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        load(&dir);
    };
    f.drive(|rng| mutated_safetensors(rng, &base), run);
}

#[test]
fn fuzz_sharded_index() {
    let f = Fuzz::new("sharded_index", 0.1);
    let tmp = scratch();
    let dir = tmp.path().join("m");
    copy_dir(&fixture("tiny-opt-sharded"), &dir);
    let index = std::fs::read(dir.join("model.safetensors.index.json")).unwrap();
    let shard = std::fs::read(dir.join("model-00002-of-00003.safetensors")).unwrap();
    // An input is the index, then (after a NUL) the second shard.
    let run = |input: &[u8]| {
        let split = input.iter().position(|&b| b == 0).unwrap_or(input.len());
        std::fs::write(dir.join("model.safetensors.index.json"), &input[..split]).unwrap();
        let shard_bytes = input.get(split + 1..).filter(|s| !s.is_empty()).unwrap_or(&shard);
        std::fs::write(dir.join("model-00002-of-00003.safetensors"), shard_bytes).unwrap();
        load_and_run(&dir);
    };
    f.drive(
        |rng| {
            let mut input = mutated_json_text(rng, &index);
            input.retain(|&b| b != 0);
            if rng.random_bool(0.3) {
                input.push(0);
                input.extend(mutated_safetensors(rng, &shard));
            }
            input
        },
        run,
    );
}

#[test]
fn fuzz_tokenizer_files() {
    let f = Fuzz::new("tokenizer", 0.15);
    let tmp = scratch();
    let (json_dir, bpe_dir) = (tmp.path().join("json"), tmp.path().join("bpe"));
    std::fs::create_dir_all(&json_dir).unwrap();
    std::fs::create_dir_all(&bpe_dir).unwrap();
    let tokenizer = std::fs::read(fixture("tiny-opt/tokenizer.json")).unwrap();
    let vocab = std::fs::read(fixture("tiny-opt-350m-style/vocab.json")).unwrap();
    let merges = std::fs::read(fixture("tiny-opt-350m-style/merges.txt")).unwrap();
    let exercise = |tok: engine_opt::tokenizer::OptTokenizer| {
        for text in ["Hello, world!", "", "\u{0}\u{ffff}ü€𝄞", "   \n\t", "a"] {
            let _ = tok.encode(text);
        }
        let n = tok.vocab_size() as u32;
        for ids in [vec![0u32, 1, 2], vec![n.saturating_sub(1)], vec![n], vec![u32::MAX], vec![]] {
            let _ = tok.decode(&ids);
        }
    };
    // An input is a tag byte (b'j': tokenizer.json, b'b': vocab.json NUL merges.txt) and the file(s).
    let run = |input: &[u8]| match input.split_first() {
        Some((b'j', rest)) => {
            std::fs::write(json_dir.join("tokenizer.json"), rest).unwrap();
            if let Ok(Some(t)) = engine_opt::tokenizer::OptTokenizer::from_dir(&json_dir, 2) {
                exercise(t);
            }
        }
        Some((_, rest)) => {
            let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            std::fs::write(bpe_dir.join("vocab.json"), &rest[..split]).unwrap();
            std::fs::write(bpe_dir.join("merges.txt"), rest.get(split + 1..).unwrap_or(&[])).unwrap();
            if let Ok(Some(t)) = engine_opt::tokenizer::OptTokenizer::from_dir(&bpe_dir, 2) {
                exercise(t);
            }
        }
        None => {}
    };
    f.drive(
        |rng| {
            if rng.random_bool(0.6) {
                let mut i = vec![b'j'];
                i.extend(mutated_json_text(rng, &tokenizer));
                i
            } else {
                let mut v = if rng.random_bool(0.7) { mutated_json_text(rng, &vocab) } else { vocab.clone() };
                v.retain(|&b| b != 0);
                let mut m = merges.clone();
                if rng.random_bool(0.5) {
                    let len = m.len();
                    mutate_bytes(rng, &mut m, 0..len);
                }
                m.retain(|&b| b != 0);
                let mut i = vec![b'b'];
                i.extend(v);
                i.push(0);
                i.extend(m);
                i
            }
        },
        run,
    );
}

#[test]
fn fuzz_jsonl_inputs() {
    let f = Fuzz::new("jsonl_inputs", 0.1);
    let tmp = scratch();
    let path = tmp.path().join("in.jsonl");
    let base = b"{\"prompt\": \"Hello\"}\n\n{\"input_ids\": [2, 5, 9]}\n{\"prompt\": \"a \\u00fc\"}\n".to_vec();
    let loaded = engine_opt::loading::load_model(fixture("tiny-opt").to_str().unwrap(), false, 0).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let run = |input: &[u8]| {
        std::fs::write(&path, input).unwrap();
        let Ok(inputs) = tierlm::cli::generate::read_inputs(&path) else { return };
        let prompts: Vec<Vec<u32>> = inputs
            .iter()
            .filter_map(|i| match i {
                tierlm::cli::generate::Input::Text(t) => tok.encode(t).ok(),
                tierlm::cli::generate::Input::Ids(ids) => Some(ids.clone()),
            })
            .collect();
        for max_new in [0, 4, usize::MAX] {
            let _ = engine_opt::generation::validate_prompts(&loaded.model.config, &prompts, max_new, 0);
        }
    };
    f.drive(
        |rng| {
            if rng.random_bool(0.5) {
                // A line-wise structured mutation.
                let mut lines: Vec<Vec<u8>> = base.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
                let i = rng.random_range(0..lines.len());
                lines[i] = mutated_json_text(rng, &lines[i]);
                lines.join(&b'\n')
            } else {
                let mut b = base.clone();
                let len = b.len();
                mutate_bytes(rng, &mut b, 0..len);
                b
            }
        },
        run,
    );
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    Generate(GenerateArgs),
    Bench(BenchArgs),
}

/// Flags that mutations insert, with or without a value.
const FLAGS: &[&str] = &[
    "--max-new-tokens",
    "--gen-len",
    "--prompt-len",
    "--gpu-batch-size",
    "--num-gpu-batches",
    "--temperature",
    "--top-k",
    "--top-p",
    "--seed",
    "--percent",
    "--attn-sparsity",
    "--gpu-mem",
    "--pin-weight",
    "--compress-weight",
    "--compress-cache",
    "--cpu-cache-compute",
    "--dummy",
    "--json",
    "--resume",
    "--bytes",
    "--block",
    "--queue-depth",
    "--reps",
    "--rss-check",
    "--host-memory",
    "--disk-backend",
];

/// A mutated command line from `base`.
fn mutate_args(rng: &mut ChaCha8Rng, base: &[String]) -> Vec<String> {
    let mut args = base.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        let at = rng.random_range(1..=args.len());
        match rng.random_range(0..7) {
            0 | 1 if at < args.len() => args[at] = pick(rng, INTERESTING).to_string(),
            2 if at < args.len() => {
                args.remove(at);
            }
            3 => {
                let flag = pick(rng, FLAGS).to_string();
                let value = pick(rng, INTERESTING).to_string();
                args.splice(at..at, [flag, value]);
            }
            4 => {
                let six: Vec<String> = (0..6).map(|_| pick(rng, &INTERESTING[..24]).to_string()).collect();
                args.splice(at..at, std::iter::once("--percent".to_string()).chain(six));
            }
            5 if at < args.len() => {
                let mut b = args[at].clone().into_bytes();
                let len = b.len();
                mutate_bytes(rng, &mut b, 0..len);
                args[at] = String::from_utf8_lossy(&b).replace('\0', "");
            }
            _ if at < args.len() => {
                let a = args[at].clone();
                args.insert(at, a);
            }
            _ => {}
        }
    }
    args
}

fn base_command_lines(tmp: &Path) -> Vec<Vec<String>> {
    let model = fixture("tiny-opt").to_str().unwrap().to_string();
    let off = tmp.join("offload").to_str().unwrap().to_string();
    let input = tmp.join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"Hello\"}\n{\"input_ids\": [2, 7]}\n").unwrap();
    let input = input.to_str().unwrap().to_string();
    let output = tmp.join("out.jsonl").to_str().unwrap().to_string();
    let lines: Vec<Vec<&str>> = vec![
        vec!["generate", "--model", &model, "--prompt", "Hello", "--max-new-tokens", "3"],
        vec!["generate", "--model", &model, "--input", &input, "--max-new-tokens", "2", "--gpu-batch-size", "2"],
        vec!["generate", "--model", &model, "--input", &input, "--max-new-tokens", "2", "--output", &output],
        vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
            "--temperature",
            "0.7",
            "--top-k",
            "5",
            "--top-p",
            "0.9",
        ],
        vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
            "--percent",
            "0",
            "50",
            "0",
            "50",
            "0",
            "100",
            "--offload-dir",
            &off,
        ],
        vec!["bench", "--model", &model, "--prompt-len", "8", "--gen-len", "3", "--gpu-batch-size", "2"],
        vec![
            "bench",
            "--model",
            &model,
            "--prompt-len",
            "8",
            "--gen-len",
            "3",
            "--percent",
            "0",
            "50",
            "0",
            "50",
            "0",
            "100",
            "--offload-dir",
            &off,
            "--json",
        ],
        vec![
            "bench",
            "--model",
            "opt-125m",
            "--dummy",
            "--prompt-len",
            "8",
            "--gen-len",
            "2",
            "--num-gpu-batches",
            "2",
        ],
    ];
    lines.into_iter().map(|l| std::iter::once("tierlm").chain(l).map(str::to_string).collect()).collect()
}

/// A command line of the corpus: one argument a line, `{tiny}` standing for
/// the tiny fixture and `{tmp}` for the scratch directory.
fn corpus_args(input: &[u8], tmp: &Path) -> Vec<String> {
    let tiny = fixture("tiny-opt");
    String::from_utf8_lossy(input)
        .split('\n')
        .map(|a| a.replace("{tiny}", tiny.to_str().unwrap()).replace("{tmp}", tmp.to_str().unwrap()))
        .collect()
}

/// In-process: the argument parser and the checks that run before loading.
#[test]
fn fuzz_command_lines_in_process() {
    let mut f = Fuzz::new("command_lines", 0.1);
    let tmp = scratch();
    let bases = base_command_lines(tmp.path());
    let run = |args: &[String]| {
        let Ok(cli) = Cli::try_parse_from(args) else { return };
        match cli.command {
            Sub::Generate(a) => {
                let _ = tierlm::cli::gpu::generate_policy(&a).map(|p| (p.block_size(), p.disk_percents()));
                let _ = tierlm::cli::generate::output_file(&a);
            }
            Sub::Bench(a) => {
                if let Ok(p) = a.policy() {
                    let _ = (p.block_size(), p.disk_percents(), p.check_cpu_engine());
                    if let Ok(engine_opt::loading::ModelSpec::Preset(_, c)) =
                        engine_opt::loading::ModelSpec::parse(&a.model)
                    {
                        let seq = a.prompt_len.saturating_add(a.gen_len);
                        let _ =
                            engine_opt::cpu_offload::cache_disk_bytes(&c, &p, p.num_gpu_batches, p.gpu_batch_size, seq);
                        let _ = engine_opt::cpu_offload::weights_disk_bytes(&c, &p);
                    }
                }
            }
        }
    };
    for input in f.corpus() {
        let args = corpus_args(&input, tmp.path());
        f.case(&input.clone(), || run(&args));
    }
    while f.more() {
        let base = pick(&mut f.rng, &bases).clone();
        let args = mutate_args(&mut f.rng, &base);
        let input = args.join("\n").into_bytes();
        f.case(&input, || run(&args));
    }
    f.finish();
}

/// The binary itself, for a bounded number of mutated command lines: exit
/// 0, 1 or 2 with no panic, no signal, and nothing left in the offload
/// directory. A run past its time limit is killed and counted as slow
/// (a large but legitimate workload), not as a failure.
#[test]
fn fuzz_command_lines_binary() {
    let mut f = Fuzz::new("binary", 0.12);
    let tmp = scratch();
    let bases = base_command_lines(tmp.path());
    let exe = {
        let built = PathBuf::from(env!("CARGO_BIN_EXE_tierlm"));
        if built.is_file() {
            built
        } else {
            repo_root().join(".gpu/tierlm")
        }
    };
    let mut slow = 0;
    let mut bad = Vec::new();
    let mut run = |args: &[String]| -> Option<String> {
        let _ = std::fs::remove_file(tmp.path().join("out.jsonl"));
        let mut child = Command::new(&exe)
            .args(&args[1..])
            .current_dir(tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tierlm starts");
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stderr = reader.join().unwrap_or_default();
        let left = std::fs::read_dir(tmp.path().join("offload")).map_or(0, |d| d.count());
        match status {
            None => {
                slow += 1;
                None
            }
            Some(s) if s.code().is_some_and(|c| c <= 2) && !stderr.contains("panicked") && left == 0 => None,
            Some(s) => Some(format!("{args:?}: {s:?}, {left} files left in the offload directory; stderr: {stderr}")),
        }
    };
    for input in f.corpus() {
        let args = corpus_args(&input, tmp.path());
        if let Some(e) = run(&args) {
            bad.push(e);
        }
        f.cases += 1;
    }
    while f.more() {
        let base = pick(&mut f.rng, &bases).clone();
        let args = mutate_args(&mut f.rng, &base);
        let input = args.join("\n").into_bytes();
        let _ = std::fs::write(f.dir.join("current"), &input);
        if let Some(e) = run(&args) {
            let path = f.dir.join(format!("{:016x}", hash(&input)));
            let _ = std::fs::write(&path, &input);
            eprintln!("fuzz binary: FAILED {e}; saved as {}", path.display());
            bad.push(e);
        }
        f.cases += 1;
    }
    eprintln!("fuzz binary: {slow} runs killed at 20 s (slow, not failures)");
    f.finish();
    assert!(bad.is_empty(), "{bad:#?}");
}
