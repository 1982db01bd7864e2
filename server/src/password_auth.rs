//! Email-and-password accounts (`TALLY_PASSWORD_AUTH=1`): `POST /v1/auth/signup`, `login`,
//! `refresh`, `logout`, `verify`, `password/forgot`, `password/reset`.
//!
//! A password user's subject is `tally|<user id>`. Emails are unique among password accounts in
//! their canonical form ([`contract::canonical_email`]); a password account and an identity-provider user with the same email
//! are separate accounts and are never merged. A sign-up claims an admin-created pending user
//! of its email only once the email is verified.

use crate::account_tokens;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::login_limits::{self, ClientAddr};
use crate::mail::{self, Purpose};
use crate::users::{USER_COLUMNS, User};
use crate::{AppState, access_tokens, passwords, sessions};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tally_core::contract;
use uuid::Uuid;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/auth/signup", post(signup))
        .route("/v1/auth/login", post(login))
        .route("/v1/auth/refresh", post(refresh))
        .route("/v1/auth/logout", post(logout))
        .route("/v1/auth/verify", post(verify))
        .route("/v1/auth/password/forgot", post(forgot))
        .route("/v1/auth/password/reset", post(reset))
}

fn enabled(state: &AppState) -> ApiResult<()> {
    if state.config.password_auth {
        Ok(())
    } else {
        Err(ApiError::Status(StatusCode::NOT_FOUND, "password_auth_disabled", "password accounts are off on this server".into()))
    }
}

fn invalid_credentials() -> ApiError {
    ApiError::Unauthorized("invalid_credentials", "the email or the password is wrong".into())
}

/// Runs a password hash or check off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)
}

/// The answer of sign-up, login and refresh.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Session {
    /// Access token (`Authorization: Bearer`).
    pub access_token: String,
    /// Opaque refresh token (`POST /v1/auth/refresh`).
    pub refresh_token: String,
    /// Seconds the access token lives.
    pub expires_in: u64,
    /// The account.
    pub user: User,
}

async fn session(state: &AppState, user: User, refresh_token: String) -> ApiResult<Json<Session>> {
    let (access_token, expires_in) = access_tokens::issue(state, user.user_id)?;
    Ok(Json(Session { access_token, refresh_token, expires_in, user }))
}

async fn user_by_id(state: &AppState, client: &impl GenericClient, user_id: Uuid) -> ApiResult<User> {
    let r = client
        .query_opt(&format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = $1"), &[&user_id])
        .await?
        .ok_or_else(|| ApiError::Unauthorized("unknown_account", "this account does not exist".into()))?;
    Ok(User::from_row(&r, &state.config.admin_subjects))
}

/// Body of `POST /v1/auth/signup`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Signup {
    /// Email address (unique among password accounts, regardless of case).
    pub email: String,
    /// Password.
    pub password: String,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
}

/// `POST /v1/auth/signup`: a new password account (201), signed in; a verification mail goes
/// out. 409 `email_taken` when a password account has the email.
#[utoipa::path(
    operation_id = "password_auth_signup",
    post,
    path = "/v1/auth/signup",
    tag = "auth",
    request_body = Signup,
    responses((status = 201, description = "Signed up and in", body = Session)),
)]
pub async fn signup(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    JsonBody(b): JsonBody<Signup>,
) -> ApiResult<(StatusCode, Json<Session>)> {
    enabled(&state)?;
    let email = b.email.trim().to_string();
    let canonical = contract::canonical_email(&email)?;
    contract::password(&b.password)?;
    contract::display_name(b.display_name.as_deref())?;
    state.login_limits.attempt(&state.pool, state.now(), &addr).await?;
    let taken = || ApiError::Conflict("email_taken", "a password account with this email exists; sign in instead".into());
    let client = state.pool.get().await?;
    if client.query_opt("SELECT 1 FROM password_credentials WHERE email_canonical = $1", &[&canonical]).await?.is_some() {
        return Err(taken());
    }
    drop(client);
    let password = b.password.clone();
    let hash = blocking(move || passwords::hash(&password)).await?.map_err(ApiError::internal)?;
    let now = state.now();
    let user_id = Uuid::now_v7();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let r = tx
        .query_one(
            &format!(
                "INSERT INTO users (user_id, external_id, email, email_canonical, display_name, email_verified, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, false, $6, $6) RETURNING {USER_COLUMNS}"
            ),
            &[&user_id, &access_tokens::subject(user_id), &email, &canonical, &b.display_name, &now],
        )
        .await?;
    let inserted = tx
        .execute(
            "INSERT INTO password_credentials (user_id, email, email_canonical, password_hash, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT DO NOTHING",
            &[&user_id, &email, &canonical, &hash, &now],
        )
        .await?;
    if inserted == 0 {
        return Err(taken());
    }
    let token = account_tokens::issue(&tx, now, user_id, Purpose::Verify, &email).await?;
    let refresh = sessions::start(&state, &tx, user_id).await?;
    login_limits::signed_in(&tx, now, user_id, &addr).await?;
    tx.commit().await?;
    mail::send_in_background(&state, email, Purpose::Verify, token);
    let user = User::from_row(&r, &state.config.admin_subjects);
    Ok((StatusCode::CREATED, session(&state, user, refresh).await?))
}

