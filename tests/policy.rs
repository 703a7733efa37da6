//! Policy enforcement end to end: the real gateway, real sockets, real store.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Client, Gateway, Signal, BIN};
use serde_json::{json, Value};

const AGENTS: &str = "[agents.writer]\nrole = \"writer\"\n[agents.reader]\nrole = \"reader\"\n";

const POLICY: &str = r#"
[roles.writer]
tools = ["kv_*"]
read = ["/**"]
write = ["/**"]
delete = ["/**"]

[roles.reader]
tools = ["kv_get", "kv_list", "kv_scan", "kv_watch", "kv_put"]
deny_tools = ["kv_delete"]
read = ["/pub/**"]
deny_read = ["/pub/hidden/**"]
write = ["/pub/notes/*"]
limits = { calls_per_minute = 1000, max_value_bytes = 64, max_scan_items = 50 }
"#;

fn start() -> Gateway {
    Gateway::start_with_policy("", AGENTS, POLICY)
}

fn text(v: &Value) -> String {
    v.to_string()
}

#[test]
fn tools_list_shows_only_allowed_tools_and_a_denied_tool_never_runs() {
    let g = start();
    let mut reader = Client::connect(&g.socket("reader"));
    let list = reader.request("tools/list", json!({}));
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["kv_get", "kv_put", "kv_list", "kv_scan", "kv_watch"]
    );

    let mut writer = Client::connect(&g.socket("writer"));
    writer.ok("kv_put", json!({"key": "/pub/a", "value": 1}));
    let r = reader.request(
        "tools/call",
        json!({"name": "kv_delete", "arguments": {"key": "/pub/a"}}),
    );
    assert_eq!(r["error"]["code"], -32010, "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("denied by policy"), "{msg}");
    assert!(
        msg.contains("roles.reader.deny_tools = \"kv_delete\""),
        "names the rule: {msg}"
    );
    assert_eq!(r["error"]["data"]["rule"]["line"], 10);
    // Never reached the store: the key is still there, unchanged.
    let e = writer.ok("kv_get", json!({"key": "/pub/a"}));
    assert_eq!(
        (e["value"].clone(), e["revision"].clone()),
        (json!(1), json!(1))
    );
    // A tool granted by no rule: denied by default, also named.
    let r = reader.request(
        "tools/call",
        json!({"name": "kv_txn", "arguments": {"ops": []}}),
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deny by default"),
        "{r}"
    );
}

