//! The secrets vault: third-party credentials an app keeps for a user. `PUT|GET|DELETE
//! /v1/secrets/{name}`, `GET /v1/secrets` (names, `updated_at`, `key_id`; never values). The
//! owner reads and writes; a backend reads with an API key of scope `secrets:read` naming the
//! subject. Values are sealed by [`crate::vault`]; they never appear in logs, errors, exports or
//! admin answers. `tally-server secrets rotate` re-seals every row under the current key.

use crate::AppState;
use crate::api_keys::SCOPE_SECRETS_READ;
use crate::auth::{AuthUser, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};
use crate::users::{self, User};
use crate::vault::{MasterKeys, Sealed, VaultError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tally_core::contract;
use uuid::Uuid;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/secrets", get(list)).route("/v1/secrets/{name}", get(read).put(write).delete(remove))
}

fn keys(state: &AppState) -> ApiResult<&MasterKeys> {
    state.vault.as_ref().ok_or_else(|| {
        ApiError::Status(StatusCode::SERVICE_UNAVAILABLE, "secrets_unconfigured", "the secrets vault needs TALLY_SECRET_KEYS".into())
    })
}

fn vault_error(e: VaultError) -> ApiError {
    match e {
        VaultError::KeyMissing(kid) => ApiError::Status(
            StatusCode::SERVICE_UNAVAILABLE,
            "secret_key_missing",
            format!("this secret is sealed under the master key {kid:?}, which is not in TALLY_SECRET_KEYS"),
        ),
        VaultError::Tampered => ApiError::Internal("a stored secret does not open in its row".into()),
    }
}

/// A secret's metadata (the answer of `PUT` and the items of the list).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SecretInfo {
    /// Name.
    pub name: String,
    /// Last write.
    pub updated_at: DateTime<Utc>,
    /// Id of the master key its data key is wrapped by.
    pub key_id: String,
}

/// Body of `PUT /v1/secrets/{name}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretBody {
    /// The value.
    pub value: String,
}

/// `PUT /v1/secrets/{name}`: stores (or replaces) a secret of the caller.
#[utoipa::path(
    operation_id = "secrets_write",
    put,
    path = "/v1/secrets/{name}",
    tag = "secrets",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Secret name")),
    request_body = SecretBody,
    responses((status = 200, description = "Stored", body = SecretInfo)),
)]
pub async fn write(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<SecretBody>,
) -> ApiResult<Json<SecretInfo>> {
    let keys = keys(&state)?;
    users::ensure_email_verified(&user)?;
    contract::secret_name(&name)?;
    contract::secret_value(&b.value)?;
    let sealed = keys.seal(user.user_id, &name, b.value.as_bytes());
    let now = state.now();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let others: i64 = tx.query_one("SELECT count(*) FROM secrets WHERE user_id = $1 AND name <> $2", &[&user.user_id, &name]).await?.get(0);
    contract::secrets_count(usize::try_from(others).unwrap_or(usize::MAX))?;
    let r = tx
        .query_one(
            "INSERT INTO secrets (user_id, name, key_id, wrapped_key, sealed, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) \
             ON CONFLICT (user_id, name) DO UPDATE SET key_id = excluded.key_id, wrapped_key = excluded.wrapped_key, \
             sealed = excluded.sealed, updated_at = excluded.updated_at RETURNING updated_at",
            &[&user.user_id, &name, &sealed.key_id, &sealed.wrapped_key, &sealed.sealed, &now],
        )
        .await?;
    tx.commit().await?;
    Ok(Json(SecretInfo { name, updated_at: r.get(0), key_id: sealed.key_id }))
}

/// Query of `GET /v1/secrets/{name}` for an API key: the user it reads for.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OwnerQuery {
    /// The user's subject (external id).
    pub subject: Option<String>,
    /// Or the server user id.
    pub user_id: Option<String>,
}

