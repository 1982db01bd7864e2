//! Holds: room kept in a pool for work of unknown cost. `POST /v1/holds` takes the whole amount
//! (for a budget: the estimated micros; for credits: `cost × amount` credits) from the free room
//! or is denied; `POST /v1/holds/{id}/commit` records one event (id = hold id) with the real
//! amount, always, and gives the held room back; `DELETE /v1/holds/{id}` gives it back without
//! recording. An open hold past its `expires_at` stops counting by [`sweep`], which every replica
//! runs; a commit after expiry still records (cause `hold_expired` when over the limit).

use crate::authority::{self, Actor, RecordedBy};
use crate::consume::{self, ConsumeResponse, request_id, use_event};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::ledger::{self, Ctx};
use crate::pools::{self, PoolKey};
use crate::usage::{opt_str, target};
use crate::{AppState, entitlements, users};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_core::Rule;
use tally_core::decision::{Decision, Priced, Reason};
use uuid::Uuid;

/// Default `ttl_secs` of a hold.
pub const DEFAULT_TTL_SECS: u64 = 300;
/// Longest `ttl_secs` of a hold.
pub const MAX_TTL_SECS: u64 = 3600;
/// How often every replica sweeps expired holds.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A hold as answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Hold {
    /// Hold id (the id of the event its commit records).
    pub id: Uuid,
    /// Feature key.
    pub feature: String,
    /// Units held (micros for a budget).
    pub amount: u64,
    /// When it stops counting unless committed or released.
    pub expires_at: DateTime<Utc>,
}

/// Answer of `POST /v1/holds`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HoldResponse {
    /// The hold.
    pub hold: Hold,
    /// The decision that granted it.
    pub decision: Decision,
}

fn ttl(body: &Value) -> ApiResult<u64> {
    match body.get("ttl_secs") {
        None | Some(Value::Null) => Ok(DEFAULT_TTL_SECS),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_TTL_SECS).contains(&n) => Ok(n),
            _ => Err(ApiError::Invalid("invalid_ttl", format!("ttl_secs must be a whole number of seconds from 1 to {MAX_TTL_SECS}"))),
        },
    }
}

/// `POST /v1/holds {feature, amount, ttl_secs?, id?, subject?, user_id?}`: 201 `{hold,
/// decision}` when the whole amount fits the free room, else the denial (nothing held). The
/// same id again answers the hold as it is (200).
#[utoipa::path(
    operation_id = "holds_create",
    post,
    path = "/v1/holds",
    tag = "usage",
    security(("bearer" = []), ("api_key" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Stands in for the body's `id`")),
    request_body = Object,
    responses(
        (status = 201, description = "Held", body = HoldResponse),
        (status = 200, description = "A replay of an earlier hold", body = HoldResponse),
    ),
)]
pub async fn create(
    State(state): State<AppState>,
    p: crate::auth::Principal,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<(StatusCode, Json<HoldResponse>)> {
    let subject = opt_str(&body, "subject")?;
    let user_id = opt_str(&body, "user_id")?;
    let now = state.now();
    let ttl = ttl(&body)?;
    for f in ["model", "input_tokens", "output_tokens", "metadata"] {
        if body.get(f).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::Invalid("invalid_body", format!("{f} belongs to the commit of a hold, not to the hold")));
        }
    }
    if body.get("amount").is_none_or(Value::is_null) {
        return Err(ApiError::Invalid("invalid_amount", "amount is missing (units to hold; micros for a budget)".into()));
    }
    let id = request_id(&body, &headers)?.unwrap_or_else(Uuid::now_v7);
    let event = use_event(&body, id, None, now)?;
    let amount = u64::try_from(event.amount).unwrap_or(0);
    let user = target(&state, &p, subject, user_id).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = pools::now_locked(&state);
    if let Some(h) = find(&tx, user.user_id, id).await? {
        tx.commit().await?;
        if h.feature != event.feature || h.amount != event.amount {
            return Err(ApiError::Conflict("conflict", format!("hold {id} already exists with a different body")));
        }
        let decision = h.granted.clone().unwrap_or_else(|| Decision::simple(true, Reason::Ok, ""));
        return Ok((StatusCode::OK, Json(HoldResponse { hold: h.public(), decision })));
    }
    let loaded = entitlements::load(&state, &tx, &user, now).await?;
    let ctx = Ctx::new(&user, &loaded, now);
    ledger::ensure_counters(&tx, &ctx).await?;
    if event_exists(&tx, user.user_id, id).await? {
        return Err(ApiError::Conflict("conflict", format!("event {id} was already recorded; a hold needs an id of its own")));
    }
    let rule = loaded.ents.features.get(&event.feature);
    if let Some(r) = rule
        && !matches!(r, Rule::Metered { .. } | Rule::Budget { .. } | Rule::Credits { .. })
    {
        return Err(ApiError::Invalid(
            "invalid_feature",
            format!("{:?} is not metered, a budget or credits: nothing to hold", event.feature),
        ));
    }
    let decided = pools::decide(&tx, &ctx, &loaded, &event.feature, amount, Priced::NoModel, false).await?;
    let (Some((key, _)), true) = (decided.pool.clone(), decided.decision.allowed) else {
        if decided.decision.held_offline.is_some() {
            // Nothing held; the recalls set for the devices' room stay.
            tx.commit().await?;
        }
        crate::metrics::decision_denied("holds", decided.decision.reason);
        return Err(pools::denial(&event.feature, rule, decided.decision));
    };
    let held = i64::try_from(decided.need).map_err(|_| ApiError::Invalid("invalid_amount", "amount is too large to hold".into()))?;
    let expires_at = now + Duration::seconds(i64::try_from(ttl).unwrap_or(0));
    let granted = serde_json::to_value(&decided.decision)?;
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO holds (user_id, id, feature, amount, pool_feature, period, period_start, period_end, held, created_at, expires_at, granted, \
               recorded_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .await?,
        &[
            &user.user_id,
            &id,
            &event.feature,
            &event.amount,
            &key.feature,
            &key.period,
            &key.period_start,
            &key.period_end,
            &held,
            &now,
            &expires_at,
            &granted,
            &p.actor().recorded_by().as_str(),
        ],
    )
    .await?;
    pools::add_held(&tx, user.user_id, &key, held).await?;
    tx.commit().await?;
    ::metrics::counter!("tally_holds_created_total").increment(1);
    let hold = Hold { id, feature: event.feature, amount, expires_at };
    Ok((StatusCode::CREATED, Json(HoldResponse { hold, decision: decided.decision })))
}

