//! The `kv` table in sorted runs (`run.rs`) instead of a redb B-tree.
//!
//! Every put is a read-modify-write, and on redb each one cost a B-tree descent to
//! decide it and, at the checkpoint, an insert into a 4 KiB leaf, copied, checksummed
//! and written back: most of the CPU a durable put cost (docs/design/put-path.md).
//! Here a checkpoint writes the overlay's `kv` changes as one new run, front to back,
//! and merges on a thread of their own keep the number of runs small.
//!
//! The runs live in a directory beside the database (`NAME.runs`), one file each
//! (`{file:016x}.run`). redb's `runs` table is the manifest: run id → (tier, file).
//! A run is named in the manifest by the same redb commit that applies the rest of
//! its checkpoint (history, graves, leases, meta), so the two never disagree. Runs
//! are written without fsync; a durable commit first fsyncs every run it names that
//! is not durable yet, and the directory, so a durable manifest names only durable
//! files. Files a merge replaced stay until a durable commit no longer names them.
//! At open, files the manifest does not name (written after the last durable
//! commit, whose batches the write-ahead log replays) are deleted.
//!
//! Small files a merge replaced are recycled rather than deleted: a checkpoint
//! renames one to its new run's name and overwrites it ([`RunWriter::reuse`]).
//! Checkpoints write tens of runs per second and merges delete as many; creating
//! a file costs an inode, and on ext4 without a journal finding a free inode
//! scans past every inode deleted in the last 30 s (`recently_deleted`), which
//! took the checkpoint thread 12 % of its time (docs/design/put-path.md). A file
//! is recycled only when no reader holds its run any more: a reader reading an
//! overwritten file would read another run's blocks. Spares keep their old names,
//! which no manifest names; the store deletes them when it closes, and after a
//! crash the open deletes them like any unnamed file.
//!
//! Changes to the set of runs are serialized by [`Runs::begin`], held across the
//! redb write transaction that records them; readers take a snapshot
//! ([`Runs::snapshot`]) and never wait for one.

use crate::redb::{META, backend};
use crate::run::{Member, Run, RunSet, RunWriter};
use crate::{Result, StoreError};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// The manifest: run id → (tier, file number).
pub(crate) const RUNS: TableDefinition<u64, (u32, u64)> = TableDefinition::new("runs");

/// How many adjacent runs of one tier a merge takes.
pub(crate) const FANOUT: usize = 4;

/// At most this many replaced run files wait to be recycled (see the module
/// documentation); past it they are deleted. Runs expire in bursts, at durable
/// commits (every 2 s under load), and a checkpoint takes one spare: 64 cover the
/// 40-60 checkpoints between two durable commits at 50,000 puts per second. The
/// files of those runs took as much disk before they expired.
const SPARES: usize = 64;

/// Only files up to this size are recycled: checkpoints' runs (about 450 KB at
/// 50,000 puts of 256 bytes per second), not merges' larger outputs, which a
/// checkpoint's run would have to cut short, freeing most of their blocks.
const SPARE_BYTES: u64 = 1024 * 1024;

/// A store's runs.
pub(crate) struct Runs {
    dir: PathBuf,
    state: Mutex<State>,
    published: RwLock<Arc<RunSet>>,
}

struct State {
    set: Arc<RunSet>,
    /// The next run file's number, and the next checkpoint run's id (both grow).
    next: u64,
    /// Runs written since the last durable commit.
    unsynced: Vec<Arc<Member>>,
    /// Runs merged away, which a durable manifest may still name.
    obsolete: Vec<Arc<Member>>,
    /// Runs merged away that no durable manifest names: deleted or recycled once no
    /// reader holds them.
    expired: Vec<Arc<Member>>,
    /// Files of runs no manifest names and no reader holds, to be overwritten by
    /// the next checkpoints' runs.
    spares: Vec<PathBuf>,
}

