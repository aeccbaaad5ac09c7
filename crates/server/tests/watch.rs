//! End-to-end tests of watches (`GET /v1/watch/...`, Server-Sent Events) against the
//! real binary over real HTTP.

mod common;

use common::{READ, SendJson, Server, WRITE};
use serde_json::{Value, json};
use std::time::Duration;

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<u64>,
    event: String,
    data: Value,
}

/// Reads a `text/event-stream` response frame by frame.
struct SseReader {
    response: reqwest::Response,
    buf: String,
}

impl SseReader {
    async fn open(url: &str, read: &str, headers: &[(&str, &str)]) -> SseReader {
        let mut req = stream_client().get(url).header("Amphora-Read-Token", read);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = req.send().await.unwrap();
        assert_eq!(response.status(), 200, "watch refused");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        SseReader {
            response,
            buf: String::new(),
        }
    }

    /// The next event (comments and `retry` skipped); `None` when the stream ends.
    async fn next(&mut self, within: Duration) -> Option<Sse> {
        tokio::time::timeout(within, self.next_inner())
            .await
            .expect("no event in time")
    }

    async fn next_inner(&mut self) -> Option<Sse> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::from("message"), Vec::new());
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    }
                }
                if !data.is_empty() {
                    let data = serde_json::from_str(&data.join("\n")).unwrap();
                    return Some(Sse { id, event, data });
                }
            }
            let chunk = self.response.chunk().await.ok()??;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Asserts that nothing arrives for a while.
    async fn quiet(&mut self, for_: Duration) {
        if let Ok(got) = tokio::time::timeout(for_, self.next_inner()).await {
            panic!("expected nothing, got {got:?}");
        }
    }
}

fn stream_client() -> reqwest::Client {
    // No overall timeout: streams stay open; each read is bounded by the test.
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn put(s: &Server, path: &str, value: Value, read: &str, write: &str) -> u64 {
    let (status, body) = stream_client()
        .put(s.url(path))
        .header("Amphora-Read-Token", read)
        .header("Amphora-Write-Token", write)
        .json(&value)
        .status_json()
        .await;
    assert!(status == 200 || status == 201, "{status} {body}");
    body["revision"].as_u64().unwrap()
}

async fn delete(s: &Server, path: &str) -> u64 {
    let (status, body) = stream_client()
        .delete(s.url(path))
        .header("Amphora-Read-Token", READ)
        .header("Amphora-Write-Token", WRITE)
        .status_json()
        .await;
    assert_eq!(status, 200, "{body}");
    body["revision"].as_u64().unwrap()
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_family_watch_sees_its_own_entries_changes_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let mut w = SseReader::open(&s.url("/v1/watch/ctx/hosts"), READ, &[]).await;

    let r1 = put(
        &s,
        "/v1/kv/ctx/hosts/n1",
        json!({"ip": "10.0.0.1"}),
        READ,
        WRITE,
    )
    .await;
    // Another family, another context, and an entry with another read token: unseen.
    put(
        &s,
        "/v1/kv/ctx/keys/n1",
        json!("ssh-ed25519 AAA"),
        READ,
        WRITE,
    )
    .await;
    put(&s, "/v1/kv/ctx2/hosts/n1", json!(1), READ, WRITE).await;
    put(
        &s,
        "/v1/kv/ctx/hosts/secret",
        json!(2),
        "OtherRead9",
        "OtherWrite9",
    )
    .await;
    let r2 = delete(&s, "/v1/kv/ctx/hosts/n1").await;

    let e = w.next(WAIT).await.unwrap();
    assert_eq!((e.id, e.event.as_str()), (Some(r1), "put"));
    assert_eq!(
        (&e.data["context"], &e.data["family"], &e.data["key"]),
        (&json!("ctx"), &json!("hosts"), &json!("n1"))
    );
    assert_eq!(e.data["value"], json!({"ip": "10.0.0.1"}));
    assert_eq!(e.data["revision"], r1);
    assert!(e.data["updated_at"].as_str().unwrap().ends_with('Z'));

    let e = w.next(WAIT).await.unwrap();
    assert_eq!((e.id, e.event.as_str()), (Some(r2), "delete"));
    assert_eq!(e.data["key"], "n1");
    assert!(e.data.get("value").is_none());
    w.quiet(Duration::from_millis(500)).await;

    // A watch with a wrong token is not refused (that would reveal nothing) but
    // shows nothing; the other token's holder sees its own entry.
    let mut wrong = SseReader::open(&s.url("/v1/watch/ctx/hosts"), "NotTheToken1", &[]).await;
    let mut other = SseReader::open(&s.url("/v1/watch/ctx"), "OtherRead9", &[]).await;
    let r3 = put(
        &s,
        "/v1/kv/ctx/hosts/secret",
        json!(3),
        "OtherRead9",
        "OtherWrite9",
    )
    .await;
    let e = other.next(WAIT).await.unwrap();
    assert_eq!((e.id, &e.data["value"]), (Some(r3), &json!(3)));
    wrong.quiet(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn reconnecting_with_last_event_id_misses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let url = s.url("/v1/watch/ctx/fam");
    let mut w = SseReader::open(&url, READ, &[]).await;
    let mut revisions = Vec::new();
    for i in 0..3 {
        revisions.push(put(&s, &format!("/v1/kv/ctx/fam/k{i}"), json!(i), READ, WRITE).await);
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(w.next(WAIT).await.unwrap().id.unwrap());
    }
    drop(w);
    // While disconnected: more changes, including in other families.
    for i in 3..6 {
        put(&s, &format!("/v1/kv/ctx/other/k{i}"), json!(i), READ, WRITE).await;
        revisions.push(put(&s, &format!("/v1/kv/ctx/fam/k{i}"), json!(i), READ, WRITE).await);
    }
    let last = seen.last().unwrap().to_string();
    let mut w = SseReader::open(&url, READ, &[("Last-Event-ID", &last)]).await;
    // Replayed from the history, then live.
    revisions.push(put(&s, "/v1/kv/ctx/fam/k6", json!(6), READ, WRITE).await);
    while seen.len() < revisions.len() {
        let e = w.next(WAIT).await.unwrap();
        assert_eq!(e.event, "put");
        seen.push(e.id.unwrap());
    }
    assert_eq!(seen, revisions);
    w.quiet(Duration::from_millis(300)).await;

    // `from` replays from a revision; a context watch sees every family.
    let mut all = SseReader::open(&s.url("/v1/watch/ctx?from=1"), READ, &[]).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(all.next(WAIT).await.unwrap().id.unwrap());
    }
    assert_eq!(ids, (1..=10).collect::<Vec<u64>>());
}

#[tokio::test]
async fn lease_expiry_reaches_watchers_as_a_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let mut w = SseReader::open(&s.url("/v1/watch/ctx/members"), READ, &[]).await;
    let r = put(&s, "/v1/kv/ctx/members/n1?ttl=1s", json!("up"), READ, WRITE).await;
    assert_eq!(w.next(WAIT).await.unwrap().id, Some(r));
    let e = w.next(WAIT).await.unwrap();
    assert_eq!((e.event.as_str(), &e.data["key"]), ("delete", &json!("n1")));
    assert!(e.id.unwrap() > r);
}

