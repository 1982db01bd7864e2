//! `POST /v1/usage/{id}/void {reason?}`: cancels a recorded use without editing the ledger. The
//! event stays, marked void, and stops counting in its own window; credits it drew return. The id
//! of a use of several items voids every item. Only a caller with the recorder's authority may
//! void it ([`crate::authority`]).

use crate::authority;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::ledger::{self, Ctx, Voided};
use crate::usage::{opt_str, target};
use crate::{AppState, entitlements, users};
use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// Longest `reason` of a void, in bytes.
pub const MAX_REASON_BYTES: usize = 500;

/// Answer of a void.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VoidResponse {
    /// The voided event.
    pub id: Uuid,
    /// Whether it was voided before (nothing changed now).
    pub duplicate: bool,
}

/// `POST /v1/usage/{id}/void {reason?, subject?, user_id?}` (`id`: an event's, or a use's of
/// several items, which voids them all): 200 `{id, duplicate}`; an unknown
/// (or another user's) id is 404 `unknown_event`; an event recorded with more authority than
/// the caller's (a backend's, voided by a user) is 403 `void_not_allowed`.
#[utoipa::path(
    operation_id = "voids_void",
    post,
    path = "/v1/usage/{id}/void",
    tag = "usage",
    security(("bearer" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The event id, or the id of a use of several items (or its idempotency key)")),
    request_body = Object,
    responses((status = 200, description = "Voided (or already voided)", body = VoidResponse)),
)]
pub async fn void(
    State(state): State<AppState>,
    p: crate::auth::Principal,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<VoidResponse>> {
    if !body.is_object() {
        return Err(ApiError::Invalid("invalid_body", "the body must be a JSON object (it may be {})".into()));
    }
    let subject = opt_str(&body, "subject")?;
    let user_id = opt_str(&body, "user_id")?;
    let reason = opt_str(&body, "reason")?;
    if let Some(r) = reason
        && (r.len() > MAX_REASON_BYTES || r.contains('\0'))
    {
        return Err(ApiError::Invalid("invalid_text", format!("reason must be at most {MAX_REASON_BYTES} bytes without U+0000")));
    }
    tally_core::contract::idempotency_key(&id)?;
    let event_id = tally_core::ledger::event_id_for_key(&id);
    let user = target(&state, &p, subject, user_id).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = crate::pools::now_locked(&state);
    let loaded = entitlements::load(&state, &tx, &user, now).await?;
    let ctx = Ctx::new(&user, &loaded, now);
    ledger::ensure_counters(&tx, &ctx).await?;
    let duplicate = match ledger::void(&tx, &ctx, event_id, p.actor(), reason).await?.0 {
        Voided::Now => false,
        Voided::Before => true,
        Voided::Unknown => return Err(ApiError::Unknown("unknown_event", format!("no recorded event {id:?}"))),
        Voided::NotAllowed(by) => return Err(authority::not_allowed(&format!("event {id:?}"), by)),
    };
    tx.commit().await?;
    Ok(Json(VoidResponse { id: event_id, duplicate }))
}
