//! `GET /v1/usage/events`: a user's own usage history, newest first, one page at a time (a
//! usage-history screen), voided uses shown with when and why.

use crate::api_keys::{SCOPE_ADMIN, SCOPE_USAGE_READ};
use crate::auth::Principal;
use crate::authority::RecordedBy;
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryParams;
use crate::users::{self, User};
use crate::{AppState, usage};
use axum::Json;
use axum::extract::State;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Events per page when `limit` is absent.
pub const DEFAULT_PAGE: i64 = 100;
/// The largest `limit`.
pub const MAX_PAGE: i64 = 1000;

/// Query of `GET /v1/usage/events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Start (RFC 3339, inclusive); default 30 days ago.
    pub from: Option<String>,
    /// End (RFC 3339, exclusive); default now.
    pub to: Option<String>,
    /// Only this feature.
    pub feature: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Events per page, 1 to [`MAX_PAGE`] (default [`DEFAULT_PAGE`]).
    pub limit: Option<i64>,
    /// The user, when an API key with `usage:read` calls.
    pub subject: Option<String>,
}

/// One use as the history lists it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventView {
    /// Event id.
    pub id: Uuid,
    /// Feature key.
    pub feature: String,
    /// Amount.
    pub amount: i64,
    /// When it happened, as sent.
    pub occurred_at: DateTime<Utc>,
    /// The time its windows count it at.
    pub effective_at: DateTime<Utc>,
    /// When the server received it.
    pub received_at: DateTime<Utc>,
    /// The device that recorded it (`None`: a backend).
    pub device_id: Option<String>,
    /// `sync`, `api`, `consume`, … (how it reached the server).
    pub source: String,
    /// AI model, tokens and priced cost, when given.
    pub model: Option<String>,
    /// Input tokens.
    pub input_tokens: Option<i64>,
    /// Output tokens.
    pub output_tokens: Option<i64>,
    /// Priced cost in micros.
    pub cost_micros: i64,
    /// The app's metadata.
    pub metadata: Option<serde_json::Value>,
    /// Why it is over its window's limit, if it is.
    pub cause: Option<String>,
    /// When it was voided (it no longer counts), and why.
    pub voided_at: Option<DateTime<Utc>>,
    /// The void's reason.
    pub void_reason: Option<String>,
    /// Who recorded it (`device`, `user` or `backend`): who may void it.
    pub recorded_by: RecordedBy,
    /// The use it is an item of, for a use of several items (a void of that id voids them all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_id: Option<Uuid>,
}

/// A page of the history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventsPage {
    /// The events, newest first.
    pub events: Vec<EventView>,
    /// Pass as `cursor` for the next page; `None` on the last one.
    pub next_cursor: Option<String>,
}

/// A cursor: the (effective time, id) of the last event of a page, opaque to clients.
fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{id}", at.timestamp_micros()))
}

fn decode_cursor(s: &str) -> ApiResult<(DateTime<Utc>, Uuid)> {
    let bad = || ApiError::Invalid("invalid_cursor", "cursor is not one this server handed out".into());
    let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (micros, id) = text.split_once('|').ok_or_else(bad)?;
    let at = micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| bad())?))
}

/// `GET /v1/usage/events?from&to&feature&cursor&limit`: the caller's own uses (an API key with
/// `usage:read` names `subject`), newest first.
#[utoipa::path(
    operation_id = "usage_events_list",
    get,
    path = "/v1/usage/events",
    tag = "usage",
    security(("bearer" = []), ("api_key" = [])),
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of the caller's uses, newest first", body = EventsPage),
    ),
)]
pub async fn list(State(state): State<AppState>, p: Principal, QueryParams(q): QueryParams<EventsQuery>) -> ApiResult<Json<EventsPage>> {
    let now = state.now();
    let from = usage::parse_time("from", q.from.as_deref(), now - Duration::days(30))?;
    let to = usage::parse_time("to", q.to.as_deref(), now + Duration::minutes(10))?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::Invalid("invalid_query", format!("limit must be 1 to {MAX_PAGE}, got {limit}")));
    }
    if let Some(f) = &q.feature {
        tally_core::contract::feature(f).map_err(|e| ApiError::Invalid("invalid_feature", e.to_string()))?;
    }
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let user: User = match (&p, q.subject.as_deref()) {
        (Principal::Key(k), Some(s)) if k.has_scope(SCOPE_USAGE_READ) || k.has_scope(SCOPE_ADMIN) => {
            users::find_named(&state, Some(s), None).await?
        }
        (Principal::Key(_), _) => return Err(ApiError::not_found("route")),
        _ => usage::target(&state, &p, q.subject.as_deref(), None).await?,
    };
    let (after_at, after_id) = match after {
        Some((at, id)) => (Some(at), Some(id)),
        None => (None, None),
    };
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &client
                .prepare_cached(
                    "SELECT id, feature, amount, occurred_at, effective_at, received_at, device_id, source, model, input_tokens, \
                       output_tokens, cost_micros, metadata, cause, voided_at, void_reason, recorded_by, use_id FROM events \
                     WHERE user_id = $1 AND effective_at >= $2 AND effective_at < $3 AND ($4::text IS NULL OR feature = $4) \
                       AND ($5::timestamptz IS NULL OR (effective_at, id) < ($5, $6)) \
                     ORDER BY effective_at DESC, id DESC LIMIT $7",
                )
                .await?,
            &[&user.user_id, &from, &to, &q.feature, &after_at, &after_id, &(limit + 1)],
        )
        .await?;
    let more = rows.len() as i64 > limit;
    let events: Vec<EventView> = rows
        .iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(|r| EventView {
            id: r.get(0),
            feature: r.get(1),
            amount: r.get(2),
            occurred_at: r.get(3),
            effective_at: r.get(4),
            received_at: r.get(5),
            device_id: r.get(6),
            source: r.get(7),
            model: r.get(8),
            input_tokens: r.get(9),
            output_tokens: r.get(10),
            cost_micros: r.get(11),
            metadata: r.get(12),
            cause: r.get(13),
            voided_at: r.get(14),
            void_reason: r.get(15),
            recorded_by: r.get(16),
            use_id: r.get(17),
        })
        .collect();
    let next_cursor = if more { events.last().map(|e| encode_cursor(e.effective_at, e.id)) } else { None };
    Ok(Json(EventsPage { events, next_cursor }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let at = DateTime::from_timestamp_micros(1_767_225_600_123_456).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)).unwrap(), (at, id));
        for bad in ["", "!!", "bm90LWEtY3Vyc29y", &URL_SAFE_NO_PAD.encode("12|not-a-uuid")] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }
}
