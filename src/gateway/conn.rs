//! One accepted connection and its dispatcher: every JSON-RPC line is parsed
//! once (an envelope that borrows the line, then the params into rmcp's model
//! types) and handled by one exhaustive match on its method. There is no
//! second service loop: the handshake, discovery, listing, calls, watches,
//! their cancellation and progress, and list-changed notifications are all
//! answered here.
//!
//! Both protocol eras are served on one connection, as the spec allows:
//! - 2025-11-25 and older: `initialize` negotiates a version, then requests
//!   are served under it.
//! - 2026-07-28: no handshake; every request carries its version and the
//!   client's capabilities in `params._meta`, and is served on its own.
//!   `server/discover` answers at any time.
//!
//! Identity is the socket's, fixed at accept (`Session::id`); nothing in
//! `clientInfo` or `_meta` changes it.
//!
//! Reads run inline in the reader (LMDB reads never wait). Writes, which wait
//! for their group commit, and watches get a task each, so calls pipelined on
//! one connection still share a commit (BENCHMARKS.md: a thread hand-off per
//! call costs more than the call).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, ErrorCode, ErrorData, InitializeRequestParams,
    PaginatedRequestParams, RequestMetaObject, ServerResult,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::id::{self, Id};
use super::session::Session;
use super::transport::{self, Incoming, Writer};
use super::HANDSHAKE_TIMEOUT;
use crate::call::Tool;

/// The stateless revision: no handshake, `_meta` on every request.
pub const STATELESS: &str = "2026-07-28";
/// Every version the gateway serves, newest first (what `server/discover`
/// lists and a -32022 names).
pub const SUPPORTED: [&str; 5] = [
    STATELESS,
    "2025-11-25",
    "2025-06-18",
    "2025-03-26",
    "2024-11-05",
];
/// Versions `initialize` can agree to; any other request gets the newest.
const HANDSHAKE: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
/// The only revision whose servers must accept JSON-RPC batches (added in
/// 2025-03-26, removed in 2025-06-18).
const BATCHES: &str = "2025-03-26";
/// How long a 2026-07-28 client may cache `server/discover` and `tools/list`.
/// A reload shows within this; a revoked tool is refused meanwhile anyway.
pub const TTL_MS: u64 = 60_000;
/// A batch may hold at most as many messages as calls one connection may
/// have in flight.
const MAX_BATCH: usize = 64;
/// When the session is closed under them, how long ended calls get to send
/// their replies (shutdown gives sessions 3 s in all).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// A closing session answers what its peer sends until the peer has been
/// quiet this long (the peer is expected to stop on the first -32013)...
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// ...or this long at most (shutdown gives sessions 3 s in all).
const DRAIN_MAX: Duration = Duration::from_millis(1500);

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
const META_SUBSCRIPTION: &str = "io.modelcontextprotocol/subscriptionId";
/// Open `subscriptions/listen` streams per connection.
const MAX_SUBSCRIPTIONS: usize = 8;

/// One JSON-RPC message as it arrives: the envelope is parsed, `params` is
/// kept as raw bytes until the method says what type they are.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    jsonrpc: Option<Cow<'a, str>>,
    /// `Some("null")` is an explicit `"id": null` (invalid for a request).
    /// Raw: an id is echoed exactly, whatever its size (see `id`).
    #[serde(borrow, default, deserialize_with = "id::present_raw")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CancelledParams {
    request_id: Id,
}

/// Under which protocol one request is answered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Era {
    /// Negotiated by `initialize`: results have no `resultType`.
    Legacy(&'static str),
    /// 2026-07-28, from the request's own `_meta`.
    Stateless,
}

