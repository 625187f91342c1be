//! Greedy generation over a left-padded batch, and first-step logits, on
//! the runtime's schedule ([`crate::device`]).

use crate::device::generate_on_cpu;
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
    runtime::sampling::argmax(row) as usize
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
    crate::device::check_window(model, prompts, new_tokens)?;
    Ok(prompts.iter().map(Vec::len).max().unwrap_or(0))
}

/// Greedy tokens for `prompts` run as one left-padded batch: each sequence's
/// new tokens (its stop token included, if it emitted one), at most
/// `max_new_tokens` each.
pub fn generate(model: &LlamaModel, prompts: &[Vec<u32>], options: &GenerateOptions) -> Result<Vec<Vec<u32>>> {
    check_prompts(model, prompts, options.max_new_tokens)?;
    // The pad id is never seen (masked): any valid id will do.
    let opts = runtime::schedule::GenerateOptions {
        max_new_tokens: options.max_new_tokens,
        stop_on_eos: true,
        eos_token_ids: options.eos_token_ids.clone(),
        pad_token_id: 0,
    };
    let out = generate_on_cpu(model, &[prompts.to_vec()], &opts, None, &indicatif::ProgressBar::hidden())?;
    Ok(out.tokens)
}

/// The logits of the last position of `prompt` run alone (the first
/// generation step), `[vocab]`.
pub fn prefill_logits(model: &LlamaModel, prompt: &[u32]) -> Result<Vec<f32>> {
    let prompts = [prompt.to_vec()];
    let longest = check_prompts(model, &prompts, 0)?;
    let mut state = model.start(vec![0], longest)?;
    model.forward(&mut state, prompt, longest)
}
