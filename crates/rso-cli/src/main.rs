//! `rso`: train convolutional networks with RSO or SGD and reproduce the project's results.

#![forbid(unsafe_code)]

use rso_cli::Cli;

fn main() {
    let cli = Cli::parse_recording();
    match rso_cli::run(cli) {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(err) => {
            // One line that names the flag or file at fault; no panic, no backtrace.
            eprintln!("error: {err:#}");
            std::process::exit(2);
        }
    }
}
