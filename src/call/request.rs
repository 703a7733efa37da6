//! Tool calls as typed requests: arguments parsed and keys validated once, so
//! the policy decides on exactly what the store will execute. A written
//! value's canonical bytes are computed here, once, and carried to the disk.

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::Tool;
use crate::store::{Check, Delete, Key, KeyError, Op, Prefix, Put, Txn, Written};

type JsonObject = Map<String, Value>;

/// How a request touches a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Delete,
}

impl Access {
    pub const ALL: [Access; 3] = [Access::Read, Access::Write, Access::Delete];

    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Delete => "delete",
        }
    }

    /// Its position in `ALL` (and in every per-access table).
    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("invalid arguments for {tool}: {message}")]
    InvalidArguments { tool: String, message: String },
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
}

#[derive(Debug, Clone)]
pub enum Request {
    Get {
        key: Key,
    },
    Put(Put),
    Delete(Delete),
    /// `kv_list` (values = false) and `kv_scan` (values = true).
    List {
        prefix: Prefix,
        limit: Option<u64>,
        cursor: Option<Key>,
        values: bool,
    },
    Txn(Txn),
    Watch {
        prefix: Prefix,
        since_revision: u64,
        timeout_ms: Option<u64>,
        limit: Option<u64>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetArgs {
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutArgs {
    key: String,
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
    if_revision: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteArgs {
    key: String,
    if_revision: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListArgs {
    prefix: String,
    limit: Option<u64>,
    cursor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckArgs {
    key: String,
    revision: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum OpKind {
    Put,
    Delete,
    Get,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpArgs {
    op: OpKind,
    key: String,
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
    if_revision: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnArgs {
    #[serde(default)]
    checks: Vec<CheckArgs>,
    ops: Vec<OpArgs>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchArgs {
    prefix: String,
    since_revision: u64,
    timeout_ms: Option<u64>,
    limit: Option<u64>,
}

/// Distinguishes `"value": null` (Some(Null)) from an absent field (None).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

fn args<T: serde::de::DeserializeOwned>(tool: &str, args: JsonObject) -> Result<T, RequestError> {
    serde_json::from_value(Value::Object(args)).map_err(|e| RequestError::InvalidArguments {
        tool: tool.to_string(),
        message: e.to_string(),
    })
}

fn invalid(tool: &str, message: String) -> RequestError {
    RequestError::InvalidArguments {
        tool: tool.to_string(),
        message,
    }
}

impl Request {
    pub fn parse(tool: Tool, raw: JsonObject) -> Result<Request, RequestError> {
        let name = tool.name();
        Ok(match tool {
            Tool::Get => {
                let a: GetArgs = args(name, raw)?;
                Request::Get {
                    key: Key::parse(&a.key)?,
                }
            }
            Tool::Put => {
                let a: PutArgs = args(name, raw)?;
                let value = a
                    .value
                    .ok_or_else(|| invalid(name, "missing field `value`".into()))?;
                Request::Put(Put {
                    key: Key::parse(&a.key)?,
                    value: Written::new(value),
                    if_revision: a.if_revision,
                })
            }
            Tool::Delete => {
                let a: DeleteArgs = args(name, raw)?;
                Request::Delete(Delete {
                    key: Key::parse(&a.key)?,
                    if_revision: a.if_revision,
                })
            }
            Tool::List | Tool::Scan => {
                let a: ListArgs = args(name, raw)?;
                Request::List {
                    prefix: Prefix::parse(&a.prefix)?,
                    limit: a.limit,
                    cursor: a.cursor.as_deref().map(Key::parse).transpose()?,
                    values: tool == Tool::Scan,
                }
            }
            Tool::Txn => {
                let a: TxnArgs = args(name, raw)?;
                let mut checks = Vec::with_capacity(a.checks.len());
                for c in a.checks {
                    if c.revision.is_none() && c.value.is_none() {
                        return Err(invalid(
                            name,
                            format!("check on {} needs `revision` or `value`", c.key),
                        ));
                    }
                    checks.push(Check {
                        key: Key::parse(&c.key)?,
                        revision: c.revision,
                        value: c.value,
                    });
                }
                let mut ops = Vec::with_capacity(a.ops.len());
                for o in a.ops {
                    let key = Key::parse(&o.key)?;
                    let misplaced = |field: &str| {
                        invalid(name, format!("`{field}` is not allowed on this op ({key})"))
                    };
                    ops.push(match o.op {
                        OpKind::Put => {
                            let value = o.value.ok_or_else(|| {
                                invalid(name, format!("put op on {key} needs `value`"))
                            })?;
                            Op::Put(Put {
                                value: Written::new(value),
                                key,
                                if_revision: o.if_revision,
                            })
                        }
                        OpKind::Delete if o.value.is_some() => return Err(misplaced("value")),
                        OpKind::Delete => Op::Delete(Delete {
                            key,
                            if_revision: o.if_revision,
                        }),
                        OpKind::Get if o.value.is_some() => return Err(misplaced("value")),
                        OpKind::Get if o.if_revision.is_some() => {
                            return Err(misplaced("if_revision"))
                        }
                        OpKind::Get => Op::Get { key },
                    });
                }
                if ops.is_empty() {
                    return Err(invalid(name, "`ops` is empty".into()));
                }
                Request::Txn(Txn { checks, ops })
            }
            Tool::Watch => {
                let a: WatchArgs = args(name, raw)?;
                Request::Watch {
                    prefix: Prefix::parse(&a.prefix)?,
                    since_revision: a.since_revision,
                    timeout_ms: a.timeout_ms,
                    limit: a.limit,
                }
            }
        })
    }

    /// Every key the request touches directly, with how. Listing and watching
    /// touch no key up front: their results are filtered instead.
    pub fn accesses(&self) -> Vec<(Access, &Key)> {
        match self {
            Request::Get { key } => vec![(Access::Read, key)],
            Request::Put(p) => vec![(Access::Write, &p.key)],
            Request::Delete(d) => vec![(Access::Delete, &d.key)],
            Request::List { .. } | Request::Watch { .. } => Vec::new(),
            Request::Txn(t) => t
                .checks
                .iter()
                .map(|c| (Access::Read, &c.key))
                .chain(t.ops.iter().map(|op| match op {
                    Op::Put(p) => (Access::Write, &p.key),
                    Op::Delete(d) => (Access::Delete, &d.key),
                    Op::Get { key } => (Access::Read, key),
                }))
                .collect(),
        }
    }

    /// What the audit record names: the keys touched, or the prefix listed.
    pub fn audit_keys(&self) -> Vec<String> {
        match self {
            Request::List { prefix, .. } | Request::Watch { prefix, .. } => {
                vec![prefix.as_str().to_string()]
            }
            other => {
                let mut keys: Vec<String> = other
                    .accesses()
                    .into_iter()
                    .map(|(_, k)| k.as_str().to_string())
                    .collect();
                keys.dedup();
                keys
            }
        }
    }

    /// The values the request writes, in op order.
    fn writes(&self) -> Vec<&Written> {
        match self {
            Request::Put(p) => vec![&p.value],
            Request::Txn(t) => t
                .ops
                .iter()
                .filter_map(|op| match op {
                    Op::Put(p) => Some(&p.value),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Size and SHA-256 (hex) of the canonical JSON of what the request
    /// writes: one value for `kv_put`, the array of its put values in op order
    /// for `kv_txn`. Taken from the bytes computed at parse; nothing is
    /// serialised again.
    pub fn written_digest(&self) -> Option<(u64, String)> {
        let (bytes, hash) = match self {
            Request::Put(p) => (p.value.len(), Sha256::digest(p.value.json())),
            Request::Txn(_) => {
                let writes = self.writes();
                if writes.is_empty() {
                    return None;
                }
                let mut h = Sha256::new();
                h.update(b"[");
                for (i, w) in writes.iter().enumerate() {
                    if i > 0 {
                        h.update(b",");
                    }
                    h.update(w.json());
                }
                h.update(b"]");
                let len = 2 + writes.len() - 1 + writes.iter().map(|w| w.len()).sum::<usize>();
                (len, h.finalize())
            }
            _ => return None,
        };
        Some((bytes as u64, crate::audit::hex(&hash)))
    }

    /// The written values themselves, for records that keep them
    /// (`[audit] record_values`): one value, or an array in op order.
    pub fn written_values(&self) -> Option<Value> {
        match self {
            Request::Put(p) => Some(p.value.value().clone()),
            Request::Txn(_) => {
                let writes = self.writes();
                (!writes.is_empty())
                    .then(|| Value::Array(writes.iter().map(|w| w.value().clone()).collect()))
            }
            _ => None,
        }
    }

    /// The largest value the request writes, in bytes as stored.
    pub fn largest_value(&self) -> usize {
        self.writes().iter().map(|w| w.len()).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(tool: Tool, args: Value) -> Request {
        let Value::Object(m) = args else {
            panic!("not an object")
        };
        Request::parse(tool, m).unwrap()
    }

    #[test]
    fn written_digest_is_the_canonical_json_of_what_is_written() {
        let v = json!({"b": [1, 2.5, "x"], "a": {"z": null, "y": true}});
        let r = parse(Tool::Put, json!({"key": "/k", "value": v}));
        let canonical = crate::audit::canonical(&v);
        let (len, digest) = r.written_digest().unwrap();
        assert_eq!(len, canonical.len() as u64);
        assert_eq!(digest, crate::audit::sha256_hex(&canonical));

        let r = parse(
            Tool::Txn,
            json!({"ops": [
                {"op": "put", "key": "/a", "value": v},
                {"op": "get", "key": "/b"},
                {"op": "delete", "key": "/c"},
                {"op": "put", "key": "/d", "value": "s"},
            ]}),
        );
        let canonical = crate::audit::canonical(&json!([v, "s"]));
        let (len, digest) = r.written_digest().unwrap();
        assert_eq!(len, canonical.len() as u64);
        assert_eq!(digest, crate::audit::sha256_hex(&canonical));
        assert_eq!(r.written_values(), Some(json!([v, "s"])));

        let reads = parse(Tool::Txn, json!({"ops": [{"op": "get", "key": "/b"}]}));
        assert_eq!(reads.written_digest(), None);
        assert_eq!(reads.largest_value(), 0);
    }
}
