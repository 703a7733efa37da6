//! One accepted connection: its reader, rmcp's session, and the fast path.
//!
//! The connection's own task reads every line. Once rmcp has answered
//! `initialize`, a `tools/call` of a store tool is answered here directly:
//! parsed once into rmcp's own `CallToolRequestParams`, decided, run and
//! audited by the same `Session::call` that rmcp's dispatch uses, and its
//! reply serialised as the same rmcp message. Everything else (the handshake,
//! `tools/list`, `ping`, notifications, `kv_watch` with its cancellation, and
//! any call that arrives before the handshake is done) goes to rmcp through a
//! channel, exactly as before.
//!
//! Why: rmcp spawns a task per request and routes its reply back through its
//! service loop, three thread hand-offs per call that cost more than the call
//! (see BENCHMARKS.md). Reads run inline in the reader (LMDB reads never wait);
//! writes, which wait for their group commit, get a task each so that calls
//! pipelined on one connection still share a commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, ClientRequest, JsonRpcMessage, JsonRpcVersion2_0, RequestId,
    ServerJsonRpcMessage, ServerResult,
};
use rmcp::service::RxJsonRpcMessage;
use rmcp::{RoleServer, ServiceExt};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::session::Session;
use super::transport::{self, ChannelTransport, Incoming, Writer};
use super::HANDSHAKE_TIMEOUT;

/// A `tools/call` request, parsed straight into rmcp's params type (so its
/// validation is rmcp's); a line this does not fit goes to rmcp.
#[derive(Deserialize)]
struct ToolCall {
    #[allow(dead_code)] // checked by deserialising: "2.0" only
    jsonrpc: JsonRpcVersion2_0,
    id: RequestId,
    method: String,
    params: CallToolRequestParams,
}

/// How a fast-path call runs.
enum Lane {
    /// Answered in the reader: the store never makes it wait.
    Inline,
    /// Waits for a commit: its own task, so the reader goes on.
    Task,
}

fn lane(tool: &str) -> Option<Lane> {
    match tool {
        "kv_get" | "kv_list" | "kv_scan" => Some(Lane::Inline),
        "kv_put" | "kv_delete" | "kv_txn" => Some(Lane::Task),
        // kv_watch waits and is cancellable by notifications/cancelled, which
        // rmcp tracks per request; unknown tools get rmcp's answer.
        _ => None,
    }
}

/// The line as a store tool call the fast path answers, and how; None for
/// anything rmcp should see.
fn fast_call(line: &[u8]) -> Option<(ToolCall, Lane)> {
    let call = serde_json::from_slice::<ToolCall>(line).ok()?;
    if call.method != "tools/call" {
        return None;
    }
    let lane = lane(&call.params.name)?;
    Some((call, lane))
}

