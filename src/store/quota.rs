//! Space accounting: the data quota, per-role usage, the audit's and the watch
//! history's byte bounds, and the alarm that reports them.
//!
//! The map holds three kinds of pages: data (`kv`, `changes`, `meta`), the
//! audit (`audit`), and pages LMDB cannot reuse yet (freed by the last two
//! commits, pinned by a reader, the free list itself). The config keeps
//! `max_store_bytes + audit max_bytes + headroom <= map_size`, and each of the
//! first two is enforced here, so the third is always there: that is what
//! lets deletes, compaction and audit pruning commit when data is at its
//! quota. Data and audit are measured with LMDB's own page accounting
//! (`mdb_stat`: branch + leaf + overflow pages of each database), the same
//! pages that fill the map, rather than with a byte count that the B-tree's
//! overhead (up to 2x for small values) would make optimistic.
//!
//! Per role, usage is an exact count of the bytes of the keys and values it
//! owns (key path + canonical JSON) and of its keys. The owner of a key is
//! the role that last wrote it: whoever makes bytes exist pays for them, so
//! one role can never spend another's quota, nor be refused because of
//! another role's usage (a creator-owns rule would let role B grow role A's
//! usage by overwriting A's keys, and then refuse B for A's quota). A delete
//! credits the owner, whoever deletes. The owner is kept in the key's record
//! (no extra lookup: every put and delete already reads the record) and the
//! counters in `meta` (`usage/<role>`), written in the same transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use heed::types::Bytes;
use heed::{Database, RoTxn};
use serde::Serialize;

/// An alarm is raised at this share of its limit (per mille)...
const NEAR_PERMILLE: u64 = 900;
/// ... and, once raised, cleared only below this one, so that usage moving
/// around the threshold does not log a line per commit.
const CLEAR_PERMILLE: u64 = 850;

/// The meta key prefix of the per-role usage counters.
pub(super) const META_USAGE: &[u8] = b"usage/";

/// A role's bound as the policy states it, with the rule that set it
/// (`file:line: text`) for errors and the alarm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoleBound {
    pub max: u64,
    pub rule: String,
}

/// A role's store limits (`limits.max_store_bytes`, `limits.max_keys`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleLimits {
    pub max_bytes: Option<RoleBound>,
    pub max_keys: Option<RoleBound>,
}

impl RoleLimits {
    pub fn is_empty(&self) -> bool {
        self.max_bytes.is_none() && self.max_keys.is_none()
    }
}

/// Who a mutation writes for: its keys become this role's, checked against
/// these limits (those of the policy the call was decided under).
#[derive(Debug, Clone)]
pub struct Owner {
    pub role: Arc<str>,
    pub limits: Arc<RoleLimits>,
}

/// What one role owns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RoleUsage {
    pub bytes: u64,
    pub keys: u64,
}

impl RoleUsage {
    pub(super) fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.bytes.to_be_bytes());
        out[8..].copy_from_slice(&self.keys.to_be_bytes());
        out
    }

    pub(super) fn decode(raw: &[u8]) -> Option<RoleUsage> {
        let bytes = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
        let keys = u64::from_be_bytes(raw.get(8..16)?.try_into().ok()?);
        Some(RoleUsage { bytes, keys })
    }

    /// Adds a signed change; never below zero (counters of keys written
    /// before accounting existed are not in any role's count).
    pub(super) fn add(&mut self, bytes: i64, keys: i64) {
        self.bytes = self.bytes.saturating_add_signed(bytes);
        self.keys = self.keys.saturating_add_signed(keys);
    }
}

/// Changes to per-role usage made by one mutation; a handful of entries.
#[derive(Debug, Default)]
pub(super) struct Deltas(Vec<(Arc<str>, i64, i64)>);

impl Deltas {
    pub(super) fn add(&mut self, role: &Arc<str>, bytes: i64, keys: i64) {
        match self.0.iter_mut().find(|(r, _, _)| r == role) {
            Some((_, b, k)) => {
                *b += bytes;
                *k += keys;
            }
            None => self.0.push((role.clone(), bytes, keys)),
        }
    }

