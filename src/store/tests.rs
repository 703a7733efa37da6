use super::*;
use serde_json::json;

fn open(dir: &Path) -> Store {
    Store::open(StoreOptions {
        path: dir.join("store"),
        map_size: 64 << 20,
        max_value_bytes: 1024,
        max_txn_ops: 16,
        history: 1000,
        audit: None,
        quota: QuotaOptions::default(),
    })
    .unwrap()
}

fn key(s: &str) -> Key {
    Key::parse(s).unwrap()
}

fn put(k: &str, v: Value) -> Mutation {
    Mutation::Put(Put {
        key: key(k),
        value: Written::new(v),
        if_revision: None,
    })
}

#[tokio::test]
async fn put_get_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let Outcome::Put(p) = s.mutate(put("/a", json!(1)), None).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        (p.revision, p.create_revision, p.previous_revision),
        (1, 1, None)
    );
    let Outcome::Put(p) = s.mutate(put("/a", json!(2)), None).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        (p.revision, p.create_revision, p.previous_revision),
        (2, 1, Some(1))
    );
    let e = s.get(&key("/a")).unwrap().unwrap();
    assert_eq!((e.value, e.revision, e.create_revision), (json!(2), 2, 1));
    assert_eq!(s.revision(), 2);
    assert!(s.get(&key("/b")).unwrap().is_none());
}

#[tokio::test]
async fn cas_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let create = |rev| {
        Mutation::Put(Put {
            key: key("/c"),
            value: Written::new(json!("x")),
            if_revision: Some(rev),
        })
    };
    s.mutate(create(0), None).await.unwrap();
    let err = s.mutate(create(0), None).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                actual: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = s.mutate(create(7), None).await.unwrap_err();
    assert_eq!(err.code(), "conflict");
    s.mutate(create(1), None).await.unwrap();
    // A failed CAS consumes no revision.
    assert_eq!(s.revision(), 2);
}

#[tokio::test]
async fn delete_missing_and_present() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let del = || {
        Mutation::Delete(Delete {
            key: key("/d"),
            if_revision: None,
        })
    };
    let Outcome::Delete(d) = s.mutate(del(), None).await.unwrap() else {
        panic!()
    };
    assert!(!d.deleted);
    assert_eq!(s.revision(), 0);
    s.mutate(put("/d", json!(null)), None).await.unwrap();
    let Outcome::Delete(d) = s.mutate(del(), None).await.unwrap() else {
        panic!()
    };
    assert!(d.deleted);
    assert_eq!(d.revision, 2);
    assert!(s.get(&key("/d")).unwrap().is_none());
}

#[tokio::test]
async fn txn_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.mutate(put("/t/x", json!(1)), None).await.unwrap();
    let ops = vec![
        Op::Put(Put {
            key: key("/t/a"),
            value: Written::new(json!(1)),
            if_revision: None,
        }),
        Op::Put(Put {
            key: key("/t/b"),
            value: Written::new(json!(2)),
            if_revision: None,
        }),
    ];
    let bad = Mutation::Txn(Txn {
        checks: vec![Check {
            key: key("/t/x"),
            revision: Some(9),
            value: None,
        }],
        ops: ops.clone(),
    });
    let err = s.mutate(bad, None).await.unwrap_err();
    assert_eq!(err.code(), "check_failed");
    assert!(s.get(&key("/t/a")).unwrap().is_none());
    // A conflict in the second op undoes the first.
    let bad_op = Mutation::Txn(Txn {
        checks: vec![],
        ops: vec![
            Op::Put(Put {
                key: key("/t/a"),
                value: Written::new(json!(1)),
                if_revision: None,
            }),
            Op::Put(Put {
                key: key("/t/x"),
                value: Written::new(json!(1)),
                if_revision: Some(0),
            }),
        ],
    });
    assert_eq!(s.mutate(bad_op, None).await.unwrap_err().code(), "conflict");
    assert!(s.get(&key("/t/a")).unwrap().is_none());
    assert_eq!(s.revision(), 1);

    let good = Mutation::Txn(Txn {
        checks: vec![Check {
            key: key("/t/x"),
            revision: Some(1),
            value: Some(json!(1)),
        }],
        ops,
    });
    let Outcome::Txn(t) = s.mutate(good, None).await.unwrap() else {
        panic!()
    };
    assert_eq!(t.revision, 2);
    assert_eq!(s.get(&key("/t/b")).unwrap().unwrap().revision, 2);
    let too_many = Mutation::Txn(Txn {
        checks: vec![],
        ops: (0..17)
            .map(|i| Op::Get {
                key: key(&format!("/k{i}")),
            })
            .collect(),
    });
    assert_eq!(
        s.mutate(too_many, None).await.unwrap_err().code(),
        "too_large"
    );
}

