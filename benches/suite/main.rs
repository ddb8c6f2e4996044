//! The performance suite of issue 5. It drives the release `keg` binary as a user would,
//! against a mock OpenAI-compatible server it starts itself (latency, jitter and slow replies
//! configurable), on corpora it generates, and prints every figure beside its ideal.
//!
//! ```text
//! cargo bench --bench suite               # full sizes (6–8 minutes on 2 cores)
//! cargo bench --bench suite -- --quick    # small sizes: checks the suite still runs
//! cargo bench --bench suite -- --help
//! ```
//!
//! Method, targets and results: `BENCHMARKS.md`.

mod baseline;
mod corpus;
mod keg;
mod micro;
mod million;
mod mock;
mod report;
mod rerun;
mod throughput;

// `keg`'s own allocator: the mock and the barrier-free client run in this process, on the
// same two cores as `keg`, and the micro scenarios time `keg`'s code in process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::corpus::Corpus;
use crate::keg::{Keg, Stages};
use crate::mock::{Behavior, Mock};
use crate::report::Figure;

const USAGE: &str = "\
usage: cargo bench --bench suite -- [options]

  --quick             small sizes (CI: checks the suite runs; never fails on a missed target)
  --only LIST         run only these scenarios: throughput,slow,rerun,million,micro
  --latency-ms N      mock latency for throughput, slow and edit runs (default 50)
  --jitter-ms N       extra delay in [0, N) per request, by request hash (default 0)
  --slow-percent P    share of slow replies in the `slow` scenario (default 1; with
                      --serve, default 0)
  --slow-ms N         delay of a slow reply (default 2000)
  --keep              keep the generated corpora, caches and outputs
  --cache-root DIR    put keg's caches under DIR (e.g. /dev/shm, to take the disk out of
                      the figures); default: the work folder under target/
  --serve SECONDS     only start the mock with the options above, print its URL, and stop
                      after SECONDS (for profiling keg by hand)
  --keg PATH          run this keg binary rather than the one cargo built (to compare two
                      builds, or to train a profile-guided build: scripts/pgo-profile)
";

type Scenario = fn(&mut Bench) -> Result<()>;

pub const SCENARIOS: &[&str] = &["micro", "throughput", "slow", "rerun", "million"];

/// Sizes of everything a run generates.
pub struct Sizes {
    /// Documents of the main corpus (about 10 KB each).
    pub docs: usize,
    /// Throughput runs send `concurrency × rounds` calls (rounded up to whole folders).
    pub rounds: usize,
    pub slow_rounds: usize,
    pub slow_concurrency: Vec<usize>,
    /// Calls of the million-record run; each reply holds `items_per_call` items.
    pub million_calls: usize,
    pub items_per_call: usize,
    /// Repetitions of short runs; the best is kept.
    pub repeats: usize,
    /// Runs of each fixed-latency throughput scenario (targets 1a, 1b, 2a, 2b); each figure
    /// is their median.
    pub throughput_runs: usize,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            docs: 10_000,
            rounds: 40,
            slow_rounds: 80,
            slow_concurrency: vec![64, 512],
            million_calls: 10_000,
            items_per_call: 100,
            repeats: 2,
            throughput_runs: 3,
        }
    }

    fn quick() -> Sizes {
        Sizes {
            docs: 400,
            rounds: 8,
            slow_rounds: 20,
            slow_concurrency: vec![64],
            million_calls: 100,
            items_per_call: 100,
            repeats: 1,
            throughput_runs: 2,
        }
    }
}

pub struct Options {
    pub quick: bool,
    pub only: Vec<String>,
    pub latency: Duration,
    pub jitter: Duration,
    pub slow_fraction: f64,
    /// Whether `--slow-percent` was given (`--serve` has no slow replies otherwise).
    pub slow_given: bool,
    pub slow_latency: Duration,
    pub keep: bool,
    pub cache_root: Option<PathBuf>,
    pub serve: Option<Duration>,
    /// The `keg` binary to run; default: the one cargo built with the suite.
    pub keg: Option<PathBuf>,
}

