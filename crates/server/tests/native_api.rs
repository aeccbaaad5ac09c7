//! End-to-end tests of the native API, health, metrics and shutdown, against the
//! real binary over real HTTP.

mod common;

use common::{READ, SendJson, Server, WRITE, client};
use serde_json::{Value, json};
use std::time::Duration;

async fn put(
    c: &reqwest::Client,
    url: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = c
        .put(url)
        .header("Amphora-Read-Token", READ)
        .header("Amphora-Write-Token", WRITE)
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn get_json(c: &reqwest::Client, url: &str, read: &str) -> (u16, Value) {
    let r = c
        .get(url)
        .header("Amphora-Read-Token", read)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    if status == 200 {
        assert_eq!(r.headers()["content-type"], "application/json");
    }
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn create_read_replace_cas_delete_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let c = client();
    let url = s.url("/v1/kv/ctx/config/db");

    let r = put(&c, &url, &json!({"host": "db1", "port": 5432}), &[]).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["etag"], "\"1\"");
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"revision": 1, "created": true})
    );

    let (status, body) = get_json(&c, &url, READ).await;
    assert_eq!(status, 200);
    assert_eq!(body["value"], json!({"host": "db1", "port": 5432}));
    assert_eq!(
        (&body["context"], &body["family"], &body["key"]),
        (&json!("ctx"), &json!("config"), &json!("db"))
    );
    assert_eq!(body["revision"], 1);
    assert_eq!(body["expires_at"], Value::Null);
    assert_eq!(body["created_at"], body["updated_at"]);
    let created_at = body["created_at"].clone();
    // Times have millisecond resolution: make the next write's visibly later.
    tokio::time::sleep(Duration::from_millis(5)).await;

    // A wrong read token: the entry does not exist for that caller.
    assert_eq!(get_json(&c, &url, "OtherToken1").await.0, 404);

    // Replace, then compare-and-set on a stale and on the current revision.
    let r = put(&c, &url, &json!("v2"), &[]).await;
    assert_eq!(
        (r.status().as_u16(), r.headers()["etag"].to_str().unwrap()),
        (200, "\"2\"")
    );
    let r = put(&c, &url, &json!("stale"), &[("If-Match", "\"1\"")]).await;
    assert_eq!(r.status(), 412);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "precondition_failed"
    );
    let r = put(&c, &url, &json!("v3"), &[("If-Match", "\"2\"")]).await;
    assert_eq!(r.status(), 200);
    let r = put(&c, &url, &json!("dup"), &[("If-None-Match", "*")]).await;
    assert_eq!(r.status(), 412);
    let r = put(
        &c,
        &s.url("/v1/kv/ctx/config/new"),
        &json!(1),
        &[("If-None-Match", "*")],
    )
    .await;
    assert_eq!(r.status(), 201);

    let (_, body) = get_json(&c, &url, READ).await;
    assert_eq!(body["value"], "v3");
    // Modifying keeps the creation time and moves the update time.
    assert_eq!(body["created_at"], created_at);
    assert!(body["updated_at"].as_str() > created_at.as_str());

    // Modifying with the wrong write token changes nothing.
    let r = c
        .put(&url)
        .header("Amphora-Read-Token", READ)
        .header("Amphora-Write-Token", "WrongToken9")
        .json(&json!("evil"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(get_json(&c, &url, READ).await.1["value"], "v3");

    let del = |w: &'static str| {
        c.delete(&url)
            .header("Amphora-Read-Token", READ)
            .header("Amphora-Write-Token", w)
            .send()
    };
    assert_eq!(del("WrongToken9").await.unwrap().status(), 403);
    let r = del(WRITE).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"revision": 5}));
    assert_eq!(get_json(&c, &url, READ).await.0, 404);
    assert_eq!(del(WRITE).await.unwrap().status(), 404);

    let (status, hist) = get_json(&c, &format!("{url}/history"), READ).await;
    assert_eq!(status, 200);
    let kinds: Vec<(u64, &str)> = hist["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["revision"].as_u64().unwrap(), e["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [(5, "delete"), (3, "put"), (2, "put"), (1, "put")]);
    assert_eq!(hist["events"][1]["value"], "v3");
    assert_eq!(
        get_json(&c, &format!("{url}/history"), "OtherToken1")
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn listing_is_ordered_paginated_and_filtered_by_read_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let c = client();
    for k in ["e", "a", "d", "b", "c"] {
        assert_eq!(
            put(&c, &s.url(&format!("/v1/kv/ctx/f1/{k}")), &json!(k), &[])
                .await
                .status(),
            201
        );
    }
    for k in ["x", "y"] {
        put(&c, &s.url(&format!("/v1/kv/ctx/f2/{k}")), &json!(k), &[]).await;
    }
    // Someone else's entry in the same family, and an entry of another context.
    let r = c
        .put(s.url("/v1/kv/ctx/f1/bb"))
        .header("Amphora-Read-Token", "OtherRead1")
        .header("Amphora-Write-Token", "OtherWrite1")
        .json(&json!("hidden"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    put(&c, &s.url("/v1/kv/ctx2/f1/a"), &json!("elsewhere"), &[]).await;

    let mut keys = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let (status, page) = get_json(
            &c,
            &s.url(&format!("/v1/kv/ctx/f1?limit=2&after={after}")),
            READ,
        )
        .await;
        assert_eq!(status, 200);
        pages += 1;
        let entries = page["entries"].as_array().unwrap();
        assert!(entries.len() <= 2);
        keys.extend(
            entries
                .iter()
                .map(|e| e["key"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(n) => after = n.to_owned(),
            None => break,
        }
    }
    assert_eq!(keys, ["a", "b", "c", "d", "e"]);
    assert_eq!(pages, 3);

    let (_, all) = get_json(&c, &s.url("/v1/kv/ctx"), READ).await;
    let names: Vec<String> = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["family"].as_str().unwrap(),
                e["key"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        ["f1/a", "f1/b", "f1/c", "f1/d", "f1/e", "f2/x", "f2/y"]
    );
    assert_eq!(all["next"], Value::Null);
    let (_, other) = get_json(&c, &s.url("/v1/kv/ctx"), "OtherRead1").await;
    assert_eq!(other["entries"].as_array().unwrap().len(), 1);
    assert_eq!(other["entries"][0]["value"], "hidden");
}

#[tokio::test]
async fn lease_expires_for_every_reader_and_keepalive_renews_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let c = client();
    let kept = s.url("/v1/kv/ctx/nodes/kept");
    let left = s.url("/v1/kv/ctx/nodes/left");
    assert_eq!(
        put(&c, &format!("{kept}?ttl=1500ms"), &json!("k"), &[])
            .await
            .status(),
        201
    );
    assert_eq!(
        put(&c, &format!("{left}?ttl=1500ms"), &json!("l"), &[])
            .await
            .status(),
        201
    );
    let (_, body) = get_json(&c, &kept, READ).await;
    assert_ne!(body["expires_at"], Value::Null);

    let keepalive = || {
        c.post(format!("{kept}/keepalive"))
            .header("Amphora-Read-Token", READ)
            .header("Amphora-Write-Token", WRITE)
            .send()
    };
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let r = keepalive().await.unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["ttl_seconds"], 1.5);
    }
    // 2.4 s after the writes: the renewed entry lives, the other one has expired.
    assert_eq!(get_json(&c, &kept, READ).await.0, 200);
    assert_eq!(get_json(&c, &left, READ).await.0, 404);
    let (_, listing) = get_json(&c, &s.url("/v1/kv/ctx/nodes"), READ).await;
    assert_eq!(listing["entries"].as_array().unwrap().len(), 1);

    // The sweep records the expiry as a deletion in the history.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, hist) = get_json(&c, &format!("{left}/history"), READ).await;
    assert_eq!(hist["events"][0]["kind"], "delete");

    // An entry without a lease cannot be kept alive.
    put(&c, &s.url("/v1/kv/ctx/nodes/plain"), &json!(1), &[]).await;
    let r = c
        .post(s.url("/v1/kv/ctx/nodes/plain/keepalive"))
        .header("Amphora-Read-Token", READ)
        .header("Amphora-Write-Token", WRITE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
}

#[tokio::test]
async fn both_apis_see_the_same_entry() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let c = client();
    let body = r#"{"val_": "[{\"hostName\": \"n1\"}]"}"#;
    let r = c
        .post(s.url(&format!(
            "//writeScope?contextID=ctx&family=hostsall&Key=n1&readToken={READ}&writeToken={WRITE}"
        )))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, native) = get_json(&c, &s.url("/v1/kv/ctx/hostsall/n1"), READ).await;
    assert_eq!(native["value"], body);

    put(
        &c,
        &s.url("/v1/kv/ctx/hostsall/n2"),
        &json!({"ip": "10.0.0.2"}),
        &[],
    )
    .await;
    let r: Value = c
        .get(s.url(&format!(
            "/readScope?contextID=ctx&family=hostsall&Key=n2&readToken={READ}"
        )))
        .json_body()
        .await;
    assert_eq!(r["value"]["value"], r#"{"ip":"10.0.0.2"}"#);
}

