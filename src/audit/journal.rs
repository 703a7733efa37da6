//! The journal: records not yet sealed into LMDB, one JSON line each, in
//! generation files `<store>/audit-journal/<gen>.jsonl`. A `write()` that
//! returned is in the kernel's hands and survives the gateway's death; the
//! writer seals the journal into LMDB with each commit, then deletes the
//! generations it sealed (and punches out the sealed start of the current
//! one). A power loss can lose the lines written since the last sealing
//! commit (at most `[audit] sync_interval`), never a mutation's record, which
//! is sealed with its mutation.
//!
//! Each record is serialised once, on the caller's thread: the same bytes are
//! the journal line and, kept in memory, the draft the writer seals (see
//! `Draft`), so the writer neither serialises records nor frees them.
//!
//! A full disk: a generation is a segment of `[audit] journal_reserve` bytes,
//! preallocated (`fallocate` with `KEEP_SIZE`: the blocks are the file's, its
//! length stays what was written), and one more segment waits preallocated as
//! the spare (`spare.prealloc`). Appends write into blocks the file already
//! owns, so when the disk fills, whoever filled it, the journal still has the
//! rest of its current segment and the whole spare: at least `journal_reserve`
//! bytes of records. The spare is made again as soon as the space is back;
//! until it is, the store refuses writes (see `reserve_whole`), so that the
//! data never takes the audit's last space.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{fallocate, FallocateFlags};

use super::{AuditError, Draft, Drafts, Record};

/// The preallocated segment that the next generation is made from.
const SPARE: &str = "spare.prealloc";
/// A segment's length when nothing is preallocated (`journal_reserve = 0`).
const UNRESERVED_SEGMENT: u64 = 4 << 20;
/// Punching is done in whole pages: a partial page would only be zeroed.
const PAGE: u64 = 4096;

/// A place in the journal: the end of a record's line in its generation.
/// Everything up to it is sealed once the writer has committed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub generation: u64,
    pub offset: u64,
}

impl Pos {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.generation.to_be_bytes());
        out[8..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    pub fn decode(raw: &[u8]) -> Option<Pos> {
        let generation = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
        let offset = u64::from_be_bytes(raw.get(8..16)?.try_into().ok()?);
        Some(Pos { generation, offset })
    }
}

/// What a previous run sealed: every generation up to `through`, and, when
/// `at` is set, every line of `at.generation` up to `at.offset`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sealed {
    pub through: u64,
    pub at: Option<Pos>,
}

/// Records taken for sealing, with where each ends in the journal.
#[derive(Debug, Default)]
pub struct Taken {
    pub drafts: Drafts,
    positions: Vec<Pos>,
    /// Records still wait after these (the take was bounded).
    pub more: bool,
}

impl Taken {
    /// Where the last taken record ends: sealed through here once committed.
    pub fn through(&self) -> Option<Pos> {
        self.positions.last().copied()
    }
}

pub struct Journal {
    dir: PathBuf,
    /// Bytes preallocated per segment and for the spare; 0: none.
    reserve: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    generation: u64,
    /// The current generation's file, named in errors.
    path: PathBuf,
    file: File,
    /// Bytes in the current generation's file.
    written: u64,
    pending: Drafts,
    /// Where each pending draft ends, in order.
    positions: Vec<Pos>,
    /// A write failed part-way: the file may end in a torn line, and nothing
    /// may follow it there (recovery stops at a bad line), so the next append
    /// goes to a new generation.
    torn: bool,
    /// Generations up to this one are sealed and their files deleted; the
    /// files after it run contiguously to `generation`.
    retired: u64,
    /// The start of this generation is punched out up to here.
    punched: Pos,
    /// The spare segment exists, wholly preallocated (always true without a
    /// reserve, or on a filesystem that cannot preallocate).
    spare: bool,
    /// Making the spare failed (logged once until it is made).
    spare_failed: bool,
    /// The filesystem does not support fallocate: no reserve (logged once).
    unsupported: bool,
}

