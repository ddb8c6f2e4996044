//! One file per subcommand; each returns the process exit code.

pub mod cache;
pub mod graph;
pub mod plan;
pub mod run;
pub mod validate;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::config::Diagnostics;

/// Exit codes: 0 success, 1 a run failed, 2 bad pipeline or usage, 130 interrupted.
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_INTERRUPTED: u8 = 130;

pub fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Validate(args) => validate::run(args),
        Command::Graph(args) => graph::run(args),
        Command::Cache(args) => cache::run(args),
    }
}

/// Print every pipeline error and return exit code 2.
pub fn config_errors(diagnostics: &Diagnostics) -> ExitCode {
    eprint!("{}", diagnostics.render());
    ExitCode::from(EXIT_CONFIG)
}

/// One thread runs the pipeline: every call's sending, reading and the stages around it.
/// That thread keeps 10,000 calls a second in flight with CPU to spare, far more than an
/// LLM server answers, and costs less per call than a runtime of one worker per core, where
/// each finished call wakes a second worker to look for work (at 512 calls in flight, 71–74
/// µs of CPU per call against 77–86, and no less throughput). Work that needs more cores has
/// threads of its own: the cache writer, reading documents' records back, blocking file work.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|err| {
            eprintln!("error: cannot start the async runtime: {err}");
            std::process::exit(EXIT_FAILURE.into())
        })
}
