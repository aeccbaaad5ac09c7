//! The `amphora` server: HTTP APIs (native and COMET-compatible), configuration,
//! expiry sweeps and metrics, over the storage interface of `amphora-store`.
//!
//! Invariant: only this crate knows HTTP; it never names redb outside [`run`]'s
//! choice of engine.

pub mod admin;
pub mod audit;
pub mod certs;
pub mod comet;
pub mod config;
pub mod conn;
pub mod error;
pub mod hot;
pub mod http;
pub mod keyfile;
pub mod metrics;
pub mod native;
pub mod query;
pub mod serve;
pub mod service;
pub mod throttle;
pub mod tls;
pub mod watch;

use crate::config::Settings;
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::service::{Service, ServiceSettings};
use amphora_model::Limits;
use amphora_store::Store;
use amphora_store::redb::{RedbOptions, RedbStore};
use anyhow::Context;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The database file inside the data directory.
pub const DB_FILE: &str = "amphora.redb";

/// How often leases are swept and history compacted.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Runs the server until SIGTERM or SIGINT, then shuts down gracefully: stop
/// accepting, finish the requests in flight, commit every accepted write, close.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&settings.data_dir)
        .with_context(|| format!("creating data directory {}", settings.data_dir.display()))?;
    let key = keyfile::load_or_create(&settings.data_dir)?;
    raise_open_files_limit();
    let tls = match &settings.tls {
        Some(files) => Some(Arc::new(
            tls::Tls::load(&files.cert, &files.key, files.client_ca.as_deref())
                .context("setting up TLS")?,
        )),
        None => None,
    };
    let admin_token_sha256 = match &settings.admin_token_file {
        Some(path) => Some(read_admin_token(path)?),
        None => None,
    };
    let audit = match &settings.audit_log {
        Some(target) => audit::Audit::open(target)?,
        None => audit::Audit::off(),
    };
    let metrics = Arc::new(Metrics::new());
    let observer = metrics.clone();
    let store: Arc<dyn Store> = Arc::new(
        RedbStore::open(
            &settings.data_dir.join(DB_FILE),
            RedbOptions {
                on_commit: Some(Arc::new(move |info| observer.observe_commit(info))),
                cache_bytes: settings.store_cache_bytes,
                entry_cache_bytes: settings.entry_cache_bytes,
                checkpoint_interval: settings.checkpoint_interval,
                sync_interval: settings.checkpoint_sync_interval,
                ..RedbOptions::default()
            },
        )
        .with_context(|| format!("opening the store in {}", settings.data_dir.display()))?,
    );
    let service = Service::new(
        store.clone(),
        &key,
        ServiceSettings {
            limits: Limits {
                max_name_bytes: settings.max_name_bytes,
                max_value_bytes: settings.max_value_bytes,
            },
            check_token_strength: settings.check_token_strength,
            idle_expiry: settings.idle_expiry,
            max_enumerate: settings.max_enumerate,
            require_client_cert: settings.check_client_cert,
            throttle: settings.throttle,
            admin_token_sha256,
            admin_subjects: settings.admin_subjects.clone(),
        },
        metrics.clone(),
        audit.clone(),
    );
    let watch = watch::WatchHub::start(
        store.clone(),
        watch::WatchLimits {
            max_watchers: settings.max_watchers,
            per_client: settings.max_watchers_per_client,
        },
        metrics.clone(),
    );
    let state = Arc::new(AppState::new(
        service,
        metrics,
        settings.trusted_proxies.clone(),
        watch,
    ));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    if tls.is_none() {
        tracing::warn!("no TLS configured: plain HTTP, meant for loopback only");
    }
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        client_certificates_required = settings.check_client_cert,
        data_dir = %settings.data_dir.display(),
        "amphora listening"
    );
    // Before the line that says the server is up: a signal sent as soon as it
    // answers must shut it down gracefully, not kill it.
    let signals = shutdown_signals()?;
    // A line for scripts and tests that start the server on port 0.
    println!("amphora listening on {scheme}://{addr}");
    std::io::stdout().flush().ok();

    let sweeper = tokio::spawn(sweep_loop(state.clone(), settings.clone()));
    let app = http::app(state.clone());
    let shutdown_state = state.clone();
    let max_connections = settings.max_connections;
    serve::serve(
        listener,
        tls,
        state.clone(),
        app,
        max_connections,
        async move {
            signals.await;
            shutdown_state.ready.store(false, Ordering::Release);
            // Watch streams never end by themselves: end them so that draining can.
            shutdown_state.watch.close();
            tracing::info!("shutting down: finishing requests in flight");
        },
    )
    .await;
    sweeper.abort();
    let _ = sweeper.await;
    store.close().await.context("closing the store")?;
    // Every record sent so far is written and flushed; the writer task ends with
    // the process.
    audit.flush().await;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Every watch stream holds a connection: allow as many open files as the hard
/// limit does, instead of the usual soft limit of 1024.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open files limit");
        }
    }
    tracing::debug!(limit = ?getrlimit(Resource::Nofile).current, "open files limit");
}

/// Reads the admin token file; answers the token's SHA-256.
fn read_admin_token(path: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    use sha2::Digest;
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the admin token file {}", path.display()))?;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{} is readable by other users (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let token = text.trim();
    if token.len() < 16 || token.chars().any(char::is_whitespace) {
        anyhow::bail!(
            "the admin token in {} must be at least 16 characters without white space",
            path.display()
        );
    }
    Ok(sha2::Sha256::digest(token.as_bytes()).into())
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called,
/// not when the future is first polled: the accept loop may not poll it before it
/// has served its first clients, and until then a SIGTERM killed the process
/// outright (the default action).
fn shutdown_signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

/// Background maintenance: expired leases, old history, COMET idle expiry.
async fn sweep_loop(state: Arc<AppState>, settings: Settings) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle_every = settings.idle_expiry.max(Duration::from_secs(1));
    let mut last_idle = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let store = state.service.store();
        match store.sweep_expired_leases().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(leases = n, "expired leases swept"),
            Err(e) => tracing::warn!(error = %e, "lease sweep failed"),
        }
        let cutoff =
            amphora_store::now_ms().saturating_sub(settings.history_retention.as_millis() as u64);
        if let Err(e) = store.compact_history(cutoff).await {
            tracing::warn!(error = %e, "history compaction failed");
        }
        state.service.prune_throttle();
        if !settings.idle_expiry.is_zero() && last_idle.elapsed() >= idle_every {
            last_idle = tokio::time::Instant::now();
            match state.service.sweep_idle().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(entries = n, "idle entries expired"),
                Err(e) => tracing::warn!(error = %e, "idle sweep failed"),
            }
        }
    }
}
