//! Accounts: `GET|PATCH|DELETE /v1/me` and `GET /v1/me/export`.

use crate::AppState;
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::timezones::Profile;
use crate::users::{User, apply_profile, lock, sub_hash, validate_profile};
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use serde_json::{Value, json};
use tally_core::wire::ProfilePatch;
use uuid::Uuid;

/// `GET /v1/me`: the caller's profile.
#[utoipa::path(
    operation_id = "accounts_get_me",
    get,
    path = "/v1/me",
    tag = "account",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's profile (the first call creates the user); `timezone` is the zone in force, `timezone_pending` a change that takes effect later", body = crate::timezones::Profile),
    ),
)]
pub async fn get_me(State(state): State<AppState>, AuthUser(user): AuthUser) -> ApiResult<Json<Profile>> {
    let now = state.now();
    let zones = crate::timezones::history(&state.pool.get().await?, &user).await?;
    Ok(Json(crate::timezones::profile(user, &zones, now)))
}

/// Body of `PATCH /v1/me`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MePatch {
    /// New display name.
    pub display_name: Option<String>,
    /// New avatar URL.
    pub avatar_url: Option<String>,
    /// New IANA timezone.
    pub timezone: Option<String>,
}

/// `PATCH /v1/me`: display name, avatar, timezone. A timezone change never resets a window in
/// force; it takes effect now, or when the latest lease of the user's devices ends (until then
/// `timezone_pending`); at most one change per 24 h (429 `timezone_change_too_soon`).
#[utoipa::path(
    operation_id = "accounts_patch_me",
    patch,
    path = "/v1/me",
    tag = "account",
    security(("bearer" = [])),
    request_body = MePatch,
    responses(
        (status = 200, description = "The updated profile", body = crate::timezones::Profile),
        (status = 429, description = "`timezone_change_too_soon`: the timezone changed less than 24 h ago (`Retry-After`); nothing changed"),
    ),
)]
pub async fn patch_me(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(body): JsonBody<MePatch>,
) -> ApiResult<Json<Profile>> {
    let patch = ProfilePatch { timezone: body.timezone, display_name: body.display_name, avatar_url: body.avatar_url };
    validate_profile(&patch)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let mut locked = lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    let now = state.now();
    apply_profile(&tx, &state.user_cache, &mut locked, &patch, now).await?;
    let zones = crate::timezones::history(&tx, &locked).await?;
    tx.commit().await?;
    Ok(Json(crate::timezones::profile(locked, &zones, now)))
}

/// `DELETE /v1/me`: removes every row of the account and leaves a tombstone of its subject.
#[utoipa::path(
    operation_id = "accounts_delete_me",
    delete,
    path = "/v1/me",
    tag = "account",
    security(("bearer" = [])),
    responses((status = 204, description = "The account and its data are gone")),
)]
pub async fn delete_me(State(state): State<AppState>, AuthUser(user): AuthUser) -> ApiResult<axum::http::StatusCode> {
    // Stop the Stripe subscription first: a failure there keeps the account (409).
    crate::billing::cancel_before_deletion(&state, &user).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    remove(&state, &tx, &user).await?;
    tx.commit().await?;
    state.tokens.forget(user.user_id);
    state.user_cache.evict_user(user.user_id);
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Removes the account of `user` (locked by the caller) in `tx`: 409 `subscription_active` while
/// a subscription still renews; else the global logs about the user are scrubbed, every row of
/// the account is deleted, `account.deleted` is emitted and the subject gets a tombstone.
/// `DELETE /v1/me` and the deletion of accounts never verified call it.
pub async fn remove(state: &AppState, tx: &impl GenericClient, user: &User) -> ApiResult<()> {
    state.user_cache.evict_user(user.user_id);
    if let Some(s) = crate::billing::subscriptions::renewing_elsewhere(tx, user.user_id, state.now()).await? {
        return Err(ApiError::Conflict(
            "subscription_active",
            format!(
                "a subscription still renews; cancel it {} before deleting the account (this server cannot cancel it)",
                crate::billing::subscriptions::where_to_cancel(s.sub.store)
            ),
        ));
    }
    let paid = tx
        .query_opt(
            "SELECT status FROM subscriptions WHERE user_id = $1 AND status IN ('active', 'trialing', 'past_due') AND provider = 'stripe'",
            &[&user.user_id],
        )
        .await?;
    if paid.is_some() {
        return Err(ApiError::Conflict("subscription_active", "cancel the active subscription before deleting the account".into()));
    }
    // The Stripe event log is a global look-up (keyed by Stripe's ids): its rows about this
    // user — applied to them, of their customers, or naming their email — are kept (so a
    // replayed event is still recognised and not applied again) but scrubbed of every detail.
    let customers: Vec<String> =
        tx.query("SELECT customer_id FROM stripe_customers WHERE user_id = $1", &[&user.user_id]).await?.iter().map(|r| r.get(0)).collect();
    tx.execute(
        "UPDATE stripe_events SET user_id = NULL, customer_id = NULL, outcome = 'scrubbed:account_deleted', \
         payload = jsonb_build_object('id', event_id, 'type', type, 'scrubbed', true) \
         WHERE user_id = $1 OR customer_id = ANY($2) OR ($3::text IS NOT NULL AND strpos(lower(payload::text), lower($3)) > 0)",
        &[&user.user_id, &customers, &user.email],
    )
    .await?;
    tx.execute("DELETE FROM stripe_pending_events WHERE customer_id = ANY($1)", &[&customers]).await?;
    for log in ["apple_notifications", "google_notifications"] {
        tx.execute(&format!("UPDATE {log} SET user_id = NULL, outcome = 'scrubbed:account_deleted' WHERE user_id = $1"), &[&user.user_id])
            .await?;
    }
    delete_rows(tx, user.user_id).await?;
    // Ids only; purged once delivered (or dead-lettered).
    let now = state.now();
    let id = crate::webhooks::outbox::event_id(user.user_id, "account.deleted", &[]);
    crate::webhooks::outbox::emit(tx, user.user_id, "account.deleted", id, json!({"subject": user.external_id}), now).await?;
    if let Some(sub) = &user.external_id {
        tx.execute(
            "INSERT INTO account_tombstones (sub_hash, deleted_at) VALUES ($1, $2) ON CONFLICT (sub_hash) DO UPDATE SET deleted_at = excluded.deleted_at",
            &[&sub_hash(sub), &now],
        )
        .await?;
    }
    Ok(())
}

/// Every table holding rows of one user (keyed by `user_id`), the `users` row last.
fn user_tables() -> impl Iterator<Item = &'static str> {
    crate::billing::USER_TABLES.iter().copied().chain([
        "events",
        "void_events",
        "counters",
        "holds",
        "pool_devices",
        "device_shares",
        "devices",
        "settings",
        "subscriptions",
        "access_grants",
        "secrets",
        "account_tokens",
        "refresh_tokens",
        "refresh_families",
        "password_credentials",
        "login_successes",
        "console_sessions",
        "webhook_attempts",
        "webhook_deliveries",
        "webhook_events",
        "timezone_changes",
        "users",
    ])
}

