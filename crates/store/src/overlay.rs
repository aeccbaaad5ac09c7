//! The overlay: batches acknowledged while a checkpoint runs.
//!
//! A checkpoint is a durable redb commit; it holds redb's only write transaction
//! for as long as the disk takes to write and flush the pages dirtied since the
//! last one (15-25 ms under load). Rather than make writes wait, the writer hands
//! the commit to the checkpoint thread and goes on deciding batches against an
//! overlay: a redb read snapshot taken when the checkpoint started (its *base*)
//! plus the changes of every batch since, in memory. Each batch is logged and made
//! durable in the write-ahead log exactly as always, its changes are merged into
//! the overlay, and only then is it acknowledged. When the checkpoint is done the
//! writer applies the overlay's changes to redb in one commit and retires it.
//!
//! Outcomes are decided by the same code in both places: `put` and `delete` in
//! `redb.rs` are written against the [`Tables`] trait, which the write
//! transaction's tables and the overlay both implement, so a batch decided here
//! and the same batch replayed from the log into redb after a crash agree by
//! construction. Operations that scan (lease grant, keep-alive, revoke, sweep,
//! compaction) are barriers: they wait for the checkpoint and run against redb.
//!
//! Readers find the overlay through `Shared::overlay` while it is published and
//! read the base plus the changes, a consistent state that contains every
//! acknowledged write: a batch is merged before it is acknowledged, and the
//! overlay is retired only after its changes are committed to redb.

use crate::redb::{GRAVES, KV, LEASES, LOG, Stored, backend, decode_event, lease_live};
use crate::{Event, KeyValue, Lease, LeaseId, Page, Result, Revision};
use redb::{ReadOnlyTable, ReadTransaction, ReadableTableMetadata};
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::RwLock;

/// What deciding a put or a delete reads and changes: the tables of a redb write
/// transaction, or the overlay (with the batch's own changes on top).
pub(crate) trait Tables {
    /// What `f` makes of the stored record under `key` (see `Stored`).
    fn kv_with<R>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>>;
    /// Stores a record; `existed` says whether the key had one (live or not).
    fn kv_insert(&mut self, key: &[u8], record: Vec<u8>, existed: bool) -> Result<()>;
    /// Removes the record under `key`; answers its value.
    fn kv_remove(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn log_insert(&mut self, revision: Revision, event: Vec<u8>) -> Result<()>;
    fn grave_insert(&mut self, key: &[u8], revision: Revision) -> Result<()>;
    /// Removes the grave of `key`; answers the revision it held.
    fn grave_remove(&mut self, key: &[u8]) -> Result<Option<Revision>>;
    fn lease_live(&self, id: LeaseId, now: u64) -> Result<Option<Lease>>;
    /// Adds (`attach`) or removes the link of `key` to `lease`.
    fn lease_key(&mut self, lease: LeaseId, key: &[u8], attach: bool) -> Result<()>;
}

/// Changes not yet in redb. `None` values are removals.
#[derive(Default)]
pub(crate) struct Changes {
    pub(crate) kv: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub(crate) log: BTreeMap<Revision, Vec<u8>>,
    pub(crate) graves: HashMap<Vec<u8>, Option<Revision>>,
    /// In order: a key can be attached and detached within one overlay.
    pub(crate) lease_keys: Vec<(LeaseId, Vec<u8>, bool)>,
    /// Entries added, less entries removed.
    entries: i64,
    /// About how much memory the changes take.
    pub(crate) bytes: usize,
}

impl Changes {
    fn kv(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.kv.get(key).map(|v| v.as_deref())
    }

    fn merge(&mut self, later: Changes) {
        self.kv.extend(later.kv);
        self.log.extend(later.log);
        self.graves.extend(later.graves);
        self.lease_keys.extend(later.lease_keys);
        self.entries += later.entries;
        self.bytes += later.bytes;
    }
}

/// A published overlay: the base snapshot and the changes since.
pub(crate) struct Overlay {
    kv: ReadOnlyTable<&'static [u8], &'static [u8]>,
    log: ReadOnlyTable<u64, &'static [u8]>,
    graves: ReadOnlyTable<&'static [u8], u64>,
    leases: ReadOnlyTable<u64, (u64, u64)>,
    entries: u64,
    pub(crate) changes: RwLock<Changes>,
}

impl Overlay {
    /// An empty overlay over `base`.
    pub(crate) fn new(base: &ReadTransaction) -> Result<Overlay> {
        let kv = base.open_table(KV).map_err(backend)?;
        Ok(Overlay {
            entries: kv.len().map_err(backend)?,
            kv,
            log: base.open_table(LOG).map_err(backend)?,
            graves: base.open_table(GRAVES).map_err(backend)?,
            leases: base.open_table(LEASES).map_err(backend)?,
            changes: RwLock::default(),
        })
    }

    fn changes(&self) -> std::sync::RwLockReadGuard<'_, Changes> {
        // Nothing panics while holding the lock; a poisoned one still holds whole data.
        self.changes.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Merges a logged batch's changes.
    pub(crate) fn merge(&self, batch: Changes) {
        self.changes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .merge(batch);
    }

