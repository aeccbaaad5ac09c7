//! The whole comparison in one run: every system, every workload, the same clients,
//! the same machine; then the report with ratios computed pair by pair.

use crate::servers::{self, Server};
use crate::targets::{Kind, Target, etcd_grpc, redis_preload};
use crate::workload::{self, Amount, Mode, Shape, Workload};
use anyhow::Context;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The suite's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// The amphora binary (a release build).
    #[arg(long, default_value = "target/release/amphora")]
    pub amphora_bin: PathBuf,
    /// The etcd binary; without it etcd is left out.
    #[arg(long)]
    pub etcd_bin: Option<PathBuf>,
    /// The redis-server binary; without it Redis is left out.
    #[arg(long)]
    pub redis_bin: Option<PathBuf>,
    /// Concurrent clients (one connection each).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// How long each measurement runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How long the same workload runs, unmeasured, before each closed-loop
    /// measurement (caches of every system reach their steady state). Before a
    /// system's first get measurement every key is also read once, in order: random
    /// reads for a few seconds leave a cache that fills on reads partly cold on a
    /// slow machine (after 2 s at 40,000 gets per second, about 55 % of 100,000 keys).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Distinct keys of put, get, mixed and lease churn.
    #[arg(long, default_value_t = 100_000)]
    pub key_space: u64,
    /// Bytes of a key.
    #[arg(long, default_value_t = 16)]
    pub key_size: usize,
    /// Bytes of a value.
    #[arg(long, default_value_t = 256)]
    pub val_size: usize,
    /// Leases renewed by the lease churn workload.
    #[arg(long, default_value_t = 100_000)]
    pub leases: u64,
    /// Watchers of one family in the watch fan-out.
    #[arg(long, default_value_t = 10_000)]
    pub watchers: usize,
    /// Changes the fan-out's writer makes.
    #[arg(long, default_value_t = 100)]
    pub watch_events: u64,
    /// Changes per second the fan-out's writer makes. With 10,000 watchers one change
    /// costs about 0.2 CPU-seconds (server and load generator together), so on two
    /// cores 5 per second keeps fan-outs from queueing behind each other: the
    /// measurement is of delivery latency, not of a saturated machine.
    #[arg(long, default_value_t = 5.0)]
    pub watch_rate: f64,
    /// Entries loaded for the memory measurement.
    #[arg(long, default_value_t = 1_000_000)]
    pub memory_entries: u64,
    /// Alternating rounds for the two goals whose systems the main pass measures
    /// minutes apart: durable put against Redis `always`, get against the bare
    /// server. Both systems of a pair run side by side and each round measures one,
    /// then the other (the order swapped every round), so that the machine's drift
    /// falls on both alike; those goals' ratios are the medians of the rounds. 0
    /// leaves the rounds out (the ratios then come from the main pass).
    #[arg(long, default_value_t = 5)]
    pub pair_rounds: u32,
    /// Where scratch data directories go.
    #[arg(long, default_value = "/tmp/amphora-bench")]
    pub scratch: PathBuf,
    /// Results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    pub json: PathBuf,
    /// The Markdown report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub markdown: PathBuf,
    /// The command line to print in the report.
    #[arg(long, default_value = "scripts/bench.sh")]
    pub command: String,
}

/// One measurement.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Row {
    /// The workload.
    pub workload: String,
    /// The system and API.
    pub target: Kind,
    /// "closed" or "open at N req/s".
    pub mode: String,
    /// Clients.
    pub clients: usize,
    /// Successful requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Server RSS after the run, MB.
    pub rss_mb: f64,
    /// Server peak RSS so far, MB.
    pub peak_rss_mb: f64,
    /// Server CPU during the run, % of one core.
    pub cpu_pct: f64,
    /// CPU the host took from the machine during the run (steal), % of one core.
    #[serde(default)]
    pub steal_pct: f64,
}

