//! The secrets vault through the real router on a real Postgres (and the real binary for the
//! log and the rotation): sealing, limits, who may read, rows that cannot be moved, missing
//! keys, values that never leak, and rotation while the server serves.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tally_server::api_keys::Issuer;
use tally_server::vault::MasterKeys;

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

async fn vault_app(keys: &str) -> Option<TestApp> {
    let keys = keys.to_string();
    app_with(move |c| c.secret_keys = Some(keys)).await
}

/// A second server state over the database of `a` with other master keys (a replica, or the
/// same server restarted with a new `TALLY_SECRET_KEYS`).
async fn replica(a: &TestApp, keys: Option<&str>) -> axum::Router {
    let mut c = test_config(&a.url, a.dir.path());
    c.secret_keys = keys.map(str::to_string);
    tally_server::app(tally_server::AppState::new(c).await.expect("state"))
}

async fn call(r: &axum::Router, method: &str, path: &str, bearer: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
    use tower::ServiceExt;
    let mut b = axum::http::Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(t) = bearer {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let body = body.map(|v| serde_json::to_vec(&v).unwrap()).unwrap_or_default();
    let resp = r.clone().oneshot(b.body(axum::body::Body::from(body)).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_owner_stores_lists_reads_and_deletes_and_limits_hold() {
    let a = app_or_skip!(vault_app(&MasterKeys::generate("k1")).await);
    let ann = token("ann");
    let (s, put) = a.call("PUT", "/v1/secrets/github.token", Some(&ann), Some(json!({"value": "ghp_abc"}))).await;
    assert_eq!(s, StatusCode::OK, "{put}");
    assert_eq!((&put["name"], &put["key_id"]), (&json!("github.token"), &json!("k1")));
    assert!(put["updated_at"].is_string() && put.get("value").is_none());
    let (s, got) = a.call("GET", "/v1/secrets/github.token", Some(&ann), None).await;
    assert_eq!((s, &got["value"]), (StatusCode::OK, &json!("ghp_abc")));
    let (_, list) = a.call("GET", "/v1/secrets", Some(&ann), None).await;
    assert_eq!(list["secrets"].as_array().unwrap().len(), 1);
    assert!(list.to_string().find("ghp_abc").is_none(), "{list}");
    // Another user sees nothing of it.
    let (s, r) = a.call("GET", "/v1/secrets/github.token", Some(&token("bob")), None).await;
    assert_eq!((s, code(&r)), (StatusCode::NOT_FOUND, "unknown_secret"));
    // Bad names and values: 422, nothing stored.
    for (name, value, want) in [
        ("bad name", json!("v"), "invalid_secret_name"),
        (&"n".repeat(129), json!("v"), "invalid_secret_name"),
        ("big", json!("x".repeat(64 * 1024 + 1)), "secret_too_large"),
    ] {
        let path = format!("/v1/secrets/{}", name.replace(' ', "%20"));
        let (s, r) = a.call("PUT", &path, Some(&ann), Some(json!({"value": value}))).await;
        assert_eq!((s, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, want), "{name}");
    }
    let (s, _) = a.call("PUT", "/v1/secrets/max", Some(&ann), Some(json!({"value": "x".repeat(64 * 1024)}))).await;
    assert_eq!(s, StatusCode::OK, "64 KiB fits");
    for i in 2..100 {
        let (s, _) = a.call("PUT", &format!("/v1/secrets/n{i}"), Some(&ann), Some(json!({"value": "v"}))).await;
        assert_eq!(s, StatusCode::OK);
    }
    let (s, r) = a.call("PUT", "/v1/secrets/one-too-many", Some(&ann), Some(json!({"value": "v"}))).await;
    assert_eq!((s, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, "too_many_secrets"));
    let (s, _) = a.call("PUT", "/v1/secrets/n2", Some(&ann), Some(json!({"value": "replaced"}))).await;
    assert_eq!(s, StatusCode::OK, "replacing one at the limit is fine");
    assert_eq!(a.count("secrets").await, 100);
    assert_eq!(a.call("DELETE", "/v1/secrets/n2", Some(&ann), None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(a.call("DELETE", "/v1/secrets/n2", Some(&ann), None).await.0, StatusCode::NOT_FOUND);
    // Deleting the account deletes its secrets.
    assert_eq!(a.call("DELETE", "/v1/me", Some(&ann), None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(a.count("secrets").await, 0);
}

#[tokio::test]
async fn a_backend_reads_with_a_secrets_read_key_naming_the_subject() {
    let a = app_or_skip!(vault_app(&MasterKeys::generate("k1")).await);
    a.call("PUT", "/v1/secrets/stripe", Some(&token("cara")), Some(json!({"value": "sk_live_1"}))).await;
    // A secrets:read key comes from the operator's CLI (what `tally-server api-key create` calls).
    let operator_key = |scopes: &'static [&'static str]| {
        let a = &a;
        async move {
            let client = a.state.pool.get().await.unwrap();
            let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
            tally_server::api_keys::create(&client, Issuer::Operator, "b", &scopes, None).await.unwrap().1
        }
    };
    let reader = operator_key(&["secrets:read"]).await;
    let writer = operator_key(&["usage:write"]).await;
    let (s, r) = a.call("GET", "/v1/secrets/stripe?subject=cara", Some(&reader), None).await;
    assert_eq!((s, &r["value"]), (StatusCode::OK, &json!("sk_live_1")));
    let (s, r) = a.call("GET", "/v1/secrets/stripe?subject=cara", Some(&writer), None).await;
    assert_eq!((s, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"));
    let (s, r) = a.call("GET", "/v1/secrets/stripe", Some(&reader), None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{r}");
    let (s, r) = a.call("GET", "/v1/secrets/stripe?subject=nobody", Some(&reader), None).await;
    assert_eq!((s, code(&r)), (StatusCode::NOT_FOUND, "unknown_subject"));
    // Keys never write.
    let (s, _) = a.call("PUT", "/v1/secrets/stripe", Some(&reader), Some(json!({"value": "x"}))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A user cannot read another's by naming them.
    let (s, _) = a.call("GET", "/v1/secrets/stripe?subject=cara", Some(&token("dave")), None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn an_admin_cannot_mint_itself_a_secrets_read_key() {
    let a = app_or_skip!(vault_app(&MasterKeys::generate("k1")).await);
    a.call("PUT", "/v1/secrets/stripe", Some(&token("cara")), Some(json!({"value": "sk_live_1"}))).await;
    let admin_user = token("root-admin");
    let (s, k) = a.call("POST", "/v1/admin/api-keys", Some(&admin_user), Some(json!({"name": "ops", "scopes": ["admin"]}))).await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    let admin_key = k["secret"].as_str().unwrap().to_string();
    let keys_before = a.count("api_keys").await;
    for admin in [&admin_user, &admin_key] {
        for scopes in [json!(["secrets:read"]), json!(["usage:write", "secrets:read"]), json!(["admin", "secrets:read"])] {
            let (s, r) = a.call("POST", "/v1/admin/api-keys", Some(admin), Some(json!({"name": "mint", "scopes": scopes}))).await;
            assert_eq!((s, code(&r)), (StatusCode::FORBIDDEN, "scope_requires_operator"), "{scopes}: {r}");
            assert!(r["error"]["message"].as_str().unwrap().contains("tally-server api-key create"), "{r}");
            assert!(r.get("secret").is_none(), "{r}");
        }
    }
    assert_eq!(a.count("api_keys").await, keys_before, "no key was made");
    // An unknown scope is still 422, and the other scopes still come from the API.
    let (s, r) = a.call("POST", "/v1/admin/api-keys", Some(&admin_key), Some(json!({"name": "x", "scopes": ["secrets:write"]}))).await;
    assert_eq!((s, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_scope"), "{r}");
    let (s, k) =
        a.call("POST", "/v1/admin/api-keys", Some(&admin_key), Some(json!({"name": "u", "scopes": ["usage:write", "usage:read"]}))).await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    // The admin key itself reads no secret.
    let (s, r) = a.call("GET", "/v1/secrets/stripe?subject=cara", Some(&admin_key), None).await;
    assert_eq!((s, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{r}");
}

#[tokio::test]
async fn a_sealed_value_moved_to_another_row_does_not_open() {
    let a = app_or_skip!(vault_app(&MasterKeys::generate("k1")).await);
    let (ann, bob) = (token("ann"), token("bob"));
    a.call("PUT", "/v1/secrets/api", Some(&ann), Some(json!({"value": "ann-secret"}))).await;
    a.call("PUT", "/v1/secrets/api", Some(&bob), Some(json!({"value": "bob-secret"}))).await;
    a.call("PUT", "/v1/secrets/other", Some(&ann), Some(json!({"value": "ann-other"}))).await;
    let (client, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // Bob's row gets Ann's sealed value and wrapped key; so does Ann's other row.
    client
        .batch_execute(
            "UPDATE secrets s SET wrapped_key = o.wrapped_key, sealed = o.sealed FROM secrets o JOIN users u ON u.user_id = o.user_id \
             WHERE u.external_id = 'ann' AND o.name = 'api' AND ((s.name = 'api' AND s.user_id <> o.user_id) OR (s.name = 'other' AND s.user_id = o.user_id))",
        )
        .await
        .unwrap();
    for (who, name) in [(&bob, "api"), (&ann, "other")] {
        let (s, r) = a.call("GET", &format!("/v1/secrets/{name}"), Some(who), None).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{r}");
        assert!(!r.to_string().contains("secret"), "{r}");
    }
    assert_eq!(a.call("GET", "/v1/secrets/api", Some(&ann), None).await.1["value"], "ann-secret");
}

#[tokio::test]
async fn without_keys_the_routes_are_503_and_a_missing_key_is_named() {
    let k1 = MasterKeys::generate("k1");
    let a = app_or_skip!(vault_app(&k1).await);
    a.call("PUT", "/v1/secrets/api", Some(&token("ann")), Some(json!({"value": "v1"}))).await;
    let none = replica(&a, None).await;
    for (m, p) in [("GET", "/v1/secrets"), ("GET", "/v1/secrets/api"), ("DELETE", "/v1/secrets/api")] {
        let (s, r) = call(&none, m, p, Some(&token("ann")), None).await;
        assert_eq!((s, code(&r)), (StatusCode::SERVICE_UNAVAILABLE, "secrets_unconfigured"), "{m} {p}");
    }
    let (s, r) = call(&none, "PUT", "/v1/secrets/api", Some(&token("ann")), Some(json!({"value": "x"}))).await;
    assert_eq!((s, code(&r)), (StatusCode::SERVICE_UNAVAILABLE, "secrets_unconfigured"));
    let other = replica(&a, Some(&MasterKeys::generate("k2"))).await;
    let (s, r) = call(&other, "GET", "/v1/secrets/api", Some(&token("ann")), None).await;
    assert_eq!((s, code(&r)), (StatusCode::SERVICE_UNAVAILABLE, "secret_key_missing"));
    assert!(r["error"]["message"].as_str().unwrap().contains("k1"));
    let (s, l) = call(&other, "GET", "/v1/secrets", Some(&token("ann")), None).await;
    assert_eq!((s, &l["secrets"][0]["key_id"]), (StatusCode::OK, &json!("k1")));
    assert_eq!(a.call("GET", "/v1/secrets/api", Some(&token("ann")), None).await.1["value"], "v1", "nothing changed");
}

fn cli(url: &str, dir: &std::path::Path, keys: &str, batch: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tally-server"));
    cmd.args(["secrets", "rotate", "--batch", batch])
        .env("TALLY_DATABASE_URL", url)
        .env("TALLY_DATA_DIR", dir)
        .env("TALLY_SECRET_KEYS", keys)
        .env("TALLY_LOG", "warn")
        .stdin(std::process::Stdio::null());
    cmd
}

#[tokio::test]
async fn rotation_while_serving_never_fails_a_read_and_resumes_after_a_kill() {
    let (k1, k2) = (MasterKeys::generate("k1"), MasterKeys::generate("k2"));
    let a = app_or_skip!(vault_app(&k1).await);
    const USERS: usize = 120;
    const PER_USER: usize = 5;
    for u in 0..USERS {
        for n in 0..PER_USER {
            let (s, _) = a
                .call("PUT", &format!("/v1/secrets/s{n}"), Some(&token(&format!("u{u}"))), Some(json!({"value": format!("value-{u}-{n}")})))
                .await;
            assert_eq!(s, StatusCode::OK);
        }
    }
    // Step 1 of a rotation: every replica knows the new key (second), then makes it first.
    let serving = replica(&a, Some(&format!("{k2},{k1}"))).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut readers = Vec::new();
    for r in 0..4 {
        let (serving, stop, reads, failures) = (serving.clone(), stop.clone(), reads.clone(), failures.clone());
        readers.push(tokio::spawn(async move {
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                let (u, n) = (i % USERS, i % PER_USER);
                let (s, v) = call(&serving, "GET", &format!("/v1/secrets/s{n}"), Some(&token(&format!("u{u}"))), None).await;
                if s != StatusCode::OK || v["value"] != format!("value-{u}-{n}") {
                    eprintln!("read failed: {s} {v}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                reads.fetch_add(1, Ordering::Relaxed);
                i += 7;
            }
        }));
    }
    let keys = format!("{k2},{k1}");
    // One connection for the polls, so that a poll takes a round trip, not a connection setup.
    let (poller, conn) = tokio_postgres::connect(&a.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let poller = Arc::new(poller);
    let rotated = |_: &TestApp| {
        let poller = poller.clone();
        async move { poller.query_one("SELECT count(*) FROM secrets WHERE key_id = 'k2'", &[]).await.unwrap().get::<_, i64>(0) }
    };
    // A first run, killed part way.
    let mut child = cli(&a.url, a.dir.path(), &keys, "1").stdout(std::process::Stdio::null()).spawn().unwrap();
    let mut waited = 0;
    while rotated(&a).await == 0 && waited < 6000 {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        waited += 1;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let part = rotated(&a).await;
    assert!(part > 0 && part < (USERS * PER_USER) as i64, "the first run stopped part way ({part})");
    // A second run finishes the rest.
    let out =
        tokio::task::spawn_blocking(move || cli(&a.url.clone(), a.dir.path(), &keys, "7").output().map(|o| (o, a))).await.unwrap().unwrap();
    let (out, a) = out;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("under k2"), "{said}");
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(rotated(&a).await, (USERS * PER_USER) as i64);
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no read failed during the rotation");
    eprintln!("resumed after {part} rows; {} reads during the rotation", reads.load(Ordering::Relaxed));
    // The old key can go now.
    let only_new = replica(&a, Some(&k2)).await;
    let (s, v) = call(&only_new, "GET", "/v1/secrets/s3", Some(&token("u7")), None).await;
    assert_eq!((s, &v["value"]), (StatusCode::OK, &json!("value-7-3")));
}

#[tokio::test]
async fn a_value_never_appears_in_the_log_or_in_any_answer_but_its_own_read() {
    let Some(url) = fresh_db().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let keys = MasterKeys::generate("k1");
    let mut cmd = Server::command(
        Some(&url),
        &dir.path().join("data"),
        &[("TALLY_SECRET_KEYS", &keys), ("TALLY_LOG", "debug"), ("TALLY_ADMIN_SUBJECTS", "root-admin")],
    );
    cmd.stderr(std::process::Stdio::from(log));
    let server = Server::spawn(cmd);
    const MARK: &str = "MARKER-7f3a9c-do-not-leak";
    let http = reqwest::Client::new();
    let mut answers = String::new();
    let user = token("lena");
    let admin = token("root-admin");
    let send = |method: &str, path: &str, bearer: &str, body: Option<String>| {
        let mut r = http.request(method.parse().unwrap(), format!("{}{path}", server.base)).bearer_auth(bearer);
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b);
        }
        r.send()
    };
    let ok = send("PUT", "/v1/secrets/token", &user, Some(json!({"value": MARK}).to_string())).await.unwrap();
    assert_eq!(ok.status(), 200);
    answers.push_str(&ok.text().await.unwrap());
    let got = send("GET", "/v1/secrets/token", &user, None).await.unwrap().text().await.unwrap();
    assert!(got.contains(MARK), "the owner reads it: {got}");
    // Every other route, and failures that carry the value.
    let bad_bodies = [
        format!("{{\"value\": \"{MARK}"),
        json!({"value": MARK, "extra": MARK}).to_string(),
        json!({"value": [MARK]}).to_string(),
        json!({"value": format!("{MARK}{}", "x".repeat(70_000))}).to_string(),
        json!({"value": format!("{MARK}\u{0}")}).to_string(),
    ];
    for b in bad_bodies {
        let r = send("PUT", "/v1/secrets/token", &user, Some(b)).await.unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
        answers.push_str(&r.text().await.unwrap());
    }
    let r = send("PUT", "/v1/secrets/bad!name", &user, Some(json!({"value": MARK}).to_string())).await.unwrap();
    answers.push_str(&r.text().await.unwrap());
    let me = send("GET", "/v1/me", &user, None).await.unwrap().json::<Value>().await.unwrap();
    let uid = me["id"].as_str().unwrap().to_string();
    let mut statuses = Vec::new();
    for (m, p, b) in [
        ("GET", "/v1/secrets".to_string(), &user),
        ("GET", "/v1/me".to_string(), &user),
        ("GET", "/v1/me/export".to_string(), &user),
        ("GET", "/v1/entitlements".to_string(), &user),
        ("GET", "/v1/settings".to_string(), &user),
        ("GET", format!("/v1/admin/users/{uid}/usage"), &admin),
        ("POST", format!("/v1/admin/users/{uid}/disable"), &admin),
        ("GET", "/v1/secrets/token".to_string(), &user),
        ("POST", format!("/v1/admin/users/{uid}/enable"), &admin),
        ("GET", "/metrics".to_string(), &user),
    ] {
        let r = send(m, &p, b, None).await.unwrap();
        statuses.push((p, r.status().as_u16()));
        answers.push_str(&r.text().await.unwrap());
    }
    assert!(statuses.iter().all(|(p, s)| *s == 200 || (p == "/v1/secrets/token" && *s == 403)), "{statuses:?}");
    let r = send("POST", "/v1/sync", &user, Some(json!({"protocol": 1, "device_id": "d1", "events": []}).to_string())).await.unwrap();
    answers.push_str(&r.text().await.unwrap());
    drop(server);
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(logged.contains("/v1/secrets/token"), "the log is captured: {logged}");
    assert!(!answers.contains(MARK), "an answer leaked the value: {answers}");
    let leaks: Vec<&str> = logged.lines().filter(|l| l.contains(MARK)).collect();
    assert!(leaks.is_empty(), "the log leaked the value: {leaks:#?}");
    // Nor is it stored in the clear.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    for r in client.query("SELECT wrapped_key, sealed FROM secrets", &[]).await.unwrap() {
        for col in [0, 1] {
            let bytes: Vec<u8> = r.get(col);
            assert!(!bytes.windows(MARK.len()).any(|w| w == MARK.as_bytes()));
        }
    }
}

#[tokio::test]
async fn a_password_account_stores_secrets_only_once_its_email_is_verified() {
    let sink = SmtpSink::start().await;
    let keys = MasterKeys::generate("k1");
    let a = app_or_skip!(
        app_with(|c| {
            password_auth(c, &sink);
            c.secret_keys = Some(keys);
        })
        .await
    );
    let (st, s, _) = a
        .call_from("203.0.113.9:4000", "POST", "/v1/auth/signup", json!({"email": "sue@example.com", "password": "correct horse battery"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{s}");
    let put = |bearer: String| {
        let a = &a;
        async move { a.call("PUT", "/v1/secrets/github.token", Some(&bearer), Some(json!({"value": "ghp_abc"}))).await }
    };
    let (st, r) = put(s["access_token"].as_str().unwrap().to_string()).await;
    assert_eq!((st, code(&r)), (StatusCode::FORBIDDEN, "email_unverified"), "{r}");
    assert_eq!(a.count("secrets").await, 0, "nothing stored");
    let (st, _) = a.call("POST", "/v1/auth/verify", None, Some(json!({"token": mailed_token(&sink.wait_for(1).await)}))).await;
    assert_eq!(st, StatusCode::OK);
    let (_, l, _) = a
        .call_from("203.0.113.9:4000", "POST", "/v1/auth/login", json!({"email": "sue@example.com", "password": "correct horse battery"}))
        .await;
    let (st, r) = put(l["access_token"].as_str().unwrap().to_string()).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    // An identity provider's user is vouched for by the provider.
    assert_eq!(put(token("ann")).await.0, StatusCode::OK);
}
