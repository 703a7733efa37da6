//! What `cordon up` runs for one agent: its argv (the command template
//! expanded; for Claude Code, plus the generated MCP config and the tool
//! allowlist from the policy), its sandbox plan, and its restart policy.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::OrchestratorError;
use crate::call::Tool;
use crate::config::{AgentConfig, AgentKind, Config, RestartPolicy};
use crate::policy::Policy;
use crate::sandbox::exec::find_on_path;
use crate::sandbox::plan::{Ids, Plan, PlanInput};
use crate::sandbox::profile::{Placeholders, Profile};

/// The name Claude Code knows the gateway by: its tools are `mcp__cordon__<tool>`.
pub const MCP_SERVER: &str = "cordon";

#[derive(Debug, Clone)]
pub struct Restart {
    pub policy: RestartPolicy,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub max_restarts: u32,
    pub window: Duration,
    pub grace: Duration,
}

#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    /// For a replica, the `[agents.<group>]` it came from.
    pub group: Option<String>,
    pub role: String,
    pub kind: AgentKind,
    pub argv: Vec<OsString>,
    pub plan: Plan,
    pub restart: Restart,
    /// `<runtime_dir>/up/<name>`: event log, stderr, generated MCP config.
    pub dir: PathBuf,
}

impl AgentSpec {
    pub fn uid(&self) -> u32 {
        self.plan
            .user
            .map_or_else(|| rustix::process::getuid().as_raw(), |ids| ids.uid)
    }

    pub fn events_path(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }
}

/// `<runtime_dir>/up`: per-agent directories of `cordon up`.
pub fn up_dir(config: &Config) -> PathBuf {
    config.gateway.runtime_dir.join("up")
}

/// Creates `path` with exactly `mode`, or narrows an existing directory to
/// it, but only one cordon may own: not a symlink (never followed), owned by
/// cordon's user and without the sticky bit (a shared directory such as /tmp
/// is never made private, nor opened up). The mode is checked and set on
/// the open directory, so the path cannot be swapped in between.
fn mkdir(path: &Path, mode: u32) -> Result<(), OrchestratorError> {
    let err = |source| OrchestratorError::Prepare {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(err)?;
            }
            match fs::DirBuilder::new().mode(mode).create(path) {
                // Ours: the umask may have narrowed the mode; set it exactly.
                Ok(()) => return chmod_dir(path, mode, None),
                // Created meanwhile by someone else: checked as any existing one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(err(e)),
            }
        }
        Err(e) => return Err(err(e)),
    }
    chmod_dir(path, mode, Some(rustix::process::geteuid().as_raw()))
}

/// Sets the mode of the directory at `path` through an fd opened without
/// following a symlink; with `owner`, only if it has that owner and no
/// sticky bit.
fn chmod_dir(path: &Path, mode: u32, owner: Option<u32>) -> Result<(), OrchestratorError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let err = |source| OrchestratorError::Prepare {
        path: path.to_path_buf(),
        source,
    };
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::DIRECTORY;
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|e| {
            err(std::io::Error::new(
                e.kind(),
                format!("not a directory, or a symlink (never followed): {e}"),
            ))
        })?;
    if let Some(owner) = owner {
        let meta = dir.metadata().map_err(err)?;
        if meta.uid() != owner || meta.mode() & 0o1000 != 0 {
            return Err(err(std::io::Error::other(format!(
                "exists and is not cordon's own (owner uid {}, mode {:o}; a shared or sticky directory is never re-moded): choose a directory of cordon's own",
                meta.uid(),
                meta.mode() & 0o7777
            ))));
        }
    }
    dir.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)
}

