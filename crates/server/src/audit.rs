//! The audit log: one JSON line per operation on entries or administration, with
//! time, client address, certificate subject, operation, names and outcome. Never a
//! token, never a value.

use serde::Serialize;
use std::io::Write;
use std::path::Path;
use tokio::sync::mpsc;

/// One audit record.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// RFC 3339 time.
    pub time: String,
    /// The client's address.
    pub client: String,
    /// The subject of the client's certificate, if it presented one.
    pub subject: Option<&'a str>,
    /// Whether that certificate chains to the client CA and is valid.
    pub trusted_cert: bool,
    /// Which API: native, comet or admin.
    pub api: &'a str,
    /// What was done: create, modify, write, read, list, delete, history, keepalive, ...
    pub operation: &'a str,
    /// The context, when the operation names one.
    pub context: Option<&'a str>,
    /// The family, when the operation names one.
    pub family: Option<&'a str>,
    /// The key, when the operation names one.
    pub key: Option<&'a str>,
    /// `ok`, `not_found`, or the error code.
    pub outcome: &'a str,
}

/// Where audit records go. Lines are written by a task of their own, so a slow disk
/// slows the audit log, not the requests (up to a bounded queue).
#[derive(Clone)]
pub struct Audit {
    tx: Option<mpsc::Sender<Msg>>,
}

enum Msg {
    Line(String),
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl Audit {
    /// No audit log.
    pub fn off() -> Self {
        Audit { tx: None }
    }

    /// An audit log to `target`: a file path (appended to, created with mode 0600),
    /// or `-` for standard output.
    pub fn open(target: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let out: Box<dyn Write + Send> = if target == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(target)
                    .map_err(|e| {
                        anyhow::anyhow!("opening the audit log {}: {e}", target.display())
                    })?,
            )
        };
        let (tx, mut rx) = mpsc::channel::<Msg>(8192);
        tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::new(out);
            let mut waiting = Vec::new();
            while let Some(first) = rx.blocking_recv() {
                let mut ok = true;
                let mut msg = Some(first);
                // Write what is queued, then flush once.
                while let Some(m) = msg.take().or_else(|| rx.try_recv().ok()) {
                    match m {
                        Msg::Line(line) => ok &= writeln!(out, "{line}").is_ok(),
                        Msg::Flush(done) => waiting.push(done),
                    }
                }
                ok &= out.flush().is_ok();
                if !ok {
                    tracing::error!("writing the audit log failed");
                }
                for done in waiting.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        Ok(Audit { tx: Some(tx) })
    }

    /// True when records are written somewhere.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Writes one record (waits when the queue is full: audit lines are not dropped).
    pub async fn record(&self, record: &Record<'_>) {
        if let Some(tx) = &self.tx {
            let line = serde_json::to_string(record).expect("an audit record always serializes");
            let _ = tx.send(Msg::Line(line)).await;
        }
    }

    /// Waits until every record sent so far is written and flushed.
    pub async fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (done, wait) = tokio::sync::oneshot::channel();
            if tx.send(Msg::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        }
    }
}
