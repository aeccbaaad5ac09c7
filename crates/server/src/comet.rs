//! The COMET-compatible API, wire for wire as `shared/design/COMET-API.md` says:
//! `/writeScope`, `/readScope`, `/enumerateScope`, `/deleteScope`, `/getVersion`,
//! also under `/v1/`. Every answer is the COMET envelope
//! `{"status", "message", "value", "version"}`.

use crate::error::ApiError;
use crate::http::{CometCaller, Shared, read_body};
use crate::query::Query;
use crate::service::Caller;
use crate::service::{Entry, WriteOptions};
use amphora_model::EntryKey;
use axum::Json;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use std::borrow::Cow;

/// The COMET server version Amphora emulates.
pub const COMET_VERSION: &str = "1.0.5";
/// The COMET API version Amphora emulates.
pub const COMET_API_VERSION: &str = "1.0.0";

fn ok(value: Value) -> Response {
    Json(json!({"status": "OK", "message": "success", "value": value, "version": COMET_VERSION}))
        .into_response()
}

/// Renders an error in the COMET envelope, with the status of the error table.
pub fn error(e: ApiError) -> Response {
    let (status, code) = e.status_and_code();
    let mut response = (
        status,
        Json(json!({
            "status": "error",
            "message": e.public_message(),
            "value": {"error": code},
            "version": COMET_VERSION,
        })),
    )
        .into_response();
    crate::http::error_headers(&mut response, &e);
    response
}

fn respond(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(v) => ok(v),
        Err(e) => error(e),
    }
}

/// The string COMET clients get back: what they posted, byte for byte. A value
/// written through the native API (any JSON) is returned as its JSON text.
fn comet_string(e: &Entry) -> Cow<'_, str> {
    // A JSON text parses as a `String` exactly when it is a JSON string.
    match serde_json::from_str::<String>(&e.value) {
        Ok(s) => Cow::Owned(s),
        Err(_) => Cow::Borrowed(&e.value),
    }
}

/// The entry named by `contextID`, `family` and `Key`, validated.
fn entry_key(state: &Shared, q: &Query) -> Result<EntryKey, ApiError> {
    let (c, f, k) = (
        q.require("contextID")?,
        q.require("family")?,
        q.require("Key")?,
    );
    state.service.entry_key(c, f, k)
}

/// `POST /writeScope`: create or modify an entry; the body is stored verbatim.
pub async fn write_scope(
    State(state): State<Shared>,
    CometCaller(caller): CometCaller,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        async {
            let q = Query::parse(raw.as_deref())?;
            let key = entry_key(&state, &q)?;
            let (read, write) = (q.require("readToken")?, q.require("writeToken")?);
            let limit = state.service.settings().limits.max_value_bytes;
            let bytes = read_body(&headers, body, limit).await?;
            state.service.check_value(bytes.len())?;
            let text = String::from_utf8(bytes.to_vec())
                .map_err(|_| ApiError::BadRequest("the value must be UTF-8 text".into()))?;
            let value = serde_json::to_string(&text).expect("a string always serializes");
            // The limit is on the text as sent (checked above), not on its escaped form.
            let options = WriteOptions {
                size_checked: true,
                ..WriteOptions::default()
            };
            state
                .service
                .write(&caller, &key, value, read, write, &options)
                .await?;
            Ok(json!({"Success": "Scope written"}))
        }
        .await,
    )
}

/// `GET /readScope`: one entry, or `{}` when it is not visible with this read token.
pub async fn read_scope(
    State(state): State<Shared>,
    CometCaller(caller): CometCaller,
    RawQuery(raw): RawQuery,
) -> Response {
    read_scope_answer(&state, &caller, raw.as_deref()).await
}

/// What `GET /readScope` answers for the query string `raw`. The router's handler
/// and the hot route (hot.rs) both answer through it.
pub(crate) async fn read_scope_answer(
    state: &Shared,
    caller: &Caller,
    raw: Option<&str>,
) -> Response {
    let found = async {
        let q = Query::parse(raw)?;
        let key = entry_key(state, &q)?;
        let read = q.require("readToken")?;
        state.service.read(caller, key, read).await
    }
    .await;
    match found.and_then(|entry| read_answer(entry.as_ref())) {
        Ok(response) => response,
        Err(e) => error(e),
    }
}