#[tokio::test]
async fn value_limit() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let err = s
        .mutate(put("/big", json!("x".repeat(2000))), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ValueTooLarge { max: 1024, .. }));
}

#[tokio::test]
async fn list_pages_pathwise() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    for k in ["/a", "/a!", "/a/1", "/a/2", "/a/2/x", "/ab", "/b"] {
        s.mutate(put(k, json!(k)), None).await.unwrap();
    }
    let p = Prefix::parse("/a").unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s.list(&p, cursor.as_ref(), 2, &|_| true).unwrap();
        seen.extend(page.items.iter().map(|i| i.key.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(key(&c)),
            None => break,
        }
    }
    assert_eq!(seen, ["/a", "/a/1", "/a/2", "/a/2/x"]);
    let all = s
        .scan(&Prefix::root(), None, 100, 1 << 20, &|_| true)
        .unwrap();
    assert_eq!(all.items.len(), 7);
    assert!(all.next_cursor.is_none());
    assert_eq!(all.items[0].value, json!("/a"));
}

#[tokio::test]
async fn watch_replays_and_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.mutate(put("/w/1", json!(1)), None).await.unwrap();
    s.mutate(put("/other", json!(1)), None).await.unwrap();
    s.mutate(
        Mutation::Delete(Delete {
            key: key("/w/1"),
            if_revision: None,
        }),
        None,
    )
    .await
    .unwrap();
    let p = Prefix::parse("/w").unwrap();
    let never = std::future::pending::<()>();
    let r = s
        .watch(
            &p,
            0,
            Duration::from_millis(0),
            ReplyBounds {
                items: 100,
                bytes: 1 << 20,
            },
            &|_| true,
            never,
        )
        .await
        .unwrap();
    let revs: Vec<_> = r.events.iter().map(|e| e.revision).collect();
    assert_eq!(revs, [1, 3]);
    assert_eq!(r.events[1].kind, EventKind::Delete);
    assert_eq!(r.revision, 3);

    // Nothing new: a zero timeout returns empty and says so.
    let r = s
        .watch(
            &p,
            3,
            Duration::ZERO,
            ReplyBounds {
                items: 100,
                bytes: 1 << 20,
            },
            &|_| true,
            std::future::pending(),
        )
        .await
        .unwrap();
    assert!(r.events.is_empty() && r.timed_out);

    // A commit wakes a waiting watcher (the timeout is far away).
    let s2 = s.clone();
    let waiter = tokio::spawn(async move {
        let p = Prefix::parse("/w").unwrap();
        s2.watch(
            &p,
            3,
            Duration::from_secs(3600),
            ReplyBounds {
                items: 100,
                bytes: 1 << 20,
            },
            &|_| true,
            std::future::pending(),
        )
        .await
    });
    s.mutate(put("/elsewhere", json!(0)), None).await.unwrap();
    s.mutate(put("/w/2", json!(2)), None).await.unwrap();
    let r = waiter.await.unwrap().unwrap();
    assert_eq!(r.events.len(), 1);
    assert_eq!(r.events[0].key, "/w/2");
    assert_eq!(r.revision, 5);
}

#[tokio::test]
async fn watch_compaction_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(StoreOptions {
        path: dir.path().join("s"),
        map_size: 64 << 20,
        max_value_bytes: 1024,
        max_txn_ops: 16,
        history: 3,
        audit: None,
        quota: QuotaOptions::default(),
    })
    .unwrap();
    for i in 0..10 {
        s.mutate(put("/k", json!(i)), None).await.unwrap();
    }
    let err = s
        .watch(
            &Prefix::root(),
            2,
            Duration::ZERO,
            ReplyBounds {
                items: 10,
                bytes: 1 << 20,
            },
            &|_| true,
            std::future::pending(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Compacted {
                compacted: 7,
                current: 10,
                ..
            }
        ),
        "{err}"
    );
    let r = s
        .watch(
            &Prefix::root(),
            7,
            Duration::ZERO,
            ReplyBounds {
                items: 10,
                bytes: 1 << 20,
            },
            &|_| true,
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(r.events.len(), 3);
}

