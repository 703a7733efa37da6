//! What the gateway tells a client about its tools before any call: names,
//! titles, annotations, input and output schemas (`tools/list`), which of them
//! a role may call, and the `instructions` that name the role's key scopes.
//!
//! Schemas stay inside the keywords that JSON Schema draft 7 and 2020-12 read
//! alike (`type`, `properties`, `required`, `additionalProperties`, `items`,
//! `oneOf`, `const`, `enum`, `minimum`, `minItems`, `pattern`) and carry no
//! `$schema` and no `$ref`: MCP reads a schema without `$schema` as 2020-12,
//! and the TypeScript SDK compiles it with Ajv's draft-07 default, which
//! refuses a 2020-12 `$schema` outright.

use std::fmt::Write;
use std::sync::Arc;

use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use serde_json::{json, Value};

use crate::call::{Access, Tool as Kv};
use crate::policy::{Policy, Rule};

const KEY_DOC: &str = "Key path: '/'-separated segments starting with '/', e.g. /projects/p1/tasks/t7 (no empty, '.' or '..' segments; at most 1024 bytes)";
const PREFIX_DOC: &str =
    "Path prefix: '/' for everything, or a key path; '/a' covers '/a' and '/a/...', never '/ab'";

/// Every JSON type, spelled out: a schema without `type` is read as a string
/// by some clients' form builders and function-calling converters.
const ANY_JSON: [&str; 6] = ["object", "array", "string", "number", "boolean", "null"];

/// The tool-error codes the gateway produces today, for the error schema's
/// description.
const ERROR_CODES: &str = "invalid_arguments, invalid_key, not_found, conflict, check_failed, compacted, too_large, denied, rate_limited, unavailable, store_error, no_space";

fn schema(v: Value) -> Arc<JsonObject> {
    match v {
        Value::Object(map) => Arc::new(map),
        // Every schema below is an object literal.
        _ => Arc::new(JsonObject::new()),
    }
}

fn any_json(description: &str) -> Value {
    json!({"type": ANY_JSON, "description": description})
}

/// An object schema that admits exactly these fields, all of them required.
fn exact(properties: Value) -> Value {
    let required: Vec<String> = properties
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

/// `structuredContent` of a tool error (`isError: true`), as `tools::failure`
/// builds it. `code` is a pattern, not an enum, on purpose: the TypeScript SDK
/// validates `structuredContent` even on errors, so a code added later would
/// turn a readable tool error into a client-side exception.
fn error_shape() -> Value {
    json!({
        "type": "object",
        "properties": {"error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[a-z][a-z_]*$",
                    "description": format!("Machine-readable reason: {ERROR_CODES}")},
                "message": {"type": "string"},
                "rule": exact(json!({
                    "file": {"type": "string"},
                    "line": {"type": "integer", "minimum": 0},
                    "text": {"type": "string"},
                })),
            },
            "required": ["code", "message"],
            "additionalProperties": false,
        }},
        "required": ["error"],
        "additionalProperties": false,
    })
}

/// The tool's result on success, or a tool error. The root keeps
/// `type: object`: results before 2026-07-28 must be objects, and rmcp drops
/// an output schema whose root says otherwise for those peers.
fn output(success: Value) -> Arc<JsonObject> {
    schema(json!({"type": "object", "oneOf": [success, error_shape()]}))
}

fn revision() -> Value {
    json!({"type": "integer", "minimum": 1})
}

/// A store revision that is 0 while the store is empty.
fn store_revision() -> Value {
    json!({"type": "integer", "minimum": 0})
}

fn entry() -> Value {
    exact(json!({
        "key": {"type": "string"},
        "value": any_json("The stored JSON value"),
        "revision": revision(),
        "create_revision": revision(),
    }))
}

fn put_outcome(op: bool) -> Value {
    let mut p = json!({
        "key": {"type": "string"},
        "revision": revision(),
        "create_revision": revision(),
        "previous_revision": {"type": ["integer", "null"], "minimum": 1,
            "description": "The key's revision before this put; null when the key was new"},
    });
    if op {
        p["op"] = json!({"const": "put"});
    }
    exact(p)
}

