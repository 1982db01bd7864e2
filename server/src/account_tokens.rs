//! Single-use tokens mailed to password accounts: email verification (24 h) and password reset
//! (1 h). Stored as SHA-256 hashes; using one marks it used in the same statement that checks
//! it, so it works exactly once.

use crate::error::{ApiError, ApiResult};
use crate::mail::Purpose;
use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// How long a verification token works.
pub const VERIFY_TTL: Duration = Duration::hours(24);
/// How long a reset token works.
pub const RESET_TTL: Duration = Duration::hours(1);

fn stored(purpose: Purpose) -> (&'static str, Duration) {
    match purpose {
        Purpose::Verify => ("verify", VERIFY_TTL),
        Purpose::Reset => ("reset", RESET_TTL),
    }
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new token of `purpose` for `user_id`, mailed to `email`.
pub async fn issue(client: &impl GenericClient, now: DateTime<Utc>, user_id: Uuid, purpose: Purpose, email: &str) -> ApiResult<String> {
    let (name, ttl) = stored(purpose);
    let token = hex::encode(rand::random::<[u8; 24]>());
    client
        .execute(
            "INSERT INTO account_tokens (token_hash, user_id, purpose, email, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&hash(&token), &user_id, &name, &email, &now, &(now + ttl)],
        )
        .await?;
    Ok(token)
}

/// Uses `token` of `purpose`: returns its user and the address it was mailed to. Unknown,
/// used and expired tokens are each a 400 with their own code, and change nothing.
pub async fn consume(client: &impl GenericClient, now: DateTime<Utc>, token: &str, purpose: Purpose) -> ApiResult<(Uuid, String)> {
    let (name, _) = stored(purpose);
    let r = client
        .query_opt(
            "UPDATE account_tokens SET used_at = $3 WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3 \
             RETURNING user_id, email",
            &[&hash(token), &name, &now],
        )
        .await?;
    if let Some(r) = r {
        return Ok((r.get(0), r.get(1)));
    }
    let why = client
        .query_opt("SELECT used_at IS NOT NULL FROM account_tokens WHERE token_hash = $1 AND purpose = $2", &[&hash(token), &name])
        .await?;
    Err(match why {
        None => ApiError::BadRequest("unknown_token", format!("this {name} token is not known")),
        Some(r) if r.get::<_, bool>(0) => ApiError::BadRequest("token_used", format!("this {name} token was already used")),
        Some(_) => ApiError::BadRequest("token_expired", format!("this {name} token has expired; ask for a new one")),
    })
}
