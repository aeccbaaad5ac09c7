//! Amphora's storage interface and its engines.
//!
//! The interface is the one an etcd engine implements too, so it speaks etcd's
//! language: a store-wide revision that every change increments, compare-and-set on
//! an entry's revision, ordered prefix scans with pagination, per-key history, leases
//! that delete their keys when they expire, and a change feed from a revision.
//! Keys and values are bytes; what they mean is the model's business.
//!
//! Invariant: only the engine modules know redb (or, later, etcd). Callers see
//! [`Store`], [`StoreError`] and the plain types of this module.

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

mod cache;
mod error;
mod history;
mod kvruns;
mod overlay;
mod paced;
pub mod redb;
pub(crate) mod run;
#[cfg(feature = "testkit")]
pub mod testkit;
mod wal;

pub use error::StoreError;

/// The store-wide revision: every change gets the next one. 0 means "nothing yet".
pub type Revision = u64;
/// A lease identifier, unique within a store.
pub type LeaseId = u64;
/// Results of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created this incarnation of the key.
    pub create_revision: Revision,
    /// The revision of the last change.
    pub mod_revision: Revision,
    /// The lease the entry is attached to, if any.
    pub lease: Option<LeaseId>,
    /// When that lease expires (ms since the Unix epoch), as the engine found it
    /// while reading the entry: `None` without a lease, or from an engine that does
    /// not read leases with entries (then [`Store::lease`] tells).
    pub lease_expires_at_ms: Option<u64>,
}

/// The precondition of a write; a write whose condition fails changes nothing and
/// answers [`StoreError::Conflict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// No precondition.
    None,
    /// The key must not exist (create only).
    Absent,
    /// The key must exist.
    Exists,
    /// The key must exist with this modification revision (compare-and-set).
    Revision(Revision),
}

/// What a put does with the entry's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChoice {
    /// Keep the lease the entry has (none for a new entry).
    Keep,
    /// Attach the entry to this lease.
    Set(LeaseId),
    /// Detach the entry from any lease.
    Clear,
}

/// A write of one key. [`Put::new`] makes one without a guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// The key.
    pub key: Vec<u8>,
    /// The new value.
    pub value: Vec<u8>,
    /// The precondition.
    pub condition: Condition,
    /// What happens to the lease.
    pub lease: LeaseChoice,
    /// A check of the current value, and bytes carried over from it (see
    /// [`ValueGuard`]).
    pub guard: Option<ValueGuard>,
}

/// A check a put makes on the current value's bytes before it writes, and bytes it
/// carries over from the current value into the new one. This is how a caller whose
/// values start with a header (token hashes, a creation time) replaces one without
/// reading it first: the check and the carry happen in the same atomic step as the
/// write. A put with a guard fails with [`StoreError::Mismatch`] when the check
/// fails. When the key has no live entry, it fails with [`StoreError::Conflict`],
/// unless `create` is set: then it stores its value as given, a create. So "create
/// this entry, or replace it if its header matches" is one step too, instead of a
/// failed guarded put, a read and a second put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueGuard {
    /// Where the checked bytes start in the current value.
    pub offset: usize,
    /// What they must be.
    pub expected: Vec<u8>,
    /// These bytes of the current value replace the same bytes of the new one.
    pub carry: std::ops::Range<usize>,
    /// Without a live entry, create one with the value as given (the put's condition
    /// still applies first).
    pub create: bool,
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    /// The revision of the change.
    pub revision: Revision,
    /// The key had no live entry before: the put created one.
    pub created: bool,
}

impl Put {
    /// A put of `value` under `key` with a condition, keeping the lease, unguarded.
    pub fn new(key: Vec<u8>, value: Vec<u8>, condition: Condition) -> Self {
        Put {
            key,
            value,
            condition,
            lease: LeaseChoice::Keep,
            guard: None,
        }
    }
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or replaced.
    Put,
    /// The key was deleted (by a client, or because its lease expired).
    Delete,
}

