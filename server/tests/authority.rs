//! The server decides for backends: `/v1/consume`, holds, voids and the pools they share —
//! through the real router, on one database shared by two replicas.

mod common;

use axum::http::StatusCode;
use chrono::Duration;
use common::*;
use serde_json::{Value, json};
use tally_core::Clock;
use uuid::Uuid;

const CAT: &str = r#"{"models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000}},
 "plans": [{"id": "free", "included_credits": {"amount": 100, "rollover": false}, "features": {
  "gen":      {"type": "metered", "limit": 20, "period": "month", "enforcement": "hard"},
  "daily":    {"type": "metered", "limit": 3, "period": "day", "enforcement": "hard"},
  "soft":     {"type": "metered", "limit": 2, "period": "month", "enforcement": "soft"},
  "images":   {"type": "credits", "cost": 10},
  "ai_spend": {"type": "budget", "limit_micros": 1000000, "period": "day", "enforcement": "hard"},
  "export":   {"type": "flag", "enabled": false},
  "api":      {"type": "rate", "limit": 3, "window_secs": 60}}},
  {"id": "pro", "features": {"pro_only": {"type": "flag", "enabled": true}}}]}"#;

fn tweak(c: &mut tally_server::Config) {
    if let Some(p) = &c.plans_file {
        std::fs::write(p, CAT).expect("write plans");
    }
    // 40 concurrent requests of one user must queue, not overflow.
    c.user_concurrency = 8;
    c.user_queue = 200;
    c.db_pool_size = 16;
}

async fn primary() -> Option<TestApp> {
    app_with(tweak).await
}

/// A second replica: its own state and router on the same database and clock.
async fn replica(a: &TestApp) -> TestApp {
    a.replica_with(tweak).await
}

async fn post(a: &TestApp, t: &str, path: &str, body: Value) -> (StatusCode, Value) {
    a.call("POST", path, Some(t), Some(body)).await
}

/// Every row that a decision could change, as text (a before/after snapshot).
async fn snapshot(a: &TestApp) -> Vec<String> {
    a.rows_text(&[
        "SELECT id::text, feature, amount::text, coalesce(cause, ''), coalesce(voided_at::text, '') FROM events ORDER BY id",
        "SELECT feature, period, period_start::text, used::text, cost_micros::text, held::text, array_to_string(causes, ',') FROM counters WHERE used <> 0 OR held <> 0 OR causes <> '{}' ORDER BY 1, 2, 3",
        "SELECT id::text, feature, amount::text, held::text, state, '' FROM holds ORDER BY id",
    ])
    .await
}

#[tokio::test]
async fn forty_concurrent_consumes_of_one_against_a_hard_limit_of_twenty_from_two_replicas() {
    let a = app_or_skip!(primary().await);
    let b = replica(&a).await;
    let t = token("racer");
    assert_eq!(post(&a, &t, "/v1/consume", json!({"feature": "gen", "amount": 1, "id": "warm"})).await.0, StatusCode::OK);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let router = if i % 2 == 0 { a.router.clone() } else { b.router.clone() };
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            use tower::ServiceExt;
            let body = serde_json::to_vec(&json!({"feature": "gen", "amount": 1})).unwrap();
            let req = axum::http::Request::post("/v1/consume")
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {t}"))
                .body(axum::body::Body::from(body))
                .unwrap();
            let resp = router.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
        }));
    }
    let mut ok = 0;
    let mut denied = 0;
    for task in tasks {
        let (s, v) = task.await.unwrap();
        match s {
            StatusCode::OK => {
                ok += 1;
                assert_eq!(v["decision"]["allowed"], true);
            }
            StatusCode::PAYMENT_REQUIRED => {
                denied += 1;
                assert_eq!(v["error"]["code"], "limit_reached", "{v}");
                assert_eq!(v["decision"]["allowed"], false);
                assert_eq!(v["decision"]["reason"], "limit_reached");
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    // One went first ("warm"): 19 of the 40 fit, 21 are denied.
    assert_eq!((ok, denied), (19, 21));
    let tot = a.total(&t, "gen").await;
    assert_eq!((tot["used"].as_u64(), tot["over_limit_by"].as_u64()), (Some(20), Some(0)), "{tot}");
    assert_eq!(a.scalar("SELECT count(*) FROM events WHERE feature = 'gen'").await, 20, "server total = distinct events");
}

#[tokio::test]
async fn exactly_twenty_of_forty_when_the_pool_starts_empty() {
    let a = app_or_skip!(primary().await);
    let b = replica(&a).await;
    let t = token("racer2");
    // Create the user first, so that the race is only about the pool.
    a.sync(&t, "d", vec![]).await;
    let futs = (0..40).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let t = t.clone();
        async move { post(app, &t, "/v1/consume", json!({"feature": "gen"})).await.0 }
    });
    let statuses = futures::future::join_all(futs).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let denied = statuses.iter().filter(|s| **s == StatusCode::PAYMENT_REQUIRED).count();
    assert_eq!((ok, denied), (20, 20), "{statuses:?}");
    assert_eq!(b.total(&t, "gen").await["used"], 20);
}

