//! The Llama family split into pipeline stages (`runtime::pipeline`, the
//! CPU engine per stage, stages as threads): every fixture in two stages,
//! and four-layer random models in two and four, give exactly the tokens of
//! one engine over a block of several micro-batches.

use std::path::{Path, PathBuf};

use engine_llama::{LlamaConfig, LlamaModel};
use indicatif::ProgressBar;
use runtime::cpu::{CpuEngine, CpuModel, CpuPlacement};
use runtime::pipeline::generate_pipelined;
use runtime::schedule::GenerateOptions;

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llama");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "fixtures missing under {}", root.display());
    dirs
}

/// Three micro-batches of left-padded prompts.
fn block(vocab: u32) -> Vec<Vec<Vec<u32>>> {
    let id = |i: u32| (i * 37 + 11) % vocab;
    vec![
        vec![(0..7).map(id).collect(), (3..5).map(id).collect(), (9..14).map(id).collect()],
        vec![(20..23).map(id).collect(), (30..36).map(id).collect()],
        vec![(40..44).map(id).collect()],
    ]
}

fn options() -> GenerateOptions {
    GenerateOptions { max_new_tokens: 6, stop_on_eos: false, eos_token_ids: vec![], pad_token_id: 0 }
}

fn one_engine(model: &LlamaModel) -> Vec<Vec<u32>> {
    let mut engine = CpuEngine::new(model, model.layers(), CpuPlacement::default()).unwrap();
    let block = block(model.vocab_size() as u32);
    runtime::schedule::generate(&mut engine, &block, &options(), None, &ProgressBar::hidden()).unwrap().tokens
}

fn pipelined(model: &LlamaModel, stages: usize) -> Vec<Vec<u32>> {
    let block = block(model.vocab_size() as u32);
    generate_pipelined(model, model.layers(), stages, &block, &options(), None, &ProgressBar::hidden()).unwrap().tokens
}

#[test]
fn every_fixture_in_two_stages_gives_the_one_engine_tokens() {
    for dir in fixtures() {
        let model = LlamaModel::load(&dir).unwrap();
        assert_eq!(pipelined(&model, 2), one_engine(&model), "{}", dir.display());
    }
}

#[test]
fn deeper_models_in_two_and_four_stages_give_the_one_engine_tokens() {
    let text = std::fs::read_to_string(fixtures()[0].join("config.json")).unwrap();
    for layers in [4, 5] {
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["num_hidden_layers"] = layers.into();
        let config = LlamaConfig::from_json(&json.to_string()).unwrap();
        let model = LlamaModel::dummy(config, 5).unwrap();
        let want = one_engine(&model);
        for stages in [2, 4] {
            assert_eq!(pipelined(&model, stages), want, "{layers} layers in {stages} stages");
        }
        let e = generate_pipelined(
            &model,
            model.layers(),
            layers + 1,
            &block(64),
            &options(),
            None,
            &ProgressBar::hidden(),
        );
        assert!(e.unwrap_err().to_string().contains("each stage needs at least one layer"));
    }
}
