//! Key and tool globs. Keys: `*` matches within one segment, `**` (a whole
//! segment) any number of segments; `/a/**` covers everything below `/a`, not
//! `/a` itself. Validation happens at load so a pattern that can never match a
//! key is an error, not a silent hole.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// Checks a key glob the way the store checks keys, so that every pattern can
/// match some valid key.
pub fn validate_key_glob(pattern: &str) -> Result<(), String> {
    if !pattern.starts_with('/') {
        return Err(format!(
            "key pattern {pattern:?} can never match: keys start with '/'"
        ));
    }
    if pattern == "/" {
        return Err(
            "key pattern \"/\" can never match: \"/\" is not a key (use \"/**\" for every key)"
                .into(),
        );
    }
    if let Some(c) = pattern.chars().find(|c| c.is_control()) {
        return Err(format!(
            "key pattern {:?} contains the control character U+{:04X}, which no key can hold",
            pattern.escape_debug().to_string(),
            c as u32
        ));
    }
    for segment in pattern[1..].split('/') {
        match segment {
            "" => {
                return Err(format!(
                    "key pattern {pattern:?} can never match: it has an empty segment ('//' or a trailing '/')"
                ))
            }
            "." | ".." => {
                return Err(format!(
                    "key pattern {pattern:?} can never match: keys have no {segment:?} segments"
                ))
            }
            s if s.contains("**") && s != "**" => {
                return Err(format!(
                    "key pattern {pattern:?}: '**' must be a whole segment (like /a/**/b); use '*' within a segment"
                ))
            }
            _ => {}
        }
    }
    build(pattern).map(|_| ())
}

fn build(pattern: &str) -> Result<Glob, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| format!("bad pattern {pattern:?}: {}", e.kind()))
}

/// Compiles already-validated patterns into one matcher.
pub fn compile<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<GlobSet, String> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        builder.add(build(p)?);
    }
    builder.build().map_err(|e| e.to_string())
}

/// A tool-name glob (`kv_*`): checked against the names it could match.
pub fn tool_glob(pattern: &str) -> Result<globset::GlobMatcher, String> {
    Glob::new(pattern)
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("bad tool pattern {pattern:?}: {}", e.kind()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(validate_key_glob("/projects/*/code/**").is_ok());
        assert!(validate_key_glob("/**").is_ok());
        assert!(validate_key_glob("projects/**")
            .unwrap_err()
            .contains("start with '/'"));
        assert!(validate_key_glob("/a//b")
            .unwrap_err()
            .contains("empty segment"));
        assert!(validate_key_glob("/a/")
            .unwrap_err()
            .contains("empty segment"));
        assert!(validate_key_glob("/a/../b").unwrap_err().contains("\"..\""));
        assert!(validate_key_glob("/a/**b")
            .unwrap_err()
            .contains("whole segment"));
        assert!(validate_key_glob("/a/[b")
            .unwrap_err()
            .contains("bad pattern"));
        assert!(validate_key_glob("/").is_err());
    }

    #[test]
    fn semantics() {
        let set = compile(["/a/*/c", "/x/**"]).unwrap();
        assert!(set.is_match("/a/b/c"));
        assert!(!set.is_match("/a/b/b/c"));
        assert!(set.is_match("/x/y"));
        assert!(set.is_match("/x/y/z"));
        assert!(!set.is_match("/x"));
        assert!(!set.is_match("/xy"));
    }
}
