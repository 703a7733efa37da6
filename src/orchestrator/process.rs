//! Starting an agent through `cordon sandbox-exec`, signalling its whole
//! process tree, and reading its memory.
//!
//! The helper is `/proc/self/exe sandbox-exec --plan-fd 3 -- argv…`. Its plan
//! comes on a socket pair rather than a memory file, and is written only after
//! the gateway knows the helper's pid: the helper blocks reading it, so the
//! agent cannot connect before the gateway can recognise it.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Stdio;

use rustix::process::{kill_process, kill_process_group, Pid, Signal};

use super::spec::AgentSpec;
use super::OrchestratorError;
use crate::sandbox::limits::{self, Layout, Version};
use crate::sandbox::plan::Plan;

/// A started helper whose plan is still to be sent.
pub struct Pending {
    pub child: tokio::process::Child,
    pub pid: i32,
    plan: UnixStream,
}

impl Pending {
    /// Hands the helper its plan; from here on it sets up the sandbox and execs.
    pub fn release(mut self, plan: &Plan) -> Result<tokio::process::Child, OrchestratorError> {
        let json = serde_json::to_vec(plan).map_err(|e| OrchestratorError::Spawn {
            agent: plan.name.clone(),
            source: e.into(),
        })?;
        // A helper that died already gives EPIPE; its exit is reported by wait.
        let _ = self.plan.write_all(&json);
        drop(self.plan);
        Ok(self.child)
    }

    /// Never sends the plan: the helper reads EOF and exits without running
    /// anything; its exit is reported by wait as any other.
    pub fn abandon(self) -> tokio::process::Child {
        drop(self.plan);
        self.child
    }
}

/// Starts the helper with `stdout` and `stderr` (write ends of the pipes the
/// orchestrator's reader threads drain). They are closed here once the child
/// has its copies, so the readers see the end of the stream when the agent's
/// processes are gone.
pub fn spawn(
    spec: &AgentSpec,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<Pending, OrchestratorError> {
    let err = |source| OrchestratorError::Spawn {
        agent: spec.name.clone(),
        source,
    };
    let (ours, theirs) = UnixStream::pair().map_err(err)?;
    let mut cmd = crate::sandbox::plan::helper_command(&spec.argv, OwnedFd::from(theirs));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    let child = cmd.spawn().map_err(err)?;
    drop(cmd);
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| err(std::io::Error::other("the helper has no pid")))?;
    Ok(Pending {
        child,
        pid,
        plan: ours,
    })
}

/// The cgroup directories of a running agent (empty without cgroup limits).
pub fn cgroup_dirs(plan: &Plan) -> Vec<(limits::Controller, PathBuf)> {
    match &plan.cgroup {
        Some(rel) => Layout::detect()
            .agent_dirs(&plan.limits, rel)
            .unwrap_or_default(),
        None => Vec::new(),
    }
}

/// Sends `sig` to every process of the agent: its process group (the helper
/// starts a new session, so the group is the agent's pid) and everything in
/// its cgroup (which also catches a process that left the group).
pub fn signal_tree(pid: i32, plan: &Plan, sig: Signal) {
    if let Some(p) = Pid::from_raw(pid) {
        let _ = kill_process_group(p, sig);
        let _ = kill_process(p, sig);
    }
    for (_, dir) in cgroup_dirs(plan) {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if let Some(p) = Pid::from_raw(p) {
                let _ = kill_process(p, sig);
            }
        }
    }
}

/// Whether the kernel's OOM killer acted in the agent's cgroup (its memory
/// limit was reached). Read before `cleanup` removes the cgroup.
pub fn oom_killed(plan: &Plan) -> bool {
    plan.cgroup
        .as_deref()
        .is_some_and(|rel| limits::oom_killed(&Layout::detect(), rel))
}

/// After the agent's root exited: kill whatever it left behind and remove its
/// cgroup.
pub fn cleanup(pid: i32, plan: &Plan) {
    if let Some(p) = Pid::from_raw(pid) {
        let _ = kill_process_group(p, Signal::KILL);
    }
    if let Some(rel) = &plan.cgroup {
        if let Err(e) = limits::remove_cgroup(&Layout::detect(), &plan.limits, rel) {
            tracing::warn!(agent = %plan.name, error = %e, "cannot remove the agent's cgroup");
        }
    }
}

/// Processes of the agent: its cgroup's `pids.current` when it has one, else
/// the live members of its process group.
pub fn pids(pid: i32, plan: &Plan) -> Option<u64> {
    for (c, dir) in cgroup_dirs(plan) {
        if c.name == "pids" {
            if let Some(n) = read_number(&dir.join("pids.current")) {
                return Some(n);
            }
        }
    }
    group_members(pid).map(|(n, _)| n)
}

fn read_number(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Bytes of memory: the cgroup's usage when it has one, else the resident
/// size of the processes in its process group.
pub fn memory(pid: i32, plan: &Plan) -> Option<u64> {
    for (c, dir) in cgroup_dirs(plan) {
        if c.name != "memory" {
            continue;
        }
        let file = match c.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        if let Some(n) = read_number(&dir.join(file)) {
            return Some(n);
        }
    }
    group_members(pid).map(|(_, rss)| rss)
}

/// (count, resident bytes) of the live processes whose process group is `pgid`.
fn group_members(pgid: i32) -> Option<(u64, u64)> {
    let page = rustix::param::page_size() as u64;
    let mut total = 0u64;
    let mut count = 0u64;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(p) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the command: state(0) ppid(1) pgrp(2) … rss(21), in pages.
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
            && fields.first() != Some(&"Z")
        {
            count += 1;
            total += fields
                .get(21)
                .and_then(|r| r.parse::<u64>().ok())
                .unwrap_or(0)
                * page;
        }
    }
    (count > 0).then_some((count, total))
}
