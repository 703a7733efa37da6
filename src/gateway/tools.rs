//! The MCP tool surface: names, argument schemas, execution of an already
//! decided request against the store, and the rendering of outcomes.
//!
//! A tool-level failure (bad arguments, missing key, failed check, a key
//! outside the role's scopes) is a result with `isError: true` and a structured
//! `{"error": {"code", "message"}}` the agent can read and act on; it is never a
//! JSON-RPC protocol error.

use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{CallToolResult, ContentBlock, JsonObject, Tool};
use serde_json::{json, Value};

use super::request::{Request, RequestError};
use crate::audit::Record;
use crate::policy::GATEWAY_TOOLS;
use crate::store::{Mutation, Outcome, ReplyBounds, Store, StoreError};

/// Bounds for one call: the gateway's, narrowed by the caller's role.
#[derive(Debug, Clone)]
pub struct ToolLimits {
    pub max_list_limit: u64,
    pub max_watch_ms: u64,
    /// Upper bound on the values carried by one reply (scan, watch).
    pub max_reply_bytes: usize,
}

const DEFAULT_LIST_LIMIT: u64 = 100;
const DEFAULT_WATCH_MS: u64 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Request(#[from] RequestError),
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
            ToolError::Request(RequestError::InvalidKey(_)) => "invalid_key",
            ToolError::Request(_) => "invalid_arguments",
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

/// Every tool the gateway serves, in GATEWAY_TOOLS order.
pub fn definitions() -> Vec<Tool> {
    let key = json!({"type": "string", "description": KEY_DOC});
    let prefix = json!({"type": "string", "description": PREFIX_DOC});
    let revision = json!({"type": "integer", "minimum": 0});
    let if_revision = json!({"type": "integer", "minimum": 0,
        "description": "Compare-and-swap: only if the key's current revision is this; 0 = only if the key does not exist"});
    let limit = json!({"type": "integer", "minimum": 1, "description": "Most items to return (default 100)"});
    let cursor = json!({"type": "string", "description": "next_cursor from the previous page"});
    let tools = vec![
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
            "List the keys under a prefix (no values), in key order, a page at a time. Only keys you may read are listed.",
            schema(json!({"type": "object", "properties": {"prefix": prefix, "limit": limit, "cursor": cursor},
                "required": ["prefix"], "additionalProperties": false})),
        ),
        Tool::new(
            "kv_scan",
            "List the entries (keys with values) under a prefix, in key order, a page at a time. Only keys you may read are listed.",
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
    ];
    debug_assert!(tools.iter().map(|t| t.name.as_ref()).eq(GATEWAY_TOOLS));
    tools
}

fn bounded(what: &'static str, got: Option<u64>, default: u64, max: u64) -> Result<u64, ToolError> {
    let v = got.unwrap_or(default.min(max));
    if v > max {
        return Err(ToolError::OverLimit { what, got: v, max });
    }
    Ok(v)
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
        Outcome::Flushed => Value::Null,
    }
}

/// Runs a request the policy already allowed. `visible` filters what listings
/// and watches may show; `stop` ends a waiting `kv_watch` early (shutdown or
/// client cancellation). A mutation takes the call's audit record into its
/// commit; otherwise the record is handed back for the caller to journal.
pub async fn execute(
    store: &Store,
    limits: &ToolLimits,
    request: Request,
    visible: &(dyn Fn(&str) -> bool + Sync),
    stop: impl std::future::Future<Output = ()>,
    record: Option<Record>,
) -> (Result<Value, ToolError>, Option<Record>) {
    let mutation = match request {
        Request::Put {
            key,
            value,
            if_revision,
        } => Mutation::Put {
            key,
            value,
            if_revision,
        },
        Request::Delete { key, if_revision } => Mutation::Delete { key, if_revision },
        Request::Txn { checks, ops } => Mutation::Txn { checks, ops },
        read => return (read_only(store, limits, read, visible, stop).await, record),
    };
    let result = store.mutate(mutation, record).await;
    (result.map(outcome_json).map_err(ToolError::from), None)
}

async fn read_only(
    store: &Store,
    limits: &ToolLimits,
    request: Request,
    visible: &(dyn Fn(&str) -> bool + Sync),
    stop: impl std::future::Future<Output = ()>,
) -> Result<Value, ToolError> {
    match request {
        Request::Get { key } => match store.get(&key)? {
            Some(entry) => Ok(to_json(&entry)),
            None => Err(StoreError::NotFound {
                key: key.to_string(),
            }
            .into()),
        },
        Request::List {
            prefix,
            limit,
            cursor,
            values,
        } => {
            let limit =
                bounded("limit", limit, DEFAULT_LIST_LIMIT, limits.max_list_limit)? as usize;
            if values {
                let page = store.scan(
                    &prefix,
                    cursor.as_ref(),
                    limit,
                    limits.max_reply_bytes,
                    visible,
                )?;
                Ok(json!({"entries": page.items, "next_cursor": page.next_cursor}))
            } else {
                let page = store.list(&prefix, cursor.as_ref(), limit, visible)?;
                Ok(json!({"keys": page.items, "next_cursor": page.next_cursor}))
            }
        }
        Request::Watch {
            prefix,
            since_revision,
            timeout_ms,
            limit,
        } => {
            let timeout = bounded(
                "timeout_ms",
                timeout_ms,
                DEFAULT_WATCH_MS,
                limits.max_watch_ms,
            )?;
            let limit =
                bounded("limit", limit, DEFAULT_LIST_LIMIT, limits.max_list_limit)? as usize;
            let result = store
                .watch(
                    &prefix,
                    since_revision,
                    Duration::from_millis(timeout),
                    ReplyBounds {
                        items: limit,
                        bytes: limits.max_reply_bytes,
                    },
                    visible,
                    stop,
                )
                .await?;
            Ok(to_json(&result))
        }
        // `execute` routes mutations to the store's writer; never here.
        Request::Put { .. } | Request::Delete { .. } | Request::Txn { .. } => {
            Err(ToolError::Store(StoreError::Closed))
        }
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

/// A tool error the agent can read: `isError: true`, code and message, and the
/// deciding rule when the policy refused.
pub fn failure(code: &str, message: &str, rule: Option<Value>) -> CallToolResult {
    let mut error = json!({"code": code, "message": message});
    if let Some(rule) = rule {
        error["rule"] = rule;
    }
    let mut r = CallToolResult::structured_error(json!({ "error": error }));
    r.content = vec![ContentBlock::text(format!("error ({code}): {message}"))];
    r
}
