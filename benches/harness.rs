//! The benchmark harness (issue 7; not a test): the real gateway, policy and
//! audit on, against its baselines in the same run, interleaved so that drift
//! in the machine's load hits both sides alike.
//!
//!     scripts/bench            # builds, installs the Python baseline, runs, rewrites BENCHMARKS.md
//!     cargo bench --bench harness -- [--duration-ms N] [--warmup-ms N] [--out FILE]
//!         [--apex-python PY --apex-server server.py]
//!
//! The load client is lean: raw JSON-RPC lines over the socket (or a child's
//! stdin/stdout), so it does not measure an SDK; closed loop, one request in
//! flight per connection. At N = 1 it is one blocking thread (a write and a
//! read per call); above, one event-loop thread (`--client-threads`) drives
//! every connection through epoll, so that hundreds of client threads do not
//! compete with the server for the machine's cores. `--client threads` runs
//! the earlier thread-per-connection client instead, `--client loop` the event
//! loop at N = 1 too. `--workloads echo,get,... --conns 64,256` runs only those
//! request/reply points (progress lines only, no tables).
//! Every server (the gateway, the baselines) runs as its own process, started
//! fresh for each point, so its peak RSS (VmHWM) and CPU time (utime+stime,
//! counted over the measured window only) are that point's own.
//!
//! Baselines: `serve-echo` (the floor: a thread-per-connection Unix socket
//! server that sends each request line back) and `serve-rmcp` (a bare rmcp
//! server with one echo tool) are this same binary, re-executed; the APEX-style
//! Python server is scripts/bench-apex/server.py; LMDB runs in-process (heed).
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use rustix::buffer::spare_capacity;
use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::event::Timespec;

const INIT: &str = "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-11-25\",\"capabilities\":{},\"clientInfo\":{\"name\":\"bench\",\"version\":\"0\"}}}\n{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n";
const CORDON: &str = env!("CARGO_BIN_EXE_cordon");
const CONNS: [usize; 6] = [1, 4, 16, 32, 64, 256];
const WATCHERS: [usize; 3] = [1, 16, 64];
/// Agents (each with its own role) the connections are spread over.
const AGENTS: usize = 16;
const GET_KEYS: usize = 1000;
const V64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

// ---------------------------------------------------------------- client

struct Conn {
    r: BufReader<Box<dyn Read + Send>>,
    w: Box<dyn Write + Send>,
    buf: String,
}

impl Conn {
    fn new(r: Box<dyn Read + Send>, w: Box<dyn Write + Send>) -> io::Result<Conn> {
        let mut c = Conn {
            r: BufReader::new(r),
            w,
            buf: String::new(),
        };
        c.w.write_all(INIT.as_bytes())?;
        c.w.flush()?;
        c.read()?;
        if !c.buf.contains("\"result\"") {
            return Err(io::Error::other(format!("initialize: {}", c.buf.trim())));
        }
        Ok(c)
    }

    fn socket(path: &Path) -> io::Result<Conn> {
        let s = UnixStream::connect(path)?;
        let r = s.try_clone()?;
        Conn::new(Box::new(r), Box::new(s))
    }

    fn read(&mut self) -> io::Result<()> {
        self.buf.clear();
        if self.r.read_line(&mut self.buf)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(())
    }

    /// One request, one reply; Ok(false) when the reply is an error.
    fn call(&mut self, line: &str) -> io::Result<bool> {
        self.w.write_all(line.as_bytes())?;
        self.w.flush()?;
        self.read()?;
        Ok(reply_ok(&self.buf))
    }

    fn call_ok(&mut self, line: &str) -> String {
        let ok = self.call(line).expect("setup call: connection failed");
        assert!(ok, "setup call failed: {line} -> {}", self.buf);
        self.buf.clone()
    }
}

/// A reply line that is neither a tool error nor a JSON-RPC error.
fn reply_ok(line: &str) -> bool {
    !line.contains("\"isError\":true") && !line.contains("\"error\":{\"code\":-")
}

fn tool_call(name: &str, args: &str) -> String {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{{\"name\":\"{name}\",\"arguments\":{args}}}}}\n")
}

fn structured(reply: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(reply).expect("reply is JSON");
    v["result"]["structuredContent"].clone()
}

/// xorshift64: cheap per-thread randomness for key choice and the mix.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

// ---------------------------------------------------------------- measurement

#[derive(Default, Clone)]
struct Point {
    calls: u64,
    errors: u64,
    secs: f64,
    /// Sorted latencies, ns.
    lat: Vec<u64>,
    hwm_kib: u64,
    anon_kib: u64,
    cpu_s: f64,
    /// This process's CPU time over the window (the load client, for the
    /// request/reply points; shown in the progress lines only).
    client_cpu_s: f64,
    load1: f64,
}

impl Point {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.secs
    }
    fn pct(&self, p: f64) -> f64 {
        pct(&self.lat, p)
    }
    fn cpu_us_per_call(&self) -> f64 {
        self.cpu_s * 1e6 / self.calls.max(1) as f64
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// (VmHWM, VmRSS, RssAnon) in KiB. RSS counts the store's file-backed LMDB
/// map pages too; RssAnon is the process's own memory.
fn mem(pid: u32) -> (u64, u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"), field("RssAnon:"))
}

/// utime + stime, seconds.
fn cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state (3).
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    match (f.get(11), f.get(12)) {
        (Some(u), Some(s)) => (u + s) as f64 / tck,
        _ => 0.0,
    }
}

struct Opts {
    warmup: Duration,
    duration: Duration,
    client: ClientMode,
    /// Event-loop threads (connections dealt round-robin among them).
    client_threads: usize,
}

/// Which driver runs a request/reply point (`--client`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientMode {
    /// Blocking client at N = 1, event loop above (the default).
    Auto,
    /// Event loop at every N.
    Loop,
    /// One blocking thread per connection at every N (the old client).
    Threads,
}

/// What the client threads bring back.
#[derive(Default)]
struct Tally {
    calls: u64,
    errors: u64,
    /// Latencies of the measured window's successful calls, ns.
    lat: Vec<u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.lat.extend_from_slice(&other.lat);
    }
}

/// The main thread's part of a point, once every client is connected: warm-up,
/// the measured window (phase 1), then stop (phase 2); the server's CPU time
/// over the window and its memory at the end.
fn window(o: &Opts, pid: u32, phase: &AtomicU8) -> Point {
    let mut point = Point::default();
    std::thread::sleep(o.warmup);
    let (cpu0, own0) = (cpu(pid), cpu(std::process::id()));
    let t0 = Instant::now();
    phase.store(1, Ordering::Relaxed);
    std::thread::sleep(o.duration);
    phase.store(2, Ordering::Relaxed);
    point.secs = t0.elapsed().as_secs_f64();
    point.cpu_s = cpu(pid) - cpu0;
    point.client_cpu_s = cpu(std::process::id()) - own0;
    (point.hwm_kib, _, point.anon_kib) = mem(pid);
    point.load1 = load1();
    point
}