#[tokio::test]
async fn second_open_is_refused_and_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.mutate(put("/keep", json!({"x": [1, 2]})), None)
        .await
        .unwrap();
    let err = Store::open(s.options().clone()).err().unwrap();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    s.close();
    drop(s);
    let s = open(dir.path());
    assert_eq!(
        s.get(&key("/keep")).unwrap().unwrap().value,
        json!({"x": [1, 2]})
    );
    assert_eq!(s.revision(), 1);
    let mode = fs::metadata(dir.path().join("store"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[tokio::test]
async fn a_failed_commit_still_records_every_mutation_it_carried() {
    let dir = tempfile::tempdir().unwrap();
    // A map that fills after a few dozen puts: the batch that hits it fails.
    let s = Store::open(StoreOptions {
        path: dir.path().join("s"),
        map_size: 256 << 10,
        max_value_bytes: 8192,
        max_txn_ops: 16,
        history: 1000,
        audit: Some(AuditOptions {
            max_records: None,
            max_age: None,
            journal_reserve: 0,
            max_bytes: None,
        }),
        quota: QuotaOptions::default(),
    })
    .unwrap();
    let big = "x".repeat(8000);
    let mut failed = None;
    for i in 0..1000 {
        let k = format!("/fill/{i}");
        let mut rec = Record::new("call");
        rec.keys = vec![k.clone()];
        match s.mutate(put(&k, json!(big)), Some(rec)).await {
            Ok(_) => {}
            Err(StoreError::BatchFailed { .. }) => {
                failed = Some(k);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let failed = failed.expect("the map filled up");
    // The writer seals a mutation's record before the commit; when the commit
    // fails, the record goes to the journal saying so instead of being lost.
    let mut found = false;
    for entry in fs::read_dir(dir.path().join("s/audit-journal")).unwrap() {
        let text = fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&text);
        // Sealed pages are punched out (read back as zeros).
        for line in text.lines().filter(|l| !l.contains('\0')) {
            let r: Record = serde_json::from_str(line).unwrap();
            if r.keys == [failed.clone()] {
                let outcome = r.outcome.unwrap();
                assert_eq!(outcome.code.as_deref(), Some("store_error"));
                assert!(outcome.message.unwrap().contains("commit failed"), "{line}");
                found = true;
            }
        }
    }
    assert!(found, "no record of the mutation whose commit failed");
}

fn quota_store(dir: &Path, quota: QuotaOptions, audit: Option<AuditOptions>) -> Store {
    Store::open(StoreOptions {
        path: dir.join("q"),
        map_size: 64 << 20,
        max_value_bytes: 64 << 10,
        max_txn_ops: 16,
        history: 100_000,
        audit,
        quota,
    })
    .unwrap()
}

fn owner(role: &str, max_bytes: Option<u64>, max_keys: Option<u64>) -> Owner {
    let bound = |m: Option<u64>, f: &str| {
        m.map(|max| RoleBound {
            max,
            rule: format!("p.toml:1: roles.{role}.limits.{f} = {max}"),
        })
    };
    Owner {
        role: Arc::from(role),
        limits: Arc::new(RoleLimits {
            max_bytes: bound(max_bytes, "max_store_bytes"),
            max_keys: bound(max_keys, "max_keys"),
        }),
    }
}

#[tokio::test]
async fn the_data_quota_refuses_writes_but_not_deletes_and_clears_when_usage_falls() {
    let dir = tempfile::tempdir().unwrap();
    let s = quota_store(
        dir.path(),
        QuotaOptions {
            max_store_bytes: Some(2 << 20),
            history_bytes: Some(512 << 10),
            batch_bytes: 1 << 20,
        },
        None,
    );
    let value = json!("v".repeat(16 << 10));
    let mut stored = 0;
    let err = loop {
        match s
            .mutate(put(&format!("/fill/{stored}"), value.clone()), None)
            .await
        {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 1000, "the quota never refused");
    };
    assert_eq!(err.code(), "quota_exceeded", "{err}");
    assert!(err.to_string().contains("gateway.max_store_bytes"), "{err}");
    let u = s.usage();
    assert!(u.data_bytes <= 2 << 20, "{u:?}");
    assert_eq!(u.alarms[0].quota, "gateway.max_store_bytes");
    assert_eq!(u.alarms[0].level, "exceeded");
    // Reads and deletes (plain and compare-and-swap) go on.
    assert!(s.get(&key("/fill/0")).unwrap().is_some());
    let rev = s.get(&key("/fill/1")).unwrap().unwrap().revision;
    s.mutate(
        Mutation::Delete(Delete {
            key: key("/fill/1"),
            if_revision: Some(rev),
        }),
        None,
    )
    .await
    .unwrap();
    for i in (0..stored).filter(|i| *i != 1) {
        let d = Mutation::Delete(Delete {
            key: key(&format!("/fill/{i}")),
            if_revision: None,
        });
        s.mutate(d, None).await.unwrap();
    }
    // The next write succeeds, without a reopen.
    s.mutate(put("/after", json!(1)), None).await.unwrap();
    let u = s.usage();
    assert!(u.alarms.is_empty(), "{u:?}");
}

#[tokio::test]
async fn a_role_owns_what_it_last_wrote_within_its_limits_and_counters_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = quota_store(dir.path(), QuotaOptions::default(), None);
    let a = owner("a", None, Some(3));
    let b = owner("b", Some(100), None);
    for i in 0..3 {
        s.mutate_as(put(&format!("/a/{i}"), json!(i)), Some(a.clone()), None)
            .await
            .unwrap();
    }
    // Over max_keys: refused; an overwrite of its own key is not a new key.
    let e = s
        .mutate_as(put("/a/3", json!(3)), Some(a.clone()), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "quota_exceeded");
    assert!(
        e.to_string().contains("roles.a.limits.max_keys (p.toml:1:"),
        "{e}"
    );
    s.mutate_as(put("/a/0", json!("again")), Some(a.clone()), None)
        .await
        .unwrap();
    // Another role is unaffected; its overwrite of a's key makes it b's.
    s.mutate_as(put("/a/2", json!("b's now")), Some(b.clone()), None)
        .await
        .unwrap();
    let roles = s.usage().roles;
    assert_eq!(roles["a"].keys, 2);
    assert_eq!(roles["b"].keys, 1);
    assert_eq!(
        roles["b"].bytes,
        ("/a/2".len() + "\"b's now\"".len()) as u64
    );
    // b's byte bound: a write that takes it past 100 bytes is refused.
    let e = s
        .mutate_as(put("/b/big", json!("x".repeat(100))), Some(b.clone()), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("role b's bytes"), "{e}");
    // So a can write one more key; a delete by anyone credits the owner.
    s.mutate_as(put("/a/3", json!(3)), Some(a.clone()), None)
        .await
        .unwrap();
    s.mutate(
        Mutation::Delete(Delete {
            key: key("/a/2"),
            if_revision: None,
        }),
        None,
    )
    .await
    .unwrap();
    assert_eq!(s.get(&key("/a/3")).unwrap().unwrap().value, json!(3));
    s.close();
    drop(s);
    let s = quota_store(dir.path(), QuotaOptions::default(), None);
    let roles = s.usage().roles;
    assert_eq!(roles["a"].keys, 3);
    assert!(!roles.contains_key("b"), "b owns nothing: {roles:?}");
    // Listing and reading strip the owner tag.
    let page = s
        .scan(&Prefix::root(), None, 10, 1 << 20, &|_| true)
        .unwrap();
    assert_eq!(page.items[0].value, json!("again"));
}

#[tokio::test]
async fn the_audit_is_pruned_by_size_behind_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s = quota_store(
        dir.path(),
        QuotaOptions::default(),
        Some(AuditOptions {
            max_records: None,
            max_age: None,
            max_bytes: Some(1 << 20),
            journal_reserve: 0,
        }),
    );
    for i in 0..3000 {
        let mut r = Record::new("call");
        r.detail = Some(json!({"i": i, "pad": "p".repeat(1000)}));
        r.ok();
        s.audit(r).unwrap();
        if i % 500 == 0 {
            s.flush_audit().await.unwrap();
        }
    }
    s.flush_audit().await.unwrap();
    let u = s.usage();
    assert!(u.audit_bytes <= 1 << 20, "{u:?}");
    assert!(u.audit_pruned > 0, "{u:?}");
    s.close();
    drop(s);
    // The chain that remains starts at a checkpoint and verifies.
    let reader = AuditReader::open(&dir.path().join("q"), 64 << 20).unwrap();
    let mut v = crate::audit::Verifier::default();
    let mut bad = None;
    reader
        .scan(0, |seq, raw| {
            if let Err(e) = v.push(seq, raw) {
                bad = Some(e);
            }
            bad.is_none()
        })
        .unwrap();
    assert_eq!(bad, None);
    let verified = v.finish().unwrap();
    assert!(verified < 3000, "{verified}");
}

#[tokio::test]
async fn the_watch_history_is_compacted_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let s = quota_store(
        dir.path(),
        QuotaOptions {
            max_store_bytes: None,
            history_bytes: Some(256 << 10),
            batch_bytes: 0,
        },
        None,
    );
    for i in 0..200 {
        s.mutate(put("/one", json!({"i": i, "pad": "p".repeat(8000)})), None)
            .await
            .unwrap();
    }
    let u = s.usage();
    assert!(u.history_bytes <= 256 << 10, "{u:?}");
    let err = s
        .watch(
            &Prefix::root(),
            0,
            Duration::ZERO,
            ReplyBounds {
                items: 10,
                bytes: 1 << 20,
            },
            &|_| true,
            std::future::pending(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "compacted");
}
