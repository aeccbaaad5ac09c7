//! The native JSON API under `/v1/kv`. Tokens travel in the `Amphora-Read-Token` and
//! `Amphora-Write-Token` headers, never in the URL.

use crate::error::ApiError;
use crate::http::{NativeCaller, Shared, read_body};
use crate::query::Query;
use crate::service::{Caller, Entry, WriteOptions, Written};
use amphora_model::{EntryKey, context_prefix, family_prefix};
use amphora_store::{EventKind, Revision};
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;
use std::time::{Duration, UNIX_EPOCH};

/// The header carrying the read token.
pub const READ_TOKEN: &str = "amphora-read-token";
/// The header carrying the write token.
pub const WRITE_TOKEN: &str = "amphora-write-token";

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

pub(crate) fn rfc3339(ms: u64) -> String {
    Rfc3339(ms).to_string()
}

/// A time in milliseconds since the epoch, shown and serialized as RFC 3339 with
/// milliseconds (`2026-12-06T02:41:07.123Z`, as `humantime` writes it), without a
/// `String` of its own.
///
/// A list of 100 entries writes 200 of them. `humantime`'s formatter, called through
/// `collect_str` (which escapes what it writes piece by piece), took 7 % of the
/// server's CPU listing 100-entry families; this one fills 24 bytes on the stack,
/// two digits at a time. Measured with the harness (`list` over 10 families of 100
/// entries, alternating 6 s runs, 2 rounds each): 136 -> 120 µs of server CPU per
/// list, 11.5k -> 12.9k lists per second.
#[derive(Clone, Copy)]
pub(crate) struct Rfc3339(pub u64);

impl Rfc3339 {
    /// The text, for years up to 9999 (RFC 3339 has four digits for the year).
    fn text(self) -> Option<[u8; 24]> {
        let secs = self.0 / 1000;
        let (year, month, day) = civil_from_days(secs / 86_400);
        if year > 9999 {
            return None;
        }
        let of_day = secs % 86_400;
        let ms = self.0 % 1000;
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let pairs = [
            (0, year / 100),
            (2, year % 100),
            (5, month),
            (8, day),
            (11, of_day / 3600),
            (14, of_day / 60 % 60),
            (17, of_day % 60),
            (21, ms % 100),
        ];
        for (at, n) in pairs {
            out[at..at + 2].copy_from_slice(&TWO_DIGITS[n as usize]);
        }
        out[20] = b'0' + (ms / 100) as u8;
        Some(out)
    }
}

/// `00` to `99`, so that a timestamp is written two digits at a time.
const TWO_DIGITS: [[u8; 2]; 100] = {
    let mut t = [[0; 2]; 100];
    let mut i = 0;
    while i < 100 {
        t[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    t
};

/// The proleptic Gregorian date `days` after 1970-01-01, as (year, month, day):
/// Howard Hinnant's `civil_from_days`, for days on or after the epoch.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.text() {
            Some(text) => f.write_str(std::str::from_utf8(&text).map_err(|_| std::fmt::Error)?),
            None => {
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(self.0)).fmt(f)
            }
        }
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.text() {
            Some(text) => s.serialize_str(std::str::from_utf8(&text).map_err(|_| {
                serde::ser::Error::custom("a timestamp's text is ASCII digits and signs")
            })?),
            None => s.collect_str(self),
        }
    }
}

/// Room for an entry's body beyond its value and names: the field names, three
/// timestamps and a revision (about 170 bytes).
const ENTRY_BODY_EXTRA: usize = 192;

/// A `200 OK` JSON response, serialized into one buffer allocated at about the
/// right size (`Json` grows its buffer from 128 bytes).
pub(crate) fn json_ok<T: Serialize>(body: &T, size_hint: usize) -> Result<Response, ApiError> {
    let mut buf = Vec::with_capacity(size_hint);
    serde_json::to_writer(&mut buf, body)
        .map_err(|e| ApiError::Internal(format!("cannot serialize a response: {e}")))?;
    Ok(json_bytes_ok(buf))
}

pub(crate) fn header_token<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
) -> Result<&'h str, ApiError> {
    token_value(headers.get(name).map(HeaderValue::as_bytes), name)
}

