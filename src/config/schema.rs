//! The JSON Schema of pipeline files (`schemas/pipeline.schema.json`, for editors), built
//! from the same Rust types the parser uses; a test keeps the file in step.

use schemars::generate::SchemaSettings;
use serde_json::{Value as Json, json};

use crate::provider::ProviderConfig;
use crate::stage::KINDS;

pub fn pipeline_schema() -> Json {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let mut provider = generator.subschema_for::<ProviderConfig>().to_value();
    allow_var_references(&mut provider);
    let kinds: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
    let per_kind: Vec<Json> = KINDS
        .iter()
        .map(|kind| {
            let mut settings = (kind.schema)(&mut generator).to_value();
            allow_var_references(&mut settings);
            if let Some(props) = settings.get_mut("properties").and_then(Json::as_object_mut) {
                props.insert("kind".into(), json!({ "const": kind.name }));
                if kind.takes_inputs {
                    props.insert("inputs".into(), json!({ "$ref": "#/$defs/inputs" }));
                }
            }
            if kind.takes_inputs {
                let required = settings
                    .as_object_mut()
                    .map(|o| o.entry("required").or_insert_with(|| json!([])));
                if let Some(Json::Array(list)) = required {
                    list.push(json!("inputs"));
                }
            }
            if let Some(obj) = settings.as_object_mut() {
                obj.insert("description".into(), json!(kind.about));
            }
            json!({
                "if": { "properties": { "kind": { "const": kind.name } }, "required": ["kind"] },
                "then": settings,
            })
        })
        .collect();
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kegline.dev/schemas/pipeline.schema.json",
        "title": "kegline pipeline",
        "description": "A keg pipeline: stages that turn documents into a fine-tuning dataset. `${name}` in any string is replaced by the var `name`.",
        "type": "object",
        "additionalProperties": false,
        "required": ["version", "stages"],
        "properties": {
            "version": { "const": super::FORMAT_VERSION },
            "name": { "type": "string", "minLength": 1 },
            "vars": {
                "description": "Defaults for `${name}` references; override with `--set name=value`.",
                "type": "object",
                "additionalProperties": { "type": ["string", "number", "boolean", "null"] }
            },
            "templates": {
                "description": "Template folders, relative to the pipeline file.",
                "type": "array",
                "items": { "type": "string" }
            },
            "providers": {
                "type": "object",
                "propertyNames": { "pattern": "^[A-Za-z0-9_-]+$" },
                "additionalProperties": provider
            },
            "stages": {
                "type": "object",
                "propertyNames": { "pattern": "^[A-Za-z0-9_-]+$" },
                "additionalProperties": {
                    "type": "object",
                    "required": ["kind"],
                    "properties": { "kind": { "enum": kinds } },
                    "allOf": per_kind
                }
            }
        },
        "$defs": {
            "var": {
                "description": "A reference to a var, replaced before the value is read.",
                "type": "string",
                "pattern": "^\\$\\{[^}]+\\}$"
            },
            "inputs": {
                "description": "The stages this stage reads, in order.",
                "oneOf": [
                    { "type": "string" },
                    { "type": "array", "items": { "type": "string" }, "minItems": 1 }
                ]
            }
        }
    })
}

/// A number, boolean or fixed choice may also be written as `${var}`: the parser substitutes
/// vars before it reads values, so editors must accept the reference too.
fn allow_var_references(schema: &mut Json) {
    match schema {
        Json::Object(obj) => {
            for value in obj.values_mut() {
                allow_var_references(value);
            }
            let typed = |t: &Json| matches!(t.as_str(), Some("integer" | "number" | "boolean"));
            let needs = match obj.get("type") {
                Some(Json::Array(types)) => {
                    types.iter().any(typed) && !types.iter().any(|t| t == "string")
                }
                Some(t) => typed(t) || obj.contains_key("enum"),
                None => obj.contains_key("enum"),
            };
            if needs {
                let original = Json::Object(std::mem::take(obj));
                let description = original.get("description").cloned();
                obj.insert("anyOf".into(), json!([original, { "$ref": "#/$defs/var" }]));
                if let Some(d) = description {
                    obj.insert("description".into(), d);
                }
            }
        }
        Json::Array(items) => items.iter_mut().for_each(allow_var_references),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::node::parse_yaml;

    fn schema_file() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/pipeline.schema.json")
    }

    /// Run with `KEG_UPDATE_SCHEMA=1` to rewrite the file after changing config types.
    #[test]
    fn schema_file_matches_the_rust_types() {
        let mut generated = serde_json::to_string_pretty(&pipeline_schema()).unwrap();
        generated.push('\n');
        if std::env::var_os("KEG_UPDATE_SCHEMA").is_some() {
            std::fs::write(schema_file(), &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(schema_file()).unwrap_or_default();
        assert!(
            on_disk == generated,
            "schemas/pipeline.schema.json is out of date: run `KEG_UPDATE_SCHEMA=1 cargo test --lib schema_file`"
        );
    }

    #[test]
    fn shipped_pipelines_match_the_schema_and_typos_do_not() {
        let validator = jsonschema::validator_for(&pipeline_schema()).unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let json = parse_yaml(&text).unwrap().to_json();
            let errors: Vec<String> = validator
                .iter_errors(&json)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
            checked += 1;
        }
        assert!(checked > 0);
        let typo = parse_yaml(
            "version: 1\nstages:\n  c:\n    kind: chunk\n    inputs: [d]\n    max_char: 5\n",
        )
        .unwrap()
        .to_json();
        assert!(!validator.is_valid(&typo));
        let unknown = parse_yaml("version: 1\nstages:\n  c:\n    kind: chnk\n")
            .unwrap()
            .to_json();
        assert!(!validator.is_valid(&unknown));
    }
}
