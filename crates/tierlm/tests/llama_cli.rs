//! `tierlm generate` on the Llama family's fixtures (fixtures/llama, made
//! by scripts/make_llama_fixtures.py and scripts/make_llama_tokenizers.py
//! with Hugging Face's own classes), run as a user would: Hugging Face's
//! greedy tokens through `--input`, its tokenization of text and of chat
//! templates through `--prompt` and `--chat`, stop tokens from
//! generation_config.json, `--output`/`--resume`, and a clear error for
//! each kind of bad input and for each flag the family cannot honour yet.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_json::Value;

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

fn tierlm(args: &[&str]) -> Output {
    Command::new(tierlm_exe()).args(args).output().expect("tierlm runs")
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures/llama").join(name)
}

fn fixtures() -> Vec<PathBuf> {
    let root = repo_root().join("fixtures/llama");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 5, "the five fixtures of fixtures/llama/README.md");
    dirs
}

fn fails(args: &[&str]) -> String {
    let out = tierlm(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.contains("error: "), "{args:?}: {stderr}");
    stderr
}

fn succeeds(args: &[&str]) -> String {
    let out = tierlm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// The `output_ids` of each JSON line.
fn output_ids(stdout: &str) -> Vec<Vec<u32>> {
    stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            serde_json::from_value(v["output_ids"].clone()).unwrap()
        })
        .collect()
}

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
    batch: Batch,
}

#[derive(Deserialize)]
struct Case {
    input_ids: Vec<u32>,
    greedy_f32: Vec<u32>,
}

#[derive(Deserialize)]
struct Batch {
    input_ids: Vec<Vec<u32>>,
    greedy_f32: Vec<Vec<u32>>,
}

fn expected(dir: &Path) -> Expected {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap()
}

#[derive(Deserialize)]
struct TokenizerExpected {
    cases: Vec<TokenizerCase>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    input_ids: Vec<u32>,
    chat_text: Option<String>,
    chat_ids: Option<Vec<u32>>,
}

fn tokenizer_expected(dir: &Path) -> TokenizerExpected {
    serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_expected.json")).unwrap()).unwrap()
}

/// A JSONL file of `{"input_ids": ...}` lines in `dir`.
fn ids_file(dir: &Path, name: &str, prompts: &[Vec<u32>]) -> PathBuf {
    let path = dir.join(name);
    let lines: String = prompts.iter().map(|p| format!("{}\n", serde_json::json!({ "input_ids": p }))).collect();
    std::fs::write(&path, lines).unwrap();
    path
}

/// Hugging Face's float32 greedy tokens (16 for each prompt alone and for
/// all in one left-padded batch), through the command with `--input`: the
/// CPU engine keeps its cache in f32, as that reference computes.
#[test]
fn input_ids_give_hugging_faces_greedy_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let e = expected(&dir);
        let d = dir.to_str().unwrap();
        // Each alone (batches of one), then all in one left-padded batch.
        let prompts: Vec<Vec<u32>> = e.cases.iter().map(|c| c.input_ids.clone()).collect();
        let input = ids_file(tmp.path(), "alone.jsonl", &prompts);
        let got = output_ids(&succeeds(&[
            "generate",
            "--model",
            d,
            "--input",
            input.to_str().unwrap(),
            "--max-new-tokens",
            "16",
            "--gpu-batch-size",
            "1",
        ]));
        let want: Vec<Vec<u32>> = e.cases.iter().map(|c| c.greedy_f32.clone()).collect();
        assert_eq!(got, want, "{name}: each prompt alone");
        let input = ids_file(tmp.path(), "batch.jsonl", &e.batch.input_ids);
        let got = output_ids(&succeeds(&[
            "generate",
            "--model",
            d,
            "--input",
            input.to_str().unwrap(),
            "--max-new-tokens",
            "16",
            "--gpu-batch-size",
            "8",
        ]));
        assert_eq!(got, e.batch.greedy_f32, "{name}: one left-padded batch");
    }
}