    pub(crate) fn bytes(&self) -> usize {
        self.changes().bytes
    }

    pub(crate) fn kv_with<R>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        if let Some(changed) = self.changes().kv(key) {
            return Ok(changed.map(f));
        }
        Ok(self.kv.get(key).map_err(backend)?.map(|g| f(g.value())))
    }

    fn grave(&self, key: &[u8]) -> Result<Option<Revision>> {
        if let Some(changed) = self.changes().graves.get(key) {
            return Ok(*changed);
        }
        Ok(self.graves.get(key).map_err(backend)?.map(|g| g.value()))
    }

    pub(crate) fn lease_live(&self, id: LeaseId, now: u64) -> Result<Option<Lease>> {
        // Leases do not change while an overlay is published (their operations are
        // barriers): the base has them as they are.
        lease_live(&self.leases, id, now)
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
            (lease, kv) => Ok(self.lease_live(lease, now)?.map(|_| kv)),
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
        let changed: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .changes()
            .kv
            .range::<[u8], _>((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut changed = changed.into_iter().peekable();
        let mut base = self
            .kv
            .range::<&[u8]>((start, Bound::Unbounded))
            .map_err(backend)?
            .peekable();
        let mut page = Page::default();
        loop {
            // The next key in order, from the changes where both have it.
            let base_key = match base.peek() {
                Some(Ok((k, _))) => Some(k.value().to_vec()).filter(|k| k.starts_with(prefix)),
                Some(Err(_)) => match base.next() {
                    Some(Err(e)) => return Err(backend(e)),
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
                    let (_, v) = base.next().expect("peeked").map_err(backend)?;
                    (b, Some(v.value().to_vec()))
                }
                (None, Some(_)) => changed.next().expect("peeked"),
            };
            let Some(record) = record else { continue };
            let stored = Stored::decode(&record)?;
            if stored.lease != 0 && self.lease_live(stored.lease, now)?.is_none() {
                continue;
            }
            if page.items.len() == limit {
                page.more = true;
                break;
            }
            page.items.push(stored.to_key_value(&key));
        }
        Ok(page)
    }

    pub(crate) fn history(&self, key: &[u8], limit: usize) -> Result<Vec<Event>> {
        let newest = match self.kv_with(key, |b| Stored::decode(b).map(|s| s.modified))? {
            Some(modified) => modified?,
            None => self.grave(key)?.unwrap_or(0),
        };
        crate::redb::follow_history(newest, limit, |revision| {
            if let Some(bytes) = self.changes().log.get(&revision) {
                return decode_event(revision, bytes).map(Some);
            }
            match self.log.get(revision).map_err(backend)? {
                Some(bytes) => decode_event(revision, bytes.value()).map(Some),
                None => Ok(None),
            }
        })
    }

    pub(crate) fn changes_from(&self, from: Revision, limit: usize) -> Result<Vec<Event>> {
        // Every revision in the changes is newer than every revision in the base.
        let mut out = Vec::new();
        for item in self.log.range(from..).map_err(backend)?.take(limit) {
            let (k, v) = item.map_err(backend)?;
            out.push(decode_event(k.value(), v.value())?.0);
        }
        for (revision, bytes) in self.changes().log.range(from..) {
            if out.len() == limit {
                break;
            }
            out.push(decode_event(*revision, bytes)?.0);
        }
        Ok(out)
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.entries.saturating_add_signed(self.changes().entries)
    }
}

/// The writer's view while an overlay is published: a batch's own changes over
/// the overlay's.
pub(crate) struct OverlayTables<'a> {
    overlay: &'a Overlay,
    pub(crate) batch: Changes,
}

impl<'a> OverlayTables<'a> {
    pub(crate) fn new(overlay: &'a Overlay) -> Self {
        OverlayTables {
            overlay,
            batch: Changes::default(),
        }
    }
}

impl Tables for OverlayTables<'_> {
    fn kv_with<R>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        match self.batch.kv(key) {
            Some(changed) => Ok(changed.map(f)),
            None => self.overlay.kv_with(key, f),
        }
    }

    fn kv_insert(&mut self, key: &[u8], record: Vec<u8>, existed: bool) -> Result<()> {
        self.batch.entries += i64::from(!existed);
        self.batch.bytes += key.len() + record.len() + 64;
        self.batch.kv.insert(key.to_vec(), Some(record));
        Ok(())
    }

    fn kv_remove(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let old = self
            .kv_with(key, |b| Stored::decode(b).map(|s| s.value.to_vec()))?
            .transpose()?;
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
        self.overlay.lease_live(id, now)
    }

    fn lease_key(&mut self, lease: LeaseId, key: &[u8], attach: bool) -> Result<()> {
        self.batch.bytes += key.len() + 64;
        self.batch.lease_keys.push((lease, key.to_vec(), attach));
        Ok(())
    }
}
