//! The store: the only module that opens LMDB.
//!
//! Layout of the environment (all named databases, raw bytes):
//! - `kv`: key path → `[create_revision u64 BE][mod_revision u64 BE][value as JSON]`
//! - `changes`: revision u64 BE → the events of that revision, a JSON array
//! - `meta`: `revision` and `compacted` → u64 BE; `usage/<role>` → that role's
//!   bytes and keys (u64 BE each, see `quota`)
//! - `audit`: seq u64 BE → a sealed record (canonical JSON)
//!
//! A `kv` record written with an owner carries `0x00 <role> 0x00` between the
//! revisions and the value (canonical JSON never starts with a NUL byte, so
//! records from before owners existed read as unowned).
//!
//! Reads open their own LMDB read transaction and never wait for a writer. Every
//! mutation goes through one writer thread that drains all queued mutations into a
//! single write transaction and one fsync (group commit); each mutation runs in a
//! nested transaction so one failure cannot spoil the others in its batch.

mod key;
mod quota;
mod writer;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use heed::types::Bytes;
use heed::{Database, Env, EnvOpenOptions, RoTxn, WithoutTls};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::audit::{self, journal, AuditError, Journal, Record};
pub use key::{Key, KeyError, Prefix, MAX_KEY_BYTES};
pub use quota::{Alarm, Owner, RoleBound, RoleLimits, RoleStatus, RoleUsage, Unit, Usage};

const META_REVISION: &[u8] = b"revision";
const META_COMPACTED: &[u8] = b"compacted";
/// The last audit journal generation whose records are sealed in LMDB.
const META_JOURNAL_SEALED: &[u8] = b"journal_sealed";
/// The journal position (generation, offset) up to which its records are
/// sealed: the current generation is sealed in parts, not rotated per seal.
const META_JOURNAL_SEALED_AT: &[u8] = b"journal_sealed_at";
const LOCK_FILE: &str = "cordon.lock";
/// Keys or revisions a listing or watch may skip as invisible to the caller
/// before it stops, so one call's cost stays bounded.
const MAX_HIDDEN: usize = 100_000;
/// Journal records waiting in memory that make the writer seal them early.
const JOURNAL_SEAL_EVERY: usize = 2048;
/// Journal bytes sealed per commit at most: a backlog (a full disk, a
/// restart) is sealed in commits that fit in a little free space, each one
/// giving its journal space back before the next.
const JOURNAL_SEAL_MAX_BYTES: usize = 1 << 20;
/// Default `[audit] journal_reserve`: about 9,000 records of a read
/// (~470 bytes each, measured) while the disk is full.
pub const DEFAULT_JOURNAL_RESERVE: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create store directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store directory {path} is owned by uid {owner}, not by this process (uid {me}); refusing to use it")]
    ForeignDir { path: PathBuf, owner: u32, me: u32 },
    #[error("cannot lock {path}: {source}")]
    LockFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {path} is in use by another cordon gateway (lock held on {path}/cordon.lock)")]
    Locked { path: PathBuf },
    #[error("cannot open LMDB environment {path}: {source}")]
    OpenStore { path: PathBuf, source: heed::Error },
    #[error("LMDB on this build accepts keys of at most {max} bytes; cordon needs {need}")]
    KeySizeUnsupported { max: usize, need: usize },
    #[error("cannot start the store writer thread: {source}")]
    SpawnWriter { source: std::io::Error },
    #[error("store read failed: {source}")]
    Read { source: heed::Error },
    #[error("store write failed: {source}")]
    Write { source: heed::Error },
    #[error("store data is corrupt: {what}")]
    Corrupt { what: String },
    #[error("{skipped} keys under {prefix} are not readable by this role; list a narrower prefix")]
    TooManyHidden { prefix: String, skipped: usize },
    #[error("the store is shutting down")]
    Closed,
    #[error("store commit failed: {message}")]
    BatchFailed { message: String },
    #[error("audit log unavailable, call refused: {message}")]
    Audit { message: String },

    // Outcomes a client caused and can act on: rendered as tool errors.
    #[error(transparent)]
    InvalidKey(#[from] KeyError),
    #[error("value is {size} bytes; the limit is {max}")]
    ValueTooLarge { size: usize, max: usize },
    #[error("transaction has {count} operations; the limit is {max}")]
    TooManyOps { count: usize, max: usize },
    #[error("key {key} not found")]
    NotFound { key: String },
    #[error("revision conflict on {key}: expected {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: u64,
        actual: u64,
    },
    #[error("check {index} failed on {key}: {reason}")]
    CheckFailed {
        index: usize,
        key: String,
        reason: String,
    },
    #[error("history before revision {compacted} has been compacted (asked for events after {since}); re-read the current state and watch from revision {current}")]
    Compacted {
        since: u64,
        compacted: u64,
        current: u64,
    },
    /// The disk is full (ENOSPC, EDQUOT, or LMDB's short write on a full
    /// disk): the write was not made, or the call's record could not be
    /// written and the call was refused.
    #[error("no space left on device {path}: {what}")]
    NoSpace { path: PathBuf, what: String },
    #[error("quota exceeded: {what} would be {after} {unit}, over {quota} = {limit} (now {before}); reads and deletes keep working: delete keys to free space")]
    QuotaExceeded {
        /// What is measured: "store data", "role coder's keys", …
        what: String,
        /// The setting, with the policy rule that set it for a role's.
        quota: String,
        before: u64,
        after: u64,
        limit: u64,
        unit: &'static str,
    },
}

