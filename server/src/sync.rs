//! `POST /v1/sync`: one request inserts a batch of ledger events, merges settings and profile
//! edits, and answers acks by id, totals, settings changes since the cursor, and a fresh
//! entitlements token — all read and written in one Postgres transaction.

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::extract::{body_bytes, from_value, parse_json};
use crate::ledger::{self, Ctx};
use crate::users::{self, User};
use crate::{AppState, entitlements, settings};
use axum::Json;
use axum::extract::{FromRequest, Request, State};
use serde::Deserialize;
use serde_json::Value;
use tally_core::contract;
use tally_core::wire::{ProfilePatch, SettingChange, SyncResponse};

/// The request as parsed by the server: `events` stay raw JSON so one bad event is rejected on
/// its own while the rest of the batch is accepted. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct RawSyncRequest {
    /// Protocol version.
    pub protocol: u32,
    /// The sending device.
    pub device_id: String,
    /// The subject the device syncs for (absent from older clients).
    #[serde(default)]
    pub external_id: Option<String>,
    /// Settings cursor of the previous response.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Events, validated one by one.
    #[serde(default)]
    pub events: Vec<Value>,
    /// Settings changes.
    #[serde(default)]
    pub settings_changes: Vec<SettingChange>,
    /// Profile edits.
    #[serde(default)]
    pub profile: Option<ProfilePatch>,
    /// Sign a new entitlements token even when the cached one is current ("restore purchases").
    #[serde(default)]
    pub force_entitlements: bool,
}

/// Extracts a [`RawSyncRequest`], enforcing the body and batch limits (413) and the minimum
/// protocol (426).
pub struct SyncBody(pub RawSyncRequest);

impl FromRequest<AppState> for SyncBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        let v: Value = parse_json(&bytes)?;
        if let Some(p) = v.get("protocol").and_then(Value::as_u64)
            && p < u64::from(state.config.min_protocol)
        {
            return Err(ApiError::UpgradeRequired(format!(
                "protocol {p} is no longer supported; the minimum is {}",
                state.config.min_protocol
            )));
        }
        if let Some(n) = v.get("events").and_then(Value::as_array).map(Vec::len)
            && n > state.config.max_batch_events as usize
        {
            return Err(ApiError::TooLarge(format!("{n} events in one request; the maximum is {}", state.config.max_batch_events)));
        }
        let req: RawSyncRequest = from_value(v)?;
        contract::device_id(&req.device_id)?;
        Ok(SyncBody(req))
    }
}

/// `POST /v1/sync`.
pub async fn sync(State(state): State<AppState>, AuthUser(user): AuthUser, SyncBody(req): SyncBody) -> ApiResult<Json<SyncResponse>> {
    // Every use lands in the right account: credentials of another subject record nothing.
    if let Some(sent) = &req.external_id
        && user.external_id.as_deref() != Some(sent.as_str())
    {
        return Err(ApiError::Conflict(
            "subject_mismatch",
            "the credentials are for another account than the device's signed-in user; nothing was recorded".into(),
        ));
    }
    let mut rejected = Vec::new();
    let mut events = Vec::with_capacity(req.events.len());
    for v in &req.events {
        match ledger::validate(v, None) {
            Ok(e) => events.push(e),
            Err(invalid) => rejected.push(invalid.rejected()),
        }
    }
    let resp = run(&state, user, req, events, rejected).await?;
    metrics::counter!("tally_events_ingested_total").increment(resp.accepted.len() as u64);
    metrics::counter!("tally_events_duplicate_total").increment(resp.duplicates.len() as u64);
    metrics::counter!("tally_events_rejected_total").increment(resp.rejected.len() as u64);
    Ok(Json(resp))
}

async fn run(
    state: &AppState,
    user: User,
    req: RawSyncRequest,
    events: Vec<ledger::NewEvent>,
    mut rejected: Vec<tally_core::wire::Rejected>,
) -> ApiResult<SyncResponse> {
    let now = state.now();
    let (profile, profile_rejected) = match &req.profile {
        Some(p) => {
            let (ok, refused) = users::split_profile(p);
            (Some(ok), refused)
        }
        None => (None, Vec::new()),
    };
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let mut user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    if let Some(p) = &profile {
        users::apply_profile(&tx, &mut user, p).await?;
    }
    let loaded = entitlements::load(state, &tx, &user, now).await?;
    let ctx = Ctx::new(&user, &loaded, now);
    ledger::ensure_counters(&tx, &ctx).await?;
    let out = ledger::ingest(&tx, &ctx, &loaded.ents.features, events, Some(&req.device_id), "sync", None).await?;
    let settings_rejected = settings::merge(&tx, user.user_id, &req.settings_changes, now).await?;
    let (settings_changes, cursor) = settings::changes_since(&tx, user.user_id, settings::parse_cursor(req.cursor.as_deref())).await?;
    let mut ents = loaded.ents;
    crate::credits::after_ingest(&tx, user.user_id, &mut ents, &loaded.catalog, &out.touched, (user.created_at, loaded.anchor), now)
        .await?;
    tx.commit().await?;
    let token = entitlements::token_fresh(state, &user, &ents, now, req.force_entitlements)?;
    rejected.extend(out.rejected);
    Ok(SyncResponse {
        accepted: out.accepted,
        duplicates: out.duplicates,
        rejected,
        totals: out.totals,
        entitlements_token: Some(token),
        settings_changes,
        settings_rejected,
        profile_rejected,
        unknown_features: out.unknown_features,
        cursor: Some(cursor),
        limits: state.limits(),
        recall: Vec::new(),
    })
}
