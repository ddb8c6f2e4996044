//! Running the per-document stages document by document, and skipping what did not change.
//!
//! A document's results (the records later stages read, its rejects, the usage of the
//! replies behind them, and each stage's counts) are kept under a key of the document's path
//! and bytes, the settings of `load` and of every per-document stage, which of those stages
//! the later ones read, the providers' identities, every template file and keg's version. A
//! re-run reads one entry per unchanged document instead of chunking, rendering, hashing and
//! reading every call again. The stages after them (dedupe, split, export …) see every
//! record, fed document by document when they can be ([`Layout::tree`]); their files are
//! kept under a key of the pipeline hash and every document's results, and left alone when
//! that key matches and the files are still as written.
//!
//! Documents run concurrently, each through all its stages, so a slow call holds back only
//! its own document; the providers' limits bound what is in flight. Results go back in
//! document order, so outputs do not depend on the order calls finish in.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, mpsc};

use futures::{FutureExt, StreamExt};
use serde_json::json;

use super::{Run, RunError, StageOutcome};
use crate::cache::memo::{
    DOCUMENT_RECORDS_BUCKET, DOCUMENTS_BUCKET, DocumentEntry, DocumentKey, DocumentRecords,
    FileMemo, MEMO_KEY_VERSION, MemoKey, OUTPUTS_BUCKET, OutputsEntry, OutputsKey, RejectMemo,
    StageMemo, usage_memo, usage_restore,
};
use crate::config::Plan;
use crate::lock;
use crate::record::{Record, canonical_hash};
use crate::stage::{
    Listed, Mode, Partition, Reject, RunShared, SkipDocument, StageContext, StageError, StageStats,
    Streamed, Usage, add_usage,
};

const KEG_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Which stages run document by document.
pub struct Layout {
    /// The `load` stage.
    source: usize,
    /// The per-document stages, in run order: each reads the source or another of them.
    region: Vec<usize>,
    /// The per-document stages whose records later stages read.
    boundary: Vec<usize>,
    /// The later stages, in run order.
    rest: Vec<usize>,
    /// When each later stage reads one stage (a boundary stage, or a later stage before it),
    /// the later stages form trees and can be fed document by document (see
    /// [`crate::stage::Streamed`]): what each reads, as a slot, its position in `rest` or
    /// `rest.len()` plus a boundary stage's position in `boundary`. A chain (dedupe → split →
    /// export) is a tree, and so is a fork (two exports of one split).
    tree: Option<Vec<usize>>,
    /// blake3 over the settings of the source and the per-document stages, the names of the
    /// stages whose records are kept (`boundary`), the providers' identities and the
    /// template files.
    digest: String,
}

impl Layout {
    /// `None` when the pipeline does not have the shape this needs: exactly one source stage
    /// and at least one per-document stage reading it.
    pub fn of(plan: &Plan) -> Option<Layout> {
        let stages = &plan.stages;
        let mut sources = stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.inputs.is_empty());
        let (source, first) = sources.next()?;
        if sources.next().is_some() || first.stage.partition() != Partition::Source {
            return None;
        }
        let mut region: Vec<usize> = Vec::new();
        for (pos, s) in stages.iter().enumerate() {
            if s.stage.partition() == Partition::PerDocument
                && let [input] = s.inputs[..]
                && (input == source || region.contains(&input))
            {
                region.push(pos);
            }
        }
        if region.is_empty() {
            return None;
        }
        let rest: Vec<usize> = (0..stages.len())
            .filter(|p| *p != source && !region.contains(p))
            .collect();
        if rest.iter().any(|&p| stages[p].inputs.contains(&source)) {
            // A later stage reads the documents themselves; run everything whole.
            return None;
        }
        let boundary: Vec<usize> = region
            .iter()
            .copied()
            .filter(|r| rest.iter().any(|&p| stages[p].inputs.contains(r)))
            .collect();
        let tree = rest
            .iter()
            .map(|&p| match stages[p].inputs[..] {
                [input] => rest.iter().position(|&q| q == input).or_else(|| {
                    let b = boundary.iter().position(|&b| b == input)?;
                    Some(rest.len() + b)
                }),
                // A join: run whole.
                _ => None,
            })
            .collect();
        let describe = |pos: usize| {
            let s = &stages[pos];
            json!({
                "name": s.name,
                "kind": s.kind,
                "inputs": s.inputs.iter().map(|&j| &stages[j].name).collect::<Vec<_>>(),
                "settings": s.stage.settings(),
            })
        };
        let digest = canonical_hash(&json!({
            "source": describe(source),
            "stages": region.iter().map(|&p| describe(p)).collect::<Vec<_>>(),
            // The stages whose records a document's entry keeps: a later stage that starts
            // reading another per-document stage needs that stage's records too.
            "kept": boundary.iter().map(|&p| &stages[p].name).collect::<Vec<_>>(),
            "providers": plan.providers.iter()
                .map(|(name, p)| (name.clone(), provider_answers(p)))
                .collect::<serde_json::Map<_, _>>(),
            "templates": plan.templates_digest,
            "vars": plan.template_vars,
        }))
        .to_hex()
        .to_string();
        Some(Layout {
            source,
            region,
            boundary,
            rest,
            tree,
            digest,
        })
    }
}

