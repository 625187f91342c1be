//! The family on the runtime's CPU engine ([`runtime::cpu::CpuEngine`]):
//! the block schedule drives [`LlamaModel`] (a `runtime::cpu::CpuModel`) a
//! layer at a time over a block of batches, with its sampling and progress,
//! the layers and the KV cache where a [`CpuPlacement`] puts them.
//! Positions count from each sequence's first real token, and padded
//! positions are masked out of attention.

use indicatif::ProgressBar;
use runtime::cpu::{CpuEngine, CpuPlacement};
use runtime::sampling::Sampler;
use runtime::schedule::{GenerateOptions, GenerationOutput};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::model::LlamaModel;

/// Checks that prompts plus `new_tokens` fit the model's attention window
/// (Mistral's `sliding_window`, which is not implemented: longer runs are
/// refused rather than computed wrongly).
pub fn check_window(model: &LlamaModel, prompts: &[Vec<u32>], new_tokens: usize) -> Result<()> {
    check_window_config(model.config(), prompts, new_tokens)
}

/// [`check_window`] for a configuration.
pub fn check_window_config(config: &LlamaConfig, prompts: &[Vec<u32>], new_tokens: usize) -> Result<()> {
    check_window_len(config, prompts.iter().map(Vec::len).max().unwrap_or(0), new_tokens)
}

/// [`check_window`] for prompts of at most `longest` tokens.
pub fn check_window_len(config: &LlamaConfig, longest: usize, new_tokens: usize) -> Result<()> {
    let Some(window) = config.sliding_window else {
        return Ok(());
    };
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

/// The family's own checks of a block: the attention window, the padding
/// token.
fn check_block(model: &LlamaModel, batches: &[Vec<Vec<u32>>], options: &GenerateOptions) -> Result<()> {
    check_block_config(model.config(), batches, options)
}

/// [`check_block`] for a configuration (the GPU engine's too).
pub fn check_block_config(config: &LlamaConfig, batches: &[Vec<Vec<u32>>], options: &GenerateOptions) -> Result<()> {
    for prompts in batches {
        check_window_config(config, prompts, options.max_new_tokens)?;
    }
    if options.pad_token_id as usize >= config.vocab_size {
        return Err(Error::Generate(format!(
            "the padding token {} is outside the vocabulary of {}",
            options.pad_token_id, config.vocab_size
        )));
    }
    Ok(())
}

/// Generates for `batches` (each a batch of prompts, unpadded) on the CPU
/// with the runtime's schedule, every layer and the cache in memory: greedy
/// without a sampler.
pub fn generate_on_cpu(
    model: &LlamaModel,
    batches: &[Vec<Vec<u32>>],
    options: &GenerateOptions,
    sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    generate_placed(model, model.layers(), CpuPlacement::default(), batches, options, sampler, progress)
}

/// [`generate_on_cpu`] with layers `0..resident.len()` in `resident` and the
/// others, and a share of the KV cache, where `placement` says.
pub fn generate_placed(
    model: &LlamaModel,
    resident: &[runtime::cpu::HostLayer],
    placement: CpuPlacement,
    batches: &[Vec<Vec<u32>>],
    options: &GenerateOptions,
    sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    check_block(model, batches, options)?;
    let mut engine = CpuEngine::new(model, resident, placement)?;
    let mut out = runtime::schedule::generate(&mut engine, batches, options, sampler, progress)?;
    out.disk_cache_bytes = engine.disk_cache_bytes();
    out.cache_bytes = out.cache_bytes.saturating_add(engine.slot_bytes());
    Ok(out)
}

/// [`generate_placed`] with the layers split into pipeline stages
/// (`runtime::pipeline`, e.g. [`runtime::pipeline::resident_stages`]): one
/// CPU engine per stage on a thread of its own; the same tokens.
pub fn generate_pipelined(
    model: &LlamaModel,
    stages: &[runtime::pipeline::CpuStage<'_>],
    batches: &[Vec<Vec<u32>>],
    options: &GenerateOptions,
    sampler: Option<&mut Sampler>,
    progress: &ProgressBar,
) -> Result<GenerationOutput> {
    check_block(model, batches, options)?;
    Ok(runtime::pipeline::generate_staged(model, stages, batches, options, sampler, progress)?)
}
