//! One MCP session: what one accepted connection may do, and its tool calls.
//! Its identity is fixed at accept from the socket and the peer's
//! credentials; nothing the client sends can change it. The protocol is
//! `conn`'s.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use rmcp::model::{CallToolRequestParams, CallToolResponse, ErrorCode};
use rmcp::ErrorData;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::codes;
use super::guard::AgentGuard;
use super::tools::{self, ToolError, ToolLimits};
use crate::audit::{self, Record};
use crate::policy::{Bound, Policy, Refusal};
use crate::store::Store;

/// Who is on the other end of a connection, as the kernel and the socket say.
#[derive(Debug, Clone)]
pub struct Identity {
    pub agent: Arc<str>,
    pub role: Arc<str>,
    pub uid: u32,
    pub pid: Option<i32>,
    pub conn: u64,
}

/// What every session of the gateway shares.
pub struct Shared {
    pub store: Store,
    /// The policy in force. A reload swaps it whole; a call decides under the
    /// snapshot it loaded first and finishes under it.
    pub policy: ArcSwap<Policy>,
    /// The gateway's own bounds; a role's limits can only narrow them.
    pub limits: ToolLimits,
    /// Fired when the gateway begins to shut down: new calls are refused and
    /// waiting watches return.
    pub shutdown: CancellationToken,
    /// Every tool call in flight, so shutdown can wait for them.
    pub calls: TaskTracker,
    pub max_calls_per_connection: usize,
    /// `[audit] record_values`: keep written values in the records.
    pub record_values: bool,
    /// Each tool's definition as JSON, serialised once, in list order.
    pub tool_json: Arc<Vec<(&'static str, Vec<u8>)>>,
    /// Bumped by every policy swap; connections compare their role's tools.
    pub policy_changes: tokio::sync::watch::Sender<u64>,
    /// How often a waiting `kv_watch` with a progress token reports progress.
    pub progress_every: std::time::Duration,
    /// Backpressure bounds of every connection.
    pub flow: Flow,
    /// Each agent's rates and refusal ledger, by agent name.
    pub guards: Arc<std::collections::BTreeMap<String, Arc<AgentGuard>>>,
}

/// How much one connection may leave unread before the gateway stops reading
/// from it (`[gateway] max_pending_replies`, `max_unsent_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub max_pending: usize,
    pub max_unsent_bytes: usize,
}

#[derive(Clone)]
pub struct Session {
    pub id: Identity,
    pub shared: Arc<Shared>,
    pub inflight: Arc<Semaphore>,
    /// Shared by every connection of this agent: its rates and its refusal
    /// ledger.
    pub guard: Arc<AgentGuard>,
}

fn narrow(gateway: u64, role: &Option<Bound>) -> u64 {
    role.as_ref().map_or(gateway, |b| b.max.min(gateway))
}

