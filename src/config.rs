//! The deployment config (`configs/*.toml`): where the gateway keeps its store and
//! sockets, its bounds, and the agents it serves.
//!
//! Unknown fields are errors: a misspelt bound that silently falls back to a
//! default is how a deployment ends up less confined than its operator thinks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

pub use crate::units::ByteSize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub logs: LogsConfig,
    #[serde(default)]
    pub agents: BTreeMap<String, AgentConfig>,
    /// The file this was read from; relative paths in it are resolved against
    /// its directory.
    #[serde(skip)]
    pub path: PathBuf,
}

fn default_map_size() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_max_message() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_max_value() -> ByteSize {
    ByteSize(256 << 10)
}
fn default_max_connections() -> usize {
    16
}
fn default_max_txn_ops() -> usize {
    128
}
fn default_max_list() -> usize {
    1000
}
fn default_max_watch_ms() -> u64 {
    300_000
}
fn default_history() -> u64 {
    100_000
}
fn default_grace_ms() -> u64 {
    10_000
}
fn default_watchdog_interval_ms() -> u64 {
    1000
}
fn default_watchdog_timeout_ms() -> u64 {
    5000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// LMDB environment directory; created 0700 if missing.
    pub store: PathBuf,
    /// Sockets live under here: `agents/<name>/mcp.sock`, `admin.sock`.
    pub runtime_dir: PathBuf,
    /// The role policy (TOML). Required: there is no implicit allow-all.
    pub policy: PathBuf,
    #[serde(default = "default_map_size")]
    pub map_size: ByteSize,
    /// Largest JSON-RPC message (one line) a client may send.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: ByteSize,
    /// Largest value (as compact JSON) `kv_put` accepts.
    #[serde(default = "default_max_value")]
    pub max_value_bytes: ByteSize,
    /// Simultaneous connections on one agent's socket.
    #[serde(default = "default_max_connections")]
    pub max_connections_per_agent: usize,
    /// Checks plus operations in one `kv_txn`.
    #[serde(default = "default_max_txn_ops")]
    pub max_txn_ops: usize,
    /// Largest `limit` of `kv_list` / `kv_scan`.
    #[serde(default = "default_max_list")]
    pub max_list_limit: usize,
    /// Longest `timeout_ms` of `kv_watch`.
    #[serde(default = "default_max_watch_ms")]
    pub max_watch_ms: u64,
    /// Revisions of change history kept for `kv_watch`.
    #[serde(default = "default_history")]
    pub watch_history: u64,
    /// How long shutdown waits for in-flight calls before closing connections.
    #[serde(default = "default_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Under `cordon up`: how often the orchestrator asks the gateway's admin
    /// socket a `ping` (it touches nothing but the socket).
    #[serde(default = "default_watchdog_interval_ms")]
    pub watchdog_interval_ms: u64,
    /// Under `cordon up`: a gateway that has answered no ping for this long
    /// is killed (SIGKILL) and restarted. 0 disables the watchdog.
    #[serde(default = "default_watchdog_timeout_ms")]
    pub watchdog_timeout_ms: u64,
    /// How often a waiting `kv_watch` whose request has a progress token gets
    /// `notifications/progress`, so that clients which reset their request
    /// timeout on progress (the TypeScript SDK's default is 60 s) keep it.
    #[serde(default = "default_progress_ms")]
    pub watch_progress_ms: u64,
    /// Backpressure: replies one connection may have in the making or
    /// waiting to be written; past it, nothing more is read from it.
    #[serde(default = "default_max_pending")]
    pub max_pending_replies: usize,
    /// Backpressure: bytes of replies one connection may leave unread; past
    /// it, nothing more is read from it until the peer reads.
    #[serde(default = "default_max_unsent")]
    pub max_unsent_bytes: ByteSize,
    /// Messages per second one agent may send over all its connections, of
    /// any kind (calls, `ping`, `tools/list`, malformed lines); past it, its
    /// connections are read more slowly. The burst is one second's.
    #[serde(default = "default_messages_per_second")]
    pub max_messages_per_second: u64,
    /// The data quota: keys, values and their watch history, in LMDB pages.
    /// Past it writes fail with `quota_exceeded`; reads and deletes go on.
    /// Default: 60% of map_size (see `Config::space`).
    pub max_store_bytes: Option<ByteSize>,
    /// The part of the data the watch history may take before its oldest
    /// revisions are compacted. Default: a quarter of max_store_bytes.
    pub watch_history_bytes: Option<ByteSize>,
}

/// The smallest map: the default layout (60% data, 20% audit, 20%
/// headroom) needs 4 commit batches of at least 1 MiB of headroom.
pub const MIN_MAP_SIZE: u64 = 32 << 20;

/// How the map is shared (`Config::space`): every figure in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub map_size: u64,
    pub max_store_bytes: u64,
    pub watch_history_bytes: u64,
    /// None when the audit is off.
    pub audit_max_bytes: Option<u64>,
    /// Bytes of values one commit batch takes.
    pub batch_bytes: u64,
    /// What is left for deletes, compaction, pruning and pinned pages.
    pub headroom: u64,
    /// The least headroom accepted.
    pub min_headroom: u64,
}

