//! Pipeline files: YAML → a tree of positioned nodes → vars substituted → a validated [`Plan`].
//! This module is the only one that knows the YAML crate; it collects every error it finds,
//! each with `file:line:col` and a hint.

pub mod diagnostic;
pub mod node;
pub mod plan;
pub mod schema;
pub mod vars;

use std::path::{Path, PathBuf};

use indexmap::IndexMap;

pub use diagnostic::{Diagnostic, Diagnostics};
pub use node::{Loc, Node, Value};
pub use plan::{Plan, PlannedStage};

/// The pipeline file format version this build reads.
pub const FORMAT_VERSION: u64 = 1;

const TOP_LEVEL_KEYS: &[&str] = &[
    "version",
    "name",
    "vars",
    "templates",
    "providers",
    "stages",
];

/// A stage as written: its name, kind and inputs, and the whole node for its settings.
#[derive(Debug, Clone)]
pub struct RawStage {
    pub name: String,
    pub name_loc: Loc,
    pub kind: String,
    pub kind_loc: Loc,
    pub inputs: Vec<(String, Loc)>,
    pub node: Node,
}

/// A pipeline file read and checked for shape, with vars substituted; stage and provider
/// settings are still nodes, deserialized by their kinds when the plan is built.
#[derive(Debug, Clone)]
pub struct PipelineFile {
    /// The path as the user gave it (used in messages).
    pub path: PathBuf,
    /// The directory relative paths inside the file (templates, schemas) are resolved against.
    pub dir: PathBuf,
    pub source: String,
    pub name: String,
    pub vars: IndexMap<String, serde_json::Value>,
    pub templates: Vec<(String, Loc)>,
    pub providers: Vec<(String, Loc, Node)>,
    pub stages: Vec<RawStage>,
    /// Errors found so far; building the plan adds its own, so all are shown at once.
    pub problems: Vec<Diagnostic>,
}

impl PipelineFile {
    /// Read `path`, apply `--set name=value` overrides, substitute `${var}` references.
    pub fn read(path: &Path, sets: &[(String, String)]) -> Result<PipelineFile, Diagnostics> {
        let source = std::fs::read_to_string(path).map_err(|err| Diagnostics {
            errors: vec![
                Diagnostic::new(path, None, format!("cannot read the pipeline file: {err}"))
                    .hint("pass the path of a pipeline YAML file, e.g. `pipelines/docs-qa.yaml`"),
            ],
            source: None,
        })?;
        Self::parse(path, source, sets)
    }

    pub fn parse(
        path: &Path,
        source: String,
        sets: &[(String, String)],
    ) -> Result<PipelineFile, Diagnostics> {
        let mut errors = Vec::new();
        match parse_nodes(path, &source, sets, &mut errors) {
            Some(mut file) => {
                file.problems = errors;
                Ok(file)
            }
            None => Err(Diagnostics {
                errors,
                source: Some((path.to_path_buf(), source)),
            }),
        }
    }
}

fn parse_nodes(
    path: &Path,
    source: &str,
    sets: &[(String, String)],
    errors: &mut Vec<Diagnostic>,
) -> Option<PipelineFile> {
    let root: Node = match node::parse_yaml(source) {
        Ok(root) => root,
        Err(err) => {
            let loc = err.location().map(|l| Loc {
                line: u32::try_from(l.line()).unwrap_or(u32::MAX),
                col: u32::try_from(l.column()).unwrap_or(u32::MAX),
            });
            // The crate's message repeats the position in prose after the first line; the
            // first line is the message, the position is shown our way.
            let message = err.to_string();
            let message = message.lines().next().unwrap_or("invalid YAML").to_owned();
            errors.push(
                Diagnostic::new(path, loc, format!("invalid YAML: {message}"))
                    .hint("check indentation and quoting around this position"),
            );
            return None;
        }
    };
    let Some(entries) = root.entries() else {
        errors.push(
            Diagnostic::new(
                path,
                Some(root.loc),
                format!("a pipeline must be a mapping, found {}", root.type_name()),
            )
            .hint("start with `version: 1`, `name:` and `stages:`"),
        );
        return None;
    };

    for (key, _) in entries {
        match key.as_str() {
            Some(k) if TOP_LEVEL_KEYS.contains(&k) => {}
            other => errors.push(
                Diagnostic::new(
                    path,
                    Some(key.loc),
                    format!("unknown top-level key `{}`", other.unwrap_or("?")),
                )
                .hint(node::suggest(other.unwrap_or(""), TOP_LEVEL_KEYS, "keys")),
            ),
        }
    }

    match root.entry("version") {
        None => errors.push(
            Diagnostic::new(path, Some(root.loc), "missing `version`")
                .hint(format!("add `version: {FORMAT_VERSION}` at the top")),
        ),
        Some((_, v)) => match v.value {
            Value::Int(n) if n as u64 == FORMAT_VERSION => {}
            _ => errors.push(
                Diagnostic::new(
                    path,
                    Some(v.loc),
                    format!(
                        "unsupported pipeline version {}",
                        v.scalar_text().unwrap_or_else(|| v.type_name().into())
                    ),
                )
                .hint(format!("this keg reads `version: {FORMAT_VERSION}`")),
            ),
        },
    }

    let vars = vars::collect(path, root.get("vars"), sets, errors);

    let interpolate = |node: &Node, errors: &mut Vec<Diagnostic>| {
        let mut node = node.clone();
        vars::interpolate(path, &mut node, &vars, errors);
        node
    };

    let name = match root.get("name").map(|n| interpolate(n, errors)) {
        Some(n) => match n.scalar_text() {
            Some(s) if !s.is_empty() => s,
            _ => {
                errors.push(Diagnostic::new(
                    path,
                    Some(n.loc),
                    "`name` must be a non-empty string",
                ));
                String::new()
            }
        },
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };

    let templates = match root.get("templates").map(|n| interpolate(n, errors)) {
        None => Vec::new(),
        Some(n) => string_list(path, &n, "templates", errors),
    };

    let mut providers = Vec::new();
    if let Some(n) = root.get("providers") {
        match n.entries() {
            Some(entries) => {
                for (key, value) in entries {
                    let Some(name) = key.as_str() else {
                        errors.push(Diagnostic::new(
                            path,
                            Some(key.loc),
                            "provider names must be strings",
                        ));
                        continue;
                    };
                    let value = interpolate(value, errors);
                    providers.push((name.to_owned(), key.loc, value));
                }
            }
            None => errors.push(
                Diagnostic::new(
                    path,
                    Some(n.loc),
                    format!("`providers` must be a mapping, found {}", n.type_name()),
                )
                .hint("write `providers:` followed by `NAME:` entries"),
            ),
        }
    }

    let mut stages = Vec::new();
    match root.get("stages") {
        None => errors.push(
            Diagnostic::new(path, Some(root.loc), "missing `stages`")
                .hint("add `stages:` with at least a `load` stage"),
        ),
        Some(n) => match n.entries() {
            Some(entries) => {
                for (key, value) in entries {
                    let value = interpolate(value, errors);
                    if let Some(stage) = raw_stage(path, key, &value, errors) {
                        stages.push(stage);
                    }
                }
            }
            None => errors.push(
                Diagnostic::new(
                    path,
                    Some(n.loc),
                    format!("`stages` must be a mapping, found {}", n.type_name()),
                )
                .hint("write `stages:` followed by `NAME:` entries, each with a `kind`"),
            ),
        },
    }

    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Some(PipelineFile {
        path: path.to_path_buf(),
        dir: if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        },
        source: source.to_owned(),
        name,
        vars,
        templates,
        providers,
        stages,
        problems: Vec::new(),
    })
}

