//! App Store purchases through the real router on a real Postgres, with a test PKI (root,
//! intermediate and leaf with Apple's marker extensions) signing real ES256 JWS: purchases,
//! restores, notifications (once by UUID, any order), trials, grace, refunds, lifetime plans,
//! credit packs, and every attack on the proof refused with a code naming it, changing nothing.

#[path = "common/apple_pki.rs"]
mod apple_pki;
mod common;

use apple_pki::{Options, Pki, Tx, notification, renewal};
use axum::http::StatusCode;
use chrono::{Duration, Utc};
use common::*;
use proptest::prelude::*;
use serde_json::{Value, json};

const BUNDLE: &str = "com.example.tally";

const CATALOG: &str = r#"{"plans": [
  {"id": "free", "features": {"ai_chat": {"type": "metered", "limit": 5, "period": "month"},
                              "images": {"type": "credits", "cost": 10}}},
  {"id": "pro", "features": {"ai_chat": {"type": "metered", "limit": 500, "period": "month"},
                             "images": {"type": "credits", "cost": 10}}}],
  "products": [
    {"id": "pro_monthly", "store": "app_store", "grants": {"plan": "pro"}, "display_price": "$4.99"},
    {"id": "pro_forever", "store": "app_store", "grants": {"plan": "pro", "lifetime": true}},
    {"id": "credits_100", "store": "app_store", "grants": {"credits": 100}}]}"#;

/// A server trusting `pki`'s root, in `env` (Production also accepts the Sandbox unless
/// `allow_sandbox` is false).
async fn apple_app(pki: &Pki, env: &str, allow_sandbox: bool) -> Option<TestApp> {
    app_with(move |c| {
        let root = pki.write_root(&c.data_dir);
        let plans = c.data_dir.join("apple-plans.json");
        std::fs::write(&plans, CATALOG).unwrap();
        c.plans_file = Some(plans);
        c.apple_root_certs = vec![root];
        c.apple_bundle_id = Some(BUNDLE.into());
        c.apple_environment = env.into();
        c.apple_app_id = Some(1_234_567_890);
        c.apple_allow_sandbox = allow_sandbox;
    })
    .await
}

async fn uid(a: &TestApp, bearer: &str) -> String {
    let (s, me) = a.call("GET", "/v1/me", Some(bearer), None).await;
    assert_eq!(s, StatusCode::OK, "{me}");
    me["id"].as_str().unwrap().to_string()
}

async fn buy(a: &TestApp, bearer: &str, jws: &[String]) -> (StatusCode, Value) {
    a.call("POST", "/v1/purchases/apple", Some(bearer), Some(json!({"signed_transactions": jws}))).await
}

async fn notify(a: &TestApp, signed: String) -> (StatusCode, Value) {
    a.call("POST", "/v1/webhooks/apple", None, Some(json!({"signedPayload": signed}))).await
}

async fn plan(a: &TestApp, bearer: &str) -> (String, String, Value) {
    let (_, e) = a.call("GET", "/v1/entitlements", Some(bearer), None).await;
    (e["plan"].as_str().unwrap().into(), e["access_reason"].as_str().unwrap().into(), e)
}

/// Rows of every table a purchase may change.
async fn footprint(a: &TestApp) -> Vec<i64> {
    let mut v = Vec::new();
    for t in ["apple_transactions", "apple_renewals", "apple_notifications", "store_bindings", "store_subscriptions", "credit_grants"] {
        v.push(a.count(t).await);
    }
    v
}

fn claims(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn monthly<'a>(id: &'a str, original: &'a str, account: Option<&'a str>, from_days: i64) -> Tx<'a> {
    let now = Utc::now();
    Tx {
        id,
        original,
        product: "pro_monthly",
        purchased: now + Duration::days(from_days),
        expires: Some(now + Duration::days(from_days + 30)),
        signed: now,
        account,
    }
}

