//! End-to-end tests of the connection loop (`conn.rs`): reads answered there and
//! requests handed to hyper, on the same connections, over real sockets, written
//! byte for byte (no HTTP client library in between that would tidy them up).
//!
//! The server runs with `AMPHORA_LOG=info`: with the per-request debug lines on,
//! every request goes through hyper, and the loop would not be under test.

mod common;

use common::{READ, Server, WRITE};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn start(dir: &std::path::Path) -> Server {
    Server::start_with_env(&dir.join("d"), &[], &[("AMPHORA_LOG", "info")])
}

/// One response, as it came.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    status: u16,
    /// Lower-case names, in order.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The answer without what differs between two answers to the same request.
    fn comparable(&self) -> Answer {
        let mut a = self.clone();
        a.headers
            .retain(|(n, _)| n != "x-request-id" && n != "date");
        a
    }
}

/// An HTTP/1.1 connection driven by hand.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(s: &Server) -> Raw {
        let addr = s.base.strip_prefix("http://").unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            tcp,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).unwrap();
    }

    /// Reads until `buf` holds `n` bytes or the peer closes; false if it closed.
    fn fill(&mut self, n: usize) -> bool {
        let mut chunk = [0u8; 4096];
        while self.buf.len() < n {
            match self.tcp.read(&mut chunk) {
                Ok(0) => return false,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) => panic!("reading a response: {e}"),
            }
        }
        true
    }

    /// The next response (with a `content-length`, as all of the server's are).
    fn answer(&mut self) -> Answer {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let want = self.buf.len() + 1;
            assert!(
                self.fill(want),
                "closed before a whole head: {:?}",
                self.text()
            );
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        assert!(self.fill(end + 4 + len), "closed inside a body");
        let body = String::from_utf8(self.buf[end + 4..end + 4 + len].to_vec()).unwrap();
        self.buf.drain(..end + 4 + len);
        Answer {
            status,
            headers,
            body,
        }
    }

    /// True once the server has closed the connection (and sent nothing more).
    fn closed(&mut self) -> bool {
        !self.fill(self.buf.len() + 1)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: t\r\namphora-read-token: {READ}\r\n{extra}\r\n")
}

fn put(path: &str, body: &str) -> String {
    format!(
        "PUT {path} HTTP/1.1\r\nhost: t\r\namphora-read-token: {READ}\r\namphora-write-token: {WRITE}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn value_of(a: &Answer) -> serde_json::Value {
    let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    body["value"].clone()
}

/// Requests written at once (pipelined) are answered in order, across the moment
/// the connection passes from the loop (plain reads and writes) to hyper (the first
/// other request).
#[test]
fn pipelined_requests_keep_their_order_across_the_hand_over() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let mut setup = Raw::connect(&s);
    for (k, v) in [("k1", "1"), ("k2", "2")] {
        setup.send(put(&format!("/v1/kv/c/f/{k}"), v).as_bytes());
        assert_eq!(setup.answer().status, 201);
    }

    let mut c = Raw::connect(&s);
    let batch = [
        get("/v1/kv/c/f/k1", ""),
        get("/v1/kv/c/f/k2", ""),
        get("/v1/kv/c/f/none", ""),
        put("/v1/kv/c/f/k3", "3"),
        get("/v1/kv/c/f/k3", ""),
        "GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n".to_owned(),
        get("/v1/kv/c/f/k1", ""),
        put("/v1/kv/c/f/k1", "4"),
        get("/v1/kv/c/f/k1", ""),
    ]
    .concat();
    c.send(batch.as_bytes());
    let answers: Vec<Answer> = (0..9).map(|_| c.answer()).collect();
    let seen: Vec<(u16, serde_json::Value)> = answers
        .iter()
        .map(|a| {
            (
                a.status,
                if a.status == 200 {
                    value_of(a)
                } else {
                    serde_json::Value::Null
                },
            )
        })
        .collect();
    use serde_json::json;
    assert_eq!(
        seen,
        [
            (200, json!(1)),
            (200, json!(2)),
            (404, json!(null)),
            (201, json!(null)),
            (200, json!(3)),
            (200, json!(null)),
            (200, json!(1)),
            (200, json!(null)),
            (200, json!(4)),
        ]
    );
    assert_eq!(answers[5].body, r#"{"status":"ok"}"#);
    // Each response has an id of its own.
    let mut ids: Vec<&str> = answers
        .iter()
        .map(|a| a.header("x-request-id").unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 9);
}

/// A head that arrives in pieces is answered once whole; so is a head too long for
/// the loop (which hands it to hyper) but within hyper's bound.
#[test]
fn heads_in_pieces_and_long_heads_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let mut c = Raw::connect(&s);
    c.send(put("/v1/kv/c/f/k", "\"v\"").as_bytes());
    assert_eq!(c.answer().status, 201);

    let mut c = Raw::connect(&s);
    let head = get("/v1/kv/c/f/k", "");
    for piece in head.as_bytes().chunks(7) {
        c.send(piece);
        std::thread::sleep(Duration::from_millis(5));
    }
    let a = c.answer();
    assert_eq!((a.status, value_of(&a)), (200, serde_json::json!("v")));
    // The same connection goes on.
    c.send(head.as_bytes());
    assert_eq!(c.answer().status, 200);

    let long = get(
        "/v1/kv/c/f/k",
        &format!("x-pad: {}\r\n", "p".repeat(40 * 1024)),
    );
    c.send(long.as_bytes());
    let a = c.answer();
    assert_eq!((a.status, value_of(&a)), (200, serde_json::json!("v")));
    c.send(head.as_bytes());
    assert_eq!(c.answer().status, 200);

    // In pieces of 1, 2 and 3 bytes, so that the head's end and the body are split
    // at every place: the loop parses again only when a read may have completed the
    // request, and must still see every one complete.
    for size in [1, 2, 3] {
        let mut c = Raw::connect(&s);
        let value = format!("\"w{size}\"");
        let requests = [put("/v1/kv/c/f/k2", &value), get("/v1/kv/c/f/k2", "")];
        let mut answers = Vec::new();
        for request in &requests {
            for piece in request.as_bytes().chunks(size) {
                c.send(piece);
                std::thread::sleep(Duration::from_millis(1));
            }
            answers.push(c.answer());
        }
        let created = if size == 1 { 201 } else { 200 };
        assert_eq!(answers[0].status, created, "{size}: {}", answers[0].body);
        assert_eq!(answers[1].status, 200, "{size}: {}", answers[1].body);
        assert_eq!(value_of(&answers[1]), serde_json::json!(format!("w{size}")));
    }
}