/// What the client side of one measurement saw.
struct Outcome<'a> {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latency: &'a hdrhistogram::Histogram<u64>,
}

impl Row {
    /// A row from what the client saw and what the server used.
    fn new(
        workload: &str,
        target: Kind,
        mode: String,
        clients: usize,
        o: Outcome<'_>,
        server: &Server,
        (cpu, steal): (Duration, Duration),
    ) -> Row {
        let (rss, peak) = server.rss();
        let secs = o.elapsed.as_secs_f64().max(1e-9);
        let q = |p: f64| o.latency.value_at_quantile(p) as f64 / 1000.0;
        Row {
            workload: workload.into(),
            target,
            mode,
            clients,
            requests: o.ok,
            errors: o.errors,
            first_error: o.first_error,
            rps: o.ok as f64 / secs,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            rss_mb: rss as f64 / 1e6,
            peak_rss_mb: peak as f64 / 1e6,
            cpu_pct: cpu.as_secs_f64() / secs * 100.0,
            steal_pct: steal.as_secs_f64() / secs * 100.0,
        }
    }

    /// One line on stderr while the suite runs.
    fn print(&self, unit: &str) {
        eprintln!(
            "{:<22} {:<26} {:>10.0} {unit}  p50 {:>7.2} ms  p99 {:>7.2} ms  rss {:>7.1} MB  cpu {:>4.0}%  steal {:>3.0}%  errors {}",
            self.workload,
            self.target.label(),
            self.rps,
            self.p50_ms,
            self.p99_ms,
            self.rss_mb,
            self.cpu_pct,
            self.steal_pct,
            self.errors
        );
        if let Some(e) = &self.first_error {
            eprintln!("    first error: {e}");
        }
    }
}

/// The whole result.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Results {
    /// Settings, for the report.
    pub settings: serde_json::Value,
    /// Machine description.
    pub machine: Vec<(String, String)>,
    /// Every measurement.
    pub rows: Vec<Row>,
    /// The alternating rounds (see [`SuiteArgs::pair_rounds`]).
    #[serde(default)]
    pub rounds: Vec<Round>,
}

/// One alternating round of a goal pair: Amphora's native API and its peer, measured
/// one right after the other.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Round {
    /// The workload ("durable put" or "get").
    pub workload: String,
    /// 1, 2, ...
    pub round: u32,
    /// Amphora's measurement.
    pub amphora: Row,
    /// The peer's.
    pub peer: Row,
}

fn shape(a: &SuiteArgs, key_space: u64) -> Shape {
    Shape {
        key_size: a.key_size,
        val_size: a.val_size,
        key_space,
        sequential: false,
    }
}

async fn conns(t: &Target, n: usize) -> anyhow::Result<Vec<Box<dyn workload::Conn>>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(t.connect().await?);
    }
    Ok(out)
}

/// What runs before each closed-loop measurement: for gets, every key read once in
/// order; then `warmup` of the workload itself, unmeasured (see [`SuiteArgs::warmup`]).
async fn warm_up(t: &Target, w: Workload, a: &SuiteArgs) -> anyhow::Result<()> {
    if w == Workload::Get {
        let pass = Target {
            shape: Shape {
                sequential: true,
                ..t.shape
            },
            ..t.clone()
        };
        let c = conns(&pass, a.clients).await?;
        let amount = Amount::Total(pass.shape.key_space);
        workload::run(c, w, pass.shape, FAMILIES, amount, Mode::Closed).await;
    }
    if !a.warmup.is_zero() {
        let c = conns(t, a.clients).await?;
        let amount = Amount::Duration(a.warmup);
        workload::run(c, w, t.shape, FAMILIES, amount, Mode::Closed).await;
    }
    Ok(())
}

