//! Holds: room kept in a pool for work of unknown cost. `POST /v1/holds` takes the whole amount
//! (for a budget: the estimated micros; for credits: `cost × amount` credits) from the free room
//! or is denied; `POST /v1/holds/{id}/commit` records one event (id = hold id) with the real
//! amount, always, and gives the held room back; `DELETE /v1/holds/{id}` gives it back without
//! recording. A hold of several `items` ([`crate::uses`]) holds every item or none, keeps one row
//! per item (id `item_event_id(hold id, feature)`, the id of the event its commit records), and
//! is committed or released as a whole. An open hold past its `expires_at` stops counting by [`sweep`], which every replica
//! runs; a commit after expiry still records (cause `hold_expired` when over the limit).

use crate::authority::{self, Actor, RecordedBy};
use crate::consume::request_id;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::ledger::{self, Ctx};
use crate::pools::{self, PoolKey};
use crate::usage::{opt_str, target};
use crate::uses::ConsumeResponse;
use crate::uses::{self, Form, Stage, Use};
use crate::{AppState, entitlements, users};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tally_core::Rule;
use tally_core::decision::{Decision, Priced, Reason};
use uuid::Uuid;

/// Default `ttl_secs` of a hold.
pub const DEFAULT_TTL_SECS: u64 = 300;
/// Longest `ttl_secs` of a hold.
pub const MAX_TTL_SECS: u64 = 3600;
/// How often every replica sweeps expired holds.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One item of a hold of several items, as answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HoldItem {
    /// Feature key.
    pub feature: String,
    /// Units held (micros for a budget).
    pub amount: u64,
}

/// A hold as answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Hold {
    /// Hold id (the id of the event its commit records; the use id of a hold of several items).
    pub id: Uuid,
    /// Feature key (the first item's, for a hold of several items).
    pub feature: String,
    /// Units held (micros for a budget; the first item's, for a hold of several items).
    pub amount: u64,
    /// When it stops counting unless committed or released.
    pub expires_at: DateTime<Utc>,
    /// A hold of several items: every item, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<HoldItem>>,
}

/// Answer of `POST /v1/holds`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HoldResponse {
    /// The hold.
    pub hold: Hold,
    /// The decision that granted it (the first item's, for a hold of several items).
    pub decision: Decision,
    /// A hold of several items: every item's decision, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<Vec<Decision>>,
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

/// The answer of a hold whose rows (one per item) are `rows`, granted by `decisions`.
fn answer(id: Uuid, rows: &[(String, i64)], expires_at: DateTime<Utc>, items: bool, decisions: Vec<Decision>) -> ApiResult<HoldResponse> {
    let amount = |a: i64| u64::try_from(a).unwrap_or(0);
    let ((feature, first), decision) = rows.first().zip(decisions.first()).ok_or_else(|| ApiError::internal("a hold without items"))?;
    let hold = Hold {
        id,
        feature: feature.clone(),
        amount: amount(*first),
        expires_at,
        items: items.then(|| rows.iter().map(|(f, a)| HoldItem { feature: f.clone(), amount: amount(*a) }).collect()),
    };
    Ok(HoldResponse { hold, decision: decision.clone(), decisions: items.then_some(decisions) })
}