/// One change, as kept in the history and sent on the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The revision of the change.
    pub revision: Revision,
    /// Put or delete.
    pub kind: EventKind,
    /// The key.
    pub key: Vec<u8>,
    /// The new value for a put; for a delete, the value the entry had until then
    /// (etcd's `prev_kv`), so that a reader can tell whose entry ended.
    pub value: Vec<u8>,
    /// When the change was committed, in ms since the Unix epoch.
    pub at_ms: u64,
}

/// One page of a prefix scan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// The entries, in key order.
    pub items: Vec<KeyValue>,
    /// True when more entries follow the last one.
    pub more: bool,
}

/// A lease: entries attached to it disappear when it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its identifier.
    pub id: LeaseId,
    /// How long each renewal keeps it alive.
    pub ttl: Duration,
    /// When it expires unless renewed, in ms since the Unix epoch.
    pub expires_at_ms: u64,
}

/// Figures an engine reports after each group commit, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct CommitInfo {
    /// How many operations the commit carried.
    pub batch_size: usize,
    /// How long the commit (including its fsync) took.
    pub duration: Duration,
}

/// What an engine's read cache holds and how often it answered, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads the cache answered.
    pub hits: u64,
    /// Reads that went to the engine's own storage (a cache turned off counts none).
    pub misses: u64,
    /// Entries held.
    pub entries: u64,
    /// Bytes held, as the cache counts them against its budget.
    pub bytes: u64,
}

/// A callback told of every commit.
pub type CommitObserver = Arc<dyn Fn(CommitInfo) + Send + Sync>;

/// The storage interface.
///
/// Every write is acknowledged only once it is durable. Reads never wait for writes.
/// An entry whose lease has expired is absent for every reader from the moment of
/// expiry, before any sweep has removed it.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The entry under `key`, if any.
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>>;

    /// Up to `limit` entries whose key starts with `prefix`, in key order, starting
    /// after the key `after` when given.
    async fn range(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Page>;

    /// Writes one key; answers the revision of the change.
    async fn put(&self, put: Put) -> Result<Revision> {
        Ok(self.put_outcome(put).await?.revision)
    }

    /// Writes one key; answers the revision of the change and whether it created the
    /// entry.
    async fn put_outcome(&self, put: Put) -> Result<PutOutcome>;

    /// Deletes one key; answers the revision of the deletion, or `None` when the key
    /// did not exist (and the condition allowed that).
    async fn delete(&self, key: &[u8], condition: Condition) -> Result<Option<Revision>>;

    /// The most recent changes of one key, newest first, as far back as retention
    /// keeps them.
    async fn history(&self, key: &[u8], limit: usize) -> Result<Vec<Event>>;

    /// Changes with a revision at or after `from`, oldest first: the change feed.
    /// [`StoreError::Compacted`] when `from` is older than retention keeps.
    async fn changes(&self, from: Revision, limit: usize) -> Result<Vec<Event>>;

    /// The read cache's figures; engines without one answer the default.
    fn cache_stats(&self) -> CacheStats {
        CacheStats::default()
    }

    /// Live changes from now on, as they are committed.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event>;

    /// The revision of the last committed change.
    async fn revision(&self) -> Result<Revision>;

    /// The number of stored entries (including any expired but not yet swept).
    async fn entry_count(&self) -> Result<u64>;

    /// Creates a lease.
    async fn grant_lease(&self, ttl: Duration) -> Result<Lease>;

    /// Renews a lease for its ttl from now. [`StoreError::LeaseNotFound`] when it has
    /// expired or never existed.
    async fn keep_alive(&self, id: LeaseId) -> Result<Lease>;

    /// Revokes a lease and deletes its entries.
    async fn revoke_lease(&self, id: LeaseId) -> Result<()>;

    /// The lease, if it exists and has not expired.
    async fn lease(&self, id: LeaseId) -> Result<Option<Lease>>;

    /// Removes the entries of expired leases (with delete events); answers how many
    /// leases expired. Engines whose backend expires leases itself do nothing.
    async fn sweep_expired_leases(&self) -> Result<usize>;

    /// Drops history older than `before_ms` (ms since the Unix epoch); answers how
    /// many changes were dropped.
    async fn compact_history(&self, before_ms: u64) -> Result<usize>;

    /// Finishes every accepted write, flushes, and stops accepting new ones.
    async fn close(&self) -> Result<()>;
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
