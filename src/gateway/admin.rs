//! The admin socket, `<runtime_dir>/admin.sock` (0600, the gateway's user):
//! how operators and the orchestrator talk to a running gateway. One JSON
//! object per line each way:
//! - `{"op": "policy_reload"}` → `{"ok": true, "policy": …, "hash": …, "tests_passed": N, "warnings": […]}`
//!   or `{"ok": false, "error": "…"}` (the running policy stays in force)
//! - `{"op": "status"}` → `{"ok": true, "revision": N, "watching": N, "policy": …, "hash": …, "agents": {…}, "store": {…}}`
//!   (`watching`: kv_watch calls waiting for a change; per agent, `flow`:
//!   messages it sent past its rate, which waited, and refusals it made past
//!   its audit budget, which were summarised; `store`: its space, each
//!   role's usage, and `alarms`, the quotas near or past their limit)
//! - `{"op": "ping"}` → `{"ok": true}`: the watchdog of `cordon up` asks this on
//!   an interval; it touches nothing but this socket (not the store), so it
//!   answers as long as the gateway's runtime does.
//! - `{"op": "agent_root", "agent": NAME, "pid": N | null}` → `{"ok": true}`: from
//!   `cordon up`: the agent's root process (or none: not running); from then on
//!   a connecting peer must descend from it. Accepted only from the gateway's
//!   parent when it runs `--managed` (that parent is `cordon up`); refused
//!   otherwise, so a same-uid agent cannot re-register another agent's root
//!   to its own pid and then connect as that agent.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::session::Shared;
use crate::config::Config;

const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot connect to the gateway's admin socket {path}: {source} (is the gateway running with this config?)")]
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path} closed without an answer")]
    NoAnswer { path: std::path::PathBuf },
    #[error("admin socket {path} answered with invalid JSON: {source}")]
    BadAnswer {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
}

