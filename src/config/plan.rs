//! The validated plan: providers built, every stage's settings deserialized by its kind,
//! templates and schemas checked, the graph sealed in run order. All errors are collected.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::{Value as Json, json};

use super::diagnostic::{Diagnostic, Diagnostics};
use super::node::suggest;
use super::{PipelineFile, is_valid_name};
use crate::dag::Dag;
use crate::provider::{Provider, ProviderConfig};
use crate::record::canonical_hash;
use crate::stage::{self, BuildContext, Stage};
use crate::template::Templates;

pub struct PlannedStage {
    pub name: String,
    pub kind: &'static str,
    /// Indices into `Plan::stages` of the stages this one reads, in the order written.
    pub inputs: Vec<usize>,
    pub stage: Arc<dyn Stage>,
    /// Split names assigned upstream (or by this stage).
    pub splits: Option<Vec<String>>,
    /// Names of every stage that feeds this one.
    pub ancestors: Vec<String>,
}

pub struct Plan {
    pub file: PipelineFile,
    /// In run order: every stage after its inputs.
    pub stages: Vec<PlannedStage>,
    pub providers: IndexMap<String, Arc<Provider>>,
    /// blake3 over every stage's resolved settings and the providers' identities.
    pub hash: String,
    /// blake3 over every file in the template search path: a template may include or import
    /// any of them, so results kept per document must change when any of them does.
    pub templates_digest: String,
    /// The vars templates (files or inline) read, with their values: a template that reads a
    /// var renders differently when it changes, though no stage setting does.
    pub template_vars: Json,
}

impl Plan {
    /// Read, check and plan a pipeline file.
    pub fn load(path: &Path, sets: &[(String, String)]) -> Result<Plan, Diagnostics> {
        let file = PipelineFile::read(path, sets)?;
        Plan::build(file)
    }

