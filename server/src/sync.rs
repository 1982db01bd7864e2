//! `POST /v1/sync`: one request inserts a batch of ledger events, merges settings and profile
//! edits, and answers acks by id, totals, settings changes since the cursor, and a fresh
//! entitlements token — all read and written in one Postgres transaction.

use crate::auth::AuthUser;
use crate::authority::{self, Actor};
use crate::error::{ApiError, ApiResult};
use crate::extract::{body_bytes, from_value, parse_json};
use crate::ledger::{self, Cause, Ctx, Voided};
use crate::users::{self, User};
use crate::{AppState, entitlements, leases, settings};
use axum::Json;
use axum::extract::{FromRequest, Request, State};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use tally_core::contract;
use tally_core::wire::{LeaseAmount, PROTOCOL_LEASES, ProfilePatch, Rejected, SettingChange, SyncResponse};
use uuid::Uuid;

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
    /// Protocol 2: pools the device asks units of.
    #[serde(default)]
    pub want: Vec<LeaseAmount>,
    /// Protocol 2: units given back, cumulative per window.
    #[serde(default)]
    pub release: Vec<LeaseAmount>,
    /// Protocol 2: the `lease_ver` of the device token the device holds.
    #[serde(default)]
    pub lease_ver: Option<u64>,
    /// Protocol 2: the device is signing out.
    #[serde(default, rename = "final")]
    pub final_sync: bool,
}

/// A void event of a protocol-2 batch: cancels the user's event `voids`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidEvent {
    /// The void event's own id (acknowledged like any event's).
    pub id: Uuid,
    /// The event it cancels.
    pub voids: Uuid,
    /// When the device voided it.
    pub occurred_at: DateTime<Utc>,
}

/// Reads a void event (`{id, voids, occurred_at, device_seq?, metadata?}`, no feature or
/// amount); `None` when `v` is not one (no `voids`); a rejection `invalid_event` when malformed.
fn void_event(v: &Value) -> Option<Result<VoidEvent, Rejected>> {
    let o = v.as_object()?;
    let target = o.get("voids").filter(|t| !t.is_null())?;
    let id_sent = o.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
    let bad = || Rejected { id: id_sent.clone(), reason: "invalid_event".into() };
    let Some(id) = o.get("id").and_then(Value::as_str).and_then(|s| Uuid::parse_str(s).ok()).filter(|u| !u.is_nil()) else {
        return Some(Err(Rejected { id: id_sent.clone(), reason: "invalid_id".into() }));
    };
    let voids = target.as_str().and_then(|s| Uuid::parse_str(s).ok());
    let at = o.get("occurred_at").and_then(Value::as_str).and_then(|s| DateTime::parse_from_rfc3339(s).ok());
    let extra = o.get("feature").is_some_and(|f| !f.is_null()) || o.get("amount").is_some_and(|a| !a.is_null() && a != 0);
    match (voids, at, extra) {
        (Some(voids), Some(at), false) => Some(Ok(VoidEvent { id, voids, occurred_at: at.with_timezone(&Utc) })),
        _ => Some(Err(bad())),
    }
}

/// Extracts a [`RawSyncRequest`], enforcing the body and batch limits (413) and the minimum
/// protocol (426).
pub struct SyncBody(pub RawSyncRequest);

impl FromRequest<AppState> for SyncBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        parse_body(&bytes, state.config.min_protocol, state.config.max_batch_events).map(SyncBody)
    }
}

/// Parses a sync body: malformed JSON is 400, a protocol below `min_protocol` 426, more than
/// `max_batch_events` events 413, a wrong shape 422, a bad `device_id` its contract error.
pub fn parse_body(bytes: &[u8], min_protocol: u32, max_batch_events: u32) -> Result<RawSyncRequest, ApiError> {
    let v: Value = parse_json(bytes)?;
    if let Some(p) = v.get("protocol").and_then(Value::as_u64)
        && p < u64::from(min_protocol)
    {
        return Err(ApiError::UpgradeRequired(format!("protocol {p} is no longer supported; the minimum is {min_protocol}")));
    }
    if let Some(n) = v.get("events").and_then(Value::as_array).map(Vec::len)
        && n > max_batch_events as usize
    {
        return Err(ApiError::TooLarge(format!("{n} events in one request; the maximum is {max_batch_events}")));
    }
    let req: RawSyncRequest = from_value(v)?;
    contract::device_id(&req.device_id)?;
    Ok(req)
}

