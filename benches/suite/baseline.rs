//! The barrier-free baseline client: N workers, each sending its next request the moment its
//! last one returns. What it reaches on the same server, with the same request bodies, is
//! the most a client with N requests in flight can reach there.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::body::Bytes;

/// Send every body to `endpoint` with `workers` requests in flight, on a runtime shaped like
/// `keg`'s (multi-threaded, one worker per core); read each reply whole and drop it.
pub fn run(endpoint: &str, bodies: Vec<Bytes>, workers: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the baseline client's runtime")?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(workers)
        .timeout(Duration::from_secs(120))
        .build()
        .context("cannot build the baseline HTTP client")?;
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
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
        Ok(())
    })
}
