//! A full disk degrades, never stops: the store and its audit journal on a
//! small tmpfs, filled by another file. Reads go on and are audited from the
//! journal's reserve, writes fail with `no_space`, a restart on the full disk
//! serves reads, and freeing the space resumes writes without a restart;
//! nothing acknowledged is lost and the chain verifies. Needs root (it
//! mounts a tmpfs): fails, not skips, without it.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Client, Gateway, CODER};
use serde_json::{json, Value};

/// The tmpfs under the store: small enough to fill in a moment.
const DISK: &str = "64m";
/// The default `[audit] journal_reserve` (README, SECURITY.md).
const RESERVE: u64 = 4 << 20;

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A gateway whose store (and so its journal) lives on a tmpfs of its own.
/// Fields drop in order: the gateway stops before the unmount.
struct SmallDisk {
    g: Gateway,
    mount: Mount,
}

impl SmallDisk {
    fn new() -> SmallDisk {
        assert!(
            common::is_root(),
            "this test needs root: it mounts a tmpfs (CI runs as root)"
        );
        let g = Gateway::prepare("", CODER, common::ALLOW_ALL);
        let store = g.dir.join("state/store");
        std::fs::create_dir_all(&store).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={DISK},mode=0700"))
            .arg("tmpfs")
            .arg(&store)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        let mut s = SmallDisk {
            g,
            mount: Mount(store),
        };
        s.g.launch().unwrap();
        s
    }

    fn free(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.mount.0).unwrap();
        st.f_bavail * st.f_frsize
    }

    fn filler(&self) -> PathBuf {
        self.mount.0.join("filler")
    }

    /// Another file takes every block left.
    fn fill(&self) {
        let mut f = File::create(self.filler()).unwrap();
        for chunk in [1 << 20, 4096, 1] {
            let buf = vec![0x5au8; chunk];
            while f.write_all(&buf).is_ok() {}
        }
        assert_eq!(self.free(), 0, "the disk is full");
    }

    fn restart(&mut self) -> Duration {
        self.g.kill();
        let started = Instant::now();
        self.g
            .launch()
            .unwrap_or_else(|e| panic!("the gateway did not start: {e}"));
        started.elapsed()
    }
}

fn put(c: &mut Client, key: &str, value: Value) -> Value {
    c.call("kv_put", json!({"key": key, "value": value}))
}

fn error_of(r: &Value) -> (&str, &str) {
    let e = &r["structuredContent"]["error"];
    (e["code"].as_str().unwrap(), e["message"].as_str().unwrap())
}

fn assert_no_space(r: &Value, path: &Path) {
    assert_eq!(r["isError"], true, "{r}");
    let (code, message) = error_of(r);
    assert_eq!(code, "no_space", "{r}");
    assert!(
        message.contains(&format!("no space left on device {}", path.display())),
        "{r}"
    );
}

/// Restarts on a disk with space, checks every acknowledged write is there,
/// stops, and checks the served reads are in a chain that verifies.
fn check_after(s: &mut SmallDisk, acknowledged: &[(String, Value)], reads_served: usize) {
    s.restart();
    let mut c = s.g.client();
    for (key, value) in acknowledged {
        assert_eq!(
            &c.ok("kv_get", json!({"key": key}))["value"],
            value,
            "{key}"
        );
    }
    drop(c);
    assert!(s.g.stop().success());
    let records = s.g.audit_export();
    let reads = records
        .iter()
        .filter(|r| r["tool"] == "kv_get" && r["outcome"]["status"] == "ok")
        .count();
    assert!(
        reads >= reads_served + acknowledged.len(),
        "{reads} kv_get records for {reads_served} reads served and {} checked",
        acknowledged.len()
    );
    s.g.assert_audit_verifies();
}

