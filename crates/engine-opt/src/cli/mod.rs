//! Subcommands of the `tierlm` binary. Each submodule owns one subcommand's
//! arguments and its `run` function; `main.rs` only dispatches.
