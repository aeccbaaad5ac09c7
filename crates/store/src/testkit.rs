//! The storage conformance suite: every engine must pass it unchanged.
//!
//! [`conformance`] checks each promise of [`Store`] with a fresh store;
//! [`model_based`] drives random operation sequences against a store and a
//! `BTreeMap` model side by side and compares every answer.

use crate::{Condition, EventKind, LeaseChoice, Put, Revision, Store, StoreError, ValueGuard};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

fn put(key: &[u8], value: &[u8], condition: Condition) -> Put {
    Put::new(key.to_vec(), value.to_vec(), condition)
}

/// Runs every conformance check, each against a new store made by `make`.
pub async fn conformance<S, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    revisions_and_cas(make().await).await;
    guarded_puts(make().await).await;
    prefix_scans(make().await).await;
    history_and_changes(make().await).await;
    leases(make().await).await;
    close_flushes(make().await).await;
}

async fn revisions_and_cas(s: impl Store) {
    assert_eq!(s.revision().await.unwrap(), 0);
    let r1 = s.put(put(b"a", b"1", Condition::Absent)).await.unwrap();
    assert_eq!(r1, 1);
    assert_eq!(
        s.put(put(b"a", b"x", Condition::Absent)).await,
        Err(StoreError::Conflict { current: Some(1) })
    );
    let r2 = s
        .put(put(b"a", b"2", Condition::Revision(r1)))
        .await
        .unwrap();
    assert_eq!(r2, 2);
    assert_eq!(
        s.put(put(b"a", b"3", Condition::Revision(r1))).await,
        Err(StoreError::Conflict { current: Some(2) })
    );
    let kv = s.get(b"a").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"2"[..], 1, 2)
    );
    assert_eq!(
        s.put(put(b"b", b"x", Condition::Exists)).await,
        Err(StoreError::Conflict { current: None })
    );
    assert_eq!(s.delete(b"b", Condition::None).await, Ok(None));
    assert_eq!(
        s.delete(b"a", Condition::Revision(1)).await,
        Err(StoreError::Conflict { current: Some(2) })
    );
    assert_eq!(s.delete(b"a", Condition::Revision(2)).await, Ok(Some(3)));
    assert_eq!(s.get(b"a").await.unwrap(), None);
    assert_eq!(s.revision().await.unwrap(), 3);
    // A new incarnation gets a new create revision.
    let r4 = s.put(put(b"a", b"new", Condition::Absent)).await.unwrap();
    assert_eq!(s.get(b"a").await.unwrap().unwrap().create_revision, r4);
    s.close().await.unwrap();
}

/// A put with a guard over values with a header: 4 bytes carried over, 4 bytes
/// checked against `expected`, then data.
fn header_guarded(
    key: &[u8],
    expected: &[u8],
    value: &[u8],
    condition: Condition,
    create: bool,
) -> Put {
    Put {
        guard: Some(ValueGuard {
            offset: 4,
            expected: expected.to_vec(),
            carry: 0..4,
            create,
        }),
        ..put(key, value, condition)
    }
}

