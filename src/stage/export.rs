//! `export`: write one JSONL file per split (`train.jsonl` …) in a trainer format, plus
//! `rejects.jsonl` and `manifest.json`. Every file is written to a temp file and renamed, so
//! none is ever half-written; rows are in lineage order, so files are byte-identical across
//! runs whatever order LLM calls finished in.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{
    BuildContext, Kind, Mode, Reject, Stage, StageContext, StageError, StageStats, template_context,
};
use crate::config::Diagnostic;
use crate::record::Record;
use crate::template::Templates;

pub const KIND: Kind = Kind {
    name: "export",
    about: "write JSONL per split (prompt-completion or chat) with a manifest",
    takes_inputs: true,
    build,
    schema: |g| g.subschema_for::<ExportConfig>(),
};

/// Settings of an `export` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Output folder, relative to the working directory.
    pub dir: String,
    #[serde(default)]
    pub format: Format,
    /// Expression for the prompt (user turn), evaluated on each record: a field name such as
    /// `question`, or e.g. `"Q: " ~ question`.
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// Expression for the completion (assistant turn).
    #[serde(default = "default_completion")]
    pub completion: String,
    /// With `format: chat`, an optional system message (an inline template).
    #[serde(default)]
    pub system: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `{"prompt": …, "completion": …}` — TRL, Axolotl, MLX-LM.
    #[default]
    PromptCompletion,
    /// `{"messages": [{"role": …, "content": …}, …]}` — TRL, Axolotl, Unsloth, MLX-LM.
    Chat,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::PromptCompletion => "prompt-completion",
            Format::Chat => "chat",
        }
    }
}

fn default_prompt() -> String {
    "prompt".to_owned()
}
fn default_completion() -> String {
    "completion".to_owned()
}

pub struct Export {
    config: ExportConfig,
    templates: Arc<Templates>,
    template_name: String,
}

fn build(cx: &BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
    let config: ExportConfig = cx.settings()?;
    let mut errors = Vec::new();
    for field in ["prompt", "completion"] {
        let expr = if field == "prompt" {
            &config.prompt
        } else {
            &config.completion
        };
        if let Err(err) = cx.templates.check_expression(expr) {
            errors.push(cx.error(field, format!("invalid expression: {}", err.message)));
        }
    }
    let template_name = format!("{}#{}.system", cx.file.path.display(), cx.stage.name);
    if let Some(system) = &config.system {
        if config.format != Format::Chat {
            errors.push(
                cx.error("system", "`system` applies to `format: chat` only")
                    .hint("remove `system`, or set `format: chat`"),
            );
        }
        if let Err(err) = cx.templates.check_inline(&template_name, system) {
            errors.push(cx.error("system", err.message));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Arc::new(Export {
        config,
        templates: cx.templates.clone(),
        template_name,
    }))
}

impl Export {
    /// One output row, or why the record cannot be one.
    fn row(&self, record: &Record) -> Result<Json, String> {
        let context = template_context(record, &[]);
        let text = |expr: &str| -> Result<String, String> {
            let value = self.templates.eval(expr, &context).map_err(|e| e.message)?;
            let text = match value.as_str() {
                Some(s) => s.to_owned(),
                None if value.is_undefined() || value.is_none() => String::new(),
                None => value.to_string(),
            };
            if text.trim().is_empty() {
                Err(format!("`{expr}` is empty"))
            } else {
                Ok(text)
            }
        };
        let prompt = text(&self.config.prompt)?;
        let completion = text(&self.config.completion)?;
        Ok(match self.config.format {
            Format::PromptCompletion => json!({ "prompt": prompt, "completion": completion }),
            Format::Chat => {
                let mut messages = Vec::new();
                if let Some(system) = &self.config.system {
                    let system = self
                        .templates
                        .render_inline(&self.template_name, system, &context)
                        .map_err(|e| e.message)?;
                    if !system.trim().is_empty() {
                        messages.push(json!({ "role": "system", "content": system.trim() }));
                    }
                }
                messages.push(json!({ "role": "user", "content": prompt }));
                messages.push(json!({ "role": "assistant", "content": completion }));
                json!({ "messages": messages })
            }
        })
    }
}

/// Write `bytes` to `path` through a temp file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir, e))?;
    let mut file = tempfile::Builder::new()
        .prefix(".keg-tmp")
        .tempfile_in(dir)
        .map_err(|e| StageError::io(dir, e))?;
    file.write_all(bytes)
        .and_then(|()| file.as_file().sync_all())
        .map_err(|e| StageError::io(path, e))?;
    // Temp files are private (0600); outputs are ordinary files others may read.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| StageError::io(path, e))?;
    }
    file.persist(path)
        .map_err(|e| StageError::io(path, e.error))?;
    Ok(())
}

