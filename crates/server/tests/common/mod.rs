//! Starts the real `amphora` binary on 127.0.0.1:0 with a temporary data directory,
//! and stops it. Shared by the end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

/// A running server.
pub struct Server {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where the server's stderr (its logs) goes.
    pub log: PathBuf,
}

impl Server {
    /// Starts the binary with `--data-dir dir --listen 127.0.0.1:0` and `extra` flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let log = data_dir.with_extension(format!("{}.log", std::process::id()));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amphora"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("AMPHORA_LOG", "info,amphora_server::http=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start amphora");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        // The server prints its address once it listens; a dead server closes stdout.
        stdout
            .read_line(&mut line)
            .expect("read the listening line");
        let base = line
            .trim()
            .strip_prefix("amphora listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "server did not start: {line:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_owned();
        Server {
            child,
            _stdout: stdout,
            base,
            data_dir: data_dir.to_path_buf(),
            log,
        }
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit status (at most `within`).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        // Not the `kill` program: procps-ng 4.0.2's turns `kill -SIG -PGID` into kill(-1).
        signal(self.child.id(), rustix::process::Signal::TERM);
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The server's `/metrics` text.
pub async fn metrics_text(s: &Server) -> String {
    client()
        .get(s.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

/// Sends a signal to one process.
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a child's pid is positive");
    let _ = rustix::process::kill_process(pid, sig);
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Strong, distinct tokens.
pub const READ: &str = "ReadToken1";
/// Strong, distinct tokens.
pub const WRITE: &str = "WriteToken1";

/// An HTTP client.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// The kinds of client a TLS test connects as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// A certificate signed by the client CA, valid now.
    Trusted,
    /// No certificate.
    NoCert,
    /// Signed by the client CA, but expired yesterday.
    Expired,
    /// Self-signed.
    SelfSigned,
    /// Signed by another authority.
    OtherCa,
}

impl ClientKind {
    /// Every kind.
    pub const ALL: [ClientKind; 5] = [
        ClientKind::Trusted,
        ClientKind::NoCert,
        ClientKind::Expired,
        ClientKind::SelfSigned,
        ClientKind::OtherCa,
    ];
}

/// A test PKI: a CA, a server certificate for 127.0.0.1, and one client
/// certificate of each kind, written to a directory.
pub struct Pki {
    /// Where the PEM files are.
    pub dir: PathBuf,
    ca_pem: String,
    identities: Vec<(ClientKind, String)>,
}

impl Pki {
    /// Creates every certificate in `dir`.
    pub fn new(dir: &Path) -> Pki {
        use amphora_server::certs::{issue, new_ca, self_signed_client, valid_for_days};
        std::fs::create_dir_all(dir).unwrap();
        let ca = new_ca("Test CA", valid_for_days(30)).unwrap();
        let other_ca = new_ca("Other CA", valid_for_days(30)).unwrap();
        let server = issue(
            &ca,
            "localhost",
            vec!["localhost".into(), "127.0.0.1".into()],
            true,
            valid_for_days(30),
        )
        .unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
        std::fs::write(dir.join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.join("server.key"), &server.key_pem).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let expired_validity = (
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        );
        let pem = |i: amphora_server::certs::Issued| format!("{}{}", i.cert_pem, i.key_pem);
        let identities = vec![
            (
                ClientKind::Trusted,
                pem(issue(&ca, "trusted", vec![], false, valid_for_days(30)).unwrap()),
            ),
            (
                ClientKind::Expired,
                pem(issue(&ca, "expired", vec![], false, expired_validity).unwrap()),
            ),
            (
                ClientKind::SelfSigned,
                pem(self_signed_client("selfsigned", valid_for_days(30)).unwrap()),
            ),
            (
                ClientKind::OtherCa,
                pem(issue(&other_ca, "foreign", vec![], false, valid_for_days(30)).unwrap()),
            ),
        ];
        Pki {
            dir: dir.to_path_buf(),
            ca_pem: ca.cert_pem,
            identities,
        }
    }

    /// The flags that serve TLS with this PKI's certificates and client CA.
    pub fn server_flags(&self) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        vec![
            "--tls-cert".into(),
            p("server.pem"),
            "--tls-key".into(),
            p("server.key"),
            "--client-ca".into(),
            p("ca.pem"),
        ]
    }

    /// An HTTPS client of the given kind that trusts the test CA.
    pub fn client(&self, kind: ClientKind) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .timeout(Duration::from_secs(20));
        if let Some((_, pem)) = self.identities.iter().find(|(k, _)| *k == kind) {
            b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
        }
        b.build().unwrap()
    }
}

/// Starts the binary with string flags.
pub fn start_with(data_dir: &Path, flags: &[String], env: &[(&str, &str)]) -> Server {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start_with_env(data_dir, &flags, env)
}

/// Sends a request and reads its JSON answer, for tests.
pub trait SendJson {
    /// The answer's body as JSON.
    fn json_body(self) -> impl std::future::Future<Output = serde_json::Value>;
    /// The answer's status and body as JSON.
    fn status_json(self) -> impl std::future::Future<Output = (u16, serde_json::Value)>;
}

impl SendJson for reqwest::RequestBuilder {
    async fn json_body(self) -> serde_json::Value {
        self.status_json().await.1
    }

    async fn status_json(self) -> (u16, serde_json::Value) {
        let r = self.send().await.expect("request sent");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body read");
        let body =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        (status, body)
    }
}
