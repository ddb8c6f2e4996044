//! `prompt`: render system and user messages for each record from minijinja templates.
//! Templates see the record's fields, `vars`, and `items` — how many examples to ask for.
//! The count lives here rather than in `generate` because the prompt has to say it; `generate`
//! reads it back to size its token budget.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{BuildContext, Kind, Stage, StageContext, StageError, StageStats, template_context};
use crate::config::Diagnostic;
use crate::record::Record;
use crate::template::{Templates, file_digest};

pub const KIND: Kind = Kind {
    name: "prompt",
    about: "render chat messages for each record from minijinja templates",
    takes_inputs: true,
    build,
    schema: |g| g.subschema_for::<PromptConfig>(),
};

/// Settings of a `prompt` stage. Give each message either inline (`system`, `user`) or as a
/// template file name looked up on the template search path (`system_template`,
/// `user_template`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub system_template: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub user_template: Option<String>,
    /// An expression for how many examples to ask for, e.g. `[1, (text | length) // 100] | max`.
    /// Default: 10 per 1,000 characters of `text` (at least 1) when records have `text`.
    #[serde(default)]
    pub items: Option<String>,
}

/// 10 per 1,000 characters, at least one.
const DEFAULT_ITEMS: &str = "[1, ((text | length) + 50) // 100] | max";

enum Message {
    Inline(String),
    File { name: String, digest: String },
}

pub struct Prompt {
    config: PromptConfig,
    templates: Arc<Templates>,
    system: Option<Message>,
    user: Message,
    vars: Json,
    inline_prefix: String,
}

fn build(cx: &BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
    let config: PromptConfig = cx.settings()?;
    let mut errors = Vec::new();
    let prefix = format!("{}#{}", cx.file.path.display(), cx.stage.name);
    let mut message = |inline: &Option<String>, file: &Option<String>, role: &str| {
        let file_field = format!("{role}_template");
        match (inline, file) {
            (Some(_), Some(_)) => {
                errors.push(cx.error(
                    &file_field,
                    format!("give `{role}` or `{file_field}`, not both"),
                ));
                None
            }
            (Some(source), None) => {
                if let Err(err) = cx
                    .templates
                    .check_inline(&format!("{prefix}.{role}"), source)
                {
                    errors.push(cx.error(role, err.message));
                }
                Some(Message::Inline(source.clone()))
            }
            (None, Some(name)) => {
                if let Err(err) = cx.templates.check(name) {
                    let searched = cx
                        .templates
                        .dirs()
                        .iter()
                        .map(|d| format!("`{}`", d.display()))
                        .collect::<Vec<_>>()
                        .join(", ");
                    errors.push(
                        cx.error(&file_field, err.message)
                            .hint(format!("templates are looked up in {searched}")),
                    );
                    return None;
                }
                let digest = cx
                    .templates
                    .locate(name)
                    .and_then(|p| file_digest(&p).ok())
                    .unwrap_or_default();
                Some(Message::File {
                    name: name.clone(),
                    digest,
                })
            }
            (None, None) => None,
        }
    };
    let system = message(&config.system, &config.system_template, "system");
    let user = message(&config.user, &config.user_template, "user");
    if config.user.is_none() && config.user_template.is_none() {
        errors.push(
            Diagnostic::new(
                &cx.file.path,
                Some(cx.stage.name_loc),
                format!("stage `{}`: no user message", cx.stage.name),
            )
            .hint("add `user_template: NAME.j2` or an inline `user:` template"),
        );
    }
    if let Some(expr) = &config.items
        && let Err(err) = cx.templates.check_expression(expr)
    {
        errors.push(cx.error("items", format!("invalid expression: {}", err.message)));
    }
    match (user, errors.is_empty()) {
        (Some(user), true) => Ok(Arc::new(Prompt {
            templates: cx.templates.clone(),
            system,
            user,
            vars: serde_json::to_value(&cx.file.vars).unwrap_or_default(),
            inline_prefix: prefix,
            config,
        })),
        _ => Err(errors),
    }
}

impl Prompt {
    fn render(
        &self,
        message: &Message,
        role: &str,
        context: &minijinja::Value,
    ) -> Result<String, StageError> {
        let text = match message {
            Message::Inline(source) => self.templates.render_inline(
                &format!("{}.{role}", self.inline_prefix),
                source,
                context,
            )?,
            Message::File { name, .. } => self.templates.render(name, context)?,
        };
        Ok(text.trim().to_owned())
    }

    fn items(&self, record: &Record) -> Result<Option<u64>, StageError> {
        let expr = match &self.config.items {
            Some(expr) => expr.as_str(),
            None if record.data.contains_key("text") => DEFAULT_ITEMS,
            None => return Ok(None),
        };
        let value = self.templates.eval(
            expr,
            &template_context(record, &[("vars", self.vars.clone())]),
        )?;
        match value.as_i64().and_then(|n| u64::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(StageError::Message(format!(
                "`items` expression `{expr}` gave `{value}` for {}, expected a whole number",
                record.lineage.display()
            ))),
        }
    }
}

impl Stage for Prompt {
    fn partition(&self) -> super::Partition {
        super::Partition::PerDocument
    }

    fn settings(&self) -> Json {
        let digest = |m: &Option<&Message>| match m {
            Some(Message::File { name, digest }) => json!({ "template": name, "digest": digest }),
            Some(Message::Inline(text)) => json!({ "inline": text }),
            None => Json::Null,
        };
        json!({
            "system": digest(&self.system.as_ref()),
            "user": digest(&Some(&self.user)),
            "items": self.config.items,
        })
    }

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>> {
        async move {
            let mut out = Vec::with_capacity(input.len());
            for mut record in input {
                StageStats::add(&cx.stats.items, 1);
                let items = self.items(&record)?;
                let mut extra = vec![("vars", self.vars.clone())];
                if let Some(n) = items {
                    extra.push(("items", json!(n)));
                    record.data.insert("items".into(), json!(n));
                }
                let context = template_context(&record, &extra);
                let mut messages = Vec::new();
                if let Some(system) = &self.system {
                    let content = self.render(system, "system", &context)?;
                    messages.push(json!({ "role": "system", "content": content }));
                }
                let content = self.render(&self.user, "user", &context)?;
                messages.push(json!({ "role": "user", "content": content }));
                record.data.insert("messages".into(), Json::Array(messages));
                out.push(record);
            }
            Ok(out)
        }
        .boxed()
    }
}