/// `--percent 0 W 0 C 0 100`: the later layers and a share of each batch's
/// KV cache on disk in `--offload-dir`, read back as the schedule reaches
/// them. Hugging Face's tokens all the same, and nothing left behind.
#[test]
fn weights_and_cache_on_disk_give_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let offload = tempfile::tempdir().unwrap();
    let off = offload.path().to_str().unwrap();
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let e = expected(&dir);
        let input = ids_file(tmp.path(), "batch.jsonl", &e.batch.input_ids);
        for percent in [["0", "0", "0", "100", "0", "100"], ["0", "50", "0", "34", "0", "100"]] {
            let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--input", input.to_str().unwrap()];
            args.extend(["--max-new-tokens", "16", "--gpu-batch-size", "8", "--offload-dir", off, "--percent"]);
            args.extend(percent);
            let out = tierlm(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{name} {percent:?}: {stderr}");
            let got = output_ids(&String::from_utf8(out.stdout).unwrap());
            assert_eq!(got, e.batch.greedy_f32, "{name}, --percent {percent:?}");
            assert!(stderr.contains("peak per tier:"), "{stderr}");
            let left: Vec<_> = std::fs::read_dir(offload.path()).unwrap().collect();
            assert!(left.is_empty(), "{name}: the offload directory holds {left:?}");
            // The disk is really used: its first write failing fails the run
            // with the disk tier's clear error (debug builds inject faults;
            // a release build says it ignores them).
            let out =
                Command::new(tierlm_exe()).args(&args).env("TIERLM_DISK_FAULTS", "write:0:enospc").output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                (!out.status.success() && stderr.contains("is full")) || stderr.contains("TIERLM_DISK_FAULTS"),
                "{name} {percent:?}: {stderr}"
            );
        }
    }
}

/// A copy of a fixture's files in a new directory, to edit.
fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn any_eos_id_of_generation_config_stops_a_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("tiny-llama3-gqa-bf16", tmp.path());
    let e = expected(&dir);
    let prompts: Vec<Vec<u32>> = e.cases.iter().map(|c| c.input_ids.clone()).collect();
    // Stop the first prompt at its 5th token and the third at its 3rd.
    let (stop0, stop2) = (e.cases[0].greedy_f32[4], e.cases[2].greedy_f32[2]);
    edit_json(&dir.join("generation_config.json"), |g| {
        g.insert("eos_token_id".into(), serde_json::json!([stop0, stop2]));
    });
    let input = ids_file(tmp.path(), "in.jsonl", &prompts);
    let run = |d: &Path| {
        output_ids(&succeeds(&[
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--max-new-tokens",
            "16",
        ]))
    };
    let got = run(&dir);
    for (case, out) in e.cases.iter().zip(&got) {
        let cut = case.greedy_f32.iter().position(|t| *t == stop0 || *t == stop2).map_or(16, |i| i + 1);
        assert_eq!(out, &case.greedy_f32[..cut].to_vec());
    }
    assert!(got[0].len() <= 5 && got[2].len() <= 3, "{got:?}");
    // Without generation_config.json, config.json's ids (2 and 3) apply:
    // none of which these prompts emit.
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();
    assert_eq!(run(&dir), e.cases.iter().map(|c| c.greedy_f32.clone()).collect::<Vec<_>>());
}