/// A success in the COMET envelope, written straight from `value`. The fields are
/// in the order of the `json!` envelope of [`ok`] (serde_json's map sorts its
/// keys), so both give the same bytes.
#[derive(Serialize)]
struct Envelope<V> {
    message: &'static str,
    status: &'static str,
    value: V,
    version: &'static str,
}

/// A success in the COMET envelope around `value`, serialized into a buffer of about
/// `hint` bytes.
fn ok_typed<V: Serialize>(value: V, hint: usize) -> Result<Response, ApiError> {
    crate::native::json_ok(
        &Envelope {
            message: "success",
            status: "OK",
            value,
            version: COMET_VERSION,
        },
        hint,
    )
}

/// The `value` of a `readScope` answer: the entry's names and value, or `{}`.
#[derive(Serialize)]
#[serde(untagged)]
enum ScopeRead<'e> {
    Found {
        #[serde(rename = "contextId")]
        context_id: &'e str,
        family: &'e str,
        key: &'e str,
        value: Cow<'e, str>,
    },
    Absent {},
}

fn read_answer(entry: Option<&Entry>) -> Result<Response, ApiError> {
    let (value, hint) = match entry {
        Some(e) => (
            ScopeRead::Found {
                context_id: &e.key.context,
                family: &e.key.family,
                key: &e.key.key,
                value: comet_string(e),
            },
            // The envelope, the names and the value, with room for escapes.
            128 + e.key.context.len()
                + e.key.family.len()
                + e.key.key.len()
                + e.value.len() * 9 / 8,
        ),
        None => (ScopeRead::Absent {}, 96),
    };
    ok_typed(value, hint)
}

/// `GET /enumerateScope`: the visible entries of a context, or of one family.
pub async fn enumerate_scope(
    State(state): State<Shared>,
    CometCaller(caller): CometCaller,
    RawQuery(raw): RawQuery,
) -> Response {
    let answer = async {
        let q = Query::parse(raw.as_deref())?;
        let c = q.require("contextID")?;
        let read = q.require("readToken")?;
        state.service.context_name(c)?;
        let family = match q.get("family") {
            Some(f) if !f.is_empty() => {
                state.service.family_name(f)?;
                Some(f)
            }
            _ => None,
        };
        let entries = state.service.enumerate(&caller, c, family, read).await?;
        enumerate_answer(c, family, &entries)
    }
    .await;
    answer.unwrap_or_else(error)
}

/// The `value` of an `enumerateScope` answer; `family` is left out when the whole
/// context was asked for, and then each entry carries its own.
#[derive(Serialize)]
struct Enumeration<'e> {
    #[serde(rename = "contextId")]
    context_id: &'e str,
    entries: Vec<Enumerated<'e>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    family: Option<&'e str>,
}

#[derive(Serialize)]
struct Enumerated<'e> {
    #[serde(skip_serializing_if = "Option::is_none")]
    family: Option<&'e str>,
    key: &'e str,
    value: Cow<'e, str>,
}

/// An `enumerateScope` answer, written straight from the entries (see [`Envelope`]).
fn enumerate_answer(
    context: &str,
    family: Option<&str>,
    entries: &[Entry],
) -> Result<Response, ApiError> {
    let hint = 128
        + entries
            .iter()
            .map(|e| 40 + e.key.family.len() + e.key.key.len() + e.value.len() * 9 / 8)
            .sum::<usize>();
    let value = Enumeration {
        context_id: context,
        entries: entries
            .iter()
            .map(|e| Enumerated {
                family: family.is_none().then_some(e.key.family.as_str()),
                key: &e.key.key,
                value: comet_string(e),
            })
            .collect(),
        family,
    };
    ok_typed(value, hint)
}

/// `DELETE /deleteScope`: removes an entry for every reader at once.
pub async fn delete_scope(
    State(state): State<Shared>,
    CometCaller(caller): CometCaller,
    RawQuery(raw): RawQuery,
) -> Response {
    respond(
        async {
            let q = Query::parse(raw.as_deref())?;
            let key = entry_key(&state, &q)?;
            let (read, write) = (q.require("readToken")?, q.require("writeToken")?);
            state.service.delete(&caller, &key, read, write).await?;
            Ok(json!({"Success": "Scope deleted"}))
        }
        .await,
    )
}

