//! Role policies: which gateway tools a role may call, which keys it may read,
//! write and delete, and its limits. Deny by default; a deny beats an allow
//! wherever each comes from; every decision names the rule that made it.
//!
//! The only module that decides. The gateway asks it three questions per call
//! (may this role call this tool, may it touch these keys within its limits,
//! may it see this key in a listing) and never decides on its own.

mod diag;
pub mod explain;
mod glob;
mod rate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use globset::GlobSet;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use toml::Spanned;

pub use crate::call::Access;
use crate::call::{Request, RequestError, Tool};
pub use diag::{Diagnostic, Severity};
pub use rate::RateLimiter;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render(diagnostics))]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
    #[error("policy change not applied: it cannot be audited ({message})")]
    Unaudited { message: String },
    #[error("policy {path} has no role {role:?}, which agent {agent:?} uses (roles: {known})")]
    MissingRole {
        path: PathBuf,
        agent: String,
        role: String,
        known: String,
    },
}

fn render(diagnostics: &[Diagnostic]) -> String {
    let errors = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let mut out: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
    out.push(format!(
        "{errors} error{} in policy",
        if errors == 1 { "" } else { "s" }
    ));
    out.join("\n")
}

/// Where a decision came from: file, line and the rule as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub file: Arc<str>,
    /// 0 for the implicit default deny.
    pub line: usize,
    pub text: String,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.text)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.text)
        }
    }
}

impl Rule {
    pub fn to_json(&self) -> Value {
        serde_json::json!({"file": &*self.file, "line": self.line, "text": self.text})
    }

