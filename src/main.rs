//! The `keg` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

// Most of keg's own CPU per LLM call is small allocations (JSON values, request and reply
// buffers) made and freed across the runtime's threads; mimalloc does them in about half
// the time of the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Release builds abort on a panic rather than unwind (`Cargo.toml`), so nothing is
    // dropped on the way out: after the message, the cache commits the calls that finished
    // and the outputs' temp files are removed, as when they are dropped.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        kegline::cache::commit_before_abort();
        kegline::stage::export::remove_temp_files();
    }));
    kegline::commands::dispatch(kegline::cli::Cli::parse())
}
