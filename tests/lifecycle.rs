//! Connections and sessions that end when they end (issue 13): ids echoed
//! exactly whatever their size, the id read past what cannot parse, a record
//! for every refused tools/call, a closed peer's watches freed at once while
//! a half-closed one still gets its replies, and a SIGTERM under load that
//! answers every request and loses no acknowledged write.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{Client, Gateway, Signal, CODER};
use serde_json::{json, Value};

#[test]
fn ids_of_any_size_are_echoed_exactly() {
    let g = Gateway::start();
    let mut c = g.client();
    // Beyond u64 and i64, negative, and a string with an escape: each reply
    // carries the id byte for byte (a JSON parser into f64 would change it).
    for id in [
        "123456789012345678901234567890",
        "18446744073709551616",
        "-9223372036854775809",
        "0",
        r#""a\u0062c""#,
    ] {
        c.send_line(format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#).as_bytes());
        let line = c.recv_line().unwrap();
        let expect = if id.starts_with('"') { r#""abc""# } else { id };
        assert!(
            line.starts_with(&format!(r#"{{"jsonrpc":"2.0","id":{expect},"result""#)),
            "{id}: {line}"
        );
        let call = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"kv_get","arguments":{{"key":"/nothing"}}}}}}"#
        );
        c.send_line(call.as_bytes());
        let line = c.recv_line().unwrap();
        assert!(line.contains(&format!(r#""id":{expect},"#)), "{id}: {line}");
    }
    // Not ids: a float, an object; answered with a null id.
    for bad in ["1.5", "{\"a\":1}"] {
        c.send_line(format!(r#"{{"jsonrpc":"2.0","id":{bad},"method":"ping"}}"#).as_bytes());
        let r = c.recv().unwrap();
        assert_eq!(r["id"], Value::Null, "{r}");
        assert_eq!(r["error"]["code"], -32600, "{r}");
    }
}

#[test]
fn a_line_that_does_not_parse_is_answered_with_its_id_when_it_can_be_read() {
    let g = Gateway::start();
    let mut c = g.client();
    c.send_line(br#"{"jsonrpc":"2.0","id":12,"method":"ping","params":{,}"#);
    let r = c.recv().unwrap();
    assert_eq!(r["id"], 12, "{r}");
    assert_eq!(r["error"]["code"], -32700, "{r}");
    // Nested deeper than the parser goes, before and inside the params.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    c.send_line(format!(r#"{{"jsonrpc":"2.0","id":"d","method":"tools/call","params":{{"name":"kv_get","arguments":{{"key":"/x","z":{deep}}}}}}}"#).as_bytes());
    let r = c.recv().unwrap();
    assert_eq!(r["id"], "d", "{r}");
    assert!(r["error"]["code"].is_i64(), "{r}");
    // Control: the id cannot be read at all.
    c.send_line(br#"{"jsonrpc":"2.0","method":"ping","id":"#);
    let r = c.recv().unwrap();
    assert_eq!(r["id"], Value::Null, "{r}");
    assert_eq!(r["error"]["code"], -32700, "{r}");
    // The session goes on.
    assert!(c.request("ping", json!({}))["result"].is_object());
}

#[test]
fn every_refused_tools_call_has_a_record_even_before_it_is_dispatched() {
    let mut g = Gateway::start();
    let mut c = g.client();
    let lines: [&[u8]; 5] = [
        // An id that is not one.
        br#"{"jsonrpc":"2.0","id":{"x":1},"method":"tools/call","params":{"name":"kv_get","arguments":{"key":"/a"}}}"#,
        // Not JSON-RPC 2.0.
        br#"{"jsonrpc":"1.0","id":1,"method":"tools/call","params":{"name":"kv_get","arguments":{"key":"/a"}}}"#,
        // A batch outside 2025-03-26.
        br#"[{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"kv_put","arguments":{"key":"/a","value":1}}}]"#,
        // A line that does not parse.
        br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"kv_get",}"#,
        // A call sent as a notification: not run, no reply, but recorded.
        br#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"kv_delete","arguments":{"key":"/a"}}}"#,
    ];
    for line in lines {
        c.send_line(line);
    }
    // Four replies (the notification gets none), then a control call.
    for _ in 0..4 {
        assert!(c.recv().unwrap()["error"]["code"].is_i64());
    }
    c.ok("kv_put", json!({"key": "/ok", "value": 1}));
    drop(c);
    assert!(g.stop().success());
    let calls: Vec<Value> = g
        .audit_export()
        .into_iter()
        .filter(|r| r["event"] == "call")
        .collect();
    let invalid: Vec<&Value> = calls
        .iter()
        .filter(|r| r["decision"] == "invalid")
        .collect();
    assert_eq!(invalid.len(), lines.len(), "{invalid:#?}");
    assert!(invalid.iter().all(|r| r["agent"] == "coder"));
    let tools: BTreeSet<&str> = invalid.iter().filter_map(|r| r["tool"].as_str()).collect();
    for tool in ["kv_get", "kv_put", "kv_delete"] {
        assert!(tools.contains(tool), "{tool} missing: {invalid:#?}");
    }
    assert!(calls.iter().any(|r| r["decision"] == "allow"), "control");
    g.assert_audit_verifies();
}

fn watch(c: &mut Client, timeout_ms: u64) -> u64 {
    c.start(
        "tools/call",
        json!({"name": "kv_watch", "arguments": {"prefix": "/w", "since_revision": 1_000_000, "timeout_ms": timeout_ms}}),
    )
}

fn wait_watching(g: &Gateway, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while g.status()["watching"] != n {
        assert!(Instant::now() < deadline, "watching never became {n}");
        std::thread::yield_now();
    }
}

#[test]
fn a_closed_connection_frees_its_slot_and_its_watches_at_once() {
    // One connection per agent: the second connects only once the first's
    // slot is free. The watch would hold it for 5 minutes.
    let g = Gateway::start_with("max_connections_per_agent = 1", CODER);
    let mut first = g.client();
    watch(&mut first, 300_000);
    wait_watching(&g, 1);
    // Control: while the first is open, a second is refused.
    let mut refused = Client::connect_raw(&g.socket("coder")).unwrap();
    let r = refused.refusal();
    assert_eq!(r["error"]["code"], -32014, "{r}");
    drop(refused);
    drop(first);
    // Freed on the peer's close, not at the watch's end: polled well within
    // the watch's 5 minutes.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut c = Client::connect_raw(&g.socket("coder")).unwrap();
        c.try_send(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}));
        let r = c.recv().unwrap();
        if r["result"].is_object() {
            break;
        }
        assert_eq!(r["error"]["code"], -32014, "{r}");
        assert!(Instant::now() < deadline, "the slot was never freed");
    }
    wait_watching(&g, 0);
}

#[test]
fn a_half_closed_client_gets_the_reply_to_its_watch() {
    let g = Gateway::start();
    let mut c = g.client();
    // From the current revision: the next write wakes it.
    let now = c.ok("kv_put", json!({"key": "/other", "value": 0}))["revision"].clone();
    let id = c.start(
        "tools/call",
        json!({"name": "kv_watch", "arguments": {"prefix": "/w", "since_revision": now, "timeout_ms": 300_000}}),
    );
    wait_watching(&g, 1);
    c.close_write();
    // A write wakes the watch; its reply reaches the half-closed client.
    g.client().ok("kv_put", json!({"key": "/w/1", "value": 1}));
    let r = c.recv().expect("the watch's reply");
    assert_eq!(r["id"], id, "{r}");
    assert_eq!(r["result"]["isError"], false, "{r}");
    assert!(c.recv().is_none(), "then the gateway closes");
}

/// A pipelining client: one thread sends kv_put after kv_put until it sees
/// the gateway say it is stopping, the other reads every reply.
#[test]
fn sigterm_under_load_answers_every_request_and_keeps_every_acknowledged_write() {
    let mut g = Gateway::start();
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut threads = Vec::new();
    for n in 0..4 {
        let stopping = stopping.clone();
        let sent = sent.clone();
        let path = g.socket("coder");
        threads.push(std::thread::spawn(move || load(n, &path, &stopping, &sent)));
    }
    // Shut down once every client has had writes acknowledged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "no load");
        std::thread::yield_now();
    }
    g.signal(Signal::TERM);
    let mut acked = Vec::new();
    let mut stops = 0;
    for t in threads {
        let r = t.join().unwrap();
        assert!(
            r.unanswered.is_empty(),
            "requests without a reply: {:?}",
            r.unanswered
        );
        stops += r.stopping;
        acked.extend(r.acked);
    }
    assert!(g.child.take().unwrap().wait().unwrap().success());
    assert!(stops > 0, "no client was told the gateway is stopping");
    // Every acknowledged write is in the store.
    g.launch().unwrap();
    let mut c = g.client();
    for key in &acked {
        let got = c.ok("kv_get", json!({"key": key}));
        assert!(
            got["revision"].is_u64(),
            "acknowledged {key} is lost: {got}"
        );
    }
    eprintln!(
        "{} writes acknowledged, {} requests told the gateway is stopping",
        acked.len(),
        stops
    );
    g.assert_audit_verifies();
}

struct Load {
    acked: Vec<String>,
    unanswered: Vec<u64>,
    stopping: usize,
}

fn load(
    n: usize,
    path: &std::path::Path,
    stopping: &std::sync::atomic::AtomicBool,
    sent_so_far: &std::sync::atomic::AtomicU64,
) -> Load {
    use std::sync::atomic::Ordering;
    // A raw connection: this thread writes, a second one reads.
    let mut w = UnixStream::connect(path).unwrap();
    let mut r = BufReader::new(w.try_clone().unwrap());
    w.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-11-25\",\"capabilities\":{},\"clientInfo\":{\"name\":\"load\",\"version\":\"0\"}}}\n").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let told = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let told = told.clone();
        std::thread::spawn(move || {
            let mut replies: BTreeMap<u64, Value> = BTreeMap::new();
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return replies;
                }
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["error"]["code"] == -32013 {
                    told.store(true, Ordering::Release);
                }
                if let Some(id) = v["id"].as_u64() {
                    replies.insert(id, v);
                }
            }
        })
    };
    let mut sent: BTreeMap<u64, String> = BTreeMap::new();
    let mut id = 1u64;
    while !told.load(Ordering::Acquire) {
        let key = format!("/load/{n}/{id}");
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "kv_put", "arguments": {"key": key, "value": id}}});
        if w.write_all(format!("{msg}\n").as_bytes()).is_err() {
            break;
        }
        sent.insert(id, key);
        id += 1;
        sent_so_far.fetch_add(1, Ordering::Relaxed);
    }
    stopping.store(true, Ordering::Release);
    let replies = reader.join().unwrap();
    let mut out = Load {
        acked: Vec::new(),
        unanswered: Vec::new(),
        stopping: 0,
    };
    for (id, key) in sent {
        match replies.get(&id) {
            None => out.unanswered.push(id),
            Some(v) if v["error"]["code"] == -32013 => out.stopping += 1,
            Some(v) if v["result"]["isError"] == false => out.acked.push(key),
            Some(_) => {}
        }
    }
    out
}
