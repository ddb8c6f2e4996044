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
use crate::template::{Expression, Template, Templates, file_digest};

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
    /// `name` is what errors call it: `pipeline.yaml#stage.user`.
    Inline {
        name: String,
        source: String,
    },
    File {
        name: String,
        digest: String,
    },
}

pub struct Prompt {
    config: PromptConfig,
    templates: Arc<Templates>,
    system: Option<Message>,
    user: Message,
    vars: minijinja::Value,
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
                let name = format!("{prefix}.{role}");
                if let Err(err) = cx.templates.check_inline(&name, source) {
                    errors.push(cx.error(role, err.message));
                }
                Some(Message::Inline {
                    name,
                    source: source.clone(),
                })
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
            vars: minijinja::Value::from(minijinja::value::Serde(
                serde_json::to_value(&cx.file.vars).unwrap_or_default(),
            )),
            config,
        })),
        _ => Err(errors),
    }
}

impl Prompt {
    fn compile<'a>(&'a self, message: &'a Message) -> Result<Template<'a>, StageError> {
        Ok(match message {
            Message::Inline { name, source } => self.templates.inline(name, source)?,
            Message::File { name, .. } => self.templates.template(name)?,
        })
    }

    /// How many examples to ask `record` for; `None` when there is no `items` expression and
    /// no `text` to size the default by. `count`: the expression read as a plain number
    /// (`items: 3`), the same for every record.
    fn items(
        &self,
        expr: &Expression,
        count: Option<u64>,
        record: &mut Record,
    ) -> Result<Option<u64>, StageError> {
        if self.config.items.is_none() && !record.data.contains_key("text") {
            return Ok(None);
        }
        if count.is_some() {
            return Ok(count);
        }
        let value = template_context(record, &[("vars", self.vars.clone())], |_, context| {
            expr.eval(context)
        })?;
        match value.as_i64().and_then(|n| u64::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(StageError::Message(format!(
                "`items` expression `{}` gave `{value}` for {}, expected a whole number",
                expr.source(),
                record.lineage.display()
            ))),
        }
    }
}

/// A chat message of rendered text, trimmed in place: the text is not copied again.
fn message(role: &str, mut content: String) -> Json {
    let end = content.trim_end().len();
    content.truncate(end);
    let start = content.len() - content.trim_start().len();
    content.drain(..start);
    let mut message = serde_json::Map::with_capacity(2);
    message.insert("role".to_owned(), Json::from(role));
    message.insert("content".to_owned(), Json::String(content));
    Json::Object(message)
}

impl Stage for Prompt {
    fn partition(&self) -> super::Partition {
        super::Partition::PerDocument
    }

    fn settings(&self) -> Json {
        let digest = |m: &Option<&Message>| match m {
            Some(Message::File { name, digest }) => json!({ "template": name, "digest": digest }),
            Some(Message::Inline { source, .. }) => json!({ "inline": source }),
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
            let system = self.system.as_ref().map(|m| self.compile(m)).transpose()?;
            let user = self.compile(&self.user)?;
            let items = self
                .templates
                .expression(self.config.items.as_deref().unwrap_or(DEFAULT_ITEMS))?;
            // A plain count (`items: 3`) is read once, not evaluated per record.
            let count = items.source().trim().parse::<u64>().ok();
            // A system message of text alone is the same for every record: rendered once.
            let fixed_system = match &system {
                Some(system) if system.is_text() => {
                    let content = system.render(&minijinja::Value::UNDEFINED)?;
                    Some(message("system", content))
                }
                _ => None,
            };
            let mut out = Vec::with_capacity(input.len());
            for mut record in input {
                StageStats::add(&cx.stats.items, 1);
                let items = self.items(&items, count, &mut record)?;
                let mut extra = vec![("vars", self.vars.clone())];
                if let Some(n) = items {
                    extra.push(("items", minijinja::Value::from(n)));
                    record.data.insert("items".into(), json!(n));
                }
                let messages = template_context(&mut record, &extra, |_, context| {
                    let mut messages = Vec::with_capacity(2);
                    if let Some(fixed) = &fixed_system {
                        messages.push(fixed.clone());
                    } else if let Some(system) = &system {
                        let content = system.render(context)?;
                        messages.push(message("system", content));
                    }
                    let content = user.render(context)?;
                    messages.push(message("user", content));
                    Ok::<_, StageError>(messages)
                })?;
                record.data.insert("messages".into(), Json::Array(messages));
                out.push(record);
            }
            Ok(out)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Lineage;

    #[test]
    fn templates_see_fields_with_extra_values_over_them_and_the_record_comes_back() {
        let templates = Templates::new(Vec::new());
        let Json::Object(data) = json!({ "text": "abc", "items": 1, "n": [1, 2] }) else {
            unreachable!()
        };
        let mut record = Record::new(data.clone(), Lineage::document("a.md"));
        let extra = [
            ("items", minijinja::Value::from(7)),
            (
                "vars",
                minijinja::Value::from(minijinja::value::Serde(json!({"k": "v"}))),
            ),
        ];
        let source = "{{ text }} {{ items }} {{ n | length }} {{ vars.k }}";
        let template = templates.inline("t", source).unwrap();
        let out = template_context(&mut record, &extra, |_, context| template.render(context));
        assert_eq!(out.unwrap().trim(), "abc 7 2 v");
        let err = template_context(&mut record, &extra, |_, context| {
            templates
                .inline("u", "line\n{{ txt }}")
                .unwrap()
                .render(context)
        })
        .unwrap_err();
        assert!(
            err.message.starts_with("u:2: undefined value"),
            "{}",
            err.message
        );
        assert_eq!(record.data, data);
    }
}
