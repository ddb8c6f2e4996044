//! Safe repairs of LLM replies that should be JSON: only changes that cannot alter what the
//! model said. Code fences and prose around the JSON are dropped, trailing commas removed, a
//! JSON document sent as a JSON string decoded, and one level of wrapping added or removed
//! around the list of items. Truncated JSON is never "completed": that would invent content.

use serde_json::Value as Json;

/// What was repaired, for the run summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Repair {
    CodeFence,
    SurroundingProse,
    TrailingComma,
    DoubleEncoded,
    Wrapping,
}

impl Repair {
    pub fn name(self) -> &'static str {
        match self {
            Repair::CodeFence => "code fence",
            Repair::SurroundingProse => "prose around JSON",
            Repair::TrailingComma => "trailing comma",
            Repair::DoubleEncoded => "double-encoded JSON",
            Repair::Wrapping => "wrapping",
        }
    }
}

/// Parse `text` as JSON, applying safe repairs when plain parsing fails. Returns the value and
/// the repairs made, or the parse error of the text as it came.
pub fn parse(text: &str) -> Result<(Json, Vec<Repair>), serde_json::Error> {
    let original = serde_json::from_str::<Json>(text.trim());
    let mut repairs = Vec::new();
    let value = match original {
        Ok(value) => value,
        Err(err) => {
            let mut candidate = text.trim();
            if let Some(inner) = strip_fence(candidate) {
                candidate = inner;
                repairs.push(Repair::CodeFence);
            }
            let mut owned = candidate.to_owned();
            let mut parsed = serde_json::from_str::<Json>(&owned);
            if parsed.is_err()
                && let Some(span) = json_span(&owned)
                && span.len() < owned.len()
            {
                owned = span.to_owned();
                repairs.push(Repair::SurroundingProse);
                parsed = serde_json::from_str(&owned);
            }
            if parsed.is_err() {
                let without = remove_trailing_commas(&owned);
                if without != owned {
                    repairs.push(Repair::TrailingComma);
                    parsed = serde_json::from_str(&without);
                }
            }
            match parsed {
                Ok(value) => value,
                Err(_) => return Err(err),
            }
        }
    };
    // A JSON document sent as one JSON string: `"{\"pairs\": …}"`.
    if let Json::String(inner) = &value {
        let trimmed = inner.trim_start();
        if (trimmed.starts_with('{') || trimmed.starts_with('['))
            && let Ok(decoded) = serde_json::from_str::<Json>(inner)
        {
            repairs.push(Repair::DoubleEncoded);
            return Ok((decoded, repairs));
        }
    }
    Ok((value, repairs))
}

/// Make the reply hold its items under `field`: wrap a bare list, or unwrap an object whose
/// only property holds an object with `field`. Returns whether anything changed.
pub fn fit_items_field(value: &mut Json, field: &str) -> bool {
    match value {
        Json::Array(_) => {
            let list = std::mem::take(value);
            *value = serde_json::json!({ field: list });
            true
        }
        Json::Object(obj) if !obj.contains_key(field) && obj.len() == 1 => {
            let inner = obj.values().next().cloned();
            match inner {
                Some(Json::Object(inner)) if inner.contains_key(field) => {
                    *value = Json::Object(inner);
                    true
                }
                Some(list @ Json::Array(_)) => {
                    *value = serde_json::json!({ field: list });
                    true
                }
                _ => false,
            }
        }
        _ => false,
    }
}

/// Recognisable refusals, checked only when a reply is not JSON.
pub fn looks_like_refusal(text: &str) -> bool {
    let start: String = text
        .trim()
        .chars()
        .take(160)
        .collect::<String>()
        .to_lowercase();
    const OPENINGS: &[&str] = &[
        "i'm sorry",
        "i am sorry",
        "sorry, i",
        "i can't",
        "i cannot",
        "i can not",
        "i won't",
        "i will not",
        "i'm unable",
        "i am unable",
        "as an ai",
    ];
    OPENINGS.iter().any(|o| start.starts_with(o))
}

