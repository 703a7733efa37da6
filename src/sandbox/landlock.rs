//! Landlock: filesystem rights per path, TCP ports, and the abstract-socket and
//! signal scopes.
//!
//! The `landlock` crate in best-effort mode silently drops what the kernel lacks,
//! so we decide ourselves: [`features`] lists every protection a plan relies on
//! with the ABI it needs, [`check`] refuses (strict) or reports (best-effort)
//! what this kernel cannot enforce, and the ruleset is then built in
//! hard-requirement mode for exactly what remains, so the crate can only fail
//! loudly, never degrade quietly.

use std::path::PathBuf;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
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
    #[error("cannot open {path} for a Landlock rule: {source}")]
    OpenPath {
        path: PathBuf,
        source: landlock::PathFdError,
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
        abi: 9,
        required: false,
        fallback: "pathname sockets stay reachable; the agent's uid, 0700 socket directories and the gateway's peer-credential check stand in",
    },
    Feature {
        right: "UDP bind/connect/send by port",
        abi: 10,
        required: false,
        fallback: "UDP stays open (DNS, QUIC); TCP is still confined",
    },
];

/// The features this kernel lacks. Strict: the first required one is an error.
pub fn check(require: Require, abi: i32) -> Result<Vec<Feature>, LandlockError> {
    let missing: Vec<Feature> = FEATURES.iter().copied().filter(|f| f.abi > abi).collect();
    if require == Require::Strict {
        if let Some(f) = missing.iter().find(|f| f.required) {
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
pub fn write_access(abi: ABI) -> BitFlags<AccessFs> {
    AccessFs::from_all(abi) & !AccessFs::Execute
}

/// A path rule ready to add: the fd is opened before privileges are dropped.
pub struct PathRule {
    pub fd: PathFd,
    pub access: BitFlags<AccessFs>,
}

/// Paths of the plan with the rights each gets (a path in several lists gets
/// the union), and the paths that do not exist (skipped: a rule for nothing
/// grants nothing, and failing would make one profile unusable across distros).
pub fn path_rights(plan: &Plan, abi: i32) -> (Vec<(PathBuf, BitFlags<AccessFs>)>, Vec<PathBuf>) {
    let abi = abi_enum(abi);
    let mut rights: Vec<(PathBuf, BitFlags<AccessFs>)> = Vec::new();
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
            let Ok(meta) = std::fs::metadata(path) else {
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
            match rights.iter_mut().find(|(p, _)| p == path) {
                Some((_, a)) => *a |= access,
                None => rights.push((path.clone(), access)),
            }
        }
    }
    (rights, missing)
}

/// Opens the rule paths (as the caller, before any privilege is dropped).
pub fn open_rules(plan: &Plan, abi: i32) -> Result<Vec<PathRule>, LandlockError> {
    let (rights, _missing) = path_rights(plan, abi);
    rights
        .into_iter()
        .map(|(path, access)| {
            let fd = PathFd::new(&path).map_err(|source| LandlockError::OpenPath {
                path: path.clone(),
                source,
            })?;
            Ok(PathRule { fd, access })
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
        let err = check(Require::Strict, 3).unwrap_err().to_string();
        assert!(
            err.contains("TCP bind/connect") && err.contains("ABI 4"),
            "{err}"
        );
        assert!(check(Require::Strict, 0).is_err());
        let dropped = check(Require::BestEffort, 3).unwrap();
        assert!(dropped.iter().any(|f| f.abi == 4));
        // ResolveUnix and UDP are covered elsewhere: strict still runs on ABI 6.
        let missing = check(Require::Strict, 6).unwrap();
        assert!(missing.iter().all(|f| !f.required));
        assert!(check(Require::Strict, 10).unwrap().is_empty());
    }

    #[test]
    fn write_never_implies_execute() {
        assert!(!write_access(ABI::V7).contains(AccessFs::Execute));
        assert!(exec_access(ABI::V7).contains(AccessFs::Execute));
        assert!(!read_access(ABI::V7).contains(AccessFs::WriteFile));
    }
}
