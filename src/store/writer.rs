//! The single writer: group commit of every queued mutation.
//!
//! LMDB allows one write transaction at a time and a durable commit costs an
//! fsync (~240 µs here), so the writer takes whatever has queued while the last
//! fsync ran and commits it all at once, after waiting briefly (see `Gather`)
//! for the callers it just answered when there are several. Callers hear back
//! only after that commit returned, so an acknowledged mutation is on disk.

use heed::{Env, PutFlags, RwTxn, WithoutTls};
use tokio::sync::{mpsc, watch};

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::quota::{self, Deltas, Event, Events, Owner, RoleUsage, Unit};
use super::{
    decode_u64, disk_full, free_bytes, get_entry, parse_record, AuditOptions, Check, Dbs, Delete,
    DeleteOutcome, Job, Key, Mutation, Op, OpResult, Outcome, Put, PutOutcome, QuotaOptions, Space,
    StoreError, Txn, TxnOutcome, Work, JOURNAL_SEAL_MAX_BYTES, META_COMPACTED, META_JOURNAL_SEALED,
    META_JOURNAL_SEALED_AT, META_REVISION, OWNER_TAG,
};
use crate::audit::journal::{Pos, Taken};
use crate::audit::{AuditError, Chain, Drafts, Journal, Record};

/// Entries one prune or one history compaction looks at, so that neither
/// stalls the writer for long; the next commit goes on where it stopped.
const MAX_PRUNE_SCAN: usize = 200_000;

/// What a committed batch changed, for the writer's state and the alarm.
struct Applied {
    revision: u64,
    compacted: u64,
    counters: BTreeMap<String, RoleUsage>,
    events: Events,
    pruned: u64,
    usage: super::Usage,
}

/// Journal records being sealed in a batch, and where in the journal they end.
struct Sealing<'a> {
    drafts: &'a Drafts,
    through: Option<Pos>,
}

/// Free space below which writes are refused (or `journal_reserve`, if
/// smaller): room for the audit to seal two commits' worth of its journal,
/// so that the data cannot take the space the audit's backlog needs.
pub(super) const WRITE_HEADROOM: u64 = 2 * JOURNAL_SEAL_MAX_BYTES as u64;

/// How often a full disk is logged at most: every failed commit would
/// otherwise log a line onto the disk that is full.
const NO_SPACE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Upper bound on one batch, so that one commit's latency stays bounded under load.
const MAX_BATCH: usize = 1024;

/// The longest a batch waits for more writes before it commits.
const MAX_GATHER: Duration = Duration::from_micros(250);
/// How often the writer looks for them meanwhile.
const GATHER_POLL: Duration = Duration::from_micros(20);

/// How long the next batch may wait to gather writes, and for how many.
///
/// Taking only what queued during the last commit splits a steady set of
/// writers into halves that alternate: N callers, each waiting for its
/// reply before writing again, end up in batches of N/2 (measured: 32
/// connections gave batches of 16.0 on average), so every write waits for
/// two commits. The callers a commit just answered usually write again
/// within a few tens of µs; waiting for them, bounded by a quarter of a
/// commit, merges the halves again. A lone writer never waits: it expects
/// itself only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gather {
    /// The callers just answered plus those already queued.
    expect: usize,
    window: Duration,
}

impl Default for Gather {
    fn default() -> Gather {
        Gather {
            expect: 1,
            window: Duration::ZERO,
        }
    }
}

impl Gather {
    fn after(committed: usize, queued: usize, took: Duration) -> Gather {
        Gather {
            expect: (committed + queued).min(MAX_BATCH),
            window: (took / 4).min(MAX_GATHER),
        }
    }
}

pub(super) struct Writer {
    pub env: Env<WithoutTls>,
    pub dbs: Dbs,
    pub revision: u64,
    pub compacted: u64,
    pub history: u64,
    pub jobs: mpsc::Receiver<Job>,
    pub published: watch::Sender<u64>,
    /// The audit chain's head: only this thread seals records.
    pub chain: Chain,
    pub journal: Option<Arc<Journal>>,
    pub audit: Option<AuditOptions>,
    /// The store's directory: its filesystem's free space, named in errors.
    pub path: PathBuf,
    /// When a full disk was last logged.
    pub no_space_logged: Option<Instant>,
    pub quota: QuotaOptions,
    pub page_size: u64,
    /// Each role's usage as committed.
    pub counters: BTreeMap<String, RoleUsage>,
    pub space: Arc<Mutex<Space>>,
}

