//! One HTTP/1.1 connection: plain entry reads and writes and COMET reads answered
//! here, on the connection's own task, and everything else handed to hyper.
//!
//! Most of what a metadata service answers is `GET` and `PUT
//! /v1/kv/{context}/{family}/{key}` (and `GET /readScope` for COMET clients), one
//! small JSON body each. Through hyper and the tower stack such a request costs more
//! in the HTTP layers than in the service: the head parsed into a `HeaderMap` of
//! shared buffers, the connection's `Peer` put in the request's extensions, the
//! response built as a `HeaderMap` and a boxed body, a header-read timer re-armed per
//! request. This loop parses each request head with `httparse` (the parser hyper
//! uses) in place, and answers a request whose head is plain — see `Fast::of` — by
//! calling the functions [`crate::hot::HotRoute`] calls and writing the response
//! bytes itself: the same answer the router and the hot route give, with the same
//! request id, metrics and failure log (`http::record`).
//!
//! The first request that is not plain (another method or path, a body on a read, a
//! write's body without one `Content-Length` or over 64 KiB, an upgrade,
//! `Connection`, `Expect` or `Transfer-Encoding` headers, HTTP/1.0, a malformed or
//! oversized head, debug logging on) hands the connection, with every byte read and
//! not yet answered, to hyper for the rest of its life: anything unusual is decided
//! by hyper exactly as before. Responses stay in request order, since a response is
//! written whole before the next request is looked at.
//!
//! Bounds are hyper's and the router's: a request head must arrive within
//! [`HEADER_READ_TIMEOUT`] of the previous response (or of the connection's start;
//! a head handed to hyper unfinished keeps the time it has left), a plain write's
//! body may pause for at most [`BODY_IDLE_TIMEOUT`] (then it is answered 408), each
//! write of a response must make progress within [`WRITE_TIMEOUT`], and shutdown
//! closes idle connections and lets a request in progress finish, answered with
//! `connection: close`. The read buffer keeps at most [`KEPT_READ_ROOM`] between
//! requests, so an idle connection holds little after a large body.

use crate::error::{ApiError, ServerSideError};
use crate::hot::{PlainEntry, is_comet_read_path};
use crate::http::{
    BODY_IDLE_TIMEOUT, Peer, RequestId, Shared, caller_from, record, request_lines_on,
};
use crate::query::Query;
use amphora_store::Revision;

use crate::{comet, native};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// How long a request's head may take to arrive, counted from the end of the
/// previous response: hyper's `header_read_timeout`, which bounds slow and idle
/// clients alike.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Heads longer than this, still incomplete, go to hyper (which refuses them past
/// its own bound, `max_buf_size`).
const MAX_FAST_HEAD: usize = 16 * 1024;

/// The largest body the loop reads (that of a plain write); larger ones go to hyper.
const MAX_FAST_BODY: usize = 64 * 1024;

/// The room for responses a connection keeps between requests.
const KEPT_ROOM: usize = 64 * 1024;

/// The read buffer's room a connection keeps between requests (a plain write's
/// body of up to [`MAX_FAST_BODY`] grows it to 128 KiB).
const KEPT_READ_ROOM: usize = 16 * 1024;

/// Headers a head may have to be answered here; more go to hyper (which takes 100).
const MAX_FAST_HEADERS: usize = 32;

/// The whole application (the router behind `http::Observe`), which answers every
/// request this loop does not.
pub trait Application:
    tower::Service<
        axum::extract::Request,
        Response = Response,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<A> Application for A where
    A: tower::Service<
            axum::extract::Request,
            Response = Response,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// What a connection needs besides its stream: set once by the accept loop.
pub struct ConnContext<A> {
    /// The remote address and client certificate.
    pub peer: Peer,
    /// The state the service answers from.
    pub state: Shared,
    /// The whole application, for everything not answered here.
    pub app: A,
}

