//! kegline: pipelines that turn documents into fine-tuning datasets, with every LLM call
//! cached under a content hash so that re-runs pay only for what changed.

pub mod cache;
pub mod chunker;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dag;
pub mod provider;
pub mod record;
pub mod repair;
pub mod report;
pub mod runner;
pub mod stage;
pub mod template;

use std::sync::{Mutex, MutexGuard};

/// A mutex's guard, even when a thread panicked while holding it: what it guards (counters,
/// lists of notes, idle connections, the cache's bookkeeping) is left whole by every holder
/// between statements, and a run that is failing anyway still reports what it has.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
