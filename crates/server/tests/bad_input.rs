//! Bad input, each answered with a JSON error of the right status, never a 5xx,
//! and the server still serving afterwards.

mod common;

use common::{READ, SendJson, Server, WRITE, client};
use serde_json::Value;

struct Case {
    what: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn case(
    what: &'static str,
    method: &'static str,
    path: impl Into<String>,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        what,
        method,
        path: path.into(),
        headers: vec![],
        body: vec![],
        status,
        code,
    }
}

impl Case {
    fn tokens(mut self) -> Self {
        self.headers.push(("Amphora-Read-Token", READ.into()));
        self.headers.push(("Amphora-Write-Token", WRITE.into()));
        self
    }
    fn header(mut self, k: &'static str, v: &str) -> Self {
        self.headers.push((k, v.into()));
        self
    }
    fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }
}

fn comet(call: &str, params: &str) -> String {
    format!("/{call}?{params}")
}

#[tokio::test]
async fn every_bad_input_gets_a_json_error_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &[]);
    let c = client();
    let long = "x".repeat(257);
    let full =
        |k: &str| format!("contextID=c&family=f&Key={k}&readToken={READ}&writeToken={WRITE}");
    let two_mib = vec![b'a'; 2 * 1024 * 1024];
    let mut json_two_mib = b"\"".to_vec();
    json_two_mib.extend(vec![b'a'; 2 * 1024 * 1024]);
    json_two_mib.push(b'"');

    // Seed one entry so that wrong-token cases hit something real.
    let r = c
        .post(s.url(&comet("writeScope", &full("k"))))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let cases = vec![
        // COMET API.
        case(
            "missing contextID",
            "GET",
            comet("readScope", &format!("family=f&Key=k&readToken={READ}")),
            400,
            "missing_parameter",
        ),
        case(
            "missing Key",
            "POST",
            comet(
                "writeScope",
                &format!("contextID=c&family=f&readToken={READ}&writeToken={WRITE}"),
            ),
            400,
            "missing_parameter",
        ),
        case(
            "empty Key",
            "DELETE",
            comet("deleteScope", &full("")),
            400,
            "missing_parameter",
        ),
        case(
            "missing readToken",
            "GET",
            comet("enumerateScope", "contextID=c"),
            400,
            "missing_parameter",
        ),
        case(
            "name over the limit",
            "POST",
            comet("writeScope", &full(&long)),
            400,
            "invalid_name",
        ),
        case(
            "control character",
            "POST",
            comet("writeScope", &full("a%0Ab")),
            400,
            "invalid_name",
        ),
        case(
            "NUL in a name",
            "GET",
            comet(
                "readScope",
                &format!("contextID=c%00&family=f&Key=k&readToken={READ}"),
            ),
            400,
            "invalid_name",
        ),
        case(
            "invalid percent-encoding",
            "GET",
            comet(
                "readScope",
                &format!("contextID=%zz&family=f&Key=k&readToken={READ}"),
            ),
            400,
            "invalid_query",
        ),
        case(
            "truncated percent-encoding",
            "GET",
            comet(
                "readScope",
                &format!("contextID=c&family=f&Key=k%4&readToken={READ}"),
            ),
            400,
            "invalid_query",
        ),
        case(
            "percent-encoded bytes not UTF-8",
            "GET",
            comet(
                "readScope",
                &format!("contextID=%ff&family=f&Key=k&readToken={READ}"),
            ),
            400,
            "invalid_query",
        ),
        case(
            "parameter twice",
            "GET",
            comet(
                "readScope",
                &format!("contextID=c&contextID=d&family=f&Key=k&readToken={READ}"),
            ),
            400,
            "duplicate_parameter",
        ),
        case(
            "equal tokens",
            "POST",
            comet(
                "writeScope",
                &format!("contextID=c&family=f&Key=k2&readToken={READ}&writeToken={READ}"),
            ),
            400,
            "equal_tokens",
        ),
        case(
            "weak read token",
            "POST",
            comet(
                "writeScope",
                &format!("contextID=c&family=f&Key=k2&readToken=weak&writeToken={WRITE}"),
            ),
            400,
            "weak_token",
        ),
        case(
            "weak write token",
            "POST",
            comet(
                "writeScope",
                &format!("contextID=c&family=f&Key=k2&readToken={READ}&writeToken=password"),
            ),
            400,
            "weak_token",
        ),
        case(
            "wrong write token on modify",
            "POST",
            comet(
                "writeScope",
                &format!("contextID=c&family=f&Key=k&readToken={READ}&writeToken=Wrong1234"),
            ),
            403,
            "forbidden",
        ),
        case(
            "wrong write token on delete",
            "DELETE",
            comet(
                "deleteScope",
                &format!("contextID=c&family=f&Key=k&readToken={READ}&writeToken=Wrong1234"),
            ),
            403,
            "forbidden",
        ),
        case(
            "2 MiB COMET body",
            "POST",
            comet("writeScope", &full("big")),
            413,
            "body_too_large",
        )
        .body(two_mib.clone()),
        case(
            "body not UTF-8",
            "POST",
            comet("writeScope", &full("bin")),
            400,
            "bad_request",
        )
        .body(vec![0xff, 0xfe]),
        case(
            "wrong method on a COMET route",
            "PUT",
            comet("readScope", ""),
            405,
            "method_not_allowed",
        ),
        // Native API.
        case("invalid JSON", "PUT", "/v1/kv/c/f/k", 400, "invalid_json")
            .tokens()
            .body("{not json"),
        case("empty body", "PUT", "/v1/kv/c/f/k", 400, "invalid_json").tokens(),
        case(
            "2 MiB native body",
            "PUT",
            "/v1/kv/c/f/big",
            413,
            "body_too_large",
        )
        .tokens()
        .body(json_two_mib),
        case(
            "missing read token header",
            "GET",
            "/v1/kv/c/f/k",
            400,
            "missing_parameter",
        ),
        case(
            "missing write token header",
            "PUT",
            "/v1/kv/c/f/k",
            400,
            "missing_parameter",
        )
        .header("Amphora-Read-Token", READ)
        .body("1"),
        case(
            "token in the query string",
            "GET",
            format!("/v1/kv/c/f/k?readToken={READ}"),
            400,
            "token_in_query",
        )
        .tokens(),
        case(
            "name over the limit",
            "GET",
            format!("/v1/kv/c/f/{long}"),
            400,
            "invalid_name",
        )
        .tokens(),
        case(
            "control character in path",
            "GET",
            "/v1/kv/c/f/a%01b",
            400,
            "invalid_name",
        )
        .tokens(),
        case(
            "path not UTF-8",
            "GET",
            "/v1/kv/c/f/%ff",
            400,
            "bad_request",
        )
        .tokens(),
        case(
            "weak token header",
            "GET",
            "/v1/kv/c/f/k",
            400,
            "weak_token",
        )
        .header("Amphora-Read-Token", "weak"),
        case(
            "equal token headers",
            "PUT",
            "/v1/kv/c/f/k",
            400,
            "equal_tokens",
        )
        .header("Amphora-Read-Token", READ)
        .header("Amphora-Write-Token", READ)
        .body("1"),
        case(
            "wrong tokens on modify",
            "PUT",
            "/v1/kv/c/f/k",
            403,
            "forbidden",
        )
        .header("Amphora-Read-Token", READ)
        .header("Amphora-Write-Token", "Wrong1234")
        .body("1"),
        case("bad If-Match", "PUT", "/v1/kv/c/f/k", 400, "bad_request")
            .tokens()
            .header("If-Match", "yesterday")
            .body("1"),
        case(
            "bad If-None-Match",
            "PUT",
            "/v1/kv/c/f/k",
            400,
            "bad_request",
        )
        .tokens()
        .header("If-None-Match", "\"3\"")
        .body("1"),
        case(
            "bad ttl",
            "PUT",
            "/v1/kv/c/f/k?ttl=soon",
            400,
            "bad_request",
        )
        .tokens()
        .body("1"),
        case("zero ttl", "PUT", "/v1/kv/c/f/k?ttl=0s", 400, "bad_request")
            .tokens()
            .body("1"),
        case("bad limit", "GET", "/v1/kv/c/f?limit=0", 400, "bad_request").tokens(),
        case(
            "huge limit",
            "GET",
            "/v1/kv/c?limit=99999999999999999999",
            400,
            "bad_request",
        )
        .tokens(),
        case(
            "bad cursor",
            "GET",
            "/v1/kv/c/f?after=xyz",
            400,
            "bad_request",
        )
        .tokens(),
        case(
            "unknown route",
            "GET",
            "/v2/nothing",
            404,
            "route_not_found",
        ),
        case(
            "unknown method",
            "PATCH",
            "/v1/kv/c/f/k",
            405,
            "method_not_allowed",
        )
        .tokens(),
        case(
            "keepalive of a missing entry",
            "POST",
            "/v1/kv/c/f/none/keepalive",
            404,
            "not_found",
        )
        .tokens(),
    ];

    for case in cases {
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
        let mut req = c.request(method, s.url(&case.path)).body(case.body.clone());
        for (k, v) in &case.headers {
            req = req.header(*k, v);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.what));
        let status = r.status().as_u16();
        let ctype = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = r.text().await.unwrap();
        assert_eq!(status, case.status, "{}: {text}", case.what);
        assert_eq!(ctype.as_deref(), Some("application/json"), "{}", case.what);
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{}: not JSON: {text}", case.what));
        let is_comet = [
            "/readScope",
            "/writeScope",
            "/deleteScope",
            "/enumerateScope",
        ]
        .iter()
        .any(|p| case.path.starts_with(p));
        if is_comet {
            assert_eq!(body["status"], "error", "{}", case.what);
            assert_eq!(body["version"], "1.0.5", "{}", case.what);
            assert_eq!(body["value"]["error"], case.code, "{}: {text}", case.what);
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        } else {
            assert_eq!(body["error"]["code"], case.code, "{}: {text}", case.what);
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        if case.what.starts_with("missing") && is_comet {
            let named = ["contextID", "Key", "readToken"]
                .iter()
                .any(|p| body["message"].as_str().unwrap().contains(p));
            assert!(
                named,
                "{}: the message names the parameter: {text}",
                case.what
            );
        }
    }

    // Nothing was lost and the server still serves.
    let r: Value = c
        .get(s.url(&format!(
            "/readScope?contextID=c&family=f&Key=k&readToken={READ}"
        )))
        .json_body()
        .await;
    assert_eq!(r["value"]["value"], "v");
    assert_eq!(c.get(s.url("/healthz")).send().await.unwrap().status(), 200);
    let metrics = common::metrics_text(&s).await;
    assert!(
        !metrics.contains("status=\"5"),
        "no 5xx was ever answered:\n{metrics}"
    );
}

