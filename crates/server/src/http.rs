//! The HTTP edge: the router of both APIs, the middleware every request passes
//! (request id, tracing span, access log, metrics), health endpoints and fallbacks.
//!
//! Invariant: query strings never reach a log line. COMET clients put tokens there.

use crate::error::{ApiError, ServerSideError};
use crate::hot::HotRoute;
use crate::metrics::Metrics;
use crate::service::{Caller, Service};
use crate::tls::ClientCert;
use crate::watch::WatchHub;
use crate::{admin, comet, native, watch};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

/// State shared by every handler.
pub struct AppState {
    /// The metadata service.
    pub service: Service,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// False once shutdown has begun.
    pub ready: AtomicBool,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// Open watch streams.
    pub watch: Arc<WatchHub>,
    request_ids: AtomicU64,
    id_prefix: u32,
}

/// The connection a request came on: set by the accept loop on every request.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The remote address of the TCP connection.
    pub addr: SocketAddr,
    /// The client certificate presented at the TLS handshake, if any.
    pub cert: Option<ClientCert>,
}

/// The client address a request speaks for: the peer, or, when the peer is a trusted
/// proxy, the nearest address in `X-Forwarded-For` (`forwarded`: the header's values,
/// in order) that is not a trusted proxy.
fn client_addr<'v>(
    peer: IpAddr,
    forwarded: impl Iterator<Item = &'v [u8]>,
    trusted: &[IpAddr],
) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded = forwarded
        .filter_map(visible_ascii)
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .collect::<Vec<_>>();
    forwarded
        .into_iter()
        .rev()
        .find(|a| !trusted.contains(a))
        .unwrap_or(peer)
}

/// A header value as text when it is visible ASCII (tabs and spaces allowed), as
/// `HeaderValue::to_str` takes it.
pub(crate) fn visible_ascii(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (32..127).contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

/// Extracts the [`Caller`] of a request from its connection and headers.
pub fn caller(state: &AppState, parts: &Parts, api: &'static str) -> Caller {
    caller_of(state, &parts.extensions, &parts.headers, api)
}

/// [`caller`], from a request's extensions and headers.
pub(crate) fn caller_of(
    state: &AppState,
    extensions: &axum::http::Extensions,
    headers: &HeaderMap,
    api: &'static str,
) -> Caller {
    let forwarded = headers
        .get_all("x-forwarded-for")
        .into_iter()
        .map(HeaderValue::as_bytes);
    caller_from(state, extensions.get::<Peer>(), forwarded, api)
}

/// [`caller`], from the connection's peer and the values of `X-Forwarded-For`.
pub(crate) fn caller_from<'v>(
    state: &AppState,
    peer: Option<&Peer>,
    forwarded: impl Iterator<Item = &'v [u8]>,
    api: &'static str,
) -> Caller {
    let addr = peer
        .map(|p| p.addr.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let cert = peer.and_then(|p| p.cert.as_ref());
    Caller {
        addr: client_addr(addr, forwarded, &state.trusted_proxies),
        subject: cert.map(|c| c.subject.clone()),
        trusted_cert: cert.is_some_and(ClientCert::trusted_now),
        api,
    }
}

/// The caller of a native API request.
pub struct NativeCaller(pub Caller);

impl FromRequestParts<Shared> for NativeCaller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        Ok(NativeCaller(caller(state, parts, "native")))
    }
}

/// The caller of a COMET API request.
pub struct CometCaller(pub Caller);

impl FromRequestParts<Shared> for CometCaller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        Ok(CometCaller(caller(state, parts, "comet")))
    }
}

impl AppState {
    /// State around a service.
    pub fn new(
        service: Service,
        metrics: Arc<Metrics>,
        trusted_proxies: Vec<IpAddr>,
        watch: Arc<WatchHub>,
    ) -> Self {
        let mut seed = [0u8; 4];
        let _ = getrandom::fill(&mut seed);
        AppState {
            service,
            metrics,
            ready: AtomicBool::new(true),
            trusted_proxies,
            watch,
            request_ids: AtomicU64::new(0),
            id_prefix: u32::from_le_bytes(seed),
        }
    }
}

