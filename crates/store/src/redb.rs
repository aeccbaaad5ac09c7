//! The embedded engine: redb in one file, with group commit.
//!
//! One writer thread owns every write. It takes all pending operations from a
//! bounded queue and decides them in order, as one batch, against the overlay
//! (`overlay.rs`: a redb snapshot plus the changes redb does not hold yet); the log
//! thread appends the batch to the write-ahead log (`wal.rs`) with one `fdatasync`
//! meanwhile. Once the record is durable the batch's changes are merged into the
//! overlay and each operation is acknowledged and its events published. A checkpoint
//! (every `checkpoint_interval`) hands the overlay's changes to the checkpoint
//! thread, which applies them to redb in one commit. Most commits are not fsynced
//! (`Durability::None`: readers see them, the log still holds their batches); every
//! `sync_interval` (or 64 MiB of log) one is `Durability::Immediate`, and the log files
//! it covers are then emptied. Between two durable checkpoints a B-tree page that
//! many puts changed reaches the disk once, and `paced.rs` writes it back in steps
//! that leave the log's fsyncs room. Lease grants and keep-alives are decided
//! against the overlay like puts; revokes, sweeps and compaction scan tables, so
//! they run in a redb write transaction on the writer after the overlay is applied. At start, batches logged after the last durable checkpoint are
//! replayed: applying a batch is deterministic given the state and the batch's clock,
//! both of which the log keeps. Readers open their own MVCC read transactions (and
//! read the overlay while one is published) and never wait for a commit; `get` looks
//! in the entry cache (`cache.rs`) first, which the writer keeps exact around each
//! publication.
//!
//! `kv` (key → create revision, mod revision, lease (0 = none), value) is not a
//! redb table but sorted runs (`kvruns.rs`); a checkpoint writes the overlay's `kv`
//! changes as one run and names it in the `runs` table in the same commit; the
//! merge thread (`Merger`) merges runs in the background.
//!
//! Tables:
//! - `history`: the events (the change feed), in chunks (`history.rs`); each event
//!   also names the revision of the previous event of the same key, so a key's
//!   history is a chain through them that starts at its entry (or its grave) and
//!   costs no index of its own;
//! - `graves`: key → revision of its deletion, for deleted keys whose deletion is
//!   still in the log (where a deleted key's history starts);
//! - `leases`: lease → (ttl ms, expiry ms); `lease_expiry`: (expiry ms, lease) → ();
//!   `lease_keys`: (lease, key) → ();
//! - `runs`: run id → (tier, file number), the manifest of `kv`'s runs;
//! - `meta`: "revision", "next_lease", "compacted", "batch_seq", "entries" → u64.
//!
//! A database from before the runs has a `kv` table; the first open moves it into
//! one run (`migrate_kv`). One from before the chunks has a `log` table, which it
//! moves into `history` (`history::migrate_log`).

use crate::cache::EntryCache;
use crate::history::{self, HISTORY, encode_event};
use crate::kvruns::{KvWrite, Runs, RunsChange};
use crate::overlay::{Base, Layer, Overlay, OverlayTables, Tables};
use crate::wal::{Appender, Wal};
use crate::{
    CommitInfo, CommitObserver, Condition, Event, EventKind, KeyValue, Lease, LeaseChoice, LeaseId,
    Page, Put, PutOutcome, Result, Revision, Store, StoreError, ValueGuard, now_ms,
};
use async_trait::async_trait;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Where `kv` was before it moved into runs (see `migrate_kv`).
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
pub(crate) const GRAVES: TableDefinition<&[u8], u64> = TableDefinition::new("graves");
pub(crate) const LEASES: TableDefinition<u64, (u64, u64)> = TableDefinition::new("leases");
pub(crate) const LEASE_EXPIRY: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("lease_expiry");
const LEASE_KEYS: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("lease_keys");
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The meta value `name` in the snapshot `txn` (0 when it was never written).
fn meta_in(txn: &redb::ReadTransaction, name: &str) -> Result<u64> {
    let meta = txn.open_table(META).map_err(backend)?;
    Ok(meta.get(name).map_err(backend)?.map_or(0, |g| g.value()))
}

/// How many entries the store holds as of the snapshot `txn`.
pub(crate) fn entries_in(txn: &redb::ReadTransaction) -> Result<u64> {
    meta_in(txn, "entries")
}

/// Tuning of the embedded engine.
#[derive(Clone)]
pub struct RedbOptions {
    /// The most operations one commit carries.
    pub max_batch: usize,
    /// The most writes waiting for the writer; past it writes are refused with
    /// [`StoreError::Overloaded`] instead of queueing without bound.
    pub queue_capacity: usize,
    /// The most history entries one compaction call drops (keeps commits short).
    pub compaction_step: usize,
    /// Told of every commit.
    pub on_commit: Option<CommitObserver>,
    /// Memory for redb's page cache and write buffer.
    pub cache_bytes: usize,
    /// Memory for the entry cache (recently read entries; 0 turns it off).
    pub entry_cache_bytes: usize,
    /// The longest time between checkpoints (the overlay applied to redb) while
    /// writes come in.
    pub checkpoint_interval: Duration,
    /// The largest write-ahead log before a durable checkpoint, and the largest
    /// overlay before a checkpoint.
    pub checkpoint_bytes: u64,
    /// The longest time between durable checkpoints while writes come in. The
    /// checkpoints between them commit to redb without an fsync; the log keeps their
    /// batches until a durable one holds them.
    pub sync_interval: Duration,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            max_batch: 1024,
            queue_capacity: 16 * 1024,
            compaction_step: 10_000,
            on_commit: None,
            // 72 MiB in all. 8 MiB more for the entry cache than for the page
            // cache: see the memory model in the README for what the split trades.
            cache_bytes: 8 * 1024 * 1024,
            entry_cache_bytes: 48 * 1024 * 1024,
            checkpoint_interval: Duration::from_millis(20),
            checkpoint_bytes: 64 * 1024 * 1024,
            sync_interval: Duration::from_secs(2),
        }
    }
}

/// The embedded store.
pub struct RedbStore {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Pending>,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Shared {
    /// Closed by `Shared`'s drop, after the runs its last commit names are durable.
    db: std::mem::ManuallyDrop<Database>,
    /// `kv`'s runs (see kvruns.rs).
    runs: Runs,
    events: broadcast::Sender<Event>,
    committed: AtomicU64,
    compacted: AtomicU64,
    cache: EntryCache,
    /// The overlay readers must use; odd `overlay_epoch` while one is published, so
    /// that readers take the lock only then.
    overlay: std::sync::RwLock<Option<Arc<Overlay>>>,
    overlay_epoch: AtomicU64,
    checkpoints: AtomicU64,
    syncs: AtomicU64,
    overlay_batches: AtomicU64,
    barrier_batches: AtomicU64,
    deferred_barriers: AtomicU64,
    overlay_peak: AtomicU64,
    /// Set while some acknowledged writes are not durable in redb yet: the
    /// checkpoint thread then wakes an idle writer to make them so.
    unsettled: std::sync::atomic::AtomicBool,
}

impl Drop for Shared {
    /// redb makes a pending non-durable commit durable when the database closes,
    /// and such a commit may name runs that are not durable yet (a checkpoint that
    /// is not a durable one, when the final durable checkpoint failed or never ran:
    /// a failed open, a poisoned writer). A durable manifest must name only durable
    /// files (kvruns.rs), so they are made durable first. If that fails, the
    /// database is left unclosed: the next open then rolls back to the last durable
    /// commit and replays the write-ahead log.
    fn drop(&mut self) {
        match self.runs.sync_all() {
            Ok(()) => {
                // SAFETY: `db` is dropped here only, and `self` is not used after.
                #[allow(unsafe_code)]
                unsafe {
                    std::mem::ManuallyDrop::drop(&mut self.db)
                };
            }
            Err(e) => tracing::error!(
                error = %e,
                "making the runs durable at close failed; the database is left unclosed, so that the next open recovers from its last durable commit and the write-ahead log"
            ),
        }
    }
}

/// Counts of the engine's checkpoints, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    /// Checkpoints: overlay changes committed to redb, durable or not.
    pub checkpoints: u64,
    /// Durable checkpoints (fsynced; the log let go of what they hold).
    pub syncs: u64,
    /// Batches decided against the overlay.
    pub overlay_batches: u64,
    /// The most memory one layer of the overlay took, about, in bytes.
    pub overlay_peak_bytes: u64,
    /// Logged batches run in a redb write transaction instead (lease revokes,
    /// sweeps, compactions): each applied the overlay first, with every write
    /// waiting behind it.
    pub barrier_batches: u64,
    /// Barrier operations that came while a checkpoint ran and waited for its end
    /// apart, instead of making every write wait for it too.
    pub deferred_barriers: u64,
}

impl Shared {
    fn published(&self) -> Option<Arc<Overlay>> {
        // The lock guards one pointer; a poisoned one still holds a whole value.
        self.overlay
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes an overlay, or none; the epoch is odd exactly while one is.
    fn publish(&self, overlay: Option<Arc<Overlay>>) {
        let some = overlay.is_some();
        let mut slot = self.overlay.write().unwrap_or_else(|e| e.into_inner());
        let was = slot.is_some();
        *slot = overlay;
        if was != some {
            self.overlay_epoch.fetch_add(1, Ordering::AcqRel);
        }
    }
}

enum Op {
    Put(Put),
    Delete(Vec<u8>, Condition),
    Grant(Duration),
    KeepAlive(LeaseId),
    Revoke(LeaseId),
    Sweep,
    Compact(u64),
    Shutdown,
    /// Not logged: the checkpoint thread wakes the writer with it.
    Wake,
}

enum Outcome {
    Put(PutOutcome),
    Deleted(Option<Revision>),
    Lease(Lease),
    Count(usize),
    Done,
}

struct Pending {
    op: Op,
    reply: oneshot::Sender<Result<Outcome>>,
}

pub(crate) fn backend(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(m) => StoreError::Corrupted(m),
        redb::Error::Io(io) => StoreError::Io(io.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// The `kv` table's value: create revision, mod revision, lease, then the value.
pub(crate) struct Stored<'a> {
    pub(crate) create: Revision,
    pub(crate) modified: Revision,
    pub(crate) lease: LeaseId,
    pub(crate) value: &'a [u8],
}

impl<'a> Stored<'a> {
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self> {
        if bytes.len() < 24 {
            return Err(StoreError::Corrupted(
                "kv record shorter than 24 bytes".into(),
            ));
        }
        let u = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        Ok(Stored {
            create: u(0),
            modified: u(8),
            lease: u(16),
            value: &bytes[24..],
        })
    }

    pub(crate) fn encode(
        create: Revision,
        modified: Revision,
        lease: LeaseId,
        value: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + value.len());
        out.extend_from_slice(&create.to_be_bytes());
        out.extend_from_slice(&modified.to_be_bytes());
        out.extend_from_slice(&lease.to_be_bytes());
        out.extend_from_slice(value);
        out
    }

    pub(crate) fn to_key_value(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: self.value.to_vec(),
            create_revision: self.create,
            mod_revision: self.modified,
            lease: (self.lease != 0).then_some(self.lease),
            lease_expires_at_ms: None,
        }
    }
}

