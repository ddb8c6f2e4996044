//! Runs a plan: stages in order, each fed the records of its inputs (in the order the inputs
//! are listed), with the cache and counters shared across the run.
//!
//! When the pipeline starts with one `load` stage followed by per-document stages (chunk,
//! prompt, generate, validate), those run document by document and what they made of each
//! document is kept in the cache (`runner::documents`): a re-run skips every unchanged document,
//! and when no document changed, leaves the outputs of the later stages alone.

mod documents;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::cache::DiskStore;
use crate::config::Plan;
use crate::config::plan::PlannedStage;
use crate::lock;
use crate::record::Record;
use crate::stage::{Mode, Reject, RunShared, StageContext, StageError, StageStats};

pub struct RunOptions {
    pub mode: Mode,
    /// False with `--no-cache`.
    pub read_cache: bool,
    pub cache_dir: PathBuf,
    /// Draw progress bars (stderr, when it is a terminal).
    pub progress: bool,
}

pub struct StageOutcome {
    pub name: String,
    pub kind: &'static str,
    pub records_in: usize,
    pub records_out: usize,
    pub stats: StageStats,
    /// The stage did not run: its outputs from an earlier run are intact and its inputs are
    /// unchanged.
    pub unchanged: bool,
}

impl StageOutcome {
    /// What a run of `planned` did: `records_in` → `records_out`, with `stats`.
    fn of(
        planned: &PlannedStage,
        records_in: usize,
        records_out: usize,
        stats: StageStats,
    ) -> Self {
        StageOutcome {
            name: planned.name.clone(),
            kind: planned.kind,
            records_in,
            records_out,
            stats,
            unchanged: false,
        }
    }
}

pub struct RunOutcome {
    pub stages: Vec<StageOutcome>,
    pub rejects: Vec<Reject>,
    pub elapsed: Duration,
    /// Documents whose per-document results came from the cache, of all documents; `None`
    /// when the pipeline is not split by document.
    pub documents_skipped: Option<(usize, usize)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the cache at {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stage `{stage}`: {source}")]
    Stage { stage: String, source: StageError },
    #[error("interrupted: finished calls are cached; no output file was written")]
    Interrupted,
}

impl RunError {
    fn of_stage(stage: &str, source: StageError) -> RunError {
        match source {
            StageError::Interrupted => RunError::Interrupted,
            source => RunError::Stage {
                stage: stage.to_owned(),
                source,
            },
        }
    }
}

pub async fn execute(plan: &Plan, options: &RunOptions) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    let store = DiskStore::open(&options.cache_dir).map_err(|source| RunError::Cache {
        path: options.cache_dir.clone(),
        source,
    })?;
    let progress = if options.progress {
        indicatif::MultiProgress::new()
    } else {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    };
    let shared = Arc::new(RunShared {
        mode: options.mode,
        store: Arc::new(store),
        read_cache: options.read_cache,
        pipeline_name: plan.file.name.clone(),
        pipeline_hash: plan.hash.clone(),
        models: plan.models(),
        documents: Default::default(),
        rejects: Default::default(),
        progress,
        stop: Default::default(),
        usage: Default::default(),
    });
    let signals =
        (options.mode == Mode::Run).then(|| tokio::spawn(watch_interrupts(shared.clone())));

