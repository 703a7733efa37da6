//! `cordon bridge`: what an agent's MCP client spawns. It relays stdin to the
//! agent's gateway socket and the socket to stdout, byte for byte. It never
//! parses or rewrites messages: identity comes from the socket, so the bridge
//! holds no authority of its own.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot connect to gateway socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gateway socket {path} closed the connection")]
    GatewayClosed { path: PathBuf },
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
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| BridgeError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|source| BridgeError::Signal { source })?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|source| BridgeError::Signal { source })?;
    let (mut sock_rd, mut sock_wr) = stream.into_split();
    let relay_err = |source| BridgeError::Relay {
        path: path.to_path_buf(),
        source,
    };

    let upstream = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stdin.read(&mut buf).await.map_err(relay_err)?;
            if n == 0 {
                // Half-close: the gateway sees EOF, answers what is in flight,
                // then closes its side, which ends `downstream`.
                sock_wr.shutdown().await.map_err(relay_err)?;
                return Ok::<(), BridgeError>(());
            }
            sock_wr.write_all(&buf[..n]).await.map_err(relay_err)?;
        }
    };
    let downstream = async {
        let mut stdout = tokio::io::stdout();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = sock_rd.read(&mut buf).await.map_err(relay_err)?;
            if n == 0 {
                return Ok::<(), BridgeError>(());
            }
            stdout.write_all(&buf[..n]).await.map_err(relay_err)?;
            stdout.flush().await.map_err(relay_err)?;
        }
    };
    tokio::pin!(upstream, downstream);
    let mut stdin_closed = false;
    loop {
        tokio::select! {
            r = &mut upstream, if !stdin_closed => {
                r?;
                stdin_closed = true;
            }
            r = &mut downstream => {
                r?;
                return if stdin_closed {
                    Ok(())
                } else {
                    Err(BridgeError::GatewayClosed { path: path.to_path_buf() })
                };
            }
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    }
}