#[test]
fn a_denied_write_does_not_change_the_store() {
    let g = start();
    let mut writer = Client::connect(&g.socket("writer"));
    let mut reader = Client::connect(&g.socket("reader"));
    writer.ok("kv_put", json!({"key": "/pub/doc", "value": "original"}));
    let before = writer.ok("kv_get", json!({"key": "/pub/doc"}));
    let r = reader.call("kv_put", json!({"key": "/pub/doc", "value": "defaced"}));
    assert_eq!(r["isError"], true);
    assert_eq!(r["structuredContent"]["error"]["code"], "denied");
    assert!(r["structuredContent"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("may not write /pub/doc"));
    assert_eq!(writer.ok("kv_get", json!({"key": "/pub/doc"})), before);
    // The store's revision did not move either.
    let w = writer.ok(
        "kv_watch",
        json!({"prefix": "/", "since_revision": 0, "timeout_ms": 0}),
    );
    assert_eq!(w["revision"], 1);
    // Allowed: the one pattern it may write.
    reader.ok("kv_put", json!({"key": "/pub/notes/n1", "value": "hi"}));
}

#[test]
fn forbidden_key_names_never_appear_in_list_scan_or_watch() {
    let g = start();
    let mut writer = Client::connect(&g.socket("writer"));
    let mut reader = Client::connect(&g.socket("reader"));
    let secret = "/pub/hidden/launch-codes";
    let private = "/private/salaries";
    // Interleave hidden keys with visible ones so pages and cursors cross them.
    for i in 0..30 {
        writer.ok(
            "kv_put",
            json!({"key": format!("/pub/k{i:02}"), "value": i}),
        );
        writer.ok(
            "kv_put",
            json!({"key": format!("/pub/hidden/h{i:02}"), "value": i}),
        );
        writer.ok(
            "kv_put",
            json!({"key": format!("/pub/k{i:02}x/hidden-not"), "value": i}),
        );
    }
    writer.ok("kv_put", json!({"key": secret, "value": "0000"}));
    writer.ok("kv_put", json!({"key": private, "value": 1}));

    for (tool, field) in [("kv_list", "keys"), ("kv_scan", "entries")] {
        for prefix in ["/", "/pub", "/pub/hidden", "/private"] {
            let mut cursor: Option<String> = None;
            let mut seen = 0;
            loop {
                let mut args = json!({"prefix": prefix, "limit": 7});
                if let Some(c) = &cursor {
                    args["cursor"] = json!(c);
                }
                let page = reader.ok(tool, args);
                let t = text(&page);
                assert!(
                    !t.contains("hidden/") && !t.contains("private") && !t.contains("launch"),
                    "{tool} {prefix}: {t}"
                );
                seen += page[field].as_array().unwrap().len();
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.into()),
                    None => break,
                }
            }
            let expected = match prefix {
                "/" | "/pub" => 60,
                _ => 0,
            };
            assert_eq!(seen, expected, "{tool} {prefix}");
        }
    }
    let w = reader.ok(
        "kv_watch",
        json!({"prefix": "/", "since_revision": 0, "timeout_ms": 0, "limit": 50}),
    );
    let t = text(&w);
    assert!(!t.contains("hidden/") && !t.contains("private"), "{t}");
    // Every revision was looked at, and only readable events came back.
    let mut since = 0;
    let mut events = 0;
    loop {
        let w = reader.ok(
            "kv_watch",
            json!({"prefix": "/", "since_revision": since, "timeout_ms": 0, "limit": 50}),
        );
        assert!(!text(&w).contains("hidden/"));
        events += w["events"].as_array().unwrap().len();
        since = w["revision"].as_u64().unwrap();
        if w["more"] == false {
            break;
        }
    }
    assert_eq!(events, 60);
    // A commit to a hidden key does not wake a reader's watch with its name.
    let id = reader.start("tools/call", json!({"name": "kv_watch", "arguments": {"prefix": "/pub", "since_revision": since, "timeout_ms": 300000}}));
    assert!(reader.request("ping", json!({})).get("result").is_some());
    writer.ok("kv_put", json!({"key": secret, "value": "1234"}));
    writer.ok("kv_put", json!({"key": "/pub/visible-after", "value": 1}));
    let r = reader.recv().unwrap();
    assert_eq!(r["id"], id);
    let events = r["result"]["structuredContent"]["events"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["key"], "/pub/visible-after");
    // Reading a forbidden key directly is denied, whether or not it exists.
    assert_eq!(reader.err("kv_get", json!({"key": secret})), "denied");
    assert_eq!(
        reader.err("kv_get", json!({"key": "/pub/hidden/none"})),
        "denied"
    );
}

#[test]
fn size_and_rate_limits_produce_the_documented_errors() {
    let g = Gateway::start_with_policy(
        "",
        AGENTS,
        &POLICY.replace("calls_per_minute = 1000", "calls_per_minute = 5"),
    );
    let mut reader = Client::connect(&g.socket("reader"));
    let r = reader.call(
        "kv_put",
        json!({"key": "/pub/notes/big", "value": "x".repeat(100)}),
    );
    assert_eq!(r["structuredContent"]["error"]["code"], "too_large", "{r}");
    assert!(text(&r).contains("max_value_bytes = 64"), "{r}");
    let r = reader.call("kv_list", json!({"prefix": "/pub", "limit": 51}));
    assert_eq!(r["structuredContent"]["error"]["code"], "too_large", "{r}");
    // Every call counts, refused ones too: two used of five per minute, three
    // more pass, the sixth does not.
    for _ in 0..3 {
        reader.ok("kv_list", json!({"prefix": "/pub"}));
    }
    let r = reader.call("kv_list", json!({"prefix": "/pub"}));
    assert_eq!(
        r["structuredContent"]["error"]["code"], "rate_limited",
        "{r}"
    );
    assert!(text(&r).contains("5 calls per minute"));
    // Another connection of the same agent shares the budget.
    let mut again = Client::connect(&g.socket("reader"));
    assert_eq!(
        again.call("kv_list", json!({"prefix": "/pub"}))["structuredContent"]["error"]["code"],
        "rate_limited"
    );
    // Another agent does not.
    Client::connect(&g.socket("writer")).ok("kv_list", json!({"prefix": "/"}));
}

fn reload(g: &Gateway) -> std::process::Output {
    Command::new(BIN)
        .args(["policy", "reload", "--config"])
        .arg(&g.config)
        .output()
        .unwrap()
}

