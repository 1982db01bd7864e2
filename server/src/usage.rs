//! Usage from backends and web clients: `POST /v1/usage` (idempotent record), `POST /v1/check`
//! (a server-side Decision) and `GET /v1/usage` (a report with AI tokens and cost).

use crate::api_keys::{SCOPE_ADMIN, SCOPE_USAGE_READ, SCOPE_USAGE_WRITE};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};
use crate::ledger::{self, Ctx};
use crate::users::{self, User};
use crate::{AppState, entitlements};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tally_core::decision::{Decision, Priced};
use tally_core::wire::Total;
use uuid::Uuid;

/// The user a request acts for: the caller, or the user an API key names by `subject` or
/// `user_id` (which must exist: 404 `unknown_subject`).
pub(crate) async fn target(state: &AppState, p: &Principal, subject: Option<&str>, user_id: Option<&str>) -> ApiResult<User> {
    match p {
        Principal::User(u) => match (subject, user_id) {
            (None, None) => Ok(u.clone()),
            (Some(s), None) if u.external_id.as_deref() == Some(s) => Ok(u.clone()),
            (None, Some(id)) if id == u.user_id.to_string() => Ok(u.clone()),
            _ => Err(ApiError::not_found("user")),
        },
        Principal::Key(k) if k.has_scope(SCOPE_USAGE_WRITE) => users::find_named(state, subject, user_id).await,
        Principal::Key(_) => Err(ApiError::not_found("route")),
    }
}

/// A string field of a JSON body: absent, null or a string.
pub(crate) fn opt_str<'a>(body: &'a Value, field: &str) -> ApiResult<Option<&'a str>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(format!("{field} must be a string"))),
    }
}

/// Answer of `POST /v1/usage`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RecordResponse {
    /// The event id (from `id`, or derived from the `Idempotency-Key`).
    pub id: Uuid,
    /// Whether it was already recorded.
    pub duplicate: bool,
    /// Totals of the event's windows and the current ones.
    pub totals: Vec<Total>,
}

/// `POST /v1/usage`: records one event unconditionally and idempotently.
#[utoipa::path(
    operation_id = "usage_record",
    post,
    path = "/v1/usage",
    tag = "usage",
    security(("bearer" = []), ("api_key" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Stands in for the body's `id`")),
    request_body = Object,
    responses(
        (status = 201, description = "Recorded", body = RecordResponse),
        (status = 200, description = "A duplicate of an earlier report", body = RecordResponse),
    ),
)]
pub async fn record(
    State(state): State<AppState>,
    p: Principal,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<(StatusCode, Json<RecordResponse>)> {
    let subject = opt_str(&body, "subject")?;
    let user_id = opt_str(&body, "user_id")?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v.to_str().map_err(|_| ApiError::invalid("Idempotency-Key must be visible ASCII characters"))?;
            tally_core::contract::idempotency_key(k)?;
            Some(tally_core::ledger::event_id_for_key(k))
        }
    };
    if body.get("id").is_none_or(Value::is_null) && key.is_none() {
        return Err(ApiError::Invalid("missing_id", "give the event an \"id\" or send an Idempotency-Key header".into()));
    }
    let event = ledger::validate(&body, key).map_err(|invalid| ApiError::from(invalid.violation))?;
    let user = target(&state, &p, subject, user_id).await?;
    let now = state.now();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let loaded = entitlements::load(&state, &tx, &user, now).await?;
    let ctx = Ctx::new(&user, &loaded, now);
    if !loaded.catalog.knows_feature(&event.feature) {
        return Err(ApiError::Invalid("unknown_feature", format!("no plan of the catalog knows the feature {:?}", event.feature)));
    }
    ledger::ensure_counters(&tx, &ctx).await?;
    let id = event.id;
    let by = p.actor();
    let out = ledger::ingest(&tx, &ctx, &loaded.ents.features, vec![event], by, "api", Some("usage_report")).await?;
    out.refused_alone(id)?;
    let totals = out.totals;
    tx.commit().await?;
    let duplicate = out.accepted.is_empty();
    ::metrics::counter!(if duplicate { "tally_events_duplicate_total" } else { "tally_events_ingested_total" }).increment(1);
    Ok((if duplicate { StatusCode::OK } else { StatusCode::CREATED }, Json(RecordResponse { id, duplicate, totals })))
}

/// Body of `POST /v1/check`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CheckRequest {
    /// Feature key.
    pub feature: String,
    /// Units (micros for budgets).
    #[serde(default = "one")]
    pub amount: u64,
    /// The user, when an API key calls.
    #[serde(default)]
    pub subject: Option<String>,
    /// The user by server id, when an API key calls.
    #[serde(default)]
    pub user_id: Option<String>,
}

