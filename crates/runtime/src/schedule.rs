//! The block schedule, written once for every compute device and every
//! model family.
//!
//! FlexGen's order over a block of GPU batches: for each generation step,
//! for each decoder layer, for each unfinished batch. A layer's weights are
//! brought in once per step ([`ComputeDevice::begin_layer`]) and used by
//! every batch of the block before the next layer's
//! ([`ComputeDevice::end_layer`]); each batch's cache and hidden states are
//! the device's business (in place, or loaded into and stored from slots).
//! [`generate`] drives it; a device only says how to embed a batch's step,
//! run one layer of one batch, and pick the next tokens (a family's CPU
//! reference, or its GPU engine with weights and cache on any tiers).
//!
//! What is the same for every device lives here: [`BatchTokens`], a batch's
//! tokens through a generation (left padding, positions counted from each
//! sequence's first real token, per-sequence stopping on any of the
//! end-of-sequence ids, finished sequences fed padding), the prompts'
//! checks ([`validate_prompts`]) and the timing split (the first step is
//! the prefill).

use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use crate::error::{Error, Result};
use crate::sampling::Sampler;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    /// New tokens per sequence at most.
    pub max_new_tokens: usize,
    /// Stop a sequence once it produced an end-of-sequence token (which is
    /// kept in its output). Benchmarks turn this off to generate exactly
    /// `max_new_tokens`.
    pub stop_on_eos: bool,
    /// The end-of-sequence tokens (a checkpoint's `generation_config.json`
    /// may give several): any of them ends a sequence.
    pub eos_token_ids: Vec<u32>,
    /// The token fed to finished sequences and used for left padding.
    pub pad_token_id: u32,
}

impl GenerateOptions {
    /// `max_new_tokens`, stopping on `eos`, padding with `pad`.
    pub fn new(max_new_tokens: usize, eos: u32, pad: u32) -> Self {
        GenerateOptions { max_new_tokens, stop_on_eos: true, eos_token_ids: vec![eos], pad_token_id: pad }
    }

    /// Whether `token` ends a sequence.
    pub fn is_eos(&self, token: u32) -> bool {
        self.stop_on_eos && self.eos_token_ids.contains(&token)
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
    /// Host (or GPU) bytes held by the KV caches of the block, with a share
    /// on disk also the buffer each layer's cache is gathered into.
    pub cache_bytes: u64,
    /// Bytes of the KV caches of the block on disk (a cache disk share).
    pub disk_cache_bytes: u64,
    /// Most bytes of hidden states held between layers at once.
    pub activation_bytes: u64,
}

/// Checks prompts against a model's vocabulary (`vocab` ids) and positions
/// (`max_positions` per sequence, prompt and new tokens together).
/// `first_index` numbers the prompts in messages.
pub fn validate_prompts(
    vocab: usize,
    max_positions: usize,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    first_index: usize,
) -> Result<()> {
    for (i, p) in prompts.iter().enumerate() {
        let index = first_index.saturating_add(i);
        if p.is_empty() {
            return Err(Error::Prompt { index, reason: "no tokens".to_string() });
        }
        if let Some(&id) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::TokenOutOfRange { index, id, vocab });
        }
        if p.len().checked_add(max_new_tokens).is_none_or(|n| n > max_positions) {
            return Err(Error::Prompt {
                index,
                reason: format!(
                    "{} prompt tokens + {max_new_tokens} new tokens exceed the model's {max_positions} positions",
                    p.len()
                ),
            });
        }
    }
    Ok(())
}

/// `seqs` left padded with `pad_id` to the longest, with the mask of real
/// tokens.
pub fn left_pad(seqs: &[Vec<u32>], pad_id: u32) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
    seqs.iter()
        .map(|s| {
            let pad = len - s.len();
            let mut ids = vec![pad_id; pad];
            ids.extend_from_slice(s);
            let mut mask = vec![false; pad];
            mask.resize(len, true);
            (ids, mask)
        })
        .unzip()
}

