//! Stage kinds. Each kind is one file named after its YAML `kind` and one line in [`KINDS`].

pub mod chunk;
pub mod dedupe;
pub mod export;
pub mod generate;
pub mod load;
pub mod prompt;
pub mod split;
pub mod validate;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::cache::Store;
use crate::config::{Diagnostic, Loc, PipelineFile, RawStage};
use crate::lock;
use crate::provider::{CallError, Provider};
use crate::record::{Lineage, Record};
use crate::template::{TemplateError, Templates};

/// A stage kind: its YAML name, whether it reads other stages, how to build it from its
/// settings, and the JSON Schema of those settings (for `schemas/pipeline.schema.json`).
pub struct Kind {
    pub name: &'static str,
    pub about: &'static str,
    pub takes_inputs: bool,
    pub build: fn(&BuildContext) -> Built,
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
}

/// A built stage, or every error found in its settings.
pub type Built = Result<Arc<dyn Stage>, Vec<Diagnostic>>;

pub const KINDS: &[Kind] = &[
    load::KIND,
    chunk::KIND,
    prompt::KIND,
    generate::KIND,
    dedupe::KIND,
    validate::KIND,
    split::KIND,
    export::KIND,
];

pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

pub fn kind_names() -> Vec<&'static str> {
    KINDS.iter().map(|k| k.name).collect()
}

/// A built stage, ready to run.
pub trait Stage: Send + Sync {
    /// The resolved settings as JSON (after defaults and vars), including digests of the
    /// files the stage reads; part of the pipeline hash.
    fn settings(&self) -> Json;

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>>;

    /// The split names a `split` stage assigns.
    fn splits(&self) -> Option<Vec<String>> {
        None
    }

    /// The provider a stage calls, for the manifest and the run summary.
    fn provider(&self) -> Option<&Arc<Provider>> {
        None
    }

    /// How the stage's output depends on its input; lets the runner skip unchanged documents.
    fn partition(&self) -> Partition {
        Partition::Whole
    }

    /// The stage taking its input a document at a time instead of all at once, when it can
    /// (see [`Streamed`]); `None` when it needs every record at once. Making it has no side
    /// effect: the runner may drop it unused.
    fn stream<'a>(&'a self, _cx: StageContext<'a>) -> Option<Box<dyn Streamed + 'a>> {
        None
    }

    /// A source stage's documents, found now and each read as the runner takes it (see
    /// [`Listing`]): a run document by document starts from it, and fails on a source
    /// stage that gives none. `cx.skip` names the documents the runner has results for.
    fn list<'a>(&'a self, _cx: StageContext<'a>) -> Option<Box<dyn Listing + 'a>> {
        None
    }

    /// In a run that writes, when the runner leaves the stage's files as an earlier run
    /// wrote them (nothing it reads changed): tidy what a killed run left beside them, and
    /// tell it in `stats` (export removes its stale temp files).
    fn unchanged(&self, _stats: &StageStats) {}
}

/// A source stage's documents, in order, each read only when the runner takes it: only the
/// documents in flight are in memory, however large the corpus.
pub trait Listing: Send {
    /// How many candidates were found (files, for `load`); some may not be documents.
    fn found(&self) -> usize;

    /// The next candidate; `None` after the last.
    fn next(&mut self) -> Option<Listed>;

    /// After the last: what the stage's [`Stage::run`] does once it has read everything
    /// (`load` records the files it read, and fails when none was a document).
    fn finish(self: Box<Self>) -> Result<(), StageError>;
}

/// What a [`Listing`] hands over next.
pub enum Listed {
    /// A document whose results the runner has (its `skip` said so): `source` and the
    /// digest of its bytes.
    Kept { source: String, digest: String },
    /// A document to run: its record and the digest of its bytes.
    Read { record: Record, digest: String },
    /// A candidate that is not a document (noted in the stage's stats).
    Passed,
}

/// A stage fed its input in pieces: each document's records, documents in lineage order,
/// keeping between pieces only what it must (dedupe the keys it has seen, export its open
/// files). Fed every record this way, it gives what [`Stage::run`] gives on all of them at
/// once; the runner then never holds every record of a run in memory.
pub trait Streamed: Send {
    /// The next records, all after those pushed before in lineage order; returns the
    /// records this stage passes on.
    fn push(&mut self, records: Vec<Record>) -> Result<Vec<Record>, StageError>;

