//! The operator console on a real Postgres through the real router: sign-in (bad tokens
//! refused, sessions in an `HttpOnly; SameSite=Strict; Path=/console` cookie), CSRF on every
//! form, the security headers, user search, grants and revocations seen through the JSON API,
//! the usage chart's data, the webhooks pages and their replay, and no secret value on any page.

mod common;
#[path = "common/receiver.rs"]
mod receiver;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use common::{TestApp, app, app_with, event, token};
use serde_json::{Value, json};
use tally_server::console::CSP;
use tower::ServiceExt;

/// An answer: status, headers, body text.
struct Page {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers.get(header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
    fn set_cookies(&self) -> Vec<String> {
        self.headers.get_all(header::SET_COOKIE).iter().filter_map(|v| v.to_str().ok()).map(String::from).collect()
    }
    fn cookie(&self, name: &str) -> Option<String> {
        self.set_cookies().into_iter().find(|c| c.starts_with(&format!("{name}=")))
    }
    /// The `value` of the first input named `name`.
    fn input(&self, name: &str) -> Option<String> {
        let at = self.text.find(&format!("name=\"{name}\" value=\""))?;
        let rest = &self.text[at + name.len() + 15..];
        Some(rest[..rest.find('"')?].to_string())
    }
}

async fn send(app: &TestApp, method: &str, path: &str, cookie: Option<&str>, form: Option<&[(&str, &str)]>) -> Page {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, c);
    }
    let body = match form {
        Some(fields) => {
            b = b.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish()
        }
        None => String::new(),
    };
    let resp = app.router.clone().oneshot(b.body(Body::from(body)).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    Page { status, headers, text: String::from_utf8_lossy(&bytes).into_owned() }
}

/// A signed-in console session: its `Cookie` header and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

/// Posts the sign-in form with `credential`; returns the answer.
async fn post_sign_in(app: &TestApp, credential: &str) -> Page {
    let form = send(app, "GET", "/console/sign-in", None, None).await;
    assert_eq!(form.status, StatusCode::OK);
    let login = form.input("login_csrf").expect("sign-in form token");
    let cookie = format!("tally_console_login={login}");
    send(app, "POST", "/console/sign-in", Some(&cookie), Some(&[("token", credential), ("login_csrf", &login)])).await
}

async fn sign_in(app: &TestApp, credential: &str) -> Session {
    let resp = post_sign_in(app, credential).await;
    assert_eq!(resp.status, StatusCode::SEE_OTHER, "{}", resp.text);
    assert_eq!(resp.location(), "/console/users");
    let set = resp.cookie("tally_console").expect("session cookie");
    let value = set.split(';').next().unwrap().to_string();
    let page = send(app, "GET", "/console/users", Some(&value), None).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    Session { csrf: page.input("csrf").expect("csrf token"), cookie: value }
}

/// Creates an API key with `scopes` through the API; returns its secret.
async fn api_key(app: &TestApp, scopes: &[&str]) -> String {
    let (s, k) = app.call("POST", "/v1/admin/api-keys", Some(&token("root-admin")), Some(json!({"name": "ops", "scopes": scopes}))).await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    k["secret"].as_str().unwrap().to_string()
}

/// The server id of the user of `sub` (created by its first request).
async fn user_id(app: &TestApp, sub: &str) -> String {
    let (s, me) = app.call("GET", "/v1/me", Some(&token(sub)), None).await;
    assert_eq!(s, StatusCode::OK, "{me}");
    me["id"].as_str().unwrap().to_string()
}

async fn entitlements(app: &TestApp, sub: &str) -> Value {
    let (s, e) = app.call("GET", "/v1/entitlements", Some(&token(sub)), None).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    e
}

