//! Users: the repository of server-side users — resolving a verified identity to its user
//! (created on first sign-in, or claimed from a pending admin-created user), looking users up
//! for backends, locking a user's row, and profile edits. Handlers and billing call it; it calls
//! no handler.

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tally_core::wire::{ProfilePatch, ProfileRejected};
use uuid::Uuid;

/// Claims read from an identity token.
#[derive(Debug, Clone, Deserialize)]
pub struct IdClaims {
    /// Subject (the user's external id).
    pub sub: String,
    /// Email address.
    #[serde(default)]
    pub email: Option<String>,
    /// Whether the identity provider verified the email.
    #[serde(default)]
    pub email_verified: Option<bool>,
    /// Issued at (Unix seconds).
    #[serde(default)]
    pub iat: Option<i64>,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
}

/// A server-side user.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct User {
    /// Server user id.
    #[serde(rename = "id")]
    pub user_id: Uuid,
    /// Identity provider subject (`None` for a pending user).
    pub external_id: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Avatar URL.
    pub avatar_url: Option<String>,
    /// IANA timezone: in `GET /v1/me`, the zone in force; in the row, the latest asked for
    /// (a change may be pending, see [`crate::timezones`]).
    pub timezone: String,
    /// Admin (flag in the database or subject listed in TALLY_ADMIN_SUBJECTS).
    pub is_admin: bool,
    /// Entitlement version of the user row.
    #[serde(skip)]
    pub ver: i64,
    /// Creation time (billing anchor without a subscription).
    pub created_at: DateTime<Utc>,
    /// Last profile change.
    pub updated_at: DateTime<Utc>,
    /// When an admin disabled the account (`None`: enabled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<DateTime<Utc>>,
    /// Whether the email is verified (by the identity provider, or by the mailed token).
    #[serde(skip)]
    pub email_verified: bool,
}

/// Columns read into a [`User`], in order.
pub const USER_COLUMNS: &str =
    "user_id, external_id, email, display_name, avatar_url, timezone, is_admin, ver, created_at, updated_at, disabled_at, email_verified";

impl User {
    /// Reads a row selected with [`USER_COLUMNS`]; `admins` are the configured admin subjects.
    pub fn from_row(r: &tokio_postgres::Row, admins: &[String]) -> User {
        let external_id: Option<String> = r.get(1);
        let listed = external_id.as_ref().is_some_and(|s| admins.iter().any(|a| a == s));
        User {
            user_id: r.get(0),
            external_id,
            email: r.get(2),
            display_name: r.get(3),
            avatar_url: r.get(4),
            timezone: r.get(5),
            is_admin: r.get::<_, bool>(6) || listed,
            ver: r.get(7),
            created_at: r.get(8),
            updated_at: r.get(9),
            disabled_at: r.get(10),
            email_verified: r.get(11),
        }
    }
}

/// Hash of a subject, kept in account tombstones.
pub fn sub_hash(sub: &str) -> String {
    hex::encode(Sha256::digest(sub.as_bytes()))
}

/// Finds the user of a verified identity token: refuses subjects deleted after the token was
/// issued (410), claims a pending user with the same verified email, or creates a new user on
/// the free plan. Race-safe: concurrent first requests make one user.
pub async fn resolve(state: &AppState, claims: &IdClaims) -> ApiResult<User> {
    resolve_on(state, &state.pool.get().await?, claims).await
}

/// The user and the subject's tombstone in one statement (the one query of an authenticated
/// request whose user exists).
static USER_AND_TOMBSTONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {USER_COLUMNS}, deleted_at FROM (SELECT 1) AS one \
         LEFT JOIN users ON external_id = $1 LEFT JOIN account_tombstones ON sub_hash = $2"
    )
});

