//! Watches: the changes under a context or a family as Server-Sent Events, from a
//! given revision on, so that a client that reconnects with `Last-Event-ID` misses
//! nothing.
//!
//! One dispatcher task follows the store's change feed. It renders each change once,
//! as the SSE frame every receiver shares, and hands it to the watchers registered
//! under the change's family and context: a change costs two map lookups and one
//! token comparison per watcher of its own family and context, never a visit to
//! every watcher. A watcher sees only the entries whose read token it holds;
//! deletions carry the record they ended, so they are filtered the same way.
//!
//! A new stream registers first, then reads the store's revision (the head), replays
//! the history from the requested revision up to the head, and then forwards live
//! changes above the head: nothing falls between the two. Each watcher has a bounded
//! queue (1024 changes, and 8 MiB of frames: a slow reader must not hold a thousand
//! large values); one whose client reads too slowly to keep up is ended with a
//! `lagged` event and catches up from the history when it reconnects with
//! `Last-Event-ID`.
//!
//! Invariant: the dispatcher delivers every change exactly once and in revision
//! order; when the store's broadcast drops changes (the dispatcher fell behind), it
//! reads them back from the history before going on.

use crate::error::ApiError;
use crate::http::{NativeCaller, Shared};
use crate::metrics::Metrics;
use crate::native::{READ_TOKEN, Rfc3339, Scope, header_token, query};
use amphora_model::{ENTRY_NAMESPACE, EntryKey, Record, TokenHash};
use amphora_store::{Event, EventKind, Revision, Store};
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc::{self, error::TrySendError};

/// Changes a watcher may have queued before it counts as lagging.
const QUEUE: usize = 1024;
/// Bytes of frames a watcher may have queued before it counts as lagging (a larger
/// frame still goes to an empty queue).
const QUEUE_BYTES: usize = 8 << 20;
/// Changes read from the history per step when catching up.
const REPLAY_PAGE: usize = 256;
/// How often a quiet stream sends a comment, so that dead connections are noticed
/// and proxies keep the stream open.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// The most queued changes sent in one write, and the most bytes: the joined copy
/// is the watcher's own, outside the queue's byte bound.
const MAX_JOINED: usize = 64;
const MAX_JOINED_BYTES: usize = 256 * 1024;
/// What a client waits before reconnecting (the SSE `retry` field), in ms.
const RETRY_MS: u64 = 1000;

/// Limits on watch streams.
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    /// Streams open at once.
    pub max_watchers: usize,
    /// Streams one client address may hold open.
    pub per_client: usize,
}

/// One change, rendered once for every watcher that may see it.
struct Change {
    revision: Revision,
    read: TokenHash,
    frame: Bytes,
}

struct Slot {
    read: TokenHash,
    tx: mpsc::Sender<Arc<Change>>,
    lagged: Arc<AtomicBool>,
    /// Bytes of frames in the queue.
    queued: Arc<AtomicUsize>,
}

impl Slot {
    /// Queues `change`; false when the watcher is gone or lags (its queue holds
    /// [`QUEUE`] changes, or would hold more than [`QUEUE_BYTES`]).
    fn send(&self, change: &Arc<Change>) -> bool {
        let len = change.frame.len();
        // Counted before it is sent: the receiver takes it off only after.
        let queued = self.queued.fetch_add(len, Ordering::AcqRel);
        let refused = if queued > 0 && queued + len > QUEUE_BYTES {
            Some(true)
        } else {
            match self.tx.try_send(change.clone()) {
                Ok(()) => None,
                Err(TrySendError::Full(_)) => Some(true),
                Err(TrySendError::Closed(_)) => Some(false),
            }
        };
        let Some(lagging) = refused else {
            return true;
        };
        self.queued.fetch_sub(len, Ordering::AcqRel);
        if lagging {
            self.lagged.store(true, Ordering::Release);
        }
        false
    }
}

#[derive(Default)]
struct Registry {
    /// Watchers by the store prefix they watch (a context's or a family's).
    by_prefix: HashMap<Vec<u8>, HashMap<u64, Slot>>,
    per_client: HashMap<IpAddr, usize>,
    total: usize,
    closed: bool,
}