    pub(super) fn apply(&self, roles: &mut BTreeMap<String, RoleUsage>) {
        for (role, b, k) in &self.0 {
            roles.entry(role.to_string()).or_default().add(*b, *k);
        }
    }

    pub(super) fn of(&self, role: &str) -> (i64, i64) {
        self.0
            .iter()
            .find(|(r, _, _)| &**r == role)
            .map_or((0, 0), |(_, b, k)| (*b, *k))
    }
}

/// A key's size for its owner's quota: its path and its canonical JSON value.
pub(super) fn entry_size(key: &[u8], json: &[u8]) -> i64 {
    i64::try_from(key.len() + json.len()).unwrap_or(i64::MAX)
}

/// Pages a database's tree holds, in bytes.
pub(super) fn db_bytes(db: Database<Bytes, Bytes>, txn: &RoTxn) -> Result<u64, heed::Error> {
    let s = db.stat(txn)?;
    Ok((s.branch_pages + s.leaf_pages + s.overflow_pages) as u64 * u64::from(s.page_size))
}

/// Roughly what an entry of `len` bytes (8-byte key) occupies in a page
/// filled in key order, for deciding how much to prune: LMDB's node header
/// and key plus the value inline, or whole overflow pages for a value past
/// its node limit (about half a page). The next commit measures the truth.
pub(super) fn entry_cost(len: usize, page: u64) -> u64 {
    let len = len as u64;
    let node = 8 + 8 + len + 2;
    if node > page / 2 - 16 {
        (16 + len).div_ceil(page) * page + 8 + 8 + 8 + 2
    } else {
        node
    }
}

/// The unit of a quota's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Bytes,
    Keys,
}

/// One raised alarm, as the admin status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alarm {
    /// The setting that is near or past its limit: `gateway.max_store_bytes`,
    /// `audit.max_bytes`, `roles.<r>.limits.max_keys`, …
    pub quota: String,
    /// `near` (>= 90% of the limit), or `exceeded` (a write was refused and
    /// none has been admitted since).
    pub level: &'static str,
    pub usage: u64,
    pub limit: u64,
    pub unit: Unit,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The policy rule that set a role's limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// The store's space, as of its last commit (admin `status`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// Pages of `kv`, `changes` and `meta`, in bytes.
    pub data_bytes: u64,
    pub max_store_bytes: Option<u64>,
    /// Pages of the watch history (`changes`), part of `data_bytes`.
    pub history_bytes: u64,
    pub watch_history_bytes: Option<u64>,
    /// Pages of the audit log.
    pub audit_bytes: u64,
    pub audit_max_bytes: Option<u64>,
    pub map_size: u64,
    /// The map's high-water mark (LMDB's last page): data, audit, and free
    /// pages waiting for reuse. It never shrinks (the file does not).
    pub map_used_bytes: u64,
    /// Audit records pruned by retention since the gateway started.
    pub audit_pruned: u64,
    /// Each role's keys and bytes, and its limits in the policy in force.
    pub roles: BTreeMap<String, RoleStatus>,
    pub alarms: Vec<Alarm>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RoleStatus {
    pub bytes: u64,
    pub keys: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_store_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<u64>,
}

/// What a batch did to a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    Refused,
    Admitted,
}

/// Quota ids with their last event in one batch.
#[derive(Debug, Default)]
pub(super) struct Events(Vec<(String, Event)>);

impl Events {
    pub(super) fn push(&mut self, quota: String, e: Event) {
        match self.0.iter_mut().find(|(q, _)| *q == quota) {
            Some((_, last)) => *last = e,
            None => self.0.push((quota, e)),
        }
    }

    fn get(&self, quota: &str) -> Option<Event> {
        self.0.iter().find(|(q, _)| q == quota).map(|(_, e)| *e)
    }
}