#[tokio::test]
async fn without_configuration_the_store_routes_answer_503_and_garbage_is_a_4xx() {
    let a = app_or_skip!(app().await);
    let t = token("apple-unconfigured");
    let (s, b) = buy(&a, &t, &["x".into()]).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("store_unconfigured")));
    let (s, b) = notify(&a, "x".into()).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("store_unconfigured")));

    let pki = Pki::new();
    let a = app_or_skip!(apple_app(&pki, "Sandbox", false).await);
    let t = token("apple-garbage");
    let before = footprint(&a).await;
    let garbage = [
        "".to_string(),
        "not a jws".into(),
        "a.b.c".into(),
        "eyJhbGciOiJFUzI1NiJ9.e30.AAAA".into(),
        format!("{}.{}.{}", "eyJhbGciOiJFUzI1NiIsIng1YyI6WyJBQUFBIiwiQUFBQSIsIkFBQUEiXX0", "e30", "AAAA"),
        "\u{0}\u{1}".into(),
        "x".repeat(10_000),
    ];
    for g in &garbage {
        let (s, b) = buy(&a, &t, std::slice::from_ref(g)).await;
        assert!(s.is_client_error(), "{g:.40}: {s} {b}");
        assert!(b["error"]["code"].is_string(), "{b}");
        let (s, b) = notify(&a, g.clone()).await;
        assert!(s.is_client_error(), "{g:.40}: {s} {b}");
    }
    let (s, _) = buy(&a, &t, &[]).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(footprint(&a).await, before);
}