/// `request` answered by the loop, then (with a `Connection: keep-alive` header,
/// which the loop does not take) by hyper, each on a new connection.
fn both_ways(s: &Server, request: &str) -> (Answer, Answer) {
    let mut fast = Raw::connect(s);
    fast.send(request.as_bytes());
    let through_hyper = request.replacen("\r\n", "\r\nconnection: keep-alive\r\n", 1);
    let mut slow = Raw::connect(s);
    slow.send(through_hyper.as_bytes());
    (fast.answer(), slow.answer())
}

/// The loop answers exactly as hyper and the application do: a request with a
/// `Connection: keep-alive` header is not one the loop takes, so each request below
/// is answered both ways and the answers compared, headers included.
#[test]
fn loop_and_hyper_answer_alike() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let mut c = Raw::connect(&s);
    c.send(put("/v1/kv/ctx/fam/key", r#"{"a":[1,"b"],"s":"\u00e9\n"}"#).as_bytes());
    assert_eq!(c.answer().status, 201);

    let comet = |query: &str| format!("GET /readScope?{query} HTTP/1.1\r\nhost: t\r\n");
    let cases: Vec<(String, u16)> =
        vec![
        (get("/v1/kv/ctx/fam/key", ""), 200),
        (get("/v1/kv/ctx/fam/none", ""), 404),
        (get("/v1/kv/ctx/fam/key", "x-request-id: given-id-1\r\n"), 200),
        (
            "GET /v1/kv/ctx/fam/key HTTP/1.1\r\nhost: t\r\n".to_owned() + "\r\n",
            400,
        ),
        (
            "GET /v1/kv/ctx/fam/key HTTP/1.1\r\nhost: t\r\namphora-read-token: OtherToken1\r\n\r\n"
                .to_owned(),
            404,
        ),
        (
            "GET /v1/kv/ctx/fam/key HTTP/1.1\r\nhost: t\r\namphora-read-token: \r\n\r\n"
                .to_owned(),
            400,
        ),
        (get(&format!("/v1/kv/ctx/fam/{}", "k".repeat(300)), ""), 400),
        (
            comet(&format!("contextID=ctx&family=fam&Key=key&readToken={READ}")) + "\r\n",
            200,
        ),
        (comet("contextID=ctx&family=fam&Key=key") + "\r\n", 400),
        (
            comet(&format!("contextID=ctx&family=fam&Key=none&readToken={READ}")) + "\r\n",
            200,
        ),
    ];
    for (request, status) in cases {
        let (by_loop, by_hyper) = both_ways(&s, &request);
        assert_eq!(by_loop.status, status, "{request:?}: {by_loop:?}");
        assert_eq!(by_loop.comparable(), by_hyper.comparable(), "{request:?}");
        assert!(by_loop.header("date").is_some_and(|d| d.ends_with(" GMT")));
        if request.contains("given-id-1") {
            assert_eq!(by_loop.header("x-request-id"), Some("given-id-1"));
        }
    }
}

/// The same for writes. Each is sent through the loop, then through hyper; a
/// write that succeeds is answered with the store's revision, which the second
/// one moves on, so digits are compared as digits.
#[test]
fn loop_and_hyper_write_alike() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with_env(
        &dir.path().join("d"),
        &["--max-value-bytes", "2048"],
        &[("AMPHORA_LOG", "info")],
    );
    let mut c = Raw::connect(&s);
    c.send(put("/v1/kv/ctx/fam/key", "1").as_bytes());
    assert_eq!(c.answer().status, 201);

    let write = |path: &str, headers: &str, body: &str| {
        format!(
            "PUT {path} HTTP/1.1\r\nhost: t\r\n{headers}content-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let tokens = format!("amphora-read-token: {READ}\r\namphora-write-token: {WRITE}\r\n");
    let big = format!("\"{}\"", "x".repeat(3000));
    let cases: Vec<(String, u16)> = vec![
        (
            write("/v1/kv/ctx/fam/key", &tokens, r#"{"v":[1,"é"]}"#),
            200,
        ),
        (
            write(
                "/v1/kv/ctx/fam/key",
                &(tokens.clone() + "if-match: \"1\"\r\n"),
                "2",
            ),
            412,
        ),
        (
            write(
                "/v1/kv/ctx/fam/key",
                &(tokens.clone() + "if-match: x\r\n"),
                "2",
            ),
            400,
        ),
        (
            write(
                "/v1/kv/ctx/fam/key",
                &(tokens.clone() + "if-none-match: *\r\n"),
                "2",
            ),
            412,
        ),
        (
            write(
                "/v1/kv/ctx/fam/key",
                &(tokens.clone() + "if-none-match: \"1\"\r\n"),
                "2",
            ),
            400,
        ),
        (write("/v1/kv/ctx/fam/key", &tokens, "{not json"), 400),
        (write("/v1/kv/ctx/fam/key", &tokens, ""), 400),
        (write("/v1/kv/ctx/fam/key", &tokens, &big), 413),
        (
            write(
                "/v1/kv/ctx/fam/key",
                &format!("amphora-read-token: {READ}\r\n"),
                "2",
            ),
            400,
        ),
        (
            write(
                "/v1/kv/ctx/fam/key",
                &format!("amphora-read-token: {READ}\r\namphora-write-token: OtherToken1\r\n"),
                "2",
            ),
            403,
        ),
        (
            write(&format!("/v1/kv/ctx/fam/{}", "k".repeat(300)), &tokens, "2"),
            400,
        ),
    ];
    let digits_masked = |a: &Answer| {
        let mut a = a.comparable();
        let mask = |t: &str| {
            t.chars()
                .map(|c| if c.is_ascii_digit() { '0' } else { c })
                .collect()
        };
        a.body = mask(&a.body);
        for (_, v) in a.headers.iter_mut() {
            *v = mask(v);
        }
        a
    };
    for (request, status) in cases {
        let (by_loop, by_hyper) = both_ways(&s, &request);
        assert_eq!(by_loop.status, status, "{request:?}: {by_loop:?}");
        assert_eq!(
            digits_masked(&by_loop),
            digits_masked(&by_hyper),
            "{request:?}"
        );
    }
    // Both replacing writes were applied, in order.
    let mut c = Raw::connect(&s);
    c.send(get("/v1/kv/ctx/fam/key", "").as_bytes());
    let a = c.answer();
    assert_eq!(value_of(&a), serde_json::json!({"v": [1, "é"]}));
    assert_eq!(a.header("etag"), Some("\"3\""));
}

/// Reads and writes answered by the loop are counted like any other request.
#[test]
fn loop_answers_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let mut c = Raw::connect(&s);
    c.send(put("/v1/kv/c/f/k", "1").as_bytes());
    assert_eq!(c.answer().status, 201);
    let mut c = Raw::connect(&s);
    for path in [
        "/v1/kv/c/f/k",
        "/v1/kv/c/f/k",
        "/v1/kv/c/f/k",
        "/v1/kv/c/f/x",
    ] {
        c.send(get(path, "").as_bytes());
        c.answer();
    }
    c.send(put("/v1/kv/c/f/k", "2").as_bytes());
    assert_eq!(c.answer().status, 200);
    c.send(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n");
    let metrics = c.answer().body;
    for line in [
        "amphora_http_requests_total{endpoint=\"kv_entry\",method=\"GET\",status=\"200\"} 3",
        "amphora_http_requests_total{endpoint=\"kv_entry\",method=\"GET\",status=\"404\"} 1",
        "amphora_http_requests_total{endpoint=\"kv_entry\",method=\"PUT\",status=\"200\"} 1",
        "amphora_http_request_duration_seconds_count{endpoint=\"kv_entry\"} 6",
    ] {
        assert!(metrics.contains(line), "metrics lack {line}:\n{metrics}");
    }
}

/// Malformed heads are hyper's to refuse (400, then the connection closes), even
/// after reads the loop answered.
#[test]
fn malformed_heads_are_refused_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let mut c = Raw::connect(&s);
    c.send(get("/v1/kv/c/f/k", "").as_bytes());
    assert_eq!(c.answer().status, 404);
    c.send(b"GET /v1/kv/c/f/k HTTP/1.1\r\nno colon here\r\n\r\n");
    assert_eq!(c.answer().status, 400);
    assert!(c.closed(), "left: {:?}", c.text());
    // The server goes on.
    let mut c = Raw::connect(&s);
    c.send(get("/v1/kv/c/f/k", "").as_bytes());
    assert_eq!(c.answer().status, 404);
}

/// Shutdown closes idle connections, in the loop or handed to hyper, at once: they
/// do not hold the server up for the drain period.
#[test]
fn idle_connections_do_not_delay_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(dir.path());
    let mut in_loop = Raw::connect(&s);
    in_loop.send(get("/v1/kv/c/f/k", "").as_bytes());
    assert_eq!(in_loop.answer().status, 404);
    let mut handed_over = Raw::connect(&s);
    handed_over.send(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(handed_over.answer().status, 200);

    // Busy connections would be waited for 30 s (the drain period): idle ones are
    // closed, so the server is gone well within 20.
    let status = s
        .terminate(Duration::from_secs(20))
        .expect("exits after SIGTERM without waiting for idle connections");
    assert!(status.success(), "{status:?}");
    assert!(in_loop.closed() && handed_over.closed());
}

/// At shutdown a plain write whose body is still coming is finished and answered,
/// with `connection: close`, as hyper finishes a request in progress.
#[test]
fn a_write_whose_body_is_coming_at_shutdown_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(dir.path());
    let mut c = Raw::connect(&s);
    let request = put("/v1/kv/c/f/k", "12");
    let (all_but_one, last) = request.split_at(request.len() - 1);
    c.send(all_but_one.as_bytes());
    std::thread::sleep(Duration::from_millis(300));
    common::signal(s.pid(), rustix::process::Signal::TERM);
    std::thread::sleep(Duration::from_millis(300));
    c.send(last.as_bytes());
    let a = c.answer();
    assert_eq!((a.status, a.header("connection")), (201, Some("close")));
    assert!(c.closed());
    let status = s.terminate(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}");
}

/// The loop's time bounds, in real time (about 36 s, on three connections at once):
/// a plain write's body is bounded by its pauses (30 s), not by the time since the
/// connection's start, and one that pauses longer is answered 408; a head handed to
/// hyper unfinished keeps the time it has left, instead of getting 30 s more.
#[test]
fn bodies_are_bounded_by_their_pauses_and_heads_by_their_time() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut c = Raw::connect(&s);
            std::thread::sleep(Duration::from_secs(20));
            let request = put("/v1/kv/c/f/slow", "12");
            let (all_but_one, last) = request.split_at(request.len() - 1);
            c.send(all_but_one.as_bytes());
            std::thread::sleep(Duration::from_secs(15));
            c.send(last.as_bytes());
            assert_eq!(c.answer().status, 201, "a body that keeps coming is taken");
        });
        scope.spawn(|| {
            let mut c = Raw::connect(&s);
            c.tcp
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let request = put("/v1/kv/c/f/stalled", "12");
            c.send(&request.as_bytes()[..request.len() - 1]);
            let a = c.answer();
            assert!(
                started.elapsed() >= Duration::from_secs(29),
                "{:?}",
                started.elapsed()
            );
            assert_eq!((a.status, a.header("connection")), (408, Some("close")));
            assert!(a.body.contains("body_timeout"), "{}", a.body);
            assert!(c.closed());
        });
        scope.spawn(|| {
            use std::io::ErrorKind;
            let mut c = Raw::connect(&s);
            let mut head = b"GET /v1/kv/c/f/k HTTP/1.1\r\nx-a: ".to_vec();
            head.extend([b'a'; 15_000]);
            c.send(&head);
            std::thread::sleep(Duration::from_secs(20));
            // Past the loop's bound for heads: hyper takes the rest, with 10 s left.
            c.send(&[b'a'; 2_000]);
            c.tcp
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let mut byte = [0u8; 1];
            let closed_at = loop {
                if c.tcp.write_all(b"a").is_err() {
                    break started.elapsed();
                }
                match c.tcp.read(&mut byte) {
                    Ok(0) => break started.elapsed(),
                    // Whatever hyper says before it closes.
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => break started.elapsed(),
                }
                assert!(started.elapsed() < Duration::from_secs(60), "never closed");
            };
            assert!(
                closed_at >= Duration::from_secs(29) && closed_at < Duration::from_secs(36),
                "closed after {closed_at:?}"
            );
        });
    });
}

