//! Protocol 2 (leases) on the server: grants and fair shares, releases and recalls, windows
//! entered offline, reclaim at `lease_until`, devices, clones, causes and void events — through
//! the real router, on real Postgres, with a manual clock and real signed device tokens.

mod common;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use common::*;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::sync::Arc;
use tally_core::lease::Lease;
use tally_core::{EntitlementClaims, ManualClock};
use uuid::Uuid;

const CAT: &str = r#"{"credits_offline_share": 0.5,
 "plans": [{"id": "free", "included_credits": {"amount": 100, "rollover": false}, "features": {
  "gen":    {"type": "metered", "limit": 10, "period": "month", "enforcement": "hard"},
  "half":   {"type": "metered", "limit": 10, "period": "month", "enforcement": "hard", "offline_share": 0.5},
  "soft":   {"type": "metered", "limit": 2, "period": "month", "enforcement": "soft"},
  "images": {"type": "credits", "cost": 1}}}]}"#;

struct L {
    a: TestApp,
    clock: Arc<ManualClock>,
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

async fn lapp_with(start: &str, f: impl FnOnce(&mut tally_server::Config)) -> Option<L> {
    let url = fresh_db().await?;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(&url, dir.path());
    std::fs::write(config.plans_file.as_ref().unwrap(), CAT).unwrap();
    f(&mut config);
    let clock = Arc::new(ManualClock::new(at(start)));
    let state = tally_server::AppState::with_clock(config, clock.clone()).await.expect("state");
    let router = tally_server::app(state.clone());
    Some(L { a: TestApp { state, router, url, dir, clock: Arc::new(TestClock::default()) }, clock })
}

async fn lapp(start: &str) -> Option<L> {
    lapp_with(start, |_| {}).await
}

impl L {
    async fn sync2(&self, t: &str, device: &str, extra: Value) -> Value {
        let (s, v) = self.sync2_raw(t, device, extra).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }
    /// A protocol-2 sync of `device`; unless `extra` says otherwise it asks for a unit of every
    /// hard pool (so it claims them all and is topped up to its fair share).
    async fn sync2_raw(&self, t: &str, device: &str, extra: Value) -> (StatusCode, Value) {
        let want = json!([{"feature": "gen", "units": 1}, {"feature": "half", "units": 1}, {"feature": "$credits", "units": 1}]);
        let mut body = json!({"protocol": 2, "device_id": device, "want": want});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.a.call("POST", "/v1/sync", Some(t), Some(body)).await
    }
    async fn claims(&self, sub: &str, resp: &Value) -> EntitlementClaims {
        let (_, jwks) = self.a.call("GET", "/v1/keys", None, None).await;
        tally_core::token::verify(resp["entitlements_token"].as_str().unwrap(), &jwks.to_string(), sub).expect("verify")
    }
    async fn consume(&self, t: &str, feature: &str, amount: u64) -> (StatusCode, Value, axum::http::HeaderMap) {
        let body = serde_json::to_vec(&json!({"feature": feature, "amount": amount})).unwrap();
        self.a.raw("POST", "/v1/consume", Some(t), body, &[]).await
    }
    async fn rows(&self, sql: &str) -> Vec<String> {
        let (client, conn) = tokio_postgres::connect(&self.a.url, tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        client
            .query(sql, &[])
            .await
            .expect("rows")
            .iter()
            .map(|r| (0..r.len()).map(|i| r.get::<_, Option<String>>(i).unwrap_or_default()).collect::<Vec<_>>().join("|"))
            .collect()
    }
}

fn lease<'a>(c: &'a EntitlementClaims, feature: &str) -> &'a Lease {
    c.leases.iter().find(|l| l.feature == feature).unwrap_or_else(|| panic!("no lease of {feature} in {:?}", c.leases))
}

fn ev(feature: &str, amount: u64, occurred: DateTime<Utc>, lease_ver: Option<u64>, seq: u64) -> Value {
    let mut e =
        json!({"id": Uuid::now_v7(), "feature": feature, "amount": amount, "occurred_at": occurred.to_rfc3339(), "device_seq": seq});
    if let Some(v) = lease_ver {
        e["lease_ver"] = json!(v);
    }
    e
}

fn recall_of(resp: &Value, feature: &str) -> Value {
    resp["recall"].as_array().and_then(|r| r.iter().find(|x| x["feature"] == feature)).map_or(Value::Null, |x| x["units"].clone())
}

fn total<'a>(resp: &'a Value, feature: &str, start: &str) -> &'a Value {
    resp["totals"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["feature"] == feature && t["period_start"].as_str().is_some_and(|s| at(s) == at(start))))
        .unwrap_or_else(|| panic!("no total of {feature} at {start} in {resp}"))
}

#[tokio::test]
async fn a_single_device_gets_the_whole_offline_share_and_a_backend_denied_for_held_room_recalls_it() {
    let l = app_or_skip!(lapp("2027-03-15T12:00:00Z").await);
    let t = token("solo");
    let r = l.sync2(&t, "phone", json!({})).await;
    let c = l.claims("solo", &r).await;
    assert_eq!(c.did.as_deref(), Some("phone"));
    assert!(c.lease_ver.unwrap() >= 1);
    assert_eq!(c.lease_until, Some(c.exp + 259_200), "lease_until = exp + TALLY_LEASE_ACTIVE_SECS");
    let g = lease(&c, "gen");
    assert_eq!((g.allowance, g.consumed, g.released, g.share.as_f64()), (10, 0, 0, 1.0));
    assert_eq!(g.period_start, Some(at("2027-03-01T00:00:00Z")));
    let h = lease(&c, "half");
    assert_eq!((h.allowance, h.share.as_f64()), (5, 0.5), "offline_share 0.5 of 10");
    let cr = lease(&c, "$credits");
    assert_eq!((cr.allowance, cr.period_start, cr.share.as_f64()), (50, None, 0.5), "credits_offline_share of the balance of 100");
    assert!(cr.expires_at.is_some(), "the plan's credits expire at the billing window's end");
    assert!(c.leases.iter().all(|l| l.feature != "soft"), "soft rules have no pool");

    // The per-user token of GET /v1/entitlements has no device part.
    let (_, e) = l.a.call("GET", "/v1/entitlements", Some(&t), None).await;
    let (_, jwks) = l.a.call("GET", "/v1/keys", None, None).await;
    let plain = tally_core::token::verify(e["token"].as_str().unwrap(), &jwks.to_string(), "solo").unwrap();
    assert!(plain.did.is_none() && plain.leases.is_empty() && plain.lease_ver.is_none());

    // The device holds all of `gen`: a backend is denied, told what the leases hold, and the
    // device is asked for it back.
    let (s, v, headers) = l.consume(&t, "gen", 2).await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{v}");
    assert_eq!(v["error"]["code"], "limit_reached");
    assert_eq!(v["decision"]["held_offline"], 10);
    assert_eq!(headers.get("retry-after").and_then(|h| h.to_str().ok()), Some("30"));
    assert_eq!(l.a.count("events").await, 0, "the denial recorded nothing");
    let r = l.sync2(&t, "phone", json!({"lease_ver": c.lease_ver})).await;
    assert_eq!(r["recall"], json!([{"feature": "gen", "period_start": "2027-03-01T00:00:00Z", "units": 2}]), "{r}");
    // It gives them back: the backend gets them, and the release is not handed back.
    let r = l.sync2(&t, "phone", json!({"release": [{"feature": "gen", "period_start": "2027-03-01T00:00:00Z", "units": 2}]})).await;
    let c = l.claims("solo", &r).await;
    assert_eq!((lease(&c, "gen").allowance, lease(&c, "gen").released), (8, 2), "not topped up in the releasing sync");
    assert!(r.get("recall").is_none_or(|x| x == &json!([])), "the recall is answered: {r}");
    let (s, v, _) = l.consume(&t, "gen", 2).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, _) = l.consume(&t, "gen", 1).await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED);
    // The same release again changes nothing (cumulative per window).
    let r = l.sync2(&t, "phone", json!({"release": [{"feature": "gen", "period_start": "2027-03-01T00:00:00Z", "units": 2}]})).await;
    assert_eq!(lease(&l.claims("solo", &r).await, "gen").allowance, 8);
}