#[test]
fn a_broken_reload_keeps_the_old_policy_and_says_why() {
    let g = start();
    let mut reader = Client::connect(&g.socket("reader"));
    assert_eq!(
        reader.err("kv_put", json!({"key": "/pub/x", "value": 1})),
        "denied"
    );
    let policy = g.dir.join("policy.toml");
    // Broken: an unknown field. Also would grant more, which must not happen.
    std::fs::write(
        &policy,
        POLICY.replace("write = [\"/pub/notes/*\"]", "write = [\"/**\"]\nwrte = 1"),
    )
    .unwrap();
    let out = reload(&g);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reload rejected") && err.contains("unknown field `wrte`"),
        "{err}"
    );
    assert!(err.contains("policy.toml:"), "names file and line: {err}");
    assert_eq!(
        reader.err("kv_put", json!({"key": "/pub/x", "value": 1})),
        "denied"
    );
    // A policy lacking a configured agent's role is rejected too.
    std::fs::write(&policy, POLICY.replace("[roles.reader]", "[roles.someone]")).unwrap();
    let out = reload(&g);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no role \"reader\""));
    assert_eq!(
        reader.err("kv_put", json!({"key": "/pub/x", "value": 1})),
        "denied"
    );
    // A good one takes effect for the next call, on the same connection.
    std::fs::write(
        &policy,
        POLICY.replace("write = [\"/pub/notes/*\"]", "write = [\"/pub/*\"]"),
    )
    .unwrap();
    let out = reload(&g);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reloaded"));
    reader.ok("kv_put", json!({"key": "/pub/x", "value": 1}));
}

#[test]
fn sighup_reload_takes_effect_for_the_next_call() {
    let g = start();
    let mut reader = Client::connect(&g.socket("reader"));
    assert_eq!(
        reader.err("kv_get", json!({"key": "/pub/none"})),
        "not_found"
    );
    let policy = g.dir.join("policy.toml");
    std::fs::write(
        &policy,
        POLICY.replace("tools = [\"kv_get\", ", "tools = ["),
    )
    .unwrap();
    g.signal(Signal::HUP);
    // The reload is asynchronous to us: ask the admin socket when it is done
    // rather than sleep. `status` reports the policy hash in force.
    let want = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(std::fs::read(&policy).unwrap());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let mut hash = String::new();
    for _ in 0..10_000 {
        hash = g.status()["hash"].as_str().unwrap().to_string();
        if hash == want {
            break;
        }
        std::thread::yield_now();
    }
    assert_eq!(hash, want, "SIGHUP reload never happened");
    // The open session is told its tools changed (before any later reply).
    let id = reader.start(
        "tools/call",
        json!({"name": "kv_get", "arguments": {"key": "/pub/a"}}),
    );
    let note = reader.recv().unwrap();
    assert_eq!(note["method"], "notifications/tools/list_changed", "{note}");
    let r = reader.recv().unwrap();
    assert_eq!(r["id"], id);
    assert_eq!(r["error"]["code"], -32010, "{r}");
}

#[test]
fn a_gateway_whose_agent_has_no_role_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.toml"), POLICY).unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p.toml\"\n[agents.x]\nrole = \"auditor\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no role \"auditor\""), "{err}");
    assert!(
        !dir.path().join("s").exists(),
        "fails before touching the store"
    );
}

#[test]
fn policy_cli_check_explain_show() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(BIN)
        .current_dir(root)
        .args([
            "policy",
            "check",
            "policies/apex.toml",
            "policies/readonly.toml",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tests passed"));

    let out = Command::new(BIN)
        .current_dir(root)
        .args([
            "policy",
            "explain",
            "--policy",
            "policies/apex.toml",
            "--role",
            "adversary",
            "--tool",
            "kv_put",
            "--args",
            r#"{"key":"/projects/p1/code/x.py","value":1}"#,
            "--json",
        ])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["rule"]["line"], 0);

    let out = Command::new(BIN)
        .current_dir(root)
        .args([
            "policy",
            "explain",
            "--policy",
            "policies/apex.toml",
            "--role",
            "coder",
            "--tool",
            "kv_put",
            "--args",
            r#"{"key":"/projects/p1/code/x.py","value":1}"#,
        ])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.starts_with("ALLOW"), "{t}");
    assert!(
        t.contains("roles.coder.write = \"/projects/*/code/**\""),
        "{t}"
    );

    let out = Command::new(BIN)
        .current_dir(root)
        .args([
            "policy",
            "show",
            "--policy",
            "policies/apex.toml",
            "--role",
            "adversary",
        ])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.contains("kv_delete  deny"), "{t}");
    assert!(
        t.contains("roles.adversary.write = \"/projects/*/reviews/**\""),
        "{t}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[roles.a]\ntools = [\"kv_get\"]\nread = [\"no-slash\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:3:9") && err.contains("can never match") && err.contains("3 | read"),
        "{err}"
    );
}
