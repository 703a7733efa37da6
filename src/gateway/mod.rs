//! `cordon gateway`: owns the store and serves it as MCP tools, one Unix socket
//! per agent. The socket a connection arrives on names the agent; the kernel's
//! peer credentials must match the agent's uid before a single byte is served.

pub mod admin;
pub mod catalog;
pub mod codes;
mod conn;
mod guard;
mod id;
pub mod roots;
mod session;
pub mod tools;
mod transport;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Record;
use crate::config::{AgentConfig, Config};
use crate::policy::{Policy, PolicyError};
use crate::store::{AuditOptions, QuotaOptions, Store, StoreError, StoreOptions};
use guard::{AgentGuard, GuardLimits};
use session::{Flow, Identity, Session, Shared};
use tools::ToolLimits;

/// A client that connects and never completes `initialize` is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// After in-flight calls finished (or the grace ran out), how long sessions get
/// to flush their last replies.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
pub const MAX_CALLS_PER_CONNECTION: usize = 64;
/// Refused connections answered at once per agent (see `conn::refuse`).
const REFUSING: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("config {path} defines no agents: add at least one [agents.<name>] with a role")]
    NoAgents { path: PathBuf },
    #[error("agent {agent}: uid {uid} is set, but the gateway runs as uid {me} and only root can hand the socket to another uid")]
    ForeignUid { agent: String, uid: u32, me: u32 },
    #[error("cannot prepare runtime directory {path}: {source}")]
    RuntimeDir { path: PathBuf, source: io::Error },
    #[error("{path} exists and is not a directory owned by this gateway; refusing to use it")]
    UnsafeDir { path: PathBuf },
    #[error("{path} is not searchable by other users (mode lacks o+x), so agents with their own uid could not reach their sockets; move runtime_dir or chmod o+x {path}")]
    NotTraversable { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("gateway already running: {path} accepts connections")]
    AlreadyRunning { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot give {path} to uid {uid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        source: io::Error,
    },
    #[error("cannot install signal handler: {source}")]
    Signal { source: io::Error },
    #[error("--managed: the gateway's parent is gone (or is init), so no orchestrator can register agent roots; run it from `cordon up`")]
    NoOrchestrator,
}

struct Listener {
    agent: String,
    path: PathBuf,
    ino: u64,
    listener: UnixListener,
    expected_uid: u32,
}

/// Runs the gateway until SIGTERM or SIGINT, then shuts down in order: stop
/// accepting, let in-flight calls finish, close sessions, commit, remove sockets.
pub async fn run(config: Config) -> Result<(), GatewayError> {
    run_with(config, false, None).await
}

/// Why `cordon up` started this gateway in place of an earlier one. Only the
/// gateway writes the audit chain, so the orchestrator hands the reason over
/// (arguments of `cordon gateway --managed`) and the `gateway_start` record
/// carries it as `detail.restart`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// The watchdog killed the previous gateway: no answer to its pings for
    /// `unanswered_ms`.
    Watchdog {
        previous_pid: i32,
        unanswered_ms: u64,
    },
    /// The previous gateway exited (or could not be started) by itself.
    Exited {
        previous_pid: Option<i32>,
        /// "exit 3", "signal 9", "not started".
        status: String,
    },
}

impl Restart {
    pub fn detail(&self) -> serde_json::Value {
        match self {
            Restart::Watchdog {
                previous_pid,
                unanswered_ms,
            } => {
                serde_json::json!({"reason": "watchdog", "previous_pid": previous_pid, "unanswered_ms": unanswered_ms})
            }
            Restart::Exited {
                previous_pid,
                status,
            } => {
                serde_json::json!({"reason": "exited", "previous_pid": previous_pid, "status": status})
            }
        }
    }
}

