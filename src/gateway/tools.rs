//! The MCP tool surface: names, argument schemas, argument parsing, and the
//! rendering of store outcomes as tool results.
//!
//! A tool-level failure (bad arguments, missing key, failed check) is a result
//! with `isError: true` and a structured `{"error": {"code", "message"}}` the
//! agent can read and act on; it is never a JSON-RPC protocol error.

use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{CallToolResult, ContentBlock, JsonObject, Tool};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::{Check, Key, Mutation, Op, Outcome, Prefix, Store, StoreError};

/// Bounds the gateway applies to tool arguments (from the deployment config).
#[derive(Debug, Clone)]
pub struct ToolLimits {
    pub max_list_limit: usize,
    pub max_watch: Duration,
    /// Upper bound on the values carried by one reply (scan, watch).
    pub max_reply_bytes: usize,
}

const DEFAULT_LIST_LIMIT: usize = 100;
const DEFAULT_WATCH_MS: u64 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("invalid arguments for {tool}: {message}")]
    InvalidArguments { tool: String, message: String },
    #[error("{what} is {got}; the limit is {max}")]
    OverLimit {
        what: &'static str,
        got: u64,
        max: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ToolError {
    pub fn code(&self) -> &'static str {
        match self {
            ToolError::InvalidArguments { .. } => "invalid_arguments",
            ToolError::OverLimit { .. } => "too_large",
            ToolError::Store(e) => e.code(),
        }
    }
}

fn schema(v: Value) -> Arc<JsonObject> {
    match v {
        Value::Object(map) => Arc::new(map),
        // The schemas below are literals: all objects.
        _ => Arc::new(JsonObject::new()),
    }
}

const KEY_DOC: &str = "Key path: '/'-separated segments starting with '/', e.g. /projects/p1/tasks/t7 (no empty, '.' or '..' segments; at most 1024 bytes)";
const PREFIX_DOC: &str =
    "Path prefix: '/' for everything, or a key path; '/a' covers '/a' and '/a/...', never '/ab'";

/// Every tool the gateway serves, in a fixed order.
pub fn definitions() -> Vec<Tool> {
    let key = json!({"type": "string", "description": KEY_DOC});
    let prefix = json!({"type": "string", "description": PREFIX_DOC});
    let revision = json!({"type": "integer", "minimum": 0});
    let if_revision = json!({"type": "integer", "minimum": 0,
        "description": "Compare-and-swap: only if the key's current revision is this; 0 = only if the key does not exist"});
    let limit = json!({"type": "integer", "minimum": 1, "description": "Most items to return (default 100)"});
    let cursor = json!({"type": "string", "description": "next_cursor from the previous page"});
    vec![
        Tool::new(
            "kv_get",
            "Read one key: its JSON value, revision and create revision.",
            schema(json!({"type": "object", "properties": {"key": key}, "required": ["key"], "additionalProperties": false})),
        ),
        Tool::new(
            "kv_put",
            "Write a JSON value to a key; returns the new revision. With if_revision it is a compare-and-swap (0 = create only).",
            schema(json!({"type": "object", "properties": {"key": key, "value": {"description": "Any JSON value"}, "if_revision": if_revision},
                "required": ["key", "value"], "additionalProperties": false})),
        ),
        Tool::new(
            "kv_delete",
            "Delete a key (deleted=false when it did not exist). With if_revision only if the key is at that revision.",
            schema(json!({"type": "object", "properties": {"key": key, "if_revision": if_revision},
                "required": ["key"], "additionalProperties": false})),
        ),
        Tool::new(
            "kv_list",
            "List the keys under a prefix (no values), in key order, a page at a time.",
            schema(json!({"type": "object", "properties": {"prefix": prefix, "limit": limit, "cursor": cursor},
                "required": ["prefix"], "additionalProperties": false})),
        ),
        Tool::new(
            "kv_scan",
            "List the entries (keys with values) under a prefix, in key order, a page at a time.",
            schema(json!({"type": "object", "properties": {"prefix": prefix, "limit": limit, "cursor": cursor},
                "required": ["prefix"], "additionalProperties": false})),
        ),
        Tool::new(
            "kv_txn",
            "Atomic transaction: if every check holds, apply every op at one revision; otherwise change nothing.",
            schema(json!({"type": "object", "properties": {
                "checks": {"type": "array", "items": {"type": "object", "properties": {
                    "key": key, "revision": {"type": "integer", "minimum": 0, "description": "Expected revision; 0 = key must not exist"},
                    "value": {"description": "Expected JSON value"}}, "required": ["key"], "additionalProperties": false}},
                "ops": {"type": "array", "items": {"type": "object", "properties": {
                    "op": {"type": "string", "enum": ["put", "delete", "get"]}, "key": key,
                    "value": {"description": "JSON value (put)"}, "if_revision": if_revision},
                    "required": ["op", "key"], "additionalProperties": false}}},
                "required": ["ops"], "additionalProperties": false})),
        ),
        Tool::new(
            "kv_watch",
            "Wait for changes under a prefix after since_revision; returns them in order, or empty after timeout_ms. Pass the returned revision as the next since_revision.",
            schema(json!({"type": "object", "properties": {"prefix": prefix, "since_revision": revision,
                "timeout_ms": {"type": "integer", "minimum": 0, "description": "How long to wait for a change (default 30000)"},
                "limit": {"type": "integer", "minimum": 1, "description": "Most events to return (default 100)"}},
                "required": ["prefix", "since_revision"], "additionalProperties": false})),
        ),
    ]
}