#[tokio::test]
async fn weak_tokens_pass_when_the_check_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &["--check-token-strength", "false"]);
    let r = client()
        .post(s.url("/writeScope?contextID=c&family=f&Key=k&readToken=r&writeToken=w"))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // COMET's own variable works too.
    let dir2 = tempfile::tempdir().unwrap();
    let s2 = Server::start_with_env(
        &dir2.path().join("d"),
        &[],
        &[("COMET_CHECK_TOKEN_STRENGTH", "false")],
    );
    let r = client()
        .post(s2.url("/writeScope?contextID=c&family=f&Key=k&readToken=r&writeToken=w"))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn plain_http_off_loopback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amphora"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to serve plain HTTP"), "{err}");
}

/// Values up to the limit are stored whole, in their own form: with a raised limit,
/// a 20 MiB COMET value, beyond the 16 MiB the server drains of an oversized body
/// (it used to be cut there and answered 200); and a COMET value of exactly the
/// limit whose quotes and backslashes make its stored form (a JSON string) longer
/// (it used to be refused as too large).
#[tokio::test]
async fn values_up_to_the_limit_are_stored_whole() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 24 * 1024 * 1024;
    let s = Server::start(
        &dir.path().join("d"),
        &["--max-value-bytes", &limit.to_string()],
    );
    let c = client();
    let write = |k: &str| {
        comet(
            "writeScope",
            &format!("contextID=c&family=f&Key={k}&readToken={READ}&writeToken={WRITE}"),
        )
    };
    let read = |k: &str| {
        comet(
            "readScope",
            &format!("contextID=c&family=f&Key={k}&readToken={READ}"),
        )
    };
    let values = [
        ("big", "x".repeat(20 * 1024 * 1024)),
        ("quoted", "\"\\".repeat(limit / 2)),
    ];
    for (key, value) in &values {
        let r = c
            .post(s.url(&write(key)))
            .body(value.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{key}: {}", r.text().await.unwrap());
        let v: Value = c.get(s.url(&read(key))).json_body().await;
        let stored = v["value"]["value"].as_str().unwrap_or_default();
        assert_eq!(stored.len(), value.len(), "{key}");
        assert!(
            stored == value.as_str(),
            "{key}: the value came back changed"
        );
    }
    // (A body over the limit is refused with 413: see the case "2 MiB COMET body"
    // above. Past the 16 MiB drained, the refusal may reach a client that is still
    // sending as a reset connection, so none is sent here.)
}