fn finish(mut point: Point, t: Tally) -> Point {
    let Tally {
        calls,
        errors,
        mut lat,
    } = t;
    lat.sort_unstable();
    point.calls = calls;
    point.errors = errors;
    point.lat = lat;
    point
}

/// Runs `n` blocking client threads, each on its own connection, for warm-up
/// then the measured window; `line(conn, rng)` makes each request. The
/// leanest client for one connection (a write and a read per call); used at
/// N = 1 and for stdio.
fn drive(
    o: &Opts,
    n: usize,
    pid: u32,
    open: &(dyn Fn(usize) -> io::Result<Conn> + Sync),
    line: &(dyn Fn(usize, &mut Rng) -> String + Sync),
) -> Point {
    let phase = AtomicU8::new(0); // 0 warm-up, 1 measured, 2 stop
    let barrier = Barrier::new(n + 1);
    let results = Mutex::new(Tally::default());
    let mut point = Point::default();
    std::thread::scope(|scope| {
        for c in 0..n {
            let (phase, barrier, results) = (&phase, &barrier, &results);
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || {
                    let conn = open(c);
                    barrier.wait();
                    let mut conn = match conn {
                        Ok(conn) => conn,
                        Err(e) => {
                            eprintln!("  connection {c}: {e}");
                            results.lock().expect("no panics").errors += 1;
                            return;
                        }
                    };
                    let mut rng = conn_rng(c);
                    let mut t = Tally {
                        lat: Vec::with_capacity(1 << 16),
                        ..Tally::default()
                    };
                    loop {
                        let ph = phase.load(Ordering::Relaxed);
                        if ph == 2 {
                            break;
                        }
                        let req = line(c, &mut rng);
                        let t0 = Instant::now();
                        let ok = conn.call(&req);
                        let dt = t0.elapsed().as_nanos() as u64;
                        if ph == 1 {
                            match ok {
                                Ok(true) => {
                                    t.calls += 1;
                                    t.lat.push(dt);
                                }
                                Ok(false) => t.errors += 1,
                                Err(_) => {
                                    t.errors += 1;
                                    break;
                                }
                            }
                        } else if ok.is_err() {
                            t.errors += 1;
                            break;
                        }
                    }
                    results.lock().expect("no panics").merge(t);
                })
                .expect("spawn client thread");
        }
        barrier.wait();
        point = window(o, pid, &phase);
    });
    finish(point, results.into_inner().expect("no panics"))
}

fn conn_rng(c: usize) -> Rng {
    Rng(0x9E37_79B9_7F4A_7C15 ^ ((c as u64 + 1) * 0x1234_5678_9abc))
}

// ---------------------------------------------------------------- event-loop client

