//! The history (the change feed) in redb: events in chunks.
//!
//! Every put and delete is an event under its revision. Stored one B-tree entry per
//! event, the checkpoint spent about as much CPU on inserting them as on everything
//! else it does (1.8-2 µs per put of its 2.6-3.3, measured with the inserts left
//! out; see docs/design/put-path.md). The table `history` holds them in chunks
//! instead: up to [`CHUNK_EVENTS`] events in revision order (fewer where more
//! would pass [`CHUNK_BYTES`]), under the revision of the chunk's first event. A
//! checkpoint appends the overlay's events as a few chunks; a barrier batch appends
//! its events as chunks when it ends.
//!
//! A chunk is a sequence of `revision (u64 BE) | length (u32 BE) | event`, each
//! event as [`encode_event`] writes it, with revisions growing. Chunks do not
//! overlap: the next chunk's first revision is above this chunk's last one.
//!
//! Reading one event (a key's history is a chain of them) finds the chunk that
//! starts at or before its revision and walks it; reading from a revision (the
//! change feed) starts in that chunk and goes on through the later ones.
//! Compaction removes the whole chunks that are old enough and rewrites the chunk
//! it stops in without its older events, so the horizon stays exact.

use crate::redb::backend;
use crate::{Event, EventKind, Result, Revision, StoreError};
use redb::{ReadableTable, TableDefinition, TableHandle};

pub(crate) const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");

/// The most events in one chunk.
const CHUNK_EVENTS: usize = 64;
/// The most bytes in a chunk of more than one event: with redb's leaf header it
/// fits a 16 KiB page (redb's pages come in powers of two, so a little more would
/// take and write 32 KiB).
const CHUNK_BYTES: usize = 16 * 1024 - 256;
/// Revision and length before each event in a chunk.
const EVENT_HEAD: usize = 12;

/// A log event: kind, time, the revision of the key's previous event (0: none),
/// the key, the value.
pub(crate) fn encode_event(
    kind: EventKind,
    at_ms: u64,
    prev: Revision,
    key: &[u8],
    value: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(21 + key.len() + value.len());
    out.push(match kind {
        EventKind::Put => 1,
        EventKind::Delete => 2,
    });
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.extend_from_slice(&prev.to_be_bytes());
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

/// Decodes a log event; answers it with the revision of the key's previous event.
pub(crate) fn decode_event(revision: Revision, bytes: &[u8]) -> Result<(Event, Revision)> {
    let bad = || StoreError::Corrupted(format!("log record {revision} is malformed"));
    if bytes.len() < 21 {
        return Err(bad());
    }
    let kind = match bytes[0] {
        1 => EventKind::Put,
        2 => EventKind::Delete,
        _ => return Err(bad()),
    };
    let at_ms = u64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes"));
    let prev = u64::from_be_bytes(bytes[9..17].try_into().expect("8 bytes"));
    let key_len = u32::from_be_bytes(bytes[17..21].try_into().expect("4 bytes")) as usize;
    let key = bytes.get(21..21 + key_len).ok_or_else(bad)?.to_vec();
    let event = Event {
        revision,
        kind,
        key,
        value: bytes[21 + key_len..].to_vec(),
        at_ms,
    };
    Ok((event, prev))
}

/// A log event's kind and time, without decoding the rest.
pub(crate) fn event_head(revision: Revision, bytes: &[u8]) -> Result<(EventKind, u64)> {
    let bad = || StoreError::Corrupted(format!("log record {revision} is malformed"));
    let kind = match bytes.first() {
        Some(1) => EventKind::Put,
        Some(2) => EventKind::Delete,
        _ => return Err(bad()),
    };
    let at_ms = bytes.get(1..9).ok_or_else(bad)?;
    Ok((kind, u64::from_be_bytes(at_ms.try_into().expect("8 bytes"))))
}

/// Builds chunks from events in revision order.
#[derive(Default)]
pub(crate) struct ChunkBuilder {
    first: Option<Revision>,
    count: usize,
    bytes: Vec<u8>,
    done: Vec<(Revision, Vec<u8>)>,
}

impl ChunkBuilder {
    pub(crate) fn push(&mut self, revision: Revision, event: &[u8]) {
        let len = u32::try_from(event.len()).expect("an event is smaller than 4 GiB");
        if self.bytes.len() + EVENT_HEAD + event.len() > CHUNK_BYTES {
            self.close();
        }
        self.first.get_or_insert(revision);
        self.bytes.reserve(EVENT_HEAD + event.len());
        self.bytes.extend_from_slice(&revision.to_be_bytes());
        self.bytes.extend_from_slice(&len.to_be_bytes());
        self.bytes.extend_from_slice(event);
        self.count += 1;
        if self.count == CHUNK_EVENTS {
            self.close();
        }
    }

    fn close(&mut self) {
        if let Some(first) = self.first.take() {
            self.done.push((first, std::mem::take(&mut self.bytes)));
            self.count = 0;
        }
    }

    /// Inserts every chunk built so far into `table`.
    pub(crate) fn write(&mut self, table: &mut redb::Table<u64, &[u8]>) -> Result<()> {
        self.close();
        for (first, chunk) in self.done.drain(..) {
            table.insert(first, chunk.as_slice()).map_err(backend)?;
        }
        Ok(())
    }
}

/// Appends events (in revision order, above every revision `table` holds).
pub(crate) fn append<'e>(
    table: &mut redb::Table<u64, &[u8]>,
    events: impl IntoIterator<Item = (Revision, &'e [u8])>,
) -> Result<()> {
    let mut chunks = ChunkBuilder::default();
    for (revision, event) in events {
        chunks.push(revision, event);
    }
    chunks.write(table)
}

/// The events of the chunk stored under `first`, in order.
pub(crate) fn chunk_events(first: Revision, chunk: &[u8]) -> ChunkEvents<'_> {
    ChunkEvents {
        first,
        chunk,
        at: 0,
        last: None,
    }
}