/// Every open watch stream, and the dispatcher that feeds them.
pub struct WatchHub {
    registry: RwLock<Registry>,
    next_id: AtomicU64,
    limits: WatchLimits,
    metrics: Arc<Metrics>,
}

/// A registered watcher; unregisters when dropped (when its stream ends).
struct Subscription {
    hub: Arc<WatchHub>,
    id: u64,
    prefix: Vec<u8>,
    client: IpAddr,
    rx: mpsc::Receiver<Arc<Change>>,
    lagged: Arc<AtomicBool>,
    queued: Arc<AtomicUsize>,
}

impl Subscription {
    /// The next queued change; `None` once the queue is empty and closed.
    async fn recv(&mut self) -> Option<Arc<Change>> {
        let change = self.rx.recv().await?;
        self.queued.fetch_sub(change.frame.len(), Ordering::AcqRel);
        Some(change)
    }

    /// The next queued change, if one is there now.
    fn try_recv(&mut self) -> Option<Arc<Change>> {
        let change = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(change.frame.len(), Ordering::AcqRel);
        Some(change)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unregister(&self.prefix, self.id, self.client);
    }
}

/// Where the context and the family prefixes of an entry's store key end.
fn prefix_ends(key: &[u8]) -> Option<(usize, usize)> {
    let rest = key.strip_prefix(ENTRY_NAMESPACE)?;
    let context = rest.iter().position(|b| *b == 0)? + 1;
    let family = context + rest[context..].iter().position(|b| *b == 0)? + 1;
    let base = ENTRY_NAMESPACE.len();
    Some((base + context, base + family))
}

#[derive(Serialize)]
struct PutData<'a> {
    context: &'a str,
    family: &'a str,
    key: &'a str,
    value: &'a RawValue,
    revision: Revision,
    created_at: Rfc3339,
    updated_at: Rfc3339,
}

#[derive(Serialize)]
struct DeleteData<'a> {
    context: &'a str,
    family: &'a str,
    key: &'a str,
    revision: Revision,
    deleted_at: Rfc3339,
}

/// Appends `data` as SSE `data:` lines. JSON holds line breaks only as white space
/// (inside strings they are escaped), so splitting on them keeps the JSON intact.
fn push_data(out: &mut String, data: &str) {
    for line in data.split(['\n', '\r']) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
}

/// Renders a change as its SSE frame; `None` for what is not an entry (or a deletion
/// logged before deletions carried their record).
fn render(event: &Event) -> Option<Change> {
    let key = EntryKey::decode(&event.key).ok()?;
    let record = match Record::decode(&event.value) {
        Ok(r) => r,
        Err(e) => {
            if event.kind == EventKind::Put {
                tracing::error!(revision = event.revision, error = %e, "undecodable change not sent to watchers");
            }
            return None;
        }
    };
    let (kind, data) = match event.kind {
        EventKind::Put => {
            let value: &RawValue = serde_json::from_str(&record.value).ok()?;
            let data = PutData {
                context: &key.context,
                family: &key.family,
                key: &key.key,
                value,
                revision: event.revision,
                created_at: Rfc3339(record.created_at_ms),
                updated_at: Rfc3339(record.updated_at_ms),
            };
            ("put", serde_json::to_string(&data).ok()?)
        }
        EventKind::Delete => {
            let data = DeleteData {
                context: &key.context,
                family: &key.family,
                key: &key.key,
                revision: event.revision,
                deleted_at: Rfc3339(event.at_ms),
            };
            ("delete", serde_json::to_string(&data).ok()?)
        }
    };
    let mut frame = format!("id: {}\nevent: {kind}\n", event.revision);
    push_data(&mut frame, &data);
    Some(Change {
        revision: event.revision,
        read: record.read_hash,
        frame: Bytes::from(frame),
    })
}

/// A frame that ends a stream with an error a client can act on.
fn error_frame(event: &str, code: &str, message: &str) -> Bytes {
    let data = serde_json::json!({"error": code, "message": message}).to_string();
    let mut frame = format!("event: {event}\n");
    push_data(&mut frame, &data);
    Bytes::from(frame)
}

