//! `keg cache stats|clear`.

use std::process::ExitCode;

use super::EXIT_FAILURE;
use crate::cache::DiskStore;
use crate::cli::{CacheAction, CacheArgs};
use crate::report::thousands;

pub fn run(args: CacheArgs) -> ExitCode {
    let root = &args.cache.cache_dir;
    let result = match args.action {
        CacheAction::Stats => DiskStore::stats(root).map(|buckets| {
            if buckets.is_empty() {
                println!("{}: empty", root.display());
            }
            for (bucket, entries, bytes) in buckets {
                println!(
                    "{}/{bucket}: {} entries, {} bytes",
                    root.display(),
                    thousands(entries),
                    thousands(bytes)
                );
            }
        }),
        CacheAction::Clear => DiskStore::clear(root).map(|removed| {
            eprintln!("{}: removed {} entries", root.display(), thousands(removed));
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}: {err}", root.display());
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