/// `GET /getVersion`.
pub async fn get_version() -> Response {
    ok(json!({"Comet version": COMET_VERSION, "Comet API version": COMET_API_VERSION}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn entry(value: &str) -> Entry {
        Entry {
            key: EntryKey {
                context: "ctx \"q\"".into(),
                family: "fam/é".into(),
                key: "k\\1".into(),
            },
            value: value.into(),
            revision: 7,
            created_at_ms: 1,
            updated_at_ms: 2,
            expires_at_ms: None,
        }
    }

    async fn bytes(r: Response) -> Vec<u8> {
        r.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    /// The bytes the `json!` envelope gave for a read before reads were written
    /// straight from the entry.
    fn by_value_tree(e: Option<&Entry>) -> Vec<u8> {
        let value = match e {
            Some(e) => json!({
                "contextId": e.key.context, "family": e.key.family,
                "key": e.key.key, "value": comet_string(e),
            }),
            None => json!({}),
        };
        serde_json::to_vec(
            &json!({"status": "OK", "message": "success", "value": value, "version": COMET_VERSION}),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_read_answer_is_byte_for_byte_the_value_tree_envelope() {
        let stored = [
            // Written through COMET: a JSON string, given back decoded.
            r#""plain text""#,
            r#""quote \" backslash \\ newline \n tab \t unicode \u00e9 \ud83d\ude00""#,
            r#""""#,
            // Written through the native API: any JSON, given back as its text.
            r#"{"a":[1,"b",null]}"#,
            "42",
            " \"spaced\" ",
        ];
        for value in stored {
            let e = entry(value);
            let r = read_answer(Some(&e)).unwrap();
            assert_eq!(r.status(), axum::http::StatusCode::OK);
            assert_eq!(r.headers()["content-type"], "application/json");
            assert_eq!(
                String::from_utf8(bytes(r).await).unwrap(),
                String::from_utf8(by_value_tree(Some(&e))).unwrap(),
                "{value}"
            );
        }
        let absent = bytes(read_answer(None).unwrap()).await;
        assert_eq!(absent, by_value_tree(None));
        assert_eq!(
            absent,
            br#"{"message":"success","status":"OK","value":{},"version":"1.0.5"}"#
        );
    }

    #[tokio::test]
    async fn an_enumeration_is_byte_for_byte_the_value_tree_envelope() {
        let entries: Vec<Entry> = [r#""a \"q\" \u00e9""#, r#"{"n":[1,2]}"#, r#""""#]
            .into_iter()
            .map(entry)
            .collect();
        for family in [Some("fam/é"), None] {
            for entries in [&entries[..], &[]] {
                let value = match family {
                    Some(f) => json!({
                        "contextId": "ctx", "family": f,
                        "entries": entries.iter()
                            .map(|e| json!({"key": e.key.key, "value": comet_string(e)}))
                            .collect::<Vec<_>>(),
                    }),
                    None => json!({
                        "contextId": "ctx",
                        "entries": entries.iter()
                            .map(|e| json!({"family": e.key.family, "key": e.key.key, "value": comet_string(e)}))
                            .collect::<Vec<_>>(),
                    }),
                };
                let tree = serde_json::to_vec(&json!({
                    "status": "OK", "message": "success", "value": value, "version": COMET_VERSION,
                }))
                .unwrap();
                let r = enumerate_answer("ctx", family, entries).unwrap();
                assert_eq!(r.headers()["content-type"], "application/json");
                assert_eq!(
                    String::from_utf8(bytes(r).await).unwrap(),
                    String::from_utf8(tree).unwrap(),
                    "{family:?}, {} entries",
                    entries.len()
                );
            }
        }
    }

    #[test]
    fn comet_strings_are_decoded_json_strings_and_anything_else_verbatim() {
        assert_eq!(comet_string(&entry(r#""a\"b""#)), "a\"b");
        assert_eq!(comet_string(&entry(r#"["a"]"#)), r#"["a"]"#);
        assert_eq!(comet_string(&entry("not json")), "not json");
    }
}