impl Writer {
    pub fn run(mut self) {
        let mut batch = Vec::with_capacity(64);
        // Records a previous run left in the journal are sealed first.
        while self.commit_batch(&mut batch, false) {}
        let mut gather = Gather::default();
        loop {
            if batch.is_empty() {
                match self.jobs.blocking_recv() {
                    Some(job) => batch.push(job),
                    None => break,
                }
            }
            let mut full = self.drain(&mut batch);
            if batch.len() < gather.expect && !full {
                let deadline = Instant::now() + gather.window;
                while batch.len() < gather.expect && !full && Instant::now() < deadline {
                    std::thread::sleep(GATHER_POLL);
                    full = self.drain(&mut batch);
                }
            }
            let jobs = batch.len();
            let started = Instant::now();
            let mut more = self.commit_batch(&mut batch, false);
            let took = started.elapsed();
            // A backlog is sealed in bounded commits, one after another,
            // before new jobs are looked at again.
            while more && self.jobs.is_empty() {
                more = self.commit_batch(&mut batch, false);
            }
            // What queued during the commit starts the next batch.
            self.drain(&mut batch);
            gather = Gather::after(jobs, batch.len(), took);
        }
        // Shutting down: seal whatever the journal still holds, and leave the
        // log within its retention.
        while self.commit_batch(&mut batch, true) {}
    }

    /// Takes what is queued, up to a batch's bounds; true when one is reached.
    fn drain(&mut self, batch: &mut Vec<Job>) -> bool {
        let budget = self.quota.batch_bytes;
        let mut bytes: usize = batch.iter().map(|j| j.bytes).sum();
        loop {
            if batch.len() >= MAX_BATCH || (budget > 0 && bytes >= budget) {
                return true;
            }
            match self.jobs.try_recv() {
                Ok(job) => {
                    bytes += job.bytes;
                    batch.push(job);
                }
                Err(_) => return false,
            }
        }
    }

    /// Why this batch's mutations cannot be made: the disk has less free
    /// space than the audit journal's reserve, or the journal could not make
    /// its reserve again. The audit keeps the space it needs to seal what it
    /// holds; the writes are refused (with their records sealed as any failed
    /// mutation's), reads go on.
    fn refuse_writes(&self) -> Option<StoreError> {
        let journal = self.journal.as_ref()?;
        let reserve = journal.reserve();
        if reserve == 0 {
            return None;
        }
        let headroom = reserve.min(WRITE_HEADROOM);
        let free = free_bytes(&self.path);
        if let Some(free) = free.filter(|f| *f < headroom) {
            return Some(StoreError::NoSpace {
                path: self.path.clone(),
                what: format!("{free} bytes free; writes need {headroom} left free for the audit to seal its journal, and resume by themselves once they are"),
            });
        }
        if !journal.reserve_whole() {
            return Some(StoreError::NoSpace {
                path: journal.dir().to_path_buf(),
                what: format!("the audit journal cannot preallocate its reserve of {reserve} bytes ([audit] journal_reserve); writes resume by themselves once it can"),
            });
        }
        None
    }