fn gen_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:020}.jsonl"))
}

fn generations(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut gens: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    gens.sort_unstable();
    Ok(gens)
}

/// ENOSPC or EDQUOT: the disk (or the quota of its owner) is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
            || code == rustix::io::Errno::DQUOT.raw_os_error()
    )
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::OPNOTSUPP.raw_os_error()
            || code == rustix::io::Errno::NOSYS.raw_os_error()
    )
}

/// Reads one generation from `start`: its records (into `pending`, with
/// their positions), and whether it ends in a whole line (appends may
/// continue it) and its length.
fn replay(
    path: &Path,
    generation: u64,
    start: u64,
    pending: &mut Drafts,
    positions: &mut Vec<Pos>,
) -> Result<(bool, u64), AuditError> {
    let err = |source| AuditError::Journal {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let len = file.metadata().map_err(err)?.len();
    if start >= len {
        return Ok((true, len));
    }
    file.seek(SeekFrom::Start(start)).map_err(err)?;
    let mut reader = BufReader::new(file);
    let mut offset = start;
    let mut line = Vec::new();
    let mut n = 0usize;
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(err)?;
        if read == 0 {
            return Ok((true, len));
        }
        n += 1;
        // Parsed and drafted again rather than trusted as bytes: the line
        // may be torn, or written by another version.
        let parsed = if line.last() != Some(&b'\n') {
            Err("no newline: torn by a crash or a full disk".to_string())
        } else {
            serde_json::from_slice::<Record>(&line[..line.len() - 1])
                .map_err(|e| e.to_string())
                .and_then(|r| pending.push_record(&r).map_err(|e| e.to_string()))
        };
        match parsed {
            Ok(()) => {
                offset += read as u64;
                positions.push(Pos { generation, offset });
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), line = n, error = %e, "dropping a torn audit journal line");
                return Ok((false, len));
            }
        }
    }
}

