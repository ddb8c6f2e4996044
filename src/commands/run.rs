//! `keg run`: execute a pipeline.

use std::io::IsTerminal;
use std::process::ExitCode;

use super::{EXIT_FAILURE, EXIT_INTERRUPTED, config_errors, runtime};
use crate::cli::RunArgs;
use crate::config::Plan;
use crate::report;
use crate::runner::{RunError, RunOptions, execute};
use crate::stage::Mode;

pub fn run(args: RunArgs) -> ExitCode {
    let plan = match Plan::load(&args.pipeline.pipeline, &args.pipeline.sets) {
        Ok(plan) => plan,
        Err(diagnostics) => return config_errors(&diagnostics),
    };
    let options = RunOptions {
        mode: Mode::Run,
        read_cache: !args.no_cache,
        cache_dir: args.cache.cache_dir,
        progress: !args.quiet && std::io::stderr().is_terminal(),
    };
    let result = runtime().block_on(execute(&plan, &options));
    match result {
        Ok(outcome) => {
            if !args.quiet {
                eprint!("{}", report::summary(&plan, &outcome));
            }
            ExitCode::SUCCESS
        }
        Err(RunError::Interrupted) => {
            eprintln!("keg: {}", RunError::Interrupted);
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(err) => {
            eprintln!("error: {err}");
            eprintln!(
                "  no output file was written; finished LLM calls are cached and will not be sent again"
            );
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
