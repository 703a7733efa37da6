//! Newline-delimited JSON-RPC over a Unix stream, with a hard bound on message
//! size: the connection's line reader and its shared writer (see `conn` for
//! what is done with the lines).
//!
//! An oversized line is reported once (so the client gets an answer instead
//! of waiting forever) and the rest of it discarded without being buffered.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{Mutex, Notify};
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

/// The write half of a connection, shared by the reader's replies and the
/// calls' tasks; a line is written whole under the lock, so replies never
/// interleave.
pub type Writer = Arc<Out>;

/// A connection's write half and the replies waiting for it: a peer that does
/// not read its replies makes them wait here, and the reader stops reading
/// (`drained`) while more than `max_unsent` bytes wait, so the gateway's
/// memory for that peer stays bounded (SECURITY.md: backpressure).
pub struct Out {
    half: Mutex<Option<OwnedWriteHalf>>,
    /// Bytes of replies handed to `write_line` and not yet written (or failed).
    unsent: AtomicUsize,
    max_unsent: usize,
    drained: Notify,
}

impl Out {
    /// Waits until no more than `max_unsent` bytes wait to be written.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            // Registered before the check, so a write that finishes in
            // between still wakes us.
            notified.as_mut().enable();
            if self.unsent.load(Ordering::Acquire) <= self.max_unsent {
                return;
            }
            notified.await;
        }
    }

    /// Takes the write half (to shut it down); later writes fail.
    pub async fn take(&self) -> Option<OwnedWriteHalf> {
        self.half.lock().await.take()
    }
}

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
pub fn split(
    stream: UnixStream,
    max_message_bytes: usize,
    max_unsent: usize,
) -> (LineReader, Writer) {
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
    let out = Out {
        half: Mutex::new(Some(w)),
        unsent: AtomicUsize::new(0),
        max_unsent,
        drained: Notify::new(),
    };
    (reader, Arc::new(out))
}

impl LineReader {
    /// Resolves when the peer has closed the connection entirely (not just
    /// its write side): what is still being answered can then go nowhere.
    /// A half-closed peer (`shutdown(SHUT_WR)`) still reads its replies, so
    /// end of stream alone does not say this.
    ///
    /// The kernel reports the full close as EPOLLHUP on our end, which tokio
    /// shows as write-closed readiness. The socket is watched through a
    /// duplicate descriptor with its own registration, so clearing its
    /// readiness never touches the reader's or the writer's. (Read-closed
    /// readiness is sticky once end of stream was seen, so waiting on
    /// readability would spin.)
    pub async fn hung_up(&self) {
        use std::os::fd::AsFd;
        use tokio::io::unix::AsyncFd;
        use tokio::io::Interest;
        let stream: &UnixStream = self.reader.get_ref().as_ref();
        let watched = stream.as_fd().try_clone_to_owned().ok().and_then(|fd| {
            // SAFETY: the AsyncFd owns `fd` (an OwnedFd, closed only when
            // dropped), so its raw descriptor stays open and the same for
            // the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) }.ok()
        });
        let Some(watched) = watched else {
            // Cannot watch (out of descriptors): never report a hang-up; the
            // calls still end, just not early.
            return std::future::pending().await;
        };
        loop {
            let Ok(mut ready) = watched.writable().await else {
                return std::future::pending().await;
            };
            if ready.ready().is_write_closed() {
                return;
            }
            // Writable, still connected: wait for the socket's next event.
            ready.clear_ready();
            tokio::task::yield_now().await;
        }
    }

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

/// Writes one line (the newline is added here). Its bytes count as unsent
/// from now until the write ends, however it ends (dropped included).
pub async fn write_line(writer: &Out, mut line: Vec<u8>) -> io::Result<()> {
    line.push(b'\n');
    let _pending = Unsent::add(writer, line.len());
    let mut guard = writer.half.lock().await;
    match guard.as_mut() {
        Some(w) => w.write_all(&line).await,
        None => Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "connection closed",
        )),
    }
}

/// One line's share of `Out::unsent`, given back when the write ends.
struct Unsent<'a> {
    out: &'a Out,
    len: usize,
}

impl<'a> Unsent<'a> {
    fn add(out: &'a Out, len: usize) -> Unsent<'a> {
        out.unsent.fetch_add(len, Ordering::AcqRel);
        Unsent { out, len }
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        let before = self.out.unsent.fetch_sub(self.len, Ordering::AcqRel);
        if before.saturating_sub(self.len) <= self.out.max_unsent {
            self.out.drained.notify_waiters();
        }
    }
}

/// A JSON-RPC request id cordon accepts (and echoes): a string or an integer.
pub fn is_id(id: &Value) -> bool {
    id.is_string() || id.is_i64() || id.is_u64()
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
