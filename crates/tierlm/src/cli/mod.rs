//! Subcommands of the `tierlm` binary. Each submodule owns one subcommand's
//! arguments and its `run` function; `main.rs` only dispatches. `gpu` is
//! the GPU half of `bench` and `generate` (the command's, not the engine's:
//! the GPU engine in `engine_opt::gpu` imports nothing from here); `llama`
//! is `generate` and `bench` for the Llama family, on its CPU engine.

pub mod auto;
pub mod bench;
pub mod bench_tiers;
pub mod calibrate;
pub mod copy_matrix;
pub mod generate;
pub mod gpu;
pub mod llama;
pub mod plan;
pub mod tiers;