#[tokio::test]
async fn offline_share_half_leaves_half_for_a_backend() {
    let l = app_or_skip!(lapp("2027-03-15T12:00:00Z").await);
    let t = token("halfer");
    let r = l.sync2(&t, "phone", json!({"want": [{"feature": "half", "units": 9}]})).await;
    assert_eq!(lease(&l.claims("halfer", &r).await, "half").allowance, 5, "want is capped by the offline share");
    for _ in 0..5 {
        let (s, v, _) = l.consume(&t, "half", 1).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v, _) = l.consume(&t, "half", 1).await;
    assert_eq!((s, &v["decision"]["held_offline"]), (StatusCode::PAYMENT_REQUIRED, &json!(5)), "{v}");
}

#[tokio::test]
async fn devices_split_fairly_and_a_new_device_lowers_shares_only_once_acknowledged() {
    let l = app_or_skip!(lapp("2027-03-30T12:00:00Z").await);
    let t = token("family");
    let a1 = l.claims("family", &l.sync2(&t, "a", json!({})).await).await;
    assert_eq!(lease(&a1, "gen").allowance, 10);
    let rb = l.sync2(&t, "b", json!({})).await;
    let b1 = l.claims("family", &rb).await;
    assert_eq!((lease(&b1, "gen").allowance, lease(&b1, "gen").share.as_f64()), (0, 0.5), "a holds it all");
    // a holds more than its fair share: recalled; once it releases, b gets its half.
    let ra = l.sync2(&t, "a", json!({"lease_ver": a1.lease_ver})).await;
    assert_eq!(recall_of(&ra, "gen"), 5, "{ra}");
    let a2 = l.claims("family", &ra).await;
    assert_eq!(lease(&a2, "gen").share.as_f64(), 0.5);
    l.sync2(
        &t,
        "a",
        json!({"lease_ver": a2.lease_ver, "release": [{"feature": "gen", "period_start": "2027-03-01T00:00:00Z", "units": 5}]}),
    )
    .await;
    let b2 = l.claims("family", &l.sync2(&t, "b", json!({"lease_ver": b1.lease_ver})).await).await;
    assert_eq!(lease(&b2, "gen").allowance, 5);
    // A third device: 10 / 3 each is fair, but a and b hold 5: c gets nothing yet, both recalled.
    let c1 = l.claims("family", &l.sync2(&t, "c", json!({})).await).await;
    assert_eq!((lease(&c1, "gen").allowance, lease(&c1, "gen").share.millionths()), (0, 333_333));
    // b learns of its lower share but does not acknowledge it; a acknowledges.
    let rb = l.sync2(&t, "b", json!({"lease_ver": b2.lease_ver})).await;
    assert_eq!(recall_of(&rb, "gen"), 2, "{rb}");
    let ra = l.sync2(&t, "a", json!({})).await;
    let a3 = l.claims("family", &ra).await;
    assert_eq!(lease(&a3, "gen").share.millionths(), 333_333);
    l.sync2(&t, "a", json!({"lease_ver": a3.lease_ver})).await;
    // April, everyone offline: the server reserves what each device may assume.
    l.clock.set(at("2027-04-01T01:00:00Z"));
    let (s, v, _) = l.consume(&t, "gen", 1).await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "10 reserved for devices that entered April offline: {v}");
    let rows = l
        .rows("SELECT device_id, allowance::text FROM pool_devices WHERE feature = 'gen' AND period_start = '2027-04-01T00:00:00Z' ORDER BY 1")
        .await;
    assert_eq!(rows, vec!["a|3", "b|5", "c|3"], "b keeps 1/2 until it acknowledges 1/3; a acknowledged");
}

