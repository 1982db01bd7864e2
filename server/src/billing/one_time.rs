//! Stripe one-time purchases (Checkout `mode=payment`): lifetime plans and credit packs, granted
//! once per payment when the session is paid, and taken back by a full refund of that payment.
//! The product is the session's `metadata[tally_price_id]`, which `POST /v1/billing/checkout`
//! sets; the grant is keyed by the payment (the session's PaymentIntent), so replays and
//! redeliveries grant nothing more.

use super::state::id_of;
use super::subscriptions::{self, Stored};
use crate::AppState;
use crate::credits;
use crate::error::ApiResult;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use tally_core::catalog::ProductKind;
use tally_core::{Store, Subscription, SubscriptionStatus};
use uuid::Uuid;

/// The id of the credit grant of a one-time Stripe payment.
fn grant_id(payment: &str) -> String {
    format!("stripe:{payment}")
}

/// Whether a Checkout Session is a one-time purchase.
pub fn is_one_time(session: &Value) -> bool {
    session["mode"] == "payment"
}

/// Grants what a paid one-time Checkout Session bought to `user`, once; answers the outcome.
pub async fn grant(state: &AppState, tx: &impl GenericClient, user: Uuid, session: &Value, at: DateTime<Utc>) -> ApiResult<String> {
    if session["payment_status"] != "paid" {
        return Ok("ignored:unpaid".into());
    }
    let Some(price) = session["metadata"]["tally_price_id"].as_str() else { return Ok("ignored:no_product".into()) };
    let Some(payment) = id_of(&session["payment_intent"]).or_else(|| id_of(&session["id"])) else {
        return Ok("ignored:no_payment".into());
    };
    let (_, catalog) = state.catalog.current(tx).await?;
    let now = state.now();
    let kind = catalog.product(Store::Stripe, price).map(|p| p.kind());
    if matches!(kind, Some(ProductKind::Lifetime(_) | ProductKind::Credits(_))) {
        record_payment(tx, user, session, &payment, at, now).await?;
    }
    match kind {
        Some(ProductKind::Lifetime(plan)) => {
            let known = tx
                .query_opt(
                    "SELECT 1 FROM store_subscriptions WHERE user_id = $1 AND store = 'stripe' AND subscription_id = $2",
                    &[&user, &payment],
                )
                .await?;
            if known.is_some() {
                return Ok("applied:already_granted".into());
            }
            let sub = Subscription {
                store: Store::Stripe,
                subscription_id: payment,
                product_id: Some(price.to_string()),
                plan: Some(plan.to_string()),
                status: SubscriptionStatus::Active,
                period_start: Some(at.min(now)),
                period_end: None,
                past_due_since: None,
                access_until: None,
                lifetime: true,
            };
            subscriptions::store(tx, user, &Stored { sub, auto_renew: false, sandbox: false }, now).await?;
            Ok("applied:lifetime".into())
        }
        Some(ProductKind::Credits(n)) => {
            let amount = i64::try_from(n).unwrap_or(i64::MAX);
            let fresh = credits::insert(
                tx,
                user,
                &grant_id(&payment),
                amount,
                "purchase",
                Some(price),
                Some("stripe"),
                None,
                at.min(now),
                None,
                now,
            )
            .await?;
            Ok(if fresh { format!("applied:credits_granted:{amount}") } else { "applied:already_granted".into() })
        }
        Some(ProductKind::Subscription(_)) | None => Ok("ignored:unknown_product".into()),
    }
}

/// Records the payment in the history (`GET /v1/billing` `payments`, with the Checkout
/// Session's id as its `invoice_id`; refunds match it by its PaymentIntent), once.
async fn record_payment(
    tx: &impl GenericClient,
    user: Uuid,
    session: &Value,
    payment: &str,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    let Some(id) = id_of(&session["id"]) else { return Ok(()) };
    let event = crate::webhooks::outbox::Payment {
        kind: "payment.succeeded",
        store: "stripe",
        payment_id: payment,
        occurrence: "",
        subscription_id: None,
        product_id: session["metadata"]["tally_price_id"].as_str(),
        amount: session["amount_total"].as_i64(),
        currency: session["currency"].as_str(),
    };
    crate::webhooks::outbox::payment(tx, user, &event, now).await?;
    tx.execute(
        "INSERT INTO stripe_payments (user_id, invoice_id, customer_id, payment_intent, amount, currency, status, paid_at, created) \
         VALUES ($1, $2, $3, $4, $5, $6, 'paid', $7, $7) ON CONFLICT (user_id, invoice_id) DO NOTHING",
        &[
            &user,
            &id,
            &id_of(&session["customer"]).unwrap_or_default(),
            &payment,
            &session["amount_total"].as_i64().unwrap_or(0),
            &session["currency"].as_str().unwrap_or(""),
            &at,
        ],
    )
    .await?;
    Ok(())
}

/// A full refund of the one-time payment `payment` takes back what it granted: the lifetime
/// plan, or the credits of the pack not spent yet (what was spent becomes debt). Returns
/// whether anything was taken back.
pub async fn refund(tx: &impl GenericClient, user: Uuid, payment: &str, now: DateTime<Utc>) -> ApiResult<bool> {
    let credits = credits::revoke_purchased(tx, user, &grant_id(payment), now).await?;
    let lifetime = subscriptions::load(tx, user).await?.into_iter().find(|s| {
        s.sub.store == Store::Stripe && s.sub.subscription_id == payment && s.sub.lifetime && s.sub.status != SubscriptionStatus::Canceled
    });
    let Some(mut plan) = lifetime else { return Ok(credits) };
    plan.sub.status = SubscriptionStatus::Canceled;
    plan.sub.access_until = Some(now);
    // Stored like every subscription change, so the plan's end is told (`subscription.expired`).
    subscriptions::store(tx, user, &plan, now).await?;
    Ok(true)
}