    /// Commits the batch, with (a bounded part of) the journal. Returns
    /// whether more journal records wait to be sealed after a commit that
    /// succeeded.
    fn commit_batch(&mut self, batch: &mut Vec<Job>, closing: bool) -> bool {
        let taken = match &self.journal {
            Some(j) => match j.take(JOURNAL_SEAL_MAX_BYTES) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot take the audit journal");
                    Taken::default()
                }
            },
            None => Taken::default(),
        };
        if batch.is_empty() && taken.drafts.is_empty() && !closing {
            return false;
        }
        let refused = if batch.iter().any(|j| matches!(j.work, Work::Mutate(_))) {
            self.refuse_writes()
        } else {
            None
        };
        let flushing = closing || batch.iter().any(|j| matches!(j.work, Work::Flush));
        let mut results = Vec::with_capacity(batch.len());
        let mut chain = self.chain.clone();
        let mut sealed = Sealing {
            drafts: &taken.drafts,
            through: taken.through(),
        };
        let through = sealed.through;
        let more = taken.more;
        match self.apply_batch(
            batch,
            &mut sealed,
            &mut chain,
            flushing,
            refused.as_ref(),
            &mut results,
        ) {
            Ok(applied) => {
                self.revision = applied.revision;
                self.compacted = applied.compacted;
                self.chain = chain;
                if let (Some(j), Some(through)) = (&self.journal, through) {
                    j.retire(through);
                }
                let revision = applied.revision;
                self.publish_space(applied);
                // Publish before replying so that a client that hears "ok" and then
                // watches sees a revision at least this new.
                self.published.send_replace(revision);
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(result);
                }
                if self.no_space_logged.take().is_some() {
                    tracing::info!(store = %self.path.display(), "store commits again: space is back");
                }
                more
            }
            Err(e) => {
                let no_space = disk_full(&e, &self.path);
                let message = e.to_string();
                if !no_space {
                    tracing::error!(error = %e, jobs = batch.len(), "store commit failed");
                } else if self
                    .no_space_logged
                    .is_none_or(|t| t.elapsed() >= NO_SPACE_LOG_EVERY)
                {
                    tracing::error!(store = %self.path.display(), error = %e, jobs = batch.len(), journal_records = taken.drafts.len(), "no space left on device: store commit failed; reads go on, audited from the journal's reserve");
                    self.no_space_logged = Some(Instant::now());
                }
                let error = || {
                    if no_space {
                        StoreError::NoSpace {
                            path: self.path.clone(),
                            what: format!(
                                "the commit failed ({message}); nothing of it was written"
                            ),
                        }
                    } else {
                        StoreError::BatchFailed {
                            message: message.clone(),
                        }
                    }
                };
                if let Some(j) = &self.journal {
                    // Nothing of this batch happened: the journal keeps what it
                    // had (sealing never changes a draft), and each mutation
                    // gets a record saying it failed, including those already
                    // sealed into the transaction that was lost.
                    j.restore(taken);
                    for job in batch.iter_mut() {
                        if let Some(mut rec) = job.record.take() {
                            let e = error();
                            rec.error(e.code(), &e.to_string());
                            if let Err(e) = j.append(&rec) {
                                tracing::error!(error = %e, "cannot record a failed commit");
                            }
                        }
                    }
                }
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(error()));
                }
                false
            }
        }
    }

    /// Seals a record that was not journaled (a mutation's, a checkpoint).
    fn seal_record(
        &self,
        wtxn: &mut RwTxn,
        chain: &mut Chain,
        record: &Record,
        stored: &mut Vec<u8>,
    ) -> Result<(), heed::Error> {
        // Cannot happen (plain strings, numbers and JSON values into a Vec);
        // if it did, the batch fails rather than store a broken record.
        let seq = chain
            .seal_record(record, stored)
            .map_err(|e: AuditError| heed::Error::Encoding(Box::new(e)))?;
        self.put_audit(wtxn, seq, stored)
    }

    /// Stores a sealed record. Seqs only grow, so each record goes at the end
    /// of the database: MDB_APPEND skips the search and fills pages instead of
    /// splitting them in half, and a seq that is not past the last one fails
    /// the batch (KeyExist) instead of overwriting a record.
    fn put_audit(&self, wtxn: &mut RwTxn, seq: u64, stored: &[u8]) -> Result<(), heed::Error> {
        self.dbs
            .audit
            .put_with_flags(wtxn, PutFlags::APPEND, &seq.to_be_bytes(), stored)
    }

    /// After a commit: the new figures, the alarms, and the log lines of
    /// those raised or cleared. Before the replies, so that a caller refused
    /// for a quota finds the alarm raised when it looks.
    fn publish_space(&mut self, applied: Applied) {
        self.counters = applied.counters;
        let map_used = (self.env.info().last_page_number as u64 + 1) * self.page_size;
        let mut space = match self.space.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let u = &mut space.usage;
        u.data_bytes = applied.usage.data_bytes;
        u.history_bytes = applied.usage.history_bytes;
        u.audit_bytes = applied.usage.audit_bytes;
        u.map_used_bytes = map_used;
        u.audit_pruned += applied.pruned;
        if space.counters != self.counters {
            space.counters = self.counters.clone();
        }
        space.refresh(&applied.events);
    }

    /// Pages of the data databases (`kv`, `changes`, `meta`), in bytes.
    fn data_bytes(&self, txn: &heed::RoTxn) -> Result<u64, heed::Error> {
        Ok(quota::db_bytes(self.dbs.kv, txn)?
            + quota::db_bytes(self.dbs.changes, txn)?
            + quota::db_bytes(self.dbs.meta, txn)?)
    }

    /// May this mutation, already applied in its nested transaction, commit?
    /// A write is refused when it would leave usage past a limit without
    /// reducing it: so at the limit only writes that shrink usage pass, and
    /// deletes (which never count as writes) always do. Returns the refused
    /// quota's id with the error.
    fn admit(
        &self,
        owner: Option<&Owner>,
        deltas: &Deltas,
        counters: &BTreeMap<String, RoleUsage>,
        data: Option<(u64, u64)>,
    ) -> Result<(), (String, StoreError)> {
        if let Some(o) = owner {
            let now = counters.get(&*o.role).copied().unwrap_or_default();
            let (db, dk) = deltas.of(&o.role);
            let mut next = now;
            next.add(db, dk);
            for (unit, bound, before, after, what) in [
                (
                    Unit::Bytes,
                    &o.limits.max_bytes,
                    now.bytes,
                    next.bytes,
                    "bytes",
                ),
                (Unit::Keys, &o.limits.max_keys, now.keys, next.keys, "keys"),
            ] {
                let Some(b) = bound else { continue };
                if after > b.max && after >= before {
                    return Err((
                        quota::role_quota_id(&o.role, unit),
                        StoreError::QuotaExceeded {
                            what: format!("role {}'s {what}", o.role),
                            quota: format!("{} ({})", quota::role_quota_id(&o.role, unit), b.rule),
                            before,
                            after,
                            limit: b.max,
                            unit: what,
                        },
                    ));
                }
            }
        }
        if let (Some(max), Some((before, after))) = (self.quota.max_store_bytes, data) {
            if after > max && after >= before {
                return Err((
                    quota::STORE_QUOTA.into(),
                    StoreError::QuotaExceeded {
                        what: "store data (keys, values and watch history, in LMDB pages)".into(),
                        quota: quota::STORE_QUOTA.into(),
                        before,
                        after,
                        limit: max,
                        unit: "bytes",
                    },
                ));
            }
        }
        Ok(())
    }

    fn apply_batch(
        &self,
        batch: &mut [Job],
        sealing: &mut Sealing<'_>,
        chain: &mut Chain,
        flushing: bool,
        refused: Option<&StoreError>,
        results: &mut Vec<Result<Outcome, StoreError>>,
    ) -> Result<Applied, heed::Error> {
        let mut wtxn = self.env.write_txn()?;
        let audited = self.journal.is_some();
        // One buffer for every record's stored form in this batch.
        let mut stored = Vec::with_capacity(1024);
        for draft in sealing.drafts.iter() {
            let seq = chain.seal(draft, &mut stored);
            self.put_audit(&mut wtxn, seq, &stored)?;
        }
        if let Some(through) = sealing.through {
            // Committed with the records it covers: if the gateway dies before
            // the journal files are deleted (or punched), the next start skips
            // them instead of sealing them twice.
            let before = through.generation.saturating_sub(1);
            self.dbs
                .meta
                .put(&mut wtxn, META_JOURNAL_SEALED, &before.to_be_bytes())?;
            self.dbs
                .meta
                .put(&mut wtxn, META_JOURNAL_SEALED_AT, &through.encode())?;
        }
        let mut revision = self.revision;
        let mut counters = self.counters.clone();
        let mut events = Events::default();
        // Data pages as of the last mutation, when it was measured.
        let mut data: Option<u64> = None;
        for job in batch.iter_mut() {
            let Work::Mutate(mutation) = &job.work else {
                results.push(Ok(Outcome::Flushed));
                continue;
            };
            let result = if let Some(StoreError::NoSpace { path, what }) = refused {
                Err(StoreError::NoSpace {
                    path: path.clone(),
                    what: what.clone(),
                })
            } else {
                let writes = mutation.writes();
                let before = match (self.quota.max_store_bytes, writes) {
                    (Some(_), true) => Some(match data {
                        Some(d) => d,
                        None => self.data_bytes(&wtxn)?,
                    }),
                    _ => None,
                };
                let owner = job.owner.as_ref();
                let mut deltas = Deltas::default();
                let mut child = self.env.nested_write_txn(&mut wtxn)?;
                match apply(
                    &mut child,
                    self.dbs,
                    mutation,
                    revision,
                    owner.map(|o| &o.role),
                    &mut deltas,
                ) {
                    Ok((outcome, changed)) => {
                        let measured = match before {
                            Some(b) => Some((b, self.data_bytes(&child)?)),
                            None => None,
                        };
                        let admitted = if writes {
                            self.admit(owner, &deltas, &counters, measured)
                        } else {
                            Ok(())
                        };
                        match admitted {
                            Ok(()) => {
                                child.commit()?;
                                deltas.apply(&mut counters);
                                data = measured.map(|(_, after)| after);
                                if writes {
                                    if self.quota.max_store_bytes.is_some() {
                                        events.push(quota::STORE_QUOTA.into(), Event::Admitted);
                                    }
                                    if let Some(o) = owner {
                                        for unit in [Unit::Bytes, Unit::Keys] {
                                            events.push(
                                                quota::role_quota_id(&o.role, unit),
                                                Event::Admitted,
                                            );
                                        }
                                    }
                                }
                                if changed {
                                    revision += 1;
                                }
                                Ok(outcome)
                            }
                            Err((quota, e)) => {
                                child.abort();
                                events.push(quota, Event::Refused);
                                Err(e)
                            }
                        }
                    }
                    Err(e) => {
                        child.abort();
                        Err(e)
                    }
                }
            };
            // The record goes into the same transaction as the mutation: both
            // are committed, or neither. It stays with the job until the
            // commit succeeded, so that a failed commit can still record it.
            if let (true, Some(record)) = (audited, job.record.as_mut()) {
                match &result {
                    Ok(_) => record.ok(),
                    Err(e) => record.error(e.code(), &e.to_string()),
                }
                self.seal_record(&mut wtxn, chain, record, &mut stored)?;
            }
            results.push(result);
        }
        // The counters change with the data, in the same transaction.
        for (role, u) in &counters {
            if self.counters.get(role) == Some(u) {
                continue;
            }
            let mut k = quota::META_USAGE.to_vec();
            k.extend_from_slice(role.as_bytes());
            if *u == RoleUsage::default() {
                self.dbs.meta.delete(&mut wtxn, &k)?;
            } else {
                self.dbs.meta.put(&mut wtxn, &k, &u.encode())?;
            }
        }
        counters.retain(|_, u| *u != RoleUsage::default());
        let mut compacted = self.compacted;
        if revision != self.revision {
            self.dbs
                .meta
                .put(&mut wtxn, META_REVISION, &revision.to_be_bytes())?;
            if revision > compacted + self.history {
                compacted = revision - self.history;
                let upto = compacted.to_be_bytes();
                let range = (
                    std::ops::Bound::Unbounded,
                    std::ops::Bound::Included(&upto[..]),
                );
                self.dbs.changes.delete_range(&mut wtxn, &range)?;
                self.dbs
                    .meta
                    .put(&mut wtxn, META_COMPACTED, &compacted.to_be_bytes())?;
            }
        }
        compacted = self.compact_history_by_size(&mut wtxn, revision, compacted)?;
        let mut pruned = 0;
        if audited {
            let audit_bytes = quota::db_bytes(self.dbs.audit, &wtxn)?;
            let over = self
                .audit
                .as_ref()
                .and_then(|a| a.max_bytes)
                .is_some_and(|max| audit_bytes > max);
            if flushing || over {
                pruned = self.prune(&mut wtxn, chain, &mut stored, audit_bytes)?;
            }
        }
        let mut usage = super::Usage::default();
        super::measure(&wtxn, self.dbs, &mut usage)?;
        wtxn.commit()?;
        Ok(Applied {
            revision,
            compacted,
            counters,
            events,
            pruned,
            usage,
        })
    }

    /// The watch history by size: past `history_bytes`, the oldest revisions
    /// go (down to 90% of it; never the newest), as compaction by count
    /// does. A watcher behind them gets `compacted` and re-reads.
    fn compact_history_by_size(
        &self,
        wtxn: &mut RwTxn,
        revision: u64,
        compacted: u64,
    ) -> Result<u64, heed::Error> {
        let Some(max) = self.quota.history_bytes else {
            return Ok(compacted);
        };
        let used = quota::db_bytes(self.dbs.changes, wtxn)?;
        if used <= max {
            return Ok(compacted);
        }
        let target = max - max / 10;
        let mut freed = 0u64;
        let mut cut = None;
        for item in self.dbs.changes.iter(wtxn)?.take(MAX_PRUNE_SCAN) {
            let (k, raw) = item?;
            let Ok(rev) = decode_u64(k) else { break };
            if rev >= revision {
                break;
            }
            freed += quota::entry_cost(raw.len(), self.page_size);
            cut = Some(rev);
            if used.saturating_sub(freed) <= target {
                break;
            }
        }
        let Some(cut) = cut else {
            return Ok(compacted);
        };
        let upto = cut.to_be_bytes();
        let range = (
            std::ops::Bound::Unbounded,
            std::ops::Bound::Included(&upto[..]),
        );
        self.dbs.changes.delete_range(wtxn, &range)?;
        let compacted = compacted.max(cut);
        self.dbs
            .meta
            .put(wtxn, META_COMPACTED, &compacted.to_be_bytes())?;
        Ok(compacted)
    }

    /// Retention: drops the oldest records past `max_records`, `max_age` or
    /// `max_bytes` (then down to 90% of it), and seals a checkpoint naming
    /// the last dropped record's seq and hash, so the chain that remains
    /// still verifies. Returns how many records it dropped.
    fn prune(
        &self,
        wtxn: &mut RwTxn,
        chain: &mut Chain,
        stored: &mut Vec<u8>,
        audit_bytes: u64,
    ) -> Result<u64, heed::Error> {
        let Some(opts) = &self.audit else {
            return Ok(0);
        };
        let Some((first, _)) = self.dbs.audit.first(wtxn)? else {
            return Ok(0);
        };
        let Ok(first) = decode_u64(first) else {
            return Ok(0);
        };
        let mut cut = 0u64;
        if let Some(max) = opts.max_records {
            let count = chain.seq.saturating_sub(first) + 1;
            if count > max {
                cut = first + (count - max) - 1;
            }
        }
        if let Some(age) = opts.max_age {
            let cutoff = std::time::SystemTime::now() - age;
            // Bounded per flush so one prune never stalls the writer for long.
            for item in self.dbs.audit.iter(wtxn)?.take(100_000) {
                let (k, raw) = item?;
                let old = serde_json::from_slice::<Record>(raw)
                    .ok()
                    .and_then(|r| humantime::parse_rfc3339(&r.time).ok())
                    .is_some_and(|t| t < cutoff);
                if !old {
                    break;
                }
                cut = cut.max(decode_u64(k).unwrap_or(0));
            }
        }
        if let Some(max) = opts.max_bytes.filter(|m| audit_bytes > *m) {
            // Down to 90%, so that pruning (and its checkpoint record) comes
            // once per tenth of the bound rather than at every commit.
            let target = max - max / 10;
            let mut freed = 0u64;
            for item in self.dbs.audit.iter(wtxn)?.take(MAX_PRUNE_SCAN) {
                let (k, raw) = item?;
                freed += quota::entry_cost(raw.len(), self.page_size);
                cut = cut.max(decode_u64(k).unwrap_or(0));
                if audit_bytes.saturating_sub(freed) <= target {
                    break;
                }
            }
        }
        // Never prune the newest record: the checkpoint must follow something.
        let cut = cut.min(chain.seq.saturating_sub(1));
        if cut < first {
            return Ok(0);
        }
        let Some(last_raw) = self.dbs.audit.get(wtxn, &cut.to_be_bytes())? else {
            return Ok(0);
        };
        let last_hash = serde_json::from_slice::<Record>(last_raw)
            .map(|r| r.hash)
            .unwrap_or_default();
        let upto = cut.to_be_bytes();
        let range = (
            std::ops::Bound::Unbounded,
            std::ops::Bound::Included(&upto[..]),
        );
        let pruned = self.dbs.audit.delete_range(wtxn, &range)?;
        let mut checkpoint = Record::new("checkpoint");
        checkpoint.detail = Some(serde_json::json!({
            "pruned_from_seq": first,
            "pruned_through_seq": cut,
            "pruned_through_hash": last_hash,
            "pruned_records": pruned,
            "max_records": opts.max_records,
            "max_age_s": opts.max_age.map(|a| a.as_secs()),
            "max_bytes": opts.max_bytes,
        }));
        checkpoint.ok();
        self.seal_record(wtxn, chain, &checkpoint, stored)?;
        Ok(pruned as u64)
    }
}

