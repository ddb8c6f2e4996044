//! `export`: write one JSONL file per split (`train.jsonl` …) in a trainer format, plus
//! `rejects.jsonl` and `manifest.json`. Rows stream to temp files beside the outputs, which
//! are renamed into place together once all are written, so none is ever half-written and an
//! error leaves last run's files as they were; rows are in lineage order, so files are
//! byte-identical across runs whatever order LLM calls finished in.

use std::borrow::Cow;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::BoxFuture;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{
    BuildContext, Kind, Mode, Reject, Stage, StageContext, StageError, StageStats, Streamed,
    template_context,
};
use crate::config::Diagnostic;
use crate::lock;
use crate::record::{Record, write_json_str};
use crate::template::{Expression, Template, Templates};

pub const KIND: Kind = Kind {
    name: "export",
    about: "write JSONL per split (prompt-completion or chat) with a manifest",
    takes_inputs: true,
    build,
    schema: |g| g.subschema_for::<ExportConfig>(),
};

/// Settings of an `export` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Output folder, relative to the working directory.
    pub dir: String,
    #[serde(default)]
    pub format: Format,
    /// Expression for the prompt (user turn), evaluated on each record: a field name such as
    /// `question`, or e.g. `"Q: " ~ question`.
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// Expression for the completion (assistant turn).
    #[serde(default = "default_completion")]
    pub completion: String,
    /// With `format: chat`, an optional system message (an inline template).
    #[serde(default)]
    pub system: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `{"prompt": …, "completion": …}` — TRL, Axolotl, MLX-LM.
    #[default]
    PromptCompletion,
    /// `{"messages": [{"role": …, "content": …}, …]}` — TRL, Axolotl, Unsloth, MLX-LM.
    Chat,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::PromptCompletion => "prompt-completion",
            Format::Chat => "chat",
        }
    }
}

fn default_prompt() -> String {
    "prompt".to_owned()
}
fn default_completion() -> String {
    "completion".to_owned()
}

pub struct Export {
    config: ExportConfig,
    templates: Arc<Templates>,
    template_name: String,
}

fn build(cx: &BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
    let config: ExportConfig = cx.settings()?;
    let mut errors = Vec::new();
    for field in ["prompt", "completion"] {
        let expr = if field == "prompt" {
            &config.prompt
        } else {
            &config.completion
        };
        if let Err(err) = cx.templates.check_expression(expr) {
            errors.push(cx.error(field, format!("invalid expression: {}", err.message)));
        }
    }
    let template_name = format!("{}#{}.system", cx.file.path.display(), cx.stage.name);
    if let Some(system) = &config.system {
        if config.format != Format::Chat {
            errors.push(
                cx.error("system", "`system` applies to `format: chat` only")
                    .hint("remove `system`, or set `format: chat`"),
            );
        }
        if let Err(err) = cx.templates.check_inline(&template_name, system) {
            errors.push(cx.error("system", err.message));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Arc::new(Export {
        config,
        templates: cx.templates.clone(),
        template_name,
    }))
}

/// The expressions and template of an export, compiled once per run.
struct Compiled<'a> {
    prompt: Expression<'a>,
    completion: Expression<'a>,
    system: Option<Template<'a>>,
}

