//! The audit log: one record per event, hash-chained, kept in the store's
//! LMDB named database `audit` (key: big-endian u64 `seq`; value: the record as
//! canonical JSON). See SECURITY.md for the format an auditor verifies.
//!
//! Records are drafted where the event happens and sealed (seq, prev, hash)
//! by the store's writer, the chain's only owner: a mutation's record is sealed
//! into the same write transaction as the mutation; any other record goes to
//! the journal first (a plain file the kernel holds once `write()` returns, so
//! it survives a kill -9) and is sealed into LMDB with the next commit, at the
//! latest after `[audit] sync_interval`.
//!
//! A record is serialised once, as its draft (see [`Draft`]): the journal
//! writes those bytes, and sealing splices `prev`, `seq` and `hash` into them
//! instead of serialising the record again.

pub mod journal;
pub mod query;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

pub use journal::Journal;

/// Bounds on what a record copies from a request (an agent chooses it), so
/// that a record stays a few KiB whatever the agent sends; what is cut is
/// named in `detail.truncated` with its full size and SHA-256.
pub const MAX_TOOL_BYTES: usize = 128;
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// All the keys of one record together.
pub const MAX_KEYS_BYTES: usize = 4096;

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot write the audit journal {path}: {source}")]
    Journal {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("audit record {seq} is not valid JSON: {source}")]
    Decode { seq: u64, source: serde_json::Error },
    #[error("cannot encode an audit record: {source}")]
    Encode { source: serde_json::Error },
}

/// One audited event. Absent fields are omitted from the canonical form.
///
/// The fields are declared in alphabetical order, and serde_json's maps are
/// sorted (no `preserve_order`), so serialising a record directly yields its
/// canonical form; `direct_serialisation_is_canonical` checks it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// SHA-256 of the canonical JSON of the call's arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_sha256: Option<String>,
    /// `allow`, `deny`, or `invalid` (arguments that did not parse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Event-specific details (refusal reason, policy path, checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
    /// `call`, `connection_refused`, `policy_loaded`, `policy_rejected`,
    /// `gateway_start`, `gateway_stop` or `checkpoint`.
    pub event: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
    /// Keys the call touched, or the prefix it listed or watched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// `{"status": "ok"}` or `{"status": "error", "code": …, "message": …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_sha256: Option<String>,
    #[serde(default)]
    pub prev: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The deciding rule: `{file, line, text}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
    #[serde(default)]
    pub seq: u64,
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Size and digest of the values written (kv_put, kv_txn puts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_sha256: Option<String>,
    /// The values themselves, only with `[audit] record_values = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Value>,
}

/// `{"status": "ok"}` or `{"status": "error", "code": …, "message": …}`;
/// fields in alphabetical order, so direct serialisation is canonical.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub status: String,
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        self.status == "ok"
    }
}

/// The rule that decided: where it is written and what it says.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleRef {
    pub file: String,
    pub line: usize,
    pub text: String,
}

impl Record {
    pub fn new(event: &str) -> Record {
        Record {
            time: now(),
            event: event.to_string(),
            ..Record::default()
        }
    }

    pub fn ok(&mut self) {
        self.outcome = Some(Outcome {
            code: None,
            message: None,
            status: "ok".into(),
        });
    }

    /// An error outcome; a message longer than `MAX_MESSAGE_BYTES` (error
    /// texts quote what the agent sent) is cut, and the cut noted.
    pub fn error(&mut self, code: &str, message: &str) {
        let kept = clip(message, MAX_MESSAGE_BYTES).into_owned();
        if kept.len() != message.len() {
            self.note_truncated("message", message.len(), sha256_hex(message.as_bytes()));
        }
        self.outcome = Some(Outcome {
            code: Some(clip(code, MAX_TOOL_BYTES).into_owned()),
            message: Some(kept),
            status: "error".into(),
        });
    }

    /// The tool (or method) a call named, cut to `MAX_TOOL_BYTES`.
    pub fn set_tool(&mut self, name: &str) {
        let kept = clip(name, MAX_TOOL_BYTES);
        if kept.len() != name.len() {
            let digest = sha256_hex(name.as_bytes());
            self.tool = Some(kept.into_owned());
            self.note_truncated("tool", name.len(), digest);
        } else {
            self.tool = Some(name.to_string());
        }
    }

