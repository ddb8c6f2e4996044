//! Errors found in a pipeline file (or a file it names), each with its position and a hint,
//! collected so that all of them are shown at once.

use std::fmt;
use std::path::{Path, PathBuf};

use super::node::{DeError, Loc};

#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// The file the error is in, as the user named it.
    pub file: PathBuf,
    pub loc: Option<Loc>,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(file: &Path, loc: Option<Loc>, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            loc,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn from_de(file: &Path, err: DeError, context: &str) -> Self {
        let message = if context.is_empty() {
            err.message
        } else {
            format!("{context}: {}", err.message)
        };
        Diagnostic {
            file: file.to_path_buf(),
            loc: err.loc,
            message,
            hint: err.hint,
        }
    }

    /// `file:line:col` (or just `file` when the position is unknown).
    pub fn location(&self) -> String {
        match self.loc {
            Some(loc) => format!("{}:{}", self.file.display(), loc),
            None => self.file.display().to_string(),
        }
    }

    /// The error as a person reads it, with the offending line of `source` (when given) and a
    /// caret under the column.
    pub fn render(&self, source: Option<&str>) -> String {
        let mut out = format!("error: {}: {}\n", self.location(), self.message);
        if let (Some(loc), Some(source)) = (self.loc, source)
            && let Some(line) = source.lines().nth(loc.line.saturating_sub(1) as usize)
        {
            let number = loc.line.to_string();
            let pad = " ".repeat(number.len());
            let caret_at = line
                .chars()
                .take(loc.col.saturating_sub(1) as usize)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect::<String>();
            out.push_str(&format!(
                "{pad} |\n{number} | {line}\n{pad} | {caret_at}^\n"
            ));
        }
        if let Some(hint) = &self.hint {
            out.push_str(&format!("  hint: {hint}\n"));
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location(), self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// Every error found in a pipeline, plus the source text to quote lines from.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    pub errors: Vec<Diagnostic>,
    pub source: Option<(PathBuf, String)>,
}

impl Diagnostics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for error in &self.errors {
            let source = self
                .source
                .as_ref()
                .filter(|(path, _)| *path == error.file)
                .map(|(_, text)| text.as_str());
            out.push_str(&error.render(source));
        }
        let n = self.errors.len();
        out.push_str(&format!(
            "{n} error{} in the pipeline; nothing was run\n",
            if n == 1 { "" } else { "s" }
        ));
        out
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for Diagnostics {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_location_snippet_and_hint() {
        let d = Diagnostic::new(
            Path::new("p.yaml"),
            Some(Loc { line: 2, col: 11 }),
            "unknown stage kind `chnk`",
        )
        .hint("did you mean `chunk`?");
        let source = "stages:\n    kind: chnk\n";
        assert_eq!(
            d.render(Some(source)),
            "error: p.yaml:2:11: unknown stage kind `chnk`\n  |\n2 |     kind: chnk\n  |           ^\n  hint: did you mean `chunk`?\n"
        );
    }
}