    /// No more records: write what is left.
    fn finish(self: Box<Self>) -> Result<(), StageError>;
}

/// How a stage's output relates to documents, which decides what the runner may skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    /// Reads no input; each output record is one document, its lineage source the document.
    Source,
    /// The records a document yields depend only on that document's input records (and the
    /// stage's settings), and come out in input order.
    PerDocument,
    /// Needs all of its input at once (dedupe, split, export).
    Whole,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("template {0}")]
    Template(#[from] TemplateError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Message(String),
}

impl StageError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        StageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What a stage's build function sees: its own settings node and the pipeline around it.
pub struct BuildContext<'a> {
    pub file: &'a PipelineFile,
    pub stage: &'a RawStage,
    pub templates: &'a Arc<Templates>,
    pub providers: &'a IndexMap<String, Arc<Provider>>,
}

impl BuildContext<'_> {
    /// Deserialize the stage's settings (everything but `kind` and `inputs`).
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T, Vec<Diagnostic>> {
        T::deserialize(self.stage.node.deserializer(&["kind", "inputs"])).map_err(|err| {
            vec![Diagnostic::from_de(
                &self.file.path,
                err,
                &format!("stage `{}`", self.stage.name),
            )]
        })
    }

    /// Where a setting's value is written (or the stage itself when it is not written).
    pub fn loc(&self, field: &str) -> Loc {
        self.stage
            .node
            .get(field)
            .map_or(self.stage.name_loc, |n| n.loc)
    }

    pub fn error(&self, field: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(
            &self.file.path,
            Some(self.loc(field)),
            format!("stage `{}`: {}", self.stage.name, message.into()),
        )
    }

    /// A path written in the pipeline file, relative to the file's folder.
    pub fn file_path(&self, relative: &str) -> PathBuf {
        let path = Path::new(relative);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.file.dir.join(path)
        }
    }

    /// Read and compile a JSON Schema file named in setting `field`.
    pub fn json_schema(&self, field: &str, relative: &str) -> Result<JsonSchemaFile, Diagnostic> {
        let path = self.file_path(relative);
        let text = std::fs::read_to_string(&path).map_err(|err| {
            self.error(
                field,
                format!("cannot read schema `{}`: {err}", path.display()),
            )
            .hint("schema paths are relative to the pipeline file")
        })?;
        let schema: Json = serde_json::from_str(&text).map_err(|err| {
            Diagnostic::new(
                &path,
                Some(Loc {
                    line: err.line() as u32,
                    col: err.column() as u32,
                }),
                format!("invalid JSON in schema: {err}"),
            )
        })?;
        let validator = jsonschema::validator_for(&schema)
            .map_err(|err| Diagnostic::new(&path, None, format!("invalid JSON Schema: {err}")))?;
        Ok(JsonSchemaFile {
            digest: blake3::hash(text.as_bytes()).to_hex().to_string(),
            path,
            canonical: crate::record::canonical_json(&schema),
            schema,
            validator: Arc::new(validator),
        })
    }
}

/// A JSON Schema file a stage validates against.
#[derive(Clone)]
pub struct JsonSchemaFile {
    pub path: PathBuf,
    pub schema: Json,
    /// The schema's canonical JSON, as request bodies carry it: made once, not per call.
    pub canonical: Vec<u8>,
    pub digest: String,
    pub validator: Arc<jsonschema::Validator>,
}