fn one() -> u64 {
    1
}

/// `POST /v1/check`: what a `check(feature, amount)` would decide on the server, against the
/// pool's free room.
#[utoipa::path(
    operation_id = "usage_check",
    post,
    path = "/v1/check",
    tag = "usage",
    security(("bearer" = []), ("api_key" = [])),
    request_body = CheckRequest,
    responses((status = 200, description = "The decision", body = Decision)),
)]
pub async fn check(State(state): State<AppState>, p: Principal, JsonBody(req): JsonBody<CheckRequest>) -> ApiResult<Json<Decision>> {
    tally_core::contract::feature(&req.feature)?;
    tally_core::contract::amount(req.amount)?;
    let user = target(&state, &p, req.subject.as_deref(), req.user_id.as_deref()).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = crate::pools::now_locked(&state);
    let loaded = entitlements::load(&state, &tx, &user, now).await?;
    let ctx = Ctx::new(&user, &loaded, now);
    ledger::ensure_counters(&tx, &ctx).await?;
    // Decided against the free room (holds and device allowances taken out); records nothing.
    let decision = crate::pools::decide(&tx, &ctx, &loaded, &req.feature, req.amount, Priced::NoModel, false, &[]).await?.decision;
    tx.commit().await?;
    if !decision.allowed {
        crate::metrics::decision_denied("check", decision.reason);
    }
    Ok(Json(decision))
}

/// Query of `GET /v1/usage`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReportQuery {
    /// Start (RFC 3339, inclusive); default 30 days ago.
    pub from: Option<String>,
    /// End (RFC 3339, exclusive); default now.
    pub to: Option<String>,
    /// `day`, `feature` (default) or `model`.
    pub group_by: Option<String>,
    /// The user, when an API key calls.
    pub subject: Option<String>,
}

pub(crate) fn parse_time(name: &str, s: Option<&str>, default: DateTime<Utc>) -> ApiResult<DateTime<Utc>> {
    match s {
        None => Ok(default),
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| ApiError::invalid(format!("{name} must be an RFC 3339 time"))),
    }
}

/// A grouping of usage reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// The local date (`YYYY-MM-DD`) in the user's timezone.
    Day,
    /// The feature key.
    Feature,
    /// The AI model (`""` without one).
    Model,
    /// The user: their subject, else their server id.
    User,
}

impl Group {
    /// The group of a `group_by` value.
    pub fn parse(s: &str) -> ApiResult<Group> {
        match s {
            "day" => Ok(Group::Day),
            "feature" => Ok(Group::Feature),
            "model" => Ok(Group::Model),
            other => Err(ApiError::invalid(format!("group_by must be day, feature or model, not {other:?}"))),
        }
    }
    fn sql(self) -> &'static str {
        match self {
            Group::Day => "to_char(e.effective_at AT TIME ZONE u.timezone, 'YYYY-MM-DD')",
            Group::Feature => "e.feature",
            Group::Model => "coalesce(e.model, '')",
            Group::User => "coalesce(u.external_id, u.user_id::text)",
        }
    }
}

/// One row of a usage report: its group keys (in the order asked) and its sums. Amounts are
/// only ever summed within one feature (every report groups by feature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The values of the groups, in the order of the request.
    pub keys: Vec<String>,
    /// Events counted.
    pub events: i64,
    /// Summed amounts.
    pub amount: i64,
    /// Summed input tokens.
    pub input_tokens: i64,
    /// Summed output tokens.
    pub output_tokens: i64,
    /// Summed AI cost in micros.
    pub cost_micros: i64,
    /// Summed credits drawn (each use's price when it was recorded).
    pub credits: i64,
}

/// Which uses a report covers: one user or all, in `[from, to)` by effective time (an absent
/// bound: unbounded).
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    /// The user (`None`: every user).
    pub user_id: Option<Uuid>,
    /// Start (inclusive).
    pub from: Option<DateTime<Utc>>,
    /// End (exclusive).
    pub to: Option<DateTime<Utc>>,
}