/// One batch's tokens through a generation: the next step's tokens (left
/// padded at the prefill, one per sequence after), which are real, each
/// sequence's next position, and what it generated.
#[derive(Debug, Clone)]
pub struct BatchTokens {
    batch: usize,
    /// Tokens of the next step, `batch × new_len`, and which are real.
    step_tokens: Vec<u32>,
    step_mask: Vec<u8>,
    new_len: usize,
    /// Per sequence, real tokens so far (the next token's position).
    next_position: Vec<usize>,
    /// New tokens of each sequence.
    pub generated: Vec<Vec<u32>>,
    /// Whether each sequence is done (fed padding from then on).
    pub finished: Vec<bool>,
}

impl BatchTokens {
    /// `prompts` left padded with `pad` into one batch.
    pub fn new(prompts: &[Vec<u32>], pad: u32) -> Self {
        let (ids, mask) = left_pad(prompts, pad);
        let len = ids.first().map_or(0, Vec::len);
        BatchTokens {
            batch: prompts.len(),
            step_tokens: ids.concat(),
            step_mask: mask.iter().flatten().map(|&m| u8::from(m)).collect(),
            new_len: len,
            next_position: prompts.iter().map(Vec::len).collect(),
            generated: vec![Vec::new(); prompts.len()],
            finished: vec![false; prompts.len()],
        }
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// New tokens per sequence in the next step (the padded prompt length
    /// at the prefill, 1 after).
    pub fn new_len(&self) -> usize {
        self.new_len
    }

    /// Rows (sequences × new tokens) of the next step.
    pub fn rows(&self) -> usize {
        self.batch * self.new_len
    }

    /// The next step's tokens, `batch × new_len`.
    pub fn tokens(&self) -> &[u32] {
        &self.step_tokens
    }

    /// Which of them are real (1) or padding (0).
    pub fn mask(&self) -> &[u8] {
        &self.step_mask
    }

    /// Real tokens before the next step's first, per sequence.
    pub fn past_real(&self) -> Vec<i32> {
        (0..self.batch)
            .map(|b| {
                let now = self.step_mask[b * self.new_len..(b + 1) * self.new_len].iter().filter(|&&m| m != 0);
                (self.next_position[b] - now.count()) as i32
            })
            .collect()
    }

    /// Each row's position (0-based from the sequence's first real token,
    /// before any offset a family adds; `None` for padding):
    /// `cumsum(mask) · mask − 1`, continued from the tokens before.
    pub fn positions(&self) -> Vec<Option<usize>> {
        let past = self.past_real();
        let mut out = Vec::with_capacity(self.rows());
        for (b, &p) in past.iter().enumerate() {
            let mut seen = p as usize;
            for &m in &self.step_mask[b * self.new_len..(b + 1) * self.new_len] {
                out.push((m != 0).then(|| {
                    seen += 1;
                    seen - 1
                }));
            }
        }
        out
    }

    /// Whether every sequence is done.
    pub fn all_finished(&self) -> bool {
        self.finished.iter().all(|&f| f)
    }

    /// Records the picked tokens and sets up the next one-token step:
    /// a sequence ends at the end-of-sequence token (when asked) or at
    /// `max_new_tokens`, and is fed padding from then on.
    pub fn advance(&mut self, picked: &[u32], opts: &GenerateOptions) {
        self.step_tokens.clear();
        self.step_mask.clear();
        for (b, &token) in picked.iter().enumerate().take(self.batch) {
            let fed = if self.finished[b] {
                opts.pad_token_id
            } else {
                self.generated[b].push(token);
                if opts.is_eos(token) || self.generated[b].len() >= opts.max_new_tokens {
                    self.finished[b] = true;
                }
                token
            };
            self.step_tokens.push(fed);
            self.step_mask.push(1);
            self.next_position[b] += 1;
        }
        self.new_len = 1;
    }
}

/// The tokens of every non-empty batch of a block (`batches[k]` holds the
/// prompts of batch `k`, unpadded), before the first step.
pub fn block_tokens(batches: &[Vec<Vec<u32>>], opts: &GenerateOptions) -> Vec<BatchTokens> {
    batches
        .iter()
        .filter(|p| !p.is_empty())
        .map(|prompts| {
            let mut tokens = BatchTokens::new(prompts, opts.pad_token_id);
            if opts.max_new_tokens == 0 {
                tokens.finished.fill(true);
            }
            tokens
        })
        .collect()
}

/// A device that computes a model a layer at a time over a block of
/// batches.
pub trait ComputeDevice {
    /// One batch's state on the device: its KV cache and hidden states.
    type Batch;
    /// The device's errors; the schedule's own (an interrupt, a bad prompt)
    /// convert into it.
    type Error: From<Error>;

