//! Access grants: a plan given to a user until a date (or for good), by an admin through
//! `POST /v1/admin/grants` or the `tally-server grant` command — one service for both, validated
//! before anything is created, applied in one transaction.

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
    crate::users::bump_version(tx, user_id, now).await?;
    Ok((user_id, grant_id))
}
