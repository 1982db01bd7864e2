//! Own accounts through the real router on a real Postgres: sign-up, verification, login
//! failures and their limits, refresh rotation, password reset, disabled accounts, and the
//! line between access tokens and entitlements tokens.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};

const ADDR: &str = "203.0.113.7:5000";

async fn password_app(sink: &SmtpSink) -> Option<TestApp> {
    app_with(|c| password_auth(c, sink)).await
}

/// Another replica of `a` (or `a` restarted) with password accounts on.
async fn password_replica(a: &TestApp, sink: &SmtpSink) -> TestApp {
    a.replica_with(|c| password_auth(c, sink)).await
}

async fn signup(a: &TestApp, email: &str, password: &str) -> Value {
    let (s, body, _) = a.call_from(ADDR, "POST", "/v1/auth/signup", json!({"email": email, "password": password})).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    body
}

async fn login(a: &TestApp, from: &str, email: &str, password: &str) -> (StatusCode, Value, axum::http::HeaderMap) {
    a.call_from(from, "POST", "/v1/auth/login", json!({"email": email, "password": password})).await
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn signup_answers_a_session_whose_access_token_works_and_bad_input_changes_nothing() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let s = signup(&a, "Ann@Example.com", "correct horse battery").await;
    for k in ["access_token", "refresh_token", "expires_in", "user"] {
        assert!(!s[k].is_null(), "{k} missing: {s}");
    }
    assert_eq!(s["expires_in"], 900);
    let id = s["user"]["id"].as_str().unwrap();
    assert_eq!(s["user"]["external_id"], format!("tally|{id}"));
    let header = jsonwebtoken::decode_header(s["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    let (st, me) = a.call("GET", "/v1/me", s["access_token"].as_str(), None).await;
    assert_eq!(st, StatusCode::OK, "{me}");
    assert_eq!(me["id"], id);
    // Emails are unique regardless of case.
    let (st, body, _) =
        a.call_from(ADDR, "POST", "/v1/auth/signup", json!({"email": "ann@EXAMPLE.com", "password": "another password"})).await;
    assert_eq!((st, code(&body)), (StatusCode::CONFLICT, "email_taken"));
    // Bad input: a clear 4xx and no row.
    let users = a.count("users").await;
    for (body, want) in [
        (json!({"email": "not-an-email", "password": "long enough pw"}), "invalid_email"),
        (json!({"email": "b@example.com", "password": "short"}), "invalid_password"),
        (json!({"email": "b@example.com", "password": "x".repeat(257)}), "invalid_password"),
        (json!({"email": "b@example.com"}), "invalid_body"),
    ] {
        let (st, r, _) = a.call_from(ADDR, "POST", "/v1/auth/signup", body).await;
        assert_eq!((st, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, want), "{r}");
    }
    assert_eq!(a.count("users").await, users);
    assert_eq!(a.count("password_credentials").await, 1);
    // The stored password is an Argon2id hash, never the password.
    assert_eq!(a.scalar("SELECT count(*) FROM password_credentials WHERE password_hash LIKE '$argon2id$%'").await, 1);
    // The verification mail went out.
    let mail = sink.wait_for(1).await;
    assert!(mail.contains("Ann@Example.com") && mail.contains("Confirm your email"), "{mail}");
}

#[tokio::test]
async fn a_verification_token_works_once_and_expires() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    signup(&a, "vera@example.com", "correct horse battery").await;
    let token = mailed_token(&sink.wait_for(1).await);
    let (s, u) = a.call("POST", "/v1/auth/verify", None, Some(json!({"token": token}))).await;
    assert_eq!(s, StatusCode::OK, "{u}");
    assert_eq!(a.scalar("SELECT count(*) FROM users WHERE email_verified").await, 1);
    let (s, again) = a.call("POST", "/v1/auth/verify", None, Some(json!({"token": token}))).await;
    assert_eq!((s, code(&again)), (StatusCode::BAD_REQUEST, "token_used"));
    let (s, unknown) = a.call("POST", "/v1/auth/verify", None, Some(json!({"token": "00".repeat(24)}))).await;
    assert_eq!((s, code(&unknown)), (StatusCode::BAD_REQUEST, "unknown_token"));
    // A second account's token expires after 24 hours.
    signup(&a, "late@example.com", "correct horse battery").await;
    let late = mailed_token(&sink.wait_for(2).await);
    a.clock.advance(chrono::Duration::hours(25));
    let (s, expired) = a.call("POST", "/v1/auth/verify", None, Some(json!({"token": late}))).await;
    assert_eq!((s, code(&expired)), (StatusCode::BAD_REQUEST, "token_expired"));
    assert_eq!(a.scalar("SELECT count(*) FROM users WHERE email_verified").await, 1, "nothing changed");
}

#[tokio::test]
async fn wrong_password_and_unknown_email_give_the_same_answer() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    signup(&a, "wes@example.com", "correct horse battery").await;
    let (s1, wrong, _) = login(&a, ADDR, "wes@example.com", "incorrect horse").await;
    let (s2, unknown, _) = login(&a, ADDR, "nobody@example.com", "incorrect horse").await;
    let (s3, huge, _) = login(&a, ADDR, "wes@example.com", &"x".repeat(10_000)).await;
    assert_eq!(s1, StatusCode::UNAUTHORIZED);
    assert_eq!((s1, &wrong), (s2, &unknown));
    assert_eq!((s1, &wrong), (s3, &huge));
    assert_eq!(code(&wrong), "invalid_credentials");
    let (s, ok, _) = login(&a, ADDR, "WES@example.com", "correct horse battery").await;
    assert_eq!(s, StatusCode::OK, "{ok}");
    assert!(ok["access_token"].is_string() && ok["refresh_token"].is_string());
}

