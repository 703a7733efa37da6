//! Resource limits: rlimits per process, and a cgroup per agent for memory, pids
//! and CPU weight across all of its processes.
//!
//! The cgroup layout is detected at run time, per controller: cgroup v2 when the
//! unified hierarchy has the controller, else the v1 hierarchy that has it
//! (machines with a cgroup2 mount but v1 memory/pids exist). Agent cgroups are
//! created below the cgroup cordon itself runs in, so a deployment stays inside
//! its service's own accounting instead of taking over the root.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rustix::process::{setrlimit, Resource, Rlimit};

use super::profile::LimitsProfile;

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("cannot set {resource} to {value}: {source}")]
    SetRlimit {
        resource: &'static str,
        value: u64,
        source: io::Error,
    },
    #[error("the profile sets limits.{limit}, but no cgroup hierarchy here has the {controller} controller")]
    NoController {
        limit: &'static str,
        controller: &'static str,
    },
    #[error("cannot create cgroup {path}: {source}")]
    CreateCgroup { path: PathBuf, source: io::Error },
    #[error("cannot write {value:?} to {path}: {source}")]
    WriteCgroup {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    ReadCgroup { path: PathBuf, source: io::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Where one controller lives for this process.
#[derive(Debug, Clone)]
pub struct Controller {
    pub name: &'static str,
    pub version: Version,
    /// The cgroup this process is in, in that hierarchy.
    pub own_dir: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub v2_mount: Option<PathBuf>,
    pub v2_controllers: Vec<String>,
    pub v1_mounts: Vec<(PathBuf, Vec<String>)>,
    pub controllers: Vec<Controller>,
}

const WANTED: [&str; 3] = ["memory", "pids", "cpu"];

impl Layout {
    /// Reads /proc/self/mountinfo and /proc/self/cgroup.
    pub fn detect() -> Layout {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Layout::parse(&mountinfo, &own, |p| fs::read_to_string(p).ok())
    }

    fn parse(mountinfo: &str, own: &str, read: impl Fn(&Path) -> Option<String>) -> Layout {
        let mut layout = Layout::default();
        // (mount root inside the hierarchy, mount point, v1 controllers or None for v2)
        let mut mounts: Vec<(String, PathBuf, Option<Vec<String>>)> = Vec::new();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 5 || r.len() < 3 {
                continue;
            }
            let (root, point) = (l[3].to_string(), PathBuf::from(unescape(l[4])));
            match r[0] {
                "cgroup2" => mounts.push((root, point, None)),
                "cgroup" => {
                    let ctrls = r[2]
                        .split(',')
                        .filter(|o| WANTED.contains(o))
                        .map(String::from)
                        .collect();
                    mounts.push((root, point, Some(ctrls)));
                }
                _ => {}
            }
        }
        // Our cgroup path per hierarchy: "0::/x" for v2, "4:memory:/x" for v1.
        let mut v2_path = None;
        let mut v1_paths: Vec<(Vec<String>, String)> = Vec::new();
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && ctrls.is_empty() {
                v2_path = Some(path.to_string());
            } else {
                v1_paths.push((
                    ctrls.split(',').map(String::from).collect(),
                    path.to_string(),
                ));
            }
        }
        let join = |point: &Path, root: &str, path: &str| -> PathBuf {
            let rel = path.strip_prefix(root).unwrap_or(path);
            point.join(rel.trim_start_matches('/'))
        };
        for (root, point, kind) in &mounts {
            match kind {
                None => {
                    if layout.v2_mount.is_none() {
                        layout.v2_mount = Some(point.clone());
                        layout.v2_controllers = read(&point.join("cgroup.controllers"))
                            .unwrap_or_default()
                            .split_whitespace()
                            .map(String::from)
                            .collect();
                        if let Some(path) = &v2_path {
                            for name in WANTED {
                                if layout.v2_controllers.iter().any(|c| c == name) {
                                    layout.controllers.push(Controller {
                                        name,
                                        version: Version::V2,
                                        own_dir: join(point, root, path),
                                    });
                                }
                            }
                        }
                    }
                }
                Some(ctrls) => {
                    layout.v1_mounts.push((point.clone(), ctrls.clone()));
                }
            }
        }
        for (root, point, kind) in &mounts {
            let Some(ctrls) = kind else { continue };
            for name in WANTED {
                if !ctrls.iter().any(|c| c == name) || layout.controller(name).is_some() {
                    continue;
                }
                if let Some((_, path)) = v1_paths.iter().find(|(c, _)| c.iter().any(|c| c == name))
                {
                    layout.controllers.push(Controller {
                        name,
                        version: Version::V1,
                        own_dir: join(point, root, path),
                    });
                }
            }
        }
        layout
    }

    pub fn controller(&self, name: &str) -> Option<&Controller> {
        self.controllers.iter().find(|c| c.name == name)
    }

    /// The directories of the agent's cgroup, one per hierarchy it needs.
    pub fn agent_dirs(
        &self,
        limits: &LimitsProfile,
        rel: &str,
    ) -> Result<Vec<(Controller, PathBuf)>, LimitsError> {
        let mut needed = Vec::new();
        for (limit, controller, wanted) in [
            ("memory", "memory", limits.memory.is_some()),
            ("pids", "pids", limits.pids.is_some()),
            ("cpu_weight", "cpu", limits.cpu_weight.is_some()),
        ] {
            if !wanted {
                continue;
            }
            let c = self
                .controller(controller)
                .ok_or(LimitsError::NoController { limit, controller })?;
            needed.push((c.clone(), c.own_dir.join(rel)));
        }
        Ok(needed)
    }
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn write(path: &Path, value: &str) -> Result<(), LimitsError> {
    fs::write(path, value).map_err(|source| LimitsError::WriteCgroup {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// Creates the agent's cgroup, sets its limits and moves this process into it.
/// Runs in the helper before the command exists, so every process the agent
/// ever starts is born inside.
pub fn join_cgroup(layout: &Layout, limits: &LimitsProfile, rel: &str) -> Result<(), LimitsError> {
    let dirs = layout.agent_dirs(limits, rel)?;
    let me = std::process::id().to_string();
    let mut joined: Vec<PathBuf> = Vec::new();
    for (c, dir) in &dirs {
        if c.version == Version::V2 {
            // v2 controllers must be enabled in every ancestor's subtree_control.
            let mut ancestor = c.own_dir.clone();
            for part in Path::new(rel).components() {
                fs::create_dir_all(&ancestor).map_err(|source| LimitsError::CreateCgroup {
                    path: ancestor.clone(),
                    source,
                })?;
                write(
                    &ancestor.join("cgroup.subtree_control"),
                    &format!("+{}", c.name),
                )?;
                ancestor.push(part);
            }
        }
        fs::create_dir_all(dir).map_err(|source| LimitsError::CreateCgroup {
            path: dir.clone(),
            source,
        })?;
        match (c.name, c.version) {
            ("memory", Version::V1) => {
                let bytes = limits.memory.unwrap_or(u64::MAX).to_string();
                let swap = dir.join("memory.memsw.limit_in_bytes");
                // memsw must stay ≥ the memory limit: order the writes so each is valid.
                if write(&dir.join("memory.limit_in_bytes"), &bytes).is_err() && swap.exists() {
                    write(&swap, &bytes)?;
                }
                write(&dir.join("memory.limit_in_bytes"), &bytes)?;
                if swap.exists() {
                    // Without it the cgroup swaps instead of being limited.
                    write(&swap, &bytes)?;
                }
            }
            ("memory", Version::V2) => {
                write(
                    &dir.join("memory.max"),
                    &limits.memory.unwrap_or(u64::MAX).to_string(),
                )?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
            }
            ("pids", _) => {
                write(
                    &dir.join("pids.max"),
                    &limits.pids.unwrap_or(u64::MAX).to_string(),
                )?;
            }
            ("cpu", Version::V2) => {
                write(
                    &dir.join("cpu.weight"),
                    &limits.cpu_weight.unwrap_or(100).to_string(),
                )?;
            }
            ("cpu", Version::V1) => {
                // v1 shares default to 1024 where v2 weights default to 100.
                let shares = u64::from(limits.cpu_weight.unwrap_or(100)) * 1024 / 100;
                write(&dir.join("cpu.shares"), &shares.max(2).to_string())?;
            }
            _ => {}
        }
        if !joined.contains(dir) {
            write(&dir.join("cgroup.procs"), &me)?;
            joined.push(dir.clone());
        }
    }
    Ok(())
}

/// Kills whatever is left in the agent's cgroup and removes it. For the parent
/// once the command exited: a daemon the agent left behind must not outlive it.
pub fn remove_cgroup(
    layout: &Layout,
    limits: &LimitsProfile,
    rel: &str,
) -> Result<(), LimitsError> {
    let dirs = layout.agent_dirs(limits, rel)?;
    for (_, dir) in dirs {
        if !dir.exists() {
            continue;
        }
        // Bounded: processes can fork while we kill, but not past pids.max, and
        // each round kills every one that was listed.
        for _ in 0..100 {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).map_err(|source| {
                LimitsError::ReadCgroup {
                    path: dir.clone(),
                    source,
                }
            })?;
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            std::thread::yield_now();
        }
        // A killed process leaves the cgroup only once reaped; rmdir says EBUSY
        // until then, so retry a bounded number of times.
        let mut last = Ok(());
        for _ in 0..1000 {
            last = fs::remove_dir(&dir);
            if last.is_ok() {
                break;
            }
            std::thread::yield_now();
        }
        last.map_err(|source| LimitsError::CreateCgroup {
            path: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Whether the memory limit was hit (the OOM killer ran in the agent's cgroup).
pub fn oom_killed(layout: &Layout, rel: &str) -> bool {
    let Some(c) = layout.controller("memory") else {
        return false;
    };
    let dir = c.own_dir.join(rel);
    let (file, key) = match c.version {
        Version::V1 => ("memory.oom_control", "oom_kill "),
        Version::V2 => ("memory.events", "oom_kill "),
    };
    fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(key))
        .any(|n| n.trim() != "0")
}

/// NOFILE and CORE for every process; NPROC only for a dedicated uid (it counts
/// every process of that uid system-wide, and root is exempt from it anyway).
pub fn set_rlimits(limits: &LimitsProfile, dedicated_uid: bool) -> Result<(), LimitsError> {
    let set = |resource: Resource, name: &'static str, value: u64| {
        setrlimit(
            resource,
            Rlimit {
                current: Some(value),
                maximum: Some(value),
            },
        )
        .map_err(|e| LimitsError::SetRlimit {
            resource: name,
            value,
            source: e.into(),
        })
    };
    // A core dump would write the agent's memory (API keys included) to disk.
    set(Resource::Core, "RLIMIT_CORE", 0)?;
    if let Some(n) = limits.nofile {
        set(Resource::Nofile, "RLIMIT_NOFILE", n)?;
    }
    if dedicated_uid {
        if let Some(n) = limits.pids {
            set(Resource::Nproc, "RLIMIT_NPROC", n)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:35 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const OWN: &str = "8:pids:/\n4:memory:/svc/a\n1:cpu:/\n0::/\n";

    #[test]
    fn mixed_v1_and_v2_picks_the_hierarchy_with_the_controller() {
        let l = Layout::parse(MOUNTINFO, OWN, |_| Some("hugetlb".into()));
        let m = l.controller("memory").unwrap();
        assert_eq!(m.version, Version::V1);
        assert_eq!(m.own_dir, Path::new("/sys/fs/cgroup/memory/svc/a"));
        assert_eq!(
            l.controller("pids").unwrap().own_dir,
            Path::new("/sys/fs/cgroup/pids")
        );
        assert_eq!(
            l.v2_mount.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn pure_v2() {
        let l = Layout::parse(
            "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            "0::/user.slice/x.scope\n",
            |_| Some("cpuset cpu io memory pids".into()),
        );
        let m = l.controller("memory").unwrap();
        assert_eq!(m.version, Version::V2);
        assert_eq!(m.own_dir, Path::new("/sys/fs/cgroup/user.slice/x.scope"));
        let limits = LimitsProfile {
            memory: Some(1 << 30),
            ..Default::default()
        };
        let dirs = l.agent_dirs(&limits, "cordon/a").unwrap();
        assert_eq!(
            dirs[0].1,
            Path::new("/sys/fs/cgroup/user.slice/x.scope/cordon/a")
        );
    }

    #[test]
    fn missing_controller_is_an_error() {
        let l = Layout::parse("", "", |_| None);
        let limits = LimitsProfile {
            pids: Some(5),
            ..Default::default()
        };
        let err = l.agent_dirs(&limits, "x").unwrap_err().to_string();
        assert!(err.contains("limits.pids"), "{err}");
    }
}