/// The runtime's tokenizer gives transformers' ids and chat text for every
/// fixture that has a tokenizer.
#[test]
fn the_tokenizer_matches_transformers() {
    let mut checked = 0;
    for dir in fixtures() {
        if !dir.join("tokenizer_expected.json").is_file() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let tok = runtime::tokenizer::Tokenizer::from_dir(&dir).unwrap().unwrap();
        assert_eq!(tok.vocab_size(), 512, "{name}");
        for case in tokenizer_expected(&dir).cases {
            assert_eq!(tok.encode(&case.text).unwrap(), case.input_ids, "{name}: {:?}", case.text);
            match (&case.chat_text, &case.chat_ids) {
                (Some(text), Some(ids)) => {
                    let messages = [runtime::tokenizer::ChatMessage::user(&case.text)];
                    assert_eq!(&tok.apply_chat_template(&messages).unwrap(), text, "{name}");
                    assert_eq!(&tok.encode_chat(&case.text).unwrap(), ids, "{name}");
                }
                _ => assert!(tok.encode_chat(&case.text).is_err(), "{name} has no chat template"),
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 4, "fixtures with a tokenizer");
}

/// `--prompt` text and `--chat` through the command: the same tokens as
/// the ids transformers gives, written as `--input`.
#[test]
fn prompts_and_chat_prompts_run_transformers_ids() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-llama3-gqa-bf16", "tiny-qwen2-bias-bf16", "tiny-mistral-bf16"] {
        let dir = fixture(name);
        let d = dir.to_str().unwrap();
        let cases = tokenizer_expected(&dir).cases;
        let mut args: Vec<&str> = vec!["generate", "--model", d, "--json", "--max-new-tokens", "6"];
        for c in &cases {
            args.extend(["--prompt", c.text.as_str()]);
        }
        let by_text = output_ids(&succeeds(&args));
        let ids: Vec<Vec<u32>> = cases.iter().map(|c| c.input_ids.clone()).collect();
        let input = ids_file(tmp.path(), "ids.jsonl", &ids);
        let by_ids = output_ids(&succeeds(&[
            "generate",
            "--model",
            d,
            "--input",
            input.to_str().unwrap(),
            "--max-new-tokens",
            "6",
        ]));
        assert_eq!(by_text, by_ids, "{name}: text prompts");
        assert!(by_ids.iter().any(|o| o != &by_ids[0]), "{name}: the prompts lead to different tokens");

        args.push("--chat");
        let by_chat = output_ids(&succeeds(&args));
        let chat_ids: Vec<Vec<u32>> = cases.iter().map(|c| c.chat_ids.clone().unwrap()).collect();
        let input = ids_file(tmp.path(), "chat.jsonl", &chat_ids);
        let by_chat_ids = output_ids(&succeeds(&[
            "generate",
            "--model",
            d,
            "--input",
            input.to_str().unwrap(),
            "--max-new-tokens",
            "6",
        ]));
        assert_eq!(by_chat, by_chat_ids, "{name}: chat prompts");
        assert_ne!(by_chat, by_text, "{name}: the template changes the prompt");
    }
    // The text printed without --json: the prompt, then the decoded tokens.
    let out = succeeds(&[
        "generate",
        "--model",
        fixture("tiny-qwen2-bias-bf16").to_str().unwrap(),
        "--prompt",
        "Hello, world!",
        "--max-new-tokens",
        "4",
    ]);
    assert!(out.starts_with("Hello, world!") && out.len() > "Hello, world!\n".len(), "{out:?}");
}

#[test]
fn chat_without_a_template_and_text_without_a_tokenizer_are_clear_errors() {
    let qwen3 = fixture("tiny-qwen3-qknorm-bf16");
    let e = fails(&["generate", "--model", qwen3.to_str().unwrap(), "--prompt", "Hi", "--chat"]);
    assert!(e.contains("--chat") && e.contains("no chat template") && e.contains("tiny-qwen3-qknorm-bf16"), "{e}");
    let mqa = fixture("tiny-llama-mqa-tied-f16");
    let e = fails(&["generate", "--model", mqa.to_str().unwrap(), "--prompt", "Hi"]);
    assert!(e.contains("no tokenizer.json") && e.contains("input_ids"), "{e}");
    let e = fails(&["generate", "--model", fixture("../opt/tiny-opt").to_str().unwrap(), "--prompt", "Hi", "--chat"]);
    assert!(e.contains("--chat") && e.contains("OPT"), "{e}");
}

#[test]
fn bad_configs_are_refused_naming_the_field_and_the_supported_values() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, Value, &[&str]); 5] = [
        ("model_type", serde_json::json!("gemma2"), &["gemma2", "opt, llama, mistral, qwen2, qwen3"]),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            &["rope_scaling", "yarn", "default, linear, llama3"],
        ),
        ("hidden_act", serde_json::json!("gelu"), &["hidden_act", "gelu", "silu"]),
        ("num_key_value_heads", serde_json::json!(3), &["num_attention_heads", "4", "num_key_value_heads 3"]),
        ("vocab_size", serde_json::json!(0), &["vocab_size", "positive"]),
    ];
    for (i, (field, value, words)) in cases.into_iter().enumerate() {
        let dir = copy_fixture("tiny-llama3-gqa-bf16", &tmp.path().join(i.to_string()));
        edit_json(&dir.join("config.json"), |c| {
            c.insert(field.into(), value);
        });
        let e = fails(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hi"]);
        for w in words {
            assert!(e.contains(w), "{field}: {w:?} not in {e}");
        }
    }
}

