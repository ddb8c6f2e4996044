//! The minijinja environment prompts are rendered with: a search path of template folders,
//! strict undefined (a typo is an error naming template and line, not an empty prompt), no
//! HTML escaping.
//!
//! Stages compile their templates and expressions once per run ([`Templates::template`],
//! [`Templates::inline`], [`Templates::expression`]) and render them per record.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior};

pub struct Templates {
    env: Environment<'static>,
    dirs: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub message: String,
}

impl Templates {
    /// `dirs` are searched in order for template names.
    pub fn new(dirs: Vec<PathBuf>) -> Arc<Self> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_debug(true);
        // Templates are read once per run; with auto-reload on, every lookup `stat`s the file.
        env.set_auto_reload(false);
        let search = dirs.clone();
        env.set_loader(move |name| {
            for dir in &search {
                if let Some(source) = minijinja::path_loader(dir)(name)? {
                    return Ok(Some(source));
                }
            }
            Ok(None)
        });
        Arc::new(Templates { env, dirs })
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The file a template name resolves to.
    pub fn locate(&self, name: &str) -> Option<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    }

    /// Load and compile a template by name, so syntax errors surface before anything runs.
    pub fn check(&self, name: &str) -> Result<(), TemplateError> {
        self.env.get_template(name).map(|_| ()).map_err(describe)
    }

    /// Compile an inline template given in the pipeline file.
    pub fn check_inline(&self, name: &str, source: &str) -> Result<(), TemplateError> {
        self.env
            .template_from_named_str(name, source)
            .map(|_| ())
            .map_err(describe)
    }

    pub fn render(&self, name: &str, context: &minijinja::Value) -> Result<String, TemplateError> {
        let template = self.env.get_template(name).map_err(describe)?;
        template.render(context).map_err(describe)
    }

    /// Compile an expression such as `max(1, text | length // 100)`.
    pub fn check_expression(&self, source: &str) -> Result<(), TemplateError> {
        self.env
            .compile_expression(source)
            .map(|_| ())
            .map_err(describe)
    }

    /// Compile an expression once, to evaluate it on many records.
    pub fn expression<'a>(&'a self, source: &'a str) -> Result<Expression<'a>, TemplateError> {
        let compiled = self.env.compile_expression(source).map_err(describe)?;
        Ok(Expression {
            source,
            field: is_bare_name(source.trim()).then(|| source.trim()),
            compiled,
        })
    }

    /// A template file by name, loaded and compiled once, to render on many records.
    pub fn template<'a>(&'a self, name: &str) -> Result<Template<'a>, TemplateError> {
        self.env.get_template(name).map(Template).map_err(describe)
    }

    /// An inline template from the pipeline file, compiled once, to render on many records.
    pub fn inline<'a>(
        &'a self,
        name: &'a str,
        source: &'a str,
    ) -> Result<Template<'a>, TemplateError> {
        self.env
            .template_from_named_str(name, source)
            .map(Template)
            .map_err(describe)
    }
}

/// A compiled template (see [`Templates::template`] and [`Templates::inline`]).
pub struct Template<'a>(minijinja::Template<'a, 'a>);

impl Template<'_> {
    pub fn render(&self, context: &minijinja::Value) -> Result<String, TemplateError> {
        self.0.render(context).map_err(describe)
    }

    /// Whether the template is text alone (comments aside): no `{{ }}` and no `{% %}`, so it
    /// renders the same for every record.
    pub fn is_text(&self) -> bool {
        let source = self.0.source();
        !source.contains("{{") && !source.contains("{%")
    }
}

/// A compiled expression, such as `max(1, text | length // 100)` or `question`.
pub struct Expression<'a> {
    source: &'a str,
    field: Option<&'a str>,
    compiled: minijinja::Expression<'a, 'a>,
}

impl Expression<'_> {
    pub fn source(&self) -> &str {
        self.source
    }

    /// The field this expression reads when it is a bare name such as `question`, so a
    /// caller holding the record can read that field without minijinja. Only when the record
    /// has the field: a missing name resolves like any other expression (it may be a global).
    pub fn field(&self) -> Option<&str> {
        self.field
    }

    pub fn eval(&self, context: &minijinja::Value) -> Result<minijinja::Value, TemplateError> {
        self.compiled.eval(context).map_err(describe)
    }
}