/// Shared state as handlers receive it.
pub type Shared = Arc<AppState>;

/// Builds the router of every endpoint.
pub fn router(state: Shared) -> Router {
    let comet = Router::new()
        .route("/writeScope", post(comet::write_scope))
        .route("/readScope", get(comet::read_scope))
        .route("/enumerateScope", get(comet::enumerate_scope))
        .route("/deleteScope", axum::routing::delete(comet::delete_scope))
        .route("/getVersion", get(comet::get_version));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/kv/{context}", get(native::list))
        .route("/v1/kv/{context}/{family}", get(native::list))
        .route(
            "/v1/kv/{context}/{family}/{key}",
            get(native::get).put(native::put).delete(native::delete),
        )
        .route(
            "/v1/kv/{context}/{family}/{key}/history",
            get(native::history),
        )
        .route(
            "/v1/kv/{context}/{family}/{key}/keepalive",
            post(native::keep_alive),
        )
        .route("/v1/watch/{context}", get(watch::watch))
        .route("/v1/watch/{context}/{family}", get(watch::watch))
        .route("/v1/admin/contexts", get(admin::contexts))
        .route(
            "/v1/admin/contexts/{context}",
            axum::routing::delete(admin::delete_context),
        )
        .route("/v1/admin/stats", get(admin::stats))
        .merge(comet.clone())
        .nest("/v1", comet)
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The service [`app`] builds.
pub type App = tower::util::MapRequest<Observe<HotRoute<Router>>, fn(Request) -> Request>;

/// The whole application: slash normalization, then [`Observe`], around the hot
/// routes ([`HotRoute`]), around the router.
///
/// Normalization must happen before routing, so it wraps the router rather than
/// being one of its layers; observation sees the normalized path.
pub fn app(state: Shared) -> App {
    use tower::ServiceExt;
    let observed = Observe {
        inner: HotRoute::new(router(state.clone()), state.clone()),
        state,
    };
    observed.map_request(collapse_slashes as fn(Request) -> Request)
}

/// COMET clients build URLs as `host + "/readScope"` with `host` ending in `/`:
/// repeated slashes in the path are collapsed into one.
fn collapse_slashes(mut req: Request) -> Request {
    let path = req.uri().path();
    if !path.contains("//") {
        return req;
    }
    let mut collapsed = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && collapsed.ends_with('/')) {
            collapsed.push(c);
        }
    }
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{collapsed}?{q}"),
        None => collapsed,
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// A bounded label for metrics: the route, never the names in it.
pub(crate) fn endpoint_of(path: &str) -> &'static str {
    let comet_path = path.strip_prefix("/v1").unwrap_or(path);
    match comet_path {
        "/writeScope" => return "comet_write_scope",
        "/readScope" => return "comet_read_scope",
        "/enumerateScope" => return "comet_enumerate_scope",
        "/deleteScope" => return "comet_delete_scope",
        "/getVersion" => return "comet_get_version",
        _ => {}
    }
    match path {
        "/healthz" => return "healthz",
        "/readyz" => return "readyz",
        "/metrics" => return "metrics",
        _ => {}
    }
    match path {
        "/v1/admin/contexts" => return "admin_contexts",
        "/v1/admin/stats" => return "admin_stats",
        p if p.starts_with("/v1/admin/contexts/") => return "admin_context",
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v1/watch/") {
        return match rest.split('/').count() {
            1 => "watch_context",
            2 => "watch_family",
            _ => "other",
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/kv/") {
        let last = rest.rsplit('/').next();
        return match (rest.split('/').count(), last) {
            (1, _) => "kv_context",
            (2, _) => "kv_family",
            (3, _) => "kv_entry",
            (4, Some("history")) => "kv_history",
            (4, Some("keepalive")) => "kv_keepalive",
            _ => "other",
        };
    }
    "other"
}

