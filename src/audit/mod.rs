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

pub mod journal;
pub mod query;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use journal::Journal;

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

    pub fn error(&mut self, code: &str, message: &str) {
        self.outcome = Some(Outcome {
            code: Some(code.to_string()),
            message: Some(message.to_string()),
            status: "error".into(),
        });
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

    /// Gives a drafted record its place in the chain (in place); returns its
    /// seq and its stored form (canonical JSON with the hash).
    pub fn seal(&mut self, record: &mut Record) -> (u64, Vec<u8>) {
        self.seq += 1;
        record.seq = self.seq;
        record.prev = std::mem::take(&mut self.prev);
        record.hash.clear();
        // Direct serialisation is canonical (see Record), and the hash field
        // is omitted while empty.
        let body = serde_json::to_vec(&*record).unwrap_or_default();
        let mut h = Sha256::new();
        h.update(record.prev.as_bytes());
        h.update(&body);
        record.hash = hex(&h.finalize());
        self.prev = record.hash.clone();
        (self.seq, serde_json::to_vec(&*record).unwrap_or_default())
    }

    /// Undoes `seal` on a record whose commit failed, so it can be sealed again.
    pub fn unseal(record: &mut Record) {
        record.seq = 0;
        record.prev.clear();
        record.hash.clear();
    }
}

/// Current time as RFC 3339 UTC with microseconds.
pub fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
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

    fn chain(n: usize) -> Vec<(u64, Vec<u8>)> {
        let mut c = Chain::genesis();
        (0..n)
            .map(|i| {
                let mut r = Record::new("call");
                r.tool = Some("kv_get".into());
                r.keys = vec![format!("/k{i}")];
                c.seal(&mut r)
            })
            .collect()
    }

    #[test]
    fn direct_serialisation_is_canonical() {
        let mut r = Record::new("call");
        r.agent = Some("a\n\u{7f}é".into());
        r.keys = vec!["/k".into()];
        r.rule = Some(RuleRef {
            file: "f".into(),
            line: 3,
            text: "t\"".into(),
        });
        r.error("c", "m\u{1}");
        r.detail = Some(serde_json::json!({"z": [ {"b": 1, "a": null} ], "a": 1.5}));
        r.values = Some(serde_json::json!([{"y": 1, "x": 2}]));
        r.uid = Some(0);
        r.pid = Some(7);
        r.latency_us = Some(12);
        let mut c = Chain::genesis();
        let (_, stored) = c.seal(&mut r);
        assert_eq!(stored, canonical(&serde_json::to_value(&r).unwrap()));
        assert_eq!(r.hash, r.compute_hash());
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
            all.push(c.seal(&mut r));
        }
        let second: Record = serde_json::from_slice(&all[1].1).unwrap();
        let mut cp = Record::new("checkpoint");
        cp.detail =
            Some(serde_json::json!({"pruned_through_seq": 2, "pruned_through_hash": second.hash}));
        all.push(c.seal(&mut cp));
        let kept: Vec<(u64, Vec<u8>)> = all[2..].to_vec();
        assert_eq!(verify(kept), Ok(3));
    }
}