#[tokio::test]
async fn leased_uses_count_in_the_window_they_occurred_in_and_a_window_entered_offline_is_reserved() {
    let l = app_or_skip!(lapp("2027-03-30T12:00:00Z").await);
    let t = token("late");
    let c = l.claims("late", &l.sync2(&t, "phone", json!({})).await).await;
    l.clock.set(at("2027-04-02T08:00:00Z"));
    // The device used its April share offline (the backend cannot take it) ...
    let (s, v, _) = l.consume(&t, "gen", 1).await;
    assert_eq!((s, &v["decision"]["held_offline"]), (StatusCode::PAYMENT_REQUIRED, &json!(10)), "{v}");
    // ... and one of March, synced now.
    let r = l
        .sync2(
            &t,
            "phone",
            json!({"lease_ver": c.lease_ver, "events": [
        ev("gen", 3, at("2027-03-31T23:00:00Z"), c.lease_ver, 1), ev("gen", 4, at("2027-04-01T09:00:00Z"), c.lease_ver, 2)]}),
        )
        .await;
    assert_eq!(r["accepted"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["used"], 3);
    assert_eq!(total(&r, "gen", "2027-04-01T00:00:00Z")["used"], 4);
    let c2 = l.claims("late", &r).await;
    let g = lease(&c2, "gen");
    assert_eq!((g.period_start, g.allowance, g.consumed), (Some(at("2027-04-01T00:00:00Z")), 10, 4), "the reserved April slice");
    assert_eq!(l.a.scalar("SELECT count(*) FROM events WHERE effective_at = occurred_at AND NOT clamped").await, 2);
}

#[tokio::test]
async fn reclaim_after_lease_until_frees_the_room_and_late_uses_count_as_reclaimed() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("lost");
    let c = l.claims("lost", &l.sync2(&t, "phone", json!({})).await).await;
    assert_eq!(l.consume(&t, "gen", 1).await.0, StatusCode::PAYMENT_REQUIRED);
    l.clock.set(DateTime::from_timestamp(c.lease_until.unwrap(), 0).unwrap());
    for _ in 0..10 {
        let (s, v, _) = l.consume(&t, "gen", 1).await;
        assert_eq!(s, StatusCode::OK, "the lease ended: {v}");
    }
    let r = l.sync2(&t, "phone", json!({"events": [ev("gen", 2, at("2027-03-11T00:00:00Z"), c.lease_ver, 1)]})).await;
    let tot = total(&r, "gen", "2027-03-01T00:00:00Z");
    assert_eq!((tot["used"].as_u64(), &tot["over_limit_causes"]), (Some(12), &json!(["reclaimed"])), "{tot}");
}

#[tokio::test]
async fn a_leased_use_of_a_window_that_ended_before_its_lease_arrives_late_without_counting_as_reclaimed() {
    let l = app_or_skip!(lapp("2027-03-31T23:00:00Z").await);
    let t = token("late-window");
    let c = l.claims("late-window", &l.sync2(&t, "phone", json!({})).await).await;
    assert_eq!(lease(&c, "gen").allowance, 10, "the phone holds the whole March pool");
    let until = DateTime::from_timestamp(c.lease_until.unwrap(), 0).unwrap();
    assert!(until > at("2027-04-01T00:00:00Z"), "the lease outlives the March window: {until}");
    // Another install, never leased, records 8 uses of March: over, because of it.
    let before: Vec<Value> = (1..=8).map(|i| ev("gen", 1, at("2027-03-31T23:20:00Z"), None, i)).collect();
    let r = l.sync2(&t, "tablet", json!({"events": before})).await;
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["over_limit_causes"], json!(["before_lease"]), "{r}");
    // Long after its lease ended, the phone reports 4 uses of its slice, made in March.
    l.clock.set(until + chrono::Duration::days(30));
    let r =
        l.sync2(&t, "phone", json!({"lease_ver": c.lease_ver, "events": [ev("gen", 4, at("2027-03-31T23:10:00Z"), c.lease_ver, 1)]})).await;
    assert_eq!(r["accepted"].as_array().unwrap().len(), 1, "{r}");
    let march = total(&r, "gen", "2027-03-01T00:00:00Z");
    // Its slice was whole for all of March: those uses are not why the window is over.
    assert_eq!((march["used"].as_u64(), &march["over_limit_causes"]), (Some(12), &json!(["before_lease"])), "{march}");
}

#[tokio::test]
async fn devices_are_listed_and_removed_and_others_devices_are_unknown() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("owner");
    l.sync2(&t, "phone", json!({})).await;
    assert_eq!(l.a.sync(&t, "old-tablet", vec![]).await.0, StatusCode::OK);
    let (s, v) = l.a.call("GET", "/v1/me/devices", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK);
    let mut devs = v["devices"].as_array().unwrap().clone();
    assert_eq!(devs.len(), 2, "{v}");
    devs.sort_by_key(|d| d["device_id"] != "phone");
    assert_eq!((&devs[0]["device_id"], &devs[0]["protocol"], &devs[0]["cloned"]), (&json!("phone"), &json!(2), &json!(false)));
    assert!(devs[0]["lease_until"].is_string() && devs[0]["lease_ver"].as_i64().unwrap() >= 1 && devs[0]["first_seen_at"].is_string());
    assert_eq!(devs[0]["leases"].as_array().unwrap().iter().find(|x| x["feature"] == "gen").unwrap()["allowance"], 10);
    assert_eq!((&devs[1]["protocol"], &devs[1]["lease_until"]), (&json!(1), &Value::Null));
    let other = token("stranger");
    l.sync2(&other, "theirs", json!({})).await;
    for (who, id) in [(&t, "theirs"), (&t, "nope"), (&other, "phone")] {
        let (s, v) = l.a.call("DELETE", &format!("/v1/me/devices/{id}"), Some(who), None).await;
        assert_eq!((s, &v["error"]["code"]), (StatusCode::NOT_FOUND, &json!("unknown_device")), "{v}");
    }
    assert_eq!(l.consume(&t, "gen", 1).await.0, StatusCode::PAYMENT_REQUIRED);
    let (s, _) = l.a.call("DELETE", "/v1/me/devices/phone", Some(&t), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(l.consume(&t, "gen", 10).await.0, StatusCode::OK, "the removed device's allowance is free");
    let (_, v) = l.a.call("GET", "/v1/me/devices", Some(&t), None).await;
    let phone = v["devices"].as_array().unwrap().iter().find(|d| d["device_id"] == "phone").unwrap().clone();
    assert!(phone["removed_at"].is_string(), "{v}");
    assert_eq!(phone["leases"].as_array().unwrap().iter().find(|x| x["feature"] == "gen").unwrap()["allowance"], 0);
    // Its late use counts, as reclaimed.
    let c_ver = phone["lease_ver"].as_u64();
    let r = l.sync2(&t, "phone", json!({"events": [ev("gen", 1, at("2027-03-10T11:00:00Z"), c_ver, 1)]})).await;
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["over_limit_causes"], json!(["reclaimed"]));
}

#[tokio::test]
async fn a_signing_out_device_holds_nothing_more() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("leaver");
    l.sync2(&t, "phone", json!({})).await;
    let r = l.sync2(&t, "phone", json!({"final": true})).await;
    assert!(l.claims("leaver", &r).await.did.is_none(), "a signed-out device gets the per-user token");
    assert_eq!(l.consume(&t, "gen", 10).await.0, StatusCode::OK);
    let b = l.claims("leaver", &l.sync2(&t, "tablet", json!({})).await).await;
    assert_eq!(lease(&b, "gen").share.as_f64(), 1.0, "the signed-out device no longer counts among the devices");
}

