//! The Markdown report: machine, settings, every measurement, ratios computed pair by
//! pair within the run, and the goals with their verdicts.

use crate::suite::{Results, Round, Row, SuiteArgs};
use crate::targets::Kind;
use std::fmt::Write;
use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A description of the machine and the software measured.
pub fn machine(a: &SuiteArgs) -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .next()
        .unwrap_or("")
        .replace("MemTotal:", "")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut m = vec![
        ("date".into(), run("date", &["-u", "+%Y-%m-%d %H:%M UTC"])),
        ("cpu".into(), format!("{cores} cores, {model}")),
        ("memory".into(), mem),
        ("kernel".into(), run("uname", &["-sr"])),
        (
            "scratch file system".into(),
            run(
                "stat",
                &["-f", "-c", "%T", &a.scratch.display().to_string()],
            ),
        ),
        ("rustc".into(), run("rustc", &["--version"])),
    ];
    if let Some(etcd) = &a.etcd_bin {
        m.push((
            "etcd".into(),
            run(&etcd.display().to_string(), &["--version"]),
        ));
    }
    if let Some(redis) = &a.redis_bin {
        m.push((
            "redis".into(),
            run(&redis.display().to_string(), &["--version"]),
        ));
    }
    m
}

fn find<'a>(rows: &'a [Row], workload: &str, kind: Kind) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.workload == workload && r.target == kind)
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// Renders the report.
pub fn markdown(r: &Results) -> String {
    let mut o = String::new();
    let s = &r.settings;
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Made by `{}` in one run: every system on the same machine, started fresh by the \
         harness (`crates/bench`), driven by the same load generator with the same workload. \
         Client and servers share the machine. Do not edit by hand: run the script again.\n",
        s["command"].as_str().unwrap_or("scripts/bench.sh")
    );
    let _ = writeln!(o, "## Machine\n\n| | |\n|---|---|");
    for (k, v) in &r.machine {
        let _ = writeln!(o, "| {k} | {v} |");
    }
    let _ = writeln!(
        o,
        "\n## Settings\n\n{} clients (one connection each, closed loop unless marked open; in the open \
         loop requests fall due at a fixed rate, an idle connection sends the next one due and \
         latency counts from when it was due), {} s per \
         measurement after {} s of the same workload unmeasured (and, before a system's first get \
         measurement, one read of every key in order, so that caches filled by reads start warm), keys of {} bytes over a key space of {}, values of {} bytes, {} leases, {} \
         entries for the memory measurement. Amphora runs with its defaults (embedded redb store; \
         every acknowledged write is in the write-ahead log, one fsync per group commit; \
         a checkpoint every 20 ms writes the entries as a sorted run and the history to the B-tree, made durable every 2 s; page cache of 8 MiB, entry cache of 48 MiB). etcd runs as one member with its defaults; reads use serializable \
         ranges. Redis runs with the append-only file, `appendfsync always` (durable, the fair \
         comparison) and `everysec`. Systems are measured one after the other: the bare server, \
         Amphora, Redis `always`, Redis `everysec`, etcd, so that the bare server's gets come \
         about a minute before Amphora's and Redis `always` a few minutes after it (a shared \
         host's speed drifts by the minute); then those two pairs again, in alternating rounds \
         (below). Steal % is the CPU time the host took from this machine during a \
         measurement (`/proc/stat`), in % of one core.\n",
        s["clients"],
        s["duration_s"],
        s.get("warmup_s").cloned().unwrap_or(serde_json::json!(0)),
        s["key_size"],
        s["key_space"],
        s["val_size"],
        s["leases"],
        s["memory_entries"]
    );
    if s.get("watchers").is_some_and(|w| w.as_u64() != Some(0)) {
        let _ = writeln!(
            o,
            concat!(
                "Watch fan-out: {} watchers of one family, each its own connection holding ",
                "`GET /v1/watch/bench/watched` open (for etcd: its own gRPC client connection ",
                "with one watch stream on a key prefix; Redis has no equivalent here), and one ",
                "writer making {} changes at {} per ",
                "second; latency runs from the moment a put is sent to the moment its event ",
                "reaches a watcher (the durable write included). One change to 10,000 watchers ",
                "costs about 0.2 CPU-seconds between server and load generator, so the rate keeps ",
                "fan-outs from queueing behind each other on two cores; the req/s column counts ",
                "events delivered per second.\n"
            ),
            s["watchers"], s["watch_events"], s["watch_rate"]
        );
    }

    let _ = writeln!(o, "## Results\n");
    let _ = writeln!(
        o,
        "| workload | system | mode | req/s | p50 ms | p99 ms | p99.9 ms | server RSS MB | server CPU % | steal % | errors |"
    );
    let _ = writeln!(o, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} | {} |",
            row.workload,
            row.target.label(),
            row.mode,
            row.rps,
            row.p50_ms,
            row.p99_ms,
            row.p999_ms,
            row.rss_mb,
            row.cpu_pct,
            row.steal_pct,
            row.errors
        );
    }

    let peers = [
        Kind::AmphoraComet,
        Kind::EtcdGrpc,
        Kind::EtcdGateway,
        Kind::RedisAlways,
        Kind::RedisEverysec,
        Kind::BareHttp,
    ];
    let _ = writeln!(
        o,
        "\n## Ratios\n\nAmphora native API throughput divided by each peer's, workload by workload, in this run.\n"
    );
    let _ = writeln!(o, "| workload | {} |", peers.map(|p| p.label()).join(" | "));
    let _ = writeln!(o, "|---|{}", "---:|".repeat(peers.len()));
    let mut workloads: Vec<&str> = Vec::new();
    for row in &r.rows {
        if !workloads.contains(&row.workload.as_str()) && row.mode == "closed" {
            workloads.push(&row.workload);
        }
    }
    for w in &workloads {
        let Some(ours) = find(&r.rows, w, Kind::AmphoraNative) else {
            continue;
        };
        let cells: Vec<String> = peers
            .iter()
            .map(|p| match find(&r.rows, w, *p) {
                Some(theirs) if theirs.rps > 0.0 => format!("{:.2}×", ours.rps / theirs.rps),
                _ => "–".into(),
            })
            .collect();
        let _ = writeln!(o, "| {w} | {} |", cells.join(" | "));
    }

    // Goals.
    let rps = |w: &str, k: Kind| find(&r.rows, w, k).map(|x| x.rps);
    let p99 = |w: &str, k: Kind| find(&r.rows, w, k).map(|x| x.p99_ms);
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let mut goals: Vec<(String, String, Option<bool>)> = Vec::new();
    let put_etcd = ratio(
        rps("durable put", Kind::AmphoraNative),
        rps("durable put", Kind::EtcdGrpc),
    );
    goals.push((
        "durable put ≥ 2× etcd (gRPC)".into(),
        fmt_ratio(put_etcd),
        put_etcd.map(|x| x >= 2.0),
    ));
    let put_redis = paired(
        r,
        "durable put",
        ratio(
            rps("durable put", Kind::AmphoraNative),
            rps("durable put", Kind::RedisAlways),
        ),
    );
    goals.push((
        "durable put ≥ Redis (appendfsync always)".into(),
        put_redis.1,
        put_redis.0.map(|x| x >= 1.0),
    ));
    let get_etcd = ratio(rps("get", Kind::AmphoraNative), rps("get", Kind::EtcdGrpc));
    goals.push((
        "get ≥ 2× etcd (gRPC, serializable)".into(),
        fmt_ratio(get_etcd),
        get_etcd.map(|x| x >= 2.0),
    ));
    let get_bare = paired(
        r,
        "get",
        ratio(rps("get", Kind::AmphoraNative), rps("get", Kind::BareHttp)),
    );
    goals.push((
        "get ≥ 70 % of the bare HTTP ceiling".into(),
        get_bare.1,
        get_bare.0.map(|x| x >= 0.7),
    ));
    for w in ["durable put", "get"] {
        let label = format!("{w} at half peak");
        let (ours, theirs) = (
            p99(&label, Kind::AmphoraNative),
            p99(&label, Kind::EtcdGrpc),
        );
        let detail = match (ours, theirs) {
            (Some(a), Some(b)) => format!("p99 {a:.2} ms vs {b:.2} ms, each at half its own peak"),
            _ => "–".into(),
        };
        goals.push((
            format!("{w}: p99 at half the peak load ≤ etcd's"),
            detail,
            ours.zip(theirs).map(|(a, b)| a <= b),
        ));
    }
    let mem = r
        .rows
        .iter()
        .find(|x| x.workload.starts_with("memory") && x.target == Kind::AmphoraNative);
    goals.push((
        format!("{} entries of 256 B in ≤ 150 MB RSS", s["memory_entries"]),
        mem.map(|m| format!("{:.1} MB (peak {:.1} MB)", m.rss_mb, m.peak_rss_mb))
            .unwrap_or("–".into()),
        mem.map(|m| m.rss_mb <= 150.0),
    ));
    let fan_out = find(&r.rows, "watch fan-out", Kind::AmphoraNative);
    let etcd_fan_out = find(&r.rows, "watch fan-out", Kind::EtcdGrpc)
        .map(|e| format!("; etcd gRPC p99 {:.2} ms, {} lost", e.p99_ms, e.errors))
        .unwrap_or_default();
    goals.push((
        "watch fan-out p99 < 200 ms at 10,000 watchers".into(),
        fan_out
            .map(|f| {
                format!(
                    "p99 {:.2} ms (p50 {:.2} ms) at {} watchers, {} events lost{etcd_fan_out}",
                    f.p99_ms, f.p50_ms, f.clients, f.errors
                )
            })
            .unwrap_or("–".into()),
        // Fewer watchers (a short run) measure something else: no verdict.
        fan_out
            .filter(|f| f.clients >= 10_000)
            .map(|f| f.p99_ms < 200.0 && f.errors == 0),
    ));
    if !r.rounds.is_empty() {
        let _ = writeln!(
            o,
            "\n## Alternating rounds\n\nThe two goals whose systems the main pass measures \
             minutes apart, again with both systems running side by side and measured in turn \
             (the peer first in odd rounds, Amphora first in even ones), each after the same \
             warm-up as above. Their goals below take the median of the rounds' ratios. \
             Steal is the CPU time the host took from this machine during each measurement \
             (% of one core): other tenants' load, which slows whichever system it falls on.\n"
        );
        let _ = writeln!(
            o,
            "| workload | round | Amphora native req/s | p99 ms | steal % | peer | peer req/s | p99 ms | steal % | ratio |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|");
        for x in &r.rounds {
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.2} | {:.0} | {} | {:.0} | {:.2} | {:.0} | {} |",
                x.workload,
                x.round,
                x.amphora.rps,
                x.amphora.p99_ms,
                x.amphora.steal_pct,
                x.peer.target.label(),
                x.peer.rps,
                x.peer.p99_ms,
                x.peer.steal_pct,
                fmt_ratio(round_ratio(x)),
            );
        }
    }
    let _ = writeln!(
        o,
        "\n## Goals\n\n| goal | measured | verdict |\n|---|---|---|"
    );
    for (g, m, v) in goals {
        let _ = writeln!(o, "| {g} | {m} | {} |", verdict(v));
    }
    o
}