/// What handling one message produced.
enum Reply {
    None,
    Now(Vec<u8>),
    /// Answered in the reader: the store never makes it wait.
    Inline(BoxFuture<'static, Option<Vec<u8>>>),
    /// Waits (a commit, a watch): its own task, so the reader goes on. The
    /// number is how many of the connection's reply slots it holds until
    /// its reply is written: 0 for a watch, which may wait for minutes and
    /// is bounded by the calls in flight instead.
    Task(BoxFuture<'static, Option<Vec<u8>>>, usize),
}

/// Calls in flight that a `notifications/cancelled` may end, by request id.
type Pending = Arc<Mutex<HashMap<Id, Cancel>>>;

/// Ends a waiting call. `by_client` tells a client's cancellation (no reply,
/// as the spec says) from the session closing (the reply is still sent).
#[derive(Clone, Default)]
struct Cancel {
    token: CancellationToken,
    by_client: Arc<AtomicBool>,
}

struct Conn {
    session: Session,
    writer: Writer,
    /// Set by `initialize`.
    legacy: Option<&'static str>,
    /// `notifications/initialized` arrived: server notifications may go out.
    initialized: bool,
    /// A 2026-07-28 request was served.
    stateless: bool,
    pending: Pending,
    /// The tools this connection was last shown (or would be): a reload that
    /// changes them sends `notifications/tools/list_changed`.
    advertised: Vec<&'static str>,
    /// Open 2026-07-28 `subscriptions/listen` requests that accepted
    /// `toolsListChanged`, by request id.
    subscriptions: Vec<Id>,
    /// The messages being handled are the items of a batch (2025-03-26).
    in_batch: bool,
}

pub async fn serve(session: Session, stream: UnixStream, token: CancellationToken, max: usize) {
    let agent = session.id.agent.clone();
    let conn_id = session.id.conn;
    let flow = session.shared.flow;
    let (mut reader, writer) = transport::split(stream, max, flow.max_unsent_bytes);
    let mut policy_changes = session.shared.policy_changes.subscribe();
    let mut conn = Conn {
        advertised: session.allowed_tools(),
        session,
        writer,
        legacy: None,
        initialized: false,
        stateless: false,
        subscriptions: Vec::new(),
        pending: Arc::default(),
        in_batch: false,
    };
    let calls = TaskTracker::new();
    // Replies being produced or waiting to be written, counted in messages:
    // when none is left the reader stops reading (backpressure).
    let slots = Arc::new(Semaphore::new(flow.max_pending));
    // A connection must make itself useful (initialize, or a 2026-07-28
    // request) within this, or it is dropped: it holds one of the agent's
    // connection slots.
    let handshake = tokio::time::sleep(HANDSHAKE_TIMEOUT);
    tokio::pin!(handshake);
    let mut established = false;
    let mut watching_policy = true;
    loop {
        // Every wait of one step (for a line, a token of the agent's rate, a
        // reply slot, a peer that does not read) ends when the session does.
        let step = {
            let step = conn.step(
                &mut reader,
                &mut policy_changes,
                &mut watching_policy,
                &slots,
                &calls,
                &token,
            );
            tokio::pin!(step);
            tokio::select! {
                biased;
                _ = token.cancelled() => {
                    // A message already read is still answered (a step waiting
                    // for the next line ends at once); one stuck on a peer that
                    // does not read gets a bound.
                    let _ = tokio::time::timeout(FLUSH_TIMEOUT, &mut step).await;
                    break;
                }
                _ = &mut handshake, if !established => {
                    tracing::info!(agent = %agent, conn = conn_id, "session closed: no initialize or 2026-07-28 request within {HANDSHAKE_TIMEOUT:?}");
                    break;
                }
                s = &mut step => s,
            }
        };
        if !step {
            break;
        }
        established |= conn.legacy.is_some() || conn.stateless;
    }
    // The session is being closed (the agent stopped, shutdown): end what
    // waits, and answer what the peer already sent. On a plain end of
    // stream, calls in flight still answer (a client may half-close and
    // wait for its replies) unless the peer closed entirely.
    let closing = token.is_cancelled();
    if closing {
        conn.cancel_all();
        conn.drain(&mut reader).await;
    }
    calls.close();
    tokio::select! {
        _ = calls.wait() => {}
        _ = reader.hung_up(), if !closing => {
            // Nobody to answer: waiting calls (watches) end now, and with
            // them the connection's slot. Writes still commit and finish.
            tracing::debug!(agent = %agent, conn = conn_id, "peer closed the connection: ending its waiting calls");
            conn.cancel_all();
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, calls.wait()).await;
        }
        _ = token.cancelled() => {
            // Waiting calls end at once; their replies still go out.
            conn.cancel_all();
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, calls.wait()).await;
        }
    }
    let last = conn.writer.take().await;
    if let Some(mut w) = last {
        let _ = w.shutdown().await;
    }
    tracing::debug!(agent = %agent, conn = conn_id, "session closed");
}

async fn write(writer: &Writer, line: Vec<u8>) {
    if let Err(e) = transport::write_line(writer, line).await {
        tracing::debug!(error = %e, "reply not delivered");
    }
}

impl Conn {
    async fn write(&self, line: Vec<u8>) {
        write(&self.writer, line).await;
    }

