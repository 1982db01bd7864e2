//! Timezone changes, the server side: each user's history (`timezone_changes`), read for every
//! window the server computes, and a change asked for by `PATCH /v1/me` or a device's profile
//! edit: at most one per [`MIN_CHANGE_INTERVAL`], taking effect at its receipt but not before the
//! latest `lease_until` of the user's devices. The window arithmetic is
//! [`tally_core::TimezoneHistory`]'s; this module only stores and reads it.

use crate::error::{ApiError, ApiResult};
use crate::users::User;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tally_core::TimezoneHistory;
use tally_core::timezone_history::{MIN_CHANGE_INTERVAL, change_effective_at};

/// A change asked for that has not taken effect yet (`timezone_pending` of `GET /v1/me`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PendingTimezone {
    /// The IANA timezone asked for.
    pub timezone: String,
    /// When it takes effect (the latest `lease_until` of the user's devices then).
    pub effective_at: DateTime<Utc>,
}

/// The statement reading a user's history in order.
pub const HISTORY_QUERY: &str =
    "SELECT timezone, previous, effective_at FROM timezone_changes WHERE user_id = $1 ORDER BY effective_at, requested_at";

/// The history of `user` from its rows (read with [`HISTORY_QUERY`]): the zone before the first
/// change, then each change. Without rows, `user.timezone` since creation. A stored zone that
/// the zone database does not know is an error, never a guess.
pub fn from_rows(user: &User, rows: &[tokio_postgres::Row]) -> ApiResult<TimezoneHistory> {
    let zone = |name: &str| {
        tally_core::contract::timezone(name)
            .map_err(|_| ApiError::internal(format!("stored timezone {name:?} of user {} is unknown", user.user_id)))
    };
    let Some(first) = rows.first() else { return Ok(TimezoneHistory::fixed(zone(&user.timezone)?)) };
    let initial = zone(first.get::<_, &str>(1))?;
    let changes = rows.iter().map(|r| Ok((zone(r.get::<_, &str>(0))?, r.get::<_, DateTime<Utc>>(2)))).collect::<ApiResult<Vec<_>>>()?;
    TimezoneHistory::new(initial, changes).map_err(ApiError::internal)
}

/// The history of `user`.
pub async fn history(client: &impl GenericClient, user: &User) -> ApiResult<TimezoneHistory> {
    let rows = client.query(&client.prepare_cached(HISTORY_QUERY).await?, &[&user.user_id]).await?;
    from_rows(user, &rows)
}

/// Refuses a change of `user` (row locked) to `tz` at `now` when the previous change was asked
/// for less than [`MIN_CHANGE_INTERVAL`] ago: 429 `timezone_change_too_soon` with `Retry-After`. Asking for
/// the zone already asked for is no change.
pub async fn check_interval(tx: &impl GenericClient, user: &User, tz: &str, now: DateTime<Utc>) -> ApiResult<()> {
    if tz == user.timezone {
        return Ok(());
    }
    let last: Option<DateTime<Utc>> = tx
        .query_one(&tx.prepare_cached("SELECT max(requested_at) FROM timezone_changes WHERE user_id = $1").await?, &[&user.user_id])
        .await?
        .get(0);
    match last.map(|t| t + MIN_CHANGE_INTERVAL).filter(|next| *next > now) {
        Some(next) => {
            let secs = u64::try_from((next - now).num_seconds()).unwrap_or(0).max(1);
            Err(ApiError::TooSoon(
                "timezone_change_too_soon",
                format!("the timezone changed less than 24 h ago; change it again after {}", next.to_rfc3339()),
                secs,
            ))
        }
        None => Ok(()),
    }
}

/// Records a change of `user` (row locked, interval checked) from `user.timezone` to `tz`,
/// asked for at `now`: it takes effect at `now`, but not before the latest `lease_until` of the
/// user's devices nor before the previous change. Returns when it takes effect.
pub async fn record_change(tx: &impl GenericClient, user: &User, tz: &str, now: DateTime<Utc>) -> ApiResult<DateTime<Utc>> {
    let r = tx
        .query_one(
            &tx.prepare_cached(
                "SELECT (SELECT max(lease_until) FROM devices WHERE user_id = $1 AND removed_at IS NULL), \
                        (SELECT max(effective_at) FROM timezone_changes WHERE user_id = $1)",
            )
            .await?,
            &[&user.user_id],
        )
        .await?;
    let latest_lease: Option<DateTime<Utc>> = r.get(0);
    let previous_change: Option<DateTime<Utc>> = r.get(1);
    let effective_at = change_effective_at(now, latest_lease).max(previous_change.unwrap_or(now));
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO timezone_changes (user_id, requested_at, effective_at, timezone, previous) VALUES ($1, $2, $3, $4, $5)",
        )
        .await?,
        &[&user.user_id, &now, &effective_at, &tz, &user.timezone],
    )
    .await?;
    Ok(effective_at)
}

/// The profile of `GET /v1/me` and `PATCH /v1/me`: the user with the zone in force at `now`
/// and the change still pending, if any.
pub fn profile(mut user: User, zones: &TimezoneHistory, now: DateTime<Utc>) -> Profile {
    user.timezone = zones.zone_at(now).name().to_string();
    let timezone_pending = zones.pending(now).map(|(tz, at)| PendingTimezone { timezone: tz.name().to_string(), effective_at: at });
    Profile { user, timezone_pending }
}

/// A user's profile as `GET /v1/me` answers it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Profile {
    /// The user (`timezone`: the zone in force now).
    #[serde(flatten)]
    pub user: User,
    /// A timezone change asked for that takes effect later (when a device's lease ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone_pending: Option<PendingTimezone>,
}