/// `managed`: started by `cordon up`, which registers each agent's root pid
/// over the admin socket (`agent_root`); until then, and whenever the agent is
/// not running, its socket serves nobody (see `roots`).
pub async fn run_with(
    config: Config,
    managed: bool,
    restart: Option<Restart>,
) -> Result<(), GatewayError> {
    let config = Arc::new(config);
    // Every session runs under a child of this token (through its agent's
    // token when managed): cancelled last at shutdown.
    let sessions_token = CancellationToken::new();
    let roots = Arc::new(if managed {
        roots::Roots::managed(config.agents.keys(), sessions_token.clone())
    } else {
        roots::Roots::unmanaged(sessions_token.clone())
    });
    if config.agents.is_empty() {
        return Err(GatewayError::NoAgents {
            path: config.path.clone(),
        });
    }
    // Managed: only our parent, `cordon up`, may register agent roots. Taken
    // now, before anything could reparent us; a parent that is already gone
    // (init adopted us) would let nobody in, so refuse to start instead.
    let orchestrator = if managed {
        match rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) {
            Some(p) if p > 1 => Some(p),
            _ => return Err(GatewayError::NoOrchestrator),
        }
    } else {
        None
    };
    let me = rustix::process::geteuid().as_raw();
    for (name, agent) in &config.agents {
        if let Some(uid) = agent.uid {
            if me != 0 && uid != me {
                return Err(GatewayError::ForeignUid {
                    agent: name.clone(),
                    uid,
                    me,
                });
            }
        }
    }
    let policy = load_policy(&config)?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|source| GatewayError::Signal { source })?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|source| GatewayError::Signal { source })?;
    let mut sighup =
        signal(SignalKind::hangup()).map_err(|source| GatewayError::Signal { source })?;

    let g = &config.gateway;
    let space = config.space();
    let store = Store::open(StoreOptions {
        path: g.store.clone(),
        map_size: config.map_size_bytes(),
        max_value_bytes: usize::try_from(g.max_value_bytes.0).unwrap_or(usize::MAX),
        max_txn_ops: g.max_txn_ops,
        history: g.watch_history,
        audit: config.audit.enabled.then(|| AuditOptions {
            max_records: config.audit.max_records,
            max_age: config.audit.max_age.map(|s| s.0),
            journal_reserve: config.audit.journal_reserve.0,
            max_bytes: space.audit_max_bytes,
        }),
        quota: QuotaOptions {
            max_store_bytes: Some(space.max_store_bytes),
            history_bytes: Some(space.watch_history_bytes),
            batch_bytes: usize::try_from(space.batch_bytes).unwrap_or(usize::MAX),
        },
    })?;
    store.set_role_limits(role_limits(&policy));
    tracing::info!(
        map_size = space.map_size,
        max_store_bytes = space.max_store_bytes,
        watch_history_bytes = space.watch_history_bytes,
        audit_max_bytes = space.audit_max_bytes,
        headroom = space.headroom,
        "store space"
    );
    if !config.audit.enabled {
        tracing::warn!("[audit] enabled = false: calls are NOT audited");
    }
    // The first records of this run: fail closed if they cannot be written.
    let started = {
        let mut r = Record::new("gateway_start");
        r.detail = Some(serde_json::json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "config": config.path.display().to_string(),
            "agents": config.agents.keys().collect::<Vec<_>>(),
        }));
        if let (Some(restart), Some(serde_json::Value::Object(d))) = (&restart, &mut r.detail) {
            d.insert("restart".into(), restart.detail());
        }
        r.policy_sha256 = Some(policy.hash.clone());
        r.ok();
        store
            .audit(r)
            .and_then(|()| store.audit(policy_record(&policy)))
    };
    if let Err(e) = started {
        store.close();
        return Err(e.into());
    }
    let (listeners, admin_listener) = match bind_all(&config, me) {
        Ok(l) => l,
        Err(e) => {
            store.close();
            return Err(e);
        }
    };

    let limits = GuardLimits {
        messages_per_second: g.max_messages_per_second,
        refusal_records_per_minute: config.audit.refusal_records_per_minute,
    };
    let guards: Arc<BTreeMap<String, Arc<AgentGuard>>> = Arc::new(
        config
            .agents
            .iter()
            .map(|(name, a)| {
                let guard =
                    AgentGuard::new(Arc::from(name.as_str()), Arc::from(a.role.as_str()), limits);
                (name.clone(), Arc::new(guard))
            })
            .collect(),
    );
    let max_message = usize::try_from(g.max_message_bytes.0).unwrap_or(usize::MAX);
    let shared = Arc::new(Shared {
        store: store.clone(),
        tool_json: Arc::new(catalog::definitions_json()),
        policy_changes: tokio::sync::watch::Sender::new(0),
        progress_every: Duration::from_millis(g.watch_progress_ms),
        policy: ArcSwap::from_pointee(policy),
        limits: ToolLimits {
            max_list_limit: g.max_list_limit as u64,
            max_watch_ms: g.max_watch_ms,
            // Leave room for the JSON-RPC envelope and metadata around values.
            max_reply_bytes: max_message / 2,
        },
        shutdown: CancellationToken::new(),
        calls: TaskTracker::new(),
        max_calls_per_connection: MAX_CALLS_PER_CONNECTION,
        record_values: config.audit.record_values,
        guards: guards.clone(),
        flow: Flow {
            max_pending: g.max_pending_replies,
            max_unsent_bytes: usize::try_from(g.max_unsent_bytes.0).unwrap_or(usize::MAX),
        },
    });
    // Refusals past an agent's budget are written as one summary per agent
    // per interval (and once more at shutdown, below).
    {
        let store = store.clone();
        let guards = guards.clone();
        let every = config.audit.summary_interval.0;
        let stop = shared.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                write_summaries(&store, &guards);
            }
        });
    }
    // Reads' and denials' records are sealed into LMDB (and fsynced) within
    // sync_interval; with retention, the same tick prunes.
    if config.audit.enabled {
        let store = store.clone();
        let every = config.audit.sync_interval.0;
        let retention = config.audit.max_records.is_some() || config.audit.max_age.is_some();
        let stop = shared.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                if store.audit_pending() || retention {
                    if let Err(e) = store.flush_audit().await {
                        tracing::error!(error = %e, "audit sync failed");
                    }
                }
            }
        });
    }
    let sessions = TaskTracker::new();
    let accepting = TaskTracker::new();
    let next_conn = Arc::new(AtomicU64::new(1));
    let mut sockets = BTreeMap::new();
    let mut owned = Vec::new();
    for l in listeners {
        sockets.insert(l.agent.clone(), l.path.display().to_string());
        owned.push((l.path.clone(), l.ino));
        let Some(guard) = guards.get(&l.agent).cloned() else {
            continue;
        };
        accepting.spawn(accept_loop(
            l,
            guard,
            shared.clone(),
            roots.clone(),
            sessions.clone(),
            next_conn.clone(),
            g.max_connections_per_agent,
            max_message,
        ));
    }
    owned.push((admin_listener.path.clone(), admin_listener.ino));
    accepting.spawn(admin::serve(
        admin_listener.listener,
        me,
        shared.clone(),
        config.clone(),
        roots.clone(),
        orchestrator,
    ));
    accepting.close();

    tracing::info!(store = %g.store.display(), agents = sockets.len(), revision = store.revision(), "gateway ready");
    // One line on stdout tells a supervisor (or a test) that every socket is
    // bound and accepting; logs go to stderr.
    println!(
        "{}",
        serde_json::json!({"ready": true, "pid": std::process::id(), "sockets": sockets})
    );

    let signal_name = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => {
                // A reload that fails leaves the running policy in force; the
                // error is logged (and `cordon policy reload` shows it).
                let _ = reload_policy(&shared, &config);
            }
        }
    };
    tracing::info!(signal = signal_name, "shutting down");

    // 1. Stop accepting; refuse new calls; wake waiting watches.
    shared.shutdown.cancel();
    accepting.wait().await;
    for (path, ino) in &owned {
        remove_our_socket(path, *ino);
    }
    // 2. Let calls already running finish (their mutations commit).
    shared.calls.close();
    let grace = Duration::from_millis(g.shutdown_grace_ms);
    if tokio::time::timeout(grace, shared.calls.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = shared.calls.len(),
            "shutdown grace ran out with calls still in flight"
        );
    }
    // 3. Close sessions; rmcp flushes replies already produced.
    sessions_token.cancel();
    sessions.close();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sessions.wait()).await;
    // 4. The last records (what was summarised since the last interval,
    // then the stop), then the writer commits whatever is queued (the
    // journal included) and the final sync.
    write_summaries(&store, &guards);
    let mut stop = Record::new("gateway_stop");
    stop.detail = Some(serde_json::json!({"signal": signal_name}));
    stop.ok();
    if let Err(e) = store.audit(stop) {
        tracing::error!(error = %e, "cannot record the gateway's stop");
    }
    store.close();
    tracing::info!(revision = store.revision(), "gateway stopped");
    Ok(())
}

