//! One use, several meters: `items` on `/v1/consume`, on holds and their commit, voids of a use
//! id (by the API and by a device's sync), and item events on the sync wire — through the real
//! router, on real Postgres.

mod common;

use axum::http::StatusCode;
use chrono::Utc;
use common::*;
use serde_json::{Value, json};
use tally_core::Clock;
use tally_core::contract::item_event_id;
use uuid::Uuid;

/// A call limit, a money budget, two credit-priced features (30 credits included), a flag the
/// plan leaves out.
const CAT: &str = r#"{"models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000}},
 "plans": [{"id": "free", "included_credits": {"amount": 30, "rollover": false}, "features": {
  "calls":    {"type": "metered", "limit": 3, "period": "day", "enforcement": "hard"},
  "ai_spend": {"type": "budget", "limit_micros": 1000000, "period": "day", "enforcement": "hard"},
  "images":   {"type": "credits", "cost": 10},
  "video":    {"type": "credits", "cost": 10},
  "export":   {"type": "flag", "enabled": false}}}]}"#;

async fn items_app() -> Option<TestApp> {
    app_with(|c| {
        if let Some(p) = &c.plans_file {
            std::fs::write(p, CAT).expect("write plans");
        }
    })
    .await
}

async fn post(a: &TestApp, t: &str, path: &str, body: Value) -> (StatusCode, Value) {
    a.call("POST", path, Some(t), Some(body)).await
}

/// Every row a use could change, as text (a before/after snapshot).
async fn snapshot(a: &TestApp) -> Vec<String> {
    a.rows_text(&[
        "SELECT id::text, feature, amount::text, coalesce(voided_at::text, '') FROM events ORDER BY id",
        "SELECT feature, period, period_start::text, used::text, cost_micros::text, held::text FROM counters \
         WHERE used <> 0 OR held <> 0 ORDER BY 1, 2, 3",
        "SELECT id::text, feature, amount::text, held::text, state FROM holds ORDER BY id",
    ])
    .await
}

