//! Stored counts fail closed: a counter row corrupted in Postgres (a negative `used`, `held`,
//! cost or limit) never reads as room. Decisions, recording and totals on it answer 500
//! `internal` (the row is logged) and record nothing.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};
use uuid::Uuid;

async fn exec(a: &TestApp, sql: &str) {
    let (client, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client.batch_execute(sql).await.expect("exec");
}

/// Every event and counter row, as text.
async fn snapshot(a: &TestApp) -> Vec<String> {
    let (client, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    let mut out = Vec::new();
    for q in [
        "SELECT id::text, feature, amount::text FROM events ORDER BY id",
        "SELECT feature, period_start::text, used::text, cost_micros::text, held::text, coalesce(lim::text, '') FROM counters ORDER BY 1, 2",
        "SELECT id::text, feature, held::text, state FROM holds ORDER BY id",
    ] {
        for r in client.query(q, &[]).await.expect("snapshot") {
            out.push((0..r.len()).map(|i| r.get::<_, String>(i)).collect::<Vec<_>>().join("|"));
        }
    }
    out
}

fn assert_internal(what: &str, (s, v): (StatusCode, Value)) {
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::INTERNAL_SERVER_ERROR, Some("internal")), "{what}: {v}");
}

/// One use of `ai_chat` (hard, 5 a month) and of `ai_spend` (hard budget) recorded, so that
/// their counter rows exist; then `corrupt` is run on them.
async fn corrupted(sub: &str, corrupt: &str) -> Option<(TestApp, String)> {
    let a = app().await?;
    let t = token(sub);
    for feature in ["ai_chat", "ai_spend"] {
        let (s, v) = a.call("POST", "/v1/consume", Some(&t), Some(json!({"feature": feature, "amount": 1}))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    exec(&a, corrupt).await;
    Some((a, t))
}

/// The decisions of the server on a corrupted pool: consume, check and holds.
async fn assert_decisions_fail_closed(a: &TestApp, t: &str, feature: &str) {
    let before = snapshot(a).await;
    let body = json!({"feature": feature, "amount": 1});
    assert_internal("consume", a.call("POST", "/v1/consume", Some(t), Some(body.clone())).await);
    assert_internal("check", a.call("POST", "/v1/check", Some(t), Some(body.clone())).await);
    assert_internal("hold", a.call("POST", "/v1/holds", Some(t), Some(body)).await);
    assert_eq!(snapshot(a).await, before, "nothing recorded, nothing held");
}

#[tokio::test]
async fn a_negative_used_never_reads_as_room_for_a_decision() {
    let (a, t) = app_or_skip!(corrupted("neg-used", "UPDATE counters SET used = -100 WHERE feature = 'ai_chat'").await);
    assert_decisions_fail_closed(&a, &t, "ai_chat").await;
}

#[tokio::test]
async fn a_negative_held_never_reads_as_room_for_a_decision() {
    let (a, t) = app_or_skip!(corrupted("neg-held", "UPDATE counters SET held = -100 WHERE feature = 'ai_chat'").await);
    assert_decisions_fail_closed(&a, &t, "ai_chat").await;
}

#[tokio::test]
async fn a_negative_cost_never_reads_as_room_for_a_budget_decision() {
    let (a, t) = app_or_skip!(corrupted("neg-cost", "UPDATE counters SET cost_micros = -5000000 WHERE feature = 'ai_spend'").await);
    assert_decisions_fail_closed(&a, &t, "ai_spend").await;
}

#[tokio::test]
async fn a_sync_or_usage_on_a_negative_counter_records_nothing_and_answers_no_totals() {
    let (a, t) = app_or_skip!(corrupted("neg-sync", "UPDATE counters SET used = -100 WHERE feature = 'ai_chat'").await);
    let before = snapshot(&a).await;
    assert_internal("sync", a.sync(&t, "d", vec![event(Uuid::now_v7(), "ai_chat", 1)]).await);
    assert_internal("usage", a.call("POST", "/v1/usage", Some(&t), Some(event(Uuid::now_v7(), "ai_chat", 1))).await);
    // A pull alone reads the totals: a corrupt one is an error, not `used: 0`.
    assert_internal("pull", a.sync(&t, "d", vec![]).await);
    assert_eq!(snapshot(&a).await, before, "nothing recorded");
}

#[tokio::test]
async fn a_negative_stored_limit_is_an_error_not_a_total() {
    let (a, t) = app_or_skip!(corrupted("neg-lim", "UPDATE counters SET lim = -1 WHERE feature = 'ai_chat'").await);
    let before = snapshot(&a).await;
    assert_internal("sync", a.sync(&t, "d", vec![event(Uuid::now_v7(), "ai_chat", 1)]).await);
    assert_eq!(snapshot(&a).await, before, "nothing recorded");
}

#[tokio::test]
async fn a_negative_stored_version_is_an_error_not_a_token_older_than_the_device_holds() {
    // Version 0 would sign a token the device ignores as stale: it would keep the plan it had.
    let (a, t) = app_or_skip!(corrupted("neg-ver", "UPDATE users SET ver = -1000000").await);
    let before = snapshot(&a).await;
    assert_internal("entitlements", a.call("GET", "/v1/entitlements", Some(&t), None).await);
    assert_internal("sync", a.sync(&t, "d", vec![event(Uuid::now_v7(), "ai_chat", 1)]).await);
    assert_eq!(snapshot(&a).await, before, "nothing recorded");
}

#[tokio::test]
async fn a_corrupt_device_row_is_an_error_not_a_device_that_holds_nothing() {
    for (column, corrupt) in [
        ("lease_ver", "UPDATE devices SET lease_ver = -5"),
        ("high_seq", "UPDATE devices SET high_seq = -5"),
        ("leases", r#"UPDATE devices SET leases = '{"not": "a list"}'"#),
    ] {
        let (a, t) = app_or_skip!(corrupted(&format!("dev-{column}"), "SELECT 1").await);
        let sync2 = json!({"protocol": 2, "device_id": "phone", "events": [event(Uuid::now_v7(), "ai_chat", 1)]});
        let (s, v) = a.call("POST", "/v1/sync", Some(&t), Some(sync2.clone())).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        exec(&a, corrupt).await;
        let before = snapshot(&a).await;
        let mut again = sync2.clone();
        again["events"] = json!([event(Uuid::now_v7(), "ai_chat", 1)]);
        assert_internal(&format!("{column}: sync"), a.call("POST", "/v1/sync", Some(&t), Some(again)).await);
        assert_internal(&format!("{column}: devices"), a.call("GET", "/v1/me/devices", Some(&t), None).await);
        assert_eq!(snapshot(&a).await, before, "{column}: nothing recorded");
    }
}

#[tokio::test]
async fn a_negative_cost_or_credit_price_of_a_use_cannot_be_stored() {
    // Either would read as room: a budget rebuilt from its uses, a credit balance replayed.
    let (a, _) = app_or_skip!(corrupted("neg-event", "SELECT 1").await);
    let (client, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    let before = snapshot(&a).await;
    for (column, constraint) in [("cost_micros", "events_cost_never_negative"), ("credits", "events_credits_never_negative")] {
        let err = client.batch_execute(&format!("UPDATE events SET {column} = -1")).await.expect_err(column);
        let db = err.as_db_error().map(|d| d.constraint().unwrap_or_default().to_string());
        assert_eq!(db.as_deref(), Some(constraint), "{column}: {err}");
    }
    assert_eq!(snapshot(&a).await, before, "nothing changed");
}
