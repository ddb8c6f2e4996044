//! Running the real `keg` binary as a user would, measuring what it costs: wall time, CPU
//! (user + sys from `wait4`, so the child alone) and peak resident memory.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Which stages of the bench pipeline to keep; the shorter ones measure the longer ones by
/// difference.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Stages {
    /// load → chunk → prompt → generate → validate → dedupe → split → export.
    All,
    /// Up to `validate`: everything but the aggregate stages.
    UpToValidate,
    /// All, and a second export of the same split in the chat format (into `${out}-chat`):
    /// the later stages form a fork, not a chain.
    Fork,
}

/// The bench pipeline: the shipped `docs-qa` pipeline with its templates and schemas, with
/// `glob`, `concurrency`, `items` and `base_url` as vars.
pub fn pipeline_yaml(stages: Stages) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut yaml = format!(
        r#"# Written by benches/suite (see BENCHMARKS.md).
version: 1
name: bench
vars:
  glob: docs/**/*.md
  out: out
  base_url: http://127.0.0.1:9/v1
  concurrency: 64
  items: "2"
templates: ["{templates}"]
providers:
  llm:
    kind: openai
    base_url: ${{base_url}}
    model: bench
    concurrency: ${{concurrency}}
    temperature: 0.7
    seed: 1
    max_tokens: 2048
    timeout_secs: 120
    max_retries: 2
stages:
  docs:
    kind: load
    paths: ["${{glob}}"]
  chunks:
    kind: chunk
    inputs: [docs]
    strategy: markdown
    max_chars: {chunk_chars}
    overlap: {overlap}
  prompts:
    kind: prompt
    inputs: [chunks]
    system_template: qa/system.j2
    user_template: qa/user.j2
    items: "${{items}}"
  pairs:
    kind: generate
    inputs: [prompts]
    provider: llm
    schema: {schemas}/qa-pairs.schema.json
    items_field: pairs
  checked:
    kind: validate
    inputs: [pairs]
    schema: {schemas}/qa-pair.schema.json
"#,
        templates = repo.join("templates").display(),
        schemas = repo.join("schemas").display(),
        chunk_chars = crate::corpus::CHUNK_CHARS,
        overlap = crate::corpus::CHUNK_OVERLAP,
    );
    if stages != Stages::UpToValidate {
        yaml.push_str(
            r#"  unique:
    kind: dedupe
    inputs: [checked]
    fields: [question]
  splits:
    kind: split
    inputs: [unique]
    ratios: {train: 0.8, valid: 0.1, test: 0.1}
    group_by: chunk
    seed: 7
  dataset:
    kind: export
    inputs: [splits]
    dir: ${out}
    format: prompt-completion
    prompt: question
    completion: answer
"#,
        );
    }
    if stages == Stages::Fork {
        yaml.push_str(
            r#"  chat:
    kind: export
    inputs: [splits]
    dir: ${out}-chat
    format: chat
    prompt: question
    completion: answer
"#,
        );
    }
    yaml
}

/// What one `keg` process cost.
#[derive(Debug)]
pub struct Measured {
    pub wall: Duration,
    pub cpu: Duration,
    pub max_rss: u64,
    /// Pages first touched (minor page faults): each costs a page of fresh memory, whose
    /// price varies with the machine (see [`fresh_page_cost`]).
    pub page_faults: u64,
    /// What a page of fresh memory cost when the run started (see [`settle`]).
    pub fresh_page: Duration,
    pub stdout: String,
    pub stderr: String,
}

/// A `keg` binary and the folder it runs in.
pub struct Keg {
    pub exe: PathBuf,
    pub dir: PathBuf,
}

/// Arguments of one invocation, built up fluently.
pub struct Invocation {
    command: &'static str,
    pipeline: PathBuf,
    sets: Vec<(String, String)>,
    cache: PathBuf,
    flags: Vec<&'static str>,
}

impl Invocation {
    pub fn new(command: &'static str, pipeline: &Path, cache: &Path) -> Invocation {
        Invocation {
            command,
            pipeline: pipeline.to_path_buf(),
            sets: Vec::new(),
            cache: cache.to_path_buf(),
            flags: Vec::new(),
        }
    }

    pub fn set(mut self, name: &str, value: impl ToString) -> Invocation {
        self.sets.push((name.to_owned(), value.to_string()));
        self
    }

    pub fn flag(mut self, flag: &'static str) -> Invocation {
        self.flags.push(flag);
        self
    }
}

