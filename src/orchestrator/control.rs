//! The orchestrator's control socket, `<runtime_dir>/up.sock` (0600, cordon's
//! user): `cordon agent start|stop|restart NAME` and `cordon status` talk to a
//! running `cordon up` here (the gateway does not own agents). One JSON object
//! per line each way:
//! - `{"op": "status"}` → `{"ok": true, "agents": [{name, role, uid, pid, state, …}], "gateway": {…}}`
//! - `{"op": "start"|"stop"|"restart", "agent": NAME}` → `{"ok": true, "agents": [names]}`
//!   (NAME may be an agent or the base name of replicas: `coder` for `coder-1`, `coder-2`)

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use super::{Msg, OrchestratorError};

const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to {path}: {source} (is `cordon up` running with this config?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path} answered with invalid JSON: {source}")]
    BadAnswer {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub fn bind(path: &Path) -> Result<UnixListener, OrchestratorError> {
    let err = |source| OrchestratorError::Control {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::other("exists and is not a socket")));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(OrchestratorError::AlreadyRunning {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, tx: mpsc::UnboundedSender<Msg>) {
    let me = rustix::process::geteuid().as_raw();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::error!(error = %e, "control accept failed");
                continue;
            }
        };
        // 0600 already; the uid check keeps it so if the mode is loosened.
        // Agents may share this uid: the main loop also refuses a peer that
        // is one of their processes (it knows their root pids).
        let peer = match stream.peer_cred() {
            Ok(c) if c.uid() == me || c.uid() == 0 => c.pid(),
            _ => {
                tracing::warn!("control connection refused: wrong uid");
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = TokioBufReader::new(rd.take(MAX_REQUEST)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = match serde_json::from_str::<Value>(&line) {
                    Ok(req) => {
                        let (reply, rx) = oneshot::channel();
                        if tx.send(Msg::Control { req, peer, reply }).is_err() {
                            return;
                        }
                        rx.await
                            .unwrap_or_else(|_| json!({"ok": false, "error": "shutting down"}))
                    }
                    Err(e) => json!({"ok": false, "error": format!("invalid JSON: {e}")}),
                };
                let mut out = answer.to_string().into_bytes();
                out.push(b'\n');
                if wr.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// One request to a running `cordon up` (blocking; for the CLI).
pub fn request(path: &Path, req: &Value) -> Result<Value, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    stream
        .write_all(format!("{req}\n").as_bytes())
        .map_err(io)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    serde_json::from_str(&line).map_err(|source| ControlError::BadAnswer {
        path: path.to_path_buf(),
        source,
    })
}
