//! `POST /v1/webhooks/stripe`: signature check over the raw bytes, then each event id applied
//! once, in one transaction with its effects (replays answer 200 and change nothing).

use super::state::{self, SubState, id_of};
use super::{one_time, prices};
use crate::AppState;
use crate::credits;
use crate::error::{ApiError, ApiResult};
use crate::extract::body_bytes;
use crate::users;
use crate::webhooks::outbox::{self, Payment};
use axum::Json;
use axum::extract::{FromRequest, Request, State};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::{Value, json};
use std::collections::HashMap;
use tally_core::SubscriptionStatus;
use uuid::Uuid;

/// Event types this server applies.
pub const HANDLED: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "charge.refunded",
];

/// A Stripe event, as much of it as we read.
#[derive(Debug, Clone)]
pub struct Event {
    /// `evt_…`.
    pub id: String,
    /// Event type.
    pub kind: String,
    /// Stripe's `created`.
    pub created: DateTime<Utc>,
    /// Live or test mode.
    pub livemode: bool,
    /// `data.object`.
    pub object: Value,
}

impl Event {
    /// Reads the envelope of a parsed event; 400 `invalid_event` when a required field is missing.
    pub fn from_value(v: &Value) -> ApiResult<Event> {
        let bad = |what: &str| ApiError::BadRequest("invalid_event", format!("not a Stripe event: {what}"));
        let id = v.get("id").and_then(Value::as_str).filter(|s| !s.is_empty() && s.len() <= 255).ok_or_else(|| bad("no id"))?;
        let kind = v.get("type").and_then(Value::as_str).filter(|s| !s.is_empty() && s.len() <= 255).ok_or_else(|| bad("no type"))?;
        let created =
            v.get("created").and_then(Value::as_i64).and_then(|t| DateTime::from_timestamp(t, 0)).ok_or_else(|| bad("no created"))?;
        let object = v.get("data").and_then(|d| d.get("object")).filter(|o| o.is_object()).ok_or_else(|| bad("no data.object"))?;
        Ok(Event {
            id: id.into(),
            kind: kind.into(),
            created,
            livemode: v.get("livemode").and_then(Value::as_bool).unwrap_or(false),
            object: object.clone(),
        })
    }

    /// The Stripe customer the event is about.
    pub fn customer(&self) -> Option<String> {
        self.object.get("customer").and_then(id_of)
    }
}

/// The raw body and its `Stripe-Signature` header, verified before anything is parsed.
pub struct Verified(pub Value);

impl FromRequest<AppState> for Verified {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let secrets: Vec<String> = state
            .config
            .stripe_webhook_secret
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if secrets.is_empty() {
            return Err(ApiError::NotFound("Stripe webhooks are not configured on this server (TALLY_STRIPE_WEBHOOK_SECRET)".into()));
        }
        let header = req.headers().get("stripe-signature").map(|h| h.as_bytes().to_vec());
        let bytes = body_bytes(req, state).await?;
        verified_payload(header.as_deref(), &bytes, &secrets, state.now().timestamp(), state.config.stripe_webhook_tolerance_secs)
            .map(Verified)
    }
}

/// The JSON of a webhook body whose `Stripe-Signature` `header` verifies against one of
/// `secrets` at `now` (Unix seconds): 400 with the signature's code, or `malformed_json`.
pub fn verified_payload(header: Option<&[u8]>, bytes: &[u8], secrets: &[String], now: i64, tolerance_secs: u64) -> ApiResult<Value> {
    super::signature::verify(header, bytes, secrets, now, tolerance_secs).map_err(|e| ApiError::BadRequest(e.code(), e.to_string()))?;
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest("malformed_json", format!("malformed JSON: {e}")))
}

