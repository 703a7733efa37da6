//! The status table: `cordon status`, `cordon up`'s live view on a terminal,
//! and its summary at exit. Rendered from the control socket's JSON.

use serde_json::Value;

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn human_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What the logs dropped: `-`, or bytes and lines.
fn dropped(v: &Value) -> String {
    match (v["dropped_bytes"].as_u64(), v["dropped_lines"].as_u64()) {
        (Some(b), Some(l)) if b > 0 || l > 0 => format!("{} ({l} lines)", human_bytes(b)),
        _ => "-".into(),
    }
}

/// One row per agent: name, role, uid, pid, state, restarts, uptime, memory,
/// calls, denials, what its logs dropped, last event.
pub fn table(status: &Value) -> String {
    let header = [
        "NAME",
        "ROLE",
        "UID",
        "PID",
        "STATE",
        "RESTARTS",
        "UPTIME",
        "MEMORY",
        "CALLS",
        "DENIALS",
        "DROPPED",
        "LAST EVENT",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for a in status["agents"].as_array().into_iter().flatten() {
        let state = match (&a["state"], &a["exit"]) {
            (Value::String(s), Value::String(e)) => format!("{s} ({e})"),
            (s, _) => cell(s),
        };
        rows.push(vec![
            cell(&a["name"]),
            cell(&a["role"]),
            cell(&a["uid"]),
            cell(&a["pid"]),
            state,
            cell(&a["restarts"]),
            a["uptime_s"]
                .as_u64()
                .map_or_else(|| "-".into(), human_secs),
            a["memory_bytes"]
                .as_u64()
                .map_or_else(|| "-".into(), human_bytes),
            cell(&a["calls"]),
            cell(&a["denials"]),
            dropped(a),
            a["last_event"]
                .as_str()
                .map(|s| s.chars().take(48).collect())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == r.len() {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if let Some(g) = status.get("gateway") {
        let state = match g["unanswered_s"].as_f64() {
            Some(s) => format!("{} (no answer for {s:.1}s)", cell(&g["state"])),
            None => cell(&g["state"]),
        };
        out.push_str(&format!(
            "gateway: pid {}, {state}, restarts {}",
            cell(&g["pid"]),
            cell(&g["restarts"])
        ));
        if let Some(n) = g["watchdog"]["restarts"].as_u64().filter(|n| *n > 0) {
            out.push_str(&format!(" ({n} by the watchdog)"));
        }
        let d = dropped(g);
        if d != "-" {
            out.push_str(&format!(", log dropped {d}"));
        }
        out.push('\n');
    }
    if let Some(s) = status.get("store") {
        out.push_str(&store_lines(s));
    }
    out
}

/// The store's space (from the gateway's admin status) and one line per
/// raised quota alarm.
fn store_lines(s: &Value) -> String {
    if let Some(e) = s.get("error") {
        return format!("store: unknown ({})\n", cell(e));
    }
    let of = |used: &str, max: &str| match (s[used].as_u64(), s[max].as_u64()) {
        (Some(u), Some(m)) => format!("{} of {}", human_bytes(u), human_bytes(m)),
        (Some(u), None) => human_bytes(u),
        _ => "-".into(),
    };
    let mut out = format!(
        "store: data {}, audit {}, map {}\n",
        of("data_bytes", "max_store_bytes"),
        of("audit_bytes", "audit_max_bytes"),
        of("map_used_bytes", "map_size"),
    );
    for a in s["alarms"].as_array().into_iter().flatten() {
        let (usage, limit) = (a["usage"].as_u64(), a["limit"].as_u64());
        let figures = match (a["unit"].as_str(), usage, limit) {
            (Some("bytes"), Some(u), Some(l)) => {
                format!("{} of {}", human_bytes(u), human_bytes(l))
            }
            (_, Some(u), Some(l)) => format!("{u} of {l} keys"),
            _ => "-".into(),
        };
        let pct = match (usage, limit) {
            (Some(u), Some(l)) if l > 0 => format!(" ({}%)", u.saturating_mul(100) / l),
            _ => String::new(),
        };
        out.push_str(&format!(
            "ALARM {}: {} {figures}{pct}{}\n",
            cell(&a["level"]),
            cell(&a["quota"]),
            a["rule"]
                .as_str()
                .map(|r| format!(" [{r}]"))
                .unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rows() {
        let s = serde_json::json!({"agents": [{"name": "coder-1", "role": "coder", "uid": 61001, "pid": 42,
            "state": "running", "restarts": 0, "uptime_s": 75, "memory_bytes": 3145728, "calls": 3,
            "denials": 1, "last_event": "kv_put /x → allow", "dropped_bytes": 2097152, "dropped_lines": 7}],
            "gateway": {"pid": 7, "state": "running", "restarts": 0, "dropped_bytes": 0, "dropped_lines": 0}});
        let t = table(&s);
        assert!(
            t.contains("coder-1") && t.contains("1m15s") && t.contains("3.0MiB"),
            "{t}"
        );
        assert!(
            t.contains("DROPPED") && t.contains("2.0MiB (7 lines)"),
            "{t}"
        );
        assert!(t.ends_with("restarts 0\n"), "{t}");
        let s = serde_json::json!({"agents": [], "gateway": {"pid": 7, "state": "unresponsive",
            "unanswered_s": 3.2, "restarts": 2, "watchdog": {"restarts": 1}}});
        let t = table(&s);
        assert!(
            t.contains(
                "gateway: pid 7, unresponsive (no answer for 3.2s), restarts 2 (1 by the watchdog)"
            ),
            "{t}"
        );
        assert_eq!(human_bytes(512), "512B");
    }

    #[test]
    fn renders_the_store_and_its_alarms() {
        let s = serde_json::json!({"agents": [], "store": {"data_bytes": 943718, "max_store_bytes": 1048576,
            "audit_bytes": 1024, "audit_max_bytes": 1048576, "map_used_bytes": 2097152, "map_size": 33554432,
            "alarms": [{"quota": "gateway.max_store_bytes", "level": "exceeded", "usage": 943718, "limit": 1048576, "unit": "bytes"},
                       {"quota": "roles.coder.limits.max_keys", "level": "near", "usage": 9, "limit": 10, "unit": "keys", "rule": "p.toml:3: roles.coder.limits.max_keys = 10"}]}});
        let t = table(&s);
        assert!(t.contains("store: data 921.6KiB of 1.0MiB"), "{t}");
        assert!(
            t.contains("ALARM exceeded: gateway.max_store_bytes 921.6KiB of 1.0MiB (89%)"),
            "{t}"
        );
        assert!(
            t.contains("ALARM near: roles.coder.limits.max_keys 9 of 10 keys (90%) [p.toml:3"),
            "{t}"
        );
        let t = table(&serde_json::json!({"agents": [], "store": {"error": "no answer"}}));
        assert!(t.contains("store: unknown (no answer)"), "{t}");
    }
}