impl WatchHub {
    /// A hub fed by `store`'s change feed; starts the dispatcher task.
    pub fn start(store: Arc<dyn Store>, limits: WatchLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        let hub = Arc::new(WatchHub {
            registry: RwLock::new(Registry::default()),
            next_id: AtomicU64::new(1),
            limits,
            metrics,
        });
        let feed = store.subscribe();
        tokio::spawn(dispatch(hub.clone(), store, feed));
        hub
    }

    /// Ends every stream and refuses new ones (at shutdown).
    pub fn close(&self) {
        let mut r = self
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        r.closed = true;
        // Dropping the senders ends every stream once its queue is sent.
        r.by_prefix.clear();
    }

    /// Ends every stream without refusing new ones: their clients reconnect and
    /// catch up from the history (or learn that it is gone).
    fn end_all(&self) {
        let mut r = self
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for slot in r.by_prefix.values().flat_map(HashMap::values) {
            slot.lagged.store(true, Ordering::Release);
        }
        r.by_prefix.clear();
    }

    fn subscribe(
        self: &Arc<Self>,
        prefix: Vec<u8>,
        read: TokenHash,
        client: IpAddr,
    ) -> Result<Subscription, ApiError> {
        let mut r = self
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if r.closed {
            return Err(ApiError::Unavailable("shutting down".into()));
        }
        if r.total >= self.limits.max_watchers {
            return Err(ApiError::TooManyWatchers("on this server"));
        }
        let mine = r.per_client.entry(client).or_default();
        if *mine >= self.limits.per_client {
            return Err(ApiError::TooManyWatchers("from this client address"));
        }
        *mine += 1;
        r.total += 1;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(QUEUE);
        let lagged = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(AtomicUsize::new(0));
        let slot = Slot {
            read,
            tx,
            lagged: lagged.clone(),
            queued: queued.clone(),
        };
        r.by_prefix
            .entry(prefix.clone())
            .or_default()
            .insert(id, slot);
        self.metrics.watchers(1);
        Ok(Subscription {
            hub: self.clone(),
            id,
            prefix,
            client,
            rx,
            lagged,
            queued,
        })
    }

    fn unregister(&self, prefix: &[u8], id: u64, client: IpAddr) {
        let mut r = self
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        remove_slot(&mut r, prefix, id);
        if let Some(n) = r.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                r.per_client.remove(&client);
            }
        }
        r.total -= 1;
        self.metrics.watchers(-1);
    }

    /// Hands one change to the watchers of its family and of its context.
    fn deliver(&self, event: &Event) {
        let Some((context_end, family_end)) = prefix_ends(&event.key) else {
            return;
        };
        let mut dropped = Vec::new();
        let mut sent = 0;
        {
            let r = self.registry.read().unwrap_or_else(PoisonError::into_inner);
            let groups = [&event.key[..family_end], &event.key[..context_end]]
                .map(|prefix| r.by_prefix.get(prefix).map(|g| (prefix, g)));
            if groups.iter().all(Option::is_none) {
                return;
            }
            let Some(change) = render(event).map(Arc::new) else {
                return;
            };
            for (prefix, group) in groups.into_iter().flatten() {
                for (id, slot) in group {
                    if !slot.read.matches(&change.read) {
                        continue;
                    }
                    if slot.send(&change) {
                        sent += 1;
                    } else {
                        dropped.push((prefix, *id));
                    }
                }
            }
        }
        self.metrics.watch_events(sent);
        if !dropped.is_empty() {
            let mut r = self
                .registry
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for (prefix, id) in dropped {
                if remove_slot(&mut r, prefix, id)
                    .is_some_and(|slot| slot.lagged.load(Ordering::Acquire))
                {
                    self.metrics.watch_lagged();
                }
            }
        }
    }
}

fn remove_slot(r: &mut Registry, prefix: &[u8], id: u64) -> Option<Slot> {
    let group = r.by_prefix.get_mut(prefix)?;
    let slot = group.remove(&id);
    if group.is_empty() {
        r.by_prefix.remove(prefix);
    }
    slot
}