/// A provider's settings that can change its answers: all of them but those that only
/// pace or retry the requests, or name where the key is (never the key itself). A setting
/// added later counts until it is listed here.
fn provider_answers(provider: &crate::provider::Provider) -> serde_json::Value {
    let mut settings = serde_json::to_value(&provider.config).unwrap_or_default();
    if let Some(map) = settings.as_object_mut() {
        for pacing in [
            "api_key_env",
            "concurrency",
            "requests_per_minute",
            "tokens_per_minute",
            "timeout_secs",
            "max_retries",
            "retry_delay_ms",
            "keep_alive",
        ] {
            map.remove(pacing);
        }
    }
    json!({ "name": provider.name, "settings": settings })
}

/// One document's results: kept from an earlier run, or made now.
enum Document {
    Kept(DocumentEntry),
    Made(Made),
}

/// What running the per-document stages over one document gave.
struct Made {
    /// The records of each boundary stage, by stage name.
    records: Vec<(String, Vec<Record>)>,
    stages: Vec<StageMemo>,
    rejects: Vec<Reject>,
    usage: BTreeMap<String, Usage>,
    /// See [`DocumentEntry::digest`].
    digest: String,
    /// The records' stored form, until they are kept.
    stored: Vec<u8>,
    /// The records are in the cache and no longer here (when the later stages are fed
    /// document by document, they read them back).
    in_cache: bool,
    /// The stored size of the records, while they are held for the later stages after
    /// being kept.
    held: usize,
}

impl Made {
    /// The records of each boundary stage, in `Layout::boundary`'s order, taken.
    fn take_records(&mut self) -> Vec<Vec<Record>> {
        std::mem::take(&mut self.records)
            .into_iter()
            .map(|(_, records)| records)
            .collect()
    }
}

impl Document {
    fn digest(&self) -> &str {
        match self {
            Document::Kept(entry) => &entry.digest,
            Document::Made(made) => &made.digest,
        }
    }
}

