//! `load`: read documents matched by glob patterns, in a deterministic order.
//!
//! Rule for bad files: a file that is empty (or only whitespace), binary (has a NUL byte),
//! not valid UTF-8, larger than `max_bytes`, or not `.md`/`.markdown`/`.txt` is skipped and
//! named in a warning and in the run summary; it never stops the run and never becomes a row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json, json};

use super::{
    BuildContext, Kind, Listed, Listing, Mode, Stage, StageContext, StageError, StageStats,
};
use crate::cache::memo::{
    FILE_INDEX_BUCKET, FileFacts, FileIndex, FileIndexKey, MEMO_KEY_VERSION, MemoKey,
};
use crate::config::Diagnostic;
use crate::lock;
use crate::record::{Lineage, Record};

pub const KIND: Kind = Kind {
    name: "load",
    about: "read .md and .txt documents matched by glob patterns",
    takes_inputs: false,
    build,
    schema: |g| g.subschema_for::<LoadConfig>(),
};

/// Settings of a `load` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadConfig {
    /// Glob patterns (`docs/**/*.md`) or folders, relative to the working directory.
    pub paths: Vec<String>,
    /// Files larger than this many bytes are skipped with a warning.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

fn default_max_bytes() -> u64 {
    10_000_000
}

const EXTENSIONS: &[&str] = &["md", "markdown", "txt"];

pub struct Load {
    config: LoadConfig,
    patterns: Vec<Pattern>,
}

struct Pattern {
    /// Walk from here …
    base: PathBuf,
    /// … and keep files matching this (`None`: every file under `base`).
    matcher: Option<globset::GlobMatcher>,
    /// The pattern's folder parts below `base`, one matcher each, when every match lies at
    /// that depth (no `**`): only folders that can hold a match are read (see
    /// [`Pattern::match_folders`]), so `docs/*.md` reads no subfolder and `docs/{a,b}/*.md`
    /// no other folder. `None`: any depth, walked whole.
    folders: Option<Vec<globset::GlobMatcher>>,
}

fn build(cx: &BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
    let config: LoadConfig = cx.settings()?;
    let mut errors = Vec::new();
    if config.paths.is_empty() {
        errors.push(
            cx.error("paths", "`paths` is empty")
                .hint("list glob patterns such as `docs/**/*.md`"),
        );
    }
    let mut patterns = Vec::new();
    for pattern in &config.paths {
        match Pattern::new(pattern) {
            Ok(p) => patterns.push(p),
            Err(err) => errors.push(
                cx.error("paths", format!("invalid glob `{pattern}`: {err}"))
                    .hint("use `*` within a folder and `**` across folders"),
            ),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Arc::new(Load { config, patterns }))
}

impl Pattern {
    fn new(pattern: &str) -> Result<Pattern, globset::Error> {
        let is_glob = |s: &str| s.contains(['*', '?', '[', '{']);
        if !is_glob(pattern) {
            return Ok(Pattern {
                base: PathBuf::from(pattern),
                matcher: None,
                folders: None,
            });
        }
        let glob = |text: &str| {
            globset::GlobBuilder::new(text)
                .literal_separator(true)
                .build()
                .map(|g| g.compile_matcher())
        };
        // Walk from the longest folder prefix without glob characters.
        let parts: Vec<&str> = pattern.split('/').collect();
        let literal = parts.iter().take_while(|part| !is_glob(part)).count();
        let mut base = PathBuf::new();
        for part in &parts[..literal] {
            base.push(if part.is_empty() { "/" } else { part });
        }
        let matcher = glob(pattern)?;
        // The folder parts after the base (all but the file name), one by one, unless a part
        // can span folders: `**`, or a `/` inside `{…}` or `[…]`, where splitting at `/`
        // would cut an alternative in two. `below` is never empty: some part is a glob.
        let below = &parts[literal..];
        let folders = if below.iter().any(|part| part.contains("**")) || slash_in_group(pattern) {
            None
        } else {
            let folders = &below[..below.len() - 1];
            Some(
                folders
                    .iter()
                    .map(|part| glob(part))
                    .collect::<Result<_, _>>()?,
            )
        };
        Ok(Pattern {
            base: if base.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                base
            },
            matcher: Some(matcher),
            folders,
        })
    }

    /// Matching files as (path to read, path relative to the base), sorted.
    fn files(&self) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        if self.base.is_file() && self.matcher.is_none() {
            let name = self
                .base
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((self.base.clone(), name));
            return out;
        }
        let matches = |path: &Path| {
            self.matcher
                .as_ref()
                .is_none_or(|m| m.is_match(path.strip_prefix("./").unwrap_or(path)))
        };
        if self.folders.is_some() {
            for (folder, relative) in self.match_folders() {
                for (path, name, kind) in sorted_entries(&folder) {
                    if kind.is_some_and(|k| k.is_file()) && matches(&path) {
                        out.push((path, format!("{relative}{}", name.to_string_lossy())));
                    }
                }
            }
            return out;
        }
        let walk = walkdir::WalkDir::new(&self.base)
            .follow_links(true)
            .sort_by_file_name();
        for entry in walk.into_iter().filter_map(Result::ok) {
            let path = entry.path();
            if entry.file_type().is_file() && matches(path) {
                let relative = path
                    .strip_prefix(&self.base)
                    .unwrap_or(path)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((path.to_path_buf(), relative));
            }
        }
        out
    }

    /// With [`Pattern::folders`], the folders that can hold a match, as (path, path relative
    /// to the base with a trailing `/`), sorted. Found level by level, reading only folders
    /// whose names match their level (a walk that prunes as it goes still lists every folder
    /// it skips: `docs/f00[0-2]/*.md` read all 200 folders of `docs`).
    fn match_folders(&self) -> Vec<(PathBuf, String)> {
        let mut folders = vec![(self.base.clone(), String::new())];
        for level in self.folders.iter().flatten() {
            let mut next = Vec::new();
            for (folder, relative) in &folders {
                for (path, name, kind) in sorted_entries(folder) {
                    if kind.is_some_and(|k| k.is_dir()) && level.is_match(&name) {
                        let relative = format!("{relative}{}/", name.to_string_lossy());
                        next.push((path, relative));
                    }
                }
            }
            folders = next;
        }
        folders
    }
}