    /// Reads one message and answers it (or hands it to a task); false at
    /// the end of the stream.
    async fn step(
        &mut self,
        reader: &mut transport::LineReader,
        policy_changes: &mut tokio::sync::watch::Receiver<u64>,
        watching_policy: &mut bool,
        slots: &Arc<Semaphore>,
        calls: &TaskTracker,
        token: &CancellationToken,
    ) -> bool {
        let writer = self.writer.clone();
        let incoming = tokio::select! {
            biased;
            // Nothing new is taken once the session closes (`drain` answers it).
            _ = token.cancelled() => return false,
            changed = policy_changes.changed(), if *watching_policy => {
                match changed {
                    Ok(()) => self.policy_changed().await,
                    Err(_) => *watching_policy = false,
                }
                return true;
            }
            // Nothing more is read while the peer leaves too much unread.
            i = async { writer.drained().await; reader.next().await } => i,
        };
        let line = match incoming {
            None => return false,
            Some(Incoming::Oversized) => {
                tracing::warn!(limit = reader.max, "oversized message refused");
                self.throttle().await;
                let message = format!("message too large: the limit is {} bytes", reader.max);
                self.write(error_line(None, ErrorCode::INVALID_REQUEST, &message, None))
                    .await;
                return true;
            }
            Some(Incoming::Line(line)) => line,
        };
        self.throttle().await;
        let reply = if line.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            self.batch(&line)
        } else {
            self.one(&line)
        };
        drop(line);
        match reply {
            Reply::None => {}
            Reply::Now(line) => self.write(line).await,
            Reply::Inline(fut) => {
                if let Some(line) = fut.await {
                    self.write(line).await;
                }
            }
            Reply::Task(fut, weight) => {
                // Held until the reply is written: a peer that stops reading
                // stops this reader after `max_pending` replies.
                let weight = u32::try_from(weight.min(self.session.shared.flow.max_pending))
                    .unwrap_or(u32::MAX);
                let Ok(permit) = slots.clone().acquire_many_owned(weight).await else {
                    return false;
                };
                calls.spawn(async move {
                    if let Some(line) = fut.await {
                        write(&writer, line).await;
                    }
                    drop(permit);
                });
            }
        }
        true
    }

    /// The session is closing: every request the peer already sent (or
    /// sends while it is told) gets the retryable -32013, until it has been
    /// quiet for `DRAIN_QUIET`, ends its stream, or `DRAIN_MAX` is up. A
    /// client that stops sending when it sees the error therefore has every
    /// request answered; nothing is run.
    async fn drain(&mut self, reader: &mut transport::LineReader) {
        let message = if self.session.shared.shutdown.is_cancelled() {
            "gateway is shutting down: retry when it is back"
        } else {
            "session closed: the agent's run ended"
        };
        let _ = tokio::time::timeout(DRAIN_MAX, async {
            loop {
                let line = match tokio::time::timeout(DRAIN_QUIET, reader.next()).await {
                    Err(_) | Ok(None) => return,
                    Ok(Some(Incoming::Oversized)) => None,
                    Ok(Some(Incoming::Line(line))) => Some(line),
                };
                let e = ErrorData::new(super::codes::SHUTTING_DOWN, message, None);
                let reply = match line.as_deref().map(serde_json::from_slice::<Envelope>) {
                    // Answered if it is a request (not a notification or a
                    // response); a tools/call is recorded either way.
                    Some(Ok(env)) => {
                        let id = env.id.and_then(Id::parse);
                        let method = env.method.as_deref();
                        let reply = self.invalid(id.as_ref(), method, env.params, e);
                        (env.id.is_some() && method.is_some()).then_some(reply)
                    }
                    // A batch, a line that does not parse, an oversized one.
                    Some(Err(_)) | None => {
                        let id = line.as_deref().and_then(id::scan);
                        Some(error_line(id.as_ref(), e.code, &e.message, None))
                    }
                };
                if let Some(reply) = reply {
                    self.write(reply).await;
                }
            }
        })
        .await;
    }

    /// Every message takes a token of the agent's message rate; past it, the
    /// reader waits before handling it (and reads nothing meanwhile).
    async fn throttle(&self) {
        if let Some(wait) = self.session.guard.message() {
            tokio::time::sleep(wait).await;
        }
    }

    fn cancel_all(&self) {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for c in pending.values() {
            c.token.cancel();
        }
    }

    /// A reload swapped the policy: tell an initialized legacy session if
    /// its tools changed. (A 2026-07-28 client re-lists within `TTL_MS`.)
    async fn policy_changed(&mut self) {
        let now = self.session.allowed_tools();
        if now != self.advertised {
            self.advertised = now;
            if self.legacy.is_some() && self.initialized {
                tracing::info!(agent = %self.session.id.agent, conn = self.session.id.conn, "tools changed by a reload: notifying");
                let line = br#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#;
                self.write(line.to_vec()).await;
            }
            for id in &self.subscriptions {
                let note = format!(
                    r#"{{"jsonrpc":"2.0","method":"notifications/tools/list_changed","params":{{"_meta":{}}}}}"#,
                    subscription_meta(id)
                );
                write(&self.writer, note.into_bytes()).await;
            }
        }
    }

    /// A single message.
    fn one(&mut self, line: &[u8]) -> Reply {
        match serde_json::from_slice::<Envelope>(line) {
            Ok(env) => self.handle(env),
            Err(e) => Reply::Now(self.unparsed(line, &e)),
        }
    }

    /// The error for a message refused before its method ran; a `tools/call`
    /// among them is recorded like any refused call (SECURITY.md: every
    /// tools/call has a record, within the agent's refusal budget).
    fn invalid(
        &self,
        id: Option<&Id>,
        method: Option<&str>,
        params: Option<&RawValue>,
        e: ErrorData,
    ) -> Vec<u8> {
        let e = if method == Some("tools/call") {
            self.session.refused_call(tool_name(params).as_deref(), e)
        } else {
            e
        };
        error_line(id, e.code, &e.message, e.data.as_ref())
    }

    /// The reply to a line that is not a JSON-RPC message: a parse error, or
    /// an invalid request, answered with its id whenever the id can be read
    /// (`id::scan` reads it past a syntax error or nesting too deep). A line
    /// that names `tools/call` is recorded as a refused call: it cannot be
    /// parsed to tell, and a record too many is the safe side.
    fn unparsed(&self, line: &[u8], e: &serde_json::Error) -> Vec<u8> {
        let id = id::scan(line);
        let e = if e.is_syntax() || e.is_eof() {
            ErrorData::new(ErrorCode::PARSE_ERROR, format!("Parse error: {e}"), None)
        } else {
            ErrorData::new(
                ErrorCode::INVALID_REQUEST,
                format!("Invalid Request: {e}"),
                None,
            )
        };
        let e = if names_call(line) {
            self.session.refused_call(None, e)
        } else {
            e
        };
        error_line(id.as_ref(), e.code, &e.message, e.data.as_ref())
    }

    /// A batch refused whole: each `tools/call` in it gets its record.
    fn refuse_batch(&self, items: &[&RawValue], e: ErrorData) -> Reply {
        for item in items {
            if let Ok(env) = serde_json::from_str::<Envelope>(item.get()) {
                if env.method.as_deref() == Some("tools/call") {
                    self.session
                        .refused_call(tool_name(env.params).as_deref(), e.clone());
                }
            }
        }
        Reply::Now(error_line(None, e.code, &e.message, e.data.as_ref()))
    }

    /// A JSON-RPC batch: served only under 2025-03-26, answered as one array.
    fn batch(&mut self, line: &[u8]) -> Reply {
        let items = match serde_json::from_slice::<Vec<&RawValue>>(line) {
            Ok(items) => items,
            Err(e) => return Reply::Now(self.unparsed(line, &e)),
        };
        if self.legacy != Some(BATCHES) {
            let message = format!(
                "Invalid Request: JSON-RPC batches are accepted only in protocol {BATCHES} (this session: {})",
                self.legacy.unwrap_or("not initialized")
            );
            let e = ErrorData::new(ErrorCode::INVALID_REQUEST, message, None);
            return self.refuse_batch(&items, e);
        }
        if items.is_empty() || items.len() > MAX_BATCH {
            let message = format!(
                "Invalid Request: a batch holds 1 to {MAX_BATCH} messages, not {}",
                items.len()
            );
            let e = ErrorData::new(ErrorCode::INVALID_REQUEST, message, None);
            return self.refuse_batch(&items, e);
        }
        let mut now = Vec::new();
        let mut later = Vec::new();
        self.in_batch = true;
        for item in items {
            // A request is an object: serde would also read a struct from
            // a positional array, which JSON-RPC does not allow.
            if !item.get().starts_with('{') {
                now.push(error_line(
                    None,
                    ErrorCode::INVALID_REQUEST,
                    "Invalid Request: a batch item must be a JSON-RPC object",
                    None,
                ));
                continue;
            }
            match self.one(item.get().as_bytes()) {
                Reply::None => {}
                Reply::Now(line) => now.push(line),
                Reply::Inline(fut) | Reply::Task(fut, _) => later.push(fut),
            }
        }
        self.in_batch = false;
        if now.is_empty() && later.is_empty() {
            return Reply::None;
        }
        let weight = later.len().max(1);
        Reply::Task(
            async move {
                let done = futures::future::join_all(later).await;
                let lines: Vec<Vec<u8>> =
                    now.into_iter().chain(done.into_iter().flatten()).collect();
                if lines.is_empty() {
                    return None;
                }
                let mut out =
                    Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>() + 2);
                out.push(b'[');
                for (i, l) in lines.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(l);
                }
                out.push(b']');
                Some(out)
            }
            .boxed(),
            weight,
        )
    }

    fn handle(&mut self, env: Envelope<'_>) -> Reply {
        let id = match env.id {
            None => None,
            Some(raw) => match Id::parse(raw) {
                Some(id) => Some(id),
                None => {
                    let shown: String = raw.get().chars().take(64).collect();
                    let message =
                        format!("Invalid Request: id must be a string or an integer, not {shown}");
                    let e = ErrorData::new(ErrorCode::INVALID_REQUEST, message, None);
                    return Reply::Now(self.invalid(None, env.method.as_deref(), env.params, e));
                }
            },
        };
        if env.jsonrpc.as_deref() != Some("2.0") {
            let e = ErrorData::new(
                ErrorCode::INVALID_REQUEST,
                "Invalid Request: jsonrpc must be \"2.0\"",
                None,
            );
            return Reply::Now(self.invalid(id.as_ref(), env.method.as_deref(), env.params, e));
        }
        let Some(method) = env.method.as_deref() else {
            if id.is_some() && (env.result.is_some() || env.error.is_some()) {
                // A response to a request we sent: the gateway sends none,
                // so there is nothing to match it with.
                return Reply::None;
            }
            return Reply::Now(error_line(
                id.as_ref(),
                ErrorCode::INVALID_REQUEST,
                "Invalid Request: no method",
                None,
            ));
        };
        let params = env.params;
        let Some(id) = id else {
            // Notifications never get a reply.
            match method {
                "notifications/initialized" => self.initialized = self.legacy.is_some(),
                "notifications/cancelled" => self.cancelled(params),
                // A call sent as a notification is not run (it could not
                // be answered), but it is a tools/call: it has a record.
                "tools/call" => {
                    let e = ErrorData::new(
                        ErrorCode::INVALID_REQUEST,
                        "Invalid Request: tools/call without an id (a notification) is not run",
                        None,
                    );
                    // Recorded; the error line is dropped (no reply).
                    self.invalid(None, Some(method), params, e);
                }
                _ => {}
            }
            return Reply::None;
        };
        let reply = match method {
            // Removed in 2026-07-28: a request that says it speaks that
            // revision gets what a 2026-only server would answer.
            "initialize" | "ping" if names_stateless(params) => Err(ErrorData::new(
                ErrorCode::METHOD_NOT_FOUND,
                format!("Method not found: {method} is not part of protocol {STATELESS}"),
                None,
            )),
            "initialize" => self
                .initialize(params)
                .map(|r| Reply::Now(result_line(&id, &r))),
            "server/discover" => self
                .discover(params)
                .map(|r| Reply::Now(result_line(&id, &r))),
            "ping" => Ok(Reply::Now(result_line(&id, &json!({})))),
            "tools/list" => self.list(&id, params),
            "tools/call" => self.call(&id, params),
            "subscriptions/listen" => self.listen(&id, params),
            other => Err(ErrorData::new(
                ErrorCode::METHOD_NOT_FOUND,
                format!("Method not found: {other}"),
                None,
            )),
        };
        match reply {
            Ok(r) => r,
            Err(e) => Reply::Now(error_line(Some(&id), e.code, &e.message, e.data.as_ref())),
        }
    }

    /// Under which era a request other than initialize/discover is served.
    fn era(&mut self, meta: Option<&RequestMetaObject>) -> Result<Era, ErrorData> {
        let meta = meta.map(|m| &m.0 .0);
        match meta.and_then(|m| m.get(META_VERSION)) {
            Some(Value::String(v)) if v == STATELESS => {
                if self.in_batch {
                    // Batches are 2025-03-26's; a 2026-07-28 request (and its
                    // subscription streams) never rides in one.
                    return Err(ErrorData::new(
                        ErrorCode::INVALID_REQUEST,
                        format!("Invalid Request: a {STATELESS} request cannot be part of a batch"),
                        None,
                    ));
                }
                if !meta.and_then(|m| m.get(META_CAPABILITIES)).is_some_and(Value::is_object) {
                    return Err(missing_meta(&[META_CAPABILITIES]));
                }
                if !self.stateless {
                    // Once per connection: which protocol each agent speaks.
                    tracing::info!(agent = %self.session.id.agent, conn = self.session.id.conn, version = STATELESS, "session: protocol {STATELESS}");
                }
                self.stateless = true;
                Ok(Era::Stateless)
            }
            Some(Value::String(v)) if self.legacy == Some(v.as_str()) => {
                Ok(Era::Legacy(self.legacy.unwrap_or(HANDSHAKE[0])))
            }
            // A version we serve, but not in this session's way.
            Some(Value::String(v)) if HANDSHAKE.contains(&v.as_str()) => {
                Err(ErrorData::invalid_params(
                    match self.legacy {
                        None => format!(
                            "protocol {v} starts with initialize: send it first, or use {STATELESS} _meta"
                        ),
                        Some(have) => format!(
                            "this session negotiated protocol {have} with initialize, not {v}"
                        ),
                    },
                    None,
                ))
            }
            Some(Value::String(v)) => Err(unsupported(v)),
            Some(_) => Err(missing_meta(&[META_VERSION])),
            None => match self.legacy {
                Some(v) => Ok(Era::Legacy(v)),
                None => Err(ErrorData::invalid_params(
                    format!(
                        "request _meta is missing or has malformed required fields: {META_VERSION}, {META_CAPABILITIES} (or send initialize first)"
                    ),
                    None,
                )),
            },
        }
    }

    fn initialize(&mut self, params: Option<&RawValue>) -> Result<Value, ErrorData> {
        if let Some(have) = self.legacy {
            // Once per connection: a second one would switch the session's
            // version (and with it batches) under calls already made.
            return Err(ErrorData::new(
                ErrorCode::INVALID_REQUEST,
                format!("Invalid Request: this session is already initialized (protocol {have})"),
                None,
            ));
        }
        let p: InitializeRequestParams = required_params(params)?;
        let requested = p.protocol_version.as_str();
        let version = HANDSHAKE
            .iter()
            .find(|v| **v == requested)
            .copied()
            .unwrap_or(HANDSHAKE[0]);
        self.legacy = Some(version);
        tracing::info!(agent = %self.session.id.agent, conn = self.session.id.conn, requested, version, client = %p.client_info.name, "session: protocol {version} (initialize)");
        let result = json!({
            "protocolVersion": version,
            "capabilities": capabilities(),
            "serverInfo": server_info(),
            "instructions": self.session.instructions(),
        });
        Ok(result)
    }

    fn discover(&mut self, params: Option<&RawValue>) -> Result<Value, ErrorData> {
        // A 2026-07-28 request like any other: its `_meta` names a version we
        // serve and the client's capabilities (clients that get an error
        // here fall back to `initialize`).
        let p: PaginatedRequestParams = parse_params(params)?;
        let meta = p.meta.as_ref().map(|m| &m.0 .0);
        let version = meta
            .and_then(|m| m.get(META_VERSION))
            .and_then(Value::as_str);
        if let Some(v) = version.filter(|v| !SUPPORTED.contains(v)) {
            return Err(unsupported(v));
        }
        let capabilities_ok = meta
            .and_then(|m| m.get(META_CAPABILITIES))
            .is_some_and(Value::is_object);
        let missing: Vec<&str> = [
            (version.is_none(), META_VERSION),
            (!capabilities_ok, META_CAPABILITIES),
        ]
        .into_iter()
        .filter_map(|(missing, key)| missing.then_some(key))
        .collect();
        if !missing.is_empty() {
            return Err(missing_meta(&missing));
        }
        let result = json!({
            "resultType": "complete",
            "supportedVersions": SUPPORTED,
            "capabilities": capabilities(),
            "instructions": self.session.instructions(),
            "ttlMs": TTL_MS,
            // Per role, so never shared across clients.
            "cacheScope": "private",
            "_meta": {META_SERVER_INFO: server_info()},
        });
        Ok(result)
    }

    fn list(&mut self, id: &Id, params: Option<&RawValue>) -> Result<Reply, ErrorData> {
        let p: PaginatedRequestParams = parse_params(params)?;
        let era = self.era(p.meta.as_ref())?;
        let (names, tools) = self.session.tools_json();
        self.advertised = names;
        let mut out = Vec::with_capacity(tools.len() + 128);
        out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
        out.extend_from_slice(id.json().as_bytes());
        out.extend_from_slice(b",\"result\":{\"tools\":");
        out.extend_from_slice(&tools);
        if era == Era::Stateless {
            out.extend_from_slice(b",\"resultType\":\"complete\",\"ttlMs\":");
            out.extend_from_slice(TTL_MS.to_string().as_bytes());
            out.extend_from_slice(b",\"cacheScope\":\"private\"");
        }
        out.extend_from_slice(b"}}");
        Ok(Reply::Now(out))
    }

    fn call(&mut self, id: &Id, params: Option<&RawValue>) -> Result<Reply, ErrorData> {
        // A call refused before its tool runs is audited like any other
        // (SECURITY.md: every tools/call has a record).
        let p: CallToolRequestParams = match required_params(params) {
            Ok(p) => p,
            Err(e) => return Err(self.session.refused_call(tool_name(params).as_deref(), e)),
        };
        let era = match self.era(p.meta.as_ref()) {
            Ok(era) => era,
            Err(e) => return Err(self.session.refused_call(Some(&p.name), e)),
        };
        if self.in_flight(id) {
            let e = ErrorData::new(
                ErrorCode::INVALID_REQUEST,
                format!("Invalid Request: id {id} is already in use by a request in flight"),
                None,
            );
            return Err(self.session.refused_call(Some(&p.name), e));
        }
        let id = id.clone();
        let session = self.session.clone();
        let lane = Lane::of(&p.name);
        if let Lane::Inline = lane {
            return Ok(Reply::Inline(
                async move {
                    let r = session.call(p, CancellationToken::new()).await;
                    Some(call_line(&id, r, era))
                }
                .boxed(),
            ));
        }
        // Cancellable by the client; a cancelled request gets no reply.
        let cancel = Cancel::default();
        let key = id.clone();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), cancel.clone());
        let pending = self.pending.clone();
        let progress = match lane {
            Lane::Watch => p
                .meta
                .as_ref()
                .and_then(|m| m.0 .0.get("progressToken"))
                .filter(|t| transport::is_id(t))
                .cloned(),
            _ => None,
        };
        let writer = self.writer.clone();
        let every = session.shared.progress_every;
        let weight = match lane {
            Lane::Watch => 0,
            _ => 1,
        };
        Ok(Reply::Task(
            async move {
                let call = session.call(p, cancel.token.clone());
                let r = match progress {
                    None => call.await,
                    Some(token) => with_progress(call, &writer, &token, every).await,
                };
                {
                    // Only this call's entry: a later request may reuse the id.
                    let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
                    if pending
                        .get(&key)
                        .is_some_and(|c| Arc::ptr_eq(&c.by_client, &cancel.by_client))
                    {
                        pending.remove(&key);
                    }
                }
                if cancel.by_client.load(Ordering::Acquire) {
                    return None;
                }
                Some(call_line(&id, r, era))
            }
            .boxed(),
            weight,
        ))
    }

    /// A 2026-07-28 notification stream: acknowledged at once, then open
    /// until the client cancels it or the session ends. Only tool-list
    /// changes are offered (the gateway has no prompts or resources).
    fn listen(&mut self, id: &Id, params: Option<&RawValue>) -> Result<Reply, ErrorData> {
        #[derive(Deserialize)]
        struct Listen {
            #[serde(rename = "_meta")]
            meta: Option<RequestMetaObject>,
            #[serde(default)]
            notifications: Filter,
        }
        #[derive(Deserialize, Default)]
        #[serde(rename_all = "camelCase")]
        struct Filter {
            #[serde(default)]
            tools_list_changed: bool,
        }
        let p: Listen = required_params(params)?;
        if self.era(p.meta.as_ref())? != Era::Stateless {
            return Err(ErrorData::new(
                ErrorCode::METHOD_NOT_FOUND,
                "Method not found: subscriptions/listen is a 2026-07-28 method; this session gets notifications/tools/list_changed directly",
                None,
            ));
        }
        if self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(ErrorData::new(
                super::codes::RATE_LIMITED,
                format!(
                    "too many open subscriptions on this connection (limit {MAX_SUBSCRIPTIONS})"
                ),
                None,
            ));
        }
        if self.in_flight(id) {
            return Err(ErrorData::new(
                ErrorCode::INVALID_REQUEST,
                format!("Invalid Request: id {id} is already in use by a request in flight"),
                None,
            ));
        }
        let tools = p.notifications.tools_list_changed;
        if tools {
            self.subscriptions.push(id.clone());
        }
        let mut accepted = json!({});
        if tools {
            accepted["toolsListChanged"] = json!(true);
        }
        let ack = format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/subscriptions/acknowledged","params":{{"notifications":{accepted},"_meta":{}}}}}"#,
            subscription_meta(id)
        );
        if !tools {
            // Nothing to send, ever: acknowledge and end it.
            let mut out = ack.into_bytes();
            out.push(b'\n');
            let done = format!(
                r#"{{"jsonrpc":"2.0","id":{id},"result":{{"resultType":"complete","_meta":{}}}}}"#,
                subscription_meta(id)
            );
            out.extend_from_slice(done.as_bytes());
            return Ok(Reply::Now(out));
        }
        Ok(Reply::Now(ack.into_bytes()))
    }

    /// Whether a request with this id is still waiting for its reply (a
    /// call in a task, or an open subscription): a second one would make
    /// the replies, and a cancellation, ambiguous.
    fn in_flight(&self, id: &Id) -> bool {
        if self.subscriptions.contains(id) {
            return true;
        }
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        // Most calls find nothing waiting: no key to build then.
        !pending.is_empty() && pending.contains_key(id)
    }

    fn cancelled(&mut self, params: Option<&RawValue>) {
        let Some(p) = params.and_then(|p| serde_json::from_str::<CancelledParams>(p.get()).ok())
        else {
            return;
        };
        self.subscriptions.retain(|id| *id != p.request_id);
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = pending.get(&p.request_id) {
            tracing::debug!(agent = %self.session.id.agent, conn = self.session.id.conn, request = %p.request_id, "cancelled by the client");
            c.by_client.store(true, Ordering::Release);
            c.token.cancel();
        }
    }
}