pub const TOOL_NAMES: [&str; 7] = [
    "kv_get",
    "kv_put",
    "kv_delete",
    "kv_list",
    "kv_scan",
    "kv_txn",
    "kv_watch",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetArgs {
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutArgs {
    key: String,
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

fn parse<T: serde::de::DeserializeOwned>(tool: &str, args: JsonObject) -> Result<T, ToolError> {
    serde_json::from_value(Value::Object(args)).map_err(|e| ToolError::InvalidArguments {
        tool: tool.to_string(),
        message: e.to_string(),
    })
}

fn key(raw: &str) -> Result<Key, ToolError> {
    Key::parse(raw).map_err(|e| ToolError::Store(e.into()))
}

fn prefix(raw: &str) -> Result<Prefix, ToolError> {
    Prefix::parse(raw).map_err(|e| ToolError::Store(e.into()))
}

fn bounded(what: &'static str, got: Option<u64>, default: u64, max: u64) -> Result<u64, ToolError> {
    let v = got.unwrap_or(default.min(max));
    if v > max {
        return Err(ToolError::OverLimit { what, got: v, max });
    }
    Ok(v)
}

fn require_value(tool: &str, value: Option<Value>) -> Result<Value, ToolError> {
    value.ok_or_else(|| ToolError::InvalidArguments {
        tool: tool.to_string(),
        message: "missing field `value`".into(),
    })
}

/// Runs one tool call against the store. `stop` ends a waiting `kv_watch` early
/// (shutdown or client cancellation).
pub async fn call(
    store: &Store,
    limits: &ToolLimits,
    name: &str,
    args: JsonObject,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Value, ToolError> {
    match name {
        "kv_get" => {
            let a: GetArgs = parse(name, args)?;
            let k = key(&a.key)?;
            match store.get(&k)? {
                Some(entry) => Ok(to_json(&entry)),
                None => Err(StoreError::NotFound { key: k.to_string() }.into()),
            }
        }
        "kv_put" => {
            let a: PutArgs = parse(name, args)?;
            let m = Mutation::Put {
                key: key(&a.key)?,
                value: require_value(name, a.value)?,
                if_revision: a.if_revision,
            };
            Ok(outcome_json(store.mutate(m).await?))
        }
        "kv_delete" => {
            let a: DeleteArgs = parse(name, args)?;
            let m = Mutation::Delete {
                key: key(&a.key)?,
                if_revision: a.if_revision,
            };
            Ok(outcome_json(store.mutate(m).await?))
        }
        "kv_list" | "kv_scan" => {
            let a: ListArgs = parse(name, args)?;
            let p = prefix(&a.prefix)?;
            let cursor = a.cursor.as_deref().map(key).transpose()?;
            let limit = bounded(
                "limit",
                a.limit,
                DEFAULT_LIST_LIMIT as u64,
                limits.max_list_limit as u64,
            )? as usize;
            if name == "kv_list" {
                let page = store.list(&p, cursor.as_ref(), limit)?;
                Ok(json!({"keys": page.items, "next_cursor": page.next_cursor}))
            } else {
                let page = store.scan(&p, cursor.as_ref(), limit, limits.max_reply_bytes)?;
                Ok(json!({"entries": page.items, "next_cursor": page.next_cursor}))
            }
        }
        "kv_txn" => {
            let a: TxnArgs = parse(name, args)?;
            let checks = a
                .checks
                .into_iter()
                .map(|c| {
                    if c.revision.is_none() && c.value.is_none() {
                        return Err(ToolError::InvalidArguments {
                            tool: name.into(),
                            message: format!("check on {} needs `revision` or `value`", c.key),
                        });
                    }
                    Ok(Check {
                        key: key(&c.key)?,
                        revision: c.revision,
                        value: c.value,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let ops = a
                .ops
                .into_iter()
                .map(|o| {
                    let k = key(&o.key)?;
                    let misplaced = |field: &str| ToolError::InvalidArguments {
                        tool: name.into(),
                        message: format!("`{field}` is not allowed on this op ({})", o.key),
                    };
                    Ok(match o.op {
                        OpKind::Put => Op::Put {
                            key: k,
                            value: require_value(name, o.value)?,
                            if_revision: o.if_revision,
                        },
                        OpKind::Delete if o.value.is_some() => return Err(misplaced("value")),
                        OpKind::Delete => Op::Delete {
                            key: k,
                            if_revision: o.if_revision,
                        },
                        OpKind::Get if o.value.is_some() => return Err(misplaced("value")),
                        OpKind::Get if o.if_revision.is_some() => {
                            return Err(misplaced("if_revision"))
                        }
                        OpKind::Get => Op::Get { key: k },
                    })
                })
                .collect::<Result<Vec<_>, ToolError>>()?;
            if ops.is_empty() {
                return Err(ToolError::InvalidArguments {
                    tool: name.into(),
                    message: "`ops` is empty".into(),
                });
            }
            Ok(outcome_json(
                store.mutate(Mutation::Txn { checks, ops }).await?,
            ))
        }
        "kv_watch" => {
            let a: WatchArgs = parse(name, args)?;
            let p = prefix(&a.prefix)?;
            let max_ms = u64::try_from(limits.max_watch.as_millis()).unwrap_or(u64::MAX);
            let timeout = bounded("timeout_ms", a.timeout_ms, DEFAULT_WATCH_MS, max_ms)?;
            let limit = bounded(
                "limit",
                a.limit,
                DEFAULT_LIST_LIMIT as u64,
                limits.max_list_limit as u64,
            )? as usize;
            let result = store
                .watch(
                    &p,
                    a.since_revision,
                    Duration::from_millis(timeout),
                    limit,
                    limits.max_reply_bytes,
                    stop,
                )
                .await?;
            Ok(to_json(&result))
        }
        other => Err(ToolError::InvalidArguments {
            tool: other.to_string(),
            message: "no such tool".into(),
        }),
    }
}

/// The store's result types hold only strings, integers and JSON values, so
/// serialising them cannot fail.
fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn outcome_json(o: Outcome) -> Value {
    match o {
        Outcome::Put(p) => to_json(&p),
        Outcome::Delete(d) => to_json(&d),
        Outcome::Txn(t) => to_json(&t),
    }
}

/// A successful tool result: the structured JSON and the same JSON as text for
/// clients that only read text.
pub fn success(structured: Value) -> CallToolResult {
    let text = structured.to_string();
    let mut r = CallToolResult::structured(structured);
    r.content = vec![ContentBlock::text(text)];
    r
}

/// A tool error the agent can read: `isError: true`, code and message.
pub fn failure(err: &ToolError) -> CallToolResult {
    let code = err.code();
    let message = err.to_string();
    let structured = json!({"error": {"code": code, "message": message}});
    let mut r = CallToolResult::structured_error(structured);
    r.content = vec![ContentBlock::text(format!("error ({code}): {message}"))];
    r
}
