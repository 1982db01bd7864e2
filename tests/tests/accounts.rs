//! End-to-end with a password account: a device signs in with the profile of the server's own
//! account, syncs with the session's access token (refreshed as it expires), and a disabled
//! account's sync fails with its own error while everything local stays.

use std::sync::Arc;
use tally_core::{ConsumeItem, Error, PasswordSession, SyncOptions, SystemClock, UsageMeta};
use tally_e2e::*;

/// The server's total of `ai_chat` for the session's account.
fn server_used(server: &Server, session: &PasswordSession) -> u64 {
    let body = http_get_text(
        &format!("{}/v1/usage?group_by=feature&from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z", server.url),
        Some(&session.tokens().access_token),
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("usage json");
    let rows = v.get("rows").cloned().unwrap_or(v);
    rows.as_array().map(|a| a.iter().filter(|r| r["feature"] == "ai_chat").map(|r| r["amount"].as_u64().unwrap_or(0)).sum()).unwrap_or(0)
}

#[test]
fn a_password_account_syncs_with_refreshed_access_tokens_and_a_disabled_one_keeps_its_data() {
    let Some(pg) = shared_cluster() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let db_url = rt.block_on(pg.create_database("password_account")).expect("database");
    let dir = tempfile::Builder::new().prefix("tally-e2e-").tempdir_in("/tmp").unwrap();
    // Access tokens live 31 s: with the 30 s refresh margin each one is refreshed after 1 s.
    let server = Server::start(
        &db_url,
        &dir.path().join("server"),
        &[
            ("TALLY_PASSWORD_AUTH", "1"),
            ("TALLY_SMTP_URL", "smtp://127.0.0.1:1"),
            ("TALLY_MAIL_FROM", "no-reply@tally.test"),
            ("TALLY_ACCESS_TOKEN_TTL_SECS", "31"),
            ("TALLY_ADMIN_SUBJECTS", "root-admin"),
        ],
    );
    let clock: Arc<dyn tally_core::Clock> = Arc::new(SystemClock);
    let (session, profile) = rt
        .block_on(PasswordSession::sign_up(&server.url, "olga@example.com", "correct horse battery", Some("Olga"), clock))
        .expect("sign up");
    assert!(profile.external_id.starts_with("tally|"), "{profile:?}");
    let d = device(&dir.path().join("olga.db"), "olga-phone", &server.keys(), chrono::Utc::now());
    let user = d.tally.sign_in(profile, None).expect("sign in with the account's profile");
    let consume = |n: usize| {
        let items: Vec<ConsumeItem> =
            (0..n).map(|_| ConsumeItem { feature: "ai_chat".into(), amount: 1, meta: UsageMeta::default() }).collect();
        assert!(d.tally.consume_many(&user.id, &items).unwrap().iter().all(|x| x.allowed));
    };
    consume(2);
    let report = rt.block_on(d.tally.sync(&user.id, SyncOptions::with_session(&server.url, session.clone()))).expect("sync");
    assert_eq!(report.events_sent, 2);
    let first = session.tokens();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    consume(1);
    rt.block_on(d.tally.sync(&user.id, SyncOptions::with_session(&server.url, session.clone()))).expect("sync after a refresh");
    let second = session.tokens();
    assert_ne!(first.refresh_token, second.refresh_token, "the session refreshed");
    assert_ne!(first.access_token, second.access_token);
    assert_eq!(server_used(&server, &session), 3);
    // Disabled: the sync fails with its own error, and nothing local goes.
    let id = user.external_id.clone().unwrap().trim_start_matches("tally|").to_string();
    let (status, body) =
        raw_request("POST", &format!("{}/v1/admin/users/{id}/disable", server.url), Some(&id_token("root-admin")), None).unwrap();
    assert_eq!(status, 200, "{body}");
    consume(1);
    let e = rt.block_on(d.tally.sync(&user.id, SyncOptions::with_session(&server.url, session.clone()))).unwrap_err();
    assert!(matches!(e, Error::AccountDisabled), "{e:?}");
    assert!(d.tally.user(&user.id).is_ok(), "the local user stays");
    let used = d.tally.usage(&user.id, "ai_chat").unwrap().used;
    assert_eq!(used, 4, "local usage stays");
    let e =
        rt.block_on(PasswordSession::log_in(&server.url, "olga@example.com", "correct horse battery", Arc::new(SystemClock))).unwrap_err();
    assert!(matches!(e, Error::AccountDisabled), "{e:?}");
    // Enabled again, a new login syncs the rest.
    raw_request("POST", &format!("{}/v1/admin/users/{id}/enable", server.url), Some(&id_token("root-admin")), None).unwrap();
    let (again, _) = rt
        .block_on(PasswordSession::log_in(&server.url, "olga@example.com", "correct horse battery", Arc::new(SystemClock)))
        .expect("log in");
    rt.block_on(d.tally.sync(&user.id, SyncOptions::with_session(&server.url, again.clone()))).expect("sync");
    assert_eq!(server_used(&server, &again), 4);
}
