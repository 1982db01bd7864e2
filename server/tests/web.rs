//! What web front ends need: CORS for the configured origins (never with credentials) and a
//! user's usage history, paginated — through the real router on real Postgres.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test]
async fn cors_allows_the_configured_origins_only_and_never_credentials() {
    let a = app_or_skip!(app_with(|c| c.cors_origins = vec!["https://app.example.com".into()]).await);
    let preflight = [
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "authorization,content-type"),
    ];
    let (s, _, h) = a.raw("OPTIONS", "/v1/consume", None, Vec::new(), &preflight).await;
    assert!(s.is_success(), "preflight of an allowed origin: {s}");
    assert_eq!(h.get("access-control-allow-origin").and_then(|v| v.to_str().ok()), Some("https://app.example.com"));
    let methods = h.get("access-control-allow-methods").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(methods.contains("POST") && methods.contains("DELETE"), "{methods}");
    let headers = h.get("access-control-allow-headers").and_then(|v| v.to_str().ok()).unwrap_or_default().to_ascii_lowercase();
    assert!(headers.contains("authorization"), "{headers}");
    assert!(h.get("access-control-allow-credentials").is_none(), "credentials are never allowed");
    // A real request from the allowed origin carries the header; another origin's does not.
    let t = token("web-user");
    let (s, _, h) = a.raw("GET", "/v1/entitlements", Some(&t), Vec::new(), &[("origin", "https://app.example.com")]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h.get("access-control-allow-origin").and_then(|v| v.to_str().ok()), Some("https://app.example.com"));
    assert!(h.get("access-control-allow-credentials").is_none());
    let (_, _, h) = a.raw("GET", "/v1/entitlements", Some(&t), Vec::new(), &[("origin", "https://evil.example")]).await;
    assert!(h.get("access-control-allow-origin").is_none(), "a foreign origin gets no CORS header");
    let evil = [("origin", "https://evil.example"), ("access-control-request-method", "POST")];
    let (_, _, h) = a.raw("OPTIONS", "/v1/consume", None, Vec::new(), &evil).await;
    assert!(h.get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn without_origins_no_cors_header_and_a_bad_origin_refuses_to_start() {
    let a = app_or_skip!(app().await);
    let (_, _, h) = a.raw("GET", "/healthz", None, Vec::new(), &[("origin", "https://app.example.com")]).await;
    assert!(h.get("access-control-allow-origin").is_none());
    let url = fresh_db().await.expect("db");
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(&url, dir.path());
    c.cors_origins = vec!["https://app.example.com/".into()];
    let err = tally_server::AppState::new(c).await.err().expect("a path in an origin is refused");
    assert!(err.to_string().contains("TALLY_CORS_ORIGINS"), "{err}");
}

#[tokio::test]
async fn usage_events_are_the_callers_own_newest_first_in_pages_with_voids_shown() {
    let a = app_or_skip!(app().await);
    let (t, other) = (token("historian"), token("stranger"));
    let ids: Vec<Uuid> = (0..25).map(|_| Uuid::now_v7()).collect();
    let events: Vec<Value> = ids.iter().enumerate().map(|(i, id)| event(*id, if i % 5 == 0 { "ai_chat" } else { "notes" }, 1)).collect();
    let (s, v) = a.sync(&t, "phone", events).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = a.sync(&other, "tablet", vec![event(Uuid::now_v7(), "notes", 7)]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = a.call("POST", &format!("/v1/usage/{}/void", ids[3]), Some(&t), Some(json!({"reason": "refunded order"}))).await;
    assert!(s.is_success(), "{s} {v}");
    // Pages of 10: 25 events, newest first, each once, none of the stranger's.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        let q = match &cursor {
            Some(c) => format!("/v1/usage/events?limit=10&cursor={c}"),
            None => "/v1/usage/events?limit=10".to_string(),
        };
        let (s, v) = a.call("GET", &q, Some(&t), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let evs = v["events"].as_array().unwrap();
        assert!(evs.len() <= 10);
        seen.extend(evs.iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(page < 5, "pagination ends");
    }
    assert_eq!(seen.len(), 25);
    let got: Vec<Uuid> = seen.iter().map(|e| e["id"].as_str().unwrap().parse().unwrap()).collect();
    let mut want = ids.clone();
    want.sort_by(|x, y| {
        let at = |id: &Uuid| seen.iter().find(|e| e["id"] == json!(id)).map(|e| e["effective_at"].as_str().unwrap().to_string());
        at(y).cmp(&at(x)).then(y.cmp(x))
    });
    assert_eq!(got, want, "newest first, ties by id");
    let voided = seen.iter().find(|e| e["id"] == json!(ids[3])).unwrap();
    assert_eq!(voided["void_reason"], "refunded order");
    assert!(voided["voided_at"].is_string());
    assert!(seen.iter().all(|e| e["amount"] == 1), "no event of the stranger");
    // A feature filter.
    let (_, v) = a.call("GET", "/v1/usage/events?feature=ai_chat", Some(&t), None).await;
    assert_eq!(v["events"].as_array().unwrap().len(), 5);
    // Bad queries are 422 and name the problem.
    for (q, code) in [
        ("/v1/usage/events?limit=0", "invalid_query"),
        ("/v1/usage/events?limit=1001", "invalid_query"),
        ("/v1/usage/events?cursor=bm90LWEtY3Vyc29y", "invalid_cursor"),
        ("/v1/usage/events?feature=%24credits", "invalid_feature"),
    ] {
        let (s, v) = a.call("GET", q, Some(&t), None).await;
        assert_eq!((s, v["error"]["code"].as_str().unwrap_or_default()), (StatusCode::UNPROCESSABLE_ENTITY, code), "{q}: {v}");
    }
    let (s, _) = a.call("GET", "/v1/usage/events?from=yesterday", Some(&t), None).await;
    assert!(s.is_client_error());
    // The stranger cannot read the historian's history by naming them.
    let (s, _) = a.call("GET", "/v1/usage/events?subject=historian", Some(&other), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn plans_are_public_with_names_prices_and_products_per_store() {
    const PLANS: &str = r#"{"plans": [
      {"id": "free", "display_name": "Free", "features": {"chat": {"type": "metered", "limit": 5, "period": "month", "enforcement": "hard"}}},
      {"id": "pro", "display_name": "Pro", "description": "Unlimited chat.", "features": {"chat": {"type": "metered", "limit": null, "period": "month"}}}],
     "products": [
      {"id": "pro_monthly", "store": "app_store", "grants": {"plan": "pro"}, "display_price": "$4.99/month"},
      {"id": "price_pro", "store": "stripe", "grants": {"plan": "pro"}, "trial_days": 14, "display_price": "€4.50/month"},
      {"id": "pro_forever", "store": "play", "grants": {"plan": "pro", "lifetime": true}, "display_price": "$79"},
      {"id": "credits_100", "store": "play", "grants": {"credits": 100}, "display_price": "$1.99"}]}"#;
    let a = app_or_skip!(app_with(|c| std::fs::write(c.plans_file.as_ref().unwrap(), PLANS).unwrap()).await);
    let (s, v, h) = a.raw("GET", "/v1/plans", None, Vec::new(), &[]).await;
    assert_eq!(s, StatusCode::OK, "no credentials needed: {v}");
    assert_eq!(h.get("cache-control").and_then(|v| v.to_str().ok()), Some("public, max-age=60"));
    let plans = v["plans"].as_array().unwrap();
    let pro = plans.iter().find(|p| p["id"] == "pro").unwrap();
    assert_eq!((pro["display_name"].clone(), pro["description"].clone()), (json!("Pro"), json!("Unlimited chat.")));
    assert_eq!(pro["features"]["chat"]["limit"], Value::Null);
    let stores: Vec<(&str, &str)> =
        pro["products"].as_array().unwrap().iter().map(|p| (p["store"].as_str().unwrap(), p["id"].as_str().unwrap())).collect();
    assert_eq!(stores, vec![("app_store", "pro_monthly"), ("stripe", "price_pro"), ("play", "pro_forever")]);
    let stripe = pro["products"].as_array().unwrap().iter().find(|p| p["store"] == "stripe").unwrap();
    assert_eq!((stripe["trial_days"].clone(), stripe["display_price"].clone()), (json!(14), json!("€4.50/month")));
    assert!(pro["rank"].as_i64().unwrap() > plans.iter().find(|p| p["id"] == "free").unwrap()["rank"].as_i64().unwrap());
    assert_eq!(
        v["credit_packs"],
        json!([{"id": "credits_100", "store": "play", "display_price": "$1.99", "trial_days": null, "lifetime": false, "credits": 100}])
    );
}

#[tokio::test]
async fn denied_decisions_are_counted_by_route_and_reason() {
    let a = app_or_skip!(app().await);
    let t = token("denied-often");
    let series = "tally_decisions_denied_total{route=\"consume\",reason=\"limit_reached\"}";
    let before = metric(&a, series).await;
    for _ in 0..5 {
        let (s, v) = a.call("POST", "/v1/consume", Some(&t), Some(json!({"feature": "ai_chat", "amount": 1}))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, _) = a.call("POST", "/v1/consume", Some(&t), Some(json!({"feature": "ai_chat", "amount": 1}))).await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED);
    assert!(metric(&a, series).await >= before + 1.0);
    let (s, v) = a.call("POST", "/v1/check", Some(&t), Some(json!({"feature": "ai_chat", "amount": 1}))).await;
    assert_eq!((s, v["allowed"].clone()), (StatusCode::OK, json!(false)), "{v}");
    assert!(metric(&a, "tally_decisions_denied_total{route=\"check\",reason=\"limit_reached\"}").await >= 1.0);
}

/// One sample of `GET /metrics` (0 when absent).
async fn metric(a: &TestApp, series: &str) -> f64 {
    let req = axum::http::Request::builder().uri("/metrics").body(axum::body::Body::empty()).unwrap();
    let body = tower::ServiceExt::oneshot(a.router.clone(), req).await.unwrap().into_body();
    let text = String::from_utf8(axum::body::to_bytes(body, usize::MAX).await.unwrap().to_vec()).unwrap();
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

#[tokio::test]
async fn billing_without_stripe_says_it_is_not_configured() {
    let a = app_or_skip!(app().await);
    let t = token("no-stripe");
    let body = json!({"price_id": "price_123", "success_url": "https://app.example.com/ok", "cancel_url": "https://app.example.com/no"});
    let (s, v) = a.call("POST", "/v1/billing/checkout", Some(&t), Some(body)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("store_unconfigured")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("TALLY_STRIPE_SECRET_KEY"), "{v}");
}

#[tokio::test]
async fn a_plan_is_patched_in_part_and_a_bad_patch_changes_nothing() {
    let a = app_or_skip!(app().await);
    let admin = token("root-admin");
    let patch = json!({"display_name": "Pro", "features": {"ai_chat": {"limit": 900}, "export": null}});
    let (s, v) = a.call("PATCH", "/v1/admin/plans/pro", Some(&admin), Some(patch)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, cat) = a.call("GET", "/v1/admin/plans", Some(&admin), None).await;
    let pro = cat["catalog"]["plans"].as_array().unwrap().iter().find(|p| p["id"] == "pro").unwrap().clone();
    assert_eq!(pro["display_name"], "Pro");
    assert_eq!(pro["features"]["ai_chat"], json!({"type": "metered", "limit": 900, "period": "month", "enforcement": "hard"}));
    assert!(pro["features"].get("export").is_none(), "null removes a feature: {pro}");
    let version = cat["version"].clone();
    // A patch whose result is not a valid plan, an id mismatch, an unknown plan: nothing changes.
    for (path, body, status, code) in [
        ("/v1/admin/plans/pro", json!({"features": {"ai_chat": {"limit": -1}}}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_plan"),
        ("/v1/admin/plans/pro", json!({"id": "gold"}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_plan"),
        ("/v1/admin/plans/pro", json!(["not", "an", "object"]), StatusCode::UNPROCESSABLE_ENTITY, "invalid_plan"),
        ("/v1/admin/plans/gold", json!({"display_name": "Gold"}), StatusCode::NOT_FOUND, "unknown_plan"),
    ] {
        let (s, v) = a.call("PATCH", path, Some(&admin), Some(body)).await;
        assert_eq!((s, v["error"]["code"].as_str().unwrap_or_default()), (status, code), "{path}: {v}");
    }
    let (_, after) = a.call("GET", "/v1/admin/plans", Some(&admin), None).await;
    assert_eq!(after["version"], version);
    let (s, v) = a.call("PATCH", "/v1/admin/plans/pro", Some(&token("not-admin")), Some(json!({}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{v}");
}