fn delete_outcome(op: bool) -> Value {
    let mut p = json!({
        "key": {"type": "string"},
        "deleted": {"type": "boolean", "description": "false when the key did not exist"},
        "revision": store_revision(),
    });
    if op {
        p["op"] = json!({"const": "delete"});
    }
    exact(p)
}

fn page(field: &str, item: Value) -> Value {
    exact(json!({
        field: {"type": "array", "items": item},
        "next_cursor": {"type": ["string", "null"],
            "description": "Pass as cursor for the next page; null on the last page"},
    }))
}

fn txn_outcome() -> Value {
    let get_found = exact(json!({
        "op": {"const": "get"}, "key": {"type": "string"}, "found": {"const": true}, "entry": entry(),
    }));
    let get_missing = exact(json!({
        "op": {"const": "get"}, "key": {"type": "string"}, "found": {"const": false},
    }));
    exact(json!({
        "revision": store_revision(),
        "results": {"type": "array", "description": "One result per op, in op order",
            "items": {"oneOf": [put_outcome(true), delete_outcome(true), get_found, get_missing]}},
    }))
}

fn watch_result() -> Value {
    let put = exact(json!({
        "revision": revision(), "key": {"type": "string"}, "type": {"const": "put"},
        "value": any_json("The value written"), "create_revision": revision(),
    }));
    let delete = exact(json!({
        "revision": revision(), "key": {"type": "string"}, "type": {"const": "delete"},
    }));
    exact(json!({
        "events": {"type": "array", "items": {"oneOf": [put, delete]}},
        "revision": {"type": "integer", "minimum": 0,
            "description": "Every revision up to this one was looked at: pass it as the next since_revision"},
        "more": {"type": "boolean", "description": "The event cap cut this reply short: watch again at once"},
        "timed_out": {"type": "boolean"},
    }))
}

/// How a tool touches the store, as clients read it from its annotations.
/// `openWorldHint` is false for all: the store is the tool's whole world.
fn annotations(title: &str, kind: Effect) -> ToolAnnotations {
    let a = ToolAnnotations::with_title(title).open_world(false);
    match kind {
        // Reads change nothing, so repeating one changes nothing either.
        // Claude Code runs tools marked read-only in parallel and allows them
        // in plan mode.
        Effect::Read => a.read_only(true).destructive(false).idempotent(true),
        // A put without if_revision leaves the same value, yet each call is a
        // new revision: watchers wake again and another agent's compare-and-swap
        // on the old revision now fails. A retry is not free, so not idempotent.
        Effect::Put => a.read_only(false).destructive(true).idempotent(false),
        // A second delete of the same key finds nothing and commits nothing
        // (no revision, no event), and one with if_revision fails: idempotent.
        Effect::Delete => a.read_only(false).destructive(true).idempotent(true),
        // A transaction may hold puts; see Put.
        Effect::Txn => a.read_only(false).destructive(true).idempotent(false),
    }
}

#[derive(Clone, Copy)]
enum Effect {
    Read,
    Put,
    Delete,
    Txn,
}

