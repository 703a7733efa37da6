//! Bounded logs of `cordon up`: each agent's stderr (`stderr.log`) and events
//! (`events.jsonl`, from its stdout), and the gateway's stderr
//! (`gateway.log`).
//!
//! Each log is a [`Sink`] that lives as long as the deployment (every run of
//! an agent appends to the same one) with two bounds from `[logs]`:
//! - **Size**: a file is rotated (`x` → `x.1` → … → `x.<keep-1>`, the oldest
//!   removed) before a write would take it past `max_file_bytes`, so a log
//!   never holds more than `keep * max_file_bytes` on disk.
//! - **Rate**: a token bucket (`rate_per_second`, `burst`) per stream. Past
//!   it, output is read and dropped (the agent is never blocked by us),
//!   counted, and writing resumes only once the bucket is half full again;
//!   the first write after a drop is preceded by one marker line that says
//!   how much was dropped and why. The marker's bytes are charged to the
//!   bucket too, so markers cannot be used to exceed the rate.
//!
//! Reading and writing run on a thread per stream (plain blocking I/O), never
//! on the orchestrator's runtime thread: a flooding agent costs its own
//! reader's time, not the supervision of the others nor `cordon status`.
//! The status reads the counters (atomics) without taking the sink's lock.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::LogsConfig;

/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;
/// Stack of a reader thread: it holds no deep recursion (serde_json's depth
/// limit bounds parsing).
const READER_STACK: usize = 512 * 1024;
/// How fast dropped output is read: a writer faster than this waits on its
/// full pipe, so a flood costs cordon a bounded share of a core (reading and
/// scanning 32 MiB/s), not a whole one.
pub const DRAIN_PER_SECOND: f64 = 32.0 * 1024.0 * 1024.0;
/// Dropped bytes read at once above that pace.
const DRAIN_BURST: f64 = 1024.0 * 1024.0;
/// Longest pause of a reader at a time (it then reads and re-checks).
const MAX_PAUSE: Duration = Duration::from_millis(100);
/// How long a log that cannot be opened waits before the next attempt.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// How a sink writes its marker line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `[cordon] dropped …` (stderr, gateway.log).
    Text,
    /// `{"kind":"dropped",…}` (events.jsonl).
    Json,
}

/// What was dropped since the last write.
#[derive(Debug, Default)]
struct Pending {
    bytes: u64,
    lines: u64,
    rate: bool,
    too_long: bool,
    error: Option<String>,
}

impl Pending {
    fn any(&self) -> bool {
        self.bytes > 0 || self.lines > 0
    }
}

struct State {
    file: Option<File>,
    size: u64,
    /// Bucket level; below zero after a marker was charged.
    tokens: f64,
    /// The pace of reading what is dropped: a second bucket, in debt when
    /// the reader must pause.
    drain: f64,
    last_refill: Instant,
    dropping: bool,
    pending: Pending,
    /// The last byte written ended a line.
    at_line_start: bool,
    last_open_failure: Option<Instant>,
}

/// Counters of one log, readable without its lock.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes the writer (agent or gateway) produced.
    pub read_bytes: AtomicU64,
    /// Bytes written to the log (markers included).
    pub written_bytes: AtomicU64,
    pub dropped_bytes: AtomicU64,
    pub dropped_lines: AtomicU64,
    /// Times writing was stopped (the rate exceeded, or the disk refusing).
    pub drops: AtomicU64,
    pub rotations: AtomicU64,
}

pub struct Sink {
    /// `stderr` or `stdout`.
    stream: &'static str,
    /// The agent's name, or `gateway`.
    owner: String,
    path: PathBuf,
    limits: LogsConfig,
    style: Style,
    /// Reading what is dropped is paced (see [`DRAIN_PER_SECOND`]).
    paced: bool,
    state: Mutex<State>,
    pub counters: Counters,
}

/// `path` with `.n` appended to its file name.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn newlines(data: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', data).count() as u64
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => format!("{n}B"),
    }
}