fn default_progress_ms() -> u64 {
    15_000
}
fn default_max_pending() -> usize {
    32
}
fn default_max_unsent() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_messages_per_second() -> u64 {
    1000
}
fn default_refusal_records() -> u64 {
    120
}
fn default_summary_interval() -> Span {
    Span(std::time::Duration::from_secs(10))
}

/// A duration written as a string such as `"1s"`, `"500ms"`, `"30d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub std::time::Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Span).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration ({e}); try \"1s\", \"500ms\" or \"30d\""
            ))
        })
    }
}

fn default_true() -> bool {
    true
}
fn default_journal_reserve() -> ByteSize {
    ByteSize(crate::store::DEFAULT_JOURNAL_RESERVE)
}
fn default_sync_interval() -> Span {
    Span(std::time::Duration::from_secs(1))
}

/// `[audit]`: the tamper-evident log of every call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Off only for benchmarks: a gateway without audit answers no auditor.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Keep the values written by kv_put / kv_txn in the records (default: only
    /// their size and SHA-256).
    #[serde(default)]
    pub record_values: bool,
    /// Longest time a read's or a denial's record waits for its fsync.
    #[serde(default = "default_sync_interval")]
    pub sync_interval: Span,
    /// Retention: keep at most this many records.
    pub max_records: Option<u64>,
    /// Retention: drop records older than this.
    pub max_age: Option<Span>,
    /// Refusals (denied, unknown, malformed or rate-limited calls, refused
    /// connections) recorded one by one per agent per minute; past it they
    /// are counted into one `refusals` record per agent per
    /// `summary_interval`.
    #[serde(default = "default_refusal_records")]
    pub refusal_records_per_minute: u64,
    #[serde(default = "default_summary_interval")]
    pub summary_interval: Span,
    /// Space the audit journal preallocates (twice: the segment it writes and
    /// a spare) so that reads and denials keep being audited, and served,
    /// while the disk is full: at least this many bytes of records (~470
    /// bytes each). Writes are refused with `no_space` while less than this
    /// is free. "0" turns the reserve off.
    #[serde(default = "default_journal_reserve")]
    pub journal_reserve: ByteSize,
    /// Retention by size, always on: past this many bytes of LMDB pages, the
    /// oldest records are pruned behind a checkpoint. Default: 20% of
    /// gateway.map_size.
    pub max_bytes: Option<ByteSize>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            record_values: false,
            sync_interval: default_sync_interval(),
            max_records: None,
            max_age: None,
            refusal_records_per_minute: default_refusal_records(),
            summary_interval: default_summary_interval(),
            journal_reserve: default_journal_reserve(),
            max_bytes: None,
        }
    }
}

fn default_log_file() -> ByteSize {
    ByteSize(16 << 20)
}
fn default_log_keep() -> u32 {
    3
}
fn default_log_rate() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_log_burst() -> ByteSize {
    ByteSize(4 << 20)
}

/// `[logs]`: the bounds of what `cordon up` keeps of each agent's stderr
/// (`stderr.log`) and stdout (`events.jsonl`) and of the gateway's stderr
/// (`gateway.log`); each such stream is bounded on its own.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// A log file is rotated (`x.log` → `x.log.1` → …) before it would grow past this.
    #[serde(default = "default_log_file")]
    pub max_file_bytes: ByteSize,
    /// Files kept per log, the live one included: at most `keep * max_file_bytes` on disk.
    #[serde(default = "default_log_keep")]
    pub keep: u32,
    /// Bytes per second written per stream; past it (and its burst) output is
    /// dropped, counted and marked with one line when writing resumes.
    #[serde(default = "default_log_rate")]
    pub rate_per_second: ByteSize,
    /// Bytes written at once above the rate (a token bucket of this size).
    #[serde(default = "default_log_burst")]
    pub burst: ByteSize,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            max_file_bytes: default_log_file(),
            keep: default_log_keep(),
            rate_per_second: default_log_rate(),
            burst: default_log_burst(),
        }
    }
}