impl Session {
    /// The tools this session's role may call, in list order.
    pub fn allowed_tools(&self) -> Vec<&'static str> {
        super::catalog::tools_for(&self.shared.policy.load(), &self.id.role)
    }

    /// `tools/list`'s array, built from each tool's JSON serialised once at
    /// start, and the names it holds.
    pub fn tools_json(&self) -> (Vec<&'static str>, Vec<u8>) {
        let names = self.allowed_tools();
        let mut out = Vec::with_capacity(4096);
        out.push(b'[');
        for (_, json) in self
            .shared
            .tool_json
            .iter()
            .filter(|(n, _)| names.contains(n))
        {
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(json);
        }
        out.push(b']');
        (names, out)
    }

    /// What `initialize` and `server/discover` tell the agent about itself.
    pub fn instructions(&self) -> String {
        let policy = self.shared.policy.load();
        super::catalog::instructions(&policy, &self.id.role)
    }

    /// One tool call: identity (this session's), the policy's decision
    /// (`Policy::decide`: tool, rate, arguments, limits, keys), the store,
    /// the audit record, the result. `cancel` ends a waiting call (a watch)
    /// early.
    pub async fn call(
        &self,
        request: CallToolRequestParams,
        cancel: CancellationToken,
    ) -> Result<CallToolResponse, ErrorData> {
        let started = Instant::now();
        let shared = &self.shared;
        let id = &self.id;
        let name = request.name.to_string();
        let args = request.arguments.unwrap_or_default();
        let policy = shared.policy.load_full();
        let mut rec = self.call_record(Some(&name), &policy);
        rec.args_sha256 = Some(audit::args_digest(&args));
        let audit = Audit {
            store: &shared.store,
            guard: &self.guard,
            started,
        };

        if shared.shutdown.is_cancelled() {
            rec.decision = Some("deny".into());
            return audit.refuse(
                rec,
                codes::SHUTTING_DOWN,
                "gateway is shutting down".into(),
                None,
            );
        }
        // A transport bound, before the policy: a busy connection's calls
        // take no rate token.
        let Ok(_permit) = self.inflight.try_acquire() else {
            rec.decision = Some("deny".into());
            let message = format!(
                "too many concurrent calls on this connection (limit {})",
                shared.max_calls_per_connection
            );
            return audit.refuse(rec, codes::RATE_LIMITED, message, None);
        };
        let decided = policy.decide(&id.role, &name, args, |bound| {
            self.guard.calls.try_acquire(bound.max)
        });
        let allowed = match decided {
            Ok(allowed) => allowed,
            Err(refusal) => {
                rec.decision = Some(match refusal {
                    Refusal::Invalid(_) => "invalid".into(),
                    _ => "deny".into(),
                });
                rec.rule = refusal.rule().map(|r| r.to_ref());
                let message = refusal.message(&id.role, &name);
                let rule = refusal.rule().map(|r| r.to_json());
                return match refusal {
                    Refusal::UnknownTool => {
                        audit.refuse(rec, ErrorCode::INVALID_PARAMS, message, None)
                    }
                    Refusal::NoRole => audit.refuse(rec, codes::DENIED, message, None),
                    Refusal::Tool { rule: r } => {
                        let message = format!("{message} ({r})");
                        let data = serde_json::json!({ "rule": r.to_json() });
                        audit.refuse(rec, codes::DENIED, message, Some(data))
                    }
                    Refusal::Rate(b) => {
                        let message = format!(
                            "rate limited: agent {} may make {} calls per minute ({})",
                            id.agent, b.max, b.rule
                        );
                        audit.tool_error(rec, "rate_limited", message, rule)
                    }
                    Refusal::Invalid(e) => {
                        let e = ToolError::from(e);
                        audit.tool_error(rec, e.code(), e.to_string(), None)
                    }
                    Refusal::Denied(d, request) => {
                        rec.set_keys(request.audit_keys());
                        let message = format!("{} ({})", d.message, d.rule);
                        audit.tool_error(rec, d.kind.code(), message, rule)
                    }
                };
            }
        };
        let role = allowed.role;
        rec.set_keys(allowed.request.audit_keys());
        rec.decision = Some("allow".into());
        rec.rule = allowed.deciding_rule().map(|r| r.to_ref());
        let parsed = allowed.request;
        if let Some((bytes, digest)) = parsed.written_digest() {
            rec.value_bytes = Some(bytes);
            rec.value_sha256 = Some(digest);
            if shared.record_values {
                rec.values = parsed.written_values();
            }
        }
        let limits = ToolLimits {
            max_list_limit: narrow(shared.limits.max_list_limit, &role.limits.max_scan_items),
            max_watch_ms: narrow(shared.limits.max_watch_ms, &role.limits.max_watch_ms),
            max_reply_bytes: shared.limits.max_reply_bytes,
        };
        let stop = {
            let shutdown = shared.shutdown.clone();
            let cancelled = cancel;
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = cancelled.cancelled() => {}
                }
            }
        };
        // Under the policy the call started with and under the one in force
        // now: a reload that revokes a read scope stops a waiting watch (or
        // a long listing) from showing what the role may no longer read.
        let visible = |key: &str| {
            role.can_read(key)
                && shared
                    .policy
                    .load()
                    .role(&id.role)
                    .is_some_and(|r| r.can_read(key))
        };
        rec.latency_us = Some(started.elapsed().as_micros() as u64);
        let audited = shared.store.audit_enabled().then_some(rec);
        let owner = crate::store::Owner {
            role: id.role.clone(),
            limits: role.store_limits.clone(),
        };
        let (result, unsealed) = shared
            .calls
            .track_future(tools::execute(
                &shared.store,
                &limits,
                parsed,
                &visible,
                stop,
                audited,
                owner,
            ))
            .await;
        // A read's record (a mutation's was sealed with it) is journaled
        // before the reply: if that fails, the agent gets no data.
        if let Some(mut rec) = unsealed {
            rec.latency_us = Some(started.elapsed().as_micros() as u64);
            match &result {
                Ok(_) => rec.ok(),
                Err(e) => rec.error(e.code(), &e.to_string()),
            }
            if let Err(e) = shared.store.audit(rec) {
                tracing::error!(error = %e, "audit write failed; call refused");
                // A full disk is a tool error the agent can read (and retry
                // later); no data either way.
                if e.code() == "no_space" {
                    return Ok(tools::failure(e.code(), &e.to_string(), None).into());
                }
                return Err(audit_unavailable(&e));
            }
        }
        match result {
            Ok(value) => Ok(tools::success(value).into()),
            Err(err) => {
                tracing::debug!(agent = %id.agent, conn = id.conn, tool = %name, error = %err, "call failed");
                Ok(tools::failure(err.code(), &err.to_string(), None).into())
            }
        }
    }
}