/// A request's id: the caller's, when it is short and printable (so traces join
/// up), or one made here from the server's random prefix and a counter. Formatted
/// only where it is written: the response header, a log line.
pub(crate) enum RequestId {
    Given(HeaderValue),
    Made { prefix: u32, n: u64 },
}

impl RequestId {
    fn of(state: &AppState, headers: &HeaderMap) -> RequestId {
        match headers.get("x-request-id") {
            Some(given) if usable_id(given.as_bytes()) => RequestId::Given(given.clone()),
            _ => RequestId::made(state),
        }
    }

    /// [`RequestId::of`], from the raw value of the request's `X-Request-Id`.
    pub(crate) fn of_raw(state: &AppState, given: Option<&[u8]>) -> RequestId {
        match given.filter(|g| usable_id(g)).map(HeaderValue::from_bytes) {
            Some(Ok(given)) => RequestId::Given(given),
            _ => RequestId::made(state),
        }
    }

    fn made(state: &AppState) -> RequestId {
        RequestId::Made {
            prefix: state.id_prefix,
            n: state.request_ids.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Writes the id as it goes in the response header.
    pub(crate) fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            RequestId::Given(v) => out.extend_from_slice(v.as_bytes()),
            RequestId::Made { prefix, n } => {
                write_hex(out, u64::from(*prefix), 8);
                write_hex(out, *n, 8);
            }
        }
    }

    fn header_value(&self) -> HeaderValue {
        match self {
            RequestId::Given(v) => v.clone(),
            RequestId::Made { .. } => {
                // At most 8 + 16 hex digits: formatted on the stack.
                let mut buf = [0u8; 24];
                let mut w = &mut buf[..];
                let _ = write!(w, "{self}");
                let len = 24 - w.len();
                HeaderValue::from_bytes(&buf[..len]).expect("hex digits are a valid header")
            }
        }
    }
}

/// Writes `value` in lower-case hex, at least `width` digits (as `{value:0width$x}`).
fn write_hex(out: &mut Vec<u8>, value: u64, width: usize) {
    let digits = ((64 - value.leading_zeros() as usize).div_ceil(4)).max(width);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(value >> (4 * i) & 0xf) as usize]);
    }
}

/// A caller's request id is kept when it is short and visible ASCII.
fn usable_id(given: &[u8]) -> bool {
    !given.is_empty() && given.len() <= 64 && given.iter().all(u8::is_ascii_graphic)
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Checked to be visible ASCII when it was taken.
            RequestId::Given(v) => f.write_str(v.to_str().unwrap_or_default()),
            RequestId::Made { prefix, n } => write!(f, "{prefix:08x}{n:08x}"),
        }
    }
}

/// Request id, tracing span, access log and metrics for every request: the layer
/// around the router.
///
/// A service of its own rather than `axum::middleware::from_fn`, which clones the
/// boxed router and boxes a future for every request: that took about a tenth of
/// the throughput of gets (measured with the bench harness).
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    state: Shared,
}

impl<S> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        let id = RequestId::of(&self.state, req.headers());
        let method = req.method().clone();
        let endpoint = endpoint_of(req.uri().path());
        // The path and the (redacted: COMET puts tokens there) query are kept only
        // when the per-request debug line will be written.
        let detail = request_lines_on().then(|| {
            (
                truncate(req.uri().path(), 512).to_owned(),
                req.uri().query().map(redact_query),
            )
        });
        // A span per request costs more than a get does in the store: only when the
        // per-request lines are on. Server-side failures are logged with the id.
        let span = if detail.is_some() {
            tracing::info_span!("request", request_id = %id, %method, endpoint)
        } else {
            tracing::Span::none()
        };
        let inner = span.in_scope(|| self.inner.call(req));
        Observed {
            inner,
            done: Some(Done {
                state: self.state.clone(),
                started,
                id,
                method,
                endpoint,
                detail,
                span,
            }),
        }
    }
}

/// True when the per-request debug lines (and spans) of [`Observe`] are written:
/// requests are then all answered through it.
pub(crate) fn request_lines_on() -> bool {
    tracing::enabled!(tracing::Level::DEBUG)
}