/// `POST /v1/holds {feature, amount, ttl_secs?, id?, subject?, user_id?}` (or `items: [{feature,
/// amount}]` instead of `feature` and `amount`): 201 `{hold, decision}` (and `decisions`) when
/// every item's whole amount fits the free room (all held), else the first denial (nothing
/// held). The same id again answers the hold as it is (200).
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
    if body.get("items").is_none_or(Value::is_null) && body.get("amount").is_none_or(Value::is_null) {
        return Err(ApiError::Invalid("invalid_amount", "amount is missing (units to hold; micros for a budget)".into()));
    }
    let id = request_id(&body, &headers)?.unwrap_or_else(Uuid::now_v7);
    let mut held = Use::parse(&body, id, None, now)?;
    if held.items.iter().any(|it| it.event.model.is_some() || it.event.input_tokens.is_some() || it.event.output_tokens.is_some()) {
        return Err(ApiError::Invalid("invalid_body", "model and tokens belong to the commit of a hold, not to the hold".into()));
    }
    let items = held.form == Form::Items;
    let user = target(&state, &p, subject, user_id).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = pools::now_locked(&state);
    let rows = find(&tx, user.user_id, id).await?;
    if let Some(h) = rows.first() {
        tx.commit().await?;
        let same = rows.len() == held.items.len()
            && rows.iter().zip(&held.items).all(|(h, it)| h.feature == it.event.feature && h.amount == it.event.amount);
        if !same {
            return Err(ApiError::Conflict("conflict", format!("hold {id} already exists with a different body")));
        }
        let decisions = rows.iter().map(|h| h.granted.clone().unwrap_or_else(|| Decision::simple(true, Reason::Ok, ""))).collect();
        let held: Vec<(String, i64)> = rows.iter().map(|h| (h.feature.clone(), h.amount)).collect();
        return Ok((StatusCode::OK, Json(answer(id, &held, h.expires_at, items, decisions)?)));
    }
    let loaded = entitlements::load(&state, &tx, &user, now).await?;
    let ctx = Ctx::new(&user, &loaded, now);
    ledger::ensure_counters(&tx, &ctx).await?;
    if event_exists(&tx, user.user_id, id).await? {
        return Err(ApiError::Conflict("conflict", format!("event {id} was already recorded; a hold needs an id of its own")));
    }
    for it in &held.items {
        if let Some(r) = loaded.ents.features.get(&it.event.feature)
            && !matches!(r, Rule::Metered { .. } | Rule::Budget { .. } | Rule::Credits { .. })
        {
            let f = &it.event.feature;
            return Err(ApiError::Invalid("invalid_feature", format!("{f:?} is not metered, a budget or credits: nothing to hold")));
        }
    }
    held.prepare(&loaded, now)?;
    let decided = held.decide(&tx, &ctx, &loaded, Stage::Hold).await?;
    if let Some(denied) = held.denial(&loaded, &decided, "holds") {
        if decided.iter().any(|d| d.decision.held_offline.is_some()) {
            // Nothing held; the recalls set for the devices' room stay.
            tx.commit().await?;
        }
        return Err(denied);
    }
    let expires_at = now + Duration::seconds(i64::try_from(ttl).unwrap_or(0));
    for (i, (it, d)) in held.items.iter().zip(&decided).enumerate() {
        let Some((key, _)) = &d.pool else {
            return Err(ApiError::Invalid("invalid_feature", format!("{:?} has no pool to hold from", it.event.feature)));
        };
        let amount = i64::try_from(d.need).map_err(|_| ApiError::Invalid("invalid_amount", "amount is too large to hold".into()))?;
        let item_index = items.then(|| i16::try_from(i).unwrap_or(i16::MAX));
        let row = NewHold { id: it.event.id, use_id: it.event.use_id, item_index, feature: &it.event.feature, amount: it.event.amount };
        insert(&tx, user.user_id, &row, key, amount, (now, expires_at), &d.decision, p.actor()).await?;
        pools::add_held(&tx, user.user_id, key, amount).await?;
    }
    tx.commit().await?;
    ::metrics::counter!("tally_holds_created_total").increment(1);
    let rows: Vec<(String, i64)> = held.items.iter().map(|it| (it.event.feature.clone(), it.event.amount)).collect();
    Ok((StatusCode::CREATED, Json(answer(id, &rows, expires_at, items, decided.into_iter().map(|d| d.decision).collect())?)))
}

/// One row of a new hold (a hold of one feature, or one item of a hold of several).
struct NewHold<'a> {
    id: Uuid,
    use_id: Option<Uuid>,
    item_index: Option<i16>,
    feature: &'a str,
    amount: i64,
}

/// Inserts the hold row `h`, keeping `held` of `key`'s pool from `at.0` until `at.1`.
#[allow(clippy::too_many_arguments)]
async fn insert(
    tx: &impl GenericClient,
    user_id: Uuid,
    h: &NewHold<'_>,
    key: &PoolKey,
    held: i64,
    at: (DateTime<Utc>, DateTime<Utc>),
    granted: &Decision,
    by: Actor<'_>,
) -> ApiResult<()> {
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO holds (user_id, id, feature, amount, pool_feature, period, period_start, period_end, held, created_at, expires_at, granted, \
               recorded_by, use_id, item_index) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .await?,
        &[
            &user_id,
            &h.id,
            &h.feature,
            &h.amount,
            &key.feature,
            &key.period,
            &key.period_start,
            &key.period_end,
            &held,
            &at.0,
            &at.1,
            &serde_json::to_value(granted)?,
            &by.recorded_by().as_str(),
            &h.use_id,
            &h.item_index,
        ],
    )
    .await?;
    Ok(())
}

/// A stored hold row (a hold of one feature, or one item of a hold of several).
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
    /// The hold's id, for an item of a hold of several items.
    use_id: Option<Uuid>,
}

