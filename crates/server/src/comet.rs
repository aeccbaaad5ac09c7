//! The COMET-compatible API, wire for wire as `shared/design/COMET-API.md` says:
//! `/writeScope`, `/readScope`, `/enumerateScope`, `/deleteScope`, `/getVersion`,
//! also under `/v1/`. Every answer is the COMET envelope
//! `{"status", "message", "value", "version"}`.

use crate::error::ApiError;
use crate::http::{CometCaller, Shared, read_body};
use crate::query::Query;
use crate::service::{Entry, WriteOptions};
use amphora_model::EntryKey;
use axum::Json;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

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
fn comet_string(e: &Entry) -> String {
    match serde_json::from_str::<Value>(&e.value) {
        Ok(Value::String(s)) => s,
        _ => e.value.clone(),
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
            state
                .service
                .write(&caller, &key, value, read, write, &WriteOptions::default())
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
    respond(
        async {
            let q = Query::parse(raw.as_deref())?;
            let key = entry_key(&state, &q)?;
            let read = q.require("readToken")?;
            Ok(match state.service.read(&caller, &key, read).await? {
                Some(e) => json!({
                    "contextId": e.key.context, "family": e.key.family,
                    "key": e.key.key, "value": comet_string(&e),
                }),
                None => json!({}),
            })
        }
        .await,
    )
}

/// `GET /enumerateScope`: the visible entries of a context, or of one family.
pub async fn enumerate_scope(
    State(state): State<Shared>,
    CometCaller(caller): CometCaller,
    RawQuery(raw): RawQuery,
) -> Response {
    respond(
        async {
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
            Ok(match family {
                Some(f) => json!({
                    "contextId": c, "family": f,
                    "entries": entries.iter()
                        .map(|e| json!({"key": e.key.key, "value": comet_string(e)}))
                        .collect::<Vec<_>>(),
                }),
                None => json!({
                    "contextId": c,
                    "entries": entries.iter()
                        .map(|e| json!({"family": e.key.family, "key": e.key.key, "value": comet_string(e)}))
                        .collect::<Vec<_>>(),
                }),
            })
        }
        .await,
    )
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