/// The events of a batch, each read and validated on its own.
#[derive(Debug, Default)]
pub struct SortedEvents {
    /// Valid usage events.
    pub events: Vec<ledger::NewEvent>,
    /// Valid void events (protocol 2).
    pub voids: Vec<VoidEvent>,
    /// Every event refused, with its reason.
    pub rejected: Vec<Rejected>,
}

/// Validates each event of `req`: void events (protocol 2 only; a protocol-1 batch refuses
/// them as any malformed event), usage events, and the rejections of the rest.
pub fn sort_events(req: &RawSyncRequest) -> SortedEvents {
    let mut out = SortedEvents::default();
    let leases = req.protocol >= PROTOCOL_LEASES;
    for v in &req.events {
        if leases && let Some(void) = void_event(v) {
            match void {
                Ok(vd) => out.voids.push(vd),
                Err(r) => out.rejected.push(r),
            }
            continue;
        }
        match ledger::validate(v, None) {
            Ok(e) => out.events.push(e),
            Err(invalid) => out.rejected.push(invalid.rejected()),
        }
    }
    out
}

/// `POST /v1/sync`.
#[utoipa::path(
    operation_id = "sync_sync",
    post,
    path = "/v1/sync",
    tag = "sync",
    security(("bearer" = [])),
    request_body = tally_core::wire::SyncRequest,
    responses(
        (status = 200, description = "Acknowledgements, totals, token, settings", body = tally_core::wire::SyncResponse),
    ),
)]
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
    let SortedEvents { events, voids, rejected } = sort_events(&req);
    let resp = run(&state, user, req, events, voids, rejected).await?;
    metrics::counter!("tally_events_ingested_total").increment(resp.accepted.len() as u64);
    metrics::counter!("tally_events_duplicate_total").increment(resp.duplicates.len() as u64);
    metrics::counter!("tally_events_rejected_total").increment(resp.rejected.len() as u64);
    Ok(Json(resp))
}

