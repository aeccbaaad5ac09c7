//! The COMET access policy over real TLS handshakes against the real binary: every
//! row of the policy table, for every kind of client, over both APIs.

mod common;

use common::{ClientKind, Pki, READ, SendJson, WRITE, start_with};
use serde_json::{Value, json};

/// Which API a check goes through.
#[derive(Debug, Clone, Copy)]
enum Api {
    Native,
    Comet,
}

struct Target<'a> {
    base: &'a str,
    api: Api,
    context: &'a str,
}

impl Target<'_> {
    async fn write(&self, c: &reqwest::Client, key: &str, write_token: &str) -> (u16, Value) {
        let r = match self.api {
            Api::Native => c
                .put(format!("{}/v1/kv/{}/f/{key}", self.base, self.context))
                .header("Amphora-Read-Token", READ)
                .header("Amphora-Write-Token", write_token)
                .json(&json!({"v": key}))
                .send(),
            Api::Comet => c
                .post(format!(
                    "{}//writeScope?contextID={}&family=f&Key={key}&readToken={READ}&writeToken={write_token}",
                    self.base, self.context
                ))
                .body(format!("value of {key}"))
                .send(),
        };
        let r = r.await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn read(&self, c: &reqwest::Client, key: &str) -> bool {
        match self.api {
            Api::Native => {
                let r = c
                    .get(format!("{}/v1/kv/{}/f/{key}", self.base, self.context))
                    .header("Amphora-Read-Token", READ)
                    .send()
                    .await
                    .unwrap();
                r.status() == 200
            }
            Api::Comet => {
                let v: Value = c
                    .get(format!(
                        "{}/readScope?contextID={}&family=f&Key={key}&readToken={READ}",
                        self.base, self.context
                    ))
                    .json_body()
                    .await;
                v["value"]["key"] == key
            }
        }
    }

    async fn list(&self, c: &reqwest::Client) -> Vec<String> {
        let v: Value = match self.api {
            Api::Native => {
                c.get(format!("{}/v1/kv/{}", self.base, self.context))
                    .header("Amphora-Read-Token", READ)
                    .json_body()
                    .await
            }
            Api::Comet => {
                let v: Value = c
                    .get(format!(
                        "{}/enumerateScope?contextID={}&readToken={READ}",
                        self.base, self.context
                    ))
                    .json_body()
                    .await;
                v["value"].clone()
            }
        };
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["key"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn delete(&self, c: &reqwest::Client, key: &str) -> (u16, Value) {
        let r = match self.api {
            Api::Native => c
                .delete(format!("{}/v1/kv/{}/f/{key}", self.base, self.context))
                .header("Amphora-Read-Token", READ)
                .header("Amphora-Write-Token", WRITE)
                .send(),
            Api::Comet => c
                .delete(format!(
                    "{}/deleteScope?contextID={}&family=f&Key={key}&readToken={READ}&writeToken={WRITE}",
                    self.base, self.context
                ))
                .send(),
        };
        let r = r.await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }
}

fn code(api: Api, body: &Value) -> Value {
    match api {
        Api::Native => body["error"]["code"].clone(),
        Api::Comet => body["value"]["error"].clone(),
    }
}

/// Runs every row of the policy table for every client kind; `certs_checked` says
/// whether the server enforces the certificate column.
async fn policy_table(pki: &Pki, base: &str, certs_checked: bool) {
    let trusted = pki.client(ClientKind::Trusted);
    for api in [Api::Native, Api::Comet] {
        for kind in ClientKind::ALL {
            let context = format!("{api:?}-{kind:?}");
            let t = Target {
                base,
                api,
                context: &context,
            };
            let c = pki.client(kind);
            let may = kind == ClientKind::Trusted || !certs_checked;
            let what = format!("{api:?}, {kind:?}, certificates checked: {certs_checked}");

            // writeScope, create a new entry: trusted certificate, tokens set.
            let (status, body) = t.write(&c, "created", WRITE).await;
            if may {
                assert!(
                    status == 200 || status == 201,
                    "create: {what}: {status} {body}"
                );
            } else {
                assert_eq!(status, 403, "create: {what}: {body}");
                assert_eq!(code(api, &body), "client_certificate_required", "{what}");
                assert!(
                    !t.read(&trusted, "created").await,
                    "refused create left nothing: {what}"
                );
            }

            // An entry created by a trusted client, for the other rows.
            let (status, _) = t.write(&trusted, "shared", WRITE).await;
            assert!(status == 200 || status == 201, "{what}");

            // writeScope, modify: certificate optional, both tokens must match.
            let (status, body) = t.write(&c, "shared", WRITE).await;
            assert_eq!(status, 200, "modify: {what}: {body}");
            let (status, body) = t.write(&c, "shared", "WrongWrite9").await;
            assert_eq!(
                (status, code(api, &body)),
                (403, json!("forbidden")),
                "modify, wrong token: {what}"
            );

            // readScope and enumerateScope: certificate optional, read token must match.
            assert!(t.read(&c, "shared").await, "read: {what}");
            assert!(
                t.list(&c).await.contains(&"shared".to_owned()),
                "list: {what}"
            );

            // deleteScope: trusted certificate and both tokens.
            let (status, body) = t.delete(&c, "shared").await;
            if may {
                assert_eq!(status, 200, "delete: {what}: {body}");
                assert!(!t.read(&trusted, "shared").await, "deleted: {what}");
            } else {
                assert_eq!(status, 403, "delete: {what}: {body}");
                assert_eq!(code(api, &body), "client_certificate_required", "{what}");
                assert!(
                    t.read(&trusted, "shared").await,
                    "refused delete changed nothing: {what}"
                );
            }
        }
    }
}

#[tokio::test]
async fn policy_table_with_client_certificates_checked() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let s = start_with(&dir.path().join("d"), &pki.server_flags(), &[]);
    assert!(s.base.starts_with("https://"), "{}", s.base);
    policy_table(&pki, &s.base, true).await;
    // The reasons a certificate was not trusted reach the log.
    let log = s.log_text();
    assert!(log.contains("client certificate not trusted"), "{log}");
}

#[tokio::test]
async fn certificate_column_ignored_when_checking_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let mut flags = pki.server_flags();
    flags.extend(["--check-client-cert".into(), "false".into()]);
    let s = start_with(&dir.path().join("d"), &flags, &[]);
    policy_table(&pki, &s.base, false).await;

    // COMET's own variable switches it off too.
    let s2 = start_with(
        &dir.path().join("d2"),
        &pki.server_flags(),
        &[("COMET_CHECK_CLIENT_CERT", "false")],
    );
    let t = Target {
        base: &s2.base,
        api: Api::Comet,
        context: "env",
    };
    let (status, body) = t.write(&pki.client(ClientKind::NoCert), "k", WRITE).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn plain_http_is_not_spoken_on_a_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let s = start_with(&dir.path().join("d"), &pki.server_flags(), &[]);
    let plain = s.base.replace("https://", "http://");
    assert!(
        common::client()
            .get(format!("{plain}/healthz"))
            .send()
            .await
            .is_err()
    );
    // And the server still serves TLS clients afterwards.
    let r = pki
        .client(ClientKind::NoCert)
        .get(s.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