impl Journal {
    /// Opens the journal; the records a previous run left unsealed (in order)
    /// are pending. What `sealed` covers is already in LMDB (the gateway died
    /// before deleting it): deleted or skipped, not replayed. A torn last
    /// line (a power loss mid-write) is dropped. Appends continue the last
    /// generation when it ends in a whole line, so that a restart on a full
    /// disk keeps the reserve left in it.
    pub fn open(dir: &Path, sealed: Sealed, reserve: u64) -> Result<Journal, AuditError> {
        let err = |source| AuditError::Journal {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.exists() {
            fs::DirBuilder::new().mode(0o700).create(dir).map_err(err)?;
        }
        let through = match sealed.at {
            Some(at) => sealed.through.max(at.generation.saturating_sub(1)),
            None => sealed.through,
        };
        let gens = generations(dir).map_err(err)?;
        let mut pending = Drafts::default();
        let mut positions = Vec::new();
        for g in gens.iter().filter(|g| **g <= through) {
            let path = gen_path(dir, *g);
            fs::remove_file(&path).map_err(|source| AuditError::Journal { path, source })?;
        }
        let mut last = None;
        for g in gens.iter().filter(|g| **g > through) {
            let start = match sealed.at {
                Some(at) if at.generation == *g => at.offset,
                _ => 0,
            };
            let (whole, len) = replay(&gen_path(dir, *g), *g, start, &mut pending, &mut positions)?;
            last = Some((*g, whole, len));
        }
        let journal = Journal {
            dir: dir.to_path_buf(),
            reserve,
            // Replaced below: a journal needs a current file to exist.
            inner: Mutex::new(Inner {
                generation: 0,
                path: PathBuf::new(),
                file: File::open(dir).map_err(err)?,
                written: 0,
                pending,
                positions,
                torn: false,
                retired: through,
                // Punched again from the start: the previous run may have
                // died between its commit and its punch (a hole punched
                // twice costs nothing).
                punched: Pos {
                    generation: sealed.at.map_or(0, |a| a.generation),
                    offset: 0,
                },
                spare: reserve == 0,
                spare_failed: false,
                unsupported: false,
            }),
        };
        {
            let mut inner = journal.lock()?;
            let inner = &mut *inner;
            match last {
                Some((g, true, len)) => {
                    let (path, file) = open_gen(dir, g)?;
                    inner.generation = g;
                    inner.path = path;
                    inner.file = file;
                    inner.written = len;
                    journal.make_spare(inner);
                }
                _ => {
                    inner.generation = gens.last().copied().unwrap_or(0).max(through);
                    journal.make_spare(inner);
                    journal.rotate(inner)?;
                }
            }
        }
        Ok(journal)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, AuditError> {
        self.inner.lock().map_err(|_| AuditError::Journal {
            path: self.dir.clone(),
            source: std::io::Error::other("journal lock poisoned"),
        })
    }

    fn segment(&self) -> u64 {
        if self.reserve > 0 {
            self.reserve
        } else {
            UNRESERVED_SEGMENT
        }
    }

    /// Appends a drafted record. When this returns Ok the record survives the
    /// gateway's death; when it fails the caller must not serve the call.
    /// Returns how many records now wait to be sealed.
    pub fn append(&self, record: &Record) -> Result<usize, AuditError> {
        // Serialised before taking the lock, which only covers the write()
        // and the copy into the pending drafts.
        let draft = Draft::new(record)?;
        let line = draft.line();
        let mut inner = self.lock()?;
        let inner = &mut *inner;
        if inner.torn {
            self.rotate(inner)?;
            inner.torn = false;
        }
        // A segment is full: the next one comes preallocated (the spare).
        if inner.written > 0 && inner.written + line.len() as u64 > self.segment() {
            self.rotate(inner)?;
        }
        let mut result = inner.file.write_all(line);
        if result.is_err() {
            // A full disk can take part of the line: leave it as the last
            // line of its generation (recovery drops a torn last line). Try
            // once more in a new generation when the spare is there to make
            // it (this one was made while the disk was full, without its
            // preallocation). A write that left nothing behind needs no new
            // file: on a full disk, refused calls do not pile up empty ones.
            inner.torn = self.left_torn(inner);
            let retry = inner.torn || (inner.spare && self.reserve > 0 && !inner.unsupported);
            if retry && self.rotate(inner).is_ok() {
                inner.torn = false;
                result = inner.file.write_all(line);
                if result.is_err() {
                    inner.torn = self.left_torn(inner);
                }
            }
        }
        if let Err(source) = result {
            return Err(AuditError::Journal {
                path: inner.path.clone(),
                source,
            });
        }
        inner.written += line.len() as u64;
        inner.pending.push(&draft);
        inner.positions.push(Pos {
            generation: inner.generation,
            offset: inner.written,
        });
        Ok(inner.pending.len())
    }

    /// Whether a failed write left part of its line in the current file.
    fn left_torn(&self, inner: &Inner) -> bool {
        inner
            .file
            .metadata()
            .map_or(true, |m| m.len() != inner.written)
    }

    /// Appends go to a new generation from now on, made from the spare
    /// when there is one. The records of the old one stay pending.
    fn rotate(&self, inner: &mut Inner) -> Result<(), AuditError> {
        let generation = inner.generation + 1;
        let path = gen_path(&self.dir, generation);
        let from_spare = self.reserve > 0
            && inner.spare
            && !inner.unsupported
            && fs::rename(self.dir.join(SPARE), &path).is_ok();
        let (path, file) = open_gen(&self.dir, generation)?;
        if from_spare {
            inner.spare = false;
        } else if self.reserve > 0 && !inner.unsupported {
            // Best effort: on a full disk this segment has no reserve, and
            // its appends fail once the disk has no block left.
            if let Err(e) = fallocate(&file, FallocateFlags::KEEP_SIZE, 0, self.reserve) {
                tracing::debug!(file = %path.display(), error = %e, "cannot preallocate an audit journal segment");
            }
        }
        inner.file = file;
        inner.path = path;
        inner.generation = generation;
        inner.written = 0;
        self.make_spare(inner);
        Ok(())
    }

    /// Makes the spare segment if it is missing; says whether it exists.
    fn make_spare(&self, inner: &mut Inner) -> bool {
        if inner.spare || inner.unsupported || self.reserve == 0 {
            return true;
        }
        let path = self.dir.join(SPARE);
        // A spare left part-made keeps its blocks: the next attempt only
        // needs the rest. It is not tried without the free space for it:
        // this runs before every batch of writes while the disk is full, and
        // a failing fallocate allocates, then frees, all it could get.
        let made = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .and_then(|f| {
                let held = f.metadata()?.blocks().saturating_mul(512);
                let need = self.reserve.saturating_sub(held);
                let st = rustix::fs::fstatvfs(&f)?;
                if st.f_bavail.saturating_mul(st.f_frsize) < need {
                    return Err(std::io::Error::from_raw_os_error(
                        rustix::io::Errno::NOSPC.raw_os_error(),
                    ));
                }
                fallocate(&f, FallocateFlags::KEEP_SIZE, 0, self.reserve).map_err(Into::into)
            });
        match made {
            Ok(()) => {
                if std::mem::take(&mut inner.spare_failed) {
                    tracing::info!(dir = %self.dir.display(), bytes = self.reserve, "audit journal reserve restored");
                }
                inner.spare = true;
            }
            Err(e) if is_unsupported(&e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "the filesystem cannot preallocate: the audit journal has no reserve for a full disk");
                inner.unsupported = true;
                inner.spare = true;
            }
            Err(e) => {
                if !inner.spare_failed {
                    tracing::error!(dir = %self.dir.display(), bytes = self.reserve, error = %e, "the audit journal cannot make its reserve: writes are refused until the space is free, reads are audited from what is left");
                }
                inner.spare_failed = true;
            }
        }
        inner.spare
    }

    /// Whether the journal holds its whole reserve (its spare segment),
    /// making the spare again if space came back. The store refuses writes
    /// while it does not.
    pub fn reserve_whole(&self) -> bool {
        let Ok(mut inner) = self.lock() else {
            return false;
        };
        self.make_spare(&mut inner)
    }

    /// The reserve, in bytes (0: none).
    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the oldest pending records for sealing, at most `max_bytes` of
    /// them (at least one), so that a backlog is sealed in commits that fit
    /// in a little free space. Appends made meanwhile come after the
    /// position it returns and are not deleted with the sealed ones.
    pub fn take(&self, max_bytes: usize) -> Result<Taken, AuditError> {
        let mut inner = self.lock()?;
        if inner.pending.is_empty() {
            return Ok(Taken::default());
        }
        let n = inner.pending.count_within(max_bytes);
        let drafts = inner.pending.split_front(n);
        let rest = inner.positions.split_off(n);
        let positions = std::mem::replace(&mut inner.positions, rest);
        Ok(Taken {
            drafts,
            positions,
            more: !inner.pending.is_empty(),
        })
    }

    /// Puts records back after a commit that failed (their lines are still
    /// in the files), ahead of any appended since.
    pub fn restore(&self, mut taken: Taken) {
        if let Ok(mut inner) = self.lock() {
            let inner = &mut *inner;
            taken.drafts.extend(&inner.pending);
            inner.pending = taken.drafts;
            taken.positions.append(&mut inner.positions);
            inner.positions = taken.positions;
        }
    }

    /// Everything up to `through` is sealed: deletes the generations before
    /// it, and frees the sealed start of its own (a hole punched in whole
    /// pages), so that sealing a backlog gives its space back as it goes.
    /// Only the files not deleted yet, without listing the directory: this
    /// runs after every commit that sealed journal records.
    pub fn retire(&self, through: Pos) {
        let Ok(mut inner) = self.lock() else {
            return;
        };
        let inner = &mut *inner;
        for g in inner.retired + 1..through.generation {
            match fs::remove_file(gen_path(&self.dir, g)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(generation = g, error = %e, "cannot remove a sealed audit journal file")
                }
            }
        }
        inner.retired = inner.retired.max(through.generation.saturating_sub(1));
        let from = if inner.punched.generation == through.generation {
            inner.punched.offset
        } else {
            0
        };
        let to = through.offset / PAGE * PAGE;
        if to > from {
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            // A backlog spans older generations too: each one gives its
            // space back as it is sealed, not only once it is deleted.
            let punched = if through.generation == inner.generation {
                fallocate(&inner.file, flags, from, to - from).map_err(std::io::Error::from)
            } else {
                OpenOptions::new()
                    .write(true)
                    .open(gen_path(&self.dir, through.generation))
                    .and_then(|f| fallocate(&f, flags, from, to - from).map_err(Into::into))
            };
            if let Err(e) = punched {
                tracing::debug!(generation = through.generation, error = %e, "cannot free the sealed start of the audit journal");
            }
            inner.punched = Pos {
                generation: through.generation,
                offset: to,
            };
        }
    }

