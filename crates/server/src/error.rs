//! The one table of API errors: each error has exactly one HTTP status and one
//! stable code, whichever API (native or COMET) renders it.

use amphora_model::ModelError;
use amphora_store::StoreError;
use axum::http::StatusCode;

/// Every refusal the HTTP APIs can answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A required parameter or header is missing or empty.
    #[error("missing required parameter: {0}")]
    MissingParameter(&'static str),
    /// A parameter was given more than once.
    #[error("parameter given more than once: {0}")]
    DuplicateParameter(String),
    /// The query string is malformed (bad percent-encoding, not UTF-8).
    #[error("invalid query string: {0}")]
    InvalidQuery(String),
    /// A name (context, family, key) was refused.
    #[error("{0}")]
    InvalidName(ModelError),
    /// A token was refused (weak, or read and write equal).
    #[error("{0}")]
    InvalidToken(ModelError),
    /// Tokens were sent in the URL of the native API.
    #[error(
        "tokens must be sent in the Amphora-Read-Token and Amphora-Write-Token headers, never in the URL"
    )]
    TokenInQuery,
    /// The body is not valid JSON.
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// Any other malformed request (bad header, bad duration, bad cursor).
    #[error("{0}")]
    BadRequest(String),
    /// The operation needs a client certificate that chains to the client CA.
    #[error(
        "{0} needs a client certificate signed by a trusted authority; none was presented, or it is expired, self-signed or from another authority"
    )]
    ClientCertRequired(&'static str),
    /// Administrator rights are needed.
    #[error(
        "this endpoint needs the admin token (Authorization: Bearer) or an admin client certificate"
    )]
    AdminRequired,
    /// Too many token failures from this client on this context.
    #[error("too many failed token checks from this address on this context; retry in {0} s")]
    TooManyFailures(u64),
    /// The tokens do not match the entry's.
    #[error("tokens do not match this entry")]
    Forbidden,
    /// No such entry (or not visible with this read token).
    #[error("no such entry")]
    NotFound,
    /// No such route.
    #[error("no such endpoint: {0}")]
    RouteNotFound(String),
    /// The route exists but not with this method.
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    /// The request conflicts with the entry's state.
    #[error("{0}")]
    Conflict(String),
    /// An `If-Match` or `If-None-Match` precondition failed.
    #[error("{0}")]
    PreconditionFailed(String),
    /// The value is larger than the configured limit.
    #[error("{0}")]
    ValueTooLarge(ModelError),
    /// The request body is larger than the server accepts.
    #[error("request body too large: the limit is {0} bytes")]
    BodyTooLarge(usize),
    /// An answer without pagination (COMET's enumerateScope) would pass its bounds.
    #[error("{0}")]
    TooManyEntries(String),
    /// The request body stopped arriving.
    #[error("no part of the request body arrived for {0} s")]
    BodyTimeout(u64),
    /// A watch asked for changes older than the history the server keeps (the
    /// newest dropped revision).
    #[error(
        "changes up to revision {0} are no longer kept; read the entries again, then watch without a starting revision"
    )]
    Compacted(u64),
    /// Too many watch streams are open (in all, or from this client).
    #[error("too many watch streams open {0}; close some or retry later")]
    TooManyWatchers(&'static str),
    /// Too much work is waiting; retry after a short pause.
    #[error("server overloaded, retry shortly")]
    Overloaded,
    /// The store cannot serve now (closing, or its backend is down).
    #[error("service unavailable")]
    Unavailable(String),
    /// A bug or corrupted data; details go to the log only.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The table: HTTP status and stable code of each error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            MissingParameter(_) => (StatusCode::BAD_REQUEST, "missing_parameter"),
            DuplicateParameter(_) => (StatusCode::BAD_REQUEST, "duplicate_parameter"),
            InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            InvalidToken(ModelError::EqualTokens) => (StatusCode::BAD_REQUEST, "equal_tokens"),
            InvalidToken(_) => (StatusCode::BAD_REQUEST, "weak_token"),
            TokenInQuery => (StatusCode::BAD_REQUEST, "token_in_query"),
            InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ClientCertRequired(_) => (StatusCode::FORBIDDEN, "client_certificate_required"),
            AdminRequired => (StatusCode::FORBIDDEN, "admin_required"),
            TooManyFailures(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_failures"),
            NotFound => (StatusCode::NOT_FOUND, "not_found"),
            RouteNotFound(_) => (StatusCode::NOT_FOUND, "route_not_found"),
            MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "precondition_failed"),
            ValueTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "value_too_large"),
            BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            TooManyEntries(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_entries"),
            BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            Compacted(_) => (StatusCode::GONE, "history_compacted"),
            TooManyWatchers(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_watchers"),
            Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// Seconds after which a refused client may retry (the `Retry-After` header).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Overloaded | ApiError::TooManyWatchers(_) => Some(1),
            ApiError::TooManyFailures(s) => Some(*s),
            _ => None,
        }
    }

    /// The message a client sees. Server-side failures say little; their details
    /// travel with the response as [`ServerSideError`] and are logged with the request
    /// id.
    pub fn public_message(&self) -> String {
        self.to_string()
    }

    /// The hidden details of a 5xx error, for the log.
    pub fn server_side(&self) -> Option<ServerSideError> {
        match self {
            ApiError::Unavailable(detail) | ApiError::Internal(detail) => Some(ServerSideError {
                code: self.status_and_code().1,
                detail: detail.clone(),
            }),
            _ => None,
        }
    }
}

/// The details of a server-side failure, attached to its response (never sent) so
/// that the request's middleware logs them under the request id.
#[derive(Debug, Clone)]
pub struct ServerSideError {
    /// The stable code.
    pub code: &'static str,
    /// What went wrong.
    pub detail: String,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Overloaded => ApiError::Overloaded,
            StoreError::Compacted { compacted } => ApiError::Compacted(compacted),
            StoreError::Unavailable(m) => ApiError::Unavailable(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_error_is_4xx_and_codes_are_distinct_per_status() {
        let samples = [
            ApiError::MissingParameter("x"),
            ApiError::DuplicateParameter("x".into()),
            ApiError::InvalidQuery("x".into()),
            ApiError::InvalidName(ModelError::EmptyName(amphora_model::NameKind::Key)),
            ApiError::InvalidToken(ModelError::EqualTokens),
            ApiError::TokenInQuery,
            ApiError::InvalidJson("x".into()),
            ApiError::BadRequest("x".into()),
            ApiError::Forbidden,
            ApiError::ClientCertRequired("creating an entry"),
            ApiError::AdminRequired,
            ApiError::TooManyFailures(3),
            ApiError::NotFound,
            ApiError::RouteNotFound("/x".into()),
            ApiError::MethodNotAllowed("PATCH".into()),
            ApiError::Conflict("x".into()),
            ApiError::PreconditionFailed("x".into()),
            ApiError::ValueTooLarge(ModelError::ValueTooLarge { len: 2, max: 1 }),
            ApiError::BodyTooLarge(1),
            ApiError::TooManyEntries("x".into()),
            ApiError::Overloaded,
            ApiError::Compacted(1),
            ApiError::TooManyWatchers("in all"),
        ];
        let mut codes = std::collections::HashSet::new();
        for e in &samples {
            let (status, code) = e.status_and_code();
            assert!(status.is_client_error(), "{e:?}");
            assert!(codes.insert(code), "code {code} used twice");
        }
        assert_eq!(
            ApiError::Internal("secret detail".into()).public_message(),
            "internal error"
        );
    }
}