/// `POST /v1/webhooks/stripe`.
#[utoipa::path(
    operation_id = "billing_webhook_receive",
    post,
    path = "/v1/webhooks/stripe",
    tag = "billing",
    params(("Stripe-Signature" = String, Header, description = "Stripe's signature of the payload")),
    request_body = Object,
    responses((status = 200, description = "Applied (or already applied)", body = Object)),
)]
pub async fn receive(State(state): State<AppState>, Verified(v): Verified) -> ApiResult<Json<Value>> {
    let ev = Event::from_value(&v)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let customer = ev.customer();
    let fresh = tx
        .execute(
            "INSERT INTO stripe_events (event_id, type, created, livemode, customer_id, outcome, payload) VALUES ($1, $2, $3, $4, $5, 'received', $6) \
             ON CONFLICT (event_id) DO NOTHING",
            &[&ev.id, &ev.kind, &ev.created, &ev.livemode, &customer, &v],
        )
        .await?;
    if fresh == 0 {
        drop(tx);
        let outcome: Option<String> =
            client.query_opt("SELECT outcome FROM stripe_events WHERE event_id = $1", &[&ev.id]).await?.map(|r| r.get(0));
        metrics::counter!("tally_stripe_events_total", "outcome" => "duplicate").increment(1);
        return Ok(Json(json!({"received": true, "id": ev.id, "duplicate": true, "outcome": outcome})));
    }
    let (outcome, user) = if HANDLED.contains(&ev.kind.as_str()) {
        dispatch(&state, &tx, &ev, customer.as_deref()).await?
    } else {
        ("unhandled_type".to_string(), None)
    };
    tx.execute("UPDATE stripe_events SET outcome = $2, user_id = $3, applied_at = now() WHERE event_id = $1", &[&ev.id, &outcome, &user])
        .await?;
    tx.commit().await?;
    if let Some(u) = user {
        state.tokens.forget(u);
    }
    let label = outcome.split(':').next().unwrap_or("other").to_string();
    metrics::counter!("tally_stripe_events_total", "outcome" => label).increment(1);
    tracing::info!(event = %ev.id, kind = %ev.kind, %outcome, "stripe event");
    Ok(Json(json!({"received": true, "id": ev.id, "duplicate": false, "outcome": outcome})))
}

/// Serializes every event of one customer (linking and applying cannot interleave).
async fn lock_customer(tx: &impl GenericClient, customer: &str) -> ApiResult<()> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('stripe-customer:' || $1, 7461))", &[&customer]).await?;
    Ok(())
}

async fn user_of_customer(tx: &impl GenericClient, customer: &str) -> ApiResult<Option<Uuid>> {
    Ok(tx.query_opt("SELECT user_id FROM stripe_customers WHERE customer_id = $1", &[&customer]).await?.map(|r| r.get(0)))
}

async fn dispatch(
    state: &AppState,
    tx: &deadpool_postgres::Transaction<'_>,
    ev: &Event,
    customer: Option<&str>,
) -> ApiResult<(String, Option<Uuid>)> {
    let Some(customer) = customer else { return Ok(("ignored:no_customer".into(), None)) };
    lock_customer(tx, customer).await?;
    if ev.kind == "checkout.session.completed" {
        return link(state, tx, ev, customer).await;
    }
    let Some(user) = user_of_customer(tx, customer).await? else {
        tx.execute(
            "INSERT INTO stripe_pending_events (customer_id, event_id, created) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&customer, &ev.id, &ev.created],
        )
        .await?;
        return Ok(("pending_customer".into(), None));
    };
    users::lock(tx, user, &state.config.admin_subjects).await?;
    let outcome = apply(state, tx, user, ev, customer).await?;
    refresh_user(state, tx, user).await?;
    Ok((outcome, Some(user)))
}

