//! `POST /v1/consume`: a backend's atomic check-and-record. The user row and the pool row are
//! locked, the use is decided against the pool's free room with the one rule evaluator, and an
//! allowed use is recorded in the same transaction — or nothing is recorded. A replay of an
//! allowed id answers the first answer again (`duplicate: true`).

use crate::authority::Actor;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::ledger::{self, Ctx, NewEvent};
use crate::pools;
use crate::usage::{opt_str, target};
use crate::{AppState, entitlements, users};
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::{Map, Value};
use tally_core::Rule;
use tally_core::decision::Decision;
use uuid::Uuid;

/// Answer of an allowed `POST /v1/consume` (and of a hold's commit).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConsumeResponse {
    /// The event id.
    pub id: Uuid,
    /// Whether this answers an earlier request with the same id (nothing recorded now).
    pub duplicate: bool,
    /// The decision.
    pub decision: Decision,
}

/// The id a request names: `id` in the body (a UUID, or any other key, which becomes its
/// UUIDv5), else the `Idempotency-Key` header, else `None`.
pub fn request_id(body: &Value, headers: &HeaderMap) -> ApiResult<Option<Uuid>> {
    let key = |k: &str, field: &str| -> ApiResult<Uuid> {
        tally_core::contract::idempotency_key(k).map_err(|v| ApiError::Invalid(v.code, format!("{field}: {}", v.message)))?;
        Ok(tally_core::ledger::event_id_for_key(k))
    };
    match body.get("id") {
        Some(Value::String(s)) => return key(s, "id").map(Some),
        Some(Value::Null) | None => {}
        Some(_) => return Err(ApiError::Invalid("invalid_id", "id must be a string (a UUID or an idempotency key)".into())),
    }
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => {
            let k = v.to_str().map_err(|_| ApiError::invalid("Idempotency-Key must be visible ASCII characters"))?;
            key(k, "Idempotency-Key").map(Some)
        }
    }
}

/// Builds the event of a use from a request body (`feature`, `amount` default 1, `model`,
/// `input_tokens`, `output_tokens`, `metadata`) at `now`, validated with the contract (a 422
/// naming the field).
pub fn use_event(body: &Value, id: Uuid, amount_default: Option<u64>, now: DateTime<Utc>) -> ApiResult<NewEvent> {
    let Some(o) = body.as_object() else { return Err(ApiError::Invalid("invalid_body", "the body must be a JSON object".into())) };
    let mut e = Map::new();
    e.insert("id".into(), Value::String(id.to_string()));
    e.insert("occurred_at".into(), Value::String(now.to_rfc3339()));
    for f in ["feature", "amount", "model", "input_tokens", "output_tokens", "metadata"] {
        if let Some(v) = o.get(f) {
            e.insert(f.into(), v.clone());
        }
    }
    if let (None | Some(Value::Null), Some(a)) = (o.get("amount"), amount_default) {
        e.insert("amount".into(), Value::from(a));
    }
    ledger::validate(&Value::Object(e), None).map_err(|invalid| {
        let v = invalid.violation;
        let message = if v.message.contains(v.field.as_str()) { v.message } else { format!("{}: {}", v.field, v.message) };
        ApiError::Invalid(v.code, message)
    })
}

/// The stored answer of an event id, when it was recorded: `Ok(None)` when unknown; a 409
/// `conflict` when it was recorded with another body (or by a request that stored no answer).
pub async fn replayed(tx: &impl GenericClient, user_id: Uuid, e: &NewEvent) -> ApiResult<Option<ConsumeResponse>> {
    let row = tx
        .query_opt(
            &tx.prepare_cached(
                "SELECT feature, amount, model, input_tokens, output_tokens, metadata, answer FROM events WHERE user_id = $1 AND id = $2",
            )
            .await?,
            &[&user_id, &e.id],
        )
        .await?;
    let Some(r) = row else { return Ok(None) };
    let same = r.get::<_, String>(0) == e.feature
        && r.get::<_, i64>(1) == e.amount
        && r.get::<_, Option<String>>(2) == e.model
        && r.get::<_, Option<i64>>(3) == e.input_tokens
        && r.get::<_, Option<i64>>(4) == e.output_tokens
        && r.get::<_, Option<Value>>(5) == e.metadata;
    let answer: Option<Value> = r.get(6);
    match (same, answer.and_then(|a| serde_json::from_value::<Decision>(a).ok())) {
        (true, Some(decision)) => Ok(Some(ConsumeResponse { id: e.id, duplicate: true, decision })),
        _ => Err(ApiError::Conflict("conflict", format!("event {} was already recorded with a different body", e.id))),
    }
}