async fn guarded_puts(s: impl Store) {
    s.put(put(b"g", b"KEEPtok1old", Condition::None))
        .await
        .unwrap();
    let guarded = |expected: &[u8], value: &[u8]| {
        header_guarded(b"g", expected, value, Condition::Exists, false)
    };
    assert_eq!(
        s.put(guarded(b"tok2", b"____tok2new")).await,
        Err(StoreError::Mismatch)
    );
    let r = s.put(guarded(b"tok1", b"____tok1new")).await.unwrap();
    let kv = s.get(b"g").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"KEEPtok1new"[..], r)
    );
    // The history and the change feed hold the value as written, carried bytes included.
    assert_eq!(s.history(b"g", 1).await.unwrap()[0].value, b"KEEPtok1new");
    // A guard needs an existing entry, and a carry inside both values.
    assert_eq!(
        s.put(Put {
            key: b"absent".to_vec(),
            ..guarded(b"tok1", b"____tok1new")
        })
        .await,
        Err(StoreError::Conflict { current: None })
    );
    assert_eq!(
        s.put(guarded(b"tok1", b"ab")).await,
        Err(StoreError::Mismatch)
    );
    assert_eq!(s.get(b"g").await.unwrap().unwrap().mod_revision, r);

    // A guard that creates: without a live entry the value is stored as given.
    let creating = |key: &[u8], expected: &[u8], value: &[u8], condition| {
        header_guarded(key, expected, value, condition, true)
    };
    let made = s
        .put_outcome(creating(b"c", b"tok1", b"KEEPtok1v1", Condition::None))
        .await
        .unwrap();
    assert!(made.created);
    let kv = s.get(b"c").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"KEEPtok1v1"[..], made.revision, made.revision)
    );
    // With a live entry it is an ordinary guard: checked, carried, not a create.
    let modified = s
        .put_outcome(creating(b"c", b"tok1", b"____tok1v2", Condition::None))
        .await
        .unwrap();
    assert!(!modified.created);
    let kv = s.get(b"c").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"KEEPtok1v2"[..], made.revision, modified.revision)
    );
    assert_eq!(
        s.put(creating(b"c", b"tok2", b"____tok2v3", Condition::None))
            .await,
        Err(StoreError::Mismatch)
    );
    // The condition is decided first.
    assert_eq!(
        s.put(creating(b"c", b"tok1", b"____tok1v3", Condition::Absent))
            .await,
        Err(StoreError::Conflict {
            current: Some(modified.revision)
        })
    );
    assert_eq!(
        s.put(creating(b"d", b"tok1", b"KEEPtok1v1", Condition::Exists))
            .await,
        Err(StoreError::Conflict { current: None })
    );
    // After a delete, the next one is a new incarnation.
    s.delete(b"c", Condition::None).await.unwrap();
    let again = s
        .put_outcome(creating(b"c", b"tok9", b"NEWWtok9v1", Condition::None))
        .await
        .unwrap();
    assert!(again.created);
    let kv = s.get(b"c").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision),
        (&b"NEWWtok9v1"[..], again.revision)
    );
    // Unguarded puts report creation too.
    assert!(
        s.put_outcome(put(b"u", b"1", Condition::None))
            .await
            .unwrap()
            .created
    );
    assert!(
        !s.put_outcome(put(b"u", b"2", Condition::None))
            .await
            .unwrap()
            .created
    );
    s.close().await.unwrap();
}

async fn prefix_scans(s: impl Store) {
    for k in ["p/a", "p/b", "p/c", "p/d", "p0", "q/a", "p"] {
        s.put(put(k.as_bytes(), k.as_bytes(), Condition::None))
            .await
            .unwrap();
    }
    let keys = |page: &crate::Page| -> Vec<String> {
        page.items
            .iter()
            .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
            .collect()
    };
    let first = s.range(b"p/", None, 2).await.unwrap();
    assert_eq!(keys(&first), ["p/a", "p/b"]);
    assert!(first.more);
    let second = s.range(b"p/", Some(b"p/b"), 2).await.unwrap();
    assert_eq!(keys(&second), ["p/c", "p/d"]);
    assert!(!second.more);
    let all = s.range(b"", None, 100).await.unwrap();
    assert_eq!(keys(&all), ["p", "p/a", "p/b", "p/c", "p/d", "p0", "q/a"]);
    assert!(s.range(b"r", None, 10).await.unwrap().items.is_empty());
    assert_eq!(s.entry_count().await.unwrap(), 7);
    s.close().await.unwrap();
}

