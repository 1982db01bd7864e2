//! The sync client's rounds against a loopback fake of the server (the network boundary only):
//! events and settings travel apart, refused settings are quarantined alone, stored values that
//! break the contract are quarantined instead of sent, the server's stored setting rows are
//! adopted, and subject or configuration problems are errors of their own.

mod common;

use common::*;
use serde_json::{Value, json};
use tally_core::{Error, EventStatus, SettingStatus, UsageMeta, UserUpdate};

fn events_of(req: &Value) -> usize {
    req["events"].as_array().map_or(0, Vec::len)
}

fn settings_of(req: &Value) -> usize {
    req["settings_changes"].as_array().map_or(0, Vec::len)
}

/// A server that enforces `max_body` bytes with 413 and announces `announced` in its limits.
fn strict_server(max_body: usize, announced: usize) -> FakeServer {
    FakeServer::start(move |_, req| {
        if req.to_string().len() > max_body {
            return (413, json!({"error": {"code": "payload_too_large", "message": "too large"}}));
        }
        let mut a = accept_all(req);
        a["limits"]["max_body_bytes"] = json!(announced);
        (200, a)
    })
}

fn fill(e: &Env, user: &str, n: usize, bytes: usize) {
    for i in 0..n {
        e.tally.set_setting(user, &format!("s{i:02}"), Value::String("v".repeat(bytes))).unwrap();
    }
}