impl Sink {
    /// A sink on `path`, created now (0600) if it can be, else at its first
    /// write. Rotated files an earlier run left beyond `keep` (a lowered
    /// `keep`) are removed.
    pub fn new(
        stream: &'static str,
        owner: &str,
        path: PathBuf,
        limits: LogsConfig,
        style: Style,
    ) -> Sink {
        for n in limits.keep.max(1)..=crate::config::MAX_LOG_KEEP {
            let _ = std::fs::remove_file(rotated(&path, n));
        }
        let sink = Sink {
            stream,
            owner: owner.to_string(),
            path,
            limits,
            style,
            paced: true,
            state: Mutex::new(State {
                file: None,
                size: 0,
                tokens: limits.burst.0 as f64,
                drain: DRAIN_BURST,
                last_refill: Instant::now(),
                dropping: false,
                pending: Pending::default(),
                at_line_start: true,
                last_open_failure: None,
            }),
            counters: Counters::default(),
        };
        {
            let mut st = sink.lock();
            if let Err(e) = sink.open(&mut st) {
                tracing::warn!(log = %sink.path.display(), error = %e, "cannot open the log; trying again at its first write");
            }
        }
        sink
    }

    /// Dropped output is read as fast as it comes: for the gateway's log,
    /// whose writes must never wait (a paused log write would stall the
    /// calls of every agent); it is cordon's own code, not an agent's.
    pub fn unpaced(mut self) -> Sink {
        self.paced = false;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Poisoned only by a panic mid-write: the state is still a file and
        // counters, usable as they are.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refills the bucket; ends a drop once it is half full again.
    fn refill(&self, st: &mut State) {
        let now = Instant::now();
        let dt = now.duration_since(st.last_refill).as_secs_f64();
        st.last_refill = now;
        let burst = self.limits.burst.0 as f64;
        st.tokens = (st.tokens + dt * self.limits.rate_per_second.0 as f64).min(burst);
        st.drain = (st.drain + dt * DRAIN_PER_SECOND).min(DRAIN_BURST);
        if st.dropping && st.tokens >= burst / 2.0 {
            st.dropping = false;
        }
    }

    fn start_dropping(&self, st: &mut State) {
        if !st.dropping {
            st.dropping = true;
            st.pending.rate = true;
            self.counters.drops.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count_drop(&self, st: &mut State, bytes: u64, lines: u64) {
        st.drain -= bytes as f64;
        st.pending.bytes += bytes;
        st.pending.lines += lines;
        self.counters
            .dropped_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        self.counters
            .dropped_lines
            .fetch_add(lines, Ordering::Relaxed);
    }

    /// Releases the lock, then makes the reader wait while reading dropped
    /// output is ahead of its pace.
    fn pace(&self, st: std::sync::MutexGuard<'_, State>) {
        let debt = -st.drain;
        drop(st);
        if self.paced && debt > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(debt / DRAIN_PER_SECOND).min(MAX_PAUSE));
        }
    }

    /// Whether output is being dropped now (the caller may then skip
    /// parsing what it would drop anyway).
    pub fn dropping(&self) -> bool {
        let mut st = self.lock();
        self.refill(&mut st);
        st.dropping
    }

    /// The reader dropped these bytes without handing them over (it may
    /// be made to wait: see [`DRAIN_PER_SECOND`]).
    pub fn dropped(&self, bytes: u64, lines: u64) {
        let mut st = self.lock();
        self.refill(&mut st);
        self.count_drop(&mut st, bytes, lines);
        self.pace(st);
    }

    pub fn read(&self, bytes: u64) {
        self.counters.read_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A raw stream's bytes (stderr): kept within the rate, the rest dropped.
    /// A cut falls after the last newline that fits.
    pub fn raw(&self, data: &[u8]) {
        self.read(data.len() as u64);
        let mut st = self.lock();
        self.refill(&mut st);
        let keep = if st.dropping {
            0
        } else if st.tokens >= data.len() as f64 {
            data.len()
        } else {
            // Whole lines when it has lines; a stream without newlines is
            // cut where the bucket ends.
            let fits = st.tokens.max(0.0) as usize;
            match memchr::memrchr(b'\n', &data[..fits]) {
                Some(i) => i + 1,
                None if memchr::memchr(b'\n', &data[fits..]).is_some() => 0,
                None => fits,
            }
        };
        let (kept, rest) = data.split_at(keep);
        if !kept.is_empty() {
            st.tokens -= kept.len() as f64;
            self.write_marked(&mut st, kept);
        }
        if !rest.is_empty() {
            self.start_dropping(&mut st);
            self.count_drop(&mut st, rest.len() as u64, newlines(rest));
            self.pace(st);
        }
    }

    /// One entry of a line stream (events: what one line of stdout became),
    /// `input` bytes of the agent's; all of it is kept or none. Returns
    /// whether it was kept.
    pub fn entry(&self, input: u64, entry: &[u8]) -> bool {
        let mut st = self.lock();
        self.refill(&mut st);
        // Every line costs at least one token, so a flood of lines that write
        // nothing still runs out.
        let cost = entry.len().max(1) as f64;
        if entry.len() as u64 > self.limits.max_file_bytes.0 {
            st.pending.too_long = true;
            self.count_drop(&mut st, input, 1);
            return false;
        }
        if st.dropping || st.tokens < cost {
            self.start_dropping(&mut st);
            self.count_drop(&mut st, input, 1);
            return false;
        }
        st.tokens -= cost;
        self.write_marked(&mut st, entry)
    }

    /// The stream ended: a drop not yet marked is marked now.
    pub fn finish(&self) {
        let mut st = self.lock();
        if st.pending.any() {
            self.write_marked(&mut st, &[]);
        }
    }

    fn marker(&self, st: &State) -> Vec<u8> {
        let p = &st.pending;
        let mut why = Vec::new();
        if p.rate {
            why.push(format!(
                "rate limit {}/s, burst {}",
                human(self.limits.rate_per_second.0),
                human(self.limits.burst.0)
            ));
        }
        if p.too_long {
            why.push(format!(
                "an entry over max_file_bytes ({})",
                human(self.limits.max_file_bytes.0)
            ));
        }
        if let Some(e) = &p.error {
            why.push(format!("cannot write the log: {e}"));
        }
        let why = why.join("; ");
        let mut out = match self.style {
            Style::Text => {
                let mut s = String::new();
                if !st.at_line_start {
                    s.push('\n');
                }
                s.push_str(&format!(
                    "[cordon] dropped {} bytes ({} lines) of {} {} ({why})",
                    p.bytes, p.lines, self.owner, self.stream
                ));
                s.into_bytes()
            }
            Style::Json => json!({"kind": "dropped", "stream": self.stream, "bytes": p.bytes,
                "lines": p.lines, "reason": why, "agent": self.owner, "ts": crate::audit::now()})
            .to_string()
            .into_bytes(),
        };
        out.push(b'\n');
        out
    }

    /// Writes `data`, preceded by the marker of what was dropped before it.
    /// A write that fails drops `data` (counted; marked once writing works).
    fn write_marked(&self, st: &mut State, data: &[u8]) -> bool {
        if st.pending.any() {
            let marker = self.marker(st);
            match self.write(st, &marker) {
                Ok(()) => {
                    st.tokens -= marker.len() as f64;
                    st.pending = Pending::default();
                }
                Err(e) => {
                    self.failed(st, &e, data);
                    return false;
                }
            }
        }
        if data.is_empty() {
            return true;
        }
        match self.write(st, data) {
            Ok(()) => true,
            Err(e) => {
                self.failed(st, &e, data);
                false
            }
        }
    }

    fn failed(&self, st: &mut State, e: &std::io::Error, data: &[u8]) {
        if st.pending.error.is_none() {
            tracing::error!(log = %self.path.display(), error = %e, "cannot write the log; its output is dropped (and counted) until it can");
            self.counters.drops.fetch_add(1, Ordering::Relaxed);
        }
        // The first cause is the one said (later ones are mostly "not
        // reopened yet").
        st.pending.error.get_or_insert_with(|| e.to_string());
        // The file's size is unknown after a failed write: reopened (and
        // measured) at a later one, not before REOPEN_AFTER (a full disk
        // costs no syscalls per chunk meanwhile).
        st.file = None;
        if st
            .last_open_failure
            .is_none_or(|t| t.elapsed() >= REOPEN_AFTER)
        {
            st.last_open_failure = Some(Instant::now());
        }
        self.count_drop(st, data.len() as u64, newlines(data));
    }

    fn open(&self, st: &mut State) -> std::io::Result<()> {
        if st.file.is_some() {
            return Ok(());
        }
        if st
            .last_open_failure
            .is_some_and(|t| t.elapsed() < REOPEN_AFTER)
        {
            return Err(std::io::Error::other("not reopened yet after a failure"));
        }
        let opened = super::spec::open_log(&self.path).and_then(|f| {
            let size = f.metadata()?.len();
            Ok((f, size))
        });
        match opened {
            Ok((f, size)) => {
                st.file = Some(f);
                st.size = size;
                st.last_open_failure = None;
                Ok(())
            }
            Err(e) => {
                st.last_open_failure = Some(Instant::now());
                Err(e)
            }
        }
    }

    /// `x.<keep-2>` → `x.<keep-1>`, …, `x` → `x.1`; with `keep = 1` the
    /// live file is removed. The directory is cordon's alone (0711, owned
    /// by cordon), so renaming by path races no one.
    fn rotate(&self, st: &mut State) -> std::io::Result<()> {
        st.file = None;
        let keep = self.limits.keep.max(1);
        if keep == 1 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..keep - 1).rev() {
                match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.counters.rotations.fetch_add(1, Ordering::Relaxed);
        self.open(st)
    }

    /// Appends `data`, rotating first wherever the live file would pass its
    /// size; a cut falls after a newline when one fits.
    fn write(&self, st: &mut State, mut data: &[u8]) -> std::io::Result<()> {
        let max = self.limits.max_file_bytes.0;
        while !data.is_empty() {
            self.open(st)?;
            let room = usize::try_from(max.saturating_sub(st.size)).unwrap_or(usize::MAX);
            let cut = if data.len() <= room {
                data.len()
            } else {
                match memchr::memrchr(b'\n', &data[..room]) {
                    Some(i) => i + 1,
                    // Nothing ends a line in the room left: a fresh file,
                    // unless this one is fresh already (then cut at its size).
                    None if st.size > 0 => 0,
                    None => room,
                }
            };
            if cut > 0 {
                let Some(f) = st.file.as_mut() else {
                    return Err(std::io::Error::other("the log is not open"));
                };
                f.write_all(&data[..cut])?;
                st.size += cut as u64;
                st.at_line_start = data[cut - 1] == b'\n';
                self.counters
                    .written_bytes
                    .fetch_add(cut as u64, Ordering::Relaxed);
                data = &data[cut..];
            }
            if !data.is_empty() {
                self.rotate(st)?;
            }
        }
        Ok(())
    }

    /// The counters as the status shows them.
    pub fn status(&self) -> Value {
        let c = &self.counters;
        json!({
            "path": self.path,
            "read_bytes": c.read_bytes.load(Ordering::Relaxed),
            "written_bytes": c.written_bytes.load(Ordering::Relaxed),
            "dropped_bytes": c.dropped_bytes.load(Ordering::Relaxed),
            "dropped_lines": c.dropped_lines.load(Ordering::Relaxed),
            "drops": c.drops.load(Ordering::Relaxed),
            "rotations": c.rotations.load(Ordering::Relaxed),
        })
    }
}

/// Signalled when a reader thread has read its stream to the end (and
/// written what it kept).
pub type Done = tokio::sync::oneshot::Receiver<()>;

/// A read end of a pipe that the child's stdout or stderr is the write end
/// of; the write end is handed to the child's `Stdio`.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    // Close-on-exec on both: the child gets its end through dup2 (which
    // clears the flag on the copy), and no other child inherits either.
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((r, w))
}

fn spawn_reader(name: String, body: impl FnOnce() + Send + 'static) -> std::io::Result<Done> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name)
        .stack_size(READER_STACK)
        .spawn(move || {
            body();
            let _ = tx.send(());
        })?;
    Ok(rx)
}

/// Copies a raw stream (stderr) into `sink` on a thread of its own.
pub fn spawn_raw(thread: String, sink: Arc<Sink>, fd: OwnedFd) -> std::io::Result<Done> {
    spawn_reader(thread, move || {
        let mut f = File::from(fd);
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => sink.raw(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        sink.finish();
    })
}

/// What [`LineReader::next_line`] found.
pub enum Next<'a> {
    Line(&'a [u8]),
    /// A line over the maximum, skipped whole (read, never held).
    Overlong,
    Eof,
}

/// Lines of a stream, each held whole but bounded; while `sink` is dropping,
/// whole lines are dropped in bulk without being handed over (a flood costs
/// a scan for newlines, not a parse per line).
pub struct LineReader {
    r: BufReader<File>,
    sink: Arc<Sink>,
    max: usize,
    line: Vec<u8>,
    overlong: bool,
    eof: bool,
}

impl LineReader {
    pub fn new(fd: OwnedFd, sink: Arc<Sink>, max: usize) -> LineReader {
        LineReader {
            r: BufReader::with_capacity(READ_CHUNK, File::from(fd)),
            sink,
            max,
            line: Vec::new(),
            overlong: false,
            eof: false,
        }
    }

    pub fn next_line(&mut self) -> Next<'_> {
        self.line.clear();
        loop {
            if self.eof {
                return Next::Eof;
            }
            let buf = match self.r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => &[],
            };
            if buf.is_empty() {
                self.eof = true;
                if std::mem::take(&mut self.overlong) {
                    return Next::Overlong;
                }
                if !self.line.is_empty() {
                    return Next::Line(&self.line);
                }
                return Next::Eof;
            }
            let len = buf.len();
            if self.line.is_empty() && !self.overlong && self.sink.dropping() {
                if let Some(i) = memchr::memrchr(b'\n', buf) {
                    let lines = newlines(&buf[..=i]);
                    self.sink.read(i as u64 + 1);
                    self.sink.dropped(i as u64 + 1, lines);
                    self.r.consume(i + 1);
                    continue;
                }
            }
            match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    append(&mut self.line, &mut self.overlong, self.max, &buf[..i]);
                    self.sink.read(i as u64 + 1);
                    self.r.consume(i + 1);
                    if std::mem::take(&mut self.overlong) {
                        return Next::Overlong;
                    }
                    return Next::Line(&self.line);
                }
                None => {
                    append(&mut self.line, &mut self.overlong, self.max, buf);
                    self.sink.read(len as u64);
                    self.r.consume(len);
                }
            }
        }
    }
}