/// The (user's) hold `id`, locked: its one row, or the rows of its items in order.
async fn find(tx: &impl GenericClient, user_id: Uuid, id: Uuid) -> ApiResult<Vec<Stored>> {
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT id, feature, amount, pool_feature, period, period_start, period_end, held, expires_at, state, answer, granted, \
                   recorded_by, use_id FROM holds WHERE user_id = $1 AND (id = $2 OR use_id = $2) ORDER BY item_index NULLS FIRST FOR UPDATE",
            )
            .await?,
            &[&user_id, &id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Stored {
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
            use_id: r.get(13),
        })
        .collect())
}

/// Whether `id` is a recorded event's, or a recorded use's of several items.
async fn event_exists(tx: &impl GenericClient, user_id: Uuid, id: Uuid) -> ApiResult<bool> {
    Ok(tx
        .query_opt(
            &tx.prepare_cached("SELECT 1 FROM events WHERE user_id = $1 AND (id = $2 OR use_id = $2) LIMIT 1").await?,
            &[&user_id, &id],
        )
        .await?
        .is_some())
}

fn unknown_hold(id: &str) -> ApiError {
    ApiError::Unknown("unknown_hold", format!("no hold {id:?}"))
}

/// The rows of the user's hold `id` (locked) when `by` may commit or release it: 404
/// `unknown_hold` without one, 403 `void_not_allowed` when `by` has less authority than its
/// maker.
async fn find_for(tx: &impl GenericClient, user_id: Uuid, id: &str, by: Actor<'_>) -> ApiResult<Vec<Stored>> {
    let rows = find(tx, user_id, tally_core::ledger::event_id_for_key(id)).await?;
    if rows.is_empty() {
        return Err(unknown_hold(id));
    }
    if let Some(h) = rows.iter().find(|h| !by.may_undo(h.recorded_by, None)) {
        return Err(authority::not_allowed(&format!("hold {id:?}"), h.recorded_by));
    }
    Ok(rows)
}

/// Ends an open hold row in `state` (`committed`, `released` or `expired`), giving its room back.
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

/// The use a commit of the hold `rows` records: one event per held row with the real amount
/// (default: the held amount; a budget item with a model and no amount, its priced cost). A hold
/// of several items takes `items` naming exactly its features (in any order), or none.
fn commit_use(body: &Value, hold_id: Uuid, rows: &[Stored], now: DateTime<Utc>) -> ApiResult<Use> {
    let held: Vec<&str> = rows.iter().map(|h| h.feature.as_str()).collect();
    let items = body.get("items").filter(|v| !v.is_null());
    let mut u = match (rows.first().and_then(|h| h.use_id), items) {
        (None, Some(_)) => return Err(ApiError::Invalid("invalid_items", "this hold is of one feature: commit it without items".into())),
        (None, None) => {
            let mut sent = body.clone();
            if let Some(o) = sent.as_object_mut() {
                o.insert("feature".into(), Value::String(held.first().copied().unwrap_or_default().into()));
            }
            Use::parse(&sent, hold_id, Some(1), now)?
        }
        (Some(_), items) => {
            if let Some(f) =
                ["amount", "model", "input_tokens", "output_tokens"].into_iter().find(|f| body.get(*f).is_some_and(|v| !v.is_null()))
            {
                return Err(ApiError::Invalid("invalid_body", format!("{f} belongs to an item of this hold: send it in items")));
            }
            let items = items.cloned().unwrap_or_else(|| Value::from(held.iter().map(|f| json!({"feature": f})).collect::<Vec<_>>()));
            let metadata = body.get("metadata").cloned().unwrap_or(Value::Null);
            let mut u = Use::parse(&json!({"items": items, "metadata": metadata}), hold_id, Some(1), now)?;
            let mut sent: Vec<&str> = u.items.iter().map(|it| it.event.feature.as_str()).collect();
            let mut want = held.clone();
            sent.sort_unstable();
            want.sort_unstable();
            if sent != want {
                return Err(ApiError::Invalid("invalid_items", format!("items must name exactly the held features {held:?}")));
            }
            u.items.sort_by_key(|it| held.iter().position(|f| *f == it.event.feature));
            u
        }
    };
    for (it, h) in u.items.iter_mut().zip(rows) {
        if !it.amount_sent {
            it.event.amount = h.amount;
        }
    }
    Ok(u)
}