    pub fn build(mut file: PipelineFile) -> Result<Plan, Diagnostics> {
        let mut errors = std::mem::take(&mut file.problems);

        let mut providers = IndexMap::new();
        for (name, loc, node) in &file.providers {
            if !is_valid_name(name) {
                errors.push(
                    Diagnostic::new(
                        &file.path,
                        Some(*loc),
                        format!("invalid provider name `{name}`"),
                    )
                    .hint("use letters, digits, `-` and `_`"),
                );
                continue;
            }
            match node.deserialize::<ProviderConfig>() {
                Ok(config) => match Provider::new(name, config) {
                    Ok(p) => {
                        providers.insert(name.clone(), Arc::new(p));
                    }
                    Err(message) => {
                        errors.push(Diagnostic::new(&file.path, Some(*loc), message));
                    }
                },
                Err(err) => errors.push(Diagnostic::from_de(
                    &file.path,
                    err,
                    &format!("provider `{name}`"),
                )),
            }
        }

        let templates = Templates::new(template_dirs(&file, &mut errors));
        let (templates_digest, mut vars_read) = folders_digest(templates.dirs());

        let mut built: Vec<Option<Arc<dyn Stage>>> = Vec::with_capacity(file.stages.len());
        for raw in &file.stages {
            let Some(kind) = stage::kind(&raw.kind) else {
                errors.push(
                    Diagnostic::new(
                        &file.path,
                        Some(raw.kind_loc),
                        format!("unknown stage kind `{}`", raw.kind),
                    )
                    .hint(suggest(&raw.kind, &stage::kind_names(), "kinds")),
                );
                built.push(None);
                continue;
            };
            if kind.takes_inputs && raw.inputs.is_empty() {
                errors.push(
                    Diagnostic::new(
                        &file.path,
                        Some(raw.name_loc),
                        format!("stage `{}` ({}) has no `inputs`", raw.name, kind.name),
                    )
                    .hint("add `inputs: [STAGE]` naming the stage it reads"),
                );
            }
            if !kind.takes_inputs && !raw.inputs.is_empty() {
                let loc = raw.inputs[0].1;
                errors.push(
                    Diagnostic::new(
                        &file.path,
                        Some(loc),
                        format!("stage `{}` ({}) reads no other stage", raw.name, kind.name),
                    )
                    .hint("remove `inputs`"),
                );
            }
            let cx = BuildContext {
                file: &file,
                stage: raw,
                templates: &templates,
                providers: &providers,
            };
            match (kind.build)(&cx) {
                Ok(stage) => built.push(Some(stage)),
                Err(mut e) => {
                    errors.append(&mut e);
                    built.push(None);
                }
            }
        }

        let dag = match Dag::build(&file) {
            Ok(dag) => Some(dag),
            Err(mut e) => {
                errors.append(&mut e);
                None
            }
        };

        if !errors.is_empty() {
            errors.sort_by(|a, b| (&a.file, a.loc).cmp(&(&b.file, b.loc)));
            errors.dedup();
            let source = Some((file.path.clone(), file.source.clone()));
            return Err(Diagnostics { errors, source });
        }
        let Some(dag) = dag else {
            return Err(Diagnostics {
                errors,
                source: None,
            });
        };

        // Seal: stages in run order with inputs as indices into that order.
        let position: std::collections::HashMap<usize, usize> = dag
            .order
            .iter()
            .enumerate()
            .map(|(pos, &i)| (i, pos))
            .collect();
        let by_name: std::collections::HashMap<&str, usize> = file
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut stages: Vec<PlannedStage> = Vec::with_capacity(dag.order.len());
        for &i in &dag.order {
            let raw = &file.stages[i];
            let stage = built[i].clone().ok_or_else(|| Diagnostics {
                errors: Vec::new(),
                source: None,
            })?;
            let inputs: Vec<usize> = raw
                .inputs
                .iter()
                .filter_map(|(name, _)| by_name.get(name.as_str()).map(|j| position[j]))
                .collect();
            let splits = stage
                .splits()
                .or_else(|| inputs.iter().find_map(|&j| stages[j].splits.clone()));
            let ancestors = (0..file.stages.len())
                .filter(|&j| dag.feeds(j, i))
                .map(|j| file.stages[j].name.clone())
                .collect();
            stages.push(PlannedStage {
                name: raw.name.clone(),
                kind: stage::kind(&raw.kind).map_or("", |k| k.name),
                inputs,
                stage,
                splits,
                ancestors,
            });
        }

        for s in &stages {
            // Inline templates live in the settings.
            vars_read.scan(&s.stage.settings().to_string());
        }
        let template_vars = vars_read.select(&file.vars);
        let hash = canonical_hash(&json!({
            "stages": stages.iter().map(|s| json!({
                "name": s.name,
                "kind": s.kind,
                "inputs": s.inputs.iter().map(|&j| &stages[j].name).collect::<Vec<_>>(),
                "settings": s.stage.settings(),
            })).collect::<Vec<_>>(),
            "providers": providers.iter().map(|(name, p)| (name.clone(), provider_identity(p))).collect::<serde_json::Map<_, _>>(),
        }))
        .to_hex()
        .to_string();

        Ok(Plan {
            file,
            stages,
            providers,
            hash,
            templates_digest,
            template_vars,
        })
    }

    /// The providers that generate stages use, as the manifest lists them.
    pub fn models(&self) -> Json {
        let mut seen = Vec::new();
        for stage in &self.stages {
            if let Some(p) = stage.stage.provider()
                && !seen.iter().any(|(n, _)| n == &p.name)
            {
                seen.push((p.name.clone(), provider_identity(p)));
            }
        }
        Json::Array(seen.into_iter().map(|(_, v)| v).collect())
    }
}

/// What identifies a provider's answers: never its key.
pub fn provider_identity(p: &Provider) -> Json {
    json!({
        "provider": p.name,
        "kind": p.config.kind.name(),
        "model": p.config.model,
        "base_url": p.config.base_url,
        "temperature": p.config.temperature,
        "top_p": p.config.top_p,
        "seed": p.config.seed,
    })
}