impl Export {
    fn compile(&self) -> Result<Compiled<'_>, StageError> {
        Ok(Compiled {
            prompt: self.templates.expression(&self.config.prompt)?,
            completion: self.templates.expression(&self.config.completion)?,
            system: match &self.config.system {
                Some(source) => Some(self.templates.inline(&self.template_name, source)?),
                None => None,
            },
        })
    }

    /// Write one output row (a JSON line) into `line`, or say why the record cannot be one.
    fn row(
        &self,
        compiled: &Compiled,
        record: &mut Record,
        line: &mut Vec<u8>,
    ) -> Result<(), String> {
        line.clear();
        if compiled.system.is_none()
            && let (Some(prompt), Some(completion)) = (
                field_text(&compiled.prompt, &record.data),
                field_text(&compiled.completion, &record.data),
            )
        {
            // Both are fields the record has (`question`, `answer`): no template context.
            let prompt = non_blank(&compiled.prompt, prompt)?;
            let completion = non_blank(&compiled.completion, completion)?;
            self.write_row(line, &prompt, &completion, None);
            return Ok(());
        }
        template_context(record, &[], |data, context| {
            let prompt = text(&compiled.prompt, data, context)?;
            let completion = text(&compiled.completion, data, context)?;
            let system = match &compiled.system {
                Some(template) => Some(template.render(context).map_err(|e| e.message)?),
                None => None,
            };
            self.write_row(line, &prompt, &completion, system.as_deref());
            Ok(())
        })
    }

    /// A row as `serde_json` writes the objects of its format: `{"prompt":…,"completion":…}`
    /// or `{"messages":[{"role":…,"content":…},…]}`, then a newline.
    fn write_row(&self, line: &mut Vec<u8>, prompt: &str, completion: &str, system: Option<&str>) {
        match self.config.format {
            Format::PromptCompletion => {
                line.extend_from_slice(b"{\"prompt\":");
                write_json_str(prompt, line);
                line.extend_from_slice(b",\"completion\":");
                write_json_str(completion, line);
            }
            Format::Chat => {
                line.extend_from_slice(b"{\"messages\":[");
                if let Some(system) = system.map(str::trim)
                    && !system.is_empty()
                {
                    line.extend_from_slice(b"{\"role\":\"system\",\"content\":");
                    write_json_str(system, line);
                    line.extend_from_slice(b"},");
                }
                line.extend_from_slice(b"{\"role\":\"user\",\"content\":");
                write_json_str(prompt, line);
                line.extend_from_slice(b"},{\"role\":\"assistant\",\"content\":");
                write_json_str(completion, line);
                line.extend_from_slice(b"}]");
            }
        }
        line.extend_from_slice(b"}\n");
    }
}

/// The text of `expr` read straight from the record, when it is a bare field name the record
/// has; as minijinja would show the field's value.
fn field_text<'r>(
    expr: &Expression,
    data: &'r serde_json::Map<String, Json>,
) -> Option<Cow<'r, str>> {
    Some(match super::field(data, expr.field()?)? {
        Json::String(s) => Cow::Borrowed(s.as_str()),
        other => Cow::Owned(display(minijinja::Value::from(minijinja::value::Serde(
            other,
        )))),
    })
}

/// The text of `expr` for a record: a bare field name is read from the record's map, other
/// expressions are evaluated. Missing and `none` read as empty, and empty is an error.
fn text<'r>(
    expr: &Expression,
    data: &'r serde_json::Map<String, Json>,
    context: &minijinja::Value,
) -> Result<Cow<'r, str>, String> {
    let text = match field_text(expr, data) {
        Some(text) => text,
        None => Cow::Owned(display(expr.eval(context).map_err(|e| e.message)?)),
    };
    non_blank(expr, text)
}

fn non_blank<'r>(expr: &Expression, text: Cow<'r, str>) -> Result<Cow<'r, str>, String> {
    // Most texts start with a letter: only the others need the (Unicode) trim.
    let blank = match text.as_bytes().first() {
        Some(b) if b.is_ascii_graphic() => false,
        _ => text.trim().is_empty(),
    };
    if blank {
        Err(format!("`{}` is empty", expr.source()))
    } else {
        Ok(text)
    }
}

fn display(value: minijinja::Value) -> String {
    match value.as_str() {
        Some(s) => s.to_owned(),
        None if value.is_undefined() || value.is_none() => String::new(),
        None => value.to_string(),
    }
}

/// One output file being written: rows go through a buffer to a temp file beside `path`
/// (none in a plan), hashed on the way for the manifest.
struct Output {
    path: PathBuf,
    rows: usize,
    writer: BufWriter<Hashing>,
}

/// How many bytes of rows an output holds before it makes its temp file: a run stopped
/// before then (killed, interrupted, or failed) leaves no file behind, not even its folder.
const OUTPUT_BUFFER: usize = 256 * 1024;

struct Hashing {
    /// The folder of the temp file; `None` in a plan.
    dir: Option<PathBuf>,
    /// Made when the buffer first goes to it, or when the output is finished.
    file: Option<TempFile>,
    hasher: blake3::Hasher,
}

impl Hashing {
    /// The temp file, made now (and its folder) when it is due and not made yet.
    fn make_file(&mut self) -> std::io::Result<()> {
        if let (Some(dir), None) = (&self.dir, &self.file) {
            std::fs::create_dir_all(dir)?;
            self.file = Some(TempFile::new_in(dir)?);
        }
        Ok(())
    }
}