#[tokio::test]
async fn a_purchase_gives_the_plan_with_a_device_token_and_billing_lists_it() {
    let pki = Pki::new();
    let a = app_or_skip!(apple_app(&pki, "Sandbox", false).await);
    let t = token("apple-buyer");
    let me = uid(&a, &t).await;
    let jws = pki.sign(&monthly("1000", "1000", Some(&me), 0).payload(BUNDLE, "Sandbox"));
    let (s, b) =
        a.call("POST", "/v1/purchases/apple", Some(&t), Some(json!({"signed_transactions": [jws.clone()], "device_id": "phone-1"}))).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        (b["plan"].as_str(), b["access_reason"].as_str(), b["status"].as_str()),
        (Some("pro"), Some("subscription"), Some("active"))
    );
    assert_eq!(b["purchases"], json!([{"store": "app_store", "product_id": "pro_monthly", "transaction_id": "1000", "status": "active"}]));
    let c = claims(b["token"].as_str().unwrap());
    assert_eq!((c["did"].as_str(), c["plan"].as_str(), c["uid"].as_str()), (Some("phone-1"), Some("pro"), Some(me.as_str())));
    // The same proof again (the app retries before finishing the transaction): same answer.
    let (s, again) = buy(&a, &t, std::slice::from_ref(&jws)).await;
    assert_eq!((s, &again["purchases"]), (StatusCode::OK, &b["purchases"]));
    assert_eq!(a.count("apple_transactions").await, 1);
    let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
    assert_eq!(bill["subscriptions"][0]["store"], "app_store", "{bill}");
    assert_eq!(bill["subscriptions"][0]["auto_renew"], true);
    assert_eq!(bill["store"], "app_store");
    assert_eq!(bill["payments"][0]["store"], "app_store");
    // It still renews: the account cannot be deleted here.
    let (s, d) = a.call("DELETE", "/v1/me", Some(&t), None).await;
    assert_eq!((s, d["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("subscription_active")), "{d}");
    assert!(d["error"]["message"].as_str().unwrap().contains("App Store"));
    // Auto-renew turned off (a newer renewal info): deletion goes through.
    let r = pki.sign(&renewal("1000", "pro_monthly", "Sandbox", false, false, None, Utc::now() + Duration::seconds(5)));
    let n = pki.sign(&notification("n-off", "DID_CHANGE_RENEWAL_STATUS", Some("AUTO_RENEW_DISABLED"), BUNDLE, "Sandbox", &jws, Some(&r)));
    let (s, o) = notify(&a, n).await;
    assert_eq!((s, o["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{o}");
    assert_eq!(plan(&a, &t).await.0, "pro", "still paid until the period ends");
    let (s, _) = a.call("DELETE", "/v1/me", Some(&t), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(a.count("store_bindings").await + a.count("apple_transactions").await + a.count("store_subscriptions").await, 0);
}

#[tokio::test]
async fn every_attack_on_the_proof_is_refused_by_name_and_changes_nothing() {
    let pki = Pki::new();
    let a = app_or_skip!(apple_app(&pki, "Production", false).await);
    let t = token("apple-victim");
    let me = uid(&a, &t).await;
    let good = monthly("2000", "2000", Some(&me), 0).payload(BUNDLE, "Production");
    let foreign = Pki::new();
    // An attacker's root with the trusted root's names, sent in x5c.
    let impostor = Pki::new();
    let mut chain = impostor.chain();
    chain[2] = pki.chain()[2].clone();
    let expired = Pki::with(Options { leaf_until_year: 2001, ..Options::default() });
    let no_wwdr = Pki::with(Options { intermediate_marker: false, ..Options::default() });
    let no_signer = Pki::with(Options { leaf_marker: false, ..Options::default() });
    let tampered = {
        let jws = pki.sign(&good);
        let mut parts: Vec<String> = jws.split('.').map(str::to_string).collect();
        let mut p = good.clone();
        p["productId"] = json!("pro_forever");
        use base64::Engine;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(p.to_string());
        parts.join(".")
    };
    let mut other_bundle = good.clone();
    other_bundle["bundleId"] = json!("com.evil.app");
    let mut unknown = good.clone();
    unknown["productId"] = json!("gold_monthly");
    let other_user = monthly("2001", "2001", Some("0190a1b2-0000-7000-8000-000000000000"), 0).payload(BUNDLE, "Production");
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        ("foreign root", foreign.sign(&good), StatusCode::UNPROCESSABLE_ENTITY, "untrusted_chain"),
        ("root impersonated in x5c", impostor.sign_with_chain(&good, &chain), StatusCode::UNPROCESSABLE_ENTITY, "untrusted_chain"),
        ("expired leaf", expired.sign(&good), StatusCode::UNPROCESSABLE_ENTITY, "untrusted_chain"),
        ("intermediate without marker", no_wwdr.sign(&good), StatusCode::UNPROCESSABLE_ENTITY, "untrusted_chain"),
        ("leaf without marker", no_signer.sign(&good), StatusCode::UNPROCESSABLE_ENTITY, "untrusted_chain"),
        ("tampered payload", tampered, StatusCode::UNPROCESSABLE_ENTITY, "bad_signature"),
        ("wrong bundle", pki.sign(&other_bundle), StatusCode::UNPROCESSABLE_ENTITY, "wrong_bundle"),
        (
            "sandbox refused",
            pki.sign(&monthly("2002", "2002", Some(&me), 0).payload(BUNDLE, "Sandbox")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong_environment",
        ),
        ("unknown product", pki.sign(&unknown), StatusCode::UNPROCESSABLE_ENTITY, "unknown_product"),
        ("bound to another user", pki.sign(&other_user), StatusCode::CONFLICT, "bound_to_other_user"),
    ];
    let before = footprint(&a).await;
    for (name, jws, status, code) in cases {
        // Alone, and next to a good transaction: the whole request is refused.
        for list in [vec![jws.clone()], vec![pki.sign(&good), jws.clone()]] {
            let (s, b) = buy(&a, &t, &list).await;
            assert_eq!((s, b["error"]["code"].as_str()), (status, Some(code)), "{name}: {b}");
        }
        if code != "unknown_product" && code != "bound_to_other_user" {
            let n = notification(&format!("n-{name}"), "SUBSCRIBED", None, BUNDLE, "Production", &jws, None);
            let signed = if name == "foreign root" { foreign.sign(&n) } else { pki.sign(&n) };
            let (s, b) = notify(&a, signed).await;
            assert!(s.is_client_error(), "{name}: {s} {b}");
        }
        assert_eq!(footprint(&a).await, before, "{name} changed something");
        assert_eq!(plan(&a, &t).await.0, "free", "{name}");
    }
    // A purchase bound to one user cannot be claimed by another, whatever it carries.
    let (s, _) = buy(&a, &t, &[pki.sign(&good)]).await;
    assert_eq!(s, StatusCode::OK);
    let thief = token("apple-thief");
    let mut renewed = monthly("2003", "2000", None, 30).payload(BUNDLE, "Production");
    renewed["appAccountToken"] = Value::Null;
    let before = footprint(&a).await;
    let (s, b) = buy(&a, &thief, &[pki.sign(&renewed)]).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("bound_to_other_user")), "{b}");
    assert_eq!(footprint(&a).await, before);
    assert_eq!(plan(&a, &thief).await.0, "free");
}

#[tokio::test]
async fn a_production_server_takes_app_review_sandbox_purchases_marked_sandbox() {
    let pki = Pki::new();
    let a = app_or_skip!(apple_app(&pki, "Production", true).await);
    let t = token("apple-reviewer");
    let me = uid(&a, &t).await;
    let (s, b) = buy(&a, &t, &[pki.sign(&monthly("3000", "3000", Some(&me), 0).payload(BUNDLE, "Sandbox"))]).await;
    assert_eq!((s, b["plan"].as_str()), (StatusCode::OK, Some("pro")), "{b}");
    let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
    assert_eq!(bill["subscriptions"][0]["sandbox"], true);
    let (s, b) = buy(&a, &t, &[pki.sign(&monthly("3001", "3001", Some(&me), 0).payload(BUNDLE, "Xcode"))]).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("wrong_environment")));
}

#[tokio::test]
async fn notifications_apply_once_in_any_order_and_a_restore_never_rolls_back() {
    let pki = Pki::new();
    let a = app_or_skip!(apple_app(&pki, "Sandbox", false).await);
    let t = token("apple-renewer");
    let me = uid(&a, &t).await;
    let now = Utc::now();
    let first = monthly("4000", "4000", Some(&me), -20);
    let second = monthly("4001", "4000", Some(&me), 10);
    let s1 = pki.sign(&first.payload(BUNDLE, "Sandbox"));
    let s2 = pki.sign(&second.payload(BUNDLE, "Sandbox"));
    // The renewal arrives before the first purchase's notification.
    let renew = pki.sign(&notification("n-renew", "DID_RENEW", None, BUNDLE, "Sandbox", &s2, None));
    assert_eq!(notify(&a, renew.clone()).await.1["outcome"], "applied");
    assert_eq!(
        notify(&a, pki.sign(&notification("n-sub", "SUBSCRIBED", Some("INITIAL_BUY"), BUNDLE, "Sandbox", &s1, None))).await.1["outcome"],
        "applied"
    );
    let (_, e) = a.call("GET", "/v1/entitlements", Some(&t), None).await;
    let end = e["period_end"].as_str().unwrap().to_string();
    assert_eq!(chrono::DateTime::parse_from_rfc3339(&end).unwrap().timestamp(), second.expires.unwrap().timestamp());
    // Replayed: a duplicate, nothing changes.
    let before = footprint(&a).await;
    let (s, b) = notify(&a, renew).await;
    assert_eq!((s, b["duplicate"].as_bool()), (StatusCode::OK, Some(true)));
    assert_eq!(footprint(&a).await, before);
    // A restore re-signs the old period with a fresh signedDate: the renewal stands.
    let mut old = first.payload(BUNDLE, "Sandbox");
    old["signedDate"] = json!(apple_pki::ms(now + Duration::minutes(5)));
    let (s, b) = buy(&a, &t, &[pki.sign(&old)]).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["period_end"].as_str(), Some(end.as_str()));
    // A refund of the past period leaves the current one.
    let mut refunded_old = first.payload(BUNDLE, "Sandbox");
    refunded_old["revocationDate"] = json!(apple_pki::ms(now));
    refunded_old["revocationReason"] = json!(0);
    refunded_old["signedDate"] = json!(apple_pki::ms(now + Duration::minutes(6)));
    let n = pki.sign(&notification("n-refund-old", "REFUND", None, BUNDLE, "Sandbox", &pki.sign(&refunded_old), None));
    assert_eq!(notify(&a, n).await.1["outcome"], "applied");
    assert_eq!(plan(&a, &t).await.0, "pro");
    // Billing fails with Apple's grace period: pro until the grace date, then free.
    a.clock.advance(Duration::days(41));
    let r = renewal("4000", "pro_monthly", "Sandbox", true, true, Some(now + Duration::days(44)), now + Duration::days(41));
    let n = pki.sign(&notification("n-fail", "DID_FAIL_TO_RENEW", Some("GRACE_PERIOD"), BUNDLE, "Sandbox", &s2, Some(&pki.sign(&r))));
    assert_eq!(notify(&a, n).await.1["outcome"], "applied");
    let (p, _, e) = plan(&a, &t).await;
    assert_eq!((p.as_str(), e["status"].as_str()), ("pro", Some("past_due")), "{e}");
    a.clock.advance(Duration::days(4));
    assert_eq!(plan(&a, &t).await.0, "free", "Apple's grace ended");
    // Billing recovered: a newer renewal brings the same subscription back.
    let back = monthly("4002", "4000", Some(&me), 45);
    let sb = pki.sign(&back.payload(BUNDLE, "Sandbox"));
    let n = pki.sign(&notification("n-recover", "DID_RENEW", Some("BILLING_RECOVERY"), BUNDLE, "Sandbox", &sb, None));
    assert_eq!(notify(&a, n).await.1["outcome"], "applied");
    assert_eq!(plan(&a, &t).await.0, "pro");
    // A refund of the current period takes the plan away.
    let mut refunded = back.payload(BUNDLE, "Sandbox");
    refunded["revocationDate"] = json!(apple_pki::ms(now + Duration::days(45)));
    refunded["signedDate"] = json!(apple_pki::ms(now + Duration::days(46)));
    let n = pki.sign(&notification("n-refund", "REFUND", None, BUNDLE, "Sandbox", &pki.sign(&refunded), None));
    assert_eq!(notify(&a, n).await.1["outcome"], "applied");
    assert_eq!(plan(&a, &t).await.0, "free");
    // CONSUMPTION_REQUEST is acknowledged.
    let n = pki.sign(&notification("n-consumption", "CONSUMPTION_REQUEST", None, BUNDLE, "Sandbox", &sb, None));
    assert_eq!(notify(&a, n).await.1["outcome"], "acknowledged");
}

