//! The systems under test and how each one speaks every operation.

use crate::workload::{Conn, Op, OpFuture, Shape, key, value};
use anyhow::{Context, anyhow, bail};
use base64::Engine;
use bytes::Bytes;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The read token the benchmark uses against Amphora.
pub const READ: &str = "BenchRead1";
/// The write token the benchmark uses against Amphora.
pub const WRITE: &str = "BenchWrite1";

/// A system under test, and the API it is driven through.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Amphora's native JSON API.
    AmphoraNative,
    /// Amphora's COMET-compatible API.
    AmphoraComet,
    /// etcd through gRPC (etcd-client).
    EtcdGrpc,
    /// etcd through its JSON gateway.
    EtcdGateway,
    /// Redis with `appendfsync always`.
    RedisAlways,
    /// Redis with `appendfsync everysec`.
    RedisEverysec,
    /// A bare HTTP server that answers 200 to everything: the ceiling.
    BareHttp,
}

impl Kind {
    /// A short human name.
    pub fn label(self) -> &'static str {
        match self {
            Kind::AmphoraNative => "Amphora native",
            Kind::AmphoraComet => "Amphora COMET",
            Kind::EtcdGrpc => "etcd gRPC",
            Kind::EtcdGateway => "etcd JSON gateway",
            Kind::RedisAlways => "Redis (fsync always)",
            Kind::RedisEverysec => "Redis (fsync everysec)",
            Kind::BareHttp => "bare HTTP (ceiling)",
        }
    }

    /// Whether the target can run an operation of this kind.
    pub fn supports(self, op: Op) -> bool {
        // COMET has no leases, and etcd's gateway cannot carry the keepalive stream.
        !matches!(
            (self, op),
            (Kind::AmphoraComet | Kind::EtcdGateway, Op::KeepAlive(_))
        )
    }
}

/// Where a target listens and what it needs to know.
#[derive(Clone)]
pub struct Target {
    /// Which system.
    pub kind: Kind,
    /// `host:port`.
    pub addr: String,
    /// Key and value shape.
    pub shape: Shape,
    /// Lease ids by key index (etcd).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub leases: Arc<Vec<i64>>,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Target {
    /// Opens one connection.
    pub async fn connect(&self) -> anyhow::Result<Box<dyn Conn>> {
        match self.kind {
            Kind::RedisAlways | Kind::RedisEverysec => {
                let tcp = TcpStream::connect(&self.addr)
                    .await
                    .with_context(|| format!("connecting to {}", self.addr))?;
                tcp.set_nodelay(true)?;
                Ok(Box::new(RedisConn {
                    io: BufReader::new(tcp),
                    shape: self.shape,
                    value: value(&self.shape),
                }))
            }
            Kind::EtcdGrpc => etcd_grpc::connect(self).await,
            _ => {
                let tcp = TcpStream::connect(&self.addr)
                    .await
                    .with_context(|| format!("connecting to {}", self.addr))?;
                tcp.set_nodelay(true)?;
                Ok(Box::new(HttpConn {
                    target: Arc::new(HttpRequests::new(self)),
                    io: tcp,
                    out: Vec::with_capacity(1024),
                    buf: Vec::with_capacity(64 * 1024),
                }))
            }
        }
    }
}

/// Writes the HTTP request of each operation for an HTTP target.
struct HttpRequests {
    kind: Kind,
    host: String,
    shape: Shape,
    json_value: Bytes,
    raw_value: Bytes,
    b64_value: String,
    /// Amphora's token headers, as written.
    native_tokens: String,
}

impl HttpRequests {
    fn new(t: &Target) -> Self {
        let v = value(&t.shape);
        // A JSON string of exactly val_size bytes, quotes included.
        let inner = "v".repeat(t.shape.val_size.saturating_sub(2));
        HttpRequests {
            kind: t.kind,
            host: t.addr.clone(),
            shape: t.shape,
            json_value: Bytes::from(format!("\"{inner}\"")),
            raw_value: Bytes::from(v.clone()),
            b64_value: b64(&v),
            native_tokens: format!(
                "amphora-read-token: {READ}\r\namphora-write-token: {WRITE}\r\n"
            ),
        }
    }