/// `checkout.session.completed`: links the customer to the user named by
/// `client_reference_id` (our user id or identity subject), or to the user whose *verified*
/// email is the customer's; then applies the events that were waiting for this customer.
async fn link(state: &AppState, tx: &deadpool_postgres::Transaction<'_>, ev: &Event, customer: &str) -> ApiResult<(String, Option<Uuid>)> {
    let o = &ev.object;
    let mut by = "client_reference_id";
    let mut user: Option<Uuid> = None;
    if let Some(r) = o.get("client_reference_id").and_then(Value::as_str).filter(|s| !s.is_empty()) {
        user = match Uuid::parse_str(r) {
            Ok(id) => tx.query_opt("SELECT user_id FROM users WHERE user_id = $1", &[&id]).await?.map(|r| r.get(0)),
            Err(_) => tx.query_opt("SELECT user_id FROM users WHERE external_id = $1", &[&r]).await?.map(|r| r.get(0)),
        };
    }
    let email = o["customer_details"]["email"].as_str().or_else(|| o["customer_email"].as_str()).map(str::to_string);
    if user.is_none()
        && let Some(e) = &email
    {
        by = "email";
        let canonical = tally_core::contract::canonical_email(e).ok();
        let rows = tx.query("SELECT user_id FROM users WHERE email_canonical = $1 AND email_verified", &[&canonical]).await?;
        if rows.len() == 1 {
            user = Some(rows[0].get(0));
        }
    }
    let Some(user) = user else { return Ok(("ignored:no_matching_user".into(), None)) };
    if let Some(existing) = user_of_customer(tx, customer).await?
        && existing != user
    {
        return Ok(("ignored:customer_linked_to_another_user".into(), None));
    }
    users::lock(tx, user, &state.config.admin_subjects).await?;
    tx.execute(
        "INSERT INTO stripe_customers (user_id, customer_id, email, linked_by) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        &[&user, &customer, &email, &by],
    )
    .await?;
    let pending = tx
        .query(
            "SELECT e.event_id, e.payload FROM stripe_pending_events p JOIN stripe_events e ON e.event_id = p.event_id \
             WHERE p.customer_id = $1 ORDER BY p.created, p.event_id",
            &[&customer],
        )
        .await?;
    let mut applied = 0;
    for r in &pending {
        let id: String = r.get(0);
        let payload: Value = r.get(1);
        let outcome = match Event::from_value(&payload) {
            Ok(pev) => apply(state, tx, user, &pev, customer).await?,
            Err(_) => "ignored:invalid_event".into(),
        };
        tx.execute(
            "UPDATE stripe_events SET outcome = $2, user_id = $3, applied_at = now() WHERE event_id = $1",
            &[&id, &format!("{outcome} (after link)"), &user],
        )
        .await?;
        applied += 1;
    }
    tx.execute("DELETE FROM stripe_pending_events WHERE customer_id = $1", &[&customer]).await?;
    let bought =
        if one_time::is_one_time(o) { format!(",{}", one_time::grant(state, tx, user, o, ev.created).await?) } else { String::new() };
    refresh_user(state, tx, user).await?;
    let pending = if applied > 0 { format!(",{applied}_pending_applied") } else { String::new() };
    Ok((format!("applied:linked_by_{by}{pending}{bought}"), Some(user)))
}