impl State {
    /// Deletes or recycles the files of expired runs that no reader holds any more.
    fn release(&mut self) {
        let mut i = 0;
        while i < self.expired.len() {
            // A run out of the published set is never taken again: once it is ours
            // alone, it stays so.
            if Arc::strong_count(&self.expired[i]) > 1 {
                i += 1;
                continue;
            }
            let member = self.expired.swap_remove(i);
            let path = member.run.path().to_owned();
            let small = member.run.file_len().is_ok_and(|len| len <= SPARE_BYTES);
            drop(member);
            if small && self.spares.len() < SPARES {
                self.spares.push(path);
            } else if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "deleting a merged run failed");
            }
        }
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

/// `NAME.runs` beside the database file `NAME.redb`.
pub(crate) fn dir_beside(db: &Path) -> PathBuf {
    db.with_extension("runs")
}

fn file_name(file: u64) -> String {
    format!("{file:016x}.run")
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("syncing", dir, e))
}

impl Runs {
    /// Opens the runs the manifest in `txn` names, and deletes every other run file
    /// in `dir` (creating it if need be).
    pub(crate) fn open(dir: &Path, txn: &WriteTransaction) -> Result<Runs> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
            // The new directory's own name must be durable before a durable manifest
            // names files in it.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let manifest = txn.open_table(RUNS).map_err(backend)?;
        let mut members = Vec::new();
        let mut named = std::collections::HashSet::new();
        let mut next = 1;
        for row in manifest.iter().map_err(backend)? {
            let (id, value) = row.map_err(backend)?;
            let (id, (tier, file)) = (id.value(), value.value());
            let run = Run::open(&dir.join(file_name(file)))?;
            named.insert(file_name(file));
            next = next.max(id + 1).max(file + 1);
            members.push(Member {
                id,
                tier,
                file,
                run,
            });
        }
        let entries = std::fs::read_dir(dir).map_err(|e| io_error("reading", dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("reading", dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".run") && !named.contains(&name) {
                // Written after the last durable commit (the log replays its
                // batches), or a spare a crash left.
                std::fs::remove_file(entry.path())
                    .map_err(|e| io_error("deleting", &entry.path(), e))?;
            }
        }
        let set = Arc::new(RunSet::new(members));
        Ok(Runs {
            dir: dir.to_owned(),
            published: RwLock::new(set.clone()),
            state: Mutex::new(State {
                set,
                next,
                unsynced: Vec::new(),
                obsolete: Vec::new(),
                expired: Vec::new(),
                spares: Vec::new(),
            }),
        })
    }

    /// The runs as of the last committed change, for a reader.
    pub(crate) fn snapshot(&self) -> Arc<RunSet> {
        self.published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds whole data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a change of the runs. Take it before the redb write transaction that
    /// records the change (and hold it until [`RunsChange::committed`]): every
    /// redb write transaction of the store is begun after it, so two never wait
    /// for each other the other way round.
    pub(crate) fn begin(&self) -> RunsChange<'_> {
        RunsChange {
            runs: self,
            state: self.lock(),
            staged: None,
            added: None,
            replaced: Vec::new(),
        }
    }

    /// Makes every run written since the last durable commit durable, and the
    /// directory that names them: before the database closes, since redb then makes
    /// its last commit durable without a [`RunsChange::sync`].
    pub(crate) fn sync_all(&self) -> Result<()> {
        let state = self.lock();
        for member in &state.unsynced {
            member.run.sync()?;
        }
        sync_dir(&self.dir)
    }

    /// A file number for a merge's output, and its path.
    pub(crate) fn allocate(&self) -> (u64, PathBuf) {
        let mut state = self.lock();
        let file = state.next;
        state.next += 1;
        (file, self.dir.join(file_name(file)))
    }
}

impl Drop for Runs {
    /// Deletes the spares, and the expired runs no reader holds.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        state.release();
        for path in state.spares.drain(..) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "deleting a spare run file failed");
            }
        }
    }
}

/// A change of the runs in progress (see [`Runs::begin`]). Dropped without
/// [`RunsChange::committed`], it changes nothing (a file it wrote is deleted at the
/// next open).
pub(crate) struct RunsChange<'r> {
    runs: &'r Runs,
    state: MutexGuard<'r, State>,
    /// The set as it will be once the transaction commits.
    staged: Option<Arc<RunSet>>,
    /// The run this change added.
    added: Option<Arc<Member>>,
    /// The runs a merge replaced: obsolete once the transaction commits.
    replaced: Vec<Arc<Member>>,
}