/// Runs one workload against one target and measures the server.
#[allow(clippy::too_many_arguments)]
async fn measure(
    rows: &mut Vec<Row>,
    server: &Server,
    t: &Target,
    name: &str,
    workload: Workload,
    clients: usize,
    amount: Amount,
    mode: Mode,
) -> anyhow::Result<f64> {
    let c = conns(t, clients).await?;
    let (cpu_before, steal_before) = (server.cpu(), servers::stolen());
    let m = workload::run(c, workload, t.shape, FAMILIES, amount, mode).await;
    let cpu = (server.cpu() - cpu_before, servers::stolen() - steal_before);
    let mode = match mode {
        Mode::Closed => "closed".into(),
        Mode::Open(r) => format!("open at {r:.0} req/s"),
    };
    let outcome = Outcome {
        ok: m.ok,
        errors: m.errors,
        first_error: m.first_error,
        elapsed: m.elapsed,
        latency: &m.latency,
    };
    let row = Row::new(name, t.kind, mode, clients, outcome, server, cpu);
    row.print("req/s");
    let rps = row.rps;
    rows.push(row);
    Ok(rps)
}

/// Runs the watch fan-out against Amphora or etcd and measures the server.
async fn measure_watch(
    rows: &mut Vec<Row>,
    server: &Server,
    t: &Target,
    a: &SuiteArgs,
) -> anyhow::Result<()> {
    let (cpu_before, steal_before) = (server.cpu(), servers::stolen());
    let spec = crate::watch::Spec {
        watchers: a.watchers,
        events: a.watch_events,
        rate: a.watch_rate,
        val_size: a.val_size,
    };
    let m = match t.kind {
        #[cfg(feature = "etcd")]
        Kind::EtcdGrpc => crate::watch::fan_out_etcd(&t.addr, spec).await?,
        _ => crate::watch::fan_out(&t.addr, spec).await?,
    };
    let cpu = (server.cpu() - cpu_before, servers::stolen() - steal_before);
    let mode = format!(
        "{} watchers, {} puts at {} /s",
        a.watchers, a.watch_events, a.watch_rate
    );
    let outcome = Outcome {
        ok: m.delivered,
        errors: m.missing,
        first_error: m.first_error,
        elapsed: m.elapsed,
        latency: &m.latency,
    };
    let row = Row::new(
        "watch fan-out",
        t.kind,
        mode,
        a.watchers,
        outcome,
        server,
        cpu,
    );
    row.print("events/s");
    rows.push(row);
    Ok(())
}

/// Starts one system, fresh.
type Start<'a> = Box<dyn Fn() -> anyhow::Result<Server> + 'a>;

/// Families of 100 entries for the list workload.
pub const FAMILIES: u64 = 10;

/// Loads what a system needs before its workloads: every key of the key space,
/// the list families, and the leases.
async fn preload(t: &Target, a: &SuiteArgs) -> anyhow::Result<Target> {
    let loader = |kind: Kind, key_space: u64| Target {
        kind,
        shape: Shape {
            sequential: true,
            ..shape(a, key_space)
        },
        ..t.clone()
    };
    match t.kind {
        Kind::BareHttp => {}
        Kind::RedisAlways | Kind::RedisEverysec => {
            put_all(&loader(t.kind, a.key_space)).await?;
            redis_preload(&loader(t.kind, a.leases), FAMILIES).await?;
        }
        Kind::AmphoraNative | Kind::AmphoraComet => {
            put_all(&loader(Kind::AmphoraNative, a.key_space)).await?;
            // Families for lists and leased entries for lease churn, through the native API.
            amphora_preload(t, a).await?;
        }
        Kind::EtcdGrpc | Kind::EtcdGateway => {
            put_all(&loader(Kind::EtcdGateway, a.key_space)).await?;
            etcd_gateway_lists(t).await?;
            if cfg!(feature = "etcd") {
                let leases =
                    etcd_grpc::grant_leases(&loader(Kind::EtcdGrpc, a.leases), a.leases).await?;
                return Ok(Target {
                    leases: Arc::new(leases),
                    ..t.clone()
                });
            }
        }
    }
    Ok(t.clone())
}

