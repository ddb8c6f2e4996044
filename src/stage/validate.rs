//! `validate`: keep records that match a JSON Schema; the others go to the rejects file with
//! the first validation error.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{BuildContext, JsonSchemaFile, Kind, Stage, StageContext, StageError, StageStats};
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

impl Stage for Validate {
    fn partition(&self) -> super::Partition {
        super::Partition::PerDocument
    }

    fn settings(&self) -> Json {
        json!({ "schema": self.config.schema, "digest": self.schema.digest })
    }

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>> {
        async move {
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
            Ok(out)
        }
        .boxed()
    }
}