/// Serves one connection until the client closes it, it times out, or `stop`
/// completes (shutdown): idle, it is closed; busy, its request is finished first.
pub async fn serve_connection<I, A>(
    mut io: I,
    cx: ConnContext<A>,
    stop: impl Future<Output = ()> + Send,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: Application,
{
    tokio::pin!(stop);
    // The loop's buffers and timer end with it: a connection handed to hyper (a
    // watch stream can last days) keeps none of them.
    if let Some(rest) = answer_plain(&mut io, &cx.state, &cx.peer, stop.as_mut()).await {
        let io = Rewind::new(WriteDeadline::new(io), rest.bytes);
        hand_over(io, cx, stop, rest.head_within).await;
    }
}

/// What the loop leaves to hyper.
struct Unanswered {
    /// The bytes read and not answered.
    bytes: Bytes,
    /// When they end inside a request head: the time left for the rest of it.
    head_within: Option<Duration>,
}

/// The loop: answers plain requests until the connection ends (`None`) or a request
/// comes that is not one (what it read and did not answer, for hyper).
///
/// Its bounds are the router's and hyper's: a head must arrive within
/// [`HEADER_READ_TIMEOUT`] of the previous response, and a plain write's body may
/// pause for at most [`BODY_IDLE_TIMEOUT`] (then it is answered 408). At shutdown an
/// idle connection, or one inside a head, is closed; a write whose body is coming is
/// finished, and its answer says `connection: close`.
async fn answer_plain<I>(
    io: &mut I,
    state: &Shared,
    peer: &Peer,
    mut stop: Pin<&mut impl Future<Output = ()>>,
) -> Option<Unanswered>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let (mut out, mut scratch) = (Vec::with_capacity(1024), Vec::with_capacity(1024));
    // Deadlines only move later, so the timer is re-armed only when it fires.
    let mut deadline = Instant::now() + HEADER_READ_TIMEOUT;
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let mut stopping = false;
    let handed = |buf: &BytesMut, deadline: Instant, inside_head: bool| {
        Some(Unanswered {
            // In an allocation of its own: the read buffer's room goes with the loop.
            bytes: Bytes::copy_from_slice(buf),
            head_within: inside_head.then(|| deadline.saturating_duration_since(Instant::now())),
        })
    };
    // Bodies the loop reads whole: at most the value limit, and never above 64 KiB.
    let max_body = state
        .service
        .settings()
        .limits
        .max_value_bytes
        .min(MAX_FAST_BODY);
    // The head is parsed again only when a read may have completed the request: once
    // it is parsed, when the whole body is in (`need`, 0 while unknown); while it is
    // partial, when a read brings what may end a head (`no_end`: the bytes known to
    // hold no end). A body or a head sent a byte at a time is not parsed once a byte.
    let (mut need, mut no_end) = (0usize, 0usize);
    loop {
        if buf.len() >= need && (no_end == 0 || may_end_head(&buf[no_end.saturating_sub(2)..])) {
            match parse(&buf, max_body) {
                Head::Fast(len, fast) if buf.len() >= len + fast.body_len => {
                    out.clear();
                    let body = &buf[len..len + fast.body_len];
                    let bufs = (&mut out, &mut scratch);
                    let (keep_alive, answered) = answer(state, peer, &fast, body, bufs).await;
                    // A shutdown that came while the body did makes this the last one.
                    stopping = stopping || stopped(stop.as_mut()).await;
                    if stopping {
                        say_close(&mut out);
                    }
                    let Ok(sent) = send_all(io, &out).await else {
                        return None;
                    };
                    if !keep_alive || stopping {
                        return None;
                    }
                    let used = len + fast.body_len;
                    buf.advance(used);
                    give_back_room(&mut buf);
                    (need, no_end) = (0, 0);
                    // A large answer's room is not kept for the connection's life.
                    for b in [&mut out, &mut scratch] {
                        if b.capacity() > KEPT_ROOM {
                            *b = Vec::with_capacity(1024);
                        }
                    }
                    // The next head is waited for from when this answer left.
                    let left = match sent {
                        Sent::AtOnce => answered,
                        Sent::Later => Instant::now(),
                    };
                    deadline = left + HEADER_READ_TIMEOUT;
                    continue;
                }
                // The body is still coming: from here the body's bound applies.
                Head::Fast(len, fast) => {
                    (need, no_end) = (len + fast.body_len, 0);
                    deadline = Instant::now() + BODY_IDLE_TIMEOUT;
                }
                Head::Partial if buf.len() <= MAX_FAST_HEAD => no_end = buf.len(),
                Head::Partial => return handed(&buf, deadline, true),
                Head::Other => return handed(&buf, deadline, false),
            }
        } else if need == 0 && buf.len() > MAX_FAST_HEAD {
            return handed(&buf, deadline, true);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        tokio::select! {
            biased;
            // First: a client that keeps sending does not hold a shutdown back. A
            // write whose body is coming is finished first, as hyper does.
            () = &mut stop, if need == 0 && !stopping => return None,
            read = io.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return None,
                Ok(_) if need > 0 => deadline = Instant::now() + BODY_IDLE_TIMEOUT,
                Ok(_) => {}
            },
            () = &mut timer => {
                if Instant::now() < deadline {
                    timer.as_mut().reset(deadline);
                } else if need > 0 {
                    tracing::debug!(client = %peer.addr, "a request body paused for {BODY_IDLE_TIMEOUT:?}; answering 408");
                    if let Head::Fast(_, fast) = parse(&buf, max_body) {
                        let id = RequestId::of_raw(state, fast.request_id);
                        let timeout = ApiError::BodyTimeout(BODY_IDLE_TIMEOUT.as_secs());
                        out.clear();
                        write_response(&mut out, timeout.into_response(), &id, &fast, Instant::now(), state).await;
                        say_close(&mut out);
                        let _ = send_all(io, &out).await;
                    }
                    return None;
                } else {
                    tracing::debug!(client = %peer.addr, "no request head within {HEADER_READ_TIMEOUT:?}; closing");
                    return None;
                }
            },
        }
    }
}

