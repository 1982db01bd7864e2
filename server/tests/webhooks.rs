//! Outbound webhooks through the real router and worker, a real Postgres, and a real receiver
//! on loopback: registration and its bad inputs, Standard Webhooks signatures checked
//! independently, retries while the receiver is down, dead letters and replay, per-user order,
//! usage thresholds once per window, time-caused events, and the address guard.

mod common;
#[path = "common/receiver.rs"]
mod receiver;

use axum::http::StatusCode;
use chrono::Duration;
use common::*;
use receiver::{Received, Receiver, verify};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tally_server::webhooks::EVENT_TYPES;

/// A fast worker that may reach loopback receivers.
fn fast(c: &mut tally_server::Config) {
    c.webhook_allow_private = true;
    c.webhook_poll_ms = 20;
    c.webhook_backoff_ms = 50;
    c.webhook_timeout_ms = 2000;
}

async fn register(a: &TestApp, url: &str, events: &[&str]) -> (String, String) {
    let (s, v) = a.call("POST", "/v1/admin/webhooks", Some(&token("root-admin")), Some(json!({"url": url, "events": events}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    (v["id"].as_str().unwrap().to_string(), v["secret"].as_str().unwrap().to_string())
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn deliveries(a: &TestApp, endpoint: &str) -> Vec<Value> {
    let (s, v) = a.call("GET", &format!("/v1/admin/webhooks/{endpoint}/deliveries?limit=1000"), Some(&token("root-admin")), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["deliveries"].as_array().unwrap().clone()
}

async fn credit(a: &TestApp, subject: &str, credits: i64) {
    let body = json!({"subject": subject, "credits": credits, "reason": "gift"});
    let (s, v) = a.call("POST", "/v1/admin/grants", Some(&token("root-admin")), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn endpoints_are_registered_listed_and_deleted_and_bad_input_changes_nothing() {
    let a = app_or_skip!(app_with(fast).await);
    let admin = token("root-admin");
    let (s, v) = a
        .call(
            "POST",
            "/v1/admin/webhooks",
            Some(&admin),
            Some(json!({"url": "https://hooks.example.com/tally", "events": ["payment.failed", "payment.failed", "usage.threshold"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let secret = v["secret"].as_str().unwrap();
    assert!(tally_server::webhooks::secret_key(secret).is_ok() && secret.starts_with("whsec_"), "{v}");
    assert_eq!(v["events"], json!(["payment.failed", "usage.threshold"]), "duplicates dropped");
    let id = v["id"].as_str().unwrap().to_string();
    let given = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (s, v) = a
        .call(
            "POST",
            "/v1/admin/webhooks",
            Some(&admin),
            Some(json!({"url": "http://hooks.example.com/2", "events": ["account.deleted"], "secret": given})),
        )
        .await;
    assert_eq!((s, v["secret"].as_str()), (StatusCode::CREATED, Some(given)), "{v}");
    let second = v["id"].as_str().unwrap().to_string();

    let (s, v) = a.call("GET", "/v1/admin/webhooks", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK);
    let list = v["webhooks"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(!v.to_string().contains("whsec_"), "secrets are shown once, never listed: {v}");

    // Bad input: a clear error, and nothing registered.
    let bad: Vec<(Value, StatusCode, &str)> = vec![
        (json!({"url": "ftp://x.example.com/", "events": ["payment.failed"]}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_url"),
        (json!({"url": "not a url", "events": ["payment.failed"]}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_url"),
        (
            json!({"url": format!("https://x.example.com/{}", "a".repeat(2100)), "events": ["payment.failed"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_url",
        ),
        (json!({"url": "https://user:pw@x.example.com/", "events": ["payment.failed"]}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_url"),
        (json!({"url": "https://x.example.com/", "events": []}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_events"),
        (json!({"url": "https://x.example.com/", "events": ["payment.maybe"]}), StatusCode::UNPROCESSABLE_ENTITY, "unknown_event_type"),
        (
            json!({"url": "https://x.example.com/", "events": ["payment.failed"], "secret": "hunter2"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_secret",
        ),
        (
            json!({"url": "https://x.example.com/", "events": ["payment.failed"], "secret": "whsec_c2hvcnQ="}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_secret",
        ),
        (
            json!({"url": "https://x.example.com/", "events": ["payment.failed"], "colour": "red"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (json!({"events": ["payment.failed"]}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
    ];
    for (body, status, code) in bad {
        let (s, v) = a.call("POST", "/v1/admin/webhooks", Some(&admin), Some(body.clone())).await;
        assert_eq!((s, v["error"]["code"].as_str()), (status, Some(code)), "{body}: {v}");
    }
    let (s, v, _) = a.raw("POST", "/v1/admin/webhooks", Some(&admin), b"{\"url\":".to_vec(), &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_json")));
    // Not an admin: the routes do not exist for them.
    let (s, v) = a
        .call(
            "POST",
            "/v1/admin/webhooks",
            Some(&token("someone")),
            Some(json!({"url": "https://x.example.com/", "events": ["payment.failed"]})),
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{v}");
    let (s, _) = a.call("GET", "/v1/admin/webhooks", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(a.count("webhook_endpoints").await, 2, "no refused registration was stored");

    // Deliveries and replay: bad queries and unknown ids.
    for q in ["state=lost", "limit=0", "limit=5000", "limit=x", "colour=red"] {
        let (s, v) = a.call("GET", &format!("/v1/admin/webhooks/{id}/deliveries?{q}"), Some(&admin), None).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_query")), "{q}: {v}");
    }
    let unknown = uuid::Uuid::now_v7();
    for path in [format!("/v1/admin/webhooks/{unknown}/deliveries"), "/v1/admin/webhooks/nope/deliveries".to_string()] {
        let (s, v) = a.call("GET", &path, Some(&admin), None).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{path}");
    }
    let (s, _) = a.call("POST", &format!("/v1/admin/webhooks/{unknown}/replay"), Some(&admin), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = a.call("POST", &format!("/v1/admin/webhooks/{id}/replay"), Some(&admin), Some(json!({"event_id": unknown}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_event")), "{v}");
    let (s, v) = a.call("POST", &format!("/v1/admin/webhooks/{id}/replay"), Some(&admin), Some(json!({"event_id": "x"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_body")), "{v}");
    let (s, v) = a.call("POST", &format!("/v1/admin/webhooks/{id}/replay"), Some(&admin), None).await;
    assert_eq!((s, v["replayed"].as_u64()), (StatusCode::OK, Some(0)), "{v}");

    let (s, _) = a.call("DELETE", &format!("/v1/admin/webhooks/{second}"), Some(&admin), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = a.call("DELETE", &format!("/v1/admin/webhooks/{second}"), Some(&admin), None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    assert_eq!(a.count("webhook_endpoints").await, 1);
}

#[tokio::test]
async fn without_allow_private_loopback_receivers_are_refused_at_registration_and_after_dns() {
    let a = app_or_skip!(
        app_with(|c| {
            fast(c);
            c.webhook_allow_private = false;
        })
        .await
    );
    let r = Receiver::start().await;
    let admin = token("root-admin");
    let port = r.url.trim_start_matches("http://127.0.0.1:").trim_end_matches("/hook").to_string();
    for url in [
        r.url.clone(),
        format!("http://[::1]:{port}/hook"),
        "http://169.254.169.254/latest".into(),
        "http://10.0.0.8/".into(),
        format!("http://0x7f000001:{port}/hook"),
        format!("http://2130706433:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
    ] {
        let (s, v) = a.call("POST", "/v1/admin/webhooks", Some(&admin), Some(json!({"url": url, "events": ["credits.granted"]}))).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("private_address")), "{url}: {v}");
    }
    assert_eq!(a.count("webhook_endpoints").await, 0);
    // A name is resolved at delivery: `localhost` resolves to loopback only, so it is refused.
    let (id, _) = register(&a, &format!("http://localhost:{port}/hook"), &["credits.granted"]).await;
    credit(&a, "guarded", 3).await;
    wait_for("a refused attempt", async || {
        deliveries(&a, &id).await.first().is_some_and(|d| d["attempts"].as_i64() >= Some(1) && !d["last_error"].is_null())
    })
    .await;
    let d = &deliveries(&a, &id).await[0];
    assert!(d["last_error"].as_str().unwrap().contains("private, loopback or link-local"), "{d}");
    assert!(d["last_status"].is_null(), "{d}");
    assert!(r.all().is_empty(), "nothing reached the loopback receiver");
}

#[tokio::test]
async fn deliveries_are_signed_per_standard_webhooks_and_attempts_are_listed() {
    let a = app_or_skip!(app_with(fast).await);
    let r = Receiver::start().await;
    let (id, secret) = register(&a, &r.url, &["credits.granted", "entitlements.changed"]).await;
    let (other, other_secret) = register(&a, &r.url, &["credits.granted"]).await;
    credit(&a, "signed-user", 7).await;
    wait_for("three deliveries", async || r.all().len() >= 3).await;
    let got = r.all();
    assert_eq!(got.len(), 3, "credits.granted to both endpoints, entitlements.changed to one: {got:?}");
    for g in &got {
        assert!(verify(&secret, g) ^ verify(&other_secret, g), "signed with exactly its endpoint's secret: {g:?}");
        let b = g.json();
        assert!(EVENT_TYPES.contains(&b["type"].as_str().unwrap()), "{b}");
        assert!(b["created_at"].as_str().is_some() && b["data"]["subject"] == "signed-user" && b["data"]["user_id"].is_string(), "{b}");
        let ts: i64 = g.timestamp.parse().unwrap();
        assert!((ts - chrono::Utc::now().timestamp()).abs() < 60, "webhook-timestamp is now");
    }
    let granted: Vec<&Received> = got.iter().filter(|g| g.json()["type"] == "credits.granted").collect();
    assert_eq!(granted.len(), 2);
    assert_eq!(granted[0].id, granted[1].id, "one event, one webhook-id, whatever the endpoint");
    assert_eq!(granted[0].json()["data"]["amount"], 7);
    // A tampered body fails the check.
    let mut forged = granted[0].clone();
    forged.body = String::from_utf8(forged.body).unwrap().replace("7", "700").into_bytes();
    assert!(!verify(&secret, &forged) && !verify(&other_secret, &forged));

    wait_for("recorded attempts", async || deliveries(&a, &id).await.iter().all(|d| d["state"] == "delivered")).await;
    let list = deliveries(&a, &id).await;
    assert_eq!(list.len(), 2, "{list:?}");
    for d in &list {
        assert_eq!((d["attempts"].as_i64(), d["last_status"].as_i64()), (Some(1), Some(200)), "{d}");
        assert_eq!(d["attempt_log"].as_array().unwrap().len(), 1, "{d}");
        assert!(d["delivered_at"].is_string() && d["next_attempt_at"].is_null(), "{d}");
    }
    assert_eq!(deliveries(&a, &other).await.len(), 1);
    let (s, v) = a.call("GET", &format!("/v1/admin/webhooks/{id}/deliveries?state=pending"), Some(&token("root-admin")), None).await;
    assert_eq!((s, v["deliveries"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)));
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let a = app_or_skip!(app_with(fast).await);
    let r = Receiver::start().await;
    r.set_status(307);
    let (id, _) = register(&a, &r.url, &["credits.granted"]).await;
    credit(&a, "redirected", 1).await;
    wait_for("a refused redirect", async || deliveries(&a, &id).await.first().is_some_and(|d| d["last_status"] == 307)).await;
    let d = &deliveries(&a, &id).await[0];
    assert_eq!(d["state"], "pending", "a redirect is a failure, retried: {d}");
    assert!(d["last_error"].as_str().unwrap().contains("redirects are not followed"), "{d}");
    assert_eq!(r.followed(), 0, "the Location was never requested");
}

#[tokio::test]
async fn a_receiver_that_does_not_answer_times_out_and_is_retried() {
    let a = app_or_skip!(
        app_with(|c| {
            fast(c);
            c.webhook_timeout_ms = 300;
        })
        .await
    );
    let r = Receiver::start().await;
    r.set_status(receiver::HANG);
    let (id, _) = register(&a, &r.url, &["credits.granted"]).await;
    credit(&a, "slow-receiver", 1).await;
    wait_for("a timed-out attempt", async || deliveries(&a, &id).await.first().is_some_and(|d| !d["last_error"].is_null())).await;
    let d = &deliveries(&a, &id).await[0];
    assert!(d["last_error"].as_str().unwrap().contains("timed out"), "{d}");
    assert_eq!((d["state"].as_str(), d["last_status"].as_i64()), (Some("pending"), None), "{d}");
    let ms = d["attempt_log"][0]["duration_ms"].as_i64().unwrap();
    assert!(ms < 3000, "the attempt ended at the timeout, not with the receiver's answer: {ms} ms");
    r.set_status(200);
    wait_for("the retry", async || deliveries(&a, &id).await[0]["state"] == "delivered").await;
}

#[tokio::test]
async fn a_receiver_down_for_a_while_then_up_gets_every_event_once_per_id() {
    let a = app_or_skip!(app_with(fast).await);
    let r = Receiver::start().await;
    r.set_status(503);
    let (id, secret) = register(&a, &r.url, &["credits.granted"]).await;
    for i in 0..4 {
        for u in 0..3 {
            credit(&a, &format!("down-{u}"), i + 1).await;
        }
    }
    wait_for("failed attempts", async || r.all().len() >= 6).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    r.set_status(200);
    wait_for("every delivery", async || {
        let d = deliveries(&a, &id).await;
        d.len() == 12 && d.iter().all(|d| d["state"] == "delivered")
    })
    .await;
    let ok: HashMap<String, usize> = r.counts();
    let events: i64 = a.count("webhook_events").await;
    assert_eq!(events, 12);
    assert_eq!(ok.len(), 12, "every event arrived: {ok:?}");
    assert!(r.all().iter().all(|g| verify(&secret, g)));
    let list = deliveries(&a, &id).await;
    assert!(list.iter().any(|d| d["attempts"].as_i64() > Some(1)), "some were retried: {list:?}");
    let retried = list.iter().find(|d| d["attempts"].as_i64() > Some(1)).unwrap();
    let log = retried["attempt_log"].as_array().unwrap();
    assert_eq!(log.first().unwrap()["status"], 503, "{retried}");
    assert_eq!(log.last().unwrap()["status"], 200, "{retried}");
    // Per user, the events arrived in the order they happened (each waits for the one before).
    for u in 0..3 {
        let subject = format!("down-{u}");
        let amounts: Vec<i64> = r
            .all()
            .iter()
            .filter(|g| g.json()["data"]["subject"] == subject.as_str())
            .map(|g| g.json()["data"]["amount"].as_i64().unwrap())
            .collect::<Vec<_>>();
        let mut firsts = Vec::new();
        for x in amounts {
            if !firsts.contains(&x) {
                firsts.push(x);
            }
        }
        assert_eq!(firsts, [1, 2, 3, 4], "{subject}");
    }
}

#[tokio::test]
async fn a_dead_letter_does_not_block_later_events_and_replay_sends_it_again() {
    let a = app_or_skip!(
        app_with(|c| {
            fast(c);
            c.webhook_retry_secs = 1;
        })
        .await
    );
    let r = Receiver::start().await;
    r.set_status(500);
    let (id, _) = register(&a, &r.url, &["credits.granted"]).await;
    credit(&a, "dead-user", 1).await;
    wait_for("a dead letter", async || deliveries(&a, &id).await.iter().any(|d| d["state"] == "dead")).await;
    let dead = deliveries(&a, &id).await[0].clone();
    assert!(dead["attempts"].as_i64() > Some(1) && dead["last_status"] == 500, "{dead}");
    r.set_status(200);
    credit(&a, "dead-user", 2).await;
    wait_for("the later event", async || deliveries(&a, &id).await.iter().any(|d| d["state"] == "delivered")).await;
    let list = deliveries(&a, &id).await;
    assert_eq!(list.iter().map(|d| d["state"].as_str().unwrap()).collect::<Vec<_>>(), ["delivered", "dead"], "{list:?}");
    let (s, v) = a.call("POST", &format!("/v1/admin/webhooks/{id}/replay"), Some(&token("root-admin")), None).await;
    assert_eq!((s, v["replayed"].as_u64()), (StatusCode::OK, Some(1)), "{v}");
    wait_for("the replayed event", async || deliveries(&a, &id).await.iter().all(|d| d["state"] == "delivered")).await;
    let ids: Vec<String> = r.all().iter().filter(|g| g.json()["data"]["amount"] == 1).map(|g| g.id.clone()).collect();
    assert!(ids.len() >= 3 && ids.iter().all(|i| *i == ids[0]), "a replay sends the same webhook-id: {ids:?}");
    // One delivered event sent again on request.
    let first = list[0]["event_id"].as_str().unwrap();
    let (s, v) =
        a.call("POST", &format!("/v1/admin/webhooks/{id}/replay"), Some(&token("root-admin")), Some(json!({"event_id": first}))).await;
    assert_eq!((s, v["replayed"].as_u64()), (StatusCode::OK, Some(1)), "{v}");
    wait_for("the resent event", async || r.counts().get(first).copied() == Some(2)).await;
}

#[tokio::test]
async fn usage_thresholds_fire_once_per_window_per_threshold() {
    let a = app_or_skip!(app_with(fast).await);
    let r = Receiver::start().await;
    let (id, _) = register(&a, &r.url, &["usage.threshold"]).await;
    let t = token("heavy-user");
    let seq = std::sync::atomic::AtomicU64::new(1);
    let ev = |n: u32| {
        let s = seq.fetch_add(1, Ordering::SeqCst);
        json!({"id": uuid::Uuid::now_v7(), "feature": "ai_chat", "amount": n, "occurred_at": chrono::Utc::now(), "device_seq": s})
    };
    // ai_chat: 5 a month, hard. 3 of 5: nothing; 4: 80 %; 5: 100 %; beyond (protocol 1): nothing new.
    let (s, v) = a.sync(&t, "d", vec![ev(3)]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(a.count("webhook_events").await, 0);
    a.sync(&t, "d", vec![ev(1)]).await;
    a.sync(&t, "d", vec![ev(1)]).await;
    a.sync(&t, "d", vec![ev(2)]).await;
    let (s, v) = a
        .call(
            "POST",
            "/v1/usage",
            Some(&t),
            Some(json!({"id": uuid::Uuid::now_v7(), "feature": "ai_chat", "amount": 1, "occurred_at": chrono::Utc::now()})),
        )
        .await;
    assert!(s.is_success(), "{v}");
    // The unlimited `notes` never crosses anything.
    a.sync(
        &t,
        "d",
        vec![json!({"id": uuid::Uuid::now_v7(), "feature": "notes", "amount": 1000, "occurred_at": chrono::Utc::now(), "device_seq": 99})],
    )
    .await;
    wait_for("two deliveries", async || deliveries(&a, &id).await.iter().filter(|d| d["state"] == "delivered").count() == 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let got: Vec<Value> = r.all().iter().map(Received::json).collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got.iter().map(|g| g["data"]["threshold"].as_u64().unwrap()).collect::<Vec<_>>(), [80, 100]);
    assert!(got.iter().all(|g| g["data"]["feature"] == "ai_chat" && g["data"]["limit"] == 5 && g["data"]["period"] == "month"), "{got:?}");
    assert_eq!(got[0]["data"]["used"], 4);
}

#[tokio::test]
async fn an_ended_grant_is_told_by_the_sweeper_once() {
    let a = app_or_skip!(app_with(fast).await);
    let r = Receiver::start().await;
    register(&a, &r.url, &["entitlements.changed"]).await;
    let until = chrono::Utc::now() + Duration::hours(1);
    let body = json!({"subject": "trial-user", "plan": "pro", "until": until, "reason": "trial"});
    let (s, v) = a.call("POST", "/v1/admin/grants", Some(&token("root-admin")), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    wait_for("the grant's change", async || r.all().len() == 1).await;
    // Two hours later (by the server's clock) the grant has ended: told once, with an id of
    // (user, grant), whichever replica's sweep sees it.
    a.clock.advance(Duration::hours(2));
    wait_for("the grant's end", async || r.all().len() == 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let got: Vec<Value> = r.all().iter().map(Received::json).collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1]["data"]["reason"], "grant_ended", "{got:?}");
    assert_eq!(got[1]["data"]["grant_id"], v["id"], "{got:?}");
    // Sweeping the same span again makes nothing new.
    tally_server::webhooks::outbox::sweep(&a.state).await.unwrap();
    assert_eq!(a.count("webhook_events").await, 2);
}

#[tokio::test]
async fn delivery_throughput_to_a_loopback_receiver() {
    let a = app_or_skip!(app_with(fast).await);
    let r = Receiver::start().await;
    register(&a, &r.url, &["credits.granted"]).await;
    let n: usize = std::env::var("TALLY_WEBHOOK_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    // Every event committed at once (one transaction, test set-up only), so the figure is the
    // delivery rate alone: many users, a few events each.
    let mut client = a.state.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let now = chrono::Utc::now();
    for i in 0..n {
        let user = uuid::Uuid::from_u128((i / 4) as u128 + 1);
        let id = uuid::Uuid::now_v7();
        tally_server::webhooks::outbox::emit(&tx, user, "credits.granted", id, json!({"amount": i}), now).await.unwrap();
    }
    tx.commit().await.unwrap();
    let start = Instant::now();
    wait_for("every delivery", async || r.all().len() >= n).await;
    let secs = start.elapsed().as_secs_f64();
    println!("webhook delivery: {n} events to a loopback receiver in {secs:.2} s = {:.0} events/s (one replica)", n as f64 / secs);
    assert_eq!(r.counts().len(), n, "each event once");
}