pub(super) fn role_quota_id(role: &str, what: Unit) -> String {
    match what {
        Unit::Bytes => format!("roles.{role}.limits.max_store_bytes"),
        Unit::Keys => format!("roles.{role}.limits.max_keys"),
    }
}

pub(super) const STORE_QUOTA: &str = "gateway.max_store_bytes";
const AUDIT_QUOTA: &str = "audit.max_bytes";

#[derive(Debug, Default)]
struct State {
    active: bool,
    exceeded: bool,
}

/// The alarms' memory between commits: which are raised, which latched
/// `exceeded`. Logs a line when an alarm is raised and when it is cleared.
#[derive(Debug, Default)]
pub(super) struct Alarms {
    states: BTreeMap<String, State>,
}

struct Gauge<'a> {
    quota: String,
    usage: u64,
    limit: u64,
    unit: Unit,
    role: Option<&'a str>,
    rule: Option<&'a str>,
    /// `near` applies (not to the audit: retention keeps it at its bound).
    near: bool,
}

impl Alarms {
    /// Re-evaluates every alarm against `usage` (whose `roles` already carry
    /// the limits in force) and this batch's events; fills `usage.alarms`.
    pub(super) fn evaluate(
        &mut self,
        usage: &mut Usage,
        events: &Events,
        rules: &BTreeMap<String, String>,
    ) {
        let mut gauges = Vec::new();
        if let Some(limit) = usage.max_store_bytes {
            gauges.push(Gauge {
                quota: STORE_QUOTA.into(),
                usage: usage.data_bytes,
                limit,
                unit: Unit::Bytes,
                role: None,
                rule: None,
                near: true,
            });
        }
        if let Some(limit) = usage.audit_max_bytes {
            gauges.push(Gauge {
                quota: AUDIT_QUOTA.into(),
                usage: usage.audit_bytes,
                limit,
                unit: Unit::Bytes,
                role: None,
                rule: None,
                near: false,
            });
        }
        // No alarm on the map's high-water mark: it never goes down (LMDB
        // reuses free pages rather than shrinking the file), so it says how
        // full the map once was, not how close a commit is to MAP_FULL.
        let limits = std::mem::take(&mut usage.roles);
        for (role, s) in &limits {
            for (unit, used, limit) in [
                (Unit::Bytes, s.bytes, s.max_store_bytes),
                (Unit::Keys, s.keys, s.max_keys),
            ] {
                if let Some(limit) = limit {
                    let quota = role_quota_id(role, unit);
                    let rule = rules.get(&quota).map(String::as_str);
                    gauges.push(Gauge {
                        quota,
                        usage: used,
                        limit,
                        unit,
                        role: Some(role),
                        rule,
                        near: true,
                    });
                }
            }
        }
        let mut alarms = Vec::new();
        let mut seen = Vec::new();
        for g in gauges {
            let permille = g.usage.saturating_mul(1000) / g.limit.max(1);
            let st = self.states.entry(g.quota.clone()).or_default();
            match events.get(&g.quota) {
                Some(Event::Refused) => st.exceeded = true,
                Some(Event::Admitted) => st.exceeded = false,
                None => {}
            }
            if permille < CLEAR_PERMILLE {
                st.exceeded = false;
            }
            let over = g.usage > g.limit;
            let active = st.exceeded
                || over
                || (g.near
                    && (permille >= NEAR_PERMILLE || (st.active && permille >= CLEAR_PERMILLE)));
            let level = if st.exceeded || over {
                "exceeded"
            } else {
                "near"
            };
            if active && !st.active {
                tracing::warn!(
                    quota = %g.quota,
                    level,
                    usage = g.usage,
                    limit = g.limit,
                    "quota alarm raised: {} is at {}.{}% of its limit ({} of {} {:?})",
                    g.quota,
                    permille / 10,
                    permille % 10,
                    g.usage,
                    g.limit,
                    g.unit
                );
            } else if !active && st.active {
                tracing::info!(
                    quota = %g.quota,
                    usage = g.usage,
                    limit = g.limit,
                    "quota alarm cleared: {} is at {}.{}% of its limit",
                    g.quota,
                    permille / 10,
                    permille % 10
                );
            }
            st.active = active;
            if active {
                alarms.push(Alarm {
                    quota: g.quota.clone(),
                    level,
                    usage: g.usage,
                    limit: g.limit,
                    unit: g.unit,
                    role: g.role.map(str::to_string),
                    rule: g.rule.map(str::to_string),
                });
            }
            seen.push(g.quota);
        }
        // A quota that no longer exists (a role dropped by a reload) is
        // cleared by being forgotten.
        self.states.retain(|q, st| {
            let keep = seen.contains(q);
            if !keep && st.active {
                tracing::info!(quota = %q, "quota alarm cleared: the limit was removed");
            }
            keep
        });
        usage.roles = limits;
        usage.alarms = alarms;
    }
}