/// The user's events as `GET /v1/usage/events` lists them, by id.
async fn listed(a: &TestApp, t: &str) -> std::collections::BTreeMap<String, Value> {
    let (s, v) = a.call("GET", "/v1/usage/events", Some(t), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["events"].as_array().into_iter().flatten().map(|e| (e["id"].as_str().unwrap_or_default().to_string(), e.clone())).collect()
}

fn uuid(v: &Value) -> Uuid {
    v.as_str().and_then(|s| Uuid::parse_str(s).ok()).expect("a UUID")
}

#[tokio::test]
async fn a_call_limit_and_a_budget_in_one_use_record_both_or_nothing() {
    let a = app_or_skip!(items_app().await);
    let t = token("caller");
    // 2000 input tokens at 2.5 micros and 600 output tokens at 10 micros: 11,000 micros.
    let call = json!({"id": "call-1", "metadata": {"route": "chat"}, "items": [
        {"feature": "calls"},
        {"feature": "ai_spend", "model": "gpt-4o", "input_tokens": 2000, "output_tokens": 600}]});
    let (s, v) = post(&a, &t, "/v1/consume", call.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["duplicate"], false, "{v}");
    let use_id = uuid(&v["id"]);
    let d = v["decisions"].as_array().cloned().unwrap_or_default();
    assert_eq!(d.len(), 2, "{v}");
    assert_eq!((&d[0]["allowed"], &d[0]["used"], &d[0]["remaining"]), (&json!(true), &json!(1), &json!(2)), "{v}");
    assert_eq!((&d[1]["allowed"], &d[1]["used"]), (&json!(true), &json!(11000)), "{v}");
    assert_eq!(v["decision"], d[0], "decision is the first item's");
    // Each item is an event of its own, with its id derived from the use id, listed with it.
    let events = listed(&a, &t).await;
    assert_eq!(events.len(), 2, "{events:?}");
    for (f, amount) in [("calls", 1), ("ai_spend", 11000)] {
        let e = &events[&item_event_id(use_id, f).to_string()];
        assert_eq!((&e["feature"], &e["amount"], &e["use_id"]), (&json!(f), &json!(amount), &json!(use_id)), "{e}");
        assert_eq!(e["metadata"], json!({"route": "chat"}), "{e}");
    }
    assert_eq!(a.total(&t, "ai_spend").await["used"], 11000);

    // A replay answers the first answer; the same id with another body is a conflict.
    let before = snapshot(&a).await;
    let (s, again) = post(&a, &t, "/v1/consume", call.clone()).await;
    assert_eq!((s, &again["duplicate"], &again["id"]), (StatusCode::OK, &json!(true), &v["id"]), "{again}");
    assert_eq!(again["decisions"], v["decisions"]);
    let mut other = call.clone();
    other["items"][0]["amount"] = json!(2);
    let (s, c) = post(&a, &t, "/v1/consume", other).await;
    assert_eq!((s, c["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{c}");
    // The use id is taken for a single consume too.
    let (s, c) = post(&a, &t, "/v1/consume", json!({"id": "call-1", "feature": "calls"})).await;
    assert_eq!((s, c["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{c}");
    assert_eq!(snapshot(&a).await, before);

    // The budget item's cost does not fit the budget's room: the whole use is denied.
    let over = json!({"items": [{"feature": "calls"}, {"feature": "ai_spend", "amount": 990000}]});
    let (s, r) = post(&a, &t, "/v1/consume", over).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::PAYMENT_REQUIRED, Some("budget_exceeded")), "{r}");
    assert_eq!((&r["decision"]["allowed"], &r["decision"]["reason"]), (&json!(false), &json!("budget_exceeded")), "{r}");
    let d = r["decisions"].as_array().cloned().unwrap_or_default();
    assert_eq!((d.len(), &d[0]["allowed"], &d[1]["allowed"]), (2, &json!(true), &json!(false)), "{r}");
    assert_eq!(r["decision"], d[1], "the first denial");
    assert_eq!(snapshot(&a).await, before, "nothing recorded, no call counted");
    assert_eq!(a.total(&t, "calls").await["used"], 1);

    // A denial in the second item: its status and code, nothing of the first recorded.
    let (s, r) = post(&a, &t, "/v1/consume", json!({"items": [{"feature": "calls", "amount": 2}, {"feature": "export"}]})).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("not_in_plan")), "{r}");
    assert_eq!((&r["decisions"][0]["allowed"], &r["decisions"][1]["reason"]), (&json!(true), &json!("not_in_plan")), "{r}");
    let (s, r) = post(&a, &t, "/v1/consume", json!({"items": [{"feature": "calls", "amount": 2}, {"feature": "nope"}]})).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_feature")), "{r}");
    assert_eq!(snapshot(&a).await, before);
    assert_eq!(a.total(&t, "calls").await["used"], 1);
}

#[tokio::test]
async fn two_credit_items_draw_cumulatively_and_bad_items_change_nothing() {
    let a = app_or_skip!(items_app().await);
    let t = token("spender");
    assert_eq!(a.balance(&t).await, 30);
    let before = snapshot(&a).await;
    // 20 + 20 credits against 30: each fits alone, not together.
    let (s, r) =
        post(&a, &t, "/v1/consume", json!({"items": [{"feature": "images", "amount": 2}, {"feature": "video", "amount": 2}]})).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::PAYMENT_REQUIRED, Some("insufficient_credits")), "{r}");
    assert_eq!((&r["decisions"][0]["allowed"], &r["decisions"][1]["allowed"]), (&json!(true), &json!(false)), "{r}");
    assert_eq!(a.balance(&t).await, 30, "nothing drawn");
    assert_eq!(snapshot(&a).await, before);
    let (s, v) =
        post(&a, &t, "/v1/consume", json!({"items": [{"feature": "images", "amount": 1}, {"feature": "video", "amount": 1}]})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((&v["decisions"][0]["remaining"], &v["decisions"][1]["remaining"]), (&json!(20), &json!(10)), "{v}");
    assert_eq!(a.balance(&t).await, 10);

    // Bad items: a clear 422, nothing changed.
    let before = snapshot(&a).await;
    let bad = [
        (json!({"items": [{"feature": "calls"}, {"feature": "calls"}]}), "invalid_items"),
        (json!({"items": []}), "invalid_items"),
        (json!({"items": (0..17).map(|i| json!({"feature": format!("f{i}")})).collect::<Vec<_>>()}), "invalid_items"),
        (json!({"items": {"feature": "calls"}}), "invalid_items"),
        (json!({"items": ["calls"]}), "invalid_items"),
        (json!({"items": [{"amount": 1}]}), "invalid_event"),
        (json!({"items": [{"feature": "calls", "amount": 0}]}), "invalid_amount"),
        (json!({"feature": "calls", "items": [{"feature": "calls"}]}), "invalid_body"),
    ];
    for (body, code) in bad {
        let (s, v) = post(&a, &t, "/v1/consume", body.clone()).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(code)), "{body}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    assert_eq!(snapshot(&a).await, before);
}

