//! The one error type of the HTTP API: every failure maps to a status code and the body
//! `{"error": {"code", "message"}}` here, and nowhere else.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tally_core::wire::{ErrorBody, ErrorDetail};

/// `Retry-After` of a 503 `unavailable`, in seconds.
pub const RETRY_AFTER_SECS: u64 = 2;

/// An API failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{1}")]
    BadRequest(&'static str, String),
    /// 401: missing or invalid credentials.
    #[error("{1}")]
    Unauthorized(&'static str, String),
    /// 404: no such thing (also for other users' things).
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Any other 4xx/5xx status, with its code.
    #[error("{2}")]
    Status(StatusCode, &'static str, String),
    /// 404 with a specific code (`unknown_subject`, …).
    #[error("{1}")]
    Unknown(&'static str, String),
    /// 409: conflicts with the current state.
    #[error("{1}")]
    Conflict(&'static str, String),
    /// 403: an admin disabled the account.
    #[error("this account is disabled")]
    AccountDisabled,
    /// 410: the account was deleted.
    #[error("this account was deleted")]
    AccountDeleted,
    /// 413: the request is too large.
    #[error("{0}")]
    TooLarge(String),
    /// 422: well-formed but invalid.
    #[error("{1}")]
    Invalid(&'static str, String),
    /// 426: client protocol too old.
    #[error("{0}")]
    UpgradeRequired(String),
    /// 429: rate limited; retry after this many seconds.
    #[error("too many requests; retry in {0} s")]
    RateLimited(u64),
    /// 503: the database (or a turn to use it) is not available now; retry after
    /// [`RETRY_AFTER_SECS`].
    #[error("{0}")]
    Unavailable(String),
    /// A denied decision (`/v1/consume`, holds): its status, code and message, with the
    /// decision in the body.
    #[error("{}", .0.message)]
    Denied(Box<Denied>),
    /// 500: our fault; details are logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A denied decision: answered with `{"error": {"code", "message"}, "decision"}`.
#[derive(Debug)]
pub struct Denied {
    /// 402, 403, 422 or 429.
    pub status: StatusCode,
    /// `limit_reached`, `insufficient_credits`, `not_in_plan`, `rate_limited`, …
    pub code: &'static str,
    /// What happened, for people.
    pub message: String,
    /// The decision.
    pub decision: tally_core::Decision,
    /// `Retry-After` in seconds (rate limits).
    pub retry_after: Option<u64>,
}

impl From<tally_core::contract::Violation> for ApiError {
    fn from(v: tally_core::contract::Violation) -> Self {
        ApiError::Invalid(v.code, v.message)
    }
}

impl ApiError {
    /// Shorthand for a 422 with code `invalid_request`.
    pub fn invalid(msg: impl Into<String>) -> Self {
        ApiError::Invalid("invalid_request", msg.into())
    }
    /// Shorthand for an internal error.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
    }
    /// 404 `not_found` for `what`.
    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::NotFound(format!("{} not found", what.into()))
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The error's code (`invalid_request`, `not_found`, …).
    pub fn code(&self) -> &'static str {
        self.parts().1
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(c, _) => (StatusCode::BAD_REQUEST, c),
            ApiError::Unauthorized(c, _) => (StatusCode::UNAUTHORIZED, c),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Status(s, c, _) => (*s, c),
            ApiError::Unknown(c, _) => (StatusCode::NOT_FOUND, c),
            ApiError::Conflict(c, _) => (StatusCode::CONFLICT, c),
            ApiError::AccountDisabled => (StatusCode::FORBIDDEN, "account_disabled"),
            ApiError::AccountDeleted => (StatusCode::GONE, "account_deleted"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Invalid(c, _) => (StatusCode::UNPROCESSABLE_ENTITY, c),
            ApiError::UpgradeRequired(_) => (StatusCode::UPGRADE_REQUIRED, "upgrade_required"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Denied(d) => (d.status, d.code),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Denied(d) = self {
            let body = serde_json::json!({"error": {"code": d.code, "message": d.message}, "decision": d.decision});
            let mut resp = (d.status, axum::Json(body)).into_response();
            if let Some(secs) = d.retry_after {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            return resp;
        }
        let (status, code) = self.parts();
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal server error".to_string()
            }
            other => other.to_string(),
        };
        let body = ErrorBody { error: ErrorDetail { code: code.to_string(), message } };
        let mut resp = (status, axum::Json(body)).into_response();
        match self {
            ApiError::RateLimited(secs) => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            ApiError::Unavailable(_) => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            _ => {}
        }
        resp
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        ApiError::Internal(format!("json: {e}"))
    }
}

/// Whether a database error is transient — the connection broke, the server is stopping or
/// restarting, a timeout or a lock wait ran out, a serialization conflict — so that the same
/// request can succeed later (503), rather than a bug of ours (500).
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        // No SQLSTATE: an I/O error, a closed connection, a timeout on our side.
        return true;
    };
    let code = db.code().code();
    // 08: connection exception; 53: insufficient resources; 57: operator intervention
    // (57014 statement timeout / cancel, 57P01 admin shutdown, 57P03 cannot connect now);
    // 40001 serialization failure, 40P01 deadlock; 55P03 lock not available; 58: system error.
    ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c)) || ["40001", "40P01", "55P03"].contains(&code)
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            // Text Postgres cannot store (U+0000, invalid encoding): the caller's input.
            if code == "22021" || code == "22P05" {
                return ApiError::Invalid("invalid_text", "text must not contain U+0000 (NUL) or invalid characters".into());
            }
        }
        if is_transient(&e) {
            tracing::warn!(error = %e, "database unavailable");
            ::metrics::counter!("tally_db_unavailable_total").increment(1);
            return ApiError::Unavailable("the database is unavailable; retry shortly".into());
        }
        ApiError::Internal(format!("database: {e}"))
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        tracing::warn!(error = %e, "database pool unavailable");
        ::metrics::counter!("tally_db_unavailable_total").increment(1);
        ApiError::Unavailable("the database is unavailable; retry shortly".into())
    }
}

/// Middleware: every 4xx/5xx answer that is not JSON yet — the router's own 404 and 405, a
/// rejection of an extractor, a layer's status — gets the `{"error": {"code", "message"}}`
/// body (its `Allow` and `Retry-After` headers kept).
pub async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    // JSON already, or an HTML page of the operator console (which answers in HTML).
    let is_json = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let is_page = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    if is_json || is_page {
        return resp;
    }
    let err = match status {
        StatusCode::NOT_FOUND => ApiError::NotFound("no such route".into()),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed(format!("{method} is not allowed on {path}")),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge("request body exceeds the configured maximum (TALLY_MAX_BODY_BYTES)".into()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ApiError::Status(status, "unsupported_media_type", "send the body as JSON (Content-Type: application/json)".into())
        }
        StatusCode::REQUEST_TIMEOUT | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
            ApiError::Unavailable("the server could not answer in time; retry shortly".into())
        }
        StatusCode::TOO_MANY_REQUESTS => ApiError::RateLimited(1),
        s if s.is_server_error() => ApiError::Internal(format!("{s} without a body from {method} {path}")),
        StatusCode::BAD_REQUEST => {
            ApiError::BadRequest("bad_request", "the request could not be read (a malformed path parameter, query or header)".into())
        }
        s => ApiError::Status(s, "bad_request", format!("the request was refused ({})", s.canonical_reason().unwrap_or("client error"))),
    };
    let mut out = err.into_response();
    for h in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = resp.headers().get(&h) {
            out.headers_mut().insert(h, v.clone());
        }
    }
    out
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
