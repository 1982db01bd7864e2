//! Google Play purchases through the real router on a real Postgres, against a fake Google on
//! loopback (token endpoint checking the signed assertion, the Play Developer API, a JWKS and
//! signed push tokens): purchases, acknowledgements and consumption after the commit, refusals
//! changing nothing, pushes authenticated and applied once, the lifecycle in any order with the
//! API as the truth, trials, lifetime plans, credit packs and voided purchases.

mod common;
#[path = "common/fake_google.rs"]
mod fake_google;

use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use common::*;
use fake_google::{FakeGoogle, foreign_push_token, payload, product, push_body, push_token, subscription, wrap_push};
use proptest::prelude::*;
use serde_json::{Value, json};

const CATALOG: &str = r#"{"plans": [
  {"id": "free", "features": {"ai_chat": {"type": "metered", "limit": 5, "period": "month"},
                              "images": {"type": "credits", "cost": 10}}},
  {"id": "pro", "features": {"ai_chat": {"type": "metered", "limit": 500, "period": "month"},
                             "images": {"type": "credits", "cost": 10}}}],
  "products": [
    {"id": "pro_monthly", "store": "play", "grants": {"plan": "pro"}},
    {"id": "pro_forever", "store": "play", "grants": {"plan": "pro", "lifetime": true}},
    {"id": "credits_100", "store": "play", "grants": {"credits": 100}},
    {"id": "price_pro", "store": "stripe", "grants": {"plan": "pro"}}]}"#;

const STRIPE_SECRET: &str = "whsec_google_test";

async fn google_app(g: &FakeGoogle) -> Option<TestApp> {
    app_with(|c| {
        let plans = c.data_dir.join("google-plans.json");
        std::fs::write(&plans, CATALOG).unwrap();
        c.plans_file = Some(plans);
        c.stripe_webhook_secret = Some(STRIPE_SECRET.into());
        g.configure(c);
    })
    .await
}

async fn uid(a: &TestApp, bearer: &str) -> String {
    let (s, me) = a.call("GET", "/v1/me", Some(bearer), None).await;
    assert_eq!(s, StatusCode::OK, "{me}");
    me["id"].as_str().unwrap().to_string()
}

async fn buy(a: &TestApp, bearer: &str, items: &[(&str, &str)]) -> (StatusCode, Value) {
    let list: Vec<Value> = items.iter().map(|(p, t)| json!({"product_id": p, "purchase_token": t})).collect();
    a.call("POST", "/v1/purchases/google", Some(bearer), Some(json!({"purchases": list}))).await
}

async fn push(a: &TestApp, auth: Option<&str>, body: Value) -> (StatusCode, Value) {
    let bytes = serde_json::to_vec(&body).unwrap();
    let header = auth.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = header.as_deref().map(|h| vec![("authorization", h)]).unwrap_or_default();
    let (s, v, _) = a.raw("POST", "/v1/webhooks/google", None, bytes, &headers).await;
    (s, v)
}

fn sub_note(token: &str, kind: i64) -> Value {
    json!({"subscriptionNotification": {"version": "1.0", "notificationType": kind, "purchaseToken": token, "subscriptionId": "pro_monthly"}})
}

async fn notify(a: &TestApp, id: &str, rtdn: Value) -> (StatusCode, Value) {
    push(a, Some(&push_token(json!({}))), push_body(id, rtdn)).await
}

async fn plan(a: &TestApp, bearer: &str) -> (String, String, Value) {
    let (_, e) = a.call("GET", "/v1/entitlements", Some(bearer), None).await;
    (e["plan"].as_str().unwrap().into(), e["status"].as_str().unwrap().into(), e)
}

/// Rows of every table a purchase or notification may change.
async fn footprint(a: &TestApp) -> Vec<i64> {
    let mut v = Vec::new();
    for t in ["google_purchases", "google_voids", "google_notifications", "store_bindings", "store_subscriptions", "credit_grants"] {
        v.push(a.count(t).await);
    }
    v
}

fn ts(v: &Value) -> i64 {
    DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap().timestamp()
}