#[tokio::test]
async fn repeated_failures_are_429_for_that_email_and_address_only() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    signup(&a, "rita@example.com", "correct horse battery").await;
    for _ in 0..10 {
        let (s, _, _) = login(&a, ADDR, "rita@example.com", "guess guess").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, body, h) = login(&a, ADDR, "rita@example.com", "correct horse battery").await;
    assert_eq!((s, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"), "{body}");
    let retry: u64 = h.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 900, "{retry}");
    // The owner from another address is not locked out.
    let (s, _, _) = login(&a, "198.51.100.1:1", "rita@example.com", "correct horse battery").await;
    assert_eq!(s, StatusCode::OK);
    // After the window the first address may try again.
    a.clock.advance(chrono::Duration::minutes(16));
    let (s, _, _) = login(&a, ADDR, "rita@example.com", "correct horse battery").await;
    assert_eq!(s, StatusCode::OK);
    // 50 failures from one address across emails lock that address.
    for i in 0..50 {
        let (s, _, _) = login(&a, "192.0.2.9:1", &format!("u{i}@example.com"), "guess guess").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    assert_eq!(login(&a, "192.0.2.9:1", "fresh@example.com", "guess guess").await.0, StatusCode::TOO_MANY_REQUESTS);
}

fn retry_after(h: &axum::http::HeaderMap) -> u64 {
    h.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn failure_counts_are_shared_by_replicas_and_survive_a_restart() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let b = password_replica(&a, &sink).await;
    signup(&a, "remy@example.com", "correct horse battery").await;
    // Ten failures of one email from one address, spread over two replicas.
    for replica in [&a, &b, &a, &b, &a, &b, &a, &b, &a, &b] {
        assert_eq!(login(replica, ADDR, "remy@example.com", "guess guess").await.0, StatusCode::UNAUTHORIZED);
    }
    for replica in [&a, &b] {
        let (s, body, h) = login(replica, ADDR, "remy@example.com", "correct horse battery").await;
        assert_eq!((s, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"), "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
        assert!((1..=900).contains(&retry_after(&h)), "{h:?}");
    }
    // A restarted server (a new state on the same database) still refuses.
    drop(b);
    let restarted = password_replica(&a, &sink).await;
    drop(a);
    let (s, _, _) = login(&restarted, ADDR, "remy@example.com", "correct horse battery").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // Retry-After is the time until the oldest counted failure leaves the 15-minute window.
    let frozen = restarted.clock.freeze();
    let oldest = restarted
        .scalar("SELECT (extract(epoch FROM min(failed_at)) * 1000000)::bigint FROM login_failures WHERE kind = 'email_address'")
        .await;
    let (_, _, h) = login(&restarted, ADDR, "remy@example.com", "correct horse battery").await;
    let want = (oldest + 900_000_000 - frozen.timestamp_micros() + 999_999) / 1_000_000;
    assert_eq!(retry_after(&h) as i64, want.max(1));
    restarted.clock.advance(chrono::Duration::minutes(15));
    assert_eq!(login(&restarted, ADDR, "remy@example.com", "correct horse battery").await.0, StatusCode::OK);
    // Expired failures are pruned: only what the window holds is kept.
    assert_eq!(login(&restarted, ADDR, "remy@example.com", "guess guess").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(restarted.count("login_failures").await, 3, "one failure: its (email, address), address and account counts");
}

#[tokio::test]
async fn parallel_guesses_on_two_replicas_get_no_more_tries_than_the_limit() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let b = password_replica(&a, &sink).await;
    signup(&a, "pia@example.com", "correct horse battery").await;
    let guesses = (0..30).map(|i| login(if i % 2 == 0 { &a } else { &b }, ADDR, "pia@example.com", "guess guess"));
    let mut statuses: Vec<u16> = futures::future::join_all(guesses).await.iter().map(|(s, _, _)| s.as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [[401; 10].as_slice(), &[429; 20]].concat(), "each attempt is counted before its password is checked");
}

#[tokio::test]
async fn a_distributed_guess_is_limited_per_account_without_locking_out_an_address_that_signed_in() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    const HOME: &str = "198.51.100.20:443";
    const STALE: &str = "198.51.100.30:443";
    signup(&a, "olga@example.com", "correct horse battery").await;
    // Verified: an account left unverified for 7 days is deleted, and this test spans 31.
    let (st, _) = a.call("POST", "/v1/auth/verify", None, Some(json!({"token": mailed_token(&sink.wait_for(1).await)}))).await;
    assert_eq!(st, StatusCode::OK);
    // The owner signed in from STALE 31 days ago and from HOME yesterday.
    assert_eq!(login(&a, STALE, "olga@example.com", "correct horse battery").await.0, StatusCode::OK);
    a.clock.advance(chrono::Duration::days(30));
    assert_eq!(login(&a, HOME, "olga@example.com", "correct horse battery").await.0, StatusCode::OK);
    a.clock.advance(chrono::Duration::days(1));
    // 100 failures of the account from 100 addresses (the email in any case).
    for i in 0..100 {
        let from = format!("10.0.{}.{}:1000", i / 200, i % 200 + 1);
        let email = if i % 2 == 0 { "olga@example.com" } else { "OLGA@Example.COM" };
        let (s, body, _) = login(&a, &from, email, "guess guess").await;
        assert_eq!((s, code(&body)), (StatusCode::UNAUTHORIZED, "invalid_credentials"), "attempt {i}: {body}");
    }
    // A stranger's next address is refused, with the right password too, and counts nothing.
    let (s, body, h) = login(&a, "10.9.9.9:1", "olga@example.com", "guess guess").await;
    assert_eq!((s, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"), "{body}");
    assert!((1..=900).contains(&retry_after(&h)), "{h:?}");
    let before = a.count("login_failures").await;
    assert_eq!(login(&a, "10.9.9.9:1", "olga@example.com", "correct horse battery").await.0, StatusCode::TOO_MANY_REQUESTS);
    // An address that signed in more than 30 days ago is a stranger's.
    assert_eq!(login(&a, STALE, "olga@example.com", "correct horse battery").await.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.count("login_failures").await, before, "refused attempts count nothing");
    // The owner's address still gets through: a wrong password is invalid_credentials and counts,
    let (s, body, _) = login(&a, HOME, "olga@example.com", "guess guess").await;
    assert_eq!((s, code(&body)), (StatusCode::UNAUTHORIZED, "invalid_credentials"), "{body}");
    assert_eq!(a.count("login_failures").await, before + 3);
    // the right one signs in.
    let (s, body, _) = login(&a, HOME, "olga@example.com", "correct horse battery").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // A password reset clears the account's count: the stranger's address may try again.
    let (s, _) = a.call("POST", "/v1/auth/password/forgot", None, Some(json!({"email": "olga@example.com"}))).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let token = mailed_token(&sink.wait_for(2).await);
    let (s, _) = a.call("POST", "/v1/auth/password/reset", None, Some(json!({"token": token, "password": "a brand new password"}))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, body, _) = login(&a, "10.9.9.9:1", "olga@example.com", "a brand new password").await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn refresh_rotates_a_reuse_within_30_s_gives_the_same_successor_and_a_later_one_revokes_the_family() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let first = signup(&a, "rob@example.com", "correct horse battery").await["refresh_token"].as_str().unwrap().to_string();
    let refresh = |t: &str| a.call("POST", "/v1/auth/refresh", None, Some(json!({"refresh_token": t})));
    let (s, r1) = refresh(&first).await;
    assert_eq!(s, StatusCode::OK, "{r1}");
    let second = r1["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    assert_eq!(a.call("GET", "/v1/me", r1["access_token"].as_str(), None).await.0, StatusCode::OK);
    // A lost answer: the same token again within 30 s gives the same successor.
    a.clock.advance(chrono::Duration::seconds(20));
    let (s, again) = refresh(&first).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["refresh_token"], second.as_str());
    // Tokens are stored hashed only.
    let stored = a.scalar(&format!("SELECT count(*) FROM refresh_tokens WHERE token_hash IN ('{first}', '{second}')")).await;
    assert_eq!(stored, 0);
    // A reuse after 30 s revokes the whole family, the successor included.
    a.clock.advance(chrono::Duration::seconds(11));
    let (s, reused) = refresh(&first).await;
    assert_eq!((s, code(&reused)), (StatusCode::UNAUTHORIZED, "refresh_token_reused"));
    let (s, dead) = refresh(&second).await;
    assert_eq!((s, code(&dead)), (StatusCode::UNAUTHORIZED, "refresh_token_revoked"));
    // Logout ends a session; an unknown token is refused.
    let (_, l, _) = login(&a, ADDR, "rob@example.com", "correct horse battery").await;
    let rt = l["refresh_token"].as_str().unwrap();
    assert_eq!(a.call("POST", "/v1/auth/logout", None, Some(json!({"refresh_token": rt}))).await.0, StatusCode::NO_CONTENT);
    assert_eq!(code(&refresh(rt).await.1), "refresh_token_revoked");
    assert_eq!(code(&refresh("rt_nope").await.1), "invalid_refresh_token");
    // A refresh token lives 30 days.
    let (_, l, _) = login(&a, ADDR, "rob@example.com", "correct horse battery").await;
    a.clock.advance(chrono::Duration::days(31));
    assert_eq!(code(&refresh(l["refresh_token"].as_str().unwrap()).await.1), "refresh_token_expired");
}

#[tokio::test]
async fn a_reset_token_works_once_and_ends_every_session() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let s = signup(&a, "ria@example.com", "correct horse battery").await;
    sink.wait_for(1).await;
    let (_, other, _) = login(&a, ADDR, "ria@example.com", "correct horse battery").await;
    // Unknown emails get the same 202 and no mail.
    let (st, _) = a.call("POST", "/v1/auth/password/forgot", None, Some(json!({"email": "ghost@example.com"}))).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, _) = a.call("POST", "/v1/auth/password/forgot", None, Some(json!({"email": "RIA@example.com"}))).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let mail = sink.wait_for(2).await;
    assert!(mail.contains("Reset your password"), "{mail}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(sink.mails().len(), 2, "no mail for an unknown email");
    let token = mailed_token(&mail);
    // A too short password is refused and does not use the token.
    let (st, r) = a.call("POST", "/v1/auth/password/reset", None, Some(json!({"token": token, "password": "short"}))).await;
    assert_eq!((st, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_password"));
    let (st, _) = a.call("POST", "/v1/auth/password/reset", None, Some(json!({"token": token, "password": "a brand new password"}))).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, r) = a.call("POST", "/v1/auth/password/reset", None, Some(json!({"token": token, "password": "yet another password"}))).await;
    assert_eq!((st, code(&r)), (StatusCode::BAD_REQUEST, "token_used"));
    for rt in [&s["refresh_token"], &other["refresh_token"]] {
        let (st, r) = a.call("POST", "/v1/auth/refresh", None, Some(json!({"refresh_token": rt}))).await;
        assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "refresh_token_revoked"));
    }
    assert_eq!(login(&a, ADDR, "ria@example.com", "correct horse battery").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(login(&a, ADDR, "ria@example.com", "a brand new password").await.0, StatusCode::OK);
    // The mail reached its owner: the email counts as verified.
    assert_eq!(a.scalar("SELECT count(*) FROM password_credentials WHERE email_verified_at IS NOT NULL").await, 1);
}

#[tokio::test]
async fn a_disabled_account_is_403_everywhere_until_enabled() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let s = signup(&a, "dan@example.com", "correct horse battery").await;
    let id = s["user"]["id"].as_str().unwrap();
    let at = s["access_token"].as_str().unwrap();
    let admin = token("root-admin");
    // An identity-provider user too.
    let idp = token("idp-dora");
    let (_, dora) = a.call("GET", "/v1/me", Some(&idp), None).await;
    let dora_id = dora["id"].as_str().unwrap();
    // Non-admins are refused.
    assert_eq!(a.call("POST", &format!("/v1/admin/users/{id}/disable"), Some(at), None).await.0, StatusCode::FORBIDDEN);
    for uid in [id, dora_id] {
        let (st, u) = a.call("POST", &format!("/v1/admin/users/{uid}/disable"), Some(&admin), None).await;
        assert_eq!(st, StatusCode::OK, "{u}");
        assert!(u["disabled_at"].is_string());
    }
    for (bearer, method, path) in
        [(at, "GET", "/v1/me"), (at, "GET", "/v1/entitlements"), (idp.as_str(), "GET", "/v1/me"), (idp.as_str(), "GET", "/v1/settings")]
    {
        let (st, r) = a.call(method, path, Some(bearer), None).await;
        assert_eq!((st, code(&r)), (StatusCode::FORBIDDEN, "account_disabled"), "{path}");
    }
    let (st, r) = a.sync(at, "dev-1", vec![]).await;
    assert_eq!((st, code(&r)), (StatusCode::FORBIDDEN, "account_disabled"));
    // The right password: 403; a wrong one stays invalid_credentials.
    let (st, r, _) = login(&a, ADDR, "dan@example.com", "correct horse battery").await;
    assert_eq!((st, code(&r)), (StatusCode::FORBIDDEN, "account_disabled"));
    let (st, r, _) = login(&a, ADDR, "dan@example.com", "wrong wrong wrong").await;
    assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    let (st, r) = a.call("POST", "/v1/auth/refresh", None, Some(json!({"refresh_token": s["refresh_token"]}))).await;
    assert_eq!((st, code(&r)), (StatusCode::FORBIDDEN, "account_disabled"));
    assert_eq!(a.scalar("SELECT count(*) FROM refresh_families WHERE revoked_at IS NULL").await, 0, "sessions died");
    // Nothing was deleted; enabling restores access (ended sessions stay ended).
    assert_eq!(a.count("users").await, 3);
    let (st, u) = a.call("POST", &format!("/v1/admin/users/{id}/enable"), Some(&admin), None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(u.get("disabled_at").is_none());
    assert_eq!(a.call("GET", "/v1/me", Some(at), None).await.0, StatusCode::OK);
    assert_eq!(login(&a, ADDR, "dan@example.com", "correct horse battery").await.0, StatusCode::OK);
    let (st, r) = a.call("POST", "/v1/auth/refresh", None, Some(json!({"refresh_token": s["refresh_token"]}))).await;
    assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "refresh_token_revoked"));
    assert_eq!(a.call("POST", "/v1/admin/users/not-a-uuid/disable", Some(&admin), None).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_signup_claims_a_pending_user_only_once_verified_and_never_merges_with_an_idp_user() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let admin = token("root-admin");
    let (st, pending) =
        a.call("POST", "/v1/admin/users", Some(&admin), Some(json!({"email": "Pia@example.com", "timezone": "Asia/Tokyo"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{pending}");
    let s = signup(&a, "pia@EXAMPLE.com", "correct horse battery").await;
    assert_ne!(s["user"]["id"], pending["id"], "not claimed before verification");
    assert_eq!(s["user"]["timezone"], "UTC");
    let (st, u) = a.call("POST", "/v1/auth/verify", None, Some(json!({"token": mailed_token(&sink.wait_for(1).await)}))).await;
    assert_eq!(st, StatusCode::OK, "{u}");
    assert_eq!(u["id"], pending["id"], "claimed on verification");
    assert_eq!(u["external_id"], format!("tally|{}", pending["id"].as_str().unwrap()));
    // The first verification ended the sessions made before it; a new one is the claimed account.
    let (st, r) = a.call("POST", "/v1/auth/refresh", None, Some(json!({"refresh_token": s["refresh_token"]}))).await;
    assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "refresh_token_revoked"));
    let (_, r, _) = login(&a, ADDR, "pia@example.com", "correct horse battery").await;
    let (_, me) = a.call("GET", "/v1/me", r["access_token"].as_str(), None).await;
    assert_eq!((&me["id"], &me["timezone"]), (&pending["id"], &json!("Asia/Tokyo")));
    // The account made at sign-up is gone; its access token no longer works.
    let (st, _) = a.call("GET", "/v1/me", s["access_token"].as_str(), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(a.count("users").await, 2, "the pending user and the admin");
    // An identity-provider user with the same verified email is another account.
    let idp = token_with("idp-pia", json!({"email": "pia@example.com", "email_verified": true}));
    let (_, me) = a.call("GET", "/v1/me", Some(&idp), None).await;
    assert_ne!(me["id"], pending["id"]);
    let (st, r, _) = login(&a, ADDR, "pia@example.com", "correct horse battery").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(r["user"]["id"], pending["id"]);
}

#[tokio::test]
async fn idp_subjects_in_the_password_namespace_are_refused() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let s = signup(&a, "sam@example.com", "correct horse battery").await;
    let forged = token(s["user"]["external_id"].as_str().unwrap());
    let (st, r) = a.call("GET", "/v1/me", Some(&forged), None).await;
    assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "reserved_subject"));
}

#[tokio::test]
async fn password_routes_are_off_unless_enabled() {
    let a = app_or_skip!(app().await);
    let (st, r, _) = login(&a, ADDR, "a@example.com", "whatever whatever").await;
    assert_eq!((st, code(&r)), (StatusCode::NOT_FOUND, "password_auth_disabled"));
    assert_eq!(a.count("users").await, 0);
}

/// Serves `jwks` on 127.0.0.1 and returns its URL: an identity provider that publishes the
/// server's own keys, the worst case for telling tokens apart.
async fn serve_jwks(jwks: Value) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    let app = axum::Router::new().route("/jwks", axum::routing::get(move || async move { axum::Json(jwks) }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn an_entitlements_token_is_never_a_credential() {
    let sink = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let signer = tally_server::signing::Signer::load_or_create(&dir.path().join("keys")).unwrap();
    let jwks = serve_jwks(signer.jwks()).await;
    let data_dir = dir.path().to_path_buf();
    // The identity provider's settings name the entitlements token's issuer and audience.
    let a = app_or_skip!(
        app_with(|c| {
            password_auth(c, &sink);
            c.data_dir = data_dir;
            c.jwks_url = Some(jwks);
            c.jwt_issuer = Some("tally".into());
            c.jwt_audience = Some("tally".into());
        })
        .await
    );
    let s = signup(&a, "eve@example.com", "correct horse battery").await;
    let (st, ent) = a.call("GET", "/v1/entitlements", s["access_token"].as_str(), None).await;
    assert_eq!(st, StatusCode::OK);
    let ent_token = ent["token"].as_str().unwrap();
    let (st, r) = a.call("GET", "/v1/me", Some(ent_token), None).await;
    assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "not_an_access_token"), "{r}");
    // A server-signed at+jwt with another audience or issuer is refused too.
    let now = chrono::Utc::now().timestamp();
    let sub = s["user"]["external_id"].as_str().unwrap();
    for (aud, iss, want) in [("tally", "tally", "invalid_audience"), ("tally-api", "elsewhere", "invalid_issuer")] {
        let claims = json!({"iss": iss, "aud": aud, "sub": sub, "iat": now, "exp": now + 600, "jti": uuid::Uuid::new_v4()});
        let t = a.state.signer.sign_typed(&claims, "at+jwt").unwrap();
        let (st, r) = a.call("GET", "/v1/me", Some(&t), None).await;
        assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, want));
    }
    // An access token expires by the server's clock.
    a.clock.advance(chrono::Duration::seconds(900 + 61));
    let (st, r) = a.call("GET", "/v1/me", s["access_token"].as_str(), None).await;
    assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "token_expired"));
}

