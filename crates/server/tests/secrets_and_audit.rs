//! Tokens stay secret: with known token values in flight (both APIs, successes and
//! failures, tokens where they do not belong), neither the log, nor the audit log,
//! nor any file in the data directory holds them. The audit log holds what it must.
//! Also: brute-force protection, and the admin endpoints.

mod common;

use common::{ClientKind, Pki, SendJson, start_with};
use serde_json::{Value, json};
use std::time::Duration;

const LEAK_READ: &str = "LeakCheckRead7Q";
const LEAK_WRITE: &str = "LeakCheckWrite9Z";
const LEAK_OTHER: &str = "LeakCheckWrong3X";
const SECRET_VALUE: &str = "secret-value-4711";

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn no_token_reaches_a_log_the_audit_log_or_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let audit = dir.path().join("audit.jsonl");
    let mut flags = pki.server_flags();
    flags.extend(["--audit-log".into(), audit.display().to_string()]);
    let data = dir.path().join("d");
    // The most verbose logging there is, ours and every library's.
    let mut s = start_with(&data, &flags, &[("AMPHORA_LOG", "trace")]);
    let c = pki.client(ClientKind::Trusted);
    let b = &s.base;
    let comet = |call: &str, key: &str, read: &str, write: &str| {
        format!("{b}//{call}?contextID=leak&family=f&Key={key}&readToken={read}&writeToken={write}")
    };

    let mut statuses = Vec::new();
    for (read, write) in [
        (LEAK_READ, LEAK_WRITE),
        (LEAK_READ, LEAK_OTHER),
        (LEAK_OTHER, LEAK_WRITE),
    ] {
        let r = c
            .post(comet("writeScope", "k", read, write))
            .body(SECRET_VALUE)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        let r = c
            .get(comet("readScope", "k", read, write))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        let r = c
            .get(format!(
                "{b}/enumerateScope?contextID=leak&readToken={read}"
            ))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        let r = c
            .put(format!("{b}/v1/kv/leak/f/n"))
            .header("Amphora-Read-Token", read)
            .header("Amphora-Write-Token", write)
            .json(&json!(SECRET_VALUE))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        let r = c
            .get(format!("{b}/v1/kv/leak/f/n"))
            .header("Amphora-Read-Token", read)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    // Tokens where they do not belong: in the native API's query string, percent-encoded,
    // as equal pair, in a malformed query.
    for url in [
        format!("{b}/v1/kv/leak/f/n?readToken={LEAK_READ}"),
        format!("{b}/v1/kv/leak/f/n?amphora-read-token={LEAK_READ}"),
        format!("{b}/readScope?contextID=leak&family=f&Key=k&read%54oken={LEAK_READ}"),
        format!("{b}/readScope?contextID=%zz&family=f&Key=k&readToken={LEAK_READ}"),
        comet("writeScope", "eq", LEAK_READ, LEAK_READ),
    ] {
        statuses.push(c.get(url).send().await.unwrap().status().as_u16());
    }
    let r = c
        .delete(comet("deleteScope", "k", LEAK_READ, LEAK_WRITE))
        .send()
        .await
        .unwrap();
    statuses.push(r.status().as_u16());
    assert!(
        statuses.contains(&200) && statuses.contains(&403) && statuses.contains(&400),
        "{statuses:?}"
    );

    // Stop the server so that every log line and audit record is written out.
    assert!(s.terminate(Duration::from_secs(15)).unwrap().success());
    let log = s.log_text();
    assert!(log.contains("request"), "the log has the requests");
    assert!(
        log.contains("readToken=REDACTED"),
        "queries are logged redacted"
    );
    let audit_text = std::fs::read_to_string(&audit).unwrap();
    let mut haystacks = vec![
        ("log".to_owned(), log.into_bytes()),
        ("audit log".to_owned(), audit_text.clone().into_bytes()),
    ];
    for f in files_under(&data) {
        haystacks.push((f.display().to_string(), std::fs::read(&f).unwrap()));
    }
    for (name, bytes) in &haystacks {
        for secret in [LEAK_READ, LEAK_WRITE, LEAK_OTHER] {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{secret} found in {name}");
        }
    }
    assert!(
        !audit_text.contains(SECRET_VALUE),
        "the audit log never holds a value"
    );

    // The audit log has one JSON record per operation, with the required fields.
    let records: Vec<Value> = audit_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records.len() >= 15, "{} records", records.len());
    let create = records
        .iter()
        .find(|r| r["operation"] == "create")
        .expect("a create record");
    assert_eq!(create["client"], "127.0.0.1");
    assert_eq!(create["api"], "comet");
    assert_eq!(
        (&create["context"], &create["family"], &create["key"]),
        (&json!("leak"), &json!("f"), &json!("k"))
    );
    assert_eq!(create["outcome"], "ok");
    assert_eq!(create["trusted_cert"], true);
    assert!(
        create["subject"].as_str().unwrap().contains("CN=trusted"),
        "{create}"
    );
    assert!(create["time"].as_str().unwrap().ends_with('Z'));
    assert!(
        records
            .iter()
            .any(|r| r["operation"] == "write" && r["outcome"] == "forbidden")
    );
    assert!(
        records
            .iter()
            .any(|r| r["operation"] == "read" && r["outcome"] == "forbidden")
    );
    assert!(
        records
            .iter()
            .any(|r| r["operation"] == "delete" && r["outcome"] == "ok")
    );
}