#[tokio::test]
async fn without_configuration_the_routes_answer_503_and_garbage_is_a_4xx() {
    let a = app_or_skip!(app().await);
    let t = token("google-unconfigured");
    let (s, b) = buy(&a, &t, &[("pro_monthly", "tok")]).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("store_unconfigured")));
    let (s, b) = notify(&a, "m-1", sub_note("tok", 4)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("store_unconfigured")));

    let g = FakeGoogle::start().await;
    let a = app_or_skip!(google_app(&g).await);
    let before = footprint(&a).await;
    let long = "x".repeat(5000);
    let bodies = [
        json!({}),
        json!({"purchases": []}),
        json!({"purchases": [{"product_id": "pro_monthly"}]}),
        json!({"purchases": [{"product_id": "pro_monthly", "purchase_token": ""}]}),
        json!({"purchases": [{"product_id": "pro_monthly", "purchase_token": long}]}),
        json!({"purchases": [{"product_id": "pro_monthly", "purchase_token": "t", "extra": 1}]}),
        json!({"purchases": [{"product_id": "pro_monthly", "purchase_token": "t"}], "device_id": ""}),
        json!({"signed_transactions": ["x"]}),
    ];
    for body in bodies {
        let (s, b) = a.call("POST", "/v1/purchases/google", Some(&t), Some(body.clone())).await;
        assert!(s.is_client_error() && b["error"]["code"].is_string(), "{body}: {s} {b}");
    }
    let auth = push_token(json!({}));
    let pushes = [
        json!({}),
        json!({"message": {}}),
        json!({"message": {"messageId": "m-2"}}),
        json!({"message": {"messageId": "m-3", "data": "%%%not base64"}}),
        json!({"message": {"messageId": "m-4", "data": "bm90IGpzb24="}}),
        json!({"message": {"messageId": "", "data": "e30="}}),
    ];
    for body in pushes {
        let (s, b) = push(&a, Some(&auth), body.clone()).await;
        assert!(s.is_client_error() && b["error"]["code"].is_string(), "{body}: {s} {b}");
    }
    let (s, b) = notify(&a, "m-5", json!({"packageName": "com.evil.app", "testNotification": {"version": "1.0"}})).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("wrong_package")));
    assert_eq!(footprint(&a).await, before);
    assert_eq!(g.play.lock().unwrap().reads, 0, "nothing malformed reached Google");
}

