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
        let templates_digest = folders_digest(templates.dirs());

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

/// blake3 over the relative paths and bytes of every file under `dirs`, in a fixed order.
/// An unreadable file counts by its error, so that it still changes the digest when fixed.
fn folders_digest(dirs: &[PathBuf]) -> String {
    let mut hasher = blake3::Hasher::new();
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
        }
    }
    hasher.finalize().to_hex().to_string()
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