impl Run<'_> {
    pub(super) async fn by_document(&mut self, layout: &Layout) -> Result<(), RunError> {
        let (plan, shared) = (self.plan, self.shared);
        let key = |source: &str, digest: &str| {
            DocumentKey {
                key_version: MEMO_KEY_VERSION,
                keg: KEG_VERSION,
                stages: &layout.digest,
                source,
                document: digest,
            }
            .digest()
        };
        // The source stage asks, per document, whether its results are kept; those it
        // neither reads nor yields.
        let kept_entries: Mutex<BTreeMap<String, DocumentEntry>> = Mutex::default();
        let is_kept = |source: &str, digest: &str| {
            let entry = shared
                .store
                .get(DOCUMENTS_BUCKET, &key(source, digest))
                .ok()
                .flatten()
                .and_then(|bytes| serde_json::from_slice::<DocumentEntry>(&bytes).ok());
            let Some(entry) = entry else {
                return false;
            };
            lock(&kept_entries).insert(source.to_owned(), entry);
            true
        };
        let skip: Option<&SkipDocument> = if shared.read_cache {
            Some(&is_kept)
        } else {
            None
        };
        // The source lists its documents now and reads each as its turn comes: only the
        // documents in flight are in memory.
        let source_stage = &plan.stages[layout.source];
        let source_stats = StageStats::default();
        let mut listing = source_stage
            .stage
            .list(StageContext {
                name: &source_stage.name,
                shared,
                stats: &source_stats,
                splits: source_stage.splits.as_deref(),
                ancestors: &source_stage.ancestors,
                rejects: &shared.rejects,
                usage: &shared.usage,
                skip,
                bars: true,
            })
            .ok_or_else(|| {
                RunError::of_stage(
                    &source_stage.name,
                    StageError::Message("this source cannot list its documents".to_owned()),
                )
            })?;
        // Every document, in the order the source lists them (by path), as they come.
        let mut sources: Vec<Arc<str>> = Vec::new();
        let mut keys: Vec<blake3::Hash> = Vec::new();
        let mut documents: Vec<Option<Document>> = Vec::new();

        // The later stages, fed document by document when they can be.
        let tail_stats: Vec<StageStats> =
            layout.rest.iter().map(|_| StageStats::default()).collect();
        let streams = layout
            .tree
            .is_some()
            .then(|| {
                layout
                    .rest
                    .iter()
                    .zip(&tail_stats)
                    .map(|(&pos, stats)| {
                        let planned = &plan.stages[pos];
                        planned.stage.stream(StageContext {
                            name: &planned.name,
                            shared,
                            stats,
                            splits: planned.splits.as_deref(),
                            ancestors: &planned.ancestors,
                            rejects: &shared.rejects,
                            usage: &shared.usage,
                            skip: None,
                            bars: true,
                        })
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .flatten();

        // The rest run now, concurrently. Documents start while the provider (the one that
        // sends the most at once, when the stages use several) has fewer calls waiting to
        // start than it sends at once: its limit stays busy, and only the documents that
        // feed it are in memory. Documents whose calls are all cached add no waiting call, so
        // a cap on the documents in flight bounds those.
        let pacing = layout
            .region
            .iter()
            .filter_map(|&p| plan.stages[p].stage.provider())
            .max_by_key(|p| p.config.concurrency);
        let room = pacing.map_or(1, |p| p.config.concurrency.max(1)) * 2 + 64;
        // Counts the documents to run: candidates that turn out kept, or not documents, come
        // off its length.
        let bar = shared.progress.add(
            indicatif::ProgressBar::new(listing.found() as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "documents [{bar:30}] {pos}/{len} · {per_sec} · eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
        );
        // Candidates are read ahead in runs of [`READ_AHEAD`]: reading files one at a time
        // between replies cost more CPU than reading them in a row.
        let mut ahead: std::collections::VecDeque<Listed> = std::collections::VecDeque::new();
        // The next document to run: its position and records. Taking it lists the kept
        // documents before it.
        let mut take_next = |sources: &mut Vec<Arc<str>>,
                             keys: &mut Vec<blake3::Hash>,
                             documents: &mut Vec<Option<Document>>|
         -> Option<(usize, Vec<Record>)> {
            loop {
                if ahead.is_empty() {
                    ahead.extend(std::iter::from_fn(|| listing.next()).take(READ_AHEAD));
                }
                match ahead.pop_front()? {
                    Listed::Passed => bar.dec_length(1),
                    Listed::Kept { source, digest } => {
                        let entry = lock(&kept_entries)
                            .remove(&source)
                            .expect("`is_kept` stores the entry of each document it keeps");
                        keys.push(key(&source, &digest));
                        sources.push(Arc::from(source));
                        documents.push(Some(Document::Kept(entry)));
                        bar.dec_length(1);
                    }
                    Listed::Read { record, digest } => {
                        let source = record.lineage.source.clone();
                        keys.push(key(&source, &digest));
                        sources.push(source);
                        documents.push(None);
                        return Some((documents.len() - 1, vec![record]));
                    }
                }
            }
        };
        let mut running = futures::stream::FuturesUnordered::new();
        let mut failure = None;
        // The later stages are fed each document as soon as it and every document before it
        // are made, from memory: a cold run reads no records back. Feeding goes on at the end
        // from the first document it could not take from memory, kept from an earlier run.
        let name = |&p: &usize| plan.stages[p].name.as_str();
        let boundary: Vec<&str> = layout.boundary.iter().map(name).collect();
        let feeder = match (streams, &layout.tree) {
            (Some(streams), Some(tree)) => Some(Feeder::new(
                streams,
                tree,
                layout.rest.iter().map(name).collect(),
                boundary.len(),
            )),
            _ => None,
        };
        let streaming = feeder.is_some();
        let mut feeding = Feeding {
            feeder,
            active: streaming,
            held: 0,
        };
        let done = |documents: &mut Vec<Option<Document>>,
                    keys: &[blake3::Hash],
                    failure: &mut Option<(String, StageError)>,
                    feeding: &mut Feeding<'_>,
                    (i, result): (usize, Result<Made, (String, StageError)>)| {
            bar.inc(1);
            match result {
                Ok(mut made) => {
                    let size = made.stored.len();
                    if keep(shared, &keys[i], &mut made) && streaming {
                        if feeding.active && feeding.held + size <= HOLD_BYTES {
                            // Fed from memory when the documents before it are.
                            made.held = size;
                            feeding.held += size;
                        } else {
                            // Read back when the later stages are fed: held here, every
                            // document's records could be in memory at once.
                            made.records = Vec::new();
                            made.in_cache = true;
                        }
                    }
                    documents[i] = Some(Document::Made(made));
                    if let Err(err) = feeding.advance(documents) {
                        // The run stops, as on a fatal error in a document.
                        shared
                            .stop
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        if matches!(failure, Some((_, StageError::Interrupted)) | None) {
                            *failure = Some(err);
                        }
                    }
                }
                // A fatal error stops the other documents, which then end as interrupted:
                // report the cause.
                Err(err) => match failure {
                    Some((_, StageError::Interrupted)) | None => *failure = Some(err),
                    Some(_) => {}
                },
            }
        };
        // On a failure, the documents in flight still finish (their calls are cached); no
        // document starts, and the providers start no call, once the run is stopping.
        let mut next = take_next(&mut sources, &mut keys, &mut documents);
        loop {
            while !shared.stopping()
                && running.len() < room
                && (running.is_empty() || pacing.is_none_or(|p| p.wants_more()))
                && let Some((i, records)) = next.take()
            {
                running.push(async move { (i, run_document(plan, layout, shared, records).await) });
                // Run it up to its first wait, so that its calls count before the next
                // document is considered.
                if let Some(Some(finished)) = running.next().now_or_never() {
                    done(&mut documents, &keys, &mut failure, &mut feeding, finished);
                }
                next = take_next(&mut sources, &mut keys, &mut documents);
            }
            let more = next.is_some() && !shared.stopping();
            let finished = match pacing {
                Some(provider) if more => tokio::select! {
                    finished = running.next() => finished,
                    () = provider.wanting_more() => continue,
                },
                _ => running.next().await,
            };
            match finished {
                Some(finished) => done(&mut documents, &keys, &mut failure, &mut feeding, finished),
                None if more => continue,
                None => break,
            }
        }
        drop(running);
        bar.finish_and_clear();
        let listed = listing.finish();
        // Documents skipped are documents all the same.
        self.outcomes[layout.source] = Some(StageOutcome::of(
            source_stage,
            0,
            documents.len(),
            source_stats,
        ));
        if let Some((stage, err)) = failure {
            return Err(RunError::of_stage(&stage, err));
        }
        listed.map_err(|err| RunError::of_stage(&source_stage.name, err))?;
        if documents.iter().any(Option::is_none) {
            // Stopped before every document was started.
            return Err(RunError::Interrupted);
        }
        let kept = documents
            .iter()
            .filter(|d| matches!(d, Some(Document::Kept(_))))
            .count();
        self.documents_skipped = Some((kept, documents.len()));
        let documents: Vec<Document> = documents.into_iter().flatten().collect();
        self.report_documents(layout, &documents);

        // The later stages: leave their files alone when nothing they read changed.
        let digests: Vec<(String, String)> = sources
            .iter()
            .zip(&documents)
            .map(|(source, doc)| (source.to_string(), doc.digest().to_owned()))
            .collect();
        let outputs_key = OutputsKey {
            key_version: MEMO_KEY_VERSION,
            keg: KEG_VERSION,
            pipeline: &plan.hash,
            templates: &plan.templates_digest,
            vars: &plan.template_vars,
            documents: &digests,
        }
        .digest();
        if shared.read_cache && self.outputs_unchanged(layout, &outputs_key) {
            return Ok(());
        }

        if let Some(feeder) = feeding.feeder {
            // Something changed: the later stages read every document's records, one
            // document at a time.
            let counts = feed(shared, &boundary, &sources, documents, feeder)?;
            for ((&pos, fed), (records_in, records_out)) in
                layout.rest.iter().zip(&tail_stats).zip(counts)
            {
                let planned = &plan.stages[pos];
                let stats = StageStats::default();
                stats.absorb(&fed.snapshot());
                self.outcomes[pos] =
                    Some(StageOutcome::of(planned, records_in, records_out, stats));
            }
        } else {
            // Something changed: the later stages read every document's records.
            self.whole_tail(layout, documents, &sources).await?;
        }
        if shared.mode == Mode::Run {
            self.keep_outputs(layout, &outputs_key);
        }
        Ok(())
    }

    /// The later stages, run whole on every document's records at once.
    async fn whole_tail(
        &mut self,
        layout: &Layout,
        documents: Vec<Document>,
        sources: &[Arc<str>],
    ) -> Result<(), RunError> {
        let (plan, shared) = (self.plan, self.shared);
        let mut stored = read_all_records(shared, &documents)?;
        let mut boundary: Vec<Vec<Record>> = layout.boundary.iter().map(|_| Vec::new()).collect();
        for ((doc, source), stored) in documents.into_iter().zip(sources).zip(&mut stored) {
            match doc {
                Document::Kept(_) => {
                    for (b, &pos) in layout.boundary.iter().enumerate() {
                        boundary[b].extend(stored.take(&plan.stages[pos].name, source));
                    }
                }
                Document::Made(made) => {
                    for (b, (_, records)) in made.records.into_iter().enumerate() {
                        boundary[b].extend(records);
                    }
                }
            }
        }
        for (&pos, records) in layout.boundary.iter().zip(boundary) {
            self.outputs[pos] = Some(Arc::new(records));
        }
        self.stages(layout.rest.iter().copied()).await
    }

    /// The per-document stages' outcomes are the sums over documents, kept ones counted as a
    /// re-run sees them; their rejects and usage join the run's.
    fn report_documents(&mut self, layout: &Layout, documents: &[Document]) {
        let (plan, shared) = (self.plan, self.shared);
        for (k, &pos) in layout.region.iter().enumerate() {
            let planned = &plan.stages[pos];
            let stats = StageStats::default();
            let (mut records_in, mut records_out) = (0, 0);
            for doc in documents {
                let memo = match doc {
                    Document::Kept(entry) => &entry.stages[k],
                    Document::Made(made) => &made.stages[k],
                };
                records_in += memo.records_in;
                records_out += memo.records_out;
                match doc {
                    Document::Kept(_) => stats.absorb(&memo.stats.replayed()),
                    Document::Made(_) => stats.absorb(&memo.stats),
                }
            }
            self.outcomes[pos] = Some(StageOutcome::of(planned, records_in, records_out, stats));
        }
        let mut rejects = lock(&shared.rejects);
        let mut usage = lock(&shared.usage);
        for doc in documents {
            match doc {
                Document::Kept(entry) => {
                    rejects.extend(entry.rejects.iter().map(RejectMemo::restore));
                    add_usage(&mut usage, &usage_restore(&entry.usage));
                }
                Document::Made(made) => {
                    rejects.extend(made.rejects.iter().cloned());
                    add_usage(&mut usage, &made.usage);
                }
            }
        }
        for j in std::iter::once(layout.source).chain(layout.region.iter().copied()) {
            let readers = layout
                .region
                .iter()
                .filter(|&&p| plan.stages[p].inputs.contains(&j))
                .count();
            self.consumers[j] -= readers;
        }
    }

    /// When an earlier run wrote the later stages' files from the same inputs and they are
    /// intact, report those stages from it and leave the files alone.
    fn outputs_unchanged(&mut self, layout: &Layout, key: &blake3::Hash) -> bool {
        let (plan, shared) = (self.plan, self.shared);
        let Some(entry) = shared
            .store
            .get(OUTPUTS_BUCKET, key)
            .ok()
            .flatten()
            .and_then(|bytes| serde_json::from_slice::<OutputsEntry>(&bytes).ok())
        else {
            return false;
        };
        let names_match = entry
            .stages
            .iter()
            .map(|m| m.name.as_str())
            .eq(layout.rest.iter().map(|&p| plan.stages[p].name.as_str()));
        if !names_match || !entry.files.iter().all(FileMemo::intact) {
            return false;
        }
        for (memo, &pos) in entry.stages.iter().zip(&layout.rest) {
            let planned = &plan.stages[pos];
            let stats = StageStats::default();
            stats.absorb(&memo.stats.replayed());
            if shared.mode == Mode::Run {
                planned.stage.unchanged(&stats);
            }
            self.outcomes[pos] = Some(StageOutcome {
                unchanged: true,
                ..StageOutcome::of(planned, memo.records_in, memo.records_out, stats)
            });
        }
        let mut rejects = lock(&shared.rejects);
        rejects.extend(entry.rejects.iter().map(RejectMemo::restore));
        true
    }

    /// Remember what the later stages did and the files they wrote. Best effort: a run that
    /// cannot keep it only makes the next run do the work again.
    fn keep_outputs(&self, layout: &Layout, key: &blake3::Hash) {
        let (plan, shared) = (self.plan, self.shared);
        let mut stages = Vec::new();
        let mut files = Vec::new();
        for &pos in &layout.rest {
            let Some(outcome) = &self.outcomes[pos] else {
                return;
            };
            let stats = outcome.stats.snapshot();
            for (path, _) in &stats.files {
                match FileMemo::of(path) {
                    Ok(file) => files.push(file),
                    Err(_) => return,
                }
            }
            stages.push(StageMemo {
                name: outcome.name.clone(),
                records_in: outcome.records_in,
                records_out: outcome.records_out,
                stats,
            });
        }
        let rest_names: Vec<&str> = layout
            .rest
            .iter()
            .map(|&p| plan.stages[p].name.as_str())
            .collect();
        let rejects = lock(&shared.rejects)
            .iter()
            .filter(|r| rest_names.contains(&r.stage.as_str()))
            .map(RejectMemo::of)
            .collect();
        let entry = OutputsEntry {
            stages,
            rejects,
            files,
        };
        if let Ok(bytes) = serde_json::to_vec(&entry) {
            let _ = shared.store.put(OUTPUTS_BUCKET, key, &bytes);
        }
    }
}

/// Run the per-document stages over one document's records.
async fn run_document(
    plan: &Plan,
    layout: &Layout,
    shared: &RunShared,
    document: Vec<Record>,
) -> Result<Made, (String, StageError)> {
    let rejects = Mutex::new(Vec::new());
    let usage = Mutex::new(BTreeMap::new());
    // Each output is read by the stages after it and, for a boundary stage, kept.
    let mut readers: BTreeMap<usize, usize> = BTreeMap::new();
    for &pos in &layout.region {
        *readers.entry(plan.stages[pos].inputs[0]).or_default() += 1;
    }
    for &pos in &layout.boundary {
        *readers.entry(pos).or_default() += 1;
    }
    let mut outputs: BTreeMap<usize, Vec<Record>> = BTreeMap::new();
    outputs.insert(layout.source, document);
    let mut stages = Vec::with_capacity(layout.region.len());
    for &pos in &layout.region {
        let planned = &plan.stages[pos];
        let input = take(&mut outputs, &mut readers, planned.inputs[0]);
        let records_in = input.len();
        let stats = StageStats::default();
        let cx = StageContext {
            name: &planned.name,
            shared,
            stats: &stats,
            splits: planned.splits.as_deref(),
            ancestors: &planned.ancestors,
            rejects: &rejects,
            usage: &usage,
            skip: None,
            bars: false,
        };
        let output = planned
            .stage
            .run(cx, input)
            .await
            .map_err(|e| (planned.name.clone(), e))?;
        stages.push(StageMemo {
            name: planned.name.clone(),
            records_in,
            records_out: output.len(),
            stats: stats.snapshot(),
        });
        if readers.get(&pos).copied().unwrap_or(0) > 0 {
            outputs.insert(pos, output);
        }
    }
    let records: Vec<(String, Vec<Record>)> = layout
        .boundary
        .iter()
        .map(|&pos| {
            let records = outputs.remove(&pos).unwrap_or_default();
            (plan.stages[pos].name.clone(), records)
        })
        .collect();
    let rejects = rejects.into_inner().unwrap_or_else(|e| e.into_inner());
    let usage = usage.into_inner().unwrap_or_else(|e| e.into_inner());
    let stored = DocumentRecords::to_bytes(&records);
    let digest = document_digest(&stored, &rejects, &usage);
    Ok(Made {
        records,
        stored,
        stages,
        rejects,
        usage,
        digest,
        in_cache: false,
        held: 0,
    })
}

/// An output for one more reader: moved to the last, copied for the others.
fn take(
    outputs: &mut BTreeMap<usize, Vec<Record>>,
    readers: &mut BTreeMap<usize, usize>,
    pos: usize,
) -> Vec<Record> {
    let left = readers.entry(pos).or_default();
    *left = left.saturating_sub(1);
    if *left == 0 {
        outputs.remove(&pos).unwrap_or_default()
    } else {
        outputs.get(&pos).cloned().unwrap_or_default()
    }
}

/// blake3 over what later stages see of a document: its records (stored form), rejects and
/// usage.
fn document_digest(stored: &[u8], rejects: &[Reject], usage: &BTreeMap<String, Usage>) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(stored);
    let mut rejects: Vec<RejectMemo> = rejects.iter().map(RejectMemo::of).collect();
    rejects.sort_by(|a, b| (&a.path, &a.reject.stage).cmp(&(&b.path, &b.reject.stage)));
    let _ = serde_json::to_writer(HashWriter(&mut hasher), &rejects);
    let _ = serde_json::to_writer(HashWriter(&mut hasher), &usage_memo(usage));
    hasher.finalize().to_hex().to_string()
}

struct HashWriter<'a>(&'a mut blake3::Hasher);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keep a document's results for the next run: its records first, then the entry that
/// points at them, so an entry is never found without its records. Not kept: plans, and
/// documents with a call that failed (the next run tries it again). Best effort: what
/// cannot be kept is made again next time.
/// Returns whether the records are in the cache.
fn keep(shared: &RunShared, key: &blake3::Hash, made: &mut Made) -> bool {
    let stored = std::mem::take(&mut made.stored);
    if shared.mode != Mode::Run || made.rejects.iter().any(Reject::is_transient) {
        return false;
    }
    let Ok(digest) = blake3::Hash::from_hex(&made.digest) else {
        return false;
    };
    if shared
        .store
        .put(DOCUMENT_RECORDS_BUCKET, &digest, &stored)
        .is_err()
    {
        return false;
    }
    let entry = DocumentEntry {
        digest: made.digest.clone(),
        stages: made.stages.clone(),
        rejects: made.rejects.iter().map(RejectMemo::of).collect(),
        usage: usage_memo(&made.usage),
    };
    if let Ok(bytes) = serde_json::to_vec(&entry) {
        let _ = shared.store.put(DOCUMENTS_BUCKET, key, &bytes);
    }
    true
}

/// Documents a run by document reads ahead of the one it starts, in a row.
const READ_AHEAD: usize = 32;

/// Documents handed to the later stages per batch: small, so little is held at once.
const FEED_BATCH: usize = 16;

/// The later stages' feeder while the documents run, and whether it still takes each
/// document as it is made.
struct Feeding<'a> {
    feeder: Option<Feeder<'a>>,
    /// False once feeding waits for the end: from a document kept from an earlier run (or
    /// one read back), or after a later stage failed.
    active: bool,
    /// The stored size of the made documents' records held for the feeder.
    held: usize,
}

impl Feeding<'_> {
    /// Feed the documents made since, in order, up to the first not made yet; stop feeding
    /// as documents finish at the first one the feeder would have to read from the cache.
    /// A later stage's error stops it too, and is returned with the stage's name.
    fn advance(&mut self, documents: &mut [Option<Document>]) -> Result<(), (String, StageError)> {
        let Some(feeder) = self.feeder.as_mut().filter(|_| self.active) else {
            return Ok(());
        };
        while let Some(Some(doc)) = documents.get_mut(feeder.fed) {
            let Document::Made(made) = doc else {
                self.active = false;
                return Ok(());
            };
            if made.in_cache {
                self.active = false;
                return Ok(());
            }
            self.held -= std::mem::take(&mut made.held);
            if let Err(err) = feeder.push(made.take_records()) {
                self.active = false;
                return Err(err);
            }
        }
        Ok(())
    }
}

