//! The store's space bounds against the real gateway and a real LMDB map: the
//! data quota (writes refused, reads and deletes served, the alarm, recovery
//! without a restart), per-role quotas, the audit's own bound under a flood,
//! and a config whose bounds do not fit its map.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Client, Gateway};
use serde_json::{json, Value};

/// A gateway on a config of our own (`[gateway]` body after the paths, then
/// whatever follows: `[audit]`, agents).
fn start(gateway: &str, rest: &str, policy: &str) -> Gateway {
    let mut g = Gateway::prepare("", "", policy);
    std::fs::write(
        &g.config,
        format!("[gateway]\nstore = \"state/store\"\nruntime_dir = \"state/run\"\npolicy = \"policy.toml\"\n{gateway}\n{rest}"),
    )
    .unwrap();
    g.launch().expect("gateway did not become ready");
    g
}

fn store_status(g: &Gateway) -> Value {
    let s = g.status();
    assert_eq!(s["ok"], true, "{s}");
    s["store"].clone()
}

fn alarm<'a>(store: &'a Value, quota: &str) -> Option<&'a Value> {
    store["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["quota"] == quota)
}

/// Polls `f` until it holds, for at most 10 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mib(n: u64) -> String {
    format!("{:.2}MiB", n as f64 / 1048576.0)
}

#[test]
fn filling_the_data_quota_refuses_writes_serves_reads_and_deletes_and_recovers_without_a_restart() {
    let g = start(
        "map_size = \"32MiB\"\nmax_store_bytes = \"4MiB\"",
        common::CODER,
        common::ALLOW_ALL,
    );
    let mut c = g.client();
    let value = "v".repeat(60 << 10);
    let before = store_status(&g);
    assert!(before["alarms"].as_array().unwrap().is_empty(), "{before}");

    // Fill: every put succeeds until one would take data past the quota.
    let mut n = 0;
    let refusal = loop {
        let r = c.call(
            "kv_put",
            json!({"key": format!("/fill/{n}"), "value": value}),
        );
        if r["isError"] == true {
            break r;
        }
        n += 1;
        assert!(n < 1000, "the quota never refused a write");
    };
    let err = &refusal["structuredContent"]["error"];
    assert_eq!(err["code"], "quota_exceeded", "{refusal}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("gateway.max_store_bytes = 4194304")
            && message.contains("store data")
            && message.contains("delete keys"),
        "{message}"
    );
    let full = store_status(&g);
    let data = full["data_bytes"].as_u64().unwrap();
    assert!(data <= 4 << 20, "data past its quota: {full}");
    let a = alarm(&full, "gateway.max_store_bytes").expect("the quota alarm is raised");
    assert_eq!(a["level"], "exceeded", "{full}");
    assert!(g
        .log()
        .contains("quota alarm raised: gateway.max_store_bytes"));
    // Writes that do not fit stay refused, through kv_txn too.
    assert_eq!(
        c.err(
            "kv_txn",
            json!({"ops": [{"op": "put", "key": "/t", "value": value}]})
        ),
        "quota_exceeded"
    );
    assert_eq!(
        c.err(
            "kv_put",
            json!({"key": format!("/fill/{n}"), "value": value})
        ),
        "quota_exceeded"
    );
    // Reads work.
    assert_eq!(c.ok("kv_get", json!({"key": "/fill/0"}))["value"], value);
    let listed = c.ok("kv_list", json!({"prefix": "/fill", "limit": 1000}));
    assert_eq!(listed["keys"].as_array().unwrap().len(), n);

    // Deletes work: a compare-and-swap delete, a kv_txn of deletes, plain ones.
    let rev = c.ok("kv_get", json!({"key": "/fill/0"}))["revision"].clone();
    assert_eq!(
        c.ok("kv_delete", json!({"key": "/fill/0", "if_revision": rev}))["deleted"],
        true
    );
    c.ok(
        "kv_txn",
        json!({"ops": [{"op": "delete", "key": "/fill/1"}, {"op": "delete", "key": "/fill/2"}]}),
    );
    for i in 3..n {
        c.ok("kv_delete", json!({"key": format!("/fill/{i}")}));
    }
    // The next write succeeds, with no restart, and the alarm clears.
    c.ok("kv_put", json!({"key": "/after", "value": value}));
    let after = store_status(&g);
    assert!(
        alarm(&after, "gateway.max_store_bytes").is_none(),
        "{after}"
    );
    assert!(g
        .log()
        .contains("quota alarm cleared: gateway.max_store_bytes"));
    eprintln!(
        "FIGURES data quota: {n} puts of 60KiB accepted; refused at data {} of quota {} (map {}); map high-water {} at the refusal, {} after deleting everything; audit {}",
        mib(data),
        mib(4 << 20),
        mib(full["map_size"].as_u64().unwrap()),
        mib(full["map_used_bytes"].as_u64().unwrap()),
        mib(after["map_used_bytes"].as_u64().unwrap()),
        mib(after["audit_bytes"].as_u64().unwrap()),
    );
    // Deletes needed no more of the map than the headroom holds.
    assert!(after["map_used_bytes"].as_u64().unwrap() <= 32 << 20);
}