/// Deletes every row of `user_id` (not the tombstone, not the scrubbed global logs).
pub async fn delete_rows(tx: &impl GenericClient, user_id: Uuid) -> ApiResult<()> {
    for table in user_tables() {
        tx.execute(&format!("DELETE FROM {table} WHERE user_id = $1"), &[&user_id]).await?;
    }
    Ok(())
}

/// `GET /v1/me/export`: all of the caller's data as JSON.
#[utoipa::path(
    operation_id = "accounts_export_me",
    get,
    path = "/v1/me/export",
    tag = "account",
    security(("bearer" = [])),
    responses((status = 200, description = "Every row of the caller's data", body = Object)),
)]
pub async fn export_me(State(state): State<AppState>, AuthUser(user): AuthUser) -> ApiResult<Json<Value>> {
    let client = state.pool.get().await?;
    let uid = user.user_id;
    let events = client
        .query(
            "SELECT id, feature, amount, occurred_at, effective_at, clamped, received_at, device_id, device_seq, model, input_tokens, output_tokens, cost_micros, metadata, source \
             FROM events WHERE user_id = $1 ORDER BY effective_at, id",
            &[&uid],
        )
        .await?
        .iter()
        .map(|r| {
            json!({"id": r.get::<_, Uuid>(0), "feature": r.get::<_, String>(1), "amount": r.get::<_, i64>(2),
                "occurred_at": r.get::<_, DateTime<Utc>>(3), "effective_at": r.get::<_, DateTime<Utc>>(4), "clamped": r.get::<_, bool>(5),
                "received_at": r.get::<_, DateTime<Utc>>(6), "device_id": r.get::<_, Option<String>>(7), "device_seq": r.get::<_, Option<i64>>(8),
                "model": r.get::<_, Option<String>>(9), "input_tokens": r.get::<_, Option<i64>>(10), "output_tokens": r.get::<_, Option<i64>>(11),
                "cost_micros": r.get::<_, i64>(12), "metadata": r.get::<_, Option<Value>>(13), "source": r.get::<_, String>(14)})
        })
        .collect::<Vec<_>>();
    let settings = client
        .query("SELECT key, value, deleted, hlc FROM settings WHERE user_id = $1 ORDER BY key", &[&uid])
        .await?
        .iter()
        .map(|r| json!({"key": r.get::<_, String>(0), "value": r.get::<_, Option<Value>>(1), "deleted": r.get::<_, bool>(2), "hlc": r.get::<_, String>(3)}))
        .collect::<Vec<_>>();
    let grants = client
        .query("SELECT plan, until, granted_by, reason, created_at, revoked_at FROM access_grants WHERE user_id = $1 ORDER BY created_at", &[&uid])
        .await?
        .iter()
        .map(|r| {
            json!({"plan": r.get::<_, String>(0), "until": r.get::<_, Option<DateTime<Utc>>>(1), "granted_by": r.get::<_, String>(2),
                "reason": r.get::<_, String>(3), "created_at": r.get::<_, DateTime<Utc>>(4), "revoked_at": r.get::<_, Option<DateTime<Utc>>>(5)})
        })
        .collect::<Vec<_>>();
    let subscription = client
        .query_opt("SELECT plan, status, period_start, period_end FROM subscriptions WHERE user_id = $1", &[&uid])
        .await?
        .map(|r| json!({"plan": r.get::<_, String>(0), "status": r.get::<_, String>(1), "period_start": r.get::<_, Option<DateTime<Utc>>>(2), "period_end": r.get::<_, Option<DateTime<Utc>>>(3)}));
    let devices = client
        .query(
            "SELECT device_id, first_seen_at, last_sync_at, protocol, cloned, removed_at FROM devices WHERE user_id = $1 ORDER BY first_seen_at, device_id",
            &[&uid],
        )
        .await?
        .iter()
        .map(|r| {
            json!({"device_id": r.get::<_, String>(0), "first_seen_at": r.get::<_, DateTime<Utc>>(1), "last_sync_at": r.get::<_, DateTime<Utc>>(2),
                "protocol": r.get::<_, i32>(3), "cloned": r.get::<_, bool>(4), "removed_at": r.get::<_, Option<DateTime<Utc>>>(5)})
        })
        .collect::<Vec<_>>();
    let rows = |select: &'static str, order: &'static str| rows_json(&client, select, order, uid);
    let credit_grants = rows(
        "SELECT grant_id AS id, amount, source, reason, granted_by, valid_from, expires_at, created_at, revoked_at FROM credit_grants WHERE user_id = $1",
        "created_at, id",
    )
    .await?;
    let store_subscriptions = rows(
        "SELECT store, subscription_id, product_id, plan, status, period_start, period_end, past_due_since, access_until, lifetime, auto_renew, \
         sandbox, updated_at FROM store_subscriptions WHERE user_id = $1",
        "store, subscription_id",
    )
    .await?;
    let payments = rows(
        "SELECT 'stripe' AS store, invoice_id, subscription_id, payment_intent, charge_id, amount, currency, status, first_failed_at, paid_at, \
         period_start, period_end, created FROM stripe_payments WHERE user_id = $1",
        "created, invoice_id",
    )
    .await?;
    let refunds = rows(
        "SELECT 'stripe' AS store, charge_id, payment_intent, invoice_id, amount_refunded, fully_refunded, currency, created \
         FROM stripe_refunds WHERE user_id = $1",
        "created, charge_id",
    )
    .await?;
    let store_purchases = rows(
        "SELECT 'app_store' AS store, transaction_id AS id, product_id, purchase_date AS started_at, expires_date AS expires_at, \
         revoked_at, NULL AS state FROM apple_transactions WHERE user_id = $1 \
         UNION ALL SELECT 'play', order_id, product_id, start_time, expiry_time, NULL, state FROM google_purchases WHERE user_id = $1",
        "started_at, id",
    )
    .await?;
    // What the stores told about the user (Stripe's event with its payload), as received.
    let store_events = rows(
        "SELECT 'stripe' AS store, event_id AS id, type, NULL AS subtype, outcome, received_at, payload FROM stripe_events WHERE user_id = $1 \
         UNION ALL SELECT 'app_store', notification_uuid, type, subtype, outcome, received_at, NULL FROM apple_notifications WHERE user_id = $1 \
         UNION ALL SELECT 'play', message_id, kind, NULL, outcome, received_at, NULL FROM google_notifications WHERE user_id = $1",
        "received_at, id",
    )
    .await?;
    let timezone_changes = rows(
        "SELECT requested_at, effective_at, timezone, previous FROM timezone_changes WHERE user_id = $1",
        "effective_at, requested_at",
    )
    .await?;
    // What the app's backend was told about the user (outbound webhooks), in order.
    let webhook_events = rows("SELECT event_id AS id, type, created_at, data, seq FROM webhook_events WHERE user_id = $1", "seq").await?;
    Ok(Json(json!({"user": user, "events": events, "settings": settings, "access_grants": grants, "subscription": subscription,
        "devices": devices, "credit_grants": credit_grants, "store_subscriptions": store_subscriptions, "payments": payments,
        "refunds": refunds, "store_purchases": store_purchases, "store_events": store_events, "webhook_events": webhook_events,
        "timezone_changes": timezone_changes})))
}

/// The rows of `select` (its `$1` is the user) as a JSON array of objects, one per row with
/// its columns by name, ordered by `order` (columns of `select`).
async fn rows_json(client: &impl GenericClient, select: &str, order: &str, user: Uuid) -> ApiResult<Value> {
    let q = format!("SELECT coalesce(jsonb_agg(to_jsonb(r) ORDER BY {order}), '[]'::jsonb) FROM ({select}) r");
    Ok(client.query_one(&q, &[&user]).await?.get(0))
}