/// Connects and completes the MCP handshake (blocking), then switches the
/// socket to non-blocking for the event loop.
fn open_stream(path: &Path) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(path)?;
    s.write_all(INIT.as_bytes())?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while !reply.contains(&b'\n') {
        match s.read(&mut chunk)? {
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
            k => reply.extend_from_slice(&chunk[..k]),
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    if !reply.contains("\"result\"") || reply.find('\n') != Some(reply.len() - 1) {
        return Err(io::Error::other(format!("initialize: {}", reply.trim())));
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// One connection of the event-loop client: one request in flight at most.
struct Slot {
    c: usize,
    s: UnixStream,
    rng: Rng,
    req: Vec<u8>,
    /// Bytes of `req` written so far.
    written: usize,
    /// Bytes read and not yet consumed as a reply line.
    reply: Vec<u8>,
    /// How much of `reply` has been searched for the newline.
    scanned: usize,
    /// When the request's first byte was written.
    sent_at: Instant,
    /// The phase when the request was made: only phase 1 counts.
    phase: u8,
    /// A request is in flight (written or being written, reply not complete).
    busy: bool,
    /// Registered for EPOLLOUT too (the request did not fit in one write).
    want_out: bool,
    dead: bool,
}

/// One event-loop thread and its share of the connections. Level-triggered
/// epoll: a readable socket gets one `read` per wake-up (anything left is
/// reported again), and EPOLLOUT is asked for only while a request is partly
/// written.
struct Loop<'a> {
    ep: OwnedFd,
    slots: Vec<Slot>,
    line: &'a (dyn Fn(usize, &mut Rng) -> String + Sync),
    phase: &'a AtomicU8,
    tally: Tally,
    /// Connections with a request in flight.
    busy: usize,
    scratch: Vec<u8>,
}

impl Loop<'_> {
    fn interest(&mut self, i: usize, out: bool) {
        let slot = &mut self.slots[i];
        if slot.want_out == out {
            return;
        }
        let flags = if out {
            EventFlags::IN | EventFlags::OUT
        } else {
            EventFlags::IN
        };
        slot.want_out = out;
        if epoll::modify(&self.ep, &slot.s, EventData::new_u64(i as u64), flags).is_err() {
            self.fail(i);
        }
    }

    /// The connection is lost: one error, and it makes no more calls.
    fn fail(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.dead {
            return;
        }
        slot.dead = true;
        if slot.busy {
            slot.busy = false;
            self.busy -= 1;
        }
        self.tally.errors += 1;
        let _ = epoll::delete(&self.ep, &slot.s);
    }

    /// Makes the connection's next request and starts writing it.
    fn send(&mut self, i: usize) {
        let ph = self.phase.load(Ordering::Relaxed);
        let slot = &mut self.slots[i];
        if ph == 2 || slot.dead {
            return;
        }
        slot.req = (self.line)(slot.c, &mut slot.rng).into_bytes();
        slot.written = 0;
        slot.phase = ph;
        slot.busy = true;
        self.busy += 1;
        slot.sent_at = Instant::now();
        self.flush(i);
    }

    /// Writes what is left of the request; waits for EPOLLOUT if the socket
    /// is full.
    fn flush(&mut self, i: usize) {
        loop {
            let slot = &mut self.slots[i];
            if slot.written == slot.req.len() {
                break;
            }
            match slot.s.write(&slot.req[slot.written..]) {
                Ok(0) => return self.fail(i),
                Ok(k) => slot.written += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return self.interest(i, true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.fail(i),
            }
        }
        self.interest(i, false);
    }

    /// One read, then the reply if its line is complete: Ok(true).
    fn readable(&mut self, i: usize) -> bool {
        let slot = &mut self.slots[i];
        match slot.s.read(&mut self.scratch) {
            Ok(0) => {
                self.fail(i);
                return false;
            }
            Ok(k) => slot.reply.extend_from_slice(&self.scratch[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return false
            }
            Err(_) => {
                self.fail(i);
                return false;
            }
        }
        self.take_reply(i, Instant::now())
    }

    /// If a complete line is buffered, it is the reply to the request in
    /// flight, complete at `at`: counted, and the connection is idle again.
    fn take_reply(&mut self, i: usize, at: Instant) -> bool {
        let slot = &mut self.slots[i];
        let Some(nl) = slot.reply[slot.scanned..].iter().position(|&b| b == b'\n') else {
            slot.scanned = slot.reply.len();
            return false;
        };
        if !slot.busy || slot.written < slot.req.len() {
            // A line before the request was fully written: the server is
            // not answering what was sent.
            self.fail(i);
            return false;
        }
        let end = slot.scanned + nl + 1;
        let ok = std::str::from_utf8(&slot.reply[..end]).is_ok_and(reply_ok);
        if slot.phase == 1 {
            if ok {
                self.tally.calls += 1;
                let dt = at.saturating_duration_since(slot.sent_at);
                self.tally.lat.push(dt.as_nanos() as u64);
            } else {
                self.tally.errors += 1;
            }
        }
        slot.reply.drain(..end);
        slot.scanned = 0;
        slot.busy = false;
        self.busy -= 1;
        true
    }

    fn run(&mut self) {
        for i in 0..self.slots.len() {
            self.send(i);
        }
        let mut events: Vec<epoll::Event> = Vec::with_capacity(self.slots.len().max(1));
        // Wakes up now and then to see the phase change when no reply comes.
        let tick = Timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        };
        let mut stopped: Option<Instant> = None;
        loop {
            if stopped.is_none() && self.phase.load(Ordering::Relaxed) == 2 {
                stopped = Some(Instant::now());
            }
            // After the window: no new requests; wait (a while) for the
            // replies still in flight, as the blocking client does.
            if let Some(t) = stopped {
                if self.busy == 0 || t.elapsed() > Duration::from_secs(2) {
                    return;
                }
            }
            events.clear();
            match epoll::wait(&self.ep, spare_capacity(&mut events), Some(&tick)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => panic!("epoll_wait: {e}"),
            }
            for ev in &events {
                // Copied out: the kernel's struct is packed.
                let (flags, data) = (ev.flags, ev.data);
                let i = data.u64() as usize;
                if self.slots[i].dead {
                    continue;
                }
                if flags.contains(EventFlags::OUT) && self.slots[i].busy {
                    self.flush(i);
                }
                if flags.intersects(EventFlags::IN | EventFlags::HUP | EventFlags::ERR)
                    && !self.slots[i].dead
                    && self.readable(i)
                {
                    // The next request at once: a connection is never idle
                    // while others' replies are read. (Reading the whole
                    // batch first times replies a little earlier but leaves
                    // connections idle, which the closed loop should not.)
                    loop {
                        self.send(i);
                        // A further buffered line answers the new request.
                        if !(self.slots[i].busy && self.take_reply(i, Instant::now())) {
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// Like `drive`, with `threads` event-loop threads instead of one thread per
/// connection: connection `c` belongs to thread `c % threads`, all its
/// sockets non-blocking under one epoll; each connection still has exactly
/// one request in flight, timed from its write to its complete reply line.
fn drive_loop(
    o: &Opts,
    n: usize,
    threads: usize,
    pid: u32,
    open: &(dyn Fn(usize) -> io::Result<UnixStream> + Sync),
    line: &(dyn Fn(usize, &mut Rng) -> String + Sync),
) -> Point {
    let threads = threads.clamp(1, n.max(1));
    let phase = AtomicU8::new(0); // 0 warm-up, 1 measured, 2 stop
    let barrier = Barrier::new(threads + 1);
    let results = Mutex::new(Tally::default());
    let mut point = Point::default();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (phase, barrier, results) = (&phase, &barrier, &results);
            std::thread::Builder::new()
                .spawn_scoped(scope, move || {
                    let ep = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll_create");
                    let mut tally = Tally {
                        lat: Vec::with_capacity(1 << 18),
                        ..Tally::default()
                    };
                    let mut slots = Vec::new();
                    for c in (t..n).step_by(threads) {
                        let s = open(c).and_then(|s| {
                            let data = EventData::new_u64(slots.len() as u64);
                            epoll::add(&ep, &s, data, EventFlags::IN)?;
                            Ok(s)
                        });
                        match s {
                            Ok(s) => slots.push(Slot {
                                c,
                                s,
                                rng: conn_rng(c),
                                req: Vec::new(),
                                written: 0,
                                reply: Vec::with_capacity(1 << 16),
                                scanned: 0,
                                sent_at: Instant::now(),
                                phase: 0,
                                busy: false,
                                want_out: false,
                                dead: false,
                            }),
                            Err(e) => {
                                eprintln!("  connection {c}: {e}");
                                tally.errors += 1;
                            }
                        }
                    }
                    barrier.wait();
                    let mut l = Loop {
                        ep,
                        slots,
                        line,
                        phase,
                        tally,
                        busy: 0,
                        scratch: vec![0; 1 << 16],
                    };
                    l.run();
                    results.lock().expect("no panics").merge(l.tally);
                })
                .expect("spawn client thread");
        }
        barrier.wait();
        point = window(o, pid, &phase);
    });
    finish(point, results.into_inner().expect("no panics"))
}

// ---------------------------------------------------------------- servers

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn stop(self) {
        drop(self);
    }
    fn agent_socket(&self, c: usize) -> PathBuf {
        self.dir.join(format!("r/agents/a{}/mcp.sock", c % AGENTS))
    }
}

/// Also on a panic, so that no server outlives the run.
impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn tempdir() -> tempfile::TempDir {
    let base = std::env::var_os("BENCH_TMP").map_or_else(std::env::temp_dir, PathBuf::from);
    tempfile::Builder::new()
        .prefix("cordon-bench-")
        .tempdir_in(base)
        .expect("temp dir")
}

fn read_ready(child: &mut Child) {
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("ready line");
    assert!(!line.is_empty(), "server exited before it was ready");
}

/// The real gateway on a fresh temp store: policy on (16 agents, one role
/// each, allowed everything under /), audit on, default durability. The
/// per-agent message rate is set out of reach: the benchmark measures what
/// the accounting costs, not the throttling it would apply past the rate.
fn gateway() -> Server {
    let dir = tempdir();
    let mut config = String::from("[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p.toml\"\nmap_size = \"8GiB\"\nmax_connections_per_agent = 32\nmax_messages_per_second = 100000000\n[audit]\nenabled = true\n");
    let mut policy = String::new();
    for a in 0..AGENTS {
        let _ = write!(config, "[agents.a{a}]\nrole = \"r{a}\"\n");
        let _ = write!(
            policy,
            "[roles.r{a}]\ntools = [\"kv_*\"]\nread = [\"/**\"]\nwrite = [\"/**\"]\n"
        );
    }
    std::fs::write(dir.path().join("c.toml"), config).expect("config");
    std::fs::write(dir.path().join("p.toml"), policy).expect("policy");
    let mut child = Command::new(CORDON)
        .args(["gateway", "--config"])
        .arg(dir.path().join("c.toml"))
        .env("CORDON_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start gateway");
    read_ready(&mut child);
    let s = Server {
        child,
        dir: dir.path().to_path_buf(),
        _dir: dir,
    };
    // Keys to read and to list, written in transactions of 100 puts.
    let mut c = Conn::socket(&s.agent_socket(0)).expect("setup connection");
    for chunk in 0..GET_KEYS / 100 {
        let ops: Vec<String> = (chunk * 100..chunk * 100 + 100)
            .map(|i| format!("{{\"op\":\"put\",\"key\":\"/b/k/{i}\",\"value\":\"{V64}\"}}"))
            .collect();
        c.call_ok(&tool_call(
            "kv_txn",
            &format!("{{\"ops\":[{}]}}", ops.join(",")),
        ));
    }
    let ops: Vec<String> = (0..100)
        .map(|i| format!("{{\"op\":\"put\",\"key\":\"/l/{i:03}\",\"value\":{i}}}"))
        .collect();
    c.call_ok(&tool_call(
        "kv_txn",
        &format!("{{\"ops\":[{}]}}", ops.join(",")),
    ));
    s
}

/// A baseline server: this binary re-executed as `serve-echo` / `serve-rmcp`.
fn baseline(kind: &str) -> Server {
    let dir = tempdir();
    let sock = dir.path().join("s.sock");
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .arg(kind)
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start baseline");
    read_ready(&mut child);
    Server {
        child,
        dir: dir.path().to_path_buf(),
        _dir: dir,
    }
}

fn serve_echo(sock: &Path) {
    let l = std::os::unix::net::UnixListener::bind(sock).expect("bind");
    println!("ready");
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        std::thread::spawn(move || {
            let Ok(r) = s.try_clone() else { return };
            let (mut r, mut w) = (BufReader::new(r), s);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                // Like JSON-RPC: a request (with an id) is answered, a
                // notification is not. The answer is the request's bytes
                // (initialize gets a minimal result, so the client's check holds).
                let reply: &[u8] = if line.contains("\"method\":\"initialize\"") {
                    b"{\"jsonrpc\":\"2.0\",\"id\":0,\"result\":{}}\n"
                } else if line.contains("\"id\"") {
                    line.as_bytes()
                } else {
                    continue;
                };
                if w.write_all(reply).is_err() {
                    return;
                }
            }
        });
    }
}

mod bare {
    //! A bare rmcp server: one echo tool, handler written by hand like the
    //! gateway's session, rmcp's own newline transport on the Unix stream.
    use std::sync::Arc;

    use rmcp::model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
        PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    };
    use rmcp::service::RequestContext;
    use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};

    pub struct Echo(Tool);

    impl ServerHandler for Echo {
        fn get_info(&self) -> ServerConfig {
            ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
        }

        async fn list_tools(
            &self,
            _request: Option<PaginatedRequestParams>,
            _context: RequestContext<RoleServer>,
        ) -> Result<ListToolsResult, ErrorData> {
            Ok(ListToolsResult::with_all_items(vec![self.0.clone()]))
        }

        async fn call_tool(
            &self,
            request: CallToolRequestParams,
            _context: RequestContext<RoleServer>,
        ) -> Result<CallToolResponse, ErrorData> {
            let args = serde_json::Value::Object(request.arguments.unwrap_or_default());
            Ok(CallToolResult::success(vec![ContentBlock::text(args.to_string())]).into())
        }
    }

    pub fn serve(sock: &std::path::Path) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let l = tokio::net::UnixListener::bind(sock).expect("bind");
            println!("ready");
            let schema = serde_json::json!({"type": "object"});
            let serde_json::Value::Object(schema) = schema else {
                unreachable!("a literal object")
            };
            let tool = Tool::new("echo", "Echo the arguments", Arc::new(schema));
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let tool = tool.clone();
                tokio::spawn(async move {
                    if let Ok(running) = Echo(tool).serve(s).await {
                        let _ = running.waiting().await;
                    }
                });
            }
        });
    }
}

