//! The gateway end to end: the real binary, real sockets, a real LMDB store in
//! a temp dir, and a raw JSON-RPC client.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use common::{Client, Gateway, Signal, BIN, CODER};
use serde_json::{json, Value};

#[test]
fn cas_counter_from_many_clients_is_exact() {
    let g = Gateway::start();
    const CLIENTS: usize = 8;
    const INCREMENTS: u64 = 25;
    let sock = g.socket("coder");
    std::thread::scope(|s| {
        for _ in 0..CLIENTS {
            let sock = sock.clone();
            s.spawn(move || {
                let mut c = Client::connect(&sock);
                let mut done = 0;
                while done < INCREMENTS {
                    let r = c.call("kv_get", json!({"key": "/counter"}));
                    let (value, rev) = if r["isError"] == true {
                        (0, 0)
                    } else {
                        let e = &r["structuredContent"];
                        (
                            e["value"].as_u64().unwrap(),
                            e["revision"].as_u64().unwrap(),
                        )
                    };
                    let r = c.call(
                        "kv_put",
                        json!({"key": "/counter", "value": value + 1, "if_revision": rev}),
                    );
                    if r["isError"] == true {
                        assert_eq!(r["structuredContent"]["error"]["code"], "conflict", "{r}");
                    } else {
                        done += 1;
                    }
                }
            });
        }
    });
    let mut c = g.client();
    let v = c.ok("kv_get", json!({"key": "/counter"}));
    assert_eq!(v["value"], CLIENTS as u64 * INCREMENTS);
}

#[test]
fn txn_with_failing_check_writes_nothing() {
    let g = Gateway::start();
    let mut c = g.client();
    c.ok("kv_put", json!({"key": "/t/guard", "value": "v1"}));
    let before = c.ok("kv_get", json!({"key": "/t/guard"}))["revision"].clone();
    let code = c.err(
        "kv_txn",
        json!({"checks": [{"key": "/t/guard", "value": "v0"}],
               "ops": [{"op": "put", "key": "/t/a", "value": 1}, {"op": "delete", "key": "/t/guard"}]}),
    );
    assert_eq!(code, "check_failed");
    assert_eq!(c.err("kv_get", json!({"key": "/t/a"})), "not_found");
    assert_eq!(
        c.ok("kv_get", json!({"key": "/t/guard"}))["revision"],
        before
    );
    // An op-level CAS failure after a successful op undoes that op too.
    let code = c.err(
        "kv_txn",
        json!({"ops": [{"op": "put", "key": "/t/a", "value": 1},
                       {"op": "put", "key": "/t/guard", "value": 2, "if_revision": 0}]}),
    );
    assert_eq!(code, "conflict");
    assert_eq!(c.err("kv_get", json!({"key": "/t/a"})), "not_found");
}