/// Every tool the gateway serves, in `call::Tool::ALL` order (the order
/// `tools/list` shows).
pub fn definitions() -> Vec<Tool> {
    let key = json!({"type": "string", "description": KEY_DOC});
    let prefix = json!({"type": "string", "description": PREFIX_DOC});
    let if_revision = json!({"type": "integer", "minimum": 0,
        "description": "Compare-and-swap: only if the key's current revision is this; 0 = only if the key does not exist"});
    let limit = json!({"type": "integer", "minimum": 1, "description": "Most items to return (default 100)"});
    let cursor = json!({"type": "string", "description": "next_cursor from the previous page"});
    let tool =
        |name: &'static str, title: &'static str, effect: Effect, description: &'static str| {
            move |input: Value, success: Value| {
                Tool::new(name, description, schema(input))
                    .with_title(title)
                    .with_annotations(annotations(title, effect))
                    .with_raw_output_schema(output(success))
            }
        };
    let tools = vec![
        tool("kv_get", "Read a key", Effect::Read,
            "Read one key: its JSON value, revision and create revision.")(
            json!({"type": "object", "properties": {"key": key}, "required": ["key"], "additionalProperties": false}),
            entry(),
        ),
        tool("kv_put", "Write a key", Effect::Put,
            "Write a JSON value to a key; returns the new revision. With if_revision it is a compare-and-swap (0 = create only).")(
            json!({"type": "object", "properties": {"key": key, "value": any_json("Any JSON value"), "if_revision": if_revision},
                "required": ["key", "value"], "additionalProperties": false}),
            put_outcome(false),
        ),
        tool("kv_delete", "Delete a key", Effect::Delete,
            "Delete a key (deleted=false when it did not exist). With if_revision only if the key is at that revision.")(
            json!({"type": "object", "properties": {"key": key, "if_revision": if_revision},
                "required": ["key"], "additionalProperties": false}),
            delete_outcome(false),
        ),
        tool("kv_list", "List keys", Effect::Read,
            "List the keys under a prefix (no values), in key order, a page at a time. Only keys you may read are listed.")(
            json!({"type": "object", "properties": {"prefix": prefix, "limit": limit, "cursor": cursor},
                "required": ["prefix"], "additionalProperties": false}),
            page("keys", exact(json!({"key": {"type": "string"}, "revision": revision(), "create_revision": revision()}))),
        ),
        tool("kv_scan", "Read keys with values", Effect::Read,
            "List the entries (keys with values) under a prefix, in key order, a page at a time. Only keys you may read are listed.")(
            json!({"type": "object", "properties": {"prefix": prefix, "limit": limit, "cursor": cursor},
                "required": ["prefix"], "additionalProperties": false}),
            page("entries", entry()),
        ),
        tool("kv_txn", "Transaction (all or nothing)", Effect::Txn,
            "Atomic transaction: if every check holds, apply every op at one revision; otherwise change nothing.")(
            json!({"type": "object", "properties": {
                "checks": {"type": "array", "items": {"type": "object", "properties": {
                    "key": key, "revision": {"type": "integer", "minimum": 0, "description": "Expected revision; 0 = key must not exist"},
                    "value": any_json("Expected JSON value")}, "required": ["key"], "additionalProperties": false}},
                "ops": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                    "op": {"type": "string", "enum": ["put", "delete", "get"]}, "key": key,
                    "value": any_json("JSON value (put only)"), "if_revision": if_revision},
                    "required": ["op", "key"], "additionalProperties": false}}},
                "required": ["ops"], "additionalProperties": false}),
            txn_outcome(),
        ),
        tool("kv_watch", "Watch for changes", Effect::Read,
            "Wait for changes under a prefix after since_revision; returns them in order, or none once timeout_ms passes (timed_out=true). Pass the returned revision as the next since_revision. Use a timeout_ms under 60000 unless your client resets its request timeout on progress: the gateway sends notifications/progress every 15 s while a watch whose request has a progressToken waits.")(
            json!({"type": "object", "properties": {"prefix": prefix, "since_revision": {"type": "integer", "minimum": 0},
                "timeout_ms": {"type": "integer", "minimum": 0, "description": "How long to wait for a change (default 30000)"},
                "limit": {"type": "integer", "minimum": 1, "description": "Most events to return (default 100)"}},
                "required": ["prefix", "since_revision"], "additionalProperties": false}),
            watch_result(),
        ),
    ];
    debug_assert!(tools.iter().map(|t| t.name.as_ref()).eq(Kv::NAMES));
    tools
}

/// The tools `role` may call, in list order; none for a role the policy does
/// not have. `tools/list` and the list-changed check both use it.
pub fn tools_for(policy: &Policy, role: &str) -> Vec<&'static str> {
    match policy.role(role) {
        Some(r) => Kv::ALL
            .into_iter()
            .filter(|t| r.tool_allowed(*t))
            .map(Kv::name)
            .collect(),
        None => Vec::new(),
    }
}

/// Each tool's definition serialised once (at start), beside its name, in
/// list order: `tools/list` is then a concatenation.
pub fn definitions_json() -> Vec<(&'static str, Vec<u8>)> {
    Kv::NAMES
        .into_iter()
        .zip(definitions())
        // A Tool holds only strings, booleans and JSON maps: serialising
        // it cannot fail.
        .filter_map(|(name, t)| Some((name, serde_json::to_vec(&t).ok()?)))
        .collect()
}