/// Writes every key of `t`'s key space once (`t`'s shape says in which order).
async fn put_all(t: &Target) -> anyhow::Result<()> {
    let c = conns(t, 32).await?;
    let m = workload::run(
        c,
        Workload::Put,
        t.shape,
        FAMILIES,
        Amount::Total(t.shape.key_space),
        Mode::Closed,
    )
    .await;
    anyhow::ensure!(m.errors == 0, "preload failed: {:?}", m.first_error);
    Ok(())
}

/// The goal pairs in alternating rounds (see [`SuiteArgs::pair_rounds`]). Each pair
/// gets its own fresh servers, both running for all its rounds, both with every key
/// written once; each measurement follows the same warm-up as in the main pass. The
/// peer goes first in odd rounds, Amphora in even ones.
async fn alternate(a: &SuiteArgs, scratch: &std::path::Path) -> anyhow::Result<Vec<Round>> {
    let mut pairs: Vec<(Workload, &str, Kind, Start)> = Vec::new();
    if let Some(bin) = &a.redis_bin {
        pairs.push((
            Workload::Put,
            "durable put",
            Kind::RedisAlways,
            Box::new(move || servers::redis(bin, scratch, "always")),
        ));
    }
    pairs.push((
        Workload::Get,
        "get",
        Kind::BareHttp,
        Box::new(|| servers::bare(scratch)),
    ));
    let mut rounds = Vec::new();
    if a.pair_rounds == 0 {
        return Ok(rounds);
    }
    for (w, name, peer_kind, start_peer) in pairs {
        let ours = servers::amphora(&a.amphora_bin, scratch)?;
        let peer = start_peer().with_context(|| format!("starting {peer_kind:?}"))?;
        let systems = [(Kind::AmphoraNative, &ours), (peer_kind, &peer)];
        let targets = systems.map(|(kind, server)| Target {
            kind,
            addr: server.addr.clone(),
            shape: shape(a, a.key_space),
            leases: Arc::new(Vec::new()),
        });
        for t in &targets {
            if t.kind != Kind::BareHttp {
                let load = Target {
                    shape: Shape {
                        sequential: true,
                        ..t.shape
                    },
                    ..t.clone()
                };
                put_all(&load)
                    .await
                    .with_context(|| format!("preloading {:?}", t.kind))?;
            }
        }
        for round in 1..=a.pair_rounds {
            let order = if round % 2 == 1 { [1, 0] } else { [0, 1] };
            let mut measured: [Option<Row>; 2] = [None, None];
            for i in order {
                let (t, server) = (&targets[i], systems[i].1);
                warm_up(t, w, a).await?;
                let mut rows = Vec::new();
                let label = format!("{name}, round {round}");
                let amount = Amount::Duration(a.duration);
                measure(
                    &mut rows,
                    server,
                    t,
                    &label,
                    w,
                    a.clients,
                    amount,
                    Mode::Closed,
                )
                .await?;
                measured[i] = rows.pop();
            }
            let [Some(amphora), Some(peer)] = measured else {
                anyhow::bail!("a round without both measurements");
            };
            rounds.push(Round {
                workload: name.into(),
                round,
                amphora,
                peer,
            });
        }
    }
    Ok(rounds)
}

/// One kept-alive HTTP/1.1 connection for preloading.
struct Http {
    addr: String,
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
}

impl Http {
    async fn connect(addr: &str) -> anyhow::Result<Http> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Http {
            addr: addr.to_owned(),
            sender,
        })
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> anyhow::Result<()> {
        use http_body_util::BodyExt;
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.addr);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.sender.ready().await?;
        let r = self
            .sender
            .send_request(b.body(http_body_util::Full::new(bytes::Bytes::from(body)))?)
            .await?;
        let status = r.status();
        let _ = r.into_body().collect().await?;
        anyhow::ensure!(status.is_success(), "{method} {path}: {status}");
        Ok(())
    }
}

