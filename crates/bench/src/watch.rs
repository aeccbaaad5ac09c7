//! Watch fan-out: many watchers of one family, one writer, delivery latency.
//!
//! Each watcher is a plain TCP connection holding `GET /v1/watch/{context}/{family}`
//! open (no HTTP client library: ten thousand of them must cost the load generator
//! little). The writer puts one entry at a time at a fixed rate and notes when it
//! sent each; a watcher notes when each event's `id:` line arrives. Events reach a
//! watcher in revision order, so the n-th arrival is the n-th put, and its delivery
//! latency is arrival minus send: the write's commit (fsync included) plus the
//! fan-out.

use crate::targets::{READ, WRITE};
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONTEXT: &str = "bench";
const FAMILY: &str = "watched";
/// Connections opened at once while setting up the watchers.
const CONNECT_CONCURRENCY: usize = 128;
/// How long watchers may take to receive the last event after it was written.
const DRAIN: Duration = Duration::from_secs(30);

/// The shape of a fan-out run.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Watch streams to open.
    pub watchers: usize,
    /// Changes the writer makes.
    pub events: u64,
    /// Changes per second.
    pub rate: f64,
    /// Bytes of a value.
    pub val_size: usize,
}

/// What a fan-out run measured.
#[derive(Debug)]
pub struct FanOut {
    /// Events delivered (watchers × events when nothing was lost).
    pub delivered: u64,
    /// Events not delivered within the drain time.
    pub missing: u64,
    /// Wall time from the first put to the last delivery.
    pub elapsed: Duration,
    /// Delivery latency in microseconds.
    pub latency: Histogram<u64>,
    /// The first problem seen, if any.
    pub first_error: Option<String>,
}

/// Opens one watch stream and waits for the server's first frame.
async fn open_watcher(addr: &str) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let request = format!(
        "GET /v1/watch/{CONTEXT}/{FAMILY} HTTP/1.1\r\nHost: {addr}\r\nAmphora-Read-Token: {READ}\r\nAccept: text/event-stream\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    // The head and the hello comment come together; read until the comment.
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(10).any(|w| w == b": watching") {
        let n = tcp.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "watch stream closed before it started");
        head.extend_from_slice(&buf[..n]);
        anyhow::ensure!(head.len() < 8192, "no hello from the watch stream");
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "watch refused: {}",
        String::from_utf8_lossy(&head[..head.len().min(200)])
    );
    Ok(tcp)
}

/// Counts `\nid: ` in a byte stream split into reads, noting when each arrived.
async fn follow(mut tcp: TcpStream, events: usize, deadline: tokio::time::Instant) -> Vec<Instant> {
    const NEEDLE: &[u8] = b"\nid: ";
    let mut arrivals = Vec::with_capacity(events);
    let mut buf = vec![0u8; 16 * 1024];
    // The last bytes of the previous read, so a needle split across reads counts.
    let mut carry: Vec<u8> = Vec::with_capacity(NEEDLE.len());
    while arrivals.len() < events {
        let n = match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        let now = Instant::now();
        let mut window = std::mem::take(&mut carry);
        window.extend_from_slice(&buf[..n]);
        let found = window
            .windows(NEEDLE.len())
            .filter(|w| *w == NEEDLE)
            .count();
        arrivals.extend(std::iter::repeat_n(now, found));
        let keep = window.len().min(NEEDLE.len() - 1);
        carry.extend_from_slice(&window[window.len() - keep..]);
    }
    arrivals
}

/// Sends one put over a kept-alive connection and reads its answer.
async fn put(tcp: &mut TcpStream, addr: &str, i: u64, value: &str) -> anyhow::Result<()> {
    let request = format!(
        "PUT /v1/kv/{CONTEXT}/{FAMILY}/e{i} HTTP/1.1\r\nHost: {addr}\r\nAmphora-Read-Token: {READ}\r\nAmphora-Write-Token: {WRITE}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{value}",
        value.len()
    );
    tcp.write_all(request.as_bytes()).await?;
    // Answers are small: read until the head and the Content-Length body are in.
    let mut answer = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = tcp.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "connection closed during a put");
        answer.extend_from_slice(&buf[..n]);
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
            anyhow::ensure!(
                head.starts_with("http/1.1 200") || head.starts_with("http/1.1 201"),
                "put refused: {head}"
            );
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if answer.len() >= end + 4 + len {
                return Ok(());
            }
        }
    }
}

/// Opens `n` watchers with `open`, a batch at a time, so that the listen backlog
/// never overflows.
async fn open_all<W, F, Fut>(n: usize, open: F) -> anyhow::Result<Vec<W>>
where
    W: Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<W>> + Send + 'static,
{
    let mut opened = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    for _ in 0..n {
        if pending.len() >= CONNECT_CONCURRENCY {
            opened.push(pending.join_next().await.expect("a task")??);
        }
        pending.spawn(open());
    }
    while let Some(r) = pending.join_next().await {
        opened.push(r??);
    }
    Ok(opened)
}

