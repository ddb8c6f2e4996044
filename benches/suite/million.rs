//! Targets 5 and 6: a run that makes 1,000,000 examples. To get there without a million
//! calls, the prompt asks for 100 items and the mock returns 100 per reply: 10,000
//! single-chunk documents, 10,000 calls, 1,000,000 records.
//!
//! The aggregate stages (dedupe, split, export) are timed by difference: a warm run of the
//! whole pipeline minus a warm run of the same pipeline cut after `validate`. Both skip
//! every document (its results are kept); before each warm run of the whole pipeline its
//! output folder is emptied, so that the aggregate stages cannot leave their files alone and
//! run over all the records, read back from the cache.

use anyhow::Result;

use crate::corpus;
use crate::keg::{Invocation, exported_rows, folder_bytes};
use crate::mock::Behavior;
use crate::report::{Figure, Goal, megabytes, seconds, thousands};
use crate::rerun::best_of;
use crate::{Bench, progress};

/// Characters of passage quoted per answer: rows of about 300 bytes, like short real pairs.
const ANSWER_CHARS: usize = 200;

pub fn run(bench: &mut Bench) -> Result<()> {
    let calls = bench.sizes.million_calls;
    let items = bench.sizes.items_per_call;
    let corpus = corpus::single_chunk(&bench.work.join("notes"), calls, 2)?;
    let glob = corpus.glob_all();
    let cache = bench.cache_dir("cache-million")?;
    let out = bench.fresh_dir("out-million")?;
    let invocation = |pipeline| {
        Invocation::new("run", pipeline, &cache)
            .set("glob", &glob)
            .set("out", out.display())
            .set("base_url", bench.mock.base_url())
            .set("concurrency", 64)
            .set("items", items)
    };
    bench.mock.set(Behavior {
        answer_chars: ANSWER_CHARS,
        ..Behavior::default()
    });
    bench.mock.reset();
    let cold = bench.keg.run(&invocation(&bench.pipeline))?;
    let sent = bench.mock.window().requests;
    let rows = exported_rows(&out)?;
    let out_bytes = folder_bytes(&out)?;
    if rows != (calls * items) as u64 {
        progress(&format!(
            "warning: {rows} rows exported for {calls} calls of {items} items"
        ));
    }
    bench.push(
        Figure::new(
            "5",
            format!("  {}-example run, cold (calls sent)", thousands(rows)),
        )
        .info(format!(
            "{} calls → {} rows, {} of output, {:.1} s wall, {:.1} s CPU",
            thousands(sent),
            thousands(rows),
            megabytes(out_bytes),
            cold.wall.as_secs_f64(),
            cold.cpu.as_secs_f64()
        )),
    );

    let repeats = bench.sizes.repeats;
    let warm = best_of(repeats, || {
        std::fs::remove_dir_all(&out)?;
        bench.keg.run(&invocation(&bench.pipeline))
    })?;
    if exported_rows(&out)? != rows {
        progress("warning: the warm run exported another number of rows");
    }
    let upstream = best_of(repeats, || {
        bench.keg.run(&invocation(&bench.pipeline_up_to_validate))
    })?;
    let aggregate = warm.wall.saturating_sub(upstream.wall);
    bench.push(
        Figure::new(
            "5a",
            format!(
                "dedupe + split + export of {} records, read back from the cache (warm run, outputs deleted − run cut after validate)",
                thousands(rows)
            ),
        )
        .compare(
            seconds(aggregate),
            (10.0, "10 s".to_owned()),
            Goal::AtMost(1.0),
        ),
    );
    bench.push(
        Figure::new("5a", "  warm runs: whole pipeline / cut after validate").info(format!(
            "{:.2} s / {:.2} s wall, {:.2} s / {:.2} s CPU",
            warm.wall.as_secs_f64(),
            upstream.wall.as_secs_f64(),
            warm.cpu.as_secs_f64(),
            upstream.cpu.as_secs_f64()
        )),
    );
    bench.push(
        Figure::new(
            "5b",
            format!(
                "peak memory of the warm {}-record run (all stages)",
                thousands(rows)
            ),
        )
        .compare(
            (warm.max_rss as f64, megabytes(warm.max_rss)),
            (1.5e9, "1,500 MB".to_owned()),
            Goal::AtMost(1.0),
        ),
    );
    bench.push(
        Figure::new("5b", "  peak memory of the run cut after validate")
            .info(megabytes(upstream.max_rss)),
    );
    // The same warm run with a second export of the split: a fork of the later stages. Its
    // folder is the pipeline's `${out}-chat`.
    let chat = std::path::PathBuf::from(format!("{}-chat", out.display()));
    let fork = best_of(repeats, || {
        std::fs::remove_dir_all(&out)?;
        if chat.exists() {
            std::fs::remove_dir_all(&chat)?;
        }
        bench.keg.run(&invocation(&bench.pipeline_fork))
    })?;
    if exported_rows(&out)? != rows || exported_rows(&chat)? != rows {
        progress("warning: the run with two exports exported another number of rows");
    }
    bench.push(
        Figure::new(
            "5b",
            "  the same with a second export of the split (a fork): peak memory, wall, output",
        )
        .info(format!(
            "{}, {:.2} s, {} + {} of output",
            megabytes(fork.max_rss),
            fork.wall.as_secs_f64(),
            megabytes(folder_bytes(&out)?),
            megabytes(folder_bytes(&chat)?),
        )),
    );
    std::fs::remove_dir_all(&chat)?;
    bench.push(
        Figure::new(
            "6",
            format!(
                "peak memory of the {}-example run (cold) vs its output files",
                thousands(rows)
            ),
        )
        .compare(
            (cold.max_rss as f64, megabytes(cold.max_rss)),
            (
                out_bytes as f64,
                format!("{} of output", megabytes(out_bytes)),
            ),
            Goal::AtMost(2.0),
        ),
    );
    Ok(())
}
