//! Newline-delimited JSON-RPC over a Unix stream, with a hard bound on message
//! size, as an rmcp `Transport`.
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

use futures::StreamExt;
use rmcp::model::{ClientRequest, JsonRpcMessage};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use rmcp::RoleServer;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
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

type Writer = Arc<Mutex<Option<OwnedWriteHalf>>>;

pub struct LineTransport {
    reader: FramedRead<OwnedReadHalf, BoundedLines>,
    writer: Writer,
    max: usize,
}

impl LineTransport {
    pub fn new(stream: UnixStream, max_message_bytes: usize) -> LineTransport {
        let (r, w) = stream.into_split();
        LineTransport {
            reader: FramedRead::with_capacity(
                r,
                BoundedLines {
                    max: max_message_bytes,
                    scanned: 0,
                    discarding: false,
                },
                64 * 1024,
            ),
            writer: Arc::new(Mutex::new(Some(w))),
            max: max_message_bytes,
        }
    }

    fn write_line(
        writer: &Writer,
        mut line: Vec<u8>,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static {
        line.push(b'\n');
        let writer = writer.clone();
        async move {
            let mut guard = writer.lock().await;
            match guard.as_mut() {
                Some(w) => w.write_all(&line).await,
                None => Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "connection closed",
                )),
            }
        }
    }

    /// Answers something rmcp never sees. Spawned rather than awaited because
    /// rmcp polls `receive` inside `select!`, so it must stay cancel-safe.
    fn reply_error(&self, id: Value, code: i64, message: String) {
        let msg = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
        let fut = Self::write_line(&self.writer, msg.to_string().into_bytes());
        tokio::spawn(async move {
            let _ = fut.await;
        });
    }
}

/// Writes one JSON-RPC error line on a connection that never reached rmcp (a
/// refused peer, a full socket).
pub async fn refuse(stream: &mut UnixStream, code: i64, message: &str) {
    let msg = json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}});
    let mut line = msg.to_string().into_bytes();
    line.push(b'\n');
    let _ = stream.write_all(&line).await;
    let _ = stream.shutdown().await;
}

fn usable_id(line: &[u8]) -> Value {
    serde_json::from_slice::<Value>(line)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .filter(|id| id.is_string() || id.is_i64() || id.is_u64())
        .unwrap_or(Value::Null)
}

impl Transport<RoleServer> for LineTransport {
    type Error = io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let write = serde_json::to_vec(&item).map(|b| Self::write_line(&self.writer, b));
        async move { write?.await }
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        loop {
            let line = match self.reader.next().await? {
                Ok(Frame::Line(line)) => line,
                Ok(Frame::Oversized) => {
                    tracing::warn!(limit = self.max, "oversized message refused");
                    self.reply_error(
                        Value::Null,
                        -32600,
                        format!("message too large: the limit is {} bytes", self.max),
                    );
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "read failed; closing session");
                    return None;
                }
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<RxJsonRpcMessage<RoleServer>>(&line) {
                Ok(JsonRpcMessage::Request(req))
                    if matches!(
                        req.request,
                        ClientRequest::DiscoverRequest(_) | ClientRequest::CustomRequest(_)
                    ) =>
                {
                    let method = req.request.method().to_string();
                    let id = serde_json::to_value(&req.id).unwrap_or(Value::Null);
                    self.reply_error(id, -32601, format!("Method not found: {method}"));
                }
                Ok(msg) => return Some(msg),
                Err(e) if e.is_syntax() || e.is_eof() => {
                    self.reply_error(Value::Null, -32700, format!("Parse error: {e}"));
                }
                Err(e) => {
                    self.reply_error(usable_id(&line), -32600, format!("Invalid Request: {e}"));
                }
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        if let Some(mut w) = self.writer.lock().await.take() {
            w.shutdown().await?;
        }
        Ok(())
    }
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