// ---------------------------------------------------------------- suites

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum W {
    Echo,
    Rmcp,
    Get,
    Put64,
    Put4k,
    Mix,
    List,
    Txn,
    /// `tools/list` on an open session.
    Tools,
    /// `server/discover` on an open session: the 2026-07-28 handshake
    /// (what Claude Code sends first), repeatable where `initialize` is once
    /// per connection; it answers what `initialize` does.
    Init,
    /// `kv_watch` with `timeout_ms: 0` on a quiet prefix (the watch path
    /// without the wait).
    Watch0,
}

impl W {
    /// Its name for `--workloads`.
    fn key(self) -> &'static str {
        match self {
            W::Echo => "echo",
            W::Rmcp => "rmcp",
            W::Get => "get",
            W::Put64 => "put64",
            W::Put4k => "put4k",
            W::Mix => "mix",
            W::List => "list",
            W::Txn => "txn",
            W::Tools => "tools",
            W::Init => "init",
            W::Watch0 => "watch0",
        }
    }

    fn label(self) -> &'static str {
        match self {
            W::Echo => "floor: raw socket echo",
            W::Rmcp => "bare rmcp echo tool",
            W::Get => "cordon `kv_get`",
            W::Put64 => "cordon `kv_put` 64 B, durable",
            W::Put4k => "cordon `kv_put` 4 KiB, durable",
            W::Mix => "cordon 90% get / 10% put",
            W::List => "cordon `kv_list` 100 keys",
            W::Txn => "cordon `kv_txn` 10 puts",
            W::Tools => "cordon `tools/list`",
            W::Init => "cordon `server/discover` (handshake)",
            W::Watch0 => "cordon `kv_watch` timeout 0",
        }
    }
}

fn get_line(rng: &mut Rng) -> String {
    let k = rng.next() % GET_KEYS as u64;
    tool_call("kv_get", &format!("{{\"key\":\"/b/k/{k}\"}}"))
}

fn put_line(c: usize, rng: &mut Rng, value: &str) -> String {
    // Keys reused, so the store stays small however long the run.
    let k = rng.next() % 1000;
    tool_call(
        "kv_put",
        &format!("{{\"key\":\"/p/c{c}/{k}\",\"value\":\"{value}\"}}"),
    )
}

