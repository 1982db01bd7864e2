//! Billing with Stripe: webhooks (signature, exactly-once application, out-of-order rules),
//! Checkout and Billing Portal sessions, payment history, credit grants, and the cancellation
//! that precedes an account deletion.
//!
//! The Stripe API version is pinned ([`DEFAULT_API_VERSION`], or `TALLY_STRIPE_API_VERSION`);
//! payloads are read at that version with fallbacks to the fields of earlier versions
//! (`items.data[0].current_period_*` else the subscription's, `invoice.parent.…subscription`
//! else `invoice.subscription`, `line.pricing.price_details.price` else `line.price`).

pub mod apple;
pub mod google;
pub mod google_api;
pub mod google_push;
pub mod one_time;
pub mod purchases;
pub mod signature;
pub mod state;
pub mod stripe_api;
pub mod subscriptions;
pub mod webhook;

use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::users::User;
use crate::{AppState, Config, entitlements};
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use stripe_api::{Stripe, pair};
use tally_core::catalog::ProductKind;
use tally_core::{Store, SubscriptionStatus};
use uuid::Uuid;

pub use webhook::receive as webhook;

/// The Stripe API version this server reads and sends by default.
pub const DEFAULT_API_VERSION: &str = "2025-03-31.basil";

/// Stripe price id → plan id: `TALLY_STRIPE_PRICES`, and the catalog's Stripe products that
/// grant a plan (a product wins over the variable for the same price id).
pub fn prices(config: &Config, catalog: &tally_core::Catalog) -> HashMap<String, String> {
    let mut m = env_prices(config);
    for p in catalog.products.iter().filter(|p| p.store == tally_core::Store::Stripe) {
        match &p.grants.plan {
            Some(plan) => m.insert(p.id.clone(), plan.clone()),
            None => m.remove(&p.id),
        };
    }
    m
}

fn env_prices(config: &Config) -> HashMap<String, String> {
    config
        .stripe_prices
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect()
}

fn stripe(state: &AppState) -> ApiResult<Stripe> {
    let s = Stripe::new(&state.config).map_err(ApiError::internal)?;
    if !s.configured() {
        return Err(stripe_api::StripeError::NotConfigured.into());
    }
    Ok(s)
}

/// An idempotency key for one Stripe request: derived from the client's `Idempotency-Key`
/// header when it sent one (so its retries create one session), else random.
fn idempotency_key(headers: &HeaderMap, user: &User, what: &str) -> String {
    match headers.get("idempotency-key").and_then(|v| v.to_str().ok()).filter(|k| !k.is_empty() && k.len() <= 200) {
        Some(k) => Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("tally:{what}:{}:{k}", user.user_id).as_bytes()).to_string(),
        None => Uuid::new_v4().to_string(),
    }
}

fn check_url(name: &str, u: &str) -> ApiResult<()> {
    let ok = (u.starts_with("https://") || u.starts_with("http://")) && u.len() <= 2048;
    if ok { Ok(()) } else { Err(ApiError::Invalid("invalid_url", format!("{name} must be an http(s) URL of at most 2048 bytes"))) }
}

async fn customer_of(client: &impl GenericClient, user: Uuid) -> ApiResult<Option<String>> {
    Ok(client
        .query_opt("SELECT customer_id FROM stripe_customers WHERE user_id = $1 ORDER BY linked_at DESC LIMIT 1", &[&user])
        .await?
        .map(|r| r.get(0)))
}

/// Body of `POST /v1/billing/checkout`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// A price of the catalog's Stripe products or of `TALLY_STRIPE_PRICES`.
    pub price_id: String,
    /// Where Stripe sends the customer after paying.
    pub success_url: String,
    /// Where Stripe sends the customer after giving up.
    pub cancel_url: String,
}