    /// The keys a call touched, as many as fit in `MAX_KEYS_BYTES`; the rest
    /// are counted, and the digest covers the whole list (as a JSON array).
    pub fn set_keys(&mut self, keys: Vec<String>) {
        let mut total = 0;
        let fits = keys
            .iter()
            .take_while(|k| {
                total += k.len();
                total <= MAX_KEYS_BYTES
            })
            .count();
        if fits == keys.len() {
            self.keys = keys;
            return;
        }
        let all = canonical(&json!(keys));
        let bytes: usize = keys.iter().map(String::len).sum();
        self.note_truncated("keys", bytes, sha256_hex(&all));
        if let Some(Value::Object(t)) = self
            .detail
            .as_mut()
            .and_then(|d| d.get_mut("truncated"))
            .and_then(|t| t.get_mut("keys"))
        {
            t.insert("count".into(), json!(keys.len()));
        }
        self.keys = keys.into_iter().take(fits).collect();
    }

    fn note_truncated(&mut self, field: &str, bytes: usize, sha256: String) {
        let detail = self.detail.get_or_insert_with(|| json!({}));
        if !detail.is_object() {
            *detail = json!({ "detail": detail.take() });
        }
        if let Some(d) = detail.as_object_mut() {
            let t = d.entry("truncated").or_insert_with(|| json!({}));
            t[field] = json!({"bytes": bytes, "sha256": sha256});
        }
    }

    /// The canonical JSON of the record as stored (with its hash).
    pub fn canonical(&self) -> Vec<u8> {
        canonical(&serde_json::to_value(self).unwrap_or(Value::Null))
    }

    /// SHA-256 over `prev` followed by the canonical record without `hash`.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash.clear();
        let mut h = Sha256::new();
        h.update(self.prev.as_bytes());
        h.update(unhashed.canonical());
        hex(&h.finalize())
    }

    /// Appends the record's draft form to `out` and returns where sealing
    /// splices the chain's fields in (offsets from where the record starts).
    ///
    /// The draft is the canonical JSON of the record with `prev` empty, `seq`
    /// 0 and no `hash`, whatever those fields hold: exactly what direct
    /// serialisation gives for an unsealed record, which is also the journal's
    /// line format. Written field by field (the same serde_json serialiser for
    /// each value) so that the offsets are known without searching the bytes:
    /// a value such as `detail` or `values` may itself hold a key `"prev"`.
    fn write_draft(&self, out: &mut Vec<u8>) -> Result<Splice, AuditError> {
        // No `..`: a field added to Record fails to compile here until it is
        // written below, in its sorted place.
        let Record {
            agent,
            args_sha256,
            decision,
            detail,
            event,
            hash: _,
            keys,
            latency_us,
            outcome,
            pid,
            policy_sha256,
            prev: _,
            role,
            rule,
            seq: _,
            time,
            tool,
            uid,
            value_bytes,
            value_sha256,
            values,
        } = self;
        let base = out.len();
        out.push(b'{');
        let mut w = Fields { out, first: true };
        w.opt("agent", agent)?;
        w.opt("args_sha256", args_sha256)?;
        w.opt("decision", decision)?;
        w.opt("detail", detail)?;
        w.value("event", event)?;
        // `hash` sorts right after `event`, and no field name starts with f or g.
        let event_end = w.out.len() - base;
        if !keys.is_empty() {
            w.value("keys", keys)?;
        }
        w.opt("latency_us", latency_us)?;
        w.opt("outcome", outcome)?;
        w.opt("pid", pid)?;
        w.opt("policy_sha256", policy_sha256)?;
        w.key("prev");
        w.out.push(b'"');
        let prev_at = w.out.len() - base;
        w.out.push(b'"');
        w.opt("role", role)?;
        w.opt("rule", rule)?;
        w.key("seq");
        let seq_at = w.out.len() - base;
        w.out.push(b'0');
        w.value("time", time)?;
        w.opt("tool", tool)?;
        w.opt("uid", uid)?;
        w.opt("value_bytes", value_bytes)?;
        w.opt("value_sha256", value_sha256)?;
        w.opt("values", values)?;
        out.push(b'}');
        Ok(Splice {
            event_end,
            prev_at,
            seq_at,
        })
    }
}