/// How a call runs.
enum Lane {
    /// A read: answered in the reader.
    Inline,
    /// Waits for a commit, or an unknown tool (refused, audited; cheap either way).
    Task,
    /// Waits for changes: its own task, with progress.
    Watch,
}

impl Lane {
    fn of(tool: &str) -> Lane {
        match Tool::from_name(tool) {
            Some(Tool::Get | Tool::List | Tool::Scan) => Lane::Inline,
            Some(Tool::Watch) => Lane::Watch,
            Some(Tool::Put | Tool::Delete | Tool::Txn) | None => Lane::Task,
        }
    }
}

/// `{"io.modelcontextprotocol/subscriptionId": ID}`, with the id exact.
fn subscription_meta(id: &Id) -> String {
    format!(r#"{{"{META_SUBSCRIPTION}":{id}}}"#)
}

/// The tool a malformed `tools/call` names, where it names one, for its
/// audit record.
fn tool_name(params: Option<&RawValue>) -> Option<String> {
    #[derive(Deserialize)]
    struct Named {
        name: Option<Value>,
    }
    let named: Named = serde_json::from_str(params?.get()).ok()?;
    match named.name? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// Runs a waiting call, sending `notifications/progress` every `every` so a
/// client that resets its request timeout on progress keeps the call.
async fn with_progress<F>(call: F, writer: &Writer, token: &Value, every: Duration) -> F::Output
where
    F: std::future::Future,
{
    tokio::pin!(call);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            r = &mut call => return r,
            _ = tick.tick() => {
                n += 1;
                let note = json!({
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {"progressToken": token, "progress": n, "message": "kv_watch: still waiting for a change"},
                });
                write(writer, to_vec(&note)).await;
            }
        }
    }
}

