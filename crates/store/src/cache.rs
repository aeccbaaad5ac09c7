//! The entry cache: recently read entries, and entries written under keys written
//! before, kept in memory so that a hot read costs a hash lookup instead of a run
//! block read, and so that the writer, which reads the current entry of every key it
//! changes, finds a key written over and over here.
//!
//! It is kept exact by the writer, without ever making a reader wait for a commit:
//!
//! - The cache is split in shards, each a map under its own lock and a generation
//!   counter. The lock is held only for one map operation, never across a commit.
//! - Before it commits a batch, the writer makes the generation of each shard the
//!   keys the batch changed fall in odd ("in flux"); after the commit it removes
//!   those keys and makes the generation even. Nobody reads a shard's entries
//!   while it is in flux, so the keys need removing only once.
//! - A reader does not use a shard in flux: while a commit is publishing its
//!   changes, readers of the shard go to the overlay and the runs, whose states are
//!   published in order, so no reader can see an old value after another has seen
//!   the new one.
//! - Write-through for rewritten keys: an entry a batch writes under a key that
//!   held one, with no lease, is inserted by the writer after the commit, while the
//!   shard is still in flux ([`EntryCache::settle`]). A key written once is not, so a
//!   bulk load of new keys does not fill the cache.
//! - The writer looks up the current entry of a key it changes here first
//!   ([`EntryCache::peek`]): between its commits the cache holds what is published.
//! - A reader that missed takes the shard's generation *before* it opens its read
//!   transaction, and may insert what it read only if the generation is still the
//!   same, even, number: a commit in between (which might have made what it read
//!   old) changes the generation and the insert is dropped.
//!
//! Entries attached to a lease are not cached: their life depends on the lease's
//! expiry, which the reader must check against the lease table on every read.
//!
//! The cache holds at most its byte budget; past it, arbitrary entries of the
//! shard are dropped (random replacement: as good as LRU on uniform keys, and
//! nothing to update on a hit, so hits take only the shard's read lock).
//!
//! An entry is one allocation (revisions, key and value together) behind a 16-byte
//! slot of the shard's table, and it is counted as what the allocator hands out for
//! it (see [`cost`]).
//!
//! A key is hashed once per lookup (keyed SipHash, as `std`'s maps, since keys are
//! the clients' to choose): bits 32-39 of the hash pick the shard, and the shard's
//! `hashbrown::HashTable` is searched with the same hash (it uses the low bits and
//! the top seven, so a shard's entries do not share the bits its table indexes by).

use crate::{CacheStats, KeyValue, Revision};
use hashbrown::HashTable;
use std::hash::{BuildHasher, RandomState};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

const SHARDS: usize = 256;
/// Bytes counted for an entry beyond its allocation: its 16-byte slot and control
/// byte with the free slots a hash set keeps (it is between 7/16 and 7/8 full),
/// about 22 bytes, and the allocator's free space around it. Measured: 100,000
/// cached entries of 256-byte values grow the server's resident memory by 450 bytes
/// each, 384 of them their allocation; they are counted 448.
const OVERHEAD: usize = 64;

/// What a reader that missed holds while it reads the B-tree.
#[derive(Clone, Copy)]
pub(crate) struct Ticket {
    shard: usize,
    generation: u64,
    /// The key's hash, for the insert.
    hash: u64,
}

/// A cached entry (entries with a lease are not cached) in one allocation: the
/// key's length, the create and the mod revision, each a LEB128 varint, then the
/// key and the value. Hashed and compared by its key, so the set is looked up with
/// a key alone.
struct Cached(Box<[u8]>);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).div_ceil(7).max(1)
}

