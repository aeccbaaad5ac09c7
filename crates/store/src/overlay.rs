//! The overlay: acknowledged writes that redb does not hold yet.
//!
//! The writer does not write puts and deletes to redb itself. It decides each batch
//! against the overlay, a redb read snapshot (its *base*) plus the changes of every
//! batch since, in memory; logs the batch and makes it durable in the write-ahead
//! log as always; merges its changes into the overlay's *current* layer; and only
//! then acknowledges it. Every checkpoint interval it freezes the current layer and
//! hands it to the checkpoint thread, which applies it to redb and makes redb durable
//! in one commit, while new batches go to a fresh current layer. When that commit is
//! done the writer rebases the overlay on a new snapshot, which holds the frozen
//! layer, and drops the layer (or retires the overlay if nothing came in meanwhile).
//! So the writer never waits for redb's write transaction, and redb takes a
//! checkpoint's worth of changes in one commit instead of one commit per batch.
//!
//! Outcomes are decided by the same code everywhere: `put` and `delete` in `redb.rs`
//! are written against the [`Tables`] trait, which redb's write tables and the
//! overlay both implement, so a batch decided here and the same batch replayed from
//! the log into redb after a crash agree by construction. So are lease grants and
//! keep-alives, which change one lease record and its place in the expiry index.
//! Operations that scan (revoke, sweep, compaction) are barriers: the writer applies
//! the overlay to redb itself, retires it, and runs them in a redb write
//! transaction. It holds them back while a checkpoint runs or the overlay is big
//! (see `Writer::run`), so that they neither wait for a checkpoint nor apply much.
//!
//! Readers find the overlay through `Shared::overlay` while one is published and
//! read current layer, frozen layer, then base: a consistent state that contains
//! every acknowledged write. A batch is merged before it is acknowledged; a frozen
//! layer is dropped only from an overlay whose base holds it (readers of the older
//! overlay object see the same state through the layer); an overlay is retired only
//! once redb holds all of it.

use crate::cache::{Admitted, EntryCache};
use crate::history::{self, HISTORY, decode_event};
use crate::redb::{
    GRAVES, LEASE_EXPIRY, LEASES, Stored, backend, check_compacted, compacted_in, entries_in,
    lease_live, live_lease,
};
use crate::run::RunSet;
use crate::{Event, KeyValue, Lease, LeaseId, Page, Result, Revision};
use redb::{ReadOnlyTable, ReadTransaction};
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