/// Applies one event to a known, locked user.
async fn apply(state: &AppState, tx: &impl GenericClient, user: Uuid, ev: &Event, customer: &str) -> ApiResult<String> {
    let (_, catalog) = state.catalog.current(tx).await?;
    let prices = prices(&state.config, &catalog);
    match ev.kind.as_str() {
        "customer.subscription.created" | "customer.subscription.updated" | "customer.subscription.deleted" => {
            let new = match state::parse_subscription(&ev.object, ev.created, &ev.id, &prices) {
                Ok(s) => s,
                Err(e) => return Ok(format!("ignored:{e}")),
            };
            let old = load_sub(tx, user, &new.subscription_id).await?;
            if old.as_ref().is_some_and(|o| !state::supersedes(&new, o)) {
                return Ok("ignored:stale".into());
            }
            store_sub(tx, user, &new).await?;
            Ok(if new.plan.is_none() { "applied:unknown_price".into() } else { "applied".into() })
        }
        "invoice.payment_succeeded" | "invoice.payment_failed" => invoice(state, tx, user, ev, customer, &prices).await,
        "checkout.session.async_payment_succeeded" if one_time::is_one_time(&ev.object) => {
            one_time::grant(state, tx, user, &ev.object, ev.created).await
        }
        "charge.refunded" => {
            let o = &ev.object;
            let Some(charge) = o.get("id").and_then(Value::as_str) else { return Ok("ignored:no_charge_id".into()) };
            let created = o.get("created").and_then(Value::as_i64).and_then(|t| DateTime::from_timestamp(t, 0)).unwrap_or(ev.created);
            tx.execute(
                "INSERT INTO stripe_refunds (user_id, charge_id, payment_intent, invoice_id, amount_refunded, fully_refunded, currency, created) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (user_id, charge_id) DO UPDATE SET \
                 amount_refunded = GREATEST(stripe_refunds.amount_refunded, excluded.amount_refunded), \
                 fully_refunded = stripe_refunds.fully_refunded OR excluded.fully_refunded",
                &[
                    &user,
                    &charge,
                    &o.get("payment_intent").and_then(id_of),
                    &o.get("invoice").and_then(id_of),
                    &o.get("amount_refunded").and_then(Value::as_i64).unwrap_or(0),
                    &o.get("refunded").and_then(Value::as_bool).unwrap_or(false),
                    &o.get("currency").and_then(Value::as_str).unwrap_or(""),
                    &created,
                ],
            )
            .await?;
            let refunded = o.get("amount_refunded").and_then(Value::as_i64).unwrap_or(0);
            let event = Payment {
                kind: "payment.refunded",
                store: "stripe",
                payment_id: charge,
                occurrence: &refunded.to_string(),
                subscription_id: None,
                product_id: None,
                amount: Some(refunded),
                currency: o.get("currency").and_then(Value::as_str),
            };
            outbox::payment(tx, user, &event, state.now()).await?;
            // A full refund of a one-time payment takes back the lifetime plan or credits it gave.
            if o.get("refunded").and_then(Value::as_bool) == Some(true)
                && let Some(payment) = o.get("payment_intent").and_then(id_of)
                && one_time::refund(tx, user, &payment, state.now()).await?
            {
                return Ok("applied:purchase_taken_back".into());
            }
            Ok("applied".into())
        }
        _ => Ok("unhandled_type".into()),
    }
}

fn ts(v: &Value) -> Option<DateTime<Utc>> {
    v.as_i64().and_then(|t| DateTime::from_timestamp(t, 0))
}

/// The subscription of an invoice: `parent.subscription_details.subscription` (2025-03-31.basil
/// and later), else `subscription` (earlier versions), else the first line's.
fn invoice_subscription(o: &Value) -> Option<String> {
    let line = &o["lines"]["data"][0];
    id_of(&o["parent"]["subscription_details"]["subscription"])
        .or_else(|| id_of(&o["subscription"]))
        .or_else(|| id_of(&line["parent"]["subscription_item_details"]["subscription"]))
        .or_else(|| id_of(&line["subscription"]))
}

/// The price of an invoice's first line: `pricing.price_details.price` (basil), else `price`.
fn invoice_price(o: &Value) -> Option<String> {
    let line = &o["lines"]["data"][0];
    id_of(&line["pricing"]["price_details"]["price"]).or_else(|| id_of(&line["price"])).or_else(|| id_of(&line["plan"]))
}

