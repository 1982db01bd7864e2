//! API keys for backends (`Authorization: Bearer tk_…`): shown once, stored as SHA-256 hashes,
//! scoped (`usage:write` records, `usage:read` reads usage, `secrets:read` reads a named user's
//! secrets, `admin`), revocable.

use crate::AppState;
use crate::authority::{Actor, KeyMaker};
use crate::error::{ApiError, ApiResult};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Prefix of every API key.
pub const PREFIX: &str = "tk_";
/// Scope: record usage (`POST /v1/usage`) and check quotas (`POST /v1/check`) for any
/// subject; not reading usage reports.
pub const SCOPE_USAGE_WRITE: &str = "usage:write";
/// Scope: read any subject's usage (`GET /v1/usage?subject=`).
pub const SCOPE_USAGE_READ: &str = "usage:read";
/// Scope: the admin endpoints.
pub const SCOPE_ADMIN: &str = "admin";
/// Scope: read the secrets of the subject the request names (`GET /v1/secrets/{name}?subject=`).
pub const SCOPE_SECRETS_READ: &str = "secrets:read";
/// Every known scope.
pub const SCOPES: [&str; 4] = [SCOPE_USAGE_WRITE, SCOPE_USAGE_READ, SCOPE_ADMIN, SCOPE_SECRETS_READ];
/// Scopes that only the operator's CLI grants: a `secrets:read` key opens the secrets of any
/// user it names, so an admin key must not be a way to mint one.
pub const OPERATOR_ONLY_SCOPES: [&str; 1] = [SCOPE_SECRETS_READ];

/// Who asks for a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issuer {
    /// The operator, at the server's CLI (`tally-server api-key create`): every scope.
    Operator,
    /// An admin through the API (`POST /v1/admin/api-keys`): every scope but
    /// [`OPERATOR_ONLY_SCOPES`] (403 `scope_requires_operator`).
    AdminApi,
}

impl Issuer {
    /// Who a key of this issuer counts as when it records or undoes a use: keys of the
    /// operator and of admins are a backend's.
    pub fn made_by(self) -> KeyMaker {
        match self {
            Issuer::Operator | Issuer::AdminApi => KeyMaker::Backend,
        }
    }
}

/// A stored API key (never the secret itself).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    /// Key id.
    #[serde(rename = "id")]
    pub key_id: Uuid,
    /// Human name.
    pub name: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// The account whose user made the key, directly or through a key of theirs (`None`: the
    /// operator's CLI); revoking that account's credentials revokes the key.
    #[serde(skip)]
    pub owner_id: Option<Uuid>,
    /// Who made it: `backend` (an admin or the CLI) or `user` (a user's own key); it decides
    /// what the key may undo ([`crate::authority`]).
    pub made_by: KeyMaker,
}

/// Columns read into an [`ApiKey`], in order.
const KEY_COLUMNS: &str = "key_id, name, scopes, created_at, revoked_at, owner_id, made_by";

impl ApiKey {
    /// The actor this key acts as: a backend's key as a backend, a user's own key as the user.
    pub fn actor(&self) -> Actor<'static> {
        match self.made_by {
            KeyMaker::Backend => Actor::Backend,
            KeyMaker::User => Actor::User,
        }
    }

    /// Whether the key has `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
    fn from_row(r: &tokio_postgres::Row) -> ApiKey {
        ApiKey {
            key_id: r.get(0),
            name: r.get(1),
            scopes: r.get(2),
            created_at: r.get(3),
            revoked_at: r.get(4),
            owner_id: r.get(5),
            made_by: r.get(6),
        }
    }
}

/// The stored form of a key's secret (SHA-256, hex).
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Creates a key for `issuer`, owned by the account `owner` (`None`: the operator's); returns
/// it with its secret, which is never shown again.
pub async fn create(
    client: &impl GenericClient,
    issuer: Issuer,
    name: &str,
    scopes: &[String],
    owner: Option<Uuid>,
) -> ApiResult<(ApiKey, String)> {
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::invalid("name must be 1 to 100 bytes"));
    }
    if scopes.is_empty() {
        return Err(ApiError::invalid(format!("give at least one scope ({})", SCOPES.join(", "))));
    }
    if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        return Err(ApiError::Invalid("invalid_scope", format!("unknown scope {bad:?} (expected {})", SCOPES.join(", "))));
    }
    match issuer {
        Issuer::Operator => {}
        Issuer::AdminApi => {
            if let Some(scope) = scopes.iter().find(|s| OPERATOR_ONLY_SCOPES.contains(&s.as_str())) {
                return Err(ApiError::Status(
                    StatusCode::FORBIDDEN,
                    "scope_requires_operator",
                    format!("a key with scope {scope} is made only by the operator's CLI (tally-server api-key create)"),
                ));
            }
        }
    }
    let secret = format!("{PREFIX}{}", hex::encode(rand::random::<[u8; 24]>()));
    let r = client
        .query_one(
            &format!(
                "INSERT INTO api_keys (key_id, key_hash, name, scopes, owner_id, made_by) VALUES ($1, $2, $3, $4, $5, $6) RETURNING {KEY_COLUMNS}"
            ),
            &[&Uuid::now_v7(), &hash(&secret), &name, &scopes, &owner, &issuer.made_by().as_str()],
        )
        .await?;
    Ok((ApiKey::from_row(&r), secret))
}

/// Lists keys (without secrets).
pub async fn list(client: &impl GenericClient) -> ApiResult<Vec<ApiKey>> {
    let rows = client.query(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at"), &[]).await?;
    Ok(rows.iter().map(ApiKey::from_row).collect())
}

/// Revokes a key; 404 when unknown or already revoked.
pub async fn revoke(client: &impl GenericClient, key_id: Uuid) -> ApiResult<()> {
    let n = client.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL", &[&key_id]).await?;
    if n == 0 { Err(ApiError::not_found("api key")) } else { Ok(()) }
}

/// Revokes every key the account `owner` holds; returns how many.
pub async fn revoke_owned(client: &impl GenericClient, owner: Uuid, now: DateTime<Utc>) -> ApiResult<u64> {
    Ok(client.execute("UPDATE api_keys SET revoked_at = $2 WHERE owner_id = $1 AND revoked_at IS NULL", &[&owner, &now]).await?)
}

/// The key `key_id` while it is not revoked (`None`: unknown or revoked).
pub async fn active_by_id(client: &impl GenericClient, key_id: Uuid) -> ApiResult<Option<ApiKey>> {
    let r = client.query_opt(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL"), &[&key_id]).await?;
    Ok(r.as_ref().map(ApiKey::from_row))
}

/// Checks a presented secret.
pub async fn authenticate(state: &AppState, secret: &str) -> ApiResult<ApiKey> {
    let client = state.pool.get().await?;
    let r = client
        .query_opt(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"), &[&hash(secret)])
        .await?
        .ok_or_else(|| ApiError::Unauthorized("invalid_api_key", "unknown API key".into()))?;
    let key = ApiKey::from_row(&r);
    if key.revoked_at.is_some() {
        return Err(ApiError::Unauthorized("api_key_revoked", "this API key was revoked".into()));
    }
    Ok(key)
}
