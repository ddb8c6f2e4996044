//! Pipeline vars: declared with defaults under `vars:`, overridden with `--set name=value`,
//! referenced as `${name}` in any string of the file (`$${` writes a literal `${`).

use std::path::Path;

use indexmap::IndexMap;
use serde_json::Value as Json;

use super::diagnostic::Diagnostic;
use super::node::{Node, Value, suggest};

/// Declared vars with `--set` overrides applied, in declaration order.
pub fn collect(
    path: &Path,
    node: Option<&Node>,
    sets: &[(String, String)],
    errors: &mut Vec<Diagnostic>,
) -> IndexMap<String, Json> {
    let mut vars = IndexMap::new();
    if let Some(node) = node {
        match node.entries() {
            Some(entries) => {
                for (key, value) in entries {
                    let Some(name) = key.as_str() else {
                        errors.push(Diagnostic::new(
                            path,
                            Some(key.loc),
                            "var names must be strings",
                        ));
                        continue;
                    };
                    match &value.value {
                        Value::Seq(_) | Value::Map(_) => errors.push(
                            Diagnostic::new(
                                path,
                                Some(value.loc),
                                format!("var `{name}` must be a string, number or boolean"),
                            )
                            .hint("vars are substituted into strings as `${name}`"),
                        ),
                        _ => {
                            vars.insert(name.to_owned(), value.to_json());
                        }
                    }
                }
            }
            None => errors.push(Diagnostic::new(
                path,
                Some(node.loc),
                format!("`vars` must be a mapping, found {}", node.type_name()),
            )),
        }
    }
    for (name, value) in sets {
        match vars.get_mut(name) {
            Some(slot) => *slot = Json::String(value.clone()),
            None => {
                let names: Vec<&str> = vars.keys().map(String::as_str).collect();
                errors.push(
                    Diagnostic::new(
                        Path::new("--set"),
                        None,
                        format!(
                            "`--set {name}=…` names a var that {} does not declare",
                            path.display()
                        ),
                    )
                    .hint(suggest(name, &names, "vars")),
                );
            }
        }
    }
    vars
}

/// Substitute `${name}` in every string below `node`. A string that is exactly one reference
/// takes the var's value as it is (so `concurrency: ${n}` stays a number).
pub fn interpolate(
    path: &Path,
    node: &mut Node,
    vars: &IndexMap<String, Json>,
    errors: &mut Vec<Diagnostic>,
) {
    match &mut node.value {
        Value::Str(s) if s.contains('$') => match substitute(s, vars) {
            Ok(Substituted::Whole(value)) => {
                node.value = match value {
                    Json::Bool(b) => Value::Bool(*b),
                    Json::Number(n) if n.is_i64() => Value::Int(n.as_i64().unwrap_or_default()),
                    Json::Number(n) if n.is_u64() => Value::UInt(n.as_u64().unwrap_or_default()),
                    Json::Number(n) => Value::Float(n.as_f64().unwrap_or_default()),
                    Json::Null => Value::Null,
                    other => Value::Str(json_text(other)),
                }
            }
            Ok(Substituted::Text(text)) => *s = text,
            Err(err) => {
                let names: Vec<&str> = vars.keys().map(String::as_str).collect();
                let diagnostic = Diagnostic::new(path, Some(node.loc), err.message());
                errors.push(match err {
                    VarError::Undefined(name) => diagnostic.hint(format!(
                        "{}; declare it under `vars:` or pass `--set {name}=…`",
                        suggest(&name, &names, "vars")
                    )),
                    VarError::Unclosed => {
                        diagnostic.hint("write `${name}`, or `$${` for a literal `${`")
                    }
                });
            }
        },
        Value::Seq(items) => {
            for item in items {
                interpolate(path, item, vars, errors);
            }
        }
        Value::Map(entries) => {
            for (_, value) in entries {
                interpolate(path, value, vars, errors);
            }
        }
        _ => {}
    }
}

enum Substituted<'a> {
    Whole(&'a Json),
    Text(String),
}

#[derive(Debug, PartialEq)]
enum VarError {
    Undefined(String),
    Unclosed,
}

impl VarError {
    fn message(&self) -> String {
        match self {
            VarError::Undefined(name) => format!("undefined var `{name}`"),
            VarError::Unclosed => "unclosed `${` in a string".to_owned(),
        }
    }
}

fn json_text(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn substitute<'a>(
    text: &str,
    vars: &'a IndexMap<String, Json>,
) -> Result<Substituted<'a>, VarError> {
    if let Some(name) = text.strip_prefix("${").and_then(|t| t.strip_suffix('}'))
        && !name.contains(['$', '{', '}'])
    {
        let name = name.trim();
        return vars
            .get(name)
            .map(Substituted::Whole)
            .ok_or_else(|| VarError::Undefined(name.to_owned()));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail.find('}').ok_or(VarError::Unclosed)?;
            let name = tail[..end].trim();
            let value = vars
                .get(name)
                .ok_or_else(|| VarError::Undefined(name.to_owned()))?;
            out.push_str(&json_text(value));
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(Substituted::Text(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> IndexMap<String, Json> {
        let mut v = IndexMap::new();
        v.insert("docs".into(), Json::from("examples/docs"));
        v.insert("n".into(), Json::from(8));
        v
    }

    fn text(s: &str) -> String {
        match substitute(s, &vars()).unwrap() {
            Substituted::Text(t) => t,
            Substituted::Whole(v) => format!("whole:{v}"),
        }
    }

    #[test]
    fn substitutes_inside_text_and_keeps_whole_values_typed() {
        assert_eq!(text("${docs}/**/*.md"), "examples/docs/**/*.md");
        assert_eq!(text("${n}"), "whole:8");
        assert_eq!(text("a ${n} b"), "a 8 b");
        assert_eq!(text("cost: $5 and $${literal}"), "cost: $5 and ${literal}");
    }

    #[test]
    fn reports_undefined_and_unclosed() {
        assert!(
            matches!(substitute("${nope}/x", &vars()), Err(VarError::Undefined(n)) if n == "nope")
        );
        assert!(matches!(
            substitute("${docs", &vars()),
            Err(VarError::Unclosed)
        ));
    }
}
