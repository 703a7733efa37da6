//! seccomp: a deny list for the kernel interfaces an agent has no use for and
//! that either escape Landlock (ptrace, process_vm_*, io_uring, namespaces,
//! mounts) or widen the kernel attack surface (bpf, keyctl, perf, kexec, exotic
//! socket families). Everything else is allowed: Landlock, uids and cgroups do
//! the confining, this layer removes the ways around them.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp is not supported for the {0} architecture")]
    UnsupportedArch(&'static str),
    #[error("cannot build the seccomp filter: {0}")]
    BuildFilter(seccompiler::BackendError),
    #[error("cannot install the seccomp filter: {0}")]
    InstallFilter(seccompiler::Error),
}

/// Denied outright with EPERM.
const DENIED: &[(&str, i64)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("bpf", libc::SYS_bpf),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("userfaultfd", libc::SYS_userfaultfd),
];

/// Namespace flags: clone() with any of them is unshare by another name.
const CLONE_NS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWCGROUP) as u64;

const ALLOWED_FAMILIES: [u64; 3] = [
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
];

pub fn denied_syscalls() -> Vec<&'static str> {
    let mut v: Vec<&str> = DENIED.iter().map(|(n, _)| *n).collect();
    v.extend([
        "clone with namespace flags",
        "clone3 (ENOSYS: its flags sit behind a pointer seccomp cannot read; libc falls back to clone)",
        "socket/socketpair outside AF_UNIX, AF_INET, AF_INET6",
    ]);
    v
}

fn arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(SeccompError::BuildFilter)
}

/// The two programs, compiled in advance (they allocate), installed last.
pub struct Filters {
    deny: BpfProgram,
    enosys: BpfProgram,
}

pub fn build() -> Result<Filters, SeccompError> {
    let arch = arch()?;
    let b = SeccompError::BuildFilter;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(_, nr) in DENIED {
        // An empty rule list matches the syscall whatever its arguments.
        rules.insert(nr, Vec::new());
    }
    // A rule is an AND of conditions and rules are ORed: one rule per
    // namespace flag matches a clone with any of them set.
    let mut clone_rules = Vec::new();
    let mut bit = 1u64;
    while bit != 0 {
        if CLONE_NS & bit != 0 {
            clone_rules.push(
                SeccompRule::new(vec![cond(0, SeccompCmpOp::MaskedEq(bit), bit)?]).map_err(b)?,
            );
        }
        bit <<= 1;
    }
    rules.insert(libc::SYS_clone, clone_rules);
    let family_rule = || -> Result<Vec<SeccompRule>, SeccompError> {
        let conds = ALLOWED_FAMILIES
            .iter()
            .map(|&f| {
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, f)
                    .map_err(SeccompError::BuildFilter)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(vec![
            SeccompRule::new(conds).map_err(SeccompError::BuildFilter)?
        ])
    };
    rules.insert(libc::SYS_socket, family_rule()?);
    rules.insert(libc::SYS_socketpair, family_rule()?);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(b)?;
    let enosys = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(b)?;
    Ok(Filters {
        deny: deny.try_into().map_err(b)?,
        enosys: enosys.try_into().map_err(b)?,
    })
}

/// Installs both filters on this (single-threaded) process. Needs no_new_privs
/// (or CAP_SYS_ADMIN, which we no longer have).
pub fn install(filters: &Filters) -> Result<(), SeccompError> {
    seccompiler::apply_filter(&filters.enosys).map_err(SeccompError::InstallFilter)?;
    seccompiler::apply_filter(&filters.deny).map_err(SeccompError::InstallFilter)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_compile_for_this_arch() {
        super::build().unwrap();
    }
}
