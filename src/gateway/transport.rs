//! Newline-delimited JSON-RPC over a Unix stream, with a hard bound on message
//! size: the connection's line reader, its shared writer, and the channel
//! through which rmcp gets the messages the connection does not answer itself
//! (see `conn`).
//!
//! rmcp's own stream transport drops an oversized line without a reply (the
//! client then waits forever) and answers invalid requests without their id;
//! framing here lets the gateway answer both, and answer methods it does not
//! serve with -32601 at any point of the session (rmcp answers a pre-initialize
//! `server/discover` with -32602, which Claude Code and the Python SDK treat
//! differently).

use std::future::Future;
use std::io;
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use rmcp::model::{JsonRpcMessage, ProtocolVersion, ServerResult};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use rmcp::RoleServer;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Mutex};
use tokio_util::bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, FramedRead};

enum Frame {
    Line(Bytes),
    /// A line longer than the bound; reported once, the rest of it discarded.
    Oversized,
}

struct BoundedLines {
    max: usize,
    scanned: usize,
    discarding: bool,
}

impl Decoder for BoundedLines {
    type Item = Frame;
    type Error = io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
        loop {
            if let Some(pos) = buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let end = self.scanned + pos;
                self.scanned = 0;
                if self.discarding {
                    buf.advance(end + 1);
                    self.discarding = false;
                    continue;
                }
                if end > self.max {
                    buf.advance(end + 1);
                    return Ok(Some(Frame::Oversized));
                }
                let mut line = buf.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                return Ok(Some(Frame::Line(line.freeze())));
            }
            if self.discarding {
                buf.clear();
                self.scanned = 0;
                return Ok(None);
            }
            if buf.len() > self.max {
                buf.clear();
                self.scanned = 0;
                self.discarding = true;
                return Ok(Some(Frame::Oversized));
            }
            self.scanned = buf.len();
            return Ok(None);
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        // An unterminated last line is still a message (clients may omit the
        // final newline before closing).
        if buf.is_empty() || self.discarding {
            buf.clear();
            return Ok(None);
        }
        let line = buf.split().freeze();
        self.scanned = 0;
        Ok(Some(Frame::Line(line)))
    }
}

/// The write half of a connection, shared by rmcp's sends and the fast path's
/// replies; a line is written whole under the lock, so replies never interleave.
pub type Writer = Arc<Mutex<Option<OwnedWriteHalf>>>;

/// What the connection's reader yields.
pub enum Incoming {
    Line(Bytes),
    /// A line over the bound (already discarded).
    Oversized,
}

/// Reads bounded lines from a connection's read half.
pub struct LineReader {
    reader: FramedRead<OwnedReadHalf, BoundedLines>,
    pub max: usize,
}

/// Splits a connection into its bounded line reader and its shared writer.
pub fn split(stream: UnixStream, max_message_bytes: usize) -> (LineReader, Writer) {
    let (r, w) = stream.into_split();
    let reader = LineReader {
        reader: FramedRead::with_capacity(
            r,
            BoundedLines {
                max: max_message_bytes,
                scanned: 0,
                discarding: false,
            },
            64 * 1024,
        ),
        max: max_message_bytes,
    };
    (reader, Arc::new(Mutex::new(Some(w))))
}

impl LineReader {
    /// The next non-blank line; None at end of stream or on a read error.
    pub async fn next(&mut self) -> Option<Incoming> {
        loop {
            return match self.reader.next().await? {
                Ok(Frame::Line(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Frame::Line(line)) => Some(Incoming::Line(line)),
                Ok(Frame::Oversized) => Some(Incoming::Oversized),
                Err(e) => {
                    tracing::debug!(error = %e, "read failed; closing session");
                    None
                }
            };
        }
    }
}

/// Writes one line (the newline is added here).
pub async fn write_line(writer: &Writer, mut line: Vec<u8>) -> io::Result<()> {
    line.push(b'\n');
    let mut guard = writer.lock().await;
    match guard.as_mut() {
        Some(w) => w.write_all(&line).await,
        None => Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "connection closed",
        )),
    }
}

/// A JSON-RPC error reply that rmcp never sees.
pub async fn write_error(writer: &Writer, id: Value, code: i64, message: String) {
    let _ = write_line(writer, error_line(id, code, &message)).await;
}

/// A JSON-RPC error response, without its newline.
fn error_line(id: Value, code: i64, message: &str) -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
        .to_string()
        .into_bytes()
}

/// rmcp's side of a connection: the messages the connection's reader hands
/// it, and the shared writer. Marks the session ready once the initialize
/// reply is on the wire, from when the reader may answer tool calls itself.
pub struct ChannelTransport {
    pub rx: mpsc::Receiver<RxJsonRpcMessage<RoleServer>>,
    pub writer: Writer,
    pub ready: Arc<AtomicBool>,
}

impl Transport<RoleServer> for ChannelTransport {
    type Error = io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        // The fast path renders replies the way rmcp does for peers before
        // 2026-07-28 (see conn::answer); a newer negotiated version keeps
        // every call on rmcp's path.
        let initialized = matches!(
            &item,
            JsonRpcMessage::Response(r) if matches!(&r.result, ServerResult::InitializeResult(i)
                if i.protocol_version.as_str() < ProtocolVersion::V_2026_07_28.as_str())
        );
        let line = serde_json::to_vec(&item);
        let writer = self.writer.clone();
        let ready = self.ready.clone();
        async move {
            write_line(&writer, line?).await?;
            if initialized {
                ready.store(true, Ordering::Release);
            }
            Ok(())
        }
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        self.rx.recv().await
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.rx.close();
        Ok(())
    }
}

/// Writes one JSON-RPC error line on a connection that never reached rmcp (a
/// refused peer, a full socket).
pub async fn refuse(stream: &mut UnixStream, code: i64, message: &str) {
    let mut line = error_line(Value::Null, code, message);
    line.push(b'\n');
    let _ = stream.write_all(&line).await;
    let _ = stream.shutdown().await;
}

pub fn usable_id(line: &[u8]) -> Value {
    serde_json::from_slice::<Value>(line)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .filter(|id| id.is_string() || id.is_i64() || id.is_u64())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(max: usize, input: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut d = BoundedLines {
            max,
            scanned: 0,
            discarding: false,
        };
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(f) = d.decode(&mut buf).unwrap() {
            out.push(match f {
                Frame::Line(l) => Some(l.to_vec()),
                Frame::Oversized => None,
            });
        }
        out
    }

    #[test]
    fn splits_lines_and_flags_oversized_once() {
        assert_eq!(
            decode_all(8, b"ab\ncd\r\n"),
            [Some(b"ab".to_vec()), Some(b"cd".to_vec())]
        );
        assert_eq!(
            decode_all(4, b"123456789\nok\n"),
            [None, Some(b"ok".to_vec())]
        );
        // Oversized with no newline yet: flagged once, the rest discarded.
        let mut d = BoundedLines {
            max: 4,
            scanned: 0,
            discarding: false,
        };
        let mut buf = BytesMut::from(&b"1234567"[..]);
        assert!(matches!(
            d.decode(&mut buf).unwrap(),
            Some(Frame::Oversized)
        ));
        buf.extend_from_slice(b"89");
        assert!(d.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"0\nok\n");
        assert!(matches!(d.decode(&mut buf).unwrap(), Some(Frame::Line(l)) if &l[..] == b"ok"));
    }
}