/// `POST /v1/billing/checkout`: a Stripe Checkout Session for the caller; answers `{id, url}`.
/// A plan subscription is mode `subscription` (with the product's `trial_days` as a free
/// trial), refused with 409 `subscription_active` while the caller has a subscription running
/// in any store (plans change in the billing portal); a lifetime plan or a credit pack is mode
/// `payment`. `client_reference_id` is the caller's user id, so the
/// `checkout.session.completed` webhook links the customer to them.
#[utoipa::path(
    operation_id = "billing_checkout",
    post,
    path = "/v1/billing/checkout",
    tag = "billing",
    security(("bearer" = [])),
    request_body = CheckoutBody,
    responses((status = 200, description = "The Checkout Session `{id, url}`", body = Object)),
)]
pub async fn checkout(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    JsonBody(b): JsonBody<CheckoutBody>,
) -> ApiResult<Json<Value>> {
    // Unconfigured first: a server without Stripe says so, rather than that the price is unknown.
    let stripe = stripe(&state)?;
    let client = state.pool.get().await?;
    let (_, catalog) = state.catalog.current(&client).await?;
    let product = catalog.product(Store::Stripe, &b.price_id);
    let one_time = product.is_some_and(|p| !matches!(p.kind(), ProductKind::Subscription(_)));
    if !one_time && !prices(&state.config, &catalog).contains_key(&b.price_id) {
        return Err(ApiError::Invalid(
            "unknown_price",
            format!("price {:?} is neither a Stripe product of the catalog nor in TALLY_STRIPE_PRICES", b.price_id),
        ));
    }
    check_url("success_url", &b.success_url)?;
    check_url("cancel_url", &b.cancel_url)?;
    if !one_time && let Some(s) = subscriptions::running_anywhere(&client, user.user_id, state.now()).await? {
        return Err(ApiError::Conflict(
            "subscription_active",
            format!(
                "the account already has a running subscription ({} {}); change plans {}",
                s.sub.store.as_str(),
                s.sub.plan.as_deref().unwrap_or("plan"),
                subscriptions::where_to_cancel(s.sub.store)
            ),
        ));
    }
    let customer = customer_of(&client, user.user_id).await?;
    drop(client);
    let uid = user.user_id.to_string();
    let mut form = vec![
        pair("mode", if one_time { "payment" } else { "subscription" }),
        pair("line_items[0][price]", b.price_id.clone()),
        pair("line_items[0][quantity]", "1"),
        pair("success_url", b.success_url.clone()),
        pair("cancel_url", b.cancel_url.clone()),
        pair("client_reference_id", uid.clone()),
        pair("metadata[tally_user_id]", uid.clone()),
    ];
    if one_time {
        form.push(pair("metadata[tally_price_id]", b.price_id.clone()));
        form.push(pair("payment_intent_data[metadata][tally_user_id]", uid));
        if customer.is_none() {
            // Refunds and later purchases find the customer the payment created.
            form.push(pair("customer_creation", "always"));
        }
    } else {
        form.push(pair("subscription_data[metadata][tally_user_id]", uid));
        if let Some(days) = product.and_then(|p| p.trial_days) {
            form.push(pair("subscription_data[trial_period_days]", days.to_string()));
        }
    }
    match (&customer, &user.email) {
        (Some(c), _) => form.push(pair("customer", c.clone())),
        (None, Some(e)) => form.push(pair("customer_email", e.clone())),
        (None, None) => {}
    }
    let s = stripe.call(reqwest::Method::POST, "/v1/checkout/sessions", &form, &idempotency_key(&headers, &user, "checkout")).await?;
    Ok(Json(json!({"id": s["id"], "url": s["url"]})))
}

/// Body of `POST /v1/billing/portal`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalBody {
    /// Where the portal's "return" link goes.
    pub return_url: String,
}

/// `POST /v1/billing/portal`: a Stripe Billing Portal session for the caller's customer;
/// answers `{id, url}` (404 when the caller has no Stripe customer yet).
#[utoipa::path(
    operation_id = "billing_portal",
    post,
    path = "/v1/billing/portal",
    tag = "billing",
    security(("bearer" = [])),
    request_body = PortalBody,
    responses((status = 200, description = "The portal session `{id, url}`", body = Object)),
)]
pub async fn portal(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    JsonBody(b): JsonBody<PortalBody>,
) -> ApiResult<Json<Value>> {
    check_url("return_url", &b.return_url)?;
    let stripe = stripe(&state)?;
    let client = state.pool.get().await?;
    let customer = customer_of(&client, user.user_id).await?.ok_or_else(|| ApiError::not_found("Stripe customer"))?;
    drop(client);
    let form = vec![pair("customer", customer), pair("return_url", b.return_url)];
    let s = stripe.call(reqwest::Method::POST, "/v1/billing_portal/sessions", &form, &idempotency_key(&headers, &user, "portal")).await?;
    Ok(Json(json!({"id": s["id"], "url": s["url"]})))
}

