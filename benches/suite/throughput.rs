//! Targets 1 and 2: calls per second against a fixed latency, against slow replies (beside a
//! barrier-free client on the same server), output order under reordering, and `keg`'s CPU
//! per call.

use anyhow::{Context, Result, bail};

use std::time::Duration;

use crate::keg::{Invocation, Measured, fresh_page_cost, idle_line_cost};
use crate::mock::{Behavior, Window};
use crate::report::{Figure, Goal, thousands};
use crate::{Bench, baseline, progress};

/// The mock's latency for 2a's run without idle: short enough that the next wave of
/// replies comes while `keg`'s memory is still in the caches.
const WARM_LATENCY: Duration = Duration::from_millis(5);

/// Calls per second over the mock's window.
fn rate(window: &Window) -> f64 {
    window.requests as f64 / window.span.as_secs_f64().max(1e-9)
}

/// One `keg` run at fixed latency and the barrier-free client's run of the same bodies.
struct Pair {
    run: Measured,
    window: Window,
    fresh_after: Duration,
    base_cpu: Duration,
    base: Window,
}

impl Pair {
    fn keg_per_call(&self) -> f64 {
        self.run.cpu.as_secs_f64() / self.window.requests.max(1) as f64
    }

    fn base_per_call(&self) -> f64 {
        self.base_cpu.as_secs_f64() / self.base.requests.max(1) as f64
    }
}

/// Which run holds the middle value; of an even count, the worse of the middle two for the
/// goal (`lower_is_better`), so a repetition never flatters a figure.
fn median_run(values: &[f64], lower_is_better: bool) -> usize {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    if !lower_is_better {
        order.reverse();
    }
    order[values.len() / 2]
}

fn median(values: &[f64], lower_is_better: bool) -> f64 {
    values[median_run(values, lower_is_better)]
}