/// What deciding a put or a delete reads and changes: the tables of a redb write
/// transaction, or the overlay (with the batch's own changes on top).
pub(crate) trait Tables {
    /// What `f` makes of the stored record under `key`, decoded (a malformed one is
    /// `Corrupted`).
    fn kv_with<R>(&self, key: &[u8], f: impl FnOnce(Stored<'_>) -> R) -> Result<Option<R>>;
    /// Stores a record; `existed` says whether the key had one (live or not).
    fn kv_insert(&mut self, key: &[u8], record: Vec<u8>, existed: bool) -> Result<()>;
    /// Removes the record under `key`; answers its value.
    fn kv_remove(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn log_insert(&mut self, revision: Revision, event: Vec<u8>) -> Result<()>;
    fn grave_insert(&mut self, key: &[u8], revision: Revision) -> Result<()>;
    /// Removes the grave of `key`; answers the revision it held.
    fn grave_remove(&mut self, key: &[u8]) -> Result<Option<Revision>>;
    fn lease_live(&self, id: LeaseId, now: u64) -> Result<Option<Lease>>;
    /// Stores a lease's record (TTL and expiry, in ms) and moves its place in the
    /// expiry index from `was_expiring` (its expiry before, if it had a record).
    fn lease_put(&mut self, lease: &Lease, was_expiring: Option<u64>) -> Result<()>;
    /// Adds (`attach`) or removes the link of `key` to `lease`.
    fn lease_key(&mut self, lease: LeaseId, key: &[u8], attach: bool) -> Result<()>;
}

/// Changes not yet in redb. `None` values are removals.
#[derive(Default)]
pub(crate) struct Changes {
    pub(crate) kv: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub(crate) log: BTreeMap<Revision, Vec<u8>>,
    pub(crate) graves: HashMap<Vec<u8>, Option<Revision>>,
    /// Lease records written (TTL, expiry in ms). Only barriers remove leases.
    pub(crate) leases: HashMap<LeaseId, (u64, u64)>,
    /// The expiry index's changes, (expiry, lease) → present: the last one counts.
    pub(crate) lease_expiry: BTreeMap<(u64, LeaseId), bool>,
    /// In order: a key can be attached and detached within one overlay.
    pub(crate) lease_keys: Vec<(LeaseId, Vec<u8>, bool)>,
    /// Entries added, less entries removed.
    pub(crate) entries: i64,
    /// About how much memory the changes take.
    pub(crate) bytes: usize,
}

impl Changes {
    fn kv(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.kv.get(key).map(|v| v.as_deref())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.kv.is_empty()
            && self.log.is_empty()
            && self.graves.is_empty()
            && self.leases.is_empty()
            && self.lease_expiry.is_empty()
            && self.lease_keys.is_empty()
    }

    fn merge(&mut self, later: Changes) {
        self.kv.extend(later.kv);
        self.log.extend(later.log);
        self.graves.extend(later.graves);
        self.leases.extend(later.leases);
        self.lease_expiry.extend(later.lease_expiry);
        self.lease_keys.extend(later.lease_keys);
        self.entries += later.entries;
        self.bytes += later.bytes;
    }
}

/// The state an overlay starts from: a redb snapshot and the runs (`kvruns.rs`)
/// that hold `kv` as of it.
pub(crate) struct Base {
    runs: Arc<RunSet>,
    history: ReadOnlyTable<u64, &'static [u8]>,
    graves: ReadOnlyTable<&'static [u8], u64>,
    leases: ReadOnlyTable<u64, (u64, u64)>,
    lease_expiry: ReadOnlyTable<(u64, u64), ()>,
    entries: u64,
    /// The last revision compaction had removed from the snapshot's history.
    compacted: Revision,
}

impl Base {
    /// The base of `txn` and `runs`, taken together by the writer while nothing
    /// else changes either.
    pub(crate) fn open(txn: &ReadTransaction, runs: Arc<RunSet>) -> Result<Arc<Base>> {
        Ok(Arc::new(Base {
            compacted: compacted_in(txn)?,
            entries: entries_in(txn)?,
            runs,
            history: txn.open_table(HISTORY).map_err(backend)?,
            graves: txn.open_table(GRAVES).map_err(backend)?,
            leases: txn.open_table(LEASES).map_err(backend)?,
            lease_expiry: txn.open_table(LEASE_EXPIRY).map_err(backend)?,
        }))
    }
}

/// A layer of changes: the writer merges batches into the newest; a frozen one is
/// no longer written.
pub(crate) type Layer = Arc<RwLock<Changes>>;

pub(crate) fn read(layer: &Layer) -> std::sync::RwLockReadGuard<'_, Changes> {
    // Nothing panics while holding the lock; a poisoned one still holds whole data.
    layer.read().unwrap_or_else(|e| e.into_inner())
}

/// A published overlay: a base snapshot, the changes a running checkpoint is
/// applying to redb (frozen), and the changes since (current), newest first when
/// looking a key up.
pub(crate) struct Overlay {
    base: Arc<Base>,
    frozen: Option<Layer>,
    pub(crate) current: Layer,
}

impl Overlay {
    pub(crate) fn new(base: Arc<Base>, frozen: Option<Layer>, current: Layer) -> Overlay {
        Overlay {
            base,
            frozen,
            current,
        }
    }

    pub(crate) fn base(&self) -> &Arc<Base> {
        &self.base
    }

    /// The layers, newest first.
    fn layers(&self) -> impl Iterator<Item = &Layer> {
        std::iter::once(&self.current).chain(self.frozen.as_ref())
    }

    /// Merges a logged batch's changes into the current layer; answers the layer's
    /// size after.
    pub(crate) fn merge(&self, batch: Changes) -> usize {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        current.merge(batch);
        current.bytes
    }

    /// Memory the current layer takes, about.
    pub(crate) fn bytes(&self) -> usize {
        read(&self.current).bytes
    }

    pub(crate) fn kv_with<R>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        for layer in self.layers() {
            if let Some(changed) = read(layer).kv(key) {
                return Ok(changed.map(f));
            }
        }
        Ok(self.base.runs.get(key)?.map(|record| f(&record)))
    }

    fn grave(&self, key: &[u8]) -> Result<Option<Revision>> {
        for layer in self.layers() {
            if let Some(changed) = read(layer).graves.get(key) {
                return Ok(*changed);
            }
        }
        Ok(self
            .base
            .graves
            .get(key)
            .map_err(backend)?
            .map(|g| g.value()))
    }

    pub(crate) fn lease_live(&self, id: LeaseId, now: u64) -> Result<Option<Lease>> {
        for layer in self.layers() {
            if let Some(&record) = read(layer).leases.get(&id) {
                return Ok(live_lease(id, record, now));
            }
        }
        lease_live(&self.base.leases, id, now)
    }

    /// Whether some lease's expiry is `now` or earlier: the expiry index as the
    /// layers left it over the base's.
    pub(crate) fn lease_expired_by(&self, now: u64) -> Result<bool> {
        let due = (0, 0)..=(now, u64::MAX);
        // Index entries a newer layer removed.
        let mut removed = std::collections::HashSet::new();
        for layer in self.layers() {
            for (at_id, present) in read(layer).lease_expiry.range(due.clone()) {
                if removed.contains(at_id) {
                    continue;
                }
                if *present {
                    return Ok(true);
                }
                removed.insert(*at_id);
            }
        }
        for item in self.base.lease_expiry.range(due).map_err(backend)? {
            if !removed.contains(&item.map_err(backend)?.0.value()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub(crate) fn get(&self, key: &[u8], now: u64) -> Result<Option<KeyValue>> {
        let Some(stored) = self
            .kv_with(key, |b| {
                Stored::decode(b).map(|s| (s.lease, s.to_key_value(key)))
            })?
            .transpose()?
        else {
            return Ok(None);
        };
        match stored {
            (0, kv) => Ok(Some(kv)),
            (lease, kv) => Ok(self.lease_live(lease, now)?.map(|l| KeyValue {
                lease_expires_at_ms: Some(l.expires_at_ms),
                ..kv
            })),
        }
    }

    pub(crate) fn range(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        now: u64,
    ) -> Result<Page> {
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        // The layers' changes under the prefix, the newest winning.
        let mut changed: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for layer in self.frozen.iter().chain(std::iter::once(&self.current)) {
            changed.extend(
                read(layer)
                    .kv
                    .range::<[u8], _>((start, Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        let mut changed = changed.into_iter().peekable();
        let mut base = crate::kvruns::range(&self.base.runs, start, prefix).peekable();
        let mut page = Page::default();
        loop {
            // The next key in order, from the changes where both have it.
            let base_key = match base.peek() {
                Some(Ok((k, _))) => Some(k).filter(|k| k.starts_with(prefix)).cloned(),
                Some(Err(_)) => match base.next() {
                    Some(Err(e)) => return Err(e),
                    _ => None,
                },
                None => None,
            };
            let (key, record) = match (base_key, changed.peek()) {
                (None, None) => break,
                (Some(b), Some((c, _))) if *c <= b => {
                    if *c == b {
                        base.next();
                    }
                    changed.next().expect("peeked")
                }
                (Some(b), _) => {
                    let (_, record) = base.next().expect("peeked")?;
                    (b, Some(record))
                }
                (None, Some(_)) => changed.next().expect("peeked"),
            };
            let Some(record) = record else { continue };
            let stored = Stored::decode(&record)?;
            let expires = match stored.lease {
                0 => None,
                id => match self.lease_live(id, now)? {
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

    pub(crate) fn history(&self, key: &[u8], limit: usize) -> Result<Vec<Event>> {
        let newest = match self.kv_with(key, |b| Stored::decode(b).map(|s| s.modified))? {
            Some(modified) => modified?,
            None => self.grave(key)?.unwrap_or(0),
        };
        crate::redb::follow_history(newest, limit, |revision| {
            for layer in self.layers() {
                if let Some(bytes) = read(layer).log.get(&revision) {
                    return decode_event(revision, bytes).map(Some);
                }
            }
            history::get(&self.base.history, revision)
        })
    }

    pub(crate) fn changes_from(&self, from: Revision, limit: usize) -> Result<Vec<Event>> {
        // Compaction is a barrier (it runs with no overlay), so the base's horizon is
        // the overlay's.
        check_compacted(self.base.compacted, from)?;
        // Revisions grow from the base to the frozen layer to the current one.
        let mut out = Vec::new();
        history::read_from(&self.base.history, from, limit, &mut out)?;
        for layer in self.frozen.iter().chain(std::iter::once(&self.current)) {
            for (revision, bytes) in read(layer).log.range(from..) {
                if out.len() == limit {
                    return Ok(out);
                }
                out.push(decode_event(*revision, bytes)?.0);
            }
        }
        Ok(out)
    }

    pub(crate) fn entry_count(&self) -> u64 {
        let changed: i64 = self.layers().map(|layer| read(layer).entries).sum();
        self.base.entries.saturating_add_signed(changed)
    }
}

/// The writer's view while an overlay is published: a batch's own changes over
/// the entry cache, over the overlay's.
///
/// The entry cache is write-through for keys written again: an entry a batch
/// writes under a key that held one before (and with no lease) is admitted to the
/// cache when the batch is published, so the next write of the key finds its
/// current record in memory instead of reading a run block. A key written only
/// once is not admitted: a bulk load of new keys does not fill the cache (or push
/// out what readers keep there).
pub(crate) struct OverlayTables<'a> {
    overlay: &'a Overlay,
    cache: &'a EntryCache,
    pub(crate) batch: Changes,
    admitted: Vec<Admitted>,
}

impl<'a> OverlayTables<'a> {
    pub(crate) fn new(overlay: &'a Overlay, cache: &'a EntryCache) -> Self {
        OverlayTables {
            overlay,
            cache,
            batch: Changes::default(),
            admitted: Vec::new(),
        }
    }

    /// The batch's changes, and the entries to cache when they are published: of
    /// those admitted, each that is still its key's last value in the batch.
    pub(crate) fn finish(self) -> (Changes, Vec<Admitted>) {
        let admitted = last_values(&self.batch, self.admitted);
        (self.batch, admitted)
    }
}

/// Of `admitted`, the entries that are their key's last value in `batch`: a key
/// written twice keeps only its second entry, one deleted after it none.
fn last_values(batch: &Changes, mut admitted: Vec<Admitted>) -> Vec<Admitted> {
    admitted.retain(|a| {
        let last = batch.kv(a.key()).flatten().map(Stored::decode);
        matches!(last, Some(Ok(s)) if s.modified == a.mod_revision())
    });
    admitted
}

impl Tables for OverlayTables<'_> {
    fn kv_with<R>(&self, key: &[u8], f: impl FnOnce(Stored<'_>) -> R) -> Result<Option<R>> {
        if let Some(changed) = self.batch.kv(key) {
            return changed
                .map(|record| Stored::decode(record).map(f))
                .transpose();
        }
        // Cached entries are the published ones and have no lease; read in place.
        let mut f = Some(f);
        if let Some(found) = self.cache.peek(key, |create, modified, value| {
            let f = f.take().expect("called once");
            f(Stored {
                create,
                modified,
                lease: 0,
                value,
            })
        }) {
            return Ok(Some(found));
        }
        let f = f.take().expect("not called on a miss");
        self.overlay
            .kv_with(key, |record| Stored::decode(record).map(f))?
            .transpose()
    }

    fn kv_insert(&mut self, key: &[u8], record: Vec<u8>, existed: bool) -> Result<()> {
        if existed
            && let Ok(s) = Stored::decode(&record)
            && s.lease == 0
            && let Some(a) = self.cache.admit(key, s.create, s.modified, s.value)
        {
            self.admitted.push(a);
        }
        self.batch.entries += i64::from(!existed);
        self.batch.bytes += key.len() + record.len() + 64;
        self.batch.kv.insert(key.to_vec(), Some(record));
        Ok(())
    }

    fn kv_remove(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let old = self.kv_with(key, |s| s.value.to_vec())?;
        self.batch.entries -= i64::from(old.is_some());
        self.batch.bytes += key.len() + 64;
        self.batch.kv.insert(key.to_vec(), None);
        Ok(old)
    }

    fn log_insert(&mut self, revision: Revision, event: Vec<u8>) -> Result<()> {
        self.batch.bytes += event.len() + 64;
        self.batch.log.insert(revision, event);
        Ok(())
    }

    fn grave_insert(&mut self, key: &[u8], revision: Revision) -> Result<()> {
        self.batch.bytes += key.len() + 64;
        self.batch.graves.insert(key.to_vec(), Some(revision));
        Ok(())
    }

    fn grave_remove(&mut self, key: &[u8]) -> Result<Option<Revision>> {
        let old = match self.batch.graves.get(key) {
            Some(changed) => *changed,
            None => self.overlay.grave(key)?,
        };
        if old.is_some() {
            self.batch.bytes += key.len() + 64;
            self.batch.graves.insert(key.to_vec(), None);
        }
        Ok(old)
    }

    fn lease_live(&self, id: LeaseId, now: u64) -> Result<Option<Lease>> {
        match self.batch.leases.get(&id) {
            Some(&record) => Ok(live_lease(id, record, now)),
            None => self.overlay.lease_live(id, now),
        }
    }

    fn lease_put(&mut self, lease: &Lease, was_expiring: Option<u64>) -> Result<()> {
        let ttl_ms = lease.ttl.as_millis() as u64;
        self.batch.bytes += 3 * 64;
        self.batch
            .leases
            .insert(lease.id, (ttl_ms, lease.expires_at_ms));
        if let Some(at) = was_expiring {
            self.batch.lease_expiry.insert((at, lease.id), false);
        }
        self.batch
            .lease_expiry
            .insert((lease.expires_at_ms, lease.id), true);
        Ok(())
    }

    fn lease_key(&mut self, lease: LeaseId, key: &[u8], attach: bool) -> Result<()> {
        self.batch.bytes += key.len() + 64;
        self.batch.lease_keys.push((lease, key.to_vec(), attach));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_keys_last_value_in_a_batch_is_admitted() {
        let cache = EntryCache::new(1 << 20);
        let mut batch = Changes::default();
        batch
            .kv
            .insert(b"a".to_vec(), Some(Stored::encode(1, 5, 0, b"a2")));
        batch.kv.insert(b"b".to_vec(), None);
        let admitted = [
            (b"a", 4, b"a1"), // written again later in the batch
            (b"a", 5, b"a2"), // its last value
            (b"b", 3, b"b1"), // deleted later in the batch
        ]
        .map(|(key, modified, value)| cache.admit(key, 1, modified, value).expect("fits"));
        let kept = last_values(&batch, admitted.into());
        let kept: Vec<_> = kept.iter().map(|a| (a.key(), a.mod_revision())).collect();
        assert_eq!(kept, [(b"a".as_slice(), 5)]);
    }
}