/// Writes `"name":value` members of one object, commas between them.
struct Fields<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl Fields<'_> {
    /// Field names are ASCII identifiers: nothing in them needs escaping.
    fn key(&mut self, name: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn value<T: Serialize + ?Sized>(&mut self, name: &str, v: &T) -> Result<(), AuditError> {
        self.key(name);
        serde_json::to_writer(&mut *self.out, v).map_err(|source| AuditError::Encode { source })
    }

    fn opt<T: Serialize>(&mut self, name: &str, v: &Option<T>) -> Result<(), AuditError> {
        match v {
            Some(v) => self.value(name, v),
            None => Ok(()),
        }
    }
}

/// Where sealing puts the chain's fields into a draft: offsets from the
/// draft's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Splice {
    /// Just after the `event` value: `,"hash":"…"` goes here.
    event_end: usize,
    /// Between the quotes of `"prev":""`.
    prev_at: usize,
    /// The `0` of `"seq":0`.
    seq_at: usize,
}

/// One record serialised as its draft (see `Record::write_draft`), followed by
/// a newline: the journal's line, written with one `write()`.
#[derive(Debug)]
pub struct Draft {
    line: Vec<u8>,
    splice: Splice,
}

impl Draft {
    pub fn new(record: &Record) -> Result<Draft, AuditError> {
        // Records of calls are a few hundred bytes: one allocation, no growth.
        let mut line = Vec::with_capacity(512);
        let splice = record.write_draft(&mut line)?;
        line.push(b'\n');
        Ok(Draft { line, splice })
    }

    /// The journal line: the draft and a newline.
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    fn json(&self) -> &[u8] {
        &self.line[..self.line.len() - 1]
    }
}

/// Drafts waiting to be sealed, in order, in one buffer (no allocation per
/// record once it has grown).
#[derive(Debug, Default)]
pub struct Drafts {
    bytes: Vec<u8>,
    /// Each draft's end in `bytes` (it starts where the previous one ends),
    /// and its splice points.
    spans: Vec<(usize, Splice)>,
}

/// A draft in a `Drafts`, ready for `Chain::seal`.
#[derive(Debug, Clone, Copy)]
pub struct DraftRef<'a> {
    json: &'a [u8],
    splice: Splice,
}

impl DraftRef<'_> {
    /// The draft's canonical JSON (no newline).
    pub fn json(&self) -> &[u8] {
        self.json
    }
}

impl Drafts {
    pub fn push(&mut self, draft: &Draft) {
        self.bytes.extend_from_slice(draft.json());
        self.spans.push((self.bytes.len(), draft.splice));
    }

    pub fn push_record(&mut self, record: &Record) -> Result<(), AuditError> {
        let splice = record.write_draft(&mut self.bytes)?;
        self.spans.push((self.bytes.len(), splice));
        Ok(())
    }

