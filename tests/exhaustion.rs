//! One agent cannot exhaust what the agents share: the real gateway, real
//! sockets, a real LMDB store. A client that never reads its replies, floods of
//! refused calls with huge names, a message rate past its bound; each with
//! another agent whose calls must keep succeeding (the control).
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Gateway};
use serde_json::{json, Value};

const AGENTS: &str = "[agents.flood]\nrole = \"flood\"\n[agents.other]\nrole = \"coder\"\n";
const POLICY: &str = r#"
[roles.coder]
tools = ["kv_*"]
read = ["/**"]
write = ["/**"]
delete = ["/**"]

[roles.flood]
tools = ["kv_get", "kv_put"]
read = ["/flood/**"]
write = ["/flood/**"]
"#;

/// The gateway's anonymous memory (heap, stacks), in KiB: what a flood would
/// grow. The LMDB map is file-backed and not counted.
fn rss_anon_kib(g: &Gateway) -> u64 {
    let pid = g.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn put_line(id: u64) -> Vec<u8> {
    let m = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "kv_put", "arguments": {"key": format!("/flood/{}", id % 64), "value": "v".repeat(2000)}}});
    let mut line = m.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// Bytes of the audit log as exported (canonical JSON, one line each).
fn audit_bytes(records: &[Value]) -> usize {
    records.iter().map(|r| r.to_string().len() + 1).sum()
}

/// The documented bound on the gateway's memory under a client that never
/// reads (README: backpressure): replies in the making are at most
/// `max_pending_replies` per connection and unread bytes `max_unsent_bytes`.
const FLOOD_BOUND_KIB: u64 = 64 * 1024;

#[test]
fn a_client_that_never_reads_its_replies_cannot_grow_the_gateway() {
    let g = Gateway::start_with_policy("", AGENTS, POLICY);
    let mut other = Client::connect(&g.socket("other"));
    let mut flood = Client::connect(&g.socket("flood"));
    other.ok("kv_put", json!({"key": "/warm", "value": 1}));
    flood.ok("kv_put", json!({"key": "/flood/warm", "value": 1}));
    let baseline = rss_anon_kib(&g);

    // The flooder writes pipelined kv_put lines for 10 s and reads nothing.
    let mut raw = std::os::unix::net::UnixStream::connect(g.socket("flood")).unwrap();
    raw.write_all(
        format!(
            "{}\n",
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "flood", "version": "0"}}})
        )
        .as_bytes(),
    )
    .unwrap();
    raw.set_write_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut raw = raw.try_clone().unwrap();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let mut line = put_line(1);
            let mut off = 0;
            loop {
                match raw.write(&line[off..]) {
                    Ok(n) => off += n,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => panic!("flood write: {e}"),
                }
                if off == line.len() {
                    sent += 1;
                    if done.load(Ordering::Acquire) {
                        return sent;
                    }
                    line = put_line(sent + 1);
                    off = 0;
                }
            }
        })
    };
    // Meanwhile the other agent's calls all succeed, and the gateway's
    // memory is sampled.
    let start = Instant::now();
    let mut peak = baseline;
    let mut other_calls = 0;
    while start.elapsed() < Duration::from_secs(10) {
        other.ok(
            "kv_put",
            json!({"key": format!("/o/{}", other_calls % 16), "value": other_calls}),
        );
        other.ok("kv_get", json!({"key": "/warm"}));
        other_calls += 2;
        peak = peak.max(rss_anon_kib(&g));
    }
    done.store(true, Ordering::Release);
    // The writer finishes the line it is on: the gateway must read again
    // once its replies are read, so drain them meanwhile.
    let mut reader = std::io::BufReader::new(raw.try_clone().unwrap());
    raw.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut ids = BTreeSet::new();
    let mut line = String::new();
    // The initialize reply first.
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    let sent = loop {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        let r: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(r["result"]["isError"], false, "{r}");
        ids.insert(r["id"].as_u64().unwrap());
        if writer.is_finished() {
            break writer.join().unwrap();
        }
    };
    while (ids.len() as u64) < sent {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        let r: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(r["result"]["isError"], false, "{r}");
        ids.insert(r["id"].as_u64().unwrap());
    }
    assert_eq!(ids, (1..=sent).collect(), "every request answered once");
    println!(
        "never-reading client: {sent} kv_put sent in 10 s; gateway RssAnon {baseline} KiB before, peak {peak} KiB; other agent: {other_calls} calls, all ok"
    );
    assert!(
        peak < baseline + FLOOD_BOUND_KIB,
        "gateway grew from {baseline} to {peak} KiB"
    );
    drop(reader);
    drop(raw);
    // Everything the connection held is freed when it closes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let now = rss_anon_kib(&g);
        if now < baseline + 16 * 1024 || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("after close: {after} KiB");
    assert!(after < baseline + 16 * 1024, "{after} KiB after close");
    other.ok("kv_get", json!({"key": "/warm"}));
}

