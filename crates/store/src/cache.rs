//! The entry cache: recently read entries, kept in memory so that a hot read costs
//! a hash lookup instead of a B-tree descent through the page cache.
//!
//! It is kept exact by the writer, without ever making a reader wait for a commit:
//!
//! - The cache is split in shards, each a map under its own lock and a generation
//!   counter. The lock is held only for one map operation, never across a commit.
//! - Before it commits a batch, the writer removes every key the batch changed and
//!   makes the generation of each shard they fall in odd ("in flux"); after the
//!   commit it removes the keys again and makes the generation even.
//! - A reader does not use a shard in flux: while a commit is publishing its
//!   changes, readers of the shard go to the B-tree, whose snapshots are ordered, so
//!   no reader can see an old value after another has seen the new one.
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

use crate::{CacheStats, KeyValue, Revision};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

const SHARDS: usize = 256;
/// Bytes counted for one entry beyond its key and value: the map slot (48 bytes,
/// with the free slots a hash map keeps), two allocations, their rounding and the
/// allocator's free space between them. Measured: a full cache of 256-byte values
/// grows the server's resident memory by about its budget.
const OVERHEAD: usize = 256;

/// What a reader that missed holds while it reads the B-tree.
#[derive(Clone, Copy)]
pub(crate) struct Ticket {
    shard: usize,
    generation: u64,
}

/// A cached entry without its key (the map's key) and lease (entries with one are
/// not cached).
struct Cached {
    value: Box<[u8]>,
    create_revision: Revision,
    mod_revision: Revision,
}

fn cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + OVERHEAD
}

struct Shard {
    generation: u64,
    bytes: usize,
    entries: HashMap<Box<[u8]>, Cached>,
    // Counted under the read lock; one pair per shard keeps readers of different
    // shards off each other's cache lines.
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Shard {
    fn remove(&mut self, key: &[u8]) {
        if let Some((key, old)) = self.entries.remove_entry(key) {
            self.bytes -= cost(&key, &old.value);
        }
    }
}

/// The shards a batch touched, as a bit set.
#[derive(Default)]
pub(crate) struct Touched([u64; SHARDS / 64]);

impl Touched {
    fn insert(&mut self, shard: usize) {
        self.0[shard / 64] |= 1 << (shard % 64);
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..SHARDS).filter(|s| self.0[s / 64] & (1 << (s % 64)) != 0)
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
                        entries: HashMap::new(),
                        hits: AtomicU64::new(0),
                        misses: AtomicU64::new(0),
                    })
                })
                .collect(),
        }
    }

    fn shard_of(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) % SHARDS as u64) as usize
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
        let shard = self.shard_of(key);
        let s = self.shards[shard].read().unwrap_or_else(|p| p.into_inner());
        if s.generation % 2 == 1 {
            s.misses.fetch_add(1, Ordering::Relaxed);
            return Err(None);
        }
        let found = s.entries.get(key);
        let counter = if found.is_some() { &s.hits } else { &s.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        match found {
            Some(c) => Ok(KeyValue {
                key: key.to_vec(),
                value: c.value.to_vec(),
                create_revision: c.create_revision,
                mod_revision: c.mod_revision,
                lease: None,
            }),
            None => Err(Some(Ticket {
                shard,
                generation: s.generation,
            })),
        }
    }

    /// Caches what a reader holding `ticket` read, unless a commit touched the
    /// shard since the ticket was taken. `kv` has no lease.
    pub(crate) fn offer(&self, ticket: Ticket, kv: &KeyValue) {
        debug_assert!(kv.lease.is_none());
        let size = cost(&kv.key, &kv.value);
        if size > self.shard_budget {
            return;
        }
        let mut s = self.shards[ticket.shard]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if s.generation != ticket.generation || s.entries.contains_key(kv.key.as_slice()) {
            return;
        }
        while s.bytes + size > self.shard_budget {
            let Some(victim) = s.entries.keys().next().cloned() else {
                break;
            };
            s.remove(&victim);
        }
        s.bytes += size;
        s.entries.insert(
            kv.key.as_slice().into(),
            Cached {
                value: kv.value.as_slice().into(),
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
            },
        );
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

    /// Drops `keys` and moves the generation of their shards on: called by the
    /// writer before a commit (leaving the shards in flux) and after it (settling
    /// them), with the same keys.
    pub(crate) fn invalidate<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) {
        if !self.enabled() {
            return;
        }
        let mut touched = Touched::default();
        for key in keys {
            let shard = self.shard_of(key);
            touched.insert(shard);
            self.shards[shard]
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
        }
        for shard in touched.iter() {
            let mut s = self.shards[shard]
                .write()
                .unwrap_or_else(|p| p.into_inner());
            s.generation += 1;
        }
    }
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
        assert_eq!(stats.bytes as usize, cost(b"k", b"v"));
    }

    #[test]
    fn an_offer_made_across_a_commit_is_dropped() {
        let cache = EntryCache::new(1 << 20);
        // The reader takes its ticket, then a commit changes the key.
        let t = ticket(&cache, b"k");
        cache.invalidate([b"k".as_slice()].into_iter());
        // In flux: no ticket, no hit.
        assert!(matches!(cache.get(b"k"), Err(None)));
        cache.invalidate([b"k".as_slice()].into_iter());
        // What the reader read may be the old value: it is not cached.
        cache.offer(t, &kv(b"k", b"old", 1));
        let t = ticket(&cache, b"k");
        cache.offer(t, &kv(b"k", b"new", 2));
        assert_eq!(cache.get(b"k").ok(), Some(kv(b"k", b"new", 2)));
    }

    #[test]
    fn a_commit_drops_the_keys_it_changes_and_only_those() {
        let cache = EntryCache::new(1 << 20);
        for key in [b"a", b"b"] {
            let t = ticket(&cache, key);
            cache.offer(t, &kv(key, b"v", 1));
        }
        cache.invalidate([b"a".as_slice()].into_iter());
        cache.invalidate([b"a".as_slice()].into_iter());
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
            let counted: usize = s.entries.iter().map(|(k, c)| cost(k, &c.value)).sum();
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
    fn a_zero_budget_turns_it_off() {
        let cache = EntryCache::new(0);
        assert!(matches!(cache.get(b"k"), Err(None)));
        cache.invalidate([b"k".as_slice()].into_iter());
    }
}
