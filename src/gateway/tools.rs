//! The MCP tool surface: names, argument schemas, execution of an already
//! decided request against the store, and the rendering of outcomes.
//!
//! A tool-level failure (bad arguments, missing key, failed check, a key
//! outside the role's scopes) is a result with `isError: true` and a structured
//! `{"error": {"code", "message"}}` the agent can read and act on; it is never a
//! JSON-RPC protocol error.

use std::time::Duration;

use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{json, Value};

use crate::audit::Record;
use crate::call::{Request, RequestError};
use crate::store::{Mutation, Outcome, Owner, ReplyBounds, Store, StoreError};

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
/// commit, and writes for `owner` (its quota); otherwise the record is handed
/// back for the caller to journal.
pub async fn execute(
    store: &Store,
    limits: &ToolLimits,
    request: Request,
    visible: &(dyn Fn(&str) -> bool + Sync),
    stop: impl std::future::Future<Output = ()>,
    record: Option<Record>,
    owner: Owner,
) -> (Result<Value, ToolError>, Option<Record>) {
    let mutation = match request {
        Request::Put(p) => Mutation::Put(p),
        Request::Delete(d) => Mutation::Delete(d),
        Request::Txn(t) => Mutation::Txn(t),
        read => return (read_only(store, limits, read, visible, stop).await, record),
    };
    let result = store.mutate_as(mutation, Some(owner), record).await;
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
        Request::Put(_) | Request::Delete(_) | Request::Txn(_) => {
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