fn run_point(o: &Opts, w: W, n: usize, v4k: &str) -> Point {
    let server = match w {
        W::Echo => baseline("serve-echo"),
        W::Rmcp => baseline("serve-rmcp"),
        _ => gateway(),
    };
    let pid = server.pid();
    let path = |c: usize| match w {
        W::Echo | W::Rmcp => server.dir.join("s.sock"),
        _ => server.agent_socket(c),
    };
    let line = |c: usize, rng: &mut Rng| -> String {
        match w {
            // The same bytes as a kv_get, so the floor moves what cordon does.
            W::Echo => get_line(rng),
            W::Rmcp => {
                let k = rng.next() % GET_KEYS as u64;
                tool_call("echo", &format!("{{\"key\":\"/b/k/{k}\"}}"))
            }
            W::Get => get_line(rng),
            W::Put64 => put_line(c, rng, V64),
            W::Put4k => put_line(c, rng, v4k),
            W::Mix => {
                if rng.next() % 10 == 0 {
                    put_line(c, rng, V64)
                } else {
                    get_line(rng)
                }
            }
            W::List => tool_call("kv_list", "{\"prefix\":\"/l\",\"limit\":100}"),
            W::Tools => "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\",\"params\":{}}\n".to_string(),
            W::Init => "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"server/discover\",\"params\":{\"_meta\":{\"io.modelcontextprotocol/protocolVersion\":\"2026-07-28\",\"io.modelcontextprotocol/clientCapabilities\":{}}}}\n".to_string(),
            W::Watch0 => tool_call(
                "kv_watch",
                "{\"prefix\":\"/quiet\",\"since_revision\":1000000000,\"timeout_ms\":0}",
            ),
            W::Txn => {
                let base = rng.next() % 100;
                let ops: Vec<String> = (0..10)
                    .map(|j| {
                        format!(
                            "{{\"op\":\"put\",\"key\":\"/t/c{c}/{}\",\"value\":\"{V64}\"}}",
                            base * 10 + j
                        )
                    })
                    .collect();
                tool_call("kv_txn", &format!("{{\"ops\":[{}]}}", ops.join(",")))
            }
        }
    };
    let p = match o.client {
        ClientMode::Threads => drive(o, n, pid, &|c| Conn::socket(&path(c)), &line),
        ClientMode::Auto if n == 1 => drive(o, n, pid, &|c| Conn::socket(&path(c)), &line),
        _ => drive_loop(
            o,
            n,
            o.client_threads,
            pid,
            &|c| open_stream(&path(c)),
            &line,
        ),
    };
    server.stop();
    p
}