impl RunsChange<'_> {
    /// The runs as this change sees them.
    pub(crate) fn set(&self) -> &Arc<RunSet> {
        self.staged.as_ref().unwrap_or(&self.state.set)
    }

    /// Writes `changes` (in key order; `None` removes the key) as a new run and
    /// names it in `txn`'s manifest. Nothing to write, no run.
    pub(crate) fn add<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        txn: &WriteTransaction,
        changes: impl IntoIterator<Item = Result<(K, Option<V>)>>,
    ) -> Result<()> {
        let mut changes = changes.into_iter().peekable();
        if changes.peek().is_none() {
            return Ok(());
        }
        // The number is spent even if the run is not written: a file of it may be
        // left, and the next run must not meet it.
        let file = self.state.next;
        self.state.next += 1;
        let path = self.runs.dir.join(file_name(file));
        let written = (|| {
            let mut writer = match self.state.spares.pop() {
                Some(spare) => RunWriter::reuse(&spare, &path).or_else(|e| {
                    tracing::warn!(error = %e, "recycling a run file failed");
                    RunWriter::create(&path)
                })?,
                None => RunWriter::create(&path)?,
            };
            for change in changes {
                let (key, record) = change?;
                writer.add_record(key.as_ref(), record.as_ref().map(AsRef::as_ref))?;
            }
            writer.finish(false)
        })();
        let run = written.inspect_err(|_| {
            // No manifest names it; an open would delete it too.
            let _ = std::fs::remove_file(&path);
        })?;
        let member = Member {
            id: file,
            tier: 0,
            file,
            run,
        };
        txn.open_table(RUNS)
            .map_err(backend)?
            .insert(member.id, (member.tier, member.file))
            .map_err(backend)?;
        let set = self.set().with(member);
        self.added = set.members().first().cloned();
        self.staged = Some(Arc::new(set));
        Ok(())
    }

    /// Names `output` in `txn`'s manifest in place of `inputs` (a merge's).
    pub(crate) fn replace(
        &mut self,
        txn: &WriteTransaction,
        inputs: &[Arc<Member>],
        output: Member,
    ) -> Result<()> {
        let (id, tier, file) = (output.id, output.tier, output.file);
        let ids: Vec<u64> = inputs.iter().map(|m| m.id).collect();
        let set = self.set().replace(&ids, output)?;
        let mut manifest = txn.open_table(RUNS).map_err(backend)?;
        for input in &ids {
            manifest.remove(input).map_err(backend)?;
        }
        manifest.insert(id, (tier, file)).map_err(backend)?;
        self.added = set.members().iter().find(|m| m.id == id).cloned();
        self.staged = Some(Arc::new(set));
        // Obsolete only once this commits: if it fails, the inputs stay named.
        self.replaced.extend(inputs.iter().cloned());
        Ok(())
    }

    /// Before a durable commit: makes every run it will name durable, and the
    /// directory that names their files.
    pub(crate) fn sync(&mut self) -> Result<()> {
        for member in self.state.unsynced.iter().chain(&self.added) {
            member.run.sync()?;
        }
        sync_dir(&self.runs.dir)
    }

    /// After the transaction committed: readers see the new runs. After a durable
    /// commit ([`RunsChange::sync`] first), the files of runs merged away before it
    /// are deleted.
    pub(crate) fn committed(mut self, durable: bool) {
        if let Some(added) = self.added.take() {
            self.state.unsynced.push(added);
        }
        let replaced = std::mem::take(&mut self.replaced);
        self.state.obsolete.extend(replaced);
        if let Some(set) = self.staged.take() {
            self.state.set = set.clone();
            *self
                .runs
                .published
                .write()
                .unwrap_or_else(|e| e.into_inner()) = set;
        }
        if durable {
            self.state.unsynced.clear();
            let obsolete = std::mem::take(&mut self.state.obsolete);
            self.state.expired.extend(obsolete);
        }
        self.state.release();
    }
}