pub(crate) struct ChunkEvents<'c> {
    first: Revision,
    chunk: &'c [u8],
    at: usize,
    last: Option<Revision>,
}

impl<'c> Iterator for ChunkEvents<'c> {
    type Item = Result<(Revision, &'c [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.chunk.len() {
            return None;
        }
        let bad = || {
            StoreError::Corrupted(format!(
                "history chunk {} is malformed at byte {}",
                self.first, self.at
            ))
        };
        let parsed = self
            .chunk
            .get(self.at..self.at + EVENT_HEAD)
            .and_then(|head| {
                let revision = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
                let len = u32::from_be_bytes(head[8..].try_into().expect("4 bytes")) as usize;
                let start = self.at + EVENT_HEAD;
                let event = self.chunk.get(start..start.checked_add(len)?)?;
                let in_order = match self.last {
                    None => revision == self.first,
                    Some(last) => revision > last,
                };
                in_order.then_some((revision, event, start + len))
            });
        match parsed {
            Some((revision, event, next)) => {
                self.at = next;
                self.last = Some(revision);
                Some(Ok((revision, event)))
            }
            None => {
                let e = bad();
                self.at = self.chunk.len();
                Some(Err(e))
            }
        }
    }
}

/// The event under `revision`, with the revision of its key's previous event.
pub(crate) fn get(
    table: &impl ReadableTable<u64, &'static [u8]>,
    revision: Revision,
) -> Result<Option<(Event, Revision)>> {
    let Some(item) = table.range(..=revision).map_err(backend)?.next_back() else {
        return Ok(None);
    };
    let (first, chunk) = item.map_err(backend)?;
    for event in chunk_events(first.value(), chunk.value()) {
        let (r, bytes) = event?;
        if r == revision {
            return decode_event(r, bytes).map(Some);
        }
        if r > revision {
            break;
        }
    }
    Ok(None)
}

/// Appends to `out` the events from revision `from` on, until `out` holds `limit`.
pub(crate) fn read_from(
    table: &impl ReadableTable<u64, &'static [u8]>,
    from: Revision,
    limit: usize,
    out: &mut Vec<Event>,
) -> Result<()> {
    // The chunk that holds `from`, if any, starts at or before it.
    let start = match table.range(..=from).map_err(backend)?.next_back() {
        Some(item) => item.map_err(backend)?.0.value(),
        None => from,
    };
    for item in table.range(start..).map_err(backend)? {
        let (first, chunk) = item.map_err(backend)?;
        for event in chunk_events(first.value(), chunk.value()) {
            let (r, bytes) = event?;
            if r < from {
                continue;
            }
            if out.len() >= limit {
                return Ok(());
            }
            out.push(decode_event(r, bytes)?.0);
        }
    }
    Ok(())
}