/// Smallest `logs.max_file_bytes` (a marker line must fit in a file).
pub const MIN_LOG_FILE: u64 = 4096;
/// Most files kept per log.
pub const MAX_LOG_KEEP: u32 = 100;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub role: String,
    /// The only uid allowed to connect to this agent's socket. Unset: the uid the
    /// sandbox profile gives the agent (`user = "auto"` under root), else the
    /// uid the gateway runs as.
    pub uid: Option<u32>,
    /// The agent's sandbox profile: a file (relative to this config) or an inline table.
    pub sandbox: Option<crate::sandbox::profile::ProfileSource>,
    /// What `cordon up` runs (see `orchestrator::spec`): an argv list or one
    /// string split on whitespace; placeholders such as `{prompt}`, `{socket}`.
    pub command: Option<CommandTemplate>,
    /// `claude` (Claude Code: cordon adds --mcp-config, --strict-mcp-config and
    /// --allowedTools) or `command`; default: `claude` when the program is named so.
    pub kind: Option<AgentKind>,
    /// The task, for `{prompt}`.
    pub prompt: Option<String>,
    /// The task read from a file (relative to this config), for `{prompt}`.
    pub prompt_file: Option<PathBuf>,
    /// Working directory (relative to this config); default
    /// `<runtime_dir>/up/<name>/work`.
    pub workdir: Option<PathBuf>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// First restart delay; doubles on each restart up to `max_backoff`.
    pub backoff: Option<Span>,
    pub max_backoff: Option<Span>,
    /// Give up (state `failed`) after this many restarts within `restart_window`.
    pub max_restarts: Option<u32>,
    pub restart_window: Option<Span>,
    /// How long a stopping agent gets between SIGTERM and SIGKILL.
    pub stop_grace: Option<Span>,
    /// Extra environment of the agent (on top of its profile's `env`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Replicas: `count = 2` runs `<name>-1` and `<name>-2`, each its own agent
    /// (socket, uid, audit identity).
    pub count: Option<u32>,
    /// For a replica: the `[agents.<name>]` it was made from.
    #[serde(skip)]
    pub replica_of: Option<String>,
}

/// An agent's command: `["claude", "-p", "{prompt}"]` or `"claude -p {prompt}"`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum CommandTemplate {
    Argv(Vec<String>),
    Line(String),
}