async fn invoice(
    state: &AppState,
    tx: &impl GenericClient,
    user: Uuid,
    ev: &Event,
    customer: &str,
    prices: &HashMap<String, String>,
) -> ApiResult<String> {
    let o = &ev.object;
    let Some(invoice_id) = o.get("id").and_then(Value::as_str) else { return Ok("ignored:no_invoice_id".into()) };
    let paid = ev.kind == "invoice.payment_succeeded";
    let sub = invoice_subscription(o);
    let line = &o["lines"]["data"][0];
    let period_start = ts(&line["period"]["start"]).or_else(|| ts(&o["period_start"]));
    let period_end = ts(&line["period"]["end"]).or_else(|| ts(&o["period_end"]));
    let amount = if paid { o["amount_paid"].as_i64() } else { o["amount_due"].as_i64() }.unwrap_or(0);
    let currency = o["currency"].as_str().unwrap_or("");
    let payment_intent = id_of(&o["payment_intent"]).or_else(|| id_of(&o["payments"]["data"][0]["payment"]["payment_intent"]));
    let charge = id_of(&o["charge"]).or_else(|| id_of(&o["payments"]["data"][0]["payment"]["charge"]));
    let created = ts(&o["created"]).unwrap_or(ev.created);
    let status = if paid { "paid" } else { "failed" };
    if !paid {
        crate::metrics::payment_failed("stripe");
    }
    let failed_at = (!paid).then_some(ev.created);
    let paid_at = paid.then_some(ev.created);
    tx.execute(
        "INSERT INTO stripe_payments (user_id, invoice_id, subscription_id, customer_id, payment_intent, charge_id, amount, currency, status, \
           first_failed_at, paid_at, period_start, period_end, created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
         ON CONFLICT (user_id, invoice_id) DO UPDATE SET \
           status = CASE WHEN stripe_payments.status = 'paid' OR excluded.status = 'paid' THEN 'paid' ELSE 'failed' END, \
           amount = CASE WHEN excluded.status = 'paid' THEN excluded.amount WHEN stripe_payments.status = 'paid' THEN stripe_payments.amount ELSE excluded.amount END, \
           first_failed_at = LEAST(stripe_payments.first_failed_at, excluded.first_failed_at), \
           paid_at = GREATEST(stripe_payments.paid_at, excluded.paid_at), \
           payment_intent = coalesce(stripe_payments.payment_intent, excluded.payment_intent), \
           charge_id = coalesce(stripe_payments.charge_id, excluded.charge_id), \
           subscription_id = coalesce(stripe_payments.subscription_id, excluded.subscription_id)",
        &[&user, &invoice_id, &sub, &customer, &payment_intent, &charge, &amount, &currency, &status, &failed_at, &paid_at, &period_start, &period_end, &created],
    )
    .await?;
    let price = invoice_price(o);
    let event = Payment {
        kind: if paid { "payment.succeeded" } else { "payment.failed" },
        store: "stripe",
        payment_id: invoice_id,
        occurrence: if paid { "" } else { ev.id.as_str() },
        subscription_id: sub.as_deref(),
        product_id: price.as_deref(),
        amount: Some(amount),
        currency: Some(currency),
    };
    outbox::payment(tx, user, &event, state.now()).await?;
    if !paid {
        return Ok("applied:past_due".into());
    }
    // The plan's included credits, once per invoice, expiring at the end of the period paid
    // unless the plan rolls them over.
    let mut plan = price.and_then(|p| prices.get(&p).cloned());
    if plan.is_none()
        && let Some(s) = &sub
    {
        plan = load_sub(tx, user, s).await?.and_then(|s| s.plan);
    }
    let (_, catalog) = state.catalog.current(tx).await?;
    let included = plan.as_deref().and_then(|p| catalog.plan(p)).and_then(|p| p.included_credits);
    let Some(inc) = included.filter(|i| i.amount > 0) else { return Ok("applied".into()) };
    let amount = i64::try_from(inc.amount).unwrap_or(i64::MAX);
    let valid_from = period_start.unwrap_or(ev.created).min(ev.created);
    let expires = if inc.rollover { None } else { period_end.filter(|e| *e > valid_from) };
    let granted = credits::insert(
        tx,
        user,
        &format!("inv:{invoice_id}"),
        amount,
        "plan",
        plan.as_deref(),
        Some("stripe"),
        Some(invoice_id),
        valid_from,
        expires,
        state.now(),
    )
    .await?;
    Ok(if granted { format!("applied:credits_granted:{amount}") } else { "applied".into() })
}

async fn load_sub(tx: &impl GenericClient, user: Uuid, sub: &str) -> ApiResult<Option<SubState>> {
    let r = tx
        .query_opt(
            "SELECT subscription_id, customer_id, price_id, plan, stripe_status, status, period_start, period_end, cancel_at_period_end, canceled_at, \
               state_created, state_event_id FROM stripe_subscriptions WHERE user_id = $1 AND subscription_id = $2 FOR UPDATE",
            &[&user, &sub],
        )
        .await?;
    Ok(r.map(|r| sub_from_row(&r)))
}