async fn history_and_changes(s: impl Store) {
    let mut rx = s.subscribe();
    s.put(put(b"h", b"1", Condition::None)).await.unwrap();
    s.put(put(b"other", b"x", Condition::None)).await.unwrap();
    s.put(put(b"h", b"2", Condition::None)).await.unwrap();
    s.delete(b"h", Condition::None).await.unwrap();
    let hist = s.history(b"h", 10).await.unwrap();
    let summary: Vec<(Revision, EventKind, &[u8])> = hist
        .iter()
        .map(|e| (e.revision, e.kind, e.value.as_slice()))
        .collect();
    assert_eq!(
        summary,
        [
            (4, EventKind::Delete, &b"2"[..]),
            (3, EventKind::Put, b"2"),
            (1, EventKind::Put, b"1")
        ]
    );
    assert_eq!(s.history(b"h", 1).await.unwrap().len(), 1);
    let changes = s.changes(2, 10).await.unwrap();
    assert_eq!(
        changes.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    for want in 1..=4 {
        assert_eq!(rx.recv().await.unwrap().revision, want);
    }
    // Compaction drops old history and the feed says so.
    assert_eq!(s.compact_history(crate::now_ms() + 1).await.unwrap(), 4);
    assert!(s.history(b"h", 10).await.unwrap().is_empty());
    assert_eq!(
        s.changes(1, 10).await,
        Err(StoreError::Compacted { compacted: 4 })
    );
    assert_eq!(s.changes(5, 10).await, Ok(vec![]));
    s.close().await.unwrap();
}

/// Sleeps until the store's clock (`now_ms`) reaches `at_ms`.
async fn sleep_until_ms(at_ms: u64) {
    let now = crate::now_ms();
    if at_ms > now {
        tokio::time::sleep(Duration::from_millis(at_ms - now)).await;
    }
}

async fn leases(s: impl Store) {
    // Times are relative to the lease's own expiry, with half a second of margin
    // for a slow machine.
    let lease = s.grant_lease(Duration::from_secs(1)).await.unwrap();
    let mut p = put(b"l", b"v", Condition::None);
    p.lease = LeaseChoice::Set(lease.id);
    s.put(p).await.unwrap();
    assert_eq!(s.get(b"l").await.unwrap().unwrap().lease, Some(lease.id));
    // A put that keeps the lease stays attached.
    s.put(put(b"l", b"v2", Condition::Exists)).await.unwrap();
    assert_eq!(s.get(b"l").await.unwrap().unwrap().lease, Some(lease.id));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let renewed = s.keep_alive(lease.id).await.unwrap();
    assert!(renewed.expires_at_ms >= lease.expires_at_ms + 500);
    // Past the first expiry, before the renewed one.
    sleep_until_ms(lease.expires_at_ms + 50).await;
    assert!(
        s.get(b"l").await.unwrap().is_some(),
        "renewed lease keeps its entry"
    );
    sleep_until_ms(renewed.expires_at_ms + 50).await;
    // Expired: gone for readers before any sweep.
    assert_eq!(s.get(b"l").await.unwrap(), None);
    assert!(s.range(b"", None, 10).await.unwrap().items.is_empty());
    assert_eq!(
        s.keep_alive(lease.id).await,
        Err(StoreError::LeaseNotFound(lease.id))
    );
    assert_eq!(s.sweep_expired_leases().await.unwrap(), 1);
    assert_eq!(s.entry_count().await.unwrap(), 0);
    assert_eq!(s.history(b"l", 1).await.unwrap()[0].kind, EventKind::Delete);
    // Revoking deletes the attached entries at once.
    let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    let mut p = put(b"r", b"v", Condition::None);
    p.lease = LeaseChoice::Set(lease.id);
    s.put(p).await.unwrap();
    s.revoke_lease(lease.id).await.unwrap();
    assert_eq!(s.get(b"r").await.unwrap(), None);
    assert_eq!(s.lease(lease.id).await.unwrap(), None);
    let mut p = put(b"r", b"v", Condition::None);
    p.lease = LeaseChoice::Set(lease.id);
    assert_eq!(s.put(p).await, Err(StoreError::LeaseNotFound(lease.id)));
    s.close().await.unwrap();
}

async fn close_flushes(s: impl Store) {
    for i in 0..100u32 {
        s.put(put(&i.to_be_bytes(), b"v", Condition::None))
            .await
            .unwrap();
    }
    s.close().await.unwrap();
    assert!(matches!(
        s.put(put(b"late", b"v", Condition::None)).await,
        Err(StoreError::Unavailable(_))
    ));
}

/// One operation of the model-based test.
#[derive(Debug, Clone)]
pub enum ModelOp {
    /// Put key `k` with a value and a condition.
    Put(usize, u8, ModelCond),
    /// Delete key `k` with a condition.
    Delete(usize, ModelCond),
    /// Read key `k`.
    Get(usize),
    /// Scan a prefix with a page size.
    Range(usize, usize),
    /// Read the history of key `k`.
    History(usize),
}

/// A condition in the model-based test.
#[derive(Debug, Clone, Copy)]
pub enum ModelCond {
    /// No condition.
    None,
    /// Create only.
    Absent,
    /// Must exist.
    Exists,
    /// The current revision (when `true`) or a stale one.
    Revision(bool),
}

const KEYS: &[&[u8]] = &[b"a", b"ab", b"a\0b", b"b", b"ba", b"", b"\xff"];
const PREFIXES: &[&[u8]] = &[b"", b"a", b"ab", b"b", b"c"];

/// A strategy for operation sequences.
pub fn ops() -> impl Strategy<Value = Vec<ModelOp>> {
    let cond = prop_oneof![
        Just(ModelCond::None),
        Just(ModelCond::Absent),
        Just(ModelCond::Exists),
        any::<bool>().prop_map(ModelCond::Revision),
    ];
    let op = prop_oneof![
        (0..KEYS.len(), any::<u8>(), cond.clone()).prop_map(|(k, v, c)| ModelOp::Put(k, v, c)),
        (0..KEYS.len(), cond).prop_map(|(k, c)| ModelOp::Delete(k, c)),
        (0..KEYS.len()).prop_map(ModelOp::Get),
        (0..PREFIXES.len(), 1usize..4).prop_map(|(p, l)| ModelOp::Range(p, l)),
        (0..KEYS.len()).prop_map(ModelOp::History),
    ];
    proptest::collection::vec(op, 1..60)
}

/// Applies `ops` to `store` and to a `BTreeMap` model, comparing every answer.
pub async fn model_based(store: impl Store, ops: Vec<ModelOp>) {
    // key -> (value, create revision, mod revision)
    let mut model: BTreeMap<Vec<u8>, (Vec<u8>, Revision, Revision)> = BTreeMap::new();
    let mut history: BTreeMap<Vec<u8>, Vec<(Revision, EventKind)>> = BTreeMap::new();
    let mut rev: Revision = 0;
    for op in ops {
        match op {
            ModelOp::Put(k, v, c) => {
                let key = KEYS[k].to_vec();
                let cur = model.get(&key).map(|e| e.2);
                let (cond, holds) = model_cond(c, cur);
                let got = store.put(put(&key, &[v], cond)).await;
                if holds {
                    rev += 1;
                    let create = model.get(&key).map(|e| e.1).unwrap_or(rev);
                    model.insert(key.clone(), (vec![v], create, rev));
                    history.entry(key).or_default().push((rev, EventKind::Put));
                    assert_eq!(got, Ok(rev));
                } else {
                    assert_eq!(got, Err(StoreError::Conflict { current: cur }));
                }
            }
            ModelOp::Delete(k, c) => {
                let key = KEYS[k].to_vec();
                let cur = model.get(&key).map(|e| e.2);
                let (cond, holds) = model_cond(c, cur);
                let got = store.delete(&key, cond).await;
                match (holds, cur) {
                    (false, _) => assert_eq!(got, Err(StoreError::Conflict { current: cur })),
                    (true, None) => assert_eq!(got, Ok(None)),
                    (true, Some(_)) => {
                        rev += 1;
                        model.remove(&key);
                        history
                            .entry(key)
                            .or_default()
                            .push((rev, EventKind::Delete));
                        assert_eq!(got, Ok(Some(rev)));
                    }
                }
            }
            ModelOp::Get(k) => {
                let got = store.get(KEYS[k]).await.unwrap();
                let want = model.get(KEYS[k]);
                assert_eq!(
                    got.map(|kv| (kv.value, kv.create_revision, kv.mod_revision)),
                    want.cloned()
                );
            }
            ModelOp::Range(p, limit) => {
                // Page through the whole prefix and compare with the model's order.
                let prefix = PREFIXES[p];
                let mut seen = Vec::new();
                let mut after: Option<Vec<u8>> = None;
                loop {
                    let page = store.range(prefix, after.as_deref(), limit).await.unwrap();
                    assert!(page.items.len() <= limit);
                    seen.extend(
                        page.items
                            .iter()
                            .map(|kv| (kv.key.clone(), kv.value.clone())),
                    );
                    after = page.items.last().map(|kv| kv.key.clone());
                    if !page.more {
                        break;
                    }
                }
                let want: Vec<_> = model
                    .iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect();
                assert_eq!(seen, want);
            }
            ModelOp::History(k) => {
                let got: Vec<_> = store
                    .history(KEYS[k], 100)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|e| (e.revision, e.kind))
                    .collect();
                let mut want = history.get(KEYS[k]).cloned().unwrap_or_default();
                want.reverse();
                assert_eq!(got, want);
            }
        }
    }
    assert_eq!(store.revision().await.unwrap(), rev);
    assert_eq!(store.entry_count().await.unwrap(), model.len() as u64);
    // The change feed holds every change, in order.
    let mut feed: Vec<_> = history
        .iter()
        .flat_map(|(k, events)| events.iter().map(move |(r, kind)| (*r, *kind, k.clone())))
        .collect();
    feed.sort_by_key(|e| e.0);
    let got: Vec<_> = store
        .changes(1, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.revision, e.kind, e.key))
        .collect();
    assert_eq!(got, feed);
    store.close().await.unwrap();
}

fn model_cond(c: ModelCond, cur: Option<Revision>) -> (Condition, bool) {
    match c {
        ModelCond::None => (Condition::None, true),
        ModelCond::Absent => (Condition::Absent, cur.is_none()),
        ModelCond::Exists => (Condition::Exists, cur.is_some()),
        ModelCond::Revision(true) => match cur {
            Some(r) => (Condition::Revision(r), true),
            None => (Condition::Revision(1), false),
        },
        ModelCond::Revision(false) => {
            let stale = cur.map(|r| r + 1000).unwrap_or(7);
            (Condition::Revision(stale), false)
        }
    }
}