fn call_line(id: &Id, r: Result<CallToolResponse, ErrorData>, era: Era) -> Vec<u8> {
    match r {
        Ok(response) => {
            let mut result = ServerResult::from(response);
            if let Era::Legacy(_) = era {
                // What rmcp's handler does for every peer before 2026-07-28.
                result.strip_result_type_for_legacy_peer();
                result.strip_non_object_output_for_legacy_peer();
            }
            result_line(id, &result)
        }
        Err(e) => error_line(Some(id), e.code, &e.message, e.data.as_ref()),
    }
}

/// Params a method may omit.
fn parse_params<T: serde::de::DeserializeOwned + Default>(
    params: Option<&RawValue>,
) -> Result<T, ErrorData> {
    match params {
        None => Ok(T::default()),
        Some(raw) => required_params(Some(raw)),
    }
}

/// Params a method needs: absent or malformed is -32602.
fn required_params<T: serde::de::DeserializeOwned>(
    params: Option<&RawValue>,
) -> Result<T, ErrorData> {
    let raw = params.ok_or_else(|| ErrorData::invalid_params("Invalid params: missing", None))?;
    serde_json::from_str(raw.get())
        .map_err(|e| ErrorData::invalid_params(format!("Invalid params: {e}"), None))
}

/// Whether a request's `_meta` names protocol 2026-07-28.
fn names_stateless(params: Option<&RawValue>) -> bool {
    #[derive(serde::Deserialize)]
    struct Params {
        #[serde(rename = "_meta")]
        meta: Option<serde_json::Map<String, Value>>,
    }
    params
        .and_then(|p| serde_json::from_str::<Params>(p.get()).ok())
        .and_then(|p| p.meta)
        .is_some_and(|m| m.get(META_VERSION).and_then(Value::as_str) == Some(STATELESS))
}

