//! `keg validate`: check a pipeline without touching the network or the cache.

use std::process::ExitCode;

use super::config_errors;
use crate::cli::PipelineArgs;
use crate::config::Plan;

pub fn run(args: PipelineArgs) -> ExitCode {
    match Plan::load(&args.pipeline, &args.sets) {
        Ok(plan) => {
            eprintln!(
                "{}: ok ({} stages, {} providers)",
                args.pipeline.display(),
                plan.stages.len(),
                plan.providers.len()
            );
            ExitCode::SUCCESS
        }
        Err(diagnostics) => config_errors(&diagnostics),
    }
}