/// A folder's entries as (path, name, type with symbolic links followed), sorted by name.
/// An unreadable folder or entry is skipped, as in the walk.
fn sorted_entries(folder: &Path) -> Vec<(PathBuf, std::ffi::OsString, Option<std::fs::FileType>)> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut entries: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|entry| {
            let path = entry.path();
            let kind = match entry.file_type() {
                Ok(kind) if kind.is_symlink() => {
                    std::fs::metadata(&path).ok().map(|m| m.file_type())
                }
                kind => kind.ok(),
            };
            (path, entry.file_name(), kind)
        })
        .collect();
    entries.sort_by(|a, b| a.1.cmp(&b.1));
    entries
}

/// Why a file is not a document, or its text.
fn read_document(path: &Path, max_bytes: u64) -> Result<(String, String), String> {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if !EXTENSIONS.contains(&extension.as_str()) {
        return Err("not a .md, .markdown or .txt file".to_owned());
    }
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size > max_bytes {
        return Err(format!(
            "{size} bytes is over the limit of {max_bytes} (raise `max_bytes` to load it)"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    if memchr::memchr(0, &bytes[..bytes.len().min(8192)]).is_some() {
        return Err("binary file (it contains NUL bytes)".to_owned());
    }
    let digest = blake3::hash(&bytes).to_hex().to_string();
    let mut text = String::from_utf8(bytes)
        .map_err(|e| format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()))?;
    // The bytes read become the text: copied only when there is something to take out.
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    if text.contains('\r') {
        text = text.replace("\r\n", "\n");
    }
    if text.trim().is_empty() {
        return Err("empty file".to_owned());
    }
    Ok((text, digest))
}

/// Whether a `/` sits inside a `{…}` or `[…]` group of a glob.
fn slash_in_group(pattern: &str) -> bool {
    let (mut braces, mut class) = (0usize, false);
    for c in pattern.chars() {
        match c {
            '[' if !class => class = true,
            ']' if class => class = false,
            '{' if !class => braces += 1,
            '}' if !class => braces = braces.saturating_sub(1),
            '/' if class || braces > 0 => return true,
            _ => {}
        }
    }
    false
}

impl Load {
    fn index_key(&self) -> blake3::Hash {
        let cwd = std::env::current_dir().unwrap_or_default();
        FileIndexKey {
            key_version: MEMO_KEY_VERSION,
            settings: &self.settings(),
            cwd: &cwd.display().to_string(),
        }
        .digest()
    }
}

fn read_index(cx: &StageContext<'_>, key: &blake3::Hash) -> FileIndex {
    cx.shared
        .store
        .get(FILE_INDEX_BUCKET, key)
        .ok()
        .flatten()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

impl Stage for Load {
    fn partition(&self) -> super::Partition {
        super::Partition::Source
    }

    fn settings(&self) -> Json {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        _input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>> {
        async move {
            let mut reading = Reading::new(self, cx);
            let mut records = Vec::new();
            while let Some(listed) = reading.next() {
                if let Listed::Read { record, .. } = listed {
                    records.push(record);
                }
            }
            Box::new(reading).finish()?;
            Ok(records)
        }
        .boxed()
    }

    fn list<'a>(&'a self, cx: StageContext<'a>) -> Option<Box<dyn Listing + 'a>> {
        Some(Box::new(Reading::new(self, cx)))
    }
}

/// The files the patterns match, read one at a time (see [`Listing`]).
struct Reading<'a> {
    load: &'a Load,
    cx: StageContext<'a>,
    /// (path relative to its pattern's base, file), in order.
    files: std::collections::btree_map::IntoIter<String, PathBuf>,
    found: usize,
    /// With `skip`, documents the runner already has results for are listed by digest only,
    /// and unchanged files are not even read (see [`FileIndex`]).
    index_key: Option<blake3::Hash>,
    index: FileIndex,
    next_index: FileIndex,
    /// Every document read or kept: relative path → digest.
    documents: BTreeMap<String, String>,
}

impl<'a> Reading<'a> {
    fn new(load: &'a Load, cx: StageContext<'a>) -> Self {
        // Relative path → file, first pattern wins; BTreeMap keeps the order stable.
        let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
        for (pattern, source) in load.patterns.iter().zip(&load.config.paths) {
            let files = pattern.files();
            if files.is_empty() {
                cx.stats.note(format!("`{source}` matched no files"));
            }
            for (path, relative) in files {
                found.entry(relative).or_insert(path);
            }
        }
        let index_key = cx.skip.map(|_| load.index_key());
        let index = match &index_key {
            Some(key) => read_index(&cx, key),
            None => FileIndex::default(),
        };
        Reading {
            load,
            cx,
            found: found.len(),
            files: found.into_iter(),
            index_key,
            index,
            next_index: FileIndex::default(),
            documents: BTreeMap::new(),
        }
    }
}

impl Listing for Reading<'_> {
    fn found(&self) -> usize {
        self.found
    }

    fn next(&mut self) -> Option<Listed> {
        let cx = &self.cx;
        let (relative, path) = self.files.next()?;
        StageStats::add(&cx.stats.items, 1);
        let shown = path.display().to_string();
        let facts = FileFacts::stat(&path).ok();
        if let (Some(skip), Some(facts), Some(known)) =
            (cx.skip, &facts, self.index.files.get(&shown))
            && known.same_file(facts)
            && skip(&relative, &known.digest)
        {
            self.documents
                .insert(relative.clone(), known.digest.clone());
            self.next_index.files.insert(shown, known.clone());
            return Some(Listed::Kept {
                source: relative,
                digest: known.digest.clone(),
            });
        }
        match read_document(&path, self.load.config.max_bytes) {
            Ok((text, digest)) => {
                if let Some(mut facts) = facts {
                    facts.digest = digest.clone();
                    if facts.settled() {
                        self.next_index.files.insert(shown, facts);
                    }
                }
                self.documents.insert(relative.clone(), digest.clone());
                if cx.skip.is_some_and(|skip| skip(&relative, &digest)) {
                    return Some(Listed::Kept {
                        source: relative,
                        digest,
                    });
                }
                let mut data = Map::new();
                data.insert("path".into(), json!(relative));
                data.insert("text".into(), Json::String(text));
                Some(Listed::Read {
                    record: Record::new(data, Lineage::document(&relative)),
                    digest,
                })
            }
            Err(reason) => {
                StageStats::add(&cx.stats.skipped, 1);
                cx.stats
                    .note(format!("skipped {}: {reason}", path.display()));
                Some(Listed::Passed)
            }
        }
    }

    fn finish(mut self: Box<Self>) -> Result<(), StageError> {
        // A run stopped before the last file: the files it did not reach keep what the index
        // knew of them, so the next run does not read them all again.
        for (_, path) in self.files.by_ref() {
            let shown = path.display().to_string();
            if let Some(known) = self.index.files.get(&shown) {
                self.next_index.files.insert(shown, known.clone());
            }
        }
        let cx = &self.cx;
        if let Some(key) = &self.index_key
            && cx.shared.mode == Mode::Run
            && self.next_index != self.index
            && let Ok(bytes) = serde_json::to_vec(&self.next_index)
        {
            // Best effort: without it the next run reads every file again.
            let _ = cx.shared.store.put(FILE_INDEX_BUCKET, key, &bytes);
        }
        if self.documents.is_empty() {
            return Err(StageError::Message(format!(
                "no documents to load from {}",
                self.load
                    .config
                    .paths
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        lock(&cx.shared.documents).extend(self.documents);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_of(pattern: &str) -> Load {
        Load {
            config: LoadConfig {
                paths: vec![pattern.to_owned()],
                max_bytes: default_max_bytes(),
            },
            patterns: vec![Pattern::new(pattern).unwrap()],
        }
    }

    /// What a stage context borrows, for listings run outside a run.
    struct Borrowed {
        shared: crate::stage::RunShared,
        stats: StageStats,
    }

    impl Borrowed {
        fn new(cache: &Path) -> Self {
            Borrowed {
                shared: crate::stage::RunShared::for_tests(cache),
                stats: StageStats::default(),
            }
        }

        fn cx<'a>(&'a self, skip: Option<&'a crate::stage::SkipDocument<'a>>) -> StageContext<'a> {
            StageContext {
                skip,
                ..StageContext::for_tests("docs", &self.shared, &self.stats)
            }
        }
    }

    #[test]
    fn a_listing_reads_each_file_when_it_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let docs = dir.path().join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        for name in ["a.md", "b.md", "c.md"] {
            std::fs::write(docs.join(name), format!("# {name}\nfirst\n")).unwrap();
        }
        std::fs::write(docs.join("bin.md"), b"x\0y").unwrap();
        let load = load_of(&format!("{}/*.md", docs.display()));
        let borrowed = Borrowed::new(&dir.path().join("cache"));
        let mut listing = load.list(borrowed.cx(None)).unwrap();
        assert_eq!(listing.found(), 4);
        let text = |listed: Option<Listed>| match listed {
            Some(Listed::Read { record, .. }) => record.str_field("text").unwrap().to_owned(),
            _ => panic!("expected a document"),
        };
        assert_eq!(text(listing.next()), "# a.md\nfirst\n");
        // Files not yet taken are not yet read: an edit made now is what the run gets.
        std::fs::write(docs.join("c.md"), "# c.md\nsecond\n").unwrap();
        assert_eq!(text(listing.next()), "# b.md\nfirst\n");
        assert!(matches!(listing.next(), Some(Listed::Passed)));
        assert_eq!(text(listing.next()), "# c.md\nsecond\n");
        assert!(listing.next().is_none());
        listing.finish().unwrap();
        assert_eq!(borrowed.shared.documents.lock().unwrap().len(), 3);
        assert_eq!(StageStats::get(&borrowed.stats.skipped), 1);
    }

    #[test]
    fn a_listing_stopped_early_keeps_the_index_of_the_files_it_did_not_reach() {
        let dir = tempfile::tempdir().unwrap();
        let docs = dir.path().join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for name in ["a.md", "b.md", "c.md", "d.md"] {
            let path = docs.join(name);
            std::fs::write(&path, format!("# {name}\n")).unwrap();
            // Settled, so the index remembers them.
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(an_hour_ago)
                .unwrap();
        }
        let load = load_of(&format!("{}/*.md", docs.display()));
        let borrowed = Borrowed::new(&dir.path().join("cache"));
        let keep_all = |_: &str, _: &str| true;
        let cx = || borrowed.cx(Some(&keep_all));
        let indexed = || read_index(&cx(), &load.index_key()).files.len();
        // A whole run: every file is read once and indexed.
        let mut listing = load.list(cx()).unwrap();
        while listing.next().is_some() {}
        listing.finish().unwrap();
        assert_eq!(indexed(), 4);
        // A run stopped after the first file: the other three stay indexed.
        let mut listing = load.list(cx()).unwrap();
        assert!(matches!(listing.next(), Some(Listed::Kept { .. })));
        listing.finish().unwrap();
        assert_eq!(indexed(), 4);
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ok.md"), "\u{feff}# Title\r\nbody\r\n").unwrap();
        std::fs::write(p("empty.md"), "  \n").unwrap();
        std::fs::write(p("bin.txt"), b"ab\0cd").unwrap();
        std::fs::write(p("latin1.txt"), b"caf\xe9").unwrap();
        std::fs::write(p("big.md"), "x".repeat(100)).unwrap();
        std::fs::write(p("doc.pdf"), "%PDF").unwrap();
        assert_eq!(read_document(&p("ok.md"), 50).unwrap().0, "# Title\nbody\n");
        assert_eq!(read_document(&p("empty.md"), 50).unwrap_err(), "empty file");
        assert!(
            read_document(&p("bin.txt"), 50)
                .unwrap_err()
                .starts_with("binary")
        );
        assert_eq!(
            read_document(&p("latin1.txt"), 50).unwrap_err(),
            "not valid UTF-8 (at byte 3)"
        );
        assert!(
            read_document(&p("big.md"), 50)
                .unwrap_err()
                .contains("raise `max_bytes`")
        );
        assert!(
            read_document(&p("doc.pdf"), 50)
                .unwrap_err()
                .starts_with("not a .md")
        );
    }

    #[test]
    fn globs_walk_from_their_literal_prefix_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("docs");
        std::fs::create_dir_all(root.join("b/c")).unwrap();
        for f in ["z.md", "a.md", "b/c/d.md", "b/x.txt"] {
            std::fs::write(root.join(f), "x").unwrap();
        }
        let pattern = Pattern::new(&format!("{}/**/*.md", root.display())).unwrap();
        let found: Vec<String> = pattern.files().into_iter().map(|(_, r)| r).collect();
        assert_eq!(found, ["a.md", "b/c/d.md", "z.md"]);
        let folder = Pattern::new(&root.display().to_string()).unwrap();
        let found: Vec<String> = folder.files().into_iter().map(|(_, r)| r).collect();
        assert_eq!(found, ["a.md", "b/c/d.md", "b/x.txt", "z.md"]);
    }

    #[test]
    fn globs_without_double_star_enter_only_folders_that_can_hold_a_match() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("docs");
        for f in [
            "top.md", "a/x.md", "b/y.md", "c/z.md", "c/d/w.md", "ab/v.md",
        ] {
            let path = root.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        let files = |glob: &str| -> Vec<String> {
            let pattern = Pattern::new(&format!("{}/{glob}", root.display())).unwrap();
            pattern.files().into_iter().map(|(_, r)| r).collect()
        };
        assert_eq!(files("{a,c}/*.md"), ["a/x.md", "c/z.md"]);
        assert_eq!(files("*.md"), ["top.md"]);
        assert_eq!(files("a*/*.md"), ["a/x.md", "ab/v.md"]);
        assert_eq!(files("*/d/*.md"), ["c/d/w.md"]);
        assert_eq!(files("{a/x,c/d/w}.md"), ["a/x.md", "c/d/w.md"]);
        assert_eq!(files("**/w.md"), ["c/d/w.md"]);

        // The folders read for files: those a match can lie in, and no other.
        let read = |glob: &str| -> Option<Vec<String>> {
            let pattern = Pattern::new(&format!("{}/{glob}", root.display())).unwrap();
            pattern.folders.as_ref()?;
            Some(
                pattern
                    .match_folders()
                    .into_iter()
                    .map(|(_, r)| r)
                    .collect(),
            )
        };
        assert_eq!(read("{a,c}/*.md").unwrap(), ["a/", "c/"]);
        assert_eq!(read("[ab]/*.md").unwrap(), ["a/", "b/"]);
        assert_eq!(read("*.md").unwrap(), [""]);
        assert_eq!(read("*/d/*.md").unwrap(), ["c/d/"]);
        // Links are followed, to folders and to files, as in the walk with `**`.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.join("a"), root.join("linked")).unwrap();
            std::os::unix::fs::symlink(root.join("top.md"), root.join("c/top-link.md")).unwrap();
            assert_eq!(files("l*/*.md"), ["linked/x.md"]);
            assert_eq!(files("[c]/*.md"), ["c/top-link.md", "c/z.md"]);
        }
        for glob in ["**/*.md", "{a/x,b}.md", "[a/]/*.md"] {
            assert_eq!(read(glob), None, "{glob}");
        }
    }
}
