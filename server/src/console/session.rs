//! Console sessions: sign-in with an admin's bearer credential (verified exactly as the API
//! verifies it), a random session id in the `tally_console` cookie (stored as its SHA-256 with
//! an expiry from the server's clock), the CSRF token derived from the session id, and
//! sign-out. Each request re-reads the admin behind the session, so a revoked key, a disabled
//! user or a lost admin flag ends its sessions at once.

use super::{ConsoleError, render_with};
use crate::AppState;
use crate::auth::{Admin, Principal};
use crate::error::ApiError;
use crate::login_limits::ClientAddr;
use crate::{api_keys, users};
use askama::Template;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Duration;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The session cookie.
pub const SESSION_COOKIE: &str = "tally_console";
/// The cookie of the sign-in form's CSRF token (before any session exists).
pub const LOGIN_COOKIE: &str = "tally_console_login";
/// Largest console form body.
const MAX_FORM_BYTES: usize = 16 * 1024;
/// How long a sign-in form stays valid, in seconds.
const LOGIN_FORM_SECS: i64 = 600;

type HmacSha256 = Hmac<Sha256>;

fn hash(session_id: &str) -> String {
    hex::encode(Sha256::digest(session_id.as_bytes()))
}

fn csrf_mac(session_id: &str) -> Result<HmacSha256, ApiError> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(session_id.as_bytes()).map_err(ApiError::internal)?;
    mac.update(b"tally-console-csrf");
    Ok(mac)
}

/// The CSRF token of a session: an HMAC of a fixed label under the session id, so it is
/// never stored and only the cookie's holder can know it.
pub fn csrf_token(session_id: &str) -> Result<String, ApiError> {
    Ok(hex::encode(csrf_mac(session_id)?.finalize().into_bytes()))
}

/// Whether `presented` is the CSRF token of `session_id` (in constant time).
fn csrf_matches(session_id: &str, presented: &str) -> Result<bool, ApiError> {
    let Ok(bytes) = hex::decode(presented) else { return Ok(false) };
    Ok(csrf_mac(session_id)?.verify_slice(&bytes).is_ok())
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether cookies get the `Secure` flag: `TALLY_PUBLIC_URL` is https, or the request came
/// over TLS (to a TLS-terminating proxy that says so in `X-Forwarded-Proto`).
fn secure(state: &AppState, parts_headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    let public = state.config.public_url.as_deref().is_some_and(|u| u.to_ascii_lowercase().starts_with("https://"));
    let forwarded = parts_headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("https"));
    public || forwarded || uri.scheme_str() == Some("https")
}

/// A `Set-Cookie` value scoped to the console.
fn set_cookie(name: &str, value: &str, max_age: i64, secure: bool) -> Result<HeaderValue, ApiError> {
    let flag = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{name}={value}; HttpOnly{flag}; SameSite=Strict; Path=/console; Max-Age={max_age}"))
        .map_err(ApiError::internal)
}

fn random_id() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// A signed-in operator: the admin behind the session and the session's CSRF token.
pub struct Operator {
    /// The admin (a user with `is_admin`, or an `admin`-scoped API key).
    pub admin: Admin,
    /// The CSRF token every form of this session carries.
    pub csrf: String,
    session_id: String,
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ConsoleError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ConsoleError> {
        let session_id = cookie(&parts.headers, SESSION_COOKIE).ok_or(ConsoleError::SignIn)?;
        let principal = load(state, &session_id).await?.ok_or(ConsoleError::SignIn)?;
        let csrf = csrf_token(&session_id)?;
        Ok(Operator { admin: Admin(principal), csrf, session_id })
    }
}

/// The admin behind a session id while the session is unexpired and its admin still is one.
async fn load(state: &AppState, session_id: &str) -> Result<Option<Principal>, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT user_id, key_id FROM console_sessions WHERE session_hash = $1 AND expires_at > $2",
            &[&hash(session_id), &state.now()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let principal = match (row.get::<_, Option<Uuid>>(0), row.get::<_, Option<Uuid>>(1)) {
        (Some(uid), _) => {
            users::by_id(&client, uid, &state.config.admin_subjects).await?.filter(|u| u.disabled_at.is_none()).map(Principal::User)
        }
        (None, Some(kid)) => api_keys::active_by_id(&client, kid).await?.map(Principal::Key),
        (None, None) => None,
    };
    Ok(principal.filter(Principal::is_admin))
}

