//! COMET's idle expiry with a short E, through both APIs, and its background sweep.

mod common;

use common::{READ, SendJson, Server, WRITE, client};
use serde_json::Value;
use std::time::{Duration, Instant};

#[tokio::test]
async fn idle_entries_expire_after_2e_and_reads_keep_entries_alive() {
    const E: Duration = Duration::from_secs(1);
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &["--idle-expiry", "1s"]);
    let c = client();
    let write = |family: &'static str, key: &'static str| {
        c.post(s.url(&format!(
            "/writeScope?contextID=ctx&family={family}&Key={key}&readToken={READ}&writeToken={WRITE}"
        )))
        .body(key)
        .send()
    };
    let read = |key: &'static str| {
        let url = s.url(&format!(
            "/readScope?contextID=ctx&family=f&Key={key}&readToken={READ}"
        ));
        let c = c.clone();
        async move { c.get(url).json_body().await["value"].clone() }
    };
    let list = |family: &'static str| {
        let c = c.clone();
        let url = s.url(&format!("/v1/kv/ctx/{family}?limit=10"));
        async move {
            let listing: Value = c
                .get(url)
                .header("Amphora-Read-Token", READ)
                .json_body()
                .await;
            listing["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["key"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(write("f", "read-often").await.unwrap().status(), 200);
    assert_eq!(write("f", "left-alone").await.unwrap().status(), 200);
    assert_eq!(write("g", "listed-often").await.unwrap().status(), 200);
    let start = Instant::now();

    // Every E, read one entry and list another family: both kinds of access keep
    // their entries alive for 5E.
    for i in 1..=5 {
        tokio::time::sleep_until((start + E * i).into()).await;
        assert_eq!(
            read("read-often").await["value"],
            "read-often",
            "after {i}E"
        );
        assert_eq!(list("g").await, ["listed-often"], "after {i}E");
        if i >= 3 {
            // Left alone since the start, more than 2E ago: gone for every reader.
            assert_eq!(
                read("left-alone").await,
                serde_json::json!({}),
                "after {i}E"
            );
            assert_eq!(list("f").await, ["read-often"], "after {i}E");
        }
    }
    // The background sweep removed it from the store too: the history shows the deletion.
    let hist: Value = c
        .get(s.url("/v1/kv/ctx/f/left-alone/history"))
        .header("Amphora-Read-Token", READ)
        .json_body()
        .await;
    assert_eq!(hist["events"][0]["kind"], "delete", "{hist}");
    // Writing the name again creates it afresh.
    assert_eq!(write("f", "left-alone").await.unwrap().status(), 200);
    assert_eq!(read("left-alone").await["value"], "left-alone");
}
