//! Google Play end to end: devices (SQLite files) hand Play purchase tokens to a real
//! `tally-server` process on a real Postgres, which verifies them with a fake Google on loopback
//! (token endpoint, Play Developer API, push-token JWKS). A user who pays on Play and on Stripe
//! sees both in `GET /v1/billing`; cancelling one keeps pro on every device; the other
//! expiring (told by an authenticated Real-time Developer Notification) takes it away.

#[path = "../../server/tests/common/fake_google.rs"]
mod fake_google;

use chrono::{Duration, Utc};
use fake_google::{FakeGoogle, product, push_body, push_token, subscription};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use tally_core::{Catalog, Config, GooglePurchase, ManualClock, Profile, Purchase, SyncOptions, Tally};
use tally_e2e::*;

const WHSEC: &str = "whsec_e2e_google";

/// Plans with a flag only pro has, a credits feature, and what Play and Stripe sell.
const PLAY_PLANS: &str = r#"{"plans": [
  {"id": "free", "features": {"export": {"type": "flag", "enabled": false}, "images": {"type": "credits", "cost": 1}}},
  {"id": "pro", "features": {"export": {"type": "flag", "enabled": true}, "images": {"type": "credits", "cost": 1}}}],
  "products": [
    {"id": "pro_monthly", "store": "play", "grants": {"plan": "pro"}},
    {"id": "credits_10", "store": "play", "grants": {"credits": 10}},
    {"id": "price_pro", "store": "stripe", "grants": {"plan": "pro"}}]}"#;

fn open(dir: &Path, name: &str, keys: &str) -> Tally {
    let config = Config {
        device_id: Some(name.into()),
        clock: Arc::new(ManualClock::new(Utc::now())),
        catalog: Catalog::from_json(PLAY_PLANS).expect("catalog"),
        server_keys: Some(keys.into()),
        ..Config::default()
    };
    Tally::open(dir.join(format!("{name}.db")), config).expect("open device")
}

fn stripe_fixture(name: &str) -> Value {
    let path = format!("{}/../server/tests/fixtures/stripe/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture JSON")
}

/// A Stripe `customer.subscription.*` event of `sub_e2e_play` for `price_pro`.
fn stripe_subscription(kind: &str, id: &str, status: &str, at: i64) -> Value {
    let now = Utc::now();
    let mut e = stripe_fixture("customer.subscription.created");
    e["id"] = json!(id);
    e["type"] = json!(format!("customer.subscription.{kind}"));
    e["created"] = json!(at);
    let o = &mut e["data"]["object"];
    o["id"] = json!("sub_e2e_play");
    o["customer"] = json!("cus_e2e_play");
    o["status"] = json!(status);
    let item = &mut o["items"]["data"][0];
    item["current_period_start"] = json!(now.timestamp());
    item["current_period_end"] = json!((now + Duration::days(30)).timestamp());
    item["price"]["id"] = json!("price_pro");
    item["subscription"] = json!("sub_e2e_play");
    e
}

fn stripe(server: &Server, event: &Value) {
    let (status, body) = post_stripe_event(server, WHSEC, event);
    assert_eq!(status, 200, "{event}: {body}");
}

/// The Play stores and the `store` of the user's billing page.
fn billing(server: &Server, sub: &str) -> (Vec<String>, String) {
    let b: Value = serde_json::from_str(&http_get_text(&format!("{}/v1/billing", server.url), Some(&id_token(sub)))).expect("JSON");
    let mut stores: Vec<String> =
        b["subscriptions"].as_array().expect("subscriptions").iter().filter_map(|s| s["store"].as_str().map(String::from)).collect();
    stores.sort();
    (stores, b["store"].as_str().unwrap_or_default().to_string())
}