/// [`header_token`], from the raw value of the header `name` (the first, if several).
pub(crate) fn token_value<'h>(
    value: Option<&'h [u8]>,
    name: &'static str,
) -> Result<&'h str, ApiError> {
    match value {
        None => Err(ApiError::MissingParameter(name_of(name))),
        Some(v) => match crate::http::visible_ascii(v) {
            Some("") => Err(ApiError::MissingParameter(name_of(name))),
            Some(s) => Ok(s),
            None => Err(ApiError::BadRequest(format!(
                "header {name} must be visible ASCII"
            ))),
        },
    }
}

fn name_of(header: &'static str) -> &'static str {
    if header == READ_TOKEN {
        "Amphora-Read-Token header"
    } else {
        "Amphora-Write-Token header"
    }
}

/// Parses the query string and refuses tokens in it.
pub(crate) fn query(raw: Option<String>) -> Result<Query, ApiError> {
    let q = Query::parse(raw.as_deref())?;
    if q.has_any(&["readToken", "writeToken", READ_TOKEN, WRITE_TOKEN, "token"]) {
        return Err(ApiError::TokenInQuery);
    }
    Ok(q)
}

pub(crate) fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(t)| t)
        .map_err(|e| ApiError::BadRequest(format!("invalid path: {}", e.body_text())))
}

/// The entry a request names, validated, and its query string (without tokens).
pub struct EntryTarget {
    key: EntryKey,
    query: Query,
}

impl FromRequestParts<Shared> for EntryTarget {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let p = Path::<(String, String, String)>::from_request_parts(parts, state).await;
        let (c, f, k) = path(p)?;
        let query = query(parts.uri.query().map(str::to_owned))?;
        let key = state.service.entry_key(&c, &f, &k)?;
        Ok(EntryTarget { key, query })
    }
}

/// The read token from its header (without copying the other headers, as the
/// `HeaderMap` extractor would).
pub struct ReadToken(String);

impl FromRequestParts<Shared> for ReadToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &Shared) -> Result<Self, ApiError> {
        header_token(&parts.headers, READ_TOKEN).map(|t| ReadToken(t.to_owned()))
    }
}

/// Both tokens from the headers.
fn token_pair(headers: &HeaderMap) -> Result<(&str, &str), ApiError> {
    Ok((
        header_token(headers, READ_TOKEN)?,
        header_token(headers, WRITE_TOKEN)?,
    ))
}

/// Writes an entry's body, `{"context", "family", "key", "value", "revision",
/// "created_at", "updated_at", "expires_at"}`, at the end of `out`.
///
/// By hand rather than through `serde`: the stored value is JSON text already
/// (checked when it was written, see [`Record::value`](amphora_model::Record)), so it
/// is copied as it is instead of being parsed again into a `RawValue` on every read,
/// and the field names are written as constants.
pub(crate) fn write_entry_body(out: &mut Vec<u8>, e: &Entry) {
    debug_assert!(
        serde_json::from_str::<&RawValue>(&e.value).is_ok(),
        "a stored value is JSON text"
    );
    out.extend_from_slice(b"{\"context\":");
    write_json_str(out, &e.key.context);
    out.extend_from_slice(b",\"family\":");
    write_json_str(out, &e.key.family);
    out.extend_from_slice(b",\"key\":");
    write_json_str(out, &e.key.key);
    out.extend_from_slice(b",\"value\":");
    out.extend_from_slice(e.value.as_bytes());
    out.extend_from_slice(b",\"revision\":");
    out.extend_from_slice(itoa::Buffer::new().format(e.revision).as_bytes());
    out.extend_from_slice(b",\"created_at\":");
    write_time(out, Rfc3339(e.created_at_ms));
    out.extend_from_slice(b",\"updated_at\":");
    write_time(out, Rfc3339(e.updated_at_ms));
    out.extend_from_slice(b",\"expires_at\":");
    match e.expires_at_ms {
        Some(ms) => write_time(out, Rfc3339(ms)),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
}

/// Writes `s` as a JSON string, quoted and escaped.
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // A `str` into a `Vec`: neither serializing nor writing can fail.
    let _ = serde_json::to_writer(out, s);
}

