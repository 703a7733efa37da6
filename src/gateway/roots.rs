//! Agent root processes, as `cordon up` reports them over the admin socket.
//!
//! Once the orchestrator manages an agent, a connection to its socket is served
//! only if the peer's pid (SO_PEERCRED) is the agent's root process or descends
//! from it: a process of the same uid that `cordon up` did not start (another
//! agent sharing the uid when not run as root, a leftover of an earlier run)
//! is refused. Unmanaged agents (a gateway run by hand) keep the uid check only.

use std::collections::HashMap;
use std::sync::RwLock;

/// Longest parent chain walked; deeper trees are refused rather than walked forever.
const MAX_DEPTH: usize = 4096;

#[derive(Debug, Default)]
pub struct Roots {
    /// agent → its root pid; `None`: managed but not running (refuse everyone).
    agents: RwLock<HashMap<String, Option<i32>>>,
}

impl Roots {
    /// Every agent managed and not yet running: `cordon up` starts the gateway
    /// this way, so no connection slips in before the first registration.
    pub fn managed<'a>(agents: impl Iterator<Item = &'a String>) -> Roots {
        Roots {
            agents: RwLock::new(agents.map(|a| (a.clone(), None)).collect()),
        }
    }

    pub fn set(&self, agent: &str, pid: Option<i32>) {
        // A poisoned lock only means a panic elsewhere mid-insert; the map is
        // still a valid map.
        let mut map = self.agents.write().unwrap_or_else(|e| e.into_inner());
        map.insert(agent.to_string(), pid);
    }

    /// `Ok` when the peer may be served; `Err(reason)` otherwise.
    pub fn check(&self, agent: &str, peer: Option<i32>) -> Result<(), &'static str> {
        let root = {
            let map = self.agents.read().unwrap_or_else(|e| e.into_inner());
            match map.get(agent) {
                None => return Ok(()),
                Some(None) => return Err("the agent is not running under cordon up"),
                Some(Some(root)) => *root,
            }
        };
        let Some(peer) = peer else {
            return Err("the peer's pid is unknown");
        };
        if in_tree(peer, root) {
            Ok(())
        } else {
            Err("peer process does not descend from the agent's root process")
        }
    }
}

/// Whether the live process `pid` is `root` or descends from it, walking
/// /proc parent links. The one walk behind both the gateway's per-agent check
/// and the orchestrator's control socket (which refuses agents' processes).
pub fn in_tree(pid: i32, root: i32) -> bool {
    descends_from(pid, root, parent_of)
}

/// Whether `pid` is `root` or one of its descendants, walking parent links.
fn descends_from(mut pid: i32, root: i32, parent: impl Fn(i32) -> Option<i32>) -> bool {
    for _ in 0..MAX_DEPTH {
        if pid == root {
            return true;
        }
        if pid <= 1 {
            return false;
        }
        match parent(pid) {
            Some(p) => pid = p,
            None => return false,
        }
    }
    false
}

/// The ppid field of /proc/<pid>/stat (after the command name, which may hold
/// spaces and parentheses, so parsed from the last ')').
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descent_follows_parents() {
        let tree = |p: i32| match p {
            30 => Some(20),
            20 => Some(10),
            10 => Some(1),
            40 => Some(1),
            _ => None,
        };
        assert!(descends_from(30, 10, tree));
        assert!(descends_from(10, 10, tree));
        assert!(!descends_from(40, 10, tree));
        assert!(!descends_from(99, 10, tree));
    }

    #[test]
    fn managed_agents_refuse_until_registered() {
        let names = ["a".to_string()];
        let roots = Roots::managed(names.iter());
        assert!(roots.check("a", Some(std::process::id() as i32)).is_err());
        assert!(roots.check("unmanaged", Some(5)).is_ok());
        roots.set("a", Some(std::process::id() as i32));
        assert!(roots.check("a", Some(std::process::id() as i32)).is_ok());
        assert!(roots.check("a", Some(1)).is_err());
        assert_eq!(
            parent_of(std::process::id() as i32),
            Some(rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get()))
        );
    }
}
