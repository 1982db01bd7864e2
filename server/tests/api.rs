//! Every endpoint's success and error paths through the real router, on a real Postgres.

mod common;

use axum::http::StatusCode;
use base64::Engine;
use chrono::{Duration, Utc};
use common::*;
use serde_json::{Value, json};
use uuid::Uuid;

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[tokio::test]
async fn health_ready_metrics_and_unknown_route() {
    let a = app_or_skip!(app().await);
    assert_eq!(a.call("GET", "/healthz", None, None).await.0, StatusCode::OK);
    assert_eq!(a.call("GET", "/readyz", None, None).await.0, StatusCode::OK);
    let (s, v) = a.call("GET", "/nope", None, None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let t = token("m");
    a.sync(&t, "d", vec![event(Uuid::now_v7(), "ai_chat", 1)]).await;
    let (_, _, _) = a.raw("GET", "/metrics", None, vec![], &[]).await;
    let resp = a.router.clone();
    use tower::ServiceExt;
    let r = resp.oneshot(axum::http::Request::get("/metrics").body(axum::body::Body::empty()).unwrap()).await.unwrap();
    let text = String::from_utf8(axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    assert!(text.contains("tally_http_requests_total"), "{text}");
    assert!(text.contains("tally_events_ingested_total"), "{text}");
    assert!(text.contains("tally_db_pool_size"), "{text}");
}

#[tokio::test]
async fn me_get_patch_and_timezone_validation() {
    let a = app_or_skip!(app().await);
    let t = token_with("alice", json!({"email": "alice@example.com", "name": "Alice"}));
    let (s, me) = a.call("GET", "/v1/me", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (me["external_id"].as_str(), me["timezone"].as_str(), me["display_name"].as_str()),
        (Some("alice"), Some("UTC"), Some("Alice"))
    );
    let (s, me2) = a.call("PATCH", "/v1/me", Some(&t), Some(json!({"timezone": "Europe/Paris", "display_name": "Al"}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!((me2["timezone"].as_str(), me2["display_name"].as_str(), &me2["id"]), (Some("Europe/Paris"), Some("Al"), &me["id"]));
    for bad in [json!({"timezone": "Mars/Base"}), json!({"nickname": "x"}), json!({"display_name": 5})] {
        let (s, v) = a.call("PATCH", "/v1/me", Some(&t), Some(bad.clone())).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad} {v}");
    }
    let (s, v, _) = a.raw("PATCH", "/v1/me", Some(&t), b"{not json".to_vec(), &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_json")));
    let (_, me3) = a.call("GET", "/v1/me", Some(&t), None).await;
    assert_eq!(me3["timezone"], "Europe/Paris", "bad patches changed nothing");
    assert_eq!(a.count("users").await, 1, "concurrent-safe single user");
}

#[tokio::test]
async fn first_requests_race_make_one_user() {
    let a = app_or_skip!(app().await);
    let t = token("racer");
    let futs: Vec<_> = (0..8).map(|_| a.call("GET", "/v1/me", Some(&t), None)).collect();
    let results = futures::future::join_all(futs).await;
    assert!(results.iter().all(|(s, _)| *s == StatusCode::OK));
    let ids: std::collections::HashSet<_> = results.iter().map(|(_, v)| v["id"].to_string()).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(a.count("users").await, 1);
}

#[tokio::test]
async fn admin_user_creations_race_on_one_email_make_one_user() {
    let a = app_or_skip!(app().await);
    let admin = token("root-admin");
    let futs: Vec<_> = (0..8)
        .map(|i| {
            a.call("POST", "/v1/admin/users", Some(&admin), Some(json!({"email": "Race@example.com", "subject": format!("racer-{i}")})))
        })
        .collect();
    let mut statuses: Vec<u16> = futures::future::join_all(futs).await.iter().map(|(s, _)| s.as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [201, 409, 409, 409, 409, 409, 409, 409], "one creation wins, the others conflict");
    assert_eq!(a.scalar("SELECT count(*) FROM users WHERE lower(email) = 'race@example.com'").await, 1);
    // Sign-ins may share an email; creating one more with it is a conflict, never a 5xx.
    for sub in ["shared-1", "shared-2"] {
        let t = token_with(sub, json!({"email": "shared@example.com", "email_verified": true}));
        assert_eq!(a.call("GET", "/v1/me", Some(&t), None).await.0, StatusCode::OK);
    }
    let (s, v) = a.call("POST", "/v1/admin/users", Some(&admin), Some(json!({"email": "shared@example.com", "subject": "third"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("user_exists")), "{v}");
    assert_eq!(a.scalar("SELECT count(*) FROM users WHERE external_id = 'third'").await, 0);
}

#[tokio::test]
async fn sync_accepts_dedups_rejects_and_totals() {
    let a = app_or_skip!(app().await);
    let t = token("bob");
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let evs: Vec<Value> = ids.iter().map(|id| event(*id, "ai_chat", 1)).collect();
    let (s, r) = a.sync(&t, "d1", evs.clone()).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["accepted"].as_array().unwrap().len(), 3);
    assert_eq!(used(&r, "ai_chat"), Some(3));
    assert_eq!(r["limits"], json!({"max_batch_events": 1000, "max_body_bytes": 1048576}));
    assert!(r["entitlements_token"].is_string());
    // Every current window of the plan's counted features is reported.
    let feats: std::collections::BTreeSet<_> =
        r["totals"].as_array().unwrap().iter().map(|t| t["feature"].as_str().unwrap().to_string()).collect();
    assert_eq!(feats, ["ai_chat", "ai_spend", "notes"].iter().map(|s| s.to_string()).collect());
    // Re-send: duplicates, nothing counted twice.
    let (_, r2) = a.sync(&t, "d1", evs.clone()).await;
    assert_eq!(r2["duplicates"].as_array().unwrap().len(), 3);
    assert_eq!(r2["accepted"].as_array().unwrap().len(), 0);
    assert_eq!(used(&r2, "ai_chat"), Some(3));
    // Changed amount under a known id: conflict. Bad events rejected one by one, good ones kept.
    let mut changed = evs[0].clone();
    changed["amount"] = json!(2);
    let good = Uuid::now_v7();
    let batch = vec![
        changed,
        event(good, "ai_chat", 1),
        json!({"id": "not-a-uuid", "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now()}),
        json!({"id": Uuid::now_v7(), "feature": "ai_chat", "amount": -1, "occurred_at": Utc::now()}),
        json!({"id": Uuid::now_v7(), "feature": "ai_chat", "amount": 0, "occurred_at": Utc::now()}),
        json!({"id": Uuid::now_v7(), "feature": "ai_chat", "amount": 18446744073709551615u64, "occurred_at": Utc::now()}),
        json!({"id": Uuid::now_v7(), "feature": "ai_chat", "amount": 1e30, "occurred_at": Utc::now()}),
        json!({"id": Uuid::now_v7(), "feature": "ai_chat", "amount": 1, "occurred_at": "yesterday"}),
        json!({"id": Uuid::now_v7(), "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now(), "metadata": {"x": "y".repeat(5000)}}),
        json!(42),
    ];
    let (s, r3) = a.sync(&t, "d1", batch).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r3["accepted"], json!([good]));
    let reasons: Vec<&str> = r3["rejected"].as_array().unwrap().iter().map(|x| x["reason"].as_str().unwrap()).collect();
    let mut sorted = reasons.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![
            "conflict",
            "invalid_amount",
            "invalid_amount",
            "invalid_amount",
            "invalid_amount",
            "invalid_event",
            "invalid_event",
            "invalid_id",
            "metadata_too_large"
        ]
    );
    assert_eq!(used(&r3, "ai_chat"), Some(4));
    assert_eq!(a.count("events").await, 4);
    // Devices overshooting a hard limit offline: the server reports the overage.
    let more: Vec<Value> = (0..3).map(|_| event(Uuid::now_v7(), "ai_chat", 1)).collect();
    let (_, r4) = a.sync(&t, "d2", more).await;
    let tot = r4["totals"].as_array().unwrap().iter().find(|t| t["feature"] == "ai_chat").unwrap().clone();
    assert_eq!(
        (tot["used"].as_u64(), tot["limit"].as_u64(), tot["remaining"].as_u64(), tot["over_limit_by"].as_u64()),
        (Some(7), Some(5), Some(0), Some(2))
    );
}

#[tokio::test]
async fn sync_limits_protocol_and_malformed_bodies() {
    let a = app_or_skip!(
        app_with(|c| {
            c.max_batch_events = 5;
            c.max_body_bytes = 4096;
        })
        .await
    );
    let t = token("carol");
    let six: Vec<Value> = (0..6).map(|_| event(Uuid::now_v7(), "ai_chat", 1)).collect();
    let (s, v) = a.sync(&t, "d", six).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")));
    let big = json!({"protocol": 1, "device_id": "d", "events": [], "pad": "x".repeat(5000)});
    let (s, _) = a.call("POST", "/v1/sync", Some(&t), Some(big)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, v) = a.call("POST", "/v1/sync", Some(&t), Some(json!({"protocol": 0, "device_id": "d"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UPGRADE_REQUIRED, Some("upgrade_required")));
    let (s, _, _) = a.raw("POST", "/v1/sync", Some(&t), b"{\"protocol\": 1,".to_vec(), &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = a.call("POST", "/v1/sync", Some(&t), Some(json!({"protocol": 1}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "device_id is required");
    // A refused profile field comes back alone; the sync itself succeeds.
    let (s, v) =
        a.call("POST", "/v1/sync", Some(&t), Some(json!({"protocol": 1, "device_id": "d", "profile": {"timezone": "Nowhere/Land"}}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["profile_rejected"], json!([{"field": "timezone", "reason": "invalid_timezone"}]));
    // Unknown fields are ignored.
    let (s, _) = a.call("POST", "/v1/sync", Some(&t), Some(json!({"protocol": 1, "device_id": "d", "future_field": {"a": 1}}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(a.count("events").await, 0);
    let (_, me) = a.call("GET", "/v1/me", Some(&t), None).await;
    assert_eq!(me["timezone"], "UTC");
}

#[tokio::test]
async fn a_timezone_change_keeps_the_window_in_force_and_future_events_clamp() {
    let a = app_or_skip!(app().await);
    let t = token("tz");
    let now = Utc::now();
    // An event stamped a day ahead counts at received + 5 min, in the current window.
    let future = json!({"id": Uuid::now_v7(), "feature": "ai_spend", "amount": 1, "occurred_at": (now + Duration::days(1)).to_rfc3339(),
                        "model": "gpt-4o", "input_tokens": 1000, "output_tokens": 1000});
    let (_, r) = a.sync(&t, "d", vec![future]).await;
    assert_eq!(used(&r, "ai_spend"), Some(12_500), "cost recomputed from the catalog: 2.5 + 10 micros per token");
    assert_eq!(a.scalar("SELECT count(*) FROM events WHERE clamped").await, 1);
    let (_, r) = a
        .call("POST", "/v1/sync", Some(&t), Some(json!({"protocol": 1, "device_id": "d", "profile": {"timezone": "Pacific/Kiritimati"}})))
        .await;
    assert_eq!(r["profile_rejected"], json!([]), "{r}");
    let (_, me) = a.call("GET", "/v1/me", Some(&t), None).await;
    assert_eq!(me["timezone"], "Pacific/Kiritimati", "a protocol-1 device holds no lease: in force at once");
    let day = r["totals"].as_array().unwrap().iter().find(|x| x["feature"] == "ai_spend" && x["period"] == "day").unwrap().clone();
    let start = chrono::DateTime::parse_from_rfc3339(day["period_start"].as_str().unwrap()).unwrap();
    assert_eq!(start.format("%H:%M").to_string(), "00:00", "the UTC day in force keeps its bounds: {day}");
    assert_eq!(used(&r, "ai_spend"), Some(12_500), "and its use");
}

#[tokio::test]
async fn settings_merge_by_hlc_and_far_future_does_not_win_forever() {
    let a = app_or_skip!(app().await);
    let t = token("set");
    let now_ms = Utc::now().timestamp_millis();
    let hlc = |ms: i64, node: &str| format!("{ms:015}-00000-{node}");
    let send =
        |changes: Value, cursor: Option<&str>| json!({"protocol": 1, "device_id": "d1", "cursor": cursor, "settings_changes": changes});
    let (_, r) =
        a.call("POST", "/v1/sync", Some(&t), Some(send(json!([{"key": "lang", "value": "fr", "hlc": hlc(now_ms, "d1")}]), None))).await;
    let cursor = r["cursor"].as_str().unwrap().to_string();
    // An older write loses.
    let (_, r) = a
        .call(
            "POST",
            "/v1/sync",
            Some(&t),
            Some(send(json!([{"key": "lang", "value": "de", "hlc": hlc(now_ms - 1000, "d2")}]), Some(&cursor))),
        )
        .await;
    let (_, s) = a.call("GET", "/v1/settings", Some(&t), None).await;
    assert_eq!(s["settings"]["lang"], "fr", "{r}");
    // A write a year ahead is re-stamped to the server's time: a later normal write still wins.
    let far = now_ms + 365 * 86_400_000;
    a.call("POST", "/v1/sync", Some(&t), Some(send(json!([{"key": "lang", "value": "xx", "hlc": hlc(far, "evil")}]), None))).await;
    let (_, s) = a.call("GET", "/v1/settings", Some(&t), None).await;
    assert_eq!(s["settings"]["lang"], "xx");
    let later = Utc::now().timestamp_millis() + 1000;
    a.call("POST", "/v1/sync", Some(&t), Some(send(json!([{"key": "lang", "value": "en", "hlc": hlc(later, "d1")}]), None))).await;
    let (_, s) = a.call("GET", "/v1/settings", Some(&t), None).await;
    assert_eq!(s["settings"]["lang"], "en");
    // Tombstones; changes since a cursor; web PATCH/PUT.
    let (_, r) = a
        .call(
            "POST",
            "/v1/sync",
            Some(&t),
            Some(send(json!([{"key": "lang", "deleted": true, "hlc": hlc(later + 1, "d1")}]), Some(&cursor))),
        )
        .await;
    let ch = r["settings_changes"].as_array().unwrap();
    assert!(ch.iter().any(|c| c["key"] == "lang" && c["deleted"] == true), "{r}");
    let (s, v) = a.call("PATCH", "/v1/settings", Some(&t), Some(json!({"theme": "dark", "size": 3}))).await;
    assert_eq!((s, &v["settings"]), (StatusCode::OK, &json!({"theme": "dark", "size": 3})));
    let (_, v) = a.call("PATCH", "/v1/settings", Some(&t), Some(json!({"size": null}))).await;
    assert_eq!(v["settings"], json!({"theme": "dark"}));
    let (_, v) = a.call("PUT", "/v1/settings", Some(&t), Some(json!({"font": "mono"}))).await;
    assert_eq!(v["settings"], json!({"font": "mono"}));
    let (_, r) = a.call("POST", "/v1/sync", Some(&t), Some(send(json!([]), Some(&cursor)))).await;
    assert!(
        r["settings_changes"].as_array().unwrap().iter().any(|c| c["key"] == "font" && c["hlc"].as_str().unwrap().ends_with("-server"))
    );
    let (s, v) = a.call("POST", "/v1/sync", Some(&t), Some(send(json!([{"key": "k", "value": 1, "hlc": "garbage"}]), None))).await;
    assert_eq!((s, &v["settings_rejected"]), (StatusCode::OK, &json!([{"key": "k", "reason": "invalid_setting"}])));
    let (s, _) = a.call("PUT", "/v1/settings", Some(&t), Some(json!([1, 2]))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn entitlements_token_verifies_against_published_keys() {
    let a = app_or_skip!(app().await);
    let t = token("ent");
    let (s, e) = a.call("GET", "/v1/entitlements", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!((e["plan"].as_str(), e["access_reason"].as_str(), e["status"].as_str()), (Some("free"), Some("free"), Some("none")));
    for k in ["period_start", "period_end", "granted_until", "is_admin", "credit_balance", "features", "ver", "token"] {
        assert!(e.get(k).is_some(), "missing {k}");
    }
    let (_, jwks) = a.call("GET", "/v1/keys", None, None).await;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let header = jsonwebtoken::decode_header(e["token"].as_str().unwrap()).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    let jwk = set.find(header.kid.as_deref().unwrap()).expect("kid published");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["tally"]);
    v.set_issuer(&["tally"]);
    let claims: tally_core::EntitlementClaims =
        jsonwebtoken::decode(e["token"].as_str().unwrap(), &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(), &v).unwrap().claims;
    assert_eq!((claims.sub.as_str(), claims.entitlements.tz.as_deref()), ("ent", Some("UTC")));
    assert_eq!(claims.entitlements.free_features.len(), 6);
    assert!(claims.entitlements.models.contains_key("gpt-4o"));
    // Cached per version: the same token until something changes.
    let (_, e2) = a.call("GET", "/v1/entitlements", Some(&t), None).await;
    assert_eq!(e2["token"], e["token"]);
    // An admin grant bumps the version and changes the plan.
    let admin = token("root-admin");
    let until = (Utc::now() + Duration::days(7)).to_rfc3339();
    let (s, g) = a
        .call(
            "POST",
            "/v1/admin/grants",
            Some(&admin),
            Some(json!({"subject": "ent", "plan": "pro", "until": until, "granted_by": "ops", "reason": "beta"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{g}");
    let (_, e3) = a.call("GET", "/v1/entitlements", Some(&t), None).await;
    assert_eq!((e3["plan"].as_str(), e3["access_reason"].as_str()), (Some("pro"), Some("granted:beta")));
    assert!(e3["ver"].as_u64() > e["ver"].as_u64());
    assert_ne!(e3["token"], e["token"]);
    let (s, _) = a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "ent", "plan": "gold", "reason": "x"}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = a.call("POST", "/v1/admin/grants/revoke", Some(&admin), Some(json!({"subject": "ent"}))).await;
    assert_eq!(s, StatusCode::OK);
    let (_, e4) = a.call("GET", "/v1/entitlements", Some(&t), None).await;
    assert_eq!(e4["plan"], "free");
    assert!(e4["ver"].as_u64() > e3["ver"].as_u64());
}

#[tokio::test]
async fn check_usage_and_reports() {
    let a = app_or_skip!(app().await);
    let t = token("dave");
    let (s, d) = a.call("POST", "/v1/check", Some(&t), Some(json!({"feature": "ai_chat", "amount": 5}))).await;
    assert_eq!((s, d["allowed"].as_bool(), d["remaining"].as_u64()), (StatusCode::OK, Some(true), Some(5)));
    let (_, d) = a.call("POST", "/v1/check", Some(&t), Some(json!({"feature": "ai_chat", "amount": 6}))).await;
    assert_eq!((d["allowed"].as_bool(), d["reason"].as_str()), (Some(false), Some("limit_reached")));
    for (f, reason) in [("export", "not_in_plan"), ("nope", "unknown_feature"), ("images", "insufficient_credits")] {
        let (_, d) = a.call("POST", "/v1/check", Some(&t), Some(json!({"feature": f}))).await;
        assert_eq!(d["reason"], reason, "{f}");
    }
    let (s, _) = a.call("POST", "/v1/check", Some(&t), Some(json!({"feature": "ai_chat", "amount": -1}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    // POST /v1/usage with an Idempotency-Key, twice.
    let body =
        serde_json::to_vec(&json!({"feature": "ai_chat", "amount": 2, "occurred_at": Utc::now(), "model": "gpt-4o", "input_tokens": 10}))
            .unwrap();
    let (s, r, _) = a.raw("POST", "/v1/usage", Some(&t), body.clone(), &[("idempotency-key", "order-42")]).await;
    assert_eq!((s, r["duplicate"].as_bool()), (StatusCode::CREATED, Some(false)), "{r}");
    assert_eq!(r["id"].as_str().unwrap(), tally_core::ledger::event_id_for_key("order-42").to_string());
    let (s, r2, _) = a.raw("POST", "/v1/usage", Some(&t), body, &[("idempotency-key", "order-42")]).await;
    assert_eq!((s, r2["duplicate"].as_bool()), (StatusCode::OK, Some(true)));
    assert_eq!(used(&r2, "ai_chat"), Some(2));
    let changed = serde_json::to_vec(&json!({"feature": "ai_chat", "amount": 3, "occurred_at": Utc::now()})).unwrap();
    let (s, _, _) = a.raw("POST", "/v1/usage", Some(&t), changed, &[("idempotency-key", "order-42")]).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, v) = a.call("POST", "/v1/usage", Some(&t), Some(json!({"feature": "ai_chat", "amount": 1, "occurred_at": Utc::now()}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("missing_id")));
    let (s, _) = a
        .call(
            "POST",
            "/v1/usage",
            Some(&t),
            Some(json!({"id": Uuid::now_v7(), "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now(), "subject": "someone-else"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    for g in ["day", "feature", "model"] {
        let (s, rep) = a.call("GET", &format!("/v1/usage?group_by={g}"), Some(&t), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(rep["rows"].as_array().unwrap().len(), 1, "{g}: {rep}");
    }
    let (_, rep) = a.call("GET", "/v1/usage?group_by=model", Some(&t), None).await;
    assert_eq!((rep["rows"][0]["input_tokens"].as_i64(), rep["rows"][0]["cost_micros"].as_i64()), (Some(10), Some(25)));
    assert_eq!(a.call("GET", "/v1/usage?group_by=week", Some(&t), None).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.call("GET", "/v1/usage?from=yesterday", Some(&t), None).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.count("events").await, 1);
}

/// Every admin route of the API description (so a route added later is covered too) answers a
/// signed-in user who is not an admin 403 `forbidden`, a key without the `admin` scope 403
/// `insufficient_scope` and no credential 401, and changes nothing.
#[tokio::test]
async fn every_admin_route_refuses_non_admins_with_403_and_changes_nothing() {
    let a = app_or_skip!(app().await);
    let admin = token("root-admin");
    let user = token("plain-user");
    let (_, me) = a.call("GET", "/v1/me", Some(&user), None).await;
    let user_id = me["id"].as_str().unwrap().to_string();
    let (s, k) =
        a.call("POST", "/v1/admin/api-keys", Some(&admin), Some(json!({"name": "w", "scopes": ["usage:write", "usage:read"]}))).await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    let key = k["secret"].as_str().unwrap().to_string();
    let key_id = k["key"]["id"].as_str().unwrap().to_string();
    let snapshot = || async {
        let mut counts = Vec::new();
        for table in ["users", "api_keys", "access_grants", "credit_grants", "webhook_endpoints", "webhook_deliveries", "catalog"] {
            counts.push(a.count(table).await);
        }
        counts.push(a.scalar("SELECT count(*) FROM users WHERE disabled_at IS NOT NULL").await);
        counts.push(a.scalar("SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL").await);
        counts
    };
    let before = snapshot().await;
    let doc: Value = serde_json::from_str(&tally_server::openapi::json()).unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/admin/") {
            continue;
        }
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            // Real ids, so a route that failed to refuse would act on something.
            let id = if path.contains("/api-keys/") { &key_id } else { &user_id };
            let uri = path.replace("{id}", id);
            let method = method.to_uppercase();
            let body = (method != "GET" && method != "DELETE").then(|| json!({}));
            let (s, v) = a.call(&method, &uri, Some(&user), body.clone()).await;
            assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{method} {uri} as a user: {v}");
            let (s, v) = a.call(&method, &uri, Some(&key), body.clone()).await;
            assert_eq!(
                (s, v["error"]["code"].as_str()),
                (StatusCode::FORBIDDEN, Some("insufficient_scope")),
                "{method} {uri} with a usage key: {v}"
            );
            let (s, v) = a.call(&method, &uri, None, body).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {uri} without a credential: {v}");
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} admin operations found in the API description");
    assert_eq!(snapshot().await, before, "a refused call changed something");
    // The same routes still serve an admin.
    let (s, v) = a.call("GET", "/v1/admin/plans", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn an_admin_grant_may_come_before_the_first_sign_in_and_a_revoke_of_an_unknown_subject_is_404() {
    let a = app_or_skip!(app().await);
    let admin = token("root-admin");
    let (s, g) =
        a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "early-bird", "plan": "pro", "reason": "beta"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{g}");
    assert_eq!(a.scalar("SELECT count(*) FROM users WHERE external_id = 'early-bird'").await, 1);
    let (s, e) = a.call("GET", "/v1/entitlements", Some(&token("early-bird")), None).await;
    assert_eq!((s, e["plan"].as_str()), (StatusCode::OK, Some("pro")), "the first sign-in finds the grant: {e}");
    let (s, v) = a.call("POST", "/v1/admin/grants/revoke", Some(&admin), Some(json!({"subject": "never-seen"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{v}");
    assert_eq!(a.scalar("SELECT count(*) FROM users WHERE external_id = 'never-seen'").await, 0);
}

#[tokio::test]
async fn api_keys_admin_and_pending_users() {
    let a = app_or_skip!(app().await);
    let user = token("erin");
    let admin = token("root-admin");
    // Non-admins are refused.
    let (s, v) = a.call("POST", "/v1/admin/api-keys", Some(&user), Some(json!({"name": "x", "scopes": ["admin"]}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")));
    let (s, k) = a.call("POST", "/v1/admin/api-keys", Some(&admin), Some(json!({"name": "backend", "scopes": ["usage:write"]}))).await;
    assert_eq!(s, StatusCode::CREATED);
    let secret = k["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("tk_"));
    let (s, _) = a.call("POST", "/v1/admin/api-keys", Some(&admin), Some(json!({"name": "bad", "scopes": ["root"]}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let frank = json!({"id": Uuid::now_v7(), "subject": "frank", "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now()});
    let (s, r) = a.call("POST", "/v1/usage", Some(&secret), Some(frank.clone())).await;
    assert_eq!((s, r["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_subject")), "an unknown subject is not created");
    assert_eq!(a.scalar("SELECT count(*) FROM users WHERE external_id = 'frank'").await, 0);
    let (s, u) = a.call("POST", "/v1/admin/users", Some(&admin), Some(json!({"subject": "frank"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    let (s, r) = a.call("POST", "/v1/usage", Some(&secret), Some(frank)).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let by_id = json!({"id": Uuid::now_v7(), "user_id": u["id"], "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now()});
    let (s, r) = a.call("POST", "/v1/usage", Some(&secret), Some(by_id)).await;
    assert_eq!(s, StatusCode::CREATED, "an API key may name user_id: {r}");
    assert_eq!(a.call("GET", "/v1/me", Some(&secret), None).await.0, StatusCode::UNAUTHORIZED, "keys are not users");
    let (s, v) = a.call("POST", "/v1/admin/users", Some(&secret), Some(json!({"email": "a@b.c"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("insufficient_scope")), "usage key is not admin");
    let (_, list) = a.call("GET", "/v1/admin/api-keys", Some(&admin), None).await;
    assert!(list.to_string().find("tk_").is_none(), "secrets never listed");
    let id = k["key"]["id"].as_str().unwrap();
    assert_eq!(a.call("DELETE", &format!("/v1/admin/api-keys/{id}"), Some(&admin), None).await.0, StatusCode::NO_CONTENT);
    let (s, v) = a
        .call(
            "POST",
            "/v1/usage",
            Some(&secret),
            Some(json!({"id": Uuid::now_v7(), "subject": "frank", "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now()})),
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("api_key_revoked")));
    assert_eq!(a.call("GET", "/v1/me", Some("tk_nope"), None).await.0, StatusCode::UNAUTHORIZED);
    // Pending user claimed by a verified sign-in with the same email.
    let (s, p) =
        a.call("POST", "/v1/admin/users", Some(&admin), Some(json!({"email": "Gina@Example.com", "timezone": "Asia/Tokyo"}))).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(a.call("POST", "/v1/admin/users", Some(&admin), Some(json!({"email": "gina@example.com"}))).await.0, StatusCode::CONFLICT);
    assert_eq!(a.call("POST", "/v1/admin/users", Some(&admin), Some(json!({"email": "nope"}))).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    let unverified = token_with("gina-unverified", json!({"email": "gina@example.com", "email_verified": false}));
    let (_, u) = a.call("GET", "/v1/me", Some(&unverified), None).await;
    assert_ne!(u["id"], p["id"], "an unverified email claims nothing");
    let gina = token_with("gina", json!({"email": "gina@example.com", "email_verified": true}));
    let (_, g) = a.call("GET", "/v1/me", Some(&gina), None).await;
    assert_eq!((&g["id"], g["timezone"].as_str()), (&p["id"], Some("Asia/Tokyo")));
    // Plans: validated with paths; admin usage report by user id.
    let (s, v) = a
        .call(
            "PUT",
            "/v1/admin/plans/team",
            Some(&admin),
            Some(json!({"features": {"api": {"type": "rate", "limit": -1, "window_secs": 60}}})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(v["error"]["message"].as_str().unwrap().contains("$.features.api.limit"), "{v}");
    let (s, _) = a
        .call(
            "PUT",
            "/v1/admin/plans/team",
            Some(&admin),
            Some(json!({"features": {"ai_chat": {"type": "metered", "limit": 1000, "period": "day"}}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, plans) = a.call("GET", "/v1/admin/plans", Some(&admin), None).await;
    assert!(plans["catalog"]["plans"].as_array().unwrap().iter().any(|p| p["id"] == "team"));
    let (_, me) = a.call("GET", "/v1/me", Some(&token("frank")), None).await;
    let (s, rep) = a.call("GET", &format!("/v1/admin/users/{}/usage", me["id"].as_str().unwrap()), Some(&admin), None).await;
    assert_eq!((s, rep["rows"][0]["amount"].as_i64()), (StatusCode::OK, Some(2)), "the use by subject and the one by user_id");
    assert_eq!(a.call("GET", "/v1/admin/users/not-a-uuid/usage", Some(&admin), None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(a.call("GET", &format!("/v1/admin/users/{}/usage", Uuid::now_v7()), Some(&admin), None).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn isolation_between_users() {
    let a = app_or_skip!(app().await);
    let (ta, tb) = (token("user-a"), token("user-b"));
    let shared = Uuid::now_v7();
    let b_event = event(shared, "ai_chat", 2);
    let (_, rb) = a.sync(&tb, "b1", vec![b_event.clone()]).await;
    a.call("PATCH", "/v1/settings", Some(&tb), Some(json!({"secret": "b"}))).await;
    let (_, b_me) = a.call("GET", "/v1/me", Some(&tb), None).await;
    let before = a.scalar("SELECT coalesce(sum(amount), 0)::bigint FROM events").await;
    // A uses B's event id: it is A's own event; B's row is untouched and nothing leaks.
    let (_, ra) = a.sync(&ta, "a1", vec![event(shared, "ai_chat", 5)]).await;
    assert_eq!(ra["accepted"], json!([shared]));
    assert_eq!(used(&ra, "ai_chat"), Some(5));
    assert_eq!(a.scalar("SELECT count(*) FROM events").await, 2);
    assert_eq!(before + 5, a.scalar("SELECT coalesce(sum(amount), 0)::bigint FROM events").await);
    // A cannot read B's data by any route: foreign ids are "not found"; the admin routes refuse
    // A whatever the id names (403, which tells nothing of B).
    assert_eq!(
        a.call("GET", &format!("/v1/admin/users/{}/usage", b_me["id"].as_str().unwrap()), Some(&ta), None).await.0,
        StatusCode::FORBIDDEN
    );
    let (s, _) = a
        .call(
            "POST",
            "/v1/usage",
            Some(&ta),
            Some(json!({"id": Uuid::now_v7(), "subject": "user-b", "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now()})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, sa) = a.call("GET", "/v1/settings", Some(&ta), None).await;
    assert_eq!(sa["settings"], json!({}));
    let (_, ea) = a.call("GET", "/v1/me/export", Some(&ta), None).await;
    assert_eq!(ea["events"].as_array().unwrap().len(), 1);
    assert_eq!(ea["events"][0]["amount"], 5);
    assert!(!ea.to_string().contains("\"secret\""));
    // A deletes their account: B is unchanged.
    assert_eq!(a.call("DELETE", "/v1/me", Some(&ta), None).await.0, StatusCode::NO_CONTENT);
    let (_, rb2) = a.sync(&tb, "b1", vec![b_event]).await;
    assert_eq!(rb2["duplicates"], json!([shared]));
    assert_eq!(used(&rb2, "ai_chat"), used(&rb, "ai_chat"));
    let (_, sb) = a.call("GET", "/v1/settings", Some(&tb), None).await;
    assert_eq!(sb["settings"], json!({"secret": "b"}));
}

#[tokio::test]
async fn deleted_account_gets_410_everywhere() {
    let a = app_or_skip!(app().await);
    let old = token("gone");
    a.sync(&old, "d", vec![event(Uuid::now_v7(), "ai_chat", 1)]).await;
    a.call("PATCH", "/v1/settings", Some(&old), Some(json!({"k": 1}))).await;
    assert_eq!(a.call("DELETE", "/v1/me", Some(&old), None).await.0, StatusCode::NO_CONTENT);
    for table in ["events", "counters", "settings", "users"] {
        assert_eq!(a.count(table).await, 0, "{table}");
    }
    let routes: [(&str, &str, Option<Value>); 10] = [
        ("GET", "/v1/me", None),
        ("PATCH", "/v1/me", Some(json!({"display_name": "x"}))),
        ("DELETE", "/v1/me", None),
        ("GET", "/v1/me/export", None),
        ("POST", "/v1/sync", Some(json!({"protocol": 1, "device_id": "d", "events": [event(Uuid::now_v7(), "ai_chat", 1)]}))),
        ("GET", "/v1/settings", None),
        ("PATCH", "/v1/settings", Some(json!({"k": 2}))),
        ("GET", "/v1/entitlements", None),
        ("POST", "/v1/check", Some(json!({"feature": "ai_chat"}))),
        ("GET", "/v1/usage", None),
    ];
    for (m, p, b) in routes {
        let (s, v) = a.call(m, p, Some(&old), b).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::GONE, Some("account_deleted")), "{m} {p}");
    }
    assert_eq!(a.count("users").await, 0, "old tokens cannot resurrect the account");
    // A token issued after the deletion starts a new, empty account.
    let fresh = token_with("gone", json!({"iat": Utc::now().timestamp() + 2}));
    let (s, r) = a.sync(&fresh, "d", vec![]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(used(&r, "ai_chat"), Some(0));
}

fn raw_token(header: Value, claims: Value, sig: &str) -> String {
    format!("{}.{}.{}", b64(&header), b64(&claims), sig)
}

#[tokio::test]
async fn jwt_failure_modes_are_401_with_clear_codes() {
    let a = app_or_skip!(
        app_with(|c| {
            c.jwt_issuer = Some("https://idp.test".into());
            c.jwt_audience = Some("tally-app".into());
        })
        .await
    );
    let now = Utc::now().timestamp();
    let good = json!({"sub": "jw", "iat": now, "exp": now + 600, "iss": "https://idp.test", "aud": "tally-app"});
    let sign = |c: &Value, key: &[u8]| {
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), c, &jsonwebtoken::EncodingKey::from_secret(key)).unwrap()
    };
    assert_eq!(a.call("GET", "/v1/me", Some(&sign(&good, SECRET.as_bytes())), None).await.0, StatusCode::OK);
    let mut cases: Vec<(String, &str)> = vec![
        (raw_token(json!({"alg": "none", "typ": "JWT"}), good.clone(), ""), "unsupported_algorithm"),
        (raw_token(json!({"alg": "None"}), good.clone(), "x"), "unsupported_algorithm"),
        (sign(&good, b"another-secret"), "invalid_signature"),
        ("not.a.jwt".into(), "invalid_token"),
        ("garbage".into(), "invalid_token"),
        (
            sign(&json!({"sub": "jw", "iat": now, "exp": now + 600, "iss": "https://evil.test", "aud": "tally-app"}), SECRET.as_bytes()),
            "invalid_issuer",
        ),
        (
            sign(&json!({"sub": "jw", "iat": now, "exp": now + 600, "iss": "https://idp.test", "aud": "other"}), SECRET.as_bytes()),
            "invalid_audience",
        ),
        (
            sign(
                &json!({"sub": "jw", "iat": now - 7200, "exp": now - 3600, "iss": "https://idp.test", "aud": "tally-app"}),
                SECRET.as_bytes(),
            ),
            "token_expired",
        ),
        (
            sign(
                &json!({"sub": "jw", "iat": now, "nbf": now + 3600, "exp": now + 7200, "iss": "https://idp.test", "aud": "tally-app"}),
                SECRET.as_bytes(),
            ),
            "token_not_yet_valid",
        ),
        (sign(&json!({"sub": "jw", "iat": now, "iss": "https://idp.test", "aud": "tally-app"}), SECRET.as_bytes()), "invalid_token"),
    ];
    // RS256/EdDSA tokens without a configured JWKS: refused, not tried against the secret.
    let ed = jsonwebtoken::EncodingKey::from_ed_pem(
        ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_pem(&ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]), Default::default())
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    cases.push((
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA), &good, &ed).unwrap(),
        "unsupported_algorithm",
    ));
    for (t, code) in cases {
        let (s, v) = a.call("GET", "/v1/me", Some(&t), None).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some(code)), "{t}");
    }
    let (s, v) = a.call("GET", "/v1/me", None, None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("missing_token")));
    assert_eq!(a.count("users").await, 1);
}

#[tokio::test]
async fn jwks_tokens_and_algorithm_confusion() {
    // An identity provider publishing an Ed25519 key.
    let sk = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes());
    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "idp-1", "alg": "EdDSA", "use": "sig"}]});
    let pub_pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", x);
    let idp = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let j = jwks.clone();
            async move { axum::Json(j) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, idp).await });
    let a = app_or_skip!(
        app_with(|c| {
            c.jwt_secret = None;
            c.jwks_url = Some(format!("http://{addr}/jwks"));
        })
        .await
    );
    let now = Utc::now().timestamp();
    let claims = json!({"sub": "jk", "iat": now, "exp": now + 600});
    let enc = jsonwebtoken::EncodingKey::from_ed_pem(
        ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_pem(&sk, Default::default()).unwrap().as_bytes(),
    )
    .unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    h.kid = Some("idp-1".into());
    let good = jsonwebtoken::encode(&h, &claims, &enc).unwrap();
    assert_eq!(a.call("GET", "/v1/me", Some(&good), None).await.0, StatusCode::OK);
    // HS256 signed with the public key (as bytes, as PEM): algorithm confusion refused.
    for key in [sk.verifying_key().as_bytes().to_vec(), pub_pem.into_bytes(), x.clone().into_bytes()] {
        let t = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(&key)).unwrap();
        let (s, v) = a.call("GET", "/v1/me", Some(&t), None).await;
        assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unsupported_algorithm")));
    }
    // Unknown kid, foreign key.
    let other = ed25519_dalek::SigningKey::from_bytes(&[10u8; 32]);
    let enc2 = jsonwebtoken::EncodingKey::from_ed_pem(
        ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_pem(&other, Default::default()).unwrap().as_bytes(),
    )
    .unwrap();
    let mut h2 = h.clone();
    h2.kid = Some("idp-2".into());
    let (s, v) = a.call("GET", "/v1/me", Some(&jsonwebtoken::encode(&h2, &claims, &enc2).unwrap()), None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unknown_key")));
    let (s, v) = a.call("GET", "/v1/me", Some(&jsonwebtoken::encode(&h, &claims, &enc2).unwrap()), None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_signature")));
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let a = app_or_skip!(
        app_with(|c| {
            c.rate_limit_per_sec = 1;
            c.rate_limit_burst = 3;
        })
        .await
    );
    let t = token("speedy");
    let mut last = None;
    for _ in 0..6 {
        let (s, v, h) = a.raw("GET", "/v1/me", Some(&t), vec![], &[]).await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            last = Some((v, h));
            break;
        }
    }
    let (v, h) = last.expect("rate limited");
    assert_eq!(v["error"]["code"], "rate_limited");
    assert!(h.get("retry-after").and_then(|r| r.to_str().ok()).and_then(|r| r.parse::<u64>().ok()).is_some_and(|s| s >= 1));
    // Another user is not affected.
    assert_eq!(a.call("GET", "/v1/me", Some(&token("calm")), None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn every_error_has_the_json_body_and_names_the_field() {
    let a = app_or_skip!(app().await);
    let t = token("errs");
    let admin = token("root-admin");
    let check = |s: StatusCode, v: &Value, status: StatusCode, code: &str| {
        assert_eq!((s, v["error"]["code"].as_str()), (status, Some(code)), "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    };
    // The router's own answers: unknown route, wrong method (with Allow), bad path parameter.
    let (s, v, h) = a.raw("DELETE", "/v1/sync", Some(&t), vec![], &[]).await;
    check(s, &v, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert!(h.get("allow").is_some_and(|v| v.to_str().unwrap().contains("POST")), "{h:?}");
    let (s, v) = a.call("PUT", "/healthz", None, None).await;
    check(s, &v, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let (s, v) = a.call("GET", "/v1/nope/deeper", Some(&t), None).await;
    check(s, &v, StatusCode::NOT_FOUND, "not_found");
    let (s, v) = a.call("PUT", "/v1/admin/plans/%FF%FE", Some(&admin), Some(json!({"features": {}}))).await;
    check(s, &v, StatusCode::BAD_REQUEST, "bad_request");
    // Body shape errors name the field, in plain words.
    let cases = [
        ("POST", "/v1/check", json!({"amount": 1}), "feature is missing"),
        ("POST", "/v1/check", json!({"feature": "ai_chat", "amount": -1}), "amount must be a non-negative integer"),
        ("POST", "/v1/check", json!({"feature": 5}), "feature must be a string"),
        ("PATCH", "/v1/me", json!({"nickname": "x"}), "nickname is not a known field"),
        ("POST", "/v1/sync", json!({"protocol": 1}), "device_id is missing"),
        ("POST", "/v1/sync", json!({"protocol": 1, "device_id": "d", "events": 5}), "events must be"),
        ("POST", "/v1/sync", json!({"protocol": "one", "device_id": "d"}), "protocol must be a non-negative integer"),
    ];
    for (m, p, body, want) in cases {
        let (s, v) = a.call(m, p, Some(&t), Some(body.clone())).await;
        check(s, &v, StatusCode::UNPROCESSABLE_ENTITY, v["error"]["code"].as_str().unwrap_or("?"));
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(want), "{m} {p} {body}: {msg:?} should start with {want:?}");
        assert!(!msg.contains("line 1 column") && !msg.contains("invalid type:") && !msg.contains('`'), "no raw serde text: {msg:?}");
    }
    // Query parameters too.
    let (s, v) = a.call("GET", "/v1/usage?from=a&from=b", Some(&t), None).await;
    check(s, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_query");
    assert_eq!(v["error"]["message"], "from is given twice");
    let (s, v) = a.call("GET", "/v1/usage?from=yesterday", Some(&t), None).await;
    check(s, &v, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert!(v["error"]["message"].as_str().unwrap().starts_with("from "), "{v}");
    // Malformed JSON: where, not serde's words.
    let (s, v, _) = a.raw("POST", "/v1/check", Some(&t), b"{\"feature\": ".to_vec(), &[]).await;
    check(s, &v, StatusCode::BAD_REQUEST, "malformed_json");
    // Nothing was changed by any of it.
    assert_eq!(a.count("events").await, 0);
}

#[tokio::test]
async fn usage_write_keys_record_only_and_reading_usage_needs_usage_read() {
    let a = app_or_skip!(app().await);
    let admin = token("root-admin");
    let key = |scopes: Value| {
        let a = &a;
        let admin = admin.clone();
        async move {
            let (s, k) = a.call("POST", "/v1/admin/api-keys", Some(&admin), Some(json!({"name": "k", "scopes": scopes}))).await;
            assert_eq!(s, StatusCode::CREATED, "{k}");
            k["secret"].as_str().unwrap().to_string()
        }
    };
    let (writer, reader, both) =
        (key(json!(["usage:write"])).await, key(json!(["usage:read"])).await, key(json!(["usage:write", "usage:read"])).await);
    assert_eq!(a.call("GET", "/v1/me", Some(&token("subj")), None).await.0, StatusCode::OK);
    let rec = json!({"id": Uuid::now_v7(), "subject": "subj", "feature": "ai_chat", "amount": 2, "occurred_at": Utc::now()});
    let (s, v) = a.call("POST", "/v1/usage", Some(&writer), Some(rec.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = a.call("GET", "/v1/usage?subject=subj", Some(&writer), None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "a write key cannot read: {v}");
    for k in [&reader, &both] {
        let (s, v) = a.call("GET", "/v1/usage?subject=subj", Some(k), None).await;
        assert_eq!((s, v["rows"][0]["amount"].as_i64()), (StatusCode::OK, Some(2)), "{v}");
    }
    let rec2 = json!({"id": Uuid::now_v7(), "subject": "subj", "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now()});
    assert_eq!(a.call("POST", "/v1/usage", Some(&reader), Some(rec2)).await.0, StatusCode::NOT_FOUND, "a read key cannot record");
    assert_eq!(a.scalar("SELECT coalesce(sum(amount), 0)::bigint FROM events").await, 2);
    let (s, _) = a.call("POST", "/v1/admin/api-keys", Some(&admin), Some(json!({"name": "k", "scopes": ["usage:rw"]}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn one_callers_turns_are_bounded_and_overflow_is_503_never_429() {
    use tally_server::concurrency::UserLimits;
    let limits = UserLimits::new(2, 1, Some(std::time::Duration::from_millis(300)));
    let t1 = limits.acquire("s:hog").await.unwrap();
    let _t2 = limits.acquire("s:hog").await.unwrap();
    // The third waits in the queue; the fourth finds the queue full: 503 at once.
    let waiting = limits.acquire("s:hog");
    let overflow = async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        limits.acquire("s:hog").await
    };
    let other = limits.acquire("s:other").await;
    assert!(other.is_ok(), "another caller is not affected");
    let (w, o) = tokio::join!(waiting, async {
        let r = overflow.await;
        drop(t1);
        r
    });
    assert!(w.is_ok(), "the waiting request got the freed turn");
    let resp = axum::response::IntoResponse::into_response(o.err().expect("overflow refused"));
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "2");
    // A wait that times out is a 503 too.
    let again = limits.acquire("s:hog").await;
    assert!(matches!(again, Err(tally_server::ApiError::Unavailable(_))));
}

#[tokio::test]
async fn request_connections_have_the_statement_timeout_and_maintenance_has_none() {
    let a = app_or_skip!(app_with(|c| c.db_statement_timeout_secs = 1).await);
    let client = a.state.pool.get().await.unwrap();
    let st: String = client.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
    assert_eq!(st, "1s");
    // A statement over the timeout is a 503 `unavailable`, not a 500.
    let err = client.query_one("SELECT pg_sleep(2)", &[]).await.unwrap_err();
    let resp = axum::response::IntoResponse::into_response(tally_server::ApiError::from(err));
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Maintenance pools and migrations run without it, even when the URL asks for one.
    let maint = tally_server::db::pool(&a.url, 1).unwrap();
    let st: String = maint.get().await.unwrap().query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
    assert_eq!(st, "0");
    // A fresh database migrated through a URL that asks for a 1 ms statement timeout.
    let fresh = fresh_db().await.unwrap();
    let sep = if fresh.contains('?') { '&' } else { '?' };
    let strict = format!("{fresh}{sep}options=-c%20statement_timeout%3D1");
    tally_server::db::migrate(&strict).await.expect("migrations ignore a request timeout");
}

#[tokio::test]
async fn a_request_over_the_request_timeout_answers_503_json_not_an_empty_408() {
    // No statement timeout: only the request timeout (1 s) bounds a sync stuck on a row lock.
    let a = app_or_skip!(
        app_with(|c| {
            c.db_statement_timeout_secs = 0;
            c.request_timeout_secs = 1;
        })
        .await
    );
    let t = token("stuck");
    assert_eq!(a.call("GET", "/v1/me", Some(&t), None).await.0, StatusCode::OK);
    let (mut locker, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tx = locker.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM users WHERE external_id = 'stuck' FOR UPDATE", &[]).await.unwrap();
    let started = std::time::Instant::now();
    let body = json!({"protocol": 1, "device_id": "d", "events": [event(Uuid::now_v7(), "ai_chat", 1)]});
    let (s, v, h) = a.raw("POST", "/v1/sync", Some(&t), serde_json::to_vec(&body).unwrap(), &[]).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")), "{v}");
    assert_eq!(h["retry-after"], "2");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    tx.rollback().await.unwrap();
    assert_eq!(a.count("events").await, 0, "the cut request recorded nothing");
    let (s, _) = a.sync(&t, "d", vec![event(Uuid::now_v7(), "ai_chat", 1)]).await;
    assert_eq!(s, StatusCode::OK, "the pool recovered its connection");
}
