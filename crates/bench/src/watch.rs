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

/// Runs the fan-out: `watchers` streams, `events` puts at `rate` per second.
pub async fn fan_out(
    addr: &str,
    watchers: usize,
    events: u64,
    rate: f64,
    val_size: usize,
) -> anyhow::Result<FanOut> {
    // Open the watchers a batch at a time, so the listen backlog never overflows.
    let mut streams = Vec::with_capacity(watchers);
    let mut pending = tokio::task::JoinSet::new();
    for _ in 0..watchers {
        if pending.len() >= CONNECT_CONCURRENCY {
            streams.push(pending.join_next().await.expect("a task")??);
        }
        let addr = addr.to_owned();
        pending.spawn(async move { open_watcher(&addr).await });
    }
    while let Some(r) = pending.join_next().await {
        streams.push(r??);
    }
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let deadline = tokio::time::Instant::now() + interval.mul_f64(events as f64) + DRAIN;
    let followers: Vec<_> = streams
        .into_iter()
        .map(|tcp| tokio::spawn(follow(tcp, events as usize, deadline)))
        .collect();

    let value = format!("\"{}\"", "v".repeat(val_size.saturating_sub(2)));
    let mut writer = TcpStream::connect(addr).await?;
    writer.set_nodelay(true)?;
    let started = Instant::now();
    let mut sent = Vec::with_capacity(events as usize);
    for i in 0..events {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        sent.push(Instant::now());
        put(&mut writer, addr, i, &value).await?;
    }
    let sent = Arc::new(sent);

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
        for (n, at) in arrivals.iter().enumerate() {
            let micros = at.saturating_duration_since(sent[n]).as_micros().max(1) as u64;
            let _ = result.latency.record(micros.min(600_000_000));
            last_arrival = last_arrival.max(*at);
        }
        result.delivered += arrivals.len() as u64;
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
