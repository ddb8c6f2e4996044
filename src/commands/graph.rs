//! `keg graph`: print the stage graph as Mermaid or dot.

use std::process::ExitCode;

use super::config_errors;
use crate::cli::GraphArgs;
use crate::config::Plan;
use crate::report;

pub fn run(args: GraphArgs) -> ExitCode {
    match Plan::load(&args.pipeline.pipeline, &args.pipeline.sets) {
        Ok(plan) => {
            print!("{}", report::graph(&plan, args.format));
            ExitCode::SUCCESS
        }
        Err(diagnostics) => config_errors(&diagnostics),
    }
}