/// Records `event` for the (locked) user, recorded by `by`, with `decision` as its stored
/// answer; `over_cause` marks it when it leaves a hard window over its limit. A use that would
/// overflow a counter is a 422 and nothing is recorded.
#[allow(clippy::too_many_arguments)]
pub async fn record(
    tx: &impl GenericClient,
    ctx: &Ctx<'_>,
    features: &std::collections::BTreeMap<String, Rule>,
    event: NewEvent,
    by: Actor<'_>,
    source: &str,
    over_cause: Option<&str>,
    decision: &Decision,
) -> ApiResult<ledger::Outcome> {
    let id = event.id;
    let out = ledger::ingest(tx, ctx, features, vec![event], by, source, over_cause).await?;
    out.refused_alone(id)?;
    let answer = serde_json::to_value(decision)?;
    tx.execute(&tx.prepare_cached("UPDATE events SET answer = $3 WHERE user_id = $1 AND id = $2").await?, &[&ctx.user_id, &id, &answer])
        .await?;
    Ok(out)
}

/// `POST /v1/consume {feature, amount, id?, model?, input_tokens?, output_tokens?, metadata?,
/// subject?, user_id?}`: 200 `{id, duplicate, decision}` when allowed (recorded), else the
/// denial (402, 403, 422, 429) with the decision, nothing recorded.
#[utoipa::path(
    operation_id = "consume_consume",
    post,
    path = "/v1/consume",
    tag = "usage",
    security(("bearer" = []), ("api_key" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Stands in for the body's `id`")),
    request_body = Object,
    responses(
        (status = 200, description = "Allowed and recorded (or a replay)", body = ConsumeResponse),
    ),
)]
pub async fn consume(
    State(state): State<AppState>,
    p: crate::auth::Principal,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<ConsumeResponse>> {
    let subject = opt_str(&body, "subject")?;
    let user_id = opt_str(&body, "user_id")?;
    let now = state.now();
    let id = request_id(&body, &headers)?.unwrap_or_else(Uuid::now_v7);
    let mut event = use_event(&body, id, Some(1), now)?;
    let user = target(&state, &p, subject, user_id).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = pools::now_locked(&state);
    event.occurred_at = now;
    let loaded = entitlements::load(&state, &tx, &user, now).await?;
    let ctx = Ctx::new(&user, &loaded, now);
    ledger::ensure_counters(&tx, &ctx).await?;
    if !ledger::hold_ids(&tx, user.user_id, &[event.id]).await?.is_empty() {
        return Err(ledger::id_taken(event.id));
    }
    if let Some(answer) = replayed(&tx, user.user_id, &event).await? {
        tx.commit().await?;
        return Ok(Json(answer));
    }
    let rule = loaded.ents.features.get(&event.feature);
    let amount = u64::try_from(event.amount).unwrap_or(0);
    let input = event.input_tokens.and_then(|n| u64::try_from(n).ok());
    let output = event.output_tokens.and_then(|n| u64::try_from(n).ok());
    let priced = match rule {
        Some(r) => pools::priced(&loaded.catalog, r, event.model.as_deref(), input, output)?,
        None => tally_core::decision::Priced::NoModel,
    };
    let decided = pools::decide(&tx, &ctx, &loaded, &event.feature, amount, priced, true).await?;
    if !decided.decision.allowed {
        // Nothing recorded. A denial for room devices hold keeps the recalls it set (and the
        // slices it reserved); any other is dropped (rolled back) with the pool rows it made.
        if decided.decision.held_offline.is_some() {
            tx.commit().await?;
        }
        crate::metrics::decision_denied("consume", decided.decision.reason);
        return Err(pools::denial(&event.feature, rule, decided.decision));
    }
    // A budget always records (the tokens were spent); past its limit the overage is its real
    // cost over what was expected.
    let cause = matches!(rule, Some(Rule::Budget { .. })).then_some("cost_over_estimate");
    record(&tx, &ctx, &loaded.ents.features, event, p.actor(), "consume", cause, &decided.decision).await?;
    tx.commit().await?;
    ::metrics::counter!("tally_events_ingested_total").increment(1);
    Ok(Json(ConsumeResponse { id, duplicate: false, decision: decided.decision }))
}