/// Most bytes one list of patterns takes in `instructions`; past it the rest
/// are counted. Five lists (three scopes, one line of denials holding up to
/// three) keep the whole text near 4 kB whatever the policy holds.
const MAX_LIST_BYTES: usize = 600;
/// The whole text is never longer than this.
pub const MAX_INSTRUCTIONS_BYTES: usize = 4096;

/// Which tools can exercise an access: a scope no allowed tool can use is
/// not offered to the agent.
fn tools_for_access(access: Access) -> &'static [Kv] {
    match access {
        Access::Read => &[Kv::Get, Kv::List, Kv::Scan, Kv::Watch, Kv::Txn],
        Access::Write => &[Kv::Put, Kv::Txn],
        Access::Delete => &[Kv::Delete, Kv::Txn],
    }
}

/// The pattern of a key rule as the policy wrote it (quoted): the rule text
/// is `roles.<role>.<field> = "<pattern>"`.
fn pattern(rule: &Rule) -> &str {
    rule.text
        .split_once(" = ")
        .map_or(rule.text.as_str(), |(_, p)| p)
}

/// Patterns joined by ", ", each once, in policy order, until `MAX_LIST_BYTES`;
/// then "and N more".
fn pattern_list(rules: &[Arc<Rule>], max: usize) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for r in rules {
        let p = pattern(r);
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    let mut out = String::new();
    let mut shown = 0;
    for p in &seen {
        if out.len() + p.len() + 2 > max {
            break;
        }
        if shown > 0 {
            out.push_str(", ");
        }
        out.push_str(p);
        shown += 1;
    }
    let more = seen.len() - shown;
    if more > 0 {
        let _ = write!(
            out,
            "{}and {more} more pattern{}",
            if shown > 0 { ", " } else { "" },
            if more == 1 { "" } else { "s" }
        );
    }
    out
}

/// The text for `initialize` and `server/discover`: the role and, from the
/// policy after inheritance, the key patterns it may read, write and delete
/// and the denials that override them, so an agent knows its scope before it
/// is refused. Only policy text goes in (role name and patterns), never
/// anything a client sent; at most `MAX_INSTRUCTIONS_BYTES`.
pub fn instructions(policy: &Policy, role: &str) -> String {
    let mut out = format!(
        "You are connected as role {role:?}. The kv_* tools share one JSON key-value store with other agents; keys are '/'-separated paths such as /projects/p1/tasks/t7, and the policy checks every key you touch.\n"
    );
    let Some(r) = policy.role(role) else {
        out.push_str("The policy has no such role: every call is denied.\n");
        return bound(out);
    };
    let mut denials = Vec::new();
    for access in Access::ALL {
        let usable = tools_for_access(access).iter().any(|t| r.tool_allowed(*t));
        let (allow, deny) = r.key_rules(access);
        if !usable || allow.is_empty() {
            let _ = writeln!(out, "You may {} no keys.", access.name());
            continue;
        }
        let _ = writeln!(
            out,
            "You may {} keys matching {}.",
            access.name(),
            pattern_list(allow, MAX_LIST_BYTES)
        );
        if !deny.is_empty() {
            // One line holds all three: each gets a third.
            denials.push(format!(
                "{} {}",
                access.name(),
                pattern_list(deny, MAX_LIST_BYTES / 3)
            ));
        }
    }
    if !denials.is_empty() {
        let _ = writeln!(
            out,
            "Denied even where an allow matches: {}.",
            denials.join("; ")
        );
    }
    out.push_str("In a pattern '*' matches within one segment and '**' any number of segments. Anything not listed is denied; listings and watches show only keys you may read.\n");
    bound(out)
}

