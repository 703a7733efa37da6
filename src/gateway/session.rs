//! One MCP session: the rmcp handler for one accepted connection. Its identity
//! is fixed at accept from the socket and the peer's credentials; nothing the
//! client sends can change it.

use std::borrow::Cow;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, ErrorCode, Implementation, ListToolsResult,
    PaginatedRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::request::Request;
use super::tools::{self, ToolError, ToolLimits};
use crate::policy::{Bound, Policy, RateLimiter, GATEWAY_TOOLS};
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
    pub tools: Arc<Vec<Tool>>,
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
}

pub struct Session {
    pub id: Identity,
    pub shared: Arc<Shared>,
    pub inflight: Arc<Semaphore>,
    /// Shared by every connection of this agent.
    pub rate: Arc<RateLimiter>,
}

/// JSON-RPC "server error" range: the call was not run.
const UNAVAILABLE: ErrorCode = ErrorCode(-32000);
/// The role may not call this tool.
const DENIED: ErrorCode = ErrorCode(-32001);

fn narrow(gateway: u64, role: &Option<Bound>) -> u64 {
    role.as_ref().map_or(gateway, |b| b.max.min(gateway))
}

impl ServerHandler for Session {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("cordon", env!("CARGO_PKG_VERSION")))
            .with_protocol_version(ProtocolVersion::V_2025_11_25)
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(ProtocolVersion::known_up_to(&ProtocolVersion::V_2025_11_25))
    }

    /// Only the tools the role may call.
    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let policy = self.shared.policy.load();
        let tools = match policy.role(&self.id.role) {
            Some(role) => self
                .shared
                .tools
                .iter()
                .filter(|t| role.tool_allowed(&t.name))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let shared = &self.shared;
        let id = &self.id;
        if shared.shutdown.is_cancelled() {
            return Err(ErrorData::new(
                UNAVAILABLE,
                "gateway is shutting down",
                None,
            ));
        }
        let name = request.name.as_ref();
        if !GATEWAY_TOOLS.contains(&name) {
            return Err(ErrorData::invalid_params(
                format!("unknown tool: {name}"),
                None,
            ));
        }
        let policy = shared.policy.load_full();
        let Some(role) = policy.role(&id.role) else {
            // Load and reload refuse a policy that lacks a configured agent's
            // role, so this cannot happen; refuse rather than serve.
            return Err(ErrorData::new(
                DENIED,
                format!("denied by policy: role {} is not in the policy", id.role),
                None,
            ));
        };
        // The tool first: a role that may not call it learns nothing more, and
        // its arguments are never looked at.
        if let Some(decision) = role.tool(name).filter(|d| !d.allowed) {
            tracing::info!(agent = %id.agent, role = %id.role, tool = name, rule = %decision.rule, "denied: tool");
            return Err(ErrorData::new(
                DENIED,
                format!(
                    "denied by policy: role {} may not call {name} ({})",
                    id.role, decision.rule
                ),
                Some(serde_json::json!({"rule": decision.rule.to_json()})),
            ));
        }
        if let Some(bound) = &role.limits.calls_per_minute {
            if !self.rate.try_acquire(bound.max) {
                let message = format!(
                    "rate limited: agent {} may make {} calls per minute ({})",
                    id.agent, bound.max, bound.rule
                );
                return Ok(
                    tools::failure("rate_limited", &message, Some(bound.rule.to_json())).into(),
                );
            }
        }
        let Ok(_permit) = self.inflight.try_acquire() else {
            return Err(ErrorData::new(
                UNAVAILABLE,
                format!(
                    "too many concurrent calls on this connection (limit {})",
                    shared.max_calls_per_connection
                ),
                None,
            ));
        };
        let parsed = match Request::parse(name, request.arguments.unwrap_or_default()) {
            Ok(r) => r,
            Err(e) => {
                let e = ToolError::from(e);
                return Ok(tools::failure(e.code(), &e.to_string(), None).into());
            }
        };
        if let Err(denial) = role.check(&parsed, &policy.default_deny) {
            tracing::info!(agent = %id.agent, role = %id.role, tool = name, rule = %denial.rule, "denied: {}", denial.message);
            let message = format!("{} ({})", denial.message, denial.rule);
            return Ok(
                tools::failure(denial.kind.code(), &message, Some(denial.rule.to_json())).into(),
            );
        }
        let limits = ToolLimits {
            max_list_limit: narrow(shared.limits.max_list_limit, &role.limits.max_scan_items),
            max_watch_ms: narrow(shared.limits.max_watch_ms, &role.limits.max_watch_ms),
            max_reply_bytes: shared.limits.max_reply_bytes,
        };
        let stop = {
            let shutdown = shared.shutdown.clone();
            let cancelled = context.ct.clone();
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = cancelled.cancelled() => {}
                }
            }
        };
        let visible = |key: &str| role.can_read(key);
        let result = shared
            .calls
            .track_future(tools::execute(
                &shared.store,
                &limits,
                parsed,
                &visible,
                stop,
            ))
            .await;
        match result {
            Ok(value) => {
                tracing::debug!(agent = %id.agent, conn = id.conn, tool = name, "call ok");
                Ok(tools::success(value).into())
            }
            Err(err) => {
                tracing::debug!(agent = %id.agent, conn = id.conn, tool = name, error = %err, "call failed");
                Ok(tools::failure(err.code(), &err.to_string(), None).into())
            }
        }
    }
}
