//! Reading the audit log for people and SIEMs: filters, a table, JSON lines,
//! and counts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::Record;

/// Which records a command shows.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub agent: Option<String>,
    pub role: Option<String>,
    pub tool: Option<String>,
    pub decision: Option<String>,
    pub event: Option<String>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
}

/// `2026-11-27T21:00:00Z`, `2026-11-27`, or an age such as `15m`, `2h`, `7d`.
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(&format!("{s} 00:00:00")) {
        return Ok(t);
    }
    humantime::parse_duration(s)
        .map(|d| SystemTime::now() - d)
        .map_err(|_| format!("{s:?} is neither a time (2026-11-27T21:00:00Z, 2026-11-27) nor an age (15m, 2h, 7d)"))
}

impl Filter {
    pub fn matches(&self, r: &Record) -> bool {
        let eq = |want: &Option<String>, got: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| got.as_deref() == Some(w.as_str()))
        };
        if !eq(&self.agent, &r.agent)
            || !eq(&self.role, &r.role)
            || !eq(&self.tool, &r.tool)
            || !eq(&self.decision, &r.decision)
            || self.event.as_ref().is_some_and(|e| *e != r.event)
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Ok(t) = humantime::parse_rfc3339(&r.time) else {
                return false;
            };
            if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t >= u) {
                return false;
            }
        }
        true
    }
}

pub const TABLE_HEADER: &str = "SEQ      TIME                         EVENT               AGENT        ROLE         TOOL       DECISION  OUTCOME              KEYS";

fn cell(s: &str, w: usize) -> String {
    let mut out: String = s.chars().take(w).collect();
    while out.chars().count() < w {
        out.push(' ');
    }
    out
}

/// One table row (no trailing newline).
pub fn row(r: &Record) -> String {
    let outcome = match &r.outcome {
        Some(o) if o.is_ok() => "ok".to_string(),
        Some(o) => format!("error:{}", o.code.as_deref().unwrap_or("?")),
        None => "-".into(),
    };
    let mut keys = r.keys.join(",");
    if let Some(rule) = r
        .rule
        .as_ref()
        .filter(|_| r.decision.as_deref() == Some("deny"))
    {
        let _ = write!(keys, "  rule: {}", rule.text);
    }
    if let Some(d) = r.detail.as_ref().filter(|_| r.event != "call") {
        if let Some(reason) = d.get("error").or(d.get("reason")).and_then(Value::as_str) {
            let _ = write!(keys, "{reason}");
        }
    }
    format!(
        "{:<8} {:<28} {} {} {} {} {} {} {}",
        r.seq,
        r.time,
        cell(&r.event, 19),
        cell(r.agent.as_deref().unwrap_or("-"), 12),
        cell(r.role.as_deref().unwrap_or("-"), 12),
        cell(r.tool.as_deref().unwrap_or("-"), 10),
        cell(r.decision.as_deref().unwrap_or("-"), 9),
        cell(&outcome, 20),
        keys
    )
    .trim_end()
    .to_string()
}

#[derive(Default)]
struct Count {
    calls: u64,
    denied: u64,
    errors: u64,
}

/// Calls and denials per agent, role and tool.
#[derive(Default)]
pub struct Stats {
    by: BTreeMap<(String, String, String), Count>,
    events: BTreeMap<String, u64>,
    first: Option<String>,
    last: Option<String>,
}

impl Stats {
    pub fn add(&mut self, r: &Record) {
        *self.events.entry(r.event.clone()).or_default() += 1;
        if self.first.is_none() {
            self.first = Some(r.time.clone());
        }
        self.last = Some(r.time.clone());
        if r.event != "call" {
            return;
        }
        let key = (
            r.agent.clone().unwrap_or_default(),
            r.role.clone().unwrap_or_default(),
            r.tool.clone().unwrap_or_default(),
        );
        let c = self.by.entry(key).or_default();
        c.calls += 1;
        if r.decision.as_deref() != Some("allow") {
            c.denied += 1;
        } else if r.outcome.as_ref().is_some_and(|o| !o.is_ok()) {
            c.errors += 1;
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "records from {} to {}",
            self.first.as_deref().unwrap_or("-"),
            self.last.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            out,
            "\n{:<16} {:<14} {:<10} {:>8} {:>8} {:>8}",
            "AGENT", "ROLE", "TOOL", "CALLS", "DENIED", "ERRORS"
        );
        let mut totals = Count::default();
        for ((agent, role, tool), c) in &self.by {
            let _ = writeln!(
                out,
                "{agent:<16} {role:<14} {tool:<10} {:>8} {:>8} {:>8}",
                c.calls, c.denied, c.errors
            );
            totals.calls += c.calls;
            totals.denied += c.denied;
            totals.errors += c.errors;
        }
        let _ = writeln!(
            out,
            "{:<16} {:<14} {:<10} {:>8} {:>8} {:>8}",
            "total", "", "", totals.calls, totals.denied, totals.errors
        );
        let _ = writeln!(out, "\nEVENT               COUNT");
        for (e, n) in &self.events {
            let _ = writeln!(out, "{e:<19} {n:>6}");
        }
        out
    }
}

/// How often `tail -f` looks for new records (another process's commits
/// cannot wake it).
pub const FOLLOW_EVERY: Duration = Duration::from_millis(200);
