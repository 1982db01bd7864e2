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
    /// 429 with its own code (`timezone_change_too_soon`): the same request succeeds after
    /// this many seconds.
    #[error("{1}")]
    TooSoon(&'static str, String, u64),
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

/// A denied decision: answered with `{"error": {"code", "message"}, "decision"}` (and
/// `decisions` for a use of several items).
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
    /// A use of several items: every item's decision, in order (`decision` is the first denial).
    pub decisions: Option<Vec<tally_core::Decision>>,
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
            ApiError::TooSoon(c, _, _) => (StatusCode::TOO_MANY_REQUESTS, c),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Denied(d) => (d.status, d.code),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Denied(d) = self {
            let mut body = serde_json::json!({"error": {"code": d.code, "message": d.message}, "decision": d.decision});
            if let Some(all) = d.decisions {
                body["decisions"] = serde_json::json!(all);
            }
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
            ApiError::RateLimited(secs) | ApiError::TooSoon(_, _, secs) => {
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
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // 08: connection exception; 53: insufficient resources; 57: operator intervention
        // (57014 statement timeout / cancel, 57P01 admin shutdown, 57P03 cannot connect now);
        // 40001 serialization failure, 40P01 deadlock; 55P03 lock not available; 58: system error.
        return ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c)) || ["40001", "40P01", "55P03"].contains(&code);
    }
    // No SQLSTATE: either the exchange with the server failed (the connection is closed, its
    // I/O failed, the server's answer broke the protocol, the client's own timeout), which
    // another connection may not meet; or the client refused something of ours before or after
    // the server answered (a value that does not convert to or from its column, a wrong
    // parameter or column count, `query_one` finding no row), which fails the same way every
    // time. Anything not known to be the first is the second.
    e.is_closed() || connection_io_failed(e) || EXCHANGE_FAILURES.contains(&e.to_string().as_str())
}

/// How tokio-postgres words the failures of an exchange with the server that carry no cause to
/// tell them by (the crate does not expose its error kinds): a message out of protocol order,
/// an answer it could not parse, its own timeout. The tests below pin these texts.
const EXCHANGE_FAILURES: [&str; 3] = ["unexpected message from server", "error parsing response from server", "timeout waiting for server"];

/// Whether `e` was caused by an I/O error of the connection (reset, refused, end of stream, …);
/// not one of ours (`InvalidInput`, `InvalidData`: a message we could not encode).
fn connection_io_failed(e: &tokio_postgres::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return !matches!(io.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData);
        }
        cause = c.source();
    }
    false
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

#[cfg(test)]
mod tests {
    //! Database errors without a SQLSTATE, made by a real tokio-postgres client against a
    //! scripted server on an in-memory stream: a broken exchange is 503, our own bug is 500.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_postgres::{Client, NoTls};

    /// One backend message: its tag, length and body.
    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let len = i32::try_from(body.len() + 4).unwrap();
        let mut out = vec![tag];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn ready() -> Vec<u8> {
        msg(b'Z', b"I")
    }

    /// Reads one frontend message; `None` at the end of the stream.
    async fn read_msg(s: &mut DuplexStream) -> Option<u8> {
        let tag = s.read_u8().await.ok()?;
        let len = s.read_i32().await.ok()?;
        let mut body = vec![0; usize::try_from(len - 4).ok()?];
        s.read_exact(&mut body).await.ok()?;
        Some(tag)
    }

