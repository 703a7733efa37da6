//! A sandbox plan: a profile with every placeholder expanded, every uid chosen
//! and every path absolute — everything `cordon sandbox-exec` needs, and nothing
//! it has to decide. The orchestrator builds one per agent from the deployment
//! config; `cordon sandbox run` builds one from a profile file.
//!
//! The plan travels to the helper as JSON on an inherited file descriptor (not
//! argv: `env.set` may hold secrets, and argv is world-readable in /proc).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::profile::{
    LimitsProfile, Placeholders, Profile, Require, UserSpec, ADHOC_UID_RANGE, DEPLOYMENT_UID_RANGE,
};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("sandbox profile needs {placeholder} for {entry:?}, but this run has none{hint}")]
    MissingPlaceholder {
        entry: String,
        placeholder: &'static str,
        hint: &'static str,
    },
    #[error("agent number {index} has no uid of its own in uid_range [{lo}, {hi}] ({size} uids); widen the range (agents never share a uid)")]
    UidRangeTooSmall {
        index: u32,
        lo: u32,
        hi: u32,
        size: u32,
    },
    #[error("refusing the {list} rule {entry:?}: it resolves to {path}, {what}, and would give the agent {right} access to all of it{hint}")]
    BroadRule {
        list: &'static str,
        entry: String,
        path: PathBuf,
        what: &'static str,
        right: &'static str,
        hint: &'static str,
    },
    #[error("user {name:?} is not in /etc/passwd")]
    UnknownUser { name: String },
    #[error("cannot read /etc/passwd: {0}")]
    ReadPasswd(std::io::Error),
    #[error("user {name:?} needs cordon to run as root (it runs as uid {uid})")]
    SwitchUserNotRoot { name: String, uid: u32 },
    #[error("the profile sets cgroup limits (memory, pids, cpu_weight), which need cordon to run as root; refusing to run without them (require = \"best-effort\" runs unlimited)")]
    LimitsNeedRoot,
    #[error("cannot create the plan file: {0}")]
    CreatePlanFile(std::io::Error),
    #[error("cannot read the sandbox plan from {from}: {source}")]
    ReadPlan {
        from: String,
        source: std::io::Error,
    },
    #[error("the sandbox plan from {from} is invalid: {source}")]
    ParsePlan {
        from: String,
        source: serde_json::Error,
    },
}

/// The uid and gid the command runs as, and its supplementary groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Agent name: cgroup directory and messages.
    pub name: String,
    pub require: Require,
    /// The command's working directory.
    pub workdir: PathBuf,
    pub read: Vec<PathBuf>,
    pub write: Vec<PathBuf>,
    pub exec: Vec<PathBuf>,
    pub connect_tcp: Vec<u16>,
    pub bind_tcp: Vec<u16>,
    /// Pathname sockets granted Landlock's RESOLVE_UNIX (ABI ≥ 9).
    pub connect_unix: Vec<PathBuf>,
    /// Names (or `PREFIX*`) copied from the helper's environment.
    pub env_pass: Vec<String>,
    pub env_set: BTreeMap<String, String>,
    pub limits: LimitsProfile,
    /// The agent's cgroup, relative to the cgroup cordon itself runs in (so a
    /// deployment nests under its service's cgroup instead of taking over the root).
    pub cgroup: Option<String>,
    /// None: keep the caller's uid.
    pub user: Option<Ids>,
}

/// What the caller knows about one run.
pub struct PlanInput<'a> {
    pub name: &'a str,
    pub placeholders: &'a Placeholders,
    /// Whether cordon runs as root (uid switching and cgroups need it).
    pub root: bool,
    /// The index of this agent in its deployment (its `auto` uid is
    /// `uid_range[0] + index`, an error past the range); `sandbox run` passes
    /// a hash of the name and `adhoc`.
    pub uid_index: u32,
    /// An ad-hoc run (`sandbox run`, `probe`): `uid_index` is a hash, reduced
    /// into the range, and the default range is [`ADHOC_UID_RANGE`], apart
    /// from the deployments' [`DEPLOYMENT_UID_RANGE`].
    pub adhoc: bool,
}