    /// Decoder layers.
    fn num_layers(&self) -> usize;

    /// Token ids the model knows.
    fn vocab_size(&self) -> usize;

    /// Positions a sequence may hold, prompt and new tokens together.
    fn max_positions(&self) -> usize;

    /// Before any batch is made: every batch's first step (the GPU sizes
    /// what the batches share from the largest).
    fn begin_block(&mut self, _tokens: &[BatchTokens]) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The state of a batch whose first step is `tokens`, with room for
    /// `capacity` positions per sequence.
    fn new_batch(&mut self, tokens: &BatchTokens, capacity: usize) -> Result<Self::Batch, Self::Error>;

    /// Once every batch of the block is made, before the first step (the
    /// GPU sizes its scratch space for the largest).
    fn prepare(&mut self, _batches: &[(BatchTokens, Self::Batch)]) -> Result<(), Self::Error> {
        Ok(())
    }

    /// A step begins (`prefill` for the first): for profiling.
    fn begin_step(&mut self, _prefill: bool) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The step's embeddings into the batch's hidden states.
    fn embed(&mut self, tokens: &BatchTokens, batch: &mut Self::Batch) -> Result<(), Self::Error>;

    /// Layer `j`'s weights are ready before any batch computes it.
    fn begin_layer(&mut self, _j: usize) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Layer `j` of one batch, in place on its hidden states and cache.
    fn layer(&mut self, j: usize, tokens: &BatchTokens, batch: &mut Self::Batch) -> Result<(), Self::Error>;

