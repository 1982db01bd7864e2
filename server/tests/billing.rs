//! Billing through the real router on a real Postgres: Stripe webhooks built from fixtures in
//! Stripe's documented event shapes at the pinned API version (tests/fixtures/stripe), signed
//! here with a test secret; signature failures, replays, every handled type, out-of-order
//! delivery (proptest), unknown customers, two real server processes receiving the same events
//! at once, Checkout/Portal/cancellation against a fake Stripe API on loopback, credit grants.
//!
//! `stripe-mock` is not used: it is a Go program fetched from GitHub, and this environment
//! installs nothing from the network; the fake below checks the form-encoded requests as
//! Stripe's API reference documents them.
#![allow(clippy::type_complexity, clippy::too_many_arguments)]

mod common;
#[path = "common/receiver.rs"]
mod receiver;

use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use common::*;
use proptest::prelude::*;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use tally_server::billing::signature::sign;
use uuid::Uuid;

const WHSEC: &str = "whsec_test_0123456789abcdef";
const PRICE: &str = "price_pro_monthly";

/// The test catalog plus included credits on pro and a credits feature everywhere.
const BILLING_CATALOG: &str = r#"{"plans": [
  {"id": "free", "features": {
    "ai_chat": {"type": "metered", "limit": 5, "period": "month", "enforcement": "hard"},
    "images":  {"type": "credits", "cost": 10}}},
  {"id": "pro", "included_credits": {"amount": 100, "rollover": false}, "features": {
    "ai_chat": {"type": "metered", "limit": 500, "period": "month"},
    "images":  {"type": "credits", "cost": 10}}},
  {"id": "team", "included_credits": {"amount": 1000, "rollover": true}, "features": {
    "ai_chat": {"type": "metered", "limit": null, "period": "month"},
    "images":  {"type": "credits", "cost": 10}}}]}"#;