/// A console form, posted by a signed-in operator with the session's CSRF token (field
/// `csrf`): anything else is refused (403 `invalid_csrf`) before the handler runs.
pub struct Posted<T> {
    /// Who posted it.
    pub op: Operator,
    /// The form's fields.
    pub form: T,
}

#[derive(Deserialize)]
struct CsrfField {
    #[serde(default)]
    csrf: String,
}

fn parse_form<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_urlencoded::from_bytes(bytes)
        .map_err(|e| ApiError::Invalid("invalid_form", crate::extract::describe("", &e.to_string()).replace("the body", "the form")))
}

impl<T: DeserializeOwned> FromRequest<AppState> for Posted<T> {
    type Rejection = ConsoleError;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, ConsoleError> {
        let (mut parts, body) = req.into_parts();
        let op = Operator::from_request_parts(&mut parts, state).await?;
        let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
            .await
            .map_err(|_| ApiError::TooLarge(format!("a console form is at most {MAX_FORM_BYTES} bytes")))?;
        let CsrfField { csrf } = parse_form(&bytes)?;
        if !csrf_matches(&op.session_id, &csrf)? {
            return Err(invalid_csrf().into());
        }
        Ok(Posted { op, form: parse_form(&bytes)? })
    }
}

fn invalid_csrf() -> ApiError {
    ApiError::Status(
        StatusCode::FORBIDDEN,
        "invalid_csrf",
        "this form did not come from this console session (CSRF check failed); nothing was changed — reload the page and try again".into(),
    )
}

/// The sign-in page.
#[derive(Template)]
#[template(path = "console/sign_in.html")]
struct SignInPage {
    login_csrf: String,
    error: Option<String>,
}

/// The sign-in page with a fresh form token (in its cookie and the form).
fn sign_in_form(state: &AppState, headers: &HeaderMap, uri: &axum::http::Uri, status: StatusCode, error: Option<String>) -> Response {
    let token = random_id();
    let page = SignInPage { login_csrf: token.clone(), error };
    let mut resp = match render_with(status, &page) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match set_cookie(LOGIN_COOKIE, &token, LOGIN_FORM_SECS, secure(state, headers, uri)) {
        Ok(v) => {
            resp.headers_mut().append(header::SET_COOKIE, v);
            resp
        }
        Err(e) => ConsoleError::from(e).into_response(),
    }
}

/// `GET /console/sign-in`: the form taking an admin token or API key.
pub async fn sign_in_page(State(state): State<AppState>, headers: HeaderMap, uri: axum::http::Uri) -> Response {
    sign_in_form(&state, &headers, &uri, StatusCode::OK, None)
}

/// The sign-in form's fields.
#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    login_csrf: String,
}

