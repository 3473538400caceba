//! `rso`: train convolutional networks with RSO or SGD and reproduce the project's results.

#![forbid(unsafe_code)]

use clap::Parser;
use rso_cli::Cli;

fn main() {
    let cli = Cli::parse();
    if let Err(err) = rso_cli::run(cli) {
        // One line that names the flag or file at fault; no panic, no backtrace.
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
}
