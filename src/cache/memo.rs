//! What a run keeps besides LLM calls, so that the next run can skip work whose inputs did
//! not change: per document, what the per-document stages made of it; per run, which output
//! files the later stages wrote from those results. Keys are derived here, next to the call
//! key, and pinned by golden tests.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::record::{Lineage, Record, canonical_hash, write_json_map, write_json_str};
use crate::stage::{Reject, StatsSnapshot, Usage};

/// Per document: [`DocumentEntry`] under a [`DocumentKey`].
pub const DOCUMENTS_BUCKET: &str = "documents-v1";
/// Per document: [`DocumentRecords`] under [`DocumentEntry::digest`].
pub const DOCUMENT_RECORDS_BUCKET: &str = "document-records-v1";
/// Per run: [`OutputsEntry`] under an [`OutputsKey`].
pub const OUTPUTS_BUCKET: &str = "outputs-v1";
/// Per `load` stage: [`FileIndex`] under a [`FileIndexKey`].
pub const FILE_INDEX_BUCKET: &str = "file-index-v1";
pub const MEMO_KEY_VERSION: u32 = 1;

/// A key struct, hashed as its canonical JSON.
pub trait MemoKey: Serialize {
    fn digest(&self) -> blake3::Hash {
        canonical_hash(&serde_json::to_value(self).unwrap_or_default())
    }
}

/// Everything that decides what the per-document stages make of one document.
#[derive(Serialize)]
pub struct DocumentKey<'a> {
    pub key_version: u32,
    /// keg's own version: another version may chunk, render or parse differently.
    pub keg: &'a str,
    /// blake3 over the settings of the `load` stage and of every per-document stage, the
    /// providers' identities and every template file (see `runner::documents::Layout`).
    pub stages: &'a str,
    /// The document's path, as its records' lineage shows it.
    pub source: &'a str,
    /// blake3 of the document's bytes.
    pub document: &'a str,
}

impl MemoKey for DocumentKey<'_> {}

/// Everything that decides the files the stages after the per-document ones write.
#[derive(Serialize)]
pub struct OutputsKey<'a> {
    pub key_version: u32,
    pub keg: &'a str,
    /// The pipeline hash: every stage's settings and the providers' identities.
    pub pipeline: &'a str,
    /// blake3 over every template file.
    pub templates: &'a str,
    /// The vars templates read, with their values.
    pub vars: &'a Json,
    /// Each document's path and [`DocumentEntry::digest`], in the order they were loaded.
    pub documents: &'a [(String, String)],
}

impl MemoKey for OutputsKey<'_> {}

/// Whose files a [`FileIndex`] describes: a `load` stage's settings, read from a folder.
#[derive(Serialize)]
pub struct FileIndexKey<'a> {
    pub key_version: u32,
    pub settings: &'a Json,
    /// The working directory, which the stage's patterns are relative to.
    pub cwd: &'a str,
}

impl MemoKey for FileIndexKey<'_> {}

/// The documents a `load` stage read, by path, so that a file whose size, modification time
/// and inode are unchanged need not be read again to know its digest (as git's index does).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FileIndex {
    pub files: BTreeMap<String, FileFacts>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileFacts {
    pub bytes: u64,
    /// Nanoseconds since the Unix epoch.
    pub modified: i128,
    pub inode: u64,
    /// blake3 of the bytes.
    pub digest: String,
}

impl FileFacts {
    /// Size, modification time and inode of a file, with no digest yet.
    pub fn stat(path: &Path) -> io::Result<FileFacts> {
        let meta = std::fs::metadata(path)?;
        Ok(FileFacts {
            bytes: meta.len(),
            modified: modified_nanos(&meta),
            inode: inode(&meta),
            digest: String::new(),
        })
    }

    /// The same file, as far as its metadata tells.
    pub fn same_file(&self, other: &FileFacts) -> bool {
        (self.bytes, self.modified, self.inode) == (other.bytes, other.modified, other.inode)
    }

