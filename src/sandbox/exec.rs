//! `cordon sandbox-exec`: apply a plan to this process, then execve the command.
//!
//! Runs in a fresh, single-threaded process (the parent re-executes
//! /proc/self/exe into it): no runtime threads, so thread-directed credential
//! calls cover the whole process, and allocating between steps is harmless.

use std::convert::Infallible;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use super::landlock::{self, LandlockError};
use super::limits::{self, Layout, LimitsError};
use super::plan::Plan;
use super::privileges::{self, PrivilegesError};
use super::profile::Require;
use super::seccomp::{self, SeccompError};

/// Exit status of the helper when the sandbox could not be set up (the command
/// never ran), as `env` and container runtimes do; 126/127 keep their shell
/// meanings (found but not executable / not found).
pub const EXIT_SETUP_FAILED: u8 = 125;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    NotSingleThreaded(std::io::Error),
    #[error("cannot start a new session: {0}")]
    NewSession(std::io::Error),
    #[error("cannot set the parent-death signal: {0}")]
    ParentDeathSignal(std::io::Error),
    #[error("the parent (pid {expected}) exited before the sandbox was set up (our parent is now {actual})")]
    ParentGone { expected: i32, actual: i32 },
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error("cannot close inherited file descriptors: {0}")]
    CloseFds(std::io::Error),
    #[error(transparent)]
    Landlock(#[from] LandlockError),
    #[error(transparent)]
    Privileges(#[from] PrivilegesError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("cannot change to the working directory {path}: {source}")]
    Chdir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no command given")]
    NoCommand,
    #[error("command {cmd:?} not found on PATH {path:?}")]
    CommandNotFound { cmd: OsString, path: String },
    #[error("cannot execute {cmd}: {source}")]
    Execve {
        cmd: PathBuf,
        source: std::io::Error,
    },
}

impl ExecError {
    /// Shell conventions for exec failures; 125 for everything before.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::CommandNotFound { .. } => 127,
            ExecError::Execve { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                127
            }
            ExecError::Execve { .. } => 126,
            _ => EXIT_SETUP_FAILED,
        }
    }
}

/// The privilege sequence. One linear function on purpose: the order is the
/// security argument, and each step says why it sits where it does.
///
/// `parent` is the supervisor's pid as the supervisor captured it before the
/// fork or spawn. Reading getppid() here instead would be too late: had the
/// supervisor already died, it would name the reaper we were re-parented to,
/// and the parent-death signal would never come.
pub fn sandbox_exec(
    plan: &Plan,
    argv: &[OsString],
    parent: rustix::process::Pid,
) -> Result<Infallible, ExecError> {
    // 0. The credential calls below change the calling thread only; with a
    // second thread alive it would keep root. Checked, not assumed. And an
    // orphan stops here, before doing anything.
    check_parent(parent)?;
    ensure_single_threaded().map_err(ExecError::NotSingleThreaded)?;

    // 1. New session, parent-death signal. First, so that from here on the
    // helper and the command cannot outlive their supervisor, and so that the
    // command has no controlling terminal (no TIOCSTI typing into the
    // operator's shell, no signals from its job control).
    rustix::process::setsid().map_err(|e| ExecError::NewSession(e.into()))?;
    arm_parent_death_signal(parent)?;

    // 2. The agent's cgroup and its limits. Before anything can fork, so every
    // process the agent ever starts is born inside and counted; while we are
    // still root, since cgroupfs is root's.
    if let Some(rel) = &plan.cgroup {
        limits::join_cgroup(&Layout::detect(), &plan.limits, rel)?;
    }

    // 3. rlimits. Before the uid switch: raising a hard limit needs privilege,
    // and NPROC must already be in force when the first fork as the agent happens.
    limits::set_rlimits(&plan.limits, plan.user.is_some())?;

    // 4. Close every inherited fd above 2, then build the environment from the
    // allowlist. An inherited fd (a store file, an admin socket) is access that
    // no Landlock rule can take back, so none survives; this comes before we
    // open fds of our own below.
    close_inherited_fds()?;
    let env = build_env(plan);
    let program = resolve_command(argv, &env)?;

    // 5. Open the Landlock path fds and build the ruleset, and compile the
    // seccomp filters. Both before dropping privileges: the paths are opened by
    // the caller (DAC still applies to the agent afterwards: a rule grants
    // nothing the uid could not do), and nothing after the uid switch needs to
    // allocate or parse.
    let abi = landlock::kernel_abi();
    // Whether the agent has a uid of its own decides whether anything stands
    // in for RESOLVE_UNIX on kernels without it.
    let dropped = landlock::check(plan.require, abi, plan.user.is_some())?;
    if plan.require == Require::BestEffort {
        for f in dropped.iter().filter(|f| f.required) {
            eprintln!(
                "cordon: sandbox (best-effort): dropped {} (needs Landlock ABI {}, kernel has {abi})",
                f.right, f.abi
            );
        }
    }
    let ruleset = if abi > 0 {
        Some(landlock::build(
            plan,
            landlock::open_rules(plan, abi)?,
            abi,
        )?)
    } else {
        None
    };
    let filters = seccomp::build()?;

    // 6. Lock securebits, drop the bounding and ambient sets. Needs
    // CAP_SETPCAP, so before the uid switch removes it; afterwards no execve
    // (not of a setuid-root binary, not as uid 0) can give capabilities back.
    let have_setpcap = privileges::can_setpcap()?;
    // Root must end with an empty bounding set: one that lacks CAP_SETPCAP
    // (a container that dropped it) cannot lock the securebits or clear the
    // bounding set, and is refused rather than run half-dropped (step 8
    // checks the bounding set is empty whenever we were root).
    let was_root = rustix::process::geteuid().is_root();
    if was_root && !have_setpcap {
        return Err(PrivilegesError::RootWithoutSetpcap.into());
    }
    if have_setpcap {
        privileges::lock_securebits()?;
    }
    privileges::drop_bounding_and_ambient(have_setpcap)?;

    // 7. Switch to the agent's uid: groups, gid, uid, in that order (each needs
    // the privilege the next one removes). A credential change clears the
    // parent-death signal, so it is armed again. chdir after the switch, so the
    // working directory is one the agent itself may enter.
    if let Some(ids) = plan.user {
        privileges::switch_user(ids)?;
        arm_parent_death_signal(parent)?;
    }
    std::env::set_current_dir(&plan.workdir).map_err(|source| ExecError::Chdir {
        path: plan.workdir.clone(),
        source,
    })?;

    // 8. Clear the capability sets and verify they are empty. With
    // NO_SETUID_FIXUP (or when the agent stays root) the switch did not clear
    // them; reading them back turns "should be empty" into "is empty".
    privileges::clear_and_verify_caps(have_setpcap || was_root)?;

    // 9. no_new_privs: Landlock and seccomp both require it from a process
    // without CAP_SYS_ADMIN, and it makes setuid binaries inert for good.
    privileges::set_no_new_privs()?;

    // 10. Landlock. After no_new_privs, which it requires of a process without
    // CAP_SYS_ADMIN; after everything that opens a path (rule fds, the command
    // lookup, chdir), since the domain cannot be left and only execve follows.
    if let Some(ruleset) = ruleset {
        landlock::restrict_self(ruleset, abi)?;
    }

    // 11. seccomp last. The setup itself makes calls an agent has no use for
    // (capset, setresuid, prctl, landlock_*); installed after them, the filter
    // never has to allow anything for our sake, and can be tightened (even into
    // an allow list) without reordering the sequence.
    seccomp::install(&filters)?;

    // 12. execve. The environment is exactly the allowlist.
    let err = std::process::Command::new(&program)
        .arg0(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(env)
        .exec();
    Err(ExecError::Execve {
        cmd: program,
        source: err,
    })
}

/// The process has exactly one thread (from /proc/self/status).
pub fn ensure_single_threaded() -> std::io::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .map(|n| n.trim().to_string())
        .unwrap_or_default();
    if threads != "1" {
        return Err(std::io::Error::other(format!(
            "the sandbox sequence must run single-threaded (fork or exec a fresh helper), but this process has {threads} threads"
        )));
    }
    Ok(())
}