/// Asserts that nothing of `user` is left to send and that their scan for unsent events starts
/// past the ledger's end (`pending_from` moved on with the acknowledgements).
fn assert_nothing_pending(e: &Env, user: &str) {
    assert_eq!(e.tally.pending_events(user).unwrap(), 0);
    let (from, last): (i64, i64) = e
        .raw()
        .query_row("SELECT (SELECT pending_from FROM users WHERE id = ?1), (SELECT max(device_seq) FROM events)", [user], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(from, last + 1);
}

#[tokio::test]
async fn settings_never_share_a_request_with_events_and_never_take_them_down() {
    let (e, user) = signed_in_env();
    for _ in 0..3 {
        e.tally.consume(&user, "notes", 1, UsageMeta::default()).unwrap();
    }
    // 20 settings of 15 KB: legal on both sides, 300 KB together, over the server's 256 KiB.
    fill(&e, &user, 20, 15_000);
    let server = strict_server(262_144, 262_144);
    let report = e.tally.sync(&user, server.options()).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert!(report.settings_rejected.is_empty(), "{:?}", report.settings_rejected);
    assert_eq!((report.events_acked, report.settings_sent), (3, 20));
    assert_nothing_pending(&e, &user);
    for req in server.requests() {
        assert!(events_of(&req) == 0 || (settings_of(&req) == 0 && req.get("profile").is_none()), "mixed round: {req}");
        assert!(req.to_string().len() <= 262_144);
    }
    assert_eq!(e.tally.setting_status(&user, "s19").unwrap(), SettingStatus::Synced);
}

#[tokio::test]
async fn a_413_halves_a_settings_chunk_and_quarantines_one_setting_alone() {
    let (e, user) = signed_in_env();
    e.tally.consume(&user, "notes", 1, UsageMeta::default()).unwrap();
    fill(&e, &user, 8, 15_000);
    e.tally.set_setting(&user, "huge", Value::String("h".repeat(16_000))).unwrap();
    // The server announces 4 MiB but refuses bodies over 15.5 KB: the chunk of 9 halves down to
    // one setting per request, and the 16 KB one, too large alone, is quarantined alone.
    let server = strict_server(15_500, 4 * 1024 * 1024);
    let report = e.tally.sync(&user, server.options()).await.unwrap();
    assert!(report.rejected.is_empty(), "events are never blamed for settings: {:?}", report.rejected);
    assert_eq!(e.tally.event_status(&user, &first_event(&e, &user)).unwrap(), EventStatus::Settled);
    assert_eq!(report.settings_rejected.iter().map(|r| (r.key.as_str(), r.reason.as_str())).collect::<Vec<_>>(), [("huge", "too_large")]);
    assert_eq!(e.tally.setting_status(&user, "huge").unwrap(), SettingStatus::Rejected { reason: "too_large".into() });
    assert_eq!(e.tally.setting_status(&user, "s07").unwrap(), SettingStatus::Synced);
    // Kept and visible on the device.
    assert_eq!(e.tally.setting(&user, "huge").unwrap(), Some(Value::String("h".repeat(16_000))));
    let sent_huge = |reqs: &[Value]| reqs.iter().filter(|r| r.to_string().contains("\"key\":\"huge\"")).count();
    let before = sent_huge(&server.requests());
    // Never resent until written again.
    e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(sent_huge(&server.requests()), before);
}

fn first_event(e: &Env, user: &str) -> String {
    e.raw().query_row("SELECT id FROM events WHERE user_id = ?1 ORDER BY device_seq LIMIT 1", [user], |r| r.get(0)).unwrap()
}

#[tokio::test]
async fn a_setting_the_server_refuses_is_quarantined_alone_until_the_app_writes_it_again() {
    let (e, user) = signed_in_env();
    e.tally.set_setting(&user, "bad", json!("over the combined cap")).unwrap();
    e.tally.set_setting(&user, "good", json!(1)).unwrap();
    let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let r2 = refuse.clone();
    let server = FakeServer::start(move |_, req| {
        let mut a = accept_all(req);
        if r2.load(std::sync::atomic::Ordering::SeqCst) && req.to_string().contains("\"key\":\"bad\"") {
            let kept: Vec<Value> = req["settings_changes"].as_array().unwrap().iter().filter(|c| c["key"] != "bad").cloned().collect();
            a["settings_changes"] = json!(kept);
            a["settings_rejected"] = json!([{"key": "bad", "reason": "quota_exceeded"}]);
        }
        (200, a)
    });
    assert_eq!(e.tally.setting_status(&user, "bad").unwrap(), SettingStatus::Pending);
    let report = e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(report.settings_rejected.len(), 1);
    assert_eq!(report.settings_rejected[0].reason, "quota_exceeded");
    assert_eq!(e.tally.setting_status(&user, "bad").unwrap(), SettingStatus::Rejected { reason: "quota_exceeded".into() });
    assert_eq!(e.tally.setting_status(&user, "good").unwrap(), SettingStatus::Synced);
    assert_eq!(e.tally.setting_status(&user, "never").unwrap(), SettingStatus::NotSet);
    let n = server.requests().len();
    e.tally.sync(&user, server.options()).await.unwrap();
    let later = server.requests();
    assert!(later[n..].iter().all(|r| settings_of(r) == 0), "a rejected setting is not resent");
    // A new write clears the rejection and is sent again.
    refuse.store(false, std::sync::atomic::Ordering::SeqCst);
    e.tally.set_setting(&user, "bad", json!("smaller")).unwrap();
    assert_eq!(e.tally.setting_status(&user, "bad").unwrap(), SettingStatus::Pending);
    e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(e.tally.setting_status(&user, "bad").unwrap(), SettingStatus::Synced);
}

#[tokio::test]
async fn stored_values_that_break_the_contract_are_quarantined_and_never_sent() {
    let (e, user) = signed_in_env();
    for _ in 0..4 {
        e.tally.consume(&user, "notes", 1, UsageMeta::default()).unwrap();
    }
    e.tally.set_setting(&user, "old_big", json!("x")).unwrap();
    e.tally.set_setting(&user, "broken", json!("x")).unwrap();
    e.tally.set_setting(&user, "fine", json!("x")).unwrap();
    // What an older version (64 KiB settings, no NUL check, i64 amounts) may have stored.
    let raw = e.raw();
    let ids: Vec<String> = raw
        .prepare("SELECT id FROM events WHERE user_id = ?1 ORDER BY device_seq")
        .unwrap()
        .query_map([&user], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    raw.execute("UPDATE events SET metadata = ?2 WHERE id = ?1", [&ids[0], &json!({"a": "b\u{0}"}).to_string()]).unwrap();
    raw.execute("UPDATE events SET amount = 10000000000000 WHERE id = ?1", [&ids[1]]).unwrap();
    raw.execute("UPDATE events SET feature = ?2 WHERE id = ?1", [&ids[2], "no\u{0}te"]).unwrap();
    raw.execute("UPDATE settings SET value = ?2 WHERE user_id = ?1 AND key = 'old_big'", [&user, &json!("v".repeat(20_000)).to_string()])
        .unwrap();
    raw.execute("UPDATE settings SET value = '{not json' WHERE user_id = ?1 AND key = 'broken'", [&user]).unwrap();
    let server = FakeServer::start(|_, req| (200, accept_all(req)));
    let report = e.tally.sync(&user, server.options()).await.unwrap();
    let mut rejected: Vec<(String, String)> = report.rejected.iter().map(|r| (r.id.clone(), r.reason.clone())).collect();
    rejected.sort();
    let mut want = vec![
        (ids[0].clone(), "invalid_text".to_string()),
        (ids[1].clone(), "invalid_amount".into()),
        (ids[2].clone(), "invalid_text".into()),
    ];
    want.sort();
    assert_eq!(rejected, want);
    assert_eq!(e.tally.event_status(&user, &ids[3]).unwrap(), EventStatus::Settled);
    assert_eq!(e.tally.event_status(&user, &ids[1]).unwrap(), EventStatus::Rejected("invalid_amount".into()));
    assert_eq!(e.tally.setting_status(&user, "old_big").unwrap(), SettingStatus::Rejected { reason: "value_too_large".into() });
    assert_eq!(e.tally.setting_status(&user, "broken").unwrap(), SettingStatus::Rejected { reason: "invalid_setting".into() });
    assert_eq!(e.tally.setting_status(&user, "fine").unwrap(), SettingStatus::Synced);
    let sent = server.requests().iter().map(Value::to_string).collect::<String>();
    for id in &ids[..3] {
        assert!(!sent.contains(id.as_str()), "{id} was sent");
    }
    assert!(!sent.contains("old_big") && !sent.contains("broken"));
    assert_nothing_pending(&e, &user);
}

#[tokio::test]
async fn a_refused_or_invalid_profile_edit_is_dropped_and_reported() {
    let (e, user) = signed_in_env();
    e.tally.update_user(&user, UserUpdate { display_name: Some("Ada".into()), ..UserUpdate::default() }).unwrap();
    let server = FakeServer::start(|_, req| {
        let mut a = accept_all(req);
        if req["profile"].get("display_name").is_some() {
            a["profile_rejected"] = json!([{"field": "display_name", "reason": "invalid_profile"}]);
        }
        (200, a)
    });
    let report = e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(report.profile_rejected.len(), 1);
    assert_eq!(report.profile_rejected[0].field, "display_name");
    let n = server.requests().len();
    e.tally.sync(&user, server.options()).await.unwrap();
    assert!(server.requests()[n..].iter().all(|r| r.get("profile").is_none()), "the patch was dropped");
    // A stored patch that breaks the contract (an older version's 300-byte name) is dropped
    // field by field before sending; the valid timezone still goes.
    e.raw()
        .execute(
            "UPDATE users SET profile_patch = ?2 WHERE id = ?1",
            [&user, &json!({"display_name": "n".repeat(300), "timezone": "Europe/Paris"}).to_string()],
        )
        .unwrap();
    let n = server.requests().len();
    let report = e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(report.profile_rejected.iter().map(|r| r.field.as_str()).collect::<Vec<_>>(), ["display_name"]);
    let sent = &server.requests()[n..];
    assert!(sent.iter().any(|r| r["profile"] == json!({"timezone": "Europe/Paris"})), "{sent:?}");
}

#[tokio::test]
async fn a_subject_mismatch_is_its_own_error_and_changes_nothing() {
    let (e, user) = signed_in_env();
    e.tally.consume(&user, "notes", 1, UsageMeta::default()).unwrap();
    e.tally.set_setting(&user, "theme_x", json!(1)).unwrap();
    let server = FakeServer::start(|_, _| (409, json!({"error": {"code": "subject_mismatch", "message": "token is for another subject"}})));
    let before = e.snapshot();
    match e.tally.sync(&user, server.options()).await {
        Err(Error::SubjectMismatch(u)) => assert_eq!(u, user),
        other => panic!("expected SubjectMismatch, got {other:?}"),
    }
    assert_eq!(e.snapshot(), before);
    assert_eq!(server.requests()[0]["external_id"], "sub-1");
}

#[tokio::test]
async fn sync_without_server_keys_is_a_configuration_error_before_any_request() {
    let server = FakeServer::start(|_, req| (200, accept_all(req)));
    for keys in [None, Some("{\"keys\":[]}"), Some("not json")] {
        let e = Env::with(|c| c.server_keys = keys.map(str::to_string));
        let u = e.tally.sign_in(tally_core::Profile { external_id: "sub-1".into(), ..Default::default() }, None).unwrap();
        e.tally.consume(&u.id, "notes", 1, UsageMeta::default()).unwrap();
        let before = e.snapshot();
        match e.tally.sync(&u.id, server.options()).await {
            Err(Error::Configuration(m)) => assert!(m.contains("server_keys"), "{m}"),
            other => panic!("{keys:?}: expected Configuration, got {other:?}"),
        }
        assert_eq!(e.snapshot(), before);
    }
    assert!(server.requests().is_empty(), "no request was made, /v1/keys included");
}

fn hlc(at: &str, node: &str) -> String {
    format!("{:015}-00000-{node}", t(at).timestamp_millis())
}

#[tokio::test]
async fn a_fast_device_clock_adopts_the_restamped_hlc_so_a_later_web_write_wins() {
    let (e, user) = signed_in_env();
    // The server's clock reads 12:00; the device's runs an hour ahead.
    e.clock.set(t("2026-01-15T13:00:00Z"));
    e.tally.set_setting(&user, "theme", json!("dark")).unwrap();
    let server = FakeServer::start(|n, req| {
        let mut a = accept_all(req);
        match n {
            // The server re-stamps the HLC more than 5 min ahead of its clock.
            0 => {
                a["settings_changes"] =
                    json!([{"key": "theme", "value": "dark", "deleted": false, "hlc": hlc("2026-01-15T12:00:00Z", "dev-test")}])
            }
            // A web write a minute later.
            _ => {
                a["settings_changes"] =
                    json!([{"key": "theme", "value": "light", "deleted": false, "hlc": hlc("2026-01-15T12:01:00Z", "server")}])
            }
        }
        (200, a)
    });
    e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(settings_of(&server.requests()[0]), 1);
    assert_eq!(e.tally.setting_status(&user, "theme").unwrap(), SettingStatus::Synced);
    e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(e.tally.setting(&user, "theme").unwrap(), Some(json!("light")), "the later web write wins on the device");
}

#[tokio::test]
async fn a_row_changed_since_it_was_sent_is_not_overwritten_by_the_restamped_one() {
    let (e, user) = signed_in_env();
    e.clock.set(t("2026-01-15T13:00:00Z"));
    e.tally.set_setting(&user, "theme", json!("dark")).unwrap();
    let path = e.path.clone();
    let clock = e.clock.clone();
    let server = FakeServer::start(move |n, req| {
        let mut a = accept_all(req);
        if n == 0 {
            // The app writes again while the request is in flight.
            let config =
                tally_core::Config { device_id: Some("dev-test".into()), clock: clock.clone(), catalog: catalog(), ..Default::default() };
            let other = tally_core::Tally::open(&path, config).unwrap();
            let u = other.users().unwrap().remove(0);
            other.set_setting(&u.id, "theme", json!("blue")).unwrap();
            a["settings_changes"] =
                json!([{"key": "theme", "value": "dark", "deleted": false, "hlc": hlc("2026-01-15T12:00:00Z", "dev-test")}]);
        }
        (200, a)
    });
    e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(e.tally.setting(&user, "theme").unwrap(), Some(json!("blue")));
    let reqs = server.requests();
    assert_eq!(reqs[1]["settings_changes"][0]["value"], "blue", "the newer write was sent in the next round");
    assert_eq!(e.tally.setting_status(&user, "theme").unwrap(), SettingStatus::Synced);
}

#[tokio::test]
async fn unknown_features_of_the_answers_are_reported() {
    let (e, user) = signed_in_env();
    e.tally.consume(&user, "notes", 1, UsageMeta::default()).unwrap();
    let server = FakeServer::start(|_, req| {
        let mut a = accept_all(req);
        if events_of(req) > 0 {
            a["unknown_features"] = json!(["notes"]);
        }
        (200, a)
    });
    let report = e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(report.unknown_features, ["notes"]);
    assert_eq!(report.events_acked, 1);
}

#[tokio::test]
async fn a_413_halves_an_event_batch_and_quarantines_only_the_event_too_large_alone() {
    let (e, user) = signed_in_env();
    for i in 0..3 {
        e.tally.consume(&user, "notes", 1, UsageMeta::default()).unwrap();
        if i == 1 {
            let big = UsageMeta { metadata: Some(json!({"blob": "b".repeat(4000)})), ..UsageMeta::default() };
            e.tally.consume(&user, "notes", 1, big).unwrap();
        }
    }
    e.tally.set_setting(&user, "small", json!(1)).unwrap();
    let server = strict_server(2_000, 4 * 1024 * 1024);
    let report = e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].reason, "too_large");
    assert_eq!(report.events_acked, 3);
    assert!(report.settings_rejected.is_empty());
    assert_eq!(e.tally.setting_status(&user, "small").unwrap(), SettingStatus::Synced);
    assert_eq!(e.tally.event_status(&user, &report.rejected[0].id).unwrap(), EventStatus::Rejected("too_large".into()));
    assert_eq!(e.tally.pending_events(&user).unwrap(), 0);
    let reqs = server.requests();
    assert!(reqs.iter().any(|r| events_of(r) == 4), "the first batch held all four");
}

#[tokio::test]
async fn settings_chunks_hold_at_most_200_keys_and_the_profile_edit_rides_with_them() {
    let (e, user) = signed_in_env();
    let patch: serde_json::Map<String, Value> = (0..450).map(|i| (format!("k{i:03}"), json!(i))).collect();
    e.tally.patch_settings(&user, patch).unwrap();
    e.tally.update_user(&user, UserUpdate { timezone: Some("Europe/Paris".into()), ..UserUpdate::default() }).unwrap();
    let server = FakeServer::start(|_, req| (200, accept_all(req)));
    let report = e.tally.sync(&user, server.options()).await.unwrap();
    assert_eq!(report.settings_sent, 450);
    let chunks: Vec<usize> = server.requests().iter().map(settings_of).collect();
    assert_eq!(chunks, [200, 200, 50]);
    assert_eq!(server.requests().iter().filter(|r| r.get("profile").is_some()).count(), 1, "the profile edit is sent once");
    assert_eq!(e.tally.setting_status(&user, "k449").unwrap(), SettingStatus::Synced);
}