    let mut run = Run::new(plan, &shared);
    let result = match documents::Layout::of(plan) {
        Some(layout) => run.by_document(&layout).await,
        None => run.stages(0..plan.stages.len()).await,
    };
    if let Some(handle) = signals {
        handle.abort();
    }
    // Whatever happened, what was cached (calls, kept documents, outputs) is on disk before
    // anything is reported.
    let store = shared.store.clone();
    let flushed = tokio::task::spawn_blocking(move || store.flush())
        .await
        .unwrap_or_else(|err| Err(std::io::Error::other(err)));
    let result = match (result, flushed) {
        (Ok(()), Err(source)) => Err(RunError::Cache {
            path: options.cache_dir.clone(),
            source,
        }),
        (result, _) => result,
    };
    let rejects = std::mem::take(&mut *lock(&shared.rejects));
    let documents_skipped = run.documents_skipped;
    let stages = run.outcomes.into_iter().flatten().collect();
    // The last stages' records live until the process exits, which frees them at once;
    // freeing a million records one by one would take a second.
    std::mem::forget(run.outputs);
    result.map(|()| RunOutcome {
        stages,
        rejects,
        elapsed: started.elapsed(),
        documents_skipped,
    })
}

/// One run's stage outputs and outcomes, by stage position.
struct Run<'a> {
    plan: &'a Plan,
    shared: &'a RunShared,
    /// How many stages still have to read each stage's output.
    consumers: Vec<usize>,
    outputs: Vec<Option<Arc<Vec<Record>>>>,
    outcomes: Vec<Option<StageOutcome>>,
    documents_skipped: Option<(usize, usize)>,
}

impl<'a> Run<'a> {
    fn new(plan: &'a Plan, shared: &'a RunShared) -> Run<'a> {
        let n = plan.stages.len();
        let mut consumers = vec![0usize; n];
        for stage in &plan.stages {
            for &j in &stage.inputs {
                consumers[j] += 1;
            }
        }
        Run {
            plan,
            shared,
            consumers,
            outputs: vec![None; n],
            outcomes: (0..n).map(|_| None).collect(),
            documents_skipped: None,
        }
    }

    /// Run these stages whole, in order.
    async fn stages(&mut self, positions: impl Iterator<Item = usize>) -> Result<(), RunError> {
        for pos in positions {
            self.stage(pos).await?;
        }
        Ok(())
    }

    /// The records a stage reads: its inputs' outputs in the order listed. The last reader
    /// of an output takes it without a copy.
    fn take_input(&mut self, pos: usize) -> Vec<Record> {
        let mut input = Vec::new();
        for &j in &self.plan.stages[pos].inputs {
            self.consumers[j] -= 1;
            let records = if self.consumers[j] == 0 {
                self.outputs[j].take()
            } else {
                self.outputs[j].clone()
            };
            if let Some(records) = records {
                match Arc::try_unwrap(records) {
                    Ok(owned) if input.is_empty() => input = owned,
                    Ok(owned) => input.extend(owned),
                    Err(shared) => input.extend(shared.iter().cloned()),
                }
            }
        }
        input
    }

    /// Run one stage over all of its input.
    async fn stage(&mut self, pos: usize) -> Result<(), RunError> {
        let planned = &self.plan.stages[pos];
        let input = self.take_input(pos);
        let records_in = input.len();
        let stats = StageStats::default();
        let cx = StageContext {
            name: &planned.name,
            shared: self.shared,
            stats: &stats,
            splits: planned.splits.as_deref(),
            ancestors: &planned.ancestors,
            rejects: &self.shared.rejects,
            usage: &self.shared.usage,
            skip: None,
            bars: true,
        };
        let output = planned.stage.run(cx, input).await;
        self.outcomes[pos] = Some(StageOutcome::of(
            planned,
            records_in,
            output.as_ref().map_or(0, Vec::len),
            stats,
        ));
        let records = output.map_err(|e| RunError::of_stage(&planned.name, e))?;
        self.outputs[pos] = Some(Arc::new(records));
        if self.shared.stop.load(Ordering::Relaxed) {
            return Err(RunError::Interrupted);
        }
        Ok(())
    }
}

/// First Ctrl-C: start no new call, let those in flight finish. Second: leave at once.
async fn watch_interrupts(shared: Arc<RunShared>) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    shared.stop.store(true, Ordering::Relaxed);
    eprintln!("\nkeg: stopping after the calls in flight (Ctrl-C again to abort)");
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(130);
    }
}
