//! Access grants: a plan given to a user until a date (or for good), by an admin through
//! `POST /v1/admin/grants` or the `tally-server grant` command — one service for both, validated
//! before anything is created, applied in one transaction — their revocation and listing.

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::users::sub_hash;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tally_core::{Catalog, contract};
use uuid::Uuid;

/// Longest grant reason, in bytes.
pub const MAX_REASON_BYTES: usize = 200;

/// What to grant.
#[derive(Debug, Clone)]
pub struct AccessGrantRequest<'a> {
    /// The user's identity subject (created ahead of its first sign-in when unknown).
    pub subject: &'a str,
    /// Plan id of the catalog.
    pub plan: &'a str,
    /// End of the grant (`None`: no end).
    pub until: Option<DateTime<Utc>>,
    /// Who grants it.
    pub granted_by: &'a str,
    /// Why (`access_reason` becomes `granted:<reason>`).
    pub reason: &'a str,
}

/// Checks a grant against the catalog and the time, changing nothing.
pub fn validate(req: &AccessGrantRequest<'_>, catalog: &Catalog, now: DateTime<Utc>) -> ApiResult<()> {
    contract::subject(req.subject).map_err(|v| ApiError::Invalid("invalid_subject", format!("subject: {v}")))?;
    contract::text("reason", req.reason, 1, MAX_REASON_BYTES)?;
    contract::text("granted_by", req.granted_by, 0, contract::MAX_SUBJECT_BYTES)?;
    if req.until.is_some_and(|u| u <= now) {
        return Err(ApiError::invalid("until must be in the future"));
    }
    if catalog.plan(req.plan).is_none() {
        return Err(ApiError::Invalid("unknown_plan", format!("no plan {:?} in the catalog", req.plan)));
    }
    Ok(())
}

/// Validates and stores a grant inside the caller's transaction `tx`: the user of `subject`
/// (created when unknown; a deleted account's subject answers 410), the grant row, and a new
/// entitlement version. Returns the user id and the grant id.
pub async fn grant_access(
    tx: &impl GenericClient,
    cache: &crate::user_cache::UserCache,
    catalog: &Catalog,
    req: &AccessGrantRequest<'_>,
    now: DateTime<Utc>,
) -> ApiResult<(Uuid, Uuid)> {
    validate(req, catalog, now)?;
    let existing = tx.query_opt("SELECT user_id FROM users WHERE external_id = $1 FOR NO KEY UPDATE", &[&req.subject]).await?;
    let user_id: Uuid = match existing {
        Some(r) => r.get(0),
        None => {
            if tx.query_opt("SELECT 1 FROM account_tombstones WHERE sub_hash = $1", &[&sub_hash(req.subject)]).await?.is_some() {
                return Err(ApiError::AccountDeleted);
            }
            tx.execute(
                "INSERT INTO users (user_id, external_id) VALUES ($1, $2) ON CONFLICT (external_id) DO NOTHING",
                &[&Uuid::now_v7(), &req.subject],
            )
            .await?;
            tx.query_one("SELECT user_id FROM users WHERE external_id = $1 FOR NO KEY UPDATE", &[&req.subject]).await?.get(0)
        }
    };
    let grant_id = Uuid::now_v7();
    tx.execute(
        "INSERT INTO access_grants (user_id, grant_id, plan, until, granted_by, reason) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&user_id, &grant_id, &req.plan, &req.until, &req.granted_by, &req.reason],
    )
    .await?;
    crate::users::bump_version(tx, cache, user_id, now).await?;
    Ok((user_id, grant_id))
}

/// Grants access as [`grant_access`] does, in a transaction of its own under the catalog in
/// effect: what `POST /v1/admin/grants` and the console call. Returns the user and grant ids.
pub async fn create(state: &AppState, req: &AccessGrantRequest<'_>) -> ApiResult<(Uuid, Uuid)> {
    let mut client = state.pool.get().await?;
    let (_, catalog) = state.catalog.current(&client).await?;
    let tx = client.transaction().await?;
    let ids = grant_access(&tx, &state.user_cache, &catalog, req, state.now()).await?;
    tx.commit().await?;
    Ok(ids)
}

/// Revokes the user's access grant `grant_id`, or every active one when `None`; bumps the
/// entitlement version. 404 when nothing was revoked. Returns how many were.
pub async fn revoke(state: &AppState, user_id: Uuid, grant_id: Option<Uuid>) -> ApiResult<u64> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    crate::users::lock(&tx, user_id, &state.config.admin_subjects).await?;
    let n = tx
        .execute(
            "UPDATE access_grants SET revoked_at = $3 WHERE user_id = $1 AND revoked_at IS NULL AND ($2::uuid IS NULL OR grant_id = $2)",
            &[&user_id, &grant_id, &state.now()],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("grant"));
    }
    crate::users::bump_version(&tx, &state.user_cache, user_id, state.now()).await?;
    tx.commit().await?;
    Ok(n)
}

/// An access grant as stored, revoked or not.
#[derive(Debug, Clone)]
pub struct StoredGrant {
    /// Grant id.
    pub grant_id: Uuid,
    /// Plan granted.
    pub plan: String,
    /// End (`None`: no end).
    pub until: Option<DateTime<Utc>>,
    /// Who granted it.
    pub granted_by: String,
    /// Why.
    pub reason: String,
    /// When it was granted.
    pub created_at: DateTime<Utc>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl StoredGrant {
    /// Whether it gives access at `now`: not revoked, not ended.
    pub fn active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.until.is_none_or(|u| u > now)
    }
}

/// Every access grant of `user_id`, the newest first.
pub async fn list(client: &impl GenericClient, user_id: Uuid) -> ApiResult<Vec<StoredGrant>> {
    let rows = client
        .query(
            "SELECT grant_id, plan, until, granted_by, reason, created_at, revoked_at FROM access_grants WHERE user_id = $1 \
             ORDER BY created_at DESC, grant_id DESC",
            &[&user_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| StoredGrant {
            grant_id: r.get(0),
            plan: r.get(1),
            until: r.get(2),
            granted_by: r.get(3),
            reason: r.get(4),
            created_at: r.get(5),
            revoked_at: r.get(6),
        })
        .collect())
}
