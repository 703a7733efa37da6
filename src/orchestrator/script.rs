//! `cordon script FILE`: a scripted MCP client. Runs a TOML list of tool calls
//! through an agent's socket (or through `cordon bridge`, as Claude Code does),
//! checks each outcome against what the file expects, and prints one JSON line
//! per call and a final `result` line (the orchestrator reads them as events).
//! Useful on its own to try a policy as a role; the demo's agents are scripts.
//!
//! ```toml
//! report = "${done} tasks completed"      # the final result text (optional)
//!
//! [[step]]                                # a tool call
//! tool = "kv_put"
//! args = { key = "/projects/p/plan/x", value = { by = "${agent}" } }
//! expect = "allow"                        # allow (default) | deny | error
//! code = "conflict"                       # expected error code (deny/error)
//! result = { previous_revision = 0 }      # fields the result must have
//! save = { rev = "revision" }             # ${rev} = the result's field
//!
//! [[step]]                                # until N readable keys are under a prefix (kv_watch)
//! wait = { prefix = "/projects/p/plan/ready", count = 1 }
//!
//! [[step]]                                # ${done} = readable keys under a prefix
//! count = { prefix = "/projects/p/tasks/completed", as = "done" }
//!
//! [[step]]                                # claim tasks one by one (one kv_txn each), run `each` per task
//! claim = { from = "/projects/p/tasks/pending", to = "/projects/p/tasks/in_progress" }
//! [[step.each]]
//! tool = "kv_put"
//! args = { key = "/projects/p/code/${task}", value = "${task_value}" }
//!
//! [[step]]                                # every readable entry under a prefix: ${key} ${name} ${value}
//! foreach = { prefix = "/projects/p/code" }
//! [[step.each]]
//! tool = "kv_get"
//! args = { key = "${key}" }
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot read script {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("script {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("MCP connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("MCP connection: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    #[default]
    Allow,
    Deny,
    Error,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    pub report: Option<String>,
    #[serde(default)]
    pub step: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prefix {
    pub prefix: String,
    pub count: Option<u64>,
    #[serde(rename = "as")]
    pub var: Option<String>,
    /// Longest wait (default 60s); past it the step fails.
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub tool: Option<String>,
    #[serde(default)]
    pub args: Option<toml::Table>,
    #[serde(default)]
    pub expect: Expect,
    pub code: Option<String>,
    pub result: Option<toml::Table>,
    #[serde(default)]
    pub save: HashMap<String, String>,
    pub wait: Option<Prefix>,
    pub count: Option<Prefix>,
    pub claim: Option<Claim>,
    pub foreach: Option<Prefix>,
    #[serde(default)]
    pub each: Vec<Step>,
}

impl Script {
    pub fn load(path: &Path) -> Result<Script, ScriptError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let script: Script = toml::from_str(&text).map_err(|e| ScriptError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        fn check(steps: &[Step], path: &Path) -> Result<(), ScriptError> {
            for (i, s) in steps.iter().enumerate() {
                let kinds = [
                    s.tool.is_some(),
                    s.wait.is_some(),
                    s.count.is_some(),
                    s.claim.is_some(),
                    s.foreach.is_some(),
                ];
                if kinds.iter().filter(|k| **k).count() != 1 {
                    return Err(ScriptError::Parse {
                        path: path.to_path_buf(),
                        message: format!(
                            "step {}: give exactly one of tool, wait, count, claim, foreach",
                            i + 1
                        ),
                    });
                }
                if !s.each.is_empty() && s.claim.is_none() && s.foreach.is_none() {
                    return Err(ScriptError::Parse {
                        path: path.to_path_buf(),
                        message: format!("step {}: `each` goes with claim or foreach", i + 1),
                    });
                }
                check(&s.each, path)?;
            }
            Ok(())
        }
        check(&script.step, path)?;
        Ok(script)
    }
}

/// How a call came out, as the script sees it.
struct Outcome {
    kind: Expect,
    code: Option<String>,
    content: Value,
}

/// Newline-delimited JSON-RPC over a socket or a bridge's stdio.
struct Mcp {
    reader: Box<dyn BufRead>,
    writer: Box<dyn Write>,
    next_id: u64,
    _bridge: Option<std::process::Child>,
}

impl Mcp {
    fn connect(socket: &Path, bridge: bool) -> Result<Mcp, ScriptError> {
        let mut mcp = if bridge {
            let exe = std::env::current_exe()?;
            let mut child = std::process::Command::new(exe)
                .arg("bridge")
                .arg("--socket")
                .arg(socket)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err(ScriptError::Protocol("bridge has no stdio".into()));
            };
            Mcp {
                reader: Box::new(BufReader::new(stdout)),
                writer: Box::new(stdin),
                next_id: 1,
                _bridge: Some(child),
            }
        } else {
            let s = std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
                ScriptError::Connect {
                    path: socket.to_path_buf(),
                    source,
                }
            })?;
            Mcp {
                reader: Box::new(BufReader::new(s.try_clone()?)),
                writer: Box::new(s),
                next_id: 1,
                _bridge: None,
            }
        };
        let r = mcp.request(
            "initialize",
            json!({"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "cordon-script", "version": env!("CARGO_PKG_VERSION")}}),
        )?;
        if r.get("result").is_none() {
            return Err(ScriptError::Protocol(format!("initialize failed: {r}")));
        }
        mcp.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
        Ok(mcp)
    }

    fn send(&mut self, msg: &Value) -> Result<(), ScriptError> {
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        self.writer.flush()?;
        Ok(())
    }

    fn request(&mut self, method: &str, params: Value) -> Result<Value, ScriptError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(ScriptError::Protocol(
                    "the gateway closed the connection".into(),
                ));
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| {
                ScriptError::Protocol(format!("invalid JSON from the gateway: {e}"))
            })?;
            // Requests from the server (none expected) and notifications are skipped.
            if v.get("id") == Some(&json!(id)) {
                return Ok(v);
            }
        }
    }

    fn call(&mut self, tool: &str, args: Value) -> Result<Outcome, ScriptError> {
        let r = self.request("tools/call", json!({"name": tool, "arguments": args}))?;
        if let Some(e) = r.get("error") {
            let code = e["code"].as_i64().unwrap_or(0);
            return Ok(Outcome {
                kind: if code == i64::from(crate::gateway::codes::DENIED.0) {
                    Expect::Deny
                } else {
                    Expect::Error
                },
                code: Some(if code == i64::from(crate::gateway::codes::DENIED.0) {
                    "denied".into()
                } else {
                    code.to_string()
                }),
                content: e.clone(),
            });
        }
        let res = &r["result"];
        let content = res["structuredContent"].clone();
        if res["isError"] == true {
            let code = content["error"]["code"].as_str().unwrap_or("").to_string();
            return Ok(Outcome {
                kind: if code == "denied" {
                    Expect::Deny
                } else {
                    Expect::Error
                },
                code: Some(code),
                content,
            });
        }
        Ok(Outcome {
            kind: Expect::Allow,
            code: None,
            content,
        })
    }
}

