//! Tool calls as typed requests: arguments parsed and keys validated once, so
//! the policy decides on exactly what the store will execute.

use rmcp::model::JsonObject;
use serde::Deserialize;
use serde_json::Value;

use crate::policy::Access;
use crate::store::{json_size, Check, Key, KeyError, Op, Prefix};

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("invalid arguments for {tool}: {message}")]
    InvalidArguments { tool: String, message: String },
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
    #[error("no such tool: {tool}")]
    UnknownTool { tool: String },
}

#[derive(Debug, Clone)]
pub enum Request {
    Get {
        key: Key,
    },
    Put {
        key: Key,
        value: Value,
        if_revision: Option<u64>,
    },
    Delete {
        key: Key,
        if_revision: Option<u64>,
    },
    /// `kv_list` (values = false) and `kv_scan` (values = true).
    List {
        prefix: Prefix,
        limit: Option<u64>,
        cursor: Option<Key>,
        values: bool,
    },
    Txn {
        checks: Vec<Check>,
        ops: Vec<Op>,
    },
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
    pub fn parse(tool: &str, raw: JsonObject) -> Result<Request, RequestError> {
        Ok(match tool {
            "kv_get" => {
                let a: GetArgs = args(tool, raw)?;
                Request::Get {
                    key: Key::parse(&a.key)?,
                }
            }
            "kv_put" => {
                let a: PutArgs = args(tool, raw)?;
                Request::Put {
                    key: Key::parse(&a.key)?,
                    value: a
                        .value
                        .ok_or_else(|| invalid(tool, "missing field `value`".into()))?,
                    if_revision: a.if_revision,
                }
            }
            "kv_delete" => {
                let a: DeleteArgs = args(tool, raw)?;
                Request::Delete {
                    key: Key::parse(&a.key)?,
                    if_revision: a.if_revision,
                }
            }
            "kv_list" | "kv_scan" => {
                let a: ListArgs = args(tool, raw)?;
                Request::List {
                    prefix: Prefix::parse(&a.prefix)?,
                    limit: a.limit,
                    cursor: a.cursor.as_deref().map(Key::parse).transpose()?,
                    values: tool == "kv_scan",
                }
            }
            "kv_txn" => {
                let a: TxnArgs = args(tool, raw)?;
                let mut checks = Vec::with_capacity(a.checks.len());
                for c in a.checks {
                    if c.revision.is_none() && c.value.is_none() {
                        return Err(invalid(
                            tool,
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
                        invalid(tool, format!("`{field}` is not allowed on this op ({key})"))
                    };
                    ops.push(match o.op {
                        OpKind::Put => Op::Put {
                            value: o.value.ok_or_else(|| {
                                invalid(tool, format!("put op on {key} needs `value`"))
                            })?,
                            key,
                            if_revision: o.if_revision,
                        },
                        OpKind::Delete if o.value.is_some() => return Err(misplaced("value")),
                        OpKind::Delete => Op::Delete {
                            key,
                            if_revision: o.if_revision,
                        },
                        OpKind::Get if o.value.is_some() => return Err(misplaced("value")),
                        OpKind::Get if o.if_revision.is_some() => {
                            return Err(misplaced("if_revision"))
                        }
                        OpKind::Get => Op::Get { key },
                    });
                }
                if ops.is_empty() {
                    return Err(invalid(tool, "`ops` is empty".into()));
                }
                Request::Txn { checks, ops }
            }
            "kv_watch" => {
                let a: WatchArgs = args(tool, raw)?;
                Request::Watch {
                    prefix: Prefix::parse(&a.prefix)?,
                    since_revision: a.since_revision,
                    timeout_ms: a.timeout_ms,
                    limit: a.limit,
                }
            }
            other => {
                return Err(RequestError::UnknownTool {
                    tool: other.to_string(),
                })
            }
        })
    }

    /// Every key the request touches directly, with how. Listing and watching
    /// touch no key up front: their results are filtered instead.
    pub fn accesses(&self) -> Vec<(Access, &Key)> {
        match self {
            Request::Get { key } => vec![(Access::Read, key)],
            Request::Put { key, .. } => vec![(Access::Write, key)],
            Request::Delete { key, .. } => vec![(Access::Delete, key)],
            Request::List { .. } | Request::Watch { .. } => Vec::new(),
            Request::Txn { checks, ops } => checks
                .iter()
                .map(|c| (Access::Read, &c.key))
                .chain(ops.iter().map(|op| match op {
                    Op::Put { key, .. } => (Access::Write, key),
                    Op::Delete { key, .. } => (Access::Delete, key),
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

    /// The values a request writes: total size, SHA-256 of their canonical
    /// JSON (one value, or an array in op order), and the values themselves.
    pub fn written_values(&self) -> Option<(u64, String, Value)> {
        let values: Value = match self {
            Request::Put { value, .. } => value.clone(),
            Request::Txn { ops, .. } => {
                let puts: Vec<Value> = ops
                    .iter()
                    .filter_map(|op| match op {
                        Op::Put { value, .. } => Some(value.clone()),
                        _ => None,
                    })
                    .collect();
                if puts.is_empty() {
                    return None;
                }
                Value::Array(puts)
            }
            _ => return None,
        };
        let canonical = crate::audit::canonical(&values);
        Some((
            canonical.len() as u64,
            crate::audit::sha256_hex(&canonical),
            values,
        ))
    }

    /// The largest value the request writes, as compact JSON bytes.
    pub fn largest_value(&self) -> usize {
        match self {
            Request::Put { value, .. } => json_size(value),
            Request::Txn { ops, .. } => ops
                .iter()
                .map(|op| match op {
                    Op::Put { value, .. } => json_size(value),
                    _ => 0,
                })
                .max()
                .unwrap_or(0),
            _ => 0,
        }
    }
}