/// The temp files of the outputs being written, for [`remove_temp_files`]. A temp file is
/// listed when it is made, and taken off when it is renamed into place or removed.
static TEMP_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Whether another run's sweep removed this temp file between its making and its lock: it
/// has no name left.
#[cfg(unix)]
fn swept(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.nlink() == 0)
}

/// Elsewhere an open file does not tell how many names it has; it is taken as not swept.
#[cfg(not(unix))]
fn swept(_file: &std::fs::File) -> std::io::Result<bool> {
    Ok(false)
}

/// An output's temp file beside it, removed when dropped unless renamed into place, and
/// listed in [`TEMP_FILES`] until then.
struct TempFile(Option<tempfile::NamedTempFile>);

impl TempFile {
    /// Made locked, and held so until renamed or removed: the lock goes with the process,
    /// however it ends, so that a later run can tell what a killed one left
    /// ([`remove_stale_temp_files`]).
    fn new_in(dir: &Path) -> std::io::Result<TempFile> {
        loop {
            let file = tempfile::Builder::new()
                .prefix(TEMP_PREFIX)
                .tempfile_in(dir)?;
            // Where the file system has no locks, the file is written unlocked; no run can
            // take a lock there either, so none removes it.
            let _ = file.as_file().lock();
            if swept(file.as_file())? {
                continue;
            }
            listed().push(file.path().to_owned());
            return Ok(TempFile(Some(file)));
        }
    }

    fn file(&mut self) -> &mut tempfile::NamedTempFile {
        self.0
            .as_mut()
            .expect("a temp file is there until it is renamed")
    }

    /// Rename into place at `path`.
    fn persist(mut self, path: &Path) -> std::io::Result<()> {
        let file = self.0.take().expect("a temp file is renamed once");
        unlist(file.path());
        file.persist(path).map(|_| ()).map_err(|e| e.error)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(file) = &self.0 {
            unlist(file.path());
        }
    }
}

fn listed() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    lock(&TEMP_FILES)
}

fn unlist(path: &Path) {
    let mut listed = listed();
    if let Some(at) = listed.iter().position(|p| p == path) {
        listed.swap_remove(at);
    }
}

/// How the temp files of outputs being written begin.
const TEMP_PREFIX: &str = ".keg-tmp";

/// Remove the temp files that runs no longer going left in `dir`: a run killed with SIGKILL,
/// or stopped by a power cut, cannot remove its own. Each is told from one being written
/// now by its lock (see [`TempFile::new_in`]); a file this cannot lock or open is left.
/// Returns how many were removed.
fn remove_stale_temp_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let stale = entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(TEMP_PREFIX.as_bytes())
            && entry.file_type().is_ok_and(|t| t.is_file())
            && std::fs::File::open(entry.path()).is_ok_and(|file| file.try_lock().is_ok());
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Remove the stale temp files in `dir` ([`remove_stale_temp_files`]) and say so in `stats`.
fn sweep(dir: &Path, stats: &StageStats) {
    let removed = remove_stale_temp_files(dir);
    if removed > 0 {
        let files = if removed == 1 { "file" } else { "files" };
        stats.event(format!(
            "removed {removed} temp {files} left in {} by a run that was killed",
            dir.display()
        ));
    }
}

/// Remove the temp files of the outputs being written, for a process about to abort on a
/// panic: release builds do not unwind (`Cargo.toml`), so no temp file is dropped and each
/// would stay in its output folder. Does nothing when the list is held (a panic while a temp
/// file is made or let go). The outputs themselves are renamed into place only when whole,
/// so last run's files stay as they were.
pub fn remove_temp_files() {
    remove_listed(|_| true);
}

/// Remove the listed temp files that `chosen` picks (all of them, but for tests).
fn remove_listed(chosen: impl Fn(&Path) -> bool) {
    let Ok(listed) = TEMP_FILES.try_lock() else {
        return;
    };
    for path in listed.iter().filter(|p| chosen(p)) {
        let _ = std::fs::remove_file(path);
    }
}

/// Bytes reach no file before [`Output`] makes it: a plan's, and those of an output
/// dropped unfinished.
impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = match &mut self.file {
            Some(temp) => temp.file().write(buf)?,
            None => buf.len(),
        };
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(temp) => temp.file().flush(),
            None => Ok(()),
        }
    }
}