/// Follows the store's change feed and delivers every change, in order, once.
async fn dispatch(
    hub: Arc<WatchHub>,
    store: Arc<dyn Store>,
    mut feed: tokio::sync::broadcast::Receiver<Event>,
) {
    let mut last = match store.revision().await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the store's revision; watches are off");
            hub.close();
            return;
        }
    };
    loop {
        let event = match feed.recv().await {
            Ok(event) => Some(event),
            Err(RecvError::Lagged(n)) => {
                tracing::debug!(
                    missed = n,
                    "watch dispatcher fell behind; reading the history"
                );
                None
            }
            Err(RecvError::Closed) => break,
        };
        // Revisions have no holes: anything between `last` and this event comes
        // from the history (after a lag, everything up to the store's head does).
        let upto = event
            .as_ref()
            .map_or(Revision::MAX, |e| e.revision.saturating_sub(1));
        if last < upto
            && let Err(e) = catch_up(&hub, store.as_ref(), &mut last, upto).await
        {
            tracing::warn!(error = %e, "changes lost for watchers; ending every watch stream");
            hub.end_all();
            last = match &event {
                Some(ev) => ev.revision.saturating_sub(1),
                None => store.revision().await.unwrap_or(last),
            };
        }
        if let Some(event) = event
            && event.revision > last
        {
            hub.deliver(&event);
            last = event.revision;
        }
    }
    hub.close();
}

async fn catch_up(
    hub: &WatchHub,
    store: &dyn Store,
    last: &mut Revision,
    upto: Revision,
) -> Result<(), amphora_store::StoreError> {
    while *last < upto {
        let page = store.changes(*last + 1, REPLAY_PAGE).await?;
        let full = page.len() == REPLAY_PAGE;
        for event in page.into_iter().take_while(|e| e.revision <= upto) {
            hub.deliver(&event);
            *last = event.revision;
        }
        if !full {
            break;
        }
    }
    Ok(())
}

enum Phase {
    /// Replaying the history from this revision up to the head.
    Replay(Revision),
    Live,
    Done,
}

/// One stream's state, turned into the response body.
struct Stream {
    sub: Subscription,
    store: Arc<dyn Store>,
    prefix: Vec<u8>,
    read: TokenHash,
    head: Revision,
    /// Live changes at or below this were replayed or not asked for.
    floor: Revision,
    last_sent: Revision,
    phase: Phase,
    pending: VecDeque<Bytes>,
    heartbeat: tokio::time::Interval,
}

impl Stream {
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            match self.phase {
                Phase::Replay(from) => self.replay(from).await,
                Phase::Live => return self.live().await,
                Phase::Done => return None,
            }
        }
    }

    async fn replay(&mut self, from: Revision) {
        if from > self.head {
            self.phase = Phase::Live;
            return;
        }
        let page = match self.store.changes(from, REPLAY_PAGE).await {
            Ok(page) => page,
            Err(e) => {
                let e = ApiError::from(e);
                let (_, code) = e.status_and_code();
                self.pending
                    .push_back(error_frame("error", code, &e.public_message()));
                self.phase = Phase::Done;
                return;
            }
        };
        let mut next = self.head + 1;
        for event in page {
            if event.revision > self.head {
                break;
            }
            next = event.revision + 1;
            if !event.key.starts_with(&self.prefix) {
                continue;
            }
            if let Some(change) = render(&event)
                && self.read.matches(&change.read)
            {
                self.last_sent = change.revision;
                self.pending.push_back(change.frame);
            }
        }
        self.phase = Phase::Replay(next);
    }

    async fn live(&mut self) -> Option<Bytes> {
        loop {
            tokio::select! {
                change = self.sub.recv() => match change {
                    Some(change) if change.revision <= self.floor => continue,
                    Some(change) => return Some(self.with_queued(change)),
                    None => {
                        self.phase = Phase::Done;
                        if !self.sub.lagged.load(Ordering::Acquire) {
                            return None;
                        }
                        let message = format!(
                            "this stream fell behind; reconnect with Last-Event-ID: {}",
                            self.last_sent
                        );
                        return Some(error_frame("lagged", "watcher_lagged", &message));
                    }
                },
                _ = self.heartbeat.tick() => return Some(Bytes::from_static(b": keepalive\n\n")),
            }
        }
    }
}