/// COMET's enumerateScope has no pagination: it refuses past `--max-enumerate`
/// visible entries, and past `--max-enumerate × 10 + 100` entries read, so a caller
/// who sees few of a context's entries cannot make the server read all of them.
#[tokio::test]
async fn an_enumeration_is_bounded_in_what_it_answers_and_what_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &["--max-enumerate", "3"]);
    let c = client();
    let write = |ctx: &str, family: &str, key: &str, read: &str| {
        let url = s.url(&comet(
            "writeScope",
            &format!(
                "contextID={ctx}&family={family}&Key={key}&readToken={read}&writeToken={WRITE}"
            ),
        ));
        let c = c.clone();
        async move {
            let r = c.post(url).body("v").send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
    };
    // The status and the envelope of an enumeration of `ctx`.
    let enumerate = |ctx: &str| {
        let request = c.get(s.url(&comet(
            "enumerateScope",
            &format!("contextID={ctx}&readToken={READ}"),
        )));
        async move {
            let r = request.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let answered = |(status, body): (reqwest::StatusCode, Value)| {
        assert_eq!(status, 200, "{body}");
        body["value"]["entries"].as_array().map_or(0, Vec::len)
    };
    let refused = |(status, body): (reqwest::StatusCode, Value), says: &str| {
        assert_eq!(status, 413, "{body}");
        assert_eq!(body["status"], "error", "{body}");
        assert_eq!(body["value"]["error"], "too_many_entries", "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}");
    };
    // Three visible entries are answered; a fourth is one too many.
    for key in ["a", "b", "c"] {
        write("c", "f", key, READ).await;
    }
    assert_eq!(answered(enumerate("c").await), 3);
    write("c", "f", "d", READ).await;
    refused(enumerate("c").await, "at most 3 entries");
    // Two visible entries behind 120 others are answered (122 read, within 130);
    // behind 200 others they are not.
    for i in 0..200 {
        write("d", "a", &format!("k{i:03}"), "OtherRead9").await;
        if i == 119 {
            write("d", "z", "x", READ).await;
            write("d", "z", "y", READ).await;
            assert_eq!(answered(enumerate("d").await), 2);
        }
    }
    refused(enumerate("d").await, "reads at most 130 entries");
    // Named, the family is answered.
    let r = c
        .get(s.url(&comet(
            "enumerateScope",
            &format!("contextID=d&family=z&readToken={READ}"),
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
