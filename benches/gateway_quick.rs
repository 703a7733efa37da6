//! A quick look at the gateway's speed (not a test, and not the rigorous
//! benchmark harness): starts the real `cordon` binary on a temp store and
//! drives it with a lean client (raw JSON-RPC lines over the Unix socket).
//!
//!     cargo bench --bench gateway_quick
//!
//! Prints kv_get and durable kv_put calls/s on 1 and 32 connections, with the
//! audit log on and, as the baseline in the same run, off; and the group
//! commit gain (32 connections vs one fsync per call on one connection).
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const INIT: &str = "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-11-25\",\"capabilities\":{},\"clientInfo\":{\"name\":\"bench\",\"version\":\"0\"}}}\n{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n";

struct Conn {
    r: BufReader<UnixStream>,
    w: UnixStream,
    buf: String,
}

impl Conn {
    fn open(path: &Path) -> Conn {
        let w = UnixStream::connect(path).expect("connect");
        let mut c = Conn {
            r: BufReader::new(w.try_clone().expect("clone")),
            w,
            buf: String::new(),
        };
        c.w.write_all(INIT.as_bytes()).expect("init");
        c.r.read_line(&mut c.buf).expect("init reply");
        c
    }

    fn call(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).expect("write");
        self.buf.clear();
        self.r.read_line(&mut self.buf).expect("read");
        assert!(self.buf.contains("\"isError\":false"), "{}", self.buf);
    }
}

fn put(key: &str) -> String {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{{\"name\":\"kv_put\",\"arguments\":{{\"key\":\"{key}\",\"value\":\"0123456789012345678901234567890123456789012345678901234567890123\"}}}}}}\n")
}

/// Calls/s, and the gateway's CPU time per call (µs), for each workload.
struct Figures {
    get_1: (f64, f64),
    get_32: (f64, f64),
    put_1: (f64, f64),
    put_32: (f64, f64),
}

/// The gateway's user + system CPU time so far, in µs (all its threads).
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks * 10_000.0
}

/// Runs `f` (which makes `calls` calls) and returns (calls/s, gateway CPU µs per call).
fn measure(pid: u32, calls: usize, f: impl FnOnce()) -> (f64, f64) {
    let c0 = cpu_us(pid);
    let t = Instant::now();
    f();
    let secs = t.elapsed().as_secs_f64();
    (calls as f64 / secs, (cpu_us(pid) - c0) / calls as f64)
}

fn parallel(sock: &Path, conns: usize, per: usize, line: impl Fn(usize, usize) -> String + Sync) {
    std::thread::scope(|scope| {
        for c in 0..conns {
            let line = &line;
            scope.spawn(move || {
                let mut conn = Conn::open(sock);
                for i in 0..per {
                    conn.call(&line(c, i));
                }
            });
        }
    });
}

const GET: &str = "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{\"name\":\"kv_get\",\"arguments\":{\"key\":\"/bench/k\"}}}\n";

fn run(audit: bool) -> Figures {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("c.toml"),
        format!("[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p.toml\"\nmax_connections_per_agent = 64\nmax_messages_per_second = 100000000\n[audit]\nenabled = {audit}\n[agents.a]\nrole = \"a\"\n"),
    )
    .expect("config");
    std::fs::write(
        dir.path().join("p.toml"),
        "[roles.a]\ntools = [\"kv_*\"]\nread = [\"/**\"]\nwrite = [\"/**\"]\n",
    )
    .expect("policy");
    let mut gw = Command::new(env!("CARGO_BIN_EXE_cordon"))
        .args(["gateway", "--config"])
        .arg(dir.path().join("c.toml"))
        .env("CORDON_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("gateway");
    let mut ready = String::new();
    BufReader::new(gw.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("ready line");
    let sock = dir.path().join("r/agents/a/mcp.sock");

    let mut c = Conn::open(&sock);
    c.call(&put("/bench/k"));
    for _ in 0..2_000 {
        c.call(GET);
    }
    let pid = gw.id();
    let n = 20_000;
    let get_1 = measure(pid, n, || {
        for _ in 0..n {
            c.call(GET);
        }
    });
    let get_32 = measure(pid, 32_000, || {
        parallel(&sock, 32, 1_000, |_, _| GET.to_string())
    });
    let m = 500;
    let put_1 = measure(pid, m, || {
        for i in 0..m {
            c.call(&put(&format!("/bench/seq/{i}")));
        }
    });
    let put_32 = measure(pid, 32 * 300, || {
        parallel(&sock, 32, 300, |c, i| put(&format!("/bench/c{c}/{i}")))
    });
    // Records of reads are sealed (and their CPU spent) by the next sync; the
    // CPU columns above include what was sealed during each phase, not after.
    // SIGTERM (the kill command: this bench links no signal crate), then reap.
    let _ = Command::new("kill").arg(gw.id().to_string()).status();
    let _ = gw.wait();
    Figures {
        get_1,
        get_32,
        put_1,
        put_32,
    }
}

/// Which figure of a run a table row shows.
type Pick = fn(&Figures) -> (f64, f64);

fn main() {
    // Interleaved, so that drift in the machine's load hits both alike.
    let runs: Vec<(bool, Figures)> = [false, true, false, true]
        .into_iter()
        .map(|audit| (audit, run(audit)))
        .collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mean = |audit: bool, f: fn(&Figures) -> (f64, f64)| {
        let xs: Vec<(f64, f64)> = runs
            .iter()
            .filter(|(a, _)| *a == audit)
            .map(|(_, r)| f(r))
            .collect();
        let n = xs.len() as f64;
        (
            xs.iter().map(|x| x.0).sum::<f64>() / n,
            xs.iter().map(|x| x.1).sum::<f64>() / n,
        )
    };
    println!(
        "{:36} {:>10} {:>10} {:>7}   {:>12} {:>12}",
        "mean of 2 interleaved runs each",
        "off call/s",
        "on call/s",
        "on/off",
        "off CPU µs",
        "on CPU µs"
    );
    let rows: [(&str, Pick); 4] = [
        ("kv_get, 1 connection, sequential", |f| f.get_1),
        ("kv_get, 32 connections", |f| f.get_32),
        ("kv_put durable, 1 connection", |f| f.put_1),
        ("kv_put durable, 32 connections", |f| f.put_32),
    ];
    for (label, pick) in rows {
        let (off, on) = (mean(false, pick), mean(true, pick));
        println!(
            "{label:36} {:>10.0} {:>10.0} {:>6.2}x   {:>12.1} {:>12.1}",
            off.0,
            on.0,
            on.0 / off.0,
            off.1,
            on.1
        );
    }
    let gain = mean(true, |f| f.put_32).0 / mean(true, |f| f.put_1).0;
    println!(
        "group commit, audit on: 32 connections = {gain:.1}x the 1-connection durable put rate"
    );
    println!("goal: audit on keeps >= 0.90x of audit off (CPU µs = the gateway's user+system time per call, all threads)");
}