#[tokio::test]
async fn a_hold_of_several_items_commits_real_costs_and_a_void_of_the_use_restores_all() {
    let a = app_or_skip!(items_app().await);
    let t = token("holder");
    let hold = json!({"id": "job-1", "items": [{"feature": "calls", "amount": 1}, {"feature": "ai_spend", "amount": 20000},
        {"feature": "images", "amount": 1}]});
    let (s, h) = post(&a, &t, "/v1/holds", hold.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{h}");
    let id = uuid(&h["hold"]["id"]);
    assert_eq!(
        h["hold"]["items"],
        json!([{"feature": "calls", "amount": 1}, {"feature": "ai_spend", "amount": 20000},
        {"feature": "images", "amount": 1}])
    );
    assert_eq!(h["decisions"].as_array().map(Vec::len), Some(3), "{h}");
    assert_eq!(a.scalar("SELECT held FROM counters WHERE feature = '$credits'").await, 10, "the held credits are not free");
    let (s, again) = post(&a, &t, "/v1/holds", hold).await;
    assert_eq!((s, &again["hold"]), (StatusCode::OK, &h["hold"]), "{again}");
    // The hold's id is no consume's.
    let (s, c) = post(&a, &t, "/v1/consume", json!({"id": "job-1", "items": [{"feature": "calls"}]})).await;
    assert_eq!((s, c["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{c}");
    // A hold that does not fit as a whole holds nothing.
    let before = snapshot(&a).await;
    let (s, r) = post(&a, &t, "/v1/holds", json!({"items": [{"feature": "calls", "amount": 1}, {"feature": "calls2", "amount": 1}]})).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_feature")), "{r}");
    let (s, r) = post(&a, &t, "/v1/holds", json!({"items": [{"feature": "calls", "amount": 1}, {"feature": "images", "amount": 3}]})).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::PAYMENT_REQUIRED, Some("insufficient_credits")), "{r}");
    assert_eq!(snapshot(&a).await, before);

    // A commit must name exactly the held features.
    let path = format!("/v1/holds/{id}/commit");
    for items in [json!([{"feature": "calls"}]), json!([{"feature": "calls"}, {"feature": "ai_spend"}, {"feature": "video"}])] {
        let (s, r) = post(&a, &t, &path, json!({"items": items})).await;
        assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_items")), "{r}");
    }
    assert_eq!(snapshot(&a).await, before);
    // 2000 input tokens at 2.5 micros and 600 output tokens at 10 micros: 11,000 micros.
    let commit = json!({"metadata": {"job": 1}, "items": [{"feature": "images"}, {"feature": "calls"},
        {"feature": "ai_spend", "model": "gpt-4o", "input_tokens": 2000, "output_tokens": 600}]});
    let (s, c) = post(&a, &t, &path, commit.clone()).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!((&c["id"], &c["duplicate"]), (&json!(id), &json!(false)), "{c}");
    assert_eq!(c["decisions"][1]["used"], 11000, "in the hold's order: {c}");
    let (s, again) = post(&a, &t, &path, commit).await;
    assert_eq!((s, &again["duplicate"], &again["decisions"]), (StatusCode::OK, &json!(true), &c["decisions"]), "{again}");
    let events = listed(&a, &t).await;
    let spend = &events[&item_event_id(id, "ai_spend").to_string()];
    assert_eq!((&spend["amount"], &spend["cost_micros"], &spend["use_id"]), (&json!(11000), &json!(11000), &json!(id)), "{spend}");
    assert_eq!(events[&item_event_id(id, "calls").to_string()]["amount"], 1);
    assert_eq!(a.balance(&t).await, 20);
    // The report by day never adds the features' amounts together.
    let (s, u) = a.call("GET", "/v1/usage?group_by=day", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK, "{u}");
    let today = Utc::now().format("%Y-%m-%d").to_string();
    let rows = u["rows"].as_array().cloned().unwrap_or_default();
    let amount = |f: &str| rows.iter().find(|r| r["day"] == today && r["feature"] == f).map(|r| r["amount"].clone());
    assert_eq!(
        (rows.len(), amount("ai_spend"), amount("calls"), amount("images")),
        (3, Some(json!(11000)), Some(json!(1)), Some(json!(1)))
    );

    // A void of the use id voids every item: room and credits come back.
    let (s, v) = post(&a, &t, &format!("/v1/usage/{id}/void"), json!({"reason": "refund"})).await;
    assert_eq!((s, &v["id"], &v["duplicate"]), (StatusCode::OK, &json!(id), &json!(false)), "{v}");
    assert_eq!(a.total(&t, "calls").await["used"], 0);
    assert_eq!(a.total(&t, "ai_spend").await["used"], 0);
    assert_eq!(a.balance(&t).await, 30);
    assert!(listed(&a, &t).await.values().all(|e| e["voided_at"].is_string()));
    let (s, v) = post(&a, &t, &format!("/v1/usage/{id}/void"), json!({})).await;
    assert_eq!((s, &v["duplicate"]), (StatusCode::OK, &json!(true)), "{v}");

    // A held use released gives all its room back.
    let (s, h) = post(&a, &t, "/v1/holds", json!({"items": [{"feature": "calls", "amount": 3}, {"feature": "images", "amount": 3}]})).await;
    assert_eq!(s, StatusCode::CREATED, "{h}");
    assert_eq!(a.scalar("SELECT held FROM counters WHERE feature = '$credits'").await, 30);
    let (s, r) = a.call("DELETE", &format!("/v1/holds/{}", h["hold"]["id"].as_str().unwrap_or_default()), Some(&t), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{r}");
    assert_eq!(a.scalar("SELECT coalesce(sum(held), 0)::int8 FROM counters WHERE feature IN ('$credits', 'calls')").await, 0);
    let (s, v) = post(&a, &t, "/v1/consume", json!({"items": [{"feature": "calls", "amount": 3}]})).await;
    assert_eq!(s, StatusCode::OK, "the released room is free again: {v}");
}

#[tokio::test]
async fn item_events_on_the_sync_wire_and_a_devices_void_of_the_use() {
    let a = app_or_skip!(items_app().await);
    let t = token("device-user");
    let now = a.clock.now();
    let use_id = Uuid::now_v7();
    let item = |f: &str, amount: u64| json!({"id": item_event_id(use_id, f), "use_id": use_id, "feature": f, "amount": amount, "occurred_at": now});
    let sync2 = |device: &'static str, events: Vec<Value>| {
        let t = t.clone();
        let a = &a;
        async move { a.call("POST", "/v1/sync", Some(&t), Some(json!({"protocol": 2, "device_id": device, "events": events}))).await }
    };
    // An item whose id is not derived from its use id (and feature) is refused alone.
    let wrong = json!({"id": Uuid::now_v7(), "use_id": use_id, "feature": "calls", "amount": 1, "occurred_at": now});
    let swapped = json!({"id": item_event_id(use_id, "images"), "use_id": use_id, "feature": "calls", "amount": 1, "occurred_at": now});
    let (s, r) = sync2("phone", vec![item("calls", 2), item("images", 1), wrong.clone(), swapped.clone()]).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["accepted"], json!([item_event_id(use_id, "calls"), item_event_id(use_id, "images")]), "{r}");
    assert_eq!(
        r["rejected"],
        json!([{"id": wrong["id"], "reason": "invalid_event"}, {"id": swapped["id"], "reason": "invalid_event"}]),
        "{r}"
    );
    assert_eq!(listed(&a, &t).await[&item_event_id(use_id, "calls").to_string()]["use_id"], json!(use_id));
    assert_eq!(a.balance(&t).await, 20);
    // Another device may not void them; the recording device voids the whole use.
    let void = json!({"id": Uuid::now_v7(), "voids": use_id, "occurred_at": now});
    let (s, r) = sync2("tablet", vec![void.clone()]).await;
    assert_eq!((s, &r["rejected"]), (StatusCode::OK, &json!([{"id": void["id"], "reason": "void_not_allowed"}])), "{r}");
    assert_eq!(a.total(&t, "calls").await["used"], 2);
    let (s, r) = sync2("phone", vec![void.clone()]).await;
    assert_eq!((s, &r["accepted"]), (StatusCode::OK, &json!([void["id"]])), "{r}");
    assert_eq!(a.total(&t, "calls").await["used"], 0);
    assert_eq!(a.balance(&t).await, 30);
    assert!(listed(&a, &t).await.values().all(|e| e["voided_at"].is_string()));
}