fn load_policy(config: &Config) -> Result<Policy, PolicyError> {
    let policy = Policy::load_for(config)?;
    for w in &policy.warnings {
        tracing::warn!("{w}");
    }
    Ok(policy)
}

/// Loads the policy file again and swaps it in whole, or leaves the running
/// one in force and says why.
fn policy_record(policy: &Policy) -> Record {
    let mut r = Record::new("policy_loaded");
    r.policy_sha256 = Some(policy.hash.clone());
    r.detail = Some(serde_json::json!({
        "policy": policy.path.display().to_string(),
        "roles": policy.roles().map(|r| r.name.clone()).collect::<Vec<_>>(),
        "tests_passed": policy.tests_passed,
    }));
    r.ok();
    r
}

/// Each role's store limits, for the store's alarm.
fn role_limits(policy: &Policy) -> BTreeMap<String, Arc<crate::store::RoleLimits>> {
    policy
        .roles()
        .filter(|r| !r.store_limits.is_empty())
        .map(|r| (r.name.clone(), r.store_limits.clone()))
        .collect()
}

pub(crate) fn reload_policy(shared: &Shared, config: &Config) -> Result<Arc<Policy>, PolicyError> {
    match load_policy(config) {
        Ok(policy) => {
            if let Err(e) = shared.store.audit(policy_record(&policy)) {
                // Fail closed: a policy change that cannot be audited is not made.
                tracing::error!(error = %e, "policy reload not applied: cannot audit it");
                return Err(PolicyError::Unaudited {
                    message: e.to_string(),
                });
            }
            let policy = Arc::new(policy);
            tracing::info!(policy = %policy.path.display(), hash = %policy.hash, tests = policy.tests_passed, "policy reloaded");
            shared.store.set_role_limits(role_limits(&policy));
            shared.policy.store(policy.clone());
            shared.policy_changes.send_modify(|g| *g += 1);
            Ok(policy)
        }
        Err(e) => {
            tracing::error!("policy reload rejected, the running policy stays in force: {e}");
            let mut r = Record::new("policy_rejected");
            r.policy_sha256 = Some(shared.policy.load().hash.clone());
            r.detail = Some(serde_json::json!({
                "policy": config.gateway.policy.display().to_string(),
                "error": e.to_string(),
            }));
            r.error(
                "policy_invalid",
                "rejected; the running policy stays in force",
            );
            if let Err(ae) = shared.store.audit(r) {
                tracing::error!(error = %ae, "cannot record a rejected reload");
            }
            Err(e)
        }
    }
}

