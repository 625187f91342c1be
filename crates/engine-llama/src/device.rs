//! The CPU model as the runtime's compute device: the runtime's block
//! schedule ([`runtime::schedule::generate`]) drives it a layer at a time
//! over a block of batches, with its sampling and progress.
//!
//! Each batch holds its hidden states and one KV cache per layer in host
//! memory. Left padding comes from the batch's first step (its mask);
//! positions count from each sequence's first real token, and padded
//! positions are masked out of attention.

use indicatif::ProgressBar;
use ops::KvCache;
use runtime::sampling::Sampler;
use runtime::schedule::{BatchTokens, ComputeDevice, GenerateOptions, GenerationOutput};

use crate::error::{Error, Result};
use crate::model::LlamaModel;

/// A [`LlamaModel`] computing on the CPU.
pub struct CpuDevice<'m> {
    model: &'m LlamaModel,
}

impl<'m> CpuDevice<'m> {
    pub fn new(model: &'m LlamaModel) -> CpuDevice<'m> {
        CpuDevice { model }
    }
}

/// One batch on the CPU: its left padding, hidden states and caches.
pub struct CpuBatch {
    pads: Vec<usize>,
    x: Vec<f32>,
    caches: Vec<KvCache>,
    /// Positions each cache has room for.
    capacity: usize,
}

impl ComputeDevice for CpuDevice<'_> {
    type Batch = CpuBatch;
    type Error = Error;

    fn num_layers(&self) -> usize {
        self.model.config().num_hidden_layers
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn max_positions(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    fn new_batch(&mut self, tokens: &BatchTokens, capacity: usize) -> Result<CpuBatch> {
        let len = tokens.new_len();
        let pads = tokens.mask().chunks(len.max(1)).map(|row| row.iter().take_while(|&&m| m == 0).count()).collect();
        let caches = (0..self.num_layers())
            .map(|_| self.model.new_cache(tokens.batch(), capacity))
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuBatch { pads, x: Vec::new(), caches, capacity })
    }

    fn embed(&mut self, tokens: &BatchTokens, batch: &mut CpuBatch) -> Result<()> {
        batch.x = self.model.embed(tokens.tokens())?;
        Ok(())
    }

    fn layer(&mut self, j: usize, tokens: &BatchTokens, batch: &mut CpuBatch) -> Result<()> {
        let cache = batch.caches.get_mut(j).ok_or_else(|| Error::Generate(format!("no cache for layer {j}")))?;
        self.model.layer_forward(j, &mut batch.x, cache, &batch.pads, tokens.new_len())
    }

    fn pick(&mut self, tokens: &BatchTokens, batch: &mut CpuBatch, sampler: Option<&mut Sampler>) -> Result<Vec<u32>> {
        let logits = self.model.logits(&batch.x, tokens.batch(), tokens.new_len())?;
        let vocab = self.vocab_size();
        Ok(match sampler {
            Some(s) => logits.chunks(vocab).map(|row| s.sample(row)).collect(),
            None => logits.chunks(vocab).map(runtime::sampling::argmax).collect(),
        })
    }

    fn cache_bytes(&self, batch: &CpuBatch) -> u64 {
        let c = self.model.config();
        let per_position = (c.num_key_value_heads * c.head_dim * 2 * self.model.cache_dtype().size()) as u64;
        let positions =
            batch.caches.iter().map(|k| (k.batch() as u64).saturating_mul(batch.capacity as u64)).sum::<u64>();
        per_position.saturating_mul(positions)
    }

    fn activation_bytes(&self, batches: &[&CpuBatch]) -> u64 {
        batches.iter().map(|b| (b.x.len() * std::mem::size_of::<f32>()) as u64).sum()
    }
}

/// Checks that prompts plus `new_tokens` fit the model's attention window
/// (Mistral's `sliding_window`, which is not implemented: longer runs are
/// refused rather than computed wrongly).
pub fn check_window(model: &LlamaModel, prompts: &[Vec<u32>], new_tokens: usize) -> Result<()> {
    let Some(window) = model.config().sliding_window else {
        return Ok(());
    };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let total = longest
        .checked_add(new_tokens)
        .ok_or_else(|| Error::Generate(format!("{longest} + {new_tokens} positions overflow")))?;
    if total > window {
        return Err(Error::Generate(format!(
            "the longest prompt ({longest} tokens) plus {new_tokens} new tokens is {total} positions, beyond the \
             model's sliding_window of {window}; sliding-window attention is not supported, so at most {window} \
             positions can be run"
        )));
    }
    Ok(())
}

/// Generates for `batches` (each a batch of prompts, unpadded) on the CPU
/// with the runtime's schedule: greedy without a sampler.
pub fn generate_on_cpu(
    model: &LlamaModel,
    batches: &[Vec<Vec<u32>>],
    options: &GenerateOptions,
    sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    for prompts in batches {
        check_window(model, prompts, options.max_new_tokens)?;
    }
    if options.pad_token_id as usize >= model.config().vocab_size {
        return Err(Error::Generate(format!(
            "the padding token {} is outside the vocabulary of {}",
            options.pad_token_id,
            model.config().vocab_size
        )));
    }
    runtime::schedule::generate(&mut CpuDevice::new(model), batches, options, sampler, progress)
}