/// Walks a key's history back from its newest event; `lookup` finds an event and
/// the revision of the one before it, or nothing where compaction took it (the
/// history ends there).
pub(crate) fn follow_history(
    mut revision: Revision,
    limit: usize,
    mut lookup: impl FnMut(Revision) -> Result<Option<(Event, Revision)>>,
) -> Result<Vec<Event>> {
    let mut out = Vec::new();
    while revision != 0 && out.len() < limit {
        let Some((event, prev)) = lookup(revision)? else {
            break;
        };
        out.push(event);
        revision = prev;
    }
    Ok(out)
}

pub(crate) fn lease_live(
    leases: &impl ReadableTable<u64, (u64, u64)>,
    id: LeaseId,
    now: u64,
) -> Result<Option<Lease>> {
    if id == 0 {
        return Ok(None);
    }
    Ok(leases
        .get(id)
        .map_err(backend)?
        .and_then(|g| live_lease(id, g.value(), now)))
}

/// The lease a record (TTL, expiry in ms) describes, if it has not expired by `now`.
pub(crate) fn live_lease(
    id: LeaseId,
    (ttl_ms, expires_at_ms): (u64, u64),
    now: u64,
) -> Option<Lease> {
    (expires_at_ms > now).then_some(Lease {
        id,
        ttl: Duration::from_millis(ttl_ms),
        expires_at_ms,
    })
}

impl RedbStore {
    /// Opens (or creates) the database file at `path` and starts the writer thread.
    ///
    /// Inside a multi-threaded tokio runtime, writes are answered (and the change
    /// feed is sent) from a task spawned on that runtime: open the store in the
    /// runtime that will use it.
    pub fn open(path: &Path, options: RedbOptions) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StoreError::Io(format!("opening {}: {e}", path.display())))?;
        let file = crate::paced::PacedFile::new(file)
            .map_err(|e| StoreError::Io(format!("opening {}: {e}", path.display())))?;
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create_with_backend(file)
            .map_err(backend)?;
        let (committed, compacted, next_lease, batch_seq, runs) = {
            let txn = db.begin_write().map_err(backend)?;
            let runs = Runs::open(&crate::kvruns::dir_beside(path), &txn)?;
            let mut migration = runs.begin();
            migrate_kv(&txn, &mut migration)?;
            history::migrate_log(&txn)?;
            let meta_values = {
                // Create every table up front so readers never meet a missing one.
                txn.open_table(HISTORY).map_err(backend)?;
                txn.open_table(GRAVES).map_err(backend)?;
                txn.open_table(LEASES).map_err(backend)?;
                txn.open_table(LEASE_EXPIRY).map_err(backend)?;
                txn.open_table(LEASE_KEYS).map_err(backend)?;
                let meta = txn.open_table(META).map_err(backend)?;
                let get = |k: &str| -> Result<u64> {
                    Ok(meta
                        .get(k)
                        .map_err(backend)?
                        .map(|g| g.value())
                        .unwrap_or(0))
                };
                (
                    get("revision")?,
                    get("compacted")?,
                    get("next_lease")?.max(1),
                    get("batch_seq")?,
                )
            };
            migration.sync()?;
            txn.commit().map_err(backend)?;
            migration.committed(true);
            let (committed, compacted, next_lease, batch_seq) = meta_values;
            (committed, compacted, next_lease, batch_seq, runs)
        };
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            db: std::mem::ManuallyDrop::new(db),
            runs,
            events,
            committed: AtomicU64::new(committed),
            compacted: AtomicU64::new(compacted),
            cache: EntryCache::new(options.entry_cache_bytes),
            overlay: std::sync::RwLock::new(None),
            overlay_epoch: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            overlay_batches: AtomicU64::new(0),
            barrier_batches: AtomicU64::new(0),
            deferred_barriers: AtomicU64::new(0),
            overlay_peak: AtomicU64::new(0),
            unsettled: std::sync::atomic::AtomicBool::new(false),
        });
        let (wal, records) = Wal::open(&path.with_extension("wal"))
            .map_err(|e| StoreError::Io(format!("opening the write-ahead log: {e}")))?;
        let (queue, rx) = mpsc::channel(options.queue_capacity.max(1));
        let checkpointer = Checkpointer::spawn(
            shared.clone(),
            options.checkpoint_interval,
            queue.downgrade(),
        )?;
        let mut writer = Writer {
            shared: shared.clone(),
            revision: committed,
            next_lease,
            options,
            wal: Appender::spawn(wal)
                .map_err(|e| StoreError::Io(format!("starting the log thread: {e}")))?,
            seq: batch_seq,
            last_checkpoint: Instant::now(),
            last_sync: Instant::now(),
            poisoned: false,
            checkpointer,
            wake: queue.downgrade(),
            answers: Answerer::spawn(),
            overlay: None,
            deferred: Vec::new(),
            deferred_since: None,
        };
        writer.replay(records)?;
        let handle = std::thread::Builder::new()
            .name("amphora-redb-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Io(format!("starting the writer thread: {e}")))?;
        Ok(RedbStore {
            shared,
            queue,
            writer: std::sync::Mutex::new(Some(handle)),
        })
    }

    async fn submit(&self, op: Op) -> Result<Outcome> {
        let (reply, rx) = oneshot::channel();
        self.queue
            .try_send(Pending { op, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    StoreError::Unavailable("the store is closed".into())
                }
            })?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the writer stopped".into()))?
    }

    fn read(&self) -> Result<redb::ReadTransaction> {
        self.shared.db.begin_read().map_err(backend)
    }

    /// The entry under `key` in redb's latest commit (with no overlay published).
    fn get_committed(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        // The runs before the snapshot: a change committed between the two reads
        // shows as a read of the entry a moment before it (see kvruns.rs).
        let Some(record) = self.shared.runs.snapshot().get(key)? else {
            return Ok(None);
        };
        let stored = Stored::decode(&record)?;
        let mut found = stored.to_key_value(key);
        if stored.lease != 0 {
            // Only an entry with a lease needs redb (its lease's expiry).
            let txn = self.read()?;
            let leases = txn.open_table(LEASES).map_err(backend)?;
            let Some(lease) = lease_live(&leases, stored.lease, now_ms())? else {
                return Ok(None);
            };
            found.lease_expires_at_ms = Some(lease.expires_at_ms);
        }
        Ok(Some(found))
    }

    /// How many checkpoints and overlay batches there were since the store opened.
    pub fn checkpoint_stats(&self) -> CheckpointStats {
        CheckpointStats {
            checkpoints: self.shared.checkpoints.load(Ordering::Relaxed),
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            overlay_batches: self.shared.overlay_batches.load(Ordering::Relaxed),
            overlay_peak_bytes: self.shared.overlay_peak.load(Ordering::Relaxed),
            barrier_batches: self.shared.barrier_batches.load(Ordering::Relaxed),
            deferred_barriers: self.shared.deferred_barriers.load(Ordering::Relaxed),
        }
    }

    /// The published overlay: there is one while some acknowledged writes are not
    /// in redb yet.
    fn overlay(&self) -> Option<Arc<Overlay>> {
        if self
            .shared
            .overlay_epoch
            .load(Ordering::Acquire)
            .is_multiple_of(2)
        {
            return None;
        }
        self.shared.published()
    }
}

/// The last revision compaction removed from the history of the snapshot `txn`.
pub(crate) fn compacted_in(txn: &redb::ReadTransaction) -> Result<Revision> {
    meta_in(txn, "compacted")
}

/// [`StoreError::Compacted`] when history up to `compacted` no longer holds the
/// change at `from`.
pub(crate) fn check_compacted(compacted: Revision, from: Revision) -> Result<()> {
    if from <= compacted && compacted > 0 {
        return Err(StoreError::Compacted { compacted });
    }
    Ok(())
}