#[tokio::test]
async fn cloned_devices_are_detected_and_their_overage_is_caused_by_the_clone() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("twins");
    let c = l.claims("twins", &l.sync2(&t, "phone", json!({})).await).await;
    let now = at("2027-03-10T11:00:00Z");
    let first: Vec<Value> = (1..=10).map(|s| ev("gen", 1, now, c.lease_ver, s)).collect();
    l.sync2(&t, "phone", json!({"events": first})).await;
    let (_, v) = l.a.call("GET", "/v1/me/devices", Some(&t), None).await;
    assert_eq!(v["devices"][0]["cloned"], false);
    let second: Vec<Value> = (1..=3).map(|s| ev("gen", 1, now, c.lease_ver, s)).collect();
    let r = l.sync2(&t, "phone", json!({"events": second})).await;
    let tot = total(&r, "gen", "2027-03-01T00:00:00Z");
    assert_eq!((tot["used"].as_u64(), &tot["over_limit_causes"]), (Some(13), &json!(["cloned_device"])), "{tot}");
    let (_, v) = l.a.call("GET", "/v1/me/devices", Some(&t), None).await;
    assert_eq!(v["devices"][0]["cloned"], true);
}

#[tokio::test]
async fn overage_causes_name_the_protocol_and_the_lease() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let now = at("2027-03-10T11:00:00Z");
    // protocol 1
    let t1 = token("p1");
    let evs: Vec<Value> = (1..=11).map(|s| ev("gen", 1, now, None, s)).collect();
    let (_, r) = l.a.call("POST", "/v1/sync", Some(&t1), Some(json!({"protocol": 1, "device_id": "d", "events": evs}))).await;
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["over_limit_causes"], json!(["protocol1"]), "{r}");
    // protocol 2, before any lease
    let t2 = token("p2");
    let evs: Vec<Value> = (1..=11).map(|s| ev("gen", 1, now, None, s)).collect();
    let r = l.sync2(&t2, "d", json!({"events": evs})).await;
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["over_limit_causes"], json!(["before_lease"]));
    // a lease granted for room a backend's usage report then took anyway: the report is the
    // cause (it landed in room promised to the device), not the leased uses filling their slice
    let t3 = token("p3");
    let c = l.claims("p3", &l.sync2(&t3, "d", json!({})).await).await;
    let (s, _) =
        l.a.call("POST", "/v1/usage", Some(&t3), Some(json!({"id": Uuid::now_v7(), "feature": "gen", "amount": 5, "occurred_at": now})))
            .await;
    assert_eq!(s, StatusCode::CREATED);
    let evs: Vec<Value> = (1..=10).map(|s| ev("gen", 1, now, c.lease_ver, s)).collect();
    let r = l.sync2(&t3, "d", json!({"events": evs})).await;
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["over_limit_causes"], json!(["usage_report"]), "{r}");
}