impl CommandTemplate {
    pub fn argv(&self) -> Vec<String> {
        match self {
            CommandTemplate::Argv(v) => v.clone(),
            CommandTemplate::Line(s) => s.split_whitespace().map(String::from).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AgentKind {
    Claude,
    Command,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Any exit is final.
    Never,
    /// Restart after a failure; a clean exit (status 0) is final.
    #[default]
    OnFailure,
    /// Restart after every exit.
    Always,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.path = path.to_path_buf();
        // Absolute paths, so that socket paths handed to agents and printed in
        // logs do not depend on anyone's working directory.
        let abs = std::path::absolute(path).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: format!("cannot resolve the config's directory: {e}"),
        })?;
        let base = abs.parent().unwrap_or(Path::new("/"));
        config.gateway.store = normalize(&base.join(&config.gateway.store));
        config.gateway.runtime_dir = normalize(&base.join(&config.gateway.runtime_dir));
        config.gateway.policy = normalize(&base.join(&config.gateway.policy));
        for (name, agent) in &mut config.agents {
            if let Some(sandbox) = &mut agent.sandbox {
                sandbox.resolve(base).map_err(|e| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: format!("agents.{name}.sandbox: {e}"),
                })?;
            }
            if let Some(w) = &mut agent.workdir {
                *w = normalize(&base.join(&*w));
            }
            if let Some(file) = agent.prompt_file.take() {
                let file = normalize(&base.join(file));
                if agent.prompt.is_some() {
                    return Err(ConfigError::Invalid {
                        path: path.to_path_buf(),
                        message: format!("agents.{name}: give prompt or prompt_file, not both"),
                    });
                }
                agent.prompt =
                    Some(
                        std::fs::read_to_string(&file).map_err(|e| ConfigError::Invalid {
                            path: path.to_path_buf(),
                            message: format!("agents.{name}.prompt_file {}: {e}", file.display()),
                        })?,
                    );
                agent.prompt_file = Some(file);
            }
        }
        config.expand_replicas()?;
        config.assign_profile_uids()?;
        config.validate()?;
        Ok(config)
    }

    /// `count = N` becomes N agents `<name>-1` … `<name>-N`: each replica has
    /// its own socket and identity, so the audit and the policy's rate limits
    /// tell them apart.
    fn expand_replicas(&mut self) -> Result<(), ConfigError> {
        let mut out = BTreeMap::new();
        for (name, agent) in std::mem::take(&mut self.agents) {
            match agent.count {
                None | Some(1) => {
                    if out.insert(name.clone(), agent).is_some() {
                        return Err(self.invalid(format!(
                            "agent name {name:?} is used twice (a replica of another agent has it)"
                        )));
                    }
                }
                Some(0) => {
                    return Err(self.invalid(format!("agents.{name}.count must be at least 1")))
                }
                Some(n) => {
                    for i in 1..=n {
                        let mut replica = agent.clone();
                        replica.count = None;
                        replica.replica_of = Some(name.clone());
                        let rname = format!("{name}-{i}");
                        if out.insert(rname.clone(), replica).is_some() {
                            return Err(self.invalid(format!(
                                "agent name {rname:?} is used twice (a replica of {name:?} has it)"
                            )));
                        }
                    }
                }
            }
        }
        self.agents = out;
        Ok(())
    }

    /// Under root, an agent whose profile says `user = "auto"` runs as
    /// `uid_range[0] + <its index in the deployment>`; the gateway must expect
    /// that uid on its socket, and `cordon up` builds the same plan
    /// (`sandbox::plan::PlanInput::uid_index` = this index).
    fn assign_profile_uids(&mut self) -> Result<(), ConfigError> {
        if !rustix::process::geteuid().is_root() {
            return Ok(());
        }
        let mut too_many = None;
        for (index, (name, agent)) in self.agents.iter_mut().enumerate() {
            if agent.uid.is_some() {
                continue;
            }
            let Some(profile) = agent.sandbox.as_ref().and_then(|s| s.profile()) else {
                continue;
            };
            if profile.user == crate::sandbox::profile::UserSpec::Auto {
                let [lo, hi] = profile
                    .uid_range
                    .unwrap_or(crate::sandbox::profile::DEPLOYMENT_UID_RANGE);
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                // Agents never share a uid: past the range is an error (as in
                // sandbox::plan), never a wrap-around.
                match lo.checked_add(index).filter(|uid| *uid <= hi) {
                    Some(uid) => agent.uid = Some(uid),
                    None => too_many = Some((name.clone(), lo, hi)),
                }
            }
        }
        if let Some((name, lo, hi)) = too_many {
            return Err(self.invalid(format!(
                "agent {name:?} has no uid of its own in uid_range [{lo}, {hi}]; widen the profile's uid_range (agents never share a uid)"
            )));
        }
        distinct_uids(self.agents.iter().map(|(n, a)| (n.as_str(), a.uid)))
            .map_err(|m| self.invalid(m))
    }

    /// The index `assign_profile_uids` used for an agent.
    pub fn agent_index(&self, name: &str) -> u32 {
        let i = self.agents.keys().position(|k| k == name).unwrap_or(0);
        u32::try_from(i).unwrap_or(u32::MAX)
    }

    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            message,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, agent) in &self.agents {
            validate_agent_name(name).map_err(|m| self.invalid(m))?;
            if agent.role.trim().is_empty() {
                return Err(self.invalid(format!("agent {name:?} has an empty role")));
            }
        }
        let g = &self.gateway;
        if g.map_size.0 < MIN_MAP_SIZE {
            return Err(self.invalid(format!(
                "gateway.map_size is {}; it must be at least {} (data, audit and headroom share it; it is address space, the file grows only as it is used)",
                human(g.map_size.0),
                human(MIN_MAP_SIZE)
            )));
        }
        if g.max_message_bytes.0 < 4096 {
            return Err(self.invalid(
                "gateway.max_message_bytes must be at least 4096 (initialize alone needs ~1 KiB)"
                    .into(),
            ));
        }
        if g.max_value_bytes.0 >= g.max_message_bytes.0 {
            return Err(self.invalid(format!(
                "gateway.max_value_bytes ({}) must be below gateway.max_message_bytes ({}): a value travels inside a message",
                g.max_value_bytes, g.max_message_bytes
            )));
        }
        for (field, v) in [
            ("max_connections_per_agent", g.max_connections_per_agent),
            ("max_txn_ops", g.max_txn_ops),
            ("max_list_limit", g.max_list_limit),
            ("max_pending_replies", g.max_pending_replies),
            (
                "max_messages_per_second",
                g.max_messages_per_second as usize,
            ),
        ] {
            if v == 0 {
                return Err(self.invalid(format!("gateway.{field} must be at least 1")));
            }
        }
        if g.max_pending_replies > crate::gateway::MAX_CALLS_PER_CONNECTION {
            return Err(self.invalid(format!(
                "gateway.max_pending_replies is {}; it can be at most {} (the calls one connection may have in flight)",
                g.max_pending_replies,
                crate::gateway::MAX_CALLS_PER_CONNECTION
            )));
        }
        if g.max_unsent_bytes.0 < 4096 {
            return Err(self.invalid(format!(
                "gateway.max_unsent_bytes is {}; it must be at least 4KiB",
                g.max_unsent_bytes
            )));
        }
        if self.audit.summary_interval.0.is_zero() {
            return Err(self.invalid("audit.summary_interval must be above zero".into()));
        }
        if self.audit.sync_interval.0.is_zero() {
            return Err(self.invalid("audit.sync_interval must be above zero".into()));
        }
        if self.audit.max_records == Some(0) {
            return Err(self.invalid("audit.max_records must be at least 1".into()));
        }
        let l = &self.logs;
        if l.max_file_bytes.0 < MIN_LOG_FILE {
            return Err(self.invalid(format!(
                "logs.max_file_bytes is {}; it must be at least {MIN_LOG_FILE} bytes",
                l.max_file_bytes
            )));
        }
        if l.keep == 0 || l.keep > MAX_LOG_KEEP {
            return Err(self.invalid(format!(
                "logs.keep is {}; it must be 1 to {MAX_LOG_KEEP} (files per log, the live one included)",
                l.keep
            )));
        }
        if l.rate_per_second.0 < 1024 {
            return Err(self.invalid(format!(
                "logs.rate_per_second is {}; it must be at least 1KiB",
                l.rate_per_second
            )));
        }
        if l.burst.0 < MIN_LOG_FILE {
            return Err(self.invalid(format!(
                "logs.burst is {}; it must be at least {MIN_LOG_FILE} bytes",
                l.burst
            )));
        }
        if g.watch_history == 0 {
            return Err(self.invalid("gateway.watch_history must be at least 1".into()));
        }
        if g.watchdog_interval_ms == 0 {
            return Err(self.invalid(
                "gateway.watchdog_interval_ms must be at least 1 (to disable the watchdog, set gateway.watchdog_timeout_ms = 0)".into(),
            ));
        }
        if g.watchdog_timeout_ms != 0 && g.watchdog_timeout_ms < g.watchdog_interval_ms {
            return Err(self.invalid(format!(
                "gateway.watchdog_timeout_ms ({}) must be at least gateway.watchdog_interval_ms ({}): the bound must cover one probe (0 disables the watchdog)",
                g.watchdog_timeout_ms, g.watchdog_interval_ms
            )));
        }
        if self.gateway.watch_progress_ms < 100 {
            return Err(self.invalid(
                "gateway.watch_progress_ms must be at least 100 (a notification per wait this often)"
                    .into(),
            ));
        }
        self.validate_space()
    }

    /// The data quota, the audit bound and the headroom must fit in the map,
    /// or the quota protects nothing: a full map refuses deletes too.
    fn validate_space(&self) -> Result<(), ConfigError> {
        let s = self.space();
        let g = &self.gateway;
        let value = g.max_value_bytes.0;
        if s.max_store_bytes < (1 << 20) || s.max_store_bytes <= value.saturating_mul(2) {
            return Err(self.invalid(format!(
                "gateway.max_store_bytes is {}; it must be at least 1MiB and more than twice gateway.max_value_bytes ({})",
                human(s.max_store_bytes),
                human(g.max_value_bytes.0)
            )));
        }
        if s.watch_history_bytes <= value || s.watch_history_bytes > s.max_store_bytes {
            return Err(self.invalid(format!(
                "gateway.watch_history_bytes is {}; it must be more than gateway.max_value_bytes ({}) and at most gateway.max_store_bytes ({})",
                human(s.watch_history_bytes),
                human(g.max_value_bytes.0),
                human(s.max_store_bytes)
            )));
        }
        if let Some(a) = s.audit_max_bytes {
            if a < (1 << 20) {
                return Err(self.invalid(format!(
                    "audit.max_bytes is {}; it must be at least 1MiB",
                    human(a)
                )));
            }
        }
        let taken = s.max_store_bytes + s.audit_max_bytes.unwrap_or(0);
        if taken > s.map_size || s.headroom < s.min_headroom {
            return Err(self.invalid(format!(
                "gateway.max_store_bytes ({}) + audit.max_bytes ({}) leave {} of gateway.map_size ({}) as headroom; at least {} is needed (the larger of 10% of the map and 4 commit batches of {}), so that deletes, compaction and audit pruning can still commit when data is at its quota. Lower one of them or raise map_size (it is address space; the file grows only as it is used)",
                human(s.max_store_bytes),
                s.audit_max_bytes.map_or_else(|| "0, audit off".into(), human),
                human(s.map_size.saturating_sub(taken)),
                human(s.map_size),
                human(s.min_headroom),
                human(s.batch_bytes)
            )));
        }
        Ok(())
    }

    /// How the map is shared: the data quota, the watch history's part of
    /// it, the audit's bound and the headroom, defaults filled in.
    ///
    /// Why 60/20/20: the headroom holds what LMDB cannot reuse yet, the pages
    /// freed by the last two commits (each at most `batch_bytes` of values,
    /// plus copied branch pages), the free list itself, and pages a reader
    /// pins while it runs (a long `cordon audit export` pins everything freed
    /// meanwhile). A fifth of the map covers those with a wide margin on any
    /// map of 32MiB or more; a fifth for the audit keeps, at ~400 bytes a
    /// record, about half a million records of a 1GiB map before pruning.
    pub fn space(&self) -> Space {
        let map = self.map_size_bytes() as u64;
        let g = &self.gateway;
        let max_store_bytes = g.max_store_bytes.map_or(map / 10 * 6, |b| b.0);
        let watch_history_bytes = g.watch_history_bytes.map_or(max_store_bytes / 4, |b| b.0);
        let audit_max_bytes = self
            .audit
            .enabled
            .then(|| self.audit.max_bytes.map_or(map / 10 * 2, |b| b.0));
        let batch_bytes = g.max_message_bytes.0.max(1 << 20);
        let taken = max_store_bytes.saturating_add(audit_max_bytes.unwrap_or(0));
        Space {
            map_size: map,
            max_store_bytes,
            watch_history_bytes,
            audit_max_bytes,
            batch_bytes,
            headroom: map.saturating_sub(taken),
            min_headroom: (map / 10).max(batch_bytes.saturating_mul(4)),
        }
    }

    /// LMDB needs a map size that is a multiple of the page size.
    pub fn map_size_bytes(&self) -> usize {
        let page = rustix::param::page_size() as u64;
        let rounded = self.gateway.map_size.0.div_ceil(page) * page;
        usize::try_from(rounded).unwrap_or(usize::MAX)
    }

    pub fn agent_dir(&self, agent: &str) -> PathBuf {
        self.gateway.runtime_dir.join("agents").join(agent)
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.gateway.runtime_dir.join("admin.sock")
    }

    /// The orchestrator's control socket (`cordon agent`, `cordon status`).
    pub fn up_socket(&self) -> PathBuf {
        self.gateway.runtime_dir.join("up.sock")
    }

    pub fn agent_socket(&self, agent: &str) -> PathBuf {
        self.agent_dir(agent).join("mcp.sock")
    }
}

