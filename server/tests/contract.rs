//! The contract at the server's edge: every value the device may record is taken, every value
//! that breaks the contract is a 4xx naming the field (never a 500, never a whole sync refused
//! for one bad item), and credentials of one subject never record under another.

mod common;

use axum::http::StatusCode;
use chrono::Utc;
use common::*;
use serde_json::{Value, json};
use tally_core::contract;
use uuid::Uuid;

async fn exec(a: &TestApp, sql: &str) {
    let (client, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client.batch_execute(sql).await.expect("exec");
}

fn sync_body(events: Value, settings: Value, profile: Value) -> Value {
    json!({"protocol": 1, "device_id": "dev-1", "events": events, "settings_changes": settings, "profile": profile})
}

#[tokio::test]
async fn credentials_of_another_subject_record_nothing() {
    let a = app_or_skip!(app().await);
    let other = token("someone-else");
    let mut body = sync_body(json!([event(Uuid::now_v7(), "ai_chat", 1)]), json!([]), Value::Null);
    body["external_id"] = json!("rust-user");
    let (s, v) = a.call("POST", "/v1/sync", Some(&other), Some(body.clone())).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("subject_mismatch")), "{v}");
    assert_eq!(a.count("events").await, 0, "nothing recorded under the token's subject");
    // The right subject is taken.
    let (s, v) = a.call("POST", "/v1/sync", Some(&token("rust-user")), Some(body)).await;
    assert_eq!((s, v["accepted"].as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "{v}");
}