/// The stored size of made documents' records the runner holds, at most, while a document
/// before them is still being made: past it, they are read back from the cache when their
/// turn comes.
const HOLD_BYTES: usize = 32 << 20;

/// The later stages fed document by document, in order. `tree` says what each stage reads
/// ([`Layout::tree`]); a stage read by several gives each its own copy of its records.
struct Feeder<'a> {
    streams: Vec<Box<dyn Streamed + 'a>>,
    tree: &'a [usize],
    names: Vec<&'a str>,
    /// How many stages read each slot: the later stages', then the boundary stages'.
    read_by: Vec<usize>,
    /// Each slot's records until its last reader takes them, so every slot is empty again
    /// after each document.
    outputs: Vec<Vec<Record>>,
    left: Vec<usize>,
    /// Each stage's records in and out.
    counts: Vec<(usize, usize)>,
    /// How many documents, from the first, have been fed.
    fed: usize,
}

impl<'a> Feeder<'a> {
    fn new(
        streams: Vec<Box<dyn Streamed + 'a>>,
        tree: &'a [usize],
        names: Vec<&'a str>,
        boundary: usize,
    ) -> Self {
        let mut read_by = vec![0; streams.len() + boundary];
        for &from in tree {
            read_by[from] += 1;
        }
        Feeder {
            outputs: vec![Vec::new(); read_by.len()],
            left: read_by.clone(),
            read_by,
            counts: vec![(0, 0); streams.len()],
            streams,
            tree,
            names,
            fed: 0,
        }
    }