async fn run(
    state: &AppState,
    user: User,
    req: RawSyncRequest,
    mut events: Vec<ledger::NewEvent>,
    voids: Vec<VoidEvent>,
    mut rejected: Vec<Rejected>,
) -> ApiResult<SyncResponse> {
    let now = state.now();
    let leased = req.protocol >= PROTOCOL_LEASES;
    let (mut profile, mut profile_rejected) = match &req.profile {
        Some(p) => {
            let (ok, refused) = users::split_profile(p);
            (Some(ok), refused)
        }
        None => (None, Vec::new()),
    };
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let mut user = users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let loaded = entitlements::load(state, &tx, &user, now).await?;
    {
        let ctx = Ctx::new(&user, &loaded, now);
        if leased {
            // Bad want/release entries refuse the whole request before anything changes.
            leases::check_amounts(&ctx, "want", &req.want)?;
            leases::check_amounts(&ctx, "release", &req.release)?;
        }
    }
    // A timezone change too soon after the previous is refused alone; the sync goes on.
    if let Some(p) = profile.as_mut()
        && let Some(tz) = &p.timezone
        && let Err(e) = crate::timezones::check_interval(&tx, &user, tz, now).await
    {
        let ApiError::TooSoon(code, ..) = e else { return Err(e) };
        profile_rejected.push(tally_core::wire::ProfileRejected { field: "timezone".into(), reason: code.into() });
        p.timezone = None;
    }
    if let Some(p) = &profile {
        users::apply_profile(&tx, &state.user_cache, &mut user, p, now).await?;
    }
    let loaded =
        if profile.as_ref().is_some_and(|p| p.timezone.is_some()) { entitlements::load(state, &tx, &user, now).await? } else { loaded };
    let ctx = Ctx::new(&user, &loaded, now);
    ledger::ensure_counters(&tx, &ctx).await?;
    let dev = leases::register(&tx, user.user_id, &req.device_id, req.protocol, now).await?;
    if leased && let Some(v) = req.lease_ver {
        leases::acknowledge(&tx, user.user_id, &dev, v).await?;
    }
    let seqs: Vec<(Uuid, i64)> = events.iter().filter_map(|e| e.device_seq.map(|s| (e.id, s))).collect();
    let cloned = leases::detect_clone(&tx, user.user_id, &dev, &seqs).await?;
    // Where each use counts and why it may be over its limit.
    let features = &loaded.ents.features;
    let mut counted = std::collections::BTreeSet::new();
    // Uses decided under a live slice of this device (the others have their own cause).
    let mut in_slice = std::collections::BTreeSet::new();
    // Each pool a batch touches is reserved once, not once per event.
    let mut materialized: Vec<crate::pools::PoolKey> = Vec::new();
    for e in &mut events {
        if !leased {
            e.cause = Some(Cause::Recorded(ledger::CAUSE_PROTOCOL1));
            continue;
        }
        let Some(until) = dev.lease_until.filter(|_| e.lease_ver.is_some()) else {
            e.cause = Some(Cause::Recorded(ledger::CAUSE_BEFORE_LEASE));
            continue;
        };
        let (start, end) = match features.get(&e.feature).and_then(tally_core::Rule::period) {
            Some(p) => {
                let w = tally_core::period::window(p, e.occurred_at, &ctx.zones, ctx.anchor);
                (w.start, w.end)
            }
            None => (e.occurred_at, None),
        };
        let in_lease = start < until;
        // The lease ended before its window did, so the slice may have gone to others within
        // it. A window that ended first kept its slice whole: a use in it arriving late is
        // still a use within its lease.
        let slice_reclaimed = until <= now && end.is_none_or(|end| until < end);
        e.unclamped = in_lease;
        if in_lease {
            counted.insert(e.id);
        }
        e.cause = Some(if dev.removed_at.is_some() || slice_reclaimed || !in_lease {
            Cause::Recorded(ledger::CAUSE_RECLAIMED)
        } else {
            in_slice.insert(e.id);
            Cause::Slice { cloned }
        });
        if in_lease
            && let Some(rule) = features.get(&e.feature)
            && let Some(key) = leased_key(&ctx, &e.feature, rule, e.occurred_at)
            && !materialized.contains(&key)
        {
            leases::materialize(&tx, user.user_id, &key).await?;
            materialized.push(key);
        }
    }
    let device = Actor::Device(&req.device_id);
    let mut out = ledger::ingest(&tx, &ctx, features, events, device, "sync", None).await?;
    // The uses of this request (not its voids): they claim their pools.
    let used = out.touched.clone();
    let counted: Vec<Uuid> = out.accepted.iter().filter(|id| counted.contains(*id)).copied().collect();
    let mut credit_overrun = Vec::new();
    if !counted.is_empty() {
        let rows = tx
            .query(
                &tx.prepare_cached(
                    // Inserted with lease_counted set: read back what they count, no second write.
                    "SELECT feature, amount, cost_micros, effective_at, id, credits FROM events WHERE user_id = $1 AND id = ANY($2) \
                     ORDER BY device_seq, id",
                )
                .await?,
                &[&user.user_id, &counted],
            )
            .await?;
        let uses: Vec<(String, chrono::DateTime<chrono::Utc>, i64, i64)> =
            rows.iter().map(|r| (r.get(0), r.get(3), r.get(1), r.get(2))).collect();
        let credits: Vec<(Uuid, Option<i64>)> =
            rows.iter().filter(|r| in_slice.contains(&r.get::<_, Uuid>(4))).map(|r| (r.get(4), r.get(5))).collect();
        // Read before they are counted: what the slice had left for them.
        credit_overrun = crate::credits::past_allowance(&tx, user.user_id, &req.device_id, &credits).await?;
        leases::count_consumed_many(&tx, &ctx, &req.device_id, &uses).await?;
    }
    // Voids apply after the batch's inserts (an event and its void may come together).
    for v in &voids {
        let stored = tx
            .query_opt(&tx.prepare_cached("SELECT target FROM void_events WHERE user_id = $1 AND id = $2").await?, &[&user.user_id, &v.id])
            .await?;
        match stored.map(|r| r.get::<_, Uuid>(0)) {
            Some(t) if t == v.voids => out.duplicates.push(v.id),
            Some(_) => rejected.push(Rejected { id: v.id.to_string(), reason: "conflict".into() }),
            None => {
                // The id of a use of several items voids every item (each the device's own).
                match ledger::void(&tx, &ctx, v.voids, device, Some("voided by the device")).await? {
                    (Voided::NotAllowed(_), _) => {
                        rejected.push(Rejected { id: v.id.to_string(), reason: authority::VOID_NOT_ALLOWED.into() });
                    }
                    (Voided::Now | Voided::Before, features) => {
                        tx.execute(
                            &tx.prepare_cached(
                                "INSERT INTO void_events (user_id, id, target, device_id, occurred_at, received_at) VALUES ($1, $2, $3, $4, $5, $6)",
                            )
                            .await?,
                            &[&user.user_id, &v.id, &v.voids, &req.device_id, &v.occurred_at, &now],
                        )
                        .await?;
                        out.accepted.push(v.id);
                        out.touched.extend(features.into_iter().map(|f| (f, now)));
                    }
                    (Voided::Unknown, _) => rejected.push(Rejected { id: v.id.to_string(), reason: "unknown_event".into() }),
                }
            }
        }
    }
    if !voids.is_empty() {
        // Totals after the voids.
        ledger::refresh_totals(&tx, &ctx, features, &mut out.totals).await?;
    }
    let settings_rejected = settings::merge(&tx, user.user_id, &req.settings_changes, now).await?;
    let (settings_changes, cursor) = settings::changes_since(&tx, user.user_id, settings::parse_cursor(req.cursor.as_deref())).await?;
    let mut ents = loaded.ents.clone();
    crate::credits::after_ingest(&tx, user.user_id, &mut ents, &loaded.catalog, &out.touched, (user.created_at, loaded.anchor), now)
        .await?;
    if ents.credit_balance < 0 && !credit_overrun.is_empty() {
        // In debt, and this device spent past its slice of the balance: those uses are a cause.
        let cause = if cloned { ledger::CAUSE_CLONED_DEVICE } else { ledger::CAUSE_DEVICE_OVERRUN };
        crate::credits::mark_overrun(&tx, user.user_id, &credit_overrun, cause).await?;
    }
    if leased && let Some(t) = crate::credits::pool_total(&tx, user.user_id, &ents, now).await? {
        out.totals.push(t);
    }
    let mut recall = Vec::new();
    let token = if leased {
        let released = leases::release(&tx, user.user_id, &req.device_id, &req.release).await?;
        if !dev.active(now) {
            // Its earlier lease ended (or it was removed): what it had not used went back.
            leases::reclaim(&tx, user.user_id, &req.device_id).await?;
        }
        if req.final_sync {
            leases::remove(&tx, user.user_id, &req.device_id, now).await?;
            entitlements::token_fresh(state, &user, &ents, now, req.force_entitlements)?
        } else {
            let asks = DeviceAsks {
                lease: leases::GrantAsks { want: &req.want, released: &released, used: &used },
                force: req.force_entitlements,
            };
            let token = device_token(state, &tx, (&user, &loaded, &ents), &dev, asks, now).await?;
            recall = leases::recalls(&tx, user.user_id, &req.device_id).await?;
            token
        }
    } else {
        entitlements::token_fresh(state, &user, &ents, now, req.force_entitlements)?
    };
    tx.commit().await?;
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
        recall,
    })
}

