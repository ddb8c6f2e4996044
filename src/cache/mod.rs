//! The content-addressed cache: a small [`Store`] trait and the embedded on-disk store.
//! Keys are derived in [`key`] and nowhere else.

pub mod key;
pub mod memo;
mod sqlite;

use std::io;

pub use key::{CallKey, KeyStarts};
pub use sqlite::{DATABASE, DiskStore, commit_before_abort};

/// Where cached values live. The on-disk store is the default; a shared remote tier can be
/// added behind the same trait.
pub trait Store: Send + Sync {
    /// The value stored under `key`, including one `put` by this process that is not yet
    /// flushed.
    fn get(&self, bucket: &str, key: &blake3::Hash) -> io::Result<Option<Vec<u8>>>;
    /// Must be atomic: a reader sees the whole value or nothing, even if the process is killed.
    /// It may return before the value is on disk; [`Store::flush`] waits for that.
    fn put(&self, bucket: &str, key: &blake3::Hash, value: &[u8]) -> io::Result<()>;
    /// Whether `bucket` holds any entry.
    fn holds(&self, bucket: &str) -> io::Result<bool>;
    /// Wait until every `put` so far is written, and report the first write that failed.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}