/// The user whose secrets the caller may read: itself, or the subject an API key of scope
/// `secrets:read` names.
async fn owner(state: &AppState, p: Principal, q: &OwnerQuery) -> ApiResult<User> {
    match p {
        Principal::User(u) if q.subject.is_none() && q.user_id.is_none() => Ok(u),
        Principal::User(_) => Err(ApiError::invalid("a user reads only their own secrets; drop subject and user_id")),
        Principal::Key(k) if k.has_scope(SCOPE_SECRETS_READ) => users::find_named(state, q.subject.as_deref(), q.user_id.as_deref()).await,
        Principal::Key(_) => {
            Err(ApiError::Status(StatusCode::FORBIDDEN, "insufficient_scope", format!("this API key lacks the {SCOPE_SECRETS_READ} scope")))
        }
    }
}

fn not_found() -> ApiError {
    ApiError::Unknown("unknown_secret", "no secret has this name".into())
}

/// `GET /v1/secrets/{name}`: the value, for its owner or a `secrets:read` key.
#[utoipa::path(
    operation_id = "secrets_read",
    get,
    path = "/v1/secrets/{name}",
    tag = "secrets",
    security(("bearer" = []), ("api_key" = [])),
    params(("name" = String, Path, description = "Secret name"), OwnerQuery),
    responses((status = 200, description = "The secret with its value", body = Object)),
)]
pub async fn read(
    State(state): State<AppState>,
    p: Principal,
    Path(name): Path<String>,
    QueryParams(q): QueryParams<OwnerQuery>,
) -> ApiResult<Json<Value>> {
    let keys = keys(&state)?;
    contract::secret_name(&name)?;
    let user = owner(&state, p, &q).await?;
    let client = state.pool.get().await?;
    let r = client
        .query_opt("SELECT key_id, wrapped_key, sealed, updated_at FROM secrets WHERE user_id = $1 AND name = $2", &[&user.user_id, &name])
        .await?
        .ok_or_else(not_found)?;
    let sealed = Sealed { key_id: r.get(0), wrapped_key: r.get(1), sealed: r.get(2) };
    let value = keys.open(user.user_id, &name, &sealed).map_err(vault_error)?;
    let value = String::from_utf8(value).map_err(|_| ApiError::Internal("a stored secret is not UTF-8".into()))?;
    Ok(Json(json!({"name": name, "value": value, "updated_at": r.get::<_, DateTime<Utc>>(3), "key_id": sealed.key_id})))
}

/// `GET /v1/secrets`: names, `updated_at` and `key_id` of the caller's secrets (never values).
#[utoipa::path(
    operation_id = "secrets_list",
    get,
    path = "/v1/secrets",
    tag = "secrets",
    security(("bearer" = []), ("api_key" = [])),
    params(OwnerQuery),
    responses(
        (status = 200, description = "Names, update times and key ids (never values)", body = Object),
    ),
)]
pub async fn list(State(state): State<AppState>, p: Principal, QueryParams(q): QueryParams<OwnerQuery>) -> ApiResult<Json<Value>> {
    keys(&state)?;
    let user = owner(&state, p, &q).await?;
    let client = state.pool.get().await?;
    let items: Vec<SecretInfo> = client
        .query("SELECT name, updated_at, key_id FROM secrets WHERE user_id = $1 ORDER BY name", &[&user.user_id])
        .await?
        .iter()
        .map(|r| SecretInfo { name: r.get(0), updated_at: r.get(1), key_id: r.get(2) })
        .collect();
    Ok(Json(json!({ "secrets": items })))
}