#[test]
fn txn_of_100_puts_is_visible_all_at_once() {
    let g = Gateway::start();
    let sock = g.socket("coder");
    let mut writer = g.client();
    let mut reader = Client::connect(&sock);
    let ops: Vec<Value> = (0..100)
        .map(|i| json!({"op": "put", "key": format!("/batch/k{i:03}"), "value": i}))
        .collect();
    // Pipeline: send the txn, then read the prefix from another connection until
    // the keys appear. A partial commit would show up as 0 < count < 100.
    let id = writer.start(
        "tools/call",
        json!({"name": "kv_txn", "arguments": {"ops": ops}}),
    );
    let mut seen_counts = BTreeSet::new();
    loop {
        let page = reader.ok("kv_list", json!({"prefix": "/batch", "limit": 1000}));
        let n = page["keys"].as_array().unwrap().len();
        seen_counts.insert(n);
        if n > 0 {
            let revs: BTreeSet<u64> = page["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["revision"].as_u64().unwrap())
                .collect();
            assert_eq!(revs.len(), 1, "one revision for the whole txn");
            break;
        }
    }
    assert!(
        seen_counts.iter().all(|n| *n == 0 || *n == 100),
        "{seen_counts:?}"
    );
    let r = writer.recv().unwrap();
    assert_eq!(r["id"], id);
    assert_eq!(
        r["result"]["structuredContent"]["results"]
            .as_array()
            .unwrap()
            .len(),
        100
    );
}

#[test]
fn watch_replays_in_order_wakes_on_commit_and_times_out() {
    let g = Gateway::start();
    let mut c = g.client();
    let start = c.ok("kv_put", json!({"key": "/other", "value": 0}))["revision"]
        .as_u64()
        .unwrap();
    c.ok("kv_put", json!({"key": "/w/a", "value": 1}));
    c.ok("kv_put", json!({"key": "/elsewhere", "value": 1}));
    c.ok("kv_put", json!({"key": "/w/b", "value": 2}));
    c.ok("kv_delete", json!({"key": "/w/a"}));
    let r = c.ok(
        "kv_watch",
        json!({"prefix": "/w", "since_revision": start, "timeout_ms": 0}),
    );
    let events = r["events"].as_array().unwrap();
    let got: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().into(),
                e["key"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("put".into(), "/w/a".into()),
            ("put".into(), "/w/b".into()),
            ("delete".into(), "/w/a".into())
        ]
    );
    let revs: Vec<u64> = events
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    let now = r["revision"].as_u64().unwrap();
    assert_eq!(now, start + 4);

    // Nothing new: empty at the timeout, and says so.
    let r = c.ok(
        "kv_watch",
        json!({"prefix": "/w", "since_revision": now, "timeout_ms": 50}),
    );
    assert_eq!(r["events"], json!([]));
    assert_eq!(r["timed_out"], true);

    // A waiting watch is woken by a commit from another connection. The ping
    // sent after the watch on the same connection is answered first, which
    // shows the watch was still waiting.
    let watch_id = c.start(
        "tools/call",
        json!({"name": "kv_watch", "arguments": {"prefix": "/w", "since_revision": now, "timeout_ms": 300000}}),
    );
    let ping = c.request("ping", json!({}));
    assert!(ping.get("result").is_some(), "{ping}");
    let mut other = g.client();
    other.ok("kv_put", json!({"key": "/unrelated", "value": 1}));
    other.ok("kv_put", json!({"key": "/w/c", "value": 3}));
    let r = c.recv().unwrap();
    assert_eq!(r["id"], watch_id);
    let r = &r["result"]["structuredContent"];
    assert_eq!(r["timed_out"], false, "{r}");
    assert_eq!(r["events"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["events"][0]["key"], "/w/c");
    assert_eq!(r["events"][0]["value"], 3);
}

#[test]
fn pagination_over_10000_keys_returns_each_exactly_once() {
    let g = Gateway::start();
    let mut c = g.client();
    for batch in 0..100 {
        let ops: Vec<Value> = (0..100)
            .map(|i| json!({"op": "put", "key": format!("/p/{batch:02}/{i:02}"), "value": batch * 100 + i}))
            .collect();
        c.ok("kv_txn", json!({"ops": ops}));
    }
    // Keys right next to the prefix that must not be listed.
    c.ok("kv_put", json!({"key": "/p!", "value": 0}));
    c.ok("kv_put", json!({"key": "/pq", "value": 0}));
    for (tool, field, limit) in [("kv_list", "keys", 333), ("kv_scan", "entries", 1000)] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut args = json!({"prefix": "/p", "limit": limit});
            if let Some(cur) = &cursor {
                args["cursor"] = json!(cur);
            }
            let page = c.ok(tool, args);
            pages += 1;
            for item in page[field].as_array().unwrap() {
                seen.push(item["key"].as_str().unwrap().to_string());
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => break,
            }
        }
        assert_eq!(seen.len(), 10_000, "{tool}");
        let unique: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), 10_000, "{tool}: duplicates");
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "{tool}: not in key order"
        );
        assert!(pages >= 10_000 / limit, "{tool}: {pages} pages");
    }
    let over = c.err("kv_list", json!({"prefix": "/p", "limit": 1_000_000}));
    assert_eq!(over, "too_large");
}

