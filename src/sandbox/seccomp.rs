//! seccomp: a deny list for the kernel interfaces an agent has no use for and
//! that either escape Landlock (ptrace, process_vm_*, io_uring, namespaces,
//! mounts) or widen the kernel attack surface (bpf, keyctl, perf, kexec, exotic
//! socket families). Everything else is allowed: Landlock, uids and cgroups do
//! the confining, this layer removes the ways around them.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
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

/// The low bits of socket()'s type argument; the rest are SOCK_NONBLOCK and
/// SOCK_CLOEXEC, which change nothing about what the socket can reach.
const SOCK_TYPE_MASK: u64 = 0xf;

/// Socket types an inet socket may have. Landlock (ABI 4) confines TCP by port
/// and nothing else: SOCK_RAW, SOCK_SEQPACKET (SCTP), SOCK_DCCP and friends
/// would connect where no rule looks.
const INET_TYPES: [u64; 2] = [libc::SOCK_STREAM as u64, libc::SOCK_DGRAM as u64];

/// Protocols an inet socket may have: the default (0), TCP and UDP. IPPROTO_MPTCP
/// (262) is a SOCK_STREAM that Landlock's TCP hooks do not see (it connected to
/// unlisted ports); SCTP (132), UDP-Lite (136) and ICMP (1) are not TCP either.
const INET_PROTOCOLS: [u64; 3] = [0, libc::IPPROTO_TCP as u64, libc::IPPROTO_UDP as u64];

/// MSG_FASTOPEN: sendto/sendmsg on an unconnected TCP socket connects
/// implicitly (TCP Fast Open), through no connect() and so past Landlock's
/// connect hook.
const MSG_FASTOPEN: u64 = 0x2000_0000;

/// TCP_FASTOPEN_CONNECT: the setsockopt form of the same implicit connect
/// (connect() then only records the address; the first write connects).
/// TCP_FASTOPEN (23) is the server side, which bind_tcp already confines.
const TCP_FASTOPEN_CONNECT: u64 = 30;

pub fn denied_syscalls() -> Vec<&'static str> {
    let mut v: Vec<&str> = DENIED.iter().map(|(n, _)| *n).collect();
    v.extend([
        "clone with namespace flags",
        "clone3 (ENOSYS: its flags sit behind a pointer seccomp cannot read; libc falls back to clone)",
        "socket/socketpair outside AF_UNIX, AF_INET, AF_INET6",
        "AF_INET/AF_INET6 sockets other than SOCK_STREAM/SOCK_DGRAM with protocol 0, TCP or UDP (MPTCP, SCTP, raw)",
        "MSG_FASTOPEN in sendto/sendmsg/sendmmsg and setsockopt(TCP_FASTOPEN_CONNECT) (TCP Fast Open connects without connect())",
    ]);
    if cfg!(target_arch = "x86_64") {
        v.push("x32 system calls (the process is killed)");
    }
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

/// A condition on the low 32 bits: for `int` arguments, whose upper half the
/// kernel ignores (so the filter must too, or a caller could set it to slip past).
fn cond32(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(SeccompError::BuildFilter)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conds).map_err(SeccompError::BuildFilter)
}

/// The socket() rules that deny (ORed): a family outside the allowlist; an
/// inet socket of another type; an inet socket of another protocol.
fn socket_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    let mut rules = vec![rule(
        ALLOWED_FAMILIES
            .iter()
            .map(|&f| cond32(0, SeccompCmpOp::Ne, f))
            .collect::<Result<_, _>>()?,
    )?];
    for family in [libc::AF_INET as u64, libc::AF_INET6 as u64] {
        // No "masked not-equal" comparison exists, so every other value of the
        // type's low bits gets a rule of its own.
        for ty in (0..=SOCK_TYPE_MASK).filter(|t| !INET_TYPES.contains(t)) {
            rules.push(rule(vec![
                cond32(0, SeccompCmpOp::Eq, family)?,
                cond32(1, SeccompCmpOp::MaskedEq(SOCK_TYPE_MASK), ty)?,
            ])?);
        }
        let mut conds = vec![cond32(0, SeccompCmpOp::Eq, family)?];
        for &proto in &INET_PROTOCOLS {
            conds.push(cond32(2, SeccompCmpOp::Ne, proto)?);
        }
        rules.push(rule(conds)?);
    }
    Ok(rules)
}