    /// The rule as an audit record names it.
    pub fn to_ref(&self) -> crate::audit::RuleRef {
        crate::audit::RuleRef {
            file: self.file.to_string(),
            line: self.line,
            text: self.text.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    pub rule: Arc<Rule>,
}

/// Why a request was refused after its tool was allowed.
#[derive(Debug, Clone)]
pub struct Denial {
    pub kind: DenialKind,
    pub rule: Arc<Rule>,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialKind {
    /// A key outside the role's scopes.
    Scope,
    /// An explicit size or count over the role's limit.
    Limit,
}

impl DenialKind {
    pub fn code(self) -> &'static str {
        match self {
            DenialKind::Scope => "denied",
            DenialKind::Limit => "too_large",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Bound {
    pub max: u64,
    pub rule: Arc<Rule>,
}

/// A role's limits after inheritance: the smallest value wins.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub calls_per_minute: Option<Bound>,
    pub max_value_bytes: Option<Bound>,
    pub max_scan_items: Option<Bound>,
    pub max_watch_ms: Option<Bound>,
    pub max_txn_ops: Option<Bound>,
    /// Bytes (key + value) of the keys this role owns: those it last wrote.
    /// Enforced by the store, which alone knows the usage.
    pub max_store_bytes: Option<Bound>,
    /// Keys this role owns.
    pub max_keys: Option<Bound>,
}

impl Limits {
    /// The store's view of this role's quota (`store::Owner`).
    fn store_limits(&self) -> crate::store::RoleLimits {
        let bound = |b: &Option<Bound>| {
            b.as_ref().map(|b| crate::store::RoleBound {
                max: b.max,
                rule: b.rule.to_string(),
            })
        };
        crate::store::RoleLimits {
            max_bytes: bound(&self.max_store_bytes),
            max_keys: bound(&self.max_keys),
        }
    }
}

struct Scope {
    allow: GlobSet,
    allow_rules: Vec<Arc<Rule>>,
    deny: GlobSet,
    deny_rules: Vec<Arc<Rule>>,
}

impl Scope {
    fn decide(&self, key: &str, default: &Arc<Rule>) -> Decision {
        if self.deny.is_match(key) {
            let i = first_match(&self.deny, key);
            return Decision {
                allowed: false,
                rule: self.deny_rules[i].clone(),
            };
        }
        if self.allow.is_match(key) {
            let i = first_match(&self.allow, key);
            return Decision {
                allowed: true,
                rule: self.allow_rules[i].clone(),
            };
        }
        Decision {
            allowed: false,
            rule: default.clone(),
        }
    }

    fn permits(&self, key: &str) -> bool {
        !self.deny.is_match(key) && self.allow.is_match(key)
    }
}

fn first_match(set: &GlobSet, key: &str) -> usize {
    // Only called after is_match said yes, so there is at least one.
    set.matches(key).into_iter().min().unwrap_or(0)
}

pub struct Role {
    pub name: String,
    pub inherits: Vec<String>,
    /// One decision per tool, in `Tool::ALL` order.
    tools: Vec<Decision>,
    pub agent_tools: Vec<(String, Arc<Rule>)>,
    scopes: [Scope; 3],
    pub limits: Limits,
    /// `limits.max_store_bytes` and `max_keys` as the store checks them,
    /// built once per policy load rather than per write.
    pub store_limits: Arc<crate::store::RoleLimits>,
}

impl Role {
    pub fn tool(&self, tool: Tool) -> &Decision {
        &self.tools[tool.index()]
    }

    pub fn tool_allowed(&self, tool: Tool) -> bool {
        self.tool(tool).allowed
    }

    pub fn key(&self, access: Access, key: &str, default: &Arc<Rule>) -> Decision {
        self.scopes[access.index()].decide(key, default)
    }

    /// The listing filter: may this role see this key exist?
    pub fn can_read(&self, key: &str) -> bool {
        self.scopes[Access::Read.index()].permits(key)
    }

    /// Checks a parsed request against the role's limits and key scopes.
    /// Returns the rules that allowed its keys.
    pub fn check(&self, request: &Request, default: &Arc<Rule>) -> Result<Vec<Arc<Rule>>, Denial> {
        self.check_limits(request)?;
        let mut rules = Vec::new();
        for (access, key) in request.accesses() {
            let d = self.key(access, key.as_str(), default);
            if !d.allowed {
                return Err(Denial {
                    kind: DenialKind::Scope,
                    message: format!(
                        "denied by policy: role {} may not {} {key}",
                        self.name,
                        access.name()
                    ),
                    rule: d.rule,
                });
            }
            if !rules.contains(&d.rule) {
                rules.push(d.rule);
            }
        }
        Ok(rules)
    }

    fn check_limits(&self, request: &Request) -> Result<(), Denial> {
        let over = |bound: &Option<Bound>, what: &str, got: u64| -> Result<(), Denial> {
            match bound {
                Some(b) if got > b.max => Err(Denial {
                    kind: DenialKind::Limit,
                    rule: b.rule.clone(),
                    message: format!(
                        "{what} is {got}; role {} allows at most {}",
                        self.name, b.max
                    ),
                }),
                _ => Ok(()),
            }
        };
        let l = &self.limits;
        match request {
            Request::List { limit, .. } => over(&l.max_scan_items, "limit", limit.unwrap_or(0)),
            Request::Watch {
                timeout_ms, limit, ..
            } => {
                over(&l.max_watch_ms, "timeout_ms", timeout_ms.unwrap_or(0))?;
                over(&l.max_scan_items, "limit", limit.unwrap_or(0))
            }
            Request::Txn(t) => {
                over(
                    &l.max_txn_ops,
                    "checks + ops",
                    (t.checks.len() + t.ops.len()) as u64,
                )?;
                over(
                    &l.max_value_bytes,
                    "value size",
                    request.largest_value() as u64,
                )
            }
            Request::Put(_) => over(
                &l.max_value_bytes,
                "value size",
                request.largest_value() as u64,
            ),
            Request::Get { .. } | Request::Delete(_) => Ok(()),
        }
    }

    /// Every key rule of the role after inheritance, for `policy show`.
    pub fn key_rules(&self, access: Access) -> (&[Arc<Rule>], &[Arc<Rule>]) {
        let s = &self.scopes[access.index()];
        (&s.allow_rules, &s.deny_rules)
    }

    pub fn tool_decisions(&self) -> impl Iterator<Item = (Tool, &Decision)> {
        Tool::ALL.iter().copied().zip(self.tools.iter())
    }
}

pub struct Policy {
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, hex.
    pub hash: String,
    roles: BTreeMap<String, Role>,
    pub warnings: Vec<Diagnostic>,
    pub tests_passed: usize,
    pub default_deny: Arc<Rule>,
}

/// The outcome of evaluating one call the way the gateway would.
#[derive(Debug, Clone)]
pub enum Verdict {
    Allow {
        rules: Vec<Arc<Rule>>,
    },
    Deny {
        rule: Arc<Rule>,
        message: String,
    },
    /// The arguments do not parse: the gateway answers with a tool error
    /// before any key is decided.
    Invalid {
        message: String,
    },
}

impl Verdict {
    pub fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Policy::parse(path, text)
    }

    pub fn parse(path: &Path, text: String) -> Result<Policy, PolicyError> {
        let hash = hex(&Sha256::digest(text.as_bytes()));
        let source = diag::Source::new(path, text);
        let raw: RawPolicy = match toml::from_str(&source.text) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                return Err(PolicyError::Invalid {
                    path: path.to_path_buf(),
                    diagnostics: vec![source.diagnostic(
                        Severity::Error,
                        span,
                        e.message().trim().to_string(),
                    )],
                });
            }
        };
        let mut b = Builder {
            source: &source,
            file: Arc::from(path.display().to_string()),
            diagnostics: Vec::new(),
        };
        let default_deny = Arc::new(Rule {
            file: b.file.clone(),
            line: 0,
            text: "deny by default: no rule allows it".into(),
        });
        let roles = b.build_roles(&raw, &default_deny);
        let mut policy = Policy {
            path: path.to_path_buf(),
            hash,
            roles,
            warnings: Vec::new(),
            tests_passed: 0,
            default_deny,
        };
        if !b.has_errors() {
            b.run_tests(&raw, &mut policy);
        }
        if b.has_errors() {
            return Err(PolicyError::Invalid {
                path: path.to_path_buf(),
                diagnostics: b.diagnostics,
            });
        }
        policy.warnings = b.diagnostics;
        Ok(policy)
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    pub fn roles(&self) -> impl Iterator<Item = &Role> {
        self.roles.values()
    }

    /// The deployment's policy file, checked against its agents' roles.
    pub fn load_for(config: &crate::config::Config) -> Result<Policy, PolicyError> {
        let policy = Policy::load(&config.gateway.policy)?;
        policy.check_agents(
            config
                .agents
                .iter()
                .map(|(name, a)| (name.as_str(), a.role.as_str())),
        )?;
        Ok(policy)
    }

    /// Every agent's role must exist, or the agent could never be served.
    pub fn check_agents<'a>(
        &self,
        agents: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), PolicyError> {
        for (agent, role) in agents {
            if !self.roles.contains_key(role) {
                return Err(PolicyError::MissingRole {
                    path: self.path.clone(),
                    agent: agent.to_string(),
                    role: role.to_string(),
                    known: self.roles.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            }
        }
        Ok(())
    }

    /// The decision sequence of one tool call, in the order the gateway
    /// applies it: the agent's rate (`rate` is asked only when the role has a
    /// `calls_per_minute`, and takes a token, for every call whatever its
    /// tool), the tool (a role that may not call it learns nothing more, and
    /// its arguments are never looked at), the arguments parsed into the typed request, the role's limits, then
    /// every key the request touches. The gateway, `cordon policy explain`,
    /// the policy file's `[[tests]]` and the proptests all decide here.
    pub fn decide(
        &self,
        role: &str,
        tool: &str,
        args: serde_json::Map<String, Value>,
        rate: impl FnOnce(&Bound) -> bool,
    ) -> Result<Allowed<'_>, Refusal> {
        let Some(r) = self.role(role) else {
            return Err(Refusal::NoRole);
        };
        // Every call counts against the rate, whatever it names: a flood of
        // unknown or denied tools is limited like any other.
        if let Some(bound) = &r.limits.calls_per_minute {
            if !rate(bound) {
                return Err(Refusal::Rate(bound.clone()));
            }
        }
        let Some(tool) = Tool::from_name(tool) else {
            return Err(Refusal::UnknownTool);
        };
        let tool_decision = r.tool(tool);
        if !tool_decision.allowed {
            return Err(Refusal::Tool {
                rule: tool_decision.rule.clone(),
            });
        }
        let request = Request::parse(tool, args).map_err(Refusal::Invalid)?;
        let mut rules = match r.check(&request, &self.default_deny) {
            Ok(rules) => rules,
            Err(denial) => return Err(Refusal::Denied(denial, Box::new(request))),
        };
        rules.insert(0, tool_decision.rule.clone());
        Ok(Allowed {
            tool,
            role: r,
            request,
            rules,
        })
    }

    /// Decides a call as the gateway does (without a rate limit), for
    /// `cordon policy explain` and the policy's tests.
    pub fn evaluate(&self, role: &str, tool: &str, args: &Value) -> Verdict {
        let obj = match args {
            Value::Object(m) => m.clone(),
            Value::Null => Default::default(),
            _ => {
                return Verdict::Invalid {
                    message: "arguments must be a JSON object".into(),
                }
            }
        };
        match self.decide(role, tool, obj, |_| true) {
            Ok(allowed) => Verdict::Allow {
                rules: allowed.rules,
            },
            Err(Refusal::Invalid(e)) => Verdict::Invalid {
                message: e.to_string(),
            },
            Err(refusal) => Verdict::Deny {
                rule: refusal.rule().unwrap_or(&self.default_deny).clone(),
                message: refusal.message(role, tool),
            },
        }
    }
}

/// A call the policy allowed: its tool, the typed request the store will
/// execute, the caller's role, and the rules that allowed it (the tool's
/// first, then each key's).
pub struct Allowed<'p> {
    pub tool: Tool,
    pub role: &'p Role,
    pub request: Request,
    pub rules: Vec<Arc<Rule>>,
}

impl Allowed<'_> {
    /// The rule an audit record names: the last that had to allow it.
    pub fn deciding_rule(&self) -> Option<&Arc<Rule>> {
        self.rules.last()
    }
}

