//! Prices and reports of recorded uses: a use's credit cost and the grants it drew stay as they
//! were when it was recorded (plan changes never rewrite them), a budget hold's commit records
//! its real cost, usage reports never add different features' amounts together, and the CLI's
//! report, `GET /v1/usage` and the console's chart come from one function (voided uses left out).

mod common;

use axum::http::StatusCode;
use chrono::{Duration, Utc};
use common::*;
use serde_json::{Value, json};

/// Free includes 100 credits a billing window and prices images at 10; pro prices them at 20 and
/// includes none.
const PRICING_CATALOG: &str = r#"{"models": {"gpt-4o": {"input_micros_per_mtok": 2500000, "output_micros_per_mtok": 10000000}},
 "plans": [{"id": "free", "included_credits": {"amount": 100, "rollover": false}, "features": {
  "images":   {"type": "credits", "cost": 10},
  "ai_spend": {"type": "budget", "limit_micros": 2000000, "period": "day", "enforcement": "hard"},
  "notes":    {"type": "metered", "limit": null, "period": "lifetime"}}},
  {"id": "pro", "features": {"images": {"type": "credits", "cost": 20},
  "ai_spend": {"type": "budget", "limit_micros": 2000000, "period": "day", "enforcement": "hard"},
  "notes":    {"type": "metered", "limit": null, "period": "lifetime"}}}]}"#;

async fn pricing_app() -> Option<TestApp> {
    app_with(|c| {
        let plans = c.data_dir.join("pricing-plans.json");
        std::fs::write(&plans, PRICING_CATALOG).expect("write plans");
        c.plans_file = Some(plans);
    })
    .await
}

fn grant_of<'a>(grants: &'a Value, prefix: &str) -> Option<&'a Value> {
    grants.as_array()?.iter().find(|g| g["id"].as_str().is_some_and(|id| id.starts_with(prefix)))
}

fn row<'a>(report: &'a Value, key: &str, value: &str, feature: &str) -> Option<&'a Value> {
    report["rows"].as_array()?.iter().find(|r| r[key] == value && r["feature"] == feature)
}

