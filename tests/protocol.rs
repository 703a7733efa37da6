//! The gateway's MCP dispatcher over the real socket: both protocol eras,
//! the replies of every tool, cancellation, progress, list changes after a
//! reload, and batches.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Client, Gateway, Signal, CODER};
use serde_json::{json, Value};

const V2026: &str = "2026-07-28";

fn meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": V2026,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "cordon-tests", "version": "0"},
    })
}

/// A 2026-07-28 `tools/call` (no handshake; `_meta` on the request).
fn call26(c: &mut Client, tool: &str, args: Value) -> Value {
    c.request(
        "tools/call",
        json!({"name": tool, "arguments": args, "_meta": meta()}),
    )
}

/// Every reply's shape, as clients of each era read it: one path serves
/// both, so this replaces the old fast-path-vs-rmcp comparison.
#[test]
fn replies_of_every_tool_in_the_legacy_era() {
    let policy = "[roles.coder]\ntools = [\"kv_*\"]\ndeny_tools = [\"kv_delete\"]\nread = [\"/**\"]\nwrite = [\"/**\"]\ndeny_write = [\"/locked/**\"]\n";
    let g = Gateway::start_with_policy("", CODER, policy);
    let mut c = g.client();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"name": "kv_put", "arguments": {"key": "/a/1", "value": {"n": 1, "s": "é\u{1}\"x"}}}),
            "ok",
        ),
        (
            json!({"name": "kv_put", "arguments": {"key": "/a/2", "value": [1, 2.5, null, true]}}),
            "ok",
        ),
        (
            json!({"name": "kv_get", "arguments": {"key": "/a/1"}}),
            "ok",
        ),
        (
            json!({"name": "kv_get", "arguments": {"key": "/a/missing"}}),
            "not_found",
        ),
        (
            json!({"name": "kv_get", "arguments": {"key": "no-slash"}}),
            "invalid_key",
        ),
        (
            json!({"name": "kv_get", "arguments": {"key": "/a/1", "extra": 1}}),
            "invalid_arguments",
        ),
        (json!({"name": "kv_get"}), "invalid_arguments"),
        (
            json!({"name": "kv_put", "arguments": {"key": "/a/1", "value": 2, "if_revision": 99}}),
            "conflict",
        ),
        (
            json!({"name": "kv_put", "arguments": {"key": "/locked/x", "value": 1}}),
            "denied",
        ),
        (
            json!({"name": "kv_delete", "arguments": {"key": "/a/1"}}),
            "-32010",
        ),
        (
            json!({"name": "kv_list", "arguments": {"prefix": "/a", "limit": 1}}),
            "ok",
        ),
        (
            json!({"name": "kv_scan", "arguments": {"prefix": "/"}}),
            "ok",
        ),
        (
            json!({"name": "kv_txn", "arguments": {"checks": [{"key": "/a/2", "revision": 2}],
            "ops": [{"op": "put", "key": "/a/3", "value": "v"}, {"op": "get", "key": "/a/1"}]}}),
            "ok",
        ),
        (
            json!({"name": "kv_watch", "arguments": {"prefix": "/a", "since_revision": 0, "timeout_ms": 0}}),
            "ok",
        ),
        (json!({"name": "no_such_tool", "arguments": {}}), "-32602"),
    ];
    for (i, (params, want)) in cases.iter().enumerate() {
        // Number and string ids both come back as sent.
        let id = if i % 2 == 0 {
            json!(i)
        } else {
            json!(format!("r{i}"))
        };
        c.send(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}));
        let r = c.recv().expect("connection closed");
        assert_eq!(r["jsonrpc"], "2.0");
        assert_eq!(r["id"], id, "{r}");
        if let Some(code) = want.strip_prefix('-') {
            assert_eq!(
                r["error"]["code"],
                -code.parse::<i64>().unwrap(),
                "{params}: {r}"
            );
            continue;
        }
        let res = &r["result"];
        // Legacy peers never see 2026-07-28's resultType.
        assert!(res.get("resultType").is_none(), "{r}");
        let text = res["content"][0]["text"].as_str().unwrap();
        if *want == "ok" {
            assert_eq!(res["isError"], false, "{params}: {r}");
            // The text block carries the same JSON, for text-only clients.
            assert_eq!(
                serde_json::from_str::<Value>(text).unwrap(),
                res["structuredContent"]
            );
        } else {
            assert_eq!(res["isError"], true, "{params}: {r}");
            assert_eq!(
                res["structuredContent"]["error"]["code"], *want,
                "{params}: {r}"
            );
        }
    }
    // A denial by tool names the rule; malformed params are -32602.
    let r = c.request(
        "tools/call",
        json!({"name": "kv_delete", "arguments": {"key": "/a/2"}}),
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("kv_delete"),
        "{r}"
    );
    assert!(
        r["error"]["data"]["rule"]["line"].as_u64().unwrap() > 0,
        "{r}"
    );
    let r = c.request("tools/call", json!({"arguments": {}}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let r = c.request("tools/call", json!("not an object"));
    assert_eq!(r["error"]["code"], -32602, "{r}");
}

#[test]
fn the_2026_era_is_served_without_a_handshake_beside_initialize() {
    let g = Gateway::start();
    let mut c = Client::connect_raw(&g.socket("coder")).unwrap();
    // Discovery needs the _meta of any 2026-07-28 request: without it, or
    // without either key, it is -32602 (a client then falls back to
    // initialize); an unknown version is -32022.
    let mut no_caps = meta();
    no_caps
        .as_object_mut()
        .unwrap()
        .remove("io.modelcontextprotocol/clientCapabilities");
    let mut no_version = meta();
    no_version
        .as_object_mut()
        .unwrap()
        .remove("io.modelcontextprotocol/protocolVersion");
    for params in [
        json!({}),
        json!({"_meta": no_caps}),
        json!({"_meta": no_version}),
    ] {
        let r = c.request("server/discover", params.clone());
        assert_eq!(r["error"]["code"], -32602, "{params}: {r}");
    }
    let mut unknown = meta();
    unknown["io.modelcontextprotocol/protocolVersion"] = json!("2099-01-01");
    let r = c.request("server/discover", json!({ "_meta": unknown }));
    assert_eq!(r["error"]["code"], -32022, "{r}");
    // Methods 2026-07-28 removed are unknown to a request that names it;
    // the same methods without it are the 2025 era's (below).
    for method in ["ping", "initialize"] {
        let r = c.request(method, json!({ "_meta": meta() }));
        assert_eq!(r["error"]["code"], -32601, "{method}: {r}");
    }
    // Control: with the full _meta, discovery is answered.
    {
        let r = c.request("server/discover", json!({"_meta": meta()}));
        let d = &r["result"];
        assert_eq!(d["supportedVersions"][0], V2026, "{r}");
        assert!(d["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("2025-11-25")));
        assert_eq!(d["capabilities"]["tools"]["listChanged"], true);
        assert_eq!(d["cacheScope"], "private");
        assert_eq!(d["resultType"], "complete");
        assert!(d["ttlMs"].as_u64().is_some());
        assert_eq!(
            d["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
            "cordon"
        );
        assert!(d["instructions"].as_str().unwrap().contains("coder"));
    }
    // Negative: no _meta and no initialize is -32602; so is a _meta without
    // client capabilities; an unknown version is -32022 naming ours.
    let r = c.request("tools/list", json!({}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let mut partial = meta();
    partial
        .as_object_mut()
        .unwrap()
        .remove("io.modelcontextprotocol/clientCapabilities");
    let r = c.request("tools/list", json!({"_meta": partial}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("clientCapabilities"));
    let mut future = meta();
    future["io.modelcontextprotocol/protocolVersion"] = json!("2099-01-01");
    let r = c.request("tools/list", json!({"_meta": future}));
    assert_eq!(r["error"]["code"], -32022, "{r}");
    assert_eq!(r["error"]["data"]["supported"][0], V2026, "{r}");
    // Control: with the full _meta, list and calls are served, with
    // resultType, and the list with its cache hints.
    let r = c.request("tools/list", json!({"_meta": meta()}));
    let list = &r["result"];
    assert_eq!(list["tools"].as_array().unwrap().len(), 7, "{r}");
    assert_eq!(list["resultType"], "complete");
    assert_eq!(list["cacheScope"], "private");
    assert!(list["ttlMs"].as_u64().is_some());
    let r = call26(&mut c, "kv_put", json!({"key": "/e/1", "value": "x"}));
    assert_eq!(r["result"]["resultType"], "complete", "{r}");
    assert_eq!(r["result"]["isError"], false, "{r}");
    let r = call26(&mut c, "kv_get", json!({"key": "/e/1"}));
    assert_eq!(r["result"]["structuredContent"]["value"], "x", "{r}");
    // A later initialize on the same connection still works (Claude Code may
    // send both), and legacy requests then get legacy replies.
    let r = c.request(
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
    );
    assert_eq!(r["result"]["protocolVersion"], "2025-11-25", "{r}");
    assert_eq!(r["result"]["capabilities"]["tools"]["listChanged"], true);
    c.notify("notifications/initialized", json!({}));
    let r = c.request(
        "tools/call",
        json!({"name": "kv_get", "arguments": {"key": "/e/1"}}),
    );
    assert!(r["result"].get("resultType").is_none(), "{r}");
    // A client asking for 2026-07-28 (or anything unknown) over initialize
    // gets the newest handshake version.
    let mut d = Client::connect_raw(&g.socket("coder")).unwrap();
    let r = d.request(
        "initialize",
        json!({"protocolVersion": V2026, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
    );
    assert_eq!(r["result"]["protocolVersion"], "2025-11-25", "{r}");
}

/// Identity is the socket's: a clientInfo or _meta naming another agent
/// changes nothing.
#[test]
fn what_a_client_claims_does_not_change_who_it_is() {
    let agents = "[agents.coder]\nrole = \"coder\"\n[agents.viewer]\nrole = \"viewer\"\n";
    let policy = "[roles.coder]\ntools = [\"kv_*\"]\nread = [\"/**\"]\nwrite = [\"/**\"]\n[roles.viewer]\ntools = [\"kv_get\"]\nread = [\"/pub/**\"]\n";
    let g = Gateway::start_with_policy("", agents, policy);
    g.client()
        .ok("kv_put", json!({"key": "/secret", "value": 1}));
    let mut v = Client::connect_raw(&g.socket("viewer")).unwrap();
    let mut m = meta();
    m["io.modelcontextprotocol/clientInfo"] = json!({"name": "coder", "version": "0"});
    m["agent"] = json!("coder");
    m["role"] = json!("coder");
    let r = v.request(
        "tools/call",
        json!({"name": "kv_get", "arguments": {"key": "/secret"}, "_meta": m}),
    );
    assert_eq!(
        r["result"]["structuredContent"]["error"]["code"], "denied",
        "{r}"
    );
    let r = v.request(
        "tools/call",
        json!({"name": "kv_put", "arguments": {"key": "/pub/x", "value": 1}, "_meta": m}),
    );
    assert_eq!(r["error"]["code"], -32010, "{r}");
    let r = v.request("tools/list", json!({"_meta": m}));
    assert_eq!(r["result"]["tools"].as_array().unwrap().len(), 1, "{r}");
}

#[test]
fn a_cancelled_watch_ends_without_a_reply_and_the_session_goes_on() {
    let g = Gateway::start();
    let mut c = g.client();
    let id = c.start(
        "tools/call",
        json!({"name": "kv_watch", "arguments": {"prefix": "/w", "since_revision": 1_000_000, "timeout_ms": 300000}}),
    );
    let mut rounds = 0;
    while g.status()["watching"] != 1 {
        rounds += 1;
        assert!(rounds < 100_000, "the watch never started waiting");
        assert!(c.request("ping", json!({})).get("result").is_some());
    }
    c.notify(
        "notifications/cancelled",
        json!({"requestId": id, "reason": "test"}),
    );
    let mut rounds = 0;
    while g.status()["watching"] != 0 {
        rounds += 1;
        assert!(rounds < 100_000, "the cancelled watch kept waiting");
        std::thread::yield_now();
    }
    // The next line on the connection is the ping's reply, not the watch's.
    let r = c.request("ping", json!({}));
    assert_eq!(r["result"], json!({}), "{r}");
    // Control: an uncancelled watch is answered when a change comes.
    let id = c.start(
        "tools/call",
        json!({"name": "kv_watch", "arguments": {"prefix": "/w", "since_revision": 0, "timeout_ms": 300000}}),
    );
    g.client().ok("kv_put", json!({"key": "/w/x", "value": 1}));
    let r = c.recv().unwrap();
    assert_eq!(r["id"], id, "{r}");
    assert_eq!(r["result"]["structuredContent"]["events"][0]["key"], "/w/x");
}

#[test]
fn a_waiting_watch_with_a_progress_token_reports_progress_until_it_is_answered() {
    let g = Gateway::start_with("watch_progress_ms = 100\n", CODER);
    let mut c = g.client();
    let id = c.start(
        "tools/call",
        json!({"name": "kv_watch", "arguments": {"prefix": "/p", "since_revision": 1_000_000, "timeout_ms": 300000},
               "_meta": {"progressToken": "tok-1"}}),
    );
    let mut last = 0.0;
    for _ in 0..3 {
        let n = c.recv().unwrap();
        assert_eq!(n["method"], "notifications/progress", "{n}");
        assert_eq!(n["params"]["progressToken"], "tok-1");
        let p = n["params"]["progress"].as_f64().unwrap();
        assert!(p > last, "progress increases: {n}");
        last = p;
    }
    // End it: the watch's reply follows its progress.
    c.notify("notifications/cancelled", json!({"requestId": id}));
    // Control: without a token, no progress arrives before the reply.
    let id = c.start(
        "tools/call",
        json!({"name": "kv_watch", "arguments": {"prefix": "/q", "since_revision": 0, "timeout_ms": 300000}}),
    );
    g.client().ok("kv_put", json!({"key": "/q/x", "value": 1}));
    loop {
        let r = c.recv().unwrap();
        // Progress of the cancelled watch may still be in flight before its end.
        if r["method"] == "notifications/progress" {
            assert_eq!(r["params"]["progressToken"], "tok-1", "{r}");
            continue;
        }
        assert_eq!(r["id"], id, "{r}");
        break;
    }
}

#[test]
fn a_reload_that_changes_a_roles_tools_notifies_its_sessions_only() {
    let agents = "[agents.coder]\nrole = \"coder\"\n[agents.viewer]\nrole = \"viewer\"\n";
    let policy = "[roles.coder]\ntools = [\"kv_*\"]\nread = [\"/**\"]\nwrite = [\"/**\"]\n[roles.viewer]\ntools = [\"kv_get\"]\nread = [\"/pub/**\"]\n";
    let g = Gateway::start_with_policy("", agents, policy);
    let mut coder = g.client();
    let mut viewer = Client::connect(&g.socket("viewer"));
    let tools = |c: &mut Client| -> Vec<String> {
        c.request("tools/list", json!({}))["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(tools(&mut coder).contains(&"kv_delete".to_string()));
    // A 2026-07-28 client of the same role listens for list changes.
    let mut modern = Client::connect_raw(&g.socket("coder")).unwrap();
    let listen = modern.start(
        "subscriptions/listen",
        json!({"_meta": meta(), "notifications": {"toolsListChanged": true, "promptsListChanged": true}}),
    );
    let ack = modern.recv().unwrap();
    assert_eq!(
        ack["method"], "notifications/subscriptions/acknowledged",
        "{ack}"
    );
    assert_eq!(
        ack["params"]["notifications"],
        json!({"toolsListChanged": true}),
        "only what exists is accepted"
    );
    assert_eq!(
        ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        listen
    );
    // Negative: a legacy session has no subscriptions/listen (it is notified directly).
    let r = viewer.request(
        "subscriptions/listen",
        json!({"notifications": {"toolsListChanged": true}}),
    );
    assert_eq!(r["error"]["code"], -32601, "{r}");
    reload(
        &g,
        &policy.replace(
            "tools = [\"kv_*\"]",
            "tools = [\"kv_*\"]\ndeny_tools = [\"kv_delete\"]",
        ),
    );
    let n = coder.recv().unwrap();
    assert_eq!(n["method"], "notifications/tools/list_changed", "{n}");
    assert!(!tools(&mut coder).contains(&"kv_delete".to_string()));
    let n = modern.recv().unwrap();
    assert_eq!(n["method"], "notifications/tools/list_changed", "{n}");
    assert_eq!(
        n["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        listen
    );
    // The viewer's tools did not change: its next line is its own reply.
    let r = viewer.request("ping", json!({}));
    assert_eq!(r["result"], json!({}), "{r}");
    // A revoked tool is refused, whatever the client cached.
    let r = coder.request(
        "tools/call",
        json!({"name": "kv_delete", "arguments": {"key": "/x"}}),
    );
    assert_eq!(r["error"]["code"], -32010, "{r}");
}

#[test]
fn batches_are_served_under_2025_03_26_only() {
    let g = Gateway::start();
    let mut c = Client::connect_raw(&g.socket("coder")).unwrap();
    let r = c.request(
        "initialize",
        json!({"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
    );
    assert_eq!(r["result"]["protocolVersion"], "2025-03-26");
    let batch = json!([
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {"name": "kv_put", "arguments": {"key": "/b/1", "value": 1}}},
        {"jsonrpc": "2.0", "id": "s", "method": "tools/call", "params": {"name": "kv_put", "arguments": {"key": "/b/2", "value": 2}}},
        {"jsonrpc": "2.0", "id": 12, "method": "ping"},
        {"jsonrpc": "2.0", "id": 13, "method": "no/such"},
    ]);
    c.send(&batch);
    let r = c.recv().unwrap();
    let replies = r.as_array().expect("one array answers a batch");
    let mut ids: Vec<String> = replies.iter().map(|x| x["id"].to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["\"s\"", "10", "12", "13"], "{r}");
    assert!(replies
        .iter()
        .any(|x| x["id"] == 13 && x["error"]["code"] == -32601));
    let scan = c.request(
        "tools/call",
        json!({"name": "kv_scan", "arguments": {"prefix": "/b"}}),
    );
    assert_eq!(
        scan["result"]["structuredContent"]["entries"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // An empty batch, and a batch of only notifications.
    c.send(&json!([]));
    assert_eq!(c.recv().unwrap()["error"]["code"], -32600);
    c.send(&json!([{"jsonrpc": "2.0", "method": "notifications/initialized"}]));
    assert_eq!(
        c.request("ping", json!({}))["result"],
        json!({}),
        "no reply to notifications"
    );
    // Negative: a 2025-11-25 session gets -32600 for any batch.
    let mut d = g.client();
    d.send(&json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]));
    let r = d.recv().unwrap();
    assert_eq!(r["error"]["code"], -32600, "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2025-03-26"));
}

#[test]
fn sigterm_ends_sessions_of_both_eras_with_their_replies() {
    let mut g = Gateway::start();
    let mut c = Client::connect_raw(&g.socket("coder")).unwrap();
    let id = c.start(
        "tools/call",
        json!({"name": "kv_watch", "arguments": {"prefix": "/", "since_revision": 1_000_000, "timeout_ms": 300000},
               "_meta": meta()}),
    );
    let mut rounds = 0;
    while g.status()["watching"] != 1 {
        rounds += 1;
        assert!(rounds < 100_000, "the watch never started waiting");
        std::thread::yield_now();
    }
    g.signal(Signal::TERM);
    let r = c
        .recv()
        .expect("the watch is answered before the connection closes");
    assert_eq!(r["id"], id);
    assert_eq!(r["result"]["resultType"], "complete", "{r}");
    assert!(c.recv().is_none());
    assert!(g.child.take().unwrap().wait().unwrap().success());
}

/// Rewrites the gateway's policy file and reloads it (`cordon policy reload`).
fn reload(g: &Gateway, policy: &str) {
    std::fs::write(g.dir.join("policy.toml"), policy).unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["policy", "reload", "--config"])
        .arg(&g.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Starts a 2025-03-26 session (the one version that may batch).
fn batching(g: &Gateway) -> Client {
    let mut c = Client::connect_raw(&g.socket("coder")).unwrap();
    let r = c.request(
        "initialize",
        json!({"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
    );
    assert_eq!(r["result"]["protocolVersion"], "2025-03-26", "{r}");
    c.notify("notifications/initialized", json!({}));
    c
}

#[test]
fn a_batch_holds_json_rpc_objects_of_its_own_era_only() {
    let g = Gateway::start();
    let mut c = batching(&g);
    let ping = |id: u64| json!({"jsonrpc": "2.0", "id": id, "method": "ping"});
    // A positional array is not a request (serde alone would read one), a
    // 2026-07-28 request and its subscription stream never ride in a batch;
    // the pings around them are answered in the same, well-formed array.
    c.send(&json!([
        ping(1),
        ["2.0", 78, "tools/call", {"name": "kv_put", "arguments": {"key": "/positional", "value": 1}}],
        {"jsonrpc": "2.0", "id": 3, "method": "subscriptions/listen",
            "params": {"_meta": meta(), "notifications": {"toolsListChanged": true}}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
            "params": {"_meta": meta(), "name": "kv_put", "arguments": {"key": "/in-batch", "value": 1}}},
        ping(5),
    ]));
    let r = c.recv().expect("one array");
    let items = r.as_array().unwrap_or_else(|| panic!("not an array: {r}"));
    assert_eq!(items.len(), 5, "{r}");
    let by_id = |id: u64| items.iter().find(|i| i["id"] == id).cloned();
    assert_eq!(by_id(1).unwrap()["result"], json!({}), "{r}");
    assert_eq!(by_id(5).unwrap()["result"], json!({}), "{r}");
    for id in [3, 4] {
        assert_eq!(by_id(id).unwrap()["error"]["code"], -32600, "{r}");
    }
    let positional = items.iter().find(|i| i["id"].is_null()).unwrap();
    assert_eq!(positional["error"]["code"], -32600, "{r}");
    // Nothing was written by either.
    for key in ["/positional", "/in-batch"] {
        let got = c.call("kv_get", json!({ "key": key }));
        assert_eq!(got["isError"], true, "{key}: {got}");
    }
}

#[test]
fn initialize_is_once_per_connection_and_ids_in_flight_are_unique() {
    let g = Gateway::start();
    let mut c = batching(&g);
    // A second initialize would switch the session's version (and batches).
    let r = c.request(
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
    );
    assert_eq!(r["error"]["code"], -32600, "{r}");
    c.send(&json!([{"jsonrpc": "2.0", "id": 9, "method": "ping"}]));
    assert!(
        c.recv().unwrap().is_array(),
        "still 2025-03-26: batches served"
    );

    // A waiting watch holds its id: a second request with it is refused.
    c.send(&json!({"jsonrpc": "2.0", "id": "w", "method": "tools/call",
        "params": {"name": "kv_watch", "arguments": {"prefix": "/w", "since_revision": 0, "timeout_ms": 60000}}}));
    while g.status()["watching"] != 1 {
        std::thread::yield_now();
    }
    c.send(&json!({"jsonrpc": "2.0", "id": "w", "method": "tools/call",
        "params": {"name": "kv_get", "arguments": {"key": "/w"}}}));
    let r = c.recv().unwrap();
    assert_eq!(r["id"], "w", "{r}");
    assert_eq!(r["error"]["code"], -32600, "{r}");
    // Control: a write wakes the watch, which answers its own id; then the
    // id is free again.
    g.client().ok("kv_put", json!({"key": "/w/1", "value": 1}));
    let r = c.recv().unwrap();
    assert_eq!(r["id"], "w", "{r}");
    assert_eq!(
        r["result"]["structuredContent"]["events"][0]["key"], "/w/1",
        "{r}"
    );
    c.send(&json!({"jsonrpc": "2.0", "id": "w", "method": "tools/call",
        "params": {"name": "kv_get", "arguments": {"key": "/w/1"}}}));
    let r = c.recv().unwrap();
    assert_eq!(r["result"]["isError"], false, "{r}");

    // A handshake version in _meta before initialize says what to do.
    let mut fresh = Client::connect_raw(&g.socket("coder")).unwrap();
    let mut m = meta();
    m["io.modelcontextprotocol/protocolVersion"] = json!("2025-11-25");
    let r = fresh.request("tools/list", json!({ "_meta": m }));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("initialize"),
        "{r}"
    );
}

#[test]
fn a_reload_that_revokes_a_read_scope_stops_a_waiting_watch_from_showing_it() {
    let policy = "[roles.coder]\ntools = [\"kv_*\"]\nread = [\"/**\"]\nwrite = [\"/**\"]\ndelete = [\"/**\"]\n";
    let g = Gateway::start_with_policy("", CODER, policy);
    let mut watcher = g.client();
    let mut writer = g.client();
    let watch = |c: &mut Client, id: &str, since: u64, timeout: u64| {
        c.send(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "kv_watch", "arguments": {"prefix": "/pub", "since_revision": since, "timeout_ms": timeout}}}));
    };
    // Control: a waiting watch shows a write under its prefix.
    watch(&mut watcher, "before", 0, 60_000);
    while g.status()["watching"] != 1 {
        std::thread::yield_now();
    }
    let rev = writer.ok("kv_put", json!({"key": "/pub/before", "value": 1}))["revision"]
        .as_u64()
        .unwrap();
    let r = watcher.recv().unwrap();
    assert_eq!(
        r["result"]["structuredContent"]["events"][0]["key"], "/pub/before",
        "{r}"
    );

    // A watch waiting when a reload takes the read scope away.
    watch(&mut watcher, "after", rev, 3_000);
    while g.status()["watching"] != 1 {
        std::thread::yield_now();
    }
    reload(
        &g,
        &policy.replace("read = [\"/**\"]", "read = [\"/nothing/**\"]"),
    );
    writer.ok(
        "kv_put",
        json!({"key": "/pub/after-revoke", "value": "secret"}),
    );
    // The watch ends at its timeout with nothing shown.
    let r = watcher.recv().unwrap();
    assert_eq!(r["id"], "after", "{r}");
    let result = &r["result"]["structuredContent"];
    assert_eq!(result["events"], json!([]), "{r}");
    assert_eq!(result["timed_out"], true, "{r}");
    assert!(!r.to_string().contains("secret"), "{r}");
}

#[test]
fn every_tools_call_leaves_an_audit_record_even_a_malformed_one() {
    let mut g = Gateway::start();
    let mut c = g.client();
    let mut unknown = meta();
    unknown["io.modelcontextprotocol/protocolVersion"] = json!("2099-01-01");
    let malformed = [
        (json!(null), -32602),
        (json!({"name": 7, "arguments": {}}), -32602),
        (json!({"name": "kv_get", "arguments": [1]}), -32602),
        (
            json!({"name": "kv_put", "arguments": {"key": "/m", "value": 1}, "_meta": unknown}),
            -32022,
        ),
    ];
    for (params, code) in &malformed {
        let mut msg = json!({"jsonrpc": "2.0", "id": "m", "method": "tools/call"});
        if !params.is_null() {
            msg["params"] = params.clone();
        }
        c.send(&msg);
        let r = c.recv().unwrap();
        assert_eq!(r["error"]["code"], *code, "{params}: {r}");
    }
    // Control: a well-formed call.
    c.ok("kv_put", json!({"key": "/ok", "value": 1}));
    drop(c);
    assert!(g.stop().success());
    let out = std::process::Command::new(common::BIN)
        .args(["audit", "export", "--config"])
        .arg(&g.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let calls: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "call")
        .collect();
    let invalid: Vec<&Value> = calls
        .iter()
        .filter(|r| r["decision"] == "invalid")
        .collect();
    assert_eq!(invalid.len(), malformed.len(), "{calls:?}");
    assert!(
        invalid
            .iter()
            .all(|r| r["agent"] == "coder" && r["outcome"]["status"] != "ok"),
        "{invalid:?}"
    );
    assert!(
        invalid
            .iter()
            .any(|r| r["tool"] == "kv_put" && r["outcome"]["code"] == "-32022"),
        "{invalid:?}"
    );
    assert!(
        calls
            .iter()
            .any(|r| r["decision"] == "allow" && r["tool"] == "kv_put"),
        "{calls:?}"
    );
}
