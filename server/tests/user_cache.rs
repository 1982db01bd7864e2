//! The user cache behind `GET /v1/entitlements`, on two replicas sharing one real Postgres: a
//! change made on either replica (or by hand in SQL) is announced by Postgres and seen by the
//! other, the replica that made it sees it on the very next request, and a replica that lost its
//! listening connection serves nothing from the cache until it listens again.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tally_server::AppState;
use tally_server::users::IdClaims;

/// A second replica: its own state, router and caches on the same database and clock.
async fn replica(a: &TestApp) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(&a.url, dir.path());
    let state = AppState::with_clock(config, a.clock.clone()).await.expect("state");
    TestApp { state: state.clone(), router: tally_server::app(state), url: a.url.clone(), dir, clock: a.clock.clone() }
}

async fn until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn listening(a: &TestApp) {
    until("the listening connection", Duration::from_secs(10), async || a.state.user_cache.is_live()).await;
}

fn held(a: &TestApp, sub: &str) -> bool {
    a.state.user_cache.get(&IdClaims { sub: sub.into(), email: None, email_verified: None, iat: None, name: None }).is_some()
}

async fn entitlements(a: &TestApp, sub: &str) -> (StatusCode, Value) {
    a.call("GET", "/v1/entitlements", Some(&token(sub)), None).await
}

async fn plan(a: &TestApp, sub: &str) -> String {
    let (s, e) = entitlements(a, sub).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    e["plan"].as_str().unwrap().to_string()
}

async fn sql(a: &TestApp, q: &str) {
    let (client, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute(q).await.unwrap();
}

#[tokio::test]
async fn a_grant_on_one_replica_is_seen_by_the_other_and_at_once_by_itself() {
    let a = app_or_skip!(app().await);
    let b = replica(&a).await;
    listening(&a).await;
    listening(&b).await;
    assert_eq!(plan(&a, "ada").await, "free");
    assert_eq!(plan(&b, "ada").await, "free");
    assert!(held(&a, "ada") && held(&b, "ada"), "both replicas hold ada after a read");
    let grant = json!({"subject": "ada", "plan": "pro", "reason": "support"});
    let (s, v) = b.call("POST", "/v1/admin/grants", Some(&token("root-admin")), Some(grant)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(plan(&b, "ada").await, "pro", "the replica that granted sees it on the next request");
    until("the other replica to see the grant", Duration::from_secs(5), async || plan(&a, "ada").await == "pro").await;
    assert!(held(&a, "ada"), "and holds the new row again");
    // Revoked on the first replica: both are back on free.
    let (s, v) = a.call("POST", "/v1/admin/grants/revoke", Some(&token("root-admin")), Some(json!({"subject": "ada"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(plan(&a, "ada").await, "free");
    until("the revocation on the other replica", Duration::from_secs(5), async || plan(&b, "ada").await == "free").await;
}

#[tokio::test]
async fn disabling_or_deleting_on_one_replica_refuses_the_user_on_the_other() {
    let a = app_or_skip!(app().await);
    let b = replica(&a).await;
    listening(&a).await;
    listening(&b).await;
    let (_, me) = a.call("GET", "/v1/me", Some(&token("eve")), None).await;
    let id = me["id"].as_str().unwrap().to_string();
    assert_eq!(plan(&a, "eve").await, "free");
    assert!(held(&a, "eve"));
    let (s, v) = b.call("POST", &format!("/v1/admin/users/{id}/disable"), Some(&token("root-admin")), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(entitlements(&b, "eve").await.0, StatusCode::FORBIDDEN);
    until("the other replica to refuse eve", Duration::from_secs(5), async || entitlements(&a, "eve").await.0 == StatusCode::FORBIDDEN)
        .await;
    let (s, _) = a.call("POST", &format!("/v1/admin/users/{id}/enable"), Some(&token("root-admin")), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(plan(&a, "eve").await, "free");
    until("eve enabled on the other replica", Duration::from_secs(5), async || entitlements(&b, "eve").await.0 == StatusCode::OK).await;

    assert_eq!(plan(&a, "eve").await, "free");
    assert!(held(&a, "eve"));
    let (s, _) = b.call("DELETE", "/v1/me", Some(&token("eve")), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    until("the deletion on the other replica", Duration::from_secs(5), async || entitlements(&a, "eve").await.0 == StatusCode::GONE).await;
    assert!(!held(&a, "eve") && !held(&b, "eve"));
}

#[tokio::test]
async fn a_change_made_by_hand_in_sql_is_announced_too() {
    let a = app_or_skip!(app().await);
    listening(&a).await;
    let (_, e) = entitlements(&a, "tom").await;
    assert_eq!(e["tz"], "UTC");
    assert!(held(&a, "tom"));
    sql(&a, "UPDATE users SET timezone = 'Europe/Paris', ver = ver + 1 WHERE external_id = 'tom'").await;
    until("the SQL change", Duration::from_secs(5), async || entitlements(&a, "tom").await.1["tz"] == "Europe/Paris").await;
    // Columns no cache reads announce nothing: the entry stays.
    assert_eq!(entitlements(&a, "tom").await.1["tz"], "Europe/Paris");
    assert!(held(&a, "tom"));
    sql(&a, "UPDATE users SET settings_seq = settings_seq + 1 WHERE external_id = 'tom'").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(held(&a, "tom"), "a settings sequence bump is not a user change");
}

#[tokio::test]
async fn without_its_listening_connection_a_replica_serves_nothing_from_the_cache() {
    let a = app_or_skip!(app().await);
    listening(&a).await;
    assert_eq!(plan(&a, "kim").await, "free");
    assert!(held(&a, "kim"));
    let name = tally_server::user_cache::APPLICATION_NAME;
    // Only this test's database: other tests' replicas listen on the same cluster.
    sql(
        &a,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{name}' AND datname = current_database()"
        ),
    )
    .await;
    until("the lost connection to be noticed", Duration::from_secs(10), async || !a.state.user_cache.is_live()).await;
    assert!(!held(&a, "kim"), "nothing is served while not listening");
    // A change made meanwhile is read from the database.
    sql(&a, "UPDATE users SET disabled_at = now() WHERE external_id = 'kim'").await;
    assert_eq!(entitlements(&a, "kim").await.0, StatusCode::FORBIDDEN);
    sql(&a, "UPDATE users SET disabled_at = NULL WHERE external_id = 'kim'").await;
    // It listens again by itself, and caches again.
    listening(&a).await;
    assert_eq!(plan(&a, "kim").await, "free");
    assert!(held(&a, "kim"));
}
