//! Batched generation on the CPU: OPT's [`OptModel`] on the runtime's CPU
//! engine ([`runtime::cpu::CpuEngine`]): prefill then incremental decoding
//! with a KV cache, over a block of batches in FlexGen's order (for each
//! step, for each layer, for each batch), with per-sequence stopping.

use indicatif::ProgressBar;
use runtime::cpu::CpuEngine;
use runtime::sampling::Sampler;

use crate::config::OptConfig;
use crate::error::Result;
use crate::model::OptModel;

pub use runtime::cpu::CpuPlacement;
pub use runtime::schedule::{GenerateOptions, GenerationOutput};

/// Options for OPT's ids (`</s>` = 2 ends, `<pad>` = 1 pads), stopping on
/// the end of sequence.
pub fn options(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions::new(max_new_tokens, crate::tokenizer::EOS_TOKEN_ID, crate::tokenizer::PAD_TOKEN_ID)
}

/// Checks prompts against the vocabulary and the positions of a model of
/// configuration `c` (both engines use it; see
/// [`runtime::schedule::validate_prompts`]). `first_index` numbers the
/// prompts in messages.
pub fn validate_prompts(c: &OptConfig, prompts: &[Vec<u32>], max_new_tokens: usize, first_index: usize) -> Result<()> {
    Ok(runtime::schedule::validate_prompts(c.vocab_size, c.max_sequence_len(), prompts, max_new_tokens, first_index)?)
}

/// Generates for a block of batches (`batches[k]` holds the prompts of batch
/// `k`, unpadded) on the CPU with every layer in host memory.
pub fn generate(
    model: &OptModel,
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    generate_with(model, CpuPlacement::default(), batches, opts, sampler, progress)
}

/// [`generate`] with the layers `model` does not hold and a share of the
/// KV cache where `placement` says, host memory accounted where it says.
pub fn generate_with(
    model: &OptModel,
    placement: CpuPlacement,
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    let mut engine = CpuEngine::new(model, &model.layers, placement)?;
    let mut out = runtime::schedule::generate(&mut engine, batches, opts, Some(sampler), progress)?;
    out.disk_cache_bytes = engine.disk_cache_bytes();
    out.cache_bytes = out.cache_bytes.saturating_add(engine.slot_bytes());
    Ok(out)
}

/// Logits at the last position of each prompt after the prompts (left
/// padded into one batch) go through the model: `[batch, vocab]`.
pub fn prefill_logits(model: &OptModel, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
    Ok(runtime::cpu::prefill_logits(model, &model.layers, prompts, crate::tokenizer::PAD_TOKEN_ID)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptConfig;
    use crate::dummy::DummyWeights;
    use crate::sampling::SamplingConfig;
    use crate::weights::WeightSource;
    use half::f16;

    /// Dummy weights, except that every final hidden state is the same
    /// vector `c` (final layer norm weight 0, bias `c`) and the embedding of
    /// `</s>` is `c` too: `</s>` wins every step.
    struct AlwaysEos(DummyWeights);

    fn c(i: usize) -> f32 {
        if i.is_multiple_of(2) {
            1.0
        } else {
            -1.0
        }
    }

    impl WeightSource for AlwaysEos {
        fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
            let mut t = self.0.load(name, shape)?;
            match name {
                "decoder.final_layer_norm.weight" => t.fill(f16::ZERO),
                "decoder.final_layer_norm.bias" => t.iter_mut().enumerate().for_each(|(i, v)| *v = f16::from_f32(c(i))),
                "decoder.embed_tokens.weight" => {
                    let e = shape[1];
                    t[2 * e..3 * e].iter_mut().enumerate().for_each(|(i, v)| *v = f16::from_f32(c(i)));
                }
                _ => {}
            }
            Ok(t)
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains(name)
        }
    }

    fn tiny() -> OptConfig {
        OptConfig::from_json_str(
            r#"{"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2, "ffn_dim": 32,
                "vocab_size": 40, "max_position_embeddings": 32}"#,
        )
        .unwrap()
    }

    fn run(src: &dyn WeightSource, opts: &GenerateOptions, batches: &[Vec<Vec<u32>>]) -> GenerationOutput {
        let model = OptModel::load(tiny(), src, &ProgressBar::hidden()).unwrap();
        let mut sampler = Sampler::new(SamplingConfig::default());
        generate(&model, batches, opts, &mut sampler, &ProgressBar::hidden()).unwrap()
    }

    #[test]
    fn stops_on_eos_unless_told_not_to() {
        let src = AlwaysEos(DummyWeights::new(1));
        let prompts = vec![vec![vec![2, 5, 6], vec![2, 7]]];
        let out = run(&src, &crate::generation::options(6), &prompts);
        assert_eq!(out.tokens, vec![vec![2], vec![2]]);
        let no_stop = GenerateOptions { stop_on_eos: false, ..crate::generation::options(6) };
        let out = run(&src, &no_stop, &prompts);
        assert_eq!(out.tokens, vec![vec![2; 6], vec![2; 6]]);
    }

    #[test]
    fn dummy_model_stays_finite() {
        let model = OptModel::load(tiny(), &DummyWeights::new(5), &ProgressBar::hidden()).unwrap();
        let logits = prefill_logits(&model, &[vec![2, 3, 4, 5], vec![2]]).unwrap();
        assert_eq!(logits.len(), 2 * 40);
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}