/// A stage or provider name: what the names may be made of, so they work as file names and
/// in graphs.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn raw_stage(
    path: &Path,
    key: &Node,
    node: &Node,
    errors: &mut Vec<Diagnostic>,
) -> Option<RawStage> {
    let name = match key.as_str() {
        Some(name) if is_valid_name(name) => name.to_owned(),
        _ => {
            errors.push(
                Diagnostic::new(
                    path,
                    Some(key.loc),
                    format!(
                        "invalid stage name `{}`",
                        key.scalar_text().unwrap_or_default()
                    ),
                )
                .hint("use letters, digits, `-` and `_`"),
            );
            return None;
        }
    };
    if node.entries().is_none() {
        errors.push(
            Diagnostic::new(
                path,
                Some(node.loc),
                format!(
                    "stage `{name}` must be a mapping, found {}",
                    node.type_name()
                ),
            )
            .hint("give the stage a `kind` and its settings, e.g. `kind: load`"),
        );
        return None;
    }
    let (kind, kind_loc) = match node.get("kind") {
        Some(k) => match k.as_str() {
            Some(s) => (s.to_owned(), k.loc),
            None => {
                errors.push(Diagnostic::new(
                    path,
                    Some(k.loc),
                    format!("stage `{name}`: `kind` must be a string"),
                ));
                return None;
            }
        },
        None => {
            errors.push(
                Diagnostic::new(path, Some(key.loc), format!("stage `{name}` has no `kind`")).hint(
                    format!(
                        "add `kind:` with one of: {}",
                        crate::stage::kind_names().join(", ")
                    ),
                ),
            );
            return None;
        }
    };
    let inputs = match node.get("inputs") {
        None => Vec::new(),
        Some(n) => match &n.value {
            Value::Str(s) => vec![(s.clone(), n.loc)],
            Value::Seq(items) => items
                .iter()
                .filter_map(|item| match item.as_str() {
                    Some(s) => Some((s.to_owned(), item.loc)),
                    None => {
                        errors.push(Diagnostic::new(
                            path,
                            Some(item.loc),
                            format!("stage `{name}`: each input must be a stage name"),
                        ));
                        None
                    }
                })
                .collect(),
            _ => {
                errors.push(
                    Diagnostic::new(
                        path,
                        Some(n.loc),
                        format!("stage `{name}`: `inputs` must be a list of stage names"),
                    )
                    .hint("e.g. `inputs: [docs]`"),
                );
                Vec::new()
            }
        },
    };
    Some(RawStage {
        name,
        name_loc: key.loc,
        kind,
        kind_loc,
        inputs,
        node: node.clone(),
    })
}

fn string_list(
    path: &Path,
    node: &Node,
    what: &str,
    errors: &mut Vec<Diagnostic>,
) -> Vec<(String, Loc)> {
    match &node.value {
        Value::Str(s) => vec![(s.clone(), node.loc)],
        Value::Seq(items) => items
            .iter()
            .filter_map(|item| match item.scalar_text() {
                Some(s) => Some((s, item.loc)),
                None => {
                    errors.push(Diagnostic::new(
                        path,
                        Some(item.loc),
                        format!("`{what}` entries must be strings"),
                    ));
                    None
                }
            })
            .collect(),
        _ => {
            errors.push(Diagnostic::new(
                path,
                Some(node.loc),
                format!("`{what}` must be a list of strings"),
            ));
            Vec::new()
        }
    }
}
