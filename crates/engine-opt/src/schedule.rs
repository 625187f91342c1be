//! The block schedule, written once for every compute device.
//!
//! FlexGen's order over a block of GPU batches: for each generation step,
//! for each decoder layer, for each unfinished batch. A layer's weights are
//! brought in once per step ([`ComputeDevice::begin_layer`]) and used by
//! every batch of the block before the next layer's
//! ([`ComputeDevice::end_layer`]); each batch's cache and hidden states are
//! the device's business (in place, or loaded into and stored from slots).
//! [`generate`] drives it; a device only says how to embed a batch's step,
//! run one layer of one batch, and pick the next tokens:
//!
//! - the CPU engine ([`crate::generation`]): weights and cache in host
//!   memory, f32 arithmetic;
//! - the GPU engine ([`crate::gpu::generation`]): weights and cache on any
//!   tiers, streamed through GPU slots.
//!
//! What is the same for both lives here: [`BatchTokens`], a batch's tokens
//! through a generation (left padding, positions, per-sequence stopping,
//! finished sequences fed padding), and the timing split (the first step is
//! the prefill).

use std::time::Instant;

use indicatif::ProgressBar;

use crate::config::OptConfig;
use crate::error::Result;
use crate::generation::{validate_prompts, GenerateOptions, GenerationOutput};
use crate::sampling::Sampler;
use crate::tokenizer::left_pad;

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

    /// Each row's position (0-based, before OPT's offset; `None` for
    /// padding): OPT's `cumsum(mask) · mask − 1`, continued from the tokens
    /// before.
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
                let eos = opts.stop_on_eos && token == opts.eos_token_id;
                if eos || self.generated[b].len() >= opts.max_new_tokens {
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

/// A device that computes OPT a layer at a time over a block of batches.
pub trait ComputeDevice {
    /// One batch's state on the device: its KV cache and hidden states.
    type Batch;

    /// The model's configuration.
    fn config(&self) -> &OptConfig;

    /// Before any batch is made: every batch's first step (the GPU sizes
    /// what the batches share from the largest).
    fn begin_block(&mut self, _tokens: &[BatchTokens]) -> Result<()> {
        Ok(())
    }

    /// The state of a batch whose first step is `tokens`, with room for
    /// `capacity` positions per sequence.
    fn new_batch(&mut self, tokens: &BatchTokens, capacity: usize) -> Result<Self::Batch>;

    /// Once every batch of the block is made, before the first step (the
    /// GPU sizes its scratch space for the largest).
    fn prepare(&mut self, _batches: &[(BatchTokens, Self::Batch)]) -> Result<()> {
        Ok(())
    }

    /// A step begins (`prefill` for the first): for profiling.
    fn begin_step(&mut self, _prefill: bool) -> Result<()> {
        Ok(())
    }

    /// The step's embeddings into the batch's hidden states.
    fn embed(&mut self, tokens: &BatchTokens, batch: &mut Self::Batch) -> Result<()>;

    /// Layer `j`'s weights are ready before any batch computes it.
    fn begin_layer(&mut self, _j: usize) -> Result<()> {
        Ok(())
    }

    /// Layer `j` of one batch, in place on its hidden states and cache.
    fn layer(&mut self, j: usize, tokens: &BatchTokens, batch: &mut Self::Batch) -> Result<()>;

    /// Every batch has layer `j` (enqueued): its weights may go.
    fn end_layer(&mut self, _j: usize) -> Result<()> {
        Ok(())
    }

    /// Every layer of the step is done for every batch (caches stored).
    fn end_step(&mut self) -> Result<()> {
        Ok(())
    }

    /// The next token of each sequence: greedy without a sampler.
    fn pick(
        &mut self,
        tokens: &BatchTokens,
        batch: &mut Self::Batch,
        sampler: Option<&mut Sampler>,
    ) -> Result<Vec<u32>>;

    /// Everything the device was asked is done (timing ends here).
    fn finish(&mut self) -> Result<()> {
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
) -> Result<GenerationOutput> {
    let mut first = 0;
    for prompts in batches {
        validate_prompts(device.config(), prompts, opts.max_new_tokens, first)?;
        first += prompts.len();
    }
    let all: Vec<BatchTokens> = batches
        .iter()
        .filter(|p| !p.is_empty())
        .map(|prompts| {
            let mut tokens = BatchTokens::new(prompts, opts.pad_token_id);
            if opts.max_new_tokens == 0 {
                tokens.finished.fill(true);
            }
            tokens
        })
        .collect();
    device.begin_block(&all)?;
    let mut states = Vec::with_capacity(all.len());
    for tokens in all {
        let state = device.new_batch(&tokens, tokens.new_len() + opts.max_new_tokens)?;
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
        for j in 0..device.config().num_hidden_layers {
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
    fn positions_follow_the_mask_and_continue() {
        let opts = GenerateOptions::new(3);
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