#[tokio::test]
async fn bad_watches_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("d"),
        &[
            "--history-retention",
            "1s",
            "--max-watchers-per-client",
            "2",
        ],
    );
    let c = stream_client();
    let url = s.url("/v1/watch/ctx/fam");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (c.get(&url), 400, "missing_parameter"),
        (
            c.get(&url).header("Amphora-Read-Token", "weak"),
            400,
            "weak_token",
        ),
        (
            c.get(format!("{url}?from=abc"))
                .header("Amphora-Read-Token", READ),
            400,
            "bad_request",
        ),
        (
            c.get(&url)
                .header("Amphora-Read-Token", READ)
                .header("Last-Event-ID", "x"),
            400,
            "bad_request",
        ),
        (
            c.get(format!("{url}?readToken={READ}")),
            400,
            "token_in_query",
        ),
        (
            c.get(s.url("/v1/watch/ctx/%01"))
                .header("Amphora-Read-Token", READ),
            400,
            "invalid_name",
        ),
    ];
    for (req, status, code) in cases {
        let (got, body) = req.status_json().await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }

    // History older than retention: 410 before the stream starts.
    put(&s, "/v1/kv/ctx/fam/k", json!(1), READ, WRITE).await;
    put(&s, "/v1/kv/ctx/fam/k", json!(2), READ, WRITE).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Until compaction runs, this is an (endless) stream: read only its status.
        let r = c
            .get(format!("{url}?from=1"))
            .header("Amphora-Read-Token", READ)
            .send()
            .await
            .unwrap();
        if r.status() == 410 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "history_compacted");
            break;
        }
        drop(r);
        assert!(
            std::time::Instant::now() < deadline,
            "history never compacted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // At most two streams from one address; closing one makes room.
    let first = SseReader::open(&url, READ, &[]).await;
    let _second = SseReader::open(&url, READ, &[]).await;
    let (status, body) = c
        .get(&url)
        .header("Amphora-Read-Token", READ)
        .status_json()
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_watchers"))
    );
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let _third = loop {
        let r = c
            .get(&url)
            .header("Amphora-Read-Token", READ)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the closed stream was never released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let metrics = common::metrics_text(&s).await;
    assert!(metrics.contains("amphora_watchers 2"), "{metrics}");
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(&dir.path().join("d"), &[]);
    let mut w = SseReader::open(&s.url("/v1/watch/ctx/fam"), READ, &[]).await;
    let started = std::time::Instant::now();
    let status = s.terminate(Duration::from_secs(10)).expect("server exits");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(w.next(WAIT).await.is_none());
}