/// Our parent is still `parent` (the supervisor has not died and left us
/// re-parented).
fn check_parent(parent: rustix::process::Pid) -> Result<(), ExecError> {
    let actual = rustix::process::getppid();
    if actual != Some(parent) {
        return Err(ExecError::ParentGone {
            expected: parent.as_raw_nonzero().get(),
            actual: actual.map_or(0, |p| p.as_raw_nonzero().get()),
        });
    }
    Ok(())
}

/// PR_SET_PDEATHSIG, then a check that the parent is still the one we had: if
/// it died before the prctl, no signal will ever come.
fn arm_parent_death_signal(parent: rustix::process::Pid) -> Result<(), ExecError> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| ExecError::ParentDeathSignal(e.into()))?;
    check_parent(parent)
}

fn close_inherited_fds() -> Result<(), ExecError> {
    // SAFETY: close_range(3, ~0, 0) closes descriptors this process does not
    // use: the helper holds no fds above 2 here (the plan fd was read and
    // dropped), and std opens none behind our back in a single thread.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(ExecError::CloseFds(err));
    }
    // Kernels before 5.9: list /proc/self/fd (collect first: the listing itself
    // holds an fd).
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(ExecError::CloseFds)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: as above; an fd already closed (the listing's own) gives EBADF.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// `env.pass` (exact names, or `PREFIX*`) from our environment, then `env.set`.
pub fn build_env(plan: &Plan) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.as_bytes();
            plan.env_pass.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => k.starts_with(prefix.as_bytes()),
                None => k == p.as_bytes(),
            })
        })
        .filter(|(k, _)| !plan.env_set.contains_key(k.to_string_lossy().as_ref()))
        .collect();
    env.extend(
        plan.env_set
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v))),
    );
    env.sort();
    env
}

/// The command as an absolute path, found on the sandbox's own PATH (not
/// cordon's), so what runs is what the agent itself would find.
fn resolve_command(argv: &[OsString], env: &[(OsString, OsString)]) -> Result<PathBuf, ExecError> {
    let cmd = argv.first().ok_or(ExecError::NoCommand)?;
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".to_string());
    find_on_path(cmd, &path).ok_or_else(|| ExecError::CommandNotFound {
        cmd: cmd.clone(),
        path,
    })
}

pub fn find_on_path(cmd: &OsStr, path: &str) -> Option<PathBuf> {
    if cmd.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(cmd));
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}