    /// Appends `later` after these drafts.
    pub fn extend(&mut self, later: &Drafts) {
        let shift = self.bytes.len();
        self.bytes.extend_from_slice(&later.bytes);
        self.spans
            .extend(later.spans.iter().map(|(end, s)| (end + shift, *s)));
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Bytes of drafted JSON held.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// How many of the first drafts fit in `max_bytes` (at least one).
    pub fn count_within(&self, max_bytes: usize) -> usize {
        let within = self.spans.partition_point(|(end, _)| *end <= max_bytes);
        within.max(1).min(self.spans.len())
    }

    /// Removes the first `n` drafts and returns them; these keep the rest.
    pub fn split_front(&mut self, n: usize) -> Drafts {
        if n == 0 {
            return Drafts::default();
        }
        if n >= self.spans.len() {
            return std::mem::take(self);
        }
        let cut = self.spans[n - 1].0;
        let rest_bytes = self.bytes.split_off(cut);
        let front_bytes = std::mem::replace(&mut self.bytes, rest_bytes);
        let rest_spans = self.spans.split_off(n);
        let front_spans = std::mem::replace(&mut self.spans, rest_spans);
        for (end, _) in &mut self.spans {
            *end -= cut;
        }
        Drafts {
            bytes: front_bytes,
            spans: front_spans,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = DraftRef<'_>> + '_ {
        let mut start = 0;
        self.spans.iter().map(move |(end, splice)| {
            let json = &self.bytes[start..*end];
            start = *end;
            DraftRef {
                json,
                splice: *splice,
            }
        })
    }
}

/// The chain's head, owned by the store's writer.
#[derive(Debug, Clone)]
pub struct Chain {
    pub seq: u64,
    pub prev: String,
}

impl Chain {
    pub fn genesis() -> Chain {
        Chain {
            seq: 0,
            prev: GENESIS.to_string(),
        }
    }

    /// Gives a draft its place in the chain: writes its stored form (canonical
    /// JSON with seq, prev and hash) into `out` (cleared first) and returns its
    /// seq.
    ///
    /// The stored form is the draft with `prev` and `seq` filled in and
    /// `,"hash":"…"` inserted after `event` (its sorted place); the hash is
    /// SHA-256 over `prev` and the stored form without that insertion, i.e.
    /// the canonical record without `hash`, as SECURITY.md defines it. One
    /// pass, no serialisation: `seal_matches_the_serialising_seal` checks the
    /// bytes against serialising the record with and without its hash.
    pub fn seal(&mut self, draft: DraftRef<'_>, out: &mut Vec<u8>) -> u64 {
        const HASH_KEY: &[u8] = b",\"hash\":\"";
        let DraftRef { json, splice } = draft;
        self.seq += 1;
        out.clear();
        out.reserve(json.len() + HASH_KEY.len() + 64 + 1 + self.prev.len() + 20);
        out.extend_from_slice(&json[..splice.event_end]);
        let hash_at = out.len() + HASH_KEY.len();
        out.extend_from_slice(HASH_KEY);
        out.extend_from_slice(&[b'0'; 64]);
        out.push(b'"');
        let after_hash = out.len();
        out.extend_from_slice(&json[splice.event_end..splice.prev_at]);
        push_str_contents(out, &self.prev);
        out.extend_from_slice(&json[splice.prev_at..splice.seq_at]);
        push_decimal(out, self.seq);
        // Past the draft's `0`.
        out.extend_from_slice(&json[splice.seq_at + 1..]);

        let mut h = Sha256::new();
        h.update(self.prev.as_bytes());
        h.update(&out[..splice.event_end]);
        h.update(&out[after_hash..]);
        let digits = hex_digits(&h.finalize());
        out[hash_at..hash_at + 64].copy_from_slice(&digits);
        self.prev.clear();
        self.prev.extend(digits.iter().map(|d| char::from(*d)));
        self.seq
    }

    /// Seals a record that has no draft yet (a mutation's, a checkpoint).
    pub fn seal_record(&mut self, record: &Record, out: &mut Vec<u8>) -> Result<u64, AuditError> {
        let draft = Draft::new(record)?;
        Ok(self.seal(
            DraftRef {
                json: draft.json(),
                splice: draft.splice,
            },
            out,
        ))
    }
}

/// A JSON string's contents (without its quotes), escaped as serde_json
/// escapes them. `prev` is a hash this code wrote (hex digits, copied as they
/// are) unless the store's last record was edited by hand; then it is stored
/// as the serialising seal stored it, and verify names that record.
fn push_str_contents(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    let quoted = serde_json::Value::from(s).to_string();
    out.extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Current time as RFC 3339 UTC with microseconds.
pub fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub fn hex(bytes: &[u8]) -> String {
    // A table, not `write!("{b:02x}")`: the formatting machinery per byte cost
    // more than the SHA-256 it printed.
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

/// A SHA-256 digest as 64 lowercase hex digits.
fn hex_digits(digest: &[u8]) -> [u8; 64] {
    let mut out = [b'0'; 64];
    for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// At most `max` bytes of `s`, cut at a character boundary and marked with
/// `…` when cut.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &s[..end]))
}

/// Canonical JSON: object keys sorted by their UTF-8 bytes, no insignificant
/// whitespace, strings and numbers as serde_json writes them (which matches
/// Python's `json.dumps(v, sort_keys=True, separators=(",", ":"),
/// ensure_ascii=False)` for the values cordon stores).
pub fn canonical(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical(v, &mut out);
    out
}

fn write_object(map: &Map<String, Value>, out: &mut Vec<u8>) {
    out.push(b'{');
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Serialising a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, k);
        out.push(b':');
        write_canonical(&map[*k], out);
    }
    out.push(b'}');
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => write_object(map, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

/// Digest of a call's arguments.
pub fn args_digest(args: &Map<String, Value>) -> String {
    let mut out = Vec::with_capacity(128);
    write_object(args, &mut out);
    sha256_hex(&out)
}

/// Why the chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub seq: u64,
    pub reason: String,
}

/// Checks records given in key order: (key seq, stored bytes). Returns how
/// many verified, or the first bad seq and why.
pub fn verify<I>(records: I) -> Result<u64, Broken>
where
    I: IntoIterator<Item = (u64, Vec<u8>)>,
{
    let mut v = Verifier::default();
    for (key, raw) in records {
        v.push(key, &raw)?;
    }
    v.finish()
}

/// The chain check, one record at a time (so a long log need not fit in
/// memory).
#[derive(Default)]
pub struct Verifier {
    prev: Option<(u64, String)>,
    first_prev: Option<(u64, String)>,
    checkpoints: Vec<(u64, String)>,
    count: u64,
}

impl Verifier {
    pub fn push(&mut self, key: u64, raw: &[u8]) -> Result<(), Broken> {
        let bad = |reason: String| Broken { seq: key, reason };
        let rec: Record =
            serde_json::from_slice(raw).map_err(|e| bad(format!("not a valid record: {e}")))?;
        if rec.seq != key {
            return Err(bad(format!(
                "stored under seq {key} but says seq {}",
                rec.seq
            )));
        }
        if rec.canonical() != raw {
            return Err(bad("not in canonical form (edited by hand?)".into()));
        }
        let expected = rec.compute_hash();
        if rec.hash != expected {
            return Err(bad(format!(
                "hash mismatch: the record was altered (stored {}, computed {expected})",
                rec.hash
            )));
        }
        match &self.prev {
            Some((pseq, phash)) => {
                if rec.seq != pseq + 1 {
                    // The first bad seq is the first one missing.
                    return Err(Broken {
                        seq: pseq + 1,
                        reason: format!(
                            "missing: records {}..{} are gone (seq {pseq} is followed by seq {})",
                            pseq + 1,
                            rec.seq - 1,
                            rec.seq
                        ),
                    });
                }
                if rec.prev != *phash {
                    return Err(bad(format!(
                        "prev does not match the hash of seq {pseq} (record removed, reordered or replaced)"
                    )));
                }
            }
            None => self.first_prev = Some((rec.seq, rec.prev.clone())),
        }
        if rec.event == "checkpoint" {
            if let Some(d) = &rec.detail {
                if let (Some(s), Some(h)) = (
                    d.get("pruned_through_seq").and_then(Value::as_u64),
                    d.get("pruned_through_hash").and_then(Value::as_str),
                ) {
                    self.checkpoints.push((s, h.to_string()));
                }
            }
        }
        self.count += 1;
        self.prev = Some((rec.seq, rec.hash));
        Ok(())
    }

    /// The first record either starts the chain or follows records that a
    /// checkpoint says were pruned.
    pub fn finish(self) -> Result<u64, Broken> {
        if let Some((seq, p)) = self.first_prev {
            let vouched = (seq == 1 && p == GENESIS)
                || self
                    .checkpoints
                    .iter()
                    .any(|(s, h)| *s + 1 == seq && *h == p);
            if !vouched {
                if seq == 1 {
                    return Err(Broken {
                        seq,
                        reason: "the first record does not start from the genesis hash".into(),
                    });
                }
                // Missing from the start, or from just after what a checkpoint
                // vouches was pruned.
                let from = self
                    .checkpoints
                    .iter()
                    .map(|(s, _)| s + 1)
                    .filter(|s| *s < seq)
                    .max()
                    .unwrap_or(1);
                return Err(Broken {
                    seq: from,
                    reason: format!(
                        "missing: records {from}..{} are gone and no checkpoint vouches for their pruning",
                        seq - 1
                    ),
                });
            }
        }
        Ok(self.count)
    }

    /// The hash of the last record checked: the chain's head.
    pub fn head(&self) -> Option<&str> {
        self.prev.as_ref().map(|(_, h)| h.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seal(c: &mut Chain, r: &Record) -> (u64, Vec<u8>) {
        let mut out = Vec::new();
        let seq = c.seal_record(r, &mut out).unwrap();
        (seq, out)
    }

    #[test]
    fn fields_copied_from_a_request_are_bounded_and_the_cut_is_named() {
        let mut r = Record::new("call");
        let tool = "t".repeat(500_000);
        r.set_tool(&tool);
        r.error("-32602", &format!("unknown tool {tool}"));
        let keys: Vec<String> = (0..128)
            .map(|i| format!("/{i}/{}", "k".repeat(1000)))
            .collect();
        r.set_keys(keys.clone());
        let len = r.canonical().len();
        assert!(
            len < MAX_TOOL_BYTES + MAX_MESSAGE_BYTES + MAX_KEYS_BYTES + 1024,
            "{len}"
        );
        let t = &r.detail.as_ref().unwrap()["truncated"];
        assert_eq!(t["tool"]["bytes"], 500_000);
        assert_eq!(t["tool"]["sha256"], sha256_hex(tool.as_bytes()));
        assert_eq!(t["keys"]["count"], 128);
        assert_eq!(t["keys"]["sha256"], sha256_hex(&canonical(&json!(keys))));
        assert!(t["message"]["bytes"].as_u64().unwrap() > 500_000);
        assert!(r.tool.as_ref().unwrap().ends_with('…'));
        assert!(r.keys.len() < 5);
        // Control: what fits is kept whole and nothing is noted.
        let mut c = Record::new("call");
        c.set_tool("kv_get");
        c.set_keys(vec!["/a".into(), "/b".into()]);
        c.error("denied", "key /a is outside the role's write scopes");
        assert_eq!(c.tool.as_deref(), Some("kv_get"));
        assert_eq!(c.keys, ["/a", "/b"]);
        assert!(c.detail.is_none());
        // A cut never splits a character.
        assert_eq!(clip("ééé", 5), "é…");
    }

    fn chain(n: usize) -> Vec<(u64, Vec<u8>)> {
        let mut c = Chain::genesis();
        (0..n)
            .map(|i| {
                let mut r = Record::new("call");
                r.tool = Some("kv_get".into());
                r.keys = vec![format!("/k{i}")];
                seal(&mut c, &r)
            })
            .collect()
    }

    /// The seal as it was before drafts: serialise the record without its
    /// hash, hash `prev` + that, serialise again with the hash. Kept as the
    /// reference the splicing seal must reproduce byte for byte.
    fn serialising_seal(c: &mut Chain, record: &mut Record) -> (u64, Vec<u8>) {
        c.seq += 1;
        record.seq = c.seq;
        record.prev = std::mem::take(&mut c.prev);
        record.hash.clear();
        let body = serde_json::to_vec(&*record).unwrap();
        let mut h = Sha256::new();
        h.update(record.prev.as_bytes());
        h.update(&body);
        record.hash = hex(&h.finalize());
        c.prev = record.hash.clone();
        (c.seq, serde_json::to_vec(&*record).unwrap())
    }

    fn full_record() -> Record {
        let mut r = Record::new("call");
        r.agent = Some("a\n\u{7f}é\"prev\":\"\"".into());
        r.args_sha256 = Some(sha256_hex(b"{}"));
        r.decision = Some("allow".into());
        r.keys = vec!["/k".into(), "/\"seq\":0".into()];
        r.rule = Some(RuleRef {
            file: "f".into(),
            line: 3,
            text: "t\"".into(),
        });
        r.error("c", "m\u{1}");
        r.detail =
            Some(serde_json::json!({"z": [ {"b": 1, "a": null} ], "a": 1.5, "prev": "", "seq": 0}));
        r.values = Some(serde_json::json!([{"y": 1, "x": 2, "hash": "h"}]));
        r.uid = Some(0);
        r.pid = Some(-7);
        r.latency_us = Some(12);
        r.policy_sha256 = Some(GENESIS.into());
        r.role = Some("r".into());
        r.tool = Some("kv_put".into());
        r.value_bytes = Some(u64::MAX);
        r.value_sha256 = Some("v".into());
        r
    }

    #[test]
    fn direct_serialisation_is_canonical() {
        let mut r = full_record();
        let mut c = Chain::genesis();
        let (_, stored) = serialising_seal(&mut c, &mut r);
        assert_eq!(stored, canonical(&serde_json::to_value(&r).unwrap()));
        assert_eq!(r.hash, r.compute_hash());
    }

    #[test]
    fn the_draft_is_the_unsealed_records_serialisation_and_the_journal_line() {
        let r = full_record();
        let d = Draft::new(&r).unwrap();
        assert_eq!(d.json(), serde_json::to_vec(&r).unwrap());
        assert_eq!(d.line().last(), Some(&b'\n'));
        // Whatever a record's chain fields hold, its draft has them unset.
        let mut sealed = r.clone();
        sealed.seq = 9;
        sealed.prev = GENESIS.into();
        sealed.hash = "x".into();
        assert_eq!(Draft::new(&sealed).unwrap().json(), d.json());
        // A minimal record: `hash` goes right after `event`, the first field.
        let mut bare = Record::new("gateway_start");
        bare.time = "t".into();
        assert_eq!(
            Draft::new(&bare).unwrap().json(),
            br#"{"event":"gateway_start","prev":"","seq":0,"time":"t"}"#
        );
    }

    #[test]
    fn seal_matches_the_serialising_seal() {
        let mut records = vec![full_record(), Record::new("gateway_start")];
        let mut r = Record::new("call");
        r.keys = vec!["/k".into()];
        r.ok();
        records.push(r);
        let (mut new, mut old) = (Chain::genesis(), Chain::genesis());
        // Across a multi-digit seq too.
        new.seq = 99_998;
        old.seq = 99_998;
        let mut drafts = Drafts::default();
        for r in &records {
            drafts.push_record(r).unwrap();
        }
        let mut out = Vec::new();
        for (draft, r) in drafts.iter().zip(&records) {
            let seq = new.seal(draft, &mut out);
            let (old_seq, old_out) = serialising_seal(&mut old, &mut r.clone());
            assert_eq!(seq, old_seq);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&old_out)
            );
            assert_eq!(new.prev, old.prev);
            // And the verifier's own reconstruction agrees.
            let back: Record = serde_json::from_slice(&out).unwrap();
            assert_eq!(back.canonical(), out);
            assert_eq!(back.hash, back.compute_hash());
        }
    }

    fn any_string() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z/_]{0,12}",
            any::<String>(),
            Just("\"prev\":\"\",\"seq\":0".to_string()),
        ]
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
                .map(Value::Number)),
            any_string().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(any_string(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    prop_compose! {
        fn any_record()(
            strings in proptest::collection::vec(proptest::option::of(any_string()), 9),
            event in any_string(),
            time in any_string(),
            keys in proptest::collection::vec(any_string(), 0..3),
            numbers in (proptest::option::of(any::<u64>()), proptest::option::of(any::<i32>()),
                proptest::option::of(any::<u32>()), proptest::option::of(any::<u64>())),
            detail in proptest::option::of(any_json()),
            values in proptest::option::of(any_json()),
            outcome in proptest::option::of((proptest::option::of(any_string()), proptest::option::of(any_string()), any_string())),
            rule in proptest::option::of((any_string(), any::<usize>(), any_string())),
        ) -> Record {
            let s = |i: usize| strings[i].clone();
            Record {
                agent: s(0),
                args_sha256: s(1),
                decision: s(2),
                detail,
                event,
                hash: String::new(),
                keys,
                latency_us: numbers.0,
                outcome: outcome.map(|(code, message, status)| Outcome { code, message, status }),
                pid: numbers.1,
                policy_sha256: s(3),
                prev: String::new(),
                role: s(4),
                rule: rule.map(|(file, line, text)| RuleRef { file, line, text }),
                seq: 0,
                time,
                tool: s(5),
                uid: numbers.2,
                value_bytes: numbers.3,
                value_sha256: s(6),
                values,
            }
        }
    }

    proptest! {
        #[test]
        fn any_record_seals_as_the_serialising_seal_did(
            records in proptest::collection::vec(any_record(), 1..4),
            start in prop_oneof![Just(0u64), any::<u32>().prop_map(u64::from)],
            head in prop_oneof![Just(GENESIS.to_string()), any_string()],
        ) {
            let (mut new, mut old) = (Chain::genesis(), Chain::genesis());
            new.seq = start;
            old.seq = start;
            // The head read back from the store's last record: a hash, or
            // anything if that record was edited by hand.
            new.prev = head.clone();
            old.prev = head;
            let mut drafts = Drafts::default();
            for r in &records {
                drafts.push_record(r).unwrap();
                let draft = Draft::new(r).unwrap();
                prop_assert_eq!(draft.json(), &serde_json::to_vec(r).unwrap()[..]);
            }
            let mut out = Vec::new();
            for (draft, r) in drafts.iter().zip(&records) {
                let seq = new.seal(draft, &mut out);
                let (old_seq, old_out) = serialising_seal(&mut old, &mut r.clone());
                prop_assert_eq!(seq, old_seq);
                prop_assert_eq!(&out, &old_out);
                prop_assert_eq!(&new.prev, &old.prev);
            }
        }
    }

    #[test]
    fn canonical_sorts_keys_recursively() {
        let v = serde_json::json!({"b": 1, "a": {"d": [1, {"z": 0, "y": "é\n"}], "c": null}});
        assert_eq!(
            String::from_utf8(canonical(&v)).unwrap(),
            r#"{"a":{"c":null,"d":[1,{"y":"é\n","z":0}]},"b":1}"#
        );
    }

    #[test]
    fn a_sealed_chain_verifies_and_tampering_is_caught() {
        let recs = chain(5);
        assert_eq!(verify(recs.clone()), Ok(5));

        let mut edited = recs.clone();
        let mut r: Record = serde_json::from_slice(&edited[2].1).unwrap();
        r.keys = vec!["/other".into()];
        edited[2].1 = r.canonical();
        assert_eq!(verify(edited).unwrap_err().seq, 3);

        let mut deleted = recs.clone();
        deleted.remove(3);
        let e = verify(deleted).unwrap_err();
        assert_eq!(e.seq, 4);
        assert!(e.reason.contains("missing"), "{}", e.reason);

        let mut reordered = recs.clone();
        let (a, b) = (reordered[1].1.clone(), reordered[2].1.clone());
        reordered[1].1 = b;
        reordered[2].1 = a;
        assert_eq!(verify(reordered).unwrap_err().seq, 2);

        let mut first_gone = recs.clone();
        first_gone.remove(0);
        assert_eq!(verify(first_gone).unwrap_err().seq, 1);
    }

    #[test]
    fn a_checkpoint_vouches_for_pruned_records() {
        let mut c = Chain::genesis();
        let mut all = Vec::new();
        for i in 0..4 {
            let mut r = Record::new("call");
            r.keys = vec![format!("/k{i}")];
            all.push(seal(&mut c, &r));
        }
        let second: Record = serde_json::from_slice(&all[1].1).unwrap();
        let mut cp = Record::new("checkpoint");
        cp.detail =
            Some(serde_json::json!({"pruned_through_seq": 2, "pruned_through_hash": second.hash}));
        all.push(seal(&mut c, &cp));
        let kept: Vec<(u64, Vec<u8>)> = all[2..].to_vec();
        assert_eq!(verify(kept), Ok(3));
    }
}