impl JsonSchemaFile {
    /// The first validation error as `at /pairs/0: "answer" is a required property`.
    pub fn check(&self, value: &Json) -> Result<(), String> {
        // Most values are valid: a yes or no is cheaper than an iterator of errors.
        if self.validator.is_valid(value) {
            return Ok(());
        }
        match self.validator.iter_errors(value).next() {
            None => Ok(()),
            Some(err) => {
                let at = err.instance_path().to_string();
                let at = if at.is_empty() { "/".to_owned() } else { at };
                Err(format!("at {at}: {err}"))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Do the work.
    Run,
    /// Count what would be done; send no request and write no file.
    Plan,
}

/// A bad record, kept with its reason for `rejects.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reject {
    pub stage: String,
    /// A short machine-readable reason: `truncated`, `invalid_json`, `schema`, `refused`,
    /// `call_failed`, `validate`, `empty_field`.
    pub code: Cow<'static, str>,
    pub source: String,
    pub lineage: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    #[serde(skip)]
    pub order: Lineage,
}

impl Reject {
    /// A reject that another run may not repeat (a call that failed), so results that
    /// include it are not kept for the next run.
    pub fn is_transient(&self) -> bool {
        self.code == "call_failed"
    }
}

/// State shared by all stages of one run.
pub struct RunShared {
    pub mode: Mode,
    pub store: Arc<dyn Store>,
    /// False with `--no-cache`: results are recomputed (and stored again).
    pub read_cache: bool,
    pub pipeline_name: String,
    pub pipeline_hash: String,
    /// The providers generate stages use: kind, model, endpoint (no secrets).
    pub models: Json,
    /// Document path → blake3 of its bytes, from every `load` stage.
    pub documents: Mutex<BTreeMap<String, String>>,
    pub rejects: Mutex<Vec<Reject>>,
    pub progress: indicatif::MultiProgress,
    /// Set on Ctrl-C: no new LLM call starts.
    pub stop: Arc<AtomicBool>,
    /// Tokens of every reply the outputs are built from (sent now or earlier), per provider.
    pub usage: Mutex<BTreeMap<String, Usage>>,
}

/// Token use of the replies behind a dataset.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// What the server reported the calls cost, summed in billionths so that the sum does not
    /// depend on the order replies arrived in; absent when the server reports no cost.
    #[serde(skip)]
    pub cost_nanos: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
}

impl Usage {
    pub fn add_reply(&mut self, reply: &crate::provider::Reply) {
        self.calls += 1;
        self.prompt_tokens += reply.prompt_tokens;
        self.completion_tokens += reply.completion_tokens;
        if let Some(cost) = reply.cost {
            self.add_cost_nanos(cost_nanos(cost));
        }
    }

    pub fn add(&mut self, other: &Usage) {
        self.calls += other.calls;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        if let Some(nanos) = other.cost_nanos {
            self.add_cost_nanos(nanos);
        }
    }

    fn add_cost_nanos(&mut self, nanos: u64) {
        let total = self.cost_nanos.unwrap_or(0) + nanos;
        self.cost_nanos = Some(total);
        self.cost = Some(total as f64 / 1e9);
    }
}

/// Usage per provider, summed into `into`.
pub fn add_usage(into: &mut BTreeMap<String, Usage>, from: &BTreeMap<String, Usage>) {
    for (provider, usage) in from {
        into.entry(provider.clone()).or_default().add(usage);
    }
}

/// A reported cost in billionths of its unit.
pub fn cost_nanos(cost: f64) -> u64 {
    (cost.max(0.0) * 1e9).round() as u64
}

impl RunShared {
    /// A run's shared state over a cache in `dir`, for unit tests of stages.
    #[cfg(test)]
    pub fn for_tests(dir: &Path) -> RunShared {
        RunShared {
            mode: Mode::Run,
            store: Arc::new(crate::cache::DiskStore::open(dir).expect("open a test cache")),
            read_cache: true,
            pipeline_name: "test".into(),
            pipeline_hash: String::new(),
            models: Json::Null,
            documents: Mutex::default(),
            rejects: Mutex::default(),
            progress: indicatif::MultiProgress::with_draw_target(
                indicatif::ProgressDrawTarget::hidden(),
            ),
            stop: Arc::default(),
            usage: Mutex::default(),
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Counters a stage fills in; the run summary and `keg plan` read them.
#[derive(Debug, Default)]
pub struct StageStats {
    /// Work units: documents loaded, records processed, LLM calls needed.
    pub items: AtomicU64,
    /// LLM calls answered from the cache.
    pub cached: AtomicU64,
    /// LLM calls not in the cache (sent in a run, to be sent in a plan).
    pub to_run: AtomicU64,
    pub retries: AtomicU64,
    /// Replies fixed by a safe repair.
    pub repairs: AtomicU64,
    /// Invalid replies asked again with the validation error.
    pub reasks: AtomicU64,
    /// Replies cut off at the token limit, asked again with a larger budget.
    pub grown: AtomicU64,
    pub tokens_in: AtomicU64,
    pub tokens_out: AtomicU64,
    /// Cost of the calls sent in this run, in billionths, when the server reports it.
    pub cost_nanos: AtomicU64,
    pub rejected: AtomicU64,
    /// Inputs skipped by a documented rule (empty, binary … files; duplicates).
    pub skipped: AtomicU64,
    pub notes: Mutex<Vec<String>>,
    /// What this run did besides the stage's work, told once: a snapshot carries them to the
    /// run's totals but never stores them, so a later run that skips the stage does not
    /// tell them again.
    pub events: Mutex<Vec<String>>,
    /// Files written, with their row counts.
    pub files: Mutex<Vec<(PathBuf, usize)>>,
}

impl StageStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn note(&self, note: String) {
        lock(&self.notes).push(note);
    }

    pub fn event(&self, event: String) {
        lock(&self.events).push(event);
    }

    /// The counters as plain numbers, to be kept with a skipped document's results.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            items: get(&self.items),
            cached: get(&self.cached),
            to_run: get(&self.to_run),
            retries: get(&self.retries),
            repairs: get(&self.repairs),
            reasks: get(&self.reasks),
            grown: get(&self.grown),
            tokens_in: get(&self.tokens_in),
            tokens_out: get(&self.tokens_out),
            cost_nanos: get(&self.cost_nanos),
            rejected: get(&self.rejected),
            skipped: get(&self.skipped),
            notes: lock(&self.notes).clone(),
            events: lock(&self.events).clone(),
            files: lock(&self.files).clone(),
        }
    }