/// Watch fan-out: one writer puts under /w; `n` watchers each wait in
/// `kv_watch`. Latency = a watcher's reply time minus the writer's time of the
/// put's reply (the commit is known done then), floored at 0.
fn run_watch(o: &Opts, n: usize) -> (Point, Vec<u64>, u64) {
    let server = gateway();
    let pid = server.pid();
    let mut writer = Conn::socket(&server.agent_socket(0)).expect("writer");
    let first = structured(&writer.call_ok(&tool_call(
        "kv_put",
        &format!("{{\"key\":\"/w/x\",\"value\":\"{V64}\"}}"),
    )));
    let since0 = first["revision"].as_u64().expect("put revision");
    let seen = AtomicU64::new(0);
    let stop = AtomicU8::new(0);
    let replies: Mutex<Vec<(u64, Instant)>> = Mutex::new(Vec::new());
    // revision -> (put sent, put reply read)
    let commits: Mutex<HashMap<u64, (Instant, Instant)>> = Mutex::new(HashMap::new());
    let mut errors = 0u64;
    let mut puts = 0u64;
    let mut point = Point::default();
    std::thread::scope(|scope| {
        let barrier = Arc::new(Barrier::new(n + 1));
        for c in 0..n {
            let (seen, stop, replies, barrier) = (&seen, &stop, &replies, barrier.clone());
            let sock = server.agent_socket(c + 1);
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || {
                    let mut conn = Conn::socket(&sock).expect("watcher connection");
                    let mut since = since0;
                    let mut mine = Vec::new();
                    barrier.wait();
                    while stop.load(Ordering::Relaxed) == 0 {
                        let req = tool_call("kv_watch", &format!("{{\"prefix\":\"/w\",\"since_revision\":{since},\"timeout_ms\":1000}}"));
                        if !matches!(conn.call(&req), Ok(true)) {
                            break;
                        }
                        let at = Instant::now();
                        let r = structured(&conn.buf);
                        if let Some(events) = r["events"].as_array() {
                            for e in events {
                                if let Some(rev) = e["revision"].as_u64() {
                                    mine.push((rev, at));
                                    seen.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        since = r["revision"].as_u64().unwrap_or(since);
                    }
                    replies.lock().expect("no panics").extend(mine);
                })
                .expect("spawn watcher");
        }
        barrier.wait();
        // Let every watcher arm its first watch.
        std::thread::sleep(Duration::from_millis(200));
        let cpu0 = cpu(pid);
        let t0 = Instant::now();
        let mut expected = 0u64;
        while t0.elapsed() < o.duration {
            let sent = Instant::now();
            match writer.call(&tool_call(
                "kv_put",
                &format!("{{\"key\":\"/w/x\",\"value\":\"{V64}\"}}"),
            )) {
                Ok(true) => {}
                _ => {
                    errors += 1;
                    break;
                }
            }
            let at = Instant::now();
            let rev = structured(&writer.buf)["revision"]
                .as_u64()
                .expect("put revision");
            commits.lock().expect("no panics").insert(rev, (sent, at));
            puts += 1;
            expected += n as u64;
            // Next put once every watcher has this one and had time to re-arm.
            let wait = Instant::now();
            while seen.load(Ordering::Relaxed) < expected && wait.elapsed() < Duration::from_secs(2)
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            if seen.load(Ordering::Relaxed) < expected {
                errors += expected - seen.load(Ordering::Relaxed);
                expected = seen.load(Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(3));
        }
        point.secs = t0.elapsed().as_secs_f64();
        point.cpu_s = cpu(pid) - cpu0;
        (point.hwm_kib, _, point.anon_kib) = mem(pid);
        point.load1 = load1();
        stop.store(1, Ordering::Relaxed);
        // Wake the watchers so they see the stop.
        let _ = writer.call(&tool_call(
            "kv_put",
            &format!("{{\"key\":\"/w/x\",\"value\":\"{V64}\"}}"),
        ));
    });
    let commits = commits.into_inner().expect("no panics");
    let mut lat = Vec::new();
    let mut from_sent = Vec::new();
    for (rev, at) in replies.into_inner().expect("no panics") {
        if let Some((sent, done)) = commits.get(&rev) {
            lat.push(at.saturating_duration_since(*done).as_nanos() as u64);
            from_sent.push(at.saturating_duration_since(*sent).as_nanos() as u64);
        }
    }
    lat.sort_unstable();
    from_sent.sort_unstable();
    point.calls = lat.len() as u64;
    point.errors = errors;
    point.lat = lat;
    server.stop();
    (point, from_sent, puts)
}

/// One connection through a child's stdin/stdout: the APEX-style Python server,
/// or `cordon bridge` to a fresh gateway.
fn run_stdio(o: &Opts, apex: Option<(&str, &str)>, write: bool) -> Point {
    let dir = tempdir();
    let (mut child, gw) = match apex {
        Some((py, script)) => {
            let db = dir.path().join("db");
            std::fs::create_dir_all(&db).expect("db dir");
            let child = Command::new(py)
                .arg(script)
                .arg(&db)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the APEX-style server");
            (child, None)
        }
        None => {
            let gw = gateway();
            let child = Command::new(CORDON)
                .args(["bridge", "--socket"])
                .arg(gw.agent_socket(0))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start cordon bridge");
            (child, Some(gw))
        }
    };
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let conn = Mutex::new(Some(
        Conn::new(Box::new(stdout), Box::new(stdin)).expect("stdio initialize"),
    ));
    let (get, put) = if apex.is_some() {
        ("read", "write")
    } else {
        ("kv_get", "kv_put")
    };
    if apex.is_some() {
        // APEX's store holds the same keys.
        let mut c = conn.lock().expect("no panics");
        let c = c.as_mut().expect("present");
        for i in 0..GET_KEYS {
            c.call_ok(&tool_call(
                put,
                &format!("{{\"key\":\"/b/k/{i}\",\"value\":\"{V64}\"}}"),
            ));
        }
    }
    // The server measured: the Python process, or the gateway behind the bridge.
    let pid = gw.as_ref().map_or(child.id(), |g| g.pid());
    let open = |_c: usize| {
        conn.lock()
            .expect("no panics")
            .take()
            .ok_or_else(|| io::Error::other("one connection"))
    };
    let line = |_c: usize, rng: &mut Rng| {
        let k = rng.next() % GET_KEYS as u64;
        if write {
            tool_call(
                put,
                &format!("{{\"key\":\"/p/{}\",\"value\":\"{V64}\"}}", k),
            )
        } else {
            tool_call(get, &format!("{{\"key\":\"/b/k/{k}\"}}"))
        }
    };
    let p = drive(o, 1, pid, &open, &line);
    // Closing stdin ends both servers' stdio loops.
    let _ = child.kill();
    let _ = child.wait();
    if let Some(gw) = gw {
        gw.stop();
    }
    p
}

/// LMDB through heed, in this process, on the same filesystem.
struct Lmdb {
    get_per_txn: f64,
    get_one_txn: f64,
    put_durable: f64,
    put_batched: f64,
}

fn run_lmdb(o: &Opts) -> Lmdb {
    use heed::types::{Bytes, Str};
    let dir = tempdir();
    let mut opts = heed::EnvOpenOptions::new();
    opts.map_size(1 << 30).max_dbs(1);
    // SAFETY: a fresh directory that only this process opens.
    let env = unsafe { opts.open(dir.path()) }.expect("open LMDB");
    let mut wtxn = env.write_txn().expect("txn");
    let db: heed::Database<Str, Bytes> = env.create_database(&mut wtxn, None).expect("db");
    let keys: Vec<String> = (0..GET_KEYS).map(|i| format!("/b/k/{i}")).collect();
    for k in &keys {
        db.put(&mut wtxn, k, V64.as_bytes()).expect("put");
    }
    wtxn.commit().expect("commit");
    let timed = |f: &mut dyn FnMut(u64) -> u64| {
        let t = Instant::now();
        let mut ops = 0u64;
        let mut i = 0u64;
        while t.elapsed() < o.duration {
            ops += f(i);
            i += 1;
        }
        ops as f64 / t.elapsed().as_secs_f64()
    };
    let get_per_txn = timed(&mut |i| {
        let r = env.read_txn().expect("read txn");
        let v = db.get(&r, &keys[i as usize % GET_KEYS]).expect("get");
        assert!(v.is_some());
        1
    });
    let get_one_txn = timed(&mut |_| {
        let r = env.read_txn().expect("read txn");
        for k in &keys {
            assert!(db.get(&r, k).expect("get").is_some());
        }
        GET_KEYS as u64
    });
    let put_durable = timed(&mut |i| {
        let mut w = env.write_txn().expect("write txn");
        db.put(&mut w, &keys[i as usize % GET_KEYS], V64.as_bytes())
            .expect("put");
        w.commit().expect("commit (fsync)");
        1
    });
    let put_batched = timed(&mut |i| {
        let mut w = env.write_txn().expect("write txn");
        for j in 0..100 {
            db.put(
                &mut w,
                &keys[(i as usize * 100 + j) % GET_KEYS],
                V64.as_bytes(),
            )
            .expect("put");
        }
        w.commit().expect("commit (fsync)");
        100
    });
    Lmdb {
        get_per_txn,
        get_one_txn,
        put_durable,
        put_batched,
    }
}

// ---------------------------------------------------------------- report

fn us(x: f64) -> String {
    if x.is_nan() {
        "—".into()
    } else if x >= 1000.0 {
        format!("{:.2} ms", x / 1000.0)
    } else {
        format!("{x:.0} µs")
    }
}

fn num(x: f64) -> String {
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// How the request/reply points were driven, for the table's preamble.
fn client_note(o: &Opts) -> String {
    let event_loop = match o.client_threads {
        1 => "one event-loop thread (epoll) drives all N connections".to_owned(),
        t => format!("{t} event-loop threads (epoll) share the N connections"),
    };
    let how = match o.client {
        ClientMode::Auto => format!("one blocking connection at N = 1; above, {event_loop}"),
        ClientMode::Loop => format!("at every N, {event_loop}"),
        ClientMode::Threads => "one blocking thread per connection".to_owned(),
    };
    format!("The load client: {how}. Each connection has one request in flight (closed loop), timed from its write to its complete reply line. \
        The client and the server share the machine's 2 cores, so the client's CPU time is taken from the server's (alike for every row).")
}

fn goal(out: &mut String, ok: bool, what: &str, measured: String) {
    let _ = writeln!(
        out,
        "- **{}** {what}: {measured}",
        if ok { "PASS" } else { "MISS" }
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve-echo") => return serve_echo(Path::new(&args[2])),
        Some("serve-rmcp") => return bare::serve(Path::new(&args[2])),
        _ => {}
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let ms = |name: &str, d: u64| {
        Duration::from_millis(flag(name).and_then(|v| v.parse().ok()).unwrap_or(d))
    };
    let o = Opts {
        warmup: ms("--warmup-ms", 500),
        duration: ms("--duration-ms", 2000),
        client: match flag("--client").as_deref() {
            None | Some("auto") => ClientMode::Auto,
            Some("loop") => ClientMode::Loop,
            Some("threads") => ClientMode::Threads,
            Some(other) => panic!("--client {other}: expected auto, loop or threads"),
        },
        client_threads: flag("--client-threads")
            .map(|v| v.parse().expect("--client-threads: a number"))
            .unwrap_or(1),
    };
    // A quick look (no tables): only these workloads and connection counts.
    let list = |name: &str| flag(name).map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>());
    let (only_w, only_n) = (list("--workloads"), list("--conns"));
    let apex_py = flag("--apex-python");
    let apex_server = flag("--apex-server");
    let apex = apex_py.as_deref().zip(apex_server.as_deref());
    let v4k = "x".repeat(4096);
    let started = Instant::now();
    let load_before = loadavg();
    eprintln!("load average at start: {load_before}");

    // Request/reply suites: for each N, every system back to back.
    let order = [
        W::Echo,
        W::Rmcp,
        W::Get,
        W::Put64,
        W::Put4k,
        W::Mix,
        W::List,
        W::Txn,
        W::Tools,
        W::Init,
        W::Watch0,
    ];
    let mut res: HashMap<(W, usize), Point> = HashMap::new();
    let quick = only_w.is_some() || only_n.is_some();
    for &n in &CONNS {
        if only_n.as_ref().is_some_and(|l| !l.contains(&n.to_string())) {
            continue;
        }
        for &w in &order {
            if only_w
                .as_ref()
                .is_some_and(|l| !l.contains(&w.key().to_owned()))
            {
                continue;
            }
            let p = run_point(&o, w, n, &v4k);
            eprintln!(
                "  {:32} N={n:<3} {:>9} calls/s  p50 {:>8}  p99 {:>8}  errors {}  CPU/call server {:>5.1} µs client {:>5.1} µs  load {:.2}",
                w.label(),
                num(p.rate()),
                us(p.pct(50.0)),
                us(p.pct(99.0)),
                p.errors,
                p.cpu_us_per_call(),
                p.client_cpu_s * 1e6 / p.calls.max(1) as f64,
                p.load1
            );
            res.insert((w, n), p);
        }
    }
    if quick {
        eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
        return;
    }
    // Stdio, one connection, interleaved APEX / cordon bridge.
    let mut stdio: Vec<(&str, Option<Point>, Point)> = Vec::new();
    for (label, write) in [
        ("read / `kv_get`", false),
        ("durable write / `kv_put` 64 B", true),
    ] {
        let a = apex.map(|ap| run_stdio(&o, Some(ap), write));
        let c = run_stdio(&o, None, write);
        eprintln!(
            "  stdio {label:30} apex {:>7} calls/s  cordon bridge {:>7} calls/s",
            a.as_ref().map_or("—".into(), |p| num(p.rate())),
            num(c.rate())
        );
        stdio.push((label, a, c));
    }
    let mut watch = Vec::new();
    for &n in &WATCHERS {
        let (p, from_sent, puts) = run_watch(&o, n);
        eprintln!(
            "  watch fan-out {n:>3} watchers: {puts} commits, p50 {} p99 {} errors {}",
            us(p.pct(50.0)),
            us(p.pct(99.0)),
            p.errors
        );
        watch.push((n, p, from_sent, puts));
    }
    let lmdb = run_lmdb(&o);
    eprintln!("  lmdb durable put {:.0}/s", lmdb.put_durable);
    let load_after = loadavg();

    // ------------------------------------------------------------ markdown
    let mut out = String::new();
    let _ = writeln!(out, "Run conditions: {:.1} s warm-up then {:.1} s measured per point, each server a fresh process; \
        load average (1, 5, 15 min) {load_before} at the start and {load_after} at the end; \
        the whole run took {:.0} s. Short points on a 2-core machine that may be shared: absolute figures can move several-fold between runs (the load column says how busy the machine was); compare the ratios, taken within one run between neighbouring points.\n",
        o.warmup.as_secs_f64(), o.duration.as_secs_f64(), started.elapsed().as_secs_f64());

    let _ = writeln!(out, "### Request/reply over the agent socket\n");
    let _ = writeln!(out, "{} \
        `×floor` = p50 over the raw echo's p50 at the same N; `×rmcp` = calls/s over the bare rmcp echo's calls/s at the same N. \
        Server CPU is utime+stime of the server process over the measured window, per call; RSS: its peak (VmHWM), and its anonymous memory (RssAnon) at the end of the window — the rest is file-backed pages of the LMDB map (store and audit log), page cache the kernel can reclaim.\n", client_note(&o));
    let _ = writeln!(out, "| workload | N | calls/s | p50 | p99 | p99.9 | errors | ×floor (p50) | ×rmcp (calls/s) | server CPU/call | server RSS peak | of it anon | load |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &CONNS {
        for &w in &order {
            let p = &res[&(w, n)];
            let floor = &res[&(W::Echo, n)];
            let rmcp = &res[&(W::Rmcp, n)];
            let _ = writeln!(
                out,
                "| {} | {n} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1} µs | {:.1} MiB | {:.1} MiB | {:.2} |",
                w.label(),
                num(p.rate()),
                us(p.pct(50.0)),
                us(p.pct(99.0)),
                us(p.pct(99.9)),
                p.errors,
                p.pct(50.0) / floor.pct(50.0),
                p.rate() / rmcp.rate(),
                p.cpu_us_per_call(),
                p.hwm_kib as f64 / 1024.0,
                p.anon_kib as f64 / 1024.0,
                p.load1
            );
        }
    }

    let _ = writeln!(
        out,
        "\n### Through stdio, one connection: the APEX-style Python server vs `cordon bridge`\n"
    );
    let _ = writeln!(out, "The APEX-style server is `scripts/bench-apex/server.py` (the official Python SDK's `MCPServer` over py-lmdb, \
        versions pinned in `scripts/bench-apex/requirements.txt`): read / write (one durable LMDB write transaction per call). \
        cordon is the real gateway (policy and audit on) behind `cordon bridge`, spawned and driven the same way. \
        Server RSS: the Python process, or the gateway (the bridge not counted).\n");
    let _ = writeln!(out, "| operation | APEX-style calls/s | APEX p50 | APEX p99 | APEX RSS | cordon calls/s | cordon p50 | cordon p99 | cordon ÷ APEX (calls/s) |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for (label, a, c) in &stdio {
        let (ar, a50, a99, arss, ratio) = match a {
            Some(a) => (
                num(a.rate()),
                us(a.pct(50.0)),
                us(a.pct(99.0)),
                format!("{:.1} MiB", a.hwm_kib as f64 / 1024.0),
                format!("{:.1}×", c.rate() / a.rate()),
            ),
            None => (
                "not run".into(),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
            ),
        };
        let _ = writeln!(
            out,
            "| {label} | {ar} | {a50} | {a99} | {arss} | {} | {} | {} | {ratio} |",
            num(c.rate()),
            us(c.pct(50.0)),
            us(c.pct(99.0))
        );
    }

    let _ = writeln!(out, "\n### `kv_watch` fan-out: one writer, N watchers\n");
    let _ = writeln!(out, "Each watcher holds a `kv_watch` on `/w`; the writer puts `/w/x`, notes the time when the put's reply arrives \
        (the commit is done by then), waits until every watcher has the event, gives them 3 ms to re-arm, and puts again. \
        Latency: each watcher's reply time minus that commit time (floored at 0: a watcher is often answered before the writer has read its own reply, \
        so this is a lower bound); \"from put sent\" counts from when the put was sent instead (an upper bound: it includes the put's own fsync). \
        Errors: events a watcher did not get within 2 s.\n");
    let _ = writeln!(out, "| watchers | commits | deliveries | p50 | p99 | max | p50 from put sent | p99 from put sent | errors | gateway RSS peak |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for (n, p, from_sent, puts) in &watch {
        let _ = writeln!(
            out,
            "| {n} | {puts} | {} | {} | {} | {} | {} | {} | {} | {:.1} MiB |",
            p.calls,
            us(p.pct(50.0)),
            us(p.pct(99.0)),
            us(p.pct(100.0)),
            us(pct(from_sent, 50.0)),
            us(pct(from_sent, 99.0)),
            p.errors,
            p.hwm_kib as f64 / 1024.0
        );
    }

    let _ = writeln!(
        out,
        "\n### LMDB itself (heed, in-process, same filesystem)\n"
    );
    let _ = writeln!(out, "| operation | ops/s |\n|---|---|");
    let _ = writeln!(
        out,
        "| get, one read transaction per get | {} |",
        num(lmdb.get_per_txn)
    );
    let _ = writeln!(
        out,
        "| get, {GET_KEYS} gets per read transaction | {} |",
        num(lmdb.get_one_txn)
    );
    let _ = writeln!(
        out,
        "| put 64 B, one durable commit (fsync) per put | {} |",
        num(lmdb.put_durable)
    );
    let _ = writeln!(
        out,
        "| put 64 B, 100 puts per durable commit | {} |",
        num(lmdb.put_batched)
    );

    // ------------------------------------------------------------ goals
    let _ = writeln!(
        out,
        "\n### Goals (issue 7), as ratios measured in this run\n"
    );
    let g1 = &res[&(W::Get, 1)];
    let r = g1.pct(50.0) / res[&(W::Echo, 1)].pct(50.0);
    goal(
        &mut out,
        r <= 1.5,
        "`kv_get`, 1 connection: p50 ≤ 1.5× the raw ping-pong",
        format!(
            "{r:.2}× ({} vs {})",
            us(g1.pct(50.0)),
            us(res[&(W::Echo, 1)].pct(50.0))
        ),
    );
    let r = g1.rate() / res[&(W::Rmcp, 1)].rate();
    goal(
        &mut out,
        r >= 0.8,
        "`kv_get`, 1 connection: ≥ 0.8× the bare rmcp echo's calls/s",
        format!(
            "{r:.2}× ({} vs {} calls/s)",
            num(g1.rate()),
            num(res[&(W::Rmcp, 1)].rate())
        ),
    );
    let p32 = &res[&(W::Put64, 32)];
    let g32 = &res[&(W::Get, 32)];
    let r = p32.rate() / g32.rate();
    goal(
        &mut out,
        r >= 0.5,
        "durable `kv_put`, 32 connections: ≥ 0.5× `kv_get` at 32",
        format!(
            "{r:.2}× ({} vs {} calls/s)",
            num(p32.rate()),
            num(g32.rate())
        ),
    );
    let r = p32.rate() / lmdb.put_durable;
    goal(
        &mut out,
        r >= 10.0,
        "durable `kv_put`, 32 connections: ≥ 10× LMDB one-fsync-per-put",
        format!(
            "{r:.1}× ({} vs {} puts/s)",
            num(p32.rate()),
            num(lmdb.put_durable)
        ),
    );
    let r = g32.rate() / res[&(W::Rmcp, 32)].rate();
    goal(
        &mut out,
        r >= 0.7,
        "`kv_get`, 32 connections: ≥ 0.7× the bare rmcp echo's calls/s",
        format!(
            "{r:.2}× ({} vs {} calls/s)",
            num(g32.rate()),
            num(res[&(W::Rmcp, 32)].rate())
        ),
    );
    match &stdio[0].1 {
        Some(a) => {
            let r = stdio[0].2.rate() / a.rate();
            goal(
                &mut out,
                r >= 20.0,
                "through stdio, 1 connection: ≥ 20× the APEX-style server's calls/s (reads)",
                format!(
                    "{r:.1}× ({} vs {} calls/s)",
                    num(stdio[0].2.rate()),
                    num(a.rate())
                ),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "- **NOT RUN** through stdio vs the APEX-style server (no --apex-python)"
            );
        }
    }
    let errors256: u64 = order.iter().map(|w| res[&(*w, 256)].errors).sum();
    let g256 = &res[&(W::Get, 256)];
    let rss256 = order[2..]
        .iter()
        .map(|w| res[&(*w, 256)].hwm_kib)
        .max()
        .unwrap_or(0) as f64
        / 1024.0;
    goal(
        &mut out,
        errors256 == 0,
        "256 connections: no errors (every workload)",
        format!("{errors256} errors"),
    );
    goal(
        &mut out,
        g256.pct(99.0) < 10_000.0,
        "256 connections: `kv_get` p99 < 10 ms",
        us(g256.pct(99.0)),
    );
    let anon256 = order[2..]
        .iter()
        .map(|w| res[&(*w, 256)].anon_kib)
        .max()
        .unwrap_or(0) as f64
        / 1024.0;
    goal(
        &mut out,
        rss256 < 64.0,
        "256 connections: gateway RSS < 64 MiB (peak VmHWM over the cordon workloads, LMDB map pages included)",
        format!("{rss256:.1} MiB (anonymous memory at most {anon256:.1} MiB)"),
    );
    if let Some((_, p, _, _)) = watch.iter().find(|(n, _, _, _)| *n == 64) {
        goal(
            &mut out,
            p.pct(99.0) < 5000.0 && p.errors == 0,
            "watch fan-out to 64 watchers: p99 commit-to-reply < 5 ms",
            format!("{} ({} errors)", us(p.pct(99.0)), p.errors),
        );
    }

    match flag("--out") {
        Some(path) => std::fs::write(&path, &out).expect("write --out"),
        None => print!("{out}"),
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
}