    /// Writes the request of `op` into `out` (emptied first) as HTTP/1.1: the
    /// request line, `host`, the target's headers, `content-length` when there is
    /// a body or the method is not `GET`, and the body. Written straight into the
    /// buffer: building an `http::Request` (a `HeaderMap`, a parsed URI) first cost
    /// the load generator, which shares the cores with the server, about a tenth of
    /// its CPU per request.
    fn encode(&self, op: Op, out: &mut Vec<u8>) -> anyhow::Result<()> {
        out.clear();
        let k = |i| key(&self.shape, i);
        let comet = |call: &str, family: &str, key: &str| {
            format!(
                "/{call}?contextID=bench&family={family}&Key={key}&readToken={READ}&writeToken={WRITE}"
            )
        };
        let gateway;
        let (method, target, native, body): (&str, String, bool, &[u8]) = match (self.kind, op) {
            (Kind::AmphoraNative, Op::Put(i)) => (
                "PUT",
                format!("/v1/kv/bench/data/{}", k(i)),
                true,
                &self.json_value,
            ),
            (Kind::AmphoraNative, Op::Get(i)) => {
                ("GET", format!("/v1/kv/bench/data/{}", k(i)), true, b"")
            }
            (Kind::AmphoraNative, Op::List(f)) => {
                ("GET", format!("/v1/kv/bench/list{f}?limit=100"), true, b"")
            }
            (Kind::AmphoraNative, Op::KeepAlive(i)) => (
                "POST",
                format!("/v1/kv/bench/lease/{}/keepalive", k(i)),
                true,
                b"",
            ),
            (Kind::AmphoraComet, Op::Put(i)) => (
                "POST",
                comet("writeScope", "data", &k(i)),
                false,
                &self.raw_value,
            ),
            (Kind::AmphoraComet, Op::Get(i)) => {
                ("GET", comet("readScope", "data", &k(i)), false, b"")
            }
            (Kind::AmphoraComet, Op::List(f)) => (
                "GET",
                format!("/enumerateScope?contextID=bench&family=list{f}&readToken={READ}"),
                false,
                b"",
            ),
            (Kind::EtcdGateway, Op::Put(i)) => {
                gateway = serde_json::json!({"key": b64(&format!("data/{}", k(i))), "value": self.b64_value}).to_string();
                ("POST", "/v3/kv/put".into(), false, gateway.as_bytes())
            }
            (Kind::EtcdGateway, Op::Get(i)) => {
                gateway = serde_json::json!({"key": b64(&format!("data/{}", k(i))), "serializable": true}).to_string();
                ("POST", "/v3/kv/range".into(), false, gateway.as_bytes())
            }
            (Kind::EtcdGateway, Op::List(f)) => {
                gateway = serde_json::json!({"key": b64(&format!("list{f}/")), "range_end": b64(&format!("list{f}0")), "serializable": true}).to_string();
                ("POST", "/v3/kv/range".into(), false, gateway.as_bytes())
            }
            (Kind::BareHttp, _) => ("GET", "/".into(), false, b""),
            (kind, op) => bail!("{} cannot run {op:?}", kind.label()),
        };
        write_head(out, method, &target, &self.host);
        if native {
            out.extend_from_slice(self.native_tokens.as_bytes());
        }
        if !body.is_empty() || method != "GET" {
            let mut digits = itoa::Buffer::new();
            for part in [
                b"content-length: ",
                digits.format(body.len()).as_bytes(),
                b"\r\n",
            ] {
                out.extend_from_slice(part);
            }
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        Ok(())
    }
}

/// The request line and the `host` header.
fn write_head(out: &mut Vec<u8>, method: &str, target: &str, host: &str) {
    for part in [method, " ", target, " HTTP/1.1\r\nhost: ", host, "\r\n"] {
        out.extend_from_slice(part.as_bytes());
    }
}

/// HTTP/1.1 on one connection, one request at a time, on the caller's task: the
/// request is written whole, the response's head parsed with `httparse`, its body
/// read by `content-length` or chunked. As lean as the RESP client below: hyper's
/// client runs each connection as a task of its own, and the two hops per request
/// cost the load generator, which shares the two cores with the server, about 7 µs
/// of CPU per request more than the Redis targets paid.
struct HttpConn {
    target: Arc<HttpRequests>,
    io: TcpStream,
    /// The request being written.
    out: Vec<u8>,
    /// What was read and not yet consumed.
    buf: Vec<u8>,
}

impl Conn for HttpConn {
    fn run(&mut self, op: Op) -> OpFuture<'_> {
        Box::pin(async move {
            self.target.encode(op, &mut self.out)?;
            self.io.write_all(&self.out).await?;
            let (status, body) = read_response(&mut self.io, &mut self.buf).await?;
            if !(200..300).contains(&status) {
                let status = hyper::StatusCode::from_u16(status)?;
                bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
            }
            Ok(())
        })
    }
}

