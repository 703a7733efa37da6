//! Tool metadata as a real client reads it: titles, annotations, typed input
//! schemas, and an outputSchema that every result's structuredContent
//! validates against (checked with a real JSON Schema validator), errors
//! included; plus the instructions that name the role's scopes.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{Client, Gateway, CODER};
use serde_json::{json, Value};

const POLICY: &str = "[roles.coder]\ntools = [\"kv_*\"]\nread = [\"/**\"]\nwrite = [\"/**\"]\ndelete = [\"/**\"]\ndeny_write = [\"/locked/**\"]\n";

fn schemas(c: &mut Client) -> BTreeMap<String, Value> {
    let r = c.request("tools/list", json!({}));
    r["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_string(), t.clone()))
        .collect()
}

#[test]
fn every_tool_has_metadata_and_its_results_validate_against_its_output_schema() {
    let g = Gateway::start_with_policy("", CODER, POLICY);
    let mut c = g.client();
    let tools = schemas(&mut c);
    let names: Vec<&str> = tools.keys().map(String::as_str).collect();
    assert_eq!(names.len(), 7);
    for (name, t) in &tools {
        assert!(
            t["title"].as_str().is_some_and(|s| !s.is_empty()),
            "{name}: {t}"
        );
        let a = &t["annotations"];
        let read_only = ["kv_get", "kv_list", "kv_scan", "kv_watch"].contains(&name.as_str());
        assert_eq!(a["readOnlyHint"], read_only, "{name}: {a}");
        assert_eq!(a["destructiveHint"], !read_only, "{name}: {a}");
        assert_eq!(a["openWorldHint"], false, "{name}: {a}");
        assert!(a["idempotentHint"].is_boolean(), "{name}: {a}");
        assert_eq!(t["outputSchema"]["type"], "object", "{name}");
    }
    // `value` is typed: any JSON value, spelled out.
    let value_type = &tools["kv_put"]["inputSchema"]["properties"]["value"]["type"];
    assert_eq!(value_type.as_array().unwrap().len(), 6, "{value_type}");

    let calls: Vec<(&str, Value, bool)> = vec![
        ("kv_put", json!({"key": "/a/1", "value": {"n": 1}}), false),
        (
            "kv_put",
            json!({"key": "/a/1", "value": [1, null], "if_revision": 1}),
            false,
        ),
        (
            "kv_put",
            json!({"key": "/a/1", "value": 1, "if_revision": 99}),
            true,
        ),
        ("kv_put", json!({"key": "/locked/x", "value": 1}), true),
        ("kv_get", json!({"key": "/a/1"}), false),
        ("kv_get", json!({"key": "/a/none"}), true),
        ("kv_get", json!({"key": "bad"}), true),
        ("kv_list", json!({"prefix": "/a"}), false),
        ("kv_list", json!({"prefix": "/a", "limit": 1}), false),
        ("kv_scan", json!({"prefix": "/"}), false),
        (
            "kv_txn",
            json!({"checks": [{"key": "/a/1", "revision": 2}],
            "ops": [{"op": "put", "key": "/a/2", "value": "v"}, {"op": "get", "key": "/a/1"},
                    {"op": "get", "key": "/a/none"}, {"op": "delete", "key": "/a/2"}]}),
            false,
        ),
        (
            "kv_txn",
            json!({"checks": [{"key": "/a/1", "revision": 7}], "ops": [{"op": "get", "key": "/a/1"}]}),
            true,
        ),
        (
            "kv_watch",
            json!({"prefix": "/a", "since_revision": 0, "timeout_ms": 0}),
            false,
        ),
        (
            "kv_watch",
            json!({"prefix": "/q", "since_revision": 1000000, "timeout_ms": 0}),
            false,
        ),
        ("kv_delete", json!({"key": "/a/1"}), false),
        ("kv_delete", json!({"key": "/a/1"}), false),
        (
            "kv_delete",
            json!({"key": "/a/nothing", "if_revision": 3}),
            true,
        ),
    ];
    for (tool, args, is_error) in calls {
        let schema = &tools[tool]["outputSchema"];
        let validator = jsonschema::validator_for(schema).unwrap_or_else(|e| panic!("{tool}: {e}"));
        let r = c.call(tool, args.clone());
        assert_eq!(r["isError"], is_error, "{tool} {args}: {r}");
        let doc = &r["structuredContent"];
        let errors: Vec<String> = validator.iter_errors(doc).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{tool} {args}: {doc} does not validate: {errors:?}"
        );
    }
    // Negative controls: the validator does reject what the tool never returns.
    let get = jsonschema::validator_for(&tools["kv_get"]["outputSchema"]).unwrap();
    assert!(
        !get.is_valid(&json!({"key": "/a", "value": 1})),
        "missing revisions"
    );
    assert!(!get.is_valid(
        &json!({"key": "/a", "value": 1, "revision": 1, "create_revision": 1, "extra": 1})
    ));
    assert!(!get.is_valid(&json!({"error": {"message": "no code"}})));
}

#[test]
fn initialize_and_discover_tell_the_agent_its_role_and_scopes() {
    let agents = "[agents.coder]\nrole = \"coder\"\n[agents.viewer]\nrole = \"viewer\"\n";
    let policy = format!(
        "{POLICY}[roles.viewer]\ntools = [\"kv_get\", \"kv_list\"]\nread = [\"/pub/**\"]\n"
    );
    let g = Gateway::start_with_policy("", agents, &policy);
    let mut v = Client::connect_raw(&g.socket("viewer")).unwrap();
    let r = v.request(
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}),
    );
    let text = r["result"]["instructions"].as_str().unwrap().to_string();
    assert!(text.contains("role \"viewer\""), "{text}");
    assert!(text.contains("\"/pub/**\""), "{text}");
    assert!(text.contains("You may write no keys."), "{text}");
    let d = v.request("server/discover", discover_params());
    assert_eq!(d["result"]["instructions"], text.as_str());
    // Control: the coder's text names its own scopes and denial.
    let mut c = Client::connect_raw(&g.socket("coder")).unwrap();
    let r = c.request("server/discover", discover_params());
    let text = r["result"]["instructions"].as_str().unwrap();
    assert!(
        text.contains("role \"coder\"") && text.contains("/locked/**"),
        "{text}"
    );
}

/// A `server/discover`'s params: the `_meta` every 2026-07-28 request carries.
fn discover_params() -> serde_json::Value {
    json!({"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }})
}
