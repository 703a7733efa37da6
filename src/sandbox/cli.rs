//! `cordon sandbox run|probe` and the hidden `cordon sandbox-exec`.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use super::exec::{self, EXIT_SETUP_FAILED};
use super::limits::{self, Layout, LimitsError};
use super::plan::{Plan, PlanError, PlanInput};
use super::probe;
use super::profile::{Placeholders, Profile, ProfileError};

#[derive(clap::Subcommand)]
pub enum SandboxCommand {
    /// Run a command inside a sandbox profile (what an agent gets), and wait for it.
    ///
    /// Exits with the command's status (128+N when killed by signal N), 125 when
    /// the sandbox could not be set up, 126/127 when the command cannot be run.
    Run(RunArgs),
    /// Show what this kernel can enforce, and with --profile what that profile
    /// would get here and what it would lose.
    Probe(ProbeArgs),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Sandbox profile (TOML).
    #[arg(long)]
    pub profile: PathBuf,
    /// The command's working directory, `{workdir}` (default: the current directory).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// The agent's HOME, `{home}` (default: a fresh private directory, removed afterwards).
    #[arg(long)]
    pub home: Option<PathBuf>,
    /// The agent's gateway socket, `{socket}`.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Agent name (cgroup name, `auto` uid).
    #[arg(long, default_value = "run")]
    pub name: String,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// Also show what this profile would get here.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// `{workdir}` for the profile (default: the current directory).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// `{home}` for the profile (default: a fresh directory per run).
    #[arg(long)]
    pub home: Option<PathBuf>,
    /// `{socket}` for the profile.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// A command, to resolve `{cmd_dir}` (default: none).
    #[arg(last = true)]
    pub command: Vec<OsString>,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Read the plan (JSON) from this inherited file descriptor.
    #[arg(long, conflicts_with = "plan")]
    pub plan_fd: Option<i32>,
    /// Read the plan (JSON) from this file.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// The supervisor's pid, captured by it before spawning us: the helper
    /// exits at once if its parent is not (or no longer) that process.
    #[arg(long)]
    pub parent_pid: i32,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error("cannot resolve {what} {path}: {source}")]
    Resolve {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot hand {path} to uid {uid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        source: std::io::Error,
    },
    #[error("refusing {path} as the agent's {what}: {why}")]
    AgentDir {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("cannot start the sandbox helper: {0}")]
    Spawn(std::io::Error),
    #[error("cannot wait for the sandboxed command: {0}")]
    Wait(std::io::Error),
    #[error("give either --plan-fd N (an open, inherited fd above 2) or --plan FILE")]
    NoPlan,
}