pub async fn serve(session: Session, stream: UnixStream, token: CancellationToken, max: usize) {
    let agent = session.id.agent.clone();
    let conn = session.id.conn;
    let (mut reader, writer) = transport::split(stream, max);
    let ready = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<RxJsonRpcMessage<RoleServer>>(16);
    let rmcp_transport = ChannelTransport {
        rx,
        writer: writer.clone(),
        ready: ready.clone(),
    };
    // rmcp's session ends the connection when it ends (a failed or timed-out
    // handshake, the token).
    let rmcp_done = CancellationToken::new();
    let rmcp = {
        let session = session.clone();
        let token = token.clone();
        let done = rmcp_done.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            let _done = done.drop_guard();
            let handshake = tokio::select! {
                r = tokio::time::timeout(HANDSHAKE_TIMEOUT, session.serve_with_ct(rmcp_transport, token.clone())) => r,
                _ = token.cancelled() => return,
            };
            match handshake {
                Ok(Ok(running)) => {
                    let reason = running.waiting().await;
                    tracing::debug!(agent = %agent, conn, ?reason, "session closed");
                }
                Ok(Err(e)) => {
                    tracing::info!(agent = %agent, conn, error = %e, "session ended before initialize");
                }
                Err(_) => {
                    tracing::info!(agent = %agent, conn, "session closed: no initialize within {HANDSHAKE_TIMEOUT:?}");
                }
            }
        })
    };

    let calls = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            _ = rmcp_done.cancelled() => break,
            i = reader.next() => i,
        };
        let line = match incoming {
            None => break,
            Some(Incoming::Oversized) => {
                tracing::warn!(limit = reader.max, "oversized message refused");
                let message = format!("message too large: the limit is {} bytes", reader.max);
                transport::write_error(&writer, Value::Null, -32600, message).await;
                continue;
            }
            Some(Incoming::Line(line)) => line,
        };
        let fast = session.shared.fast_path && ready.load(Ordering::Acquire);
        if let Some((call, lane)) = fast.then(|| fast_call(&line)).flatten() {
            match lane {
                Lane::Inline => answer(&session, &writer, call, &token).await,
                Lane::Task => {
                    let (session, writer, token) = (session.clone(), writer.clone(), token.clone());
                    calls.spawn(async move { answer(&session, &writer, call, &token).await });
                }
            }
            continue;
        }
        if !to_rmcp(&line, &writer, &tx).await {
            break;
        }
    }
    // No more requests: rmcp's loop ends when its channel closes. Calls in
    // flight still answer (a client may half-close and wait for its replies),
    // unless the session is being closed.
    drop(tx);
    calls.close();
    tokio::select! {
        _ = calls.wait() => {}
        _ = token.cancelled() => {}
    }
    let _ = rmcp.await;
    let last = writer.lock().await.take();
    if let Some(mut w) = last {
        let _ = w.shutdown().await;
    }
}

/// Runs one call on the fast path and writes its reply.
async fn answer(session: &Session, writer: &Writer, call: ToolCall, token: &CancellationToken) {
    let reply = match session.call(call.params, token.clone()).await {
        Ok(response) => {
            let mut result = ServerResult::from(response);
            // What rmcp's handler does for every peer of a protocol version
            // before 2026-07-28, which are all the gateway negotiates.
            result.strip_result_type_for_legacy_peer();
            result.strip_non_object_output_for_legacy_peer();
            ServerJsonRpcMessage::response(result, call.id)
        }
        Err(error) => ServerJsonRpcMessage::error(error, Some(call.id)),
    };
    match serde_json::to_vec(&reply) {
        Ok(line) => {
            if let Err(e) = transport::write_line(writer, line).await {
                tracing::debug!(error = %e, "reply not delivered");
            }
        }
        Err(e) => tracing::error!(error = %e, "reply not serialisable"),
    }
}

/// Hands a line to rmcp, or answers what rmcp must not see. False when rmcp's
/// session is gone.
async fn to_rmcp(
    line: &[u8],
    writer: &Writer,
    tx: &mpsc::Sender<RxJsonRpcMessage<RoleServer>>,
) -> bool {
    match serde_json::from_slice::<RxJsonRpcMessage<RoleServer>>(line) {
        Ok(JsonRpcMessage::Request(req))
            if matches!(
                req.request,
                ClientRequest::DiscoverRequest(_) | ClientRequest::CustomRequest(_)
            ) =>
        {
            let method = req.request.method().to_string();
            let id = serde_json::to_value(&req.id).unwrap_or(Value::Null);
            let message = format!("Method not found: {method}");
            transport::write_error(writer, id, -32601, message).await;
            true
        }
        Ok(msg) => tx.send(msg).await.is_ok(),
        Err(e) if e.is_syntax() || e.is_eof() => {
            let message = format!("Parse error: {e}");
            transport::write_error(writer, Value::Null, -32700, message).await;
            true
        }
        Err(e) => {
            let message = format!("Invalid Request: {e}");
            transport::write_error(writer, transport::usable_id(line), -32600, message).await;
            true
        }
    }
}