/// Why a call was refused before the store, by the stage that refused it.
#[derive(Debug)]
pub enum Refusal {
    /// Not one of the gateway's tools.
    UnknownTool,
    /// The caller's role is not in the policy. Load and reload refuse a
    /// policy that lacks a configured agent's role, so the gateway never sees
    /// this; it refuses rather than serves.
    NoRole,
    /// The role may not call the tool.
    Tool { rule: Arc<Rule> },
    /// Over the agent's `calls_per_minute`.
    Rate(Bound),
    /// The arguments do not parse into a request.
    Invalid(RequestError),
    /// A key outside the role's scopes, or a size or count over its limits;
    /// with the request, whose keys the audit record names.
    Denied(Denial, Box<Request>),
}

impl Refusal {
    /// The rule that refused, where one did (not for an unknown tool or role,
    /// nor for invalid arguments).
    pub fn rule(&self) -> Option<&Arc<Rule>> {
        match self {
            Refusal::Tool { rule } => Some(rule),
            Refusal::Rate(b) => Some(&b.rule),
            Refusal::Denied(d, _) => Some(&d.rule),
            Refusal::UnknownTool | Refusal::NoRole | Refusal::Invalid(_) => None,
        }
    }

    /// What the caller is told, without the rule (callers add it).
    pub fn message(&self, role: &str, tool: &str) -> String {
        match self {
            Refusal::UnknownTool => format!("unknown tool: {tool}"),
            Refusal::NoRole => format!("denied by policy: role {role} is not in the policy"),
            Refusal::Tool { .. } => format!("denied by policy: role {role} may not call {tool}"),
            Refusal::Rate(b) => format!("rate limited: {} calls per minute", b.max),
            Refusal::Invalid(e) => e.to_string(),
            Refusal::Denied(d, _) => d.message.clone(),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

// ---- the file format ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    roles: BTreeMap<Spanned<String>, Spanned<RawRole>>,
    #[serde(default)]
    tests: Vec<Spanned<RawTest>>,
}

type Patterns = Vec<Spanned<String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    inherits: Patterns,
    #[serde(default)]
    tools: Patterns,
    #[serde(default)]
    deny_tools: Patterns,
    #[serde(default)]
    agent_tools: Patterns,
    #[serde(default)]
    read: Patterns,
    #[serde(default)]
    write: Patterns,
    #[serde(default)]
    delete: Patterns,
    #[serde(default)]
    deny_read: Patterns,
    #[serde(default)]
    deny_write: Patterns,
    #[serde(default)]
    deny_delete: Patterns,
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    calls_per_minute: Option<Spanned<u64>>,
    max_value_bytes: Option<Spanned<u64>>,
    max_scan_items: Option<Spanned<u64>>,
    max_watch_ms: Option<Spanned<u64>>,
    max_txn_ops: Option<Spanned<u64>>,
    max_store_bytes: Option<Spanned<u64>>,
    max_keys: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    #[allow(dead_code)]
    name: Option<String>,
    role: Spanned<String>,
    tool: Spanned<String>,
    #[serde(default)]
    args: Option<toml::Value>,
    expect: Spanned<String>,
}

struct Builder<'a> {
    source: &'a diag::Source,
    file: Arc<str>,
    diagnostics: Vec<Diagnostic>,
}