async fn amphora_preload(t: &Target, a: &SuiteArgs) -> anyhow::Result<()> {
    use crate::targets::{READ, WRITE};
    let v = format!("\"{}\"", "v".repeat(a.val_size.saturating_sub(2)));
    let h = [("amphora-read-token", READ), ("amphora-write-token", WRITE)];
    let mut http = Http::connect(&t.addr).await?;
    for f in 0..FAMILIES {
        for e in 0..100 {
            http.send("PUT", &format!("/v1/kv/bench/list{f}/e{e}"), &h, v.clone())
                .await?;
        }
    }
    // Leased entries, written concurrently so that they share group commits.
    let mut tasks = tokio::task::JoinSet::new();
    let per = a.leases.div_ceil(32);
    for w in 0..32u64 {
        let (addr, v, shape) = (t.addr.clone(), v.clone(), shape(a, a.leases));
        tasks.spawn(async move {
            let mut http = Http::connect(&addr).await?;
            for i in (w * per)..((w + 1) * per).min(shape.key_space) {
                let path = format!("/v1/kv/bench/lease/{}?ttl=300s", workload::key(&shape, i));
                http.send("PUT", &path, &h, v.clone()).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

async fn etcd_gateway_lists(t: &Target) -> anyhow::Result<()> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut http = Http::connect(&t.addr).await?;
    for f in 0..FAMILIES {
        for e in 0..100 {
            let body = serde_json::json!({"key": b64(&format!("list{f}/e{e}")), "value": b64("v")})
                .to_string();
            http.send("POST", "/v3/kv/put", &[], body).await?;
        }
    }
    Ok(())
}

const WORKLOADS: [(Workload, &str); 5] = [
    (Workload::Put, "durable put"),
    (Workload::Get, "get"),
    (Workload::Mixed, "mixed 90/10"),
    (Workload::List, "list 100"),
    (Workload::LeaseChurn, "lease churn"),
];

/// Runs everything and writes the JSON and Markdown reports.
pub async fn run(a: SuiteArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.scratch)?;
    let scratch = a.scratch.clone();
    let scratch = scratch.as_path();
    let mut rows = Vec::new();
    // In the order that puts the pairs the goals compare close in time (the
    // machine's speed drifts by the minute on a shared host): the bare server's
    // gets right before Amphora's, Redis `always` right after Amphora, etcd last.
    let mut systems: Vec<(Vec<Kind>, Start)> = vec![
        (vec![Kind::BareHttp], Box::new(|| servers::bare(scratch))),
        (
            vec![Kind::AmphoraNative, Kind::AmphoraComet],
            Box::new(|| servers::amphora(&a.amphora_bin, scratch)),
        ),
    ];
    if let Some(bin) = &a.redis_bin {
        systems.push((
            vec![Kind::RedisAlways],
            Box::new(move || servers::redis(bin, scratch, "always")),
        ));
        systems.push((
            vec![Kind::RedisEverysec],
            Box::new(move || servers::redis(bin, scratch, "everysec")),
        ));
    }
    if let Some(bin) = &a.etcd_bin {
        let mut kinds = vec![Kind::EtcdGateway];
        if cfg!(feature = "etcd") {
            kinds.insert(0, Kind::EtcdGrpc);
        }
        systems.push((kinds, Box::new(move || servers::etcd(bin, scratch))));
    }

    for (kinds, start) in &systems {
        let server = start().with_context(|| format!("starting {:?}", kinds))?;
        let base = Target {
            kind: kinds[0],
            addr: server.addr.clone(),
            shape: shape(&a, a.key_space),
            leases: Arc::new(Vec::new()),
        };
        let loaded = preload(&base, &a)
            .await
            .with_context(|| format!("preloading {:?}", kinds))?;
        for kind in kinds {
            let t = Target {
                kind: *kind,
                ..loaded.clone()
            };
            for (w, name) in WORKLOADS {
                let probe = workload::next_op(w, &t.shape, &mut workload::Rng::new(1), 0, FAMILIES);
                if !kind.supports(probe) || (*kind == Kind::BareHttp && w != Workload::Get) {
                    continue;
                }
                let t = if w == Workload::LeaseChurn {
                    Target {
                        shape: shape(&a, a.leases),
                        ..t.clone()
                    }
                } else {
                    t.clone()
                };
                warm_up(&t, w, &a).await?;
                let peak = measure(
                    &mut rows,
                    &server,
                    &t,
                    name,
                    w,
                    a.clients,
                    Amount::Duration(a.duration),
                    Mode::Closed,
                )
                .await?;
                // Latency at half the peak load, for durable put and get.
                if matches!(w, Workload::Put | Workload::Get) && peak > 0.0 {
                    let label = format!("{name} at half peak");
                    measure(
                        &mut rows,
                        &server,
                        &t,
                        &label,
                        w,
                        a.clients,
                        Amount::Duration(a.duration),
                        Mode::Open(peak / 2.0),
                    )
                    .await?;
                }
            }
        }
        // The fan-out last: its 10,000 connections leave the server bigger than the
        // other workloads found it.
        for kind in kinds {
            if matches!(kind, Kind::AmphoraNative | Kind::EtcdGrpc) && a.watchers > 0 {
                let t = Target {
                    kind: *kind,
                    ..loaded.clone()
                };
                measure_watch(&mut rows, &server, &t, &a).await?;
            }
        }
        drop(server);
    }

    let rounds = alternate(&a, scratch).await?;

    // Memory: a fresh server per system, loaded with memory_entries entries.
    for (kinds, start) in &systems {
        let kind = kinds[0];
        if kind == Kind::BareHttp {
            continue;
        }
        let server = start()?;
        let kind = if kind == Kind::EtcdGrpc {
            Kind::EtcdGateway
        } else {
            kind
        };
        let t = Target {
            kind,
            addr: server.addr.clone(),
            shape: Shape {
                sequential: true,
                ..shape(&a, a.memory_entries)
            },
            leases: Arc::new(Vec::new()),
        };
        let name = format!("memory: load {} entries", a.memory_entries);
        measure(
            &mut rows,
            &server,
            &t,
            &name,
            Workload::Put,
            a.clients,
            Amount::Total(a.memory_entries),
            Mode::Closed,
        )
        .await?;
        drop(server);
    }

    let results = Results {
        settings: serde_json::json!({
            "clients": a.clients, "duration_s": a.duration.as_secs_f64(),
            "warmup_s": a.warmup.as_secs_f64(), "key_space": a.key_space,
            "key_size": a.key_size, "val_size": a.val_size, "leases": a.leases,
            "memory_entries": a.memory_entries, "command": a.command,
            "watchers": a.watchers, "watch_events": a.watch_events, "watch_rate": a.watch_rate,
            "pair_rounds": a.pair_rounds,
        }),
        machine: crate::report::machine(&a),
        rows,
        rounds,
    };
    std::fs::write(&a.json, serde_json::to_string_pretty(&results)?)?;
    std::fs::write(&a.markdown, crate::report::markdown(&results))?;
    eprintln!("wrote {} and {}", a.json.display(), a.markdown.display());
    // A measurement with failed requests measures something else than it says.
    let failed: Vec<String> = results
        .rows
        .iter()
        .chain(results.rounds.iter().flat_map(|r| [&r.amphora, &r.peer]))
        .filter(|r| r.errors > 0)
        .map(|r| {
            format!(
                "{} / {}: {} errors ({})",
                r.workload,
                r.target.label(),
                r.errors,
                r.first_error.as_deref().unwrap_or("")
            )
        })
        .collect();
    anyhow::ensure!(failed.is_empty(), "requests failed:\n{}", failed.join("\n"));
    Ok(())
}
