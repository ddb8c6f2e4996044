//! `keg plan`: count cached and pending LLM calls per stage without sending any.

use std::process::ExitCode;

use super::{EXIT_FAILURE, config_errors, runtime};
use crate::cli::PlanArgs;
use crate::config::Plan;
use crate::report;
use crate::runner::{RunOptions, execute};
use crate::stage::Mode;

pub fn run(args: PlanArgs) -> ExitCode {
    let plan = match Plan::load(&args.pipeline.pipeline, &args.pipeline.sets) {
        Ok(plan) => plan,
        Err(diagnostics) => return config_errors(&diagnostics),
    };
    let options = RunOptions {
        mode: Mode::Plan,
        read_cache: true,
        cache_dir: args.cache.cache_dir,
        progress: false,
    };
    match runtime().block_on(execute(&plan, &options)) {
        Ok(outcome) => {
            if args.json {
                println!("{}", report::plan_json(&outcome));
            } else {
                print!("{}", report::plan_table(&plan, &outcome));
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