/// What [`compact`] removed.
pub(crate) struct Compacted {
    /// How many events.
    pub(crate) count: usize,
    /// The newest of them.
    pub(crate) last: Option<Revision>,
    /// The deletions among them: revision and key.
    pub(crate) deletions: Vec<(Revision, Vec<u8>)>,
}

/// Removes the oldest events, up to `step` of them, as far as they are older than
/// `before_ms` (in revision order: it stops at the first event that is not).
pub(crate) fn compact(
    table: &mut redb::Table<u64, &[u8]>,
    before_ms: u64,
    step: usize,
) -> Result<Compacted> {
    let mut removed = Compacted {
        count: 0,
        last: None,
        deletions: Vec::new(),
    };
    let mut whole = Vec::new();
    // The chunk it stops in: its key, and the events it keeps.
    let mut partial: Option<(Revision, ChunkBuilder)> = None;
    'chunks: for item in table.iter().map_err(backend)? {
        let (first, chunk) = item.map_err(backend)?;
        let first = first.value();
        let mut events = chunk_events(first, chunk.value());
        while let Some(event) = events.next() {
            let (revision, bytes) = event?;
            let (kind, at_ms) = event_head(revision, bytes)?;
            if at_ms >= before_ms || removed.count == step {
                if revision != first {
                    let mut kept = ChunkBuilder::default();
                    kept.push(revision, bytes);
                    for rest in events {
                        let (r, b) = rest?;
                        kept.push(r, b);
                    }
                    partial = Some((first, kept));
                }
                break 'chunks;
            }
            if kind == EventKind::Delete {
                removed
                    .deletions
                    .push((revision, decode_event(revision, bytes)?.0.key));
            }
            removed.count += 1;
            removed.last = Some(revision);
        }
        whole.push(first);
    }
    for first in whole {
        table.remove(first).map_err(backend)?;
    }
    if let Some((first, mut kept)) = partial {
        table.remove(first).map_err(backend)?;
        kept.write(table)?;
    }
    Ok(removed)
}

