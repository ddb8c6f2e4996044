//! The content-addressed cache: a small [`Store`] trait and the embedded on-disk store.
//! Keys are derived in [`key`] and nowhere else.

pub mod key;
pub mod memo;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use key::CallKey;

/// Where cached values live. The on-disk store is the default; a shared remote tier can be
/// added behind the same trait.
pub trait Store: Send + Sync {
    fn get(&self, bucket: &str, key: &blake3::Hash) -> io::Result<Option<Vec<u8>>>;
    /// Must be atomic: a reader sees the whole value or nothing, even if the process is killed.
    fn put(&self, bucket: &str, key: &blake3::Hash, value: &[u8]) -> io::Result<()>;
}

/// One file per entry under `<root>/<bucket>/<2 hex>/<64 hex>`, written to a temp file in
/// the same folder and renamed into place.
pub struct DiskStore {
    root: PathBuf,
}

const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n# This file is a cache directory tag created by keg.\n# For information about cache directory tags see https://bford.info/cachedir/\n";

impl DiskStore {
    /// Open (creating if needed) a cache folder, marked with `CACHEDIR.TAG` and a `.gitignore`.
    pub fn open(root: &Path) -> io::Result<DiskStore> {
        std::fs::create_dir_all(root)?;
        for (name, contents) in [("CACHEDIR.TAG", CACHEDIR_TAG), (".gitignore", "*\n")] {
            let path = root.join(name);
            if !path.exists() {
                std::fs::write(path, contents)?;
            }
        }
        Ok(DiskStore {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry_path(&self, bucket: &str, key: &blake3::Hash) -> PathBuf {
        let hex = key.to_hex();
        self.root.join(bucket).join(&hex[..2]).join(hex.as_str())
    }

    /// Entry count and bytes per bucket, sorted by bucket.
    pub fn stats(root: &Path) -> io::Result<Vec<(String, u64, u64)>> {
        let mut out = Vec::new();
        if !root.exists() {
            return Ok(out);
        }
        for bucket in std::fs::read_dir(root)? {
            let bucket = bucket?;
            if !bucket.file_type()?.is_dir() {
                continue;
            }
            let (mut entries, mut bytes) = (0, 0);
            for entry in walkdir::WalkDir::new(bucket.path()) {
                let entry = entry.map_err(io::Error::other)?;
                if entry.file_type().is_file() && !is_temp(entry.path()) {
                    entries += 1;
                    bytes += entry.metadata().map_err(io::Error::other)?.len();
                }
            }
            out.push((
                bucket.file_name().to_string_lossy().into_owned(),
                entries,
                bytes,
            ));
        }
        out.sort();
        Ok(out)
    }

    /// Remove every bucket, keeping the marker files.
    pub fn clear(root: &Path) -> io::Result<u64> {
        let mut removed = 0;
        if !root.exists() {
            return Ok(0);
        }
        for bucket in std::fs::read_dir(root)? {
            let bucket = bucket?;
            if bucket.file_type()?.is_dir() {
                removed += walkdir::WalkDir::new(bucket.path())
                    .into_iter()
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_file())
                    .count() as u64;
                std::fs::remove_dir_all(bucket.path())?;
            }
        }
        Ok(removed)
    }
}

fn is_temp(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(".tmp"))
}

impl Store for DiskStore {
    fn get(&self, bucket: &str, key: &blake3::Hash) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.entry_path(bucket, key)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    fn put(&self, bucket: &str, key: &blake3::Hash, value: &[u8]) -> io::Result<()> {
        let path = self.entry_path(bucket, key);
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir)?;
        let mut file = tempfile::Builder::new().prefix(".tmp").tempfile_in(dir)?;
        file.write_all(value)?;
        // Two runs may write the same entry at once; both write identical bytes, and rename
        // replaces atomically, so whichever lands last is as good as the first.
        file.persist(&path).map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_then_get_and_markers() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(&dir.path().join("c")).unwrap();
        let key = blake3::hash(b"k");
        assert_eq!(store.get("calls-v1", &key).unwrap(), None);
        store.put("calls-v1", &key, b"value").unwrap();
        assert_eq!(
            store.get("calls-v1", &key).unwrap().as_deref(),
            Some(&b"value"[..])
        );
        assert!(dir.path().join("c/CACHEDIR.TAG").is_file());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("c/.gitignore")).unwrap(),
            "*\n"
        );
        let stats = DiskStore::stats(&dir.path().join("c")).unwrap();
        assert_eq!(stats, vec![("calls-v1".to_owned(), 1, 5)]);
        assert_eq!(DiskStore::clear(&dir.path().join("c")).unwrap(), 1);
        assert_eq!(store.get("calls-v1", &key).unwrap(), None);
    }
}