impl StoreError {
    /// A stable machine-readable code, part of the tool-result contract.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::InvalidKey(_) => "invalid_key",
            StoreError::ValueTooLarge { .. }
            | StoreError::TooManyOps { .. }
            | StoreError::TooManyHidden { .. } => "too_large",
            StoreError::NotFound { .. } => "not_found",
            StoreError::Conflict { .. } => "conflict",
            StoreError::CheckFailed { .. } => "check_failed",
            StoreError::Compacted { .. } => "compacted",
            StoreError::Closed | StoreError::Audit { .. } => "unavailable",
            StoreError::NoSpace { .. } => "no_space",
            StoreError::QuotaExceeded { .. } => "quota_exceeded",
            _ => "store_error",
        }
    }
}

/// The audit log's settings (`[audit]` in the deployment config).
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Keep at most this many records; older ones are pruned behind a checkpoint.
    pub max_records: Option<u64>,
    /// Prune records older than this.
    pub max_age: Option<Duration>,
    /// Bytes the journal preallocates, twice (its segment and a spare), so
    /// that reads keep being audited on a full disk; 0: none.
    pub journal_reserve: u64,
    /// Keep the audit database under this many bytes of pages: past it, the
    /// oldest records are pruned (to 90% of it) behind a checkpoint.
    pub max_bytes: Option<u64>,
}

/// The store's space bounds (`[gateway] max_store_bytes`, `watch_history_bytes`).
#[derive(Debug, Clone, Default)]
pub struct QuotaOptions {
    /// Data (the pages of `kv`, `changes` and `meta`): a write that would
    /// take it past this fails with `quota_exceeded`; deletes never do.
    pub max_store_bytes: Option<u64>,
    /// The watch history's pages: past this, the oldest revisions are
    /// compacted (to 90% of it), so that the history can never hold the
    /// data quota hostage (deleting keys must free space).
    pub history_bytes: Option<u64>,
    /// Bytes of values one commit batch takes (0: no bound). What one commit
    /// writes is what LMDB cannot reuse for the next two, so this bounds the
    /// headroom that overwrites need.
    pub batch_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub path: PathBuf,
    pub map_size: usize,
    pub max_value_bytes: usize,
    pub max_txn_ops: usize,
    /// How many revisions of change history `kv_watch` can replay.
    pub history: u64,
    /// None: no audit log.
    pub audit: Option<AuditOptions>,
    pub quota: QuotaOptions,
}

/// How much one reply may carry: events (or items), and bytes of values.
#[derive(Debug, Clone, Copy)]
pub struct ReplyBounds {
    pub items: usize,
    pub bytes: usize,
}

/// One key's current state.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entry {
    pub key: String,
    pub value: Value,
    /// The revision of the last change to this key (its mod revision).
    pub revision: u64,
    pub create_revision: u64,
}

/// A key without its value, as `kv_list` returns it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyInfo {
    pub key: String,
    pub revision: u64,
    pub create_revision: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum EventKind {
    Put { value: Value, create_revision: u64 },
    Delete,
}

/// One change, as `kv_watch` returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    #[serde(default)]
    pub revision: u64,
    pub key: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass back as `cursor` to continue; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WatchResult {
    pub events: Vec<Event>,
    /// Every revision up to this one has been looked at: pass it as the next
    /// `since_revision`.
    pub revision: u64,
    /// True when the event cap cut the reply short and more events are waiting.
    pub more: bool,
    pub timed_out: bool,
}

/// A precondition of `kv_txn`.
#[derive(Debug, Clone)]
pub struct Check {
    pub key: Key,
    /// Expected mod revision; 0 means the key must not exist.
    pub revision: Option<u64>,
    /// Expected value (JSON equality).
    pub value: Option<Value>,
}

/// A value on its way into the store: the JSON the caller sent and its
/// canonical bytes (what is stored), computed once and used for its size
/// bound, the audit digest, the stored record and the change event.
#[derive(Debug, Clone)]
pub struct Written {
    value: Value,
    json: Box<[u8]>,
}

impl Written {
    pub fn new(value: Value) -> Written {
        let json = audit::canonical(&value).into_boxed_slice();
        Written { value, json }
    }

    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The canonical JSON, as stored.
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// Its size as stored, in bytes.
    pub fn len(&self) -> usize {
        self.json.len()
    }

    pub fn is_empty(&self) -> bool {
        self.json.is_empty()
    }
}

/// A put, alone (`kv_put`) or as one op of a transaction.
#[derive(Debug, Clone)]
pub struct Put {
    pub key: Key,
    pub value: Written,
    pub if_revision: Option<u64>,
}

/// A delete, alone (`kv_delete`) or as one op of a transaction.
#[derive(Debug, Clone)]
pub struct Delete {
    pub key: Key,
    pub if_revision: Option<u64>,
}

