//! The shipped Claude Code profile, verified with the real Claude Code (npm
//! `@anthropic-ai/claude-code`, installed by scripts/test into tests/node)
//! against a mock of the Anthropic Messages API: inside the sandbox it starts,
//! talks to the API on the one allowed port, starts `cordon bridge`, and makes a
//! real MCP call through the gateway.
// A test or benchmark program: a panic is its failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{is_root, Gateway, BIN};
use serde_json::{json, Value};

#[test]
fn claude_code_runs_in_the_shipped_profile_and_calls_the_gateway() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(node_bin) = common::claude_node_bin("claude_code_runs_in_the_shipped_profile") else {
        return;
    };
    let shipped = repo.join("configs/profiles/claude-code.toml");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::set_permissions(root, PermissionsExt::from_mode(0o755)).unwrap();
    let work = root.join("work");
    std::fs::create_dir(&work).unwrap();

    let log = root.join("api.jsonl");
    let (mock, port) = common::start_api_mock(
        "mcp__cordon__kv_put",
        r#"{"key": "/notes/sandbox", "value": {"from": "claude"}}"#,
        &log,
    );

    // The shipped profile, with the mock's port in place of 443.
    let mut text = std::fs::read_to_string(&shipped).unwrap();
    assert!(text.contains("connect_tcp = [443]"));
    if !is_root() {
        // Its cgroup limits need root; every Landlock right is still enforced.
        let _ = writeln!(
            std::io::stderr(),
            "NOTE claude_code test: not root, so the profile runs best-effort without its cgroup limits"
        );
        text = text.replace("require = \"strict\"", "require = \"best-effort\"");
    }
    let profile = root.join("claude-code.toml");
    std::fs::write(
        &profile,
        text.replace("connect_tcp = [443]", &format!("connect_tcp = [{port}]")),
    )
    .unwrap();

    // The uid the profile's `user = "auto"` gives agent "coder" here.
    let id = Command::new(BIN)
        .args(["sandbox", "run", "--name", "coder", "--profile"])
        .arg(&profile)
        .arg("--workdir")
        .arg(&work)
        .args(["--", "/usr/bin/id", "-u"])
        .output()
        .unwrap();
    assert!(id.status.success(), "{id:?}");
    let uid: u32 = String::from_utf8_lossy(&id.stdout).trim().parse().unwrap();
    let uid_line = if is_root() {
        std::os::unix::fs::chown(&work, Some(uid), Some(uid)).unwrap();
        format!("uid = {uid}\n")
    } else {
        String::new()
    };
    let gw = Gateway::start_with("", &format!("[agents.coder]\nrole = \"coder\"\n{uid_line}"));
    let socket = gw.socket("coder");

    let mcp = work.join("mcp.json");
    std::fs::write(
        &mcp,
        json!({"mcpServers": {"cordon": {"command": BIN, "args": ["bridge", "--socket", socket]}}})
            .to_string(),
    )
    .unwrap();
    std::fs::set_permissions(&mcp, PermissionsExt::from_mode(0o644)).unwrap();

    let path = format!(
        "{}:{}",
        node_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("timeout")
        .args(["120", BIN, "sandbox", "run", "--name", "coder", "--profile"])
        .arg(&profile)
        .arg("--workdir")
        .arg(&work)
        .arg("--socket")
        .arg(&socket)
        .args([
            "--",
            "claude",
            "-p",
            "Store a note saying where you ran.",
            "--mcp-config",
            "mcp.json",
            "--strict-mcp-config",
            "--allowedTools",
            "mcp__cordon__kv_put",
            "--output-format",
            "stream-json",
            "--verbose",
        ])
        .current_dir(&work)
        .env("PATH", path)
        .env("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{port}"))
        .env("ANTHROPIC_API_KEY", "sk-mock-not-a-key")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("ENABLE_TOOL_SEARCH", "false")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "claude failed: {stderr}\n{stdout}");
    let lines: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let init = lines
        .iter()
        .find(|l| l["type"] == "system" && l["subtype"] == "init")
        .unwrap_or_else(|| panic!("no init line: {stdout}"));
    assert_eq!(
        init["mcp_servers"][0]["status"], "connected",
        "the bridge did not connect from inside the sandbox: {init}"
    );
    let result = lines.last().unwrap();
    assert_eq!(result["type"], "result", "{result}");
    assert_eq!(result["is_error"], false, "{result}");
    assert!(
        result["result"].as_str().unwrap().contains("revision"),
        "{result}"
    );

    // The tool result Claude Code sent back to the API came from the gateway's store.
    let requests = std::fs::read_to_string(&log).unwrap();
    assert!(
        requests.contains(r#"\"key\":\"/notes/sandbox\""#) && requests.contains("create_revision"),
        "no kv_put result in what Claude Code sent: {requests}"
    );
    drop(mock);
}