/// A size for a message: bytes, and MiB when that reads better.
fn human(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1}MiB", n as f64 / f64::from(1u32 << 20))
    } else {
        format!("{n} bytes")
    }
}

/// Drops `.` and folds `..` lexically, so `configs/../state` reads as `state`.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Agent names become directory names and appear in logs: keep them plain.
fn validate_agent_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "agent name {name:?} is invalid: use 1-64 letters, digits, '-' or '_' (not starting with '-')"
        ))
    }
}

/// Under root, every agent given a uid (explicitly or from its profile's
/// range) must have its own, and not root's: the gateway tells agents apart
/// by uid, so two agents on one uid could each pass as the other (an
/// explicit uid may land inside another agent's auto range).
fn distinct_uids<'a>(agents: impl Iterator<Item = (&'a str, Option<u32>)>) -> Result<(), String> {
    let mut seen: BTreeMap<u32, &str> = BTreeMap::new();
    for (name, uid) in agents {
        let Some(uid) = uid else { continue };
        if uid == 0 {
            return Err(format!(
                "agent {name:?} has uid 0: agents never run as root; give it a uid of its own"
            ));
        }
        if let Some(other) = seen.insert(uid, name) {
            return Err(format!(
                "agents {other:?} and {name:?} both have uid {uid}: agents never share a uid"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_have_distinct_nonzero_uids() {
        assert!(distinct_uids(
            [
                ("a", Some(1001)),
                ("b", Some(1002)),
                ("c", None),
                ("d", None)
            ]
            .into_iter()
        )
        .is_ok());
        let e =
            distinct_uids([("a", Some(1001)), ("b", Some(1002)), ("c", Some(1001))].into_iter())
                .unwrap_err();
        assert!(e.contains("\"a\" and \"c\"") && e.contains("1001"), "{e}");
        let e = distinct_uids([("a", Some(1001)), ("r", Some(0))].into_iter()).unwrap_err();
        assert!(e.contains("\"r\" has uid 0"), "{e}");
    }

    #[test]
    fn an_explicit_uid_inside_an_auto_range_is_refused() {
        if !rustix::process::geteuid().is_root() {
            return; // uids are assigned under root only
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.toml"),
            "user = \"auto\"\nuid_range = [61000, 61999]\nexec = [\"/bin\"]\n",
        )
        .unwrap();
        let base = "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p\"\nmap_size = \"64MiB\"\n[agents.a]\nrole = \"x\"\nsandbox = \"p.toml\"\n[agents.b]\nrole = \"x\"\n";
        // a gets 61000 (index 0); b's explicit uid collides with it.
        let path = dir.path().join("c.toml");
        let e = Config::parse(&format!("{base}uid = 61000\n"), &path).unwrap_err();
        assert!(
            e.to_string()
                .contains("\"a\" and \"b\" both have uid 61000"),
            "{e}"
        );
        // Control: a uid outside the range is accepted.
        let c = Config::parse(&format!("{base}uid = 62000\n"), &path).unwrap();
        assert_eq!(c.agents["a"].uid, Some(61000));
    }

    #[test]
    fn watchdog_bounds_are_validated() {
        let base =
            "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p\"\nmap_size = \"64MiB\"\n";
        let path = Path::new("/etc/cordon/c.toml");
        let c = Config::parse(base, path).unwrap();
        assert_eq!(
            (
                c.gateway.watchdog_interval_ms,
                c.gateway.watchdog_timeout_ms
            ),
            (1000, 5000)
        );
        let e = Config::parse(&format!("{base}watchdog_interval_ms = 0\n"), path).unwrap_err();
        assert!(
            e.to_string()
                .contains("watchdog_interval_ms must be at least 1"),
            "{e}"
        );
        let e = Config::parse(
            &format!("{base}watchdog_interval_ms = 2000\nwatchdog_timeout_ms = 1999\n"),
            path,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(
                "watchdog_timeout_ms (1999) must be at least gateway.watchdog_interval_ms (2000)"
            ),
            "{e}"
        );
        // Controls: equal bounds, and 0 (disabled) with any interval.
        let c = Config::parse(
            &format!("{base}watchdog_interval_ms = 2000\nwatchdog_timeout_ms = 2000\n"),
            path,
        )
        .unwrap();
        assert_eq!(c.gateway.watchdog_timeout_ms, 2000);
        let c = Config::parse(
            &format!("{base}watchdog_interval_ms = 2000\nwatchdog_timeout_ms = 0\n"),
            path,
        )
        .unwrap();
        assert_eq!(c.gateway.watchdog_timeout_ms, 0);
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("1GiB").unwrap().0, 1 << 30);
        assert_eq!(ByteSize::parse("64 MiB").unwrap().0, 64 << 20);
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("MiB").is_err());
    }

    #[test]
    fn parses_and_resolves_relative_paths() {
        let c = Config::parse(
            "[gateway]\nstore = \"state/store\"\nruntime_dir = \"/run/x\"\npolicy = \"p.toml\"\nmap_size = \"64MiB\"\n[agents.coder]\nrole = \"coder\"\nuid = 1001\n",
            Path::new("/etc/cordon/deploy.toml"),
        )
        .unwrap();
        assert_eq!(c.gateway.store, Path::new("/etc/cordon/state/store"));
        assert_eq!(c.gateway.runtime_dir, Path::new("/run/x"));
        assert_eq!(c.agents["coder"].uid, Some(1001));
        assert_eq!(
            c.agent_socket("coder"),
            Path::new("/run/x/agents/coder/mcp.sock")
        );
        assert_eq!(c.gateway.max_message_bytes.0, 1 << 20);
    }

    #[test]
    fn rejects_unknown_fields_with_position() {
        let err = Config::parse(
            "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p\"\nmax_mesage_bytes = 5\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_mesage_bytes"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn agent_sandbox_profiles_inline_or_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), "read = [\"/etc\"]\n").unwrap();
        let c = Config::parse(
            "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"x.toml\"\n[agents.a]\nrole = \"r\"\nsandbox = \"p.toml\"\n[agents.b]\nrole = \"r\"\n[agents.b.sandbox]\nwrite = [\"{workdir}\"]\n",
            &dir.path().join("c.toml"),
        )
        .unwrap();
        let a = c.agents["a"].sandbox.as_ref().unwrap().profile().unwrap();
        assert_eq!(a.read, vec!["/etc".to_string()]);
        let b = c.agents["b"].sandbox.as_ref().unwrap().profile().unwrap();
        assert_eq!(b.write, vec!["{workdir}".to_string()]);
        let err = Config::parse(
            "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"x.toml\"\n[agents.b]\nrole = \"r\"\n[agents.b.sandbox]\nwirte = []\n",
            &dir.path().join("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("wirte") && err.contains("line 8"), "{err}");
    }

    #[test]
    fn replicas_and_agent_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.md"), "do the work").unwrap();
        let c = Config::parse(
            "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"x.toml\"\n[agents.coder]\nrole = \"coder\"\ncount = 2\ncommand = \"claude -p {prompt}\"\nprompt_file = \"p.md\"\nrestart = \"always\"\nbackoff = \"50ms\"\nenv = { A = \"1\" }\n[agents.x]\nrole = \"r\"\ncommand = [\"a b\", \"c\"]\n",
            &dir.path().join("c.toml"),
        )
        .unwrap();
        let names: Vec<&str> = c.agents.keys().map(String::as_str).collect();
        assert_eq!(names, ["coder-1", "coder-2", "x"]);
        let a = &c.agents["coder-2"];
        assert_eq!(a.replica_of.as_deref(), Some("coder"));
        assert_eq!(a.prompt.as_deref(), Some("do the work"));
        assert_eq!(a.restart, RestartPolicy::Always);
        assert_eq!(a.backoff.unwrap().0, std::time::Duration::from_millis(50));
        assert_eq!(
            a.command.as_ref().unwrap().argv(),
            ["claude", "-p", "{prompt}"]
        );
        assert_eq!(c.agents["x"].command.as_ref().unwrap().argv(), ["a b", "c"]);
        assert_eq!(c.agents["x"].restart, RestartPolicy::OnFailure);
        let bad = |agents: &str| {
            Config::parse(
                &format!("[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"x\"\n{agents}"),
                &dir.path().join("c.toml"),
            )
            .unwrap_err()
            .to_string()
        };
        assert!(bad("[agents.a]\nrole = \"r\"\ncount = 0\n").contains("count"));
        assert!(
            bad("[agents.a]\nrole = \"r\"\ncount = 2\n[agents.a-1]\nrole = \"r\"\n")
                .contains("used twice")
        );
        assert!(
            bad("[agents.a]\nrole = \"r\"\nprompt = \"x\"\nprompt_file = \"p.md\"\n")
                .contains("not both")
        );
        assert!(bad("[agents.a]\nrole = \"r\"\nrestart = \"sometimes\"\n").contains("sometimes"));
    }

    #[test]
    fn the_data_quota_the_audit_bound_and_the_headroom_must_fit_the_map() {
        let parse = |extra: &str| {
            Config::parse(
                &format!("[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p\"\n{extra}"),
                Path::new("c.toml"),
            )
        };
        // Defaults: 60% data, a quarter of it history, 20% audit, 20% headroom.
        let s = parse("").unwrap().space();
        assert_eq!(s.map_size, 1 << 30);
        assert_eq!(s.max_store_bytes, (1 << 30) / 10 * 6);
        assert_eq!(s.watch_history_bytes, s.max_store_bytes / 4);
        assert_eq!(s.audit_max_bytes, Some((1 << 30) / 10 * 2));
        assert!(s.headroom >= s.min_headroom, "{s:?}");
        // The defaults fit the smallest map too.
        let s = parse("map_size = \"32MiB\"\n").unwrap().space();
        assert!(s.headroom >= s.min_headroom, "{s:?}");
        let e = parse("map_size = \"16MiB\"\n").unwrap_err().to_string();
        assert!(e.contains("at least 32.0MiB"), "{e}");
        // Too much for the map: refused, saying what to change.
        let e = parse("map_size = \"64MiB\"\nmax_store_bytes = \"50MiB\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "gateway.max_store_bytes (50.0MiB) + audit.max_bytes (12.8MiB) leave 1.2MiB"
            ) && e.contains("at least 6.4MiB is needed"),
            "{e}"
        );
        let e = parse(
            "map_size = \"64MiB\"\nmax_store_bytes = \"40MiB\"\n[audit]\nmax_bytes = \"20MiB\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("leave 4.0MiB"), "{e}");
        // Control: the same data quota with a smaller audit bound fits.
        let s = parse(
            "map_size = \"64MiB\"\nmax_store_bytes = \"40MiB\"\n[audit]\nmax_bytes = \"16MiB\"\n",
        )
        .unwrap()
        .space();
        assert_eq!(s.headroom, 8 << 20);
        // Without an audit, its bound takes nothing.
        let s =
            parse("map_size = \"64MiB\"\nmax_store_bytes = \"56MiB\"\n[audit]\nenabled = false\n")
                .unwrap()
                .space();
        assert_eq!(s.audit_max_bytes, None);
        assert!(parse("max_store_bytes = \"300KiB\"\n")
            .unwrap_err()
            .to_string()
            .contains("gateway.max_store_bytes is 307200 bytes"));
        assert!(parse("watch_history_bytes = \"100KiB\"\n")
            .unwrap_err()
            .to_string()
            .contains("watch_history_bytes"));
        assert!(parse("[audit]\nmax_bytes = \"64KiB\"\n")
            .unwrap_err()
            .to_string()
            .contains("audit.max_bytes is 65536 bytes"));
    }

    #[test]
    fn rejects_bad_agent_names_and_bounds() {
        let bad = |extra: &str| {
            Config::parse(
                &format!("[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p\"\n{extra}"),
                Path::new("c.toml"),
            )
            .unwrap_err()
            .to_string()
        };
        assert!(bad("[agents.\"../x\"]\nrole = \"r\"\n").contains("agent name"));
        assert!(bad("max_value_bytes = \"2MiB\"\n").contains("max_value_bytes"));
        assert!(bad("max_connections_per_agent = 0\n").contains("at least 1"));
    }

    #[test]
    fn logs_bounds() {
        let parse = |logs: &str| {
            Config::parse(
                &format!(
                    "[gateway]\nstore = \"s\"\nruntime_dir = \"r\"\npolicy = \"p\"\n[logs]\n{logs}"
                ),
                Path::new("c.toml"),
            )
        };
        let d = parse("").unwrap().logs;
        assert_eq!(
            (d.max_file_bytes.0, d.keep, d.rate_per_second.0, d.burst.0),
            (16 << 20, 3, 1 << 20, 4 << 20)
        );
        let c = parse(
            "max_file_bytes = \"64KiB\"\nkeep = 2\nrate_per_second = 4096\nburst = \"8KiB\"\n",
        )
        .unwrap()
        .logs;
        assert_eq!(
            (c.max_file_bytes.0, c.keep, c.rate_per_second.0, c.burst.0),
            (65536, 2, 4096, 8192)
        );
        let bad = |logs: &str| parse(logs).unwrap_err().to_string();
        assert!(bad("keep = 0\n").contains("logs.keep"));
        assert!(bad("keep = 101\n").contains("logs.keep"));
        assert!(bad("max_file_bytes = 100\n").contains("logs.max_file_bytes"));
        assert!(bad("rate_per_second = 10\n").contains("logs.rate_per_second"));
        assert!(bad("burst = 10\n").contains("logs.burst"));
        let e = bad("max_files = 3\n");
        assert!(e.contains("max_files") && e.contains("line 6"), "{e}");
        assert!(bad("max_file_bytes = \"16 parsecs\"\n").contains("parsecs"));
    }
}
