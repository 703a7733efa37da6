//! Agent root processes, as `cordon up` reports them over the admin socket.
//!
//! Once the orchestrator manages an agent, a connection to its socket is served
//! only if the peer's pid (SO_PEERCRED) is the agent's root process or descends
//! from it: a process of the same uid that `cordon up` did not start (another
//! agent sharing the uid when not run as root, a leftover of an earlier run)
//! is refused. Unmanaged agents (a gateway run by hand) keep the uid check only.
//!
//! Sessions do not outlive the run that opened them: each managed agent has a
//! cancellation token, replaced (and the old one cancelled) at every `set`, and
//! its sessions run under a child of the token current when they were
//! accepted. A process the agent left behind (one that escaped its process
//! group, with no cgroup to catch it) loses its session when the agent stops
//! or restarts.

use std::collections::HashMap;
use std::sync::RwLock;

use tokio_util::sync::CancellationToken;

/// Longest parent chain walked; deeper trees are refused rather than walked forever.
const MAX_DEPTH: usize = 4096;

#[derive(Debug)]
struct Root {
    /// `None`: managed but not running (refuse everyone).
    pid: Option<i32>,
    /// Parent of the sessions accepted during this run.
    sessions: CancellationToken,
}

#[derive(Debug)]
pub struct Roots {
    agents: RwLock<HashMap<String, Root>>,
    /// The gateway's own session token: cancelled at shutdown, it closes every
    /// agent's sessions too.
    base: CancellationToken,
}

impl Roots {
    /// No agent managed (a gateway run by hand): the uid check alone.
    pub fn unmanaged(base: CancellationToken) -> Roots {
        Roots {
            agents: RwLock::new(HashMap::new()),
            base,
        }
    }

    /// Every agent managed and not yet running: `cordon up` starts the gateway
    /// this way, so no connection slips in before the first registration.
    pub fn managed<'a>(agents: impl Iterator<Item = &'a String>, base: CancellationToken) -> Roots {
        let agents = agents
            .map(|a| {
                let root = Root {
                    pid: None,
                    sessions: base.child_token(),
                };
                (a.clone(), root)
            })
            .collect();
        Roots {
            agents: RwLock::new(agents),
            base,
        }
    }

    /// A new root (or none): the sessions of the previous run are closed.
    pub fn set(&self, agent: &str, pid: Option<i32>) {
        let root = Root {
            pid,
            sessions: self.base.child_token(),
        };
        // A poisoned lock only means a panic elsewhere mid-insert; the map is
        // still a valid map.
        let mut map = self.agents.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = map.insert(agent.to_string(), root) {
            old.sessions.cancel();
        }
    }

    /// When the peer may be served, the token its session runs under (closed
    /// when the agent's run ends, or at shutdown); `Err(reason)` otherwise.
    pub fn check(&self, agent: &str, peer: Option<i32>) -> Result<CancellationToken, &'static str> {
        // Token and root are read together: a `set` after this point cancels
        // the token returned, so a session accepted for a run that just ended
        // closes at once.
        let (root, sessions) = {
            let map = self.agents.read().unwrap_or_else(|e| e.into_inner());
            match map.get(agent) {
                None => return Ok(self.base.child_token()),
                Some(Root { pid: None, .. }) => {
                    return Err("the agent is not running under cordon up")
                }
                Some(Root {
                    pid: Some(root),
                    sessions,
                }) => (*root, sessions.clone()),
            }
        };
        let Some(peer) = peer else {
            return Err("the peer's pid is unknown");
        };
        if in_tree(peer, root) {
            Ok(sessions.child_token())
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
    fn a_new_root_closes_the_previous_runs_sessions() {
        let base = CancellationToken::new();
        let names = ["a".to_string(), "b".to_string()];
        let roots = Roots::managed(names.iter(), base.clone());
        let me = std::process::id() as i32;
        roots.set("a", Some(me));
        roots.set("b", Some(me));
        let first = roots.check("a", Some(me)).unwrap();
        let other = roots.check("b", Some(me)).unwrap();
        assert!(!first.is_cancelled());
        // The agent restarts: its old session closes, b's stays.
        roots.set("a", Some(me));
        assert!(first.is_cancelled());
        assert!(!other.is_cancelled());
        // Control: a session of the new run is open until the agent stops.
        let second = roots.check("a", Some(me)).unwrap();
        assert!(!second.is_cancelled());
        roots.set("a", None);
        assert!(second.is_cancelled());
        assert!(roots.check("a", Some(me)).is_err());
        // Shutdown closes everyone's.
        base.cancel();
        assert!(other.is_cancelled());
    }

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
        let roots = Roots::managed(names.iter(), CancellationToken::new());
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