/// A written output, waiting to be renamed into place.
struct Finished {
    path: PathBuf,
    rows: usize,
    digest: blake3::Hash,
    temp: Option<TempFile>,
}

impl Output {
    /// `write: false` (a plan) counts and hashes rows but creates no file. The temp file is
    /// made once [`OUTPUT_BUFFER`] bytes of rows are waiting, or when the output finishes.
    fn create(path: PathBuf, write: bool) -> Output {
        let dir = write.then(|| path.parent().unwrap_or(Path::new(".")).to_owned());
        let hashing = Hashing {
            dir,
            file: None,
            hasher: blake3::Hasher::new(),
        };
        Output {
            path,
            rows: 0,
            writer: BufWriter::with_capacity(OUTPUT_BUFFER, hashing),
        }
    }

    /// Makes the temp file, naming its folder when that fails.
    fn make_file(&mut self) -> Result<(), StageError> {
        let hashing = self.writer.get_mut();
        hashing.make_file().map_err(|e| {
            let dir = hashing.dir.as_deref().unwrap_or(Path::new("."));
            StageError::io(dir, e)
        })
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), StageError> {
        if bytes.len() >= self.writer.capacity() - self.writer.buffer().len() {
            // The buffer (or the bytes, when as long as it) may go to the file now.
            self.make_file()?;
        }
        self.writer
            .write_all(bytes)
            .map_err(|e| StageError::io(&self.path, e))
    }

    fn finish(mut self) -> Result<Finished, StageError> {
        self.make_file()?;
        let Output { path, rows, writer } = self;
        let hashing = writer
            .into_inner()
            .map_err(|e| StageError::io(&path, e.into_error()))?;
        let temp = match hashing.file {
            Some(mut temp) => {
                temp.file()
                    .as_file()
                    .sync_all()
                    .map_err(|e| StageError::io(&path, e))?;
                // Temp files are private (0600); outputs are ordinary files others may read.
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(
                        temp.file().path(),
                        std::fs::Permissions::from_mode(0o644),
                    )
                    .map_err(|e| StageError::io(&path, e))?;
                }
                Some(temp)
            }
            None => None,
        };
        Ok(Finished {
            path,
            rows,
            digest: hashing.hasher.finalize(),
            temp,
        })
    }
}

/// Rename every written output into place; returns each path with its row count. A folder
/// where a file should go is the one failure renaming is likely to meet, so it is checked
/// before anything is renamed. Temp files not renamed are removed when dropped.
fn commit(outputs: Vec<Finished>) -> Result<Vec<(PathBuf, usize)>, StageError> {
    for output in &outputs {
        if output.path.is_dir() {
            return Err(StageError::io(
                &output.path,
                std::io::ErrorKind::IsADirectory.into(),
            ));
        }
    }
    let mut written = Vec::with_capacity(outputs.len());
    for output in outputs {
        if let Some(temp) = output.temp {
            temp.persist(&output.path)
                .map_err(|e| StageError::io(&output.path, e))?;
            written.push((output.path, output.rows));
        }
    }
    let mut folders: Vec<&Path> = written.iter().filter_map(|(p, _)| p.parent()).collect();
    folders.sort_unstable();
    folders.dedup();
    for folder in folders {
        sync_folder(folder).map_err(|e| StageError::io(folder, e))?;
    }
    Ok(written)
}

/// Make the renames into `folder` last: each file's bytes were synced before its rename,
/// but until its folder is, a power cut may bring back the file it replaced, and a run that
/// reported success would have left last run's outputs. A folder this process may write in
/// but not read cannot be opened to sync it, and a file system that cannot sync a folder
/// says so with `EINVAL`: both are left as the renames left them, with no error.
#[cfg(unix)]
fn sync_folder(folder: &Path) -> std::io::Result<()> {
    let folder = if folder.as_os_str().is_empty() {
        Path::new(".")
    } else {
        folder
    };
    let Ok(handle) = std::fs::File::open(folder) else {
        return Ok(());
    };
    match handle.sync_all() {
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        done => done,
    }
}

/// Elsewhere (Windows) a folder cannot be opened as a file to sync it; the renames are left
/// to the file system.
#[cfg(not(unix))]
fn sync_folder(_folder: &Path) -> std::io::Result<()> {
    Ok(())
}

