//! The `prunec` command line.
//!
//! Exit codes: 0 on success, 1 on any error (the message names the file and what is wrong),
//! 2 on a usage error (clap's, or a pipeline, pass option or recipe that does not parse), 3 when verification
//! was meant to run and failed or could not run (nothing is written then).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::args::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A pipeline that does not parse is a usage error, like the ones clap reports.
            let code = match () {
                _ if e.downcast_ref::<cli::Unverified>().is_some() => 3,
                _ if e.downcast_ref::<cli::Usage>().is_some() => 2,
                _ => 1,
            };
            ExitCode::from(code)
        }
    }
}