impl Keg {
    /// Run `keg`, wait for it with `wait4` and fail unless it exits 0.
    pub fn run(&self, invocation: &Invocation) -> Result<Measured> {
        let mut args = vec![
            invocation.command.to_owned(),
            invocation.pipeline.display().to_string(),
        ];
        for (name, value) in &invocation.sets {
            args.push("--set".into());
            args.push(format!("{name}={value}"));
        }
        args.extend(invocation.flags.iter().map(|f| (*f).to_owned()));
        let stdout_path = self.dir.join("keg.stdout");
        let stderr_path = self.dir.join("keg.stderr");
        let stdout = File::create(&stdout_path).context("cannot create keg.stdout")?;
        let stderr = File::create(&stderr_path).context("cannot create keg.stderr")?;
        let report_path = self.dir.join("keg.usage");
        let _ = std::fs::remove_file(&report_path);
        let fresh_page = settle()?;
        // Through a small helper process: see `measure_child`.
        let mut helper = Command::new(std::env::current_exe().context("no path to the bench")?)
            .arg(MEASURE_CHILD)
            .arg(&report_path)
            .arg(&self.exe)
            .args(&args)
            .current_dir(&self.dir)
            .env("KEG_CACHE_DIR", &invocation.cache)
            .env("NO_COLOR", "1")
            .env_remove("OPENAI_API_KEY")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .context("cannot start the measuring helper")?;
        let helper_status = helper
            .wait()
            .context("cannot wait for the measuring helper")?;
        let report = std::fs::read_to_string(&report_path)
            .with_context(|| format!("the measuring helper wrote no report ({helper_status})"))?;
        let numbers: Vec<u64> = report
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad report from the measuring helper: {report}"))?;
        let [wall_ns, cpu_ns, max_rss_kb, page_faults, status] = numbers[..] else {
            bail!("bad report from the measuring helper: {report}");
        };
        let status = i32::try_from(status).unwrap_or(-1);
        let measured = Measured {
            wall: Duration::from_nanos(wall_ns),
            cpu: Duration::from_nanos(cpu_ns),
            max_rss: max_rss_kb * 1024,
            page_faults,
            fresh_page,
            stdout: std::fs::read_to_string(&stdout_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        };
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            bail!(
                "`keg {}` failed ({}):\n{}",
                args.join(" "),
                describe_status(status),
                tail(&measured.stderr, 40)
            );
        }
        Ok(measured)
    }

    /// `keg plan --json`: the generate stage's `to_run`, and the run's cost.
    pub fn plan(&self, invocation: Invocation) -> Result<(u64, Measured)> {
        let measured = self.run(&invocation.flag("--json"))?;
        let plan: Value = serde_json::from_str(&measured.stdout)
            .with_context(|| format!("`keg plan --json` printed: {}", measured.stdout))?;
        let to_run = plan["stages"]
            .as_array()
            .and_then(|stages| stages.iter().find(|s| s["kind"] == "generate"))
            .and_then(|s| s["to_run"].as_u64())
            .with_context(|| format!("no generate stage in {plan}"))?;
        Ok((to_run, measured))
    }
}

/// What touching one page of fresh memory costs right now: 64 MB mapped anew, one byte
/// written per 4 KB page, the time ÷ the pages.
///
/// On bare metal the kernel hands out and zeroes a page in well under a microsecond. In a VM
/// whose host takes back the guest's free memory (free page reporting, ballooning), a page
/// the host took back faults in the host too. On the machines these figures come from, a
/// fresh page costs 1.4–2 µs most of the time, and 13–31 µs for a second or so after a
/// process frees a lot of memory (the bench itself, loading the corpus or replaying calls).
/// Every page `keg` touches first pays it, page-cache pages of the files it writes alike.
pub fn fresh_page_cost() -> Result<Duration> {
    const BYTES: usize = 64 << 20;
    const PAGE: usize = 4096;
    // SAFETY: a private anonymous mapping of our own, written only within its bounds and
    // unmapped before return.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("cannot map 64 MB");
        }
        let bytes = map.cast::<u8>();
        let started = Instant::now();
        for offset in (0..BYTES).step_by(PAGE) {
            bytes.add(offset).write_volatile(1);
        }
        let elapsed = started.elapsed();
        libc::munmap(map, BYTES);
        Ok(elapsed / u32::try_from(BYTES / PAGE).unwrap_or(u32::MAX))
    }
}

