//! Workloads, targets and the load loop (closed and open), target-independent.

use hdrhistogram::Histogram;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the clients do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Durable writes of `val-size` byte values over `key-space` keys.
    Put,
    /// Reads of preloaded keys.
    Get,
    /// 90 % reads, 10 % writes.
    Mixed,
    /// Lists of a family (prefix) of 100 entries.
    List,
    /// Heartbeats renewing preloaded leases.
    LeaseChurn,
}

/// One operation.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Write key i.
    Put(u64),
    /// Read key i.
    Get(u64),
    /// List family i.
    List(u64),
    /// Renew lease i.
    KeepAlive(u64),
}

/// The boxed future of one operation.
pub type OpFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// One connection (or channel) to a target, used by one client at a time.
pub trait Conn: Send {
    /// Runs one operation to completion.
    fn run(&mut self, op: Op) -> OpFuture<'_>;
}

/// How keys and values look.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Shape {
    /// Bytes of a key (zero-padded decimal).
    pub key_size: usize,
    /// Bytes of a value.
    pub val_size: usize,
    /// How many distinct keys.
    pub key_space: u64,
    /// Keys in order instead of at random.
    pub sequential: bool,
}

/// The key of index `i`.
pub fn key(shape: &Shape, i: u64) -> String {
    format!("{:0width$}", i, width = shape.key_size)
}

/// A value of `val_size` bytes, safe in JSON strings, URLs and RESP.
pub fn value(shape: &Shape) -> String {
    "v".repeat(shape.val_size)
}

/// A small, fast PRNG (xorshift64*): random keys without a dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next number.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Picks the next operation of a workload.
pub fn next_op(workload: Workload, shape: &Shape, rng: &mut Rng, seq: u64, families: u64) -> Op {
    let k = if shape.sequential {
        seq % shape.key_space
    } else {
        rng.below(shape.key_space)
    };
    match workload {
        Workload::Put => Op::Put(k),
        Workload::Get => Op::Get(k),
        Workload::Mixed => {
            if rng.below(10) == 0 {
                Op::Put(k)
            } else {
                Op::Get(k)
            }
        }
        Workload::List => Op::List(rng.below(families)),
        Workload::LeaseChurn => Op::KeepAlive(k),
    }
}

/// How long or how much.
#[derive(Debug, Clone, Copy)]
pub enum Amount {
    /// This many requests in all.
    Total(u64),
    /// For this long.
    Duration(Duration),
}

/// Closed loop (each client waits for its answer) or open loop (requests at a fixed
/// rate, latency measured from when each request should have been sent: see
/// [`Pacer`]).
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// As fast as the clients go.
    Closed,
    /// This many requests per second in all.
    Open(f64),
}

/// What a run measured on the client side.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Requests answered successfully.
    pub ok: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latencies in microseconds.
    pub latency: Histogram<u64>,
    /// The first error seen, if any.
    pub first_error: Option<String>,
}

/// Runs `workload` with one connection per client.
pub async fn run(
    conns: Vec<Box<dyn Conn>>,
    workload: Workload,
    shape: Shape,
    families: u64,
    amount: Amount,
    mode: Mode,
) -> Measured {
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = match amount {
        Amount::Duration(d) => Some(started + d),
        Amount::Total(_) => None,
    };
    let total = match amount {
        Amount::Total(n) => n,
        Amount::Duration(_) => u64::MAX,
    };
    let pacer = match mode {
        Mode::Open(rate) => Some(Pacer::start(started, rate, deadline)),
        Mode::Closed => None,
    };
    let mut tasks = Vec::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let issued = issued.clone();
        let pacer = pacer.as_ref().map(|p| p.shared.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut rng = Rng::new(i as u64 + 1);
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let seq = issued.fetch_add(1, Ordering::Relaxed);
                if seq >= total {
                    break;
                }
                let op = next_op(workload, &shape, &mut rng, seq, families);
                let intended = match &pacer {
                    Some(pacer) => match pacer.next().await {
                        Some(due) => due,
                        None => break,
                    },
                    None => Instant::now(),
                };
                match conn.run(op).await {
                    Ok(()) => {
                        ok += 1;
                        let micros = intended.elapsed().as_micros().max(1) as u64;
                        let _ = hist.record(micros.min(60_000_000));
                    }
                    Err(e) => {
                        errors += 1;
                        if first_error.is_none() {
                            first_error = Some(format!("{e:#}"));
                        }
                    }
                }
            }
            (hist, ok, errors, first_error)
        }));
    }
    let mut measured = Measured {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        first_error: None,
    };
    for t in tasks {
        let (hist, ok, errors, first_error) = t.await.expect("client task");
        let _ = measured.latency.add(&hist);
        measured.ok += ok;
        measured.errors += errors;
        measured.first_error = measured.first_error.or(first_error);
    }
    measured.elapsed = started.elapsed();
    drop(pacer);
    measured
}

