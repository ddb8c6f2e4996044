//! `validate`: keep records that match a JSON Schema; the others go to the rejects file with
//! the first validation error.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{
    BuildContext, JsonSchemaFile, Kind, Stage, StageContext, StageError, StageStats, Streamed,
};
use crate::config::Diagnostic;
use crate::record::Record;

pub const KIND: Kind = Kind {
    name: "validate",
    about: "keep records matching a JSON Schema, reject the rest with the reason",
    takes_inputs: true,
    build,
    schema: |g| g.subschema_for::<ValidateConfig>(),
};

/// Settings of a `validate` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateConfig {
    /// A JSON Schema file, relative to the pipeline file, each record must match.
    pub schema: String,
}

pub struct Validate {
    config: ValidateConfig,
    schema: JsonSchemaFile,
}

fn build(cx: &BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
    let config: ValidateConfig = cx.settings()?;
    let schema = cx
        .json_schema("schema", &config.schema)
        .map_err(|d| vec![d])?;
    Ok(Arc::new(Validate { config, schema }))
}

impl Validate {
    /// The records that match the schema; the others are rejected.
    fn check(&self, cx: &StageContext, input: Vec<Record>) -> Vec<Record> {
        StageStats::add(&cx.stats.items, input.len() as u64);
        let mut out = Vec::with_capacity(input.len());
        for mut record in input {
            // The schema checks a `Value`: lend it the record's map rather than copy it.
            let data = Json::Object(std::mem::take(&mut record.data));
            let checked = self.schema.check(&data);
            if let Json::Object(map) = data {
                record.data = map;
            }
            match checked {
                Ok(()) => out.push(record),
                Err(err) => {
                    let reply = serde_json::to_string(&record.data).ok();
                    cx.reject(
                        &record.lineage,
                        "validate",
                        format!("does not match {}: {err}", self.schema.path.display()),
                        reply.as_deref(),
                    );
                }
            }
        }
        out
    }
}

/// `validate` after a stage that needs all its input (after `dedupe`, say), fed document by
/// document: each record is checked on its own, so a piece at a time gives what all at once
/// does.
struct Streaming<'a> {
    stage: &'a Validate,
    cx: StageContext<'a>,
}

impl Streamed for Streaming<'_> {
    fn push(&mut self, records: Vec<Record>) -> Result<Vec<Record>, StageError> {
        Ok(self.stage.check(&self.cx, records))
    }

    fn finish(self: Box<Self>) -> Result<(), StageError> {
        Ok(())
    }
}

impl Stage for Validate {
    fn partition(&self) -> super::Partition {
        super::Partition::PerDocument
    }

    fn settings(&self) -> Json {
        json!({ "schema": self.config.schema, "digest": self.schema.digest })
    }

    fn stream<'a>(&'a self, cx: StageContext<'a>) -> Option<Box<dyn Streamed + 'a>> {
        Some(Box::new(Streaming { stage: self, cx }))
    }

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>> {
        async move { Ok(self.check(&cx, input)) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Lineage;

    #[test]
    fn fed_in_pieces_it_keeps_and_rejects_what_it_does_all_at_once() {
        let schema = json!({"type": "object", "required": ["answer"]});
        let validate = Validate {
            config: ValidateConfig {
                schema: "pair.json".into(),
            },
            schema: JsonSchemaFile {
                path: "pair.json".into(),
                canonical: crate::record::canonical_json(&schema),
                digest: String::new(),
                validator: Arc::new(jsonschema::validator_for(&schema).unwrap()),
                schema,
            },
        };
        let doc = Lineage::document("a.md");
        let input: Vec<Record> = [true, false, true, true, false, true]
            .iter()
            .enumerate()
            .map(|(i, &valid)| {
                let data = if valid {
                    json!({"question": "q", "answer": i})
                } else {
                    json!({"question": "q"})
                };
                let Json::Object(data) = data else {
                    unreachable!()
                };
                Record::new(data, doc.child(0).child(i))
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let shared = crate::stage::RunShared::for_tests(dir.path());
        let stats = StageStats::default();
        let cx = StageContext::for_tests("checked", &shared, &stats);
        let rejects = || {
            let rejects = shared.rejects.lock().unwrap();
            rejects
                .iter()
                .map(|r| r.lineage.clone())
                .collect::<Vec<_>>()
        };
        let whole: Vec<String> = validate
            .check(&cx, input.clone())
            .iter()
            .map(|r| r.lineage.display())
            .collect();
        assert_eq!(whole, ["a.md#0.0", "a.md#0.2", "a.md#0.3", "a.md#0.5"]);
        let rejected = rejects();
        assert_eq!(rejected, ["a.md#0.1", "a.md#0.4"]);

        shared.rejects.lock().unwrap().clear();
        let streamed = validate.stream(cx).expect("validate streams");
        let kept = crate::stage::fed_in_pieces(streamed, &[&input[..2], &input[2..5], &input[5..]]);
        assert_eq!(kept, whole);
        assert_eq!(rejects(), rejected);
        assert_eq!(StageStats::get(&stats.items), 12);
    }
}