#[tokio::test]
async fn who_may_void_or_commit_a_use_of_several_items() {
    let a = app_or_skip!(items_app().await);
    let t = token("end-user");
    assert_eq!(a.balance(&t).await, 30, "the user exists");
    let (s, k) = post(&a, &token("root-admin"), "/v1/admin/api-keys", json!({"name": "backend", "scopes": ["usage:write"]})).await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    let key = k["secret"].as_str().unwrap_or_default().to_string();
    let items = json!([{"feature": "calls"}, {"feature": "images"}]);
    let (s, v) = post(&a, &key, "/v1/consume", json!({"subject": "end-user", "items": items})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The end user cannot refund what the backend charged, not even one item.
    let before = snapshot(&a).await;
    let (s, r) = post(&a, &t, &format!("/v1/usage/{}/void", v["id"].as_str().unwrap_or_default()), json!({})).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("void_not_allowed")), "{r}");
    let item = item_event_id(uuid(&v["id"]), "images");
    let (s, r) = post(&a, &t, &format!("/v1/usage/{item}/void"), json!({})).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("void_not_allowed")), "{r}");
    assert_eq!(snapshot(&a).await, before);
    // Nor commit or release the backend's hold of several items.
    let (s, h) = post(
        &a,
        &key,
        "/v1/holds",
        json!({"subject": "end-user", "items": [{"feature": "calls", "amount": 1}, {"feature": "images", "amount": 1}]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{h}");
    let id = h["hold"]["id"].as_str().unwrap_or_default().to_string();
    let (s, r) = post(&a, &t, &format!("/v1/holds/{id}/commit"), json!({})).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("void_not_allowed")), "{r}");
    let (s, r) = a.call("DELETE", &format!("/v1/holds/{id}"), Some(&t), None).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("void_not_allowed")), "{r}");
    let (s, c) = post(&a, &key, &format!("/v1/holds/{id}/commit"), json!({"subject": "end-user"})).await;
    assert_eq!((s, c["decisions"].as_array().map(Vec::len)), (StatusCode::OK, Some(2)), "{c}");
    assert_eq!(a.balance(&t).await, 10, "two images at 10 credits from 30");
}