/// A stored hold.
#[derive(Debug, Clone)]
struct Stored {
    id: Uuid,
    feature: String,
    amount: i64,
    key: PoolKey,
    held: i64,
    expires_at: DateTime<Utc>,
    state: String,
    answer: Option<Value>,
    granted: Option<Decision>,
    /// Who made it: only as much authority commits or releases it.
    recorded_by: RecordedBy,
}

impl Stored {
    fn public(&self) -> Hold {
        Hold { id: self.id, feature: self.feature.clone(), amount: u64::try_from(self.amount).unwrap_or(0), expires_at: self.expires_at }
    }
}

/// The (user's) hold `id`, locked.
async fn find(tx: &impl GenericClient, user_id: Uuid, id: Uuid) -> ApiResult<Option<Stored>> {
    let r = tx
        .query_opt(
            &tx.prepare_cached(
                "SELECT id, feature, amount, pool_feature, period, period_start, period_end, held, expires_at, state, answer, granted, \
                   recorded_by FROM holds WHERE user_id = $1 AND id = $2 FOR UPDATE",
            )
            .await?,
            &[&user_id, &id],
        )
        .await?;
    Ok(r.map(|r| Stored {
        id: r.get(0),
        feature: r.get(1),
        amount: r.get(2),
        key: PoolKey { feature: r.get(3), period: r.get(4), period_start: r.get(5), period_end: r.get(6) },
        held: r.get(7),
        expires_at: r.get(8),
        state: r.get(9),
        answer: r.get(10),
        granted: r.get::<_, Option<Value>>(11).and_then(|v| serde_json::from_value(v).ok()),
        recorded_by: r.get(12),
    }))
}

async fn event_exists(tx: &impl GenericClient, user_id: Uuid, id: Uuid) -> ApiResult<bool> {
    Ok(tx.query_opt(&tx.prepare_cached("SELECT 1 FROM events WHERE user_id = $1 AND id = $2").await?, &[&user_id, &id]).await?.is_some())
}

fn unknown_hold(id: &str) -> ApiError {
    ApiError::Unknown("unknown_hold", format!("no hold {id:?}"))
}

/// The user's hold `id` (locked) when `by` may commit or release it: 404 `unknown_hold`
/// without one, 403 `void_not_allowed` when `by` has less authority than its maker.
async fn find_for(tx: &impl GenericClient, user_id: Uuid, id: &str, by: Actor<'_>) -> ApiResult<Stored> {
    let Some(h) = find(tx, user_id, tally_core::ledger::event_id_for_key(id)).await? else { return Err(unknown_hold(id)) };
    if !by.may_undo(h.recorded_by, None) {
        return Err(authority::not_allowed(&format!("hold {id:?}"), h.recorded_by));
    }
    Ok(h)
}

