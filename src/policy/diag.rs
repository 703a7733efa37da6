//! Diagnostics a person can act on: file, line, column and the offending line
//! with a caret under the span.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
    snippet: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{kind}: {}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.col,
            self.message
        )?;
        if !self.snippet.is_empty() {
            write!(f, "\n{}", self.snippet)?;
        }
        Ok(())
    }
}

/// The text of a policy file, for turning byte spans into positions.
pub struct Source {
    pub path: PathBuf,
    pub text: String,
    line_starts: Vec<usize>,
}

impl Source {
    pub fn new(path: &Path, text: String) -> Source {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Source {
            path: path.to_path_buf(),
            text,
            line_starts,
        }
    }

    /// 1-based line and column of a byte offset.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let start = self.line_starts[line];
        let col = self.text[start..offset.min(self.text.len())]
            .chars()
            .count()
            + 1;
        (line + 1, col)
    }

    pub fn line_of(&self, offset: usize) -> usize {
        self.position(offset).0
    }

    pub fn diagnostic(
        &self,
        severity: Severity,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Diagnostic {
        let (line, col) = self.position(span.start);
        let start = self.line_starts[line - 1];
        let end = self.text[start..]
            .find('\n')
            .map_or(self.text.len(), |i| start + i);
        let text = &self.text[start..end];
        let width = self.text[span.start.min(end)..span.end.min(end).max(span.start.min(end))]
            .chars()
            .count()
            .max(1);
        let gutter = line.to_string().len();
        let snippet = format!(
            "{:gutter$} |\n{line} | {text}\n{:gutter$} | {}{}",
            "",
            "",
            " ".repeat(col - 1),
            "^".repeat(width),
        );
        Diagnostic {
            severity,
            path: self.path.clone(),
            line,
            col,
            message: message.into(),
            snippet,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_snippet() {
        let s = Source::new(Path::new("p.toml"), "a = 1\nbb = \"x\"\n".into());
        assert_eq!(s.position(0), (1, 1));
        assert_eq!(s.position(6), (2, 1));
        assert_eq!(s.position(11), (2, 6));
        let d = s.diagnostic(Severity::Error, 11..14, "bad");
        let text = d.to_string();
        assert!(text.starts_with("error: p.toml:2:6: bad"), "{text}");
        assert!(text.contains("2 | bb = \"x\""), "{text}");
        assert!(text.contains("  |      ^^^"), "{text}");
    }
}
