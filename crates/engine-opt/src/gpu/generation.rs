//! Batched generation on the GPU: prefill then decoding over the KV cache,
//! over a block of batches in FlexGen's order (for each step, for each
//! layer, for each batch), with the CPU engine's rules: left padding,
//! per-sequence stopping, finished sequences fed padding, and the same
//! timing split (the first step is the prefill).
//!
//! Greedy picks are made on the GPU (only the token ids come back);
//! sampling copies the logits to the host and uses the CPU sampler.

use std::time::Instant;

use indicatif::ProgressBar;

use super::cache::GpuKvCache;
use super::model::{BatchCache, GpuHidden, GpuModel, GpuStep, Workspace};
use crate::error::{Error, Result};
use crate::generation::{validate_prompts, GenerateOptions, GenerationOutput};
use crate::sampling::Sampler;
use crate::tokenizer::left_pad;

/// One batch through a generation: its cache and hidden states on the
/// GPU, its next step's inputs and its outputs on the host.
#[derive(Debug)]
pub struct GpuBatch {
    batch: usize,
    /// Tokens of the next step, `batch × new_len`, and which are real.
    step_tokens: Vec<u32>,
    step_mask: Vec<u8>,
    new_len: usize,
    /// Per sequence, real tokens so far (the next token's position).
    next_position: Vec<usize>,
    pub cache: BatchCache,
    pub act: GpuHidden,
    pub generated: Vec<Vec<u32>>,
    pub finished: Vec<bool>,
}