#[tokio::test]
async fn credits_revoked_while_devices_hold_them_are_caused_by_refund() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("refunded");
    let admin = token("root-admin");
    let (s, v) =
        l.a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "refunded", "credits": 40, "reason": "gift"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let c = l.claims("refunded", &l.sync2(&t, "phone", json!({})).await).await;
    assert_eq!(lease(&c, "$credits").allowance, 70, "half of 140");
    let causes = "SELECT array_to_string(causes, ',') FROM counters WHERE feature = '$credits'";
    assert_eq!(l.rows(causes).await, vec![""]);
    let (s, v) = l.a.call("POST", "/v1/admin/grants/revoke", Some(&admin), Some(json!({"subject": "refunded", "credits": true}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(l.rows(causes).await, vec!["refund"]);
}

#[tokio::test]
async fn void_events_from_devices() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("voider");
    let c = l.claims("voider", &l.sync2(&t, "phone", json!({})).await).await;
    let now = at("2027-03-10T11:00:00Z");
    let e = ev("gen", 3, now, c.lease_ver, 1);
    let r = l.sync2(&t, "phone", json!({"events": [e.clone()]})).await;
    assert_eq!(lease(&l.claims("voider", &r).await, "gen").consumed, 3);
    let void = json!({"id": Uuid::now_v7(), "voids": e["id"], "occurred_at": now, "device_seq": 2});
    let unknown = json!({"id": Uuid::now_v7(), "voids": Uuid::now_v7(), "occurred_at": now});
    let r = l.sync2(&t, "phone", json!({"events": [void.clone(), unknown.clone()]})).await;
    assert_eq!(r["accepted"], json!([void["id"]]), "{r}");
    assert_eq!(r["rejected"], json!([{"id": unknown["id"], "reason": "unknown_event"}]));
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["used"], 0);
    assert_eq!(lease(&l.claims("voider", &r).await, "gen").consumed, 0, "the voided leased use gives its units back");
    let r = l.sync2(&t, "phone", json!({"events": [void.clone()]})).await;
    assert_eq!((&r["duplicates"], &r["accepted"]), (&json!([void["id"]]), &json!([])));
    // An event and its void in one batch; another user's event is unknown.
    let e2 = ev("gen", 2, now, None, 3);
    let v2 = json!({"id": Uuid::now_v7(), "voids": e2["id"], "occurred_at": now});
    let r = l.sync2(&t, "phone", json!({"events": [v2.clone(), e2.clone()]})).await;
    assert_eq!(r["accepted"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["used"], 0);
    let other = token("other");
    let v3 = json!({"id": Uuid::now_v7(), "voids": e["id"], "occurred_at": now});
    let r = l.sync2(&other, "x", json!({"events": [v3.clone()]})).await;
    assert_eq!(r["rejected"][0]["reason"], "unknown_event");
    // Malformed void events are refused alone.
    let bad1 = json!({"id": Uuid::now_v7(), "voids": "not-a-uuid", "occurred_at": now});
    let bad2 = json!({"id": Uuid::now_v7(), "voids": e["id"], "feature": "gen", "amount": 1, "occurred_at": now});
    let bad3 = json!({"id": Uuid::now_v7(), "voids": e["id"]});
    let r = l.sync2(&t, "phone", json!({"events": [bad1, bad2, bad3]})).await;
    let reasons: Vec<&str> = r["rejected"].as_array().unwrap().iter().map(|x| x["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, vec!["invalid_event"; 3], "{r}");
    // Protocol 1 knows no void events.
    let (_, r) = l.a.call("POST", "/v1/sync", Some(&t), Some(json!({"protocol": 1, "device_id": "phone", "events": [v3]}))).await;
    assert_eq!(r["rejected"][0]["reason"], "invalid_event", "{r}");
}

#[tokio::test]
async fn a_device_voids_only_its_own_devices_events() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("sharer");
    let c = l.claims("sharer", &l.sync2(&t, "phone", json!({})).await).await;
    l.sync2(&t, "tablet", json!({})).await;
    let now = at("2027-03-10T11:00:00Z");
    let phones = ev("gen", 3, now, c.lease_ver, 1);
    l.sync2(&t, "phone", json!({"events": [phones.clone()]})).await;
    // A backend's report and a user token's consume.
    let (s, k) =
        l.a.call("POST", "/v1/admin/api-keys", Some(&token("root-admin")), Some(json!({"name": "b", "scopes": ["usage:write"]}))).await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    let backends = json!({"subject": "sharer", "id": Uuid::now_v7(), "feature": "gen", "amount": 2, "occurred_at": now});
    let (s, v) = l.a.call("POST", "/v1/usage", k["secret"].as_str(), Some(backends.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let users = json!({"id": Uuid::now_v7(), "feature": "gen", "amount": 1, "occurred_at": now});
    let (s, v) = l.a.call("POST", "/v1/usage", Some(&t), Some(users.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let before = l.rows("SELECT id::text, coalesce(voided_at::text, '') FROM events ORDER BY id").await;
    let void = |target: &Value| json!({"id": Uuid::now_v7(), "voids": target, "occurred_at": now});
    let refused = [void(&phones["id"]), void(&backends["id"]), void(&users["id"])];
    let r = l.sync2(&t, "tablet", json!({"events": refused.clone()})).await;
    let want: Vec<Value> = refused.iter().map(|v| json!({"id": v["id"], "reason": "void_not_allowed"})).collect();
    assert_eq!((&r["rejected"], &r["accepted"]), (&json!(want), &json!([])), "{r}");
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["used"], 6, "the originals still count");
    assert_eq!(l.rows("SELECT id::text, coalesce(voided_at::text, '') FROM events ORDER BY id").await, before);
    assert_eq!(l.rows("SELECT count(*)::text FROM void_events").await, vec!["0"]);
    let r = l.sync2(&t, "phone", json!({}));
    assert_eq!(lease(&l.claims("sharer", &r.await).await, "gen").consumed, 3, "the phone's use still counts in its lease");
    // The phone voids its own.
    let own = void(&phones["id"]);
    let r = l.sync2(&t, "phone", json!({"events": [own.clone()]})).await;
    assert_eq!(r["accepted"], json!([own["id"]]), "{r}");
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["used"], 3);
}

#[tokio::test]
async fn protocol_one_is_refused_with_426_when_the_minimum_is_two() {
    let l = app_or_skip!(lapp_with("2027-03-10T12:00:00Z", |c| c.min_protocol = 2).await);
    let t = token("modern");
    let (s, v) = l.a.sync(&t, "d", vec![]).await;
    assert_eq!((s, &v["error"]["code"]), (StatusCode::UPGRADE_REQUIRED, &json!("upgrade_required")), "{v}");
    l.sync2(&t, "d", json!({})).await;
}

#[tokio::test]
async fn protocol_one_answers_the_per_user_token_and_holds_no_lease() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("classic");
    let (s, r) = l.a.sync(&t, "d", vec![]).await;
    assert_eq!(s, StatusCode::OK);
    let c = l.claims("classic", &r).await;
    assert!(c.did.is_none() && c.leases.is_empty());
    assert!(r.get("recall").is_none());
    // Protocol-2 fields mean nothing to protocol 1.
    let (s, r) =
        l.a.call("POST", "/v1/sync", Some(&t), Some(json!({"protocol": 1, "device_id": "d", "want": [{"feature": "gen", "units": 5}]})))
            .await;
    assert_eq!(s, StatusCode::OK);
    assert!(l.claims("classic", &r).await.leases.is_empty());
    assert_eq!(l.consume(&t, "gen", 10).await.0, StatusCode::OK, "a protocol-1 device holds nothing");
}

#[tokio::test]
async fn bad_want_and_release_entries_are_refused_and_change_nothing() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("bad");
    let c = l.claims("bad", &l.sync2(&t, "phone", json!({})).await).await;
    let state = "SELECT device_id, lease_ver::text, feature, allowance::text, released::text FROM devices JOIN pool_devices USING (user_id, device_id) ORDER BY 1, 3";
    let before = l.rows(state).await;
    let cases = [
        (json!({"want": [{"feature": "gen", "units": -1}]}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (json!({"want": [{"feature": "gen", "units": 9_223_372_036_854_775_808u64}]}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_amount"),
        (
            json!({"release": [{"feature": "gen", "period_start": "2027-03-01T00:00:00Z", "units": -5}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (json!({"release": [{"feature": "gen", "period_start": "March", "units": 5}]}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (json!({"release": [{"feature": "gen", "units": 5}]}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (
            json!({"release": [{"feature": "$credits", "period_start": "2027-03-01T00:00:00Z", "units": 5}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
    ];
    for (body, status, code) in cases {
        let mut body = body;
        body["events"] = json!([ev("gen", 1, at("2027-03-10T11:00:00Z"), c.lease_ver, 1)]);
        let (s, v) = l.sync2_raw(&t, "phone", body.clone()).await;
        assert_eq!((s, v["error"]["code"].as_str()), (status, Some(code)), "{body}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(l.rows(state).await, before, "{body} changed nothing");
        assert_eq!(l.a.count("events").await, 0);
    }
    // A want or release of a feature the server's catalog does not know yet (a device catalog
    // ahead) is ignored: the sync completes.
    let r = l
        .sync2(
            &t,
            "phone",
            json!({"want": [{"feature": "nope", "period_start": null, "units": 5}],
                   "release": [{"feature": "nope", "period_start": "2027-03-01T00:00:00Z", "units": 5}]}),
        )
        .await;
    assert_eq!(lease(&l.claims("bad", &r).await, "gen").allowance, 10);
    assert!(l.claims("bad", &r).await.leases.iter().all(|e| e.feature != "nope"));
    // A release for a window the device has no slice of is ignored.
    let r = l.sync2(&t, "phone", json!({"release": [{"feature": "gen", "period_start": "2020-01-01T00:00:00Z", "units": 5}]})).await;
    assert_eq!(lease(&l.claims("bad", &r).await, "gen").allowance, 10);
}

#[tokio::test]
async fn the_total_never_exceeds_the_limit_whatever_devices_and_backends_do() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("random");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let devices = ["a", "b", "c"];
    let mut held: std::collections::HashMap<&str, (u64, u64, u64)> = Default::default(); // (lease_ver, allowance, consumed)
    let mut seq = 0;
    for _ in 0..40 {
        match rng.random_range(0..3) {
            0 | 1 => {
                let d = devices[rng.random_range(0..devices.len())];
                let mut events = Vec::new();
                if let Some((ver, allowance, consumed)) = held.get(d).copied() {
                    // The device spends what its lease allows, never more.
                    let n = rng.random_range(0..=allowance.saturating_sub(consumed));
                    for _ in 0..n {
                        seq += 1;
                        events.push(ev("gen", 1, at("2027-03-10T11:00:00Z"), Some(ver), seq));
                    }
                }
                let want = rng.random_range(0..6);
                let r = l.sync2(&t, d, json!({"events": events, "want": [{"feature": "gen", "units": want}]})).await;
                let c = l.claims("random", &r).await;
                let g = lease(&c, "gen");
                held.insert(d, (c.lease_ver.unwrap(), g.allowance, g.consumed));
            }
            _ => {
                let (s, v, _) = l.consume(&t, "gen", rng.random_range(1..3)).await;
                assert!(s == StatusCode::OK || s == StatusCode::PAYMENT_REQUIRED, "{v}");
            }
        }
        let used = l.a.scalar("SELECT coalesce(sum(amount), 0)::int8 FROM events WHERE feature = 'gen'").await;
        assert!(used <= 10, "the total went over the limit: {used}");
    }
}

#[tokio::test]
async fn device_tokens_are_per_device_and_renewed_by_lease_changes() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("cache");
    let r1 = l.sync2(&t, "a", json!({})).await;
    let r2 = l.sync2(&t, "a", json!({})).await;
    assert_eq!(r1["entitlements_token"], r2["entitlements_token"], "nothing changed: the cached token");
    let rb = l.sync2(&t, "b", json!({})).await;
    assert_eq!(l.claims("cache", &rb).await.did.as_deref(), Some("b"), "never another device's token");
    let c2 = l.claims("cache", &r2).await;
    let r3 = l.sync2(&t, "a", json!({"release": [{"feature": "gen", "period_start": "2027-03-01T00:00:00Z", "units": 1}]})).await;
    let c3 = l.claims("cache", &r3).await;
    assert!(c3.lease_ver > c2.lease_ver, "a lease change signs a new lease_ver");
    assert_eq!((c3.did.as_deref(), lease(&c3, "gen").released), (Some("a"), 1));
}

#[tokio::test]
async fn leased_credit_uses_count_in_the_devices_credits_and_holds_and_checks_see_held_room() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("spender");
    let c = l.claims("spender", &l.sync2(&t, "phone", json!({})).await).await;
    let r = l.sync2(&t, "phone", json!({"events": [ev("images", 5, at("2027-03-10T11:00:00Z"), c.lease_ver, 1)]})).await;
    let c2 = l.claims("spender", &r).await;
    assert_eq!(c2.entitlements.credit_balance, 95);
    let cr = lease(&c2, "$credits");
    assert_eq!((cr.allowance, cr.consumed), (52, 5), "topped up to half of the balance of 95: {cr:?}");
    // 95 − 47 held by the device: a 60-credit hold is denied for held room, with a recall.
    let (s, v, h) =
        l.a.raw("POST", "/v1/holds", Some(&t), serde_json::to_vec(&json!({"feature": "images", "amount": 60})).unwrap(), &[]).await;
    assert_eq!((s, &v["decision"]["held_offline"]), (StatusCode::PAYMENT_REQUIRED, &json!(47)), "{v}");
    assert_eq!(h.get("retry-after").and_then(|x| x.to_str().ok()), Some("30"));
    assert_eq!(l.a.count("holds").await, 0);
    let (s, v) = l.a.call("POST", "/v1/check", Some(&t), Some(json!({"feature": "gen", "amount": 1}))).await;
    assert_eq!((s, &v["allowed"], &v["held_offline"]), (StatusCode::OK, &json!(false), &json!(10)), "{v}");
    let r = l.sync2(&t, "phone", json!({"lease_ver": c2.lease_ver})).await;
    assert_eq!((recall_of(&r, "$credits"), recall_of(&r, "gen")), (json!(12), json!(1)), "{r}");
}

#[tokio::test]
async fn an_ended_window_is_judged_by_the_limit_it_ran_under_not_a_later_plan() {
    const PLANS: &str = r#"{"plans": [
      {"id": "free", "features": {"img": {"type": "metered", "limit": 8, "period": "hour", "enforcement": "hard"}}},
      {"id": "pro",  "features": {"img": {"type": "metered", "limit": 16, "period": "hour", "enforcement": "hard"}}}]}"#;
    let l = app_or_skip!(lapp_with("2027-03-10T12:30:00Z", |c| std::fs::write(c.plans_file.as_ref().unwrap(), PLANS).unwrap()).await);
    let t = token("late");
    let in_window = at("2027-03-10T12:10:00Z");
    // Two devices that never held a lease: one syncs 5 uses while the window is open (limit 8).
    let evs: Vec<Value> = (1..=5).map(|s| ev("img", 1, in_window, None, s)).collect();
    l.sync2(&t, "a", json!({"events": evs})).await;
    // The account upgrades after the window ended; the other device's 6 uses of it arrive then.
    l.clock.set(at("2027-03-10T14:00:00Z"));
    let admin = token("root-admin");
    let (s, v) = l.a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "late", "plan": "pro", "reason": "x"}))).await;
    assert!(s.is_success(), "{v}");
    let evs: Vec<Value> = (1..=6).map(|s| ev("img", 1, in_window, None, s)).collect();
    l.sync2(&t, "b", json!({"events": evs})).await;
    // 11 of the 8 the window ran under: the overage has its cause, though 11 ≤ pro's 16.
    let rows = l
        .rows(
            "SELECT used::text, lim::text, array_to_string(causes, ',') FROM counters \
             WHERE feature = 'img' AND period_start = '2027-03-10T12:00:00Z'",
        )
        .await;
    assert_eq!(rows, vec!["11|8|before_lease".to_string()]);
    // A window the server first hears of after it ended keeps the limit in effect then.
    let evs: Vec<Value> = (7..=9).map(|s| ev("img", 1, at("2027-03-10T10:10:00Z"), None, s)).collect();
    l.sync2(&t, "b", json!({"events": evs})).await;
    let rows = l.rows("SELECT used::text, lim::text FROM counters WHERE feature = 'img' AND period_start = '2027-03-10T10:00:00Z'").await;
    assert_eq!(rows, vec!["3|16".to_string()]);
}

#[tokio::test]
async fn the_credit_pool_is_a_total_whose_debt_names_the_refund() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("indebted");
    let admin = token("root-admin");
    let (s, v) =
        l.a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "indebted", "credits": 40, "reason": "gift"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let r = l.sync2(&t, "phone", json!({})).await;
    let c = l.claims("indebted", &r).await;
    assert_eq!(lease(&c, "$credits").allowance, 70, "half of 100 included + 40 granted");
    let pool = total(&r, "$credits", "1970-01-01T00:00:00Z");
    assert_eq!((pool["limit"].clone(), pool["used"].clone(), pool["remaining"].clone()), (json!(140), json!(0), json!(140)), "{pool}");
    // A backend spends the room the phone does not hold; the gift is then taken back.
    let (s, v, _) = l.consume(&t, "images", 70).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = l.a.call("POST", "/v1/admin/grants/revoke", Some(&admin), Some(json!({"subject": "indebted", "credits": true}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The phone spends its whole lease offline: 40 credits that no longer exist.
    let evs: Vec<Value> = (1..=70).map(|s| ev("images", 1, at("2027-03-10T11:00:00Z"), c.lease_ver, s)).collect();
    let r = l.sync2(&t, "phone", json!({"events": evs})).await;
    let pool = total(&r, "$credits", "1970-01-01T00:00:00Z");
    assert_eq!(pool["over_limit_by"], json!(40), "{pool}");
    assert_eq!(pool["over_limit_causes"], json!(["refund"]), "{pool}");
    assert_eq!((pool["limit"].clone(), pool["used"].clone(), pool["remaining"].clone()), (json!(100), json!(140), json!(0)), "{pool}");
    // Protocol 1 answers no credit pool total.
    let (_, r) = l.a.call("POST", "/v1/sync", Some(&t), Some(json!({"protocol": 1, "device_id": "old"}))).await;
    assert!(r["totals"].as_array().unwrap().iter().all(|t| t["feature"] != "$credits"), "{r}");
}

/// `sub` on `pro` (`img`: 16 an hour) gets a 16-unit slice on device `tab`, is downgraded to
/// `free` (8 an hour) within the window, then `tab` reports `uses` uses of its slice: the app
/// and the window's total.
async fn spent_after_a_downgrade(sub: &str, uses: u64) -> Option<(L, Value)> {
    const PLANS: &str = r#"{"plans": [
      {"id": "free", "features": {"img": {"type": "metered", "limit": 8, "period": "hour", "enforcement": "hard"}}},
      {"id": "pro",  "features": {"img": {"type": "metered", "limit": 16, "period": "hour", "enforcement": "hard"}}}]}"#;
    let l = lapp_with("2027-03-10T12:30:00Z", |c| std::fs::write(c.plans_file.as_ref().unwrap(), PLANS).unwrap()).await?;
    let (t, admin) = (token(sub), token("root-admin"));
    let (s, v) = l.a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": sub, "plan": "pro", "reason": "x"}))).await;
    assert!(s.is_success(), "{v}");
    let c = l.claims(sub, &l.sync2(&t, "tab", json!({"want": [{"feature": "img", "units": 1}]})).await).await;
    assert_eq!(lease(&c, "img").allowance, 16);
    let (s, v) = l.a.call("POST", "/v1/admin/grants/revoke", Some(&admin), Some(json!({"subject": sub}))).await;
    assert!(s.is_success(), "{v}");
    let evs: Vec<Value> = (1..=uses).map(|s| ev("img", 1, at("2027-03-10T12:31:00Z"), c.lease_ver, s)).collect();
    let r = l.sync2(&t, "tab", json!({"events": evs})).await;
    let w = total(&r, "img", "2027-03-10T12:00:00Z").clone();
    Some((l, w))
}

#[tokio::test]
async fn a_slice_granted_before_a_downgrade_and_spent_after_it_is_caused_by_the_downgrade() {
    let (_l, w) = app_or_skip!(spent_after_a_downgrade("downgraded", 12).await);
    assert_eq!((w["used"].clone(), w["limit"].clone(), w["over_limit_by"].clone()), (json!(12), json!(8), json!(4)), "{w}");
    assert_eq!(w["over_limit_causes"], json!(["downgrade"]), "{w}");
}

#[tokio::test]
async fn a_device_past_its_allowance_is_the_cause_device_overrun_not_a_downgrade() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("overrun");
    let c = l.claims("overrun", &l.sync2(&t, "phone", json!({})).await).await;
    assert_eq!(lease(&c, "gen").allowance, 10);
    // No honest core does this: 15 uses under a 10-unit lease, and no plan changed.
    let evs: Vec<Value> = (1..=15).map(|s| ev("gen", 1, at("2027-03-10T11:00:00Z"), c.lease_ver, s)).collect();
    let r = l.sync2(&t, "phone", json!({"lease_ver": c.lease_ver, "events": evs})).await;
    let w = total(&r, "gen", "2027-03-01T00:00:00Z");
    assert_eq!((w["used"].clone(), w["over_limit_by"].clone()), (json!(15), json!(5)), "{w}");
    assert_eq!(w["over_limit_causes"], json!(["device_overrun"]), "{w}");
    let marked = l.rows("SELECT device_seq::text, cause FROM events WHERE cause IS NOT NULL ORDER BY device_seq").await;
    let past: Vec<String> = (11..=15).map(|s| format!("{s}|device_overrun")).collect();
    assert_eq!(marked, past, "the five uses past the allowance carry the cause, the ten within it none");
}

#[tokio::test]
async fn a_downgrade_and_an_overrun_in_one_batch_each_name_their_own_uses() {
    // 18 uses of a 16-unit slice under a limit now 8: 16 are the downgrade's, 2 the device's own.
    let (l, w) = app_or_skip!(spent_after_a_downgrade("both", 18).await);
    assert_eq!((w["used"].clone(), w["over_limit_by"].clone()), (json!(18), json!(10)), "{w}");
    assert_eq!(w["over_limit_causes"], json!(["device_overrun", "downgrade"]), "{w}");
    let marked = l.rows("SELECT cause, count(*)::text FROM events GROUP BY cause ORDER BY cause").await;
    assert_eq!(marked, vec!["device_overrun|2", "downgrade|16"]);
}

#[tokio::test]
async fn uses_reported_after_a_reclaim_are_the_cause_when_another_device_then_fills_its_slice() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("handed-over");
    let c = l.claims("handed-over", &l.sync2(&t, "phone", json!({})).await).await;
    let until = DateTime::from_timestamp(c.lease_until.unwrap(), 0).unwrap();
    assert!(until < at("2027-04-01T00:00:00Z"), "the phone's lease ends within March: {until}");
    // The phone's lease ends; the tablet gets the whole pool.
    l.clock.set(until);
    let b = l.claims("handed-over", &l.sync2(&t, "tablet", json!({})).await).await;
    assert_eq!(lease(&b, "gen").allowance, 10);
    // The phone reports 3 uses made before its lease ended: room now promised to the tablet.
    let evs: Vec<Value> = (1..=3).map(|s| ev("gen", 1, until - chrono::Duration::hours(1), c.lease_ver, s)).collect();
    let r = l.sync2(&t, "phone", json!({"events": evs})).await;
    assert_eq!(total(&r, "gen", "2027-03-01T00:00:00Z")["over_limit_causes"], json!(["reclaimed"]), "{r}");
    // The tablet spends the slice it was granted: within its allowance, under an unchanged limit.
    let evs: Vec<Value> = (1..=10).map(|s| ev("gen", 1, until, b.lease_ver, s)).collect();
    let r = l.sync2(&t, "tablet", json!({"lease_ver": b.lease_ver, "events": evs})).await;
    let w = total(&r, "gen", "2027-03-01T00:00:00Z");
    assert_eq!((w["used"].clone(), w["over_limit_causes"].clone()), (json!(13), json!(["reclaimed"])), "{w}");
    assert_eq!(l.rows("SELECT cause, count(*)::text FROM events GROUP BY cause ORDER BY cause").await, vec!["reclaimed|3", "|10"]);
}

#[tokio::test]
async fn a_device_past_its_slice_of_the_credit_balance_is_the_cause_of_the_debt() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("spender");
    let c = l.claims("spender", &l.sync2(&t, "phone", json!({})).await).await;
    assert_eq!(lease(&c, "$credits").allowance, 50, "half of the balance of 100");
    // A backend spends the half the phone does not hold; nothing was refunded or downgraded.
    let (s, v, _) = l.consume(&t, "images", 50).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The phone spends 70 credits under its 50-credit slice: 20 past it, 20 in debt.
    let evs: Vec<Value> = (1..=70).map(|s| ev("images", 1, at("2027-03-10T11:00:00Z"), c.lease_ver, s)).collect();
    let r = l.sync2(&t, "phone", json!({"lease_ver": c.lease_ver, "events": evs})).await;
    let pool = total(&r, "$credits", "1970-01-01T00:00:00Z");
    assert_eq!((pool["over_limit_by"].clone(), pool["over_limit_causes"].clone()), (json!(20), json!(["device_overrun"])), "{pool}");
    let marked = l.rows("SELECT min(device_seq)::text, count(*)::text FROM events WHERE cause = 'device_overrun'").await;
    assert_eq!(marked, vec!["51|20"], "the twenty uses past the slice carry the cause");
}

/// Claims (a pool's share is split among the devices that claim it): a device that syncs
/// without a want and without uses claims nothing and gets nothing; one that held room and
/// stops claiming is recalled down to what it consumed; a want of 0 with no use (a feature
/// listed for offline use) is capped at ⌈limit × share / (2n)⌉; a stored claim nobody knows is
/// an error, never a claim.
#[tokio::test]
async fn only_claiming_devices_share_a_pool_and_an_idle_one_is_recalled() {
    let l = app_or_skip!(lapp("2027-03-10T12:00:00Z").await);
    let t = token("claimer");
    let none = json!({"want": []});
    // An idle device: nothing.
    let c = l.claims("claimer", &l.sync2(&t, "idle", none.clone()).await).await;
    assert_eq!((lease(&c, "gen").allowance, lease(&c, "gen").share.as_f64()), (0, 0.0));
    // A device listing `gen` for offline use (want 0, no use): at most ⌈10 / 2⌉ = 5.
    let c = l.claims("claimer", &l.sync2(&t, "lister", json!({"want": [{"feature": "gen", "units": 0}]})).await).await;
    assert_eq!(lease(&c, "gen").allowance, 5, "an offline_features-only claim, n = 1");
    // A device asking: n = 2, fair 5; the pool's other 5 are free.
    let r = l.sync2(&t, "asker", json!({"want": [{"feature": "gen", "units": 1}]})).await;
    let c = l.claims("claimer", &r).await;
    assert_eq!((lease(&c, "gen").allowance, lease(&c, "gen").share.as_f64()), (5, 0.5));
    // The lister uses 2 (now it claims by use) and stops listing: its claim lasts the window.
    let lc = l.claims("claimer", &l.sync2(&t, "lister", none.clone()).await).await;
    let evs: Vec<Value> = (1..=2).map(|s| ev("gen", 1, at("2027-03-10T12:01:00Z"), lc.lease_ver, s)).collect();
    let r = l.sync2(&t, "lister", json!({"want": [], "events": evs})).await;
    assert_eq!(recall_of(&r, "gen"), Value::Null, "{r}");
    let rows = l.rows("SELECT device_id, claim FROM pool_devices WHERE feature = 'gen' ORDER BY device_id").await;
    assert_eq!(rows, ["asker|asked", "idle|", "lister|asked"]);
    // A new month: the lister used March, so it still claims April; the asker used nothing in
    // March and asks nothing: its reserved share is recalled down to what it consumed (0).
    l.clock.set(at("2027-03-31T23:00:00Z"));
    let c = l.claims("claimer", &l.sync2(&t, "asker", none.clone()).await).await;
    assert_eq!(lease(&c, "gen").share.as_f64(), 1.0, "its March claim lasts the window (the lister's lease ended: n = 1)");
    l.clock.set(at("2027-04-01T00:30:00Z"));
    let r = l.sync2(&t, "asker", none.clone()).await;
    let c = l.claims("claimer", &r).await;
    assert_eq!(lease(&c, "gen").share.as_f64(), 0.0);
    assert_eq!(recall_of(&r, "gen"), json!(lease(&c, "gen").allowance), "recalled down to consumed: {r}");
    assert!(lease(&c, "gen").allowance > 0, "it entered April holding its March share");
    // A corrupt stored claim fails loudly instead of counting as one.
    let (client, conn) = tokio_postgres::connect(&l.a.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client.execute("ALTER TABLE pool_devices DROP CONSTRAINT pool_devices_claim_check", &[]).await.expect("drop check");
    client.execute("UPDATE pool_devices SET claim = 'maybe' WHERE device_id = 'lister'", &[]).await.expect("corrupt");
    let (s, v) = l.sync2_raw(&t, "lister", none).await;
    assert_eq!((s, v["error"]["code"].clone()), (StatusCode::INTERNAL_SERVER_ERROR, json!("internal")), "{v}");
}