const TWO_ROLES: &str = r#"
[roles.a]
tools = ["kv_*"]
read = ["/**"]
write = ["/a/**"]
delete = ["/**"]
limits = { max_keys = 5 }

[roles.b]
tools = ["kv_*"]
read = ["/**"]
write = ["/b/**", "/a/**"]
delete = ["/**"]
limits = { max_store_bytes = 4096 }
"#;

#[test]
fn a_role_over_its_quota_is_refused_while_another_role_writes() {
    let g = start(
        "map_size = \"64MiB\"",
        "[agents.a]\nrole = \"a\"\n[agents.b]\nrole = \"b\"\n",
        TWO_ROLES,
    );
    let mut a = Client::connect(&g.socket("a"));
    let mut b = Client::connect(&g.socket("b"));
    for i in 0..5 {
        a.ok("kv_put", json!({"key": format!("/a/{i}"), "value": i}));
    }
    let r = a.call("kv_put", json!({"key": "/a/5", "value": 5}));
    let err = &r["structuredContent"]["error"];
    assert_eq!(err["code"], "quota_exceeded", "{r}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("role a's keys would be 6")
            && message.contains("roles.a.limits.max_keys (")
            && message.contains("policy.toml:7: roles.a.limits.max_keys = 5"),
        "{message}"
    );
    // Meanwhile b writes as it likes.
    for i in 0..20 {
        b.ok("kv_put", json!({"key": format!("/b/{i}"), "value": i}));
    }
    let s = store_status(&g);
    assert_eq!(s["roles"]["a"]["keys"], 5, "{s}");
    assert_eq!(s["roles"]["a"]["max_keys"], 5, "{s}");
    assert_eq!(s["roles"]["b"]["keys"], 20, "{s}");
    let al = alarm(&s, "roles.a.limits.max_keys").expect("a's alarm");
    assert_eq!(al["level"], "exceeded", "{s}");
    assert_eq!(al["role"], "a");
    assert!(
        al["rule"].as_str().unwrap().contains("policy.toml:7"),
        "{s}"
    );
    assert!(alarm(&s, "roles.b.limits.max_store_bytes").is_none(), "{s}");
    assert!(g
        .log()
        .contains("quota alarm raised: roles.a.limits.max_keys"));
    // a may still overwrite what it owns (not a new key), and read; the
    // alarm stays raised (a is at its limit) but no longer says exceeded.
    a.ok("kv_put", json!({"key": "/a/0", "value": "again"}));
    assert_eq!(b.ok("kv_get", json!({"key": "/a/0"}))["value"], "again");
    let s = store_status(&g);
    assert_eq!(
        alarm(&s, "roles.a.limits.max_keys").unwrap()["level"],
        "near",
        "{s}"
    );
    // A key a owns that b overwrites becomes b's: a has room again.
    b.ok("kv_put", json!({"key": "/a/4", "value": "b's"}));
    a.ok("kv_put", json!({"key": "/a/5", "value": 5}));
    // b's byte quota: a value that takes it past 4096 bytes is refused, a
    // small one is not.
    assert_eq!(
        b.err(
            "kv_put",
            json!({"key": "/b/big", "value": "x".repeat(4096)})
        ),
        "quota_exceeded"
    );
    b.ok("kv_put", json!({"key": "/b/small", "value": "x"}));
    // A delete by a frees one of a's keys; a writes again, no restart.
    assert_eq!(
        a.err("kv_put", json!({"key": "/a/6", "value": 6})),
        "quota_exceeded"
    );
    a.ok("kv_delete", json!({"key": "/a/1"}));
    a.ok("kv_put", json!({"key": "/a/6", "value": 6}));
    let s = store_status(&g);
    assert_eq!(s["roles"]["a"]["keys"], 5, "{s}");
}