#[test]
fn data_survives_sigterm_and_sigkill() {
    let mut g = Gateway::start();
    {
        let mut c = g.client();
        c.ok("kv_put", json!({"key": "/durable/a", "value": {"n": 1}}));
    }
    assert!(g.stop().success());
    assert!(!g.socket("coder").exists(), "socket removed at shutdown");
    g.launch().unwrap();
    {
        let mut c = g.client();
        assert_eq!(
            c.ok("kv_get", json!({"key": "/durable/a"}))["value"],
            json!({"n": 1})
        );
        for i in 0..50 {
            c.ok(
                "kv_put",
                json!({"key": format!("/durable/k{i}"), "value": i}),
            );
        }
    }
    // Every acknowledged write is on disk: a crash loses none of them. The
    // crash also leaves a stale socket behind, which the next start replaces.
    g.kill();
    assert!(g.socket("coder").exists());
    g.launch().unwrap();
    let mut c = g.client();
    let page = c.ok("kv_scan", json!({"prefix": "/durable", "limit": 100}));
    assert_eq!(page["entries"].as_array().unwrap().len(), 51);
    assert_eq!(c.ok("kv_get", json!({"key": "/durable/k49"}))["value"], 49);
}

#[test]
fn sigterm_finishes_a_waiting_watch_and_exits_zero() {
    let mut g = Gateway::start();
    let mut c = g.client();
    let id = c.start(
        "tools/call",
        json!({"name": "kv_watch", "arguments": {"prefix": "/", "since_revision": 0, "timeout_ms": 300000}}),
    );
    // The watch must be waiting (not merely sent) when the signal comes: a
    // call that starts after shutdown began is refused instead.
    let mut rounds = 0;
    while g.status()["watching"] != 1 {
        rounds += 1;
        assert!(rounds < 100_000, "the watch never started waiting");
        assert!(c.request("ping", json!({})).get("result").is_some());
    }
    g.signal(Signal::TERM);
    let r = c
        .recv()
        .expect("the watch is answered before the connection closes");
    assert_eq!(r["id"], id);
    assert_eq!(r["result"]["structuredContent"]["events"], json!([]), "{r}");
    assert!(c.recv().is_none(), "connection closed after shutdown");
    let status = g.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn second_gateway_is_refused() {
    let g = Gateway::start();
    // Same store: the store lock refuses it.
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&g.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another cordon gateway"), "{err}");
    // Another store, same sockets: the live socket refuses it.
    let other = g.dir.join("other.toml");
    std::fs::write(
        &other,
        format!("[gateway]\nstore = \"state/store2\"\nruntime_dir = \"state/run\"\npolicy = \"policy.toml\"\n{CODER}"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    // The first one still serves.
    g.client()
        .ok("kv_put", json!({"key": "/still", "value": true}));
}

#[test]
fn peer_with_the_wrong_uid_is_refused() {
    // The agent's configured uid differs from ours, so our connection must be
    // refused whatever we send.
    let me = rustix::process::geteuid().as_raw();
    let other = if me == 0 { 4242 } else { me };
    if me != 0 {
        eprintln!("not root: only the refusal half of this test can run");
    }
    let agents = format!("{CODER}[agents.locked]\nrole = \"coder\"\nuid = {other}\n");
    let g = if me == 0 {
        Gateway::start_with("", &agents)
    } else {
        return;
    };
    // The refusal answers the client's first request, with its id, so SDKs
    // (which drop errors whose id is null) show the reason.
    let mut c = Client::connect_raw(&g.socket("locked")).unwrap();
    c.send(&json!({"jsonrpc": "2.0", "id": "first", "method": "initialize", "params": {}}));
    let refused = c.recv().expect("a refusal line");
    assert_eq!(refused["id"], "first", "{refused}");
    assert_eq!(refused["error"]["code"], -32014, "{refused}");
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("do not match"));
    // Nothing else is served: a second request gets the refusal too, and the
    // connection closes when the peer does.
    c.send(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}));
    let again = c.recv().expect("a second refusal");
    assert_eq!(again["id"], 2, "{again}");
    assert_eq!(again["error"]["code"], -32014, "{again}");
    c.close_write();
    assert!(c.recv().is_none(), "connection closed, nothing served");
    assert!(
        g.log().contains("peer uid does not match"),
        "refusal is logged"
    );
    // Through the bridge, as an MCP client spawns it: the reason is on stderr
    // and the bridge fails, even though its stdin ended cleanly.
    let mut bridge = Command::new(BIN)
        .arg("bridge")
        .arg("--socket")
        .arg(g.socket("locked"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = bridge.stdin.take().unwrap();
        writeln!(
            stdin,
            "{}",
            json!({"jsonrpc": "2.0", "id": 7, "method": "initialize", "params": {}})
        )
        .unwrap();
    }
    let out = bridge.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused this connection") && stderr.contains("do not match"),
        "{stderr}"
    );
    let relayed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(relayed["id"], 7, "the client gets the refusal too");

    // The same socket serves a process running as the agent's uid (through the
    // bridge, as an agent would).
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let mut child = Command::new("setpriv")
        .args([
            format!("--reuid={other}"),
            format!("--regid={other}"),
            "--clear-groups".into(),
        ])
        .arg(BIN)
        .arg("bridge")
        .arg("--socket")
        .arg(g.socket("locked"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{init}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bridge as uid {other}: {} {}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(reply["result"]["protocolVersion"], "2025-11-25");
    // And the socket directory belongs to that uid alone.
    let meta = std::fs::metadata(g.socket("locked").parent().unwrap()).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.uid(), other);
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
}

#[test]
fn bridge_error_for_a_missing_socket_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere/mcp.sock");
    let out = Command::new(BIN)
        .args(["bridge", "--socket"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}

/// The gateway going away while the agent still talks is an error the agent's
/// MCP client sees (exit 1, the socket named), never a silent success.
#[test]
fn bridge_exits_nonzero_when_the_gateway_closes_first() {
    let mut g = Gateway::start();
    let mut child = Command::new(BIN)
        .args(["bridge", "--socket"])
        .arg(g.socket("coder"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    {
        use std::io::{BufRead, Write};
        let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
        writeln!(stdin, "{init}").unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.contains("\"protocolVersion\""), "{line}");
    }
    // The connection is up (the reply came through); now the gateway stops
    // while the bridge's stdin stays open.
    assert!(g.stop().success());
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("closed the connection"), "{err}");
    assert!(
        err.contains(&g.socket("coder").display().to_string()),
        "{err}"
    );
}

#[test]
fn bridge_relays_and_exits_zero_on_stdin_eof() {
    let g = Gateway::start();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "kv_put", "arguments": {"key": "/via/bridge", "value": "ok"}}});
    let input = format!(
        "{init}\n{}\n{call}\n",
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
    );
    let mut child = Command::new(BIN)
        .args(["bridge", "--socket"])
        .arg(g.socket("coder"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["id"], 2);
    assert_eq!(lines[1]["result"]["isError"], false);
    assert_eq!(
        g.client().ok("kv_get", json!({"key": "/via/bridge"}))["value"],
        "ok"
    );
}

