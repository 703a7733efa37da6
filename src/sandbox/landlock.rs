//! Landlock: filesystem rights per path, TCP ports, and the abstract-socket and
//! signal scopes.
//!
//! The `landlock` crate in best-effort mode silently drops what the kernel lacks,
//! so we decide ourselves: [`features`] lists every protection a plan relies on
//! with the ABI it needs, [`check`] refuses (strict) or reports (best-effort)
//! what this kernel cannot enforce, and the ruleset is then built in
//! hard-requirement mode for exactly what remains, so the crate can only fail
//! loudly, never degrade quietly.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, Ruleset,
    RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::plan::Plan;
use super::profile::Require;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("the kernel cannot enforce {right} (needs Landlock ABI {needed}, this kernel has {have}); refusing to run — set require = \"best-effort\" in the profile to run without it")]
    Unsupported {
        right: &'static str,
        needed: i32,
        have: i32,
    },
    #[error("the kernel cannot confine connect() to pathname unix sockets (RESOLVE_UNIX needs Landlock ABI {needed}, this kernel has {have}), and the agent would share cordon's uid, so it could connect to any socket that uid can reach (the user's systemd bus, docker.sock, cordon's admin socket); refusing to run — run cordon as root with user = \"auto\" so the agent gets a dedicated uid, or set require = \"best-effort\" in the profile to accept this")]
    UnixSocketsShared { needed: i32, have: i32 },
    #[error("cannot open {path} for a Landlock rule: {source}")]
    OpenPath {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing the rule path {path}: {link} is a symlink inside {writable}, which the agent may write (a link it planted in an earlier run would point a rule, opened with cordon's privileges, anywhere)")]
    SymlinkInWritable {
        path: PathBuf,
        link: PathBuf,
        writable: PathBuf,
    },
    #[error("cannot resolve the rule path {path}: {source}")]
    ResolvePath {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the Landlock ruleset: {0}")]
    BuildRuleset(landlock::RulesetError),
    #[error("cannot enforce the Landlock ruleset: {0}")]
    RestrictSelf(landlock::RulesetError),
    #[error("Landlock was not fully enforced ({status:?}) although the kernel has ABI {abi}")]
    NotEnforced { status: RulesetStatus, abi: i32 },
}

/// The Landlock ABI of the running kernel; 0 when Landlock is absent or disabled.
pub fn kernel_abi() -> i32 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    // only returns the ABI version (or -1 with errno); it reads no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    i32::try_from(v).unwrap_or(0).max(0)
}

/// One protection the sandbox relies on.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    pub right: &'static str,
    pub abi: i32,
    /// Whether strict mode refuses to run without it. Optional features are
    /// covered by another layer when missing (documented in SECURITY.md).
    pub required: bool,
    pub fallback: &'static str,
}

pub const FEATURES: &[Feature] = &[
    Feature {
        right: "filesystem read/write/execute rules",
        abi: 1,
        required: true,
        fallback: "",
    },
    Feature {
        right: "rename/link between directories (REFER)",
        abi: 2,
        required: true,
        fallback: "",
    },
    Feature {
        right: "truncate (TRUNCATE)",
        abi: 3,
        required: true,
        fallback: "",
    },
    Feature {
        right: "TCP bind/connect by port",
        abi: 4,
        required: true,
        fallback: "",
    },
    Feature {
        right: "device ioctl (IOCTL_DEV)",
        abi: 5,
        required: true,
        fallback: "",
    },
    Feature {
        right: "abstract unix socket scope",
        abi: 6,
        required: true,
        fallback: "",
    },
    Feature {
        right: "signal scope",
        abi: 6,
        required: true,
        fallback: "",
    },
    Feature {
        right: "pathname unix socket connect (RESOLVE_UNIX)",
        abi: RESOLVE_UNIX_ABI,
        required: false,
        fallback: "pathname sockets stay reachable; the agent's dedicated uid, 0700 socket directories and the gateway's peer-credential check stand in (only with a dedicated uid: a strict profile whose agent shares cordon's uid refuses to run)",
    },
    Feature {
        right: "UDP bind/connect/send by port",
        abi: 10,
        required: false,
        fallback: "UDP stays open (DNS, QUIC); TCP is still confined",
    },
];

/// The ABI of Landlock's RESOLVE_UNIX (pathname unix-socket connect).
pub const RESOLVE_UNIX_ABI: i32 = 9;

