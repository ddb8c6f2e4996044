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
    // The run is a task on the runtime's workers, not a future the main thread blocks on:
    // each finished call then wakes the documents waiting for it on the worker it finished
    // on, instead of waking the main thread (a third of the context switches, 7% less CPU).
    let runtime = runtime();
    let (plan, result) = match runtime.block_on(runtime.spawn(async move {
        let result = execute(&plan, &options).await;
        (plan, result)
    })) {
        Ok(done) => done,
        // Never cancelled: the only way to fail is a panic, which goes on as one.
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    };
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
