//! The accept loop: plain TCP or TLS, one HTTP/1.1 connection task per client
//! (`conn.rs`), at most `--max-connections` of them (one more is answered 503 and
//! closed), and graceful shutdown (stop accepting, close idle connections, let
//! requests in flight finish).

use crate::conn::{Application, ConnContext, serve_connection};
use crate::http::{Peer, Shared};
use crate::metrics::Metrics;
use crate::tls::Tls;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long shutdown waits for connections to finish their requests.
const DRAIN: Duration = Duration::from_secs(30);

/// Serves `app` on `listener`, with at most `max_connections` open, until
/// `shutdown` completes, then drains.
pub async fn serve<A>(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    state: Shared,
    app: A,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) where
    A: Application,
{
    // Every connection holds a receiver, never read: the sender is closed once the
    // last one has ended.
    let (alive, alive_rx) = watch::channel(());
    let stops = Arc::new(Stops::new(max_connections, state.metrics.clone()));
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(registered) = Stops::register(&stops) else {
            state.metrics.connection_refused();
            tracing::debug!(client = %addr, max_connections, "connection refused: the server holds as many as it may");
            if tls.is_none() {
                // Best effort, without waiting: the client learns why.
                let _ = tcp.try_write(&refusal());
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (tls, app, state) = (tls.clone(), app.clone(), state.clone());
        let alive = alive_rx.clone();
        tokio::spawn(async move {
            // Both held until the connection ends.
            let _held = (alive, &registered);
            let stop = Stopped::new(registered.signal.clone());
            match tls {
                None => {
                    let peer = Peer { addr, cert: None };
                    serve_connection(tcp, ConnContext { peer, state, app }, stop).await;
                }
                Some(tls) => match tls.accept(tcp).await {
                    Ok((stream, cert)) => {
                        let peer = Peer { addr, cert };
                        serve_connection(stream, ConnContext { peer, state, app }, stop).await;
                    }
                    Err(e) => {
                        tracing::debug!(client = %addr, error = format!("{e:#}"), "TLS handshake failed")
                    }
                },
            }
        });
    }
    drop(listener);
    drop(alive_rx);
    stops.stop_all();
    if tokio::time::timeout(DRAIN, alive.closed()).await.is_err() {
        tracing::warn!("some connections were still busy after {DRAIN:?}; closing them");
    }
}

/// What a connection past the limit is sent before it is closed.
fn refusal() -> Vec<u8> {
    let body = serde_json::json!({
        "error": "too_many_connections",
        "message": "the server holds as many connections as it may; retry later",
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         connection: close\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One connection's stop signal: a flag, and the waker of the task that waits for
/// it.
#[derive(Default)]
struct StopSignal {
    stopped: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl StopSignal {
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Completes when its signal is given. A connection polls it before every read:
/// once its task's waker is registered, a poll is one atomic load. (A `watch`
/// receiver shared by every connection took the channel's lock on each poll: 1 %
/// of a get's CPU, measured.)
struct Stopped {
    signal: Arc<StopSignal>,
    /// The waker given to the signal last.
    registered: Option<Waker>,
}

impl Stopped {
    fn new(signal: Arc<StopSignal>) -> Self {
        Stopped {
            signal,
            registered: None,
        }
    }
}

impl Future for Stopped {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.stopped.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        // The signal holds a waker that wakes this task: `stop` sets the flag before
        // it takes the waker, so a flag set after the load above still wakes it.
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let waker = cx.waker().clone();
        *self.signal.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
        self.registered = Some(waker);
        // Given between the load and the registration: `stop` found no waker.
        if self.signal.stopped.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// The stop signals of the open connections, at most `limit` of them.
struct Stops {
    open: Mutex<OpenConnections>,
    limit: usize,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct OpenConnections {
    next: u64,
    signals: HashMap<u64, Arc<StopSignal>>,
    /// Set by `stop_all`: a connection registered after it starts stopped.
    stopping: bool,
}

/// A connection's place in [`Stops`], given up when the connection ends.
struct Registered {
    stops: Arc<Stops>,
    id: u64,
    signal: Arc<StopSignal>,
}

impl Stops {
    fn new(limit: usize, metrics: Arc<Metrics>) -> Self {
        Stops {
            open: Mutex::default(),
            limit,
            metrics,
        }
    }

    /// A place for one more connection; `None` when `limit` are open.
    fn register(stops: &Arc<Stops>) -> Option<Registered> {
        let signal = Arc::new(StopSignal::default());
        let mut open = stops.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.signals.len() >= stops.limit {
            return None;
        }
        if open.stopping {
            signal.stop();
        }
        let id = open.next;
        open.next += 1;
        open.signals.insert(id, signal.clone());
        stops.metrics.connections(1);
        Some(Registered {
            stops: stops.clone(),
            id,
            signal,
        })
    }

    fn stop_all(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.stopping = true;
        for signal in open.signals.values() {
            signal.stop();
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut open = self.stops.open.lock().unwrap_or_else(|e| e.into_inner());
        open.signals.remove(&self.id);
        self.stops.metrics.connections(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_all_wakes_every_waiting_connection_and_later_ones_start_stopped() {
        let stops = Arc::new(Stops::new(3, Arc::new(Metrics::new())));
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let registered = Stops::register(&stops).unwrap();
                tokio::spawn(async move {
                    let mut stop = std::pin::pin!(Stopped::new(registered.signal.clone()));
                    // Polled again and again, as a connection does before each read.
                    for _ in 0..3 {
                        std::future::poll_fn(|cx| match stop.as_mut().poll(cx) {
                            Poll::Pending => Poll::Ready(false),
                            Poll::Ready(()) => Poll::Ready(true),
                        })
                        .await;
                        tokio::task::yield_now().await;
                    }
                    stop.await;
                })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(waiting.iter().all(|t| !t.is_finished()));
        stops.stop_all();
        for task in waiting {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("a waiting connection was not woken")
                .unwrap();
        }
        assert!(stops.open.lock().unwrap().signals.is_empty());
        let late = Stops::register(&stops).unwrap();
        assert!(late.signal.stopped.load(Ordering::Acquire));
    }

    #[test]
    fn at_most_the_limit_are_registered() {
        let stops = Arc::new(Stops::new(2, Arc::new(Metrics::new())));
        let first = Stops::register(&stops).unwrap();
        let _second = Stops::register(&stops).unwrap();
        assert!(Stops::register(&stops).is_none());
        drop(first);
        assert!(Stops::register(&stops).is_some());
    }
}