/// [`resolve`] on a connection the caller holds (and goes on using).
pub async fn resolve_on(state: &AppState, client: &deadpool_postgres::Object, claims: &IdClaims) -> ApiResult<User> {
    let admins = &state.config.admin_subjects;
    let generation = state.user_cache.generation();
    let r = client.query_one(&client.prepare_cached(&USER_AND_TOMBSTONE).await?, &[&claims.sub, &sub_hash(&claims.sub)]).await?;
    let deleted_at = r.get::<_, Option<DateTime<Utc>>>(USER_COLUMNS.split(',').count());
    if let Some(deleted) = deleted_at
        && claims.iat.is_none_or(|iat| iat <= deleted.timestamp())
    {
        return Err(ApiError::AccountDeleted);
    }
    if r.get::<_, Option<Uuid>>(0).is_some() {
        let user = User::from_row(&r, admins);
        state.user_cache.put(&user, deleted_at, generation);
        return Ok(user);
    }
    let select = format!("SELECT {USER_COLUMNS} FROM users WHERE external_id = $1");
    let canonical = claims.email.as_deref().and_then(|e| tally_core::contract::canonical_email(e).ok());
    if let (Some(canonical), Some(true)) = (&canonical, claims.email_verified) {
        let claim = format!(
            "UPDATE users SET external_id = $1, updated_at = now(), display_name = coalesce(display_name, $3), email_verified = true \
             WHERE email_canonical = $2 AND external_id IS NULL RETURNING {USER_COLUMNS}"
        );
        match client.query_opt(&claim, &[&claims.sub, canonical, &claims.name]).await {
            Ok(Some(r)) => return Ok(User::from_row(&r, admins)),
            Ok(None) => {}
            // Another request claimed it for the same subject meanwhile: read it below.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if claims.sub.starts_with(tally_core::contract::PASSWORD_SUBJECT_PREFIX) {
        // Password accounts are made by sign-up only, never by a first request.
        return Err(ApiError::Unauthorized("unknown_account", "this account does not exist".into()));
    }
    client
        .execute(
            "INSERT INTO users (user_id, external_id, email, email_canonical, display_name, email_verified) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (external_id) DO NOTHING",
            &[&Uuid::now_v7(), &claims.sub, &claims.email, &canonical, &claims.name, &(claims.email.is_some() && claims.email_verified == Some(true))],
        )
        .await?;
    let r = client.query_one(&select, &[&claims.sub]).await?;
    let user = User::from_row(&r, admins);
    state.user_cache.put(&user, deleted_at, generation);
    Ok(user)
}

/// 403 `account_disabled` when an admin disabled `user`.
pub fn ensure_enabled(user: &User) -> ApiResult<()> {
    if user.disabled_at.is_some() { Err(ApiError::AccountDisabled) } else { Ok(()) }
}

/// 403 `email_unverified` when `user` is a password account whose email is not verified yet:
/// creating API keys and storing secrets wait for the verification, so an account prepared in
/// someone else's name cannot hold credentials before its address is proven. (An identity
/// provider's user is vouched for by the provider.)
pub fn ensure_email_verified(user: &User) -> ApiResult<()> {
    let password_account = user.external_id.as_deref().is_some_and(|s| s.starts_with(tally_core::contract::PASSWORD_SUBJECT_PREFIX));
    if password_account && !user.email_verified {
        return Err(ApiError::Status(
            axum::http::StatusCode::FORBIDDEN,
            "email_unverified",
            "verify your email first (the link in the mail sent at sign-up)".into(),
        ));
    }
    Ok(())
}

/// Finds a user by external id, creating it when absent (backends recording usage by subject).
pub async fn find_or_create_by_subject(state: &AppState, subject: &str) -> ApiResult<User> {
    if subject.is_empty() || subject.len() > 255 {
        return Err(ApiError::invalid("subject must be 1 to 255 bytes"));
    }
    let claims = IdClaims { sub: subject.into(), email: None, email_verified: None, iat: Some(state.now().timestamp() + 1), name: None };
    let client = state.pool.get().await?;
    if client.query_opt("SELECT 1 FROM account_tombstones WHERE sub_hash = $1", &[&sub_hash(subject)]).await?.is_some()
        && client.query_opt("SELECT 1 FROM users WHERE external_id = $1", &[&subject]).await?.is_none()
    {
        return Err(ApiError::AccountDeleted);
    }
    drop(client);
    resolve(state, &claims).await
}

/// The user a backend names by `subject` (external id) or server `user_id`: 404
/// `unknown_subject` when no such user exists (an admin creates one ahead with
/// `POST /v1/admin/users {subject}`).
pub async fn find_named(state: &AppState, subject: Option<&str>, user_id: Option<&str>) -> ApiResult<User> {
    let client = state.pool.get().await?;
    let row = match (subject, user_id) {
        (Some(s), None) => {
            tally_core::contract::subject(s)?;
            client.query_opt(&format!("SELECT {USER_COLUMNS} FROM users WHERE external_id = $1"), &[&s]).await?
        }
        (None, Some(id)) => match Uuid::parse_str(id) {
            Ok(id) => client.query_opt(&format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = $1"), &[&id]).await?,
            Err(_) => return Err(ApiError::Invalid("invalid_user_id", "user_id must be a UUID".into())),
        },
        (Some(_), Some(_)) => return Err(ApiError::invalid("name the user with \"subject\" or \"user_id\", not both")),
        (None, None) => return Err(ApiError::invalid("an API key must name the user with \"subject\" or \"user_id\"")),
    };
    let user = row.map(|r| User::from_row(&r, &state.config.admin_subjects)).ok_or_else(|| {
        ApiError::Unknown("unknown_subject", "no user has this subject; create it first with POST /v1/admin/users".into())
    })?;
    ensure_enabled(&user)?;
    Ok(user)
}

/// The user of server id `user_id`, if any.
pub async fn by_id(client: &impl GenericClient, user_id: Uuid, admins: &[String]) -> ApiResult<Option<User>> {
    let r = client.query_opt(&format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = $1"), &[&user_id]).await?;
    Ok(r.map(|r| User::from_row(&r, admins)))
}

/// Users matching `q` for an operator: the user of that id when `q` is a UUID; else those
/// whose email (case-insensitive) or subject starts with `q`; the newest first, at most
/// `limit`. An empty `q` lists the newest users.
pub async fn search(client: &impl GenericClient, q: &str, limit: i64, admins: &[String]) -> ApiResult<Vec<User>> {
    let q = q.trim();
    let rows = if let Ok(id) = Uuid::parse_str(q) {
        client.query(&format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = $1"), &[&id]).await?
    } else {
        client
            .query(
                &format!(
                    "SELECT {USER_COLUMNS} FROM users WHERE starts_with(lower(coalesce(email, '')), lower($1)) \
                     OR starts_with(coalesce(external_id, ''), $1) ORDER BY created_at DESC, user_id LIMIT $2"
                ),
                &[&q, &limit],
            )
            .await?
    };
    Ok(rows.iter().map(|r| User::from_row(r, admins)).collect())
}

/// Re-reads a user by id, locking the row for the rest of the transaction.
pub async fn lock(tx: &impl GenericClient, user_id: Uuid, admins: &[String]) -> ApiResult<User> {
    let q = format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = $1 FOR NO KEY UPDATE");
    let r = tx.query_opt(&tx.prepare_cached(&q).await?, &[&user_id]).await?.ok_or(ApiError::AccountDeleted)?;
    Ok(User::from_row(&r, admins))
}

/// Bumps the user's entitlement version (tokens and caches of the old one go stale, this
/// process's cached user row first) and emits `entitlements.changed` for the new one, in the
/// caller's transaction.
pub async fn bump_version(
    tx: &impl GenericClient,
    cache: &crate::user_cache::UserCache,
    user_id: Uuid,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    cache.evict_user(user_id);
    let st = tx.prepare_cached("UPDATE users SET ver = ver + 1, updated_at = $2 WHERE user_id = $1 RETURNING ver").await?;
    if let Some(r) = tx.query_opt(&st, &[&user_id, &now]).await? {
        crate::webhooks::outbox::entitlements_changed(tx, user_id, r.get(0), now).await?;
    }
    Ok(())
}

/// Validates a profile edit with the contract the device checks too (whole edit: 422 naming
/// the field).
pub fn validate_profile(p: &ProfilePatch) -> ApiResult<()> {
    tally_core::contract::profile(p)?;
    Ok(())
}

/// Splits a device's profile edit into the fields that pass the contract and the refused
/// ones, so that one bad field never blocks a sync.
pub fn split_profile(p: &ProfilePatch) -> (ProfilePatch, Vec<ProfileRejected>) {
    use tally_core::contract;
    let mut ok = ProfilePatch::default();
    let mut rejected = Vec::new();
    let mut take = |field: &str, r: Result<(), contract::Violation>| match r {
        Ok(()) => true,
        Err(v) => {
            rejected.push(ProfileRejected { field: field.into(), reason: v.code.into() });
            false
        }
    };
    if take("display_name", contract::display_name(p.display_name.as_deref())) {
        ok.display_name.clone_from(&p.display_name);
    }
    if take("avatar_url", contract::avatar_url(p.avatar_url.as_deref())) {
        ok.avatar_url.clone_from(&p.avatar_url);
    }
    if let Some(tz) = &p.timezone
        && take("timezone", contract::timezone(tz).map(|_| ()))
    {
        ok.timezone = Some(tz.clone());
    }
    (ok, rejected)
}

/// Applies a validated profile patch to a locked user at `now`; nothing changes when it asks
/// for a timezone change less than 24 h after the previous (429 `timezone_change_too_soon`). A
/// timezone change is recorded in the user's history (it never resets a window in force, see
/// [`crate::timezones`]), bumps the entitlement version (the token carries `tz` and
/// `tz_history`) and makes the counters rebuild.
pub async fn apply_profile(
    tx: &impl GenericClient,
    cache: &crate::user_cache::UserCache,
    user: &mut User,
    p: &ProfilePatch,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    let new_tz = p.timezone.as_ref().filter(|t| **t != user.timezone);
    if p.timezone.is_none() && p.display_name.is_none() && p.avatar_url.is_none() {
        return Ok(());
    }
    if let Some(tz) = new_tz {
        crate::timezones::check_interval(tx, user, tz, now).await?;
    }
    cache.evict_user(user.user_id);
    if let Some(tz) = new_tz {
        crate::timezones::record_change(tx, user, tz, now).await?;
    }
    let r = tx
        .query_one(
            "UPDATE users SET timezone = coalesce($2, timezone), display_name = coalesce($3, display_name), \
             avatar_url = coalesce($4, avatar_url), ver = ver + $5, updated_at = $6 WHERE user_id = $1 \
             RETURNING timezone, display_name, avatar_url, ver, updated_at",
            &[&user.user_id, &p.timezone, &p.display_name, &p.avatar_url, &i64::from(new_tz.is_some()), &now],
        )
        .await?;
    user.timezone = r.get(0);
    user.display_name = r.get(1);
    user.avatar_url = r.get(2);
    user.ver = r.get(3);
    user.updated_at = r.get(4);
    Ok(())
}