fn refund_status(amount: i64, refunded: i64, full: bool) -> &'static str {
    if full || (amount > 0 && refunded >= amount) { "refunded" } else { "partially_refunded" }
}

/// `GET /v1/billing`: plan, status, period, cancel_at_period_end, credits and payment history.
#[utoipa::path(
    operation_id = "billing_get_billing",
    get,
    path = "/v1/billing",
    tag = "billing",
    security(("bearer" = [])),
    responses((status = 200, description = "Plan, subscriptions, credits and payments", body = Object)),
)]
pub async fn get_billing(State(state): State<AppState>, AuthUser(user): AuthUser) -> ApiResult<Json<Value>> {
    let client = state.pool.get().await?;
    let now = state.now();
    let loaded = entitlements::load(&state, &client, &user, now).await?;
    let e = &loaded.ents;
    let stored = subscriptions::load(&client, user.user_id).await?;
    let subs: Vec<tally_core::Subscription> = stored.iter().map(|s| s.sub.clone()).collect();
    let chosen = tally_core::subscription::in_effect(&subs, &loaded.catalog, now, subscriptions::grace(&state))
        .and_then(|c| stored.iter().find(|s| s.sub.store == c.store && s.sub.subscription_id == c.subscription_id));
    type Refund = (String, Option<String>, Option<String>, i64, bool, String, DateTime<Utc>);
    let refunds: Vec<Refund> = client
        .query("SELECT charge_id, payment_intent, invoice_id, amount_refunded, fully_refunded, currency, created FROM stripe_refunds WHERE user_id = $1", &[&user.user_id])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6)))
        .collect();
    let mut matched = vec![false; refunds.len()];
    let mut payments = Vec::new();
    for r in client
        .query(
            "SELECT invoice_id, subscription_id, amount, currency, status, paid_at, first_failed_at, created, period_start, period_end, payment_intent, charge_id \
             FROM stripe_payments WHERE user_id = $1 ORDER BY coalesce(paid_at, first_failed_at, created) DESC, invoice_id",
            &[&user.user_id],
        )
        .await?
    {
        let invoice: String = r.get(0);
        let amount: i64 = r.get(2);
        let pi: Option<String> = r.get(10);
        let charge: Option<String> = r.get(11);
        let mut status: String = r.get(4);
        let mut refunded = 0;
        for (i, f) in refunds.iter().enumerate() {
            let hit = f.2.as_deref() == Some(invoice.as_str()) || (pi.is_some() && f.1 == pi) || charge.as_deref() == Some(f.0.as_str());
            if hit {
                matched[i] = true;
                refunded += f.3;
                status = refund_status(amount, refunded, f.4).into();
            }
        }
        let date: Option<DateTime<Utc>> = r.get::<_, Option<DateTime<Utc>>>(5).or(r.get(6)).or(Some(r.get(7)));
        payments.push(json!({"invoice_id": invoice, "subscription_id": r.get::<_, Option<String>>(1), "amount": amount, "currency": r.get::<_, String>(3),
            "store": "stripe", "status": status, "amount_refunded": refunded, "date": date, "period_start": r.get::<_, Option<DateTime<Utc>>>(8), "period_end": r.get::<_, Option<DateTime<Utc>>>(9)}));
    }
    for (i, f) in refunds.iter().enumerate().filter(|(i, _)| !matched[*i]) {
        let _ = i;
        payments.push(json!({"store": "stripe", "invoice_id": f.2, "charge_id": f.0, "amount": f.3, "currency": f.5, "status": refund_status(f.3, f.3, f.4), "amount_refunded": f.3, "date": f.6}));
    }
    payments.extend(apple::payments(&client, user.user_id).await?);
    payments.extend(google::payments(&client, user.user_id).await?);
    let balance = e.credit_balance;
    let listed: Vec<Value> = stored
        .iter()
        .map(|s| {
            json!({"store": s.sub.store, "subscription_id": s.sub.subscription_id, "product_id": s.sub.product_id, "plan": s.sub.plan,
                "status": s.sub.status, "period_start": s.sub.period_start, "period_end": s.sub.period_end, "past_due_since": s.sub.past_due_since,
                "access_until": s.sub.access_until, "lifetime": s.sub.lifetime, "auto_renew": s.auto_renew, "sandbox": s.sandbox})
        })
        .collect();
    Ok(Json(json!({
        "plan": e.plan,
        "access_reason": e.access_reason,
        "status": chosen.map_or(e.status, |c| c.sub.status),
        "store": chosen.map(|c| c.sub.store),
        "subscription_id": chosen.map(|c| c.sub.subscription_id.clone()),
        "subscribed_plan": chosen.and_then(|c| c.sub.plan.clone()),
        "period_start": chosen.and_then(|c| c.sub.period_start),
        "period_end": chosen.and_then(|c| c.sub.period_end),
        "cancel_at_period_end": chosen.is_some_and(|c| !c.auto_renew && !c.sub.lifetime),
        "past_due_since": chosen.and_then(|c| c.sub.past_due_since),
        "subscriptions": listed,
        "customer_linked": customer_of(&client, user.user_id).await?.is_some(),
        "credit_balance": balance,
        "credit_over_limit_by": (-balance).max(0),
        "credit_grants": e.credit_grants,
        "payments": payments,
    })))
}