/// Writes a time as a JSON string.
fn write_time(out: &mut Vec<u8>, t: Rfc3339) {
    out.push(b'"');
    match t.text() {
        Some(text) => out.extend_from_slice(&text),
        None => out.extend_from_slice(t.to_string().as_bytes()),
    }
    out.push(b'"');
}

/// A `200 OK` response of JSON text already written.
fn json_bytes_ok(body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// What an entry's body is likely to take, for [`json_ok`].
pub(crate) fn entry_size(e: &Entry) -> usize {
    let k = &e.key;
    e.value.len() + k.context.len() + k.family.len() + k.key.len() + ENTRY_BODY_EXTRA
}

fn etag(revision: u64) -> HeaderValue {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(revision).as_bytes();
    let mut quoted = [b'"'; 22];
    quoted[1..=digits.len()].copy_from_slice(digits);
    HeaderValue::from_bytes(&quoted[..digits.len() + 2]).expect("digits and quotes are valid")
}

/// `GET /v1/kv/{context}/{family}/{key}`, through the router (see `read_entry`).
pub async fn get(
    State(state): State<Shared>,
    NativeCaller(caller): NativeCaller,
    EntryTarget { key, .. }: EntryTarget,
    ReadToken(read): ReadToken,
) -> Result<Response, ApiError> {
    read_entry(&state, &caller, key, &read).await
}

/// The answer to `GET /v1/kv/{context}/{family}/{key}`, wherever the request was
/// dispatched: by the router ([`get`]) or by [`crate::hot::HotRoute`].
pub(crate) async fn read_entry(
    state: &Shared,
    caller: &Caller,
    key: EntryKey,
    read: &str,
) -> Result<Response, ApiError> {
    let entry = state
        .service
        .read(caller, key, read)
        .await?
        .ok_or(ApiError::NotFound)?;
    let mut body = Vec::with_capacity(entry_size(&entry));
    write_entry_body(&mut body, &entry);
    Ok(json_answer(StatusCode::OK, entry.revision, body))
}

/// A JSON answer about one entry at `revision` (its etag): what the connection
/// loop writes as `conn::write_json_answer`.
fn json_answer(status: StatusCode, revision: Revision, body: Vec<u8>) -> Response {
    let mut response = json_bytes_ok(body);
    *response.status_mut() = status;
    response.headers_mut().insert(header::ETAG, etag(revision));
    response
}

fn parse_if_match(value: Option<&[u8]>) -> Result<Option<u64>, ApiError> {
    let Some(v) = value else {
        return Ok(None);
    };
    let s = crate::http::visible_ascii(v).unwrap_or("").trim();
    let s = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
    s.parse().map(Some).map_err(|_| {
        ApiError::BadRequest("If-Match must be a revision, as in the ETag of a read".into())
    })
}

fn parse_ttl(q: &Query) -> Result<Option<Duration>, ApiError> {
    let Some(raw) = q.get("ttl") else {
        return Ok(None);
    };
    let ttl = humantime::parse_duration(raw).map_err(|e| {
        ApiError::BadRequest(format!(
            "ttl {raw:?} is not a duration such as 30s or 5m: {e}"
        ))
    })?;
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(ApiError::BadRequest(
            "ttl must be above zero and at most 365 days".into(),
        ));
    }
    Ok(Some(ttl))
}

/// `PUT /v1/kv/{context}/{family}/{key}`: create or replace; answers the revision.
pub async fn put(
    State(state): State<Shared>,
    NativeCaller(caller): NativeCaller,
    EntryTarget { key, query: q }: EntryTarget,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    write_entry(&state, &caller, &key, &q, &headers, body).await
}

