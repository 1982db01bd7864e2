//! The one error type of the HTTP API: every failure maps to a status code and the body
//! `{"error": {"code", "message"}}` here, and nowhere else.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tally_core::wire::{ErrorBody, ErrorDetail};

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
    /// 404 with a specific code (`unknown_subject`, …).
    #[error("{1}")]
    Unknown(&'static str, String),
    /// 409: conflicts with the current state.
    #[error("{1}")]
    Conflict(&'static str, String),
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
    /// 503: not ready (database unreachable).
    #[error("{0}")]
    Unavailable(String),
    /// 500: our fault; details are logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
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

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(c, _) => (StatusCode::BAD_REQUEST, c),
            ApiError::Unauthorized(c, _) => (StatusCode::UNAUTHORIZED, c),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Unknown(c, _) => (StatusCode::NOT_FOUND, c),
            ApiError::Conflict(c, _) => (StatusCode::CONFLICT, c),
            ApiError::AccountDeleted => (StatusCode::GONE, "account_deleted"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Invalid(c, _) => (StatusCode::UNPROCESSABLE_ENTITY, c),
            ApiError::UpgradeRequired(_) => (StatusCode::UPGRADE_REQUIRED, "upgrade_required"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
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
        if let ApiError::RateLimited(secs) = self {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        ApiError::Internal(format!("json: {e}"))
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApiError::Internal(format!("database: {e}"))
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::Unavailable(format!("database unavailable: {e}"))
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