    /// Feed the next document: its records of each boundary stage, in order.
    fn push(&mut self, records: Vec<Vec<Record>>) -> Result<(), (String, StageError)> {
        let boundary_slots = self.streams.len();
        for (slot, records) in self.outputs[boundary_slots..].iter_mut().zip(records) {
            *slot = records;
        }
        self.left.copy_from_slice(&self.read_by);
        for (i, ((stream, count), name)) in self
            .streams
            .iter_mut()
            .zip(&mut self.counts)
            .zip(&self.names)
            .enumerate()
        {
            let from = self.tree[i];
            self.left[from] -= 1;
            let input = if self.left[from] == 0 {
                std::mem::take(&mut self.outputs[from])
            } else {
                self.outputs[from].clone()
            };
            count.0 += input.len();
            let output = stream.push(input).map_err(|err| (name.to_string(), err))?;
            count.1 += output.len();
            if self.read_by[i] > 0 {
                self.outputs[i] = output;
            }
        }
        self.fed += 1;
        Ok(())
    }

    /// No more documents: the stages write what is left. Returns each stage's records in
    /// and out.
    fn finish(self) -> Result<Vec<(usize, usize)>, RunError> {
        for (stream, name) in self.streams.into_iter().zip(&self.names) {
            stream
                .finish()
                .map_err(|err| RunError::of_stage(name, err))?;
        }
        Ok(self.counts)
    }
}