    /// Modified long enough ago that a later change shows in the modification time. A file
    /// changed within the clock's granularity of being read could keep its time (the "racy
    /// clean" case of git's index), so it is not remembered.
    pub fn settled(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        now - self.modified > 2_000_000_000
    }
}

fn modified_nanos(meta: &std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128)
}

#[cfg(unix)]
fn inode(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

#[cfg(not(unix))]
fn inode(_meta: &std::fs::Metadata) -> u64 {
    0
}

/// What one stage did, for one document or for the whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageMemo {
    pub name: String,
    pub records_in: usize,
    pub records_out: usize,
    pub stats: StatsSnapshot,
}

/// A reject, with the lineage that orders it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RejectMemo {
    pub reject: Reject,
    pub path: Vec<u32>,
}

impl RejectMemo {
    pub fn of(reject: &Reject) -> RejectMemo {
        RejectMemo {
            reject: reject.clone(),
            path: reject.order.path.clone(),
        }
    }

    pub fn restore(&self) -> Reject {
        let mut reject = self.reject.clone();
        reject.order = Lineage {
            source: reject.source.as_str().into(),
            path: self.path.clone(),
        };
        reject
    }
}

/// [`Usage`] with its cost kept exact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageMemo {
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nanos: Option<u64>,
}

pub fn usage_memo(usage: &BTreeMap<String, Usage>) -> BTreeMap<String, UsageMemo> {
    usage
        .iter()
        .map(|(name, u)| {
            let memo = UsageMemo {
                calls: u.calls,
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                cost_nanos: u.cost_nanos,
            };
            (name.clone(), memo)
        })
        .collect()
}

pub fn usage_restore(memo: &BTreeMap<String, UsageMemo>) -> BTreeMap<String, Usage> {
    memo.iter()
        .map(|(name, u)| {
            let usage = Usage {
                calls: u.calls,
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                cost_nanos: u.cost_nanos,
                cost: u.cost_nanos.map(|n| n as f64 / 1e9),
            };
            (name.clone(), usage)
        })
        .collect()
}

/// What the per-document stages made of one document, apart from the records themselves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocumentEntry {
    /// blake3 of the records, rejects and usage: everything later stages see of the document.
    /// The records are stored under it.
    pub digest: String,
    /// The per-document stages, in run order.
    pub stages: Vec<StageMemo>,
    pub rejects: Vec<RejectMemo>,
    pub usage: BTreeMap<String, UsageMemo>,
}

/// A record stored under its document: its lineage below the document, and its fields.
pub type StoredRecord = (Vec<u32>, Map<String, Json>);

/// The records of one document that later stages read, by stage name.
/// Written by [`DocumentRecords::to_bytes`] straight from the records; read with `serde`.
#[derive(Debug, Default, Deserialize)]
pub struct DocumentRecords {
    pub stages: Vec<(String, Vec<StoredRecord>)>,
}

impl DocumentRecords {
    /// The stored form of records, by stage name: what [`DocumentRecords`] reads back,
    /// `{"stages":[[NAME,[[PATH,DATA],…]],…]}`, as `serde_json` would write it.
    pub fn to_bytes(stages: &[(String, Vec<Record>)]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(b"{\"stages\":[");
        for (i, (name, records)) in stages.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'[');
            write_json_str(name, &mut out);
            out.extend_from_slice(b",[");
            for (j, record) in records.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"[[");
                for (k, index) in record.lineage.path.iter().enumerate() {
                    if k > 0 {
                        out.push(b',');
                    }
                    let _ = serde_json::to_writer(&mut out, index);
                }
                out.extend_from_slice(b"],");
                write_json_map(&record.data, &mut out);
                out.push(b']');
            }
            out.extend_from_slice(b"]]");
        }
        out.extend_from_slice(b"]}");
        out
    }

    /// The records of stage `name`, with `source` as their document.
    pub fn take(&mut self, name: &str, source: &std::sync::Arc<str>) -> Vec<Record> {
        let Some((_, records)) = self.stages.iter_mut().find(|(n, _)| n == name) else {
            return Vec::new();
        };
        std::mem::take(records)
            .into_iter()
            .map(|(path, data)| {
                Record::new(
                    data,
                    Lineage {
                        source: source.clone(),
                        path,
                    },
                )
            })
            .collect()
    }
}

