//! The audit log end to end: the real gateway writes it, the real CLI reads
//! and verifies it, raw LMDB edits are caught, and a kill -9 loses nothing
//! that was acknowledged.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{Client, Gateway, BIN, CODER};
use serde_json::{json, Value};

const AGENTS: &str = "[agents.coder]\nrole = \"coder\"\n[agents.viewer]\nrole = \"viewer\"\n";
const POLICY: &str = r#"
[roles.coder]
tools = ["kv_*"]
read = ["/**"]
write = ["/**"]
delete = ["/**"]

[roles.viewer]
tools = ["kv_get", "kv_list"]
read = ["/pub/**"]
"#;

fn cli(g: &Gateway, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&g.config)
        .output()
        .unwrap()
}

fn export(g: &Gateway) -> Vec<Value> {
    let out = cli(g, &["audit", "export"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn verify(g: &Gateway) -> (bool, String) {
    let out = cli(g, &["audit", "verify"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_kind_of_event_is_recorded_and_the_chain_verifies() {
    let mut g = Gateway::start_with_policy("max_connections_per_agent = 2\n", AGENTS, POLICY);
    let mut coder = Client::connect(&g.socket("coder"));
    let mut viewer = Client::connect(&g.socket("viewer"));
    coder.ok(
        "kv_put",
        json!({"key": "/pub/a", "value": {"secret": "s3cr3t"}}),
    );
    viewer.ok("kv_get", json!({"key": "/pub/a"}));
    assert_eq!(viewer.err("kv_get", json!({"key": "/private/x"})), "denied");
    let r = viewer.request(
        "tools/call",
        json!({"name": "kv_put", "arguments": {"key": "/pub/a", "value": 1}}),
    );
    assert_eq!(r["error"]["code"], -32010);
    assert_eq!(
        viewer.err("kv_get", json!({"key": "/pub/../x"})),
        "invalid_key"
    );
    // A refused connection: the viewer's socket allows two.
    let _second = Client::connect(&g.socket("viewer"));
    let mut third = Client::connect_raw(&g.socket("viewer")).unwrap();
    assert!(third.refusal()["error"].is_object());
    // A rejected and an accepted reload.
    let policy = g.dir.join("policy.toml");
    std::fs::write(&policy, "[roles.coder]\nbogus = 1\n").unwrap();
    assert!(!cli(&g, &["policy", "reload"]).status.success());
    std::fs::write(&policy, POLICY).unwrap();
    assert!(cli(&g, &["policy", "reload"]).status.success());
    drop((coder, viewer, third));
    assert!(g.stop().success());

    let records = export(&g);
    let events: Vec<&str> = records
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    for kind in [
        "gateway_start",
        "policy_loaded",
        "call",
        "connection_refused",
        "policy_rejected",
        "gateway_stop",
    ] {
        assert!(events.contains(&kind), "no {kind} record in {events:?}");
    }
    assert_eq!(events.first(), Some(&"gateway_start"));
    assert_eq!(events.last(), Some(&"gateway_stop"));
    assert_eq!(events.iter().filter(|e| **e == "policy_loaded").count(), 2);

    let calls: Vec<&Value> = records.iter().filter(|r| r["event"] == "call").collect();
    let put = calls
        .iter()
        .find(|r| r["tool"] == "kv_put" && r["agent"] == "coder")
        .unwrap();
    assert_eq!(put["decision"], "allow");
    assert_eq!(put["outcome"]["status"], "ok");
    assert_eq!(put["keys"], json!(["/pub/a"]));
    assert_eq!(put["role"], "coder");
    assert!(put["uid"].is_u64() && put["pid"].is_i64());
    assert_eq!(put["args_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(put["policy_sha256"].as_str().unwrap().len(), 64);
    assert!(put["latency_us"].is_u64());
    assert_eq!(put["value_bytes"], 19, "{put}");
    assert!(
        put.get("values").is_none(),
        "values are not kept by default"
    );
    assert!(!serde_json::to_string(&records).unwrap().contains("s3cr3t"));

    // Denied calls carry the deciding rule.
    let key_denied = calls
        .iter()
        .find(|r| r["keys"] == json!(["/private/x"]))
        .unwrap();
    assert_eq!(key_denied["decision"], "deny");
    assert_eq!(
        key_denied["rule"]["text"],
        "deny by default: no rule allows it"
    );
    assert_eq!(key_denied["outcome"]["code"], "denied");
    let tool_denied = calls
        .iter()
        .find(|r| r["tool"] == "kv_put" && r["agent"] == "viewer")
        .unwrap();
    assert_eq!(tool_denied["decision"], "deny");
    assert_eq!(tool_denied["rule"]["line"], 0);
    assert!(
        tool_denied.get("keys").is_none(),
        "a denied tool's arguments are never parsed"
    );
    let invalid = calls.iter().find(|r| r["decision"] == "invalid").unwrap();
    assert_eq!(invalid["outcome"]["code"], "invalid_key");
    let refused = records
        .iter()
        .find(|r| r["event"] == "connection_refused")
        .unwrap();
    assert_eq!(refused["agent"], "viewer");

    let (ok, text) = verify(&g);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("{} records verified", records.len())),
        "{text}"
    );

    // The stats and the table agree with the records.
    let out = cli(&g, &["audit", "stats"]);
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(
        stats.lines().any(|l| l.starts_with("viewer")
            && l.contains("kv_get")
            && l.split_whitespace().nth(4) == Some("2")),
        "{stats}"
    );
    let out = cli(
        &g,
        &[
            "audit",
            "query",
            "--decision",
            "deny",
            "--agent",
            "viewer",
            "--event",
            "call",
        ],
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.lines().count(), 1 + 2, "{table}");
}

#[test]
fn record_values_keeps_the_written_values() {
    let mut g =
        Gateway::start_with_policy("[audit]\nrecord_values = true\n", CODER, common::ALLOW_ALL);
    let mut c = g.client();
    c.ok("kv_txn", json!({"ops": [{"op": "put", "key": "/a", "value": 1}, {"op": "put", "key": "/b", "value": "two"}]}));
    assert!(g.stop().success());
    let records = export(&g);
    let txn = records.iter().find(|r| r["tool"] == "kv_txn").unwrap();
    assert_eq!(txn["values"], json!([1, "two"]));
    assert_eq!(txn["keys"], json!(["/a", "/b"]));
}

type AuditDb = heed::Database<heed::types::Bytes, heed::types::Bytes>;
type Tamper = dyn FnOnce(&heed::Env, &mut heed::RwTxn, AuditDb);

/// Rewrites one record of a stopped gateway's store with a raw LMDB write.
fn tamper(
    store: &Path,
    f: impl FnOnce(&heed::Env, &mut heed::RwTxn, heed::Database<heed::types::Bytes, heed::types::Bytes>),
) {
    let mut opts = heed::EnvOpenOptions::new();
    opts.map_size(256 << 20).max_dbs(8);
    // SAFETY: the gateway is stopped; this test is the only user of the env.
    let env = unsafe { opts.open(store) }.unwrap();
    let mut wtxn = env.write_txn().unwrap();
    let db: heed::Database<heed::types::Bytes, heed::types::Bytes> =
        env.open_database(&wtxn, Some("audit")).unwrap().unwrap();
    f(&env, &mut wtxn, db);
    wtxn.commit().unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_raw_edit_delete_or_reorder_fails_verify_at_that_seq() {
    let mut g = Gateway::start();
    let mut c = g.client();
    for i in 0..10 {
        c.ok("kv_put", json!({"key": format!("/k{i}"), "value": i}));
    }
    drop(c);
    assert!(g.stop().success());
    assert!(verify(&g).0);
    let store = g.dir.join("state/store");
    let pristine = g.dir.join("pristine");
    copy_dir(&store, &pristine);
    let key = |n: u64| n.to_be_bytes();

    let cases: Vec<(&str, u64, Box<Tamper>)> = vec![
        (
            "edit",
            5,
            Box::new(move |_, w, db| {
                let raw = db.get(w, &key(5)).unwrap().unwrap().to_vec();
                let edited = String::from_utf8(raw).unwrap().replace("/k2", "/k9");
                assert!(edited.contains("/k9"));
                db.put(w, &key(5), edited.as_bytes()).unwrap();
            }),
        ),
        (
            "delete",
            6,
            Box::new(move |_, w, db| {
                assert!(db.delete(w, &key(6)).unwrap());
            }),
        ),
        (
            "reorder",
            4,
            Box::new(move |_, w, db| {
                let a = db.get(w, &key(4)).unwrap().unwrap().to_vec();
                let b = db.get(w, &key(5)).unwrap().unwrap().to_vec();
                db.put(w, &key(4), &b).unwrap();
                db.put(w, &key(5), &a).unwrap();
            }),
        ),
        (
            "truncate the head",
            1,
            Box::new(move |_, w, db| {
                assert!(db.delete(w, &key(1)).unwrap());
            }),
        ),
    ];
    for (what, seq, f) in cases {
        std::fs::remove_dir_all(&store).unwrap();
        copy_dir(&pristine, &store);
        tamper(&store, f);
        let (ok, text) = verify(&g);
        assert!(!ok, "{what}: verify passed");
        assert!(
            text.contains(&format!("broken at seq {seq}:")),
            "{what}: {text}"
        );
    }
}

#[test]
fn kill_9_during_a_write_storm_leaves_a_verifying_chain_with_every_acknowledged_write() {
    let mut g = Gateway::start_with("max_connections_per_agent = 8\n", CODER);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let sock = g.socket("coder");
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let (acked, count, sock) = (acked.clone(), count.clone(), sock.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock);
                for i in 0.. {
                    let key = format!("/storm/w{w}/{i}");
                    // The gateway dies at any point: a failed send ends this
                    // writer like a missing reply does.
                    c.try_send(&json!({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                        "params": {"name": "kv_put", "arguments": {"key": key, "value": i}}}));
                    match c.recv() {
                        Some(r) if r["result"]["isError"] == false => {
                            acked.lock().unwrap().push(key);
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => return,
                    }
                    // Reads too, so the journal holds records at the kill.
                    c.try_send(&json!({"jsonrpc": "2.0", "id": "r", "method": "tools/call",
                        "params": {"name": "kv_get", "arguments": {"key": "/storm/none"}}}));
                    if c.recv().is_none() {
                        return;
                    }
                }
            })
        })
        .collect();
    // Kill once plenty of writes were acknowledged (no sleep: wait on the count).
    while count.load(Ordering::SeqCst) < 300 {
        std::thread::yield_now();
    }
    g.kill();
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300);
    // Restart (the journal is replayed into the chain), then stop cleanly.
    g.launch().unwrap();
    let mut c = g.client();
    for key in &acked {
        c.ok("kv_get", json!({"key": key}));
    }
    drop(c);
    assert!(g.stop().success());
    let (ok, text) = verify(&g);
    assert!(ok, "{text}");
    let records = export(&g);
    let recorded: BTreeSet<&str> = records
        .iter()
        .filter(|r| r["tool"] == "kv_put" && r["outcome"]["status"] == "ok")
        .map(|r| r["keys"][0].as_str().unwrap())
        .collect();
    for key in &acked {
        assert!(
            recorded.contains(key.as_str()),
            "acknowledged {key} has no record"
        );
    }
    // Two gateway_start records (before and after the crash), one stop.
    assert_eq!(
        records
            .iter()
            .filter(|r| r["event"] == "gateway_start")
            .count(),
        2
    );
}

#[test]
fn tail_follow_shows_a_call_made_after_it_started() {
    let g = Gateway::start();
    let mut tail = Command::new(BIN)
        .args(["audit", "tail", "-f", "-n", "5", "--config"])
        .arg(&g.config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    let header = lines.next().unwrap().unwrap();
    assert!(header.starts_with("SEQ"), "{header}");
    // A watchdog ends tail if the record never comes, so the test fails
    // instead of hanging.
    let pid = tail.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(60));
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    g.client()
        .ok("kv_put", json!({"key": "/tail/marker", "value": 1}));
    let found = lines
        .map_while(Result::ok)
        .any(|l| l.contains("/tail/marker") && l.contains("kv_put"));
    let _ = tail.kill();
    let _ = tail.wait();
    drop(watchdog);
    assert!(found, "tail -f never showed the call");
}

#[test]
fn export_round_trips_through_jq_and_an_independent_verifier() {
    let mut g = Gateway::start();
    let mut c = g.client();
    c.ok(
        "kv_put",
        json!({"key": "/ünï/côdé", "value": {"text": "line\nbreak \"quoted\" \u{7f}", "n": 1.5}}),
    );
    c.ok("kv_get", json!({"key": "/ünï/côdé"}));
    drop(c);
    assert!(g.stop().success());
    let out = cli(&g, &["audit", "export"]);
    let exported = String::from_utf8(out.stdout).unwrap();
    assert!(exported.lines().count() >= 5);
    let jq = |args: &[&str], input: &str| {
        let mut p = Command::new("jq")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("jq is installed (scripts/test installs it)");
        p.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = p.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    // jq parses every line, and its sorted compact form is byte-identical.
    assert_eq!(jq(&["-cS", "."], &exported), exported);
    assert_eq!(
        jq(&["-r", ".event"], &exported).lines().next(),
        Some("gateway_start")
    );
    // An auditor's own verifier (Python's standard library only) agrees.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/audit_verify.py");
    let mut p = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin
        .take()
        .unwrap()
        .write_all(exported.as_bytes())
        .unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));
    // And it catches an edit.
    let edited = exported.replacen("kv_get", "kv_put", 1);
    let mut p = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/audit_verify.py"))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    p.stdin
        .take()
        .unwrap()
        .write_all(edited.as_bytes())
        .unwrap();
    assert!(!p.wait_with_output().unwrap().status.success());
}

#[test]
fn retention_prunes_behind_a_checkpoint_that_keeps_the_chain_verifiable() {
    let mut g = Gateway::start_with(
        "[audit]\nmax_records = 20\nsync_interval = \"50ms\"\n",
        CODER,
    );
    let mut c = g.client();
    for i in 0..40 {
        c.ok("kv_put", json!({"key": format!("/r/{i}"), "value": i}));
    }
    drop(c);
    assert!(g.stop().success());
    let records = export(&g);
    // The last commit (at shutdown) prunes too: max_records, plus the checkpoint.
    assert_eq!(records.len(), 21, "{} records kept", records.len());
    assert!(
        records.iter().any(|r| r["event"] == "checkpoint"),
        "no checkpoint"
    );
    assert!(records[0]["seq"].as_u64().unwrap() > 1);
    let (ok, text) = verify(&g);
    assert!(ok, "{text}");
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A running gateway whose audit journal lives on a 16 KiB tmpfs (it fills
/// after a few dozen records), sealing only every hour. Fields drop in order:
/// the gateway stops before the unmount. None (SKIPPED) when not root.
struct TinyJournalDisk {
    g: Gateway,
    mount: Mount,
}

fn tiny_journal_disk(test: &str) -> Option<TinyJournalDisk> {
    if !common::is_root() {
        eprintln!("SKIPPED {test}: needs root (mounts a tiny tmpfs)");
        return None;
    }
    // A reserve that fits the tiny disk (two 4 KiB segments): the disk
    // fills past it after a few dozen records.
    let g = Gateway::prepare(
        "[audit]\nsync_interval = \"1h\"\njournal_reserve = \"4KiB\"\n",
        CODER,
        common::ALLOW_ALL,
    );
    let journal = g.dir.join("state/store/audit-journal");
    std::fs::create_dir_all(&journal).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs"])
        .arg(&journal)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let mut s = TinyJournalDisk {
        g,
        mount: Mount(journal),
    };
    s.g.launch().unwrap();
    Some(s)
}

#[test]
fn when_the_audit_cannot_be_written_calls_fail_and_return_no_data() {
    let Some(s) =
        tiny_journal_disk("when_the_audit_cannot_be_written_calls_fail_and_return_no_data")
    else {
        return;
    };
    let g = &s.g;
    let mut c = g.client();
    c.ok("kv_put", json!({"key": "/secret", "value": "the data"}));
    let mut refused = None;
    for i in 0..1000 {
        let r = c.request(
            "tools/call",
            json!({"name": "kv_get", "arguments": {"key": "/secret"}}),
        );
        if r.get("error").is_some() || r["result"]["isError"] == true {
            refused = Some((i, r));
            break;
        }
        assert_eq!(r["result"]["structuredContent"]["value"], "the data");
    }
    let (i, r) = refused.expect("the journal never filled up");
    assert!(i > 0, "some reads were audited and served first");
    // A full disk: a tool error that says so.
    let error = &r["result"]["structuredContent"]["error"];
    assert_eq!(error["code"], "no_space", "{r}");
    let msg = error["message"].as_str().unwrap();
    assert!(msg.contains("no space left on device"), "{r}");
    assert!(msg.contains("audit log unavailable"), "{r}");
    assert!(
        !r.to_string().contains("the data"),
        "no data without an audit record"
    );
    // Denials cannot be recorded either: refused the same way.
    let r = c.request(
        "tools/call",
        json!({"name": "kv_get", "arguments": {"key": "/a/../b"}}),
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("audit log unavailable"),
        "{r}"
    );
    assert_eq!(r["error"]["code"], -32012, "{r}");
    assert_eq!(r["error"]["data"]["code"], "no_space", "{r}");
}

/// A journal write that fails part-way (the disk filled mid-line) must not
/// spoil the records appended once space is back: after a kill -9, every read
/// that was served is found in the log. (A torn line glued to the next record
/// made recovery stop at it, dropping everything after.)
#[test]
fn records_appended_after_a_full_journal_disk_survive_a_kill_9() {
    let Some(mut s) =
        tiny_journal_disk("records_appended_after_a_full_journal_disk_survive_a_kill_9")
    else {
        return;
    };
    let mut c = s.g.client();
    c.ok("kv_put", json!({"key": "/k", "value": 1}));
    for i in 0..20 {
        c.ok("kv_put", json!({"key": format!("/after/{i}"), "value": i}));
    }
    // Fill the journal's disk: reads are refused once a record cannot be written.
    let mut refused = false;
    for _ in 0..1000 {
        let r = c.request(
            "tools/call",
            json!({"name": "kv_get", "arguments": {"key": "/k"}}),
        );
        if r.get("error").is_some() || r["result"]["isError"] == true {
            refused = true;
            break;
        }
    }
    assert!(refused, "the journal never filled up");
    // Space comes back; these reads are served, so they must be in the log.
    let st = Command::new("mount")
        .args(["-o", "remount,size=4m"])
        .arg(&s.mount.0)
        .status()
        .unwrap();
    assert!(st.success(), "remount tmpfs");
    for i in 0..20 {
        assert_eq!(
            c.ok("kv_get", json!({"key": format!("/after/{i}")}))["value"],
            i
        );
    }
    s.g.kill();
    // Restart (the journal is replayed into the chain), then stop cleanly.
    s.g.launch().unwrap();
    assert!(s.g.stop().success());
    let records = export(&s.g);
    let after: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["tool"] == "kv_get"
                && r["keys"][0]
                    .as_str()
                    .is_some_and(|k| k.starts_with("/after/"))
        })
        .collect();
    assert_eq!(
        after.len(),
        20,
        "every served read after the disk freed up is in the log; gateway log:\n{}",
        s.g.log()
    );
    let (ok, text) = verify(&s.g);
    assert!(ok, "{text}");
}
