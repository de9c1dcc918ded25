//! The `prunec` command line.
//!
//! Exit codes: 0 on success, 1 on any error (the message names the file and what is wrong),
//! 2 on a usage error.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::args::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