async fn billing_app(f: impl FnOnce(&mut tally_server::Config)) -> Option<TestApp> {
    app_with(|c| {
        let plans = c.data_dir.join("billing-plans.json");
        std::fs::write(&plans, BILLING_CATALOG).unwrap();
        c.plans_file = Some(plans);
        c.stripe_webhook_secret = Some(WHSEC.into());
        c.stripe_prices = Some(format!("{PRICE}=pro,price_team_yearly=team"));
        f(c)
    })
    .await
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/stripe/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn secs(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

/// Names of one customer's world, so several can share one database.
#[derive(Clone)]
struct World {
    customer: String,
    tag: String,
}

impl World {
    fn new() -> World {
        let tag = Uuid::new_v4().simple().to_string()[..10].to_string();
        World { customer: format!("cus_{tag}"), tag }
    }
    fn sub(&self, n: &str) -> String {
        format!("sub_{n}_{}", self.tag)
    }
    fn inv(&self, n: &str) -> String {
        format!("in_{n}_{}", self.tag)
    }
    fn evt(&self, n: &str) -> String {
        format!("evt_{n}_{}", self.tag)
    }

    fn checkout(&self, id: &str, client_reference_id: Option<&str>, email: &str, at: DateTime<Utc>) -> Value {
        let mut e = fixture("checkout.session.completed");
        e["id"] = json!(self.evt(id));
        e["created"] = json!(secs(at));
        let o = &mut e["data"]["object"];
        o["client_reference_id"] = json!(client_reference_id);
        o["customer"] = json!(self.customer);
        o["customer_details"]["email"] = json!(email);
        o["subscription"] = json!(self.sub("a"));
        e
    }

    #[allow(clippy::too_many_arguments)]
    fn subscription(
        &self,
        kind: &str,
        id: &str,
        sub: &str,
        status: &str,
        at: DateTime<Utc>,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        price: &str,
    ) -> Value {
        let mut e = fixture("customer.subscription.created");
        e["id"] = json!(self.evt(id));
        e["type"] = json!(format!("customer.subscription.{kind}"));
        e["created"] = json!(secs(at));
        let o = &mut e["data"]["object"];
        o["id"] = json!(self.sub(sub));
        o["customer"] = json!(self.customer);
        o["status"] = json!(status);
        o["items"]["data"][0]["current_period_start"] = json!(secs(start));
        o["items"]["data"][0]["current_period_end"] = json!(secs(end));
        o["items"]["data"][0]["price"]["id"] = json!(price);
        o["items"]["data"][0]["subscription"] = json!(self.sub(sub));
        if status == "canceled" {
            o["canceled_at"] = json!(secs(at));
            o["ended_at"] = json!(secs(at));
        }
        e
    }

    fn invoice(&self, paid: bool, id: &str, inv: &str, sub: &str, at: DateTime<Utc>, start: DateTime<Utc>, end: DateTime<Utc>) -> Value {
        let mut e = fixture(if paid { "invoice.payment_succeeded" } else { "invoice.payment_failed" });
        e["id"] = json!(self.evt(id));
        e["created"] = json!(secs(at));
        let o = &mut e["data"]["object"];
        o["id"] = json!(self.inv(inv));
        o["customer"] = json!(self.customer);
        o["created"] = json!(secs(at));
        o["parent"]["subscription_details"]["subscription"] = json!(self.sub(sub));
        o["lines"]["data"][0]["parent"]["subscription_item_details"]["subscription"] = json!(self.sub(sub));
        o["lines"]["data"][0]["period"] = json!({"start": secs(start), "end": secs(end)});
        e
    }
}

impl TestApp {
    async fn webhook_at(&self, body: &Value, t: i64) -> (StatusCode, Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        let sig = format!("t={t},v1={}", sign(WHSEC, t, &bytes));
        let (s, v, _) = self.raw("POST", "/v1/webhooks/stripe", None, bytes, &[("stripe-signature", &sig)]).await;
        (s, v)
    }
    async fn webhook(&self, body: &Value) -> (StatusCode, Value) {
        self.webhook_at(body, tally_core::Clock::now(&*self.clock).timestamp()).await
    }
    async fn ok(&self, body: &Value) -> Value {
        let (s, v) = self.webhook(body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }
    async fn user_id(&self, bearer: &str) -> String {
        let (s, me) = self.call("GET", "/v1/me", Some(bearer), None).await;
        assert_eq!(s, StatusCode::OK);
        me["id"].as_str().or(me["user_id"].as_str()).unwrap().to_string()
    }
    async fn ents(&self, bearer: &str) -> Value {
        let (s, v) = self.call("GET", "/v1/entitlements", Some(bearer), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }
    async fn billing(&self, bearer: &str) -> Value {
        let (s, v) = self.call("GET", "/v1/billing", Some(bearer), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }
    async fn ver(&self, uid: &str) -> i64 {
        self.scalar(&format!("SELECT ver FROM users WHERE user_id = '{uid}'")).await
    }
}

#[tokio::test]
async fn bad_signatures_stale_timestamps_and_malformed_bodies_are_400_and_change_nothing() {
    let a = app_or_skip!(billing_app(|_| {}).await);
    let w = World::new();
    let body = serde_json::to_vec(&w.checkout("c", None, "x@example.com", Utc::now())).unwrap();
    // The server's clock stands still, so 301 s is 301 s however slow the machine is.
    let now = a.clock.freeze().timestamp();
    let good = sign(WHSEC, now, &body);
    let cases: Vec<(Vec<(&str, String)>, Vec<u8>, &str)> = vec![
        (vec![], body.clone(), "missing_signature"),
        (vec![("stripe-signature", format!("t={now},v1={}", "ab".repeat(32)))], body.clone(), "invalid_signature"),
        (vec![("stripe-signature", format!("t={now},v1={}", sign("whsec_other", now, &body)))], body.clone(), "invalid_signature"),
        (vec![("stripe-signature", format!("v1={good}"))], body.clone(), "malformed_signature"),
        (vec![("stripe-signature", format!("t={now}"))], body.clone(), "malformed_signature"),
        (vec![("stripe-signature", "garbage".into())], body.clone(), "malformed_signature"),
        // The body changed after signing (one byte).
        (vec![("stripe-signature", format!("t={now},v1={good}"))], [&body[..body.len() - 1], b" "].concat(), "invalid_signature"),
        (vec![("stripe-signature", format!("t={},v1={}", now - 301, sign(WHSEC, now - 301, &body)))], body.clone(), "stale_signature"),
        (vec![("stripe-signature", format!("t={},v1={}", now + 301, sign(WHSEC, now + 301, &body)))], body.clone(), "stale_signature"),
        (vec![("stripe-signature", format!("t={now},v1={}", sign(WHSEC, now, b"{not json")))], b"{not json".to_vec(), "malformed_json"),
        (
            vec![("stripe-signature", format!("t={now},v1={}", sign(WHSEC, now, br#"{"id":"evt_x"}"#)))],
            br#"{"id":"evt_x"}"#.to_vec(),
            "invalid_event",
        ),
    ];
    for (headers, b, code) in cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (s, v, _) = a.raw("POST", "/v1/webhooks/stripe", None, b, &h).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some(code)), "{headers:?}: {v}");
    }
    // Several v1 (Stripe rolling the secret): one matching is enough; within the tolerance is fine.
    let t = now - 299;
    let sig = format!("t={t},v1={},v1={},v0=00", sign("whsec_old", t, &body), sign(WHSEC, t, &body));
    let (s, v, _) = a.raw("POST", "/v1/webhooks/stripe", None, body.clone(), &[("stripe-signature", &sig)]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(a.count("stripe_events").await, 1, "only the good one was stored");
    assert_eq!(a.count("stripe_customers").await, 0);
}

#[tokio::test]
async fn tolerance_is_configurable_and_unconfigured_webhooks_are_404() {
    let a = app_or_skip!(billing_app(|c| c.stripe_webhook_tolerance_secs = 10).await);
    let w = World::new();
    let e = w.checkout("c", None, "x@example.com", Utc::now());
    let (s, v) = a.webhook_at(&e, Utc::now().timestamp() - 60).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("stale_signature")));
    let b = app_or_skip!(app().await);
    let (s, _) = b.webhook(&e).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn checkout_and_subscription_make_pro_replays_change_nothing_and_cancellation_returns_to_free() {
    let a = app_or_skip!(billing_app(|_| {}).await);
    let t = token_with("buyer", json!({"email": "buyer@example.com", "email_verified": true}));
    let uid = a.user_id(&t).await;
    assert_eq!(a.ents(&t).await["plan"], "free");
    let w = World::new();
    let now = Utc::now();
    let (start, end) = (now - Duration::days(1), now + Duration::days(29));
    let v = a.ok(&w.checkout("c", Some(&uid), "buyer@example.com", now)).await;
    assert_eq!(v["outcome"], "applied:linked_by_client_reference_id");
    let created = w.subscription("created", "s1", "a", "active", now, start, end, PRICE);
    let v = a.ok(&created).await;
    assert_eq!((v["outcome"].as_str(), v["duplicate"].as_bool()), (Some("applied"), Some(false)));
    let e = a.ents(&t).await;
    assert_eq!(
        (e["plan"].as_str(), e["status"].as_str(), e["access_reason"].as_str()),
        (Some("pro"), Some("active"), Some("subscription"))
    );
    assert_eq!(e["period_end"].as_str().map(|s| s.parse::<DateTime<Utc>>().unwrap().timestamp()), Some(end.timestamp()));
    // Replay: 200, marked duplicate, nothing changes (not even the version).
    let ver = a.ver(&uid).await;
    let v = a.ok(&created).await;
    assert_eq!((v["duplicate"].as_bool(), v["outcome"].as_str()), (Some(true), Some("applied")));
    assert_eq!(a.ver(&uid).await, ver);
    assert_eq!(a.count("stripe_events").await, 2);
    // cancel_at_period_end from an update.
    let mut upd = w.subscription("updated", "s2", "a", "active", now + Duration::seconds(5), start, end, PRICE);
    upd["data"]["object"]["cancel_at_period_end"] = json!(true);
    a.ok(&upd).await;
    let b = a.billing(&t).await;
    assert_eq!((b["plan"].as_str(), b["status"].as_str(), b["cancel_at_period_end"].as_bool()), (Some("pro"), Some("active"), Some(true)));
    assert!(a.ver(&uid).await > ver, "an entitlement change bumps the version");
    // Deleted → free; a late `updated` (older created) stays canceled; a newer one too.
    a.ok(&w.subscription("deleted", "s3", "a", "canceled", now + Duration::seconds(10), start, end, PRICE)).await;
    assert_eq!(a.ents(&t).await["plan"], "free");
    let v = a.ok(&w.subscription("updated", "s4", "a", "active", now + Duration::seconds(7), start, end, PRICE)).await;
    assert_eq!(v["outcome"], "ignored:stale");
    let v = a.ok(&w.subscription("updated", "s5", "a", "active", now + Duration::seconds(20), start, end, PRICE)).await;
    assert_eq!(v["outcome"], "ignored:stale", "canceled is terminal for a subscription id");
    assert_eq!(a.ents(&t).await["plan"], "free");
    // A new subscription id starts a new life.
    a.ok(&w.subscription(
        "created",
        "s6",
        "b",
        "trialing",
        now + Duration::seconds(30),
        now,
        now + Duration::days(14),
        "price_team_yearly",
    ))
    .await;
    let e = a.ents(&t).await;
    assert_eq!((e["plan"].as_str(), e["access_reason"].as_str()), (Some("team"), Some("trial")));
    // Unknown types are stored and answered 200.
    let mut unk = fixture("customer.created");
    unk["id"] = json!(w.evt("unknown"));
    let v = a.ok(&unk).await;
    assert_eq!(v["outcome"], "unhandled_type");
    assert_eq!(
        a.scalar(&format!("SELECT count(*) FROM stripe_events WHERE event_id = '{}' AND type = 'customer.created'", w.evt("unknown")))
            .await,
        1
    );
}

#[tokio::test]
async fn statuses_map_as_designed() {
    let a = app_or_skip!(billing_app(|_| {}).await);
    let now = Utc::now();
    for (i, (stripe, ours, plan)) in [
        ("incomplete", "none", "free"),
        ("incomplete_expired", "none", "free"),
        ("unpaid", "past_due", "pro"),
        ("paused", "canceled", "free"),
        ("trialing", "trialing", "pro"),
    ]
    .into_iter()
    .enumerate()
    {
        let t = token(&format!("map{i}"));
        let uid = a.user_id(&t).await;
        let w = World::new();
        a.ok(&w.checkout("c", Some(&uid), "m@example.com", now)).await;
        a.ok(&w.subscription("created", "s", "a", stripe, now, now, now + Duration::days(30), PRICE)).await;
        let e = a.ents(&t).await;
        assert_eq!((e["status"].as_str(), e["plan"].as_str()), (Some(ours), Some(plan)), "{stripe}");
    }
}

#[tokio::test]
async fn invoices_record_payments_grant_credits_once_and_failures_are_past_due_within_grace() {
    let a = app_or_skip!(billing_app(|_| {}).await);
    let t = token("payer");
    let uid = a.user_id(&t).await;
    let w = World::new();
    let now = Utc::now();
    let (start, end) = (now - Duration::days(1), now + Duration::days(29));
    a.ok(&w.checkout("c", Some(&uid), "p@example.com", now)).await;
    a.ok(&w.subscription("created", "s1", "a", "active", now, start, end, PRICE)).await;
    let paid = w.invoice(true, "i1", "1", "a", now, start, end);
    let v = a.ok(&paid).await;
    assert_eq!(v["outcome"], "applied:credits_granted:100");
    a.ok(&paid).await; // replay
    // The same invoice again under another event id (Stripe may resend): still granted once.
    let mut again = paid.clone();
    again["id"] = json!(w.evt("i1-again"));
    assert_eq!(a.ok(&again).await["outcome"], "applied");
    let e = a.ents(&t).await;
    assert_eq!(e["credit_balance"], 100);
    // Spend 3 images (cost 10) through sync: the balance and the token's grants follow.
    let (s, resp) = a.sync(&t, "d1", vec![event(Uuid::now_v7(), "images", 3)]).await;
    assert_eq!(s, StatusCode::OK, "{resp}");
    let e = a.ents(&t).await;
    assert_eq!(e["credit_balance"], 70);
    let claims = decode_claims(resp["entitlements_token"].as_str().unwrap());
    assert_eq!(claims["credit_grants"][0]["remaining"], 70, "{claims}");
    assert_eq!(claims["credit_grants"][0]["id"], format!("inv:{}", w.inv("1")));
    assert_eq!(
        claims["credit_grants"][0]["expires_at"].as_str().map(|s| s.parse::<DateTime<Utc>>().unwrap().timestamp()),
        Some(end.timestamp())
    );
    // Payment history.
    let b = a.billing(&t).await;
    assert_eq!(b["payments"][0]["invoice_id"], w.inv("1"));
    assert_eq!(
        (b["payments"][0]["amount"].as_i64(), b["payments"][0]["currency"].as_str(), b["payments"][0]["status"].as_str()),
        (Some(1200), Some("usd"), Some("paid"))
    );
    // The renewal fails: past_due, still pro during the grace period (and counted as a failed payment).
    let failed_before = metric(&a, "tally_payments_failed_total{store=\"stripe\"}").await;
    let failed = w.invoice(false, "f2", "2", "a", now + Duration::seconds(5), end, end + Duration::days(30));
    assert_eq!(a.ok(&failed).await["outcome"], "applied:past_due");
    assert!(metric(&a, "tally_payments_failed_total{store=\"stripe\"}").await >= failed_before + 1.0);
    assert_eq!(metric(&a, "tally_subscriptions{plan=\"pro\",store=\"stripe\",status=\"past_due\"}").await, 1.0);
    let e = a.ents(&t).await;
    assert_eq!(
        (e["status"].as_str(), e["plan"].as_str(), e["access_reason"].as_str()),
        (Some("past_due"), Some("pro"), Some("subscription"))
    );
    let b = a.billing(&t).await;
    assert_eq!(b["payments"].as_array().unwrap().len(), 2);
    assert!(b["past_due_since"].is_string());
    // It is paid on retry: active again.
    a.ok(&w.invoice(true, "p2", "2", "a", now + Duration::seconds(9), end, end + Duration::days(30))).await;
    let e = a.ents(&t).await;
    assert_eq!((e["status"].as_str(), e["plan"].as_str()), (Some("active"), Some("pro")));
    assert_eq!(e["credit_balance"], 170, "the renewal's credits (valid from its period start) are granted once");
    // charge.refunded is recorded in the history.
    let mut refund = fixture("charge.refunded");
    refund["id"] = json!(w.evt("r1"));
    refund["data"]["object"]["customer"] = json!(w.customer);
    assert_eq!(a.ok(&refund).await["outcome"], "applied");
    let b = a.billing(&t).await;
    assert!(b["payments"].as_array().unwrap().iter().any(|p| p["status"] == "refunded" && p["amount_refunded"] == 1200), "{b}");
}

#[tokio::test]
async fn past_due_beyond_grace_is_free() {
    let a = app_or_skip!(billing_app(|c| c.past_due_grace_secs = 0).await);
    let t = token("late");
    let uid = a.user_id(&t).await;
    let w = World::new();
    let now = Utc::now();
    a.ok(&w.checkout("c", Some(&uid), "l@example.com", now)).await;
    a.ok(&w.subscription("created", "s1", "a", "active", now - Duration::seconds(10), now, now + Duration::days(30), PRICE)).await;
    a.ok(&w.invoice(false, "f1", "1", "a", now - Duration::seconds(5), now, now + Duration::days(30))).await;
    let e = a.ents(&t).await;
    assert_eq!((e["status"].as_str(), e["plan"].as_str(), e["access_reason"].as_str()), (Some("past_due"), Some("free"), Some("free")));
}

#[tokio::test]
async fn past_due_grace_ends_on_the_server_clock_without_sleeping() {
    let a = app_or_skip!(billing_app(|c| c.past_due_grace_secs = 3600).await);
    let t = token("grace");
    let uid = a.user_id(&t).await;
    let w = World::new();
    let now = Utc::now();
    a.ok(&w.checkout("c", Some(&uid), "g@example.com", now)).await;
    a.ok(&w.subscription("created", "s1", "a", "active", now - Duration::seconds(10), now, now + Duration::days(30), PRICE)).await;
    a.ok(&w.invoice(false, "f1", "1", "a", now - Duration::seconds(5), now, now + Duration::days(30))).await;
    let e = a.ents(&t).await;
    assert_eq!((e["status"].as_str(), e["plan"].as_str()), (Some("past_due"), Some("pro")), "within the grace: {e}");
    a.clock.advance(Duration::seconds(3590));
    assert_eq!(a.ents(&t).await["plan"], "pro", "10 s before the end of the grace");
    a.clock.advance(Duration::seconds(20));
    let e = a.ents(&t).await;
    assert_eq!((e["status"].as_str(), e["plan"].as_str(), e["access_reason"].as_str()), (Some("past_due"), Some("free"), Some("free")));
}

#[tokio::test]
async fn events_for_unknown_customers_wait_for_the_link_and_email_links_only_when_verified() {
    let a = app_or_skip!(billing_app(|_| {}).await);
    let t = token_with("early", json!({"email": "early@example.com", "email_verified": true}));
    a.user_id(&t).await;
    let w = World::new();
    let now = Utc::now();
    let v = a.ok(&w.subscription("created", "s1", "a", "active", now, now, now + Duration::days(30), PRICE)).await;
    assert_eq!(v["outcome"], "pending_customer");
    let v = a.ok(&w.invoice(true, "i1", "1", "a", now, now, now + Duration::days(30))).await;
    assert_eq!(v["outcome"], "pending_customer");
    assert_eq!(a.ents(&t).await["plan"], "free");
    // Linked by the verified email (no client_reference_id): the waiting events apply.
    let v = a.ok(&w.checkout("c", None, "EARLY@example.com", now + Duration::seconds(2))).await;
    assert_eq!(v["outcome"], "applied:linked_by_email,2_pending_applied");
    let e = a.ents(&t).await;
    assert_eq!((e["plan"].as_str(), e["credit_balance"].as_i64()), (Some("pro"), Some(100)));
    assert_eq!(a.count("stripe_pending_events").await, 0);
    // An unverified email does not link.
    let t2 = token_with("unverified", json!({"email": "unv@example.com", "email_verified": false}));
    a.user_id(&t2).await;
    let w2 = World::new();
    let v = a.ok(&w2.checkout("c", None, "unv@example.com", now)).await;
    assert_eq!(v["outcome"], "ignored:no_matching_user");
    assert_eq!(a.scalar(&format!("SELECT count(*) FROM stripe_customers WHERE customer_id = '{}'", w2.customer)).await, 0);
}

/// A realistic life: subscription A (incomplete → active → renewed → deleted), then B
/// (created → active → paid → renewal failed), with invoices and the checkout link.
fn realistic(w: &World, uid: &str, base: DateTime<Utc>) -> Vec<Value> {
    let d = Duration::days;
    let s = Duration::seconds;
    let (a1, a2, b1) = (base, base + d(30), base + d(40));
    vec![
        w.subscription("created", "1", "a", "incomplete", base, a1, a2, PRICE),
        w.checkout("2", Some(uid), "x@example.com", base + s(1)),
        w.subscription("updated", "3", "a", "active", base + s(1), a1, a2, PRICE),
        w.invoice(true, "4", "a1", "a", base + s(1), a1, a2),
        w.subscription("updated", "5", "a", "active", a2, a2, a2 + d(30), PRICE),
        w.invoice(true, "6", "a2", "a", a2, a2, a2 + d(30)),
        w.subscription("deleted", "7", "a", "canceled", a2 + d(5), a2, a2 + d(30), PRICE),
        w.subscription("updated", "7b", "a", "active", a2 + d(5), a2, a2 + d(30), PRICE), // same second as the deletion
        w.subscription("created", "8", "b", "incomplete", b1, b1, b1 + d(30), PRICE),
        w.subscription("updated", "9", "b", "active", b1, b1, b1 + d(30), PRICE),
        w.invoice(true, "10", "b1", "b", b1, b1, b1 + d(30)),
        w.subscription("updated", "11", "b", "past_due", b1 + d(30), b1 + d(30), b1 + d(60), PRICE),
        w.invoice(false, "12", "b2", "b", b1 + d(30), b1 + d(30), b1 + d(60)),
        w.invoice(false, "13", "b2", "b", b1 + d(33), b1 + d(30), b1 + d(60)), // retry failed too
    ]
}

async fn final_state(a: &TestApp, uid: &str, tag: &str) -> Value {
    let v = final_state_raw(a, uid).await;
    serde_json::from_str(&v.to_string().replace(tag, "TAG")).unwrap()
}

async fn final_state_raw(a: &TestApp, uid: &str) -> Value {
    let (client, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let q = |sql: &str| sql.replace("$U", uid);
    let sub = client
        .query_one(&q("SELECT plan, status, period_start::text, period_end::text, past_due_since::text, provider_subscription_id FROM subscriptions WHERE user_id = '$U'"), &[])
        .await
        .unwrap();
    let subs: Vec<String> = client
        .query(&q("SELECT concat_ws('|', subscription_id, status, period_end::text, state_event_id, cancel_at_period_end) FROM stripe_subscriptions WHERE user_id = '$U' ORDER BY 1"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let pays: Vec<String> = client
        .query(&q("SELECT concat_ws('|', invoice_id, status, amount, first_failed_at::text, paid_at::text) FROM stripe_payments WHERE user_id = '$U' ORDER BY 1"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let grants: Vec<String> = client
        .query(&q("SELECT concat_ws('|', grant_id, amount, valid_from::text, expires_at::text) FROM credit_grants WHERE user_id = '$U' ORDER BY 1"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    json!({
        "sub": [sub.get::<_, String>(0), sub.get::<_, String>(1), sub.get::<_, Option<String>>(2).unwrap_or_default(), sub.get::<_, Option<String>>(3).unwrap_or_default(),
                sub.get::<_, Option<String>>(4).unwrap_or_default(), sub.get::<_, Option<String>>(5).unwrap_or_default()],
        "subs": subs.iter().map(|s| s.split('|').enumerate().filter(|(i, _)| *i != 0).map(|(_, p)| p.to_string()).collect::<Vec<_>>().join("|")).collect::<Vec<_>>(),
        "payments": pays.iter().map(|s| s.split_once('|').map(|x| x.1.to_string()).unwrap_or_default()).collect::<Vec<_>>(),
        "grants": grants.iter().map(|s| s.split_once('|').map(|x| x.1.to_string()).unwrap_or_default()).collect::<Vec<_>>(),
        "pending": client.query_one(&q("SELECT count(*) FROM stripe_pending_events p JOIN stripe_customers c USING (customer_id) WHERE c.user_id = '$U'"), &[]).await.unwrap().get::<_, i64>(0),
    })
}

#[test]
fn out_of_order_delivery_always_reaches_the_same_state_proptest() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(a) = rt.block_on(billing_app(|_| {})) else { return };
    let base = Utc::now() - Duration::days(80);
    let base = DateTime::from_timestamp(base.timestamp(), 0).unwrap();
    // In order first: the reference.
    let reference = rt.block_on(async {
        let t = token("ref");
        let uid = a.user_id(&t).await;
        let w = World::new();
        for e in realistic(&w, &uid, base) {
            a.ok(&e).await;
        }
        let st = final_state(&a, &uid, &w.tag).await;
        let e = a.ents(&t).await;
        (st, e["plan"].clone(), e["status"].clone())
    });
    assert_eq!(reference.0["sub"][1], "past_due", "{}", reference.0);
    assert_eq!(reference.0["subs"].as_array().unwrap().len(), 2);
    assert_eq!(reference.0["grants"].as_array().unwrap().len(), 3, "a1, a2, b1 paid: credits once each");
    let n = realistic(&World::new(), "u", base).len();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 24, ..ProptestConfig::default() });
    let strategy = (Just((0..n).collect::<Vec<_>>()).prop_shuffle(), proptest::collection::vec(0..n, 0..5));
    runner
        .run(&strategy, |(order, dups)| {
            let got = rt.block_on(async {
                let sub = format!("shuffle-{}", Uuid::new_v4());
                let t = token(&sub);
                let uid = a.user_id(&t).await;
                let w = World::new();
                let evs = realistic(&w, &uid, base);
                for i in order.iter().chain(dups.iter()) {
                    a.ok(&evs[*i]).await;
                }
                let st = final_state(&a, &uid, &w.tag).await;
                let e = a.ents(&t).await;
                (st, e["plan"].clone(), e["status"].clone())
            });
            prop_assert_eq!(&got, &reference);
            Ok(())
        })
        .unwrap();
}

/// One sample of `GET /metrics` (0 when absent).
async fn metric(a: &TestApp, series: &str) -> f64 {
    let req = axum::http::Request::builder().uri("/metrics").body(axum::body::Body::empty()).unwrap();
    let body = tower::ServiceExt::oneshot(a.router.clone(), req).await.unwrap().into_body();
    let text = String::from_utf8(axum::body::to_bytes(body, usize::MAX).await.unwrap().to_vec()).unwrap();
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

fn decode_claims(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[tokio::test]
async fn admin_credit_grants_fifo_overspend_and_revocation() {
    let a = app_or_skip!(billing_app(|_| {}).await);
    let admin = token("root-admin");
    let t = token("spender");
    a.user_id(&t).await;
    let until = Utc::now() + Duration::days(7);
    let (s, g) = a
        .call(
            "POST",
            "/v1/admin/grants",
            Some(&admin),
            Some(json!({"subject": "spender", "credits": 15, "until": until, "reason": "promo"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{g}");
    let gid = g["id"].as_str().unwrap().to_string();
    let (s, g2) =
        a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "spender", "credits": 5, "reason": "forever"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{g2}");
    assert_eq!(a.ents(&t).await["credit_balance"], 20);
    let (s, _) = a
        .call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "spender", "credits": 5, "plan": "pro", "reason": "x"})))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "spender", "credits": 0, "reason": "x"}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    // Spend 1 image (10): drawn from the grant expiring first.
    a.sync(&t, "d1", vec![event(Uuid::now_v7(), "images", 1)]).await;
    let e = a.ents(&t).await;
    let grants: Vec<(String, i64)> = e["credit_grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["id"].as_str().unwrap().into(), g["remaining"].as_i64().unwrap()))
        .collect();
    assert_eq!(grants, vec![(gid.clone(), 5), (g2["id"].as_str().unwrap().into(), 5)]);
    // Offline overspend (two devices): the balance goes negative, reported as over_limit_by.
    a.sync(&t, "d2", vec![event(Uuid::now_v7(), "images", 2)]).await;
    let e = a.ents(&t).await;
    assert_eq!(e["credit_balance"], -10);
    let (s, d) = a.call("POST", "/v1/check", Some(&t), Some(json!({"feature": "images", "amount": 1}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (d["allowed"].as_bool(), d["reason"].as_str(), d["over_limit_by"].as_u64()),
        (Some(false), Some("insufficient_credits"), Some(10))
    );
    assert_eq!(a.billing(&t).await["credit_over_limit_by"], 10);
    // The next grant pays the debt.
    a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "spender", "credits": 25, "reason": "topup"}))).await;
    assert_eq!(a.ents(&t).await["credit_balance"], 15);
    // Revocation of one credit grant, then of all.
    let (s, v) = a.call("POST", "/v1/admin/grants/revoke", Some(&admin), Some(json!({"subject": "spender", "grant_id": gid}))).await;
    assert_eq!((s, v["revoked"].as_u64()), (StatusCode::OK, Some(1)));
    assert_eq!(a.ents(&t).await["credit_balance"], 0, "its 15 credits are gone; the 30 spent now come from the other two");
    let (s, v) = a.call("POST", "/v1/admin/grants/revoke", Some(&admin), Some(json!({"subject": "spender", "credits": true}))).await;
    assert_eq!((s, v["revoked"].as_u64()), (StatusCode::OK, Some(2)));
    assert_eq!(a.ents(&t).await["credit_balance"], -30);
    let (s, _) = a.call("POST", "/v1/admin/grants/revoke", Some(&admin), Some(json!({"subject": "spender", "grant_id": "adm:nope"}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn credit_revocations_are_stamped_by_the_servers_clock() {
    let a = app_or_skip!(billing_app(|_| {}).await);
    let admin = token("root-admin");
    let t = token("stamped");
    let uid = Uuid::parse_str(&a.user_id(&t).await).unwrap();
    let mut ids = Vec::new();
    for credits in [5, 7, 9] {
        let (s, g) = a
            .call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "stamped", "credits": credits, "reason": "gift"})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{g}");
        ids.push(g["id"].as_str().unwrap().to_string());
    }
    // Far from the database's own clock: one grant by id, then the rest a day later.
    a.clock.advance(Duration::days(40));
    let first = a.clock.freeze();
    let (s, v) = a.call("POST", "/v1/admin/grants/revoke", Some(&admin), Some(json!({"subject": "stamped", "grant_id": ids[0]}))).await;
    assert_eq!((s, v["revoked"].as_u64()), (StatusCode::OK, Some(1)), "{v}");
    a.clock.advance(Duration::days(1));
    let rest = tally_core::Clock::now(&*a.clock);
    let (s, v) = a.call("POST", "/v1/admin/grants/revoke", Some(&admin), Some(json!({"subject": "stamped", "credits": true}))).await;
    assert_eq!((s, v["revoked"].as_u64()), (StatusCode::OK, Some(2)), "{v}");
    let client = a.state.pool.get().await.unwrap();
    let rows = client.query("SELECT grant_id, revoked_at FROM credit_grants WHERE user_id = $1", &[&uid]).await.unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        let (id, revoked_at): (String, Option<DateTime<Utc>>) = (r.get(0), r.get(1));
        let want = if id == ids[0] { first } else { rest };
        assert_eq!(revoked_at.map(|t| t.timestamp_micros()), Some(want.timestamp_micros()), "{id}");
    }
}

#[tokio::test]
async fn force_entitlements_signs_a_fresh_token_and_changes_reach_the_next_sync() {
    let a = app_or_skip!(billing_app(|_| {}).await);
    let t = token("forcer");
    let uid = a.user_id(&t).await;
    let sync = |force: bool| {
        let body = json!({"protocol": 1, "device_id": "d", "events": [], "force_entitlements": force});
        let a = &a;
        let t = t.clone();
        async move {
            let (s, v) = a.call("POST", "/v1/sync", Some(&t), Some(body)).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["entitlements_token"].as_str().unwrap().to_string()
        }
    };
    let t1 = sync(false).await;
    // The next token's `iat` (whole seconds) is later: move the server's clock, don't sleep.
    a.clock.advance(Duration::seconds(2));
    assert_eq!(sync(false).await, t1, "unchanged entitlements: the cached token");
    let t3 = sync(true).await;
    assert_ne!(t3, t1, "force_entitlements: a newly signed token");
    assert!(decode_claims(&t3)["iat"].as_i64() > decode_claims(&t1)["iat"].as_i64());
    let w = World::new();
    let now = Utc::now();
    a.ok(&w.checkout("c", Some(&uid), "f@example.com", now)).await;
    a.ok(&w.subscription("created", "s", "a", "active", now, now, now + Duration::days(30), PRICE)).await;
    let t4 = sync(false).await;
    let c = decode_claims(&t4);
    assert_eq!((c["plan"].as_str(), c["status"].as_str()), (Some("pro"), Some("active")));
    assert!(c["ver"].as_u64() > decode_claims(&t1)["ver"].as_u64());
}

// ---------------------------------------------------------------------------------------------
// A fake Stripe API on loopback.

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: axum::http::HeaderMap,
    form: Vec<(String, String)>,
}

struct FakeStripe {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    fail_deletes: Arc<std::sync::atomic::AtomicBool>,
}

async fn fake_stripe() -> FakeStripe {
    use axum::extract::State as S;
    use axum::response::IntoResponse;
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    async fn handle(
        S((seen, fail)): S<(Arc<Mutex<Vec<Seen>>>, Arc<std::sync::atomic::AtomicBool>)>,
        req: axum::extract::Request,
    ) -> axum::response::Response {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        let form: Vec<(String, String)> = url_decode_form(&bytes);
        let path = parts.uri.path().to_string();
        seen.lock().unwrap().push(Seen { method: parts.method.to_string(), path: path.clone(), headers: parts.headers.clone(), form });
        let authed = parts.headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer sk_test_fake");
        if !authed {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}})),
            )
                .into_response();
        }
        match (parts.method.as_str(), path.as_str()) {
            ("POST", "/v1/checkout/sessions") => axum::Json(
                json!({"id": "cs_test_fake123", "object": "checkout.session", "url": "https://checkout.stripe.com/c/pay/cs_test_fake123"}),
            )
            .into_response(),
            ("POST", "/v1/billing_portal/sessions") => axum::Json(
                json!({"id": "bps_fake123", "object": "billing_portal.session", "url": "https://billing.stripe.com/p/session/test_fake"}),
            )
            .into_response(),
            ("DELETE", p) if p.starts_with("/v1/subscriptions/") => {
                if fail.load(std::sync::atomic::Ordering::SeqCst) {
                    (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": {"type": "api_error", "message": "boom"}})))
                        .into_response()
                } else {
                    axum::Json(json!({"id": p.trim_start_matches("/v1/subscriptions/"), "object": "subscription", "status": "canceled"}))
                        .into_response()
                }
            }
            _ => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": {"type": "invalid_request_error", "message": "Unrecognized request URL"}})),
            )
                .into_response(),
        }
    }
    let router = axum::Router::new().fallback(handle).with_state((seen.clone(), fail.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    FakeStripe { url, seen, fail_deletes: fail }
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space, `%XX` a byte).
fn url_decode_form(b: &[u8]) -> Vec<(String, String)> {
    fn dec(s: &str) -> String {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }
    let s = std::str::from_utf8(b).unwrap();
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map(|(k, v)| (dec(k), dec(v))).unwrap_or((dec(p), String::new())))
        .collect()
}

#[tokio::test]
async fn checkout_and_portal_call_stripe_form_encoded_with_version_and_idempotency_keys() {
    let fake = fake_stripe().await;
    let base = fake.url.clone();
    let a = app_or_skip!(
        billing_app(move |c| {
            c.stripe_secret_key = Some("sk_test_fake".into());
            c.stripe_api_base = base;
        })
        .await
    );
    let t = token_with("shopper", json!({"email": "shopper@example.com", "email_verified": true}));
    let uid = a.user_id(&t).await;
    let body = json!({"price_id": PRICE, "success_url": "https://app.example.com/ok?session={CHECKOUT_SESSION_ID}", "cancel_url": "https://app.example.com/no"});
    let (s, v) = a.call("POST", "/v1/billing/checkout", Some(&t), Some(body.clone())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["id"].as_str(), v["url"].as_str()), (Some("cs_test_fake123"), Some("https://checkout.stripe.com/c/pay/cs_test_fake123")));
    let req = fake.seen.lock().unwrap()[0].clone();
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/v1/checkout/sessions"));
    assert_eq!(req.headers["content-type"], "application/x-www-form-urlencoded");
    assert_eq!(req.headers["stripe-version"], "2025-03-31.basil");
    assert_eq!(req.headers["authorization"], "Bearer sk_test_fake");
    let key1 = req.headers["idempotency-key"].to_str().unwrap().to_string();
    let expected: Vec<(String, String)> = [
        ("mode", "subscription"),
        ("line_items[0][price]", PRICE),
        ("line_items[0][quantity]", "1"),
        ("success_url", "https://app.example.com/ok?session={CHECKOUT_SESSION_ID}"),
        ("cancel_url", "https://app.example.com/no"),
        ("client_reference_id", uid.as_str()),
        ("metadata[tally_user_id]", uid.as_str()),
        ("subscription_data[metadata][tally_user_id]", uid.as_str()),
        ("customer_email", "shopper@example.com"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(req.form, expected);
    // A new request, a new idempotency key; a client retry with its Idempotency-Key, the same one.
    a.call("POST", "/v1/billing/checkout", Some(&t), Some(body.clone())).await;
    let bytes = serde_json::to_vec(&body).unwrap();
    a.raw("POST", "/v1/billing/checkout", Some(&t), bytes.clone(), &[("idempotency-key", "retry-1")]).await;
    a.raw("POST", "/v1/billing/checkout", Some(&t), bytes, &[("idempotency-key", "retry-1")]).await;
    let keys: Vec<String> = fake.seen.lock().unwrap().iter().map(|r| r.headers["idempotency-key"].to_str().unwrap().to_string()).collect();
    assert_ne!(keys[1], key1);
    assert_eq!(keys[2], keys[3]);
    assert_ne!(keys[2], keys[1]);
    // Unknown price, bad URL: 422 before calling Stripe.
    let n = fake.seen.lock().unwrap().len();
    let (s, v) = a
        .call(
            "POST",
            "/v1/billing/checkout",
            Some(&t),
            Some(json!({"price_id": "price_nope", "success_url": "https://a/", "cancel_url": "https://a/"})),
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_price")));
    let (s, _) = a
        .call(
            "POST",
            "/v1/billing/checkout",
            Some(&t),
            Some(json!({"price_id": PRICE, "success_url": "javascript:x", "cancel_url": "https://a/"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fake.seen.lock().unwrap().len(), n);
    // Portal: no customer yet → 404; once linked, a session for the customer.
    let (s, _) = a.call("POST", "/v1/billing/portal", Some(&t), Some(json!({"return_url": "https://app.example.com/account"}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let w = World::new();
    a.ok(&w.checkout("c", Some(&uid), "shopper@example.com", Utc::now())).await;
    let (s, v) = a.call("POST", "/v1/billing/portal", Some(&t), Some(json!({"return_url": "https://app.example.com/account"}))).await;
    assert_eq!((s, v["url"].as_str()), (StatusCode::OK, Some("https://billing.stripe.com/p/session/test_fake")), "{v}");
    let req = fake.seen.lock().unwrap().last().unwrap().clone();
    assert_eq!(req.path, "/v1/billing_portal/sessions");
    assert_eq!(
        req.form,
        vec![("customer".to_string(), w.customer.clone()), ("return_url".to_string(), "https://app.example.com/account".to_string())]
    );
    assert!(req.headers.contains_key("idempotency-key") && req.headers["stripe-version"] == "2025-03-31.basil");
    // Checkout for a linked user names the customer instead of the email.
    a.call("POST", "/v1/billing/checkout", Some(&t), Some(body)).await;
    let req = fake.seen.lock().unwrap().last().unwrap().clone();
    assert!(req.form.contains(&("customer".to_string(), w.customer.clone())) && !req.form.iter().any(|(k, _)| k == "customer_email"));
}

#[tokio::test]
async fn delete_me_cancels_the_stripe_subscription_first_and_409_when_it_cannot() {
    let fake = fake_stripe().await;
    let base = fake.url.clone();
    let a = app_or_skip!(
        billing_app(move |c| {
            c.stripe_secret_key = Some("sk_test_fake".into());
            c.stripe_api_base = base;
        })
        .await
    );
    let t = token("leaver");
    let uid = a.user_id(&t).await;
    let w = World::new();
    let now = Utc::now();
    a.ok(&w.checkout("c", Some(&uid), "l@example.com", now)).await;
    a.ok(&w.subscription("created", "s", "a", "active", now, now, now + Duration::days(30), PRICE)).await;
    a.ok(&w.invoice(true, "i", "1", "a", now, now, now + Duration::days(30))).await;
    fake.fail_deletes.store(true, std::sync::atomic::Ordering::SeqCst);
    let (s, v) = a.call("DELETE", "/v1/me", Some(&t), None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("subscription_cancel_failed")), "{v}");
    assert_eq!(a.ents(&t).await["plan"], "pro", "nothing deleted");
    fake.fail_deletes.store(false, std::sync::atomic::Ordering::SeqCst);
    let (s, _) = a.call("DELETE", "/v1/me", Some(&t), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let deletes: Vec<String> = fake.seen.lock().unwrap().iter().filter(|r| r.method == "DELETE").map(|r| r.path.clone()).collect();
    assert_eq!(deletes, vec![format!("/v1/subscriptions/{}", w.sub("a")), format!("/v1/subscriptions/{}", w.sub("a"))]);
    for table in ["stripe_subscriptions", "stripe_payments", "credit_grants", "stripe_customers"] {
        assert_eq!(a.scalar(&format!("SELECT count(*) FROM {table} WHERE user_id = '{uid}'")).await, 0, "{table}");
    }
}

// ---------------------------------------------------------------------------------------------
// Two real server processes on one database.

const BIN: &str = env!("CARGO_BIN_EXE_tally-server");

struct Proc {
    child: std::process::Child,
    base: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(url: &str, dir: &std::path::Path) -> Proc {
    use std::io::BufRead;
    std::fs::create_dir_all(dir).unwrap();
    let plans = dir.join("plans.json");
    std::fs::write(&plans, BILLING_CATALOG).unwrap();
    let mut child = std::process::Command::new(BIN)
        .arg("serve")
        .env("TALLY_DATABASE_URL", url)
        .env("TALLY_LISTEN", "127.0.0.1:0")
        .env("TALLY_JWT_SECRET", SECRET)
        .env("TALLY_DATA_DIR", dir)
        .env("TALLY_PLANS_FILE", &plans)
        .env("TALLY_STRIPE_WEBHOOK_SECRET", WHSEC)
        .env("TALLY_STRIPE_PRICES", format!("{PRICE}=pro"))
        .env("TALLY_RATE_LIMIT_PER_SEC", "100000")
        .env("TALLY_RATE_LIMIT_BURST", "100000")
        .env("TALLY_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().strip_prefix("tally-server listening on ").unwrap().to_string();
    Proc { child, base }
}

#[test]
fn two_replicas_receiving_the_same_events_at_once_apply_each_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(url) = rt.block_on(fresh_db()) else { return };
    let dir = tempfile::tempdir().unwrap();
    // Keys are shared by the replicas (same data dir), as behind a load balancer.
    let p1 = spawn(&url, dir.path());
    let p2 = spawn(&url, dir.path());
    rt.block_on(async {
        let http = reqwest::Client::new();
        let t = token("twin");
        let me: Value = http.get(format!("{}/v1/me", p1.base)).bearer_auth(&t).send().await.unwrap().json().await.unwrap();
        let uid = me["id"].as_str().or(me["user_id"].as_str()).unwrap().to_string();
        let w = World::new();
        let base = DateTime::from_timestamp((Utc::now() - Duration::days(80)).timestamp(), 0).unwrap();
        let events = realistic(&w, &uid, base);
        let mut firsts = 0;
        for e in &events {
            let bytes = serde_json::to_vec(e).unwrap();
            let now = Utc::now().timestamp();
            let sig = format!("t={now},v1={}", sign(WHSEC, now, &bytes));
            let send = |base: String| {
                let http = http.clone();
                let bytes = bytes.clone();
                let sig = sig.clone();
                async move {
                    let r =
                        http.post(format!("{base}/v1/webhooks/stripe")).header("stripe-signature", sig).body(bytes).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    r.json::<Value>().await.unwrap()
                }
            };
            let (r1, r2) = tokio::join!(send(p1.base.clone()), send(p2.base.clone()));
            let fresh = [&r1, &r2].iter().filter(|r| r["duplicate"] == false).count();
            assert_eq!(fresh, 1, "{r1} {r2}");
            firsts += fresh;
        }
        assert_eq!(firsts, events.len());
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let n: i64 = client.query_one("SELECT count(*) FROM stripe_events", &[]).await.unwrap().get(0);
        assert_eq!(n as usize, events.len());
        let g: i64 = client.query_one("SELECT count(*) FROM credit_grants", &[]).await.unwrap().get(0);
        assert_eq!(g, 3, "one grant per paid invoice");
        let st: String = client.query_one("SELECT status FROM subscriptions", &[]).await.unwrap().get(0);
        assert_eq!(st, "past_due");
    });
}

#[tokio::test]
async fn plan_credits_come_each_billing_window_to_users_without_a_subscription() {
    let a = app_or_skip!(billing_app(|_| {}).await);
    let admin = token("root-admin");
    let t = token("granted-user");
    a.user_id(&t).await;
    assert_eq!(a.ents(&t).await["credit_balance"], 0, "the free plan of this catalog includes no credits");
    let until = Utc::now() + Duration::days(60);
    let (s, g) = a
        .call(
            "POST",
            "/v1/admin/grants",
            Some(&admin),
            Some(json!({"subject": "granted-user", "plan": "pro", "until": until, "granted_by": "ops", "reason": "beta"})),
        )
        .await;
    assert!(s.is_success(), "{g}");
    let e = a.ents(&t).await;
    assert_eq!(e["access_reason"], "granted:beta");
    assert_eq!(e["credit_balance"], 100, "pro includes 100 credits a billing window: {e}");
    let grants = e["credit_grants"].as_array().unwrap();
    assert!(grants.iter().any(|g| g["id"].as_str().unwrap().starts_with("included:pro:") && !g["expires_at"].is_null()), "{e}");
}

#[tokio::test]
async fn webhook_tolerance_follows_the_server_clock_without_sleeping() {
    let a = app_or_skip!(billing_app(|c| c.stripe_webhook_tolerance_secs = 300).await);
    let w = World::new();
    let signed_at = a.clock.freeze().timestamp();
    // Signed now, delivered (by the server's clock) 299 s later: accepted.
    a.clock.advance(Duration::seconds(299));
    let (s, v) = a.webhook_at(&w.checkout("early", None, "x@example.com", Utc::now()), signed_at).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // 302 s later: stale, and nothing stored.
    a.clock.advance(Duration::seconds(3));
    let (s, v) = a.webhook_at(&w.checkout("late", None, "x@example.com", Utc::now()), signed_at).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("stale_signature")));
    assert_eq!(a.count("stripe_events").await, 1);
}

/// Rows of every table of the schema whose text contains `needle` (case-insensitive).
async fn tables_naming(a: &TestApp, needle: &str) -> Vec<String> {
    let (client, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() >= 15, "every table is inspected: {tables:?}");
    let mut hits = Vec::new();
    for t in tables {
        let rows =
            client.query(&format!("SELECT t::text FROM \"{t}\" t WHERE strpos(lower(t::text), lower($1)) > 0"), &[&needle]).await.unwrap();
        hits.extend(rows.iter().map(|r| format!("{t}: {}", r.get::<_, String>(0))));
    }
    hits
}

#[tokio::test]
async fn deleting_an_account_leaves_no_row_naming_the_user_or_their_email_in_any_table() {
    let a = app_or_skip!(
        billing_app(|c| {
            c.webhook_allow_private = true;
            c.webhook_poll_ms = 20;
            c.webhook_backoff_ms = 50;
        })
        .await
    );
    // A backend hears of everything, the deletion included; its outbox rows name the user
    // until then.
    let r = receiver::Receiver::start().await;
    let all: Vec<&str> = tally_server::webhooks::EVENT_TYPES.to_vec();
    let (s, v) = a.call("POST", "/v1/admin/webhooks", Some(&token("root-admin")), Some(json!({"url": r.url, "events": all}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let email = "Leaver.Person@Example.com";
    let t = token_with("leaver-sub", json!({"email": email, "email_verified": true}));
    let uid = a.user_id(&t).await;
    let admin = token("root-admin");
    // Data everywhere: events, counters, settings, a grant, credits, Stripe customer,
    // subscription, payment, and events of the Stripe log naming the user and the email.
    a.sync(&t, "d", vec![event(Uuid::now_v7(), "ai_chat", 1)]).await;
    a.call("PATCH", "/v1/settings", Some(&t), Some(json!({"k": email}))).await;
    let (s, v) =
        a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "leaver-sub", "plan": "pro", "reason": "vip"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) =
        a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "leaver-sub", "credits": 5, "reason": "gift"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let w = World::new();
    let now = Utc::now();
    a.ok(&w.checkout("c", Some(&uid), email, now)).await;
    a.ok(&w.subscription("created", "s1", "a", "active", now, now, now + Duration::days(30), PRICE)).await;
    a.ok(&w.invoice(true, "i1", "1", "a", now, now, now + Duration::days(30))).await;
    a.ok(&w.subscription("deleted", "s2", "a", "canceled", now + Duration::seconds(5), now, now + Duration::days(30), PRICE)).await;
    // An event of another customer that only mentions the email (never linked to the user).
    let stranger = World::new();
    a.ok(&stranger.checkout("c", None, &email.to_lowercase(), now)).await;
    // Someone else's data stays.
    let other = token_with("stayer", json!({"email": "stayer@example.com", "email_verified": true}));
    a.sync(&other, "d", vec![event(Uuid::now_v7(), "ai_chat", 1)]).await;
    let before = (a.count("stripe_events").await, a.count("events").await);
    for needle in [uid.as_str(), email, "leaver-sub"] {
        assert!(!tables_naming(&a, needle).await.is_empty(), "the test data names {needle}");
    }
    let named = tables_naming(&a, &uid).await;
    for t in ["webhook_events", "webhook_deliveries"] {
        assert!(named.iter().any(|h| h.starts_with(&format!("{t}:"))), "the outbox names the user in {t}: {named:#?}");
    }
    let types =
        |r: &receiver::Receiver| -> Vec<String> { r.all().iter().map(|g| g.json()["type"].as_str().unwrap().to_string()).collect() };
    for want in [
        "subscription.started",
        "payment.succeeded",
        "credits.granted",
        "entitlements.changed",
        "subscription.canceled",
        "subscription.expired",
    ] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !types(&r).iter().any(|t| t == want) {
            assert!(std::time::Instant::now() < deadline, "no {want} delivered: {:?}", types(&r));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    let (s, v) = a.call("DELETE", "/v1/me", Some(&t), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    // `account.deleted` (ids only) reaches the backend, then its rows are purged.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !(types(&r).iter().any(|t| t == "account.deleted") && a.count("webhook_events WHERE type = 'account.deleted'").await == 0) {
        assert!(std::time::Instant::now() < deadline, "account.deleted not delivered and purged: {:?}", types(&r));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let gone = r.all().into_iter().map(|g| g.json()).find(|b| b["type"] == "account.deleted").unwrap();
    assert_eq!(gone["data"], json!({"user_id": uid, "subject": "leaver-sub"}), "ids only");
    for needle in [uid.as_str(), email, "leaver-sub"] {
        let hits = tables_naming(&a, needle).await;
        assert!(hits.is_empty(), "rows still naming {needle}: {hits:#?}");
    }
    // The Stripe log keeps (scrubbed) event ids, so a replay is still recognised and changes nothing.
    assert_eq!(a.count("stripe_events").await, before.0);
    assert_eq!(a.count("events").await, before.1 - 1, "the other user's events stay");
    let (s, _) = a.webhook(&w.invoice(true, "i1", "1", "a", now, now, now + Duration::days(30))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(tables_naming(&a, &uid).await.is_empty(), "a replayed event does not bring the user back");
    assert_eq!(a.call("GET", "/v1/me", Some(&other), None).await.0, StatusCode::OK);
}

/// [`BILLING_CATALOG`] with Stripe products: a subscription with a trial, a lifetime plan and a
/// credit pack.
const PRODUCTS_CATALOG: &str = r#"{"plans": [
  {"id": "free", "features": {"images": {"type": "credits", "cost": 10}}},
  {"id": "pro", "features": {"images": {"type": "credits", "cost": 10}}}],
  "products": [
    {"id": "price_trial", "store": "stripe", "grants": {"plan": "pro"}, "trial_days": 14},
    {"id": "price_forever", "store": "stripe", "grants": {"plan": "pro", "lifetime": true}},
    {"id": "price_credits_50", "store": "stripe", "grants": {"credits": 50}}]}"#;

async fn products_app(base: Option<String>) -> Option<TestApp> {
    billing_app(move |c| {
        let plans = c.data_dir.join("products-plans.json");
        std::fs::write(&plans, PRODUCTS_CATALOG).unwrap();
        c.plans_file = Some(plans);
        if let Some(base) = base {
            c.stripe_secret_key = Some("sk_test_fake".into());
            c.stripe_api_base = base;
        }
    })
    .await
}

impl World {
    /// A completed one-time Checkout Session (`mode=payment`) of `price`, paid by `payment`.
    fn one_time(&self, id: &str, uid: &str, price: &str, payment: &str, paid: bool) -> Value {
        let mut e = self.checkout(id, Some(uid), "buyer@example.com", Utc::now());
        let o = &mut e["data"]["object"];
        o["id"] = json!(format!("cs_{payment}"));
        o["mode"] = json!("payment");
        o["subscription"] = Value::Null;
        o["payment_intent"] = json!(payment);
        o["payment_status"] = json!(if paid { "paid" } else { "unpaid" });
        o["metadata"] = json!({"tally_user_id": uid, "tally_price_id": price});
        e
    }

    /// `charge.refunded` of `payment` (`full`: the whole charge).
    fn refund(&self, id: &str, payment: &str, full: bool) -> Value {
        let mut e = fixture("charge.refunded");
        e["id"] = json!(self.evt(id));
        let o = &mut e["data"]["object"];
        o["id"] = json!(format!("ch_{id}_{}", self.tag));
        o["customer"] = json!(self.customer);
        o["payment_intent"] = json!(payment);
        o["refunded"] = json!(full);
        e
    }
}

fn form_value<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn checkout_gives_trials_sells_one_time_products_in_payment_mode_and_refuses_a_second_subscription() {
    let fake = fake_stripe().await;
    let a = app_or_skip!(products_app(Some(fake.url.clone())).await);
    let t = token_with("trialist", json!({"email": "trialist@example.com", "email_verified": true}));
    let uid = a.user_id(&t).await;
    let checkout =
        |price: &str| json!({"price_id": price, "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/no"});

    // A subscription product with trial_days: mode subscription with a free trial.
    let (s, v) = a.call("POST", "/v1/billing/checkout", Some(&t), Some(checkout("price_trial"))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let form = fake.seen.lock().unwrap().last().unwrap().form.clone();
    assert_eq!(form_value(&form, "mode"), Some("subscription"));
    assert_eq!(form_value(&form, "subscription_data[trial_period_days]"), Some("14"));
    assert_eq!(form_value(&form, "subscription_data[metadata][tally_user_id]"), Some(uid.as_str()));
    // A price of TALLY_STRIPE_PRICES has no trial.
    a.call("POST", "/v1/billing/checkout", Some(&t), Some(checkout(PRICE))).await;
    let form = fake.seen.lock().unwrap().last().unwrap().form.clone();
    assert_eq!(form_value(&form, "subscription_data[trial_period_days]"), None);

    // One-time products: mode payment, the product in the metadata, a customer created.
    for price in ["price_forever", "price_credits_50"] {
        let (s, v) = a.call("POST", "/v1/billing/checkout", Some(&t), Some(checkout(price))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let form = fake.seen.lock().unwrap().last().unwrap().form.clone();
        assert_eq!(form_value(&form, "mode"), Some("payment"), "{form:?}");
        assert_eq!(form_value(&form, "metadata[tally_price_id]"), Some(price));
        assert_eq!(form_value(&form, "payment_intent_data[metadata][tally_user_id]"), Some(uid.as_str()));
        assert_eq!(form_value(&form, "customer_creation"), Some("always"));
        assert!(!form.iter().any(|(k, _)| k.starts_with("subscription_data")), "{form:?}");
    }

    // The trial starts: trialing, with the plan.
    let w = World::new();
    let now = Utc::now();
    a.ok(&w.checkout("c", Some(&uid), "trialist@example.com", now)).await;
    a.ok(&w.subscription("created", "s1", "a", "trialing", now, now, now + Duration::days(14), "price_trial")).await;
    let e = a.ents(&t).await;
    assert_eq!(
        (e["plan"].as_str(), e["status"].as_str(), e["access_reason"].as_str()),
        (Some("pro"), Some("trialing"), Some("trial")),
        "{e}"
    );

    // A second subscription is refused before Stripe is called; one-time products still sell.
    let calls = fake.seen.lock().unwrap().len();
    let before = a.billing(&t).await;
    for price in ["price_trial", PRICE] {
        let (s, v) = a.call("POST", "/v1/billing/checkout", Some(&t), Some(checkout(price))).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("subscription_active")), "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("billing portal"), "{v}");
    }
    assert_eq!(fake.seen.lock().unwrap().len(), calls, "Stripe was not called");
    assert_eq!(a.billing(&t).await, before, "nothing changed");
    let (s, v) = a.call("POST", "/v1/billing/checkout", Some(&t), Some(checkout("price_credits_50"))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Once the subscription is over, a new one may be bought.
    a.ok(&w.subscription("deleted", "s2", "a", "canceled", now + Duration::seconds(5), now, now + Duration::days(14), "price_trial")).await;
    let (s, v) = a.call("POST", "/v1/billing/checkout", Some(&t), Some(checkout("price_trial"))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn one_time_purchases_grant_once_when_paid_and_a_full_refund_takes_them_back() {
    let a = app_or_skip!(products_app(None).await);
    let t = token_with("forever", json!({"email": "forever@example.com", "email_verified": true}));
    let uid = a.user_id(&t).await;
    let w = World::new();

    // A lifetime plan: once, whatever the redeliveries.
    let paid = w.one_time("l1", &uid, "price_forever", &format!("pi_l_{}", w.tag), true);
    let v = a.ok(&paid).await;
    assert!(v["outcome"].as_str().unwrap().ends_with("applied:lifetime"), "{v}");
    assert_eq!(a.ok(&paid).await["duplicate"], true);
    let mut again = paid.clone();
    again["id"] = json!(w.evt("l1-again"));
    again["type"] = json!("checkout.session.async_payment_succeeded");
    assert_eq!(a.ok(&again).await["outcome"], "applied:already_granted");
    let e = a.ents(&t).await;
    assert_eq!((e["plan"].as_str(), e["access_reason"].as_str(), &e["period_end"]), (Some("pro"), Some("lifetime"), &Value::Null), "{e}");

    // A credit pack paid later (an async payment method): nothing until it is paid, then once.
    let pack = format!("pi_c_{}", w.tag);
    let unpaid = w.one_time("c1", &uid, "price_credits_50", &pack, false);
    assert!(a.ok(&unpaid).await["outcome"].as_str().unwrap().ends_with("ignored:unpaid"));
    assert_eq!(a.ents(&t).await["credit_balance"], 0);
    let mut succeeded = w.one_time("c2", &uid, "price_credits_50", &pack, true);
    succeeded["type"] = json!("checkout.session.async_payment_succeeded");
    assert_eq!(a.ok(&succeeded).await["outcome"], "applied:credits_granted:50");
    succeeded["id"] = json!(w.evt("c3"));
    assert_eq!(a.ok(&succeeded).await["outcome"], "applied:already_granted");
    assert_eq!(a.ents(&t).await["credit_balance"], 50, "granted once per payment");
    // A session naming a product the catalog does not sell once is ignored.
    let v = a.ok(&w.one_time("x1", &uid, "price_nope", &format!("pi_x_{}", w.tag), true)).await;
    assert!(v["outcome"].as_str().unwrap().ends_with("ignored:unknown_product"), "{v}");
    assert_eq!(a.ents(&t).await["credit_balance"], 50);

    // 2 images spend 20 of the pack.
    let (s, u) = a
        .call(
            "POST",
            "/v1/usage",
            Some(&t),
            Some(json!({"id": Uuid::now_v7(), "feature": "images", "amount": 2, "occurred_at": Utc::now().to_rfc3339()})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    // A partial refund takes nothing back; a full one takes the unspent rest, the spent is debt.
    assert_eq!(a.ok(&w.refund("r1", &pack, false)).await["outcome"], "applied");
    assert_eq!(a.ents(&t).await["credit_balance"], 30);
    assert_eq!(a.ok(&w.refund("r2", &pack, true)).await["outcome"], "applied:purchase_taken_back");
    assert_eq!(a.ents(&t).await["credit_balance"], -20, "the unspent 30 went back, the 20 spent are debt");
    assert_eq!(a.ok(&w.refund("r3", &pack, true)).await["outcome"], "applied", "a second refund takes nothing more");
    let b = a.billing(&t).await;
    let listed: Vec<&Value> = b["payments"].as_array().unwrap().iter().filter(|p| p["store"] == "stripe").collect();
    assert_eq!(listed.len(), 2, "the lifetime plan and the pack, each once: {b}");
    assert!(listed.iter().any(|p| p["status"] == "refunded"), "{b}");

    // The lifetime plan's refund returns the user to free; a replayed purchase does not bring it back.
    assert_eq!(a.ok(&w.refund("r4", &format!("pi_l_{}", w.tag), true)).await["outcome"], "applied:purchase_taken_back");
    let e = a.ents(&t).await;
    assert_eq!((e["plan"].as_str(), e["access_reason"].as_str()), (Some("free"), Some("free")), "{e}");
    let mut replay = paid;
    replay["id"] = json!(w.evt("l1-late"));
    replay["type"] = json!("checkout.session.async_payment_succeeded");
    assert_eq!(a.ok(&replay).await["outcome"], "applied:already_granted");
    assert_eq!(a.ents(&t).await["plan"], "free");
}

/// Registers an outbound webhook endpoint for `events`, so the outbox keeps them (it is never
/// reached: the tests read the stored events).
async fn subscribe_endpoint(a: &TestApp, events: &[&str]) {
    let body = json!({"url": "https://hooks.example.invalid/tally", "events": events});
    let (s, v) = a.call("POST", "/v1/admin/webhooks", Some(&token("root-admin")), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn a_refunded_lifetime_purchase_tells_subscription_expired_once() {
    let a = app_or_skip!(products_app(None).await);
    let events = ["subscription.started", "subscription.canceled", "subscription.expired", "payment.refunded"];
    subscribe_endpoint(&a, &events).await;
    let t = token_with("lifer", json!({"email": "lifer@example.com", "email_verified": true}));
    let uid = a.user_id(&t).await;
    let w = World::new();
    let payment = format!("pi_l_{}", w.tag);
    assert!(
        a.ok(&w.one_time("l1", &uid, "price_forever", &payment, true)).await["outcome"].as_str().unwrap().ends_with("applied:lifetime")
    );
    let told = || async {
        let client = a.state.pool.get().await.unwrap();
        let rows = client
            .query("SELECT type, data FROM webhook_events WHERE user_id = $1 ORDER BY seq", &[&Uuid::parse_str(&uid).unwrap()])
            .await
            .unwrap();
        rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, Value>(1))).collect::<Vec<_>>()
    };
    let of = |all: &[(String, Value)], kind: &str| all.iter().filter(|(k, _)| k == kind).map(|(_, d)| d.clone()).collect::<Vec<_>>();
    // A partial refund keeps the plan: no expiry.
    assert_eq!(a.ok(&w.refund("r0", &payment, false)).await["outcome"], "applied");
    let all = told().await;
    assert_eq!(of(&all, "subscription.started").len(), 1, "{all:?}");
    assert!(of(&all, "subscription.expired").is_empty(), "{all:?}");
    // The full refund takes the plan back and says so once, however often Stripe tells it.
    assert_eq!(a.ok(&w.refund("r1", &payment, true)).await["outcome"], "applied:purchase_taken_back");
    assert_eq!(a.ok(&w.refund("r2", &payment, true)).await["outcome"], "applied");
    assert_eq!(a.ents(&t).await["plan"], "free");
    let all = told().await;
    let expired = of(&all, "subscription.expired");
    assert_eq!(expired.len(), 1, "{all:?}");
    let e = &expired[0];
    assert_eq!(
        (e["store"].as_str(), e["subscription_id"].as_str(), e["plan"].as_str(), e["status"].as_str(), e["lifetime"].as_bool()),
        (Some("stripe"), Some(payment.as_str()), Some("pro"), Some("canceled"), Some(true)),
        "{e}"
    );
    assert!(!e["access_until"].is_null(), "{e}");
    assert!(of(&all, "subscription.canceled").is_empty(), "a lifetime plan never renewed, so it is not canceled: {all:?}");
    assert!(!of(&all, "payment.refunded").is_empty(), "{all:?}");
}

#[tokio::test]
async fn the_export_holds_the_users_purchases_store_events_and_webhook_events_and_no_one_elses() {
    let a = app_or_skip!(products_app(None).await);
    let events = ["subscription.started", "subscription.expired", "payment.succeeded", "payment.refunded", "credits.granted"];
    subscribe_endpoint(&a, &events).await;
    let t = token_with("exporter", json!({"email": "exporter@example.com", "email_verified": true}));
    let uid = a.user_id(&t).await;
    let other = token_with("bystander", json!({"email": "bystander@example.com", "email_verified": true}));
    let other_uid = a.user_id(&other).await;
    let (w, w2) = (World::new(), World::new());
    let payment = format!("pi_l_{}", w.tag);
    let bought = w.one_time("l1", &uid, "price_forever", &payment, true);
    a.ok(&bought).await;
    let refund = w.refund("r1", &payment, true);
    a.ok(&refund).await;
    a.ok(&w2.one_time("l2", &other_uid, "price_forever", &format!("pi_l_{}", w2.tag), true)).await;
    let (s, g) = a
        .call("POST", "/v1/admin/grants", Some(&token("root-admin")), Some(json!({"subject": "exporter", "credits": 3, "reason": "gift"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{g}");

    let (s, e) = a.call("GET", "/v1/me/export", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    // Outbound webhook events, in the order they were told, as the backend got them.
    let told: Vec<&str> = e["webhook_events"].as_array().unwrap().iter().map(|x| x["type"].as_str().unwrap()).collect();
    assert_eq!(told, ["payment.succeeded", "subscription.started", "payment.refunded", "subscription.expired", "credits.granted"], "{e}");
    for x in e["webhook_events"].as_array().unwrap() {
        assert_eq!(x["data"]["user_id"].as_str(), Some(uid.as_str()), "{x}");
        assert!(x["id"].is_string() && x["created_at"].is_string(), "{x}");
    }
    // The Stripe events applied to the user, with their payloads.
    let stripe: Vec<(&str, &str)> =
        e["store_events"].as_array().unwrap().iter().map(|x| (x["id"].as_str().unwrap(), x["type"].as_str().unwrap())).collect();
    assert_eq!(stripe.len(), 2, "{e}");
    for (sent, (id, kind)) in [&bought, &refund].into_iter().zip(stripe) {
        assert_eq!((Some(id), Some(kind)), (sent["id"].as_str(), sent["type"].as_str()));
    }
    assert_eq!(e["store_events"][1]["payload"]["data"]["object"]["payment_intent"].as_str(), Some(payment.as_str()));
    assert_eq!(e["store_events"][0]["store"], "stripe");
    // What they bought and got back, and the credits.
    let subs = e["store_subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 1, "{e}");
    assert_eq!((subs[0]["subscription_id"].as_str(), subs[0]["status"].as_str()), (Some(payment.as_str()), Some("canceled")));
    assert_eq!(e["payments"].as_array().unwrap().len(), 1, "{e}");
    assert_eq!(e["refunds"][0]["payment_intent"].as_str(), Some(payment.as_str()), "{e}");
    assert_eq!(e["credit_grants"][0]["amount"], 3, "{e}");
    // Nothing of the other buyer.
    let text = e.to_string();
    assert!(!text.contains(&other_uid) && !text.contains(&w2.tag), "{text}");
}

/// The moment the Stripe fixtures describe (their subscription's first period has begun).
fn fixture_now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2025-07-01T12:00:00Z").unwrap().with_timezone(&Utc)
}

/// The Stripe fixture `name` as it is, for `user` where it names the buyer.
fn fixture_for(name: &str, user: &str) -> Value {
    let mut e = fixture(name);
    let o = &mut e["data"]["object"];
    if o["client_reference_id"] == "REPLACED_BY_TEST" {
        o["client_reference_id"] = json!(user);
    }
    if o["metadata"]["tally_user_id"] == "REPLACED_BY_TEST" {
        o["metadata"]["tally_user_id"] = json!(user);
    }
    e
}

#[tokio::test]
async fn every_stripe_fixture_replays_through_the_webhook_with_its_effect() {
    // The fixtures' subscription price gives pro; their one-time price gives 50 credits.
    let a = app_or_skip!(
        billing_app(|c| {
            let plans = c.data_dir.join("fixture-plans.json");
            std::fs::write(&plans, PRODUCTS_CATALOG.replace(r#""id": "price_trial""#, r#""id": "price_pro_monthly""#)).unwrap();
            c.plans_file = Some(plans);
        })
        .await
    );
    a.clock.set(fixture_now());
    let t = token("stripe-fixtures");
    let me = a.user_id(&t).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stripe");
    let mut files: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().trim_end_matches(".json").to_string()).collect();
    files.sort();
    // Each fixture in the order Stripe created them, and what the user has after it.
    let steps: &[(&str, &str, &str, &str)] = &[
        ("customer.created", "unhandled_type", "free", "none"),
        ("checkout.session.completed", "applied:linked_by_client_reference_id", "free", "none"),
        ("customer.subscription.created", "applied", "pro", "active"),
        ("invoice.payment_succeeded", "applied", "pro", "active"),
        ("customer.subscription.updated", "applied", "pro", "active"),
        ("charge.refunded", "applied", "pro", "active"),
        ("customer.subscription.deleted", "applied", "free", "canceled"),
        // A failed invoice of the deleted subscription does not bring it back.
        ("invoice.payment_failed", "applied:past_due", "free", "canceled"),
    ];
    let mut wrong = Vec::new();
    for (name, outcome, plan, status) in steps {
        let e = fixture_for(name, &me);
        assert_eq!(e["api_version"], tally_server::billing::DEFAULT_API_VERSION, "{name} is of the pinned API version");
        let (s, b) = a.webhook(&e).await;
        let ents = a.ents(&t).await;
        let got = (s.as_u16(), b["outcome"].as_str().unwrap_or("").to_string(), ents["plan"].to_string(), ents["status"].to_string());
        let want = (200, outcome.to_string(), json!(plan).to_string(), json!(status).to_string());
        if got != want {
            wrong.push(format!("{name}: got {got:?}, want {want:?} ({b})"));
        }
    }
    let bill = a.billing(&t).await;
    assert!(bill["payments"].as_array().is_some_and(|p| !p.is_empty()), "{bill}");
    // A payment that settles later: the session completes unpaid, then succeeds (50 credits).
    let t = token("stripe-fixtures-async");
    let me = a.user_id(&t).await;
    let paid = fixture_for("checkout.session.async_payment_succeeded", &me);
    let mut completed = paid.clone();
    completed["id"] = json!("evt_1RcheckoutAsyncOpen0001");
    completed["type"] = json!("checkout.session.completed");
    completed["data"]["object"]["payment_status"] = json!("unpaid");
    for (name, e, outcome, credits) in [
        ("completed unpaid", completed, "applied:linked_by_client_reference_id,ignored:unpaid", 0),
        ("checkout.session.async_payment_succeeded", paid, "applied:credits_granted:50", 50),
    ] {
        let (s, b) = a.webhook(&e).await;
        let got = (s.as_u16(), b["outcome"].as_str().unwrap_or("").to_string(), a.ents(&t).await["credit_balance"].as_i64());
        if got != (200, outcome.to_string(), Some(credits)) {
            wrong.push(format!("{name}: got {got:?}, want {outcome} and {credits} credits ({b})"));
        }
    }
    let mut replayed: Vec<String> = steps.iter().map(|s| s.0.to_string()).collect();
    replayed.push("checkout.session.async_payment_succeeded".into());
    replayed.sort();
    assert_eq!(files, replayed, "every fixture is replayed");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn fields_no_documentation_names_yet_never_refuse_a_stripe_event() {
    let a = app_or_skip!(billing_app(|_| {}).await);
    a.clock.set(fixture_now());
    let t = token("stripe-future-fields");
    let me = a.user_id(&t).await;
    for (name, outcome) in
        [("checkout.session.completed", "applied:linked_by_client_reference_id"), ("customer.subscription.created", "applied")]
    {
        let (s, b) = a.webhook(&with_unknown_fields(&fixture_for(name, &me))).await;
        assert_eq!((s, b["outcome"].as_str()), (StatusCode::OK, Some(outcome)), "{name}: {b}");
    }
    assert_eq!(a.ents(&t).await["plan"], "pro");
}