/// A large body's room in the read buffer is not kept for the connection's life:
/// past [`KEPT_READ_ROOM`], what is left moves to a small buffer.
fn give_back_room(buf: &mut BytesMut) {
    if buf.capacity() > KEPT_READ_ROOM {
        let mut fresh = BytesMut::with_capacity((8 * 1024).max(buf.len()));
        fresh.extend_from_slice(buf);
        *buf = fresh;
    }
}

/// Whether `stop` has completed; polled once, and never again once it has.
async fn stopped(stop: Pin<&mut impl Future<Output = ()>>) -> bool {
    tokio::select! {
        biased;
        () = stop => true,
        () = std::future::ready(()) => false,
    }
}

/// Adds `connection: close` to the response head in `out`.
fn say_close(out: &mut Vec<u8>) {
    if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
        out.splice(end + 2..end + 2, *b"connection: close\r\n");
    }
}

/// Whether `bytes` may hold the end of a request head: an empty line, ended by
/// `\n` or `\r\n` (httparse takes both).
fn may_end_head(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

/// How long a response may take to leave, the client not reading it, before the
/// connection is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a response left.
#[derive(Debug, PartialEq)]
enum Sent {
    /// The connection took it whole when it was written.
    AtOnce,
    /// It had to wait for the client to read.
    Later,
}

/// Writes `out` whole and flushes it: at once when the connection takes it, as it
/// does almost always (no timer for those), else within [`WRITE_TIMEOUT`].
async fn send_all<I: AsyncWrite + Unpin>(io: &mut I, out: &[u8]) -> std::io::Result<Sent> {
    let mut written = 0;
    let done = std::future::poll_fn(|cx| {
        while written < out.len() {
            match Pin::new(&mut *io).poll_write(cx, &out[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Ready(Ok(false)),
            }
        }
        match Pin::new(&mut *io).poll_flush(cx) {
            Poll::Ready(flushed) => Poll::Ready(flushed.map(|()| true)),
            Poll::Pending => Poll::Ready(Ok(false)),
        }
    })
    .await?;
    if done {
        return Ok(Sent::AtOnce);
    }
    // Each write must make progress within the timeout, however long the whole
    // takes (as `WriteDeadline` bounds hyper's).
    let stalled = || std::io::Error::new(std::io::ErrorKind::TimedOut, "response not read");
    let mut rest = &out[written..];
    while !rest.is_empty() {
        let n = tokio::time::timeout(WRITE_TIMEOUT, io.write(rest))
            .await
            .map_err(|_| stalled())??;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        rest = &rest[n..];
    }
    tokio::time::timeout(WRITE_TIMEOUT, io.flush())
        .await
        .map_err(|_| stalled())??;
    Ok(Sent::Later)
}

/// Serves the rest of a connection with hyper, behind the whole application.
/// Handed over inside a head, it keeps the time left for that head (hyper then
/// applies it to the later heads of the connection too).
async fn hand_over<I, A>(
    io: I,
    cx: ConnContext<A>,
    stop: Pin<&mut impl Future<Output = ()>>,
    head_within: Option<Duration>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: Application,
{
    let ConnContext { peer, app, .. } = cx;
    let addr = peer.addr;
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let app = app.clone();
        tower::ServiceExt::oneshot(app, req.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_within.map_or(HEADER_READ_TIMEOUT, |left| {
            left.max(Duration::from_millis(1))
        }))
        .max_buf_size(256 * 1024)
        // One buffer, one write per response: small responses (most of them) cost
        // less than as headers and body in a writev (gets measured 3.5 % faster),
        // and rustls takes a flat buffer better too.
        .writev(false)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = stop => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(client = %addr, error = %e, "connection ended with an error");
    }
}

/// What the buffer starts with.
// On the stack for the time of one request: boxing the large variant would cost an
// allocation per request.
#[allow(clippy::large_enum_variant)]
enum Head<'b> {
    /// A request answered here, and the length of its head.
    Fast(usize, Fast<'b>),
    /// Not a whole head yet.
    Partial,
    /// Anything else: hyper's.
    Other,
}

/// A request answered by this loop.
struct Fast<'b> {
    what: What<'b>,
    /// The headers a read or a write reads.
    headers: native::WriteHeaders<'b>,
    request_id: Option<&'b [u8]>,
    forwarded: [Option<&'b [u8]>; 4],
    /// The length of the body, after the head (a write's; 0 for reads).
    body_len: usize,
    /// When the head was parsed (tokio's clock, so that the loop's timer and the
    /// request's time share one reading of it).
    started: Instant,
}

enum What<'b> {
    /// `GET /v1/kv/{context}/{family}/{key}`.
    Read(PlainEntry<'b>),
    /// `PUT /v1/kv/{context}/{family}/{key}`.
    Write(PlainEntry<'b>),
    /// `GET /readScope?...`.
    Comet(Option<&'b str>),
}

impl What<'_> {
    /// Its labels in the metrics.
    fn labels(&self) -> (&'static str, &'static str) {
        match self {
            What::Read(_) => ("GET", "kv_entry"),
            What::Write(_) => ("PUT", "kv_entry"),
            What::Comet(_) => ("GET", "comet_read_scope"),
        }
    }
}

fn parse(buf: &[u8], max_body: usize) -> Head<'_> {
    // Left uninitialized: httparse writes the ones it fills.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_FAST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => match Fast::of(&req, max_body) {
            Some(fast) => Head::Fast(len, fast),
            None => Head::Other,
        },
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(_) => Head::Other,
    }
}