/// Feed the later stages the records (those of the `boundary` stages) of every document
/// the feeder has not had yet, in order, then finish them. Records in the cache are read
/// back and parsed on the other cores a few batches ahead of the stages, which run on this
/// thread.
fn feed(
    shared: &RunShared,
    boundary: &[&str],
    sources: &[Arc<str>],
    mut documents: Vec<Document>,
    mut feeder: Feeder<'_>,
) -> Result<Vec<(usize, usize)>, RunError> {
    let from = feeder.fed;
    // Documents made in this run whose records are still here (not kept, or held for the
    // feeder) hand them over from memory.
    let mut held: Vec<Option<Vec<Vec<Record>>>> = documents[from..]
        .iter_mut()
        .map(|doc| match doc {
            Document::Made(made) if !made.in_cache => Some(made.take_records()),
            _ => None,
        })
        .collect();
    let documents = &documents[from..];
    let sources = &sources[from..];
    // This thread feeds the stages the whole time and keeps a core busy; the readers share
    // the others. A reader per core besides ran three threads on two cores, each reader
    // with a fresh heap and SQLite connection, and saved no time: feeding is the slower
    // side (BENCHMARKS.md, tenth round).
    let readers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1);
    let batches = documents.len().div_ceil(FEED_BATCH);
    type Batch = Result<Vec<Option<Vec<Vec<Record>>>>, RunError>;
    std::thread::scope(|scope| {
        // Reader `w` reads batches w, w + readers, …, each into a channel of its own, so
        // this thread takes them in order and no reader runs more than two batches ahead.
        // No reader starts when every document left is in memory.
        let reading = documents.iter().any(|doc| match doc {
            Document::Kept(_) => true,
            Document::Made(made) => made.in_cache,
        });
        let receivers: Vec<mpsc::Receiver<Batch>> = (0..readers)
            .filter(|_| reading)
            .map(|w| {
                let (sender, receiver) = mpsc::sync_channel::<Batch>(2);
                scope.spawn(move || {
                    for b in (w..batches).step_by(readers) {
                        let end = ((b + 1) * FEED_BATCH).min(documents.len());
                        let batch: Batch = (b * FEED_BATCH..end)
                            .map(|i| {
                                let digest = match &documents[i] {
                                    Document::Kept(entry) => &entry.digest,
                                    Document::Made(made) if made.in_cache => &made.digest,
                                    Document::Made(_) => return Ok(None),
                                };
                                let mut stored = read_records(shared, digest)?;
                                Ok(Some(
                                    boundary
                                        .iter()
                                        .map(|name| stored.take(name, &sources[i]))
                                        .collect(),
                                ))
                            })
                            .collect();
                        let failed = batch.is_err();
                        if sender.send(batch).is_err() || failed {
                            return;
                        }
                    }
                });
                receiver
            })
            .collect();
        for b in 0..batches {
            let batch = match receivers.get(b % readers) {
                Some(receiver) => receiver.recv().map_err(|_| RunError::Cache {
                    path: std::path::PathBuf::from(DOCUMENT_RECORDS_BUCKET),
                    source: std::io::Error::other("a thread reading the cache stopped"),
                })??,
                None => vec![None; FEED_BATCH.min(documents.len() - b * FEED_BATCH)],
            };
            for (k, records) in batch.into_iter().enumerate() {
                let records = records
                    .or_else(|| held[b * FEED_BATCH + k].take())
                    .unwrap_or_default();
                feeder
                    .push(records)
                    .map_err(|(name, err)| RunError::of_stage(&name, err))?;
            }
        }
        if shared.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(RunError::Interrupted);
        }
        feeder.finish()
    })
}