impl Stage for Export {
    fn settings(&self) -> Json {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        mut input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>> {
        async move {
            StageStats::add(&cx.stats.items, input.len() as u64);
            input.sort_by(crate::record::by_lineage);
            let dir = PathBuf::from(&self.config.dir);

            // Every split named upstream gets a file, even an empty one, so that a split
            // that emptied out does not leave last run's file behind.
            // In the order the splits were declared (train, valid, test).
            let mut files: IndexMap<String, Vec<u8>> = match cx.splits {
                Some(names) => names.iter().map(|n| (n.clone(), Vec::new())).collect(),
                None => IndexMap::new(),
            };
            let mut rows: IndexMap<String, usize> = files.keys().map(|k| (k.clone(), 0)).collect();
            for record in &input {
                let split = record.split.as_deref().unwrap_or("data").to_owned();
                match self.row(record) {
                    Ok(row) => {
                        let buf = files.entry(split.clone()).or_default();
                        serde_json::to_writer(&mut *buf, &row)
                            .map_err(|e| StageError::Message(e.to_string()))?;
                        buf.push(b'\n');
                        *rows.entry(split).or_default() += 1;
                    }
                    Err(reason) => cx.reject(&record.lineage, "empty_field", reason, None),
                }
            }

            let mut rejects: Vec<Reject> = cx
                .shared
                .rejects
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|r| r.stage == cx.name || cx.ancestors.contains(&r.stage))
                .cloned()
                .collect();
            rejects.sort_by(|a, b| (&a.order, &a.stage).cmp(&(&b.order, &b.stage)));
            let mut rejects_file = Vec::new();
            for reject in &rejects {
                serde_json::to_writer(&mut rejects_file, reject)
                    .map_err(|e| StageError::Message(e.to_string()))?;
                rejects_file.push(b'\n');
            }

            let documents = cx
                .shared
                .documents
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let splits: serde_json::Map<String, Json> = files
                .iter()
                .map(|(name, bytes)| {
                    (
                        name.clone(),
                        json!({
                            "file": format!("{name}.jsonl"),
                            "rows": rows.get(name).copied().unwrap_or(0),
                            "blake3": blake3::hash(bytes).to_hex().as_str(),
                        }),
                    )
                })
                .collect();
            let manifest = json!({
                "version": 1,
                "pipeline": cx.shared.pipeline_name,
                "pipeline_hash": cx.shared.pipeline_hash,
                "format": self.config.format.name(),
                "models": cx.shared.models,
                "splits": splits,
                "rejects": rejects.len(),
                "usage": *cx.shared.usage.lock().unwrap_or_else(|e| e.into_inner()),
                "documents": documents,
            });
            let mut manifest_bytes = serde_json::to_vec_pretty(&manifest)
                .map_err(|e| StageError::Message(e.to_string()))?;
            manifest_bytes.push(b'\n');

            if cx.shared.mode == Mode::Plan {
                return Ok(input);
            }
            let mut written = Vec::new();
            for (name, bytes) in &files {
                let path = dir.join(format!("{name}.jsonl"));
                write_atomic(&path, bytes)?;
                written.push((path, rows.get(name).copied().unwrap_or(0)));
            }
            let path = dir.join("rejects.jsonl");
            write_atomic(&path, &rejects_file)?;
            written.push((path, rejects.len()));
            let path = dir.join("manifest.json");
            write_atomic(&path, &manifest_bytes)?;
            written.push((path, 0));
            cx.stats
                .files
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(written);
            Ok(input)
        }
        .boxed()
    }
}