impl Stage for Export {
    fn settings(&self) -> Json {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>> {
        async move {
            let mut streaming = Box::new(self.streaming(cx));
            let output = streaming.push(input)?;
            streaming.finish()?;
            Ok(output)
        }
        .boxed()
    }

    fn stream<'a>(&'a self, cx: StageContext<'a>) -> Option<Box<dyn Streamed + 'a>> {
        Some(Box::new(self.streaming(cx)))
    }

    fn unchanged(&self, stats: &StageStats) {
        sweep(Path::new(&self.config.dir), stats);
    }
}

impl Export {
    fn streaming<'a>(&'a self, cx: StageContext<'a>) -> Streaming<'a> {
        Streaming {
            stage: self,
            write: cx.shared.mode == Mode::Run,
            cx,
            open: None,
            line: Vec::new(),
            last: None,
        }
    }
}

/// Export fed document by document: rows go to their files as they come; rejects and the
/// manifest are written at the end, then every file is renamed into place.
struct Streaming<'a> {
    stage: &'a Export,
    cx: StageContext<'a>,
    /// False in a plan: rows are counted and hashed, no file is made.
    write: bool,
    /// Made when the first records (or the end) arrive.
    open: Option<Open<'a>>,
    line: Vec<u8>,
    /// The split of the last row and its file's index: records of a split come in runs.
    last: Option<(Arc<str>, usize)>,
}

struct Open<'a> {
    compiled: Compiled<'a>,
    /// Split name → its file, in the order the splits were declared (train, valid, test).
    files: IndexMap<String, Output>,
}

impl<'a> Streaming<'a> {
    fn output(&self, name: &str) -> Output {
        let dir = Path::new(&self.stage.config.dir);
        Output::create(dir.join(format!("{name}.jsonl")), self.write)
    }

    fn open(&mut self) -> Result<&mut Open<'a>, StageError> {
        if self.open.is_none() {
            let compiled = self.stage.compile()?;
            if self.write {
                sweep(Path::new(&self.stage.config.dir), self.cx.stats);
            }
            // Every split named upstream gets a file, even an empty one, so that a split
            // that emptied out does not leave last run's file behind.
            let mut files = IndexMap::new();
            for name in self.cx.splits.unwrap_or_default() {
                files.insert(name.clone(), self.output(name));
            }
            self.open = Some(Open { compiled, files });
        }
        Ok(self.open.as_mut().expect("opened above"))
    }
}