/// What [`Observed`] needs once the response is there.
struct Done {
    state: Shared,
    started: Instant,
    id: RequestId,
    method: Method,
    endpoint: &'static str,
    detail: Option<(String, Option<String>)>,
    span: tracing::Span,
}

impl Done {
    /// Metrics, the failure and access log lines, and the response headers.
    fn finish(self, mut response: Response) -> Response {
        let status = response.status();
        let elapsed = self.started.elapsed();
        record(
            &self.state,
            &self.id,
            method_label(&self.method),
            self.endpoint,
            status,
            response.extensions().get::<ServerSideError>(),
            elapsed,
        );
        if let Some((path, query)) = &self.detail {
            self.span.in_scope(|| {
                tracing::debug!(
                    status = status.as_u16(),
                    micros = elapsed.as_micros() as u64,
                    path = %path,
                    query = query.as_deref().unwrap_or(""),
                    "request"
                );
            });
        }
        let headers = response.headers_mut();
        headers.insert("x-request-id", self.id.header_value());
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        response
    }
}

/// The failure log line and the metrics of a request answered, however it was
/// dispatched (through [`Observe`], or by the connection loop in `conn.rs`), which
/// took `elapsed`.
pub(crate) fn record(
    state: &AppState,
    id: &RequestId,
    method: &'static str,
    endpoint: &'static str,
    status: StatusCode,
    failure: Option<&ServerSideError>,
    elapsed: std::time::Duration,
) {
    if let Some(failure) = failure {
        tracing::error!(request_id = %id, method, endpoint, code = failure.code, error = %failure.detail, "request failed on the server side");
    }
    state
        .metrics
        .observe_request(endpoint, method, status.as_u16(), elapsed.as_secs_f64());
}

pin_project_lite::pin_project! {
    /// The future of [`Observe`]: the router's, polled inside the request's span,
    /// then [`Done::finish`].
    pub struct Observed<F> {
        #[pin]
        inner: F,
        done: Option<Done>,
    }
}

impl<F> Future for Observed<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let done = this
            .done
            .as_ref()
            .expect("Observed polled after completion");
        let Ok(response) = ready!(done.span.in_scope(|| this.inner.poll(cx)));
        let done = this.done.take().expect("checked above");
        Poll::Ready(Ok(done.finish(response)))
    }
}

/// A bounded metrics label for the method (no allocation per request).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

/// Query parameter names whose values are secrets.
const SECRET_PARAMS: &[&str] = &[
    "readtoken",
    "writetoken",
    "token",
    "amphora-read-token",
    "amphora-write-token",
];

/// The query string with the values of token parameters replaced by `REDACTED`,
/// cut to 512 bytes.
pub fn redact_query(query: &str) -> String {
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            // Compare the decoded name too: `read%54oken` is still `readToken`.
            let decoded = crate::query::Query::parse(Some(name))
                .ok()
                .and_then(|q| q.first_name().map(str::to_ascii_lowercase))
                .unwrap_or_else(|| name.to_ascii_lowercase());
            if SECRET_PARAMS.contains(&decoded.as_str())
                || SECRET_PARAMS.contains(&name.to_ascii_lowercase().as_str())
            {
                format!("{name}=REDACTED")
            } else {
                pair.to_owned()
            }
        })
        .collect();
    truncate(&redacted.join("&"), 512).to_owned()
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Renders a native API error: `{"error": {"code": ..., "message": ...}}`.
pub fn native_error(e: ApiError) -> Response {
    let (status, code) = e.status_and_code();
    let body = serde_json::json!({"error": {"code": code, "message": e.public_message()}});
    let mut response = (status, axum::Json(body)).into_response();
    error_headers(&mut response, &e);
    response
}