impl Plan {
    pub fn build(profile: &Profile, input: &PlanInput) -> Result<Plan, PlanError> {
        let ph = input.placeholders;
        // An entry whose placeholder has no value in this run (`{socket}` under
        // `sandbox run` without --socket) grants nothing, so it is left out.
        let expand_all = |entries: &[String]| -> Result<Vec<PathBuf>, PlanError> {
            Ok(entries
                .iter()
                .filter_map(|e| ph.expand(e).map(PathBuf::from))
                .collect())
        };
        let mut env_set = BTreeMap::new();
        for (k, v) in &profile.env.set {
            let value = ph.expand(v).ok_or_else(|| missing_placeholder(v))?;
            env_set.insert(k.clone(), value);
        }
        let user = match &profile.user {
            UserSpec::Inherit => None,
            UserSpec::Auto if !input.root => None,
            UserSpec::Auto => {
                let default = if input.adhoc {
                    ADHOC_UID_RANGE
                } else {
                    DEPLOYMENT_UID_RANGE
                };
                let [lo, hi] = profile.uid_range.unwrap_or(default);
                // Profile::validate guarantees 0 < lo <= hi; the size may be
                // 2^32 - 1 at most, which fits.
                let size = hi - lo + 1;
                let index = if input.adhoc {
                    input.uid_index % size
                } else if input.uid_index < size {
                    input.uid_index
                } else {
                    // A modulo here would silently give two agents one uid.
                    return Err(PlanError::UidRangeTooSmall {
                        index: input.uid_index,
                        lo,
                        hi,
                        size,
                    });
                };
                let uid = lo + index;
                Some(Ids { uid, gid: uid })
            }
            UserSpec::Name(name) => {
                let ids = lookup_user(name)?;
                let me = rustix::process::getuid().as_raw();
                if !input.root && ids.uid != me {
                    return Err(PlanError::SwitchUserNotRoot {
                        name: name.clone(),
                        uid: me,
                    });
                }
                (ids.uid != me).then_some(ids)
            }
        };
        for (list, entries, right) in [
            ("write", &profile.write, "write"),
            ("exec", &profile.exec, "execute"),
        ] {
            check_not_broad(list, entries, ph, right)?;
        }
        let needs_cgroup = profile.limits.needs_cgroup();
        if needs_cgroup && !input.root && profile.require == Require::Strict {
            return Err(PlanError::LimitsNeedRoot);
        }
        let cgroup = (input.root && needs_cgroup).then(|| format!("cordon/{}", input.name));
        Ok(Plan {
            name: input.name.to_string(),
            require: profile.require,
            workdir: ph.workdir.clone(),
            read: expand_all(&profile.read)?,
            write: expand_all(&profile.write)?,
            exec: expand_all(&profile.exec)?,
            connect_tcp: profile.net.connect_tcp.clone(),
            bind_tcp: profile.net.bind_tcp.clone(),
            connect_unix: expand_all(&profile.net.connect_unix)?,
            env_pass: profile.env.pass.clone(),
            env_set,
            limits: profile.limits.clone(),
            cgroup,
            user,
        })
    }

    /// `/proc/self/exe sandbox-exec --parent-pid <ours> --plan-fd 3 -- argv…`,
    /// with the plan on fd 3: how the orchestrator (which runs threads, so
    /// cannot fork and continue) starts an agent. Our pid is captured here,
    /// before the spawn, so a helper that outlived us exits at once.
    ///
    /// PR_SET_PDEATHSIG fires when the *thread* that forked the helper exits,
    /// not the process: the orchestrator must spawn agents from a long-lived
    /// thread (not a short-lived or pooled blocking thread), or its agents
    /// are SIGKILLed when that thread ends.
    pub fn helper_command(
        &self,
        argv: &[std::ffi::OsString],
    ) -> Result<std::process::Command, PlanError> {
        Ok(helper_command(argv, self.to_memfd()?))
    }

    /// The plan in an anonymous memory file, for the helper to inherit.
    pub fn to_memfd(&self) -> Result<OwnedFd, PlanError> {
        let fd = rustix::fs::memfd_create("cordon-plan", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| PlanError::CreatePlanFile(e.into()))?;
        let mut file = File::from(fd);
        // Serializing plain data with string keys cannot fail.
        let json = serde_json::to_vec(self).map_err(|e| PlanError::CreatePlanFile(e.into()))?;
        file.write_all(&json).map_err(PlanError::CreatePlanFile)?;
        file.rewind().map_err(PlanError::CreatePlanFile)?;
        Ok(OwnedFd::from(file))
    }

    pub fn read_from(mut file: File, from: &str) -> Result<Plan, PlanError> {
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .map_err(|source| PlanError::ReadPlan {
                from: from.to_string(),
                source,
            })?;
        serde_json::from_slice(&text).map_err(|source| PlanError::ParsePlan {
            from: from.to_string(),
            source,
        })
    }

    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let file = File::open(path).map_err(|source| PlanError::ReadPlan {
            from: path.display().to_string(),
            source,
        })?;
        Plan::read_from(file, &path.display().to_string())
    }
}