#[test]
fn a_full_disk_serves_audited_reads_refuses_writes_and_recovers_by_itself() {
    let mut s = SmallDisk::new();
    let store = s.mount.0.clone();
    let mut c = s.g.client();
    let mut acknowledged = Vec::new();
    for i in 0..50 {
        let key = format!("/before/{i}");
        let r = put(&mut c, &key, json!(i));
        assert_eq!(r["isError"], false, "{r}");
        acknowledged.push((key, json!(i)));
    }
    let mut served = 0usize;

    s.fill();
    // Writes fail, saying why; reads go on.
    for i in 0..20 {
        assert_no_space(&put(&mut c, &format!("/full/{i}"), json!(i)), &store);
    }
    // A delete too: LMDB's file never shrinks, so it would free no disk.
    let r = c.call("kv_delete", json!({"key": "/before/1"}));
    assert_no_space(&r, &store);
    for i in 0..1000 {
        assert_eq!(
            c.ok("kv_get", json!({"key": "/before/7"}))["value"],
            7,
            "read {i}"
        );
        served += 1;
    }

    // A crash and a restart on the full disk: it starts and serves reads.
    drop(c);
    let startup = s.restart();
    let mut c = s.g.client();
    for _ in 0..1000 {
        assert_eq!(c.ok("kv_get", json!({"key": "/before/8"}))["value"], 8);
        served += 1;
    }
    assert_no_space(&put(&mut c, "/full/after-restart", json!(1)), &store);

    // Reads are served as long as their records fit in the reserve, then
    // refused (no data without a record), as no_space.
    let refused = loop {
        let r = c.call("kv_get", json!({"key": "/before/9"}));
        if r["isError"] == true {
            break r;
        }
        assert_eq!(r["structuredContent"]["value"], 9);
        served += 1;
        assert!(served < 200_000, "the reserve never ran out");
    };
    assert_eq!(error_of(&refused).0, "no_space", "{refused}");
    assert!(
        error_of(&refused).1.contains("no space left on device"),
        "{refused}"
    );
    assert!(!refused.to_string().contains("\"value\":9"), "{refused}");
    // Refused reads do not pile up journal files.
    let files = || {
        std::fs::read_dir(store.join("audit-journal"))
            .unwrap()
            .count()
    };
    let before = files();
    for _ in 0..200 {
        let r = c.call("kv_get", json!({"key": "/before/9"}));
        assert_eq!(error_of(&r).0, "no_space", "{r}");
    }
    assert_eq!(files(), before, "a refused read left journal files behind");
    // At least the reserve's worth of records (~470 bytes each; 512 leaves slack).
    assert!(
        served as u64 >= RESERVE / 512,
        "only {served} reads served on the full disk"
    );

    // Space comes back a little at a time: the service recovers by itself,
    // with no more free space than the journal reserved (its reserve, plus
    // what sealing the records it holds needs).
    let filler = s.filler();
    let filled = std::fs::metadata(&filler).unwrap().len();
    let mut size = filled;
    let step = 256u64 << 10;
    let recovered_at = loop {
        size = size.saturating_sub(step);
        OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap()
            .set_len(size)
            .unwrap();
        let free = s.free();
        let r = put(&mut c, "/recovered", json!(free));
        if r["isError"] == false {
            acknowledged.push(("/recovered".into(), json!(free)));
            break free;
        }
        assert_eq!(error_of(&r).0, "no_space", "{r}");
        assert!(size > 0, "never recovered");
    };
    // What the journal reserved: its segment and its spare (within the
    // step this measures in).
    let released = filled - size;
    assert!(
        released <= 2 * RESERVE + step,
        "writes resumed only once {released} bytes were freed ({recovered_at} free)"
    );
    // Reads are served again, writes go on.
    assert_eq!(c.ok("kv_get", json!({"key": "/before/9"}))["value"], 9);
    served += 1;
    std::fs::remove_file(&filler).unwrap();
    for i in 0..50 {
        let key = format!("/after/{i}");
        assert_eq!(put(&mut c, &key, json!(i))["isError"], false);
        acknowledged.push((key, json!(i)));
    }
    drop(c);
    eprintln!(
        "FIGURES: reads served on the full disk: {served}; space freed when writes resumed: {released} bytes ({recovered_at} free then); start-up on the full disk: {startup:?}"
    );
    check_after(&mut s, &acknowledged, served);
}

/// The control: the same run without the filler; everything succeeds.
#[test]
fn the_same_run_on_a_disk_with_space_succeeds_throughout() {
    let mut s = SmallDisk::new();
    let mut c = s.g.client();
    let mut acknowledged = Vec::new();
    let mut served = 0;
    for i in 0..50 {
        let key = format!("/before/{i}");
        assert_eq!(put(&mut c, &key, json!(i))["isError"], false);
        acknowledged.push((key, json!(i)));
    }
    for i in 0..1000 {
        assert_eq!(
            c.ok("kv_get", json!({"key": "/before/7"}))["value"],
            7,
            "read {i}"
        );
        served += 1;
    }
    drop(c);
    let startup = s.restart();
    eprintln!("FIGURES: start-up with space: {startup:?}");
    let mut c = s.g.client();
    for _ in 0..1000 {
        assert_eq!(c.ok("kv_get", json!({"key": "/before/8"}))["value"], 8);
        served += 1;
    }
    for i in 0..50 {
        let key = format!("/after/{i}");
        assert_eq!(put(&mut c, &key, json!(i))["isError"], false);
        acknowledged.push((key, json!(i)));
    }
    drop(c);
    check_after(&mut s, &acknowledged, served);
}

/// Past the reserve nothing can be audited: a restart then fails, saying so
/// (never serving unaudited), and starts once space is freed.
#[test]
fn past_the_reserve_a_restart_fails_with_no_space_and_starts_once_space_is_freed() {
    let mut s = SmallDisk::new();
    let mut c = s.g.client();
    assert_eq!(put(&mut c, "/k", json!(1))["isError"], false);
    s.fill();
    let mut served = 0usize;
    loop {
        let r = c.call("kv_get", json!({"key": "/k"}));
        if r["isError"] == true {
            assert_eq!(error_of(&r).0, "no_space", "{r}");
            break;
        }
        served += 1;
        assert!(served < 200_000, "the reserve never ran out");
    }
    drop(c);
    s.g.kill();
    let err =
        s.g.launch()
            .expect_err("started with no space for its records");
    assert!(err.contains("no space left on device"), "{err}");
    std::fs::remove_file(s.filler()).unwrap();
    s.g.launch().unwrap();
    let mut c = s.g.client();
    assert_eq!(c.ok("kv_get", json!({"key": "/k"}))["value"], 1);
    drop(c);
    assert!(s.g.stop().success());
    let reads =
        s.g.audit_export()
            .iter()
            .filter(|r| r["tool"] == "kv_get" && r["outcome"]["status"] == "ok")
            .count();
    assert!(reads > served, "{reads} records for {served} reads served");
    s.g.assert_audit_verifies();
}