#[tokio::test]
async fn a_purchase_gives_the_plan_is_acknowledged_after_the_commit_and_billing_lists_it() {
    let g = FakeGoogle::start().await;
    let a = app_or_skip!(google_app(&g).await);
    let t = token("google-buyer");
    let me = uid(&a, &t).await;
    let now = Utc::now();
    g.set_sub("tok-1", subscription("pro_monthly", "SUBSCRIPTION_STATE_ACTIVE", now, now + Duration::days(30), Some(&me), "GPA.1-0"));
    let body = json!({"purchases": [{"product_id": "pro_monthly", "purchase_token": "tok-1"}], "device_id": "pixel-1"});
    let (s, b) = a.call("POST", "/v1/purchases/google", Some(&t), Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!((b["plan"].as_str(), b["status"].as_str()), (Some("pro"), Some("active")));
    assert_eq!(b["purchases"], json!([{"store": "play", "product_id": "pro_monthly", "transaction_id": "tok-1", "status": "active"}]));
    assert!(b["token"].is_string());
    assert_eq!(ts(&b["period_end"]), (now + Duration::days(30)).timestamp());
    assert_eq!(g.play.lock().unwrap().acknowledged, vec!["pro_monthly:tok-1".to_string()]);
    // Submitted again (the app retries): the same answer, acknowledged once, one token fetched.
    let (s, again) = buy(&a, &t, &[("pro_monthly", "tok-1")]).await;
    assert_eq!((s, &again["purchases"]), (StatusCode::OK, &b["purchases"]));
    let calls = {
        let p = g.play.lock().unwrap();
        (p.acknowledged.len(), p.token_requests)
    };
    assert_eq!(calls, (1, 1), "the access token is cached");
    let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
    assert_eq!((bill["store"].as_str(), bill["subscriptions"][0]["auto_renew"].as_bool()), (Some("play"), Some(true)), "{bill}");
    assert_eq!(bill["payments"][0]["store"], "play");
    let (s, d) = a.call("DELETE", "/v1/me", Some(&t), None).await;
    assert_eq!((s, d["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("subscription_active")), "{d}");
    assert!(d["error"]["message"].as_str().unwrap().contains("Google Play"), "{d}");
}

#[tokio::test]
async fn refusals_name_their_cause_and_change_nothing() {
    let g = FakeGoogle::start().await;
    let a = app_or_skip!(google_app(&g).await);
    let owner = token("google-owner");
    let owner_id = uid(&a, &owner).await;
    let thief = token("google-thief");
    let _ = uid(&a, &thief).await;
    let now = Utc::now();
    g.set_sub("owned", subscription("pro_monthly", "SUBSCRIPTION_STATE_ACTIVE", now, now + Duration::days(30), Some(&owner_id), "GPA.2-0"));
    assert_eq!(buy(&a, &owner, &[("pro_monthly", "owned")]).await.0, StatusCode::OK);
    // An upgrade of the owner's subscription bought without an account id, claimed by the thief.
    let mut linked = subscription("pro_monthly", "SUBSCRIPTION_STATE_ACTIVE", now, now + Duration::days(30), None, "GPA.3-0");
    linked["linkedPurchaseToken"] = json!("owned");
    g.set_sub("upgrade", linked);
    g.set_sub(
        "other-user",
        subscription("pro_monthly", "SUBSCRIPTION_STATE_ACTIVE", now, now + Duration::days(30), Some(&owner_id), "GPA.4-0"),
    );
    g.set_product("pro_forever", "life-1", product(0, now, None, "GPA.5-0"));
    let cases: Vec<(&str, &str, &str, StatusCode, &str)> = vec![
        ("unknown token", "pro_monthly", "nobody-knows", StatusCode::UNPROCESSABLE_ENTITY, "unknown_purchase_token"),
        ("unknown product", "gold_monthly", "owned", StatusCode::UNPROCESSABLE_ENTITY, "unknown_product"),
        ("a product's token sent as a subscription", "pro_monthly", "life-1", StatusCode::UNPROCESSABLE_ENTITY, "unknown_purchase_token"),
        ("bound by account id to another user", "pro_monthly", "other-user", StatusCode::CONFLICT, "bound_to_other_user"),
        ("lineage bound to another user", "pro_monthly", "upgrade", StatusCode::CONFLICT, "bound_to_other_user"),
        ("already bound to another user", "pro_monthly", "owned", StatusCode::CONFLICT, "bound_to_other_user"),
    ];
    let before = footprint(&a).await;
    for (name, p, tok, status, code) in cases {
        for list in [vec![(p, tok)], vec![("pro_forever", "life-1"), (p, tok)]] {
            let (s, b) = buy(&a, &thief, &list).await;
            assert_eq!((s, b["error"]["code"].as_str()), (status, Some(code)), "{name}: {b}");
        }
        assert_eq!(footprint(&a).await, before, "{name} changed something");
        assert_eq!(plan(&a, &thief).await.0, "free", "{name}");
    }
    assert!(g.play.lock().unwrap().products_acknowledged.is_empty(), "nothing refused was acknowledged");
    // Google down: a retryable 503, nothing changed; Google back: it goes through.
    g.fail_with(Some(503));
    let (s, b) = buy(&a, &thief, &[("pro_forever", "life-1")]).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")), "{b}");
    let (s, b) = notify(&a, "m-down", sub_note("owned", 2)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "Pub/Sub redelivers later: {b}");
    assert_eq!(footprint(&a).await, before);
    g.fail_with(None);
    let (s, b) = buy(&a, &thief, &[("pro_forever", "life-1")]).await;
    assert_eq!((s, b["access_reason"].as_str()), (StatusCode::OK, Some("lifetime")), "{b}");
    assert_eq!(g.play.lock().unwrap().products_acknowledged, vec!["pro_forever:life-1".to_string()]);
}

#[tokio::test]
async fn pushes_are_authenticated_applied_once_and_reread_from_the_api() {
    let g = FakeGoogle::start().await;
    let a = app_or_skip!(google_app(&g).await);
    let t = token("google-pushed");
    let me = uid(&a, &t).await;
    let now = Utc::now();
    g.set_sub("tok-p", subscription("pro_monthly", "SUBSCRIPTION_STATE_ACTIVE", now, now + Duration::days(30), Some(&me), "GPA.6-0"));
    let body = push_body("m-auth", sub_note("tok-p", 4));
    let expired = push_token(json!({"exp": now.timestamp() - 3600, "iat": now.timestamp() - 7200}));
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "missing_token"),
        ("foreign signature", Some(foreign_push_token()), "invalid_signature"),
        ("expired", Some(expired), "token_expired"),
        ("wrong audience", Some(push_token(json!({"aud": "https://evil.example.com/push"}))), "invalid_audience"),
        ("wrong email", Some(push_token(json!({"email": "someone@evil.iam.gserviceaccount.com"}))), "wrong_email"),
        ("email not verified", Some(push_token(json!({"email_verified": false}))), "wrong_email"),
        ("not issued by Google", Some(push_token(json!({"iss": "https://evil.example.com"}))), "invalid_issuer"),
        ("garbage", Some("not-a-jwt".into()), "invalid_token"),
    ];
    let before = footprint(&a).await;
    for (name, auth, code) in cases {
        let (s, b) = push(&a, auth.as_deref(), body.clone()).await;
        assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some(code)), "{name}: {b}");
        assert_eq!(footprint(&a).await, before, "{name} changed something");
    }
    assert_eq!(g.play.lock().unwrap().reads, 0, "no refused push reached Google");
    // The notification's type is only a hint: the state is what the API says.
    let (s, b) = notify(&a, "m-auth", sub_note("tok-p", 13)).await;
    assert_eq!((s, b["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{b}");
    assert_eq!(plan(&a, &t).await.0, "pro", "bound by the account id in the API's answer");
    assert_eq!(g.play.lock().unwrap().acknowledged.len(), 1);
    // Replayed with the same messageId: a duplicate, nothing changes even though Google did.
    g.edit_sub("tok-p", |s| s["subscriptionState"] = json!("SUBSCRIPTION_STATE_EXPIRED"));
    let before = footprint(&a).await;
    let (s, b) = notify(&a, "m-auth", sub_note("tok-p", 13)).await;
    assert_eq!((s, b["duplicate"].as_bool()), (StatusCode::OK, Some(true)), "{b}");
    assert_eq!(footprint(&a).await, before);
    assert_eq!(plan(&a, &t).await.0, "pro");
    // A test notification and one for a token Google does not know are recorded and answered 200.
    let (s, b) = notify(&a, "m-test", json!({"testNotification": {"version": "1.0"}})).await;
    assert_eq!((s, b["outcome"].as_str()), (StatusCode::OK, Some("acknowledged")));
    let (s, b) = notify(&a, "m-unknown", sub_note("never-issued", 4)).await;
    assert_eq!((s, b["outcome"].as_str()), (StatusCode::OK, Some("ignored:unknown_purchase_token")), "{b}");
}

#[tokio::test]
async fn trials_lifetime_plans_credit_packs_and_voided_purchases() {
    let g = FakeGoogle::start().await;
    let a = app_or_skip!(google_app(&g).await);
    let now = Utc::now();
    let t = token("google-trial");
    let me = uid(&a, &t).await;
    let mut trial = subscription("pro_monthly", "SUBSCRIPTION_STATE_ACTIVE", now, now + Duration::days(7), Some(&me), "GPA.7-0");
    trial["lineItems"][0]["offerPhase"] = json!({"freeTrial": {}});
    g.set_sub("tok-trial", trial);
    let (s, b) = buy(&a, &t, &[("pro_monthly", "tok-trial")]).await;
    assert_eq!((s, b["status"].as_str(), b["access_reason"].as_str()), (StatusCode::OK, Some("trialing"), Some("trial")), "{b}");

    let t = token("google-lifetime");
    let me = uid(&a, &t).await;
    g.set_product("pro_forever", "tok-life", product(0, now, Some(&me), "GPA.8-0"));
    let (s, b) = buy(&a, &t, &[("pro_forever", "tok-life")]).await;
    assert_eq!((s, b["access_reason"].as_str(), &b["period_end"]), (StatusCode::OK, Some("lifetime"), &Value::Null), "{b}");
    // Voided (refund): the lifetime plan goes.
    let void =
        json!({"voidedPurchaseNotification": {"purchaseToken": "tok-life", "orderId": "GPA.8-0", "productType": 2, "refundType": 1}});
    let (s, o) = notify(&a, "m-void-life", void).await;
    assert_eq!((s, o["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{o}");
    assert_eq!(plan(&a, &t).await.0, "free");

    let t = token("google-credits");
    let me = uid(&a, &t).await;
    g.set_product("credits_100", "tok-pack", product(0, now, Some(&me), "GPA.9-0"));
    let (s, b) = buy(&a, &t, &[("credits_100", "tok-pack")]).await;
    assert_eq!(
        (s, b["credit_balance"].as_i64(), b["purchases"][0]["status"].as_str()),
        (StatusCode::OK, Some(100), Some("credited")),
        "{b}"
    );
    assert_eq!(g.play.lock().unwrap().consumed, vec!["credits_100:tok-pack".to_string()], "consumed once granted");
    let (_, b) = buy(&a, &t, &[("credits_100", "tok-pack")]).await;
    assert_eq!(b["credit_balance"].as_i64(), Some(100), "granted once per order");
    assert_eq!(g.play.lock().unwrap().consumed.len(), 1);
    // A pending purchase (cash at a shop) gives nothing and is not consumed yet.
    g.set_product("credits_100", "tok-pending", product(2, now, Some(&me), "GPA.10-0"));
    let (_, b) = buy(&a, &t, &[("credits_100", "tok-pending")]).await;
    assert_eq!((b["credit_balance"].as_i64(), b["purchases"][0]["status"].as_str()), (Some(100), Some("pending")), "{b}");
    // 3 images spend 30; then the pack is voided: the 70 unspent go, the 30 spent are debt.
    let (s, u) = a
        .call(
            "POST",
            "/v1/usage",
            Some(&t),
            Some(json!({"id": uuid::Uuid::now_v7(), "feature": "images", "amount": 3, "occurred_at": Utc::now().to_rfc3339()})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    g.edit_product("credits_100", "tok-pack", |p| p["purchaseState"] = json!(1));
    let void =
        json!({"voidedPurchaseNotification": {"purchaseToken": "tok-pack", "orderId": "GPA.9-0", "productType": 2, "refundType": 1}});
    assert_eq!(notify(&a, "m-void-pack", void).await.1["outcome"], "applied");
    let (_, _, e) = plan(&a, &t).await;
    assert_eq!(e["credit_balance"].as_i64(), Some(-30), "{e}");
    let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
    assert!(bill["payments"].as_array().unwrap().iter().any(|p| p["status"] == "refunded"), "{bill}");
}

/// The moment the conformance fixtures (`tests/fixtures/google`) describe: their purchases are
/// current then.
fn fixture_now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2025-07-01T12:00:00Z").unwrap().with_timezone(&Utc)
}

/// The `subscriptionsv2` fixture, bound to `user`.
fn fixture_subscription(user: &str) -> Value {
    let mut v = payload("subscriptionsv2.json");
    v["externalAccountIdentifiers"]["obfuscatedExternalAccountId"] = json!(user);
    v
}

/// A server at the fixtures' moment and a user (bearer, id) whose subscription Google answers
/// with the `subscriptionsv2` fixture.
async fn fixture_app(g: &FakeGoogle, sub: &str) -> Option<(TestApp, String, String)> {
    let a = google_app(g).await?;
    a.clock.set(fixture_now());
    let t = token(sub);
    let me = uid(&a, &t).await;
    g.set_sub("fixture-subscription-token", fixture_subscription(&me));
    Some((a, t, me))
}

#[tokio::test]
async fn a_push_exactly_as_pubsub_sends_it_with_both_spellings_is_applied() {
    let g = FakeGoogle::start().await;
    let (a, t, _) = app_or_skip!(fixture_app(&g, "google-pubsub-verbatim").await);
    // The fixture as it is: `messageId` and `message_id`, `publishTime` and `publish_time`.
    let body = payload("pubsub-push.json");
    let (s, b) = push(&a, Some(&push_token(json!({}))), body.clone()).await;
    assert_eq!((s, b["outcome"].as_str(), b["id"].as_str()), (StatusCode::OK, Some("applied"), Some("13696934694531")), "{b}");
    let (p, status, e) = plan(&a, &t).await;
    assert_eq!((p.as_str(), status.as_str(), e["period_end"].as_str()), ("pro", "active", Some("2025-08-01T10:00:00Z")), "{e}");
    // Redelivered as it is: applied once.
    let (s, b) = push(&a, Some(&push_token(json!({}))), body).await;
    assert_eq!((s, b["duplicate"].as_bool()), (StatusCode::OK, Some(true)), "{b}");
}

#[tokio::test]
async fn either_spelling_alone_is_taken_and_spellings_that_disagree_are_refused() {
    let g = FakeGoogle::start().await;
    let (a, t, _) = app_or_skip!(fixture_app(&g, "google-spellings").await);
    let rtdn = payload("rtdn-subscription.json");
    let auth = push_token(json!({}));
    let mut disagreeing = Vec::new();
    for (field, other) in [("messageId", "message_id"), ("publishTime", "publish_time")] {
        let mut v = wrap_push("m-disagree", &rtdn, fixture_now());
        v["message"][other] = json!(if field == "messageId" { "m-other" } else { "2025-07-01T10:00:01.000Z" });
        disagreeing.push((field, v));
    }
    let mut neither = wrap_push("m-neither", &rtdn, fixture_now());
    neither["message"].as_object_mut().unwrap().retain(|k, _| k != "messageId" && k != "message_id");
    let before = footprint(&a).await;
    for (field, body) in disagreeing {
        let (s, b) = push(&a, Some(&auth), body).await;
        assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_notification")), "{field}: {b}");
        assert!(b["error"]["message"].as_str().unwrap().contains(field), "the message names {field}: {b}");
    }
    let (s, b) = push(&a, Some(&auth), neither).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_notification")), "{b}");
    assert_eq!(footprint(&a).await, before, "a refused push changes nothing");
    assert_eq!(g.play.lock().unwrap().reads, 0, "nor reaches Google");
    // Either spelling alone is the id.
    for (id, keep) in [("m-camel", ["messageId", "publishTime"]), ("m-snake", ["message_id", "publish_time"])] {
        let mut v = wrap_push(id, &rtdn, fixture_now());
        v["message"]
            .as_object_mut()
            .unwrap()
            .retain(|k, _| !k.contains("_id") && !k.contains("Id") && !k.contains("ublish") || keep.contains(&k.as_str()));
        assert_eq!(v["message"].as_object().unwrap().len(), 5, "{v}");
        let (s, b) = push(&a, Some(&auth), v.clone()).await;
        assert_eq!((s, b["outcome"].as_str(), b["id"].as_str()), (StatusCode::OK, Some("applied"), Some(id)), "{v}: {b}");
    }
    assert_eq!(plan(&a, &t).await.0, "pro");
}

#[tokio::test]
async fn every_play_fixture_replays_through_the_routes_with_its_effect() {
    let g = FakeGoogle::start().await;
    // purchases.subscriptionsv2 as the answer to a purchase: a tester's upgrade, current.
    let (a, t, _) = app_or_skip!(fixture_app(&g, "google-fixture-sub").await);
    let auth = push_token(json!({}));
    let (s, b) = buy(&a, &t, &[("pro_monthly", "fixture-subscription-token")]).await;
    assert_eq!((s, b["plan"].as_str(), b["status"].as_str()), (StatusCode::OK, Some("pro"), Some("active")), "{b}");
    assert_eq!(b["period_end"].as_str(), Some("2025-08-01T10:00:00Z"));
    let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
    let sub = &bill["subscriptions"][0];
    assert_eq!(
        (sub["subscription_id"].as_str(), sub["sandbox"].as_bool(), sub["auto_renew"].as_bool()),
        (Some("fixture-token-replaced-by-upgrade"), Some(true), Some(true)),
        "the lineage starts at linkedPurchaseToken; testPurchase marks the sandbox: {bill}"
    );
    // A subscription notification for it: re-read, applied.
    let (s, b) = push(&a, Some(&auth), wrap_push("m-fixture-sub", &payload("rtdn-subscription.json"), fixture_now())).await;
    assert_eq!((s, b["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{b}");

    // purchases.products as the answer to a one-time product notification: 100 credits.
    let t = token("google-fixture-product");
    let me = uid(&a, &t).await;
    let mut bought = payload("product-purchase.json");
    bought["obfuscatedExternalAccountId"] = json!(me);
    g.set_product("credits_100", "fixture-product-token", bought);
    let (s, b) = push(&a, Some(&auth), wrap_push("m-fixture-product", &payload("rtdn-one-time-product.json"), fixture_now())).await;
    assert_eq!((s, b["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{b}");
    assert_eq!(plan(&a, &t).await.2["credit_balance"].as_i64(), Some(100));
    assert_eq!(g.play.lock().unwrap().consumed, vec!["credits_100:fixture-product-token".to_string()]);
    // The voided purchase notification of that order takes the credits back.
    g.edit_product("credits_100", "fixture-product-token", |p| p["purchaseState"] = json!(1));
    let (s, b) = push(&a, Some(&auth), wrap_push("m-fixture-void", &payload("rtdn-voided-purchase.json"), fixture_now())).await;
    assert_eq!((s, b["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{b}");
    assert_eq!(plan(&a, &t).await.2["credit_balance"].as_i64(), Some(0));
    // The Play Console's test notification is acknowledged.
    let (s, b) = push(&a, Some(&auth), wrap_push("m-fixture-test", &payload("rtdn-test.json"), fixture_now())).await;
    assert_eq!((s, b["outcome"].as_str()), (StatusCode::OK, Some("acknowledged")), "{b}");
}

#[tokio::test]
async fn fields_no_documentation_names_yet_never_refuse_a_play_payload() {
    let g = FakeGoogle::start().await;
    let (a, t, me) = app_or_skip!(fixture_app(&g, "google-future-fields").await);
    g.edit_sub("fixture-subscription-token", |s| *s = with_unknown_fields(s));
    let auth = push_token(json!({}));
    let (s, b) = buy(&a, &t, &[("pro_monthly", "fixture-subscription-token")]).await;
    assert_eq!((s, b["plan"].as_str()), (StatusCode::OK, Some("pro")), "{b}");
    let mut bought = payload("product-purchase.json");
    bought["obfuscatedExternalAccountId"] = json!(me);
    g.set_product("credits_100", "fixture-product-token", with_unknown_fields(&bought));
    for (id, rtdn) in [
        ("m-future-sub", "rtdn-subscription.json"),
        ("m-future-product", "rtdn-one-time-product.json"),
        ("m-future-test", "rtdn-test.json"),
    ] {
        let body = with_unknown_fields(&wrap_push(id, &with_unknown_fields(&payload(rtdn)), fixture_now()));
        let (s, b) = push(&a, Some(&auth), body).await;
        assert_eq!(s, StatusCode::OK, "{rtdn}: {b}");
        assert!(!b["outcome"].as_str().unwrap().starts_with("ignored"), "{rtdn}: {b}");
    }
    assert_eq!(plan(&a, &t).await.2["credit_balance"].as_i64(), Some(100));
}

#[tokio::test]
async fn the_order_comes_from_the_line_item_when_the_deprecated_latest_order_id_is_gone() {
    let g = FakeGoogle::start().await;
    let a = app_or_skip!(google_app(&g).await);
    let t = token("google-line-item-order");
    let me = uid(&a, &t).await;
    let now = Utc::now();
    let mut sub = subscription("pro_monthly", "SUBSCRIPTION_STATE_ACTIVE", now, now + Duration::days(30), Some(&me), "GPA.30-0");
    sub.as_object_mut().unwrap().remove("latestOrderId");
    g.set_sub("tok-no-latest", sub);
    assert_eq!(buy(&a, &t, &[("pro_monthly", "tok-no-latest")]).await.0, StatusCode::OK);
    let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
    assert_eq!(bill["payments"][0]["order_id"], "GPA.30-0", "{bill}");
    // Its order voided: the subscription ends.
    let void =
        json!({"voidedPurchaseNotification": {"purchaseToken": "tok-no-latest", "orderId": "GPA.30-0", "productType": 1, "refundType": 1}});
    assert_eq!(notify(&a, "m-void-line-item", void).await.1["outcome"], "applied");
    assert_eq!(plan(&a, &t).await.0, "free");
}

fn stripe_fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stripe").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Sends a Stripe event, signed with the test secret.
async fn stripe_event(a: &TestApp, e: &Value) {
    use hmac::Mac;
    let body = e.to_string();
    let ts = Utc::now().timestamp();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(STRIPE_SECRET.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    let sig = format!("t={ts},v1={}", hex::encode(mac.finalize().into_bytes()));
    let (s, b, _) = a.raw("POST", "/v1/webhooks/stripe", None, body.into_bytes(), &[("stripe-signature", &sig)]).await;
    assert_eq!((s, b["outcome"].as_str().is_some_and(|o| !o.starts_with("ignored"))), (StatusCode::OK, true), "{e}: {b}");
}

#[tokio::test]
async fn paying_on_play_and_on_stripe_lists_both_and_cancelling_one_keeps_pro() {
    let g = FakeGoogle::start().await;
    let a = app_or_skip!(google_app(&g).await);
    let t = token("google-and-stripe");
    let me = uid(&a, &t).await;
    let now = Utc::now();
    g.set_sub("tok-both", subscription("pro_monthly", "SUBSCRIPTION_STATE_ACTIVE", now, now + Duration::days(30), Some(&me), "GPA.11-0"));
    assert_eq!(buy(&a, &t, &[("pro_monthly", "tok-both")]).await.0, StatusCode::OK);
    let mut checkout = stripe_fixture("checkout.session.completed");
    checkout["id"] = json!("evt_both_checkout");
    checkout["created"] = json!(now.timestamp());
    checkout["data"]["object"]["client_reference_id"] = json!(me);
    checkout["data"]["object"]["customer"] = json!("cus_both");
    checkout["data"]["object"]["subscription"] = json!("sub_both");
    stripe_event(&a, &checkout).await;
    let sub = |kind: &str, id: &str, status: &str, at: i64| {
        let mut e = stripe_fixture("customer.subscription.created");
        e["id"] = json!(id);
        e["type"] = json!(format!("customer.subscription.{kind}"));
        e["created"] = json!(at);
        let o = &mut e["data"]["object"];
        o["id"] = json!("sub_both");
        o["customer"] = json!("cus_both");
        o["status"] = json!(status);
        o["items"]["data"][0]["current_period_start"] = json!(now.timestamp());
        o["items"]["data"][0]["current_period_end"] = json!((now + Duration::days(30)).timestamp());
        o["items"]["data"][0]["price"]["id"] = json!("price_pro");
        o["items"]["data"][0]["subscription"] = json!("sub_both");
        e
    };
    stripe_event(&a, &sub("created", "evt_both_1", "active", now.timestamp())).await;
    let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
    let stores: std::collections::BTreeSet<&str> =
        bill["subscriptions"].as_array().unwrap().iter().filter_map(|s| s["store"].as_str()).collect();
    assert_eq!(stores, ["play", "stripe"].into_iter().collect(), "{bill}");
    // Stripe canceled: Play still gives pro.
    stripe_event(&a, &sub("deleted", "evt_both_2", "canceled", now.timestamp() + 5)).await;
    assert_eq!(plan(&a, &t).await.0, "pro");
    let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
    assert_eq!(bill["store"], "play", "{bill}");
    // Play expired too: free.
    g.edit_sub("tok-both", |s| {
        s["subscriptionState"] = json!("SUBSCRIPTION_STATE_EXPIRED");
        s["lineItems"][0]["expiryTime"] = json!(fake_google::rfc3339(now));
    });
    assert_eq!(notify(&a, "m-both", sub_note("tok-both", 13)).await.1["outcome"], "applied");
    assert_eq!(plan(&a, &t).await.0, "free");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// One step of the Play lifecycle: what Google's API says afterwards.
fn lifecycle(me: &str, now: DateTime<Utc>) -> Vec<(&'static str, Value)> {
    let d = Duration::days;
    let s = |state: &str, end: Duration, order: &str| subscription("pro_monthly", state, now - d(60), now + end, Some(me), order);
    let mut canceled = s("SUBSCRIPTION_STATE_CANCELED", d(20), "GPA.20..2");
    canceled["lineItems"][0]["autoRenewingPlan"]["autoRenewEnabled"] = json!(false);
    vec![
        ("purchase", s("SUBSCRIPTION_STATE_ACTIVE", d(-30), "GPA.20")),
        ("renew", s("SUBSCRIPTION_STATE_ACTIVE", d(0) + Duration::hours(1), "GPA.20..0")),
        ("grace", s("SUBSCRIPTION_STATE_IN_GRACE_PERIOD", d(3), "GPA.20..0")),
        ("on hold", s("SUBSCRIPTION_STATE_ON_HOLD", d(-1), "GPA.20..0")),
        ("recover", s("SUBSCRIPTION_STATE_ACTIVE", d(20), "GPA.20..1")),
        ("renew again", s("SUBSCRIPTION_STATE_ACTIVE", d(20), "GPA.20..2")),
        ("cancel", canceled),
        ("expire", s("SUBSCRIPTION_STATE_EXPIRED", d(-1), "GPA.20..2")),
        ("revoke", s("SUBSCRIPTION_STATE_EXPIRED", d(-2), "GPA.20..2")),
    ]
}

/// (status, plan) the server must show for an API state.
fn expected(v: &Value) -> (&'static str, &'static str) {
    let current = ts(&v["lineItems"][0]["expiryTime"]) > Utc::now().timestamp();
    match v["subscriptionState"].as_str().unwrap() {
        "SUBSCRIPTION_STATE_ACTIVE" | "SUBSCRIPTION_STATE_CANCELED" if current => ("active", "pro"),
        "SUBSCRIPTION_STATE_IN_GRACE_PERIOD" => ("past_due", "pro"),
        "SUBSCRIPTION_STATE_ON_HOLD" => ("past_due", "free"),
        _ => ("canceled", "free"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    /// The lifecycle (purchase, renew, grace, on hold, recover, cancel, expire, revoke) moves
    /// Google's state step by step; each step's notification arrives late, in any order, some
    /// twice. After every delivery the server shows what the API says at that moment.
    #[test]
    fn the_lifecycle_follows_the_api_whatever_the_order_of_notifications(
        delays in proptest::collection::vec(0..4usize, 9),
        dups in proptest::collection::vec(0..9usize, 0..3),
        shuffle in Just((0..9usize).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        runtime().block_on(async {
            let g = FakeGoogle::start().await;
            let Some(a) = google_app(&g).await else { return };
            let t = token("google-lifecycle");
            let me = uid(&a, &t).await;
            let steps = lifecycle(&me, Utc::now());
            // Notification i may be delivered after step i + delays[i]; ties in shuffled order.
            let mut pending: Vec<(usize, usize)> = (0..steps.len()).map(|i| ((i + delays[i]).min(steps.len() - 1), i)).collect();
            pending.extend(dups.iter().map(|&i| (steps.len() - 1, i)));
            pending.sort_by_key(|&(at, i)| (at, shuffle[i]));
            let mut next = 0;
            let mut last = None;
            for (at, (name, api)) in steps.iter().enumerate() {
                g.set_sub("tok-life", api.clone());
                while next < pending.len() && pending[next].0 <= at {
                    let i = pending[next].1;
                    next += 1;
                    let (s, b) = notify(&a, &format!("m-{i}"), sub_note("tok-life", 4)).await;
                    assert_eq!(s, StatusCode::OK, "{name}: {b}");
                    let (p, status, e) = plan(&a, &t).await;
                    // A redelivered message changes nothing; any other re-reads the API.
                    let want = if b["duplicate"] == true { last } else { Some(expected(api)) };
                    assert_eq!(Some((status.as_str(), p.as_str())), want, "after {name}, notification {i}: {b} {e}");
                    last = want;
                }
            }
            let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
            assert_eq!(bill["subscriptions"].as_array().map(Vec::len), Some(1), "{bill}");
            assert_eq!(bill["subscriptions"][0]["subscription_id"], "tok-life");
            let acks = g.play.lock().unwrap().acknowledged.clone();
            assert_eq!(acks, vec!["pro_monthly:tok-life".to_string()], "acknowledged once");
        });
    }
}
