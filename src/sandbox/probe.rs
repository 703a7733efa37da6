//! `cordon sandbox probe`: what this kernel can enforce, and what a profile
//! would get and lose here. Read-only: it changes nothing about this process.

use std::fmt::Write as _;
use std::path::Path;

use landlock::{Access, AccessFs, AccessNet, Scope, ABI};

use super::landlock::{self as ll, FEATURES};
use super::limits::{Layout, Version};
use super::plan::Plan;
use super::privileges;
use super::profile::Require;
use super::seccomp;

fn seccomp_available() -> bool {
    // PR_GET_SECCOMP answers 0 (not filtered), 2 (filtered), or EINVAL when
    // the kernel lacks seccomp altogether.
    // SAFETY: PR_GET_SECCOMP takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) >= 0 }
}

pub fn kernel_report() -> String {
    let abi = ll::kernel_abi();
    let abi_e = ABI::from(abi.min(10));
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Landlock: ABI {abi}{}",
        if abi == 0 { " (not available)" } else { "" }
    );
    if abi > 0 {
        let _ = writeln!(
            o,
            "  filesystem rights: {}",
            ll::names(AccessFs::from_all(abi_e))
        );
        let net = AccessNet::from_all(abi_e);
        let _ = writeln!(
            o,
            "  network rights:    {}",
            if net.is_empty() {
                "none".to_string()
            } else {
                net.iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        );
        let scopes = Scope::from_all(abi_e);
        let _ = writeln!(
            o,
            "  scopes:            {}",
            if scopes.is_empty() {
                "none".to_string()
            } else {
                scopes
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        );
    }
    for f in FEATURES.iter().filter(|f| f.abi > abi) {
        let _ = writeln!(
            o,
            "  missing: {} (ABI {}){}",
            f.right,
            f.abi,
            if f.required {
                " — strict profiles refuse to run".to_string()
            } else if f.abi == ll::RESOLVE_UNIX_ABI {
                " — strict profiles refuse to run unless the agent gets a dedicated uid (root and user = \"auto\"); with one, 0700 socket directories and the gateway's peer-credential check stand in".to_string()
            } else {
                format!(" — {}", f.fallback)
            }
        );
    }
    let _ = writeln!(
        o,
        "seccomp: {}",
        if seccomp_available() {
            "filter mode available"
        } else {
            "NOT available"
        }
    );
    let _ = writeln!(o, "  denied: {}", seccomp::denied_syscalls().join("; "));
    let layout = Layout::detect();
    let _ = writeln!(o, "cgroups:");
    if let Some(m) = &layout.v2_mount {
        let _ = writeln!(
            o,
            "  cgroup2 at {} (controllers: {})",
            m.display(),
            if layout.v2_controllers.is_empty() {
                "none".to_string()
            } else {
                layout.v2_controllers.join(" ")
            }
        );
    }
    for (mount, ctrls) in &layout.v1_mounts {
        if !ctrls.is_empty() {
            let _ = writeln!(o, "  cgroup v1 {} at {}", ctrls.join(","), mount.display());
        }
    }
    for name in ["memory", "pids", "cpu"] {
        match layout.controller(name) {
            Some(c) => {
                let v = if c.version == Version::V2 { "v2" } else { "v1" };
                let _ = writeln!(
                    o,
                    "  {name}: {v}, agent cgroups under {}",
                    c.own_dir.join("cordon").display()
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "  {name}: not available (profiles with that limit refuse to run)"
                );
            }
        }
    }
    let root = rustix::process::geteuid().is_root();
    let uid = rustix::process::getuid().as_raw();
    let _ = writeln!(
        o,
        "uid switching: {}",
        if root {
            "yes (running as root: user = \"auto\" gets a dedicated uid per agent)".to_string()
        } else {
            format!("no (running as uid {uid}: user = \"auto\" runs as uid {uid}; cgroup limits need root)")
        }
    );
    let _ = writeln!(
        o,
        "capabilities: {}",
        match privileges::can_setpcap() {
            Ok(true) => "securebits locked and bounding set emptied (CAP_SETPCAP held)",
            Ok(false) if root => "root without CAP_SETPCAP: the bounding set cannot be emptied, so the sandbox refuses to run",
            Ok(false) => "bounding set kept (no CAP_SETPCAP to drop it; no_new_privs makes it inert)",
            Err(_) => "cannot read this process's capabilities: the sandbox refuses to run",
        }
    );
    o
}

/// The plan as this kernel would enforce it. Returns the text and whether the
/// helper would run the command.
pub fn plan_report(path: &Path, plan: &Plan, fresh_home: bool) -> (String, bool) {
    let abi = ll::kernel_abi();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nprofile {} (require = {:?}):",
        path.display(),
        plan.require
    );
    let verdict = ll::check(plan.require, abi, plan.user.is_some());
    let (rights, missing) = match ll::path_rights(plan, abi) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(o, "  would refuse: {e}");
            return (o, false);
        }
    };
    let _ = writeln!(o, "  paths:");
    for r in &rights {
        let via = if r.resolved == r.path {
            String::new()
        } else {
            format!(" (-> {})", r.resolved.display())
        };
        let _ = writeln!(o, "    {}{via}  {}", r.path.display(), ll::names(r.access));
    }
    for p in &missing {
        let note = if fresh_home {
            " (or created per run)"
        } else {
            ""
        };
        let _ = writeln!(o, "    {}  MISSING here: no access{note}", p.display());
    }
    let ports = |v: &[u16]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
        }
    };
    let _ = writeln!(
        o,
        "  tcp connect: {}; tcp bind: {}",
        ports(&plan.connect_tcp),
        ports(&plan.bind_tcp)
    );
    if !plan.connect_unix.is_empty() {
        let how = if abi >= ll::RESOLVE_UNIX_ABI {
            "RESOLVE_UNIX rule"
        } else if plan.user.is_some() {
            "not enforceable here (ABI < 9): the dedicated uid + peer-credential checks only"
        } else {
            "not enforceable here (ABI < 9), and the agent shares cordon's uid: every socket that uid can reach is reachable"
        };
        for p in &plan.connect_unix {
            let _ = writeln!(o, "  unix socket {}: {how}", p.display());
        }
    }
    let _ = writeln!(
        o,
        "  user: {}",
        match plan.user {
            Some(ids) => format!("uid {} gid {}", ids.uid, ids.gid),
            None => format!("uid {} (inherited)", rustix::process::getuid().as_raw()),
        }
    );
    let l = &plan.limits;
    let _ = writeln!(
        o,
        "  limits: memory {:?}, pids {:?}, nofile {:?}, cpu_weight {:?}{}",
        l.memory,
        l.pids,
        l.nofile,
        l.cpu_weight,
        if l.needs_cgroup() && plan.cgroup.is_none() {
            " — cgroup limits need root: NOT applied"
        } else {
            ""
        }
    );
    let mut would_run = true;
    if l.needs_cgroup() && plan.cgroup.is_some() {
        if let Err(e) = Layout::detect().agent_dirs(l, "cordon/probe") {
            let _ = writeln!(o, "  would refuse: {e}");
            would_run = false;
        }
    }
    match verdict {
        Err(e) => {
            let _ = writeln!(o, "  would refuse: {e}");
            would_run = false;
        }
        Ok(dropped) => {
            for f in &dropped {
                let lost = if f.required && plan.require == Require::BestEffort {
                    "dropped (best-effort)"
                } else {
                    f.fallback
                };
                let _ = writeln!(o, "  loses: {} (needs ABI {}): {lost}", f.right, f.abi);
            }
            if would_run {
                let _ = writeln!(
                    o,
                    "  verdict: would run{}",
                    if dropped.is_empty() {
                        ", fully enforced"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    (o, would_run)
}