    pub fn has_pending(&self) -> bool {
        self.inner
            .lock()
            .map(|i| !i.pending.is_empty())
            .unwrap_or(true)
    }
}

fn open_gen(dir: &Path, generation: u64) -> Result<(PathBuf, File), AuditError> {
    let path = gen_path(dir, generation);
    match OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(file) => Ok((path, file)),
        Err(source) => Err(AuditError::Journal { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(drafts: &Drafts) -> Vec<String> {
        drafts
            .iter()
            .map(|d| serde_json::from_slice::<Record>(d.json()).unwrap().event)
            .collect()
    }

    fn open(dir: &Path, sealed: Sealed) -> Journal {
        Journal::open(dir, sealed, 0).unwrap()
    }

    #[test]
    fn the_pending_drafts_are_the_journal_lines_and_restore_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("j");
        let j = open(&jdir, Sealed::default());
        let mut r = Record::new("call");
        r.keys = vec!["/a".into()];
        assert_eq!(j.append(&r).unwrap(), 1);
        assert_eq!(j.append(&Record::new("policy_loaded")).unwrap(), 2);
        let taken = j.take(usize::MAX).unwrap();
        let through = taken.through().unwrap();
        let file = fs::read(gen_path(&jdir, through.generation)).unwrap();
        let mut lines = Vec::new();
        for d in taken.drafts.iter() {
            lines.extend_from_slice(d.json());
            lines.push(b'\n');
        }
        assert_eq!(file, lines);
        assert_eq!(through.offset, lines.len() as u64);
        // A commit failed: the taken drafts go back ahead of newer ones.
        j.append(&Record::new("gateway_stop")).unwrap();
        j.restore(taken);
        let again = j.take(usize::MAX).unwrap();
        assert_eq!(
            events(&again.drafts),
            ["call", "policy_loaded", "gateway_stop"]
        );
        assert!(!again.more);
    }

    #[test]
    fn a_bounded_take_leaves_the_rest_pending_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(&dir.path().join("j"), Sealed::default());
        for e in ["a", "b", "c"] {
            j.append(&Record::new(e)).unwrap();
        }
        let first = j.take(1).unwrap();
        assert_eq!(
            events(&first.drafts),
            ["a"],
            "at least one, within the bound"
        );
        assert!(first.more);
        let rest = j.take(usize::MAX).unwrap();
        assert_eq!(events(&rest.drafts), ["b", "c"]);
        assert!(rest.through() > first.through());
    }

    #[test]
    fn survives_reopen_and_retires() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("j");
        let j = open(&jdir, Sealed::default());
        j.append(&Record::new("call")).unwrap();
        j.append(&Record::new("gateway_stop")).unwrap();
        drop(j);
        // Simulate a torn line at the end of the last generation.
        let last = generations(&jdir).unwrap().into_iter().max().unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(gen_path(&jdir, last))
            .unwrap();
        f.write_all(b"{\"time\":\"2026").unwrap();
        let j = open(&jdir, Sealed::default());
        let taken = j.take(usize::MAX).unwrap();
        assert_eq!(events(&taken.drafts), ["call", "gateway_stop"]);
        // After a torn line, appends go to a new generation.
        j.append(&Record::new("call")).unwrap();
        let through = taken.through().unwrap();
        j.retire(through);
        let sealed = Sealed {
            through: 0,
            at: Some(through),
        };
        let j2 = Journal::open(&jdir, sealed, 0);
        drop(j);
        let recs = j2.unwrap().take(usize::MAX).unwrap();
        assert_eq!(
            recs.drafts.len(),
            1,
            "only the record appended after take survives retire"
        );
        // Generations marked sealed are skipped (and deleted), never replayed.
        let j3 = open(
            &jdir,
            Sealed {
                through: u64::MAX - 1,
                at: None,
            },
        );
        assert!(!j3.has_pending());
        assert_eq!(generations(&jdir).unwrap().len(), 1, "only the new one");
    }

    #[test]
    fn a_generation_sealed_in_part_replays_only_its_unsealed_lines_and_is_continued() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("j");
        let j = open(&jdir, Sealed::default());
        j.append(&Record::new("sealed")).unwrap();
        let taken = j.take(usize::MAX).unwrap();
        let at = taken.through().unwrap();
        j.retire(at);
        j.append(&Record::new("after")).unwrap();
        drop(j);
        let sealed = Sealed {
            through: 0,
            at: Some(at),
        };
        let j = open(&jdir, sealed);
        let recs = j.take(usize::MAX).unwrap();
        assert_eq!(events(&recs.drafts), ["after"]);
        // The generation ended in a whole line: it is continued, not replaced.
        assert_eq!(recs.through().unwrap().generation, at.generation);
        j.append(&Record::new("next")).unwrap();
        assert_eq!(generations(&jdir).unwrap(), [at.generation]);
    }

    /// Needs root (mounts a tmpfs); fails, not skips, without it.
    #[test]
    fn the_reserve_takes_records_on_a_full_disk_and_comes_back_when_space_does() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root: it mounts a tmpfs"
        );
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("m");
        fs::create_dir(&mnt).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(mnt.clone());
        const RESERVE: u64 = 256 << 10;
        let jdir = mnt.join("j");
        let j = Journal::open(&jdir, Sealed::default(), RESERVE).unwrap();
        assert!(j.reserve_whole());
        // Fill the disk.
        let filler = mnt.join("filler");
        let mut f = File::create(&filler).unwrap();
        let block = vec![7u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[7u8; 512]);
        drop(f);
        let mut r = Record::new("call");
        r.keys = vec!["/some/key/of/an/ordinary/length".into()];
        let line = Draft::new(&r).unwrap().line().len() as u64;
        let mut appended = 0u64;
        while j.append(&r).is_ok() {
            appended += 1;
            assert!(appended < 1_000_000, "the disk never filled");
        }
        let err = j.append(&r).unwrap_err();
        let AuditError::Journal { source, .. } = &err else {
            panic!("{err}");
        };
        assert!(is_no_space(source), "{err}");
        assert!(
            appended * line >= RESERVE,
            "{appended} records of {line} bytes: less than the reserve"
        );
        assert!(
            !j.reserve_whole(),
            "the spare cannot be made on a full disk"
        );
        // Seal everything and free the disk: the spare is made again.
        let taken = j.take(usize::MAX).unwrap();
        j.retire(taken.through().unwrap());
        fs::remove_file(&filler).unwrap();
        assert!(
            j.reserve_whole(),
            "the reserve is restored once space is back"
        );
        j.append(&r).unwrap();
    }
}
