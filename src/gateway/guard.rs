//! What one agent's connections share, so that no agent can take more than
//! its share of the gateway whatever it sends: its message rate, its role's
//! call rate, and its refusal ledger (how many refusals get a record each,
//! and the summary of the rest).
//!
//! - Every message an agent sends (a call, `ping`, `tools/list`, a malformed
//!   line) takes a token from its message bucket; past the rate the reader of
//!   that connection waits for the next token, so a flood is slowed down at
//!   the socket instead of answered.
//! - Every refusal (a denied, unknown or malformed call, a rate-limited call,
//!   a refused connection) is recorded on its own while the agent is within
//!   `refusal_records_per_minute`; past it, refusals are counted into one
//!   `refusals` record per agent per interval (how many, of what, since when),
//!   so the audit stays complete in count and bounded in size.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::audit::{self, Record};
use crate::policy::RateLimiter;

/// Kinds of refusal a summary names one by one; the rest are counted as
/// `other`, so a summary stays a few KiB whatever the agent sends.
const MAX_KINDS: usize = 32;
/// A kind names a tool or method, which an agent chooses: cut to this.
const MAX_KIND_BYTES: usize = 96;

/// The bounds an agent's guard applies (from `[gateway]` and `[audit]`).
#[derive(Debug, Clone, Copy)]
pub struct GuardLimits {
    /// Messages per second, every kind counted; the burst is one second's.
    pub messages_per_second: u64,
    /// Refusals recorded one by one per minute; the burst is one minute's.
    pub refusal_records_per_minute: u64,
}

pub struct AgentGuard {
    pub agent: Arc<str>,
    pub role: Arc<str>,
    /// The role's `calls_per_minute`, taken by every `tools/call`.
    pub calls: RateLimiter,
    limits: GuardLimits,
    messages: Mutex<Debt>,
    ledger: Mutex<Ledger>,
    /// Messages that had to wait for a token (status).
    throttled: AtomicU64,
    /// Refusals counted into summaries, in all (status).
    summarised: AtomicU64,
}

/// A token bucket that lets its balance go negative: each message takes its
/// token at once and waits for the debt to be repaid at the rate, so several
/// connections of one agent share the rate fairly without a queue.
struct Debt {
    tokens: f64,
    last: Instant,
}

#[derive(Default)]
struct Ledger {
    /// Records that may still be written one by one (refilled per minute).
    tokens: f64,
    last: Option<Instant>,
    summary: Option<Summary>,
}

/// Refusals past the budget since `since`.
pub struct Summary {
    since: String,
    count: u64,
    by: BTreeMap<String, u64>,
}

impl AgentGuard {
    pub fn new(agent: Arc<str>, role: Arc<str>, limits: GuardLimits) -> AgentGuard {
        AgentGuard {
            agent,
            role,
            calls: RateLimiter::default(),
            messages: Mutex::new(Debt {
                tokens: limits.messages_per_second as f64,
                last: Instant::now(),
            }),
            ledger: Mutex::new(Ledger {
                tokens: limits.refusal_records_per_minute as f64,
                ..Ledger::default()
            }),
            limits,
            throttled: AtomicU64::new(0),
            summarised: AtomicU64::new(0),
        }
    }

    /// Takes one message's token; how long the reader must wait first, if
    /// the agent is past its rate.
    pub fn message(&self) -> Option<Duration> {
        let rate = self.limits.messages_per_second as f64;
        if rate <= 0.0 {
            return None;
        }
        let now = Instant::now();
        let mut d = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        let refill = now.duration_since(d.last).as_secs_f64() * rate;
        d.tokens = (d.tokens + refill).min(rate);
        d.last = now;
        d.tokens -= 1.0;
        if d.tokens >= 0.0 {
            return None;
        }
        self.throttled.fetch_add(1, Ordering::Relaxed);
        Some(Duration::from_secs_f64(-d.tokens / rate))
    }

    /// Whether a refusal of `kind` (a tool or method name, `connection`)
    /// gets a record of its own; if not, it is counted in the summary.
    pub fn admit(&self, kind: &str) -> bool {
        let per_minute = self.limits.refusal_records_per_minute as f64;
        let now = Instant::now();
        let mut l = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        let last = *l.last.get_or_insert(now);
        l.tokens =
            (l.tokens + now.duration_since(last).as_secs_f64() * per_minute / 60.0).min(per_minute);
        l.last = Some(now);
        if l.tokens >= 1.0 {
            l.tokens -= 1.0;
            return true;
        }
        let s = l.summary.get_or_insert_with(|| Summary {
            since: audit::now(),
            count: 0,
            by: BTreeMap::new(),
        });
        s.count += 1;
        let kind = audit::clip(kind, MAX_KIND_BYTES);
        if s.by.len() < MAX_KINDS || s.by.contains_key(kind.as_ref()) {
            *s.by.entry(kind.into_owned()).or_default() += 1;
        } else {
            *s.by.entry("other".into()).or_default() += 1;
        }
        drop(l);
        self.summarised.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// The summary of refusals not recorded one by one since the last one,
    /// as its audit record (None if there were none).
    pub fn take_summary(&self) -> Option<Record> {
        let s = self
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .summary
            .take()?;
        let mut r = Record::new("refusals");
        r.agent = Some(self.agent.to_string());
        r.role = Some(self.role.to_string());
        r.decision = Some("deny".into());
        r.detail = Some(json!({
            "since": s.since,
            "until": r.time,
            "count": s.count,
            "by": s.by,
            "records_per_minute": self.limits.refusal_records_per_minute,
        }));
        r.error(
            "summarised",
            &format!(
                "{} refusals past the agent's budget of {} records per minute, counted here instead of one record each",
                s.count, self.limits.refusal_records_per_minute
            ),
        );
        Some(r)
    }

    pub fn status(&self) -> serde_json::Value {
        json!({
            "throttled_messages": self.throttled.load(Ordering::Relaxed),
            "summarised_refusals": self.summarised.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(messages: u64, records: u64) -> AgentGuard {
        AgentGuard::new(
            "a".into(),
            "r".into(),
            GuardLimits {
                messages_per_second: messages,
                refusal_records_per_minute: records,
            },
        )
    }

    #[test]
    fn messages_past_the_burst_wait() {
        let g = guard(10, 1);
        assert!((0..10).all(|_| g.message().is_none()));
        let wait = g.message().expect("the 11th message waits");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200));
        // Debt accumulates: the next one waits longer.
        assert!(g.message().unwrap() > wait);
        assert_eq!(g.status()["throttled_messages"], 2);
    }

    #[test]
    fn refusals_past_the_budget_are_summarised_and_bounded() {
        let g = guard(0, 3);
        assert!((0..3).all(|_| g.admit("kv_put")));
        assert!(g.take_summary().is_none(), "nothing summarised yet");
        let long = "x".repeat(10_000);
        for i in 0..100 {
            assert!(!g.admit(&format!("{long}{i}")));
        }
        assert!(!g.admit("kv_put"));
        let r = g.take_summary().expect("a summary");
        let d = r.detail.as_ref().unwrap();
        assert_eq!(d["count"], 101);
        let by = d["by"].as_object().unwrap();
        assert!(by.len() <= MAX_KINDS + 1);
        assert_eq!(by.values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 101);
        assert!(r.canonical().len() < 8 * 1024, "{}", r.canonical().len());
        assert!(g.take_summary().is_none(), "taken once");
        assert_eq!(g.status()["summarised_refusals"], 101);
    }
}