/// The most a response's head may take.
const MAX_HEAD: usize = 64 * 1024;

/// Reads one response from `io`: its status and its body. `buf` keeps what was read
/// past it (nothing, when one request is in flight at a time).
async fn read_response<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let (status, head, length) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = resp.parse(buf)? {
            let status = resp.code.context("a response without a status")?;
            let mut length = Length::UntilClose;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    length = Length::Exactly(std::str::from_utf8(h.value)?.trim().parse()?);
                } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                    && h.value.eq_ignore_ascii_case(b"chunked")
                {
                    length = Length::Chunked;
                }
            }
            if status == 204 || status == 304 {
                length = Length::Exactly(0);
            }
            break (status, head, length);
        }
        if buf.len() > MAX_HEAD {
            bail!("a response head longer than {MAX_HEAD} bytes");
        }
        fill(io, buf).await?;
    };
    buf.drain(..head);
    let body = match length {
        Length::Exactly(n) => {
            while buf.len() < n {
                fill(io, buf).await?;
            }
            buf.drain(..n).collect()
        }
        Length::Chunked => {
            let mut body = Vec::new();
            loop {
                let (start, size) = loop {
                    match httparse::parse_chunk_size(buf)
                        .map_err(|_| anyhow!("a bad chunk size line"))?
                    {
                        httparse::Status::Complete((start, size)) => break (start, size as usize),
                        httparse::Status::Partial => fill(io, buf).await?,
                    }
                };
                // The chunk's data and its CRLF; the last (empty) chunk ends with an
                // empty trailer line (no trailer fields: none of the targets sends any).
                while buf.len() < start + size + 2 {
                    fill(io, buf).await?;
                }
                body.extend_from_slice(&buf[start..start + size]);
                buf.drain(..start + size + 2);
                if size == 0 {
                    break body;
                }
            }
        }
        Length::UntilClose => {
            while fill(io, buf).await.is_ok() {}
            std::mem::take(buf)
        }
    };
    Ok((status, body))
}

/// How a response's body ends.
enum Length {
    Exactly(usize),
    Chunked,
    UntilClose,
}

/// Reads more into `buf`; an error once the peer has closed.
async fn fill<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    if io.read_buf(buf).await? == 0 {
        bail!("the server closed the connection");
    }
    Ok(())
}

/// Redis over RESP, one request at a time (no pipelining: the same as the others).
struct RedisConn {
    io: BufReader<TcpStream>,
    shape: Shape,
    value: String,
}

impl RedisConn {
    async fn command(&mut self, args: &[&str]) -> anyhow::Result<()> {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.io.get_mut().write_all(out.as_bytes()).await?;
        self.reply().await
    }

    fn reply(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + '_>> {
        Box::pin(async move {
            let mut line = String::new();
            if self.io.read_line(&mut line).await? == 0 {
                bail!("Redis closed the connection");
            }
            let line = line.trim_end();
            let (tag, rest) = line.split_at(1);
            match tag {
                "+" | ":" => Ok(()),
                "-" => Err(anyhow!("Redis error: {rest}")),
                "$" => {
                    let n: i64 = rest.parse()?;
                    if n >= 0 {
                        let mut buf = vec![0; n as usize + 2];
                        self.io.read_exact(&mut buf).await?;
                    }
                    Ok(())
                }
                "*" => {
                    let n: i64 = rest.parse()?;
                    for _ in 0..n.max(0) {
                        self.reply().await?;
                    }
                    Ok(())
                }
                _ => bail!("unexpected Redis reply {line:?}"),
            }
        })
    }
}

impl Conn for RedisConn {
    fn run(&mut self, op: Op) -> OpFuture<'_> {
        Box::pin(async move {
            let k = |i| key(&self.shape, i);
            match op {
                Op::Put(i) => {
                    let (key, value) = (format!("data:{}", k(i)), self.value.clone());
                    self.command(&["SET", &key, &value]).await
                }
                Op::Get(i) => self.command(&["GET", &format!("data:{}", k(i))]).await,
                Op::List(f) => self.command(&["HGETALL", &format!("list{f}")]).await,
                Op::KeepAlive(i) => {
                    self.command(&["EXPIRE", &format!("lease:{}", k(i)), "300"])
                        .await
                }
            }
        })
    }
}