/// A bound socket this gateway owns (and removes at shutdown).
struct Bound {
    path: PathBuf,
    ino: u64,
    listener: UnixListener,
}

fn bind_all(config: &Config, me: u32) -> Result<(Vec<Listener>, Bound), GatewayError> {
    let runtime = &config.gateway.runtime_dir;
    let agents_dir = runtime.join("agents");
    // Agents must traverse these to reach their own socket, but not list them.
    make_dir(runtime, 0o711, false)?;
    make_dir(&agents_dir, 0o711, true)?;
    if config
        .agents
        .values()
        .any(|a| a.uid.is_some_and(|uid| uid != me))
    {
        check_traversable(&agents_dir)?;
    }
    let mut out = Vec::new();
    for (name, agent) in &config.agents {
        out.push(bind_agent(config, name, agent, me)?);
    }
    // Operators and the orchestrator only: 0600, owned by the gateway's user.
    let admin = bind_socket(&config.admin_socket())?;
    Ok((out, admin))
}

fn make_dir(path: &Path, mode: u32, enforce_mode: bool) -> Result<(), GatewayError> {
    let dir_err = |source| GatewayError::RuntimeDir {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            if enforce_mode {
                if meta.uid() != rustix::process::geteuid().as_raw() {
                    return Err(GatewayError::UnsafeDir {
                        path: path.to_path_buf(),
                    });
                }
                fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(dir_err)?;
            }
            Ok(())
        }
        Ok(_) => Err(GatewayError::UnsafeDir {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(dir_err)?;
            }
            fs::DirBuilder::new()
                .mode(mode)
                .create(path)
                .map_err(dir_err)?;
            // The umask may have narrowed the mode; set it exactly.
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(dir_err)
        }
        Err(e) => Err(dir_err(e)),
    }
}