/// The features this kernel lacks. Strict: the first required one is an error.
///
/// `own_uid`: whether the agent runs under a uid of its own. Without one,
/// nothing stands in for RESOLVE_UNIX (a pathname socket is reachable by
/// whoever shares its owner's uid), so it becomes required.
pub fn check(require: Require, abi: i32, own_uid: bool) -> Result<Vec<Feature>, LandlockError> {
    let missing: Vec<Feature> = FEATURES
        .iter()
        .copied()
        .filter(|f| f.abi > abi)
        .map(|mut f| {
            if f.abi == RESOLVE_UNIX_ABI && !own_uid {
                f.required = true;
            }
            f
        })
        .collect();
    if require == Require::Strict {
        if let Some(f) = missing.iter().find(|f| f.required) {
            if f.abi == RESOLVE_UNIX_ABI {
                return Err(LandlockError::UnixSocketsShared {
                    needed: f.abi,
                    have: abi,
                });
            }
            return Err(LandlockError::Unsupported {
                right: f.right,
                needed: f.abi,
                have: abi,
            });
        }
    }
    Ok(missing)
}

fn abi_enum(abi: i32) -> ABI {
    // The crate knows ABIs up to 10; a newer kernel is driven at 10, and
    // everything we ask for exists there.
    ABI::from(abi.min(10))
}

/// What a plan asks for, per path.
pub fn read_access(abi: ABI) -> BitFlags<AccessFs> {
    (AccessFs::ReadFile | AccessFs::ReadDir) & AccessFs::from_all(abi)
}
pub fn exec_access(abi: ABI) -> BitFlags<AccessFs> {
    read_access(abi) | (AccessFs::from_all(abi) & AccessFs::Execute)
}
/// Everything but Execute (write never implies execute) and ResolveUnix: on
/// ABI ≥ 9 that right is what confines connect() to pathname sockets, and a
/// writable tree (a HOME, a workdir) may hold anyone's socket; only
/// `net.connect_unix` paths get it.
pub fn write_access(abi: ABI) -> BitFlags<AccessFs> {
    AccessFs::from_all(abi) & !(AccessFs::Execute | AccessFs::ResolveUnix)
}

/// A path rule ready to add: the fd is opened before privileges are dropped.
pub struct PathRule {
    pub fd: OwnedFd,
    pub access: BitFlags<AccessFs>,
}

/// One rule path: as the plan has it, and resolved (no symlink left in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulePath {
    pub path: PathBuf,
    pub resolved: PathBuf,
    pub access: BitFlags<AccessFs>,
}

/// The write rule that `candidate` lies strictly inside, if any: a symlink
/// there may have been planted by the agent (in this run or an earlier one).
fn inside_writable<'a>(candidate: &Path, writable: &'a [PathBuf]) -> Option<&'a PathBuf> {
    writable
        .iter()
        .find(|w| candidate != w.as_path() && candidate.starts_with(w))
}

/// Resolves `path` component by component as the kernel would, and refuses a
/// symlink that sits inside a writable directory. Symlinks elsewhere (merged
/// /usr's `/lib -> usr/lib`, root's to set up) are followed. `None`: the path
/// does not exist (a rule for nothing grants nothing).
pub fn resolve_rule_path(
    path: &Path,
    writable: &[PathBuf],
) -> Result<Option<PathBuf>, LandlockError> {
    const MAX_LINKS: u32 = 40; // the kernel's own limit (ELOOP)
    let err = |source: std::io::Error| LandlockError::ResolvePath {
        path: path.to_path_buf(),
        source,
    };
    // A stack of components still to walk, next on top.
    let push = |stack: &mut Vec<OsString>, p: &Path| {
        let mut comps: Vec<OsString> = p.components().map(|c| c.as_os_str().into()).collect();
        comps.reverse();
        stack.extend(comps);
    };
    let mut pending = Vec::new();
    push(&mut pending, path);
    let mut out = PathBuf::from("/");
    let mut links = 0u32;
    while let Some(comp) = pending.pop() {
        match Path::new(&comp).components().next() {
            Some(Component::RootDir) => out = PathBuf::from("/"),
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::Normal(name)) => {
                let candidate = out.join(name);
                let meta = match std::fs::symlink_metadata(&candidate) {
                    Ok(m) => m,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            || e.raw_os_error() == Some(libc::ENOTDIR) =>
                    {
                        return Ok(None);
                    }
                    Err(e) => return Err(err(e)),
                };
                if !meta.file_type().is_symlink() {
                    out = candidate;
                    continue;
                }
                if let Some(w) = inside_writable(&candidate, writable) {
                    return Err(LandlockError::SymlinkInWritable {
                        path: path.to_path_buf(),
                        link: candidate,
                        writable: w.clone(),
                    });
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(err(std::io::Error::from_raw_os_error(libc::ELOOP)));
                }
                let target = std::fs::read_link(&candidate).map_err(err)?;
                // A relative target continues from the link's directory (`out`).
                push(&mut pending, &target);
            }
            _ => {} // `.` and prefixes (none on Unix)
        }
    }
    Ok(Some(out))
}