/// The `kv` changes of a redb write transaction (a barrier, a flush, a replayed
/// batch): read through to the runs, written as one run at commit.
pub(crate) struct KvWrite {
    runs: Arc<RunSet>,
    pub(crate) pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Entries added, less entries removed.
    pub(crate) entries: i64,
}

impl KvWrite {
    pub(crate) fn new(runs: Arc<RunSet>) -> KvWrite {
        KvWrite {
            runs,
            pending: BTreeMap::new(),
            entries: 0,
        }
    }

    pub(crate) fn with<R>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        match self.pending.get(key) {
            Some(record) => Ok(record.as_deref().map(f)),
            None => Ok(self.runs.get(key)?.map(|r| f(&r))),
        }
    }

    pub(crate) fn insert(&mut self, key: &[u8], record: Vec<u8>, existed: bool) {
        self.entries += i64::from(!existed);
        self.pending.insert(key.to_vec(), Some(record));
    }

    /// Removes `key`; answers its record.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let old = self.with(key, <[u8]>::to_vec)?;
        self.entries -= i64::from(old.is_some());
        self.pending.insert(key.to_vec(), None);
        Ok(old)
    }
}

/// Adds `delta` to the entry count in `txn`'s meta.
pub(crate) fn add_entries(txn: &WriteTransaction, delta: i64) -> Result<()> {
    if delta == 0 {
        return Ok(());
    }
    let mut meta = txn.open_table(META).map_err(backend)?;
    let now = meta
        .get("entries")
        .map_err(backend)?
        .map_or(0, |g| g.value());
    meta.insert("entries", now.saturating_add_signed(delta))
        .map_err(backend)?;
    Ok(())
}

/// The records of `runs` from `start` on, in key order, reading only runs that
/// may hold keys with `prefix` (the caller stops at the first key without it).
pub(crate) fn range<'r>(
    runs: &'r RunSet,
    start: std::ops::Bound<&[u8]>,
    prefix: &[u8],
) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + 'r {
    let (from, skip) = match start {
        std::ops::Bound::Included(k) => (k.to_vec(), None),
        std::ops::Bound::Excluded(k) => (k.to_vec(), Some(k.to_vec())),
        std::ops::Bound::Unbounded => (Vec::new(), None),
    };
    runs.iter_from(&from, prefix)
        .filter(move |item| !matches!((item, &skip), (Ok((k, _)), Some(s)) if k == s))
}

