//! Refresh tokens of password accounts: opaque (`rt_…`), stored as SHA-256 hashes, living
//! [`REFRESH_TTL`] and rotated on every use. Each sign-in starts a family; a token's successor
//! is derived from it with the family's HMAC key, so presenting an already rotated token again
//! within [`REUSE_GRACE`] (a lost answer, two racing refreshes) gives the same successor
//! without the server ever storing a token. A later reuse revokes the whole family.

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use chrono::Duration;
use deadpool_postgres::GenericClient;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Lifetime of a refresh token.
pub const REFRESH_TTL: Duration = Duration::days(30);
/// How long after its rotation a refresh token still gives its successor.
pub const REUSE_GRACE: Duration = Duration::seconds(30);
/// Prefix of refresh tokens.
const PREFIX: &str = "rt_";

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn successor(secret: &[u8], token: &str) -> ApiResult<String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(ApiError::internal)?;
    mac.update(token.as_bytes());
    Ok(format!("{PREFIX}{}", hex::encode(mac.finalize().into_bytes())))
}

fn invalid(code: &'static str, msg: &str) -> ApiError {
    ApiError::Unauthorized(code, msg.into())
}

/// Starts a family for `user_id` and returns its first refresh token.
pub async fn start(state: &AppState, client: &impl GenericClient, user_id: Uuid) -> ApiResult<String> {
    let now = state.now();
    let family = Uuid::now_v7();
    client
        .execute(
            "INSERT INTO refresh_families (family_id, user_id, secret, created_at) VALUES ($1, $2, $3, $4)",
            &[&family, &user_id, &rand::random::<[u8; 32]>().to_vec(), &now],
        )
        .await?;
    let token = format!("{PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
    client
        .execute(
            "INSERT INTO refresh_tokens (token_hash, family_id, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
            &[&hash(&token), &family, &user_id, &now, &(now + REFRESH_TTL)],
        )
        .await?;
    Ok(token)
}

/// Exchanges `presented` for its successor; returns the user and the successor. A disabled
/// user is 403 `account_disabled`; an unknown, revoked or expired token 401; a reuse after
/// [`REUSE_GRACE`] revokes the family (401 `refresh_token_reused`).
pub async fn rotate(state: &AppState, presented: &str) -> ApiResult<(Uuid, String)> {
    let now = state.now();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT t.family_id, t.user_id, t.expires_at, t.rotated_at, f.secret, f.revoked_at, u.disabled_at, u.user_id IS NOT NULL \
             FROM refresh_tokens t JOIN refresh_families f USING (family_id) LEFT JOIN users u ON u.user_id = t.user_id \
             WHERE t.token_hash = $1 FOR UPDATE OF t, f",
            &[&hash(presented)],
        )
        .await?
        .ok_or_else(|| invalid("invalid_refresh_token", "unknown refresh token; sign in again"))?;
    let family: Uuid = row.get(0);
    let user_id: Uuid = row.get(1);
    let expires_at: chrono::DateTime<chrono::Utc> = row.get(2);
    let rotated_at: Option<chrono::DateTime<chrono::Utc>> = row.get(3);
    let secret: Vec<u8> = row.get(4);
    if row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(6).is_some() {
        return Err(ApiError::AccountDisabled);
    }
    if row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(5).is_some() || !row.get::<_, bool>(7) {
        return Err(invalid("refresh_token_revoked", "this session was ended; sign in again"));
    }
    if expires_at <= now {
        return Err(invalid("refresh_token_expired", "the refresh token has expired; sign in again"));
    }
    let next = successor(&secret, presented)?;
    match rotated_at {
        None => {
            tx.execute("UPDATE refresh_tokens SET rotated_at = $2 WHERE token_hash = $1", &[&hash(presented), &now]).await?;
            tx.execute(
                "INSERT INTO refresh_tokens (token_hash, family_id, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (token_hash) DO NOTHING",
                &[&hash(&next), &family, &user_id, &now, &(now + REFRESH_TTL)],
            )
            .await?;
        }
        Some(at) if now - at <= REUSE_GRACE => {}
        Some(_) => {
            tx.execute("UPDATE refresh_families SET revoked_at = $2 WHERE family_id = $1", &[&family, &now]).await?;
            tx.commit().await?;
            tracing::warn!(%user_id, "a rotated refresh token was reused; its session is revoked");
            return Err(invalid("refresh_token_reused", "this refresh token was already used; the session is revoked, sign in again"));
        }
    }
    tx.commit().await?;
    Ok((user_id, next))
}

/// Ends the family of `presented` (unknown tokens change nothing).
pub async fn end(state: &AppState, presented: &str) -> ApiResult<()> {
    let client = state.pool.get().await?;
    client
        .execute(
            "UPDATE refresh_families SET revoked_at = $2 WHERE revoked_at IS NULL AND family_id = \
             (SELECT family_id FROM refresh_tokens WHERE token_hash = $1)",
            &[&hash(presented), &state.now()],
        )
        .await?;
    Ok(())
}

/// Revokes everything that acts as `user_id`: every refresh family, console session and API
/// key of the account (the first verification of its email, a password reset or change).
pub async fn revoke_everything(state: &AppState, client: &impl GenericClient, user_id: Uuid) -> ApiResult<()> {
    let families = end_all(state, client, user_id).await?;
    let consoles = client.execute("DELETE FROM console_sessions WHERE user_id = $1", &[&user_id]).await?;
    let keys = crate::api_keys::revoke_owned(client, user_id, state.now()).await?;
    tracing::info!(%user_id, families, consoles, keys, "every session and API key of an account was revoked");
    Ok(())
}

/// Ends every family of `user_id` (a disabled account; see also [`revoke_everything`]).
pub async fn end_all(state: &AppState, client: &impl GenericClient, user_id: Uuid) -> ApiResult<u64> {
    Ok(client
        .execute("UPDATE refresh_families SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL", &[&user_id, &state.now()])
        .await?)
}