/// Opens (creating) one of cordon's logs for appending, readable by cordon's
/// user alone: events and stderr may carry what agents read from the store,
/// which other agents must not see. A log an older run left with a wider
/// mode is narrowed too (on the open file, so no path race).
pub fn open_log(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

fn chown(path: &Path, ids: Ids) -> Result<(), OrchestratorError> {
    std::os::unix::fs::chown(path, Some(ids.uid), Some(ids.gid)).map_err(|source| {
        OrchestratorError::Prepare {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The gateway tools the role may call as Claude Code names them, then the
/// role's own Claude Code tools: Claude Code's permission check and the
/// gateway's then agree (the gateway still decides on its own).
pub fn allowed_tools(policy: &Policy, role: &str) -> Vec<String> {
    let Some(r) = policy.role(role) else {
        return Vec::new();
    };
    Tool::ALL
        .iter()
        .filter(|t| r.tool_allowed(**t))
        .map(|t| format!("mcp__{MCP_SERVER}__{t}"))
        .chain(r.agent_tools.iter().map(|(t, _)| t.clone()))
        .collect()
}

/// PATH as the sandbox will see it (to find the program, and `{cmd_dir}`).
fn sandbox_path(profile: &Profile, extra: &BTreeMap<String, String>) -> String {
    if let Some(p) = extra.get("PATH").or_else(|| profile.env.set.get("PATH")) {
        return p.clone();
    }
    if profile.env.pass.iter().any(|p| p == "PATH") {
        if let Ok(p) = std::env::var("PATH") {
            return p;
        }
    }
    "/usr/local/bin:/usr/bin:/bin".to_string()
}

/// Builds every agent's spec and prepares its directories. Fails closed: an
/// agent without a command or a sandbox profile is a configuration error.
pub fn build_all(
    config: &Config,
    policy: &Policy,
    cordon: &Path,
) -> Result<Vec<AgentSpec>, OrchestratorError> {
    let root = rustix::process::geteuid().is_root();
    let up = up_dir(config);
    mkdir(&config.gateway.runtime_dir, 0o711)?;
    // Agents traverse it to their home, work dir and MCP config, never list it.
    mkdir(&up, 0o711)?;
    let mut out = Vec::new();
    for (name, agent) in &config.agents {
        out.push(build_one(config, policy, cordon, root, name, agent)?);
    }
    Ok(out)
}

fn build_one(
    config: &Config,
    policy: &Policy,
    cordon: &Path,
    root: bool,
    name: &str,
    agent: &AgentConfig,
) -> Result<AgentSpec, OrchestratorError> {
    let invalid = |message: String| OrchestratorError::Agent {
        agent: name.to_string(),
        message,
    };
    let template = agent
        .command
        .as_ref()
        .ok_or_else(|| invalid("no command: set [agents.<name>] command".into()))?
        .argv();
    if template.is_empty() {
        return Err(invalid("the command is empty".into()));
    }
    let profile = agent
        .sandbox
        .as_ref()
        .and_then(|s| s.profile())
        .ok_or_else(|| {
            invalid(
                "no sandbox profile: every agent runs sandboxed (set sandbox = \"profiles/….toml\")"
                    .into(),
            )
        })?;
    let kind = agent.kind.unwrap_or_else(|| {
        let prog = Path::new(&template[0]);
        if prog.file_name().is_some_and(|f| f == "claude") {
            AgentKind::Claude
        } else {
            AgentKind::Command
        }
    });

    let dir = up_dir(config).join(name);
    // Owned by cordon; the agent traverses it (to its home, work dir and MCP
    // config, which it opens by path) but cannot list it. The event log and
    // stderr inside are cordon's alone (0600, `open_log`).
    mkdir(&dir, 0o711)?;
    let home = dir.join("home");
    let _ = fs::remove_dir_all(&home);
    mkdir(&home, 0o700)?;
    mkdir(&home.join("tmp"), 0o700)?;
    let workdir = match &agent.workdir {
        Some(w) => w.clone(),
        None => {
            let w = dir.join("work");
            // An earlier run handed it to the agent: take it back before
            // checking it (the agent cannot swap it for a symlink: `dir` is
            // cordon's and not writable by the agent), hand it over again below.
            if root && fs::symlink_metadata(&w).is_ok_and(|m| m.is_dir()) {
                std::os::unix::fs::lchown(&w, Some(0), None).map_err(|source| {
                    OrchestratorError::Prepare {
                        path: w.clone(),
                        source,
                    }
                })?;
            }
            mkdir(&w, 0o700)?;
            w
        }
    };
    let socket = config.agent_socket(name);
    let path = sandbox_path(profile, &agent.env);
    let cmd_dir = find_on_path(template[0].as_ref(), &path)
        .and_then(|p| fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let placeholders = Placeholders {
        workdir: workdir.clone(),
        home: home.clone(),
        tmp: home.join("tmp"),
        socket: Some(socket.clone()),
        cordon: cordon.to_path_buf(),
        cmd_dir,
    };
    let mut plan = Plan::build(
        profile,
        &PlanInput {
            name,
            placeholders: &placeholders,
            root,
            uid_index: config.agent_index(name),
            adhoc: false,
        },
    )
    .map_err(|e| invalid(e.to_string()))?;
    // The gateway expects the configured uid on the socket; run as that one.
    if let (Some(uid), true) = (agent.uid, root) {
        plan.user = (uid != 0).then_some(Ids { uid, gid: uid });
    }
    // One cgroup per agent and deployment run.
    if let Some(cg) = &mut plan.cgroup {
        cg.push_str(&format!("-{}", std::process::id()));
    }
    for (k, v) in &agent.env {
        let v = placeholders
            .expand(v)
            .ok_or_else(|| invalid(format!("env.{k}: a placeholder has no value")))?;
        plan.env_set.insert(k.clone(), v);
    }
    plan.env_set.insert("CORDON_AGENT".into(), name.to_string());
    plan.env_set
        .insert("CORDON_SOCKET".into(), socket.display().to_string());
    if let Some(ids) = plan.user {
        chown(&home, ids)?;
        chown(&home.join("tmp"), ids)?;
        if agent.workdir.is_none() {
            chown(&workdir, ids)?;
        }
    }

    let prompt = agent.prompt.clone().unwrap_or_default();
    let config_dir = config
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let config_dir = std::path::absolute(&config_dir).unwrap_or(config_dir);
    let mut argv: Vec<OsString> = Vec::new();
    for arg in &template {
        if arg == "{prompt}" {
            argv.push(prompt.clone().into());
            continue;
        }
        let mut a = arg
            .replace("{agent}", name)
            .replace("{role}", &agent.role)
            .replace("{config_dir}", &config_dir.to_string_lossy());
        a = placeholders.expand(&a).ok_or_else(|| {
            invalid(format!(
                "command argument {arg:?}: a placeholder has no value"
            ))
        })?;
        argv.push(a.into());
    }
    if kind == AgentKind::Claude {
        let mcp = dir.join("mcp.json");
        let text = json!({"mcpServers": {MCP_SERVER: {
            "command": cordon, "args": ["bridge", "--socket", socket]}}})
        .to_string();
        fs::write(&mcp, text).map_err(|source| OrchestratorError::Prepare {
            path: mcp.clone(),
            source,
        })?;
        fs::set_permissions(&mcp, fs::Permissions::from_mode(0o644)).map_err(|source| {
            OrchestratorError::Prepare {
                path: mcp.clone(),
                source,
            }
        })?;
        plan.read.push(mcp.clone());
        argv.push("--mcp-config".into());
        argv.push(mcp.into());
        argv.push("--strict-mcp-config".into());
        let tools = allowed_tools(policy, &agent.role);
        if !tools.is_empty() {
            argv.push("--allowedTools".into());
            argv.push(tools.join(",").into());
        }
    }
    let d = |s: Option<crate::config::Span>, default: Duration| s.map_or(default, |s| s.0);
    Ok(AgentSpec {
        name: name.to_string(),
        group: agent.replica_of.clone(),
        role: agent.role.clone(),
        kind,
        argv,
        plan,
        restart: Restart {
            policy: agent.restart,
            backoff: d(agent.backoff, Duration::from_secs(1)),
            max_backoff: d(agent.max_backoff, Duration::from_secs(30)),
            max_restarts: agent.max_restarts.unwrap_or(5),
            window: d(agent.restart_window, Duration::from_secs(60)),
            grace: d(agent.stop_grace, Duration::from_secs(10)),
        },
        dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_tools_follow_the_policy() {
        let p = Policy::parse(
            Path::new("p.toml"),
            "[roles.r]\ntools = [\"kv_get\", \"kv_put\"]\nagent_tools = [\"Read\"]\nread = [\"/a/**\"]\nwrite = [\"/a/**\"]\n"
                .to_string(),
        )
        .unwrap();
        assert_eq!(
            allowed_tools(&p, "r"),
            vec!["mcp__cordon__kv_get", "mcp__cordon__kv_put", "Read"]
        );
        assert!(allowed_tools(&p, "nope").is_empty());
    }

    #[test]
    fn shipped_deployments_load() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let apex = Config::load(&repo.join("configs/apex.toml")).unwrap();
        let names: Vec<&str> = apex.agents.keys().map(String::as_str).collect();
        assert_eq!(names, ["adversary", "coder-1", "coder-2", "supervisor"]);
        let coder = &apex.agents["coder-2"];
        assert_eq!(coder.replica_of.as_deref(), Some("coder"));
        assert!(coder.prompt.as_deref().unwrap().contains("kv_txn"));
        let policy = Policy::load(&apex.gateway.policy).unwrap();
        let tools = allowed_tools(&policy, "adversary");
        assert!(tools.contains(&"mcp__cordon__kv_put".to_string()));
        assert!(!tools
            .iter()
            .any(|t| t.ends_with("kv_txn") || t.ends_with("kv_delete")));
        let demo = Config::load(&repo.join("configs/demo.toml")).unwrap();
        assert_eq!(demo.agents.len(), 4);
        let manual = Config::load(&repo.join("configs/manual.toml")).unwrap();
        assert!(manual.agents.values().all(|a| a.sandbox.is_none()));
    }
}