fn strip_fence(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("```")?;
    let body_start = rest.find('\n')? + 1;
    let body = &rest[body_start..];
    let end = body.rfind("```")?;
    Some(body[..end].trim())
}

/// Tracks whether a scan is inside a JSON string, so brackets and commas in strings are
/// left alone.
#[derive(Default)]
struct StringState {
    in_string: bool,
    escaped: bool,
}

impl StringState {
    /// Feed one character; true when it is structural (outside any string).
    fn structural(&mut self, c: char) -> bool {
        if self.in_string {
            match c {
                _ if self.escaped => self.escaped = false,
                '\\' => self.escaped = true,
                '"' => self.in_string = false,
                _ => {}
            }
            return false;
        }
        if c == '"' {
            self.in_string = true;
            return false;
        }
        true
    }
}

/// The first balanced `{…}` or `[…]` in `text`, skipping brackets inside strings.
fn json_span(text: &str) -> Option<&str> {
    let start = text.find(['{', '['])?;
    let mut depth = 0usize;
    let mut state = StringState::default();
    for (i, c) in text[start..].char_indices() {
        if !state.structural(c) {
            continue;
        }
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(&text[start..start + i + 1]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Drop commas that directly precede `}` or `]` (ignoring whitespace), outside strings.
fn remove_trailing_commas(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut state = StringState::default();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if state.structural(c) && c == ',' {
            let next = chars[i + 1..].iter().find(|n| !n.is_whitespace());
            if matches!(next, Some('}' | ']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn repaired(text: &str) -> (Json, Vec<Repair>) {
        parse(text).expect("repairable")
    }

    #[test]
    fn valid_json_needs_no_repair() {
        assert_eq!(repaired(" {\"a\": 1}\n"), (json!({"a": 1}), vec![]));
    }

    #[test]
    fn fences_prose_and_trailing_commas_are_repaired() {
        assert_eq!(
            repaired("```json\n{\"a\": [1, 2,],}\n```"),
            (
                json!({"a": [1, 2]}),
                vec![Repair::CodeFence, Repair::TrailingComma]
            )
        );
        assert_eq!(
            repaired("Sure! Here are the pairs:\n{\"a\": \"}, not the end\"}\nHope this helps."),
            (
                json!({"a": "}, not the end"}),
                vec![Repair::SurroundingProse]
            )
        );
        assert_eq!(
            repaired("{\"a\": \"x,]\",\n}"),
            (json!({"a": "x,]"}), vec![Repair::TrailingComma])
        );
    }

    #[test]
    fn double_encoded_json_is_decoded() {
        assert_eq!(
            repaired(r#""{\"pairs\": []}""#),
            (json!({"pairs": []}), vec![Repair::DoubleEncoded])
        );
        // A plain string stays a string.
        assert_eq!(repaired(r#""hello""#), (json!("hello"), vec![]));
    }

    #[test]
    fn truncated_json_is_not_completed() {
        assert!(parse("{\"pairs\": [{\"question\": \"What is").is_err());
        assert!(parse("Here you go: {\"a\": [1, 2").is_err());
    }

    #[test]
    fn wrapping_is_fitted_to_the_items_field() {
        let mut bare = json!([{"q": 1}]);
        assert!(fit_items_field(&mut bare, "pairs"));
        assert_eq!(bare, json!({"pairs": [{"q": 1}]}));
        let mut wrapped = json!({"result": {"pairs": []}});
        assert!(fit_items_field(&mut wrapped, "pairs"));
        assert_eq!(wrapped, json!({"pairs": []}));
        let mut renamed = json!({"items": [1]});
        assert!(fit_items_field(&mut renamed, "pairs"));
        assert_eq!(renamed, json!({"pairs": [1]}));
        let mut fine = json!({"pairs": []});
        assert!(!fit_items_field(&mut fine, "pairs"));
    }

    #[test]
    fn refusals_are_recognised() {
        assert!(looks_like_refusal("I'm sorry, but I can't help with that."));
        assert!(looks_like_refusal("  As an AI language model, I cannot"));
        assert!(!looks_like_refusal("{\"pairs\": []}"));
        assert!(!looks_like_refusal("Here are the pairs"));
    }
}