/// Agents with their own uid reach their socket through every ancestor of the
/// runtime directory; a private ancestor would lock them all out, silently.
fn check_traversable(dir: &Path) -> Result<(), GatewayError> {
    let abs = fs::canonicalize(dir).map_err(|source| GatewayError::RuntimeDir {
        path: dir.to_path_buf(),
        source,
    })?;
    for ancestor in abs.ancestors() {
        let meta = fs::metadata(ancestor).map_err(|source| GatewayError::RuntimeDir {
            path: ancestor.to_path_buf(),
            source,
        })?;
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(GatewayError::NotTraversable {
                path: ancestor.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn chown(path: &Path, uid: u32) -> Result<(), GatewayError> {
    std::os::unix::fs::lchown(path, Some(uid), None).map_err(|source| GatewayError::Chown {
        path: path.to_path_buf(),
        uid,
        source,
    })
}

fn bind_agent(
    config: &Config,
    name: &str,
    agent: &AgentConfig,
    me: u32,
) -> Result<Listener, GatewayError> {
    let dir = config.agent_dir(name);
    let path = config.agent_socket(name);
    // A previous run may have chowned the directory to the agent; take it back
    // before checking it, then hand it over again below.
    if me == 0 && fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        chown(&dir, me)?;
    }
    make_dir(&dir, 0o700, true)?;

    let bound = bind_socket(&path)?;
    if let (Some(uid), 0) = (agent.uid, me) {
        chown(&path, uid)?;
        chown(&dir, uid)?;
    }
    Ok(Listener {
        agent: name.to_string(),
        path,
        ino: bound.ino,
        listener: bound.listener,
        expected_uid: agent.uid.unwrap_or(me),
    })
}

/// Binds a socket at `path` with mode 0600, replacing a stale one a crashed
/// gateway left, refusing if a live gateway still listens there.
fn bind_socket(path: &Path) -> Result<Bound, GatewayError> {
    let path = path.to_path_buf();
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(_) => return Err(GatewayError::AlreadyRunning { path }),
                // Nobody listens: a crashed run left it behind.
                Err(_) => {
                    tracing::info!(path = %path.display(), "replacing stale socket");
                    fs::remove_file(&path).map_err(|source| GatewayError::Bind {
                        path: path.clone(),
                        source,
                    })?;
                }
            }
        }
        Ok(_) => return Err(GatewayError::NotASocket { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(GatewayError::Bind { path, source }),
    }
    let listener = UnixListener::bind(&path).map_err(|source| GatewayError::Bind {
        path: path.clone(),
        source,
    })?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        GatewayError::Bind {
            path: path.clone(),
            source,
        }
    })?;
    let ino = fs::symlink_metadata(&path)
        .map_err(|source| GatewayError::Bind {
            path: path.clone(),
            source,
        })?
        .ino();
    Ok(Bound {
        path,
        ino,
        listener,
    })
}

