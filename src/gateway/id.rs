//! JSON-RPC request ids as they arrive, echoed exactly.
//!
//! An id is a string or an integer, and JSON puts no bound on an integer:
//! `123456789012345678901234567890` is a valid id that `serde_json::Value`
//! would turn into a float (and then refuse, or answer with another number).
//! So an id is kept as its JSON text: an integer byte for byte, a string
//! re-serialised (so `"a\u0062"` and `"ab"`, the same id, match one pending
//! call).
//!
//! `scan` reads the id of a line that is not valid JSON (a syntax error after
//! the id, nesting too deep to parse) without parsing the rest: its error can
//! then carry the id, which is what lets a client match it to its request.

use std::fmt;

use serde::de::Error as _;
use serde_json::value::RawValue;

/// Longest integer id accepted, in digits: far beyond any u64, short enough
/// that echoing it costs nothing.
const MAX_INT_DIGITS: usize = 256;
/// Longest string id accepted, in bytes of its JSON text.
const MAX_STRING_BYTES: usize = 4096;

/// A request id: its canonical JSON text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Id(Box<str>);

impl Id {
    /// The id in `raw`, if `raw` is one (a string, or an integer of at most
    /// `MAX_INT_DIGITS` digits); `None` for null, floats, objects, arrays.
    pub fn parse(raw: &RawValue) -> Option<Id> {
        Id::from_text(raw.get())
    }

    fn from_text(text: &str) -> Option<Id> {
        let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if text.starts_with('"') {
            if text.len() > MAX_STRING_BYTES {
                return None;
            }
            let s: String = serde_json::from_str(text).ok()?;
            return serde_json::to_string(&s).ok().map(|t| Id(t.into()));
        }
        let digits = text.strip_prefix('-').unwrap_or(text);
        let integer = !digits.is_empty()
            && digits.len() <= MAX_INT_DIGITS
            && digits.bytes().all(|b| b.is_ascii_digit())
            // JSON has no leading zeros.
            && (digits == "0" || !digits.starts_with('0'));
        integer.then(|| Id(text.into()))
    }

    /// An id from a string.
    #[cfg(test)]
    pub fn string(s: &str) -> Id {
        // A String always serialises.
        Id(serde_json::to_string(s).unwrap_or_default().into())
    }

    /// The JSON text, to splice into a reply.
    pub fn json(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Id::parse(&raw).ok_or_else(|| D::Error::custom("an id is a string or an integer"))
    }
}

/// Reads the top-level `"id"` of a line that may not parse as a whole. It
/// walks only the outer object: other members' values are skipped by
/// counting brackets (never recursing), so any depth and any syntax error
/// after the id cost one pass over the line. `None` if the line is not an
/// object or its id is missing, null or not an id.
pub fn scan(line: &[u8]) -> Option<Id> {
    let mut i = skip_ws(line, 0);
    if line.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(line, i);
        if line.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(line, i)?;
        let key = &line[i..key_end];
        i = skip_ws(line, key_end);
        if line.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(line, i + 1);
        let value_end = value_end(line, i)?;
        if key == b"\"id\"" {
            let text = std::str::from_utf8(&line[i..value_end]).ok()?;
            return Id::from_text(text);
        }
        i = skip_ws(line, value_end);
        match line.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

fn skip_ws(line: &[u8], mut i: usize) -> usize {
    while line
        .get(i)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// The index just past the string that starts at `start` (a `"`).
fn string_end(line: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match line.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// The index just past the value that starts at `start`: a string, a nested
/// structure (brackets counted, strings skipped), or a scalar.
fn value_end(line: &[u8], start: usize) -> Option<usize> {
    match line.get(start)? {
        b'"' => string_end(line, start),
        b'{' | b'[' => {
            let mut depth: usize = 0;
            let mut i = start;
            loop {
                match line.get(i)? {
                    b'"' => {
                        i = string_end(line, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = start;
            while line
                .get(i)
                .is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                i += 1;
            }
            (i > start).then_some(i)
        }
    }
}

/// Deserializes a member that must be present to count: `"id": null` is
/// `Some(null)` (an invalid request), a missing id `None` (a notification).
pub fn present_raw<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn integers_of_any_size_are_kept_exactly() {
        for text in [
            "0",
            "-1",
            "7",
            "18446744073709551616",
            "-123456789012345678901234567890",
        ] {
            assert_eq!(Id::parse(&raw(text)).unwrap().json(), text);
        }
    }

    #[test]
    fn non_ids_are_refused() {
        for text in ["null", "1.5", "1e3", "{}", "[1]", "true"] {
            assert!(Id::parse(&raw(text)).is_none(), "{text}");
        }
        // Not even JSON (a RawValue cannot hold them), but `scan` hands any
        // text to the same check.
        for text in ["01", "-", "--1", "1 2"] {
            assert!(Id::from_text(text).is_none(), "{text}");
        }
        let long = "9".repeat(MAX_INT_DIGITS + 1);
        assert!(Id::parse(&raw(&long)).is_none());
        assert!(Id::parse(&raw(&"9".repeat(MAX_INT_DIGITS))).is_some());
    }

    #[test]
    fn equal_strings_are_one_id() {
        assert_eq!(Id::parse(&raw(r#""a\u0062""#)), Id::parse(&raw(r#""ab""#)));
        assert_eq!(Id::string("ab").json(), r#""ab""#);
    }

    #[test]
    fn scan_reads_the_id_past_what_cannot_parse() {
        let deep = format!(
            r#"{{"jsonrpc":"2.0","x":{}{},"id":12,"method":"tools/call","params":{{,}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(scan(deep.as_bytes()).unwrap().json(), "12");
        assert_eq!(
            scan(br#"{"method":"x","s":"a\"}","id":"q\"1"}"#).unwrap(),
            Id::string("q\"1")
        );
        assert_eq!(
            scan(br#" { "id" : 99999999999999999999999 , "#)
                .unwrap()
                .json(),
            "99999999999999999999999"
        );
        for bad in [
            &b"[1]"[..],
            b"{",
            b"{\"id\":null}",
            b"{\"a\":1}",
            b"{\"a\" 1,\"id\":3}",
            b"",
            b"{\"a\":[}]",
        ] {
            assert!(scan(bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn scan_survives_garbage() {
        // Unbalanced closers, truncated strings and escapes at the end.
        for bad in [
            &b"{\"a\":]]]]"[..],
            b"{\"a\":\"\\",
            b"{\"\\",
            b"{\"a\":[\"\\\"]",
        ] {
            assert!(scan(bad).is_none());
        }
    }
}
