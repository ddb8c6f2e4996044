//! Everything a person reads: the run summary, `keg plan` output, graphs. Data goes to
//! stdout; messages go to stderr.

use std::fmt::Write;

use serde_json::{Value as Json, json};

use crate::config::Plan;
use crate::lock;
use crate::runner::{RunOutcome, StageOutcome};
use crate::stage::{Reject, StageStats};

fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
    StageStats::get(counter)
}

/// `1,234`
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn stage_line(stage: &StageOutcome, rejects: &[Reject]) -> String {
    let s = &stage.stats;
    let mut line = match stage.kind {
        "load" => {
            let mut l = format!("{} documents", thousands(stage.records_out as u64));
            if get(&s.skipped) > 0 {
                let _ = write!(l, " ({} skipped)", get(&s.skipped));
            }
            l
        }
        "generate" => {
            let mut l = format!(
                "{} calls: {} sent, {} cached",
                thousands(get(&s.items)),
                thousands(get(&s.to_run)),
                thousands(get(&s.cached)),
            );
            for (counter, what) in [
                (&s.retries, "retries"),
                (&s.repairs, "repaired"),
                (&s.reasks, "re-asked"),
                (&s.grown, "with a larger budget"),
            ] {
                if get(counter) > 0 {
                    let _ = write!(l, ", {} {what}", thousands(get(counter)));
                }
            }
            if get(&s.tokens_in) + get(&s.tokens_out) > 0 {
                let _ = write!(
                    l,
                    " · {} tokens in, {} out",
                    thousands(get(&s.tokens_in)),
                    thousands(get(&s.tokens_out))
                );
            }
            if get(&s.cost_nanos) > 0 {
                let _ = write!(l, " · cost {:.4}", get(&s.cost_nanos) as f64 / 1e9);
            }
            let _ = write!(l, " → {} records", thousands(stage.records_out as u64));
            l
        }
        "dedupe" => format!(
            "{} → {} records ({} duplicates dropped)",
            thousands(stage.records_in as u64),
            thousands(stage.records_out as u64),
            thousands(get(&s.skipped))
        ),
        _ if stage.records_in != stage.records_out => format!(
            "{} → {} records",
            thousands(stage.records_in as u64),
            thousands(stage.records_out as u64)
        ),
        _ => format!("{} records", thousands(stage.records_out as u64)),
    };
    if get(&s.rejected) > 0 {
        // By reason, most frequent first: `3 rejected (2 truncated, 1 schema)`.
        let mut by_code: std::collections::BTreeMap<&str, u64> = Default::default();
        for r in rejects.iter().filter(|r| r.stage == stage.name) {
            *by_code.entry(r.code.as_ref()).or_default() += 1;
        }
        let mut codes: Vec<(&str, u64)> = by_code.into_iter().collect();
        codes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let codes: Vec<String> = codes.iter().map(|(c, n)| format!("{n} {c}")).collect();
        let _ = write!(
            line,
            " · {} rejected ({})",
            get(&s.rejected),
            codes.join(", ")
        );
    }
    line
}

/// The summary printed after a run.
pub fn summary(plan: &Plan, outcome: &RunOutcome) -> String {
    let mut out = format!(
        "keg: {} finished in {:.2} s\n",
        plan.file.name,
        outcome.elapsed.as_secs_f64()
    );
    if let Some((skipped, total)) = outcome.documents_skipped
        && skipped > 0
    {
        let _ = writeln!(
            out,
            "  {} of {} documents unchanged since an earlier run: skipped",
            thousands(skipped as u64),
            thousands(total as u64)
        );
    }
    let width = outcome
        .stages
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0);
    for stage in &outcome.stages {
        let _ = writeln!(
            out,
            "  {:width$}  {:8}  {}",
            stage.name,
            stage.kind,
            stage_line(stage, &outcome.rejects)
        );
        let notes = lock(&stage.stats.notes);
        let events = lock(&stage.stats.events);
        let told = notes.iter().map(|note| ("warning: ", note));
        for (label, text) in told.chain(events.iter().map(|event| ("", event))) {
            let _ = writeln!(out, "  {:width$}  {label}{text}", "");
        }
        for (path, rows) in lock(&stage.stats.files).iter() {
            // Files an earlier run wrote from the same inputs are left as they are.
            let verb = if stage.unchanged {
                "unchanged"
            } else {
                "wrote"
            };
            if path.extension().is_some_and(|e| e == "jsonl") {
                let _ = writeln!(
                    out,
                    "  {:width$}  {verb} {} ({} rows)",
                    "",
                    path.display(),
                    thousands(*rows as u64)
                );
            } else {
                let _ = writeln!(out, "  {:width$}  {verb} {}", "", path.display());
            }
        }
    }
    out
}

/// `keg plan --json`: versioned; stages in run order.
pub fn plan_json(outcome: &RunOutcome) -> Json {
    json!({
        "version": 1,
        "stages": outcome.stages.iter().map(|s| json!({
            "name": s.name,
            "kind": s.kind,
            "items": get(&s.stats.items),
            "cached": get(&s.stats.cached),
            "to_run": get(&s.stats.to_run),
        })).collect::<Vec<_>>(),
    })
}

/// `keg plan` for people.
pub fn plan_table(plan: &Plan, outcome: &RunOutcome) -> String {
    let mut out = format!(
        "plan for {} ({})\n",
        plan.file.name,
        plan.file.path.display()
    );
    let width = outcome
        .stages
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        out,
        "  {:width$}  {:8}  {:>8}  {:>8}  {:>8}",
        "stage", "kind", "items", "cached", "to_run"
    );
    let mut calls = 0;
    for s in &outcome.stages {
        calls += get(&s.stats.to_run);
        let _ = writeln!(
            out,
            "  {:width$}  {:8}  {:>8}  {:>8}  {:>8}",
            s.name,
            s.kind,
            get(&s.stats.items),
            get(&s.stats.cached),
            get(&s.stats.to_run)
        );
    }
    let _ = writeln!(
        out,
        "{} LLM call{} to make; `cached` and `to_run` count LLM calls, other stages are computed locally",
        thousands(calls),
        if calls == 1 { "" } else { "s" }
    );
    out
}

/// The stage graph as Mermaid or Graphviz dot.
pub fn graph(plan: &Plan, format: GraphFormat) -> String {
    let mut out = String::new();
    match format {
        GraphFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            for s in &plan.stages {
                let _ = writeln!(out, "  {}[\"{} ({})\"]", s.name, s.name, s.kind);
            }
            for s in &plan.stages {
                for &j in &s.inputs {
                    let _ = writeln!(out, "  {} --> {}", plan.stages[j].name, s.name);
                }
            }
        }
        GraphFormat::Dot => {
            let _ = writeln!(out, "digraph \"{}\" {{\n  rankdir=LR;", plan.file.name);
            for s in &plan.stages {
                let _ = writeln!(out, "  \"{}\" [label=\"{} ({})\"];", s.name, s.name, s.kind);
            }
            for s in &plan.stages {
                for &j in &s.inputs {
                    let _ = writeln!(out, "  \"{}\" -> \"{}\";", plan.stages[j].name, s.name);
                }
            }
            out.push_str("}\n");
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Mermaid,
    Dot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
