//! Starting and stopping the servers under test, and reading their RSS and CPU time
//! from /proc.

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process the suite started.
pub struct Server {
    child: Child,
    /// `host:port` of its client endpoint.
    pub addr: String,
    /// Its data directory (removed on drop).
    pub dir: PathBuf,
}

impl Server {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now and at its peak, in bytes.
    pub fn rss(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU time used so far (user + system).
    pub fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        let total = ticks(11) + ticks(12);
        Duration::from_secs_f64(total as f64 / clock_ticks() as f64)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// CPU time the hypervisor took from this machine's CPUs so far (the `steal`
/// column of `/proc/stat`): on a shared host, what other tenants' load costs a run.
pub fn stolen() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // "cpu  user nice system idle iowait irq softirq steal ...": all CPUs together.
    let steal = stat
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(8))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_secs_f64(steal as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn scratch(base: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = base.join(format!("{name}-{}", free_port()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn wait_tcp(addr: &str, child: &mut Child, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited at start: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{name} did not listen on {addr} within 30 s")
}

/// Starts Amphora on a free port with a fresh data directory.
pub fn amphora(bin: &Path, base: &Path) -> anyhow::Result<Server> {
    let dir = scratch(base, "amphora")?;
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0"])
        // Every watcher of the fan-out comes from 127.0.0.1.
        .args([
            "--max-watchers",
            "100000",
            "--max-watchers-per-client",
            "100000",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("amphora listening on http://")
        .with_context(|| format!("amphora did not start: {line:?}"))?
        .to_owned();
    Ok(Server { child, addr, dir })
}

/// Starts a one-member etcd cluster on free ports.
pub fn etcd(bin: &Path, base: &Path) -> anyhow::Result<Server> {
    let dir = scratch(base, "etcd")?;
    let (client, peer) = (free_port(), free_port());
    let c = format!("http://127.0.0.1:{client}");
    let p = format!("http://127.0.0.1:{peer}");
    let mut child = Command::new(bin)
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
        ])
        .args([
            "--initial-cluster",
            &format!("bench={p}"),
            "--logger",
            "zap",
            "--log-level",
            "error",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let addr = format!("127.0.0.1:{client}");
    wait_tcp(&addr, &mut child, "etcd")?;
    // Wait until it has elected itself leader and answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("curl")
            .args(["-sf", &format!("{c}/health")])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("true"))
            .unwrap_or(false);
        if ok {
            break;
        }
        if Instant::now() > deadline {
            bail!("etcd did not become healthy");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Server { child, addr, dir })
}

/// Starts Redis with the append-only file and the given fsync policy.
pub fn redis(bin: &Path, base: &Path, appendfsync: &str) -> anyhow::Result<Server> {
    let dir = scratch(base, "redis")?;
    let port = free_port();
    let mut child = Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
        ])
        .args([
            "--appendfsync",
            appendfsync,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--dir",
        ])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let addr = format!("127.0.0.1:{port}");
    wait_tcp(&addr, &mut child, "redis")?;
    Ok(Server { child, addr, dir })
}

/// Starts this program's bare HTTP server.
pub fn bare(base: &Path) -> anyhow::Result<Server> {
    let dir = scratch(base, "bare")?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(std::env::current_exe()?)
        .args(["bare-http", "--listen", &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    wait_tcp(&addr, &mut child, "bare-http")?;
    Ok(Server { child, addr, dir })
}

/// The bare HTTP server: answers 200 with a two-byte body to every request, on
/// the same runtime and HTTP stack (hyper, HTTP/1.1) as Amphora. The ceiling.
pub async fn serve_bare(listen: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}