#[test]
fn an_untied_checkpoint_without_lm_head_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("tiny-llama3-gqa-bf16", tmp.path());
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != "lm_head.weight").collect();
    assert_eq!(kept.len() + 1, st.len(), "the fixture has an lm_head");
    safetensors::serialize_to_file(kept, &None, &dir.join("model.safetensors")).unwrap();
    let e = fails(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hi"]);
    assert!(e.contains("lm_head.weight") && e.contains("tie_word_embeddings"), "{e}");
    // Tied, the embeddings serve as the head.
    edit_json(&dir.join("config.json"), |c| {
        c.insert("tie_word_embeddings".into(), Value::Bool(true));
    });
    succeeds(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hi", "--max-new-tokens", "2"]);
}

#[test]
fn flags_the_family_cannot_honour_yet_are_refused_by_name() {
    let d = fixture("tiny-qwen2-bias-bf16");
    let d = d.to_str().unwrap();
    for (flags, name) in [
        (&["--percent", "0", "50", "0", "100", "0", "100", "--compress-weight"][..], "--compress-weight"),
        (&["--compress-cache"][..], "--compress-cache"),
        (&["--cpu-cache-compute"][..], "--cpu-cache-compute"),
        (&["--gpu-mem", "1G"][..], "--gpu-mem"),
    ] {
        let mut args = vec!["generate", "--model", d, "--prompt", "Hi"];
        args.extend_from_slice(flags);
        let e = fails(&args);
        assert!(e.contains(name) && e.contains("not supported for the Llama family yet"), "{flags:?}: {e}");
    }
    // On the GPU engine: the activations sit on one tier (GPU, host memory
    // or disk); split over tiers they are refused, GPU or not.
    let mut args = vec!["generate", "--model", d, "--prompt", "Hi", "--percent", "100", "0", "100", "0", "50", "50"];
    let e = fails(&args);
    assert!(e.contains("activations must sit on one tier"), "{e}");
    // The cache plans the tiered cache cannot run are refused saying what
    // would, GPU or not: sparse attention is the CPU's, a 4-bit cache lives
    // on one tier.
    for (flags, want) in [
        (&["--percent", "100", "0", "100", "0", "100", "0", "--attn-sparsity", "0.5"][..], "--cpu-cache-compute"),
        (&["--percent", "100", "0", "30", "30", "100", "0", "--compress-cache"][..], "--compress-cache"),
        (&["--percent", "100", "0", "0", "100", "100", "0", "--cpu-cache-compute", "--compress-cache"], "one tier"),
    ] {
        args = vec!["generate", "--model", d, "--prompt", "Hi"];
        args.extend_from_slice(flags);
        let e = fails(&args);
        assert!(e.contains(want) && !e.contains("there is none"), "{flags:?}: {e}");
    }
    // The cache on any tiers (in whole sequences), 4-bit on one, in host
    // memory with the CPU's attention (sparse or not), or with
    // --cpu-cache-compute over a cache on the GPU (the attention stays
    // there) is the engine's: without a GPU, only the missing GPU is said.
    if ops::gpu::unavailable_reason().is_some() {
        for flags in [
            &["--percent", "0", "50", "0", "100", "100", "0"][..],
            &["--percent", "100", "0", "30", "40", "100", "0"],
            &["--percent", "100", "0", "0", "0", "100", "0"],
            &["--percent", "100", "0", "100", "0", "100", "0", "--compress-cache"],
            &["--percent", "100", "0", "0", "100", "100", "0", "--compress-cache"],
            &["--percent", "100", "0", "100", "0", "100", "0", "--cpu-cache-compute"],
            &["--percent", "100", "0", "0", "100", "100", "0", "--cpu-cache-compute", "--attn-sparsity", "0.5"],
            // The activations in host memory or on disk, beside any cache
            // and weights placement (on disk alone, the CPU engine cannot
            // place them: the GPU engine's).
            &["--percent", "100", "0", "100", "0", "0", "100"],
            &["--percent", "100", "0", "100", "0", "0", "0"],
            &["--percent", "0", "50", "30", "40", "0", "100"],
            &["--percent", "0", "100", "0", "100", "0", "0"],
        ] {
            args = vec!["generate", "--model", d, "--prompt", "Hi"];
            args.extend_from_slice(flags);
            let e = fails(&args);
            assert!(e.contains("there is none") && !e.contains("not supported"), "{flags:?}: {e}");
        }
    }
    // --policy auto: the search places the weights on the GPU engine; with
    // no GPU, a note and the CPU engine's default placement.
    if ops::gpu::unavailable_reason().is_some() {
        let out = tierlm(&["generate", "--model", d, "--prompt", "Hi", "--max-new-tokens", "2", "--policy", "auto"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.contains("no GPU here"), "{stderr}");
    }
    // Everything in host memory is what the CPU engine does.
    let all_host = ["--percent", "0", "100", "0", "100", "0", "100"];
    let mut args = vec!["generate", "--model", d, "--prompt", "Hi", "--max-new-tokens", "2"];
    args.extend_from_slice(&all_host);
    succeeds(&args);
}

/// `--percent` with the model on the GPU runs the GPU engine: the weights
/// resident, or streamed from pinned host memory and from disk, give the
/// same tokens. Without a GPU, a clear error that says how to run on the
/// CPU instead.
#[test]
fn the_gpu_engine_runs_each_fixture_or_says_there_is_no_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let offload = tempfile::tempdir().unwrap();
    let off = offload.path().to_str().unwrap();
    let gpu = ops::gpu::unavailable_reason().is_none();
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let e = expected(&dir);
        let input = ids_file(tmp.path(), "batch.jsonl", &e.batch.input_ids);
        let mut runs = Vec::new();
        for percent in [
            ["100", "0", "100", "0", "100", "0"],
            ["0", "100", "100", "0", "100", "0"],
            ["50", "0", "100", "0", "100", "0"],
        ] {
            let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--input", input.to_str().unwrap()];
            args.extend(["--max-new-tokens", "16", "--gpu-batch-size", "8", "--offload-dir", off, "--percent"]);
            args.extend(percent);
            if !gpu {
                let e = fails(&args);
                assert!(e.contains("there is none") && e.contains("--percent 0 100 0 100 0 100"), "{name}: {e}");
                continue;
            }
            let out = tierlm(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{name} {percent:?}: {stderr}");
            assert!(stderr.contains("peak per tier:"), "{stderr}");
            runs.push(output_ids(&String::from_utf8(out.stdout).unwrap()));
            let left: Vec<_> = std::fs::read_dir(offload.path()).unwrap().collect();
            assert!(left.is_empty(), "{name}: the offload directory holds {left:?}");
        }
        if gpu {
            assert_eq!(runs[1], runs[0], "{name}: weights streamed from host memory");
            assert_eq!(runs[2], runs[0], "{name}: half the layers from disk");
            let agree = runs[0].iter().zip(&e.batch.greedy_f32).filter(|(a, b)| a == b).count();
            println!("{name}: GPU tokens equal transformers' float32 run for {agree} of {} prompts", runs[0].len());
        } else {
            println!("skipped the GPU runs of {name}: no GPU");
        }
    }
}

#[test]
fn output_and_resume_give_an_uninterrupted_runs_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-mistral-bf16");
    let d = dir.to_str().unwrap();
    let input = tmp.path().join("in.jsonl");
    let texts = ["Hello, world!", "The quick brown fox", "What is the capital of France?", "hello model"];
    let lines: String = texts.iter().map(|t| format!("{}\n", serde_json::json!({ "prompt": t }))).collect();
    std::fs::write(&input, lines).unwrap();
    let out = tmp.path().join("out.jsonl");
    let run = |resume: bool| {
        let mut args = vec![
            "generate",
            "--model",
            d,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--gpu-batch-size",
            "2",
            "--max-new-tokens",
            "5",
        ];
        if resume {
            args.push("--resume");
        }
        succeeds(&args)
    };
    run(false);
    let whole = std::fs::read_to_string(&out).unwrap();
    assert_eq!(whole.lines().count(), 4);
    // The same tokens as printed without --output.
    let printed = succeeds(&["generate", "--model", d, "--input", input.to_str().unwrap(), "--max-new-tokens", "5"]);
    assert_eq!(output_ids(&whole), output_ids(&printed));
    // Killed after the first batch, with half a line written.
    let first: Vec<&str> = whole.lines().take(2).collect();
    std::fs::write(&out, format!("{}\n{{\"line\": 3, \"ind", first.join("\n"))).unwrap();
    run(true);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), whole);
    // Without --resume an existing file is refused.
    let e = fails(&["generate", "--model", d, "--input", input.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn sampling_is_seeded_and_dummy_weights_run_a_directorys_config() {
    let d = fixture("tiny-qwen3-qknorm-bf16");
    let d = d.to_str().unwrap();
    let sample = |seed: &str| {
        output_ids(&succeeds(&[
            "generate",
            "--model",
            d,
            "--prompt",
            "Hello, world!",
            "--json",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--max-new-tokens",
            "12",
        ]))
    };
    let a = sample("7");
    assert_eq!(a, sample("7"), "the same seed, the same tokens");
    assert!(a[0].iter().all(|&t| t < 512));
    let greedy = output_ids(&succeeds(&["generate", "--model", d, "--prompt", "Hello, world!", "--json"]));
    assert_eq!(greedy[0].len(), 32, "--max-new-tokens defaults to 32");
    let dummy = output_ids(&succeeds(&["generate", "--model", d, "--dummy", "--prompt", "Hello, world!", "--json"]));
    assert_eq!(dummy[0].len(), 32);
    assert_ne!(dummy, greedy, "seeded random weights, not the checkpoint's");
    let e = fails(&["generate", "--model", "qwen3-8b", "--prompt", "Hi"]);
    assert!(e.contains("qwen3-8b is a preset") && e.contains("--dummy"), "{e}");
    let e = fails(&["generate", "--model", "llama-9", "--prompt", "Hi"]);
    assert!(e.contains("llama-3.1-8b") && e.contains("opt-125m"), "{e}");
    let e = fails(&["bench", "--model", "llama-3.1-8b", "--dummy"]);
    assert!(e.contains("bench runs the Llama family on its GPU engine") && e.contains("generate"), "{e}");
    // The activations split over tiers: refused saying what runs (one
    // tier), GPU or not.
    let e = fails(&["bench", "--model", "llama-3.1-8b", "--dummy", "--percent", "100", "0", "100", "0", "50", "50"]);
    assert!(e.contains("activations split over tiers") && e.contains("whole on one tier"), "{e}");
    let e = fails(&[
        "bench",
        "--model",
        "llama-3.1-8b",
        "--dummy",
        "--percent",
        "100",
        "0",
        "30",
        "30",
        "100",
        "0",
        "--compress-cache",
    ]);
    assert!(e.contains("--compress-cache") && e.contains("one tier"), "{e}");
    if ops::gpu::unavailable_reason().is_some() {
        // The cache split over GPU, host and disk is the engine's.
        let e =
            fails(&["bench", "--model", "llama-3.1-8b", "--dummy", "--percent", "100", "0", "30", "30", "100", "0"]);
        assert!(e.contains("there is none") && !e.contains("not supported"), "{e}");
        // So are the activations in host memory or on disk.
        for act in [["0", "100"], ["0", "0"]] {
            let mut args = vec!["bench", "--model", "llama-3.1-8b", "--dummy", "--percent", "100", "0", "100", "0"];
            args.extend_from_slice(&act);
            let e = fails(&args);
            assert!(e.contains("there is none") && !e.contains("not supported"), "{act:?}: {e}");
        }
    }
    // The placement check, before anything is allocated (and with --gpu-mem
    // on a machine without a GPU too): 141 GB of bf16 weights do not fit
    // 78 GB; the refusal names the tier, and the nearest policy that fits
    // keeps the cache and activations where this engine keeps them.
    let e = fails(&[
        "bench",
        "--model",
        "llama-3.1-70b",
        "--dummy",
        "--percent",
        "100",
        "0",
        "100",
        "0",
        "100",
        "0",
        "--gpu-batch-size",
        "32",
        "--num-gpu-batches",
        "2",
        "--gpu-mem",
        "78G",
    ]);
    assert!(e.contains("does not fit") && e.contains("GPU: needs"), "{e}");
    assert!(!e.contains("--compress-weight"), "compression is not advised for this family: {e}");
    // The model's own limits come before the machine's, GPU or not:
    // Mistral's sliding window, and the positions a preset has.
    let gpu = ["--percent", "100", "0", "100", "0", "100", "0", "--gpu-batch-size", "1"];
    let mut args = vec!["bench", "--model", "mistral-7b", "--dummy", "--prompt-len", "4000", "--gen-len", "200"];
    args.extend(gpu);
    let e = fails(&args);
    assert!(e.contains("sliding_window of 4096"), "{e}");
    let mut args = vec!["bench", "--model", "qwen3-8b", "--dummy", "--prompt-len", "40000", "--gen-len", "1000"];
    args.extend(gpu);
    let e = fails(&args);
    assert!(e.contains("exceed the model's 40960 positions"), "{e}");
    // (Where this machine's host memory and disk hold the rest: a small
    // test machine may have no policy that fits at all.)
    if e.contains("nearest policy that fits") {
        assert!(e.contains(" 100 0 100 0 --gpu-batch-size"), "{e}");
    }
    if ops::gpu::unavailable_reason().is_some() {
        let e =
            fails(&["bench", "--model", "llama-3.1-8b", "--dummy", "--percent", "100", "0", "100", "0", "100", "0"]);
        assert!(e.contains("there is none"), "{e}");
    }
}