/// The usage in `scope`, voided events left out, grouped by `groups` (a day in each user's
/// timezone) and by feature (added last when `groups` lacks it, so no row adds amounts of
/// different features together), ordered by the keys: the one query of every usage report (the
/// API's, the console's and the CLI's).
pub async fn grouped(client: &impl GenericClient, scope: Scope, groups: &[Group]) -> ApiResult<Vec<UsageRow>> {
    let mut groups = groups.to_vec();
    if !groups.contains(&Group::Feature) {
        groups.push(Group::Feature);
    }
    let keys: Vec<String> = groups.iter().enumerate().map(|(i, g)| format!("{} AS k{i}", g.sql())).collect();
    let by: Vec<String> = (0..groups.len()).map(|i| format!("k{i}")).collect();
    let mut filter = vec!["e.voided_at IS NULL".to_string()];
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    if let Some(u) = &scope.user_id {
        params.push(u);
        filter.push(format!("e.user_id = ${}", params.len()));
    }
    if let Some(f) = &scope.from {
        params.push(f);
        filter.push(format!("e.effective_at >= ${}", params.len()));
    }
    if let Some(t) = &scope.to {
        params.push(t);
        filter.push(format!("e.effective_at < ${}", params.len()));
    }
    let sql = format!(
        "SELECT {}, count(*)::bigint, sum(e.amount)::bigint, coalesce(sum(e.input_tokens), 0)::bigint, \
         coalesce(sum(e.output_tokens), 0)::bigint, coalesce(sum(e.cost_micros), 0)::bigint, coalesce(sum(e.credits), 0)::bigint \
         FROM events e JOIN users u ON u.user_id = e.user_id WHERE {} GROUP BY {by} ORDER BY {by}",
        keys.join(", "),
        filter.join(" AND "),
        by = by.join(", ")
    );
    let rows = client.query(&sql, &params).await?;
    let n = groups.len();
    Ok(rows
        .iter()
        .map(|r| UsageRow {
            keys: (0..n).map(|i| r.get::<_, String>(i)).collect(),
            events: r.get(n),
            amount: r.get(n + 1),
            input_tokens: r.get(n + 2),
            output_tokens: r.get(n + 3),
            cost_micros: r.get(n + 4),
            credits: r.get(n + 5),
        })
        .collect())
}

/// Usage rows of `user_id` in `[from, to)`, grouped by `group_by` (`day` in the user's
/// timezone) and by feature, as the JSON reports answer them: each row names its `group_by`
/// value and its `feature`.
pub async fn report_rows(
    client: &impl GenericClient,
    user_id: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    group_by: &str,
) -> ApiResult<Vec<Value>> {
    let group = Group::parse(group_by)?;
    let rows = grouped(client, Scope { user_id: Some(user_id), from: Some(from), to: Some(to) }, &[group]).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            json!({group_by: r.keys.first(), "feature": r.keys.last(), "events": r.events, "amount": r.amount,
                   "input_tokens": r.input_tokens, "output_tokens": r.output_tokens, "cost_micros": r.cost_micros,
                   "credits": r.credits})
        })
        .collect())
}

/// `GET /v1/usage?from&to&group_by=day|feature|model`: rows per group and feature (voided uses
/// left out), so no row adds amounts of different features together.
#[utoipa::path(
    operation_id = "usage_report",
    get,
    path = "/v1/usage",
    tag = "usage",
    security(("bearer" = []), ("api_key" = [])),
    params(ReportQuery),
    responses((status = 200, description = "Usage grouped by day, feature or model, and always by feature", body = Object)),
)]
pub async fn report(State(state): State<AppState>, p: Principal, QueryParams(q): QueryParams<ReportQuery>) -> ApiResult<Json<Value>> {
    let now = state.now();
    let from = parse_time("from", q.from.as_deref(), now - Duration::days(30))?;
    let to = parse_time("to", q.to.as_deref(), now + Duration::minutes(10))?;
    let group_by = q.group_by.as_deref().unwrap_or("feature");
    Group::parse(group_by)?;
    let user = match (&p, q.subject.as_deref()) {
        // Reading usage is not recording it: a `usage:write` key alone gets 404.
        (Principal::Key(k), Some(_)) if !(k.has_scope(SCOPE_USAGE_READ) || k.has_scope(SCOPE_ADMIN)) => {
            return Err(ApiError::not_found("route"));
        }
        (Principal::Key(_), Some(s)) => {
            let client = state.pool.get().await?;
            let r = client.query_opt(&format!("SELECT {} FROM users WHERE external_id = $1", users::USER_COLUMNS), &[&s]).await?;
            r.map(|r| User::from_row(&r, &state.config.admin_subjects)).ok_or_else(|| ApiError::not_found("user"))?
        }
        _ => target(&state, &p, q.subject.as_deref(), None).await?,
    };
    let client = state.pool.get().await?;
    let rows = report_rows(&client, user.user_id, from, to, group_by).await?;
    Ok(Json(json!({"from": from, "to": to, "group_by": group_by, "rows": rows})))
}