#[tokio::test]
async fn the_test_cluster_folds_case_like_production() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    // Under a UTF-8 locale, as production clusters run, lower() folds the Kelvin sign to `k`:
    // comparing emails with lower() would let a look-alike squat a real address.
    assert_eq!(a.scalar("SELECT count(*) WHERE lower(U&'\\212A') = 'k'").await, 1);
}

#[tokio::test]
async fn a_look_alike_email_cannot_squat_a_real_one() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    // The Kelvin sign and fullwidth letters are refused, and nothing is stored.
    for squat in ["\u{212A}ate@example.com", "\u{FF4B}\u{FF41}\u{FF54}\u{FF45}@example.com"] {
        let (st, r, _) = a.call_from(ADDR, "POST", "/v1/auth/signup", json!({"email": squat, "password": "squatter password"})).await;
        assert_eq!((st, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_email"), "{squat}: {r}");
    }
    assert_eq!(a.count("users").await, 0);
    // Kate signs up and logs in to her own account; the look-alike opens nothing.
    let kate = signup(&a, "kate@example.com", "kate's own password").await;
    let (st, r, _) = login(&a, ADDR, "kate@example.com", "kate's own password").await;
    assert_eq!((st, &r["user"]["id"]), (StatusCode::OK, &kate["user"]["id"]), "{r}");
    let (st, r, _) = login(&a, ADDR, "\u{212A}ate@example.com", "kate's own password").await;
    assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
}

#[tokio::test]
async fn nfc_and_nfd_spellings_and_an_idn_domain_in_unicode_or_punycode_are_one_account() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let nfd = signup(&a, "re\u{301}mi@example.com", "correct horse battery").await;
    let idn = signup(&a, "ann@B\u{FC}cher.example", "correct horse battery").await;
    for (taken, owner) in [("r\u{E9}mi@example.com", &nfd), ("ANN@xn--bcher-kva.example", &idn), ("ann@b\u{FC}cher.EXAMPLE", &idn)] {
        let (st, r, _) = a.call_from(ADDR, "POST", "/v1/auth/signup", json!({"email": taken, "password": "another password"})).await;
        assert_eq!((st, code(&r)), (StatusCode::CONFLICT, "email_taken"), "{taken}");
        let (st, r, _) = login(&a, ADDR, taken, "correct horse battery").await;
        assert_eq!((st, &r["user"]["id"]), (StatusCode::OK, &owner["user"]["id"]), "{taken}: {r}");
    }
    assert_eq!(a.count("password_credentials").await, 2);
    // Only ASCII letters are case-folded: É and é are two addresses.
    signup(&a, "\u{C9}mile@example.com", "correct horse battery").await;
    signup(&a, "\u{E9}mile@example.com", "correct horse battery").await;
}