fn missing_meta(keys: &[&str]) -> ErrorData {
    ErrorData::invalid_params(
        format!(
            "request _meta is missing or has malformed required fields: {}",
            keys.join(", ")
        ),
        None,
    )
}

fn unsupported(requested: &str) -> ErrorData {
    ErrorData::new(
        ErrorCode::UNSUPPORTED_PROTOCOL_VERSION,
        format!("Unsupported protocol version {requested}"),
        Some(json!({"supported": SUPPORTED, "requested": requested})),
    )
}

fn capabilities() -> Value {
    json!({"tools": {"listChanged": true}})
}

fn server_info() -> Value {
    json!({"name": "cordon", "title": "cordon gateway", "version": env!("CARGO_PKG_VERSION")})
}

fn to_vec(v: &impl serde::Serialize) -> Vec<u8> {
    // Values built here hold only strings, numbers and maps with string keys.
    serde_json::to_vec(v).unwrap_or_default()
}

fn push_json(out: &mut Vec<u8>, v: &impl serde::Serialize) {
    // As in `to_vec`: writing into a Vec cannot fail for these values.
    let _ = serde_json::to_writer(&mut *out, v);
}

fn result_line(id: &Id, result: &impl serde::Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    out.extend_from_slice(id.json().as_bytes());
    out.extend_from_slice(b",\"result\":");
    push_json(&mut out, result);
    out.push(b'}');
    out
}

