//! The real Claude Code (npm `@anthropic-ai/claude-code`, installed by
//! scripts/test into tests/node) under `cordon up`, in the shipped claude-code
//! profile, against a stub of the Anthropic Messages API
//! (tests/anthropic_api_mock.py) that makes the model call
//! `mcp__cordon__kv_put` twice: on a key in the coder's write scope, then on
//! one outside it. The first is in the store; the gateway refuses the second;
//! both are in the audit.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{is_root, BIN};
use serde_json::{json, Value};

#[test]
fn claude_code_under_cordon_up_writes_in_scope_and_is_refused_outside() {
    // Claude Code 2.1.332's default: it probes server/discover and, answered,
    // speaks 2026-07-28 over stdio too.
    let Some(gateway_log) = run(None) else {
        return;
    };
    assert!(
        gateway_log.contains("session: protocol 2026-07-28"),
        "{gateway_log}"
    );
}

/// Forced to the handshake era: the same run over `initialize` (2025-11-25).
#[test]
fn claude_code_with_protocol_negotiation_legacy() {
    let Some(gateway_log) = run(Some("legacy")) else {
        return;
    };
    assert!(
        gateway_log.contains("session: protocol 2025-11-25 (initialize)"),
        "{gateway_log}"
    );
    assert!(
        !gateway_log.contains("session: protocol 2026-07-28"),
        "{gateway_log}"
    );
}

/// The same run with Claude Code's MCP protocol negotiation in `auto` mode,
/// where it probes `server/discover` first and speaks 2026-07-28 to a server
/// that answers it.
#[test]
fn claude_code_with_protocol_negotiation_auto() {
    let Some(gateway_log) = run(Some("auto")) else {
        return;
    };
    assert!(
        gateway_log.contains("session: protocol 2026-07-28"),
        "Claude Code in auto mode did not speak 2026-07-28: {gateway_log}"
    );
}

/// Runs the scenario, checks what both tests check, and returns the
/// gateway's log; None when Claude Code is not installed (and may be skipped).
fn run(negotiation: Option<&str>) -> Option<String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let node_bin = common::claude_node_bin("claude_code_under_cordon_up")?;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, PermissionsExt::from_mode(0o755)).unwrap();

    let allowed = json!({"key": "/projects/p1/code/hello.py", "value": "print('hello')"});
    let forbidden =
        json!({"key": "/projects/p1/plan/overview", "value": "the coder rewrites the plan"});
    let log = dir.join("api.jsonl");
    let (mock, port) = common::start_api_mock(
        "mcp__cordon__kv_put",
        &json!([allowed, forbidden]).to_string(),
        &log,
    );

    // The shipped profile, with the stub's port in place of 443.
    let mut profile = std::fs::read_to_string(repo.join("configs/profiles/claude-code.toml"))
        .unwrap()
        .replace("connect_tcp = [443]", &format!("connect_tcp = [{port}]"));
    if !is_root() {
        // Its cgroup limits need root; every Landlock right is still enforced.
        profile = profile.replace("require = \"strict\"", "require = \"best-effort\"");
    }
    std::fs::write(dir.join("claude-code.toml"), profile).unwrap();
    std::fs::copy(repo.join("policies/apex.toml"), dir.join("policy.toml")).unwrap();
    let config = dir.join("cordon.toml");
    // The sandbox passes only the profile's variables: the agent's own `env`
    // is how a deployment sets Claude Code's negotiation.
    let env = negotiation.map_or(String::new(), |m| {
        format!("env = {{ MCP_PROTOCOL_NEGOTIATION = \"{m}\" }}\n")
    });
    std::fs::write(
        &config,
        String::from(
            "[gateway]\nstore = \"state/store\"\nruntime_dir = \"state/run\"\npolicy = \"policy.toml\"\nmap_size = \"64MiB\"\n\n\
             [agents.coder]\nrole = \"coder\"\n\
             command = [\"claude\", \"-p\", \"{prompt}\", \"--output-format\", \"stream-json\", \"--verbose\"]\n\
             prompt = \"Store hello.py, then update the plan.\"\n\
             sandbox = \"claude-code.toml\"\nrestart = \"never\"\n",
        ) + &env,
    )
    .unwrap();

    let path = format!(
        "{}:{}",
        node_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("timeout")
        .args(["180", BIN, "up"])
        .arg(&config)
        .env("PATH", path)
        .env("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{port}"))
        .env("ANTHROPIC_API_KEY", "sk-mock-not-a-key")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("ENABLE_TOOL_SEARCH", "false")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap_or_default();
    let logs = format!(
        "{}\n{}\n--- agent stderr\n{}\n--- gateway\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        read("state/run/up/coder/stderr.log"),
        read("state/run/up/gateway.log"),
    );
    assert!(out.status.success(), "cordon up failed: {logs}");

    // Claude Code's own events, parsed from stream-json.
    let events: Vec<Value> = read("state/run/up/coder/events.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let init = events.iter().find(|e| e["kind"] == "init").expect(&logs);
    assert_eq!(init["mcp_servers"][0]["status"], "connected", "{init}");
    let uses: Vec<&Value> = events.iter().filter(|e| e["kind"] == "tool_use").collect();
    assert_eq!(uses.len(), 2, "{events:?}");
    assert_eq!(uses[0]["tool"], "mcp__cordon__kv_put");
    let results: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "tool_result")
        .collect();
    assert_eq!(results.len(), 2, "{events:?}");
    assert_eq!(results[0]["is_error"], false, "{:?}", results[0]);
    assert_eq!(results[1]["is_error"], true, "{:?}", results[1]);
    assert_eq!(results[1]["denied"], true, "{:?}", results[1]);
    let result = events.iter().find(|e| e["kind"] == "result").unwrap();
    assert_eq!(result["is_error"], false, "{result}");

    // The gateway's view: the first put committed, the second refused by policy.
    let audit = Command::new(BIN)
        .args(["audit", "export", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(audit.status.success(), "{audit:?}");
    let records: Vec<Value> = String::from_utf8_lossy(&audit.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let put = |key: &str| {
        records
            .iter()
            .find(|r| r["tool"] == "kv_put" && r["agent"] == "coder" && r.to_string().contains(key))
            .unwrap_or_else(|| panic!("no kv_put of {key} in the audit: {records:?}"))
    };
    assert_eq!(put("/projects/p1/code/hello.py")["decision"], "allow");
    assert_eq!(put("/projects/p1/plan/overview")["decision"], "deny");
    drop(mock);
    Some(read("state/run/up/gateway.log"))
}
