//! The GPU engine against the CPU reference (and transformers' answers) on
//! the tiny fixtures of `fixtures/opt/`: first-step logits within 2e-2,
//! greedy tokens equal for at least 16 new tokens, left-padded batches,
//! the 350m-style layout (post-LN, project_in/out); part by part (embedding,
//! each layer, logits) so that a failure says where; decoding over a long
//! cache teacher-forced against the CPU; dummy weights made on the GPU; and
//! `tierlm bench`/`generate` on the GPU engine.
//!
//! Every test that needs a GPU prints "skipped: no CUDA driver" and passes
//! where there is none (CI). Fixtures are found through `TIERLM_REPO_ROOT`
//! (set by the GPU bundle's run-tests.sh) or the crate's directory.

mod common;
use common::*;

use std::process::Command;

use engine_opt::checkpoint::Checkpoint;
use engine_opt::generation::{prefill_logits as cpu_prefill_logits, GenerateOptions};
use engine_opt::gpu::generation::{prefill_logits, GpuBatch};
use engine_opt::gpu::model::Workspace;
use engine_opt::gpu::{self, Gpu, GpuModel};
use engine_opt::model::OptModel;
use engine_opt::tokenizer::left_pad;
use engine_opt::OptConfig;
use runtime::cpu::{CpuModel, Step};

fn gpu_model(name: &str) -> GpuModel {
    let dir = fixture(name);
    let config = OptConfig::from_dir(&dir).unwrap();
    let src = Checkpoint::open(&dir).unwrap();
    let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("{e}"));
    GpuModel::load(gpu, config, &src, &indicatif::ProgressBar::hidden()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn check_fixture(model_dir: &str, expected_dir: &str) {
    let cpu = cpu_model(model_dir);
    let gpu = gpu_model(model_dir);
    let vocab = gpu.config.vocab_size;
    for case in &expected(expected_dir).cases {
        let what = format!("{model_dir}/{}", case.name);
        let got = prefill_logits(&gpu, &case.input_ids).unwrap_or_else(|e| panic!("{what}: {e}"));
        let cpu_logits = cpu_prefill_logits(&cpu.model, &case.input_ids).unwrap();
        let want_hf: Vec<f32> = case.last_logits.concat();
        assert_eq!(got.len(), case.input_ids.len() * vocab);
        let (d_cpu, d_hf) = (max_abs_diff(&got, &cpu_logits), max_abs_diff(&got, &want_hf));
        eprintln!("{what}: GPU first-step logits differ from the CPU's by {d_cpu:.2e}, from transformers' by {d_hf:.2e} (max |logit| {:.2})", max_abs(&cpu_logits));
        assert!(d_cpu <= LOGIT_TOLERANCE, "{what}: logits differ from the CPU's by {d_cpu}");
        assert!(d_hf <= LOGIT_TOLERANCE, "{what}: logits differ from transformers' by {d_hf}");

        let want = cpu_greedy(&cpu.model, std::slice::from_ref(&case.input_ids), case.max_new_tokens);
        assert_eq!(want, case.greedy_new_tokens, "{what}: the CPU reference itself");
        let got = gpu_greedy(&gpu, std::slice::from_ref(&case.input_ids), case.max_new_tokens);
        check_tokens(&format!("{what} (one batch)"), &cpu.model, &case.input_ids, &got, &want);
        if case.input_ids.len() > 1 {
            let (a, b) = case.input_ids.split_at(case.input_ids.len() / 2);
            let got = gpu_greedy(&gpu, &[a.to_vec(), b.to_vec()], case.max_new_tokens);
            check_tokens(&format!("{what} (block of two batches)"), &cpu.model, &case.input_ids, &got, &want);
        }
    }
}

#[test]
fn without_a_gpu_the_engine_says_why() {
    match gpu::unavailable_reason() {
        Some(reason) => {
            assert!(reason.starts_with("no CUDA driver"), "{reason}");
            let err = Gpu::new(0).unwrap_err().to_string();
            assert!(err.starts_with("no CUDA driver"), "{err}");
            println!("skipped: no CUDA driver ({reason})");
        }
        None => {
            let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("{e}"));
            println!("GPU engine on {}", gpu.device().info());
        }
    }
}

