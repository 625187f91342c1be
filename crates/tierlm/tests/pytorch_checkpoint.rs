//! The CPU engine on the PyTorch fixtures of `fixtures/pytorch/` (made by
//! `scripts/make_pytorch_fixtures.py` from `fixtures/opt/tiny-opt`): the
//! model loaded from `pytorch_model.bin` (single-file f16 with a tied head,
//! and sharded f32) continues prompts greedily token for token like the one
//! loaded from tiny-opt's safetensors, and like transformers did.

mod common;

use std::path::PathBuf;

use engine_opt::generation::generate;
use engine_opt::loading::{load_model, LoadedModel};
use engine_opt::sampling::{Sampler, SamplingConfig};

fn pytorch_fixture(name: &str) -> PathBuf {
    common::repo_root().join("fixtures/pytorch").join(name)
}

fn load(dir: PathBuf) -> LoadedModel {
    load_model(dir.to_str().unwrap(), false, 0).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn greedy(loaded: &LoadedModel, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let mut sampler = Sampler::new(SamplingConfig::default());
    let progress = indicatif::ProgressBar::hidden();
    generate(&loaded.model, &[prompts.to_vec()], &engine_opt::generation::options(n), &mut sampler, &progress)
        .unwrap()
        .tokens
}

#[test]
fn pytorch_checkpoints_generate_like_the_safetensors_one() {
    let reference = common::cpu_model("tiny-opt");
    let expected = common::expected("tiny-opt");
    let case = &expected.cases[0];
    let want = greedy(&reference, &case.input_ids, 8);
    for (got, hf) in want.iter().zip(&case.greedy_new_tokens) {
        assert_eq!(got[..], hf[..8], "the safetensors fixture against transformers");
    }
    for dir in ["tiny-opt-bin", "tiny-opt-bin-sharded"] {
        let loaded = load(pytorch_fixture(dir));
        assert!(loaded.tokenizer.is_some(), "{dir}: tokenizer.json copied beside the checkpoint");
        assert_eq!(greedy(&loaded, &case.input_ids, 8), want, "{dir}");
    }
}

#[test]
fn a_short_text_prompt_through_the_tokenizer() {
    let reference = common::cpu_model("tiny-opt");
    let loaded = load(pytorch_fixture("tiny-opt-bin"));
    let ids = loaded.tokenizer.as_ref().unwrap().encode("Hello").unwrap();
    assert_eq!(ids, reference.tokenizer.as_ref().unwrap().encode("Hello").unwrap());
    let got = greedy(&loaded, std::slice::from_ref(&ids), 6);
    assert_eq!(got, greedy(&reference, std::slice::from_ref(&ids), 6));
    assert_eq!(got[0].len(), 6);
}

#[test]
fn a_hostile_pytorch_checkpoint_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("evil");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(pytorch_fixture("tiny-opt-bin/config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(pytorch_fixture("hostile/global-os-system.bin"), dir.join("pytorch_model.bin")).unwrap();
    let err = load_model(dir.to_str().unwrap(), false, 0).unwrap_err().to_string();
    assert!(err.contains("os.system") && err.contains("pytorch_model.bin"), "{err}");
}