/// Headers an error response needs besides its body: `Retry-After` for a refusal
/// that ends, and `Connection: close` for a body refused unread (the rest of it is
/// still on the wire, so the connection cannot carry another request).
pub fn error_headers(response: &mut Response, e: &ApiError) {
    if let Some(detail) = e.server_side() {
        response.extensions_mut().insert(detail);
    }
    if let Some(seconds) = e.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if matches!(e, ApiError::BodyTooLarge(_) | ApiError::BodyTimeout(_)) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        native_error(self)
    }
}

fn is_comet_path(path: &str) -> bool {
    matches!(
        path.strip_prefix("/v1").unwrap_or(path),
        "/writeScope" | "/readScope" | "/enumerateScope" | "/deleteScope" | "/getVersion"
    )
}

async fn route_not_found(uri: Uri) -> Response {
    native_error(ApiError::RouteNotFound(
        truncate(uri.path(), 256).to_owned(),
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let e = ApiError::MethodNotAllowed(method.to_string());
    if is_comet_path(uri.path()) {
        comet::error(e)
    } else {
        native_error(e)
    }
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<Shared>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return native_error(ApiError::Unavailable("shutting down".into()));
    }
    match state.service.store().entry_count().await {
        Ok(entries) => {
            let revision = state.service.store().revision().await.unwrap_or(0);
            axum::Json(
                serde_json::json!({"status": "ready", "revision": revision, "entries": entries}),
            )
            .into_response()
        }
        Err(e) => native_error(e.into()),
    }
}

async fn metrics(State(state): State<Shared>) -> Response {
    let entries = state.service.store().entry_count().await.unwrap_or(0);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state
            .metrics
            .render(entries, state.service.store().cache_stats()),
    )
        .into_response()
}

/// Reads a request body of at most `limit` bytes. A larger body is refused with 413;
/// up to [`DRAIN_CAP`] bytes of it are read and discarded first, so that the client,
/// still sending, receives the refusal instead of a reset connection. A body that
/// stops arriving for [`BODY_IDLE_TIMEOUT`] is refused with 408, and memory is
/// taken as the body arrives, not as its `Content-Length` announces.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut too_large = declared.is_some_and(|n| n > limit as u64);
    let mut body = body;
    let mut buf = Vec::with_capacity(if too_large {
        0
    } else {
        (declared.unwrap_or(0) as usize).min(BODY_RESERVE)
    });
    let mut seen = 0usize;
    loop {
        let frame = tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame())
            .await
            .map_err(|_| ApiError::BodyTimeout(BODY_IDLE_TIMEOUT.as_secs()))?;
        let Some(frame) = frame else {
            break;
        };
        let frame = frame
            .map_err(|e| ApiError::BadRequest(format!("reading the request body failed: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if !too_large && buf.len() + data.len() <= limit {
            buf.extend_from_slice(&data);
        } else {
            too_large = true;
            buf = Vec::new();
        }
        // Only a refused body is cut short: one within the limit is read whole,
        // whatever the limit (it may be above the cap).
        if too_large && seen > DRAIN_CAP {
            break;
        }
    }
    if too_large {
        return Err(ApiError::BodyTooLarge(limit));
    }
    Ok(Bytes::from(buf))
}

/// The most bytes of an oversized body read (and discarded) before refusing it.
pub const DRAIN_CAP: usize = 16 * 1024 * 1024;