pub fn main(command: SandboxCommand) -> ExitCode {
    match command {
        SandboxCommand::Run(args) => match run(args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("cordon: {e}");
                ExitCode::from(EXIT_SETUP_FAILED)
            }
        },
        SandboxCommand::Probe(args) => match probe_cmd(args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("cordon: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `cordon sandbox-exec`: returns only on failure (the command replaced us).
pub fn exec_main(args: ExecArgs) -> ExitCode {
    let plan = match read_plan(&args) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("cordon sandbox-exec: {e}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    let Some(parent) = rustix::process::Pid::from_raw(args.parent_pid) else {
        eprintln!(
            "cordon sandbox-exec: --parent-pid {} is not a process id",
            args.parent_pid
        );
        return ExitCode::from(EXIT_SETUP_FAILED);
    };
    let Err(e) = exec::sandbox_exec(&plan, &args.command, parent);
    eprintln!("cordon sandbox-exec: {e}");
    ExitCode::from(e.exit_code())
}

fn read_plan(args: &ExecArgs) -> Result<Plan, CliError> {
    match (args.plan_fd, &args.plan) {
        (Some(fd), None) => {
            use std::os::fd::FromRawFd;
            // Only an fd that is open (and not stdio) can be taken over: owning
            // a closed one would abort on drop.
            // SAFETY: F_GETFD reads the fd's flags and touches no memory.
            if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(CliError::NoPlan);
            }
            // SAFETY: by the sandbox-exec contract the parent placed the plan on
            // this fd for us alone; nothing else in this fresh process owns it,
            // and the File closes it once read.
            let file = unsafe { fs::File::from_raw_fd(fd) };
            Ok(Plan::read_from(file, &format!("fd {fd}"))?)
        }
        (None, Some(path)) => Ok(Plan::load(path)?),
        _ => Err(CliError::NoPlan),
    }
}

/// A per-run HOME that is removed when the run ends.
struct FreshHome(PathBuf);

impl Drop for FreshHome {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Creates a 0700 directory; `Ok(false)` when it already existed.
fn make_private_dir(path: &Path) -> Result<bool, CliError> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(CliError::CreateDir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A new private directory in the temp dir. Never one that already exists:
/// in a shared /tmp another user could have planted it (or a symlink) to be
/// handed to the agent, or chowned by us.
fn make_fresh_home() -> Result<PathBuf, CliError> {
    let mut last = PathBuf::new();
    for attempt in 0..16u32 {
        last = fresh_home_path(attempt);
        if make_private_dir(&last)? {
            return Ok(last);
        }
    }
    Err(CliError::CreateDir {
        path: last,
        source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
    })
}

fn canonical(what: &'static str, path: &Path) -> Result<PathBuf, CliError> {
    fs::canonicalize(path).map_err(|source| CliError::Resolve {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// An absolute path without resolving symlinks: the helper resolves rule
/// paths itself and refuses symlinks the agent may have planted, which a
/// canonical path would hide.
fn absolute(what: &'static str, path: &Path) -> Result<PathBuf, CliError> {
    std::path::absolute(path).map_err(|source| CliError::Resolve {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// `{home}` and `{tmp}` must be real directories (lstat: a symlink there may
/// be one the agent planted in an earlier run, to have this run hand it, and
/// chown, a directory elsewhere) owned by one of `owners` (any, when empty).
fn check_agent_dir(what: &'static str, path: &Path, owners: &[u32]) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| CliError::AgentDir {
        what,
        path: path.to_path_buf(),
        why,
    };
    let meta = fs::symlink_metadata(path).map_err(|e| refuse(e.to_string()))?;
    if meta.file_type().is_symlink() {
        return Err(refuse("it is a symlink, not a directory".into()));
    }
    if !meta.is_dir() {
        return Err(refuse("it is not a directory".into()));
    }
    if !owners.is_empty() && !owners.contains(&meta.uid()) {
        return Err(refuse(format!(
            "it is owned by uid {}, expected {}",
            meta.uid(),
            owners
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    Ok(())
}

fn fresh_home_path(attempt: u32) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "cordon-home-{}-{nanos:x}-{attempt}",
        std::process::id()
    ))
}

/// PATH as the sandbox will see it, to resolve `{cmd_dir}`.
fn sandbox_path(profile: &Profile) -> String {
    if let Some(p) = profile.env.set.get("PATH") {
        return p.clone();
    }
    if profile.env.pass.iter().any(|p| p == "PATH") {
        if let Ok(p) = std::env::var("PATH") {
            return p;
        }
    }
    "/usr/local/bin:/usr/bin:/bin".to_string()
}

fn cmd_dir(profile: &Profile, command: &[OsString]) -> Option<PathBuf> {
    let cmd = command.first()?;
    let found = exec::find_on_path(cmd, &sandbox_path(profile))?;
    Some(fs::canonicalize(found).ok()?.parent()?.to_path_buf())
}

/// A stable number per agent name, for its `auto` uid (reduced into the
/// profile's `uid_range`, by default the ad-hoc range, never the deployments').
fn name_index(name: &str) -> u32 {
    // FNV-1a: stable across runs and builds, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; pid is our child's.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The command runs in its own session, out of reach of the terminal's
/// signals; pass on the ones that mean "stop".
fn forward_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installs a handler that only calls kill (async-signal-safe)
        // and reads an atomic; the sigaction struct is fully initialised.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

fn run(args: RunArgs) -> Result<u8, CliError> {
    let profile = Profile::load(&args.profile)?;
    let workdir = absolute(
        "--workdir",
        &args.workdir.clone().unwrap_or_else(|| PathBuf::from(".")),
    )?;
    // `fresh`: removed when the run ends. `created`: ours to hand to the agent's
    // uid (a --home that already existed keeps its owner).
    let (home, _fresh, created) = match &args.home {
        Some(h) => {
            let h = absolute("--home", h)?;
            let created = make_private_dir(&h)?;
            (h, None, created)
        }
        None => {
            let h = make_fresh_home()?;
            (h.clone(), Some(FreshHome(h)), true)
        }
    };
    check_agent_dir("{home}", &home, &[])?;
    let tmp = home.join("tmp");
    let tmp_created = make_private_dir(&tmp)?;
    check_agent_dir("{tmp}", &tmp, &[])?;
    let cordon = std::env::current_exe()
        .and_then(fs::canonicalize)
        .map_err(|source| CliError::Resolve {
            what: "the cordon binary",
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
    let placeholders = Placeholders {
        workdir,
        home: home.clone(),
        tmp: tmp.clone(),
        socket: args.socket.clone(),
        cordon,
        cmd_dir: cmd_dir(&profile, &args.command),
    };
    let root = rustix::process::geteuid().is_root();
    let mut plan = Plan::build(
        &profile,
        &PlanInput {
            name: &args.name,
            placeholders: &placeholders,
            root,
            uid_index: name_index(&args.name),
            adhoc: true,
        },
    )?;
    if plan.limits.needs_cgroup() && plan.cgroup.is_none() {
        eprintln!("cordon: sandbox (best-effort): dropped the cgroup limits (they need root)");
    }
    // One cgroup per run, so concurrent runs of the same name never share limits.
    if let Some(cg) = &mut plan.cgroup {
        cg.push_str(&format!("-{}", std::process::id()));
    }
    // Directories we made go to the agent (lchown: never through a link); ones
    // that existed must belong to the agent or to us, or someone else prepared them.
    let me = rustix::process::geteuid().as_raw();
    let agent = plan.user.map_or(me, |ids| ids.uid);
    for (what, dir, made) in [("{home}", &home, created), ("{tmp}", &tmp, tmp_created)] {
        match plan.user {
            Some(ids) if made => {
                std::os::unix::fs::lchown(dir, Some(ids.uid), Some(ids.gid)).map_err(|source| {
                    CliError::Chown {
                        path: dir.to_path_buf(),
                        uid: ids.uid,
                        source,
                    }
                })?;
            }
            _ => {}
        }
        check_agent_dir(what, dir, &[agent, me])?;
    }

    // The helper process: a fork of this one, which is single-threaded (no
    // runtime is started for `sandbox run`), so the child may allocate and run
    // the whole sequence; the orchestrator, which has threads, re-executes
    // /proc/self/exe into `sandbox-exec` instead. Same function either way.
    exec::ensure_single_threaded().map_err(CliError::Spawn)?;
    // Our pid, for the child's parent-death check: taken before the fork.
    let parent = rustix::process::getpid();
    // SAFETY: fork in a single-threaded process: the child is a full copy with
    // no other thread that could have held a lock, so it may do anything the
    // parent could, and it ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(CliError::Spawn(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let Err(e) = exec::sandbox_exec(&plan, &args.command, parent);
        eprintln!("cordon: {e}");
        // SAFETY: _exit ends the child without running the parent's exit-time
        // cleanup (the fresh home's Drop) twice.
        unsafe { libc::_exit(i32::from(e.exit_code())) };
    }
    CHILD.store(pid, Ordering::Relaxed);
    forward_signals();
    let status = wait_for(pid)?;
    CHILD.store(0, Ordering::Relaxed);

    if let Some(rel) = &plan.cgroup {
        let layout = Layout::detect();
        if limits::oom_killed(&layout, rel) {
            eprintln!(
                "cordon: the sandbox's memory limit ({} bytes) was reached; the kernel killed a process in it",
                plan.limits.memory.unwrap_or(0)
            );
        }
        if let Err(e) = limits::remove_cgroup(&layout, &plan.limits, rel) {
            eprintln!("cordon: {e}");
        }
    }
    Ok(status)
}

/// The exit status to pass on: the command's code, or 128+N for signal N.
fn wait_for(pid: i32) -> Result<u8, CliError> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or(CliError::Wait(std::io::Error::from(
        std::io::ErrorKind::InvalidInput,
    )))?;
    loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
            Ok(Some((_, status))) => {
                if let Some(code) = status.exit_status() {
                    return Ok(u8::try_from(code).unwrap_or(1));
                }
                if let Some(sig) = status.terminating_signal() {
                    return Ok(128u8.saturating_add(u8::try_from(sig).unwrap_or(0)));
                }
            }
            Ok(None) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(CliError::Wait(e.into())),
        }
    }
}

fn probe_cmd(args: ProbeArgs) -> Result<u8, CliError> {
    let mut out = probe::kernel_report();
    let mut code = 0;
    if let Some(path) = &args.profile {
        let profile = Profile::load(path)?;
        let workdir = canonical(
            "--workdir",
            &args.workdir.clone().unwrap_or_else(|| PathBuf::from(".")),
        )?;
        let home = args.home.clone().unwrap_or_else(|| fresh_home_path(0));
        let cordon = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cordon"));
        let placeholders = Placeholders {
            workdir,
            tmp: home.join("tmp"),
            home,
            socket: args.socket.clone(),
            cordon,
            cmd_dir: cmd_dir(&profile, &args.command),
        };
        let root = rustix::process::geteuid().is_root();
        let built = Plan::build(
            &profile,
            &PlanInput {
                name: "probe",
                placeholders: &placeholders,
                root,
                uid_index: name_index("probe"),
                adhoc: true,
            },
        );
        let plan = match built {
            Ok(plan) => plan,
            Err(e) => {
                out.push_str(&format!(
                    "\nprofile {}:\n  would refuse: {e}\n",
                    path.display()
                ));
                print!("{out}");
                return Ok(1);
            }
        };
        let (text, would_run) = probe::plan_report(path, &plan, args.home.is_none());
        out.push_str(&text);
        if !would_run {
            code = 1;
        }
    }
    print!("{out}");
    Ok(code)
}
