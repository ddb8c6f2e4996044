//! The command line: every command and flag in one place.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::report::GraphFormat;

#[derive(Debug, Parser)]
#[command(
    name = "keg",
    version,
    about = "Turn documents into fine-tuning datasets for LLMs, incrementally"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline: make only the LLM calls that are not cached, write the outputs.
    Run(RunArgs),
    /// Show, per stage, how many items are cached and how many would run. Sends nothing.
    Plan(PlanArgs),
    /// Check a pipeline file (and its templates and schemas) without running anything.
    Validate(PipelineArgs),
    /// Print the stage graph.
    Graph(GraphArgs),
    /// Inspect or clear the cache.
    Cache(CacheArgs),
}

#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// The pipeline YAML file.
    pub pipeline: PathBuf,
    /// Override a var declared under `vars:` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
    pub sets: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct CacheDirArg {
    /// Cache folder (default `.keg` in the working directory).
    #[arg(long, env = "KEG_CACHE_DIR", default_value = ".keg")]
    pub cache_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub cache: CacheDirArg,
    /// Do not read cached results (fresh results are still stored).
    #[arg(long)]
    pub no_cache: bool,
    /// No progress bars and no summary.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub cache: CacheDirArg,
    /// Print JSON on stdout: {"version":1,"stages":[{"name","kind","items","cached","to_run"}]}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[arg(long, value_enum, default_value = "mermaid")]
    pub format: GraphFormat,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub action: CacheAction,
    #[command(flatten)]
    pub cache: CacheDirArg,
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Entries and bytes per bucket.
    Stats,
    /// Delete every cached entry.
    Clear,
}

fn parse_set(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("expected NAME=VALUE, got `{text}`")),
    }
}
