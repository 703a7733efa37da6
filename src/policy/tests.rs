use super::*;
use serde_json::json;

fn policy(text: &str) -> Policy {
    match Policy::parse(Path::new("test.toml"), text.to_string()) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn errors(text: &str) -> String {
    match Policy::parse(Path::new("test.toml"), text.to_string()) {
        Ok(_) => panic!("policy should not load:\n{text}"),
        Err(e) => e.to_string(),
    }
}

const BASIC: &str = r#"
[roles.base]
tools = ["kv_get", "kv_list"]
read = ["/shared/**"]
deny_read = ["/shared/secret/**"]

[roles.coder]
inherits = ["base"]
tools = ["kv_*"]
deny_tools = ["kv_delete"]
read = ["/projects/*/**"]
write = ["/projects/*/code/**"]
limits = { max_value_bytes = 100, max_txn_ops = 4 }

[roles.child]
inherits = ["coder"]
read = ["/shared/secret/ok"]
limits = { max_value_bytes = 1000, max_scan_items = 10 }
"#;

fn allow(p: &Policy, role: &str, tool: &str, args: Value) -> bool {
    match p.evaluate(role, tool, &args) {
        Verdict::Allow { .. } => true,
        Verdict::Deny { .. } => false,
        Verdict::Invalid { message } => panic!("invalid: {message}"),
    }
}

#[test]
fn tools_allow_deny_and_default() {
    let p = policy(BASIC);
    let coder = p.role("coder").unwrap();
    assert!(coder.tool_allowed(Tool::Put));
    assert!(
        !coder.tool_allowed(Tool::Delete),
        "deny_tools beats the kv_* allow"
    );
    let d = coder.tool(Tool::Delete);
    assert_eq!(d.rule.text, "roles.coder.deny_tools = \"kv_delete\"");
    assert_eq!(d.rule.line, 10);
    let base = p.role("base").unwrap();
    let d = base.tool(Tool::Put);
    assert!(!d.allowed);
    assert_eq!(d.rule.line, 0, "default deny is a rule too: {}", d.rule);
    assert!(d.rule.to_string().contains("deny by default"));
}

#[test]
fn keys_deny_beats_allow_across_inheritance() {
    let p = policy(BASIC);
    assert!(
        allow(&p, "coder", "kv_get", json!({"key": "/shared/x"})),
        "inherited read"
    );
    assert!(
        !allow(&p, "coder", "kv_get", json!({"key": "/shared/secret/k"})),
        "inherited deny"
    );
    // The child allows one secret key explicitly; the inherited deny still wins.
    assert!(!allow(
        &p,
        "child",
        "kv_get",
        json!({"key": "/shared/secret/ok"})
    ));
    match p.evaluate("child", "kv_get", &json!({"key": "/shared/secret/ok"})) {
        Verdict::Deny { rule, .. } => {
            assert_eq!(rule.text, "roles.base.deny_read = \"/shared/secret/**\"")
        }
        v => panic!("{v:?}"),
    }
    assert!(allow(
        &p,
        "coder",
        "kv_put",
        json!({"key": "/projects/p1/code/a.rs", "value": 1})
    ));
    assert!(!allow(
        &p,
        "coder",
        "kv_put",
        json!({"key": "/projects/p1/plan", "value": 1})
    ));
    assert!(
        !allow(
            &p,
            "coder",
            "kv_put",
            json!({"key": "/projects/p1/code", "value": 1})
        ),
        "/x/** does not cover /x"
    );
}

#[test]
fn txn_needs_every_access() {
    let p = policy(BASIC);
    let ok = json!({"checks": [{"key": "/projects/p/plan", "revision": 1}],
                    "ops": [{"op": "put", "key": "/projects/p/code/a", "value": 1}]});
    assert!(allow(&p, "coder", "kv_txn", ok));
    let bad_check = json!({"checks": [{"key": "/other", "revision": 1}],
                           "ops": [{"op": "put", "key": "/projects/p/code/a", "value": 1}]});
    assert!(!allow(&p, "coder", "kv_txn", bad_check));
    let bad_op = json!({"ops": [{"op": "put", "key": "/projects/p/code/a", "value": 1},
                                {"op": "delete", "key": "/projects/p/code/b"}]});
    assert!(!allow(&p, "coder", "kv_txn", bad_op), "no delete scope");
}

#[test]
fn limits_take_the_smallest_along_inheritance() {
    let p = policy(BASIC);
    let child = p.role("child").unwrap();
    assert_eq!(child.limits.max_value_bytes.as_ref().unwrap().max, 100);
    assert_eq!(child.limits.max_scan_items.as_ref().unwrap().max, 10);
    match p.evaluate(
        "coder",
        "kv_put",
        &json!({"key": "/projects/p/code/a", "value": "x".repeat(200)}),
    ) {
        Verdict::Deny { rule, message } => {
            assert!(message.contains("value size"), "{message}");
            assert_eq!(rule.text, "roles.coder.limits.max_value_bytes = 100");
        }
        v => panic!("{v:?}"),
    }
    let five_ops: Vec<Value> = (0..5)
        .map(|i| json!({"op": "get", "key": format!("/projects/p/code/{i}")}))
        .collect();
    assert!(!allow(&p, "coder", "kv_txn", json!({"ops": five_ops})));
    assert!(!allow(
        &p,
        "child",
        "kv_list",
        json!({"prefix": "/", "limit": 11})
    ));
    assert!(allow(
        &p,
        "child",
        "kv_list",
        json!({"prefix": "/", "limit": 10})
    ));
}

#[test]
fn listing_filter_matches_read_scope() {
    let p = policy(BASIC);
    let coder = p.role("coder").unwrap();
    assert!(coder.can_read("/shared/a"));
    assert!(!coder.can_read("/shared/secret/a"));
    assert!(!coder.can_read("/elsewhere"));
}

#[test]
fn invalid_arguments_are_reported_not_decided() {
    let p = policy(BASIC);
    assert!(matches!(
        p.evaluate("coder", "kv_get", &json!({"key": "/a/../b"})),
        Verdict::Invalid { .. }
    ));
    assert!(matches!(
        p.evaluate("coder", "kv_get", &json!({"nope": 1})),
        Verdict::Invalid { .. }
    ));
    // A denied tool is denied before its arguments are looked at.
    assert!(matches!(
        p.evaluate("base", "kv_put", &json!({"garbage": true})),
        Verdict::Deny { .. }
    ));
}

#[test]
fn load_errors_carry_position_and_snippet() {
    let e = errors("[roles.a]\ntools = [\"kv_get\"]\nreed = [\"/x\"]\n");
    assert!(
        e.contains("test.toml:3:1") && e.contains("unknown field `reed`"),
        "{e}"
    );
    assert!(e.contains("3 | reed"), "{e}");
    let e = errors("[roles.a]\ntools = \"kv_get\"\n");
    assert!(e.contains("test.toml:2:9"), "wrong type: {e}");
    let e = errors("[roles.a]\ntools = [\"kv_get\"]\nread = [\"/a/[b\"]\n");
    assert!(e.contains("bad pattern") && e.contains(":3:9"), "{e}");
    let e = errors("[roles.a]\ntools = [\"kv_get\"]\nread = [\"a/b\"]\n");
    assert!(e.contains("can never match"), "{e}");
    let e = errors("[roles.a]\ntools = [\"kv_get\"]\ninherits = [\"nobody\"]\n");
    assert!(
        e.contains("unknown role \"nobody\"") && e.contains(":3:13"),
        "{e}"
    );
    let e = errors(
        "[roles.a]\ntools = [\"kv_get\"]\ninherits = [\"b\"]\n[roles.b]\ninherits = [\"a\"]\n",
    );
    assert!(e.contains("inheritance cycle"), "{e}");
    let e = errors("[roles.a]\nread = [\"/**\"]\n");
    assert!(e.contains("grants nothing") && e.contains(":1:8"), "{e}");
    let e = errors("[roles.a]\ntools = [\"kv_nothing*\"]\n");
    assert!(e.contains("matches no gateway tool"), "{e}");
    let e = errors("[roles.a]\ntools = [\"kv_get\"]\nlimits = { calls_per_minute = 0 }\n");
    assert!(e.contains("calls_per_minute = 0"), "{e}");
}

#[test]
fn warnings_for_suspicious_but_legal() {
    let p = policy("[roles.w]\ntools = [\"kv_put\"]\nwrite = [\"/w/**\"]\n");
    assert_eq!(p.warnings.len(), 1);
    assert!(
        p.warnings[0].to_string().contains("may not read"),
        "{}",
        p.warnings[0]
    );
}

#[test]
fn embedded_tests_run_at_load() {
    let ok = format!(
        "{BASIC}\n[[tests]]\nrole = \"coder\"\ntool = \"kv_get\"\nargs = {{ key = \"/shared/x\" }}\nexpect = \"allow\"\n"
    );
    assert_eq!(policy(&ok).tests_passed, 1);
    let failing = format!(
        "{BASIC}\n[[tests]]\nrole = \"coder\"\ntool = \"kv_get\"\nargs = {{ key = \"/shared/secret/x\" }}\nexpect = \"allow\"\n"
    );
    let e = errors(&failing);
    assert!(e.contains("test failed: expected allow"), "{e}");
    assert!(e.contains("deny_read"), "names the rule: {e}");
    let bad_role =
        format!("{BASIC}\n[[tests]]\nrole = \"ghost\"\ntool = \"kv_get\"\nexpect = \"deny\"\n");
    assert!(errors(&bad_role).contains("unknown role \"ghost\""));
}

#[test]
fn agents_must_have_roles() {
    let p = policy(BASIC);
    assert!(p.check_agents([("a1", "coder")]).is_ok());
    let e = p
        .check_agents([("a2", "reviewer")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no role \"reviewer\"") && e.contains("a2"),
        "{e}"
    );
}

#[test]
fn shipped_policies_and_configs_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(root.join("policies")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let p = Policy::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(p.tests_passed > 0, "{} carries no tests", path.display());
            n += 1;
        }
    }
    assert!(n >= 2);
    for entry in std::fs::read_dir(root.join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let c = crate::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let p = Policy::load(&c.gateway.policy).unwrap_or_else(|e| panic!("{e}"));
            p.check_agents(c.agents.iter().map(|(n, a)| (n.as_str(), a.role.as_str())))
                .unwrap();
        }
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Segments drawn from a tiny alphabet so that globs and keys collide often.
    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("ab".to_string()),
            Just("c".to_string())
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 1..5).prop_map(|s| format!("/{}", s.join("/")))
    }

    fn glob_segment() -> impl Strategy<Value = String> {
        prop_oneof![
            segment(),
            Just("*".to_string()),
            Just("**".to_string()),
            Just("a*".to_string())
        ]
    }

    fn glob() -> impl Strategy<Value = String> {
        prop::collection::vec(glob_segment(), 1..4).prop_map(|s| format!("/{}", s.join("/")))
    }

    /// The documented semantics: `*` within one segment, `**` any number of
    /// whole segments, except that a trailing `/**` needs at least one (it
    /// covers what is below a key, not the key).
    fn reference(glob: &[&str], key: &[&str]) -> bool {
        match (glob.first(), key.first()) {
            (None, None) => true,
            (Some(&"**"), _) if glob.len() == 1 => !key.is_empty(),
            (Some(&"**"), _) => {
                reference(&glob[1..], key) || (!key.is_empty() && reference(glob, &key[1..]))
            }
            (Some(g), Some(k)) => seg_match(g, k) && reference(&glob[1..], &key[1..]),
            _ => false,
        }
    }

    fn seg_match(g: &str, k: &str) -> bool {
        match g.strip_suffix('*') {
            Some(prefix) => k.starts_with(prefix),
            None => g == k,
        }
    }

    fn role_toml(name: &str, reads: &[String], denies: &[String]) -> String {
        let q = |v: &[String]| {
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "[roles.{name}]\ntools = [\"kv_get\"]\nread = [{}]\ndeny_read = [{}]\n",
            q(reads),
            q(denies)
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn glob_semantics_match_the_reference(g in glob(), k in key()) {
            let set = glob::compile([g.as_str()]).unwrap();
            let gs: Vec<&str> = g[1..].split('/').collect();
            let ks: Vec<&str> = k[1..].split('/').collect();
            prop_assert_eq!(set.is_match(&k), reference(&gs, &ks), "glob {} key {}", g, k);
        }

        #[test]
        fn a_key_granted_by_no_rule_is_denied(reads in prop::collection::vec(glob(), 0..4), k in key()) {
            let p = policy(&role_toml("r", &reads, &[]));
            let ks: Vec<&str> = k[1..].split('/').collect();
            let granted = reads.iter().any(|g| reference(&g[1..].split('/').collect::<Vec<_>>(), &ks));
            let allowed = allow(&p, "r", "kv_get", json!({"key": k}));
            prop_assert_eq!(allowed, granted);
            // And a tool granted by no rule is denied, whatever the key.
            let put = allow(&p, "r", "kv_put", json!({"key": k, "value": 1}));
            prop_assert!(!put);
        }

        #[test]
        fn adding_a_deny_never_widens(
            reads in prop::collection::vec(glob(), 1..4),
            denies in prop::collection::vec(glob(), 0..3),
            extra in glob(),
            k in key(),
        ) {
            let before = policy(&role_toml("r", &reads, &denies));
            let mut more = denies.clone();
            more.push(extra);
            let after = policy(&role_toml("r", &reads, &more));
            let a = allow(&after, "r", "kv_get", json!({"key": k}));
            let b = allow(&before, "r", "kv_get", json!({"key": k}));
            prop_assert!(!a || b, "deny widened access to {}", k);
            prop_assert!(!after.role("r").unwrap().can_read(&k) || before.role("r").unwrap().can_read(&k));
        }

        #[test]
        fn traversal_forms_never_reach_matching(k in key(), pos in 0usize..4, form in prop_oneof![Just("/.."), Just("/."), Just("//")]) {
            let cut = k.match_indices('/').nth(pos).map_or(k.len(), |(i, _)| i);
            let bad = format!("{}{}{}", &k[..cut], form, &k[cut..]);
            let p = policy(&role_toml("r", &["/**".to_string()], &[]));
            let v = p.evaluate("r", "kv_get", &json!({"key": bad}));
            prop_assert!(matches!(v, Verdict::Invalid { .. }), "{} was decided: {:?}", bad, v);
        }
    }
}

