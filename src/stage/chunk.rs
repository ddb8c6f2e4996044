//! `chunk`: split each document's text into chunks, by characters with overlap or along
//! Markdown headings. Each chunk keeps the document's fields and adds `chunk` (its index),
//! `headings` (the heading trail) and its own `text`.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{BuildContext, Kind, Stage, StageContext, StageError, StageStats};
use crate::chunker;
use crate::config::Diagnostic;
use crate::record::Record;

pub const KIND: Kind = Kind {
    name: "chunk",
    about: "split documents into chunks (Markdown headings, or characters with overlap)",
    takes_inputs: true,
    build,
    schema: |g| g.subschema_for::<ChunkConfig>(),
};

/// Settings of a `chunk` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkConfig {
    #[serde(default)]
    pub strategy: Strategy,
    /// Largest chunk, in characters.
    #[serde(default = "default_max_chars")]
    pub max_chars: usize,
    /// Characters shared by consecutive chunks when text is cut by length.
    #[serde(default = "default_overlap")]
    pub overlap: usize,
    /// The field holding the text to split.
    #[serde(default = "default_field")]
    pub field: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Sections under headings; code blocks kept whole where they fit.
    #[default]
    Markdown,
    /// Fixed-size windows with overlap, cut at paragraph, line or word breaks.
    Chars,
}

fn default_max_chars() -> usize {
    2000
}
fn default_overlap() -> usize {
    200
}
fn default_field() -> String {
    "text".to_owned()
}

pub struct Chunk {
    config: ChunkConfig,
}

fn build(cx: &BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
    let config: ChunkConfig = cx.settings()?;
    let mut errors = Vec::new();
    if config.max_chars == 0 {
        errors.push(cx.error("max_chars", "`max_chars` must be at least 1"));
    }
    if config.overlap >= config.max_chars {
        errors.push(
            cx.error(
                "overlap",
                format!(
                    "`overlap` ({}) must be smaller than `max_chars` ({})",
                    config.overlap, config.max_chars
                ),
            )
            .hint("a tenth of `max_chars` is a common choice"),
        );
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Arc::new(Chunk { config }))
}

impl Stage for Chunk {
    fn partition(&self) -> super::Partition {
        super::Partition::PerDocument
    }

    fn settings(&self) -> Json {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>> {
        async move {
            let mut out = Vec::with_capacity(input.len() * 2);
            for mut record in input {
                StageStats::add(&cx.stats.items, 1);
                // Take the text out so each chunk copies the other fields, not the document.
                let Some(Json::String(text)) = record.data.shift_remove(&self.config.field) else {
                    return Err(StageError::Message(format!(
                        "record {} has no text field `{}`",
                        record.lineage.display(),
                        self.config.field
                    )));
                };
                let text = text.as_str();
                let pieces = match self.config.strategy {
                    Strategy::Markdown => {
                        chunker::split_markdown(text, self.config.max_chars, self.config.overlap)
                    }
                    Strategy::Chars => {
                        chunker::split_chars(text, self.config.max_chars, self.config.overlap)
                    }
                };
                for (index, piece) in pieces.into_iter().enumerate() {
                    let mut data = record.data.clone();
                    data.insert(self.config.field.clone(), Json::String(piece.text));
                    data.insert("chunk".into(), json!(index));
                    data.insert("headings".into(), json!(piece.headings));
                    out.push(Record::new(data, record.lineage.child(index)));
                }
            }
            Ok(out)
        }
        .boxed()
    }
}