/// Ends an open hold in `state` (`committed`, `released` or `expired`), giving its room back.
async fn close(tx: &impl GenericClient, user_id: Uuid, h: &Stored, state: &str, answer: Option<&Value>) -> ApiResult<()> {
    if h.state == "open" {
        pools::add_held(tx, user_id, &h.key, -h.held).await?;
    }
    tx.execute(
        &tx.prepare_cached("UPDATE holds SET state = $3, answer = $4 WHERE user_id = $1 AND id = $2").await?,
        &[&user_id, &h.id, &state, &answer],
    )
    .await?;
    Ok(())
}

/// Query of the hold routes when an API key calls.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WhoQuery {
    /// The user, when an API key calls.
    pub subject: Option<String>,
    /// The user by server id, when an API key calls.
    pub user_id: Option<String>,
}

/// `POST /v1/holds/{id}/commit {amount?, model?, input_tokens?, output_tokens?, metadata?,
/// subject?, user_id?}`: records the hold's event with the real amount, always (default: for a
/// budget with a `model`, its priced cost in micros; else the held amount); 200 `{id, duplicate,
/// decision}`. A second commit answers the first; a released hold is 409 `hold_released`.
#[utoipa::path(
    operation_id = "holds_commit",
    post,
    path = "/v1/holds/{id}/commit",
    tag = "usage",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The hold id")),
    request_body = Object,
    responses((status = 200, description = "Recorded", body = crate::consume::ConsumeResponse)),
)]
pub async fn commit(
    State(state): State<AppState>,
    p: crate::auth::Principal,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<ConsumeResponse>> {
    let subject = opt_str(&body, "subject")?;
    let user_id = opt_str(&body, "user_id")?;
    for f in ["feature", "id", "ttl_secs"] {
        if body.get(f).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::Invalid("invalid_body", format!("{f} cannot change at commit; it is the hold's")));
        }
    }
    tally_core::contract::idempotency_key(&id)?;
    let user = target(&state, &p, subject, user_id).await?;
    let by = p.actor();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = pools::now_locked(&state);
    let h = find_for(&tx, user.user_id, &id, by).await?;
    match h.state.as_str() {
        "committed" => {
            let first: ConsumeResponse = h
                .answer
                .clone()
                .and_then(|a| serde_json::from_value::<Decision>(a).ok())
                .map(|decision| ConsumeResponse { id: h.id, duplicate: true, decision })
                .ok_or_else(|| ApiError::internal("a committed hold without its answer"))?;
            tx.commit().await?;
            return Ok(Json(first));
        }
        "released" => return Err(ApiError::Conflict("hold_released", format!("hold {id:?} was released; nothing to commit"))),
        _ => {}
    }
    let mut sent = body.clone();
    if let Some(o) = sent.as_object_mut() {
        o.insert("feature".into(), Value::String(h.feature.clone()));
    }
    let mut event = use_event(&sent, h.id, u64::try_from(h.amount).ok(), now)?;
    let loaded = entitlements::load(&state, &tx, &user, now).await?;
    let ctx = Ctx::new(&user, &loaded, now);
    ledger::ensure_counters(&tx, &ctx).await?;
    if let Some(rule) = loaded.ents.features.get(&h.feature)
        && matches!(rule, Rule::Budget { .. })
    {
        let tokens = |n: Option<i64>| n.and_then(|n| u64::try_from(n).ok());
        match pools::priced(&loaded.catalog, rule, event.model.as_deref(), tokens(event.input_tokens), tokens(event.output_tokens))? {
            Priced::UnknownModel => {
                let m = event.model.as_deref().unwrap_or_default();
                return Err(ApiError::Invalid("unknown_model", format!("the catalog has no price for the model {m:?}")));
            }
            // A budget use's amount is its real cost in micros, never the hold's estimate.
            Priced::Cost(cost) if sent.get("amount").is_none_or(Value::is_null) => {
                event.amount =
                    i64::try_from(cost.max(1)).map_err(|_| ApiError::Invalid("invalid_amount", "the cost is out of range".into()))?;
            }
            Priced::Cost(_) | Priced::NoModel => {}
        }
    }
    let expired = h.state == "expired" || h.expires_at <= now;
    // Give the held room back first: the event takes its real amount from the pool.
    close(&tx, user.user_id, &h, "committing", None).await?;
    let cause = if expired { "hold_expired" } else { "cost_over_estimate" };
    let feature = h.feature.clone();
    let out =
        consume::record(&tx, &ctx, &loaded.ents.features, event, by, "hold", Some(cause), &Decision::simple(true, Reason::Ok, "")).await?;
    let decision = after_decision(&loaded, &feature, &out.totals, &loaded.ents.access_reason);
    let answer = serde_json::to_value(&decision)?;
    tx.execute(&tx.prepare_cached("UPDATE events SET answer = $3 WHERE user_id = $1 AND id = $2").await?, &[&user.user_id, &h.id, &answer])
        .await?;
    tx.execute(
        &tx.prepare_cached("UPDATE holds SET state = 'committed', answer = $3 WHERE user_id = $1 AND id = $2").await?,
        &[&user.user_id, &h.id, &answer],
    )
    .await?;
    tx.commit().await?;
    ::metrics::counter!("tally_holds_committed_total").increment(1);
    Ok(Json(ConsumeResponse { id: h.id, duplicate: false, decision }))
}

