//! `cordon bridge`: what an agent's MCP client spawns. It relays stdin to the
//! agent's gateway socket and the socket to stdout, byte for byte. It never
//! parses or rewrites messages: identity comes from the socket, so the bridge
//! holds no authority of its own. The one thing it reads is the gateway's
//! first line, when the gateway then closes: a refused connection's reason
//! goes to stderr, where an operator looks (MCP clients often show only
//! "connection closed").

use std::path::{Path, PathBuf};

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream as StdUnixStream;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot connect to gateway socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gateway socket {path} closed the connection")]
    GatewayClosed { path: PathBuf },
    #[error("the gateway at {path} refused this connection: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("relay to gateway socket {path} failed: {source}")]
    Relay {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install signal handler: {source}")]
    Signal { source: std::io::Error },
}

/// Runs the relay until stdin closes (exit 0), a SIGINT/SIGTERM arrives (exit 0)
/// or the gateway goes away (an error).
pub async fn run(path: &Path) -> Result<(), BridgeError> {
    let stream = StdUnixStream::connect(path).map_err(|source| BridgeError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|source| BridgeError::Signal { source })?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|source| BridgeError::Signal { source })?;
    let relay_err = |source| BridgeError::Relay {
        path: path.to_path_buf(),
        source,
    };
    let sock_wr = stream.try_clone().map_err(relay_err)?;
    // Two plain threads with blocking reads and writes: a message crosses one
    // thread each way. tokio's stdin and stdout run every read and write on
    // its blocking pool, which costs two more thread hand-offs per message.
    let (events, mut ended) = mpsc::unbounded_channel::<Relay>();
    let up = events.clone();
    std::thread::Builder::new()
        .name("bridge-up".into())
        .spawn(move || {
            let end = upstream(sock_wr, &up);
            let _ = up.send(end);
        })
        .map_err(relay_err)?;
    std::thread::Builder::new()
        .name("bridge-down".into())
        .spawn(move || {
            let _ = events.send(downstream(stream));
        })
        .map_err(relay_err)?;
    let mut stdin_closed = false;
    loop {
        tokio::select! {
            event = ended.recv() => match event {
                Some(Relay::StdinClosed) => stdin_closed = true,
                Some(Relay::Done) => {}
                Some(Relay::Refused(message)) => {
                    return Err(BridgeError::Refused { path: path.to_path_buf(), message })
                }
                Some(Relay::GatewayClosed) if stdin_closed => return Ok(()),
                Some(Relay::GatewayClosed) | None => {
                    return Err(BridgeError::GatewayClosed { path: path.to_path_buf() })
                }
                Some(Relay::Failed(e)) => return Err(relay_err(e)),
            },
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    }
}

/// How one direction of the relay ended.
enum Relay {
    /// stdin reached EOF; the socket's write side is shut so the gateway sees it.
    StdinClosed,
    /// The gateway closed the connection.
    GatewayClosed,
    /// The gateway closed the connection after refusing it (its first line
    /// was a connection-refused error): the reason.
    Refused(String),
    /// Nothing more to report (stdin's end already was).
    Done,
    Failed(io::Error),
}

/// Relays stdin to the socket until stdin ends; returns how it ended, unless
/// that was already reported.
fn upstream(mut sock: StdUnixStream, events: &mpsc::UnboundedSender<Relay>) -> Relay {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => {
                // Reported before the shutdown: the gateway's end of stream,
                // which the other thread reports, can only follow it.
                let _ = events.send(Relay::StdinClosed);
                return match sock.shutdown(Shutdown::Write) {
                    Ok(()) => Relay::Done,
                    Err(e) => Relay::Failed(e),
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Relay::Failed(e),
        };
        if let Err(e) = sock.write_all(&buf[..n]) {
            return Relay::Failed(e);
        }
    }
}

/// The first line a refusal can be (the gateway's refusals are short).
const FIRST_LINE_MAX: usize = 4096;

fn downstream(mut sock: StdUnixStream) -> Relay {
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    // The gateway's first line, kept until it is complete (or too long to be
    // a refusal); only looked at if the gateway then closes.
    let mut first: Option<Vec<u8>> = Some(Vec::new());
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => {
                return match first.as_deref().and_then(refusal) {
                    Some(message) => Relay::Refused(message),
                    None => Relay::GatewayClosed,
                }
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Relay::Failed(e),
        };
        if let Some(f) = first.as_mut() {
            if f.contains(&b'\n') {
                // Complete: a second line means the gateway is serving.
                first = None;
            } else {
                f.extend_from_slice(&buf[..n]);
                if f.len() > FIRST_LINE_MAX {
                    first = None;
                }
            }
        }
        if let Err(e) = stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()) {
            return Relay::Failed(e);
        }
    }
}

/// The reason, if `line` (the gateway's whole output before it closed) is
/// the gateway's connection-refused error. Escaped for a terminal: the text
/// came from the other side of a socket.
fn refusal(line: &[u8]) -> Option<String> {
    let text = line.split(|b| *b == b'\n').next()?;
    let v: serde_json::Value = serde_json::from_slice(text).ok()?;
    let error = v.get("error")?;
    if error.get("code")?.as_i64()? != i64::from(crate::gateway::codes::CONNECTION_REFUSED.0) {
        return None;
    }
    let message = error.get("message")?.as_str()?;
    Some(message.chars().flat_map(char::escape_default).collect())
}
