//! Subcommands of the `tierlm` binary. Each submodule owns one subcommand's
//! arguments and its `run` function; `main.rs` only dispatches.

pub mod bench;
pub mod bench_tiers;
pub mod copy_matrix;
pub mod generate;
pub mod tiers;
