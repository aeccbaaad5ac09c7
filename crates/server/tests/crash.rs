//! Crash safety: 32 concurrent clients write, the server is killed with SIGKILL in
//! the middle of the stream, restarted, and every acknowledged write is found with
//! its last acknowledged value (or a newer one that was in flight at the kill).

mod common;

use common::{READ, Server, WRITE};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CLIENTS: usize = 32;
const KEYS_PER_CLIENT: u64 = 4;

/// Per key: (last acknowledged sequence number, highest sequence number sent).
type Ledger = Arc<Mutex<HashMap<String, (Option<u64>, u64)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_write_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut server = Server::start(&data, &[]);
    let ledger: Ledger = Arc::default();
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));

    let mut tasks = Vec::new();
    for client_no in 0..CLIENTS {
        let (ledger, acked, base) = (ledger.clone(), acked.clone(), server.base.clone());
        tasks.push(tokio::spawn(async move {
            // One connection per client, as 32 separate processes would have.
            let http = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
            for seq in 0u64.. {
                let key = format!("c{client_no}-k{}", seq % KEYS_PER_CLIENT);
                ledger.lock().unwrap().entry(key.clone()).or_insert((None, 0)).1 = seq;
                // Half the clients speak COMET, half the native API.
                let sent = if client_no % 2 == 0 {
                    http.put(format!("{base}/v1/kv/crash/f/{key}"))
                        .header("Amphora-Read-Token", READ)
                        .header("Amphora-Write-Token", WRITE)
                        .json(&json!({"seq": seq}))
                        .send()
                        .await
                } else {
                    http.post(format!(
                        "{base}/writeScope?contextID=crash&family=f&Key={key}&readToken={READ}&writeToken={WRITE}"
                    ))
                    .body(json!({"seq": seq}).to_string())
                    .send()
                    .await
                };
                match sent {
                    Ok(r) if r.status().is_success() => {
                        ledger.lock().unwrap().get_mut(&key).unwrap().0 = Some(seq);
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // Killed: stop writing.
                    Ok(r) => panic!("write refused before the kill: {}", r.status()),
                    Err(_) => return,
                }
            }
        }));
    }

    // Let a good stream build up, then kill in the middle of it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked.load(std::sync::atomic::Ordering::Relaxed) < 3000
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let acked_before_kill = acked.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        acked_before_kill >= 500,
        "only {acked_before_kill} writes acknowledged before the kill"
    );

    let server = Server::start(&data, &[]);
    let http = reqwest::Client::new();
    let ledger = ledger.lock().unwrap().clone();
    let mut checked = 0;
    for (key, (last_acked, last_sent)) in ledger {
        let Some(last_acked) = last_acked else {
            continue;
        };
        let r = http
            .get(server.url(&format!("/v1/kv/crash/f/{key}")))
            .header("Amphora-Read-Token", READ)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged key {key} lost");
        let body: Value = r.json().await.unwrap();
        // Native writes store the JSON; COMET writes store the text as a JSON string.
        let value = match &body["value"] {
            Value::String(s) => serde_json::from_str::<Value>(s).unwrap(),
            v => v.clone(),
        };
        let seq = value["seq"].as_u64().unwrap();
        assert!(
            seq >= last_acked && seq <= last_sent,
            "{key}: found seq {seq}, last acknowledged {last_acked}, last sent {last_sent}"
        );
        checked += 1;
    }
    assert_eq!(checked, CLIENTS * KEYS_PER_CLIENT as usize);
    eprintln!(
        "{acked_before_kill} writes acknowledged before SIGKILL; all {checked} keys hold their last acknowledged value"
    );
}