/// An identifier that minijinja reads as a variable lookup (not `true`, `none`, `not` …).
fn is_bare_name(source: &str) -> bool {
    const RESERVED: &[&str] = &[
        "true", "false", "none", "True", "False", "None", "not", "and", "or", "in", "is", "if",
        "else", "loop", "self",
    ];
    let mut chars = source.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !RESERVED.contains(&source)
}

/// `qa/user.j2:3: undefined value (in {{ chunk.txt }})` — template and line first.
fn describe(err: minijinja::Error) -> TemplateError {
    let what = match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    };
    let snippet = match (err.template_source(), err.range()) {
        (Some(source), Some(range)) => source
            .get(range)
            .map(|s| format!(" (in `{}`)", s.trim()))
            .unwrap_or_default(),
        _ => String::new(),
    };
    let message = match (err.name(), err.line()) {
        (Some(name), Some(line)) => format!("{name}:{line}: {what}{snippet}"),
        (Some(name), None) => format!("{name}: {what}{snippet}"),
        _ => format!("{what}{snippet}"),
    };
    TemplateError { message }
}

/// The digest of a file's bytes, for settings that must change when a file they read does.
pub fn file_digest(path: &Path) -> std::io::Result<String> {
    Ok(blake3::hash(&std::fs::read(path)?).to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    fn templates() -> (tempfile::TempDir, Arc<Templates>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("qa")).unwrap();
        std::fs::write(
            dir.path().join("qa/user.j2"),
            "{% import 'qa/macros.j2' as m %}Passage:\n{{ m.quote(text) }}\nWrite {{ items }} pairs.",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("qa/macros.j2"),
            "{% macro quote(t) %}> {{ t }}{% endmacro %}",
        )
        .unwrap();
        std::fs::write(dir.path().join("typo.j2"), "line one\n{{ chunk.txt }}\n").unwrap();
        std::fs::write(dir.path().join("broken.j2"), "ok\n{% if %}\n").unwrap();
        let t = Templates::new(vec![dir.path().to_path_buf()]);
        (dir, t)
    }

    #[test]
    fn renders_with_imports_and_no_escaping() {
        let (_dir, t) = templates();
        let out = t
            .render(
                "qa/user.j2",
                &context! { text => "a < b & \"c\"", items => 3 },
            )
            .unwrap();
        assert_eq!(out, "Passage:\n> a < b & \"c\"\nWrite 3 pairs.");
    }

    #[test]
    fn undefined_values_are_errors_naming_template_and_line() {
        let (_dir, t) = templates();
        let err = t
            .render("typo.j2", &context! { chunk => context! { text => "x" } })
            .unwrap_err();
        assert!(
            err.message.starts_with("typo.j2:2: undefined value"),
            "{}",
            err.message
        );
    }

    #[test]
    fn text_alone_is_told_from_templates_that_read_records() {
        let t = Templates::new(Vec::new());
        for (source, text) in [
            ("You write pairs.\nReply with JSON only.", true),
            ("{# a note #}You write pairs.", true),
            ("About {{ path }}.", false),
            ("{% if items == 1 %}one{% endif %}", false),
            ("{%- set x = 1 %}x", false),
        ] {
            let template = t.inline("t", source).unwrap();
            assert_eq!(template.is_text(), text, "{source}");
        }
        let template = t.inline("t", "{# a note #}You write pairs.").unwrap();
        assert_eq!(
            template.render(&minijinja::Value::UNDEFINED).unwrap(),
            "You write pairs."
        );
    }

    #[test]
    fn syntax_errors_name_template_and_line() {
        let (_dir, t) = templates();
        let err = t.check("broken.j2").unwrap_err();
        assert!(
            err.message.starts_with("broken.j2:2: syntax error"),
            "{}",
            err.message
        );
        let err = t.check("missing.j2").unwrap_err();
        assert!(
            err.message.contains("template not found"),
            "{}",
            err.message
        );
    }
}
