//! # engine-opt: the OPT family
//!
//! This room holds what knows OPT: its configuration and presets, its spec
//! for the runtime, its weight sources, its tokenizer, its CPU reference and
//! its GPU engine. It is written over the model-neutral crates (`runtime`:
//! spec, plan, policy, schedule, sampling, the tiers of a run; `ops`: the
//! GPU op layer; `checkpoint`) and the tier crates; the `tierlm` command
//! depends on it, nothing below does.
//!
//! - [`config`]: `config.json`, the published sizes as presets, FlexGen's
//!   byte counts; [`spec`]: OPT's `ModelSpec` (the tensors of a layer as
//!   each engine holds them).
//! - [`checkpoint`]: the `checkpoint` crate's files (safetensors or PyTorch)
//!   as a [`weights::WeightSource`]; [`loading`] opens and checks them
//!   against the spec; [`dummy`]: seeded random weights of any size;
//!   [`finite`]: weights and logits that f16 cannot hold are refused.
//! - [`tokenizer`]: byte-level BPE with OPT's `</s>` prefix.
//! - [`model`]: the CPU reference decoder over `ops::cpu`, a
//!   `runtime::cpu::CpuModel`: embed, one layer over its
//!   `runtime::cpu::HostLayer`, logits.
//! - [`generation`]: OPT on the runtime's CPU engine, with [`cpu_offload`]
//!   for OPT's policy of layers and cache partly on disk.
//! - [`gpu`]: OPT's GPU engine over `ops::gpu`: weights resident or streamed
//!   ([`gpu::offload`], packed with [`gpu::packed`]), the cache resident or
//!   tiered ([`gpu::tiered_cache`], [`cpu_attention`]), activations off the
//!   GPU, and the GPU as a `ComputeDevice` ([`gpu::generation`]).
//! - `interrupt`, `policy`, `placement` (the runtime's plan), `progress`,
//!   `sampling`, `schedule`: the runtime's, re-exported under the names the
//!   engine has used.
//!
//! Every failure input can cause is an [`Error`].

pub mod checkpoint;
pub mod config;
pub mod cpu_attention;
pub mod cpu_offload;
pub mod dummy;
mod error;
pub mod finite;
pub mod generation;
pub mod gpu;
pub mod loading;
pub mod memory;
pub mod model;
pub mod spec;
pub mod tokenizer;
pub mod weights;

pub use runtime::{interrupt, plan as placement, policy, progress, sampling, schedule};

pub use config::OptConfig;
pub use error::{Error, Result};
pub use model::OptModel;