/// The lists are bounded already; this is the backstop for the whole text.
fn bound(mut text: String) -> String {
    if text.len() > MAX_INSTRUCTIONS_BYTES {
        let mut end = MAX_INSTRUCTIONS_BYTES - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// A role as the instructions see it; for tests that need the role itself.
#[cfg(test)]
fn role<'p>(policy: &'p Policy, name: &str) -> &'p crate::policy::Role {
    match policy.role(name) {
        Some(r) => r,
        None => panic!("test policy has no role {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy(text: &str) -> Policy {
        Policy::parse(Path::new("test.toml"), text.to_string()).unwrap()
    }

    const APEX: &str = include_str!("../../policies/apex.toml");

    #[test]
    fn names_the_role_and_its_scopes_after_inheritance() {
        let p = policy(
            r#"
[roles.base]
tools = ["kv_get", "kv_put"]
read = ["/shared/**"]
[roles.worker]
inherits = ["base"]
tools = ["kv_delete"]
read = ["/work/*/in/**"]
write = ["/work/*/out/**"]
delete = ["/work/*/in/*"]
deny_read = ["/work/*/in/secret"]
"#,
        );
        let text = instructions(&p, "worker");
        assert!(
            text.starts_with("You are connected as role \"worker\"."),
            "{text}"
        );
        assert!(
            text.contains("You may read keys matching \"/work/*/in/**\", \"/shared/**\"."),
            "{text}"
        );
        assert!(
            text.contains("You may write keys matching \"/work/*/out/**\"."),
            "{text}"
        );
        assert!(
            text.contains("You may delete keys matching \"/work/*/in/*\"."),
            "{text}"
        );
        assert!(
            text.contains("Denied even where an allow matches: read \"/work/*/in/secret\"."),
            "{text}"
        );
        // The parent alone has no write scope and no denials.
        let base = instructions(&p, "base");
        assert!(
            base.contains("You may read keys matching \"/shared/**\"."),
            "{base}"
        );
        assert!(base.contains("You may write no keys."), "{base}");
        assert!(base.contains("You may delete no keys."), "{base}");
        assert!(!base.contains("Denied even"), "{base}");
        let _ = role(&p, "worker");
    }

    #[test]
    fn a_read_only_role_is_told_it_writes_nothing() {
        let p = policy(include_str!("../../policies/readonly.toml"));
        let text = instructions(&p, "observer");
        assert!(
            text.contains("You may read keys matching \"/**\"."),
            "{text}"
        );
        assert!(text.contains("You may write no keys."), "{text}");
        assert!(text.contains("You may delete no keys."), "{text}");
    }

    #[test]
    fn a_scope_without_a_tool_to_use_it_is_not_offered() {
        // The adversary may write reviews but calls neither kv_delete nor
        // kv_txn; it has no delete scope either. A role with a delete scope
        // and no delete tool must not be told it can delete.
        let p = policy(
            r#"
[roles.r]
tools = ["kv_get"]
read = ["/a/**"]
write = ["/a/**"]
delete = ["/a/**"]
"#,
        );
        let text = instructions(&p, "r");
        assert!(
            text.contains("You may read keys matching \"/a/**\"."),
            "{text}"
        );
        assert!(text.contains("You may write no keys."), "{text}");
        assert!(text.contains("You may delete no keys."), "{text}");
        // Positive control: kv_txn alone makes write and delete usable.
        let p = policy("[roles.r]\ntools = [\"kv_txn\"]\nread = [\"/a/**\"]\nwrite = [\"/a/**\"]\ndelete = [\"/a/**\"]\n");
        let text = instructions(&p, "r");
        assert!(
            text.contains("You may write keys matching \"/a/**\"."),
            "{text}"
        );
        assert!(
            text.contains("You may delete keys matching \"/a/**\"."),
            "{text}"
        );
    }

    #[test]
    fn the_shipped_apex_roles() {
        let p = policy(APEX);
        let text = instructions(&p, "adversary");
        assert!(text.contains("role \"adversary\""), "{text}");
        assert!(
            text.contains("You may write keys matching \"/projects/*/reviews/**\", \"/projects/*/issues/**\"."),
            "{text}"
        );
        assert!(text.contains("You may delete no keys."), "{text}");
        assert!(
            !text.lines().skip(1).any(|l| l.contains("tasks")),
            "adversary cannot see tasks: {text}"
        );
    }

    #[test]
    fn a_thousand_rules_stay_bounded_and_are_counted() {
        let mut text = String::from("[roles.big]\ntools = [\"kv_*\"]\n");
        for (field, n) in [("read", 1000), ("write", 1000), ("delete", 1000)] {
            let pats: Vec<String> = (0..n)
                .map(|i| format!("\"/projects/p{i}/{field}/some/longer/path/**\""))
                .collect();
            let _ = writeln!(text, "{field} = [{}]", pats.join(", "));
            let _ = writeln!(text, "deny_{field} = [{}]", pats.join(", "));
        }
        let p = policy(&text);
        let out = instructions(&p, "big");
        assert!(out.len() <= MAX_INSTRUCTIONS_BYTES, "{} bytes", out.len());
        assert!(
            !out.ends_with("..."),
            "the lists alone keep it bounded: {out}"
        );
        // Every list is cut and says how much it left out.
        assert_eq!(out.matches(" more patterns").count(), 6, "{out}");
        let first = "\"/projects/p0/read/some/longer/path/**\", ";
        assert!(out.contains(first), "{out}");
        let shown = out
            .lines()
            .find(|l| l.starts_with("You may read"))
            .map(|l| l.matches("/**\"").count())
            .unwrap_or(0);
        assert!(
            out.contains(&format!("and {} more patterns.", 1000 - shown)),
            "{out}"
        );
    }

    #[test]
    fn one_pattern_longer_than_a_list_is_counted_not_shown() {
        let long = format!("/{}", "a".repeat(MAX_LIST_BYTES));
        let p = policy(&format!(
            "[roles.r]\ntools = [\"kv_get\"]\nread = [\"{long}\", \"/b/**\"]\n"
        ));
        let text = instructions(&p, "r");
        assert!(!text.contains(&long), "{text}");
        assert!(
            text.contains("You may read keys matching and 2 more patterns."),
            "{text}"
        );
    }

    #[test]
    fn duplicate_patterns_from_inheritance_appear_once() {
        let p = policy(
            "[roles.a]\ntools = [\"kv_get\"]\nread = [\"/x/**\"]\n[roles.b]\ninherits = [\"a\"]\nread = [\"/x/**\"]\n",
        );
        let text = instructions(&p, "b");
        assert_eq!(text.matches("\"/x/**\"").count(), 1, "{text}");
    }

    #[test]
    fn an_unknown_role_is_told_it_may_do_nothing() {
        let p = policy(APEX);
        let text = instructions(&p, "nobody");
        assert!(text.contains("role \"nobody\""), "{text}");
        assert!(text.contains("every call is denied"), "{text}");
        assert!(!text.contains("You may read keys"), "{text}");
    }

    #[test]
    fn the_backstop_cuts_on_a_character_boundary() {
        let long = "é".repeat(MAX_INSTRUCTIONS_BYTES);
        let cut = bound(long);
        assert!(cut.len() <= MAX_INSTRUCTIONS_BYTES, "{}", cut.len());
        assert!(cut.ends_with("..."));
        // Control: a short text is left alone.
        assert_eq!(bound("short".into()), "short");
    }

    #[test]
    fn tools_for_keeps_catalog_order_and_only_allowed_tools() {
        let p = policy(APEX);
        let names = |role: &str| tools_for(&p, role);
        assert_eq!(
            names("adversary"),
            ["kv_get", "kv_put", "kv_list", "kv_scan", "kv_watch"]
        );
        assert_eq!(names("supervisor"), Kv::NAMES);
        assert!(names("nobody").is_empty());
    }

    #[test]
    fn every_tool_has_title_annotations_and_an_object_output_schema() {
        for t in definitions() {
            let a = t.annotations.as_ref().unwrap();
            assert!(t.title.is_some(), "{}", t.name);
            assert_eq!(a.title, t.title, "{}", t.name);
            assert_eq!(a.open_world_hint, Some(false), "{}", t.name);
            let read = matches!(&*t.name, "kv_get" | "kv_list" | "kv_scan" | "kv_watch");
            assert_eq!(a.read_only_hint, Some(read), "{}", t.name);
            assert_eq!(a.destructive_hint, Some(!read), "{}", t.name);
            let out = t.output_schema.as_ref().unwrap();
            assert_eq!(out.get("type"), Some(&json!("object")), "{}", t.name);
            assert!(!out.contains_key("$schema"), "{}", t.name);
        }
    }
}