/// Fills `usage.roles` from the counters and the limits in force.
pub(super) fn role_status(
    usage: &mut Usage,
    counters: &BTreeMap<String, RoleUsage>,
    limits: &BTreeMap<String, Arc<RoleLimits>>,
) -> BTreeMap<String, String> {
    let mut rules = BTreeMap::new();
    usage.roles.clear();
    for (role, u) in counters {
        let s = usage.roles.entry(role.clone()).or_default();
        s.bytes = u.bytes;
        s.keys = u.keys;
    }
    for (role, l) in limits {
        let s = usage.roles.entry(role.clone()).or_default();
        s.max_store_bytes = l.max_bytes.as_ref().map(|b| b.max);
        s.max_keys = l.max_keys.as_ref().map(|b| b.max);
        if let Some(b) = &l.max_bytes {
            rules.insert(role_quota_id(role, Unit::Bytes), b.rule.clone());
        }
        if let Some(b) = &l.max_keys {
            rules.insert(role_quota_id(role, Unit::Keys), b.rule.clone());
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(data: u64) -> Usage {
        Usage {
            data_bytes: data,
            max_store_bytes: Some(1000),
            ..Usage::default()
        }
    }

    #[test]
    fn an_alarm_is_raised_near_the_limit_latched_by_a_refusal_and_cleared_below_85_percent() {
        let mut a = Alarms::default();
        let none = Events::default();
        let mut u = usage(800);
        a.evaluate(&mut u, &none, &BTreeMap::new());
        assert!(u.alarms.is_empty());
        let mut u = usage(900);
        a.evaluate(&mut u, &none, &BTreeMap::new());
        assert_eq!(u.alarms[0].level, "near");
        // Hysteresis: still raised at 86%.
        let mut u = usage(860);
        a.evaluate(&mut u, &none, &BTreeMap::new());
        assert_eq!(u.alarms.len(), 1);
        let mut refused = Events::default();
        refused.push(STORE_QUOTA.into(), Event::Refused);
        let mut u = usage(990);
        a.evaluate(&mut u, &refused, &BTreeMap::new());
        assert_eq!(u.alarms[0].level, "exceeded");
        // Stays exceeded until a write is admitted...
        let mut u = usage(990);
        a.evaluate(&mut u, &none, &BTreeMap::new());
        assert_eq!(u.alarms[0].level, "exceeded");
        let mut admitted = Events::default();
        admitted.push(STORE_QUOTA.into(), Event::Admitted);
        let mut u = usage(950);
        a.evaluate(&mut u, &admitted, &BTreeMap::new());
        assert_eq!(u.alarms[0].level, "near");
        // ... and is cleared below 85%.
        let mut u = usage(840);
        a.evaluate(&mut u, &none, &BTreeMap::new());
        assert!(u.alarms.is_empty());
    }

    #[test]
    fn record_costs_are_inline_or_whole_overflow_pages() {
        assert_eq!(entry_cost(100, 4096), 118);
        assert_eq!(entry_cost(5000, 4096), 2 * 4096 + 26);
    }
}