#[tokio::test]
async fn an_older_reset_token_dies_when_a_newer_one_sets_the_password() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    signup(&a, "olga@example.com", "correct horse battery").await;
    sink.wait_for(1).await;
    for n in [2, 3] {
        a.call("POST", "/v1/auth/password/forgot", None, Some(json!({"email": "olga@example.com"}))).await;
        sink.wait_for(n).await;
    }
    let (older, newer) = (mailed_token(&sink.mails()[1]), mailed_token(&sink.mails()[2]));
    let (st, _) = a.call("POST", "/v1/auth/password/reset", None, Some(json!({"token": newer, "password": "the newest password"}))).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, r) = a.call("POST", "/v1/auth/password/reset", None, Some(json!({"token": older, "password": "an older idea"}))).await;
    assert_eq!((st, code(&r)), (StatusCode::BAD_REQUEST, "token_used"), "{r}");
    assert_eq!(login(&a, ADDR, "olga@example.com", "the newest password").await.0, StatusCode::OK);
    assert_eq!(login(&a, ADDR, "olga@example.com", "an older idea").await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn keys_wait_for_a_verified_email_and_verification_and_reset_revoke_sessions_and_keys() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let s = signup(&a, "vic@example.com", "correct horse battery").await;
    sqlx(&a, "UPDATE users SET is_admin = true").await;
    let at = s["access_token"].as_str().unwrap();
    let new_key = json!({"name": "backend", "scopes": ["usage:write"]});
    let (st, r) = a.call("POST", "/v1/admin/api-keys", Some(at), Some(new_key.clone())).await;
    assert_eq!((st, code(&r)), (StatusCode::FORBIDDEN, "email_unverified"), "{r}");
    assert_eq!(a.count("api_keys").await, 0);
    // The first verification ends every session made before it.
    let (st, _) = a.call("POST", "/v1/auth/verify", None, Some(json!({"token": mailed_token(&sink.wait_for(1).await)}))).await;
    assert_eq!(st, StatusCode::OK);
    let (st, r) = a.call("POST", "/v1/auth/refresh", None, Some(json!({"refresh_token": s["refresh_token"]}))).await;
    assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "refresh_token_revoked"));
    // Verified, the account makes keys (a key it makes through its key is its own too).
    let (_, l, _) = login(&a, ADDR, "vic@example.com", "correct horse battery").await;
    let (st, k) = a.call("POST", "/v1/admin/api-keys", l["access_token"].as_str(), Some(json!({"name": "ops", "scopes": ["admin"]}))).await;
    assert_eq!(st, StatusCode::CREATED, "{k}");
    let (st, k2) = a.call("POST", "/v1/admin/api-keys", k["secret"].as_str(), Some(new_key)).await;
    assert_eq!(st, StatusCode::CREATED, "{k2}");
    assert_eq!(a.call("GET", "/v1/admin/api-keys", k2["secret"].as_str(), None).await.0, StatusCode::FORBIDDEN, "usage:write is no admin");
    assert_eq!(a.call("GET", "/v1/admin/api-keys", k["secret"].as_str(), None).await.0, StatusCode::OK);
    // A key the operator made is nobody's account's.
    let (_, op) = a.call("POST", "/v1/admin/api-keys", Some(&token("root-admin")), Some(json!({"name": "op", "scopes": ["admin"]}))).await;
    // A password reset revokes every session and every key of the account.
    a.call("POST", "/v1/auth/password/forgot", None, Some(json!({"email": "vic@example.com"}))).await;
    let reset = mailed_token(&sink.wait_for(2).await);
    let (st, _) = a.call("POST", "/v1/auth/password/reset", None, Some(json!({"token": reset, "password": "a brand new password"}))).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, r) = a.call("POST", "/v1/auth/refresh", None, Some(json!({"refresh_token": l["refresh_token"]}))).await;
    assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "refresh_token_revoked"));
    for key in [&k, &k2] {
        let (st, r) = a.call("GET", "/v1/admin/api-keys", key["secret"].as_str(), None).await;
        assert_eq!((st, code(&r)), (StatusCode::UNAUTHORIZED, "api_key_revoked"), "{r}");
    }
    assert_eq!(a.call("GET", "/v1/admin/api-keys", op["secret"].as_str(), None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn accounts_unverified_for_7_days_are_deleted_and_their_address_freed() {
    let sink = SmtpSink::start().await;
    let a = app_or_skip!(password_app(&sink).await);
    let squat = signup(&a, "nina@example.com", "squatter password").await;
    signup(&a, "vera@example.com", "correct horse battery").await;
    let (st, _) = a.call("POST", "/v1/auth/verify", None, Some(json!({"token": mailed_token(&sink.wait_for(2).await)}))).await;
    assert_eq!(st, StatusCode::OK);
    a.clock.advance(chrono::Duration::days(6));
    assert_eq!(tally_server::password_auth::delete_unverified(&a.state).await.unwrap(), 0, "kept before 7 days");
    assert_eq!(a.count("password_credentials").await, 2);
    a.clock.advance(chrono::Duration::days(1) + chrono::Duration::minutes(1));
    // The server's background loop deletes it (on its next round).
    for _ in 0..200 {
        if a.count("password_credentials").await == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(a.scalar("SELECT count(*) FROM password_credentials WHERE email = 'vera@example.com'").await, 1, "the verified one stays");
    assert_eq!(a.count("password_credentials").await, 1, "the unverified one is gone");
    let id: uuid::Uuid = squat["user"]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(a.scalar(&format!("SELECT count(*) FROM users WHERE user_id = '{id}'")).await, 0);
    // The address is free again.
    let nina = signup(&a, "Nina@example.com", "nina's own password").await;
    assert_ne!(nina["user"]["id"], squat["user"]["id"]);
    assert_eq!(login(&a, ADDR, "nina@example.com", "nina's own password").await.0, StatusCode::OK);
}

/// Runs one statement on the app's database.
async fn sqlx(a: &TestApp, sql: &str) {
    let client = a.state.pool.get().await.unwrap();
    client.batch_execute(sql).await.unwrap();
}