#[test]
fn refusal_floods_are_counted_in_full_and_bounded_in_size() {
    let mut g = Gateway::start_with_policy(
        "",
        &format!("{AGENTS}\n[audit]\nsummary_interval = \"1s\"\n"),
        POLICY,
    );
    let before = g.audit_export();
    let mut flood = Client::connect(&g.socket("flood"));
    let mut other = Client::connect(&g.socket("other"));
    let mut refused = 0u64;
    // 80 calls to an unknown tool with a 500 kB name.
    let name = format!("nope{}", "n".repeat(500_000));
    for _ in 0..80 {
        let r = flood.request("tools/call", json!({"name": name, "arguments": {}}));
        assert_eq!(r["error"]["code"], -32602, "{}", &r.to_string()[..200]);
        refused += 1;
    }
    // Then a flood of denied calls: a key outside the role, a tool outside it.
    for i in 0..1500 {
        let code = flood.err("kv_put", json!({"key": format!("/secret/{i}"), "value": 1}));
        assert_eq!(code, "denied");
        let r = flood.request(
            "tools/call",
            json!({"name": "kv_delete", "arguments": {"key": "/flood/x"}}),
        );
        assert_eq!(r["error"]["code"], -32010, "{r}");
        refused += 2;
    }
    // Control: the other agent writes meanwhile, and so does the flooder
    // where its role allows it.
    other.ok("kv_put", json!({"key": "/o", "value": 1}));
    flood.ok("kv_put", json!({"key": "/flood/ok", "value": 1}));
    g.stop();
    let after = g.audit_export();
    let new = &after[before.len()..];
    let grew = audit_bytes(new);
    let largest = new.iter().map(|r| r.to_string().len()).max().unwrap();
    let flood_recs: Vec<&Value> = new.iter().filter(|r| r["agent"] == "flood").collect();
    let one_by_one = flood_recs
        .iter()
        .filter(|r| r["event"] == "call" && r["decision"] != "allow")
        .count() as u64;
    let summaries: Vec<&&Value> = flood_recs
        .iter()
        .filter(|r| r["event"] == "refusals")
        .collect();
    let summarised: u64 = summaries
        .iter()
        .map(|r| r["detail"]["count"].as_u64().unwrap())
        .sum();
    println!(
        "refusal flood: {refused} refused calls ({} MB sent as names alone) -> {one_by_one} records one by one + {} summaries counting {summarised}; audit grew {grew} bytes; largest record {largest} bytes",
        80 * 500_000 / 1_000_000,
        summaries.len()
    );
    assert_eq!(
        one_by_one + summarised,
        refused,
        "every refused call is counted"
    );
    assert!(one_by_one <= 240, "budget: {one_by_one}");
    assert!(!summaries.is_empty());
    assert!(largest < 8 * 1024, "a record stays a few KiB: {largest}");
    assert!(grew < 1 << 20, "the audit grew {grew} bytes");
    // A cut name is still identifiable: its size and digest are kept.
    let big = flood_recs
        .iter()
        .find(|r| r["detail"]["truncated"]["tool"]["bytes"] == name.len())
        .expect("a record of the long name");
    assert_eq!(
        big["detail"]["truncated"]["tool"]["sha256"],
        cordon::audit::sha256_hex(name.as_bytes())
    );
    // The other agent's write and the flooder's allowed one are recorded.
    assert!(new
        .iter()
        .any(|r| r["agent"] == "other" && r["tool"] == "kv_put" && r["decision"] == "allow"));
    assert!(new
        .iter()
        .any(|r| r["agent"] == "flood" && r["keys"] == json!(["/flood/ok"])));
    g.assert_audit_verifies();
}

