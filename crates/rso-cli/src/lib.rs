//! The `rso` command-line program as a library, so its commands are testable in-process.
//!
//! - [`args`]: the command line (clap);
//! - [`train`]: `rso train`, one training run with per-round evaluation;
//! - [`checkpoint`]: `rso train --checkpoint-dir` / `--resume`, atomic per-round checkpoints;
//! - [`provenance`]: what every results file records (command, revision, machine, date);
//! - [`reproduce`]: `rso reproduce`, the commands behind every file in `results/`;
//! - [`plot`]: the comparison plot;
//! - [`output`]: CSV rows and atomic results files.

#![forbid(unsafe_code)]

pub mod args;
pub mod checkpoint;
pub mod output;
pub mod plot;
pub mod provenance;
pub mod reproduce;
pub mod train;

pub use args::{Cli, Command};

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // A bad RSO_SIMD is refused here; the engine itself would ignore it.
    rso_cpu::simd::requested_level().map_err(anyhow::Error::msg)?;
    if let Some(threads) = cli.threads {
        anyhow::ensure!(threads >= 1, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .map_err(|e| anyhow::anyhow!("--threads {threads}: {e}"))?;
        #[cfg(feature = "tch")]
        rso_tch::set_threads(threads);
    }
    match cli.command {
        Command::Train(args) => {
            let outcome = train::run(&args, &mut train::ConsoleReporter::new())?;
            // A closed stdout (`rso train … | head`) is not an error of the run.
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{}", outcome.result_line());
            Ok(())
        }
        Command::Reproduce(cmd) => reproduce::run(&cmd),
    }
}
