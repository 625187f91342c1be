//! Batched generation: prefill then incremental decoding with a KV cache,
//! over a block of batches in FlexGen's order (for each step, for each
//! layer, for each batch), with per-sequence stopping.

use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use crate::config::OptConfig;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::model::{OptModel, StepContext};
use crate::sampling::Sampler;
use crate::tokenizer::left_pad;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerateOptions {
    /// New tokens per sequence at most.
    pub max_new_tokens: usize,
    /// Stop a sequence once it produced the end-of-sequence token (which is
    /// kept in its output). Benchmarks turn this off to generate exactly
    /// `max_new_tokens`.
    pub stop_on_eos: bool,
    /// The end-of-sequence token.
    pub eos_token_id: u32,
    /// The token fed to finished sequences and used for left padding.
    pub pad_token_id: u32,
}

impl GenerateOptions {
    /// OPT's ids (`</s>` = 2 ends, `<pad>` = 1 pads), stopping on EOS.
    pub fn new(max_new_tokens: usize) -> Self {
        GenerateOptions {
            max_new_tokens,
            stop_on_eos: true,
            eos_token_id: crate::tokenizer::EOS_TOKEN_ID,
            pad_token_id: crate::tokenizer::PAD_TOKEN_ID,
        }
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone, Default)]
pub struct GenerationOutput {
    /// New tokens of each prompt, in the order the prompts were given.
    pub tokens: Vec<Vec<u32>>,
    /// Time of the first step: the prompts through the model and the first
    /// new token picked.
    pub prefill_time: Duration,
    /// Time of every later step.
    pub decode_time: Duration,
    /// Bytes held by the KV caches of the block.
    pub cache_bytes: u64,
    /// Most bytes of hidden states (f32) held between layers at once.
    pub activation_bytes: u64,
}

/// The state of one batch through a generation.
struct BatchState {
    batch: usize,
    /// Tokens and positions of the next step, `batch × new_len`.
    step_tokens: Vec<u32>,
    step_positions: Vec<Option<usize>>,
    new_len: usize,
    /// Per sequence, whether each position so far is a real token.
    key_mask: Vec<Vec<bool>>,
    /// Per sequence, real tokens so far (the next token's position).
    next_position: Vec<usize>,
    cache: KvCache,
    generated: Vec<Vec<u32>>,
    finished: Vec<bool>,
}

impl BatchState {
    fn new(model: &OptModel, prompts: &[Vec<u32>], max_new_tokens: usize, pad: u32) -> Self {
        let (ids, mask) = left_pad(prompts, pad);
        let len = ids.first().map_or(0, Vec::len);
        let mut step_positions = Vec::with_capacity(prompts.len() * len);
        for row in &mask {
            // OPT's positions: cumsum(mask) * mask - 1 (padding has none).
            let mut seen = 0;
            for &real in row {
                step_positions.push(real.then(|| {
                    seen += 1;
                    seen - 1
                }));
            }
        }
        BatchState {
            batch: prompts.len(),
            step_tokens: ids.concat(),
            step_positions,
            new_len: len,
            key_mask: mask,
            next_position: prompts.iter().map(Vec::len).collect(),
            cache: model.new_cache(prompts.len(), len + max_new_tokens),
            generated: vec![Vec::new(); prompts.len()],
            finished: vec![false; prompts.len()],
        }
    }

    fn all_finished(&self) -> bool {
        self.finished.iter().all(|&f| f)
    }

    fn context(&self) -> StepContext<'_> {
        StepContext { batch: self.batch, new_len: self.new_len, key_mask: &self.key_mask }
    }

    /// Hidden states of the last position of each sequence.
    fn last_rows(&self, hidden: &[f32], dim: usize) -> Vec<f32> {
        (0..self.batch)
            .flat_map(|b| {
                let row = b * self.new_len + self.new_len - 1;
                hidden[row * dim..(row + 1) * dim].iter().copied()
            })
            .collect()
    }

    /// Records the picked tokens and sets up the next one-token step.
    fn advance(&mut self, picked: &[u32], opts: &GenerateOptions) {
        self.step_tokens.clear();
        self.step_positions.clear();
        for (b, &token) in picked.iter().enumerate() {
            let fed = if self.finished[b] {
                opts.pad_token_id
            } else {
                self.generated[b].push(token);
                let eos = opts.stop_on_eos && token == opts.eos_token_id;
                if eos || self.generated[b].len() >= opts.max_new_tokens {
                    self.finished[b] = true;
                }
                token
            };
            self.step_tokens.push(fed);
            self.step_positions.push(Some(self.next_position[b]));
            self.next_position[b] += 1;
            self.key_mask[b].push(true);
        }
        self.new_len = 1;
    }
}

/// Checks prompts against the vocabulary and the positions of a model of
/// configuration `c` (both engines use it). `first_index` numbers the
/// prompts in messages.
pub fn validate_prompts(c: &OptConfig, prompts: &[Vec<u32>], max_new_tokens: usize, first_index: usize) -> Result<()> {
    for (i, p) in prompts.iter().enumerate() {
        let index = first_index + i;
        if p.is_empty() {
            return Err(Error::Prompt { index, reason: "no tokens".to_string() });
        }
        if let Some(&id) = p.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::TokenOutOfRange { index, id, vocab: c.vocab_size });
        }
        if p.len() + max_new_tokens > c.max_sequence_len() {
            return Err(Error::Prompt {
                index,
                reason: format!(
                    "{} prompt tokens + {max_new_tokens} new tokens exceed the model's {} positions",
                    p.len(),
                    c.max_sequence_len()
                ),
            });
        }
    }
    Ok(())
}