/// What a device asks in one request: its leases, and whether to sign a new token.
pub struct DeviceAsks<'a> {
    /// Its wants, releases and uses.
    pub lease: leases::GrantAsks<'a>,
    /// Sign a new token even when the cached one would do.
    pub force: bool,
}

/// The device token (protocol 2) answered to `dev` of `user` with entitlements `ents`: its
/// leases granted and topped up, issued, and its `lease_until` stored — what `/v1/sync` and
/// the purchase routes answer.
pub async fn device_token(
    state: &AppState,
    tx: &impl deadpool_postgres::GenericClient,
    (user, loaded, ents): (&User, &entitlements::Loaded, &tally_core::Entitlements),
    dev: &leases::Device,
    asks: DeviceAsks<'_>,
    now: DateTime<Utc>,
) -> ApiResult<String> {
    let ctx = Ctx::new(user, loaded, now);
    let list = leases::grant(tx, &ctx, ents, &dev.device_id, &asks.lease).await?;
    let pools = leases::current_pools(&ctx, ents);
    let lease_ver = leases::issue(tx, user.user_id, dev, &list, &pools).await?;
    let dl = entitlements::DeviceLeases { device_id: dev.device_id.clone(), lease_ver, leases: list };
    let (token, until) = entitlements::device_token(state, user, ents, now, asks.force, dl)?;
    leases::set_lease_until(tx, user.user_id, &dev.device_id, until).await?;
    Ok(token)
}

/// The hard pool a leased use of `feature` occurring at `at` counts in.
fn leased_key(ctx: &Ctx<'_>, feature: &str, rule: &tally_core::Rule, at: DateTime<Utc>) -> Option<crate::pools::PoolKey> {
    if !crate::pools::is_hard(rule) {
        return None;
    }
    let p = rule.period()?;
    let w = tally_core::period::window(p, at, &ctx.zones, ctx.anchor);
    Some(crate::pools::PoolKey { feature: feature.into(), period: p.as_str().into(), period_start: w.start, period_end: w.end })
}