/// The answer to `PUT /v1/kv/{context}/{family}/{key}`, wherever the request was
/// dispatched: by the router ([`put`]) or by [`crate::hot::HotRoute`].
pub(crate) async fn write_entry(
    state: &Shared,
    caller: &Caller,
    key: &EntryKey,
    q: &Query,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let raw = |name| headers.get(name).map(HeaderValue::as_bytes);
    let write = WriteHeaders {
        read_token: raw(READ_TOKEN),
        write_token: raw(WRITE_TOKEN),
        if_match: raw(header::IF_MATCH.as_str()),
        if_none_match: raw(header::IF_NONE_MATCH.as_str()),
    };
    let checked = write.check(q)?;
    let limit = state.service.settings().limits.max_value_bytes;
    let bytes = read_body(headers, body, limit).await?;
    write_value(state, caller, key, checked, &bytes).await
}

/// The headers a write of one entry reads, as they came (the first of each).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WriteHeaders<'h> {
    pub read_token: Option<&'h [u8]>,
    pub write_token: Option<&'h [u8]>,
    pub if_match: Option<&'h [u8]>,
    pub if_none_match: Option<&'h [u8]>,
}

/// A write's tokens and options, checked.
pub(crate) struct CheckedWrite<'h> {
    read: &'h str,
    write: &'h str,
    options: WriteOptions,
}

impl<'h> WriteHeaders<'h> {
    /// Checks the tokens, then the conditions, then the query's options, in the
    /// order every way of writing reports their errors.
    pub(crate) fn check(&self, q: &Query) -> Result<CheckedWrite<'h>, ApiError> {
        let read = token_value(self.read_token, READ_TOKEN)?;
        let write = token_value(self.write_token, WRITE_TOKEN)?;
        let options = WriteOptions {
            if_match: parse_if_match(self.if_match)?,
            create_only: match self.if_none_match {
                None => false,
                Some(b"*") => true,
                Some(_) => {
                    return Err(ApiError::BadRequest("If-None-Match accepts only *".into()));
                }
            },
            ttl: parse_ttl(q)?,
            size_checked: false,
        };
        Ok(CheckedWrite {
            read,
            write,
            options,
        })
    }
}

/// Writes `body` (at most the value limit, read whole) as the entry's value.
pub(crate) async fn write_value(
    state: &Shared,
    caller: &Caller,
    key: &EntryKey,
    checked: CheckedWrite<'_>,
    body: &[u8],
) -> Result<Response, ApiError> {
    let written = store_value(state, caller, key, checked, body).await?;
    let mut out = Vec::with_capacity(48);
    write_written_body(&mut out, &written);
    Ok(json_answer(written_status(&written), written.revision, out))
}

/// The status of a write's answer: 201 when it created the entry.
pub(crate) fn written_status(written: &Written) -> StatusCode {
    if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// The body of a write's answer, `{"created":…,"revision":…}`, wherever the write
/// was dispatched.
pub(crate) fn write_written_body(out: &mut Vec<u8>, written: &Written) {
    out.extend_from_slice(b"{\"created\":");
    out.extend_from_slice(if written.created { b"true" } else { b"false" });
    out.extend_from_slice(b",\"revision\":");
    out.extend_from_slice(itoa::Buffer::new().format(written.revision).as_bytes());
    out.push(b'}');
}

/// Validates a write's body (its size, then JSON) and stores it: what
/// [`write_value`] answers.
pub(crate) async fn store_value(
    state: &Shared,
    caller: &Caller,
    key: &EntryKey,
    checked: CheckedWrite<'_>,
    body: &[u8],
) -> Result<Written, ApiError> {
    state.service.check_value(body.len())?;
    let text =
        std::str::from_utf8(body).map_err(|_| ApiError::InvalidJson("body is not UTF-8".into()))?;
    // Validate without building a tree; the text is stored as it came.
    // Borrowed: the only copy made is the one stored.
    let raw_value: &RawValue =
        serde_json::from_str(text).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    state
        .service
        .write(
            caller,
            key,
            raw_value.get().to_owned(),
            checked.read,
            checked.write,
            &checked.options,
        )
        .await
}

/// `DELETE /v1/kv/{context}/{family}/{key}`.
pub async fn delete(
    State(state): State<Shared>,
    NativeCaller(caller): NativeCaller,
    EntryTarget { key, .. }: EntryTarget,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (read, write) = token_pair(&headers)?;
    let revision = state.service.delete(&caller, &key, read, write).await?;
    Ok(Json(serde_json::json!({"revision": revision})).into_response())
}

/// The `limit` parameter: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
fn page_limit(q: &Query) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!("limit must be a number from 1 to {MAX_PAGE}"))
            }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A context or a family named by the path (`/{context}` or `/{context}/{family}`),