/// The records of every kept document (empty for the others), read and parsed on all
/// cores: for 10,000 documents this is most of what a run after a small edit does.
fn read_all_records(
    shared: &RunShared,
    documents: &[Document],
) -> Result<Vec<DocumentRecords>, RunError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = documents.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = documents
            .chunks(per_thread)
            .map(|docs| {
                scope.spawn(move || {
                    docs.iter()
                        .map(|doc| match doc {
                            Document::Kept(entry) => read_records(shared, &entry.digest),
                            Document::Made(_) => Ok(DocumentRecords::default()),
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(documents.len());
        for worker in workers {
            let part = worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            all.extend(part);
        }
        Ok(all)
    })
}

/// A kept document's records.
fn read_records(shared: &RunShared, digest: &str) -> Result<DocumentRecords, RunError> {
    let missing = || RunError::Cache {
        path: std::path::PathBuf::from(DOCUMENT_RECORDS_BUCKET),
        source: std::io::Error::other(format!(
            "the records of a document ({digest}) are missing or damaged; run `keg cache clear` or pass `--no-cache`"
        )),
    };
    let digest = blake3::Hash::from_hex(digest).map_err(|_| missing())?;
    let bytes = shared
        .store
        .get(DOCUMENT_RECORDS_BUCKET, &digest)
        .map_err(|_| missing())?
        .ok_or_else(missing)?;
    serde_json::from_slice(&bytes).map_err(|_| missing())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What each later stage is fed, as `stage < input`, for a pipeline whose stages after
    /// `chunks` are `later`; `None` when they run whole.
    fn tree_of(later: &str) -> Option<Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(
            &path,
            format!(
                "version: 1\nname: p\nstages:\n  docs: {{kind: load, paths: [\"*.md\"]}}\n  \
                 chunks: {{kind: chunk, inputs: [docs]}}\n{later}"
            ),
        )
        .unwrap();
        let plan = Plan::load(&path, &[]).unwrap_or_else(|err| panic!("{err:?}"));
        let layout = Layout::of(&plan).unwrap();
        let name = |p: usize| &plan.stages[p].name;
        let tree = layout.tree?;
        let slots: Vec<usize> = layout
            .rest
            .iter()
            .chain(&layout.boundary)
            .copied()
            .collect();
        Some(
            layout
                .rest
                .iter()
                .zip(tree)
                .map(|(&p, from)| format!("{} < {}", name(p), name(slots[from])))
                .collect(),
        )
    }

    #[test]
    fn later_stages_reading_one_stage_each_are_fed_as_trees() {
        let unique = "  unique: {kind: dedupe, inputs: [chunks], fields: [text]}\n";
        let splits = "  splits: {kind: split, inputs: [unique], ratios: {train: 0.5, test: 0.5}}\n";
        let out = "  out: {kind: export, inputs: [splits], dir: out}\n";
        // What each later stage is fed, sorted: the run order of stages on separate
        // branches is not the order they are written in.
        let fed = |later: String| {
            let mut tree = tree_of(&later).unwrap();
            tree.sort();
            tree.join(", ")
        };
        // A chain: each stage reads the one before.
        assert_eq!(
            fed(format!("{unique}{splits}{out}")),
            "out < splits, splits < unique, unique < chunks"
        );
        // A fork: two exports of one split, and one of the chunks themselves.
        let chat = "  chat: {kind: export, inputs: [splits], dir: chat, format: chat}\n";
        let raw = "  raw: {kind: export, inputs: [chunks], dir: raw}\n";
        assert_eq!(
            fed(format!("{unique}{splits}{out}{chat}{raw}")),
            "chat < splits, out < splits, raw < chunks, splits < unique, unique < chunks"
        );
        // Two trees, from two per-document stages.
        let small = "  small: {kind: chunk, inputs: [docs], max_chars: 400, overlap: 20}\n";
        let pieces = "  pieces: {kind: export, inputs: [small], dir: pieces}\n";
        assert_eq!(
            fed(format!("{small}{unique}{splits}{out}{pieces}")),
            "out < splits, pieces < small, splits < unique, unique < chunks"
        );
        // A join reads two stages: run whole.
        let both = "  both: {kind: export, inputs: [splits, unique], dir: both}\n";
        assert_eq!(tree_of(&format!("{unique}{splits}{both}")), None);
    }
}