impl<'b> Fast<'b> {
    /// A request this loop answers: HTTP/1.1; `GET` of a plain entry path or a
    /// COMET read, without a body, or `PUT` of a plain entry path with one
    /// `Content-Length` of at most `max_body`; none of the headers that change how
    /// the connection goes on; at most four `X-Forwarded-For` headers; and debug
    /// logging off (its per-request span and line are written by `http::Observe`).
    fn of(req: &httparse::Request<'_, 'b>, max_body: usize) -> Option<Fast<'b>> {
        let write = match req.method? {
            "GET" => false,
            "PUT" => true,
            _ => return None,
        };
        if req.version != Some(1) || request_lines_on() {
            return None;
        }
        let target = req.path?;
        if !target.starts_with('/') || !target.bytes().all(plain_target_byte) {
            return None;
        }
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        let what = match (write, query) {
            (false, _) if is_comet_read_path(path) => What::Comet(query),
            (false, None) => What::Read(PlainEntry::of_path(path)?),
            (true, None) => What::Write(PlainEntry::of_path(path)?),
            _ => return None,
        };
        let mut fast = Fast {
            what,
            headers: native::WriteHeaders::default(),
            request_id: None,
            forwarded: [None; 4],
            body_len: 0,
            started: Instant::now(),
        };
        let (mut forwarded, mut content_length) = (0, None);
        for h in req.headers.iter() {
            let (name, value) = (h.name, h.value);
            let slot = match name.len() {
                18 if name.eq_ignore_ascii_case(native::READ_TOKEN) => &mut fast.headers.read_token,
                19 if name.eq_ignore_ascii_case(native::WRITE_TOKEN) => {
                    &mut fast.headers.write_token
                }
                8 if name.eq_ignore_ascii_case("if-match") => &mut fast.headers.if_match,
                13 if name.eq_ignore_ascii_case("if-none-match") => &mut fast.headers.if_none_match,
                12 if name.eq_ignore_ascii_case("x-request-id") => &mut fast.request_id,
                15 if name.eq_ignore_ascii_case("x-forwarded-for") => {
                    *fast.forwarded.get_mut(forwarded)? = Some(value);
                    forwarded += 1;
                    continue;
                }
                14 if name.eq_ignore_ascii_case("content-length") => {
                    if content_length.replace(value).is_some() {
                        return None;
                    }
                    continue;
                }
                _ if ["transfer-encoding", "connection", "expect", "upgrade"]
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n)) =>
                {
                    return None;
                }
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        match (write, content_length) {
            (false, None) => {}
            (true, Some(declared)) => fast.body_len = body_length(declared, max_body)?,
            _ => return None,
        }
        Some(fast)
    }
}