/// What reading memory costs after the machine has idled for `idle`: 2 MB, about what a
/// wave of 64 calls touches, read a line at a time in a random order (each 64-byte line
/// holds the index of the next, so that no read can start before the one before it ends
/// and the prefetchers cannot guess), nine times, each after sleeping `idle`; the median
/// time per line.
///
/// At 64 calls in flight against a fixed latency the mock answers in waves: the 64 replies
/// come back within a few ms, then nothing until the next wave. On the machines these
/// figures come from, 2 MB read after 50 ms of idling costs 100–150 ns a line, as if from
/// main memory, against 27–50 after 1 ms: while the machine idles, the caches are given to
/// other work (the host's), and every wave starts `keg` cold (BENCHMARKS.md, twenty-first
/// round).
pub fn idle_line_cost(idle: Duration) -> Duration {
    const LINES: usize = (2 << 20) / 64;
    const WORDS: usize = 8; // u64 words in a line
    const ROUNDS: usize = 9;
    // A random cyclic order of the lines (Sattolo's shuffle).
    let mut order: Vec<usize> = (0..LINES).collect();
    let mut rng = crate::corpus::Rng::new(7);
    for i in (1..LINES).rev() {
        order.swap(i, rng.below(i));
    }
    let mut memory = vec![0_u64; LINES * WORDS];
    for (i, &line) in order.iter().enumerate() {
        memory[line * WORDS] = (order[(i + 1) % LINES] * WORDS) as u64;
    }
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        std::thread::sleep(idle);
        let mut at = order[0] * WORDS;
        let started = Instant::now();
        for _ in 0..LINES {
            at = std::hint::black_box(memory[at]) as usize;
        }
        rounds.push(started.elapsed());
        std::hint::black_box(at);
    }
    rounds.sort_unstable();
    rounds[ROUNDS / 2] / LINES as u32
}

/// The cheapest fresh page seen in this run of the suite, in nanoseconds.
static CHEAPEST_PAGE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

/// Wait, up to 5 s, until fresh memory costs what it usually does here (within 1.5× of the
/// cheapest page seen so far), so that a `keg` run is not charged for what the bench did just
/// before it; what a page costs at the start of the run.
pub fn settle() -> Result<Duration> {
    use std::sync::atomic::Ordering;
    let mut cost = fresh_page_cost()?;
    for _ in 0..10 {
        let nanos = u64::try_from(cost.as_nanos()).unwrap_or(u64::MAX);
        let cheapest = CHEAPEST_PAGE.fetch_min(nanos, Ordering::Relaxed).min(nanos);
        if nanos <= cheapest.saturating_mul(3) / 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        cost = fresh_page_cost()?;
    }
    Ok(cost)
}

/// The flag that turns the bench binary into the measuring helper.
pub const MEASURE_CHILD: &str = "--measure-child";

/// The measuring helper: `suite --measure-child REPORT EXE ARGS…` runs EXE (inheriting
/// everything), waits for it with `wait4`, and writes `wall_ns cpu_ns max_rss_kb minor_faults
/// status` to REPORT.
///
/// Why a helper: Linux carries the peak RSS of the address space a process had before
/// `exec` into its `ru_maxrss`, and a child spawned straight from the bench starts as (or
/// shares) the bench's address space, hundreds of MB with the corpus and captured bodies.
/// The helper has just been exec'd, so it is small, and so is what it passes on.
pub fn measure_child(args: &[String]) -> Result<()> {
    let [report, exe, rest @ ..] = args else {
        bail!("usage: {MEASURE_CHILD} REPORT EXE [ARGS…]");
    };
    let started = Instant::now();
    let child = Command::new(exe)
        .args(rest)
        .spawn()
        .with_context(|| format!("cannot start {exe}"))?;
    let (status, usage) = wait4(child.id())?;
    let wall = started.elapsed();
    let cpu = timeval(usage.ru_utime) + timeval(usage.ru_stime);
    // Linux reports kilobytes.
    let max_rss_kb = u64::try_from(usage.ru_maxrss).unwrap_or(0);
    let minor_faults = u64::try_from(usage.ru_minflt).unwrap_or(0);
    std::fs::write(
        report,
        format!(
            "{} {} {max_rss_kb} {minor_faults} {}\n",
            wall.as_nanos(),
            cpu.as_nanos(),
            u32::from_ne_bytes(status.to_ne_bytes())
        ),
    )
    .with_context(|| format!("cannot write {report}"))?;
    Ok(())
}

fn wait4(pid: u32) -> Result<(i32, libc::rusage)> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    let mut status = 0;
    // SAFETY: rusage is plain data; all-zero is a valid value for it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child; both out-pointers are valid for the call.
        let done = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if done == pid {
            return Ok((status, usage));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4 on keg failed");
        }
    }
}

fn timeval(tv: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(tv.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(tv.tv_usec).unwrap_or(0))
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status}")
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for line in &all[all.len().saturating_sub(lines)..] {
        let _ = writeln!(out, "  {line}");
    }
    out
}

/// Bytes of every file in `dir` (not below it).
pub fn folder_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Rows the export wrote, summed over the splits of `manifest.json`.
pub fn exported_rows(out: &Path) -> Result<u64> {
    let path = out.join("manifest.json");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )?;
    Ok(manifest["splits"]
        .as_object()
        .map(|splits| splits.values().filter_map(|s| s["rows"].as_u64()).sum())
        .unwrap_or(0))
}