#[test]
fn oversized_message_gets_an_error_and_others_keep_being_served() {
    let g = Gateway::start_with(
        "max_message_bytes = \"64KiB\"\nmax_value_bytes = \"16KiB\"\n",
        CODER,
    );
    let mut big = g.client();
    let mut bystander = g.client();
    let huge = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"tools/call\",\"params\":{{\"name\":\"kv_put\",\"arguments\":{{\"key\":\"/big\",\"value\":\"{}\"}}}}}}",
        "x".repeat(200 << 10)
    );
    big.send_line(huge.as_bytes());
    let r = big.recv().unwrap();
    assert_eq!(r["error"]["code"], -32600, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("65536"),
        "{r}"
    );
    // The same connection and the others keep working.
    assert!(big.request("ping", json!({})).get("result").is_some());
    bystander.ok("kv_put", json!({"key": "/small", "value": 1}));
    assert_eq!(big.err("kv_get", json!({"key": "/big"})), "not_found");
    // A value over max_value_bytes inside a message under the bound: a tool error.
    let code = big.err(
        "kv_put",
        json!({"key": "/big", "value": "y".repeat(20 << 10)}),
    );
    assert_eq!(code, "too_large");
    // Keys over 1024 bytes, and malformed keys.
    let long = format!("/{}", "k".repeat(1024));
    assert_eq!(
        big.err("kv_put", json!({"key": long, "value": 1})),
        "invalid_key"
    );
    for bad in ["/a//b", "/a/../b", "relative", "/a\u{0}b", "/"] {
        assert_eq!(
            big.err("kv_get", json!({"key": bad})),
            "invalid_key",
            "{bad:?}"
        );
    }
}

