//! An agent's stdout, read as events: Claude Code's `--output-format
//! stream-json` (tool_use blocks nested in `assistant` messages, tool_result
//! blocks in `user` messages, a final `result`) and `cordon script`'s lines
//! (`call`, `result`). Used for health and reporting only: nothing an agent
//! prints decides anything but its own counters.

use serde::Serialize;
use serde_json::{json, Value};

/// Counters of one agent over all its runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub turns: u64,
    pub calls: u64,
    pub errors: u64,
    pub denials: u64,
    pub last_event: String,
    /// The last run's final result text, if it printed one.
    pub result: Option<String>,
    pub result_is_error: Option<bool>,
}

/// A short text of a tool's arguments for the log line: the key or prefix.
fn brief(input: &Value) -> String {
    for field in ["key", "prefix"] {
        if let Some(k) = input.get(field).and_then(Value::as_str) {
            return k.to_string();
        }
    }
    String::new()
}

fn short_tool(name: &str) -> &str {
    name.strip_prefix("mcp__cordon__").unwrap_or(name)
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .filter_map(|c| c.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

/// A refusal, whether Claude Code's own permission check or the gateway's
/// policy said no.
fn is_denial(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("\"denied\"")
        || t.contains("denied by policy")
        || t.contains("permission")
        || t.contains("code\":\"denied")
}

/// Parses one line; updates `stats`; returns the events to log (each a JSON
/// object with `kind`).
pub fn parse_line(line: &str, stats: &mut Stats) -> Vec<Value> {
    interpret(line, serde_json::from_str::<Value>(line).ok(), stats)
}

/// [`parse_line`] with the line already parsed as JSON (`None`: it is not
/// JSON), so the parse can run without the lock on `stats`.
pub fn interpret(line: &str, parsed: Option<Value>, stats: &mut Stats) -> Vec<Value> {
    let Some(v) = parsed else {
        let text: String = line.chars().take(500).collect();
        return vec![json!({"kind": "output", "text": text})];
    };
    let mut out = Vec::new();
    match v.get("type").and_then(Value::as_str) {
        Some("system") => {
            let servers = v.get("mcp_servers").cloned().unwrap_or(Value::Null);
            out.push(json!({"kind": "init", "subtype": v.get("subtype"), "mcp_servers": servers}));
            // Claude Code lists its MCP servers: one that did not connect
            // means the agent runs without the gateway.
            let down: Vec<String> = servers
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s.get("status").and_then(Value::as_str) != Some("connected"))
                .map(|s| {
                    format!(
                        "{} {}",
                        s.get("name").and_then(Value::as_str).unwrap_or("?"),
                        s.get("status").and_then(Value::as_str).unwrap_or("?")
                    )
                })
                .collect();
            if !down.is_empty() {
                stats.errors += 1;
            }
            stats.last_event = if down.is_empty() {
                format!(
                    "init{}",
                    v.get("subtype")
                        .and_then(Value::as_str)
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default()
                )
            } else {
                format!("init: MCP server {}", down.join(", "))
            };
        }
        Some("assistant") => {
            stats.turns += 1;
            let content = message_content(&v);
            for block in content {
                if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                    stats.calls += 1;
                    let name = block.get("name").and_then(Value::as_str).unwrap_or("?");
                    let input = block.get("input").cloned().unwrap_or(Value::Null);
                    stats.last_event = format!("{} {}", short_tool(name), brief(&input));
                    out.push(json!({"kind": "tool_use", "id": block.get("id"), "tool": name, "input": input}));
                }
            }
            if out.is_empty() {
                out.push(json!({"kind": "turn"}));
            }
        }
        Some("user") => {
            let content = message_content(&v);
            for block in content {
                if block.get("type").and_then(Value::as_str) == Some("tool_result") {
                    let is_error = block.get("is_error").and_then(Value::as_bool) == Some(true);
                    let text = text_of(block.get("content").unwrap_or(&Value::Null));
                    let denied = is_error && is_denial(&text);
                    if is_error {
                        stats.errors += 1;
                    }
                    if denied {
                        stats.denials += 1;
                    }
                    let short: String = text.chars().take(300).collect();
                    out.push(
                        json!({"kind": "tool_result", "id": block.get("tool_use_id"),
                        "is_error": is_error, "denied": denied, "text": short}),
                    );
                    stats.last_event = format!(
                        "result: {}",
                        if denied {
                            "denied"
                        } else if is_error {
                            "error"
                        } else {
                            "ok"
                        }
                    );
                }
            }
        }
        Some("result") => {
            // Claude Code's final line, or `cordon script`'s.
            let is_error = v.get("is_error").and_then(Value::as_bool).unwrap_or(false);
            let text = v
                .get("result")
                .map(|r| match r {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            if let Some(d) = v.get("permission_denials").and_then(Value::as_array) {
                stats.denials += d.len() as u64;
            }
            stats.result = Some(text.chars().take(500).collect());
            stats.result_is_error = Some(is_error);
            stats.last_event = format!("result ({})", if is_error { "error" } else { "ok" });
            out.push(
                json!({"kind": "result", "is_error": is_error, "result": stats.result,
                "num_turns": v.get("num_turns"), "subtype": v.get("subtype")}),
            );
        }
        Some("call") => {
            // `cordon script`: one line per tool call, with its outcome.
            stats.calls += 1;
            let outcome = v.get("outcome").and_then(Value::as_str).unwrap_or("?");
            match outcome {
                "deny" => stats.denials += 1,
                "error" => stats.errors += 1,
                _ => {}
            }
            let tool = v.get("tool").and_then(Value::as_str).unwrap_or("?");
            let key = v.get("key").and_then(Value::as_str).unwrap_or("");
            stats.last_event = format!("{tool} {key} → {outcome}");
            let mut e = v.clone();
            if let Some(o) = e.as_object_mut() {
                o.remove("type");
                o.insert("kind".into(), json!("call"));
            }
            out.push(e);
        }
        _ => out.push(json!({"kind": "other", "line": v})),
    }
    out
}

/// The content blocks of a stream-json `assistant` or `user` message.
fn message_content(v: &Value) -> Vec<Value> {
    v.pointer("/message/content")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claude_stream_json() {
        let mut s = Stats::default();
        let lines = [
            r#"{"type":"system","subtype":"init","mcp_servers":[{"name":"cordon","status":"connected"}]}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","id":"t1","name":"mcp__cordon__kv_put","input":{"key":"/a","value":1}}]}}"#,
            r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"{\"revision\":3}"}]}]}}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","id":"t2","name":"mcp__cordon__kv_put","input":{"key":"/b"}}]}}"#,
            r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t2","is_error":true,"content":"{\"error\":{\"code\":\"denied\"}}"}]}}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"done"}]}}"#,
            r#"{"type":"result","subtype":"success","is_error":false,"result":"done","num_turns":3}"#,
        ];
        let events: Vec<Value> = lines.iter().flat_map(|l| parse_line(l, &mut s)).collect();
        assert_eq!(events[1]["kind"], "tool_use");
        assert_eq!(events[1]["tool"], "mcp__cordon__kv_put");
        assert_eq!(events[4]["denied"], true);
        assert_eq!((s.turns, s.calls, s.errors, s.denials), (3, 2, 1, 1));
        assert_eq!(s.result.as_deref(), Some("done"));
        assert_eq!(s.result_is_error, Some(false));
        assert_eq!(parse_line("not json", &mut s)[0]["kind"], "output");
        parse_line(
            r#"{"type":"system","subtype":"init","mcp_servers":[{"name":"cordon","status":"failed"}]}"#,
            &mut s,
        );
        assert_eq!(s.last_event, "init: MCP server cordon failed");
    }

    #[test]
    fn script_lines() {
        let mut s = Stats::default();
        parse_line(
            r#"{"type":"call","tool":"kv_put","key":"/x","outcome":"deny","ok":true}"#,
            &mut s,
        );
        parse_line(
            r#"{"type":"result","is_error":false,"result":"4 tasks"}"#,
            &mut s,
        );
        assert_eq!((s.calls, s.denials), (1, 1));
        assert_eq!(s.result.as_deref(), Some("4 tasks"));
    }
}