impl GpuBatch {
    /// Left-pads `prompts` into one batch with room for `max_new_tokens`
    /// more positions.
    pub fn new(model: &GpuModel, prompts: &[Vec<u32>], max_new_tokens: usize, pad: u32) -> Result<Self> {
        let (ids, mask) = left_pad(prompts, pad);
        let len = ids.first().map_or(0, Vec::len);
        let batch = prompts.len();
        Ok(GpuBatch {
            batch,
            step_tokens: ids.concat(),
            step_mask: mask.iter().flatten().map(|&m| u8::from(m)).collect(),
            new_len: len,
            next_position: prompts.iter().map(Vec::len).collect(),
            cache: model.new_cache(batch, len + max_new_tokens)?,
            act: GpuHidden::new(&model.gpu, &model.config, batch * len)?,
            generated: vec![Vec::new(); batch],
            finished: vec![false; batch],
        })
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Rows (sequences × new tokens) of the next step.
    pub fn rows(&self) -> usize {
        self.batch * self.new_len
    }

    /// Whether every sequence is done.
    pub fn all_finished(&self) -> bool {
        self.finished.iter().all(|&f| f)
    }

    fn past(&self) -> usize {
        self.cache.len()
    }

    /// The step's embeddings into the batch's hidden states.
    pub fn embed(&mut self, model: &GpuModel, ws: &mut Workspace) -> Result<()> {
        let past = self.past();
        // Real tokens before this step's first, per sequence.
        let past_real: Vec<i32> = (0..self.batch)
            .map(|b| {
                let real_now = self.step_mask[b * self.new_len..(b + 1) * self.new_len].iter().filter(|&&m| m != 0);
                (self.next_position[b] - real_now.count()) as i32
            })
            .collect();
        if let BatchCache::Tiered(c) = &mut self.cache {
            c.record_mask(&self.step_mask, self.new_len, past)?;
        }
        let step = GpuStep { batch: self.batch, new_len: self.new_len, past, key_mask: self.cache.key_mask() };
        model.embed(&self.act, ws, &self.step_tokens, &self.step_mask, &past_real, &step)
    }

    /// Layer `j` of the step.
    pub fn layer(&mut self, model: &GpuModel, j: usize, ws: &mut Workspace) -> Result<()> {
        match &mut self.cache {
            BatchCache::Gpu(GpuKvCache { layers, key_mask }) => {
                let cache = layers.get_mut(j).ok_or_else(|| Error::Gpu(format!("no cache for layer {j}")))?;
                let step = GpuStep { batch: self.batch, new_len: self.new_len, past: cache.len(), key_mask };
                model.layer_forward(j, cache, &self.act, ws, &step)
            }
            BatchCache::Tiered(tc) => {
                let streamer = model
                    .cache_streamer
                    .as_ref()
                    .ok_or_else(|| Error::Gpu("a tiered cache without its streamer".into()))?;
                streamer.layer(model, j, tc, &self.act, ws, self.new_len)
            }
        }
    }

    /// The logits of the step's last positions into `ws.logits`.
    pub fn logits(&self, model: &GpuModel, ws: &mut Workspace) -> Result<()> {
        model.logits(&self.act, ws, self.batch, self.new_len)
    }

    /// The whole step for this batch alone: embeddings, every layer, logits.
    pub fn step(&mut self, model: &GpuModel, ws: &mut Workspace) -> Result<()> {
        self.embed(model, ws)?;
        for j in 0..model.num_layers() {
            model.begin_layer(j)?;
            self.layer(model, j, ws)?;
            model.end_layer(j)?;
        }
        self.logits(model, ws)
    }

    /// Records the picked tokens and sets up the next one-token step (the
    /// CPU engine's rules: finished sequences are fed padding).
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

/// Generates for a block of batches (`batches[k]` holds the prompts of batch
/// `k`, unpadded), every layer over every unfinished batch before the next
/// layer. Without a sampler, picks greedily on the GPU.
pub fn generate(
    model: &GpuModel,
    batches: &[Vec<Vec<u32>>],
    opts: &GenerateOptions,
    mut sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    let mut first = 0;
    for prompts in batches {
        validate_prompts(&model.config, prompts, opts.max_new_tokens, first)?;
        first += prompts.len();
    }
    let vocab = model.config.vocab_size;
    let mut states: Vec<GpuBatch> = batches
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| GpuBatch::new(model, p, opts.max_new_tokens, opts.pad_token_id))
        .collect::<Result<_>>()?;
    if opts.max_new_tokens == 0 {
        states.iter_mut().for_each(|s| s.finished.fill(true));
    }
    let rows = states.iter().map(GpuBatch::rows).max().unwrap_or(0);
    let batch = states.iter().map(GpuBatch::batch).max().unwrap_or(0);
    let mut ws = Workspace::new(&model.gpu, &model.config, rows.max(1), batch.max(1))?;
    model.gpu.synchronize()?;
    let mut out = GenerationOutput {
        cache_bytes: states.iter().map(|s| s.cache.bytes().0).sum::<u64>()
            + model.cache_streamer.as_ref().map_or(0, |c| c.slot_bytes()),
        activation_bytes: states.iter().map(|s| s.act.bytes()).sum::<u64>() + ws.bytes(),
        ..Default::default()
    };

    let start = Instant::now();
    for step in 0..opts.max_new_tokens {
        let active: Vec<usize> = (0..states.len()).filter(|&k| !states[k].all_finished()).collect();
        if active.is_empty() {
            break;
        }
        if let Some(p) = &model.profiler {
            p.phase(&model.gpu, if step == 0 { "prefill" } else { "decode" })?;
        }
        for &k in &active {
            states[k].embed(model, &mut ws)?;
        }
        // Layer j's weights are in a GPU slot before its batches are
        // enqueued; the next streamed layer copies while they compute, once
        // for all the block's batches.
        for j in 0..model.num_layers() {
            model.begin_layer(j)?;
            for &k in &active {
                states[k].layer(model, j, &mut ws)?;
            }
            model.end_layer(j)?;
        }
        // Keys and values left in the tiered cache's GPU slots go home.
        model.end_step()?;
        for &k in &active {
            let st = &mut states[k];
            st.logits(model, &mut ws)?;
            let picked = match sampler.as_deref_mut() {
                None => model.argmax(&ws, st.batch)?,
                Some(sampler) => {
                    let logits = model.logits_to_host(&ws, st.batch)?;
                    logits.chunks(vocab).map(|row| sampler.sample(row)).collect()
                }
            };
            st.advance(&picked, opts);
        }
        if step == 0 {
            out.prefill_time = start.elapsed();
        }
        progress.inc(1);
    }
    model.gpu.synchronize()?;
    out.decode_time = start.elapsed().saturating_sub(out.prefill_time);
    out.activation_bytes = out.activation_bytes.max(states.iter().map(|s| s.act.bytes()).sum::<u64>() + ws.bytes());
    out.tokens = states.into_iter().flat_map(|s| s.generated).collect();
    Ok(out)
}

/// Logits at the last position of each prompt after the prompts (left
/// padded into one batch) go through the model: `[batch, vocab]`.
pub fn prefill_logits(model: &GpuModel, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
    validate_prompts(&model.config, prompts, 0, 0)?;
    let mut st = GpuBatch::new(model, prompts, 0, crate::tokenizer::PAD_TOKEN_ID)?;
    let mut ws = Workspace::new(&model.gpu, &model.config, st.rows().max(1), st.batch().max(1))?;
    st.step(model, &mut ws)?;
    model.end_step()?;
    model.logits_to_host(&ws, st.batch())
}