/// `DELETE /v1/secrets/{name}`: removes a secret of the caller (204; 404 when there is none).
#[utoipa::path(
    operation_id = "secrets_remove",
    delete,
    path = "/v1/secrets/{name}",
    tag = "secrets",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Secret name")),
    responses((status = 204, description = "Deleted")),
)]
pub async fn remove(State(state): State<AppState>, AuthUser(user): AuthUser, Path(name): Path<String>) -> ApiResult<StatusCode> {
    keys(&state)?;
    contract::secret_name(&name)?;
    let client = state.pool.get().await?;
    let n = client.execute("DELETE FROM secrets WHERE user_id = $1 AND name = $2", &[&user.user_id, &name]).await?;
    if n == 0 { Err(not_found()) } else { Ok(StatusCode::NO_CONTENT) }
}

/// What [`rotate`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Rows re-sealed under the current key.
    pub resealed: u64,
    /// Rows changed by a write meanwhile (already under the current key).
    pub skipped: u64,
    /// Rows under a key that is not configured, left as they are.
    pub missing_key: u64,
}

/// Re-seals every row not under the current key, `batch` rows a transaction, in key order, so
/// that it can run while the server serves (each row changes atomically; a concurrent write
/// wins) and, when stopped, simply runs again over what is left.
pub async fn rotate(client: &impl GenericClient, keys: &MasterKeys, batch: i64) -> Result<Rotation, tokio_postgres::Error> {
    let mut done = Rotation::default();
    let (mut after_user, mut after_name) = (Uuid::nil(), String::new());
    loop {
        let rows = client
            .query(
                "SELECT user_id, name, key_id, wrapped_key, sealed FROM secrets WHERE key_id <> $1 AND (user_id, name) > ($2, $3) \
                 ORDER BY user_id, name LIMIT $4",
                &[&keys.current(), &after_user, &after_name, &batch.max(1)],
            )
            .await?;
        let Some(last) = rows.last() else { return Ok(done) };
        (after_user, after_name) = (last.get(0), last.get(1));
        for r in &rows {
            let (user_id, name): (Uuid, String) = (r.get(0), r.get(1));
            let old = Sealed { key_id: r.get(2), wrapped_key: r.get(3), sealed: r.get(4) };
            let new = match keys.reseal(user_id, &name, &old) {
                Ok(s) => s,
                Err(VaultError::KeyMissing(kid)) => {
                    tracing::warn!(%user_id, name, key_id = kid, "a secret is sealed under a key that is not configured");
                    done.missing_key += 1;
                    continue;
                }
                Err(VaultError::Tampered) => {
                    tracing::error!(%user_id, name, "a stored secret does not open in its row");
                    done.missing_key += 1;
                    continue;
                }
            };
            let n = client
                .execute(
                    "UPDATE secrets SET key_id = $3, wrapped_key = $4, sealed = $5 WHERE user_id = $1 AND name = $2 AND key_id = $6 AND wrapped_key = $7",
                    &[&user_id, &name, &new.key_id, &new.wrapped_key, &new.sealed, &old.key_id, &old.wrapped_key],
                )
                .await?;
            if n == 1 {
                done.resealed += 1;
            } else {
                done.skipped += 1;
            }
        }
    }
}

/// Logs a warning for every key id rows are sealed under that is not configured (or for every
/// row when the vault is not configured at all).
pub async fn warn_unopenable(client: &impl GenericClient, keys: Option<&MasterKeys>) -> Result<(), tokio_postgres::Error> {
    for r in client.query("SELECT key_id, count(*) FROM secrets GROUP BY key_id ORDER BY key_id", &[]).await? {
        let (kid, n): (String, i64) = (r.get(0), r.get(1));
        match keys {
            None => {
                tracing::warn!(key_id = kid, rows = n, "secrets are stored but TALLY_SECRET_KEYS is not set: the secrets routes answer 503")
            }
            Some(k) if !k.key_ids().contains(&kid.as_str()) => {
                tracing::warn!(
                    key_id = kid,
                    rows = n,
                    "secrets are sealed under a key id missing from TALLY_SECRET_KEYS: they answer 503 secret_key_missing"
                )
            }
            Some(_) => {}
        }
    }
    Ok(())
}
