//! `tierlm`: run language models larger than one GPU's memory on that GPU.

use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "tierlm", version, about = "Run language models larger than one GPU's memory, for batch generation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Continue prompts (text or token ids) with an OPT or Llama-family model
    Generate(tierlm::cli::generate::GenerateArgs),
    /// FlexGen's throughput benchmark: prefill, decode and total token/s
    Bench(tierlm::cli::bench::BenchArgs),
    /// Show the copy path planned between every pair of memory tiers present here
    CopyMatrix(tierlm::cli::copy_matrix::CopyMatrixArgs),
    /// Measure the bandwidth of every copy path between the tiers present here
    BenchTiers(tierlm::cli::bench_tiers::BenchTiersArgs),
    /// Choose a policy with the cost model (--policy auto) and show why, without loading the model
    Plan(tierlm::cli::plan::PlanArgs),
    /// Measure the rates the cost model needs on this machine, and cache them
    Calibrate(tierlm::cli::calibrate::CalibrateArgs),
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

/// [`report`] for the commands that generate: a run stopped by Ctrl-C
/// (SIGINT) exits with 130, the shell's convention (143 for SIGTERM). The
/// subcommand has returned by then, so every tier's memory was dropped.
fn report_run(result: tierlm::Result<()>) -> ExitCode {
    match result {
        Err(e) if e.is_interrupted() => {
            if std::io::stderr().is_terminal() {
                // Off the line of the progress bar and the terminal's "^C".
                eprintln!();
            }
            eprintln!("error: {e}");
            ExitCode::from(engine_opt::interrupt::exit_status())
        }
        other => report(other),
    }
}

fn main() -> ExitCode {
    // Large blocks go back to the kernel when freed: the resident set then
    // follows what the tiers account (docs/reliability.md, "Memory").
    engine_opt::memory::fix_allocator_mmap_threshold();
    engine_opt::progress::mark_process_start();
    // A library that panics on a malformed file prints nothing; the error
    // that names the file is what the user sees.
    runtime::guard::install_quiet_hook();
    let cli = Cli::parse();
    // Ctrl-C and SIGTERM set a flag that the generation loops turn into
    // `Error::Interrupted`, so that everything is dropped on the way out.
    // The other commands never look at it: a first Ctrl-C ends them.
    if matches!(cli.command, Command::Generate(_) | Command::Bench(_)) {
        engine_opt::interrupt::install();
    }
    match cli.command {
        Command::Generate(args) => report_run(tierlm::cli::generate::run(args)),
        Command::Bench(args) => report_run(tierlm::cli::bench::run(args).map_err(tierlm::Error::from)),
        Command::CopyMatrix(args) => report(tierlm::cli::copy_matrix::run(args)),
        Command::BenchTiers(args) => report(tierlm::cli::bench_tiers::run(args)),
        Command::Plan(args) => report(tierlm::cli::plan::run(args)),
        Command::Calibrate(args) => report(tierlm::cli::calibrate::run(args)),
    }
}