/// The open loop's schedule: request `k` (counting from 0, over all clients) is due
/// at `started + k / rate`, and any client that is free takes the next one due. A
/// client busy past a request's time delays it, and that delay counts in its latency
/// (no coordinated omission).
///
/// The requests are released by a thread of its own, not by tokio's timer: tokio
/// rounds every sleep up to whole milliseconds, which added 0-2 ms of the load
/// generator's own to every latency measured from the schedule (answers that took
/// the server 50 us measured 1.2 ms at the median). A std sleep wakes within tens of
/// microseconds; the thread sleeps at least [`Pacer::MIN_SLEEP`] at a time and
/// releases every request due when it wakes, so that at high rates it does not cost
/// a wake-up per request.
struct Pacer {
    shared: Arc<PacerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct PacerShared {
    /// One permit per request due and not yet taken; closed when the run ends.
    due: tokio::sync::Semaphore,
    /// Requests taken so far.
    taken: AtomicU64,
    started: Instant,
    period: Duration,
    stop: std::sync::atomic::AtomicBool,
}

impl PacerShared {
    /// When request `k` falls due.
    fn due_at(&self, k: u64) -> Instant {
        let nanos = u64::try_from(self.period.as_nanos()).unwrap_or(u64::MAX);
        self.started + Duration::from_nanos(nanos.saturating_mul(k))
    }

    /// Waits for the next request to be due; answers when it was due, or `None`
    /// once the run is over.
    async fn next(&self) -> Option<Instant> {
        self.due.acquire().await.ok()?.forget();
        let k = self.taken.fetch_add(1, Ordering::Relaxed);
        // Never later than now: at most as many were taken as were released.
        Some(self.due_at(k))
    }
}

impl Pacer {
    /// The shortest sleep between releases.
    const MIN_SLEEP: Duration = Duration::from_micros(100);

    fn start(started: Instant, rate: f64, deadline: Option<Instant>) -> Pacer {
        let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let shared = Arc::new(PacerShared {
            due: tokio::sync::Semaphore::new(0),
            taken: AtomicU64::new(0),
            started,
            period,
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let releaser = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                let s = releaser;
                let mut released = 0u64;
                while !s.stop.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if deadline.is_some_and(|d| now >= d) {
                        break;
                    }
                    // Requests 0..=k are due when k * period <= elapsed.
                    let due = u64::try_from(
                        now.duration_since(s.started).as_nanos() / period.as_nanos().max(1),
                    )
                    .unwrap_or(u64::MAX)
                    .saturating_add(1)
                    // Bounded, so that an absurd rate cannot overflow the semaphore.
                    .min(released.saturating_add(1 << 20));
                    if due > released {
                        s.due.add_permits((due - released) as usize);
                        released = due;
                    }
                    let next = s.due_at(released);
                    let wait = next.saturating_duration_since(Instant::now());
                    // Wake at least every 50 ms to notice the end of the run.
                    std::thread::sleep(wait.clamp(Self::MIN_SLEEP, Duration::from_millis(50)));
                }
                s.due.close();
            })
            .expect("starting the pacer thread");
        Pacer {
            shared,
            thread: Some(thread),
        }
    }
}

impl Drop for Pacer {
    /// Ends the schedule: clients still waiting for a request stop.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pacer_hands_out_requests_in_order_never_early_and_ends_with_the_run() {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(100);
        let pacer = Pacer::start(started, 2000.0, Some(deadline));
        let shared = pacer.shared.clone();
        let (mut taken, mut last) = (0u64, None);
        while let Some(due) = shared.next().await {
            assert!(
                due <= Instant::now(),
                "a request was handed out before it was due"
            );
            assert!(last.is_none_or(|l| due > l), "due times go back");
            assert_eq!(due, started + Duration::from_micros(500) * taken as u32);
            last = Some(due);
            taken += 1;
        }
        assert!(Instant::now() >= deadline, "the schedule ended early");
        // 0.5 ms apart: requests 0 to 200 fall due by the deadline, and no more.
        assert!((1..=201).contains(&taken), "{taken} requests handed out");
        drop(pacer);
    }

    #[tokio::test]
    async fn dropping_the_pacer_ends_a_schedule_without_a_deadline() {
        let pacer = Pacer::start(Instant::now(), 1.0, None);
        let shared = pacer.shared.clone();
        assert!(shared.next().await.is_some(), "request 0 is due at once");
        drop(pacer);
        assert!(shared.next().await.is_none());
    }
}