/// Generates for a block of batches (`batches[k]` holds the prompts of batch
/// `k`, unpadded). Each step runs every layer over every unfinished batch
/// before the next layer, the order a tiered engine needs to reuse a layer's
/// weights across batches.
pub fn generate(
    model: &OptModel,
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    sampler: &mut Sampler,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    let mut first = 0;
    for prompts in batches {
        validate_prompts(&model.config, prompts, opts.max_new_tokens, first)?;
        first += prompts.len();
    }
    let dim = model.config.hidden_size;
    let vocab = model.config.vocab_size;
    let mut states: Vec<BatchState> = batches
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| BatchState::new(model, p, opts.max_new_tokens, opts.pad_token_id))
        .collect();
    if opts.max_new_tokens == 0 {
        states.iter_mut().for_each(|s| s.finished.fill(true));
    }
    let mut out = GenerationOutput { cache_bytes: states.iter().map(|s| s.cache.bytes()).sum(), ..Default::default() };

    let start = Instant::now();
    for step in 0..opts.max_new_tokens {
        let active: Vec<usize> = (0..states.len()).filter(|&k| !states[k].all_finished()).collect();
        if active.is_empty() {
            break;
        }
        let mut hidden: Vec<Vec<f32>> =
            active.iter().map(|&k| model.embed(&states[k].step_tokens, &states[k].step_positions)).collect();
        let held: usize = hidden.iter().map(Vec::len).sum();
        out.activation_bytes = out.activation_bytes.max((held * std::mem::size_of::<f32>()) as u64);
        for (j, layer) in model.layers.iter().enumerate() {
            for (h, &k) in hidden.iter_mut().zip(&active) {
                let st = &mut states[k];
                let ctx = StepContext { batch: st.batch, new_len: st.new_len, key_mask: &st.key_mask };
                layer.forward(h, &ctx, &mut st.cache.layers[j]);
            }
        }
        for (h, &k) in hidden.iter().zip(&active) {
            let st = &mut states[k];
            let logits = model.logits(&st.last_rows(h, dim), st.batch);
            let picked: Vec<u32> = logits.chunks(vocab).map(|row| sampler.sample(row)).collect();
            st.advance(&picked, opts);
        }
        if step == 0 {
            out.prefill_time = start.elapsed();
        }
        progress.inc(1);
    }
    out.decode_time = start.elapsed().saturating_sub(out.prefill_time);
    out.tokens = states.into_iter().flat_map(|s| s.generated).collect();
    Ok(out)
}

/// Logits at the last position of each prompt after the prompts (left
/// padded into one batch) go through the model: `[batch, vocab]`.
pub fn prefill_logits(model: &OptModel, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
    validate_prompts(&model.config, prompts, 0, 0)?;
    let st = BatchState::new(model, prompts, 0, crate::tokenizer::PAD_TOKEN_ID);
    let mut cache = model.new_cache(st.batch, st.new_len);
    let hidden = model.forward_hidden(&st.step_tokens, &st.step_positions, &st.context(), &mut cache);
    Ok(model.logits(&st.last_rows(&hidden, model.config.hidden_size), st.batch))
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
        let out = run(&src, &GenerateOptions::new(6), &prompts);
        assert_eq!(out.tokens, vec![vec![2], vec![2]]);
        let no_stop = GenerateOptions { stop_on_eos: false, ..GenerateOptions::new(6) };
        let out = run(&src, &no_stop, &prompts);
        assert_eq!(out.tokens, vec![vec![2; 6], vec![2; 6]]);
    }

    #[test]
    fn each_sequence_stops_on_its_own() {
        let model = OptModel::load(tiny(), &DummyWeights::new(3), &ProgressBar::hidden()).unwrap();
        let opts = GenerateOptions::new(3);
        let mut st = BatchState::new(&model, &[vec![2, 9, 9], vec![2, 9]], 3, opts.pad_token_id);
        assert_eq!(st.step_positions, vec![Some(0), Some(1), Some(2), None, Some(0), Some(1)]);
        st.advance(&[2, 11], &opts);
        assert_eq!(st.finished, vec![true, false]);
        assert_eq!(st.step_tokens, vec![2, 11]);
        assert_eq!(st.step_positions, vec![Some(3), Some(2)]);
        st.advance(&[12, 13], &opts);
        // From then on the finished sequence is fed padding, and its output
        // stays put.
        assert_eq!(st.step_tokens, vec![opts.pad_token_id, 13]);
        assert_eq!(st.generated, vec![vec![2], vec![11, 13]]);
        assert!(!st.all_finished());
        st.advance(&[14, 15], &opts);
        assert!(st.all_finished(), "the token limit ends the other one");
        assert_eq!(st.generated[1], vec![11, 13, 15]);
    }

    #[test]
    fn dummy_model_stays_finite() {
        let model = OptModel::load(tiny(), &DummyWeights::new(5), &ProgressBar::hidden()).unwrap();
        let logits = prefill_logits(&model, &[vec![2, 3, 4, 5], vec![2]]).unwrap();
        assert_eq!(logits.len(), 2 * 40);
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}