/// A file a run wrote, to tell whether it is still there as written: same size,
/// modification time and inode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileMemo {
    pub path: PathBuf,
    pub facts: FileFacts,
}

impl FileMemo {
    pub fn of(path: &Path) -> io::Result<FileMemo> {
        Ok(FileMemo {
            path: path.to_path_buf(),
            facts: FileFacts::stat(path)?,
        })
    }

    /// The file exists as it was written.
    pub fn intact(&self) -> bool {
        FileFacts::stat(&self.path).is_ok_and(|now| now.same_file(&self.facts))
    }
}

/// What the stages after the per-document ones did, and the files they wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputsEntry {
    pub stages: Vec<StageMemo>,
    pub rejects: Vec<RejectMemo>,
    pub files: Vec<FileMemo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_key_is_pinned() {
        let key = DocumentKey {
            key_version: MEMO_KEY_VERSION,
            keg: "0.1.0",
            stages: "s",
            source: "docs/a.md",
            document: "d",
        };
        // If this changes, every user's skipped documents run again: bump MEMO_KEY_VERSION
        // and the buckets deliberately, then update the digest.
        assert_eq!(
            key.digest().to_hex().as_str(),
            canonical_hash(&serde_json::json!({
                "key_version": 1, "keg": "0.1.0", "stages": "s",
                "source": "docs/a.md", "document": "d",
            }))
            .to_hex()
            .as_str()
        );
        assert_eq!(
            key.digest().to_hex().as_str(),
            "6c4cc66e58850289a2b7dadf5a24bf28a7a1ddd758b8796e0514e4196829979e"
        );
    }

    #[test]
    fn records_round_trip_with_their_lineage() {
        let source: std::sync::Arc<str> = "docs/a.md".into();
        let mut data = Map::new();
        data.insert("q".into(), Json::from("why?"));
        let record = Record::new(
            data,
            Lineage {
                source: source.clone(),
                path: vec![2, 0],
            },
        );
        let bytes = DocumentRecords::to_bytes(&[("checked".to_owned(), vec![record.clone()])]);
        let mut back: DocumentRecords = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.take("checked", &source), vec![record]);
        assert_eq!(back.take("other", &source), Vec::new());
    }

    #[test]
    fn records_are_stored_as_serde_json_writes_them() {
        let record = |path: Vec<u32>, data: Json| {
            Record::new(
                data.as_object().unwrap().clone(),
                Lineage {
                    source: "docs/a.md".into(),
                    path,
                },
            )
        };
        let stages = vec![
            (
                "checked".to_owned(),
                vec![
                    record(
                        vec![2, 0],
                        serde_json::json!({"z": "Q \"1\"?\n", "a": [1, 2.5, null, true], "m": {"y": {}, "b": []}}),
                    ),
                    record(vec![], serde_json::json!({"é": "日本 \u{1}", "n": -3})),
                ],
            ),
            ("empty".to_owned(), Vec::new()),
            (
                "odd \"name\"".to_owned(),
                vec![record(vec![u32::MAX], serde_json::json!({}))],
            ),
        ];
        let view: Vec<_> = stages
            .iter()
            .map(|(name, records)| {
                let records: Vec<_> = records
                    .iter()
                    .map(|r| (r.lineage.path.as_slice(), &r.data))
                    .collect();
                (name.as_str(), records)
            })
            .collect();
        let expected = serde_json::to_vec(&serde_json::json!({ "stages": view })).unwrap();
        assert_eq!(
            String::from_utf8(DocumentRecords::to_bytes(&stages)).unwrap(),
            String::from_utf8(expected).unwrap()
        );
        assert_eq!(
            String::from_utf8(DocumentRecords::to_bytes(&[])).unwrap(),
            r#"{"stages":[]}"#
        );
    }
}