    /// Add a snapshot's counters to these.
    pub fn absorb(&self, s: &StatsSnapshot) {
        for (counter, n) in [
            (&self.items, s.items),
            (&self.cached, s.cached),
            (&self.to_run, s.to_run),
            (&self.retries, s.retries),
            (&self.repairs, s.repairs),
            (&self.reasks, s.reasks),
            (&self.grown, s.grown),
            (&self.tokens_in, s.tokens_in),
            (&self.tokens_out, s.tokens_out),
            (&self.cost_nanos, s.cost_nanos),
            (&self.rejected, s.rejected),
            (&self.skipped, s.skipped),
        ] {
            Self::add(counter, n);
        }
        if !s.notes.is_empty() {
            let mut notes = lock(&self.notes);
            notes.extend(s.notes.iter().cloned());
        }
        if !s.events.is_empty() {
            let mut events = lock(&self.events);
            events.extend(s.events.iter().cloned());
        }
        if !s.files.is_empty() {
            let mut files = lock(&self.files);
            files.extend(s.files.iter().cloned());
        }
    }
}

/// [`StageStats`] as plain numbers: what a stage did for one document (or for the whole
/// output), kept so that a run that skips it reports the same counts. Zero counts are left
/// out of the stored form: there is one per stage per document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub items: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub to_run: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repairs: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reasks: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub grown: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens_in: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens_out: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cost_nanos: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rejected: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Not stored: see [`StageStats::events`].
    #[serde(skip)]
    pub events: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<(PathBuf, usize)>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl StatsSnapshot {
    /// The same work seen from a later run: every call it sent is cached now, and nothing
    /// is spent again.
    pub fn replayed(&self) -> StatsSnapshot {
        StatsSnapshot {
            cached: self.cached + self.to_run,
            to_run: 0,
            retries: 0,
            tokens_in: 0,
            tokens_out: 0,
            cost_nanos: 0,
            ..self.clone()
        }
    }
}

/// What a stage sees while it runs.
#[derive(Clone, Copy)]
pub struct StageContext<'a> {
    pub name: &'a str,
    pub shared: &'a RunShared,
    pub stats: &'a StageStats,
    /// Split names assigned upstream, if a `split` stage is upstream.
    pub splits: Option<&'a [String]>,
    /// The names of this stage's ancestors, whose rejects belong to its outputs.
    pub ancestors: &'a [String],
    /// Where this stage's rejects go: the run's list, or one document's while the runner
    /// keeps documents apart.
    pub rejects: &'a Mutex<Vec<Reject>>,
    /// Where the usage of the replies read goes, like `rejects`.
    pub usage: &'a Mutex<BTreeMap<String, Usage>>,
    /// For a source stage: documents (path, blake3 of the bytes) whose results the runner
    /// already has. The stage still lists them in [`RunShared::documents`] but need not read
    /// them or yield their records.
    pub skip: Option<&'a SkipDocument<'a>>,
    /// Draw the stage's own progress bar: off while the runner shows progress by document.
    pub bars: bool,
}