impl Stream {
    /// The frame of `first`, joined by those of the changes already queued behind
    /// it: a client that fell a little behind catches up in one write, not many.
    fn with_queued(&mut self, first: Arc<Change>) -> Bytes {
        self.last_sent = first.revision;
        if first.frame.len() >= MAX_JOINED_BYTES {
            return first.frame.clone();
        }
        let Some(second) = self.sub.try_recv() else {
            return first.frame.clone();
        };
        let mut joined = Vec::with_capacity(first.frame.len() * 4);
        joined.extend_from_slice(&first.frame);
        let mut next = Some(second);
        let mut n = 1;
        while let Some(change) = next {
            if change.revision > self.floor {
                joined.extend_from_slice(&change.frame);
                self.last_sent = change.revision;
            }
            n += 1;
            next = if n < MAX_JOINED && joined.len() < MAX_JOINED_BYTES {
                self.sub.try_recv()
            } else {
                None
            };
        }
        Bytes::from(joined)
    }
}

/// The first revision a stream sends: `Last-Event-ID` (a reconnection) wins over
/// `from`; neither means "changes from now on".
fn start_revision(
    q: &crate::query::Query,
    headers: &HeaderMap,
) -> Result<Option<Revision>, ApiError> {
    if let Some(id) = headers.get("last-event-id") {
        let id = id
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<Revision>().ok());
        return id
            .map(|id| Some(id.saturating_add(1)))
            .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be a revision".into()));
    }
    match q.get("from") {
        None => Ok(None),
        Some(s) => s
            .parse::<Revision>()
            .map(|r| Some(r.max(1)))
            .map_err(|_| ApiError::BadRequest("from must be a revision (a number)".into())),
    }
}