/// Removes a socket only if it is still the one this gateway bound: a newer
/// gateway may already have replaced it.
fn remove_our_socket(path: &Path, ino: u64) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.ino() == ino) {
        if let Err(e) = fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove socket");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    l: Listener,
    guard: Arc<AgentGuard>,
    shared: Arc<Shared>,
    roots: Arc<roots::Roots>,
    sessions: TaskTracker,
    next_conn: Arc<AtomicU64>,
    max_connections: usize,
    max_message: usize,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let agent_name = guard.agent.clone();
    let role = guard.role.clone();
    loop {
        let accepted = tokio::select! {
            r = l.listener.accept() => r,
            _ = shared.shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: keep serving the connections we have.
                tracing::error!(agent = %agent_name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = next_conn.fetch_add(1, Ordering::Relaxed);
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(agent = %agent_name, conn, error = %e, "connection refused: cannot read peer credentials");
                continue;
            }
        };
        // Every refusal is recorded, logged and answered the same way.
        let refusal = if cred.uid() != l.expected_uid {
            Err((
                "peer uid does not match the agent's uid".to_string(),
                format!("connection refused: peer credentials do not match agent {agent_name}"),
            ))
        } else {
            match roots.check(&agent_name, cred.pid()) {
                // Under `cordon up`: the peer must be the agent's process or
                // descend from it; its session ends with the agent's run.
                Err(reason) => Err((reason.to_string(),
                    format!(
                        "connection refused: peer process is not agent {agent_name}'s ({reason})"
                    ),
                )),
                Ok(token) => slots
                    .clone()
                    .try_acquire_owned()
                    .map(|slot| (slot, token))
                    .map_err(|_| {
                        ("too many connections on this agent's socket".to_string(),
                            format!("connection refused: agent {agent_name} already has {max_connections} connections (the limit)"),
                        )
                    }),
            }
        };
        let (slot, token) = match refusal {
            Ok(accepted) => accepted,
            Err((reason, message)) => {
                // Recorded and logged one by one within the agent's budget;
                // past it, counted into its summary.
                if guard.admit("connection") {
                    refused(&shared, &agent_name, &role, cred.uid(), cred.pid(), &reason);
                    tracing::warn!(
                        agent = %agent_name, conn, peer_uid = cred.uid(), peer_pid = cred.pid(),
                        expected_uid = l.expected_uid, "connection refused: {reason}"
                    );
                }
                // Answered in a task of its own (it waits for the peer's first
                // request), at most REFUSING at a time per agent: past that, a
                // flood of refused peers just gets closed.
                match refusing.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tokio::spawn(async move {
                            conn::refuse(stream, message, max_message).await;
                            drop(permit);
                        });
                    }
                    Err(_) => drop(stream),
                }
                continue;
            }
        };
        let id = Identity {
            agent: agent_name.clone(),
            role: role.clone(),
            uid: cred.uid(),
            pid: cred.pid(),
            conn,
        };
        tracing::info!(agent = %id.agent, role = %id.role, uid = id.uid, pid = id.pid, conn, "connection accepted");
        let session = Session {
            id,
            shared: shared.clone(),
            inflight: Arc::new(Semaphore::new(shared.max_calls_per_connection)),
            guard: guard.clone(),
        };
        sessions.spawn(async move {
            conn::serve(session, stream, token, max_message).await;
            drop(slot);
        });
    }
}

/// Each agent's summary of the refusals it made past its budget, if any.
fn write_summaries(store: &Store, guards: &BTreeMap<String, Arc<AgentGuard>>) {
    for guard in guards.values() {
        let Some(r) = guard.take_summary() else {
            continue;
        };
        let count = r
            .detail
            .as_ref()
            .map_or(0, |d| d["count"].as_u64().unwrap_or(0));
        tracing::warn!(agent = %guard.agent, count, "refusals past the agent's audit budget: summarised in one record");
        if let Err(e) = store.audit(r) {
            tracing::error!(error = %e, "cannot record a summary of refusals");
        }
    }
}

fn refused(shared: &Shared, agent: &str, role: &str, uid: u32, pid: Option<i32>, reason: &str) {
    let mut r = Record::new("connection_refused");
    r.agent = Some(agent.to_string());
    r.role = Some(role.to_string());
    r.uid = Some(uid);
    r.pid = pid;
    r.decision = Some("deny".into());
    r.error("refused", reason);
    if let Err(e) = shared.store.audit(r) {
        tracing::error!(error = %e, "cannot record a refused connection");
    }
}