impl Options {
    /// None when there is nothing to run: `cargo test --benches` runs bench binaries with no
    /// arguments, and the suite is not a test.
    fn parse() -> Result<Option<Options>> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.is_empty() {
            return Ok(None);
        }
        let mut options = Options {
            quick: false,
            only: Vec::new(),
            latency: Duration::from_millis(50),
            jitter: Duration::ZERO,
            slow_fraction: 0.01,
            slow_given: false,
            slow_latency: Duration::from_secs(2),
            keep: false,
            cache_root: None,
            serve: None,
            keg: None,
        };
        let mut args = args.into_iter();
        let number = |name: &str, value: Option<String>| -> Result<f64> {
            let value = value.with_context(|| format!("`{name}` needs a value"))?;
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .with_context(|| format!("`{name} {value}`: expected a number"))
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // `cargo bench` passes it to every bench binary.
                "--bench" => {}
                "--quick" => options.quick = true,
                "--keep" => options.keep = true,
                "--cache-root" => {
                    options.cache_root = Some(PathBuf::from(
                        args.next().context("`--cache-root` needs a folder")?,
                    ))
                }
                "--only" => {
                    let list = args.next().context("`--only` needs a list")?;
                    for name in list.split(',') {
                        if !SCENARIOS.contains(&name) {
                            bail!("unknown scenario `{name}`; known: {}", SCENARIOS.join(", "));
                        }
                        options.only.push(name.to_owned());
                    }
                }
                "--latency-ms" => {
                    options.latency = Duration::from_secs_f64(number(&arg, args.next())? / 1e3)
                }
                "--jitter-ms" => {
                    options.jitter = Duration::from_secs_f64(number(&arg, args.next())? / 1e3)
                }
                "--slow-percent" => {
                    options.slow_fraction = number(&arg, args.next())? / 100.0;
                    options.slow_given = true;
                }
                "--slow-ms" => {
                    options.slow_latency = Duration::from_secs_f64(number(&arg, args.next())? / 1e3)
                }
                "--serve" => {
                    options.serve = Some(Duration::from_secs_f64(number(&arg, args.next())?))
                }
                "--keg" => {
                    let path = PathBuf::from(args.next().context("`--keg` needs a path")?);
                    if !path.is_file() {
                        bail!("`--keg {}`: no such file", path.display());
                    }
                    options.keg = Some(path);
                }
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown option `{other}`\n{USAGE}"),
            }
        }
        Ok(Some(options))
    }

    fn runs(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

/// Everything scenarios share: the binary, the mock, the work folder, and the figures so far.
pub struct Bench {
    pub options: Options,
    pub sizes: Sizes,
    pub keg: Keg,
    pub mock: Mock,
    pub work: PathBuf,
    /// Where `keg`'s caches go: the work folder, or a folder under `--cache-root`.
    pub caches: PathBuf,
    pub pipeline: PathBuf,
    pub pipeline_up_to_validate: PathBuf,
    /// The bench pipeline with a second export: see [`keg::Stages::Fork`].
    pub pipeline_fork: PathBuf,
    corpus: Option<Corpus>,
    figures: RefCell<Vec<Figure>>,
}

impl Bench {
    /// The main corpus (generated on first use).
    pub fn corpus(&mut self) -> Result<&Corpus> {
        if self.corpus.is_none() {
            let started = Instant::now();
            let corpus = corpus::markdown(&self.work.join("docs"), self.sizes.docs, 1)?;
            progress(&format!(
                "generated {} documents, {}, {} chunks in {:.1} s",
                report::thousands(corpus.docs.len() as u64),
                report::megabytes(corpus.bytes() as u64),
                report::thousands(corpus.chunks() as u64),
                started.elapsed().as_secs_f64()
            ));
            self.corpus = Some(corpus);
        }
        self.corpus.as_ref().context("no corpus")
    }

    pub fn push(&self, figure: Figure) {
        let ratio = figure
            .ratio
            .map(|r| format!(" (ratio {r:.3}, goal {:?})", figure.goal))
            .unwrap_or_default();
        progress(&format!(
            "  {} {}: {}{ratio}",
            figure.target, figure.name, figure.measured
        ));
        self.figures.borrow_mut().push(figure);
    }

    /// An empty folder under the work folder.
    pub fn fresh_dir(&self, name: &str) -> Result<PathBuf> {
        fresh(&self.work.join(name))
    }

    /// An empty folder for a `keg` cache.
    pub fn cache_dir(&self, name: &str) -> Result<PathBuf> {
        fresh(&self.caches.join(name))
    }

    /// The mock's behaviour for runs that measure calls: the configured latency and jitter.
    pub fn timed_behavior(&self) -> Behavior {
        Behavior {
            latency: self.options.latency,
            jitter: self.options.jitter,
            ..Behavior::default()
        }
    }
}

fn fresh(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

pub fn progress(message: &str) {
    eprintln!("bench: {message}");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(keg::MEASURE_CHILD) {
        return match keg::measure_child(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let Some(options) = Options::parse()? else {
        eprintln!("the benchmark suite runs with `cargo bench --bench suite` (see BENCHMARKS.md)");
        return Ok(ExitCode::SUCCESS);
    };
    raise_open_files_limit();
    if let Some(duration) = options.serve {
        return serve(&options, duration);
    }
    if cfg!(debug_assertions) {
        progress("warning: built without optimizations; run it with `cargo bench`");
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_keg"));
    let exe = match &options.keg {
        Some(path) => std::path::absolute(path)?,
        None => built.clone(),
    };
    // <target>/<profile>/keg → <target>/bench-corpus/run-<pid>
    let target = built
        .parent()
        .and_then(Path::parent)
        .context("cannot find the target folder")?
        .to_path_buf();
    let runs = target.join("bench-corpus");
    let work = runs.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    if options.keep {
        std::fs::write(work.join(KEEP_MARKER), "kept by --keep\n")?;
    }
    let pipeline = work.join("bench.yaml");
    std::fs::write(&pipeline, keg::pipeline_yaml(Stages::All))?;
    let pipeline_up_to_validate = work.join("bench-up-to-validate.yaml");
    std::fs::write(
        &pipeline_up_to_validate,
        keg::pipeline_yaml(Stages::UpToValidate),
    )?;
    let pipeline_fork = work.join("bench-fork.yaml");
    std::fs::write(&pipeline_fork, keg::pipeline_yaml(Stages::Fork))?;
    let sizes = if options.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let caches = match &options.cache_root {
        Some(root) => root.join(format!("keg-bench-{}", std::process::id())),
        None => work.clone(),
    };
    // What fresh memory costs on a calm machine, before the bench has freed any.
    keg::settle()?;
    let mock = Mock::start(Behavior::default())?;
    progress(&format!(
        "{} run of {} ({}), mock at {}, work in {}",
        if options.quick { "quick" } else { "full" },
        exe.display(),
        revision(),
        mock.base_url(),
        work.display()
    ));
    let mut bench = Bench {
        options,
        sizes,
        keg: Keg {
            exe,
            dir: work.clone(),
        },
        mock,
        work: work.clone(),
        caches: caches.clone(),
        pipeline,
        pipeline_up_to_validate,
        pipeline_fork,
        corpus: None,
        figures: RefCell::new(Vec::new()),
    };
    let started = Instant::now();
    let load_at_start = load_average();
    progress(&format!("load average {load_at_start}"));
    let scenarios: [(&str, Scenario); 5] = [
        ("micro", micro::run),
        ("throughput", throughput::fixed_latency),
        ("slow", throughput::slow_replies),
        ("rerun", rerun::run),
        ("million", million::run),
    ];
    let mut result = Ok(());
    for (name, scenario) in scenarios {
        if !bench.options.runs(name) {
            continue;
        }
        let began = Instant::now();
        progress(&format!("scenario `{name}`"));
        if let Err(err) = scenario(&mut bench) {
            result = Err(err.context(format!("scenario `{name}`")));
            break;
        }
        progress(&format!(
            "scenario `{name}` done in {:.1} s",
            began.elapsed().as_secs_f64()
        ));
    }
    let figures = bench.figures.take();
    let table = report::table(&figures);
    let missed: Vec<String> = figures
        .iter()
        .filter(|f| f.passed() == Some(false))
        .map(|f| format!("{} ({})", f.target, f.name))
        .collect();
    let mut text = format!(
        "keg benchmarks: {} run, {}, {} cores, {:.0} s; load average {} at the start, {} at the end\n\n{table}",
        if bench.options.quick { "quick" } else { "full" },
        revision(),
        std::thread::available_parallelism().map_or(0, usize::from),
        started.elapsed().as_secs_f64(),
        load_at_start,
        load_average(),
    );
    if missed.is_empty() {
        text.push_str("\nevery target met\n");
    } else {
        text.push_str(&format!(
            "\nMISSED {} of {} targets: {}\n",
            missed.len(),
            figures.iter().filter(|f| f.passed().is_some()).count(),
            missed.join(", ")
        ));
    }
    print!("{text}");
    let _ = std::fs::write(target.join("bench-report.md"), &text);
    drop(bench.mock);
    // Nothing is deleted before the last measurement: on ext4, creating files soon after
    // deleting many is several times slower (the allocator skips recently freed inodes), and
    // `keg` creates one cache file per call.
    if !bench.options.keep {
        progress("removing the work folder");
        let _ = std::fs::remove_dir_all(&work);
        let _ = std::fs::remove_dir_all(&caches);
    }
    remove_stale_runs(&runs);
    result?;
    // Benchmarks are not tests: a missed target is reported, never an error.
    Ok(ExitCode::SUCCESS)
}

/// `--serve`: only the mock, for profiling `keg` by hand; it stops by itself.
fn serve(options: &Options, duration: Duration) -> Result<ExitCode> {
    let mock = Mock::start(Behavior {
        latency: options.latency,
        jitter: options.jitter,
        slow_fraction: if options.slow_given {
            options.slow_fraction
        } else {
            0.0
        },
        slow_latency: options.slow_latency,
        ..Behavior::default()
    })?;
    println!("{}", mock.base_url());
    progress(&format!(
        "serving for {:.0} s; write the pipeline with the bench's own (see BENCHMARKS.md)",
        duration.as_secs_f64()
    ));
    let step = Duration::from_secs(1);
    let began = Instant::now();
    while began.elapsed() < duration {
        std::thread::sleep(step);
    }
    let window = mock.window();
    progress(&format!(
        "served {} requests over {:.3} s",
        window.requests,
        window.span.as_secs_f64()
    ));
    Ok(ExitCode::SUCCESS)
}

/// 512 connections from `keg` and 512 from the baseline, on both ends: more than the common
/// default of 1,024 descriptors. The limit is inherited by `keg`.
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a plain struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Marks a work folder that `--keep` asked to keep.
const KEEP_MARKER: &str = "KEEP";

/// Work folders of earlier runs whose process is gone (killed runs leave theirs behind),
/// except those kept with `--keep`.
fn remove_stale_runs(runs: &Path) {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("run-")
            && !Path::new("/proc").join(pid).exists()
            && !entry.path().join(KEEP_MARKER).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The 1-minute load average: on a shared 2-core machine, what else was running.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `git describe` of the crate, or `unknown revision`.
fn revision() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown revision".to_owned())
}