/// blake3 over the relative paths and bytes of every file under `dirs`, in a fixed order,
/// and which vars those files read (see [`VarsRead`]). An unreadable file counts by its
/// error, so that it still changes the digest when fixed.
fn folders_digest(dirs: &[PathBuf]) -> (String, VarsRead) {
    let mut hasher = blake3::Hasher::new();
    let mut read = VarsRead::default();
    for (i, dir) in dirs.iter().enumerate() {
        for entry in walkdir::WalkDir::new(dir)
            .sort_by_file_name()
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
        {
            let relative = entry.path().strip_prefix(dir).unwrap_or(entry.path());
            let bytes = std::fs::read(entry.path()).unwrap_or_else(|e| e.to_string().into_bytes());
            hasher.update(format!("{i}\0{}\0{}\0", relative.display(), bytes.len()).as_bytes());
            hasher.update(&bytes);
            read.scan(&String::from_utf8_lossy(&bytes));
        }
    }
    (hasher.finalize().to_hex().to_string(), read)
}

/// The vars a template text may read: the names written as `vars.name`, or all of them
/// when `vars` appears any other way (`vars[key]`, `vars | tojson`, prose), which cannot be
/// followed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct VarsRead {
    pub all: bool,
    pub names: std::collections::BTreeSet<String>,
}

impl VarsRead {
    pub fn scan(&mut self, text: &str) {
        let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let mut rest = text;
        while let Some(at) = rest.find("vars") {
            let before = rest[..at].chars().next_back();
            let after = &rest[at + 4..];
            rest = after;
            if before.is_some_and(is_ident) || after.starts_with(is_ident) {
                continue; // part of another word
            }
            let name: String = after
                .strip_prefix('.')
                .map(|n| n.chars().take_while(|&c| is_ident(c)).collect())
                .unwrap_or_default();
            if name.is_empty() {
                self.all = true;
            } else {
                self.names.insert(name);
            }
        }
    }

    /// The vars read, with their values.
    pub fn select(&self, vars: &IndexMap<String, Json>) -> Json {
        Json::Object(
            vars.iter()
                .filter(|(name, _)| self.all || self.names.contains(*name))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        )
    }
}

/// The template search path: the folders the file lists (relative to the file), then
/// `templates/` beside the file, then `templates/` in the working directory.
fn template_dirs(file: &PipelineFile, errors: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for (dir, loc) in &file.templates {
        let path = file.dir.join(dir);
        if path.is_dir() {
            dirs.push(path);
        } else {
            errors.push(
                Diagnostic::new(
                    &file.path,
                    Some(*loc),
                    format!("template folder `{}` does not exist", path.display()),
                )
                .hint("template folders are relative to the pipeline file"),
            );
        }
    }
    for candidate in [file.dir.join("templates"), PathBuf::from("templates")] {
        if candidate.is_dir() && !dirs.contains(&candidate) {
            dirs.push(candidate);
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vars_read_by_name_or_all_of_them() {
        let mut read = VarsRead::default();
        read.scan("{{ vars.audience }} {{ envvars }} {{ varsity }} {% if vars.k_2 %}");
        assert_eq!(
            read,
            VarsRead {
                all: false,
                names: ["audience".to_owned(), "k_2".to_owned()].into(),
            }
        );
        let vars: IndexMap<String, Json> = [("a".to_owned(), json!(1)), ("b".to_owned(), json!(2))]
            .into_iter()
            .collect();
        let mut some = VarsRead::default();
        some.scan("{{ vars.b }}");
        assert_eq!(some.select(&vars), json!({"b": 2}));
        read.scan("{{ vars[name] }}");
        assert!(read.all);
        assert_eq!(read.select(&vars), json!({"a": 1, "b": 2}));
    }
}
