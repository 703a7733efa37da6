//! Privileges: securebits, capability sets, uid/gid switch, no_new_privs.
//!
//! Every call here changes the credentials of the calling thread only; the
//! helper is single-threaded (a fresh exec, no runtime), so that is the whole
//! process.

use std::io;

use caps::{CapSet, CapsHashSet};
use rustix::thread::CapabilitiesSecureBits as Bits;

use super::plan::Ids;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegesError {
    #[error("cannot lock the securebits: {0}")]
    LockSecurebits(io::Error),
    #[error("cannot clear the {set} capability set: {source}")]
    ClearCaps {
        set: &'static str,
        source: caps::errors::CapsError,
    },
    #[error("cannot read the {set} capability set: {source}")]
    ReadCaps {
        set: &'static str,
        source: caps::errors::CapsError,
    },
    #[error("the {set} capability set is still {caps:?} after clearing it")]
    CapsNotEmpty {
        set: &'static str,
        caps: Vec<String>,
    },
    #[error("cordon runs as root without CAP_SETPCAP, so it can neither lock the securebits nor empty the bounding set; refusing to run an agent that would keep them (give cordon CAP_SETPCAP, or run it as a non-root user)")]
    RootWithoutSetpcap,
    #[error("cannot drop supplementary groups: {0}")]
    SetGroups(io::Error),
    #[error("cannot switch to gid {gid}: {source}")]
    SetGid { gid: u32, source: io::Error },
    #[error("cannot switch to uid {uid}: {source}")]
    SetUid { uid: u32, source: io::Error },
    #[error("uid switch to {uid} did not stick (real/effective/saved: {got:?})")]
    UidCheck { uid: u32, got: (u32, u32, u32) },
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(io::Error),
}

/// Whether we hold CAP_SETPCAP (needed to lock securebits and shrink the
/// bounding set); an unprivileged caller has neither to give up. A failed
/// capget is an error, not "no": read as "no", it would silently skip the
/// securebits lock and the bounding-set clear.
pub fn can_setpcap() -> Result<bool, PrivilegesError> {
    caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).map_err(|source| {
        PrivilegesError::ReadCaps {
            set: "effective",
            source,
        }
    })
}

/// NOROOT: uid 0 gains no capabilities at execve (a setuid-root binary or a
/// root agent gets none). NO_SETUID_FIXUP: a uid switch does not silently
/// reshuffle capabilities (we clear them explicitly and verify). Both locked,
/// and ambient raising forbidden, so nothing later can turn them off.
pub fn lock_securebits() -> Result<(), PrivilegesError> {
    let bits = Bits::NO_ROOT
        | Bits::NO_ROOT_LOCKED
        | Bits::NO_SETUID_FIXUP
        | Bits::NO_SETUID_FIXUP_LOCKED
        | Bits::KEEP_CAPS_LOCKED
        | Bits::NO_CAP_AMBIENT_RAISE
        | Bits::NO_CAP_AMBIENT_RAISE_LOCKED;
    rustix::thread::set_capabilities_secure_bits(bits)
        .map_err(|e| PrivilegesError::LockSecurebits(e.into()))
}

pub fn drop_bounding_and_ambient(have_setpcap: bool) -> Result<(), PrivilegesError> {
    caps::clear(None, CapSet::Ambient).map_err(|source| PrivilegesError::ClearCaps {
        set: "ambient",
        source,
    })?;
    if have_setpcap {
        caps::clear(None, CapSet::Bounding).map_err(|source| PrivilegesError::ClearCaps {
            set: "bounding",
            source,
        })?;
    }
    Ok(())
}

/// Groups first (setgroups needs CAP_SETGID, which the uid switch removes),
/// then gid, then uid; real, effective and saved ids all, so there is no id
/// left to switch back to.
pub fn switch_user(ids: Ids) -> Result<(), PrivilegesError> {
    use rustix::process::{Gid, Uid};
    let gid = Gid::from_raw(ids.gid);
    let uid = Uid::from_raw(ids.uid);
    rustix::thread::set_thread_groups(&[gid]).map_err(|e| PrivilegesError::SetGroups(e.into()))?;
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(|e| PrivilegesError::SetGid {
        gid: ids.gid,
        source: e.into(),
    })?;
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(|e| PrivilegesError::SetUid {
        uid: ids.uid,
        source: e.into(),
    })?;
    let got = real_effective_saved_uid();
    if got != (ids.uid, ids.uid, ids.uid) {
        return Err(PrivilegesError::UidCheck { uid: ids.uid, got });
    }
    Ok(())
}

fn real_effective_saved_uid() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0u32, 0u32, 0u32);
    // SAFETY: getresuid writes three uid_t through valid pointers to locals.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    (r, e, s)
}

/// Empties permitted, effective and inheritable (and ambient again), then reads
/// every set back: a set that is not empty is an error, never a warning.
pub fn clear_and_verify_caps(bounding_must_be_empty: bool) -> Result<(), PrivilegesError> {
    for (set, name) in [
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
        (CapSet::Inheritable, "inheritable"),
        (CapSet::Ambient, "ambient"),
    ] {
        caps::clear(None, set)
            .map_err(|source| PrivilegesError::ClearCaps { set: name, source })?;
    }
    let mut sets = vec![
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
        (CapSet::Inheritable, "inheritable"),
        (CapSet::Ambient, "ambient"),
    ];
    if bounding_must_be_empty {
        sets.push((CapSet::Bounding, "bounding"));
    }
    for (set, name) in sets {
        let held: CapsHashSet = caps::read(None, set)
            .map_err(|source| PrivilegesError::ReadCaps { set: name, source })?;
        if !held.is_empty() {
            let mut caps: Vec<String> = held.iter().map(|c| c.to_string()).collect();
            caps.sort();
            return Err(PrivilegesError::CapsNotEmpty { set: name, caps });
        }
    }
    Ok(())
}

pub fn set_no_new_privs() -> Result<(), PrivilegesError> {
    rustix::thread::set_no_new_privs(true).map_err(|e| PrivilegesError::NoNewPrivs(e.into()))
}