/// validated, with its store prefix.
pub struct Scope {
    /// The context.
    pub context: String,
    /// The family, when the path names one.
    pub family: Option<String>,
    /// The store prefix of everything in scope.
    pub prefix: Vec<u8>,
}

impl FromRequestParts<Shared> for Scope {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let p = Path::<Vec<(String, String)>>::from_request_parts(parts, state).await;
        let mut names = path(p)?.into_iter().map(|(_, v)| v);
        let context = names
            .next()
            .ok_or_else(|| ApiError::BadRequest("the path names no context".into()))?;
        let family = names.next();
        state.service.context_name(&context)?;
        let prefix = match &family {
            Some(f) => {
                state.service.family_name(f)?;
                family_prefix(&context, f)
            }
            None => context_prefix(&context),
        };
        Ok(Scope {
            context,
            family,
            prefix,
        })
    }
}

/// `GET /v1/kv/{context}` and `GET /v1/kv/{context}/{family}`: the visible entries,
/// paginated.
pub async fn list(
    State(state): State<Shared>,
    NativeCaller(caller): NativeCaller,
    scope: Scope,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let q = query(raw)?;
    let read = header_token(&headers, READ_TOKEN)?;
    let limit = page_limit(&q)?;
    // The cursor is the hex of the store key after the listed prefix: opaque to
    // clients, and checked to stay inside the prefix.
    let prefix = scope.prefix.as_slice();
    let after = match q.get("after") {
        None | Some("") => None,
        Some(cursor) => {
            let suffix = unhex(cursor).ok_or_else(|| {
                ApiError::BadRequest("after must be a cursor returned as next".into())
            })?;
            Some([prefix, &suffix].concat())
        }
    };
    let listing = state
        .service
        .list(
            &caller,
            &scope.context,
            scope.family.as_deref(),
            read,
            after,
            limit,
        )
        .await?;
    let next = listing
        .next
        .map(|k| hex(k.strip_prefix(prefix).unwrap_or(&k)));
    let size = listing.entries.iter().map(entry_size).sum::<usize>() + 64;
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(b"{\"entries\":[");
    for (i, entry) in listing.entries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        write_entry_body(&mut body, entry);
    }
    body.extend_from_slice(b"],\"next\":");
    match next {
        Some(cursor) => write_json_str(&mut body, &cursor),
        None => body.extend_from_slice(b"null"),
    }
    body.push(b'}');
    Ok(json_bytes_ok(body))
}

/// `GET /v1/kv/{context}/{family}/{key}/history`: recent changes, deletions included.
pub async fn history(
    State(state): State<Shared>,
    NativeCaller(caller): NativeCaller,
    EntryTarget { key, query: q }: EntryTarget,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let read = header_token(&headers, READ_TOKEN)?;
    let limit = page_limit(&q)?;
    let items = state.service.history(&caller, &key, read, limit).await?;
    let events: Vec<serde_json::Value> = items
        .into_iter()
        .map(|i| {
            let value = i
                .value
                .and_then(|v| RawValue::from_string(v).ok())
                .map(|v| serde_json::to_value(v).unwrap_or(serde_json::Value::Null));
            serde_json::json!({
                "revision": i.revision,
                "kind": match i.kind { EventKind::Put => "put", EventKind::Delete => "delete" },
                "at": rfc3339(i.at_ms),
                "value": value,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "context": key.context, "family": key.family, "key": key.key, "events": events
    }))
    .into_response())
}