fn toml_to_json(t: &toml::Table) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

struct Runner {
    mcp: Mcp,
    vars: HashMap<String, Value>,
    calls: u64,
    denials: u64,
    failed: u64,
    out: std::io::Stdout,
}

fn field(v: &Value, path: &str) -> Value {
    let pointer = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{}", path.replace('.', "/"))
    };
    v.pointer(&pointer).cloned().unwrap_or(Value::Null)
}

impl Runner {
    fn expand(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => {
                if let Some(name) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
                    if !name.contains("${") {
                        if let Some(val) = self.vars.get(name) {
                            return val.clone();
                        }
                    }
                }
                let mut out = s.clone();
                for (k, val) in &self.vars {
                    let pat = format!("${{{k}}}");
                    if out.contains(&pat) {
                        let text = match val {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        out = out.replace(&pat, &text);
                    }
                }
                Value::String(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(|x| self.expand(x)).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| (k.clone(), self.expand(x)))
                    .collect::<Map<_, _>>(),
            ),
            other => other.clone(),
        }
    }

    fn emit(&mut self, v: Value) {
        let mut out = self.out.lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }

    /// One call, its outcome checked against `expect`/`code`/`result`.
    fn call(
        &mut self,
        tool: &str,
        args: Value,
        expect: Expect,
        code: Option<&str>,
        result: Option<&Value>,
    ) -> Result<Outcome, ScriptError> {
        let outcome = self.mcp.call(tool, args.clone())?;
        self.calls += 1;
        if outcome.kind == Expect::Deny {
            self.denials += 1;
        }
        let mut ok = outcome.kind == expect;
        if let (Some(want), true) = (code, ok) {
            ok = outcome.code.as_deref() == Some(want);
        }
        if let (Some(Value::Object(want)), true) = (result, ok) {
            ok = want.iter().all(|(k, v)| field(&outcome.content, k) == *v);
        }
        let kind = match outcome.kind {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
            Expect::Error => "error",
        };
        let key = args
            .get("key")
            .or_else(|| args.get("prefix"))
            .or_else(|| args.pointer("/ops/0/key"))
            .cloned()
            .unwrap_or(Value::Null);
        self.emit(
            json!({"type": "call", "tool": tool, "key": key, "outcome": kind,
            "code": outcome.code, "ok": ok}),
        );
        if !ok {
            self.failed += 1;
            eprintln!(
                "cordon script: {tool} {key}: expected {expect:?}{}, got {kind} {}",
                code.map(|c| format!(" ({c})")).unwrap_or_default(),
                outcome.content
            );
        }
        Ok(outcome)
    }

    fn run(&mut self, steps: &[Step]) -> Result<(), ScriptError> {
        for step in steps {
            if let Some(tool) = &step.tool {
                let args = self.expand(&step.args.as_ref().map_or(json!({}), toml_to_json));
                let want = step.result.as_ref().map(|r| self.expand(&toml_to_json(r)));
                let o = self.call(tool, args, step.expect, step.code.as_deref(), want.as_ref())?;
                for (var, path) in &step.save {
                    let v = field(&o.content, path);
                    self.vars.insert(var.clone(), v);
                }
            } else if let Some(w) = &step.wait {
                self.wait(w)?;
            } else if let Some(c) = &step.count {
                let prefix = self.expand_str(&c.prefix);
                let n = self.list(&prefix)?.len();
                self.vars
                    .insert(c.var.clone().unwrap_or_else(|| "count".into()), json!(n));
            } else if let Some(claim) = &step.claim {
                self.claim(claim, &step.each)?;
            } else if let Some(f) = &step.foreach {
                let prefix = self.expand_str(&f.prefix);
                for (key, value) in self.scan(&prefix)? {
                    let name = key.rsplit('/').next().unwrap_or_default().to_string();
                    self.vars.insert("key".into(), json!(key));
                    self.vars.insert("name".into(), json!(name));
                    self.vars.insert("value".into(), value);
                    self.run(&step.each)?;
                }
            }
        }
        Ok(())
    }

    fn expand_str(&self, s: &str) -> String {
        match self.expand(&json!(s)) {
            Value::String(s) => s,
            other => other.to_string(),
        }
    }

    /// Every page of `kv_scan`/`kv_list` under a prefix, item by item (not
    /// counted as calls of the script: they are its bookkeeping).
    fn pages(
        &mut self,
        tool: &str,
        field: &str,
        prefix: &str,
        mut each: impl FnMut(&Value),
    ) -> Result<(), ScriptError> {
        let mut cursor = Value::Null;
        loop {
            let mut args = json!({"prefix": prefix, "limit": 100});
            if !cursor.is_null() {
                args["cursor"] = cursor.clone();
            }
            let o = self.mcp.call(tool, args)?;
            if o.kind != Expect::Allow {
                return Err(ScriptError::Protocol(format!(
                    "{tool} {prefix}: {}",
                    o.content
                )));
            }
            o.content[field]
                .as_array()
                .into_iter()
                .flatten()
                .for_each(&mut each);
            cursor = o.content["next_cursor"].clone();
            if cursor.is_null() {
                return Ok(());
            }
        }
    }

    /// Readable entries under a prefix, with their revisions.
    fn scan(&mut self, prefix: &str) -> Result<Vec<(String, Value)>, ScriptError> {
        let mut out = Vec::new();
        self.pages("kv_scan", "entries", prefix, |e| {
            out.push((
                e["key"].as_str().unwrap_or_default().to_string(),
                json!({"value": e["value"], "revision": e["revision"]}),
            ))
        })?;
        Ok(out)
    }

    /// Readable keys under a prefix.
    fn list(&mut self, prefix: &str) -> Result<Vec<String>, ScriptError> {
        let mut out = Vec::new();
        self.pages("kv_list", "keys", prefix, |k| {
            out.push(k["key"].as_str().unwrap_or_default().to_string())
        })?;
        Ok(out)
    }

    /// Until `count` readable keys exist under the prefix: list, and if short,
    /// watch from the last revision seen (woken by commits, never polling).
    fn wait(&mut self, w: &Prefix) -> Result<(), ScriptError> {
        let prefix = self.expand_str(&w.prefix);
        let want = w.count.unwrap_or(1) as usize;
        let limit = w
            .timeout
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(Duration::from_secs(60));
        let deadline = Instant::now() + limit;
        let mut since = 0u64;
        loop {
            if self.list(&prefix)?.len() >= want {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.failed += 1;
                eprintln!(
                    "cordon script: gave up waiting for {want} keys under {prefix} after {limit:?}"
                );
                return Err(ScriptError::Protocol(format!(
                    "timed out waiting for {want} keys under {prefix}"
                )));
            }
            let ms = left.as_millis().min(30_000) as u64;
            let o = self.mcp.call(
                "kv_watch",
                json!({"prefix": prefix, "since_revision": since, "timeout_ms": ms}),
            )?;
            match (o.kind, o.code.as_deref()) {
                (Expect::Allow, _) => {
                    since = o.content["revision"].as_u64().unwrap_or(since).max(since);
                }
                (_, Some("compacted")) => {
                    // "… watch from revision N": start from now.
                    let msg = o.content["error"]["message"].as_str().unwrap_or("");
                    since = msg
                        .rsplit("watch from revision ")
                        .next()
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(since);
                }
                _ => {
                    return Err(ScriptError::Protocol(format!(
                        "kv_watch {prefix}: {}",
                        o.content
                    )))
                }
            }
        }
    }

    /// Claims pending entries one at a time: one kv_txn checks the entry's
    /// revision, deletes it and puts it under `to` with this agent as owner.
    /// Losing a race (check_failed) is expected: another agent got it.
    fn claim(&mut self, claim: &Claim, each: &[Step]) -> Result<(), ScriptError> {
        let from = self.expand_str(&claim.from);
        let to = self.expand_str(&claim.to);
        let agent = self.vars.get("agent").cloned().unwrap_or(Value::Null);
        loop {
            let entries = self.scan(&from)?;
            if entries.is_empty() {
                return Ok(());
            }
            for (key, entry) in entries {
                let name = key.rsplit('/').next().unwrap_or_default().to_string();
                let target = format!("{}/{name}", to.trim_end_matches('/'));
                let args = json!({
                    "checks": [{"key": key, "revision": entry["revision"]}],
                    "ops": [
                        {"op": "delete", "key": key},
                        {"op": "put", "key": target, "value": {"task": entry["value"], "owner": agent}},
                    ],
                });
                let o = self.mcp.call("kv_txn", args.clone())?;
                self.calls += 1;
                let won = o.kind == Expect::Allow;
                let lost = o.code.as_deref() == Some("check_failed");
                let outcome = match o.kind {
                    Expect::Allow => "allow",
                    Expect::Deny => "deny",
                    Expect::Error => "error",
                };
                if o.kind == Expect::Deny {
                    self.denials += 1;
                }
                self.emit(json!({"type": "call", "tool": "kv_txn", "key": key, "outcome": outcome,
                    "code": o.code, "ok": won || lost, "claim": if won { "won" } else if lost { "lost" } else { "failed" }}));
                if !(won || lost) {
                    self.failed += 1;
                    eprintln!("cordon script: claiming {key} failed: {}", o.content);
                    return Ok(());
                }
                if won {
                    self.vars.insert("task".into(), json!(name));
                    self.vars.insert("task_key".into(), json!(target));
                    self.vars
                        .insert("task_value".into(), entry["value"].clone());
                    self.run(each)?;
                    // Rescan: the list may have changed while we worked.
                    break;
                }
            }
        }
    }
}

/// Runs a script; returns whether every expectation held.
pub fn run(path: &Path, socket: &Path, agent: &str, bridge: bool) -> Result<bool, ScriptError> {
    let script = Script::load(path)?;
    let mcp = Mcp::connect(socket, bridge)?;
    let mut runner = Runner {
        mcp,
        vars: HashMap::from([("agent".to_string(), json!(agent))]),
        calls: 0,
        denials: 0,
        failed: 0,
        out: std::io::stdout(),
    };
    let res = runner.run(&script.step);
    let error = res.as_ref().err().map(|e| e.to_string());
    let report = script
        .report
        .as_deref()
        .map(|r| runner.expand_str(r))
        .unwrap_or_else(|| format!("{} calls, {} denials", runner.calls, runner.denials));
    let is_error = runner.failed > 0 || error.is_some();
    runner.emit(
        json!({"type": "result", "is_error": is_error, "result": report,
        "calls": runner.calls, "denials": runner.denials, "failed": runner.failed, "error": error}),
    );
    res?;
    Ok(runner.failed == 0)
}
