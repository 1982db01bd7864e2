//! CORS for web front ends (`TALLY_CORS_ORIGINS`): the listed origins (or `*`) may call the API
//! from a browser with a bearer token. Credentials are never allowed — the API reads no cookies,
//! so a page on another origin can never ride on a user's browser session.

use axum::http::{HeaderName, HeaderValue, Method, header};
use std::time::Duration;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight answer.
const MAX_AGE: Duration = Duration::from_secs(600);

/// Checks every configured origin: `*`, or a `scheme://host[:port]` with no path.
pub fn check(origins: &[String]) -> Result<(), String> {
    for o in origins {
        if o == "*" {
            if origins.len() > 1 {
                return Err("TALLY_CORS_ORIGINS: `*` allows every origin and cannot be listed with others".into());
            }
            continue;
        }
        let url = reqwest::Url::parse(o).map_err(|e| format!("TALLY_CORS_ORIGINS: {o:?} is not an origin: {e}"))?;
        let origin = url.origin().ascii_serialization();
        if !matches!(url.scheme(), "http" | "https") || origin != *o {
            return Err(format!("TALLY_CORS_ORIGINS: {o:?} is not an origin (scheme://host[:port], no path or slash; {origin:?}?)"));
        }
    }
    Ok(())
}

/// The CORS layer of `origins` (checked by [`check`]): none allowed when empty.
pub fn layer(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([header::RETRY_AFTER, HeaderName::from_static("x-request-id")])
        .allow_credentials(false)
        .max_age(MAX_AGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        assert!(check(&[]).is_ok());
        assert!(check(&["*".into()]).is_ok());
        assert!(check(&["https://app.example.com".into(), "http://localhost:3000".into()]).is_ok());
        for bad in ["https://app.example.com/", "app.example.com", "ftp://x.example", "https://x.example/path", "null"] {
            assert!(check(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(check(&["*".into(), "https://a.example".into()]).is_err());
    }
}