#[test]
fn discover_is_answered_unknown_methods_get_32601_and_the_connection_stays_open() {
    let g = Gateway::start();
    let mut c = Client::connect_raw(&g.socket("coder")).unwrap();
    // What SDKs in auto mode send first (the Python SDK's probe, with the
    // _meta of a 2026-07-28 request).
    c.send(
        &json!({"jsonrpc": "2.0", "id": "d1", "method": "server/discover", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}}}}),
    );
    let r = c.recv().unwrap();
    assert_eq!(r["id"], "d1");
    assert_eq!(r["result"]["supportedVersions"][0], "2026-07-28", "{r}");
    // A probe without _meta is an error, which clients take as "legacy".
    let r = c.request("server/discover", json!({}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = c.request(
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
    );
    assert_eq!(r["result"]["protocolVersion"], "2025-11-25");
    c.notify("notifications/initialized", json!({}));
    let r = c.request("no/such/method", json!({}));
    assert_eq!(r["error"]["code"], -32601, "{r}");
    c.send_line(b"{not json");
    assert_eq!(c.recv().unwrap()["error"]["code"], -32700);
    let r = c.request("tools/call", json!({"name": "kv_nope", "arguments": {}}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = c.request("tools/list", json!({}));
    assert_eq!(r["result"]["tools"].as_array().unwrap().len(), 7);
}

#[test]
fn older_protocol_versions_are_spoken() {
    let g = Gateway::start();
    for version in ["2025-06-18", "2025-03-26", "2024-11-05"] {
        let mut c = Client::connect_raw(&g.socket("coder")).unwrap();
        let r = c.request(
            "initialize",
            json!({"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
        );
        assert_eq!(r["result"]["protocolVersion"], version, "{r}");
    }
}

#[test]
fn connections_per_agent_are_bounded() {
    let g = Gateway::start_with("max_connections_per_agent = 2\n", CODER);
    let mut a = g.client();
    let _b = g.client();
    let mut c = Client::connect_raw(&g.socket("coder")).unwrap();
    let r = c.refusal();
    assert!(
        r["error"]["message"].as_str().unwrap().contains("limit"),
        "{r}"
    );
    // Every request gets the refusal (an SDK in auto mode retries its
    // refused server/discover with initialize), and nothing is served.
    let again = c.request("tools/list", json!({}));
    assert_eq!(again["error"]["code"], -32014, "{again}");
    assert!(again.get("result").is_none(), "{again}");
    // The peer closes: so does the gateway.
    c.close_write();
    assert!(c.recv().is_none());
    a.ok("kv_put", json!({"key": "/x", "value": 1}));
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p.toml\"\nmap_sise = \"1GiB\"\n[agents.a]\nrole = \"r\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("map_sise") && err.contains("line 5"), "{err}");
    std::fs::write(
        &path,
        "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p.toml\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("defines no agents"));
}

#[test]
fn calls_in_flight_on_one_connection_are_bounded_on_both_paths() {
    let g = Gateway::start();
    let mut c = g.client();
    c.ok("kv_put", json!({"key": "/r", "value": 1}));
    let since = c.ok("kv_put", json!({"key": "/r", "value": 2}))["revision"]
        .as_u64()
        .unwrap();
    let watches: Vec<u64> = (0..70)
        .map(|_| {
            c.start(
                "tools/call",
                json!({"name": "kv_watch", "arguments": {"prefix": "/w", "since_revision": since, "timeout_ms": 60000}}),
            )
        })
        .collect();
    // The refusals come back at once; the 64 admitted watches wait.
    let mut refused = BTreeSet::new();
    while refused.len() < 6 {
        let r = c.recv().expect("connection closed");
        assert_eq!(r["error"]["code"], -32011, "{r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("too many concurrent calls"),
            "{r}"
        );
        refused.insert(r["id"].as_u64().unwrap());
    }
    let r = c.request(
        "tools/call",
        json!({"name": "kv_get", "arguments": {"key": "/r"}}),
    );
    assert_eq!(r["error"]["code"], -32011, "the 65th call is refused: {r}");
    // Another connection wakes the watches; all 64 answer.
    g.client().ok("kv_put", json!({"key": "/w/x", "value": 1}));
    let mut woken = BTreeSet::new();
    while woken.len() < 64 {
        let r = c.recv().expect("connection closed");
        assert_eq!(r["result"]["isError"], false, "{r}");
        woken.insert(r["id"].as_u64().unwrap());
    }
    let all: BTreeSet<u64> = watches.into_iter().collect();
    assert_eq!(woken.union(&refused).copied().collect::<BTreeSet<_>>(), all);
    assert_eq!(c.ok("kv_get", json!({"key": "/r"}))["value"], 2);
}