/// A JSON-RPC error response (without its newline). `id` None is written as
/// null: the id could not be read.
pub fn error_line(
    id: Option<&Id>,
    code: ErrorCode,
    message: &str,
    data: Option<&Value>,
) -> Vec<u8> {
    let mut error = json!({"code": code.0, "message": message});
    if let Some(d) = data {
        error["data"] = d.clone();
    }
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    out.extend_from_slice(id.map_or("null", Id::json).as_bytes());
    out.extend_from_slice(b",\"error\":");
    push_json(&mut out, &error);
    out.push(b'}');
    out
}

/// Whether a line that could not be parsed names `tools/call` anywhere.
fn names_call(line: &[u8]) -> bool {
    memchr::memmem::find(line, b"\"tools/call\"").is_some()
}

/// How long a refused connection is kept open answering its requests, so the
/// refusal can be a request's answer (SDKs drop errors whose id is null, and
/// then show only "connection closed").
const REFUSAL_WAIT: Duration = Duration::from_secs(5);
/// Messages read from a refused connection before it is closed.
const REFUSAL_LINES: usize = 8;

/// Answers a refused connection: each request among its first
/// `REFUSAL_LINES` messages (within `REFUSAL_WAIT`, until the peer closes) gets
/// a -32014 error with its id and the reason; then the connection is closed.
/// Every request, not just the first: an SDK in "auto" mode takes the error to
/// its `server/discover` probe as "a legacy server" and retries with
/// `initialize`, which must get the reason too. Nothing is served, nothing the
/// peer sends is acted on. A peer that sends no request gets the error with a
/// null id.
pub async fn refuse(stream: UnixStream, message: String, max: usize) {
    // Nothing but these few errors is written: no backlog to bound.
    let (mut reader, writer) = transport::split(stream, max, usize::MAX);
    let code = super::codes::CONNECTION_REFUSED;
    let mut answered = false;
    let _ = tokio::time::timeout(REFUSAL_WAIT, async {
        for _ in 0..REFUSAL_LINES {
            let Some(Incoming::Line(line)) = reader.next().await else {
                return;
            };
            let id = match serde_json::from_slice::<Envelope>(&line) {
                Ok(env) if env.id.is_none() => continue,
                Ok(env) => env.id.and_then(Id::parse),
                Err(_) => None,
            };
            write(&writer, error_line(id.as_ref(), code, &message, None)).await;
            answered = true;
        }
    })
    .await;
    if !answered {
        write(&writer, error_line(None, code, &message, None)).await;
    }
    let last = writer.take().await;
    if let Some(mut w) = last {
        let _ = w.shutdown().await;
    }
}
