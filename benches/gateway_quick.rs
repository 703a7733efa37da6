//! A quick look at the gateway's speed (not a test, and not the rigorous
//! benchmark harness): starts the real `cordon` binary on a temp store and
//! drives it with a lean client (raw JSON-RPC lines over the Unix socket).
//!
//!     cargo bench --bench gateway_quick
//!
//! Prints sequential kv_get calls/s on one connection, durable kv_put calls/s
//! with 32 concurrent connections, and, as the baseline in the same run,
//! durable kv_put calls/s on one connection (one fsync per call).

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

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("c.toml"),
        "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p.toml\"\nmax_connections_per_agent = 64\n[agents.a]\nrole = \"a\"\n",
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
        .env("CORDON_LOG", "warn")
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
    let get = "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{\"name\":\"kv_get\",\"arguments\":{\"key\":\"/bench/k\"}}}\n";
    for _ in 0..2_000 {
        c.call(get);
    }
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        c.call(get);
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "kv_get, 1 connection, sequential:     {:8.0} calls/s  ({:.1} us/call)",
        n as f64 / s,
        s * 1e6 / n as f64
    );

    let m = 500;
    let t = Instant::now();
    for i in 0..m {
        c.call(&put(&format!("/bench/seq/{i}")));
    }
    let seq = m as f64 / t.elapsed().as_secs_f64();
    println!(
        "kv_put durable, 1 connection:         {seq:8.0} calls/s  (baseline: one fsync per call)"
    );

    let (conns, per) = (32, 300);
    let t = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..conns {
            let sock = &sock;
            scope.spawn(move || {
                let mut conn = Conn::open(sock);
                for i in 0..per {
                    conn.call(&put(&format!("/bench/c{c}/{i}")));
                }
            });
        }
    });
    let par = (conns * per) as f64 / t.elapsed().as_secs_f64();
    println!("kv_put durable, 32 connections:       {par:8.0} calls/s  ({:.1}x the 1-connection rate: group commit)", par / seq);
    // SIGTERM (the kill command: this bench links no signal crate), then reap.
    let _ = Command::new("kill").arg(gw.id().to_string()).status();
    let _ = gw.wait();
}