/// `POST /v1/kv/{context}/{family}/{key}/keepalive`: renews the entry's lease.
pub async fn keep_alive(
    State(state): State<Shared>,
    NativeCaller(caller): NativeCaller,
    EntryTarget { key, .. }: EntryTarget,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (read, write) = token_pair(&headers)?;
    let (revision, lease) = state.service.keep_alive(&caller, &key, read, write).await?;
    Ok(Json(serde_json::json!({
        "revision": revision,
        "ttl_seconds": lease.ttl.as_secs_f64(),
        "expires_at": rfc3339(lease.expires_at_ms),
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(names: [&str; 3], value: &str, expires_at_ms: Option<u64>) -> Entry {
        Entry {
            key: EntryKey {
                context: names[0].into(),
                family: names[1].into(),
                key: names[2].into(),
            },
            value: value.into(),
            revision: 18_446_744_073_709_551_615,
            created_at_ms: 1_764_645_296_789,
            updated_at_ms: 1_764_645_300_001,
            expires_at_ms,
        }
    }

    #[test]
    fn entry_bodies_are_the_json_of_their_fields() {
        for (names, value, expires) in [
            (
                ["ctx", "fam", "key"],
                r#"{"ip":"10.0.0.1","n":[1,2.5,null]}"#,
                None,
            ),
            (
                ["c\"q", "f\\b", "k\u{1}\u{e9}"],
                r#""a string""#,
                Some(253_402_300_799_999),
            ),
            (["c", "f", "k"], "17", Some(1_764_645_400_000)),
        ] {
            let e = entry(names, value, expires);
            let mut out = b"prefix ".to_vec();
            write_entry_body(&mut out, &e);
            let body = out
                .strip_prefix(b"prefix ")
                .expect("written after what was there");
            let parsed: serde_json::Value = serde_json::from_slice(body).expect("valid JSON");
            let expected = serde_json::json!({
                "context": names[0], "family": names[1], "key": names[2],
                "value": serde_json::from_str::<serde_json::Value>(value).unwrap(),
                "revision": e.revision,
                "created_at": "2025-12-02T03:14:56.789Z",
                "updated_at": "2025-12-02T03:15:00.001Z",
                "expires_at": expires.map(|ms| Rfc3339(ms).to_string()),
            });
            assert_eq!(parsed, expected);
            // The value is copied as it was stored, byte for byte.
            let text = std::str::from_utf8(body).unwrap();
            assert!(text.contains(&format!(",\"value\":{value},")), "{text}");
        }
    }

    #[test]
    fn etags_quote_the_revision() {
        for (revision, tag) in [
            (0, "\"0\""),
            (42, "\"42\""),
            (u64::MAX, "\"18446744073709551615\""),
        ] {
            assert_eq!(etag(revision), tag);
        }
    }

    #[test]
    fn cursors_round_trip() {
        let k = b"some\0key\xff".to_vec();
        assert_eq!(unhex(&hex(&k)), Some(k));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn times_serialize_as_rfc3339_with_milliseconds() {
        let t = Rfc3339(1_764_645_296_789);
        assert_eq!(t.to_string(), "2025-12-02T03:14:56.789Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            serde_json::to_string(&[Some(t), None]).unwrap(),
            r#"["2025-12-02T03:14:56.789Z",null]"#
        );
    }

    #[test]
    fn timestamps_read_as_humantime_writes_them() {
        let mut times = vec![
            0,
            1,
            999,
            86_399_999,
            86_400_000,
            951_782_400_000,   // 2000-02-29
            951_868_800_000,   // 2000-03-01
            4_107_542_400_000, // 2100-03-01
            1_796_000_000_123,
            253_402_300_799_999, // 9999-12-31T23:59:59.999Z
        ];
        // Every day from 1970 to past 2400, at a moving time of day.
        times.extend((0..160_000u64).map(|d| d * 86_400_000 + d * 7_919 % 86_400_000));
        for ms in times {
            let humantime =
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms))
                    .to_string();
            assert_eq!(Rfc3339(ms).to_string(), humantime, "{ms} ms");
            let json = serde_json::to_string(&Rfc3339(ms)).unwrap();
            assert_eq!(json, format!("\"{humantime}\""), "{ms} ms");
        }
    }

    #[test]
    fn json_ok_answers_json_whatever_the_size_hint() {
        for hint in [0, 3, 4096] {
            let r = json_ok(&serde_json::json!({"a": [1, 2]}), hint).unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        }
    }
}
