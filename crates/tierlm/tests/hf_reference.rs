//! The CPU engine against Hugging Face transformers on the tiny checkpoints
//! of `fixtures/opt/` (made by `scripts/make_opt_fixtures.py`): first-step
//! logits within 1e-2, greedy continuations token for token, the tokenizer's
//! ids, and sharded and single-file checkpoints loading the same weights.

mod common;

use std::path::PathBuf;

use engine_opt::generation::{generate, prefill_logits};
use engine_opt::loading::{load_model, LoadedModel};
use engine_opt::sampling::{Sampler, SamplingConfig};
use serde::Deserialize;

/// What the engine must meet (the project's requirement).
const LOGIT_TOLERANCE: f32 = 1e-2;
/// What it does meet: the fixtures' weights are exact in f16, so only the
/// order of f32 accumulation differs from transformers (≈3e-6 measured).
/// Holding to this catches errors far smaller than the requirement would,
/// e.g. an attention scale off by 0.1%.
const TIGHT_LOGIT_TOLERANCE: f32 = 1e-4;
const MIN_COMPARED_TOKENS: usize = 16;

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    input_ids: Vec<Vec<u32>>,
    last_logits: Vec<Vec<f32>>,
    greedy_new_tokens: Vec<Vec<u32>>,
    max_new_tokens: usize,
    #[serde(default)]
    prompts: Option<Vec<String>>,
}

/// The fixture `name`, found from `TIERLM_REPO_ROOT` where the test binary
/// runs away from its source tree (the GPU bundle).
fn fixture(name: &str) -> PathBuf {
    common::fixture(name)
}

fn load(name: &str) -> LoadedModel {
    load_model(fixture(name).to_str().unwrap(), false, 0).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn expected(dir: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(dir).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn greedy(loaded: &LoadedModel, batches: &[Vec<Vec<u32>>], max_new_tokens: usize) -> Vec<Vec<u32>> {
    let mut sampler = Sampler::new(SamplingConfig::default());
    let progress = indicatif::ProgressBar::hidden();
    generate(&loaded.model, batches, &engine_opt::generation::options(max_new_tokens), &mut sampler, &progress)
        .unwrap()
        .tokens
}

fn check_against_transformers(model_dir: &str, expected_dir: &str) {
    let loaded = load(model_dir);
    let exp = expected(expected_dir);
    assert!(!exp.cases.is_empty());
    for case in &exp.cases {
        let what = format!("{model_dir}/{}", case.name);

        if let Some(prompts) = &case.prompts {
            let tok = loaded.tokenizer.as_ref().expect("fixture has a tokenizer");
            for (p, ids) in prompts.iter().zip(&case.input_ids) {
                assert_eq!(&tok.encode(p).unwrap(), ids, "{what}: token ids of {p:?}");
            }
        }

        let logits = prefill_logits(&loaded.model, &case.input_ids).unwrap();
        let vocab = loaded.model.config.vocab_size;
        let mut max_diff = 0.0f32;
        for (got, want) in logits.chunks(vocab).zip(&case.last_logits) {
            assert_eq!(want.len(), vocab);
            for (g, w) in got.iter().zip(want) {
                max_diff = max_diff.max((g - w).abs());
            }
        }
        eprintln!("{what}: first-step logits differ by at most {max_diff:.2e}");
        assert!(max_diff <= LOGIT_TOLERANCE, "{what}: logits differ by {max_diff}");
        assert!(
            max_diff <= TIGHT_LOGIT_TOLERANCE,
            "{what}: logits differ by {max_diff}, more than accumulation order explains"
        );

        // One batch, left padded like the reference.
        let got = greedy(&loaded, std::slice::from_ref(&case.input_ids), case.max_new_tokens);
        for (i, (g, w)) in got.iter().zip(&case.greedy_new_tokens).enumerate() {
            assert!(w.len() >= MIN_COMPARED_TOKENS, "{what}: reference too short");
            assert_eq!(g, w, "{what}: greedy continuation of sequence {i}");
        }

        // The same prompts as a block of two batches: padding and the
        // layer-by-layer block order must not change anything.
        if case.input_ids.len() > 1 {
            let (a, b) = case.input_ids.split_at(case.input_ids.len() / 2);
            let got = greedy(&loaded, &[a.to_vec(), b.to_vec()], case.max_new_tokens);
            assert_eq!(got, case.greedy_new_tokens, "{what}: as a block of two batches");
        }
    }
}

#[test]
fn pre_layer_norm_f32_checkpoint_with_tokenizer_json() {
    check_against_transformers("tiny-opt", "tiny-opt");
}

#[test]
fn sharded_f16_checkpoint() {
    check_against_transformers("tiny-opt-sharded", "tiny-opt-sharded");
}

#[test]
fn single_file_twin_of_the_sharded_checkpoint() {
    check_against_transformers("tiny-opt-sharded-single", "tiny-opt-sharded");
}

#[test]
fn post_layer_norm_350m_style_bf16_checkpoint_with_vocab_and_merges() {
    check_against_transformers("tiny-opt-350m-style", "tiny-opt-350m-style");
}

#[test]
fn sharded_and_single_file_load_identical_weights() {
    let sharded = load("tiny-opt-sharded");
    let single = load("tiny-opt-sharded-single");
    assert!(fixture("tiny-opt-sharded").join("model.safetensors.index.json").is_file());
    let (a, b) = (sharded.model.parameters(), single.model.parameters());
    assert_eq!(a.len(), b.len());
    assert!(a.len() > 10);
    for ((na, pa), (nb, pb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(pa, pb, "{na} differs");
    }
}

#[test]
fn decoded_text_round_trips() {
    for dir in ["tiny-opt", "tiny-opt-350m-style"] {
        let loaded = load(dir);
        let tok = loaded.tokenizer.as_ref().unwrap();
        let text = "A café in Zürich — très bien!";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids[0], 2, "OPT's </s> prefix");
        assert_eq!(tok.decode(&ids).unwrap(), text, "{dir}");
    }
}