/// Redis commands a preload sends for a list family or a leased key.
pub async fn redis_preload(target: &Target, families: u64) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(&target.addr).await?;
    let mut c = RedisConn {
        io: BufReader::new(tcp),
        shape: target.shape,
        value: value(&target.shape),
    };
    for f in 0..families {
        for e in 0..100 {
            let (h, field, v) = (format!("list{f}"), format!("e{e}"), c.value.clone());
            c.command(&["HSET", &h, &field, &v]).await?;
        }
    }
    for i in 0..target.shape.key_space {
        let (k, v) = (format!("lease:{}", key(&target.shape, i)), c.value.clone());
        c.command(&["SET", &k, &v, "EX", "300"]).await?;
    }
    Ok(())
}

#[cfg(feature = "etcd")]
pub mod etcd_grpc {
    //! etcd through gRPC.
    use super::*;
    use etcd_client::{Client, GetOptions, PutOptions};

    struct EtcdConn {
        client: Client,
        shape: Shape,
        value: String,
        leases: Arc<Vec<i64>>,
    }

    /// Opens a channel.
    pub async fn connect(t: &Target) -> anyhow::Result<Box<dyn Conn>> {
        let client = Client::connect([format!("http://{}", t.addr)], None).await?;
        Ok(Box::new(EtcdConn {
            client,
            shape: t.shape,
            value: value(&t.shape),
            leases: t.leases.clone(),
        }))
    }

    impl Conn for EtcdConn {
        fn run(&mut self, op: Op) -> OpFuture<'_> {
            Box::pin(async move {
                let k = |i| key(&self.shape, i);
                match op {
                    Op::Put(i) => {
                        self.client
                            .put(format!("data/{}", k(i)), self.value.clone(), None)
                            .await?;
                    }
                    Op::Get(i) => {
                        self.client
                            .get(
                                format!("data/{}", k(i)),
                                Some(GetOptions::new().with_serializable()),
                            )
                            .await?;
                    }
                    Op::List(f) => {
                        self.client
                            .get(
                                format!("list{f}/"),
                                Some(GetOptions::new().with_prefix().with_serializable()),
                            )
                            .await?;
                    }
                    Op::KeepAlive(i) => {
                        let id = *self
                            .leases
                            .get(i as usize)
                            .ok_or_else(|| anyhow!("no lease {i}"))?;
                        let (mut keeper, mut stream) = self.client.lease_keep_alive(id).await?;
                        keeper.keep_alive().await?;
                        stream
                            .message()
                            .await?
                            .ok_or_else(|| anyhow!("keepalive stream ended"))?;
                    }
                }
                Ok(())
            })
        }
    }

    /// Grants `n` leases with a key each; answers their ids.
    pub async fn grant_leases(t: &Target, n: u64) -> anyhow::Result<Vec<i64>> {
        // 32 concurrent granters: etcd batches their writes as it would a fleet's.
        let workers = 32u64;
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers {
            let (addr, shape) = (t.addr.clone(), t.shape);
            tasks.spawn(async move {
                let mut client = Client::connect([format!("http://{addr}")], None).await?;
                let mut ids = Vec::new();
                for i in (w..n).step_by(workers as usize) {
                    let id = client.lease_grant(300, None).await?.id();
                    client
                        .put(
                            format!("lease/{}", key(&shape, i)),
                            "v",
                            Some(PutOptions::new().with_lease(id)),
                        )
                        .await?;
                    ids.push((i, id));
                }
                anyhow::Ok(ids)
            });
        }
        let mut ids = vec![0; n as usize];
        while let Some(done) = tasks.join_next().await {
            for (i, id) in done?? {
                ids[i as usize] = id;
            }
        }
        Ok(ids)
    }
}

#[cfg(not(feature = "etcd"))]
pub mod etcd_grpc {
    //! Built without the `etcd` feature: a clear error instead of a missing option.
    use super::*;

    /// Always an error: rebuild with `--features etcd` (needs protoc).
    pub async fn connect(_: &Target) -> anyhow::Result<Box<dyn Conn>> {
        bail!("etcd gRPC needs amphora-bench built with --features etcd (which needs protoc)")
    }