/// `POST /console/sign-in`: verifies the token as the API does; an admin's starts a session
/// (303 to the user search), anything else shows the form again with the reason (401, or 403
/// for a form without its token) and starts nothing. Failed sign-ins are limited per client
/// address like failed logins: past the limit the form comes back with 429 and `Retry-After`,
/// and no token is checked.
pub async fn sign_in(State(state): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let refuse = |status: StatusCode, msg: String| sign_in_form(&state, &parts.headers, &parts.uri, status, Some(msg));
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large".into());
    };
    let form: SignInForm = match parse_form(&bytes) {
        Ok(f) => f,
        Err(e) => return refuse(e.status(), e.to_string()),
    };
    let expected = cookie(&parts.headers, LOGIN_COOKIE).unwrap_or_default();
    let same: bool = !expected.is_empty() && expected.len() == form.login_csrf.len() && {
        // Constant time over the equal lengths.
        expected.bytes().zip(form.login_csrf.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    };
    if !same {
        return refuse(StatusCode::FORBIDDEN, "the sign-in form expired or did not come from this console; try again".into());
    }
    let token = form.token.trim();
    if token.is_empty() {
        return refuse(StatusCode::UNAUTHORIZED, "paste an admin's bearer token or an admin API key".into());
    }
    let ClientAddr(addr) = ClientAddr::of(&parts.extensions);
    let attempt = match state.login_limits.console(&state.pool, state.now(), &addr).await {
        Ok(a) => a,
        Err(ApiError::RateLimited(secs)) => {
            let mut resp = refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!("Too many failed sign-ins from this address: try again in {} minutes", secs.div_ceil(60)),
            );
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return resp;
        }
        Err(e) => return ConsoleError::from(e).into_response(),
    };
    let slot = parts.extensions.get::<crate::concurrency::TurnSlot>().cloned();
    // A failure stays counted; a right credential (or the server's own error) is forgiven.
    let principal = match crate::auth::verify_bearer(&state, token, slot).await {
        Ok((p, _)) => p,
        Err(e) if e.status().is_client_error() => return refuse(StatusCode::UNAUTHORIZED, format!("{} ({})", e, e.code())),
        Err(e) => {
            let forgiven = state.login_limits.forgive(&state.pool, attempt).await;
            return ConsoleError::from(forgiven.err().unwrap_or(e)).into_response();
        }
    };
    if !principal.is_admin() {
        return refuse(StatusCode::UNAUTHORIZED, "this credential is valid but not an admin's".into());
    }
    if let Err(e) = state.login_limits.forgive(&state.pool, attempt).await {
        return ConsoleError::from(e).into_response();
    }
    match start(&state, &principal).await {
        Ok(session_id) => {
            let secure = secure(&state, &parts.headers, &parts.uri);
            let ttl = i64::try_from(state.config.console_session_ttl_secs).unwrap_or(i64::MAX / 2).max(1);
            let mut resp = Redirect::to("/console/users").into_response();
            for cookie in [set_cookie(SESSION_COOKIE, &session_id, ttl, secure), set_cookie(LOGIN_COOKIE, "", 0, secure)] {
                match cookie {
                    Ok(v) => resp.headers_mut().append(header::SET_COOKIE, v),
                    Err(e) => return ConsoleError::from(e).into_response(),
                };
            }
            tracing::info!(actor = %Admin(principal).actor(), "console session started");
            resp
        }
        Err(e) => ConsoleError::from(e).into_response(),
    }
}

/// Stores a new session of `principal` (and drops expired ones); returns its id.
async fn start(state: &AppState, principal: &Principal) -> Result<String, ApiError> {
    let now = state.now();
    let ttl = i64::try_from(state.config.console_session_ttl_secs).unwrap_or(i64::MAX / 2).max(1);
    let (user_id, key_id) = match principal {
        Principal::User(u) => (Some(u.user_id), None),
        Principal::Key(k) => (None, Some(k.key_id)),
    };
    let session_id = random_id();
    let client = state.pool.get().await?;
    client.execute("DELETE FROM console_sessions WHERE expires_at <= $1", &[&now]).await?;
    client
        .execute(
            "INSERT INTO console_sessions (session_hash, user_id, key_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
            &[&hash(&session_id), &user_id, &key_id, &now, &(now + Duration::seconds(ttl))],
        )
        .await?;
    Ok(session_id)
}

/// The sign-out form's fields (the CSRF token only).
#[derive(Deserialize)]
pub struct NoFields {}

/// `POST /console/sign-out`: ends the session and clears its cookie.
pub async fn sign_out(State(state): State<AppState>, headers: HeaderMap, uri: axum::http::Uri, posted: Posted<NoFields>) -> Response {
    let ended = async {
        let client = state.pool.get().await?;
        client.execute("DELETE FROM console_sessions WHERE session_hash = $1", &[&hash(&posted.op.session_id)]).await?;
        set_cookie(SESSION_COOKIE, "", 0, secure(&state, &headers, &uri))
    };
    match ended.await {
        Ok(clear) => {
            let mut resp = Redirect::to("/console/sign-in").into_response();
            resp.headers_mut().append(header::SET_COOKIE, clear);
            resp
        }
        Err(e) => ConsoleError::from(e).into_response(),
    }
}