#[test]
fn pre_layer_norm_fixture_matches_cpu() {
    if gpu_here("pre-LN fixture") {
        check_fixture("tiny-opt", "tiny-opt");
    }
}

#[test]
fn sharded_f16_fixture_matches_cpu() {
    if gpu_here("sharded fixture") {
        check_fixture("tiny-opt-sharded", "tiny-opt-sharded");
    }
}

#[test]
fn post_layer_norm_350m_style_fixture_matches_cpu() {
    if gpu_here("350m-style fixture") {
        check_fixture("tiny-opt-350m-style", "tiny-opt-350m-style");
    }
}

/// Embedding, each layer's output and the logits of one left-padded batch,
/// GPU against CPU, so that a failure above says which part is wrong.
fn part_by_part(name: &str) {
    let cpu = cpu_model(name);
    let gpu = gpu_model(name);
    let prompts = &expected(name).cases.iter().find(|c| c.input_ids.len() > 1).unwrap().input_ids.clone();
    let (ids, mask) = left_pad(prompts, 1);
    let (batch, len) = (ids.len(), ids[0].len());
    let h = cpu.model.config.hidden_size;
    let mut positions = Vec::new();
    for row in &mask {
        let mut seen = 0;
        for &real in row {
            positions.push(real.then(|| {
                seen += 1;
                seen - 1
            }));
        }
    }
    let tokens = ids.concat();
    let mut want = cpu.model.embed(&tokens, &positions).unwrap();
    let mut caches: Vec<_> = cpu.model.layers.iter().map(|_| cpu.model.new_cache(batch, len).unwrap()).collect();
    let flat_mask: Vec<bool> = mask.concat();

    let mut st = GpuBatch::new(&gpu, prompts, 0, 1).unwrap();
    let mut ws = Workspace::new(&gpu.gpu, &gpu.config, batch * len, batch).unwrap();
    st.embed(&gpu, &mut ws).unwrap();
    let got = st.act().hidden.download(gpu.gpu.stream()).unwrap();
    let d = max_abs_diff(&got, &want);
    eprintln!("{name}: embeddings differ by {d:.2e} (max {:.2})", max_abs(&want));
    assert!(d <= 1e-3 * max_abs(&want).max(1.0), "{name}: embeddings differ by {d}");

    for (j, layer) in cpu.model.layers.iter().enumerate() {
        let step = Step { batch, new_len: len, key_mask: &flat_mask, positions: &positions };
        cpu.model.layer_forward(layer, &mut want, &step, &mut caches[j]).unwrap();
        st.layer(&gpu, j, &mut ws).unwrap();
        let got = st.act().hidden.download(gpu.gpu.stream()).unwrap();
        // Real positions only: padding rows see no key at all.
        let mut d = 0.0f32;
        for (r, p) in positions.iter().enumerate() {
            if p.is_some() {
                d = d.max(max_abs_diff(&got[r * h..(r + 1) * h], &want[r * h..(r + 1) * h]));
            }
        }
        eprintln!("{name}: after layer {j} hidden states differ by {d:.2e} (max {:.2})", max_abs(&want));
        assert!(d <= 2e-2 * max_abs(&want).max(1.0), "{name}: layer {j} differs by {d}");
    }
    st.logits(&gpu, &mut ws).unwrap();
    let got = gpu.logits_to_host(&ws, batch).unwrap();
    let last: Vec<f32> = (0..batch).flat_map(|b| want[(b * len + len - 1) * h..(b * len + len) * h].to_vec()).collect();
    let want_logits = cpu.model.logits(&last, batch).unwrap();
    let d = max_abs_diff(&got, &want_logits);
    eprintln!("{name}: logits differ by {d:.2e}");
    assert!(d <= LOGIT_TOLERANCE, "{name}: logits differ by {d}");
}

#[test]
fn parts_match_cpu_pre_layer_norm() {
    if gpu_here("parts, pre-LN") {
        part_by_part("tiny-opt");
    }
}

#[test]
fn parts_match_cpu_post_layer_norm() {
    if gpu_here("parts, post-LN") {
        part_by_part("tiny-opt-350m-style");
    }
}