#[tokio::test]
async fn consume_statuses_replays_and_denials_record_nothing() {
    let a = app_or_skip!(primary().await);
    let t = token("statuses");
    let (s, v) = post(&a, &t, "/v1/consume", json!({"feature": "daily", "amount": 2, "id": "req-1"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["duplicate"].as_bool(), v["decision"]["used"].as_u64(), v["decision"]["remaining"].as_u64()),
        (Some(false), Some(2), Some(1))
    );
    let id = v["id"].clone();
    // A replay answers the first answer again and records nothing.
    let before = snapshot(&a).await;
    let (s, again) = post(&a, &t, "/v1/consume", json!({"feature": "daily", "amount": 2, "id": "req-1"})).await;
    assert_eq!((s, again["duplicate"].as_bool(), &again["id"]), (StatusCode::OK, Some(true), &id));
    assert_eq!(again["decision"], v["decision"]);
    let (s, _, _) = a
        .raw(
            "POST",
            "/v1/consume",
            Some(&t),
            serde_json::to_vec(&json!({"feature": "daily", "amount": 2})).unwrap(),
            &[("Idempotency-Key", "req-1")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "the Idempotency-Key stands in for id");
    // The same id with another body is a conflict.
    let (s, v) = post(&a, &t, "/v1/consume", json!({"feature": "daily", "amount": 1, "id": "req-1"})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    assert_eq!(snapshot(&a).await, before);

    // Every denial: its status and code, the decision in the body, nothing recorded.
    let cases = [
        (json!({"feature": "daily", "amount": 2}), StatusCode::PAYMENT_REQUIRED, "limit_reached"),
        (json!({"feature": "images", "amount": 11}), StatusCode::PAYMENT_REQUIRED, "insufficient_credits"),
        (json!({"feature": "export"}), StatusCode::FORBIDDEN, "not_in_plan"),
        (json!({"feature": "pro_only"}), StatusCode::FORBIDDEN, "not_in_plan"),
        (json!({"feature": "nope"}), StatusCode::UNPROCESSABLE_ENTITY, "unknown_feature"),
        (json!({"feature": "ai_spend", "model": "gpt-9", "input_tokens": 10}), StatusCode::UNPROCESSABLE_ENTITY, "unknown_model"),
    ];
    for (body, status, code) in cases {
        let (s, v) = post(&a, &t, "/v1/consume", body.clone()).await;
        assert_eq!((s, v["error"]["code"].as_str()), (status, Some(code)), "{body}: {v}");
        assert_eq!(v["decision"]["allowed"], false, "{body}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(snapshot(&a).await, before, "{body} recorded something");
    }
    // A rate rule: 429 with Retry-After once the window is full.
    for _ in 0..3 {
        assert_eq!(post(&a, &t, "/v1/consume", json!({"feature": "api"})).await.0, StatusCode::OK);
    }
    let before = snapshot(&a).await;
    let (s, v, h) = a.raw("POST", "/v1/consume", Some(&t), serde_json::to_vec(&json!({"feature": "api"})).unwrap(), &[]).await;
    assert_eq!(
        (s, v["error"]["code"].as_str(), v["decision"]["reason"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"), Some("rate_limited"))
    );
    assert_eq!(h.get("retry-after").and_then(|v| v.to_str().ok()), Some("60"));
    assert_eq!(snapshot(&a).await, before);

    // Bad input: a clear 4xx naming the field, nothing changed.
    let bad = [
        (json!({"feature": "daily", "amount": 0}), "amount"),
        (json!({"feature": "daily", "amount": -1}), "amount"),
        (json!({"feature": "daily", "amount": "x"}), "amount"),
        (json!({"amount": 1}), "feature"),
        (json!({"feature": 7}), "feature"),
        (json!({"feature": "daily", "id": 5}), "id"),
        (json!({"feature": "daily", "input_tokens": -3}), "input_tokens"),
        (json!({"feature": "daily", "metadata": {"x": "y".repeat(5000)}}), "metadata"),
        (json!({"feature": "daily", "subject": 3}), "subject"),
    ];
    for (body, field) in bad {
        let (s, v) = post(&a, &t, "/v1/consume", body.clone()).await;
        assert!(s.is_client_error(), "{body}: {s} {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains(field)), "{body}: {v}");
        assert_eq!(snapshot(&a).await, before, "{body}");
    }
    let (s, v, _) = a.raw("POST", "/v1/consume", Some(&t), b"{not json".to_vec(), &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_json")));
    assert_eq!(post(&a, &token("x"), "/v1/consume", json!({"feature": "daily", "user_id": Uuid::now_v7()})).await.0, StatusCode::NOT_FOUND);
    assert_eq!(snapshot(&a).await, before);
}

#[tokio::test]
async fn a_budget_consume_always_records_and_flags_its_overage() {
    let a = app_or_skip!(primary().await);
    let t = token("budget");
    // gpt-4o: 100k output tokens = 1,000,000 micros = the whole budget.
    let (s, v) = post(&a, &t, "/v1/consume", json!({"feature": "ai_spend", "model": "gpt-4o", "output_tokens": 100000})).await;
    assert_eq!((s, v["decision"]["reason"].as_str()), (StatusCode::OK, Some("ok")), "{v}");
    let (s, v) = post(&a, &t, "/v1/consume", json!({"feature": "ai_spend", "model": "gpt-4o", "output_tokens": 1000})).await;
    assert_eq!(
        (s, v["decision"]["allowed"].as_bool(), v["decision"]["reason"].as_str()),
        (StatusCode::OK, Some(true), Some("budget_exceeded")),
        "{v}"
    );
    let tot = a.total(&t, "ai_spend").await;
    assert_eq!(tot["over_limit_by"], 10000, "{tot}");
    assert_eq!(tot["over_limit_causes"], json!(["cost_over_estimate"]));
    // Deciding first is a hold: it is denied now.
    let (s, v) = post(&a, &t, "/v1/holds", json!({"feature": "ai_spend", "amount": 1})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::PAYMENT_REQUIRED, Some("budget_exceeded")), "{v}");
}

#[tokio::test]
async fn a_usage_report_over_a_hard_limit_records_with_its_cause_and_check_sees_the_free_room() {
    let a = app_or_skip!(primary().await);
    let t = token("reporter");
    for i in 0..4 {
        let (s, v) = post(
            &a,
            &t,
            "/v1/usage",
            json!({"id": Uuid::now_v7(), "feature": "daily", "amount": 1, "occurred_at": chrono::Utc::now().to_rfc3339()}),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{i}: {v}");
    }
    let tot = a.total(&t, "daily").await;
    assert_eq!((tot["used"].as_u64(), tot["over_limit_by"].as_u64()), (Some(4), Some(1)));
    assert_eq!(tot["over_limit_causes"], json!(["usage_report"]));
    assert_eq!(a.scalar("SELECT count(*) FROM events WHERE cause = 'usage_report'").await, 1, "only the use that went over");
    // Under the limit no cause shows.
    assert_eq!(a.total(&t, "gen").await["over_limit_causes"], json!([]));
    // /v1/check decides against the free room: a hold takes it.
    let u = token("checker");
    let (s, _) = post(&a, &u, "/v1/holds", json!({"feature": "gen", "amount": 19})).await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, v) = post(&a, &u, "/v1/check", json!({"feature": "gen", "amount": 1})).await;
    assert_eq!((v["allowed"].as_bool(), v["remaining"].as_u64(), v["used"].as_u64()), (Some(true), Some(1), Some(0)), "{v}");
    let (_, v) = post(&a, &u, "/v1/check", json!({"feature": "gen", "amount": 2})).await;
    assert_eq!((v["allowed"].as_bool(), v["reason"].as_str()), (Some(false), Some("limit_reached")), "{v}");
}

#[tokio::test]
async fn holds_racing_consumes_from_two_replicas_never_exceed_the_limit() {
    let a = app_or_skip!(primary().await);
    let b = replica(&a).await;
    let t = token("holder");
    a.sync(&t, "d", vec![]).await;
    let holds = (0..10).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let t = t.clone();
        async move { post(app, &t, "/v1/holds", json!({"feature": "gen", "amount": 3})).await }
    });
    let consumes = (0..20).map(|i| {
        let app = if i % 2 == 0 { &b } else { &a };
        let t = t.clone();
        async move { post(app, &t, "/v1/consume", json!({"feature": "gen"})).await }
    });
    let (holds, consumes) = futures::join!(futures::future::join_all(holds), futures::future::join_all(consumes));
    let granted: Vec<&Value> = holds.iter().filter(|(s, _)| *s == StatusCode::CREATED).map(|(_, v)| v).collect();
    let consumed = consumes.iter().filter(|(s, _)| *s == StatusCode::OK).count() as u64;
    for (s, v) in holds.iter().chain(consumes.iter()) {
        assert!(*s == StatusCode::CREATED || *s == StatusCode::OK || *s == StatusCode::PAYMENT_REQUIRED, "{s} {v}");
    }
    let held = 3 * granted.len() as u64;
    assert!(held + consumed <= 20, "held {held} + consumed {consumed}");
    assert!(held + consumed >= 18, "the room was used: held {held} + consumed {consumed}");
    assert_eq!(a.scalar("SELECT coalesce(sum(held), 0)::int8 FROM counters WHERE feature = 'gen'").await as u64, held);
    // Commit every hold with what it held: the limit holds, nothing over.
    for (i, h) in granted.iter().enumerate() {
        let app = if i % 2 == 0 { &a } else { &b };
        let (s, v) = post(app, &t, &format!("/v1/holds/{}/commit", h["hold"]["id"].as_str().unwrap()), json!({})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let tot = a.total(&t, "gen").await;
    assert_eq!(tot["used"].as_u64(), Some(held + consumed));
    assert_eq!((tot["over_limit_by"].as_u64(), &tot["over_limit_causes"]), (Some(0), &json!([])));
    assert_eq!(a.scalar("SELECT coalesce(sum(held), 0)::int8 FROM counters").await, 0);
}

#[tokio::test]
async fn commit_twice_release_twice_and_a_commit_over_the_estimate() {
    let a = app_or_skip!(primary().await);
    let t = token("committer");
    let (s, v) = post(&a, &t, "/v1/holds", json!({"feature": "gen", "amount": 5, "id": "job-1", "ttl_secs": 60})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["hold"]["feature"].as_str(), v["hold"]["amount"].as_u64(), v["decision"]["allowed"].as_bool()),
        (Some("gen"), Some(5), Some(true))
    );
    let id = v["hold"]["id"].as_str().unwrap().to_string();
    assert_eq!(id, tally_core::ledger::event_id_for_key("job-1").to_string());
    // The same id again answers the hold as it is.
    let (s, again) = post(&a, &t, "/v1/holds", json!({"feature": "gen", "amount": 5, "id": "job-1", "ttl_secs": 60})).await;
    assert_eq!((s, &again["hold"]), (StatusCode::OK, &v["hold"]));
    assert_eq!(a.scalar("SELECT held FROM counters WHERE feature = 'gen'").await, 5);
    // Commit with the real amount (over the estimate) and the model.
    let (s, c) = post(&a, &t, &format!("/v1/holds/{id}/commit"), json!({"amount": 7, "metadata": {"job": 1}})).await;
    assert_eq!((s, c["duplicate"].as_bool(), c["id"].as_str()), (StatusCode::OK, Some(false), Some(id.as_str())), "{c}");
    assert_eq!(c["decision"]["used"], 7);
    let before = snapshot(&a).await;
    let (s, c2) = post(&a, &t, &format!("/v1/holds/{id}/commit"), json!({"amount": 9})).await;
    assert_eq!((s, c2["duplicate"].as_bool(), &c2["decision"]), (StatusCode::OK, Some(true), &c["decision"]));
    assert_eq!(snapshot(&a).await, before, "a second commit records nothing");
    assert_eq!(a.call("DELETE", &format!("/v1/holds/{id}"), Some(&t), None).await.0, StatusCode::CONFLICT);
    assert_eq!(a.scalar("SELECT held FROM counters WHERE feature = 'gen'").await, 0);

    // Release twice: 204 both times; a released hold cannot be committed.
    let (_, v) = post(&a, &t, "/v1/holds", json!({"feature": "gen", "amount": 10})).await;
    let id2 = v["hold"]["id"].as_str().unwrap().to_string();
    assert_eq!(a.call("DELETE", &format!("/v1/holds/{id2}"), Some(&t), None).await.0, StatusCode::NO_CONTENT);
    let before = snapshot(&a).await;
    assert_eq!(a.call("DELETE", &format!("/v1/holds/{id2}"), Some(&t), None).await.0, StatusCode::NO_CONTENT);
    let (s, v) = post(&a, &t, &format!("/v1/holds/{id2}/commit"), json!({})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("hold_released")));
    assert_eq!(snapshot(&a).await, before);

    // A commit that takes the window over its limit: recorded, cause cost_over_estimate.
    let (_, v) = post(&a, &t, "/v1/holds", json!({"feature": "gen", "amount": 13})).await;
    let id3 = v["hold"]["id"].as_str().unwrap().to_string();
    let (s, v) = post(&a, &t, &format!("/v1/holds/{id3}/commit"), json!({"amount": 15})).await;
    assert_eq!(
        (s, v["decision"]["allowed"].as_bool(), v["decision"]["over_limit_by"].as_u64()),
        (StatusCode::OK, Some(true), Some(2)),
        "{v}"
    );
    let tot = a.total(&t, "gen").await;
    assert_eq!((tot["used"].as_u64(), tot["over_limit_causes"].clone()), (Some(22), json!(["cost_over_estimate"])));

    // Bad input: named fields, nothing changed.
    let before = snapshot(&a).await;
    for (body, field) in [
        (json!({"feature": "gen", "amount": 1, "ttl_secs": 3601}), "ttl_secs"),
        (json!({"feature": "gen", "amount": 1, "ttl_secs": 0}), "ttl_secs"),
        (json!({"feature": "gen"}), "amount"),
        (json!({"feature": "gen", "amount": 0}), "amount"),
        (json!({"feature": "api", "amount": 1}), "api"),
        (json!({"feature": "gen", "amount": 1, "model": "gpt-4o"}), "model"),
    ] {
        let (s, v) = post(&a, &t, "/v1/holds", body.clone()).await;
        assert!(s.is_client_error(), "{body}: {s}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains(field)), "{body}: {v}");
    }
    let (s, v) = post(&a, &t, &format!("/v1/holds/{}/commit", Uuid::now_v7()), json!({})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_hold")));
    // Another user's hold is not found.
    let (s, _) = post(&a, &token("other"), &format!("/v1/holds/{id2}/commit"), json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(a.call("DELETE", &format!("/v1/holds/{id3}"), Some(&token("other")), None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(snapshot(&a).await, before);
}

#[tokio::test]
async fn an_expired_hold_gives_its_room_back_without_a_request_for_that_user() {
    let a = app_or_skip!(primary().await);
    let _b = replica(&a).await; // two sweepers on one database
    let t = token("expirer");
    let (s, v) = post(&a, &t, "/v1/holds", json!({"feature": "gen", "amount": 20, "ttl_secs": 30})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let late = v["hold"]["id"].as_str().unwrap().to_string();
    assert_eq!(post(&a, &t, "/v1/consume", json!({"feature": "gen"})).await.0, StatusCode::PAYMENT_REQUIRED);
    a.clock.advance(Duration::seconds(31));
    // No request for this user: the sweepers (one per replica) end the hold.
    let mut waited = 0;
    while a.scalar("SELECT coalesce(sum(held), 0)::int8 FROM counters WHERE feature = 'gen'").await != 0 {
        waited += 1;
        assert!(waited < 100, "the sweep never ran");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(a.scalar("SELECT count(*) FROM holds WHERE state = 'expired'").await, 1);
    let (s, v) = post(&a, &t, "/v1/consume", json!({"feature": "gen", "amount": 20})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // A commit after expiry still records the work that was done, flagged hold_expired.
    let (s, v) = post(&a, &t, &format!("/v1/holds/{late}/commit"), json!({"amount": 2})).await;
    assert_eq!((s, v["decision"]["over_limit_by"].as_u64()), (StatusCode::OK, Some(2)), "{v}");
    let tot = a.total(&t, "gen").await;
    assert_eq!((tot["used"].as_u64(), tot["over_limit_causes"].clone()), (Some(22), json!(["hold_expired"])));
}

#[tokio::test]
async fn voids_count_in_their_own_past_window_and_return_credits() {
    let a = app_or_skip!(primary().await);
    let t = token("voider");
    let (s, v) = post(&a, &t, "/v1/consume", json!({"feature": "daily", "amount": 3, "id": "yesterday"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let old = v["id"].as_str().unwrap().to_string();
    a.clock.advance(Duration::days(1));
    assert_eq!(post(&a, &t, "/v1/consume", json!({"feature": "daily", "amount": 3, "id": "today"})).await.0, StatusCode::OK);
    assert_eq!(post(&a, &t, "/v1/consume", json!({"feature": "daily"})).await.0, StatusCode::PAYMENT_REQUIRED);
    // Voiding yesterday's use frees yesterday's window, not today's.
    let (s, v) = post(&a, &t, &format!("/v1/usage/{old}/void"), json!({"reason": "model call failed"})).await;
    assert_eq!((s, v["duplicate"].as_bool(), v["id"].as_str()), (StatusCode::OK, Some(false), Some(old.as_str())), "{v}");
    assert_eq!(a.scalar("SELECT used FROM counters WHERE feature = 'daily' ORDER BY period_start LIMIT 1").await, 0);
    assert_eq!(a.total(&t, "daily").await["used"], 3);
    assert_eq!(post(&a, &t, "/v1/consume", json!({"feature": "daily"})).await.0, StatusCode::PAYMENT_REQUIRED);
    let before = snapshot(&a).await;
    let (s, v) = post(&a, &t, "/v1/usage/yesterday/void", json!({})).await;
    assert_eq!((s, v["duplicate"].as_bool()), (StatusCode::OK, Some(true)), "the key names the same event");
    assert_eq!(snapshot(&a).await, before, "voiding twice changes nothing");
    // Unknown or another user's event: 404 unknown_event.
    let (s, v) = post(&a, &t, &format!("/v1/usage/{}/void", Uuid::now_v7()), json!({})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_event")));
    let (s, v) = post(&a, &token("stranger"), "/v1/usage/today/void", json!({})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_event")));
    let (s, v) = post(&a, &t, "/v1/usage/today/void", json!({"reason": "x".repeat(501)})).await;
    assert!(s.is_client_error() && v["error"]["message"].as_str().is_some_and(|m| m.contains("reason")), "{v}");
    assert_eq!(snapshot(&a).await, before);
    // Voiding today's use frees today's room.
    assert_eq!(post(&a, &t, "/v1/usage/today/void", json!({})).await.0, StatusCode::OK);
    assert_eq!(post(&a, &t, "/v1/consume", json!({"feature": "daily", "amount": 3})).await.0, StatusCode::OK);
    // Credits drawn by a voided use return to the balance.
    assert_eq!(a.balance(&t).await, 100);
    let (s, v) = post(&a, &t, "/v1/consume", json!({"feature": "images", "amount": 4})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(a.balance(&t).await, 60);
    post(&a, &t, &format!("/v1/usage/{}/void", v["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(a.balance(&t).await, 100);
}

#[tokio::test]
async fn a_credit_balance_spent_by_consumes_and_holds_from_two_replicas_never_goes_below_zero() {
    let a = app_or_skip!(primary().await);
    let b = replica(&a).await;
    let t = token("spender");
    assert_eq!(a.balance(&t).await, 100);
    let consumes = (0..12).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let t = t.clone();
        async move { post(app, &t, "/v1/consume", json!({"feature": "images"})).await }
    });
    let holds = (0..6).map(|i| {
        let app = if i % 2 == 0 { &b } else { &a };
        let t = t.clone();
        async move { post(app, &t, "/v1/holds", json!({"feature": "images", "amount": 1})).await }
    });
    let (consumes, holds) = futures::join!(futures::future::join_all(consumes), futures::future::join_all(holds));
    let spent = consumes.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let granted: Vec<&Value> = holds.iter().filter(|(s, _)| *s == StatusCode::CREATED).map(|(_, v)| v).collect();
    for (s, v) in consumes.iter().chain(holds.iter()) {
        if *s == StatusCode::PAYMENT_REQUIRED {
            assert_eq!(v["error"]["code"], "insufficient_credits", "{v}");
        } else {
            assert!(s.is_success(), "{s} {v}");
        }
    }
    assert_eq!(spent + granted.len(), 10, "100 credits at 10 each: exactly 10 uses fit");
    assert_eq!(a.scalar("SELECT held FROM counters WHERE feature = '$credits'").await, 10 * granted.len() as i64);
    for (i, h) in granted.iter().enumerate() {
        let app = if i % 2 == 0 { &a } else { &b };
        let (s, v) = post(app, &t, &format!("/v1/holds/{}/commit", h["hold"]["id"].as_str().unwrap()), json!({})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    assert_eq!(b.balance(&t).await, 0);
    assert_eq!(post(&b, &t, "/v1/consume", json!({"feature": "images"})).await.0, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(a.scalar("SELECT count(*) FROM events WHERE feature = 'images'").await, 10);
}

#[tokio::test]
async fn a_usage_write_key_consumes_holds_and_voids_for_a_named_subject_only() {
    let a = app_or_skip!(primary().await);
    let admin = token("root-admin");
    let (s, k) = post(&a, &admin, "/v1/admin/api-keys", json!({"name": "backend", "scopes": ["usage:write"]})).await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    let key = k["secret"].as_str().unwrap().to_string();
    let (_, me) = a.call("GET", "/v1/me", Some(&token("gina")), None).await;
    let before = snapshot(&a).await;
    let (s, v) = post(&a, &key, "/v1/consume", json!({"subject": "nobody", "feature": "gen"})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_subject")), "{v}");
    let (s, v) = post(&a, &key, "/v1/holds", json!({"subject": "nobody", "feature": "gen", "amount": 1})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_subject")), "{v}");
    assert_eq!(snapshot(&a).await, before);
    let (s, v) = post(&a, &key, "/v1/consume", json!({"subject": "gina", "feature": "gen", "id": "k-1"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = post(&a, &key, "/v1/consume", json!({"user_id": me["id"], "feature": "gen", "amount": 2})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, h) = post(&a, &key, "/v1/holds", json!({"subject": "gina", "feature": "gen", "amount": 4})).await;
    assert_eq!(s, StatusCode::CREATED, "{h}");
    let id = h["hold"]["id"].as_str().unwrap().to_string();
    assert_eq!(a.call("DELETE", &format!("/v1/holds/{id}?subject=gina"), Some(&key), None).await.0, StatusCode::NO_CONTENT);
    let (s, v) = post(&a, &key, "/v1/usage/k-1/void", json!({"subject": "gina"})).await;
    assert_eq!((s, v["duplicate"].as_bool()), (StatusCode::OK, Some(false)), "{v}");
    assert_eq!(a.total(&token("gina"), "gen").await["used"], 2);
}

/// A `usage:write` API key made by an admin: a backend's.
async fn backend_key(a: &TestApp) -> String {
    let (s, k) = post(a, &token("root-admin"), "/v1/admin/api-keys", json!({"name": "backend", "scopes": ["usage:write"]})).await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    k["secret"].as_str().unwrap().to_string()
}

/// The user's own history entry of event `id`.
async fn listed(a: &TestApp, t: &str, id: &str) -> Value {
    let (s, v) = a.call("GET", "/v1/usage/events", Some(t), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["events"].as_array().unwrap().iter().find(|e| e["id"] == id).cloned().unwrap_or(Value::Null)
}

#[tokio::test]
async fn an_end_user_cannot_void_what_a_backend_charged_and_the_backend_voids_anything_of_the_user() {
    let a = app_or_skip!(primary().await);
    let key = backend_key(&a).await;
    let t = token("uma");
    assert_eq!(a.balance(&t).await, 100);
    // A backend charges 5 images (credits 100 → 50); the user finds the id in their history.
    let (s, v) = post(&a, &key, "/v1/consume", json!({"subject": "uma", "feature": "images", "amount": 5})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let charged = v["id"].as_str().unwrap().to_string();
    assert_eq!(a.balance(&t).await, 50);
    let e = listed(&a, &t, &charged).await;
    assert_eq!((&e["recorded_by"], &e["source"]), (&json!("backend"), &json!("consume")), "{e}");
    let (s, v) = post(
        &a,
        &key,
        "/v1/usage",
        json!({"subject": "uma", "id": Uuid::now_v7(), "feature": "gen", "amount": 2, "occurred_at": a.clock.now()}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let reported = v["id"].as_str().unwrap().to_string();
    // The user's own token refunds neither: 403 void_not_allowed, nothing changes.
    let before = snapshot(&a).await;
    for id in [&charged, &reported] {
        let (s, v) = post(&a, &t, &format!("/v1/usage/{id}/void"), json!({"reason": "I want my credits back"})).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("void_not_allowed")), "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("backend")), "{v}");
    }
    assert_eq!(snapshot(&a).await, before, "a refused void changes nothing");
    assert_eq!(a.balance(&t).await, 50);
    assert_eq!(a.total(&t, "gen").await["used"], 2);
    // The backend voids it: credits back to 100.
    let (s, v) = post(&a, &key, &format!("/v1/usage/{charged}/void"), json!({"subject": "uma"})).await;
    assert_eq!((s, v["duplicate"].as_bool()), (StatusCode::OK, Some(false)), "{v}");
    assert_eq!(a.balance(&t).await, 100);
    // The user records and voids their own uses; a backend voids a user's and a device's too.
    let (s, v) = post(&a, &t, "/v1/consume", json!({"feature": "images", "amount": 2})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let own = v["id"].as_str().unwrap().to_string();
    assert_eq!(listed(&a, &t, &own).await["recorded_by"], "user");
    let (s, v) = post(&a, &t, &format!("/v1/usage/{own}/void"), json!({})).await;
    assert_eq!((s, v["duplicate"].as_bool()), (StatusCode::OK, Some(false)), "{v}");
    let (s, v) = post(&a, &t, "/v1/consume", json!({"feature": "images", "amount": 3})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let users = v["id"].as_str().unwrap().to_string();
    assert_eq!(a.balance(&t).await, 70);
    let (s, v) = post(&a, &key, &format!("/v1/usage/{users}/void"), json!({"subject": "uma"})).await;
    assert_eq!((s, v["duplicate"].as_bool()), (StatusCode::OK, Some(false)), "{v}");
    assert_eq!(a.balance(&t).await, 100);
    let synced = Uuid::now_v7();
    let (s, v) = a.sync(&t, "phone", vec![event(synced, "gen", 1)]).await;
    assert_eq!((s, &v["accepted"]), (StatusCode::OK, &json!([synced])), "{v}");
    let e = listed(&a, &t, &synced.to_string()).await;
    assert_eq!((&e["recorded_by"], &e["device_id"]), (&json!("device"), &json!("phone")), "{e}");
    let (s, v) = post(&a, &key, &format!("/v1/usage/{synced}/void"), json!({"subject": "uma"})).await;
    assert_eq!((s, v["duplicate"].as_bool()), (StatusCode::OK, Some(false)), "{v}");
    let synced = Uuid::now_v7();
    a.sync(&t, "phone", vec![event(synced, "gen", 1)]).await;
    let (s, v) = post(&a, &t, &format!("/v1/usage/{synced}/void"), json!({})).await;
    assert_eq!((s, v["duplicate"].as_bool()), (StatusCode::OK, Some(false)), "a user voids their device's use: {v}");
    assert_eq!(a.total(&t, "gen").await["used"], 2);
}

#[tokio::test]
async fn a_users_token_neither_commits_nor_releases_a_backends_hold() {
    let a = app_or_skip!(primary().await);
    let key = backend_key(&a).await;
    let t = token("hana");
    assert_eq!(a.balance(&t).await, 100);
    let (s, h) = post(&a, &key, "/v1/holds", json!({"subject": "hana", "feature": "images", "amount": 4, "id": "job-1"})).await;
    assert_eq!(s, StatusCode::CREATED, "{h}");
    let held = "SELECT held FROM counters WHERE feature = '$credits'";
    assert_eq!(a.scalar(held).await, 40, "40 credits held");
    let before = snapshot(&a).await;
    let (s, v) = post(&a, &t, "/v1/holds/job-1/commit", json!({"amount": 1})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("void_not_allowed")), "{v}");
    let (s, v) = a.call("DELETE", "/v1/holds/job-1", Some(&t), None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("void_not_allowed")), "{v}");
    assert_eq!(snapshot(&a).await, before, "the hold is unchanged, still open");
    assert_eq!(a.scalar(held).await, 40);
    // The backend commits it; a user's own hold is the user's to release.
    let (s, v) = post(&a, &key, "/v1/holds/job-1/commit", json!({"subject": "hana", "amount": 3})).await;
    assert_eq!((s, v["duplicate"].as_bool()), (StatusCode::OK, Some(false)), "{v}");
    assert_eq!(a.balance(&t).await, 70);
    let (s, v) = post(&a, &t, "/v1/usage/job-1/void", json!({})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("void_not_allowed")),
        "the commit's event is the backend's: {v}"
    );
    let (s, h) = post(&a, &t, "/v1/holds", json!({"feature": "images", "amount": 2})).await;
    assert_eq!(s, StatusCode::CREATED, "{h}");
    let own = h["hold"]["id"].as_str().unwrap();
    assert_eq!(a.call("DELETE", &format!("/v1/holds/{own}"), Some(&t), None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(a.balance(&t).await, 70);
}

#[tokio::test]
async fn a_hold_id_is_taken_for_consumes_usage_reports_and_syncs_open_or_committed() {
    let a = app_or_skip!(primary().await);
    let t = token("ivy");
    let (s, h) = post(&a, &t, "/v1/holds", json!({"feature": "gen", "amount": 4, "id": "render-7"})).await;
    assert_eq!(s, StatusCode::CREATED, "{h}");
    let id = h["hold"]["id"].as_str().unwrap().to_string();
    for state in ["open", "committed"] {
        let before = snapshot(&a).await;
        let (s, v) = post(&a, &t, "/v1/consume", json!({"feature": "gen", "amount": 4, "id": "render-7"})).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{state}: {v}");
        let (s, v, _) = a
            .raw(
                "POST",
                "/v1/usage",
                Some(&t),
                serde_json::to_vec(&json!({"feature": "gen", "amount": 4, "occurred_at": a.clock.now()})).unwrap(),
                &[("idempotency-key", "render-7")],
            )
            .await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{state}: {v}");
        let (s, v) = a.sync(&t, "phone", vec![json!({"id": id, "feature": "gen", "amount": 4, "occurred_at": a.clock.now()})]).await;
        assert_eq!((s, &v["rejected"]), (StatusCode::OK, &json!([{"id": id, "reason": "conflict"}])), "{state}: {v}");
        assert_eq!(snapshot(&a).await, before, "{state}: nothing recorded");
        if state == "open" {
            let (s, v) = post(&a, &t, "/v1/holds/render-7/commit", json!({"amount": 3})).await;
            assert_eq!((s, v["duplicate"].as_bool()), (StatusCode::OK, Some(false)), "the hold commits fine: {v}");
        }
    }
    assert_eq!(a.total(&t, "gen").await["used"], 3);
    assert_eq!(a.scalar("SELECT held FROM counters WHERE feature = 'gen'").await, 0);
}