/// A `Content-Length` of digits only, at most `max`.
fn body_length(declared: &[u8], max: usize) -> Option<usize> {
    if declared.is_empty() || declared.len() > 10 || !declared.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: usize = std::str::from_utf8(declared).ok()?.parse().ok()?;
    (n <= max).then_some(n)
}

/// A byte of a request target that `http::Uri` takes as it is: visible ASCII other
/// than the few it refuses or that may not appear unescaped. Targets with any other
/// byte go to hyper, which decides.
fn plain_target_byte(b: u8) -> bool {
    // A table: the target of every request is checked byte by byte, and a search of
    // the refused bytes for each cost 2-3 % of a get's CPU.
    const PLAIN: [bool; 256] = {
        let mut plain = [false; 256];
        let mut b = 0x21;
        while b < 0x7f {
            plain[b] = true;
            b += 1;
        }
        let refused = b"\"#<>\\^`{|}";
        let mut i = 0;
        while i < refused.len() {
            plain[refused[i] as usize] = false;
            i += 1;
        }
        plain
    };
    PLAIN[usize::from(b)]
}

/// Answers `fast` (whose body is `body`) into `out` (`scratch`: room to write a
/// response body in): false when the connection must close after it, and when the
/// answer was ready.
async fn answer(
    state: &Shared,
    peer: &Peer,
    fast: &Fast<'_>,
    body: &[u8],
    (out, scratch): (&mut Vec<u8>, &mut Vec<u8>),
) -> (bool, Instant) {
    let id = RequestId::of_raw(state, fast.request_id);
    let forwarded = fast.forwarded.iter().map_while(|v| *v);
    let response = match &fast.what {
        What::Read(names) => {
            let caller = caller_from(state, Some(peer), forwarded, "native");
            let found = async {
                // Names first, then the token, as the router's extractors take them.
                let key = state
                    .service
                    .entry_key(names.context, names.family, names.key)?;
                let read = native::token_value(fast.headers.read_token, native::READ_TOKEN)?;
                state
                    .service
                    .read(&caller, key, read)
                    .await?
                    .ok_or(ApiError::NotFound)
            }
            .await;
            match found {
                Ok(entry) => {
                    let answered = Instant::now();
                    scratch.clear();
                    native::write_entry_body(scratch, &entry);
                    let status = (StatusCode::OK, entry.revision);
                    write_json_answer(state, &id, fast, status, answered, out, scratch);
                    return (true, answered);
                }
                Err(e) => e.into_response(),
            }
        }
        What::Write(names) => {
            let caller = caller_from(state, Some(peer), forwarded, "native");
            // Boxed, as the COMET read below: a write's future is large, and held
            // inline it would size every connection's task, for its whole life.
            let written = Box::pin(async {
                // Names, then tokens and conditions, then the body, as `hot.rs` and
                // the router take them.
                let key = state
                    .service
                    .entry_key(names.context, names.family, names.key)?;
                let checked = fast.headers.check(&Query::default())?;
                native::store_value(state, &caller, &key, checked, body).await
            })
            .await;
            match written {
                Ok(written) => {
                    let answered = Instant::now();
                    scratch.clear();
                    native::write_written_body(scratch, &written);
                    let status = (native::written_status(&written), written.revision);
                    write_json_answer(state, &id, fast, status, answered, out, scratch);
                    return (true, answered);
                }
                Err(e) => e.into_response(),
            }
        }
        What::Comet(query) => {
            let caller = caller_from(state, Some(peer), forwarded, "comet");
            Box::pin(comet::read_scope_answer(state, &caller, *query)).await
        }
    };
    let answered = Instant::now();
    let keep_alive = write_response(out, response, &id, fast, answered, state).await;
    (keep_alive, answered)
}

/// Writes a JSON answer this loop built (`body`: a read's entry, a write's outcome,
/// as `native` builds them for the router too), after recording it: the status
/// line, the content type, the etag of `revision`, and the common tail.
fn write_json_answer(
    state: &Shared,
    id: &RequestId,
    fast: &Fast<'_>,
    (status, revision): (StatusCode, Revision),
    answered: Instant,
    out: &mut Vec<u8>,
    body: &[u8],
) {
    let (method, endpoint) = fast.what.labels();
    record(
        state,
        id,
        method,
        endpoint,
        status,
        None,
        answered - fast.started,
    );
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\netag: \"");
    out.extend_from_slice(itoa::Buffer::new().format(revision).as_bytes());
    out.extend_from_slice(b"\"\r\n");
    write_tail(out, id, body);
}

