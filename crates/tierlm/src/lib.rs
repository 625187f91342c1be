//! # tierlm: the command
//!
//! This room holds the `tierlm` command line: one module per subcommand in
//! [`cli`] (`generate`, `bench`, `copy-matrix`, `bench-tiers`; `cli::gpu` is
//! the GPU half of `bench` and `generate`, `cli::tiers` the tier flags every
//! subcommand shares). It reads flags and input files, picks the engine,
//! and writes reports; the runtime, the op layer and the model families do
//! the work. `generate` dispatches on config.json's `model_type`: `opt` to
//! `engine-opt`, the Llama family to `engine-llama` ([`cli::llama`]).
//! Every failure is an [`Error`], the family's own. Nothing depends on it
//! but `main.rs` and its tests.

pub mod cli;
mod error;

pub use error::{Error, Result};