    /// A client of a server that takes the startup, then answers the n-th `Sync` or `Query`
    /// with `script[n]`; past the script it closes the stream.
    async fn client(script: Vec<Vec<u8>>) -> Client {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let len = theirs.read_i32().await.unwrap();
            let mut startup = vec![0; usize::try_from(len - 4).unwrap()];
            theirs.read_exact(&mut startup).await.unwrap();
            let auth_ok = msg(b'R', &0i32.to_be_bytes());
            theirs.write_all(&[auth_ok, ready()].concat()).await.unwrap();
            for answer in script {
                while let Some(tag) = read_msg(&mut theirs).await {
                    if tag == b'S' || tag == b'Q' {
                        break;
                    }
                }
                theirs.write_all(&answer).await.unwrap();
            }
        });
        let mut config = tokio_postgres::Config::new();
        config.user("tally");
        let (client, conn) = config.connect_raw(ours, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    /// The answers to preparing a statement with no parameters and the columns `row_description`
    /// (`None`: no columns).
    fn prepared(row_description: Option<Vec<u8>>) -> Vec<u8> {
        let columns = row_description.map_or_else(|| msg(b'n', b""), |d| msg(b'T', &d));
        [msg(b'1', b""), msg(b't', &0i16.to_be_bytes()), columns, ready()].concat()
    }

    /// One `int4` column named `n`.
    fn int4_column() -> Vec<u8> {
        let mut d = 1i16.to_be_bytes().to_vec();
        d.extend_from_slice(b"n\0");
        d.extend_from_slice(&0i32.to_be_bytes()); // table
        d.extend_from_slice(&0i16.to_be_bytes()); // column
        d.extend_from_slice(&23i32.to_be_bytes()); // int4
        d.extend_from_slice(&4i16.to_be_bytes()); // size
        d.extend_from_slice(&(-1i32).to_be_bytes()); // modifier
        d.extend_from_slice(&1i16.to_be_bytes()); // binary
        d
    }

    fn api(e: tokio_postgres::Error) -> (StatusCode, &'static str) {
        assert!(e.as_db_error().is_none(), "{e}: has a SQLSTATE");
        let api = ApiError::from(e);
        (api.status(), api.code())
    }

    #[tokio::test]
    async fn a_closed_connection_is_503() {
        let c = client(vec![]).await;
        let e = c.batch_execute("SELECT 1").await.unwrap_err();
        assert!(e.is_closed(), "{e:?}");
        assert_eq!(api(e), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"));
    }

    #[tokio::test]
    async fn an_answer_out_of_protocol_order_is_503() {
        let c = client(vec![[msg(b'2', b""), ready()].concat()]).await;
        let e = c.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(e.to_string(), "unexpected message from server");
        assert_eq!(api(e), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"));
    }

    #[test]
    fn the_clients_own_timeout_is_503() {
        let e = tokio_postgres::Error::__private_api_timeout();
        assert_eq!(e.to_string(), "timeout waiting for server");
        assert_eq!(api(e), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"));
    }

    #[tokio::test]
    async fn query_one_finding_no_row_is_500() {
        let executed = [msg(b'2', b""), msg(b'C', b"SELECT 0\0"), ready()].concat();
        let c = client(vec![prepared(None), executed]).await;
        let e = c.query_one("SELECT 1 WHERE false", &[]).await.unwrap_err();
        assert_eq!(e.to_string(), "query returned an unexpected number of rows");
        assert_eq!(api(e), (StatusCode::INTERNAL_SERVER_ERROR, "internal"));
    }

    #[tokio::test]
    async fn a_column_read_as_the_wrong_type_is_500() {
        let mut row = 1i16.to_be_bytes().to_vec();
        row.extend_from_slice(&4i32.to_be_bytes());
        row.extend_from_slice(&7i32.to_be_bytes());
        let executed = [msg(b'2', b""), msg(b'D', &row), msg(b'C', b"SELECT 1\0"), ready()].concat();
        let c = client(vec![prepared(Some(int4_column())), executed]).await;
        let rows = c.query("SELECT 7 AS n", &[]).await.unwrap();
        assert_eq!(rows[0].get::<_, i32>(0), 7);
        let e = rows[0].try_get::<_, String>(0).unwrap_err();
        assert_eq!(api(e), (StatusCode::INTERNAL_SERVER_ERROR, "internal"));
        let e = rows[0].try_get::<_, i32>("missing").unwrap_err();
        assert_eq!(api(e), (StatusCode::INTERNAL_SERVER_ERROR, "internal"));
    }

    #[tokio::test]
    async fn a_wrong_parameter_count_is_500() {
        let c = client(vec![prepared(None)]).await;
        let e = c.execute("SELECT 1", &[&1i32]).await.unwrap_err();
        assert_eq!(e.to_string(), "expected 0 parameters but got 1");
        assert_eq!(api(e), (StatusCode::INTERNAL_SERVER_ERROR, "internal"));
    }

    #[tokio::test]
    async fn a_statement_that_cannot_be_encoded_is_500() {
        // A query text with a NUL byte: refused by the client's encoder (an I/O error of kind
        // InvalidInput, not of the connection).
        let c = client(vec![]).await;
        let e = c.batch_execute("SELECT 1\0").await.unwrap_err();
        assert_eq!(e.to_string(), "error encoding message to server");
        assert_eq!(api(e), (StatusCode::INTERNAL_SERVER_ERROR, "internal"));
    }
}