/// Body of `POST /v1/auth/login`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// Email address.
    pub email: String,
    /// Password.
    pub password: String,
}

/// `POST /v1/auth/login`: 200 with a session; every failure is 401 `invalid_credentials` after
/// the same work (an unknown email is checked against a dummy hash); failures are limited per
/// (email, address), per address and per email from any address (429; the last one does not
/// hold an address that signed in to the account within 30 days). A disabled account with the
/// right password is 403.
#[utoipa::path(
    operation_id = "password_auth_login",
    post,
    path = "/v1/auth/login",
    tag = "auth",
    request_body = Login,
    responses((status = 200, description = "Signed in", body = Session)),
)]
pub async fn login(State(state): State<AppState>, ClientAddr(addr): ClientAddr, JsonBody(b): JsonBody<Login>) -> ApiResult<Json<Session>> {
    enabled(&state)?;
    let email = b.email.trim().to_string();
    // An address without a canonical form matches no account (and fails like an unknown one).
    let canonical = contract::canonical_email(&email).ok();
    let client = state.pool.get().await?;
    let found = client
        .query_opt(
            "SELECT c.user_id, c.password_hash, u.disabled_at IS NOT NULL FROM password_credentials c JOIN users u USING (user_id) \
             WHERE c.email_canonical = $1",
            &[&canonical],
        )
        .await?;
    let known_address = match &found {
        Some(r) => login_limits::signed_in_recently(&client, state.now(), r.get(0), &addr).await?,
        None => false,
    };
    drop(client);
    let attempt = state.login_limits.login(&state.pool, state.now(), &email, &addr, known_address).await?;
    let stored = found.as_ref().map(|r| r.get::<_, String>(1));
    let password = b.password.clone();
    // Past the length cap nothing is hashed: no stored password can be that long.
    let ok = password.len() <= contract::MAX_PASSWORD_BYTES && blocking(move || passwords::verify(&password, stored.as_deref())).await?;
    // A failure stays counted.
    let Some(row) = found.filter(|_| ok) else { return Err(invalid_credentials()) };
    state.login_limits.forgive(&state.pool, attempt).await?;
    if row.get::<_, bool>(2) {
        return Err(ApiError::AccountDisabled);
    }
    let user_id: Uuid = row.get(0);
    let client = state.pool.get().await?;
    login_limits::signed_in(&client, state.now(), user_id, &addr).await?;
    let refresh = sessions::start(&state, &client, user_id).await?;
    let user = user_by_id(&state, &client, user_id).await?;
    session(&state, user, refresh).await
}

/// Body of `POST /v1/auth/refresh` and `POST /v1/auth/logout`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    /// The refresh token.
    pub refresh_token: String,
}

/// `POST /v1/auth/refresh`: a new access token and the refresh token's successor.
#[utoipa::path(
    operation_id = "password_auth_refresh",
    post,
    path = "/v1/auth/refresh",
    tag = "auth",
    request_body = RefreshBody,
    responses((status = 200, description = "A new session (the refresh token rotates)", body = Session)),
)]
pub async fn refresh(State(state): State<AppState>, JsonBody(b): JsonBody<RefreshBody>) -> ApiResult<Json<Session>> {
    enabled(&state)?;
    let (user_id, next) = sessions::rotate(&state, &b.refresh_token).await?;
    let client = state.pool.get().await?;
    let user = user_by_id(&state, &client, user_id).await?;
    session(&state, user, next).await
}