/// Makes the plan fd number `target` in the child of `command` (which must run
/// `sandbox-exec --plan-fd <target>`). Safe to use from a multi-threaded parent:
/// the fd is placed between fork and exec, never made inheritable in the parent.
pub fn pass_plan_fd(command: &mut std::process::Command, plan_fd: OwnedFd, target: i32) {
    use std::os::unix::process::CommandExt;
    let raw = plan_fd.as_raw_fd();
    // SAFETY: the closure runs between fork and exec in the child, where only
    // async-signal-safe calls are allowed; dup2 and fcntl are raw syscalls that
    // neither allocate nor take locks. `plan_fd` is moved into the closure, so
    // `raw` stays open in the parent until the Command is dropped.
    unsafe {
        command.pre_exec(move || {
            let _keep = &plan_fd;
            if raw == target {
                let r = libc::fcntl(raw, libc::F_SETFD, 0);
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Refuses a rule that resolves to `/` or to the caller's HOME: a placeholder
/// that expands wider than meant (`sandbox run` from `/` takes `/` as
/// `{workdir}`; `--home ~`) would hand the agent the whole machine or the
/// operator's dotfiles, keys and shell startup files.
fn check_not_broad(
    list: &'static str,
    entries: &[String],
    ph: &Placeholders,
    right: &'static str,
) -> Result<(), PlanError> {
    let resolve = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let caller_home = caller_home().map(|h| resolve(&h));
    for entry in entries {
        let Some(expanded) = ph.expand(entry) else {
            continue;
        };
        let path = resolve(Path::new(&expanded));
        let what = if path == Path::new("/") {
            "the root directory"
        } else if caller_home.as_deref() == Some(path.as_path()) {
            "your HOME"
        } else {
            continue;
        };
        let hint = if entry.contains("{workdir}") {
            " (`sandbox run` uses the current directory as {workdir}: pass --workdir with a project directory)"
        } else if entry.contains("{home}") {
            " (pass a --home of its own, or none for a fresh one)"
        } else {
            ""
        };
        return Err(PlanError::BroadRule {
            list,
            entry: entry.clone(),
            path,
            what,
            right,
            hint,
        });
    }
    Ok(())
}

/// The caller's HOME: the environment's, else the passwd entry of our uid.
fn caller_home() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(h));
    }
    let me = rustix::process::getuid().as_raw().to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 6 && fields[2] == me).then(|| PathBuf::from(fields[5]))
    })
}

fn missing_placeholder(entry: &str) -> PlanError {
    let (placeholder, hint) = if entry.contains("{socket}") {
        ("{socket}", " (pass --socket, or run it from a deployment)")
    } else {
        ("{cmd_dir}", " (the command was not found on PATH)")
    };
    PlanError::MissingPlaceholder {
        entry: entry.to_string(),
        placeholder,
        hint,
    }
}

fn lookup_user(name: &str) -> Result<Ids, PlanError> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(PlanError::ReadPasswd)?;
    if let Ok(uid) = name.parse::<u32>() {
        return Ok(Ids { uid, gid: uid });
    }
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == name {
            if let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse()) {
                return Ok(Ids { uid, gid });
            }
        }
    }
    Err(PlanError::UnknownUser {
        name: name.to_string(),
    })
}

