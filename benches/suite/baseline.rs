//! The barrier-free baseline client: N workers, each sending its next request the moment its
//! last one returns. What it reaches on the same server, with the same request bodies, is
//! the most a client with N requests in flight can reach there.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::body::Bytes;

/// Send every body to `endpoint` with `workers` requests in flight, on a runtime shaped like
/// `keg`'s (multi-threaded, one worker per core); read each reply whole and drop it.
/// Returns the CPU time (user + sys) the client's threads used: the floor of what sending
/// these calls over HTTP costs on this machine, to set beside `keg`'s CPU per call.
pub fn run(endpoint: &str, bodies: Vec<Bytes>, workers: usize) -> Result<Duration> {
    // The mock shares this process, so the client's CPU is summed thread by thread: each
    // runtime thread adds its own CPU clock as it stops (the runtime is shut down below).
    let cpu_ns = Arc::new(AtomicU64::new(0));
    let runtime = {
        let cpu_ns = cpu_ns.clone();
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .on_thread_stop(move || {
                cpu_ns.fetch_add(thread_cpu_ns(), Ordering::Relaxed);
            })
            .build()
            .context("cannot start the baseline client's runtime")?
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(workers)
        .timeout(Duration::from_secs(120))
        .build()
        .context("cannot build the baseline HTTP client")?;
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let main_start = thread_cpu_ns();
    runtime.block_on(async move {
        let tasks: Vec<_> = (0..workers.max(1))
            .map(|_| {
                let (client, bodies, next) = (client.clone(), bodies.clone(), next.clone());
                let endpoint = endpoint.to_owned();
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(body) = bodies.get(i) else {
                            return Ok(());
                        };
                        let response = client
                            .post(&endpoint)
                            .header(reqwest::header::CONTENT_TYPE, "application/json")
                            .body(body.clone())
                            .send()
                            .await?;
                        let status = response.status();
                        response.bytes().await?;
                        if !status.is_success() {
                            bail!("the mock answered {status}");
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.context("a baseline worker panicked")??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let main = thread_cpu_ns() - main_start;
    drop(runtime); // joins the worker threads, which add their CPU as they stop
    Ok(Duration::from_nanos(cpu_ns.load(Ordering::Relaxed) + main))
}

/// CPU time (user + sys) of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