    /// Every batch has layer `j` (enqueued): its weights may go.
    fn end_layer(&mut self, _j: usize) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Every layer of the step is done for every batch (caches stored).
    fn end_step(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The next token of each sequence: greedy without a sampler.
    fn pick(
        &mut self,
        tokens: &BatchTokens,
        batch: &mut Self::Batch,
        sampler: Option<&mut Sampler>,
    ) -> Result<Vec<u32>, Self::Error>;

    /// Everything the device was asked is done (timing ends here).
    fn finish(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Bytes of the batch's KV cache held by this device's memory.
    fn cache_bytes(&self, batch: &Self::Batch) -> u64;

    /// Bytes of hidden states and scratch held now, for these batches.
    fn activation_bytes(&self, batches: &[&Self::Batch]) -> u64;
}

/// Generates for a block of batches (`batches[k]` holds the prompts of batch
/// `k`, unpadded) on `device`, in FlexGen's order. Without a sampler the
/// device picks greedily.
pub fn generate<D: ComputeDevice>(
    device: &mut D,
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    mut sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput, D::Error> {
    let mut first = 0;
    for prompts in batches {
        validate_prompts(device.vocab_size(), device.max_positions(), prompts, opts.max_new_tokens, first)?;
        first += prompts.len();
    }
    let all = block_tokens(batches, opts);
    device.begin_block(&all)?;
    let mut states = Vec::with_capacity(all.len());
    for tokens in all {
        // validate_prompts bounded prompt plus new tokens by the positions.
        let state = device.new_batch(&tokens, tokens.new_len().saturating_add(opts.max_new_tokens))?;
        states.push((tokens, state));
    }
    device.prepare(&states)?;
    let mut out = GenerationOutput {
        cache_bytes: states.iter().map(|(_, s)| device.cache_bytes(s)).sum(),
        activation_bytes: device.activation_bytes(&states.iter().map(|(_, s)| s).collect::<Vec<_>>()),
        ..Default::default()
    };

    let start = Instant::now();
    for step in 0..opts.max_new_tokens {
        let active: Vec<usize> = (0..states.len()).filter(|&k| !states[k].0.all_finished()).collect();
        if active.is_empty() {
            break;
        }
        device.begin_step(step == 0)?;
        for &k in &active {
            let (tokens, state) = &mut states[k];
            device.embed(tokens, state)?;
        }
        let held = device.activation_bytes(&active.iter().map(|&k| &states[k].1).collect::<Vec<_>>());
        out.activation_bytes = out.activation_bytes.max(held);
        for j in 0..device.num_layers() {
            crate::interrupt::check()?;
            device.begin_layer(j)?;
            for &k in &active {
                let (tokens, state) = &mut states[k];
                device.layer(j, tokens, state)?;
            }
            device.end_layer(j)?;
        }
        device.end_step()?;
        for &k in &active {
            let (tokens, state) = &mut states[k];
            let picked = device.pick(tokens, state, sampler.as_deref_mut())?;
            tokens.advance(&picked, opts);
        }
        if step == 0 {
            out.prefill_time = start.elapsed();
        }
        progress.inc(1);
    }
    device.finish()?;
    out.decode_time = start.elapsed().saturating_sub(out.prefill_time);
    out.tokens = states.into_iter().flat_map(|(t, _)| t.generated).collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding() {
        let (ids, mask) = left_pad(&[vec![2, 5, 6], vec![2, 7]], 1);
        assert_eq!(ids, vec![vec![2, 5, 6], vec![1, 2, 7]]);
        assert_eq!(mask, vec![vec![true, true, true], vec![false, true, true]]);
    }

    #[test]
    fn prompts_are_checked_without_overflow() {
        assert!(validate_prompts(10, 8, &[vec![1, 2]], 6, 0).is_ok());
        let long = validate_prompts(10, 8, &[vec![1, 2]], 7, 4).unwrap_err().to_string();
        assert!(long.contains("prompt 4") && long.contains("exceed the model's 8 positions"), "{long}");
        let huge = validate_prompts(10, 8, &[vec![1, 2]], usize::MAX, 0).unwrap_err().to_string();
        assert!(huge.contains("exceed"), "{huge}");
        let out = validate_prompts(10, 8, &[vec![1, 12]], 1, 0).unwrap_err().to_string();
        assert!(out.contains("token id 12"), "{out}");
        assert!(validate_prompts(10, 8, &[vec![]], 1, 0).is_err());
    }

    #[test]
    fn any_eos_id_ends_a_sequence() {
        let opts = GenerateOptions { eos_token_ids: vec![7, 9], ..GenerateOptions::new(5, 7, 0) };
        let mut t = BatchTokens::new(&[vec![1], vec![1], vec![1]], 0);
        t.advance(&[9, 7, 4], &opts);
        assert_eq!(t.finished, vec![true, true, false]);
        let no_stop = GenerateOptions { stop_on_eos: false, ..opts };
        let mut t = BatchTokens::new(&[vec![1]], 0);
        t.advance(&[9], &no_stop);
        assert_eq!(t.finished, vec![false]);
    }

    #[test]
    fn positions_follow_the_mask_and_continue() {
        let opts = GenerateOptions::new(3, 2, 1);
        let mut t = BatchTokens::new(&[vec![2, 9, 9], vec![2, 9]], opts.pad_token_id);
        assert_eq!(t.tokens(), &[2, 9, 9, opts.pad_token_id, 2, 9]);
        assert_eq!(t.mask(), &[1, 1, 1, 0, 1, 1]);
        assert_eq!(t.positions(), vec![Some(0), Some(1), Some(2), None, Some(0), Some(1)]);
        assert_eq!(t.past_real(), vec![0, 0]);
        t.advance(&[2, 11], &opts);
        assert_eq!(t.finished, vec![true, false]);
        assert_eq!((t.tokens(), t.new_len()), (&[2, 11][..], 1));
        assert_eq!(t.positions(), vec![Some(3), Some(2)]);
        assert_eq!(t.past_real(), vec![3, 2]);
        t.advance(&[12, 13], &opts);
        // The finished sequence is fed padding; its output stays put.
        assert_eq!(t.tokens(), &[opts.pad_token_id, 13]);
        assert_eq!(t.generated, vec![vec![2], vec![11, 13]]);
        assert!(!t.all_finished());
        t.advance(&[14, 15], &opts);
        assert!(t.all_finished(), "the token limit ends the other one");
        assert_eq!(t.generated[1], vec![11, 13, 15]);
    }
}