/// A transaction: every check holds, then every op runs, or nothing does.
#[derive(Debug, Clone)]
pub struct Txn {
    pub checks: Vec<Check>,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone)]
pub enum Op {
    Put(Put),
    Delete(Delete),
    Get { key: Key },
}

/// What the writer executes.
#[derive(Debug)]
pub enum Mutation {
    Put(Put),
    Delete(Delete),
    Txn(Txn),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PutOutcome {
    pub key: String,
    pub revision: u64,
    pub create_revision: u64,
    /// The key's mod revision before this put; absent when the key was new.
    pub previous_revision: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeleteOutcome {
    pub key: String,
    pub deleted: bool,
    /// The revision of the deletion, or the current revision when nothing was there.
    pub revision: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum OpResult {
    Put(PutOutcome),
    Delete(DeleteOutcome),
    Get {
        key: String,
        found: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        entry: Option<Entry>,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TxnOutcome {
    /// The revision the transaction committed at (unchanged when it only read).
    pub revision: u64,
    pub results: Vec<OpResult>,
}

#[derive(Debug)]
pub enum Outcome {
    Put(PutOutcome),
    Delete(DeleteOutcome),
    Txn(TxnOutcome),
    /// A `Flush` job: the journal was sealed.
    Flushed,
}

impl Mutation {
    /// Whether it puts anything: only those are refused by a quota.
    fn writes(&self) -> bool {
        match self {
            Mutation::Put(_) => true,
            Mutation::Delete(_) => false,
            Mutation::Txn(t) => t.ops.iter().any(|o| matches!(o, Op::Put(_))),
        }
    }

    /// Bytes of values it writes.
    fn value_bytes(&self) -> usize {
        match self {
            Mutation::Put(p) => p.value.len(),
            Mutation::Delete(_) => 0,
            Mutation::Txn(t) => t
                .ops
                .iter()
                .map(|o| match o {
                    Op::Put(p) => p.value.len(),
                    _ => 0,
                })
                .sum(),
        }
    }
}

#[derive(Clone, Copy)]
struct Dbs {
    kv: Database<Bytes, Bytes>,
    changes: Database<Bytes, Bytes>,
    meta: Database<Bytes, Bytes>,
    audit: Database<Bytes, Bytes>,
}

enum Work {
    Mutate(Mutation),
    /// Seal the audit journal into LMDB (and prune), with no mutation.
    Flush,
}

struct Job {
    work: Work,
    /// The drafted audit record of this mutation, sealed in its transaction.
    record: Option<Record>,
    /// The role it writes for (its quota, and the owner of what it puts).
    owner: Option<Owner>,
    /// Bytes of values it writes (the batch bound).
    bytes: usize,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// The store's space as of the last commit, shared by the writer (which
/// measures it), the admin status (which reads it) and policy reloads (which
/// change the role limits the alarm compares with).
struct Space {
    usage: Usage,
    alarms: quota::Alarms,
    counters: BTreeMap<String, RoleUsage>,
    limits: Arc<BTreeMap<String, Arc<RoleLimits>>>,
}

impl Space {
    fn refresh(&mut self, events: &quota::Events) {
        let rules = quota::role_status(&mut self.usage, &self.counters, &self.limits);
        self.alarms.evaluate(&mut self.usage, events, &rules);
    }
}

/// A handle on the store; cheap to clone, shared by every session.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    env: Env<WithoutTls>,
    dbs: Dbs,
    opts: StoreOptions,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    revision: watch::Receiver<u64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    journal: Option<Arc<Journal>>,
    /// `kv_watch` calls waiting in `watch` right now (admin `status`).
    watching: AtomicUsize,
    space: Arc<Mutex<Space>>,
    _lock: File,
}

/// Counts one waiting watch for as long as it lives.
struct Watching<'a>(&'a AtomicUsize);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Store {
    /// Opens (creating if needed) the environment at `opts.path`, takes the
    /// store's exclusive lock and starts the writer thread.
    pub fn open(opts: StoreOptions) -> Result<Store, StoreError> {
        let path = opts.path.clone();
        prepare_dir(&path)?;
        let lock = lock_store(&path)?;

        let mut env_opts = EnvOpenOptions::new().read_txn_without_tls();
        env_opts
            .map_size(opts.map_size)
            .max_dbs(8)
            .max_readers(1024);
        // SAFETY: the environment is opened once per process (the flock above keeps
        // other cordon processes out of it), never with NO_LOCK/NO_SYNC, and its
        // files live in a 0700 directory that no agent can reach, so nothing
        // modifies the map behind LMDB's back.
        let env = unsafe { env_opts.open(&path) }.map_err(|source| StoreError::OpenStore {
            path: path.clone(),
            source,
        })?;
        if env.max_key_size() < MAX_KEY_BYTES {
            return Err(StoreError::KeySizeUnsupported {
                max: env.max_key_size(),
                need: MAX_KEY_BYTES,
            });
        }
        let open_err = |source| StoreError::OpenStore {
            path: path.clone(),
            source,
        };
        let mut wtxn = env.write_txn().map_err(open_err)?;
        let dbs = Dbs {
            kv: env
                .create_database(&mut wtxn, Some("kv"))
                .map_err(open_err)?,
            changes: env
                .create_database(&mut wtxn, Some("changes"))
                .map_err(open_err)?,
            meta: env
                .create_database(&mut wtxn, Some("meta"))
                .map_err(open_err)?,
            audit: env
                .create_database(&mut wtxn, Some("audit"))
                .map_err(open_err)?,
        };
        wtxn.commit().map_err(open_err)?;

        let rtxn = env.read_txn().map_err(open_err)?;
        let revision = read_meta(&rtxn, dbs.meta, META_REVISION)?;
        let compacted = read_meta(&rtxn, dbs.meta, META_COMPACTED)?;
        let journal_sealed = journal::Sealed {
            through: read_meta(&rtxn, dbs.meta, META_JOURNAL_SEALED)?,
            at: match dbs
                .meta
                .get(&rtxn, META_JOURNAL_SEALED_AT)
                .map_err(|source| StoreError::Read { source })?
            {
                Some(raw) => {
                    Some(
                        journal::Pos::decode(raw).ok_or_else(|| StoreError::Corrupt {
                            what: format!("journal_sealed_at is {} bytes", raw.len()),
                        })?,
                    )
                }
                None => None,
            },
        };
        let chain = match dbs
            .audit
            .last(&rtxn)
            .map_err(|source| StoreError::Read { source })?
        {
            Some((k, raw)) => {
                let seq = decode_u64(k)?;
                let rec: Record = serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt {
                    what: format!("audit record {seq}: {e}"),
                })?;
                audit::Chain {
                    seq,
                    prev: rec.hash,
                }
            }
            None => audit::Chain::genesis(),
        };
        let counters = read_counters(&rtxn, dbs.meta)?;
        let page_size = u64::from(env.stat().page_size);
        let mut usage = Usage {
            max_store_bytes: opts.quota.max_store_bytes,
            watch_history_bytes: opts.quota.history_bytes,
            audit_max_bytes: opts.audit.as_ref().and_then(|a| a.max_bytes),
            map_size: opts.map_size as u64,
            ..Usage::default()
        };
        measure(&rtxn, dbs, &mut usage).map_err(|source| StoreError::Read { source })?;
        usage.map_used_bytes = (env.info().last_page_number as u64 + 1) * page_size;
        drop(rtxn);
        let mut space = Space {
            usage,
            alarms: quota::Alarms::default(),
            counters: counters.clone(),
            limits: Arc::new(BTreeMap::new()),
        };
        space.refresh(&quota::Events::default());
        let space = Arc::new(Mutex::new(space));
        let journal = match &opts.audit {
            Some(a) => Some(Arc::new(
                Journal::open(
                    &path.join("audit-journal"),
                    journal_sealed,
                    a.journal_reserve,
                )
                .map_err(audit_error)?,
            )),
            None => None,
        };

        let (rev_tx, rev_rx) = watch::channel(revision);
        let (job_tx, job_rx) = mpsc::channel(4096);
        let writer = writer::Writer {
            env: env.clone(),
            dbs,
            revision,
            compacted,
            history: opts.history.max(1),
            jobs: job_rx,
            published: rev_tx,
            chain,
            journal: journal.clone(),
            audit: opts.audit.clone(),
            path: path.clone(),
            no_space_logged: None,
            quota: opts.quota.clone(),
            page_size,
            counters,
            space: space.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run())
            .map_err(|source| StoreError::SpawnWriter { source })?;

        Ok(Store {
            inner: Arc::new(Inner {
                env,
                dbs,
                opts,
                jobs: Mutex::new(Some(job_tx)),
                revision: rev_rx,
                writer: Mutex::new(Some(handle)),
                journal,
                watching: AtomicUsize::new(0),
                space,
                _lock: lock,
            }),
        })
    }

    #[cfg(test)]
    pub fn options(&self) -> &StoreOptions {
        &self.inner.opts
    }

    /// The last committed revision.
    pub fn revision(&self) -> u64 {
        *self.inner.revision.borrow()
    }

    /// How many `kv_watch` calls are waiting for changes.
    pub fn watching(&self) -> usize {
        self.inner.watching.load(Ordering::Relaxed)
    }

    /// The store's space and its alarms, as of the last commit.
    pub fn usage(&self) -> Usage {
        match self.inner.space.lock() {
            Ok(s) => s.usage.clone(),
            Err(p) => p.into_inner().usage.clone(),
        }
    }

    /// The role limits of the policy in force, for the alarm (a mutation is
    /// checked against the limits of the policy its call was decided under,
    /// carried in its `Owner`). Re-evaluates the alarms at once.
    pub fn set_role_limits(&self, limits: BTreeMap<String, Arc<RoleLimits>>) {
        let mut space = match self.inner.space.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        space.limits = Arc::new(limits);
        space.refresh(&quota::Events::default());
    }

    fn read_txn(&self) -> Result<RoTxn<'_, WithoutTls>, StoreError> {
        self.inner
            .env
            .read_txn()
            .map_err(|source| StoreError::Read { source })
    }

    pub fn get(&self, key: &Key) -> Result<Option<Entry>, StoreError> {
        let rtxn = self.read_txn()?;
        get_entry(&rtxn, self.inner.dbs.kv, key.as_bytes())
    }

    /// Keys covered by `prefix` in byte order, starting after `cursor`.
    pub fn list(
        &self,
        prefix: &Prefix,
        cursor: Option<&Key>,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> Result<Page<KeyInfo>, StoreError> {
        self.walk(prefix, cursor, limit, visible, |key, raw| {
            let (create_revision, revision, _) = split_record(key, raw)?;
            Ok(Some(KeyInfo {
                key: key.to_string(),
                revision,
                create_revision,
            }))
        })
    }

    /// Like `list`, with values. Stops early (with a cursor) once the values
    /// read reach `max_bytes`, so one reply stays bounded; at least one entry is
    /// always returned.
    pub fn scan(
        &self,
        prefix: &Prefix,
        cursor: Option<&Key>,
        limit: usize,
        max_bytes: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> Result<Page<Entry>, StoreError> {
        let budget = std::cell::Cell::new(max_bytes);
        self.walk(prefix, cursor, limit, visible, |key, raw| {
            if raw.len() > budget.get() && budget.get() != max_bytes {
                return Ok(None);
            }
            budget.set(budget.get().saturating_sub(raw.len()));
            decode_entry(key, raw).map(Some)
        })
    }

    fn walk<T>(
        &self,
        prefix: &Prefix,
        cursor: Option<&Key>,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
        // Returns None to end the page before this item.
        decode: impl Fn(&str, &[u8]) -> Result<Option<T>, StoreError>,
    ) -> Result<Page<T>, StoreError> {
        use std::ops::Bound;
        let limit = limit.max(1);
        let rtxn = self.read_txn()?;
        let kv = self.inner.dbs.kv;
        let mut items = Vec::new();
        let mut last: Option<String> = None;
        let read_err = |source| StoreError::Read { source };

        // The prefix itself sorts before its children ("/a" < "/a/…"), so the
        // walk is: the exact key, then the contiguous children range.
        if let Some(exact) = prefix.as_key() {
            if cursor.is_none_or(|c| c.as_bytes() < exact) && visible(prefix.as_str()) {
                if let Some(raw) = kv.get(&rtxn, exact).map_err(read_err)? {
                    if let Some(item) = decode(prefix.as_str(), raw)? {
                        items.push(item);
                        last = Some(prefix.as_str().to_string());
                    }
                }
            }
        }
        let (lo, hi) = prefix.children_range();
        let lower = match cursor {
            Some(c) if c.as_bytes() >= lo.as_slice() => Bound::Excluded(c.as_bytes()),
            _ => Bound::Included(lo.as_slice()),
        };
        let range = (lower, Bound::Excluded(hi.as_slice()));
        let mut more = false;
        let mut hidden = 0usize;
        for item in kv.range(&rtxn, &range).map_err(read_err)? {
            let (k, raw) = item.map_err(read_err)?;
            if items.len() >= limit {
                more = true;
                break;
            }
            let key = std::str::from_utf8(k).map_err(|_| StoreError::Corrupt {
                what: format!("key is not UTF-8: {k:?}"),
            })?;
            if !visible(key) {
                // Skipped keys must never surface, not even as a cursor: past
                // the budget, return what was found (its cursor is a visible
                // key) or refuse.
                hidden += 1;
                if hidden >= MAX_HIDDEN {
                    if items.is_empty() {
                        return Err(StoreError::TooManyHidden {
                            prefix: prefix.as_str().to_string(),
                            skipped: hidden,
                        });
                    }
                    more = true;
                    break;
                }
                continue;
            }
            match decode(key, raw)? {
                Some(item) => items.push(item),
                None => {
                    more = true;
                    break;
                }
            }
            last = Some(key.to_string());
        }
        Ok(Page {
            items,
            next_cursor: if more { last } else { None },
        })
    }

    /// Queues a mutation for the next group commit and waits until it is
    /// durable. Its audit record, if any, is sealed in the same transaction.
    pub async fn mutate(
        &self,
        mutation: Mutation,
        record: Option<Record>,
    ) -> Result<Outcome, StoreError> {
        self.mutate_as(mutation, None, record).await
    }

    /// `mutate` for a role: what it puts becomes the role's, within the
    /// role's limits (`quota_exceeded` past them).
    pub async fn mutate_as(
        &self,
        mutation: Mutation,
        owner: Option<Owner>,
        record: Option<Record>,
    ) -> Result<Outcome, StoreError> {
        if let Err(e) = self.check_mutation(&mutation) {
            // Refused before the writer: the record says so, through the journal.
            if let Some(mut r) = record {
                r.error(e.code(), &e.to_string());
                self.audit(r)?;
            }
            return Err(e);
        }
        self.submit(Work::Mutate(mutation), record, owner).await
    }

    /// Seals the audit journal into LMDB now (and prunes by the retention).
    pub async fn flush_audit(&self) -> Result<(), StoreError> {
        self.submit(Work::Flush, None, None).await.map(|_| ())
    }

    async fn submit(
        &self,
        work: Work,
        record: Option<Record>,
        owner: Option<Owner>,
    ) -> Result<Outcome, StoreError> {
        let bytes = match &work {
            Work::Mutate(m) => m.value_bytes(),
            Work::Flush => 0,
        };
        let sender = self
            .inner
            .jobs
            .lock()
            .map_err(|_| StoreError::Closed)?
            .clone()
            .ok_or(StoreError::Closed)?;
        let (reply, rx) = oneshot::channel();
        if let Err(tokio::sync::mpsc::error::SendError(job)) = sender
            .send(Job {
                work,
                record,
                owner,
                bytes,
                reply,
            })
            .await
        {
            if let Some(mut r) = job.record {
                r.error("unavailable", "the store is shutting down");
                let _ = self.audit(r);
            }
            return Err(StoreError::Closed);
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub fn audit_enabled(&self) -> bool {
        self.inner.journal.is_some()
    }

    /// Records a non-mutation event (a read, a denial, a refused connection…).
    /// When this returns Ok the record survives the gateway's death; an error
    /// means the event must not be served.
    pub fn audit(&self, record: Record) -> Result<(), StoreError> {
        let Some(j) = &self.inner.journal else {
            return Ok(());
        };
        let pending = j.append(&record).map_err(audit_error)?;
        // The journal's records also wait in memory until sealed: under a
        // burst of reads, seal early rather than only every sync_interval, so
        // that memory stays bounded by the rate the writer can seal at.
        if pending % JOURNAL_SEAL_EVERY == 0 {
            self.request_flush();
        }
        Ok(())
    }

    /// Asks the writer to seal the journal soon, without waiting for it.
    fn request_flush(&self) {
        let Ok(jobs) = self.inner.jobs.lock() else {
            return;
        };
        if let Some(sender) = jobs.as_ref() {
            let (reply, _) = oneshot::channel();
            // A full queue means the writer is busy and will seal with its
            // next batch anyway.
            let _ = sender.try_send(Job {
                work: Work::Flush,
                record: None,
                owner: None,
                bytes: 0,
                reply,
            });
        }
    }

    pub fn audit_pending(&self) -> bool {
        self.inner.journal.as_ref().is_some_and(|j| j.has_pending())
    }

    fn check_mutation(&self, mutation: &Mutation) -> Result<(), StoreError> {
        let max = self.inner.opts.max_value_bytes;
        let check_value = |v: &Written| {
            let size = v.len();
            if size > max {
                Err(StoreError::ValueTooLarge { size, max })
            } else {
                Ok(())
            }
        };
        match mutation {
            Mutation::Put(p) => check_value(&p.value),
            Mutation::Delete(_) => Ok(()),
            Mutation::Txn(Txn { checks, ops }) => {
                let count = checks.len() + ops.len();
                if count > self.inner.opts.max_txn_ops {
                    return Err(StoreError::TooManyOps {
                        count,
                        max: self.inner.opts.max_txn_ops,
                    });
                }
                for op in ops {
                    if let Op::Put(p) = op {
                        check_value(&p.value)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Events under `prefix` after `since`, waiting up to `timeout` for the first
    /// one. Woken by the writer's commits (never polls); returns early, empty,
    /// when `stop` resolves.
    pub async fn watch(
        &self,
        prefix: &Prefix,
        since: u64,
        timeout: Duration,
        reply: ReplyBounds,
        visible: &(dyn Fn(&str) -> bool + Sync),
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<WatchResult, StoreError> {
        self.inner.watching.fetch_add(1, Ordering::Relaxed);
        let _watching = Watching(&self.inner.watching);
        let mut rev = self.inner.revision.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        tokio::pin!(stop);
        let mut scanned = since;
        loop {
            rev.borrow_and_update();
            let (events, upto, more) =
                self.changes_since(prefix, scanned, reply.items.max(1), reply.bytes, visible)?;
            if !events.is_empty() || more {
                return Ok(WatchResult {
                    events,
                    revision: upto,
                    more,
                    timed_out: false,
                });
            }
            scanned = upto.max(scanned);
            let idle = |timed_out| WatchResult {
                events: Vec::new(),
                revision: scanned,
                more: false,
                timed_out,
            };
            // A deadline already reached (timeout_ms 0, a poll) returns now:
            // tokio's timer would round it up to its next 1 ms tick.
            if tokio::time::Instant::now() >= deadline {
                return Ok(idle(true));
            }
            tokio::select! {
                changed = rev.changed() => {
                    if changed.is_err() {
                        return Ok(idle(false));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(idle(true)),
                _ = &mut stop => return Ok(idle(false)),
            }
        }
    }

    /// Returns (events, last revision looked at, whether the cap cut it short).
    /// Events of one revision are never split across replies.
    fn changes_since(
        &self,
        prefix: &Prefix,
        since: u64,
        max_events: usize,
        max_bytes: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<Event>, u64, bool), StoreError> {
        let rtxn = self.read_txn()?;
        let dbs = self.inner.dbs;
        let current = read_meta(&rtxn, dbs.meta, META_REVISION)?;
        let compacted = read_meta(&rtxn, dbs.meta, META_COMPACTED)?;
        if since < compacted {
            return Err(StoreError::Compacted {
                since,
                compacted,
                current,
            });
        }
        let mut events = Vec::new();
        let mut bytes = 0usize;
        let mut examined = 0usize;
        let mut upto = since.min(current);
        if since >= current {
            return Ok((events, current.max(since), false));
        }
        let lo = (since + 1).to_be_bytes();
        let range = (
            std::ops::Bound::Included(&lo[..]),
            std::ops::Bound::Unbounded,
        );
        let read_err = |source| StoreError::Read { source };
        for item in dbs.changes.range(&rtxn, &range).map_err(read_err)? {
            let (k, raw) = item.map_err(read_err)?;
            let revision = decode_u64(k)?;
            if revision > current {
                break;
            }
            examined += 1;
            if examined > MAX_HIDDEN {
                return Ok((events, upto, true));
            }
            if events.len() >= max_events || (bytes + raw.len() > max_bytes && !events.is_empty()) {
                return Ok((events, upto, true));
            }
            let batch: Vec<Event> =
                serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt {
                    what: format!("change record {revision}: {e}"),
                })?;
            let before = events.len();
            events.extend(
                batch
                    .into_iter()
                    .filter(|e| prefix.covers(&e.key) && visible(&e.key)),
            );
            if events.len() > before {
                bytes += raw.len();
            }
            upto = revision;
        }
        Ok((events, current, false))
    }

    /// Stops taking mutations, lets the writer commit what it has queued, and
    /// waits for it. Reads keep working on the still-open environment.
    pub fn close(&self) {
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            jobs.take();
        }
        let handle = self.inner.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
        if let Err(e) = self.inner.env.force_sync() {
            tracing::error!(error = %e, "final store sync failed");
        }
    }
}

/// A journal that cannot take a record: `no_space` when the disk is full,
/// with the reserve named, else `unavailable`.
fn audit_error(e: AuditError) -> StoreError {
    match &e {
        AuditError::Journal { path, source } if journal::is_no_space(source) => {
            StoreError::NoSpace {
                path: path.clone(),
                what: "audit log unavailable, call refused: the audit journal's reserve ([audit] journal_reserve) is used up; calls are served again once space is freed".into(),
            }
        }
        _ => StoreError::Audit {
            message: e.to_string(),
        },
    }
}

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Whether a failed LMDB write means the disk is full: ENOSPC or EDQUOT, or
/// EIO, which LMDB returns for a short write ("filesystem full?") when the
/// disk filled part-way through a commit, while little space is left.
fn disk_full(e: &heed::Error, path: &Path) -> bool {
    /// Below this much free space, LMDB's EIO is taken for a full disk.
    const SHORT_WRITE_FREE: u64 = 1 << 20;
    match e {
        heed::Error::Io(io) if journal::is_no_space(io) => true,
        heed::Error::Io(io) if io.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
            free_bytes(path).is_some_and(|free| free < SHORT_WRITE_FREE)
        }
        _ => false,
    }
}

fn prepare_dir(path: &Path) -> Result<(), StoreError> {
    let create_err = |source| StoreError::CreateDir {
        path: path.to_path_buf(),
        source,
    };
    if !path.exists() {
        // Parents get the usual mode: they may also hold the runtime directory
        // that agents must traverse. Only the store itself is private.
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(create_err)?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(create_err)?;
    }
    let meta = fs::metadata(path).map_err(create_err)?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(StoreError::ForeignDir {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    // The store must never be readable by agents, whatever umask created it.
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(create_err)?;
    }
    Ok(())
}

fn lock_store(path: &Path) -> Result<File, StoreError> {
    let lock_path = path.join(LOCK_FILE);
    let lock_err = |source| StoreError::LockFile {
        path: lock_path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(lock_err)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(StoreError::Locked {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(lock_err(e.into())),
    }
}

fn decode_u64(raw: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = raw.try_into().map_err(|_| StoreError::Corrupt {
        what: format!("expected 8 bytes, found {}", raw.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

fn read_meta(
    txn: &RoTxn<'_>,
    meta: Database<Bytes, Bytes>,
    name: &[u8],
) -> Result<u64, StoreError> {
    match meta
        .get(txn, name)
        .map_err(|source| StoreError::Read { source })?
    {
        Some(raw) => decode_u64(raw),
        None => Ok(0),
    }
}

/// Reads the per-role usage counters (`usage/<role>` in `meta`).
fn read_counters(
    txn: &RoTxn<'_>,
    meta: Database<Bytes, Bytes>,
) -> Result<BTreeMap<String, RoleUsage>, StoreError> {
    let read_err = |source| StoreError::Read { source };
    let mut out = BTreeMap::new();
    for item in meta.prefix_iter(txn, quota::META_USAGE).map_err(read_err)? {
        let (k, v) = item.map_err(read_err)?;
        let role = std::str::from_utf8(&k[quota::META_USAGE.len()..]).map_err(|_| {
            StoreError::Corrupt {
                what: "a usage counter's role is not UTF-8".into(),
            }
        })?;
        let u = RoleUsage::decode(v).ok_or_else(|| StoreError::Corrupt {
            what: format!("usage counter of role {role}"),
        })?;
        out.insert(role.to_string(), u);
    }
    Ok(out)
}

/// Data, history and audit pages, into `usage`.
fn measure(txn: &RoTxn, dbs: Dbs, usage: &mut Usage) -> Result<(), heed::Error> {
    usage.history_bytes = quota::db_bytes(dbs.changes, txn)?;
    usage.data_bytes =
        usage.history_bytes + quota::db_bytes(dbs.kv, txn)? + quota::db_bytes(dbs.meta, txn)?;
    usage.audit_bytes = quota::db_bytes(dbs.audit, txn)?;
    Ok(())
}

/// Between the revisions and the value of a record, this byte opens (and
/// closes) the owner's role name; role names are letters, digits, `-`, `_`.
const OWNER_TAG: u8 = 0;

/// A `kv` record, split.
struct Stored<'a> {
    create_revision: u64,
    revision: u64,
    owner: Option<&'a str>,
    json: &'a [u8],
}

fn parse_record<'a>(key: &str, raw: &'a [u8]) -> Result<Stored<'a>, StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: format!("record of {key} ({} bytes)", raw.len()),
    };
    if raw.len() < 16 {
        return Err(corrupt());
    }
    let rest = &raw[16..];
    let (owner, json) = match rest.first() {
        Some(&OWNER_TAG) => {
            let end = rest[1..]
                .iter()
                .position(|b| *b == OWNER_TAG)
                .ok_or_else(corrupt)?;
            let owner = std::str::from_utf8(&rest[1..1 + end]).map_err(|_| corrupt())?;
            (Some(owner), &rest[2 + end..])
        }
        _ => (None, rest),
    };
    Ok(Stored {
        create_revision: decode_u64(&raw[..8])?,
        revision: decode_u64(&raw[8..16])?,
        owner,
        json,
    })
}

fn split_record<'a>(key: &str, raw: &'a [u8]) -> Result<(u64, u64, &'a [u8]), StoreError> {
    let s = parse_record(key, raw)?;
    Ok((s.create_revision, s.revision, s.json))
}

fn decode_entry(key: &str, raw: &[u8]) -> Result<Entry, StoreError> {
    let (create_revision, revision, json) = split_record(key, raw)?;
    let value = serde_json::from_slice(json).map_err(|e| StoreError::Corrupt {
        what: format!("value of {key}: {e}"),
    })?;
    Ok(Entry {
        key: key.to_string(),
        value,
        revision,
        create_revision,
    })
}

fn get_entry(
    txn: &RoTxn<'_>,
    kv: Database<Bytes, Bytes>,
    key: &[u8],
) -> Result<Option<Entry>, StoreError> {
    let key_str = std::str::from_utf8(key).map_err(|_| StoreError::Corrupt {
        what: "key is not UTF-8".into(),
    })?;
    match kv
        .get(txn, key)
        .map_err(|source| StoreError::Read { source })?
    {
        Some(raw) => decode_entry(key_str, raw).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests;

/// Read-only access to the audit records of a store, from another process
/// (the `cordon audit` CLI) while the gateway runs: LMDB allows many readers,
/// and this takes no lock the gateway needs.
pub struct AuditReader {
    env: Env<WithoutTls>,
    db: Option<Database<Bytes, Bytes>>,
}

impl AuditReader {
    /// `map_size` must be the gateway's (the deployment config's map_size).
    pub fn open(path: &Path, map_size: usize) -> Result<AuditReader, StoreError> {
        let open_err = |source| StoreError::OpenStore {
            path: path.to_path_buf(),
            source,
        };
        if !path.join("data.mdb").exists() {
            return Err(StoreError::OpenStore {
                path: path.to_path_buf(),
                source: heed::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no store here (has the gateway ever run with this config?)",
                )),
            });
        }
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.map_size(map_size).max_dbs(8).max_readers(1024);
        // SAFETY: read-only: this process never writes the map, and the
        // gateway, the only writer, writes it through LMDB's own locking.
        let env = unsafe { opts.flags(heed::EnvFlags::READ_ONLY).open(path) }.map_err(open_err)?;
        let rtxn = env.read_txn().map_err(open_err)?;
        let db = env
            .open_database::<Bytes, Bytes>(&rtxn, Some("audit"))
            .map_err(open_err)?;
        // A handle opened in a read transaction lives only if it commits.
        rtxn.commit().map_err(open_err)?;
        Ok(AuditReader { env, db })
    }

    /// Calls `f` with each record from `from` on, in seq order, in one
    /// consistent snapshot, until it returns false. Returns the last seq seen.
    pub fn scan(
        &self,
        from: u64,
        mut f: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<u64, StoreError> {
        let Some(db) = self.db else {
            return Ok(from.saturating_sub(1));
        };
        let read_err = |source| StoreError::Read { source };
        let rtxn = self.env.read_txn().map_err(read_err)?;
        let lo = from.to_be_bytes();
        let range = (
            std::ops::Bound::Included(&lo[..]),
            std::ops::Bound::Unbounded,
        );
        let mut last = from.saturating_sub(1);
        for item in db.range(&rtxn, &range).map_err(read_err)? {
            let (k, raw) = item.map_err(read_err)?;
            last = decode_u64(k)?;
            if !f(last, raw) {
                break;
            }
        }
        Ok(last)
    }
}