#[test]
fn paying_on_play_and_on_stripe_lists_both_cancelling_one_keeps_pro_and_the_other_expiring_ends_it() {
    let dir = tempfile::Builder::new().prefix("tally-e2e-google-").tempdir_in("/tmp").expect("tempdir");
    let Some(pg) = postgres(dir.path()) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let google = rt.block_on(FakeGoogle::start());
    let plans = dir.path().join("play-plans.json");
    std::fs::write(&plans, PLAY_PLANS).expect("plans");
    let mut env: Vec<(&str, String)> = google.env();
    env.push(("TALLY_PLANS_FILE", plans.display().to_string()));
    env.push(("TALLY_STRIPE_WEBHOOK_SECRET", WHSEC.into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&pg.url(), &dir.path().join("server"), &env_refs);
    let keys = server.keys();
    let options = |sub: &str| SyncOptions::new(&server.url, id_token(sub));
    let sub = "play-and-stripe";

    let phone = open(dir.path(), "pixel", &keys);
    let laptop = open(dir.path(), "laptop", &keys);
    let up = phone.sign_in(Profile { external_id: sub.into(), ..Profile::default() }, None).expect("sign in").id;
    let ul = laptop.sign_in(Profile { external_id: sub.into(), ..Profile::default() }, None).expect("sign in").id;
    rt.block_on(phone.sync(&up, options(sub))).expect("sync");
    rt.block_on(laptop.sync(&ul, options(sub))).expect("sync");
    let account = phone.account_token(&up).expect("account token");

    // The phone buys on Play (bound by setObfuscatedAccountId) and a credit pack: pro offline at once.
    let now = Utc::now();
    google.set_sub(
        "e2e-sub",
        subscription("pro_monthly", "SUBSCRIPTION_STATE_ACTIVE", now, now + Duration::days(30), Some(&account), "GPA.e2e-1"),
    );
    google.set_product("credits_10", "e2e-pack", product(0, now, Some(&account), "GPA.e2e-2"));
    let bought = Purchase::Google {
        purchases: vec![
            GooglePurchase { product_id: "pro_monthly".into(), purchase_token: "e2e-sub".into() },
            GooglePurchase { product_id: "credits_10".into(), purchase_token: "e2e-pack".into() },
        ],
    };
    let report = rt.block_on(phone.submit_purchase(&up, bought, options(sub))).expect("purchase");
    let mut outcomes: Vec<(&str, &str)> =
        report.purchases.iter().map(|p| (p.product_id.as_deref().unwrap_or_default(), p.status.as_str())).collect();
    outcomes.sort();
    assert_eq!(outcomes, [("credits_10", "credited"), ("pro_monthly", "active")], "{report:?}");
    assert!(phone.check(&up, "export", 1).expect("check").allowed, "pro applies before any sync");
    assert_eq!(phone.entitlements(&up).expect("entitlements").credit_balance, 10);
    {
        let play = google.play.lock().expect("fake state");
        assert_eq!(
            (play.acknowledged.clone(), play.consumed.clone()),
            (vec!["pro_monthly:e2e-sub".to_string()], vec!["credits_10:e2e-pack".to_string()])
        );
    }

    // The same user subscribes on the web too (Stripe checkout and subscription).
    let mut checkout = stripe_fixture("checkout.session.completed");
    checkout["id"] = json!("evt_e2e_play_checkout");
    checkout["created"] = json!(now.timestamp());
    checkout["data"]["object"]["client_reference_id"] = json!(account);
    checkout["data"]["object"]["customer"] = json!("cus_e2e_play");
    checkout["data"]["object"]["subscription"] = json!("sub_e2e_play");
    stripe(&server, &checkout);
    stripe(&server, &stripe_subscription("created", "evt_e2e_play_1", "active", now.timestamp()));
    assert_eq!(billing(&server, sub).0, ["play", "stripe"]);

    // Stripe canceled: Play still gives pro, on both devices after their next sync.
    stripe(&server, &stripe_subscription("deleted", "evt_e2e_play_2", "canceled", now.timestamp() + 5));
    for (t, u) in [(&phone, &up), (&laptop, &ul)] {
        rt.block_on(t.sync(u, options(sub))).expect("sync");
        assert_eq!(t.entitlements(u).expect("entitlements").plan, "pro");
        assert!(t.check(u, "export", 1).expect("check").allowed);
    }
    assert_eq!(billing(&server, sub).1, "play");

    // Play expires, told by an authenticated push; a replay of the push changes nothing more.
    google.edit_sub("e2e-sub", |s| {
        s["subscriptionState"] = json!("SUBSCRIPTION_STATE_EXPIRED");
        s["lineItems"][0]["expiryTime"] = json!(fake_google::rfc3339(Utc::now()));
    });
    let note = json!({"subscriptionNotification": {"version": "1.0", "notificationType": 13, "purchaseToken": "e2e-sub", "subscriptionId": "pro_monthly"}});
    let body = push_body("e2e-expired-1", note).to_string();
    let url = format!("{}/v1/webhooks/google", server.url);
    let (status, answer) = raw_request("POST", &url, Some(&push_token(json!({}))), Some(&body)).expect("push");
    assert_eq!(status, 200, "{answer}");
    let (status, again) = raw_request("POST", &url, Some(&push_token(json!({}))), Some(&body)).expect("push again");
    assert!(status == 200 && again.contains("\"duplicate\":true"), "a replayed messageId is applied once: {status} {again}");
    for (t, u) in [(&phone, &up), (&laptop, &ul)] {
        rt.block_on(t.sync(u, options(sub))).expect("sync");
        assert_eq!(t.entitlements(u).expect("entitlements").plan, "free");
        assert!(!t.check(u, "export", 1).expect("check").allowed);
        assert_eq!(t.entitlements(u).expect("entitlements").credit_balance, 10, "the credit pack stays");
    }
    drop(server);
}
