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
/// rate, latency measured from when each request should have been sent).
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
    let clients = conns.len() as u64;
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
    let mut tasks = Vec::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let issued = issued.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut rng = Rng::new(i as u64 + 1);
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            let interval = match mode {
                Mode::Open(rate) => Some(Duration::from_secs_f64(clients as f64 / rate.max(0.001))),
                Mode::Closed => None,
            };
            // Spread the clients' schedules over one interval.
            let mut next_send = started
                + interval
                    .map(|iv| iv.mul_f64(i as f64 / clients as f64))
                    .unwrap_or_default();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let seq = issued.fetch_add(1, Ordering::Relaxed);
                if seq >= total {
                    break;
                }
                let op = next_op(workload, &shape, &mut rng, seq, families);
                let intended = match interval {
                    Some(iv) => {
                        let now = Instant::now();
                        if next_send > now {
                            tokio::time::sleep_until(next_send.into()).await;
                        }
                        let t = next_send;
                        next_send += iv;
                        t
                    }
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
    measured
}