/// How long a request body may go without any of it arriving.
pub const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The most memory taken for a body before any of it arrived.
const BODY_RESERVE: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn length(n: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        headers
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_is_refused_after_the_idle_timeout() {
        use futures_util::StreamExt as _;
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from("abc"))]);
        let body = Body::from_stream(first.chain(futures_util::stream::pending()));
        let r = read_body(&length(1000), body, 1 << 20).await;
        assert!(
            matches!(r, Err(ApiError::BodyTimeout(s)) if s == BODY_IDLE_TIMEOUT.as_secs()),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole_past_the_drain_cap() {
        let chunk = Bytes::from(vec![b'x'; 1024 * 1024]);
        let n = DRAIN_CAP / chunk.len() + 2;
        let chunks = (0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let total = n * 1024 * 1024;
        let read = read_body(&length(total), body, total).await.unwrap();
        assert_eq!(read.len(), total);
        // One byte less of limit: refused.
        let chunk = Bytes::from(vec![b'x'; 1024 * 1024]);
        let chunks = (0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let r = read_body(&length(total), body, total - 1).await;
        assert!(matches!(r, Err(ApiError::BodyTooLarge(_))), "{r:?}");
    }

    #[test]
    fn collapses_repeated_slashes_and_keeps_the_query() {
        let req = Request::builder()
            .uri("http://h//v1///readScope?contextID=a//b")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            collapse_slashes(req).uri().to_string(),
            "http://h/v1/readScope?contextID=a//b"
        );
    }

    #[test]
    fn tokens_are_redacted_from_logged_queries() {
        let q =
            "contextID=c&readToken=Secret1x&Key=k&writeToken=Secret2y&read%54oken=Secret3z&TOKEN=x";
        let r = redact_query(q);
        assert_eq!(
            r,
            "contextID=c&readToken=REDACTED&Key=k&writeToken=REDACTED&read%54oken=REDACTED&TOKEN=REDACTED"
        );
        // Even a malformed query is redacted.
        assert_eq!(redact_query("readToken=%zz"), "readToken=REDACTED");
    }

    #[test]
    fn made_request_ids_are_written_as_displayed() {
        for (prefix, n) in [(0, 0), (0xdead_beef, 1), (7, 0xffff_ffff), (1, u64::MAX)] {
            let id = RequestId::Made { prefix, n };
            let mut out = Vec::new();
            id.write_to(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), id.to_string());
        }
        let given = RequestId::Given(HeaderValue::from_static("trace-1"));
        let mut out = Vec::new();
        given.write_to(&mut out);
        assert_eq!(out, b"trace-1");
        assert!(usable_id(b"trace-1"));
        for refused in [&b""[..], b"has space", &[b'x'; 65], b"\xff"] {
            assert!(!usable_id(refused), "{refused:?}");
        }
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let h: &[&[u8]] = &[b"203.0.113.9, 10.0.0.5"];
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let other: IpAddr = "10.0.0.6".parse().unwrap();
        assert_eq!(client_addr(other, h.iter().copied(), &[proxy]), other);
        assert_eq!(
            client_addr(proxy, h.iter().copied(), &[proxy]),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_addr(proxy, std::iter::empty(), &[proxy]), proxy);
        // Values in several headers are one list, in order; text that is not
        // visible ASCII is skipped.
        let h: &[&[u8]] = &[b"198.51.100.7", b"\xff203.0.113.1", b"10.0.0.5"];
        assert_eq!(
            client_addr(proxy, h.iter().copied(), &[proxy]),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn endpoint_labels_are_bounded() {
        assert_eq!(endpoint_of("/v1/kv/c/f/k"), "kv_entry");
        assert_eq!(endpoint_of("/v1/kv/c/f/k/history"), "kv_history");
        assert_eq!(endpoint_of("/v1/readScope"), "comet_read_scope");
        assert_eq!(endpoint_of("/anything/else"), "other");
    }

    #[test]
    fn endpoint_labels_are_the_metrics_list() {
        let paths = [
            "/writeScope",
            "/v1/readScope",
            "/enumerateScope",
            "/deleteScope",
            "/getVersion",
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/admin/contexts",
            "/v1/admin/stats",
            "/v1/admin/contexts/c",
            "/v1/watch/c",
            "/v1/watch/c/f",
            "/v1/kv/c",
            "/v1/kv/c/f",
            "/v1/kv/c/f/k",
            "/v1/kv/c/f/k/history",
            "/v1/kv/c/f/k/keepalive",
            "/v1/kv/c/f/k/other",
            "/v1/watch/c/f/k",
            "/",
        ];
        let labels: std::collections::BTreeSet<&str> =
            paths.iter().map(|p| endpoint_of(p)).collect();
        let listed: std::collections::BTreeSet<&str> =
            crate::metrics::ENDPOINTS.iter().copied().collect();
        assert_eq!(labels, listed);
    }
}
