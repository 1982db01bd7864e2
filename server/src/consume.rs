//! `POST /v1/consume`: a backend's atomic check-and-record. The user row and the pool rows are
//! locked, the use (one feature, or several `items`: [`crate::uses`]) is decided against the
//! pools' free room with the one rule evaluator, and an allowed use is recorded in the same
//! transaction — or nothing is recorded. A replay of an allowed id answers the first answer
//! again (`duplicate: true`).

use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::ledger::{self, Ctx};
use crate::pools;
use crate::usage::{opt_str, target};
use crate::uses::{self, ConsumeResponse, Use};
use crate::{AppState, entitlements, users};
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::Value;
use uuid::Uuid;

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

/// `POST /v1/consume {feature, amount, id?, model?, input_tokens?, output_tokens?, metadata?,
/// subject?, user_id?}` (or `items: [{feature, amount?, model?, input_tokens?, output_tokens?}]`
/// instead of `feature`): 200 `{id, duplicate, decision}` (and `decisions`, one per item) when
/// every item is allowed (all recorded), else the first denial (402, 403, 422, 429) with its
/// decision, nothing recorded.
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
    let id = request_id(&body, &headers)?.unwrap_or_else(Uuid::now_v7);
    let one_use = Use::parse(&body, id, Some(1), state.now())?;
    let items = one_use.items.len() as u64;
    let user = target(&state, &p, subject, user_id).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = pools::now_locked(&state);
    let loaded = entitlements::load(&state, &tx, &user, now).await?;
    let ctx = Ctx::new(&user, &loaded, now);
    ledger::ensure_counters(&tx, &ctx).await?;
    match uses::consume(&tx, &ctx, &loaded, one_use, p.actor()).await {
        Ok(answer) => {
            tx.commit().await?;
            if !answer.duplicate {
                ::metrics::counter!("tally_events_ingested_total").increment(items);
            }
            Ok(Json(answer))
        }
        Err((denied, keep)) => {
            if keep {
                tx.commit().await?;
            }
            Err(denied)
        }
    }
}