/// A row with every run's value of `keg` and of the client, in the order they ran:
/// `55.1, 57.3, 60.2; 33.0, 34.1, 35.2`.
fn each_run(target: &str, unit: &str, keg: &[f64], client: &[f64], digits: usize) -> Figure {
    let list = |values: &[f64]| {
        values
            .iter()
            .map(|v| format!("{v:.digits$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Figure::new(target, format!("  each run: keg, client ({unit})")).info(format!(
        "{}; {}",
        list(keg),
        list(client)
    ))
}

/// Target 1 at fixed latency, and target 2 from the same runs. Each concurrency runs
/// `bench.sizes.throughput_runs` times, each `keg` run followed by the client's: this
/// machine's speed changes from minute to minute, so each figure is the median of its runs
/// and every run's value is shown beside it.
pub fn fixed_latency(bench: &mut Bench) -> Result<()> {
    let latency = bench.options.latency;
    let jitter = bench.options.jitter;
    disk_calibration(bench)?;
    let (fixed_cpu, fixed_calls) = one_document_run(bench)?;
    // At 512 the waves of replies are eight times larger and the idle between them shorter,
    // and replies after 5 ms would make the run CPU-bound: only 2a gets `idle_rows`.
    for (concurrency, throughput_id, cpu_id, with_idle_rows) in
        [(64, "1a", "2a", true), (512, "1b", "2b", false)]
    {
        let wanted = concurrency * bench.sizes.rounds;
        let (glob, calls) = bench.corpus()?.glob_for_calls(wanted);
        let mut pairs = Vec::new();
        for _ in 0..bench.sizes.throughput_runs.max(1) {
            pairs.push(fixed_latency_pair(
                bench,
                &glob,
                calls,
                concurrency,
                latency,
            )?);
        }
        // Each of N workers completes one call per (latency + mean jitter).
        let ideal = concurrency as f64 / (latency + jitter / 2).as_secs_f64();
        let rates: Vec<f64> = pairs.iter().map(|p| rate(&p.window)).collect();
        let base_rates: Vec<f64> = pairs.iter().map(|p| rate(&p.base)).collect();
        let keg_cpu: Vec<f64> = pairs.iter().map(|p| p.keg_per_call() * 1e6).collect();
        let base_cpu: Vec<f64> = pairs.iter().map(|p| p.base_per_call() * 1e6).collect();
        let runs = pairs.len();
        let of = if runs > 1 {
            format!(", median of {runs} runs")
        } else {
            String::new()
        };
        let measured = median(&rates, false);
        bench.push(
            Figure::new(
                throughput_id,
                format!(
                    "throughput, {} ms latency, concurrency {concurrency} ({} calls{of})",
                    latency.as_millis(),
                    thousands(pairs[0].window.requests)
                ),
            )
            .compare(
                (measured, format!("{measured:.0} calls/s")),
                (ideal, format!("{ideal:.0} calls/s")),
                Goal::AtLeast(0.95),
            ),
        );
        let base_rate = median(&base_rates, false);
        let in_flight = |window: fn(&Pair) -> &Window| {
            let values: Vec<f64> = pairs.iter().map(|p| window(p).in_flight()).collect();
            median(&values, false)
        };
        bench.push(
            Figure::new(
                throughput_id,
                format!(
                    "  barrier-free client, same bodies and server (in flight: keg {:.1}, client {:.1})",
                    in_flight(|p| &p.window),
                    in_flight(|p| &p.base),
                ),
            )
            .compare(
                (base_rate, format!("{base_rate:.0} calls/s")),
                (ideal, format!("{ideal:.0} calls/s")),
                Goal::Info,
            ),
        );
        if runs > 1 {
            bench.push(each_run(throughput_id, "calls/s", &rates, &base_rates, 0));
        }
        // The median run by CPU per call: 2a or 2b, and the details below it.
        let middle = &pairs[median_run(&keg_cpu, true)];
        let per_call = middle.keg_per_call() * 1e6;
        bench.push(
            Figure::new(
                cpu_id,
                format!("keg CPU per call, all stages (concurrency {concurrency}{of})"),
            )
            .compare(
                (per_call * 1e-6, format!("{per_call:.1} µs")),
                (50e-6, "50 µs".to_owned()),
                Goal::AtMost(1.0),
            ),
        );
        let base_per_call = median(&base_cpu, true);
        bench.push(
            Figure::new(
                cpu_id,
                "  barrier-free client's CPU per call, same bodies and server (HTTP only)",
            )
            .compare(
                (base_per_call * 1e-6, format!("{base_per_call:.1} µs")),
                (50e-6, "50 µs".to_owned()),
                Goal::Info,
            ),
        );
        if runs > 1 {
            bench.push(each_run(cpu_id, "µs per call", &keg_cpu, &base_cpu, 1));
        }
        // The run of one document spread over this figure's calls: what a run costs
        // whatever its size, which the client's figure leaves out.
        let fixed_per_call = fixed_cpu * 1e6 / middle.window.requests.max(1) as f64;
        // The machine's speed moves both figures of a pair together, so their difference is
        // what `keg` itself adds to the HTTP, whatever the hour (BENCHMARKS.md, "What is
        // left", item 1).
        let above: Vec<f64> = keg_cpu.iter().zip(&base_cpu).map(|(k, c)| k - c).collect();
        bench.push(
            Figure::new(
                cpu_id,
                "  keg above the client, run by run: median (lowest to highest); the part of it that is a run's fixed cost",
            )
            .info(format!(
                "{:.1} µs ({:.1} to {:.1}); {fixed_per_call:.1} µs",
                median(&above, true),
                above.iter().copied().fold(f64::INFINITY, f64::min),
                above.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            )),
        );
        let (run, window) = (&middle.run, &middle.window);
        let that = if runs > 1 {
            "the median run"
        } else {
            "that run"
        };
        bench.push(
            Figure::new(cpu_id, format!("  {that}: keg wall, CPU, peak memory")).info(format!(
                "{:.2} s wall, {:.2} s CPU, {} MB peak",
                run.wall.as_secs_f64(),
                run.cpu.as_secs_f64(),
                run.max_rss / 1_000_000,
            )),
        );
        bench.push(
            Figure::new(
                cpu_id,
                format!(
                    "  {that}: pages keg touched first (page faults); what a fresh page cost just before and after it"
                ),
            )
            .info(format!(
                "{} pages ({:.2} per call); {:.1} µs, {:.1} µs",
                thousands(run.page_faults),
                run.page_faults as f64 / window.requests.max(1) as f64,
                run.fresh_page.as_secs_f64() * 1e6,
                middle.fresh_after.as_secs_f64() * 1e6,
            )),
        );
        if with_idle_rows && latency > WARM_LATENCY {
            idle_rows(bench, cpu_id, &glob, calls, concurrency, latency)?;
        }
        bench.push(
            Figure::new(
                cpu_id,
                format!(
                    "  a run of one document ({fixed_calls} calls, replies at once, a new cache): CPU, median of {ONE_DOCUMENT_RUNS}; the same over this figure's calls"
                ),
            )
            .info(format!(
                "{:.1} ms; {fixed_per_call:.1} µs per call",
                fixed_cpu * 1e3
            )),
        );
    }
    Ok(())
}

/// Runs of one document that [`one_document_run`] takes the median of.
const ONE_DOCUMENT_RUNS: usize = 5;

/// Beside 2a and 2b, what a run costs whatever its size (starting, reading the pipeline,
/// making the cache, writing and syncing the outputs, closing), which those figures spread
/// over their calls; the client's figure counts its HTTP threads alone, so none of this is in
/// it. The median CPU of runs of one document, each with a new cache, in seconds, and that
/// document's calls.
fn one_document_run(bench: &mut Bench) -> Result<(f64, usize)> {
    let (document, calls) = {
        let corpus = bench.corpus()?;
        let first = &corpus.docs[0];
        (corpus.path(first), first.chunks)
    };
    // Answered at once: only the run's own cost, and its few calls', is left.
    bench.mock.set(Behavior::default());
    let mut cpu = Vec::with_capacity(ONE_DOCUMENT_RUNS);
    for _ in 0..ONE_DOCUMENT_RUNS {
        bench.mock.reset();
        let cache = bench.cache_dir("cache-one-document")?;
        let out = bench.fresh_dir("out-one-document")?;
        let run = bench.keg.run(
            &Invocation::new("run", &bench.pipeline, &cache)
                .set("glob", document.display())
                .set("out", out.display())
                .set("base_url", bench.mock.base_url())
                // Every call in flight at once, as at either figure's concurrency.
                .set("concurrency", calls)
                .flag("--no-cache"),
        )?;
        cpu.push(run.cpu.as_secs_f64());
    }
    Ok((median(&cpu, true), calls))
}

/// What 2a owes to the mock's idle between waves (64 replies within a few ms, then nothing
/// until the latency is up): the same calls once more with replies after [`WARM_LATENCY`],
/// and what reading memory costs after an idle as long as the latency and after 1 ms.
fn idle_rows(
    bench: &mut Bench,
    cpu_id: &str,
    glob: &str,
    calls: usize,
    concurrency: usize,
    latency: Duration,
) -> Result<()> {
    let warm = fixed_latency_pair(bench, glob, calls, concurrency, WARM_LATENCY)?;
    bench.push(
        Figure::new(
            cpu_id,
            format!(
                "  the same calls with replies after {} ms, one run: keg, client (µs per call)",
                WARM_LATENCY.as_millis()
            ),
        )
        .info(format!(
            "{:.1}; {:.1}",
            warm.keg_per_call() * 1e6,
            warm.base_per_call() * 1e6
        )),
    );
    let after_idle = idle_line_cost(latency);
    let after_short = idle_line_cost(Duration::from_millis(1));
    bench.push(
        Figure::new(
            cpu_id,
            format!(
                "  2 MB read in random order after {} ms idle, after 1 ms (per 64-byte line)",
                latency.as_millis()
            ),
        )
        .info(format!(
            "{:.0} ns; {:.0} ns",
            after_idle.as_secs_f64() * 1e9,
            after_short.as_secs_f64() * 1e9
        )),
    );
    Ok(())
}

/// `keg` over `glob` at `concurrency`, then the barrier-free client with the same bodies.
fn fixed_latency_pair(
    bench: &mut Bench,
    glob: &str,
    calls: usize,
    concurrency: usize,
    latency: Duration,
) -> Result<Pair> {
    let timed = Behavior {
        latency,
        ..bench.timed_behavior()
    };
    bench.mock.set(Behavior {
        capture: true,
        ..timed.clone()
    });
    bench.mock.reset();
    let cache = bench.cache_dir(&format!("cache-throughput-{concurrency}"))?;
    let out = bench.fresh_dir(&format!("out-throughput-{concurrency}"))?;
    let run = bench.keg.run(
        &Invocation::new("run", &bench.pipeline, &cache)
            .set("glob", glob)
            .set("out", out.display())
            .set("base_url", bench.mock.base_url())
            .set("concurrency", concurrency)
            .flag("--no-cache"),
    )?;
    let fresh_after = fresh_page_cost()?;
    let window = bench.mock.window();
    // The same bodies from the barrier-free client: what this machine allows right now.
    let bodies = bench.mock.take_bodies();
    bench.mock.set(timed);
    bench.mock.reset();
    let base_cpu = baseline::run(&bench.mock.endpoint(), bodies, concurrency)
        .context("the baseline client failed")?;
    let base = bench.mock.window();
    if window.requests != calls as u64 {
        progress(&format!(
            "warning: {} requests for {calls} chunks (retries?)",
            window.requests
        ));
    }
    Ok(Pair {
        run,
        window,
        fresh_after,
        base_cpu,
        base,
    })
}

/// Target 1 with slow replies: `keg` beside the barrier-free client, same bodies, same
/// server; then the same calls answered in another order must give the same files.
pub fn slow_replies(bench: &mut Bench) -> Result<()> {
    let latency = bench.options.latency;
    let slow = Behavior {
        slow_fraction: bench.options.slow_fraction,
        slow_latency: bench.options.slow_latency,
        capture: true,
        ..bench.timed_behavior()
    };
    let concurrencies = bench.sizes.slow_concurrency.clone();
    for (n, concurrency) in concurrencies.into_iter().enumerate() {
        let wanted = concurrency * bench.sizes.slow_rounds;
        let (glob, _) = bench.corpus()?.glob_for_calls(wanted);
        bench.mock.set(slow.clone());
        bench.mock.reset();
        let cache = bench.cache_dir(&format!("cache-slow-{concurrency}"))?;
        let out = bench.fresh_dir(&format!("out-slow-{concurrency}"))?;
        let invocation = Invocation::new("run", &bench.pipeline, &cache)
            .set("glob", &glob)
            .set("out", out.display())
            .set("base_url", bench.mock.base_url())
            .set("concurrency", concurrency)
            .flag("--no-cache");
        bench.keg.run(&invocation)?;
        let keg = bench.mock.window();
        let bodies = bench.mock.take_bodies();
        if bodies.len() as u64 != keg.requests {
            bail!(
                "captured {} bodies for {} requests",
                bodies.len(),
                keg.requests
            );
        }
        bench.mock.set(Behavior {
            capture: false,
            ..slow.clone()
        });
        bench.mock.reset();
        baseline::run(&bench.mock.endpoint(), bodies, concurrency)
            .context("the baseline client failed")?;
        let base = bench.mock.window();
        let (keg_rate, base_rate) = (rate(&keg), rate(&base));
        let percent = bench.options.slow_fraction * 100.0;
        bench.push(
            Figure::new(
                if n == 0 { "1c" } else { "1d" },
                format!(
                    "throughput, {percent}% of replies at {:.0} s, concurrency {concurrency}, vs barrier-free client",
                    bench.options.slow_latency.as_secs_f64()
                ),
            )
            .compare(
                (keg_rate, format!("{keg_rate:.0} calls/s")),
                (base_rate, format!("{base_rate:.0} calls/s")),
                Goal::AtLeast(0.90),
            ),
        );
        // What the baseline itself reaches, against the ideal of N / mean delay.
        let mean = (1.0 - bench.options.slow_fraction)
            * (latency + bench.options.jitter / 2).as_secs_f64()
            + bench.options.slow_fraction * bench.options.slow_latency.as_secs_f64();
        let ideal = concurrency as f64 / mean;
        bench.push(
            Figure::new(
                if n == 0 { "1c" } else { "1d" },
                format!(
                    "  barrier-free client vs N ÷ mean delay ({} calls, {} slow; in flight: keg {:.1}, client {:.1})",
                    thousands(base.requests),
                    base.slow,
                    keg.in_flight(),
                    base.in_flight()
                ),
            )
            .compare(
                (base_rate, format!("{base_rate:.0} calls/s")),
                (ideal, format!("{ideal:.0} calls/s")),
                Goal::Info,
            ),
        );
        if n == 0 {
            // Same calls, answered at once and so in another order: same files. (Same
            // output folder too: it is part of the pipeline hash in the manifest.)
            let first = bench.work.join("out-slow-first");
            let _ = std::fs::remove_dir_all(&first);
            std::fs::rename(&out, &first)?;
            bench.mock.set(Behavior::default());
            bench.mock.reset();
            bench.keg.run(&invocation)?;
            let same = same_files(&first, &out)?;
            bench.push(
                Figure::new(
                    "1e",
                    "output bytes identical when replies arrive in another order",
                )
                .compare(
                    (
                        f64::from(u8::from(same)),
                        if same { "identical" } else { "DIFFERENT" }.to_owned(),
                    ),
                    (1.0, "identical".to_owned()),
                    Goal::Equal,
                ),
            );
        }
    }
    Ok(())
}

/// Whether two folders hold files with the same names and bytes.
fn same_files(a: &std::path::Path, b: &std::path::Path) -> Result<bool> {
    let list = |dir: &std::path::Path| -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            files.push((
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path())?,
            ));
        }
        files.sort();
        Ok(files)
    };
    let (a, b) = (list(a)?, list(b)?);
    Ok(!a.is_empty() && a == b)
}

/// What one cache write costs on the cache's filesystem right now, through `keg`'s own
/// `DiskStore`: `put` queues the entry for the writer thread, which commits in batches;
/// timed up to the `flush` that has every entry on disk, so the figure is the amortised
/// cost of one cached call (it varies with the disk).
fn disk_calibration(bench: &Bench) -> Result<()> {
    use kegline::cache::{DiskStore, Store};
    const PUTS: u32 = 2_000;
    let store = DiskStore::open(&bench.cache_dir("cache-calibration")?)?;
    let value = vec![b'x'; 1_000];
    let started = std::time::Instant::now();
    for i in 0..PUTS {
        store.put("calls-v1", &blake3::hash(&i.to_le_bytes()), &value)?;
    }
    store.flush()?;
    let per_put = started.elapsed().as_secs_f64() / f64::from(PUTS);
    bench.push(
        Figure::new(
            "2",
            "  one cache write (`DiskStore::put`, 1 KB, batched, up to `flush`) on the cache's disk now",
        )
        .info(format!("{:.1} µs", per_put * 1e6)),
    );
    Ok(())
}