pub(super) async fn serve(
    listener: UnixListener,
    me: u32,
    shared: Arc<Shared>,
    config: Arc<Config>,
    roots: Arc<super::roots::Roots>,
    orchestrator: Option<i32>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::error!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        // The socket is 0600 already; the uid check keeps it that way even if
        // someone loosens the mode.
        let peer = match stream.peer_cred() {
            Ok(c) if c.uid() == me || c.uid() == 0 => c.pid(),
            Ok(c) => {
                tracing::warn!(
                    peer_uid = c.uid(),
                    peer_pid = c.pid(),
                    "admin connection refused: wrong uid"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin connection refused: no peer credentials");
                continue;
            }
        };
        let shared = shared.clone();
        let config = config.clone();
        let roots = roots.clone();
        tokio::spawn(async move {
            let from = Peer {
                pid: peer,
                orchestrator,
            };
            if let Err(e) = handle(stream, from, &shared, &config, &roots).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

/// Who is asking, and who alone may register agent roots.
#[derive(Clone, Copy)]
struct Peer {
    pid: Option<i32>,
    /// The gateway's parent when it runs `--managed`; `None`: not managed.
    orchestrator: Option<i32>,
}

async fn handle(
    stream: UnixStream,
    peer: Peer,
    shared: &Shared,
    config: &Config,
    roots: &super::roots::Roots,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd.take(MAX_REQUEST as u64 * 16)).lines();
    while let Some(line) = lines.next_line().await? {
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(req) => answer(&req, peer, shared, config, roots),
            Err(e) => json!({"ok": false, "error": format!("invalid JSON: {e}")}),
        };
        let mut out = answer.to_string().into_bytes();
        out.push(b'\n');
        wr.write_all(&out).await?;
    }
    Ok(())
}

fn answer(
    req: &Value,
    peer: Peer,
    shared: &Shared,
    config: &Config,
    roots: &super::roots::Roots,
) -> Value {
    match req.get("op").and_then(Value::as_str) {
        Some("ping") => json!({"ok": true}),
        Some("agent_root") => {
            // The uid check above admits every process of the gateway's uid,
            // agents sharing it included; the root of an agent is the
            // orchestrator's word alone.
            match peer.orchestrator {
                None => {
                    return json!({"ok": false, "error": "agent_root is accepted only from cordon up (this gateway does not run --managed)"})
                }
                Some(o) if peer.pid != Some(o) => {
                    tracing::warn!(
                        peer_pid = peer.pid,
                        orchestrator = o,
                        "agent_root refused: the peer is not the orchestrator"
                    );
                    return json!({"ok": false, "error": "agent_root refused: only the orchestrator (the gateway's parent) may register agent roots"});
                }
                Some(_) => {}
            }
            let agent = req.get("agent").and_then(Value::as_str).unwrap_or_default();
            if !config.agents.contains_key(agent) {
                return json!({"ok": false, "error": format!("no agent {agent:?} in this deployment")});
            }
            let pid = req
                .get("pid")
                .and_then(Value::as_i64)
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| *p > 1);
            roots.set(agent, pid);
            tracing::info!(agent, pid, "agent root process registered");
            json!({"ok": true})
        }
        Some("policy_reload") => match super::reload_policy(shared, config) {
            Ok(p) => json!({
                "ok": true,
                "policy": p.path.display().to_string(),
                "hash": p.hash,
                "tests_passed": p.tests_passed,
                "warnings": p.warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            }),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Some("status") => {
            let p = shared.policy.load();
            let agents: serde_json::Map<String, Value> = config
                .agents
                .iter()
                .map(|(name, a)| {
                    (
                        name.clone(),
                        json!({"role": a.role, "uid": a.uid, "socket": config.agent_socket(name).display().to_string(),
                            "flow": shared.guards.get(name).map(|g| g.status())}),
                    )
                })
                .collect();
            json!({
                "ok": true,
                "revision": shared.store.revision(),
                "watching": shared.store.watching(),
                "policy": p.path.display().to_string(),
                "hash": p.hash,
                "agents": agents,
                "store": shared.store.usage(),
            })
        }
        Some(other) => {
            json!({"ok": false, "error": format!("unknown op {other:?} (ops: ping, policy_reload, status, agent_root)")})
        }
        None => json!({"ok": false, "error": "missing \"op\""}),
    }
}

/// One request to a running gateway from a synchronous caller (`cordon
/// status`), answered within `timeout` or an error: a hung gateway must not
/// hang the command.
pub fn request_blocking(
    path: &Path,
    req: &Value,
    timeout: std::time::Duration,
) -> Result<Value, AdminError> {
    use std::io::{BufRead, Read, Write};
    let stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| AdminError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let io_err = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    (&stream)
        .write_all(format!("{req}\n").as_bytes())
        .map_err(io_err)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(io_err)?;
    let mut line = String::new();
    std::io::BufReader::new((&stream).take(MAX_REQUEST as u64 * 16))
        .read_line(&mut line)
        .map_err(io_err)?;
    if line.is_empty() {
        return Err(AdminError::NoAnswer {
            path: path.to_path_buf(),
        });
    }
    serde_json::from_str(&line).map_err(|source| AdminError::BadAnswer {
        path: path.to_path_buf(),
        source,
    })
}

/// One request to a running gateway, for the CLI.
pub async fn request(path: &Path, req: &Value) -> Result<Value, AdminError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| AdminError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let io_err = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (rd, mut wr) = stream.into_split();
    let mut line = req.to_string().into_bytes();
    line.push(b'\n');
    wr.write_all(&line).await.map_err(io_err)?;
    wr.shutdown().await.map_err(io_err)?;
    let mut lines = BufReader::new(rd).lines();
    let answer = lines
        .next_line()
        .await
        .map_err(io_err)?
        .ok_or_else(|| AdminError::NoAnswer {
            path: path.to_path_buf(),
        })?;
    serde_json::from_str(&answer).map_err(|source| AdminError::BadAnswer {
        path: path.to_path_buf(),
        source,
    })
}
