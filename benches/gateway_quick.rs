//! A quick look at the gateway's speed (not a test, and not the rigorous
//! benchmark harness): starts the real `cordon` binary on a temp store and
//! drives it with a lean client (raw JSON-RPC lines over the Unix socket).
//!
//!     cargo bench --bench gateway_quick
//!
//! Prints kv_get and durable kv_put calls/s on 1 and 32 connections, with the
//! audit log on and, as the baseline in the same run, off; and the group
//! commit gain (32 connections vs one fsync per call on one connection).

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

struct Figures {
    get_1: f64,
    get_32: f64,
    put_1: f64,
    put_32: f64,
}

fn parallel(
    sock: &Path,
    conns: usize,
    per: usize,
    line: impl Fn(usize, usize) -> String + Sync,
) -> f64 {
    let t = Instant::now();
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
    (conns * per) as f64 / t.elapsed().as_secs_f64()
}

const GET: &str = "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{\"name\":\"kv_get\",\"arguments\":{\"key\":\"/bench/k\"}}}\n";

fn run(audit: bool) -> Figures {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("c.toml"),
        format!("[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p.toml\"\nmax_connections_per_agent = 64\n[audit]\nenabled = {audit}\n[agents.a]\nrole = \"a\"\n"),
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
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        c.call(GET);
    }
    let get_1 = n as f64 / t.elapsed().as_secs_f64();
    let get_32 = parallel(&sock, 32, 1_000, |_, _| GET.to_string());
    let m = 500;
    let t = Instant::now();
    for i in 0..m {
        c.call(&put(&format!("/bench/seq/{i}")));
    }
    let put_1 = m as f64 / t.elapsed().as_secs_f64();
    let put_32 = parallel(&sock, 32, 300, |c, i| put(&format!("/bench/c{c}/{i}")));
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

fn main() {
    // Interleaved, so that drift in the machine's load hits both alike.
    let off = run(false);
    let on = run(true);
    let off2 = run(false);
    let on2 = run(true);
    let avg = |a: f64, b: f64| (a + b) / 2.0;
    println!(
        "{:44} {:>10} {:>10} {:>7}",
        "calls/s (mean of 2 interleaved runs each)", "audit off", "audit on", "on/off"
    );
    for (label, a, b) in [
        (
            "kv_get, 1 connection, sequential",
            avg(off.get_1, off2.get_1),
            avg(on.get_1, on2.get_1),
        ),
        (
            "kv_get, 32 connections",
            avg(off.get_32, off2.get_32),
            avg(on.get_32, on2.get_32),
        ),
        (
            "kv_put durable, 1 connection",
            avg(off.put_1, off2.put_1),
            avg(on.put_1, on2.put_1),
        ),
        (
            "kv_put durable, 32 connections",
            avg(off.put_32, off2.put_32),
            avg(on.put_32, on2.put_32),
        ),
    ] {
        println!("{label:44} {a:>10.0} {b:>10.0} {:>6.2}x", b / a);
    }
    let put_gain = avg(on.put_32, on2.put_32) / avg(on.put_1, on2.put_1);
    println!(
        "group commit, audit on: 32 connections = {put_gain:.1}x the 1-connection durable put rate"
    );
    println!("goal: audit on keeps >= 0.90x of audit off");
}