/// Denies a call whose flags argument `arg` has MSG_FASTOPEN.
fn fastopen_rule(arg: u8) -> Result<Vec<SeccompRule>, SeccompError> {
    Ok(vec![rule(vec![cond32(
        arg,
        SeccompCmpOp::MaskedEq(MSG_FASTOPEN),
        MSG_FASTOPEN,
    )?])?])
}

/// The programs, compiled in advance (they allocate), installed last.
pub struct Filters {
    deny: BpfProgram,
    enosys: BpfProgram,
    x32: Option<BpfProgram>,
}

/// x32 system calls carry x86_64's audit arch and differ only by bit 30 in
/// the number, so no rule above (which match exact x86_64 numbers) ever sees
/// them: on a kernel with x32 enabled, `0x40000000 | 101` would be a ptrace
/// the deny list does not know. Hand-written because seccompiler matches
/// numbers, not bits: kill the process on any call with that bit. Other
/// architectures (i386 via int 0x80) are already killed by the arch check
/// seccompiler puts in front of every filter.
fn x32_filter() -> Option<BpfProgram> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    // <linux/bpf_common.h>, <linux/seccomp.h>, <linux/audit.h>.
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS
    const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
    const BPF_JMP_JSET_K: u16 = 0x05 | 0x40;
    const BPF_RET_K: u16 = 0x06;
    const OFFSET_NR: u32 = 0; // struct seccomp_data { int nr; __u32 arch; … }
    const OFFSET_ARCH: u32 = 4;
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    Some(vec![
        ins(BPF_LD_W_ABS, 0, 0, OFFSET_ARCH),
        // Not x86_64: allow here (to index 5); the deny filter kills it.
        ins(BPF_JMP_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        ins(BPF_LD_W_ABS, 0, 0, OFFSET_NR),
        ins(BPF_JMP_JSET_K, 0, 1, X32_SYSCALL_BIT),
        ins(BPF_RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        ins(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ])
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
    rules.insert(libc::SYS_socket, socket_rules()?);
    // socketpair only ever makes AF_UNIX pairs; the family check is enough.
    rules.insert(
        libc::SYS_socketpair,
        vec![rule(
            ALLOWED_FAMILIES
                .iter()
                .map(|&f| cond32(0, SeccompCmpOp::Ne, f))
                .collect::<Result<_, _>>()?,
        )?],
    );
    rules.insert(libc::SYS_sendto, fastopen_rule(3)?);
    rules.insert(libc::SYS_sendmsg, fastopen_rule(2)?);
    rules.insert(libc::SYS_sendmmsg, fastopen_rule(3)?);
    rules.insert(
        libc::SYS_setsockopt,
        vec![rule(vec![
            cond32(1, SeccompCmpOp::Eq, libc::IPPROTO_TCP as u64)?,
            cond32(2, SeccompCmpOp::Eq, TCP_FASTOPEN_CONNECT)?,
        ])?],
    );
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
        x32: x32_filter(),
    })
}

/// Installs both filters on this (single-threaded) process. Needs no_new_privs
/// (or CAP_SYS_ADMIN, which we no longer have).
pub fn install(filters: &Filters) -> Result<(), SeccompError> {
    // Every installed filter runs on every call and the strictest verdict
    // wins, so the order does not matter.
    if let Some(x32) = &filters.x32 {
        seccompiler::apply_filter(x32).map_err(SeccompError::InstallFilter)?;
    }
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