fn unexpected() -> StoreError {
    StoreError::Unavailable("the writer answered with the wrong kind of result".into())
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        // The ticket is taken before the read transaction opens: see cache.rs.
        let ticket = match self.shared.cache.get(key) {
            Ok(hit) => return Ok(Some(hit)),
            Err(ticket) => ticket,
        };
        // The overlay is looked for after the ticket is taken: a batch merged into it
        // later moves the generation, one merged earlier is in what this reads.
        let found = match self.overlay() {
            Some(overlay) => overlay.get(key, now_ms())?,
            None => self.get_committed(key)?,
        };
        if let (Some(kv), Some(ticket)) = (&found, ticket)
            && kv.lease.is_none()
        {
            self.shared.cache.offer(ticket, kv);
        }
        Ok(found)
    }

    async fn range(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Page> {
        if let Some(overlay) = self.overlay() {
            return overlay.range(prefix, after, limit, now_ms());
        }
        let runs = self.shared.runs.snapshot();
        let txn = self.read()?;
        let leases = txn.open_table(LEASES).map_err(backend)?;
        let now = now_ms();
        let start = match after {
            Some(a) if a >= prefix => std::ops::Bound::Excluded(a),
            _ => std::ops::Bound::Included(prefix),
        };
        let mut page = Page::default();
        for item in crate::kvruns::range(&runs, start, prefix) {
            let (key, record) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            let stored = Stored::decode(&record)?;
            let expires = match stored.lease {
                0 => None,
                id => match lease_live(&leases, id, now)? {
                    Some(lease) => Some(lease.expires_at_ms),
                    None => continue,
                },
            };
            if page.items.len() == limit {
                page.more = true;
                break;
            }
            let mut found = stored.to_key_value(&key);
            found.lease_expires_at_ms = expires;
            page.items.push(found);
        }
        Ok(page)
    }

    async fn put_outcome(&self, put: Put) -> Result<PutOutcome> {
        match self.submit(Op::Put(put)).await? {
            Outcome::Put(p) => Ok(p),
            _ => Err(unexpected()),
        }
    }

    async fn delete(&self, key: &[u8], condition: Condition) -> Result<Option<Revision>> {
        match self.submit(Op::Delete(key.to_vec(), condition)).await? {
            Outcome::Deleted(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn history(&self, key: &[u8], limit: usize) -> Result<Vec<Event>> {
        if let Some(overlay) = self.overlay() {
            return overlay.history(key, limit);
        }
        let record = self.shared.runs.snapshot().get(key)?;
        let txn = self.read()?;
        let graves = txn.open_table(GRAVES).map_err(backend)?;
        let log = txn.open_table(HISTORY).map_err(backend)?;
        // The newest event: the entry's last change, or its deletion.
        let newest = match record {
            Some(record) => Stored::decode(&record)?.modified,
            None => graves
                .get(key)
                .map_err(backend)?
                .map(|g| g.value())
                .unwrap_or(0),
        };
        follow_history(newest, limit, |revision| history::get(&log, revision))
    }

    async fn changes(&self, from: Revision, limit: usize) -> Result<Vec<Event>> {
        check_compacted(self.shared.compacted.load(Ordering::Acquire), from)?;
        if let Some(overlay) = self.overlay() {
            return overlay.changes_from(from, limit);
        }
        // The horizon again, as of the snapshot read: a compaction committed since
        // the load above is in it, and may not pass for a gap in the log.
        let txn = self.read()?;
        check_compacted(compacted_in(&txn)?, from)?;
        let log = txn.open_table(HISTORY).map_err(backend)?;
        let mut out = Vec::new();
        history::read_from(&log, from, limit, &mut out)?;
        Ok(out)
    }

    fn cache_stats(&self) -> crate::CacheStats {
        self.shared.cache.stats()
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    async fn revision(&self) -> Result<Revision> {
        Ok(self.shared.committed.load(Ordering::Acquire))
    }

    async fn entry_count(&self) -> Result<u64> {
        if let Some(overlay) = self.overlay() {
            return Ok(overlay.entry_count());
        }
        entries_in(&self.read()?)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        match self.submit(Op::Grant(ttl)).await? {
            Outcome::Lease(l) => Ok(l),
            _ => Err(unexpected()),
        }
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<Lease> {
        match self.submit(Op::KeepAlive(id)).await? {
            Outcome::Lease(l) => Ok(l),
            _ => Err(unexpected()),
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        match self.submit(Op::Revoke(id)).await? {
            Outcome::Done | Outcome::Count(_) => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn lease(&self, id: LeaseId) -> Result<Option<Lease>> {
        if let Some(overlay) = self.overlay() {
            return overlay.lease_live(id, now_ms());
        }
        let txn = self.read()?;
        let leases = txn.open_table(LEASES).map_err(backend)?;
        lease_live(&leases, id, now_ms())
    }

    async fn sweep_expired_leases(&self) -> Result<usize> {
        // A sweep is a barrier: it waits for the running checkpoint and stops every
        // write meanwhile, so one read first tells whether it would find anything
        // (in the overlay's expiry index over its base while one is published: grants
        // and keep-alives are decided there).
        let now = now_ms();
        let due = match self.overlay() {
            Some(overlay) => overlay.lease_expired_by(now)?,
            None => {
                let txn = self.read()?;
                let expiry = txn.open_table(LEASE_EXPIRY).map_err(backend)?;
                expiry
                    .range((0u64, 0u64)..=(now, u64::MAX))
                    .map_err(backend)?
                    .next()
                    .is_some()
            }
        };
        if !due {
            return Ok(0);
        }
        match self.submit(Op::Sweep).await? {
            Outcome::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    async fn compact_history(&self, before_ms: u64) -> Result<usize> {
        // A barrier too (see above). Compaction removes events from the oldest on and
        // stops at the first one not older than `before_ms`: when that is the oldest,
        // it would remove nothing.
        let oldest = self.shared.compacted.load(Ordering::Acquire) + 1;
        match self.changes(oldest, 1).await {
            Ok(events) if events.first().is_none_or(|e| e.at_ms >= before_ms) => {
                return Ok(0);
            }
            // Compacted meanwhile, or unreadable: let the writer decide.
            _ => {}
        }
        match self.submit(Op::Compact(before_ms)).await? {
            Outcome::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    async fn close(&self) -> Result<()> {
        // The shutdown marker queues behind every accepted write, so they all commit.
        // It waits for room in a full queue: refused, it would leave the writer
        // running and the join below waiting for it forever.
        let (reply, answer) = oneshot::channel();
        let outcome = match self
            .queue
            .send(Pending {
                op: Op::Shutdown,
                reply,
            })
            .await
        {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the writer stopped".into()))),
            Err(_) => Err(StoreError::Unavailable("the store is closed".into())),
        };
        let handle = self.writer.lock().expect("writer handle lock").take();
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
                .map_err(|_| StoreError::Unavailable("the writer thread panicked".into()))?;
        }
        match outcome {
            Ok(_) | Err(StoreError::Unavailable(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    /// The last revision handed out (committed, or in the batch being built).
    revision: Revision,
    next_lease: LeaseId,
    options: RedbOptions,
    wal: Appender,
    /// The sequence number of the last logged batch.
    seq: u64,
    last_checkpoint: Instant,
    /// When the last durable checkpoint ended.
    last_sync: Instant,
    /// Set when a batch was logged but its commit failed, a log append failed, or a
    /// checkpoint failed: memory, the log and redb may disagree, so no further write
    /// is accepted until a restart replays the log.
    poisoned: bool,
    checkpointer: Checkpointer,
    wake: mpsc::WeakSender<Pending>,
    /// The task that sends a batch's events and answers on the runtime the store
    /// was opened in (see `answer`). `None` outside a multi-threaded runtime.
    answers: Option<Answerer>,
    /// Writes acknowledged but not yet in redb (see overlay.rs); `None` when redb
    /// holds everything.
    overlay: Option<Arc<Overlay>>,
    /// Barrier operations held back, in order, and since when (see `run`).
    deferred: Vec<Pending>,
    deferred_since: Option<Instant>,
}

/// A held-back barrier runs once no checkpoint runs and the overlay it must apply
/// first is at most this big (about 20 ms of puts at 25,000 per second)...
const BARRIER_OVERLAY_BYTES: usize = 512 * 1024;
/// ... or, under a load that keeps it bigger, once it has waited this long.
const BARRIER_MAX_WAIT: Duration = Duration::from_secs(1);

/// Puts the calling thread (the checkpoint's or the merge's) at the lowest
/// priority: Linux's `SCHED_IDLE`, or nice 19 where that is refused.
///
/// Their work is background work (a checkpoint only has to keep up on average; the
/// overlay holds what it has not applied yet), and on a small machine it competed
/// for the cores with the threads every write waits for: the request workers, the
/// writer and the log. At the lowest priority it runs on what they leave; if they
/// leave nothing, the overlay reaches `checkpoint_bytes` and the writer waits for
/// the checkpoint, which then has the cores. Nice 19 still let a checkpoint keep a
/// core for a while when one of those threads woke; a `SCHED_IDLE` thread gives
/// the core up at once, and durable puts ran about 10 % faster (put-path.md,
/// step 5). Both belong to the thread on Linux, and lowering one's own needs no
/// privilege.
fn lower_priority() {
    // SAFETY: setpriority only reads its arguments; `who` = 0 is the calling thread.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "lowering a background thread's priority failed");
    }
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: reads `param` only; pid 0 is the calling thread.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "SCHED_IDLE refused; the thread stays at nice 19");
        }
    }
}

/// What the checkpoint thread makes durable.
struct CheckpointJob {
    /// Changes to apply to redb first (the overlay's frozen layer).
    changes: Option<Layer>,
    /// The writer's counters as of those changes.
    revision: Revision,
    next_lease: LeaseId,
    seq: u64,
    /// Whether the commit is durable (fsynced); the log keeps every batch until one is.
    durable: bool,
    wake: mpsc::WeakSender<Pending>,
}

/// The thread that applies overlays to redb and makes checkpoints durable while the
/// writer goes on.
struct Checkpointer {
    jobs: Option<std::sync::mpsc::Sender<CheckpointJob>>,
    done: std::sync::mpsc::Receiver<Result<()>>,
    /// The sequence number of the running checkpoint, if one runs, and whether it
    /// is durable.
    running: Option<(u64, bool)>,
    thread: Option<std::thread::JoinHandle<()>>,
    merger: Merger,
}

impl Checkpointer {
    /// Starts the thread. While nothing runs and `shared.unsettled` is set, it wakes
    /// the writer every `interval` (at least once a second), so acknowledged writes
    /// reach redb without a further write and held-back barriers get their turn.
    fn spawn(
        shared: Arc<Shared>,
        interval: Duration,
        wake: mpsc::WeakSender<Pending>,
    ) -> Result<Checkpointer> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<CheckpointJob>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let wake_writer = move || {
            // A full queue means the writer is busy and will look by itself.
            if let Some(queue) = wake.upgrade() {
                let (reply, _) = oneshot::channel();
                let _ = queue.try_send(Pending {
                    op: Op::Wake,
                    reply,
                });
            }
        };
        // At least every second, so that a barrier held back behind a big overlay
        // gets its turn (see `BARRIER_MAX_WAIT`) under a long checkpoint interval.
        let idle = interval.clamp(Duration::from_millis(10), BARRIER_MAX_WAIT);
        let merger = Merger::spawn(shared.clone())?;
        let poke = merger.poker();
        let thread = std::thread::Builder::new()
            .name("amphora-checkpoint".into())
            .spawn(move || {
                lower_priority();
                let merger = poke;
                loop {
                    match job_rx.recv_timeout(idle) {
                        Ok(job) => {
                            let result = commit_checkpoint(&shared, &job);
                            drop(job.wake);
                            if done_tx.send(result).is_err() {
                                break;
                            }
                            wake_writer();
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            if shared.unsettled.load(Ordering::Acquire) {
                                wake_writer();
                            }
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    merger.poke();
                }
            })
            .map_err(|e| StoreError::Io(format!("starting the checkpoint thread: {e}")))?;
        Ok(Checkpointer {
            jobs: Some(jobs),
            done,
            running: None,
            thread: Some(thread),
            merger,
        })
    }

    fn start(&mut self, job: CheckpointJob) -> Result<()> {
        let seq = (job.seq, job.durable);
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(|| StoreError::Unavailable("the checkpoint thread is gone".into()))?;
        self.running = Some(seq);
        Ok(())
    }

    /// Ends the thread (it holds the database open), then the merge thread.
    fn stop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.merger.stop();
    }
}

/// Applies a job's changes in one redb commit. A durable job makes every committed
/// batch durable in the B-tree: redb's default durability, which writes every
/// buffered page and fsyncs (paced, see paced.rs). Otherwise the commit only makes
/// the changes redb's: readers see them, the log still holds them.
fn commit_checkpoint(shared: &Shared, job: &CheckpointJob) -> Result<()> {
    let mut runs = shared.runs.begin();
    let mut txn = shared.db.begin_write().map_err(backend)?;
    if !job.durable {
        txn.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    }
    if let Some(changes) = &job.changes {
        apply_layer(&txn, &mut runs, &crate::overlay::read(changes))?;
    }
    write_meta(&txn, job.revision, job.next_lease, job.seq, None)?;
    if job.durable {
        runs.sync()?;
    }
    txn.commit().map_err(backend)?;
    runs.committed(job.durable);
    Ok(())
}

/// Applies an overlay layer's changes in `txn`: its `kv` changes as a new run, the
/// rest to redb's tables.
fn apply_layer(
    txn: &redb::WriteTransaction,
    runs: &mut RunsChange,
    changes: &crate::overlay::Changes,
) -> Result<()> {
    RedbTables::open(txn, runs.set().clone())?.apply(changes)?;
    runs.add(txn, crate::kvruns::changes(&changes.kv))?;
    crate::kvruns::add_entries(txn, changes.entries)
}

/// Moves a `kv` table written before runs held it (this store's format until
/// 2026-12-07) into one run, in the transaction that opens the store.
fn migrate_kv(txn: &redb::WriteTransaction, runs: &mut RunsChange) -> Result<()> {
    let mut tables = txn.list_tables().map_err(backend)?;
    if !tables.any(|t| t.name() == KV.name()) {
        return Ok(());
    }
    let count = {
        let kv = txn.open_table(KV).map_err(backend)?;
        let count = kv.len().map_err(backend)?;
        if count > 0 {
            let rows = kv.iter().map_err(backend)?.map(|row| {
                let (k, v) = row.map_err(backend)?;
                Ok((k.value().to_vec(), Some(v.value().to_vec())))
            });
            runs.add(txn, rows)?;
            tracing::info!(entries = count, "moved the kv table into a run");
        }
        count
    };
    txn.delete_table(KV).map_err(backend)?;
    crate::kvruns::add_entries(txn, count as i64)
}

/// The thread that merges runs, apart from the checkpoint thread: a merge of large
/// runs takes seconds, and checkpoints that waited for it let the overlay grow
/// (to tens of MiB of memory under a heavy load).
struct Merger {
    poke: Poke,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Asks the merge thread to look for a merge (after a checkpoint added a run).
#[derive(Clone)]
struct Poke(std::sync::mpsc::SyncSender<()>);

impl Poke {
    fn poke(&self) {
        // A full channel: the thread will look anyway.
        let _ = self.0.try_send(());
    }
}

impl Merger {
    /// Starts the thread. It runs every merge the policy asks for, one at a time,
    /// when poked and at least once a second; at the lowest priority, like the
    /// checkpoint thread. After a failed merge it waits 1 s, doubling up to a
    /// minute while they go on failing.
    fn spawn(shared: Arc<Shared>) -> Result<Merger> {
        let (poke, poked) = std::sync::mpsc::sync_channel::<()>(1);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("amphora-merge".into())
            .spawn(move || {
                lower_priority();
                let mut pause = Duration::ZERO;
                let mut not_before = Instant::now();
                while !stopped.load(Ordering::Acquire) {
                    if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                        poked.recv_timeout(Duration::from_secs(1))
                    {
                        break;
                    }
                    if Instant::now() < not_before {
                        continue;
                    }
                    while !stopped.load(Ordering::Acquire) {
                        match merge_runs(&shared, &stopped) {
                            Ok(true) => pause = Duration::ZERO,
                            Ok(false) => break,
                            Err(StoreError::Unavailable(_)) if stopped.load(Ordering::Acquire) => {
                                break;
                            }
                            Err(e) => {
                                pause = (pause * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                                not_before = Instant::now() + pause;
                                tracing::warn!(error = %e, retry_in = ?pause, "merging runs failed; the runs stay as they are");
                                break;
                            }
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Io(format!("starting the merge thread: {e}")))?;
        Ok(Merger {
            poke: Poke(poke),
            stop,
            thread: Some(thread),
        })
    }

    fn poker(&self) -> Poke {
        self.poke.clone()
    }

    /// Ends the thread; a merge it is running stops writing within a few thousand
    /// entries, and its file is deleted.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.poke.poke();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Merger {
    /// A store dropped without `close` (a failed open, a panicked writer) must not
    /// leave the thread running: it holds the database open.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the merge of runs the policy asks for, if it asks for one; answers whether
/// it did.
fn merge_runs(shared: &Shared, stop: &std::sync::atomic::AtomicBool) -> Result<bool> {
    let set = shared.runs.snapshot();
    let Some(range) = set.next_merge(crate::kvruns::FANOUT) else {
        return Ok(false);
    };
    let inputs = set.members()[range].to_vec();
    let (file, path) = shared.runs.allocate();
    let merged = merge_into(shared, &set, &inputs, file, &path, stop);
    if merged.is_err() {
        // Named nowhere: the file of a failed or stopped merge goes now (a full
        // disk would otherwise keep what each attempt wrote until the next open).
        let _ = std::fs::remove_file(&path);
    }
    merged.map(|()| true)
}

/// Writes the merge of `inputs` to `path`, fsyncs it and names it in the manifest
/// in their place.
fn merge_into(
    shared: &Shared,
    set: &crate::run::RunSet,
    inputs: &[Arc<crate::run::Member>],
    file: u64,
    path: &Path,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let output = set.merge(inputs, file, path, false, stop)?;
    // Written back and fsynced here, in the background: left to the next durable
    // checkpoint, the whole store's worth of a large merge held the checkpoint thread
    // for seconds, and the overlay grew meanwhile (by tens of MiB under load).
    // Given up when the store closes meanwhile, like the merge itself.
    output.run.sync_unless(stop)?;
    let mut runs = shared.runs.begin();
    let mut txn = shared.db.begin_write().map_err(backend)?;
    txn.set_durability(redb::Durability::None)
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    runs.replace(&txn, inputs, output)?;
    txn.commit().map_err(backend)?;
    runs.committed(false);
    Ok(())
}

fn write_meta(
    txn: &redb::WriteTransaction,
    revision: Revision,
    next_lease: LeaseId,
    seq: u64,
    compacted: Option<Revision>,
) -> Result<()> {
    let mut meta = txn.open_table(META).map_err(backend)?;
    meta.insert("revision", revision).map_err(backend)?;
    meta.insert("next_lease", next_lease).map_err(backend)?;
    if let Some(c) = compacted {
        meta.insert("compacted", c).map_err(backend)?;
    }
    meta.insert("batch_seq", seq).map_err(backend)?;
    Ok(())
}

/// Tables of the current write transaction, with `kv` read through to the runs
/// and its changes kept for one run at commit.
struct RedbTables<'t> {
    kv: KvWrite,
    history: redb::Table<'t, u64, &'static [u8]>,
    /// Events recorded since the last [`Self::flush_history`].
    events: history::ChunkBuilder,
    graves: redb::Table<'t, &'static [u8], u64>,
    leases: redb::Table<'t, u64, (u64, u64)>,
    lease_expiry: redb::Table<'t, (u64, u64), ()>,
    lease_keys: redb::Table<'t, (u64, &'static [u8]), ()>,
}

impl<'t> RedbTables<'t> {
    fn open(txn: &'t redb::WriteTransaction, runs: Arc<crate::run::RunSet>) -> Result<Self> {
        Ok(RedbTables {
            kv: KvWrite::new(runs),
            history: txn.open_table(HISTORY).map_err(backend)?,
            events: history::ChunkBuilder::default(),
            graves: txn.open_table(GRAVES).map_err(backend)?,
            leases: txn.open_table(LEASES).map_err(backend)?,
            lease_expiry: txn.open_table(LEASE_EXPIRY).map_err(backend)?,
            lease_keys: txn.open_table(LEASE_KEYS).map_err(backend)?,
        })
    }

    /// Applies an overlay's changes but those of `kv` (see `apply_layer`).
    fn apply(&mut self, changes: &crate::overlay::Changes) -> Result<()> {
        history::append(
            &mut self.history,
            changes.log.iter().map(|(r, e)| (*r, e.as_slice())),
        )?;
        for (key, grave) in &changes.graves {
            match grave {
                Some(r) => self.graves.insert(key.as_slice(), r).map(|_| ()),
                None => self.graves.remove(key.as_slice()).map(|_| ()),
            }
            .map_err(backend)?;
        }
        for (id, record) in &changes.leases {
            self.leases.insert(id, record).map_err(backend)?;
        }
        for (at_id, present) in &changes.lease_expiry {
            match present {
                true => self.lease_expiry.insert(at_id, ()).map(|_| ()),
                false => self.lease_expiry.remove(at_id).map(|_| ()),
            }
            .map_err(backend)?;
        }
        for (lease, key, attach) in &changes.lease_keys {
            self.lease_key(*lease, key, *attach)?;
        }
        Ok(())
    }

    /// Writes the events recorded through [`Tables::log_insert`] to the history,
    /// as chunks. Before the transaction commits, and before the history is read.
    fn flush_history(&mut self) -> Result<()> {
        self.events.write(&mut self.history)
    }
}

impl Tables for RedbTables<'_> {
    fn kv_with<R>(&self, key: &[u8], f: impl FnOnce(Stored<'_>) -> R) -> Result<Option<R>> {
        self.kv
            .with(key, |record| Stored::decode(record).map(f))?
            .transpose()
    }

    fn kv_insert(&mut self, key: &[u8], record: Vec<u8>, existed: bool) -> Result<()> {
        self.kv.insert(key, record, existed);
        Ok(())
    }

    fn kv_remove(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.kv.remove(key)? {
            Some(record) => Ok(Some(Stored::decode(&record)?.value.to_vec())),
            None => Ok(None),
        }
    }

    fn log_insert(&mut self, revision: Revision, event: Vec<u8>) -> Result<()> {
        self.events.push(revision, &event);
        Ok(())
    }

    fn grave_insert(&mut self, key: &[u8], revision: Revision) -> Result<()> {
        self.graves.insert(key, revision).map_err(backend)?;
        Ok(())
    }

    fn grave_remove(&mut self, key: &[u8]) -> Result<Option<Revision>> {
        Ok(self.graves.remove(key).map_err(backend)?.map(|g| g.value()))
    }

    fn lease_live(&self, id: LeaseId, now: u64) -> Result<Option<Lease>> {
        lease_live(&self.leases, id, now)
    }

    fn lease_put(&mut self, lease: &Lease, was_expiring: Option<u64>) -> Result<()> {
        if let Some(at) = was_expiring {
            self.lease_expiry.remove((at, lease.id)).map_err(backend)?;
        }
        self.lease_expiry
            .insert((lease.expires_at_ms, lease.id), ())
            .map_err(backend)?;
        self.leases
            .insert(
                lease.id,
                (lease.ttl.as_millis() as u64, lease.expires_at_ms),
            )
            .map_err(backend)?;
        Ok(())
    }

    fn lease_key(&mut self, lease: LeaseId, key: &[u8], attach: bool) -> Result<()> {
        if attach {
            self.lease_keys.insert((lease, key), ()).map_err(backend)?;
        } else {
            self.lease_keys.remove((lease, key)).map_err(backend)?;
        }
        Ok(())
    }
}

/// A write's answer, and where it goes.
type Reply = (oneshot::Sender<Result<Outcome>>, Result<Outcome>);

/// A published batch's events and answers.
struct Answered {
    feed: Option<broadcast::Sender<Event>>,
    events: Vec<Event>,
    replies: Vec<Reply>,
}

impl Answered {
    fn send(self) {
        if let Some(feed) = self.feed {
            for event in self.events {
                let _ = feed.send(event);
            }
        }
        for (reply, outcome) in self.replies {
            let _ = reply.send(outcome);
        }
    }
}

/// One task on the runtime that sends each published batch's events to the
/// change feed and then its answers, batch after batch. From the writer thread,
/// each answer would wake its task through the runtime's shared queue and, often,
/// wake a parked worker thread: a lock and a context switch per write; so would
/// the feed's first event of a batch, waking the watch dispatcher (9 % of the
/// writer's time in a profile of puts). Inside a task those wakes are pushes on
/// the worker's own queue, and the writer wakes the one task at most once per
/// batch. One task keeps the feed in revision order.
struct Answerer {
    queue: tokio::sync::mpsc::UnboundedSender<Answered>,
}

impl Answerer {
    /// Spawns the task on the current runtime if it is a multi-threaded one: on a
    /// current-thread runtime the task would only run when the thread that blocks
    /// on the store's answer lets it.
    fn spawn() -> Option<Answerer> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        if matches!(
            runtime.runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        ) {
            return None;
        }
        let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<Answered>();
        runtime.spawn(async move {
            while let Some(answered) = rx.recv().await {
                answered.send();
            }
        });
        Some(Answerer { queue })
    }

    /// Hands a batch to the task, or, if the runtime is gone, sends it from here.
    fn send(&self, answered: Answered) {
        if let Err(tokio::sync::mpsc::error::SendError(answered)) = self.queue.send(answered) {
            answered.send();
        }
    }
}

/// Where a decided batch waits for its log record to be durable.
#[allow(
    clippy::large_enum_variant,
    reason = "one lives on the writer's stack per batch, and is moved once"
)]
enum Staged<'o> {
    Redb(Box<redb::WriteTransaction>, RunsChange<'o>),
    Overlay(
        &'o Overlay,
        crate::overlay::Changes,
        Vec<crate::cache::Admitted>,
    ),
}

/// Puts, deletes, lease grants and keep-alives are decided against an overlay;
/// anything else waits for the checkpoint (see overlay.rs).
fn overlay_can_take(op: &Op) -> bool {
    matches!(
        op,
        Op::Put(_) | Op::Delete(..) | Op::Grant(_) | Op::KeepAlive(_) | Op::Shutdown
    )
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        let mut stopping = false;
        while !stopping {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut batch = vec![first];
            while batch.len() < self.options.max_batch {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            batch.retain(|p| !matches!(p.op, Op::Wake));
            self.settle_checkpoint(false);
            if let Some(pos) = batch.iter().position(|p| matches!(p.op, Op::Shutdown)) {
                // Later operations in this batch were sent after close began: refuse them.
                stopping = true;
                for late in batch.drain(pos + 1..) {
                    let _ = late
                        .reply
                        .send(Err(StoreError::Unavailable("the store is closing".into())));
                }
            }
            if stopping || self.barriers_may_run() {
                // Deferred barriers first: they came before this batch.
                if !self.deferred.is_empty() {
                    batch.splice(0..0, std::mem::take(&mut self.deferred));
                    self.deferred_since = None;
                }
            } else if batch.iter().any(|p| !overlay_can_take(&p.op)) {
                // A barrier waits for the running checkpoint (a durable one writes back
                // tens of MiB: hundreds of milliseconds) and then applies the overlay
                // itself, and every write in its batch and after it waits too. Held
                // back, it runs once no checkpoint runs and the overlay is small (the
                // checkpoint thread wakes this one after each checkpoint), while
                // writes go on against the overlay.
                let (barriers, rest) = batch.into_iter().partition(|p| !overlay_can_take(&p.op));
                batch = rest;
                for barrier in barriers {
                    self.shared
                        .deferred_barriers
                        .fetch_add(1, Ordering::Relaxed);
                    self.deferred.push(barrier);
                }
                self.deferred_since.get_or_insert_with(Instant::now);
            }
            if !batch.is_empty() {
                self.commit_batch(batch);
            }
            self.maybe_checkpoint();
        }
        if !self.deferred.is_empty() {
            // Every sender is gone: what waits still gets decided and answered.
            let deferred = std::mem::take(&mut self.deferred);
            self.commit_batch(deferred);
        }
        // The checkpoint and merge threads stop first (after the merge one may be
        // running), so that the final durable checkpoint holds everything they did.
        let flushed = self.flush();
        self.checkpointer.stop();
        if let Err(e) = flushed.and_then(|()| self.checkpoint()) {
            tracing::error!(error = %e, "final checkpoint failed; the write-ahead log keeps every write");
        }
        rx.close();
        while let Ok(late) = rx.try_recv() {
            let _ = late
                .reply
                .send(Err(StoreError::Unavailable("the store is closed".into())));
        }
    }

    /// Whether held-back barriers may run now (see `run`).
    fn barriers_may_run(&self) -> bool {
        self.checkpointer.running.is_none()
            && (self
                .overlay
                .as_ref()
                .is_none_or(|o| o.bytes() <= BARRIER_OVERLAY_BYTES)
                || self
                    .deferred_since
                    .is_some_and(|since| since.elapsed() >= BARRIER_MAX_WAIT))
    }

    fn commit_batch(&mut self, batch: Vec<Pending>) {
        let started = Instant::now();
        if self
            .overlay
            .as_ref()
            .is_some_and(|o| o.bytes() as u64 >= self.options.checkpoint_bytes)
        {
            // The overlay's memory is bounded: past `checkpoint_bytes`, wait for the
            // running checkpoint and hand the overlay to the next one. Before this
            // batch takes its sequence number: a checkpoint claims every batch up to
            // `seq` (a durable one lets the log go of them), and this one is not in
            // the overlay yet.
            self.settle_checkpoint(true);
            self.maybe_checkpoint();
        }
        let before = (self.revision, self.next_lease);
        let mut events = Vec::new();
        let ops: Vec<&Op> = batch.iter().map(|p| &p.op).collect();
        let applied = if self.poisoned {
            Err(StoreError::Unavailable(
                "the store failed after logging a batch; restart to recover from the write-ahead log".into(),
            ))
        } else {
            self.seq += 1;
            let payload = encode_ops(&ops);
            let applied = self.apply(&ops, now_ms(), &mut events, Some(payload));
            if applied.is_err() && !self.poisoned {
                self.seq -= 1;
            }
            applied
        };
        let size = batch.len();
        match applied {
            Ok((outcomes, compacted)) => {
                self.shared
                    .committed
                    .store(self.revision, Ordering::Release);
                if let Some(c) = compacted {
                    self.shared.compacted.store(c, Ordering::Release);
                }
                let replies = batch.into_iter().map(|p| p.reply).zip(outcomes).collect();
                self.answer(replies, events);
            }
            Err(e) => {
                tracing::error!(error = %e, batch = size, "group commit failed; every write in it is refused");
                (self.revision, self.next_lease) = before;
                self.answer(
                    batch
                        .into_iter()
                        .map(|p| (p.reply, Err(e.clone())))
                        .collect(),
                    Vec::new(),
                );
            }
        }
        if let Some(observer) = &self.options.on_commit {
            observer(CommitInfo {
                batch_size: size,
                duration: started.elapsed(),
            });
        }
    }

    /// Sends a batch's events to the change feed, then its answers, in the
    /// answering task if there is one (see [`Answerer`]), else from this thread.
    fn answer(&self, replies: Vec<Reply>, events: Vec<Event>) {
        let feed = (!events.is_empty() && self.shared.events.receiver_count() > 0)
            .then(|| self.shared.events.clone());
        let answered = Answered {
            feed,
            events,
            replies,
        };
        match &self.answers {
            Some(answers) => answers.send(answered),
            None => answered.send(),
        }
    }

    /// Starts a checkpoint if one is due and none runs: a durable one when the log
    /// has waited `sync_interval` for one (or grew to `checkpoint_bytes`), else one
    /// that only applies the overlay, every `checkpoint_interval`.
    fn maybe_checkpoint(&mut self) {
        let pending = self.overlay.as_ref().map(|o| o.bytes() as u64);
        let logged = self.wal.len() > 0;
        let sync = logged
            && (self.wal.len() >= self.options.checkpoint_bytes
                || self.last_sync.elapsed() >= self.options.sync_interval);
        let due = sync
            || pending.is_some_and(|bytes| {
                bytes >= self.options.checkpoint_bytes
                    || self.last_checkpoint.elapsed() >= self.options.checkpoint_interval
            });
        if due
            && self.checkpointer.running.is_none()
            && !self.poisoned
            && let Err(e) = self.start_checkpoint(sync)
        {
            tracing::error!(error = %e, "starting a checkpoint failed; the write-ahead log keeps every write");
        }
        self.shared.unsettled.store(
            self.overlay.is_some() || self.wal.len() > 0,
            Ordering::Release,
        );
    }

    /// Hands the overlay's changes to the checkpoint thread, which applies them to
    /// redb (and, if `durable`, makes everything durable: the log's active file is
    /// switched first, so that the one it empties afterwards holds nothing newer);
    /// batches from now on go to a new layer.
    fn start_checkpoint(&mut self, durable: bool) -> Result<()> {
        if durable {
            self.wal
                .switch()
                .map_err(|e| StoreError::Io(format!("switching the write-ahead log: {e}")))?;
        }
        let frozen = self.overlay.as_ref().map(|o| o.current.clone());
        if let Some(old) = &self.overlay {
            let overlay = Arc::new(Overlay::new(
                old.base().clone(),
                frozen.clone(),
                Layer::default(),
            ));
            self.shared.publish(Some(overlay.clone()));
            self.overlay = Some(overlay);
        }
        let started = self.checkpointer.start(CheckpointJob {
            changes: frozen,
            revision: self.revision,
            next_lease: self.next_lease,
            seq: self.seq,
            durable,
            wake: self.wake.clone(),
        });
        if started.is_err() {
            // The frozen layer is in no checkpoint, and the next one would freeze the
            // layer after it: stop writes (the log holds them all for a restart).
            self.poisoned = true;
        }
        started
    }

    /// If a checkpoint runs and is done (or, with `wait`, once it is): lets the log
    /// go of what it made durable and rebases the overlay on redb as it now is.
    fn settle_checkpoint(&mut self, wait: bool) {
        let Some((seq, durable)) = self.checkpointer.running else {
            return;
        };
        let done = if wait {
            self.checkpointer.done.recv().ok()
        } else {
            match self.checkpointer.done.try_recv() {
                Ok(result) => Some(result),
                Err(std::sync::mpsc::TryRecvError::Empty) => return,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
            }
        };
        self.checkpointer.running = None;
        let result = match done {
            Some(result) => result,
            None => Err(StoreError::Unavailable(
                "the checkpoint thread is gone".into(),
            )),
        };
        let rebased = result.and_then(|()| {
            self.shared.checkpoints.fetch_add(1, Ordering::Relaxed);
            self.last_checkpoint = Instant::now();
            if durable {
                self.shared.syncs.fetch_add(1, Ordering::Relaxed);
                self.last_sync = self.last_checkpoint;
                if let Err(e) = self.wal.release(seq) {
                    tracing::warn!(error = %e, "the write-ahead log could not be emptied");
                }
            }
            // Kept until its successor exists: if the rebase fails, the writer still
            // knows every acknowledged write (and stops taking new ones).
            let Some(old) = self.overlay.clone() else {
                return Ok(());
            };
            if crate::overlay::read(&old.current).is_empty() {
                self.shared.publish(None);
                self.overlay = None;
                return Ok(());
            }
            // Readers that still hold the old overlay see the same state: the frozen
            // layer is in redb now.
            let overlay = Arc::new(Overlay::new(self.base()?, None, old.current.clone()));
            self.shared.publish(Some(overlay.clone()));
            self.overlay = Some(overlay);
            Ok(())
        });
        if let Err(e) = rebased {
            // The published overlay stays as it is for readers; writes stop.
            tracing::error!(error = %e, "checkpoint failed; restart to recover from the write-ahead log");
            self.poisoned = true;
        }
    }

    /// Puts every acknowledged write in redb (waiting for a running checkpoint) and
    /// retires the overlay, so the writer can use a redb write transaction.
    fn flush(&mut self) -> Result<()> {
        self.settle_checkpoint(true);
        if self.poisoned {
            return Err(StoreError::Unavailable(
                "the store failed; restart to recover from the write-ahead log".into(),
            ));
        }
        let Some(overlay) = self.overlay.clone() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let mut runs = shared.runs.begin();
        let mut txn = shared.db.begin_write().map_err(backend)?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        apply_layer(&txn, &mut runs, &crate::overlay::read(&overlay.current))?;
        write_meta(&txn, self.revision, self.next_lease, self.seq, None)?;
        if let Err(e) = txn.commit() {
            self.poisoned = true;
            return Err(backend(e));
        }
        runs.committed(false);
        self.shared.publish(None);
        self.overlay = None;
        Ok(())
    }

    /// The base of a new overlay: redb and the runs as the writer's last commit
    /// left them.
    fn base(&self) -> Result<Arc<Base>> {
        let txn = self.shared.db.begin_read().map_err(backend)?;
        Base::open(&txn, self.shared.runs.snapshot())
    }

    /// Makes every committed batch durable in the B-tree, then empties the log, here
    /// and now (at open and at close, after a flush).
    fn checkpoint(&mut self) -> Result<()> {
        self.wal
            .switch()
            .map_err(|e| StoreError::Io(format!("switching the write-ahead log: {e}")))?;
        commit_checkpoint(
            &self.shared,
            &CheckpointJob {
                changes: None,
                revision: self.revision,
                next_lease: self.next_lease,
                seq: self.seq,
                durable: true,
                wake: self.wake.clone(),
            },
        )?;
        self.shared.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        self.wal
            .release_now(self.seq)
            .map_err(|e| StoreError::Io(format!("emptying the write-ahead log: {e}")))?;
        self.last_checkpoint = Instant::now();
        self.last_sync = self.last_checkpoint;
        Ok(())
    }

    /// Re-applies the batches logged after the last durable checkpoint, then makes a durable one.
    fn replay(&mut self, records: Vec<crate::wal::Record>) -> Result<()> {
        let mut replayed = 0;
        for record in records {
            if record.seq <= self.seq {
                continue;
            }
            let ops = decode_ops(&record.payload)?;
            let refs: Vec<&Op> = ops.iter().collect();
            self.seq = record.seq;
            let (_, compacted) = self.apply(&refs, record.now_ms, &mut Vec::new(), None)?;
            if let Some(c) = compacted {
                self.shared.compacted.store(c, Ordering::Release);
            }
            replayed += 1;
            // Replayed puts go to the overlay, as they did when they were logged;
            // it is bounded the same way.
            if self
                .overlay
                .as_ref()
                .is_some_and(|o| o.bytes() as u64 >= self.options.checkpoint_bytes)
            {
                self.flush()?;
            }
        }
        self.flush()?;
        self.checkpoint()?;
        self.shared
            .committed
            .store(self.revision, Ordering::Release);
        if replayed > 0 {
            tracing::info!(
                batches = replayed,
                revision = self.revision,
                "replayed the write-ahead log"
            );
        }
        Ok(())
    }

    /// Decides a batch against the overlay (puts and deletes) or a redb write
    /// transaction (anything else, after a flush; and replay), waits for its log
    /// record, and publishes it. The outer error fails the whole batch (nothing was
    /// published); inner errors belong to single operations that changed nothing.
    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        batch: &[&Op],
        now: u64,
        events: &mut Vec<Event>,
        log: Option<Vec<u8>>,
    ) -> Result<(Vec<Result<Outcome>>, Option<Revision>)> {
        let logged = log.is_some();
        // Replayed batches too: a replay through redb would write a run per batch.
        let overlay = if batch.iter().all(|op| overlay_can_take(op)) {
            Some(self.open_overlay()?)
        } else {
            self.flush()?;
            if logged {
                self.shared.barrier_batches.fetch_add(1, Ordering::Relaxed);
            }
            None
        };
        let shared = self.shared.clone();
        let txn = match &overlay {
            Some(_) => None,
            None => {
                // The runs first: see `Runs::begin`.
                let runs = shared.runs.begin();
                let mut txn = shared.db.begin_write().map_err(backend)?;
                txn.set_durability(redb::Durability::None)
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                Some((txn, runs))
            }
        };
        // The log append and its fsync run on the log's thread while this one decides
        // the batch: the two costs overlap instead of adding up.
        if let Some(payload) = log {
            self.wal.start(self.seq, now, payload);
        }
        let first_event = events.len();
        let applied = match (txn, &overlay) {
            (Some((txn, mut runs)), _) => {
                self.apply_ops(&txn, &mut runs, batch, now, events)
                    .map(|(outcomes, compacted)| {
                        (outcomes, compacted, Staged::Redb(Box::new(txn), runs))
                    })
            }
            (None, Some(overlay)) => {
                let mut t = OverlayTables::new(overlay, &shared.cache);
                self.run_ops(&mut t, batch, now, events, |_, _, _, _| {
                    Err(StoreError::Unavailable(
                        "a barrier operation reached the overlay".into(),
                    ))
                })
                .map(|outcomes| {
                    let (changes, admitted) = t.finish();
                    (outcomes, None, Staged::Overlay(overlay, changes, admitted))
                })
            }
            (None, None) => unreachable!("a transaction is opened when there is no overlay"),
        };
        if logged {
            match (&applied, self.wal.finish()) {
                (_, Err(e)) => {
                    // The record may be in the file whole (a failed `fdatasync` leaves
                    // it in the page cache, and perhaps on the disk), and a restart
                    // replays whatever of it is intact: the batch's outcome is unknown.
                    // Its sequence number is spent, and no later batch may be logged:
                    // one logged after it could be read back behind it, or lose to it
                    // (as PostgreSQL does, a failed log write stops the writes).
                    self.poisoned = true;
                    return Err(StoreError::Io(format!(
                        "writing the write-ahead log failed ({e}): this batch may or may not take effect when a restart replays the log, and writes are refused until then"
                    )));
                }
                (Err(_), Ok(())) => {
                    // Logged but not applied: memory and log disagree until a restart
                    // replays the log.
                    self.poisoned = true;
                }
                _ => {}
            }
        }
        let (outcomes, compacted, staged) = applied?;
        // The entry cache's shards of the changed keys are in flux during the
        // publication, and the keys are dropped after it (see cache.rs). The batch is durable in the log before anyone can see it.
        // Entries the batch wrote under keys written before are cached as it settles
        // (see `OverlayTables`).
        let changed = || events[first_event..].iter().map(|e| e.key.as_slice());
        let flux = self.shared.cache.invalidate(changed());
        let (published, admitted) = match staged {
            Staged::Redb(txn, runs) => (
                txn.commit()
                    .map_err(backend)
                    .map(|()| runs.committed(false)),
                Vec::new(),
            ),
            Staged::Overlay(overlay, changes, admitted) => {
                let bytes = overlay.merge(changes) as u64;
                self.shared.overlay_batches.fetch_add(1, Ordering::Relaxed);
                self.shared.overlay_peak.fetch_max(bytes, Ordering::Relaxed);
                (Ok(()), admitted)
            }
        };
        self.shared.cache.settle(flux, changed(), admitted);
        if let Err(e) = published {
            self.poisoned = logged;
            return Err(e);
        }
        Ok((outcomes, compacted))
    }

    /// The overlay to decide the next batch against, published first if there was
    /// none (its base is redb as it is: the writer has committed everything).
    fn open_overlay(&mut self) -> Result<Arc<Overlay>> {
        if let Some(overlay) = &self.overlay {
            return Ok(overlay.clone());
        }
        let overlay = Arc::new(Overlay::new(self.base()?, None, Layer::default()));
        self.shared.publish(Some(overlay.clone()));
        self.overlay = Some(overlay.clone());
        Ok(overlay)
    }

    /// Decides `batch`'s puts and deletes against `t`; `other` runs the rest.
    fn run_ops<T: Tables>(
        &mut self,
        t: &mut T,
        batch: &[&Op],
        now: u64,
        events: &mut Vec<Event>,
        mut other: impl FnMut(&mut Self, &mut T, &Op, &mut Vec<Event>) -> Result<Outcome>,
    ) -> Result<Vec<Result<Outcome>>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for op in batch {
            let outcome = match op {
                Op::Put(put) => self.put(t, put, now, events).map(Outcome::Put),
                Op::Delete(key, cond) => self
                    .delete(t, key, *cond, now, events)
                    .map(Outcome::Deleted),
                Op::Grant(ttl) => self.grant(t, *ttl, now).map(Outcome::Lease),
                Op::KeepAlive(id) => Self::keep_alive(t, *id, now).map(Outcome::Lease),
                Op::Shutdown | Op::Wake => Ok(Outcome::Done),
                other_op => other(self, t, other_op, events),
            };
            match outcome {
                Err(
                    e @ (StoreError::Io(_) | StoreError::Corrupted(_) | StoreError::Unavailable(_)),
                ) => return Err(e),
                other => outcomes.push(other),
            }
        }
        Ok(outcomes)
    }

    #[allow(clippy::type_complexity)]
    fn apply_ops(
        &mut self,
        txn: &redb::WriteTransaction,
        runs: &mut RunsChange,
        batch: &[&Op],
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<(Vec<Result<Outcome>>, Option<Revision>)> {
        let mut compacted = None;
        let outcomes = {
            let mut t = RedbTables::open(txn, runs.set().clone())?;
            let outcomes =
                self.run_ops(&mut t, batch, now, events, |w, t, op, events| match op {
                    Op::Revoke(id) => w.revoke(t, *id, now, events).map(|_| Outcome::Done),
                    Op::Sweep => w.sweep(t, now, events).map(Outcome::Count),
                    Op::Compact(before) => w.compact(t, *before).map(|(n, c)| {
                        compacted = c.or(compacted);
                        Outcome::Count(n)
                    }),
                    Op::Put(_)
                    | Op::Delete(..)
                    | Op::Grant(_)
                    | Op::KeepAlive(_)
                    | Op::Shutdown
                    | Op::Wake => {
                        unreachable!("run_ops decides these")
                    }
                })?;
            t.flush_history()?;
            runs.add(txn, crate::kvruns::changes(&t.kv.pending))?;
            crate::kvruns::add_entries(txn, t.kv.entries)?;
            outcomes
        };
        write_meta(txn, self.revision, self.next_lease, self.seq, compacted)?;
        Ok((outcomes, compacted))
    }

    #[allow(clippy::too_many_arguments)]
    fn record<T: Tables>(
        &mut self,
        t: &mut T,
        kind: EventKind,
        key: &[u8],
        value: &[u8],
        prev: Revision,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<Revision> {
        self.revision += 1;
        let revision = self.revision;
        t.log_insert(revision, encode_event(kind, now, prev, key, value))?;
        if kind == EventKind::Delete {
            t.grave_insert(key, revision)?;
        }
        events.push(Event {
            revision,
            kind,
            key: key.to_vec(),
            value: value.to_vec(),
            at_ms: now,
        });
        Ok(revision)
    }

    /// The entry under `key` as stored (live or not) and whether it is live.
    fn current<T: Tables>(
        t: &T,
        key: &[u8],
        now: u64,
    ) -> Result<Option<(Revision, Revision, LeaseId, bool)>> {
        Ok(Self::current_with(t, key, now, |_| ())?.map(|(c, ())| c))
    }

    /// [`Self::current`], and what `inspect` makes of the stored value, from one
    /// lookup.
    #[allow(clippy::type_complexity)]
    fn current_with<T: Tables, R>(
        t: &T,
        key: &[u8],
        now: u64,
        inspect: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<((Revision, Revision, LeaseId, bool), R)>> {
        let found = t.kv_with(key, |s| ((s.create, s.modified, s.lease), inspect(s.value)))?;
        let Some(((create, modified, lease), inspected)) = found else {
            return Ok(None);
        };
        let live = lease == 0 || t.lease_live(lease, now)?.is_some();
        Ok(Some(((create, modified, lease, live), inspected)))
    }

    fn put<T: Tables>(
        &mut self,
        t: &mut T,
        put: &Put,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<PutOutcome> {
        // A guard is checked against the value found by the same lookup; its verdict
        // counts only after the condition's.
        let (current, guarded) = match Self::current_with(t, &put.key, now, |stored| {
            put.guard
                .as_ref()
                .map(|guard| Self::apply_guard(stored, put, guard))
        })? {
            Some((c, g)) => (Some(c), g),
            None => (None, None),
        };
        let live = current.filter(|c| c.3);
        let holds = match put.condition {
            Condition::None => true,
            Condition::Absent => live.is_none(),
            Condition::Exists => live.is_some(),
            Condition::Revision(r) => live.is_some_and(|c| c.1 == r),
        };
        if !holds {
            return Err(StoreError::Conflict {
                current: live.map(|c| c.1),
            });
        }
        let guarded_value;
        let value = match (&put.guard, guarded) {
            (None, _) => &put.value,
            (Some(_), Some(checked)) if live.is_some() => {
                guarded_value = checked?;
                &guarded_value
            }
            (Some(guard), _) if guard.create => &put.value,
            // Exists, since this guard requires it.
            (Some(_), _) => return Err(StoreError::Conflict { current: None }),
        };
        let lease = match put.lease {
            LeaseChoice::Keep => live.map(|c| c.2).unwrap_or(0),
            LeaseChoice::Clear => 0,
            LeaseChoice::Set(id) => {
                t.lease_live(id, now)?
                    .ok_or(StoreError::LeaseNotFound(id))?;
                id
            }
        };
        let mut prev = 0;
        if let Some((_, modified, old_lease, was_live)) = current {
            prev = modified;
            if !was_live {
                // The old incarnation expired but was not swept yet: record its end first.
                let last = Self::stored_value(t, &put.key)?;
                prev = self.record(t, EventKind::Delete, &put.key, &last, prev, now, events)?;
            }
            if old_lease != 0 && old_lease != lease {
                t.lease_key(old_lease, &put.key, false)?;
            }
        }
        if live.is_none() {
            // A new incarnation: its history goes on from the deletion of the last one.
            if let Some(grave) = t.grave_remove(&put.key)? {
                prev = grave;
            }
        }
        let revision = self.record(t, EventKind::Put, &put.key, value, prev, now, events)?;
        let create = live.map(|c| c.0).unwrap_or(revision);
        t.kv_insert(
            &put.key,
            Stored::encode(create, revision, lease, value),
            current.is_some(),
        )?;
        if lease != 0 {
            t.lease_key(lease, &put.key, true)?;
        }
        Ok(PutOutcome {
            revision,
            created: live.is_none(),
        })
    }

    fn delete<T: Tables>(
        &mut self,
        t: &mut T,
        key: &[u8],
        condition: Condition,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<Option<Revision>> {
        let live = Self::current(t, key, now)?.filter(|c| c.3);
        let holds = match condition {
            Condition::None => true,
            Condition::Absent => live.is_none(),
            Condition::Exists => live.is_some(),
            Condition::Revision(r) => live.is_some_and(|c| c.1 == r),
        };
        if !holds {
            return Err(StoreError::Conflict {
                current: live.map(|c| c.1),
            });
        }
        let Some((_, modified, lease, _)) = live else {
            return Ok(None);
        };
        self.remove_key(t, key, modified, lease, now, events)
            .map(Some)
    }

    #[allow(clippy::too_many_arguments)]
    fn remove_key<T: Tables>(
        &mut self,
        t: &mut T,
        key: &[u8],
        modified: Revision,
        lease: LeaseId,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<Revision> {
        let last = t.kv_remove(key)?.unwrap_or_default();
        if lease != 0 {
            t.lease_key(lease, key, false)?;
        }
        self.record(t, EventKind::Delete, key, &last, modified, now, events)
    }

    /// Checks `guard` against the current value and answers the value to write.
    fn apply_guard(current: &[u8], put: &Put, guard: &ValueGuard) -> Result<Vec<u8>> {
        use subtle::ConstantTimeEq as _;
        // In constant time: the checked bytes are token hashes.
        let checked = guard.offset..guard.offset.saturating_add(guard.expected.len());
        let matches = current
            .get(checked)
            .is_some_and(|bytes| bool::from(bytes.ct_eq(&guard.expected)));
        if !matches {
            return Err(StoreError::Mismatch);
        }
        let mut value = put.value.clone();
        match (
            current.get(guard.carry.clone()),
            value.get_mut(guard.carry.clone()),
        ) {
            (Some(from), Some(to)) => to.copy_from_slice(from),
            _ => return Err(StoreError::Mismatch),
        }
        Ok(value)
    }

    /// The value stored under `key`, live or not; empty when there is none.
    fn stored_value<T: Tables>(t: &T, key: &[u8]) -> Result<Vec<u8>> {
        Ok(t.kv_with(key, |s| s.value.to_vec())?.unwrap_or_default())
    }

    fn grant<T: Tables>(&mut self, t: &mut T, ttl: Duration, now: u64) -> Result<Lease> {
        let id = self.next_lease;
        self.next_lease += 1;
        let ttl_ms = (ttl.as_millis() as u64).max(1);
        let lease = Lease {
            id,
            ttl: Duration::from_millis(ttl_ms),
            expires_at_ms: now.saturating_add(ttl_ms),
        };
        t.lease_put(&lease, None)?;
        Ok(lease)
    }

    fn keep_alive<T: Tables>(t: &mut T, id: LeaseId, now: u64) -> Result<Lease> {
        let lease = t
            .lease_live(id, now)?
            .ok_or(StoreError::LeaseNotFound(id))?;
        let renewed = Lease {
            expires_at_ms: now.saturating_add(lease.ttl.as_millis() as u64),
            ..lease
        };
        t.lease_put(&renewed, Some(lease.expires_at_ms))?;
        Ok(renewed)
    }

    fn revoke(
        &mut self,
        t: &mut RedbTables,
        id: LeaseId,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let Some((_, expires_at_ms)) = t.leases.remove(id).map_err(backend)?.map(|g| g.value())
        else {
            return Err(StoreError::LeaseNotFound(id));
        };
        t.lease_expiry
            .remove((expires_at_ms, id))
            .map_err(backend)?;
        let keys: Vec<Vec<u8>> = t
            .lease_keys
            .range((id, &[][..])..(id + 1, &[][..]))
            .map_err(backend)?
            .map(|item| item.map(|(k, _)| k.value().1.to_vec()).map_err(backend))
            .collect::<Result<_>>()?;
        for key in keys {
            match Self::current(t, &key, now)? {
                Some((_, modified, lease, _)) if lease == id => {
                    self.remove_key(t, &key, modified, id, now, events)?;
                }
                _ => {
                    t.lease_keys.remove((id, key.as_slice())).map_err(backend)?;
                }
            }
        }
        Ok(())
    }

    fn sweep(&mut self, t: &mut RedbTables, now: u64, events: &mut Vec<Event>) -> Result<usize> {
        let expired: Vec<LeaseId> = t
            .lease_expiry
            .range((0u64, 0u64)..=(now, u64::MAX))
            .map_err(backend)?
            .map(|item| item.map(|(k, _)| k.value().1).map_err(backend))
            .collect::<Result<_>>()?;
        for id in &expired {
            self.revoke(t, *id, now, events)?;
        }
        Ok(expired.len())
    }

    fn compact(&mut self, t: &mut RedbTables, before_ms: u64) -> Result<(usize, Option<Revision>)> {
        // Events this batch recorded before are in the history first.
        t.flush_history()?;
        let history::Compacted {
            count,
            last,
            deletions,
        } = history::compact(&mut t.history, before_ms, self.options.compaction_step)?;
        let Some(last) = last else {
            return Ok((0, None));
        };
        for (revision, key) in deletions {
            // The grave points at this deletion only while no newer incarnation exists.
            let points_here = t
                .graves
                .get(key.as_slice())
                .map_err(backend)?
                .map(|g| g.value())
                == Some(revision);
            if points_here {
                t.graves.remove(key.as_slice()).map_err(backend)?;
            }
        }
        Ok((count, Some(last)))
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_condition(out: &mut Vec<u8>, c: Condition) {
    let (tag, rev) = match c {
        Condition::None => (0u8, 0),
        Condition::Absent => (1, 0),
        Condition::Exists => (2, 0),
        Condition::Revision(r) => (3, r),
    };
    out.push(tag);
    out.extend_from_slice(&rev.to_be_bytes());
}

/// Encodes the logged operations of a batch for the write-ahead log.
fn encode_ops(ops: &[&Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::Put(p) => {
                // Tag 9 adds the guard, 10 a guard that creates; 1 and 9 stay readable
                // for logs written before them.
                out.push(match &p.guard {
                    None => 1,
                    Some(g) if !g.create => 9,
                    Some(_) => 10,
                });
                put_bytes(&mut out, &p.key);
                put_bytes(&mut out, &p.value);
                put_condition(&mut out, p.condition);
                let (tag, id) = match p.lease {
                    LeaseChoice::Keep => (0u8, 0),
                    LeaseChoice::Set(id) => (1, id),
                    LeaseChoice::Clear => (2, 0),
                };
                out.push(tag);
                out.extend_from_slice(&id.to_be_bytes());
                if let Some(g) = &p.guard {
                    for n in [g.offset, g.carry.start, g.carry.end] {
                        out.extend_from_slice(&(n as u64).to_be_bytes());
                    }
                    put_bytes(&mut out, &g.expected);
                }
            }
            Op::Delete(key, c) => {
                out.push(2);
                put_bytes(&mut out, key);
                put_condition(&mut out, *c);
            }
            Op::Grant(ttl) => {
                out.push(3);
                out.extend_from_slice(&(ttl.as_millis() as u64).to_be_bytes());
            }
            Op::KeepAlive(id) => {
                out.push(4);
                out.extend_from_slice(&id.to_be_bytes());
            }
            Op::Revoke(id) => {
                out.push(5);
                out.extend_from_slice(&id.to_be_bytes());
            }
            Op::Sweep => out.push(6),
            Op::Compact(before) => {
                out.push(7);
                out.extend_from_slice(&before.to_be_bytes());
            }
            // Changes nothing; its place in the batch does not matter on replay.
            Op::Shutdown | Op::Wake => out.push(8),
        }
    }
    out
}

/// Decodes what [`encode_ops`] wrote.
fn decode_ops(mut b: &[u8]) -> Result<Vec<Op>> {
    fn bad() -> StoreError {
        StoreError::Corrupted("malformed write-ahead log record".into())
    }
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
        if b.len() < n {
            return Err(bad());
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Ok(head)
    }
    fn u64_(b: &mut &[u8]) -> Result<u64> {
        Ok(u64::from_be_bytes(take(b, 8)?.try_into().expect("8 bytes")))
    }
    fn bytes(b: &mut &[u8]) -> Result<Vec<u8>> {
        let n = u32::from_be_bytes(take(b, 4)?.try_into().expect("4 bytes")) as usize;
        Ok(take(b, n)?.to_vec())
    }
    fn condition(b: &mut &[u8]) -> Result<Condition> {
        let tag = take(b, 1)?[0];
        let rev = u64_(b)?;
        Ok(match tag {
            0 => Condition::None,
            1 => Condition::Absent,
            2 => Condition::Exists,
            3 => Condition::Revision(rev),
            _ => return Err(bad()),
        })
    }
    let mut ops = Vec::new();
    while !b.is_empty() {
        let tag = take(&mut b, 1)?[0];
        ops.push(match tag {
            1 | 9 | 10 => {
                let key = bytes(&mut b)?;
                let value = bytes(&mut b)?;
                let condition = condition(&mut b)?;
                let lease_tag = take(&mut b, 1)?[0];
                let id = u64_(&mut b)?;
                let lease = match lease_tag {
                    0 => LeaseChoice::Keep,
                    1 => LeaseChoice::Set(id),
                    2 => LeaseChoice::Clear,
                    _ => return Err(bad()),
                };
                let guard = if tag != 1 {
                    let mut n = || u64_(&mut b).map(|n| n as usize);
                    let (offset, start, end) = (n()?, n()?, n()?);
                    Some(ValueGuard {
                        offset,
                        carry: start..end,
                        expected: bytes(&mut b)?,
                        create: tag == 10,
                    })
                } else {
                    None
                };
                Op::Put(Put {
                    key,
                    value,
                    condition,
                    lease,
                    guard,
                })
            }
            2 => {
                let key = bytes(&mut b)?;
                Op::Delete(key, condition(&mut b)?)
            }
            3 => Op::Grant(Duration::from_millis(u64_(&mut b)?)),
            4 => Op::KeepAlive(u64_(&mut b)?),
            5 => Op::Revoke(u64_(&mut b)?),
            6 => Op::Sweep,
            7 => Op::Compact(u64_(&mut b)?),
            8 => Op::Shutdown,
            _ => return Err(bad()),
        });
    }
    Ok(ops)
}
