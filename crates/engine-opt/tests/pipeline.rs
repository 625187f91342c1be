//! OPT split into pipeline stages (`runtime::pipeline`, the CPU engine per
//! stage, stages as threads): the committed tiny checkpoint in two stages,
//! and a four-layer random model in two and four, give exactly the tokens
//! of one engine over a block of several micro-batches, sampled or greedy.

use std::path::Path;

use engine_opt::dummy::DummyWeights;
use engine_opt::generation::{generate, options};
use engine_opt::loading::load_model;
use engine_opt::sampling::{Sampler, SamplingConfig};
use engine_opt::{OptConfig, OptModel};
use indicatif::ProgressBar;
use runtime::pipeline::generate_pipelined;

/// Three micro-batches of left-padded prompts (each starting with `</s>`,
/// as OPT's tokenizer puts it).
fn block(vocab: u32) -> Vec<Vec<Vec<u32>>> {
    let id = |i: u32| 4 + (i * 37 + 11) % (vocab - 4);
    let prompt = |r: std::ops::Range<u32>| std::iter::once(2).chain(r.map(id)).collect::<Vec<u32>>();
    vec![vec![prompt(0..7), prompt(3..5), prompt(9..14)], vec![prompt(20..23), prompt(30..36)], vec![prompt(40..44)]]
}

fn check(model: &OptModel, stages: &[usize]) {
    let block = block(model.config.vocab_size as u32);
    for sampling in [SamplingConfig::default(), SamplingConfig { temperature: 0.7, seed: 9, ..Default::default() }] {
        let opts = options(6);
        let hidden = ProgressBar::hidden();
        let want = generate(model, &block, &opts, &mut Sampler::new(sampling), &hidden).unwrap().tokens;
        for &n in stages {
            let mut sampler = Sampler::new(sampling);
            let got = generate_pipelined(model, &model.layers, n, &block, &opts, Some(&mut sampler), &hidden).unwrap();
            assert_eq!(got.tokens, want, "{n} stages, {sampling:?}");
        }
    }
}

#[test]
fn the_tiny_checkpoint_in_two_stages_gives_the_one_engine_tokens() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/opt/tiny-opt");
    let loaded = load_model(dir.to_str().unwrap(), false, 0).unwrap();
    assert_eq!(loaded.model.config.num_hidden_layers, 2);
    check(&loaded.model, &[2]);
}

#[test]
fn a_four_layer_model_in_two_and_four_stages_gives_the_one_engine_tokens() {
    let config = OptConfig::from_json_str(
        r#"{"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 4, "ffn_dim": 64,
            "vocab_size": 64, "max_position_embeddings": 64}"#,
    )
    .unwrap();
    let model = OptModel::load(config, &DummyWeights::new(3), &ProgressBar::hidden()).unwrap();
    check(&model, &[2, 4]);
}