/// A `stripe_subscriptions` row (columns in the order of [`load_sub`]).
pub fn sub_from_row(r: &tokio_postgres::Row) -> SubState {
    SubState {
        subscription_id: r.get(0),
        customer_id: r.get(1),
        price_id: r.get(2),
        plan: r.get(3),
        stripe_status: r.get(4),
        status: SubscriptionStatus::parse(r.get(5)).unwrap_or_default(),
        period_start: r.get(6),
        period_end: r.get(7),
        cancel_at_period_end: r.get(8),
        canceled_at: r.get(9),
        created: r.get(10),
        event_id: r.get(11),
    }
}

/// Stores `s` as the state of its subscription id.
pub async fn store_sub(tx: &impl GenericClient, user: Uuid, s: &SubState) -> ApiResult<()> {
    tx.execute(
        "INSERT INTO stripe_subscriptions (user_id, subscription_id, customer_id, price_id, plan, stripe_status, status, period_start, period_end, \
           cancel_at_period_end, canceled_at, state_created, state_event_id, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, now()) \
         ON CONFLICT (user_id, subscription_id) DO UPDATE SET customer_id = excluded.customer_id, price_id = excluded.price_id, plan = excluded.plan, \
           stripe_status = excluded.stripe_status, status = excluded.status, period_start = excluded.period_start, period_end = excluded.period_end, \
           cancel_at_period_end = excluded.cancel_at_period_end, canceled_at = excluded.canceled_at, state_created = excluded.state_created, \
           state_event_id = excluded.state_event_id, updated_at = now()",
        &[
            &user,
            &s.subscription_id,
            &s.customer_id,
            &s.price_id,
            &s.plan,
            &s.stripe_status,
            &s.status.as_str(),
            &s.period_start,
            &s.period_end,
            &s.cancel_at_period_end,
            &s.canceled_at,
            &s.created,
            &s.event_id,
        ],
    )
    .await?;
    Ok(())
}

/// The user's subscriptions with their effective status and past-due start.
pub async fn effective_subs(tx: &impl GenericClient, user: Uuid) -> ApiResult<Vec<state::Effective>> {
    let rows = tx
        .query(
            "SELECT subscription_id, customer_id, price_id, plan, stripe_status, status, period_start, period_end, cancel_at_period_end, canceled_at, \
               state_created, state_event_id FROM stripe_subscriptions WHERE user_id = $1",
            &[&user],
        )
        .await?;
    let failures: HashMap<String, DateTime<Utc>> = tx
        .query(
            "SELECT subscription_id, min(first_failed_at) FROM stripe_payments WHERE user_id = $1 AND status = 'failed' AND subscription_id IS NOT NULL GROUP BY 1",
            &[&user],
        )
        .await?
        .iter()
        .filter_map(|r| Some((r.get::<_, String>(0), r.get::<_, Option<DateTime<Utc>>>(1)?)))
        .collect();
    Ok(rows
        .iter()
        .map(|r| {
            let s = sub_from_row(r);
            let (st, since) = state::effective(&s, failures.get(&s.subscription_id).copied());
            (s, st, since)
        })
        .collect())
}

/// Mirrors the user's Stripe subscriptions (with their effective status) into the store
/// subscriptions entitlements resolve from, then refreshes the summary and the version.
pub async fn refresh_user(state: &AppState, tx: &impl GenericClient, user: Uuid) -> ApiResult<()> {
    for (s, status, since) in effective_subs(tx, user).await? {
        let sub = tally_core::Subscription {
            store: tally_core::Store::Stripe,
            subscription_id: s.subscription_id.clone(),
            product_id: s.price_id.clone(),
            plan: s.plan.clone(),
            status,
            period_start: s.period_start,
            period_end: s.period_end,
            past_due_since: since,
            access_until: None,
            lifetime: false,
        };
        let stored = super::subscriptions::Stored { sub, auto_renew: !s.cancel_at_period_end, sandbox: false };
        super::subscriptions::store(tx, user, &stored, state.now()).await?;
    }
    let (_, catalog) = state.catalog.current(tx).await?;
    super::subscriptions::refresh(tx, &state.user_cache, user, &catalog, state.now(), super::subscriptions::grace(state)).await
}