/// A dummy model with 128-wide heads (the decode kernel's shape for every
/// OPT from 1.3b up), three left-padded prompts of different lengths; each
/// decode step's logits, teacher-forced, against the CPU recomputing the
/// whole sequences. The prefill takes one sequence at a time (a small
/// score budget) to cover the chunked path.
#[test]
fn decode_over_long_cache_matches_cpu() {
    if !gpu_here("decode over a long cache") {
        return;
    }
    let config = OptConfig::from_json_str(
        r#"{"hidden_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2, "ffn_dim": 512,
            "vocab_size": 300, "max_position_embeddings": 256}"#,
    )
    .unwrap();
    let src = engine_opt::dummy::DummyWeights::new(11);
    let hidden = indicatif::ProgressBar::hidden();
    let cpu = OptModel::load(config.clone(), &src, &hidden).unwrap();
    let gpu = GpuModel::load(Gpu::new(0).unwrap(), config, &src, &hidden).unwrap();
    let prompts: Vec<Vec<u32>> =
        [150usize, 97, 33].iter().map(|&n| (0..n).map(|i| (2 + (i * 37 + n) % 290) as u32).collect()).collect();
    let steps = 8;
    let mut st = GpuBatch::new(&gpu, &prompts, steps, 1).unwrap();
    let mut ws = Workspace::new(&gpu.gpu, &gpu.config, st.rows(), 3).unwrap();
    ws.set_score_budget(1);
    let opts = GenerateOptions { stop_on_eos: false, ..engine_opt::generation::options(steps) };
    let mut seqs = prompts.clone();
    for step in 0..steps {
        st.step(&gpu, &mut ws).unwrap();
        let got = gpu.logits_to_host(&ws, 3).unwrap();
        let want = cpu_prefill_logits(&cpu, &seqs).unwrap();
        let d = max_abs_diff(&got, &want);
        eprintln!("decode step {step}: logits differ by {d:.2e} (max {:.3})", max_abs(&want));
        assert!(d <= 1e-2 * max_abs(&want), "step {step}: logits differ by {d}");
        let forced: Vec<u32> = (0..3).map(|b| (5 + step * 3 + b) as u32).collect();
        for (s, t) in seqs.iter_mut().zip(&forced) {
            s.push(*t);
        }
        st.advance(&forced, &opts);
    }
}

#[test]
fn dummy_weights_on_the_gpu_are_seeded_and_finite() {
    if !gpu_here("dummy weights") {
        return;
    }
    let config = OptConfig::from_json_str(
        r#"{"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2, "ffn_dim": 256,
            "vocab_size": 500, "max_position_embeddings": 64}"#,
    )
    .unwrap();
    let logits = |seed| {
        let m = GpuModel::dummy(Gpu::new(0).unwrap(), config.clone(), seed).unwrap();
        prefill_logits(&m, &[vec![2, 7, 9, 11], vec![2, 5]]).unwrap()
    };
    let (a, b, c) = (logits(1), logits(1), logits(2));
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, b, "same seed, same model");
    assert_ne!(a, c, "another seed, another model");
}

#[test]
fn tierlm_bench_and_generate_run_on_the_gpu() {
    if !gpu_here("tierlm on the GPU") {
        return;
    }
    let Some(exe) = tierlm() else {
        println!("skipped: no tierlm executable next to the tests");
        return;
    };
    let gpu_percent = ["--percent", "100", "0", "100", "0", "100", "0"];
    let run = |args: &[&str]| {
        let out = Command::new(&exe).args(args).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {stderr}");
        stdout.to_string()
    };
    let bench =
        ["bench", "--model", "opt-125m", "--dummy", "--gpu-batch-size", "4", "--prompt-len", "16", "--gen-len", "4"];
    let text = run(&[&bench[..], &gpu_percent].concat());
    assert!(text.contains("engine: GPU") && text.contains("peak GPU memory"), "{text}");

    let model = fixture("tiny-opt");
    let gen = ["generate", "--model", model.to_str().unwrap(), "--prompt", "Hello", "--max-new-tokens", "12"];
    let on_gpu = run(&[&gen[..], &gpu_percent].concat());
    let on_cpu = run(&gen);
    assert_eq!(on_gpu, on_cpu, "generate: GPU and CPU engines differ");
}