/// Writes a response the application built (an error, a COMET read), after
/// recording it; false when it asks for the connection to close.
async fn write_response(
    out: &mut Vec<u8>,
    response: Response,
    id: &RequestId,
    fast: &Fast<'_>,
    answered: Instant,
    state: &Shared,
) -> bool {
    let (method, endpoint) = fast.what.labels();
    let (parts, body) = response.into_parts();
    record(
        state,
        id,
        method,
        endpoint,
        parts.status,
        parts.extensions.get::<ServerSideError>(),
        answered - fast.started,
    );
    // Bodies built here are whole in memory: collecting one cannot wait or fail.
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return false;
    };
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut keep_alive = true;
    for (name, value) in &parts.headers {
        if name == header::CONNECTION && value.as_bytes().eq_ignore_ascii_case(b"close") {
            keep_alive = false;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    write_tail(out, id, &body);
    keep_alive
}

/// The headers every response ends with (as `http::Observe` and hyper add them),
/// the blank line, and the body.
fn write_tail(out: &mut Vec<u8>, id: &RequestId, body: &[u8]) {
    out.extend_from_slice(b"x-request-id: ");
    id.write_to(out);
    out.extend_from_slice(b"\r\nx-content-type-options: nosniff\r\ncontent-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    write_date(out);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// Writes the `Date` header's value, formatted once a second on each thread.
fn write_date(out: &mut Vec<u8>) {
    use std::cell::Cell;
    thread_local! {
        static DATE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let text = DATE.with(|date| {
        let (cached, text) = date.get();
        if cached == second {
            return text;
        }
        let mut text = [0; 29];
        let _ = write!(&mut text[..], "{}", httpdate::HttpDate::from(now));
        date.set((second, text));
        text
    });
    out.extend_from_slice(&text);
}

/// A stream whose writes must make progress within [`WRITE_TIMEOUT`], for the
/// connections hyper serves (it has no write timeout): a client that stops reading
/// a watch stream or a large answer is disconnected, instead of holding the
/// connection, and what is queued for it, for ever. The timer exists only while a
/// write waits.
struct WriteDeadline<I> {
    inner: I,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteDeadline<I> {
    fn new(inner: I) -> Self {
        WriteDeadline {
            inner,
            stalled: None,
        }
    }

    /// What a write that returned `poll` means under the deadline.
    fn judge<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing for too long",
            )));
        }
        Poll::Pending
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.judge(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.judge(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.judge(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // TLS writes its close_notify here, and waits for the socket to take it.
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.judge(cx, poll)
    }
}

/// A stream read from `prefix` first: the bytes this loop read and did not answer.
struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    fn new(inner: I, prefix: Bytes) -> Self {
        Rewind { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An advanced `Bytes` still holds its allocation: let it go.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_response_the_client_does_not_read_ends_the_connection_in_time() {
        let (mut server, _client) = tokio::io::duplex(64);
        let started = Instant::now();
        let sent = send_all(&mut server, &[b'x'; 1024]).await;
        assert_eq!(sent.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), WRITE_TIMEOUT);
    }

    #[tokio::test]
    async fn a_response_goes_out_whole_however_the_client_reads_it() {
        let (mut server, mut client) = tokio::io::duplex(64);
        let out: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        // More than the pipe holds: it waits for the reader.
        assert_eq!(send_all(&mut server, &out).await.unwrap(), Sent::Later);
        drop(server);
        assert_eq!(reader.await.unwrap(), out);
        // What the pipe holds goes at once.
        let (mut server, _client) = tokio::io::duplex(64);
        assert_eq!(send_all(&mut server, &[7; 64]).await.unwrap(), Sent::AtOnce);
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_read_slowly_goes_out_whole_while_the_client_keeps_reading() {
        let (mut server, mut client) = tokio::io::duplex(64);
        let out: Vec<u8> = (0..1024).map(|i| i as u8).collect();
        // 64 bytes each 29 s: eight minutes for the whole, progress within each 30 s.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 64];
            loop {
                tokio::time::sleep(WRITE_TIMEOUT - Duration::from_secs(1)).await;
                match client.read(&mut chunk).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&chunk[..n]),
                }
            }
        });
        let started = Instant::now();
        assert_eq!(send_all(&mut server, &out).await.unwrap(), Sent::Later);
        assert!(started.elapsed() > 4 * WRITE_TIMEOUT);
        drop(server);
        assert_eq!(reader.await.unwrap(), out);
    }

    #[test]
    fn the_read_buffer_gives_back_a_large_bodys_room() {
        // A head and a 64 KiB body, read in 8 KiB steps as the loop does.
        let mut buf = BytesMut::with_capacity(8 * 1024);
        while buf.len() < 66_000 {
            buf.reserve(8 * 1024);
            buf.extend_from_slice(&[b'1'; 6_000]);
        }
        buf.extend_from_slice(b"GET /next");
        buf.advance(66_000);
        assert!(buf.capacity() > KEPT_READ_ROOM, "{}", buf.capacity());
        give_back_room(&mut buf);
        assert!(buf.capacity() <= KEPT_READ_ROOM, "{}", buf.capacity());
        assert_eq!(&buf[..], b"GET /next", "what follows the body stays");
    }

    #[test]
    fn closing_is_said_in_the_head() {
        let mut out = b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\nbody".to_vec();
        say_close(&mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbody"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_connections_whose_client_stops_reading_time_out() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(server);
        // Progress within the timeout, however slow, keeps the connection.
        let writer = tokio::spawn(async move {
            io.write_all(&[1; 256]).await?;
            io.write_all(&[2; 256]).await?;
            Ok::<_, std::io::Error>(io)
        });
        let mut got = [0; 256];
        for _ in 0..2 {
            tokio::time::sleep(WRITE_TIMEOUT - Duration::from_secs(1)).await;
            client.read_exact(&mut got).await.unwrap();
        }
        assert_eq!(got, [2; 256]);
        let mut io = writer.await.unwrap().unwrap();
        // None: the write fails after the timeout.
        let started = Instant::now();
        let err = tokio::time::timeout(2 * WRITE_TIMEOUT, io.write_all(&[3; 256]))
            .await
            .expect("the write ends by itself")
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), WRITE_TIMEOUT);
    }

    #[test]
    fn the_plain_target_table_is_the_rule() {
        for b in 0..=255u8 {
            let rule = (0x21..0x7f).contains(&b) && !b"\"#<>\\^`{|}".contains(&b);
            assert_eq!(plain_target_byte(b), rule, "byte {b:#04x}");
        }
    }

    #[test]
    fn the_end_of_a_head_is_found_with_either_line_ending() {
        assert!(may_end_head(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n"));
        assert!(may_end_head(b"GET / HTTP/1.1\nhost: h\n\n"));
        assert!(may_end_head(b"\n\r\n"));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nhost: h\r\n"));
        assert!(!may_end_head(b"\r\n\r"));
    }

    fn classify(head: &str) -> Option<(usize, bool)> {
        match parse(head.as_bytes(), 1024) {
            Head::Fast(len, fast) => Some((len, matches!(fast.what, What::Comet(_)))),
            Head::Partial => None,
            Head::Other => Some((0, false)),
        }
    }

    fn body_len(head: &str) -> Option<usize> {
        match parse(head.as_bytes(), 1024) {
            Head::Fast(_, fast) if matches!(fast.what, What::Write(_)) => Some(fast.body_len),
            _ => None,
        }
    }

    #[test]
    fn takes_plain_writes_with_a_length_within_the_bound() {
        let put = |headers: &str| format!("PUT /v1/kv/c/f/k HTTP/1.1\r\n{headers}\r\n");
        assert_eq!(body_len(&put("content-length: 12\r\n")), Some(12));
        assert_eq!(body_len(&put("Content-Length: 0\r\n")), Some(0));
        assert_eq!(body_len(&put("content-length: 1024\r\n")), Some(1024));
        for refused in [
            put(""),
            put("content-length: 1025\r\n"),
            put("content-length: 99999999999999999999\r\n"),
            put("content-length: 1a\r\n"),
            put("content-length: +1\r\n"),
            put("content-length: \r\n"),
            put("content-length: 1\r\ncontent-length: 1\r\n"),
            put("content-length: 1\r\ntransfer-encoding: chunked\r\n"),
            put("content-length: 1\r\nexpect: 100-continue\r\n"),
            "PUT /v1/kv/c/f/k?ttl=5s HTTP/1.1\r\ncontent-length: 1\r\n\r\n".into(),
            "PUT /readScope HTTP/1.1\r\ncontent-length: 1\r\n\r\n".into(),
            "POST /v1/kv/c/f/k HTTP/1.1\r\ncontent-length: 1\r\n\r\n".into(),
        ] {
            assert_eq!(classify(&refused), Some((0, false)), "{refused:?}");
        }
    }

    #[test]
    fn takes_plain_reads_only() {
        let plain = "GET /v1/kv/c/f/k HTTP/1.1\r\nhost: h\r\namphora-read-token: T\r\n\r\n";
        assert_eq!(classify(plain), Some((plain.len(), false)));
        let comet = "GET /v1/readScope?contextID=c&readToken=%41 HTTP/1.1\r\n\r\n";
        assert_eq!(classify(comet), Some((comet.len(), true)));
        // Pipelined: the first head's length only.
        let two = format!("{plain}{plain}");
        assert_eq!(classify(&two), Some((plain.len(), false)));
        for other in [
            "HEAD /v1/kv/c/f/k HTTP/1.1\r\n\r\n",
            "DELETE /v1/kv/c/f/k HTTP/1.1\r\n\r\n",
            "GET /v1/kv/c/f/k HTTP/1.0\r\n\r\n",
            "GET /v1/kv/c/f/k?x=1 HTTP/1.1\r\n\r\n",
            "GET /v1/kv/c/f/k%65 HTTP/1.1\r\n\r\n",
            "GET /v1/kv/c/f HTTP/1.1\r\n\r\n",
            "GET /v1/kv/c//k HTTP/1.1\r\n\r\n",
            "GET //readScope HTTP/1.1\r\n\r\n",
            "GET /healthz HTTP/1.1\r\n\r\n",
            "GET http://h/v1/kv/c/f/k HTTP/1.1\r\n\r\n",
            "GET /v1/kv/c/f/k{} HTTP/1.1\r\n\r\n",
            "GET /v1/kv/c/f/k HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET /v1/kv/c/f/k HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET /v1/kv/c/f/k HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /v1/kv/c/f/k HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            "GET /v1/kv/c/f/k HTTP/1.1\r\nupgrade: websocket\r\n\r\n",
            "GET /v1/kv/c/f/k HTTP/1.1\r\nbroken header\r\n\r\n",
        ] {
            assert_eq!(classify(other), Some((0, false)), "{other:?}");
        }
        let many = format!(
            "GET /v1/kv/c/f/k HTTP/1.1\r\n{}\r\n",
            "x-forwarded-for: 10.0.0.1\r\n".repeat(5)
        );
        assert_eq!(classify(&many), Some((0, false)));
        let too_many = format!(
            "GET /v1/kv/c/f/k HTTP/1.1\r\n{}\r\n",
            "x-a: 1\r\n".repeat(MAX_FAST_HEADERS + 1)
        );
        assert_eq!(classify(&too_many), Some((0, false)));
        assert_eq!(classify("GET /v1/kv/c/f/k HTTP/1.1\r\nhost: h\r\n"), None);
    }

    #[test]
    fn headers_are_taken_case_blind_and_first_wins() {
        let head = b"GET /v1/kv/c/f/k HTTP/1.1\r\nAmphora-Read-Token: one\r\namphora-read-token: two\r\nX-Request-Id: id\r\nX-Forwarded-For: 1.2.3.4\r\nx-forwarded-for: 5.6.7.8\r\n\r\n";
        let Head::Fast(_, fast) = parse(head, 0) else {
            panic!("a plain read")
        };
        assert_eq!(fast.headers.read_token, Some(&b"one"[..]));
        assert_eq!(fast.request_id, Some(&b"id"[..]));
        assert_eq!(
            fast.forwarded,
            [Some(&b"1.2.3.4"[..]), Some(&b"5.6.7.8"[..]), None, None]
        );
    }

    #[tokio::test]
    async fn rewind_reads_the_unanswered_bytes_then_the_stream() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Rewind::new(server, Bytes::from_static(b"GET / HTTP/1.1\r\n"));
        client.write_all(b"host: h\r\n\r\n").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\nhost: h\r\n\r\n");
        assert!(io.prefix.is_empty());
        // Small reads take the prefix a piece at a time.
        let (_client, server) = tokio::io::duplex(64);
        let mut io = Rewind::new(server, Bytes::from_static(b"abcdef"));
        let mut two = [0u8; 2];
        io.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"ab");
        assert_eq!(&io.prefix[..], b"cdef");
    }

    #[test]
    fn dates_are_http_dates() {
        let mut out = Vec::new();
        write_date(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        let parsed = httpdate::parse_http_date(text).unwrap();
        let age = SystemTime::now().duration_since(parsed).unwrap();
        assert!(age < Duration::from_secs(5), "{text}");
    }
}
