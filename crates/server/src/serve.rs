//! The accept loop: plain TCP or TLS, one HTTP/1.1 connection task per client
//! (`conn.rs`), and graceful shutdown (stop accepting, close idle connections, let
//! requests in flight finish).

use crate::conn::{Application, ConnContext, serve_connection};
use crate::http::{Peer, Shared};
use crate::tls::Tls;
use std::future::Future;
use std::sync::Arc;
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
    // Every connection holds a receiver: the sender tells them to stop, and is
    // closed once the last one has ended.
    let (stop, stopping) = watch::channel(());
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
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let stop = async move {
                // An error means the sender is gone: stop as well.
                let _ = stopping.changed().await;
            };
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
    drop(stopping);
    let _ = stop.send(());
    if tokio::time::timeout(DRAIN, stop.closed()).await.is_err() {
        tracing::warn!("some connections were still busy after {DRAIN:?}; closing them");
    }
}