#[test]
fn a_flood_of_audited_calls_keeps_the_audit_under_its_bound_and_data_writes_working() {
    let mut g = start(
        "map_size = \"32MiB\"\nmax_store_bytes = \"8MiB\"",
        "[audit]\nmax_bytes = \"2MiB\"\nsync_interval = \"100ms\"\n[agents.coder]\nrole = \"coder\"\n",
        common::ALLOW_ALL,
    );
    let mut c = g.client();
    // Each read of a missing 1000-byte key is a record of about 1.4 KB: the
    // flood writes ~28 MB of records, near the whole map, and 14x the bound.
    let long = format!("/{}", "k".repeat(999));
    let flood = 20_000;
    let mut max_audit = 0u64;
    for i in 0..flood {
        assert_eq!(c.err("kv_get", json!({"key": long})), "not_found");
        if i % 500 == 0 {
            c.ok("kv_put", json!({"key": format!("/data/{i}"), "value": i}));
            let s = store_status(&g);
            max_audit = max_audit.max(s["audit_bytes"].as_u64().unwrap());
        }
    }
    c.ok(
        "kv_put",
        json!({"key": "/data/last", "value": "still writing"}),
    );
    let mut s = Value::Null;
    eventually("the audit to be pruned within its bound", || {
        s = store_status(&g);
        s["audit_pruned"].as_u64().unwrap() > 0 && s["audit_bytes"].as_u64().unwrap() <= 2 << 20
    });
    max_audit = max_audit.max(s["audit_bytes"].as_u64().unwrap());
    assert!(s["map_used_bytes"].as_u64().unwrap() <= 32 << 20);
    eprintln!(
        "FIGURES audit flood: {flood} reads (~{} of records); audit {} at the end, at most {} seen, bound {}; {} records pruned; data {}; map high-water {} of {}",
        mib(flood * 1400),
        mib(s["audit_bytes"].as_u64().unwrap()),
        mib(max_audit),
        mib(2 << 20),
        s["audit_pruned"],
        mib(s["data_bytes"].as_u64().unwrap()),
        mib(s["map_used_bytes"].as_u64().unwrap()),
        mib(32 << 20),
    );
    assert_eq!(
        c.ok("kv_get", json!({"key": "/data/last"}))["value"],
        "still writing"
    );
    drop(c);
    assert!(g.stop().success());
    // What remains verifies from its checkpoint.
    g.assert_audit_verifies();
}

#[test]
fn a_config_whose_quota_and_audit_do_not_fit_the_map_is_refused() {
    let mut g = Gateway::prepare("", "", common::ALLOW_ALL);
    let config = |extra: &str| {
        format!("[gateway]\nstore = \"state/store\"\nruntime_dir = \"state/run\"\npolicy = \"policy.toml\"\nmap_size = \"64MiB\"\n{extra}\n[agents.coder]\nrole = \"coder\"\n")
    };
    std::fs::write(&g.config, config("max_store_bytes = \"56MiB\"")).unwrap();
    let err = g.launch().unwrap_err();
    assert!(
        err.contains("gateway.max_store_bytes (56.0MiB) + audit.max_bytes (12.8MiB)")
            && err.contains("headroom")
            && err.contains("raise map_size"),
        "{err}"
    );
    assert!(
        !g.dir.join("state/store/data.mdb").exists(),
        "refused before opening the store"
    );
    // Control: the same quota without the audit's default share fits.
    std::fs::write(
        &g.config,
        config("max_store_bytes = \"40MiB\"\n[audit]\nmax_bytes = \"8MiB\""),
    )
    .unwrap();
    g.launch().expect("a config that fits starts");
    let s = store_status(&g);
    assert_eq!(s["max_store_bytes"], 40 << 20);
    assert_eq!(s["audit_max_bytes"], 8 << 20);
}