/// Over TLS the loop answers the same, and a connection it answered on goes on
/// through hyper after a write.
#[tokio::test]
async fn reads_over_tls_are_answered_and_connections_go_on() {
    use common::{ClientKind, Pki, SendJson};
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let s = common::start_with(
        &dir.path().join("d"),
        &pki.server_flags(),
        &[("AMPHORA_LOG", "info")],
    );
    assert!(s.base.starts_with("https://"), "{}", s.base);
    // Each client keeps one connection: the first writes (hyper from its first
    // request), the second reads (the loop) and then writes on the same connection.
    let writer = pki.client(ClientKind::Trusted);
    let c = pki.client(ClientKind::Trusted);
    let write = |c: &reqwest::Client, v: i64| {
        c.put(s.url("/v1/kv/c/f/k"))
            .header("amphora-read-token", READ)
            .header("amphora-write-token", WRITE)
            .body(v.to_string())
            .status_json()
    };
    let read = || {
        c.get(s.url("/v1/kv/c/f/k"))
            .header("amphora-read-token", READ)
            .status_json()
    };
    assert_eq!(write(&writer, 1).await.0, 201);
    for _ in 0..2 {
        let (status, body) = read().await;
        assert_eq!((status, &body["value"]), (200, &json!(1)));
    }
    assert_eq!(write(&c, 2).await.0, 200);
    let (status, body) = read().await;
    assert_eq!(
        (status, &body["value"], &body["revision"]),
        (200, &json!(2), &json!(2))
    );
}