#[tokio::test]
async fn a_past_use_keeps_its_price_and_the_grants_it_drew_when_the_plan_changes() {
    let a = app_or_skip!(pricing_app().await);
    let admin = token("root-admin");
    let t = token("repriced");
    let (s, e) = a.call("GET", "/v1/entitlements", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    let (s, g) =
        a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "repriced", "credits": 500, "reason": "gift"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{g}");
    for _ in 0..2 {
        let (s, v) = a.call("POST", "/v1/consume", Some(&t), Some(json!({"feature": "images", "amount": 1}))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let b = billing(&a, &t).await;
    assert_eq!(grant_of(&b["credit_grants"], "adm:").map(|g| &g["remaining"]), Some(&json!(500)), "{b}");
    assert_eq!(grant_of(&b["credit_grants"], "included:free:").map(|g| &g["remaining"]), Some(&json!(80)), "{b}");

    let (s, g) =
        a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "repriced", "plan": "pro", "reason": "vip"}))).await;
    assert!(s.is_success(), "{g}");
    let b = billing(&a, &t).await;
    assert_eq!(b["plan"], "pro", "{b}");
    assert_eq!(
        grant_of(&b["credit_grants"], "adm:").map(|g| &g["remaining"]),
        Some(&json!(500)),
        "past uses are never re-priced or re-drawn: {b}"
    );
    assert_eq!(
        grant_of(&b["credit_grants"], "included:free:").map(|g| &g["remaining"]),
        Some(&json!(80)),
        "the included credits issued for this window stay with what was drawn from them: {b}"
    );
    assert_eq!(b["credit_balance"], 580, "{b}");
    let (_, e) = a.call("GET", "/v1/entitlements", Some(&t), None).await;
    assert_eq!(grant_of(&e["credit_grants"], "adm:").map(|g| &g["remaining"]), Some(&json!(500)), "{e}");
    assert_eq!(e["credit_balance"], 580, "{e}");
    let (s, u) = a.call("GET", "/v1/usage?group_by=feature", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK, "{u}");
    let images = row(&u, "feature", "images", "images").cloned().unwrap_or(Value::Null);
    assert_eq!((&images["events"], &images["amount"], &images["credits"]), (&json!(2), &json!(2), &json!(20)), "10 each: {u}");

    // A use after the change costs pro's price, drawn first from what is left of the window's
    // included credits.
    let (s, v) = a.call("POST", "/v1/consume", Some(&t), Some(json!({"feature": "images", "amount": 1}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let b = billing(&a, &t).await;
    assert_eq!(grant_of(&b["credit_grants"], "included:free:").map(|g| &g["remaining"]), Some(&json!(60)), "{b}");
    assert_eq!(grant_of(&b["credit_grants"], "adm:").map(|g| &g["remaining"]), Some(&json!(500)), "{b}");
    let (_, u) = a.call("GET", "/v1/usage?group_by=feature", Some(&t), None).await;
    assert_eq!(row(&u, "feature", "images", "images").map(|r| &r["credits"]), Some(&json!(40)), "{u}");

    // Voiding a use gives back exactly what it drew.
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let (s, r) = a.call("POST", &format!("/v1/usage/{id}/void"), Some(&t), Some(json!({}))).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let b = billing(&a, &t).await;
    assert_eq!(grant_of(&b["credit_grants"], "included:free:").map(|g| &g["remaining"]), Some(&json!(80)), "{b}");
    assert_eq!(b["credit_balance"], 580, "{b}");
}

#[tokio::test]
async fn uses_recorded_before_prices_were_stored_are_priced_once_as_before() {
    let a = app_or_skip!(pricing_app().await);
    let admin = token("root-admin");
    let t = token("legacy");
    let (s, g) =
        a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "legacy", "credits": 500, "reason": "gift"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{g}");
    for _ in 0..2 {
        let (s, v) = a.call("POST", "/v1/consume", Some(&t), Some(json!({"feature": "images", "amount": 1}))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    // As the database stood before version 21: no stored prices, no stored included credits.
    let (client, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute("UPDATE events SET credits = NULL; DELETE FROM credit_grants WHERE grant_id LIKE 'included:%'")
        .await
        .expect("legacy state");
    let b = billing(&a, &t).await;
    assert_eq!(grant_of(&b["credit_grants"], "included:free:").map(|g| &g["remaining"]), Some(&json!(80)), "{b}");
    assert_eq!(grant_of(&b["credit_grants"], "adm:").map(|g| &g["remaining"]), Some(&json!(500)), "{b}");
    assert_eq!(a.scalar("SELECT sum(credits)::int8 FROM events WHERE feature = 'images'").await, 20, "priced once and stored");
    let (s, g) = a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "legacy", "plan": "pro", "reason": "vip"}))).await;
    assert!(s.is_success(), "{g}");
    let b = billing(&a, &t).await;
    assert_eq!(grant_of(&b["credit_grants"], "adm:").map(|g| &g["remaining"]), Some(&json!(500)), "{b}");
    assert_eq!(b["credit_balance"], 580, "{b}");
}

#[tokio::test]
async fn a_budget_hold_commit_records_its_real_cost_and_usage_never_adds_features_together() {
    let a = app_or_skip!(pricing_app().await);
    let t = token("budgeter");
    let (s, h) = a.call("POST", "/v1/holds", Some(&t), Some(json!({"feature": "ai_spend", "amount": 20000}))).await;
    assert_eq!(s, StatusCode::CREATED, "{h}");
    let id = h["hold"]["id"].as_str().unwrap_or_default().to_string();
    // 2000 input tokens at 2.5 micros and 600 output tokens at 10 micros: 11,000 micros.
    let (s, c) = a
        .call(
            "POST",
            &format!("/v1/holds/{id}/commit"),
            Some(&t),
            Some(json!({"model": "gpt-4o", "input_tokens": 2000, "output_tokens": 600})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["decision"]["used"], 11000, "{c}");
    let (s, n) = a.call("POST", "/v1/consume", Some(&t), Some(json!({"feature": "notes", "amount": 3}))).await;
    assert_eq!(s, StatusCode::OK, "{n}");

    let (s, u) = a.call("GET", "/v1/usage?group_by=feature", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK, "{u}");
    let spend = row(&u, "feature", "ai_spend", "ai_spend").cloned().unwrap_or(Value::Null);
    assert_eq!((&spend["amount"], &spend["cost_micros"]), (&json!(11000), &json!(11000)), "the estimate is never the amount: {u}");

    let (s, u) = a.call("GET", "/v1/usage?group_by=day", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK, "{u}");
    let today = Utc::now().format("%Y-%m-%d").to_string();
    let rows = u["rows"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 2, "one row per day and feature: {u}");
    assert_eq!(row(&u, "day", &today, "ai_spend").map(|r| &r["amount"]), Some(&json!(11000)), "{u}");
    assert_eq!(row(&u, "day", &today, "notes").map(|r| &r["amount"]), Some(&json!(3)), "{u}");
    let (s, u) = a.call("GET", "/v1/usage?group_by=model", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK, "{u}");
    assert_eq!(row(&u, "model", "gpt-4o", "ai_spend").map(|r| &r["amount"]), Some(&json!(11000)), "{u}");
    assert_eq!(row(&u, "model", "", "notes").map(|r| &r["amount"]), Some(&json!(3)), "{u}");
    // Bad grouping: a clear 422 and nothing else.
    let (s, u) = a.call("GET", "/v1/usage?group_by=week", Some(&t), None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{u}");
    assert!(u["error"]["code"].is_string(), "{u}");
}

/// Runs `tally-server report` on the test database; returns (user, feature, events, amount).
fn cli_report(url: &str, dir: &std::path::Path, args: &[&str]) -> Vec<(String, String, i64, i64)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally-server"))
        .arg("report")
        .args(args)
        .env("TALLY_DATABASE_URL", url)
        .env("TALLY_DATA_DIR", dir)
        .output()
        .expect("run tally-server report");
    assert!(out.status.success(), "report failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.to_string(), f.get(1)?.to_string(), f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn the_cli_report_leaves_voided_uses_out_and_matches_the_api_and_the_console() {
    let a = app_or_skip!(pricing_app().await);
    let t = token("reported");
    let other = token("someone-else");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (s, v) = a.call("POST", "/v1/consume", Some(&t), Some(json!({"feature": "notes", "amount": 2}))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        ids.push(v["id"].as_str().unwrap_or_default().to_string());
    }
    let (s, v) = a.call("POST", "/v1/consume", Some(&other), Some(json!({"feature": "notes", "amount": 5}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, r) = a.call("POST", &format!("/v1/usage/{}/void", ids[0]), Some(&t), Some(json!({"reason": "mistake"}))).await;
    assert_eq!(s, StatusCode::OK, "{r}");

    let (s, u) = a.call("GET", "/v1/usage?group_by=feature", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK, "{u}");
    let api = row(&u, "feature", "notes", "notes").cloned().unwrap_or(Value::Null);
    assert_eq!((&api["events"], &api["amount"]), (&json!(2), &json!(4)), "{u}");

    let report = cli_report(&a.url, a.dir.path(), &[]);
    let mine: Vec<_> = report.iter().filter(|r| r.0 == "reported").cloned().collect();
    assert_eq!(mine, vec![("reported".to_string(), "notes".to_string(), 2, 4)], "the voided use is left out: {report:?}");
    assert!(report.contains(&("someone-else".to_string(), "notes".to_string(), 1, 5)), "{report:?}");
    // The same user and range as the API's default.
    let from = (Utc::now() - Duration::days(30)).to_rfc3339();
    let only = cli_report(&a.url, a.dir.path(), &["--subject", "reported", "--from", &from]);
    assert_eq!(only, mine, "{only:?}");

    // The console's chart of the same user.
    let user = tally_server::users::find_named(&a.state, Some("reported"), None).await.expect("user");
    let chart = tally_server::console::users::usage_chart(&a.state, &user, 30, a.state.now()).await.expect("chart");
    let notes = chart.features.iter().find(|f| f.feature == "notes").expect("notes series");
    assert_eq!(notes.daily.iter().sum::<i64>(), 4, "{notes:?}");
}

async fn billing(a: &TestApp, bearer: &str) -> Value {
    let (s, v) = a.call("GET", "/v1/billing", Some(bearer), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}
