//! Greedy generation over a left-padded batch, and first-step logits.

use crate::error::{Error, Result};
use crate::model::LlamaModel;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// A sequence stops after emitting any of these (none: never).
    pub eos_token_ids: Vec<u32>,
}

impl GenerateOptions {
    /// `max_new_tokens` tokens, no stop token.
    pub fn new(max_new_tokens: usize) -> GenerateOptions {
        GenerateOptions { max_new_tokens, eos_token_ids: Vec::new() }
    }
}

/// The index of the largest value (the first of equals).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

fn check_prompts(model: &LlamaModel, prompts: &[Vec<u32>], new_tokens: usize) -> Result<usize> {
    if prompts.is_empty() {
        return Err(Error::Generate("no prompts".into()));
    }
    let vocab = model.config().vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Generate(format!("prompt {i} is empty")));
        }
        if let Some(&id) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Generate(format!("prompt {i} holds token {id}, outside the vocabulary of {vocab}")));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let total = longest
        .checked_add(new_tokens)
        .ok_or_else(|| Error::Generate(format!("{longest} + {new_tokens} positions overflow")))?;
    if let Some(window) = model.config().sliding_window {
        if total > window {
            return Err(Error::Generate(format!(
                "the longest prompt ({longest} tokens) plus {new_tokens} new tokens is {total} positions, beyond the \
                 model's sliding_window of {window}; sliding-window attention is not supported, so at most {window} \
                 positions can be run"
            )));
        }
    }
    Ok(longest)
}

/// Greedy tokens for `prompts` run as one left-padded batch: each sequence's
/// new tokens (its stop token included, if it emitted one), at most
/// `max_new_tokens` each.
pub fn generate(model: &LlamaModel, prompts: &[Vec<u32>], options: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
    let longest = check_prompts(model, prompts, options.max_new_tokens)?;
    let batch = prompts.len();
    let mut out = vec![Vec::new(); batch];
    if options.max_new_tokens == 0 {
        return Ok(out);
    }
    let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    // The pad id is never seen (masked): any valid id will do.
    let mut ids = Vec::with_capacity(batch * longest);
    for (p, &pad) in prompts.iter().zip(&pads) {
        ids.extend(std::iter::repeat_n(p[0], pad));
        ids.extend_from_slice(p);
    }
    let mut state = model.start(pads, longest + options.max_new_tokens)?;
    let vocab = model.config().vocab_size;
    let mut logits = model.forward(&mut state, &ids, longest)?;
    let mut done = vec![false; batch];
    for step in 0..options.max_new_tokens {
        let mut next = Vec::with_capacity(batch);
        for b in 0..batch {
            let token = argmax(&logits[b * vocab..(b + 1) * vocab]) as u32;
            if !done[b] {
                out[b].push(token);
                done[b] = options.eos_token_ids.contains(&token);
            }
            // A finished sequence is fed its last token; its results are unused.
            next.push(out[b].last().copied().unwrap_or(token));
        }
        if done.iter().all(|&d| d) || step + 1 == options.max_new_tokens {
            break;
        }
        logits = model.forward(&mut state, &next, 1)?;
    }
    Ok(out)
}

/// The logits of the last position of `prompt` run alone (the first
/// generation step), `[vocab]`.
pub fn prefill_logits(model: &LlamaModel, prompt: &[u32]) -> Result<Vec<f32>> {
    let prompts = [prompt.to_vec()];
    let longest = check_prompts(model, &prompts, 0)?;
    let mut state = model.start(vec![0], longest)?;
    model.forward(&mut state, prompt, longest)
}