#[tokio::test]
async fn nul_is_a_4xx_at_the_edge_and_one_bad_item_never_fails_a_sync() {
    let a = app_or_skip!(app().await);
    let t = token("nul");
    let good = event(Uuid::now_v7(), "ai_chat", 1);
    let mut bad_feature = event(Uuid::now_v7(), "ai\u{0}chat", 1);
    bad_feature["id"] = json!(Uuid::now_v7());
    let mut bad_meta = event(Uuid::now_v7(), "ai_chat", 1);
    bad_meta["metadata"] = json!({"note": "a\u{0}b"});
    let settings = json!([
        {"key": "k\u{0}", "value": 1, "hlc": "001700000000000-00000-dev-1"},
        {"key": "ok", "value": "a\u{0}", "hlc": "001700000000000-00000-dev-1"},
        {"key": "fine", "value": "v", "hlc": "001700000000000-00000-dev-1"}
    ]);
    let (s, v) = a
        .call(
            "POST",
            "/v1/sync",
            Some(&t),
            Some(sync_body(json!([good, bad_feature, bad_meta]), settings, json!({"display_name": "A\u{0}"}))),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["accepted"].as_array().map(Vec::len), Some(1));
    let reasons: Vec<&str> = v["rejected"].as_array().unwrap().iter().filter_map(|r| r["reason"].as_str()).collect();
    assert_eq!(reasons, ["invalid_text", "invalid_text"], "{v}");
    let srej: Vec<(&str, &str)> =
        v["settings_rejected"].as_array().unwrap().iter().map(|r| (r["key"].as_str().unwrap(), r["reason"].as_str().unwrap())).collect();
    assert_eq!(srej, [("k\u{0}", "invalid_setting"), ("ok", "invalid_text")]);
    assert_eq!(v["profile_rejected"], json!([{"field": "display_name", "reason": "invalid_text"}]));
    assert_eq!(a.count("settings").await, 1, "only the good setting is stored");
    // device_id, PATCH /v1/me, POST /v1/usage and a token's sub answer 4xx, never 500.
    let (s, v) = a.call("POST", "/v1/sync", Some(&t), Some(json!({"protocol": 1, "device_id": "d\u{0}"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_text")));
    let (s, v) = a.call("PATCH", "/v1/me", Some(&t), Some(json!({"display_name": "x\u{0}"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_text")));
    let mut usage = event(Uuid::now_v7(), "ai_chat", 1);
    usage["metadata"] = json!({"a": "\u{0}"});
    let (s, v) = a.call("POST", "/v1/usage", Some(&t), Some(usage)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_text")));
    let (s, v) = a.call("PATCH", "/v1/settings", Some(&t), Some(json!({"theme": "\u{0}"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_text")));
    let (s, v) = a.call("GET", "/v1/me", Some(&token("sub\u{0}x")), None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_token")));
    assert_eq!(a.count("events").await, 1);
}

#[tokio::test]
async fn values_at_the_contract_limits_are_taken_and_past_them_refused() {
    let a = app_or_skip!(app_with(|c| c.max_body_bytes = 4 * 1024 * 1024).await);
    let t = token("limits");
    let at_limit = json!({
        "id": Uuid::now_v7(), "feature": "ai_chat", "amount": contract::MAX_AMOUNT, "occurred_at": Utc::now().to_rfc3339(),
        "model": "m".repeat(contract::MAX_MODEL_BYTES), "input_tokens": contract::MAX_TOKENS, "output_tokens": contract::MAX_TOKENS,
        "metadata": {"k": "x".repeat(contract::MAX_METADATA_BYTES - 8)}, "device_seq": contract::MAX_COUNTER,
    });
    let long_feature = event(Uuid::now_v7(), &"f".repeat(contract::MAX_FEATURE_BYTES), 1);
    let settings = json!([
        {"key": "k".repeat(contract::MAX_SETTING_KEY_BYTES), "value": "v".repeat(contract::MAX_SETTING_VALUE_BYTES - 2),
         "hlc": "001700000000000-00000-dev-1"}
    ]);
    let profile =
        json!({"display_name": "n".repeat(contract::MAX_DISPLAY_NAME_BYTES), "avatar_url": "u".repeat(contract::MAX_AVATAR_URL_BYTES)});
    let (s, v) = a.call("POST", "/v1/sync", Some(&t), Some(sync_body(json!([at_limit, long_feature]), settings, profile))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["accepted"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!((v["rejected"].as_array().map(Vec::len), v["settings_rejected"].as_array().map(Vec::len)), (Some(0), Some(0)), "{v}");
    assert_eq!(v["profile_rejected"], json!([]));
    let (_, me) = a.call("GET", "/v1/me", Some(&t), None).await;
    assert_eq!(me["display_name"].as_str().map(str::len), Some(contract::MAX_DISPLAY_NAME_BYTES));
    // One past each limit: refused alone.
    let past = json!([
        {"id": Uuid::now_v7(), "feature": "ai_chat", "amount": contract::MAX_AMOUNT + 1, "occurred_at": Utc::now().to_rfc3339()},
        {"id": Uuid::now_v7(), "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now().to_rfc3339(), "input_tokens": contract::MAX_TOKENS + 1},
        {"id": Uuid::now_v7(), "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now().to_rfc3339(),
         "metadata": {"k": "x".repeat(contract::MAX_METADATA_BYTES - 7)}},
        {"id": Uuid::now_v7(), "feature": "f".repeat(contract::MAX_FEATURE_BYTES + 1), "amount": 1, "occurred_at": Utc::now().to_rfc3339()},
        {"id": Uuid::now_v7(), "feature": "ai_chat", "amount": 1, "occurred_at": Utc::now().to_rfc3339(),
         "model": "m".repeat(contract::MAX_MODEL_BYTES + 1)}
    ]);
    let settings = json!([{"key": "v", "value": "v".repeat(contract::MAX_SETTING_VALUE_BYTES - 1), "hlc": "001700000000000-00000-dev-1"}]);
    let (s, v) = a
        .call(
            "POST",
            "/v1/sync",
            Some(&t),
            Some(sync_body(past, settings, json!({"display_name": "n".repeat(contract::MAX_DISPLAY_NAME_BYTES + 1)}))),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let reasons: Vec<&str> = v["rejected"].as_array().unwrap().iter().filter_map(|r| r["reason"].as_str()).collect();
    assert_eq!(reasons, ["invalid_amount", "invalid_amount", "metadata_too_large", "invalid_text", "invalid_text"], "{v}");
    assert_eq!(v["settings_rejected"], json!([{"key": "v", "reason": "value_too_large"}]));
    assert_eq!(v["profile_rejected"], json!([{"field": "display_name", "reason": "invalid_text"}]));
    assert_eq!(a.count("events").await, 2);
}

#[tokio::test]
async fn unknown_features_are_kept_and_named_and_backends_get_422() {
    let a = app_or_skip!(app().await);
    let t = token("ahead");
    let (s, v) = a.sync(&t, "d", vec![event(Uuid::now_v7(), "video_export", 3), event(Uuid::now_v7(), "ai_chat", 1)]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["accepted"].as_array().map(Vec::len), Some(2), "stored and acknowledged");
    assert_eq!(v["unknown_features"], json!(["video_export"]));
    assert!(v["totals"].as_array().unwrap().iter().all(|t| t["feature"] != "video_export"), "counted in no total");
    let (s, v) = a.call("POST", "/v1/usage", Some(&t), Some(event(Uuid::now_v7(), "video_export", 1))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_feature")));
    assert_eq!(a.count("events").await, 2);
}

#[tokio::test]
async fn a_resent_id_with_other_metadata_is_a_conflict() {
    let a = app_or_skip!(app().await);
    let t = token("meta");
    let mut e = event(Uuid::now_v7(), "ai_chat", 1);
    e["metadata"] = json!({"prompt": "a"});
    assert_eq!(a.sync(&t, "d", vec![e.clone()]).await.1["accepted"].as_array().map(Vec::len), Some(1));
    assert_eq!(a.sync(&t, "d", vec![e.clone()]).await.1["duplicates"].as_array().map(Vec::len), Some(1));
    e["metadata"] = json!({"prompt": "b"});
    let (_, v) = a.sync(&t, "d", vec![e.clone()]).await;
    assert_eq!(v["rejected"][0]["reason"], "conflict", "{v}");
    let (s, v) = a.call("POST", "/v1/usage", Some(&t), Some(e)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
}

#[tokio::test]
async fn a_use_that_would_overflow_a_counter_is_refused_and_the_feature_keeps_working() {
    let a = app_or_skip!(app().await);
    let t = token("overflow");
    // `notes` is unlimited, lifetime: one counter for all time.
    assert_eq!(a.sync(&t, "d", vec![event(Uuid::now_v7(), "notes", 1)]).await.0, StatusCode::OK);
    exec(&a, &format!("UPDATE counters SET used = {} WHERE feature = 'notes'", contract::MAX_COUNTER - 5)).await;
    let over = event(Uuid::now_v7(), "notes", 6);
    let fits = event(Uuid::now_v7(), "notes", 5);
    let (s, v) = a.sync(&t, "d", vec![over, fits.clone()]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rejected"][0]["reason"], "invalid_amount", "{v}");
    assert_eq!(v["accepted"], json!([fits["id"]]));
    assert_eq!(used(&v, "notes"), Some(contract::MAX_COUNTER));
    assert_eq!(a.count("events").await, 2, "the refused use left no row");
    let (s, v) = a.call("POST", "/v1/usage", Some(&t), Some(event(Uuid::now_v7(), "notes", 1))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_amount")));
    // Other features are untouched.
    let (s, v) = a.sync(&t, "d", vec![event(Uuid::now_v7(), "ai_chat", 1)]).await;
    assert_eq!((s, used(&v, "ai_chat")), (StatusCode::OK, Some(1)));
}

#[tokio::test]
async fn settings_caps_are_per_user_and_come_back_quota_exceeded() {
    let a = app_or_skip!(app_with(|c| c.max_body_bytes = 8 * 1024 * 1024).await);
    let t = token("caps");
    let hlc = "001700000000000-00000-dev-1";
    let many: Vec<Value> = (0..contract::MAX_SETTINGS_KEYS).map(|i| json!({"key": format!("k{i}"), "value": i, "hlc": hlc})).collect();
    let (s, v) = a.call("POST", "/v1/sync", Some(&t), Some(sync_body(json!([]), json!(many), Value::Null))).await;
    assert_eq!((s, v["settings_rejected"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)));
    // Another device adds one more key: refused alone; changing an existing key still works.
    let more = json!([{"key": "extra", "value": 1, "hlc": hlc}, {"key": "k1", "value": "changed", "hlc": "001700000000001-00000-dev-2"}]);
    let (s, v) = a.call("POST", "/v1/sync", Some(&t), Some(sync_body(json!([]), more, Value::Null))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["settings_rejected"], json!([{"key": "extra", "reason": "quota_exceeded"}]));
    let (_, cur) = a.call("GET", "/v1/settings", Some(&t), None).await;
    assert_eq!(cur["settings"]["k1"], "changed");
    let (s, v) = a.call("PATCH", "/v1/settings", Some(&t), Some(json!({"web": 1}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("quota_exceeded")));
    // A delete frees room.
    let (s, _) = a.call("PATCH", "/v1/settings", Some(&t), Some(json!({"k0": null, "web": 1}))).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn the_device_gets_back_its_restamped_row() {
    let a = app_or_skip!(app().await);
    let t = token("restamp");
    let ahead = Utc::now().timestamp_millis() + 3_600_000;
    let hlc = format!("{ahead:015}-00000-dev-1");
    let (s, v) = a
        .call("POST", "/v1/sync", Some(&t), Some(sync_body(json!([]), json!([{"key": "theme", "value": "dark", "hlc": hlc}]), Value::Null)))
        .await;
    assert_eq!(s, StatusCode::OK);
    let back = v["settings_changes"].as_array().unwrap().iter().find(|c| c["key"] == "theme").cloned().expect("own row back");
    assert_eq!(back["value"], "dark");
    assert!(back["hlc"].as_str().unwrap() < hlc.as_str(), "re-stamped to the server's time: {back}");
}

#[tokio::test]
async fn a_grant_is_validated_before_anything_is_created() {
    let a = app_or_skip!(app().await);
    let admin = token("root-admin");
    assert_eq!(a.call("GET", "/v1/me", Some(&admin), None).await.0, StatusCode::OK);
    let users = a.count("users").await;
    for bad in [
        json!({"subject": "newbie", "plan": "nope", "reason": "beta"}),
        json!({"subject": "newbie", "plan": "pro", "reason": ""}),
        json!({"subject": "newbie", "plan": "pro", "reason": "beta", "until": "2001-01-01T00:00:00Z"}),
        json!({"subject": "", "plan": "pro", "reason": "beta"}),
    ] {
        let (s, v) = a.call("POST", "/v1/admin/grants", Some(&admin), Some(bad.clone())).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad} → {v}");
    }
    assert_eq!(a.count("users").await, users, "no user was created by a refused grant");
    assert_eq!(a.count("access_grants").await, 0);
    let (s, v) =
        a.call("POST", "/v1/admin/grants", Some(&admin), Some(json!({"subject": "newbie", "plan": "pro", "reason": "beta"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, e) = a.call("GET", "/v1/entitlements", Some(&token("newbie")), None).await;
    assert_eq!((e["plan"].as_str(), e["access_reason"].as_str()), (Some("pro"), Some("granted:beta")));
}

#[tokio::test]
async fn a_budget_use_without_a_model_counts_its_amount_as_micros_like_the_device() {
    let a = app_or_skip!(app().await);
    let t = token("budget");
    let (s, v) = a.sync(&t, "d", vec![event(Uuid::now_v7(), "ai_spend", 300)]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let spend = v["totals"].as_array().unwrap().iter().find(|t| t["feature"] == "ai_spend").cloned().expect("ai_spend total");
    assert_eq!(spend["used"], 300, "{spend}");
    // A priced call counts its priced cost: 1,000 input tokens of gpt-4o = 2,500 micros.
    let mut priced = event(Uuid::now_v7(), "ai_spend", 1);
    (priced["model"], priced["input_tokens"]) = (json!("gpt-4o"), json!(1000));
    let (_, v) = a.sync(&t, "d", vec![priced]).await;
    let spend = v["totals"].as_array().unwrap().iter().find(|t| t["feature"] == "ai_spend").cloned().expect("ai_spend total");
    assert_eq!(spend["used"], 2800, "{spend}");
}
