//! End to end with Stripe: a free user hits the `ai_chat` limit on a device; a signed
//! `checkout.session.completed` + `customer.subscription.created` reach the real server; the
//! device syncs and its next consume is allowed under the pro limit; a
//! `customer.subscription.deleted` and a sync bring it back to free.

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use tally_core::{Profile, Reason, SyncOptions, UsageMeta};
use tally_e2e::*;

const WHSEC: &str = "whsec_e2e_secret";

fn fixture(name: &str) -> Value {
    let path = format!("{}/../server/tests/fixtures/stripe/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture json")
}

fn subscription(kind: &str, id: &str, status: &str, at: chrono::DateTime<Utc>) -> Value {
    let mut e = fixture("customer.subscription.created");
    e["id"] = json!(id);
    e["type"] = json!(format!("customer.subscription.{kind}"));
    e["created"] = json!(at.timestamp());
    let o = &mut e["data"]["object"];
    o["id"] = json!("sub_e2e");
    o["customer"] = json!("cus_e2e");
    o["status"] = json!(status);
    o["items"]["data"][0]["current_period_start"] = json!((at - Duration::days(1)).timestamp());
    o["items"]["data"][0]["current_period_end"] = json!((at + Duration::days(29)).timestamp());
    e
}

#[test]
fn purchase_reaches_the_device_on_its_next_sync_and_cancellation_returns_it_to_free() {
    let dir = tempfile::Builder::new().prefix("tally-e2e-billing-").tempdir_in("/tmp").expect("tempdir");
    let Some(pg) = postgres(dir.path()) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let db_url = rt.block_on(pg.create_database("billing_e2e")).expect("database");
    let server = Server::start(
        &db_url,
        &dir.path().join("server"),
        &[("TALLY_STRIPE_WEBHOOK_SECRET", WHSEC), ("TALLY_STRIPE_PRICES", "price_pro_monthly=pro")],
    );
    let d = device(&dir.path().join("phone.db"), "phone", &server.keys(), Utc::now());
    let sub = "buyer-e2e";
    let user = d
        .tally
        .sign_in(Profile { external_id: sub.into(), email: Some(format!("{sub}@example.com")), ..Profile::default() }, None)
        .expect("sign in");
    let sync = |force: bool| {
        let mut o = SyncOptions::new(&server.url, id_token(sub));
        o.force_entitlements = force;
        rt.block_on(d.tally.sync(&user.id, o)).expect("sync")
    };
    // The app means to chat offline: the first sync claims the pool (a device that never asked
    // for a feature and never used it holds no room of it).
    d.tally.prepare_offline(&user.id, "ai_chat", 5).expect("prepare");
    sync(false);

    // Free: 5 chats a month, the 6th is refused.
    for _ in 0..5 {
        assert!(d.tally.consume(&user.id, "ai_chat", 1, UsageMeta::default()).expect("consume").allowed);
    }
    let denied = d.tally.consume(&user.id, "ai_chat", 1, UsageMeta::default()).expect("consume");
    assert_eq!((denied.allowed, denied.reason), (false, Reason::LimitReached));
    sync(false);

    // The purchase: Checkout completes (linking the customer to this user), then the subscription.
    let me: Value = serde_json::from_str(&http_get_text(&format!("{}/v1/me", server.url), Some(&id_token(sub)))).expect("me");
    let uid = me["id"].as_str().expect("user id").to_string();
    let now = Utc::now();
    let mut checkout = fixture("checkout.session.completed");
    checkout["id"] = json!("evt_e2e_checkout");
    checkout["created"] = json!(now.timestamp());
    checkout["data"]["object"]["client_reference_id"] = json!(uid);
    checkout["data"]["object"]["customer"] = json!("cus_e2e");
    let (status, body) = post_stripe_event(&server, WHSEC, &checkout);
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_stripe_event(&server, WHSEC, &subscription("created", "evt_e2e_created", "active", now));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""outcome":"applied""#), "{body}");
    // A badly signed copy changes nothing.
    let (status, _) = raw_request("POST", &format!("{}/v1/webhooks/stripe", server.url), None, Some(&checkout.to_string())).expect("post");
    assert_eq!(status, 400);

    // The device syncs: pro, and the next consume is allowed under the pro limit.
    let report = sync(false);
    assert!(report.entitlements_updated);
    let ok = d.tally.consume(&user.id, "ai_chat", 1, UsageMeta::default()).expect("consume");
    assert!(ok.allowed, "{ok:?}");
    assert_eq!((ok.limit, ok.access_reason.as_str()), (Some(1000), "subscription"));
    assert_eq!(d.tally.entitlements(&user.id).expect("entitlements").plan, "pro");

    // Canceled: the next sync ("restore purchases" asks for a fresh token) brings it back to free.
    let (status, body) =
        post_stripe_event(&server, WHSEC, &subscription("deleted", "evt_e2e_deleted", "canceled", now + Duration::seconds(5)));
    assert_eq!(status, 200, "{body}");
    sync(true);
    let e = d.tally.entitlements(&user.id).expect("entitlements");
    assert_eq!((e.plan.as_str(), e.access_reason.as_str()), ("free", "free"));
    let again = d.tally.consume(&user.id, "ai_chat", 1, UsageMeta::default()).expect("consume");
    assert_eq!((again.allowed, again.reason), (false, Reason::LimitReached));
    let (status, body) =
        raw_request("POST", &format!("{}/v1/check", server.url), Some(&id_token(sub)), Some(r#"{"feature":"ai_chat","amount":1}"#))
            .expect("check");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("decision");
    assert_eq!((v["used"].as_u64(), v["allowed"].as_bool()), (Some(6), Some(false)), "5 free + 1 pro, each counted once: {body}");
}