/// Makes `events` changes at `rate` per second with `put`; answers when each was sent.
async fn paced<F, Fut>(
    events: u64,
    rate: f64,
    mut put: F,
) -> anyhow::Result<(Instant, Vec<Instant>)>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let started = Instant::now();
    let mut sent = Vec::with_capacity(events as usize);
    for i in 0..events {
        tokio::time::sleep_until((started + interval.mul_f64(i as f64)).into()).await;
        sent.push(Instant::now());
        put(i).await?;
    }
    Ok((started, sent))
}

/// When the watchers must have everything: the writer's schedule plus the drain time.
fn deadline(events: u64, rate: f64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs_f64(events as f64 / rate.max(0.001)) + DRAIN
}

/// Turns what each watcher received into the measurement: the n-th arrival is the
/// n-th change.
async fn tally(
    followers: Vec<tokio::task::JoinHandle<Vec<Instant>>>,
    started: Instant,
    sent: &[Instant],
) -> anyhow::Result<FanOut> {
    let events = sent.len() as u64;
    let mut result = FanOut {
        delivered: 0,
        missing: 0,
        elapsed: Duration::ZERO,
        latency: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
        first_error: None,
    };
    let mut last_arrival = started;
    for f in followers {
        let arrivals = f.await?;
        for (at, sent_at) in arrivals.iter().zip(sent) {
            let micros = at.saturating_duration_since(*sent_at).as_micros().max(1) as u64;
            let _ = result.latency.record(micros.min(600_000_000));
            last_arrival = last_arrival.max(*at);
        }
        result.delivered += arrivals.len().min(sent.len()) as u64;
        let missing = events.saturating_sub(arrivals.len() as u64);
        if missing > 0 && result.first_error.is_none() {
            result.first_error = Some(format!(
                "a watcher received {} of {events} events",
                arrivals.len()
            ));
        }
        result.missing += missing;
    }
    result.elapsed = last_arrival.duration_since(started);
    Ok(result)
}

/// Runs the fan-out against Amphora: `watchers` streams, `events` puts at `rate` per
/// second.
pub async fn fan_out(addr: &str, spec: Spec) -> anyhow::Result<FanOut> {
    let owned = addr.to_owned();
    let streams = open_all(spec.watchers, || {
        let addr = owned.clone();
        async move { open_watcher(&addr).await }
    })
    .await?;
    let until = deadline(spec.events, spec.rate);
    let followers: Vec<_> = streams
        .into_iter()
        .map(|tcp| tokio::spawn(follow(tcp, spec.events as usize, until)))
        .collect();
    let value = format!("\"{}\"", "v".repeat(spec.val_size.saturating_sub(2)));
    let writer = TcpStream::connect(addr).await?;
    writer.set_nodelay(true)?;
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let (started, sent) = paced(spec.events, spec.rate, |i| {
        let (writer, value) = (writer.clone(), value.clone());
        async move { put(&mut *writer.lock().await, addr, i, &value).await }
    })
    .await?;
    tally(followers, started, &sent).await
}

/// The same fan-out against etcd over gRPC: each watcher its own client connection
/// and watch stream on the prefix (as each Amphora watcher is its own connection),
/// one writer putting under the prefix.
#[cfg(feature = "etcd")]
pub async fn fan_out_etcd(addr: &str, spec: Spec) -> anyhow::Result<FanOut> {
    use etcd_client::{Client, WatchOptions};
    const PREFIX: &str = "watched/";
    let endpoint = format!("http://{addr}");
    let streams = open_all(spec.watchers, || {
        let endpoint = endpoint.clone();
        async move {
            let mut client = Client::connect([endpoint], None).await?;
            let mut stream = client
                .watch(PREFIX, Some(WatchOptions::new().with_prefix()))
                .await?;
            let first = stream.message().await?;
            anyhow::ensure!(
                first.is_some_and(|r| r.created()),
                "etcd did not create the watch"
            );
            anyhow::Ok((client, stream))
        }
    })
    .await?;
    let until = deadline(spec.events, spec.rate);
    let followers: Vec<_> = streams
        .into_iter()
        .map(|(client, mut stream)| {
            tokio::spawn(async move {
                let _client = client;
                let mut arrivals = Vec::with_capacity(spec.events as usize);
                while arrivals.len() < spec.events as usize {
                    match tokio::time::timeout_at(until, stream.message()).await {
                        Ok(Ok(Some(r))) => {
                            let now = Instant::now();
                            arrivals.extend(std::iter::repeat_n(now, r.events().len()));
                        }
                        _ => break,
                    }
                }
                arrivals
            })
        })
        .collect();
    let value = "v".repeat(spec.val_size);
    let writer = Client::connect([endpoint.as_str()], None).await?;
    let (started, sent) = paced(spec.events, spec.rate, |i| {
        let (mut w, value) = (writer.clone(), value.clone());
        async move {
            w.put(format!("{PREFIX}e{i}"), value, None).await?;
            anyhow::Ok(())
        }
    })
    .await?;
    tally(followers, started, &sent).await
}
