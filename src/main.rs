//! The `keg` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

// Most of keg's own CPU per LLM call is small allocations (JSON values, request and reply
// buffers) made and freed across the runtime's threads; mimalloc does them in about half
// the time of the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    kegline::commands::dispatch(kegline::cli::Cli::parse())
}
