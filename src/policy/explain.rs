//! Renderings for people: `cordon policy explain` and `cordon policy show`.

use std::fmt::Write;

use serde_json::{json, Value};

use super::{Access, Bound, Policy, Role, Verdict};

pub fn explain_text(role: &str, tool: &str, args: &Value, verdict: &Verdict) -> String {
    let mut out = String::new();
    let head = match verdict {
        Verdict::Allow { .. } => "ALLOW",
        Verdict::Deny { .. } => "DENY",
        Verdict::Invalid { .. } => "INVALID",
    };
    let _ = writeln!(out, "{head}: role {role} calls {tool} {args}");
    match verdict {
        Verdict::Allow { rules } => {
            for r in rules {
                let _ = writeln!(out, "  allowed by {r}");
            }
        }
        Verdict::Deny { rule, message } => {
            let _ = writeln!(out, "  {message}");
            let _ = writeln!(out, "  rule: {rule}");
        }
        Verdict::Invalid { message } => {
            let _ = writeln!(
                out,
                "  the gateway would answer with a tool error before deciding keys: {message}"
            );
        }
    }
    out
}

pub fn explain_json(role: &str, tool: &str, args: &Value, verdict: &Verdict) -> Value {
    match verdict {
        Verdict::Allow { rules } => json!({
            "decision": "allow", "role": role, "tool": tool, "args": args,
            "rules": rules.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        }),
        Verdict::Deny { rule, message } => json!({
            "decision": "deny", "role": role, "tool": tool, "args": args,
            "rule": rule.to_json(), "message": message,
        }),
        Verdict::Invalid { message } => json!({
            "decision": "invalid", "role": role, "tool": tool, "args": args, "message": message,
        }),
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn loc(r: &super::Rule) -> String {
    if r.line == 0 {
        "(default)".into()
    } else {
        format!("line {}", r.line)
    }
}

pub fn show_text(policy: &Policy, role: &Role) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "role {} in {} (sha256 {})",
        role.name,
        policy.path.display(),
        &policy.hash[..16]
    );
    if !role.inherits.is_empty() {
        let _ = writeln!(out, "inherits: {}", role.inherits.join(", "));
    }
    let _ = writeln!(out, "\nGATEWAY TOOLS");
    let mut rows = vec![vec![
        "TOOL".into(),
        "DECISION".into(),
        "WHERE".into(),
        "RULE".into(),
    ]];
    for (tool, d) in role.tool_decisions() {
        rows.push(vec![
            tool.name().into(),
            if d.allowed { "allow" } else { "deny" }.into(),
            loc(&d.rule),
            d.rule.text.clone(),
        ]);
    }
    out.push_str(&table(&rows));

    let _ = writeln!(
        out,
        "\nKEYS (a deny beats an allow; anything unlisted is denied)"
    );
    let mut rows = vec![vec![
        "ACCESS".into(),
        "EFFECT".into(),
        "WHERE".into(),
        "RULE".into(),
    ]];
    for access in Access::ALL {
        let (allow, deny) = role.key_rules(access);
        for r in deny {
            rows.push(vec![
                access.name().into(),
                "deny".into(),
                loc(r),
                r.text.clone(),
            ]);
        }
        for r in allow {
            rows.push(vec![
                access.name().into(),
                "allow".into(),
                loc(r),
                r.text.clone(),
            ]);
        }
        if allow.is_empty() && deny.is_empty() {
            rows.push(vec![
                access.name().into(),
                "deny".into(),
                "(default)".into(),
                "no rule: no key".into(),
            ]);
        }
    }
    out.push_str(&table(&rows));

    let _ = writeln!(
        out,
        "\nAGENT TOOLS (Claude Code --allowedTools, besides mcp__cordon__<allowed gateway tools>)"
    );
    if role.agent_tools.is_empty() {
        let _ = writeln!(out, "(none)");
    }
    for (t, r) in &role.agent_tools {
        let _ = writeln!(out, "{t}  ({})", loc(r));
    }

    let _ = writeln!(
        out,
        "\nLIMITS (the smallest along the inheritance chain; unset = the gateway's bound)"
    );
    let l = &role.limits;
    let mut rows = vec![vec!["LIMIT".into(), "VALUE".into(), "WHERE".into()]];
    for (name, b) in [
        ("calls_per_minute", &l.calls_per_minute),
        ("max_value_bytes", &l.max_value_bytes),
        ("max_scan_items", &l.max_scan_items),
        ("max_watch_ms", &l.max_watch_ms),
        ("max_txn_ops", &l.max_txn_ops),
        ("max_store_bytes", &l.max_store_bytes),
        ("max_keys", &l.max_keys),
    ] {
        let (v, w) = match b {
            Some(Bound { max, rule }) => (max.to_string(), loc(rule)),
            None => ("-".into(), "".into()),
        };
        rows.push(vec![name.into(), v, w]);
    }
    out.push_str(&table(&rows));
    out
}