    /// Always an error.
    pub async fn grant_leases(_: &Target, _: u64) -> anyhow::Result<Vec<i64>> {
        bail!("etcd gRPC needs amphora-bench built with --features etcd (which needs protoc)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Hands out its bytes a few at a time, as a socket may.
    struct Trickle(Vec<u8>, usize);

    impl tokio::io::AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self.1.min(self.0.len()).min(out.remaining());
            let taken: Vec<u8> = self.0.drain(..n).collect();
            out.put_slice(&taken);
            Poll::Ready(Ok(()))
        }
    }

    async fn parse(wire: &[u8], step: usize) -> anyhow::Result<(u16, Vec<u8>, Vec<u8>)> {
        let mut io = Trickle(wire.to_vec(), step);
        let mut buf = Vec::new();
        let (status, body) = read_response(&mut io, &mut buf).await?;
        Ok((status, body, buf))
    }

    #[tokio::test]
    async fn responses_are_read_whole_however_they_arrive() {
        let fixed = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nx: y\r\n\r\nhelloNEXT";
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nA;ext=1\r\n0123456789\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 7, 4096] {
            let (status, body, rest) = parse(fixed, step).await.unwrap();
            assert_eq!((status, &body[..]), (201, &b"hello"[..]), "step {step}");
            // What follows the response stays for the next one.
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
            let (status, body, rest) = parse(chunked, step).await.unwrap();
            assert_eq!(
                (status, &body[..]),
                (200, &b"abc0123456789"[..]),
                "step {step}"
            );
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
        }
        let empty = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse(empty, 3).await.unwrap().1, b"");
        let until_close = b"HTTP/1.1 200 OK\r\n\r\nall of it";
        assert_eq!(parse(until_close, 3).await.unwrap().1, b"all of it");
    }

    #[tokio::test]
    async fn broken_responses_are_errors() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"garbage\r\n\r\n",
        ] {
            assert!(
                parse(wire, 5).await.is_err(),
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
        let endless = [&b"HTTP/1.1 200 OK\r\n"[..], &b"x: y\r\n".repeat(20_000)].concat();
        assert!(parse(&endless, 4096).await.is_err());
    }

    #[test]
    fn requests_are_written_as_http_1_1() {
        let target = |kind| Target {
            kind,
            addr: "h:1".into(),
            shape: Shape {
                key_size: 3,
                val_size: 5,
                key_space: 10,
                sequential: true,
            },
            leases: Arc::new(Vec::new()),
        };
        let tokens = format!("amphora-read-token: {READ}\r\namphora-write-token: {WRITE}\r\n");
        let mut out = b"stale".to_vec();
        let native = HttpRequests::new(&target(Kind::AmphoraNative));
        native.encode(Op::Put(7), &mut out).unwrap();
        let put = format!(
            "PUT /v1/kv/bench/data/007 HTTP/1.1\r\nhost: h:1\r\n{tokens}content-length: 5\r\n\r\n\"vvv\""
        );
        assert_eq!(String::from_utf8(out.clone()).unwrap(), put);
        native.encode(Op::Get(12), &mut out).unwrap();
        let get = format!("GET /v1/kv/bench/data/012 HTTP/1.1\r\nhost: h:1\r\n{tokens}\r\n");
        assert_eq!(String::from_utf8(out.clone()).unwrap(), get);
        native.encode(Op::KeepAlive(1), &mut out).unwrap();
        assert!(out.ends_with(b"content-length: 0\r\n\r\n"));
        HttpRequests::new(&target(Kind::AmphoraComet))
            .encode(Op::Put(3), &mut out)
            .unwrap();
        let comet = format!(
            "POST /writeScope?contextID=bench&family=data&Key=003&readToken={READ}&writeToken={WRITE} HTTP/1.1\r\nhost: h:1\r\ncontent-length: 5\r\n\r\nvvvvv"
        );
        assert_eq!(String::from_utf8(out.clone()).unwrap(), comet);
        HttpRequests::new(&target(Kind::BareHttp))
            .encode(Op::Get(3), &mut out)
            .unwrap();
        assert_eq!(out, b"GET / HTTP/1.1\r\nhost: h:1\r\n\r\n");
        let comet_keepalive = HttpRequests::new(&target(Kind::AmphoraComet));
        assert!(comet_keepalive.encode(Op::KeepAlive(1), &mut out).is_err());
    }
}