impl Streamed for Streaming<'_> {
    fn push(&mut self, mut records: Vec<Record>) -> Result<Vec<Record>, StageError> {
        StageStats::add(&self.cx.stats.items, records.len() as u64);
        if !super::in_lineage_order(&records) {
            records.sort_by(crate::record::by_lineage);
        }
        self.open()?;
        for record in &mut records {
            let open = self.open.as_mut().expect("opened above");
            match self.stage.row(&open.compiled, record, &mut self.line) {
                Ok(()) => {
                    let split: &str = record.split.as_deref().unwrap_or("data");
                    let index = match &self.last {
                        Some((name, index)) if **name == *split => *index,
                        _ => {
                            let index = match open.files.get_index_of(split) {
                                Some(index) => index,
                                None => {
                                    let output = self.output(split);
                                    let open = self.open.as_mut().expect("opened above");
                                    open.files.insert_full(split.to_owned(), output).0
                                }
                            };
                            self.last = Some((Arc::from(split), index));
                            index
                        }
                    };
                    let open = self.open.as_mut().expect("opened above");
                    let output = &mut open.files[index];
                    output.push(&self.line)?;
                    output.rows += 1;
                }
                Err(reason) => self.cx.reject(&record.lineage, "empty_field", reason, None),
            }
        }
        Ok(records)
    }

    fn finish(mut self: Box<Self>) -> Result<(), StageError> {
        self.open()?;
        let Streaming {
            stage,
            cx,
            write,
            open,
            mut line,
            ..
        } = *self;
        let Some(Open { files, .. }) = open else {
            return Ok(());
        };
        let dir = Path::new(&stage.config.dir);
        let mut rejects: Vec<Reject> = lock(&cx.shared.rejects)
            .iter()
            .filter(|r| r.stage == cx.name || cx.ancestors.contains(&r.stage))
            .cloned()
            .collect();
        rejects.sort_by(|a, b| (&a.order, &a.stage).cmp(&(&b.order, &b.stage)));
        let mut rejects_file = Output::create(dir.join("rejects.jsonl"), write);
        for reject in &rejects {
            line.clear();
            serde_json::to_writer(&mut line, reject)
                .map_err(|e| StageError::Message(e.to_string()))?;
            line.push(b'\n');
            rejects_file.push(&line)?;
        }
        rejects_file.rows = rejects.len();

        let mut finished = Vec::with_capacity(files.len() + 2);
        let mut splits = serde_json::Map::new();
        for (name, output) in files {
            let output = output.finish()?;
            splits.insert(
                name.clone(),
                json!({
                    "file": format!("{name}.jsonl"),
                    "rows": output.rows,
                    "blake3": output.digest.to_hex().as_str(),
                }),
            );
            finished.push(output);
        }
        finished.push(rejects_file.finish()?);

        let documents = lock(&cx.shared.documents).clone();
        let manifest = json!({
            "version": 1,
            "pipeline": cx.shared.pipeline_name,
            "pipeline_hash": cx.shared.pipeline_hash,
            "format": stage.config.format.name(),
            "models": cx.shared.models,
            "splits": splits,
            "rejects": rejects.len(),
            "usage": *lock(&cx.shared.usage),
            "documents": documents,
        });
        if !write {
            return Ok(());
        }
        let mut manifest_bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|e| StageError::Message(e.to_string()))?;
        manifest_bytes.push(b'\n');
        let mut manifest_file = Output::create(dir.join("manifest.json"), write);
        manifest_file.push(&manifest_bytes)?;
        finished.push(manifest_file.finish()?);

        let written = commit(finished)?;
        lock(&cx.stats.files).extend(written);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Lineage;

    #[test]
    fn a_bare_field_reads_as_its_expression_would() {
        let templates = Templates::new(Vec::new());
        let data = json!({
            "question": "What is keg?",
            "n": 42,
            "x": 1.5,
            "yes": true,
            "nothing": null,
            "list": [1, "two", {"three": 3}],
            "map": {"b": 1, "a": [true]},
            "blank": "  ",
        });
        let Json::Object(data) = data else {
            unreachable!()
        };
        // What expressions saw before fields were read directly: the whole map, converted.
        let full = minijinja::Value::from(minijinja::value::Serde(&data));
        let mut record = Record::new(data.clone(), Lineage::document("a.md"));
        for name in data.keys().map(String::as_str).chain(["missing", "range"]) {
            let expr = templates.expression(name).unwrap();
            if data.contains_key(name) {
                assert_eq!(expr.field(), Some(name));
            }
            let direct = template_context(&mut record, &[], |data, context| {
                text(&expr, data, context).map(Cow::into_owned)
            });
            let evaluated = expr.eval(&full).map_err(|e| e.message).and_then(|value| {
                let text = display(value);
                match text.trim().is_empty() {
                    true => Err(format!("`{name}` is empty")),
                    false => Ok(text),
                }
            });
            assert_eq!(direct, evaluated, "{name}");
        }
        assert_eq!(record.data, data, "the record is given back whole");
    }

    #[test]
    fn rows_are_the_json_they_were_built_as_before() {
        let export = |format, prompt: &str, system: Option<&str>| Export {
            config: ExportConfig {
                dir: "out".into(),
                format,
                prompt: prompt.into(),
                completion: "answer".into(),
                system: system.map(str::to_owned),
            },
            templates: Templates::new(Vec::new()),
            template_name: "p.yaml#dataset.system".into(),
        };
        let Json::Object(data) = json!({
            "question": "Say \"hi\"\n\t<b>é</b> \u{1}",
            "answer": 42,
        }) else {
            unreachable!()
        };
        let mut record = Record::new(data, Lineage::document("a.md"));
        let cases = [
            (
                export(Format::PromptCompletion, "question", None),
                json!({"prompt": "Say \"hi\"\n\t<b>é</b> \u{1}", "completion": "42"}),
            ),
            (
                export(Format::PromptCompletion, "'Q: ' ~ question", None),
                json!({"prompt": "Q: Say \"hi\"\n\t<b>é</b> \u{1}", "completion": "42"}),
            ),
            (
                export(
                    Format::Chat,
                    "question",
                    Some("  Be brief about {{ answer }}. "),
                ),
                json!({"messages": [
                    {"role": "system", "content": "Be brief about 42."},
                    {"role": "user", "content": "Say \"hi\"\n\t<b>é</b> \u{1}"},
                    {"role": "assistant", "content": "42"},
                ]}),
            ),
            (
                export(Format::Chat, "question", Some(" ")),
                json!({"messages": [
                    {"role": "user", "content": "Say \"hi\"\n\t<b>é</b> \u{1}"},
                    {"role": "assistant", "content": "42"},
                ]}),
            ),
        ];
        let mut line = b"left over".to_vec();
        for (export, expected) in cases {
            let compiled = export.compile().unwrap();
            export.row(&compiled, &mut record, &mut line).unwrap();
            let mut want = serde_json::to_vec(&expected).unwrap();
            want.push(b'\n');
            assert_eq!(
                String::from_utf8_lossy(&line),
                String::from_utf8_lossy(&want)
            );
        }
        let empty = export(Format::PromptCompletion, "missing", None);
        let compiled = empty.compile().unwrap();
        assert_eq!(
            empty.row(&compiled, &mut record, &mut line),
            Err("`missing` is empty".to_owned())
        );
    }

    #[test]
    fn only_plain_names_are_read_directly() {
        let templates = Templates::new(Vec::new());
        for source in ["question", " answer ", "_x1"] {
            assert!(
                templates.expression(source).unwrap().field().is_some(),
                "{source}"
            );
        }
        for source in ["true", "none", "a.b", "a ~ b", "'q'", "x | upper", "1"] {
            assert!(
                templates.expression(source).unwrap().field().is_none(),
                "{source}"
            );
        }
    }

    fn write_all(dir: &Path, files: &[(&str, &str)]) -> Result<Vec<(PathBuf, usize)>, StageError> {
        let mut finished = Vec::new();
        for (name, content) in files {
            let mut output = Output::create(dir.join(name), true);
            output.push(content.as_bytes())?;
            output.rows = 1;
            finished.push(output.finish()?);
        }
        commit(finished)
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn outputs_are_renamed_into_place_with_their_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut output = Output::create(dir.path().join("train.jsonl"), true);
        output.push(b"{\"a\":1}\n").unwrap();
        output.push(b"{\"a\":2}\n").unwrap();
        let finished = output.finish().unwrap();
        assert_eq!(finished.digest, blake3::hash(b"{\"a\":1}\n{\"a\":2}\n"));
        // Nothing is in place before the commit.
        assert!(!dir.path().join("train.jsonl").exists());
        commit(vec![finished]).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("train.jsonl")).unwrap(),
            b"{\"a\":1}\n{\"a\":2}\n"
        );
        assert_eq!(listing(dir.path()), ["train.jsonl"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("train.jsonl"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o644);
        }
    }

    #[test]
    fn temp_files_are_locked_while_written_and_only_unlocked_ones_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        // What a killed run leaves: a temp file no process holds.
        std::fs::write(out.join(".keg-tmpKILLED"), b"half a row").unwrap();
        // A temp file another run is writing now.
        let mut live = Output::create(out.join("train.jsonl"), true);
        live.make_file().unwrap();
        let live_name = listing(out)
            .into_iter()
            .find(|n| n != ".keg-tmpKILLED")
            .unwrap();
        // Not temp files, or not files: left alone.
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        std::fs::create_dir(out.join(".keg-tmpdir")).unwrap();

        // The live file's lock is held, as another open of it sees.
        let other = std::fs::File::open(out.join(&live_name)).unwrap();
        assert!(other.try_lock().is_err());
        drop(other);

        assert_eq!(remove_stale_temp_files(out), 1);
        let mut left = vec![".keg-tmpdir".to_owned(), live_name, "notes.txt".to_owned()];
        left.sort();
        assert_eq!(listing(out), left);
        // The live one is renamed into place whole after the sweep.
        live.push(b"{\"a\":1}\n").unwrap();
        commit(vec![live.finish().unwrap()]).unwrap();
        assert_eq!(
            std::fs::read(out.join("train.jsonl")).unwrap(),
            b"{\"a\":1}\n"
        );
        assert_eq!(remove_stale_temp_files(out), 0);
        // A folder that is not there yet has nothing to sweep.
        assert_eq!(remove_stale_temp_files(&out.join("none")), 0);
    }

    #[test]
    fn an_output_makes_its_file_and_folder_only_when_its_buffer_fills_or_it_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // Dropped unfinished (a run stopped or failed) under a buffer's worth: nothing on disk.
        let mut output = Output::create(out.join("train.jsonl"), true);
        output.push(b"{\"a\":1}\n").unwrap();
        drop(output);
        assert!(!out.exists());
        // Past a buffer's worth the rows go to a temp file, removed when dropped unfinished.
        let mut output = Output::create(out.join("train.jsonl"), true);
        let row = [b'x'; 1000];
        for _ in 0..OUTPUT_BUFFER / row.len() {
            output.push(&row).unwrap();
            assert!(!out.exists());
        }
        output.push(&row).unwrap();
        let names = listing(&out);
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with(".keg-tmp"), "{names:?}");
        drop(output);
        assert!(listing(&out).is_empty());
        // An empty output finished is an empty file.
        let finished = Output::create(out.join("test.jsonl"), true)
            .finish()
            .unwrap();
        commit(vec![finished]).unwrap();
        assert_eq!(std::fs::read(out.join("test.jsonl")).unwrap(), b"");
        // A row as long as the buffer goes past it, to the file.
        let mut output = Output::create(out.join("valid.jsonl"), true);
        output.push(&vec![b'y'; OUTPUT_BUFFER]).unwrap();
        commit(vec![output.finish().unwrap()]).unwrap();
        assert_eq!(
            std::fs::read(out.join("valid.jsonl")).unwrap().len(),
            OUTPUT_BUFFER
        );
        // A folder that cannot be made is named when the file is due.
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, "a file").unwrap();
        let err = Output::create(blocked.join("train.jsonl"), true)
            .finish()
            .err()
            .unwrap();
        assert!(err.to_string().contains("blocked"), "{err}");
    }

    #[test]
    fn temp_files_not_dropped_before_an_abort_are_removed_and_finished_ones_are_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let here = || {
            listed()
                .iter()
                .filter(|p| p.starts_with(dir.path()))
                .count()
        };
        std::fs::write(dir.path().join("train.jsonl"), "last run\n").unwrap();
        let row = [b'x'; 1000];
        let mut train = Output::create(dir.path().join("train.jsonl"), true);
        let mut valid = Output::create(dir.path().join("valid.jsonl"), true);
        for _ in 0..=OUTPUT_BUFFER / row.len() {
            train.push(&row).unwrap();
            valid.push(&row).unwrap();
        }
        // An output renamed into place and one dropped unfinished are no longer listed.
        let mut test = Output::create(dir.path().join("test.jsonl"), true);
        test.push(b"{}\n").unwrap();
        commit(vec![test.finish().unwrap()]).unwrap();
        drop(valid);
        assert_eq!(listing(dir.path()).len(), 3, "{:?}", listing(dir.path()));
        assert_eq!(here(), 1);
        // An abort drops nothing: the temp file stays until the panic hook removes it.
        std::mem::forget(train);
        remove_listed(|p| p.starts_with(dir.path()));
        assert_eq!(listing(dir.path()), ["test.jsonl", "train.jsonl"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap(),
            "last run\n"
        );
    }

    #[test]
    fn a_failed_export_leaves_last_runs_files_and_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        write_all(
            dir.path(),
            &[("train.jsonl", "old train\n"), ("rejects.jsonl", "old\n")],
        )
        .unwrap();
        // A folder where the manifest goes: the last file of the export cannot be renamed.
        std::fs::create_dir(dir.path().join("manifest.json")).unwrap();
        let err = write_all(
            dir.path(),
            &[
                ("train.jsonl", "new train\n"),
                ("rejects.jsonl", "new\n"),
                ("manifest.json", "{}\n"),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("manifest.json"), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap(),
            "old train\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("rejects.jsonl")).unwrap(),
            "old\n"
        );
        assert_eq!(
            listing(dir.path()),
            ["manifest.json", "rejects.jsonl", "train.jsonl"]
        );
    }

    #[test]
    fn a_plan_writes_nothing_but_still_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let mut output = Output::create(dir.path().join("train.jsonl"), false);
        output.push(b"row\n").unwrap();
        let finished = output.finish().unwrap();
        assert_eq!(finished.digest, blake3::hash(b"row\n"));
        assert!(commit(vec![finished]).unwrap().is_empty());
        assert!(listing(dir.path()).is_empty());
    }
}