#[tokio::test]
async fn repeated_token_failures_are_slowed_then_refused_without_hurting_others() {
    let dir = tempfile::tempdir().unwrap();
    let s = common::Server::start(
        &dir.path().join("d"),
        &["--max-token-failures", "4", "--token-failure-block", "30s"],
    );
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(Some(std::net::IpAddr::from(ip)))
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    };
    let (attacker, neighbour) = (from([127, 0, 0, 2]), from([127, 0, 0, 3]));
    let write = |c: &reqwest::Client, ctx: &str, write: &str| {
        c.post(s.url(&format!(
            "/writeScope?contextID={ctx}&family=f&Key=k&readToken={}&writeToken={write}",
            common::READ
        )))
        .body("v")
        .send()
    };
    assert_eq!(
        write(&neighbour, "ctx", common::WRITE)
            .await
            .unwrap()
            .status(),
        200
    );

    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(
            write(&attacker, "ctx", "Guess1234x")
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(seen, [403, 403, 403, 403]);
    // Blocked now, even with the right token, with a Retry-After.
    let r = write(&attacker, "ctx", common::WRITE).await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["value"]["error"], "too_many_failures");
    let r = attacker
        .get(s.url("/v1/kv/ctx/f/k"))
        .header("Amphora-Read-Token", common::READ)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "the native API is guarded too");

    // Meanwhile the neighbour is served normally, and the attacker elsewhere too.
    assert_eq!(
        write(&neighbour, "ctx", common::WRITE)
            .await
            .unwrap()
            .status(),
        200
    );
    let v: Value = neighbour
        .get(s.url(&format!(
            "/readScope?contextID=ctx&family=f&Key=k&readToken={}",
            common::READ
        )))
        .json_body()
        .await;
    assert_eq!(v["value"]["value"], "v");
    assert_eq!(
        write(&attacker, "other", common::WRITE)
            .await
            .unwrap()
            .status(),
        200
    );

    let metrics = common::metrics_text(&s).await;
    assert!(
        metrics.contains("amphora_token_failures_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("amphora_throttled_requests_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn admin_endpoints_need_the_admin_token_or_an_admin_certificate() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "AdminToken-0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut flags = pki.server_flags();
    flags.extend([
        "--admin-token-file".into(),
        token_file.display().to_string(),
        "--admin-subject".into(),
        "CN=trusted, O=Amphora development".into(),
    ]);
    let s = start_with(&dir.path().join("d"), &flags, &[]);
    let trusted = pki.client(ClientKind::Trusted);
    let anon = pki.client(ClientKind::NoCert);
    for (ctx, n) in [("alpha", 3), ("beta", 2)] {
        for i in 0..n {
            let r = trusted
                .put(s.url(&format!("/v1/kv/{ctx}/f/k{i}")))
                .header("Amphora-Read-Token", common::READ)
                .header("Amphora-Write-Token", common::WRITE)
                .json(&json!(i))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    }
    // Refused: nothing, a wrong token, an untrusted certificate with a listed CN.
    for req in [
        anon.get(s.url("/v1/admin/contexts")),
        anon.get(s.url("/v1/admin/contexts"))
            .bearer_auth("AdminToken-wrong"),
        pki.client(ClientKind::SelfSigned)
            .get(s.url("/v1/admin/stats")),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(
            r.json::<Value>().await.unwrap()["error"]["code"],
            "admin_required"
        );
    }
    // By token.
    let v: Value = anon
        .get(s.url("/v1/admin/contexts"))
        .bearer_auth("AdminToken-0123456789abcdef")
        .json_body()
        .await;
    assert_eq!(
        v,
        json!({"contexts": [{"context": "alpha", "entries": 3}, {"context": "beta", "entries": 2}]})
    );
    // By certificate subject.
    let r = trusted
        .delete(s.url("/v1/admin/contexts/alpha"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"context": "alpha", "deleted": 3})
    );
    let v: Value = trusted.get(s.url("/v1/admin/stats")).json_body().await;
    assert_eq!(v["stats"]["entries"], 2);
    assert_eq!(v["stats"]["require_client_cert"], true);
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let run = |flags: Vec<String>, name: &str| {
        let audit = dir.path().join(format!("{name}.jsonl"));
        let mut flags = flags;
        flags.extend(["--audit-log".into(), audit.display().to_string()]);
        (start_with(&dir.path().join(name), &flags, &[]), audit)
    };
    for (trusted, want) in [(false, "127.0.0.1"), (true, "203.0.113.7")] {
        let flags = if trusted {
            vec!["--trusted-proxy".into(), "127.0.0.1".into()]
        } else {
            vec![]
        };
        let (mut s, audit) = run(flags, if trusted { "trusted" } else { "untrusted" });
        let r = common::client()
            .get(s.url("/v1/kv/c/f/k"))
            .header("Amphora-Read-Token", common::READ)
            .header("X-Forwarded-For", "198.51.100.1, 203.0.113.7")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(r.headers()["content-type"], "application/json");
        assert!(s.terminate(Duration::from_secs(15)).unwrap().success());
        let record: Value = serde_json::from_str(
            std::fs::read_to_string(&audit)
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(record["client"], want, "trusted proxy: {trusted}");
    }
}

/// A history request whose read token matches none of an entry's history counts as
/// a failed token check, as a read does (it answers 404, like a missing entry):
/// history is no way to guess tokens past the throttle.
#[tokio::test]
async fn wrong_tokens_on_history_count_as_token_failures() {
    let dir = tempfile::tempdir().unwrap();
    let s = common::Server::start(
        &dir.path().join("d"),
        &["--max-token-failures", "3", "--token-failure-block", "30s"],
    );
    let c = common::client();
    let r = c
        .put(s.url("/v1/kv/ctx/f/k"))
        .header("Amphora-Read-Token", common::READ)
        .header("Amphora-Write-Token", common::WRITE)
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let history = |token: &str| {
        c.get(s.url("/v1/kv/ctx/f/k/history"))
            .header("Amphora-Read-Token", token)
            .send()
    };
    assert_eq!(history(common::READ).await.unwrap().status(), 200);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(history("Guess1234x").await.unwrap().status().as_u16());
    }
    assert_eq!(seen, [404, 404, 404]);
    // Blocked now, even with the right token.
    assert_eq!(history(common::READ).await.unwrap().status(), 429);
    // A key that never had a history costs nothing: another context is not blocked
    // by its misses either.
    for _ in 0..5 {
        let r = c
            .get(s.url("/v1/kv/other/f/never/history"))
            .header("Amphora-Read-Token", "Guess1234x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
}