/// The one row of `sql`.
async fn query_one(app: &TestApp, sql: &str) -> tokio_postgres::Row {
    let (client, conn) = tokio_postgres::connect(&app.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.query_one(sql, &[]).await.unwrap()
}

/// Undoes the HTML escaping of an attribute value.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let end = tail.find(';').unwrap();
        let ent = &tail[1..end];
        let c = match ent {
            "quot" => '"',
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "apos" => '\'',
            e if e.starts_with("#x") => char::from_u32(u32::from_str_radix(&e[2..], 16).unwrap()).unwrap(),
            e if e.starts_with('#') => char::from_u32(e[1..].parse().unwrap()).unwrap(),
            e => panic!("unknown entity {e}"),
        };
        out.push(c);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The chart data of a user's page.
fn chart_of(page: &Page) -> Value {
    let at = page.text.find("data-usage=\"").expect("chart data") + "data-usage=\"".len();
    let raw = &page.text[at..];
    serde_json::from_str(&unescape(&raw[..raw.find('"').unwrap()])).unwrap()
}

fn assert_security_headers(p: &Page, what: &str) {
    let h = |n: header::HeaderName| p.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert_eq!(h(header::CONTENT_SECURITY_POLICY), CSP, "{what}");
    assert!(CSP.contains("default-src 'none'") && CSP.contains("script-src 'self'") && CSP.contains("frame-ancestors 'none'"));
    assert_eq!(h(header::X_FRAME_OPTIONS), "DENY", "{what}");
    assert_eq!(h(header::REFERRER_POLICY), "no-referrer", "{what}");
    assert_eq!(h(header::CACHE_CONTROL), "no-store", "{what}");
}

#[tokio::test]
async fn sign_in_refuses_bad_tokens_non_admins_and_forms_without_their_token() {
    let app = app_or_skip!(app().await);
    for (credential, why) in [
        ("not-a-token", "garbage"),
        ("tk_0000000000000000000000000000000000000000000000", "unknown API key"),
        (&token("someone"), "valid, not an admin"),
        (&common::token_with("root-admin", json!({"exp": 1})), "an expired admin token"),
        ("", "empty"),
    ] {
        let resp = post_sign_in(&app, credential).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{why}: {}", resp.text);
        assert!(resp.cookie("tally_console").is_none(), "{why}: no session cookie");
        assert!(resp.text.contains("id=\"sign-in-error\""), "{why}: the form says why");
        if !credential.is_empty() {
            assert!(!resp.text.contains(credential), "{why}: the credential is never echoed");
        }
    }
    // A key without the admin scope is no admin either.
    let usage_key = api_key(&app, &["usage:write"]).await;
    assert_eq!(post_sign_in(&app, &usage_key).await.status, StatusCode::UNAUTHORIZED);
    // The sign-in form's own token: missing, or not the cookie's, is refused.
    let admin = token("root-admin");
    let no_form_token = send(&app, "POST", "/console/sign-in", None, Some(&[("token", &admin)])).await;
    assert_eq!(no_form_token.status, StatusCode::FORBIDDEN);
    let wrong =
        send(&app, "POST", "/console/sign-in", Some("tally_console_login=aaaa"), Some(&[("token", &admin), ("login_csrf", "bbbb")])).await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert_eq!(app.count("console_sessions").await, 0, "nothing was started");
    // The right form with an admin token starts one session.
    sign_in(&app, &admin).await;
    assert_eq!(app.count("console_sessions").await, 1);
}

#[tokio::test]
async fn failed_sign_ins_are_limited_per_address_on_every_replica() {
    let app = app_or_skip!(app().await);
    for i in 0..10 {
        assert_eq!(post_sign_in(&app, &format!("tk_guess_{i}")).await.status, StatusCode::UNAUTHORIZED, "guess {i}");
    }
    let replica = app.replica_with(|_| {}).await;
    for console in [&app, &replica] {
        // Past the limit even an admin's token is refused, with the time to wait.
        let resp = post_sign_in(console, &token("root-admin")).await;
        assert_eq!(resp.status, StatusCode::TOO_MANY_REQUESTS, "{}", resp.text);
        let retry: u64 = resp.headers.get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!((1..=900).contains(&retry), "{retry}");
        assert!(resp.text.contains("id=\"sign-in-error\"") && resp.text.contains("Too many failed sign-ins"), "{}", resp.text);
        assert!(resp.cookie("tally_console").is_none());
    }
    assert_eq!(app.count("console_sessions").await, 0, "nothing was started");
    app.clock.advance(chrono::Duration::minutes(15));
    sign_in(&app, &token("root-admin")).await;
}

#[tokio::test]
async fn the_session_cookie_is_http_only_strict_and_scoped_and_secure_behind_https() {
    let app = app_or_skip!(app().await);
    let resp = post_sign_in(&app, &token("root-admin")).await;
    let cookie = resp.cookie("tally_console").expect("cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age=28800"] {
        assert!(cookie.split("; ").any(|a| a == attr), "{attr} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http without an https public URL: {cookie}");
    let sid = cookie.split(';').next().unwrap().trim_start_matches("tally_console=");
    assert_eq!(sid.len(), 64, "a 256-bit random id");
    let stored = app.scalar(&format!("SELECT count(*) FROM console_sessions WHERE session_hash <> '{sid}'")).await;
    assert_eq!(stored, 1, "only its hash is stored");

    // Behind a TLS-terminating proxy that says so.
    let form = send(&app, "GET", "/console/sign-in", None, None).await;
    let login = form.input("login_csrf").unwrap();
    let req = Request::builder()
        .method("POST")
        .uri("/console/sign-in")
        .header(header::COOKIE, format!("tally_console_login={login}"))
        .header("x-forwarded-proto", "https")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    let body =
        form_urlencoded::Serializer::new(String::new()).extend_pairs([("token", token("root-admin")), ("login_csrf", login)]).finish();
    let resp = app.router.clone().oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let set: Vec<String> = resp.headers().get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert!(set.iter().any(|c| c.starts_with("tally_console=") && c.contains("; Secure;")), "{set:?}");

    let https = app_or_skip!(app_with(|c| c.public_url = Some("https://tally.example.com".into())).await);
    let cookie = post_sign_in(&https, &token("root-admin")).await.cookie("tally_console").expect("cookie");
    assert!(cookie.split("; ").any(|a| a == "Secure"), "{cookie}");
    let login = send(&https, "GET", "/console/sign-in", None, None).await.cookie("tally_console_login").unwrap();
    assert!(login.contains("; Secure") && login.contains("HttpOnly"), "{login}");
}

#[tokio::test]
async fn every_console_answer_has_the_security_headers() {
    let app = app_or_skip!(app().await);
    let s = sign_in(&app, &token("root-admin")).await;
    let uid = user_id(&app, "ada").await;
    for path in [
        "/console/sign-in".to_string(),
        "/console/users".into(),
        format!("/console/users/{uid}"),
        "/console/plans".into(),
        "/console/webhooks".into(),
        "/console/webhooks/not-a-uuid".into(),
        "/console/assets/console.js".into(),
        "/console/assets/uPlot.iife.min.js".into(),
        "/console/assets/nope.js".into(),
        "/console/users/not-a-uuid".into(),
    ] {
        let p = send(&app, "GET", &path, Some(&s.cookie), None).await;
        assert_security_headers(&p, &path);
    }
    let anonymous = send(&app, "GET", "/console/users", None, None).await;
    assert_security_headers(&anonymous, "redirect");
    // Pages hold no inline script or style: everything comes from /console/assets.
    let page = send(&app, "GET", &format!("/console/users/{uid}"), Some(&s.cookie), None).await;
    assert!(!page.text.contains("<script>") && !page.text.contains("style=") && !page.text.contains("<style"), "{}", page.text);
    assert!(page.text.contains("<script src=\"/console/assets/uPlot.iife.min.js\""));
    let js = send(&app, "GET", "/console/assets/uPlot.iife.min.js", None, None).await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(js.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/javascript"));
    assert!(js.text.contains("uPlot"));
    assert_eq!(send(&app, "GET", "/console/assets/nope.js", None, None).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pages_need_a_live_session() {
    let app = app_or_skip!(app().await);
    for cookie in [None, Some("tally_console=0123"), Some("other=1")] {
        for path in ["/console/users", "/console/webhooks"] {
            let p = send(&app, "GET", path, cookie, None).await;
            assert_eq!((p.status, p.location()), (StatusCode::SEE_OTHER, "/console/sign-in"), "{path} {cookie:?}");
        }
    }
    // A session ends when it expires (the server's clock), when its key is revoked, or when
    // its user is no admin any more.
    let s = sign_in(&app, &token("root-admin")).await;
    app.clock.advance(chrono::Duration::seconds(28_801));
    assert_eq!(send(&app, "GET", "/console/users", Some(&s.cookie), None).await.status, StatusCode::SEE_OTHER);
    app.clock.advance(chrono::Duration::seconds(-28_801));

    let key = api_key(&app, &["admin"]).await;
    let s = sign_in(&app, &key).await;
    let (_, keys) = app.call("GET", "/v1/admin/api-keys", Some(&token("root-admin")), None).await;
    let id = keys.as_array().unwrap().iter().find(|k| k["scopes"] == json!(["admin"])).unwrap()["id"].as_str().unwrap().to_string();
    let (st, _) = app.call("DELETE", &format!("/v1/admin/api-keys/{id}"), Some(&token("root-admin")), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(send(&app, "GET", "/console/users", Some(&s.cookie), None).await.status, StatusCode::SEE_OTHER, "revoked key");

    user_id(&app, "ops-lead").await;
    let pg = tokio_postgres::connect(&app.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(pg.1);
    pg.0.execute("UPDATE users SET is_admin = true WHERE external_id = 'ops-lead'", &[]).await.unwrap();
    let s = sign_in(&app, &token("ops-lead")).await;
    pg.0.execute("UPDATE users SET is_admin = false WHERE external_id = 'ops-lead'", &[]).await.unwrap();
    assert_eq!(send(&app, "GET", "/console/users", Some(&s.cookie), None).await.status, StatusCode::SEE_OTHER, "no admin any more");
}

#[tokio::test]
async fn sign_out_ends_the_session_and_needs_its_csrf_token() {
    let app = app_or_skip!(app().await);
    let s = sign_in(&app, &token("root-admin")).await;
    let refused = send(&app, "POST", "/console/sign-out", Some(&s.cookie), Some(&[])).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(send(&app, "GET", "/console/users", Some(&s.cookie), None).await.status, StatusCode::OK, "still signed in");
    let out = send(&app, "POST", "/console/sign-out", Some(&s.cookie), Some(&[("csrf", &s.csrf)])).await;
    assert_eq!((out.status, out.location()), (StatusCode::SEE_OTHER, "/console/sign-in"));
    assert!(out.cookie("tally_console").unwrap().contains("Max-Age=0"));
    assert_eq!(app.count("console_sessions").await, 0);
    assert_eq!(send(&app, "GET", "/console/users", Some(&s.cookie), None).await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn the_json_api_never_reads_the_console_cookie() {
    let app = app_or_skip!(app().await);
    let s = sign_in(&app, &token("root-admin")).await;
    for path in ["/v1/admin/plans", "/v1/admin/api-keys", "/v1/me"] {
        let (status, body, _) = app.raw("GET", path, None, Vec::new(), &[("cookie", &s.cookie)]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert_eq!(body["error"]["code"], "missing_token", "{path}");
    }
    let (status, body, _) =
        app.raw("POST", "/v1/admin/grants", None, br#"{"subject":"x","plan":"pro","reason":"r"}"#.to_vec(), &[("cookie", &s.cookie)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(app.count("access_grants").await, 0);
}

#[tokio::test]
async fn search_finds_users_by_email_subject_and_id() {
    let app = app_or_skip!(app().await);
    let s = sign_in(&app, &token("root-admin")).await;
    let (st, pending) =
        app.call("POST", "/v1/admin/users", Some(&token("root-admin")), Some(json!({"email": "Grace.Hopper@example.com"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{pending}");
    let pending_id = pending["id"].as_str().unwrap().to_string();
    let ada = user_id(&app, "auth0|ada-lovelace").await;
    let search = |q: &str| {
        let path = format!("/console/users?{}", form_urlencoded::Serializer::new(String::new()).append_pair("q", q).finish());
        let cookie = s.cookie.clone();
        let app = &app;
        async move { send(app, "GET", &path, Some(&cookie), None).await }
    };
    for (q, want, not) in [
        ("grace.hopper@example.com", &pending_id, &ada),
        ("GRACE", &pending_id, &ada),
        ("auth0|ada", &ada, &pending_id),
        (ada.as_str(), &ada, &pending_id),
        (pending_id.as_str(), &pending_id, &ada),
    ] {
        let p = search(q).await;
        assert_eq!(p.status, StatusCode::OK);
        assert!(p.text.contains(&format!("/console/users/{want}")), "{q} finds {want}");
        assert!(!p.text.contains(&format!("/console/users/{not}")), "{q} does not find {not}");
    }
    for q in ["nobody@example.com", "00000000-0000-0000-0000-000000000000", "%", "_"] {
        let p = search(q).await;
        assert!(p.text.contains("id=\"no-users\""), "{q}: {}", p.text);
    }
    // Text is escaped, never markup.
    let p = search("<script>alert(1)</script>").await;
    assert!(!p.text.contains("<script>alert(1)</script>") && p.text.contains("&#60;script&#62;alert(1)"), "{}", p.text);
    let all = search("").await;
    assert!(all.text.contains(&pending_id) && all.text.contains(&ada));
}

#[tokio::test]
async fn grant_and_revoke_change_the_entitlements_the_api_answers() {
    let app = app_or_skip!(app().await);
    let s = sign_in(&app, &token("root-admin")).await;
    let uid = user_id(&app, "ada").await;
    assert_eq!(entitlements(&app, "ada").await["plan"], "free");
    let grant = send(
        &app,
        "POST",
        &format!("/console/users/{uid}/grants"),
        Some(&s.cookie),
        Some(&[("csrf", &s.csrf), ("plan", "pro"), ("until", ""), ("reason", "support")]),
    )
    .await;
    assert_eq!((grant.status, grant.location()), (StatusCode::SEE_OTHER, format!("/console/users/{uid}").as_str()), "{}", grant.text);
    let e = entitlements(&app, "ada").await;
    assert_eq!((e["plan"].as_str(), e["access_reason"].as_str()), (Some("pro"), Some("granted:support")));
    let page = send(&app, "GET", &format!("/console/users/{uid}"), Some(&s.cookie), None).await;
    assert!(page.text.contains("<dd id=\"plan\">pro</dd>"), "{}", page.text);
    assert!(page.text.contains("<td>root-admin</td>"), "granted_by is the operator");
    let (_, grants_json) = app.call("GET", &format!("/v1/admin/users/{uid}/usage"), Some(&token("root-admin")), None).await;
    assert_eq!(grants_json["user"]["id"], uid);

    // A dated grant ends after its last day.
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).format("%Y-%m-%d").to_string();
    let dated = send(
        &app,
        "POST",
        &format!("/console/users/{uid}/grants"),
        Some(&s.cookie),
        Some(&[("csrf", &s.csrf), ("plan", "pro"), ("until", &tomorrow), ("reason", "trial")]),
    )
    .await;
    assert_eq!(dated.status, StatusCode::SEE_OTHER, "{}", dated.text);
    let until: chrono::DateTime<chrono::Utc> = query_one(&app, "SELECT until FROM access_grants WHERE reason = 'trial'").await.get(0);
    assert_eq!(until.format("%H:%M").to_string(), "00:00");
    assert!(until > chrono::Utc::now() + chrono::Duration::days(1));

    // Revoke both from the page's forms.
    let page = send(&app, "GET", &format!("/console/users/{uid}"), Some(&s.cookie), None).await;
    let ids: Vec<String> = page.text.match_indices("data-grant=\"").map(|(i, _)| page.text[i + 12..i + 48].to_string()).collect();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        let r = send(&app, "POST", &format!("/console/users/{uid}/grants/{id}/revoke"), Some(&s.cookie), Some(&[("csrf", &s.csrf)])).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    }
    let e = entitlements(&app, "ada").await;
    assert_eq!((e["plan"].as_str(), e["access_reason"].as_str()), (Some("free"), Some("free")));
    // Revoking again finds nothing.
    let again =
        send(&app, "POST", &format!("/console/users/{uid}/grants/{}/revoke", ids[0]), Some(&s.cookie), Some(&[("csrf", &s.csrf)])).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert!(again.text.contains("data-code=\"not_found\""));
}

#[tokio::test]
async fn forms_without_the_sessions_csrf_token_change_nothing() {
    let app = app_or_skip!(app().await);
    let s = sign_in(&app, &token("root-admin")).await;
    let other = sign_in(&app, &token("root-admin")).await;
    assert_ne!(s.csrf, other.csrf, "one token per session");
    let uid = user_id(&app, "ada").await;
    let path = format!("/console/users/{uid}/grants");
    for csrf in [None, Some(""), Some("00"), Some("zz-not-hex"), Some(other.csrf.as_str())] {
        let mut form = vec![("plan", "pro"), ("reason", "support")];
        if let Some(c) = csrf {
            form.push(("csrf", c));
        }
        let p = send(&app, "POST", &path, Some(&s.cookie), Some(&form)).await;
        assert_eq!(p.status, StatusCode::FORBIDDEN, "{csrf:?}");
        assert!(p.text.contains("data-code=\"invalid_csrf\""), "{}", p.text);
    }
    // Without a session at all: to the sign-in page, nothing done.
    let p = send(&app, "POST", &path, None, Some(&[("csrf", &s.csrf), ("plan", "pro"), ("reason", "x")])).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(app.count("access_grants").await, 0);
    assert_eq!(entitlements(&app, "ada").await["plan"], "free");
    // A revoke without it either.
    let g = send(&app, "POST", &path, Some(&s.cookie), Some(&[("csrf", &s.csrf), ("plan", "pro"), ("reason", "ok")])).await;
    assert_eq!(g.status, StatusCode::SEE_OTHER);
    let gid = query_one(&app, "SELECT grant_id::text FROM access_grants").await.get::<_, String>(0);
    let r = send(&app, "POST", &format!("/console/users/{uid}/grants/{gid}/revoke"), Some(&s.cookie), Some(&[("csrf", "00")])).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(entitlements(&app, "ada").await["plan"], "pro");
}

#[tokio::test]
async fn bad_form_input_is_a_clear_error_and_changes_nothing() {
    let app = app_or_skip!(app().await);
    let s = sign_in(&app, &token("root-admin")).await;
    let uid = user_id(&app, "ada").await;
    let (_, pending) = app.call("POST", "/v1/admin/users", Some(&token("root-admin")), Some(json!({"email": "p@example.com"}))).await;
    let pending = pending["id"].as_str().unwrap().to_string();
    let yesterday = (chrono::Utc::now() - chrono::Duration::days(2)).format("%Y-%m-%d").to_string();
    let long = "x".repeat(201);
    for (path, form, status, code) in [
        (
            format!("/console/users/{uid}/grants"),
            vec![("plan", "platinum"), ("reason", "r")],
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_plan",
        ),
        (format!("/console/users/{uid}/grants"), vec![("plan", "pro"), ("reason", "")], StatusCode::UNPROCESSABLE_ENTITY, "invalid_text"),
        (
            format!("/console/users/{uid}/grants"),
            vec![("plan", "pro"), ("reason", long.as_str())],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_text",
        ),
        (
            format!("/console/users/{uid}/grants"),
            vec![("plan", "pro"), ("reason", "r"), ("until", "soon")],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            format!("/console/users/{uid}/grants"),
            vec![("plan", "pro"), ("reason", "r"), ("until", yesterday.as_str())],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (format!("/console/users/{uid}/grants"), vec![("reason", "r")], StatusCode::UNPROCESSABLE_ENTITY, "invalid_form"),
        (format!("/console/users/{pending}/grants"), vec![("plan", "pro"), ("reason", "r")], StatusCode::CONFLICT, "pending_user"),
        (
            "/console/users/00000000-0000-0000-0000-000000000000/grants".into(),
            vec![("plan", "pro"), ("reason", "r")],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        ("/console/users/nope/grants".into(), vec![("plan", "pro"), ("reason", "r")], StatusCode::NOT_FOUND, "not_found"),
        (format!("/console/users/{uid}/grants/nope/revoke"), vec![], StatusCode::NOT_FOUND, "not_found"),
    ] {
        let mut form = form.clone();
        form.push(("csrf", &s.csrf));
        let p = send(&app, "POST", &path, Some(&s.cookie), Some(&form)).await;
        assert_eq!(p.status, status, "{path} {form:?}: {}", p.text);
        assert!(p.text.contains(&format!("data-code=\"{code}\"")), "{path} {form:?}: {}", p.text);
        assert!(p.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
    }
    assert_eq!(app.count("access_grants").await, 0);
    for (path, status) in [
        (format!("/console/users/{uid}?days=7"), StatusCode::UNPROCESSABLE_ENTITY),
        (format!("/console/users/{uid}?days=x"), StatusCode::UNPROCESSABLE_ENTITY),
        ("/console/users/00000000-0000-0000-0000-000000000000".into(), StatusCode::NOT_FOUND),
        ("/console/users/nope".into(), StatusCode::NOT_FOUND),
    ] {
        assert_eq!(send(&app, "GET", &path, Some(&s.cookie), None).await.status, status, "{path}");
    }
}

#[tokio::test]
async fn the_user_page_shows_devices_credits_and_the_usage_chart_against_the_limit() {
    let app = app_or_skip!(app().await);
    let s = sign_in(&app, &token("root-admin")).await;
    let ada = token("ada");
    let uid = user_id(&app, "ada").await;
    let (st, _) =
        app.sync(&ada, "ada-phone", vec![event(uuid::Uuid::now_v7(), "ai_chat", 2), event(uuid::Uuid::now_v7(), "notes", 4)]).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = app.sync(&ada, "ada-laptop", vec![event(uuid::Uuid::now_v7(), "ai_chat", 1)]).await;
    assert_eq!(st, StatusCode::OK);
    let (st, body) = app
        .call("POST", "/v1/admin/grants", Some(&token("root-admin")), Some(json!({"subject": "ada", "credits": 30, "reason": "welcome"})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");

    let page = send(&app, "GET", &format!("/console/users/{uid}"), Some(&s.cookie), None).await;
    assert_eq!(page.status, StatusCode::OK);
    for text in ["ada-phone", "ada-laptop", "<dd id=\"credit-balance\">30</dd>", "<code>free</code>", "id=\"chart-ai_chat\""] {
        assert!(page.text.contains(text), "{text} in the page");
    }
    let chart = chart_of(&page);
    assert_eq!(chart["days"].as_array().unwrap().len(), 30);
    let series = |f: &str| chart["features"].as_array().unwrap().iter().find(|s| s["feature"] == f).cloned().unwrap();
    let chat = series("ai_chat");
    assert_eq!((chat["limit"].as_u64(), chat["period"].as_str()), (Some(5), Some("month")));
    assert_eq!(chat["daily"].as_array().unwrap().last().unwrap(), 3, "today's uses of both devices");
    assert_eq!(chat["daily"].as_array().unwrap().iter().filter_map(Value::as_i64).sum::<i64>(), 3);
    assert_eq!(chat["used"].as_array().unwrap().last().unwrap(), 3);
    let notes = series("notes");
    assert_eq!((notes["limit"].clone(), notes["daily"].as_array().unwrap().last().cloned()), (Value::Null, Some(json!(4))));
    assert!(chart["features"].as_array().unwrap().iter().all(|s| s["feature"] != "export"), "flags are not charted");
    let ninety = chart_of(&send(&app, "GET", &format!("/console/users/{uid}?days=90"), Some(&s.cookie), None).await);
    assert_eq!(ninety["days"].as_array().unwrap().len(), 90);
    // The chart matches the JSON usage report.
    let (_, report) = app.call("GET", &format!("/v1/admin/users/{uid}/usage"), Some(&token("root-admin")), None).await;
    let reported = report["rows"].as_array().unwrap().iter().find(|r| r["feature"] == "ai_chat").unwrap()["amount"].clone();
    assert_eq!(reported, 3);
}

#[tokio::test]
async fn the_plans_page_lists_the_catalog_and_its_products() {
    let app = app_or_skip!(app().await);
    let s = sign_in(&app, &token("root-admin")).await;
    let plan = json!({"features": {"ai_chat": {"type": "metered", "limit": 50, "period": "day", "enforcement": "soft"}}});
    let (st, _) = app.call("PUT", "/v1/admin/plans/team", Some(&token("root-admin")), Some(plan)).await;
    assert_eq!(st, StatusCode::OK);
    let p = send(&app, "GET", "/console/plans", Some(&s.cookie), None).await;
    assert_eq!(p.status, StatusCode::OK);
    for text in ["id=\"plan-free\"", "id=\"plan-pro\"", "id=\"plan-team\"", "50 per day, soft", "5 per month, hard", "10 credits per unit"]
    {
        assert!(p.text.contains(text), "{text}: {}", p.text);
    }
    assert!(p.text.contains("class=\"active\" aria-current=\"page\">Plans"));
}

#[tokio::test]
async fn no_page_shows_a_secret_value() {
    let stripe = "whsec_console_test_0123456789abcdef";
    let stripe_key = "sk_test_console_0123456789abcdef";
    let app = app_or_skip!(
        app_with(|c| {
            c.stripe_webhook_secret = Some(stripe.into());
            c.stripe_secret_key = Some(stripe_key.into());
        })
        .await
    );
    let key = api_key(&app, &["admin"]).await;
    let hash = tally_server::api_keys::hash(&key);
    let s = sign_in(&app, &key).await;
    let uid = user_id(&app, "ada").await;
    let sid = s.cookie.trim_start_matches("tally_console=").to_string();
    let session_hash = query_one(&app, "SELECT session_hash FROM console_sessions").await.get::<_, String>(0);
    let secrets = [key.as_str(), hash.as_str(), stripe, stripe_key, common::SECRET, sid.as_str(), session_hash.as_str()];
    for path in [
        "/console/users".to_string(),
        "/console/users?q=ada".into(),
        format!("/console/users/{uid}"),
        format!("/console/users/{uid}?days=90"),
        "/console/plans".into(),
        "/console/sign-in".into(),
        "/console/users/nope".into(),
    ] {
        let p = send(&app, "GET", &path, Some(&s.cookie), None).await;
        for secret in secrets {
            assert!(!p.text.contains(secret), "{path} shows a secret");
        }
    }
    // The operator is named by the key's name, never its secret.
    let page = send(&app, "GET", "/console/users", Some(&s.cookie), None).await;
    assert!(page.text.contains("key:ops"));
}

#[tokio::test]
async fn deleting_an_admins_account_ends_its_console_sessions() {
    let app = app_or_skip!(app().await);
    user_id(&app, "ops-lead").await;
    let pg = tokio_postgres::connect(&app.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(pg.1);
    pg.0.execute("UPDATE users SET is_admin = true WHERE external_id = 'ops-lead'", &[]).await.unwrap();
    let s = sign_in(&app, &token("ops-lead")).await;
    sign_in(&app, &token("root-admin")).await;
    assert_eq!(app.count("console_sessions").await, 2);
    let (st, _) = app.call("DELETE", "/v1/me", Some(&token("ops-lead")), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(app.count("console_sessions").await, 1, "the other admin's session stays");
    assert_eq!(send(&app, "GET", "/console/users", Some(&s.cookie), None).await.status, StatusCode::SEE_OTHER);
}

/// Waits (up to 20 s) until the deliveries of `endpoint`, through the JSON API, satisfy `f`.
async fn wait_deliveries(app: &TestApp, endpoint: &str, what: &str, f: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (s, v) = app.call("GET", &format!("/v1/admin/webhooks/{endpoint}/deliveries"), Some(&token("root-admin")), None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let list = v["deliveries"].as_array().unwrap().clone();
        if f(&list) {
            return list;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}: {list:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_webhooks_pages_list_endpoints_and_deliveries_and_replay_dead_letters() {
    let app = app_or_skip!(
        app_with(|c| {
            c.webhook_allow_private = true;
            c.webhook_poll_ms = 20;
            c.webhook_backoff_ms = 50;
            c.webhook_timeout_ms = 2000;
            c.webhook_retry_secs = 1;
        })
        .await
    );
    let r = receiver::Receiver::start().await;
    r.set_status(500);
    let secret = "whsec_Y29uc29sZS13ZWJob29rcy1zZWNyZXQtMDEyMzQ1Njc4OQ==";
    let body = json!({"url": r.url, "events": ["credits.granted"], "secret": secret});
    let (st, ep) = app.call("POST", "/v1/admin/webhooks", Some(&token("root-admin")), Some(body)).await;
    assert_eq!(st, StatusCode::CREATED, "{ep}");
    let id = ep["id"].as_str().unwrap().to_string();
    let grant = json!({"subject": "hook-user", "credits": 7, "reason": "gift"});
    let (st, _) = app.call("POST", "/v1/admin/grants", Some(&token("root-admin")), Some(grant)).await;
    assert_eq!(st, StatusCode::CREATED);
    let dead = wait_deliveries(&app, &id, "a dead letter", |l| l.len() == 1 && l[0]["state"] == "dead").await;
    let event = dead[0]["event_id"].as_str().unwrap().to_string();

    let s = sign_in(&app, &token("root-admin")).await;
    // The list: the endpoint, its deliveries by state, the nav entry; never the secret.
    let list = send(&app, "GET", "/console/webhooks", Some(&s.cookie), None).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    assert_security_headers(&list, "the webhooks page");
    for text in [format!("data-endpoint=\"{id}\""), r.url.clone(), "credits.granted".into(), "<span class=\"tag warn\">1</span>".into()] {
        assert!(list.text.contains(&text), "{text}: {}", list.text);
    }
    assert!(list.text.contains("class=\"active\" aria-current=\"page\">Webhooks"));
    // The endpoint's page: the dead delivery, its attempts and the receiver's 500.
    let page = send(&app, "GET", &format!("/console/webhooks/{id}"), Some(&s.cookie), None).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    for text in [format!("data-event=\"{event}\" data-state=\"dead\""), "id=\"replay-dead\"".into(), "500".into(), "#1 ".into()] {
        assert!(page.text.contains(&text), "{text}: {}", page.text);
    }
    for p in [&list, &page] {
        assert!(!p.text.contains(secret) && !p.text.contains("whsec_"), "a page shows the signing secret");
    }
    let delivered = send(&app, "GET", &format!("/console/webhooks/{id}?state=delivered"), Some(&s.cookie), None).await;
    assert!(delivered.text.contains("id=\"no-deliveries\""), "{}", delivered.text);
    // Bad input: a clear error page each time.
    let bogus = send(&app, "GET", &format!("/console/webhooks/{id}?state=bogus"), Some(&s.cookie), None).await;
    assert_eq!(bogus.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(bogus.text.contains("invalid_query"), "{}", bogus.text);
    for path in ["/console/webhooks/not-a-uuid".to_string(), format!("/console/webhooks/{}", uuid::Uuid::now_v7())] {
        let p = send(&app, "GET", &path, Some(&s.cookie), None).await;
        assert_eq!(p.status, StatusCode::NOT_FOUND, "{path}");
    }
    let replay = format!("/console/webhooks/{id}/replay");
    let other = uuid::Uuid::now_v7().to_string();
    type Refusal<'a> = (&'a [(&'a str, &'a str)], StatusCode, &'a str);
    let refused: [Refusal; 4] = [
        (&[("event_id", "")], StatusCode::FORBIDDEN, "invalid_csrf"),
        (&[("csrf", "forged"), ("event_id", "")], StatusCode::FORBIDDEN, "invalid_csrf"),
        (&[("csrf", &s.csrf), ("event_id", "not-an-id")], StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (&[("csrf", &s.csrf), ("event_id", &other)], StatusCode::NOT_FOUND, "unknown_event"),
    ];
    for (form, status, code) in refused {
        let p = send(&app, "POST", &replay, Some(&s.cookie), Some(form)).await;
        assert_eq!(p.status, status, "{form:?}: {}", p.text);
        assert!(p.text.contains(code), "{form:?}: {}", p.text);
    }
    let unknown = send(&app, "POST", &format!("/console/webhooks/{other}/replay"), Some(&s.cookie), Some(&[("csrf", &s.csrf)])).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let still = wait_deliveries(&app, &id, "nothing changed", |_| true).await;
    assert_eq!((still[0]["state"].as_str(), still[0]["attempts"].as_i64()), (Some("dead"), dead[0]["attempts"].as_i64()), "{still:?}");

    // Replay every dead letter once the receiver is back: delivered, shown as such.
    let tried = r.counts().get(&event).copied().unwrap_or(0);
    assert!(tried >= 2, "the dead letter was retried before it died ({tried} attempts)");
    r.set_status(200);
    let p = send(&app, "POST", &replay, Some(&s.cookie), Some(&[("csrf", &s.csrf)])).await;
    assert_eq!((p.status, p.location()), (StatusCode::SEE_OTHER, format!("/console/webhooks/{id}").as_str()), "{}", p.text);
    wait_deliveries(&app, &id, "the replayed delivery", |l| l[0]["state"] == "delivered").await;
    let page = send(&app, "GET", &format!("/console/webhooks/{id}"), Some(&s.cookie), None).await;
    assert!(page.text.contains(&format!("data-event=\"{event}\" data-state=\"delivered\"")), "{}", page.text);
    assert!(!page.text.contains("id=\"replay-dead\""), "no dead letter is left to replay");
    assert_eq!(r.counts().get(&event).copied(), Some(tried + 1), "the replay sent it once more");
    // One delivered event, sent again on request, with the same webhook-id.
    let p = send(&app, "POST", &replay, Some(&s.cookie), Some(&[("csrf", &s.csrf), ("event_id", &event)])).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.text);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while r.counts().get(&event).copied() != Some(tried + 2) {
        assert!(std::time::Instant::now() < deadline, "the resent event never arrived");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A user (with a password credential when `verified` is `Some`) as a server before canonical
/// emails stored it.
async fn old_row(client: &tokio_postgres::Client, email: &str, pending: bool, verified: Option<bool>, created: &str) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    let created: chrono::DateTime<chrono::Utc> = created.parse().unwrap();
    let subject = (!pending).then(|| format!("tally|{id}"));
    client
        .execute(
            "INSERT INTO users (user_id, external_id, email, email_verified, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)",
            &[&id, &subject, &email, &verified.unwrap_or(false), &created],
        )
        .await
        .unwrap();
    if let Some(v) = verified {
        let hash = tally_server::passwords::hash("correct horse battery").unwrap();
        client
            .execute(
                "INSERT INTO password_credentials (user_id, email, password_hash, email_verified_at, created_at, updated_at) \
                 VALUES ($1, $2, $3, CASE WHEN $4 THEN $5::timestamptz END, $5, $5)",
                &[&id, &email, &hash, &v, &created],
            )
            .await
            .unwrap();
    }
    id
}

#[tokio::test]
async fn canonical_emails_are_filled_before_serving_collisions_go_to_the_verified_else_the_oldest_and_are_shown() {
    let Some(url) = common::fresh_db().await else { return };
    // The database as a server before canonical emails left it (the C-locale `lower()` index let
    // these spellings of one address coexist).
    tally_server::db::migrate_to(&url, Some(14)).await.unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rena_nfd = old_row(&client, "re\u{301}na@example.com", false, Some(false), &days_ago(3)).await;
    let rena_nfc = old_row(&client, "r\u{e9}na@example.com", false, Some(true), "2024-02-01T00:00:00Z").await;
    let ben_old = old_row(&client, "ben@B\u{fc}cher.example", false, Some(false), &days_ago(3)).await;
    let ben_new = old_row(&client, "ben@xn--bcher-kva.example", false, Some(false), &days_ago(2)).await;
    let kelvin = old_row(&client, "\u{212A}ate@example.com", false, Some(false), &days_ago(3)).await;
    let zoe_old = old_row(&client, "zo\u{308}e@example.com", true, None, "2024-01-05T00:00:00Z").await;
    let zoe_new = old_row(&client, "z\u{f6}e@example.com", true, None, "2024-04-05T00:00:00Z").await;
    // Unverified password accounts are recent: the server deletes those older than 7 days.
    fn days_ago(n: i64) -> String {
        (chrono::Utc::now() - chrono::Duration::days(n)).to_rfc3339()
    }
    // Two replicas start together: one fills the column, the other finds it done.
    let (r1, r2) = tokio::join!(tally_server::db::migrate(&url), tally_server::db::migrate(&url));
    r1.unwrap();
    r2.unwrap();
    let canonical = |table: &'static str, id: uuid::Uuid| {
        let client = &client;
        async move {
            client
                .query_one(&format!("SELECT email_canonical FROM {table} WHERE user_id = $1"), &[&id])
                .await
                .unwrap()
                .get::<_, Option<String>>(0)
        }
    };
    assert_eq!(canonical("password_credentials", rena_nfc).await.as_deref(), Some("r\u{e9}na@example.com"), "the verified one keeps it");
    assert_eq!(canonical("password_credentials", rena_nfd).await, None);
    assert_eq!(canonical("password_credentials", ben_old).await.as_deref(), Some("ben@xn--bcher-kva.example"), "else the oldest");
    assert_eq!(canonical("password_credentials", ben_new).await, None);
    assert_eq!(canonical("password_credentials", kelvin).await, None, "a look-alike has no canonical form");
    assert_eq!(canonical("users", zoe_old).await.as_deref(), Some("z\u{f6}e@example.com"), "pending users: the oldest");
    assert_eq!(canonical("users", zoe_new).await, None);
    let reported: Vec<(uuid::Uuid, Option<uuid::Uuid>)> = client
        .query("SELECT user_id, kept_by FROM email_collisions ORDER BY user_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut want = vec![(rena_nfd, Some(rena_nfc)), (ben_new, Some(ben_old)), (kelvin, None), (zoe_new, Some(zoe_old))];
    want.sort();
    assert_eq!(reported, want, "each loser reported once");
    let indexes: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname IN ('password_credentials_email', 'users_pending_email') \
             OR (indexname IN ('password_credentials_email_canonical', 'users_pending_email_canonical') AND indexdef LIKE 'CREATE UNIQUE%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, 2, "the unique canonical indexes replaced the lower(email) ones");
    // The server serves: the winners sign in under any spelling, the losers under none.
    let sink = common::SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(&url, dir.path());
    common::password_auth(&mut config, &sink);
    let clock = std::sync::Arc::new(common::TestClock::default());
    let state = tally_server::AppState::with_clock(config, clock.clone()).await.unwrap();
    let app = TestApp { router: tally_server::app(state.clone()), state, url, dir, clock };
    for (email, owner) in [("re\u{301}na@example.com", rena_nfc), ("ben@xn--bcher-kva.example", ben_old)] {
        let (s, r, _) =
            app.call_from("203.0.113.4:1", "POST", "/v1/auth/login", json!({"email": email, "password": "correct horse battery"})).await;
        assert_eq!((s, r["user"]["id"].as_str()), (StatusCode::OK, Some(owner.to_string().as_str())), "{email}: {r}");
    }
    // The console lists what was taken.
    let session = sign_in(&app, &token("root-admin")).await;
    let page = send(&app, "GET", "/console/users", Some(&session.cookie), None).await;
    assert!(page.text.contains("id=\"email-collisions\""), "{}", page.text);
    for id in [rena_nfd, ben_new, kelvin, zoe_new] {
        assert!(page.text.contains(&id.to_string()), "{id} listed");
    }
}
