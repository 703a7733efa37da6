//! Key paths: validated once, at the edge, so that nothing downstream (the store's
//! prefix ranges, later the policy's globs) ever sees `..`, `//` or a control byte.

use std::fmt;

/// Longest key the store accepts, in bytes. LMDB (built with MDB_MAXKEYSIZE=0 by
/// lmdb-master-sys) takes keys up to about 1.9 KiB on 4 KiB pages; the store checks
/// that at open time.
pub const MAX_KEY_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key {key:?} is invalid: it must start with '/'")]
    NoLeadingSlash { key: String },
    #[error("key {key:?} is invalid: empty segment ('//')")]
    EmptySegment { key: String },
    #[error("key {key:?} is invalid: segment {segment:?} is not allowed")]
    DotSegment { key: String, segment: String },
    #[error("key {key:?} is invalid: it contains the control character U+{code:04X}")]
    ControlChar { key: String, code: u32 },
    #[error("key is invalid: {len} bytes, the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("key \"/\" is the root: it can be a prefix but not a key")]
    Root,
}

/// A validated, normalised key path such as `/projects/p1/tasks/t7`.
///
/// Normalisation is deliberately small: one trailing `/` is dropped. Everything
/// else that could make two spellings name one key (`//`, `.`, `..`) is rejected
/// rather than rewritten, so that what an agent wrote is what gets checked.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

/// A validated prefix: a key, or the root `/` that covers every key.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Prefix(String);

fn validate_path(raw: &str) -> Result<&str, KeyError> {
    if raw.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong {
            len: raw.len(),
            max: MAX_KEY_BYTES,
        });
    }
    if !raw.starts_with('/') {
        return Err(KeyError::NoLeadingSlash {
            key: raw.to_string(),
        });
    }
    if let Some(c) = raw.chars().find(|c| c.is_control()) {
        return Err(KeyError::ControlChar {
            key: raw.escape_debug().to_string(),
            code: c as u32,
        });
    }
    let trimmed = if raw.len() > 1 {
        raw.strip_suffix('/').unwrap_or(raw)
    } else {
        raw
    };
    if trimmed == "/" {
        return Ok(trimmed);
    }
    for segment in trimmed[1..].split('/') {
        if segment.is_empty() {
            return Err(KeyError::EmptySegment {
                key: raw.to_string(),
            });
        }
        if segment == "." || segment == ".." {
            return Err(KeyError::DotSegment {
                key: raw.to_string(),
                segment: segment.to_string(),
            });
        }
    }
    Ok(trimmed)
}

impl Key {
    pub fn parse(raw: &str) -> Result<Key, KeyError> {
        match validate_path(raw)? {
            "/" => Err(KeyError::Root),
            ok => Ok(Key(ok.to_string())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Prefix {
    pub fn parse(raw: &str) -> Result<Prefix, KeyError> {
        validate_path(raw).map(|p| Prefix(p.to_string()))
    }

    #[cfg(test)]
    pub fn root() -> Prefix {
        Prefix("/".to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Path-wise membership: `/a` covers `/a` and `/a/x`, never `/ab`.
    pub fn covers(&self, key: &str) -> bool {
        if self.0 == "/" {
            return true;
        }
        match key.strip_prefix(self.0.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// The byte range of LMDB keys strictly below this prefix: `[p/, p0)`, since
    /// `'0'` is the byte after `'/'`.
    pub(crate) fn children_range(&self) -> (Vec<u8>, Vec<u8>) {
        if self.0 == "/" {
            return (b"/".to_vec(), b"0".to_vec());
        }
        let mut lo = self.0.as_bytes().to_vec();
        lo.push(b'/');
        let mut hi = self.0.as_bytes().to_vec();
        hi.push(b'0');
        (lo, hi)
    }

    /// The prefix itself when it can also be a key.
    pub(crate) fn as_key(&self) -> Option<&[u8]> {
        (self.0 != "/").then_some(self.0.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalises() {
        assert_eq!(Key::parse("/a/b").unwrap().as_str(), "/a/b");
        assert_eq!(Key::parse("/a/b/").unwrap().as_str(), "/a/b");
        assert_eq!(
            Key::parse("/projects/p1/tasks/t 7").unwrap().as_str(),
            "/projects/p1/tasks/t 7"
        );
        assert_eq!(Key::parse("/ünï/…").unwrap().as_str(), "/ünï/…");
    }

    #[test]
    fn rejects_bad_keys() {
        assert!(matches!(
            Key::parse("a/b"),
            Err(KeyError::NoLeadingSlash { .. })
        ));
        assert!(matches!(
            Key::parse(""),
            Err(KeyError::NoLeadingSlash { .. })
        ));
        assert!(matches!(
            Key::parse("/a//b"),
            Err(KeyError::EmptySegment { .. })
        ));
        assert!(matches!(
            Key::parse("/a/b//"),
            Err(KeyError::EmptySegment { .. })
        ));
        assert!(matches!(
            Key::parse("/a/../b"),
            Err(KeyError::DotSegment { .. })
        ));
        assert!(matches!(
            Key::parse("/a/./b"),
            Err(KeyError::DotSegment { .. })
        ));
        assert!(matches!(
            Key::parse("/.."),
            Err(KeyError::DotSegment { .. })
        ));
        assert!(matches!(
            Key::parse("/a\0b"),
            Err(KeyError::ControlChar { code: 0, .. })
        ));
        assert!(matches!(
            Key::parse("/a\nb"),
            Err(KeyError::ControlChar { code: 10, .. })
        ));
        assert!(matches!(
            Key::parse("/a\u{7f}"),
            Err(KeyError::ControlChar { .. })
        ));
        assert!(matches!(
            Key::parse("/a\u{85}"),
            Err(KeyError::ControlChar { .. })
        ));
        assert_eq!(Key::parse("/"), Err(KeyError::Root));
        let long = format!("/{}", "x".repeat(MAX_KEY_BYTES));
        assert!(matches!(Key::parse(&long), Err(KeyError::TooLong { .. })));
        let max = format!("/{}", "x".repeat(MAX_KEY_BYTES - 1));
        assert!(Key::parse(&max).is_ok());
    }

    #[test]
    fn prefix_covers_pathwise() {
        let p = Prefix::parse("/a").unwrap();
        assert!(p.covers("/a"));
        assert!(p.covers("/a/b"));
        assert!(!p.covers("/ab"));
        assert!(!p.covers("/a!"));
        assert!(Prefix::parse("/").unwrap().covers("/anything"));
        assert_eq!(Prefix::parse("/a/").unwrap().as_str(), "/a");
    }
}