/// Moves the `log` table (one entry per event: this store's format until
/// 2026-12-07) into `history`, in the transaction that opens the store.
pub(crate) fn migrate_log(txn: &redb::WriteTransaction) -> Result<()> {
    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
    let mut tables = txn.list_tables().map_err(backend)?;
    if !tables.any(|t| t.name() == LOG.name()) {
        return Ok(());
    }
    {
        let log = txn.open_table(LOG).map_err(backend)?;
        let mut history = txn.open_table(HISTORY).map_err(backend)?;
        let mut chunks = ChunkBuilder::default();
        let mut count = 0u64;
        for item in log.iter().map_err(backend)? {
            let (revision, event) = item.map_err(backend)?;
            chunks.push(revision.value(), event.value());
            count += 1;
            if chunks.done.len() >= 64 {
                chunks.write(&mut history)?;
            }
        }
        chunks.write(&mut history)?;
        if count > 0 {
            tracing::info!(events = count, "moved the log table into history chunks");
        }
    }
    txn.delete_table(LOG).map_err(backend)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, ReadableTableMetadata};

    fn event(revision: Revision, at_ms: u64, value_len: usize) -> Vec<u8> {
        let kind = if revision.is_multiple_of(7) {
            EventKind::Delete
        } else {
            EventKind::Put
        };
        let key = format!("k{}", revision % 13);
        encode_event(
            kind,
            at_ms,
            revision.saturating_sub(13),
            key.as_bytes(),
            &vec![b'v'; value_len],
        )
    }

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("h.redb")).unwrap();
        (dir, db)
    }

    /// Writes events 1..=n (the time of event r is r ms), in appends of `per`.
    fn write(db: &Database, n: u64, per: u64, value_len: usize) {
        let mut r = 1;
        while r <= n {
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(HISTORY).unwrap();
                let events: Vec<_> = (r..=n.min(r + per - 1))
                    .map(|r| (r, event(r, r, value_len)))
                    .collect();
                append(&mut t, events.iter().map(|(r, e)| (*r, e.as_slice()))).unwrap();
            }
            txn.commit().unwrap();
            r += per;
        }
    }

    fn read_all(db: &Database, from: Revision, limit: usize) -> Vec<Revision> {
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(HISTORY).unwrap();
        let mut out = Vec::new();
        read_from(&t, from, limit, &mut out).unwrap();
        out.iter().map(|e| e.revision).collect()
    }

    #[test]
    fn every_event_reads_back_alone_and_in_order() {
        let (_dir, db) = db();
        // Appends of 1, 100 and 300 events; large values close chunks early.
        write(&db, 1, 1, 10);
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(HISTORY).unwrap();
            let events: Vec<_> = (2..=101).map(|r| (r, event(r, r, 10))).collect();
            append(&mut t, events.iter().map(|(r, e)| (*r, e.as_slice()))).unwrap();
            let events: Vec<_> = (102..=401).map(|r| (r, event(r, r, 3000))).collect();
            append(&mut t, events.iter().map(|(r, e)| (*r, e.as_slice()))).unwrap();
        }
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(HISTORY).unwrap();
        // 1 + 2 (64 + 36) + 300 / 5 (five 3 KiB events fit in a chunk).
        assert_eq!(t.len().unwrap(), 1 + 2 + 60);
        for r in 1..=401 {
            let (e, prev) = get(&t, r).unwrap().expect("every event is found");
            assert_eq!(e.revision, r);
            assert_eq!(e.at_ms, r);
            assert_eq!(e.key, format!("k{}", r % 13).into_bytes());
            assert_eq!(prev, r.saturating_sub(13));
        }
        assert!(get(&t, 0).unwrap().is_none());
        assert!(get(&t, 402).unwrap().is_none());
        drop((t, txn));
        assert_eq!(read_all(&db, 1, usize::MAX), (1..=401).collect::<Vec<_>>());
        assert_eq!(read_all(&db, 60, 10), (60..70).collect::<Vec<_>>());
        assert_eq!(
            read_all(&db, 150, usize::MAX),
            (150..=401).collect::<Vec<_>>()
        );
        assert!(read_all(&db, 402, 10).is_empty());
    }

    #[test]
    fn compaction_removes_exactly_the_old_events_in_steps() {
        let (_dir, db) = db();
        write(&db, 500, 100, 10);
        let compact_once = |before_ms, step| {
            let txn = db.begin_write().unwrap();
            let removed = {
                let mut t = txn.open_table(HISTORY).unwrap();
                compact(&mut t, before_ms, step).unwrap()
            };
            txn.commit().unwrap();
            removed
        };
        // Stops inside a chunk: events 1..=99 go, 100 on stay.
        let removed = compact_once(100, 10_000);
        assert_eq!((removed.count, removed.last), (99, Some(99)));
        let deleted: Vec<_> = removed.deletions.iter().map(|d| d.0).collect();
        assert_eq!(deleted, (7..100).step_by(7).collect::<Vec<_>>());
        assert_eq!(removed.deletions[0].1, b"k7".to_vec());
        assert_eq!(
            read_all(&db, 0, usize::MAX),
            (100..=500).collect::<Vec<_>>()
        );
        // The step bounds a call.
        let removed = compact_once(1000, 30);
        assert_eq!((removed.count, removed.last), (30, Some(129)));
        assert_eq!(
            read_all(&db, 0, usize::MAX),
            (130..=500).collect::<Vec<_>>()
        );
        // Nothing old enough: nothing changes.
        let removed = compact_once(130, 10_000);
        assert_eq!((removed.count, removed.last), (0, None));
        // Everything.
        let removed = compact_once(1000, 10_000);
        assert_eq!((removed.count, removed.last), (371, Some(500)));
        assert!(read_all(&db, 0, usize::MAX).is_empty());
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(HISTORY).unwrap().is_empty().unwrap());
    }

    #[test]
    fn a_malformed_chunk_is_an_error() {
        let mut chunks = ChunkBuilder::default();
        for r in 5..8 {
            chunks.push(r, &event(r, r, 10));
        }
        chunks.close();
        let (first, good) = chunks.done.pop().unwrap();
        assert_eq!(first, 5);
        assert_eq!(chunk_events(first, &good).count(), 3);
        let errors = |chunk: &[u8], first| {
            chunk_events(first, chunk)
                .filter(|e| matches!(e, Err(StoreError::Corrupted(_))))
                .count()
        };
        // Cut short, under another first revision, or out of order.
        assert_eq!(errors(&good[..good.len() - 1], 5), 1);
        assert_eq!(errors(&good, 4), 1);
        let mut swapped = good.clone();
        swapped[..8].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(errors(&swapped, 9), 1);
        let mut long = good.clone();
        long[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(errors(&long, 5), 1);
    }
}
