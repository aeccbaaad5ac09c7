//! The hot routes: plain reads and writes of one entry, and COMET reads, answered
//! without the router.
//!
//! `GET` and `PUT /v1/kv/{context}/{family}/{key}` are most of what a metadata
//! service answers, and `GET /readScope` most of what COMET clients ask. Through the router they pay for the parts the router needs in
//! general: the route service cloned and boxed per request, the path parameters
//! decoded into shared strings kept in the request's extensions, the extractors'
//! futures. For these two routes in their plain form the layer below matches the
//! path itself and calls `native::read_entry` or `native::write_entry`, the
//! functions the router's handlers call, with the same validation in the same order
//! (names, then headers, then body), so both ways give the same answer, errors
//! included. Measured with the harness (alternating 5 s runs over 100,000 entries,
//! 5 rounds each): gets 85.6k -> 110.6k per second, puts 28.7k -> 30.0k.
//!
//! Plain means: method `GET` or `PUT`; no query string; a path of exactly three
//! non-empty segments under `/v1/kv/` without percent-escapes (so each segment is
//! already its decoded name). A COMET read is `GET /readScope` or `GET /v1/readScope`
//! with any query string: it is answered by `comet::read_scope_answer`, which the
//! router's handler calls too. Anything else goes to the router.
//! [`crate::http::Observe`] wraps this layer, so request ids, metrics and logs are the
//! same either way.

use crate::http::{Shared, caller_of};
use crate::query::Query;
use crate::{comet, native};
use axum::extract::Request;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The future of a request answered by the hot route.
pub type HotFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// The layer in front of the router that answers plain entry reads itself.
#[derive(Clone)]
pub struct HotRoute<S> {
    inner: S,
    state: Shared,
}

impl<S> HotRoute<S> {
    /// `inner` (the router) behind the hot route.
    pub fn new(inner: S, state: Shared) -> Self {
        HotRoute { inner, state }
    }
}

impl<S> tower::Service<Request> for HotRoute<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, HotFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if is_comet_read(&req) {
            let state = self.state.clone();
            let caller = caller_of(&state, req.extensions(), req.headers(), "comet");
            let uri = req.into_parts().0.uri;
            return Either::Right(Box::pin(async move {
                Ok(comet::read_scope_answer(&state, &caller, uri.query()).await)
            }));
        }
        let Some(plain) = PlainEntry::of(&req) else {
            return Either::Left(self.inner.call(req));
        };
        let state = self.state.clone();
        let caller = caller_of(&state, req.extensions(), req.headers(), "native");
        // Names first, as the router's `EntryTarget` extractor does.
        let key = state
            .service
            .entry_key(plain.context, plain.family, plain.key);
        let (parts, body) = req.into_parts();
        Either::Right(Box::pin(async move {
            let answer = match (key, parts.method) {
                (Err(e), _) => Err(e),
                (Ok(key), Method::GET) => {
                    match native::header_token(&parts.headers, native::READ_TOKEN) {
                        Ok(read) => native::read_entry(&state, &caller, key, read).await,
                        Err(e) => Err(e),
                    }
                }
                (Ok(key), _) => {
                    let query = Query::default();
                    native::write_entry(&state, &caller, &key, &query, &parts.headers, body).await
                }
            };
            Ok(answer.unwrap_or_else(IntoResponse::into_response))
        }))
    }
}

/// A COMET read (see the module's documentation).
fn is_comet_read(req: &Request) -> bool {
    req.method() == Method::GET && is_comet_read_path(req.uri().path())
}

/// The paths of a COMET read.
pub(crate) fn is_comet_read_path(path: &str) -> bool {
    matches!(path, "/readScope" | "/v1/readScope")
}

/// The names of a plain entry request (see the module's documentation).
#[derive(Debug, PartialEq)]
pub(crate) struct PlainEntry<'r> {
    pub context: &'r str,
    pub family: &'r str,
    pub key: &'r str,
}

impl<'r> PlainEntry<'r> {
    fn of(req: &'r Request) -> Option<Self> {
        let method = req.method();
        if (method != Method::GET && method != Method::PUT) || req.uri().query().is_some() {
            return None;
        }
        Self::of_path(req.uri().path())
    }

    /// The names in the path of a plain entry request (whose method is `GET` or `PUT`
    /// and which has no query string).
    pub(crate) fn of_path(path: &'r str) -> Option<Self> {
        let rest = path.strip_prefix("/v1/kv/")?;
        if rest.contains('%') {
            return None;
        }
        let mut segments = rest.split('/');
        let (context, family, key) = (segments.next()?, segments.next()?, segments.next()?);
        if segments.next().is_some() || [context, family, key].contains(&"") {
            return None;
        }
        Some(PlainEntry {
            context,
            family,
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn request(method: Method, uri: &str) -> Request {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap()
    }

    #[test]
    fn takes_only_plain_entry_requests() {
        for method in [Method::GET, Method::PUT] {
            let r = request(method, "/v1/kv/ctx/fam/key");
            let names = PlainEntry::of(&r).map(|p| (p.context, p.family, p.key));
            assert_eq!(names, Some(("ctx", "fam", "key")));
        }
        for (method, uri) in [
            (Method::HEAD, "/v1/kv/ctx/fam/key"),
            (Method::DELETE, "/v1/kv/ctx/fam/key"),
            (Method::POST, "/v1/kv/ctx/fam/key"),
            (Method::GET, "/v1/kv/ctx/fam/key?x=1"),
            (Method::PUT, "/v1/kv/ctx/fam/key?ttl=5s"),
            (Method::GET, "/v1/kv/ctx/fam/key?"),
            (Method::GET, "/v1/kv/ctx/fam/k%65y"),
            (Method::PUT, "/v1/kv/c%74x/fam/key"),
            (Method::GET, "/v1/kv/ctx/fam"),
            (Method::GET, "/v1/kv/ctx/fam/key/"),
            (Method::GET, "/v1/kv/ctx/fam/key/history"),
            (Method::GET, "/v1/kv/ctx//key"),
            (Method::GET, "/v1/kvx/ctx/fam/key"),
            (Method::GET, "/readScope"),
        ] {
            let r = request(method.clone(), uri);
            assert_eq!(PlainEntry::of(&r), None, "{method} {uri}");
        }
    }

    #[test]
    fn takes_comet_reads_with_any_query() {
        for uri in [
            "/readScope",
            "/readScope?contextID=c&family=f&Key=k&readToken=r",
            "/v1/readScope?contextID=c",
            "/readScope?",
        ] {
            assert!(is_comet_read(&request(Method::GET, uri)), "{uri}");
        }
        for (method, uri) in [
            (Method::HEAD, "/readScope?contextID=c"),
            (Method::POST, "/readScope"),
            (Method::DELETE, "/v1/readScope"),
            (Method::GET, "/readScope/"),
            (Method::GET, "/readscope"),
            (Method::GET, "/v2/readScope"),
            (Method::GET, "/v1/v1/readScope"),
            (Method::GET, "/enumerateScope?contextID=c"),
            (Method::GET, "/v1/kv/ctx/fam/key"),
        ] {
            assert!(
                !is_comet_read(&request(method.clone(), uri)),
                "{method} {uri}"
            );
        }
    }
}
