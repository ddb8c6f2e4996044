//! The `keg` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    kegline::commands::dispatch(kegline::cli::Cli::parse())
}
