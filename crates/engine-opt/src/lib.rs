//! # engine-opt: the OPT model, the block schedule, the policy, the `tierlm` command
//!
//! This room holds everything that knows what a language model is: OPT
//! configurations and checkpoints, the tokenizer, the forward pass, sampling,
//! the placement policy and the block schedule, and the `tierlm` command line.
//! It may depend on every tier crate (`tier-api`, `tier-host`, `tier-disk`,
//! `tier-cuda`) and on `compression`; no tier crate depends on it.
//!
//! ## What is here now: OPT end to end on the CPU
//!
//! The CPU engine is the reference the GPU engine will be checked against.
//! It holds weights as f16 and computes in f32, and matches Hugging Face
//! transformers on the fixtures in `fixtures/opt/`.
//!
//! - [`config`]: `config.json`, the published sizes as presets, and the byte
//!   counts of weights, KV cache and activations (FlexGen's accounting).
//! - [`checkpoint`]: memory-mapped safetensors checkpoints, single-file or
//!   sharded; [`dummy`]: seeded random weights of any size. Both implement
//!   [`weights::WeightSource`].
//! - [`tokenizer`]: byte-level BPE with OPT's `</s>` prefix, left padding.
//! - [`model`]: the decoder, callable a layer (or a block: attention, MLP)
//!   at a time with that layer's [`kv_cache::LayerCache`]; [`ops`] holds the
//!   numerics (matrix products through the `gemm` crate, rayon threads).
//! - [`sampling`]: greedy, temperature, top-k, top-p, seeded.
//! - [`generation`]: prefill and decode over a block of batches, layer by
//!   layer, with per-sequence stopping and FlexGen's timing split.
//! - [`policy`]: FlexGen's `--percent` and flags, and which of them the CPU
//!   engine can honour.
//! - [`gpu`]: the same model all on one GPU (cuBLAS/cuBLASLt products,
//!   NVRTC kernels), layer by layer, for `--percent 100 0 100 0 100 0`.
//! - [`cli`]: the `tierlm` subcommands.
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
pub mod kv_cache;
pub mod loading;
pub mod memory;
pub mod model;
pub mod ops;
pub mod spec;
pub mod tokenizer;
pub mod weights;

pub use runtime::{interrupt, plan as placement, policy, progress, sampling, schedule};

pub use config::OptConfig;
pub use error::{Error, Result};
pub use model::OptModel;
