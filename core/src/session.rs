//! A session with a Tally server's own accounts (email and password), for apps without an
//! identity provider: sign up or log in, then hand the session to [`crate::SyncOptions`]
//! ([`crate::SyncOptions::with_session`]). It supplies the short-lived access token and
//! refreshes it through `POST /v1/auth/refresh` before it expires (and once more when the
//! server says it has). Store [`PasswordSession::tokens`] in the Keychain or Keystore and
//! [`PasswordSession::resume`] from them on the next start.

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::sync::TokenProvider;
use crate::users::Profile;
use crate::wire::ErrorBody;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// An access token this close to its expiry is refreshed before a request.
pub const REFRESH_MARGIN: Duration = Duration::seconds(30);

/// The tokens of a session: what an app stores to resume it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTokens {
    /// The access token (`Authorization: Bearer`).
    pub access_token: String,
    /// The opaque refresh token (rotated on every refresh).
    pub refresh_token: String,
    /// When the access token expires.
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for SessionTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTokens").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// The account of a server answer (`user`).
#[derive(Debug, Deserialize)]
struct AccountUser {
    external_id: String,
    email: Option<String>,
    display_name: Option<String>,
    avatar_url: Option<String>,
}

/// The server's answer to sign-up, login and refresh.
#[derive(Deserialize)]
struct SessionAnswer {
    access_token: String,
    refresh_token: String,
    expires_in: i64,
    user: AccountUser,
}

/// A signed-in password account; a [`TokenProvider`] of its access token.
pub struct PasswordSession {
    server_url: String,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    tokens: Mutex<SessionTokens>,
    /// Serializes refreshes (a refresh token is single-use).
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for PasswordSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordSession").field("server_url", &self.server_url).finish_non_exhaustive()
    }
}

fn http() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| Error::Network(format!("cannot build HTTP client: {e}")))
}

/// Posts `body` to `path` and reads the answer as `T`; the server's errors become the
/// library's (`invalid_credentials` and the refresh failures: [`Error::Unauthorized`];
/// `account_disabled`: [`Error::AccountDisabled`]).
async fn post<T: serde::de::DeserializeOwned>(http: &reqwest::Client, server_url: &str, path: &str, body: serde_json::Value) -> Result<T> {
    let url = format!("{}{path}", server_url.trim_end_matches('/'));
    let resp = http.post(&url).json(&body).send().await.map_err(|e| Error::Network(format!("POST {path}: {e}")))?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(|e| Error::Network(format!("POST {path}: reading the answer: {e}")))?;
    if (200..300).contains(&status) {
        return serde_json::from_slice(&bytes).map_err(|e| Error::Server {
            status,
            code: "bad_response".into(),
            message: format!("unreadable answer of {path}: {e}"),
        });
    }
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (String::new(), String::from_utf8_lossy(&bytes).chars().take(200).collect()),
    };
    Err(match (status, code.as_str()) {
        (403, "account_disabled") => Error::AccountDisabled,
        (401, _) => Error::Unauthorized(format!("{code}: {message}")),
        _ => Error::Server { status, code, message },
    })
}

impl PasswordSession {
    fn from_answer(server_url: &str, http: reqwest::Client, clock: Arc<dyn Clock>, a: SessionAnswer) -> (Arc<PasswordSession>, Profile) {
        let expires_at = clock.now() + Duration::seconds(a.expires_in);
        let profile = Profile {
            external_id: a.user.external_id,
            email: a.user.email,
            display_name: a.user.display_name,
            avatar_url: a.user.avatar_url,
        };
        let tokens = SessionTokens { access_token: a.access_token, refresh_token: a.refresh_token, expires_at };
        let session = PasswordSession {
            server_url: server_url.to_string(),
            http,
            clock,
            tokens: Mutex::new(tokens),
            refreshing: tokio::sync::Mutex::new(()),
        };
        (Arc::new(session), profile)
    }

    /// Creates an account (`POST /v1/auth/signup`) and signs it in; the [`Profile`] is what
    /// [`crate::Tally::sign_in`] takes.
    pub async fn sign_up(
        server_url: &str,
        email: &str,
        password: &str,
        display_name: Option<&str>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Arc<PasswordSession>, Profile)> {
        crate::contract::canonical_email(email)?;
        crate::contract::password(password)?;
        let http = http()?;
        let body = serde_json::json!({"email": email, "password": password, "display_name": display_name});
        let a = post(&http, server_url, "/v1/auth/signup", body).await?;
        Ok(Self::from_answer(server_url, http, clock, a))
    }

    /// Signs in (`POST /v1/auth/login`); a wrong email or password is [`Error::Unauthorized`].
    pub async fn log_in(server_url: &str, email: &str, password: &str, clock: Arc<dyn Clock>) -> Result<(Arc<PasswordSession>, Profile)> {
        let http = http()?;
        let a = post(&http, server_url, "/v1/auth/login", serde_json::json!({"email": email, "password": password})).await?;
        Ok(Self::from_answer(server_url, http, clock, a))
    }

    /// A session from stored tokens.
    pub fn resume(server_url: &str, tokens: SessionTokens, clock: Arc<dyn Clock>) -> Result<Arc<PasswordSession>> {
        Ok(Arc::new(PasswordSession {
            server_url: server_url.to_string(),
            http: http()?,
            clock,
            tokens: Mutex::new(tokens),
            refreshing: tokio::sync::Mutex::new(()),
        }))
    }

    /// The current tokens (store them to [`PasswordSession::resume`] later).
    pub fn tokens(&self) -> SessionTokens {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Exchanges the refresh token for a new access token and its successor.
    pub async fn refresh(&self) -> Result<()> {
        let _one = self.refreshing.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<()> {
        let refresh_token = self.tokens().refresh_token;
        let a: SessionAnswer =
            post(&self.http, &self.server_url, "/v1/auth/refresh", serde_json::json!({"refresh_token": refresh_token})).await?;
        let expires_at = self.clock.now() + Duration::seconds(a.expires_in);
        *self.tokens.lock().unwrap_or_else(|e| e.into_inner()) =
            SessionTokens { access_token: a.access_token, refresh_token: a.refresh_token, expires_at };
        Ok(())
    }

    /// The access token, refreshed first when it expires within [`REFRESH_MARGIN`].
    pub async fn fresh_access_token(&self) -> Result<String> {
        let _one = self.refreshing.lock().await;
        if self.tokens().expires_at - self.clock.now() <= REFRESH_MARGIN {
            self.refresh_locked().await?;
        }
        Ok(self.tokens().access_token)
    }

    /// Ends the session on the server (`POST /v1/auth/logout`).
    pub async fn log_out(&self) -> Result<()> {
        let url = format!("{}/v1/auth/logout", self.server_url.trim_end_matches('/'));
        let resp = self
            .http
            .post(&url)
            .json(&serde_json::json!({"refresh_token": self.tokens().refresh_token}))
            .send()
            .await
            .map_err(|e| Error::Network(format!("POST /v1/auth/logout: {e}")))?;
        match resp.status().as_u16() {
            204 | 200 => Ok(()),
            status => Err(Error::Server { status, code: String::new(), message: "logout failed".into() }),
        }
    }
}

impl TokenProvider for PasswordSession {
    fn token(&self) -> Option<String> {
        Some(self.tokens().access_token)
    }
}