fn write_err(source: heed::Error) -> StoreError {
    StoreError::Write { source }
}

/// Checks an `if_revision` precondition against the key's current mod revision
/// (0 when absent).
fn expect_revision(key: &Key, expected: Option<u64>, actual: u64) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != actual => Err(StoreError::Conflict {
            key: key.to_string(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

/// What a key holds before a put or delete: its revisions, and who owns how
/// many of its bytes.
struct Previous {
    revision: u64,
    create_revision: u64,
    owner: Option<(Arc<str>, i64)>,
}

fn previous(txn: &RwTxn, ctx: &Ctx<'_>, key: &Key) -> Result<Option<Previous>, StoreError> {
    let Some(raw) = ctx
        .dbs
        .kv
        .get(txn, key.as_bytes())
        .map_err(|source| StoreError::Read { source })?
    else {
        return Ok(None);
    };
    let s = parse_record(key.as_str(), raw)?;
    let owner = s.owner.map(|o| {
        // The common case (a role rewriting its own key) shares the Arc.
        let role = match ctx.owner {
            Some(me) if &**me == o => me.clone(),
            _ => Arc::from(o),
        };
        (role, quota::entry_size(key.as_bytes(), s.json))
    });
    Ok(Some(Previous {
        revision: s.revision,
        create_revision: s.create_revision,
        owner,
    }))
}

struct Ctx<'a> {
    dbs: Dbs,
    /// The revision this mutation commits at, if it changes anything.
    next: u64,
    events: &'a mut Changes,
    /// The role it writes for: it owns what it puts.
    owner: Option<&'a Arc<str>>,
    deltas: &'a mut Deltas,
}

/// The `changes` record of one revision, written as it happens: the JSON
/// array of its events (`[Event]`'s serde form), with each put's value spliced
/// in from the bytes computed at parse rather than serialised again.
#[derive(Default)]
struct Changes {
    json: Vec<u8>,
    count: usize,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn open(&mut self, revision: u64, key: &Key) {
        self.json.push(if self.count == 0 { b'[' } else { b',' });
        self.count += 1;
        // Writing into a Vec cannot fail.
        let _ = write!(self.json, "{{\"revision\":{revision},\"key\":");
        // Serialising a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.json, key.as_str());
    }

    fn put(&mut self, revision: u64, key: &Key, value: &[u8], create_revision: u64) {
        self.open(revision, key);
        self.json.extend_from_slice(b",\"type\":\"put\",\"value\":");
        self.json.extend_from_slice(value);
        let _ = write!(self.json, ",\"create_revision\":{create_revision}}}");
    }

    fn delete(&mut self, revision: u64, key: &Key) {
        self.open(revision, key);
        self.json.extend_from_slice(b",\"type\":\"delete\"}");
    }

    fn finish(mut self) -> Vec<u8> {
        self.json.push(b']');
        self.json
    }
}

fn put(txn: &mut RwTxn, ctx: &mut Ctx<'_>, op: &Put) -> Result<PutOutcome, StoreError> {
    let Put {
        key,
        value,
        if_revision,
    } = op;
    let if_revision = *if_revision;
    let existing = previous(txn, ctx, key)?;
    let previous = existing.as_ref().map(|e| e.revision);
    expect_revision(key, if_revision, previous.unwrap_or(0))?;
    let create_revision = existing.as_ref().map_or(ctx.next, |e| e.create_revision);
    if let Some((role, size)) = existing.and_then(|e| e.owner) {
        ctx.deltas.add(&role, -size, -1);
    }
    // Role names are letters, digits, '-' and '_' (the policy checks), so the
    // tag's closing NUL cannot occur inside one; anything else stays unowned.
    let owner = ctx.owner.filter(|o| !o.as_bytes().contains(&OWNER_TAG));
    let tag = owner.map_or(0, |o| o.len() + 2);
    let mut record = Vec::with_capacity(16 + tag + value.len());
    record.extend_from_slice(&create_revision.to_be_bytes());
    record.extend_from_slice(&ctx.next.to_be_bytes());
    if let Some(o) = owner {
        record.push(OWNER_TAG);
        record.extend_from_slice(o.as_bytes());
        record.push(OWNER_TAG);
        ctx.deltas
            .add(o, quota::entry_size(key.as_bytes(), value.json()), 1);
    }
    record.extend_from_slice(value.json());
    ctx.dbs
        .kv
        .put(txn, key.as_bytes(), &record)
        .map_err(write_err)?;
    ctx.events.put(ctx.next, key, value.json(), create_revision);
    Ok(PutOutcome {
        key: key.to_string(),
        revision: ctx.next,
        create_revision,
        previous_revision: previous,
    })
}

fn delete(txn: &mut RwTxn, ctx: &mut Ctx<'_>, op: &Delete) -> Result<DeleteOutcome, StoreError> {
    let Delete { key, if_revision } = op;
    let if_revision = *if_revision;
    let existing = previous(txn, ctx, key)?;
    let actual = existing.as_ref().map_or(0, |e| e.revision);
    expect_revision(key, if_revision, actual)?;
    let Some(existing) = existing else {
        return Ok(DeleteOutcome {
            key: key.to_string(),
            deleted: false,
            revision: ctx.next - 1,
        });
    };
    if let Some((role, size)) = existing.owner {
        ctx.deltas.add(&role, -size, -1);
    }
    ctx.dbs.kv.delete(txn, key.as_bytes()).map_err(write_err)?;
    ctx.events.delete(ctx.next, key);
    Ok(DeleteOutcome {
        key: key.to_string(),
        deleted: true,
        revision: ctx.next,
    })
}

fn check(txn: &RwTxn, dbs: Dbs, index: usize, check: &Check) -> Result<(), StoreError> {
    let entry = get_entry(txn, dbs.kv, check.key.as_bytes())?;
    let fail = |reason: String| StoreError::CheckFailed {
        index,
        key: check.key.to_string(),
        reason,
    };
    if let Some(expected) = check.revision {
        let actual = entry.as_ref().map_or(0, |e| e.revision);
        if expected != actual {
            return Err(fail(if expected == 0 {
                format!("expected absent, found revision {actual}")
            } else if actual == 0 {
                format!("expected revision {expected}, key is absent")
            } else {
                format!("expected revision {expected}, found {actual}")
            }));
        }
    }
    if let Some(expected) = &check.value {
        match &entry {
            Some(e) if &e.value == expected => {}
            Some(_) => return Err(fail("value differs from the expected value".into())),
            None => return Err(fail("expected a value, key is absent".into())),
        }
    }
    Ok(())
}

/// Applies one mutation at revision `current + 1`. Returns its outcome and whether
/// it changed anything (and so consumed that revision).
fn apply(
    txn: &mut RwTxn,
    dbs: Dbs,
    mutation: &Mutation,
    current: u64,
    owner: Option<&Arc<str>>,
    deltas: &mut Deltas,
) -> Result<(Outcome, bool), StoreError> {
    let mut events = Changes::default();
    let mut ctx = Ctx {
        dbs,
        next: current + 1,
        events: &mut events,
        owner,
        deltas,
    };
    let outcome = match mutation {
        Mutation::Put(p) => Outcome::Put(put(txn, &mut ctx, p)?),
        Mutation::Delete(d) => Outcome::Delete(delete(txn, &mut ctx, d)?),
        Mutation::Txn(Txn { checks, ops }) => {
            for (index, c) in checks.iter().enumerate() {
                check(txn, dbs, index, c)?;
            }
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                results.push(match op {
                    Op::Put(p) => OpResult::Put(put(txn, &mut ctx, p)?),
                    Op::Delete(d) => OpResult::Delete(delete(txn, &mut ctx, d)?),
                    Op::Get { key } => {
                        let entry = get_entry(txn, dbs.kv, key.as_bytes())?;
                        OpResult::Get {
                            key: key.to_string(),
                            found: entry.is_some(),
                            entry,
                        }
                    }
                });
            }
            let revision = if ctx.events.is_empty() {
                current
            } else {
                ctx.next
            };
            Outcome::Txn(TxnOutcome { revision, results })
        }
    };
    let changed = !events.is_empty();
    if changed {
        let record = events.finish();
        dbs.changes
            .put(txn, &(current + 1).to_be_bytes(), &record)
            .map_err(write_err)?;
    }
    Ok((outcome, changed))
}

#[cfg(test)]
mod gather_tests {
    use super::*;

    #[test]
    fn a_lone_writer_never_waits_and_waits_are_bounded() {
        // One caller, nothing queued: the next batch expects one job, which
        // the first job it takes already meets, so it never waits.
        let g = Gather::after(1, 0, Duration::from_micros(400));
        assert_eq!(g.expect, 1);
        // 16 answered and 16 queued (the split halves): wait for all 32, at
        // most a quarter of the commit.
        let g = Gather::after(16, 16, Duration::from_micros(800));
        assert_eq!(g.expect, 32);
        assert_eq!(g.window, Duration::from_micros(200));
        // A slow commit never makes a batch wait more than MAX_GATHER, and no
        // batch expects more than MAX_BATCH.
        let g = Gather::after(MAX_BATCH, MAX_BATCH, Duration::from_secs(1));
        assert_eq!(g.expect, MAX_BATCH);
        assert_eq!(g.window, MAX_GATHER);
    }
}

#[cfg(test)]
mod changes_tests {
    use super::super::{Event, EventKind, Key};
    use super::Changes;
    use serde_json::json;

    #[test]
    fn a_change_record_written_by_hand_reads_back_as_its_events() {
        let value = json!({"b": [1, "\u{1F600}\"\\"], "a": null});
        let mut c = Changes::default();
        assert!(c.is_empty());
        c.put(
            7,
            &Key::parse("/a/\"q\"").unwrap(),
            &crate::audit::canonical(&value),
            3,
        );
        c.delete(7, &Key::parse("/b").unwrap());
        let events: Vec<Event> = serde_json::from_slice(&c.finish()).unwrap();
        assert_eq!(
            events,
            vec![
                Event {
                    revision: 7,
                    key: "/a/\"q\"".into(),
                    kind: EventKind::Put {
                        value,
                        create_revision: 3
                    },
                },
                Event {
                    revision: 7,
                    key: "/b".into(),
                    kind: EventKind::Delete,
                },
            ]
        );
    }
}