/// The varint at `*at` (written by [`put_varint`]); moves `at` past it.
fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = bytes[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

impl Cached {
    fn new(kv: &KeyValue) -> Cached {
        Cached::of(&kv.key, kv.create_revision, kv.mod_revision, &kv.value)
    }

    fn of(key: &[u8], create: Revision, modified: Revision, value: &[u8]) -> Cached {
        let len = [key.len() as u64, create, modified]
            .map(varint_len)
            .iter()
            .sum::<usize>()
            + key.len()
            + value.len();
        // Exactly its size: the boxed slice is this allocation, not a copy of it.
        let mut bytes = Vec::with_capacity(len);
        put_varint(&mut bytes, key.len() as u64);
        put_varint(&mut bytes, create);
        put_varint(&mut bytes, modified);
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(value);
        debug_assert_eq!(bytes.len(), len);
        Cached(bytes.into_boxed_slice())
    }

    /// The revisions and where the key starts and ends.
    fn header(&self) -> (Revision, Revision, usize, usize) {
        let mut at = 0;
        let key_len = varint(&self.0, &mut at) as usize;
        let create = varint(&self.0, &mut at);
        let modified = varint(&self.0, &mut at);
        (create, modified, at, at + key_len)
    }

    fn key(&self) -> &[u8] {
        let (_, _, start, end) = self.header();
        &self.0[start..end]
    }

    fn to_key_value(&self) -> KeyValue {
        let (create_revision, mod_revision, start, end) = self.header();
        KeyValue {
            key: self.0[start..end].to_vec(),
            value: self.0[end..].to_vec(),
            create_revision,
            mod_revision,
            lease: None,
            lease_expires_at_ms: None,
        }
    }

    fn cost(&self) -> usize {
        cost(self.0.len())
    }
}

/// Bytes counted for an entry of `len` bytes: what the allocator hands out for it
/// (mimalloc's size classes: 8-byte steps up to 64 bytes, then four classes per
/// doubling), plus [`OVERHEAD`].
fn cost(len: usize) -> usize {
    let allocated = if len <= 64 {
        len.next_multiple_of(8)
    } else {
        let below = 1usize << (usize::BITS - 1 - (len - 1).leading_zeros());
        len.next_multiple_of(below / 4)
    };
    allocated + OVERHEAD
}

struct Shard {
    generation: u64,
    bytes: usize,
    /// Each entry under the hash of its key.
    entries: HashTable<Cached>,
    // Counted under the read lock; one pair per shard keeps readers of different
    // shards off each other's cache lines.
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Shard {
    fn find(&self, hash: u64, key: &[u8]) -> Option<&Cached> {
        self.entries.find(hash, |c| c.key() == key)
    }

    fn remove(&mut self, hash: u64, key: &[u8]) {
        if let Ok(found) = self.entries.find_entry(hash, |c| c.key() == key) {
            let (old, _) = found.remove();
            self.bytes -= old.cost();
        }
    }

    /// Adds `entry` (whose key the shard does not hold), dropping arbitrary entries
    /// until it fits in `budget`.
    fn insert(&mut self, hash: u64, entry: Cached, budget: usize, hasher: &RandomState) {
        let size = entry.cost();
        while self.bytes + size > budget {
            let Some(victim) = self.entries.iter().next().map(|c| c.key().to_vec()) else {
                break;
            };
            self.remove(hasher.hash_one(&victim), &victim);
        }
        self.bytes += size;
        self.entries
            .insert_unique(hash, entry, |c| hasher.hash_one(c.key()));
    }
}

/// An entry a batch wrote, to be cached when the batch is published (see
/// [`EntryCache::settle`]).
pub(crate) struct Admitted {
    hash: u64,
    entry: Cached,
}

impl Admitted {
    pub(crate) fn key(&self) -> &[u8] {
        self.entry.key()
    }

    pub(crate) fn mod_revision(&self) -> Revision {
        self.entry.header().1
    }
}

/// The shards a batch touched, as a bit set.
#[derive(Default)]
pub(crate) struct Touched([u64; SHARDS / 64]);

impl Touched {
    fn insert(&mut self, shard: usize) {
        self.0[shard / 64] |= 1 << (shard % 64);
    }

    fn contains(&self, shard: usize) -> bool {
        self.0[shard / 64] & (1 << (shard % 64)) != 0
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..SHARDS).filter(|&s| self.contains(s))
    }
}

pub(crate) struct EntryCache {
    hasher: RandomState,
    shard_budget: usize,
    shards: Vec<RwLock<Shard>>,
}

impl EntryCache {
    /// A cache of at most `budget` bytes; 0 turns it off.
    pub(crate) fn new(budget: usize) -> Self {
        EntryCache {
            hasher: RandomState::new(),
            shard_budget: budget / SHARDS,
            shards: (0..SHARDS)
                .map(|_| {
                    RwLock::new(Shard {
                        generation: 0,
                        bytes: 0,
                        entries: HashTable::new(),
                        hits: AtomicU64::new(0),
                        misses: AtomicU64::new(0),
                    })
                })
                .collect(),
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard of a key of this hash.
    fn shard_of(hash: u64) -> usize {
        (hash >> 32) as usize % SHARDS
    }

    fn enabled(&self) -> bool {
        self.shard_budget > 0
    }

    /// The cached entry under `key`, or, on a miss, the ticket to offer what the
    /// reader then finds.
    pub(crate) fn get(&self, key: &[u8]) -> Result<KeyValue, Option<Ticket>> {
        if !self.enabled() {
            return Err(None);
        }
        let hash = self.hash(key);
        let shard = Self::shard_of(hash);
        let s = self.shards[shard].read().unwrap_or_else(|p| p.into_inner());
        if s.generation % 2 == 1 {
            s.misses.fetch_add(1, Ordering::Relaxed);
            return Err(None);
        }
        let found = s.find(hash, key);
        let counter = if found.is_some() { &s.hits } else { &s.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        match found {
            Some(c) => Ok(c.to_key_value()),
            None => Err(Some(Ticket {
                shard,
                generation: s.generation,
                hash,
            })),
        }
    }

    /// Caches what a reader holding `ticket` read, unless a commit touched the
    /// shard since the ticket was taken. `kv` has no lease.
    pub(crate) fn offer(&self, ticket: Ticket, kv: &KeyValue) {
        debug_assert!(kv.lease.is_none());
        let entry = Cached::new(kv);
        let size = entry.cost();
        if size > self.shard_budget {
            return;
        }
        let hash = ticket.hash;
        debug_assert_eq!(hash, self.hash(&kv.key), "offered under its ticket's key");
        let mut s = self.shards[ticket.shard]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if s.generation != ticket.generation || s.find(hash, &kv.key).is_some() {
            return;
        }
        s.insert(hash, entry, self.shard_budget, &self.hasher);
    }

    /// Calls `f` with the create revision, the mod revision and the value cached
    /// under `key`, without counting a hit or a miss: the writer's lookup of the
    /// entry a put or delete changes. The writer is the one thread that changes the
    /// cache's keys, so between its commits what it finds here is the entry as
    /// published.
    pub(crate) fn peek<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(Revision, Revision, &[u8]) -> R,
    ) -> Option<R> {
        if !self.enabled() {
            return None;
        }
        let hash = self.hash(key);
        let s = self.shards[Self::shard_of(hash)]
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if s.generation % 2 == 1 {
            return None;
        }
        let found = s.find(hash, key)?;
        let (create, modified, _, end) = found.header();
        Some(f(create, modified, &found.0[end..]))
    }

    /// The entry a batch wrote under `key` (with no lease), to be cached by
    /// [`Self::settle`] when the batch is published; `None` when the cache is off or
    /// the entry does not fit in a shard.
    pub(crate) fn admit(
        &self,
        key: &[u8],
        create: Revision,
        modified: Revision,
        value: &[u8],
    ) -> Option<Admitted> {
        if !self.enabled() {
            return None;
        }
        let entry = Cached::of(key, create, modified, value);
        (entry.cost() <= self.shard_budget).then(|| Admitted {
            hash: self.hash(key),
            entry,
        })
    }

    /// What the cache holds and how often it answered.
    pub(crate) fn stats(&self) -> CacheStats {
        let mut stats = CacheStats::default();
        for s in &self.shards {
            let s = s.read().unwrap_or_else(|p| p.into_inner());
            stats.hits += s.hits.load(Ordering::Relaxed);
            stats.misses += s.misses.load(Ordering::Relaxed);
            stats.entries += s.entries.len() as u64;
            stats.bytes += s.bytes as u64;
        }
        stats
    }

    /// Puts the shards of `keys` in flux (their generation odd) before the writer
    /// commits a batch that changes them; [`Self::settle`] after the commit, with
    /// the same keys and what this answers, drops them and ends the flux.
    pub(crate) fn invalidate<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) -> Flux {
        if !self.enabled() {
            return Flux::default();
        }
        let hashes: Vec<u64> = keys.map(|key| self.hash(key)).collect();
        let mut touched = Touched::default();
        for &hash in &hashes {
            touched.insert(Self::shard_of(hash));
        }
        self.advance(&touched);
        Flux { hashes, touched }
    }

    fn advance(&self, touched: &Touched) {
        for shard in touched.iter() {
            let mut s = self.shards[shard]
                .write()
                .unwrap_or_else(|p| p.into_inner());
            s.generation += 1;
        }
    }

    /// Ends the flux [`Self::invalidate`] began for `keys` (the same, in the same
    /// order) after the commit: drops the keys and caches `admitted` (entries the
    /// batch wrote under some of them, each the key's last value in the batch),
    /// taking each shard's lock once.
    pub(crate) fn settle<'k>(
        &self,
        flux: Flux,
        keys: impl Iterator<Item = &'k [u8]>,
        admitted: Vec<Admitted>,
    ) {
        if !self.enabled() {
            return;
        }
        let mut removed: Vec<(usize, u64, &[u8])> = flux
            .hashes
            .iter()
            .zip(keys)
            .map(|(&hash, key)| (Self::shard_of(hash), hash, key))
            .collect();
        debug_assert_eq!(removed.len(), flux.hashes.len(), "the keys invalidated");
        removed.sort_unstable_by_key(|r| r.0);
        let mut admitted = admitted;
        admitted.sort_unstable_by_key(|a| Self::shard_of(a.hash));
        let mut removed = removed.into_iter().peekable();
        let mut admitted = admitted.into_iter().peekable();
        // `Touched::iter` goes up by shard, as both lists now do.
        for shard in flux.touched.iter() {
            let mut s = self.shards[shard]
                .write()
                .unwrap_or_else(|p| p.into_inner());
            while let Some((_, hash, key)) = removed.next_if(|r| r.0 == shard) {
                s.remove(hash, key);
            }
            // Removed above, and admitted once per batch (see `OverlayTables::finish`).
            while let Some(Admitted { hash, entry }) =
                admitted.next_if(|a| Self::shard_of(a.hash) == shard)
            {
                s.insert(hash, entry, self.shard_budget, &self.hasher);
            }
            s.generation += 1;
        }
        debug_assert!(
            admitted.next().is_none(),
            "admitted under a key the batch changed"
        );
    }
}

/// The hashes and shards of a batch's changed keys, from
/// [`EntryCache::invalidate`] to [`EntryCache::settle`]: each key is hashed once.
#[derive(Default)]
pub(crate) struct Flux {
    hashes: Vec<u64>,
    touched: Touched,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &[u8], value: &[u8], revision: Revision) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: 1,
            mod_revision: revision,
            lease: None,
            lease_expires_at_ms: None,
        }
    }

    fn ticket(cache: &EntryCache, key: &[u8]) -> Ticket {
        match cache.get(key) {
            Err(Some(t)) => t,
            Ok(_) => panic!("unexpected hit"),
            Err(None) => panic!("no ticket"),
        }
    }

    #[test]
    fn a_miss_then_an_offer_then_a_hit() {
        let cache = EntryCache::new(1 << 20);
        let t = ticket(&cache, b"k");
        cache.offer(t, &kv(b"k", b"v", 7));
        assert_eq!(cache.get(b"k").ok(), Some(kv(b"k", b"v", 7)));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 1, 1));
        assert_eq!(stats.bytes as usize, cost(3 + 2));
    }

    #[test]
    fn an_offer_made_across_a_commit_is_dropped() {
        let cache = EntryCache::new(1 << 20);
        // The reader takes its ticket, then a commit changes the key.
        let t = ticket(&cache, b"k");
        let flux = cache.invalidate([b"k".as_slice()].into_iter());
        // In flux: no ticket, no hit.
        assert!(matches!(cache.get(b"k"), Err(None)));
        cache.settle(flux, [b"k".as_slice()].into_iter(), Vec::new());
        // What the reader read may be the old value: it is not cached.
        cache.offer(t, &kv(b"k", b"old", 1));
        let t = ticket(&cache, b"k");
        cache.offer(t, &kv(b"k", b"new", 2));
        assert_eq!(cache.get(b"k").ok(), Some(kv(b"k", b"new", 2)));
    }

    /// A cache holding `a` and `b` with `value`, as readers offered them.
    fn holding_a_and_b(value: &[u8]) -> EntryCache {
        let cache = EntryCache::new(1 << 20);
        for key in [b"a", b"b"] {
            let t = ticket(&cache, key);
            cache.offer(t, &kv(key, value, 1));
        }
        cache
    }

    #[test]
    fn a_commit_drops_the_keys_it_changes_and_only_those() {
        let cache = holding_a_and_b(b"v");
        let flux = cache.invalidate([b"a".as_slice()].into_iter());
        // In flux: the shard is not read.
        assert!(matches!(cache.get(b"a"), Err(None)));
        cache.settle(flux, [b"a".as_slice()].into_iter(), Vec::new());
        assert!(matches!(cache.get(b"a"), Err(Some(_))));
        assert!(cache.get(b"b").is_ok());
    }

    #[test]
    fn the_budget_holds() {
        let budget = SHARDS * 1000;
        let cache = EntryCache::new(budget);
        for i in 0..10_000u32 {
            let key = i.to_be_bytes();
            if let Err(Some(t)) = cache.get(&key) {
                cache.offer(t, &kv(&key, &[7; 300], 1));
            }
        }
        let mut held = 0;
        for s in &cache.shards {
            let s = s.read().unwrap();
            assert!(s.bytes <= budget / SHARDS);
            let counted: usize = s.entries.iter().map(Cached::cost).sum();
            assert_eq!(s.bytes, counted);
            held += s.entries.len();
        }
        assert!(held > 0 && held < 10_000, "held {held}");
        // Too large for any shard: never cached.
        let t = ticket(&cache, b"big");
        cache.offer(t, &kv(b"big", &[0; 2000], 1));
        assert!(cache.get(b"big").is_err());
    }

    #[test]
    fn an_entry_keeps_its_revisions_key_and_value() {
        let cache = EntryCache::new(1 << 20);
        let entry = KeyValue {
            key: b"ctx\0fam\0key".to_vec(),
            value: vec![0xAB; 339],
            create_revision: 3,
            mod_revision: u64::MAX - 1,
            lease: None,
            lease_expires_at_ms: None,
        };
        let t = ticket(&cache, &entry.key);
        cache.offer(t, &entry);
        assert_eq!(cache.get(&entry.key).ok(), Some(entry));
        // Every varint length round-trips.
        for (i, revision) in [0, 127, 128, 16_383, 16_384, u64::MAX]
            .into_iter()
            .enumerate()
        {
            let key = vec![b'k'; 1 + i * 100];
            let entry = kv(&key, b"value", revision);
            let t = ticket(&cache, &key);
            cache.offer(t, &entry);
            assert_eq!(cache.get(&key).ok(), Some(entry));
        }
    }

    #[test]
    fn an_entry_is_counted_as_its_allocation_size_class() {
        // 8-byte steps to 64 bytes, then four classes per doubling.
        let classes = [
            (1, 8),
            (64, 64),
            (65, 80),
            (128, 128),
            (129, 160),
            (257, 320),
        ];
        for (len, class) in classes {
            assert_eq!(cost(len), class + OVERHEAD, "{len} bytes");
        }
    }

    #[test]
    fn a_commit_caches_what_it_admits_and_drops_the_rest() {
        let cache = holding_a_and_b(b"old");
        let admitted = cache.admit(b"a", 1, 2, b"new").expect("fits");
        let changed = [b"a".as_slice(), b"b".as_slice(), b"c".as_slice()];
        let flux = cache.invalidate(changed.into_iter());
        // What a reader took before the commit may be old: dropped.
        let late = Ticket {
            shard: EntryCache::shard_of(cache.hash(b"c")),
            generation: 0,
            hash: cache.hash(b"c"),
        };
        cache.settle(flux, changed.into_iter(), vec![admitted]);
        cache.offer(late, &kv(b"c", b"old", 1));
        assert_eq!(cache.get(b"a").ok(), Some(kv(b"a", b"new", 2)));
        assert_eq!(
            cache.peek(b"a", |c, m, v| (c, m, v.to_vec())),
            Some((1, 2, b"new".to_vec()))
        );
        assert!(matches!(cache.get(b"b"), Err(Some(_))));
        assert!(matches!(cache.get(b"c"), Err(Some(_))));
        // The writer's lookups are not counted as reads.
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.entries), (1, 1));
        // Too large for a shard: not admitted.
        assert!(cache.admit(b"big", 1, 2, &[0; 1 << 20]).is_none());
    }

    #[test]
    fn a_zero_budget_turns_it_off() {
        let cache = EntryCache::new(0);
        assert!(matches!(cache.get(b"k"), Err(None)));
        cache.invalidate([b"k".as_slice()].into_iter());
        assert!(cache.admit(b"k", 1, 2, b"v").is_none());
        assert_eq!(cache.peek(b"k", |_, m, _| m), None);
    }
}
