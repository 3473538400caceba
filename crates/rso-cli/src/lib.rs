//! The `rso` command-line program as a library, so its commands are testable in-process.
//!
//! - [`args`]: the command line (clap);
//! - [`train`]: `rso train`, one training run with per-round evaluation;
//! - [`checkpoint`]: `rso train --checkpoint-dir` / `--resume`, atomic per-round checkpoints;
//! - [`provenance`]: what every results file records (command, revision, machine, date);
//! - [`reproduce`]: `rso reproduce`, the commands behind every file in `results/`;
//! - [`stop`]: a clean stop on SIGTERM, SIGINT or SIGUSR1 (exit status 75);
//! - [`study`]: `rso study`, grids of settings × seeds run as child processes and summarised;
//! - [`plot`]: the comparison plot and a study's band plot;
//! - [`output`]: CSV rows and atomic results files with their `.meta.json`.

#![forbid(unsafe_code)]

pub mod args;
pub mod checkpoint;
pub mod output;
pub mod plot;
pub mod provenance;
pub mod reproduce;
pub mod stop;
pub mod study;
pub mod train;

pub use args::{Cli, Command};

/// Runs a parsed command line; returns the process's exit status (0 unless a study reports
/// failed or stopped runs).
pub fn run(cli: Cli) -> anyhow::Result<i32> {
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
        // Studies (and the reproductions run as studies) give it to each run they start.
        study::exec::set_threads(threads);
    }
    match &cli.command {
        // Training in this process: stop it cleanly (status 75).
        Command::Train(_)
        | Command::Reproduce(args::ReproduceCommand::Comparison(_))
        | Command::Reproduce(args::ReproduceCommand::Paper(_)) => stop::install()?,
        // Runs as child processes: pass the signal on to them.
        Command::Reproduce(
            args::ReproduceCommand::SeedTable(_) | args::ReproduceCommand::ForwardOnly(_),
        ) => study::exec::forward_signals()?,
        // `study run` and `run-one` pass signals on themselves.
        Command::Study(_) => {}
    }
    match cli.command {
        Command::Train(args) => {
            let outcome = train::run(&args, &mut train::ConsoleReporter::new())?;
            // A closed stdout (`rso train … | head`) is not an error of the run.
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{}", outcome.result_line());
            Ok(0)
        }
        Command::Reproduce(cmd) => reproduce::run(&cmd).map(|()| 0),
        Command::Study(cmd) => study::run(&cmd),
    }
}