/// Adds `part` to the line unless that passes `max`: then the line is
/// marked overlong and freed (the rest of it is read, never held).
fn append(line: &mut Vec<u8>, overlong: &mut bool, max: usize, part: &[u8]) {
    if *overlong {
        return;
    }
    if line.len() + part.len() > max {
        *overlong = true;
        *line = Vec::new();
    } else {
        line.extend_from_slice(part);
    }
}

/// Runs `body` (which reads a [`LineReader`]) on a thread of its own, then
/// marks the end of the stream in `sink`.
pub fn spawn_lines(
    thread: String,
    sink: Arc<Sink>,
    fd: OwnedFd,
    max_line: usize,
    body: impl FnOnce(&mut LineReader) + Send + 'static,
) -> std::io::Result<Done> {
    spawn_reader(thread, move || {
        let mut reader = LineReader::new(fd, sink.clone(), max_line);
        body(&mut reader);
        sink.finish();
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;

    fn limits(max: u64, keep: u32, rate: u64, burst: u64) -> LogsConfig {
        LogsConfig {
            max_file_bytes: ByteSize(max),
            keep,
            rate_per_second: ByteSize(rate),
            burst: ByteSize(burst),
        }
    }

    fn on_disk(path: &Path, keep: u32) -> u64 {
        let mut total = std::fs::metadata(path).map_or(0, |m| m.len());
        for n in 1..=MAX_EXTRA {
            let len = std::fs::metadata(rotated(path, n)).map_or(0, |m| m.len());
            assert!(
                n < keep || len == 0,
                "{} exists",
                rotated(path, n).display()
            );
            total += len;
        }
        total
    }
    const MAX_EXTRA: u32 = 10;

    #[test]
    fn rotates_within_the_cap_and_cuts_at_newlines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr.log");
        let s = Sink::new(
            "stderr",
            "a",
            path.clone(),
            limits(4096, 3, 1 << 30, 1 << 30),
            Style::Text,
        );
        let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\n";
        for _ in 0..1000 {
            s.raw(line);
        }
        assert!(on_disk(&path, 3) <= 3 * 4096);
        for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            let text = std::fs::read(&p).unwrap();
            assert!(text.len() <= 4096, "{}", p.display());
            assert!(
                text.ends_with(b"\n") && text.starts_with(b"0123"),
                "{}",
                p.display()
            );
        }
        assert!(s.counters.rotations.load(Ordering::Relaxed) > 10);
        assert_eq!(s.counters.dropped_bytes.load(Ordering::Relaxed), 0);
        // keep = 1: the live file alone.
        let one = dir.path().join("one.log");
        let s = Sink::new(
            "stderr",
            "a",
            one.clone(),
            limits(4096, 1, 1 << 30, 1 << 30),
            Style::Text,
        );
        for _ in 0..1000 {
            s.raw(line);
        }
        assert!(on_disk(&one, 1) <= 4096);
    }

    #[test]
    fn a_lowered_keep_removes_the_extra_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        for n in 1..5 {
            std::fs::write(rotated(&path, n), "old").unwrap();
        }
        let _s = Sink::new(
            "stderr",
            "a",
            path.clone(),
            limits(4096, 2, 1024, 4096),
            Style::Text,
        );
        assert!(rotated(&path, 1).exists());
        assert!(!rotated(&path, 2).exists() && !rotated(&path, 4).exists());
    }

    #[test]
    fn past_the_rate_output_is_dropped_counted_and_marked_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr.log");
        let s = Sink::new(
            "stderr",
            "flood",
            path.clone(),
            limits(1 << 20, 2, 1024, 8192),
            Style::Text,
        );
        let line = [b'x'; 99]
            .iter()
            .copied()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        for _ in 0..1000 {
            s.raw(&line);
        }
        let dropped = s.counters.dropped_bytes.load(Ordering::Relaxed);
        let written = s.counters.written_bytes.load(Ordering::Relaxed);
        // The burst (and what the rate refilled meanwhile) kept, the rest dropped.
        assert!((8000..8192 + 1024).contains(&written), "{written}");
        assert_eq!(written + dropped, 100_000);
        assert_eq!(
            s.counters.dropped_lines.load(Ordering::Relaxed),
            dropped / 100
        );
        s.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        let markers: Vec<&str> = text.lines().filter(|l| l.starts_with("[cordon]")).collect();
        assert_eq!(markers.len(), 1, "{markers:?}");
        assert!(
            markers[0].contains(&format!("dropped {dropped} bytes"))
                && markers[0].contains("of flood stderr")
                && markers[0].contains("rate limit 1KiB/s, burst 8KiB"),
            "{}",
            markers[0]
        );
        // Every kept line is whole.
        assert!(text
            .lines()
            .all(|l| l.len() == 99 || l.starts_with("[cordon]")));
    }

    #[test]
    fn a_quiet_stream_is_kept_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr.log");
        let s = Sink::new(
            "stderr",
            "a",
            path.clone(),
            LogsConfig::default(),
            Style::Text,
        );
        let mut all = Vec::new();
        for i in 0..100 {
            let chunk = format!("line {i} \u{1b}[31m not a terminal code for us\n");
            all.extend_from_slice(chunk.as_bytes());
            s.raw(chunk.as_bytes());
        }
        s.raw(b"no newline at the end");
        all.extend_from_slice(b"no newline at the end");
        s.finish();
        assert_eq!(std::fs::read(&path).unwrap(), all);
    }

    #[test]
    fn entries_are_kept_whole_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let s = Sink::new(
            "stdout",
            "a",
            path.clone(),
            limits(4096, 2, 1024, 4096),
            Style::Json,
        );
        let e = format!("{}\n", json!({"kind": "output", "text": "y".repeat(50)}));
        let mut kept = 0;
        for _ in 0..1000 {
            kept += u64::from(s.entry(2, e.as_bytes()));
        }
        assert!(kept > 0 && kept < 100, "{kept}");
        assert_eq!(
            s.counters.dropped_lines.load(Ordering::Relaxed),
            1000 - kept
        );
        // Over max_file_bytes: never written, counted.
        assert!(!s.entry(5000, &vec![b'z'; 5000]));
        s.finish();
        let mut lines = 0;
        for p in [path.clone(), rotated(&path, 1)] {
            for l in std::fs::read_to_string(&p).unwrap_or_default().lines() {
                let v: Value = serde_json::from_str(l).unwrap();
                lines += 1;
                if v["kind"] == "dropped" {
                    assert_eq!(v["agent"], "a");
                    assert!(
                        v["reason"]
                            .as_str()
                            .unwrap()
                            .contains("over max_file_bytes"),
                        "{v}"
                    );
                }
            }
        }
        assert!(lines > 0);
        assert!(on_disk(&path, 2) <= 2 * 4096);
    }

    #[test]
    fn a_full_disk_drops_counts_and_says_why_once_it_can_write() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test mounts a tmpfs: run it as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mount = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(mount.success());
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(mnt.clone());
        // Fill the disk but for a few KiB.
        let filler = mnt.join("filler");
        let mut f = File::create(&filler).unwrap();
        let _ = f.write_all(&vec![0u8; 64 << 10]);
        drop(f);
        let path = mnt.join("stderr.log");
        let s = Sink::new(
            "stderr",
            "a",
            path.clone(),
            limits(1 << 20, 2, 1 << 30, 1 << 30),
            Style::Text,
        );
        let line = [b'x'; 99]
            .iter()
            .copied()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        for _ in 0..200 {
            s.raw(&line);
        }
        let dropped = s.counters.dropped_bytes.load(Ordering::Relaxed);
        assert!(dropped > 0, "nothing dropped on a full disk");
        // Space again: writing resumes (after the reopen delay) with the marker.
        std::fs::remove_file(&filler).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&path)
            .unwrap_or_default()
            .contains("[cordon]")
        {
            assert!(Instant::now() < deadline, "writing never resumed");
            s.raw(&line);
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let marker = text.lines().find(|l| l.starts_with("[cordon]")).unwrap();
        assert!(
            marker.contains("cannot write the log: No space left on device"),
            "{marker}"
        );
        assert!(
            text.ends_with(std::str::from_utf8(&line).unwrap()),
            "no write after the marker"
        );
    }

    #[test]
    fn line_reader_bulk_drops_and_skips_overlong_lines() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Sink::new(
            "stdout",
            "a",
            dir.path().join("e.jsonl"),
            limits(1 << 20, 2, 1024, 4096),
            Style::Json,
        ));
        let (r, w) = pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = File::from(w);
            w.write_all(b"first\n").unwrap();
            w.write_all(&vec![b'x'; 3000]).unwrap();
            w.write_all(b"\nafter\n").unwrap();
            w.write_all(b"tail").unwrap();
        });
        let mut lr = LineReader::new(r, s.clone(), 1000);
        let mut got = Vec::new();
        loop {
            match lr.next_line() {
                Next::Line(l) => got.push(String::from_utf8_lossy(l).into_owned()),
                Next::Overlong => got.push("<overlong>".into()),
                Next::Eof => break,
            }
        }
        writer.join().unwrap();
        assert_eq!(got, ["first", "<overlong>", "after", "tail"]);
        assert_eq!(
            s.counters.read_bytes.load(Ordering::Relaxed),
            6 + 3001 + 6 + 4
        );
    }
}