impl Builder<'_> {
    fn error(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        self.diagnostics
            .push(self.source.diagnostic(Severity::Error, span, message));
    }

    fn warn(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        self.diagnostics
            .push(self.source.diagnostic(Severity::Warning, span, message));
    }

    fn has_errors(&self) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    }

    fn rule(&self, span: &std::ops::Range<usize>, text: String) -> Arc<Rule> {
        Arc::new(Rule {
            file: self.file.clone(),
            line: self.source.line_of(span.start),
            text,
        })
    }

    /// The role and its ancestors, each once, the role first. Reports unknown
    /// parents and cycles at the `inherits` entry that causes them.
    fn lineage<'r>(
        &mut self,
        name: &'r str,
        roles: &'r BTreeMap<Spanned<String>, Spanned<RawRole>>,
    ) -> Vec<&'r str> {
        let by_name: BTreeMap<&str, &RawRole> = roles
            .iter()
            .map(|(k, v)| (k.get_ref().as_str(), v.get_ref()))
            .collect();
        let mut out = Vec::new();
        let mut stack = vec![name];
        self.walk(name, &by_name, &mut stack, &mut out);
        out
    }

    fn walk<'r>(
        &mut self,
        name: &'r str,
        by_name: &BTreeMap<&'r str, &'r RawRole>,
        stack: &mut Vec<&'r str>,
        out: &mut Vec<&'r str>,
    ) {
        if out.contains(&name) {
            return;
        }
        out.push(name);
        let Some(role) = by_name.get(name) else {
            return;
        };
        for parent in &role.inherits {
            let p = parent.get_ref().as_str();
            if stack.contains(&p) {
                let cycle: Vec<&str> = stack.iter().copied().chain([p]).collect();
                self.error(
                    parent.span(),
                    format!("inheritance cycle: {}", cycle.join(" -> ")),
                );
                continue;
            }
            let Some((k, _)) = by_name.get_key_value(p) else {
                self.error(
                    parent.span(),
                    format!(
                        "role {name:?} inherits unknown role {p:?} (roles: {})",
                        by_name.keys().copied().collect::<Vec<_>>().join(", ")
                    ),
                );
                continue;
            };
            stack.push(k);
            self.walk(k, by_name, stack, out);
            stack.pop();
        }
    }

    fn build_roles(&mut self, raw: &RawPolicy, default_deny: &Arc<Rule>) -> BTreeMap<String, Role> {
        // Validate every pattern once, where it is written.
        for (name, role) in &raw.roles {
            let n = name.get_ref();
            if n.is_empty()
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                self.error(
                    name.span(),
                    format!("role name {n:?}: use letters, digits, '-' or '_'"),
                );
            }
            let r = role.get_ref();
            for p in r.tools.iter().chain(&r.deny_tools) {
                self.check_tool_pattern(p);
            }
            for p in r
                .read
                .iter()
                .chain(&r.write)
                .chain(&r.delete)
                .chain(&r.deny_read)
                .chain(&r.deny_write)
                .chain(&r.deny_delete)
            {
                if let Err(m) = glob::validate_key_glob(p.get_ref()) {
                    self.error(p.span(), m);
                }
            }
            for t in &r.agent_tools {
                let s = t.get_ref();
                if s.trim().is_empty() {
                    self.error(t.span(), "empty agent tool rule");
                } else if s.starts_with("mcp__cordon") {
                    self.warn(t.span(), format!("agent tool {s:?} is derived from `tools` by the orchestrator; list gateway tools in `tools` instead"));
                }
            }
            if let Some(l) = &r.limits {
                for (field, v) in [
                    ("calls_per_minute", &l.calls_per_minute),
                    ("max_value_bytes", &l.max_value_bytes),
                    ("max_scan_items", &l.max_scan_items),
                    ("max_watch_ms", &l.max_watch_ms),
                    ("max_txn_ops", &l.max_txn_ops),
                    ("max_store_bytes", &l.max_store_bytes),
                    ("max_keys", &l.max_keys),
                ] {
                    if let Some(v) = v {
                        if *v.get_ref() == 0 && field != "max_watch_ms" {
                            self.error(v.span(), format!("limits.{field} = 0 would refuse every call that uses it; remove the tool instead"));
                        }
                    }
                }
            }
        }

        let mut roles = BTreeMap::new();
        for (name, role) in &raw.roles {
            let n = name.get_ref().as_str();
            let lineage = self.lineage(n, &raw.roles);
            let members: Vec<(&str, &RawRole)> = lineage
                .iter()
                .filter_map(|m| {
                    raw.roles
                        .iter()
                        .find(|(k, _)| k.get_ref() == m)
                        .map(|(k, v)| (k.get_ref().as_str(), v.get_ref()))
                })
                .collect();
            let built = self.build_role(n, &members, default_deny);
            if !built.tools.iter().any(|d| d.allowed) {
                self.error(
                    name.span(),
                    format!("role {n:?} grants nothing: no gateway tool is allowed (add `tools = [...]`)"),
                );
            }
            let r = role.get_ref();
            let reads = members.iter().any(|(_, m)| !m.read.is_empty());
            if !reads {
                if let Some(w) = r.write.first().or(r.delete.first()) {
                    self.warn(
                        w.span(),
                        format!(
                            "role {n:?} may write or delete keys it may not read (no `read` scope)"
                        ),
                    );
                }
            }
            roles.insert(n.to_string(), built);
        }
        roles
    }

    fn check_tool_pattern(&mut self, p: &Spanned<String>) {
        match glob::tool_glob(p.get_ref()) {
            Ok(m) => {
                if !Tool::NAMES.iter().any(|t| m.is_match(t)) {
                    self.error(
                        p.span(),
                        format!(
                            "tool pattern {:?} matches no gateway tool (tools: {})",
                            p.get_ref(),
                            Tool::NAMES.join(", ")
                        ),
                    );
                }
            }
            Err(m) => self.error(p.span(), m),
        }
    }

    fn build_role(
        &mut self,
        name: &str,
        members: &[(&str, &RawRole)],
        default_deny: &Arc<Rule>,
    ) -> Role {
        let text = |role: &str, field: &str, p: &str| format!("roles.{role}.{field} = {p:?}");

        let mut tools = Vec::with_capacity(Tool::ALL.len());
        for tool in Tool::NAMES {
            let mut decision = Decision {
                allowed: false,
                rule: default_deny.clone(),
            };
            let mut denied = false;
            for (role, raw) in members {
                for p in &raw.deny_tools {
                    if !denied && glob::tool_glob(p.get_ref()).is_ok_and(|m| m.is_match(tool)) {
                        decision = Decision {
                            allowed: false,
                            rule: self.rule(&p.span(), text(role, "deny_tools", p.get_ref())),
                        };
                        denied = true;
                    }
                }
            }
            if !denied {
                'found: for (role, raw) in members {
                    for p in &raw.tools {
                        if glob::tool_glob(p.get_ref()).is_ok_and(|m| m.is_match(tool)) {
                            decision = Decision {
                                allowed: true,
                                rule: self.rule(&p.span(), text(role, "tools", p.get_ref())),
                            };
                            break 'found;
                        }
                    }
                }
            }
            tools.push(decision);
        }

        let scope = |b: &mut Self,
                     allow: fn(&RawRole) -> &Patterns,
                     deny: fn(&RawRole) -> &Patterns,
                     access: &str| {
            let mut allow_rules = Vec::new();
            let mut allow_pats = Vec::new();
            let mut deny_rules = Vec::new();
            let mut deny_pats = Vec::new();
            for (role, raw) in members {
                for p in allow(raw) {
                    if glob::validate_key_glob(p.get_ref()).is_ok() {
                        allow_pats.push(p.get_ref().clone());
                        allow_rules.push(b.rule(&p.span(), text(role, access, p.get_ref())));
                    }
                }
                for p in deny(raw) {
                    if glob::validate_key_glob(p.get_ref()).is_ok() {
                        deny_pats.push(p.get_ref().clone());
                        deny_rules.push(b.rule(
                            &p.span(),
                            text(role, &format!("deny_{access}"), p.get_ref()),
                        ));
                    }
                }
            }
            // Patterns were validated above, so compiling cannot fail; an empty
            // set (which matches nothing) is the fail-closed fallback.
            Scope {
                allow: glob::compile(allow_pats.iter().map(String::as_str))
                    .unwrap_or_else(|_| GlobSet::empty()),
                allow_rules,
                deny: glob::compile(deny_pats.iter().map(String::as_str))
                    .unwrap_or_else(|_| GlobSet::empty()),
                deny_rules,
            }
        };
        let scopes = [
            scope(self, |r| &r.read, |r| &r.deny_read, "read"),
            scope(self, |r| &r.write, |r| &r.deny_write, "write"),
            scope(self, |r| &r.delete, |r| &r.deny_delete, "delete"),
        ];

        let mut agent_tools: Vec<(String, Arc<Rule>)> = Vec::new();
        for (role, raw) in members {
            for t in &raw.agent_tools {
                if !agent_tools.iter().any(|(s, _)| s == t.get_ref()) {
                    agent_tools.push((
                        t.get_ref().clone(),
                        self.rule(&t.span(), text(role, "agent_tools", t.get_ref())),
                    ));
                }
            }
        }

        let mut limits = Limits::default();
        for (role, raw) in members {
            let Some(l) = &raw.limits else { continue };
            for (slot, field, v) in [
                (
                    &mut limits.calls_per_minute,
                    "calls_per_minute",
                    &l.calls_per_minute,
                ),
                (
                    &mut limits.max_value_bytes,
                    "max_value_bytes",
                    &l.max_value_bytes,
                ),
                (
                    &mut limits.max_scan_items,
                    "max_scan_items",
                    &l.max_scan_items,
                ),
                (&mut limits.max_watch_ms, "max_watch_ms", &l.max_watch_ms),
                (&mut limits.max_txn_ops, "max_txn_ops", &l.max_txn_ops),
                (
                    &mut limits.max_store_bytes,
                    "max_store_bytes",
                    &l.max_store_bytes,
                ),
                (&mut limits.max_keys, "max_keys", &l.max_keys),
            ] {
                let Some(v) = v else { continue };
                let value = *v.get_ref();
                if slot.as_ref().is_none_or(|b| value < b.max) {
                    *slot = Some(Bound {
                        max: value,
                        rule: self
                            .rule(&v.span(), format!("roles.{role}.limits.{field} = {value}")),
                    });
                }
            }
        }

        Role {
            name: name.to_string(),
            inherits: members.iter().skip(1).map(|(n, _)| n.to_string()).collect(),
            tools,
            agent_tools,
            scopes,
            store_limits: Arc::new(limits.store_limits()),
            limits,
        }
    }

    fn run_tests(&mut self, raw: &RawPolicy, policy: &mut Policy) {
        for t in &raw.tests {
            let test = t.get_ref();
            let expect = match test.expect.get_ref().as_str() {
                "allow" => true,
                "deny" => false,
                other => {
                    self.error(
                        test.expect.span(),
                        format!("expect = {other:?}: use \"allow\" or \"deny\""),
                    );
                    continue;
                }
            };
            let role = test.role.get_ref();
            if policy.role(role).is_none() {
                self.error(
                    test.role.span(),
                    format!("test names unknown role {role:?}"),
                );
                continue;
            }
            let tool = test.tool.get_ref();
            if Tool::from_name(tool).is_none() {
                self.error(
                    test.tool.span(),
                    format!(
                        "test names unknown tool {tool:?} (tools: {})",
                        Tool::NAMES.join(", ")
                    ),
                );
                continue;
            }
            let args = match &test.args {
                Some(v) => serde_json::to_value(v).unwrap_or(Value::Null),
                None => Value::Object(Default::default()),
            };
            match policy.evaluate(role, tool, &args) {
                Verdict::Invalid { message } => {
                    self.error(t.span(), format!("test arguments are invalid: {message}"));
                }
                Verdict::Allow { rules } if !expect => {
                    let by = rules.last().map(|r| r.to_string()).unwrap_or_default();
                    self.error(
                        t.span(),
                        format!(
                            "test failed: expected deny, but {tool} by {role} is allowed by {by}"
                        ),
                    );
                }
                Verdict::Deny { rule, message } if expect => {
                    self.error(
                        t.span(),
                        format!("test failed: expected allow, but {message} ({rule})"),
                    );
                }
                _ => policy.tests_passed += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests;
