//! Timezone changes on the server: a change never resets a window in force (the exploit of
//! moving to a zone whose midnight just passed), at most one change per 24 h, and a change that
//! waits for the latest device lease (`timezone_pending`) — through the real router, on real
//! Postgres, with a manual clock and real signed device tokens.

mod common;

use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use common::*;
use serde_json::{Value, json};
use std::sync::Arc;
use tally_core::{EntitlementClaims, ManualClock, TimezoneHistory};

const CAT: &str = r#"{"models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000}},
 "plans": [{"id": "free", "features": {
  "daily":    {"type": "metered", "limit": 3, "period": "day", "enforcement": "hard", "offline_share": 0},
  "ai_spend": {"type": "budget", "limit_micros": 1000000, "period": "day", "enforcement": "hard", "offline_share": 0},
  "weekly":   {"type": "metered", "limit": 10, "period": "week", "enforcement": "hard"}}}]}"#;

struct T {
    a: TestApp,
    clock: Arc<ManualClock>,
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

async fn tapp(start: &str) -> Option<T> {
    let url = fresh_db().await?;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(&url, dir.path());
    std::fs::write(config.plans_file.as_ref().unwrap(), CAT).unwrap();
    let clock = Arc::new(ManualClock::new(at(start)));
    let state = tally_server::AppState::with_clock(config, clock.clone()).await.expect("state");
    let router = tally_server::app(state.clone());
    Some(T { a: TestApp { state, router, url, dir, clock: Arc::new(TestClock::default()) }, clock })
}

impl T {
    async fn post(&self, t: &str, path: &str, body: Value) -> (StatusCode, Value) {
        self.a.call("POST", path, Some(t), Some(body)).await
    }
    async fn patch_tz(&self, t: &str, tz: &str) -> (StatusCode, Value, axum::http::HeaderMap) {
        self.a.raw("PATCH", "/v1/me", Some(t), serde_json::to_vec(&json!({"timezone": tz})).unwrap(), &[]).await
    }
    async fn me(&self, t: &str) -> Value {
        let (s, v) = self.a.call("GET", "/v1/me", Some(t), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }
    /// The day total of `feature` a protocol-1 sync answers for the current window.
    async fn day_total(&self, t: &str, feature: &str) -> Value {
        let (s, v) = self.a.sync(t, "reader", vec![]).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let now = tally_core::Clock::now(self.clock.as_ref());
        v["totals"]
            .as_array()
            .and_then(|ts| {
                ts.iter()
                    .find(|x| {
                        x["feature"] == feature
                            && at(x["period_start"].as_str().unwrap()) <= now
                            && x["period_end"].as_str().is_some_and(|e| at(e) > now)
                    })
                    .cloned()
            })
            .unwrap_or_else(|| panic!("no current {feature} total in {v}"))
    }
    async fn claims(&self, sub: &str, resp: &Value) -> EntitlementClaims {
        let (_, jwks) = self.a.call("GET", "/v1/keys", None, None).await;
        tally_core::token::verify(resp["entitlements_token"].as_str().unwrap(), &jwks.to_string(), sub).expect("verify")
    }
}

#[tokio::test]
async fn moving_to_a_zone_whose_midnight_just_passed_does_not_refill_a_hard_daily_limit_or_budget() {
    let s = app_or_skip!(tapp("2026-06-08T00:00:00Z").await);
    let t = token("mover");
    let (st, me, _) = s.patch_tz(&t, "America/New_York").await;
    assert_eq!((st, me["timezone"].as_str()), (StatusCode::OK, Some("America/New_York")), "{me}");
    // 2026-06-10, 05:50 in New York: the day's limit and budget are spent.
    s.clock.set(at("2026-06-10T09:50:00Z"));
    for _ in 0..3 {
        let (st, v) = s.post(&t, "/v1/consume", json!({"feature": "daily", "amount": 1})).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let (st, v) = s.post(&t, "/v1/consume", json!({"feature": "ai_spend", "model": "gpt-4o", "output_tokens": 100000})).await;
    assert_eq!((st, v["decision"]["reason"].as_str()), (StatusCode::OK, Some("ok")), "{v}");
    let denied = |v: &Value| v["allowed"] == false;
    assert!(denied(&s.post(&t, "/v1/check", json!({"feature": "daily", "amount": 1})).await.1));
    assert!(denied(&s.post(&t, "/v1/check", json!({"feature": "ai_spend", "amount": 1})).await.1));

    // 28 minutes later, Kiritimati (UTC+14) is 18 minutes into a new day. No device holds a
    // lease, so the change takes effect at once; the day in force keeps its New York bounds.
    s.clock.set(at("2026-06-10T10:18:00Z"));
    let (st, me, _) = s.patch_tz(&t, "Pacific/Kiritimati").await;
    assert_eq!((st, me["timezone"].as_str()), (StatusCode::OK, Some("Pacific/Kiritimati")), "{me}");
    assert!(me.get("timezone_pending").is_none(), "{me}");
    let (st, v) = s.post(&t, "/v1/consume", json!({"feature": "daily", "amount": 1})).await;
    assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::PAYMENT_REQUIRED, Some("limit_reached")), "{v}");
    let (_, v) = s.post(&t, "/v1/check", json!({"feature": "ai_spend", "amount": 1})).await;
    assert!(denied(&v), "the budget stays spent: {v}");
    assert_eq!(s.a.count("events").await, 4, "the denials recorded nothing");
    let day = s.day_total(&t, "daily").await;
    assert_eq!(
        (day["period_start"].as_str(), day["period_end"].as_str(), &day["used"]),
        (Some("2026-06-10T04:00:00Z"), Some("2026-06-11T04:00:00Z"), &json!(3))
    );
    let (_, e) = s.a.call("GET", "/v1/entitlements", Some(&t), None).await;
    assert_eq!(e["tz"], "Pacific/Kiritimati");
    assert_eq!(e["tz_history"][0]["tz"], "UTC", "the zone the user started with: {e}");
    assert_eq!(
        e["tz_history"].as_array().unwrap()[1..],
        [
            json!({"tz": "America/New_York", "from": "2026-06-08T00:00:00Z"}),
            json!({"tz": "Pacific/Kiritimati", "from": "2026-06-10T10:18:00Z"})
        ]
    );