/// Before `DELETE /v1/me`: cancels (immediately) every Stripe subscription of the user that is
/// not canceled yet, and records it as canceled. Any failure is a 409 and nothing is deleted.
pub async fn cancel_before_deletion(state: &AppState, user: &User) -> ApiResult<()> {
    let mut client = state.pool.get().await?;
    let live: Vec<String> = client
        .query("SELECT subscription_id FROM stripe_subscriptions WHERE user_id = $1 AND status <> 'canceled'", &[&user.user_id])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if live.is_empty() {
        return Ok(());
    }
    let conflict = |e: String| {
        ApiError::Conflict("subscription_cancel_failed", format!("could not cancel the Stripe subscription, so the account was kept: {e}"))
    };
    let stripe = Stripe::new(&state.config).map_err(ApiError::internal)?;
    for sub in &live {
        let key = format!("tally-delete-{}-{sub}", user.user_id);
        let path = format!("/v1/subscriptions/{sub}");
        match stripe.call(reqwest::Method::DELETE, &path, &[], &key).await {
            Ok(_) => {}
            // Already canceled at Stripe: nothing left to stop.
            Err(stripe_api::StripeError::Refused(404, _)) => {}
            Err(e) => return Err(conflict(e.to_string())),
        }
    }
    let tx = client.transaction().await?;
    crate::users::lock(&tx, user.user_id, &state.config.admin_subjects).await?;
    tx.execute(
        "UPDATE stripe_subscriptions SET status = 'canceled', stripe_status = 'canceled', canceled_at = now(), updated_at = now() WHERE user_id = $1",
        &[&user.user_id],
    )
    .await?;
    tx.execute(
        "UPDATE store_subscriptions SET status = $2, auto_renew = false, updated_at = now() WHERE user_id = $1 AND store = 'stripe'",
        &[&user.user_id, &SubscriptionStatus::Canceled.as_str()],
    )
    .await?;
    tx.execute(
        "UPDATE subscriptions SET status = $2, updated_at = now() WHERE user_id = $1 AND provider = 'stripe'",
        &[&user.user_id, &SubscriptionStatus::Canceled.as_str()],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The billing tables holding the user's rows, deleted with the account.
pub const USER_TABLES: &[&str] = &[
    "credit_grants",
    "stripe_refunds",
    "stripe_payments",
    "stripe_subscriptions",
    "stripe_customers",
    "store_subscriptions",
    "store_bindings",
    "apple_transactions",
    "apple_renewals",
    "google_purchases",
];