#[tokio::test]
async fn health_readiness_metrics_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut s = Server::start(&data, &[]);
    let c = client();
    let r = c.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    put(&c, &s.url("/v1/kv/ctx/f/k"), &json!(1), &[]).await;
    let r: Value = c.get(s.url("/readyz")).json_body().await;
    assert_eq!(
        (
            r["status"].as_str(),
            r["revision"].as_u64(),
            r["entries"].as_u64()
        ),
        (Some("ready"), Some(1), Some(1))
    );

    // The create read nothing first; the first read fills the entry cache (a miss),
    // the next two are answered from it.
    for _ in 0..3 {
        assert_eq!(get_json(&c, &s.url("/v1/kv/ctx/f/k"), READ).await.0, 200);
    }

    let text = common::metrics_text(&s).await;
    for needle in [
        "amphora_http_requests_total{endpoint=\"kv_entry\",method=\"PUT\",status=\"201\"} 1",
        "amphora_http_request_duration_seconds_bucket",
        "amphora_store_commit_batch_size_count",
        // The create was one operation of one group commit (no failed modify first).
        "amphora_store_commit_batch_size_sum 1.0\n",
        "amphora_store_entries 1",
        "amphora_entry_cache_hits_total 2",
        "amphora_entry_cache_misses_total 1\n",
        "amphora_entry_cache_entries 1",
        "amphora_http_request_duration_seconds_count{endpoint=\"kv_entry\"} ",
        // Every endpoint's series exists from the start.
        "amphora_http_request_duration_seconds_count{endpoint=\"kv_history\"} 0",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    let r = c
        .get(s.url("/healthz"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    assert!(
        s.log_text().contains("trace-me-42"),
        "request id reaches the log"
    );
    // Without one (or with one too long to keep), each response has an id of its own.
    let mut ids = Vec::new();
    for given in [None, None, Some("x".repeat(65))] {
        let mut req = c.get(s.url("/healthz"));
        if let Some(g) = given {
            req = req.header("x-request-id", g);
        }
        let r = req.send().await.unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert!(
            id.len() >= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "{ids:?}");

    let status = s
        .terminate(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(s.log_text().contains("shut down cleanly"));
    let s2 = Server::start(&data, &[]);
    let (status, body) = get_json(&c, &s2.url("/v1/kv/ctx/f/k"), READ).await;
    assert_eq!((status, &body["value"]), (200, &json!(1)));
}

/// Plain reads are answered in front of the router: by the connection loop
/// (`conn.rs`), or, while the per-request debug lines are on, by `hot.rs`; reads in
/// any other form (a percent-escape, a query string) go through it. All must answer
/// alike, errors included.
#[tokio::test]
async fn plain_and_routed_reads_answer_alike() {
    for log in ["info", "info,amphora_server::http=debug"] {
        let dir = tempfile::tempdir().unwrap();
        let s = Server::start_with_env(
            &dir.path().join("d"),
            &["--max-name-bytes", "16"],
            &[("AMPHORA_LOG", log)],
        );
        reads_answer_alike(&s).await;
    }
}

async fn reads_answer_alike(s: &Server) {
    let c = client();
    let r = put(
        &c,
        &s.url("/v1/kv/ctx/fam/key"),
        &json!({"a": [1, "b"]}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 201);

    async fn answer(
        c: &reqwest::Client,
        url: &str,
        read: Option<&str>,
    ) -> (u16, String, String, Value) {
        let mut req = c.get(url);
        if let Some(t) = read {
            req = req.header("Amphora-Read-Token", t);
        }
        let r = req.send().await.unwrap();
        let header = |name: &str| {
            r.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let (etag, content_type) = (header("etag"), header("content-type"));
        assert!(r.headers().contains_key("x-request-id"));
        (
            r.status().as_u16(),
            etag,
            content_type,
            r.json().await.unwrap(),
        )
    }

    let cases: [(&str, &[&str], Option<&str>, u16); 4] = [
        // (plain path, the same request in routed forms, token, status)
        (
            "/v1/kv/ctx/fam/key",
            &["/v1/kv/ctx/fam/k%65y", "/v1/kv/ctx/fam/key?x=1"],
            Some(READ),
            200,
        ),
        (
            "/v1/kv/ctx/fam/key",
            &["/v1/kv/c%74x/fam/key"],
            Some("OtherToken1"),
            404,
        ),
        (
            "/v1/kv/ctx/fam/nokey",
            &["/v1/kv/ctx/fam/nok%65y"],
            Some(READ),
            404,
        ),
        (
            "/v1/kv/ctx/fam/seventeen-bytes-x",
            &["/v1/kv/ctx/fam/seventeen-bytes-%78"],
            Some(READ),
            400,
        ),
    ];
    for (plain, routed, token, status) in cases {
        let expected = answer(&c, &s.url(plain), token).await;
        assert_eq!(expected.0, status, "{plain}: {expected:?}");
        for other in routed {
            assert_eq!(answer(&c, &s.url(other), token).await, expected, "{other}");
        }
    }
    let (_, etag, content_type, body) = answer(&c, &s.url("/v1/kv/ctx/fam/key"), Some(READ)).await;
    assert_eq!(
        (etag.as_str(), content_type.as_str()),
        ("\"1\"", "application/json")
    );
    assert_eq!(body["value"], json!({"a": [1, "b"]}));

    // Without the token header both ways end at the router's answer.
    let missing = answer(&c, &s.url("/v1/kv/ctx/fam/key"), None).await;
    assert_eq!(
        (missing.0, &missing.3["error"]["code"]),
        (400, &json!("missing_parameter"))
    );
}

/// The same for writes: a plain PUT is answered in front of the router, a PUT with
/// a percent-escape goes through it; their answers must match, errors included.
#[tokio::test]
async fn plain_and_routed_writes_answer_alike() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &["--max-name-bytes", "16"]);
    let c = client();
    let write =
        |url: String, body: &'static str, headers: &'static [(&'static str, &'static str)]| {
            let mut req = c.put(url).body(body);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            req.status_json()
        };
    const TOKENS: &[(&str, &str)] = &[("Amphora-Read-Token", READ), ("Amphora-Write-Token", WRITE)];
    const STALE: &[(&str, &str)] = &[
        ("Amphora-Read-Token", READ),
        ("Amphora-Write-Token", WRITE),
        ("If-Match", "\"1\""),
    ];
    const NO_WRITE_TOKEN: &[(&str, &str)] = &[("Amphora-Read-Token", READ)];
    const WRONG_WRITE_TOKEN: &[(&str, &str)] = &[
        ("Amphora-Read-Token", READ),
        ("Amphora-Write-Token", "OtherToken1"),
    ];

    // Created plainly, then replaced either way: the second write is revision 2.
    assert_eq!(
        write(s.url("/v1/kv/ctx/fam/key"), r#"{"v":1}"#, TOKENS).await,
        (201, json!({"revision": 1, "created": true}))
    );
    let plain = write(s.url("/v1/kv/ctx/fam/key"), r#"{"v":2}"#, TOKENS).await;
    assert_eq!(plain, (200, json!({"revision": 2, "created": false})));
    let routed = write(s.url("/v1/kv/ctx/fam/k%65y"), r#"{"v":3}"#, TOKENS).await;
    assert_eq!(routed, (200, json!({"revision": 3, "created": false})));

    for (name, body, headers, status) in [
        ("key", "{not json", TOKENS, 400),
        ("key", r#"{"v":4}"#, NO_WRITE_TOKEN, 400),
        ("key", r#"{"v":4}"#, WRONG_WRITE_TOKEN, 403),
        ("key", r#"{"v":4}"#, STALE, 412),
        ("seventeen-bytes-x", r#"{"v":4}"#, TOKENS, 400),
    ] {
        let plain = write(s.url(&format!("/v1/kv/ctx/fam/{name}")), body, headers).await;
        let escaped = format!("/v1/kv/c%74x/fam/{name}");
        let routed = write(s.url(&escaped), body, headers).await;
        assert_eq!(plain.0, status, "{name} {body} {headers:?}: {plain:?}");
        assert_eq!(plain, routed, "{name} {body} {headers:?}");
    }
    let (status, body) = c
        .get(s.url("/v1/kv/ctx/fam/key"))
        .header("Amphora-Read-Token", READ)
        .status_json()
        .await;
    assert_eq!(
        (status, &body["value"], &body["revision"]),
        (200, &json!({"v": 3}), &json!(3))
    );
}