/// Past `--max-connections`, a connection is answered 503 and closed; once one
/// closes, the next is served, and the metrics count both.
#[test]
fn connections_past_the_limit_are_refused_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with_env(
        &dir.path().join("d"),
        &["--max-connections", "2"],
        &[("AMPHORA_LOG", "info")],
    );
    let mut first = Raw::connect(&s);
    first.send(get("/v1/kv/c/f/k", "").as_bytes());
    assert_eq!(first.answer().status, 404);
    let mut second = Raw::connect(&s);
    second.send(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n");
    let metrics = second.answer();
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("amphora_connections 2"),
        "{}",
        metrics.body
    );

    let mut third = Raw::connect(&s);
    let refused = third.answer();
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("connection"), Some("close"));
    assert!(
        refused.body.contains("too_many_connections"),
        "{}",
        refused.body
    );
    assert!(third.closed());

    drop(first);
    // The server sees the close when it next reads: until then, new connections are
    // still refused. A refused one is answered at once; a served one waits for its
    // request, so a read that times out means served.
    let mut served = None;
    for _ in 0..100 {
        let mut next = Raw::connect(&s);
        next.tcp
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        match next.tcp.peek(&mut byte) {
            Ok(_) => assert_eq!(next.answer().status, 503),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                next.tcp
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                next.send(get("/v1/kv/c/f/k", "").as_bytes());
                assert_eq!(next.answer().status, 404);
                served = Some(next);
                break;
            }
            Err(e) => panic!("reading: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(served.is_some(), "no connection served after one closed");
    second.send(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n");
    let metrics = second.answer().body;
    assert!(metrics.contains("amphora_connections 2"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("amphora_connections_refused_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}