fn round_ratio(x: &Round) -> Option<f64> {
    (x.peer.rps > 0.0).then(|| x.amphora.rps / x.peer.rps)
}

/// A goal's ratio and how it was measured: the median of the alternating rounds of
/// `workload` when there are any (the main pass's ratio beside it), else the main
/// pass's.
fn paired(r: &Results, workload: &str, main_pass: Option<f64>) -> (Option<f64>, String) {
    let mut ratios: Vec<f64> = r
        .rounds
        .iter()
        .filter(|x| x.workload == workload)
        .filter_map(round_ratio)
        .collect();
    let Some(m) = median(&mut ratios) else {
        return (main_pass, fmt_ratio(main_pass));
    };
    let each: Vec<String> = r
        .rounds
        .iter()
        .filter(|x| x.workload == workload)
        .map(|x| fmt_ratio(round_ratio(x)))
        .collect();
    let text = format!(
        "{} (median of {} alternating rounds: {}; main pass {})",
        fmt_ratio(Some(m)),
        each.len(),
        each.join(", "),
        fmt_ratio(main_pass)
    );
    (Some(m), text)
}

/// The median; `None` for no values.
fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|x| format!("{x:.2}×")).unwrap_or_else(|| "–".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(workload: &str, target: Kind, rps: f64) -> Row {
        Row {
            workload: workload.into(),
            target,
            mode: "closed".into(),
            clients: 1,
            requests: 1,
            errors: 0,
            first_error: None,
            rps,
            p50_ms: 1.0,
            p99_ms: 2.0,
            p999_ms: 3.0,
            rss_mb: 1.0,
            peak_rss_mb: 1.0,
            cpu_pct: 1.0,
            steal_pct: 0.0,
        }
    }

    fn results(rounds: &[(f64, f64)]) -> Results {
        Results {
            settings: serde_json::json!({"memory_entries": 10}),
            machine: Vec::new(),
            rows: vec![
                row("get", Kind::AmphoraNative, 60.0),
                row("get", Kind::BareHttp, 100.0),
            ],
            rounds: rounds
                .iter()
                .zip(1..)
                .map(|(&(ours, bare), round)| Round {
                    workload: "get".into(),
                    round,
                    amphora: row("get, round", Kind::AmphoraNative, ours),
                    peer: row("get, round", Kind::BareHttp, bare),
                })
                .collect(),
        }
    }

    #[test]
    fn the_median_takes_the_middle_value_or_the_mean_of_the_two_middle_ones() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn a_goal_with_rounds_is_judged_by_their_median_ratio() {
        // Main pass 0.60 (not met); rounds 0.80, 0.65, 0.75: median 0.75 (met).
        let r = results(&[(80.0, 100.0), (65.0, 100.0), (75.0, 100.0)]);
        let report = markdown(&r);
        assert!(
            report.contains(
                "| get ≥ 70 % of the bare HTTP ceiling | 0.75× (median of 3 alternating rounds: \
                 0.80×, 0.65×, 0.75×; main pass 0.60×) | **met** |"
            ),
            "{report}"
        );
        assert!(report.contains("## Alternating rounds"), "{report}");
        assert!(
            report.contains(
                "| get | 2 | 65 | 2.00 | 0 | bare HTTP (ceiling) | 100 | 2.00 | 0 | 0.65× |"
            ),
            "{report}"
        );
    }

    #[test]
    fn without_rounds_the_main_pass_decides() {
        let report = markdown(&results(&[]));
        assert!(
            report.contains("| get ≥ 70 % of the bare HTTP ceiling | 0.60× | **not met** |"),
            "{report}"
        );
        assert!(!report.contains("## Alternating rounds"), "{report}");
    }
}