#[test]
fn store_quota_limits_take_the_smallest_along_inheritance_and_name_their_rule() {
    let p = policy(
        r#"
[roles.base]
tools = ["kv_put"]
write = ["/**"]
limits = { max_store_bytes = 1000, max_keys = 50 }

[roles.child]
inherits = ["base"]
limits = { max_keys = 10, max_store_bytes = 5000 }
"#,
    );
    let l = &p.role("child").unwrap().store_limits;
    let bytes = l.max_bytes.as_ref().unwrap();
    assert_eq!(bytes.max, 1000);
    assert_eq!(
        bytes.rule,
        "test.toml:5: roles.base.limits.max_store_bytes = 1000"
    );
    let keys = l.max_keys.as_ref().unwrap();
    assert_eq!(keys.max, 10);
    assert_eq!(keys.rule, "test.toml:9: roles.child.limits.max_keys = 10");
    // Control: a role without them has none.
    let p = policy("[roles.a]\ntools = [\"kv_get\"]\n");
    assert!(p.role("a").unwrap().store_limits.is_empty());
    // Zero would refuse every write: an error at its place.
    let e = errors("[roles.a]\ntools = [\"kv_put\"]\nlimits = { max_keys = 0 }\n");
    assert!(
        e.contains("test.toml:3:") && e.contains("limits.max_keys = 0"),
        "{e}"
    );
}