#[tokio::test]
async fn trials_lifetime_plans_and_credit_packs() {
    let pki = Pki::new();
    let a = app_or_skip!(apple_app(&pki, "Sandbox", false).await);
    let t = token("apple-trial");
    let me = uid(&a, &t).await;
    let mut trial = monthly("5000", "5000", Some(&me), 0).payload(BUNDLE, "Sandbox");
    trial["offerType"] = json!(1);
    let (s, b) = buy(&a, &t, &[pki.sign(&trial)]).await;
    assert_eq!((s, b["access_reason"].as_str(), b["status"].as_str()), (StatusCode::OK, Some("trial"), Some("trialing")), "{b}");

    let t = token("apple-lifetime");
    let me = uid(&a, &t).await;
    let life = Tx { product: "pro_forever", expires: None, ..monthly("5100", "5100", Some(&me), 0) };
    let mut p = life.payload(BUNDLE, "Sandbox");
    p["type"] = json!("Non-Consumable");
    let (s, b) = buy(&a, &t, &[pki.sign(&p)]).await;
    assert_eq!((s, b["access_reason"].as_str(), &b["period_end"]), (StatusCode::OK, Some("lifetime"), &Value::Null), "{b}");
    let (s, _) = a.call("DELETE", "/v1/me", Some(&t), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "a lifetime plan never blocks a deletion");

    let t = token("apple-credits");
    let me = uid(&a, &t).await;
    let pack = Tx { product: "credits_100", expires: None, ..monthly("5200", "5200", Some(&me), 0) };
    let jws = pki.sign(&pack.payload(BUNDLE, "Sandbox"));
    let (s, b) = buy(&a, &t, std::slice::from_ref(&jws)).await;
    assert_eq!(
        (s, b["credit_balance"].as_i64(), b["purchases"][0]["status"].as_str()),
        (StatusCode::OK, Some(100), Some("credited")),
        "{b}"
    );
    let (_, b) = buy(&a, &t, &[jws]).await;
    assert_eq!(b["credit_balance"].as_i64(), Some(100), "granted once per transaction");
    // 3 images spend 30 of the pack.
    let (s, u) = a
        .call(
            "POST",
            "/v1/usage",
            Some(&t),
            Some(json!({"id": uuid::Uuid::now_v7(), "feature": "images", "amount": 3, "occurred_at": Utc::now().to_rfc3339()})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    let mut refunded = pack.payload(BUNDLE, "Sandbox");
    refunded["revocationDate"] = json!(apple_pki::ms(Utc::now()));
    refunded["signedDate"] = json!(apple_pki::ms(Utc::now() + Duration::minutes(1)));
    let n = pki.sign(&notification("n-pack-refund", "REFUND", None, BUNDLE, "Sandbox", &pki.sign(&refunded), None));
    assert_eq!(notify(&a, n).await.1["outcome"], "applied");
    let (_, _, e) = plan(&a, &t).await;
    assert_eq!(e["credit_balance"].as_i64(), Some(-30), "the unspent 70 went back, the 30 spent are debt: {e}");
}

/// The moment the conformance fixtures (`tests/fixtures/apple`) describe.
fn fixture_now() -> chrono::DateTime<Utc> {
    chrono::DateTime::parse_from_rfc3339("2025-07-01T12:00:00Z").unwrap().with_timezone(&Utc)
}

/// The notification fixture `name`, its subscription renamed `original` (each replay is a
/// subscription of its own) and bound to `user` by its account token.
fn fixture_notification(name: &str, original: &str, user: &str) -> Value {
    let mut n = apple_pki::fixture(&format!("notifications/{name}.json"));
    n["notificationUUID"] = json!(format!("{}-{original}", n["notificationUUID"].as_str().unwrap()));
    let d = &mut n["data"];
    d["signedTransactionInfo"]["transactionId"] = json!(format!("{original}1"));
    d["signedTransactionInfo"]["originalTransactionId"] = json!(original);
    d["signedTransactionInfo"]["appAccountToken"] = json!(user);
    if d.get("signedRenewalInfo").is_some() {
        d["signedRenewalInfo"]["originalTransactionId"] = json!(original);
        d["signedRenewalInfo"]["appAccountToken"] = json!(user);
    }
    n
}

/// What each notification fixture does to a user who has nothing else: the outcome, then the
/// plan, status and auto-renewal the user has at the fixtures' moment.
const NOTIFICATION_EFFECTS: &[(&str, &str, &str, &str, Option<bool>)] = &[
    ("SUBSCRIBED.INITIAL_BUY", "applied", "pro", "active", Some(true)),
    ("SUBSCRIBED.RESUBSCRIBE", "applied", "pro", "active", Some(true)),
    ("DID_RENEW", "applied", "pro", "active", Some(true)),
    ("DID_RENEW.BILLING_RECOVERY", "applied", "pro", "active", Some(true)),
    ("DID_CHANGE_RENEWAL_STATUS.AUTO_RENEW_DISABLED", "applied", "pro", "active", Some(false)),
    ("DID_CHANGE_RENEWAL_STATUS.AUTO_RENEW_ENABLED", "applied", "pro", "active", Some(true)),
    // Apple retries without a grace period of its own: the server's grace (TALLY_PAST_DUE_GRACE_SECS) applies.
    ("DID_FAIL_TO_RENEW", "applied", "pro", "past_due", Some(true)),
    ("DID_FAIL_TO_RENEW.GRACE_PERIOD", "applied", "pro", "past_due", Some(true)),
    ("GRACE_PERIOD_EXPIRED", "applied", "free", "past_due", Some(true)),
    ("EXPIRED.VOLUNTARY", "applied", "free", "canceled", Some(false)),
    ("EXPIRED.BILLING_RETRY", "applied", "free", "canceled", Some(false)),
    ("EXPIRED.PRICE_INCREASE", "applied", "free", "canceled", Some(false)),
    ("EXPIRED.PRODUCT_NOT_FOR_SALE", "applied", "free", "canceled", Some(false)),
    ("REFUND", "applied", "free", "canceled", Some(false)),
    ("REVOKE", "applied", "free", "canceled", Some(false)),
    ("CONSUMPTION_REQUEST", "acknowledged", "free", "none", None),
];

/// The plan, status and auto-renewal of `bearer` (`None`: no subscription).
async fn effect(a: &TestApp, bearer: &str) -> (String, String, Option<bool>) {
    let (_, e) = a.call("GET", "/v1/entitlements", Some(bearer), None).await;
    let (_, bill) = a.call("GET", "/v1/billing", Some(bearer), None).await;
    (e["plan"].as_str().unwrap().into(), e["status"].as_str().unwrap().into(), bill["subscriptions"][0]["auto_renew"].as_bool())
}

#[tokio::test]
async fn every_app_store_notification_fixture_replays_with_its_effect() {
    let pki = Pki::new();
    let a = app_or_skip!(apple_app(&pki, "Sandbox", false).await);
    a.clock.set(fixture_now());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/apple/notifications");
    let mut files: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().trim_end_matches(".json").to_string()).collect();
    files.sort();
    let mut listed: Vec<String> = NOTIFICATION_EFFECTS.iter().map(|e| e.0.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed, "every fixture has its expected effect");
    let mut wrong = Vec::new();
    for (i, (name, outcome, plan, status, auto_renew)) in NOTIFICATION_EFFECTS.iter().enumerate() {
        let t = token(&format!("apple-fixture-{name}"));
        let me = uid(&a, &t).await;
        let n = fixture_notification(name, &format!("30000000{i:02}"), &me);
        let (s, b) = notify(&a, pki.sign_notification(&n)).await;
        let got = (s.as_u16(), b["outcome"].as_str().unwrap_or("").to_string(), effect(&a, &t).await);
        let want = (200, outcome.to_string(), (plan.to_string(), status.to_string(), *auto_renew));
        if got != want {
            wrong.push(format!("{name}: got {got:?}, want {want:?} ({b})"));
        }
        // Delivered again: a duplicate by its notificationUUID.
        assert_eq!(notify(&a, pki.sign_notification(&n)).await.1["duplicate"], true, "{name}");
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A server at the fixtures' moment, a user (bearer, id) and the transaction fixture bound to
/// them.
async fn fixture_buyer(pki: &Pki, sub: &str) -> Option<(TestApp, String, String, Value)> {
    let a = apple_app(pki, "Sandbox", false).await?;
    a.clock.set(fixture_now());
    let t = token(sub);
    let me = uid(&a, &t).await;
    let mut txn = apple_pki::fixture("transaction.json");
    txn["appAccountToken"] = json!(me);
    Some((a, t, me, txn))
}

#[tokio::test]
async fn the_transaction_fixture_as_a_purchase_gives_the_plan() {
    let pki = Pki::new();
    let (a, t, _, txn) = app_or_skip!(fixture_buyer(&pki, "apple-fixture-purchase").await);
    let (s, b) = buy(&a, &t, &[pki.sign(&txn)]).await;
    assert_eq!((s, b["plan"].as_str(), b["status"].as_str()), (StatusCode::OK, Some("pro"), Some("active")), "{b}");
    assert_eq!(b["period_end"].as_str(), Some("2025-08-01T10:00:00Z"));
    let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
    assert_eq!((bill["payments"][0]["amount"].as_i64(), bill["payments"][0]["currency"].as_str()), (Some(4990), Some("USD")), "{bill}");
}

#[tokio::test]
async fn fields_no_documentation_names_yet_never_refuse_an_app_store_payload() {
    let pki = Pki::new();
    let (a, t, me, txn) = app_or_skip!(fixture_buyer(&pki, "apple-future-fields").await);
    let (s, b) = buy(&a, &t, &[pki.sign(&with_unknown_fields(&txn))]).await;
    assert_eq!((s, b["plan"].as_str()), (StatusCode::OK, Some("pro")), "{b}");
    // The notification, its transaction and its renewal info each with fields added.
    let n = with_unknown_fields(&fixture_notification("DID_CHANGE_RENEWAL_STATUS.AUTO_RENEW_DISABLED", "2000000912345678", &me));
    let body = json!({"signedPayload": pki.sign_notification(&n), "fieldAddedLater": true});
    let (s, b) = a.call("POST", "/v1/webhooks/apple", None, Some(body)).await;
    assert_eq!((s, b["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{b}");
    assert_eq!(effect(&a, &t).await, ("pro".into(), "active".into(), Some(false)));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    /// Whatever the order (and duplicates) of notifications and the app's own submissions, the
    /// subscription ends in the same state: renewed twice, then refunded in its last period
    /// after a grace period that ran out.
    #[test]
    fn the_lifecycle_ends_the_same_in_any_order(perm in Just((0..7usize).collect::<Vec<_>>()).prop_shuffle(), dups in proptest::collection::vec(0..7usize, 0..3)) {
        runtime().block_on(async {
            let pki = Pki::new();
            let Some(a) = apple_app(&pki, "Sandbox", false).await else { return };
            let t = token("apple-shuffled");
            let me = uid(&a, &t).await;
            let now = Utc::now();
            let p1 = monthly("6000", "6000", Some(&me), -70);
            let p2 = monthly("6001", "6000", Some(&me), -40);
            let p3 = monthly("6002", "6000", Some(&me), -10);
            let j = |tx: &Tx<'_>| pki.sign(&tx.payload(BUNDLE, "Sandbox"));
            let mut refunded = p2.payload(BUNDLE, "Sandbox");
            refunded["revocationDate"] = json!(apple_pki::ms(now - Duration::days(20)));
            refunded["signedDate"] = json!(apple_pki::ms(now + Duration::minutes(1)));
            let refunded = pki.sign(&refunded);
            let r_fail = pki.sign(&renewal("6000", "pro_monthly", "Sandbox", true, true, Some(now - Duration::days(35)), now - Duration::days(39)));
            let mut restore = p1.payload(BUNDLE, "Sandbox");
            restore["signedDate"] = json!(apple_pki::ms(now));
            let steps: Vec<(&str, String)> = vec![
                ("n1", pki.sign(&notification("s-1", "SUBSCRIBED", Some("INITIAL_BUY"), BUNDLE, "Sandbox", &j(&p1), None))),
                ("n2", pki.sign(&notification("s-2", "DID_RENEW", None, BUNDLE, "Sandbox", &j(&p2), None))),
                ("n3", pki.sign(&notification("s-3", "REFUND", None, BUNDLE, "Sandbox", &refunded, None))),
                ("n4", pki.sign(&notification("s-4", "DID_FAIL_TO_RENEW", Some("GRACE_PERIOD"), BUNDLE, "Sandbox", &j(&p2), Some(&r_fail)))),
                ("n5", pki.sign(&notification("s-5", "DID_RENEW", Some("BILLING_RECOVERY"), BUNDLE, "Sandbox", &j(&p3), None))),
                ("buy", j(&p3)),
                ("restore", pki.sign(&restore)),
            ];
            let mut order = perm;
            order.extend(dups);
            for i in order {
                let (kind, body) = &steps[i];
                let (s, b) = if kind.starts_with('n') { notify(&a, body.clone()).await } else { buy(&a, &t, std::slice::from_ref(body)).await };
                assert_eq!(s, StatusCode::OK, "{kind}: {b}");
            }
            let (_, bill) = a.call("GET", "/v1/billing", Some(&t), None).await;
            let sub = &bill["subscriptions"][0];
            assert_eq!((sub["status"].as_str(), sub["subscription_id"].as_str()), (Some("active"), Some("6000")), "{bill}");
            let end = chrono::DateTime::parse_from_rfc3339(sub["period_end"].as_str().unwrap()).unwrap().timestamp();
            assert_eq!(end, p3.expires.unwrap().timestamp());
            assert_eq!(plan(&a, &t).await.0, "pro");
            let refunds = bill["payments"].as_array().unwrap().iter().filter(|p| p["status"] == "refunded").count();
            assert_eq!(refunds, 1, "{bill}");
        });
    }
}
