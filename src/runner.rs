//! Runs a plan: stages in order, each fed the records of its inputs (in the order the inputs
//! are listed), with the cache and counters shared across the run.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::cache::DiskStore;
use crate::config::Plan;
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
}

pub struct RunOutcome {
    pub stages: Vec<StageOutcome>,
    pub rejects: Vec<Reject>,
    pub elapsed: Duration,
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

    let n = plan.stages.len();
    let mut consumers = vec![0usize; n];
    for stage in &plan.stages {
        for &j in &stage.inputs {
            consumers[j] += 1;
        }
    }
    let mut outputs: Vec<Option<Arc<Vec<Record>>>> = vec![None; n];
    let mut outcomes = Vec::with_capacity(n);
    let mut result = Ok(());
    for (pos, planned) in plan.stages.iter().enumerate() {
        let mut input = Vec::new();
        for &j in &planned.inputs {
            consumers[j] -= 1;
            let records = if consumers[j] == 0 {
                outputs[j].take()
            } else {
                outputs[j].clone()
            };
            if let Some(records) = records {
                match Arc::try_unwrap(records) {
                    Ok(owned) if input.is_empty() => input = owned,
                    Ok(owned) => input.extend(owned),
                    Err(shared) => input.extend(shared.iter().cloned()),
                }
            }
        }
        let records_in = input.len();
        let stats = StageStats::default();
        let cx = StageContext {
            name: &planned.name,
            shared: &shared,
            stats: &stats,
            splits: planned.splits.as_deref(),
            ancestors: &planned.ancestors,
        };
        let output = planned.stage.run(cx, input).await;
        let records_out = output.as_ref().map_or(0, Vec::len);
        outcomes.push(StageOutcome {
            name: planned.name.clone(),
            kind: planned.kind,
            records_in,
            records_out,
            stats,
        });
        match output {
            Ok(records) => outputs[pos] = Some(Arc::new(records)),
            Err(StageError::Interrupted) => {
                result = Err(RunError::Interrupted);
                break;
            }
            Err(source) => {
                result = Err(RunError::Stage {
                    stage: planned.name.clone(),
                    source,
                });
                break;
            }
        }
        if shared.stop.load(Ordering::Relaxed) {
            result = Err(RunError::Interrupted);
            break;
        }
    }
    if let Some(handle) = signals {
        handle.abort();
    }
    let rejects = std::mem::take(&mut *shared.rejects.lock().unwrap_or_else(|e| e.into_inner()));
    result.map(|()| RunOutcome {
        stages: outcomes,
        rejects,
        elapsed: started.elapsed(),
    })
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