/// The directories the plan makes writable, as written and as resolved: a
/// symlink inside either form is one the agent may have planted.
fn writable_dirs(plan: &Plan) -> Result<Vec<PathBuf>, LandlockError> {
    let mut writable = plan.write.clone();
    for w in &plan.write {
        if let Some(r) = resolve_rule_path(w, &plan.write)? {
            if !writable.contains(&r) {
                writable.push(r);
            }
        }
    }
    Ok(writable)
}

/// Paths of the plan with the rights each gets (a path in several lists gets
/// the union), and the paths that do not exist (skipped: a rule for nothing
/// grants nothing, and failing would make one profile unusable across distros).
/// A symlink inside a writable directory on the way to any rule path is an error.
pub fn path_rights(plan: &Plan, abi: i32) -> Result<(Vec<RulePath>, Vec<PathBuf>), LandlockError> {
    let abi = abi_enum(abi);
    let writable = writable_dirs(plan)?;
    let mut rights: Vec<RulePath> = Vec::new();
    let mut missing = Vec::new();
    let lists: [(&Vec<PathBuf>, BitFlags<AccessFs>); 4] = [
        (&plan.read, read_access(abi)),
        (&plan.exec, exec_access(abi)),
        (&plan.write, write_access(abi)),
        (
            &plan.connect_unix,
            AccessFs::from_all(abi) & AccessFs::ResolveUnix,
        ),
    ];
    for (paths, access) in lists {
        for path in paths {
            let Some(resolved) = resolve_rule_path(path, &writable)? else {
                if !missing.contains(path) {
                    missing.push(path.clone());
                }
                continue;
            };
            let Ok(meta) = std::fs::symlink_metadata(&resolved) else {
                if !missing.contains(path) {
                    missing.push(path.clone());
                }
                continue;
            };
            // Directory-only rights on a file make the kernel reject the rule.
            let access = if meta.is_dir() {
                access
            } else {
                access & AccessFs::from_file(abi)
            };
            if access.is_empty() {
                continue;
            }
            match rights.iter_mut().find(|r| r.resolved == resolved) {
                Some(r) => r.access |= access,
                None => rights.push(RulePath {
                    path: path.clone(),
                    resolved,
                    access,
                }),
            }
        }
    }
    Ok((rights, missing))
}

/// Opens the rule paths (as the caller, before any privilege is dropped). The
/// resolved path is opened with RESOLVE_NO_SYMLINKS: a directory swapped for a
/// symlink since it was checked makes the open fail instead of following it.
pub fn open_rules(plan: &Plan, abi: i32) -> Result<Vec<PathRule>, LandlockError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
    let (rights, _missing) = path_rights(plan, abi)?;
    rights
        .into_iter()
        .map(|r| {
            let fd = rustix::fs::openat2(
                CWD,
                &r.resolved,
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::NO_SYMLINKS,
            )
            .map_err(|e| LandlockError::OpenPath {
                path: r.resolved.clone(),
                source: e.into(),
            })?;
            Ok(PathRule {
                fd,
                access: r.access,
            })
        })
        .collect()
}

/// Builds (but does not enforce) the ruleset for this kernel's ABI.
pub fn build(plan: &Plan, rules: Vec<PathRule>, abi: i32) -> Result<RulesetCreated, LandlockError> {
    let e = LandlockError::BuildRuleset;
    let abi_e = abi_enum(abi);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi_e))
        .map_err(e)?;
    let net = AccessNet::from_all(abi_e);
    if !net.is_empty() {
        ruleset = ruleset.handle_access(net).map_err(e)?;
    }
    let scopes = Scope::from_all(abi_e);
    if !scopes.is_empty() {
        ruleset = ruleset.scope(scopes).map_err(e)?;
    }
    let mut created = ruleset.create().map_err(e)?;
    for rule in rules {
        created = created
            .add_rule(PathBeneath::new(rule.fd, rule.access))
            .map_err(e)?;
    }
    if abi >= 4 {
        for &port in &plan.connect_tcp {
            created = created
                .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
                .map_err(e)?;
        }
        for &port in &plan.bind_tcp {
            created = created
                .add_rule(NetPort::new(port, AccessNet::BindTcp))
                .map_err(e)?;
        }
    }
    Ok(created)
}

/// Enforces the ruleset on this process (and everything it execs).
pub fn restrict_self(ruleset: RulesetCreated, abi: i32) -> Result<(), LandlockError> {
    let status = ruleset
        .restrict_self()
        .map_err(LandlockError::RestrictSelf)?;
    if abi > 0 && status.ruleset != RulesetStatus::FullyEnforced {
        return Err(LandlockError::NotEnforced {
            status: status.ruleset,
            abi,
        });
    }
    Ok(())
}