/// `/proc/self/exe sandbox-exec --parent-pid <us> --plan-fd 3 -- argv`, with
/// `plan` (a memfd holding the plan, or a socket the plan arrives on later)
/// placed on fd 3 in the child. The one way an agent's helper is started.
pub fn helper_command(
    argv: &[impl AsRef<std::ffi::OsStr>],
    plan: OwnedFd,
) -> std::process::Command {
    const PLAN_FD: i32 = 3;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    // --parent-pid: the helper exits at once if we are already gone (its
    // parent-death signal could not tell it).
    cmd.arg("sandbox-exec")
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .arg("--plan-fd")
        .arg(PLAN_FD.to_string())
        .arg("--")
        .args(argv);
    pass_plan_fd(&mut cmd, plan, PLAN_FD);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ph() -> Placeholders {
        Placeholders {
            workdir: "/w".into(),
            home: "/h".into(),
            tmp: "/h/tmp".into(),
            socket: None,
            cordon: "/bin/cordon".into(),
            cmd_dir: None,
        }
    }

    #[test]
    fn builds_and_round_trips() {
        let profile = Profile::parse(
            "user = \"auto\"\nuid_range = [5000, 5009]\nwrite = [\"{workdir}\", \"{tmp}\"]\n[env]\nset = { HOME = \"{home}\" }\n[limits]\npids = 10\n",
            Path::new("p.toml"),
        )
        .unwrap();
        let input = PlanInput {
            name: "coder",
            placeholders: &ph(),
            root: true,
            uid_index: 2,
            adhoc: false,
        };
        let plan = Plan::build(&profile, &input).unwrap();
        assert_eq!(
            plan.write,
            vec![PathBuf::from("/w"), PathBuf::from("/h/tmp")]
        );
        assert_eq!(plan.env_set["HOME"], "/h");
        assert_eq!(
            plan.user,
            Some(Ids {
                uid: 5002,
                gid: 5002
            })
        );
        assert_eq!(plan.cgroup.as_deref(), Some("cordon/coder"));
        let fd = plan.to_memfd().unwrap();
        let back = Plan::read_from(File::from(fd), "memfd").unwrap();
        assert_eq!(back, plan);

        // Not root: limits cannot be enforced, so strict refuses and best-effort drops them.
        let not_root = PlanInput {
            root: false,
            ..input
        };
        let err = Plan::build(&profile, &not_root).unwrap_err().to_string();
        assert!(err.contains("root"), "{err}");
        let mut lenient = profile.clone();
        lenient.require = Require::BestEffort;
        let plan = Plan::build(&lenient, &not_root).unwrap();
        assert_eq!(plan.user, None);
        assert_eq!(plan.cgroup, None);
    }

    #[test]
    fn write_or_exec_on_root_or_the_callers_home_is_refused() {
        let input = |ph| PlanInput {
            name: "a",
            placeholders: ph,
            root: false,
            uid_index: 0,
            adhoc: true,
        };
        let profile = Profile::parse(
            "require = \"best-effort\"\nwrite = [\"{workdir}\"]\nexec = [\"{home}/bin\"]\n",
            Path::new("p"),
        )
        .unwrap();
        let mut at_root = ph();
        at_root.workdir = "/".into();
        let err = Plan::build(&profile, &input(&at_root))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("root directory") && err.contains("--workdir"),
            "{err}"
        );
        // exec on "/" too, and "/." is still "/".
        let profile = Profile::parse(
            "require = \"best-effort\"\nexec = [\"/.\"]\n",
            Path::new("p"),
        )
        .unwrap();
        let plain = ph();
        assert!(Plan::build(&profile, &input(&plain)).is_err());
        if let Some(home) = caller_home() {
            let mut at_home = ph();
            at_home.workdir = home;
            let profile = Profile::parse(
                "require = \"best-effort\"\nwrite = [\"{workdir}\"]\n",
                Path::new("p"),
            )
            .unwrap();
            let err = Plan::build(&profile, &input(&at_home))
                .unwrap_err()
                .to_string();
            assert!(err.contains("your HOME"), "{err}");
        }
    }

    #[test]
    fn auto_uids_are_never_shared_and_adhoc_runs_have_their_own_range() {
        let profile = Profile::parse(
            "user = \"auto\"\nuid_range = [5000, 5009]\n",
            Path::new("p.toml"),
        )
        .unwrap();
        let ph = ph();
        let input = |uid_index, adhoc| PlanInput {
            name: "a",
            placeholders: &ph,
            root: true,
            uid_index,
            adhoc,
        };
        let uid =
            |p: &Profile, i, adhoc| Plan::build(p, &input(i, adhoc)).map(|p| p.user.unwrap().uid);
        assert_eq!(uid(&profile, 9, false).unwrap(), 5009);
        let err = uid(&profile, 10, false).unwrap_err().to_string();
        assert!(err.contains("widen the range"), "{err}");
        // Ad hoc: a hash, reduced into the range.
        assert_eq!(uid(&profile, 12, true).unwrap(), 5002);
        // Without uid_range: deployments and ad-hoc runs use disjoint ranges.
        let default = Profile::parse("user = \"auto\"\n", Path::new("p.toml")).unwrap();
        assert_eq!(
            uid(&default, 3, false).unwrap(),
            DEPLOYMENT_UID_RANGE[0] + 3
        );
        for hash in [0, 7, 999, 1000, u32::MAX] {
            let u = uid(&default, hash, true).unwrap();
            assert!(
                (ADHOC_UID_RANGE[0]..=ADHOC_UID_RANGE[1]).contains(&u),
                "{u}"
            );
        }
        assert!(ADHOC_UID_RANGE[1] < DEPLOYMENT_UID_RANGE[0]);
    }

    #[test]
    fn missing_socket_drops_the_rule_but_not_an_env_value() {
        let input = PlanInput {
            name: "x",
            placeholders: &ph(),
            root: false,
            uid_index: 0,
            adhoc: false,
        };
        let profile =
            Profile::parse("[net]\nconnect_unix = [\"{socket}\"]\n", Path::new("p")).unwrap();
        assert!(Plan::build(&profile, &input)
            .unwrap()
            .connect_unix
            .is_empty());
        let profile =
            Profile::parse("[env]\nset = { S = \"{socket}\" }\n", Path::new("p")).unwrap();
        let err = Plan::build(&profile, &input).unwrap_err().to_string();
        assert!(err.contains("{socket}"), "{err}");
    }
}