#[test]
fn every_message_counts_against_the_agents_rate_and_waits_past_it() {
    let g = Gateway::start_with_policy("max_messages_per_second = 20\n", AGENTS, POLICY);
    let mut flood = Client::connect(&g.socket("flood"));
    // 120 pings and listings pipelined: past the burst they wait, none is
    // refused or lost.
    let ids: Vec<u64> = (0..120)
        .map(|i| {
            let method = if i % 2 == 0 { "ping" } else { "tools/list" };
            flood.start(method, json!({}))
        })
        .collect();
    for id in ids {
        let r = flood.recv().unwrap();
        assert_eq!(r["id"], id);
        assert!(r.get("result").is_some(), "{r}");
    }
    let s = g.status();
    let throttled = s["agents"]["flood"]["flow"]["throttled_messages"]
        .as_u64()
        .unwrap();
    assert!(throttled >= 90, "{s}");
    // Control: the other agent, within its rate, waited for nothing.
    let mut other = Client::connect(&g.socket("other"));
    other.request("ping", json!({}));
    let s = g.status();
    assert_eq!(s["agents"]["other"]["flow"]["throttled_messages"], 0, "{s}");
}

#[test]
fn calls_per_minute_counts_unknown_and_denied_tools_too() {
    let policy = format!(
        "{POLICY}\n[roles.slow]\ntools = [\"kv_get\"]\nread = [\"/**\"]\nlimits = {{ calls_per_minute = 5 }}\n"
    );
    let agents = "[agents.slow]\nrole = \"slow\"\n[agents.slow2]\nrole = \"slow\"\n";
    let g = Gateway::start_with_policy("", agents, &policy);
    let mut c = Client::connect(&g.socket("slow"));
    for _ in 0..3 {
        let r = c.request("tools/call", json!({"name": "nope", "arguments": {}}));
        assert_eq!(r["error"]["code"], -32602, "{r}");
    }
    for _ in 0..2 {
        let r = c.request(
            "tools/call",
            json!({"name": "kv_put", "arguments": {"key": "/a", "value": 1}}),
        );
        assert_eq!(r["error"]["code"], -32010, "{r}");
    }
    // Five refused calls took the minute's five tokens.
    assert_eq!(c.err("kv_get", json!({"key": "/a"})), "rate_limited");
    let r = c.request("tools/call", json!({"name": "nope", "arguments": {}}));
    assert_eq!(
        r["result"]["structuredContent"]["error"]["code"], "rate_limited",
        "{r}"
    );
    // Control: another agent of the role has its own five.
    let mut d = Client::connect(&g.socket("slow2"));
    for _ in 0..5 {
        assert_eq!(d.err("kv_get", json!({"key": "/a"})), "not_found");
    }
    assert_eq!(d.err("kv_get", json!({"key": "/a"})), "rate_limited");
}

#[test]
fn a_flood_of_refused_connections_is_summarised_in_the_audit_and_the_log() {
    let mut g = Gateway::start_with_policy(
        "max_connections_per_agent = 1\n",
        &format!("{AGENTS}\n[audit]\nsummary_interval = \"1s\"\n"),
        POLICY,
    );
    let _held = Client::connect(&g.socket("flood"));
    let n = 400;
    for _ in 0..n {
        // Refused at accept: the gateway answers and closes once we close
        // our side (reading to the end is what makes each one count here).
        let mut s = std::os::unix::net::UnixStream::connect(g.socket("flood")).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut answer).unwrap();
    }
    // Control: the other agent is served meanwhile.
    let mut other = Client::connect(&g.socket("other"));
    other.ok("kv_put", json!({"key": "/o", "value": 1}));
    g.stop();
    let records = g.audit_export();
    let one_by_one = records
        .iter()
        .filter(|r| r["event"] == "connection_refused" && r["agent"] == "flood")
        .count() as u64;
    let summarised: u64 = records
        .iter()
        .filter(|r| r["event"] == "refusals" && r["agent"] == "flood")
        .map(|r| r["detail"]["by"]["connection"].as_u64().unwrap_or(0))
        .sum();
    let logged = g.log().matches("connection refused:").count() as u64;
    println!("refused connections: {n} -> {one_by_one} records + {summarised} summarised; {logged} log lines");
    assert_eq!(one_by_one + summarised, n);
    assert!(one_by_one <= 240, "{one_by_one}");
    assert_eq!(logged, one_by_one, "the log is bounded like the audit");
}
