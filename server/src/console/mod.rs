//! The operator console: a small server-rendered web UI under `/console` for admins — user
//! search, a user's page (plan, subscriptions, credits, grants, devices and leases, a usage
//! chart), granting and revoking access, the plan catalog, and the webhook endpoints with their
//! deliveries and replay. Every page calls the same server functions as the JSON API; the
//! console only renders them.
//!
//! Security: an admin signs in with the bearer credential the API accepts (verified by
//! [`crate::auth::verify_bearer`]); the session lives in an `HttpOnly; SameSite=Strict;
//! Path=/console` cookie that only this module reads (the JSON API never reads cookies); every
//! POST carries the session's CSRF token; every answer has a strict Content-Security-Policy (no
//! inline script or style: the chart is a local script reading a `data-` attribute).

pub mod assets;
pub mod chart;
pub mod plans;
pub mod session;
pub mod users;
pub mod webhooks;

use crate::AppState;
use crate::error::ApiError;
use askama::Template;
use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

pub use session::{Operator, Posted};

/// The Content-Security-Policy of every console answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// One entry of the console's navigation bar.
pub struct NavItem {
    /// Link target.
    pub href: &'static str,
    /// Label.
    pub label: &'static str,
}

/// The navigation bar, in order: a new page adds its entry here and its routes in [`router`].
pub const NAV: &[NavItem] = &[
    NavItem { href: "/console/users", label: "Users" },
    NavItem { href: "/console/plans", label: "Plans" },
    NavItem { href: "/console/webhooks", label: "Webhooks" },
];

/// What the layout of every signed-in page shows: the navigation, who is signed in, and the
/// CSRF token of the sign-out form.
pub struct Layout {
    /// The navigation bar.
    pub nav: &'static [NavItem],
    /// The `href` of the current section.
    pub active: &'static str,
    /// Who is signed in (`granted_by` of what they grant).
    pub actor: String,
    /// The session's CSRF token.
    pub csrf: String,
}

impl Layout {
    /// The layout for `op` on the section `active`.
    pub fn new(op: &Operator, active: &'static str) -> Layout {
        Layout { nav: NAV, active, actor: op.admin.actor(), csrf: op.csrf.clone() }
    }
}

/// The console's routes (merged into [`crate::app`]).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/users") }))
        .route("/console/", get(|| async { Redirect::to("/console/users") }))
        .route("/console/sign-in", get(session::sign_in_page).post(session::sign_in))
        .route("/console/sign-out", post(session::sign_out))
        .route("/console/assets/{name}", get(assets::serve))
        .route("/console/users", get(users::search))
        .route("/console/users/{id}", get(users::show))
        .route("/console/users/{id}/grants", post(users::grant))
        .route("/console/users/{id}/grants/{grant_id}/revoke", post(users::revoke))
        .route("/console/plans", get(plans::show))
        .route("/console/webhooks", get(webhooks::list))
        .route("/console/webhooks/{id}", get(webhooks::show))
        .route("/console/webhooks/{id}/replay", post(webhooks::replay))
        .layer(axum::middleware::from_fn(security_headers))
}

/// Middleware: the headers of every console answer — CSP, no framing, no referrer, no caching.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// Why a console request failed: no valid session (a redirect to the sign-in page), or an
/// API error shown as a page with its status and code.
#[derive(Debug)]
pub enum ConsoleError {
    /// No session, or it ended: sign in again.
    SignIn,
    /// Any other failure.
    Api(ApiError),
}

impl<E: Into<ApiError>> From<E> for ConsoleError {
    fn from(e: E) -> Self {
        ConsoleError::Api(e.into())
    }
}

/// The page of a failed request.
#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage {
    status: u16,
    code: &'static str,
    message: String,
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let e = match self {
            ConsoleError::SignIn => return Redirect::to("/console/sign-in").into_response(),
            ConsoleError::Api(e) => e,
        };
        let (status, code) = (e.status(), e.code());
        let message = match &e {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal server error".to_string()
            }
            other => other.to_string(),
        };
        let page = ErrorPage { status: status.as_u16(), code, message };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, Html(format!("<!doctype html><title>{}</title>", status.as_u16()))).into_response(),
        }
    }
}

/// Renders `page` as a 200 HTML answer.
pub fn render(page: &impl Template) -> Result<Response, ConsoleError> {
    render_with(StatusCode::OK, page)
}

/// Renders `page` as an HTML answer with `status`.
pub fn render_with(status: StatusCode, page: &impl Template) -> Result<Response, ConsoleError> {
    let html = page.render().map_err(ApiError::internal)?;
    Ok((status, Html(html)).into_response())
}

/// A time as pages show it (`2026-05-01 12:00 UTC`).
pub fn when(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// An optional time as pages show it (`—` when absent).
pub fn when_opt(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map_or_else(|| "—".to_string(), when)
}