pub type SkipDocument<'a> = dyn Fn(&str, &str) -> bool + Sync + 'a;

/// What a stage's stream passes on when fed `pieces` one after another and finished, as
/// lineages, for unit tests of stages that stream.
#[cfg(test)]
pub fn fed_in_pieces(mut stream: Box<dyn Streamed + '_>, pieces: &[&[Record]]) -> Vec<String> {
    let mut kept = Vec::new();
    for piece in pieces {
        let out = stream.push(piece.to_vec()).unwrap();
        kept.extend(out.iter().map(|r| r.lineage.display()));
    }
    stream.finish().unwrap();
    kept
}

#[cfg(test)]
impl<'a> StageContext<'a> {
    /// A stage's context for its unit tests: rejects and usage go to `shared`'s lists, nothing
    /// is split upstream, no document is skipped, no progress bar is drawn.
    pub fn for_tests(name: &'a str, shared: &'a RunShared, stats: &'a StageStats) -> Self {
        StageContext {
            name,
            shared,
            stats,
            splits: None,
            ancestors: &[],
            rejects: &shared.rejects,
            usage: &shared.usage,
            skip: None,
            bars: false,
        }
    }
}

impl StageContext<'_> {
    pub fn reject(
        &self,
        lineage: &Lineage,
        code: &'static str,
        reason: String,
        reply: Option<&str>,
    ) {
        StageStats::add(&self.stats.rejected, 1);
        let reply = reply.map(|r| {
            let mut r: String = r.chars().take(2000).collect();
            if r.len() < reply.map_or(0, str::len) {
                r.push('…');
            }
            r
        });
        lock(self.rejects).push(Reject {
            stage: self.name.to_owned(),
            code: Cow::Borrowed(code),
            source: lineage.source.to_string(),
            lineage: lineage.display(),
            reason,
            reply,
            order: lineage.clone(),
        });
    }

    /// Count a reply read (sent now or cached) towards the usage behind the outputs.
    pub fn count_usage(&self, provider: &str, reply: &crate::provider::Reply) {
        let mut usage = lock(self.usage);
        usage
            .entry(provider.to_owned())
            .or_default()
            .add_reply(reply);
    }
}

/// Record fields with `extra` values (`vars`, `items`) over them, as templates and
/// expressions see them, passed to `f` with the record's map. A view, not a copy: the map is
/// moved into the view for the call and back after it, and a field becomes a template value
/// only when a template reads it.
pub fn template_context<R>(
    record: &mut Record,
    extra: &[(&'static str, minijinja::Value)],
    f: impl FnOnce(&serde_json::Map<String, Json>, &minijinja::Value) -> R,
) -> R {
    let view = Arc::new(TemplateContext {
        data: std::mem::take(&mut record.data),
        extra: extra.to_vec(),
    });
    let value = minijinja::Value::from_dyn_object(view.clone());
    let result = f(&view.data, &value);
    drop(value);
    // A template that kept the context alive (none of ours can) costs a copy, not the record.
    record.data = Arc::try_unwrap(view)
        .map(|view| view.data)
        .unwrap_or_else(|view| view.data.clone());
    result
}

/// A record's field. Records have a handful of fields, and comparing a few short keys is
/// cheaper than hashing the name with the map's SipHash.
pub fn field<'m>(data: &'m serde_json::Map<String, Json>, name: &str) -> Option<&'m Json> {
    if data.len() <= 8 {
        data.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    } else {
        data.get(name)
    }
}

