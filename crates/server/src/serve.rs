//! The accept loop: plain TCP or TLS, one HTTP/1.1 connection task per client
//! (`conn.rs`), and graceful shutdown (stop accepting, close idle connections, let
//! requests in flight finish).

use crate::conn::{Application, ConnContext, serve_connection};
use crate::http::{Peer, Shared};
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

/// Serves `app` on `listener` until `shutdown` completes, then drains.
pub async fn serve<A>(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    state: Shared,
    app: A,
    shutdown: impl Future<Output = ()>,
) where
    A: Application,
{
    // Every connection holds a receiver, never read: the sender is closed once the
    // last one has ended.
    let (alive, alive_rx) = watch::channel(());
    let stops = Arc::new(Stops::default());
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
        let _ = tcp.set_nodelay(true);
        let (tls, app, state) = (tls.clone(), app.clone(), state.clone());
        let (alive, registered) = (alive_rx.clone(), Stops::register(&stops));
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

/// The stop signals of the open connections.
#[derive(Default)]
struct Stops {
    open: Mutex<OpenConnections>,
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
    fn register(stops: &Arc<Stops>) -> Registered {
        let signal = Arc::new(StopSignal::default());
        let mut open = stops.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.stopping {
            signal.stop();
        }
        let id = open.next;
        open.next += 1;
        open.signals.insert(id, signal.clone());
        Registered {
            stops: stops.clone(),
            id,
            signal,
        }
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_all_wakes_every_waiting_connection_and_later_ones_start_stopped() {
        let stops = Arc::new(Stops::default());
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let registered = Stops::register(&stops);
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
        let late = Stops::register(&stops);
        assert!(late.signal.stopped.load(Ordering::Acquire));
    }
}
