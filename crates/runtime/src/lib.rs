//! # runtime: what every model family runs on
//!
//! This room holds the parts of tierlm that know no model family:
//!
//! - [`spec`]: what the runtime knows of a model, its layer spec (every
//!   tensor of a layer by name, shape, held type, block, compressibility),
//!   the KV-cache layout per token and the widths of a step;
//! - [`policy`]: FlexGen's placement policy (`--percent` and the flags);
//! - [`plan`]: where a policy puts every byte of a spec (weights split as
//!   the engine places them, cache, activations, buffers), refused before
//!   allocation with FlexGen's advice when it does not fit;
//! - [`cost`]: the cost model — bytes per link, work, and from measured
//!   [`cost::Rates`] the time of each overlapped stage and the predicted
//!   throughput of a policy;
//! - [`search`]: `--policy auto`, the search over policies that maximises
//!   the predicted throughput within the machine's budgets;
//! - [`tiers`]: the tiers of a run ([`tiers::Tiers`], built once per process
//!   and shared by the weights, the KV cache and the activations), and what
//!   each tier held at its peak ([`TierPeaks`]);
//! - [`schedule`]: the block schedule (FlexGen's order) over the
//!   [`schedule::ComputeDevice`] trait, with a batch's tokens through a
//!   generation ([`schedule::BatchTokens`]); [`sampling`]: greedy,
//!   temperature, top-k, top-p;
//! - [`gpu`]: a decoder layer's weights on the GPU for any family
//!   ([`gpu::layer::GpuLayer`], one buffer per spec tensor), their 4-bit
//!   packing and their streaming from host and disk through GPU slots
//!   ([`gpu::stream::WeightStreamer`]), the KV cache off the GPU
//!   ([`gpu::cache`]) and the hidden states off it ([`gpu::activations`]);
//! - [`cpu`]: the CPU engine, for any family that implements
//!   [`cpu::CpuModel`] (layers resident or streamed from disk, the KV cache in
//!   memory or partly on disk);
//! - [`pipeline`]: pipeline parallelism, the layers split into stages (a
//!   compute device each) that a block's micro-batches flow through, over a
//!   [`pipeline::Transport`] (in-process today);
//! - [`memory`]: the host's memory figures from `/proc`;
//! - [`interrupt`] (Ctrl-C stops a run cleanly) and [`progress`] bars;
//! - [`guard`]: panics of third-party libraries on malformed files, contained;
//! - [`tokenizer`]: a checkpoint's tokenizer (`tokenizer.json` or
//!   `vocab.json` + `merges.txt`) with `tokenizer_config.json`'s settings,
//!   and its chat template rendered with `minijinja`.
//!
//! It may use the tier crates (`tier-api`, `tier-host`, `tier-disk`,
//! `tier-cuda`) and the op layer (`ops`) through their public types; it names no model, no tensor of
//! a model and no model configuration, and nothing here calls `cudarc`. A
//! model family's crate and the `tierlm` command depend on
//! it; it depends on neither.
//!
//! Every failure here is a [`Error`].

pub mod cost;
pub mod cpu;
mod error;
pub mod gpu;
pub mod guard;
pub mod interrupt;
pub mod memory;
pub mod pipeline;
pub mod plan;
pub mod policy;
pub mod progress;
pub mod sampling;
pub mod schedule;
pub mod search;
pub mod spec;
pub mod tiers;
pub mod tokenizer;

pub use error::{Error, Result};
pub use memory::available_bytes;
pub use tiers::{TierPeaks, Tiers};
