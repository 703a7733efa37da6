//! The single writer: group commit of every queued mutation.
//!
//! LMDB allows one write transaction at a time and a durable commit costs an
//! fsync (~240 µs here), so the writer takes whatever has queued while the last
//! fsync ran and commits it all at once. Callers hear back only after that commit
//! returned, so an acknowledged mutation is on disk.

use heed::types::Bytes;
use heed::{Database, Env, RwTxn, WithoutTls};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::{
    get_entry, Check, Dbs, DeleteOutcome, Event, EventKind, Job, Key, Mutation, Op, OpResult,
    Outcome, PutOutcome, StoreError, TxnOutcome, META_COMPACTED, META_REVISION,
};

/// Upper bound on one batch, so that one commit's latency stays bounded under load.
const MAX_BATCH: usize = 1024;

pub(super) struct Writer {
    pub env: Env<WithoutTls>,
    pub dbs: Dbs,
    pub revision: u64,
    pub compacted: u64,
    pub history: u64,
    pub jobs: mpsc::Receiver<Job>,
    pub published: watch::Sender<u64>,
}

impl Writer {
    pub fn run(mut self) {
        let mut batch = Vec::with_capacity(64);
        while let Some(job) = self.jobs.blocking_recv() {
            batch.push(job);
            while batch.len() < MAX_BATCH {
                match self.jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit_batch(&mut batch);
        }
    }

    fn commit_batch(&mut self, batch: &mut Vec<Job>) {
        let mut results = Vec::with_capacity(batch.len());
        match self.apply_batch(batch, &mut results) {
            Ok((revision, compacted)) => {
                self.revision = revision;
                self.compacted = compacted;
                // Publish before replying so that a client that hears "ok" and then
                // watches sees a revision at least this new.
                self.published.send_replace(revision);
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "store commit failed");
                let message = e.to_string();
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(StoreError::BatchFailed {
                        message: message.clone(),
                    }));
                }
            }
        }
    }

    fn apply_batch(
        &self,
        batch: &[Job],
        results: &mut Vec<Result<Outcome, StoreError>>,
    ) -> Result<(u64, u64), heed::Error> {
        let mut wtxn = self.env.write_txn()?;
        let mut revision = self.revision;
        for job in batch {
            let mut child = self.env.nested_write_txn(&mut wtxn)?;
            match apply(&mut child, self.dbs, &job.mutation, revision) {
                Ok((outcome, changed)) => {
                    child.commit()?;
                    if changed {
                        revision += 1;
                    }
                    results.push(Ok(outcome));
                }
                Err(e) => {
                    child.abort();
                    results.push(Err(e));
                }
            }
        }
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
        wtxn.commit()?;
        Ok((revision, compacted))
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

fn current_revision(txn: &RwTxn, kv: Database<Bytes, Bytes>, key: &Key) -> Result<u64, StoreError> {
    Ok(get_entry(txn, kv, key.as_bytes())?.map_or(0, |e| e.revision))
}

struct Ctx<'a> {
    dbs: Dbs,
    /// The revision this mutation commits at, if it changes anything.
    next: u64,
    events: &'a mut Vec<Event>,
}

fn put(
    txn: &mut RwTxn,
    ctx: &mut Ctx<'_>,
    key: &Key,
    value: &Value,
    if_revision: Option<u64>,
) -> Result<PutOutcome, StoreError> {
    let existing = get_entry(txn, ctx.dbs.kv, key.as_bytes())?;
    let previous = existing.as_ref().map(|e| e.revision);
    expect_revision(key, if_revision, previous.unwrap_or(0))?;
    let create_revision = existing.map_or(ctx.next, |e| e.create_revision);
    let mut record = Vec::with_capacity(16 + 64);
    record.extend_from_slice(&create_revision.to_be_bytes());
    record.extend_from_slice(&ctx.next.to_be_bytes());
    serde_json::to_writer(&mut record, value).map_err(|e| StoreError::Corrupt {
        what: format!("value does not serialise: {e}"),
    })?;
    ctx.dbs
        .kv
        .put(txn, key.as_bytes(), &record)
        .map_err(write_err)?;
    ctx.events.push(Event {
        revision: ctx.next,
        key: key.to_string(),
        kind: EventKind::Put {
            value: value.clone(),
            create_revision,
        },
    });
    Ok(PutOutcome {
        key: key.to_string(),
        revision: ctx.next,
        create_revision,
        previous_revision: previous,
    })
}

fn delete(
    txn: &mut RwTxn,
    ctx: &mut Ctx<'_>,
    key: &Key,
    if_revision: Option<u64>,
) -> Result<DeleteOutcome, StoreError> {
    let actual = current_revision(txn, ctx.dbs.kv, key)?;
    expect_revision(key, if_revision, actual)?;
    if actual == 0 {
        return Ok(DeleteOutcome {
            key: key.to_string(),
            deleted: false,
            revision: ctx.next - 1,
        });
    }
    ctx.dbs.kv.delete(txn, key.as_bytes()).map_err(write_err)?;
    ctx.events.push(Event {
        revision: ctx.next,
        key: key.to_string(),
        kind: EventKind::Delete,
    });
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
) -> Result<(Outcome, bool), StoreError> {
    let mut events = Vec::new();
    let mut ctx = Ctx {
        dbs,
        next: current + 1,
        events: &mut events,
    };
    let outcome = match mutation {
        Mutation::Put {
            key,
            value,
            if_revision,
        } => Outcome::Put(put(txn, &mut ctx, key, value, *if_revision)?),
        Mutation::Delete { key, if_revision } => {
            Outcome::Delete(delete(txn, &mut ctx, key, *if_revision)?)
        }
        Mutation::Txn { checks, ops } => {
            for (index, c) in checks.iter().enumerate() {
                check(txn, dbs, index, c)?;
            }
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                results.push(match op {
                    Op::Put {
                        key,
                        value,
                        if_revision,
                    } => OpResult::Put(put(txn, &mut ctx, key, value, *if_revision)?),
                    Op::Delete { key, if_revision } => {
                        OpResult::Delete(delete(txn, &mut ctx, key, *if_revision)?)
                    }
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
        let record = serde_json::to_vec(&events).map_err(|e| StoreError::Corrupt {
            what: format!("change record does not serialise: {e}"),
        })?;
        dbs.changes
            .put(txn, &(current + 1).to_be_bytes(), &record)
            .map_err(write_err)?;
    }
    Ok((outcome, changed))
}