/// `POST /v1/auth/logout`: ends the refresh token's session (204, also for unknown tokens).
#[utoipa::path(
    operation_id = "password_auth_logout",
    post,
    path = "/v1/auth/logout",
    tag = "auth",
    request_body = RefreshBody,
    responses((status = 204, description = "Signed out")),
)]
pub async fn logout(State(state): State<AppState>, JsonBody(b): JsonBody<RefreshBody>) -> ApiResult<StatusCode> {
    enabled(&state)?;
    sessions::end(&state, &b.refresh_token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /v1/auth/verify`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// The mailed token.
    pub token: String,
}

/// Marks the email of `user_id` verified and claims the admin-created pending user of that
/// email, if any: the credential and the subject pass to the pending user, and the account made
/// at sign-up (with what it recorded meanwhile) is removed. The first verification ends every
/// session and API key of the account (whoever signed up before the owner proved the address
/// loses what they held). Returns the user that now holds the credential.
async fn verified(state: &AppState, user_id: Uuid, email: &str) -> ApiResult<Uuid> {
    let now = state.now();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let first = tx
        .query_opt("SELECT email_verified_at IS NULL FROM password_credentials WHERE user_id = $1 FOR UPDATE", &[&user_id])
        .await?
        .is_some_and(|r| r.get::<_, bool>(0));
    if first {
        sessions::revoke_everything(state, &tx, user_id).await?;
    }
    state.user_cache.evict_user(user_id);
    tx.execute("UPDATE password_credentials SET email_verified_at = coalesce(email_verified_at, $2) WHERE user_id = $1", &[&user_id, &now])
        .await?;
    tx.execute("UPDATE users SET email_verified = true, updated_at = $2 WHERE user_id = $1", &[&user_id, &now]).await?;
    let canonical = contract::canonical_email(email).ok();
    let pending: Option<Uuid> = tx
        .query_opt("SELECT user_id FROM users WHERE email_canonical = $1 AND external_id IS NULL FOR UPDATE", &[&canonical])
        .await?
        .map(|r| r.get(0));
    let Some(pending) = pending else {
        tx.commit().await?;
        return Ok(user_id);
    };
    state.user_cache.evict_user(pending);
    state.user_cache.evict_user(user_id);
    tx.execute(
        "UPDATE users SET external_id = $2, email_verified = true, ver = ver + 1, updated_at = $3, \
         display_name = coalesce(display_name, (SELECT display_name FROM users WHERE user_id = $4)) WHERE user_id = $1",
        &[&pending, &access_tokens::subject(pending), &now, &user_id],
    )
    .await?;
    for table in ["password_credentials", "refresh_families", "refresh_tokens", "account_tokens", "login_successes"] {
        tx.execute(&format!("UPDATE {table} SET user_id = $2 WHERE user_id = $1"), &[&user_id, &pending]).await?;
    }
    tx.commit().await?;
    // The sign-up's own account is empty of credentials now; its rows go in their own
    // transaction (no transaction spans two users' data).
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    crate::accounts::delete_rows(&tx, user_id).await?;
    tx.commit().await?;
    state.tokens.forget(user_id);
    tracing::info!(%pending, "a verified password sign-up claimed a pending user");
    Ok(pending)
}

/// `POST /v1/auth/verify`: confirms the email of the token (once); answers the account.
#[utoipa::path(
    operation_id = "password_auth_verify",
    post,
    path = "/v1/auth/verify",
    tag = "auth",
    request_body = TokenBody,
    responses((status = 200, description = "The verified account", body = crate::users::User)),
)]
pub async fn verify(State(state): State<AppState>, JsonBody(b): JsonBody<TokenBody>) -> ApiResult<Json<User>> {
    enabled(&state)?;
    let client = state.pool.get().await?;
    let (user_id, email) = account_tokens::consume(&client, state.now(), &b.token, Purpose::Verify).await?;
    drop(client);
    let holder = verified(&state, user_id, &email).await?;
    let client = state.pool.get().await?;
    Ok(Json(user_by_id(&state, &client, holder).await?))
}

/// Body of `POST /v1/auth/password/forgot`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Forgot {
    /// Email address of the account.
    pub email: String,
}

/// `POST /v1/auth/password/forgot`: mails a reset token when a password account has the email;
/// always 202, whatever the email.
#[utoipa::path(
    operation_id = "password_auth_forgot",
    post,
    path = "/v1/auth/password/forgot",
    tag = "auth",
    request_body = Forgot,
    responses(
        (status = 202, description = "A reset mail is sent when the account exists", body = Object),
    ),
)]
pub async fn forgot(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    JsonBody(b): JsonBody<Forgot>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    enabled(&state)?;
    state.login_limits.attempt(&state.pool, state.now(), &addr).await?;
    let canonical = contract::canonical_email(&b.email).ok();
    let client = state.pool.get().await?;
    let found = client
        .query_opt(
            "SELECT c.user_id, c.email FROM password_credentials c JOIN users u USING (user_id) \
             WHERE c.email_canonical = $1 AND u.disabled_at IS NULL",
            &[&canonical],
        )
        .await?;
    if let Some(r) = found {
        let (user_id, email): (Uuid, String) = (r.get(0), r.get(1));
        let token = account_tokens::issue(&client, state.now(), user_id, Purpose::Reset, &email).await?;
        mail::send_in_background(&state, email, Purpose::Reset, token);
    }
    Ok((StatusCode::ACCEPTED, Json(json!({}))))
}

/// Body of `POST /v1/auth/password/reset`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reset {
    /// The mailed reset token.
    pub token: String,
    /// The new password.
    pub password: String,
}

/// `POST /v1/auth/password/reset`: sets a new password with a reset token (once; see
/// [`set_password`]), clears the account's failed logins, and (the mail having reached its
/// owner) marks the email verified.
#[utoipa::path(
    operation_id = "password_auth_reset",
    post,
    path = "/v1/auth/password/reset",
    tag = "auth",
    request_body = Reset,
    responses((status = 204, description = "The password is changed")),
)]
pub async fn reset(State(state): State<AppState>, JsonBody(b): JsonBody<Reset>) -> ApiResult<StatusCode> {
    enabled(&state)?;
    contract::password(&b.password)?;
    let password = b.password.clone();
    let hash = blocking(move || passwords::hash(&password)).await?.map_err(ApiError::internal)?;
    let now = state.now();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let (user_id, email) = account_tokens::consume(&tx, now, &b.token, Purpose::Reset).await?;
    let user = user_by_id(&state, &tx, user_id).await?;
    crate::users::ensure_enabled(&user)?;
    set_password(&state, &tx, user_id, &hash).await?;
    login_limits::clear_email(&tx, &email).await?;
    tx.commit().await?;
    verified(&state, user_id, &email).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stores a new password hash for `user_id` (a reset; a future password change calls it too):
/// every outstanding reset token of the account dies (an older mail cannot set the password
/// again), and every session and API key of the account is revoked.
pub async fn set_password(state: &AppState, tx: &impl GenericClient, user_id: Uuid, hash: &str) -> ApiResult<()> {
    let now = state.now();
    tx.execute("UPDATE password_credentials SET password_hash = $2, updated_at = $3 WHERE user_id = $1", &[&user_id, &hash, &now]).await?;
    tx.execute("UPDATE account_tokens SET used_at = $2 WHERE user_id = $1 AND purpose = 'reset' AND used_at IS NULL", &[&user_id, &now])
        .await?;
    sessions::revoke_everything(state, tx, user_id).await
}

/// How long a password account may stay unverified before [`delete_unverified`] removes it.
pub const UNVERIFIED_TTL: chrono::Duration = chrono::Duration::days(7);

/// Deletes the password accounts still unverified [`UNVERIFIED_TTL`] after sign-up, freeing
/// their addresses (an account prepared in someone else's name does not wait for them); returns
/// how many. An account whose subscription still renews is kept (and logged). Safe with
/// several replicas: each account goes with its user row locked (skipped when another
/// transaction holds it).
pub async fn delete_unverified(state: &AppState) -> ApiResult<u64> {
    let now = state.now();
    let client = state.pool.get().await?;
    let due: Vec<Uuid> = client
        .query(
            "SELECT user_id FROM password_credentials WHERE email_verified_at IS NULL AND created_at <= $1 ORDER BY created_at LIMIT 100",
            &[&(now - UNVERIFIED_TTL)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    let mut deleted = 0;
    for user_id in due {
        let mut client = state.pool.get().await?;
        let tx = client.transaction().await?;
        let Some(r) = tx
            .query_opt(&format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = $1 FOR NO KEY UPDATE SKIP LOCKED"), &[&user_id])
            .await?
        else {
            continue;
        };
        let user = User::from_row(&r, &state.config.admin_subjects);
        let still = tx
            .query_opt(
                "SELECT 1 FROM password_credentials WHERE user_id = $1 AND email_verified_at IS NULL AND created_at <= $2",
                &[&user_id, &(now - UNVERIFIED_TTL)],
            )
            .await?;
        if still.is_none() {
            continue;
        }
        match crate::accounts::remove(state, &tx, &user).await {
            Ok(()) => {}
            Err(ApiError::Conflict(..)) => {
                tracing::warn!(%user_id, "an unverified password account is kept: a subscription of it still renews");
                continue;
            }
            Err(e) => return Err(e),
        }
        tx.commit().await?;
        state.tokens.forget(user_id);
        state.user_cache.evict_user(user_id);
        deleted += 1;
    }
    if deleted > 0 {
        tracing::info!(deleted, "password accounts unverified for 7 days were deleted");
    }
    Ok(deleted)
}