/// `POST /v1/holds/{id}/commit {amount?, model?, input_tokens?, output_tokens?, metadata?,
/// subject?, user_id?}` (a hold of several items: `items: [{feature, amount?, model?,
/// input_tokens?, output_tokens?}]` naming exactly the held features, or none): records one
/// event per held item with the real amount, always (default: for a budget with a `model`, its
/// priced cost in micros; else the held amount); 200 `{id, duplicate, decision}` (and
/// `decisions`). A second commit answers the first; a released hold is 409 `hold_released`.
#[utoipa::path(
    operation_id = "holds_commit",
    post,
    path = "/v1/holds/{id}/commit",
    tag = "usage",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The hold id")),
    request_body = Object,
    responses((status = 200, description = "Recorded", body = crate::uses::ConsumeResponse)),
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
    let hold_id = tally_core::ledger::event_id_for_key(&id);
    let user = target(&state, &p, subject, user_id).await?;
    let by = p.actor();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = pools::now_locked(&state);
    let rows = find_for(&tx, user.user_id, &id, by).await?;
    let items = rows.iter().any(|h| h.use_id.is_some());
    if rows.iter().any(|h| h.state == "committed") {
        let decisions: Option<Vec<Decision>> =
            rows.iter().map(|h| h.answer.clone().and_then(|a| serde_json::from_value::<Decision>(a).ok())).collect();
        let decisions = decisions.ok_or_else(|| ApiError::internal("a committed hold without its answer"))?;
        tx.commit().await?;
        let decision = decisions.first().cloned().ok_or_else(|| ApiError::internal("a hold without items"))?;
        return Ok(Json(ConsumeResponse { id: hold_id, duplicate: true, decision, decisions: items.then_some(decisions) }));
    }
    if rows.iter().any(|h| h.state == "released") {
        return Err(ApiError::Conflict("hold_released", format!("hold {id:?} was released; nothing to commit")));
    }
    let mut done = commit_use(&body, hold_id, &rows, now)?;
    let loaded = entitlements::load(&state, &tx, &user, now).await?;
    let ctx = Ctx::new(&user, &loaded, now);
    ledger::ensure_counters(&tx, &ctx).await?;
    done.prepare(&loaded, now)?;
    if let Some(it) = done.items.iter().find(|it| it.priced == Priced::UnknownModel) {
        let m = it.event.model.as_deref().unwrap_or_default();
        return Err(ApiError::Invalid("unknown_model", format!("the catalog has no price for the model {m:?}")));
    }
    let expired = rows.iter().any(|h| h.state == "expired" || h.expires_at <= now);
    // Give the held room back first: the events take their real amounts from the pools.
    for h in &rows {
        close(&tx, user.user_id, h, "committing", None).await?;
    }
    let cause = if expired { "hold_expired" } else { "cost_over_estimate" };
    let out = done.record(&tx, &ctx, &loaded.ents.features, by, "hold", Some(cause)).await?;
    let decisions: Vec<Decision> =
        rows.iter().map(|h| after_decision(&loaded, &h.feature, &out.totals, &loaded.ents.access_reason)).collect();
    let answers: Vec<(Uuid, &Decision)> = rows.iter().map(|h| h.id).zip(&decisions).collect();
    uses::store_answers(&tx, user.user_id, &answers).await?;
    for (h, d) in rows.iter().zip(&decisions) {
        tx.execute(
            &tx.prepare_cached("UPDATE holds SET state = 'committed', answer = $3 WHERE user_id = $1 AND id = $2").await?,
            &[&user.user_id, &h.id, &serde_json::to_value(d)?],
        )
        .await?;
    }
    tx.commit().await?;
    ::metrics::counter!("tally_holds_committed_total").increment(1);
    let decision = decisions.first().cloned().ok_or_else(|| ApiError::internal("a hold without items"))?;
    Ok(Json(ConsumeResponse { id: hold_id, duplicate: false, decision, decisions: items.then_some(decisions) }))
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
    let rows = find_for(&tx, user.user_id, &id, p.actor()).await?;
    if rows.iter().any(|h| h.state == "committed") {
        return Err(ApiError::Conflict("hold_committed", format!("hold {id:?} was committed; void its event instead")));
    }
    for h in rows.iter().filter(|h| h.state == "open") {
        close(&tx, user.user_id, h, "released", None).await?;
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
        for h in find(&tx, user_id, id).await?.iter().filter(|h| h.id == id && h.state == "open" && h.expires_at <= now) {
            close(&tx, user_id, h, "expired", None).await?;
            n += 1;
        }
        tx.commit().await?;
    }
    Ok(n)
}