/// Rights as names, for the probe.
pub fn names(access: BitFlags<AccessFs>) -> String {
    access
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_refuses_what_the_kernel_lacks() {
        let err = check(Require::Strict, 3, true).unwrap_err().to_string();
        assert!(
            err.contains("TCP bind/connect") && err.contains("ABI 4"),
            "{err}"
        );
        assert!(check(Require::Strict, 0, true).is_err());
        let dropped = check(Require::BestEffort, 3, true).unwrap();
        assert!(dropped.iter().any(|f| f.abi == 4));
        // With a dedicated uid, ResolveUnix and UDP are covered elsewhere:
        // strict still runs on ABI 6.
        let missing = check(Require::Strict, 6, true).unwrap();
        assert!(missing.iter().all(|f| !f.required));
        assert!(check(Require::Strict, 10, true).unwrap().is_empty());
        assert!(check(Require::Strict, 10, false).unwrap().is_empty());
    }

    #[test]
    fn strict_without_a_dedicated_uid_needs_resolve_unix() {
        let err = check(Require::Strict, 7, false).unwrap_err().to_string();
        assert!(
            err.contains("RESOLVE_UNIX")
                && err.contains("ABI 9")
                && err.contains("user = \"auto\""),
            "{err}"
        );
        assert!(check(Require::Strict, 9, false).is_ok());
        // Best-effort runs, and lists it as a required right it dropped.
        let dropped = check(Require::BestEffort, 7, false).unwrap();
        assert!(dropped
            .iter()
            .any(|f| f.abi == RESOLVE_UNIX_ABI && f.required));
    }

    #[test]
    fn rule_paths_refuse_symlinks_inside_writable_dirs_only() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let (w, real) = (root.join("w"), root.join("real"));
        std::fs::create_dir_all(real.join("sub")).unwrap();
        std::fs::create_dir(&w).unwrap();
        std::os::unix::fs::symlink(&real, w.join("link")).unwrap();
        std::os::unix::fs::symlink("real", root.join("outlink")).unwrap();
        let writable = vec![w.clone()];
        let err = resolve_rule_path(&w.join("link/sub"), &writable).unwrap_err();
        assert!(
            matches!(err, LandlockError::SymlinkInWritable { .. }),
            "{err}"
        );
        // A link outside the writable dirs (root's /lib -> usr/lib) is followed.
        let got = resolve_rule_path(&root.join("outlink/sub"), &writable).unwrap();
        assert_eq!(got, Some(real.join("sub")));
        // The writable dir itself may be a link its (non-writable) parent holds.
        let got = resolve_rule_path(&root.join("outlink"), &[root.join("outlink")]).unwrap();
        assert_eq!(got, Some(real.clone()));
        assert_eq!(
            resolve_rule_path(&root.join("nope/x"), &writable).unwrap(),
            None
        );
    }

    #[test]
    fn access_sets_per_list_and_abi() {
        for abi in [ABI::V7, ABI::V9, ABI::V10] {
            let (r, x, w) = (read_access(abi), exec_access(abi), write_access(abi));
            assert_eq!(r, AccessFs::ReadFile | AccessFs::ReadDir);
            assert_eq!(x, r | AccessFs::Execute);
            for right in [AccessFs::Execute, AccessFs::ResolveUnix] {
                assert!(!w.contains(right), "write has {right:?} on {abi:?}");
            }
            assert_eq!(
                w | AccessFs::Execute,
                AccessFs::from_all(ABI::V8) & AccessFs::from_all(abi)
            );
        }
        // On ABI 9 only a connect_unix path gets ResolveUnix.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let sock = dir.join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let plan = Plan {
            name: "t".into(),
            require: Require::Strict,
            workdir: dir.clone(),
            read: vec![],
            write: vec![dir.clone()],
            exec: vec![],
            connect_tcp: vec![],
            bind_tcp: vec![],
            connect_unix: vec![sock.clone()],
            env_pass: vec![],
            env_set: Default::default(),
            limits: Default::default(),
            cgroup: None,
            user: None,
        };
        let (rights, _) = path_rights(&plan, 9).unwrap();
        let of = |p: &Path| rights.iter().find(|r| r.resolved == p).unwrap().access;
        assert!(!of(&dir).contains(AccessFs::ResolveUnix));
        assert_eq!(of(&sock), BitFlags::from(AccessFs::ResolveUnix));
    }

    #[test]
    fn write_never_implies_execute() {
        assert!(!write_access(ABI::V7).contains(AccessFs::Execute));
        assert!(exec_access(ABI::V7).contains(AccessFs::Execute));
        assert!(!read_access(ABI::V7).contains(AccessFs::WriteFile));
    }
}