/// Whether `records` are already in lineage order, as they arrive from the stages before,
/// so the aggregate stages can skip sorting. Records of one document share the `Arc` of its
/// path, so most comparisons never read the path.
pub fn in_lineage_order(records: &[Record]) -> bool {
    records.is_sorted_by(|a, b| {
        let (a, b) = (&a.lineage, &b.lineage);
        if Arc::ptr_eq(&a.source, &b.source) {
            a.path <= b.path
        } else {
            a <= b
        }
    })
}

/// A field as a template value: what `minijinja`'s serde conversion makes of it, with
/// strings, numbers, booleans and null converted directly rather than through a serializer.
fn template_value(field: &Json) -> minijinja::Value {
    match field {
        Json::String(text) => minijinja::Value::from(text.as_str()),
        Json::Bool(b) => minijinja::Value::from(*b),
        Json::Null => minijinja::Value::from(()),
        Json::Number(n) => {
            if let Some(n) = n.as_u64() {
                minijinja::Value::from(n)
            } else if let Some(n) = n.as_i64() {
                minijinja::Value::from(n)
            } else {
                minijinja::Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        other => minijinja::Value::from(minijinja::value::Serde(other)),
    }
}

#[derive(Debug)]
struct TemplateContext {
    data: serde_json::Map<String, Json>,
    extra: Vec<(&'static str, minijinja::Value)>,
}

impl minijinja::value::Object for TemplateContext {
    fn get_value(self: &Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        let key = key.as_str()?;
        match self.extra.iter().find(|(name, _)| *name == key) {
            Some((_, value)) => Some(value.clone()),
            None => field(&self.data, key).map(template_value),
        }
    }

    fn enumerate(self: &Arc<Self>) -> minijinja::value::Enumerator {
        // The order of a map with `extra` inserted: fields, then the new names.
        let extra = self
            .extra
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !self.data.contains_key(*name));
        let keys: Vec<minijinja::Value> = self
            .data
            .keys()
            .map(String::as_str)
            .chain(extra)
            .map(minijinja::Value::from)
            .collect();
        minijinja::value::Enumerator::Iter(Box::new(keys.into_iter()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_snapshots_store_only_what_is_not_zero_and_replay_as_cached() {
        let stats = StageStats::default();
        StageStats::add(&stats.items, 3);
        StageStats::add(&stats.to_run, 2);
        StageStats::add(&stats.cached, 1);
        StageStats::add(&stats.tokens_in, 40);
        stats.event("removed a file".to_owned());
        let snapshot = stats.snapshot();
        // An event goes on to the run's totals, but is not stored.
        let run = StageStats::default();
        run.absorb(&snapshot);
        assert_eq!(*run.events.lock().unwrap(), ["removed a file"]);
        let stored = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(
            stored,
            r#"{"items":3,"cached":1,"to_run":2,"tokens_in":40}"#
        );
        let back: StatsSnapshot = serde_json::from_str(&stored).unwrap();
        assert_eq!(
            back,
            StatsSnapshot {
                events: Vec::new(),
                ..snapshot
            }
        );
        let replayed = back.replayed();
        assert_eq!(
            (replayed.cached, replayed.to_run, replayed.tokens_in),
            (3, 0, 0)
        );
        let total = StageStats::default();
        total.absorb(&replayed);
        total.absorb(&replayed);
        assert_eq!(StageStats::get(&total.cached), 6);
    }

    #[test]
    fn fields_become_the_template_values_serde_would_make() {
        let samples = serde_json::json!([
            "text", "", "é 日本", 0, 7, -7, u64::MAX, i64::MIN, 2.5, -0.0, 1e300, true, false,
            null, ["a", 1, [null]], {"b": {"c": 1}, "a": [true]},
        ]);
        for field in samples.as_array().unwrap() {
            let direct = template_value(field);
            let serde = minijinja::Value::from(minijinja::value::Serde(field));
            assert_eq!(direct, serde, "{field}");
            assert_eq!(direct.kind(), serde.kind(), "{field}");
            assert_eq!(direct.to_string(), serde.to_string(), "{field}");
        }
    }

    #[test]
    fn kind_names_match_their_files() {
        // One file per kind, named after it: keep the registry and the tree in step.
        for kind in KINDS {
            let file = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src/stage")
                .join(format!("{}.rs", kind.name));
            assert!(file.is_file(), "no file for stage kind `{}`", kind.name);
        }
    }
}
