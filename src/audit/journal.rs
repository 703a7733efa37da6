//! The journal: records not yet sealed into LMDB, one JSON line each, in
//! generation files `<store>/audit-journal/<gen>.jsonl`. A `write()` that
//! returned is in the kernel's hands and survives the gateway's death; the
//! writer seals the journal into LMDB with each commit, then deletes the
//! generations it sealed. A power loss can lose the lines written since the
//! last sealing commit (at most `[audit] sync_interval`), never a mutation's
//! record, which is sealed with its mutation.
//!
//! Each record is serialised once, on the caller's thread: the same bytes are
//! the journal line and, kept in memory, the draft the writer seals (see
//! `Draft`), so the writer neither serialises records nor frees them.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{AuditError, Draft, Drafts, Record};

pub struct Journal {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    generation: u64,
    /// The current generation's file, named in errors.
    path: PathBuf,
    file: File,
    pending: Drafts,
    /// A write failed part-way: the file may end in a torn line, and nothing
    /// may follow it there (recovery stops at a bad line), so the next append
    /// goes to a new generation.
    torn: bool,
    /// Generations up to this one are sealed and their files deleted; the
    /// files after it run contiguously to `generation`.
    retired: u64,
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

impl Journal {
    /// Opens the journal; the records a previous run left unsealed (in order)
    /// are pending. Generations up to `sealed_through` are already in LMDB (the
    /// gateway died before deleting them) and are deleted, not replayed. A torn
    /// last line (a power loss mid-write) is dropped.
    pub fn open(dir: &Path, sealed_through: u64) -> Result<Journal, AuditError> {
        let err = |source| AuditError::Journal {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.exists() {
            fs::DirBuilder::new().mode(0o700).create(dir).map_err(err)?;
        }
        let gens = generations(dir).map_err(err)?;
        let mut pending = Drafts::default();
        for g in gens.iter().filter(|g| **g <= sealed_through) {
            let path = gen_path(dir, *g);
            fs::remove_file(&path).map_err(|source| AuditError::Journal { path, source })?;
        }
        for g in gens.iter().filter(|g| **g > sealed_through) {
            let path = gen_path(dir, *g);
            let file = File::open(&path).map_err(|source| AuditError::Journal {
                path: path.clone(),
                source,
            })?;
            for (n, line) in BufReader::new(file).lines().enumerate() {
                // Parsed and drafted again rather than trusted as bytes: the
                // line may be torn, or written by another version.
                let parsed = line
                    .map_err(|e| e.to_string())
                    .and_then(|l| serde_json::from_str::<Record>(&l).map_err(|e| e.to_string()))
                    .and_then(|r| pending.push_record(&r).map_err(|e| e.to_string()));
                match parsed {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(file = %path.display(), line = n + 1, error = %e, "dropping a torn audit journal line");
                        break;
                    }
                }
            }
        }
        let generation = gens.last().map_or(1, |g| g + 1).max(sealed_through + 1);
        let (path, file) = open_gen(dir, generation)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                generation,
                path,
                file,
                pending,
                torn: false,
                retired: sealed_through,
            }),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, AuditError> {
        self.inner.lock().map_err(|_| AuditError::Journal {
            path: self.dir.clone(),
            source: std::io::Error::other("journal lock poisoned"),
        })
    }

    /// Appends a drafted record. When this returns Ok the record survives the
    /// gateway's death; when it fails the caller must not serve the call.
    /// Returns how many records now wait to be sealed.
    pub fn append(&self, record: &Record) -> Result<usize, AuditError> {
        // Serialised before taking the lock, which only covers the write()
        // and the copy into the pending drafts.
        let draft = Draft::new(record)?;
        let mut inner = self.lock()?;
        let inner = &mut *inner;
        if inner.torn {
            self.rotate(inner)?;
            inner.torn = false;
        }
        if let Err(source) = inner.file.write_all(draft.line()) {
            let path = inner.path.clone();
            // A full disk can take part of the line: leave it as the last
            // line of its generation (recovery drops a torn last line).
            inner.torn = true;
            if self.rotate(inner).is_ok() {
                inner.torn = false;
            }
            return Err(AuditError::Journal { path, source });
        }
        inner.pending.push(&draft);
        Ok(inner.pending.len())
    }