/// `GET /v1/watch/{context}` and `GET /v1/watch/{context}/{family}`: the changes of
/// every entry in scope, as Server-Sent Events.
pub async fn watch(
    State(state): State<Shared>,
    NativeCaller(caller): NativeCaller,
    Scope {
        context,
        family,
        prefix,
    }: Scope,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let q = query(raw)?;
    let read = header_token(&headers, READ_TOKEN)?;
    let from = start_revision(&q, &headers)?;
    let read = state
        .service
        .open_watch(&caller, &context, family.as_deref(), read)
        .await?;
    // Register before reading the head: every change above the head reaches the
    // queue, every change up to it comes from the history.
    let sub = state.watch.subscribe(prefix.clone(), read, caller.addr)?;
    let store = state.service.store().clone();
    let head = store.revision().await?;
    let from = from.unwrap_or(head + 1);
    if from <= head {
        // Refuse a start the history no longer has before the stream begins.
        store.changes(from, 1).await?;
    }
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.reset();
    let hello = format!("retry: {RETRY_MS}\n: watching from revision {from}\n\n");
    let stream = Stream {
        sub,
        store,
        prefix,
        read,
        head,
        floor: head.max(from - 1),
        last_sent: from - 1,
        phase: Phase::Replay(from),
        pending: VecDeque::from([Bytes::from(hello)]),
        heartbeat,
    };
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        let frame = s.next_frame().await?;
        Some((Ok::<_, std::convert::Infallible>(frame), s))
    });
    let mut response = Body::from_stream(body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphora_model::{context_prefix, family_prefix};

    #[test]
    fn prefixes_of_an_entry_key() {
        let key = EntryKey::new("ctx", "fam", "k/1").encode();
        let (c, f) = prefix_ends(&key).unwrap();
        assert_eq!(&key[..c], context_prefix("ctx").as_slice());
        assert_eq!(&key[..f], family_prefix("ctx", "fam").as_slice());
        assert_eq!(prefix_ends(b"other\0x"), None);
    }

    use amphora_store::redb::{RedbOptions, RedbStore};

    /// A hub over a fresh store, and the read token of the entries `put_values` writes.
    fn hub() -> (tempfile::TempDir, Arc<dyn Store>, Arc<WatchHub>, TokenHash) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("db"), RedbOptions::default()).unwrap());
        let limits = WatchLimits {
            max_watchers: 10,
            per_client: 10,
        };
        let hub = WatchHub::start(store.clone(), limits, Arc::new(Metrics::new()));
        let read = amphora_model::TokenHasher::new(&[7; 32]).hash("ReadToken1");
        (dir, store, hub, read)
    }

    /// Writes `n` entries of family `c/f`, each of `value` (JSON text).
    async fn put_values(store: &Arc<dyn Store>, read: TokenHash, n: usize, value: &str) {
        use amphora_store::{Condition, Put};
        let record = Record {
            created_at_ms: 1,
            updated_at_ms: 1,
            read_hash: read,
            write_hash: read,
            value: value.into(),
        }
        .encode();
        for i in 0..n {
            let put = Put::new(
                EntryKey::new("c", "f", format!("k{i}")).encode(),
                record.clone(),
                Condition::None,
            );
            store.put(put).await.unwrap();
        }
    }

    /// Reads `total` changes from `fast` on a task of its own; the revisions read.
    fn read_all(mut fast: Subscription, total: usize) -> tokio::task::JoinHandle<Vec<Revision>> {
        tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < total {
                got.push(fast.recv().await.expect("the fast watcher stays").revision);
            }
            got
        })
    }

    /// What a watcher that never read holds: its changes and their frames' bytes.
    async fn drain(slow: &mut Subscription) -> (usize, usize) {
        let (mut changes, mut bytes) = (0, 0);
        while let Some(change) = slow.recv().await {
            changes += 1;
            bytes += change.frame.len();
        }
        (changes, bytes)
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_dropped_and_others_get_everything() {
        let (_dir, store, hub, read) = hub();
        let client = IpAddr::from([127, 0, 0, 1]);
        let prefix = family_prefix("c", "f");
        let mut slow = hub.subscribe(prefix.clone(), read, client).unwrap();
        let fast = hub.subscribe(prefix, read, client).unwrap();
        let total = QUEUE + 100;
        let reader = read_all(fast, total);
        put_values(&store, read, total, "1").await;
        let got = reader.await.unwrap();
        assert_eq!(got, (1..=total as u64).collect::<Vec<_>>());
        // The slow one got the first QUEUE changes, then its stream was closed.
        assert_eq!(drain(&mut slow).await.0, QUEUE);
        assert!(slow.lagged.load(Ordering::Acquire));
        // The fast one ended with its reader task; unregistering counts down.
        assert_eq!(hub.registry.read().unwrap().total, 1);
        drop(slow);
        assert_eq!(hub.registry.read().unwrap().total, 0);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_watcher_lags_when_its_queue_holds_too_many_bytes() {
        let (_dir, store, hub, read) = hub();
        let client = IpAddr::from([127, 0, 0, 1]);
        let prefix = family_prefix("c", "f");
        let mut slow = hub.subscribe(prefix.clone(), read, client).unwrap();
        let fast = hub.subscribe(prefix, read, client).unwrap();
        // 200 values of 100 KB: 20 MB of frames, far fewer than QUEUE changes.
        let (total, value) = (200, format!("\"{}\"", "x".repeat(100_000)));
        let reader = read_all(fast, total);
        put_values(&store, read, total, &value).await;
        assert_eq!(reader.await.unwrap().len(), total);
        // Every change has been dispatched: the slow one lags (its stream is closed).
        assert!(slow.lagged.load(Ordering::Acquire));
        let (changes, bytes) = drain(&mut slow).await;
        assert!(bytes <= QUEUE_BYTES, "{bytes} bytes queued");
        assert!(
            changes >= QUEUE_BYTES / 100_100 && changes < total,
            "{changes}"
        );
        // Every byte counted in was counted out.
        assert_eq!(slow.queued.load(Ordering::Acquire), 0);
        drop(slow);
        store.close().await.unwrap();
    }

    #[test]
    fn data_lines_keep_json_whole() {
        let mut out = String::new();
        push_data(&mut out, "{\n \"a\": \"x\\ny\"\r\n}");
        assert_eq!(out, "data: {\ndata:  \"a\": \"x\\ny\"\ndata: \ndata: }\n\n");
        let joined: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        let v: serde_json::Value = serde_json::from_str(&joined.join("\n")).unwrap();
        assert_eq!(v["a"], "x\ny");
    }
}