/// The decision shown after a commit recorded: allowed (it was recorded), with the window's
/// settled use; `limit_reached` / `budget_exceeded` when the window is over its limit.
fn after_decision(loaded: &entitlements::Loaded, feature: &str, totals: &[tally_core::wire::Total], ar: &str) -> Decision {
    let rule = loaded.ents.features.get(feature);
    let t = rule
        .and_then(Rule::period)
        .and_then(|p| totals.iter().filter(|t| t.feature == feature && t.period == p).max_by_key(|t| t.period_start));
    match (rule, t) {
        (Some(rule), Some(t)) => {
            let over = t.limit.is_some_and(|l| t.used > l);
            let reason = match (over, rule) {
                (false, _) => Reason::Ok,
                (true, Rule::Budget { .. }) => Reason::BudgetExceeded,
                (true, _) => Reason::LimitReached,
            };
            Decision {
                allowed: true,
                reason,
                used: t.used,
                limit: t.limit,
                remaining: t.remaining,
                resets_at: t.period_end,
                access_reason: ar.into(),
                over_limit_by: t.over_limit_by,
                device_remaining: None,
                held_offline: None,
            }
        }
        (Some(Rule::Credits { .. }), None) => {
            let b = loaded.ents.credit_balance;
            let mut d = Decision::simple(true, Reason::Ok, ar);
            d.remaining = Some(u64::try_from(b.max(0)).unwrap_or(0));
            d
        }
        _ => Decision::simple(true, Reason::Ok, ar),
    }
}

/// `DELETE /v1/holds/{id}`: releases an open hold (204); a released or expired hold is 204
/// again; a committed one 409 `hold_committed`; an unknown one 404 `unknown_hold`.
#[utoipa::path(
    operation_id = "holds_release",
    delete,
    path = "/v1/holds/{id}",
    tag = "usage",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The hold id"), WhoQuery),
    responses((status = 204, description = "Released (or already released)")),
)]
pub async fn release(
    State(state): State<AppState>,
    p: crate::auth::Principal,
    Path(id): Path<String>,
    crate::extract::QueryParams(q): crate::extract::QueryParams<WhoQuery>,
) -> ApiResult<StatusCode> {
    tally_core::contract::idempotency_key(&id)?;
    let user = target(&state, &p, q.subject.as_deref(), q.user_id.as_deref()).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let h = find_for(&tx, user.user_id, &id, p.actor()).await?;
    match h.state.as_str() {
        "open" => close(&tx, user.user_id, &h, "released", None).await?,
        "committed" => return Err(ApiError::Conflict("hold_committed", format!("hold {id:?} was committed; void its event instead"))),
        _ => {}
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Expires the open holds past their `expires_at` by the server's clock, giving their room
/// back; returns how many. Safe with several replicas: a hold is ended with its user's row
/// locked (skipped when another transaction holds it; the next round takes it).
pub async fn sweep(state: &AppState) -> ApiResult<u64> {
    let now = state.now();
    let client = state.pool.get().await?;
    let due = client
        .query(
            &client
                .prepare_cached("SELECT user_id, id FROM holds WHERE state = 'open' AND expires_at <= $1 ORDER BY expires_at LIMIT 500")
                .await?,
            &[&now],
        )
        .await?;
    drop(client);
    let mut n = 0;
    for r in due {
        let (user_id, id): (Uuid, Uuid) = (r.get(0), r.get(1));
        let mut client = state.pool.get().await?;
        let tx = client.transaction().await?;
        let locked = tx
            .query_opt(&tx.prepare_cached("SELECT 1 FROM users WHERE user_id = $1 FOR NO KEY UPDATE SKIP LOCKED").await?, &[&user_id])
            .await?;
        if locked.is_none() {
            continue;
        }
        if let Some(h) = find(&tx, user_id, id).await?
            && h.state == "open"
            && h.expires_at <= now
        {
            close(&tx, user_id, &h, "expired", None).await?;
            n += 1;
        }
        tx.commit().await?;
    }
    Ok(n)
}
