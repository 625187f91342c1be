//! `tierlm`: run language models larger than one GPU's memory on that GPU.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "tierlm", version, about = "Run language models larger than one GPU's memory, for batch generation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Continue prompts (text or token ids) with a model, on the CPU engine
    Generate(engine_opt::cli::generate::GenerateArgs),
    /// FlexGen's throughput benchmark: prefill, decode and total token/s
    Bench(engine_opt::cli::bench::BenchArgs),
    /// Show the copy path planned between every pair of memory tiers present here
    CopyMatrix(engine_opt::cli::copy_matrix::CopyMatrixArgs),
    /// Measure the bandwidth of every copy path between the tiers present here
    BenchTiers(engine_opt::cli::bench_tiers::BenchTiersArgs),
}

/// Exit status and message for a subcommand's result: errors go to stderr.
fn report<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    engine_opt::progress::mark_process_start();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => report(engine_opt::cli::generate::run(args)),
        Command::Bench(args) => report(engine_opt::cli::bench::run(args)),
        Command::CopyMatrix(args) => report(engine_opt::cli::copy_matrix::run(args)),
        Command::BenchTiers(args) => report(engine_opt::cli::bench_tiers::run(args)),
    }
}
