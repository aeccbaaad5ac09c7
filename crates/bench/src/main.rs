//! `amphora-bench`: the load generator and the side-by-side comparison.
//!
//! - `amphora-bench run --target KIND --endpoint HOST:PORT --workload W ...`: one
//!   measurement, flags like etcd's own benchmark tool.
//! - `amphora-bench suite ...`: starts every system, runs every workload, writes
//!   BENCHMARKS.md and the JSON results (what `scripts/bench.sh` runs).
//! - `amphora-bench report`: renders BENCHMARKS.md again from the JSON results.
//! - `amphora-bench bare-http --listen ADDR`: the ceiling server.

mod report;
mod servers;
mod suite;
mod targets;
mod watch;
mod workload;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "amphora-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One measurement against a running server.
    Run(RunArgs),
    /// Every system and workload, side by side; writes the report.
    Suite(Box<suite::SuiteArgs>),
    /// Renders the Markdown report again from saved JSON results.
    Report {
        /// The results of a suite run.
        #[arg(long, default_value = "bench-results.json")]
        json: std::path::PathBuf,
        /// Where to write the report.
        #[arg(long, default_value = "BENCHMARKS.md")]
        markdown: std::path::PathBuf,
    },
    /// Watch fan-out against a running server: watchers of one family (or etcd
    /// prefix), one writer.
    Watch {
        /// The system: amphora-native, or etcd-grpc (with the `etcd` feature).
        #[arg(long, value_enum, default_value = "amphora-native")]
        target: targets::Kind,
        /// `host:port` of the server (plain HTTP).
        #[arg(long)]
        endpoint: String,
        /// Watch streams to open.
        #[arg(long, default_value_t = 10_000)]
        watchers: usize,
        /// Changes the writer makes.
        #[arg(long, default_value_t = 100)]
        events: u64,
        /// Changes per second.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        /// Bytes of a value.
        #[arg(long, default_value_t = 256)]
        val_size: usize,
    },
    /// A bare HTTP server that answers 200 to everything.
    BareHttp {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8200")]
        listen: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The system and API.
    #[arg(long, value_enum)]
    target: targets::Kind,
    /// `host:port` of the server.
    #[arg(long)]
    endpoint: String,
    /// What to do.
    #[arg(long, value_enum, default_value = "put")]
    workload: workload::Workload,
    /// Concurrent clients; each has its own connection (`--conns` is accepted as
    /// etcd's tool names it, and must be equal or left out).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Connections (etcd's tool shares them among clients; here one per client).
    #[arg(long)]
    conns: Option<usize>,
    /// Requests in all (instead of --duration).
    #[arg(long, conflicts_with = "duration")]
    total: Option<u64>,
    /// How long to run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Bytes of a key.
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    /// Bytes of a value.
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    key_space: u64,
    /// Keys in order instead of at random.
    #[arg(long)]
    sequential_keys: bool,
    /// Open loop at this many requests per second (default: closed loop): requests
    /// fall due on a fixed schedule, any idle connection sends the next one due, and
    /// latency counts from when it was due.
    #[arg(long)]
    rate: Option<f64>,
}

async fn run_one(a: RunArgs) -> anyhow::Result<()> {
    if a.conns.is_some_and(|c| c != a.clients) {
        anyhow::bail!("--conns must equal --clients: every client has its own connection");
    }
    let t = targets::Target {
        kind: a.target,
        addr: a.endpoint,
        shape: workload::Shape {
            key_size: a.key_size,
            val_size: a.val_size,
            key_space: a.key_space,
            sequential: a.sequential_keys,
        },
        leases: Arc::new(Vec::new()),
    };
    let mut conns = Vec::new();
    for _ in 0..a.clients {
        conns.push(t.connect().await?);
    }
    let amount = match a.total {
        Some(n) => workload::Amount::Total(n),
        None => workload::Amount::Duration(a.duration),
    };
    let mode = a
        .rate
        .map(workload::Mode::Open)
        .unwrap_or(workload::Mode::Closed);
    let m = workload::run(conns, a.workload, t.shape, suite::FAMILIES, amount, mode).await;
    let secs = m.elapsed.as_secs_f64();
    let q = |p: f64| m.latency.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "target": a.target, "workload": a.workload, "requests": m.ok, "errors": m.errors,
            "first_error": m.first_error, "seconds": secs, "rps": m.ok as f64 / secs,
            "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999),
        })
    );
    Ok(())
}

/// The watch fan-out holds one connection per watcher: allow the hard limit of open
/// files instead of the usual soft limit of 1024.
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        eprintln!("amphora-bench: cannot raise the open files limit: {e}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(a) => run_one(a).await,
            Command::Suite(a) => suite::run(*a).await,
            Command::BareHttp { listen } => servers::serve_bare(&listen).await,
            Command::Watch {
                target,
                endpoint,
                watchers,
                events,
                rate,
                val_size,
            } => {
                let spec = watch::Spec {
                    watchers,
                    events,
                    rate,
                    val_size,
                };
                let m = match target {
                    #[cfg(feature = "etcd")]
                    targets::Kind::EtcdGrpc => watch::fan_out_etcd(&endpoint, spec).await?,
                    targets::Kind::AmphoraNative => watch::fan_out(&endpoint, spec).await?,
                    other => anyhow::bail!("no watch fan-out for {}", other.label()),
                };
                let q = |p: f64| m.latency.value_at_quantile(p) as f64 / 1000.0;
                println!(
                    "{}",
                    serde_json::json!({
                        "watchers": watchers, "events": events, "delivered": m.delivered,
                        "missing": m.missing, "first_error": m.first_error,
                        "seconds": m.elapsed.as_secs_f64(),
                        "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999),
                    })
                );
                Ok(())
            }
            Command::Report { json, markdown } => {
                let text = std::fs::read_to_string(&json)?;
                let results: suite::Results = serde_json::from_str(&text)?;
                std::fs::write(&markdown, report::markdown(&results))?;
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("amphora-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