    /// Appends go to a new generation from now on. The records of the old one
    /// stay pending: they are sealed, and its file retired, with the next
    /// generation's.
    fn rotate(&self, inner: &mut Inner) -> Result<(), AuditError> {
        let (path, file) = open_gen(&self.dir, inner.generation + 1)?;
        inner.file = file;
        inner.path = path;
        inner.generation += 1;
        Ok(())
    }

    /// Takes every pending record for sealing, and starts a new generation so
    /// that appends made meanwhile are not deleted with the sealed ones.
    /// Returns the drafts and the generation to retire once they are sealed.
    pub fn take(&self) -> Result<(Drafts, Option<u64>), AuditError> {
        let mut inner = self.lock()?;
        if inner.pending.is_empty() {
            return Ok((Drafts::default(), None));
        }
        let old = inner.generation;
        self.rotate(&mut inner)?;
        inner.torn = false;
        Ok((std::mem::take(&mut inner.pending), Some(old)))
    }

    /// Puts drafts back after a commit that failed (their files still exist),
    /// ahead of any appended since.
    pub fn restore(&self, mut drafts: Drafts) {
        if let Ok(mut inner) = self.lock() {
            drafts.extend(&inner.pending);
            inner.pending = drafts;
        }
    }

    /// Deletes the generation files up to `through`: their records are sealed.
    /// Only the ones not deleted yet, without listing the directory: this runs
    /// after every commit that sealed journal records.
    pub fn retire(&self, through: u64) {
        let Ok(mut inner) = self.lock() else {
            return;
        };
        for g in inner.retired + 1..=through {
            match fs::remove_file(gen_path(&self.dir, g)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(generation = g, error = %e, "cannot remove a sealed audit journal file")
                }
            }
        }
        inner.retired = inner.retired.max(through);
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

    #[test]
    fn the_pending_drafts_are_the_journal_lines_and_restore_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("j");
        let j = Journal::open(&jdir, 0).unwrap();
        let mut r = Record::new("call");
        r.keys = vec!["/a".into()];
        assert_eq!(j.append(&r).unwrap(), 1);
        assert_eq!(j.append(&Record::new("policy_loaded")).unwrap(), 2);
        let (taken, through) = j.take().unwrap();
        let file = fs::read(gen_path(&jdir, through.unwrap())).unwrap();
        let mut lines = Vec::new();
        for d in taken.iter() {
            lines.extend_from_slice(d.json());
            lines.push(b'\n');
        }
        assert_eq!(file, lines);
        // A commit failed: the taken drafts go back ahead of newer ones.
        j.append(&Record::new("gateway_stop")).unwrap();
        j.restore(taken);
        let (again, _) = j.take().unwrap();
        assert_eq!(events(&again), ["call", "policy_loaded", "gateway_stop"]);
    }

    #[test]
    fn survives_reopen_and_retires() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("j");
        let j = Journal::open(&jdir, 0).unwrap();
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
        let j = Journal::open(&jdir, 0).unwrap();
        let (recs, through) = j.take().unwrap();
        assert_eq!(events(&recs), ["call", "gateway_stop"]);
        j.append(&Record::new("call")).unwrap();
        j.retire(through.unwrap());
        let j2 = Journal::open(&jdir, 0);
        drop(j);
        let (recs, _) = j2.unwrap().take().unwrap();
        assert_eq!(
            recs.len(),
            1,
            "only the record appended after take survives retire"
        );
        // Generations marked sealed are skipped (and deleted), never replayed.
        let j3 = Journal::open(&jdir, u64::MAX - 1).unwrap();
        assert!(!j3.has_pending());
        assert_eq!(generations(&jdir).unwrap().len(), 1, "only the new one");
    }
}