    // The next day starts at New York's midnight and lasts until Kiritimati's first midnight a
    // full day later (the 13th, 00:00 there): one limit, never two, in that time.
    s.clock.set(at("2026-06-11T04:00:00Z"));
    let day = s.day_total(&t, "daily").await;
    assert_eq!((day["period_start"].as_str(), day["period_end"].as_str()), (Some("2026-06-11T04:00:00Z"), Some("2026-06-12T10:00:00Z")));
    for _ in 0..3 {
        assert_eq!(s.post(&t, "/v1/consume", json!({"feature": "daily", "amount": 1})).await.0, StatusCode::OK);
    }
    s.clock.set(at("2026-06-12T09:59:59Z"));
    assert_eq!(s.post(&t, "/v1/consume", json!({"feature": "daily", "amount": 1})).await.0, StatusCode::PAYMENT_REQUIRED);
    s.clock.set(at("2026-06-12T10:00:00Z"));
    assert_eq!(s.post(&t, "/v1/consume", json!({"feature": "daily", "amount": 1})).await.0, StatusCode::OK, "Kiritimati's days from here");
}

#[tokio::test]
async fn one_timezone_change_per_24_hours_a_patch_is_429_and_a_sync_completes_without_it() {
    let s = app_or_skip!(tapp("2026-03-01T12:00:00Z").await);
    let t = token("hopper");
    assert_eq!(s.patch_tz(&t, "Europe/Paris").await.0, StatusCode::OK);
    // The same zone again is no change.
    assert_eq!(s.patch_tz(&t, "Europe/Paris").await.0, StatusCode::OK);
    s.clock.set(at("2026-03-02T11:00:00Z"));
    let body = serde_json::to_vec(&json!({"timezone": "Asia/Tokyo", "display_name": "Hop"})).unwrap();
    let (st, v, headers) = s.a.raw("PATCH", "/v1/me", Some(&t), body, &[]).await;
    assert_eq!((st, v["error"]["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("timezone_change_too_soon")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("24 h"), "{v}");
    assert_eq!(headers.get("retry-after").and_then(|h| h.to_str().ok()), Some("3600"));
    let me = s.me(&t).await;
    assert_eq!((me["timezone"].as_str(), &me["display_name"]), (Some("Europe/Paris"), &Value::Null), "nothing changed: {me}");
    assert_eq!(s.a.count("timezone_changes").await, 1);

    // A sync carrying the same edit completes: its events count, the name changes, the zone
    // comes back refused with that code.
    let body = json!({"protocol": 1, "device_id": "d", "events": [event(uuid::Uuid::now_v7(), "weekly", 1)],
                      "profile": {"timezone": "Asia/Tokyo", "display_name": "Hop"}});
    let (st, v) = s.post(&t, "/v1/sync", body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["profile_rejected"], json!([{"field": "timezone", "reason": "timezone_change_too_soon"}]));
    assert_eq!(v["accepted"].as_array().map(Vec::len), Some(1));
    let me = s.me(&t).await;
    assert_eq!((me["timezone"].as_str(), me["display_name"].as_str()), (Some("Europe/Paris"), Some("Hop")));

    s.clock.set(at("2026-03-02T12:00:00Z"));
    let (st, me, _) = s.patch_tz(&t, "Asia/Tokyo").await;
    assert_eq!((st, me["timezone"].as_str()), (StatusCode::OK, Some("Asia/Tokyo")), "24 h later: {me}");
}

#[tokio::test]
async fn a_change_waits_for_the_latest_device_lease_and_tokens_carry_it_pending() {
    let s = app_or_skip!(tapp("2026-09-14T20:00:00Z").await);
    let t = token("leased");
    let (st, r) = s.post(&t, "/v1/sync", json!({"protocol": 2, "device_id": "phone"})).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let c = s.claims("leased", &r).await;
    let lease_until = DateTime::from_timestamp(c.lease_until.expect("a device token"), 0).unwrap();
    assert_eq!(c.entitlements.tz_history, vec![tally_core::ZoneChange { tz: "UTC".into(), from: c.entitlements.tz_history[0].from }]);

    // The phone's lease computed its windows in UTC: the change waits for its end.
    let (st, me, _) = s.patch_tz(&t, "Pacific/Chatham").await;
    assert_eq!(st, StatusCode::OK, "{me}");
    let pending = json!({"timezone": "Pacific/Chatham", "effective_at": lease_until});
    assert_eq!((me["timezone"].as_str(), &me["timezone_pending"]), (Some("UTC"), &pending), "{me}");
    assert_eq!(s.me(&t).await["timezone_pending"], pending);
    // Windows stay UTC's meanwhile; a backend's use counts in the UTC day.
    s.clock.set(at("2026-09-15T23:00:00Z"));
    let day = s.day_total(&t, "daily").await;
    assert_eq!(day["period_start"], "2026-09-15T00:00:00Z");
    // The phone's next token carries the pending change, so it computes the same windows.
    let (_, r) = s.post(&t, "/v1/sync", json!({"protocol": 2, "device_id": "phone", "lease_ver": c.lease_ver})).await;
    let c2 = s.claims("leased", &r).await;
    assert_eq!(c2.entitlements.tz.as_deref(), Some("UTC"));
    let h = TimezoneHistory::from_wire(&c2.entitlements.tz_history).unwrap();
    assert_eq!(h.pending(at("2026-09-15T23:00:00Z")), Some((chrono_tz::Pacific::Chatham, lease_until)));
    assert!(c2.lease_until.unwrap() > c.lease_until.unwrap(), "a later lease: the next change will wait for it");

    // At the lease's end the change is in force, with no window reset.
    s.clock.set(lease_until);
    let me = s.me(&t).await;
    assert_eq!(me["timezone"], "Pacific/Chatham", "{me}");
    assert!(me.get("timezone_pending").is_none(), "{me}");
    let (_, e) = s.a.call("GET", "/v1/entitlements", Some(&t), None).await;
    assert_eq!(e["tz"], "Pacific/Chatham");
    let day = s.day_total(&t, "daily").await;
    let utc_day_start = at(&format!("{}T00:00:00Z", lease_until.format("%Y-%m-%d")));
    assert_eq!(at(day["period_start"].as_str().unwrap()), utc_day_start, "the UTC day in force keeps its bounds: {day}");
    assert_eq!(at(day["period_end"].as_str().unwrap()), utc_day_start + Duration::days(1));

    // A change made by a device in a sync waits for the latest lease too (the one just issued).
    s.clock.set(lease_until + Duration::days(1));
    let (_, r) = s.post(&t, "/v1/sync", json!({"protocol": 2, "device_id": "tablet", "profile": {"timezone": "Asia/Tokyo"}})).await;
    assert_eq!(r["profile_rejected"], json!([]));
    let me = s.me(&t).await;
    assert_eq!(me["timezone"], "Pacific/Chatham");
    assert_eq!(me["timezone_pending"]["timezone"], "Asia/Tokyo");
    assert_eq!(me["timezone_pending"]["effective_at"], json!(DateTime::from_timestamp(c2.lease_until.unwrap(), 0).unwrap()));
}