impl Session {
    /// A `call` record naming who called (this session's identity), which
    /// tool, and under which policy.
    fn call_record(&self, tool: Option<&str>, policy: &Policy) -> Record {
        let id = &self.id;
        let mut rec = Record::new("call");
        rec.agent = Some(id.agent.to_string());
        rec.role = Some(id.role.to_string());
        rec.uid = Some(id.uid);
        rec.pid = id.pid;
        if let Some(t) = tool {
            rec.set_tool(t);
        }
        rec.policy_sha256 = Some(policy.hash.clone());
        rec
    }

    /// Records a `tools/call` refused before it could be decided (malformed
    /// params, a protocol version this session does not speak, a reused id)
    /// and returns the error to answer it with, or, when the record cannot
    /// be written, the error that says so.
    pub fn refused_call(&self, tool: Option<&str>, error: ErrorData) -> ErrorData {
        let policy = self.shared.policy.load();
        // It counts against the role's call rate like any other call.
        if let Some(b) = policy
            .role(&self.id.role)
            .and_then(|r| r.limits.calls_per_minute.as_ref())
        {
            self.guard.calls.try_acquire(b.max);
        }
        if !self.guard.admit(tool.unwrap_or("tools/call")) {
            return error;
        }
        let mut rec = self.call_record(tool, &policy);
        rec.decision = Some("invalid".into());
        rec.error(&error.code.0.to_string(), &error.message);
        match self.shared.store.audit(rec) {
            Ok(()) => error,
            Err(e) => {
                tracing::error!(error = %e, "audit write failed; call refused");
                audit_unavailable(&e)
            }
        }
    }
}

/// The JSON-RPC error of a call refused because its record could not be
/// written; `data.code` says why (`no_space`: the disk is full).
fn audit_unavailable(e: &crate::store::StoreError) -> ErrorData {
    let data = serde_json::json!({ "code": e.code() });
    ErrorData::new(codes::AUDIT_UNAVAILABLE, e.to_string(), Some(data))
}

/// Finishes the record of a call that ends before the store, then answers.
struct Audit<'a> {
    store: &'a Store,
    guard: &'a AgentGuard,
    started: Instant,
}

impl Audit<'_> {
    /// Every call refused here is a refusal: recorded (and logged) on its own
    /// within the agent's budget, counted into its summary past it.
    fn write(&self, mut rec: Record, code: &str, message: &str) -> Result<(), ErrorData> {
        if !self
            .guard
            .admit(rec.tool.as_deref().unwrap_or("tools/call"))
        {
            return Ok(());
        }
        if let Some(r) = &rec.rule {
            tracing::info!(agent = ?rec.agent, role = ?rec.role, tool = ?rec.tool, rule = %r.text, "denied: {}", audit::clip(message, audit::MAX_MESSAGE_BYTES));
        }
        rec.latency_us = Some(self.started.elapsed().as_micros() as u64);
        rec.error(code, message);
        self.store.audit(rec).map_err(|e| {
            tracing::error!(error = %e, "audit write failed; call refused");
            audit_unavailable(&e)
        })
    }

    /// A JSON-RPC error reply.
    fn refuse(
        &self,
        rec: Record,
        code: ErrorCode,
        message: String,
        data: Option<serde_json::Value>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.write(rec, &code.0.to_string(), &message)?;
        Err(ErrorData::new(code, message, data))
    }

    /// A tool error the agent can read.
    fn tool_error(
        &self,
        rec: Record,
        code: &str,
        message: String,
        rule: Option<serde_json::Value>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.write(rec, code, &message)?;
        Ok(tools::failure(code, &message, rule).into())
    }
}