/// A layer's or a transaction's `kv` changes, as [`RunsChange::add`] takes them.
pub(crate) fn changes(
    kv: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
) -> impl Iterator<Item = Result<(&[u8], Option<&[u8]>)>> {
    kv.iter().map(|(k, v)| Ok((k.as_slice(), v.as_deref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::Database;
    use std::sync::atomic::AtomicBool;

    fn run_of(runs: &Runs, db: &Database, key: &[u8]) {
        let mut change = runs.begin();
        let txn = db.begin_write().unwrap();
        let value: &[u8] = b"value";
        change.add(&txn, [Ok((key, Some(value)))]).unwrap();
        change.sync().unwrap();
        txn.commit().unwrap();
        change.committed(true);
    }

    /// Runs of one entry each under `a` and `b`, durable, and their merge, written
    /// but not named yet; the set the merge read.
    struct Merged {
        dir: tempfile::TempDir,
        db: Database,
        runs: Runs,
        set: Arc<RunSet>,
        output: Member,
    }

    fn two_runs_merged() -> Merged {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db")).unwrap();
        let txn = db.begin_write().unwrap();
        let runs = Runs::open(&dir.path().join("runs"), &txn).unwrap();
        txn.commit().unwrap();
        run_of(&runs, &db, b"a");
        run_of(&runs, &db, b"b");
        let set = runs.snapshot();
        let (file, path) = runs.allocate();
        let output = set
            .merge(set.members(), file, &path, true, &AtomicBool::new(false))
            .unwrap();
        Merged {
            dir,
            db,
            runs,
            set,
            output,
        }
    }

    #[test]
    fn a_run_that_fails_to_be_written_leaves_nothing_in_the_way_of_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db")).unwrap();
        let runs_dir = dir.path().join("runs");
        let txn = db.begin_write().unwrap();
        let runs = Runs::open(&runs_dir, &txn).unwrap();
        txn.commit().unwrap();
        {
            let mut change = runs.begin();
            let txn = db.begin_write().unwrap();
            let value: &[u8] = b"value";
            let changes = [
                Ok((&b"a"[..], Some(value))),
                Err(StoreError::Io("the overlay's changes failed".into())),
            ];
            assert!(change.add(&txn, changes).is_err());
        }
        assert!(run_files(&runs_dir).is_empty(), "the partial file is gone");
        run_of(&runs, &db, b"b");
        assert_eq!(
            runs.snapshot().get(b"b").unwrap().as_deref(),
            Some(&b"value"[..])
        );
    }

    #[test]
    fn a_merge_whose_commit_fails_deletes_none_of_its_inputs() {
        let Merged {
            dir,
            db,
            runs,
            set,
            output,
        } = two_runs_merged();
        let runs_dir = dir.path().join("runs");
        let inputs = set.members().to_vec();
        // The merge is staged, and its transaction is dropped: it never commits.
        let mut change = runs.begin();
        let txn = db.begin_write().unwrap();
        change.replace(&txn, &inputs, output).unwrap();
        drop(txn);
        drop(change);
        // A later durable commit must not delete the inputs, which the manifest
        // still names.
        run_of(&runs, &db, b"c");
        for input in &inputs {
            assert!(input.run.path().exists(), "{}", input.run.path().display());
        }
        drop(runs);
        let txn = db.begin_write().unwrap();
        let reopened = Runs::open(&runs_dir, &txn).unwrap();
        assert_eq!(reopened.snapshot().members().len(), 3);
    }

    fn run_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_merged_run_is_recycled_only_once_no_reader_holds_it() {
        let Merged {
            dir,
            db,
            runs,
            set: reader,
            output,
        } = two_runs_merged();
        let runs_dir = dir.path().join("runs");
        let merged: Vec<PathBuf> = (reader.members().iter())
            .map(|m| m.run.path().to_owned())
            .collect();
        let mut change = runs.begin();
        let txn = db.begin_write().unwrap();
        change.replace(&txn, reader.members(), output).unwrap();
        txn.commit().unwrap();
        change.committed(false);
        // Durable commits no longer name the inputs, but `reader` still reads them:
        // the runs written meanwhile are new files.
        run_of(&runs, &db, b"c");
        run_of(&runs, &db, b"d");
        for path in &merged {
            assert!(path.exists(), "{}", path.display());
        }
        assert_eq!(reader.get(b"a").unwrap().as_deref(), Some(&b"value"[..]));
        assert_eq!(reader.get(b"b").unwrap().as_deref(), Some(&b"value"[..]));
        let before = run_files(&runs_dir);
        drop(reader);
        // The next commit finds them free and keeps them as spares; the commit after
        // it writes its run into one of them.
        run_of(&runs, &db, b"e");
        assert_eq!(run_files(&runs_dir).len(), before.len() + 1);
        run_of(&runs, &db, b"f");
        let after = run_files(&runs_dir);
        assert_eq!(after.len(), before.len() + 1, "a spare took the new run");
        assert_eq!(
            merged.iter().filter(|p| p.exists()).count(),
            1,
            "one of the two files was renamed"
        );
        let set = runs.snapshot();
        for key in [&b"a"[..], b"b", b"c", b"d", b"e", b"f"] {
            assert_eq!(set.get(key).unwrap().as_deref(), Some(&b"value"[..]));
        }
        // The spare left goes when the runs are closed.
        drop((set, runs));
        let txn = db.begin_write().unwrap();
        let reopened = Runs::open(&runs_dir, &txn).unwrap();
        assert!(merged.iter().all(|p| !p.exists()));
        let set = reopened.snapshot();
        assert_eq!(set.members().len(), 5);
        for key in [&b"a"[..], b"b", b"c", b"d", b"e", b"f"] {
            assert_eq!(set.get(key).unwrap().as_deref(), Some(&b"value"[..]));
        }
    }
}
