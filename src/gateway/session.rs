//! One MCP session: the rmcp handler for one accepted connection. Its identity
//! is fixed at accept from the socket and the peer's credentials; nothing the
//! client sends can change it.

use std::borrow::Cow;
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, ErrorCode, Implementation, ListToolsResult,
    PaginatedRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tools::{self, ToolLimits, TOOL_NAMES};
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
}

/// JSON-RPC "server error" range: the call was not run.
const UNAVAILABLE: ErrorCode = ErrorCode(-32000);

impl ServerHandler for Session {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("cordon", env!("CARGO_PKG_VERSION")))
            .with_protocol_version(ProtocolVersion::V_2025_11_25)
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        Cow::Borrowed(ProtocolVersion::known_up_to(&ProtocolVersion::V_2025_11_25))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(
            self.shared.tools.as_ref().clone(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let shared = &self.shared;
        if shared.shutdown.is_cancelled() {
            return Err(ErrorData::new(
                UNAVAILABLE,
                "gateway is shutting down",
                None,
            ));
        }
        let name = request.name.as_ref();
        if !TOOL_NAMES.contains(&name) {
            return Err(ErrorData::invalid_params(
                format!("unknown tool: {name}"),
                None,
            ));
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
        let args = request.arguments.unwrap_or_default();
        let result = shared
            .calls
            .track_future(tools::call(&shared.store, &shared.limits, name, args, stop))
            .await;
        match result {
            Ok(value) => {
                tracing::debug!(agent = %self.id.agent, conn = self.id.conn, tool = name, "call ok");
                Ok(tools::success(value).into())
            }
            Err(err) => {
                tracing::debug!(agent = %self.id.agent, conn = self.id.conn, tool = name, error = %err, "call failed");
                Ok(tools::failure(&err).into())
            }
        }
    }
}
